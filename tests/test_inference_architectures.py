"""inference_ID-Booth.py on the other bases: a tiny random SDXL pipeline (two text encoders,
pooled text and size/crop time ids) and LoRAs recorded for SD 1.x / SD 2.x / SDXL.

Independent reference: diffusers' own StableDiffusionXLPipeline with `load_lora_weights`,
regenerating an image from its metadata line alone."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image
from tiny_sd import build_tiny_sd

import runs
from architectures import architecture_or_paper
from lora import base_model_record
from random_models import write_random_lora

REPO_ROOT = Path(__file__).resolve().parents[1]
inference = runs.load_script(REPO_ROOT / "inference_ID-Booth.py")
FAST = ["--num_inference_steps", "3", "--mixed_precision", "no"]  # resolution: the base's, 64

pytestmark = pytest.mark.usefixtures("one_torch_thread")


def make_lora(folder: Path, base: Path, seed: int) -> Path:
    """A LoRA folder as train_ID-Booth.py writes it for `base` (random non-zero weights)."""
    from diffusers import UNet2DConditionModel

    unet = UNet2DConditionModel.from_pretrained(base / "unet")
    record = base_model_record(base, architecture_or_paper(str(base)))
    write_random_lora(folder, unet, seed=seed, std=0.5, base_model=record)
    return folder


@pytest.fixture(scope="module")
def assets(tmp_path_factory):
    """Tiny SDXL, SD 2.1 and SD 1.5 bases; two SDXL identities, one SD 1.5 and one SDXL LoRA
    for the SD 2.1 base."""
    root = tmp_path_factory.mktemp("inference_architectures")
    bases = {
        name: build_tiny_sd(root / name, size=name) for name in ("tiny-sdxl", "tiny", "tiny-sd15")
    }
    sdxl_loras = root / "sdxl_loras"
    for seed, name in enumerate(["ID_a", "ID_b"]):
        make_lora(sdxl_loras / name, bases["tiny-sdxl"], seed)
    mixed = root / "for_sd21"
    make_lora(mixed / "ID_sd21", bases["tiny"], 3)
    make_lora(mixed / "ID_sd15", bases["tiny-sd15"], 4)  # same layer shapes as tiny SD 2.1's
    make_lora(mixed / "ID_sdxl", bases["tiny-sdxl"], 5)
    return {"bases": bases, "sdxl_loras": sdxl_loras, "for_sd21": mixed}


def cli(base: Path, loras: Path, output_dir: Path, *extra: str) -> list[str]:
    return [
        f"--pretrained_model_name_or_path={base}",
        f"--lora_root={loras}",
        f"--output_dir={output_dir}",
        "--prompt_template=face portrait photo of sks person, {background} background",
        "--prompt_template_no_background=face portrait photo of sks person",
        *FAST,
        *extra,
    ]


def run(argv: list[str]) -> dict:
    return inference.main(inference.parse_args(argv))


def pixels(path: Path) -> np.ndarray:
    with Image.open(path) as image:
        return np.asarray(image.convert("RGB"), dtype=np.int16)


def metadata(output_dir: Path) -> list[dict]:
    return [json.loads(line) for line in (output_dir / "metadata.jsonl").read_text().splitlines()]


def stock_sdxl(model: Path):
    from diffusers import DDPMScheduler, StableDiffusionXLPipeline

    pipeline = StableDiffusionXLPipeline.from_pretrained(model)
    pipeline.scheduler = DDPMScheduler.from_config(pipeline.scheduler.config)
    for component in (pipeline.unet, pipeline.vae, pipeline.text_encoder, pipeline.text_encoder_2):
        component.requires_grad_(False)
    pipeline.set_progress_bar_config(disable=True)
    return pipeline


def regenerate(pipeline, record: dict) -> np.ndarray:
    image = pipeline(
        record["prompt"],
        negative_prompt=record["negative_prompt"],
        generator=torch.Generator().manual_seed(record["seed"]),
        num_inference_steps=record["num_inference_steps"],
        guidance_scale=record["guidance_scale"],
        height=record["resolution"],
        width=record["resolution"],
    ).images[0]
    return np.asarray(image, dtype=np.int16)


def test_sdxl_images_equal_the_stock_sdxl_pipeline_with_load_lora_weights(assets, tmp_path):
    """Batch 1, fp32, DDPM: every image equals StableDiffusionXLPipeline + load_lora_weights
    regenerating it from its metadata line, and the LoRA changes the image."""
    base = assets["bases"]["tiny-sdxl"]
    run(
        cli(
            base,
            assets["sdxl_loras"],
            tmp_path,
            "--identities",
            "ID_a",
            "--num_images_per_identity",
            "2",
        )
    )
    pipeline = stock_sdxl(base)
    records = metadata(tmp_path)
    assert [r["resolution"] for r in records] == [64, 64]  # the base's native size
    without_lora = regenerate(pipeline, records[0])
    pipeline.load_lora_weights(assets["sdxl_loras"] / "ID_a")
    for record in records:
        ours = pixels(tmp_path / "ID_a" / f"{record['index']}.png")
        assert np.array_equal(regenerate(pipeline, record), ours), record["index"]
    assert np.abs(pixels(tmp_path / "ID_a" / "0.png") - without_lora).mean() > 1


def test_sdxl_batches_mixing_identities_equal_images_made_one_by_one(assets, tmp_path):
    base = assets["bases"]["tiny-sdxl"]
    argv = ["--num_images_per_identity", "2"]
    run(cli(base, assets["sdxl_loras"], tmp_path / "one", *argv, "--batch_size", "1"))
    run(cli(base, assets["sdxl_loras"], tmp_path / "mixed", *argv, "--batch_size", "3"))
    batches = {json.dumps(r["batch"]) for r in metadata(tmp_path / "mixed")}
    assert json.dumps([["ID_a", 0], ["ID_a", 1], ["ID_b", 0]]) in batches
    for name in ("ID_a/0.png", "ID_a/1.png", "ID_b/0.png", "ID_b/1.png"):
        difference = np.abs(pixels(tmp_path / "one" / name) - pixels(tmp_path / "mixed" / name))
        assert difference.max() <= 2 and (difference > 0).mean() < 0.01, name


class Bar:
    """A progress bar that records its count and total (tqdm's attributes)."""

    def __init__(self, options: dict) -> None:
        self.n, self.total = 0, options["total"]

    def __enter__(self) -> Bar:
        return self

    def __exit__(self, *exc: object) -> None:
        pass

    def update(self, count: int) -> None:
        self.n += count

    def refresh(self) -> None:
        pass


def test_a_lora_made_for_another_architecture_is_refused_alone_in_one_line(
    assets, tmp_path, caplog, monkeypatch
):
    """On the SD 2.1 base: the SD 1.5 LoRA (whose layer shapes fit) and the SDXL one are refused
    by their recorded architecture, each in one line; the SD 2.1 identity is generated. The
    refused images are 'failed' in the summary and its message, never progress."""
    bars = []
    monkeypatch.setattr(
        runs, "progress_bar", lambda **options: bars.append(Bar(options)) or bars[-1]
    )
    summary = run(
        cli(assets["bases"]["tiny"], assets["for_sd21"], tmp_path, "--num_images_per_identity", "1")
    )
    assert summary["failed_identities"] == ["ID_sd15", "ID_sdxl"]
    assert (summary["written"], summary["failed"], summary["skipped"]) == (1, 2, 0)
    assert [(bar.n, bar.total) for bar in bars] == [(1, 1)]  # the generated image only
    lines = [r.getMessage() for r in caplog.records if "trained for" in r.getMessage()]
    assert len(lines) == 2 and all("\n" not in line for line in lines)
    assert all("counted as 'failed'" in line and "skipping" not in line for line in lines)
    assert any("'ID_sd15'" in line and "SD 1.x" in line and "SD 2.x" in line for line in lines)
    assert any("'ID_sdxl'" in line and "SDXL" in line for line in lines)


def test_sdxl_generation_resumes_to_the_same_images(assets, tmp_path):
    base = assets["bases"]["tiny-sdxl"]
    argv = cli(base, assets["sdxl_loras"], tmp_path / "full", "--num_images_per_identity", "2")
    run(argv)
    partial = tmp_path / "partial"
    run(cli(base, assets["sdxl_loras"], partial, "--num_images_per_identity", "2"))
    for name in ("ID_a/1.png", "ID_b/0.png"):
        (partial / name).unlink()
    summary = run(cli(base, assets["sdxl_loras"], partial, "--num_images_per_identity", "2"))
    assert (summary["written"], summary["skipped"]) == (2, 2)
    for name in ("ID_a/0.png", "ID_a/1.png", "ID_b/0.png", "ID_b/1.png"):
        assert (partial / name).read_bytes() == (tmp_path / "full" / name).read_bytes(), name


def _copy_vae(base: Path, folder: Path, **changes) -> Path:
    """The base's VAE as a standalone VAE folder, its config changed by `changes`."""
    import shutil

    shutil.copytree(base / "vae", folder)
    config = json.loads((folder / "config.json").read_text())
    (folder / "config.json").write_text(json.dumps(config | changes))
    return folder


def test_sdxl_under_fp16_decodes_in_fp32_unless_the_vae_is_fp16_safe(assets, tmp_path, monkeypatch):
    """SDXL's VAE says force_upcast (it overflows in fp16): under --mixed_precision fp16 the UNet
    runs in fp16 and the VAE decodes in fp32, as in the stock SDXL pipeline; an fp16-safe VAE
    given by --pretrained_vae_model_name_or_path (force_upcast false) decodes in fp16."""
    import sampling

    seen, decode = [], sampling.decode_checked

    def record(pipeline, latents, *args, **kwargs):
        seen.append((pipeline.unet.dtype, pipeline.vae.dtype))
        return decode(pipeline, latents, *args, **kwargs)

    monkeypatch.setattr(sampling, "decode_checked", record)
    base = assets["bases"]["tiny-sdxl"]
    fp16 = ["--mixed_precision", "fp16", "--num_images_per_identity", "1"]
    argv = [*cli(base, assets["sdxl_loras"], tmp_path / "own", "--num_inference_steps", "2"), *fp16]
    assert run(argv)["written"] == 2
    assert set(seen) == {(torch.float16, torch.float32)}
    seen.clear()
    safe = _copy_vae(base, tmp_path / "fp16_safe_vae", force_upcast=False)
    argv = [
        *cli(base, assets["sdxl_loras"], tmp_path / "safe", "--num_inference_steps", "2"),
        *fp16,
        f"--pretrained_vae_model_name_or_path={safe}",
    ]
    assert run(argv)["written"] == 2
    assert set(seen) == {(torch.float16, torch.float16)}
    config = json.loads((tmp_path / "safe" / inference.RUN_CONFIG_NAME).read_text())
    assert config["generation"]["vae"] == str(safe)


def test_a_vae_of_another_latent_space_is_refused_in_one_line(assets, tmp_path):
    """An SD 1.x VAE (scaling factor 0.18215) beside an SDXL base (0.13025) would decode every
    latent wrong without an error: refused before any image."""
    base = assets["bases"]["tiny-sdxl"]
    other = assets["bases"]["tiny-sd15"] / "vae"
    argv = [
        *cli(base, assets["sdxl_loras"], tmp_path, "--num_images_per_identity", "1"),
        f"--pretrained_vae_model_name_or_path={other}",
    ]
    with pytest.raises(ValueError, match="scaling_factor is 0.18215, the base's VAE has 0.13025"):
        run(argv)
    assert not list(tmp_path.glob("*/*.png"))


def without_base(argv: list[str]) -> list[str]:
    return [flag for flag in argv if not flag.startswith("--pretrained_model_name_or_path")]


def test_base_not_given_is_the_one_the_loras_record(assets, tmp_path, caplog):
    """No --pretrained_model_name_or_path: the base every LoRA's header names (logged), not
    the hub's SD 2.1-base; LoRAs naming different bases are one error line listing them."""
    base = assets["bases"]["tiny-sdxl"]
    args = inference.parse_args(without_base(cli(base, assets["sdxl_loras"], tmp_path / "a")))
    assert args.pretrained_model_name_or_path == str(base)
    assert args.defaults_from["pretrained_model_name_or_path"] == "the LoRAs' headers"
    with pytest.raises(ValueError, match="the LoRAs record different base models") as error:
        inference.parse_args(without_base(cli(base, assets["for_sd21"], tmp_path / "b")))
    text = str(error.value)
    assert "\n" not in text and "ID_sd15" in text and "ID_sdxl" in text and "ID_sd21" in text


def test_resolution_not_given_is_the_loras_training_resolution(assets, tmp_path, caplog):
    """--resolution unset: the size all LoRAs record they were trained at; when they differ,
    the base's native size and one warning naming the disagreement."""
    base = assets["bases"]["tiny"]
    record = base_model_record(base, architecture_or_paper(str(base)), 128)
    from diffusers import UNet2DConditionModel

    unet = UNet2DConditionModel.from_pretrained(base / "unet")
    for name in ("ID_1", "ID_2"):
        write_random_lora(tmp_path / "same" / name, unet, base_model=record)
    argv = cli(base, tmp_path / "same", tmp_path / "out")  # FAST here sets no --resolution
    args = inference.parse_args(argv)
    assert args.resolution == 128 and not caplog.records
    other = base_model_record(base, architecture_or_paper(str(base)), 96)
    write_random_lora(tmp_path / "same" / "ID_3", unet, base_model=other)
    assert inference.parse_args(argv).resolution == 64  # the tiny base's native size
    warnings = [r.getMessage() for r in caplog.records if r.levelname == "WARNING"]
    assert len(warnings) == 1 and "128 px (ID_1, ID_2); 96 px (ID_3)" in warnings[0]
    assert inference.parse_args([*argv, "--resolution", "32"]).resolution == 32
