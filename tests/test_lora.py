"""lora.py: the diffusers LoRA file (written as peft + diffusers write it, read back, header
sorted), its layout and fit to a base model, target modules, the model card, and the adapter
metadata checked field by field before it is applied."""

from __future__ import annotations

import json
import struct
from pathlib import Path

import pytest
import torch
from diffusers import UNet2DConditionModel
from safetensors import safe_open
from safetensors.torch import load_file, save_file
from tiny_sd import build_tiny_sd

import lora
from lora import MAX_LORA_ALPHA, IdentitySource, check_lora, lora_layout
from random_models import write_random_lora


@pytest.fixture(scope="module")
def unet(tmp_path_factory) -> UNet2DConditionModel:
    folder = build_tiny_sd(tmp_path_factory.mktemp("tiny") / "sd")
    return UNet2DConditionModel.from_pretrained(folder, subfolder="unet")


def _header(path) -> dict:
    data = path.read_bytes()
    (length,) = struct.unpack("<Q", data[:8])
    return json.loads(data[8 : 8 + length])


def test_target_modules_are_the_attention_projections_the_unet_has(unet):
    assert lora.lora_target_modules(unet) == ["to_k", "to_q", "to_v", "to_out.0"]


def test_written_file_reads_back_with_its_rank_and_alpha_scale(unet, tmp_path):
    path = write_random_lora(tmp_path / "a", unet, rank=2, alpha=8, seed=3)
    assert path == tmp_path / "a" / lora.LORA_WEIGHTS_NAME
    state = lora.read_lora_file(tmp_path / "a")
    on_disk = load_file(str(path))
    assert {f"unet.{key}" for key in state} == set(on_disk)
    for key, value in state.items():
        assert torch.equal(value, on_disk[f"unet.{key}"])
    layout = lora.lora_layout(path)
    assert set(layout.ranks.values()) == {2}
    assert set(layout.scalings.values()) == {4.0}  # alpha / r, as diffusers loads it
    keys = list(_header(path))
    assert keys == sorted(keys)  # canonical header: equal tensors give equal bytes
    assert not list((tmp_path / "a").glob(".lora-*"))  # no temporary left behind


def test_canonical_header_keeps_every_tensor(tmp_path):
    path = tmp_path / "x.safetensors"
    tensors = {"b": torch.arange(3.0), "a": torch.ones(2, 2)}
    save_file(tensors, str(path), metadata={"z": "1", "a": "2"})
    lora.canonical_safetensors(path)
    loaded = load_file(str(path))
    assert all(torch.equal(loaded[key], value) for key, value in tensors.items())
    assert list(_header(path)) == sorted(_header(path))
    assert (struct.unpack("<Q", path.read_bytes()[:8])[0]) % 8 == 0


def test_mismatches_name_the_layers_that_do_not_fit_the_base(unet, tmp_path):
    path = write_random_lora(tmp_path / "a", unet, rank=2, alpha=2)
    checked, problems = lora.lora_mismatches(path, {"unet": unet})
    assert checked == len(load_file(str(path))) and problems == []
    state = load_file(str(path))
    key = next(k for k in state if k.endswith("lora.down.weight"))
    state[key] = torch.zeros(2, state[key].shape[1] + 1)  # another base's input width
    save_file(state, str(tmp_path / "bad.safetensors"))
    _, problems = lora.lora_mismatches(tmp_path / "bad.safetensors", {"unet": unet})
    assert len(problems) == 1 and "input width" in problems[0]


def test_layout_rejects_what_a_plain_batched_lora_cannot_apply(tmp_path):
    path = tmp_path / "te.safetensors"
    save_file({"text_encoder.layer.lora.down.weight": torch.zeros(2, 4)}, str(path))
    with pytest.raises(ValueError, match="not a diffusers-format UNet LoRA"):
        lora.lora_layout(path)
    save_file({}, str(path))
    with pytest.raises(ValueError, match="no UNet LoRA"):
        lora.lora_layout(path)


def test_model_card_names_the_base_the_steps_and_the_validation_images(tmp_path):
    images = [tmp_path / "validation" / "step_5_0.png"]
    fields = dict(base="tiny", instance_prompt="sks person", identity="p0", loss="triplet")
    lora.write_model_card(
        tmp_path, images, **fields, steps=5, rank=4, alpha=4, data="{}", validation_prompt="x"
    )
    card = (tmp_path / "README.md").read_text()
    assert "base_model: tiny" in card and "for 5\nsteps" in card
    assert "![step_5_0](validation/step_5_0.png)" in card


def test_training_resolution_is_recorded_beside_the_native_one(tmp_path):
    """A LoRA trained off the base's native size says so: the header's record and the card."""
    from architectures import PAPER_ARCHITECTURE

    record = lora.base_model_record("tiny", PAPER_ARCHITECTURE, 128)
    assert (record["resolution"], record["training_resolution"]) == (512, 128)
    assert lora.recorded_training_resolution(record) == 128
    assert (
        lora.recorded_training_resolution(lora.base_model_record("t", PAPER_ARCHITECTURE)) is None
    )
    assert lora.recorded_training_resolution(None) is None
    fields = dict(base="tiny", instance_prompt="sks person", identity="p0", loss="triplet")
    lora.write_model_card(
        tmp_path, [], **fields, steps=5, rank=4, alpha=4, data="{}", validation_prompt="x",
        training_resolution=128,
    )  # fmt: skip
    assert "Trained at\n128 x 128 px" in (tmp_path / "README.md").read_text()


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
