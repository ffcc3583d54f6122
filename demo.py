"""The paper's experiment in miniature: reproduce_ID-Booth.py on embedded models, tiny settings.

With no arguments everything is embedded and offline: a random-weight SD-2.1-shaped
pipeline, a random IResNet (ArcFace), a random CR-FIQA quality model and a random DINOv2
stand in for the real ones, and the identities are real people cut from the photos that
ship inside insightface's wheel (dlib's shipped detector finds them). All three variants
(dreambooth, identity, triplet) are trained, generated and evaluated side by side; the
report says on top which models are random, and its numbers are about plumbing, not
quality. The face-recognition utility stage runs too, with a tiny FR model (IResNet-18, one
epoch) and a tiny verification .bin cut from the same real faces (not LFW & co.); random SD
makes no faces, so there the synthetic rows say so and real + synthetic (it would repeat the
real row) is left out.
Give real weights to run the same stages for real (or call reproduce_ID-Booth.py):

    python demo.py --pretrained_model_name_or_path stabilityai/stable-diffusion-2-1-base \\
        --arcface_weights ms1mv3_arcface_r100_fp16/backbone.pth \\
        --resolution 512 --max_train_steps 6400 \\
        --num_images_per_identity 21 --num_inference_steps 30
"""

from __future__ import annotations

import argparse
import os
from pathlib import Path

import runs
from random_models import (
    prepare_demo_benchmark,
    prepare_embedded_identities,
    prepare_embedded_models,
)

REPO_ROOT = Path(__file__).resolve().parent
# train_fr.py in seconds on a CPU: the official protocol's mechanics on a tiny model.
DEMO_FR_FLAGS = (
    "--backbone=r18 --embedding_size=64 --batch_size=8 --learning_rate=0.01 --num_epochs=1 "
    "--mixed_precision=no --dataloader_num_workers=0 --checkpointing_steps=1000"
)


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
    benchmarks = prepare_demo_benchmark(identities_root.parent)
    fr_settings = ["real", "synthetic"]
    if args.pretrained_model_name_or_path:  # random SD makes no faces: it would repeat "real"
        fr_settings.append("real+synthetic")
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
        f"--fr_benchmarks={benchmarks}",
        f"--fr_flags={DEMO_FR_FLAGS}",
        "--fr_settings",
        *fr_settings,
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
