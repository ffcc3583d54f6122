"""End-to-end ID-Booth run: identity data -> LoRA training -> generation -> evaluation.

With no arguments everything is embedded and offline: a random-weight SD-2.1-shaped
pipeline and a random IResNet stand in for SD 2.1-base and ArcFace, and the identities
are real people cut from the photos that ship inside insightface's wheel (dlib's
shipped detector finds them). The numbers it prints are therefore about plumbing, not
quality. Give real weights to run the same stages for real:

    python demo.py --pretrained_model_name_or_path stabilityai/stable-diffusion-2-1-base \\
        --arcface_weights ms1mv3_arcface_r100_fp16/backbone.pth \\
        --resolution 512 --max_train_steps 6400 \\
        --num_images_per_identity 21 --num_inference_steps 30
"""

from __future__ import annotations

import argparse
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
from PIL import Image

import runs

REPO_ROOT = Path(__file__).resolve().parent
# Faces of t1.jpg (six people), left to right; the first two (both women) become identities,
# the other four are prior (class) images.
NUM_DEMO_IDENTITIES = 2
CROP_VARIANTS = ((2.4, 0.0, 0.0), (2.8, 0.08, 0.0), (2.6, -0.08, 0.05), (3.0, 0.0, -0.05))


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        description=__doc__.split("\n\n")[0],
        formatter_class=argparse.ArgumentDefaultsHelpFormatter,
    )
    parser.add_argument(
        "--output_dir", type=Path, default=Path("demo_output"), help="Where every stage writes."
    )
    parser.add_argument(
        "--pretrained_model_name_or_path",
        default=None,
        help="SD 2.1-base hub id or local folder; default: a random tiny pipeline built offline.",
    )
    parser.add_argument(
        "--arcface_weights",
        type=Path,
        default=None,
        help="arcface_torch backbone.pth or ONNX recogniser; default: a random IResNet-18.",
    )
    parser.add_argument(
        "--feature_model",
        default=None,
        help="DINOv2 path or hub id for diversity/fidelity; default: a random tiny DINOv2.",
    )
    parser.add_argument(
        "--resolution",
        type=runs.Number(int, low=8, multiple_of=8),
        default=64,
        help="Training and generation size.",
    )
    parser.add_argument(
        "--max_train_steps", type=runs.POSITIVE_INT, default=6, help="Training steps per identity."
    )
    parser.add_argument(
        "--num_images_per_identity",
        type=runs.POSITIVE_INT,
        default=3,
        help="Images generated per identity.",
    )
    parser.add_argument(
        "--num_inference_steps", type=runs.POSITIVE_INT, default=4, help="Sampler steps per image."
    )
    args = parser.parse_args(argv)
    runs.check_numbers(args, parser)
    return args


class StageError(RuntimeError):
    """One of the pipeline's scripts exited with an error (its own message is printed above)."""


def run_stage(name: str, script: str, arguments: list[str]) -> None:
    """Run one of the project's scripts as a user would; StageError naming it if it fails."""
    print(f"\n=== {name}: python {script} {' '.join(arguments)}", flush=True)
    completed = subprocess.run([sys.executable, str(REPO_ROOT / script), *arguments])
    if completed.returncode != 0:
        raise StageError(
            f"the {name} stage ({script}) failed with exit code {completed.returncode}; its "
            "error is printed above. Finished outputs are kept: re-run to resume"
        )


def prepare_embedded_models(models_dir: Path) -> dict[str, Path]:
    """Random tiny SD pipeline, IResNet-18 checkpoint and DINOv2, built once."""
    import torch

    from arcface import build_iresnet
    from fileio import atomic_folder, atomic_path
    from random_models import build_tiny_dinov2, build_tiny_sd

    paths = {
        "sd": models_dir / "tiny-sd",
        "arcface": models_dir / "arcface_r18_random.pth",
        "dinov2": models_dir / "tiny-dinov2",
    }
    # Each model is written to a temp name and renamed when complete, so a demo killed during
    # set-up leaves no half-written model that a rerun would trust.
    if not paths["sd"].is_dir():
        with atomic_folder(paths["sd"]) as temp:
            build_tiny_sd(temp)
    if not paths["arcface"].is_file():
        torch.manual_seed(0)
        with atomic_path(paths["arcface"]) as temp:
            torch.save(build_iresnet("r18").state_dict(), temp)
    if not paths["dinov2"].is_dir():
        with atomic_folder(paths["dinov2"]) as temp:
            build_tiny_dinov2(temp)
    return paths


def crop_face(
    photo: Image.Image, landmarks: np.ndarray, scale: float, dx: float, dy: float
) -> Image.Image:
    """Square crop around the 5 landmarks, `scale` times the eye-mouth extent, shifted."""
    centre = landmarks.mean(axis=0)
    extent = float(np.ptp(landmarks, axis=0).max()) * scale
    cx, cy = centre[0] + dx * extent, centre[1] + dy * extent
    box = (cx - extent / 2, cy - extent / 2, cx + extent / 2, cy + extent / 2)
    return photo.crop(tuple(int(round(v)) for v in box)).resize((256, 256), Image.BICUBIC)


def prepare_embedded_identities(data_dir: Path) -> tuple[Path, Path, Path]:
    """Identity folders and a prior folder cut from insightface's shipped group photo."""
    import insightface

    from faces import DlibFaceDetector
    from fileio import atomic_write_json

    identities_root, class_dir = data_dir / "identities", data_dir / "class"
    attributes_path = data_dir / "identity_attributes.json"
    if attributes_path.exists():
        return identities_root, class_dir, attributes_path
    images_dir = Path(insightface.__file__).parent / "data" / "images"
    photo = Image.open(images_dir / "t1.jpg").convert("RGB")
    upsampled = photo.resize((photo.width * 2, photo.height * 2), Image.BICUBIC)
    faces = DlibFaceDetector().detect_all_landmarks(np.asarray(upsampled))
    faces = sorted(faces, key=lambda points: points[:, 0].mean())
    if len(faces) < NUM_DEMO_IDENTITIES + 1:
        raise RuntimeError(
            f"expected six faces in {images_dir / 't1.jpg'}, dlib found {len(faces)}"
        )
    for index, landmarks in enumerate(faces):
        is_identity = index < NUM_DEMO_IDENTITIES
        folder = identities_root / f"person_{index}" if is_identity else class_dir
        folder.mkdir(parents=True, exist_ok=True)
        variants = CROP_VARIANTS if is_identity else CROP_VARIANTS[:2]
        for variant, (scale, dx, dy) in enumerate(variants):
            crop_face(upsampled, landmarks, scale, dx, dy).save(
                folder / f"person_{index}_{variant}.png"
            )
    attributes = {f"person_{index}": {"gender": "female"} for index in range(NUM_DEMO_IDENTITIES)}
    atomic_write_json(attributes_path, attributes)  # written last: the marker of a finished set-up
    return identities_root, class_dir, attributes_path


def evaluation_models(args: argparse.Namespace, embedded: dict[str, Path]) -> list[str]:
    """Embedder and feature-model flags: the user's weights, else real dlib + random DINOv2."""
    # A random ArcFace says nothing about identity; dlib's shipped embedder is real.
    if args.arcface_weights:
        flags = ["--embedder=arcface", f"--arcface_weights={args.arcface_weights}"]
    else:
        flags = ["--embedder=dlib"]
    if args.feature_model:
        return [*flags, f"--feature_model={args.feature_model}"]
    return [*flags, f"--feature_model={embedded['dinov2']}", "--feature_image_size=56"]


def main(args: argparse.Namespace) -> None:
    from datasets import list_images

    os.environ.setdefault(
        "HF_HUB_OFFLINE", "1" if args.pretrained_model_name_or_path is None else "0"
    )
    out = args.output_dir
    embedded = prepare_embedded_models(out / "models")
    sd_path = args.pretrained_model_name_or_path or str(embedded["sd"])
    arcface_path = args.arcface_weights or embedded["arcface"]
    identities_root, class_dir, attributes_path = prepare_embedded_identities(out / "data")
    common = [f"--pretrained_model_name_or_path={sd_path}", f"--resolution={args.resolution}"]
    run_stage(
        "train",
        "train_ID-Booth.py",
        [
            *common,
            f"--identities_root={identities_root}",
            f"--class_data_dir={class_dir}",
            f"--num_class_images={len(list_images(class_dir))}",
            f"--arcface_weights={arcface_path}",
            "--face_detector=dlib",
            f"--max_train_steps={args.max_train_steps}",
            f"--checkpointing_steps={args.max_train_steps}",
            f"--validation_steps={args.max_train_steps}",
            f"--output_dir={out / 'loras'}",
        ],
    )
    run_stage(
        "generate",
        "inference_ID-Booth.py",
        [
            *common,
            f"--lora_root={out / 'loras'}",
            f"--identity_attributes={attributes_path}",
            f"--num_images_per_identity={args.num_images_per_identity}",
            f"--num_inference_steps={args.num_inference_steps}",
            f"--output_dir={out / 'generated'}",
        ],
    )
    run_stage(
        "evaluate",
        "Evaluation/evaluate.py",
        [
            f"--generated=ID-Booth={out / 'generated'}",
            f"--real={identities_root}",
            "--face_detector=dlib",
            *evaluation_models(args, embedded),
            f"--out={out / 'report'}",
        ],
    )
    print(f"\nDone. Report: {out / 'report' / 'report.html'}")


if __name__ == "__main__":
    runs.run_cli("demo.py", parse_args, main, errors=(StageError,))
