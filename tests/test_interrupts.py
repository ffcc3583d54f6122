"""Ctrl-C in any script: exit code 130, one line, outputs consistent (no temp left behind,
finished files whole), and a rerun finishes the rest. Also demo.py's own failure modes."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from conftest import REPO_ROOT

import random_models

pytestmark = pytest.mark.slow

ENV = {**os.environ, "OMP_NUM_THREADS": "1", "HF_HUB_OFFLINE": "1", "PYTHONUNBUFFERED": "1"}


def interrupt_when(
    command: list[str], marker: str, cwd: Path, delay: float = 0.0
) -> subprocess.CompletedProcess:
    """Start a script, send SIGINT `delay` s after `marker` appears in its output, wait for its
    end.

    The child gets SIGINT's default action, as a terminal's foreground job has: a test run
    started in the background (`cmd &`, nohup) inherits SIGINT ignored, and Python then
    installs no KeyboardInterrupt handler."""
    process = subprocess.Popen(
        command,
        cwd=cwd,
        env=ENV,
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
        preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_DFL),
    )
    seen, deadline = [], time.monotonic() + 300
    for line in process.stdout:
        seen.append(line)
        if marker in line:
            time.sleep(delay)
            process.send_signal(signal.SIGINT)
            break
        assert time.monotonic() < deadline, "".join(seen)[-3000:]
    rest, _ = process.communicate(timeout=300)
    return subprocess.CompletedProcess(command, process.returncode, "".join(seen) + rest, "")


def no_temps(folder: Path) -> list[Path]:
    return [p for p in folder.rglob("*") if p.name.endswith(".tmp") or p.name.startswith(".lora-")]


@pytest.fixture(scope="module")
def demo_setup(tmp_path_factory):
    root = tmp_path_factory.mktemp("interrupts")
    models = random_models.prepare_embedded_models(root / "models")
    identities, class_dir, attributes = random_models.prepare_embedded_identities(root / "data")
    return root, models, identities, class_dir, attributes


def test_ctrl_c_in_training_is_one_line_and_the_rerun_resumes(demo_setup):
    root, models, identities, class_dir, _ = demo_setup
    out = root / "loras"
    command = [
        sys.executable, str(REPO_ROOT / "train_ID-Booth.py"),
        f"--pretrained_model_name_or_path={models['sd']}", f"--identities_root={identities}",
        f"--class_data_dir={class_dir}", "--num_class_images=4",
        f"--arcface_weights={models['arcface']}", "--face_detector=dlib", "--resolution=64",
        "--max_train_steps=40", "--checkpointing_steps=1", "--validation_prompt=",
        "--report_to=none", f"--output_dir={out}",
    ]  # fmt: skip
    stopped = interrupt_when(command, "saved", cwd=root)
    assert stopped.returncode == 130, stopped.stdout[-3000:]
    assert stopped.stdout.strip().splitlines()[-1].startswith("train_ID-Booth.py: interrupted")
    assert "Traceback" not in stopped.stdout
    assert no_temps(out) == []
    finished = subprocess.run(
        [*command, "--resume_from_checkpoint=latest", "--max_train_steps=40"],
        cwd=root, env=ENV, capture_output=True, text=True, timeout=600,
    )  # fmt: skip
    assert finished.returncode == 0, finished.stderr[-3000:]
    assert all(
        (out / name / "pytorch_lora_weights.safetensors").is_file()
        for name in ("person_0", "person_1")
    )


def test_ctrl_c_in_generation_is_one_line_and_the_rerun_completes(demo_setup, tmp_path):
    root, models, _, _, attributes = demo_setup
    loras = tmp_path / "loras"
    for name in ("ID_a", "ID_b"):
        from diffusers import UNet2DConditionModel
        from test_inference import make_lora

        make_lora(loras / name, UNet2DConditionModel.from_pretrained(models["sd"] / "unet"), 0)
    out = tmp_path / "generated"
    command = [
        sys.executable, str(REPO_ROOT / "inference_ID-Booth.py"),
        f"--pretrained_model_name_or_path={models['sd']}", f"--lora_root={loras}",
        "--prompt_template=photo of sks person, {background} background",
        "--prompt_template_no_background=photo of sks person",
        "--num_images_per_identity=60", "--num_inference_steps=2", "--resolution=64",
        f"--output_dir={out}",
    ]  # fmt: skip
    stopped = interrupt_when(command, "images to generate here", cwd=tmp_path, delay=1.5)
    assert stopped.returncode == 130, stopped.stdout[-3000:]
    assert stopped.stdout.strip().splitlines()[-1].startswith("inference_ID-Booth.py: interrupted")
    assert no_temps(out) == []
    finished = subprocess.run(command, cwd=tmp_path, env=ENV, capture_output=True, text=True)
    assert finished.returncode == 0, finished.stderr[-3000:]
    assert len(list(out.glob("*/*.png"))) == 120


def test_ctrl_c_in_evaluation_and_fr_training_is_one_line(demo_setup, tmp_path):
    root, models, identities, _, _ = demo_setup
    evaluate = [
        sys.executable, str(REPO_ROOT / "Evaluation" / "evaluate.py"), f"--generated={identities}",
        "--embedder=dlib", f"--feature_model={models['dinov2']}", "--feature_image_size=56",
        f"--out={tmp_path / 'report'}",
    ]  # fmt: skip
    stopped = interrupt_when(evaluate, "[evaluate]", cwd=tmp_path)
    assert stopped.returncode == 130 and "Traceback" not in stopped.stdout, stopped.stdout[-3000:]
    assert stopped.stdout.strip().splitlines()[-1].startswith("evaluate.py: interrupted")
    train_fr = [
        sys.executable, str(REPO_ROOT / "Evaluation" / "train_fr.py"), f"--data_dir={identities}",
        "--backbone=r18", "--batch_size=2", "--max_train_steps=500", "--mixed_precision=no",
        "--log_every=1", "--dataloader_num_workers=0", f"--output_dir={tmp_path / 'fr'}",
    ]  # fmt: skip
    stopped = interrupt_when(train_fr, "loss", cwd=tmp_path)
    assert stopped.returncode == 130 and "Traceback" not in stopped.stdout, stopped.stdout[-3000:]
    assert stopped.stdout.strip().splitlines()[-1].startswith("train_fr.py: interrupted")
    assert no_temps(tmp_path / "fr") == []


def test_demo_killed_during_set_up_never_reuses_a_partial_model(tmp_path, monkeypatch):
    real_save = torch.save

    def killed_while_saving(state, path, *args, **kwargs):
        Path(path).write_bytes(b"")  # what a kill mid-write leaves
        raise KeyboardInterrupt

    monkeypatch.setattr(torch, "save", killed_while_saving)
    with pytest.raises(KeyboardInterrupt):
        random_models.prepare_embedded_models(tmp_path / "models")
    assert not (tmp_path / "models" / "arcface_r18_random.pth").exists()
    monkeypatch.setattr(torch, "save", real_save)
    paths = random_models.prepare_embedded_models(tmp_path / "models")
    assert torch.load(paths["arcface"], weights_only=True)  # a whole, loadable checkpoint


def test_a_failing_demo_stage_is_one_line(tmp_path):
    done = subprocess.run(
        [sys.executable, str(REPO_ROOT / "demo.py"), f"--output_dir={tmp_path / 'demo'}",
         f"--pretrained_model_name_or_path={tmp_path / 'no_such_model'}"],
        cwd=tmp_path, env=ENV, capture_output=True, text=True, timeout=600,
    )  # fmt: skip
    assert done.returncode != 0
    last = done.stderr.strip().splitlines()[-1]
    assert last.startswith("demo.py: error:") and "no_such_model" in last
    assert "Traceback" not in done.stderr
