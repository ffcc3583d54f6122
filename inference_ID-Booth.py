"""Generate identity datasets from ID-Booth LoRAs: OUTPUT/<identity>/<index>.png.

Each image is a pure function of (base seed, identity, image index, batch): its noise seed
and side-portrait coin flip are derived from sha256(base seed, identity, index), and its
background (default `--background_sampling balanced`) from index i's slot i mod k in block
i // k, a shuffle of the k backgrounds seeded by sha256(base seed, identity, "backgrounds",
block); never from Python's `hash()` or a shared RNG stream, so any image can be regenerated
on its own and adding images to an identity leaves the earlier ones unchanged. Images of
one identity are generated in fixed batches of consecutive indices ([0, B), [B, 2B), ...),
whatever the number of processes and however often the run is interrupted, so a resumed or
multi-process run writes the same bytes as one uninterrupted process (same hardware,
library versions and, on CPU, thread count). The batch size itself moves pixels only at
float-rounding level: the noise is per image, but matmul/conv kernels sum in an order that
depends on the batch shape.

Outputs: `<identity>/<index>.png` (PNG text chunk `id_booth` holds the image's metadata
record, so every image describes itself), `metadata.jsonl` (one line per image, rebuilt
from the PNGs at the end of every run, so it never holds duplicates), `run_config.json`
(the settings that define the images, checked on resume) and optional contact sheets.

Run: `python inference_ID-Booth.py --lora_root LORAS --output_dir OUT --identity_attributes
genders.csv`, or `accelerate launch --num_processes N inference_ID-Booth.py ...` /
`torchrun --nproc_per_node N ...` to split the (identity, batch) work list.
"""

from __future__ import annotations

import argparse
import csv
import dataclasses
import datetime
import io
import json
import logging
import math
import os
import random
import re
import string
import sys
import tempfile
import time
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

from fileio import atomic_write_bytes, remove_stale_temps, stable_seed

if TYPE_CHECKING:
    from diffusers import StableDiffusionPipeline
    from PIL import Image as PILImage

logger = logging.getLogger("inference_ID-Booth")

PAPER_BACKGROUNDS = (
    "forest",
    "city street",
    "beach",
    "office",
    "bus",
    "laboratory",
    "factory",
    "construction site",
    "hospital",
    "night club",
    "none",
)
NO_BACKGROUND = "none"  # background value that selects the no-background template
DEFAULT_PROMPT_TEMPLATE = "face {portrait} photo of {gender} sks person, {background} background"
DEFAULT_NO_BACKGROUND_TEMPLATE = "face {portrait} photo of {gender} sks person"
DEFAULT_NEGATIVE_PROMPT = (
    "cartoon, cgi, render, illustration, painting, drawing, black and white, "
    "bad body proportions, landscape"
)
PROMPT_PLACEHOLDERS = ("background", "gender", "identity", "portrait")
PORTRAIT_WORDS = {False: "portrait", True: "side-portrait"}
GENDER_ALIASES = {
    "male": "male",
    "m": "male",
    "man": "male",
    "female": "female",
    "f": "female",
    "woman": "female",
}
LORA_WEIGHT_NAME = "pytorch_lora_weights.safetensors"
TRAINING_CONFIG_NAME = "training_config.json"
METADATA_NAME = "metadata.jsonl"
RUN_CONFIG_NAME = "run_config.json"
PNG_METADATA_KEY = "id_booth"
ADAPTER_NAME = "identity"
IMAGE_NAME_PATTERN = re.compile(r"^(\d+)\.png$")
CHECKPOINT_PATTERN = re.compile(r"^checkpoint-(\d+)$")
PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"
PNG_IEND_CHUNK = b"\x00\x00\x00\x00IEND\xaeB`\x82"
BARRIER_TIMEOUT = datetime.timedelta(hours=72)

# Scheduler factory: name -> (diffusers class name, kwargs over the base model's config).
SCHEDULERS: dict[str, tuple[str, dict[str, Any]]] = {
    "ddpm": ("DDPMScheduler", {}),
    "ddim": ("DDIMScheduler", {}),
    "pndm": ("PNDMScheduler", {"skip_prk_steps": True}),
    "euler": ("EulerDiscreteScheduler", {}),
    "euler_a": ("EulerAncestralDiscreteScheduler", {}),
    "dpmsolver++": ("DPMSolverMultistepScheduler", {"algorithm_type": "dpmsolver++"}),
    "unipc": ("UniPCMultistepScheduler", {}),
}
MIXED_PRECISION_DTYPES = {"no": "float32", "fp16": "float16", "bf16": "bfloat16"}
# Settings that define the pixels; a resumed run must match them (batch size only moves
# results at float-rounding level, so it may change between runs).
GENERATION_KEYS = (
    "pretrained_model_name_or_path",
    "lora_source",
    "checkpoint",
    "prompt_template",
    "prompt_template_no_background",
    "backgrounds",
    "background_sampling",
    "side_portrait_probability",
    "negative_prompt",
    "scheduler",
    "num_inference_steps",
    "guidance_scale",
    "lora_scale",
    "resolution",
    "seed",
    "mixed_precision",
)
# Values of settings added after datasets were made with them: a run_config.json without
# the key was written by the older script, which behaved like this value.
LEGACY_GENERATION_VALUES = {"background_sampling": "independent"}


# ----------------------------------------------------------------------------- arguments


def build_parser() -> argparse.ArgumentParser:
    """The command line; defaults are the paper's reference generation setup."""
    parser = argparse.ArgumentParser(
        description=__doc__.split("\n\n")[0],
        formatter_class=argparse.ArgumentDefaultsHelpFormatter,
    )
    parser.add_argument(
        "--pretrained_model_name_or_path",
        default="stabilityai/stable-diffusion-2-1-base",
        help="Base Stable Diffusion model (hub id or local folder) the LoRAs were trained on.",
    )
    source = parser.add_mutually_exclusive_group(required=True)
    source.add_argument(
        "--lora_dir", type=Path, help="One identity's LoRA folder (its name is the identity)."
    )
    source.add_argument(
        "--lora_root",
        type=Path,
        help="Folder of identity LoRA folders (train_ID-Booth.py's output); each is generated.",
    )
    parser.add_argument(
        "--checkpoint",
        default=None,
        help="Checkpoint subfolder inside each identity folder (e.g. checkpoint-6400, or "
        "'latest'); default: the final weights in the identity folder itself.",
    )
    parser.add_argument(
        "--identities",
        nargs="+",
        default=None,
        help="Only these identity folders under --lora_root (default: all).",
    )
    parser.add_argument("--output_dir", type=Path, required=True, help="Dataset folder to fill.")
    parser.add_argument(
        "--num_images_per_identity",
        type=int,
        default=21,
        help="Images per identity (paper: 21 for evaluation, 100 for FR augmentation).",
    )
    parser.add_argument(
        "--prompt_template",
        default=DEFAULT_PROMPT_TEMPLATE,
        help="Prompt with placeholders "
        + ", ".join(f"{{{p}}}" for p in PROMPT_PLACEHOLDERS)
        + "; {portrait} is 'side-portrait' with --side_portrait_probability, else 'portrait'.",
    )
    parser.add_argument(
        "--prompt_template_no_background",
        default=DEFAULT_NO_BACKGROUND_TEMPLATE,
        help=f"Prompt used when the drawn background is '{NO_BACKGROUND}' (no background "
        "clause); same placeholders except {background}.",
    )
    parser.add_argument(
        "--backgrounds",
        nargs="+",
        default=list(PAPER_BACKGROUNDS),
        help="Backgrounds (assigned per --background_sampling), or one path to a text file "
        f"with one background per line; '{NO_BACKGROUND}' selects "
        "--prompt_template_no_background.",
    )
    parser.add_argument(
        "--background_sampling",
        default="balanced",
        choices=list(BACKGROUND_SAMPLERS),
        help="How each image gets its background. 'balanced': indices are cut into "
        "consecutive blocks of len(--backgrounds), each block a seeded shuffle of the list, "
        "so every background appears floor(n/k) or ceil(n/k) times per identity and image i's "
        "background does not depend on --num_images_per_identity. 'independent': a uniform "
        "draw from each image's seed (the behaviour before this flag; reproduces datasets "
        "made then).",
    )
    parser.add_argument(
        "--side_portrait_probability",
        type=float,
        default=0.5,
        help="Probability that {portrait} becomes 'side-portrait'.",
    )
    parser.add_argument(
        "--identity_attributes",
        type=Path,
        default=None,
        help="CSV (columns identity,gender) or JSON ({identity: gender} or "
        "{identity: {gender: ...}}) giving each identity's gender for {gender}; falls back "
        f"to a 'gender' key in the identity's {TRAINING_CONFIG_NAME}.",
    )
    parser.add_argument(
        "--negative_prompt", default=DEFAULT_NEGATIVE_PROMPT, help="Negative prompt (paper's)."
    )
    parser.add_argument(
        "--scheduler",
        default="ddpm",
        help="Sampler, one of: " + ", ".join(SCHEDULERS) + " (built from the base model's "
        "scheduler config).",
    )
    parser.add_argument("--num_inference_steps", type=int, default=30, help="Denoising steps.")
    parser.add_argument(
        "--guidance_scale", type=float, default=5.0, help="Classifier-free guidance scale."
    )
    parser.add_argument(
        "--lora_scale", type=float, default=1.0, help="LoRA strength (0 = the base model)."
    )
    parser.add_argument(
        "--resolution", type=int, default=512, help="Image height and width (multiple of 8)."
    )
    parser.add_argument(
        "--batch_size",
        type=int,
        default=1,
        help="Images per pipeline call, consecutive indices of one identity. Images depend on "
        "it only at float-rounding level (see README); raise it on a GPU for throughput.",
    )
    parser.add_argument(
        "--seed", type=int, default=0, help="Base seed; each image's seed is derived from it."
    )
    parser.add_argument(
        "--mixed_precision",
        default="fp16",
        choices=sorted(MIXED_PRECISION_DTYPES),
        help="Weights/activations dtype on GPU (paper: fp16); on CPU fp16 falls back to fp32.",
    )
    parser.add_argument(
        "--grid_dir",
        type=Path,
        default=None,
        help="Write a contact sheet per finished identity as GRID_DIR/<identity>.jpg "
        "(outside --output_dir, so the dataset stays one image folder per identity).",
    )
    parser.add_argument(
        "--overwrite",
        action="store_true",
        help="Regenerate images that already exist (and accept changed settings).",
    )
    return parser


def parse_args(argv: Sequence[str] | None = None) -> argparse.Namespace:
    """Parse and validate the command line (ValueError with the fix on bad input)."""
    args = build_parser().parse_args(argv)
    args.backgrounds = resolve_backgrounds(args.backgrounds)
    validate_args(args)
    return args


def validate_args(args: argparse.Namespace) -> None:
    """Checks that need no model: numbers, templates, scheduler name, paths."""
    positive = ("num_images_per_identity", "num_inference_steps", "batch_size", "resolution")
    for name in positive:
        if getattr(args, name) < 1:
            raise ValueError(f"--{name} must be >= 1, got {getattr(args, name)}")
    if args.resolution % 8:
        raise ValueError(f"--resolution must be a multiple of 8, got {args.resolution}")
    if not 0.0 <= args.side_portrait_probability <= 1.0:
        raise ValueError("--side_portrait_probability must be in [0, 1]")
    scheduler_class(args.scheduler)  # ValueError listing the options
    background_sampler(args.background_sampling)
    validate_template(args.prompt_template, "--prompt_template")
    validate_template(args.prompt_template_no_background, "--prompt_template_no_background")
    if "background" in template_placeholders(args.prompt_template_no_background):
        raise ValueError("--prompt_template_no_background must not contain {background}")
    if args.identities is not None and args.lora_root is None:
        raise ValueError("--identities selects folders under --lora_root; use it with --lora_root")
    if args.lora_dir is not None and CHECKPOINT_PATTERN.match(args.lora_dir.name):
        raise ValueError(
            f"--lora_dir {args.lora_dir} is a checkpoint folder; pass the identity folder "
            f"as --lora_dir {args.lora_dir.parent} and --checkpoint {args.lora_dir.name}"
        )
    if args.identity_attributes is not None and not args.identity_attributes.is_file():
        raise FileNotFoundError(f"--identity_attributes file {args.identity_attributes} not found")
    if args.grid_dir is not None and _is_inside(args.grid_dir, args.output_dir):
        raise ValueError(
            f"--grid_dir {args.grid_dir} is inside --output_dir; contact sheets there would "
            "be read as an identity by image-folder loaders. Choose a folder outside it."
        )


def _is_inside(path: Path, folder: Path) -> bool:
    """True when `path` is `folder` or lies below it."""
    path, folder = path.resolve(), folder.resolve()
    return path == folder or folder in path.parents


def resolve_backgrounds(values: Sequence[str]) -> list[str]:
    """The background list: the values themselves, or the lines of the one file given."""
    if len(values) == 1 and (Path(values[0]).is_file() or values[0].endswith(".txt")):
        path = Path(values[0])
        if not path.is_file():
            raise FileNotFoundError(f"--backgrounds file {path} not found")
        values = [line.strip() for line in path.read_text().splitlines()]
        values = [line for line in values if line and not line.startswith("#")]
        if not values:
            raise ValueError(f"--backgrounds file {path} lists no backgrounds")
    backgrounds = list(values)
    if len(set(backgrounds)) != len(backgrounds):
        raise ValueError(f"--backgrounds has duplicates: {backgrounds}")
    return backgrounds


def scheduler_class(name: str) -> tuple[str, dict[str, Any]]:
    """Look up a scheduler name; ValueError listing the options when unknown."""
    if name not in SCHEDULERS:
        raise ValueError(f"unknown --scheduler {name!r}; choose one of: {', '.join(SCHEDULERS)}")
    return SCHEDULERS[name]


def build_scheduler(name: str, base_config: Any) -> Any:
    """A diffusers scheduler of kind `name` with the base model's betas and timesteps."""
    import diffusers

    class_name, overrides = scheduler_class(name)
    return getattr(diffusers, class_name).from_config(base_config, **overrides)


# ----------------------------------------------------------------------- prompts and seeds


def template_placeholders(template: str) -> set[str]:
    """Field names used in a str.format template ('{gender} x' -> {'gender'})."""
    try:
        return {field for _, field, _, _ in string.Formatter().parse(template) if field is not None}
    except ValueError as error:  # unbalanced braces
        raise ValueError(f"malformed prompt template {template!r}: {error}") from error


def validate_template(template: str, flag: str = "template") -> None:
    """ValueError naming unknown, positional or attribute placeholders."""
    unknown = sorted(template_placeholders(template) - set(PROMPT_PLACEHOLDERS))
    if unknown:
        allowed = ", ".join(f"{{{name}}}" for name in PROMPT_PLACEHOLDERS)
        shown = ", ".join(f"{{{name}}}" for name in unknown)
        raise ValueError(f"{flag} {template!r} has unknown placeholder(s) {shown}; use {allowed}")


def image_seed(base_seed: int, identity: str, index: int) -> int:
    """Per-image seed: first 8 bytes of sha256('base_seed/identity/index') mod 2**63."""
    return stable_seed(base_seed, identity, index, byteorder="big")


def prompt_choices(
    seed: int, backgrounds: Sequence[str], side_portrait_probability: float
) -> tuple[str, bool]:
    """(background, side_portrait) drawn from random.Random(seed): coin flip, then choice."""
    rng = random.Random(seed)
    side_portrait = rng.random() < side_portrait_probability
    return rng.choice(list(backgrounds)), side_portrait


def background_block(
    base_seed: int, identity: str, block: int, backgrounds: Sequence[str]
) -> list[str]:
    """Block b's order: random.Random(sha256('base_seed/identity/backgrounds/b')).shuffle(list)."""
    block_seed = stable_seed(base_seed, identity, "backgrounds", block, byteorder="big")
    order = list(backgrounds)
    random.Random(block_seed).shuffle(order)
    return order


def balanced_background(
    base_seed: int, identity: str, index: int, backgrounds: Sequence[str]
) -> str:
    """Background of image i: slot i mod k of block i // k (k = len(backgrounds)).

    Each block holds every background once, so over n images each appears floor(n/k) or
    ceil(n/k) times, and image i's background does not depend on n.
    """
    block, slot = divmod(index, len(backgrounds))
    return background_block(base_seed, identity, block, backgrounds)[slot]


def independent_background(
    base_seed: int, identity: str, index: int, backgrounds: Sequence[str]
) -> str:
    """Background drawn uniformly from the image's own seed (prompt_choices' choice)."""
    return prompt_choices(image_seed(base_seed, identity, index), backgrounds, 0.0)[0]


# Background sampler factory: name -> f(base_seed, identity, index, backgrounds) -> background.
BACKGROUND_SAMPLERS: dict[str, Callable[[int, str, int, Sequence[str]], str]] = {
    "balanced": balanced_background,
    "independent": independent_background,
}


def background_sampler(name: str) -> Callable[[int, str, int, Sequence[str]], str]:
    """Look up a background sampling name; ValueError listing the options when unknown."""
    if name not in BACKGROUND_SAMPLERS:
        options = ", ".join(BACKGROUND_SAMPLERS)
        raise ValueError(f"unknown --background_sampling {name!r}; choose one of: {options}")
    return BACKGROUND_SAMPLERS[name]


def build_prompt(
    template: str,
    no_background_template: str,
    *,
    gender: str | None,
    background: str,
    side_portrait: bool,
    identity: str,
) -> str:
    """Fill the template; the background 'none' uses the no-background template."""
    chosen = no_background_template if background == NO_BACKGROUND else template
    return chosen.format(
        gender=gender,
        background=background,
        portrait=PORTRAIT_WORDS[side_portrait],
        identity=identity,
    )


@dataclasses.dataclass(frozen=True)
class ImageJob:
    """Everything that defines one image except the model settings."""

    identity: str
    index: int
    seed: int
    prompt: str
    background: str
    side_portrait: bool
    gender: str | None


def plan_image(args: argparse.Namespace, identity: str, gender: str | None, index: int) -> ImageJob:
    """The job for image `index` of `identity` (pure function of the arguments)."""
    seed = image_seed(args.seed, identity, index)
    # The coin is the first draw of random.Random(seed) in both modes (as before the flag).
    _, side_portrait = prompt_choices(seed, args.backgrounds, args.side_portrait_probability)
    sample_background = background_sampler(args.background_sampling)
    background = sample_background(args.seed, identity, index, args.backgrounds)
    prompt = build_prompt(
        args.prompt_template,
        args.prompt_template_no_background,
        gender=gender,
        background=background,
        side_portrait=side_portrait,
        identity=identity,
    )
    return ImageJob(identity, index, seed, prompt, background, side_portrait, gender)


def make_batches(
    identities: Sequence[str], num_images: int, batch_size: int
) -> list[tuple[str, tuple[int, ...]]]:
    """Work units (identity, indices): consecutive index ranges [kB, (k+1)B) per identity."""
    return [
        (identity, tuple(range(start, min(start + batch_size, num_images))))
        for identity in identities
        for start in range(0, num_images, batch_size)
    ]


def split_work(items: Sequence[Any], num_processes: int, process_index: int) -> list[Any]:
    """Contiguous, balanced share of `items` for one process (sizes differ by at most 1)."""
    base, extra = divmod(len(items), num_processes)
    start = process_index * base + min(process_index, extra)
    return list(items[start : start + base + (process_index < extra)])


# -------------------------------------------------------------------------- input checks


@dataclasses.dataclass
class IdentitySource:
    """An identity's LoRA weights file, or why it cannot be used."""

    name: str
    folder: Path
    lora_file: Path | None
    error: str | None = None


def resolve_checkpoint(identity_folder: Path, checkpoint: str | None) -> Path:
    """The folder holding the weights: the identity folder, a named or the latest checkpoint."""
    if checkpoint is None:
        return identity_folder
    if checkpoint != "latest":
        return identity_folder / checkpoint
    steps = [
        (int(match.group(1)), path)
        for path in identity_folder.glob("checkpoint-*")
        if (match := CHECKPOINT_PATTERN.match(path.name)) and path.is_dir()
    ]
    return max(steps)[1] if steps else identity_folder / "checkpoint-<none found>"


def discover_identities(args: argparse.Namespace) -> list[IdentitySource]:
    """Identity folders from --lora_dir / --lora_root with their weights files checked."""
    if args.lora_dir is not None:
        if not args.lora_dir.is_dir():
            raise FileNotFoundError(f"--lora_dir {args.lora_dir} is not a folder")
        folders = [args.lora_dir]
    else:
        if not args.lora_root.is_dir():
            raise FileNotFoundError(f"--lora_root {args.lora_root} is not a folder")
        names = (
            list(dict.fromkeys(args.identities))
            if args.identities
            else sorted(
                path.name
                for path in args.lora_root.iterdir()
                if path.is_dir() and not path.name.startswith((".", "_"))
            )
        )
        if not names:
            raise ValueError(f"--lora_root {args.lora_root} has no identity folders")
        folders = [args.lora_root / name for name in names]
    return [_identity_source(folder, args.checkpoint) for folder in folders]


def _identity_source(folder: Path, checkpoint: str | None) -> IdentitySource:
    """Locate one identity's weights; a missing file becomes an error message."""
    lora_file = resolve_checkpoint(folder, checkpoint) / LORA_WEIGHT_NAME
    if lora_file.is_file():
        return IdentitySource(folder.name, folder, lora_file)
    where = f"checkpoint {checkpoint!r} of " if checkpoint else ""
    error = (
        f"identity {folder.name!r}: no LoRA weights at {lora_file} ({where}{folder}); expected "
        f"train_ID-Booth.py's {LORA_WEIGHT_NAME}: train this identity or fix "
        "--lora_root/--lora_dir/--checkpoint"
    )
    return IdentitySource(folder.name, folder, None, error)


def load_identity_attributes(path: Path) -> dict[str, dict[str, str]]:
    """identity -> {column: value} from a CSV with an 'identity' column or a JSON mapping."""
    if path.suffix.lower() == ".csv":
        with path.open(newline="") as handle:
            reader = csv.DictReader(handle)
            if reader.fieldnames is None or "identity" not in reader.fieldnames:
                raise ValueError(f"{path}: CSV needs a header with an 'identity' column")
            rows = [{k: (v or "").strip() for k, v in row.items()} for row in reader]
        attributes = {row["identity"]: row for row in rows}
        if len(attributes) != len(rows):
            raise ValueError(f"{path}: an identity appears in more than one row")
        return attributes
    if path.suffix.lower() == ".json":
        data = json.loads(path.read_text())
        if isinstance(data, list):
            if not all(isinstance(row, dict) and "identity" in row for row in data):
                raise ValueError(
                    f"{path}: a JSON list needs {{'identity': ..., 'gender': ...}} rows"
                )
            data = {str(row["identity"]): row for row in data}
        if not isinstance(data, dict):
            raise ValueError(f"{path}: JSON must map identity -> gender or -> {{'gender': ...}}")
        return {str(k): (v if isinstance(v, dict) else {"gender": v}) for k, v in data.items()}
    raise ValueError(f"{path}: identity attributes must be a .csv or .json file")


def normalise_gender(value: str) -> str | None:
    """'M'/'man'/'male' -> 'male', 'F'/'woman'/'female' -> 'female', else None."""
    return GENDER_ALIASES.get(str(value).strip().lower())


def resolve_genders(
    identities: Sequence[IdentitySource], attributes_file: Path | None
) -> dict[str, str]:
    """Each usable identity's gender; one ValueError listing every one without a valid one.

    Identities whose LoRA is missing are skipped here: they fail on their own later.
    """
    attributes = load_identity_attributes(attributes_file) if attributes_file else {}
    genders, missing, invalid = {}, [], []
    for identity in (identity for identity in identities if identity.error is None):
        raw = attributes.get(identity.name, {}).get("gender") or _training_config_gender(
            identity.folder
        )
        if not raw:
            missing.append(identity.name)
        elif (gender := normalise_gender(raw)) is None:
            invalid.append(f"{identity.name}={raw!r}")
        else:
            genders[identity.name] = gender
    if missing or invalid:
        source = attributes_file or "no --identity_attributes file"
        problems = []
        if missing:
            problems.append(f"no gender for {len(missing)} identities: {', '.join(missing)}")
        if invalid:
            problems.append(f"unknown gender values {', '.join(invalid)}")
        raise ValueError(
            f"{'; '.join(problems)} ({source}); the prompt template uses {{gender}}: add rows "
            f"'identity,gender' with one of {sorted(set(GENDER_ALIASES))} to --identity_attributes"
        )
    return genders


def _training_config_gender(folder: Path) -> str | None:
    """A 'gender' entry in the identity's training_config.json, if there is one."""
    config = folder / TRAINING_CONFIG_NAME
    if not config.is_file():
        return None
    try:
        return json.loads(config.read_text()).get("gender")
    except (json.JSONDecodeError, AttributeError):
        return None


def check_output_dir(output_dir: Path) -> None:
    """Create the output folder and prove it is writable (ValueError with the fix if not)."""
    try:
        output_dir.mkdir(parents=True, exist_ok=True)
        handle, probe = tempfile.mkstemp(dir=output_dir, prefix=".write-probe-")
        os.close(handle)
        os.unlink(probe)
    except OSError as error:
        raise ValueError(
            f"--output_dir {output_dir} is not a writable folder ({error}); choose another path"
        ) from error


def generation_settings(args: argparse.Namespace) -> dict:
    """The settings that define the pixels (compared on resume; stored in run_config.json)."""
    values = {key: getattr(args, key, None) for key in GENERATION_KEYS}
    source = args.lora_dir if args.lora_dir is not None else args.lora_root
    values["lora_source"] = str(source.resolve())
    values["mixed_precision"] = args.resolved_mixed_precision
    return values


def lora_files(identities: Sequence[IdentitySource]) -> dict[str, str]:
    """identity -> resolved LoRA weights path, for the identities that have one."""
    return {i.name: str(i.lora_file.resolve()) for i in identities if i.lora_file is not None}


def read_run_config(output_dir: Path) -> dict:
    """The previous run's run_config.json, or {} when there is none."""
    path = output_dir / RUN_CONFIG_NAME
    return json.loads(path.read_text()) if path.is_file() else {}


def check_run_config(
    output_dir: Path, settings: dict, identities: Sequence[IdentitySource], overwrite: bool
) -> None:
    """A resumed run must use the settings and LoRA files that made the images there.

    Per-identity LoRA paths catch e.g. `--checkpoint latest` resolving to a newer checkpoint.
    """
    previous_config = read_run_config(output_dir)
    if overwrite or not previous_config:
        return
    previous = {**LEGACY_GENERATION_VALUES, **previous_config.get("generation", {})}
    changed = {k: (previous.get(k), v) for k, v in settings.items() if previous.get(k) != v}
    previous_files = previous_config.get("lora_files", {})
    for name, path in lora_files(identities).items():
        if previous_files.get(name, path) != path:
            changed[f"LoRA of {name}"] = (previous_files[name], path)
    if changed:
        lines = "; ".join(f"{k}: {old!r} -> {new!r}" for k, (old, new) in changed.items())
        raise ValueError(
            f"{output_dir} holds images made with other settings ({lines}); use a new "
            "--output_dir, or --overwrite to regenerate them"
        )


# ----------------------------------------------------------------------------- LoRA files

_LORA_SUFFIXES = {
    ".lora.down.weight": "down",
    ".lora.up.weight": "up",
    ".lora_A.weight": "down",
    ".lora_B.weight": "up",
    ".lora_linear_layer.down.weight": "down",
    ".lora_linear_layer.up.weight": "up",
}


def lora_mismatches(lora_file: Path, components: dict[str, Any]) -> tuple[int, list[str]]:
    """(#tensors checked, problems) for a LoRA file against the base model's layers.

    Reads only the safetensors header. A down matrix is (r, in[, k, k]) and must match the
    layer's input width; an up matrix is (out, r[, 1, 1]) and must match its output width.
    """
    from safetensors import safe_open

    checked, problems = 0, []
    with safe_open(str(lora_file), framework="pt") as handle:
        for key in handle.keys():  # noqa: SIM118 (safe_open is not a dict)
            prefix, _, rest = key.partition(".")
            suffix = next((s for s in _LORA_SUFFIXES if rest.endswith(s)), None)
            if prefix not in components or suffix is None:
                continue  # another naming scheme: left to diffusers' loader
            checked += 1
            shape = tuple(handle.get_slice(key).get_shape())
            problem = _layer_mismatch(
                components[prefix], rest[: -len(suffix)], _LORA_SUFFIXES[suffix], shape
            )
            if problem:
                problems.append(f"{prefix}.{problem}")
    return checked, problems


def _layer_mismatch(component: Any, module_path: str, kind: str, shape: tuple) -> str | None:
    """Why a LoRA matrix of `shape` does not fit `component.<module_path>`, or None."""
    try:
        layer = component.get_submodule(module_path)
    except AttributeError:
        return f"{module_path}: no such layer in the base model"
    widths = (
        getattr(layer, "in_features", getattr(layer, "in_channels", None)),
        getattr(layer, "out_features", getattr(layer, "out_channels", None)),
    )
    if kind == "down" and len(shape) >= 2 and shape[1] != widths[0]:
        return f"{module_path}: LoRA input width {shape[1]} vs layer input {widths[0]}"
    if kind == "up" and len(shape) >= 1 and shape[0] != widths[1]:
        return f"{module_path}: LoRA output width {shape[0]} vs layer output {widths[1]}"
    return None


def check_lora(identity: IdentitySource, pipeline: Any, model_name: str) -> str | None:
    """An error message if the identity's LoRA is unreadable or made for another base."""
    components = {"unet": pipeline.unet, "text_encoder": pipeline.text_encoder}
    try:
        checked, problems = lora_mismatches(identity.lora_file, components)
    except Exception as error:  # safetensors raises its own types for corrupt headers
        return f"identity {identity.name!r}: cannot read LoRA {identity.lora_file}: {error}"
    if problems:
        shown = "; ".join(problems[:3])
        return (
            f"identity {identity.name!r}: LoRA {identity.lora_file} does not fit the base model "
            f"{model_name} ({len(problems)} of {checked} tensors mismatch, e.g. {shown}); it was "
            "trained on a different base: pass that --pretrained_model_name_or_path or retrain"
        )
    return None


# ------------------------------------------------------------------------- files on disk


def encode_png(image: PILImage.Image, record: dict) -> bytes:
    """PNG bytes with the metadata record in a text chunk (deterministic for equal input)."""
    from PIL import PngImagePlugin

    info = PngImagePlugin.PngInfo()
    info.add_text(PNG_METADATA_KEY, json.dumps(record, sort_keys=True))
    buffer = io.BytesIO()
    image.save(buffer, format="PNG", pnginfo=info)
    return buffer.getvalue()


def is_complete_png(path: Path) -> bool:
    """A PNG file that starts with the signature and ends with the IEND chunk."""
    try:
        with open(path, "rb") as handle:
            head = handle.read(8)
            handle.seek(0, os.SEEK_END)
            if handle.tell() < len(PNG_SIGNATURE) + len(PNG_IEND_CHUNK):
                return False
            handle.seek(-len(PNG_IEND_CHUNK), os.SEEK_END)
            return head == PNG_SIGNATURE and handle.read() == PNG_IEND_CHUNK
    except OSError:
        return False


def read_png_record(path: Path) -> dict | None:
    """The metadata record stored in an image written by this script, or None."""
    from PIL import Image

    try:
        with Image.open(path) as image:
            text = image.text.get(PNG_METADATA_KEY)
        return json.loads(text) if text else None
    except (OSError, ValueError):
        return None


def image_paths(output_dir: Path) -> list[tuple[str, int, Path]]:
    """(identity, index, path) of every finished image under output_dir, sorted."""
    found = []
    for folder in sorted(p for p in output_dir.iterdir() if p.is_dir()):
        for path in folder.iterdir():
            match = IMAGE_NAME_PATTERN.match(path.name)
            if match and is_complete_png(path):
                found.append((folder.name, int(match.group(1)), path))
    return sorted(found)


def rebuild_metadata(output_dir: Path) -> int:
    """Rewrite metadata.jsonl from the images on disk (one line each); returns #lines."""
    lines = []
    for _, _, path in image_paths(output_dir):
        record = read_png_record(path)
        if record is None:
            logger.warning(
                "%s has no %s record; left out of %s", path, PNG_METADATA_KEY, METADATA_NAME
            )
            continue
        lines.append(json.dumps(record, sort_keys=True))
    atomic_write_bytes(output_dir / METADATA_NAME, "".join(f"{ln}\n" for ln in lines).encode())
    return len(lines)


def write_contact_sheet(paths: Sequence[Path], target: Path, thumbnail: int = 128) -> None:
    """A JPEG grid of the images (ceil(sqrt(n)) columns, `thumbnail` px cells)."""
    from PIL import Image

    columns = math.ceil(math.sqrt(len(paths)))
    rows = math.ceil(len(paths) / columns)
    sheet = Image.new("RGB", (columns * thumbnail, rows * thumbnail), "white")
    for position, path in enumerate(paths):
        with Image.open(path) as image:
            cell = image.convert("RGB").resize((thumbnail, thumbnail), Image.BILINEAR)
        sheet.paste(cell, ((position % columns) * thumbnail, (position // columns) * thumbnail))
    buffer = io.BytesIO()
    sheet.save(buffer, format="JPEG", quality=90)
    target.parent.mkdir(parents=True, exist_ok=True)
    atomic_write_bytes(target, buffer.getvalue())


def write_run_config(args: argparse.Namespace, settings: dict, identities, num_processes) -> None:
    """run_config.json: the generation settings, all arguments, identities and versions."""
    import accelerate
    import diffusers
    import peft
    import torch
    import transformers

    config = {
        "generation": settings,
        "args": {k: (str(v) if isinstance(v, Path) else v) for k, v in vars(args).items()},
        "identities": [identity.name for identity in identities],
        # Every identity ever generated here, so a later run over any subset is checked.
        "lora_files": {
            **read_run_config(args.output_dir).get("lora_files", {}),
            **lora_files(identities),
        },
        "num_processes": num_processes,
        "versions": {
            "python": sys.version.split()[0],
            "torch": torch.__version__,
            "diffusers": diffusers.__version__,
            "transformers": transformers.__version__,
            "peft": peft.__version__,
            "accelerate": accelerate.__version__,
        },
    }
    text = json.dumps(config, indent=2, sort_keys=True, default=str) + "\n"
    atomic_write_bytes(args.output_dir / RUN_CONFIG_NAME, text.encode())


# ---------------------------------------------------------------------------- generation


def make_partial_state() -> Any:
    """accelerate's process state; cpu=True without CUDA so torchrun on CPU uses gloo.

    The long timeout covers the final barrier: after a resume one process may have hours
    more work than another, and the default (10-30 min) would kill the finished one.
    """
    import torch
    from accelerate import PartialState

    return PartialState(cpu=not torch.cuda.is_available(), timeout=BARRIER_TIMEOUT)


def resolve_mixed_precision(requested: str, device_type: str) -> str:
    """fp16 on CPU is unsupported by some kernels: fall back to fp32 with a warning."""
    if device_type == "cpu" and requested == "fp16":
        logger.warning("fp16 is not supported on CPU; generating in fp32 instead")
        return "no"
    return requested


def load_pipeline(args: argparse.Namespace) -> StableDiffusionPipeline:
    """The base pipeline on CPU, frozen, with the chosen scheduler and no progress bar."""
    from diffusers import StableDiffusionPipeline

    pipeline = StableDiffusionPipeline.from_pretrained(args.pretrained_model_name_or_path)
    pipeline.scheduler = build_scheduler(args.scheduler, pipeline.scheduler.config)
    # Frozen weights: on CPU, linear kernels differ at float level with requires_grad, and
    # a LoRA load freezes the base, so freezing up front keeps every identity on one path.
    for component in pipeline.components.values():
        if hasattr(component, "requires_grad_"):
            component.requires_grad_(False)
    pipeline.set_progress_bar_config(disable=True)
    return pipeline


def generate_batch(
    pipeline: StableDiffusionPipeline, jobs: Sequence[ImageJob], args: argparse.Namespace
) -> tuple[list[PILImage.Image], list[bool]]:
    """Images for one batch; per-image CPU generators give each its own noise streams.

    The initial latents and every stochastic scheduler step draw sample i's noise from
    generator i, so an image's noise does not depend on its batch-mates or the device.
    """
    import torch

    generators = [torch.Generator("cpu").manual_seed(job.seed) for job in jobs]
    output = pipeline(
        prompt=[job.prompt for job in jobs],
        negative_prompt=[args.negative_prompt] * len(jobs),
        generator=generators,
        num_inference_steps=args.num_inference_steps,
        guidance_scale=args.guidance_scale,
        height=args.resolution,
        width=args.resolution,
        output_type="pil",
    )
    flagged = output.nsfw_content_detected or [False] * len(jobs)
    return output.images, [bool(flag) for flag in flagged]


def image_record(job: ImageJob, args: argparse.Namespace, lora_file: Path, batch) -> dict:
    """The metadata line of one image (also stored inside the PNG)."""
    return {
        "file": f"{job.identity}/{job.index}.png",
        "identity": job.identity,
        "index": job.index,
        "seed": job.seed,
        "prompt": job.prompt,
        "negative_prompt": args.negative_prompt,
        "gender": job.gender,
        "background": job.background,
        "background_sampling": args.background_sampling,
        "side_portrait": job.side_portrait,
        "scheduler": args.scheduler,
        "num_inference_steps": args.num_inference_steps,
        "guidance_scale": args.guidance_scale,
        "resolution": args.resolution,
        "lora_path": str(lora_file),
        "lora_scale": args.lora_scale,
        "model": args.pretrained_model_name_or_path,
        "mixed_precision": args.resolved_mixed_precision,
        "base_seed": args.seed,
        "batch_indices": list(batch),
    }


@dataclasses.dataclass
class Counts:
    """Per-process tallies for the final summary."""

    written: int = 0
    skipped: int = 0
    failed: int = 0
    failed_identities: list[str] = dataclasses.field(default_factory=list)
    seconds: float = 0.0


def pending_indices(folder: Path, indices: Sequence[int], overwrite: bool) -> list[int]:
    """Indices of a batch whose image is not on disk yet (all of them with --overwrite)."""
    if overwrite:
        return list(indices)
    return [index for index in indices if not is_complete_png(folder / f"{index}.png")]


def save_image(path: Path, image: PILImage.Image, record: dict) -> None:
    """Atomically write one image; an OSError (e.g. disk full) stops the run cleanly."""
    try:
        atomic_write_bytes(path, encode_png(image, record))
    except OSError as error:
        raise OSError(
            error.errno,
            f"could not write {path} ({error.strerror or error}); no partial file was left, "
            "free space / fix the folder and re-run to resume",
        ) from error


def run_identity(
    pipeline: StableDiffusionPipeline,
    identity: IdentitySource,
    todo: Sequence[tuple[tuple[int, ...], list[int]]],
    context: dict,
    progress: Any,
) -> None:
    """Generate the missing images of this process's batches of one identity.

    `todo` holds (batch indices, missing indices) pairs; the identity's LoRA is swapped
    into the resident base pipeline and unloaded afterwards.
    """
    args, counts = context["args"], context["counts"]
    num_missing = sum(len(missing) for _, missing in todo)
    error = identity.error or context["lora_errors"].get(identity.name)
    if error is None:
        error = _load_lora(pipeline, identity, args.lora_scale)
    if error is not None:
        counts.failed += num_missing
        counts.failed_identities.append(identity.name)
        logger.error("%s; skipping its %d images", error, num_missing)
        progress.update(num_missing)
        return
    folder = args.output_dir / identity.name
    folder.mkdir(parents=True, exist_ok=True)
    gender = context["genders"].get(identity.name)
    try:
        for batch, missing in todo:
            # The whole batch is regenerated so its numerics match an uninterrupted run.
            jobs = [plan_image(args, identity.name, gender, index) for index in batch]
            images, flagged = generate_batch(pipeline, jobs, args)
            for job, image, nsfw in zip(jobs, images, flagged, strict=True):
                if job.index not in missing:
                    continue
                if nsfw:
                    counts.failed += 1
                    logger.error("%s flagged by the safety checker; not written", job)
                else:
                    record = image_record(job, args, identity.lora_file, batch)
                    save_image(folder / f"{job.index}.png", image, record)
                    counts.written += 1
                progress.update(1)
    finally:
        pipeline.unload_lora_weights()


def plan_process_work(
    args: argparse.Namespace, my_batches: Sequence[tuple[str, tuple[int, ...]]], counts: Counts
) -> dict[str, list[tuple[tuple[int, ...], list[int]]]]:
    """identity -> [(batch, missing indices)] for this process; counts what is done.

    Also deletes temp files that killed runs left for this process's own images (never
    another process's: the work split is disjoint).
    """
    by_identity: dict[str, list[tuple[int, ...]]] = {}
    for name, batch in my_batches:
        by_identity.setdefault(name, []).append(batch)
    work: dict[str, list[tuple[tuple[int, ...], list[int]]]] = {}
    for name, batches in by_identity.items():
        folder = args.output_dir / name
        remove_stale_temps(folder, {f"{index}.png" for batch in batches for index in batch})
        for batch in batches:
            missing = pending_indices(folder, batch, args.overwrite)
            counts.skipped += len(batch) - len(missing)
            if missing:
                work.setdefault(name, []).append((batch, missing))
    return work


def _load_lora(pipeline: StableDiffusionPipeline, identity: IdentitySource, scale: float):
    """Swap the identity's LoRA into the resident base; an error message on failure."""
    try:
        pipeline.load_lora_weights(
            str(identity.lora_file.parent),
            weight_name=identity.lora_file.name,
            adapter_name=ADAPTER_NAME,
        )
        pipeline.set_adapters([ADAPTER_NAME], adapter_weights=[scale])
    except Exception as error:  # diffusers/peft raise many types; the identity is skipped
        pipeline.unload_lora_weights()  # a failed load can leave half-injected layers
        return f"identity {identity.name!r}: loading LoRA {identity.lora_file} failed: {error}"
    return None


def prepare(args: argparse.Namespace, state: Any) -> dict:
    """Every check that needs no model, in the order a user would fix them."""
    identities = discover_identities(args)
    placeholders = template_placeholders(args.prompt_template) | template_placeholders(
        args.prompt_template_no_background
    )
    genders = {}
    if "gender" in placeholders:
        genders = resolve_genders(identities, args.identity_attributes)
    check_output_dir(args.output_dir)
    settings = generation_settings(args)
    check_run_config(args.output_dir, settings, identities, args.overwrite)
    for identity in identities:
        if identity.error and state.is_main_process:
            logger.error("%s", identity.error)
    return {"identities": identities, "genders": genders, "settings": settings}


def summarise(all_counts: Sequence[Counts], num_images: int) -> dict:
    """Totals over processes; images/s uses the slowest process's generation time."""
    seconds = max((c.seconds for c in all_counts), default=0.0)
    written = sum(c.written for c in all_counts)
    return {
        "images_planned": num_images,
        "written": written,
        "skipped": sum(c.skipped for c in all_counts),
        "failed": sum(c.failed for c in all_counts),
        "failed_identities": sorted({n for c in all_counts for n in c.failed_identities}),
        "seconds": round(seconds, 3),
        "images_per_second": round(written / seconds, 3) if seconds > 0 else 0.0,
    }


def finish(args: argparse.Namespace, state: Any, counts: Counts, identities) -> dict:
    """Gather tallies, rebuild metadata.jsonl and the contact sheets on the main process."""
    from accelerate.utils import gather_object

    state.wait_for_everyone()
    all_counts = [Counts(**c) for c in gather_object([dataclasses.asdict(counts)])]
    summary = summarise(all_counts, len(identities) * args.num_images_per_identity)
    if state.is_main_process:
        summary["metadata_lines"] = rebuild_metadata(args.output_dir)
        if args.grid_dir is not None:
            write_contact_sheets(args, identities)
        logger.info("summary: %s", json.dumps(summary))
    return summary


def write_contact_sheets(args: argparse.Namespace, identities) -> None:
    """One grid per identity whose requested images all exist."""
    for identity in identities:
        paths = [
            args.output_dir / identity.name / f"{index}.png"
            for index in range(args.num_images_per_identity)
        ]
        if all(is_complete_png(path) for path in paths):
            write_contact_sheet(paths, args.grid_dir / f"{identity.name}.jpg")


def checked_pipeline(args: argparse.Namespace, identities, state: Any):
    """Load the base on CPU, check every LoRA header against it, then move it to the device."""
    import torch

    pipeline = load_pipeline(args)
    lora_errors = {}
    for identity in identities:
        if identity.error is None:
            message = check_lora(identity, pipeline, args.pretrained_model_name_or_path)
            if message is not None:
                lora_errors[identity.name] = message
                if state.is_main_process:
                    logger.error("%s", message)
    dtype = getattr(torch, MIXED_PRECISION_DTYPES[args.resolved_mixed_precision])
    pipeline.to(state.device)
    if dtype != torch.float32:
        pipeline.to(dtype=dtype)
    return pipeline, lora_errors


def main(args: argparse.Namespace) -> dict:
    """Validate inputs, load the base once, generate this process's share, summarise."""
    from tqdm.auto import tqdm

    state = make_partial_state()
    logging.basicConfig(
        level=logging.INFO,
        format=f"[rank {state.process_index}/{state.num_processes}] %(levelname)s %(message)s",
    )
    args.resolved_mixed_precision = resolve_mixed_precision(args.mixed_precision, state.device.type)
    plan = prepare(args, state)
    identities = plan["identities"]
    if state.is_main_process:
        remove_stale_temps(args.output_dir)
        write_run_config(args, plan["settings"], identities, state.num_processes)
    batches = make_batches(
        [identity.name for identity in identities], args.num_images_per_identity, args.batch_size
    )
    counts = Counts()
    work = plan_process_work(
        args, split_work(batches, state.num_processes, state.process_index), counts
    )
    pipeline, lora_errors = checked_pipeline(args, identities, state)
    context = {"args": args, "counts": counts, "genders": plan["genders"]}
    context["lora_errors"] = lora_errors
    by_name = {identity.name: identity for identity in identities}
    total = sum(len(missing) for todo in work.values() for _, missing in todo)
    logger.info("%d images to generate here, %d already on disk", total, counts.skipped)
    started = time.perf_counter()
    progress_bar = tqdm(
        total=total, unit="img", desc="generating", disable=not state.is_local_main_process
    )
    with progress_bar as progress:
        for name, todo in work.items():
            run_identity(pipeline, by_name[name], todo, context, progress)
            progress.set_postfix(written=counts.written, failed=counts.failed)
    counts.seconds = time.perf_counter() - started
    return finish(args, state, counts, identities)


if __name__ == "__main__":
    try:
        summary = main(parse_args())
    except (ValueError, OSError) as error:  # bad input: the message, not a traceback
        raise SystemExit(f"inference_ID-Booth.py: error: {error}") from None
    sys.exit(1 if summary["failed"] else 0)
