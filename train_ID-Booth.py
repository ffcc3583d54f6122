"""Train one ID-Booth LoRA per identity: DreamBooth prior preservation + a triplet identity loss.

Per identity, a rank-4 LoRA of the SD 2.1-base UNet (or of an SD 1.x, SD 2.x 768-v or SDXL
base: architectures.py reads which from its configs) learns the person's photos under the
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

This script holds the command line and its checks, the split of the identities and the class
images; trainer.py holds the packed trainer (models, the training step, checkpoints, resume
checks, validation and outputs).
"""

from __future__ import annotations

import argparse
import json
import logging
from functools import partial
from pathlib import Path

import torch

import runs
from arcface import weights_name
from architectures import Architecture, architecture_or_paper
from datasets import scan_photos, subfolders_note
from faces import DEFAULT_FACE_MODELS_ROOT, FACE_DETECTOR_NAMES
from fileio import stable_seed
from lora import LORA_WEIGHTS_NAME
from runs import (
    NON_NEGATIVE,
    NON_NEGATIVE_INT,
    POSITIVE,
    POSITIVE_INT,
    SEED,
    Identity,
    NonFiniteLossError,
    Number,
)
from sampling import CLASS_IMAGE_FORMATS, generate_class_images, load_pipeline
from trainer import (
    CONFIG_NAME,
    MAX_TRAIN_STEPS,
    TRAINING_STATE_NAME,
    WEIGHT_DTYPES,
    FaceTools,
    PackedTrainer,
    finished_mismatches,
    hub_kwargs,
    load_face_tools,
    load_frozen_models,
    output_root_mismatches,
)

logger = logging.getLogger("train_ID-Booth")

PRIOR_DTYPES = {"no": torch.float32, "fp32": torch.float32, **WEIGHT_DTYPES}
LR_SCHEDULERS = (
    "linear",
    "cosine",
    "cosine_with_restarts",
    "polynomial",
    "constant",
    "constant_with_warmup",
)
# At most this many steps (or epochs) per identity: the paper trains a few thousand; the learning
# rate schedule is tabulated per step, so a billion would first build a billion-entry table.
TRAIN_STEPS = Number(int, low=1, high=MAX_TRAIN_STEPS)
# The reference's validation: its instance prompt "with blue hair", no negative prompt, the
# pipeline's defaults of 50 steps and guidance 7.5 (its sampler, DPM-Solver++, is not used here:
# see README, "Where this differs").
DEFAULT_VALIDATION_PROMPT = "photo of sks person with blue hair"


# ============================================================================ arguments


def _add_model_args(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "--pretrained_model_name_or_path",
        default="stabilityai/stable-diffusion-2-1-base",
        help="Base Stable Diffusion: hub id or local folder saved with save_pretrained; SD 1.x, "
        "SD 2.x (epsilon or v-prediction) or SDXL, read from its configs (architectures.py).",
    )
    parser.add_argument(
        "--pretrained_vae_model_name_or_path",
        default=None,
        help="Another VAE (hub id or folder), e.g. an fp16-safe SDXL VAE "
        "(madebyollin/sdxl-vae-fp16-fix): a VAE whose config says force_upcast (SDXL's own) is "
        "kept and decoded in fp32 under mixed precision, one that does not in the weight dtype.",
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
        default=1,
        help="Batch size for class-image sampling (the reference's 1; larger batches change "
        "the images at float level only, each image has its own seed).",
    )
    parser.add_argument(
        "--class_image_format",
        default="jpeg",
        choices=list(CLASS_IMAGE_FORMATS),
        help="File format of generated class images: jpeg (the default and the reference's: "
        "PIL's default quality 75; the prior loss learns its artifacts) or png (lossless).",
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
        default=None,
        help="Training image size (default: the base model's native size, UNet sample_size x "
        "the VAE's scale factor: 512 for SD 1.5 / 2.1-base, 768 for SD 2.1, 1024 for SDXL).",
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
        help="Threads that decode and resize the photos (once per identity; 0: the main one).",
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
    parser.add_argument("--num_train_epochs", type=TRAIN_STEPS, default=32, help="Training epochs.")
    parser.add_argument(
        "--max_train_steps",
        type=TRAIN_STEPS,
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
    parser.add_argument(
        "--adam_epsilon",
        type=Number(float, low=float(torch.finfo(torch.float32).tiny)),
        default=1e-8,
        help="AdamW epsilon (the optimizer state is fp32: smaller values would be 0 there).",
    )
    parser.add_argument("--max_grad_norm", type=POSITIVE, default=1.0, help="Gradient clip norm.")
    parser.add_argument(
        "--mixed_precision",
        default="fp16",
        choices=list(WEIGHT_DTYPES),
        help="Frozen weights and autocast dtype (LoRA stays fp32; fp16 uses a grad scaler).",
    )
    parser.add_argument(
        "--pack",
        type=POSITIVE_INT,
        default=1,
        help="Identities trained together in one process and one step, each with its own LoRA "
        "(a batched LoRA layer): each gets the data, noise and update rule of a run of it alone "
        "(its LoRA equal to that run's within float rounding, except that under fp16 the "
        "identities share one loss scale). A finished "
        "identity's slot takes the next one. With accelerate, K per process.",
    )
    parser.add_argument(
        "--compile",
        action="store_true",
        help="torch.compile the UNet (its first steps are slow while it compiles).",
    )
    parser.add_argument(
        "--compile_mode",
        default="default",
        choices=["default", "reduce-overhead", "max-autotune"],
        help="torch.compile mode; 'reduce-overhead' captures CUDA graphs.",
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
        help="Retrain this run's identities that already have a final LoRA (their old outputs "
        "and checkpoints are deleted first) and accept settings other than theirs; without it "
        "finished identities are skipped. Finished identities in --output_dir outside this run "
        "are not retrained, so a new identity is refused while they hold other settings.",
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
        default="",
        help="Negative prompt of the validation images ('' none, the reference's).",
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
        "--validation_num_inference_steps", type=POSITIVE_INT, default=50, help="Validation steps."
    )
    parser.add_argument(
        "--validation_guidance_scale",
        type=runs.GUIDANCE_SCALE,
        default=None,
        help="Validation guidance (default: the base pipeline's own, 7.5 for SD 1.x / 2.x and "
        "5.0 for SDXL).",
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


HELP_GROUPS = {  # --help sections (display only; a flag not listed shows under "options")
    "models": [
        "pretrained_model_name_or_path", "pretrained_vae_model_name_or_path", "revision",
        "variant", "arcface_weights",
        "face_detector", "face_models_root",
    ],
    "data": [
        "instance_data_dir", "identities_root", "class_data_dir", "instance_prompt",
        "class_prompt", "with_prior_preservation", "num_class_images", "sample_batch_size",
        "class_image_format",
        "class_num_inference_steps", "prior_generation_precision", "resolution", "center_crop",
        "dataloader_num_workers",
    ],
    "loss": [
        "loss", "prior_loss_weight", "triplet_margin", "identity_loss_weighting",
        "clamp_decoded_x0",
    ],
    "LoRA and optimisation": [
        "rank", "lora_alpha", "seed", "train_batch_size", "num_train_epochs",
        "max_train_steps", "gradient_accumulation_steps", "learning_rate", "scale_lr",
        "lr_scheduler", "lr_warmup_steps", "lr_num_cycles", "lr_power", "adam_beta1",
        "adam_beta2", "adam_weight_decay", "adam_epsilon", "max_grad_norm",
    ],
    "precision, memory and speed": [
        "mixed_precision", "gradient_checkpointing", "pack", "compile", "compile_mode",
        "allow_tf32",
    ],
    "output and checkpoints": [
        "output_dir", "overwrite", "checkpointing_steps", "checkpoints_total_limit",
        "resume_from_checkpoint",
    ],
    "validation": [
        "validation_prompt", "validation_negative_prompt", "validation_steps",
        "num_validation_images", "validation_num_inference_steps", "validation_guidance_scale",
    ],
    "logging": ["logging_steps", "logging_dir", "report_to"],
}  # fmt: skip


def build_parser() -> argparse.ArgumentParser:
    """Every flag, with help text; defaults are the paper's reference setup."""
    parser = runs.argument_parser(__doc__)
    _add_model_args(parser)
    _add_data_args(parser)
    _add_loss_args(parser)
    _add_optimisation_args(parser)
    _add_output_args(parser)
    runs.group_flags(parser, HELP_GROUPS)
    return parser


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    """Parse and validate the command line (ValueError / FileNotFoundError on bad input)."""
    args = build_parser().parse_args(argv)
    validate_args(args)
    return args


def validate_data(args: argparse.Namespace) -> None:
    """Exactly one identity source; folders exist, photos not one level too deep; prior needs a
    class folder. Cheap (no image is read): reproduce_ID-Booth.py runs it before any stage."""
    if (args.instance_data_dir is None) == (args.identities_root is None):
        raise ValueError(
            "pass exactly one of --instance_data_dir (one identity) or --identities_root "
            "(a folder of identity folders)"
        )
    source = args.instance_data_dir or args.identities_root
    if not source.is_dir():
        raise FileNotFoundError(f"identity folder {source} does not exist or is not a folder")
    if args.instance_data_dir is not None and subfolders_note(source):
        raise ValueError(
            f"--instance_data_dir {source} holds identity folders, not photos: pass "
            f"--identities_root {source} to train each of them{subfolders_note(source)}"
        )
    if args.identities_root is not None:
        refuse_nested_identities(source)
    if args.with_prior_preservation and args.class_data_dir is None:
        raise ValueError(
            "--with_prior_preservation needs --class_data_dir (missing class images are "
            "generated there); or pass --no-with_prior_preservation"
        )
    if args.class_data_dir is not None and args.class_data_dir.is_file():
        raise ValueError(f"--class_data_dir {args.class_data_dir} is a file, not a folder")
    if args.output_dir.exists() and not args.output_dir.is_dir():
        raise ValueError(f"--output_dir {args.output_dir} is a file; pass a folder path")
    logging_dir = Path(args.logging_dir)
    if logging_dir.is_absolute() or ".." in logging_dir.parts or not logging_dir.parts:
        raise ValueError(
            f"--logging_dir {args.logging_dir!r} must be a folder path inside each identity's "
            "output (e.g. 'logs'): one TensorBoard folder per identity, or the report would "
            "show one identity's curves for all"
        )
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


def refuse_nested_identities(root: Path) -> None:
    """ValueError naming the identity folders of `root` that hold only subfolders (photos one
    level too deep, or `root` a folder above the identities): each would fail only once its
    turn to train came, after the class images and the identities before it."""
    folders = runs.identity_folders(root)
    nested = [folder for folder in folders if subfolders_note(folder)]
    if not nested:
        return
    hint = ""
    if len(nested) == len(folders) == 1:  # e.g. data/ holding tufts/<identity>/
        hint = f"; if {nested[0]} is the folder of identities, pass --identities_root {nested[0]}"
    raise ValueError(
        f"--identities_root {root}: {len(nested)} identity folders hold no photos "
        f"({runs.format_list(folder.name for folder in nested)}){subfolders_note(nested[0])}"
        f"{hint}"
    )


def _validate_packing(args: argparse.Namespace) -> None:
    """Packed identities step together, so they cannot accumulate gradients on their own."""
    if args.pack > 1 and args.gradient_accumulation_steps > 1:
        raise ValueError(
            "--pack > 1 trains identities in one step and needs --gradient_accumulation_steps 1; "
            "raise --train_batch_size instead, or train one identity at a time (--pack 1)"
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
    validate_data(args)
    _validate_losses(args)
    _validate_packing(args)
    _validate_resume(args)
    runs.check_base_model(args.pretrained_model_name_or_path, args.variant)
    resolve_architecture_defaults(args)


def resolve_architecture_defaults(args: argparse.Namespace) -> None:
    """Fill the flags left unset with the base model's defaults (architectures.py): its native
    resolution and its pipeline's guidance. A flag the user set is kept."""
    architecture = architecture_or_paper(args.pretrained_model_name_or_path, args.revision)
    if args.resolution is None:
        args.resolution = architecture.resolution
    elif args.resolution != architecture.resolution:
        logger.warning("%s", off_native_resolution_warning(args.resolution, architecture))
    if args.validation_guidance_scale is None:
        args.validation_guidance_scale = architecture.default("guidance_scale")


def off_native_resolution_warning(resolution: int, architecture: Architecture) -> str:
    """One line for training away from the base's native size: allowed (small test runs,
    memory), but the base was made for its own size; the LoRA records the size it was
    trained at, and generation defaults to it."""
    return (
        f"--resolution {resolution} is not the base model's native {architecture.resolution} px "
        f"({architecture.describe()}): the LoRA is trained at {resolution} px, which its header "
        "and model card record and inference_ID-Booth.py then generates at by default"
    )


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
        if not is_finished(identity)
        and runs.list_checkpoints(identity.output_dir, TRAINING_STATE_NAME)
    ]
    if stale:
        raise ValueError(
            f"{', '.join(stale)} hold checkpoints of an unfinished run: pass "
            "--resume_from_checkpoint latest to continue, or --overwrite to start over"
        )


def check_output_root(identities: list[Identity], args: argparse.Namespace) -> None:
    """ValueError, before any work, when this run would train an identity into an
    --identities_root output folder whose finished identities (those it does not retrain) were
    trained with other settings, by resume's rule (trainer.output_root_mismatches): one folder
    never holds LoRAs of two recipes. --overwrite retrains this run's identities only, so a
    finished one outside them still has to match."""
    if args.identities_root is None or not args.output_dir.is_dir():
        return
    todo = [identity.name for identity in identities if args.overwrite or not is_finished(identity)]
    retrained = {identity.name for identity in identities} if args.overwrite else set()
    finished = [
        folder
        for folder in runs.identity_folders(args.output_dir)
        if (folder / LORA_WEIGHTS_NAME).is_file() and folder.name not in retrained
    ]
    if not todo or not finished:
        return
    arcface = args.arcface_weights
    current = {
        "args": runs.json_safe(vars(args)),
        "mixed_precision": runs.resolve_mixed_precision(args.mixed_precision, "cpu"),
        "arcface": None if arcface is None else weights_name(arcface.expanduser()),
        "base_model": runs.base_model_fingerprint(
            args.pretrained_model_name_or_path, args.revision, args.variant
        ),
    }
    refused = []
    for folder in finished:
        try:
            saved = json.loads((folder / CONFIG_NAME).read_text())
            changed = output_root_mismatches(saved, current)
        except (OSError, ValueError, TypeError, KeyError, AttributeError) as error:
            changed = [f"{CONFIG_NAME} unreadable ({type(error).__name__}: {error})"]
        if changed:
            refused.append(f"{folder.name}: {'; '.join(changed)}")
    if refused:
        raise ValueError(
            f"{args.output_dir} holds {len(refused)} finished identities trained with other "
            f"settings than this run's ({runs.format_list(refused, 3)}), so training "
            f"{runs.format_list(todo, 3)} there would mix two recipes: rerun with those "
            "settings, use another --output_dir, or retrain them with these (--overwrite "
            "retrains the identities of --identities_root; delete the others)"
        )


def check_finished(
    identities: list[Identity], args: argparse.Namespace, face_tools: FaceTools | None, state
) -> tuple[list[str], list[dict]]:
    """(skipped, refused): finished identities whose training_config.json matches this run's
    settings by resume's rule are skipped; the others are refused, each with its differences
    in one line (an output folder never holds LoRAs of two recipes). --overwrite retrains."""
    finished = [identity for identity in identities if is_finished(identity)]
    if args.overwrite or not finished:
        return [], []
    mixed_precision = runs.resolve_mixed_precision(args.mixed_precision, state.device.type)
    base_model = runs.base_model_fingerprint(
        args.pretrained_model_name_or_path, args.revision, args.variant
    )
    skipped, refused, class_photos = [], [], None
    for identity in finished:
        try:
            changed, class_photos = finished_mismatches(
                identity, args, face_tools, mixed_precision, base_model, class_photos
            )
        except (ValueError, OSError) as error:
            changed = [f"its photos cannot be checked ({error})"]
        if not changed:
            skipped.append(identity.name)
            continue
        error = (
            f"{identity.output_dir} holds a LoRA trained with other settings "
            f"({'; '.join(changed)}); rerun with those, use another --output_dir, or pass "
            "--overwrite to retrain it"
        )
        logger.error("%s: %s", identity.name, error)
        refused.append({"identity": identity.name, "error": error})
    return skipped, refused


# ============================================================================ main


def _prior_dtype(args: argparse.Namespace, device: torch.device) -> torch.dtype:
    """--prior_generation_precision, default fp16 on GPU and fp32 elsewhere."""
    return PRIOR_DTYPES[
        args.prior_generation_precision or ("fp16" if device.type == "cuda" else "fp32")
    ]


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
            **hub_kwargs(args),
        ),
        args.class_data_dir,
        args.num_class_images,
        args.class_prompt,
        partial(stable_seed, args.seed, "class"),
        state,
        args.sample_batch_size,
        image_format=args.class_image_format,
        height=args.resolution,
        width=args.resolution,
        num_inference_steps=args.class_num_inference_steps,
    )
    if face_tools is not None:
        with state.main_process_first():
            detector, encoder = face_tools.detector, face_tools.encoder
            scan = scan_photos(args.class_data_dir, detector, encoder, limit=args.num_class_images)
        if args.loss == "triplet" and not scan.faces:
            raise ValueError(
                f"--loss triplet takes its negatives from class images with a face, but none of "
                f"the {len(scan.photos)} class images used from {args.class_data_dir} has a "
                "detected face: the run would never apply its identity term; add photos of "
                "other people there, or use --loss identity / dreambooth"
            )


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
    check_output_root(identities, args)
    if args.allow_tf32 and torch.cuda.is_available():
        torch.backends.cuda.matmul.allow_tf32 = True
        torch.backends.cudnn.allow_tf32 = True
    face_tools = load_face_tools(args, state.device) if args.arcface_weights is not None else None
    prepare_class_data(args, state, face_tools)
    skipped, refused = check_finished(mine, args, face_tools, state)
    todo = [identity for identity in mine if args.overwrite or not is_finished(identity)]
    if skipped:
        logger.info("skipping finished identities (pass --overwrite to retrain): %s", skipped)
    results = []
    if todo:
        mixed_precision = runs.resolve_mixed_precision(args.mixed_precision, state.device.type)
        arcface = (
            face_tools.encoder if face_tools is not None and args.loss != "dreambooth" else None
        )
        frozen = load_frozen_models(args, state.device, mixed_precision, arcface)
        trainer = PackedTrainer(args, frozen, face_tools, state, min(args.pack, len(todo)))
        results = trainer.run(todo)
    failed = refused + [result for result in results if "error" in result]
    for line in failure_lines(failed, len(mine)):
        logger.error("%s", line)
    trained = [result for result in results if "error" not in result]
    log_summary(args, trained, skipped, failed)
    return {"trained": trained, "skipped": skipped, "failed": failed}


def failure_lines(failed: list[dict], total: int) -> list[str]:
    """The end-of-run list of failures, readable: 'N of M identities failed:' then one
    'identity: error' line each (nothing when none failed)."""
    if not failed:
        return []
    header = f"{len(failed)} of {runs.plural(total, 'identity')} failed:"
    return [header, *(f"  {result['identity']}: {result['error']}" for result in failed)]


def log_summary(args: argparse.Namespace, trained: list, skipped: list, failed: list) -> None:
    """One end-of-run line per process: what was written where, skipped, failed."""
    names = [result["identity"] for result in trained]
    # One identity (--instance_data_dir) is written into --output_dir itself, not a subfolder.
    where = f"{args.output_dir}/<identity>/" if args.instance_data_dir is None else args.output_dir
    logger.info(
        "summary: %d trained into %s (%s); %d skipped as finished%s; %d failed%s",
        len(trained),
        where,
        runs.format_list(names) or "none",
        len(skipped),
        f" ({runs.format_list(skipped)})" if skipped else "",
        len(failed),
        f" ({runs.format_list(result['identity'] for result in failed)})" if failed else "",
    )


if __name__ == "__main__":
    runs.run_cli(
        "train_ID-Booth.py",
        parse_args,
        main,
        exit_code=lambda summary: int(bool(summary["failed"])),
        errors=(NonFiniteLossError,),
    )
