"""train_ID-Booth.py on a tiny random SD-2.1-shaped pipeline, a random IResNet-18 and real faces.

Inputs: training_assets.py. Runs go through the real command line or the script's main() in
this process (to save start-up time); the step and the trainer's parts: test_trainer.py.
"""

from __future__ import annotations

import argparse
import copy
import json
import logging
import os
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from conftest import fake_base_model
from PIL import Image
from safetensors.torch import load_file
from training_assets import (
    REPO_ROOT,
    RESOLUTION,
    SCRIPT,
    Assets,
    assert_same_lora,
    cli,
    lora_weights,
    make_assets,
    run_cli,
    train,
)

import fileio
import runs
import trainer

pytestmark = pytest.mark.usefixtures("one_torch_thread")


@pytest.fixture(scope="module")
def assets(tmp_path_factory) -> Assets:
    return make_assets(tmp_path_factory.mktemp("train_assets"))


# ============================================================================ arguments


def test_every_flag_has_help_and_defaults_are_the_reference_setup(assets, monkeypatch):
    # The hub id is not cached.
    monkeypatch.setattr(runs, "check_base_model", lambda name, variant=None: None)
    parser = train.build_parser()
    for action in parser._actions:
        if action.dest != "help":
            assert action.help, f"{action.option_strings} has no help text"
    args = train.parse_args(
        [f"--instance_data_dir={assets.identity('hanks')}", f"--arcface_weights={assets.arcface}"]
        + [f"--class_data_dir={assets.class_dir}"]
    )
    reference = {
        "pretrained_model_name_or_path": "stabilityai/stable-diffusion-2-1-base",
        "loss": "triplet",
        "triplet_margin": 1.0,
        "identity_loss_weighting": "timestep",
        "rank": 4,
        "lora_alpha": 4,
        "instance_prompt": "photo of sks person",
        "class_prompt": "photo of a person",
        "with_prior_preservation": True,
        "prior_loss_weight": 1.0,
        "num_class_images": 200,
        "resolution": 512,
        "center_crop": False,
        "train_batch_size": 1,
        "num_train_epochs": 32,
        "max_train_steps": None,
        "learning_rate": 1e-4,
        "lr_scheduler": "cosine",
        "lr_warmup_steps": 0,
        "adam_beta1": 0.9,
        "adam_beta2": 0.999,
        "adam_weight_decay": 1e-2,
        "adam_epsilon": 1e-8,
        "max_grad_norm": 1.0,
        "mixed_precision": "fp16",
        "allow_tf32": True,
        "seed": 0,
        "report_to": "tensorboard",
        # class images and validation as the reference's script makes them
        "sample_batch_size": 1,
        "class_image_format": "jpeg",
        "class_num_inference_steps": 50,
        "validation_prompt": "photo of sks person with blue hair",
        "validation_negative_prompt": "",
        "num_validation_images": 4,
        "validation_num_inference_steps": 50,
        "validation_guidance_scale": 7.5,
    }
    assert {key: getattr(args, key) for key in reference} == reference


def _bad_cases(assets: Assets, tmp: Path) -> dict[str, tuple[list[str], type, str]]:
    """name -> (flags replacing the good ones, exception, words of the message)."""
    hanks = f"--instance_data_dir={assets.identity('hanks')}"
    (tmp / "a_file").write_text("not a folder")
    nested, above = tmp / "nested", tmp / "above"
    for name in ("ID_1", "ID_2"):
        (nested / name / "session_1").mkdir(parents=True, exist_ok=True)
    (nested / "ID_2" / "02.jpg").write_bytes(b"")  # photos directly inside: not nested
    above.mkdir(exist_ok=True)
    if not (above / "tufts").exists():
        (above / "tufts").symlink_to(assets.identities, target_is_directory=True)
    incomplete = tmp / "sd-without-vae"
    if not incomplete.exists():
        shutil.copytree(assets.sd, incomplete, ignore=shutil.ignore_patterns("vae"))
    return {
        "rank 0": ([hanks, "--rank=0"], ValueError, "--rank must be >= 1"),
        "output dir is a file": (
            [hanks, f"--output_dir={tmp / 'a_file'}"],
            ValueError,
            "is a file",
        ),
        "base model lacks the vae": (
            [hanks, f"--pretrained_model_name_or_path={incomplete}"],
            FileNotFoundError,
            "missing vae/config.json",
        ),
        "base model folder missing": (
            [hanks, f"--pretrained_model_name_or_path={tmp / 'nowhere'}"],
            FileNotFoundError,
            "does not exist",
        ),
        "resume checkpoint missing": (
            [hanks, "--resume_from_checkpoint=checkpoint-7"],
            FileNotFoundError,
            "checkpoint checkpoint-7 not found",
        ),
        "identity loss without ArcFace": (
            [hanks, "--loss=identity", "--arcface_weights="],
            ValueError,
            "needs --arcface_weights",
        ),
        "both identity sources": (
            [hanks, f"--identities_root={assets.identities}"],
            ValueError,
            "exactly one of --instance_data_dir",
        ),
        "no identity source": ([], ValueError, "exactly one of --instance_data_dir"),
        "triplet without class images": (
            [hanks, "--no-with_prior_preservation"],
            ValueError,
            "negatives from the class images",
        ),
        "overwrite and resume": (
            [hanks, "--overwrite", "--resume_from_checkpoint=latest"],
            ValueError,
            "cannot be combined",
        ),
        "resolution not a multiple of 8": (
            [hanks, "--resolution=60"],
            ValueError,
            "multiple of 8",
        ),
        "identity folder missing": (
            [f"--instance_data_dir={tmp / 'nobody'}"],
            FileNotFoundError,
            "does not exist",
        ),
        "absolute logging dir": (
            [hanks, f"--logging_dir={tmp / 'shared_logs'}"],
            ValueError,
            "one TensorBoard folder per identity",
        ),
        "logging dir out of the output": (
            [hanks, "--logging_dir=../logs"],
            ValueError,
            "must be a folder path inside each identity's output",
        ),
        "adam epsilon that is 0 in fp32": (
            [hanks, "--adam_epsilon=1e-50"],
            ValueError,
            "--adam_epsilon must be >= 1.17549e-38",
        ),
        "absurd step count": (
            [hanks, "--max_train_steps=1000000000"],
            ValueError,
            "--max_train_steps must be >= 1 and <= 1e",
        ),
        "absurd validation guidance": (
            [hanks, "--validation_guidance_scale=1e30"],
            ValueError,
            "--validation_guidance_scale must be >= 0 and <= 100",
        ),
        "a root of identities as one identity": (
            [f"--instance_data_dir={assets.identities}"],
            ValueError,
            "holds identity folders, not photos: pass --identities_root",
        ),
        "identity photos in subfolders": (
            [f"--identities_root={nested}"],
            ValueError,
            r"1 identity folders hold no photos \(ID_1\); .*ID_1 holds only subfolders "
            r"\(session_1\)",
        ),
        "a folder above the identities": (
            [f"--identities_root={above}"],
            ValueError,
            f"pass --identities_root {above / 'tufts'}",
        ),
    }


@pytest.mark.parametrize(
    "case",
    [
        "rank 0",
        "output dir is a file",
        "base model lacks the vae",
        "base model folder missing",
        "resume checkpoint missing",
        "identity loss without ArcFace",
        "both identity sources",
        "no identity source",
        "triplet without class images",
        "overwrite and resume",
        "resolution not a multiple of 8",
        "identity folder missing",
        "absurd validation guidance",
        "absurd step count",
        "adam epsilon that is 0 in fp32",
        "absolute logging dir",
        "logging dir out of the output",
        "a root of identities as one identity",
        "identity photos in subfolders",
        "a folder above the identities",
    ],
)
def test_bad_flags_fail_right_after_parsing(assets, tmp_path, case):
    flags, error, words = _bad_cases(assets, tmp_path)[case]
    argv = cli(assets, tmp_path / "out") + flags
    if "--arcface_weights=" in flags:  # drop the weights entirely
        argv = [flag for flag in argv if not flag.startswith("--arcface_weights")]
    with pytest.raises(error, match=words):
        train.parse_args(argv)


# ============================================================================ the training step


# ============================================================================ full runs


def expected_identity_samples(steps: int, num_items: int, faceless_class_rows: set) -> list:
    """Cumulative count of instance samples with the triplet term after each step (batch 1):
    item i pairs with class row i % num_items; the trainer's epoch order is randperm seeded by
    stable_seed(0, "order", epoch)."""
    counts, total, epoch = [], 0, 0
    while len(counts) < steps:
        generator = torch.Generator().manual_seed(fileio.stable_seed(0, "order", epoch))
        for item in torch.randperm(num_items, generator=generator).tolist()[: steps - len(counts)]:
            total += item % num_items not in faceless_class_rows
            counts.append(total)
        epoch += 1
    return counts


@pytest.fixture(scope="module")
def triplet_run(assets):
    """The real command line: 4 triplet steps; 1 of 3 class images is sampled (faceless)."""
    output = assets.root / "triplet-run"
    class_dir = assets.root / "class-triplet"
    shutil.copytree(assets.class_dir, class_dir)
    flags = cli(
        assets,
        output,
        f"--instance_data_dir={assets.identity('hanks')}",
        "--num_class_images=3",
        "--max_train_steps=4",
        "--checkpointing_steps=2",
        "--validation_steps=2",
        class_dir=class_dir,
    )
    result = run_cli([sys.executable, str(SCRIPT), *flags])
    return output, class_dir, flags, result


def _scalars(log_dir: Path) -> dict[str, list[tuple[int, float]]]:
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    events = EventAccumulator(str(log_dir))
    events.Reload()
    return {
        tag: [(e.step, e.value) for e in events.Scalars(tag)] for tag in events.Tags()["scalars"]
    }


def test_triplet_run_writes_every_output(triplet_run):
    output, class_dir, flags, result = triplet_run
    keys = lora_weights(output).keys()
    assert keys and all(k.startswith("unet.") and ".lora" in k for k in keys)
    for step in (2, 4):
        checkpoint = output / f"checkpoint-{step}"
        assert (checkpoint / train.LORA_WEIGHTS_NAME).is_file()
        assert (checkpoint / trainer.TRAINING_STATE_NAME).is_file()
        for index in (0,):
            image = Image.open(output / "validation" / f"step_{step}_{index}.png")
            assert image.size == (RESOLUTION, RESOLUTION)

    config = json.loads((output / trainer.CONFIG_NAME).read_text())
    assert config["status"] == "finished" and config["global_step"] == 4
    assert config["args"]["loss"] == "triplet" and config["args"]["num_class_images"] == 3
    assert {"torch", "diffusers", "transformers", "peft", "accelerate"} <= set(config["versions"])
    # The sampled class image has no face: it stays a prior sample (3 steps per epoch, as the
    # reference's max(#instance, #class)) and is reported, not skipped.
    assert config["data"]["class_images"] == 3
    assert config["data"]["class_images_with_face"] == 2
    assert config["data"]["class_images_without_face"] == 1
    assert config["data"]["classes_skipped"] == {}
    assert config["resolved"]["steps_per_epoch"] == 3
    # Only instance samples paired with a class image that has a face get the triplet term.
    with_term = expected_identity_samples(steps=4, num_items=3, faceless_class_rows={0})
    assert config["identity_samples"] == with_term[-1] < 4
    card = (output / "README.md").read_text()
    assert "load_lora_weights" in card and str(flags[0].split("=", 1)[1]) in card

    generated = class_dir / "class_00000.jpg"  # the reference's format (JPEG, quality 75)
    assert Image.open(generated).size == (RESOLUTION, RESOLUTION)
    assert Image.open(generated).format == "JPEG"
    assert config["args"]["class_image_format"] == "jpeg"
    assert config["data"]["class_image_formats"] == {"jpg": 1, "png": 2}
    assert generated.stat().st_mode & 0o044, "outputs must not be private temp-file modes"

    scalars = _scalars(output / "logs")
    for tag in ("diffusion_loss", "prior_loss", "triplet_loss", "identity_weight", "lr"):
        assert [step for step, _ in scalars[f"train/{tag}"]] == [1, 2, 3, 4], tag
    assert [value for _, value in scalars["train/identity_samples"]] == with_term
    per_step = np.diff([0, *with_term]).tolist()
    assert [value for _, value in scalars["train/identity_samples_per_batch"]] == per_step
    # A step without the term logs 0 for it; steps with it a positive triplet loss.
    triplet = [value for _, value in scalars["train/triplet_loss"]]
    assert all((value > 0) == bool(count) for value, count in zip(triplet, per_step, strict=True))
    assert len(scalars["epoch/triplet_loss"]) == 2  # 3 steps per epoch (max(2 inst, 3 class))
    assert "triplet_loss=" in result.stderr  # tqdm postfix


def test_saved_lora_changes_a_fresh_stock_pipeline(assets, triplet_run):
    from diffusers import StableDiffusionPipeline

    output = triplet_run[0]

    def generate(pipeline) -> np.ndarray:
        generator = torch.Generator().manual_seed(0)
        result = pipeline(
            "photo of sks person",
            num_inference_steps=2,
            generator=generator,
            output_type="np",
            height=RESOLUTION,
            width=RESOLUTION,
        )
        return result.images[0]

    pipeline = StableDiffusionPipeline.from_pretrained(str(assets.sd))
    pipeline.set_progress_bar_config(disable=True)
    base = generate(pipeline)
    pipeline.load_lora_weights(str(output))
    assert np.abs(generate(pipeline) - base).max() > 1e-3


def test_killed_run_resumes_to_the_same_weights(triplet_run, tmp_path):
    output, _, flags, _ = triplet_run
    resumed = tmp_path / "resumed"
    resumed.mkdir()
    # What a run killed after step 2 leaves behind: its checkpoint-2 (and a half-written temp).
    shutil.copytree(output / "checkpoint-2", resumed / "checkpoint-2")
    (resumed / ".checkpoint-3-abandoned").mkdir()
    argv = [f for f in flags if not f.startswith("--output_dir")] + [f"--output_dir={resumed}"]

    with pytest.raises(ValueError, match="resume_from_checkpoint latest"):
        train.main(train.parse_args(argv))  # would silently redo the killed run's steps

    summary = train.main(train.parse_args([*argv, "--resume_from_checkpoint=latest"]))
    assert [run["steps"] for run in summary["trained"]] == [4]
    assert not (resumed / ".checkpoint-3-abandoned").exists()
    assert_same_lora(output, resumed)
    assert_same_lora(output / "checkpoint-4", resumed / "checkpoint-4")
    state = torch.load(resumed / "checkpoint-4" / trainer.TRAINING_STATE_NAME, weights_only=True)
    uninterrupted = json.loads((output / trainer.CONFIG_NAME).read_text())["identity_samples"]
    assert state["global_step"] == 4 and state["identity_samples"] == uninterrupted

    (resumed / train.LORA_WEIGHTS_NAME).unlink()
    changed = [*argv, "--resume_from_checkpoint=checkpoint-2", "--rank=8"]
    with pytest.raises(ValueError, match="trained with other settings"):
        train.main(train.parse_args(changed))
    changed = [*argv, "--resume_from_checkpoint=checkpoint-2", "--triplet_margin=0.5"]
    with pytest.raises(ValueError, match=r"triplet_margin: 1\.0 -> 0\.5.*--overwrite"):
        train.main(train.parse_args(changed))


def test_resume_refuses_a_setting_nobody_listed(triplet_run, tmp_path, monkeypatch):
    """Resume checks fail safe: a flag the checkpoint does not know (here one added to the
    parser after it was written) must match like any flag outside RESUME_MAY_CHANGE."""
    output, _, flags, _ = triplet_run
    resumed = tmp_path / "resumed"
    resumed.mkdir()
    shutil.copytree(output / "checkpoint-2", resumed / "checkpoint-2")
    argv = [f for f in flags if not f.startswith("--output_dir")] + [f"--output_dir={resumed}"]
    build_parser = train.build_parser

    def parser_with_a_new_flag():
        parser = build_parser()
        parser.add_argument("--new_knob", type=float, default=0.5, help="Added later.")
        return parser

    monkeypatch.setattr(train, "build_parser", parser_with_a_new_flag)
    with pytest.raises(ValueError, match=r"new_knob: '<not set>' -> 0\.5"):
        train.main(train.parse_args([*argv, "--resume_from_checkpoint=latest"]))
    # Paths, intervals and logging may change: the same run resumes with new ones.
    assert (
        "logging_steps" in trainer.RESUME_MAY_CHANGE
        and "learning_rate" not in trainer.RESUME_MAY_CHANGE
    )


def test_a_checkpoint_from_before_class_image_format_resumes(triplet_run, tmp_path):
    """Checkpoints written when class images were PNG and the flag did not exist resume: the
    class images are compared by content, so their file format may change."""
    output, _, flags, _ = triplet_run
    resumed = tmp_path / "resumed"
    resumed.mkdir()
    shutil.copytree(output / "checkpoint-2", resumed / "checkpoint-2")
    config_path = resumed / "checkpoint-2" / trainer.CONFIG_NAME
    config = json.loads(config_path.read_text())
    del config["args"]["class_image_format"], config["data"]["class_image_formats"]
    config_path.write_text(json.dumps(config))
    argv = [f for f in flags if not f.startswith("--output_dir")] + [f"--output_dir={resumed}"]
    train.main(train.parse_args([*argv, "--resume_from_checkpoint=latest"]))
    assert json.loads((resumed / trainer.CONFIG_NAME).read_text())["global_step"] == 4


@pytest.mark.slow
def test_sigkilled_process_resumes_to_the_same_weights(triplet_run, tmp_path):
    """A real kill: the CLI is SIGKILLed after checkpoint-2, then resumed with `latest`."""
    import signal
    import time

    output, _, flags, _ = triplet_run
    killed = tmp_path / "killed"
    argv = [f for f in flags if not f.startswith("--output_dir")] + [f"--output_dir={killed}"]
    env = dict(os.environ, OMP_NUM_THREADS="1", MKL_NUM_THREADS="1", HF_HUB_OFFLINE="1")
    process = subprocess.Popen(
        [sys.executable, str(SCRIPT), *argv],
        cwd=REPO_ROOT,
        env=env,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    deadline = time.monotonic() + 240
    while not (killed / "checkpoint-2").is_dir() and time.monotonic() < deadline:
        assert process.poll() is None, "the run ended before it could be killed"
        time.sleep(0.05)
    assert process.poll() is None, "the run finished before it could be killed"
    process.send_signal(signal.SIGKILL)
    process.wait()
    assert not (killed / train.LORA_WEIGHTS_NAME).exists()

    run_cli([sys.executable, str(SCRIPT), *argv, "--resume_from_checkpoint=latest"])
    assert_same_lora(output, killed)
    assert_same_lora(output / "checkpoint-4", killed / "checkpoint-4")


@pytest.mark.parametrize(
    "change, words",
    [
        ({"args": {"prior_loss_weight": 0.5}}, "prior_loss_weight: 1.0 -> 0.5"),
        ({"args": {"learning_rate": 1e-3}}, "learning_rate: 0.01 -> 0.001"),
        ({"args": {"lr_scheduler": "constant"}}, "lr_scheduler: 'cosine' -> 'constant'"),
        ({"args": {"lr_warmup_steps": 5}}, "lr_warmup_steps: 0 -> 5"),
        ({"args": {"identity_loss_weighting": "none"}}, "identity_loss_weighting"),
        ({"args": {"instance_prompt": "photo of zwx person"}}, "instance_prompt"),
        ({"args": {"class_prompt": "photo of a face"}}, "class_prompt"),
        ({"args": {"center_crop": True}}, "center_crop: False -> True"),
        ({"args": {"train_batch_size": 2}}, "train_batch_size: 1 -> 2"),
        ({"args": {"gradient_accumulation_steps": 2}}, "gradient_accumulation_steps"),
        ({"args": {"resolution": 128}}, "resolution: 64 -> 128"),
        ({"resolved": {"max_train_steps": 8}}, "max_train_steps: 4 -> 8"),
        ({"resolved": {"mixed_precision": "bf16"}}, "mixed_precision: 'no' -> 'bf16'"),
        ({"arcface": "other_weights-0123456789ab"}, "arcface"),
        ({"data": {"class_images": 5}}, "class_images: 3 -> 5"),
        ({"base_model": "0" * 64}, "base model"),
    ],
)
def test_resume_refuses_each_changed_setting(triplet_run, change, words):
    """resume_mismatches compares the checkpoint's config with the resuming run's config."""
    saved = json.loads((triplet_run[0] / "checkpoint-2" / trainer.CONFIG_NAME).read_text())
    assert trainer.resume_mismatches(saved, copy.deepcopy(saved)) == []
    current = copy.deepcopy(saved)
    for section, values in change.items():
        if isinstance(values, dict):
            current[section].update(values)
        else:
            current[section] = values
    assert any(words in line for line in trainer.resume_mismatches(saved, current)), words


def test_resume_compares_arcface_by_content_not_path(triplet_run):
    """The weights' name carries a sha256 prefix: a moved copy resumes, new content does not."""
    saved = json.loads((triplet_run[0] / "checkpoint-2" / trainer.CONFIG_NAME).read_text())
    moved = copy.deepcopy(saved)
    moved["args"]["arcface_weights"] = "/elsewhere/arcface_r18.pth"
    assert trainer.resume_mismatches(saved, moved) == []
    retrained = copy.deepcopy(saved)
    retrained["arcface"] = saved["arcface"][:-12] + "0" * 12
    assert trainer.resume_mismatches(saved, retrained)


def test_finished_identity_is_skipped_unless_overwrite(triplet_run, tmp_path):
    output, _, flags, _ = triplet_run
    copied = tmp_path / "copy"
    shutil.copytree(output, copied)
    argv = [f for f in flags if not f.startswith("--output_dir")] + [f"--output_dir={copied}"]
    before = (copied / train.LORA_WEIGHTS_NAME).read_bytes()

    summary = train.main(train.parse_args(argv))
    assert summary == {"trained": [], "skipped": ["hanks"], "failed": []}
    assert (copied / train.LORA_WEIGHTS_NAME).read_bytes() == before

    overwrite = [*argv, "--overwrite", "--max_train_steps=2", "--validation_prompt="]
    overwrite += ["--checkpointing_steps=1", "--checkpoints_total_limit=1"]
    summary = train.main(train.parse_args(overwrite))
    assert [run["steps"] for run in summary["trained"]] == [2]
    # The old run's checkpoint-4 and validation images are gone; the limit kept one checkpoint.
    assert [step for step, _ in runs.list_checkpoints(copied, trainer.TRAINING_STATE_NAME)] == [2]
    assert not (copied / "validation").exists()
    assert json.loads((copied / trainer.CONFIG_NAME).read_text())["global_step"] == 2


def _rerun_argv(flags: list[str], output: Path, *extra: str) -> list[str]:
    return [f for f in flags if not f.startswith("--output_dir")] + [
        f"--output_dir={output}",
        *extra,
    ]


def test_finished_identity_trained_with_other_settings_is_refused_not_skipped(
    triplet_run, tmp_path
):
    """A rerun compares a finished identity's training_config.json by resume's rule: another
    learning rate, or other photos, refuse that identity (one line with the differences) and
    keep its LoRA; --overwrite retrains it."""
    output, _, flags, _ = triplet_run
    copied = tmp_path / "copy"
    shutil.copytree(output, copied)
    before = (copied / train.LORA_WEIGHTS_NAME).read_bytes()

    summary = train.main(train.parse_args(_rerun_argv(flags, copied, "--learning_rate=1e-3")))
    assert summary["trained"] == [] and summary["skipped"] == []
    [refused] = summary["failed"]
    assert refused["identity"] == "hanks" and "\n" not in refused["error"]
    assert "learning_rate: 0.01 -> 0.001" in refused["error"] and "--overwrite" in refused["error"]
    assert (copied / train.LORA_WEIGHTS_NAME).read_bytes() == before

    photos = tmp_path / "hanks"  # the same identity name, one photo more
    shutil.copytree(_instance_dir(flags), photos)
    shutil.copy(photos / "h0.png", photos / "h2.png")
    argv = [f for f in flags if not f.startswith("--instance_data_dir")]
    summary = train.main(
        train.parse_args(_rerun_argv(argv, copied, f"--instance_data_dir={photos}"))
    )
    assert "data instance_sha256" in summary["failed"][0]["error"]

    (copied / trainer.CONFIG_NAME).write_text("{torn")
    summary = train.main(train.parse_args(_rerun_argv(flags, copied)))
    assert trainer.CONFIG_NAME in summary["failed"][0]["error"]


def _instance_dir(flags: list[str]) -> Path:
    return Path(next(f for f in flags if f.startswith("--instance_data_dir=")).split("=", 1)[1])


def test_finished_identity_on_a_replaced_base_model_at_the_same_path_is_refused(
    assets, triplet_run, tmp_path
):
    """The base model is compared by content: the same folder path holding other weights is
    another model (a replaced local folder, a moved hub revision)."""
    output, _, flags, _ = triplet_run
    base = tmp_path / "sd"
    shutil.copytree(assets.sd, base)
    copied = tmp_path / "copy"
    shutil.copytree(output, copied)
    config = json.loads((copied / trainer.CONFIG_NAME).read_text())
    config["args"]["pretrained_model_name_or_path"] = str(base)  # trained from this folder
    (copied / trainer.CONFIG_NAME).write_text(json.dumps(config))
    argv = [f for f in flags if not f.startswith("--pretrained_model_name_or_path")]
    argv = _rerun_argv(argv, copied, f"--pretrained_model_name_or_path={base}")

    assert train.main(train.parse_args(argv))["skipped"] == ["hanks"]  # same bytes: kept
    weights = load_file(str(base / "unet" / "diffusion_pytorch_model.safetensors"))
    name = next(iter(weights))
    weights[name] = weights[name] + 1
    from safetensors.torch import save_file

    save_file(weights, str(base / "unet" / "diffusion_pytorch_model.safetensors"))
    summary = train.main(train.parse_args(argv))
    assert summary["skipped"] == [] and "base model base_model" in summary["failed"][0]["error"]


def test_identity_losses_that_could_never_apply_their_term_are_refused(assets, tmp_path):
    """Triplet with no class image that shows a face, and ArcFace giving NaN embeddings,
    end with one error before any step instead of a 'finished' run without identity term."""
    blank = tmp_path / "blank_class"
    blank.mkdir()
    for index in range(2):
        Image.new("RGB", (96, 96), (40 * index, 90, 120)).save(blank / f"blank_{index}.png")
    hanks = f"--instance_data_dir={assets.identity('hanks')}"
    argv = cli(assets, tmp_path / "out", hanks, "--max_train_steps=1", class_dir=blank)
    with pytest.raises(ValueError, match="none of the 2 class images .* has a detected face"):
        train.main(train.parse_args(argv))
    assert not (tmp_path / "out" / train.LORA_WEIGHTS_NAME).exists()

    from arcface import build_iresnet

    broken = tmp_path / "nan_arcface.pth"
    weights = build_iresnet("r18").state_dict()
    weights = {k: v * float("nan") if v.is_floating_point() else v for k, v in weights.items()}
    torch.save(weights, broken)
    photos = tmp_path / "hanks"
    shutil.copytree(assets.identity("hanks"), photos)  # no face cache of other weights
    argv = cli(assets, tmp_path / "out2", f"--instance_data_dir={photos}", "--max_train_steps=1")
    argv = [f for f in argv if not f.startswith("--arcface_weights")]
    argv.append(f"--arcface_weights={broken}")
    with pytest.raises(ValueError, match="NaN/inf embeddings .* weights file is broken"):
        train.main(train.parse_args(argv))


@pytest.mark.parametrize("loss", ["dreambooth", "identity"])
def test_other_losses_run(assets, tmp_path, loss):
    from arcface import weights_name

    flags = cli(
        assets,
        tmp_path / loss,
        f"--instance_data_dir={assets.identity('person0')}",
        f"--loss={loss}",
        "--max_train_steps=2",
        "--validation_prompt=",
    )
    if loss == "dreambooth":  # the baseline needs no ArcFace: every readable photo is used
        flags = [f for f in flags if not f.startswith("--arcface_weights")]
    summary = train.main(train.parse_args(flags))
    assert [run["steps"] for run in summary["trained"]] == [2]
    config = json.loads((tmp_path / loss / trainer.CONFIG_NAME).read_text())
    # `identity` (1 - cos, no negative) does not depend on the class images' faces.
    assert config["identity_samples"] == (0 if loss == "dreambooth" else 2)
    assert config["arcface"] == (None if loss == "dreambooth" else weights_name(assets.arcface))
    tags = set(_scalars(tmp_path / loss / "logs"))
    assert ("train/identity_loss" in tags) == (loss == "identity")
    assert lora_weights(tmp_path / loss)


def test_non_finite_loss_stops_with_step_and_term_keeping_the_checkpoint(assets, tmp_path):
    flags = cli(
        assets,
        tmp_path / "nan",
        f"--instance_data_dir={assets.identity('person0')}",
        "--loss=dreambooth",
        "--learning_rate=1e30",  # step 1 is finite (LoRA B = 0), then the weights explode
        "--lr_scheduler=constant",
        "--max_train_steps=4",
        "--checkpointing_steps=1",
        "--validation_prompt=",
    )
    with pytest.raises(train.NonFiniteLossError, match=r"at step 2 \(terms: loss, diffusion_loss"):
        train.main(train.parse_args(flags))
    kept = runs.list_checkpoints(tmp_path / "nan", trainer.TRAINING_STATE_NAME)
    assert [step for step, _ in kept] == [1]
    with pytest.raises(train.NonFiniteLossError, match=r"checkpoint .*checkpoint-1 kept"):
        train.main(train.parse_args([*flags, "--resume_from_checkpoint=latest"]))
    assert not (tmp_path / "nan" / train.LORA_WEIGHTS_NAME).exists()


def test_a_non_finite_final_state_says_whether_a_checkpoint_was_kept(assets, tmp_path):
    """The one-liner names the checkpoint kept, or says none was written (never a folder
    without one)."""
    flags = cli(
        assets,
        tmp_path / "nan",
        f"--instance_data_dir={assets.identity('person0')}",
        "--loss=dreambooth",
        "--learning_rate=1e30",
        "--lr_scheduler=constant",
        "--max_train_steps=2",
        "--checkpointing_steps=100",
        "--logging_steps=100",
        "--validation_prompt=",
    )
    with pytest.raises(train.NonFiniteLossError, match="no checkpoint written yet"):
        train.main(train.parse_args(flags))
    assert runs.list_checkpoints(tmp_path / "nan", trainer.TRAINING_STATE_NAME) == []


def test_identity_without_a_detectable_face_is_a_clear_error(assets, tmp_path):
    faceless = tmp_path / "faceless"
    faceless.mkdir()
    noise = np.random.default_rng(0).integers(0, 255, (96, 96, 3), dtype=np.uint8)
    Image.fromarray(noise).save(faceless / "noise.png")
    flags = cli(assets, tmp_path / "out", f"--instance_data_dir={faceless}", "--max_train_steps=1")
    with pytest.raises(ValueError, match="no usable face photo in"):
        train.main(train.parse_args(flags))


@pytest.mark.slow
def test_identities_root_trains_each_identity_once_across_two_processes(assets, tmp_path):
    class_dir = tmp_path / "class"
    shutil.copytree(assets.class_dir, class_dir)
    output = tmp_path / "loras"
    flags = cli(
        assets,
        output,
        f"--identities_root={assets.identities}",
        "--num_class_images=4",  # 2 missing: one sampled by each process
        "--max_train_steps=2",
        "--validation_prompt=",
        "--report_to=none",
        class_dir=class_dir,
    )
    command = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2"]
    result = run_cli([*command, str(SCRIPT), *flags])
    log = result.stdout + result.stderr

    for rank, name in enumerate(["hanks", "person0"]):
        assert log.count(f"training identity {name} ") == 1, log
        config = json.loads((output / name / trainer.CONFIG_NAME).read_text())
        assert config["resolved"]["process_index"] == rank
        assert config["resolved"]["num_processes"] == 2
        assert config["global_step"] == 2
    assert sorted(p.name for p in class_dir.glob("class_*")) == [
        "class_00000.jpg",
        "class_00001.jpg",
    ]

    # No gradient sync between processes: person0 trained alone gives the same LoRA.
    alone = tmp_path / "alone"
    single = [f for f in flags if not f.startswith(("--identities_root", "--output_dir"))]
    single += [f"--instance_data_dir={assets.identity('person0')}", f"--output_dir={alone}"]
    train.main(train.parse_args(single))
    assert_same_lora(output / "person0", alone, atol=1e-5)


@pytest.mark.slow
@pytest.mark.parametrize("precision", ["fp16", "no"])
def test_an_identity_trained_after_another_equals_it_trained_alone(assets, tmp_path, precision):
    """However identities are split over processes, an identity's LoRA bytes are the same:
    nothing carries over from the identities a process trained before (crops are encoded
    ahead in batches of one shape, so a crop's latents do not depend on which crops share its
    batch; the fp16 scaler starts fresh), so they equal a run of that identity alone."""
    common = ["--max_train_steps=3", "--validation_prompt=", "--report_to=none"]
    common.append(f"--mixed_precision={precision}")
    both, alone = tmp_path / "both", tmp_path / "alone"
    train.main(
        train.parse_args(cli(assets, both, f"--identities_root={assets.identities}", *common))
    )
    single = f"--instance_data_dir={assets.identity('person0')}"
    train.main(train.parse_args(cli(assets, alone, single, *common)))
    assert sorted(p.name for p in both.iterdir()) == ["hanks", "person0"]  # in this order
    lora = trainer.LORA_WEIGHTS_NAME
    assert (both / "person0" / lora).read_bytes() == (alone / lora).read_bytes()


def test_epochs_that_resolve_to_absurd_step_counts_fail_before_the_schedule_is_built():
    flags = type("Args", (), {"train_batch_size": 1, "gradient_accumulation_steps": 1})()
    flags.max_train_steps, flags.num_train_epochs = None, 100_000
    assert trainer.schedule_lengths(flags, 10) == (10, 1_000_000)
    with pytest.raises(ValueError, match="1100000 steps, more than 1000000.*--max_train_steps"):
        trainer.schedule_lengths(flags, 11)


# ======================================================================== fidelity and robustness


def test_num_class_images_uses_exactly_the_first_n_class_images(assets, tmp_path):
    class_dir = tmp_path / "class"
    shutil.copytree(assets.class_dir, class_dir)
    for index in range(3):  # 2 real faces + 3 more: 5 files, 3 wanted
        shutil.copy(next(assets.class_dir.iterdir()), class_dir / f"zz_{index}.png")
    args = train.parse_args(
        cli(assets, tmp_path / "out", f"--instance_data_dir={assets.identity('hanks')}")
        + [f"--class_data_dir={class_dir}", "--num_class_images=3"]
    )
    tools = trainer.load_face_tools(args, torch.device("cpu"))
    dataset = trainer.build_dataset(args, args.instance_data_dir, tools)
    names = sorted(path.name for path in class_dir.iterdir() if path.is_file())
    assert [path.name for path in dataset.classes.paths] == names[:3]
    assert len(dataset) == 3 and dataset.summary()["class_images"] == 3


def test_resume_with_another_persons_photos_is_refused(triplet_run, assets, tmp_path):
    """Same number of photos, other content: the data fingerprint differs."""
    output, class_dir, flags, _ = triplet_run
    resumed = tmp_path / "resumed"
    shutil.copytree(output / "checkpoint-2", resumed / "checkpoint-2")
    other = tmp_path / "someone_else"
    shutil.copytree(assets.identity("person0"), other)  # 2 photos, as hanks has
    argv = [
        f
        for f in flags
        if not f.startswith(("--output_dir", "--instance_data_dir", "--class_data_dir"))
    ]
    argv += [f"--output_dir={resumed}", f"--instance_data_dir={other}"]
    argv += [f"--class_data_dir={class_dir}", "--resume_from_checkpoint=latest"]
    with pytest.raises(ValueError, match="instance_sha256"):
        train.main(train.parse_args(argv))


def test_one_failing_identity_does_not_stop_the_others(assets, tmp_path, monkeypatch, caplog):
    caplog.set_level(logging.INFO)
    root = tmp_path / "identities"
    shutil.copytree(assets.identity("person0"), root / "person0")
    faceless = root / "a_faceless"
    faceless.mkdir()
    noise = np.random.default_rng(0).integers(0, 255, (96, 96, 3), dtype=np.uint8)
    Image.fromarray(noise).save(faceless / "noise.png")
    unreadable = root / "person0" / "p1.png"
    read_bytes = Path.read_bytes

    def no_permission(path):
        if path == unreadable:
            raise PermissionError(13, "Permission denied", str(path))
        return read_bytes(path)

    monkeypatch.setattr(Path, "read_bytes", no_permission)
    flags = cli(assets, tmp_path / "loras", f"--identities_root={root}", "--max_train_steps=1")
    summary = train.main(train.parse_args([*flags, "--validation_prompt=", "--report_to=none"]))
    assert [run["identity"] for run in summary["trained"]] == ["person0"]
    assert [run["identity"] for run in summary["failed"]] == ["a_faceless"]
    assert "no usable face photo" in summary["failed"][0]["error"]
    config = json.loads((tmp_path / "loras" / "person0" / trainer.CONFIG_NAME).read_text())
    assert config["data"]["instance_images"] == 1
    assert config["data"]["instance_skipped"] == {"unreadable image": 1}
    # An overall counter with an ETA, and one end-of-run summary line.
    messages = [record.getMessage() for record in caplog.records]
    assert "identity 1 of 2: a_faceless" in messages
    assert "identity 2 of 2 done (person0): 1 finished, 1 failed, done" in messages
    assert any(m.startswith("identity 1 of 2 done (a_faceless, failed)") for m in messages)
    assert (
        f"summary: 1 trained into {tmp_path / 'loras'}/<identity>/ (person0); 0 skipped as "
        "finished; 1 failed (a_faceless)"
    ) in messages


def test_summary_names_the_folder_the_lora_is_in(tmp_path, caplog):
    """One identity (--instance_data_dir) is written into --output_dir itself: the summary
    must say so, not name a <identity>/ subfolder that does not exist."""
    caplog.set_level(logging.INFO)
    trained = [{"identity": "hanks"}]
    single = argparse.Namespace(instance_data_dir=tmp_path / "hanks", output_dir=tmp_path / "lora")
    train.log_summary(single, trained, [], [])
    root = argparse.Namespace(instance_data_dir=None, output_dir=tmp_path / "loras")
    train.log_summary(root, trained, [], [])
    messages = [record.getMessage() for record in caplog.records]
    assert messages[0].startswith(f"summary: 1 trained into {tmp_path / 'lora'} (hanks);")
    assert messages[1].startswith(f"summary: 1 trained into {tmp_path / 'loras'}/<identity>/ (")


def test_training_off_the_native_resolution_warns_in_one_line(tmp_path, caplog):
    base = fake_base_model(tmp_path / "sd")  # empty configs: the paper's 512 px
    args = argparse.Namespace(
        pretrained_model_name_or_path=str(base),
        revision=None,
        resolution=128,
        validation_guidance_scale=None,
    )
    train.resolve_architecture_defaults(args)
    warnings = [r.getMessage() for r in caplog.records if r.levelname == "WARNING"]
    assert len(warnings) == 1 and "\n" not in warnings[0]
    assert "--resolution 128" in warnings[0] and "native 512 px" in warnings[0]
    caplog.clear()
    args.resolution = 512
    train.resolve_architecture_defaults(args)
    assert not [r for r in caplog.records if r.levelname == "WARNING"]


def test_failures_are_listed_as_readable_lines_once():
    """The end-of-run failure list: a header with the count in the right number, then one
    'identity: error' line each; no repr of the result dicts."""
    failed = [{"identity": "ID_1", "error": "ValueError: no usable face photo in ID_1"}]
    lines = train.failure_lines(failed, 1)
    assert lines == ["1 of 1 identity failed:", "  ID_1: ValueError: no usable face photo in ID_1"]
    assert not any("{" in line or "'error'" in line for line in lines)
    assert train.failure_lines(failed * 2, 3)[0] == "2 of 3 identities failed:"
    assert train.failure_lines([], 3) == []


@pytest.mark.parametrize(
    "flag",
    ["--output_dir={root}/person0/out", "--class_data_dir={root}/class"],
)
def test_outputs_and_class_images_must_lie_outside_the_identities(assets, tmp_path, flag):
    root = tmp_path / "identities"
    shutil.copytree(assets.identities, root)
    argv = cli(assets, tmp_path / "out", f"--identities_root={root}")
    with pytest.raises(ValueError, match="lies inside --identities_root"):
        train.parse_args([*argv, flag.format(root=root)])


# ======================================================================== speed: the packed step


def packed_flags(assets, output: Path, root: Path, *extra: str) -> list[str]:
    return cli(
        assets,
        output,
        f"--identities_root={root}",
        "--max_train_steps=3",
        "--validation_prompt=",
        "--report_to=none",
        # The paper's lr: AdamW's update ~ lr * m / sqrt(v) turns float reassociation of the
        # (tiny) first gradients of A into O(lr) steps, so the batch shape shows at O(1e-2 lr).
        "--learning_rate=1e-4",
        *extra,
    )


def test_a_packed_run_equals_single_runs_and_a_nan_freezes_only_its_identity(
    assets, tmp_path, monkeypatch
):
    root = tmp_path / "identities"
    for name in ("hanks", "person0"):
        shutil.copytree(assets.identity(name), root / name)
    alone = tmp_path / "alone"
    train.main(train.parse_args(packed_flags(assets, alone, root, "--pack=1")))
    packed = tmp_path / "packed"
    summary = train.main(train.parse_args(packed_flags(assets, packed, root, "--pack=2")))
    assert [r["identity"] for r in summary["trained"]] == ["hanks", "person0"]
    config = json.loads((packed / "hanks" / trainer.CONFIG_NAME).read_text())
    assert config["resolved"]["pack"] == 2
    for name in ("hanks", "person0"):
        assert_same_lora(alone / name, packed / name, atol=1e-5)

    # A NaN in hanks' embeddings poisons its identity term: hanks fails, person0 is untouched.
    add_faces = trainer.PackedTrainer._add_faces

    def with_a_bad_identity(self, slot):
        add_faces(self, slot)
        if slot.identity.name == "hanks":
            rows = [row for key, row in self.faces.rows.items() if key[0] == "hanks"]
            self.faces.columns["embedding"][rows] = float("nan")

    monkeypatch.setattr(trainer.PackedTrainer, "_add_faces", with_a_bad_identity)
    poisoned = tmp_path / "poisoned"
    summary = train.main(train.parse_args(packed_flags(assets, poisoned, root, "--pack=2")))
    assert [r["identity"] for r in summary["failed"]] == ["hanks"]
    assert "non-finite loss at step 1" in summary["failed"][0]["error"]
    assert not (poisoned / "hanks" / train.LORA_WEIGHTS_NAME).exists()
    assert_same_lora(packed / "person0", poisoned / "person0", atol=1e-6)


# The tolerance README states for packed vs solo LoRAs (fp32, CPU, 3 steps): the batch shape
# changes only float summation order, and AdamW's lr * m / sqrt(v) turns that into steps of
# O(lr) on the first updates, so the bound is 1e-2 x the learning rate (measured on the 2-core
# CPU: 3e-8 at 1e-4, 1.5e-5 at 1e-2).
PACKED_VS_SOLO_TOLERANCE = {1e-4: 1e-6, 1e-2: 1e-4}


@pytest.mark.parametrize("learning_rate", sorted(PACKED_VS_SOLO_TOLERANCE))
def test_packed_and_solo_loras_agree_within_the_stated_tolerance(assets, tmp_path, learning_rate):
    """The README's packed-vs-solo tolerance, measured at the paper's lr and at a high one."""
    root = tmp_path / "identities"
    for name in ("hanks", "person0"):
        shutil.copytree(assets.identity(name), root / name)
    lr = f"--learning_rate={learning_rate}"
    train.main(train.parse_args(packed_flags(assets, tmp_path / "alone", root, "--pack=1", lr)))
    train.main(train.parse_args(packed_flags(assets, tmp_path / "packed", root, "--pack=2", lr)))
    worst = 0.0
    for name in ("hanks", "person0"):
        alone = lora_weights(tmp_path / "alone" / name)
        packed = lora_weights(tmp_path / "packed" / name)
        worst = max(worst, *((alone[k] - packed[k]).abs().max().item() for k in alone))
    print(f"packed vs solo at lr {learning_rate}: max |difference| {worst:.3g}")
    assert worst <= PACKED_VS_SOLO_TOLERANCE[learning_rate]


def test_pack_and_gradient_accumulation_do_not_combine(assets, tmp_path):
    flags = cli(assets, tmp_path / "out", f"--identities_root={assets.identities}")
    with pytest.raises(ValueError, match="--pack > 1"):
        train.parse_args([*flags, "--pack=2", "--gradient_accumulation_steps=2"])


@pytest.mark.parametrize("precision", ["fp16", "bf16"])
def test_mixed_precision_training_runs_on_the_cpu(assets, tmp_path, precision):
    """The GPU recipes' precision paths, run here: half-precision frozen weights, fp32 LoRA, and
    for fp16 the grad scaler (unscale, per-identity inf skip, update) in every step."""
    flags = cli(assets, tmp_path / precision, f"--instance_data_dir={assets.identity('hanks')}")
    flags = [f for f in flags if not f.startswith("--mixed_precision")]
    flags += [f"--mixed_precision={precision}", "--max_train_steps=2", "--checkpointing_steps=2"]
    flags += ["--validation_prompt=", "--report_to=none"]
    summary = train.main(train.parse_args(flags))
    assert [run["steps"] for run in summary["trained"]] == [2]
    weights = lora_weights(tmp_path / precision)
    assert all(w.dtype == torch.float32 and torch.isfinite(w).all() for w in weights.values())
    state = torch.load(
        tmp_path / precision / "checkpoint-2" / trainer.TRAINING_STATE_NAME, weights_only=True
    )
    scaler = state["grad_scaler"]
    assert bool(scaler) == (precision == "fp16")  # an fp16 scaler state, none for bf16
    config = json.loads((tmp_path / precision / trainer.CONFIG_NAME).read_text())
    assert config["resolved"]["mixed_precision"] == precision


def _root_argv(tmp_path: Path, root: Path, *extra: str) -> list[str]:
    """A dreambooth run of `root`'s identities into tmp_path/loras (no class images, no
    ArcFace: nothing to load before the output folder is checked)."""
    base = fake_base_model(tmp_path / "sd")
    return [
        f"--pretrained_model_name_or_path={base}",
        f"--identities_root={root}",
        f"--output_dir={tmp_path / 'loras'}",
        "--loss=dreambooth",
        "--no-with_prior_preservation",
        *extra,
    ]


def _fake_finished(args, name: str) -> None:
    """OUTPUT_DIR/<name> as a finished identity trained with `args`."""
    folder = args.output_dir / name
    folder.mkdir(parents=True)
    (folder / train.LORA_WEIGHTS_NAME).write_bytes(b"")
    config = {
        "args": runs.json_safe(vars(args)),
        "resolved": {"mixed_precision": args.mixed_precision},
        "arcface": None,
        "base_model": runs.base_model_fingerprint(args.pretrained_model_name_or_path),
    }
    (folder / trainer.CONFIG_NAME).write_text(json.dumps(config))


def test_a_new_identity_is_refused_where_finished_ones_have_other_settings(tmp_path, monkeypatch):
    """Training a new identity into an output folder whose finished identities were trained
    with other settings (resume's rule) is refused before anything loads, the differences
    listed; the same settings go on; --overwrite retrains this run's identities, so only a
    finished identity outside them must still match."""
    root = tmp_path / "photos"
    for name in ("ID_a", "ID_b"):
        (root / name).mkdir(parents=True)
    _fake_finished(train.parse_args(_root_argv(tmp_path, root, "--learning_rate=1e-3")), "ID_a")

    def no_training(*args, **kwargs):
        raise AssertionError("loaded models although the output folder mixes settings")

    monkeypatch.setattr(train, "load_frozen_models", no_training)
    other = train.parse_args(_root_argv(tmp_path, root, "--learning_rate=1e-2"))
    with pytest.raises(ValueError) as error:
        train.main(other)
    message = str(error.value)
    assert "\n" not in message and "ID_a: learning_rate: 0.001 -> 0.01" in message
    assert "ID_b" in message and "--overwrite" in message
    same = train.parse_args(_root_argv(tmp_path, root, "--learning_rate=1e-3", "--pack=2"))
    train.check_output_root(train.discover_identities(same), same)  # pack may change
    overwrite = train.parse_args(_root_argv(tmp_path, root, "--learning_rate=1e-2", "--overwrite"))
    train.check_output_root(train.discover_identities(overwrite), overwrite)  # ID_a retrained
    _fake_finished(train.parse_args(_root_argv(tmp_path, root, "--rank=8")), "ID_c")
    with pytest.raises(ValueError, match=r"ID_c: .*rank: 8 -> 4"):
        train.check_output_root(train.discover_identities(overwrite), overwrite)
