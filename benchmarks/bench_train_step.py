"""Training-step throughput: this project's ID-Booth step vs the reference recipe, same run.

Both steps train the same LoRA on the same random-weight, SD-2.1-shaped models with the
triplet identity loss, batch = instance + prior. They differ only in what the reference code
does around the maths:

- reference: re-encodes both prompts with the text encoder every step, applies the identity
  term to the first instance sample only, crops the face by copying the decoded image to the
  host (bounding box of the landmarks, resized to 112 -- the reference uses MTCNN boxes, which
  also run on the host), and reads every loss with `.item()` each step for logging;
- ours (train_ID-Booth.compute_losses): prompt embeddings computed once, the identity term on
  every instance sample through the differentiable 5-point alignment, no host sync in the step.

Prints one JSON object. `--size tiny` runs anywhere in seconds; `--size sd21 --device cuda`
measures the real SD 2.1-base shapes (random weights; only time and memory mean anything).
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import statistics
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

REPO_ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO_ROOT))

from arcface import build_iresnet  # noqa: E402
from faces import ARCFACE_DST  # noqa: E402
from losses import (  # noqa: E402
    predict_x0,
    prior_preservation_loss,
    timestep_weight,
    triplet_identity_loss,
)
from random_models import build_tiny_sd  # noqa: E402

SIZES = {  # size -> (resolution, IResNet depth)
    "tiny": (64, "r18"),
    "sd21": (512, "r100"),
}


def load_train_module():
    """train_ID-Booth.py as a module (its name has a hyphen)."""
    spec = importlib.util.spec_from_file_location("train_id_booth", REPO_ROOT / "train_ID-Booth.py")
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module
    spec.loader.exec_module(module)
    return module


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        description=__doc__.split("\n\n")[0],
        formatter_class=argparse.ArgumentDefaultsHelpFormatter,
    )
    parser.add_argument("--size", choices=sorted(SIZES), default="tiny", help="Model shapes.")
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument(
        "--mixed_precision",
        choices=["no", "fp16", "bf16"],
        default=None,
        help="Default: fp16 on CUDA (the paper's), no on CPU.",
    )
    parser.add_argument("--steps", type=int, default=10, help="Timed steps per recipe.")
    parser.add_argument("--warmup", type=int, default=3, help="Untimed steps per recipe.")
    parser.add_argument(
        "--rounds", type=int, default=3, help="Alternating timed rounds; the median is reported."
    )
    parser.add_argument("--train_batch_size", type=int, default=1, help="Instance samples.")
    parser.add_argument("--workdir", type=Path, default=None, help="Where models are built.")
    return parser.parse_args(argv)


def build_models(workdir: Path, size: str) -> tuple[Path, Path]:
    """Random pipeline folder and random IResNet checkpoint (built once per workdir)."""
    sd_dir, arcface_path = workdir / f"sd-{size}", workdir / f"arcface-{SIZES[size][1]}.pth"
    if not (sd_dir / "model_index.json").exists():
        build_tiny_sd(sd_dir, size=size)
    if not arcface_path.exists():
        torch.manual_seed(0)
        torch.save(build_iresnet(SIZES[size][1]).state_dict(), arcface_path)
    return sd_dir, arcface_path


def synthetic_batch(batch_size: int, resolution: int) -> dict:
    """[instance..., prior...] pixels, landmarks on the ArcFace template, unit embeddings."""
    generator = torch.Generator().manual_seed(0)
    total = 2 * batch_size
    scale = resolution / 112.0
    landmarks = torch.from_numpy(ARCFACE_DST * scale).expand(total, 5, 2).clone()
    embeddings = F.normalize(torch.randn(total, 512, generator=generator), dim=-1)
    return {
        "pixel_values": torch.rand(total, 3, resolution, resolution, generator=generator) * 2 - 1,
        "landmarks": landmarks,
        "embeddings": embeddings,
        "num_instance": batch_size,
    }


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


def reference_losses(train, unet, frozen, batch: dict, generator, args) -> dict:
    """The reference recipe's forward: prompts encoded per step, one identity sample, host crop."""
    device, scheduler = frozen.device, frozen.noise_scheduler
    pixels = batch["pixel_values"].to(device, frozen.weight_dtype)
    n, total = batch["num_instance"], batch["pixel_values"].shape[0]
    with torch.no_grad():
        prompts = train.encode_prompts(frozen, args)  # every step, as the reference does
        latents = frozen.vae.encode(pixels).latent_dist.sample(generator)
        latents = latents * frozen.vae.config.scaling_factor
    noise = torch.randn(latents.shape, generator=generator, device=device, dtype=latents.dtype)
    timesteps = torch.randint(0, 1000, (total,), generator=generator, device=device)
    noisy = scheduler.add_noise(latents, noise, timesteps)
    text = prompts.for_batch(n, total - n)
    model_pred = unet(noisy, timesteps, text, return_dict=False)[0]
    loss, _, _ = prior_preservation_loss(model_pred, noise, n, args.prior_loss_weight)
    x0 = predict_x0(noisy[:1], model_pred[:1], timesteps[:1], scheduler.alphas_cumprod, "epsilon")
    decoded = frozen.vae.decode(x0.to(frozen.vae.dtype) / frozen.vae.config.scaling_factor).sample
    anchor = frozen.arcface(host_bbox_faces(decoded, batch["landmarks"][:1]))
    embeddings = batch["embeddings"].to(device)
    triplet = triplet_identity_loss(anchor, embeddings[:1], embeddings[n : n + 1])
    identity = (timestep_weight(timesteps[:1]) * triplet).mean()
    return {"loss": loss + identity, "identity_loss": identity}


def run_recipe(name: str, forward, unet, frozen, optimizer, batch, args, steps: int) -> None:
    """`steps` optimizer steps of one recipe (forward -> backward -> clip -> step)."""
    generator = torch.Generator(frozen.device).manual_seed(0)
    params = [p for p in unet.parameters() if p.requires_grad]
    for _ in range(steps):
        with frozen.autocast():
            terms = forward(unet, frozen, batch, generator)
        terms["loss"].backward()
        torch.nn.utils.clip_grad_norm_(params, 1.0)
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        if name == "reference":
            _ = {key: value.item() for key, value in terms.items()}  # per-step logging


def time_recipe(name: str, forward, unet, frozen, optimizer, batch, args) -> float:
    """Seconds per step over args.steps steps, with one device sync at each end."""
    synchronize(frozen.device)
    start = time.perf_counter()
    run_recipe(name, forward, unet, frozen, optimizer, batch, args, args.steps)
    synchronize(frozen.device)
    return (time.perf_counter() - start) / args.steps


def synchronize(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def main(args: argparse.Namespace) -> dict:
    train = load_train_module()
    device = torch.device(args.device)
    mixed_precision = args.mixed_precision or ("fp16" if device.type == "cuda" else "no")
    resolution, depth = SIZES[args.size]
    workdir = args.workdir or Path(tempfile.mkdtemp(prefix="idbooth-bench-"))
    sd_dir, arcface_path = build_models(workdir, args.size)
    (workdir / "photos").mkdir(exist_ok=True)  # the step runs on synthetic batches
    train_args = train.parse_args(
        [
            f"--pretrained_model_name_or_path={sd_dir}",
            f"--instance_data_dir={workdir / 'photos'}",
            f"--class_data_dir={workdir / 'class'}",
            f"--output_dir={workdir / 'out'}",
            f"--arcface_weights={arcface_path}",
            f"--resolution={resolution}",
            f"--mixed_precision={mixed_precision}",
        ]
    )
    if device.type == "cuda":
        torch.backends.cuda.matmul.allow_tf32 = True
    from arcface import load_arcface

    arcface = load_arcface(arcface_path, device=device)
    frozen = train.load_frozen_models(train_args, device, mixed_precision, arcface)
    batch = synthetic_batch(args.train_batch_size, resolution)
    prompts = train.encode_prompts(frozen, train_args)
    recipes = {
        "reference": lambda u, f, b, g: reference_losses(train, u, f, b, g, train_args),
        "ours": lambda u, f, b, g: train.compute_losses(u, f, prompts, b, g, train_args),
    }
    states = {}
    for name, forward in recipes.items():
        unet = train.load_unet_with_lora(train_args, device, mixed_precision)
        params = [p for p in unet.parameters() if p.requires_grad]
        optimizer = torch.optim.AdamW(params, lr=1e-4, weight_decay=1e-2)
        run_recipe(name, forward, unet, frozen, optimizer, batch, args, args.warmup)
        states[name] = (forward, unet, optimizer)
    # Rounds alternate between the recipes so drift in machine load hits both alike.
    rounds = {name: [] for name in recipes}
    for _ in range(args.rounds):
        for name, (forward, unet, optimizer) in states.items():
            rounds[name].append(time_recipe(name, forward, unet, frozen, optimizer, batch, args))
    seconds = {name: statistics.median(values) for name, values in rounds.items()}
    result = {
        "benchmark": "train_step",
        "size": args.size,
        "device": torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu",
        "mixed_precision": mixed_precision,
        "resolution": resolution,
        "arcface": depth,
        "instance_samples_per_step": args.train_batch_size,
        "identity_samples_per_step": {"reference": 1, "ours": args.train_batch_size},
        "steps_per_round": args.steps,
        "rounds": args.rounds,
        "seconds_per_step": {name: round(value, 5) for name, value in seconds.items()},
        "speedup_vs_reference": round(seconds["reference"] / seconds["ours"], 3),
        "torch": torch.__version__,
        "threads": torch.get_num_threads(),
    }
    print(json.dumps(result, indent=2))
    return result


if __name__ == "__main__":
    main(parse_args())
