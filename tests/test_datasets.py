"""datasets.py: robust loading, skip accounting, the face cache, landmark transport, pairing.

Most tests use a synthetic "face": five white dots laid out like ARCFACE_DST on a background
with a zero channel, found by a real (if simple) dot detector, so landmark positions are known
exactly. One test runs the real dlib detector on the photos insightface's wheel ships.
"""

import functools
import hashlib
import logging
import os
import shutil
from pathlib import Path

import cv2
import insightface
import numpy as np
import pytest
import torch
from PIL import Image
from safetensors import safe_open
from scipy import ndimage
from torch.utils.data import DataLoader

import datasets
from arcface import images_to_arcface_input
from datasets import (
    SKIP_NO_FACE,
    SKIP_NOT_IMAGE,
    SKIP_TOO_SMALL,
    SKIP_UNREADABLE,
    DreamBoothFaceDataset,
    UnreadableImageError,
    annotate_folder,
    collate_dreambooth,
    face_cache_path,
    image_to_tensor,
    list_images,
    load_rgb_image,
    resize_and_crop,
)
from faces import ARCFACE_DST, DlibFaceDetector, FaceDetector, align_face

INSIGHTFACE_IMAGES = Path(insightface.__file__).parent / "data" / "images"
DOT_RADIUS = 4


class DotDetector:
    """FaceDetector for dot images: weighted centroids of the 5 bright blobs, ARCFACE_DST order."""

    name = "dots"

    def __init__(self) -> None:
        self.calls = 0

    def detect_landmarks(self, image: np.ndarray) -> np.ndarray | None:
        self.calls += 1
        weight = image.min(axis=2).astype(np.float64) / 255.0  # background has a zero channel
        labels, count = ndimage.label(weight > 0.05)
        if count != 5:
            return None
        centres = np.array(ndimage.center_of_mass(weight, labels, range(1, 6)))[:, ::-1]  # (x, y)
        by_height = centres[np.argsort(centres[:, 1])]
        eyes, nose, mouth = by_height[:2], by_height[2:3], by_height[3:]
        ordered = [eyes[np.argsort(eyes[:, 0])], nose, mouth[np.argsort(mouth[:, 0])]]
        return np.concatenate(ordered).astype(np.float32)


class MedianColourEncoder(torch.nn.Module):
    """Tiny encoder: dims 0-2 = per-channel median of the aligned face (its background tint),
    the rest a fixed projection of a 4x4 pooled face; counts the faces it embedded."""

    def __init__(self, name: str = "median-colour") -> None:
        super().__init__()
        self.name = name
        self.projection = torch.nn.Linear(48, 509)
        torch.nn.init.normal_(self.projection.weight, generator=torch.Generator().manual_seed(0))
        torch.nn.init.zeros_(self.projection.bias)
        self.requires_grad_(False)
        self.faces_seen = 0

    def forward(self, faces: torch.Tensor) -> torch.Tensor:  # (B, 3, 112, 112) in [-1, 1]
        self.faces_seen += faces.shape[0]
        median = faces.flatten(2).median(dim=2).values  # (B, 3)
        pooled = torch.nn.functional.adaptive_avg_pool2d(faces, 4).flatten(1)  # (B, 48)
        return torch.cat([median, self.projection(pooled)], dim=1)  # (B, 512)


def dot_landmarks(center_x: float, center_y: float, scale: float = 1.0) -> np.ndarray:
    """ARCFACE_DST shape, scaled and centred at (center_x, center_y): (5, 2) float32."""
    centred = (ARCFACE_DST - ARCFACE_DST.mean(0)) * scale
    return (centred + np.array([center_x, center_y])).astype(np.float32)


def dot_image(
    width: int, height: int, landmarks: np.ndarray, tint: int = 60, radius: int = DOT_RADIUS
) -> np.ndarray:
    """(H, W, 3) uint8: background (tint, 0, 90) with white disks centred on the landmarks."""
    image = np.zeros((height, width, 3), np.uint8)
    image[..., 0], image[..., 2] = tint, 90
    ys, xs = np.mgrid[0:height, 0:width]
    for x, y in landmarks:
        image[(xs - x) ** 2 + (ys - y) ** 2 <= radius**2] = 255
    return image


def face_photo(width: int = 160, height: int = 120, tint: int = 60, shift: float = 0.0):
    """A dot 'face' photo and its true landmarks (integer dot centres)."""
    landmarks = np.round(dot_landmarks(width / 2 + shift, height / 2, scale=0.9))
    return dot_image(width, height, landmarks, tint), landmarks.astype(np.float32)


def save(folder: Path, name: str, pixels: np.ndarray) -> Path:
    folder.mkdir(parents=True, exist_ok=True)
    path = folder / name
    options = {"quality": 95, "subsampling": 0} if path.suffix == ".jpg" else {}
    Image.fromarray(pixels).save(path, **options)
    return path


def expected_embedding(pixels: np.ndarray, landmarks: np.ndarray) -> np.ndarray:
    """Independent path: align, scale to [-1, 1], embed with a fresh encoder."""
    faces = images_to_arcface_input(align_face(pixels, landmarks)[None])
    with torch.no_grad():
        return MedianColourEncoder()(faces)[0].numpy()


def dataset_warnings(caplog) -> list[str]:
    return [r.getMessage() for r in caplog.records if r.name == "datasets" and r.levelno >= 30]


# ----------------------------------------------------------------------------- folders + files


def test_missing_folder_is_a_clear_error(tmp_path: Path) -> None:
    missing = tmp_path / "no_such_identity"
    with pytest.raises(FileNotFoundError, match="no_such_identity"):
        list_images(missing)
    with pytest.raises(FileNotFoundError, match="no_such_identity"):
        annotate_folder(missing, DotDetector(), MedianColourEncoder())
    with pytest.raises(FileNotFoundError, match="no_such_identity"):
        DreamBoothFaceDataset(missing, DotDetector(), MedianColourEncoder(), resolution=64)


def test_empty_folder_is_a_clear_error(tmp_path: Path) -> None:
    (tmp_path / "empty").mkdir()
    with pytest.raises(ValueError, match="no images"):
        list_images(tmp_path / "empty")
    with pytest.raises(ValueError, match="no usable face photo"):
        annotate_folder(tmp_path / "empty", DotDetector(), MedianColourEncoder())
    (tmp_path / "empty" / "notes.txt").write_text("not a photo")
    with pytest.raises(ValueError, match="no images"):
        list_images(tmp_path / "empty")


def test_list_images_sorted_by_extension(tmp_path: Path) -> None:
    pixels, _ = face_photo()
    for name in ("b.PNG", "a.jpg", "c.webp", ".hidden.png", "readme.md"):
        save(tmp_path, name, pixels) if name != "readme.md" else (tmp_path / name).write_text("x")
    (tmp_path / "sub.png").mkdir()
    assert [p.name for p in list_images(tmp_path)] == ["a.jpg", "b.PNG", "c.webp"]


# ----------------------------------------------------------------------------- image modes


def test_grayscale_rgba_palette_and_16_bit_load_as_rgb(tmp_path: Path) -> None:
    rgb, _ = face_photo()
    gray = rgb.mean(axis=2).astype(np.uint8)
    Image.fromarray(gray).save(tmp_path / "gray.png")
    loaded = np.asarray(load_rgb_image(tmp_path / "gray.png"))
    assert loaded.shape == (120, 160, 3) and (loaded == gray[..., None]).all()

    Image.fromarray(rgb).convert("RGBA").save(tmp_path / "opaque.png")
    assert (np.asarray(load_rgb_image(tmp_path / "opaque.png")) == rgb).all()
    rgba = np.dstack([rgb, np.full(rgb.shape[:2], 255, np.uint8)])
    rgba[:10, :10, 3] = 0  # transparent corner -> white, not the hidden colour
    Image.fromarray(rgba).save(tmp_path / "alpha.png")
    loaded = np.asarray(load_rgb_image(tmp_path / "alpha.png"))
    assert (loaded[:10, :10] == 255).all() and (loaded[20:] == rgb[20:]).all()

    Image.fromarray(rgb).convert("P", palette=Image.Palette.ADAPTIVE).save(tmp_path / "pal.png")
    palette = np.asarray(load_rgb_image(tmp_path / "pal.png")).astype(int)
    assert np.abs(palette - rgb.astype(int)).max() <= 8

    sixteen = np.minimum(gray.astype(np.int64) * 257 + 100, 65535).astype(np.uint16)  # I;16
    cv2.imwrite(str(tmp_path / "gray16.png"), sixteen)
    assert Image.open(tmp_path / "gray16.png").mode == "I;16"
    loaded = np.asarray(load_rgb_image(tmp_path / "gray16.png")).astype(int)
    assert np.abs(loaded - gray[..., None].astype(int)).max() <= 1  # not clipped to 255

    rgb16 = rgb.astype(np.uint16) * 257
    cv2.imwrite(str(tmp_path / "rgb16.png"), rgb16[..., ::-1])  # cv2 writes BGR
    assert (np.asarray(load_rgb_image(tmp_path / "rgb16.png")) == rgb).all()


def test_32_bit_tiffs_are_scaled_by_their_format_range(tmp_path: Path) -> None:
    """float32 in [0, 1] and int32 / uint32 over their full range decode to the photo, not
    to a blank image (PIL's convert truncates floats to 0/1 and clips integers at 255)."""
    rgb, _ = face_photo()
    gray = rgb[..., 0].astype(np.float64) / 255  # (H, W) in [0, 1]
    Image.fromarray(gray.astype(np.float32)).save(tmp_path / "float.tif")
    Image.fromarray(np.round(gray * (2**31 - 1)).astype(np.int32)).save(tmp_path / "int.tif")
    cv2.imwrite(str(tmp_path / "uint.tif"), np.round(gray * (2**32 - 1)).astype(np.uint32))
    for name, mode in (("float.tif", "F"), ("int.tif", "I"), ("uint.tif", "I")):
        assert Image.open(tmp_path / name).mode == mode
        loaded = np.asarray(load_rgb_image(tmp_path / name)).astype(int)
        assert np.abs(loaded - rgb[..., :1]).max() <= 1, name


@pytest.mark.parametrize(
    ("values", "words"),
    [
        (
            np.linspace(0, 255, 64 * 64, dtype=np.float32),
            r"F samples span 0\.\.255, outside 0\.\.1",
        ),
        (np.full(64 * 64, np.nan, dtype=np.float32), "samples span nan"),
        (np.arange(64 * 64, dtype=np.int32) % 256, "one grey level"),  # 8-bit data in 32 bits
        (np.arange(64 * 64, dtype=np.int32) - 5, r"span -5\.\."),
    ],
)
def test_32_bit_tiffs_that_would_decode_blank_are_refused_in_one_line(
    tmp_path: Path, values: np.ndarray, words: str
) -> None:
    Image.fromarray(values.reshape(64, 64)).save(tmp_path / "odd.tif")
    with pytest.raises(UnreadableImageError, match=f"odd.tif.*{words}") as error:
        load_rgb_image(tmp_path / "odd.tif")
    assert "\n" not in str(error.value)


def test_broken_folder_entries_are_named_in_the_skip_report(tmp_path: Path, caplog) -> None:
    """Entries that are not files are reported by name and kind, never opened (a FIFO would
    block) and never silently left out."""
    save(tmp_path, "a.png", face_photo()[0])
    (tmp_path / "x.png").mkdir()
    os.mkfifo(tmp_path / "fifo.png")
    (tmp_path / "dangling.png").symlink_to(tmp_path / "gone.png")
    (tmp_path / "loop.png").symlink_to(tmp_path / "loop.png")
    (tmp_path / "linked.png").symlink_to(tmp_path / "a.png")  # a link to a photo is a photo
    with caplog.at_level(logging.WARNING, logger="datasets"):
        scan = datasets.scan_photos(tmp_path)
    assert [path.name for path in scan.photos] == ["a.png", "linked.png"]
    kinds = {item.path.name: item.detail for item in scan.report.skipped}
    assert kinds == {
        "dangling.png": "a dangling symlink",
        "fifo.png": "a FIFO",
        "loop.png": "a symlink loop",
        "x.png": "a folder",
    }
    assert scan.report.counts() == {datasets.SKIP_NOT_A_FILE: 4}
    [warning] = dataset_warnings(caplog)
    assert all(name in warning for name in kinds) and "4 of 6" in warning


def test_exif_orientation_is_applied(tmp_path: Path) -> None:
    rgb, _ = face_photo()
    exif = Image.Exif()
    exif[0x0112] = 6  # "rotate 90 CW to display"
    Image.fromarray(rgb).save(tmp_path / "rotated.jpg", exif=exif, quality=95)
    loaded = load_rgb_image(tmp_path / "rotated.jpg")
    assert loaded.size == (120, 160)


def test_corrupt_and_non_image_files_raise_unreadable(tmp_path: Path) -> None:
    (tmp_path / "text.jpg").write_text("this is not a JPEG")
    rgb, _ = face_photo()
    Image.fromarray(rgb).save(tmp_path / "full.jpg")
    data = (tmp_path / "full.jpg").read_bytes()
    (tmp_path / "truncated.jpg").write_bytes(data[: len(data) // 2])
    for name in ("text.jpg", "truncated.jpg"):
        with pytest.raises(UnreadableImageError, match=name):
            load_rgb_image(tmp_path / name)
    with pytest.raises(FileNotFoundError):
        load_rgb_image(tmp_path / "absent.jpg")


# ----------------------------------------------------------------------------- annotate_folder


def make_identity_folder(folder: Path) -> dict[str, np.ndarray]:
    """Usable photos in several encodings plus every kind of bad file; returns true landmarks."""
    truth = {}
    for index, name in enumerate(["a_rgb.jpg", "b_gray.png", "c_rgba.png", "d_gray16.png"]):
        rgb, landmarks = face_photo(160 + 8 * index, 120, tint=0, shift=3 * index)
        truth[name] = landmarks
        if name.endswith("jpg"):
            Image.fromarray(rgb).save(folder / name, quality=98)
        elif "gray16" in name:
            cv2.imwrite(str(folder / name), rgb[..., 1].astype(np.uint16) * 257)
        elif "rgba" in name:
            Image.fromarray(rgb).convert("RGBA").save(folder / name)
        else:
            Image.fromarray(rgb[..., 1]).save(folder / name)
    rgb, landmarks = face_photo(140, 100, tint=0)
    Image.fromarray(rgb).convert("P", palette=Image.Palette.ADAPTIVE).save(folder / "e_pal.png")
    truth["e_pal.png"] = landmarks
    (folder / "notes.txt").write_text("camera settings")
    (folder / "fake.jpg").write_text("not an image")
    data = (folder / "a_rgb.jpg").read_bytes()
    (folder / "truncated.jpg").write_bytes(data[: len(data) // 3])
    tiny, _ = face_photo(60, 48)
    save(folder, "tiny.png", tiny)
    save(folder, "noface.png", dot_image(160, 120, np.zeros((0, 2))))
    return truth


def test_annotate_folder_skips_counts_and_warns_once(tmp_path: Path, caplog) -> None:
    folder = tmp_path / "identity"
    folder.mkdir()
    truth = make_identity_folder(folder)
    detector, encoder = DotDetector(), MedianColourEncoder()
    with caplog.at_level(logging.WARNING, logger="datasets"):
        annotations, report = annotate_folder(folder, detector, encoder)
    assert [p.name for p in annotations] == sorted(truth)
    assert report.num_files == 10 and len(report) == 5
    assert report.counts() == {
        SKIP_NOT_IMAGE: 1,
        SKIP_UNREADABLE: 2,
        SKIP_TOO_SMALL: 1,
        SKIP_NO_FACE: 1,
    }
    assert detector.calls == 6  # usable + noface; tiny and unreadable never reach the detector
    warnings = dataset_warnings(caplog)
    assert len(warnings) == 1
    for name in ("notes.txt", "fake.jpg", "truncated.jpg", "tiny.png", "noface.png"):
        assert name in warnings[0]
    for path, annotation in annotations.items():
        np.testing.assert_allclose(annotation.landmarks, truth[path.name], atol=0.05)
        pixels = np.asarray(load_rgb_image(path))
        assert annotation.embedding.dtype == np.float32 and annotation.embedding.shape == (512,)
        np.testing.assert_allclose(
            annotation.embedding, expected_embedding(pixels, annotation.landmarks), atol=1e-5
        )


def test_identity_without_usable_photos_is_a_clear_error(tmp_path: Path) -> None:
    save(tmp_path, "noface.png", dot_image(160, 120, np.zeros((0, 2))))
    save(tmp_path, "tiny.png", face_photo(50, 40)[0])
    (tmp_path / "broken.jpg").write_bytes(b"\xff\xd8\xff\xe0garbage")
    with pytest.raises(ValueError, match="no usable face photo") as error:
        annotate_folder(tmp_path, DotDetector(), MedianColourEncoder())
    for name in ("noface.png", "tiny.png", "broken.jpg", str(tmp_path)):
        assert name in str(error.value)


def test_degenerate_landmarks_count_as_no_face(tmp_path: Path) -> None:
    class CollapsedDetector(DotDetector):
        name = "collapsed"

        def detect_landmarks(self, image: np.ndarray) -> np.ndarray | None:
            found = super().detect_landmarks(image)
            return None if found is None else np.repeat(found[:1], 5, axis=0)

    assert isinstance(CollapsedDetector(), FaceDetector)
    save(tmp_path, "face.png", face_photo()[0])
    with pytest.raises(ValueError, match="face.png \\(no face detected\\)"):
        annotate_folder(tmp_path, CollapsedDetector(), MedianColourEncoder())


# ----------------------------------------------------------------------------- cache


def read_cache_file(path: Path) -> tuple[dict[str, str], dict[str, torch.Tensor]]:
    with safe_open(str(path), framework="pt") as handle:
        tensors = {key: handle.get_tensor(key).clone() for key in handle.keys()}  # noqa: SIM118
        return handle.metadata(), tensors  # clones: the file is overwritten in place below


def three_faces(folder: Path) -> None:
    for index in range(3):
        save(folder, f"{index}.png", face_photo(160, 120, tint=40 * index, shift=2 * index)[0])


def test_cache_is_written_atomically_and_reused(tmp_path: Path) -> None:
    three_faces(tmp_path)
    detector, encoder = DotDetector(), MedianColourEncoder()
    first, _ = annotate_folder(tmp_path, detector, encoder)
    cache_file = face_cache_path(tmp_path, encoder, detector)
    assert cache_file == tmp_path / ".id_booth_cache" / "faces-median-colour-dots.safetensors"
    assert sorted(p.name for p in cache_file.parent.iterdir()) == [cache_file.name]  # no temp
    with safe_open(str(cache_file), framework="pt") as handle:
        metadata = handle.metadata()
        assert handle.get_tensor("embeddings").shape == (3, 512)
        assert handle.get_tensor("landmarks").shape == (3, 5, 2)
    assert metadata["encoder"] == "median-colour" and metadata["detector"] == "dots"
    for index in range(3):
        digest = hashlib.sha256((tmp_path / f"{index}.png").read_bytes()).hexdigest()
        assert f'"{index}.png", "{digest}"' in metadata["entries"]
    mtime = cache_file.stat().st_mtime_ns

    again_detector, again_encoder = DotDetector(), MedianColourEncoder()
    second, _ = annotate_folder(tmp_path, again_detector, again_encoder)
    assert again_detector.calls == 0 and again_encoder.faces_seen == 0
    assert cache_file.stat().st_mtime_ns == mtime  # nothing changed: not rewritten
    for path in first:
        np.testing.assert_array_equal(first[path].embedding, second[path].embedding)
        np.testing.assert_array_equal(first[path].landmarks, second[path].landmarks)

    (tmp_path / "1.png").rename(tmp_path / "renamed.png")  # same content: still cached
    renamed, _ = annotate_folder(tmp_path, again_detector, again_encoder)
    assert again_detector.calls == 0 and tmp_path / "renamed.png" in renamed


def test_changed_image_is_recomputed(tmp_path: Path, caplog) -> None:
    three_faces(tmp_path)
    annotate_folder(tmp_path, DotDetector(), MedianColourEncoder())
    moved_pixels, moved_landmarks = face_photo(160, 120, tint=40, shift=-9)
    save(tmp_path, "1.png", moved_pixels)  # same name, other content
    detector = DotDetector()
    with caplog.at_level(logging.WARNING, logger="datasets"):
        annotations, _ = annotate_folder(tmp_path, detector, MedianColourEncoder())
    assert detector.calls == 1
    assert any("1.png" in message for message in dataset_warnings(caplog))
    np.testing.assert_allclose(
        annotations[tmp_path / "1.png"].landmarks, moved_landmarks, atol=0.05
    )
    detector = DotDetector()
    annotate_folder(tmp_path, detector, MedianColourEncoder())
    assert detector.calls == 0  # the recomputed entry was stored


def test_cache_from_other_images_is_recomputed(tmp_path: Path, caplog) -> None:
    """A landmark cache copied from another folder (same file names) must not be trusted."""
    other, here = tmp_path / "other", tmp_path / "here"
    three_faces(other)
    annotate_folder(other, DotDetector(), MedianColourEncoder())
    truth = {}
    for index in range(3):
        pixels, truth[f"{index}.png"] = face_photo(170, 130, tint=200, shift=-5 * index)
        save(here, f"{index}.png", pixels)
    shutil.copytree(other / ".id_booth_cache", here / ".id_booth_cache")
    detector = DotDetector()
    with caplog.at_level(logging.WARNING, logger="datasets"):
        annotations, _ = annotate_folder(here, detector, MedianColourEncoder())
    assert detector.calls == 3
    assert any("0.png" in message for message in dataset_warnings(caplog))
    for path, annotation in annotations.items():
        np.testing.assert_allclose(annotation.landmarks, truth[path.name], atol=0.05)


@pytest.mark.parametrize("damage", ["garbage", "truncated", "wrong_metadata"])
def test_corrupt_cache_is_ignored_with_a_warning_and_rebuilt(
    tmp_path: Path, caplog, damage: str
) -> None:
    three_faces(tmp_path)
    detector, encoder = DotDetector(), MedianColourEncoder()
    reference, _ = annotate_folder(tmp_path, detector, encoder)
    cache_file = face_cache_path(tmp_path, encoder, detector)
    data = cache_file.read_bytes()
    original = read_cache_file(cache_file)
    if damage == "garbage":
        cache_file.write_bytes(b"\x00garbage" * 50)
    elif damage == "truncated":
        cache_file.write_bytes(data[: len(data) - 100])
    else:
        from safetensors.torch import save_file

        save_file({"embeddings": torch.zeros(1, 512)}, str(cache_file), {"format": "other"})
    detector = DotDetector()
    with caplog.at_level(logging.WARNING, logger="datasets"):
        rebuilt, _ = annotate_folder(tmp_path, detector, MedianColourEncoder())
    assert detector.calls == 3
    assert any("ignoring face cache" in message for message in dataset_warnings(caplog))
    for path in reference:
        np.testing.assert_allclose(rebuilt[path].embedding, reference[path].embedding, atol=1e-6)
    rebuilt_metadata, rebuilt_tensors = read_cache_file(cache_file)  # rebuilt, same content
    assert rebuilt_metadata == original[0]
    for key, tensor in original[1].items():
        torch.testing.assert_close(rebuilt_tensors[key], tensor)


def test_cache_off_and_unwritable_cache(tmp_path: Path, caplog, monkeypatch) -> None:
    three_faces(tmp_path)
    annotate_folder(tmp_path, DotDetector(), MedianColourEncoder(), cache=False)
    assert not (tmp_path / ".id_booth_cache").exists()

    def refuse(*args, **kwargs):
        raise OSError("read-only file system")

    monkeypatch.setattr(datasets, "save_file", refuse)
    with caplog.at_level(logging.WARNING, logger="datasets"):
        annotations, _ = annotate_folder(tmp_path, DotDetector(), MedianColourEncoder())
    assert len(annotations) == 3
    assert any("could not write face cache" in m for m in dataset_warnings(caplog))
    assert list((tmp_path / ".id_booth_cache").iterdir()) == []  # temp file removed


def test_cache_key_depends_on_encoder_and_detector(tmp_path: Path) -> None:
    three_faces(tmp_path)
    annotate_folder(tmp_path, DotDetector(), MedianColourEncoder("enc-a"))
    encoder_b = MedianColourEncoder("enc/b weights")
    annotate_folder(tmp_path, DotDetector(), encoder_b)
    assert encoder_b.faces_seen == 3
    names = sorted(p.name for p in (tmp_path / ".id_booth_cache").iterdir())
    assert names == ["faces-enc-a-dots.safetensors", "faces-enc_b_weights-dots.safetensors"]


# ----------------------------------------------------------------------------- transforms


def assert_landmarks_on_dots(pixels: np.ndarray, landmarks: np.ndarray, atol: float) -> None:
    found = DotDetector().detect_landmarks(pixels)
    assert found is not None, "all five dots must stay inside the crop"
    np.testing.assert_allclose(landmarks, found, atol=atol)


@pytest.mark.parametrize(("width", "height", "resolution"), [(200, 150, 96), (90, 120, 128)])
def test_landmarks_follow_resize_and_random_crop(width: int, height: int, resolution: int) -> None:
    """Dots sit where every crop keeps them; after resize + crop the moved landmarks hit them."""
    scale = 0.7 * min(width, height) / 112
    landmarks = np.round(dot_landmarks(width / 2, height / 2, scale=scale))
    image = Image.fromarray(dot_image(width, height, landmarks))
    generator = torch.Generator().manual_seed(0)
    offsets = set()
    for _ in range(8):
        cropped, moved = resize_and_crop(image, landmarks, resolution, generator=generator)
        assert cropped.size == (resolution, resolution) and moved.dtype == np.float32
        assert_landmarks_on_dots(np.asarray(cropped), moved, atol=0.1)
        offsets.add(tuple(np.round(moved[0]).astype(int)))
    assert len(offsets) > 2  # the crops really moved


def test_center_crop_is_deterministic_and_exact() -> None:
    landmarks = np.round(dot_landmarks(150, 100, scale=1.2))
    image = Image.fromarray(dot_image(300, 200, landmarks, radius=6))
    first = resize_and_crop(image, landmarks, 128, center_crop=True)
    second = resize_and_crop(image, landmarks, 128, center_crop=True)
    assert (np.asarray(first[0]) == np.asarray(second[0])).all()
    np.testing.assert_array_equal(first[1], second[1])
    scale = 128 / 200
    expected = (landmarks + 0.5) * scale - 0.5 - np.array([(192 - 128) // 2, 0])
    np.testing.assert_allclose(first[1], expected, atol=1e-4)
    assert_landmarks_on_dots(np.asarray(first[0]), first[1], atol=0.1)


def torchvision_resize_size(width: int, height: int, size: int) -> tuple[int, int]:
    """(W, H) of torchvision's Resize(size) (the reference's transform), re-typed from
    torchvision.transforms.functional._compute_resized_output_size: the longer side truncated."""
    short, long = (width, height) if width <= height else (height, width)
    new_short, new_long = size, int(size * long / short)
    return (new_short, new_long) if width <= height else (new_long, new_short)


@pytest.mark.parametrize(
    ("width", "height", "resolution"),
    [(301, 200, 128), (200, 301, 128), (150, 97, 64), (131, 128, 128), (128, 131, 128)],
)
def test_resize_and_center_crop_match_the_reference_torchvision_transforms(
    width: int, height: int, resolution: int
) -> None:
    """Resize(R) truncates the longer side (301x200 -> 192, not 193); CenterCrop rounds the
    offset half to even (a 3 px margin starts at 2): the same pixels as the reference's."""
    pixels = np.random.default_rng(width * height).integers(0, 256, (height, width, 3), np.uint8)
    image = Image.fromarray(pixels)
    size = torchvision_resize_size(width, height, resolution)
    resized = image.resize(size, Image.Resampling.BILINEAR)
    left = int(round((size[0] - resolution) / 2.0))  # torchvision's center_crop
    top = int(round((size[1] - resolution) / 2.0))
    expected = resized.crop((left, top, left + resolution, top + resolution))
    cropped, _ = resize_and_crop(image, np.zeros((5, 2)), resolution, center_crop=True)
    assert datasets.resize_shorter_side(image, resolution)[0].size == size
    np.testing.assert_array_equal(np.asarray(cropped), np.asarray(expected))


def test_image_to_tensor_range() -> None:
    tensor = image_to_tensor(Image.fromarray(np.array([[[0, 255, 51]]], np.uint8)))
    torch.testing.assert_close(tensor, torch.tensor([[[-1.0]], [[1.0]], [[-0.6]]]))


# ----------------------------------------------------------------------------- dataset


def build_pair_folders(tmp_path: Path) -> tuple[Path, Path]:
    """2 instance photos; 5 class photos with distinct tints, names not in tint order, with
    unusable files between them so file order and usable order differ."""
    instance, prior = tmp_path / "instance", tmp_path / "class"
    for index in range(2):
        save(instance, f"me_{index}.jpg", face_photo(180, 140, tint=10 + 5 * index)[0])
    for tint, name in zip([200, 50, 125, 25, 175], ["a", "c", "e", "g", "i"], strict=True):
        save(prior, f"{name}.png", face_photo(150 + tint // 5, 130, tint=tint, shift=tint / 50)[0])
    save(prior, "b_noface.png", dot_image(150, 130, np.zeros((0, 2)), tint=100))
    (prior / "d_broken.jpg").write_bytes(b"\xff\xd8 broken")
    save(prior, "f_tiny.png", face_photo(40, 40, tint=150)[0])
    return instance, prior


def test_dataset_items_pair_each_photo_with_its_own_embedding(tmp_path: Path) -> None:
    instance, prior = build_pair_folders(tmp_path)
    dataset = DreamBoothFaceDataset(
        instance, DotDetector(), MedianColourEncoder(), class_folder=prior, resolution=96
    )
    # b_noface.png stays in the prior set (prior loss); unreadable and tiny files are skipped.
    assert len(dataset) == 6 and dataset.num_instance_images == 2
    assert len(dataset.classes.report) == 2
    torch.manual_seed(0)
    for index in range(len(dataset)):
        item = dataset[index]
        assert item["instance_index"] == index % 2 and item["class_index"] == index
        assert item["instance_has_face"] is True
        assert item["class_has_face"] is (dataset.classes.paths[index].name != "b_noface.png")
        for prefix in ("instance", "class"):
            pixels = item[f"{prefix}_pixels"]
            assert pixels.shape == (3, 96, 96) and pixels.dtype == torch.float32
            assert pixels.min() >= -1.0 and pixels.max() <= 1.0
            if not item[f"{prefix}_has_face"]:
                continue
            embedding = item[f"{prefix}_embedding"]
            assert embedding.shape == (512,) and not embedding.requires_grad
            # The embedding's median red is the photo's tint: it must be THIS photo's tint.
            torch.testing.assert_close(embedding[0], pixels[0, 0, 0], atol=2e-3, rtol=0)
            uint8 = ((pixels.permute(1, 2, 0) + 1) * 127.5).round().byte().numpy()
            assert_landmarks_on_dots(uint8, item[f"{prefix}_landmarks"].numpy(), atol=0.15)
    tints = sorted(round(float(dataset[i]["class_pixels"][0, 0, 0] + 1) * 127.5) for i in range(6))
    assert tints == [25, 50, 100, 125, 175, 200]
    with pytest.raises(IndexError):
        dataset[6]


def test_faceless_class_photos_stay_in_the_prior_set_flagged(tmp_path: Path) -> None:
    """Every readable class photo is a prior sample; faceless ones carry has_face False, a zero
    embedding and zero landmarks (the trainer masks their triplet term), and are not skips."""
    instance, prior = build_pair_folders(tmp_path)
    dataset = DreamBoothFaceDataset(
        instance, DotDetector(), MedianColourEncoder(), class_folder=prior, resolution=64
    )
    names = [p.name for p in dataset.classes.paths]
    assert names == ["a.png", "b_noface.png", "c.png", "e.png", "g.png", "i.png"]
    assert dataset.classes.has_face.tolist() == [True, False, True, True, True, True]
    assert dataset.classes.report.counts() == {SKIP_UNREADABLE: 1, SKIP_TOO_SMALL: 1}
    assert dataset.num_class_images == 6 and dataset.num_class_images_with_face == 5
    faceless = dataset[1]
    assert faceless["class_has_face"] is False
    assert torch.equal(faceless["class_embedding"], torch.zeros(512))
    assert torch.equal(faceless["class_landmarks"], torch.zeros(5, 2))
    assert faceless["class_pixels"].shape == (3, 64, 64)

    batch = collate_dreambooth([dataset[i] for i in range(3)], with_prior=True)
    assert batch["has_face"].dtype == torch.bool
    assert batch["has_face"].tolist() == [True, True, True, True, False, True]
    assert batch["embeddings"].shape == (6, 512) and batch["landmarks"].shape == (6, 5, 2)
    assert torch.equal(batch["embeddings"][4], torch.zeros(512))

    # A class folder without any face still gives a prior set (zero embeddings of the
    # encoder's width), rather than an error or a silently empty prior.
    no_faces = tmp_path / "no_faces"
    for tint in (30, 90):
        save(no_faces, f"blank_{tint}.png", dot_image(120, 100, np.zeros((0, 2)), tint=tint))
    only_faceless = DreamBoothFaceDataset(
        instance, DotDetector(), MedianColourEncoder(), class_folder=no_faces, resolution=64
    )
    assert only_faceless.num_class_images == 2 and only_faceless.num_class_images_with_face == 0
    assert len(only_faceless) == 2 and not only_faceless[0]["class_has_face"]
    assert only_faceless[0]["class_embedding"].shape == (512,)
    instance_only = collate_dreambooth([dataset[0], dataset[1]], with_prior=False)
    assert instance_only["has_face"].tolist() == [True, True]


def test_class_folder_with_copies_of_the_identitys_own_photos_is_refused(tmp_path: Path) -> None:
    """Compared by content, not by path: a renamed copy of an instance photo in the class
    folder would make the triplet negative the positive itself."""
    instance, prior = build_pair_folders(tmp_path)
    own = sorted(instance.iterdir())[0]
    shutil.copy(own, prior / "z_renamed_copy.png")
    for detector, encoder in ((DotDetector(), MedianColourEncoder()), (None, None)):
        with pytest.raises(ValueError, match=rf"z_renamed_copy.png = {own.name}.*remove them"):
            DreamBoothFaceDataset(instance, detector, encoder, class_folder=prior, resolution=64)


@pytest.fixture(scope="module")
def real_people(tmp_path_factory) -> tuple[Path, Path]:
    """The demo's real faces (people cut from insightface's group photo): person_0's four
    crops as the identity, the other five people's crops as class images."""
    from random_models import prepare_embedded_identities

    identities, class_dir, _ = prepare_embedded_identities(tmp_path_factory.mktemp("people"))
    for photo in identities.glob("person_[1-9]/*.png"):
        shutil.copy(photo, class_dir / photo.name)
    return identities / "person_0", class_dir


def test_a_resaved_resized_copy_of_an_own_photo_in_the_class_folder_is_refused(
    real_people: tuple[Path, Path], tmp_path: Path
) -> None:
    """Not the same bytes: a JPEG re-save (quality 85) of the photo, 3 % smaller."""
    instance, class_dir = real_people
    prior = tmp_path / "class"
    shutil.copytree(class_dir, prior)
    own = sorted(instance.iterdir())[1]
    with Image.open(own) as photo:
        smaller = photo.resize((round(photo.width * 0.97), round(photo.height * 0.97)))
        smaller.convert("RGB").save(prior / "zz_resaved.jpg", quality=85)
    with pytest.raises(ValueError) as error:
        DreamBoothFaceDataset(instance, None, None, class_folder=prior, resolution=64)
    message = str(error.value)
    assert f"zz_resaved.jpg ~ {own.name} (near-duplicate" in message
    assert message.startswith(f"the class folder {prior} holds 1 of this identity's own photos")
    assert "remove them from the class folder" in message and "\n" not in message


def test_photos_of_other_real_people_are_not_taken_for_copies(
    real_people: tuple[Path, Path],
) -> None:
    instance, class_dir = real_people
    dataset = DreamBoothFaceDataset(instance, None, None, class_folder=class_dir, resolution=64)
    assert dataset.num_class_images == 12 and dataset.num_instance_images == 4
    similarity = dataset.classes.photo_thumbnails() @ dataset.instance.photo_thumbnails().T
    assert similarity.max() < 0.8  # well below datasets.NEAR_DUPLICATE_CORRELATION


class NaNEncoder(MedianColourEncoder):
    """A broken recogniser (e.g. NaN weights): every embedding is NaN."""

    def forward(self, faces: torch.Tensor) -> torch.Tensor:
        return super().forward(faces) * float("nan")


def test_non_finite_embeddings_are_refused_and_never_cached(tmp_path: Path) -> None:
    instance, _ = build_pair_folders(tmp_path)
    encoder = NaNEncoder()
    with pytest.raises(ValueError, match="NaN/inf embeddings for 2 of 2 faces.*broken"):
        annotate_folder(instance, DotDetector(), encoder)
    assert not face_cache_path(instance, encoder, DotDetector()).exists()


def test_dataset_without_class_folder_and_center_crop(tmp_path: Path) -> None:
    instance, _ = build_pair_folders(tmp_path)
    dataset = DreamBoothFaceDataset(
        instance, DotDetector(), MedianColourEncoder(), resolution=64, center_crop=True
    )
    assert len(dataset) == 2 and "class_pixels" not in dataset[0]
    torch.testing.assert_close(dataset[1]["instance_pixels"], dataset[1]["instance_pixels"])
    torch.testing.assert_close(dataset[1]["instance_landmarks"], dataset[1]["instance_landmarks"])
    with pytest.raises(ValueError, match="resolution"):
        DreamBoothFaceDataset(instance, DotDetector(), MedianColourEncoder(), resolution=0)


def test_collate_stacks_instance_then_prior(tmp_path: Path) -> None:
    instance, prior = build_pair_folders(tmp_path)
    dataset = DreamBoothFaceDataset(
        instance, DotDetector(), MedianColourEncoder(), class_folder=prior, resolution=64
    )
    loader = DataLoader(
        dataset, batch_size=3, collate_fn=functools.partial(collate_dreambooth, with_prior=True)
    )
    batch = next(iter(loader))
    examples = [dataset[i] for i in range(3)]
    assert batch["num_instance"] == 3
    assert batch["pixel_values"].shape == (6, 3, 64, 64)
    assert batch["landmarks"].shape == (6, 5, 2) and batch["embeddings"].shape == (6, 512)
    expected_embeddings = [e["instance_embedding"] for e in examples] + [
        e["class_embedding"] for e in examples
    ]
    torch.testing.assert_close(batch["embeddings"], torch.stack(expected_embeddings))
    assert batch["instance_indices"].tolist() == [0, 1, 0]
    assert batch["class_indices"].tolist() == [0, 1, 2]
    # Row k of pixel_values is the photo whose embedding is row k (tints agree); class photo 1
    # (b_noface.png) has no face, so a zero embedding.
    assert batch["has_face"].tolist() == [True, True, True, True, False, True]
    with_face = batch["has_face"]
    torch.testing.assert_close(
        batch["embeddings"][with_face, 0],
        batch["pixel_values"][with_face, 0, 0, 0],
        atol=2e-3,
        rtol=0,
    )
    instance_only = collate_dreambooth(examples, with_prior=False)
    assert instance_only["pixel_values"].shape == (3, 3, 64, 64)
    assert "class_indices" not in instance_only
    no_prior = DreamBoothFaceDataset(instance, DotDetector(), MedianColourEncoder(), resolution=64)
    with pytest.raises(ValueError, match="class folder"):
        collate_dreambooth([no_prior[0]], with_prior=True)


# ----------------------------------------------------------------------------- modes


def test_plain_dreambooth_uses_every_readable_photo_and_counts_skips(tmp_path, caplog) -> None:
    instance, prior = build_pair_folders(tmp_path)
    (prior / "notes.txt").write_text("not a photo")
    with caplog.at_level(logging.WARNING, logger="datasets"):
        dataset = DreamBoothFaceDataset(instance, None, None, class_folder=prior, resolution=64)
    # b_noface.png has no face but is a readable photo: plain DreamBooth trains on it.
    assert [p.name for p in dataset.classes.paths] == [
        "a.png",
        "b_noface.png",
        "c.png",
        "e.png",
        "g.png",
        "i.png",
    ]
    assert dataset.classes.report.counts() == {
        SKIP_UNREADABLE: 1,
        SKIP_TOO_SMALL: 1,
        SKIP_NOT_IMAGE: 1,
    }
    assert len(dataset.instance.report) == 0 and len(dataset) == 6
    [warning] = dataset_warnings(caplog)
    for name in ("d_broken.jpg", "f_tiny.png", "notes.txt", "skipped 3 of 9 files"):
        assert name in warning
    item = dataset[2]
    assert set(item) == {"instance_pixels", "instance_index", "class_pixels", "class_index"}
    assert item["class_pixels"].shape == (3, 64, 64) and item["instance_index"] == 0
    batch = collate_dreambooth([dataset[i] for i in range(3)], with_prior=True)
    assert batch["pixel_values"].shape == (6, 3, 64, 64) and batch["num_instance"] == 3
    assert "landmarks" not in batch and "embeddings" not in batch
    assert batch["class_indices"].tolist() == [0, 1, 2]

    broken = tmp_path / "broken"
    save(broken, "tiny.png", face_photo(30, 30)[0])
    (broken / "bad.jpg").write_bytes(b"\xff\xd8 nope")
    with pytest.raises(ValueError, match=r"no usable image in .*broken.*bad\.jpg"):
        DreamBoothFaceDataset(broken, None, None, resolution=64)
    with pytest.raises(ValueError, match="both a face detector and an encoder"):
        DreamBoothFaceDataset(instance, DotDetector(), None, resolution=64)


def reference_seeded_item(dataset, seed: int, epoch: int, index: int) -> dict:
    """The global RNG seeded from (seed, "crop", epoch, index) by the sha256 formula, then the
    instance crop and the class crop."""
    digest = hashlib.sha256(f"{seed}/crop/{epoch}/{index}".encode()).digest()
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(int.from_bytes(digest[:8], "big") % 2**63)
        item = {}
        for photos, prefix in ((dataset.instance, "instance"), (dataset.classes, "class")):
            row = index % len(photos.paths)
            points = photos.landmarks[row] if photos.landmarks is not None else np.zeros((0, 2))
            image, moved = resize_and_crop(
                load_rgb_image(photos.paths[row]), points, dataset.resolution
            )
            item[f"{prefix}_pixels"] = image_to_tensor(image)
            if photos.landmarks is not None:
                face = bool(photos.has_face[row])  # faceless prior photos: zero landmarks
                item[f"{prefix}_landmarks"] = torch.from_numpy(moved * face)
    return item


@pytest.mark.parametrize("faces", [True, False], ids=["face", "plain"])
def test_seeded_crops_are_a_function_of_seed_epoch_and_index(tmp_path: Path, faces) -> None:
    instance, prior = build_pair_folders(tmp_path)
    tools = (DotDetector(), MedianColourEncoder()) if faces else (None, None)
    dataset = DreamBoothFaceDataset(instance, *tools, class_folder=prior, resolution=64, seed=7)
    crops = {}
    for epoch in (0, 1):
        dataset.set_epoch(epoch)
        for index in range(len(dataset)):
            torch.manual_seed(1000 * epoch + index)  # the global RNG plays no part
            state = torch.get_rng_state()
            item = dataset[index]
            assert torch.equal(torch.get_rng_state(), state)  # ... and is left untouched
            expected = reference_seeded_item(dataset, 7, epoch, index)
            for key, value in expected.items():
                assert torch.equal(item[key], value), (epoch, index, key)
            crops[epoch, index] = item["instance_pixels"]
    assert any(not torch.equal(crops[0, i], crops[1, i]) for i in range(len(dataset)))
    dataset.set_epoch(0)
    assert torch.equal(dataset[3]["instance_pixels"], crops[0, 3])  # a resumed epoch repeats
    other_seed = DreamBoothFaceDataset(instance, *tools, resolution=64, seed=8)
    assert any(not torch.equal(other_seed[i]["instance_pixels"], crops[0, i]) for i in range(2))


# ----------------------------------------------------------------------------- real face


def test_real_dlib_landmarks_land_on_the_face_after_resize_and_crop(tmp_path: Path) -> None:
    """Real photos, real detector: landmarks moved through resize + crop match a re-detection
    on the transformed image (t1.jpg: random crops of a 1280x886 group photo; Tom Hanks: a
    112x112 crop upscaled)."""
    folder = tmp_path / "real"
    folder.mkdir()
    for name in ("t1.jpg", "Tom_Hanks_54745.png"):
        shutil.copy(INSIGHTFACE_IMAGES / name, folder / name)
    detector = DlibFaceDetector()
    dataset = DreamBoothFaceDataset(folder, detector, MedianColourEncoder(), resolution=384)
    assert [p.name for p in dataset.instance.paths] == ["Tom_Hanks_54745.png", "t1.jpg"]
    torch.manual_seed(0)
    group_offsets = set()
    for _ in range(3):
        for index in range(2):
            item = dataset[index]
            pixels = ((item["instance_pixels"].permute(1, 2, 0) + 1) * 127.5).round().byte().numpy()
            moved = item["instance_landmarks"].numpy()
            # Re-detect in a window around the moved landmarks: t1.jpg has six similar faces.
            margin = 2 * np.ptp(moved[:, 0])
            x0, y0 = np.maximum(moved.min(0) - margin, 0).astype(int)
            x1, y1 = np.minimum(moved.max(0) + margin, 384).astype(int)
            found = detector.detect_landmarks(np.ascontiguousarray(pixels[y0:y1, x0:x1]))
            assert found is not None
            found = found + np.array([x0, y0])
            # 2 eyes within ~2 px; nose and mouth within ~3 px (dlib's own re-detection jitter).
            np.testing.assert_allclose(moved[:2], found[:2], atol=2.5)
            np.testing.assert_allclose(moved, found, atol=3.5)
            if index == 1:
                group_offsets.add(tuple(np.round(moved[0]).astype(int)))
    assert len(group_offsets) > 1  # the group photo was cropped at different places


# ---------------------------------------------------------------------------------------------
# The latent cache: crops encoded ahead, in batches of one shape
# ---------------------------------------------------------------------------------------------
def test_encoded_latents_do_not_depend_on_the_crops_sharing_their_batch(tmp_path: Path) -> None:
    """A crop's (mean, std) is the same bytes whichever crops (another identity's, or fewer)
    are encoded with it: every VAE call is ENCODE_BATCH_SIZE crops; cached keys are skipped."""
    from diffusers import AutoencoderKL
    from tiny_sd import build_tiny_sd

    from datasets import ENCODE_BATCH_SIZE, LatentCache

    vae = AutoencoderKL.from_pretrained(build_tiny_sd(tmp_path / "sd"), subfolder="vae")
    crops = torch.rand(12, 3, 64, 64, generator=torch.Generator().manual_seed(0)) * 2 - 1
    shapes = []
    encode = vae.encode
    vae.encode = lambda x: shapes.append(tuple(x.shape)) or encode(x)

    def cache_of(keys: list[int]) -> LatentCache:
        cache = LatentCache(vae, torch.device("cpu"))
        cache.encode([("a", k) for k in keys], {("a", k): lambda k=k: crops[k] for k in keys})
        return cache

    many, few = cache_of(list(range(12))), cache_of([11, 3, 3])
    assert shapes == [(ENCODE_BATCH_SIZE, 3, 64, 64)] * 3  # 8 + 4 padded, then 2 padded
    for key in (3, 11):
        for column in ("mean", "std"):
            assert torch.equal(
                many.columns[column][many.rows[("a", key)]],
                few.columns[column][few.rows[("a", key)]],
            )
    few.encode([("a", 3), ("a", 11)], {})  # cached: no VAE call, no pixels needed
    assert len(shapes) == 3 and len(few) == 2
    few.drop("a", keep={("a", 11)})
    assert list(few.rows) == [("a", 11)]
    assert torch.equal(few.columns["mean"][0], many.columns["mean"][many.rows[("a", 11)]])


@pytest.mark.parametrize(
    ("text", "message"),
    [
        ("ID_a,male\n", "has no header (its first line 'ID_a,male' is a data row)"),
        ("Identity,Gender\nID_a,male\n", "has the header 'Identity,Gender': column names are"),
        ("identity;gender\nID_a;male\n", "separates fields with ';', not commas"),
        ("identity\tgender\nID_a\tmale\n", "separates fields with '\\t', not commas"),
        ("name,gender\nID_a,male\n", "has no 'identity' column (header 'name,gender')"),
        ("", "is empty"),
    ],
)
def test_attribute_csv_header_problems_are_named(tmp_path: Path, text: str, message: str) -> None:
    path = tmp_path / "genders.csv"
    path.write_text(text)
    fix = "first line must be the header 'identity,gender'"
    with pytest.raises(ValueError, match=fix) as error:
        datasets.load_identity_attributes(path)
    assert message in str(error.value)


def test_attribute_csv_header_names_may_carry_spaces(tmp_path: Path) -> None:
    path = tmp_path / "genders.csv"
    path.write_text("identity, gender\nID_a, F\n")
    assert datasets.load_identity_attributes(path)["ID_a"]["gender"] == "F"
    assert datasets.identity_genders({"ID_a": tmp_path}, path) == {"ID_a": "female"}


def test_attribute_csv_duplicate_rows_name_the_identity_and_lines(tmp_path: Path) -> None:
    path = tmp_path / "genders.csv"
    path.write_text("identity,gender\nID_a,male\nID_b,female\nID_a,female\nID_c,m\nID_b,f\n")
    with pytest.raises(ValueError, match="keep one row per identity") as error:
        datasets.load_identity_attributes(path)
    assert "2 identities appear in more than one row" in str(error.value)
    assert "'ID_a' on lines 2, 4; 'ID_b' on lines 3, 6" in str(error.value)


def test_missing_gender_of_one_identity_is_counted_in_the_singular(tmp_path: Path) -> None:
    path = tmp_path / "genders.csv"
    path.write_text("identity,gender\nID_a,male\n")
    folders = {"ID_a": tmp_path, "ID_b": tmp_path}
    with pytest.raises(ValueError, match=r"no gender for 1 identity: ID_b \("):
        datasets.identity_genders(folders, path)
    path.write_text("identity,gender\nID_a,male\nID_a,female\n")
    with pytest.raises(ValueError, match="1 identity appears in more than one row"):
        datasets.load_identity_attributes(path)


def test_a_folder_of_subfolders_is_named_as_such(tmp_path: Path) -> None:
    for name in ("session_1", "session_2"):
        (tmp_path / "ID_1" / name).mkdir(parents=True)
        Image.new("RGB", (96, 96)).save(tmp_path / "ID_1" / name / "a.png")
    for read in (datasets.list_images, datasets.scan_photos):
        with pytest.raises(
            ValueError,
            match="holds only subfolders .session_1, session_2. and subfolders are not searched",
        ):
            read(tmp_path / "ID_1")
    assert datasets.subfolders_note(tmp_path / "ID_1" / "session_1") == ""


def test_a_folder_scanned_again_warns_once(tmp_path: Path, caplog) -> None:
    """The class folder is scanned for every identity trained: its skips are warned once."""
    folder = tmp_path / "class"
    folder.mkdir()
    Image.new("RGB", (96, 96)).save(folder / "ok.png")
    Image.new("RGB", (8, 8)).save(folder / "tiny.png")
    with caplog.at_level(logging.WARNING, logger="datasets"):
        for _ in range(3):
            datasets.scan_photos(folder)
    assert len([r for r in caplog.records if "tiny.png" in r.getMessage()]) == 1
