"""Which Stable Diffusion a base model is, read from its own configs, and what follows from it.

The paper trains on SD 2.1-base (512 px, epsilon prediction). The same method runs on the other
bases researchers start from: SD 1.x (512 px, Arc2Face's base), SD 2.x at 768 px with
v-prediction, and SDXL (1024 px, two text encoders, pooled text embeddings and size/crop time
ids). Nothing here is a flag: a base model says what it is through its files.

- family: the UNet config. `addition_embed_type: "text_time"` is SDXL's added conditioning;
  otherwise SD 2.x's transformer blocks use linear projections (`use_linear_projection`) and
  SD 1.x's use 1x1 convolutions.
- prediction type: the scheduler config (`epsilon` or `v_prediction`).
- native resolution: UNet `sample_size` x the VAE's scale factor (2 ** (len(blocks) - 1)):
  512, 768, 1024 for the real models, 64 for the tests' tiny ones.
- VAE overflow in fp16: SDXL's VAE config says `force_upcast: true` (its stock pipeline decodes
  in fp32); an fp16-safe SDXL VAE (e.g. madebyollin/sdxl-vae-fp16-fix) says false.

`FAMILY_DEFAULTS` holds what the stock pipeline of each family does by default (guidance) and
the paper's settings that carry over unchanged (LoRA rank 4 on the attention projections,
learning rate, steps, triplet margin, timestep weighting: no entry here, the flags' defaults).
"""

from __future__ import annotations

import json
import logging
from dataclasses import dataclass
from pathlib import Path
from typing import Any

logger = logging.getLogger("architectures")

SD1, SD2, SDXL = "sd1", "sd2", "sdxl"
# family -> the stock diffusers pipeline that loads such a base and its LoRA files.
PIPELINE_CLASSES = {
    SD1: "StableDiffusionPipeline",
    SD2: "StableDiffusionPipeline",
    SDXL: "StableDiffusionXLPipeline",
}
FAMILY_NAMES = {SD1: "SD 1.x", SD2: "SD 2.x", SDXL: "SDXL"}
# Per-family defaults of flags left unset (a flag the user sets always wins). Guidance: what the
# family's stock pipeline uses when none is given (StableDiffusionPipeline 7.5, the SDXL
# pipeline 5.0); class images are sampled with it, as diffusers' DreamBooth scripts do.
FAMILY_DEFAULTS: dict[str, dict[str, Any]] = {
    SD1: {"guidance_scale": 7.5},
    SD2: {"guidance_scale": 7.5},
    SDXL: {"guidance_scale": 5.0},
}
# The paper's base: the defaults when a hub model's configs cannot be read (offline, not cached;
# it could not be loaded either, so nothing trains on the wrong assumption).
PAPER_BASE = "stabilityai/stable-diffusion-2-1-base"


@dataclass(frozen=True)
class Architecture:
    """What a base model is: its family, prediction type, native resolution, VAE fp16 safety."""

    family: str  # SD1 | SD2 | SDXL
    prediction_type: str  # "epsilon" | "v_prediction" | "sample"
    resolution: int  # native image size in pixels
    vae_force_upcast: bool = False  # the VAE overflows in fp16 (SDXL's): decode it in fp32

    @property
    def pipeline_class(self) -> str:
        return PIPELINE_CLASSES[self.family]

    @property
    def is_sdxl(self) -> bool:
        return self.family == SDXL

    def default(self, name: str) -> Any:
        return FAMILY_DEFAULTS[self.family][name]

    def describe(self) -> str:
        """e.g. 'SDXL (epsilon, 1024 px)'."""
        return f"{FAMILY_NAMES[self.family]} ({self.prediction_type}, {self.resolution} px)"

    def to_json(self) -> dict[str, Any]:
        return {
            "family": self.family,
            "prediction_type": self.prediction_type,
            "resolution": self.resolution,
            "pipeline_class": self.pipeline_class,
            "vae_force_upcast": self.vae_force_upcast,
        }


PAPER_ARCHITECTURE = Architecture(SD2, "epsilon", 512)


def family_of_unet(unet_config: dict[str, Any]) -> str:
    """SDXL, SD2 or SD1 from a UNet2DConditionModel config (see the module docstring)."""
    if unet_config.get("addition_embed_type") == "text_time":
        return SDXL
    return SD2 if unet_config.get("use_linear_projection") else SD1


def architecture_from_configs(
    unet: dict[str, Any], scheduler: dict[str, Any], vae: dict[str, Any]
) -> Architecture:
    """The Architecture described by a pipeline's unet, scheduler and vae configs."""
    family = family_of_unet(unet)
    scale_factor = 2 ** (len(vae.get("block_out_channels", (0,) * 4)) - 1)
    return Architecture(
        family=family,
        prediction_type=scheduler.get("prediction_type", "epsilon"),
        resolution=int(unet.get("sample_size", 64)) * scale_factor,
        vae_force_upcast=family == SDXL and bool(vae.get("force_upcast", True)),
    )


def read_config(base: str, subfolder: str, filename: str, revision: str | None = None) -> dict:
    """A component's JSON config from a local pipeline folder or the hub (its cache offline)."""
    folder = Path(base).expanduser()
    if folder.is_dir():
        return json.loads((folder / subfolder / filename).read_text())
    from huggingface_hub import hf_hub_download

    path = hf_hub_download(base, filename, subfolder=subfolder, revision=revision)
    return json.loads(Path(path).read_text())


def detect_architecture(base: str, revision: str | None = None) -> Architecture | None:
    """The base model's Architecture from its configs; None when they cannot be read (a hub id
    offline and not cached: the model cannot be loaded either)."""
    try:
        return architecture_from_configs(
            read_config(base, "unet", "config.json", revision),
            read_config(base, "scheduler", "scheduler_config.json", revision),
            read_config(base, "vae", "config.json", revision),
        )
    except (OSError, ValueError) as error:
        logger.info("cannot read the configs of %s (%s)", base, type(error).__name__)
        return None


def architecture_or_paper(base: str, revision: str | None = None) -> Architecture:
    """detect_architecture, or the paper's SD 2.1-base when the configs are unreadable."""
    found = detect_architecture(base, revision)
    if found is None:
        logger.info("using the paper's SD 2.1-base defaults for %s", base)
        return PAPER_ARCHITECTURE
    return found


# What makes two VAEs interchangeable: the latent space the UNet was trained in.
VAE_LATENT_KEYS = ("latent_channels", "scaling_factor")


def check_vae_fits(vae_config: dict[str, Any], base_config: dict[str, Any], source: str) -> None:
    """ValueError when a VAE given beside the base (--pretrained_vae_model_name_or_path) does
    not share its latent space: another channel count or scaling factor (an SD 1.x/2.x VAE,
    0.18215, beside SDXL, 0.13025) would make every latent wrong without any error."""
    for key in VAE_LATENT_KEYS:
        if vae_config.get(key) != base_config.get(key):
            raise ValueError(
                f"--pretrained_vae_model_name_or_path {source}: its {key} is "
                f"{vae_config.get(key)!r}, the base's VAE has {base_config.get(key)!r}; it "
                "encodes another latent space: pass a VAE made for this base (an fp16-safe SDXL "
                "VAE for SDXL)"
            )


def load_vae_beside_base(source: str, base_config: dict[str, Any] | None) -> Any:
    """The AutoencoderKL at `source` (a VAE folder or hub id), frozen, checked against the
    base's VAE config when it is known."""
    from diffusers import AutoencoderKL

    from runs import loading

    with loading("the VAE", source):
        vae = AutoencoderKL.from_pretrained(source)
    if base_config is not None:
        check_vae_fits(dict(vae.config), base_config, source)
    return vae.requires_grad_(False).eval()


def base_vae_config(base: str, revision: str | None = None) -> dict[str, Any] | None:
    """The base's VAE config, or None when it cannot be read (loading the base fails then)."""
    try:
        return read_config(base, "vae", "config.json", revision)
    except (OSError, ValueError):
        return None


def architecture_of_pipeline(pipeline: Any) -> Architecture:
    """The Architecture of a loaded pipeline (its components' configs)."""
    return architecture_from_configs(
        dict(pipeline.unet.config), dict(pipeline.scheduler.config), dict(pipeline.vae.config)
    )
