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
anything). On CUDA one step of ours runs under `torch.cuda.set_sync_debug_mode("error")`.

Beside the timings (and alone with `--count_only`, on any CPU) it counts one step of ours per
K at the chosen shapes on fake tensors (`count_step`): aten ops (autocast's casts included),
FLOPs and the activations saved for the backward. `--format markdown` prints README rows.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import statistics
import sys
import tempfile
import time
from pathlib import Path
from types import SimpleNamespace
from unittest import mock

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image
from torch.nn.attention import SDPBackend, sdpa_kernel
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils.flop_counter import FlopCounterMode

REPO_ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO_ROOT))  # shared modules at the repo root

import faces  # noqa: E402
import runs  # noqa: E402
from arcface import ArcFaceEncoder, build_iresnet, load_arcface  # noqa: E402
from benchmarks.device_clock import peak_gib, reset_peak, timed  # noqa: E402
from faces import ARCFACE_DST  # noqa: E402
from losses import (  # noqa: E402
    predict_x0,
    timestep_weight,
    triplet_identity_loss,
)
from random_models import (  # noqa: E402
    build_random_sd_pipeline,
    build_tiny_sd,
    calibrate_batchnorm,
)
from trainer import (  # noqa: E402
    WEIGHT_DTYPES,
    FaceTools,
    PackedBatch,
    PackedTrainer,
    PromptEmbeddings,
    load_frozen_models,
    place,
)

# size (random_models.RANDOM_MODEL_NAMES) -> (resolution, IResNet depth). The real shapes of each
# supported base; its tiny version runs the same code paths in seconds.
SIZES = {
    "tiny": (64, "r18"),
    "tiny-sd15": (64, "r18"),
    "tiny-sd21-v": (64, "r18"),
    "tiny-sdxl": (64, "r18"),
    "sd15": (512, "r100"),
    "sd21": (512, "r100"),
    "sd21-v": (768, "r100"),
    "sdxl": (1024, "r100"),
}
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
    parser.add_argument(
        "--count_only",
        action="store_true",
        help="Only the counts on fake tensors (aten ops, FLOPs, saved activations): no "
        "models on disk, no timings; seconds on any CPU.",
    )
    parser.add_argument(
        "--format",
        choices=["json", "markdown"],
        default="json",
        help="markdown: the rows of benchmarks/README.md's tables.",
    )
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


# ------------------------------------------------------------------------------ counting


class OpCounter(TorchDispatchMode):
    """Counts every aten op that reaches the dispatcher (autocast's casts included; `prim`
    metadata queries such as a fake tensor's `.device` are not ops); `mark(name)` starts a
    new phase."""

    def __init__(self) -> None:
        super().__init__()
        self.phases: dict[str, int] = {"step": 0}
        self.views = 0
        self._phase = "step"

    def mark(self, phase: str) -> None:
        self._phase = phase
        self.phases.setdefault(phase, 0)

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        if func.namespace == "aten":
            self.phases[self._phase] += 1
            self.views += func.is_view
        return func(*args, **(kwargs or {}))

    @property
    def total(self) -> int:
        return sum(self.phases.values())


@contextlib.contextmanager
def saved_activations(exclude: set[int]):
    """Bytes of the distinct storages autograd saves for the backward (weights in `exclude`,
    by storage id, left out): the activation memory a step holds at the end of its forward."""
    sizes: dict[int, int] = {}

    def pack(tensor: torch.Tensor) -> torch.Tensor:
        storage = tensor.untyped_storage()
        if storage._cdata not in exclude:
            sizes[storage._cdata] = storage.nbytes()
        return tensor

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda tensor: tensor):
        yield sizes


@contextlib.contextmanager
def loading_from(pipe):
    """The trainer's `from_pretrained` calls return the parts of an in-memory pipeline (SDXL's
    second text encoder too), its architecture read from the parts' configs."""
    from diffusers import AutoencoderKL, DDPMScheduler, UNet2DConditionModel
    from transformers import CLIPTextModel, CLIPTextModelWithProjection, CLIPTokenizer

    from architectures import architecture_of_pipeline

    parts = {
        UNet2DConditionModel: pipe.unet,
        AutoencoderKL: pipe.vae,
        CLIPTextModel: pipe.text_encoder,
        CLIPTokenizer: pipe.tokenizer,
        DDPMScheduler: DDPMScheduler.from_config(pipe.scheduler.config),
    }
    if getattr(pipe, "text_encoder_2", None) is not None:
        parts[CLIPTextModelWithProjection] = pipe.text_encoder_2
    architecture = architecture_of_pipeline(pipe)
    with contextlib.ExitStack() as stack:
        stack.enter_context(
            mock.patch("trainer.architecture_or_paper", lambda *_, **__: architecture)
        )
        for cls, part in parts.items():
            stack.enter_context(
                mock.patch.object(cls, "from_pretrained", lambda *_, part=part, **__: part)
            )
        yield


def packed_batch(k: int, resolution: int, device: torch.device, sdxl: bool = False) -> PackedBatch:
    """K identities' micro-batches of 1 instance + 1 class image (identity-major rows); SDXL's
    size/crop ids of R x R photos when `sdxl`."""
    latent = resolution // 8
    landmarks = torch.as_tensor(ARCFACE_DST * resolution / 112.0, device=device)
    time_ids = torch.tensor([[resolution, resolution, 0, 0, resolution, resolution]] * 2)
    batches = [
        PackedBatch.one_identity(
            mean=torch.randn(2, 4, latent, latent, device=device),
            std=torch.rand(2, 4, latent, latent, device=device),
            num_instance=1,
            landmarks=landmarks[None].clone(),
            embeddings=F.normalize(torch.randn(2, 512, device=device), dim=-1),
            has_face=torch.ones(2, dtype=torch.bool, device=device),
            time_ids=time_ids.float().to(device) if sdxl else None,
        )
        for _ in range(k)
    ]
    return PackedBatch.pack(batches, list(range(k)))


def standing_slot(index: int) -> SimpleNamespace:
    """What `PackedTrainer.train_on` reads of a slot: one update per micro-batch."""
    return SimpleNamespace(
        index=index, global_step=0, updates_per_epoch=1, micro_batch=0,
        is_update_due=lambda: True,
    )  # fmt: skip


def count_step(size: str, k: int, precision: str, workdir: Path) -> dict:
    """_count_step, with faces' per-device template cache emptied before and after: a template
    made under FakeTensorMode must not outlive it (later real steps would get a fake one)."""
    faces._template_on.cache_clear()
    try:
        return _count_step(size, k, precision, workdir)
    finally:
        faces._template_on.cache_clear()


def _count_step(size: str, k: int, precision: str, workdir: Path) -> dict:
    """`PackedTrainer.train_on` (forward, backward, clipping, AdamW, bookkeeping) of K
    identities at `size` shapes on fake tensors (no memory, no arithmetic; seconds on a CPU):
    aten ops (all, views, the update's), FLOPs and the activations saved for the backward.
    Autocast's casts are CPU autocast's (bf16 / fp16 on the CPU)."""
    from torch._subclasses.fake_tensor import FakeTensorMode

    resolution, depth = SIZES[size]
    train = runs.load_script(REPO_ROOT / "train_ID-Booth.py")
    train_args = train.build_parser().parse_args(
        [
            f"--pretrained_model_name_or_path={workdir}",
            f"--identities_root={workdir}",
            f"--class_data_dir={workdir}",
            f"--output_dir={workdir}",
            f"--arcface_weights={workdir}",
            f"--resolution={resolution}",
            f"--mixed_precision={precision}",
            f"--pack={k}",
            "--report_to=none",
        ]
    )
    device, dtype = torch.device("cpu"), WEIGHT_DTYPES[precision]
    with FakeTensorMode(allow_non_fake_inputs=True):
        arcface = ArcFaceEncoder(build_iresnet(depth), f"random-{depth}")  # fp32, as trained
        pipe = build_random_sd_pipeline(size, workdir=workdir)
        text_encoders = [pipe.text_encoder, getattr(pipe, "text_encoder_2", None)]
        upcast_vae = pipe.vae.config.get("force_upcast") and "sdxl" in size  # fp32, as trained
        for part in (pipe.unet, *([] if upcast_vae else [pipe.vae]), *filter(None, text_encoders)):
            for tensor in (*part.parameters(), *part.buffers()):  # swapped by Module.to
                if tensor.is_floating_point():
                    tensor.data = tensor.data.to(dtype)
        # The validation sampler's host tables cannot be built from fake tensors (not counted).
        no_sampler = mock.patch("trainer.Sampler.from_pipeline")
        with loading_from(pipe), mock.patch("trainer.place"), no_sampler:
            frozen = load_frozen_models(train_args, device, precision, arcface)
            trainer = PackedTrainer(train_args, frozen, None, runs.process_state(), k)
        batch = packed_batch(k, resolution, device, frozen.architecture.is_sdxl)
        generators = [torch.Generator().manual_seed(index) for index in range(k)]
        slots = [standing_slot(index) for index in range(k)]
        counter, update = OpCounter(), trainer.update

        def counted_update(*args, **kwargs):
            counter.mark("update")
            return update(*args, **kwargs)

        trainer.update = counted_update
        with counter:
            trainer.train_on(slots, batch, generators)
        # Memory in a step of its own (the saved-tensor hooks add a detach per tensor), FLOPs
        # in a third with the math attention (no FLOP formula for the CPU's fused kernel,
        # whose memory the math one would overstate).
        weights = [*trainer.unet.parameters(), *frozen.vae.parameters(), *arcface.parameters()]
        with saved_activations({w.untyped_storage()._cdata for w in weights}) as saved:
            trainer.train_on(slots, batch, generators)
        flops = FlopCounterMode(display=False)
        with flops, sdpa_kernel(SDPBackend.MATH):
            trainer.train_on(slots, batch, generators)
    return {
        "identities_per_step": k,
        "aten_ops": counter.total,
        "aten_ops_per_identity_step": round(counter.total / k, 1),
        "view_ops": counter.views,
        "update_ops": counter.phases.get("update", 0),
        "flop": flops.get_total_flops(),
        "tflop": round(flops.get_total_flops() / 1e12, 3),
        "tflop_per_identity_step": round(flops.get_total_flops() / 1e12 / k, 3),
        "saved_activation_gib": round(sum(saved.values()) / 2**30, 2),
    }


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
        # [instance, prior] rows; SDXL: + pooled text and the size/crop ids of R x R photos
        size = pixels.shape[-1]
        rows = SimpleNamespace(
            is_prior=torch.tensor([False, True], device=device),
            time_ids=torch.tensor([[size, size, 0, 0, size, size]] * 2, device=device).float(),
        )
        conditioning = prompts.unet_conditioning(rows)
        model_pred = unet(noisy, timesteps, **conditioning, return_dict=False)[0]
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
        trainer.release(slot, {"identity": slot.identity.name})
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


def time_all(args: argparse.Namespace, workdir: Path) -> dict:
    """The timed comparison: the reference recipe, then ours for every K of --packs."""
    train = runs.load_script(REPO_ROOT / "train_ID-Booth.py")
    device = torch.device(args.device)
    precision = args.mixed_precision or ("bf16" if device.type == "cuda" else "no")
    resolution, _ = SIZES[args.size]
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
    return summarise(reference, packed, args, precision, device)


def count_all(args, workdir: Path) -> dict:
    """count_step for every K of --packs, at the precision timed on a GPU (default bf16)."""
    precision = args.mixed_precision or "bf16"
    counts = {f"pack_{k}": count_step(args.size, k, precision, workdir) for k in args.packs}
    return {"mixed_precision": precision, **counts}


def main(args: argparse.Namespace) -> dict:
    workdir = args.workdir or Path(tempfile.mkdtemp(prefix="idbooth-bench-"))
    if args.count_only:
        result = {"benchmark": "train_step", "size": args.size, "counts": count_all(args, workdir)}
    else:
        result = time_all(args, workdir)
        result["counts"] = count_all(args, workdir)
    print(markdown(result) if args.format == "markdown" else json.dumps(result, indent=2))
    return result


def markdown(result: dict) -> str:
    """benchmarks/README.md's rows: the counts table, and the timing table when timed."""
    today, counts = time.strftime("%Y-%m-%d"), result["counts"]
    shapes = f"{result['size']} ({SIZES[result['size']][0]} px, {SIZES[result['size']][1]})"
    lines = [
        "| date | size | precision | K | aten ops / step | per identity-step | of them views "
        "| update (clip + AdamW) | TFLOP / identity-step | saved activations GiB |",
        "|---|---|---|---|---|---|---|---|---|---|",
    ]
    for row in (value for key, value in counts.items() if key.startswith("pack_")):
        lines.append(
            f"| {today} | {shapes} | {counts['mixed_precision']} | {row['identities_per_step']} "
            f"| {row['aten_ops']} | {row['aten_ops_per_identity_step']} | {row['view_ops']} "
            f"| {row['update_ops']} | {row['tflop_per_identity_step']} "
            f"| {row['saved_activation_gib']} |"
        )
    if "reference" not in result:
        return "\n".join(lines)
    ours = result["ours"]
    lines += [
        "",
        "| date | device | size | precision | reference s/step | "
        + " | ".join(f"ours K={key[5:]}" for key in ours)
        + " (s per identity-step) | peak GiB (K=1) |",
        "|---|---|---|---|---|" + "---|" * len(ours) + "---|",
        f"| {today} | {result['device']} | {shapes} | {result['mixed_precision']} "
        f"| {result['reference']['seconds_per_step']:.3f} | "
        + " | ".join(f"{row['seconds_per_identity_step']:.3f}" for row in ours.values())
        + f" | {next(iter(ours.values()))['peak_gib'] or '-'} |",
    ]
    return "\n".join(lines)


if __name__ == "__main__":
    runs.run_cli("bench_train_step.py", parse_args, main)
