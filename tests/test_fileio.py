"""fileio: atomic writes (complete or absent, no temp left), stale-temp cleanup, hashing, seeds."""

from __future__ import annotations

import errno
import hashlib
import io
import json
import os
import stat
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from PIL import Image, PngImagePlugin

import fileio

REPO_ROOT = Path(__file__).resolve().parents[1]


def names(folder: Path) -> list[str]:
    """Every entry of folder, hidden ones included."""
    return sorted(path.name for path in folder.iterdir())


def mode(path: Path) -> int:
    return stat.S_IMODE(path.stat().st_mode)


@pytest.fixture
def umask_027():
    """A umask that differs from the common 022, so permissions are really derived from it."""
    previous = os.umask(0o027)
    yield
    os.umask(previous)


# ------------------------------------------------------------------------- round trips


def test_bytes_text_and_json_round_trip_with_umask_permissions(tmp_path, umask_027):
    fileio.atomic_write_bytes(tmp_path / "deep" / "data.bin", b"\x00\x01payload")
    fileio.atomic_write_text(tmp_path / "note.txt", "héllo\n")
    fileio.atomic_write_json(tmp_path / "config.json", {"b": [1, 2.5], "a": None}, sort_keys=True)
    assert (tmp_path / "deep" / "data.bin").read_bytes() == b"\x00\x01payload"
    assert (tmp_path / "note.txt").read_text(encoding="utf-8") == "héllo\n"
    text = (tmp_path / "config.json").read_text()
    assert text == '{\n  "a": null,\n  "b": [\n    1,\n    2.5\n  ]\n}\n'
    assert json.loads(text) == {"a": None, "b": [1, 2.5]}
    # mkstemp makes 0600; published files get what open() would give under the umask
    assert mode(tmp_path / "note.txt") == 0o640 and mode(tmp_path / "deep" / "data.bin") == 0o640
    assert names(tmp_path) == ["config.json", "deep", "note.txt"]


def test_overwrite_replaces_the_whole_file(tmp_path):
    path = tmp_path / "out.txt"
    fileio.atomic_write_text(path, "a long first version\n" * 100)
    fileio.atomic_write_text(path, "short\n")
    assert path.read_text() == "short\n"
    assert names(tmp_path) == ["out.txt"]


def test_saved_image_keeps_pixels_and_png_text(tmp_path):
    pixels = np.random.default_rng(0).integers(0, 256, (9, 7, 3), dtype=np.uint8)
    info = PngImagePlugin.PngInfo()
    info.add_text("id_booth", '{"index": 3}')
    fileio.atomic_save_image(Image.fromarray(pixels), tmp_path / "a.png", pnginfo=info)
    fileio.atomic_save_image(Image.fromarray(pixels), tmp_path / "b.jpg", format="JPEG")
    with Image.open(tmp_path / "a.png") as image:
        assert image.format == "PNG" and image.text["id_booth"] == '{"index": 3}'
        np.testing.assert_array_equal(np.asarray(image), pixels)
    with Image.open(tmp_path / "b.jpg") as image:
        assert image.format == "JPEG" and image.size == (7, 9)
    assert names(tmp_path) == ["a.png", "b.jpg"]


def test_png_compress_levels_keep_pixels_and_record_and_change_only_the_size():
    smooth = np.tile(np.arange(64, dtype=np.uint8), (64, 1))[..., None].repeat(3, axis=2)
    encoded = {
        level: fileio.encode_png_with_record(Image.fromarray(smooth), {"index": 1}, level)
        for level in (0, 1, 6, 9)
    }
    assert encoded[6] == fileio.encode_png_with_record(Image.fromarray(smooth), {"index": 1})
    assert len(encoded[0]) > len(encoded[1]) >= len(encoded[9])
    for data in encoded.values():
        with Image.open(io.BytesIO(data)) as image:
            np.testing.assert_array_equal(np.asarray(image), smooth)
            assert json.loads(image.text[fileio.PNG_METADATA_KEY]) == {"index": 1}


def test_json_options_reach_json_dumps_and_a_refused_payload_writes_nothing(tmp_path):
    with pytest.raises(ValueError, match="Out of range float"):
        fileio.atomic_write_json(tmp_path / "m.json", {"x": float("nan")}, allow_nan=False)
    assert names(tmp_path) == []


# ------------------------------------------------------------------- failures mid-write


def test_disk_full_mid_write_leaves_neither_final_file_nor_temp(tmp_path, monkeypatch):
    path = tmp_path / "image.png"
    fileio.atomic_write_bytes(path, b"old complete content")

    def disk_fills_up(handle, data):
        handle.write(data[: len(data) // 2])  # half of it lands, then the disk is full
        handle.flush()
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(fileio, "_write_all", disk_fills_up)
    with pytest.raises(OSError) as error:
        fileio.atomic_write_bytes(path, b"new content that never fully lands")
    assert error.value.errno == errno.ENOSPC
    assert path.read_bytes() == b"old complete content"  # never a half-written file
    with pytest.raises(OSError):
        fileio.atomic_write_bytes(tmp_path / "fresh.png", b"x" * 1000)
    assert names(tmp_path) == ["image.png"]  # no temp and no partial fresh.png


def test_atomic_path_publishes_on_success_and_deletes_the_temp_on_error(tmp_path, monkeypatch):
    synced = []
    real_fsync = os.fsync
    monkeypatch.setattr(os, "fsync", lambda fd: synced.append(fd) or real_fsync(fd))
    target = tmp_path / "state.pt"
    with fileio.atomic_path(target) as temp:
        assert temp.parent == tmp_path and temp.name != target.name
        assert fileio.temp_target(temp.name) == "state.pt"
        temp.write_bytes(b"checkpoint")
        assert not target.exists()  # nothing visible before the block ends
    assert target.read_bytes() == b"checkpoint" and len(synced) == 1

    with pytest.raises(RuntimeError, match="writer crashed"), fileio.atomic_path(target) as temp:
        temp.write_bytes(b"half")
        raise RuntimeError("writer crashed")
    assert target.read_bytes() == b"checkpoint"
    assert names(tmp_path) == ["state.pt"]

    with fileio.atomic_path(tmp_path / "quick.bin", fsync=False) as temp:
        temp.write_bytes(b"q")
    assert len(synced) == 1  # fsync=False skips it


def test_atomic_folder_replaces_an_old_folder_or_leaves_it_untouched(tmp_path, umask_027):
    final = tmp_path / "checkpoint-2"
    with fileio.atomic_folder(final) as temp:
        (temp / "weights.bin").write_bytes(b"v1")
        (temp / "old_only.txt").write_text("from v1")
    assert mode(final) == 0o750  # mkdtemp makes 0700

    with pytest.raises(KeyboardInterrupt), fileio.atomic_folder(final) as temp:
        (temp / "weights.bin").write_bytes(b"v2 half")
        raise KeyboardInterrupt
    assert names(final) == ["old_only.txt", "weights.bin"]
    assert (final / "weights.bin").read_bytes() == b"v1"
    assert names(tmp_path) == ["checkpoint-2"]

    with fileio.atomic_folder(final) as temp:
        (temp / "weights.bin").write_bytes(b"v2")
    assert names(final) == ["weights.bin"] and (final / "weights.bin").read_bytes() == b"v2"
    assert names(tmp_path) == ["checkpoint-2"]


def test_publish_moves_a_finished_temp_file_with_umask_permissions(tmp_path, umask_027):
    temp = tmp_path / "work" / "weights.safetensors"
    temp.parent.mkdir()
    temp.write_bytes(b"w")
    os.chmod(temp, 0o600)
    fileio.publish(temp, tmp_path / "weights.safetensors")
    assert not temp.exists() and mode(tmp_path / "weights.safetensors") == 0o640


KILLED_WRITER = """
import os, sys
sys.path.insert(0, sys.argv[1])
import fileio
with fileio.atomic_path(os.path.join(sys.argv[2], "0.png")) as temp:
    temp.write_bytes(b"partial")
    os._exit(9)  # killed mid-write: no cleanup code runs
"""


def test_a_killed_writer_leaves_only_a_temp_that_remove_stale_temps_clears(tmp_path):
    result = subprocess.run(
        [sys.executable, "-c", KILLED_WRITER, str(REPO_ROOT), str(tmp_path)], check=False
    )
    assert result.returncode == 9
    [left] = tmp_path.iterdir()
    assert left.name.startswith(".0.png.") and fileio.temp_target(left.name) == "0.png"
    assert not (tmp_path / "0.png").exists()
    assert fileio.remove_stale_temps(tmp_path) == 1
    assert names(tmp_path) == []


def test_remove_stale_temps_only_touches_temps_of_the_given_targets(tmp_path):
    (tmp_path / "3.png").write_bytes(b"done")
    (tmp_path / ".3.png.a1b2c3d4.tmp").write_bytes(b"3")
    (tmp_path / ".4.png.zz_9yy8x.tmp").write_bytes(b"4")
    (tmp_path / ".checkpoint-5.q1w2e3r4.tmp").mkdir()
    (tmp_path / ".checkpoint-5.q1w2e3r4.tmp" / "state.pt").write_bytes(b"s")
    (tmp_path / ".hidden").write_text("not a temp")
    (tmp_path / "notes.tmp").write_text("not hidden: not ours")
    assert fileio.remove_stale_temps(tmp_path, {"4.png"}) == 1
    assert fileio.remove_stale_temps(tmp_path, {"9.png"}) == 0
    assert fileio.remove_stale_temps(tmp_path) == 2
    assert names(tmp_path) == [".hidden", "3.png", "notes.tmp"]
    assert fileio.remove_stale_temps(tmp_path / "missing") == 0
    assert fileio.temp_target(".a.b.png.x_1y2z3w.tmp") == "a.b.png"
    assert fileio.temp_target("a.png") is None and fileio.temp_target(".a.png.tmp") is None


# ------------------------------------------------------------------- hashes and seeds


def test_file_sha256_matches_hashlib_across_chunk_boundaries(tmp_path):
    data = np.random.default_rng(1).integers(0, 256, 10_000, dtype=np.uint8).tobytes()
    (tmp_path / "blob").write_bytes(data)
    expected = hashlib.sha256(data).hexdigest()
    for chunk_bytes in (1, 4096, 10_000, 1 << 20):
        assert fileio.file_sha256(tmp_path / "blob", chunk_bytes) == expected
    (tmp_path / "empty").write_bytes(b"")
    empty = "e3b0c44298fc1c149afbf4c8996fb92427ae41e4649b934ca495991b7852b855"
    assert fileio.file_sha256(tmp_path / "empty") == empty
    with pytest.raises(FileNotFoundError):
        fileio.file_sha256(tmp_path / "missing")


def test_stable_seed_is_the_sha256_formula_with_pinned_values():
    for parts in [(0, "ID_1", 0), (42, "crop", 3, 7), ("a/b", 1.5)]:
        digest = hashlib.sha256("/".join(str(p) for p in parts).encode()).digest()
        expected = int.from_bytes(digest[:8], "big") % 2**63
        assert fileio.stable_seed(*parts) == expected
    # Pinned: the seed of image 0 of identity ID_1 in a generated dataset.
    assert fileio.stable_seed(0, "ID_1", 0) == 6552712344683382331
    seeds = {fileio.stable_seed(0, i, j) for i in range(40) for j in range(40)}
    assert len(seeds) == 1600 and max(seeds) < 2**63 and min(seeds) >= 0
