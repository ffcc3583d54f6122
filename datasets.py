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

import csv
import errno
import hashlib
import io
import json
import logging
import re
import stat
from collections import Counter
from collections.abc import Collection, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np
import torch
from PIL import Image, ImageOps, UnidentifiedImageError
from safetensors import SafetensorError, safe_open
from safetensors.torch import save_file
from torch.utils.data import Dataset

import runs
from arcface import embed_aligned_faces
from faces import align_face
from fileio import atomic_path, stable_seed

if TYPE_CHECKING:
    from faces import FaceDetector

logger = logging.getLogger(__name__)

IMAGE_EXTENSIONS = (".jpg", ".jpeg", ".png", ".bmp", ".webp", ".tif", ".tiff")
MIN_IMAGE_SIDE = 64  # shorter side in px below which a photo carries too little face detail
# Near-duplicate photos: the correlation of 32x32 grayscale thumbnails (mean removed). A JPEG
# re-save at quality 85 resized by a few % scores > 0.999 on a real face photo; crops of
# different people, or other crops of one person, score < 0.75 (tests/test_datasets.py).
THUMBNAIL_SIDE = 32
NEAR_DUPLICATE_CORRELATION = 0.97
CACHE_DIR_NAME = ".id_booth_cache"
CACHE_FORMAT = "id-booth-faces-v1"
EMBED_BATCH_SIZE = 32
SIXTEEN_BIT_MODES = ("I;16", "I;16L", "I;16B", "I;16N", "I")
ALPHA_MODES = ("RGBA", "RGBa", "LA", "La", "PA")
TIFF_BITS_PER_SAMPLE, TIFF_SAMPLE_FORMAT = 258, 339  # TIFF tags: 32 bits, 1 uint / 2 int / 3 float

GENDER_ALIASES = {
    "male": "male",
    "m": "male",
    "man": "male",
    "female": "female",
    "f": "female",
    "woman": "female",
}

SKIP_NOT_IMAGE = "not an image file"
SKIP_NOT_A_FILE = "not a file"
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


def _folder_entries(folder: str | Path) -> list[Path]:
    """Sorted non-hidden entries of `folder` (any kind); FileNotFoundError when it is missing."""
    folder = Path(folder)
    if not folder.exists():
        raise FileNotFoundError(
            f"image folder {folder} does not exist; pass the folder that holds the photos"
        )
    if not folder.is_dir():
        raise NotADirectoryError(f"{folder} is a file; pass the folder that holds the photos")
    return sorted(p for p in folder.iterdir() if not p.name.startswith("."))


def _folder_files(folder: str | Path) -> list[Path]:
    """Sorted regular (or linked to regular), non-hidden files of `folder`."""
    return [path for path in _folder_entries(folder) if path.is_file()]


def entry_kind(path: Path) -> str:
    """What a folder entry that is not a regular file is, for a skip report: 'a folder',
    'a FIFO', 'a dangling symlink', 'a symlink loop', ..."""
    try:
        mode = path.lstat().st_mode
        prefix = "a symlink to " if stat.S_ISLNK(mode) else ""
        mode = path.stat().st_mode if prefix else mode
    except OSError as error:  # stat failed: the link points nowhere, or at itself
        if error.errno == errno.ELOOP:
            return "a symlink loop"
        return "a dangling symlink" if error.errno == errno.ENOENT else f"unreadable ({error})"
    kinds = (
        (stat.S_ISDIR, "a folder"),
        (stat.S_ISFIFO, "a FIFO"),
        (stat.S_ISSOCK, "a socket"),
        (stat.S_ISCHR, "a device"),
        (stat.S_ISBLK, "a device"),
    )
    kind = next((name for test, name in kinds if test(mode)), "not a regular file")
    return prefix + kind


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
            f"{subfolders_note(folder)}"
        )
    return images


def subfolders_note(folder: str | Path) -> str:
    """'; FOLDER holds only subfolders (...)' when a folder without image files holds folders
    (photos one level too deep), else ''. Subfolders are never searched: say so."""
    folder = Path(folder)
    if not folder.is_dir() or any(_is_image_name(path) for path in _folder_files(folder)):
        return ""
    subfolders = sorted(p.name for p in folder.iterdir() if p.is_dir() and p.name[0] != ".")
    if not subfolders:
        return ""
    shown = ", ".join(subfolders[:5]) + (" ..." if len(subfolders) > 5 else "")
    return (
        f"; {folder} holds only subfolders ({shown}) and subfolders are not searched: put "
        "an identity's photos directly in its folder"
    )


def _white_level(image: Image.Image) -> float | None:
    """The sample value that is white in a high-depth grayscale image, from its format: 65535
    for 16 bits, 2**32 - 1 (2**31 - 1 signed, TIFF SampleFormat 2) for 32-bit integers, 1.0 for
    32-bit float (the [0, 1] convention of float images); None for 8-bit modes."""
    if image.mode == "F":
        return 1.0
    if image.mode not in SIXTEEN_BIT_MODES:
        return None
    tags = getattr(image, "tag_v2", {})  # TIFF only; other formats reach mode "I" from 16 bits
    if image.mode == "I" and tags.get(TIFF_BITS_PER_SAMPLE) in (32, (32,)):
        signed = tags.get(TIFF_SAMPLE_FORMAT) in (2, (2,))
        return float(2**31 - 1 if signed else 2**32 - 1)
    return 65535.0


def _high_depth_to_rgb(image: Image.Image, white: float) -> Image.Image:
    """16/32-bit grayscale -> 8-bit RGB by round(v / white * 255) (PIL's own convert clips at
    255, or truncates floats to 0/1: blank images). UnreadableImageError, one line, where the
    samples are non-finite or outside [0, white] (a float image in 0..255, say), or span so
    little of the range that all would be one grey level."""
    values = np.asarray(image)  # (H, W)
    if white == 2**32 - 1:  # PIL holds uint32 samples in int32: reinterpret the bits
        values = values.view(np.uint32)
    values = values.astype(np.float64)
    low, high = float(values.min()), float(values.max())
    if not (np.isfinite(low) and np.isfinite(high)) or low < 0 or high > white:
        raise UnreadableImageError(
            f"{image.mode} samples span {low:g}..{high:g}, outside 0..{white:g} of the format"
        )
    gray = np.round(values / white * 255.0).astype(np.uint8)
    if gray.min() == gray.max() and low < high:
        raise UnreadableImageError(
            f"{image.mode} samples span only {low:g}..{high:g} of 0..{white:g}: one grey level "
            "in 8 bits (a blank image)"
        )
    return Image.fromarray(gray).convert("RGB")


def _to_rgb(image: Image.Image, white: float | None = None) -> Image.Image:
    """Any PIL mode -> 8-bit RGB; high-depth grayscale scaled by its `white` level (from
    _white_level of the file as opened); transparent pixels are composited over white."""
    if white is not None:
        return _high_depth_to_rgb(image, white)
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
            white = _white_level(image)  # from the file's own tags, before any transpose
            return _to_rgb(ImageOps.exif_transpose(image), white)
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


# ----------------------------------------------------------------------------- identity attributes


def load_identity_attributes(path: Path) -> dict[str, dict[str, str]]:
    """identity -> {column: value} from a CSV with an 'identity' column or a JSON mapping."""
    if path.suffix.lower() == ".csv":
        with path.open(newline="", encoding="utf-8-sig") as handle:  # a BOM is not a column
            reader = csv.DictReader(handle)
            header = [name.strip() for name in reader.fieldnames or []]  # "identity, gender"
            _check_attribute_header(path, header)
            reader.fieldnames = header
            rows = [(reader.line_num, _attribute_row(path, reader.line_num, row)) for row in reader]
        _refuse_duplicate_identities(path, rows)
        return {row["identity"]: row for _, row in rows}
    if path.suffix.lower() == ".json":
        data = json.loads(path.read_text())
        if isinstance(data, list):
            if not all(isinstance(row, dict) and "identity" in row for row in data):
                raise ValueError(
                    f"{path}: a JSON list needs {{'identity': ..., 'gender': ...}} rows"
                )
            data = {str(row["identity"]): row for row in data}
        if not isinstance(data, dict):
            raise ValueError(f"{path}: JSON must map identity -> gender or -> {{'gender': ...}}")
        return {str(k): (v if isinstance(v, dict) else {"gender": v}) for k, v in data.items()}
    raise ValueError(f"{path}: identity attributes must be a .csv or .json file")


def _refuse_duplicate_identities(path: Path, rows: list[tuple[int, dict[str, str]]]) -> None:
    """ValueError naming each identity of more than one row, with its line numbers: which row
    is meant cannot be guessed, and taking the last would hide a typo."""
    lines: dict[str, list[int]] = {}
    for line, row in rows:
        lines.setdefault(row["identity"], []).append(line)
    repeated = [
        f"{name!r} on lines {', '.join(map(str, at))}" for name, at in lines.items() if len(at) > 1
    ]
    if repeated:
        raise ValueError(
            f"{path}: {runs.plural(len(repeated), 'identity')} "
            f"{'appears' if len(repeated) == 1 else 'appear'} in more than one row "
            f"({'; '.join(repeated)}); keep one row per identity"
        )


def _check_attribute_header(path: Path, header: list[str]) -> None:
    """ValueError naming what is wrong with an attributes CSV's first line: no header, another
    delimiter, other case; the fix is always the header line 'identity,gender'."""
    if "identity" in header:
        return
    first_line = ",".join(header)
    delimiter = next((d for d in ";\t|" if len(header) == 1 and d in header[0]), None)
    if not header:
        problem = "is empty"
    elif delimiter is not None:
        problem = f"separates fields with {delimiter!r}, not commas ({first_line!r})"
    elif "identity" in [name.lower() for name in header]:
        problem = f"has the header {first_line!r}: column names are lower case"
    elif len(header) > 1 and normalise_gender(header[-1]) is not None:
        problem = f"has no header (its first line {first_line!r} is a data row)"
    else:
        problem = f"has no 'identity' column (header {first_line!r})"
    raise ValueError(
        f"{path}: CSV {problem}; its first line must be the header 'identity,gender', then "
        "one 'identity,gender' row per identity"
    )


def normalise_gender(value: str) -> str | None:
    """'M'/'man'/'male' -> 'male', 'F'/'woman'/'female' -> 'female', else None."""
    return GENDER_ALIASES.get(str(value).strip().lower())


def _attribute_row(path: Path, line: int, row: dict) -> dict[str, str]:
    """One CSV row with stripped values; ValueError naming the line of a malformed one."""
    if None in row:  # csv.DictReader puts fields beyond the header under the key None
        raise ValueError(f"{path}: line {line} has more fields than the header {list(row)[:-1]}")
    return {key: (value or "").strip() for key, value in row.items()}


def identity_genders(folders: dict[str, Path], attributes_file: Path | None) -> dict[str, str]:
    """identity -> 'male' / 'female' from the attributes file, else from a 'gender' entry in the
    identity folder's training_config.json; one ValueError listing every identity without one."""
    attributes = load_identity_attributes(attributes_file) if attributes_file else {}
    genders, missing, invalid = {}, [], []
    for name, folder in folders.items():
        raw = attributes.get(name, {}).get("gender") or _training_config_gender(folder)
        if not raw:
            missing.append(name)
        elif (gender := normalise_gender(raw)) is None:
            invalid.append(f"{name}={raw!r}")
        else:
            genders[name] = gender
    if missing or invalid:
        source = attributes_file or "no --identity_attributes file"
        problems = []
        if missing:
            problems.append(
                f"no gender for {runs.plural(len(missing), 'identity')}: {', '.join(missing)}"
            )
        if invalid:
            problems.append(f"unknown gender values {', '.join(invalid)}")
        raise ValueError(
            f"{'; '.join(problems)} ({source}); the prompt template uses {{gender}}: add rows "
            f"'identity,gender' with one of {sorted(set(GENDER_ALIASES))} to --identity_attributes"
        )
    return genders


def _training_config_gender(folder: Path) -> str | None:
    """A 'gender' entry in an identity's training_config.json, if there is one."""
    config = folder / "training_config.json"
    if not config.is_file():
        return None
    try:
        return json.loads(config.read_text()).get("gender")
    except (json.JSONDecodeError, AttributeError):
        return None


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


def detect_and_align(
    pixels: np.ndarray, detector: FaceDetector
) -> tuple[np.ndarray | None, np.ndarray | None]:
    """(H, W, 3) uint8 RGB -> ((5, 2) float32 landmarks, (112, 112, 3) aligned face), or Nones."""
    landmarks = detector.detect_landmarks(pixels)
    if landmarks is None:
        return None, None
    landmarks = np.asarray(landmarks, dtype=np.float32).reshape(5, 2)
    try:
        return landmarks, align_face(pixels, landmarks)
    except ValueError:  # degenerate landmarks (all points coincide): no usable face
        return None, None


def annotate_images(
    images: Sequence[np.ndarray],
    detector: FaceDetector,
    encoder: torch.nn.Module,
    batch_size: int = EMBED_BATCH_SIZE,
) -> tuple[np.ndarray, np.ndarray]:
    """In-memory images -> (N, D) float32 embeddings (zero rows where no face), (N,) bool found."""
    aligned = [detect_and_align(np.asarray(image), detector)[1] for image in images]
    found = np.array([face is not None for face in aligned], dtype=bool)
    embedded = embed_aligned_faces(encoder, [f for f in aligned if f is not None], batch_size)
    embeddings = np.zeros((len(images), embedded.shape[1]), dtype=np.float32)
    embeddings[found] = embedded
    return embeddings, found


def _detect_entry(
    path: Path, data: bytes, sha256: str, detector: FaceDetector, min_side: int
) -> tuple[_CacheEntry, np.ndarray | None]:
    """Decode + detect one image: (entry, aligned 112x112 face or None). Tiny images: no detect."""
    image = _decode_rgb(io.BytesIO(data), str(path))
    if min(image.size) < min_side:
        return _CacheEntry(path.name, sha256, image.size, None), None
    landmarks, aligned = detect_and_align(np.asarray(image), detector)
    return _CacheEntry(path.name, sha256, image.size, landmarks), aligned


@dataclass
class _ScanPass:
    """Working state of one scan: cached / detected annotations or plain sizes, and skips."""

    report: SkipReport
    cached: dict[str, _CacheEntry]
    detector: FaceDetector | None
    sizes: dict[Path, tuple[int, int]] = field(default_factory=dict)
    sha256: dict[Path, str] = field(default_factory=dict)  # content hash of every decoded file
    entries: dict[Path, _CacheEntry] = field(default_factory=dict)
    pending: list[tuple[_CacheEntry, np.ndarray]] = field(default_factory=list)
    changed: list[str] = field(default_factory=list)

    def __post_init__(self) -> None:
        self.cached_names = {entry.file for entry in self.cached.values()}

    def visit(self, path: Path, min_side: int) -> None:
        """Read one file's size (plain) or its cached / fresh face annotation; record skips."""
        if not path.is_file():  # never opened: a FIFO would block, a folder cannot be read
            self.report.add(path, SKIP_NOT_A_FILE, entry_kind(path))
            return
        if not _is_image_name(path):
            self.report.add(path, SKIP_NOT_IMAGE)
            return
        try:
            data = path.read_bytes()
            self.sha256[path] = hashlib.sha256(data).hexdigest()
            if self.detector is None:  # plain DreamBooth: decodes and is large enough
                self.sizes[path] = _decode_rgb(io.BytesIO(data), str(path)).size
            else:
                self._annotate(path, data, min_side)
        except UnreadableImageError as error:
            self.report.add(path, SKIP_UNREADABLE, str(error.__cause__ or error))
        except OSError as error:  # no permission, vanished, I/O error: skipped and named too
            self.report.add(path, SKIP_UNREADABLE, f"{type(error).__name__}: {error.strerror}")

    def usable_count(self, min_side: int) -> int:
        return sum(min(size) >= min_side for size in self.sizes.values())

    def _annotate(self, path: Path, data: bytes, min_side: int) -> None:
        sha256 = self.sha256[path]
        entry = self.cached.get(sha256)
        if entry is None:
            if path.name in self.cached_names:
                self.changed.append(path.name)
            entry, aligned = _detect_entry(path, data, sha256, self.detector, min_side)
            if aligned is not None:
                self.pending.append((entry, aligned))
        entry.file = path.name
        self.entries[path] = entry
        self.sizes[path] = entry.size

    def classify(self, min_side: int) -> tuple[list[Path], dict[Path, FaceAnnotation]]:
        """(usable photos, annotations of those with a face) in file order; tiny images go to
        the report."""
        usable, faces = [], {}
        for path, (width, height) in self.sizes.items():
            if min(width, height) < min_side:
                self.report.add(path, SKIP_TOO_SMALL, f"{width}x{height} px")
                continue
            usable.append(path)
            entry = self.entries.get(path)
            if entry is not None and entry.landmarks is not None:
                faces[path] = FaceAnnotation(entry.embedding, entry.landmarks)
        return usable, faces

    def cacheable(self, min_side: int) -> dict[str, _CacheEntry]:
        """sha256 -> entry of every image that went through detection (tiny ones did not)."""
        return {e.sha256: e for e in self.entries.values() if min(e.size) >= min_side}

    def needs_write(self, min_side: int) -> bool:
        """True when the cache on disk differs from what this folder now holds."""
        return bool(self.pending) or set(self.cacheable(min_side)) != set(self.cached)


def _embed_pending(state: _ScanPass, encoder: torch.nn.Module) -> None:
    """Embed the freshly aligned faces of a scan in batches; ValueError when any embedding is
    NaN/inf (a broken encoder: an identity term on it would be silently NaN or masked, and
    nothing non-finite enters the face cache)."""
    if not state.pending:
        return
    embeddings = embed_aligned_faces(encoder, [face for _, face in state.pending], EMBED_BATCH_SIZE)
    rows = zip(state.pending, embeddings, strict=True)
    broken = [entry.file for (entry, _), row in rows if not np.isfinite(row).all()]
    if broken:
        raise ValueError(
            f"the face encoder {getattr(encoder, 'name', type(encoder).__name__)} gave NaN/inf "
            f"embeddings for {len(broken)} of {len(embeddings)} faces (e.g. {broken[0]}): its "
            "weights file is broken; replace it"
        )
    for (entry, _), embedding in zip(state.pending, embeddings, strict=True):
        entry.embedding = embedding


def _scan_pass(
    folder: Path, files, detector, encoder, cache: bool, min_side: int, limit: int | None
) -> _ScanPass:
    """Size or look up / detect + embed the files of `folder` in order (until `limit` usable
    ones are found); refresh its face cache file."""
    names = (
        {} if detector is None else {"encoder": str(encoder.name), "detector": str(detector.name)}
    )
    cache_path = None if detector is None else face_cache_path(folder, encoder, detector)
    cached = _read_cache(cache_path, names) if cache and cache_path is not None else {}
    state = _ScanPass(SkipReport(folder, len(files)), cached, detector)
    for path in files:
        if limit is not None and state.usable_count(min_side) >= limit:
            break
        state.visit(path, min_side)
    if state.changed:
        logger.warning(
            "face cache %s held annotations of other content for %s; recomputed them",
            cache_path,
            ", ".join(state.changed),
        )
    if detector is not None:
        _embed_pending(state, encoder)
        if cache and state.needs_write(min_side):
            _write_cache(cache_path, list(state.cacheable(min_side).values()), names)
    return state


@dataclass
class PhotoScan:
    """The usable photos of one folder, the face annotations of those with a face, the skips."""

    photos: list[Path]
    faces: dict[Path, FaceAnnotation]
    report: SkipReport
    fingerprint: str  # sha256 over (name, content sha256) of the photos, in order
    sha256: dict[Path, str] = field(default_factory=dict)  # each photo's content hash


_warned: set[str] = set()


def _warn_once(message: str) -> None:
    """Log a warning once per process: the class folder is scanned again for every identity
    trained, and its skips would repeat 107 times per variant (later repeats go to DEBUG)."""
    if message in _warned:
        logger.debug("%s", message)
        return
    _warned.add(message)
    logger.warning("%s", message)


def _fingerprint(photos: list[Path], sha256: dict[Path, str]) -> str:
    """What a set of photos is, by content: sha256 of 'name:sha256' lines in order."""
    lines = "".join(f"{path.name}:{sha256[path]}\n" for path in photos)
    return hashlib.sha256(lines.encode()).hexdigest()


def scan_photos(
    folder: str | Path,
    detector: FaceDetector | None = None,
    encoder: torch.nn.Module | None = None,
    faceless: str = "keep",
    cache: bool = True,
    min_side: int = MIN_IMAGE_SIDE,
    limit: int | None = None,
) -> PhotoScan:
    """The one way a folder of photos becomes training or evaluation data.

    Usable = decodes and shorter side >= min_side. With a detector and encoder every usable
    photo is detected, 5-point aligned and embedded (cached by sha256 of its bytes in
    `face_cache_path`); `faceless="skip"` then drops photos without a face as skips (identity
    photos: no positive for the identity term), `"keep"` keeps them without an annotation (class
    photos: they still serve the prior loss; named in a second warning). Without a detector:
    plain DreamBooth, every usable photo. With `limit`, only the first `limit` usable photos in
    file-name order (a folder of 1,000 class images serves 200 when asked for 200). Skips are
    named in one logged warning; ValueError when nothing usable is left.
    """
    if faceless not in ("keep", "skip"):
        raise ValueError(f"faceless must be 'keep' or 'skip', got {faceless!r}")
    if (detector is None) != (encoder is None):
        raise ValueError("pass both a face detector and an encoder, or neither")
    folder = Path(folder)
    files = _folder_entries(folder)  # other entries than files are skipped by name
    state = _scan_pass(folder, files, detector, encoder, cache, min_side, limit)
    photos, faces = state.classify(min_side)
    faceless_photos = [path for path in photos if detector is not None and path not in faces]
    if faceless == "skip" and detector is not None:
        for path in faceless_photos:
            state.report.add(path, SKIP_NO_FACE)
        photos = list(faces)
    if not photos:
        found = state.report.summary() if files else "no files"
        if faceless == "skip" and detector is not None:
            fix = f"add photos (shorter side >= {min_side} px) that show one detectable face"
            raise ValueError(
                f"no usable face photo in {folder}: {found}; {fix}{subfolders_note(folder)}"
            )
        fix = f"add readable photos (shorter side >= {min_side} px)"
        raise ValueError(f"no usable image in {folder}: {found}; {fix}{subfolders_note(folder)}")
    if state.report:
        _warn_once(state.report.summary())
    if faceless == "keep" and faceless_photos:
        _warn_once(
            f"{len(faceless_photos)} of {len(photos)} photos in {folder} have no detected face: "
            "they are used without a face embedding (prior loss only): "
            + ", ".join(path.name for path in faceless_photos)
        )
    fingerprint = _fingerprint(photos, state.sha256)
    return PhotoScan(photos, faces, state.report, fingerprint, {p: state.sha256[p] for p in photos})


def annotate_folder(
    folder: str | Path,
    detector: FaceDetector,
    encoder: torch.nn.Module,
    cache: bool = True,
    min_side: int = MIN_IMAGE_SIDE,
) -> tuple[dict[Path, FaceAnnotation], SkipReport]:
    """Face annotations of the photos of `folder` that show a face ({path: FaceAnnotation} in
    file order) and the SkipReport: scan_photos(..., faceless="skip")."""
    scan = scan_photos(folder, detector, encoder, "skip", cache, min_side)
    return scan.faces, scan.report


# ----------------------------------------------------------------------------- dataset


def crop_offset(
    width: int, height: int, resolution: int, center_crop: bool, generator=None
) -> tuple[int, int]:
    """(left, top) of an R x R crop: centred, or uniform over all valid offsets."""
    if center_crop:  # torchvision's CenterCrop (the reference's transforms): round half to even
        return round((width - resolution) / 2), round((height - resolution) / 2)
    left = int(torch.randint(0, width - resolution + 1, (1,), generator=generator))
    top = int(torch.randint(0, height - resolution + 1, (1,), generator=generator))
    return left, top


def resize_shorter_side(image: Image.Image, resolution: int) -> tuple[Image.Image, np.ndarray]:
    """Shorter side -> R (bilinear), the longer one int(R * long / short), truncated as the
    reference's torchvision Resize(R) does; (x, y) factors."""
    width, height = image.size
    longer = int(resolution * max(width, height) / min(width, height))
    new_width, new_height = (resolution, longer) if width <= height else (longer, resolution)
    resized = image.resize((new_width, new_height), Image.Resampling.BILINEAR)
    return resized, np.array([new_width / width, new_height / height], dtype=np.float64)


def move_landmarks(landmarks: np.ndarray, factors: np.ndarray, left: int, top: int) -> np.ndarray:
    """Landmarks through a resize by `factors` and a crop at (left, top): x' = (x + 0.5) * s_x -
    0.5 - left. The half-pixel terms make the mapping exact for pixel-centre coordinates (PIL's
    resize convention), so a landmark keeps pointing at the same image content."""
    offset = np.array([left, top], dtype=np.float64)
    moved = (np.asarray(landmarks, dtype=np.float64) + 0.5) * factors - 0.5 - offset
    return moved.astype(np.float32)


def resize_and_crop(
    image: Image.Image,
    landmarks: np.ndarray,
    resolution: int,
    center_crop: bool = False,
    generator: torch.Generator | None = None,
) -> tuple[Image.Image, np.ndarray]:
    """Shorter side -> R (bilinear), R x R crop (centred or seeded); landmarks follow."""
    resized, factors = resize_shorter_side(image, resolution)
    left, top = crop_offset(*resized.size, resolution, center_crop, generator)
    cropped = resized.crop((left, top, left + resolution, top + resolution))
    return cropped, move_landmarks(landmarks, factors, left, top)


def image_to_tensor(image: Image.Image) -> torch.Tensor:
    """RGB PIL image -> (3, H, W) float32 in [-1, 1] = x / 127.5 - 1."""
    pixels = torch.from_numpy(np.asarray(image, dtype=np.float32).copy())  # (H, W, 3)
    return (pixels.permute(2, 0, 1) / 127.5 - 1.0).contiguous()


@dataclass
class _PhotoSet:
    """Usable photos of one folder, with their stacked face annotations when there are any."""

    paths: list[Path]
    report: SkipReport
    fingerprint: str  # PhotoScan.fingerprint: the photos by content
    embeddings: torch.Tensor | None = None  # (N, D) float32, zero rows for faceless photos
    landmarks: np.ndarray | None = None  # (N, 5, 2) float32, original image coordinates
    has_face: np.ndarray | None = None  # (N,) bool
    sha256: tuple[str, ...] = ()  # each photo's content hash, in order
    # index -> (photo resized to shorter side R as (H', W', 3) uint8, (x, y) resize factors):
    # every photo is decoded and resized once, then items only crop it.
    resized: dict[int, tuple[np.ndarray, np.ndarray]] = field(default_factory=dict)
    thumbnails: np.ndarray | None = None  # (N, THUMBNAIL_SIDE**2), see photo_thumbnail

    def photo_thumbnails(self) -> np.ndarray:
        """Every photo's photo_thumbnail, computed once (a class set serves every identity)."""
        if self.thumbnails is None:
            rows = [photo_thumbnail(path) for path in self.paths]
            self.thumbnails = np.stack(rows) if rows else np.zeros((0, THUMBNAIL_SIDE**2))
        return self.thumbnails

    def resized_photo(self, index: int, resolution: int) -> tuple[np.ndarray, np.ndarray]:
        """Photo `index` with its shorter side at `resolution` (decoded once, then kept)."""
        if index not in self.resized:
            image, factors = resize_shorter_side(load_rgb_image(self.paths[index]), resolution)
            self.resized[index] = (np.asarray(image), factors)
        return self.resized[index]

    def preload(self, resolution: int, num_threads: int = 0) -> None:
        """Decode and resize every photo now, in threads (PIL releases the GIL while decoding)."""
        missing = [index for index in range(len(self.paths)) if index not in self.resized]
        if num_threads <= 1:
            for index in missing:
                self.resized_photo(index, resolution)
            return
        from concurrent.futures import ThreadPoolExecutor

        def load(index: int) -> tuple[np.ndarray, np.ndarray]:
            image, factors = resize_shorter_side(load_rgb_image(self.paths[index]), resolution)
            return np.asarray(image), factors

        with ThreadPoolExecutor(max_workers=num_threads) as pool:
            for index, loaded in zip(missing, pool.map(load, missing), strict=True):
                self.resized[index] = loaded

    @classmethod
    def from_scan(cls, scan: PhotoScan, embedding_dim: int | None = None) -> _PhotoSet:
        """Stack a scan's annotations (faceless photos: zero embedding and landmarks, has_face
        False); embedding_dim None = a plain scan without annotations."""
        hashes = tuple(scan.sha256.get(path, "") for path in scan.photos)
        if embedding_dim is None:
            return cls(scan.photos, scan.report, scan.fingerprint, sha256=hashes)
        embeddings = np.zeros((len(scan.photos), embedding_dim), dtype=np.float32)
        landmarks = np.zeros((len(scan.photos), 5, 2), dtype=np.float32)
        has_face = np.array([path in scan.faces for path in scan.photos], dtype=bool)
        for row, path in enumerate(scan.photos):
            if has_face[row]:
                embeddings[row] = scan.faces[path].embedding
                landmarks[row] = scan.faces[path].landmarks
        embeddings = torch.from_numpy(embeddings)
        return cls(
            scan.photos, scan.report, scan.fingerprint, embeddings, landmarks, has_face, hashes
        )

    @property
    def annotated(self) -> bool:
        """True when the photos carry face annotations (a detector and encoder were given)."""
        return self.embeddings is not None

    @property
    def num_with_face(self) -> int:
        return int(self.has_face.sum()) if self.has_face is not None else 0


def photo_thumbnail(path: Path) -> np.ndarray:
    """(THUMBNAIL_SIDE**2,) float32 unit vector: the photo in grayscale, box-filtered to 32x32,
    mean removed. Re-encoding, small resizes and brightness shifts barely move it, so the dot
    product of two thumbnails finds copies that are not the same bytes. A flat image gives
    zeros (it resembles nothing)."""
    gray = load_rgb_image(path).convert("L").resize((THUMBNAIL_SIDE,) * 2, Image.Resampling.BOX)
    values = np.asarray(gray, dtype=np.float64).ravel()
    values -= values.mean()
    norm = float(np.linalg.norm(values))
    return (values / norm if norm > 1e-6 else np.zeros_like(values)).astype(np.float32)


def _refuse_shared_photos(instance: _PhotoSet, classes: _PhotoSet) -> None:
    """ValueError when the class folder holds copies of the identity's own photos, compared by
    content (any name, any folder): the same bytes, or a near-duplicate (re-saved, resized;
    photo_thumbnail). The prior would learn the person, and the triplet negative would be the
    positive itself."""
    own = {digest: path for digest, path in zip(instance.sha256, instance.paths, strict=True)}
    similarity = classes.photo_thumbnails() @ instance.photo_thumbnails().T  # (class, own)
    copies = []
    for row, (digest, path) in enumerate(zip(classes.sha256, classes.paths, strict=True)):
        if digest in own and digest:
            copies.append(f"{path.name} = {own[digest].name} (same bytes)")
        elif similarity.shape[1] and similarity[row].max() >= NEAR_DUPLICATE_CORRELATION:
            closest = instance.paths[int(similarity[row].argmax())]
            copies.append(f"{path.name} ~ {closest.name} (near-duplicate: re-saved or resized)")
    if copies:
        folder = classes.paths[0].parent
        raise ValueError(
            f"the class folder {folder} holds {len(copies)} of this identity's own photos "
            f"({', '.join(copies[:3])}); class images must show other people: "
            "remove them from the class folder"
        )


@dataclass(frozen=True)
class Crop:
    """Which pixels one half of a dataset item is: photo `index` of `part` ("instance" or
    "class"), resized to shorter side R, cropped R x R at (left, top). Equal crops are equal
    pixels, so a trainer may cache what it computes from them (e.g. VAE latents)."""

    part: str
    index: int
    left: int
    top: int


class DreamBoothFaceDataset(Dataset):
    """Identity photos (+ optional class / prior photos), each with its own embedding + landmarks.

    Item i uses instance photo i % N_inst and class photo i % N_class; len = max of the two.
    With a detector and encoder the instance photos are those with a detected face (see
    annotate_folder for the skip rules) and the class photos are the first `max_class_images`
    usable ones in file-name order (all of them if None; they all serve the prior loss, as in
    the reference, and the reference caps them the same way): a faceless class photo has
    `class_has_face`
    False, a zero `class_embedding` and zero `class_landmarks`, so the trainer can mask the
    triplet term that would use it as the negative. With neither (plain DreamBooth) every
    readable photo is used and items carry no `*_embedding` / `*_landmarks` / `*_has_face`.
    With a `seed`, item i of epoch e (set_epoch) crops with a
    generator seeded stable_seed(seed, "crop", e, i), so crops are a
    function of position (a resumed run crops like an uninterrupted one); without one they come
    from torch's global RNG.
    """

    def __init__(
        self,
        instance_folder: str | Path,
        detector: FaceDetector | None,
        encoder: torch.nn.Module | None,
        class_folder: str | Path | None = None,
        max_class_images: int | None = None,
        resolution: int = 512,
        center_crop: bool = False,
        cache: bool = True,
        min_side: int = MIN_IMAGE_SIDE,
        seed: int | None = None,
        class_photos: _PhotoSet | None = None,
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
        instance = scan_photos(instance_folder, detector, encoder, "skip", cache, min_side)
        embedding_dim = None
        if detector is not None:
            embedding_dim = next(iter(instance.faces.values())).embedding.shape[0]
        self.instance = _PhotoSet.from_scan(instance, embedding_dim)
        if class_photos is not None:  # another identity's dataset already holds them
            self.classes = class_photos
        elif class_folder is not None:
            classes = scan_photos(
                class_folder, detector, encoder, "keep", cache, min_side, max_class_images
            )
            self.classes = _PhotoSet.from_scan(classes, embedding_dim)
        if self.classes is not None:
            _refuse_shared_photos(self.instance, self.classes)

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

    def summary(self) -> dict[str, Any]:
        """Counts of used photos, class photos with / without a detected face, skipped files."""
        summary = {
            "instance_images": self.num_instance_images,
            "class_images": self.num_class_images,
            "instance_sha256": self.instance.fingerprint,
            "class_sha256": self.classes.fingerprint if self.classes is not None else None,
        }
        if self.classes is not None:  # what the prior set is made of, e.g. {"jpg": 200}
            extensions = Counter(path.suffix.lower().lstrip(".") for path in self.classes.paths)
            summary["class_image_formats"] = dict(sorted(extensions.items()))
        if self.classes is not None and self.classes.annotated:
            with_face = self.num_class_images_with_face
            summary["class_images_with_face"] = with_face
            summary["class_images_without_face"] = self.num_class_images - with_face
        for part in ("instance", "classes"):
            photos = getattr(self, part)
            if photos is not None:
                summary[f"{part}_skipped"] = photos.report.counts()
        return summary

    def set_epoch(self, epoch: int) -> None:
        """Epoch whose seeded crops the items use (call before building its DataLoader)."""
        self.epoch = epoch

    def _crop_generator(self, index: int) -> torch.Generator | None:
        """CPU generator of item `index` in this epoch, or None (global RNG) without a seed."""
        if self.seed is None:
            return None
        return torch.Generator().manual_seed(stable_seed(self.seed, "crop", self.epoch, index))

    def crops(self, index: int) -> list[Crop]:
        """The crops item `index` of this epoch takes: [instance] or [instance, class] (the
        instance crop is drawn first from the item's generator, then the class crop)."""
        if not 0 <= index < len(self):
            raise IndexError(f"index {index} out of range for {len(self)} items")
        generator = self._crop_generator(index)
        parts = [("instance", self.instance, index % self.num_instance_images)]
        if self.classes is not None:
            parts.append(("class", self.classes, index % self.num_class_images))
        crops = []
        for part, photos, photo in parts:
            resized, _ = photos.resized_photo(photo, self.resolution)  # (H', W', 3)
            height, width = resized.shape[:2]
            left, top = crop_offset(width, height, self.resolution, self.center_crop, generator)
            crops.append(Crop(part, photo, left, top))
        return crops

    def photos(self, part: str) -> _PhotoSet:
        return self.instance if part == "instance" else self.classes

    def pixels(self, crop: Crop) -> torch.Tensor:
        """(3, R, R) float32 in [-1, 1]: the crop of the resized photo."""
        resized, _ = self.photos(crop.part).resized_photo(crop.index, self.resolution)
        size = self.resolution
        window = resized[crop.top : crop.top + size, crop.left : crop.left + size]
        return image_to_tensor(window)

    def original_size(self, crop: Crop) -> tuple[int, int]:
        """(height, width) of the crop's photo before the resize (SDXL's `original_size`)."""
        resized, factors = self.photos(crop.part).resized_photo(crop.index, self.resolution)
        return round(resized.shape[0] / factors[1]), round(resized.shape[1] / factors[0])

    def landmarks(self, crop: Crop) -> np.ndarray:
        """(5, 2) float32 landmarks in crop pixels (zeros for a photo without a face)."""
        photos = self.photos(crop.part)
        if photos.has_face is not None and not photos.has_face[crop.index]:
            return np.zeros((5, 2), dtype=np.float32)  # nothing to point at; has_face masks it
        _, factors = photos.resized_photo(crop.index, self.resolution)
        return move_landmarks(photos.landmarks[crop.index], factors, crop.left, crop.top)

    def _sample(self, crop: Crop) -> dict[str, Any]:
        """One half of an item: pixels, index and (annotated photos) landmarks, embedding."""
        photos, prefix = self.photos(crop.part), crop.part
        example = {f"{prefix}_pixels": self.pixels(crop), f"{prefix}_index": crop.index}
        if photos.annotated:
            example[f"{prefix}_landmarks"] = torch.from_numpy(self.landmarks(crop))  # (5, 2)
            example[f"{prefix}_embedding"] = photos.embeddings[crop.index]  # (D,), 0 if faceless
            example[f"{prefix}_has_face"] = bool(photos.has_face[crop.index])
        return example

    def __getitem__(self, index: int) -> dict[str, Any]:
        example: dict[str, Any] = {}
        for crop in self.crops(index):
            example.update(self._sample(crop))
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


# ----------------------------------------------------------------------------- device tables


def to_device(values: torch.Tensor, device: torch.device) -> torch.Tensor:
    """A host tensor on the device without a stream sync (pinned memory, non-blocking copy)."""
    if device.type != "cuda":
        return values.to(device)
    return values.pin_memory().to(device, non_blocking=True)


class RowTable:
    """Per-crop or per-photo rows kept on the device, keyed by (owner, ...) on the host.

    Owners are identities (their instance photos) or "class" (the class folder every identity
    shares); `drop(owner)` frees an identity's rows when its slot takes the next one.
    """

    def __init__(self) -> None:
        self.rows: dict[tuple, int] = {}
        self.columns: dict[str, torch.Tensor] = {}

    def __len__(self) -> int:
        return len(self.rows)

    def add(self, keys: list[tuple], columns: dict[str, torch.Tensor]) -> None:
        """Append rows (each column (len(keys), ...) on the device) under new keys."""
        start = len(self.rows)
        for name, values in columns.items():
            old = self.columns.get(name)
            self.columns[name] = values if old is None else torch.cat([old, values])
        self.rows.update({key: start + i for i, key in enumerate(keys)})

    def drop(self, owner: Any, keep: Collection[tuple] = ()) -> None:
        """Remove every row of `owner` but those in `keep` (device index_select of the rows
        kept)."""
        kept = [(key, row) for key, row in self.rows.items() if key[0] != owner or key in keep]
        if len(kept) == len(self.rows):
            return
        device = next(iter(self.columns.values())).device
        index = to_device(torch.tensor([row for _, row in kept], dtype=torch.long), device)
        self.columns = {name: values[index] for name, values in self.columns.items()}
        self.rows = {key: i for i, (key, _) in enumerate(kept)}

    def index(self, keys: list[tuple], device: torch.device) -> torch.Tensor:
        """(len(keys),) long device index of the keys' rows."""
        return to_device(torch.tensor([self.rows[key] for key in keys], dtype=torch.long), device)


ENCODE_BATCH_SIZE = 8  # crops per VAE encode call


class LatentCache(RowTable):
    """VAE latent distributions (mean, std) of dataset crops, encoded ahead, on the device.

    Equal crops are equal pixels (datasets.Crop). The trainer encodes the crops an epoch of an
    identity will draw before its first step of that epoch (`encode`), so no step encodes;
    each step samples the cached distribution with its own generator, as
    `vae.encode(pixels).latent_dist.sample(generator)` does. Class images (R x R) have one
    crop each.
    """

    def __init__(self, vae: torch.nn.Module, device: torch.device) -> None:
        super().__init__()
        self.vae, self.device = vae, device

    @torch.no_grad()
    def encode(self, keys: list[tuple], pixels: dict[tuple, Any]) -> None:
        """Encode the keys not cached yet (`pixels[key]()` -> (3, R, R)) in batches of
        ENCODE_BATCH_SIZE, the last one padded with copies of its last crop: every VAE call
        has one shape, and a crop's latents do not depend on which crops share its batch
        (conv kernels round by batch shape, not by the other samples' values), so an
        identity's LoRA is the same whichever identities a process trains alongside it."""
        missing = list(dict.fromkeys(key for key in keys if key not in self.rows))
        for start in range(0, len(missing), ENCODE_BATCH_SIZE):
            chunk = missing[start : start + ENCODE_BATCH_SIZE]
            crops = [pixels[key]() for key in chunk]
            crops += crops[-1:] * (ENCODE_BATCH_SIZE - len(crops))
            batch = to_device(torch.stack(crops), self.device).to(self.vae.dtype)  # (8, 3, R, R)
            dist = self.vae.encode(batch).latent_dist
            size = len(chunk)
            self.add(chunk, {"mean": dist.mean[:size], "std": dist.std[:size]})
