"""Generate identity datasets from ID-Booth LoRAs: OUTPUT/<identity>/<index>.png.

Each image is a pure function of (base seed, identity, image index, batch): its noise seed
and side-portrait coin flip are derived from sha256(base seed, identity, index), and its
background (default `--background_sampling balanced`) from index i's slot i mod k in block
i // k, a shuffle of the k backgrounds seeded by sha256(base seed, identity, "backgrounds",
block); never from Python's `hash()` or a shared RNG stream, so any image can be regenerated
on its own and adding images to an identity leaves the earlier ones unchanged.

Batches: the job list [(identity, index) for each identity for index < n] is cut into fixed
runs of B consecutive jobs, so one batch may mix identities; every sample applies its own
identity's LoRA through one batched LoRA layer (multi_lora.py), whose slots hold the LoRAs
the current batch needs. The batches depend on the settings alone, whatever the number of
processes and however often the run is interrupted, so a resumed or multi-process run writes
the same bytes as one uninterrupted process (same hardware, library versions and, on CPU,
thread count); a resumed run samples only the missing images, each at its uninterrupted
batch size and position (resample_batches). The batch size itself moves pixels only at
float-rounding level: the noise is per image, but kernels sum in an order that depends on
the batch shape. Denoising runs in
sampling.Sampler (no host syncs; DDPM, DDIM, Euler ancestral) or the stock pipeline loop for
other schedulers; PNGs are encoded and written by worker threads while the next batch runs.

Outputs: `<identity>/<index>.png` (PNG text chunk `id_booth` holds the image's metadata
record, so every image describes itself), `metadata.jsonl` (one line per image, rebuilt
from the PNGs at the end of every run, so it never holds duplicates), `run_config.json`
(the settings that define the images, checked on resume) and optional contact sheets.

Run: `python inference_ID-Booth.py --lora_root LORAS --output_dir OUT --identity_attributes
genders.csv`, or `accelerate launch --num_processes N inference_ID-Booth.py ...` /
`torchrun --nproc_per_node N ...` to split the (identity, batch) work list.

This script plans, batches and records the images; the scheduler factory is in sampling.py,
the LoRA header check in lora.py, the slot pool in multi_lora.py, the PNG writer threads in
fileio.py and the background list in prompts.py.
"""

from __future__ import annotations

import argparse
import dataclasses
import io
import json
import logging
import math
import re
import time
from collections.abc import Collection, Iterator, Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

import runs
from architectures import architecture_of_pipeline, architecture_or_paper, load_vae_beside_base
from datasets import identity_genders
from fileio import (
    PNG_METADATA_KEY,
    ImageWriter,
    atomic_write_bytes,
    is_complete_png,
    read_png_record,
    remove_stale_temps,
)
from lora import LORA_WEIGHTS_NAME, IdentitySource, LoraLayout, check_lora, read_lora_file
from multi_lora import place_identities, slot_pool_for_layouts
from prompts import (
    BACKGROUND_SAMPLERS,
    DEFAULT_NO_BACKGROUND_TEMPLATE,
    DEFAULT_PROMPT_TEMPLATE,
    NO_BACKGROUND,
    PAPER_BACKGROUNDS,
    PROMPT_PLACEHOLDERS,
    background_sampler,
    build_prompt,
    image_seed,
    prompt_choices,
    resolve_backgrounds,
    template_placeholders,
    validate_template,
)
from sampling import SCHEDULERS, build_sampler, scheduler_class

if TYPE_CHECKING:
    from diffusers import StableDiffusionPipeline
    from PIL import Image as PILImage

logger = logging.getLogger("inference_ID-Booth")

TRAINING_CONFIG_NAME = "training_config.json"
METADATA_NAME = "metadata.jsonl"
RUN_CONFIG_NAME = "run_config.json"
IMAGE_NAME_PATTERN = re.compile(r"^(\d+)\.png$")

RESOLUTION = runs.Number(int, low=8, multiple_of=8)
PNG_COMPRESS_LEVEL = runs.Number(int, low=0, high=9)
LORA_SCALE = runs.Number(float, low=0, high=10)
NUM_IMAGES = runs.Number(
    int, low=1, high=10**6
)  # per identity; paper: 21 and 100  # past a few, a LoRA only breaks the images
DEFAULT_CUDA_BATCH_SIZE = 16
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
# ----------------------------------------------------------------------------- arguments


HELP_GROUPS = {  # --help sections (display only; a flag not listed shows under "options")
    "models and LoRAs": [
        "pretrained_model_name_or_path", "pretrained_vae_model_name_or_path", "lora_dir",
        "lora_root", "checkpoint", "identities", "lora_scale",
    ],
    "prompts": [
        "prompt_template", "prompt_template_no_background", "backgrounds",
        "background_sampling", "side_portrait_probability", "identity_attributes",
        "negative_prompt",
    ],
    "sampling": [
        "num_images_per_identity", "scheduler", "num_inference_steps", "guidance_scale",
        "resolution", "seed",
    ],
    "precision and speed": ["mixed_precision", "batch_size", "compile", "png_workers"],
    "output": ["output_dir", "overwrite", "png_compress_level", "grid_dir"],
}  # fmt: skip


def build_parser() -> argparse.ArgumentParser:
    """The command line; defaults are the paper's reference generation setup."""
    parser = runs.argument_parser(__doc__)
    parser.add_argument(
        "--pretrained_model_name_or_path",
        default=None,
        help="Base Stable Diffusion model (hub id or local folder) the LoRAs were trained on; "
        "default: the base every LoRA's header records, else the paper's "
        "stabilityai/stable-diffusion-2-1-base.",
    )
    parser.add_argument(
        "--pretrained_vae_model_name_or_path",
        default=None,
        help="Another VAE (folder or hub id) in place of the base's, e.g. the fp16-safe SDXL VAE "
        "a LoRA was trained with; it must share the base's latent space. A VAE whose config "
        "says force_upcast (SDXL's own) decodes in fp32 under fp16, as in the stock pipeline.",
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
        type=NUM_IMAGES,
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
        "draw from each image's seed.",
    )
    parser.add_argument(
        "--side_portrait_probability",
        type=runs.PROBABILITY,
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
        "--negative_prompt", default=runs.PAPER_NEGATIVE_PROMPT, help="Negative prompt (paper's)."
    )
    parser.add_argument(
        "--scheduler",
        default="ddpm",
        help="Sampler, one of: " + ", ".join(SCHEDULERS) + " (built from the base model's "
        "scheduler config).",
    )
    parser.add_argument(
        "--num_inference_steps", type=runs.POSITIVE_INT, default=30, help="Denoising steps."
    )
    parser.add_argument(
        "--guidance_scale",
        type=runs.GUIDANCE_SCALE,
        default=5.0,
        help="Classifier-free guidance scale.",
    )
    parser.add_argument(
        "--lora_scale",
        type=LORA_SCALE,
        default=1.0,
        help="LoRA strength (0 = the base model; 1 = as trained).",
    )
    parser.add_argument(
        "--resolution",
        type=RESOLUTION,
        default=None,
        help="Image height and width, a multiple of 8 (default: the size the LoRAs record they "
        "were trained at, when all agree; else the base model's native size: 512 for SD 1.5 / "
        "2.1-base, 768 for SD 2.1, 1024 for SDXL).",
    )
    parser.add_argument(
        "--batch_size",
        type=runs.POSITIVE_INT,
        default=None,
        help="Images per denoising batch: consecutive (identity, index) jobs, so one batch may "
        "mix identities (each sample applies its own LoRA). Default: 16 on CUDA, 1 elsewhere. "
        "Images depend on it only at float-rounding level (see README).",
    )
    parser.add_argument(
        "--compile",
        action="store_true",
        help="torch.compile the denoising step (the first batch of each size is slow while "
        "it compiles); pixels move at float-rounding level.",
    )
    parser.add_argument(
        "--png_compress_level",
        type=PNG_COMPRESS_LEVEL,
        default=1,
        help="zlib level of the PNGs, 0-9 (PIL's default is 6: about 3x the encoding time for "
        "files a few percent smaller). Lossless at every level.",
    )
    parser.add_argument(
        "--png_workers",
        type=runs.POSITIVE_INT,
        default=2,
        help="Threads that encode and write PNGs while the next batch is sampled.",
    )
    parser.add_argument(
        "--seed", type=runs.SEED, default=0, help="Base seed; each image's seed is derived from it."
    )
    parser.add_argument(
        "--mixed_precision",
        default="fp16",
        choices=sorted(MIXED_PRECISION_DTYPES),
        help="Weights and activations dtype (paper: fp16; runs on the CPU too, slowly).",
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
    runs.group_flags(parser, HELP_GROUPS)
    return parser


def parse_args(argv: Sequence[str] | None = None) -> argparse.Namespace:
    """Parse and validate the command line (ValueError with the fix on bad input)."""
    args = build_parser().parse_args(argv)  # unset base / resolution: resolve_model_defaults
    args.backgrounds = resolve_backgrounds(args.backgrounds)
    validate_args(args)
    resolve_model_defaults(args)
    runs.check_base_model(args.pretrained_model_name_or_path)  # names a missing unet/ etc.
    return args


PAPER_BASE_MODEL = "stabilityai/stable-diffusion-2-1-base"


def recorded_bases(args: argparse.Namespace) -> dict[str, dict]:
    """identity -> the base model record in its LoRA's header, for the LoRAs of this run that
    have one (a missing folder, file or record is reported later, by lora_sources / check_lora)."""
    from lora import lora_base_model

    if args.lora_dir is not None:
        folders = [args.lora_dir]
    elif args.lora_root.is_dir():
        names = args.identities or [path.name for path in runs.identity_folders(args.lora_root)]
        folders = [args.lora_root / name for name in names]
    else:
        folders = []
    records = {}
    for folder in folders:
        weights = resolve_checkpoint(folder, args.checkpoint)
        lora_file = weights / LORA_WEIGHTS_NAME if weights is not None else None
        if lora_file is None or not lora_file.is_file():
            continue
        try:
            record = lora_base_model(lora_file)
        except Exception:  # an unreadable header fails its identity later, with the reason
            continue
        if record:
            records[folder.name] = record
    return records


def _grouped(values: dict[str, object]) -> str:
    """'A (ID_1, ID_2); B (ID_3)': identities grouped by their value, for one-line messages."""
    groups: dict[str, list[str]] = {}
    for name, value in values.items():
        groups.setdefault(str(value), []).append(name)
    return "; ".join(f"{value} ({runs.format_list(names)})" for value, names in groups.items())


def resolve_model_defaults(args: argparse.Namespace) -> None:
    """The base model and --resolution the user left unset, in one place. Base: the one every
    LoRA's header records (ValueError listing them when they disagree), else the paper's SD
    2.1-base. Resolution: the size every LoRA records it was trained at, else the base's native
    size (with a warning naming the disagreement when the LoRAs differ). args.defaults_from
    says where each came from (logged by main, kept in run_config.json)."""
    from lora import recorded_training_resolution

    records = recorded_bases(args)
    args.defaults_from = {}
    if args.pretrained_model_name_or_path is None:
        names = {identity: record.get("name") for identity, record in records.items()}
        distinct = {name for name in names.values() if name}
        if len(distinct) > 1:
            raise ValueError(
                f"the LoRAs record different base models: {_grouped(names)}; pass "
                "--pretrained_model_name_or_path, or generate each base's LoRAs separately"
            )
        args.pretrained_model_name_or_path = distinct.pop() if distinct else PAPER_BASE_MODEL
        args.defaults_from["pretrained_model_name_or_path"] = (
            "the LoRAs' headers" if names else "the paper's default (no LoRA records its base)"
        )
    if args.resolution is None:
        sizes = {identity: recorded_training_resolution(r) for identity, r in records.items()}
        distinct = set(sizes.values())
        if len(distinct) == 1 and None not in distinct:
            args.resolution = distinct.pop()
            args.defaults_from["resolution"] = "the LoRAs' training resolution"
            return
        # The base's native size, from its configs (architectures.py).
        args.resolution = architecture_or_paper(args.pretrained_model_name_or_path).resolution
        args.defaults_from["resolution"] = "the base model's native size"
        if len(distinct) > 1:
            shown = {k: f"{v} px" if v else "not recorded" for k, v in sizes.items()}
            logger.warning(
                "the LoRAs were trained at different resolutions: %s; generating at the base "
                "model's native %d px: pass --resolution to choose",
                _grouped(shown),
                args.resolution,
            )


def validate_args(args: argparse.Namespace) -> None:
    """Checks that need no model: numbers, templates, scheduler name, paths."""
    runs.check_numbers(args, build_parser())
    scheduler_class(args.scheduler)  # ValueError listing the options
    background_sampler(args.background_sampling)
    validate_template(args.prompt_template, "--prompt_template")
    validate_template(args.prompt_template_no_background, "--prompt_template_no_background")
    if "background" in template_placeholders(args.prompt_template_no_background):
        raise ValueError("--prompt_template_no_background must not contain {background}")
    if args.identities is not None and args.lora_root is None:
        raise ValueError("--identities selects folders under --lora_root; use it with --lora_root")
    for name in args.identities or []:
        runs.check_identity_name(name, "--identities")
    source = args.lora_root or args.lora_dir
    if runs.is_inside(args.output_dir, source) or runs.is_inside(source, args.output_dir):
        raise ValueError(
            f"--output_dir {args.output_dir} and the LoRA folder {source} overlap: generated "
            "images would be read as identities (or LoRAs as images); keep them apart"
        )
    if args.lora_dir is not None and runs.CHECKPOINT_PATTERN.match(args.lora_dir.name):
        raise ValueError(
            f"--lora_dir {args.lora_dir} is a checkpoint folder; pass the identity folder "
            f"as --lora_dir {args.lora_dir.parent} and --checkpoint {args.lora_dir.name}"
        )
    if args.identity_attributes is not None and not args.identity_attributes.is_file():
        raise FileNotFoundError(f"--identity_attributes file {args.identity_attributes} not found")
    if args.grid_dir is not None and runs.is_inside(args.grid_dir, args.output_dir):
        raise ValueError(
            f"--grid_dir {args.grid_dir} is inside --output_dir; contact sheets there would "
            "be read as an identity by image-folder loaders. Choose a folder outside it."
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
    # The coin is the first draw of random.Random(seed) in both modes.
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


Job = tuple[str, int]  # (identity, image index)


class Batches(Sequence):
    """Work units: consecutive runs of B jobs of the list [(x, i) for x in identities for i in
    range(n)], crossing identities (a batch mixes them: each sample has its own LoRA). Fixed
    by the settings alone, so a resumed run regenerates exactly the batches it did. Batch b is
    computed when asked for: nothing is planned up front, whatever the counts."""

    def __init__(self, identities: Sequence[str], num_images: int, batch_size: int) -> None:
        self.identities, self.num_images = list(identities), num_images
        self.batch_size, self.num_jobs = batch_size, len(self.identities) * num_images

    def __len__(self) -> int:
        return -(-self.num_jobs // self.batch_size)

    def __getitem__(self, index: Any) -> Any:
        if isinstance(index, slice):
            return [self[b] for b in range(len(self))[index]]
        if not -len(self) <= index < len(self):
            raise IndexError(f"batch {index} of {len(self)}")
        start = (index % len(self)) * self.batch_size
        stop, n = min(start + self.batch_size, self.num_jobs), self.num_images
        return tuple((self.identities[job // n], job % n) for job in range(start, stop))

    def job_position(self, identity_position: int, index: int) -> int:
        """Where (identities[identity_position], index) is in the job list."""
        return identity_position * self.num_images + index

    def most_identities(self) -> int:
        """The most distinct identities one batch holds (at least 1). Batch b starts at image
        (b * B) mod n of an identity, which repeats within n batches, all full but the last."""
        n, size = self.num_images, self.batch_size
        firsts = range(min(len(self), n // math.gcd(n, size)))
        spans = (
            (min((b + 1) * size, self.num_jobs) - 1) // n - (b * size) // n + 1 for b in firsts
        )
        return max(spans, default=1)


def make_batches(identities: Sequence[str], num_images: int, batch_size: int) -> Batches:
    return Batches(identities, num_images, batch_size)


def split_work(items: Sequence[Any], num_processes: int, process_index: int) -> Sequence[Any]:
    """Contiguous, balanced share of `items` for one process (sizes differ by at most 1); a
    slice of them (a range stays a range)."""
    base, extra = divmod(len(items), num_processes)
    start = process_index * base + min(process_index, extra)
    return items[start : start + base + (process_index < extra)]


# -------------------------------------------------------------------------- input checks


def resolve_checkpoint(identity_folder: Path, checkpoint: str | None) -> Path | None:
    """The folder holding the weights: the identity folder, a named or the latest checkpoint;
    None for 'latest' when the folder holds no checkpoint (the caller says so, naming it)."""
    if checkpoint is None:
        return identity_folder
    if checkpoint != "latest":
        return identity_folder / checkpoint
    steps = runs.list_checkpoints(identity_folder, None)
    return steps[-1][1] if steps else None


def lora_sources(args: argparse.Namespace) -> list[IdentitySource]:
    """Identity folders from --lora_dir / --lora_root with their weights files checked."""
    if args.lora_dir is not None:
        if not args.lora_dir.is_dir():
            raise FileNotFoundError(f"--lora_dir {args.lora_dir} is not a folder")
        folders = [args.lora_dir]
    else:
        if not args.lora_root.is_dir():
            raise FileNotFoundError(f"--lora_root {args.lora_root} is not a folder")
        names = list(dict.fromkeys(args.identities or [])) or [
            path.name for path in runs.identity_folders(args.lora_root)
        ]
        if not names:
            raise ValueError(f"--lora_root {args.lora_root} has no identity folders")
        folders = [args.lora_root / name for name in names]
    sources = [_identity_source(folder, args.checkpoint) for folder in folders]
    found = [source.lora_file for source in sources if source.lora_file is not None]
    hashes = runs.cached_sha256(found)  # what a rerun compares: the LoRA by content
    for source in sources:
        source.sha256 = hashes.get(source.lora_file)
    return sources


def _identity_source(folder: Path, checkpoint: str | None) -> IdentitySource:
    """Locate one identity's weights; a missing file becomes an error message."""
    weights_folder = resolve_checkpoint(folder, checkpoint)
    if weights_folder is None:  # 'latest' of a folder without checkpoint-N: no path to show
        error = (
            f"identity {folder.name!r}: no checkpoint in {folder} (--checkpoint latest); train "
            "it with checkpoints, or drop --checkpoint to use its final weights"
        )
        return IdentitySource(folder.name, folder, None, error)
    lora_file = weights_folder / LORA_WEIGHTS_NAME
    if lora_file.is_file():
        return IdentitySource(folder.name, folder, lora_file)
    where = f"checkpoint {checkpoint!r} of " if checkpoint else ""
    error = (
        f"identity {folder.name!r}: no LoRA weights at {lora_file} ({where}{folder}); expected "
        f"train_ID-Booth.py's {LORA_WEIGHTS_NAME}: train this identity or fix "
        "--lora_root/--lora_dir/--checkpoint"
    )
    return IdentitySource(folder.name, folder, None, error)


def resolve_genders(
    identities: Sequence[IdentitySource], attributes_file: Path | None
) -> dict[str, str]:
    """Each usable identity's gender (datasets.identity_genders); identities whose LoRA is
    missing are left out here: they fail on their own later."""
    usable = {identity.name: identity.folder for identity in identities if identity.error is None}
    return identity_genders(usable, attributes_file)


def generation_settings(args: argparse.Namespace) -> dict:
    """The settings that define the pixels (compared on resume; stored in run_config.json)."""
    values = {key: getattr(args, key, None) for key in GENERATION_KEYS}
    source = args.lora_dir if args.lora_dir is not None else args.lora_root
    values["lora_source"] = str(source.resolve())
    values["mixed_precision"] = args.resolved_mixed_precision
    if args.pretrained_vae_model_name_or_path is not None:  # absent from older run configs
        values["vae"] = args.pretrained_vae_model_name_or_path
    return values


def lora_files(
    identities: Sequence[IdentitySource], genders: dict[str, str] | None = None
) -> dict[str, dict[str, str]]:
    """identity -> {path: resolved LoRA weights path, sha256: its content hash, gender: the one
    its prompts use, when they use one}, for the usable identities (a refused identity keeps
    the entry of the LoRA that made its images)."""
    files = {
        i.name: {"path": str(i.lora_file.resolve()), "sha256": i.sha256}
        for i in identities
        if i.lora_file is not None and i.error is None
    }
    for name, entry in files.items():
        if genders and name in genders:  # an attributes file edited in place changes prompts
            entry["gender"] = genders[name]
    return files


def read_run_config(output_dir: Path) -> dict:
    """The previous run's run_config.json, or {} when there is none."""
    path = output_dir / RUN_CONFIG_NAME
    return json.loads(path.read_text()) if path.is_file() else {}


def check_run_config(
    output_dir: Path,
    settings: dict,
    identities: Sequence[IdentitySource],
    overwrite: bool,
    genders: dict[str, str] | None = None,
) -> set[str]:
    """A resumed run must use the settings and LoRA files that made the images there:
    ValueError for changed settings (they define every image); an identity whose images were
    made by another LoRA file (path, e.g. `--checkpoint latest` now resolving to a newer
    checkpoint, or content: retrained at the same path) is refused: its error is set and its
    name returned, the others go on. --overwrite regenerates everything instead."""
    previous_config = read_run_config(output_dir)
    if overwrite or not previous_config or not image_paths(output_dir):
        return set()  # nothing made with the old settings: a corrected command may change them
    previous = previous_config.get("generation", {})
    changed = runs.config_mismatches(previous, settings, ())
    if changed:
        raise ValueError(
            f"{output_dir} holds images made with other settings ({'; '.join(changed)}); use "
            "a new --output_dir, or --overwrite to regenerate them"
        )
    previous_files = previous_config.get("lora_files", {})
    refused = set()
    for identity in identities:
        current = lora_files([identity], genders).get(identity.name)
        made_by = previous_files.get(identity.name, current)
        if isinstance(made_by, str):  # recorded before LoRAs were hashed: path only
            made_by = {"path": made_by, "sha256": None}
        if current is not None and "gender" not in made_by:  # recorded before genders were
            current = {key: value for key, value in current.items() if key != "gender"}
        if current is None or made_by == current or not image_paths(output_dir, identity.name):
            continue
        differences = runs.config_mismatches(made_by, current, ())
        identity.error = (
            f"identity {identity.name!r}: its images in {output_dir / identity.name} were made "
            f"by another LoRA or gender ({'; '.join(differences)}); pass --overwrite to "
            "regenerate them, "
            "or use a new --output_dir"
        )
        refused.add(identity.name)
    return refused


# ------------------------------------------------------------------------- files on disk


def image_paths(output_dir: Path, identity: str | None = None) -> list[tuple[str, int, Path]]:
    """(identity, index, path) of every finished image under output_dir (of one identity if
    given), sorted."""
    found = []
    folders = [output_dir / identity] if identity is not None else output_dir.iterdir()
    for folder in sorted(p for p in folders if p.is_dir()):
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


def write_run_config(
    args: argparse.Namespace, settings: dict, identities, num_processes, genders=None
) -> None:
    """run_config.json: the generation settings, all arguments, identities and versions."""
    config = {
        "generation": settings,
        "args": runs.json_safe(vars(args)),
        "identities": [identity.name for identity in identities],
        # Every identity ever generated here, so a later run over any subset is checked.
        "lora_files": {
            **read_run_config(args.output_dir).get("lora_files", {}),
            **lora_files(identities, genders),
        },
        "num_processes": num_processes,
        "versions": runs.library_versions(),
    }
    text = json.dumps(config, indent=2, sort_keys=True, default=str) + "\n"
    atomic_write_bytes(args.output_dir / RUN_CONFIG_NAME, text.encode())


# ---------------------------------------------------------------------------- generation


def load_generation_pipeline(args: argparse.Namespace) -> StableDiffusionPipeline:
    """The base pipeline on CPU, frozen, with the chosen sampler and no progress bar."""
    from sampling import load_pipeline

    pipeline = load_pipeline(args.pretrained_model_name_or_path)
    pipeline.scheduler = build_sampler(args.scheduler, pipeline.scheduler.config)
    if args.pretrained_vae_model_name_or_path is not None:
        pipeline.vae = load_vae_beside_base(
            args.pretrained_vae_model_name_or_path, dict(pipeline.vae.config)
        )
    return pipeline


def make_sampler(pipeline: StableDiffusionPipeline, args: argparse.Namespace):
    """The sync-free sampling loop for this pipeline's scheduler, or None (stock pipeline)."""
    from sampling import Sampler, check_scheduler_config

    try:
        check_scheduler_config(type(pipeline.scheduler).__name__, pipeline.scheduler.config)
    except ValueError as reason:
        logger.info("sampling with the stock pipeline loop: %s", reason)
        return None
    return Sampler.from_pipeline(
        pipeline,
        num_inference_steps=args.num_inference_steps,
        guidance_scale=args.guidance_scale,
        height=args.resolution,
        width=args.resolution,
        compile=args.compile,
    )


def generate_batch(
    pipeline: StableDiffusionPipeline,
    jobs: Sequence[ImageJob],
    args: argparse.Namespace,
    lora: Any = None,
    slots: Sequence[int] | None = None,
    sampler: Any = None,
) -> tuple[list[PILImage.Image], list[bool], list[bool]]:
    """(images, NSFW flags, finite flags) of one batch, which may mix identities: sample i
    uses slot slots[i] of the batched LoRA `lora` (None: the base model) and its own CPU
    generator seeded with its seed, so its noise depends neither on its batch-mates nor on the
    device. The sync-free loop (sampling.Sampler) samples when it supports the scheduler, else
    the stock pipeline. An image whose latents or pixels hold NaN/inf is flagged not finite."""
    import torch

    from sampling import decode_checked, prompt_conditioning, warn_truncated_prompts

    sampler = sampler if sampler is not None else make_sampler(pipeline, args)
    guided = args.guidance_scale > 1
    if lora is not None:  # one host-to-device copy per batch; [negative; positive] under CFG
        identities = torch.tensor(list(slots) * (2 if guided else 1), device=pipeline.device)
        lora.set_identities(identities)
    prompts, negatives = [job.prompt for job in jobs], [args.negative_prompt] * len(jobs)
    with torch.no_grad():
        if sampler is None:  # the stock loop, up to its final latents
            warn_truncated_prompts(pipeline, negatives, "negative prompt")
            latents = pipeline(
                prompt=prompts,
                negative_prompt=negatives,
                generator=[torch.Generator("cpu").manual_seed(job.seed) for job in jobs],
                num_inference_steps=args.num_inference_steps,
                guidance_scale=args.guidance_scale,
                height=args.resolution,
                width=args.resolution,
                output_type="latent",
            ).images
        else:
            conditioning = prompt_conditioning(pipeline, prompts, negatives, guided)
            latents = sampler.sample(seeds=[job.seed for job in jobs], **conditioning)
        return decode_checked(pipeline, latents)  # the pipeline's decode, checked for NaN


def image_record(job: ImageJob, args: argparse.Namespace, source: IdentitySource, batch) -> dict:
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
        "lora_path": str(source.lora_file),
        "lora_sha256": source.sha256,
        "lora_scale": args.lora_scale,
        "model": args.pretrained_model_name_or_path,
        "mixed_precision": args.resolved_mixed_precision,
        "base_seed": args.seed,
        "batch": [list(member) for member in batch],  # (identity, index) of the batch's images
    }


@dataclasses.dataclass
class Counts:
    """Per-process tallies for the final summary."""

    written: int = 0
    skipped: int = 0
    failed: int = 0
    failed_identities: list[str] = dataclasses.field(default_factory=list)
    seconds: float = 0.0


@dataclasses.dataclass(frozen=True)
class SampleBatch:
    """What one sampler call makes: `rows` in their batch positions, of which `wanted` are
    written; `origin[job]` is the batch an uninterrupted run samples `job` in (its record)."""

    rows: tuple[Job, ...]
    wanted: tuple[Job, ...]
    origin: dict[Job, tuple[Job, ...]]


def run_batches(
    generator: dict,
    work: Sequence[SampleBatch],
    context: dict,
    progress: Any,
    writer: ImageWriter,
) -> None:
    """Sample this process's batches and hand the wanted images to the writer; jobs of failed
    identities are counted."""
    args, counts, errors = context["args"], context["counts"], context["lora_errors"]
    for batch in work:
        slots = place_identities(generator["pool"], [name for name, _ in batch.rows], errors)
        usable = [job for job in batch.rows if job[0] in slots]
        for name in dict.fromkeys(name for name, _ in batch.wanted if name not in slots):
            count = sum(job[0] == name for job in batch.wanted)
            # A batch without rows holds only identities refused before sampling: their images
            # were never in the bar's total; a LoRA failing to load here was.
            fail_identity(name, count, context, progress, in_total=bool(batch.rows))
        if not any(job in batch.wanted for job in usable):
            continue
        genders = context["genders"]
        jobs = [plan_image(args, name, genders.get(name), index) for name, index in usable]
        images, flagged, finite = generate_batch(
            generator["pipeline"],
            jobs,
            args,
            generator["lora"],
            [slots[job.identity] for job in jobs],
            generator["sampler"],
        )
        broken = non_finite_identities(jobs, finite, context)
        written: set[Job] = set()
        for job, image, nsfw in zip(jobs, images, flagged, strict=True):
            key = (job.identity, job.index)
            if key not in batch.wanted or key in written:  # a filler row, or its duplicate
                continue
            written.add(key)
            if job.identity in broken:
                fail_identity(job.identity, 1, context, progress, in_total=True)
                continue
            if nsfw:
                counts.failed += 1
                logger.error("%s flagged by the safety checker; not written", job)
            else:
                source = context["identities"][job.identity]
                origin = [member for member in batch.origin[key] if member[0] not in errors]
                record = image_record(job, args, source, origin)
                writer.submit(args.output_dir / job.identity / f"{job.index}.png", image, record)
                counts.written += 1
            progress.update(1)


def non_finite_identities(jobs: Sequence[ImageJob], finite: Sequence[bool], context: dict):
    """The identities of a batch with a non-finite sample: each fails from here on (its
    LoRA or the scales make NaN/inf, which would be written as black images), named once."""
    broken = {job.identity for job, ok in zip(jobs, finite, strict=True) if not ok}
    for name in sorted(broken):
        context["lora_errors"][name] = (
            f"identity {name!r}: non-finite latents or pixels (NaN/inf) in its batch; nothing "
            "of it is written from here on: its LoRA's weights or --lora_scale / "
            "--guidance_scale are too large"
        )
    return broken


def fail_identity(name: str, num_images: int, context: dict, progress: Any, in_total: bool) -> None:
    """Count an unusable identity's images of one batch under the summary's "failed" (never
    "skipped", which means already on disk); log it once. They do not advance the progress
    bar, which counts generated images: images that were `in_total` leave its total."""
    counts = context["counts"]
    if name not in counts.failed_identities:
        counts.failed_identities.append(name)
        logger.error(
            "%s; its images are not generated (counted as 'failed' in the summary)",
            context["lora_errors"][name],
        )
    counts.failed += num_images
    if in_total:
        progress.total -= num_images
        progress.refresh()


class _ImageNames:
    """'<index>.png' for the indices of one identity in [start, stop) (a range's membership
    test, for remove_stale_temps: no list of names is built)."""

    def __init__(self, start: int, stop: int) -> None:
        self.indices = range(start, stop)

    def __contains__(self, name: object) -> bool:
        match = IMAGE_NAME_PATTERN.match(str(name))
        return match is not None and int(match.group(1)) in self.indices


def my_identity_ranges(batches: Batches, mine: range) -> dict[str, range]:
    """identity -> the image indices this process's batches hold of it."""
    first = mine.start * batches.batch_size
    stop = min(mine.stop * batches.batch_size, batches.num_jobs)
    n, ranges = batches.num_images, {}
    for position in range(first // n, -(-stop // n)) if stop > first else ():
        low, high = max(first - position * n, 0), min(stop - position * n, n)
        ranges[batches.identities[position]] = range(low, high)
    return ranges


def images_on_disk(args: argparse.Namespace, ranges: dict[str, range], refused) -> set[Job]:
    """The jobs of `ranges` whose image is complete on disk (none with --overwrite; none of a
    refused identity: its images do not count as done). Lists each folder once: the cost is
    that of the files there, not of the images planned."""
    found: set[Job] = set()
    for name, indices in ranges.items():
        folder = args.output_dir / name
        if args.overwrite or name in refused or not folder.is_dir():
            continue
        for path in folder.iterdir():
            match = IMAGE_NAME_PATTERN.match(path.name)
            if match and int(match.group(1)) in indices and is_complete_png(path):
                found.add((name, int(match.group(1))))
    return found


def pending_work(
    batches: Batches, mine: range, on_disk: set[Job], counts: Counts
) -> Iterator[tuple[tuple[Job, ...], list[Job]]]:
    """(batch, its jobs without an image on disk) of this process's batches that miss one,
    computed batch by batch as generation reaches them; counts the jobs found done."""
    for index in mine:
        batch = batches[index]
        missing = [job for job in batch if job not in on_disk]
        counts.skipped += len(batch) - len(missing)
        if missing:
            yield batch, missing


def plan_process_work(
    args: argparse.Namespace, batches: Batches, mine: range, counts: Counts, refused=()
) -> tuple[Iterator[tuple[tuple[Job, ...], list[Job]]], int]:
    """(lazy work of this process, #images it will generate). Also deletes temp files that
    killed runs left for this process's own images (never another process's: the work split
    is disjoint)."""
    ranges = my_identity_ranges(batches, mine)
    for name, indices in ranges.items():
        remove_stale_temps(args.output_dir / name, _ImageNames(indices.start, indices.stop))
    on_disk = images_on_disk(args, ranges, refused)
    total = sum(len(indices) for indices in ranges.values()) - len(on_disk)
    return pending_work(batches, mine, on_disk, counts), total


def resample_batches(
    work: Sequence[tuple[tuple[Job, ...], list[Job]]], failing: Collection[str]
) -> list[SampleBatch]:
    """Batches of missing images only, each at the batch size and position it has in an
    uninterrupted run, so a resume samples about as many images as are missing.

    An image depends on its batch-mates only through the batch's shape (kernels sum in an
    order set by the shape; the rows' contents never mix: per-image noise, per-sample LoRA,
    attention and norms within a sample), so image j, sampled at row p of a batch of size s
    as in the uninterrupted run, comes out byte-identical whatever the other rows hold (tested).
    A batch's usable rows (identities whose LoRA is known to fail are dropped, as the full run
    drops them) fix (s, p); missing images of equal (s, p) go to successive batches, and a
    position no missing image fills repeats one of the batch's own jobs (not written).
    """
    columns: dict[int, list[list[tuple[Job, tuple[Job, ...]]]]] = {}
    for batch, missing in work:
        usable = tuple(job for job in batch if job[0] not in failing)
        by_position = columns.setdefault(len(usable), [[] for _ in usable])
        for position, job in enumerate(usable):
            if job in missing:
                by_position[position].append((job, usable))
    resampled = []
    for size, by_position in sorted(columns.items()):
        for row in range(max(map(len, by_position), default=0)):
            chosen = {p: column[row] for p, column in enumerate(by_position) if row < len(column)}
            filler = next(iter(chosen.values()))[0]
            rows = tuple(chosen[p][0] if p in chosen else filler for p in range(size))
            wanted = tuple(job for job, _ in chosen.values())
            resampled.append(SampleBatch(rows, wanted, dict(chosen.values())))
    failed = [  # identities known to fail: their missing jobs are counted, never sampled
        SampleBatch((), tuple(job for job in missing if job[0] in failing), {})
        for _, missing in work
        if any(job[0] in failing for job in missing)
    ]
    return failed + resampled


def prepare(args: argparse.Namespace, state: Any) -> dict:
    """Every check that needs no model, in the order a user would fix them."""
    identities = lora_sources(args)
    placeholders = template_placeholders(args.prompt_template) | template_placeholders(
        args.prompt_template_no_background
    )
    genders = {}
    if "gender" in placeholders:
        genders = resolve_genders(identities, args.identity_attributes)
    runs.check_writable_folder(args.output_dir, "--output_dir")
    settings = generation_settings(args)
    # The base by content: another model under the same folder or hub name is another setting.
    settings["base_model_sha256"] = runs.base_model_fingerprint(args.pretrained_model_name_or_path)
    refused = check_run_config(args.output_dir, settings, identities, args.overwrite, genders)
    for identity in identities:
        if identity.error and state.is_main_process:
            logger.error("%s", identity.error)
    return {"identities": identities, "genders": genders, "settings": settings, "refused": refused}


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
        logger.info("summary (images in %s): %s", args.output_dir, json.dumps(summary))
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
    """The base pipeline on the device and, per identity, its LoRA layout or why it fails.

    Identities whose weights are missing carry their error from lora_sources; the others have
    their LoRA header checked against the base model (on CPU, before the move).
    """
    import torch

    pipeline = load_generation_pipeline(args)
    architecture = architecture_of_pipeline(pipeline)
    layouts, lora_errors = {}, {}
    for identity in identities:
        if identity.error is not None:
            lora_errors[identity.name] = identity.error
            continue
        message, layout = check_lora(
            identity, pipeline, args.pretrained_model_name_or_path, architecture
        )
        if message is None:
            layouts[identity.name] = layout
        else:
            lora_errors[identity.name] = message
    dtype = getattr(torch, MIXED_PRECISION_DTYPES[args.resolved_mixed_precision])
    pipeline.to(state.device)
    if dtype != torch.float32:
        cast_pipeline(pipeline, dtype)
    if architecture.vae_force_upcast:  # SDXL's VAE overflows in fp16: decode_checked upcasts
        pipeline.vae.to(torch.float32)
    return pipeline, layouts, lora_errors


def cast_pipeline(pipeline: StableDiffusionPipeline, dtype: Any) -> None:
    """Cast the pipeline's models to `dtype`: torch's own Module.to for a model that keeps no
    module in fp32 (diffusers' to() warns about them on every cast, even when there are none),
    diffusers' own for a model that keeps some."""
    import torch

    for component in pipeline.components.values():
        if not isinstance(component, torch.nn.Module):
            continue
        if getattr(component, "_keep_in_fp32_modules", None):
            component.to(dtype=dtype)
        else:
            torch.nn.Module.to(component, dtype=dtype)


def slots_needed(work: Sequence[SampleBatch]) -> int:
    """The most distinct identities any one batch of `work` holds (at least 1)."""
    return max([1, *(len({name for name, _ in batch.rows}) for batch in work)])


def build_generator(
    args: argparse.Namespace,
    pipeline: Any,
    layouts: dict[str, LoraLayout],
    sources: dict[str, IdentitySource],
    num_slots: int,
) -> dict:
    """Pipeline, batched LoRA over the union of the identities' layers (rank: their largest),
    the slot pool that loads each identity's file on demand, and the sampler."""
    folders = {name: sources[name].lora_file.parent for name in layouts}

    def load(name: str) -> tuple[dict, dict]:
        scalings = {m: s * args.lora_scale for m, s in layouts[name].scalings.items()}
        return read_lora_file(folders[name]), scalings

    lora, pool = slot_pool_for_layouts(pipeline.unet, layouts, num_slots, load)
    return {
        "pipeline": pipeline,
        "lora": lora,
        "pool": pool,
        "sampler": make_sampler(pipeline, args),
    }


def main(args: argparse.Namespace) -> dict:
    """Validate inputs, load the base once, generate this process's share, summarise."""
    state = runs.process_state()
    runs.setup_logging(state)
    for flag, source in getattr(args, "defaults_from", {}).items():  # set in parse_args
        logger.info("--%s %s (from %s)", flag, getattr(args, flag), source)
    args.resolved_mixed_precision = runs.resolve_mixed_precision(
        args.mixed_precision, state.device.type
    )
    if args.batch_size is None:
        args.batch_size = DEFAULT_CUDA_BATCH_SIZE if state.device.type == "cuda" else 1
    plan = prepare(args, state)
    identities = plan["identities"]
    batches = make_batches(
        [identity.name for identity in identities], args.num_images_per_identity, args.batch_size
    )
    counts = Counts()
    mine = split_work(range(len(batches)), state.num_processes, state.process_index)
    work, _ = plan_process_work(args, batches, mine, counts, plan["refused"])
    pipeline, layouts, lora_errors = checked_pipeline(args, identities, state)
    work = resample_batches(list(work), failing=set(lora_errors))
    if state.is_main_process:  # only once the model loaded: a failed start blocks no rerun
        remove_stale_temps(args.output_dir)
        write_run_config(args, plan["settings"], identities, state.num_processes, plan["genders"])
    state.wait_for_everyone()
    sources = {identity.name: identity for identity in identities}
    generator = build_generator(args, pipeline, layouts, sources, slots_needed(work))
    context = {"args": args, "counts": counts, "genders": plan["genders"]}
    context.update(identities=sources, lora_errors=lora_errors)
    # Only images that will be sampled: a refused identity's are counted as failed instead.
    total = sum(len(batch.wanted) for batch in work if batch.rows)
    logger.info("%d images to generate here, %d already on disk", total, counts.skipped)
    started = time.perf_counter()
    writer = ImageWriter(args.png_workers, args.png_compress_level)
    progress_bar = runs.progress_bar(
        total=total, unit="img", desc="generating", disable=not state.is_local_main_process
    )
    try:
        with progress_bar as progress:
            run_batches(generator, work, context, progress, writer)
    finally:
        writer.close()  # every queued image lands (or the first write error is raised)
    counts.seconds = time.perf_counter() - started
    return finish(args, state, counts, identities)


if __name__ == "__main__":
    runs.run_cli(
        "inference_ID-Booth.py",
        parse_args,
        main,
        exit_code=lambda summary: int(summary["failed"] > 0),
    )
