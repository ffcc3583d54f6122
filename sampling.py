"""Sampling images from Stable Diffusion pipelines: what each generated image is (the paper's
prompts, backgrounds and per-image seeds) and the prior (class) images of DreamBooth.

Generated images: image i of identity x has the seed sha256("{seed}/{x}/{i}") (first 8 bytes,
big-endian, mod 2^63), its side-portrait coin is the first draw of random.Random(seed), and its
background comes from a seeded shuffle of the backgrounds per block of k = len(backgrounds)
indices (balanced) or from its own seed (independent): pure functions of the position, so any
image can be regenerated alone and adding images never changes earlier ones.

Class images are sampled once per class folder with the base model, `class_{i:05d}.png`, each
from its own seed (so the folder is the same however many processes made it and however often
the job was interrupted), written atomically and split across processes.
"""

from __future__ import annotations

import logging
import random
import string
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import torch

from datasets import scan_photos
from fileio import atomic_save_image, stable_seed

logger = logging.getLogger("sampling")

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
PROMPT_PLACEHOLDERS = ("background", "gender", "identity", "portrait")
PORTRAIT_WORDS = {False: "portrait", True: "side-portrait"}


# ============================================================================ generation plan


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
    return stable_seed(base_seed, identity, index)


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
    block_seed = stable_seed(base_seed, identity, "backgrounds", block)
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


# ============================================================================ pipelines


def dtype_keyword(dtype: torch.dtype) -> dict[str, torch.dtype]:
    """from_pretrained's dtype keyword: `dtype` where diffusers deprecated `torch_dtype`."""
    from diffusers.utils import deprecation_utils

    return {"dtype" if hasattr(deprecation_utils, "_resolve_dtype") else "torch_dtype": dtype}


def load_pipeline(
    model: str, device: Any = "cpu", dtype: torch.dtype | None = None, **hub: Any
) -> Any:
    """A StableDiffusionPipeline without safety checker or progress bar, weights frozen."""
    from diffusers import StableDiffusionPipeline

    pipeline = StableDiffusionPipeline.from_pretrained(
        model,
        **(dtype_keyword(dtype) if dtype is not None else {}),
        safety_checker=None,
        requires_safety_checker=False,
        **hub,
    )
    # Frozen weights: on CPU, linear kernels differ at float level with requires_grad, and
    # a LoRA load freezes the base, so freezing up front keeps every identity on one path.
    for component in pipeline.components.values():
        if hasattr(component, "requires_grad_"):
            component.requires_grad_(False)
    pipeline.set_progress_bar_config(disable=True)
    return pipeline.to(device)


@torch.no_grad()
def sample_one_by_one(
    pipeline: Any, seeds: list[int], paths: list[Path], context: Any, **call: Any
) -> list[Any]:
    """One image per seed (a generator on the pipeline's device), each saved atomically to its
    path; `context()` wraps every call (e.g. autocast); `call` goes to the pipeline."""
    images = []
    for seed, path in zip(seeds, paths, strict=True):
        generator = torch.Generator(pipeline.device).manual_seed(seed)
        with context():
            images.append(pipeline(generator=generator, **call).images[0])
        path.parent.mkdir(parents=True, exist_ok=True)
        atomic_save_image(images[-1], path)
    return images


def class_image_plan(class_dir: Path, wanted: int) -> list[int]:
    """Indices i of class_{i:05d}.png to generate so the folder holds `wanted` usable images.

    Unreadable or too-small files do not count; one named class_{i:05d}.png is regenerated.
    """
    try:
        usable = scan_photos(class_dir).photos
    except (ValueError, FileNotFoundError):  # no usable image yet, or no folder yet
        usable = []
    existing = {path.name for path in usable}
    missing, indices, index = wanted - len(existing), [], 0
    while len(indices) < missing:
        if f"class_{index:05d}.png" not in existing:
            indices.append(index)
        index += 1
    return indices


def generate_class_images(
    load_pipeline: Any,
    class_dir: Path,
    wanted: int,
    prompt: str,
    seed_of: Any,
    state: Any,
    batch_size: int,
    **sampling: Any,
) -> list[Path]:
    """Sample the missing class images, split across processes; returns this process's files.

    `load_pipeline()` gives the base pipeline on this process's device (called only when this
    process has images to make); `seed_of(i)` is image i's seed; `sampling` goes to the
    pipeline call (height, width, num_inference_steps). Every process waits until all are
    written.
    """
    class_dir.mkdir(parents=True, exist_ok=True)
    plan = class_image_plan(class_dir, wanted)
    state.wait_for_everyone()  # nobody writes before every process has planned
    mine = plan[state.process_index :: state.num_processes]
    written: list[Path] = []
    if mine:
        logger.info(
            "sampling %d of %d missing class images into %s", len(mine), len(plan), class_dir
        )
        pipeline = load_pipeline()
        for start in range(0, len(mine), batch_size):
            indices = mine[start : start + batch_size]
            generators = [
                torch.Generator(pipeline.device).manual_seed(seed_of(index)) for index in indices
            ]
            images = pipeline([prompt] * len(indices), generator=generators, **sampling).images
            for index, image in zip(indices, images, strict=True):
                written.append(class_dir / f"class_{index:05d}.png")
                atomic_save_image(image, written[-1])
        del pipeline
        if state.device.type == "cuda":
            torch.cuda.empty_cache()
    state.wait_for_everyone()
    return written
