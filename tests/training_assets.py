"""Shared inputs of test_train.py (the script) and test_trainer.py (the module): tiny models,
real faces and the command line of a few-step CPU run.

Identity photos are real people (insightface's shipped Tom Hanks crop and faces cut from its
t1.jpg group photo) so dlib's real detector finds their landmarks. Class images are real faces
too, plus ones the script samples with the tiny pipeline (faceless: they stay prior samples, and
the triplet term of the instance sample paired with one is masked out and counted).
"""

from __future__ import annotations

import os
import subprocess
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from PIL import Image
from safetensors.torch import load_file

import runs

REPO_ROOT = Path(__file__).resolve().parents[1]
SCRIPT = REPO_ROOT / "train_ID-Booth.py"
RESOLUTION = 64

train = runs.load_script(SCRIPT)


@dataclass
class Assets:
    sd: Path
    arcface: Path
    identities: Path
    class_dir: Path
    root: Path

    def identity(self, name: str) -> Path:
        return self.identities / name


def _face_crop(image: Image.Image, box, scale: float, shift: float) -> Image.Image:
    """96x96 square crop around a dlib face box, `scale` times its width, shifted right."""
    left, top, right, bottom = box
    half = (right - left) * scale / 2
    cx, cy = (left + right) / 2 + shift * (right - left), (top + bottom) / 2
    square = (int(cx - half), int(cy - half), int(cx + half), int(cy + half))
    return image.crop(square).resize((96, 96), Image.Resampling.BICUBIC)


def make_assets(root: Path) -> Assets:
    """Tiny SD, random IResNet-18 checkpoint, two identities and a class folder of real faces."""
    import dlib
    import insightface
    from tiny_sd import build_tiny_sd

    from arcface import build_iresnet

    sd = build_tiny_sd(root / "tiny-sd")
    torch.manual_seed(0)
    arcface_path = root / "arcface_r18.pth"
    torch.save(build_iresnet("r18").state_dict(), arcface_path)

    photos = Path(insightface.__file__).parent / "data" / "images"
    group = Image.open(photos / "t1.jpg").convert("RGB")
    group = group.resize((group.width * 2, group.height * 2), Image.Resampling.BICUBIC)
    rects = dlib.get_frontal_face_detector()(np.asarray(group), 0)
    boxes = sorted((r.left(), r.top(), r.right(), r.bottom()) for r in rects)
    assert len(boxes) == 6, "t1.jpg shows six people"

    hanks_dir = root / "identities" / "hanks"
    hanks_dir.mkdir(parents=True)
    hanks = Image.open(photos / "Tom_Hanks_54745.png").convert("RGB")
    hanks.resize((128, 128), Image.Resampling.BICUBIC).save(hanks_dir / "h0.png")
    hanks.crop((8, 8, 104, 104)).resize((96, 96), Image.Resampling.BICUBIC).save(
        hanks_dir / "h1.png"
    )
    person_dir = root / "identities" / "person0"
    person_dir.mkdir()
    _face_crop(group, boxes[0], 1.8, 0.0).save(person_dir / "p0.png")
    _face_crop(group, boxes[0], 2.0, 0.05).save(person_dir / "p1.png")
    class_dir = root / "class"
    class_dir.mkdir()
    for index in (3, 4):
        _face_crop(group, boxes[index], 1.8, 0.0).save(class_dir / f"person{index}.png")
    return Assets(sd, arcface_path, root / "identities", class_dir, root)


def cli(assets: Assets, output_dir: Path, *extra: str, class_dir: Path | None = None) -> list[str]:
    """Flags of a few-step CPU run on the tiny models (extra flags win)."""
    return [
        f"--pretrained_model_name_or_path={assets.sd}",
        f"--class_data_dir={class_dir or assets.class_dir}",
        f"--arcface_weights={assets.arcface}",
        "--face_detector=dlib",
        f"--resolution={RESOLUTION}",
        "--mixed_precision=no",
        "--num_class_images=2",
        "--class_num_inference_steps=2",
        "--validation_num_inference_steps=2",
        "--num_validation_images=1",
        "--logging_steps=1",
        "--learning_rate=1e-2",
        f"--output_dir={output_dir}",
        *extra,
    ]


def run_cli(command: list[str], timeout: int = 300) -> subprocess.CompletedProcess:
    env = dict(os.environ, OMP_NUM_THREADS="1", MKL_NUM_THREADS="1", HF_HUB_OFFLINE="1")
    result = subprocess.run(
        command, cwd=REPO_ROOT, env=env, capture_output=True, text=True, timeout=timeout
    )
    assert result.returncode == 0, f"exit {result.returncode}\n{result.stdout}\n{result.stderr}"
    return result


def lora_weights(folder: Path) -> dict[str, torch.Tensor]:
    return load_file(str(folder / train.LORA_WEIGHTS_NAME))


def assert_same_lora(a: Path, b: Path, atol: float = 1e-6) -> None:
    first, second = lora_weights(a), lora_weights(b)
    assert first.keys() == second.keys()
    for key in first:
        torch.testing.assert_close(first[key], second[key], rtol=1e-5, atol=atol, msg=key)
