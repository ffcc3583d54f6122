"""runs.py: the plumbing every script shares (CLI errors, configs, checkpoints, numbers)."""

from __future__ import annotations

import argparse
import io
import json
import logging
import math
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from conftest import fake_base_model

import runs


def test_hub_ids_pass_and_precision_is_the_one_asked_for_on_every_device():
    assert not runs.looks_like_path("stabilityai/stable-diffusion-2-1-base")
    for path in ("./sd", "/models/sd", "~/sd", "models/sd/v2"):
        assert runs.looks_like_path(path), path
    for device in ("cpu", "cuda"):
        for precision in ("no", "fp16", "bf16"):
            assert runs.resolve_mixed_precision(precision, device) == precision
    with pytest.raises(ValueError, match="unknown mixed precision"):
        runs.resolve_mixed_precision("fp8", "cpu")


def test_plural_counts_take_the_noun_in_the_right_number():
    assert runs.plural(1, "identity") == "1 identity"
    assert runs.plural(2, "identity") == "2 identities"
    assert runs.plural(0, "photo") == "0 photos"
    assert runs.plural(3, "day") == "3 days"
    assert runs.plural(2, "child", "children") == "2 children"


def test_config_mismatches_compare_everything_not_listed_as_changeable():
    saved = {"lr": 0.1, "out": "a", "old_flag": 1}
    current = {"lr": 0.2, "out": "b", "new_flag": 3}
    changed = runs.config_mismatches(saved, current, may_change={"out"})
    assert changed == [
        "lr: 0.1 -> 0.2",
        f"new_flag: {runs.MISSING!r} -> 3",
        f"old_flag: 1 -> {runs.MISSING!r}",
    ]
    assert runs.config_mismatches(saved, dict(saved), ()) == []


def test_json_safe_makes_every_value_serialisable():
    value = {
        "path": Path("/a/b"),
        "array": np.arange(3, dtype=np.int64),
        "scalar": np.float32(0.5),
        "tuple": (1, 2),
        "nan": float("nan"),
        "inf": -math.inf,
        "namespace": argparse.Namespace(x=Path("c")),
    }
    text = json.dumps(runs.json_safe(value), allow_nan=False)
    assert json.loads(text) == {
        "path": "/a/b",
        "array": [0, 1, 2],
        "scalar": 0.5,
        "tuple": [1, 2],
        "nan": "nan",
        "inf": "-inf",
        "namespace": {"x": "c"},
    }


def test_numbers_reject_non_finite_and_out_of_range_values():
    parser = argparse.ArgumentParser()
    parser.add_argument("--steps", type=runs.POSITIVE_INT, default=1)
    parser.add_argument("--scale", type=runs.NON_NEGATIVE, default=1.0)
    parser.add_argument("--size", type=runs.Number(int, low=8, multiple_of=8), default=64)
    parser.add_argument("--beta", type=runs.Number(float, 0, 1, high_open=True), default=0.9)
    parser.add_argument("--targets", type=runs.PROBABILITY, nargs="+", default=[0.1])
    assert runs.unchecked_numeric_flags(parser) == []
    cases = {
        ("--steps", "0"): "--steps must be >= 1, got 0",
        ("--scale", "nan"): "--scale must be a finite number, got nan",
        ("--scale", "-inf"): "--scale must be a finite number",
        ("--scale", "-0.5"): "--scale must be >= 0",
        ("--size", "60"): "--size must be a multiple of 8",
        ("--beta", "1"): "--beta must be >= 0 and < 1",
        ("--targets", "0.5", "2"): "--targets must be >= 0 and <= 1, got 2.0",
    }
    for (flag, *values), message in cases.items():
        argv = [f"{flag}={values[0]}"] if len(values) == 1 else [flag, *values]
        args = parser.parse_args(argv)
        with pytest.raises(ValueError, match=message):
            runs.check_numbers(args, parser)
    runs.check_numbers(parser.parse_args([]), parser)  # defaults are fine
    parser.add_argument("--unchecked", type=float, default=0.0)
    assert runs.unchecked_numeric_flags(parser) == ["unchecked"]


def test_checkpoints_are_listed_by_step_and_pruned_to_the_limit(tmp_path):
    for step in (10, 2, 30):
        runs.write_checkpoint(
            tmp_path, step, lambda temp: (temp / "state.pt").write_text("x"), "state.pt", keep=2
        )
    (tmp_path / "checkpoint-99").mkdir()  # incomplete: no state file
    (tmp_path / "checkpoint-x").mkdir()
    assert [step for step, _ in runs.list_checkpoints(tmp_path, "state.pt")] == [10, 30]
    assert not list(tmp_path.glob(".*"))


def test_identity_folders_skip_hidden_folders_and_files(tmp_path):
    for name in ("b", "a", ".cache"):
        (tmp_path / name).mkdir()
    (tmp_path / "notes.txt").write_text("not an identity")
    assert [path.name for path in runs.identity_folders(tmp_path)] == ["a", "b"]
    identities = runs.identity_runs(None, tmp_path, tmp_path / "out")
    assert [(i.name, i.output_dir.name) for i in identities] == [("a", "a"), ("b", "b")]
    with pytest.raises(ValueError, match="holds no identity folders"):
        runs.identity_runs(None, tmp_path / "a", tmp_path / "out")


SCRIPT = """
import sys
import runs

def main(args):
    if args == "value": raise ValueError("bad value given")
    if args == "interrupt": raise KeyboardInterrupt
    return 3

runs.run_cli("prog.py", lambda: sys.argv[1], main, exit_code=lambda result: result)
"""


@pytest.mark.parametrize(
    "argument, code, last_line",
    [
        ("value", 1, "prog.py: error: bad value given"),
        ("interrupt", 130, "prog.py: interrupted"),
        ("ok", 3, None),
    ],
)
def test_run_cli_ends_in_one_line_and_the_right_exit_code(tmp_path, argument, code, last_line):
    script = tmp_path / "prog.py"
    script.write_text(SCRIPT)
    repo = Path(runs.__file__).parent
    result = subprocess.run(
        [sys.executable, str(script), argument],
        capture_output=True,
        text=True,
        env={"PYTHONPATH": str(repo)},
    )
    assert result.returncode == code
    assert "Traceback" not in result.stderr
    if last_line is not None:
        assert result.stderr.strip().splitlines()[-1].startswith(last_line)


def test_find_checkpoint_resumes_from_the_newest_complete_checkpoint(tmp_path):
    for step in (10, 100, 30):  # checkpoint-100 sorts before checkpoint-30 as text
        (tmp_path / f"checkpoint-{step}").mkdir()
        (tmp_path / f"checkpoint-{step}" / "state.pt").write_bytes(b"x")
    (tmp_path / "checkpoint-200").mkdir()  # incomplete: no state.pt
    assert runs.find_checkpoint("latest", tmp_path, "state.pt") == tmp_path / "checkpoint-100"
    assert runs.find_checkpoint("checkpoint-10", tmp_path, "state.pt") == tmp_path / "checkpoint-10"
    assert runs.find_checkpoint(None, tmp_path, "state.pt") is None
    assert runs.find_checkpoint("latest", tmp_path / "empty", "state.pt") is None
    with pytest.raises(FileNotFoundError, match="checkpoint-200"):
        runs.find_checkpoint("checkpoint-200", tmp_path, "state.pt")


def _pipeline_folder(root: Path) -> Path:
    """A pipeline-shaped folder: configs, a tokenizer file, two weight variants, a top-level
    single-file checkpoint diffusers' folder loader never reads, and a hidden cache."""
    for relative, data in {
        "model_index.json": b"{}",
        "unet/config.json": b"{}",
        "unet/diffusion_pytorch_model.safetensors": b"fp32 weights",
        "unet/diffusion_pytorch_model.fp16.safetensors": b"fp16 weights",
        "vae/diffusion_pytorch_model.safetensors": b"vae weights",
        "tokenizer/vocab.json": b"{}",
        "v2-1_512-ema-pruned.ckpt": b"single file",
        ".cache/lock": b"",
    }.items():
        (root / relative).parent.mkdir(parents=True, exist_ok=True)
        (root / relative).write_bytes(data)
    return root


def test_base_model_fingerprint_is_the_content_of_the_files_the_loader_reads(tmp_path):
    folder = _pipeline_folder(tmp_path / "sd")
    names = [p.relative_to(folder).as_posix() for p in runs.loaded_files(folder)]
    assert "unet/diffusion_pytorch_model.safetensors" in names
    assert "unet/diffusion_pytorch_model.fp16.safetensors" not in names
    assert "v2-1_512-ema-pruned.ckpt" not in names and ".cache/lock" not in names
    # fp16: the unet's fp16 file; the vae has none of that variant, so the loader falls back.
    fp16 = [p.relative_to(folder).as_posix() for p in runs.loaded_files(folder, "fp16")]
    assert "unet/diffusion_pytorch_model.fp16.safetensors" in fp16
    assert "vae/diffusion_pytorch_model.safetensors" in fp16

    first = runs.base_model_fingerprint(str(folder))
    moved = tmp_path / "moved"
    folder.rename(moved)
    assert runs.base_model_fingerprint(str(moved)) == first  # the same model, elsewhere
    (moved / "unet" / "diffusion_pytorch_model.fp16.safetensors").write_bytes(b"other")
    (moved / "v2-1_512-ema-pruned.ckpt").write_bytes(b"other")
    assert runs.base_model_fingerprint(str(moved)) == first  # files it does not load
    (moved / "unet" / "diffusion_pytorch_model.safetensors").write_bytes(b"fp32 weightz")
    assert runs.base_model_fingerprint(str(moved)) != first  # same path and size, new bytes


def test_file_hashes_are_cached_by_path_size_mtime_and_inode(tmp_path, monkeypatch):
    import fileio

    monkeypatch.setenv("ID_BOOTH_CACHE", str(tmp_path / "cache"))
    calls = []
    real_sha256 = fileio.file_sha256
    monkeypatch.setattr(fileio, "file_sha256", lambda path: calls.append(path) or real_sha256(path))
    weights = tmp_path / "weights.bin"
    weights.write_bytes(b"a" * 100)
    first = runs.cached_sha256([weights])[weights]
    assert runs.cached_sha256([weights])[weights] == first and len(calls) == 1  # read once
    stat = weights.stat()
    replacement = tmp_path / "new.bin"
    replacement.write_bytes(b"b" * 100)  # same size, same mtime, another inode
    os.utime(replacement, ns=(stat.st_atime_ns, stat.st_mtime_ns))
    replacement.replace(weights)
    assert runs.cached_sha256([weights])[weights] != first and len(calls) == 2
    (tmp_path / "cache" / runs.SHA256_CACHE_NAME).write_text("[not a cache")
    assert runs.cached_sha256([weights])[weights] == fileio.file_sha256(weights)


def test_base_model_errors_say_what_is_wrong_with_the_path(tmp_path, monkeypatch):
    from huggingface_hub import constants

    single_file = tmp_path / "v2-1_512-ema-pruned.safetensors"
    single_file.write_bytes(b"\0" * 8)
    with pytest.raises(FileNotFoundError, match="is a file, not a folder.*from_single_file"):
        runs.check_base_model(str(single_file))
    with pytest.raises(FileNotFoundError, match="does not exist"):
        runs.check_base_model(str(tmp_path / "missing" / "sd"))
    monkeypatch.setattr(constants, "HF_HUB_CACHE", str(tmp_path / "empty_cache"))
    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", True)
    with pytest.raises(FileNotFoundError, match="not in the Hugging Face cache.*HF_HUB_OFFLINE"):
        runs.check_base_model("stabilityai/stable-diffusion-2-1-base")
    (tmp_path / "incomplete").mkdir()
    with pytest.raises(FileNotFoundError, match="incomplete: missing model_index.json"):
        runs.check_base_model(str(tmp_path / "incomplete"))


def test_single_file_hint_names_the_pipeline_class_of_the_file(tmp_path):
    """An SDXL single file (keys under conditioner.embedders.1) is told to use the SDXL
    pipeline, an SD one the SD pipeline, an unreadable one both."""
    import torch
    from safetensors.torch import save_file

    sdxl, sd = tmp_path / "sdxl.safetensors", tmp_path / "sd.safetensors"
    save_file({"conditioner.embedders.1.model.ln_final.weight": torch.zeros(1)}, str(sdxl))
    save_file({"cond_stage_model.model.ln_final.weight": torch.zeros(1)}, str(sd))
    with pytest.raises(FileNotFoundError) as error:
        runs.check_base_model(str(sdxl))
    assert "StableDiffusionXLPipeline.from_single_file" in str(error.value)
    assert "StableDiffusionPipeline." not in str(error.value)
    with pytest.raises(FileNotFoundError) as error:
        runs.check_base_model(str(sd))
    assert "StableDiffusionPipeline.from_single_file" in str(error.value)
    assert "XLPipeline" not in str(error.value)
    ckpt = tmp_path / "model.ckpt"
    ckpt.write_bytes(b"\0" * 8)
    with pytest.raises(FileNotFoundError) as error:
        runs.check_base_model(str(ckpt))
    text = str(error.value)
    assert "StableDiffusionPipeline.from_single_file" in text and "XLPipeline" in text


def test_component_folder_names_its_pipeline_folder(tmp_path):
    base = fake_base_model(tmp_path / "sd")
    with pytest.raises(FileNotFoundError, match=r"unet/ component .*model_index.json: .*sd$"):
        runs.check_base_model(str(base / "unet"))


def test_missing_weights_variant_says_drop_variant_not_corrupt(tmp_path):
    base = fake_base_model(tmp_path / "sd")
    runs.check_base_model(str(base))
    with pytest.raises(FileNotFoundError, match=r"no fp16 variant files in .*sd.*; drop --variant"):
        runs.check_base_model(str(base), variant="fp16")
    (base / "unet" / "diffusion_pytorch_model.fp16.safetensors").write_bytes(b"")
    runs.check_base_model(str(base), variant="fp16")


def test_hub_failures_are_not_blamed_on_the_weights(tmp_path):
    hub = pytest.raises(ValueError, match="from the Hugging Face hub")
    with hub as error, runs.loading("the UNet", "org/model"):
        raise OSError("We couldn't connect to 'https://huggingface.co' to load the files")
    assert "corrupt" not in str(error.value)
    with pytest.raises(ValueError, match="truncated, corrupt"), runs.loading("x", str(tmp_path)):
        raise OSError("header too large")


class _Terminal(io.StringIO):
    def isatty(self) -> bool:
        return True


def test_progress_bars_do_not_flood_a_log_file():
    """1,000 fast steps: a terminal gets its usual redraws, a log file (not a tty) only the
    first and the last line, however fast the steps come."""
    written = {}
    for name, stream in (("log file", io.StringIO()), ("terminal", _Terminal())):
        options = {"mininterval": 0} if name == "terminal" else {}
        bar = runs.progress_bar(total=1000, file=stream, **options)
        for _ in range(1000):
            bar.update(1)
        bar.close()
        written[name] = stream.getvalue()
    assert written["log file"].count("\r") <= 3 and "1000/1000" in written["log file"]
    assert written["terminal"].count("\r") > 100


def test_run_progress_counts_and_estimates_the_time_left(caplog):
    caplog.set_level(logging.INFO)
    now = [0.0]
    progress = runs.RunProgress("identity", 4, clock=lambda: now[0])
    runs.set_progress_context("training variant 2 of 3 (triplet)")
    try:
        progress.start("ID_1")
        now[0] = 600.0
        progress.done("ID_1")
        progress.start("ID_2")
        now[0] = 1200.0
        progress.done("ID_2", failed=True)
    finally:
        runs.set_progress_context("")
    messages = [record.getMessage() for record in caplog.records]
    assert messages == [
        "training variant 2 of 3 (triplet), identity 1 of 4: ID_1",
        "training variant 2 of 3 (triplet), identity 1 of 4 done (ID_1): 1 finished, 0 failed, "
        "ETA 30 min 00 s",
        "training variant 2 of 3 (triplet), identity 2 of 4: ID_2",
        "training variant 2 of 3 (triplet), identity 2 of 4 done (ID_2, failed): 1 finished, "
        "1 failed, ETA 20 min 00 s",
    ]
    assert runs.format_duration(11_520) == "3 h 12 min" and runs.format_duration(42) == "42 s"


def test_transformers_torchvision_fallback_notice_is_not_shown():
    """No torchvision here by design: transformers' fallback notice would open every run."""
    from transformers.utils import logging as hf_logging

    hf_logger = hf_logging.get_logger("transformers.utils.import_utils")

    def record(message: str) -> logging.LogRecord:
        return hf_logger.makeRecord(hf_logger.name, logging.WARNING, "x.py", 1, message, (), None)

    notice = "`CLIPImageProcessor` requires torchvision (not installed); falling back to ..."
    assert not hf_logger.filter(record(notice))
    assert hf_logger.filter(record("another notice"))
