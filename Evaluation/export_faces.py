"""Export aligned 112x112 faces (ArcFace's 5-point template) as an image folder for FR code.

Generated images are 512 px scenes; arcface_torch, AdaFace and most FR training code expect
faces already aligned to the ArcFace template at 112x112. This writes them, one folder per
identity, with zero-padded names so that name order is index order:

    OUT/<identity>/00000.png, 00001.png, ...   (the n-th image of the identity, natural order:
                                                2.png before 10.png; skipped ones leave a gap)
    OUT/sources.csv                            (file, identity, source path, source sha256) per face
    OUT/export_config.json                     (settings, counts and every skip, named)

Faces are prepared exactly as Evaluation/train_fr.py prepares them (same scan, same decoder,
same detector and alignment; `--align auto` takes 112x112 images as aligned already), so a
model trained from the export sees the faces train_fr.py would train on. Unreadable images
and images without a face are skipped, counted and named. Each PNG is written atomically; a
rerun skips the faces already there, and refuses an output folder made with other settings.

    python Evaluation/export_faces.py --data_dir experiment/generated/triplet \\
        --output_dir faces/triplet
"""

from __future__ import annotations

import argparse
import csv
import io
import json
import logging
import re
import sys
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # shared modules at the repo root
sys.path.insert(0, str(Path(__file__).resolve().parent))

import runs  # noqa: E402
from faces import FACE_DETECTOR_NAMES  # noqa: E402
from fileio import (  # noqa: E402
    atomic_save_image,
    atomic_write_bytes,
    atomic_write_json,
    file_sha256,
)
from train_fr import (  # noqa: E402
    ALIGN_MODES,
    _align_or_skip,
    _read_rgb,
    scan_identity_folders,
)

logger = logging.getLogger("export_faces")

CONFIG_NAME = "export_config.json"
SOURCES_NAME = "sources.csv"
MIN_DIGITS = 5  # 00000.png: enough for 100k images per identity, more when needed
SETTINGS = ("data_dirs", "align", "face_detector")  # what defines the exported pixels


def build_parser() -> argparse.ArgumentParser:
    parser = runs.argument_parser(__doc__)
    parser.add_argument(
        "--data_dir",
        dest="data_dirs",
        action="append",
        required=True,
        type=Path,
        help="ROOT/<identity>/<image> (repeatable: same-named identities merge, numbered on).",
    )
    parser.add_argument(
        "--output_dir", type=Path, required=True, help="Where OUT/<identity>/00000.png go."
    )
    parser.add_argument(
        "--align",
        default="auto",
        choices=ALIGN_MODES,
        help="auto: 112x112 images are taken as aligned, others are detected and aligned; "
        "always: align every image; never: copy 112x112 images, skip others.",
    )
    parser.add_argument(
        "--face_detector",
        default="auto",
        choices=FACE_DETECTOR_NAMES,
        help="faces.build_face_detector backend (insightface SCRFD pack, else dlib).",
    )
    parser.add_argument(
        "--face_models_root",
        default=None,
        help="Folder of insightface model packs (default: ~/.insightface/models).",
    )
    runs.group_flags(parser, HELP_GROUPS)
    return parser


HELP_GROUPS = {  # --help sections (display only; a flag not listed shows under "options")
    "input": ["data_dirs"],
    "face detection and alignment": ["align", "face_detector", "face_models_root"],
    "output": ["output_dir"],
}


def parse_args(argv: Sequence[str] | None = None) -> argparse.Namespace:
    args = build_parser().parse_args(argv)
    args.data_dirs = [Path(folder).resolve() for folder in args.data_dirs]
    if args.output_dir.exists() and not args.output_dir.is_dir():
        raise ValueError(f"--output_dir {args.output_dir} is a file; pass a folder")
    for folder in args.data_dirs:
        if runs.is_inside(args.output_dir, folder):
            raise ValueError(
                f"--output_dir {args.output_dir} is inside --data_dir {folder}: the export "
                "would be read as an identity; choose a folder outside it"
            )
    return args


def natural_order(paths: Sequence[Path]) -> list[Path]:
    """Paths by name with digit runs compared as numbers (generation's 2.png before 10.png)."""

    def key(path: Path) -> list[Any]:
        return [int(part) if part.isdigit() else part for part in re.split(r"(\d+)", path.name)]

    return sorted(paths, key=lambda path: (key(path), str(path)))


def export_names(identities: dict[str, list[Path]]) -> dict[str, list[tuple[str, Path]]]:
    """identity -> [(zero-padded file name, source image)] in natural order, per identity."""
    digits = max(MIN_DIGITS, *(len(str(len(paths) - 1)) for paths in identities.values()))
    return {
        name: [(f"{index:0{digits}d}.png", path) for index, path in enumerate(natural_order(paths))]
        for name, paths in identities.items()
    }


def check_previous_export(
    output_dir: Path, settings: dict, names: dict[str, list[tuple[str, Path]]]
) -> None:
    """ValueError when output_dir holds an export made with other settings, or whose file
    names stood for other source images (images added to or removed from a source folder)."""
    path = output_dir / CONFIG_NAME
    if not path.is_file():
        return
    previous = json.loads(path.read_text()).get("settings", {})
    changed = {key: (previous.get(key), value) for key, value in settings.items()}
    changed = {key: pair for key, pair in changed.items() if pair[0] != pair[1]}
    moved = _moved_sources(output_dir, names)
    if moved:
        changed[f"source of {moved[0][0]} (+{len(moved) - 1} more)"] = moved[0][1:]
    if changed:
        lines = "; ".join(f"{key}: {old!r} -> {new!r}" for key, (old, new) in changed.items())
        raise ValueError(
            f"{output_dir} holds faces exported with other settings ({lines}); choose a new "
            "--output_dir"
        )


def previous_sources(output_dir: Path) -> dict[str, dict[str, str]]:
    """file -> its row (source, sha256 of the source's content) in the previous sources.csv."""
    sources = output_dir / SOURCES_NAME
    if not sources.is_file():
        return {}
    with sources.open(newline="") as handle:
        return {row["file"]: row for row in csv.DictReader(handle)}


def remove_stale_faces(output_dir: Path, before: dict, rows: list[tuple]) -> int:
    """Delete the faces an earlier run exported whose source is gone or has no face now (they
    would otherwise be trained on); only files the earlier sources.csv lists. Their count."""
    now = {row[0] for row in rows}
    stale = [output_dir / file for file in before if file not in now]
    for path in stale:
        path.unlink(missing_ok=True)
    return len(stale)


def _moved_sources(
    output_dir: Path, names: dict[str, list[tuple[str, Path]]]
) -> list[tuple[str, str, str]]:
    """(file, source before, source now) of exported files whose name now stands for another
    source image, from the previous run's sources.csv."""
    sources = output_dir / SOURCES_NAME
    if not sources.is_file():
        return []
    with sources.open(newline="") as handle:
        before = {row["file"]: row["source"] for row in csv.DictReader(handle)}
    now = {f"{name}/{file}": str(path) for name, files in names.items() for file, path in files}
    return sorted(
        (file, source, now[file])
        for file, source in before.items()
        if now.get(file, source) != source
    )


def export_identity(
    name: str, files: list[tuple[str, Path]], args: argparse.Namespace, context: dict
) -> list[tuple[str, str, str, str]]:
    """Write one identity's aligned faces; rows (file, identity, source, source sha256) of
    those on disk. A face is kept only if its source's content is the one it was made from."""
    from PIL import Image

    rows, counts, skips = [], context["counts"], context["skips"]
    for file_name, source in files:
        target = args.output_dir / name / file_name
        file = f"{name}/{file_name}"
        sha256 = file_sha256(source)
        made_from = context["before"].get(file, {}).get("sha256")
        if target.is_file() and made_from == sha256:
            counts["kept"] += 1
        else:
            image = _read_rgb(source)
            if image is None:
                skips.unreadable.append(str(source))
                continue
            face = _align_or_skip(image, source, args.align, context["detector"], skips)
            if face is None:
                continue
            target.parent.mkdir(parents=True, exist_ok=True)
            atomic_save_image(Image.fromarray(np.ascontiguousarray(face)), target, fsync=False)
            counts["written"] += 1
        rows.append((file, name, str(source), sha256))
    return rows


def write_sources(output_dir: Path, rows: list[tuple[str, str, str]]) -> None:
    buffer = io.StringIO()
    writer = csv.writer(buffer, lineterminator="\n")
    writer.writerow(("file", "identity", "source", "sha256"))
    writer.writerows(rows)
    atomic_write_bytes(output_dir / SOURCES_NAME, buffer.getvalue().encode())


def main(args: argparse.Namespace) -> dict:
    """Export every identity's faces; the summary (written, kept, skipped by reason)."""
    runs.setup_logging()
    settings = {key: runs.json_safe(getattr(args, key)) for key in SETTINGS}
    identities, skips = scan_identity_folders(args.data_dirs)
    names = export_names(identities)
    check_previous_export(args.output_dir, settings, names)
    args.output_dir.mkdir(parents=True, exist_ok=True)
    detector_cache: list = []

    def detector() -> Any:
        if not detector_cache:
            from faces import DEFAULT_FACE_MODELS_ROOT, build_face_detector

            root = args.face_models_root or DEFAULT_FACE_MODELS_ROOT
            detector_cache.append(build_face_detector(args.face_detector, root))
        return detector_cache[0]

    context = {
        "counts": {"written": 0, "kept": 0},
        "skips": skips,
        "detector": detector,
        "before": previous_sources(args.output_dir),
    }
    rows = []
    progress = runs.progress_bar(total=len(names), desc="exporting", unit="identity")
    for name, files in names.items():
        rows += export_identity(name, files, args, context)
        progress.update(1)
    progress.close()
    skips.log()
    if not rows:
        raise ValueError(
            f"no face found in any image under {', '.join(map(str, args.data_dirs))} "
            f"(skipped: {skips.counts()}); nothing exported"
        )
    removed = remove_stale_faces(args.output_dir, context["before"], rows)
    write_sources(args.output_dir, rows)
    summary = {
        "faces": len(rows),
        **context["counts"],
        "removed": removed,
        "identities": len({row[1] for row in rows}),
        "skipped": skips.counts(),
    }
    atomic_write_json(
        args.output_dir / CONFIG_NAME,
        {"settings": settings, "summary": summary, "skips": vars(skips)},
    )
    logger.info("exported %s into %s", json.dumps(summary), args.output_dir)
    return summary


if __name__ == "__main__":
    runs.run_cli("export_faces.py", parse_args, main)
