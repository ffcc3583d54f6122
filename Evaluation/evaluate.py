"""Evaluate synthetic identity datasets: identity separability, diversity and fidelity.

One command per run:

    python Evaluation/evaluate.py --generated ID-Booth=gen/triplet --generated DreamBooth=gen/db \\
        --real data/tufts --arcface_weights backbone.pth --feature_model facebook/dinov2-large \\
        --out reports/run1

Every folder is ROOT/<identity>/<image> (identity = folder name; synthetic and real sets
match identities by name). Writes OUT/metrics.json and a self-contained OUT/report.html
(tables + base64-embedded PNG plots; the PNGs also land in OUT/plots/). Face embeddings
and features are cached per file content in OUT/cache, so re-runs only process new images.

- Identity (every set): genuine = all same-identity pairs, impostor = all different-identity
  pairs (or a seeded sample of --max_impostor_pairs); synthetic vs synthetic, synthetic vs
  real and real vs real. EER, FMR/FNMR operating points, AUC, FDR, d' (metrics.py).
  `--embedder arcface` (default, the paper's; needs --arcface_weights) or `--embedder dlib`
  (dlib's shipped 128-d ResNet with its own detector/alignment: offline, not the paper's).
  Images without a detected face are counted and listed, never silently dropped.
- Diversity: Vendi score per identity on DINOv2 features (mean +- std over identities).
- Fidelity: Frechet distance, kernel distance, precision/recall/density/coverage (k=5) of
  each generated set against --real on DINOv2 features (dgm-eval protocol).
Diversity and fidelity need --feature_model (a DINOv2 folder or hub id); without it they are
skipped with a note.
- Image grids (first in the report): per method and identity, up to --grid_images generated
  samples beside as many real photos of that identity (96 px JPEG thumbnails, inline).
- Quality: CR-FIQA score per detected face (--quality_weights; not computed without it), by
  default in the paper's setting (--quality_setting paper: CR-FIQA(S) fed BGR).
- Pose: yaw / pitch / roll per face, mean +- std over all faces and the per-identity std
  (the paper's table): 6DRepNet with --pose_weights (the paper's), else dlib-PnP (offline
  fallback, not comparable with the paper); --no-pose skips it.
- Training curves: the TensorBoard scalars of train_ID-Booth.py runs (--training_logs).
- --banner: a boxed line at the very top (e.g. "random-weight models").
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import platform
import re
import sys
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # shared modules at the repo root

import metrics  # noqa: E402
import runs  # noqa: E402
from faces import FACE_DETECTOR_NAMES  # noqa: E402
from fileio import atomic_write_bytes, atomic_write_json  # noqa: E402
from image_sets import (  # noqa: E402
    DEFAULT_EXCLUDE,
    STATUS_NO_FACE,
    STATUS_OK,
    STATUS_UNREADABLE,
    ImageSet,
    cached_rows,
    load_image_set,
)

REAL_SET_NAME = "real"
UNIT_INTERVAL = runs.Number(float, 0, 1, low_open=True, high_open=True)  # FMR / FNMR targets


def parse_args(argv: Sequence[str] | None = None) -> argparse.Namespace:
    """Command-line options (defaults: the paper's / dgm-eval's settings), validated."""
    parser = build_parser()
    args = parser.parse_args(argv)
    runs.check_numbers(args, parser)
    return validate_args(args)


def build_parser() -> argparse.ArgumentParser:
    """The command line's flags (reproduce_ID-Booth.py checks --evaluate_flags with it)."""
    parser = runs.argument_parser(__doc__)
    parser.add_argument(
        "--generated",
        action="append",
        required=True,
        metavar="[NAME=]DIR",
        help="A generated dataset ROOT/<identity>/<image>; repeat to compare methods side by "
        "side (e.g. --generated DreamBooth=out/db --generated ID-Booth=out/triplet). NAME "
        "defaults to the folder name.",
    )
    parser.add_argument(
        "--real",
        type=Path,
        default=None,
        help="Real images ROOT/<identity>/<image> (identity names as in the "
        "generated sets); enables synthetic-vs-real and fidelity metrics.",
    )
    parser.add_argument(
        "--out",
        type=Path,
        required=True,
        help="Report folder: metrics.json, report.html, plots/, cache/.",
    )
    parser.add_argument(
        "--embedder",
        default="arcface",
        choices=("arcface", "dlib"),
        help="Identity embedder: arcface (the paper's; needs --arcface_weights) or "
        "dlib (the 128-d model shipped in face-recognition-models, with dlib's "
        "own detector and alignment; offline, not the paper's).",
    )
    parser.add_argument(
        "--arcface_weights",
        type=Path,
        default=None,
        help="ArcFace recogniser: arcface_torch backbone.pth/.safetensors or an "
        "insightface .onnx (the paper: IResNet-100 trained on MS1MV3).",
    )
    parser.add_argument(
        "--face_detector",
        default="auto",
        choices=FACE_DETECTOR_NAMES,
        help="Face detector for --embedder arcface (auto = insightface when a "
        "pack with a detector is under --face_models_root, else dlib).",
    )
    parser.add_argument(
        "--face_models_root",
        type=Path,
        default=None,
        help="Folder of insightface model packs (default: "
        "arcface.DEFAULT_FACE_MODELS_ROOT, ~/.insightface/models).",
    )
    parser.add_argument(
        "--feature_model",
        default=None,
        help="DINOv2 weights for diversity/fidelity: a local save_pretrained "
        "folder or a hub id (dgm-eval uses ViT-L/14: facebook/dinov2-large). "
        "Not given, or 'none': diversity and fidelity are skipped.",
    )
    parser.add_argument(
        "--feature_protocol",
        default="dgm-eval",
        choices=("dgm-eval", "processor"),
        help="dgm-eval: bicubic resize to --feature_image_size, ImageNet "
        "normalisation; processor: the checkpoint's own image processor.",
    )
    parser.add_argument(
        "--feature_image_size",
        type=runs.POSITIVE_INT,
        default=224,
        help="Input size of the feature model under the dgm-eval protocol.",
    )
    parser.add_argument(
        "--max_impostor_pairs",
        type=runs.NON_NEGATIVE_INT,
        default=10_000_000,
        help="Cap on impostor pairs per comparison; above it a uniform seeded "
        "sample is used (0 = all pairs, refused before any embedding when their scores "
        "would not fit in memory). 107 identities x 21 images (the paper) stay below it.",
    )
    parser.add_argument(
        "--fmr_targets",
        type=UNIT_INTERVAL,
        nargs="+",
        default=[1e-2, 1e-3],
        help="FMR operating points at which FNMR is reported.",
    )
    parser.add_argument(
        "--fnmr_targets",
        type=UNIT_INTERVAL,
        nargs="+",
        default=[1e-2, 1e-3],
        help="FNMR operating points at which FMR is reported.",
    )
    parser.add_argument(
        "--kd_subsets",
        type=runs.POSITIVE_INT,
        default=100,
        help="Kernel distance: number of random subsets (dgm-eval: 100).",
    )
    parser.add_argument(
        "--kd_subset_size",
        type=runs.POSITIVE_INT,
        default=1000,
        help="Kernel distance: images per subset (dgm-eval: 1000; capped at the smaller set size).",
    )
    parser.add_argument(
        "--prdc_k", type=runs.POSITIVE_INT, default=5, help="Nearest neighbours for PRDC."
    )
    parser.add_argument(
        "--prdc_max_samples",
        type=runs.POSITIVE_INT,
        default=10_000,
        help="PRDC draws n = min(this, real images, generated images) images from each set "
        "(seeded, without replacement; dgm-eval's reduced_n).",
    )
    parser.add_argument(
        "--exclude",
        nargs="*",
        default=list(DEFAULT_EXCLUDE),
        help="File-name patterns that are not samples (e.g. contact sheets).",
    )
    parser.add_argument(
        "--batch_size",
        type=runs.POSITIVE_INT,
        default=32,
        help="Images per embedding / feature batch.",
    )
    parser.add_argument(
        "--device",
        default=None,
        help="torch device for ArcFace and DINOv2 (default: cuda if available).",
    )
    parser.add_argument(
        "--seed",
        type=runs.SEED,
        default=0,
        help="Seed of impostor-pair sampling, KD subsets and PRDC subsampling.",
    )
    add_report_arguments(parser)
    runs.group_flags(parser, HELP_GROUPS)
    return parser


HELP_GROUPS = {  # --help sections (display only; a flag not listed shows under "options")
    "image sets": ["generated", "real", "exclude"],
    "identity embedder": ["embedder", "arcface_weights", "face_detector", "face_models_root"],
    "identity metrics": ["max_impostor_pairs", "fmr_targets", "fnmr_targets"],
    "diversity and fidelity (DINOv2)": [
        "feature_model", "feature_protocol", "feature_image_size", "kd_subsets",
        "kd_subset_size", "prdc_k", "prdc_max_samples",
    ],
    "quality and pose": ["quality_weights", "quality_setting", "pose", "pose_weights"],
    "report sections": ["grid_images", "grid_identities", "training_logs", "fr_utility"],
    "speed and seed": ["batch_size", "device", "seed"],
    "output": ["out", "banner"],
}  # fmt: skip


def add_report_arguments(parser: argparse.ArgumentParser) -> None:
    """Flags of the sections beside the metrics: grids, training curves, quality, pose, banner."""
    parser.add_argument(
        "--grid_images",
        type=runs.POSITIVE_INT,
        default=6,
        help="Image grids: generated samples and real photos shown per identity (each).",
    )
    parser.add_argument(
        "--grid_identities",
        type=runs.POSITIVE_INT,
        default=8,
        help="Image grids: identities shown per method (the first by name).",
    )
    parser.add_argument(
        "--training_logs",
        action="append",
        default=[],
        metavar="NAME=LORA_ROOT",
        help="Training curves of the --generated set NAME: train_ID-Booth.py's --output_dir "
        "(one folder per identity, TensorBoard logs in <identity>/<logging_dir>); repeatable.",
    )
    parser.add_argument(
        "--banner",
        default=None,
        help="Text shown in a box at the very top of the report (and stored in metrics.json).",
    )
    parser.add_argument(
        "--quality_weights",
        type=Path,
        default=None,
        help="CR-FIQA checkpoint (github.com/fdbtrs/CR-FIQA: 32572backbone.pth or "
        "181952backbone.pth; CC BY-NC 4.0) for face image quality. Not given: not computed.",
    )
    parser.add_argument(
        "--quality_setting",
        default="paper",
        help="CR-FIQA protocol: paper (the paper's: CR-FIQA(S), iresnet50 32572backbone.pth, "
        "fed BGR as ID-Booth's script) or crfiqa-rgb (CR-FIQA's own: RGB, either model).",
    )
    parser.add_argument(
        "--pose",
        action=argparse.BooleanOptionalAction,
        default=True,
        help="Head pose per image and its spread per identity; --no-pose skips it.",
    )
    parser.add_argument(
        "--pose_weights",
        type=Path,
        default=None,
        help="6DRepNet weights (the paper's estimator: 6DRepNet_300W_LP_AFLW2000.pth from "
        "github.com/thohemp/6DRepNet; never downloaded). Not given: the offline dlib-PnP "
        "fallback, not comparable with the paper.",
    )
    parser.add_argument(
        "--fr_utility",
        type=Path,
        default=None,
        help="fr_utility.json of reproduce_ID-Booth.py's FR stage (Evaluation/fr_utility.py): "
        "the face-recognition utility table. Not given: the report says what it needs.",
    )


def parse_generated(entries: Sequence[str]) -> dict[str, Path]:
    """'NAME=DIR' or 'DIR' entries -> {name: folder}; ValueError on duplicate/reserved names."""
    generated: dict[str, Path] = {}
    for entry in entries:
        name, separator, folder = entry.partition("=")
        if not separator:
            name, folder = Path(entry).expanduser().resolve().name, entry
        name = name.strip()
        if not name or not folder:
            raise ValueError(f"--generated {entry!r}: expected NAME=DIR or DIR")
        if name in generated or name == REAL_SET_NAME:
            raise ValueError(
                f"--generated name {name!r} is used twice or reserved; "
                "give each set a distinct NAME=DIR"
            )
        generated[name] = Path(folder).expanduser()
    return generated


def parse_training_logs(entries: Sequence[str], methods: Sequence[str]) -> dict[str, Path]:
    """'NAME=LORA_ROOT' entries -> {name: folder}; NAME must be a --generated name, once."""
    roots: dict[str, Path] = {}
    for entry in entries:
        name, separator, folder = entry.partition("=")
        name = name.strip()
        if not separator or not name or not folder:
            raise ValueError(f"--training_logs {entry!r}: expected NAME=LORA_ROOT")
        if name not in methods:
            raise ValueError(
                f"--training_logs {entry!r}: {name!r} is not a --generated name "
                f"({', '.join(methods)})"
            )
        if name in roots:
            raise ValueError(f"--training_logs {name!r} is given twice")
        roots[name] = Path(folder).expanduser()
    return roots


def validate_args(args: argparse.Namespace) -> argparse.Namespace:
    """Readable errors for unusable flag combinations, right after parsing."""
    args.generated_sets = parse_generated(args.generated)
    args.training_log_roots = parse_training_logs(args.training_logs, list(args.generated_sets))
    for name, folder in args.generated_sets.items():
        if not folder.is_dir():
            raise FileNotFoundError(f"--generated {name}: folder {folder} does not exist")
    if args.real is not None and not args.real.is_dir():
        raise FileNotFoundError(f"--real: folder {args.real} does not exist")
    inputs = {f"--generated {name}": folder for name, folder in args.generated_sets.items()}
    if args.real is not None:
        inputs["--real"] = args.real
    for flag, folder in inputs.items():
        if runs.is_inside(args.out, folder) or runs.is_inside(folder, args.out):
            raise ValueError(
                f"--out {args.out} and {flag} {folder} overlap: the report's own files would be "
                "read as images of an identity; write the report to a folder outside the data"
            )
    from features import check_feature_model, no_feature_model

    if no_feature_model(args.feature_model):
        args.feature_model = None
    check_feature_model(args.feature_model)  # offline and not cached: now, not after the rest
    if args.quality_weights is not None:
        from quality import quality_setting

        quality_setting(args.quality_setting)  # ValueError listing the settings
    if args.embedder == "arcface" and args.arcface_weights is None:
        raise ValueError(
            "--embedder arcface needs --arcface_weights (backbone.pth or .onnx); "
            "or use --embedder dlib (offline, dlib's shipped 128-d model)"
        )
    for flag, path in (
        ("--arcface_weights", args.arcface_weights),
        ("--quality_weights", args.quality_weights),
        ("--pose_weights", args.pose_weights),
    ):
        if path is not None and not path.is_file():
            raise FileNotFoundError(f"{flag}: {path} is not a file")
    return args


def log(message: str) -> None:
    """Progress on stderr."""
    print(f"[evaluate] {message}", file=sys.stderr, flush=True)


def _safe(name: str) -> str:
    """File-name-safe version of a model or set name."""
    return re.sub(r"[^A-Za-z0-9_.-]+", "_", name)


# ------------------------------------------------------------------- identity


@dataclass
class EmbeddedSet:
    """One image set with a row and a status per image."""

    image_set: ImageSet
    rows: np.ndarray  # (N, D) embeddings or features
    status: np.ndarray  # (N,) STATUS_* codes

    def usable(self) -> tuple[np.ndarray, list[str]]:
        """(M, D) rows with STATUS_OK and their identity labels."""
        keep = np.flatnonzero(self.status == STATUS_OK)
        return self.rows[keep], [self.image_set.identities[i] for i in keep]


def embed_sets(
    image_sets: dict[str, ImageSet], compute, cache_path: Path, batch_size: int
) -> dict[str, EmbeddedSet]:
    """Run `compute` over every set's files, resuming from / filling the cache."""
    from tqdm import tqdm

    embedded = {}
    for name, image_set in image_sets.items():
        log(f"{cache_path.name}: {name} ({len(image_set.paths)} images)")
        with tqdm(desc=f"{name}: new images", unit="img", file=sys.stderr, disable=None) as bar:

            def advance(done: int, total: int, bar=bar) -> None:
                bar.total = total
                bar.update(done - bar.n)

            rows, status = cached_rows(image_set.paths, compute, cache_path, batch_size, advance)
        embedded[name] = EmbeddedSet(image_set, rows, status)
    return embedded


def cached_per_set(
    image_sets: dict[str, ImageSet], compute, kind: str, model_name: str, args: argparse.Namespace
) -> dict[str, EmbeddedSet]:
    """embed_sets with the cache folder OUT/cache/<kind>-<model name>/."""
    cache_path = args.out / "cache" / f"{kind}-{_safe(model_name)}"
    return embed_sets(image_sets, compute, cache_path, args.batch_size)


def load_sets(args: argparse.Namespace) -> dict[str, ImageSet]:
    """The generated sets (in flag order) and, when given, the real set."""
    image_sets = {
        name: load_image_set(name, root, args.exclude) for name, root in args.generated_sets.items()
    }
    if args.real is not None:
        image_sets[REAL_SET_NAME] = load_image_set(REAL_SET_NAME, args.real, args.exclude)
    return image_sets


NAMES_SHOWN = 5  # identity names listed in a console warning before "..."


def _some(names: Sequence[str]) -> str:
    """The first NAMES_SHOWN names, quoted, then '...' when there are more."""
    shown = ", ".join(map(repr, names[:NAMES_SHOWN]))
    return shown + (", ..." if len(names) > NAMES_SHOWN else "")


def unmatched_identity_notes(generated: ImageSet, real: ImageSet) -> list[str]:
    """Identity names of a generated set and the real set that have no partner in the other
    (they make no synthetic-vs-real genuine pair), with counts; case-only differences named."""
    ours, theirs = set(generated.identities), set(real.identities)
    only_ours, only_real = sorted(ours - theirs), sorted(theirs - ours)
    if not only_ours and not only_real:
        return []
    unmatched = [
        f"{len(names)} only in {where} ({_some(names)})"
        for names, where in ((only_ours, generated.name), (only_real, "--real"))
        if names
    ]
    notes = [
        f"{generated.name}: {len(ours & theirs)} of {len(ours)} identities match a --real "
        f"identity by name; {', '.join(unmatched)}"
    ]
    folded_real = {identity.casefold(): identity for identity in only_real}
    near = [(n, folded_real[n.casefold()]) for n in only_ours if n.casefold() in folded_real]
    if near:
        pairs = ", ".join(f"{ours!r} ~ {real!r}" for ours, real in near[:NAMES_SHOWN])
        notes.append(
            f"{generated.name}: {len(near)} unmatched by letter case only ({pairs}); "
            "rename one side to match them"
        )
    return notes


def identity_name_notes(image_sets: dict[str, ImageSet]) -> list[str]:
    """Name collisions inside each set and names unmatched between generated and real sets."""
    notes = [note for image_set in image_sets.values() for note in image_set.name_notes]
    real = image_sets.get(REAL_SET_NAME)
    if real is not None:
        for name, image_set in image_sets.items():
            if name != REAL_SET_NAME:
                notes += unmatched_identity_notes(image_set, real)
    return notes


# Memory per impostor pair (tracemalloc, 5 M pairs): every comparison's float64 scores (8 B)
# and ROC curves (24 B) are kept for the plots; computing one comparison's metrics and ROC
# (sorting, cumulative counts) peaks at 73 B per pair on top.
SCORE_BYTES = 32
ROC_BYTES = 80


def physical_memory_bytes() -> int | None:
    """This machine's RAM (None where the OS does not say)."""
    try:
        return os.sysconf("SC_PHYS_PAGES") * os.sysconf("SC_PAGE_SIZE")
    except (AttributeError, ValueError, OSError):
        return None


def planned_impostor_pairs(image_sets: dict[str, ImageSet], cap: int | None) -> list[int]:
    """Impostor pairs of every comparison identity_metrics runs, counting every image as a
    face (an upper bound, known before any embedding)."""
    real = image_sets.get(REAL_SET_NAME)
    counts = [metrics.impostor_pair_count(one.identities) for one in image_sets.values()]
    if real is not None:
        counts += [
            metrics.impostor_pair_count(image_set.identities, real.identities)
            for name, image_set in image_sets.items()
            if name != REAL_SET_NAME
        ]
    return [count if cap is None else min(count, cap) for count in counts]


def check_pair_memory(
    image_sets: dict[str, ImageSet], cap: int | None, available: int | None
) -> None:
    """Refuse, before any embedding, impostor scores whose memory exceeds the machine's RAM."""
    counts = planned_impostor_pairs(image_sets, cap)
    need = SCORE_BYTES * sum(counts) + ROC_BYTES * max(counts, default=0)
    if available is None or need <= available:
        return
    sample = "all pairs (--max_impostor_pairs 0)" if cap is None else f"up to {cap} pairs"
    raise ValueError(
        f"identity metrics on {sample}: {sum(counts):,} impostor pairs (the largest comparison "
        f"{max(counts):,}) need about {need / 1e9:.1f} GB for their scores and ROC, more than "
        f"this machine's {available / 1e9:.1f} GB; score a seeded uniform sample instead, e.g. "
        "--max_impostor_pairs 10000000"
    )


def check_before_embedding(image_sets: dict[str, ImageSet], args: argparse.Namespace) -> list[str]:
    """Refuse impostor scores that cannot fit in memory; warn (and return) identity-name notes."""
    check_pair_memory(image_sets, args.max_impostor_pairs or None, physical_memory_bytes())
    notes = identity_name_notes(image_sets)
    for note in notes:
        log(f"warning: {note}")
    return notes


def embed_faces(
    image_sets: dict[str, ImageSet], args: argparse.Namespace
) -> tuple[str, dict[str, EmbeddedSet]]:
    """(embedder name, identity embeddings of every set), cached in OUT/cache."""
    from face_embedding import build_embedder, embed_image_files

    embedder = build_embedder(
        args.embedder, args.arcface_weights, args.face_detector, args.face_models_root, args.device
    )
    faces = cached_per_set(
        image_sets, lambda paths: embed_image_files(embedder, paths), "faces", embedder.name, args
    )
    return embedder.name, faces


def summarise_sets(faces: dict[str, EmbeddedSet]) -> dict[str, dict]:
    """set_summary of every set (role: real or generated)."""
    return {
        name: set_summary("real" if name == REAL_SET_NAME else "generated", entry)
        for name, entry in faces.items()
    }


def set_summary(role: str, faces: EmbeddedSet) -> dict:
    """Counts and lists (no face, unreadable, empty folders) of one set."""
    image_set = faces.image_set
    no_face = image_set.relative(np.flatnonzero(faces.status == STATUS_NO_FACE))
    unreadable = image_set.relative(np.flatnonzero(faces.status == STATUS_UNREADABLE))
    return {
        "role": role,
        "root": str(image_set.root),
        "n_identities": len(set(image_set.identities)),
        "n_images": len(image_set.paths),
        "n_with_face": int(np.sum(faces.status == STATUS_OK)),
        "n_no_face": len(no_face),
        "no_face": no_face,
        "n_unreadable": len(unreadable),
        "unreadable": unreadable,
        "empty_identities": image_set.empty_identities,
        "excluded": image_set.excluded,
        "loose_files": image_set.loose_files,
    }


def _scores_or_reason(
    faces_a: EmbeddedSet, faces_b: EmbeddedSet | None, cap: int | None, seed: int
) -> tuple[tuple[np.ndarray, np.ndarray] | None, str | None]:
    """Genuine/impostor scores within A (faces_b None) or A vs B, or why there are none."""
    embeddings_a, labels_a = faces_a.usable()
    if faces_b is None:
        if not labels_a:
            return None, "no image with a detected face"
        genuine, impostor = metrics.within_set_scores(embeddings_a, labels_a, cap, seed)
    else:
        embeddings_b, labels_b = faces_b.usable()
        if not labels_a or not labels_b:
            return None, "no image with a detected face in one of the sets"
        if not set(labels_a) & set(labels_b):
            return None, "no identity name is shared by the two sets"
        genuine, impostor = metrics.cross_set_scores(
            embeddings_a, labels_a, embeddings_b, labels_b, cap, seed
        )
    if genuine.size == 0:
        return None, "no genuine pair (each identity has fewer than two images with a face)"
    if impostor.size == 0:
        return None, "no impostor pair (only one identity has images with a face)"
    return (genuine, impostor), None


def identity_metrics(
    faces: dict[str, EmbeddedSet], generated: Sequence[str], args: argparse.Namespace
) -> tuple[dict, dict]:
    """{comparison: {set: metrics or {'skipped': why}}} and the scores behind them."""
    cap = args.max_impostor_pairs or None
    real = faces.get(REAL_SET_NAME)
    plans = {"synthetic_vs_synthetic": [(name, faces[name], None) for name in generated]}
    if real is not None:
        plans["synthetic_vs_real"] = [(name, faces[name], real) for name in generated]
        plans["real_vs_real"] = [(REAL_SET_NAME, real, None)]
    results: dict[str, dict] = {}
    scores: dict[str, dict] = {}
    for comparison, plan in plans.items():
        results[comparison], scores[comparison] = {}, {}
        for name, faces_a, faces_b in plan:
            pair_scores, reason = _scores_or_reason(faces_a, faces_b, cap, args.seed)
            if pair_scores is None:
                results[comparison][name] = {"skipped": reason}
                continue
            scores[comparison][name] = pair_scores
            results[comparison][name] = metrics.verification_metrics(
                *pair_scores, args.fmr_targets, args.fnmr_targets
            )
    return results, scores


# ------------------------------------------------------------ diversity/fidelity


def diversity_metrics(features: dict[str, EmbeddedSet]) -> dict:
    """Vendi per identity for every set."""
    return {name: metrics.vendi_per_identity(*entry.usable()) for name, entry in features.items()}


def _guarded(function, *arguments, **keywords) -> dict:
    """function(...) or {'skipped': message} when the data are too small for it."""
    try:
        return function(*arguments, **keywords)
    except ValueError as error:
        return {"skipped": str(error)}


def fidelity_metrics(
    features: dict[str, EmbeddedSet], generated: Sequence[str], args: argparse.Namespace
) -> dict:
    """FD, KD and PRDC of each generated set against the real set."""
    real, _ = features[REAL_SET_NAME].usable()
    results = {}
    for name in generated:
        fake, _ = features[name].usable()
        results[name] = {
            "frechet_distance": _guarded(metrics.frechet_distance_features, real, fake),
            "kernel_distance": _guarded(
                metrics.kernel_distance,
                real,
                fake,
                args.kd_subsets,
                args.kd_subset_size,
                args.seed,
            ),
            "prdc": _guarded(
                metrics.prdc_dgm_eval,
                real,
                fake,
                args.prdc_k,
                args.prdc_max_samples,
                args.seed,
            ),
        }
    return results


def feature_sections(
    image_sets: dict[str, ImageSet], generated: Sequence[str], args: argparse.Namespace
) -> tuple[dict, dict, str | None]:
    """(diversity, fidelity, feature model name), or skip notes without --feature_model."""
    if args.feature_model is None:
        note = "no --feature_model given (a DINOv2 folder or hub id, e.g. facebook/dinov2-large)"
        return {"skipped": note}, {"skipped": note}, None
    from features import FeatureExtractor, extract_image_features

    extractor = FeatureExtractor(
        args.feature_model, args.device, args.feature_protocol, args.feature_image_size
    )
    features = cached_per_set(
        image_sets,
        lambda paths: extract_image_features(extractor, paths),
        "features",
        extractor.name,
        args,
    )
    diversity = diversity_metrics(features)
    if REAL_SET_NAME in features:
        fidelity = fidelity_metrics(features, generated, args)
    else:
        fidelity = {"skipped": "no --real folder given"}
    return diversity, fidelity, extractor.name


# ------------------------------------------------------- grids, quality, pose, training

QUALITY_NOT_COMPUTED = (
    "not computed: pass --quality_weights PATH, an official CR-FIQA checkpoint: CR-FIQA(S) "
    "32572backbone.pth (iresnet50, CASIA-WebFace) or CR-FIQA(L) 181952backbone.pth (iresnet100, "
    "MS1MV2), Google Drive folders linked under 'Pretrained model' in github.com/fdbtrs/CR-FIQA; "
    "licence CC BY-NC 4.0 (Fraunhofer IGD): non-commercial research use only"
)


def grid_section(
    image_sets: dict[str, ImageSet], generated: Sequence[str], args: argparse.Namespace
) -> tuple[dict, dict[str, dict[str, bytes]]]:
    """(files shown per method and identity, {set: {file: thumbnail JPEG}})."""
    from grids import build_grids

    return build_grids(
        image_sets, list(generated), REAL_SET_NAME, args.grid_images, args.grid_identities
    )


def status_counts(entry: EmbeddedSet) -> dict:
    """Images, those without a face (listed) and unreadable ones of one set."""
    no_face = np.flatnonzero(entry.status == STATUS_NO_FACE)
    return {
        "n_images": len(entry.status),
        "n_no_face": len(no_face),
        "no_face": entry.image_set.relative(no_face),
        "n_unreadable": int(np.sum(entry.status == STATUS_UNREADABLE)),
    }


def quality_section(
    image_sets: dict[str, ImageSet], args: argparse.Namespace
) -> tuple[dict, dict[str, np.ndarray]]:
    """CR-FIQA score summary per set and the finite scores behind it (cached in OUT/cache)."""
    if args.quality_weights is None:
        return {"skipped": QUALITY_NOT_COMPUTED}, {}
    from quality import build_quality_scorer, quality_setting, quality_summary, score_image_files

    scorer = build_quality_scorer(
        args.quality_weights,
        args.face_detector,
        args.face_models_root,
        args.device,
        args.batch_size,
        args.quality_setting,
    )
    scored = cached_per_set(
        image_sets, lambda paths: score_image_files(scorer, paths), "quality", scorer.name, args
    )
    sets, scores = {}, {}
    for name, entry in scored.items():
        values = entry.usable()[0][:, 0]
        summary = _guarded(quality_summary, entry.rows, entry.status)
        sets[name] = {**status_counts(entry), **summary}
        scores[name] = values[np.isfinite(values)]
    section = {
        "model": scorer.name,
        "weights": str(args.quality_weights),
        "setting": args.quality_setting,
        "setting_description": quality_setting(args.quality_setting).description,
        "channel_order": scorer.channel_order,
        "sets": sets,
    }
    return section, scores


def pose_section(
    image_sets: dict[str, ImageSet], args: argparse.Namespace
) -> tuple[dict, dict[str, tuple[np.ndarray, list[str]]]]:
    """Pose spread per set and its (angles (N, 3), identities) of the faces found."""
    if not args.pose:
        return {"skipped": "--no-pose given"}, {}
    from pose import ANGLE_NAMES, build_pose_estimator, estimate_pose_files, pose_spread

    estimator = build_pose_estimator(
        args.pose_weights, args.face_detector, args.face_models_root, args.device, args.batch_size
    )
    posed = cached_per_set(
        image_sets,
        lambda paths: estimate_pose_files(estimator, paths),
        "pose",
        estimator.name,
        args,
    )
    sets, angles = {}, {}
    for name, entry in posed.items():
        angles[name] = entry.usable()
        found = entry.image_set.relative(np.flatnonzero(entry.status == STATUS_OK))
        sets[name] = {
            **status_counts(entry),
            **pose_spread(*angles[name]),
            "per_image": dict(zip(found, angles[name][0].tolist(), strict=True)),
        }
    section = {
        "estimator": estimator.name,
        "comparable_with_paper": estimator.comparable_with_paper,
        "angle_order": list(ANGLE_NAMES),
        "sets": sets,
    }
    return section, angles


def training_section(args: argparse.Namespace) -> tuple[dict, dict[str, dict]]:
    """Per method: its identities' TensorBoard curve summaries, and the curves themselves."""
    if not args.training_log_roots:
        return {"skipped": "no --training_logs NAME=LORA_ROOT given"}, {}
    from training_logs import read_training_logs

    methods, curves = {}, {}
    for name, root in args.training_log_roots.items():
        methods[name], curves[name] = read_training_logs(root)
    return {"methods": methods}, curves


# ---------------------------------------------------------------------- output


def drawn(key: str, build: Callable[..., object], *arguments: object) -> dict[str, bytes]:
    """{key: PNG bytes} of the figure build(*arguments), or {} with a warning naming the figure
    when drawing it fails: a plot illustrates the metrics, losing one must not lose the run."""
    import report

    try:
        return {key: report.figure_png(build(*arguments))}
    except Exception as error:  # matplotlib's text and layout engines raise many types
        log(f"warning: figure {key} not drawn ({type(error).__name__}: {error})")
        return {}


def identity_figures(identity_scores: dict, identity: dict) -> dict[str, bytes]:
    """PNG bytes of the score histograms, ROC and DET curves, keyed '<comparison>_<kind>'."""
    import report

    figures = {}
    for comparison, by_method in identity_scores.items():
        if not by_method:
            continue
        title = report.COMPARISON_TITLES.get(comparison, comparison)
        rocs = {name: metrics.roc_curve(*pair) for name, pair in by_method.items()}
        thresholds = {name: identity[comparison][name]["eer_threshold"] for name in by_method}
        histogram = report.score_histogram_figure
        figures |= drawn(f"{comparison}_hist", histogram, by_method, thresholds, title)
        figures |= drawn(f"{comparison}_roc", report.roc_figure, rocs, title)
        figures |= drawn(f"{comparison}_det", report.det_figure, rocs, title)
    return figures


def diversity_figures(diversity: dict) -> dict[str, bytes]:
    """PNG bytes of the per-identity Vendi box plot (none when diversity was skipped)."""
    import report

    if "skipped" in diversity:
        return {}
    if not any(report.vendi_values(diversity).values()):
        diversity_note = "no identity has a Vendi score: no box plot to draw"
        for entry in diversity.values():
            entry["figure_note"] = diversity_note
        return {}
    return drawn("vendi", report.vendi_figure, diversity, "Vendi score")


MAX_KEY_NAME = 60  # characters of a set name kept in a plot's file name (any folder takes it)


def figure_keys(prefix: str, names: Sequence[str]) -> dict[str, str]:
    """{name: '<prefix>_<safe name>'} (plots/<key>.png), distinct even where safe names clash;
    a long name is cut and given a hash of the whole, so the file name stays short."""
    keys: dict[str, str] = {}
    for name in names:
        safe = _safe(name)
        if len(safe) > MAX_KEY_NAME:
            digest = hashlib.sha256(name.encode("utf-8", "surrogatepass")).hexdigest()[:10]
            safe = f"{safe[:MAX_KEY_NAME]}-{digest}"
        key = f"{prefix}_{safe}"
        while key in keys.values():
            key += "_"
        keys[name] = key
    return keys


def quality_figures(quality: dict, scores: dict[str, np.ndarray]) -> dict[str, bytes]:
    """PNG of the CR-FIQA score histograms (none when quality was not computed)."""
    import report

    if "skipped" in quality:
        return {}
    if not any(len(values) for values in scores.values()):
        quality["figure_note"] = "no face was scored in any set: no histogram to draw"
        return {}
    figures = drawn("quality_hist", report.quality_figure, scores, quality["model"])
    if figures:
        quality["figure"] = "quality_hist"
    return figures


def pose_figures(pose: dict, angles: dict[str, tuple[np.ndarray, list[str]]]) -> dict[str, bytes]:
    """PNG of a yaw-vs-pitch scatter per set on one shared axis range; each set's entry names
    its figure, or says why it has none."""
    import report

    figures = {}
    limits = report.pose_axis_limits([rows for rows, _ in angles.values()])
    for name, key in figure_keys("pose", list(angles)).items():
        if not len(angles[name][0]):
            pose["sets"][name]["figure_note"] = "no face found: no pose to plot"
            continue
        figures |= drawn(key, report.pose_scatter_figure, *angles[name], name, limits)
        if key in figures:
            pose["sets"][name]["figure"] = key
    return figures


def training_figures(training: dict, curves: dict[str, dict]) -> dict[str, bytes]:
    """PNG of each method's loss curves (a panel per term, a line per identity)."""
    import report

    figures = {}
    for name, key in figure_keys("training", list(curves)).items():
        if not curves[name]:
            continue
        figures |= drawn(key, report.training_figure, curves[name], name)
        if key in figures:
            training["methods"][name]["figure"] = key
    return figures


def data_notes(sets: dict[str, dict]) -> list[str]:
    """One line per set with images that did not enter the metrics, and why."""
    notes = []
    for name, summary in sets.items():
        if summary["n_no_face"]:
            notes.append(
                f"{name}: {summary['n_no_face']} of {summary['n_images']} images without a "
                "detected face (left out of the identity metrics, listed below)"
            )
        if summary["n_unreadable"]:
            notes.append(f"{name}: {summary['n_unreadable']} unreadable images (listed below)")
        if summary["loose_files"]:
            notes.append(
                f"{name}: {len(summary['loose_files'])} images outside identity folders "
                "were not evaluated (listed below)"
            )
    return notes


def run_config(args: argparse.Namespace) -> dict:
    """The resolved configuration stored with the results."""
    config = {key: value for key, value in vars(args).items() if key not in ("generated",)}
    config["generated_sets"] = {name: str(path) for name, path in args.generated_sets.items()}
    config["python"] = platform.python_version()
    config["numpy"] = np.__version__
    return config


def resolve_device(device: str | None) -> str:
    """The requested torch device, or cuda when available, else cpu."""
    if device is not None:
        return device
    import torch

    return "cuda" if torch.cuda.is_available() else "cpu"


FR_UTILITY_NEEDS = (
    "Not computed: it needs verification .bin files (LFW, CFP-FP, AgeDB-30, CALFW, CPLFW; "
    "see README, Face-recognition utility): reproduce_ID-Booth.py --fr_benchmarks DIR."
)


def fr_utility_results(path: Path | None) -> dict:
    """The FR-utility table written by Evaluation/fr_utility.py, or why there is none."""
    if path is None:
        return {"skipped": FR_UTILITY_NEEDS}
    if not path.is_file():
        return {"skipped": f"{path} does not exist (the FR-utility stage did not finish)"}
    return json.loads(path.read_text())


def main(args: argparse.Namespace) -> dict:
    """Embed, score, measure; write metrics.json, report.html and plots/*.png."""
    import report

    args.device = resolve_device(args.device)
    generated = list(args.generated_sets)
    image_sets = load_sets(args)
    name_notes = check_before_embedding(image_sets, args)
    embedder_name, faces = embed_faces(image_sets, args)
    identity, identity_scores = identity_metrics(faces, generated, args)
    diversity, fidelity, feature_name = feature_sections(image_sets, generated, args)
    grids, thumbnails = grid_section(image_sets, generated, args)
    quality, quality_scores = quality_section(image_sets, args)
    pose, pose_angles = pose_section(image_sets, args)
    training, curves = training_section(args)
    sets = summarise_sets(faces)
    set_notes = data_notes(sets)
    notes = name_notes + set_notes  # the name notes were logged before the embedding
    figures = {
        **identity_figures(identity_scores, identity),
        **diversity_figures(diversity),
        **quality_figures(quality, quality_scores),
        **pose_figures(pose, pose_angles),
        **training_figures(training, curves),
    }
    results = {
        "banner": args.banner,
        "config": run_config(args),
        "embedder": embedder_name,
        "feature_model": feature_name,
        "definitions": metrics.definitions_with_directions(),
        "directions": metrics.METRIC_DIRECTIONS,
        "sets": sets,
        "grids": grids,
        "identity": identity,
        "diversity": diversity,
        "fidelity": fidelity,
        "quality": quality,
        "pose": pose,
        "training": training,
        "fr_utility": fr_utility_results(args.fr_utility),
        "notes": notes,
    }
    for key, png in figures.items():
        atomic_write_bytes(args.out / "plots" / f"{key}.png", png)
    atomic_write_json(args.out / "metrics.json", runs.json_safe(results), allow_nan=False)
    page = report.render_report(results, figures, thumbnails)
    atomic_write_bytes(args.out / "report.html", page.encode())
    for note in set_notes:
        log(note)
    log(f"wrote {args.out / 'metrics.json'} and {args.out / 'report.html'}")
    return results


if __name__ == "__main__":
    runs.run_cli("evaluate.py", parse_args, main)
