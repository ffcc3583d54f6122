"""Train a face-recognition IResNet with a margin head on image folders (FR utility).

Data: one sub-folder per identity under each `--data_dir` (real, synthetic, or several
roots mixed). By default identities MERGE BY FOLDER NAME across roots, because the usual
augmentation in ID-Booth trains on real + synthetic images of the SAME people;
`--keep_roots_apart` labels each root's folders separately instead.

Every image is prepared ONCE into an aligned 112x112 uint8 array on disk (`--prepared_dir`,
reused while the file list and options are unchanged): 112x112 images are taken as already
aligned (ID-Booth's and insightface's datasets are), others are detected and aligned with
arcface's 5-point template (`--align`). Unreadable images, images without a face, and
identity folders left with no image are skipped, counted and listed. An identity with a
single image is kept.

Training (AdaFace's recipe, Kim et al. 2022): random horizontal flip, pixels to [-1, 1],
SGD (lr 0.1, momentum 0.9, weight decay 5e-4 except BatchNorm parameters), lr x0.1 at
epochs 12, 20, 24 of 26 (or on a plateau of the epoch's mean loss), mixed precision via
accelerate. The data order and flips of epoch e come from a generator seeded with
(seed, e) and the step uses no other randomness, so a resumed run reproduces an
uninterrupted one exactly.

The official ID-Booth protocol (dariant/ID-Booth FR_training/train_FR.py) is available by flags
and is what reproduce_ID-Booth.py uses: after every epoch the `--eval_bin` sets are verified,
`--lr_scheduler benchmark` lowers the lr x0.1 when their mean accuracy has not improved for
`--plateau_patience 4` checks (ReduceLROnPlateau, mode max), `--early_stopping_epochs 6` ends
training 6 epochs after the best one, and `--select_best` makes backbone.pth the weights of
the best epoch (the official best_backbone.pth). The best weights travel in every checkpoint,
so a resumed run selects as an uninterrupted one does.

Outputs in `--output_dir`: `backbone.pth` (arcface_torch state dict, loadable by
`arcface.load_iresnet`), `config.json` (resolved settings, identities, skip report),
`train_log.jsonl`, `checkpoint-<step>/` (state dicts read back with weights_only=True),
and `verification.json` when `--eval_bin` files are given.

Run (exported faces of a generated set; README "FR utility: from generated images to the
verification table" gives the paper's protocol flags):

    python Evaluation/train_fr.py --data_dir faces/fr-triplet --output_dir fr/triplet
"""

from __future__ import annotations

import argparse
import hashlib
import json
import logging
import sys
import time
from collections.abc import Callable, Iterator, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import asdict, dataclass, field
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # shared modules at the repo root

import runs  # noqa: E402
from faces import FACE_DETECTOR_NAMES  # noqa: E402
from fileio import (  # noqa: E402
    atomic_path,
    atomic_write_json,
    atomic_write_text,
    remove_stale_temps,
    stable_seed,
)
from margin_heads import MARGIN_HEADS, MarginHead, build_margin_head  # noqa: E402

logger = logging.getLogger("train_fr")

FACE_SIZE = 112
PREPARED_FORMAT_VERSION = 1
HEAD_DEFAULT_MARGINS = {"adaface": 0.4, "arcface": 0.5, "cosface": 0.4}
ALIGN_MODES = ("auto", "always", "never")
LR_SCHEDULERS = ("step", "plateau", "benchmark")
# Arguments that may differ between a checkpoint and the run resuming it (where outputs go, how
# often they are written, worker counts, verification sets, data paths whose images are compared
# by dataset_fingerprint, and the length: the step and plateau schedules do not depend on it, so
# a run may be extended); every other one must match. Under the benchmark protocol the
# verification sets and their interval steer training, so they must match too.
RESUME_MAY_CHANGE = frozenset(
    (
        "num_epochs",
        "max_train_steps",
        "output_dir",
        "resume_from_checkpoint",
        "prepared_dir",
        "data_dirs",
        "dataloader_num_workers",
        "log_every",
        "checkpointing_steps",
        "checkpoints_total_limit",
        "eval_bins",
        "eval_every_epochs",
        "eval_batch_size",
    )
)
TRAINING_STATE_NAME = "training_state.pt"
BEST_BACKBONE_NAME = "best_backbone.pth"
BENCHMARK_STEERED = frozenset(("eval_bins", "eval_every_epochs"))


# ----------------------------------------------------------------------------- data


@dataclass
class PreparationSkips:
    """Counted, named skips of the data preparation (no silent data loss)."""

    unreadable: list[str] = field(default_factory=list)
    no_face: list[str] = field(default_factory=list)
    not_aligned_size: list[str] = field(default_factory=list)
    empty_identities: list[str] = field(default_factory=list)
    ignored_files: list[str] = field(default_factory=list)

    def counts(self) -> dict[str, int]:
        return {name: len(items) for name, items in asdict(self).items()}

    def log(self) -> None:
        """One warning naming every skip (first 20 of each kind)."""
        for reason, items in asdict(self).items():
            if items:
                shown = ", ".join(items[:20]) + (" ..." if len(items) > 20 else "")
                logger.warning("skipped %d (%s): %s", len(items), reason, shown)


# inference_ID-Booth.py's records beside the identity folders of a generated set (its
# METADATA_NAME and RUN_CONFIG_NAME): expected there, so not named as ignored files.
GENERATION_RECORDS = frozenset(("metadata.jsonl", "run_config.json"))


def refuse_folder_of_sets(root: Path, folders: list[Path]) -> None:
    """ValueError when every folder of `root` holds only folders (no images): `root` is a
    folder of datasets, e.g. reproduce_ID-Booth.py's generated/ with one set per variant, and
    would otherwise give 'no images found' without saying which folder to pass."""
    from datasets import subfolders_note

    if not folders or not all(subfolders_note(folder) for folder in folders):
        return
    names = runs.format_list(folder.name for folder in folders)
    raise ValueError(
        f"--data_dir {root} holds folders of identity folders ({names}), "
        "not identity folders (a folder of generated sets, one per variant?): pass one of them, "
        f"e.g. --data_dir {folders[0]}"
    )


def scan_identity_folders(
    data_dirs: Sequence[str | Path], keep_roots_apart: bool = False
) -> tuple[dict[str, list[Path]], PreparationSkips]:
    """Roots -> {identity key: sorted image paths}; key = folder name (merged) or folder path."""
    from datasets import IMAGE_EXTENSIONS

    extensions = {e.lower() for e in IMAGE_EXTENSIONS}
    identities: dict[str, list[Path]] = {}
    skips = PreparationSkips()
    for root in map(Path, data_dirs):
        if not root.is_dir():
            raise FileNotFoundError(
                f"--data_dir {root} is not a folder (one sub-folder per identity)"
            )
        skips.ignored_files.extend(
            str(entry)
            for entry in sorted(root.iterdir())
            if entry.is_file() and entry.name[0] != "." and entry.name not in GENERATION_RECORDS
        )
        refuse_folder_of_sets(root, runs.identity_folders(root))
        for entry in runs.identity_folders(root):
            key = str(entry) if keep_roots_apart else entry.name
            files = sorted(p for p in entry.iterdir() if p.is_file() and not p.name.startswith("."))
            images = [p for p in files if p.suffix.lower() in extensions]
            skips.ignored_files.extend(str(p) for p in files if p.suffix.lower() not in extensions)
            identities.setdefault(key, []).extend(images)
    for key in sorted(identities):
        if not identities[key]:
            skips.empty_identities.append(key)
            del identities[key]
    if not identities:
        raise ValueError(
            f"no images found under {[str(d) for d in data_dirs]}: each --data_dir must hold one "
            f"sub-folder per identity with images ({', '.join(sorted(extensions))})"
        )
    return dict(sorted(identities.items())), skips


def dataset_fingerprint(identities: dict[str, list[Path]], align: str, detector: str) -> str:
    """sha256 over (identity, path, size, mtime) of every image and the alignment settings."""
    digest = hashlib.sha256(f"v{PREPARED_FORMAT_VERSION}|{align}|{detector}".encode())
    for key, paths in identities.items():
        for path in paths:
            stat = path.stat()
            digest.update(f"{key}|{path.resolve()}|{stat.st_size}|{stat.st_mtime_ns}\n".encode())
    return digest.hexdigest()


@dataclass
class PreparedFaces:
    """Aligned faces on disk (rows [0, N) of faces.npy, (·, 112, 112, 3) uint8 RGB), labels (N,)."""

    faces_path: Path
    labels: np.ndarray
    identities: list[str]
    skips: dict[str, list[str]]
    fingerprint: str = ""  # dataset_fingerprint of the images it was prepared from

    def open_faces(self) -> np.ndarray:
        """Memory-map the faces: (N, 112, 112, 3) uint8, read lazily."""
        return np.load(self.faces_path, mmap_mode="r")[: len(self.labels)]


def _read_rgb(path: Path) -> np.ndarray | None:
    """(H, W, 3) uint8 RGB via the shared loader, or None when the file cannot be decoded."""
    from datasets import UnreadableImageError, load_rgb_image

    try:
        return np.asarray(load_rgb_image(path), dtype=np.uint8)
    except UnreadableImageError:
        return None


def _decode_in_threads(
    items: list[tuple[str, Path]], num_threads: int, chunk: int = 512
) -> Iterator[np.ndarray | None]:
    """Decoded images in order; a bounded chunk at a time so memory stays flat on big sets."""
    with ThreadPoolExecutor(max_workers=max(1, num_threads)) as pool:  # decoding releases the GIL
        for start in range(0, len(items), chunk):
            yield from pool.map(_read_rgb, [path for _, path in items[start : start + chunk]])
            if start + chunk < len(items) and (start // chunk) % 10 == 9:
                logger.info("prepared %d / %d images", start + chunk, len(items))


def _align_or_skip(
    image: np.ndarray, path: Path, align: str, get_detector: Callable, skips: PreparationSkips
) -> np.ndarray | None:
    """Return the 112x112 aligned face of one image or record why it was skipped."""
    already_aligned_size = image.shape[:2] == (FACE_SIZE, FACE_SIZE)
    if align == "never" or (align == "auto" and already_aligned_size):
        if already_aligned_size:
            return image
        skips.not_aligned_size.append(str(path))
        return None
    from faces import align_face

    landmarks = get_detector().detect_landmarks(image)
    if landmarks is None:
        skips.no_face.append(str(path))
        return None
    return align_face(image, landmarks, size=FACE_SIZE)


def prepare_faces(
    identities: dict[str, list[Path]],
    prepared_dir: Path,
    align: str,
    get_detector: Callable,
    detector_name: str,
    scan_skips: PreparationSkips,
    num_threads: int = 4,
) -> PreparedFaces:
    """Decode + align every image once into `prepared_dir` (reused when the fingerprint matches)."""
    fingerprint = dataset_fingerprint(identities, align, detector_name)
    manifest_path = prepared_dir / "manifest.json"
    if manifest_path.is_file():
        manifest = json.loads(manifest_path.read_text())
        if manifest.get("fingerprint") == fingerprint:
            logger.info("reusing prepared faces in %s", prepared_dir)
            return _open_prepared(prepared_dir, manifest)
    prepared_dir.mkdir(parents=True, exist_ok=True)
    manifest_path.unlink(missing_ok=True)  # files below are replaced; no stale manifest meanwhile
    remove_stale_temps(prepared_dir)  # the partial faces.npy of a killed preparation
    logger.info("preparing aligned faces in %s (align=%s)", prepared_dir, align)
    skips = PreparationSkips(**{k: list(v) for k, v in asdict(scan_skips).items()})
    items = [(key, path) for key, paths in identities.items() for path in paths]
    with atomic_path(prepared_dir / "faces.npy") as faces_tmp:
        faces = np.lib.format.open_memmap(
            faces_tmp, mode="w+", dtype=np.uint8, shape=(len(items), FACE_SIZE, FACE_SIZE, 3)
        )
        kept_keys: list[str] = []
        for (key, path), image in zip(items, _decode_in_threads(items, num_threads), strict=True):
            if image is None:
                skips.unreadable.append(str(path))
                continue
            face = _align_or_skip(image, path, align, get_detector, skips)
            if face is not None:
                faces[len(kept_keys)] = face
                kept_keys.append(key)
        faces.flush()
        del faces
        skips.empty_identities.extend(sorted(set(identities) - set(kept_keys)))
        if not kept_keys:
            skips.log()
            raise ValueError(f"every image was skipped ({skips.counts()}); nothing to train on")
    manifest = {"fingerprint": fingerprint, "align": align, "face_detector": detector_name}
    return _finish_prepared(prepared_dir, kept_keys, skips, manifest)


def _finish_prepared(
    prepared_dir: Path, kept_keys: list[str], skips: PreparationSkips, manifest: dict
) -> PreparedFaces:
    """Dense labels over identities that kept an image, then the manifest (written last)."""
    identity_names = sorted(set(kept_keys))
    label_of = {name: label for label, name in enumerate(identity_names)}
    labels = np.array([label_of[k] for k in kept_keys], dtype=np.int64)
    with atomic_path(prepared_dir / "labels.npy") as labels_tmp, labels_tmp.open("wb") as handle:
        np.save(handle, labels)
    manifest = {
        **manifest,
        "num_faces": len(kept_keys),
        "identities": identity_names,
        "skips": asdict(skips),
    }
    atomic_write_json(prepared_dir / "manifest.json", manifest)
    return _open_prepared(prepared_dir, manifest)


def _open_prepared(prepared_dir: Path, manifest: dict) -> PreparedFaces:
    """faces.npy rows past num_faces were reserved for images that were then skipped."""
    labels = np.load(prepared_dir / "labels.npy")
    if len(labels) != manifest["num_faces"]:
        raise ValueError(f"{prepared_dir} is inconsistent; delete it to prepare the faces again")
    return PreparedFaces(
        prepared_dir / "faces.npy",
        labels,
        manifest["identities"],
        manifest["skips"],
        manifest["fingerprint"],
    )


class EpochBatches(torch.utils.data.Dataset):
    """Batch k of epoch e for one process: (faces (B,112,112,3) uint8, labels (B,), flips (B,))."""

    def __init__(self, prepared: PreparedFaces, batch_size: int, seed: int, rank=0, world_size=1):
        self.prepared = prepared
        self._faces: np.ndarray | None = None  # memory map, opened in each worker process
        self.labels = torch.from_numpy(prepared.labels)
        self.batch_size = batch_size
        self.seed = seed
        self.rank = rank
        self.world_size = world_size
        self.set_epoch(0)

    @property
    def global_batch_size(self) -> int:
        return self.batch_size * self.world_size

    def steps_per_epoch(self) -> int:
        """Full global batches per epoch (the last partial one is dropped, as insightface does)."""
        return len(self.labels) // self.global_batch_size

    def set_epoch(self, epoch: int) -> None:
        """Order and flips of an epoch depend only on (seed, epoch)."""
        generator = torch.Generator().manual_seed(stable_seed(self.seed, "epoch", epoch))
        self.order = torch.randperm(len(self.labels), generator=generator)
        self.flips = torch.rand(len(self.labels), generator=generator) < 0.5

    def __len__(self) -> int:
        return self.steps_per_epoch()

    def __getstate__(self) -> dict:
        return {**self.__dict__, "_faces": None}  # workers re-open the map, never copy it

    @property
    def faces(self) -> np.ndarray:
        if self._faces is None:
            self._faces = self.prepared.open_faces()
        return self._faces

    def __getitem__(self, step: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        start = step * self.global_batch_size + self.rank * self.batch_size
        positions = self.order[start : start + self.batch_size]
        sorted_rows, inverse = np.unique(positions.numpy(), return_inverse=True)  # sequential reads
        faces = torch.from_numpy(np.ascontiguousarray(self.faces[sorted_rows][inverse]))
        return faces, self.labels[positions], self.flips[start : start + self.batch_size]


def batches_from(
    dataset: EpochBatches, first_step: int, num_workers: int
) -> Iterator[tuple[torch.Tensor, torch.Tensor, torch.Tensor]]:
    """Prefetching iterator over the epoch's batches from `first_step` on."""
    loader = torch.utils.data.DataLoader(
        dataset,
        batch_size=None,
        sampler=range(first_step, len(dataset)),
        num_workers=num_workers,
        pin_memory=torch.cuda.is_available(),
    )
    return iter(loader)


# ----------------------------------------------------------------------------- model


class FaceRecognitionModel(nn.Module):
    """Backbone + margin head in one module (one DDP wrap): images, labels -> logits (B, C)."""

    def __init__(self, backbone: nn.Module, head: MarginHead):
        super().__init__()
        self.backbone = backbone
        self.head = head

    def forward(self, images: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
        embeddings = self.backbone(images)  # (B, 512) raw: AdaFace reads their norms
        return self.head(embeddings, labels)


def build_model(args: argparse.Namespace, num_classes: int) -> FaceRecognitionModel:
    """IResNet from arcface.build_iresnet + margin head with the paper's settings."""
    from arcface import build_iresnet

    backbone = build_iresnet(args.backbone, num_features=args.embedding_size)
    head_kwargs = {"scale": args.scale, "margin": args.margin}
    if args.head == "adaface":
        head_kwargs.update(h=args.adaface_h, t_alpha=args.adaface_t_alpha)
    head = build_margin_head(args.head, args.embedding_size, num_classes, **head_kwargs)
    return FaceRecognitionModel(backbone, head)


def parameter_groups(
    model: FaceRecognitionModel, weight_decay: float, decay_batchnorm: bool = False
) -> list[dict]:
    """AdaFace's split: weight decay on all trainable weights except BatchNorm's; with
    decay_batchnorm, on every trainable weight (the ID-Booth FR protocol's plain SGD)."""
    decay, no_decay = [], []
    for module in model.modules():
        if isinstance(module, nn.modules.batchnorm._BatchNorm) and not decay_batchnorm:
            no_decay.extend(p for p in module.parameters(recurse=False) if p.requires_grad)
        else:
            decay.extend(p for p in module.parameters(recurse=False) if p.requires_grad)
    return [
        {"params": decay, "weight_decay": weight_decay},
        {"params": no_decay, "weight_decay": 0},
    ]


def build_lr_schedule(optimizer: torch.optim.Optimizer, args: argparse.Namespace):
    """Epoch-wise schedule: MultiStepLR(milestones, gamma), ReduceLROnPlateau on the epoch's
    mean loss (plateau) or on the mean verification accuracy (benchmark, the official one)."""
    if args.lr_scheduler == "step":
        return torch.optim.lr_scheduler.MultiStepLR(optimizer, args.lr_milestones, args.lr_gamma)
    return torch.optim.lr_scheduler.ReduceLROnPlateau(
        optimizer,
        mode="max" if args.lr_scheduler == "benchmark" else "min",
        factor=args.lr_gamma,
        patience=args.plateau_patience,
    )


def follows_benchmark(args: argparse.Namespace) -> bool:
    """Whether verification accuracy steers training (the official protocol, or part of it)."""
    return args.lr_scheduler == "benchmark" or args.early_stopping_epochs > 0 or args.select_best


def to_model_input(faces: torch.Tensor, flips: torch.Tensor) -> torch.Tensor:
    """(B,112,112,3) uint8, (B,) bool flips -> (B,3,112,112) in [-1,1], flagged rows mirrored."""
    from arcface import images_to_arcface_input  # the preprocessing every recogniser here uses

    images = images_to_arcface_input(faces)
    return torch.where(flips[:, None, None, None], images.flip(3), images)


def training_step(
    model: nn.Module, optimizer: torch.optim.Optimizer, accelerator, batch, max_grad_norm: float
) -> torch.Tensor:
    """One SGD step on a prepared batch; returns the detached loss without a host sync."""
    faces, labels, flips = batch
    images = to_model_input(faces, flips)
    with accelerator.autocast():
        logits = model(images, labels)
    loss = F.cross_entropy(logits.float(), labels)
    accelerator.backward(loss)
    if max_grad_norm > 0:
        accelerator.clip_grad_norm_(model.parameters(), max_grad_norm)
    optimizer.step()
    optimizer.zero_grad(set_to_none=True)
    return loss.detach()


# ----------------------------------------------------------------------------- state


@dataclass
class TrainState:
    """Where training stands; saved in every checkpoint."""

    global_step: int = 0
    epoch: int = 0
    step_in_epoch: int = 0
    epoch_loss_sum: float = 0.0
    epoch_loss_count: int = 0
    # benchmark protocol: best mean verification accuracy so far, its epoch, whether it stopped
    best_accuracy: float = -1.0
    best_epoch: int = -1
    stopped_early: bool = False


def save_checkpoint(run: Run) -> Path:
    """Write checkpoint-<step>/ atomically (temp folder + os.replace); prune beyond the limit."""
    check_finite(run, f"checkpoint-{run.state.global_step} was not written")
    scaler = getattr(run.accelerator, "scaler", None)

    def fill(temp: Path) -> None:
        state = {
            "model": run.accelerator.unwrap_model(run.model).state_dict(),
            "optimizer": run.optimizer.state_dict(),
            "scheduler": run.scheduler.state_dict(),
            "grad_scaler": scaler.state_dict() if scaler is not None else None,
            "train_state": asdict(run.state),
        }
        torch.save(state, temp / TRAINING_STATE_NAME)
        if run.best_backbone is not None:  # the selection survives a resume
            torch.save(run.best_backbone, temp / BEST_BACKBONE_NAME)
        atomic_write_json(temp / "config.json", run.config())

    return runs.write_checkpoint(
        run.output_dir,
        run.state.global_step,
        fill,
        TRAINING_STATE_NAME,
        run.args.checkpoints_total_limit,
    )


def resume_mismatches(saved: dict, current: dict) -> list[str]:
    """Differences that forbid resuming: every argument except RESUME_MAY_CHANGE, the
    identities and the images (dataset_fingerprint)."""
    may_change = RESUME_MAY_CHANGE
    if saved.get("follows_benchmark") or current.get("follows_benchmark"):
        may_change = RESUME_MAY_CHANGE - BENCHMARK_STEERED
    changed = runs.config_mismatches(saved.get("args", {}), current["args"], may_change)
    for key in ("identities", "dataset_fingerprint"):
        changed += runs.config_mismatches({key: saved.get(key)}, {key: current[key]}, ())
    return changed


def load_checkpoint(path: Path, run: Run) -> TrainState:
    """Restore model, optimizer, scheduler and grad scaler (weights_only=True) and the step;
    ValueError when the checkpoint was made with other settings or data."""
    model, optimizer, scheduler, accelerator = (
        run.model,
        run.optimizer,
        run.scheduler,
        run.accelerator,
    )
    changed = resume_mismatches(json.loads((path / "config.json").read_text()), run.config())
    if changed:
        raise ValueError(
            f"checkpoint {path} was trained with other settings or data ({'; '.join(changed)}); "
            "resume with the same ones, or choose another --output_dir"
        )
    payload = torch.load(path / TRAINING_STATE_NAME, map_location="cpu", weights_only=True)
    accelerator.unwrap_model(model).load_state_dict(payload["model"])
    optimizer.load_state_dict(payload["optimizer"])
    scheduler.load_state_dict(payload["scheduler"])
    scaler = getattr(accelerator, "scaler", None)
    if scaler is not None and payload["grad_scaler"] is not None:
        scaler.load_state_dict(payload["grad_scaler"])
    if (path / BEST_BACKBONE_NAME).is_file():
        run.best_backbone = torch.load(path / BEST_BACKBONE_NAME, weights_only=True)
    logger.info("resumed from %s (step %d)", path, payload["train_state"]["global_step"])
    return TrainState(**payload["train_state"])


def trim_log(log_path: Path, last_step: int) -> None:
    """Drop log lines past the resumed step so a resumed run does not duplicate them, and
    lines a killed writer left torn or that are not UTF-8 JSON (they are named in a warning)."""
    if not log_path.is_file():
        return
    kept, torn = [], []
    for raw in filter(bytes.strip, log_path.read_bytes().split(b"\n")):
        try:
            line = raw.decode("utf-8").strip()
            if json.loads(line)["step"] <= last_step:
                kept.append(line)
        except (UnicodeDecodeError, json.JSONDecodeError, KeyError, TypeError):
            torn.append(raw)
    if torn:
        logger.warning("%s: dropped %d torn line(s): %s", log_path, len(torn), torn[:3])
    atomic_write_text(log_path, "".join(line + "\n" for line in kept))


# ----------------------------------------------------------------------------- CLI


def _add_data_args(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "--data_dir",
        action="append",
        required=True,
        dest="data_dirs",
        help="image folder with one sub-folder per identity; repeat to mix "
        "roots (e.g. real + synthetic)",
    )
    parser.add_argument(
        "--keep_roots_apart",
        action="store_true",
        help="label same-named identity folders of different --data_dir roots as "
        "different people (default: merge them by folder name, as for real "
        "+ synthetic images of the same identities)",
    )
    parser.add_argument(
        "--align",
        default="auto",
        choices=ALIGN_MODES,
        help="auto: 112x112 images are taken as aligned, others are detected and "
        "aligned to the ArcFace template; always: align every image; never: "
        "require 112x112 inputs (others are skipped and counted)",
    )
    parser.add_argument(
        "--face_detector",
        default="auto",
        choices=FACE_DETECTOR_NAMES,
        help="faces.build_face_detector backend: auto, dlib or insightface",
    )
    parser.add_argument(
        "--face_models_root",
        default=None,
        help="insightface model packs folder (default arcface's ~/.insightface/models)",
    )
    parser.add_argument(
        "--prepared_dir",
        default=None,
        help="where aligned faces are cached (default <output_dir>/prepared_faces; "
        "share it between runs on the same data)",
    )


def _add_model_args(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--backbone", default="r50", help="IResNet depth (arcface.IRESNET_LAYERS)")
    parser.add_argument(
        "--embedding_size", type=runs.POSITIVE_INT, default=512, help="embedding dimension"
    )
    parser.add_argument(
        "--head", default="adaface", help=f"margin head: {', '.join(sorted(MARGIN_HEADS))}"
    )
    parser.add_argument("--scale", type=runs.POSITIVE, default=64.0, help="logit scale s")
    parser.add_argument(
        "--margin",
        type=runs.NON_NEGATIVE,
        default=None,
        help=f"margin m (default per head: {HEAD_DEFAULT_MARGINS})",
    )
    parser.add_argument(
        "--adaface_h",
        type=runs.POSITIVE,
        default=0.333,
        help="AdaFace h: fraction of the norm spread mapped into [-1, 1]",
    )
    parser.add_argument(
        "--adaface_t_alpha",
        type=runs.PROBABILITY,
        default=0.01,
        help="AdaFace EMA momentum of the feature-norm batch mean/std",
    )


def _add_optim_args(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "--batch_size", type=runs.POSITIVE_INT, default=512, help="images per step per process"
    )
    parser.add_argument("--num_epochs", type=runs.POSITIVE_INT, default=26, help="training epochs")
    parser.add_argument(
        "--max_train_steps",
        type=runs.POSITIVE_INT,
        default=None,
        help="stop after this many steps (overrides --num_epochs)",
    )
    parser.add_argument(
        "--learning_rate", type=runs.POSITIVE, default=0.1, help="SGD learning rate"
    )
    parser.add_argument(
        "--momentum",
        type=runs.Number(float, 0, 1, high_open=True),
        default=0.9,
        help="SGD momentum",
    )
    parser.add_argument(
        "--weight_decay",
        type=runs.NON_NEGATIVE,
        default=5e-4,
        help="SGD weight decay (not on BatchNorm parameters unless --decay_batchnorm)",
    )
    parser.add_argument(
        "--decay_batchnorm",
        action=argparse.BooleanOptionalAction,
        default=False,
        help="Weight decay on BatchNorm parameters too, as the ID-Booth FR protocol's SGD over "
        "model.parameters() (AdaFace's recipe, the default, exempts them).",
    )
    parser.add_argument(
        "--lr_scheduler",
        default="step",
        choices=LR_SCHEDULERS,
        help="step: multiply lr by --lr_gamma at --lr_milestones epochs; plateau: "
        "when the epoch's mean loss stops improving; benchmark: when the mean accuracy of "
        "the --eval_bin sets stops improving (the official ID-Booth protocol)",
    )
    parser.add_argument(
        "--lr_milestones",
        type=runs.POSITIVE_INT,
        nargs="+",
        default=[12, 20, 24],
        help="epochs at which the step schedule decays the lr",
    )
    parser.add_argument(
        "--lr_gamma",
        type=runs.Number(float, 0, 1, low_open=True),
        default=0.1,
        help="lr decay factor",
    )
    parser.add_argument(
        "--plateau_patience",
        type=runs.NON_NEGATIVE_INT,
        default=2,
        help="epochs without improvement before the plateau schedule decays (official protocol: 4)",
    )
    parser.add_argument(
        "--max_grad_norm",
        type=runs.NON_NEGATIVE,
        default=0.0,
        help="clip the gradient norm to this (0: no clipping, as AdaFace)",
    )
    parser.add_argument(
        "--mixed_precision",
        default="fp16",
        choices=("no", "fp16", "bf16"),
        help="accelerate mixed precision (fp16 needs CUDA: on the CPU accelerate runs it in fp32)",
    )


def _add_run_args(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--output_dir", required=True, help="where backbone.pth etc. are written")
    parser.add_argument(
        "--seed", type=runs.SEED, default=0, help="seed of the init, order and flips"
    )
    parser.add_argument(
        "--dataloader_num_workers",
        type=runs.NON_NEGATIVE_INT,
        default=4,
        help="batch-loading worker processes (0: load in the main process)",
    )
    parser.add_argument(
        "--log_every",
        type=runs.POSITIVE_INT,
        default=50,
        help="steps between loss reads (host syncs) written to train_log.jsonl",
    )
    parser.add_argument(
        "--checkpointing_steps",
        type=runs.POSITIVE_INT,
        default=2000,
        help="save a resumable checkpoint every this many steps (and at the end)",
    )
    parser.add_argument(
        "--checkpoints_total_limit",
        type=runs.NON_NEGATIVE_INT,
        default=3,
        help="keep only the newest this many checkpoints (0: keep all)",
    )
    parser.add_argument(
        "--resume_from_checkpoint",
        default=None,
        help="'latest' (newest checkpoint in --output_dir, or a fresh start if "
        "none) or a checkpoint-<step> folder",
    )
    parser.add_argument(
        "--eval_bin",
        action="append",
        default=[],
        dest="eval_bins",
        help="verification .bin evaluated during training (repeatable); with the benchmark "
        "protocol its mean accuracy steers the lr, the stop and the selected weights",
    )
    parser.add_argument(
        "--early_stopping_epochs",
        type=runs.NON_NEGATIVE_INT,
        default=0,
        help="stop when the mean --eval_bin accuracy has not improved for this many epochs "
        "(0: never; official protocol: 6)",
    )
    parser.add_argument(
        "--select_best",
        action="store_true",
        help="write as backbone.pth the weights of the epoch with the best mean --eval_bin "
        "accuracy (official protocol) instead of the last ones",
    )
    parser.add_argument(
        "--eval_every_epochs",
        type=runs.NON_NEGATIVE_INT,
        default=1,
        help="epochs between verification runs (0: only at the end)",
    )
    parser.add_argument(
        "--eval_batch_size",
        type=runs.POSITIVE_INT,
        default=64,
        help="images per forward pass in verification",
    )


def build_parser() -> argparse.ArgumentParser:
    parser = runs.argument_parser(__doc__)
    _add_data_args(parser.add_argument_group("data"))  # --help sections; parsing is the same
    _add_model_args(parser.add_argument_group("model and margin head"))
    _add_optim_args(parser.add_argument_group("optimisation and schedule"))
    _add_run_args(parser.add_argument_group("run: output, checkpoints, precision, evaluation"))
    return parser


def parse_args(argv: Sequence[str] | None = None) -> argparse.Namespace:
    parser = build_parser()
    args = parser.parse_args(argv)
    validate_args(args, parser)
    return args


def validate_args(args: argparse.Namespace, parser: argparse.ArgumentParser) -> None:
    """Fail right after parsing with a readable message; fill per-head defaults."""
    from arcface import IRESNET_LAYERS

    if args.head not in MARGIN_HEADS:
        raise ValueError(f"unknown --head {args.head!r}; options: {sorted(MARGIN_HEADS)}")
    if args.backbone not in IRESNET_LAYERS:
        raise ValueError(f"unknown --backbone {args.backbone!r}; options: {sorted(IRESNET_LAYERS)}")
    if args.margin is None:
        args.margin = HEAD_DEFAULT_MARGINS[args.head]
    for path in args.eval_bins:
        if not Path(path).is_file():
            raise FileNotFoundError(f"--eval_bin {path} does not exist")
    if follows_benchmark(args) and not (args.eval_bins and args.eval_every_epochs):
        raise ValueError(
            "--lr_scheduler benchmark, --early_stopping_epochs and --select_best read the "
            "verification accuracy: pass --eval_bin FILE.bin and --eval_every_epochs >= 1"
        )
    _validate_numbers(args, parser)


def _validate_numbers(args: argparse.Namespace, parser: argparse.ArgumentParser) -> None:
    """Ranges of the numeric flags (runs.Number types) and their combinations."""
    runs.check_numbers(args, parser)
    if args.batch_size < 2:
        raise ValueError("--batch_size must be >= 2 (BatchNorm and AdaFace's batch std need it)")
    if sorted(args.lr_milestones) != args.lr_milestones:
        raise ValueError(f"--lr_milestones must be increasing epochs: {args.lr_milestones}")


# ----------------------------------------------------------------------------- main


def build_accelerator(args: argparse.Namespace):
    """accelerate.Accelerator; cpu=True when CUDA is absent so torchrun works on CPU too."""
    from accelerate import Accelerator

    device_type = "cuda" if torch.cuda.is_available() else "cpu"
    precision = runs.resolve_mixed_precision(args.mixed_precision, device_type)
    accelerator = Accelerator(mixed_precision=precision, cpu=device_type == "cpu")
    if precision == "fp16" and not accelerator.native_amp:
        # accelerate has no fp16 autocast on the CPU (bf16 it has): say so rather than let a
        # run that asked for fp16 silently train in fp32.
        logger.warning("accelerate runs --mixed_precision fp16 in fp32 on the CPU; bf16 runs")
    return accelerator


def load_training_data(args: argparse.Namespace, output_dir: Path, accelerator) -> PreparedFaces:
    """Scan, prepare once (main process first, the others then reuse it), report skips."""
    identities, scan_skips = scan_identity_folders(args.data_dirs, args.keep_roots_apart)
    prepared_dir = Path(args.prepared_dir) if args.prepared_dir else output_dir / "prepared_faces"
    detector_cache: list = []

    def get_detector():
        if not detector_cache:
            from faces import DEFAULT_FACE_MODELS_ROOT, build_face_detector

            models_root = args.face_models_root or DEFAULT_FACE_MODELS_ROOT
            detector_cache.append(build_face_detector(args.face_detector, models_root))
        return detector_cache[0]

    with accelerator.main_process_first():
        prepared = prepare_faces(
            identities,
            prepared_dir,
            args.align,
            get_detector,
            args.face_detector,
            scan_skips,
            num_threads=max(1, args.dataloader_num_workers),
        )
    if accelerator.is_main_process:
        PreparationSkips(**prepared.skips).log()
        logger.info("%d faces of %d identities", len(prepared.labels), len(prepared.identities))
    return prepared


def run_config(args: argparse.Namespace, prepared: PreparedFaces, state: TrainState) -> dict:
    """The resolved settings that made this model, stored beside it and in each checkpoint."""
    return {
        **vars(args),
        "args": runs.json_safe(vars(args)),
        "dataset_fingerprint": prepared.fingerprint,
        "face_size": FACE_SIZE,
        "input_normalisation": "(x / 255 - 0.5) / 0.5, RGB",
        "num_classes": len(prepared.identities),
        "num_faces": len(prepared.labels),
        "identities": prepared.identities,
        "skip_counts": {k: len(v) for k, v in prepared.skips.items()},
        "follows_benchmark": follows_benchmark(args),
        "skipped_files": prepared.skips,
        "global_step": state.global_step,
        "epoch": state.epoch,
        "best_epoch": state.best_epoch,
        "best_mean_accuracy": state.best_accuracy if state.best_epoch >= 0 else None,
        "stopped_early": state.stopped_early,
        # --select_best before any epoch was verified (a --max_train_steps inside the first
        # epoch) keeps the last weights: say so rather than call them the best
        "backbone_is": "best epoch" if args.select_best and state.best_epoch >= 0 else "last step",
    }


def run_verification(run: Run) -> dict:
    """Flip-sum 10-fold verification of the current backbone (main process only)."""
    import verify

    backbone = run.accelerator.unwrap_model(run.model).backbone
    device = str(run.accelerator.device)
    results = [
        verify.evaluate_backbone(backbone, pair_set, run.args.eval_batch_size, device)
        for pair_set in run.pair_sets
    ]
    logger.info("step %d verification:\n%s", run.state.global_step, verify.format_table(results))
    payload = verify.results_to_json(results, step=run.state.global_step, epoch=run.state.epoch)
    with (run.output_dir / "verification_log.jsonl").open("a") as handle:
        handle.write(json.dumps(payload) + "\n")
    atomic_write_json(run.output_dir / "verification.json", payload)
    return payload


def follow_benchmark(run: Run, finished_epoch: int) -> None:
    """The official protocol after an epoch's verification: lr plateau on the mean accuracy,
    keep the best weights, stop `early_stopping_epochs` after the best epoch."""
    from accelerate.utils import broadcast_object_list

    args, state = run.args, run.state
    # Only the main process verifies; the others get its value (NaN until then: a rank that
    # missed it would never improve and stop on its own, which the 2-process test would see).
    is_main = run.accelerator.is_main_process
    accuracy = [run_verification(run)["mean_accuracy"] if is_main else float("nan")]
    if run.accelerator.num_processes > 1:
        broadcast_object_list(accuracy)  # every process steps its lr and stops alike
    if args.lr_scheduler == "benchmark":
        run.scheduler.step(accuracy[0])
    if accuracy[0] > state.best_accuracy:
        state.best_accuracy, state.best_epoch = accuracy[0], finished_epoch
        backbone = run.accelerator.unwrap_model(run.model).backbone
        run.best_backbone = {
            k: v.detach().float().cpu().clone() for k, v in backbone.state_dict().items()
        }
    elif finished_epoch - state.best_epoch >= args.early_stopping_epochs > 0:
        state.stopped_early = True
        logger.info(
            "mean verification accuracy has not improved for %d epochs: stopping at epoch %d "
            "(best %.4f at epoch %d)",
            args.early_stopping_epochs,
            finished_epoch,
            state.best_accuracy,
            state.best_epoch,
        )


def end_epoch(args, scheduler, state: TrainState) -> None:
    """Epoch boundary: step the lr schedule (plateau reads the epoch's mean loss; benchmark is
    stepped by follow_benchmark), reset sums."""
    if args.lr_scheduler == "plateau":
        scheduler.step(state.epoch_loss_sum / max(1, state.epoch_loss_count))
    elif args.lr_scheduler == "step":
        scheduler.step()
    state.epoch += 1
    state.step_in_epoch = 0
    state.epoch_loss_sum = 0.0
    state.epoch_loss_count = 0


@dataclass
class LossMeter:
    """Device-side loss sums read only at log intervals / epoch ends (no per-step host sync)."""

    interval_sum: torch.Tensor
    epoch_sum: torch.Tensor
    interval_steps: int = 0
    interval_start: float = field(default_factory=time.perf_counter)

    def add(self, loss: torch.Tensor) -> None:
        self.interval_sum += loss
        self.epoch_sum += loss
        self.interval_steps += 1


def write_log_line(accelerator, meter: LossMeter, optimizer, state: TrainState, log_path: Path):
    """Read the interval's mean loss (one host sync), append to train_log.jsonl."""
    mean_loss = (
        accelerator.reduce(meter.interval_sum, reduction="mean").item() / meter.interval_steps
    )
    elapsed = time.perf_counter() - meter.interval_start
    record = {
        "step": state.global_step,
        "epoch": state.epoch,
        "loss": mean_loss,
        "lr": optimizer.param_groups[0]["lr"],
        "steps_per_second": meter.interval_steps / max(elapsed, 1e-9),
    }
    if accelerator.is_main_process:
        with log_path.open("a") as handle:
            handle.write(json.dumps(record) + "\n")
        logger.info("step %(step)d epoch %(epoch)d loss %(loss).4f lr %(lr).2e", record)
    meter.interval_sum.zero_()
    meter.interval_steps = 0
    meter.interval_start = time.perf_counter()


def prepare_output_dir(args: argparse.Namespace) -> Path:
    """Create output_dir; refuse to silently train over an earlier run's checkpoints."""
    output_dir = Path(args.output_dir)
    if (
        runs.list_checkpoints(output_dir, TRAINING_STATE_NAME)
        and args.resume_from_checkpoint is None
    ):
        raise ValueError(
            f"{output_dir} already holds checkpoints: pass --resume_from_checkpoint latest to "
            "continue that run, or choose another --output_dir"
        )
    output_dir.mkdir(parents=True, exist_ok=True)
    return output_dir


@dataclass
class Run:
    """Everything one training run holds; the loop's helpers take it instead of ten arguments."""

    args: argparse.Namespace
    accelerator: object
    model: nn.Module
    optimizer: torch.optim.Optimizer
    scheduler: object
    batches: EpochBatches
    prepared: PreparedFaces
    output_dir: Path
    max_steps: int
    state: TrainState = field(default_factory=TrainState)
    pair_sets: list = field(default_factory=list)
    watch: runs.NonFiniteWatch | None = None  # NaN/inf of the loss, on the device
    best_backbone: dict | None = None  # benchmark protocol: CPU weights of the best epoch

    @property
    def finished(self) -> bool:
        return self.state.global_step >= self.max_steps or self.state.stopped_early

    @property
    def log_path(self) -> Path:
        return self.output_dir / "train_log.jsonl"

    def config(self) -> dict:
        return run_config(self.args, self.prepared, self.state)


def setup_run(args: argparse.Namespace) -> Run:
    """Accelerator, prepared data, model, optimizer, schedule; restore a checkpoint if asked."""
    accelerator = build_accelerator(args)
    output_dir = prepare_output_dir(args)
    prepared = load_training_data(args, output_dir, accelerator)
    batches = EpochBatches(
        prepared, args.batch_size, args.seed, accelerator.process_index, accelerator.num_processes
    )
    if batches.steps_per_epoch() == 0:
        raise ValueError(
            f"{len(prepared.labels)} faces make no full batch of {batches.global_batch_size} "
            "(batch size x processes); lower --batch_size"
        )
    torch.manual_seed(args.seed)  # same init on every process
    model = build_model(args, num_classes=len(prepared.identities))
    optimizer = torch.optim.SGD(
        parameter_groups(model, args.weight_decay, args.decay_batchnorm),
        lr=args.learning_rate,
        momentum=args.momentum,
    )
    scheduler = build_lr_schedule(optimizer, args)
    model, optimizer = accelerator.prepare(model, optimizer)
    max_steps = args.max_train_steps or args.num_epochs * batches.steps_per_epoch()
    run = Run(
        args, accelerator, model, optimizer, scheduler, batches, prepared, output_dir, max_steps
    )
    resume_path = runs.find_checkpoint(args.resume_from_checkpoint, output_dir, TRAINING_STATE_NAME)
    if resume_path is not None:
        run.state = load_checkpoint(resume_path, run)
    if accelerator.is_main_process:
        remove_stale_temps(output_dir)  # what a killed run left while writing
        for log in (run.log_path, output_dir / "verification_log.jsonl"):
            trim_log(log, run.state.global_step)
    if args.eval_bins and accelerator.is_main_process:
        import verify

        run.pair_sets = [verify.load_bin(p) for p in args.eval_bins]  # decoded once
    return run


def main(args: argparse.Namespace) -> Path:
    runs.setup_logging()
    run = setup_run(args)
    backbone_path = run.output_dir / "backbone.pth"
    if run.finished and backbone_path.is_file():
        logger.info(
            "training already finished at step %d (%s)", run.state.global_step, backbone_path
        )
        return backbone_path
    train_loop(run)
    run.accelerator.wait_for_everyone()
    if run.accelerator.is_main_process:
        save_final(run)
    run.accelerator.wait_for_everyone()
    run.accelerator.end_training()
    return backbone_path


def train_loop(run: Run) -> None:
    """Epochs of prepared batches until max_steps; logs, epoch ends and checkpoints on the way."""
    args, accelerator, state = run.args, run.accelerator, run.state
    if accelerator.device.type == "cuda":
        torch.backends.cudnn.benchmark = True  # fixed 112x112 input size
    run.model.train()
    device = accelerator.device
    meter = LossMeter(torch.zeros((), device=device), torch.zeros((), device=device))
    meter.epoch_sum += state.epoch_loss_sum
    run.watch = runs.NonFiniteWatch(("loss",), device)
    while not run.finished:
        run.batches.set_epoch(state.epoch)
        for batch in batches_from(run.batches, state.step_in_epoch, args.dataloader_num_workers):
            batch = tuple(t.to(device, non_blocking=True) for t in batch)
            loss = training_step(run.model, run.optimizer, accelerator, batch, args.max_grad_norm)
            meter.add(loss)
            run.watch.update(loss.double()[None], state.global_step + 1)
            state.global_step += 1
            state.step_in_epoch += 1
            state.epoch_loss_count += 1
            after_step(run, meter)
            if run.finished or state.step_in_epoch == 0:
                break  # done, or the epoch ended (its sampler is exhausted anyway)


def after_step(run: Run, meter: LossMeter) -> None:
    """Log at intervals; at an epoch end step the schedule and evaluate; checkpoint at intervals."""
    args, accelerator, state = run.args, run.accelerator, run.state
    if state.global_step % args.log_every == 0 or state.global_step == run.max_steps:
        write_log_line(accelerator, meter, run.optimizer, state, run.log_path)
        run.watch.check(f"last checkpoint kept in {run.output_dir}")
    epoch_done = state.step_in_epoch == run.batches.steps_per_epoch()
    save_now = (
        state.global_step % args.checkpointing_steps == 0 or state.global_step == run.max_steps
    )
    if epoch_done or save_now:  # host read at boundaries only; mean over processes
        state.epoch_loss_sum = accelerator.reduce(meter.epoch_sum.clone(), reduction="mean").item()
    if epoch_done:
        finished_epoch = state.epoch
        end_epoch(args, run.scheduler, state)
        meter.epoch_sum.zero_()
        every = args.eval_every_epochs
        eval_due = args.eval_bins and every and (finished_epoch + 1) % every == 0
        if eval_due and follows_benchmark(args):
            follow_benchmark(run, finished_epoch)
            save_now = save_now or state.stopped_early  # a rerun then knows it is finished
        elif eval_due and state.global_step < run.max_steps:  # save_final runs the last one
            run_verification(run)
        accelerator.wait_for_everyone()
    if save_now:
        accelerator.wait_for_everyone()
        if accelerator.is_main_process:
            save_checkpoint(run)


def check_finite(run: Run, where: str) -> None:
    """NonFiniteLossError if a loss or the model's weights became NaN/inf (one host sync):
    a non-finite model is never written as a checkpoint or as backbone.pth."""
    if run.watch is not None:
        run.watch.check(where)
    weights = run.accelerator.unwrap_model(run.model).state_dict().values()
    finite = torch.stack([w.isfinite().all() for w in weights if w.is_floating_point()]).all()
    if not bool(finite):
        raise runs.NonFiniteLossError(
            f"the model's weights are non-finite at step {run.state.global_step}; training "
            f"stopped before saving; {where}. Try a lower --learning_rate or --max_grad_norm"
        )


def save_final(run: Run) -> None:
    """backbone.pth (arcface_torch keys, float32) + config.json (+ final verification)."""
    check_finite(run, f"no backbone.pth written; last checkpoint kept in {run.output_dir}")
    backbone = run.accelerator.unwrap_model(run.model).backbone
    state_dict = {k: v.detach().float().cpu() for k, v in backbone.state_dict().items()}
    if run.best_backbone is not None:
        with atomic_path(run.output_dir / BEST_BACKBONE_NAME) as temp:
            torch.save(run.best_backbone, temp)
        if run.args.select_best:
            state_dict = run.best_backbone
            logger.info(
                "backbone.pth = epoch %d (best mean verification accuracy %.4f)",
                run.state.best_epoch,
                run.state.best_accuracy,
            )
    with atomic_path(run.output_dir / "backbone.pth") as temp:
        torch.save(state_dict, temp)
    atomic_write_json(run.output_dir / "config.json", run.config())
    if run.pair_sets and not follows_benchmark(run.args):  # else verified at the epoch end
        run_verification(run)
    logger.info("wrote %s", run.output_dir / "backbone.pth")


if __name__ == "__main__":
    runs.run_cli("train_fr.py", parse_args, main, errors=(runs.NonFiniteLossError,))
