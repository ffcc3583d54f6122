"""Bad input on the command line ends in one clear `error:` line, never a Python traceback."""

import os
import subprocess
import sys

import pytest
from conftest import REPO_ROOT


def run_script(script: str, *arguments: str) -> subprocess.CompletedProcess:
    env = {**os.environ, "OMP_NUM_THREADS": "1", "HF_HUB_OFFLINE": "1"}
    command = [sys.executable, str(REPO_ROOT / script), *arguments]
    return subprocess.run(command, capture_output=True, text=True, env=env, timeout=300)


@pytest.mark.parametrize(
    ("script", "arguments", "message"),
    [
        (
            "inference_ID-Booth.py",
            ["--lora_dir={tmp}/missing_identity", "--output_dir={tmp}/out"],
            "missing_identity",
        ),
        (
            "Evaluation/evaluate.py",
            ["--generated=method={tmp}/missing_set", "--embedder=dlib", "--out={tmp}/report"],
            "missing_set",
        ),
        (
            "Evaluation/verify.py",
            ["--backbone={tmp}/backbone.pth", "--bin={tmp}/lfw.bin"],
            "backbone.pth",
        ),
        (
            "Evaluation/train_fr.py",
            ["--data_dir={tmp}/empty", "--output_dir={tmp}/fr", "--mixed_precision=no"],
            "empty",
        ),
    ],
)
def test_bad_input_prints_one_error_line_without_traceback(tmp_path, script, arguments, message):
    (tmp_path / "empty").mkdir()
    result = run_script(script, *(argument.format(tmp=tmp_path) for argument in arguments))
    assert result.returncode != 0
    assert "Traceback" not in result.stderr
    last_line = result.stderr.strip().splitlines()[-1]
    assert "error:" in last_line and message in last_line, result.stderr[-2000:]


@pytest.fixture(scope="module")
def tiny_base(tmp_path_factory):
    from random_models import build_tiny_sd

    return build_tiny_sd(tmp_path_factory.mktemp("base") / "sd")


def faceless_identity(root):
    """An identity folder whose only photo is noise: readable, large enough, no face."""
    import numpy as np
    from PIL import Image

    folder = root / "identity"
    folder.mkdir()
    pixels = np.random.default_rng(0).integers(0, 255, (96, 96, 3), dtype=np.uint8)
    Image.fromarray(pixels).save(folder / "noise.png")
    return folder


def test_training_base_model_without_weights_is_named(tmp_path, tiny_base):
    import shutil

    base = tmp_path / "base"
    shutil.copytree(tiny_base, base)
    for weights in (base / "unet").glob("*.safetensors"):
        weights.unlink()
    result = run_script(
        "train_ID-Booth.py",
        f"--pretrained_model_name_or_path={base}",
        f"--instance_data_dir={faceless_identity(tmp_path)}",
        "--loss=dreambooth",
        "--no-with_prior_preservation",
        f"--output_dir={tmp_path / 'out'}",
    )
    assert result.returncode != 0 and "Traceback" not in result.stderr
    assert "unet/ weights" in result.stderr.strip().splitlines()[-1]


@pytest.mark.slow
def test_training_identity_without_a_face_is_one_error_line(tmp_path, tiny_base):
    import torch

    from arcface import build_iresnet

    arcface_path = tmp_path / "arcface.pth"
    torch.save(build_iresnet("r18").state_dict(), arcface_path)
    result = run_script(
        "train_ID-Booth.py",
        f"--pretrained_model_name_or_path={tiny_base}",
        f"--instance_data_dir={faceless_identity(tmp_path)}",
        f"--arcface_weights={arcface_path}",
        "--face_detector=dlib",
        "--loss=identity",
        "--no-with_prior_preservation",
        "--resolution=64",
        f"--output_dir={tmp_path / 'out'}",
    )
    assert result.returncode != 0 and "Traceback" not in result.stderr
    last_line = result.stderr.strip().splitlines()[-1]
    assert last_line.startswith("train_ID-Booth.py: error:") and "noise.png" in last_line
