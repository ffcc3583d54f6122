"""Train one ID-Booth LoRA per identity: DreamBooth prior preservation + a triplet identity loss.

Per identity (SPEC.md's reference setup are the defaults):

    dreambooth: L = MSE(eps_hat_inst, eps) + w_prior * MSE(eps_hat_prior, eps_prior)
    identity:   L + mean_i w(t_i) * (1 - cos(E(x0_hat_i), e_inst_i))
    triplet:    L + mean_{i in M} w(t_i) * max(d(a_i, e_inst_i) - d(a_i, e_prior_i) + m, 0)

with w(t) = (1 - t/T)^2, d = 1 - cos, E a frozen ArcFace network (run in fp32), a_i = E(x0_hat_i),
x0_hat the one-step estimate (fp32) decoded by the frozen VAE (with gradients) and aligned to the
ArcFace template with the 5 landmarks of the training photo, carried through its resize + crop.
Every readable class image serves the prior loss; one without a detected face has no e_prior, so
M, the instance samples that get the triplet term, leaves out those paired with one (masked on
the device, and counted).

    python train_ID-Booth.py \\
        --pretrained_model_name_or_path stabilityai/stable-diffusion-2-1-base \\
        --identities_root data/identities --class_data_dir data/class \\
        --arcface_weights ms1mv3_arcface_r100_fp16/backbone.pth --output_dir loras

    # identities split over 8 GPUs, each identity trained once, alone, on one GPU:
    accelerate launch --num_processes 8 train_ID-Booth.py ...   (or torchrun --nproc_per_node 8)

Each process trains its identities with a self-contained single-device loop (no DDP): ranks hold
different identities, so averaging their gradients would be wrong; the process group only splits
the identities and waits for the shared class images.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import logging
import math
import platform
import re
import shutil
import tempfile
import time
from collections.abc import Callable
from dataclasses import dataclass
from functools import partial
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch.utils.data import DataLoader

from arcface import DEFAULT_FACE_MODELS_ROOT, align_faces_torch, build_face_detector, load_arcface
from datasets import (
    DreamBoothFaceDataset,
    annotate_photos,
    collate_dreambooth,
    readable_photos,
)
from fileio import (
    atomic_folder,
    atomic_save_image,
    atomic_write_json,
    atomic_write_text,
    publish,
    remove_stale_temps,
    stable_seed,
)
from losses import (
    diffusion_target,
    identity_loss,
    predict_x0,
    prior_preservation_loss,
    timestep_weight,
    triplet_identity_loss,
)

logger = logging.getLogger("train_ID-Booth")

LORA_WEIGHTS_NAME = "pytorch_lora_weights.safetensors"
TRAINING_STATE_NAME = "training_state.pt"
CONFIG_NAME = "training_config.json"
CHECKPOINT_PATTERN = re.compile(r"^checkpoint-(\d+)$")
LORA_TARGET_MODULES = ("to_k", "to_q", "to_v", "to_out.0", "add_k_proj", "add_v_proj")
MODEL_COMPONENTS = {  # subfolder -> a file it must hold
    "unet": "config.json",
    "vae": "config.json",
    "text_encoder": "config.json",
    "tokenizer": None,
    "scheduler": "scheduler_config.json",
}
WEIGHTED_COMPONENTS = ("unet", "vae", "text_encoder")
WEIGHT_DTYPES = {"no": torch.float32, "fp16": torch.float16, "bf16": torch.bfloat16}
PRIOR_DTYPES = {"no": torch.float32, "fp32": torch.float32, **WEIGHT_DTYPES}
LR_SCHEDULERS = (
    "linear",
    "cosine",
    "cosine_with_restarts",
    "polynomial",
    "constant",
    "constant_with_warmup",
)
DEFAULT_VALIDATION_PROMPT = "face portrait photo of sks person, city street background"
DEFAULT_NEGATIVE_PROMPT = (
    "cartoon, cgi, render, illustration, painting, drawing, black and white, "
    "bad body proportions, landscape"
)
# Loss terms stacked into one device vector per step, in this order (logging + NaN watch).
TERM_NAMES = (
    "loss",
    "diffusion_loss",
    "prior_loss",
    "identity_loss",
    "identity_term",
    "identity_weight",
    "identity_count",  # instance samples of the micro-batch that had the identity term
)
PER_SAMPLE_TERMS = ("identity_loss", "identity_weight")  # means over the samples that had them
PER_SAMPLE_INDICES = [TERM_NAMES.index(name) for name in PER_SAMPLE_TERMS]
IDENTITY_COUNT_INDEX = TERM_NAMES.index("identity_count")
# Arguments that must match between a checkpoint and the run resuming it: anything that changes
# the data, the loss, the model or the optimisation (the optimizer state restores AdamW's
# hyper-parameters from the checkpoint, so a changed one would be silently ignored).
RESUME_KEYS = (
    "pretrained_model_name_or_path",
    "revision",
    "variant",
    "face_detector",
    "instance_prompt",
    "class_prompt",
    "with_prior_preservation",
    "prior_loss_weight",
    "resolution",
    "center_crop",
    "loss",
    "triplet_margin",
    "identity_loss_weighting",
    "rank",
    "lora_alpha",
    "seed",
    "train_batch_size",
    "gradient_accumulation_steps",
    "learning_rate",
    "scale_lr",
    "lr_scheduler",
    "lr_warmup_steps",
    "lr_num_cycles",
    "lr_power",
    "adam_beta1",
    "adam_beta2",
    "adam_weight_decay",
    "adam_epsilon",
    "max_grad_norm",
)
# Resolved values that must match: total steps (--max_train_steps or --num_train_epochs; the
# schedule depends on it), steps per epoch (the data order) and the precision actually used.
RESUME_RESOLVED_KEYS = ("max_train_steps", "steps_per_epoch", "mixed_precision")
# Data counts that must match (a changed photo set re-pairs instance and class images).
RESUME_DATA_KEYS = ("instance_images", "class_images", "class_images_with_face")


class NonFiniteLossError(RuntimeError):
    """A loss term became NaN or inf; training stopped and the last checkpoint was kept."""


# ============================================================================ arguments


def _add_model_args(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "--pretrained_model_name_or_path",
        default="stabilityai/stable-diffusion-2-1-base",
        help="Base Stable Diffusion: hub id or local folder saved with save_pretrained.",
    )
    parser.add_argument("--revision", default=None, help="Hub revision of the base model.")
    parser.add_argument("--variant", default=None, help="Weights variant of the base, e.g. fp16.")
    parser.add_argument(
        "--arcface_weights",
        type=Path,
        default=None,
        help="Frozen ArcFace recogniser: arcface_torch backbone.pth/.safetensors or an ONNX "
        "recogniser (w600k_r50.onnx). Required for --loss identity/triplet.",
    )
    parser.add_argument(
        "--face_detector",
        default="auto",
        choices=["auto", "dlib", "insightface"],
        help="Landmark detector for the training photos ('auto': insightface when a pack is "
        "under --face_models_root, else dlib).",
    )
    parser.add_argument(
        "--face_models_root",
        type=Path,
        default=DEFAULT_FACE_MODELS_ROOT,
        help="Folder of insightface model packs (<root>/buffalo_l/det_10g.onnx).",
    )


def _add_data_args(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "--instance_data_dir",
        type=Path,
        default=None,
        help="Photos of ONE identity, trained into --output_dir (or use --identities_root).",
    )
    parser.add_argument(
        "--identities_root",
        type=Path,
        default=None,
        help="Folder of identity folders; each is trained into OUTPUT_DIR/<identity>; several "
        "processes split the identities (process i takes identities[i::num_processes]).",
    )
    parser.add_argument(
        "--class_data_dir",
        type=Path,
        default=None,
        help="Class (prior) images; missing ones are generated with the base model.",
    )
    parser.add_argument(
        "--instance_prompt", default="photo of sks person", help="Prompt of the identity photos."
    )
    parser.add_argument(
        "--class_prompt", default="photo of a person", help="Prompt of the class images."
    )
    parser.add_argument(
        "--with_prior_preservation",
        action=argparse.BooleanOptionalAction,
        default=True,
        help="Add the prior-preservation loss on class images.",
    )
    parser.add_argument(
        "--prior_loss_weight", type=float, default=1.0, help="Weight of the prior loss."
    )
    parser.add_argument(
        "--num_class_images",
        type=int,
        default=200,
        help="Class images wanted in --class_data_dir; missing ones are sampled with "
        "--class_prompt. All serve the prior loss; an instance sample paired with a class image "
        "without a detected face gets no triplet term (counted in the logs).",
    )
    parser.add_argument(
        "--sample_batch_size", type=int, default=4, help="Batch size for class-image sampling."
    )
    parser.add_argument(
        "--class_num_inference_steps",
        type=int,
        default=50,
        help="Sampler steps per generated class image.",
    )
    parser.add_argument(
        "--prior_generation_precision",
        default=None,
        choices=["no", "fp32", "fp16", "bf16"],
        help="Precision of class-image sampling (default: fp16 on GPU, else fp32).",
    )
    parser.add_argument("--resolution", type=int, default=512, help="Training image size.")
    parser.add_argument(
        "--center_crop",
        action="store_true",
        help="Center crop after resizing instead of a random crop.",
    )
    parser.add_argument(
        "--dataloader_num_workers", type=int, default=0, help="Data loading subprocesses."
    )


def _add_loss_args(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "--loss",
        default="triplet",
        choices=["dreambooth", "identity", "triplet"],
        help="dreambooth: diffusion + prior only; identity: + (1 - cos); triplet: ID-Booth.",
    )
    parser.add_argument(
        "--triplet_margin", type=float, default=1.0, help="Margin m of the triplet loss."
    )
    parser.add_argument(
        "--identity_loss_weighting",
        default="timestep",
        choices=["timestep", "none"],
        help="Per-sample weight of the identity term: (1 - t/T)^2 or 1.",
    )


def _add_optimisation_args(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--rank", type=int, default=4, help="LoRA rank.")
    parser.add_argument("--lora_alpha", type=float, default=4, help="LoRA alpha (scale alpha/r).")
    parser.add_argument("--seed", type=int, default=0, help="Seed of init, data order and noise.")
    parser.add_argument(
        "--train_batch_size",
        type=int,
        default=1,
        help="Instance images per step (each paired with one class image).",
    )
    parser.add_argument("--num_train_epochs", type=int, default=32, help="Training epochs.")
    parser.add_argument(
        "--max_train_steps",
        type=int,
        default=None,
        help="Optimizer steps per identity; overrides --num_train_epochs.",
    )
    parser.add_argument(
        "--gradient_accumulation_steps", type=int, default=1, help="Batches per optimizer step."
    )
    parser.add_argument(
        "--gradient_checkpointing",
        action="store_true",
        help="Recompute UNet and VAE-decoder activations in backward to save memory.",
    )
    parser.add_argument("--learning_rate", type=float, default=1e-4, help="AdamW learning rate.")
    parser.add_argument(
        "--scale_lr",
        action="store_true",
        help="Multiply the learning rate by batch size * gradient accumulation steps.",
    )
    parser.add_argument(
        "--lr_scheduler", default="cosine", choices=LR_SCHEDULERS, help="Learning rate schedule."
    )
    parser.add_argument("--lr_warmup_steps", type=int, default=0, help="Warm-up steps.")
    parser.add_argument(
        "--lr_num_cycles", type=int, default=1, help="Restarts of cosine_with_restarts."
    )
    parser.add_argument("--lr_power", type=float, default=1.0, help="Power of 'polynomial'.")
    parser.add_argument("--adam_beta1", type=float, default=0.9, help="AdamW beta1.")
    parser.add_argument("--adam_beta2", type=float, default=0.999, help="AdamW beta2.")
    parser.add_argument("--adam_weight_decay", type=float, default=1e-2, help="AdamW decay.")
    parser.add_argument("--adam_epsilon", type=float, default=1e-8, help="AdamW epsilon.")
    parser.add_argument("--max_grad_norm", type=float, default=1.0, help="Gradient clip norm.")
    parser.add_argument(
        "--mixed_precision",
        default="fp16",
        choices=list(WEIGHT_DTYPES),
        help="Frozen weights and autocast dtype (LoRA stays fp32); fp16 falls back to 'no' on CPU.",
    )
    parser.add_argument(
        "--allow_tf32",
        action=argparse.BooleanOptionalAction,
        default=True,
        help="Allow TF32 matmuls on Ampere+ GPUs.",
    )


def _add_output_args(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "--output_dir", type=Path, default=Path("id-booth-lora"), help="Where outputs go."
    )
    parser.add_argument(
        "--overwrite",
        action="store_true",
        help="Retrain identities that already have a final LoRA (their old outputs and "
        "checkpoints are deleted first); without it finished identities are skipped.",
    )
    parser.add_argument(
        "--checkpointing_steps",
        type=int,
        default=None,
        help="Save a resumable checkpoint every N steps (default: every 8 epochs).",
    )
    parser.add_argument(
        "--checkpoints_total_limit",
        type=int,
        default=None,
        help="Keep at most this many checkpoints per identity (oldest removed).",
    )
    parser.add_argument(
        "--resume_from_checkpoint",
        default=None,
        help="'latest' (per identity; starts fresh where none exists) or a checkpoint path / "
        "name inside --output_dir.",
    )
    parser.add_argument(
        "--validation_prompt",
        default=DEFAULT_VALIDATION_PROMPT,
        help="Prompt of the validation images ('' disables validation).",
    )
    parser.add_argument(
        "--validation_negative_prompt",
        default=DEFAULT_NEGATIVE_PROMPT,
        help="Negative prompt of the validation images.",
    )
    parser.add_argument(
        "--validation_steps",
        type=int,
        default=None,
        help="Validate every N steps (default: at every checkpoint) and at the end.",
    )
    parser.add_argument(
        "--num_validation_images", type=int, default=4, help="Images per validation."
    )
    parser.add_argument(
        "--validation_num_inference_steps", type=int, default=30, help="Validation steps."
    )
    parser.add_argument(
        "--validation_guidance_scale", type=float, default=5.0, help="Validation guidance."
    )
    parser.add_argument(
        "--logging_steps",
        type=int,
        default=10,
        help="Read losses (logs, progress bar, NaN/inf check) every N steps.",
    )
    parser.add_argument(
        "--logging_dir", default="logs", help="TensorBoard folder inside each identity's output."
    )
    parser.add_argument(
        "--report_to", default="tensorboard", choices=["tensorboard", "none"], help="Logger."
    )


def build_parser() -> argparse.ArgumentParser:
    """Every flag, with help text; defaults are the paper's reference setup."""
    parser = argparse.ArgumentParser(
        description=__doc__.split("\n\n")[0],
        formatter_class=argparse.ArgumentDefaultsHelpFormatter,
    )
    _add_model_args(parser)
    _add_data_args(parser)
    _add_loss_args(parser)
    _add_optimisation_args(parser)
    _add_output_args(parser)
    return parser


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    """Parse and validate the command line (ValueError / FileNotFoundError on bad input)."""
    args = build_parser().parse_args(argv)
    validate_args(args)
    return args


def _validate_numbers(args: argparse.Namespace) -> None:
    """ValueError for out-of-range numeric flags."""
    positive = {
        "rank": args.rank,
        "train_batch_size": args.train_batch_size,
        "num_train_epochs": args.num_train_epochs,
        "gradient_accumulation_steps": args.gradient_accumulation_steps,
        "sample_batch_size": args.sample_batch_size,
        "logging_steps": args.logging_steps,
        "class_num_inference_steps": args.class_num_inference_steps,
        "validation_num_inference_steps": args.validation_num_inference_steps,
    }
    optional = {
        "max_train_steps": args.max_train_steps,
        "checkpointing_steps": args.checkpointing_steps,
        "checkpoints_total_limit": args.checkpoints_total_limit,
        "validation_steps": args.validation_steps,
    }
    positive.update({name: value for name, value in optional.items() if value is not None})
    for name, value in positive.items():
        if value < 1:
            raise ValueError(f"--{name} must be >= 1, got {value}")
    if args.lora_alpha <= 0:
        raise ValueError(f"--lora_alpha must be > 0, got {args.lora_alpha}")
    if args.resolution < 8 or args.resolution % 8:
        raise ValueError(f"--resolution must be a positive multiple of 8, got {args.resolution}")
    for name in ("num_class_images", "num_validation_images", "dataloader_num_workers"):
        if getattr(args, name) < 0:
            raise ValueError(f"--{name} must be >= 0, got {getattr(args, name)}")


HUB_ID = re.compile(r"^[A-Za-z0-9][\w.-]*(/[\w.-]+)?$")  # "name" or "org/name"


def _looks_like_path(name: str) -> bool:
    """True for strings that cannot be a hub id: absolute, ./, ~, or more than one '/'."""
    return HUB_ID.match(name) is None


def _has_weights(folder: Path) -> bool:
    """Whether a component folder holds weights (single file, variant or sharded)."""
    return any(
        path.suffix in (".safetensors", ".bin") or path.name.endswith(".index.json")
        for path in folder.iterdir()
    )


def _validate_base_model(name: str) -> None:
    """FileNotFoundError when a local base model folder lacks a component."""
    path = Path(name).expanduser()
    if not path.exists():
        if _looks_like_path(name):
            raise FileNotFoundError(
                f"base model folder {path} does not exist; pass a hub id "
                "(stabilityai/stable-diffusion-2-1-base) or a folder saved with save_pretrained"
            )
        return  # a hub id; diffusers resolves it (from the local cache when offline)
    missing = [
        f"{folder}/{required or ''}"
        for folder, required in MODEL_COMPONENTS.items()
        if not (path / folder / (required or "")).exists()
    ]
    missing += [
        f"{folder}/ weights (*.safetensors or *.bin)"
        for folder in WEIGHTED_COMPONENTS
        if (path / folder).is_dir() and not _has_weights(path / folder)
    ]
    if not (path / "model_index.json").is_file():
        missing.insert(0, "model_index.json")
    if missing:
        raise FileNotFoundError(
            f"base model folder {path} is incomplete: missing {', '.join(missing)}; save the "
            "whole pipeline with StableDiffusionPipeline.save_pretrained (or download all of it)"
        )


def _validate_data(args: argparse.Namespace) -> None:
    """Exactly one identity source; folders exist; prior needs a class folder."""
    if (args.instance_data_dir is None) == (args.identities_root is None):
        raise ValueError(
            "pass exactly one of --instance_data_dir (one identity) or --identities_root "
            "(a folder of identity folders)"
        )
    source = args.instance_data_dir or args.identities_root
    if not source.is_dir():
        raise FileNotFoundError(f"identity folder {source} does not exist or is not a folder")
    if args.with_prior_preservation and args.class_data_dir is None:
        raise ValueError(
            "--with_prior_preservation needs --class_data_dir (missing class images are "
            "generated there); or pass --no-with_prior_preservation"
        )
    if args.class_data_dir is not None and args.class_data_dir.is_file():
        raise ValueError(f"--class_data_dir {args.class_data_dir} is a file, not a folder")
    if args.output_dir.exists() and not args.output_dir.is_dir():
        raise ValueError(f"--output_dir {args.output_dir} is a file; pass a folder path")


def _validate_losses(args: argparse.Namespace) -> None:
    """Identity losses need ArcFace weights; the triplet needs class images as negatives."""
    if args.loss != "dreambooth" and args.arcface_weights is None:
        raise ValueError(
            f"--loss {args.loss} needs --arcface_weights (an arcface_torch backbone.pth or an "
            "ONNX recogniser); or use --loss dreambooth"
        )
    if args.arcface_weights is not None and not args.arcface_weights.expanduser().is_file():
        raise FileNotFoundError(f"--arcface_weights {args.arcface_weights} does not exist")
    if args.loss == "triplet" and not args.with_prior_preservation:
        raise ValueError(
            "--loss triplet takes its negatives from the class images: keep "
            "--with_prior_preservation on, or use --loss identity"
        )


def resolve_checkpoint_path(value: str, output_dir: Path) -> Path | None:
    """An explicit checkpoint: the path itself, or a name inside output_dir (None if neither)."""
    for candidate in (Path(value).expanduser(), output_dir / value):
        if (candidate / TRAINING_STATE_NAME).is_file():
            return candidate
    return None


def _validate_resume(args: argparse.Namespace) -> None:
    """Resume target exists; it does not combine with --overwrite."""
    value = args.resume_from_checkpoint
    if value is None:
        return
    if args.overwrite:
        raise ValueError(
            "--overwrite starts over; it cannot be combined with --resume_from_checkpoint"
        )
    if value == "latest":
        return
    if args.identities_root is not None:
        raise ValueError(
            "with --identities_root only --resume_from_checkpoint latest is supported "
            "(each identity resumes from its own newest checkpoint)"
        )
    if resolve_checkpoint_path(value, args.output_dir) is None:
        raise FileNotFoundError(
            f"checkpoint {value} not found (looked for {Path(value) / TRAINING_STATE_NAME} and "
            f"{args.output_dir / value / TRAINING_STATE_NAME}); pass an existing checkpoint-N "
            "folder or 'latest'"
        )


def validate_args(args: argparse.Namespace) -> None:
    """Readable errors for bad or conflicting flags, right after parsing."""
    _validate_numbers(args)
    _validate_data(args)
    _validate_losses(args)
    _validate_resume(args)
    _validate_base_model(args.pretrained_model_name_or_path)


# ============================================================================ small utilities


def derive_seed(*parts: object) -> int:
    """Training's stable 63-bit seed of any parts (fileio.stable_seed, little-endian)."""
    return stable_seed(*parts, byteorder="little")


def library_versions() -> dict[str, str]:
    """Versions of Python and the libraries a run depends on."""
    import accelerate
    import diffusers
    import peft
    import transformers

    versions = {
        "python": platform.python_version(),
        "torch": torch.__version__,
        "diffusers": diffusers.__version__,
        "transformers": transformers.__version__,
        "accelerate": accelerate.__version__,
        "peft": peft.__version__,
        "numpy": np.__version__,
    }
    if torch.cuda.is_available():
        versions["cuda"] = str(torch.version.cuda)
        versions["gpu"] = torch.cuda.get_device_name()
    return versions


def json_safe(args: argparse.Namespace) -> dict[str, Any]:
    """vars(args) with paths as strings."""
    return {
        key: str(value) if isinstance(value, Path) else value for key, value in vars(args).items()
    }


def list_checkpoints(folder: Path) -> list[tuple[int, Path]]:
    """(step, path) of complete checkpoint-N folders, oldest first."""
    if not folder.is_dir():
        return []
    found = []
    for path in folder.iterdir():
        match = CHECKPOINT_PATTERN.match(path.name)
        if match and (path / TRAINING_STATE_NAME).is_file():
            found.append((int(match.group(1)), path))
    return sorted(found)


def resolve_mixed_precision(requested: str, device: torch.device) -> str:
    """fp16 needs a GPU: on CPU it falls back to full precision (with a warning)."""
    if requested == "fp16" and device.type != "cuda":
        logger.warning("--mixed_precision fp16 needs a GPU; training in float32 on %s", device)
        return "no"
    return requested


# ============================================================================ identities


@dataclass(frozen=True)
class Identity:
    """One identity: its photos and its output folder."""

    name: str
    instance_dir: Path
    output_dir: Path


def discover_identities(args: argparse.Namespace) -> list[Identity]:
    """The identity to train, or the sorted identity subfolders of --identities_root."""
    if args.instance_data_dir is not None:
        folder = args.instance_data_dir
        return [Identity(folder.resolve().name, folder, args.output_dir)]
    folders = sorted(
        path
        for path in args.identities_root.iterdir()
        if path.is_dir() and not path.name.startswith(".")
    )
    if not folders:
        raise ValueError(
            f"--identities_root {args.identities_root} holds no identity folders; put one "
            "folder of photos per identity there"
        )
    return [Identity(path.name, path, args.output_dir / path.name) for path in folders]


def is_finished(identity: Identity) -> bool:
    """The final LoRA is written last, so its presence marks a finished identity."""
    return (identity.output_dir / LORA_WEIGHTS_NAME).is_file()


def check_unfinished_runs(identities: list[Identity], args: argparse.Namespace) -> None:
    """ValueError naming identities with checkpoints that this run would silently redo."""
    if args.overwrite or args.resume_from_checkpoint is not None:
        return
    stale = [
        str(identity.output_dir)
        for identity in identities
        if not is_finished(identity) and list_checkpoints(identity.output_dir)
    ]
    if stale:
        raise ValueError(
            f"{', '.join(stale)} hold checkpoints of an unfinished run: pass "
            "--resume_from_checkpoint latest to continue, or --overwrite to start over"
        )


def remove_stale_temporaries(folder: Path) -> None:
    """Delete temp folders/files that a killed run left while writing a checkpoint or LoRA."""
    remove_stale_temps(folder)
    for path in folder.glob(".*"):
        if path.name.startswith((".checkpoint-", ".lora-")) and path.is_dir():
            shutil.rmtree(path)


def clear_outputs(identity: Identity, logging_dir: str) -> None:
    """Delete what an earlier run wrote for this identity (used by --overwrite)."""
    folder = identity.output_dir
    for name in (LORA_WEIGHTS_NAME, CONFIG_NAME, "README.md"):
        (folder / name).unlink(missing_ok=True)
    for _, path in list_checkpoints(folder):
        shutil.rmtree(path)
    for name in ("validation", logging_dir):
        if (folder / name).is_dir():
            shutil.rmtree(folder / name)


# ============================================================================ models


@dataclass
class FrozenModels:
    """Everything that does not train, loaded once per process."""

    vae: Any
    text_encoder: Any
    tokenizer: Any
    noise_scheduler: Any
    arcface: torch.nn.Module | None
    device: torch.device
    mixed_precision: str

    @property
    def weight_dtype(self) -> torch.dtype:
        return WEIGHT_DTYPES[self.mixed_precision]

    def autocast(self) -> contextlib.AbstractContextManager:
        """Autocast to the weight dtype under mixed precision, else a no-op."""
        if self.mixed_precision == "no":
            return contextlib.nullcontext()
        return torch.autocast(self.device.type, dtype=self.weight_dtype)


def _hub_kwargs(args: argparse.Namespace) -> dict[str, Any]:
    return {"revision": args.revision, "variant": args.variant}


def _dtype_kwargs(dtype: torch.dtype) -> dict[str, torch.dtype]:
    """from_pretrained's dtype keyword: `dtype` where diffusers deprecated `torch_dtype`."""
    from diffusers.utils import deprecation_utils

    return {"dtype" if hasattr(deprecation_utils, "_resolve_dtype") else "torch_dtype": dtype}


def place(model: torch.nn.Module, device: torch.device, dtype: torch.dtype) -> None:
    """Move and cast floating weights; torch's own Module.to, since diffusers' override warns
    about fp32-only modules on every cast even when there are none."""
    torch.nn.Module.to(model, device=device, dtype=dtype)


def load_frozen_models(
    args: argparse.Namespace,
    device: torch.device,
    mixed_precision: str,
    arcface: torch.nn.Module | None,
) -> FrozenModels:
    """VAE, text encoder (weight dtype, no grad), tokenizer, DDPM scheduler, ArcFace (fp32)."""
    from diffusers import AutoencoderKL, DDPMScheduler
    from transformers import CLIPTextModel, CLIPTokenizer

    base, dtype = args.pretrained_model_name_or_path, WEIGHT_DTYPES[mixed_precision]
    vae = AutoencoderKL.from_pretrained(base, subfolder="vae", **_hub_kwargs(args))
    text_encoder = CLIPTextModel.from_pretrained(
        base, subfolder="text_encoder", **_hub_kwargs(args)
    )
    for model in (vae, text_encoder):
        model.requires_grad_(False)
        model.eval()
        place(model, device, dtype)
    if args.gradient_checkpointing and args.loss != "dreambooth":
        vae.enable_gradient_checkpointing()  # the identity term backpropagates through decode
    return FrozenModels(
        vae=vae,
        text_encoder=text_encoder,
        tokenizer=CLIPTokenizer.from_pretrained(
            base, subfolder="tokenizer", revision=args.revision
        ),
        noise_scheduler=DDPMScheduler.from_pretrained(
            base, subfolder="scheduler", revision=args.revision
        ),
        arcface=arcface,
        device=device,
        mixed_precision=mixed_precision,
    )


def lora_target_modules(unet: torch.nn.Module) -> list[str]:
    """LORA_TARGET_MODULES that exist in this UNet (add_k/v_proj only in added-KV attention)."""
    names = [name for name, _ in unet.named_modules()]
    return [
        target
        for target in LORA_TARGET_MODULES
        if any(name == target or name.endswith("." + target) for name in names)
    ]


def load_unet_with_lora(args: argparse.Namespace, device: torch.device, mixed_precision: str):
    """Base UNet (frozen, weight dtype) + a fresh gaussian-init LoRA adapter in float32."""
    from diffusers import UNet2DConditionModel
    from diffusers.training_utils import cast_training_params
    from peft import LoraConfig

    unet = UNet2DConditionModel.from_pretrained(
        args.pretrained_model_name_or_path, subfolder="unet", **_hub_kwargs(args)
    )
    unet.requires_grad_(False)
    config = LoraConfig(
        r=args.rank,
        lora_alpha=args.lora_alpha,
        init_lora_weights="gaussian",
        target_modules=lora_target_modules(unet),
    )
    # Init on the CPU under a fixed seed: the same LoRA start for an identity on any device,
    # whichever process or position it gets.
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(derive_seed(args.seed, "lora-init"))
        unet.add_adapter(config)
    place(unet, device, WEIGHT_DTYPES[mixed_precision])
    cast_training_params(unet, dtype=torch.float32)  # fp16 grads cannot be unscaled
    if args.gradient_checkpointing:
        unet.enable_gradient_checkpointing()
    unet.train()
    return unet


def lora_state_dict(unet: torch.nn.Module) -> dict[str, torch.Tensor]:
    """The UNet's LoRA weights with diffusers key names (unet prefix added on save)."""
    from diffusers.utils import convert_state_dict_to_diffusers
    from peft.utils import get_peft_model_state_dict

    return convert_state_dict_to_diffusers(get_peft_model_state_dict(unet))


def lora_adapter_metadata(unet: torch.nn.Module) -> dict[str, Any]:
    """The adapter's LoraConfig as a dict, sets sorted so that equal LoRAs give equal files."""
    config = unet.peft_config["default"].to_dict()
    return {k: sorted(v) if isinstance(v, (set, frozenset)) else v for k, v in config.items()}


def save_lora(unet: torch.nn.Module, folder: Path) -> Path:
    """Write folder/pytorch_lora_weights.safetensors atomically (load_lora_weights reads it)."""
    from diffusers import StableDiffusionPipeline

    folder.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(dir=folder, prefix=".lora-") as temp_dir:
        StableDiffusionPipeline.save_lora_weights(
            temp_dir,
            unet_lora_layers=lora_state_dict(unet),
            unet_lora_adapter_metadata=lora_adapter_metadata(unet),
            safe_serialization=True,
        )
        publish(Path(temp_dir) / LORA_WEIGHTS_NAME, folder / LORA_WEIGHTS_NAME)
    return folder / LORA_WEIGHTS_NAME


def load_lora_into(unet: torch.nn.Module, folder: Path) -> None:
    """Copy the LoRA weights saved in folder into the UNet's adapter (strict on LoRA keys)."""
    from diffusers import StableDiffusionPipeline
    from diffusers.utils import convert_unet_state_dict_to_peft
    from peft.utils import set_peft_model_state_dict

    state, _ = StableDiffusionPipeline.lora_state_dict(str(folder))
    unet_state = {
        key[len("unet.") :]: value for key, value in state.items() if key.startswith("unet.")
    }
    result = set_peft_model_state_dict(unet, convert_unet_state_dict_to_peft(unet_state), "default")
    unexpected = getattr(result, "unexpected_keys", [])
    if unexpected or not unet_state:
        raise ValueError(
            f"{folder / LORA_WEIGHTS_NAME} does not match this UNet's LoRA "
            f"({len(unet_state)} keys, unexpected: {unexpected[:4]}); was it trained with "
            "another base model or --rank?"
        )


@dataclass
class PromptEmbeddings:
    """Text-encoder outputs of the two prompts, computed once: (1, L, D) each."""

    instance: torch.Tensor
    class_: torch.Tensor

    def for_batch(self, num_instance: int, num_prior: int) -> torch.Tensor:
        """(num_instance + num_prior, L, D) conditioning in batch order [instance..., prior...]."""
        parts = [self.instance.expand(num_instance, -1, -1)]
        if num_prior:
            parts.append(self.class_.expand(num_prior, -1, -1))
        return torch.cat(parts)


@torch.no_grad()
def encode_prompt(frozen: FrozenModels, prompt: str) -> torch.Tensor:
    """(1, L, D) last hidden state of the frozen text encoder."""
    tokens = frozen.tokenizer(
        prompt,
        padding="max_length",
        max_length=frozen.tokenizer.model_max_length,
        truncation=True,
        return_tensors="pt",
    )
    return frozen.text_encoder(tokens.input_ids.to(frozen.device))[0]


def encode_prompts(frozen: FrozenModels, args: argparse.Namespace) -> PromptEmbeddings:
    """Instance and class prompt embeddings, once per run."""
    return PromptEmbeddings(
        encode_prompt(frozen, args.instance_prompt), encode_prompt(frozen, args.class_prompt)
    )


# ============================================================================ data


@dataclass
class FaceTools:
    """Landmark detector + frozen ArcFace encoder shared by every identity of a process."""

    detector: Any
    encoder: torch.nn.Module


def load_face_tools(args: argparse.Namespace, device: torch.device) -> FaceTools:
    """Detector per --face_detector and the frozen ArcFace encoder (fp32) on device."""
    detector = build_face_detector(args.face_detector, args.face_models_root)
    return FaceTools(detector, load_arcface(args.arcface_weights, device=device))


def build_dataset(
    args: argparse.Namespace, instance_dir: Path, face_tools: FaceTools | None
) -> DreamBoothFaceDataset:
    """Face-annotated dataset when ArcFace is given (every loss trains on the same photos),
    else plain DreamBooth (every readable photo); crops are seeded from --seed."""
    return DreamBoothFaceDataset(
        instance_dir,
        face_tools.detector if face_tools is not None else None,
        face_tools.encoder if face_tools is not None else None,
        class_folder=args.class_data_dir if args.with_prior_preservation else None,
        resolution=args.resolution,
        center_crop=args.center_crop,
        seed=args.seed,
    )


def dataset_summary(dataset: DreamBoothFaceDataset) -> dict[str, Any]:
    """Counts of used photos, class photos with / without a detected face, and skipped files."""
    summary = {
        "instance_images": dataset.num_instance_images,
        "class_images": dataset.num_class_images,
    }
    if dataset.classes is not None and dataset.classes.annotated:
        with_face = dataset.num_class_images_with_face
        summary["class_images_with_face"] = with_face
        summary["class_images_without_face"] = dataset.num_class_images - with_face
    for part in ("instance", "classes"):
        photos = getattr(dataset, part)
        if photos is not None:
            summary[f"{part}_skipped"] = photos.report.counts()
    return summary


# ============================================================================ class images


def _class_image_plan(class_dir: Path, wanted: int) -> list[int]:
    """Indices i of class_{i:05d}.png to generate so the folder holds `wanted` usable images.

    Unreadable or too-small files do not count; one named class_{i:05d}.png is regenerated.
    """
    try:
        usable, _ = readable_photos(class_dir)
    except (ValueError, FileNotFoundError):  # no usable image yet, or no folder yet
        usable = []
    existing = {path.name for path in usable}
    missing, indices, index = wanted - len(existing), [], 0
    while len(indices) < missing:
        if f"class_{index:05d}.png" not in existing:
            indices.append(index)
        index += 1
    return indices


def _prior_dtype(args: argparse.Namespace, device: torch.device) -> torch.dtype:
    """--prior_generation_precision, default fp16 on GPU; half precision needs a GPU."""
    dtype = PRIOR_DTYPES[
        args.prior_generation_precision or ("fp16" if device.type == "cuda" else "fp32")
    ]
    if dtype == torch.float16 and device.type != "cuda":
        logger.warning("fp16 class-image sampling needs a GPU; sampling in float32")
        return torch.float32
    return dtype


def generate_class_images(args: argparse.Namespace, state) -> list[Path]:
    """Sample the missing class images with the base model, split across processes.

    Deterministic per image (seed from its index), atomic writes, resumable (existing files are
    kept); every process waits until all are written. Returns the files this process wrote.
    """
    from diffusers import StableDiffusionPipeline

    class_dir = args.class_data_dir
    class_dir.mkdir(parents=True, exist_ok=True)
    plan = _class_image_plan(class_dir, args.num_class_images)
    state.wait_for_everyone()  # nobody writes before every process has planned
    mine = plan[state.process_index :: state.num_processes]
    written: list[Path] = []
    if mine:
        logger.info(
            "sampling %d of %d missing class images into %s", len(mine), len(plan), class_dir
        )
        pipeline = StableDiffusionPipeline.from_pretrained(
            args.pretrained_model_name_or_path,
            **_dtype_kwargs(_prior_dtype(args, state.device)),
            safety_checker=None,
            requires_safety_checker=False,
            **_hub_kwargs(args),
        ).to(state.device)
        pipeline.set_progress_bar_config(disable=True)
        for start in range(0, len(mine), args.sample_batch_size):
            written += _sample_class_batch(
                pipeline, args, class_dir, mine[start : start + args.sample_batch_size]
            )
        del pipeline
        if state.device.type == "cuda":
            torch.cuda.empty_cache()
    state.wait_for_everyone()
    return written


def _sample_class_batch(
    pipeline, args: argparse.Namespace, class_dir: Path, indices: list[int]
) -> list[Path]:
    """Generate and atomically save class_{i:05d}.png for each index."""
    generators = [
        torch.Generator(pipeline.device).manual_seed(derive_seed(args.seed, "class", index))
        for index in indices
    ]
    images = pipeline(
        [args.class_prompt] * len(indices),
        generator=generators,
        height=args.resolution,
        width=args.resolution,
        num_inference_steps=args.class_num_inference_steps,
    ).images
    paths = []
    for index, image in zip(indices, images, strict=True):
        paths.append(class_dir / f"class_{index:05d}.png")
        atomic_save_image(image, paths[-1])
    return paths


# ============================================================================ the training step


def _identity_per_sample(anchor, positive, negative, margin: float) -> torch.Tensor:
    """PortraitBooth-style 1 - cos(a, p), (n,)."""
    return identity_loss(anchor, positive)


def _triplet_per_sample(anchor, positive, negative, margin: float) -> torch.Tensor:
    """ID-Booth max(d(a, p) - d(a, n) + m, 0), (n,)."""
    return triplet_identity_loss(anchor, positive, negative, margin)


IDENTITY_LOSSES: dict[str, Callable[..., torch.Tensor]] = {
    "identity": _identity_per_sample,
    "triplet": _triplet_per_sample,
}
IDENTITY_WEIGHTINGS: dict[str, Callable[[torch.Tensor, int], torch.Tensor]] = {
    "timestep": timestep_weight,
    "none": lambda timesteps, num_train_timesteps: torch.ones_like(timesteps, dtype=torch.float32),
}


def identity_mask(batch: dict[str, Any], loss: str, device: torch.device) -> torch.Tensor:
    """(n,) bool: instance samples that get the identity term. Instance photos all have a face;
    the triplet also needs the paired class image's face (its negative e_prior). Batches without
    `has_face` (every photo has a face) mask nothing."""
    n = batch["num_instance"]
    has_face = batch.get("has_face")
    if has_face is None:
        return torch.ones(n, dtype=torch.bool, device=device)
    has_face = has_face.to(device, non_blocking=True)  # (B,) [instance..., prior...]
    mask = has_face[:n]
    if loss == "triplet":
        mask = mask & has_face[n : 2 * n]
    return mask


def decode_x0(
    frozen: FrozenModels, noisy_latents: torch.Tensor, model_pred: torch.Tensor, timesteps
) -> torch.Tensor:
    """x0_hat in fp32 -> frozen VAE decode in its weight dtype (with grad): (n, 3, R, R)."""
    scheduler, vae = frozen.noise_scheduler, frozen.vae
    x0 = predict_x0(
        noisy_latents.float(),
        model_pred.float(),
        timesteps,
        scheduler.alphas_cumprod,
        scheduler.config.prediction_type,
    )  # (n, 4, R/8, R/8) float32
    # No clamp to [-1, 1]: it would zero the gradient of every saturated pixel.
    return vae.decode((x0 / vae.config.scaling_factor).to(vae.dtype)).sample


def masked_mean(values: torch.Tensor, mask: torch.Tensor, count: torch.Tensor) -> torch.Tensor:
    """sum_i [mask_i] values_i / max(count, 1): 0 when nothing is selected, without a sync."""
    return torch.where(mask, values, torch.zeros_like(values)).sum() / count.clamp_min(1)


def identity_terms(
    frozen: FrozenModels,
    noisy_latents: torch.Tensor,
    model_pred: torch.Tensor,
    timesteps: torch.Tensor,
    batch: dict[str, Any],
    args: argparse.Namespace,
) -> dict[str, torch.Tensor]:
    """identity_term = mean_i w_i L_i, identity_loss = mean_i L_i, identity_weight = mean_i w_i
    over the instance samples i of identity_mask, and identity_count = their number.

    x0_hat -> VAE decode (with grad) -> 5-point alignment with the photo's landmarks (pixels of
    the training crop = pixels of the decoded image) -> frozen ArcFace -> L against e_inst
    (and e_prior of the same batch position for the triplet). The alignment, ArcFace and L run
    in fp32 outside autocast, like the precomputed e_inst / e_prior.
    """
    n, device = batch["num_instance"], frozen.device
    decoded = decode_x0(frozen, noisy_latents[:n], model_pred[:n], timesteps[:n])  # (n, 3, R, R)
    landmarks = batch["landmarks"][:n].to(device, torch.float32)  # (n, 5, 2)
    embeddings = batch["embeddings"].to(device, torch.float32)  # (B, D)
    negative = embeddings[n : 2 * n] if embeddings.shape[0] >= 2 * n else None
    with torch.autocast(device.type, enabled=False):
        faces = align_faces_torch(decoded.float(), landmarks, fill=-1.0)  # (n, 3, 112, 112)
        anchor = frozen.arcface(faces)  # (n, 512) float32, unit norm
        per_sample = IDENTITY_LOSSES[args.loss](
            anchor, embeddings[:n], negative, args.triplet_margin
        )  # (n,)
    weight = IDENTITY_WEIGHTINGS[args.identity_loss_weighting](
        timesteps[:n], frozen.noise_scheduler.config.num_train_timesteps
    )  # (n,) float32
    mask = identity_mask(batch, args.loss, device)  # (n,) bool
    count = mask.sum()
    return {
        "identity_term": masked_mean(weight * per_sample, mask, count),
        "identity_loss": masked_mean(per_sample, mask, count),
        "identity_weight": masked_mean(weight, mask, count),
        "identity_count": count.float(),
    }


def compute_losses(
    unet: torch.nn.Module,
    frozen: FrozenModels,
    prompts: PromptEmbeddings,
    batch: dict[str, Any],
    generator: torch.Generator,
    args: argparse.Namespace,
) -> dict[str, torch.Tensor]:
    """One forward pass on a [instance..., prior...] batch -> every TERM_NAMES scalar (device).

    All randomness (VAE sample, noise, timesteps) comes from `generator`; no host syncs.
    """
    device, scheduler = frozen.device, frozen.noise_scheduler
    pixels = batch["pixel_values"].to(
        device, frozen.weight_dtype, non_blocking=True
    )  # (B, 3, R, R)
    num_instance, batch_size = batch["num_instance"], pixels.shape[0]
    with torch.no_grad():
        latent_dist = frozen.vae.encode(pixels).latent_dist
        latents = latent_dist.sample(generator) * frozen.vae.config.scaling_factor  # (B, 4, h, w)
    noise = torch.randn(latents.shape, generator=generator, device=device, dtype=latents.dtype)
    timesteps = torch.randint(
        0, scheduler.config.num_train_timesteps, (batch_size,), generator=generator, device=device
    )
    noisy_latents = scheduler.add_noise(latents, noise, timesteps)
    text = prompts.for_batch(num_instance, batch_size - num_instance)  # (B, L, D)
    model_pred = unet(noisy_latents, timesteps, text, return_dict=False)[0]
    target = diffusion_target(noise, latents, timesteps, scheduler)
    loss, instance_loss, prior_loss = prior_preservation_loss(
        model_pred, target, num_instance, args.prior_loss_weight
    )
    zero = loss.new_zeros(())
    terms = {
        "diffusion_loss": instance_loss,
        "prior_loss": prior_loss,
        "identity_loss": zero,
        "identity_term": zero,
        "identity_weight": zero,
        "identity_count": zero,
    }
    if args.loss != "dreambooth":
        terms.update(identity_terms(frozen, noisy_latents, model_pred, timesteps, batch, args))
        loss = loss + terms["identity_term"]
    terms["loss"] = loss
    return terms


class NonFiniteWatch:
    """Remembers, on the device, the first step whose loss terms held NaN/inf.

    Updating costs a few tiny device ops and no sync; check() reads it (one sync) and is called
    at log intervals, before every checkpoint and before the final save, so a bad state is never
    saved and the step number reported is exact.
    """

    def __init__(self, device: torch.device) -> None:
        self.first_step = torch.full((), -1, dtype=torch.long, device=device)
        self.bad_terms = torch.zeros(len(TERM_NAMES), dtype=torch.bool, device=device)

    def update(self, values: torch.Tensor, step: int) -> None:
        """values: (len(TERM_NAMES),) of one micro-batch at optimizer step `step`."""
        bad = ~torch.isfinite(values)
        first = bad.any() & (self.first_step < 0)
        self.first_step = torch.where(
            first, torch.full_like(self.first_step, step), self.first_step
        )
        self.bad_terms = torch.where(first, bad, self.bad_terms)

    def check(self, where: str) -> None:
        """Raise NonFiniteLossError naming the step and the offending terms."""
        step = int(self.first_step.item())
        if step < 0:
            return
        names = [name for name, bad in zip(TERM_NAMES, self.bad_terms.tolist(), strict=True) if bad]
        raise NonFiniteLossError(
            f"non-finite loss at step {step} (terms: {', '.join(names)}); training stopped "
            f"before saving; {where}. Try a lower --learning_rate or --mixed_precision bf16/no, "
            "and check the training photos"
        )


class RunningMeans:
    """Sums the per-step term vectors on the device; the host reads them only on pop().

    Per-sample terms (the identity loss and its weight) are averaged over the instance samples
    that had the identity term, so a micro-batch without any (its class image faceless) does not
    pull the logged mean towards 0; the other terms are averaged over micro-batches.
    """

    def __init__(self, device: torch.device) -> None:
        self.sums = torch.zeros(len(TERM_NAMES), dtype=torch.float64, device=device)
        self.sample_sums = torch.zeros(len(PER_SAMPLE_TERMS), dtype=torch.float64, device=device)
        self.count = 0

    def add(self, values: torch.Tensor) -> None:
        self.sums += values
        self.sample_sums += values[PER_SAMPLE_INDICES] * values[IDENTITY_COUNT_INDEX]
        self.count += 1

    def pop(self) -> dict[str, float]:
        """Means since the last pop (one sync), then reset."""
        means = self.sums / max(self.count, 1)
        samples = self.sums[IDENTITY_COUNT_INDEX].clamp_min(1)
        means[PER_SAMPLE_INDICES] = self.sample_sums / samples
        self.sums.zero_()
        self.sample_sums.zero_()
        self.count = 0
        return dict(zip(TERM_NAMES, means.tolist(), strict=True))


# ============================================================================ per-identity loop


def _make_writer(args: argparse.Namespace, folder: Path):
    """TensorBoard SummaryWriter in folder/--logging_dir, or None for --report_to none."""
    if args.report_to == "none":
        return None
    from torch.utils.tensorboard import SummaryWriter

    return SummaryWriter(log_dir=str(folder / args.logging_dir))


def _changed(saved: dict, current: dict, keys: tuple[str, ...], label: str = "") -> list[str]:
    """'label key: saved -> current' for each key present in `saved` whose value differs."""
    return [
        f"{label}{key}: {saved[key]!r} -> {current.get(key)!r}"
        for key in keys
        if key in saved and saved[key] != current.get(key)
    ]


def resume_mismatches(saved: dict[str, Any], current: dict[str, Any]) -> list[str]:
    """Differences that forbid resuming, between a checkpoint's training_config.json and the
    resuming run's config: RESUME_KEYS arguments, RESUME_RESOLVED_KEYS, RESUME_DATA_KEYS and
    the ArcFace weights, by content (their name holds a sha256 prefix; the path when a saved
    config lacks the name). Keys a saved config does not hold are not compared."""
    changed = _changed(saved["args"], current["args"], RESUME_KEYS)
    changed += _changed(saved.get("resolved", {}), current["resolved"], RESUME_RESOLVED_KEYS)
    changed += _changed(saved.get("data", {}), current["data"], RESUME_DATA_KEYS, "data ")
    if "arcface" in saved:
        changed += _changed(saved, current, ("arcface",), "ArcFace weights ")
    else:
        changed += _changed(saved["args"], current["args"], ("arcface_weights",))
    return changed


class IdentityTrainer:
    """Trains one identity's LoRA: data, optimizer, loop, checkpoints, validation, outputs."""

    def __init__(self, args, identity: Identity, frozen: FrozenModels, face_tools, state) -> None:
        from diffusers.optimization import get_scheduler

        self.args, self.identity, self.frozen, self.state = args, identity, frozen, state
        self.device = frozen.device
        self.arcface_name = face_tools.encoder.name if face_tools is not None else None
        self.dataset = build_dataset(args, identity.instance_dir, face_tools)
        self.batches_per_epoch = math.ceil(len(self.dataset) / args.train_batch_size)
        self.updates_per_epoch = math.ceil(
            self.batches_per_epoch / args.gradient_accumulation_steps
        )
        self.max_train_steps = (
            args.max_train_steps or args.num_train_epochs * self.updates_per_epoch
        )
        self.num_epochs = math.ceil(self.max_train_steps / self.updates_per_epoch)
        self.checkpointing_steps = args.checkpointing_steps or 8 * self.updates_per_epoch
        self.validation_steps = args.validation_steps or self.checkpointing_steps
        self.unet = load_unet_with_lora(args, self.device, frozen.mixed_precision)
        self.lora_parameters = [p for p in self.unet.parameters() if p.requires_grad]
        learning_rate = args.learning_rate
        if args.scale_lr:
            learning_rate *= args.train_batch_size * args.gradient_accumulation_steps
        self.optimizer = torch.optim.AdamW(
            self.lora_parameters,
            lr=learning_rate,
            betas=(args.adam_beta1, args.adam_beta2),
            weight_decay=args.adam_weight_decay,
            eps=args.adam_epsilon,
        )
        self.lr_scheduler = get_scheduler(
            args.lr_scheduler,
            self.optimizer,
            num_warmup_steps=args.lr_warmup_steps,
            num_training_steps=self.max_train_steps,
            num_cycles=args.lr_num_cycles,
            power=args.lr_power,
        )
        self.scaler = torch.amp.GradScaler(
            self.device.type, enabled=frozen.mixed_precision == "fp16"
        )
        self.prompts = encode_prompts(frozen, args)
        self.generator = torch.Generator(self.device)
        self.watch = NonFiniteWatch(self.device)
        self.interval_means, self.epoch_means = RunningMeans(self.device), RunningMeans(self.device)
        self.global_step, self.last_validated = 0, -1
        # Instance samples that had the identity term, summed on the device (read when logging).
        self.identity_samples = torch.zeros((), dtype=torch.long, device=self.device)
        self.collate = partial(collate_dreambooth, with_prior=args.with_prior_preservation)
        self.writer = self.progress = None

    # ------------------------------------------------------------------ setup and outputs

    def config(self, status: str) -> dict[str, Any]:
        """Everything needed to reproduce or resume this identity's run."""
        return {
            "status": status,
            "identity": self.identity.name,
            "instance_data_dir": str(self.identity.instance_dir),
            "args": json_safe(self.args),
            "resolved": {
                "max_train_steps": self.max_train_steps,
                "num_train_epochs": self.num_epochs,
                "steps_per_epoch": self.updates_per_epoch,
                "checkpointing_steps": self.checkpointing_steps,
                "validation_steps": self.validation_steps,
                "mixed_precision": self.frozen.mixed_precision,
                "lora_target_modules": lora_target_modules(self.unet),
                "device": str(self.device),
                "process_index": self.state.process_index,
                "num_processes": self.state.num_processes,
            },
            "data": dataset_summary(self.dataset),
            "arcface": self.arcface_name,
            "global_step": self.global_step,
            "identity_samples": int(self.identity_samples.item()),
            "versions": library_versions(),
        }

    def write_config(self, folder: Path, status: str) -> None:
        atomic_write_json(folder / CONFIG_NAME, self.config(status))

    def resume(self) -> None:
        """Restore LoRA, optimizer, scheduler, grad scaler and step from a checkpoint."""
        folder = self._resume_folder()
        if folder is None:
            return
        self._check_resume_config(folder)
        load_lora_into(self.unet, folder)
        state = torch.load(
            folder / TRAINING_STATE_NAME, map_location=self.device, weights_only=True
        )
        self.optimizer.load_state_dict(state["optimizer"])
        self.lr_scheduler.load_state_dict(state["lr_scheduler"])
        if self.scaler.is_enabled() and state["grad_scaler"]:
            self.scaler.load_state_dict(state["grad_scaler"])
        self.global_step = int(state["global_step"])
        self.identity_samples.fill_(int(state["identity_samples"]))
        logger.info("%s: resumed from %s at step %d", self.identity.name, folder, self.global_step)

    def _resume_folder(self) -> Path | None:
        value = self.args.resume_from_checkpoint
        if value is None:
            return None
        if value != "latest":
            return resolve_checkpoint_path(value, self.identity.output_dir)
        checkpoints = list_checkpoints(self.identity.output_dir)
        if not checkpoints:
            logger.info("%s: no checkpoint to resume from; starting a new run", self.identity.name)
            return None
        return checkpoints[-1][1]

    def _check_resume_config(self, folder: Path) -> None:
        """ValueError when the checkpoint was made with different settings (resume_mismatches)."""
        config_path = folder / CONFIG_NAME
        if not config_path.is_file():
            return
        changed = resume_mismatches(json.loads(config_path.read_text()), self.config("resuming"))
        if changed:
            raise ValueError(
                f"checkpoint {folder} was trained with other settings ({'; '.join(changed)}); "
                "resume with the same ones, or pass --overwrite to start over"
            )

    def save_checkpoint(self) -> Path:
        """checkpoint-N: LoRA (loadable as is), optimizer/scheduler/scaler state, config."""
        self.watch.check(f"checkpoint-{self.global_step} was not written")
        folder = self.identity.output_dir / f"checkpoint-{self.global_step}"
        with atomic_folder(folder) as temp:
            save_lora(self.unet, temp)
            state = {
                "optimizer": self.optimizer.state_dict(),
                "lr_scheduler": self.lr_scheduler.state_dict(),
                "grad_scaler": self.scaler.state_dict(),
                "global_step": self.global_step,
                "identity_samples": int(self.identity_samples.item()),
            }
            torch.save(state, temp / TRAINING_STATE_NAME)
            self.write_config(temp, "checkpoint")
        self._prune_checkpoints()
        logger.info("%s: saved %s", self.identity.name, folder)
        return folder

    def _prune_checkpoints(self) -> None:
        limit = self.args.checkpoints_total_limit
        checkpoints = list_checkpoints(self.identity.output_dir)
        if limit is None or len(checkpoints) <= limit:
            return
        for _, path in checkpoints[: len(checkpoints) - limit]:
            shutil.rmtree(path)

    @torch.no_grad()
    def validate(self) -> list[Path]:
        """validation/step_N_i.png from --validation_prompt with the current LoRA."""
        from diffusers import DDPMScheduler, StableDiffusionPipeline

        if not self.args.validation_prompt or self.args.num_validation_images == 0:
            return []
        frozen, args = self.frozen, self.args
        pipeline = StableDiffusionPipeline(
            vae=frozen.vae,
            text_encoder=frozen.text_encoder,
            tokenizer=frozen.tokenizer,
            unet=self.unet,
            scheduler=DDPMScheduler.from_config(frozen.noise_scheduler.config),
            safety_checker=None,
            feature_extractor=None,
            requires_safety_checker=False,
        )
        pipeline.set_progress_bar_config(disable=True)
        folder = self.identity.output_dir / "validation"
        folder.mkdir(parents=True, exist_ok=True)
        self.unet.eval()
        paths = []
        for index in range(args.num_validation_images):
            generator = torch.Generator(self.device).manual_seed(
                derive_seed(args.seed, "validation", index)
            )
            with frozen.autocast():
                image = pipeline(
                    args.validation_prompt,
                    negative_prompt=args.validation_negative_prompt or None,
                    num_inference_steps=args.validation_num_inference_steps,
                    guidance_scale=args.validation_guidance_scale,
                    height=args.resolution,
                    width=args.resolution,
                    generator=generator,
                ).images[0]
            paths.append(folder / f"step_{self.global_step}_{index}.png")
            atomic_save_image(image, paths[-1])
            if self.writer is not None:
                self.writer.add_image(
                    f"validation/{index}", np.asarray(image), self.global_step, dataformats="HWC"
                )
        self.unet.train()
        self.last_validated = self.global_step
        return paths

    def write_model_card(self) -> None:
        args = self.args
        images = sorted(
            (self.identity.output_dir / "validation").glob(f"step_{self.global_step}_*.png")
        )
        card = MODEL_CARD.format(
            base=args.pretrained_model_name_or_path,
            instance_prompt=args.instance_prompt,
            identity=self.identity.name,
            loss=args.loss,
            steps=self.global_step,
            rank=args.rank,
            alpha=args.lora_alpha,
            data=json.dumps(dataset_summary(self.dataset)),
            validation_prompt=args.validation_prompt,
            images="\n".join(f"![{p.stem}](validation/{p.name})" for p in images) or "(none)",
        )
        atomic_write_text(self.identity.output_dir / "README.md", card)

    # ------------------------------------------------------------------ the loop

    def run(self) -> dict[str, Any]:
        """Train to max_train_steps (resuming if asked) and write the final outputs."""
        start_time = time.time()
        self.identity.output_dir.mkdir(parents=True, exist_ok=True)
        remove_stale_temporaries(self.identity.output_dir)
        self.resume()
        self.write_config(self.identity.output_dir, "running")
        self.writer = _make_writer(self.args, self.identity.output_dir)
        self.progress = _progress_bar(self)
        try:
            first_epoch = self.global_step // self.updates_per_epoch
            for epoch in range(first_epoch, self.num_epochs):
                if self.global_step >= self.max_train_steps:
                    break
                self._train_epoch(epoch)
            self.finish()
        finally:
            self.progress.close()
            if self.writer is not None:
                self.writer.close()
        seconds = time.time() - start_time
        logger.info(
            "%s: finished %d steps in %.1f s", self.identity.name, self.global_step, seconds
        )
        return {"identity": self.identity.name, "steps": self.global_step, "seconds": seconds}

    def _loader(self, epoch: int, start_batch: int) -> DataLoader:
        """This epoch's batches from start_batch on: order and crops are functions of the seed,
        epoch and position (resume = skipping batches, nothing to replay)."""
        order = torch.randperm(
            len(self.dataset),
            generator=torch.Generator().manual_seed(derive_seed(self.args.seed, "order", epoch)),
        ).tolist()
        size = self.args.train_batch_size
        batches = [order[i : i + size] for i in range(0, len(order), size)][start_batch:]
        self.dataset.set_epoch(epoch)  # crops of this epoch: seeded by (--seed, epoch, index)
        return DataLoader(
            self.dataset,
            batch_sampler=batches,
            collate_fn=self.collate,
            num_workers=self.args.dataloader_num_workers,
            pin_memory=self.device.type == "cuda",
        )

    def _train_epoch(self, epoch: int) -> None:
        accumulation = self.args.gradient_accumulation_steps
        start_batch = (self.global_step - epoch * self.updates_per_epoch) * accumulation
        for batch_index, batch in enumerate(self._loader(epoch, start_batch), start=start_batch):
            self.forward_backward(batch, derive_seed(self.args.seed, "noise", epoch, batch_index))
            last_of_epoch = batch_index == self.batches_per_epoch - 1
            if (batch_index + 1) % accumulation and not last_of_epoch:
                continue
            self.optimizer_step()
            self._after_update()
            if self.global_step >= self.max_train_steps:
                break
        self._log_epoch(epoch)

    def forward_backward(self, batch: dict[str, Any], seed: int) -> dict[str, torch.Tensor]:
        """Losses of one micro-batch (noise from `seed`), backward of loss / accumulation."""
        self.generator.manual_seed(seed)
        with self.frozen.autocast():
            terms = compute_losses(
                self.unet, self.frozen, self.prompts, batch, self.generator, self.args
            )
        self.scaler.scale(terms["loss"] / self.args.gradient_accumulation_steps).backward()
        values = torch.stack([terms[name].detach().double() for name in TERM_NAMES])  # (K,)
        self.watch.update(values, self.global_step + 1)
        self.interval_means.add(values)
        self.epoch_means.add(values)
        self.identity_samples += terms["identity_count"].detach().round().long()
        return terms

    def optimizer_step(self) -> None:
        """Unscale, clip, step (skipped by the fp16 scaler on inf grads), schedule, zero."""
        self.scaler.unscale_(self.optimizer)
        torch.nn.utils.clip_grad_norm_(self.lora_parameters, self.args.max_grad_norm)
        # With fp16 the scaler syncs here anyway (it must know whether grads were finite);
        # like accelerate, the schedule only advances when the optimizer really stepped.
        scale = self.scaler.get_scale() if self.scaler.is_enabled() else 1.0
        self.scaler.step(self.optimizer)
        self.scaler.update()
        if not self.scaler.is_enabled() or self.scaler.get_scale() >= scale:
            self.lr_scheduler.step()
        self.optimizer.zero_grad(set_to_none=True)
        self.global_step += 1
        if self.progress is not None:
            self.progress.update(1)

    def _after_update(self) -> None:
        step = self.global_step
        if step % self.args.logging_steps == 0 or step == self.max_train_steps:
            self._log_interval()
        if step % self.checkpointing_steps == 0:
            self.save_checkpoint()
        if step % self.validation_steps == 0:
            self.watch.check("no validation images were made")
            self.validate()

    def _tags(self) -> dict[str, str]:
        """TensorBoard tag per logged term (identity terms only for identity losses)."""
        tags = {"loss": "loss", "diffusion_loss": "diffusion_loss", "prior_loss": "prior_loss"}
        if self.args.loss != "dreambooth":
            tags.update(
                identity_loss=f"{self.args.loss}_loss",
                identity_term="identity_term",
                identity_weight="identity_weight",
                identity_count="identity_samples_per_batch",
            )
        return tags

    def _log_interval(self) -> None:
        self.watch.check(f"last checkpoint kept in {self.identity.output_dir}")
        means = self.interval_means.pop()
        lr = self.lr_scheduler.get_last_lr()[0]
        postfix = {tag: f"{means[name]:.4g}" for name, tag in self._tags().items()}
        if self.progress is not None:
            self.progress.set_postfix(postfix | {"lr": f"{lr:.2e}"}, refresh=False)
        if self.writer is None:
            return
        for name, tag in self._tags().items():
            self.writer.add_scalar(f"train/{tag}", means[name], self.global_step)
        self.writer.add_scalar("train/lr", lr, self.global_step)
        if self.args.loss != "dreambooth":
            self.writer.add_scalar(
                "train/identity_samples", int(self.identity_samples.item()), self.global_step
            )

    def _log_epoch(self, epoch: int) -> None:
        if self.epoch_means.count == 0:
            return
        self.watch.check(f"last checkpoint kept in {self.identity.output_dir}")
        means = self.epoch_means.pop()
        text = ", ".join(f"{tag} {means[name]:.4g}" for name, tag in self._tags().items())
        logger.info("%s: epoch %d means: %s", self.identity.name, epoch, text)
        if self.writer is not None:
            for name, tag in self._tags().items():
                self.writer.add_scalar(f"epoch/{tag}", means[name], epoch)

    def finish(self) -> None:
        """Final validation, config and model card, then the LoRA (the 'finished' marker)."""
        self.watch.check(
            f"no final LoRA written; last checkpoint kept in {self.identity.output_dir}"
        )
        if self.last_validated != self.global_step:
            self.validate()
        self.write_config(self.identity.output_dir, "finished")
        self.write_model_card()
        save_lora(self.unet, self.identity.output_dir)


def _progress_bar(trainer: IdentityTrainer):
    from tqdm.auto import tqdm

    return tqdm(
        total=trainer.max_train_steps,
        initial=trainer.global_step,
        desc=f"[{trainer.state.process_index}] {trainer.identity.name}",
        position=trainer.state.local_process_index,
        dynamic_ncols=True,
    )


MODEL_CARD = """---
base_model: {base}
instance_prompt: {instance_prompt}
tags:
- stable-diffusion
- text-to-image
- diffusers
- lora
- id-booth
---

# ID-Booth LoRA: {identity}

LoRA weights (rank {rank}, alpha {alpha}) for `{base}`, trained on the photos of one identity with
the `{loss}` loss (ID-Booth: DreamBooth prior preservation + triplet identity loss) for {steps}
steps. Data: {data}.

```python
from diffusers import StableDiffusionPipeline

pipe = StableDiffusionPipeline.from_pretrained("{base}")
pipe.load_lora_weights("path/to/this/folder")
image = pipe("face portrait photo of sks person, forest background").images[0]
```

Validation prompt: `{validation_prompt}`

{images}

Training arguments, resolved settings and library versions: `training_config.json`.
"""


# ============================================================================ main


def _configure_logging(state) -> None:
    """INFO logs with the rank, unless the host program (e.g. pytest) configured logging."""
    if logging.getLogger().handlers:
        return
    logging.basicConfig(
        format=f"%(asctime)s [rank {state.process_index}] %(levelname)s %(name)s: %(message)s",
        level=logging.INFO,
    )


def prepare_class_data(args: argparse.Namespace, state, face_tools: FaceTools | None) -> None:
    """Generate missing class images; annotate them once (rank 0 first, others read the cache).
    Faceless class images are kept: they serve the prior loss."""
    if not args.with_prior_preservation:
        return
    generate_class_images(args, state)
    if face_tools is not None:
        with state.main_process_first():
            annotate_photos(args.class_data_dir, face_tools.detector, face_tools.encoder)


def main(args: argparse.Namespace) -> dict[str, list]:
    """Split identities over processes, train each not yet finished, return what happened."""
    from accelerate import PartialState

    state = PartialState(cpu=not torch.cuda.is_available())  # torchrun on CPU -> gloo
    _configure_logging(state)
    identities = discover_identities(args)
    if args.instance_data_dir is not None and state.num_processes > 1:
        raise ValueError(
            f"--instance_data_dir trains one identity in one process, but {state.num_processes} "
            "were launched: use --identities_root to spread identities over processes"
        )
    mine = identities[state.process_index :: state.num_processes]
    logger.info(
        "process %d/%d: identities %s",
        state.process_index,
        state.num_processes,
        [i.name for i in mine],
    )
    check_unfinished_runs(mine, args)
    if args.allow_tf32 and torch.cuda.is_available():
        torch.backends.cuda.matmul.allow_tf32 = True
        torch.backends.cudnn.allow_tf32 = True
    face_tools = load_face_tools(args, state.device) if args.arcface_weights is not None else None
    prepare_class_data(args, state, face_tools)
    todo = [identity for identity in mine if args.overwrite or not is_finished(identity)]
    skipped = [identity.name for identity in mine if identity not in todo]
    if skipped:
        logger.info("skipping finished identities (pass --overwrite to retrain): %s", skipped)
    results = []
    if todo:
        mixed_precision = resolve_mixed_precision(args.mixed_precision, state.device)
        arcface = (
            face_tools.encoder if face_tools is not None and args.loss != "dreambooth" else None
        )
        frozen = load_frozen_models(args, state.device, mixed_precision, arcface)
        for identity in todo:
            if args.overwrite:
                clear_outputs(identity, args.logging_dir)
            logger.info("training identity %s -> %s", identity.name, identity.output_dir)
            results.append(IdentityTrainer(args, identity, frozen, face_tools, state).run())
    if state.num_processes > 1:
        state.destroy_process_group()
    return {"trained": results, "skipped": skipped}


if __name__ == "__main__":
    try:
        main(parse_args())
    except (ValueError, OSError, NonFiniteLossError) as error:  # the message, no traceback
        raise SystemExit(f"train_ID-Booth.py: error: {error}") from None
