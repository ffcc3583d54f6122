"""lora.py: a LoRA file's adapter metadata is checked field by field before it is applied."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from safetensors import safe_open
from safetensors.torch import save_file

from lora import MAX_LORA_ALPHA, IdentitySource, check_lora, lora_layout


def lora_file(folder: Path, metadata_text: str | None) -> Path:
    """A rank-4 UNet LoRA file of one layer whose adapter metadata is `metadata_text`."""
    folder.mkdir(parents=True, exist_ok=True)
    path = folder / "pytorch_lora_weights.safetensors"
    tensors = {
        "unet.block.to_q.lora.down.weight": torch.zeros(4, 8),
        "unet.block.to_q.lora.up.weight": torch.zeros(8, 4),
    }
    metadata = {} if metadata_text is None else {"lora_adapter_metadata": metadata_text}
    save_file(tensors, str(path), metadata={"format": "pt", **metadata})
    return path


def unet_metadata(**fields) -> str:
    return json.dumps({f"unet.{key}": value for key, value in fields.items()})


def test_well_formed_metadata_gives_the_scaling(tmp_path):
    layout = lora_layout(lora_file(tmp_path / "a", unet_metadata(lora_alpha=8, r=4)))
    assert layout.scalings == {"block.to_q": 2.0}
    assert lora_layout(lora_file(tmp_path / "b", None)).scalings == {"block.to_q": 1.0}
    with safe_open(str(lora_file(tmp_path / "c", "{}")), framework="pt") as handle:
        assert handle.metadata()["lora_adapter_metadata"] == "{}"


@pytest.mark.parametrize(
    "text, words",
    [
        (unet_metadata(lora_alpha="4"), "lora_alpha must be a number"),
        (unet_metadata(lora_alpha=True), "lora_alpha must be a number"),
        (unet_metadata(lora_alpha=0), "lora_alpha must be a number in (0,"),
        (unet_metadata(lora_alpha=-4), "lora_alpha must be a number in (0,"),
        ('{"unet.lora_alpha": NaN}', "lora_alpha must be a number"),
        ('{"unet.lora_alpha": Infinity}', "lora_alpha must be a number"),
        (unet_metadata(lora_alpha=1e308), "lora_alpha must be a number"),
        (unet_metadata(lora_alpha=MAX_LORA_ALPHA * 2), "lora_alpha"),
        (unet_metadata(r=0), "field r must be an integer"),
        (unet_metadata(r="4"), "field r must be an integer"),
        (unet_metadata(use_rslora="yes"), "use_rslora must be true or false"),
        (unet_metadata(use_dora=1), "use_dora must be true or false"),
        (unet_metadata(alpha_pattern=[1]), "alpha_pattern must be an object"),
        (unet_metadata(rank_pattern="x"), "rank_pattern must be an object"),
        ('["unet.lora_alpha", 4]', "metadata is a JSON list, not an object"),
        ("4", "metadata is a JSON int"),
        ("{not json", "metadata is not JSON"),
    ],
)
def test_malformed_metadata_fails_its_identity_with_one_line(tmp_path, text, words):
    path = lora_file(tmp_path / "ID_x", text)
    with pytest.raises(ValueError) as error:
        lora_layout(path)
    assert words in str(error.value)
    identity = IdentitySource("ID_x", path.parent, path)
    unet = torch.nn.ModuleDict({"block": torch.nn.ModuleDict({"to_q": torch.nn.Linear(8, 8)})})
    pipeline = type("Pipeline", (), {"unet": unet, "text_encoder": None})()
    message, layout = check_lora(identity, pipeline, "base")
    assert layout is None and words in message and "ID_x" in message and "\n" not in message
