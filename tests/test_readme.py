"""README: its list of differences from the reference code is complete, its examples current."""

from __future__ import annotations

import json
import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from conftest import REPO_ROOT
from test_pose_6drepnet import random_state as random_6drepnet_state

README = (REPO_ROOT / "README.md").read_text()


def section(title: str) -> str:
    start = README.index(f"## {title}")
    end = README.find("\n## ", start + 1)
    return README[start : end if end > 0 else None]


def test_the_differences_list_names_every_known_difference():
    differences = section("Where this differs from the reference code").lower()
    for known in (
        "aligned crops",
        "every instance sample",
        "class images",
        "--num_class_images",
        "clamp",
        '"none"',
        "side-portrait coin",
        "per-image seeds",
        "batched lora",
        "packed training",
        "pyeer",
        "dinov2-large",
        "augmentation",
        "non-finite",
        "fr utility protocol",
        "dropout",
        "6drepnet",
        "padded by 30 px",
        "not comparable with the paper",
        "cr-fiqa(s)",
        "bgr",
        "--quality_setting",
    ):
        assert known in differences, known


def test_examples_use_the_feature_model_dgm_eval_uses():
    assert "dinov2-base" not in README
    assert re.search(r"--feature_model facebook/dinov2-large", README)


# ------------------------------------------------------------------ README's code snippets

FENCE = re.compile(r"```(\w+)\n(.*?)```", re.S)
# Real weights and their tiny offline stand-ins (built by the fixture under these paths).
TINY_SUBSTITUTIONS = {
    "accelerate launch --num_processes 8 ": "accelerate launch --cpu --num_processes 1 ",
    "accelerate launch train_ID-Booth.py": "accelerate launch --cpu --num_processes 1 "
    "train_ID-Booth.py",
    "stabilityai/stable-diffusion-2-1-base": "models/tiny-sd",
    "facebook/dinov2-large": "models/tiny-dinov2",
}
# Appended to each script's command (argparse keeps the last value): tiny sizes, dlib faces,
# and the tiny models where a command relies on a default hub id.
TINY_MODELS = "--pretrained_model_name_or_path models/tiny-sd"
TINY_FLAGS = {
    "train_ID-Booth.py": "--resolution 64 --max_train_steps 2 --checkpointing_steps 2 "
    "--validation_steps 2 --num_class_images 4 --face_detector dlib",
    "inference_ID-Booth.py": f"{TINY_MODELS} --resolution 64 --num_inference_steps 2 "
    "--num_images_per_identity 2",
    "Evaluation/evaluate.py": "--face_detector dlib --feature_image_size 56",
    # Tiny random models draw no faces: the export adds the real photos (same identities).
    "Evaluation/export_faces.py": "--data_dir data/tufts --face_detector dlib",
    "Evaluation/train_fr.py": "--backbone r18 --batch_size 4 --max_train_steps 2 "
    "--mixed_precision no --dataloader_num_workers 0",
    "Evaluation/verify.py": "--device cpu",
    "reproduce_ID-Booth.py": f"{TINY_MODELS} --feature_model models/tiny-dinov2 --resolution 64 "
    "--num_images_per_identity 2 --face_detector dlib "
    "--train_flags '--max_train_steps 2 --checkpointing_steps 2 --validation_steps 2 "
    "--num_class_images 4' --generate_flags '--num_inference_steps 2' "
    "--evaluate_flags '--feature_image_size 56'",
}


def snippets(language: str = "bash") -> list[str]:
    return [body for lang, body in FENCE.findall(README) if lang == language]


def commands(snippet: str) -> list[str]:
    """The snippet's commands: continuation lines joined, comments and blank lines dropped."""
    joined = snippet.replace("\\\n", " ")
    lines = [line.strip() for line in joined.splitlines()]
    return [" ".join(line.split()) for line in lines if line and not line.startswith("#")]


def test_install_commands_are_the_ones_ci_and_the_demo_test_run():
    ci = (REPO_ROOT / ".ci" / "run").read_text().replace("--quiet ", "")
    demo_install, test_install = (commands(s)[0] for s in snippets()[:2])
    for step in test_install.split(" && ")[2:]:  # after the venv and its activation
        assert step in ci, step
    for step in demo_install.split(" && ")[2:-1]:
        assert step in ci, step
    assert demo_install.endswith("python demo.py --output_dir demo_output")
    demo_test = (REPO_ROOT / "tests" / "test_demo.py").read_text()
    assert '"demo.py"' in demo_test and "--output_dir=" in demo_test


@pytest.fixture(scope="module")
def readme_workspace(tmp_path_factory):
    """A folder laid out as README's commands expect, with tiny random models at the paths of
    the real ones and real faces (insightface's group photo, as in the demo) as identities."""
    import random_models

    root = tmp_path_factory.mktemp("readme")
    models = random_models.prepare_embedded_models(root / "models")
    identities, class_dir, attributes = random_models.prepare_embedded_identities(
        root / "demo_data"
    )
    (root / "data").mkdir()
    shutil.copytree(identities, root / "data" / "tufts")
    shutil.copytree(class_dir, root / "data" / "class_person")
    genders = json.loads(attributes.read_text())
    rows = [f"{name},{entry['gender']}" for name, entry in sorted(genders.items())]
    (root / "genders.csv").write_text("identity,gender\n" + "\n".join(rows) + "\n")
    write_verification_bins(root / "verification", root / "data" / "tufts")
    for source, target in (
        (models["arcface"], "ms1mv3_arcface_r100_fp16/backbone.pth"),
        (models["crfiqa"], "CR-FIQA/32572backbone.pth"),
    ):
        (root / target).parent.mkdir(parents=True)
        shutil.copy(source, root / target)
    torch.save(random_6drepnet_state(), root / "6DRepNet_300W_LP_AFLW2000.pth")
    return root


def write_verification_bins(folder: Path, identities: Path) -> None:
    """insightface-format .bin pair sets (20 pairs of the workspace's photos) under the names
    README's verify command reads."""
    import verify

    photos = sorted(identities.glob("*/*"))
    pairs = [(photos[i % len(photos)], photos[(i * 7 + 1) % len(photos)]) for i in range(20)]
    images = [path.read_bytes() for pair in pairs for path in pair]
    issame = [first.parent == second.parent for first, second in pairs]
    folder.mkdir()
    for name in ("lfw", "cfp_fp", "agedb_30", "calfw", "cplfw"):
        verify.write_bin(folder / f"{name}.bin", images, issame)


SCRIPT_PATH = re.compile(
    r"(?<![\w/])(train_ID-Booth\.py|inference_ID-Booth\.py|reproduce_ID-Booth\.py|"
    r"Evaluation/evaluate\.py|Evaluation/export_faces\.py|Evaluation/train_fr\.py|"
    r"Evaluation/verify\.py)"
)


def tiny(command: str) -> str:
    """A README command with the tiny stand-ins and sizes, and the scripts' absolute paths
    (README's commands run from the repo root; the test runs them in its workspace)."""
    for real, stand_in in TINY_SUBSTITUTIONS.items():
        command = command.replace(real, stand_in)
    script = next(name for name in TINY_FLAGS if name in command)
    command = SCRIPT_PATH.sub(lambda match: str(REPO_ROOT / match.group(1)), command)
    return f"{command} {TINY_FLAGS[script]}"


@pytest.mark.slow
def test_every_readme_snippet_runs_on_tiny_models(readme_workspace):
    """Every bash snippet after the two install commands, in README order (each one's outputs
    feed the next, as for a reader), on the tiny models; bibtex is not code."""
    env = {**os.environ, "HF_HUB_OFFLINE": "1"}
    env["PATH"] = f"{Path(sys.executable).parent}{os.pathsep}{env['PATH']}"  # venv's python
    ran = []
    for snippet in snippets()[2:]:
        for command in map(tiny, commands(snippet)):
            completed = subprocess.run(
                command, shell=True, cwd=readme_workspace, env=env, capture_output=True, text=True
            )
            assert completed.returncode == 0, f"{command}\n{completed.stderr[-3000:]}"
            ran.append(command)
    # reproduce; FR utility: generate, export, train, verify; train; generate; evaluate
    assert len(ran) == 8
    assert (readme_workspace / "experiment" / "report" / "report.html").is_file()
    assert list((readme_workspace / "faces" / "fr-triplet").glob("*/[0-9][0-9][0-9][0-9][0-9].png"))
    assert (readme_workspace / "fr" / "triplet" / "backbone.pth").is_file()
    assert len(list((readme_workspace / "generated" / "id-booth").glob("*/*.png"))) == 4
    metrics = json.loads((readme_workspace / "report" / "metrics.json").read_text())
    assert {"triplet", "dreambooth"} <= set(metrics["sets"])
