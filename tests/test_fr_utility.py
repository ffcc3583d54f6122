"""Evaluation/fr_utility.py: the paper's FR-utility table, trained and verified per data setting,
reused on a rerun only while its settings match."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
from test_train_fr import pattern_face, save, verify_png

import evaluate
import fr_utility
import report
import verify

TINY_FLAGS = (
    "--backbone=r18",
    "--embedding_size=32",
    "--batch_size=4",
    "--num_epochs=1",
    "--learning_rate=0.01",
    "--mixed_precision=no",
    "--dataloader_num_workers=0",
)


def write_pairs_bin(path: Path, seed: int) -> Path:
    """5 genuine + 5 impostor pairs of pattern faces (112x112, PNG)."""
    rng = np.random.default_rng(seed)
    images, issame = [], []
    for k in range(10):
        first = int(rng.integers(0, 5))
        second = first if k % 2 == 0 else first + 5
        images += [pattern_face(first, 10 + k), pattern_face(second, 40 + k)]
        issame.append(k % 2 == 0)
    verify.write_bin(path, [verify_png(image) for image in images], issame)
    return path


def build_inputs(root: Path) -> dict:
    """real/ and synthetic/ of the same two people, a 'broken' set with no readable image, and
    a benchmark folder with cplfw.bin and lfw.bin."""
    for person in (0, 1):
        for variant in (0, 1):
            save(pattern_face(person, variant), root / "real" / f"id{person}" / f"{variant}.png")
            save(
                pattern_face(person, 5 + variant), root / "synth" / f"id{person}" / f"{variant}.png"
            )
    (root / "broken" / "id0").mkdir(parents=True)
    (root / "broken" / "id0" / "0.png").write_bytes(b"not a png")
    (root / "bins").mkdir()
    write_pairs_bin(root / "bins" / "cplfw.bin", seed=1)
    write_pairs_bin(root / "bins" / "lfw.bin", seed=2)
    return {"real": root / "real", "synth": root / "synth", "broken": root / "broken"}


def run(root: Path, inputs: dict, kinds=("real", "synthetic"), *extra: str) -> dict:
    generated = {"m": inputs["synth"], "broken": inputs["broken"]}
    settings = fr_utility.paper_settings(inputs["real"], generated, kinds)
    flags = [*fr_utility.OFFICIAL_PROTOCOL_FLAGS, *TINY_FLAGS, *extra]
    return fr_utility.run_fr_utility(settings, root / "bins", root / "fr", flags, device="cpu")


def mtime(path: str | Path) -> int:
    return Path(path).stat().st_mtime_ns


@pytest.mark.slow
def test_every_setting_is_trained_verified_and_reused_only_while_its_settings_match(tmp_path):
    inputs = build_inputs(tmp_path)
    table = run(tmp_path, inputs)

    assert table["benchmarks"] == ["lfw", "cplfw"]  # the paper's column order, not the file order
    assert table["selection_benchmarks"] == ["lfw"]  # the official config selects on LFW only
    assert json.loads((tmp_path / "fr" / "fr_utility.json").read_text()) == table
    assert list(table["settings"]) == ["real", "synthetic_m", "synthetic_broken"]
    assert "every image was skipped" in table["settings"]["synthetic_broken"]["failed"]
    real = table["settings"]["real"]
    assert real["num_faces"] == 4 and real["num_identities"] == 2 and real["best_epoch"] == 0
    # what the table says equals verify.py on the selected backbone, set by set
    backbone = verify.load_backbone(real["backbone"], "cpu")
    for name in ("lfw", "cplfw"):
        pair_set = verify.load_bin(tmp_path / "bins" / f"{name}.bin")
        expected = verify.evaluate_backbone(backbone, pair_set)
        assert real["accuracy"][name]["mean"] == expected.accuracy_mean
        assert real["accuracy"][name]["pairs"] == 10
    assert real["mean_accuracy"] == pytest.approx(
        np.mean([real["accuracy"][n]["mean"] for n in ("lfw", "cplfw")])
    )
    # during training only the selection set was verified
    log = Path(real["run_dir"]) / "verification_log.jsonl"
    assert [list(json.loads(line)["sets"]) for line in log.read_text().splitlines()] == [["lfw"]]

    # rerun, nothing changed: neither trained nor verified again
    stamps = {n: mtime(e["backbone"]) for n, e in table["settings"].items() if "backbone" in e}
    cache = Path(real["run_dir"]) / "benchmark_verification.json"
    cached_at = mtime(cache)
    again = run(tmp_path, inputs)
    assert again == table
    assert all(mtime(again["settings"][n]["backbone"]) == t for n, t in stamps.items())
    assert mtime(cache) == cached_at

    # a test-only benchmark changed: same model, verified again on the new file
    write_pairs_bin(tmp_path / "bins" / "cplfw.bin", seed=3)
    updated = run(tmp_path, inputs)
    assert mtime(updated["settings"]["real"]["backbone"]) == stamps["real"]
    assert mtime(cache) != cached_at

    # other training settings: a new run beside the old one, never mixed with it
    other = run(tmp_path, inputs, ["real"], "--learning_rate=0.02")
    assert other["settings"]["real"]["run_dir"] != real["run_dir"]
    assert list(other["settings"]) == ["real"]
    assert Path(real["backbone"]).is_file()
    assert json.loads((Path(other["settings"]["real"]["run_dir"]) / "config.json").read_text())[
        "args"
    ]["learning_rate"] == pytest.approx(0.02)


def test_settings_benchmarks_and_selection(tmp_path):
    real, a, b = tmp_path / "real", tmp_path / "a", tmp_path / "b"
    settings = fr_utility.paper_settings(real, {"dreambooth": a, "triplet": b})
    assert [(s.name, s.data_dirs) for s in settings] == [
        ("real", [real]),
        ("synthetic_dreambooth", [a]),
        ("synthetic_triplet", [b]),
        ("real+synthetic_dreambooth", [real, a]),
        ("real+synthetic_triplet", [real, b]),
    ]
    assert settings[-1].label == "real + synthetic (triplet)"

    with pytest.raises(FileNotFoundError, match="is not a folder of .bin"):
        fr_utility.find_benchmarks(tmp_path / "missing")
    (tmp_path / "bins").mkdir()
    with pytest.raises(FileNotFoundError, match="holds no .bin file.*lfw.bin"):
        fr_utility.find_benchmarks(tmp_path / "bins")
    for name in ("zz_own", "cplfw", "agedb_30", "lfw"):
        (tmp_path / "bins" / f"{name}.bin").write_bytes(b"")
    benchmarks = fr_utility.find_benchmarks(tmp_path / "bins")
    assert list(benchmarks) == ["lfw", "agedb_30", "cplfw", "zz_own"]
    assert fr_utility.selection_benchmarks(benchmarks, None) == ["lfw"]
    assert fr_utility.selection_benchmarks({"zz_own": Path()}, None) == ["zz_own"]  # all
    assert fr_utility.selection_benchmarks(benchmarks, ["cplfw"]) == ["cplfw"]
    with pytest.raises(ValueError, match="cfp_fp"):
        fr_utility.selection_benchmarks(benchmarks, ["cfp_fp"])


def fake_table() -> dict:
    entry = {
        "label": "real",
        "num_faces": 40,
        "num_identities": 2,
        "skip_counts": {"unreadable": 1, "no_face": 2, "empty_identities": 1},
        "accuracy": {"lfw": {"mean": 0.9, "std": 0.1}, "cfp_fp": {"mean": 0.7, "std": 0.1}},
        "mean_accuracy": 0.8,
    }
    return {
        "benchmarks": ["lfw", "cfp_fp"],
        "selection_benchmarks": ["lfw"],
        "train_flags": ["--select_best"],
        "settings": {
            "real": entry,
            "synthetic_x": {"label": "synthetic (x)", "failed": "every image was skipped"},
        },
    }


def test_table_and_report_section_show_accuracy_in_percent_with_the_mean():
    header, rows = fr_utility.table_rows(fake_table())
    assert header == ["training data", "faces (skipped)", "identities", "LFW", "CFP-FP", "mean"]
    assert rows[0] == ["real", "40 (3)", 2, pytest.approx(90.0), pytest.approx(70.0), 80.0]
    assert rows[1] == ["synthetic (x)", "", "", "not trained: every image was skipped"]
    assert "real | 40 (3) | 2 | 90.00 | 70.00 | 80.00" in fr_utility.format_table(fake_table())

    section = report.fr_utility_section(fake_table())
    assert "<th>CFP-FP</th>" in section and "<td>90.00</td><td>70.00</td><td>80.00</td>" in section
    assert "not trained: every image was skipped" in section and "<code>lfw</code>" in section


def test_without_benchmarks_the_report_says_in_one_line_what_it_needs(tmp_path):
    section = report.fr_utility_section(evaluate.fr_utility_results(None))
    assert "--fr_benchmarks" in section and "<table" not in section
    missing = evaluate.fr_utility_results(tmp_path / "fr_utility.json")
    assert "did not finish" in report.fr_utility_section(missing)
    (tmp_path / "gen").mkdir()
    flags = [f"--generated={tmp_path / 'gen'}", f"--out={tmp_path / 'out'}", "--embedder=dlib"]
    assert evaluate.parse_args([*flags, "--fr_utility=t.json"]).fr_utility == Path("t.json")
