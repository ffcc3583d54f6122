"""Atomic file output, content hashing and position-derived seeds, shared by every script.

Every output is written under a temp name in its own folder (`.<name>.<random>.tmp`) and moved
onto its final name with os.replace, so a reader (or a resumed run) sees the whole file or
none of it; a writer that fails deletes its temp, and `remove_stale_temps` clears the ones a
killed process left behind. `ImageWriter` encodes and writes PNGs (each carrying its metadata
record) that way in worker threads.
"""

from __future__ import annotations

import contextlib
import hashlib
import io
import json
import os
import re
import shutil
import tempfile
from collections.abc import Collection, Iterator
from pathlib import Path
from typing import TYPE_CHECKING, Any, BinaryIO

if TYPE_CHECKING:
    from PIL import Image as PILImage

TEMP_SUFFIX = ".tmp"
PNG_METADATA_KEY = "id_booth"  # PNG text chunk holding a generated image's metadata record
PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"
PNG_IEND_CHUNK = b"\x00\x00\x00\x00IEND\xaeB`\x82"
# .<final name>.<the 8 random characters of mkstemp/mkdtemp>.tmp
TEMP_NAME_PATTERN = re.compile(r"^\.(?P<target>.+)\.[a-z0-9_]{8}\.tmp$")


def temp_target(name: str) -> str | None:
    """Final name that a temp file/folder name of this module stands in for, else None."""
    match = TEMP_NAME_PATTERN.match(name)
    return match.group("target") if match else None


def remove_stale_temps(folder: str | Path, targets: Collection[str] | None = None) -> int:
    """Delete the temps killed writers left in `folder` (only those for `targets` if given)."""
    folder, removed = Path(folder), 0
    if not folder.is_dir():
        return removed
    for path in folder.iterdir():
        target = temp_target(path.name)
        if target is None or (targets is not None and target not in targets):
            continue
        if path.is_dir() and not path.is_symlink():
            shutil.rmtree(path, ignore_errors=True)
        else:
            path.unlink(missing_ok=True)
        removed += 1
    return removed


def _umask() -> int:
    """The process umask (reading it means setting it; it is put straight back)."""
    umask = os.umask(0)
    os.umask(umask)
    return umask


def publish(temp: str | Path, final: str | Path) -> None:
    """os.replace a finished temp file/folder (umask permissions) onto `final`, replacing it."""
    temp, final = Path(temp), Path(final)
    is_folder = temp.is_dir()
    os.chmod(temp, (0o777 if is_folder else 0o666) & ~_umask())
    if is_folder and final.is_dir() and not final.is_symlink():
        shutil.rmtree(final)  # os.replace cannot replace a non-empty folder
    os.replace(temp, final)


def _new_temp(path: Path, folder: bool) -> Path:
    """A fresh, private temp file or folder beside `path`."""
    path.parent.mkdir(parents=True, exist_ok=True)
    naming = {"dir": path.parent, "prefix": f".{path.name}.", "suffix": TEMP_SUFFIX}
    if folder:
        return Path(tempfile.mkdtemp(**naming))
    handle, name = tempfile.mkstemp(**naming)
    os.close(handle)
    return Path(name)


def _fsync_file(path: Path) -> None:
    """Flush a closed file's data to the disk (so a power cut cannot publish an empty file)."""
    handle = os.open(path, os.O_RDONLY)
    try:
        os.fsync(handle)
    finally:
        os.close(handle)


@contextlib.contextmanager
def atomic_path(path: str | Path, fsync: bool = True) -> Iterator[Path]:
    """Temp file beside `path` to fill; published onto `path` at the end, deleted on error."""
    path = Path(path)
    temp = _new_temp(path, folder=False)
    try:
        yield temp
        if fsync:
            _fsync_file(temp)
        publish(temp, path)
    except BaseException:
        temp.unlink(missing_ok=True)
        raise


@contextlib.contextmanager
def atomic_folder(path: str | Path) -> Iterator[Path]:
    """Temp folder beside `path` to fill; replaces `path` at the end, deleted on error."""
    path = Path(path)
    temp = _new_temp(path, folder=True)
    try:
        yield temp
        publish(temp, path)
    except BaseException:
        shutil.rmtree(temp, ignore_errors=True)
        raise


def _write_all(handle: BinaryIO, data: bytes) -> None:
    """Write every byte (a separate function so tests can simulate a full disk)."""
    handle.write(data)


def atomic_write_bytes(path: str | Path, data: bytes, fsync: bool = True) -> None:
    """Write `data` to `path` via a temp name + fsync + os.replace: complete or absent."""
    with atomic_path(path, fsync=fsync) as temp, open(temp, "wb") as handle:
        _write_all(handle, data)


def atomic_write_text(path: str | Path, text: str, fsync: bool = True) -> None:
    """Write UTF-8 text atomically."""
    atomic_write_bytes(path, text.encode("utf-8"), fsync=fsync)


def atomic_write_json(
    path: str | Path, payload: Any, fsync: bool = True, **dumps_options: Any
) -> None:
    """Write json.dumps(payload, indent=2, **dumps_options) + newline atomically."""
    dumps_options.setdefault("indent", 2)
    atomic_write_text(path, json.dumps(payload, **dumps_options) + "\n", fsync=fsync)


def atomic_save_image(
    image: Any, path: str | Path, format: str = "PNG", fsync: bool = True, **save_options: Any
) -> None:
    """Encode a PIL image (save_options go to Image.save, e.g. pnginfo) and write it atomically."""
    buffer = io.BytesIO()
    image.save(buffer, format=format, **save_options)
    atomic_write_bytes(path, buffer.getvalue(), fsync=fsync)


def file_sha256(path: str | Path, chunk_bytes: int = 1 << 20) -> str:
    """Hex sha256 of a file's bytes (read in chunks)."""
    digest = hashlib.sha256()
    with open(path, "rb") as handle:
        while chunk := handle.read(chunk_bytes):
            digest.update(chunk)
    return digest.hexdigest()


def stable_seed(*parts: object) -> int:
    """The project's one seed derivation: int(sha256('/'.join(map(str, parts)))[:8], big-endian)
    mod 2**63, so every random stream is a function of its position, never of a shared RNG."""
    digest = hashlib.sha256("/".join(map(str, parts)).encode()).digest()
    return int.from_bytes(digest[:8], "big") % 2**63


def encode_png_with_record(image: Any, record: dict, compress_level: int = 6) -> bytes:
    """PNG bytes with the metadata record in a text chunk (deterministic for equal input;
    zlib `compress_level` 0-9 changes only the size, PIL's default is 6)."""
    from PIL import PngImagePlugin

    info = PngImagePlugin.PngInfo()
    info.add_text(PNG_METADATA_KEY, json.dumps(record, sort_keys=True))
    buffer = io.BytesIO()
    image.save(buffer, format="PNG", pnginfo=info, compress_level=compress_level)
    return buffer.getvalue()


def is_complete_png(path: Path) -> bool:
    """A PNG file that starts with the signature and ends with the IEND chunk."""
    try:
        with open(path, "rb") as handle:
            head = handle.read(8)
            handle.seek(0, os.SEEK_END)
            if handle.tell() < len(PNG_SIGNATURE) + len(PNG_IEND_CHUNK):
                return False
            handle.seek(-len(PNG_IEND_CHUNK), os.SEEK_END)
            return head == PNG_SIGNATURE and handle.read() == PNG_IEND_CHUNK
    except OSError:
        return False


def read_png_record(path: Path) -> dict | None:
    """The metadata record stored in an image written by this script, or None."""
    from PIL import Image

    try:
        with Image.open(path) as image:
            text = image.text.get(PNG_METADATA_KEY)
        return json.loads(text) if text else None
    except (OSError, ValueError):
        return None


class ImageWriter:
    """Encodes PNGs and writes them atomically in worker threads while the next batch is
    sampled (PIL's encoder releases the GIL). At most `pending` images wait; the first write
    error (e.g. a full disk) is raised on the main thread, and nothing half-written is left."""

    def __init__(self, workers: int, compress_level: int, pending: int = 64) -> None:
        from concurrent.futures import ThreadPoolExecutor

        self.pool = ThreadPoolExecutor(max_workers=workers, thread_name_prefix="png")
        self.compress_level, self.pending, self.futures = compress_level, pending, []
        self.written = 0

    def submit(self, path: Path, image: PILImage.Image, record: dict) -> None:
        """Queue one image; raises an earlier write's error instead (the run stops there)."""
        if any(future.done() and future.exception() for future in self.futures):
            self.close()
        self.futures.append(self.pool.submit(self._write, path, image, record))
        while len(self.futures) > self.pending:
            self._collect(self.futures.pop(0))

    def _write(self, path: Path, image: PILImage.Image, record: dict) -> None:
        path.parent.mkdir(parents=True, exist_ok=True)
        try:
            atomic_write_bytes(path, encode_png_with_record(image, record, self.compress_level))
        except OSError as error:
            raise OSError(
                error.errno,
                f"could not write {path} ({error.strerror or error}); no partial file was "
                "left, free space / fix the folder and re-run to resume",
            ) from error

    def _collect(self, future) -> None:
        future.result()  # raises a worker's error here
        self.written += 1

    def close(self) -> None:
        """Wait for every write (raising the first error); always shuts the pool down."""
        try:
            for future in self.futures:
                self._collect(future)
        finally:
            self.futures = []
            self.pool.shutdown(wait=True, cancel_futures=True)
