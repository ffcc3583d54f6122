"""train_ID-Booth.py on the other bases: tiny random SD 1.5, SD 2.1 768-v and SDXL pipelines
(built from configs in a temp folder), a random IResNet-18 and real faces (training_assets.py).

Each run's LoRA loads into that architecture's stock pipeline (`load_lora_weights`) and changes
its images; the identity and triplet terms' gradients reach the LoRA through SDXL's added
conditioning; the base model's architecture and defaults are recorded."""

from __future__ import annotations

import dataclasses
import json
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch
from tiny_sd import build_tiny_sd
from training_assets import RESOLUTION, Assets, assert_same_lora, cli, make_assets, train

import lora
import trainer

pytestmark = pytest.mark.usefixtures("one_torch_thread")

PIPELINES = {
    "tiny-sd15": "StableDiffusionPipeline",
    "tiny-sd21-v": "StableDiffusionPipeline",
    "tiny-sdxl": "StableDiffusionXLPipeline",
}
FAMILIES = {"tiny-sd15": "sd1", "tiny-sd21-v": "sd2", "tiny-sdxl": "sdxl"}


@pytest.fixture(scope="module")
def assets(tmp_path_factory) -> Assets:
    return make_assets(tmp_path_factory.mktemp("architecture_assets"))


@pytest.fixture(scope="module")
def bases(assets) -> dict[str, Path]:
    return {name: build_tiny_sd(assets.root / name, size=name) for name in PIPELINES}


def base_flags(assets: Assets, base: Path, output: Path, *extra: str) -> list[str]:
    """cli() of a 2-step triplet run on `base`, its resolution left to the base's default."""
    flags = [f for f in cli(assets, output) if not f.startswith(("--pretrained", "--resolution"))]
    return [
        *flags,
        f"--pretrained_model_name_or_path={base}",
        f"--instance_data_dir={assets.identity('hanks')}",
        "--max_train_steps=2",
        "--report_to=none",
        *extra,
    ]


@pytest.fixture(scope="module")
def runs(assets, bases, tmp_path_factory) -> dict[str, Path]:
    """One 2-step triplet run per base (class images sampled by each base's own pipeline)."""
    outputs = {}
    for name, base in bases.items():
        output = tmp_path_factory.mktemp(name) / "out"
        class_dir = output.parent / "class"  # 2 real faces + 1 sampled by the base's pipeline
        shutil.copytree(assets.class_dir, class_dir)
        flags = base_flags(assets, base, output, f"--class_data_dir={class_dir}")
        flags.append("--num_class_images=3")
        summary = train.main(train.parse_args(flags))
        assert [run["steps"] for run in summary["trained"]] == [2], name
        outputs[name] = output
    return outputs


def stock_images(pipeline) -> np.ndarray:
    result = pipeline(
        "photo of sks person",
        num_inference_steps=2,
        generator=torch.Generator().manual_seed(0),
        output_type="np",
        height=RESOLUTION,
        width=RESOLUTION,
    )
    return result.images[0]


@pytest.mark.parametrize("name", list(PIPELINES))
def test_each_bases_lora_loads_into_its_stock_pipeline_and_changes_it(name, bases, runs):
    import diffusers

    pipeline = getattr(diffusers, PIPELINES[name]).from_pretrained(str(bases[name]))
    pipeline.set_progress_bar_config(disable=True)
    before = stock_images(pipeline)
    pipeline.load_lora_weights(str(runs[name]))
    after = stock_images(pipeline)
    assert np.abs(after - before).max() > 1e-3


@pytest.mark.parametrize("name", list(PIPELINES))
def test_the_architecture_and_its_defaults_are_recorded(name, bases, runs):
    config = json.loads((runs[name] / trainer.CONFIG_NAME).read_text())
    architecture = config["resolved"]["architecture"]
    assert architecture["family"] == FAMILIES[name]
    assert architecture["pipeline_class"] == PIPELINES[name]
    assert architecture["prediction_type"] == (
        "v_prediction" if name == "tiny-sd21-v" else "epsilon"
    )
    assert config["args"]["resolution"] == architecture["resolution"] == RESOLUTION  # native
    record = lora.lora_base_model(runs[name] / lora.LORA_WEIGHTS_NAME)
    assert record["training_resolution"] == RESOLUTION
    assert f"Trained at\n{RESOLUTION} x {RESOLUTION} px" in (runs[name] / "README.md").read_text()
    guidance = 5.0 if name == "tiny-sdxl" else 7.5
    assert config["args"]["validation_guidance_scale"] == guidance
    assert config["resolved"]["class_guidance_scale"] == guidance
    # SDXL's VAE overflows in fp16 (force_upcast): kept in fp32; the others in the weight dtype
    assert config["resolved"]["vae_dtype"] == "float32"
    made_for = lora.lora_base_model(runs[name] / lora.LORA_WEIGHTS_NAME)
    assert made_for["family"] == FAMILIES[name] and made_for["name"] == str(bases[name])
    card = (runs[name] / "README.md").read_text()
    assert f"from diffusers import {PIPELINES[name]}" in card


def test_a_flag_the_user_sets_wins_over_the_base_default(assets, bases, tmp_path):
    flags = base_flags(assets, bases["tiny-sdxl"], tmp_path / "out")
    args = train.parse_args([*flags, "--resolution=32", "--validation_guidance_scale=2"])
    assert (args.resolution, args.validation_guidance_scale) == (32, 2.0)


@pytest.fixture(scope="module")
def sdxl_parts(assets, bases, tmp_path_factory):
    """A one-slot trainer on the tiny SDXL (fp32), its identity 'hanks' filled."""
    from accelerate import PartialState
    from tqdm.auto import tqdm

    output = tmp_path_factory.mktemp("sdxl_parts")
    flags = base_flags(assets, bases["tiny-sdxl"], output / "out", "--validation_prompt=")
    args = train.parse_args(flags)
    device = torch.device("cpu")
    tools = trainer.load_face_tools(args, device)
    frozen = trainer.load_frozen_models(args, device, "no", tools.encoder)
    packed = trainer.PackedTrainer(args, frozen, tools, PartialState(cpu=True), 1)
    identity = train.Identity("hanks", args.instance_data_dir, output / "hanks")
    slot = packed.fill(0, identity)
    slot.progress.close()
    slot.progress = tqdm(disable=True)
    return args, packed, slot


@pytest.mark.parametrize("loss", ["identity", "triplet"])
def test_sdxl_identity_terms_reach_the_lora_through_the_added_conditioning(sdxl_parts, loss):
    args, packed, slot = sdxl_parts
    assert packed.frozen.text_encoder_2 is not None and packed.prompts.instance_pooled is not None
    batch, generator = slot.next_batch()
    assert batch.time_ids.shape == (2, 6)  # [instance, prior] x (orig h, w, top, left, R, R)
    assert batch.time_ids[:, 4:].eq(RESOLUTION).all()
    config = dataclasses.replace(packed.objective, loss=loss)
    packed.lora.set_identities(batch.slots)
    terms = trainer.training_step(
        packed.unet, packed.frozen, packed.prompts, batch, [generator], config
    )
    assert terms["identity_term"].item() > 0
    terms["identity_term"].sum().backward()
    grads = [p.grad for p in packed.lora.parameters() if p.grad is not None]
    assert grads and sum(g.abs().sum() for g in grads) > 0
    packed.optimizer.zero_grad(set_to_none=True)


def test_sdxl_time_ids_follow_the_random_crop(sdxl_parts):
    """The crop top-left of a non-square photo's time ids is the crop the batch's latents come
    from; the original size is the photo's own (diffusers' SDXL DreamBooth example)."""
    from PIL import Image

    _, packed, slot = sdxl_parts
    dataset = slot.dataset
    crop = dataset.crops(0)[0]
    ids = trainer.crop_time_ids(dataset, [crop])[0].tolist()
    photo = Image.open(dataset.instance.paths[crop.index])
    assert ids == [photo.height, photo.width, crop.top, crop.left, RESOLUTION, RESOLUTION]


def test_sdxl_vae_stays_fp32_under_fp16_unless_an_fp16_safe_vae_is_given(
    assets, bases, tmp_path, caplog
):
    """SDXL's VAE (force_upcast) is kept and decoded in fp32 under fp16 mixed precision; a VAE
    given by path whose config says it is fp16-safe runs in fp16, the weight dtype."""
    caplog.set_level("INFO")
    safe_vae = tmp_path / "sdxl-vae-fp16-fix"
    shutil.copytree(bases["tiny-sdxl"] / "vae", safe_vae)
    config = json.loads((safe_vae / "config.json").read_text())
    (safe_vae / "config.json").write_text(json.dumps({**config, "force_upcast": False}))
    flags = base_flags(assets, bases["tiny-sdxl"], tmp_path / "out")
    device = torch.device("cpu")
    for extra, dtype in (
        ([], torch.float32),
        ([f"--pretrained_vae_model_name_or_path={safe_vae}"], torch.float16),
    ):
        args = train.parse_args([*flags, *extra])
        frozen = trainer.load_frozen_models(args, device, "fp16", None)
        assert frozen.vae.dtype == dtype
        assert frozen.text_encoder_2.dtype == torch.float16
        assert frozen.architecture.vae_force_upcast == (dtype == torch.float32)
        latents = torch.randn(1, 4, RESOLUTION // 8, RESOLUTION // 8)
        with frozen.autocast(), frozen.vae_precision():
            decoded = frozen.vae.decode(latents.to(frozen.vae.dtype)).sample
        assert decoded.dtype == dtype
    said = [r.getMessage() for r in caplog.records if r.getMessage().startswith("base model")]
    assert len(said) == 2 and all("SDXL (epsilon, 64 px)" in line for line in said)
    assert "decodes in fp32" in said[0] and "fp32" not in said[1]


def test_a_vae_of_another_latent_space_is_refused(assets, bases, tmp_path):
    """An SD 1.x VAE (scaling factor 0.18215) beside an SDXL base (0.13025) would train every
    identity on wrongly scaled latents without an error: refused in one line."""
    flags = base_flags(assets, bases["tiny-sdxl"], tmp_path / "out")
    other = bases["tiny-sd15"] / "vae"
    args = train.parse_args([*flags, f"--pretrained_vae_model_name_or_path={other}"])
    with pytest.raises(ValueError, match="scaling_factor is 0.18215, the base's VAE has 0.13025"):
        trainer.load_frozen_models(args, torch.device("cpu"), "no", None)


# ============================================================================ SDXL: pack, resume


def sdxl_flags(assets, bases, output: Path, *extra: str) -> list[str]:
    flags = base_flags(assets, bases["tiny-sdxl"], output, "--validation_prompt=")
    flags = [f for f in flags if not f.startswith(("--instance_data_dir", "--max_train_steps"))]
    return [*flags, *extra]


def test_sdxl_packed_run_equals_single_runs(assets, bases, tmp_path):
    """--pack 2 on SDXL: each identity's LoRA equals its solo run's (the pooled text and the
    size/crop ids of each row travel with it), at the paper's learning rate (fp32)."""
    root = tmp_path / "identities"
    for name in ("hanks", "person0"):
        shutil.copytree(assets.identity(name), root / name)
    common = [f"--identities_root={root}", "--max_train_steps=3", "--learning_rate=1e-4"]
    train.main(train.parse_args(sdxl_flags(assets, bases, tmp_path / "alone", *common)))
    packed = sdxl_flags(assets, bases, tmp_path / "packed", *common, "--pack=2")
    summary = train.main(train.parse_args(packed))
    assert [r["identity"] for r in summary["trained"]] == ["hanks", "person0"]
    for name in ("hanks", "person0"):
        assert_same_lora(tmp_path / "alone" / name, tmp_path / "packed" / name, atol=1e-5)


def test_sdxl_resumed_run_equals_the_uninterrupted_one(assets, bases, tmp_path):
    flags = [f"--instance_data_dir={assets.identity('hanks')}", "--max_train_steps=4"]
    flags += ["--checkpointing_steps=2"]
    full = tmp_path / "full"
    train.main(train.parse_args(sdxl_flags(assets, bases, full, *flags)))
    resumed = tmp_path / "resumed"
    resumed.mkdir()
    shutil.copytree(full / "checkpoint-2", resumed / "checkpoint-2")
    argv = sdxl_flags(assets, bases, resumed, *flags, "--resume_from_checkpoint=latest")
    summary = train.main(train.parse_args(argv))
    assert [run["steps"] for run in summary["trained"]] == [4]
    assert_same_lora(full, resumed)
    assert_same_lora(full / "checkpoint-4", resumed / "checkpoint-4")
