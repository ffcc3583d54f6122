"""train_ID-Booth.py on a tiny random SD-2.1-shaped pipeline, a random IResNet-18 and real faces.

Identity photos are real people (insightface's shipped Tom Hanks crop and faces cut from its
t1.jpg group photo) so dlib's real detector finds their landmarks. Class images are real faces
too, plus ones the script samples with the tiny pipeline (faceless: they stay prior samples, and
the triplet term of the instance sample paired with one is masked out and counted). Two runs go
through the real command line (one plain, one with torchrun and two processes); the rest call
the script's functions in this process to save start-up time.
"""

from __future__ import annotations

import copy
import json
import logging
import math
import os
import shutil
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image
from safetensors.torch import load_file

import fileio
import losses
import runs
import sampling
import trainer

REPO_ROOT = Path(__file__).resolve().parents[1]
SCRIPT = REPO_ROOT / "train_ID-Booth.py"
RESOLUTION = 64


train = runs.load_script(SCRIPT)


pytestmark = pytest.mark.usefixtures("one_torch_thread")


@dataclass
class Assets:
    sd: Path
    arcface: Path
    identities: Path
    class_dir: Path
    root: Path

    def identity(self, name: str) -> Path:
        return self.identities / name


def _face_crop(image: Image.Image, box, scale: float, shift: float) -> Image.Image:
    """96x96 square crop around a dlib face box, `scale` times its width, shifted right."""
    left, top, right, bottom = box
    half = (right - left) * scale / 2
    cx, cy = (left + right) / 2 + shift * (right - left), (top + bottom) / 2
    square = (int(cx - half), int(cy - half), int(cx + half), int(cy + half))
    return image.crop(square).resize((96, 96), Image.Resampling.BICUBIC)


@pytest.fixture(scope="module")
def assets(tmp_path_factory) -> Assets:
    """Tiny SD, random IResNet-18 checkpoint, two identities and a class folder of real faces."""
    import dlib
    import insightface
    from tiny_sd import build_tiny_sd

    from arcface import build_iresnet

    root = tmp_path_factory.mktemp("train_assets")
    sd = build_tiny_sd(root / "tiny-sd")
    torch.manual_seed(0)
    arcface_path = root / "arcface_r18.pth"
    torch.save(build_iresnet("r18").state_dict(), arcface_path)

    photos = Path(insightface.__file__).parent / "data" / "images"
    group = Image.open(photos / "t1.jpg").convert("RGB")
    group = group.resize((group.width * 2, group.height * 2), Image.Resampling.BICUBIC)
    rects = dlib.get_frontal_face_detector()(np.asarray(group), 0)
    boxes = sorted((r.left(), r.top(), r.right(), r.bottom()) for r in rects)
    assert len(boxes) == 6, "t1.jpg shows six people"

    hanks_dir = root / "identities" / "hanks"
    hanks_dir.mkdir(parents=True)
    hanks = Image.open(photos / "Tom_Hanks_54745.png").convert("RGB")
    hanks.resize((128, 128), Image.Resampling.BICUBIC).save(hanks_dir / "h0.png")
    hanks.crop((8, 8, 104, 104)).resize((96, 96), Image.Resampling.BICUBIC).save(
        hanks_dir / "h1.png"
    )
    person_dir = root / "identities" / "person0"
    person_dir.mkdir()
    _face_crop(group, boxes[0], 1.8, 0.0).save(person_dir / "p0.png")
    _face_crop(group, boxes[0], 2.0, 0.05).save(person_dir / "p1.png")
    class_dir = root / "class"
    class_dir.mkdir()
    for index in (3, 4):
        _face_crop(group, boxes[index], 1.8, 0.0).save(class_dir / f"person{index}.png")
    return Assets(sd, arcface_path, root / "identities", class_dir, root)


def cli(assets: Assets, output_dir: Path, *extra: str, class_dir: Path | None = None) -> list[str]:
    """Flags of a few-step CPU run on the tiny models (extra flags win)."""
    return [
        f"--pretrained_model_name_or_path={assets.sd}",
        f"--class_data_dir={class_dir or assets.class_dir}",
        f"--arcface_weights={assets.arcface}",
        "--face_detector=dlib",
        f"--resolution={RESOLUTION}",
        "--mixed_precision=no",
        "--num_class_images=2",
        "--class_num_inference_steps=2",
        "--validation_num_inference_steps=2",
        "--num_validation_images=1",
        "--logging_steps=1",
        "--learning_rate=1e-2",
        f"--output_dir={output_dir}",
        *extra,
    ]


def run_cli(command: list[str], timeout: int = 300) -> subprocess.CompletedProcess:
    env = dict(os.environ, OMP_NUM_THREADS="1", MKL_NUM_THREADS="1", HF_HUB_OFFLINE="1")
    result = subprocess.run(
        command, cwd=REPO_ROOT, env=env, capture_output=True, text=True, timeout=timeout
    )
    assert result.returncode == 0, f"exit {result.returncode}\n{result.stdout}\n{result.stderr}"
    return result


def lora_weights(folder: Path) -> dict[str, torch.Tensor]:
    return load_file(str(folder / train.LORA_WEIGHTS_NAME))


def assert_same_lora(a: Path, b: Path, atol: float = 1e-6) -> None:
    first, second = lora_weights(a), lora_weights(b)
    assert first.keys() == second.keys()
    for key in first:
        torch.testing.assert_close(first[key], second[key], rtol=1e-5, atol=atol, msg=key)


# ============================================================================ arguments


def test_every_flag_has_help_and_defaults_are_the_reference_setup(assets, monkeypatch):
    monkeypatch.setattr(runs, "check_base_model", lambda name: None)  # the hub id, not cached
    parser = train.build_parser()
    for action in parser._actions:
        if action.dest != "help":
            assert action.help, f"{action.option_strings} has no help text"
    args = train.parse_args(
        [f"--instance_data_dir={assets.identity('hanks')}", f"--arcface_weights={assets.arcface}"]
        + [f"--class_data_dir={assets.class_dir}"]
    )
    reference = {
        "pretrained_model_name_or_path": "stabilityai/stable-diffusion-2-1-base",
        "loss": "triplet",
        "triplet_margin": 1.0,
        "identity_loss_weighting": "timestep",
        "rank": 4,
        "lora_alpha": 4,
        "instance_prompt": "photo of sks person",
        "class_prompt": "photo of a person",
        "with_prior_preservation": True,
        "prior_loss_weight": 1.0,
        "num_class_images": 200,
        "resolution": 512,
        "center_crop": False,
        "train_batch_size": 1,
        "num_train_epochs": 32,
        "max_train_steps": None,
        "learning_rate": 1e-4,
        "lr_scheduler": "cosine",
        "lr_warmup_steps": 0,
        "adam_beta1": 0.9,
        "adam_beta2": 0.999,
        "adam_weight_decay": 1e-2,
        "adam_epsilon": 1e-8,
        "max_grad_norm": 1.0,
        "mixed_precision": "fp16",
        "allow_tf32": True,
        "seed": 0,
        "report_to": "tensorboard",
    }
    assert {key: getattr(args, key) for key in reference} == reference


def _bad_cases(assets: Assets, tmp: Path) -> dict[str, tuple[list[str], type, str]]:
    """name -> (flags replacing the good ones, exception, words of the message)."""
    hanks = f"--instance_data_dir={assets.identity('hanks')}"
    (tmp / "a_file").write_text("not a folder")
    incomplete = tmp / "sd-without-vae"
    if not incomplete.exists():
        shutil.copytree(assets.sd, incomplete, ignore=shutil.ignore_patterns("vae"))
    return {
        "rank 0": ([hanks, "--rank=0"], ValueError, "--rank must be >= 1"),
        "output dir is a file": (
            [hanks, f"--output_dir={tmp / 'a_file'}"],
            ValueError,
            "is a file",
        ),
        "base model lacks the vae": (
            [hanks, f"--pretrained_model_name_or_path={incomplete}"],
            FileNotFoundError,
            "missing vae/config.json",
        ),
        "base model folder missing": (
            [hanks, f"--pretrained_model_name_or_path={tmp / 'nowhere'}"],
            FileNotFoundError,
            "does not exist",
        ),
        "resume checkpoint missing": (
            [hanks, "--resume_from_checkpoint=checkpoint-7"],
            FileNotFoundError,
            "checkpoint checkpoint-7 not found",
        ),
        "identity loss without ArcFace": (
            [hanks, "--loss=identity", "--arcface_weights="],
            ValueError,
            "needs --arcface_weights",
        ),
        "both identity sources": (
            [hanks, f"--identities_root={assets.identities}"],
            ValueError,
            "exactly one of --instance_data_dir",
        ),
        "no identity source": ([], ValueError, "exactly one of --instance_data_dir"),
        "triplet without class images": (
            [hanks, "--no-with_prior_preservation"],
            ValueError,
            "negatives from the class images",
        ),
        "overwrite and resume": (
            [hanks, "--overwrite", "--resume_from_checkpoint=latest"],
            ValueError,
            "cannot be combined",
        ),
        "resolution not a multiple of 8": (
            [hanks, "--resolution=60"],
            ValueError,
            "multiple of 8",
        ),
        "identity folder missing": (
            [f"--instance_data_dir={tmp / 'nobody'}"],
            FileNotFoundError,
            "does not exist",
        ),
        "a root of identities as one identity": (
            [f"--instance_data_dir={assets.identities}"],
            ValueError,
            "holds identity folders, not photos: pass --identities_root",
        ),
    }


@pytest.mark.parametrize(
    "case",
    [
        "rank 0",
        "output dir is a file",
        "base model lacks the vae",
        "base model folder missing",
        "resume checkpoint missing",
        "identity loss without ArcFace",
        "both identity sources",
        "no identity source",
        "triplet without class images",
        "overwrite and resume",
        "resolution not a multiple of 8",
        "identity folder missing",
        "a root of identities as one identity",
    ],
)
def test_bad_flags_fail_right_after_parsing(assets, tmp_path, case):
    flags, error, words = _bad_cases(assets, tmp_path)[case]
    argv = cli(assets, tmp_path / "out") + flags
    if "--arcface_weights=" in flags:  # drop the weights entirely
        argv = [flag for flag in argv if not flag.startswith("--arcface_weights")]
    with pytest.raises(error, match=words):
        train.parse_args(argv)


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
    """The trainer's step maths (packed_losses) on a collated [instance..., prior...] batch of
    one identity: its terms as scalars."""
    unet, lora = unet_and_lora
    pixels = batch["pixel_values"].to(frozen.device, frozen.weight_dtype)
    with torch.no_grad():
        dist = frozen.vae.encode(pixels).latent_dist
    n, size = batch["num_instance"], pixels.shape[0]
    rows = torch.arange(size)
    packed = trainer.PackedBatch(
        mean=dist.mean,
        std=dist.std,
        slots=torch.zeros(size, dtype=torch.long),
        is_prior=rows >= n,
        members=torch.ones(1, size, dtype=torch.bool),
        instance_rows=rows[:n],
        prior_rows=rows[n : 2 * n] if size >= 2 * n else torch.full((n,), -1),
        sizes=[size],
        landmarks=batch["landmarks"][:n].float(),
        embeddings=batch["embeddings"].float(),
        has_face=batch["has_face"],
    )
    terms = trainer.packed_losses(unet, lora, frozen, prompts, packed, [generator], args)
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
        (unet, lora), frozen, trainer.encode_prompts(frozen, args), batch, generator, args
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
    gradients = []
    for checkpointing in (False, True):
        run_args = copy.copy(args)
        run_args.gradient_checkpointing = checkpointing
        run_frozen = trainer.load_frozen_models(run_args, frozen.device, "no", frozen.arcface)
        unet, lora = unet_with_one_identity(run_args, frozen.device, "no")
        prompts = trainer.encode_prompts(run_frozen, run_args)
        generator = torch.Generator().manual_seed(5)
        terms = compute_losses((unet, lora), run_frozen, prompts, batch, generator, run_args)
        terms["loss"].backward()
        gradients.append({n: p.grad for n, p in unet.named_parameters() if p.requires_grad})
    assert run_frozen.vae.is_gradient_checkpointing and unet.is_gradient_checkpointing
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
            trainer.encode_prompts(frozen, args),
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
            trainer.encode_prompts(frozen, args),
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
        trainer.encode_prompts(frozen, args),
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
        (unet, lora), frozen, trainer.encode_prompts(frozen, args), batch, generator, args
    )
    assert terms["identity_term"].item() == 0 and terms["identity_criterion"].item() == 0
    torch.testing.assert_close(terms["loss"], terms["diffusion_loss"] + terms["prior_loss"])


def one_slot_trainer(step_parts, tmp_path):
    """A PackedTrainer of one slot holding identity 'hanks' (nothing trained yet)."""
    from accelerate import PartialState

    args, tools, frozen = step_parts
    args = copy.copy(args)
    args.validation_prompt = ""
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


# ============================================================================ full runs


def expected_identity_samples(steps: int, num_items: int, faceless_class_rows: set) -> list:
    """Cumulative count of instance samples with the triplet term after each step (batch 1):
    item i pairs with class row i % num_items; the trainer's epoch order is randperm seeded by
    stable_seed(0, "order", epoch)."""
    counts, total, epoch = [], 0, 0
    while len(counts) < steps:
        generator = torch.Generator().manual_seed(fileio.stable_seed(0, "order", epoch))
        for item in torch.randperm(num_items, generator=generator).tolist()[: steps - len(counts)]:
            total += item % num_items not in faceless_class_rows
            counts.append(total)
        epoch += 1
    return counts


@pytest.fixture(scope="module")
def triplet_run(assets):
    """The real command line: 4 triplet steps; 1 of 3 class images is sampled (faceless)."""
    output = assets.root / "triplet-run"
    class_dir = assets.root / "class-triplet"
    shutil.copytree(assets.class_dir, class_dir)
    flags = cli(
        assets,
        output,
        f"--instance_data_dir={assets.identity('hanks')}",
        "--num_class_images=3",
        "--max_train_steps=4",
        "--checkpointing_steps=2",
        "--validation_steps=2",
        class_dir=class_dir,
    )
    result = run_cli([sys.executable, str(SCRIPT), *flags])
    return output, class_dir, flags, result


def _scalars(log_dir: Path) -> dict[str, list[tuple[int, float]]]:
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    events = EventAccumulator(str(log_dir))
    events.Reload()
    return {
        tag: [(e.step, e.value) for e in events.Scalars(tag)] for tag in events.Tags()["scalars"]
    }


def test_triplet_run_writes_every_output(triplet_run):
    output, class_dir, flags, result = triplet_run
    keys = lora_weights(output).keys()
    assert keys and all(k.startswith("unet.") and ".lora" in k for k in keys)
    for step in (2, 4):
        checkpoint = output / f"checkpoint-{step}"
        assert (checkpoint / train.LORA_WEIGHTS_NAME).is_file()
        assert (checkpoint / trainer.TRAINING_STATE_NAME).is_file()
        for index in (0,):
            image = Image.open(output / "validation" / f"step_{step}_{index}.png")
            assert image.size == (RESOLUTION, RESOLUTION)

    config = json.loads((output / trainer.CONFIG_NAME).read_text())
    assert config["status"] == "finished" and config["global_step"] == 4
    assert config["args"]["loss"] == "triplet" and config["args"]["num_class_images"] == 3
    assert {"torch", "diffusers", "transformers", "peft", "accelerate"} <= set(config["versions"])
    # The sampled class image has no face: it stays a prior sample (3 steps per epoch, as the
    # reference's max(#instance, #class)) and is reported, not skipped.
    assert config["data"]["class_images"] == 3
    assert config["data"]["class_images_with_face"] == 2
    assert config["data"]["class_images_without_face"] == 1
    assert config["data"]["classes_skipped"] == {}
    assert config["resolved"]["steps_per_epoch"] == 3
    # Only instance samples paired with a class image that has a face get the triplet term.
    with_term = expected_identity_samples(steps=4, num_items=3, faceless_class_rows={0})
    assert config["identity_samples"] == with_term[-1] < 4
    card = (output / "README.md").read_text()
    assert "load_lora_weights" in card and str(flags[0].split("=", 1)[1]) in card

    generated = class_dir / "class_00000.png"
    assert Image.open(generated).size == (RESOLUTION, RESOLUTION)
    assert generated.stat().st_mode & 0o044, "outputs must not be private temp-file modes"

    scalars = _scalars(output / "logs")
    for tag in ("diffusion_loss", "prior_loss", "triplet_loss", "identity_weight", "lr"):
        assert [step for step, _ in scalars[f"train/{tag}"]] == [1, 2, 3, 4], tag
    assert [value for _, value in scalars["train/identity_samples"]] == with_term
    per_step = np.diff([0, *with_term]).tolist()
    assert [value for _, value in scalars["train/identity_samples_per_batch"]] == per_step
    # A step without the term logs 0 for it; steps with it a positive triplet loss.
    triplet = [value for _, value in scalars["train/triplet_loss"]]
    assert all((value > 0) == bool(count) for value, count in zip(triplet, per_step, strict=True))
    assert len(scalars["epoch/triplet_loss"]) == 2  # 3 steps per epoch (max(2 inst, 3 class))
    assert "triplet_loss=" in result.stderr  # tqdm postfix


def test_saved_lora_changes_a_fresh_stock_pipeline(assets, triplet_run):
    from diffusers import StableDiffusionPipeline

    output = triplet_run[0]

    def generate(pipeline) -> np.ndarray:
        generator = torch.Generator().manual_seed(0)
        result = pipeline(
            "photo of sks person",
            num_inference_steps=2,
            generator=generator,
            output_type="np",
            height=RESOLUTION,
            width=RESOLUTION,
        )
        return result.images[0]

    pipeline = StableDiffusionPipeline.from_pretrained(str(assets.sd))
    pipeline.set_progress_bar_config(disable=True)
    base = generate(pipeline)
    pipeline.load_lora_weights(str(output))
    assert np.abs(generate(pipeline) - base).max() > 1e-3


def test_killed_run_resumes_to_the_same_weights(triplet_run, tmp_path):
    output, _, flags, _ = triplet_run
    resumed = tmp_path / "resumed"
    resumed.mkdir()
    # What a run killed after step 2 leaves behind: its checkpoint-2 (and a half-written temp).
    shutil.copytree(output / "checkpoint-2", resumed / "checkpoint-2")
    (resumed / ".checkpoint-3-abandoned").mkdir()
    argv = [f for f in flags if not f.startswith("--output_dir")] + [f"--output_dir={resumed}"]

    with pytest.raises(ValueError, match="resume_from_checkpoint latest"):
        train.main(train.parse_args(argv))  # would silently redo the killed run's steps

    summary = train.main(train.parse_args([*argv, "--resume_from_checkpoint=latest"]))
    assert [run["steps"] for run in summary["trained"]] == [4]
    assert not (resumed / ".checkpoint-3-abandoned").exists()
    assert_same_lora(output, resumed)
    assert_same_lora(output / "checkpoint-4", resumed / "checkpoint-4")
    state = torch.load(resumed / "checkpoint-4" / trainer.TRAINING_STATE_NAME, weights_only=True)
    uninterrupted = json.loads((output / trainer.CONFIG_NAME).read_text())["identity_samples"]
    assert state["global_step"] == 4 and state["identity_samples"] == uninterrupted

    (resumed / train.LORA_WEIGHTS_NAME).unlink()
    changed = [*argv, "--resume_from_checkpoint=checkpoint-2", "--rank=8"]
    with pytest.raises(ValueError, match="trained with other settings"):
        train.main(train.parse_args(changed))
    changed = [*argv, "--resume_from_checkpoint=checkpoint-2", "--triplet_margin=0.5"]
    with pytest.raises(ValueError, match=r"triplet_margin: 1\.0 -> 0\.5.*--overwrite"):
        train.main(train.parse_args(changed))


def test_resume_refuses_a_setting_nobody_listed(triplet_run, tmp_path, monkeypatch):
    """Resume checks fail safe: a flag the checkpoint does not know (here one added to the
    parser after it was written) must match like any flag outside RESUME_MAY_CHANGE."""
    output, _, flags, _ = triplet_run
    resumed = tmp_path / "resumed"
    resumed.mkdir()
    shutil.copytree(output / "checkpoint-2", resumed / "checkpoint-2")
    argv = [f for f in flags if not f.startswith("--output_dir")] + [f"--output_dir={resumed}"]
    build_parser = train.build_parser

    def parser_with_a_new_flag():
        parser = build_parser()
        parser.add_argument("--new_knob", type=float, default=0.5, help="Added later.")
        return parser

    monkeypatch.setattr(train, "build_parser", parser_with_a_new_flag)
    with pytest.raises(ValueError, match=r"new_knob: '<not set>' -> 0\.5"):
        train.main(train.parse_args([*argv, "--resume_from_checkpoint=latest"]))
    # Paths, intervals and logging may change: the same run resumes with new ones.
    assert (
        "logging_steps" in trainer.RESUME_MAY_CHANGE
        and "learning_rate" not in trainer.RESUME_MAY_CHANGE
    )


@pytest.mark.slow
def test_sigkilled_process_resumes_to_the_same_weights(triplet_run, tmp_path):
    """A real kill: the CLI is SIGKILLed after checkpoint-2, then resumed with `latest`."""
    import signal
    import time

    output, _, flags, _ = triplet_run
    killed = tmp_path / "killed"
    argv = [f for f in flags if not f.startswith("--output_dir")] + [f"--output_dir={killed}"]
    env = dict(os.environ, OMP_NUM_THREADS="1", MKL_NUM_THREADS="1", HF_HUB_OFFLINE="1")
    process = subprocess.Popen(
        [sys.executable, str(SCRIPT), *argv],
        cwd=REPO_ROOT,
        env=env,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    deadline = time.monotonic() + 240
    while not (killed / "checkpoint-2").is_dir() and time.monotonic() < deadline:
        assert process.poll() is None, "the run ended before it could be killed"
        time.sleep(0.05)
    assert process.poll() is None, "the run finished before it could be killed"
    process.send_signal(signal.SIGKILL)
    process.wait()
    assert not (killed / train.LORA_WEIGHTS_NAME).exists()

    run_cli([sys.executable, str(SCRIPT), *argv, "--resume_from_checkpoint=latest"])
    assert_same_lora(output, killed)
    assert_same_lora(output / "checkpoint-4", killed / "checkpoint-4")


@pytest.mark.parametrize(
    "change, words",
    [
        ({"args": {"prior_loss_weight": 0.5}}, "prior_loss_weight: 1.0 -> 0.5"),
        ({"args": {"learning_rate": 1e-3}}, "learning_rate: 0.01 -> 0.001"),
        ({"args": {"lr_scheduler": "constant"}}, "lr_scheduler: 'cosine' -> 'constant'"),
        ({"args": {"lr_warmup_steps": 5}}, "lr_warmup_steps: 0 -> 5"),
        ({"args": {"identity_loss_weighting": "none"}}, "identity_loss_weighting"),
        ({"args": {"instance_prompt": "photo of zwx person"}}, "instance_prompt"),
        ({"args": {"class_prompt": "photo of a face"}}, "class_prompt"),
        ({"args": {"center_crop": True}}, "center_crop: False -> True"),
        ({"args": {"train_batch_size": 2}}, "train_batch_size: 1 -> 2"),
        ({"args": {"gradient_accumulation_steps": 2}}, "gradient_accumulation_steps"),
        ({"args": {"resolution": 128}}, "resolution: 64 -> 128"),
        ({"resolved": {"max_train_steps": 8}}, "max_train_steps: 4 -> 8"),
        ({"resolved": {"mixed_precision": "bf16"}}, "mixed_precision: 'no' -> 'bf16'"),
        ({"arcface": "other_weights-0123456789ab"}, "arcface"),
        ({"data": {"class_images": 5}}, "class_images: 3 -> 5"),
    ],
)
def test_resume_refuses_each_changed_setting(triplet_run, change, words):
    """resume_mismatches compares the checkpoint's config with the resuming run's config."""
    saved = json.loads((triplet_run[0] / "checkpoint-2" / trainer.CONFIG_NAME).read_text())
    assert trainer.resume_mismatches(saved, copy.deepcopy(saved)) == []
    current = copy.deepcopy(saved)
    for section, values in change.items():
        if isinstance(values, dict):
            current[section].update(values)
        else:
            current[section] = values
    assert any(words in line for line in trainer.resume_mismatches(saved, current)), words


def test_resume_compares_arcface_by_content_not_path(triplet_run):
    """The weights' name carries a sha256 prefix: a moved copy resumes, new content does not."""
    saved = json.loads((triplet_run[0] / "checkpoint-2" / trainer.CONFIG_NAME).read_text())
    moved = copy.deepcopy(saved)
    moved["args"]["arcface_weights"] = "/elsewhere/arcface_r18.pth"
    assert trainer.resume_mismatches(saved, moved) == []
    retrained = copy.deepcopy(saved)
    retrained["arcface"] = saved["arcface"][:-12] + "0" * 12
    assert trainer.resume_mismatches(saved, retrained)


def test_finished_identity_is_skipped_unless_overwrite(triplet_run, tmp_path):
    output, _, flags, _ = triplet_run
    copied = tmp_path / "copy"
    shutil.copytree(output, copied)
    argv = [f for f in flags if not f.startswith("--output_dir")] + [f"--output_dir={copied}"]
    before = (copied / train.LORA_WEIGHTS_NAME).read_bytes()

    summary = train.main(train.parse_args(argv))
    assert summary == {"trained": [], "skipped": ["hanks"], "failed": []}
    assert (copied / train.LORA_WEIGHTS_NAME).read_bytes() == before

    overwrite = [*argv, "--overwrite", "--max_train_steps=2", "--validation_prompt="]
    overwrite += ["--checkpointing_steps=1", "--checkpoints_total_limit=1"]
    summary = train.main(train.parse_args(overwrite))
    assert [run["steps"] for run in summary["trained"]] == [2]
    # The old run's checkpoint-4 and validation images are gone; the limit kept one checkpoint.
    assert [step for step, _ in trainer.list_checkpoints(copied)] == [2]
    assert not (copied / "validation").exists()
    assert json.loads((copied / trainer.CONFIG_NAME).read_text())["global_step"] == 2


@pytest.mark.parametrize("loss", ["dreambooth", "identity"])
def test_other_losses_run(assets, tmp_path, loss):
    from arcface import weights_name

    flags = cli(
        assets,
        tmp_path / loss,
        f"--instance_data_dir={assets.identity('person0')}",
        f"--loss={loss}",
        "--max_train_steps=2",
        "--validation_prompt=",
    )
    if loss == "dreambooth":  # the baseline needs no ArcFace: every readable photo is used
        flags = [f for f in flags if not f.startswith("--arcface_weights")]
    summary = train.main(train.parse_args(flags))
    assert [run["steps"] for run in summary["trained"]] == [2]
    config = json.loads((tmp_path / loss / trainer.CONFIG_NAME).read_text())
    # `identity` (1 - cos, no negative) does not depend on the class images' faces.
    assert config["identity_samples"] == (0 if loss == "dreambooth" else 2)
    assert config["arcface"] == (None if loss == "dreambooth" else weights_name(assets.arcface))
    tags = set(_scalars(tmp_path / loss / "logs"))
    assert ("train/identity_loss" in tags) == (loss == "identity")
    assert lora_weights(tmp_path / loss)


def test_non_finite_loss_stops_with_step_and_term_keeping_the_checkpoint(assets, tmp_path):
    flags = cli(
        assets,
        tmp_path / "nan",
        f"--instance_data_dir={assets.identity('person0')}",
        "--loss=dreambooth",
        "--learning_rate=1e30",  # step 1 is finite (LoRA B = 0), then the weights explode
        "--lr_scheduler=constant",
        "--max_train_steps=4",
        "--checkpointing_steps=1",
        "--validation_prompt=",
    )
    with pytest.raises(train.NonFiniteLossError, match=r"at step 2 \(terms: loss, diffusion_loss"):
        train.main(train.parse_args(flags))
    assert [step for step, _ in trainer.list_checkpoints(tmp_path / "nan")] == [1]
    assert not (tmp_path / "nan" / train.LORA_WEIGHTS_NAME).exists()


def test_identity_without_a_detectable_face_is_a_clear_error(assets, tmp_path):
    faceless = tmp_path / "faceless"
    faceless.mkdir()
    noise = np.random.default_rng(0).integers(0, 255, (96, 96, 3), dtype=np.uint8)
    Image.fromarray(noise).save(faceless / "noise.png")
    flags = cli(assets, tmp_path / "out", f"--instance_data_dir={faceless}", "--max_train_steps=1")
    with pytest.raises(ValueError, match="no usable face photo in"):
        train.main(train.parse_args(flags))


@pytest.mark.slow
def test_identities_root_trains_each_identity_once_across_two_processes(assets, tmp_path):
    class_dir = tmp_path / "class"
    shutil.copytree(assets.class_dir, class_dir)
    output = tmp_path / "loras"
    flags = cli(
        assets,
        output,
        f"--identities_root={assets.identities}",
        "--num_class_images=4",  # 2 missing: one sampled by each process
        "--max_train_steps=2",
        "--validation_prompt=",
        "--report_to=none",
        class_dir=class_dir,
    )
    command = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2"]
    result = run_cli([*command, str(SCRIPT), *flags])
    log = result.stdout + result.stderr

    for rank, name in enumerate(["hanks", "person0"]):
        assert log.count(f"training identity {name} ") == 1, log
        config = json.loads((output / name / trainer.CONFIG_NAME).read_text())
        assert config["resolved"]["process_index"] == rank
        assert config["resolved"]["num_processes"] == 2
        assert config["global_step"] == 2
    assert sorted(p.name for p in class_dir.glob("class_*.png")) == [
        "class_00000.png",
        "class_00001.png",
    ]

    # No gradient sync between processes: person0 trained alone gives the same LoRA.
    alone = tmp_path / "alone"
    single = [f for f in flags if not f.startswith(("--identities_root", "--output_dir"))]
    single += [f"--instance_data_dir={assets.identity('person0')}", f"--output_dir={alone}"]
    train.main(train.parse_args(single))
    assert_same_lora(output / "person0", alone, atol=1e-5)


@pytest.mark.slow
@pytest.mark.parametrize("precision", ["fp16", "no"])
def test_an_identity_trained_after_another_equals_it_trained_alone(assets, tmp_path, precision):
    """Nothing carries over from the identities a process trained before: each crop's latents
    are encoded alone (not batched with another identity's new crops) and the fp16 scaler
    starts fresh, so the LoRA bytes equal a run of that identity alone."""
    common = ["--max_train_steps=3", "--validation_prompt=", "--report_to=none"]
    common.append(f"--mixed_precision={precision}")
    both, alone = tmp_path / "both", tmp_path / "alone"
    train.main(
        train.parse_args(cli(assets, both, f"--identities_root={assets.identities}", *common))
    )
    single = f"--instance_data_dir={assets.identity('person0')}"
    train.main(train.parse_args(cli(assets, alone, single, *common)))
    assert sorted(p.name for p in both.iterdir()) == ["hanks", "person0"]  # in this order
    lora = trainer.LORA_WEIGHTS_NAME
    assert (both / "person0" / lora).read_bytes() == (alone / lora).read_bytes()


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


def test_class_image_plan_replaces_unusable_files(tmp_path):
    for index in (0, 2):
        Image.new("RGB", (96, 96), (index * 40, 90, 120)).save(tmp_path / f"class_{index:05d}.png")
    (tmp_path / "class_00001.png").write_bytes(b"truncated")  # corrupt: regenerated in place
    Image.new("RGB", (16, 16)).save(tmp_path / "tiny.png")  # too small: does not count
    assert sampling.class_image_plan(tmp_path, 3) == [1]
    assert sampling.class_image_plan(tmp_path, 5) == [1, 3, 4]
    assert sampling.class_image_plan(tmp_path / "missing", 2) == [0, 1]


# ======================================================================== fidelity and robustness


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
        (unet, lora), frozen, trainer.encode_prompts(frozen, args), batch, generator, args
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


def test_num_class_images_uses_exactly_the_first_n_class_images(assets, tmp_path):
    class_dir = tmp_path / "class"
    shutil.copytree(assets.class_dir, class_dir)
    for index in range(3):  # 2 real faces + 3 more: 5 files, 3 wanted
        shutil.copy(next(assets.class_dir.iterdir()), class_dir / f"zz_{index}.png")
    args = train.parse_args(
        cli(assets, tmp_path / "out", f"--instance_data_dir={assets.identity('hanks')}")
        + [f"--class_data_dir={class_dir}", "--num_class_images=3"]
    )
    tools = trainer.load_face_tools(args, torch.device("cpu"))
    dataset = trainer.build_dataset(args, args.instance_data_dir, tools)
    names = sorted(path.name for path in class_dir.iterdir() if path.is_file())
    assert [path.name for path in dataset.classes.paths] == names[:3]
    assert len(dataset) == 3 and dataset.summary()["class_images"] == 3


def test_resume_with_another_persons_photos_is_refused(triplet_run, assets, tmp_path):
    """Same number of photos, other content: the data fingerprint differs."""
    output, class_dir, flags, _ = triplet_run
    resumed = tmp_path / "resumed"
    shutil.copytree(output / "checkpoint-2", resumed / "checkpoint-2")
    other = tmp_path / "someone_else"
    shutil.copytree(assets.identity("person0"), other)  # 2 photos, as hanks has
    argv = [
        f
        for f in flags
        if not f.startswith(("--output_dir", "--instance_data_dir", "--class_data_dir"))
    ]
    argv += [f"--output_dir={resumed}", f"--instance_data_dir={other}"]
    argv += [f"--class_data_dir={class_dir}", "--resume_from_checkpoint=latest"]
    with pytest.raises(ValueError, match="instance_sha256"):
        train.main(train.parse_args(argv))


def test_one_failing_identity_does_not_stop_the_others(assets, tmp_path, monkeypatch, caplog):
    caplog.set_level(logging.INFO)
    root = tmp_path / "identities"
    shutil.copytree(assets.identity("person0"), root / "person0")
    faceless = root / "a_faceless"
    faceless.mkdir()
    noise = np.random.default_rng(0).integers(0, 255, (96, 96, 3), dtype=np.uint8)
    Image.fromarray(noise).save(faceless / "noise.png")
    unreadable = root / "person0" / "p1.png"
    read_bytes = Path.read_bytes

    def no_permission(path):
        if path == unreadable:
            raise PermissionError(13, "Permission denied", str(path))
        return read_bytes(path)

    monkeypatch.setattr(Path, "read_bytes", no_permission)
    flags = cli(assets, tmp_path / "loras", f"--identities_root={root}", "--max_train_steps=1")
    summary = train.main(train.parse_args([*flags, "--validation_prompt=", "--report_to=none"]))
    assert [run["identity"] for run in summary["trained"]] == ["person0"]
    assert [run["identity"] for run in summary["failed"]] == ["a_faceless"]
    assert "no usable face photo" in summary["failed"][0]["error"]
    config = json.loads((tmp_path / "loras" / "person0" / trainer.CONFIG_NAME).read_text())
    assert config["data"]["instance_images"] == 1
    assert config["data"]["instance_skipped"] == {"unreadable image": 1}
    # An overall counter with an ETA, and one end-of-run summary line.
    messages = [record.getMessage() for record in caplog.records]
    assert "identity 1 of 2: a_faceless" in messages
    assert "identity 2 of 2 done (person0): 1 finished, 1 failed, done" in messages
    assert any(m.startswith("identity 1 of 2 done (a_faceless, failed)") for m in messages)
    assert (
        f"summary: 1 trained into {tmp_path / 'loras'}/<identity>/ (person0); 0 skipped as "
        "finished; 1 failed (a_faceless)"
    ) in messages


@pytest.mark.parametrize(
    "flag",
    ["--output_dir={root}/person0/out", "--class_data_dir={root}/class"],
)
def test_outputs_and_class_images_must_lie_outside_the_identities(assets, tmp_path, flag):
    root = tmp_path / "identities"
    shutil.copytree(assets.identities, root)
    argv = cli(assets, tmp_path / "out", f"--identities_root={root}")
    with pytest.raises(ValueError, match="lies inside --identities_root"):
        train.parse_args([*argv, flag.format(root=root)])


# ======================================================================== speed: the packed step


def test_the_step_equals_the_reference_recipe_for_the_same_seed_and_crop(step_parts):
    """packed_losses on cached latent distributions gives today's losses: the reference step
    re-typed (encode + sample, noise, timesteps from one generator, the UNet, F.mse_loss per
    part, the triplet term on the aligned decode) on the same batch, seed and crops."""
    from datasets import collate_dreambooth

    args, tools, frozen = step_parts
    unet, lora = unet_with_one_identity(args, frozen.device, "no")
    dataset = trainer.build_dataset(args, args.instance_data_dir, tools)
    batch = collate_dreambooth([dataset[0], dataset[1]], with_prior=True)
    prompts = trainer.encode_prompts(frozen, args)
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
    loss, instance, prior = losses.prior_preservation_loss(pred, noise, 2, 1.0)
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


def packed_flags(assets, output: Path, root: Path, *extra: str) -> list[str]:
    return cli(
        assets,
        output,
        f"--identities_root={root}",
        "--max_train_steps=3",
        "--validation_prompt=",
        "--report_to=none",
        # The paper's lr: AdamW's update ~ lr * m / sqrt(v) turns float reassociation of the
        # (tiny) first gradients of A into O(lr) steps, so the batch shape shows at O(1e-2 lr).
        "--learning_rate=1e-4",
        *extra,
    )


def test_a_packed_run_equals_single_runs_and_a_nan_freezes_only_its_identity(
    assets, tmp_path, monkeypatch
):
    root = tmp_path / "identities"
    for name in ("hanks", "person0"):
        shutil.copytree(assets.identity(name), root / name)
    alone = tmp_path / "alone"
    train.main(train.parse_args(packed_flags(assets, alone, root, "--pack=1")))
    packed = tmp_path / "packed"
    summary = train.main(train.parse_args(packed_flags(assets, packed, root, "--pack=2")))
    assert [r["identity"] for r in summary["trained"]] == ["hanks", "person0"]
    config = json.loads((packed / "hanks" / trainer.CONFIG_NAME).read_text())
    assert config["resolved"]["pack"] == 2
    for name in ("hanks", "person0"):
        assert_same_lora(alone / name, packed / name, atol=1e-5)

    # A NaN in hanks' embeddings poisons its identity term: hanks fails, person0 is untouched.
    add_faces = trainer.PackedTrainer._add_faces

    def with_a_bad_identity(self, slot):
        add_faces(self, slot)
        if slot.identity.name == "hanks":
            rows = [row for key, row in self.faces.rows.items() if key[0] == "hanks"]
            self.faces.columns["embedding"][rows] = float("nan")

    monkeypatch.setattr(trainer.PackedTrainer, "_add_faces", with_a_bad_identity)
    poisoned = tmp_path / "poisoned"
    summary = train.main(train.parse_args(packed_flags(assets, poisoned, root, "--pack=2")))
    assert [r["identity"] for r in summary["failed"]] == ["hanks"]
    assert "non-finite loss at step 1" in summary["failed"][0]["error"]
    assert not (poisoned / "hanks" / train.LORA_WEIGHTS_NAME).exists()
    assert_same_lora(packed / "person0", poisoned / "person0", atol=1e-6)


def test_pack_and_gradient_accumulation_do_not_combine(assets, tmp_path):
    flags = cli(assets, tmp_path / "out", f"--identities_root={assets.identities}")
    with pytest.raises(ValueError, match="--pack > 1"):
        train.parse_args([*flags, "--pack=2", "--gradient_accumulation_steps=2"])


@pytest.mark.parametrize("precision", ["fp16", "bf16"])
def test_mixed_precision_training_runs_on_the_cpu(assets, tmp_path, precision):
    """The GPU recipes' precision paths, run here: half-precision frozen weights, fp32 LoRA, and
    for fp16 the grad scaler (unscale, per-identity inf skip, update) in every step."""
    flags = cli(assets, tmp_path / precision, f"--instance_data_dir={assets.identity('hanks')}")
    flags = [f for f in flags if not f.startswith("--mixed_precision")]
    flags += [f"--mixed_precision={precision}", "--max_train_steps=2", "--checkpointing_steps=2"]
    flags += ["--validation_prompt=", "--report_to=none"]
    summary = train.main(train.parse_args(flags))
    assert [run["steps"] for run in summary["trained"]] == [2]
    weights = lora_weights(tmp_path / precision)
    assert all(w.dtype == torch.float32 and torch.isfinite(w).all() for w in weights.values())
    state = torch.load(
        tmp_path / precision / "checkpoint-2" / trainer.TRAINING_STATE_NAME, weights_only=True
    )
    scaler = state["grad_scaler"]
    assert bool(scaler) == (precision == "fp16")  # an fp16 scaler state, none for bf16
    config = json.loads((tmp_path / precision / trainer.CONFIG_NAME).read_text())
    assert config["resolved"]["mixed_precision"] == precision
