"""Sampling images from Stable Diffusion: a loop without host syncs that reproduces
`StableDiffusionPipeline`'s images, schedulers by name, pipeline loading, and DreamBooth's
class (prior) images.

The stock loop syncs the host several times per step (`DDPMScheduler.step` indexes CPU
`alphas_cumprod` with a device timestep, branches on `t > 0` and `prev_t >= 0`, looks the
step up with `nonzero`) and copies fresh variance noise from each image's CPU generator to
the device every step. Here everything that depends only on the schedule is computed on the
host up front, with the scheduler's own `set_timesteps`, `alphas_cumprod`, `sigmas` and the
same scalar arithmetic its `step` uses; every image's noise for all steps is drawn from its
own CPU generator in the order the stock pipeline consumes it and copied to the device once
per batch. A denoising step is then tensor ops only: the step index is a Python int, and the
per-step coefficients are 0-dim host tensors (read at kernel launch like any Python scalar,
exactly as the stock scheduler's are), or device tensors on the compiled / CUDA-graph paths.

Supported: `DDPMScheduler` (the paper's), `DDIMScheduler` (any eta) and
`EulerAncestralDiscreteScheduler`; see `SUPPORTED_CONFIGS` for the config values. Any of
`SCHEDULERS` (the names of inference_ID-Booth.py's --scheduler) is built from the base model's
scheduler config by `build_sampler`; the stock pipeline loop samples the unsupported ones.

Class images are sampled once per class folder with the base model, `class_{i:05d}.jpg` (JPEG
at PIL's default quality 75, as the reference writes them; `.png` on request), each from its own
seed (so the folder is the same however many processes made it and however often the job was
interrupted), written atomically and split across processes.

Typical use (`pipeline` loaded and frozen as in inference_ID-Booth.py):

    sampler = Sampler.from_pipeline(pipeline, num_inference_steps=30, guidance_scale=5.0)
    images = generate_images(pipeline, sampler, prompts, [negative] * len(prompts), seeds)
"""

from __future__ import annotations

import contextlib
import logging
import re
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from datasets import scan_photos
from fileio import atomic_save_image
from losses import x0_estimate
from runs import progress_bar

logger = logging.getLogger("sampling")

Coefficients = dict[str, torch.Tensor]  # name -> 0-dim float32 tensor of one step
PreUnetHook = Callable[[int], None]  # called with the step index before each UNet call

# Config keys whose values change the update rule; every other value (betas, spacing, offset,
# zero-SNR rescaling, set_alpha_to_one, ...) only changes the host tables and is honoured.
SUPPORTED_CONFIGS: dict[str, dict[str, tuple[Any, ...]]] = {
    "DDPMScheduler": {
        "prediction_type": ("epsilon", "v_prediction", "sample"),
        "variance_type": ("fixed_small", "fixed_small_log", "fixed_large"),
        "thresholding": (False,),
    },
    "DDIMScheduler": {
        "prediction_type": ("epsilon", "v_prediction", "sample"),
        "thresholding": (False,),
    },
    "EulerAncestralDiscreteScheduler": {
        "prediction_type": ("epsilon", "v_prediction"),
    },
}


@dataclass(frozen=True)
class Schedule:
    """Host-side tables of one scheduler at one step count.

    `coefficients[name][i]` is the float32 scalar that step `i` uses; `draws_noise[i]` says
    whether the stock scheduler draws variance noise at step `i` (it does not at DDPM's t=0).
    """

    kind: str  # diffusers scheduler class name
    prediction_type: str
    timesteps: torch.Tensor  # (S,) the values the UNet is called with, dtype as the scheduler's
    coefficients: dict[str, torch.Tensor]  # name -> (S,) float32
    draws_noise: tuple[bool, ...]  # (S,)
    init_noise_sigma: float | torch.Tensor
    clip_sample_range: float | None  # None: no clipping of the x0 estimate

    @property
    def num_steps(self) -> int:
        """Number of denoising steps S."""
        return len(self.draws_noise)

    @property
    def stochastic(self) -> bool:
        """Whether any step adds variance noise (DDPM, DDIM with eta > 0, Euler ancestral)."""
        return any(self.draws_noise)


# ------------------------------------------------------------------- host-side schedules


def check_scheduler_config(kind: str, config: Any) -> None:
    """ValueError naming the scheduler class or config value that the loop cannot reproduce."""
    if kind not in SUPPORTED_CONFIGS:
        raise ValueError(
            f"scheduler {kind} is not supported by sampling.py; supported: "
            f"{', '.join(SUPPORTED_CONFIGS)} (use the stock pipeline for others)"
        )
    for key, allowed in SUPPORTED_CONFIGS[kind].items():
        value = config.get(key)
        if value not in allowed:
            options = ", ".join(repr(option) for option in allowed)
            raise ValueError(f"{kind} with {key}={value!r} is not supported; supported: {options}")


def _fresh_scheduler(scheduler: Any, num_inference_steps: int) -> Any:
    """A copy of `scheduler` built from its config, with host timesteps for this step count."""
    fresh = type(scheduler).from_config(scheduler.config)
    fresh.set_timesteps(num_inference_steps)  # on the CPU
    if len(set(fresh.timesteps.tolist())) != len(fresh.timesteps):
        raise ValueError(f"{num_inference_steps} steps give repeated timesteps; not supported")
    return fresh


def _stack(rows: Sequence[Coefficients]) -> dict[str, torch.Tensor]:
    """Per-step dicts of 0-dim tensors -> name -> (S,) float32 table (values unchanged)."""
    return {name: torch.stack([row[name] for row in rows]).float() for name in rows[0]}


def _ddpm_row(scheduler: Any, t: torch.Tensor) -> Coefficients:
    """DDPM posterior coefficients at t (Ho et al. 2020, eqs. 6-7), as DDPMScheduler.step."""
    prev_t = scheduler.previous_timestep(t)
    alpha_prod_t = scheduler.alphas_cumprod[t]
    alpha_prod_t_prev = scheduler.alphas_cumprod[prev_t] if prev_t >= 0 else scheduler.one
    beta_prod_t = 1 - alpha_prod_t
    beta_prod_t_prev = 1 - alpha_prod_t_prev
    current_alpha_t = alpha_prod_t / alpha_prod_t_prev
    current_beta_t = 1 - current_alpha_t
    # beta~_t = (1 - abar_{t-1}) / (1 - abar_t) * beta_t, eq. 7; clamped as in _get_variance.
    variance = torch.clamp((1 - alpha_prod_t_prev) / (1 - alpha_prod_t) * current_beta_t, 1e-20)
    noise_std = {
        "fixed_small": variance**0.5,
        "fixed_small_log": torch.exp(0.5 * torch.log(variance)),
        "fixed_large": current_beta_t**0.5,
    }[scheduler.config.variance_type]
    return {
        "sqrt_alpha_prod": alpha_prod_t**0.5,
        "sqrt_beta_prod": beta_prod_t**0.5,
        "x0_coeff": (alpha_prod_t_prev**0.5 * current_beta_t) / beta_prod_t,
        "xt_coeff": current_alpha_t**0.5 * beta_prod_t_prev / beta_prod_t,
        "noise_std": noise_std if t > 0 else torch.tensor(0.0),
    }


def _ddim_row(scheduler: Any, t: torch.Tensor, eta: float) -> Coefficients:
    """DDIM coefficients at t (Song et al. 2021, eqs. 12 and 16), as DDIMScheduler.step."""
    prev_t = t - scheduler.config.num_train_timesteps // scheduler.num_inference_steps
    alpha_prod_t = scheduler.alphas_cumprod[t]
    alpha_prod_t_prev = (
        scheduler.alphas_cumprod[prev_t] if prev_t >= 0 else scheduler.final_alpha_cumprod
    )
    beta_prod_t = 1 - alpha_prod_t
    variance = ((1 - alpha_prod_t_prev) / beta_prod_t) * (1 - alpha_prod_t / alpha_prod_t_prev)
    std_dev_t = eta * variance**0.5
    return {
        "sqrt_alpha_prod": alpha_prod_t**0.5,
        "sqrt_beta_prod": beta_prod_t**0.5,
        "sqrt_alpha_prod_prev": alpha_prod_t_prev**0.5,
        "direction_coeff": (1 - alpha_prod_t_prev - std_dev_t**2) ** 0.5,
        "noise_std": std_dev_t,
    }


def _euler_ancestral_row(sigma: torch.Tensor, sigma_to: torch.Tensor) -> Coefficients:
    """Ancestral Euler split sigma -> (sigma_down, sigma_up) (k-diffusion), as the scheduler."""
    sigma_up = (sigma_to**2 * (sigma**2 - sigma_to**2) / sigma**2) ** 0.5
    sigma_down = (sigma_to**2 - sigma_up**2) ** 0.5
    return {
        "sigma": sigma,
        "sigma_up": sigma_up,
        "dt": sigma_down - sigma,
        "input_scale": (sigma**2 + 1) ** 0.5,
        "v_out": -sigma / (sigma**2 + 1) ** 0.5,
        "v_skip_denominator": sigma**2 + 1,
    }


def _clip_range(config: Any) -> float | None:
    return float(config.clip_sample_range) if config.get("clip_sample") else None


def _ddpm_schedule(scheduler: Any, eta: float) -> Schedule:
    del eta  # the pipeline passes eta only to schedulers whose step takes it (DDIM)
    timesteps = scheduler.timesteps
    return Schedule(
        kind="DDPMScheduler",
        prediction_type=scheduler.config.prediction_type,
        timesteps=timesteps,
        coefficients=_stack([_ddpm_row(scheduler, t) for t in timesteps]),
        draws_noise=tuple(bool(t > 0) for t in timesteps),
        init_noise_sigma=scheduler.init_noise_sigma,
        clip_sample_range=_clip_range(scheduler.config),
    )


def _ddim_schedule(scheduler: Any, eta: float) -> Schedule:
    timesteps = scheduler.timesteps
    return Schedule(
        kind="DDIMScheduler",
        prediction_type=scheduler.config.prediction_type,
        timesteps=timesteps,
        coefficients=_stack([_ddim_row(scheduler, t, eta) for t in timesteps]),
        draws_noise=(eta > 0,) * len(timesteps),
        init_noise_sigma=scheduler.init_noise_sigma,
        clip_sample_range=_clip_range(scheduler.config),
    )


def _euler_ancestral_schedule(scheduler: Any, eta: float) -> Schedule:
    del eta  # not a parameter of EulerAncestralDiscreteScheduler.step
    sigmas = scheduler.sigmas  # (S + 1,) float32, last 0
    rows = [_euler_ancestral_row(sigmas[i], sigmas[i + 1]) for i in range(len(sigmas) - 1)]
    return Schedule(
        kind="EulerAncestralDiscreteScheduler",
        prediction_type=scheduler.config.prediction_type,
        timesteps=scheduler.timesteps,
        coefficients=_stack(rows),
        draws_noise=(True,) * len(rows),  # even the last step, whose sigma_up is 0
        init_noise_sigma=scheduler.init_noise_sigma,
        clip_sample_range=None,
    )


SCHEDULE_BUILDERS: dict[str, Callable[[Any, float], Schedule]] = {
    "DDPMScheduler": _ddpm_schedule,
    "DDIMScheduler": _ddim_schedule,
    "EulerAncestralDiscreteScheduler": _euler_ancestral_schedule,
}


def build_schedule(scheduler: Any, num_inference_steps: int, eta: float = 0.0) -> Schedule:
    """Host tables for `scheduler` (a diffusers scheduler; only its class and config are read)."""
    kind = type(scheduler).__name__
    check_scheduler_config(kind, scheduler.config)
    if eta < 0:
        raise ValueError(f"eta must be >= 0, got {eta}")
    return SCHEDULE_BUILDERS[kind](_fresh_scheduler(scheduler, num_inference_steps), eta)


# ------------------------------------------------------------------------------ noise


def draw_noise(
    generators: Sequence[torch.Generator],
    schedule: Schedule,
    latent_shape: tuple[int, int, int],
    dtype: torch.dtype,
) -> torch.Tensor:
    """Every image's noise for the whole run, on the CPU: (R, B, C, h, w).

    Row 0 holds the initial latents, row 1 + i the variance noise of step i (zeros where the
    scheduler draws none); R = 1 + S for a stochastic schedule, else 1. Each image draws from
    its own generator in the stock pipeline's order: `randn_tensor` with a list of generators
    draws (1, C, h, w) from generator b for image b, first for the initial latents, then once
    per noisy step.
    """
    num_rows = 1 + schedule.num_steps if schedule.stochastic else 1
    draws = torch.zeros((num_rows, len(generators), *latent_shape), dtype=dtype)
    for image, generator in enumerate(generators):
        draws[0, image] = torch.randn((1, *latent_shape), generator=generator, dtype=dtype)[0]
        for step, noisy in enumerate(schedule.draws_noise):
            if noisy:
                noise = torch.randn((1, *latent_shape), generator=generator, dtype=dtype)
                draws[1 + step, image] = noise[0]
    return draws


def seeded_generators(seeds: Sequence[int]) -> list[torch.Generator]:
    """One CPU generator per image, seeded with the image's own seed."""
    return [torch.Generator("cpu").manual_seed(int(seed)) for seed in seeds]


# ---------------------------------------------------------------------------- updates


def _x0_and_epsilon(
    model_output: torch.Tensor, sample: torch.Tensor, c: Coefficients, prediction_type: str
) -> tuple[torch.Tensor, torch.Tensor]:
    """x0 (losses.x0_estimate, shared with training) and epsilon estimates from the model
    output: x_t = sqrt(abar) x0 + sqrt(1 - abar) eps."""
    sqrt_alpha, sqrt_beta = c["sqrt_alpha_prod"], c["sqrt_beta_prod"]
    x0 = x0_estimate(sample, model_output, sqrt_alpha, sqrt_beta, prediction_type)
    if prediction_type == "epsilon":
        return x0, model_output
    if prediction_type == "sample":
        return x0, (sample - sqrt_alpha * model_output) / sqrt_beta
    return x0, sqrt_alpha * model_output + sqrt_beta * sample  # v-prediction


def _clip(x0: torch.Tensor, schedule: Schedule) -> torch.Tensor:
    if schedule.clip_sample_range is None:
        return x0
    return x0.clamp(-schedule.clip_sample_range, schedule.clip_sample_range)


def ddpm_update(
    model_output: torch.Tensor,
    sample: torch.Tensor,
    c: Coefficients,
    noise: torch.Tensor | None,
    schedule: Schedule,
) -> torch.Tensor:
    """x_{t-1} = mu~_t(x_t, x0) + sigma_t z (Ho et al. 2020, eqs. 7 and 15); (B, C, h, w)."""
    x0, _ = _x0_and_epsilon(model_output, sample, c, schedule.prediction_type)
    x0 = _clip(x0, schedule)
    prev = c["x0_coeff"] * x0 + c["xt_coeff"] * sample
    if noise is None:  # a schedule whose only timestep is 0
        return prev
    # At t = 0 noise_std and the noise row are 0, so this adds exactly 0 like the stock `+ 0`.
    return prev + c["noise_std"] * noise


def ddim_update(
    model_output: torch.Tensor,
    sample: torch.Tensor,
    c: Coefficients,
    noise: torch.Tensor | None,
    schedule: Schedule,
) -> torch.Tensor:
    """x_{t-1} = sqrt(abar') x0 + sqrt(1 - abar' - s^2) eps + s z (Song et al. 2021, eq. 12)."""
    x0, epsilon = _x0_and_epsilon(model_output, sample, c, schedule.prediction_type)
    x0 = _clip(x0, schedule)  # epsilon stays unclipped (the pipeline's use_clipped_model_output)
    prev = c["sqrt_alpha_prod_prev"] * x0 + c["direction_coeff"] * epsilon
    if noise is None:
        return prev
    return prev + c["noise_std"] * noise


def euler_ancestral_update(
    model_output: torch.Tensor,
    sample: torch.Tensor,
    c: Coefficients,
    noise: torch.Tensor | None,
    schedule: Schedule,
) -> torch.Tensor:
    """x + (x - x0)/sigma (sigma_down - sigma) + sigma_up z: Euler (Karras et al. 2022, Alg. 1).

    The Euler step of Algorithm 1 (lines 4-5) runs to sigma_down, then noise of std sigma_up
    is added (k-diffusion's ancestral split); computed in float32 as the scheduler does.
    """
    sample = sample.to(torch.float32)
    if schedule.prediction_type == "epsilon":
        x0 = sample - c["sigma"] * model_output
    else:  # v_prediction
        x0 = model_output * c["v_out"] + (sample / c["v_skip_denominator"])
    derivative = (sample - x0) / c["sigma"]
    prev = sample + derivative * c["dt"]
    prev = prev + noise * c["sigma_up"]
    return prev.to(model_output.dtype)


UPDATES: dict[str, Callable[..., torch.Tensor]] = {
    "DDPMScheduler": ddpm_update,
    "DDIMScheduler": ddim_update,
    "EulerAncestralDiscreteScheduler": euler_ancestral_update,
}


def guided_noise_prediction(
    noise_pred: torch.Tensor, guidance_scale: float, guidance_rescale: float
) -> torch.Tensor:
    """eps_u + w (eps_c - eps_u) (Ho & Salimans 2022) from the UNet's (2B, ...) [uncond; cond]."""
    noise_pred_uncond, noise_pred_text = noise_pred.chunk(2)
    guided = noise_pred_uncond + guidance_scale * (noise_pred_text - noise_pred_uncond)
    if guidance_rescale > 0.0:
        from diffusers.pipelines.stable_diffusion.pipeline_stable_diffusion import (
            rescale_noise_cfg,
        )

        guided = rescale_noise_cfg(guided, noise_pred_text, guidance_rescale=guidance_rescale)
    return guided


# ---------------------------------------------------------------------------- sampler


class Sampler:
    """The denoising loop of `StableDiffusionPipeline.__call__` for a fixed schedule and size.

    Images equal the stock pipeline's with the same embeddings, one CPU generator per image
    seeded with its seed, steps, guidance and eta (bitwise in our CPU float32 tests). Under
    classifier-free guidance (`guidance_scale > 1`) the UNet sees 2B samples, the B negative
    ones first, as in the pipeline; `pre_unet_hook(step_index)` runs before each UNet call
    (e.g. to set a per-sample LoRA index). `compile=True` wraps the step (UNet + guidance +
    update) in `torch.compile`; `cuda_graph=True` (CUDA only) captures it once per batch size
    and replays it, so the hook may then only change tensors in place. `dtype` (default: the
    UNet's) is that of the latents and of every noise draw; the pipeline uses the prompt
    embeddings' dtype, so `sample` requires them to match.
    """

    def __init__(
        self,
        unet: torch.nn.Module,
        scheduler: Any,
        *,
        num_inference_steps: int = 30,
        guidance_scale: float = 5.0,
        guidance_rescale: float = 0.0,
        eta: float = 0.0,
        height: int = 512,
        width: int = 512,
        vae_scale_factor: int = 8,
        device: torch.device | str | None = None,
        dtype: torch.dtype | None = None,
        pre_unet_hook: PreUnetHook | None = None,
        compile: bool = False,
        compile_backend: str = "inductor",
        cuda_graph: bool = False,
    ) -> None:
        if unet.config.time_cond_proj_dim is not None:
            raise ValueError(
                "UNets with a guidance embedding (time_cond_proj_dim) are not supported"
            )
        if height % 8 or width % 8:
            raise ValueError(f"height and width must be divisible by 8, got {height}x{width}")
        self.unet = unet
        self.schedule = build_schedule(scheduler, num_inference_steps, eta)
        self.guidance_scale = float(guidance_scale)
        self.guidance_rescale = float(guidance_rescale)
        self.device = torch.device(device) if device is not None else unet.device
        self.dtype = dtype or unet.dtype
        if cuda_graph and self.device.type != "cuda":
            raise ValueError(f"cuda_graph=True needs a CUDA device, got {self.device}")
        self.latent_shape = (
            unet.config.in_channels,
            height // vae_scale_factor,
            width // vae_scale_factor,
        )
        self.pre_unet_hook = pre_unet_hook
        # SDXL's size/crop micro-conditioning, as its pipeline's defaults: (1, 6) original
        # size = target size = (height, width), crop top-left (0, 0); None for SD 1.x / 2.x.
        self.time_ids = (
            torch.tensor([[height, width, 0, 0, height, width]], dtype=self.dtype)
            if unet.config.get("addition_embed_type") == "text_time"
            else None
        )
        self.timesteps = self.schedule.timesteps.to(self.device)  # (S,), once per sampler
        # Eager: host scalars, read at launch as the stock scheduler's are. Compiled or
        # captured code wants its inputs on the device.
        tables = self.schedule.coefficients
        if compile or cuda_graph:
            tables = {name: table.to(self.device) for name, table in tables.items()}
        self._coefficients = [
            {name: table[index] for name, table in tables.items()}
            for index in range(self.schedule.num_steps)
        ]
        self._step_fn = torch.compile(self.denoise, backend=compile_backend) if compile else None
        self._graphs: dict[tuple[int, ...], _CapturedStep] = {}
        self.cuda_graph = cuda_graph

    @classmethod
    def from_pipeline(cls, pipeline: Any, **kwargs: Any) -> Sampler:
        """A sampler for `pipeline`'s UNet, scheduler, VAE scale factor and device."""
        kwargs.setdefault("vae_scale_factor", pipeline.vae_scale_factor)
        kwargs.setdefault("device", pipeline._execution_device)
        return cls(pipeline.unet, pipeline.scheduler, **kwargs)

    @property
    def do_classifier_free_guidance(self) -> bool:
        """As the pipeline: guidance only for scale > 1 (the UNet has no guidance embedding)."""
        return self.guidance_scale > 1

    def denoise(
        self,
        latents: torch.Tensor,
        timestep: torch.Tensor,
        coefficients: Coefficients,
        noise: torch.Tensor | None,
        embeddings: dict[str, Any],
    ) -> torch.Tensor:
        """One step: (B, C, h, w) latents at `timestep` -> latents at the next timestep.

        `embeddings`: the UNet's conditioning (`guidance_embeddings`), 2B rows [negative;
        positive] under guidance, else B.
        """
        model_input = torch.cat([latents] * 2) if self.do_classifier_free_guidance else latents
        if self.schedule.kind == "EulerAncestralDiscreteScheduler":
            model_input = model_input / coefficients["input_scale"]
        noise_pred = self.unet(model_input, timestep, **embeddings, return_dict=False)[0]
        if self.do_classifier_free_guidance:
            noise_pred = guided_noise_prediction(
                noise_pred, self.guidance_scale, self.guidance_rescale
            )
        update = UPDATES[self.schedule.kind]
        return update(noise_pred, latents, coefficients, noise, self.schedule)

    def step(
        self,
        latents: torch.Tensor,
        index: int,
        embeddings: dict[str, Any],
        noise: torch.Tensor | None,
    ) -> torch.Tensor:
        """Step `index` of the schedule, eager, compiled or replayed; (B, C, h, w) in and out."""
        args = (latents, self.timesteps[index], self._coefficients[index], noise, embeddings)
        if self.cuda_graph:
            text = embeddings["encoder_hidden_states"]
            key = (latents.shape[0], text.shape[1], int(noise is None))
            if key not in self._graphs:
                self._graphs[key] = _CapturedStep(self._step_fn or self.denoise, args)
            return self._graphs[key](args)
        if self._step_fn is not None:
            return self._step_fn(*args)
        return self.denoise(*args)

    def guidance_embeddings(
        self,
        prompt_embeds: torch.Tensor,
        negative_prompt_embeds: torch.Tensor | None,
        pooled_prompt_embeds: torch.Tensor | None = None,
        negative_pooled_prompt_embeds: torch.Tensor | None = None,
    ) -> dict[str, Any]:
        """The UNet's conditioning keyword arguments: `encoder_hidden_states` (2B, L, D)
        [negative; positive] under guidance (B unguided) and, for SDXL, `added_cond_kwargs`
        (`sdxl_added_conditioning`)."""
        guided = self.do_classifier_free_guidance
        if guided and (
            negative_prompt_embeds is None or negative_prompt_embeds.shape != prompt_embeds.shape
        ):
            raise ValueError(
                "guidance_scale > 1 needs negative_prompt_embeds shaped as the prompts'"
            )
        conditioning: dict[str, Any] = {
            "encoder_hidden_states": _for_guidance(prompt_embeds, negative_prompt_embeds, guided)
        }
        if self.time_ids is not None:
            conditioning["added_cond_kwargs"] = sdxl_added_conditioning(
                self.time_ids, pooled_prompt_embeds, negative_pooled_prompt_embeds, guided
            )
        return {name: _to(value, self.device) for name, value in conditioning.items()}

    @torch.no_grad()
    def sample(
        self,
        prompt_embeds: torch.Tensor,
        negative_prompt_embeds: torch.Tensor | None,
        seeds: Sequence[int],
        pooled_prompt_embeds: torch.Tensor | None = None,
        negative_pooled_prompt_embeds: torch.Tensor | None = None,
    ) -> torch.Tensor:
        """Final latents (B, C, h, w) for (B, L, D) embeddings and one seed per image (SDXL:
        and its (B, P) pooled text embeddings)."""
        if len(seeds) != prompt_embeds.shape[0]:
            raise ValueError(f"{len(seeds)} seeds for {prompt_embeds.shape[0]} prompts")
        if prompt_embeds.dtype != self.dtype:  # the pipeline draws in the embeddings' dtype
            raise ValueError(
                f"prompt embeddings are {prompt_embeds.dtype}, sampler is {self.dtype}"
            )
        embeddings = self.guidance_embeddings(
            prompt_embeds,
            negative_prompt_embeds,
            pooled_prompt_embeds,
            negative_pooled_prompt_embeds,
        )
        draws = draw_noise(seeded_generators(seeds), self.schedule, self.latent_shape, self.dtype)
        draws = self._to_device(draws)  # the batch's only host-to-device copy of noise
        latents = draws[0] * self.schedule.init_noise_sigma
        for index in range(self.schedule.num_steps):
            if self.pre_unet_hook is not None:
                self.pre_unet_hook(index)
            noise = draws[1 + index] if self.schedule.stochastic else None
            latents = self.step(latents, index, embeddings, noise)
        return latents

    def _to_device(self, tensor: torch.Tensor) -> torch.Tensor:
        if self.device.type == "cuda":
            return tensor.pin_memory().to(self.device, non_blocking=True)
        return tensor.to(self.device)


def _for_guidance(
    positive: torch.Tensor, negative: torch.Tensor | None, guided: bool
) -> torch.Tensor:
    """[negative; positive] rows under classifier-free guidance, else the positive ones."""
    return torch.cat([negative, positive]) if guided else positive


def _to(value: Any, device: torch.device) -> Any:
    if isinstance(value, dict):
        return {name: item.to(device) for name, item in value.items()}
    return value.to(device)


def sdxl_added_conditioning(
    time_ids: torch.Tensor,
    pooled_prompt_embeds: torch.Tensor | None,
    negative_pooled_prompt_embeds: torch.Tensor | None,
    guided: bool,
) -> dict[str, torch.Tensor]:
    """SDXL's `added_cond_kwargs` as StableDiffusionXLPipeline builds them: `text_embeds` the
    (B, P) pooled text embeddings of the second text encoder, `time_ids` the (1, 6) size/crop
    ids repeated per row; 2B rows [negative; positive] under guidance."""
    if pooled_prompt_embeds is None or (guided and negative_pooled_prompt_embeds is None):
        raise ValueError("an SDXL UNet needs pooled_prompt_embeds (and the negative ones)")
    batch = pooled_prompt_embeds.shape[0]
    rows = time_ids.repeat(batch, 1)  # (B, 6)
    return {
        "text_embeds": _for_guidance(pooled_prompt_embeds, negative_pooled_prompt_embeds, guided),
        "time_ids": _for_guidance(rows, rows, guided),
    }


class _CapturedStep:
    """A step captured in a CUDA graph and replayed on static buffers (CUDA only).

    Follows torch.cuda.graphs' recipe: warm-up on a side stream, capture, then per call copy
    the inputs into the captured buffers and replay. The output buffer is cloned because the
    next replay overwrites it.
    """

    def __init__(self, step_fn: Callable[..., torch.Tensor], args: tuple) -> None:
        self.static_args = _clone_tree(args)
        side_stream = torch.cuda.Stream()
        side_stream.wait_stream(torch.cuda.current_stream())
        with torch.cuda.stream(side_stream):
            for _ in range(2):
                step_fn(*self.static_args)
        torch.cuda.current_stream().wait_stream(side_stream)
        self.graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(self.graph):
            self.static_output = step_fn(*self.static_args)

    def __call__(self, args: tuple) -> torch.Tensor:
        _copy_tree(self.static_args, args)
        self.graph.replay()
        return self.static_output.clone()


def _clone_tree(value: Any) -> Any:
    if isinstance(value, torch.Tensor):
        return value.clone()
    if isinstance(value, dict):
        return {key: _clone_tree(item) for key, item in value.items()}
    if isinstance(value, tuple):
        return tuple(_clone_tree(item) for item in value)
    return value


def _copy_tree(target: Any, source: Any) -> None:
    if isinstance(target, torch.Tensor):
        target.copy_(source)
    elif isinstance(target, dict):
        for key in target:
            _copy_tree(target[key], source[key])
    elif isinstance(target, tuple):
        for target_item, source_item in zip(target, source, strict=True):
            _copy_tree(target_item, source_item)


# ----------------------------------------------------------------- pipeline-level helpers


def sample_latents(
    unet: torch.nn.Module,
    scheduler: Any,
    prompt_embeds: torch.Tensor,
    negative_prompt_embeds: torch.Tensor | None,
    seeds: Sequence[int],
    **sampler_options: Any,
) -> torch.Tensor:
    """One-off `Sampler(unet, scheduler, **sampler_options).sample(...)`: (B, C, h, w)."""
    sampler = Sampler(unet, scheduler, **sampler_options)
    return sampler.sample(prompt_embeds, negative_prompt_embeds, seeds)


PROMPT_CONDITIONING_NAMES = (
    "prompt_embeds",
    "negative_prompt_embeds",
    "pooled_prompt_embeds",  # SDXL only
    "negative_pooled_prompt_embeds",
)


# transformers' once-per-tokenizer flag of its "Token indices sequence length is longer than
# the specified maximum ... will result in indexing errors" message.
TRANSFORMERS_LENGTH_WARNING = "sequence-length-is-longer-than-the-specified-maximum"


def warn_truncated_prompts(pipeline: Any, prompts: Sequence[str] | None, kind: str) -> None:
    """One warning per prompt (and tokenizer) longer than the text encoder reads, naming the
    words it drops; diffusers' encode_prompt truncates negative prompts without a word.

    transformers' own message is silenced: it fires when diffusers' textual-inversion helper
    tokenizes any long prompt untruncated, and its 'indexing errors' never happen (every
    encoding truncates), so it misled even where the prompt fits the tokenizer of the run."""
    tokenizers = [
        tokenizer
        for tokenizer in (
            getattr(pipeline, "tokenizer", None),
            getattr(pipeline, "tokenizer_2", None),
        )
        if tokenizer is not None
    ]
    for tokenizer in tokenizers:
        tokenizer.deprecation_warnings[TRANSFORMERS_LENGTH_WARNING] = True
    if not tokenizers or not prompts:
        return
    tokenizer, warned = tokenizers[0], tokenizers[0].deprecation_warnings
    limit = tokenizer.model_max_length
    for prompt in dict.fromkeys(prompts):
        key = f"id-booth-truncated:{prompt}"  # once per tokenizer, as transformers keys its own
        ids = [] if key in warned else tokenizer(prompt, verbose=False).input_ids
        if len(ids) > limit:
            warned[key] = True
            dropped = tokenizer.decode(ids[limit - 1 : -1])
            logger.warning(
                "the %s is %d tokens and the text encoder reads %d: it never sees %r; shorten "
                "the prompt",
                kind,
                len(ids),
                limit,
                dropped,
            )


@torch.no_grad()
def prompt_conditioning(
    pipeline: Any,
    prompts: Sequence[str],
    negative_prompts: Sequence[str] | None,
    do_classifier_free_guidance: bool = True,
) -> dict[str, torch.Tensor | None]:
    """Sampler.sample's text keyword arguments exactly as the pipeline's __call__ makes them:
    (B, L, D) positive and negative embeddings, and SDXL's (B, P) pooled ones."""
    warn_truncated_prompts(pipeline, negative_prompts, "negative prompt")  # diffusers: positives
    encoded = pipeline.encode_prompt(
        prompt=list(prompts),
        device=pipeline._execution_device,
        num_images_per_prompt=1,
        do_classifier_free_guidance=do_classifier_free_guidance,
        negative_prompt=None if negative_prompts is None else list(negative_prompts),
    )
    return dict(zip(PROMPT_CONDITIONING_NAMES, encoded, strict=False))


def encode_prompts(
    pipeline: Any,
    prompts: Sequence[str],
    negative_prompts: Sequence[str] | None,
    do_classifier_free_guidance: bool = True,
) -> tuple[torch.Tensor, torch.Tensor | None]:
    """(B, L, D) positive and negative embeddings exactly as the pipeline's __call__ makes them."""
    encoded = prompt_conditioning(pipeline, prompts, negative_prompts, do_classifier_free_guidance)
    return encoded["prompt_embeds"], encoded["negative_prompt_embeds"]


def finite_rows(*tensors: torch.Tensor) -> list[bool]:
    """Per sample (dim 0): whether every value of every tensor is finite (one host sync).
    Postprocessing turns NaN into black pixels, so an image is written only where this holds."""
    finite = torch.stack([t.flatten(1).isfinite().all(1) for t in tensors]).all(0)
    return finite.tolist()


@torch.no_grad()
def decode_checked(
    pipeline: Any, latents: torch.Tensor, output_type: str = "pil"
) -> tuple[Any, list[bool], list[bool]]:
    """(images, NSFW flags, finite flags) from final latents, as the pipeline's __call__ ends:
    VAE decode (in the VAE's own dtype: an fp32 VAE is SDXL's, which overflows in fp16), its
    safety checker when it has one (it blacks flagged images out) or SDXL's watermark,
    postprocess. An image whose latents or decoded pixels hold NaN/inf is not finite: never
    write it (it postprocesses to a black image)."""
    vae = pipeline.vae
    upcast = vae.dtype == torch.float32 and latents.dtype != torch.float32
    no_autocast = torch.autocast(latents.device.type, enabled=False)
    with no_autocast if upcast else contextlib.nullcontext():
        scaled = (latents / vae.config.scaling_factor).to(vae.dtype)
        image = vae.decode(scaled, return_dict=False)[0]
    finite = finite_rows(latents, image)
    image = torch.nan_to_num(image)  # a non-finite sample is reported, not postprocessed as NaN
    flagged = None
    if hasattr(pipeline, "run_safety_checker"):
        image, flagged = pipeline.run_safety_checker(image, latents.device, latents.dtype)
    elif getattr(pipeline, "watermark", None) is not None:
        image = pipeline.watermark.apply_watermark(image)
    flagged = [False] * image.shape[0] if flagged is None else [bool(f) for f in flagged]
    images = pipeline.image_processor.postprocess(
        image, output_type=output_type, do_denormalize=[not flag for flag in flagged]
    )
    return images, flagged, finite


def generate_images(
    pipeline: Any,
    sampler: Sampler,
    prompts: Sequence[str],
    negative_prompts: Sequence[str] | None,
    seeds: Sequence[int],
    output_type: str = "pil",
) -> Any:
    """Images for `prompts` (one seed each), as `pipeline(...)` with per-image CPU generators."""
    conditioning = prompt_conditioning(
        pipeline, prompts, negative_prompts, sampler.do_classifier_free_guidance
    )
    latents = sampler.sample(seeds=seeds, **conditioning)
    return decode_checked(pipeline, latents, output_type)[0]


# ----------------------------------------------------------------- schedulers by name

# Scheduler factory: name -> (diffusers class name, kwargs over the base model's config).
SCHEDULERS: dict[str, tuple[str, dict[str, Any]]] = {
    "ddpm": ("DDPMScheduler", {}),
    "ddim": ("DDIMScheduler", {}),
    "pndm": ("PNDMScheduler", {"skip_prk_steps": True}),
    "euler": ("EulerDiscreteScheduler", {}),
    "euler_a": ("EulerAncestralDiscreteScheduler", {}),
    "dpmsolver++": ("DPMSolverMultistepScheduler", {"algorithm_type": "dpmsolver++"}),
    "unipc": ("UniPCMultistepScheduler", {}),
}


def scheduler_class(name: str) -> tuple[str, dict[str, Any]]:
    """Look up a scheduler name; ValueError listing the options when unknown."""
    if name not in SCHEDULERS:
        raise ValueError(f"unknown --scheduler {name!r}; choose one of: {', '.join(SCHEDULERS)}")
    return SCHEDULERS[name]


def build_sampler(name: str, base_config: Any) -> Any:
    """A diffusers scheduler of kind `name` with the base model's betas and timesteps."""
    import diffusers

    class_name, overrides = scheduler_class(name)
    return getattr(diffusers, class_name).from_config(base_config, **overrides)


# ------------------------------------------------------------------- pipelines and class images


def dtype_keyword(dtype: torch.dtype) -> dict[str, torch.dtype]:
    """from_pretrained's dtype keyword: `dtype` where diffusers deprecated `torch_dtype`."""
    from diffusers.utils import deprecation_utils

    return {"dtype" if hasattr(deprecation_utils, "_resolve_dtype") else "torch_dtype": dtype}


def load_pipeline(
    model: str, device: Any = "cpu", dtype: torch.dtype | None = None, **hub: Any
) -> Any:
    """The base model's stock pipeline (StableDiffusionPipeline, or StableDiffusionXLPipeline
    for an SDXL base: architectures.py) without progress bar, weights frozen. SD pipelines
    take `safety_checker` / `requires_safety_checker` keywords; SDXL has none to drop."""
    import diffusers

    from architectures import architecture_or_paper
    from runs import check_base_model, loading

    check_base_model(model)
    architecture = architecture_or_paper(model, hub.get("revision"))
    if architecture.is_sdxl:
        hub = {
            k: v for k, v in hub.items() if k not in ("safety_checker", "requires_safety_checker")
        }
    pipeline_class = getattr(diffusers, architecture.pipeline_class)
    with loading("the Stable Diffusion pipeline", model):
        pipeline = pipeline_class.from_pretrained(
            model, **(dtype_keyword(dtype) if dtype is not None else {}), **hub
        )
    # Frozen weights: on CPU, linear kernels differ at float level with requires_grad, and
    # a LoRA load freezes the base, so freezing up front keeps every identity on one path.
    for component in pipeline.components.values():
        if hasattr(component, "requires_grad_"):
            component.requires_grad_(False)
    pipeline.set_progress_bar_config(disable=True)
    return pipeline.to(device)


# --class_image_format -> (PIL format, file extension). JPEG (PIL's default quality, 75) is the
# reference's: its prior images carry JPEG artifacts that the prior-preservation loss learns from.
CLASS_IMAGE_FORMATS = {"jpeg": ("JPEG", ".jpg"), "png": ("PNG", ".png")}
GENERATED_CLASS_NAME = re.compile(r"class_\d{5}\.(jpg|png)")


def class_image_plan(class_dir: Path, wanted: int) -> list[int]:
    """Indices i of class_{i:05d}.<ext> to generate so the folder holds `wanted` usable images.

    Unreadable or too-small files do not count; index i is free when no usable class_{i:05d}
    image exists in any format (one that is unusable is regenerated beside it).
    """
    try:
        usable = scan_photos(class_dir).photos
    except (ValueError, FileNotFoundError):  # no usable image yet, or no folder yet
        usable = []
    taken = {path.stem for path in usable}
    missing, indices, index = wanted - len(usable), [], 0
    while len(indices) < missing:
        if f"class_{index:05d}" not in taken:
            indices.append(index)
        index += 1
    return indices


def check_class_image_format(class_dir: Path, image_format: str) -> None:
    """ValueError when class_dir already holds generated class images in another format: adding
    the missing ones in this format would mix two sampling settings in one prior set."""
    extension = CLASS_IMAGE_FORMATS[image_format][1]
    names = sorted(path.name for path in class_dir.iterdir())
    other = [n for n in names if GENERATED_CLASS_NAME.fullmatch(n) and not n.endswith(extension)]
    if other:
        matching = "png" if extension == ".jpg" else "jpeg"
        raise ValueError(
            f"{class_dir} holds {len(other)} generated class images in another format "
            f"({other[0]}, ...): pass --class_image_format {matching} to complete it, or "
            "sample into an empty folder"
        )


def generate_class_images(
    load_pipeline: Any,
    class_dir: Path,
    wanted: int,
    prompt: str,
    seed_of: Any,
    state: Any,
    batch_size: int,
    image_format: str = "jpeg",
    **sampling: Any,
) -> list[Path]:
    """Sample the missing class images, split across processes; returns this process's files.

    `load_pipeline()` gives the base pipeline on this process's device (called only when this
    process has images to make); `seed_of(i)` is image i's seed; `image_format` a key of
    CLASS_IMAGE_FORMATS; `sampling` goes to the pipeline call (height, width,
    num_inference_steps). Every process waits until all are written.
    """
    pil_format, extension = CLASS_IMAGE_FORMATS[image_format]
    class_dir.mkdir(parents=True, exist_ok=True)
    plan = class_image_plan(class_dir, wanted)
    if plan:
        check_class_image_format(class_dir, image_format)
    state.wait_for_everyone()  # nobody writes before every process has planned
    mine = plan[state.process_index :: state.num_processes]
    written: list[Path] = []
    if mine:
        logger.info(
            "sampling %d of %d missing class images into %s", len(mine), len(plan), class_dir
        )
        pipeline = load_pipeline()
        progress = progress_bar(total=len(mine), unit="img", desc="class images")
        for start in range(0, len(mine), batch_size):
            indices = mine[start : start + batch_size]
            generators = [
                torch.Generator(pipeline.device).manual_seed(seed_of(index)) for index in indices
            ]
            images = pipeline([prompt] * len(indices), generator=generators, **sampling).images
            for index, image in zip(indices, images, strict=True):
                written.append(class_dir / f"class_{index:05d}{extension}")
                atomic_save_image(image, written[-1], format=pil_format)
            progress.update(len(indices))
        progress.close()
        logger.info("wrote %d class images into %s", len(written), class_dir)
        del pipeline
        if state.device.type == "cuda":
            torch.cuda.empty_cache()
    state.wait_for_everyone()
    return written
