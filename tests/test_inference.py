"""inference_ID-Booth.py: reproducible, resumable, splittable dataset generation.

Everything runs on the tiny random SD-2.1-shaped pipeline (64 px, 4 DDPM steps) with LoRAs
made by peft the way train_ID-Booth.py saves them, with random (non-zero) LoRA weights so
they change the images. Independent references: a stock diffusers pipeline regenerating an
image from its metadata line alone, hashlib for the seeds, string concatenation for the
prompts.
"""

from __future__ import annotations

import errno
import functools
import json
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import pytest
import torch
from conftest import fake_base_model
from hypothesis import given, settings
from hypothesis import strategies as st
from PIL import Image
from tiny_sd import build_tiny_sd

import fileio
import lora
import prompts
import runs
import sampling
from lora import LORA_WEIGHTS_NAME
from random_models import write_random_lora

REPO_ROOT = Path(__file__).resolve().parents[1]
SCRIPT = REPO_ROOT / "inference_ID-Booth.py"
FAST = ["--num_inference_steps", "4", "--resolution", "64", "--mixed_precision", "no"]


inference = runs.load_script(SCRIPT)


# ------------------------------------------------------------------------------ fixtures


def make_lora(folder: Path, unet, seed: int, std: float = 0.5) -> Path:
    """A LoRA folder like train_ID-Booth.py's, with random non-zero weights."""
    return write_random_lora(folder, unet, seed=seed, std=std, init_lora_weights="gaussian").parent


pytestmark = pytest.mark.usefixtures("one_torch_thread")


@pytest.fixture(scope="module")
def assets(tmp_path_factory):
    """Tiny base model, LoRA root with three identities, gender CSV, a wrong-base LoRA."""
    from diffusers import UNet2DConditionModel

    root = tmp_path_factory.mktemp("inference_assets")
    model = build_tiny_sd(root / "tiny_sd")
    loras = root / "loras"
    for seed, name in enumerate(["ID_a", "ID_b", "ID_c"]):
        make_lora(loras / name, UNet2DConditionModel.from_pretrained(model / "unet"), seed)
    config = dict(UNet2DConditionModel.load_config(model / "unet"))
    config["cross_attention_dim"] = 48  # e.g. an SD 1.5 LoRA (768) on SD 2.1 (1024)
    wrong_base = make_lora(
        root / "wrong_base" / "ID_w", UNet2DConditionModel.from_config(config), 7
    )
    genders = root / "genders.csv"
    genders.write_text("identity,gender\nID_a,male\nID_b,F\nID_c,woman\nID_w,m\nID_x,male\n")
    return {"model": model, "loras": loras, "genders": genders, "wrong_base": wrong_base}


def cli(assets, output_dir: Path, *extra: str) -> list[str]:
    """Arguments for a small run over the LoRA root."""
    return [
        "--pretrained_model_name_or_path",
        str(assets["model"]),
        "--lora_root",
        str(assets["loras"]),
        "--identity_attributes",
        str(assets["genders"]),
        "--output_dir",
        str(output_dir),
        *FAST,
        *extra,
    ]


def run(argv: list[str]) -> dict:
    return inference.main(inference.parse_args(argv))


def pngs(output_dir: Path) -> dict[str, bytes]:
    """relative path -> bytes of every image under output_dir."""
    return {str(p.relative_to(output_dir)): p.read_bytes() for p in output_dir.glob("*/*.png")}


def pixels(path: Path) -> np.ndarray:
    with Image.open(path) as image:
        return np.asarray(image.convert("RGB"), dtype=np.int16)


def metadata(output_dir: Path) -> list[dict]:
    return [json.loads(line) for line in (output_dir / "metadata.jsonl").read_text().splitlines()]


def temp_files(output_dir: Path) -> list[Path]:
    return sorted(output_dir.rglob("*.tmp"))  # fileio's temp names: .<name>.<random>.tmp


def subprocess_env(threads: int) -> dict[str, str]:
    env = dict(os.environ, OMP_NUM_THREADS=str(threads), PYTHONPATH=str(REPO_ROOT))
    env.update(HF_HUB_OFFLINE="1", TRANSFORMERS_OFFLINE="1", TOKENIZERS_PARALLELISM="false")
    return env


# ------------------------------------------------------------------ seeds, prompts, splits


IDENTITIES = st.text(min_size=1, max_size=12)


@functools.cache
def stand_in_base_model() -> str:
    """A folder laid out as a saved pipeline, for parse_args's base-model check (no weights)."""
    return str(fake_base_model(Path(tempfile.mkdtemp()) / "sd"))


def planning_args(*extra: str):
    """Parsed arguments for plan_image (no model is loaded, no output folder written)."""
    base = f"--pretrained_model_name_or_path={stand_in_base_model()}"
    return inference.parse_args(["--lora_dir", "ID", "--output_dir", "unused", base, *extra])


@settings(max_examples=30, deadline=None)
@given(
    seed=st.integers(0, 2**31),
    identity=st.from_regex(r"ID_[0-9]{1,4}", fullmatch=True),
    sampling=st.sampled_from(sorted(prompts.BACKGROUND_SAMPLERS)),
    n=st.integers(1, 30),
    more=st.integers(1, 30),
)
def test_adding_images_keeps_earlier_prompts(seed, identity, sampling, n, more):
    def jobs(num_images):
        args = planning_args(
            "--seed",
            str(seed),
            "--background_sampling",
            sampling,
            "--num_images_per_identity",
            str(num_images),
        )
        return [inference.plan_image(args, identity, "male", i) for i in range(num_images)]

    assert jobs(n + more)[:n] == jobs(n)


@settings(max_examples=200, deadline=None)
@given(seed=st.integers(0, 2**63 - 1), identity=IDENTITIES)
def test_paper_backgrounds_over_21_images_each_once_or_twice(seed, identity):
    args = planning_args("--seed", str(seed))
    drawn = [inference.plan_image(args, identity, "male", i).background for i in range(21)]
    counts = [drawn.count(background) for background in prompts.PAPER_BACKGROUNDS]
    assert min(counts) >= 1 and max(counts) <= 2


def test_background_sampling_modes_share_seed_and_coin():
    balanced, independent = planning_args(), planning_args("--background_sampling", "independent")
    assert balanced.background_sampling == "balanced"  # the default
    for index in range(40):
        new = inference.plan_image(balanced, "ID_1", "female", index)
        old = inference.plan_image(independent, "ID_1", "female", index)
        assert (new.seed, new.side_portrait) == (old.seed, old.side_portrait)
        # 'independent' is the draw made before the flag existed, from the image seed alone.
        assert (old.background, old.side_portrait) == prompts.prompt_choices(
            old.seed, prompts.PAPER_BACKGROUNDS, 0.5
        )
    # Pinned: changing the block shuffle would silently change every balanced dataset.
    first_block = [
        prompts.balanced_background(0, "ID_1", i, prompts.PAPER_BACKGROUNDS) for i in range(11)
    ]
    assert first_block == [
        "none",
        "hospital",
        "bus",
        "office",
        "city street",
        "laboratory",
        "construction site",
        "factory",
        "beach",
        "forest",
        "night club",
    ]
    with pytest.raises(ValueError, match="unknown --background_sampling 'even'.*balanced"):
        prompts.background_sampler("even")


def test_resume_compares_background_sampling(tmp_path):
    args = planning_args("--background_sampling", "independent")
    args.resolved_mixed_precision = "no"  # set by main() from the device
    recorded = inference.generation_settings(args)
    assert recorded["background_sampling"] == "independent"
    (tmp_path / "run_config.json").write_text(json.dumps({"generation": recorded}))
    inference.check_run_config(tmp_path, recorded, [], overwrite=False)
    balanced = {**recorded, "background_sampling": "balanced"}
    inference.check_run_config(tmp_path, balanced, [], overwrite=False)  # no image made yet
    (tmp_path / "ID_a").mkdir()
    Image.new("RGB", (8, 8)).save(tmp_path / "ID_a" / "0.png")
    with pytest.raises(ValueError, match="background_sampling: 'independent' -> 'balanced'"):
        inference.check_run_config(tmp_path, balanced, [], overwrite=False)


@settings(max_examples=200, deadline=None)
@given(num_items=st.integers(0, 60), num_processes=st.integers(1, 9))
def test_split_work_partitions_without_overlap(num_items, num_processes):
    items = list(range(num_items))
    shares = [inference.split_work(items, num_processes, rank) for rank in range(num_processes)]
    assert [item for share in shares for item in share] == items
    assert max(map(len, shares)) - min(map(len, shares)) <= 1


@settings(max_examples=100, deadline=None)
@given(num_identities=st.integers(1, 4), num_images=st.integers(1, 30), batch=st.integers(1, 9))
def test_batches_are_fixed_runs_of_the_job_list(num_identities, num_images, batch):
    names = [f"ID_{i}" for i in range(num_identities)]
    batches = inference.make_batches(names, num_images, batch)
    jobs = [(name, index) for name in names for index in range(num_images)]
    assert [job for members in batches for job in members] == jobs
    assert all(len(members) == batch for members in batches[:-1])
    assert 1 <= len(batches[-1]) <= batch
    assert inference.slots_needed([inference.SampleBatch(b, b, {}) for b in batches]) == max(
        len({name for name, _ in members}) for members in batches
    )
    for rank, processes in ((0, 1), (1, 3)):  # a process's identity ranges cover its batches
        mine = inference.split_work(range(len(batches)), processes, rank)
        ranges = inference.my_identity_ranges(batches, mine)
        held = {job for b in mine for job in batches[b]}
        assert held == {(name, i) for name, indices in ranges.items() for i in indices}


def test_absurd_image_counts_plan_nothing_before_the_first_image(assets, tmp_path, monkeypatch):
    """Batches are computed when generation reaches them: a million images per identity start
    at once (no per-image list or file check first); more than that is refused at parse time."""
    batches = inference.make_batches(["a", "b", "c"], 10**6 - 1, 16)
    assert len(batches) == 187500 and batches[-1][-1] == ("c", 999998)
    assert batches.most_identities() == 2  # batch 62499 holds a's last and b's first images
    assert inference.make_batches(["a", "b", "c"], 10**6, 16).most_identities() == 1
    checks = []
    monkeypatch.setattr(inference, "is_complete_png", lambda path: checks.append(path) or True)

    class FirstBatchError(Exception):
        pass

    def first_batch(pipeline, jobs, *rest):
        raise FirstBatchError(len(checks))

    monkeypatch.setattr(inference, "generate_batch", first_batch)
    argv = cli(assets, tmp_path / "out", "--num_images_per_identity", "1000000")
    with pytest.raises(FirstBatchError) as reached:
        run(argv)
    assert reached.value.args == (0,)  # no image was looked up before the first batch
    with pytest.raises(ValueError, match="--num_images_per_identity must be >= 1 and <= 1e"):
        inference.parse_args(
            cli(assets, tmp_path / "out", "--num_images_per_identity", "300000000")
        )


# ------------------------------------------------------------------- generation results


def test_same_seed_gives_byte_identical_pngs(assets, tmp_path):
    argv = ["--identities", "ID_a", "--num_images_per_identity", "3"]
    run(cli(assets, tmp_path / "first", *argv))
    run(cli(assets, tmp_path / "second", *argv))
    first, second = pngs(tmp_path / "first"), pngs(tmp_path / "second")
    assert sorted(first) == ["ID_a/0.png", "ID_a/1.png", "ID_a/2.png"]
    assert first == second
    assert (tmp_path / "first" / "metadata.jsonl").read_bytes() == (
        tmp_path / "second" / "metadata.jsonl"
    ).read_bytes()
    run(cli(assets, tmp_path / "other_seed", *argv, "--seed", "1", "--grid_dir", str(tmp_path)))
    other = tmp_path / "other_seed" / "ID_a" / "0.png"
    assert np.abs(pixels(other) - pixels(tmp_path / "first" / "ID_a" / "0.png")).mean() > 5
    with Image.open(tmp_path / "ID_a.jpg") as grid:  # 3 images -> 2 x 2 cells of 128 px
        assert grid.size == (256, 256)


def test_batch_size_changes_only_float_rounding(assets, tmp_path):
    argv = ["--identities", "ID_b", "--num_images_per_identity", "4"]
    run(cli(assets, tmp_path / "b1", *argv, "--batch_size", "1"))
    run(cli(assets, tmp_path / "b3", *argv, "--batch_size", "3"))  # batches [0, 1, 2], [3]
    rows1 = [{k: v for k, v in r.items() if k != "batch"} for r in metadata(tmp_path / "b1")]
    rows3 = [{k: v for k, v in r.items() if k != "batch"} for r in metadata(tmp_path / "b3")]
    assert rows1 == rows3  # same seeds, prompts, settings
    first, last = [["ID_b", i] for i in range(3)], [["ID_b", 3]]
    assert [r["batch"] for r in metadata(tmp_path / "b3")] == [first] * 3 + [last]
    for index in range(4):
        one = pixels(tmp_path / "b1" / "ID_b" / f"{index}.png")
        three = pixels(tmp_path / "b3" / "ID_b" / f"{index}.png")
        difference = np.abs(one - three)
        # Per-image noise makes the images the same; CPU kernels round differently per
        # batch shape, which can move a few pixels by one level.
        assert difference.max() <= 2 and (difference > 0).mean() < 0.01
        if index == 3:  # same batch shape in both runs: exactly equal
            assert difference.max() == 0


@pytest.mark.parametrize("scheduler", ["ddpm", "euler"])  # sampling.Sampler / stock loop
def test_batches_mixing_identities_equal_images_made_one_by_one(assets, tmp_path, scheduler):
    argv = ["--num_images_per_identity", "3", "--scheduler", scheduler]
    run(cli(assets, tmp_path / "one", *argv, "--batch_size", "1"))
    run(cli(assets, tmp_path / "mixed", *argv, "--batch_size", "4"))
    batches = {json.dumps(r["batch"]) for r in metadata(tmp_path / "mixed")}
    assert json.dumps([["ID_a", 0], ["ID_a", 1], ["ID_a", 2], ["ID_b", 0]]) in batches
    one, mixed = pngs(tmp_path / "one"), pngs(tmp_path / "mixed")
    assert sorted(one) == sorted(mixed) and len(one) == 9
    for name in one:
        difference = np.abs(pixels(tmp_path / "one" / name) - pixels(tmp_path / "mixed" / name))
        # The right LoRA per sample: another identity's LoRA moves the mean by > 5 levels.
        assert difference.max() <= 2 and (difference > 0).mean() < 0.01, name


def _stock_pipeline(model: Path, dtype: torch.dtype = torch.float32):
    """A fresh diffusers pipeline, frozen like the script's (CPU kernels depend on it)."""
    from diffusers import DDPMScheduler, StableDiffusionPipeline

    pipeline = StableDiffusionPipeline.from_pretrained(model, **sampling.dtype_keyword(dtype))
    pipeline.scheduler = DDPMScheduler.from_config(pipeline.scheduler.config)
    for component in (pipeline.unet, pipeline.vae, pipeline.text_encoder):
        component.requires_grad_(False)
    pipeline.set_progress_bar_config(disable=True)
    return pipeline


def _regenerate(pipeline, record: dict) -> np.ndarray:
    """An image from its metadata line alone, with plain diffusers calls."""
    image = pipeline(
        record["prompt"],
        negative_prompt=record["negative_prompt"],
        generator=torch.Generator().manual_seed(record["seed"]),
        num_inference_steps=record["num_inference_steps"],
        guidance_scale=record["guidance_scale"],
        height=record["resolution"],
        width=record["resolution"],
        cross_attention_kwargs={"scale": record["lora_scale"]},
    ).images[0]
    return np.asarray(image, dtype=np.int16)


def test_png_pixels_round_like_the_references_save_image_on_fp16_decodes():
    """The reference writes the pipeline's float output with torchvision's save_image,
    floor(255 x + 0.5); diffusers' PIL conversion (ours) rounds half to even. They agree on
    every fp16 value in [0, 1], all an fp16 decode can give."""
    from diffusers.image_processor import VaeImageProcessor

    values = torch.arange(2**15, dtype=torch.int16).view(torch.float16)  # every x >= 0
    values = values[values <= 1].float()  # (15361,)
    reference = values.mul(255).add(0.5).clamp(0, 255).to(torch.uint8).numpy()
    rows = values.numpy().reshape(1, -1, 1, 1).repeat(3, axis=3)  # (1, N, 1, 3) images
    ours = np.asarray(VaeImageProcessor.numpy_to_pil(rows)[0])[:, 0, 0]
    assert len(ours) == 15361 and np.array_equal(ours, reference)


@pytest.mark.parametrize(
    ("precision", "lora_scale"), [("fp16", "1"), ("fp16", "0.7"), ("bf16", "0.7"), ("no", "0.7")]
)
def test_half_precision_images_equal_the_stock_pipeline_with_load_lora_weights(
    assets, tmp_path, precision, lora_scale
):
    """The official inference: from_pretrained(torch_dtype=float16), DDPM, load_lora_weights.
    At batch 1 our images equal it bit for bit in fp16 and bf16 too: the batched LoRA holds its
    factors in the pipeline's dtype and scales the product at run time, as peft does (fp32
    factors gave 1 grey level on about 13 % of pixels)."""
    argv = ["--identities", "ID_a", "--num_images_per_identity", "2", "--lora_scale", lora_scale]
    argv = cli(assets, tmp_path, *argv)
    argv[argv.index("--mixed_precision") + 1] = precision
    run(argv)
    dtype = {"fp16": torch.float16, "bf16": torch.bfloat16, "no": torch.float32}[precision]
    pipeline = _stock_pipeline(assets["model"], dtype)
    pipeline.load_lora_weights(assets["loras"] / "ID_a")
    for record in metadata(tmp_path):
        ours = pixels(tmp_path / "ID_a" / f"{record['index']}.png")
        assert np.array_equal(_regenerate(pipeline, record), ours), record["index"]


def test_lora_changes_images_and_metadata_regenerates_them(assets, tmp_path):
    argv = ["--identities", "ID_a", "--num_images_per_identity", "2"]
    run(cli(assets, tmp_path / "lora", *argv))
    one_identity = cli(assets, tmp_path / "base", "--num_images_per_identity", "2")
    position = one_identity.index("--lora_root")  # --lora_dir: one identity, same name
    one_identity[position : position + 2] = ["--lora_dir", str(assets["loras"] / "ID_a")]
    run([*one_identity, "--lora_scale", "0"])
    for index in range(2):
        with_lora = pixels(tmp_path / "lora" / "ID_a" / f"{index}.png")
        base = pixels(tmp_path / "base" / "ID_a" / f"{index}.png")
        assert np.abs(with_lora - base).mean() > 5

    pipeline = _stock_pipeline(assets["model"])
    base_record = metadata(tmp_path / "base")[1]
    assert np.array_equal(_regenerate(pipeline, base_record), pixels(tmp_path / "base/ID_a/1.png"))
    record = metadata(tmp_path / "lora")[1]
    assert record["lora_path"] == str(assets["loras"] / "ID_a" / "pytorch_lora_weights.safetensors")
    pipeline.load_lora_weights(Path(record["lora_path"]).parent)
    assert np.array_equal(_regenerate(pipeline, record), pixels(tmp_path / "lora/ID_a/1.png"))


def test_base_loads_once_and_lora_swaps_leave_no_trace(assets, tmp_path, monkeypatch):
    from diffusers import StableDiffusionPipeline

    loads = []
    original = StableDiffusionPipeline.from_pretrained.__func__

    def counting_from_pretrained(cls, *args, **kwargs):
        loads.append(args)
        return original(cls, *args, **kwargs)

    monkeypatch.setattr(
        StableDiffusionPipeline, "from_pretrained", classmethod(counting_from_pretrained)
    )
    summary = run(cli(assets, tmp_path / "all", "--num_images_per_identity", "2"))
    assert len(loads) == 1 and summary["written"] == 6 and summary["failed"] == 0
    run(cli(assets, tmp_path / "only_c", "--identities", "ID_c", "--num_images_per_identity", "2"))
    all_images, only_c = pngs(tmp_path / "all"), pngs(tmp_path / "only_c")
    assert {k: v for k, v in all_images.items() if k.startswith("ID_c")} == only_c
    assert all_images["ID_a/0.png"] != all_images["ID_b/0.png"]  # the swap happened


@pytest.mark.parametrize("name", sorted(sampling.SCHEDULERS))
def test_every_scheduler_builds_and_is_reproducible(assets, name):
    import diffusers

    args = inference.parse_args(
        cli(assets, Path("unused"), "--scheduler", name, "--num_inference_steps", "3")
    )
    pipeline = inference.load_generation_pipeline(args)
    class_name, overrides = sampling.SCHEDULERS[name]
    assert type(pipeline.scheduler) is getattr(diffusers, class_name)
    for key, value in overrides.items():
        assert pipeline.scheduler.config[key] == value
    jobs = [inference.plan_image(args, "ID_a", "male", index) for index in range(2)]
    first, *_ = inference.generate_batch(pipeline, jobs, args)
    again, *_ = inference.generate_batch(pipeline, jobs[1:], args)
    image = np.asarray(first[1], dtype=np.int16)
    assert np.abs(image - np.asarray(again[0], dtype=np.int16)).max() <= 2
    assert image.std() > 0


# -------------------------------------------------------------- interruption and disk full


def test_disk_full_leaves_no_partial_image_and_resume_completes(assets, tmp_path, monkeypatch):
    output = tmp_path / "out"
    argv = cli(assets, output, "--identities", "ID_a", "--num_images_per_identity", "4")
    original = fileio._write_all

    def disk_fills_up(handle, data):
        if ".2.png." in Path(handle.name).name:  # image 2: half of it lands, then the disk is full
            handle.write(data[: len(data) // 2])
            raise OSError(errno.ENOSPC, "No space left on device")
        original(handle, data)

    monkeypatch.setattr(fileio, "_write_all", disk_fills_up)
    with pytest.raises(OSError, match=r"could not write .*2\.png.*No space left") as error:
        run(argv)
    assert error.value.errno == errno.ENOSPC
    left = sorted(pngs(output))
    # Writes run beside sampling: image 3 may have landed (whole) before the error was seen.
    assert left in (["ID_a/0.png", "ID_a/1.png"], ["ID_a/0.png", "ID_a/1.png", "ID_a/3.png"])
    assert temp_files(output) == []
    assert not (output / "metadata.jsonl").exists()

    monkeypatch.setattr(fileio, "_write_all", original)
    summary = run(argv)
    assert (summary["written"], summary["skipped"]) == (4 - len(left), len(left))
    assert [r["index"] for r in metadata(output)] == [0, 1, 2, 3]
    reference = tmp_path / "reference"
    run(cli(assets, reference, "--identities", "ID_a", "--num_images_per_identity", "4"))
    assert pngs(output) == pngs(reference)


@pytest.mark.slow
def test_killed_run_resumes_to_the_full_set_without_duplicates(assets, tmp_path):
    output = tmp_path / "killed"
    argv = cli(
        assets,
        output,
        "--identities",
        "ID_a",
        "ID_b",
        "--num_images_per_identity",
        "8",
        "--batch_size",
        "2",
    )
    process = subprocess.Popen(
        [sys.executable, str(SCRIPT), *argv],
        env=subprocess_env(1),
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    deadline = time.monotonic() + 240
    try:
        while len(list(output.glob("*/*.png"))) < 3:
            assert process.poll() is None, "the run ended before it could be killed"
            assert time.monotonic() < deadline, "no images after 240 s"
            time.sleep(0.02)
    finally:  # SIGKILL: no handler, no cleanup, like a node failure or the OOM killer
        process.send_signal(signal.SIGKILL)
        process.wait()
    left = sorted(output.glob("*/*.png"))
    assert 3 <= len(left) < 16
    for path in left:  # whatever the kill left behind is complete
        assert inference.is_complete_png(path)
        with Image.open(path) as image:
            image.load()
    (output / "metadata.jsonl").write_text('{"identity": "ID_a", "index": 0}\n{"trunc')

    summary = run(argv)
    assert summary["written"] + summary["skipped"] == 16 and summary["failed"] == 0
    rows = metadata(output)
    assert len(rows) == 16 and len({(r["identity"], r["index"]) for r in rows}) == 16
    assert temp_files(output) == []
    reference = tmp_path / "uninterrupted"
    run(
        cli(
            assets,
            reference,
            "--identities",
            "ID_a",
            "ID_b",
            "--num_images_per_identity",
            "8",
            "--batch_size",
            "2",
        )
    )
    assert pngs(output) == pngs(reference)


@pytest.mark.parametrize("scheduler", ["ddpm", "euler"])  # sampling.Sampler / stock loop
def test_resume_samples_only_missing_images_byte_identical(
    assets, tmp_path, monkeypatch, scheduler
):
    """Batches of 4 over 3 x 5 images: [a0 a1 a2 a3] [a4 b0 b1 b2] [b3 b4 c0 c1] [c2 c3 c4].
    With a1, b1, c1, c3 deleted the old resume sampled all 15 rows again; batches of missing
    images only, each image at its original batch size and position, take 4 + 3 rows and
    write the uninterrupted run's bytes."""
    argv = ["--num_images_per_identity", "5", "--batch_size", "4", "--scheduler", scheduler]
    output = tmp_path / "out"
    run(cli(assets, output, *argv))
    full = pngs(output)
    deleted = ["ID_a/1.png", "ID_b/1.png", "ID_c/1.png", "ID_c/3.png"]
    for name in deleted:
        (output / name).unlink()
    sampled_rows = []
    real_generate_batch = inference.generate_batch

    def counting(pipeline, jobs, *rest, **kwargs):
        sampled_rows.append([(job.identity, job.index) for job in jobs])
        return real_generate_batch(pipeline, jobs, *rest, **kwargs)

    monkeypatch.setattr(inference, "generate_batch", counting)
    summary = run(cli(assets, output, *argv))
    assert summary["written"] == 4 and summary["skipped"] == 11
    assert pngs(output) == full  # pixels and the metadata inside (its original batch)
    assert [len(rows) for rows in sampled_rows] == [3, 4]
    assert {f"{name}/{index}.png" for rows in sampled_rows for name, index in rows} == set(deleted)


def test_missing_images_go_to_batches_at_their_original_size_and_position():
    batches = inference.make_batches(["a", "b"], 5, 4)  # sizes 4, 4, 2
    missing = [("a", 1), ("b", 0), ("a", 4), ("b", 3), ("b", 4)]
    work = [(batch, [job for job in batch if job in missing]) for batch in batches]
    resampled = inference.resample_batches([w for w in work if w[1]], failing=())
    # ("a", 1) sits at position 1 and ("a", 4) at position 0 of size-4 batches: one batch;
    # ("b", 0) at position 1 too: a second; ("b", 3), ("b", 4) fill the size-2 batch.
    assert [batch.rows for batch in resampled] == [
        (("b", 3), ("b", 4)),
        (("a", 4), ("a", 1), ("a", 4), ("a", 4)),
        (("b", 0), ("b", 0), ("b", 0), ("b", 0)),
    ]
    assert sorted(job for batch in resampled for job in batch.wanted) == sorted(missing)
    assert resampled[1].origin[("a", 1)] == batches[0]
    failing = inference.resample_batches([w for w in work if w[1]], failing={"b"})
    assert [batch.wanted for batch in failing[:2]] == [(("b", 0),), (("b", 3), ("b", 4))]
    assert failing[0].rows == failing[1].rows == ()  # counted as failed, never sampled
    # b's rows dropped, as the full run drops them: ("a", 4) is alone in its batch.
    assert [batch.rows for batch in failing[2:]] == [(("a", 4),), (("a", 1),) * 4]


@pytest.mark.slow
def test_two_processes_write_exactly_what_one_process_writes(assets, tmp_path):
    torchrun = Path(sys.executable).with_name("torchrun")
    assert torchrun.exists(), "torchrun ships with torch; the venv should have it"
    root = tmp_path / "loras"
    for name in ("ID_a", "ID_b"):
        shutil.copytree(assets["loras"] / name, root / name)
    (root / "ID_x").mkdir()  # no weights: fails on rank 1, the others go on
    # 3 identities x 2 images, batch 1 -> 6 batches: rank 0 gets a0 a1 b0, rank 1 b1 x0 x1,
    # so ID_b is split, and rank 1 starts on it with a fresh pipeline.
    common = ["--num_images_per_identity", "2", "--batch_size", "1"]
    argv = cli(assets, tmp_path / "two", *common)
    argv[argv.index("--lora_root") + 1] = str(root)
    completed = subprocess.run(
        [str(torchrun), "--standalone", "--nproc_per_node", "2", str(SCRIPT), *argv],
        env=subprocess_env(1),
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert completed.returncode == 1, completed.stderr[-3000:]  # a failed identity -> 1
    assert "[rank 1/2] ERROR identity 'ID_x': no LoRA weights" in completed.stderr
    assert '"written": 4, "skipped": 0, "failed": 2' in completed.stderr

    assert torch.get_num_threads() == 1  # as in torchrun's workers: CPU sums depend on it
    argv[argv.index("--output_dir") + 1] = str(tmp_path / "one")
    summary = run(argv)
    assert (summary["written"], summary["failed"]) == (4, 2)
    one_images, two_images = pngs(tmp_path / "one"), pngs(tmp_path / "two")
    assert len(one_images) == 4 and one_images == two_images
    one_lines = (tmp_path / "one" / "metadata.jsonl").read_bytes()
    assert one_lines == (tmp_path / "two" / "metadata.jsonl").read_bytes()
    assert json.loads((tmp_path / "two" / "run_config.json").read_text())["num_processes"] == 2


# ------------------------------------------------------------------------------ bad input


def test_missing_and_wrong_base_loras_fail_alone(assets, tmp_path, caplog):
    root = tmp_path / "loras"
    shutil.copytree(assets["loras"] / "ID_a", root / "ID_a")
    (root / "ID_x").mkdir()  # trained folder without weights
    shutil.copytree(assets["wrong_base"], root / "ID_w")
    argv = cli(assets, tmp_path / "out", "--num_images_per_identity", "2")
    argv[argv.index("--lora_root") + 1] = str(root)
    summary = run(argv)
    assert (summary["written"], summary["failed"]) == (2, 4)
    assert summary["failed_identities"] == ["ID_w", "ID_x"]
    assert sorted(pngs(tmp_path / "out")) == ["ID_a/0.png", "ID_a/1.png"]
    log = caplog.text
    assert "identity 'ID_x': no LoRA weights at" in log
    assert "identity 'ID_w'" in log and "different base" in log and "attn2.to_k" in log


def test_a_lora_that_fails_to_load_mid_run_fails_only_its_identity(assets, tmp_path, monkeypatch):
    read = inference.read_lora_file

    def read_or_fail(folder):
        if folder.name == "ID_b":  # e.g. the file was replaced after the header check
            raise OSError(5, "Input/output error")
        return read(folder)

    monkeypatch.setattr(inference, "read_lora_file", read_or_fail)
    argv = ["--num_images_per_identity", "3", "--batch_size", "4"]
    summary = run(cli(assets, tmp_path / "out", *argv))
    assert (summary["written"], summary["failed"]) == (6, 3)
    assert summary["failed_identities"] == ["ID_b"]
    assert sorted(pngs(tmp_path / "out")) == [
        f"{n}/{i}.png" for n in ("ID_a", "ID_c") for i in range(3)
    ]
    monkeypatch.setattr(inference, "read_lora_file", read)
    assert run(cli(assets, tmp_path / "out", *argv))["written"] == 3  # the rerun fills ID_b


def _broken_lora(source: Path, target: Path, change) -> None:
    """A copy of a LoRA folder whose tensors and metadata went through `change`."""
    from safetensors import safe_open
    from safetensors.torch import save_file

    target.mkdir(parents=True)
    with safe_open(str(source / LORA_WEIGHTS_NAME), framework="pt") as handle:
        tensors = {key: handle.get_tensor(key) for key in handle.keys()}  # noqa: SIM118
        metadata = handle.metadata()
    tensors, metadata = change(tensors, metadata)
    save_file(tensors, str(target / LORA_WEIGHTS_NAME), metadata=metadata)


def test_bad_lora_files_fail_only_their_identity_and_nothing_black_is_written(
    assets, tmp_path, caplog
):
    """Malformed metadata, NaN, integer or huge tensors: each fails its own identity with one
    line naming it; the good identity in the same batches is written, nothing else is."""
    root = tmp_path / "loras"
    shutil.copytree(assets["loras"] / "ID_a", root / "ID_a")
    source = assets["loras"] / "ID_b"

    def metadata_list(tensors, metadata):
        return tensors, {**metadata, "lora_adapter_metadata": "[4]"}

    def alpha_text(tensors, metadata):
        return tensors, {**metadata, "lora_adapter_metadata": '{"unet.lora_alpha": "4"}'}

    def nan(tensors, metadata):
        return {k: torch.full_like(v, float("nan")) for k, v in tensors.items()}, metadata

    def integer(tensors, metadata):
        return {k: v.to(torch.int32) for k, v in tensors.items()}, metadata

    def huge(tensors, metadata):  # finite weights whose images are NaN/inf
        return {k: v * 1e18 for k, v in tensors.items()}, metadata

    for change in (metadata_list, alpha_text, nan, integer, huge):
        _broken_lora(source, root / f"ID_{change.__name__}", change)
    argv = cli(assets, tmp_path / "out", "--num_images_per_identity", "2", "--batch_size", "3")
    argv[argv.index("--lora_root") + 1] = str(root)
    genders = tmp_path / "genders.csv"
    genders.write_text("identity,gender\n" + "".join(f"{p.name},f\n" for p in root.iterdir()))
    argv[argv.index("--identity_attributes") + 1] = str(genders)
    summary = run(argv)
    broken = sorted(f"ID_{c}" for c in ("metadata_list", "alpha_text", "nan", "integer", "huge"))
    assert summary["failed_identities"] == broken
    assert (summary["written"], summary["failed"]) == (2, 10)
    assert sorted(pngs(tmp_path / "out")) == ["ID_a/0.png", "ID_a/1.png"]
    errors = [r.message for r in caplog.records if r.levelname == "ERROR"]
    for name, words in {
        "ID_metadata_list": "JSON list",
        "ID_alpha_text": "lora_alpha must be a number",
        "ID_nan": "NaN/inf",
        "ID_integer": "must be floats",
        "ID_huge": "non-finite latents or pixels",
    }.items():
        assert any(name in e and words in e and "\n" not in e for e in errors), name


@pytest.mark.parametrize(
    "flag, value", [("--lora_scale", "1e30"), ("--guidance_scale", "1e30"), ("--lora_scale", "-1")]
)
def test_absurd_scales_are_refused_at_parse_time(assets, tmp_path, flag, value):
    with pytest.raises(ValueError, match=f"{flag} must be"):
        inference.parse_args(cli(assets, tmp_path / "out", flag, value))


def test_non_finite_samples_are_flagged_before_postprocessing_blacks_them(assets):
    from sampling import decode_checked, finite_rows

    args = inference.parse_args(cli(assets, Path("unused")))
    pipeline = inference.load_generation_pipeline(args)
    latents = torch.zeros(3, 4, 8, 8)
    latents[1, 0, 2, 3] = float("nan")
    latents[2, 1, 0, 0] = float("inf")
    images, _, finite = decode_checked(pipeline, latents)
    assert finite == [True, False, False] and len(images) == 3
    assert finite_rows(torch.ones(2, 3), torch.tensor([[1.0], [float("-inf")]])) == [True, False]


def test_unknown_scheduler_lists_the_options(assets, tmp_path):
    with pytest.raises(ValueError, match="unknown --scheduler 'heunx'") as error:
        inference.parse_args(cli(assets, tmp_path, "--scheduler", "heunx"))
    for name in ("ddpm", "ddim", "dpmsolver++", "euler_a", "pndm", "unipc"):
        assert name in str(error.value)


def test_unknown_placeholder_fails_at_parse_time(assets, tmp_path):
    with pytest.raises(ValueError, match=r"--prompt_template .*\{age\}"):
        inference.parse_args(cli(assets, tmp_path, "--prompt_template", "{age} {gender}"))
    with pytest.raises(ValueError, match="malformed"):
        inference.parse_args(cli(assets, tmp_path, "--prompt_template", "photo of {gender"))
    with pytest.raises(ValueError, match="must not contain"):
        inference.parse_args(
            cli(assets, tmp_path, "--prompt_template_no_background", "{background} x")
        )


@pytest.fixture
def no_model_load(monkeypatch):
    """Fail the test if the base model gets loaded (input errors must come first)."""

    def forbidden(args):
        raise AssertionError("the base model was loaded before the input was validated")

    monkeypatch.setattr(inference, "load_generation_pipeline", forbidden)


def test_attribute_file_missing_identities_lists_them_all(assets, tmp_path, no_model_load):
    partial = tmp_path / "genders.json"
    partial.write_text(json.dumps({"ID_b": {"gender": "female"}}))
    argv = cli(assets, tmp_path / "out", "--identity_attributes", str(partial))
    with pytest.raises(ValueError, match=r"no gender for 2 identities: ID_a, ID_c"):
        run(argv)
    partial.write_text(json.dumps({"ID_a": "male", "ID_b": "female", "ID_c": "robot"}))
    with pytest.raises(ValueError, match=r"unknown gender values ID_c='robot'"):
        run(argv)
    assert not (tmp_path / "out" / "ID_a").exists()


def test_a_base_folder_without_unet_is_named_not_blamed_on_config_json(assets, tmp_path):
    base = tmp_path / "sd"
    shutil.copytree(assets["model"], base)
    shutil.rmtree(base / "unet")
    argv = cli(assets, tmp_path / "out")
    argv[argv.index("--pretrained_model_name_or_path") + 1] = str(base)
    with pytest.raises(FileNotFoundError, match=r"incomplete: missing unet/config\.json"):
        inference.parse_args(argv)


def test_unwritable_output_dir_is_reported_before_loading(assets, tmp_path, no_model_load):
    a_file = tmp_path / "file.txt"
    a_file.write_text("not a folder")
    for target in (a_file, a_file / "sub"):
        with pytest.raises(ValueError, match=r"--output_dir .* is not a writable folder"):
            run(cli(assets, target))


def test_changed_settings_refuse_to_mix_into_existing_output(assets, tmp_path):
    root = tmp_path / "loras"
    shutil.copytree(assets["loras"] / "ID_a", root / "ID_a" / "checkpoint-100")
    argv = cli(assets, tmp_path / "out", "--num_images_per_identity", "1", "--checkpoint", "latest")
    argv[argv.index("--lora_root") + 1] = str(root)
    run(argv)
    with pytest.raises(ValueError, match=r"guidance_scale: 5.0 -> 7.5"):
        run([*argv, "--guidance_scale", "7.5"])
    with pytest.raises(ValueError, match=r"background_sampling: 'balanced' -> 'independent'"):
        run([*argv, "--background_sampling", "independent"])
    config = json.loads((tmp_path / "out" / "run_config.json").read_text())
    assert config["generation"]["background_sampling"] == "balanced"
    assert metadata(tmp_path / "out")[0]["background_sampling"] == "balanced"
    summary = run([*argv, "--num_images_per_identity", "2"])
    assert (summary["written"], summary["skipped"]) == (1, 1)  # extending is fine
    shutil.copytree(root / "ID_a" / "checkpoint-100", root / "ID_a" / "checkpoint-200")
    before = pngs(tmp_path / "out")
    summary = run(argv)  # 'latest' now means another file: ID_a's images are refused
    assert summary["failed_identities"] == ["ID_a"] and summary["written"] == 0
    assert pngs(tmp_path / "out") == before


def test_images_of_a_lora_retrained_at_the_same_path_are_refused_not_kept(assets, tmp_path, caplog):
    """The run config records each LoRA's sha256: a LoRA retrained in place fails its
    identity (one line naming it; its images are neither kept as done nor mixed), the other
    identities go on, and --overwrite regenerates it."""
    root = tmp_path / "loras"
    for name in ("ID_a", "ID_b"):
        shutil.copytree(assets["loras"] / name, root / name)
    argv = cli(assets, tmp_path / "out", "--num_images_per_identity", "2")
    argv[argv.index("--lora_root") + 1] = str(root)
    run(argv)
    config = json.loads((tmp_path / "out" / "run_config.json").read_text())
    recorded = config["lora_files"]["ID_a"]["sha256"]
    assert recorded == fileio.file_sha256(root / "ID_a" / LORA_WEIGHTS_NAME)
    assert metadata(tmp_path / "out")[0]["lora_sha256"] == recorded
    before = pngs(tmp_path / "out")

    shutil.copy(assets["loras"] / "ID_c" / LORA_WEIGHTS_NAME, root / "ID_a" / LORA_WEIGHTS_NAME)
    summary = run([*argv, "--num_images_per_identity", "3"])
    assert summary["failed_identities"] == ["ID_a"] and summary["failed"] == 3
    assert summary["written"] == 1  # ID_b's third image
    assert {k: v for k, v in pngs(tmp_path / "out").items() if "ID_a" in k} == {
        k: v for k, v in before.items() if "ID_a" in k
    }
    line = next(r.message for r in caplog.records if "made by another LoRA" in r.message)
    assert "ID_a" in line and "sha256" in line and "--overwrite" in line and "\n" not in line
    config = json.loads((tmp_path / "out" / "run_config.json").read_text())
    assert config["lora_files"]["ID_a"]["sha256"] == recorded  # still what made its images
    assert run(argv)["failed_identities"] == ["ID_a"]  # refused again, never accepted silently

    summary = run([*argv, "--overwrite"])
    assert summary["failed"] == 0 and summary["written"] == 4
    config = json.loads((tmp_path / "out" / "run_config.json").read_text())
    assert config["lora_files"]["ID_a"]["sha256"] != recorded


def test_a_gender_changed_in_the_attributes_file_refuses_that_identitys_images(
    assets, tmp_path, caplog
):
    """Prompts say the gender the attributes file gives: editing it in place (same path) fails
    that identity's images (one line; none made with the new gender beside the old), the other
    identities go on, and --overwrite regenerates them."""
    root = tmp_path / "loras"
    for name in ("ID_a", "ID_b"):
        shutil.copytree(assets["loras"] / name, root / name)
    genders = tmp_path / "genders.csv"
    genders.write_text("identity,gender\nID_a,male\nID_b,female\n")
    argv = cli(assets, tmp_path / "out", "--num_images_per_identity", "2")
    argv[argv.index("--lora_root") + 1] = str(root)
    argv[argv.index("--identity_attributes") + 1] = str(genders)
    run(argv)
    config = json.loads((tmp_path / "out" / "run_config.json").read_text())
    assert config["lora_files"]["ID_a"]["gender"] == "male"

    genders.write_text("identity,gender\nID_a,female\nID_b,female\n")
    (tmp_path / "out" / "ID_a" / "1.png").unlink()
    summary = run(argv)
    assert summary["failed_identities"] == ["ID_a"] and summary["written"] == 0
    assert not (tmp_path / "out" / "ID_a" / "1.png").exists()
    line = next(r.message for r in caplog.records if "another LoRA or gender" in r.message)
    assert "gender: 'male' -> 'female'" in line and "\n" not in line
    summary = run([*argv, "--overwrite"])
    assert summary["failed"] == 0 and summary["written"] == 4
    assert {record["gender"] for record in metadata(tmp_path / "out")} == {"female"}


def test_other_argument_errors(assets, tmp_path):
    checkpoint = tmp_path / "ID_1" / "checkpoint-6400"
    checkpoint.mkdir(parents=True)
    argv = cli(assets, tmp_path / "out")
    lora_root = argv.index("--lora_root")
    with pytest.raises(ValueError, match="--lora_dir .*ID_1 and --checkpoint checkpoint-6400"):
        inference.parse_args(
            argv[:lora_root] + ["--lora_dir", str(checkpoint)] + argv[lora_root + 2 :]
        )
    with pytest.raises(FileNotFoundError, match="missing.txt"):
        inference.parse_args(argv + ["--backgrounds", str(tmp_path / "missing.txt")])
    with pytest.raises(ValueError, match="--grid_dir"):
        inference.parse_args(argv + ["--grid_dir", str(tmp_path / "out" / "grids")])
    with pytest.raises(ValueError, match="--resolution must be a multiple of 8"):
        inference.parse_args(argv + ["--resolution", "60"])


# ------------------------------------------------------------------- smaller pure pieces


def test_backgrounds_file_and_checkpoint_choice(tmp_path):
    listing = tmp_path / "backgrounds.txt"
    listing.write_text("# mine\nforest\n\nrainy street\n")
    assert prompts.resolve_backgrounds([str(listing)]) == ["forest", "rainy street"]
    assert prompts.resolve_backgrounds(["a", "b"]) == ["a", "b"]
    for step in (400, 6400, 800):
        (tmp_path / "ID" / f"checkpoint-{step}").mkdir(parents=True)
    chosen = inference.resolve_checkpoint(tmp_path / "ID", "latest")
    assert chosen.name == "checkpoint-6400"


def test_latest_checkpoint_of_a_folder_without_one_names_the_folder(tmp_path):
    (tmp_path / "ID").mkdir()
    assert inference.resolve_checkpoint(tmp_path / "ID", "latest") is None
    source = inference._identity_source(tmp_path / "ID", "latest")
    assert f"no checkpoint in {tmp_path / 'ID'}" in source.error
    assert "<none found>" not in source.error and "\n" not in source.error


def test_attributes_csv_json_and_training_config_fallback(tmp_path):
    sources = [lora.IdentitySource(n, tmp_path / n, None) for n in ("A", "B", "C")]
    (tmp_path / "C").mkdir()
    (tmp_path / "C" / "training_config.json").write_text(json.dumps({"gender": "Female"}))
    table = tmp_path / "attributes.csv"
    table.write_text("identity,age,gender\nA,30,M\nB,41,female\n")
    assert inference.resolve_genders(sources, table) == {"A": "male", "B": "female", "C": "female"}
    records = tmp_path / "attributes.json"
    records.write_text(
        json.dumps([{"identity": "A", "gender": "man"}, {"identity": "B", "gender": "f"}])
    )
    assert inference.resolve_genders(sources, records)["A"] == "male"
    duplicated = tmp_path / "dup.csv"
    duplicated.write_text("identity,gender\nA,male\nA,female\n")
    with pytest.raises(ValueError, match="more than one row"):
        inference.resolve_genders(sources, duplicated)


def test_png_completeness_and_metadata_rebuild(tmp_path):
    folder = tmp_path / "ID_a"
    folder.mkdir()
    image = Image.new("RGB", (8, 8), "red")
    for index in range(3):
        record = {"identity": "ID_a", "index": index}
        fileio.atomic_write_bytes(
            folder / f"{index}.png", fileio.encode_png_with_record(image, record)
        )
    data = (folder / "2.png").read_bytes()
    (folder / "2.png").write_bytes(data[: len(data) - 5])  # truncated by something else
    (folder / ".3.png.k1x9q2_z.tmp").write_bytes(data[:10])  # a killed writer's temp
    assert [inference.is_complete_png(folder / f"{i}.png") for i in range(3)] == [True, True, False]
    (tmp_path / "metadata.jsonl").write_text('{"identity": "ID_a", "index": 0}\n' * 3)
    assert inference.rebuild_metadata(tmp_path) == 2
    assert [r["index"] for r in metadata(tmp_path)] == [0, 1]
    assert inference.remove_stale_temps(folder, {"4.png"}) == 0
    assert inference.remove_stale_temps(folder, {"3.png"}) == 1


# --------------------------------------------------------------------- reruns and paths


def test_a_failed_start_does_not_block_the_corrected_rerun(assets, tmp_path):
    """A wrong base model path fails before any image exists: the fixed command runs."""
    broken = tmp_path / "broken_sd"
    shutil.copytree(assets["model"], broken)
    for weights in (broken / "unet").glob("*.safetensors"):
        weights.write_bytes(b"not a safetensors file")
    argv = cli(assets, tmp_path / "out", "--num_images_per_identity", "1")
    bad = [*argv]
    bad[bad.index("--pretrained_model_name_or_path") + 1] = str(broken)
    with pytest.raises(ValueError, match="could not load the Stable Diffusion pipeline"):
        run(bad)
    summary = run(argv)
    assert summary["written"] == 3 and summary["failed"] == 0


@pytest.mark.parametrize("name", ["../ID_a", "/tmp/ID_a", "ID_a/..", "a/b", "..", ""])
def test_identity_names_are_single_folder_names(assets, tmp_path, name):
    with pytest.raises(ValueError, match="is not an identity name"):
        inference.parse_args(cli(assets, tmp_path / "out", "--identities", name))


def test_output_dir_inside_the_lora_root_is_refused(assets):
    with pytest.raises(ValueError, match="overlap"):
        inference.parse_args(cli(assets, assets["loras"] / "generated"))


def test_fp16_generation_runs_on_the_cpu(assets, tmp_path, capfd):
    argv = cli(assets, tmp_path / "fp16", "--num_images_per_identity", "1", "--identities", "ID_a")
    argv[argv.index("--mixed_precision") + 1] = "fp16"
    capfd.readouterr()
    summary = run(argv)
    # A healthy run raises no warning: diffusers' to() warns on every cast about an empty
    # list of fp32-only modules.
    assert "should be kept in float32" not in capfd.readouterr().err
    assert summary["written"] == 1
    image = pixels(tmp_path / "fp16" / "ID_a" / "0.png")
    assert image.std() > 0  # not a blank (NaN-decoded) image
    assert metadata(tmp_path / "fp16")[0]["mixed_precision"] == "fp16"
