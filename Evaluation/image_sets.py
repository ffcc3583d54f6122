"""Identity image folders (`ROOT/<identity>/<image>`) and a per-image result cache.

The folder layout is the one `inference_ID-Booth.py` writes and FR training reads: one
sub-folder per identity, its name being the identity. Files are listed and decoded with the
training code's own `datasets.list_images` / `datasets.load_rgb_image`.
"""

from __future__ import annotations

import fnmatch
import hashlib
import io
import unicodedata
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
CACHE_PART_PREFIX = "part-"  # cache folder entries, one per save


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
    name_notes: list[str] = field(default_factory=list)  # identity names that collide

    def relative(self, indices: Sequence[int] | np.ndarray) -> list[str]:
        """Paths (relative to root, POSIX) of the given image indices."""
        return [self.paths[int(i)].relative_to(self.root).as_posix() for i in indices]


def identity_name(folder_name: str) -> str:
    """The identity of a folder: its name in Unicode NFC, so a name that macOS stores
    decomposed (NFD) matches the same name typed elsewhere."""
    return unicodedata.normalize("NFC", folder_name)


def _holds_image_folders(folder: Path) -> bool:
    """Whether `folder` has a sub-folder with images (a set of identity folders, not one)."""
    from datasets import IMAGE_EXTENSIONS

    return any(
        sub.is_dir() and any(p.suffix.lower() in IMAGE_EXTENSIONS for p in sub.iterdir())
        for sub in folder.iterdir()
    )


def _no_images_error(name: str, root: Path, folders: list[Path]) -> ValueError:
    """Why ROOT has no images, naming variant folders (ROOT/<variant>/<identity>/) when so."""
    nested = [folder.name for folder in folders if _holds_image_folders(folder)]
    if not nested:
        return ValueError(f"{name}: no images in the identity folders of {root}")
    example = " ".join(f"--generated {v}={(root / v).as_posix()}" for v in nested[:3])
    return ValueError(
        f"{name}: {root} holds folders of identity folders ({', '.join(nested)}), e.g. one per "
        f"variant as reproduce_ID-Booth.py writes: give each as its own set, e.g. {example}"
    )


def _name_notes(name: str, folders_of: dict[str, list[str]]) -> list[str]:
    """Warnings about identity folders whose names collide after NFC or case folding."""
    notes = [
        f"{name}: folders {', '.join(map(repr, folders))} are one identity {identity!r} after "
        "Unicode NFC normalisation (their images are merged)"
        for identity, folders in folders_of.items()
        if len(folders) > 1
    ]
    by_folded: dict[str, list[str]] = {}
    for identity in folders_of:
        by_folded.setdefault(identity.casefold(), []).append(identity)
    notes += [
        f"{name}: identities {', '.join(map(repr, identities))} differ only in letter case "
        "(kept apart as different people; rename one if they are the same)"
        for identities in by_folded.values()
        if len(identities) > 1
    ]
    return notes


def load_image_set(
    name: str, root: str | Path, exclude: Sequence[str] = DEFAULT_EXCLUDE
) -> ImageSet:
    """Scan ROOT/<identity>/<image>; FileNotFoundError / ValueError with the fix when unusable.
    Identities are the folder names in NFC (identity_name); collisions are in name_notes."""
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
    folders_of: dict[str, list[str]] = {}
    for folder in folders:
        try:
            images = list_images(folder)
        except ValueError:
            image_set.empty_identities.append(folder.name)
            continue
        identity = identity_name(folder.name)
        folders_of.setdefault(identity, []).append(folder.name)
        for path in images:
            if any(fnmatch.fnmatch(path.name, pattern) for pattern in exclude):
                image_set.excluded.append(path.relative_to(root).as_posix())
                continue
            image_set.paths.append(path)
            image_set.identities.append(identity)
    if not image_set.paths:
        raise _no_images_error(name, root, folders)
    nested = [f.name for f in folders if f.name in image_set.empty_identities]
    nested = [folder for folder in nested if _holds_image_folders(root / folder)]
    if nested:  # e.g. --real DATA, where DATA/identities/<identity>/ and DATA/class/
        raise ValueError(
            f"{name}: {root} is one level too high: {', '.join(nested)} holds identity folders "
            f"itself; pass the folder of identities, e.g. {(root / nested[0]).as_posix()}"
        )
    image_set.name_notes = _name_notes(name, folders_of)
    return image_set


class RowCache:
    """Per-image result rows keyed by file sha256, in a folder of .npz parts (no pickle).

    Each save appends one part holding only the rows added since the last save, written
    atomically: a pass writes every row once (never the whole cache again), and an interrupted
    pass loses at most its unsaved rows. A part that does not read back whole (torn, truncated,
    bit-flipped: the zip CRCs catch it) is named in a warning, removed, and its images are
    recomputed. A single-file cache of earlier versions (FOLDER.npz) is still read.
    """

    def __init__(self, folder: Path):
        self.folder = Path(folder)
        self.rows: dict[str, tuple[np.ndarray, int]] = {}
        self.unsaved: dict[str, tuple[np.ndarray, int]] = {}
        legacy = self.folder.with_name(self.folder.name + ".npz")
        for part in [legacy, *sorted(self.folder.glob(f"{CACHE_PART_PREFIX}*.npz"))]:
            if part.is_file():
                self._read(part)

    def _read(self, part: Path) -> None:
        try:
            with np.load(part, allow_pickle=False) as stored:
                keys, values, status = stored["keys"], stored["values"], stored["status"]
            if not len(keys) == len(values) == len(status):
                raise ValueError("keys, values and status differ in length")
        except (OSError, ValueError, KeyError, EOFError, zipfile.BadZipFile) as error:
            # A cache is only an accelerator: recompute rather than fail or trust bad rows.
            warnings.warn(
                f"ignoring unreadable cache part {part} ({error}); its images are recomputed",
                stacklevel=3,
            )
            part.unlink(missing_ok=True)
            return
        for key, row, code in zip(keys, values, status, strict=True):
            self.rows[str(key)] = (row, int(code))

    def add(self, key: str, row: np.ndarray, status: int) -> None:
        """One image's row (D,) and status, saved with the next save()."""
        self.rows[key] = self.unsaved[key] = (np.asarray(row, dtype=np.float32), int(status))

    def save(self) -> None:
        """Append the unsaved rows as one part (keys (K,), values (K, D), status (K,))."""
        if not self.unsaved:
            return
        keys = sorted(self.unsaved)
        values = np.stack([self.unsaved[key][0] for key in keys]).astype(np.float32)
        status = np.array([self.unsaved[key][1] for key in keys], dtype=np.int8)
        buffer = io.BytesIO()
        np.savez(buffer, keys=np.array(keys), values=values, status=status)
        name = hashlib.sha256("\n".join(keys).encode()).hexdigest()[:16]  # distinct per content
        atomic_write_bytes(self.folder / f"{CACHE_PART_PREFIX}{name}.npz", buffer.getvalue())
        self.unsaved = {}


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


def _content_key(path: Path) -> str | None:
    """sha256 of the file's bytes, or None when it cannot be read (no permission, vanished)."""
    try:
        return file_sha256(path)
    except OSError:
        return None


def cached_rows(
    paths: Sequence[Path],
    compute: RowFunction,
    cache_path: Path | None,
    batch_size: int = 32,
    progress: Callable[[int, int], None] | None = None,
) -> tuple[np.ndarray, np.ndarray]:
    """(N, D) rows and (N,) status for `paths`, computing only files not yet in the cache.

    `compute(batch_paths) -> (rows (B, D), status (B,))`. New rows are appended to the cache
    folder every CACHE_SAVE_EVERY computed images and at the end, so re-runs resume. A file
    that cannot be read at all (e.g. no permission) is unreadable, like one that does not
    decode: a zero row, STATUS_UNREADABLE, never cached.
    """
    cache = RowCache(cache_path) if cache_path is not None else None
    keys = [_content_key(path) for path in paths]
    known = dict(cache.rows) if cache is not None else {}
    missing = [i for i, key in enumerate(keys) if key is not None and key not in known]
    for begin in range(0, len(missing), batch_size):
        batch = missing[begin : begin + batch_size]
        rows, status = compute([paths[i] for i in batch])
        for i, row, code in zip(batch, rows, status, strict=True):
            known[keys[i]] = (np.asarray(row, dtype=np.float32), int(code))
            if cache is not None:
                cache.add(keys[i], row, code)
        if cache is not None and len(cache.unsaved) >= CACHE_SAVE_EVERY:
            cache.save()
        if progress is not None:
            progress(min(begin + batch_size, len(missing)), len(missing))
    if cache is not None:
        cache.save()
    return _assemble(keys, known)


def _assemble(
    keys: Sequence[str | None], rows: dict[str, tuple[np.ndarray, int]]
) -> tuple[np.ndarray, np.ndarray]:
    """(N, D) rows and (N,) status in `keys` order; a None key: zero row, STATUS_UNREADABLE."""
    width = next((len(row) for row, _ in rows.values()), 0)
    values = np.zeros((len(keys), width), dtype=np.float32)
    status = np.full(len(keys), STATUS_UNREADABLE, dtype=np.int8)
    for index, key in enumerate(keys):
        if key is not None:
            values[index], status[index] = rows[key]
    return values, status
