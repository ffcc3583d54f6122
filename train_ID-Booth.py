"""Train one ID-Booth LoRA per identity: DreamBooth prior preservation + a triplet identity loss.

Per identity, a rank-4 LoRA of the SD 2.1-base UNet learns the person's photos under the
objective of losses.py (paper: https://arxiv.org/abs/2504.07392, reference code:
https://github.com/dariant/ID-Booth): the diffusion and prior-preservation losses plus, for
`--loss identity|triplet`, an identity term on every instance sample: the one-step estimate x0_hat
(fp32) is decoded by the frozen VAE with gradients, aligned to the ArcFace template with the 5
landmarks of the training photo (carried through its resize + crop) and embedded by a frozen
ArcFace (fp32). Class images without a detected face stay in the prior loss; the instance
sample paired with one gets no triplet term (masked on the device, and counted). Defaults are
the paper's reference setup.

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
import time
from dataclasses import dataclass
from functools import partial
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch.utils.data import DataLoader

import runs
from arcface import load_arcface
from datasets import DreamBoothFaceDataset, collate_dreambooth, scan_photos
from faces import (
    DEFAULT_FACE_MODELS_ROOT,
    FACE_DETECTOR_NAMES,
    align_faces_torch,
    build_face_detector,
)
from fileio import atomic_write_json, stable_seed
from lora import (
    LORA_WEIGHTS_NAME,
    add_gaussian_lora,
    load_lora_into,
    lora_target_modules,
    save_lora,
    write_model_card,
)
from losses import (
    TERM_NAMES,
    ObjectiveConfig,
    diffusion_target,
    identity_terms,
    objective,
    predict_x0,
)
from runs import (
    NON_NEGATIVE,
    NON_NEGATIVE_INT,
    POSITIVE,
    POSITIVE_INT,
    SEED,
    Identity,
    NonFiniteLossError,
    NonFiniteWatch,
    Number,
    RunningMeans,
)
from sampling import generate_class_images, load_pipeline, sample_one_by_one

logger = logging.getLogger("train_ID-Booth")

TRAINING_STATE_NAME = "training_state.pt"
CONFIG_NAME = "training_config.json"
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
# Arguments that MAY differ between a checkpoint and the run resuming it: where outputs and logs
# go, how often they are written, worker counts, and paths whose content is compared instead.
# Every other argument, including any added later, must match (a changed optimizer setting
# would otherwise be silently overridden by the restored optimizer state).
RESUME_MAY_CHANGE = frozenset(
    "output_dir overwrite resume_from_checkpoint logging_dir report_to logging_steps "  # noqa: SIM905
    "checkpointing_steps checkpoints_total_limit validation_prompt validation_negative_prompt "
    "validation_steps num_validation_images validation_num_inference_steps "
    "validation_guidance_scale dataloader_num_workers gradient_checkpointing allow_tf32 "
    # compared through the resolved max_train_steps:
    "num_train_epochs max_train_steps "
    # paths and class-image sampling: the photos are compared through the data summary
    "instance_data_dir identities_root class_data_dir sample_batch_size "
    "class_num_inference_steps prior_generation_precision face_models_root "
    # compared by content (the encoder's name holds a sha256 prefix of the weights):
    "arcface_weights".split()
)
# Resolved values that must match: total steps (--max_train_steps or --num_train_epochs; the
# schedule depends on it), steps per epoch (the data order) and the precision actually used.
RESUME_RESOLVED_KEYS = ("max_train_steps", "steps_per_epoch", "mixed_precision")
# Data counts that must match (a changed photo set re-pairs instance and class images).
RESUME_DATA_KEYS = (
    "instance_images",
    "class_images",
    "class_images_with_face",
    "instance_sha256",  # the photos by content: another person's photos never resume a run
    "class_sha256",
)


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
        choices=FACE_DETECTOR_NAMES,
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
        "--prior_loss_weight", type=NON_NEGATIVE, default=1.0, help="Weight of the prior loss."
    )
    parser.add_argument(
        "--num_class_images",
        type=POSITIVE_INT,
        default=200,
        help="Class images per identity: exactly the first N usable ones of --class_data_dir "
        "in file-name order (missing ones are sampled with --class_prompt first). All serve "
        "the prior loss; an instance sample paired with a class image "
        "without a detected face gets no triplet term (counted in the logs).",
    )
    parser.add_argument(
        "--sample_batch_size",
        type=POSITIVE_INT,
        default=4,
        help="Batch size for class-image sampling.",
    )
    parser.add_argument(
        "--class_num_inference_steps",
        type=POSITIVE_INT,
        default=50,
        help="Sampler steps per generated class image.",
    )
    parser.add_argument(
        "--prior_generation_precision",
        default=None,
        choices=["no", "fp32", "fp16", "bf16"],
        help="Precision of class-image sampling (default: fp16 on GPU, else fp32).",
    )
    parser.add_argument(
        "--resolution",
        type=Number(int, low=8, multiple_of=8),
        default=512,
        help="Training image size.",
    )
    parser.add_argument(
        "--center_crop",
        action="store_true",
        help="Center crop after resizing instead of a random crop.",
    )
    parser.add_argument(
        "--dataloader_num_workers",
        type=NON_NEGATIVE_INT,
        default=0,
        help="Data loading subprocesses.",
    )


def _add_loss_args(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "--loss",
        default="triplet",
        choices=["dreambooth", "identity", "triplet"],
        help="dreambooth: diffusion + prior only; identity: + (1 - cos); triplet: ID-Booth.",
    )
    parser.add_argument(
        "--triplet_margin", type=NON_NEGATIVE, default=1.0, help="Margin m of the triplet loss."
    )
    parser.add_argument(
        "--clamp_decoded_x0",
        action=argparse.BooleanOptionalAction,
        default=True,
        help="Clamp the decoded x0_hat to [-1, 1] before the face crop, as the reference code "
        "does; --no-clamp_decoded_x0 keeps the gradient of saturated pixels.",
    )
    parser.add_argument(
        "--identity_loss_weighting",
        default="timestep",
        choices=["timestep", "none"],
        help="Per-sample weight of the identity term: (1 - t/T)^2 or 1.",
    )


def _add_optimisation_args(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--rank", type=POSITIVE_INT, default=4, help="LoRA rank.")
    parser.add_argument(
        "--lora_alpha", type=POSITIVE, default=4, help="LoRA alpha (scale alpha/r)."
    )
    parser.add_argument("--seed", type=SEED, default=0, help="Seed of init, data order and noise.")
    parser.add_argument(
        "--train_batch_size",
        type=POSITIVE_INT,
        default=1,
        help="Instance images per step (each paired with one class image).",
    )
    parser.add_argument(
        "--num_train_epochs", type=POSITIVE_INT, default=32, help="Training epochs."
    )
    parser.add_argument(
        "--max_train_steps",
        type=POSITIVE_INT,
        default=None,
        help="Optimizer steps per identity; overrides --num_train_epochs.",
    )
    parser.add_argument(
        "--gradient_accumulation_steps",
        type=POSITIVE_INT,
        default=1,
        help="Batches per optimizer step.",
    )
    parser.add_argument(
        "--gradient_checkpointing",
        action="store_true",
        help="Recompute UNet and VAE-decoder activations in backward to save memory.",
    )
    parser.add_argument("--learning_rate", type=POSITIVE, default=1e-4, help="AdamW learning rate.")
    parser.add_argument(
        "--scale_lr",
        action="store_true",
        help="Multiply the learning rate by batch size * gradient accumulation steps.",
    )
    parser.add_argument(
        "--lr_scheduler", default="cosine", choices=LR_SCHEDULERS, help="Learning rate schedule."
    )
    parser.add_argument(
        "--lr_warmup_steps", type=NON_NEGATIVE_INT, default=0, help="Warm-up steps."
    )
    parser.add_argument(
        "--lr_num_cycles", type=POSITIVE_INT, default=1, help="Restarts of cosine_with_restarts."
    )
    parser.add_argument("--lr_power", type=POSITIVE, default=1.0, help="Power of 'polynomial'.")
    parser.add_argument(
        "--adam_beta1",
        type=Number(float, low=0, high=1, high_open=True),
        default=0.9,
        help="AdamW beta1.",
    )
    parser.add_argument(
        "--adam_beta2",
        type=Number(float, low=0, high=1, high_open=True),
        default=0.999,
        help="AdamW beta2.",
    )
    parser.add_argument("--adam_weight_decay", type=NON_NEGATIVE, default=1e-2, help="AdamW decay.")
    parser.add_argument("--adam_epsilon", type=POSITIVE, default=1e-8, help="AdamW epsilon.")
    parser.add_argument("--max_grad_norm", type=POSITIVE, default=1.0, help="Gradient clip norm.")
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
        type=POSITIVE_INT,
        default=None,
        help="Save a resumable checkpoint every N steps (default: every 8 epochs).",
    )
    parser.add_argument(
        "--checkpoints_total_limit",
        type=POSITIVE_INT,
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
        default=runs.PAPER_NEGATIVE_PROMPT,
        help="Negative prompt of the validation images.",
    )
    parser.add_argument(
        "--validation_steps",
        type=POSITIVE_INT,
        default=None,
        help="Validate every N steps (default: at every checkpoint) and at the end.",
    )
    parser.add_argument(
        "--num_validation_images", type=NON_NEGATIVE_INT, default=4, help="Images per validation."
    )
    parser.add_argument(
        "--validation_num_inference_steps", type=POSITIVE_INT, default=30, help="Validation steps."
    )
    parser.add_argument(
        "--validation_guidance_scale", type=NON_NEGATIVE, default=5.0, help="Validation guidance."
    )
    parser.add_argument(
        "--logging_steps",
        type=POSITIVE_INT,
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
        description=__doc__.split("\n\n")[0], formatter_class=argparse.ArgumentDefaultsHelpFormatter
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
    flag = "--instance_data_dir" if args.instance_data_dir is not None else "--identities_root"
    for name, folder in (
        ("--output_dir", args.output_dir),
        ("--class_data_dir", args.class_data_dir),
    ):
        if folder is not None and runs.is_inside(folder, source):
            raise ValueError(
                f"{name} {folder} lies inside {flag} {source}: its files would be read as "
                "training photos or identities; choose a folder outside it"
            )


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
    runs.find_checkpoint(value, args.output_dir, TRAINING_STATE_NAME)  # FileNotFoundError


def validate_args(args: argparse.Namespace) -> None:
    """Readable errors for bad or conflicting flags, right after parsing."""
    runs.check_numbers(args, build_parser())
    _validate_data(args)
    _validate_losses(args)
    _validate_resume(args)
    runs.check_base_model(args.pretrained_model_name_or_path)


# ============================================================================ small utilities


def list_checkpoints(folder: Path) -> list[tuple[int, Path]]:
    """(step, path) of an identity's complete checkpoint-N folders, oldest first."""
    return runs.list_checkpoints(folder, TRAINING_STATE_NAME)


# ============================================================================ identities


def discover_identities(args: argparse.Namespace) -> list[Identity]:
    """The identity to train, or the identity subfolders of --identities_root."""
    return runs.identity_runs(args.instance_data_dir, args.identities_root, args.output_dir)


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


def clear_outputs(identity: Identity, logging_dir: str) -> None:
    """Delete what an earlier run wrote for this identity (used by --overwrite)."""
    files = (LORA_WEIGHTS_NAME, CONFIG_NAME, "README.md")
    folders = [path for _, path in list_checkpoints(identity.output_dir)]
    runs.delete_outputs(identity.output_dir, files, [*folders, "validation", logging_dir])


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
    with runs.loading("the VAE and text encoder", base):
        vae = AutoencoderKL.from_pretrained(base, subfolder="vae", **_hub_kwargs(args))
        text_encoder = CLIPTextModel.from_pretrained(
            base, subfolder="text_encoder", **_hub_kwargs(args)
        )
        tokenizer = CLIPTokenizer.from_pretrained(
            base, subfolder="tokenizer", revision=args.revision
        )
        scheduler = DDPMScheduler.from_pretrained(
            base, subfolder="scheduler", revision=args.revision
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
        tokenizer=tokenizer,
        noise_scheduler=scheduler,
        arcface=arcface,
        device=device,
        mixed_precision=mixed_precision,
    )


def assemble_pipeline(frozen: FrozenModels, unet: torch.nn.Module):
    """A DDPM StableDiffusionPipeline around the frozen parts and the training UNet."""
    from diffusers import DDPMScheduler, StableDiffusionPipeline

    pipeline = StableDiffusionPipeline(
        vae=frozen.vae,
        text_encoder=frozen.text_encoder,
        tokenizer=frozen.tokenizer,
        unet=unet,
        scheduler=DDPMScheduler.from_config(frozen.noise_scheduler.config),
        safety_checker=None,
        feature_extractor=None,
        requires_safety_checker=False,
    )
    pipeline.set_progress_bar_config(disable=True)
    return pipeline


def load_unet_with_lora(args: argparse.Namespace, device: torch.device, mixed_precision: str):
    """Base UNet (frozen, weight dtype) + a fresh gaussian-init LoRA adapter in float32."""
    from diffusers import UNet2DConditionModel
    from diffusers.training_utils import cast_training_params

    base = args.pretrained_model_name_or_path
    with runs.loading("the UNet", base):
        unet = UNet2DConditionModel.from_pretrained(base, subfolder="unet", **_hub_kwargs(args))
    unet.requires_grad_(False)
    add_gaussian_lora(unet, args.rank, args.lora_alpha, stable_seed(args.seed, "lora-init"))
    place(unet, device, WEIGHT_DTYPES[mixed_precision])
    cast_training_params(unet, dtype=torch.float32)  # fp16 grads cannot be unscaled
    if args.gradient_checkpointing:
        unet.enable_gradient_checkpointing()
    unet.train()
    return unet


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
        max_class_images=args.num_class_images,
        resolution=args.resolution,
        center_crop=args.center_crop,
        seed=args.seed,
    )


# ============================================================================ the training step


def objective_config(args: argparse.Namespace, frozen: FrozenModels) -> ObjectiveConfig:
    """The objective's settings from the command line and the noise schedule."""
    return ObjectiveConfig(
        loss=args.loss,
        triplet_margin=args.triplet_margin,
        identity_weighting=args.identity_loss_weighting,
        prior_loss_weight=args.prior_loss_weight,
        num_train_timesteps=frozen.noise_scheduler.config.num_train_timesteps,
    )


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
    frozen: FrozenModels,
    noisy_latents: torch.Tensor,
    model_pred: torch.Tensor,
    timesteps: torch.Tensor,
    mask: torch.Tensor,
    clamp: bool,
) -> torch.Tensor:
    """x0_hat in fp32 -> frozen VAE decode in its weight dtype (with grad) -> clamped to
    [-1, 1] like the reference code (clamp=False keeps the gradient of saturated pixels):
    (n, 3, R, R). Rows outside `mask` (no identity term) enter the decoder detached, so even a
    NaN in them cannot reach the LoRA through the backward pass."""
    scheduler, vae = frozen.noise_scheduler, frozen.vae
    x0 = predict_x0(
        noisy_latents.float(),
        model_pred.float(),
        timesteps,
        scheduler.alphas_cumprod,
        scheduler.config.prediction_type,
    )  # (n, 4, R/8, R/8) float32
    x0 = torch.where(mask[:, None, None, None], x0, x0.detach())
    decoded = vae.decode((x0 / vae.config.scaling_factor).to(vae.dtype)).sample
    return decoded.clamp(-1.0, 1.0) if clamp else decoded


def face_embeddings_of_x0(
    frozen: FrozenModels,
    noisy_latents: torch.Tensor,
    model_pred: torch.Tensor,
    timesteps: torch.Tensor,
    landmarks: torch.Tensor,
    mask: torch.Tensor,
    clamp: bool = True,
) -> torch.Tensor:
    """a_i = E(x0_hat_i): decode (with grad) -> 5-point alignment with the photo's landmarks
    (pixels of the training crop = pixels of the decoded image) -> frozen ArcFace, the last two
    in fp32 outside autocast like the precomputed e_inst / e_prior. (n, D) unit vectors."""
    decoded = decode_x0(frozen, noisy_latents, model_pred, timesteps, mask, clamp)  # (n,3,R,R)
    with torch.autocast(frozen.device.type, enabled=False):
        faces = align_faces_torch(decoded.float(), landmarks, fill=-1.0)  # (n, 3, 112, 112)
        return frozen.arcface(faces)  # (n, 512) float32, unit norm


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
    config, identity = objective_config(args, frozen), None
    if config.has_identity_term:
        n = num_instance
        landmarks = batch["landmarks"][:n].to(device, torch.float32)  # (n, 5, 2)
        embeddings = batch["embeddings"].to(device, torch.float32)  # (B, D)
        mask = identity_mask(batch, args.loss, device)  # (n,) bool
        anchor = face_embeddings_of_x0(
            frozen,
            noisy_latents[:n],
            model_pred[:n],
            timesteps[:n],
            landmarks,
            mask,
            args.clamp_decoded_x0,
        )
        negative = embeddings[n : 2 * n] if embeddings.shape[0] >= 2 * n else None
        identity = identity_terms(config, anchor, embeddings[:n], negative, timesteps[:n], mask)
    return objective(config, model_pred, target, num_instance, identity)


def term_means(device: torch.device) -> RunningMeans:
    """Running means of TERM_NAMES; the identity criterion and weight over the samples that
    had the identity term."""
    return RunningMeans(
        TERM_NAMES, device, ("identity_criterion", "identity_weight"), "identity_count"
    )


# ============================================================================ per-identity loop


def _make_writer(args: argparse.Namespace, folder: Path):
    """TensorBoard SummaryWriter in folder/--logging_dir, or None for --report_to none."""
    if args.report_to == "none":
        return None
    from torch.utils.tensorboard import SummaryWriter

    return SummaryWriter(log_dir=str(folder / args.logging_dir))


def resume_mismatches(saved: dict[str, Any], current: dict[str, Any]) -> list[str]:
    """Differences that forbid resuming, between a checkpoint's training_config.json and the
    resuming run's config: every argument except RESUME_MAY_CHANGE (one present on only one
    side counts as changed), RESUME_RESOLVED_KEYS, RESUME_DATA_KEYS and the ArcFace weights by
    content (their name holds a sha256 prefix)."""
    resolved = {key: current["resolved"].get(key) for key in RESUME_RESOLVED_KEYS}
    data = {key: current["data"].get(key) for key in RESUME_DATA_KEYS}
    saved_resolved = {key: saved.get("resolved", {}).get(key) for key in RESUME_RESOLVED_KEYS}
    saved_data = {key: saved.get("data", {}).get(key) for key in RESUME_DATA_KEYS}
    changed = runs.config_mismatches(saved["args"], current["args"], RESUME_MAY_CHANGE)
    changed += runs.config_mismatches(saved_resolved, resolved, ())
    changed += runs.config_mismatches(saved_data, data, (), "data ")
    changed += runs.config_mismatches(
        {"arcface": saved.get("arcface")}, {"arcface": current.get("arcface")}, (), "ArcFace "
    )
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
        self.watch = NonFiniteWatch(TERM_NAMES, self.device)
        self.grad_watch = NonFiniteWatch(("grad_norm",), self.device)
        self.interval_means, self.epoch_means = term_means(self.device), term_means(self.device)
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
            "args": runs.json_safe(vars(self.args)),
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
            "data": self.dataset.summary(),
            "arcface": self.arcface_name,
            "global_step": self.global_step,
            "identity_samples": int(self.identity_samples.item()),
            "versions": runs.library_versions(),
        }

    def write_config(self, folder: Path, status: str) -> None:
        atomic_write_json(folder / CONFIG_NAME, self.config(status))

    def resume(self) -> None:
        """Restore LoRA, optimizer, scheduler, grad scaler and step from a checkpoint."""
        output_dir, value = self.identity.output_dir, self.args.resume_from_checkpoint
        folder = runs.find_checkpoint(value, output_dir, TRAINING_STATE_NAME)
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

    def _check_resume_config(self, folder: Path) -> None:
        """ValueError when the checkpoint was made with different settings (resume_mismatches)."""
        config_path = folder / CONFIG_NAME
        if not config_path.is_file():
            raise ValueError(f"checkpoint {folder} has no {CONFIG_NAME}; it cannot be checked")
        changed = resume_mismatches(json.loads(config_path.read_text()), self.config("resuming"))
        if changed:
            raise ValueError(
                f"checkpoint {folder} was trained with other settings ({'; '.join(changed)}); "
                "resume with the same ones, or pass --overwrite to start over"
            )

    def save_checkpoint(self) -> Path:
        """checkpoint-N: LoRA (loadable as is), optimizer/scheduler/scaler state, config."""
        self.check_finite(f"checkpoint-{self.global_step} was not written")

        def fill(temp: Path) -> None:
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

        folder = runs.write_checkpoint(
            self.identity.output_dir,
            self.global_step,
            fill,
            TRAINING_STATE_NAME,
            self.args.checkpoints_total_limit,
        )
        logger.info("%s: saved %s", self.identity.name, folder)
        return folder

    def validate(self) -> list[Path]:
        """validation/step_N_i.png from --validation_prompt with the current LoRA."""
        args, frozen = self.args, self.frozen
        if not args.validation_prompt or args.num_validation_images == 0:
            return []
        self.unet.eval()
        folder = self.identity.output_dir / "validation"
        paths = [
            folder / f"step_{self.global_step}_{i}.png" for i in range(args.num_validation_images)
        ]
        images = sample_one_by_one(
            assemble_pipeline(frozen, self.unet),
            [stable_seed(args.seed, "validation", index) for index in range(len(paths))],
            paths,
            frozen.autocast,
            prompt=args.validation_prompt,
            negative_prompt=args.validation_negative_prompt or None,
            num_inference_steps=args.validation_num_inference_steps,
            guidance_scale=args.validation_guidance_scale,
            height=args.resolution,
            width=args.resolution,
        )
        for index, image in enumerate(images):
            if self.writer is not None:
                self.writer.add_image(
                    f"validation/{index}", np.asarray(image), self.global_step, dataformats="HWC"
                )
        self.unet.train()
        self.last_validated = self.global_step
        return paths

    def write_model_card(self) -> None:
        args, folder = self.args, self.identity.output_dir
        write_model_card(
            folder,
            sorted((folder / "validation").glob(f"step_{self.global_step}_*.png")),
            base=args.pretrained_model_name_or_path,
            instance_prompt=args.instance_prompt,
            identity=self.identity.name,
            loss=args.loss,
            steps=self.global_step,
            rank=args.rank,
            alpha=args.lora_alpha,
            data=json.dumps(self.dataset.summary()),
            validation_prompt=args.validation_prompt,
        )

    # ------------------------------------------------------------------ the loop

    def run(self) -> dict[str, Any]:
        """Train to max_train_steps (resuming if asked) and write the final outputs."""
        start_time = time.time()
        self.identity.output_dir.mkdir(parents=True, exist_ok=True)
        runs.remove_stale_temporaries(self.identity.output_dir, (".checkpoint-", ".lora-"))
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
            generator=torch.Generator().manual_seed(stable_seed(self.args.seed, "order", epoch)),
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
            self.forward_backward(batch, stable_seed(self.args.seed, "noise", epoch, batch_index))
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
        grad_norm = torch.nn.utils.clip_grad_norm_(self.lora_parameters, self.args.max_grad_norm)
        if not self.scaler.is_enabled():  # the fp16 scaler skips the steps with inf grads itself
            self.grad_watch.update(grad_norm.detach().double()[None], self.global_step + 1)
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
            self.check_finite("no validation images were made")
            self.validate()

    def _tags(self) -> dict[str, str]:
        """TensorBoard tag per logged term (identity terms only for identity losses)."""
        tags = {"loss": "loss", "diffusion_loss": "diffusion_loss", "prior_loss": "prior_loss"}
        if self.args.loss != "dreambooth":
            tags.update(
                identity_criterion=f"{self.args.loss}_loss",
                identity_term="identity_term",
                identity_weight="identity_weight",
                identity_count="identity_samples_per_batch",
            )
        return tags

    def _log_interval(self) -> None:
        self.watch.check(f"last checkpoint kept in {self.identity.output_dir}")
        self.grad_watch.check(f"last checkpoint kept in {self.identity.output_dir}")
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
        if self.epoch_means.steps == 0:
            return
        self.watch.check(f"last checkpoint kept in {self.identity.output_dir}")
        means = self.epoch_means.pop()
        text = ", ".join(f"{tag} {means[name]:.4g}" for name, tag in self._tags().items())
        logger.info("%s: epoch %d means: %s", self.identity.name, epoch, text)
        if self.writer is not None:
            for name, tag in self._tags().items():
                self.writer.add_scalar(f"epoch/{tag}", means[name], epoch)

    def check_finite(self, where: str) -> None:
        """NonFiniteLossError if a loss term, a gradient norm or the LoRA weights themselves
        held NaN/inf since the start (one host sync): nothing non-finite is ever saved."""
        self.watch.check(where)
        self.grad_watch.check(where)
        finite = torch.stack([p.detach().isfinite().all() for p in self.lora_parameters]).all()
        if not bool(finite):
            raise NonFiniteLossError(
                f"the LoRA weights are non-finite at step {self.global_step}; training stopped "
                f"before saving; {where}. Try a lower --learning_rate or --max_grad_norm"
            )

    def finish(self) -> None:
        """Final validation, config and model card, then the LoRA (the 'finished' marker)."""
        self.check_finite(
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


# ============================================================================ main


def _prior_dtype(args: argparse.Namespace, device: torch.device) -> torch.dtype:
    """--prior_generation_precision, default fp16 on GPU; half precision needs a GPU."""
    dtype = PRIOR_DTYPES[
        args.prior_generation_precision or ("fp16" if device.type == "cuda" else "fp32")
    ]
    if dtype == torch.float16 and device.type != "cuda":
        logger.warning("fp16 class-image sampling needs a GPU; sampling in float32")
        return torch.float32
    return dtype


def prepare_class_data(args: argparse.Namespace, state, face_tools: FaceTools | None) -> None:
    """Generate missing class images; annotate them once (rank 0 first, others read the cache).
    Faceless class images are kept: they serve the prior loss."""
    if not args.with_prior_preservation:
        return
    generate_class_images(
        lambda: load_pipeline(
            args.pretrained_model_name_or_path,
            state.device,
            _prior_dtype(args, state.device),
            safety_checker=None,
            requires_safety_checker=False,
            **_hub_kwargs(args),
        ),
        args.class_data_dir,
        args.num_class_images,
        args.class_prompt,
        partial(stable_seed, args.seed, "class"),
        state,
        args.sample_batch_size,
        height=args.resolution,
        width=args.resolution,
        num_inference_steps=args.class_num_inference_steps,
    )
    if face_tools is not None:
        with state.main_process_first():
            detector, encoder = face_tools.detector, face_tools.encoder
            scan_photos(args.class_data_dir, detector, encoder, limit=args.num_class_images)


def main(args: argparse.Namespace) -> dict[str, list]:
    """Split identities over processes, train each not yet finished, return what happened."""
    state = runs.process_state()
    runs.setup_logging(state)
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
        mixed_precision = runs.resolve_mixed_precision(args.mixed_precision, state.device.type)
        arcface = (
            face_tools.encoder if face_tools is not None and args.loss != "dreambooth" else None
        )
        frozen = load_frozen_models(args, state.device, mixed_precision, arcface)
        for identity in todo:
            results.append(train_identity(args, identity, frozen, face_tools, state))
    if state.num_processes > 1:
        state.destroy_process_group()
    failed = [result for result in results if "error" in result]
    if failed:
        logger.error("%d of %d identities failed: %s", len(failed), len(todo), failed)
    trained = [result for result in results if "error" not in result]
    return {"trained": trained, "skipped": skipped, "failed": failed}


def train_identity(args: argparse.Namespace, identity: Identity, frozen, face_tools, state):
    """Train one identity; with --identities_root a failure of one (bad photos, NaN, an I/O
    error) is reported and the others go on; a single --instance_data_dir run raises."""
    if args.overwrite:
        clear_outputs(identity, args.logging_dir)
    logger.info("training identity %s -> %s", identity.name, identity.output_dir)
    try:
        return IdentityTrainer(args, identity, frozen, face_tools, state).run()
    except (ValueError, OSError, NonFiniteLossError) as error:
        if args.identities_root is None:
            raise
        logger.error("identity %s failed: %s", identity.name, error)
        return {"identity": identity.name, "error": f"{type(error).__name__}: {error}"}


if __name__ == "__main__":
    runs.run_cli(
        "train_ID-Booth.py",
        parse_args,
        main,
        exit_code=lambda summary: int(bool(summary["failed"])),
        errors=(NonFiniteLossError,),
    )
