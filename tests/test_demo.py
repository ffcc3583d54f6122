"""The README's first command: demo.py runs every stage end to end on embedded models."""

import json
import os
import subprocess
import sys

import pytest
from conftest import REPO_ROOT


@pytest.mark.slow
def test_demo_trains_generates_and_evaluates(tmp_path):
    out = tmp_path / "demo"
    env = {**os.environ, "OMP_NUM_THREADS": "1", "HF_HUB_OFFLINE": "1"}
    command = [sys.executable, str(REPO_ROOT / "demo.py"), f"--output_dir={out}"]
    subprocess.run(command, check=True, env=env, cwd=tmp_path, timeout=900)

    identities = sorted(path.name for path in (out / "loras").iterdir() if path.is_dir())
    assert identities == ["person_0", "person_1"]
    for identity in identities:
        assert (out / "loras" / identity / "pytorch_lora_weights.safetensors").is_file()
        assert len(list((out / "generated" / identity).glob("*.png"))) == 3
    metrics = json.loads((out / "report" / "metrics.json").read_text())
    # dlib's real embedder tells the two real identities apart; random-weight SD makes no faces.
    assert metrics["identity"]["real_vs_real"]["real"]["eer"] == 0.0
    assert "skipped" in metrics["identity"]["synthetic_vs_synthetic"]["ID-Booth"]
    assert "skipped" not in metrics["diversity"]
    assert (out / "report" / "report.html").stat().st_size > 10_000
