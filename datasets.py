"""Identity data pipeline: robust image loading, cached face annotations, the DreamBooth dataset.

Every photo is read once per (detector, encoder) pair: its 5 ArcFace landmarks and the ArcFace
embedding of its aligned face are cached next to the data in
`<folder>/.id_booth_cache/faces-<encoder.name>-<detector.name>.safetensors`, keyed by the sha256
of the file's bytes, so a changed photo is recomputed and a renamed one is not. Dataset items
carry the landmarks through resize + crop so the trainer can align the decoded x0_hat without
running a detector inside the training step. Identity photos without a face are skipped (they
have no positive for the identity term); class (prior) photos without one are kept for the prior
loss and flagged (`class_has_face`, collated as `has_face`). Without a detector and encoder the
dataset is plain DreamBooth: every readable photo, no annotation.
"""

from __future__ import annotations

import hashlib
import io
import json
import logging
import re
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np
import torch
from PIL import Image, ImageOps, UnidentifiedImageError
from safetensors import SafetensorError, safe_open
from safetensors.torch import save_file
from torch.utils.data import Dataset

from arcface import align_face, images_to_arcface_input
from fileio import atomic_path, stable_seed

if TYPE_CHECKING:
    from arcface import FaceDetector

logger = logging.getLogger(__name__)

IMAGE_EXTENSIONS = (".jpg", ".jpeg", ".png", ".bmp", ".webp", ".tif", ".tiff")
MIN_IMAGE_SIDE = 64  # shorter side in px below which a photo carries too little face detail
CACHE_DIR_NAME = ".id_booth_cache"
CACHE_FORMAT = "id-booth-faces-v1"
EMBED_BATCH_SIZE = 32
SIXTEEN_BIT_MODES = ("I;16", "I;16L", "I;16B", "I;16N", "I")
ALPHA_MODES = ("RGBA", "RGBa", "LA", "La", "PA")

SKIP_NOT_IMAGE = "not an image file"
SKIP_UNREADABLE = "unreadable image"
SKIP_TOO_SMALL = "too small"
SKIP_NO_FACE = "no face detected"


class UnreadableImageError(ValueError):
    """A file that PIL cannot decode (corrupt, truncated or not an image)."""


@dataclass(frozen=True)
class FaceAnnotation:
    """One photo's face: ArcFace embedding (D,) float32 and 5 landmarks (5, 2) float32 in the
    ORIGINAL (EXIF-oriented) image's pixel coordinates, ARCFACE_DST order."""

    embedding: np.ndarray
    landmarks: np.ndarray


@dataclass(frozen=True)
class SkippedFile:
    """A file left out of a folder's annotations, with the reason."""

    path: Path
    reason: str
    detail: str = ""


@dataclass
class SkipReport:
    """Files of one folder that were not used; len() is how many were skipped."""

    folder: Path
    num_files: int = 0
    skipped: list[SkippedFile] = field(default_factory=list)

    def add(self, path: Path, reason: str, detail: str = "") -> None:
        """Record one skipped file."""
        self.skipped.append(SkippedFile(path, reason, detail))

    def __len__(self) -> int:
        return len(self.skipped)

    def counts(self) -> dict[str, int]:
        """Number of skipped files per reason."""
        return dict(Counter(item.reason for item in self.skipped))

    def summary(self) -> str:
        """One message naming every skipped file and why."""
        names = "; ".join(
            f"{item.path.name} ({item.reason}{': ' + item.detail if item.detail else ''})"
            for item in self.skipped
        )
        return (
            f"skipped {len(self.skipped)} of {self.num_files} files in {self.folder} "
            f"{self.counts()}: {names}"
        )


# ----------------------------------------------------------------------------- image files


def _folder_files(folder: str | Path) -> list[Path]:
    """Sorted regular, non-hidden files of `folder`; FileNotFoundError when it is missing."""
    folder = Path(folder)
    if not folder.exists():
        raise FileNotFoundError(
            f"image folder {folder} does not exist; pass the folder that holds the photos"
        )
    if not folder.is_dir():
        raise NotADirectoryError(f"{folder} is a file; pass the folder that holds the photos")
    return sorted(p for p in folder.iterdir() if p.is_file() and not p.name.startswith("."))


def _is_image_name(path: Path) -> bool:
    return path.suffix.lower() in IMAGE_EXTENSIONS


def list_images(folder: str | Path) -> list[Path]:
    """Sorted image files (by extension) of `folder`; FileNotFoundError / ValueError if none."""
    files = _folder_files(folder)
    images = [path for path in files if _is_image_name(path)]
    if not images:
        raise ValueError(
            f"no images ({', '.join(IMAGE_EXTENSIONS)}) in {folder} "
            f"({len(files)} other files); put the photos of one identity there"
        )
    return images


def _sixteen_bit_to_rgb(image: Image.Image) -> Image.Image:
    """16-bit grayscale -> 8-bit RGB by v / 257 (PIL's own convert would clip at 255)."""
    values = np.asarray(image, dtype=np.float64)  # (H, W) in [0, 65535]
    gray = np.clip(np.round(values / 257.0), 0, 255).astype(np.uint8)
    return Image.fromarray(gray).convert("RGB")


def _to_rgb(image: Image.Image) -> Image.Image:
    """Any PIL mode -> 8-bit RGB; transparent pixels are composited over white."""
    if image.mode in SIXTEEN_BIT_MODES:
        return _sixteen_bit_to_rgb(image)
    if image.mode == "P" and "transparency" in image.info:
        image = image.convert("RGBA")
    if image.mode in ALPHA_MODES:
        rgba = image.convert("RGBA")
        background = Image.new("RGBA", rgba.size, (255, 255, 255, 255))
        return Image.alpha_composite(background, rgba).convert("RGB")
    return image.convert("RGB")


def _decode_rgb(source: str | Path | io.BytesIO, name: str) -> Image.Image:
    """Open, fully decode, apply the EXIF orientation and convert to RGB."""
    try:
        with Image.open(source) as image:
            image.load()
            return _to_rgb(ImageOps.exif_transpose(image))
    except FileNotFoundError:
        raise
    except (UnidentifiedImageError, OSError, SyntaxError, ValueError, TypeError) as error:
        raise UnreadableImageError(
            f"cannot read image {name}: {error}; re-save it as PNG/JPEG or remove it"
        ) from error
    except Image.DecompressionBombError as error:
        raise UnreadableImageError(f"image {name} is implausibly large: {error}") from error


def load_rgb_image(path: str | Path) -> Image.Image:
    """RGB PIL image of `path` (grayscale, RGBA, 16-bit, palette, EXIF rotation handled)."""
    return _decode_rgb(Path(path), str(path))


# ----------------------------------------------------------------------------- annotation cache


@dataclass
class _CacheEntry:
    """Annotation of one image content (sha256): size, landmarks or None, embedding."""

    file: str
    sha256: str
    size: tuple[int, int]  # (W, H) of the EXIF-oriented image
    landmarks: np.ndarray | None  # (5, 2) float32, None when no face was found
    embedding: np.ndarray | None = None  # (D,) float32


def _safe_name(name: str) -> str:
    return re.sub(r"[^A-Za-z0-9._+=-]", "_", name)


def face_cache_path(folder: str | Path, encoder: Any, detector: FaceDetector) -> Path:
    """<folder>/.id_booth_cache/faces-<encoder.name>-<detector.name>.safetensors."""
    file_name = f"faces-{_safe_name(encoder.name)}-{_safe_name(detector.name)}.safetensors"
    return Path(folder) / CACHE_DIR_NAME / file_name


def _parse_cache(metadata: dict[str, str], tensors: dict[str, torch.Tensor], names: dict) -> dict:
    """sha256 -> _CacheEntry from a cache file's metadata + tensors; ValueError if inconsistent."""
    if metadata.get("format") != CACHE_FORMAT:
        raise ValueError(f"format {metadata.get('format')!r} is not {CACHE_FORMAT!r}")
    for key, expected in names.items():
        if metadata.get(key) != expected:
            raise ValueError(f"made for {key} {metadata.get(key)!r}, not {expected!r}")
    embeddings, landmarks = tensors["embeddings"].numpy(), tensors["landmarks"].numpy()
    if landmarks.shape[1:] != (5, 2) or embeddings.shape[0] != landmarks.shape[0]:
        raise ValueError(f"bad shapes {embeddings.shape} / {landmarks.shape}")
    if not (np.isfinite(embeddings).all() and np.isfinite(landmarks).all()):
        raise ValueError("non-finite values")
    entries = {}
    for file, sha256, width, height, row in json.loads(metadata["entries"]):
        if row >= len(landmarks):
            raise ValueError(f"row {row} out of range")
        has_face = row >= 0
        entries[sha256] = _CacheEntry(
            file,
            sha256,
            (int(width), int(height)),
            landmarks[row].astype(np.float32) if has_face else None,
            embeddings[row].astype(np.float32) if has_face else None,
        )
    return entries


def _read_cache(path: Path, names: dict[str, str]) -> dict[str, _CacheEntry]:
    """Entries of a cache file; {} (with a warning) when it is corrupt or made for other models."""
    if not path.exists():
        return {}
    try:
        with safe_open(str(path), framework="pt") as handle:
            metadata = handle.metadata() or {}
            # clone: get_tensor may map the file, which a later in-place overwrite would break
            tensors = {key: handle.get_tensor(key).clone() for key in handle.keys()}  # noqa: SIM118
        return _parse_cache(metadata, tensors, names)
    except (SafetensorError, OSError, ValueError, KeyError, TypeError) as error:
        logger.warning(
            "ignoring face cache %s (%s: %s); rebuilding it", path, type(error).__name__, error
        )
        return {}


def _write_cache(path: Path, entries: list[_CacheEntry], names: dict[str, str]) -> None:
    """Atomically write entries (fileio.atomic_path); a read-only folder only warns."""
    with_face = [entry for entry in entries if entry.landmarks is not None]
    dim = with_face[0].embedding.shape[0] if with_face else 0
    tensors = {
        "embeddings": torch.from_numpy(
            np.stack([e.embedding for e in with_face]) if with_face else np.zeros((0, dim))
        ).float(),
        "landmarks": torch.from_numpy(
            np.stack([e.landmarks for e in with_face]) if with_face else np.zeros((0, 5, 2))
        ).float(),
    }
    rows = {entry.sha256: row for row, entry in enumerate(with_face)}
    table = [[e.file, e.sha256, e.size[0], e.size[1], rows.get(e.sha256, -1)] for e in entries]
    metadata = {"format": CACHE_FORMAT, **names, "entries": json.dumps(table)}
    try:
        with atomic_path(path) as temp:
            save_file(tensors, str(temp), metadata=metadata)
    except OSError as error:  # e.g. a read-only data folder: the cache is only an accelerator
        logger.warning("could not write face cache %s (%s); continuing without it", path, error)


# ----------------------------------------------------------------------------- annotation


def _module_device_dtype(module: torch.nn.Module) -> tuple[torch.device, torch.dtype]:
    """Device and floating dtype of a module's first parameter (CPU float32 without any)."""
    for tensor in list(module.parameters()) + list(module.buffers()):
        if tensor.is_floating_point():
            return tensor.device, tensor.dtype
    return torch.device("cpu"), torch.float32


def _embed_aligned_faces(faces: list[np.ndarray], encoder: torch.nn.Module) -> np.ndarray:
    """(N, 112, 112, 3) uint8 aligned faces -> (N, D) float32 encoder embeddings, batched."""
    device, dtype = _module_device_dtype(encoder)
    chunks = []
    with torch.no_grad():
        for start in range(0, len(faces), EMBED_BATCH_SIZE):
            batch = images_to_arcface_input(np.stack(faces[start : start + EMBED_BATCH_SIZE]))
            chunks.append(encoder(batch.to(device=device, dtype=dtype)).float().cpu().numpy())
    return np.concatenate(chunks).astype(np.float32)


def _detect_entry(
    path: Path, data: bytes, sha256: str, detector: FaceDetector, min_side: int
) -> tuple[_CacheEntry, np.ndarray | None]:
    """Decode + detect one image: (entry, aligned 112x112 face or None). Tiny images: no detect."""
    image = _decode_rgb(io.BytesIO(data), str(path))
    pixels = np.asarray(image)  # (H, W, 3) uint8 RGB
    if min(image.size) < min_side:
        return _CacheEntry(path.name, sha256, image.size, None), None
    landmarks = detector.detect_landmarks(pixels)
    if landmarks is None:
        return _CacheEntry(path.name, sha256, image.size, None), None
    landmarks = np.asarray(landmarks, dtype=np.float32).reshape(5, 2)
    try:
        aligned = align_face(pixels, landmarks)  # (112, 112, 3) uint8
    except ValueError:  # degenerate landmarks (all points coincide): no usable face
        return _CacheEntry(path.name, sha256, image.size, None), None
    return _CacheEntry(path.name, sha256, image.size, landmarks), aligned


@dataclass
class _AnnotationPass:
    """Working state of one annotate_folder call."""

    report: SkipReport
    cached: dict[str, _CacheEntry]
    entries: dict[Path, _CacheEntry] = field(default_factory=dict)
    pending: list[tuple[_CacheEntry, np.ndarray]] = field(default_factory=list)
    changed: list[str] = field(default_factory=list)

    def __post_init__(self) -> None:
        self.cached_names = {entry.file for entry in self.cached.values()}

    def visit(self, path: Path, detector: FaceDetector, min_side: int) -> None:
        """Look one file up in the cache or decode + detect it; record skips."""
        if not _is_image_name(path):
            self.report.add(path, SKIP_NOT_IMAGE)
            return
        data = path.read_bytes()
        sha256 = hashlib.sha256(data).hexdigest()
        entry = self.cached.get(sha256)
        if entry is None:
            if path.name in self.cached_names:
                self.changed.append(path.name)
            try:
                entry, aligned = _detect_entry(path, data, sha256, detector, min_side)
            except UnreadableImageError as error:
                self.report.add(path, SKIP_UNREADABLE, str(error.__cause__ or error))
                return
            if aligned is not None:
                self.pending.append((entry, aligned))
        entry.file = path.name
        self.entries[path] = entry

    def classify(self, min_side: int) -> tuple[list[Path], dict[Path, FaceAnnotation]]:
        """(usable photos, annotations of those with a face) in file order; tiny images go to
        the report."""
        usable, faces = [], {}
        for path, entry in self.entries.items():
            if min(entry.size) < min_side:
                self.report.add(path, SKIP_TOO_SMALL, f"{entry.size[0]}x{entry.size[1]} px")
                continue
            usable.append(path)
            if entry.landmarks is not None:
                faces[path] = FaceAnnotation(entry.embedding, entry.landmarks)
        return usable, faces

    def cacheable(self, min_side: int) -> dict[str, _CacheEntry]:
        """sha256 -> entry of every image that went through detection (tiny ones did not)."""
        return {e.sha256: e for e in self.entries.values() if min(e.size) >= min_side}

    def needs_write(self, min_side: int) -> bool:
        """True when the cache on disk differs from what this folder now holds."""
        return bool(self.pending) or set(self.cacheable(min_side)) != set(self.cached)


def _annotation_pass(
    folder: Path, files: list[Path], detector: FaceDetector, encoder, cache: bool, min_side: int
) -> _AnnotationPass:
    """Look up or detect + embed every file of `folder`, and refresh its cache file."""
    cache_path = face_cache_path(folder, encoder, detector)
    names = {"encoder": str(encoder.name), "detector": str(detector.name)}
    state = _AnnotationPass(
        SkipReport(folder, len(files)), _read_cache(cache_path, names) if cache else {}
    )
    for path in files:
        state.visit(path, detector, min_side)
    if state.changed:
        logger.warning(
            "face cache %s held annotations of other content for %s; recomputed them",
            cache_path,
            ", ".join(state.changed),
        )
    if state.pending:
        embeddings = _embed_aligned_faces([face for _, face in state.pending], encoder)
        for (entry, _), embedding in zip(state.pending, embeddings, strict=True):
            entry.embedding = embedding
    if cache and state.needs_write(min_side):
        _write_cache(cache_path, list(state.cacheable(min_side).values()), names)
    return state


def annotate_folder(
    folder: str | Path,
    detector: FaceDetector,
    encoder: torch.nn.Module,
    cache: bool = True,
    min_side: int = MIN_IMAGE_SIDE,
) -> tuple[dict[Path, FaceAnnotation], SkipReport]:
    """Detect 5 landmarks, align and embed the face of every photo in `folder` (cached by sha256).

    Returns ({path: FaceAnnotation} in sorted file order, SkipReport). Skipped files (not an
    image, unreadable, shorter side < min_side, no face) are named in one logged warning;
    ValueError when no usable photo is left. The detector follows arcface.FaceDetector
    (`.name`, `detect_landmarks(rgb uint8) -> (5, 2) | None`); the encoder maps
    (B, 3, 112, 112) in [-1, 1] to (B, D) and has a `.name`.
    """
    folder = Path(folder)
    files = _folder_files(folder)
    state = _annotation_pass(folder, files, detector, encoder, cache, min_side)
    usable, annotations = state.classify(min_side)
    for path in usable:
        if path not in annotations:
            state.report.add(path, SKIP_NO_FACE)
    if not annotations:
        raise ValueError(
            f"no usable face photo in {folder}: {state.report.summary() if files else 'no files'}; "
            f"add photos (shorter side >= {min_side} px) that show one detectable face"
        )
    if state.report:
        logger.warning("%s", state.report.summary())
    return annotations, state.report


def annotate_photos(
    folder: str | Path,
    detector: FaceDetector,
    encoder: torch.nn.Module,
    cache: bool = True,
    min_side: int = MIN_IMAGE_SIDE,
) -> tuple[list[Path], dict[Path, FaceAnnotation], SkipReport]:
    """Every usable photo of `folder` (readable, shorter side >= min_side) and the annotations
    of those with a detected face (class / prior images: a faceless one still serves the prior
    loss). Returns (photos, {path: FaceAnnotation}, SkipReport); only unusable files are skips
    (one logged warning), faceless photos are named in a second one. ValueError when no photo
    is usable."""
    folder = Path(folder)
    files = _folder_files(folder)
    state = _annotation_pass(folder, files, detector, encoder, cache, min_side)
    usable, annotations = state.classify(min_side)
    if not usable:
        raise ValueError(
            f"no usable image in {folder}: {state.report.summary() if files else 'no files'}; "
            f"add readable photos (shorter side >= {min_side} px)"
        )
    if state.report:
        logger.warning("%s", state.report.summary())
    faceless = [path.name for path in usable if path not in annotations]
    if faceless:
        logger.warning(
            "%d of %d photos in %s have no detected face: they are used without a face "
            "embedding (prior loss only): %s",
            len(faceless),
            len(usable),
            folder,
            ", ".join(faceless),
        )
    return usable, annotations, state.report


def readable_photos(
    folder: str | Path, min_side: int = MIN_IMAGE_SIDE
) -> tuple[list[Path], SkipReport]:
    """Photos of `folder` that decode and whose shorter side is >= min_side (plain DreamBooth:
    no face needed), in sorted order; the rest are counted in the SkipReport and named in one
    logged warning. ValueError when no photo is left."""
    folder = Path(folder)
    files = _folder_files(folder)
    report, usable = SkipReport(folder, len(files)), []
    for path in files:
        if not _is_image_name(path):
            report.add(path, SKIP_NOT_IMAGE)
            continue
        try:
            width, height = load_rgb_image(path).size
        except UnreadableImageError as error:
            report.add(path, SKIP_UNREADABLE, str(error.__cause__ or error))
            continue
        if min(width, height) < min_side:
            report.add(path, SKIP_TOO_SMALL, f"{width}x{height} px")
        else:
            usable.append(path)
    if not usable:
        raise ValueError(
            f"no usable image in {folder}: {report.summary() if files else 'no files'}; "
            f"add readable photos (shorter side >= {min_side} px)"
        )
    if report:
        logger.warning("%s", report.summary())
    return usable, report


# ----------------------------------------------------------------------------- dataset


def crop_offset(
    width: int, height: int, resolution: int, center_crop: bool, generator=None
) -> tuple[int, int]:
    """(left, top) of an R x R crop: centred, or uniform over all valid offsets."""
    if center_crop:
        return (width - resolution) // 2, (height - resolution) // 2
    left = int(torch.randint(0, width - resolution + 1, (1,), generator=generator))
    top = int(torch.randint(0, height - resolution + 1, (1,), generator=generator))
    return left, top


def resize_and_crop(
    image: Image.Image,
    landmarks: np.ndarray,
    resolution: int,
    center_crop: bool = False,
    generator: torch.Generator | None = None,
) -> tuple[Image.Image, np.ndarray]:
    """Shorter side -> R (bilinear), R x R crop; landmarks: x' = (x + 0.5) * s_x - 0.5 - left.

    The half-pixel terms make the mapping exact for pixel-centre coordinates (PIL's resize
    convention), so a landmark keeps pointing at the same image content.
    """
    width, height = image.size
    scale = resolution / min(width, height)
    new_width = max(resolution, round(width * scale))
    new_height = max(resolution, round(height * scale))
    resized = image.resize((new_width, new_height), Image.Resampling.BILINEAR)
    left, top = crop_offset(new_width, new_height, resolution, center_crop, generator)
    cropped = resized.crop((left, top, left + resolution, top + resolution))
    factors = np.array([new_width / width, new_height / height], dtype=np.float64)
    offset = np.array([left, top], dtype=np.float64)
    moved = (np.asarray(landmarks, dtype=np.float64) + 0.5) * factors - 0.5 - offset
    return cropped, moved.astype(np.float32)


def image_to_tensor(image: Image.Image) -> torch.Tensor:
    """RGB PIL image -> (3, H, W) float32 in [-1, 1] = x / 127.5 - 1."""
    pixels = torch.from_numpy(np.asarray(image, dtype=np.float32).copy())  # (H, W, 3)
    return (pixels.permute(2, 0, 1) / 127.5 - 1.0).contiguous()


@dataclass
class _PhotoSet:
    """Usable photos of one folder, with their stacked face annotations when there are any."""

    paths: list[Path]
    report: SkipReport
    embeddings: torch.Tensor | None = None  # (N, D) float32, zero rows for faceless photos
    landmarks: np.ndarray | None = None  # (N, 5, 2) float32, original image coordinates
    has_face: np.ndarray | None = None  # (N,) bool

    @classmethod
    def plain(cls, folder, min_side: int) -> _PhotoSet:
        """Every readable photo, no annotation (plain DreamBooth)."""
        return cls(*readable_photos(folder, min_side))

    @classmethod
    def faces_only(cls, folder, detector, encoder, cache: bool, min_side: int) -> _PhotoSet:
        """Photos with a detected face, each with its embedding + landmarks (identity photos:
        a faceless one has no positive for the identity term)."""
        annotations, report = annotate_folder(folder, detector, encoder, cache, min_side)
        paths = list(annotations)
        embeddings = torch.from_numpy(np.stack([annotations[p].embedding for p in paths]))
        landmarks = np.stack([annotations[p].landmarks for p in paths])
        has_face = np.ones(len(paths), dtype=bool)
        return cls(paths, report, embeddings.float(), landmarks, has_face)

    @classmethod
    def all_photos(
        cls, folder, detector, encoder, cache: bool, min_side: int, embedding_dim: int
    ) -> _PhotoSet:
        """Every usable photo (class images: all serve the prior loss); faceless ones get a zero
        embedding (embedding_dim,), zero landmarks and has_face False."""
        paths, annotations, report = annotate_photos(folder, detector, encoder, cache, min_side)
        embeddings = np.zeros((len(paths), embedding_dim), dtype=np.float32)
        landmarks = np.zeros((len(paths), 5, 2), dtype=np.float32)
        has_face = np.array([path in annotations for path in paths], dtype=bool)
        for row, path in enumerate(paths):
            if has_face[row]:
                embeddings[row] = annotations[path].embedding
                landmarks[row] = annotations[path].landmarks
        return cls(paths, report, torch.from_numpy(embeddings), landmarks, has_face)

    @property
    def annotated(self) -> bool:
        """True when the photos carry face annotations (a detector and encoder were given)."""
        return self.embeddings is not None

    @property
    def num_with_face(self) -> int:
        return int(self.has_face.sum()) if self.has_face is not None else 0


_NO_LANDMARKS = np.zeros((0, 2), dtype=np.float32)  # landmarks of a photo without annotation


class DreamBoothFaceDataset(Dataset):
    """Identity photos (+ optional class / prior photos), each with its own embedding + landmarks.

    Item i uses instance photo i % N_inst and class photo i % N_class; len = max of the two.
    With a detector and encoder the instance photos are those with a detected face (see
    annotate_folder for the skip rules) and the class photos are every usable one (they all
    serve the prior loss, as in the reference): a faceless class photo has `class_has_face`
    False, a zero `class_embedding` and zero `class_landmarks`, so the trainer can mask the
    triplet term that would use it as the negative. With neither (plain DreamBooth) every
    readable photo is used and items carry no `*_embedding` / `*_landmarks` / `*_has_face`.
    With a `seed`, item i of epoch e (set_epoch) crops with a
    generator seeded stable_seed(stable_seed(seed, "crop", e), i) (little-endian), so crops are a
    function of position (a resumed run crops like an uninterrupted one); without one they come
    from torch's global RNG.
    """

    def __init__(
        self,
        instance_folder: str | Path,
        detector: FaceDetector | None,
        encoder: torch.nn.Module | None,
        class_folder: str | Path | None = None,
        resolution: int = 512,
        center_crop: bool = False,
        cache: bool = True,
        min_side: int = MIN_IMAGE_SIDE,
        seed: int | None = None,
    ) -> None:
        if resolution <= 0:
            raise ValueError(f"resolution must be a positive number of pixels, got {resolution}")
        if (detector is None) != (encoder is None):
            raise ValueError(
                "pass both a face detector and an encoder (face-annotated photos) or neither "
                "(plain DreamBooth: every readable photo)"
            )
        self.resolution = resolution
        self.center_crop = center_crop
        self.seed, self.epoch = seed, 0
        self.classes = None
        if detector is None:
            self.instance = _PhotoSet.plain(instance_folder, min_side)
            if class_folder is not None:
                self.classes = _PhotoSet.plain(class_folder, min_side)
            return
        self.instance = _PhotoSet.faces_only(instance_folder, detector, encoder, cache, min_side)
        if class_folder is not None:
            embedding_dim = self.instance.embeddings.shape[1]
            self.classes = _PhotoSet.all_photos(
                class_folder, detector, encoder, cache, min_side, embedding_dim
            )

    @property
    def num_instance_images(self) -> int:
        return len(self.instance.paths)

    @property
    def num_class_images(self) -> int:
        return len(self.classes.paths) if self.classes is not None else 0

    @property
    def num_class_images_with_face(self) -> int:
        """Class photos with a detected face (0 without annotation or class folder)."""
        return self.classes.num_with_face if self.classes is not None else 0

    def __len__(self) -> int:
        return max(self.num_instance_images, self.num_class_images)

    def set_epoch(self, epoch: int) -> None:
        """Epoch whose seeded crops the items use (call before building its DataLoader)."""
        self.epoch = epoch

    def _crop_generator(self, index: int) -> torch.Generator | None:
        """CPU generator of item `index` in this epoch, or None (global RNG) without a seed."""
        if self.seed is None:
            return None
        epoch_seed = stable_seed(self.seed, "crop", self.epoch, byteorder="little")
        return torch.Generator().manual_seed(stable_seed(epoch_seed, index, byteorder="little"))

    def _sample(
        self, photos: _PhotoSet, index: int, prefix: str, generator: torch.Generator | None
    ) -> dict[str, Any]:
        """Load, resize and crop one photo; its landmarks follow, its embedding is its own."""
        image = load_rgb_image(photos.paths[index])
        points = photos.landmarks[index] if photos.annotated else _NO_LANDMARKS
        cropped, landmarks = resize_and_crop(
            image, points, self.resolution, self.center_crop, generator
        )
        example = {
            f"{prefix}_pixels": image_to_tensor(cropped),  # (3, R, R) in [-1, 1]
            f"{prefix}_index": index,
        }
        if photos.annotated:
            has_face = bool(photos.has_face[index])
            if not has_face:  # no face to point at: zeros, never used (has_face masks them)
                landmarks = np.zeros((5, 2), dtype=np.float32)
            example[f"{prefix}_landmarks"] = torch.from_numpy(landmarks)  # (5, 2) crop pixels
            example[f"{prefix}_embedding"] = photos.embeddings[index]  # (D,), zero if faceless
            example[f"{prefix}_has_face"] = has_face
        return example

    def __getitem__(self, index: int) -> dict[str, Any]:
        if not 0 <= index < len(self):
            raise IndexError(f"index {index} out of range for {len(self)} items")
        generator = self._crop_generator(index)  # instance crop first, then the class crop
        example = self._sample(
            self.instance, index % self.num_instance_images, "instance", generator
        )
        if self.classes is not None:
            example.update(
                self._sample(self.classes, index % self.num_class_images, "class", generator)
            )
        return example


def collate_dreambooth(examples: list[dict[str, Any]], with_prior: bool) -> dict[str, Any]:
    """Stack a batch as [instance..., prior...]: pixel_values (B, 3, R, R), landmarks (B, 5, 2),
    embeddings (B, D) and has_face (B,) bool (face-annotated items only), num_instance,
    instance_indices / class_indices (long)."""
    if not examples:
        raise ValueError("collate_dreambooth got an empty batch")
    prefixes = ["instance", "class"] if with_prior else ["instance"]
    if with_prior and "class_pixels" not in examples[0]:
        raise ValueError("with_prior=True but the dataset has no class folder")
    batch: dict[str, Any] = {
        "pixel_values": torch.stack([e[f"{p}_pixels"] for p in prefixes for e in examples]),
        "num_instance": len(examples),
    }
    if "instance_embedding" in examples[0]:  # face-annotated items
        batch["landmarks"] = torch.stack([e[f"{p}_landmarks"] for p in prefixes for e in examples])
        batch["embeddings"] = torch.stack([e[f"{p}_embedding"] for p in prefixes for e in examples])
        batch["has_face"] = torch.tensor(
            [e[f"{p}_has_face"] for p in prefixes for e in examples], dtype=torch.bool
        )
    for prefix in prefixes:
        batch[f"{prefix}_indices"] = torch.tensor([e[f"{prefix}_index"] for e in examples])
    batch["pixel_values"] = batch["pixel_values"].float().contiguous()
    return batch
