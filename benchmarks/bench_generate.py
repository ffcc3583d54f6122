"""Generation throughput: the reference recipe vs inference_ID-Booth.py at several batch sizes.

Both generate the same images (prompts, seeds, DDPM, guidance 5, the paper's negative prompt)
for I identities x N images from random-weight LoRAs on one random-weight pipeline:

- reference: the official recipe's loop re-typed: the stock pipeline, per identity
  `load_lora_weights` + `set_adapters`, one `pipeline(...)` call per image (or per run of
  `--reference_batch_sizes` images of that identity), `image.save` on the main thread,
  `unload_lora_weights`;
- ours: `inference_ID-Booth.main` itself (batches mixing identities on one batched LoRA,
  sampling.Sampler, PNG writes in worker threads), timed by its own summary (generation
  loop only; model loading excluded for both), once per `--batch_sizes` entry.

Each is warmed up on a separate output folder first (CUDA kernels, cuDNN autotuning). Ours runs
on the device accelerate picks (the GPU when there is one), so pass `--device` accordingly.
Prints one JSON object: images/s, peak memory and speed-ups over the reference at the same
batch size and over its best batch size. `--size tiny` runs anywhere in seconds; `--size sd21
--device cuda` gives SD 2.1-base shapes (random weights: only time and memory mean anything).
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
import time
from pathlib import Path

import torch

REPO_ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO_ROOT))  # shared modules at the repo root

import runs  # noqa: E402
from benchmarks.device_clock import peak_gib, reset_peak, timed  # noqa: E402
from lora import lora_target_modules  # noqa: E402
from random_models import build_tiny_sd, write_random_lora  # noqa: E402

# size (random_models.RANDOM_MODEL_NAMES) -> resolution: each supported base, real and tiny.
SIZES = {
    "tiny": 64,
    "tiny-sd15": 64,
    "tiny-sd21-v": 64,
    "tiny-sdxl": 64,
    "sd15": 512,
    "sd21": 512,
    "sd21-v": 768,
    "sdxl": 1024,
}
GENDERS_NAME = "genders.csv"  # beside the LoRA folders; the paper's prompts need a gender
PRECISIONS = {"no": torch.float32, "fp16": torch.float16, "bf16": torch.bfloat16}


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = runs.argument_parser(__doc__)
    parser.add_argument("--size", choices=sorted(SIZES), default="tiny", help="Model shapes.")
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument(
        "--mixed_precision",
        choices=sorted(PRECISIONS),
        default=None,
        help="Default: fp16 on CUDA (the paper's), no on CPU.",
    )
    parser.add_argument("--identities", type=runs.POSITIVE_INT, default=4)
    parser.add_argument("--images_per_identity", type=runs.POSITIVE_INT, default=8)
    parser.add_argument(
        "--steps",
        type=runs.POSITIVE_INT,
        default=None,
        help="Denoising steps. Default: 30 (the paper's) for real shapes, 4 for tiny ones.",
    )
    parser.add_argument(
        "--batch_sizes", type=runs.POSITIVE_INT, nargs="+", default=[1, 16], help="Ours."
    )
    parser.add_argument(
        "--reference_batch_sizes",
        type=runs.POSITIVE_INT,
        nargs="+",
        default=[1, 16],
        help="The stock pipeline's (images of one identity per call).",
    )
    parser.add_argument("--workdir", type=Path, default=None, help="Default: a temp folder.")
    parser.add_argument(
        "--format",
        choices=["json", "markdown"],
        default="json",
        help="markdown: the row of benchmarks/README.md's table.",
    )
    args = parser.parse_args(argv)
    args.mixed_precision = args.mixed_precision or ("fp16" if args.device == "cuda" else "no")
    args.steps = args.steps or (4 if args.size.startswith("tiny") else 30)
    return args


def write_loras(workdir: Path, model: Path, count: int) -> Path:
    """`count` random non-zero rank-4 LoRAs in train_ID-Booth.py's file format, and genders."""
    from diffusers import UNet2DConditionModel

    root = workdir / "loras"
    unet = UNet2DConditionModel.from_pretrained(model / "unet")
    for index in range(count):
        folder = root / f"identity_{index}"
        if not (folder / "pytorch_lora_weights.safetensors").exists():
            targets = lora_target_modules(unet)
            write_random_lora(folder, unet, target_modules=targets, seed=index, std=0.05)
    genders = [f"identity_{i},{('male', 'female')[i % 2]}" for i in range(count)]
    (root / GENDERS_NAME).write_text("identity,gender\n" + "\n".join(genders) + "\n")
    return root


def inference_argv(args, model: Path, loras: Path, output: Path, batch_size: int) -> list[str]:
    return [
        f"--pretrained_model_name_or_path={model}",
        f"--lora_root={loras}",
        f"--output_dir={output}",
        f"--num_images_per_identity={args.images_per_identity}",
        f"--num_inference_steps={args.steps}",
        f"--resolution={SIZES[args.size]}",
        f"--mixed_precision={args.mixed_precision}",
        f"--batch_size={batch_size}",
        f"--identity_attributes={loras / GENDERS_NAME}",
    ]


def measure_reference(inference, args, model: Path, loras: Path, output: Path, batch: int) -> dict:
    """The official recipe's loop on the same jobs, `batch` consecutive images of one identity
    per pipeline call; seconds exclude the model load."""
    device = torch.device(args.device)
    inference_args = inference.parse_args(inference_argv(args, model, loras, output, batch))
    inference_args.resolved_mixed_precision = args.mixed_precision
    pipeline = inference.load_generation_pipeline(inference_args).to(
        device, PRECISIONS[args.mixed_precision]
    )
    sources = inference.lora_sources(inference_args)
    genders = inference.resolve_genders(sources, inference_args.identity_attributes)

    def generate(names: list[str], images: int, folder: Path) -> None:
        for name in names:
            pipeline.load_lora_weights(str(loras / name), adapter_name="identity")
            pipeline.set_adapters(["identity"], adapter_weights=[1.0])
            (folder / name).mkdir(parents=True, exist_ok=True)
            for start in range(0, images, batch):
                indices = range(start, min(start + batch, images))
                jobs = [
                    inference.plan_image(inference_args, name, genders[name], i) for i in indices
                ]
                output = pipeline(
                    [job.prompt for job in jobs],
                    negative_prompt=[inference_args.negative_prompt] * len(jobs),
                    generator=[torch.Generator("cpu").manual_seed(job.seed) for job in jobs],
                    num_inference_steps=args.steps,
                    guidance_scale=inference_args.guidance_scale,
                    height=inference_args.resolution,
                    width=inference_args.resolution,
                )
                for job, image in zip(jobs, output.images, strict=True):
                    image.save(folder / name / f"{job.index}.png")
            pipeline.unload_lora_weights()

    names = [source.name for source in sources]
    generate(names[:1], min(batch, args.images_per_identity), output / "warmup")
    reset_peak(device)
    seconds = timed(device, lambda: generate(names, args.images_per_identity, output / "timed"), 1)
    images = len(names) * args.images_per_identity
    return {
        "images": images,
        "seconds": round(seconds, 3),
        "peak_gib": peak_gib(device),
        "images_per_second": round(images / seconds, 3),
    }


def measure_ours(inference, args, model: Path, loras: Path, output: Path, batch: int) -> dict:
    """inference_ID-Booth.main at one batch size; its summary times the generation loop."""
    device = torch.device(args.device)
    # The same run into another folder: every batch shape the timed run meets is warm.
    inference.main(
        inference.parse_args(inference_argv(args, model, loras, output / "warmup", batch))
    )
    reset_peak(device)
    summary = inference.main(
        inference.parse_args(inference_argv(args, model, loras, output / "timed", batch))
    )
    if summary["failed"]:
        raise RuntimeError(f"the generation run failed images: {summary}")
    return {
        "images": summary["written"],
        "seconds": summary["seconds"],
        "peak_gib": peak_gib(device),
        "images_per_second": summary["images_per_second"],
    }


def main(args: argparse.Namespace) -> dict:
    inference = runs.load_script(REPO_ROOT / "inference_ID-Booth.py")
    with tempfile.TemporaryDirectory() as temp:
        workdir = args.workdir or Path(temp)
        model = workdir / f"sd-{args.size}"
        if not (model / "model_index.json").exists():
            build_tiny_sd(model, size=args.size)
        loras = write_loras(workdir, model, args.identities)
        reference = {
            f"batch_{batch}": measure_reference(
                inference, args, model, loras, workdir / f"reference_b{batch}", batch
            )
            for batch in args.reference_batch_sizes
        }
        best = max(timing["images_per_second"] for timing in reference.values())
        ours = {}
        for batch in args.batch_sizes:
            timing = measure_ours(inference, args, model, loras, workdir / f"ours_b{batch}", batch)
            same = reference.get(f"batch_{batch}")
            ratios = {"speedup_vs_best_reference": round(timing["images_per_second"] / best, 3)}
            if same is not None:
                ratio = timing["images_per_second"] / same["images_per_second"]
                ratios["speedup_vs_reference_same_batch"] = round(ratio, 3)
            ours[f"batch_{batch}"] = timing | ratios
    result = {
        "benchmark": "generate",
        "device": torch.cuda.get_device_name(0) if args.device == "cuda" else args.device,
        "size": args.size,
        "resolution": SIZES[args.size],
        "mixed_precision": args.mixed_precision,
        "steps": args.steps,
        "identities": args.identities,
        "images_per_identity": args.images_per_identity,
        "torch": torch.__version__,
        "reference": reference,
        "ours": ours,
    }
    print(markdown(result) if args.format == "markdown" else json.dumps(result, indent=2))
    return result


def markdown(result: dict) -> str:
    """benchmarks/README.md's table: images/s (speed-up over the reference at the same B)."""
    reference, ours = result["reference"], result["ours"]
    header = [f"reference B={key[6:]}" for key in reference] + [f"ours B={key[6:]}" for key in ours]
    cells = [f"{row['images_per_second']:.1f}" for row in reference.values()]
    for row in ours.values():
        same = row.get("speedup_vs_reference_same_batch")
        cells.append(f"{row['images_per_second']:.1f}" + (f" ({same:.2f}x)" if same else ""))
    peak = max((row.get("peak_gib") or 0 for row in ours.values()), default=0) or "-"
    return "\n".join(
        [
            "| date | device | size | precision | steps | " + " | ".join(header) + " | peak GiB |",
            "|---|---|---|---|---|" + "---|" * len(header) + "---|",
            f"| {time.strftime('%Y-%m-%d')} | {result['device']} | {result['size']} "
            f"({result['resolution']} px, {result['identities']} x "
            f"{result['images_per_identity']} images) | {result['mixed_precision']} "
            f"| {result['steps']} | " + " | ".join(cells) + f" | {peak} |",
        ]
    )


if __name__ == "__main__":
    main(parse_args())
