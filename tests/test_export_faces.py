"""Evaluation/export_faces.py: aligned 112x112 faces in a folder, as FR training sees them."""

from __future__ import annotations

import csv
import importlib.util
import shutil
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

import export_faces
import train_fr

IMAGES_DIR = Path(importlib.util.find_spec("insightface").origin).parent / "data" / "images"


def generated_like(root: Path) -> Path:
    """A generated-dataset layout: ID_a holds 12 scenes named 0.png .. 11.png (a real face,
    dlib finds it), ID_b one 112x112 face, a noise image (no face) and a broken file."""
    source = Image.open(IMAGES_DIR / "Tom_Hanks_54745.png").convert("RGB")
    (root / "ID_a").mkdir(parents=True)
    for index in range(12):
        source.rotate(index - 6).save(root / "ID_a" / f"{index}.png")
    (root / "ID_b").mkdir()
    pattern = np.random.default_rng(0).integers(0, 256, (112, 112, 3), dtype=np.uint8)
    Image.fromarray(pattern).save(root / "ID_b" / "0.png")
    noise = np.random.default_rng(1).integers(0, 256, (200, 200, 3), dtype=np.uint8)
    Image.fromarray(noise).save(root / "ID_b" / "1.png")
    (root / "ID_b" / "2.png").write_bytes(b"\x89PNG\r\n\x1a\n truncated")
    return root


def run(*argv: str) -> dict:
    return export_faces.main(export_faces.parse_args(list(argv)))


def test_export_writes_the_faces_fr_training_prepares_with_zero_padded_names(tmp_path):
    data = generated_like(tmp_path / "generated")
    out = tmp_path / "faces"
    summary = run(f"--data_dir={data}", f"--output_dir={out}", "--face_detector=dlib")
    names = sorted(str(p.relative_to(out)) for p in out.glob("*/*.png"))
    assert names == [f"ID_a/{i:05d}.png" for i in range(12)] + ["ID_b/00000.png"]
    assert summary["faces"] == 13 and summary["written"] == 13
    assert summary["skipped"]["no_face"] == 1 and summary["skipped"]["unreadable"] == 1
    with (out / "sources.csv").open() as handle:
        rows = list(csv.DictReader(handle))
    assert Path(rows[10]["source"]).name == "10.png" and rows[10]["file"] == "ID_a/00010.png"
    # The same pixels train_fr.py trains on (same scan, decoder, detector, alignment).
    identities, skips = train_fr.scan_identity_folders([data])
    from faces import build_face_detector

    detector = build_face_detector("dlib")
    prepared = train_fr.prepare_faces(
        identities, tmp_path / "prepared", "auto", lambda: detector, "dlib", skips
    )
    faces = prepared.open_faces()
    by_source = {row["source"]: out / row["file"] for row in rows}
    ordered = [p for name in identities for p in identities[name] if str(p) in by_source]
    assert len(ordered) == len(faces) == 13
    for face, source in zip(faces, ordered, strict=True):
        with Image.open(by_source[str(source)]) as image:
            assert image.size == (112, 112)
            assert np.array_equal(np.asarray(image), face)


def test_generation_records_are_not_warned_about_and_a_folder_of_sets_is_named(tmp_path, caplog):
    data = generated_like(tmp_path / "generated" / "triplet")
    for name in ("metadata.jsonl", "run_config.json"):  # what inference writes beside them
        (data / name).write_text("{}")
    summary = run(
        f"--data_dir={data}", f"--output_dir={tmp_path / 'faces'}", "--face_detector=dlib"
    )
    assert summary["skipped"]["ignored_files"] == 0
    assert "ignored_files" not in caplog.text
    with pytest.raises(ValueError, match=f"pass one of them, e.g. --data_dir {data}$"):
        run(f"--data_dir={data.parent}", f"--output_dir={tmp_path / 'all'}")


def test_rerun_keeps_finished_faces_and_refuses_other_settings_or_sources(tmp_path):
    data = generated_like(tmp_path / "generated")
    out = tmp_path / "faces"
    argv = [f"--data_dir={data}", f"--output_dir={out}", "--face_detector=dlib"]
    run(*argv)
    (out / "ID_a" / "00003.png").unlink()
    summary = run(*argv)
    assert summary["written"] == 1 and summary["kept"] == 12
    with pytest.raises(ValueError, match="align: 'auto' -> 'always'"):
        run(*argv, "--align=always")
    shutil.copy(data / "ID_a" / "0.png", data / "ID_a" / "05.png")  # takes 5.png's place
    with pytest.raises(ValueError, match="other settings .source of ID_a/00005.png"):
        run(*argv)
    with pytest.raises(ValueError, match="inside --data_dir"):
        export_faces.parse_args([f"--data_dir={data}", f"--output_dir={data / 'faces'}"])


def test_rerun_re_exports_a_changed_source_and_removes_faces_whose_source_is_gone(tmp_path):
    """A source replaced in place (another image at the same path, e.g. after regenerating with
    --overwrite) is exported again, not kept (removed if it has no face now); a face whose
    source is gone is removed (train_fr would train on it), and sources.csv no longer lists
    it."""
    data = generated_like(tmp_path / "generated")
    out = tmp_path / "faces"
    argv = [f"--data_dir={data}", f"--output_dir={out}", "--face_detector=dlib"]
    run(*argv)
    old_face = (out / "ID_a" / "00000.png").read_bytes()
    other = Image.open(IMAGES_DIR / "Tom_Hanks_54745.png").convert("RGB")
    other.transpose(Image.Transpose.FLIP_LEFT_RIGHT).save(data / "ID_a" / "0.png")  # new content
    (data / "ID_a" / "11.png").unlink()
    summary = run(*argv)
    assert summary["written"] == 1 and summary["kept"] == 11 and summary["removed"] == 1
    assert (out / "ID_a" / "00000.png").read_bytes() != old_face
    assert not (out / "ID_a" / "00011.png").exists()
    with (out / "sources.csv").open() as handle:
        files = [row["file"] for row in csv.DictReader(handle)]
    assert "ID_a/00011.png" not in files and len(files) == 12


def test_names_follow_natural_order_and_widen_past_five_digits():
    paths = [Path(f"{i}.png") for i in (10, 2, 1, 0)]
    assert [p.name for p in export_faces.natural_order(paths)] == [
        "0.png", "1.png", "2.png", "10.png"
    ]  # fmt: skip
    many = {"x": [Path(f"{i}.png") for i in range(100_001)]}
    assert export_faces.export_names(many)["x"][-1][0] == "100000.png"
    assert export_faces.export_names(many)["x"][0][0] == "000000.png"
