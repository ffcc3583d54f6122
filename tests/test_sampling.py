"""sampling.py: the sync-free loop reproduces the stock StableDiffusionPipeline's images.

Independent reference: diffusers' own `StableDiffusionPipeline.__call__` with one CPU
generator per image, on the tiny random SD-2.1-shaped pipeline (64 px, 4-5 steps), for DDPM,
DDIM and Euler ancestral and several config variants. Host syncs are caught with a
TorchDispatchMode that raises on the ops that read device values on the host.
"""

from __future__ import annotations

import logging

import numpy as np
import pytest
import torch
from diffusers import (
    DDIMScheduler,
    DDPMScheduler,
    EulerAncestralDiscreteScheduler,
    PNDMScheduler,
    StableDiffusionPipeline,
)
from PIL import Image
from tiny_sd import build_tiny_sd
from torch.utils._python_dispatch import TorchDispatchMode

import runs
import sampling

PROMPTS = ["face portrait photo of sks person", "photo of a person, forest background", "x"]
NEGATIVE = "cartoon, cgi, render"
SEEDS = [11, 2**40 + 3, 7]
SIZE = 64
STEPS = 4
GUIDANCE = 5.0


pytestmark = pytest.mark.usefixtures("one_torch_thread")


@pytest.fixture(scope="module")
def model_folder(tmp_path_factory):
    return build_tiny_sd(tmp_path_factory.mktemp("sampling") / "tiny_sd")


def load_frozen(folder, dtype=torch.float32) -> StableDiffusionPipeline:
    """The tiny pipeline loaded and frozen as inference_ID-Booth.py's load_pipeline does."""
    pipe = StableDiffusionPipeline.from_pretrained(folder, dtype=dtype)
    for component in pipe.components.values():
        if hasattr(component, "requires_grad_"):
            component.requires_grad_(False)
    pipe.set_progress_bar_config(disable=True)
    return pipe


@pytest.fixture(scope="module")
def pipeline(model_folder):
    return load_frozen(model_folder)


def with_scheduler(pipe, scheduler_class, **overrides) -> StableDiffusionPipeline:
    """The same modules with another scheduler built from the base model's config."""
    scheduler = scheduler_class.from_config(pipe.scheduler.config, **overrides)
    components = {**pipe.components, "scheduler": scheduler}
    other = StableDiffusionPipeline(**components, requires_safety_checker=False)
    other.set_progress_bar_config(disable=True)
    return other


def stock_images(pipe, prompts, seeds, output_type="np", **call_options):
    """The reference: `pipe(...)` with per-image CPU generators; (images, generators)."""
    generators = sampling.seeded_generators(seeds)
    images = pipe(
        prompt=list(prompts),
        negative_prompt=[NEGATIVE] * len(prompts),
        generator=generators,
        height=SIZE,
        width=SIZE,
        output_type=output_type,
        **call_options,
    ).images
    return images, generators


def our_images(pipe, prompts, seeds, output_type="np", **sampler_options):
    sampler_options = {"num_inference_steps": STEPS, "guidance_scale": GUIDANCE} | sampler_options
    sampler = sampling.Sampler.from_pipeline(pipe, height=SIZE, width=SIZE, **sampler_options)
    negatives = [NEGATIVE] * len(prompts)
    return sampling.generate_images(pipe, sampler, prompts, negatives, seeds, output_type)


class NoHostSyncs(TorchDispatchMode):
    """Raises on the aten ops through which a tensor's value reaches the host."""

    SYNC_OPS = (
        torch.ops.aten._local_scalar_dense,
        torch.ops.aten.nonzero,
        torch.ops.aten.is_nonzero,
    )

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        if func.overloadpacket in self.SYNC_OPS:
            raise AssertionError(f"host sync: {func}")
        return func(*args, **(kwargs or {}))


# (id, scheduler class, config overrides, call options shared by both loops)
CASES = [
    ("ddpm", DDPMScheduler, {}, {}),
    ("ddpm-linspace-sample-fixed_large", DDPMScheduler,
     {"timestep_spacing": "linspace", "prediction_type": "sample", "variance_type": "fixed_large"},
     {}),
    ("ddpm-trailing-v-clip", DDPMScheduler,
     {"timestep_spacing": "trailing", "prediction_type": "v_prediction", "clip_sample": True}, {}),
    ("ddpm-fixed_small_log-rescale", DDPMScheduler, {"variance_type": "fixed_small_log"},
     {"guidance_rescale": 0.7}),
    ("ddpm-no-guidance", DDPMScheduler, {}, {"guidance_scale": 1.0}),
    ("ddpm-one-step-at-t0", DDPMScheduler, {"steps_offset": 0}, {"num_inference_steps": 1}),
    ("ddim", DDIMScheduler, {}, {}),
    ("ddim-eta1-sample", DDIMScheduler, {"prediction_type": "sample"}, {"eta": 1.0}),
    ("ddim-trailing-zero_snr-v-clip", DDIMScheduler,
     {"timestep_spacing": "trailing", "rescale_betas_zero_snr": True,
      "prediction_type": "v_prediction", "clip_sample": True, "set_alpha_to_one": False}, {}),
    ("euler_a", EulerAncestralDiscreteScheduler, {}, {}),
    ("euler_a-linspace-v", EulerAncestralDiscreteScheduler,
     {"timestep_spacing": "linspace", "prediction_type": "v_prediction"}, {}),
]  # fmt: skip


# The stock pipeline warns about DDIM configs with clip_sample=True; that is the case tested.
@pytest.mark.filterwarnings("ignore:The configuration file of this scheduler")
@pytest.mark.parametrize(
    ("scheduler_class", "overrides", "options"),
    [case[1:] for case in CASES],
    ids=[case[0] for case in CASES],
)
def test_images_equal_the_stock_pipeline(pipeline, scheduler_class, overrides, options):
    pipe = with_scheduler(pipeline, scheduler_class, **overrides)
    call_options = {"num_inference_steps": STEPS, "guidance_scale": GUIDANCE} | options
    reference, generators = stock_images(pipe, PROMPTS, SEEDS, **call_options)
    ours = our_images(pipe, PROMPTS, SEEDS, **call_options)
    assert ours.shape == reference.shape == (len(PROMPTS), SIZE, SIZE, 3)
    assert np.abs(ours - reference).max() < 1e-4  # measured: 0.0 (bitwise) on CPU fp32
    to_pil = pipe.image_processor.numpy_to_pil
    assert [image.tobytes() for image in to_pil(ours)] == [
        image.tobytes() for image in to_pil(reference)
    ]
    # Same number of draws: our generators end where the stock pipeline's did.
    schedule = sampling.build_schedule(
        pipe.scheduler, call_options["num_inference_steps"], options.get("eta", 0.0)
    )
    ours_after = sampling.seeded_generators(SEEDS)
    sampling.draw_noise(ours_after, schedule, (4, SIZE // 8, SIZE // 8), torch.float32)
    for stock, mine in zip(generators, ours_after, strict=True):
        assert torch.equal(stock.get_state(), mine.get_state())


def test_pil_images_are_byte_identical_to_the_stock_pipeline(pipeline):
    reference, _ = stock_images(
        pipeline, PROMPTS, SEEDS, "pil", num_inference_steps=STEPS, guidance_scale=GUIDANCE
    )
    ours = our_images(pipeline, PROMPTS, SEEDS, "pil")
    assert [image.tobytes() for image in ours] == [image.tobytes() for image in reference]


@pytest.mark.parametrize("scheduler_class", [DDPMScheduler, EulerAncestralDiscreteScheduler])
def test_bf16_images_equal_the_stock_pipeline(model_folder, scheduler_class):
    """Mixed dtypes (bf16 latents, fp32 host coefficients, Euler's fp32 upcast) as the stock."""
    pipe = with_scheduler(load_frozen(model_folder, torch.bfloat16), scheduler_class)
    call_options = {"num_inference_steps": 4, "guidance_scale": GUIDANCE}
    reference, _ = stock_images(pipe, PROMPTS[:2], SEEDS[:2], **call_options)
    ours = our_images(pipe, PROMPTS[:2], SEEDS[:2], **call_options)
    assert np.abs(ours - reference).max() < 1e-4  # measured: 0.0 (bitwise)


def test_noise_follows_the_stock_consumption_order(pipeline):
    """Row 0: initial latents, then one draw per step with t > 0, all from the image's generator."""
    pipe = with_scheduler(pipeline, DDPMScheduler, timestep_spacing="linspace")
    schedule = sampling.build_schedule(pipe.scheduler, STEPS)
    shape = (4, SIZE // 8, SIZE // 8)
    draws = sampling.draw_noise(sampling.seeded_generators(SEEDS), schedule, shape, torch.float32)
    pipe.scheduler.set_timesteps(STEPS)
    assert schedule.draws_noise == tuple(bool(t > 0) for t in pipe.scheduler.timesteps)
    assert schedule.draws_noise[-1] is False  # linspace ends at t = 0
    assert draws.shape == (1 + STEPS, len(SEEDS), *shape)
    for image, seed in enumerate(SEEDS):
        generator = torch.Generator("cpu").manual_seed(seed)
        expected = [torch.randn((1, *shape), generator=generator)[0] for _ in range(STEPS)]
        assert all(torch.equal(draws[row, image], expected[row]) for row in range(STEPS))
        assert not draws[STEPS, image].any()


def test_batch_equals_images_made_one_by_one_and_each_is_regenerable(pipeline):
    batch = our_images(pipeline, PROMPTS, SEEDS)
    alone = np.concatenate(
        [our_images(pipeline, [p], [s]) for p, s in zip(PROMPTS, SEEDS, strict=True)]
    )
    assert np.abs(batch - alone).max() < 1e-4  # float reassociation across batch sizes only
    reference = np.concatenate(
        [stock_images(pipeline, [p], [s], num_inference_steps=STEPS, guidance_scale=GUIDANCE)[0]
         for p, s in zip(PROMPTS, SEEDS, strict=True)]
    )  # fmt: skip
    assert np.array_equal(alone, reference)
    assert np.array_equal(our_images(pipeline, PROMPTS[1:2], SEEDS[1:2]), alone[1:2])
    # Noise of image b never depends on its batch-mates.
    schedule = sampling.build_schedule(pipeline.scheduler, STEPS)
    shape = (4, SIZE // 8, SIZE // 8)
    in_batch = sampling.draw_noise(
        sampling.seeded_generators(SEEDS), schedule, shape, torch.float32
    )
    single = sampling.draw_noise(
        sampling.seeded_generators(SEEDS[1:2]), schedule, shape, torch.float32
    )
    assert torch.equal(in_batch[:, 1], single[:, 0])


@pytest.mark.parametrize(
    ("scheduler_class", "eta"),
    [(DDPMScheduler, 0.0), (DDIMScheduler, 0.0), (DDIMScheduler, 1.0),
     (EulerAncestralDiscreteScheduler, 0.0)],
    ids=["ddpm", "ddim", "ddim-eta1", "euler_a"],
)  # fmt: skip
def test_sampling_loop_has_no_host_syncs(pipeline, scheduler_class, eta):
    pipe = with_scheduler(pipeline, scheduler_class)
    sampler = sampling.Sampler.from_pipeline(
        pipe, num_inference_steps=3, height=SIZE, width=SIZE, eta=eta
    )
    prompt_embeds, negative_embeds = sampling.encode_prompts(pipe, PROMPTS, [NEGATIVE] * 3)
    with NoHostSyncs():
        latents = sampler.sample(prompt_embeds, negative_embeds, SEEDS)
    assert latents.shape == (3, 4, SIZE // 8, SIZE // 8)
    assert torch.isfinite(latents).all()


@pytest.mark.parametrize("scheduler_class", [DDPMScheduler, EulerAncestralDiscreteScheduler])
def test_the_detector_catches_the_stock_schedulers_syncs(pipeline, scheduler_class):
    scheduler = scheduler_class.from_config(pipeline.scheduler.config)
    scheduler.set_timesteps(3)
    latents = torch.randn(1, 4, 8, 8)
    with NoHostSyncs(), pytest.raises(AssertionError, match="host sync"):
        scheduler.step(latents, scheduler.timesteps[0], latents, generator=None)


def test_hook_runs_before_every_unet_call_on_the_doubled_batch(pipeline):
    calls, unet_batches = [], []
    handle = pipeline.unet.register_forward_pre_hook(
        lambda module, args: unet_batches.append(args[0].shape[0])
    )
    try:
        sampler = sampling.Sampler.from_pipeline(
            pipeline, num_inference_steps=4, height=SIZE, width=SIZE, pre_unet_hook=calls.append
        )
        prompt_embeds, negative_embeds = sampling.encode_prompts(pipeline, PROMPTS, [NEGATIVE] * 3)
        sampler.sample(prompt_embeds, negative_embeds, SEEDS)
    finally:
        handle.remove()
    assert calls == [0, 1, 2, 3]
    assert unet_batches == [2 * len(PROMPTS)] * 4


def test_compiled_loop_matches_eager(pipeline):
    """torch.compile of the step (aot_eager: inductor's CPU codegen takes minutes here)."""
    prompt_embeds, negative_embeds = sampling.encode_prompts(pipeline, PROMPTS, [NEGATIVE] * 3)
    options = {"num_inference_steps": 4, "height": SIZE, "width": SIZE}
    eager = sampling.Sampler.from_pipeline(pipeline, **options)
    compiled = sampling.Sampler.from_pipeline(
        pipeline, compile=True, compile_backend="aot_eager", **options
    )
    expected = eager.sample(prompt_embeds, negative_embeds, SEEDS)
    actual = compiled.sample(prompt_embeds, negative_embeds, SEEDS)
    assert (actual - expected).abs().max() < 1e-5  # measured: 0.0


def test_sample_latents_is_the_one_shot_sampler(pipeline):
    prompt_embeds, negative_embeds = sampling.encode_prompts(pipeline, PROMPTS, [NEGATIVE] * 3)
    options = {"num_inference_steps": 3, "height": SIZE, "width": SIZE}
    latents = sampling.sample_latents(
        pipeline.unet, pipeline.scheduler, prompt_embeds, negative_embeds, SEEDS, **options
    )
    expected = sampling.Sampler(pipeline.unet, pipeline.scheduler, **options).sample(
        prompt_embeds, negative_embeds, SEEDS
    )
    assert torch.equal(latents, expected)


@pytest.mark.parametrize(
    ("scheduler", "match"),
    [
        (PNDMScheduler(), "PNDMScheduler is not supported.*DDPMScheduler, DDIMScheduler"),
        (DDPMScheduler(thresholding=True), "thresholding=True is not supported"),
        (DDPMScheduler(variance_type="learned_range"), "variance_type='learned_range'"),
        (DDIMScheduler(prediction_type="flow"), "prediction_type='flow'.*'epsilon'"),
        (EulerAncestralDiscreteScheduler(prediction_type="sample"), "prediction_type='sample'"),
    ],
    ids=["pndm", "ddpm-thresholding", "ddpm-learned_range", "ddim-flow", "euler_a-sample"],
)
def test_unsupported_scheduler_configs_raise(pipeline, scheduler, match):
    with pytest.raises(ValueError, match=match):
        sampling.Sampler(pipeline.unet, scheduler, num_inference_steps=4)


def test_invalid_sampler_arguments_raise(pipeline):
    with pytest.raises(ValueError, match="cuda_graph=True needs a CUDA device"):
        sampling.Sampler.from_pipeline(pipeline, device="cpu", cuda_graph=True)
    with pytest.raises(ValueError, match="eta must be >= 0"):
        sampling.Sampler.from_pipeline(pipeline, eta=-1.0)
    with pytest.raises(ValueError, match="divisible by 8"):
        sampling.Sampler.from_pipeline(pipeline, height=60)
    sampler = sampling.Sampler.from_pipeline(
        pipeline, num_inference_steps=2, height=SIZE, width=SIZE
    )
    prompt_embeds, negative_embeds = sampling.encode_prompts(pipeline, PROMPTS, [NEGATIVE] * 3)
    with pytest.raises(ValueError, match="2 seeds for 3 prompts"):
        sampler.sample(prompt_embeds, negative_embeds, SEEDS[:2])
    with pytest.raises(ValueError, match="needs negative_prompt_embeds"):
        sampler.sample(prompt_embeds, None, SEEDS)
    with pytest.raises(ValueError, match="prompt embeddings are torch.float64"):
        sampler.sample(prompt_embeds.double(), negative_embeds.double(), SEEDS)


# ----------------------------------------------------------------------------- class images


def make_class_images(pipeline, class_dir, wanted, **options):
    """generate_class_images in this process with the tiny pipeline, 2 steps, seed of i = i."""
    return sampling.generate_class_images(
        lambda: pipeline,
        class_dir,
        wanted,
        "photo of a person",
        lambda index: index,
        runs.process_state(),
        options.pop("batch_size", 1),
        height=SIZE,
        width=SIZE,
        num_inference_steps=2,
        **options,
    )


def test_class_images_are_the_references_jpegs_by_default(pipeline, tmp_path):
    """The reference saves `pipeline(prompt).images[i]` with image.save("....jpg"): JPEG at
    PIL's default quality 75. Written here the same bytes; png on request, lossless."""
    written = make_class_images(pipeline, tmp_path / "jpeg", 2)
    assert [path.name for path in written] == ["class_00000.jpg", "class_00001.jpg"]
    for index, path in enumerate(written):
        generator = torch.Generator().manual_seed(index)
        image = pipeline(
            "photo of a person", generator=generator, height=SIZE, width=SIZE,
            num_inference_steps=2,
        ).images[0]  # fmt: skip
        image.save(tmp_path / "reference.jpg")  # the reference's call
        assert path.read_bytes() == (tmp_path / "reference.jpg").read_bytes()
        png = make_class_images(pipeline, tmp_path / f"png{index}", index + 1, image_format="png")
        assert png[-1].name == f"class_{index:05d}.png"
        assert np.asarray(Image.open(png[-1])).tobytes() == image.tobytes()


def test_existing_png_class_folders_still_serve_and_are_never_mixed(pipeline, tmp_path):
    """A full folder of PNG class images (made before JPEG was the default) is used as it is;
    completing a partial one in another format is refused with one line."""
    old = make_class_images(pipeline, tmp_path, 2, image_format="png")
    assert make_class_images(pipeline, tmp_path, 2) == []  # complete: nothing sampled
    assert sampling.class_image_plan(tmp_path, 2) == []
    with pytest.raises(ValueError, match="another format .*--class_image_format png"):
        make_class_images(pipeline, tmp_path, 3)
    added = make_class_images(pipeline, tmp_path, 3, image_format="png")
    assert [path.name for path in added] == ["class_00002.png"]
    assert sorted(tmp_path.iterdir()) == [*old, *added]


def test_class_image_batches_change_images_at_float_level_only(pipeline, tmp_path):
    """The reference samples class images one by one (batch 1, the default here); a batch of
    2 gives the same files up to JPEG re-encoding of float-level pixel changes."""
    one = make_class_images(pipeline, tmp_path / "one", 2, image_format="png")
    two = make_class_images(pipeline, tmp_path / "two", 2, image_format="png", batch_size=2)
    for a, b in zip(one, two, strict=True):
        difference = np.abs(np.asarray(Image.open(a), np.int16) - np.asarray(Image.open(b)))
        assert difference.max() <= 2


def test_class_image_plan_replaces_unusable_files(tmp_path):
    for index in (0, 2):
        Image.new("RGB", (96, 96), (index * 40, 90, 120)).save(tmp_path / f"class_{index:05d}.png")
    (tmp_path / "class_00001.png").write_bytes(b"truncated")  # corrupt: regenerated in place
    Image.new("RGB", (16, 16)).save(tmp_path / "tiny.png")  # too small: does not count
    assert sampling.class_image_plan(tmp_path, 3) == [1]
    assert sampling.class_image_plan(tmp_path, 5) == [1, 3, 4]
    assert sampling.class_image_plan(tmp_path / "missing", 2) == [0, 1]


# ----------------------------------------------------------------- other architectures


@pytest.fixture(scope="module")
def sdxl_pipeline(tmp_path_factory):
    """The tiny random SDXL (two text encoders, text_time added conditioning), frozen."""
    from diffusers import StableDiffusionXLPipeline

    folder = build_tiny_sd(tmp_path_factory.mktemp("sampling_sdxl") / "sdxl", size="tiny-sdxl")
    pipe = sampling.load_pipeline(str(folder))
    assert isinstance(pipe, StableDiffusionXLPipeline)
    return pipe


@pytest.mark.parametrize(
    ("scheduler_class", "options"),
    [
        (DDPMScheduler, {}),
        (DDIMScheduler, {"guidance_scale": 1.0}),
        (EulerAncestralDiscreteScheduler, {}),
    ],
    ids=["ddpm", "ddim-unguided", "euler_a"],
)
def test_sdxl_images_equal_the_stock_sdxl_pipeline(sdxl_pipeline, scheduler_class, options):
    """The sampler with SDXL's added conditioning (pooled text, size/crop time ids) equals
    StableDiffusionXLPipeline at batch 1 and at batch 3, fp32."""
    from diffusers import StableDiffusionXLPipeline

    scheduler = scheduler_class.from_config(sdxl_pipeline.scheduler.config)
    pipe = StableDiffusionXLPipeline(**{**sdxl_pipeline.components, "scheduler": scheduler})
    pipe.set_progress_bar_config(disable=True)
    call_options = {"num_inference_steps": STEPS, "guidance_scale": GUIDANCE} | options
    for prompts, seeds in ((PROMPTS[:1], SEEDS[:1]), (PROMPTS, SEEDS)):
        reference, _ = stock_images(pipe, prompts, seeds, **call_options)
        ours = our_images(pipe, prompts, seeds, **call_options)
        assert ours.shape == reference.shape == (len(prompts), SIZE, SIZE, 3)
        assert np.abs(ours - reference).max() < 1e-5  # measured: 0.0 on CPU fp32


def test_the_sdxl_sampler_refuses_missing_pooled_embeddings(sdxl_pipeline):
    conditioning = sampling.prompt_conditioning(sdxl_pipeline, PROMPTS[:1], [NEGATIVE])
    scheduler = DDPMScheduler.from_config(sdxl_pipeline.scheduler.config)
    sampler = sampling.Sampler(sdxl_pipeline.unet, scheduler, height=SIZE, width=SIZE)
    with pytest.raises(ValueError, match="pooled_prompt_embeds"):
        sampler.sample(conditioning["prompt_embeds"], conditioning["negative_prompt_embeds"], [1])


def test_loading_a_single_file_checkpoint_says_how_to_make_a_folder(tmp_path):
    from sampling import load_pipeline

    checkpoint = tmp_path / "v2-1_512-ema-pruned.safetensors"
    checkpoint.write_bytes(b"\0" * 8)
    with pytest.raises(FileNotFoundError, match="from_single_file"):
        load_pipeline(str(checkpoint))


def test_only_a_really_truncated_prompt_is_warned_about_once_naming_what_is_dropped(
    model_folder, caplog, capfd
):
    """The tiny tokenizer is byte-level (a token per character): the paper's negative prompt
    is 91 tokens there, really truncated to 77; a short one is not. transformers' 'indexing
    errors' message is never printed (every encoding truncates)."""
    pipe = load_frozen(model_folder)
    caplog.set_level(logging.WARNING, logger="sampling")
    short = "photo of sks person"
    sampling.prompt_conditioning(pipe, [short, "x" * 60], [short, short])
    assert caplog.records == [] and "Token indices" not in capfd.readouterr().err
    for _ in range(2):
        sampling.prompt_conditioning(pipe, [short, short], [runs.PAPER_NEGATIVE_PROMPT] * 2)
    assert "indexing errors" not in capfd.readouterr().err
    messages = [record.getMessage() for record in caplog.records]
    assert len(messages) == 1, messages
    assert messages[0].startswith("the negative prompt is 93 tokens and the text encoder reads 77")
    assert "landscape" in messages[0] and "shorten the prompt" in messages[0]
