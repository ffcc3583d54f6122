"""Training: one identity at a time (the paper's case), or K at a time (--pack K), each
identity with the data, noise, schedule and update rule of a run of it alone.

train_ID-Booth.py parses and checks the command line, finds the identities and prepares the
class images; what a run does from there lives here. One training step of one identity is the
first three sections: the step, then the data it takes, then the loop that calls it (inside
a section, a function comes before the helpers it calls). In reading order:

    PackedBatch.one_identity     one identity's micro-batch on the device
    training_step                the step's forward: noise, timestep -> UNet -> diffusion
                                 target; x0_hat -> decode -> align -> ArcFace -> the objective
                                 (losses.objective_of_each: diffusion + prior + identity term)
      draw_randomness, identity_mask, face_embeddings_of_x0, decode_x0   its parts
    Slot.next_batch              the identity's next micro-batch, in the order of a run of it
      Slot.next_micro_batch      alone (seeded by epoch and position), and its noise seed
    PackedTrainer.train_alone    the loop: one identity from its first step (or checkpoint)
                                 to its final LoRA (set-up: `fill`, a fresh LoRA and AdamW
                                 state and the learning-rate table, or the checkpoint's)
      PackedTrainer.train_on     training_step under autocast, backward, `record` (running
                                 means; a non-finite loss term stops the identity), and at the
                                 end of an accumulation (`Slot.is_update_due`):
      PackedTrainer.update       unscale (fp16), clip, learning rate
                                 (`scheduled_learning_rates`), AdamW for the identities
                                 `may_step` lets move
      PackedTrainer.advance      step count, logs, checkpoints, validation, the final LoRA

The step's conditioning (PromptEmbeddings.unet_conditioning: the instance prompt for instance
rows, the class prompt for prior rows) and precision (FrozenModels.autocast) are with the
models further down. What the loop uses outside this file: losses.py (the objective: the
paper's equations), datasets.py (photos, crops, the latent cache), faces.align_faces_torch,
the frozen ArcFace, and multi_lora.py, which holds each identity's LoRA as one slot of stacked
factors with one AdamW over all slots. At K = 1 they act as the stock components, so a reader
can take them as such: `train_alone` makes the updates of diffusers' DreamBooth-LoRA recipe
written with a peft LoRA (holding our init, which equals peft's gaussian init), GradScaler,
torch's clip_grad_norm_ and AdamW and get_scheduler stepped after each update the scaler did
not skip, on the same micro-batches
(tests/test_trainer.py::test_train_alone_makes_the_updates_of_the_stock_recipe: six updates at
changing rates, every applied one clipped; in fp32, with and without accumulation, within
1e-6, 0 measured on our CPU; in fp16, one update skipped, within 6e-4, 2.4e-4 measured, as the
LoRA products round apart). The learning rate of an update is get_scheduler's, tabulated once
per identity (learning_rate_table) and indexed by the identity's count of applied updates.
Unlike the stock recipe, a non-finite loss term or (outside fp16) gradient stops the identity:
it no longer moves, and fails at the next point that reads the device (the step does not): its
next log interval, checkpoint, validation or end of run. The crops are VAE-encoded ahead of
the steps that draw them (Slot.encode_ahead, datasets.LatentCache), so the step samples each
latent from its crop's cached distribution.

With --pack K, `PackedTrainer.step` runs the same next_batch / train_on / training_step /
update / advance on K identities' batches side by side (`PackedBatch.pack`), each identity in
its own LoRA slot with its own data order, noise, AdamW state, learning-rate schedule,
gradient clipping, NaN freeze, checkpoints, validation images and final LoRA. Packing adds
`step` over the occupied slots of the queue (`run`), `gather`, a LoRA kernel that gathers each
row's factors unless every slot trains with equal batches (then each slot's rows are one
block), the objective's per-identity loop for unequal batches, and one fp16 loss scaler shared
by the slots. Without a loss scaler (fp32, bf16) a pack's LoRAs equal its identities' solo
runs within float rounding
(tests/test_train.py::test_a_packed_run_equals_single_runs_and_a_nan_freezes_only_its_identity,
fp32). Under fp16 the slots share one loss scaler: an overflow skips only its identity's
update but halves the scale for all, so another identity's smallest fp16 gradients may
underflow where its solo run's would not.

Functions take train_ID-Booth.py's parsed arguments (`args`); messages go to the script's
logger.
"""

from __future__ import annotations

import argparse
import contextlib
import dataclasses
import json
import logging
import math
import time
from dataclasses import dataclass
from functools import cached_property, partial
from pathlib import Path
from typing import Any

import numpy as np
import torch

import runs
from arcface import load_arcface
from architectures import (
    Architecture,
    architecture_or_paper,
    base_vae_config,
    load_vae_beside_base,
)
from datasets import DreamBoothFaceDataset, LatentCache, RowTable, to_device
from faces import align_faces_torch, build_face_detector
from fileio import atomic_save_image, atomic_write_json, stable_seed
from lora import (
    LORA_WEIGHTS_NAME,
    base_model_record,
    lora_target_modules,
    read_lora_file,
    write_lora_file,
    write_model_card,
)
from losses import (
    TERM_NAMES,
    ObjectiveConfig,
    diffusion_target,
    objective_of_each,
    predict_x0,
    sample_mse,
)
from multi_lora import (
    BatchedLoRA,
    StackedAdamW,
    identity_state_dict,
    init_identity_,
    inject_batched_lora,
    load_identity_,
    lora_config,
    schedule_table,
)
from runs import Identity, NonFiniteLossError, NonFiniteWatch, RunningMeans
from sampling import Sampler, generate_images

logger = logging.getLogger("train_ID-Booth")

TRAINING_STATE_NAME = "training_state.pt"
MAX_TRAIN_STEPS = 10**6  # per identity (the learning-rate table holds one entry per step)
CONFIG_NAME = "training_config.json"
WEIGHT_DTYPES = {"no": torch.float32, "fp16": torch.float16, "bf16": torch.bfloat16}


# ==================== one step of one identity (the paper's case)
#
# One identity's batch (PackedBatch.one_identity) goes through training_step, which returns
# the objective's terms; PackedTrainer.train_on (the loop's section) adds backward and update.
# A pack of K identities concatenates their batches (PackedBatch.pack): the same step runs on
# the packed rows, each identity with its own generator, objective and LoRA slot.


@dataclass
class PackedBatch:
    """A micro-batch on the device. One identity's (`one_identity`, the paper's case): B rows,
    its instance rows then as many prior rows (the order of diffusers' DreamBooth collate).
    K identities' (`pack`): their batches one after another (identity-major).

    `mean` / `std`: (B, 4, h, w) latent distributions of the crops; `is_prior`: (B,) bool;
    `instance_rows`, `prior_rows`: (n,) long (prior_rows[i] = the class row paired with
    instance row i, or -1); `landmarks`: (n, 5, 2) crop pixels of the instance rows;
    `embeddings`: (B, D) precomputed ArcFace embeddings; `has_face`: (B,) bool; `time_ids`:
    (B, 6) SDXL's size/crop ids (`crop_time_ids`), None for SD 1.x / 2.x. Packing only: host
    ints `sizes` (rows of each identity) and `instance_sizes`, and `slots` (B,) long, the LoRA
    slot of each row (all 0 for one identity).
    """

    mean: torch.Tensor
    std: torch.Tensor
    is_prior: torch.Tensor
    instance_rows: torch.Tensor
    prior_rows: torch.Tensor
    sizes: list[int]
    instance_sizes: list[int]
    slots: torch.Tensor
    landmarks: torch.Tensor | None = None
    embeddings: torch.Tensor | None = None
    has_face: torch.Tensor | None = None
    time_ids: torch.Tensor | None = None

    @classmethod
    def one_identity(
        cls,
        mean: torch.Tensor,
        std: torch.Tensor,
        num_instance: int,
        landmarks: torch.Tensor | None = None,
        embeddings: torch.Tensor | None = None,
        has_face: torch.Tensor | None = None,
        time_ids: torch.Tensor | None = None,
    ) -> PackedBatch:
        """One identity's batch: num_instance instance rows, then as many prior rows or none."""
        size, device = mean.shape[0], mean.device
        if size not in (num_instance, 2 * num_instance):
            raise ValueError(f"{size} rows are not {num_instance} instance rows (+ as many prior)")
        rows = torch.arange(size, device=device)
        paired = rows[num_instance:] if size > num_instance else torch.full_like(rows, -1)
        return cls(
            mean=mean,
            std=std,
            is_prior=rows >= num_instance,
            instance_rows=rows[:num_instance],
            prior_rows=paired,
            sizes=[size],
            instance_sizes=[num_instance],
            slots=torch.zeros_like(rows),
            landmarks=landmarks,
            embeddings=embeddings,
            has_face=has_face,
            time_ids=time_ids,
        )

    @classmethod
    def pack(cls, batches: list[PackedBatch], slots: list[int]) -> PackedBatch:
        """One-identity batches side by side, identity s's rows in LoRA slot slots[s]."""
        offsets = np.cumsum([0, *(batch.sizes[0] for batch in batches)]).tolist()
        rows = list(zip(batches, offsets, strict=False))  # offsets has one more entry

        def cat(name: str) -> torch.Tensor | None:
            values = [getattr(batch, name) for batch in batches]
            return None if values[0] is None else torch.cat(values)

        return cls(
            mean=cat("mean"),
            std=cat("std"),
            is_prior=cat("is_prior"),
            instance_rows=torch.cat([b.instance_rows + o for b, o in rows]),
            prior_rows=torch.cat(
                [torch.where(b.prior_rows >= 0, b.prior_rows + o, -1) for b, o in rows]
            ),
            sizes=[size for batch in batches for size in batch.sizes],
            instance_sizes=[size for batch in batches for size in batch.instance_sizes],
            slots=torch.cat(
                [batch.slots + slot for batch, slot in zip(batches, slots, strict=True)]
            ),
            landmarks=cat("landmarks"),
            embeddings=cat("embeddings"),
            has_face=cat("has_face"),
            time_ids=cat("time_ids"),
        )


def training_step(
    unet: torch.nn.Module,
    frozen: FrozenModels,
    prompts: PromptEmbeddings,
    batch: PackedBatch,
    generators: list[torch.Generator],
    config: ObjectiveConfig,
    clamp_decoded_x0: bool = True,
) -> dict[str, torch.Tensor]:
    """The forward pass of one training step -> every TERM_NAMES value of each identity, (S,).

    One identity (the paper's case): S = 1 and one generator. All randomness comes from the
    identities' generators; latents and noise are in fp32 (the noise is added in fp32:
    diffusers' add_noise in bf16 adds none at t = 0, 1), the UNet runs in the weight dtype
    with the LoRA slots the caller selected. No host syncs.
    """
    scheduler = frozen.noise_scheduler
    draw, noise, timesteps = draw_randomness(batch, generators, config.num_train_timesteps)
    latents = (batch.mean.float() + batch.std.float() * draw) * frozen.vae.config.scaling_factor
    noisy_latents = scheduler.add_noise(latents, noise, timesteps)  # (B, 4, h, w) fp32
    conditioning = prompts.unet_conditioning(batch)  # text (B, L, D); SDXL: + pooled, size/crop
    model_input = noisy_latents.to(frozen.weight_dtype)
    model_pred = unet(model_input, timesteps, **conditioning, return_dict=False)[0]
    target = diffusion_target(noise, latents, timesteps, scheduler)
    identity_rows = None
    if config.has_identity_term:
        rows = batch.instance_rows
        mask = identity_mask(batch, config.loss)  # (n,) bool
        anchor = face_embeddings_of_x0(
            frozen,
            noisy_latents[rows],
            model_pred[rows],
            timesteps[rows],
            batch.landmarks,
            mask,
            clamp_decoded_x0,
        )
        identity_rows = {
            "anchor": anchor,
            "positive": batch.embeddings[rows],
            "negative": batch.embeddings[batch.prior_rows.clamp_min(0)],  # masked where absent
            "timesteps": timesteps[rows],
            "mask": mask,
        }
    return objective_of_each(
        config,
        sample_mse(model_pred, target),
        batch.is_prior,
        batch.sizes,
        identity_rows,
        batch.instance_sizes,
    )


def draw_randomness(
    batch: PackedBatch, generators: list[torch.Generator], num_train_timesteps: int
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(latent draw, noise, timesteps) of every row, each identity's rows from its own generator
    in its own run's order (latent sample, noise, timesteps): (B, 4, h, w) x 2 fp32, (B,)."""
    draws, noises, timesteps = [], [], []
    device = batch.mean.device
    for size, generator in zip(batch.sizes, generators, strict=True):
        shape = (size, *batch.mean.shape[1:])
        draws.append(torch.randn(shape, generator=generator, device=device))
        noises.append(torch.randn(shape, generator=generator, device=device))
        timesteps.append(
            torch.randint(0, num_train_timesteps, (size,), generator=generator, device=device)
        )
    return torch.cat(draws), torch.cat(noises), torch.cat(timesteps)


def identity_mask(batch: PackedBatch, loss: str) -> torch.Tensor:
    """(n,) bool: instance rows that get the identity term. Instance photos all have a face;
    the triplet also needs the paired class image's face (its negative e_prior)."""
    mask = batch.has_face[batch.instance_rows]
    if loss == "triplet":
        mask = mask & batch.has_face[batch.prior_rows.clamp_min(0)] & (batch.prior_rows >= 0)
    return mask


def face_embeddings_of_x0(
    frozen: FrozenModels,
    noisy_latents: torch.Tensor,
    model_pred: torch.Tensor,
    timesteps: torch.Tensor,
    landmarks: torch.Tensor,
    mask: torch.Tensor,
    clamp: bool = True,
) -> torch.Tensor:
    """a_i = E(x0_hat_i): decode (with grad) -> 5-point alignment with the photo's landmarks
    (pixels of the training crop = pixels of the decoded image) -> frozen ArcFace, the last two
    in fp32 outside autocast like the precomputed e_inst / e_prior. (n, D) unit vectors."""
    decoded = decode_x0(frozen, noisy_latents, model_pred, timesteps, mask, clamp)  # (n,3,R,R)
    with torch.autocast(frozen.device.type, enabled=False):
        faces = align_faces_torch(decoded.float(), landmarks, fill=-1.0)  # (n, 3, 112, 112)
        return frozen.arcface(faces)  # (n, 512) float32, unit norm


def decode_x0(
    frozen: FrozenModels,
    noisy_latents: torch.Tensor,
    model_pred: torch.Tensor,
    timesteps: torch.Tensor,
    mask: torch.Tensor,
    clamp: bool,
) -> torch.Tensor:
    """x0_hat in fp32 -> frozen VAE decode in its weight dtype (with grad) -> clamped to
    [-1, 1] like the reference code (clamp=False keeps the gradient of saturated pixels):
    (n, 3, R, R). Rows outside `mask` (no identity term) enter the decoder detached, so even a
    NaN in them cannot reach the LoRA through the backward pass."""
    scheduler, vae = frozen.noise_scheduler, frozen.vae
    x0 = predict_x0(
        noisy_latents.float(),
        model_pred.float(),
        timesteps,
        scheduler.alphas_cumprod,
        scheduler.config.prediction_type,
    )  # (n, 4, R/8, R/8) float32
    x0 = torch.where(mask[:, None, None, None], x0, x0.detach())
    with frozen.vae_precision():  # SDXL's VAE decodes in fp32 (it overflows in fp16)
        decoded = vae.decode((x0 / vae.config.scaling_factor).to(vae.dtype)).sample
    return decoded.clamp(-1.0, 1.0) if clamp else decoded


# ==================== one identity's data and schedule


class Slot:
    """One identity in one LoRA slot of the packed trainer: its data, its place in its own
    schedule (epoch, batch, step: exactly those of a run of it alone), its watches and outputs."""

    def __init__(self, trainer: PackedTrainer, index: int, identity: Identity) -> None:
        args = trainer.args
        self.trainer, self.index, self.identity, self.args = trainer, index, identity, args
        self.dataset = trainer.build_dataset(identity)
        self.batches_per_epoch = math.ceil(len(self.dataset) / args.train_batch_size)
        self.updates_per_epoch, self.max_train_steps = schedule_lengths(args, len(self.dataset))
        self.num_epochs = math.ceil(self.max_train_steps / self.updates_per_epoch)
        self.checkpointing_steps = args.checkpointing_steps or 8 * self.updates_per_epoch
        self.validation_steps = args.validation_steps or self.checkpointing_steps
        self.global_step, self.last_validated, self.micro_batch = 0, -1, 0
        self.order: tuple[int, list[int]] | None = None  # (epoch, item order) cache
        self.generator = torch.Generator(trainer.device)
        self.identity_samples = 0  # host copy, updated at log intervals
        self.writer = self.progress = None
        self.started = time.time()

    # ---------------------------------------- its micro-batches, in the order of a run of it alone

    def next_batch(self) -> tuple[PackedBatch, torch.Generator]:
        """This identity's next micro-batch on the device and its generator, seeded for it:
        latents from the trainer's cache (encoded ahead), embeddings and faces from its device
        tables."""
        trainer, device = self.trainer, self.trainer.device
        items, seed = self.next_micro_batch()
        pairs = [self.dataset.crops(item) for item in items]
        instance = [pair[0] for pair in pairs]
        crops = instance + [pair[1] for pair in pairs if len(pair) > 1]  # [instance..., prior...]
        photos = [self.photo_key(crop) for crop in crops]  # (owner, part, index)
        latent_rows = trainer.latents.index(self.crop_keys(crops), device)  # encoded ahead
        faces = {}
        if trainer.faces.rows:
            face_rows = trainer.faces.index(photos, device)
            landmarks = [torch.from_numpy(self.dataset.landmarks(crop)) for crop in instance]
            faces = {
                "embeddings": trainer.faces.columns["embedding"][face_rows],
                "has_face": trainer.faces.columns["has_face"][face_rows],
                "landmarks": to_device(torch.stack(landmarks), device),
            }
        if trainer.frozen.architecture.is_sdxl:
            faces["time_ids"] = to_device(crop_time_ids(self.dataset, crops), device)
        batch = PackedBatch.one_identity(
            trainer.latents.columns["mean"][latent_rows],
            trainer.latents.columns["std"][latent_rows],
            len(instance),
            **faces,
        )
        return batch, self.generator.manual_seed(seed)

    def next_micro_batch(self) -> tuple[list[int], int]:
        """The items of this identity's next micro-batch and its noise seed: a function of
        (seed, epoch, position), as in a run of this identity alone. At an epoch's first
        micro-batch (or a resumed run's), the crops the epoch will draw are encoded ahead."""
        epoch, position = self.epoch, self.position
        if self.order is None or self.order[0] != epoch:
            generator = torch.Generator().manual_seed(stable_seed(self.args.seed, "order", epoch))
            self.order = (epoch, torch.randperm(len(self.dataset), generator=generator).tolist())
            self.dataset.set_epoch(epoch)  # crops of this epoch: seeded by (--seed, epoch, index)
            self.encode_ahead()
        size = self.args.train_batch_size
        items = self.order[1][position * size : (position + 1) * size]
        return items, stable_seed(self.args.seed, "noise", epoch, position)

    def is_update_due(self) -> bool:
        """Whether the next micro-batch ends an accumulation (or the epoch)."""
        position = self.position
        last_of_epoch = position == self.batches_per_epoch - 1
        return (position + 1) % self.args.gradient_accumulation_steps == 0 or last_of_epoch

    @property
    def epoch(self) -> int:
        return self.global_step // self.updates_per_epoch

    @property
    def position(self) -> int:
        """Index of the next micro-batch within the epoch."""
        done = self.global_step - self.epoch * self.updates_per_epoch
        return done * self.args.gradient_accumulation_steps + self.micro_batch

    def encode_ahead(self) -> None:
        """Latents of exactly the crops this epoch's remaining micro-batches draw (up to the
        run's last step), in batches; the identity's crops of earlier epochs are freed."""
        updates_left = self.max_train_steps - self.epoch * self.updates_per_epoch
        last = min(self.batches_per_epoch, updates_left * self.args.gradient_accumulation_steps)
        size = self.args.train_batch_size
        items = self.order[1][self.position * size : last * size]
        crops = [crop for item in items for crop in self.dataset.crops(item)]
        keys = self.crop_keys(crops)
        self.trainer.latents.drop(self.identity.name, keep=set(keys))
        pixels = {
            key: partial(self.dataset.pixels, crop) for key, crop in zip(keys, crops, strict=True)
        }
        self.trainer.latents.encode(keys, pixels)

    def crop_keys(self, crops: list[Any]) -> list[tuple]:
        """(owner, part, index, left, top) of each crop: class photos are every identity's."""
        return [(*self.photo_key(crop), crop.left, crop.top) for crop in crops]

    def photo_key(self, crop: Any) -> tuple[str, str, int]:
        """(owner, part, index) of a crop's photo: class photos are shared by every identity."""
        owner = self.identity.name if crop.part == "instance" else "class"
        return owner, crop.part, crop.index

    def log_due(self) -> bool:
        """Whether the update just made ends a log interval."""
        step = self.global_step
        return step % self.args.logging_steps == 0 or step == self.max_train_steps

    def epoch_due(self) -> bool:
        """Whether the update just made ends an epoch (or the run)."""
        step = self.global_step
        return step % self.updates_per_epoch == 0 or step >= self.max_train_steps

    # ------------------------------------------------------------------ config and outputs

    def config(self, status: str) -> dict[str, Any]:
        """Everything needed to reproduce or resume this identity's run."""
        trainer = self.trainer
        return {
            "status": status,
            "identity": self.identity.name,
            "instance_data_dir": str(self.identity.instance_dir),
            "args": runs.json_safe(vars(self.args)),
            "resolved": {
                "max_train_steps": self.max_train_steps,
                "num_train_epochs": self.num_epochs,
                "steps_per_epoch": self.updates_per_epoch,
                "checkpointing_steps": self.checkpointing_steps,
                "validation_steps": self.validation_steps,
                "mixed_precision": trainer.frozen.mixed_precision,
                "lora_target_modules": trainer.lora.target_modules,
                "device": str(trainer.device),
                "process_index": trainer.state.process_index,
                "num_processes": trainer.state.num_processes,
                "pack": trainer.num_slots,
                "architecture": trainer.frozen.architecture.to_json(),
                "vae_dtype": str(trainer.frozen.vae.dtype).removeprefix("torch."),
                "class_guidance_scale": trainer.frozen.architecture.default("guidance_scale"),
            },
            "data": self.dataset.summary(),
            "arcface": trainer.arcface_name,
            "base_model": trainer.base_model,
            "global_step": self.global_step,
            "identity_samples": self.identity_samples,
            "versions": runs.library_versions(),
        }

    def write_config(self, folder: Path, status: str) -> None:
        atomic_write_json(folder / CONFIG_NAME, self.config(status))

    def tags(self) -> dict[str, str]:
        """TensorBoard tag per logged term (identity terms only for identity losses)."""
        tags = {"loss": "loss", "diffusion_loss": "diffusion_loss", "prior_loss": "prior_loss"}
        if self.args.loss != "dreambooth":
            tags.update(
                identity_criterion=f"{self.args.loss}_loss",
                identity_term="identity_term",
                identity_weight="identity_weight",
                identity_count="identity_samples_per_batch",
            )
        return tags

    def write_model_card(self) -> None:
        args, folder = self.args, self.identity.output_dir
        write_model_card(
            folder,
            sorted((folder / "validation").glob(f"step_{self.global_step}_*.png")),
            base=args.pretrained_model_name_or_path,
            architecture=self.trainer.frozen.architecture.describe(),
            pipeline_class=self.trainer.frozen.architecture.pipeline_class,
            training_resolution=args.resolution,
            instance_prompt=args.instance_prompt,
            identity=self.identity.name,
            loss=args.loss,
            steps=self.global_step,
            rank=args.rank,
            alpha=args.lora_alpha,
            data=json.dumps(self.dataset.summary()),
            validation_prompt=args.validation_prompt,
        )


# ==================== the loop: one identity (train_alone), or K (step)


class PackedTrainer:
    """Trains the identities of a queue in one process, on one base UNet (loaded once): one at a
    time (`train_alone`, the paper's case), or K at a time (--pack K, `step`) on a batched LoRA
    of K slots and one StackedAdamW, each step packing every occupied slot's micro-batch. An
    identity's LoRA gets exactly the gradient, update, data, noise, checkpoints and outputs of
    a run of it alone; a NaN in one freezes that identity only. A slot that is done (finished
    or failed) takes the next identity of the queue."""

    def __init__(self, args, frozen: FrozenModels, face_tools, state, num_slots: int) -> None:
        self.args, self.frozen, self.face_tools, self.state = args, frozen, face_tools, state
        self.device, self.num_slots = frozen.device, num_slots
        self.arcface_name = face_tools.encoder.name if face_tools is not None else None
        # The base by content (resume and finished identities compare it): a replaced folder
        # or a moved hub revision under the same name is another model.
        self.base_model = runs.base_model_fingerprint(
            args.pretrained_model_name_or_path, args.revision, args.variant
        )
        self.unet, self.lora = load_unet_with_slots(
            args, self.device, frozen.mixed_precision, num_slots
        )
        self.model = compile_step_modules(frozen, self.unet, args) if args.compile else self.unet
        self.optimizer = StackedAdamW(
            self.lora.parameters(),
            num_slots,
            lr=args.learning_rate,
            betas=(args.adam_beta1, args.adam_beta2),
            weight_decay=args.adam_weight_decay,
            eps=args.adam_epsilon,
        )
        if frozen.mixed_precision != "no":  # one cast of all factors per update, not per layer
            self.lora.share_factor_casts(self.optimizer.flat_params, frozen.weight_dtype)
        self.scaler = self.fresh_scaler()
        self.prompts = PromptEmbeddings.encode(frozen, args)
        self.objective = objective_config(args, frozen)
        self.pipeline = assemble_pipeline(frozen, self.unet)
        self.latents = LatentCache(frozen.vae, self.device)  # every slot's crops and the class's
        self.faces = RowTable()  # embedding + has_face of every photo, by (owner, part, index)
        self.class_photos = None
        self.slots: list[Slot | None] = [None] * num_slots
        # Device-side bookkeeping, read only at log intervals and before saving (no syncs):
        self.healthy = torch.ones(num_slots, dtype=torch.bool, device=self.device)
        self.watch = NonFiniteWatch(TERM_NAMES, self.device, num_slots)
        self.grad_watch = NonFiniteWatch(("grad_norm",), self.device, num_slots)
        self.interval_means = term_means(self.device, num_slots)
        self.epoch_means = term_means(self.device, num_slots)
        self.identity_samples = torch.zeros(num_slots, dtype=torch.long, device=self.device)
        self.lr_tables = torch.zeros(num_slots, 1, dtype=torch.float64, device=self.device)
        self.results: list[dict[str, Any]] = []
        self.overall = runs.RunProgress("identity", 0)  # set per run: "identity 37 of 107"

    def run(self, identities: list[Identity]) -> list[dict[str, Any]]:
        """Train every identity of the queue, one result dict each: alone (the paper's case,
        `train_alone`) or K at a time (`--pack K`: `step` packs every occupied slot)."""
        queue = list(identities)
        self.overall = runs.RunProgress("identity", len(queue))
        try:
            if self.num_slots == 1:
                for identity in queue:
                    self.train_alone(identity)
                return self.results
            while queue or self.active_slots():
                for index in range(self.num_slots):
                    while self.slots[index] is None and queue:
                        self._start(index, queue.pop(0))
                if not self.active_slots():
                    break
                self.step()
        finally:  # on an error or Ctrl-C too: no progress bar redraws after the last message
            for slot in self.active_slots():
                self._close_outputs(slot)
        return self.results

    def train_alone(self, identity: Identity) -> None:
        """One identity from its first step (or its checkpoint) to its final LoRA, in slot 0.

        One step: `Slot.next_batch` (the micro-batch of a run of this identity alone) ->
        `train_on` (`training_step`: noise and timestep -> UNet -> diffusion target; x0_hat ->
        decode -> align -> ArcFace -> objective; backward) -> `update` (clip, learning rate,
        AdamW) -> `advance` (logs, checkpoints, validation, and `finish` after the last
        step). Set-up: `_start` -> `fill` (fresh LoRA and AdamW state, or the checkpoint's).
        `step` runs the same functions on K identities."""
        slot = self._start(0, identity)
        while slot is not None and self.slots[0] is slot:  # until finished or failed
            batch, generator = slot.next_batch()
            if self.train_on([slot], batch, [generator]):
                self.advance([slot])
            else:  # gradient accumulation: the update comes with a later micro-batch
                slot.micro_batch += 1

    def train_on(self, slots: list[Slot], batch: PackedBatch, generators) -> bool:
        """One micro-batch: `route_rows` (the LoRA slot of each row), `training_step` under
        autocast, backward, `record` (the running logs and NaN watch), and at the end of an
        accumulation `update`. Device work only: no host reads. True if it updated. With K
        identities the loss is the sum of theirs: each identity's loss reaches only its own
        LoRA slot, so each gets the gradient of a run of it alone."""
        self.route_rows(slots, batch)
        with self.frozen.autocast():
            terms = training_step(
                self.model,
                self.frozen,
                self.prompts,
                batch,
                generators,
                self.objective,
                self.args.clamp_decoded_x0,
            )  # every TERM_NAMES value, (S,)
        total = terms["loss"].sum() / self.args.gradient_accumulation_steps
        self.scaler.scale(total).backward()
        index, steps = self.record(slots, terms)
        if not all(slot.is_update_due() for slot in slots):
            return False
        self.update(index, steps)
        return True

    def update(self, index: torch.Tensor, steps: torch.Tensor) -> None:
        """Unscale (fp16), clip the gradient norm, set the scheduled learning rate, AdamW, per
        identity; `may_step` leaves out an identity whose gradient is not finite this update
        (the fp16 scaler's overflow, then a smaller scale) or that held a NaN before."""
        if self.scaler.is_enabled():
            self.scaler.unscale_(self.optimizer)
        norms = self.optimizer.clip_grad_norm_(self.args.max_grad_norm)  # (K,)
        self.optimizer.set_learning_rates(self.scheduled_learning_rates())
        self.optimizer.step(active=self.may_step(index, norms, steps))
        if self.scaler.is_enabled():
            self.scaler.update()
        self.optimizer.zero_grad(set_to_none=True)

    def route_rows(self, slots: list[Slot], batch: PackedBatch) -> None:
        """Send each row through its identity's LoRA slot: one block of rows per slot (one
        identity, or every slot training with equal batches) takes the grouped kernel, any
        other layout the kernel that gathers each row's factors."""
        every_slot = [slot.index for slot in slots] == list(range(self.num_slots))
        grouped = every_slot and len(set(batch.sizes)) == 1  # rows: slot 0's, slot 1's, ...
        self.lora.set_identities(batch.slots, batch.sizes[0] if grouped else None)

    def record(
        self, slots: list[Slot], terms: dict[str, torch.Tensor]
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """The step's terms into each slot's NaN watch, health flag, running means and
        identity-sample count, on the device: a non-finite loss term marks the identity
        unhealthy (it no longer moves, and fails at its next log interval or save).
        Returns (slot index (S,), the step number each slot's update makes (S,))."""
        index = to_device(torch.tensor([slot.index for slot in slots]), self.device)  # (S,)
        values = torch.stack([terms[name].detach().double() for name in TERM_NAMES], dim=1)
        steps = to_device(torch.tensor([slot.global_step + 1 for slot in slots]), self.device)
        self.watch.update(values, steps, index)
        self.healthy[index] = self.healthy[index] & torch.isfinite(values).all(1)
        self.interval_means.add(values, index)
        self.epoch_means.add(values, index)
        self.identity_samples.index_add_(0, index, terms["identity_count"].detach().round().long())
        return index, steps

    def scheduled_learning_rates(self) -> torch.Tensor:
        """(K,) float64: each slot's learning rate, its table row (learning_rate_table) at its
        count of applied updates (StackedAdamW.identity_steps)."""
        updates = self.optimizer.identity_steps().clamp_max(self.lr_tables.shape[1] - 1)
        return self.lr_tables.gather(1, updates[:, None])[:, 0]

    def may_step(
        self, index: torch.Tensor, norms: torch.Tensor, steps: torch.Tensor
    ) -> torch.Tensor:
        """(K,) bool: the slots AdamW updates: present in this step, healthy and with a finite
        gradient norm. Under fp16 a non-finite gradient (of finite loss terms: `record`) is the
        scaler's overflow: the update is skipped, as GradScaler.step skips it. Otherwise it is
        an error: the identity stops moving at once (its LoRA stays finite) and fails at its
        next log interval or save (`check_finite`), which read the device; the step itself
        does not (no host syncs)."""
        present = torch.zeros(self.num_slots, dtype=torch.bool, device=self.device)
        present[index] = True
        finite = torch.isfinite(norms)
        if not self.scaler.is_enabled():
            self.grad_watch.update(norms[index].double()[:, None], steps, index)
            self.healthy[index] = self.healthy[index] & finite[index]
        return present & self.healthy & finite

    def advance(self, slots: list[Slot]) -> None:
        """After an update: each slot's step count, then its logs, checkpoint, validation and
        end of run; an identity whose bookkeeping fails (a NaN, a full disk) fails alone."""
        for slot in slots:
            slot.global_step += 1
            slot.micro_batch = 0
        reads = self.read_logs(slots)  # every slot's log values: one device-to-host read
        for slot in slots:
            slot.progress.update(1)
            try:
                self.after_update(slot, reads.get(slot.index))
            except (ValueError, OSError, NonFiniteLossError) as error:
                self._fail(slot.identity, error, slot)

    def after_update(self, slot: Slot, read: LogRead | None = None) -> None:
        step = slot.global_step
        read = read or self.read_logs([slot]).get(slot.index)
        if slot.log_due():
            self.log_interval(slot, read)
        if step % slot.checkpointing_steps == 0:
            self.save_checkpoint(slot)
        if step % slot.validation_steps == 0:
            self.check_finite(slot, "no validation images were made")
            self.validate(slot)
        if slot.epoch_due():
            self.log_epoch(slot, (step - 1) // slot.updates_per_epoch, read)
        if step >= slot.max_train_steps:
            self.finish(slot)

    # ------------------------------------------------------------------ packing K identities

    def step(self) -> None:
        """One micro-batch of every occupied slot (`--pack K`): plan it on the host, train on
        the device, then the host bookkeeping (log intervals are the only host syncs)."""
        slots = self.active_slots()
        batch, generators = self.gather(slots)
        if self.train_on(slots, batch, generators):
            self.advance(slots)
        else:  # accumulating (one slot only)
            for slot in slots:
                slot.micro_batch += 1

    def gather(self, slots: list[Slot]) -> tuple[PackedBatch, list[torch.Generator]]:
        """Each slot's next micro-batch, packed into one batch, and their generators."""
        batches, generators = zip(*(slot.next_batch() for slot in slots), strict=True)
        return PackedBatch.pack(list(batches), [slot.index for slot in slots]), list(generators)

    # ------------------------------------------------------------------ slots

    def _start(self, index: int, identity: Identity) -> Slot | None:
        """Fill a slot; an identity that cannot start (no face photo, bad checkpoint) fails
        alone unless it is the run's only one. None if it failed or was already finished."""
        self.overall.start(identity.name)
        try:
            slot = self.fill(index, identity)
            if slot.global_step >= slot.max_train_steps:
                self.finish(slot)
                return None
            return slot
        except (ValueError, OSError, NonFiniteLossError) as error:
            self._fail(identity, error)
            return None

    def _fail(self, identity: Identity, error: Exception, slot: Slot | None = None) -> None:
        if self.args.identities_root is None:
            raise error
        logger.error("identity %s failed: %s", identity.name, error)
        result = {"identity": identity.name, "error": f"{type(error).__name__}: {error}"}
        if slot is not None:
            self.release(slot, result)
        else:
            self.results.append(result)
            self.overall.done(identity.name, failed=True)

    def fill(self, index: int, identity: Identity) -> Slot:
        """Put an identity into slot `index`: fresh LoRA (peft's init for --seed) and optimizer
        state, or its checkpoint when resuming. Alone in the trainer, it also gets a fresh fp16
        scaler, so its LoRA does not depend on the identities trained before it (a pack's slots
        share one scaler)."""
        if self.args.overwrite:
            clear_outputs(identity, self.args.logging_dir)
        if not self.active_slots():
            self.scaler = self.fresh_scaler()
        logger.info(
            "training identity %s -> %s (slot %d)", identity.name, identity.output_dir, index
        )
        slot = Slot(self, index, identity)
        init_identity_(self.lora, index, stable_seed(self.args.seed, "lora-init"))
        self.optimizer.load_identity_state(index, None)
        self._reset_watches(index)
        table = learning_rate_table(self.args, slot.max_train_steps).to(self.device)
        if table.shape[0] > self.lr_tables.shape[1]:  # longer runs need a wider table
            wider = self.lr_tables.new_zeros(self.num_slots, table.shape[0])
            wider[:, : self.lr_tables.shape[1]] = self.lr_tables
            self.lr_tables = wider
        self.lr_tables[index, : table.shape[0]] = table
        self._add_faces(slot)
        identity.output_dir.mkdir(parents=True, exist_ok=True)
        runs.remove_stale_temporaries(identity.output_dir, (".checkpoint-", ".lora-"))
        self.resume(slot)
        slot.write_config(identity.output_dir, "running")
        slot.writer = _make_writer(self.args, identity.output_dir)
        slot.progress = _progress_bar(self, slot)
        self.slots[index] = slot
        return slot

    @cached_property
    def validation_sampler(self) -> Sampler:
        """The project's sampler over the training UNet, made at the first validation."""
        return Sampler.from_pipeline(
            self.pipeline,
            num_inference_steps=self.args.validation_num_inference_steps,
            guidance_scale=self.args.validation_guidance_scale,
            height=self.args.resolution,
            width=self.args.resolution,
        )

    def build_dataset(self, identity: Identity) -> DreamBoothFaceDataset:
        dataset = build_dataset(
            self.args, identity.instance_dir, self.face_tools, self.class_photos
        )
        self.class_photos = dataset.classes
        for part in (dataset.instance, dataset.classes):
            if part is not None:
                part.preload(self.args.resolution, self.args.dataloader_num_workers)
        return dataset

    def fresh_scaler(self) -> torch.amp.GradScaler:
        """fp16's loss scaler as a run starts with it (disabled for bf16 and fp32)."""
        enabled = self.frozen.mixed_precision == "fp16"
        return torch.amp.GradScaler(self.device.type, enabled=enabled)

    def _add_faces(self, slot: Slot) -> None:
        """The identity's (and, once, the class folder's) embeddings and has_face on the device."""
        parts = [(slot.identity.name, "instance", slot.dataset.instance)]
        if slot.dataset.classes is not None and ("class", "class", 0) not in self.faces.rows:
            parts.append(("class", "class", slot.dataset.classes))
        for owner, part, photos in parts:
            if not photos.annotated:
                continue
            keys = [(owner, part, index) for index in range(len(photos.paths))]
            columns = {
                "embedding": photos.embeddings.float(),
                "has_face": torch.from_numpy(photos.has_face),
            }
            self.faces.add(keys, {name: to_device(v, self.device) for name, v in columns.items()})

    def _reset_watches(self, index: int) -> None:
        self.healthy[index] = True
        for watch in (self.watch, self.grad_watch):
            watch.reset(index)
        for means in (self.interval_means, self.epoch_means):
            means.reset(index)
        self.identity_samples[index] = 0

    def release(self, slot: Slot, result: dict[str, Any]) -> None:
        """The slot's identity is done (finished or failed): close its outputs, free the slot."""
        self._close_outputs(slot)
        self.slots[slot.index] = None
        self.latents.drop(slot.identity.name)
        self.faces.drop(slot.identity.name)
        self.results.append(result)
        self.overall.done(result["identity"], failed="error" in result)

    def active_slots(self) -> list[Slot]:
        return [slot for slot in self.slots if slot is not None]

    # ------------------------------------------------------------------ checkpoints

    def resume(self, slot: Slot) -> None:
        """Restore the slot's LoRA, optimizer state, grad scaler and step from a checkpoint."""
        output_dir, value = slot.identity.output_dir, self.args.resume_from_checkpoint
        folder = runs.find_checkpoint(value, output_dir, TRAINING_STATE_NAME)
        if folder is None:
            return
        config_path = folder / CONFIG_NAME
        if not config_path.is_file():
            raise ValueError(f"checkpoint {folder} has no {CONFIG_NAME}; it cannot be checked")
        changed = resume_mismatches(json.loads(config_path.read_text()), slot.config("resuming"))
        if changed:
            raise ValueError(
                f"checkpoint {folder} was trained with other settings ({'; '.join(changed)}); "
                "resume with the same ones, or pass --overwrite to start over"
            )
        load_identity_(self.lora, slot.index, read_lora_file(folder))
        state = torch.load(
            folder / TRAINING_STATE_NAME, map_location=self.device, weights_only=True
        )
        self.optimizer.load_identity_state(slot.index, state["optimizer"])
        if self.scaler.is_enabled() and state["grad_scaler"]:
            self.scaler.load_state_dict(state["grad_scaler"])  # shared by the slots of a pack
        slot.global_step = int(state["global_step"])
        slot.identity_samples = int(state["identity_samples"])
        self.identity_samples[slot.index] = slot.identity_samples
        logger.info("%s: resumed from %s at step %d", slot.identity.name, folder, slot.global_step)

    def save_lora_of(self, slot: Slot, folder: Path) -> None:
        """The slot's LoRA in diffusers' format, its base model and architecture in the header."""
        write_lora_file(
            folder,
            identity_state_dict(self.lora, slot.index),
            lora_config(self.lora).to_dict(),
            base_model_record(
                self.args.pretrained_model_name_or_path,
                self.frozen.architecture,
                self.args.resolution,
            ),
        )

    def save_checkpoint(self, slot: Slot) -> Path:
        """checkpoint-N: LoRA (loadable as is), optimizer/scaler state, config."""
        self.check_finite(slot, f"checkpoint-{slot.global_step} was not written")

        def fill(temp: Path) -> None:
            self.save_lora_of(slot, temp)
            state = {
                "optimizer": self.optimizer.identity_state(slot.index),
                "grad_scaler": self.scaler.state_dict(),
                "global_step": slot.global_step,
                "identity_samples": slot.identity_samples,
            }
            torch.save(state, temp / TRAINING_STATE_NAME)
            slot.write_config(temp, "checkpoint")

        folder = runs.write_checkpoint(
            slot.identity.output_dir,
            slot.global_step,
            fill,
            TRAINING_STATE_NAME,
            self.args.checkpoints_total_limit,
        )
        logger.info("%s: saved %s", slot.identity.name, folder)
        return folder

    def check_finite(self, slot: Slot, where: str) -> None:
        """NonFiniteLossError if the slot's loss terms, gradient norm or LoRA weights held
        NaN/inf since it started (one host sync): nothing non-finite is ever saved."""
        self.watch.check(where, slot.index)
        self.grad_watch.check(where, slot.index)
        k = slot.index
        finite = torch.stack([p[k].isfinite().all() for p in self.lora.parameters()]).all()
        if not bool(finite):
            raise NonFiniteLossError(
                f"the LoRA weights are non-finite at step {slot.global_step}; training stopped "
                f"before saving; {where}. Try a lower --learning_rate or --max_grad_norm"
            )

    # ------------------------------------------------------------------ validation

    @torch.no_grad()
    def validate(self, slot: Slot) -> list[Path]:
        """validation/step_N_i.png from --validation_prompt with the slot's LoRA, in one batch,
        through the project's sampler (sampling.py: host-free denoising loop, per-image CPU
        generators seeded from --seed as the stock pipeline's)."""
        args, frozen = self.args, self.frozen
        if not args.validation_prompt or args.num_validation_images == 0:
            return []
        folder = slot.identity.output_dir / "validation"
        count = args.num_validation_images
        seeds = [stable_seed(args.seed, "validation", i) for i in range(count)]
        negatives = [args.validation_negative_prompt] * count
        self.unet.eval()
        self.lora.select_everyone(slot.index)
        with frozen.autocast():
            images = generate_images(
                self.pipeline,
                self.validation_sampler,
                [args.validation_prompt] * count,
                negatives if args.validation_negative_prompt else None,
                seeds,
            )
        self.unet.train()
        paths = [folder / f"step_{slot.global_step}_{i}.png" for i in range(count)]
        for index, (image, path) in enumerate(zip(images, paths, strict=True)):
            atomic_save_image(image, path)
            if slot.writer is not None:
                slot.writer.add_image(
                    f"validation/{index}", np.asarray(image), slot.global_step, dataformats="HWC"
                )
        slot.last_validated = slot.global_step
        return paths

    # ------------------------------------------------------------------ logs and the end of a run

    def read_logs(self, slots: list[Slot]) -> dict[int, LogRead]:
        """What the log intervals and epoch logs due after this update print, for every slot
        due, gathered into one (K, F) tensor and read on the host at once (one device-to-host
        copy whatever the number of identities): watches, interval and epoch means, identity
        samples, learning rate."""
        due = [slot for slot in slots if slot.log_due() or slot.epoch_due()]
        if not due:
            return {}
        rows = slice(None)  # every slot's row (no index list copied to the device)
        parts = [
            self.watch.state(rows),
            self.grad_watch.state(rows),
            self.interval_means.means_of(rows),
            self.identity_samples[rows, None].double(),
            self.optimizer.param_groups[0]["lr"][rows, None].double(),
            self.epoch_means.steps[rows, None].double(),
            self.epoch_means.means_of(rows),
        ]
        values = torch.cat(parts, 1).tolist()  # the one read: (K, 26) floats
        return {slot.index: LogRead.of(values[slot.index]) for slot in due}

    def log_interval(self, slot: Slot, read: LogRead) -> None:
        """Check the slot's watches and write its interval means to TensorBoard and tqdm, from
        values read on the host (read_logs); its interval means start again."""
        where = kept_checkpoint(slot.identity)
        self.watch.raise_if_bad(where, read.watch)
        self.grad_watch.raise_if_bad(where, read.grad_watch)
        self.interval_means.reset(slot.index)
        means = dict(zip(TERM_NAMES, read.interval, strict=True))
        slot.identity_samples = int(read.identity_samples)
        lr = read.lr
        tags = slot.tags()
        postfix = {tag: f"{means[name]:.4g}" for name, tag in tags.items()}
        slot.progress.set_postfix(postfix | {"lr": f"{lr:.2e}"}, refresh=False)
        if slot.writer is None:
            return
        for name, tag in tags.items():
            slot.writer.add_scalar(f"train/{tag}", means[name], slot.global_step)
        slot.writer.add_scalar("train/lr", lr, slot.global_step)
        if self.args.loss != "dreambooth":
            slot.writer.add_scalar(
                "train/identity_samples", slot.identity_samples, slot.global_step
            )

    def log_epoch(self, slot: Slot, epoch: int, read: LogRead) -> None:
        if read.epoch_steps == 0:
            return
        self.watch.raise_if_bad(kept_checkpoint(slot.identity), read.watch)
        self.epoch_means.reset(slot.index)
        means = dict(zip(TERM_NAMES, read.epoch, strict=True))
        tags = slot.tags()
        text = ", ".join(f"{tag} {means[name]:.4g}" for name, tag in tags.items())
        logger.info("%s: epoch %d means: %s", slot.identity.name, epoch, text)
        if slot.writer is not None:
            for name, tag in tags.items():
                slot.writer.add_scalar(f"epoch/{tag}", means[name], epoch)

    def finish(self, slot: Slot) -> None:
        """Final validation, config and model card, then the LoRA (the 'finished' marker)."""
        self.check_finite(slot, f"no final LoRA written; {kept_checkpoint(slot.identity)}")
        slot.identity_samples = int(self.identity_samples[slot.index].item())
        if slot.last_validated != slot.global_step:
            self.validate(slot)
        slot.write_config(slot.identity.output_dir, "finished")
        slot.write_model_card()
        self.save_lora_of(slot, slot.identity.output_dir)
        seconds = time.time() - slot.started
        logger.info(
            "%s: finished %d steps in %.1f s", slot.identity.name, slot.global_step, seconds
        )
        result = {"identity": slot.identity.name, "steps": slot.global_step, "seconds": seconds}
        self.release(slot, result)

    @staticmethod
    def _close_outputs(slot: Slot) -> None:
        for output in (slot.progress, slot.writer):
            if output is not None:
                output.close()


@dataclass
class LogRead:
    """One slot's values for its log interval and epoch log, read on the host (read_logs)."""

    watch: list[float]  # NonFiniteWatch.state row of the loss terms
    grad_watch: list[float]  # ... of the gradient norm
    interval: list[float]  # interval means of TERM_NAMES
    identity_samples: float
    lr: float
    epoch_steps: float
    epoch: list[float]  # epoch means of TERM_NAMES

    @classmethod
    def of(cls, row: list[float]) -> LogRead:
        terms = len(TERM_NAMES)
        widths = [1 + terms, 2, terms, 1, 1, 1, terms]
        ends = np.cumsum(widths).tolist()
        parts = [row[end - width : end] for width, end in zip(widths, ends, strict=True)]
        watch, grad_watch, interval, samples, lr, steps, epoch = parts
        return cls(watch, grad_watch, interval, samples[0], lr[0], steps[0], epoch)


def term_means(device: torch.device, num_slots: int = 1) -> RunningMeans:
    """Running means of TERM_NAMES per slot; the identity criterion and weight over the samples
    that had the identity term."""
    return RunningMeans(
        TERM_NAMES, device, ("identity_criterion", "identity_weight"), "identity_count", num_slots
    )


def _progress_bar(trainer: PackedTrainer, slot: Slot):
    return runs.progress_bar(
        total=slot.max_train_steps,
        initial=slot.global_step,
        desc=f"[{trainer.state.process_index}] {slot.identity.name}",
        position=trainer.state.local_process_index * trainer.num_slots + slot.index,
        dynamic_ncols=True,
    )


def _make_writer(args: argparse.Namespace, folder: Path):
    """TensorBoard SummaryWriter in folder/--logging_dir, or None for --report_to none."""
    if args.report_to == "none":
        return None
    from torch.utils.tensorboard import SummaryWriter

    return SummaryWriter(log_dir=str(folder / args.logging_dir))


# ==================== models


def objective_config(args: argparse.Namespace, frozen: FrozenModels) -> ObjectiveConfig:
    """The objective's settings from the command line and the noise schedule."""
    return ObjectiveConfig(
        loss=args.loss,
        triplet_margin=args.triplet_margin,
        identity_weighting=args.identity_loss_weighting,
        prior_loss_weight=args.prior_loss_weight,
        num_train_timesteps=frozen.noise_scheduler.config.num_train_timesteps,
    )


@dataclass
class FrozenModels:
    """Everything that does not train, loaded once per process. SDXL adds a second text
    encoder and tokenizer (None for SD 1.x / 2.x)."""

    vae: Any
    text_encoder: Any
    tokenizer: Any
    noise_scheduler: Any
    arcface: torch.nn.Module | None
    device: torch.device
    mixed_precision: str
    architecture: Architecture
    text_encoder_2: Any = None
    tokenizer_2: Any = None

    @property
    def weight_dtype(self) -> torch.dtype:
        return WEIGHT_DTYPES[self.mixed_precision]

    def autocast(self) -> contextlib.AbstractContextManager:
        """Autocast to the weight dtype under mixed precision, else a no-op."""
        if self.mixed_precision == "no":
            return contextlib.nullcontext()
        return torch.autocast(self.device.type, dtype=self.weight_dtype)

    def vae_precision(self) -> contextlib.AbstractContextManager:
        """Where the VAE runs in its own dtype: autocast off for a VAE kept in fp32 because it
        overflows in fp16 (SDXL's), a no-op otherwise."""
        if self.vae.dtype == torch.float32 and self.mixed_precision != "no":
            return torch.autocast(self.device.type, enabled=False)
        return contextlib.nullcontext()


def hub_kwargs(args: argparse.Namespace) -> dict[str, Any]:
    return {"revision": args.revision, "variant": args.variant}


def place(model: torch.nn.Module, device: torch.device, dtype: torch.dtype) -> None:
    """Move and cast floating weights; torch's own Module.to, since diffusers' override warns
    about fp32-only modules on every cast even when there are none."""
    torch.nn.Module.to(model, device=device, dtype=dtype)


def load_vae(args: argparse.Namespace, architecture: Architecture) -> tuple[Any, Architecture]:
    """The base's VAE, or --pretrained_vae_model_name_or_path (e.g. an fp16-safe SDXL VAE,
    checked to share the base's latent space), and the architecture with that VAE's fp16
    safety (its config's force_upcast)."""
    from diffusers import AutoencoderKL

    base, source = args.pretrained_model_name_or_path, args.pretrained_vae_model_name_or_path
    if source:
        vae = load_vae_beside_base(source, base_vae_config(base, args.revision))
    else:
        vae = AutoencoderKL.from_pretrained(base, subfolder="vae", **hub_kwargs(args))
    upcast = architecture.is_sdxl and bool(vae.config.get("force_upcast", True))
    return vae, dataclasses.replace(architecture, vae_force_upcast=upcast)


def load_frozen_models(
    args: argparse.Namespace,
    device: torch.device,
    mixed_precision: str,
    arcface: torch.nn.Module | None,
) -> FrozenModels:
    """VAE, text encoder(s) (weight dtype, no grad), tokenizer(s), DDPM scheduler, ArcFace
    (fp32). A VAE that overflows in fp16 (SDXL's, architectures.py) stays fp32."""
    from diffusers import DDPMScheduler
    from transformers import CLIPTextModel, CLIPTokenizer

    base, dtype = args.pretrained_model_name_or_path, WEIGHT_DTYPES[mixed_precision]
    architecture = architecture_or_paper(base, args.revision)
    with runs.loading("the VAE and text encoder", base):
        vae, architecture = load_vae(args, architecture)
        text_encoder = CLIPTextModel.from_pretrained(
            base, subfolder="text_encoder", **hub_kwargs(args)
        )
        tokenizer = CLIPTokenizer.from_pretrained(
            base, subfolder="tokenizer", revision=args.revision
        )
        scheduler = DDPMScheduler.from_pretrained(
            base, subfolder="scheduler", revision=args.revision
        )
        second = load_second_text_encoder(args) if architecture.is_sdxl else (None, None)
    for model in (vae, text_encoder, second[0]):
        if model is not None:
            model.requires_grad_(False)
            model.eval()
            place(
                model,
                device,
                torch.float32 if model is vae and architecture.vae_force_upcast else dtype,
            )
    vae_note = ""
    if architecture.vae_force_upcast and dtype != torch.float32:
        vae_note = (
            "; its VAE overflows in fp16 (force_upcast) and decodes in fp32 (an fp16-safe VAE by "
            "--pretrained_vae_model_name_or_path saves memory)"
        )
    logger.info("base model %s: %s%s", base, architecture.describe(), vae_note)
    if args.gradient_checkpointing and args.loss != "dreambooth":
        vae.enable_gradient_checkpointing()  # the identity term backpropagates through decode
    if device.type == "cuda":
        use_channels_last(vae, *([arcface] if arcface is not None else []))
    return FrozenModels(
        vae=vae,
        text_encoder=text_encoder,
        tokenizer=tokenizer,
        noise_scheduler=scheduler,
        arcface=arcface,
        device=device,
        mixed_precision=mixed_precision,
        architecture=architecture,
        text_encoder_2=second[0],
        tokenizer_2=second[1],
    )


def load_second_text_encoder(args: argparse.Namespace) -> tuple[Any, Any]:
    """SDXL's second text encoder (OpenCLIP bigG with projection: the pooled embedding) and
    its tokenizer."""
    from transformers import CLIPTextModelWithProjection, CLIPTokenizer

    base = args.pretrained_model_name_or_path
    encoder = CLIPTextModelWithProjection.from_pretrained(
        base, subfolder="text_encoder_2", **hub_kwargs(args)
    )
    tokenizer = CLIPTokenizer.from_pretrained(base, subfolder="tokenizer_2", revision=args.revision)
    return encoder, tokenizer


def assemble_pipeline(frozen: FrozenModels, unet: torch.nn.Module):
    """A DDPM pipeline of the base's kind (StableDiffusionPipeline or, for SDXL,
    StableDiffusionXLPipeline) around the frozen parts and the training UNet."""
    from diffusers import DDPMScheduler, StableDiffusionPipeline, StableDiffusionXLPipeline

    parts = dict(
        vae=frozen.vae,
        text_encoder=frozen.text_encoder,
        tokenizer=frozen.tokenizer,
        unet=unet,
        scheduler=DDPMScheduler.from_config(frozen.noise_scheduler.config),
    )
    if frozen.architecture.is_sdxl:
        pipeline = StableDiffusionXLPipeline(
            **parts,
            text_encoder_2=frozen.text_encoder_2,
            tokenizer_2=frozen.tokenizer_2,
            add_watermarker=False,
        )
    else:
        pipeline = StableDiffusionPipeline(
            **parts, safety_checker=None, feature_extractor=None, requires_safety_checker=False
        )
    pipeline.set_progress_bar_config(disable=True)
    return pipeline


def use_channels_last(*modules: torch.nn.Module) -> None:
    """NHWC weights for the convolutions of the step's models (faster cuDNN kernels on GPUs)."""
    for module in modules:
        module.to(memory_format=torch.channels_last)


def compile_step_modules(
    frozen: FrozenModels, unet: torch.nn.Module, args: argparse.Namespace
) -> torch.nn.Module:
    """--compile: torch.compile every module of the step with static shapes (dynamic=False;
    a step's shapes only change for an epoch's short last batch): the VAE decoder and ArcFace
    in place in `frozen`, and the UNet, returned. The encoder stays eager (it runs ahead)."""
    compiled = partial(torch.compile, mode=args.compile_mode, dynamic=False)
    frozen.vae.decoder = compiled(frozen.vae.decoder)
    if frozen.arcface is not None:
        frozen.arcface = compiled(frozen.arcface)
    return compiled(unet)


def load_unet_with_slots(
    args: argparse.Namespace, device: torch.device, mixed_precision: str, num_slots: int = 1
) -> tuple[torch.nn.Module, BatchedLoRA]:
    """The base UNet (frozen, weight dtype, loaded once per process) with a batched LoRA of
    `num_slots` identities (fp32 factors, all zero until a slot is filled)."""
    from diffusers import UNet2DConditionModel

    base = args.pretrained_model_name_or_path
    with runs.loading("the UNet", base):
        unet = UNet2DConditionModel.from_pretrained(base, subfolder="unet", **hub_kwargs(args))
    unet.requires_grad_(False)
    lora = inject_batched_lora(
        unet, lora_target_modules(unet), num_slots, args.rank, args.lora_alpha
    )
    place(unet, device, WEIGHT_DTYPES[mixed_precision])
    for parameter in lora.parameters():  # fp16 grads cannot be unscaled: factors stay fp32
        parameter.data = parameter.data.float()
    if device.type == "cuda":
        use_channels_last(unet)
    if args.gradient_checkpointing:
        unet.enable_gradient_checkpointing()
    unet.train()
    return unet, lora


@dataclass
class PromptEmbeddings:
    """Text-encoder outputs of the two prompts, computed once: (1, L, D) each; SDXL adds the
    pooled text embedding of its second encoder, (1, P) each (None for SD 1.x / 2.x)."""

    instance: torch.Tensor
    class_: torch.Tensor
    instance_pooled: torch.Tensor | None = None
    class_pooled: torch.Tensor | None = None

    @classmethod
    @torch.no_grad()
    def encode(cls, frozen: FrozenModels, args: argparse.Namespace) -> PromptEmbeddings:
        """--instance_prompt and --class_prompt through the frozen text encoder(s), once."""
        prompts = (args.instance_prompt, args.class_prompt)
        if frozen.text_encoder_2 is None:
            return cls(*(encode_text(frozen, prompt) for prompt in prompts))
        (instance, instance_pooled), (class_, class_pooled) = (
            encode_text_sdxl(frozen, prompt) for prompt in prompts
        )
        return cls(instance, class_, instance_pooled, class_pooled)

    def for_rows(self, is_prior: torch.Tensor) -> torch.Tensor:
        """(B, L, D) conditioning: the class prompt for prior rows, the instance prompt else."""
        return torch.where(is_prior[:, None, None], self.class_, self.instance)

    def unet_conditioning(self, batch: PackedBatch) -> dict[str, Any]:
        """The UNet's conditioning keyword arguments for the batch's rows: the text
        (`encoder_hidden_states`) and, for SDXL, `sdxl_added_conditioning`."""
        conditioning = {"encoder_hidden_states": self.for_rows(batch.is_prior)}
        if self.instance_pooled is not None:
            conditioning["added_cond_kwargs"] = self.sdxl_added_conditioning(batch)
        return conditioning

    def sdxl_added_conditioning(self, batch: PackedBatch) -> dict[str, torch.Tensor]:
        """SDXL's added conditioning per row, as diffusers' SDXL DreamBooth-LoRA example builds
        it: `text_embeds` (B, P) the pooled embedding of the row's prompt, `time_ids` (B, 6) the
        original size, crop top-left and target size of the row's crop (`crop_time_ids`)."""
        pooled = torch.where(batch.is_prior[:, None], self.class_pooled, self.instance_pooled)
        return {"text_embeds": pooled, "time_ids": batch.time_ids}


@torch.no_grad()
def encode_text(frozen: FrozenModels, prompt: str) -> torch.Tensor:
    """(1, L, D) last hidden state of the frozen text encoder."""
    tokens = frozen.tokenizer(
        prompt,
        padding="max_length",
        max_length=frozen.tokenizer.model_max_length,
        truncation=True,
        return_tensors="pt",
    )
    return frozen.text_encoder(tokens.input_ids.to(frozen.device))[0]


@torch.no_grad()
def encode_text_sdxl(frozen: FrozenModels, prompt: str) -> tuple[torch.Tensor, torch.Tensor]:
    """SDXL's text conditioning as its pipeline's encode_prompt: the penultimate hidden states of
    both encoders side by side, (1, L, D1 + D2), and the second encoder's pooled (projected)
    embedding, (1, P)."""
    hidden_states = []
    for tokenizer, encoder in (
        (frozen.tokenizer, frozen.text_encoder),
        (frozen.tokenizer_2, frozen.text_encoder_2),
    ):
        tokens = tokenizer(
            prompt,
            padding="max_length",
            max_length=tokenizer.model_max_length,
            truncation=True,
            return_tensors="pt",
        )
        output = encoder(tokens.input_ids.to(frozen.device), output_hidden_states=True)
        hidden_states.append(output.hidden_states[-2])
    return torch.cat(hidden_states, dim=-1), output[0]


def crop_time_ids(dataset: DreamBoothFaceDataset, crops: list[Any]) -> torch.Tensor:
    """(B, 6) float32 SDXL size/crop ids of each crop, as diffusers' SDXL DreamBooth example:
    original photo size (h, w), crop top-left (top, left) in the resized photo, target (R, R).
    The random crop changes the crop coordinates from epoch to epoch."""
    size = dataset.resolution
    rows = [(*dataset.original_size(crop), crop.top, crop.left, size, size) for crop in crops]
    return torch.tensor(rows, dtype=torch.float32)


# ==================== data


@dataclass
class FaceTools:
    """Landmark detector + frozen ArcFace encoder shared by every identity of a process."""

    detector: Any
    encoder: torch.nn.Module


def load_face_tools(args: argparse.Namespace, device: torch.device) -> FaceTools:
    """Detector per --face_detector and the frozen ArcFace encoder (fp32) on device."""
    detector = build_face_detector(args.face_detector, args.face_models_root)
    return FaceTools(detector, load_arcface(args.arcface_weights, device=device))


def build_dataset(
    args: argparse.Namespace,
    instance_dir: Path,
    face_tools: FaceTools | None,
    class_photos: Any = None,
) -> DreamBoothFaceDataset:
    """Face-annotated dataset when ArcFace is given (every loss trains on the same photos),
    else plain DreamBooth (every readable photo); crops are seeded from --seed. `class_photos`:
    another identity's class photos (the class folder is the same for every identity)."""
    return DreamBoothFaceDataset(
        instance_dir,
        face_tools.detector if face_tools is not None else None,
        face_tools.encoder if face_tools is not None else None,
        class_folder=args.class_data_dir if args.with_prior_preservation else None,
        max_class_images=args.num_class_images,
        resolution=args.resolution,
        center_crop=args.center_crop,
        seed=args.seed,
        class_photos=class_photos,
    )


# ==================== settings: what may change on resume, and the schedule


# Arguments that MAY differ between a checkpoint and the run resuming it: where outputs and logs
# go, how often they are written, worker counts, and paths whose content is compared instead.
# Every other argument, including any added later, must match (a changed optimizer setting
# would otherwise be silently overridden by the restored optimizer state).
RESUME_MAY_CHANGE = frozenset(
    "output_dir overwrite resume_from_checkpoint logging_dir report_to logging_steps "  # noqa: SIM905
    "checkpointing_steps checkpoints_total_limit validation_prompt validation_negative_prompt "
    "validation_steps num_validation_images validation_num_inference_steps "
    "validation_guidance_scale dataloader_num_workers gradient_checkpointing allow_tf32 "
    "pack compile compile_mode "
    # compared through the resolved max_train_steps:
    "num_train_epochs max_train_steps "
    # paths and class-image sampling: the photos are compared through the data summary
    "instance_data_dir identities_root class_data_dir sample_batch_size class_image_format "
    "class_num_inference_steps prior_generation_precision face_models_root "
    # compared by content (the encoder's name holds a sha256 prefix of the weights):
    "arcface_weights".split()
)


# Resolved values that must match: total steps (--max_train_steps or --num_train_epochs; the
# schedule depends on it), steps per epoch (the data order) and the precision actually used.
RESUME_RESOLVED_KEYS = ("max_train_steps", "steps_per_epoch", "mixed_precision")


# Data counts that must match (a changed photo set re-pairs instance and class images).
RESUME_DATA_KEYS = (
    "instance_images",
    "class_images",
    "class_images_with_face",
    "instance_sha256",  # the photos by content: another person's photos never resume a run
    "class_sha256",
)


def resume_mismatches(saved: dict[str, Any], current: dict[str, Any]) -> list[str]:
    """Differences that forbid resuming, between a checkpoint's training_config.json and the
    resuming run's config: every argument except RESUME_MAY_CHANGE (one present on only one
    side counts as changed), RESUME_RESOLVED_KEYS, RESUME_DATA_KEYS, the ArcFace weights by
    content (their name holds a sha256 prefix) and the base model by content
    (runs.base_model_fingerprint). The one rule for resuming a checkpoint and for keeping a
    finished identity (finished_mismatches)."""
    resolved = {key: current["resolved"].get(key) for key in RESUME_RESOLVED_KEYS}
    data = {key: current["data"].get(key) for key in RESUME_DATA_KEYS}
    saved_resolved = {key: saved.get("resolved", {}).get(key) for key in RESUME_RESOLVED_KEYS}
    saved_data = {key: saved.get("data", {}).get(key) for key in RESUME_DATA_KEYS}
    changed = runs.config_mismatches(saved["args"], current["args"], RESUME_MAY_CHANGE)
    changed += runs.config_mismatches(saved_resolved, resolved, ())
    changed += runs.config_mismatches(saved_data, data, (), "data ")
    for key, label in (("arcface", "ArcFace "), ("base_model", "base model ")):
        changed += runs.config_mismatches({key: saved.get(key)}, {key: current.get(key)}, (), label)
    return changed


# What a new identity may differ in from the finished identities of its output folder: the
# resume allow-list, but the step counts compared as given (resume compares them through the
# resolved schedule, which depends on each identity's photo count).
OUTPUT_ROOT_MAY_CHANGE = RESUME_MAY_CHANGE - {"num_train_epochs", "max_train_steps"}


def output_root_mismatches(saved: dict[str, Any], current: dict[str, Any]) -> list[str]:
    """Differences between a finished identity's training_config.json and the settings of a
    run that would train another identity into the same output folder: resume's rule
    (resume_mismatches) less what belongs to one identity (its photos and step schedule)."""
    changed = runs.config_mismatches(saved["args"], current["args"], OUTPUT_ROOT_MAY_CHANGE)
    saved_precision = saved.get("resolved", {}).get("mixed_precision")
    changed += runs.config_mismatches(
        {"mixed_precision": saved_precision}, {"mixed_precision": current["mixed_precision"]}, ()
    )
    for key, label in (("arcface", "ArcFace "), ("base_model", "base model ")):
        changed += runs.config_mismatches({key: saved.get(key)}, {key: current.get(key)}, (), label)
    return changed


def finished_mismatches(
    identity: Identity,
    args: argparse.Namespace,
    face_tools: FaceTools | None,
    mixed_precision: str,
    base_model: str,
    class_photos: Any = None,
) -> tuple[list[str], Any]:
    """(differences, class photos) between a finished identity's training_config.json and
    this run's settings for it, by resume's rule (resume_mismatches): its photos are scanned
    (face annotations come from the cache) but no model is loaded. A missing or unreadable
    config is one difference: the LoRA's settings cannot be checked."""
    path = identity.output_dir / CONFIG_NAME
    try:
        saved = json.loads(path.read_text())
        saved["args"]  # noqa: B018 (a config without arguments cannot be compared)
    except (OSError, ValueError, TypeError, KeyError) as error:
        return [f"{CONFIG_NAME} unreadable ({type(error).__name__}: {error})"], class_photos
    dataset = build_dataset(args, identity.instance_dir, face_tools, class_photos)
    updates_per_epoch, max_train_steps = schedule_lengths(args, len(dataset))
    current = {
        "args": runs.json_safe(vars(args)),
        "resolved": {
            "max_train_steps": max_train_steps,
            "steps_per_epoch": updates_per_epoch,
            "mixed_precision": mixed_precision,
        },
        "data": dataset.summary(),
        "arcface": face_tools.encoder.name if face_tools is not None else None,
        "base_model": base_model,
    }
    return resume_mismatches(saved, current), dataset.classes


def schedule_lengths(args: argparse.Namespace, num_items: int) -> tuple[int, int]:
    """(optimizer updates per epoch, total updates) of an identity whose dataset has
    `num_items` items: --max_train_steps, else --num_train_epochs epochs; ValueError beyond
    MAX_TRAIN_STEPS (before its learning-rate table is built)."""
    batches_per_epoch = math.ceil(num_items / args.train_batch_size)
    updates_per_epoch = math.ceil(batches_per_epoch / args.gradient_accumulation_steps)
    total = args.max_train_steps or args.num_train_epochs * updates_per_epoch
    if total > MAX_TRAIN_STEPS:
        raise ValueError(
            f"--num_train_epochs {args.num_train_epochs} x {updates_per_epoch} steps per epoch "
            f"is {total} steps, more than {MAX_TRAIN_STEPS}; pass --max_train_steps"
        )
    return updates_per_epoch, total


def learning_rate_table(args: argparse.Namespace, total_steps: int) -> torch.Tensor:
    """(total_steps + 1,) float64 learning rate of update u under --lr_scheduler (diffusers')."""
    learning_rate = args.learning_rate
    if args.scale_lr:
        learning_rate *= args.train_batch_size * args.gradient_accumulation_steps
    return schedule_table(
        args.lr_scheduler,
        learning_rate,
        total_steps,
        num_warmup_steps=args.lr_warmup_steps,
        num_cycles=args.lr_num_cycles,
        power=args.lr_power,
    )


# ==================== outputs


def kept_checkpoint(identity: Identity) -> str:
    """What a stopped run leaves to resume from: its newest checkpoint, or that it has none."""
    checkpoints = runs.list_checkpoints(identity.output_dir, TRAINING_STATE_NAME)
    return f"checkpoint {checkpoints[-1][1]} kept" if checkpoints else "no checkpoint written yet"


def clear_outputs(identity: Identity, logging_dir: str) -> None:
    """Delete what an earlier run wrote for this identity (used by --overwrite)."""
    files = (LORA_WEIGHTS_NAME, CONFIG_NAME, "README.md")
    folders = [path for _, path in runs.list_checkpoints(identity.output_dir, TRAINING_STATE_NAME)]
    runs.delete_outputs(identity.output_dir, files, [*folders, "validation", logging_dir])
