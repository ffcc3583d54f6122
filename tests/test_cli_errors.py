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
