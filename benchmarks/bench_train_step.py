"""Training throughput: the reference recipe vs this project's trainer, 1 and K identities a step.

Both train LoRAs on the same random-weight models with the triplet identity loss, batch = 1
instance + 1 prior image per identity:

- reference: the official recipe's step re-typed (a peft LoRA; prompts re-encoded every step,
  the VAE encode every step, the identity term on the first instance sample only with a host
  crop of the decoded image, every loss read with `.item()` each step);
- ours: `trainer.PackedTrainer.step()` itself, on identities written to disk and
  annotated by the real data path (a template "detector" stands in for a face detector, since
  random images have no faces): cached latent distributions, device-side tables, per-identity
  AdamW, schedule, grad scaler and bookkeeping, K identities per step (`--packs`).

A random IResNet with arcface_torch's init overflows at depth 100, so its BatchNorm statistics
are calibrated on random faces first (finite, unit-norm embeddings); every loss is checked
finite. Prints one JSON object: seconds per step, per identity-step, identity-term images/s,
peak memory, ratios to the reference. `--size tiny` runs anywhere in seconds; `--size sd21
--device cuda` measures the SD 2.1-base shapes (random weights: only time and memory mean
anything). On CUDA the timed steps of ours run under `torch.cuda.set_sync_debug_mode("error")`.
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image

REPO_ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO_ROOT))  # shared modules at the repo root

import runs  # noqa: E402
from arcface import build_iresnet, load_arcface  # noqa: E402
from faces import ARCFACE_DST  # noqa: E402
from losses import (  # noqa: E402
    predict_x0,
    timestep_weight,
    triplet_identity_loss,
)
from random_models import build_tiny_sd, calibrate_batchnorm  # noqa: E402
from trainer import (  # noqa: E402
    WEIGHT_DTYPES,
    FaceTools,
    PackedTrainer,
    PromptEmbeddings,
    load_frozen_models,
    place,
)

SIZES = {"tiny": (64, "r18"), "sd21": (512, "r100")}  # size -> (resolution, IResNet depth)
PHOTOS_PER_IDENTITY = 2  # R x R photos: one crop each, so the latent cache is warm after warmup


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = runs.argument_parser(__doc__)
    parser.add_argument("--size", choices=sorted(SIZES), default="tiny", help="Model shapes.")
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument(
        "--mixed_precision",
        choices=["no", "fp16", "bf16"],
        default=None,
        help="Default: bf16 on CUDA, no on CPU.",
    )
    parser.add_argument(
        "--packs", type=runs.POSITIVE_INT, nargs="+", default=[1, 2, 4, 8], help="K values."
    )
    parser.add_argument("--steps", type=runs.POSITIVE_INT, default=10, help="Timed steps.")
    parser.add_argument("--warmup", type=runs.POSITIVE_INT, default=3, help="Untimed steps.")
    parser.add_argument(
        "--rounds", type=runs.POSITIVE_INT, default=3, help="Timed rounds; the median is kept."
    )
    parser.add_argument("--compile", action="store_true", help="torch.compile our UNet.")
    parser.add_argument("--workdir", type=Path, default=None, help="Where models are built.")
    args = parser.parse_args(argv)
    runs.check_numbers(args, parser)
    return args


# ------------------------------------------------------------------------------ models, data


def calibrated_iresnet(depth: str, seed: int = 0, faces: int = 16) -> torch.nn.Module:
    """A random arcface_torch IResNet whose BatchNorm statistics are those of random faces
    (cumulative averages over a few train-mode passes): finite embeddings at any depth."""
    torch.manual_seed(seed)
    batches = [torch.rand(faces, 3, 112, 112) * 2 - 1 for _ in range(4)]
    return calibrate_batchnorm(build_iresnet(depth), batches)


def build_models(workdir: Path, size: str) -> tuple[Path, Path]:
    """Random pipeline folder and calibrated random IResNet checkpoint (built once)."""
    sd_dir, arcface_path = workdir / f"sd-{size}", workdir / f"arcface-{SIZES[size][1]}.pth"
    if not (sd_dir / "model_index.json").exists():
        build_tiny_sd(sd_dir, size=size)
    if not arcface_path.exists():
        torch.save(calibrated_iresnet(SIZES[size][1]).state_dict(), arcface_path)
    return sd_dir, arcface_path


class TemplateDetector:
    """Stands in for a face detector on random photos: the ArcFace template, scaled."""

    name = "template"

    def detect_landmarks(self, image: np.ndarray) -> np.ndarray:
        height, width = image.shape[:2]
        return (ARCFACE_DST * np.array([width, height]) / 112.0).astype(np.float32)


def write_identities(workdir: Path, count: int, resolution: int) -> tuple[Path, Path]:
    """`count` identities of random R x R photos and a folder of random class images."""
    rng = np.random.default_rng(0)
    root, class_dir = workdir / f"identities-{resolution}", workdir / f"class-{resolution}"
    for index in range(max(count, 1)):
        folder = root / f"id_{index:02d}"
        folder.mkdir(parents=True, exist_ok=True)
        for photo in range(PHOTOS_PER_IDENTITY):
            pixels = rng.integers(0, 255, (resolution, resolution, 3), dtype=np.uint8)
            Image.fromarray(pixels).save(folder / f"{photo}.png")
    class_dir.mkdir(parents=True, exist_ok=True)
    for photo in range(PHOTOS_PER_IDENTITY):
        pixels = rng.integers(0, 255, (resolution, resolution, 3), dtype=np.uint8)
        Image.fromarray(pixels).save(class_dir / f"class_{photo:05d}.png")
    return root, class_dir


# ------------------------------------------------------------------------------ the reference


def reference_unet(args, device: torch.device, precision: str):
    """The reference's UNet: a peft LoRA adapter (rank 4, gaussian), weights in `precision`."""
    from diffusers import UNet2DConditionModel
    from diffusers.training_utils import cast_training_params
    from peft import LoraConfig

    unet = UNet2DConditionModel.from_pretrained(
        args.pretrained_model_name_or_path, subfolder="unet"
    )
    unet.requires_grad_(False)
    targets = ["to_k", "to_q", "to_v", "to_out.0"]
    unet.add_adapter(
        LoraConfig(r=4, lora_alpha=4, init_lora_weights="gaussian", target_modules=targets)
    )
    place(unet, device, WEIGHT_DTYPES[precision])
    cast_training_params(unet, dtype=torch.float32)
    return unet


def host_bbox_faces(decoded: torch.Tensor, landmarks: torch.Tensor) -> torch.Tensor:
    """Reference-style crop: landmark bounding box (+margin) cut on the host, resized to 112."""
    boxes = landmarks.cpu().numpy()  # host sync, as the reference's detector needs
    faces = []
    for image, points in zip(decoded, boxes, strict=True):
        low, high = points.min(0), points.max(0)
        margin = (high - low).max() * 0.6
        x0, y0 = np.maximum(low - margin, 0).astype(int)
        x1, y1 = np.minimum(high + margin, image.shape[-1]).astype(int)
        crop = image[:, y0:y1, x0:x1].float().cpu()  # device -> host copy of the image
        faces.append(F.interpolate(crop[None], size=(112, 112), mode="bilinear")[0])
    return torch.stack(faces).to(decoded.device)


def reference_step(unet, frozen, optimizer, batch: dict, generator, args) -> float:
    """One step of the reference recipe; returns its loss (read on the host every step)."""
    device, scheduler = frozen.device, frozen.noise_scheduler
    with frozen.autocast():
        pixels = batch["pixel_values"].to(device, frozen.weight_dtype)
        with torch.no_grad():
            prompts = PromptEmbeddings.encode(frozen, args)  # every step, as the reference does
            latents = frozen.vae.encode(pixels).latent_dist.sample(generator)
            latents = latents * frozen.vae.config.scaling_factor
        noise = torch.randn(latents.shape, generator=generator, device=device, dtype=latents.dtype)
        timesteps = torch.randint(0, 1000, (2,), generator=generator, device=device)
        noisy = scheduler.add_noise(latents, noise, timesteps)
        text = torch.cat([prompts.instance, prompts.class_])
        model_pred = unet(noisy, timesteps, text, return_dict=False)[0]
        instance_loss = F.mse_loss(model_pred[:1].float(), noise[:1].float())
        prior_loss = F.mse_loss(model_pred[1:].float(), noise[1:].float())
        loss = instance_loss + args.prior_loss_weight * prior_loss
        x0 = predict_x0(
            noisy[:1], model_pred[:1], timesteps[:1], scheduler.alphas_cumprod, "epsilon"
        )
        decoded = frozen.vae.decode(
            x0.to(frozen.vae.dtype) / frozen.vae.config.scaling_factor
        ).sample
        anchor = frozen.arcface(host_bbox_faces(decoded.clamp(-1, 1), batch["landmarks"][:1]))
        embeddings = batch["embeddings"].to(device)
        triplet = triplet_identity_loss(anchor, embeddings[:1], embeddings[1:2])
        loss = loss + (timestep_weight(timesteps[:1]) * triplet).mean()
    loss.backward()
    torch.nn.utils.clip_grad_norm_([p for p in unet.parameters() if p.requires_grad], 1.0)
    optimizer.step()
    optimizer.zero_grad(set_to_none=True)
    value = loss.item()  # per-step logging, as the reference does
    if not np.isfinite(value):
        raise RuntimeError(f"the reference step gave a non-finite loss {value}")
    return value


def reference_batch(resolution: int) -> dict:
    generator = torch.Generator().manual_seed(0)
    landmarks = torch.from_numpy(ARCFACE_DST * resolution / 112.0).expand(2, 5, 2).clone()
    return {
        "pixel_values": torch.rand(2, 3, resolution, resolution, generator=generator) * 2 - 1,
        "landmarks": landmarks,
        "embeddings": F.normalize(torch.randn(2, 512, generator=generator), dim=-1),
    }


# ------------------------------------------------------------------------------ timing


def synchronize(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def timed(device: torch.device, run, steps: int) -> float:
    """Seconds per call of `run` over `steps` calls, one device sync at each end."""
    synchronize(device)
    start = time.perf_counter()
    for _ in range(steps):
        run()
    synchronize(device)
    return (time.perf_counter() - start) / steps


def peak_gib(device: torch.device) -> float | None:
    if device.type != "cuda":
        return None
    return round(torch.cuda.max_memory_allocated(device) / 2**30, 2)


def reset_peak(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats(device)


def measure_reference(train_args, frozen, args) -> dict:
    device = frozen.device
    reset_peak(device)
    unet = reference_unet(train_args, device, frozen.mixed_precision)
    optimizer = torch.optim.AdamW([p for p in unet.parameters() if p.requires_grad], lr=1e-4)
    batch, generator = reference_batch(SIZES[args.size][0]), torch.Generator(device).manual_seed(0)

    def step() -> None:
        reference_step(unet, frozen, optimizer, batch, generator, train_args)

    for _ in range(args.warmup):
        step()
    seconds = statistics.median(timed(device, step, args.steps) for _ in range(args.rounds))
    return {"seconds_per_step": seconds, "identities_per_step": 1, "peak_gib": peak_gib(device)}


def measure_packed(train_args, frozen, face_tools, state, identities, args, k) -> dict:
    """PackedTrainer.step() with K identities; its device part once more under sync checks."""
    device = frozen.device
    reset_peak(device)
    trainer = PackedTrainer(train_args, frozen, face_tools, state, k)
    for index, identity in enumerate(identities[:k]):
        trainer.fill(index, identity)
    for _ in range(args.warmup):
        trainer.step()
    seconds = statistics.median(timed(device, trainer.step, args.steps) for _ in range(args.rounds))
    for slot in trainer.active_slots():
        trainer.check_finite(slot, "the benchmark stopped")  # every loss and weight finite
    result = {"seconds_per_step": seconds, "identities_per_step": k, "peak_gib": peak_gib(device)}
    result["sync_free"] = sync_free_step(trainer, device)
    for slot in trainer.active_slots():
        trainer.release(slot, {})
    return result


def sync_free_step(trainer, device: torch.device) -> bool | str | None:
    """Whether the device part of a step runs under set_sync_debug_mode('error') (CUDA only)."""
    if device.type != "cuda":
        return None
    slots = trainer.active_slots()
    batch, generators = trainer.gather(slots)
    torch.cuda.set_sync_debug_mode("error")
    try:
        trainer.train_on(slots, batch, generators)
        return True
    except RuntimeError as error:
        return f"synced: {str(error).splitlines()[0]}"
    finally:
        torch.cuda.set_sync_debug_mode("default")


def summarise(reference: dict, packed: dict[int, dict], args, precision: str, device) -> dict:
    per_identity = {k: r["seconds_per_step"] / k for k, r in packed.items()}
    reference_seconds = reference["seconds_per_step"]
    return {
        "benchmark": "train_step",
        "size": args.size,
        "device": torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu",
        "mixed_precision": precision,
        "resolution": SIZES[args.size][0],
        "arcface": SIZES[args.size][1],
        "steps": args.steps,
        "rounds": args.rounds,
        "compile": args.compile,
        "reference": {k: round(v, 5) if isinstance(v, float) else v for k, v in reference.items()},
        "ours": {
            f"pack_{k}": {
                "seconds_per_step": round(r["seconds_per_step"], 5),
                "seconds_per_identity_step": round(per_identity[k], 5),
                "identity_images_per_second": round(k / r["seconds_per_step"], 3),
                "peak_gib": r["peak_gib"],
                "sync_free": r["sync_free"],
                "throughput_vs_reference": round(reference_seconds / per_identity[k], 3),
            }
            for k, r in packed.items()
        },
        "packed_vs_single_throughput": {
            f"pack_{k}": round(per_identity[min(packed)] / per_identity[k], 3) for k in packed
        },
        "torch": torch.__version__,
        "threads": torch.get_num_threads(),
    }


def main(args: argparse.Namespace) -> dict:
    train = runs.load_script(REPO_ROOT / "train_ID-Booth.py")
    device = torch.device(args.device)
    precision = args.mixed_precision or ("bf16" if device.type == "cuda" else "no")
    resolution, _ = SIZES[args.size]
    workdir = args.workdir or Path(tempfile.mkdtemp(prefix="idbooth-bench-"))
    sd_dir, arcface_path = build_models(workdir, args.size)
    root, class_dir = write_identities(workdir, max(args.packs), resolution)
    flags = [
        f"--pretrained_model_name_or_path={sd_dir}",
        f"--identities_root={root}",
        f"--class_data_dir={class_dir}",
        f"--num_class_images={PHOTOS_PER_IDENTITY}",
        f"--output_dir={workdir / 'loras'}",
        f"--arcface_weights={arcface_path}",
        f"--resolution={resolution}",
        f"--mixed_precision={precision}",
        f"--pack={max(args.packs)}",
        "--validation_prompt=",
        "--report_to=none",
        "--logging_steps=1000000",  # the timed steps hold no log interval (no host read)
        "--max_train_steps=100000",
        "--overwrite",
    ]
    train_args = train.parse_args(flags + (["--compile"] if args.compile else []))
    if device.type == "cuda":
        torch.backends.cuda.matmul.allow_tf32 = True
        torch.backends.cudnn.benchmark = True
    encoder = load_arcface(arcface_path, device=device)
    face_tools = FaceTools(TemplateDetector(), encoder)
    frozen = load_frozen_models(train_args, device, precision, encoder)
    state = runs.process_state()
    identities = train.discover_identities(train_args)
    reference = measure_reference(train_args, frozen, args)
    packed = {
        k: measure_packed(train_args, frozen, face_tools, state, identities, args, k)
        for k in sorted(set(args.packs))
    }
    result = summarise(reference, packed, args, precision, device)
    print(json.dumps(result, indent=2))
    return result


if __name__ == "__main__":
    runs.run_cli("bench_train_step.py", parse_args, main)
