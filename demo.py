"""The paper's experiment in miniature: reproduce_ID-Booth.py on embedded models, tiny settings.

With no arguments everything is embedded and offline: a random-weight SD-2.1-shaped
pipeline, a random IResNet (ArcFace), a random CR-FIQA quality model and a random DINOv2
stand in for the real ones, and the identities are real people cut from the photos that
ship inside insightface's wheel (dlib's shipped detector finds them). All three variants
(dreambooth, identity, triplet) are trained, generated and evaluated side by side; the
report says on top which models are random, and its numbers are about plumbing, not
quality. Give real weights to run the same stages for real (or call reproduce_ID-Booth.py):

    python demo.py --pretrained_model_name_or_path stabilityai/stable-diffusion-2-1-base \\
        --arcface_weights ms1mv3_arcface_r100_fp16/backbone.pth \\
        --resolution 512 --max_train_steps 6400 \\
        --num_images_per_identity 21 --num_inference_steps 30
"""

from __future__ import annotations

import argparse
import os
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
    parser = runs.argument_parser(__doc__)
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
        "--quality_weights",
        type=Path,
        default=None,
        help="CR-FIQA checkpoint for the quality section; default: a random CR-FIQA(S) IResNet-50.",
    )
    parser.add_argument(
        "--resolution",
        type=runs.Number(int, low=8, multiple_of=8),
        default=64,
        help="Training and generation size.",
    )
    parser.add_argument(
        "--max_train_steps", type=runs.POSITIVE_INT, default=40, help="Training steps per identity."
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
        "crfiqa": models_dir / "crfiqa_r50_random.pth",
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
    if not paths["crfiqa"].is_file():
        with atomic_path(paths["crfiqa"]) as temp:
            torch.save(random_crfiqa().state_dict(), temp)
    return paths


def random_crfiqa():
    """A random CR-FIQA(S) IResNet-50 (the paper's model, so the paper's quality setting runs)
    with BatchNorm statistics of random faces (finite scores)."""
    import torch

    from random_models import calibrate_batchnorm

    sys.path.append(str(REPO_ROOT / "Evaluation"))
    from quality import build_crfiqa

    torch.manual_seed(0)
    faces = torch.rand((8, 3, 112, 112), generator=torch.Generator().manual_seed(1)) * 2 - 1
    return calibrate_batchnorm(build_crfiqa("r50"), [faces])


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


def random_models_banner(args: argparse.Namespace) -> str | None:
    """The report's banner naming the embedded random models this run uses, if any."""
    random = [
        name
        for name, given in (
            ("Stable Diffusion", args.pretrained_model_name_or_path),
            ("ArcFace (training)", args.arcface_weights),
            ("DINOv2", args.feature_model),
            ("CR-FIQA", args.quality_weights),
        )
        if not given
    ]
    if not random:
        return None
    return (
        f"Demo with random-weight models ({', '.join(random)}): the images are not faces and "
        "every number below is plumbing, not quality. Identity metrics use dlib's real "
        "embedder unless --arcface_weights is given."
    )


def reproduce_argv(args: argparse.Namespace, embedded: dict[str, Path], data: tuple) -> list[str]:
    """reproduce_ID-Booth.py's command line: the user's weights, else the embedded ones."""
    from datasets import list_images

    identities_root, class_dir, attributes_path = data
    # A random ArcFace says nothing about identity; dlib's shipped embedder is real.
    embedder = "arcface" if args.arcface_weights else "dlib"
    steps = args.max_train_steps
    argv = [
        f"--pretrained_model_name_or_path={args.pretrained_model_name_or_path or embedded['sd']}",
        f"--identities_root={identities_root}",
        f"--class_data_dir={class_dir}",
        f"--identity_attributes={attributes_path}",
        f"--arcface_weights={args.arcface_weights or embedded['arcface']}",
        f"--output_dir={args.output_dir}",
        f"--resolution={args.resolution}",
        f"--num_images_per_identity={args.num_images_per_identity}",
        "--face_detector=dlib",
        f"--embedder={embedder}",
        f"--feature_model={args.feature_model or embedded['dinov2']}",
        f"--quality_weights={args.quality_weights or embedded['crfiqa']}",
        f"--train_flags=--max_train_steps={steps} --checkpointing_steps={steps} "
        f"--validation_steps={steps} --num_class_images={len(list_images(class_dir))} "
        f"--logging_steps={max(1, steps // 20)}",
        f"--generate_flags=--num_inference_steps={args.num_inference_steps}",
    ]
    if not args.feature_model:
        argv.append("--evaluate_flags=--feature_image_size=56")
    banner = random_models_banner(args)
    return [*argv, f"--banner={banner}"] if banner else argv


def main(args: argparse.Namespace) -> dict:
    os.environ.setdefault(
        "HF_HUB_OFFLINE", "1" if args.pretrained_model_name_or_path is None else "0"
    )
    embedded = prepare_embedded_models(args.output_dir / "models")
    data = prepare_embedded_identities(args.output_dir / "data")
    reproduce = runs.load_script(REPO_ROOT / "reproduce_ID-Booth.py")
    result = reproduce.main(reproduce.parse_args(reproduce_argv(args, embedded, data)))
    if result:
        print(f"\nDone. Report: {result['report']}")
    return result


if __name__ == "__main__":
    reproduce_script = runs.load_script(REPO_ROOT / "reproduce_ID-Booth.py")
    runs.run_cli("demo.py", parse_args, main, errors=(reproduce_script.StageError,))
