"""trainer.py: the training step of one identity (PackedBatch.one_identity + training_step)
against the reference recipe, its masks, precisions and gradients, the packed trainer's update,
checkpoints and host syncs, and the resume allow-list. The script's runs: test_train.py."""

from __future__ import annotations

import copy
import itertools
import math
from functools import partial

import pytest
import torch
import torch.nn.functional as F
from training_assets import Assets, cli, make_assets, train

import fileio
import losses
import trainer

pytestmark = pytest.mark.usefixtures("one_torch_thread")


@pytest.fixture(scope="module")
def assets(tmp_path_factory) -> Assets:
    return make_assets(tmp_path_factory.mktemp("trainer_assets"))


# ============================================================================ the training step


@pytest.fixture(scope="module")
def step_parts(assets):
    """Frozen models and face tools of a triplet run, built once (CPU, fp32)."""
    args = train.parse_args(
        cli(assets, assets.root / "unused", f"--instance_data_dir={assets.identity('hanks')}")
        + ["--lora_alpha=8"]  # alpha != rank: the saved LoRA must carry its scale
    )
    device = torch.device("cpu")
    tools = trainer.load_face_tools(args, device)
    frozen = trainer.load_frozen_models(args, device, "no", tools.encoder)
    return args, tools, frozen


def unet_with_one_identity(args, device, precision):
    """The trainer's UNet with a batched LoRA of one slot, initialised as a fresh identity."""
    unet, lora = trainer.load_unet_with_slots(args, device, precision, 1)
    trainer.init_identity_(lora, 0, fileio.stable_seed(args.seed, "lora-init"))
    return unet, lora


def compute_losses(unet_and_lora, frozen, prompts, batch, generator, args) -> dict:
    """The trainer's step (training_step) on a collated [instance..., prior...] batch of one
    identity: its terms as scalars."""
    unet, lora = unet_and_lora
    pixels = batch["pixel_values"].to(frozen.device, frozen.weight_dtype)
    with torch.no_grad():
        dist = frozen.vae.encode(pixels).latent_dist
    one = trainer.PackedBatch.one_identity(
        dist.mean,
        dist.std,
        batch["num_instance"],
        landmarks=batch["landmarks"][: batch["num_instance"]].float(),
        embeddings=batch["embeddings"].float(),
        has_face=batch["has_face"],
    )
    lora.set_identities(one.slots)
    config = trainer.objective_config(args, frozen)
    terms = trainer.training_step(
        unet, frozen, prompts, one, [generator], config, args.clamp_decoded_x0
    )
    return {name: value[0] for name, value in terms.items()}


@pytest.mark.parametrize("loss", ["identity", "triplet"])
def test_identity_term_is_nonzero_and_its_gradient_reaches_only_the_lora(step_parts, loss):
    from datasets import collate_dreambooth

    args, tools, frozen = step_parts
    args = copy.copy(args)
    args.loss = loss
    unet, lora = unet_with_one_identity(args, frozen.device, "no")
    dataset = trainer.build_dataset(args, args.instance_data_dir, tools)
    batch = collate_dreambooth([dataset[0], dataset[1]], with_prior=True)  # 2 instance + 2 prior
    generator = torch.Generator().manual_seed(3)
    terms = compute_losses(
        (unet, lora), frozen, trainer.PromptEmbeddings.encode(frozen, args), batch, generator, args
    )
    assert set(terms) == set(trainer.TERM_NAMES)
    assert terms["identity_criterion"].item() > 0 and terms["identity_term"].item() > 0
    torch.testing.assert_close(
        terms["loss"], terms["diffusion_loss"] + terms["prior_loss"] + terms["identity_term"]
    )

    terms["identity_term"].backward()  # the identity term alone
    trainable = {name: p for name, p in unet.named_parameters() if p.requires_grad}
    assert trainable and all("lora_" in name for name in trainable)
    lora_b_grad = sum(p.grad.abs().sum() for name, p in trainable.items() if "lora_B" in name)
    assert lora_b_grad > 0, "the identity term's gradient does not reach the LoRA"
    frozen_modules = (frozen.vae, frozen.text_encoder, frozen.arcface)
    for module in (unet, *frozen_modules):
        for name, parameter in module.named_parameters():
            if "lora_" not in name:
                assert not parameter.requires_grad and parameter.grad is None, name


def test_gradient_checkpointing_gives_the_same_lora_gradients(step_parts):
    """Checkpointed UNet blocks and VAE decoder must not drop the (frozen-input) LoRA grads."""
    from datasets import collate_dreambooth

    args, tools, frozen = step_parts
    dataset = trainer.build_dataset(args, args.instance_data_dir, tools)
    batch = collate_dreambooth([dataset[0]], with_prior=True)
    gradients, recomputed = [], []
    for checkpointing in (False, True):
        run_args = copy.copy(args)
        run_args.gradient_checkpointing = checkpointing
        run_frozen = trainer.load_frozen_models(run_args, frozen.device, "no", frozen.arcface)
        decoder = run_frozen.vae.decoder
        if checkpointing:  # count the decoder blocks whose backward recomputes
            checkpoint = decoder._gradient_checkpointing_func
            decoder._gradient_checkpointing_func = lambda *a, f=checkpoint: (
                recomputed.append(1) or f(*a)
            )
        unet, lora = unet_with_one_identity(run_args, frozen.device, "no")
        prompts = trainer.PromptEmbeddings.encode(run_frozen, run_args)
        generator = torch.Generator().manual_seed(5)
        terms = compute_losses((unet, lora), run_frozen, prompts, batch, generator, run_args)
        terms["loss"].backward()
        gradients.append({n: p.grad for n, p in unet.named_parameters() if p.requires_grad})
    assert run_frozen.vae.is_gradient_checkpointing and unet.is_gradient_checkpointing
    assert len(recomputed) == 1 + len(decoder.up_blocks)  # mid block + every up block
    assert gradients[0].keys() == gradients[1].keys()
    for name, gradient in gradients[0].items():
        torch.testing.assert_close(gradients[1][name], gradient, rtol=1e-4, atol=1e-7, msg=name)


def test_bf16_mixed_precision_keeps_frozen_weights_low_and_lora_fp32(step_parts):
    """The GPU recipe's dtype plumbing, run with bf16 autocast on the CPU.

    A small conv net stands in for the IResNet inside the real ArcFaceEncoder wrapper: CPUs
    without bf16 convolutions take ~10 s for the IResNet-18 under bf16 autocast.
    """
    from arcface import ArcFaceEncoder
    from datasets import collate_dreambooth

    args, tools, _ = step_parts
    torch.manual_seed(0)
    small = torch.nn.Sequential(
        torch.nn.Conv2d(3, 8, 7, stride=4), torch.nn.Flatten(), torch.nn.LazyLinear(512)
    )
    small(torch.zeros(1, 3, 112, 112))  # materialise the lazy layer
    encoder = ArcFaceEncoder(small, "small-stand-in")
    frozen = trainer.load_frozen_models(args, torch.device("cpu"), "bf16", encoder)
    unet, lora = unet_with_one_identity(args, frozen.device, "bf16")
    dataset = trainer.build_dataset(args, args.instance_data_dir, tools)
    batch = collate_dreambooth([dataset[0]], with_prior=True)
    with frozen.autocast():
        terms = compute_losses(
            (unet, lora),
            frozen,
            trainer.PromptEmbeddings.encode(frozen, args),
            batch,
            torch.Generator().manual_seed(0),
            args,
        )
    terms["loss"].backward()
    assert all(torch.isfinite(value) for value in terms.values())
    for name, parameter in unet.named_parameters():
        expected = torch.float32 if "lora_" in name else torch.bfloat16
        assert parameter.dtype == expected, name
    lora = [p for p in unet.parameters() if p.requires_grad]
    assert all(p.grad is not None and p.grad.dtype == torch.float32 for p in lora)
    assert frozen.vae.dtype == torch.bfloat16 and frozen.text_encoder.dtype == torch.bfloat16


class Recorder:
    """Wraps one of the trainer's functions and keeps what each call returned."""

    def __init__(self, function):
        self.function, self.outputs = function, []

    def __call__(self, *args, **kwargs):
        self.outputs.append(self.function(*args, **kwargs))
        return self.outputs[-1]


def test_bf16_runs_arcface_and_x0_in_fp32_and_the_identity_grad_reaches_the_lora(
    step_parts, monkeypatch
):
    """Under bf16 autocast the frozen ArcFace (and the alignment) run in fp32, like e_inst /
    e_prior were computed, and x0_hat is computed in fp32 and cast to the VAE dtype only for
    the decode."""
    from arcface import ArcFaceEncoder
    from datasets import collate_dreambooth

    args, tools, _ = step_parts
    torch.manual_seed(0)
    small = torch.nn.Sequential(
        torch.nn.Conv2d(3, 8, 7, stride=4), torch.nn.Flatten(), torch.nn.LazyLinear(512)
    )
    small(torch.zeros(1, 3, 112, 112))
    encoder = ArcFaceEncoder(small, "small-stand-in")
    backbone_io = []
    encoder.backbone.register_forward_hook(
        lambda module, inputs, output: backbone_io.append((inputs[0].dtype, output.dtype))
    )
    x0_record = Recorder(trainer.predict_x0)
    monkeypatch.setattr(trainer, "predict_x0", x0_record)
    align_record = Recorder(trainer.align_faces_torch)
    monkeypatch.setattr(trainer, "align_faces_torch", align_record)
    frozen = trainer.load_frozen_models(args, torch.device("cpu"), "bf16", encoder)
    decode_inputs = []
    original_decode = frozen.vae.decode
    monkeypatch.setattr(
        frozen.vae,
        "decode",
        lambda latents, *a, **k: decode_inputs.append(latents.dtype) or original_decode(latents),
    )
    unet, lora = unet_with_one_identity(args, frozen.device, "bf16")
    dataset = trainer.build_dataset(args, args.instance_data_dir, tools)
    batch = collate_dreambooth([dataset[0], dataset[1]], with_prior=True)
    with frozen.autocast():
        terms = compute_losses(
            (unet, lora),
            frozen,
            trainer.PromptEmbeddings.encode(frozen, args),
            batch,
            torch.Generator().manual_seed(0),
            args,
        )
    assert backbone_io == [(torch.float32, torch.float32)], "ArcFace ran under autocast"
    assert [x0.dtype for x0 in x0_record.outputs] == [torch.float32]
    assert [faces.dtype for faces in align_record.outputs] == [torch.float32]
    assert decode_inputs == [torch.bfloat16]  # the VAE itself stays in the weight dtype
    assert terms["identity_term"].dtype == torch.float32
    assert torch.isfinite(terms["identity_term"]) and terms["identity_term"] > 0
    terms["identity_term"].backward()
    lora_b = [p for n, p in unet.named_parameters() if "lora_B" in n]
    assert sum(p.grad.abs().sum() for p in lora_b) > 0
    assert all(p.grad.dtype == torch.float32 for p in lora_b)


def _masked_step(step_parts, monkeypatch, loss: str, class_has_face: list[bool]):
    """compute_losses on 2 instance + 2 prior samples with the given class has_face flags,
    recording the per-sample identity losses and weights the trainer computed."""
    from datasets import collate_dreambooth

    args, tools, frozen = step_parts
    args = copy.copy(args)
    args.loss = loss
    per_sample = Recorder(losses.IDENTITY_LOSSES[loss])
    weights = Recorder(losses.IDENTITY_WEIGHTINGS["timestep"])
    monkeypatch.setitem(losses.IDENTITY_LOSSES, loss, per_sample)
    monkeypatch.setitem(losses.IDENTITY_WEIGHTINGS, "timestep", weights)
    unet, lora = unet_with_one_identity(args, frozen.device, "no")
    dataset = trainer.build_dataset(args, args.instance_data_dir, tools)
    batch = collate_dreambooth([dataset[0], dataset[1]], with_prior=True)
    batch["has_face"][2:] = torch.tensor(class_has_face)
    terms = compute_losses(
        (unet, lora),
        frozen,
        trainer.PromptEmbeddings.encode(frozen, args),
        batch,
        torch.Generator().manual_seed(3),
        args,
    )
    [values], [weight] = per_sample.outputs, weights.outputs
    return terms, values.detach(), weight, unet


def test_triplet_term_skips_instance_samples_whose_class_image_has_no_face(step_parts, monkeypatch):
    terms, values, weight, _ = _masked_step(step_parts, monkeypatch, "triplet", [True, False])
    # Only sample 0 has a negative: the means are over it alone.
    torch.testing.assert_close(terms["identity_term"], weight[0] * values[0])
    torch.testing.assert_close(terms["identity_criterion"], values[0])
    torch.testing.assert_close(terms["identity_weight"], weight[0])
    assert terms["identity_count"].item() == 1
    torch.testing.assert_close(
        terms["loss"], terms["diffusion_loss"] + terms["prior_loss"] + terms["identity_term"]
    )


def test_triplet_term_with_no_faceless_negative_is_zero_and_finite(step_parts, monkeypatch):
    terms, _, _, unet = _masked_step(step_parts, monkeypatch, "triplet", [False, False])
    assert terms["identity_count"].item() == 0
    for name in ("identity_term", "identity_criterion", "identity_weight"):
        assert terms[name].item() == 0, name
    torch.testing.assert_close(terms["loss"], terms["diffusion_loss"] + terms["prior_loss"])
    terms["loss"].backward()
    grads = [p.grad for p in unet.parameters() if p.requires_grad]
    assert all(g is not None and torch.isfinite(g).all() for g in grads)


def test_identity_loss_ignores_whether_class_images_have_a_face(step_parts, monkeypatch):
    terms, values, weight, _ = _masked_step(step_parts, monkeypatch, "identity", [False, False])
    assert terms["identity_count"].item() == 2
    torch.testing.assert_close(terms["identity_term"], (weight * values).mean())


def test_dreambooth_loss_has_no_identity_terms(step_parts):
    from datasets import collate_dreambooth

    args, tools, frozen = step_parts
    args = copy.copy(args)
    args.loss = "dreambooth"
    unet, lora = unet_with_one_identity(args, frozen.device, "no")
    dataset = trainer.build_dataset(args, args.instance_data_dir, tools)
    batch = collate_dreambooth([dataset[0]], with_prior=True)
    generator = torch.Generator().manual_seed(0)
    terms = compute_losses(
        (unet, lora), frozen, trainer.PromptEmbeddings.encode(frozen, args), batch, generator, args
    )
    assert terms["identity_term"].item() == 0 and terms["identity_criterion"].item() == 0
    torch.testing.assert_close(terms["loss"], terms["diffusion_loss"] + terms["prior_loss"])


def one_slot_trainer(step_parts, tmp_path, **changes):
    """A PackedTrainer of one slot holding identity 'hanks' (nothing trained yet); `changes`:
    arguments other than the step_parts run's."""
    from accelerate import PartialState

    args, tools, frozen = step_parts
    args = copy.copy(args)
    args.validation_prompt = ""
    vars(args).update(changes)
    identity = train.Identity("hanks", args.instance_data_dir, tmp_path / "hanks")
    from tqdm.auto import tqdm

    packed = trainer.PackedTrainer(args, frozen, tools, PartialState(cpu=True), 1)
    slot = packed.fill(0, identity)
    slot.progress.close()  # the test drives the steps: no open bar to redraw at exit
    slot.progress = tqdm(disable=True)
    return packed, slot


def test_an_update_changes_only_lora_and_the_saved_lora_reproduces_it(step_parts, tmp_path):
    from diffusers import StableDiffusionPipeline

    args, _, frozen = step_parts
    trainer, slot = one_slot_trainer(step_parts, tmp_path)
    unet_before = {k: v.clone() for k, v in trainer.unet.state_dict().items()}
    frozen_modules = (frozen.vae, frozen.text_encoder, frozen.arcface)
    frozen_before = [{k: v.clone() for k, v in m.state_dict().items()} for m in frozen_modules]
    trainer.step()
    assert slot.global_step == 1

    unet_after = trainer.unet.state_dict()
    changed = {k for k in unet_before if not torch.equal(unet_before[k], unet_after[k])}
    assert any("lora_B" in k for k in changed)
    assert all("lora_" in k for k in changed), sorted(
        changed - {k for k in changed if "lora_" in k}
    )
    for before, module in zip(frozen_before, frozen_modules, strict=True):
        assert all(torch.equal(before[k], v) for k, v in module.state_dict().items())

    trainer.save_lora_of(slot, tmp_path / "lora")
    pipeline = StableDiffusionPipeline.from_pretrained(str(args.pretrained_model_name_or_path))
    latents, timestep = torch.randn(1, 4, 8, 8), torch.tensor([500])
    text = trainer.prompts.instance
    trainer.unet.eval()
    trainer.lora.select_everyone(0)
    with torch.no_grad():
        base = pipeline.unet(latents, timestep, text).sample
        pipeline.load_lora_weights(str(tmp_path / "lora"))
        loaded = pipeline.unet(latents, timestep, text).sample
        trained = trainer.unet(latents, timestep, text).sample
    torch.testing.assert_close(loaded, trained, rtol=1e-5, atol=1e-6)
    assert (loaded - base).abs().max() > 1e-4


def test_logged_identity_means_count_only_samples_that_had_the_term():
    means = trainer.term_means(torch.device("cpu"))
    names = trainer.TERM_NAMES
    with_term = dict.fromkeys(names, 1.0) | {"identity_criterion": 0.5, "identity_weight": 0.8}
    without_term = dict.fromkeys(names, 1.0) | {
        "identity_criterion": 0.0,
        "identity_weight": 0.0,
        "identity_count": 0.0,
    }
    for values in (with_term, without_term):
        means.add(torch.tensor([values[name] for name in names], dtype=torch.float64))
    result = means.pop()
    assert result["identity_criterion"] == pytest.approx(0.5)  # not (0.5 + 0) / 2
    assert result["identity_weight"] == pytest.approx(0.8)
    assert result["identity_count"] == pytest.approx(0.5)  # samples per micro-batch
    assert means.pop()["loss"] == 0.0  # reset


def test_decoded_x0_is_clamped_like_the_reference_unless_asked_not_to(step_parts, monkeypatch):
    """The official step clamps the decoded x0 to [-1, 1] before ArcFace (the default here);
    --no-clamp_decoded_x0 keeps saturated pixels, and their gradient."""
    args, _, frozen = step_parts
    assert args.clamp_decoded_x0 is True
    latents = torch.randn(2, 4, 8, 8)
    monkeypatch.setattr(
        frozen.vae, "decode", lambda z: type("Out", (), {"sample": 3 * torch.tanh(z[:, :3])})()
    )
    mask = torch.tensor([True, True])
    timesteps = torch.tensor([10, 900])
    clamped = trainer.decode_x0(frozen, latents, latents, timesteps, mask, clamp=True)
    raw = trainer.decode_x0(frozen, latents, latents, timesteps, mask, clamp=False)
    assert clamped.abs().max() <= 1.0 < raw.abs().max()
    torch.testing.assert_close(clamped, raw.clamp(-1, 1))


def test_a_nan_in_a_masked_sample_reaches_neither_the_loss_nor_the_gradient(
    step_parts, monkeypatch
):
    """Instance sample 1 has no triplet term (its class image is faceless); even if its decode
    is NaN, the loss and every LoRA gradient stay finite."""
    from datasets import collate_dreambooth

    args, tools, frozen = step_parts
    unet, lora = unet_with_one_identity(args, frozen.device, "no")
    dataset = trainer.build_dataset(args, args.instance_data_dir, tools)
    batch = collate_dreambooth([dataset[0], dataset[1]], with_prior=True)
    batch["has_face"][2:] = torch.tensor([True, False])
    decode = frozen.vae.decode

    def decode_with_a_nan_row(latents):
        out = decode(latents)
        out.sample = torch.cat([out.sample[:1], out.sample[1:] * float("nan")])
        return out

    monkeypatch.setattr(frozen.vae, "decode", decode_with_a_nan_row)
    generator = torch.Generator().manual_seed(3)
    terms = compute_losses(
        (unet, lora), frozen, trainer.PromptEmbeddings.encode(frozen, args), batch, generator, args
    )
    assert torch.isfinite(terms["loss"]) and terms["identity_count"].item() == 1
    terms["loss"].backward()
    grads = [p.grad for p in unet.parameters() if p.requires_grad]
    assert all(torch.isfinite(g).all() for g in grads)


def test_non_finite_weights_or_gradients_are_never_saved(step_parts, tmp_path):
    trainer, slot = one_slot_trainer(step_parts, tmp_path)
    trainer.step()
    with torch.no_grad():
        next(p for n, p in trainer.unet.named_parameters() if "lora_B" in n)[0, 0, 0] = math.inf
    with pytest.raises(train.NonFiniteLossError, match="LoRA weights are non-finite at step 1"):
        trainer.save_checkpoint(slot)
    with pytest.raises(train.NonFiniteLossError, match="no final LoRA written"):
        trainer.finish(slot)
    assert not list(slot.identity.output_dir.glob("checkpoint-*"))
    assert not (slot.identity.output_dir / train.LORA_WEIGHTS_NAME).exists()

    # A NaN that reaches only a gradient (the losses stay finite) stops the run as well.
    trainer, slot = one_slot_trainer(step_parts, tmp_path / "again")
    factor = trainer.lora.parameters()[0]
    factor.register_hook(lambda grad: grad * math.nan)
    with pytest.raises(train.NonFiniteLossError, match=r"step 1 \(terms: grad_norm\)"):
        trainer.step()  # found at the step's log interval (--logging_steps 1)
    assert not list(slot.identity.output_dir.glob("checkpoint-*"))
    assert torch.isfinite(factor).all()  # the NaN gradient was never applied


def test_the_step_equals_the_reference_recipe_for_the_same_seed_and_crop(step_parts):
    """training_step on cached latent distributions gives today's losses: the reference step
    re-typed (encode + sample, noise, timesteps from one generator, the UNet, F.mse_loss per
    part, the triplet term on the aligned decode) on the same batch, seed and crops."""
    from datasets import collate_dreambooth

    args, tools, frozen = step_parts
    unet, lora = unet_with_one_identity(args, frozen.device, "no")
    dataset = trainer.build_dataset(args, args.instance_data_dir, tools)
    batch = collate_dreambooth([dataset[0], dataset[1]], with_prior=True)
    prompts = trainer.PromptEmbeddings.encode(frozen, args)
    ours = compute_losses(
        (unet, lora), frozen, prompts, batch, torch.Generator().manual_seed(7), args
    )

    generator = torch.Generator().manual_seed(7)
    scheduler, vae = frozen.noise_scheduler, frozen.vae
    with torch.no_grad():
        latents = vae.encode(batch["pixel_values"]).latent_dist.sample(generator)
    latents = latents * vae.config.scaling_factor
    noise = torch.randn(latents.shape, generator=generator)
    timesteps = torch.randint(0, 1000, (4,), generator=generator)
    noisy = scheduler.add_noise(latents, noise, timesteps)
    text = torch.cat([prompts.instance.expand(2, -1, -1), prompts.class_.expand(2, -1, -1)])
    lora.set_identities(torch.zeros(4, dtype=torch.long))
    pred = unet(noisy, timesteps, text).sample
    instance, prior = F.mse_loss(pred[:2], noise[:2]), F.mse_loss(pred[2:], noise[2:])
    loss = instance + prior
    x0 = losses.predict_x0(noisy[:2], pred[:2], timesteps[:2], scheduler.alphas_cumprod, "epsilon")
    decoded = vae.decode(x0 / vae.config.scaling_factor).sample.clamp(-1, 1)
    faces = trainer.align_faces_torch(decoded, batch["landmarks"][:2], fill=-1.0)
    anchor = frozen.arcface(faces)
    embeddings = batch["embeddings"]
    criterion = losses.triplet_identity_loss(anchor, embeddings[:2], embeddings[2:], 1.0)
    weight = losses.timestep_weight(timesteps[:2])
    term = (weight * criterion).mean()
    torch.testing.assert_close(ours["diffusion_loss"], instance, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(ours["prior_loss"], prior, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(ours["identity_term"], term, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(ours["loss"], loss + term, rtol=1e-5, atol=1e-6)


class NoHostSync(torch.utils._python_dispatch.TorchDispatchMode):
    """Fails on every op that reads a tensor on the host (a stream sync on a GPU)."""

    SYNCS = ("aten::_local_scalar_dense", "aten::nonzero", "aten::is_nonzero")

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        if func._schema.name in self.SYNCS:
            raise AssertionError(f"host sync in the step: {func._schema.name}")
        return func(*args, **(kwargs or {}))


def test_a_training_step_reads_nothing_on_the_host(step_parts, tmp_path):
    """The device part of a step (forward, backward, clip, AdamW, schedule, watches and means
    on cached latents) under a dispatch mode that fails on host reads."""
    trainer, slot = one_slot_trainer(step_parts, tmp_path)
    trainer.args.logging_steps = 1000  # no log interval in these steps
    trainer.step()  # the first step encodes the new crops (allowed to do anything)
    slot.order = None
    slot.global_step = 0  # the same crops again: cached, so the step itself is measured
    batch, generators = trainer.gather([slot])  # planned on the host: crops, cache rows
    with NoHostSync():
        assert trainer.train_on([slot], batch, generators)


def peft_unet_holding(args, state: dict[str, torch.Tensor]) -> torch.nn.Module:
    """The base UNet with a peft LoRA adapter made as diffusers' DreamBooth-LoRA example makes
    it (same targets, rank and alpha), holding `state` (diffusers' format)."""
    from diffusers import UNet2DConditionModel
    from diffusers.utils import convert_unet_state_dict_to_peft
    from peft import LoraConfig
    from peft.utils import set_peft_model_state_dict

    unet = UNet2DConditionModel.from_pretrained(
        args.pretrained_model_name_or_path, subfolder="unet"
    )
    unet.requires_grad_(False)
    unet.add_adapter(
        LoraConfig(
            r=args.rank,
            lora_alpha=args.lora_alpha,
            init_lora_weights="gaussian",
            target_modules=trainer.lora_target_modules(unet),
        )
    )
    result = set_peft_model_state_dict(unet, convert_unet_state_dict_to_peft(state), "default")
    assert not getattr(result, "unexpected_keys", [])
    return unet.train()


def small_arcface_stand_in():
    """A small conv net inside the real ArcFaceEncoder wrapper: CPUs without fast low-precision
    convolutions take ~10 s per step for the IResNet-18 under fp16 / bf16 autocast."""
    from arcface import ArcFaceEncoder

    torch.manual_seed(0)
    small = torch.nn.Sequential(
        torch.nn.Conv2d(3, 8, 7, stride=4), torch.nn.Flatten(), torch.nn.LazyLinear(512)
    )
    small(torch.zeros(1, 3, 112, 112))  # materialise the lazy layer
    return ArcFaceEncoder(small, "small-stand-in")


@pytest.mark.parametrize("precision, accumulation", [("no", 1), ("no", 3), ("fp16", 2)])
def test_train_alone_makes_the_updates_of_the_stock_recipe(
    step_parts, tmp_path, precision, accumulation
):
    """The loop of one identity (train_alone: batched LoRA slot, StackedAdamW, the tabulated
    schedule, our fp16 scaler handling and accumulation) against diffusers' DreamBooth-LoRA
    recipe written with stock components on the same micro-batches and step function: a peft
    LoRA holding the same init (peft's own gaussian init equals ours:
    test_multi_lora.py::test_init_identity_equals_peft_gaussian_init_bit_for_bit), the base in
    the weight dtype and the LoRA in fp32, GradScaler (fp16), loss / accumulation steps, an
    update at every accumulation's and epoch's end, torch's clip_grad_norm_ and AdamW,
    get_scheduler (cosine with warm-up) stepped after each update the scaler did not skip (as
    accelerate's scheduler). Clipping is on at every update and the rate changes at each; with
    2 photos, accumulation 3 updates at each epoch's end and 2 at each accumulation's end; the
    fp16 case starts at a loss scale that overflows, so one update is skipped. An off-by-one in
    the schedule's index, a schedule that advances on a skipped update, a dropped clip, a
    missing epoch-end update or loss / accumulation steps each move the LoRA far more than the
    tolerance. The forward itself (training_step) is compared with the reference recipe in
    test_the_step_equals_the_reference_recipe_for_the_same_seed_and_crop.
    """
    from diffusers.optimization import get_scheduler

    from lora import read_lora_file

    args, tools, frozen = step_parts
    if precision != "no":
        frozen = trainer.load_frozen_models(
            args, torch.device("cpu"), precision, small_arcface_stand_in()
        )
    changes = dict(
        lr_scheduler="cosine", lr_warmup_steps=2, max_train_steps=6, learning_rate=1e-3,
        max_grad_norm=1e-3, checkpointing_steps=100, gradient_accumulation_steps=accumulation,
    )  # fmt: skip
    packed, slot = one_slot_trainer((args, tools, frozen), tmp_path, **changes)
    args = packed.args
    reference = peft_unet_holding(args, trainer.identity_state_dict(packed.lora, 0))
    trainer.place(reference, frozen.device, frozen.weight_dtype)
    params = [p for p in reference.parameters() if p.requires_grad]
    for param in params:  # diffusers' cast_training_params: trainable LoRA in fp32
        param.data = param.data.float()
    optimizer = torch.optim.AdamW(
        params,
        lr=args.learning_rate,
        betas=(args.adam_beta1, args.adam_beta2),
        weight_decay=args.adam_weight_decay,
        eps=args.adam_epsilon,
        foreach=False,
    )
    schedule = get_scheduler(
        args.lr_scheduler, optimizer, num_warmup_steps=2, num_training_steps=slot.max_train_steps
    )
    # fp16: a loss scale the backward overflows at (GradScaler's default does not on this
    # model), so the scaler skips an update on both sides and then halves the scale.
    packed.fresh_scaler = partial(
        torch.amp.GradScaler, "cpu", init_scale=5e5, enabled=precision == "fp16"
    )
    scaler = packed.fresh_scaler()
    batches_per_epoch = math.ceil(len(slot.dataset) / args.train_batch_size)
    rates, norms, seeds, skipped = [], [], [], 0
    while slot.global_step < slot.max_train_steps:  # the stock loop, epoch by epoch
        for index in range(batches_per_epoch):
            batch, generator = slot.next_batch()
            seeds.append(generator.initial_seed())
            with frozen.autocast():
                terms = trainer.training_step(
                    reference, frozen, packed.prompts, batch, [generator], packed.objective
                )
            scaler.scale(terms["loss"].sum() / accumulation).backward()
            slot.micro_batch += 1
            if (index + 1) % accumulation and index != batches_per_epoch - 1:
                continue
            scaler.unscale_(optimizer)
            norms.append(torch.nn.utils.clip_grad_norm_(params, args.max_grad_norm, foreach=False))
            rates.append(optimizer.param_groups[0]["lr"])
            scale = scaler.get_scale()
            scaler.step(optimizer)
            scaler.update()
            if scaler.get_scale() < scale:
                skipped += 1  # the scaler's overflow: no update, the schedule stays
            else:
                schedule.step()
            optimizer.zero_grad()
            slot.global_step, slot.micro_batch = slot.global_step + 1, 0
            if slot.global_step == slot.max_train_steps:
                break
    moved = [rate for rate, norm in zip(rates, norms, strict=True) if torch.isfinite(norm)]
    assert moved[0] == 0 and all(a != b for a, b in itertools.pairwise(moved))  # warm-up, cosine
    assert all(norm > 10 * args.max_grad_norm for norm in norms)  # every update clipped
    assert len(set(seeds)) == len(seeds)  # each micro-batch its own noise and timesteps

    packed.slots[0] = None  # the slot the stock loop read from; train_alone starts afresh:
    packed.train_alone(slot.identity)  # init, a fresh scaler (fill), step 0
    saved = peft_unet_holding(args, read_lora_file(tmp_path / "hanks"))
    ours = [p for p in saved.parameters() if p.requires_grad]
    worst = max((a - b).abs().max().item() for a, b in zip(ours, params, strict=True))
    assert packed.optimizer.identity_steps().tolist() == [slot.max_train_steps - skipped]
    assert skipped == (1 if precision == "fp16" else 0)
    # fp32: 0 measured on the development CPU. fp16: the LoRA layers' products and gradients
    # round differently from peft's (2.4e-4 measured, of moves up to 3e-3). Planted one at a
    # time, a schedule index + 1, a dropped clip, a schedule advancing on a skipped update, a
    # missing epoch-end update and a loss not divided by the accumulation steps each failed
    # every case they apply to.
    tolerance = 1e-6 if precision == "no" else 6e-4
    for mine, stock in zip(ours, params, strict=True):
        torch.testing.assert_close(mine, stock, rtol=0, atol=tolerance)
    print(f"{precision}, accumulation {accumulation}: {skipped} skipped, max |diff| {worst:.3g}")


def test_the_step_weighs_the_prior_loss_by_prior_loss_weight(step_parts):
    """--prior_loss_weight reaches the step's loss: loss = diffusion + w * prior + identity."""
    from datasets import collate_dreambooth

    args, tools, frozen = step_parts
    args = copy.copy(args)
    args.prior_loss_weight = 0.25
    unet, lora = unet_with_one_identity(args, frozen.device, "no")
    dataset = trainer.build_dataset(args, args.instance_data_dir, tools)
    batch = collate_dreambooth([dataset[0], dataset[1]], with_prior=True)
    prompts = trainer.PromptEmbeddings.encode(frozen, args)
    with torch.no_grad():
        terms = compute_losses(
            (unet, lora), frozen, prompts, batch, torch.Generator().manual_seed(2), args
        )
    assert terms["prior_loss"] > 0
    expected = terms["diffusion_loss"] + 0.25 * terms["prior_loss"] + terms["identity_term"]
    torch.testing.assert_close(terms["loss"], expected)


def test_a_packed_step_gives_each_identity_its_own_steps_terms(step_parts):
    """training_step on PackedBatch.pack of two identities of unequal sizes (2 + 2 prior rows,
    1 + 1) in two LoRA slots equals the step of each identity's batch alone in its slot."""
    from datasets import collate_dreambooth

    args, tools, frozen = step_parts
    unet, lora = trainer.load_unet_with_slots(args, frozen.device, "no", 2)
    for slot, seed in enumerate((1, 2)):
        trainer.init_identity_(lora, slot, seed)
        with torch.no_grad():  # peft's init leaves B = 0: give both slots an effect
            for factor in lora.parameters():
                factor[slot].normal_(0, 0.05, generator=torch.Generator().manual_seed(seed))
    dataset = trainer.build_dataset(args, args.instance_data_dir, tools)
    prompts = trainer.PromptEmbeddings.encode(frozen, args)
    config = trainer.objective_config(args, frozen)
    singles = []
    for items in ([0, 1], [1]):
        batch = collate_dreambooth([dataset[i] for i in items], with_prior=True)
        with torch.no_grad():
            dist = frozen.vae.encode(batch["pixel_values"]).latent_dist
        n = batch["num_instance"]
        singles.append(
            trainer.PackedBatch.one_identity(
                dist.mean,
                dist.std,
                n,
                landmarks=batch["landmarks"][:n].float(),
                embeddings=batch["embeddings"].float(),
                has_face=batch["has_face"],
            )
        )
    packed = trainer.PackedBatch.pack(singles, [1, 0])
    assert packed.sizes == [4, 2] and packed.instance_sizes == [2, 1]
    assert packed.slots.tolist() == [1, 1, 1, 1, 0, 0]
    assert packed.prior_rows.tolist() == [2, 3, 5]
    with torch.no_grad():
        lora.set_identities(packed.slots)
        both = trainer.training_step(
            unet,
            frozen,
            prompts,
            packed,
            [torch.Generator().manual_seed(s) for s in (5, 6)],
            config,
        )
        for index, (single, slot, seed) in enumerate(zip(singles, [1, 0], (5, 6), strict=True)):
            lora.set_identities(single.slots + slot)
            alone = trainer.training_step(
                unet, frozen, prompts, single, [torch.Generator().manual_seed(seed)], config
            )
            for name in losses.TERM_NAMES:
                torch.testing.assert_close(both[name][index], alone[name][0], msg=name)


def test_the_resume_allow_list_is_exactly_these_flags():
    """Pinned as a literal: a flag added to RESUME_MAY_CHANGE (e.g. --seed, which changes the
    data order, noise and LoRA init) must be a deliberate change of this test too."""
    allowed = {
        "output_dir",
        "overwrite",
        "resume_from_checkpoint",
        "logging_dir",
        "report_to",
        "logging_steps",
        "checkpointing_steps",
        "checkpoints_total_limit",
        "validation_prompt",
        "validation_negative_prompt",
        "validation_steps",
        "num_validation_images",
        "validation_num_inference_steps",
        "validation_guidance_scale",
        "dataloader_num_workers",
        "gradient_checkpointing",
        "allow_tf32",
        "pack",
        "compile",
        "compile_mode",
        "num_train_epochs",
        "max_train_steps",
        "instance_data_dir",
        "identities_root",
        "class_data_dir",
        "sample_batch_size",
        "class_image_format",
        "class_num_inference_steps",
        "prior_generation_precision",
        "face_models_root",
        "arcface_weights",
    }
    assert allowed == trainer.RESUME_MAY_CHANGE
    assert trainer.RESUME_RESOLVED_KEYS == ("max_train_steps", "steps_per_epoch", "mixed_precision")


def test_the_crops_a_run_draws_are_encoded_ahead_in_batches_and_never_in_a_step(
    step_parts, tmp_path, monkeypatch
):
    """Non-square photos (a new random crop each epoch): each epoch's crops are encoded
    before its first step, in ENCODE_BATCH_SIZE batches, exactly the crops the run draws (the
    last epoch only up to --max_train_steps), and the VAE never encodes inside a step."""
    from PIL import Image

    from datasets import ENCODE_BATCH_SIZE

    wide = tmp_path / "wide"
    wide.mkdir()
    face = Image.open(step_parts[0].instance_data_dir / "h0.png")  # 128 x 128
    for index, left in enumerate((0, 48)):
        canvas = Image.new("RGB", (176, 128), (90, 90, 90))
        canvas.paste(face, (left, 0))
        canvas.save(wide / f"w{index}.png")
    packed, slot = one_slot_trainer(
        step_parts, tmp_path, instance_data_dir=wide, max_train_steps=3, logging_steps=100
    )
    calls, encoded, drawn, cached, in_step = [], [], [], [], [False]
    vae_encode, cache_encode, cache_index = (
        packed.frozen.vae.encode,
        packed.latents.encode,
        packed.latents.index,
    )
    train_on = packed.train_on

    def step_only(*args):
        in_step[0] = True
        try:
            return train_on(*args)
        finally:
            in_step[0] = False

    def record_encode(keys, pixels):
        encoded.extend(key for key in dict.fromkeys(keys) if key not in packed.latents.rows)
        cache_encode(keys, pixels)
        cached.append({key for key in packed.latents.rows if key[0] == "hanks"})

    monkeypatch.setattr(
        packed.frozen.vae, "encode", lambda x: calls.append((in_step[0], x.shape)) or vae_encode(x)
    )
    monkeypatch.setattr(packed, "train_on", step_only)
    monkeypatch.setattr(packed.latents, "encode", record_encode)
    monkeypatch.setattr(
        packed.latents, "index", lambda keys, d: drawn.extend(keys) or cache_index(keys, d)
    )
    while slot.global_step < 2:
        packed.step()
    first_epoch = set(drawn)
    packed.step()  # epoch 1, its first and (--max_train_steps 3) only micro-batch
    assert slot.global_step == 3 and len(drawn) == 6  # 3 micro-batches of 1 + 1 rows
    assert len(calls) == 2  # one batch per epoch: 2 + 2 class crops, then 1 new crop
    assert all(not inside and shape[0] == ENCODE_BATCH_SIZE for inside, shape in calls)
    assert set(encoded) == set(drawn) and len(encoded) == len(set(encoded))
    new_crops = set(drawn[4:]) - first_epoch
    assert new_crops and all(key[0] == "hanks" for key in new_crops)  # a new instance crop
    assert cached[-1] == {key for key in drawn[4:] if key[0] == "hanks"}  # epoch 0's freed


def test_compile_compiles_unet_vae_decoder_and_arcface_with_static_shapes(step_parts, monkeypatch):
    """--compile wraps every module of the step (torch.compile recorded, run eagerly here)."""
    compiled = []

    def record(module, **options):
        compiled.append((module, options))
        return module

    monkeypatch.setattr(torch, "compile", record)
    frozen = copy.copy(step_parts[2])
    decoder, arcface = frozen.vae.decoder, frozen.arcface
    args = copy.copy(step_parts[0])
    args.compile, args.compile_mode = True, "default"
    unet, _ = unet_with_one_identity(args, frozen.device, "no")
    model = trainer.compile_step_modules(frozen, unet, args)
    assert [module for module, _ in compiled] == [decoder, arcface, unet] and model is unet
    assert all(options == {"mode": "default", "dynamic": False} for _, options in compiled)


def test_channels_last_puts_every_convolution_in_nhwc(step_parts):
    unet, _ = unet_with_one_identity(step_parts[0], torch.device("cpu"), "no")
    trainer.use_channels_last(unet)
    convolutions = [m.weight for m in unet.modules() if isinstance(m, torch.nn.Conv2d)]
    assert convolutions
    assert all(w.is_contiguous(memory_format=torch.channels_last) for w in convolutions)


def test_a_log_interval_reads_the_device_once_for_all_identities(step_parts, assets, tmp_path):
    """Two identities reach a log interval (and an epoch end) after the same update: every
    logged value of both (watches, interval and epoch means, identity samples, learning rate)
    comes to the host in one read (tests/host_syncs.HostReads counts .item/.tolist/...: before
    read_logs there were 5 a slot at a log interval, more at an epoch end)."""
    from accelerate import PartialState
    from host_syncs import HostReads
    from tqdm.auto import tqdm

    args, tools, frozen = step_parts
    args = copy.copy(args)
    vars(args).update(validation_prompt="", logging_steps=1, checkpointing_steps=1000)
    vars(args).update(max_train_steps=100, report_to="none")
    packed = trainer.PackedTrainer(args, frozen, tools, PartialState(cpu=True), 2)
    slots = []
    for index, name in enumerate(("hanks", "person0")):
        slot = packed.fill(index, train.Identity(name, assets.identity(name), tmp_path / name))
        slot.progress.close()
        slot.progress = tqdm(disable=True)
        slots.append(slot)
    epoch_end = max(slot.updates_per_epoch for slot in slots)
    assert epoch_end <= 4  # a few steps reach an epoch end of each slot
    counter, train_on = HostReads(), packed.train_on

    def then_count(*arguments):
        updated = train_on(*arguments)
        counter.__enter__()  # from the end of the device step to the end of step()
        return updated

    packed.train_on = then_count
    for step in range(1, epoch_end + 1):
        counter.reads.clear()
        try:
            packed.step()
        finally:
            counter.__exit__(None, None, None)
        assert counter.reads == ["tolist"], step  # both slots log every step (--logging_steps 1)
        assert all(slot.global_step == step for slot in slots)
        assert all(slot.identity_samples == step for slot in slots)  # read at the interval
        for slot in slots:  # the interval means started again
            assert packed.interval_means.steps[slot.index] == 0
    assert all(packed.epoch_means.steps[slot.index] < slot.updates_per_epoch for slot in slots)
