"""LoRA adapters of the UNet in diffusers' file format: create, save, load, check.

A trained identity is one `pytorch_lora_weights.safetensors` that
`StableDiffusionPipeline.load_lora_weights(folder)` reads. Files are written atomically and
with a canonical safetensors header, so equal weights give equal bytes (safetensors writes
its metadata in the random order of a Rust hash map otherwise). Before generation,
`check_lora` tells from the header alone whether an identity's file fits the base model and
what layout it has, or why it cannot be used.
"""

from __future__ import annotations

import dataclasses
import json
import math
import re
import struct
import tempfile
from pathlib import Path
from typing import Any

import torch

from fileio import atomic_write_bytes, atomic_write_text, publish

LORA_WEIGHTS_NAME = "pytorch_lora_weights.safetensors"
BASE_MODEL_METADATA_KEY = "id_booth_base_model"  # JSON: name + architecture the LoRA was made for
LORA_TARGET_MODULES = ("to_k", "to_q", "to_v", "to_out.0", "add_k_proj", "add_v_proj")
# Suffixes of the LoRA matrices in the naming schemes diffusers writes -> down (A) / up (B).
_LORA_SUFFIXES = {
    ".lora.down.weight": "down",
    ".lora.up.weight": "up",
    ".lora_A.weight": "down",
    ".lora_B.weight": "up",
    ".lora_linear_layer.down.weight": "down",
    ".lora_linear_layer.up.weight": "up",
}
# lora_alpha a file may give: > 0 (0 would silently apply nothing: the base model) and at most
# MAX_LORA_ALPHA (peft's default is 8 and published LoRAs use 1..256; the scaling alpha / r of
# anything near 1e308 only turns images black).
MAX_LORA_ALPHA = 1e4
# Adapter metadata fields this code reads, each with its check (other fields are ignored).
_METADATA_FIELDS = {
    "lora_alpha": (
        lambda v: _is_number(v) and 0 < v <= MAX_LORA_ALPHA,
        f"a number in (0, {MAX_LORA_ALPHA:g}]",
    ),
    "r": (lambda v: isinstance(v, int) and not isinstance(v, bool) and v > 0, "an integer >= 1"),
    "use_rslora": (lambda v: isinstance(v, bool), "true or false"),
    "use_dora": (lambda v: isinstance(v, bool), "true or false"),
    "alpha_pattern": (lambda v: v is None or isinstance(v, dict), "an object"),
    "rank_pattern": (lambda v: v is None or isinstance(v, dict), "an object"),
}


def _is_number(value: Any) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)


def lora_target_modules(unet: torch.nn.Module) -> list[str]:
    """LORA_TARGET_MODULES that exist in this UNet (add_k/v_proj only in added-KV attention)."""
    names = [name for name, _ in unet.named_modules()]
    return [
        target
        for target in LORA_TARGET_MODULES
        if any(name == target or name.endswith("." + target) for name in names)
    ]


def canonical_safetensors(path: Path, extra_metadata: dict[str, str] | None = None) -> None:
    """Rewrite a safetensors file's JSON header with sorted keys (same tensors, same offsets),
    adding `extra_metadata` to its string metadata."""
    data = path.read_bytes()
    (length,) = struct.unpack("<Q", data[:8])
    header = json.loads(data[8 : 8 + length])
    if extra_metadata:
        header["__metadata__"] = {**header.get("__metadata__", {}), **extra_metadata}
    text = json.dumps(header, sort_keys=True, separators=(",", ":")).encode()
    text += b" " * (-len(text) % 8)  # safetensors pads the header to 8 bytes with spaces
    atomic_write_bytes(path, struct.pack("<Q", len(text)) + text + data[8 + length :])


def write_lora_file(
    folder: Path,
    unet_lora_layers: dict[str, torch.Tensor],
    adapter_config: dict[str, Any],
    base_model: dict[str, Any] | None = None,
) -> Path:
    """folder/pytorch_lora_weights.safetensors, atomically, in diffusers' format (keys without
    the 'unet.' prefix in, with it on disk; the adapter's LoraConfig as metadata, so alpha !=
    rank loads with its scale); `StableDiffusionPipeline.load_lora_weights(folder)` reads it,
    and `StableDiffusionXLPipeline.load_lora_weights` for an SDXL UNet's (the same UNet keys).
    `base_model` (name and architecture, `base_model_record`) goes into the header metadata
    under BASE_MODEL_METADATA_KEY, so generation can refuse a LoRA made for another base."""
    from diffusers import StableDiffusionPipeline

    metadata = {
        k: sorted(v) if isinstance(v, (set, frozenset)) else v for k, v in adapter_config.items()
    }
    folder.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(dir=folder, prefix=".lora-") as temp_dir:
        StableDiffusionPipeline.save_lora_weights(
            temp_dir,
            unet_lora_layers=unet_lora_layers,
            unet_lora_adapter_metadata=metadata,
            safe_serialization=True,
        )
        extra = {BASE_MODEL_METADATA_KEY: json.dumps(base_model, sort_keys=True)}
        canonical_safetensors(Path(temp_dir) / LORA_WEIGHTS_NAME, extra if base_model else None)
        publish(Path(temp_dir) / LORA_WEIGHTS_NAME, folder / LORA_WEIGHTS_NAME)
    return folder / LORA_WEIGHTS_NAME


def read_lora_file(folder: Path) -> dict[str, torch.Tensor]:
    """The UNet part of a LoRA file in diffusers' format, keys without the 'unet.' prefix."""
    from diffusers import StableDiffusionPipeline

    state, _ = StableDiffusionPipeline.lora_state_dict(str(folder))
    return {key[len("unet.") :]: value for key, value in state.items() if key.startswith("unet.")}


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


def adapter_metadata(metadata: dict[str, str]) -> dict[str, Any]:
    """The UNet adapter config of a LoRA file's safetensors metadata (keys without 'unet.'),
    each field this code reads checked for type and range: ValueError naming the field, so a
    malformed file fails its own identity with one line."""
    text = metadata.get("lora_adapter_metadata", "{}")
    try:
        config = json.loads(text)  # NaN / Infinity parse as floats: refused below
    except ValueError as error:
        raise ValueError(f"its adapter metadata is not JSON ({error})") from error
    if not isinstance(config, dict):
        raise ValueError(f"its adapter metadata is a JSON {type(config).__name__}, not an object")
    config = {k[len("unet.") :]: v for k, v in config.items() if k.startswith("unet.")}
    for field, (is_valid, expected) in _METADATA_FIELDS.items():
        if field in config and not is_valid(config[field]):
            raise ValueError(
                f"adapter metadata field {field} must be {expected}, got {config[field]!r}"
            )
    return config


@dataclasses.dataclass(frozen=True)
class LoraLayout:
    """What a UNet LoRA file holds, from its header: each layer's rank and peft scaling."""

    ranks: dict[str, int]  # UNet module path -> r
    scalings: dict[str, float]  # UNet module path -> lora_alpha / r (or / sqrt(r), rsLoRA)


def lora_layout(lora_file: Path) -> LoraLayout:
    """The layers, ranks and scalings of a diffusers-format UNet LoRA file (header only).

    The scaling is what diffusers' `load_lora_weights` gives each layer: the adapter
    metadata's lora_alpha over the layer's rank (alpha = r without metadata). ValueError for
    what a plain batched LoRA cannot apply: text-encoder layers, other key formats, DoRA,
    per-layer alpha patterns, mixed ranks without metadata.
    """
    from safetensors import safe_open

    with safe_open(str(lora_file), framework="pt") as handle:
        shapes = {key: tuple(handle.get_slice(key).get_shape()) for key in handle.keys()}  # noqa: SIM118
        metadata = handle.metadata() or {}
    config = adapter_metadata(metadata)
    if config.get("use_dora") or config.get("alpha_pattern"):
        raise ValueError("DoRA and per-layer alpha_pattern adapters are not supported")
    ranks: dict[str, int] = {}
    for key, shape in shapes.items():
        match = re.fullmatch(r"unet\.(.+)\.lora\.(down|up)\.weight", key)
        if match is None:
            raise ValueError(
                f"key {key!r} is not a diffusers-format UNet LoRA matrix (unet.<layer>"
                ".lora.down/up.weight); text-encoder and other formats are not supported"
            )
        if len(shape) != 2:
            raise ValueError(f"key {key!r} has shape {shape}: only linear-layer LoRAs apply")
        module, kind = match.groups()
        rank = shape[0] if kind == "down" else shape[1]
        if ranks.setdefault(module, rank) != rank:
            raise ValueError(f"layer {module}: down and up matrices disagree on the rank")
    if not ranks:
        raise ValueError("the file holds no UNet LoRA matrices")
    if "lora_alpha" not in config and len(set(ranks.values())) > 1:
        raise ValueError("layers of different ranks and no adapter metadata giving lora_alpha")
    scalings = {}
    for module, rank in ranks.items():
        alpha = config.get("lora_alpha", rank)
        scalings[module] = alpha / (math.sqrt(rank) if config.get("use_rslora") else rank)
    return LoraLayout(ranks, scalings)


@dataclasses.dataclass
class IdentitySource:
    """An identity's LoRA weights file, or why it cannot be used."""

    name: str
    folder: Path
    lora_file: Path | None
    error: str | None = None
    sha256: str | None = None  # of the weights file: a rerun compares the LoRA by content


def base_model_record(
    name: str, architecture: Any, training_resolution: int | None = None
) -> dict[str, Any]:
    """What BASE_MODEL_METADATA_KEY holds: the base model's name, its architecture
    ("resolution" is the base's native size) and, when given, the image size the LoRA was
    trained at ("training_resolution"; generation defaults to it)."""
    record = {"name": str(name), **architecture.to_json()}
    if training_resolution is not None:
        record["training_resolution"] = int(training_resolution)
    return record


def recorded_training_resolution(record: dict[str, Any] | None) -> int | None:
    """The size a LoRA was trained at, from its base model record (None: not recorded)."""
    value = (record or {}).get("training_resolution")
    return value if isinstance(value, int) and not isinstance(value, bool) else None


def lora_base_model(lora_file: Path) -> dict[str, Any] | None:
    """The base model record a LoRA file was written with (None: written without one)."""
    from safetensors import safe_open

    with safe_open(str(lora_file), framework="pt") as handle:
        text = (handle.metadata() or {}).get(BASE_MODEL_METADATA_KEY)
    return json.loads(text) if text else None


def architecture_mismatch(lora_file: Path, architecture: Any, model_name: str) -> str | None:
    """Why a LoRA made for another architecture family (SD 1.x / SD 2.x / SDXL) cannot be
    used on this base, or None (same family, or a file that does not say)."""
    made_for = lora_base_model(lora_file)
    if made_for is None or made_for.get("family") == architecture.family:
        return None
    from architectures import FAMILY_NAMES

    family = FAMILY_NAMES.get(made_for.get("family"), made_for.get("family"))
    return (
        f"was trained for {family} ({made_for.get('name')}), the base model {model_name} is "
        f"{FAMILY_NAMES[architecture.family]}: pass that --pretrained_model_name_or_path or retrain"
    )


def check_lora(
    identity: IdentitySource, pipeline: Any, model_name: str, architecture: Any = None
) -> tuple[str | None, LoraLayout | None]:
    """(error message, None) if the identity's LoRA is unreadable, made for another base (its
    recorded architecture family, or layer shapes) or not a plain UNet LoRA; else (None, its
    layout). Reads the file's header only."""
    components = {"unet": pipeline.unet, "text_encoder": pipeline.text_encoder}
    where = f"identity {identity.name!r}: LoRA {identity.lora_file}"
    try:
        wrong_family = (
            architecture_mismatch(identity.lora_file, architecture, model_name)
            if architecture is not None
            else None
        )
        checked, problems = lora_mismatches(identity.lora_file, components)
    except Exception as error:  # safetensors raises its own types for corrupt headers
        return f"identity {identity.name!r}: cannot read LoRA {identity.lora_file}: {error}", None
    if wrong_family:
        return f"{where} {wrong_family}", None
    if problems:
        shown = "; ".join(problems[:3])
        return (
            f"{where} does not fit the base model {model_name} ({len(problems)} of {checked} "
            f"tensors mismatch, e.g. {shown}); it was trained on a different base: pass that "
            "--pretrained_model_name_or_path or retrain"
        ), None
    try:
        return None, lora_layout(identity.lora_file)
    except ValueError as error:
        return f"{where} cannot be applied: {error}", None


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

Base architecture: {architecture}; load it with `{pipeline_class}`. Trained at
{training_resolution} x {training_resolution} px: generate at that size
(`inference_ID-Booth.py` does by default).

```python
from diffusers import {pipeline_class}

pipe = {pipeline_class}.from_pretrained("{base}")
pipe.load_lora_weights("path/to/this/folder")
image = pipe("face portrait photo of sks person, forest background").images[0]
```

Validation prompt: `{validation_prompt}`

{images}

Training arguments, resolved settings and library versions: `training_config.json`.
"""


def write_model_card(folder: Path, validation_images: list[Path], **given: Any) -> None:
    """folder/README.md: what the LoRA is and how to load it (MODEL_CARD filled with the given
    fields; the paper's SD 2.1-base architecture and pipeline unless given)."""
    images = "\n".join(f"![{p.stem}](validation/{p.name})" for p in validation_images)
    fields = {
        "architecture": "SD 2.x (epsilon, 512 px)",
        "pipeline_class": "StableDiffusionPipeline",
        "training_resolution": 512,
    }
    fields |= given
    atomic_write_text(folder / "README.md", MODEL_CARD.format(images=images or "(none)", **fields))
