"""Identity image folders (`ROOT/<identity>/<image>`) and a per-image result cache.

The folder layout is the one `inference_ID-Booth.py` writes and FR training reads: one
sub-folder per identity, its name being the identity. Files are listed and decoded with the
training code's own `datasets.list_images` / `datasets.load_rgb_image`.
"""

from __future__ import annotations

import fnmatch
import io
import warnings
import zipfile
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from fileio import atomic_write_bytes, file_sha256

# Per-image status codes stored next to each cached feature row.
STATUS_OK = 0
STATUS_NO_FACE = 1
STATUS_UNREADABLE = 2
DEFAULT_EXCLUDE = ("grid.*",)  # contact sheets next to generated images are not samples
CACHE_SAVE_EVERY = 512  # images between cache saves: an interruption loses at most this many


@dataclass
class ImageSet:
    """The images of one dataset with the identity (folder name) of each."""

    name: str
    root: Path
    paths: list[Path]  # (N,)
    identities: list[str]  # (N,) identity folder name per image
    empty_identities: list[str] = field(default_factory=list)  # folders without images
    excluded: list[str] = field(default_factory=list)  # files matched by an exclude pattern
    loose_files: list[str] = field(default_factory=list)  # images outside identity folders

    def relative(self, indices: Sequence[int] | np.ndarray) -> list[str]:
        """Paths (relative to root, POSIX) of the given image indices."""
        return [self.paths[int(i)].relative_to(self.root).as_posix() for i in indices]


def load_image_set(
    name: str, root: str | Path, exclude: Sequence[str] = DEFAULT_EXCLUDE
) -> ImageSet:
    """Scan ROOT/<identity>/<image>; FileNotFoundError / ValueError with the fix when unusable."""
    from datasets import IMAGE_EXTENSIONS, list_images  # the training code's (imports torch)

    root = Path(root).expanduser()
    if not root.is_dir():
        raise FileNotFoundError(f"{name}: image folder {root} does not exist")
    folders = sorted(p for p in root.iterdir() if p.is_dir() and not p.name.startswith("."))
    if not folders:
        raise ValueError(
            f"{name}: {root} has no identity sub-folders; expected ROOT/<identity>/<image> "
            "(one folder per identity, as inference_ID-Booth.py writes)"
        )
    image_set = ImageSet(name=name, root=root, paths=[], identities=[])
    image_set.loose_files = sorted(
        p.name for p in root.iterdir() if p.is_file() and p.suffix.lower() in IMAGE_EXTENSIONS
    )
    for folder in folders:
        try:
            images = list_images(folder)
        except ValueError:
            image_set.empty_identities.append(folder.name)
            continue
        for path in images:
            if any(fnmatch.fnmatch(path.name, pattern) for pattern in exclude):
                image_set.excluded.append(path.relative_to(root).as_posix())
                continue
            image_set.paths.append(path)
            image_set.identities.append(folder.name)
    if not image_set.paths:
        raise ValueError(f"{name}: no images in the identity folders of {root}")
    return image_set


class RowCache:
    """Per-image result rows keyed by file sha256 in one .npz (no pickle), saved atomically."""

    def __init__(self, path: Path):
        self.path = Path(path)
        self.rows: dict[str, tuple[np.ndarray, int]] = {}
        if not self.path.is_file():
            return
        try:
            with np.load(self.path, allow_pickle=False) as stored:
                for key, row, status in zip(
                    stored["keys"], stored["values"], stored["status"], strict=True
                ):
                    self.rows[str(key)] = (row, int(status))
        except (OSError, ValueError, KeyError, zipfile.BadZipFile) as error:
            # A cache is only an accelerator: recompute rather than fail or trust bad rows.
            warnings.warn(
                f"ignoring unreadable cache {self.path} ({error}); recomputing", stacklevel=2
            )
            self.rows = {}

    def save(self) -> None:
        """Write all rows (keys (N,), values (N, D), status (N,))."""
        keys = sorted(self.rows)
        values = np.stack([self.rows[key][0] for key in keys]).astype(np.float32)
        status = np.array([self.rows[key][1] for key in keys], dtype=np.int8)
        buffer = io.BytesIO()
        np.savez(buffer, keys=np.array(keys), values=values, status=status)
        atomic_write_bytes(self.path, buffer.getvalue())


def load_images(paths: Sequence[Path]) -> tuple[list, np.ndarray]:
    """Decode images as RGB PIL images; unreadable ones become None with STATUS_UNREADABLE."""
    from datasets import UnreadableImageError, load_rgb_image

    images, status = [], np.full(len(paths), STATUS_OK, dtype=np.int8)
    for index, path in enumerate(paths):
        try:
            images.append(load_rgb_image(path))
        except UnreadableImageError:
            images.append(None)
            status[index] = STATUS_UNREADABLE
    return images, status


def rows_of_readable_images(
    paths: Sequence[Path],
    width: int,
    compute: Callable[[list], tuple[np.ndarray, np.ndarray | int]],
) -> tuple[np.ndarray, np.ndarray]:
    """(N, width) float32 rows and (N,) status of image files: `compute(readable PIL images)` ->
    (rows (R, width), status (R,) or one code); files that do not decode: zero, unreadable."""
    images, status = load_images(paths)
    readable = [i for i, image in enumerate(images) if image is not None]
    rows = np.zeros((len(paths), width), dtype=np.float32)
    if readable:
        rows[readable], status[readable] = compute([images[i] for i in readable])
    return rows, status


def rows_of_face_model(
    paths: Sequence[Path],
    width: int,
    model: Callable[[list[np.ndarray]], tuple[np.ndarray, np.ndarray]],
) -> tuple[np.ndarray, np.ndarray]:
    """(N, width) rows and (N,) status of image files under a face model: `model(RGB arrays)`
    -> (rows (R, width), found (R,) bool); found -> ok, else no face; undecodable: unreadable."""

    def compute(images: list) -> tuple[np.ndarray, np.ndarray]:
        rows, found = model([np.asarray(image) for image in images])
        return rows.reshape(len(images), width), np.where(found, STATUS_OK, STATUS_NO_FACE)

    return rows_of_readable_images(paths, width, compute)


def aligned_face(image: np.ndarray, detector, index: int = 0, model: str = "this model"):
    """(112, 112, 3) aligned crop of the image's largest face (None if no face); with
    `detector=None` the image must already be such a crop (the official evaluation input)."""
    from faces import ARCFACE_SIZE

    if detector is None:
        if image.shape != (ARCFACE_SIZE, ARCFACE_SIZE, 3):
            raise ValueError(
                f"image {index} has shape {image.shape}: without a face detector {model} "
                "takes aligned 112x112 RGB crops; pass a detector to align other images"
            )
        return image
    from datasets import detect_and_align  # the one detect + align path of the project

    return detect_and_align(image, detector)[1]


RowFunction = Callable[[Sequence[Path]], tuple[np.ndarray, np.ndarray]]


def cached_rows(
    paths: Sequence[Path],
    compute: RowFunction,
    cache_path: Path | None,
    batch_size: int = 32,
    progress: Callable[[int, int], None] | None = None,
) -> tuple[np.ndarray, np.ndarray]:
    """(N, D) rows and (N,) status for `paths`, computing only files not yet in the cache.

    `compute(batch_paths) -> (rows (B, D), status (B,))`. The cache is saved every
    CACHE_SAVE_EVERY computed images and at the end, so re-runs resume.
    """
    cache = RowCache(cache_path) if cache_path is not None else None
    keys = [file_sha256(path) for path in paths]
    known = cache.rows if cache is not None else {}
    missing = [i for i, key in enumerate(keys) if key not in known]
    fresh: dict[str, tuple[np.ndarray, int]] = {}
    unsaved = 0
    for begin in range(0, len(missing), batch_size):
        batch = missing[begin : begin + batch_size]
        rows, status = compute([paths[i] for i in batch])
        for i, row, code in zip(batch, rows, status, strict=True):
            fresh[keys[i]] = (np.asarray(row, dtype=np.float32), int(code))
        unsaved += len(batch)
        if cache is not None and unsaved >= CACHE_SAVE_EVERY:
            cache.rows.update(fresh)
            cache.save()
            unsaved = 0
        if progress is not None:
            progress(min(begin + batch_size, len(missing)), len(missing))
    if cache is not None and unsaved:
        cache.rows.update(fresh)
        cache.save()
    merged = {**known, **fresh}
    if not keys:
        return np.zeros((0, 0), np.float32), np.zeros(0, np.int8)
    values = np.stack([merged[key][0] for key in keys])
    return values, np.array([merged[key][1] for key in keys], dtype=np.int8)
