"""What each generated image is, after the paper's generation setup: its prompt, background,
side-portrait coin and seed.

Image i of identity x has the seed sha256("{seed}/{x}/{i}") (fileio.stable_seed), its
side-portrait coin is the first draw of random.Random(seed), and its background comes from a
seeded shuffle of the backgrounds per block of k = len(backgrounds) indices (balanced) or from
its own seed (independent): pure functions of the position, so any image can be regenerated
alone and adding images never changes earlier ones. Prompt: "face {portrait} photo of {gender}
sks person, {background} background" with the paper's eleven backgrounds ("none" drops the
background clause); `resolve_backgrounds` reads --backgrounds (a list, or a file of lines).
"""

from __future__ import annotations

import random
import string
from collections.abc import Callable, Sequence
from pathlib import Path

from fileio import stable_seed

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
