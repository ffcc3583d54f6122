"""Face-recognition utility, the paper's last table: an FR model trained per data setting and
verified on the benchmarks.

The paper (and dariant/ID-Booth FR_training/) trains an IResNet-50 with AdaFace on
- real: the real photos of the identities (Tufts in the paper),
- synthetic: one method's generated images of the same identities,
- real + synthetic: both, merged by identity folder name,
and reports 10-fold verification accuracy on LFW, CFP-FP, AgeDB-30, CALFW and CPLFW with the
mean over them. Training follows the official protocol (train_fr.py's benchmark flags): the
lr drops x0.1 when the mean accuracy of the selection benchmarks (the official config checks
LFW) has not improved for 4 epochs, training stops 6 epochs after the best one, and the best
epoch's weights are the model. Every benchmark is then verified with those weights.

Each setting is one train_fr.py run in OUT/<setting>/run-<key>/, where the key hashes what
makes the model (flags, the images' fingerprint, the selection benchmarks): a rerun resumes or
reuses a run only when all of these match, and different settings never share a folder. A
setting that fails (e.g. no face found in its images) is recorded with its one-line reason and
the others go on. The table is OUT/fr_utility.json.
"""

from __future__ import annotations

import hashlib
import json
import logging
import sys
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # shared modules at the repo root

import runs  # noqa: E402
import verify  # noqa: E402
from fileio import atomic_write_json  # noqa: E402

logger = logging.getLogger("fr_utility")

# The paper's benchmarks in its column order (insightface's .bin file stems) and their names.
PAPER_BENCHMARKS = verify.BIN_NAMES
BENCHMARK_TITLES = {
    "lfw": "LFW",
    "cfp_fp": "CFP-FP",
    "agedb_30": "AgeDB-30",
    "calfw": "CALFW",
    "cplfw": "CPLFW",
}
OFFICIAL_SELECTION = ("lfw",)  # FR_config.py: val_targets = ["lfw"]
SETTING_KINDS = ("real", "synthetic", "real+synthetic")
# dariant/ID-Booth FR_training/config/FR_config.py: IResNet-50, AdaFace, batch 128, SGD lr
# 0.1 / 512 * batch, ReduceLROnPlateau(mode max, patience 4) on benchmark accuracy, stop 6
# epochs after the best, best_backbone.pth, gradients clipped at norm 5, at most 200 epochs;
# FR_training/train_FR.py: AdaFace(embedding_size, classnum) keeps its t_alpha=1.0, and SGD
# decays model.parameters(), BatchNorm's included.
OFFICIAL_PROTOCOL_FLAGS = (
    "--backbone=r50",
    "--head=adaface",
    "--adaface_t_alpha=1.0",
    "--decay_batchnorm",
    "--batch_size=128",
    "--learning_rate=0.025",
    "--max_grad_norm=5",
    "--num_epochs=200",
    "--lr_scheduler=benchmark",
    "--plateau_patience=4",
    "--early_stopping_epochs=6",
    "--select_best",
    "--eval_every_epochs=1",
)
RESULT_NAME = "fr_utility.json"
SKIPPED_IMAGE_KINDS = ("unreadable", "no_face", "not_aligned_size")  # train_fr's skip counts


@dataclass
class DataSetting:
    """One row of the table: a name for folders, a label for people, the image roots."""

    name: str
    label: str
    data_dirs: list[Path]


def paper_settings(
    real: Path, generated: dict[str, Path], kinds: Sequence[str] = SETTING_KINDS
) -> list[DataSetting]:
    """real; synthetic per method; real + synthetic per method (in that order)."""
    settings = []
    if "real" in kinds:
        settings.append(DataSetting("real", "real", [real]))
    if "synthetic" in kinds:
        settings += [
            DataSetting(f"synthetic_{m}", f"synthetic ({m})", [d]) for m, d in generated.items()
        ]
    if "real+synthetic" in kinds:
        settings += [
            DataSetting(f"real+synthetic_{m}", f"real + synthetic ({m})", [real, d])
            for m, d in generated.items()
        ]
    return settings


def find_benchmarks(folder: Path) -> dict[str, Path]:
    """{stem: path} of the .bin files in `folder`: the paper's five in its order, then others."""
    if not folder.is_dir():
        raise FileNotFoundError(f"--fr_benchmarks {folder} is not a folder of .bin files")
    found = {path.stem: path for path in sorted(folder.glob("*.bin")) if path.is_file()}
    if not found:
        raise FileNotFoundError(
            f"--fr_benchmarks {folder} holds no .bin file (expected e.g. "
            f"{', '.join(n + '.bin' for n in PAPER_BENCHMARKS)})"
        )
    ordered = [name for name in PAPER_BENCHMARKS if name in found]
    ordered += sorted(set(found) - set(ordered))
    return {name: found[name] for name in ordered}


def selection_benchmarks(benchmarks: dict[str, Path], names: Sequence[str] | None) -> list[str]:
    """The sets that steer training: `names`, else LFW (official) when present, else all."""
    if names:
        missing = [name for name in names if name not in benchmarks]
        if missing:
            raise ValueError(
                f"--fr_selection_benchmarks {missing} not among the .bin files {list(benchmarks)}"
            )
        return list(names)
    official = [name for name in OFFICIAL_SELECTION if name in benchmarks]
    return official or list(benchmarks)


def file_fingerprint(paths: Sequence[Path]) -> list[list]:
    """(name, size, mtime_ns) per file: a replaced or edited file changes it."""
    return [[p.name, p.stat().st_size, p.stat().st_mtime_ns] for p in map(Path, paths)]


def run_key(setting: DataSetting, flags: Sequence[str], selection: Sequence[Path]) -> str:
    """12 hex digits over everything that makes the model: flags, images, selection sets."""
    import train_fr

    identities, _ = train_fr.scan_identity_folders(setting.data_dirs)
    record = {
        "flags": list(flags),
        "images": train_fr.dataset_fingerprint(identities, "", ""),
        "roots": len(setting.data_dirs),
        "selection": file_fingerprint(selection),
    }
    return hashlib.sha256(json.dumps(record, sort_keys=True).encode()).hexdigest()[:12]


def train_setting(
    setting: DataSetting, out_root: Path, flags: Sequence[str], selection: Sequence[Path]
) -> dict:
    """Train (or resume / reuse) one setting's model; its entry of the table (no accuracy yet)."""
    import train_fr

    key = run_key(setting, flags, selection)
    run_dir = out_root / setting.name / f"run-{key}"
    argv = [f"--data_dir={d}" for d in setting.data_dirs]
    argv += [f"--output_dir={run_dir}", "--resume_from_checkpoint=latest"]
    argv += [f"--eval_bin={path}" for path in selection]
    argv += list(flags)
    logger.info("FR utility, %s: train_fr.py %s", setting.label, " ".join(argv))
    backbone = train_fr.main(train_fr.parse_args(argv))
    config = json.loads((run_dir / "config.json").read_text())
    return {
        "label": setting.label,
        "data_dirs": [str(d) for d in setting.data_dirs],
        "run_dir": str(run_dir),
        "backbone": str(backbone),
        "num_faces": config["num_faces"],
        "num_identities": config["num_classes"],
        "skip_counts": config["skip_counts"],
        "best_epoch": config.get("best_epoch"),
        "epochs_trained": config["epoch"],
        "stopped_early": config.get("stopped_early"),
    }


def verify_setting(entry: dict, benchmarks: dict[str, Path], device: str) -> None:
    """Accuracy of the setting's model on every benchmark (cached beside the model while the
    .bin files are unchanged); fills entry['accuracy'] and entry['mean_accuracy']."""
    cache = Path(entry["run_dir"]) / "benchmark_verification.json"
    fingerprint = file_fingerprint(list(benchmarks.values()))
    if cache.is_file():
        cached = json.loads(cache.read_text())
        if cached.get("benchmarks") == fingerprint:
            entry.update(accuracy=cached["accuracy"], mean_accuracy=cached["mean_accuracy"])
            return
    backbone = verify.load_backbone(entry["backbone"], device)
    results = []
    for name, path in benchmarks.items():  # one decoded set in memory at a time
        pair_set = verify.load_bin(path, name)
        results.append(verify.evaluate_backbone(backbone, pair_set, device=device))
    accuracy = {
        r.name: {"mean": r.accuracy_mean, "std": r.accuracy_std, "pairs": r.num_pairs}
        for r in results
    }
    mean_accuracy = float(np.mean([r.accuracy_mean for r in results]))
    atomic_write_json(
        cache, {"benchmarks": fingerprint, "accuracy": accuracy, "mean_accuracy": mean_accuracy}
    )
    entry.update(accuracy=accuracy, mean_accuracy=mean_accuracy)


def run_fr_utility(
    settings: Sequence[DataSetting],
    benchmarks_dir: Path,
    out_root: Path,
    flags: Sequence[str] = OFFICIAL_PROTOCOL_FLAGS,
    selection_names: Sequence[str] | None = None,
    device: str | None = None,
    is_main_process: bool = True,
) -> dict:
    """Train and verify every setting; write and return the table (OUT/fr_utility.json).

    `flags` are train_fr.py's (the official protocol by default; later ones override)."""
    import torch

    device = device or ("cuda" if torch.cuda.is_available() else "cpu")
    benchmarks = find_benchmarks(benchmarks_dir)
    selection = selection_benchmarks(benchmarks, selection_names)
    table: dict = {
        "benchmarks": list(benchmarks),
        "selection_benchmarks": selection,
        "train_flags": list(flags),
        "settings": {},
    }
    for setting in settings:
        try:
            entry = train_setting(setting, out_root, flags, [benchmarks[n] for n in selection])
            if is_main_process:
                verify_setting(entry, benchmarks, device)
        except (ValueError, FileNotFoundError, runs.NonFiniteLossError) as exc:
            logger.error("FR utility, %s failed: %s", setting.label, exc)
            entry = {"label": setting.label, "failed": str(exc).splitlines()[0]}
        table["settings"][setting.name] = entry
    if is_main_process:
        atomic_write_json(out_root / RESULT_NAME, runs.json_safe(table), allow_nan=False)
    return table


def table_rows(table: dict) -> tuple[list[str], list[list[object]]]:
    """(header, rows) of the paper's table: accuracy (%) per benchmark and the mean, per
    setting, with the faces each model was trained on; failed settings say why."""
    names = table["benchmarks"]
    header = ["training data", "faces (skipped)", "identities"]
    header += [BENCHMARK_TITLES.get(n, n) for n in names] + ["mean"]
    rows = []
    for entry in table["settings"].values():
        if "failed" in entry:
            rows.append([entry["label"], "", "", f"not trained: {entry['failed']}"])
            continue
        skipped = sum(entry["skip_counts"].get(k, 0) for k in SKIPPED_IMAGE_KINDS)
        cells = [100 * entry["accuracy"][n]["mean"] for n in names]
        faces = f"{entry['num_faces']} ({skipped})"
        rows.append([entry["label"], faces, entry["num_identities"], *cells])
        rows[-1].append(100 * entry["mean_accuracy"])
    return header, rows


def selection_curves(table: dict) -> dict[str, dict[str, list]]:
    """{setting label: {"epoch": [...], "mean_accuracy": [...]}} of the selection benchmarks
    during training (train_fr.py's verification_log.jsonl): where the best epoch came from."""
    curves = {}
    for entry in table["settings"].values():
        log = Path(entry.get("run_dir", "")) / "verification_log.jsonl"
        if "failed" in entry or not log.is_file():
            continue
        records = [json.loads(line) for line in log.read_text().splitlines() if line.strip()]
        curves[entry["label"]] = {
            "epoch": [r["epoch"] for r in records],
            "mean_accuracy": [r["mean_accuracy"] for r in records],
        }
    return curves


def format_table(table: dict) -> str:
    """Plain-text table (accuracy %, two decimals as the paper prints) for logs and notebooks."""
    header, rows = table_rows(table)
    lines = [" | ".join(header)]
    for row in rows:
        lines.append(" | ".join(f"{c:.2f}" if isinstance(c, float) else str(c) for c in row))
    return "\n".join(lines)
