"""The ID-Booth training objective: DreamBooth prior preservation plus an identity term.

Paper: Tomasevic et al., "ID-Booth: Identity-consistent Face Generation with Diffusion Models",
FG 2025 (https://arxiv.org/abs/2504.07392), Sec. 3; reference code:
https://github.com/dariant/ID-Booth. Per batch [instance..., prior...]:

    dreambooth: L = MSE(eps_hat_inst, eps) + w_prior * MSE(eps_hat_prior, eps_prior)
    identity:   L + mean_i w(t_i) * (1 - cos(a_i, e_inst_i))               (PortraitBooth)
    triplet:    L + mean_{i in M} w(t_i) * max(d(a_i, e_inst_i) - d(a_i, e_prior_i) + m, 0)

with a_i the ArcFace embedding of the decoded one-step estimate x0_hat of instance sample i,
d = 1 - cos, w(t) = (1 - t/T)^2, and M the instance samples that have the term (the triplet
needs a face in the paired prior image). DreamBooth: Ruiz et al., CVPR 2023, Eq. 2;
PortraitBooth: Peng et al., CVPR 2024, identity loss (Sec. 3.2).

Shapes: latents (B, C, h, w); timesteps (B,) long; embeddings (B, D). Every function is
batched over the whole batch and free of host syncs (no .item(), no branching on values),
so it can sit inside a compiled / accelerated training step.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import torch
import torch.nn.functional as F

PREDICTION_TYPES = ("epsilon", "v_prediction")


def _per_sample(values: torch.Tensor, like: torch.Tensor) -> torch.Tensor:
    """Reshape (B,) values to (B, 1, ..., 1) so they broadcast against `like`."""
    return values.reshape(values.shape[0], *([1] * (like.dim() - 1)))


def _check_prediction_type(prediction_type: str) -> None:
    """Raise ValueError naming the options when `prediction_type` is unknown."""
    if prediction_type not in PREDICTION_TYPES:
        raise ValueError(
            f"unknown prediction_type {prediction_type!r}; options: {', '.join(PREDICTION_TYPES)}"
        )


def _epsilon_target(noise, latents, timesteps, scheduler) -> torch.Tensor:
    """target = eps."""
    return noise


def _velocity_target(noise, latents, timesteps, scheduler) -> torch.Tensor:
    """target = v = sqrt(abar_t) * eps - sqrt(1 - abar_t) * x0 (scheduler.get_velocity)."""
    return scheduler.get_velocity(latents, noise, timesteps)


DIFFUSION_TARGETS: dict[str, Callable[..., torch.Tensor]] = {
    "epsilon": _epsilon_target,
    "v_prediction": _velocity_target,
}


def diffusion_target(
    noise: torch.Tensor, latents: torch.Tensor, timesteps: torch.Tensor, scheduler
) -> torch.Tensor:
    """Regression target of the UNet: eps (epsilon) or sqrt(abar)*eps - sqrt(1-abar)*x0 (v)."""
    prediction_type = scheduler.config.prediction_type
    _check_prediction_type(prediction_type)
    return DIFFUSION_TARGETS[prediction_type](noise, latents, timesteps, scheduler)


def prior_preservation_loss(
    model_pred: torch.Tensor,
    target: torch.Tensor,
    num_instance: int,
    prior_loss_weight: float,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """loss = MSE(pred[:n], tgt[:n]) + w_prior * MSE(pred[n:], tgt[n:]); batch = [inst, prior].

    Returns (loss, instance_loss, prior_loss); prior_loss is 0 when the batch has no prior part.
    MSEs are computed in float32 (as diffusers' DreamBooth does under mixed precision).
    """
    batch_size = model_pred.shape[0]
    if model_pred.shape != target.shape:
        raise ValueError(f"model_pred {tuple(model_pred.shape)} != target {tuple(target.shape)}")
    if not 1 <= num_instance <= batch_size:
        raise ValueError(f"num_instance must be in [1, {batch_size}], got {num_instance}")
    pred, tgt = model_pred.float(), target.float()
    instance_loss = F.mse_loss(pred[:num_instance], tgt[:num_instance], reduction="mean")
    if num_instance == batch_size:
        prior_loss = instance_loss.new_zeros(())
    else:
        prior_loss = F.mse_loss(pred[num_instance:], tgt[num_instance:], reduction="mean")
    loss = instance_loss + prior_loss_weight * prior_loss
    return loss, instance_loss, prior_loss


def predict_x0(
    noisy_latents: torch.Tensor,
    model_pred: torch.Tensor,
    timesteps: torch.Tensor,
    alphas_cumprod: torch.Tensor,
    prediction_type: str,
) -> torch.Tensor:
    """x0_hat = (x_t - sqrt(1-abar_t) eps) / sqrt(abar_t)  or  sqrt(abar_t) x_t - sqrt(1-abar_t) v.

    Computed in float32, returned in model_pred's dtype; differentiable w.r.t. model_pred.
    """
    _check_prediction_type(prediction_type)
    abar = alphas_cumprod.to(device=noisy_latents.device, dtype=torch.float32)[timesteps]
    sqrt_abar = _per_sample(abar.sqrt(), noisy_latents)  # (B, 1, 1, 1)
    sqrt_one_minus_abar = _per_sample((1.0 - abar).sqrt(), noisy_latents)
    x_t, pred = noisy_latents.float(), model_pred.float()
    if prediction_type == "epsilon":
        x0 = (x_t - sqrt_one_minus_abar * pred) / sqrt_abar
    else:
        x0 = sqrt_abar * x_t - sqrt_one_minus_abar * pred
    return x0.to(model_pred.dtype)


def timestep_weight(timesteps: torch.Tensor, num_train_timesteps: int = 1000) -> torch.Tensor:
    """w(t) = (1 - t / T)^2, float32 (B,); 1 at t = 0, ~0 at t = T - 1."""
    return (1.0 - timesteps.float() / num_train_timesteps) ** 2


def _check_embeddings(anchor: torch.Tensor, *others: torch.Tensor) -> None:
    """Raise ValueError unless every embedding batch has the anchor's (B, D) shape."""
    for other in others:
        if anchor.dim() != 2 or other.shape != anchor.shape:
            raise ValueError(
                f"embeddings must all be (B, D) of one shape; got {tuple(anchor.shape)} "
                f"and {tuple(other.shape)}"
            )


# The reference's epsilons (they only matter for near-zero embeddings): its identity loss
# uses torch.nn.CosineSimilarity(dim=1, eps=1e-6), its triplet distance F.cosine_similarity's
# default 1e-8.
IDENTITY_COSINE_EPS = 1e-6
TRIPLET_COSINE_EPS = 1e-8


def cosine_distance(
    a: torch.Tensor, b: torch.Tensor, eps: float = TRIPLET_COSINE_EPS
) -> torch.Tensor:
    """d(a, b) = 1 - cos(a, b) row-wise (norms clamped to >= eps): (B, D), (B, D) -> (B,)."""
    return 1.0 - F.cosine_similarity(a, b, dim=-1, eps=eps)


def cosine_identity_loss(anchor: torch.Tensor, positive: torch.Tensor) -> torch.Tensor:
    """L_id = 1 - cos(E(x0_hat), e_inst) per sample (B,); gradients reach only the anchor."""
    _check_embeddings(anchor, positive)
    return cosine_distance(anchor, positive.detach(), eps=IDENTITY_COSINE_EPS)


def triplet_identity_loss(
    anchor: torch.Tensor,
    positive: torch.Tensor,
    negative: torch.Tensor,
    margin: float = 1.0,
) -> torch.Tensor:
    """L_tri = max(d(a, p) - d(a, n) + margin, 0), d = 1 - cos, per sample (B,); grads to a only.

    positive / negative are precomputed embeddings (e_inst, e_prior): they are detached here so
    the loss can only move the anchor E(x0_hat).
    """
    _check_embeddings(anchor, positive, negative)
    if margin < 0:
        raise ValueError(f"margin must be >= 0 (the paper uses 1.0), got {margin}")
    d_pos = cosine_distance(anchor, positive.detach())
    d_neg = cosine_distance(anchor, negative.detach())
    return torch.clamp_min(d_pos - d_neg + margin, 0.0)


# ============================================================================ the objective

LOSS_KINDS = ("dreambooth", "identity", "triplet")
# Scalars the objective returns, in this order when stacked (logging, NaN watch).
TERM_NAMES = (
    "loss",
    "diffusion_loss",
    "prior_loss",
    "identity_criterion",  # mean over M of the unweighted per-sample identity loss
    "identity_term",  # mean over M of w(t_i) * criterion_i: what is added to the loss
    "identity_weight",  # mean over M of w(t_i)
    "identity_count",  # |M|: instance samples of the batch that had the identity term
)


def _cosine_per_sample(anchor, positive, negative, margin: float) -> torch.Tensor:
    """PortraitBooth-style 1 - cos(a, p), (n,)."""
    return cosine_identity_loss(anchor, positive)


def _triplet_per_sample(anchor, positive, negative, margin: float) -> torch.Tensor:
    """ID-Booth max(d(a, p) - d(a, n) + m, 0), (n,)."""
    return triplet_identity_loss(anchor, positive, negative, margin)


IDENTITY_LOSSES: dict[str, Callable[..., torch.Tensor]] = {
    "identity": _cosine_per_sample,
    "triplet": _triplet_per_sample,
}
IDENTITY_WEIGHTINGS: dict[str, Callable[[torch.Tensor, int], torch.Tensor]] = {
    "timestep": timestep_weight,
    "none": lambda timesteps, num_train_timesteps: torch.ones_like(timesteps, dtype=torch.float32),
}


@dataclass(frozen=True)
class ObjectiveConfig:
    """Settings of the objective (defaults: the paper's reference setup)."""

    loss: str = "triplet"  # one of LOSS_KINDS
    triplet_margin: float = 1.0
    identity_weighting: str = "timestep"  # one of IDENTITY_WEIGHTINGS
    prior_loss_weight: float = 1.0
    num_train_timesteps: int = 1000

    def __post_init__(self) -> None:
        if self.loss not in LOSS_KINDS:
            raise ValueError(f"unknown loss {self.loss!r}; options: {', '.join(LOSS_KINDS)}")
        if self.identity_weighting not in IDENTITY_WEIGHTINGS:
            raise ValueError(
                f"unknown identity weighting {self.identity_weighting!r}; options: "
                f"{', '.join(IDENTITY_WEIGHTINGS)}"
            )

    @property
    def has_identity_term(self) -> bool:
        return self.loss != "dreambooth"


def group_means(values: torch.Tensor, members: torch.Tensor) -> torch.Tensor:
    """(n,) values, (S, n) bool membership -> (S,) mean of each group's members (0 for an empty
    group). A non-member's value never enters a group's mean, not even as 0 * NaN."""
    selected = torch.where(members, values[None, :], torch.zeros_like(values)[None, :])
    return selected.sum(1) / members.sum(1).clamp_min(1)


def sample_mse(model_pred: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    """Per-sample MSE in float32 (as diffusers' DreamBooth under mixed precision): (B,)."""
    if model_pred.shape != target.shape:
        raise ValueError(f"model_pred {tuple(model_pred.shape)} != target {tuple(target.shape)}")
    return (model_pred.float() - target.float()).square().flatten(1).mean(1)


def identity_terms(
    config: ObjectiveConfig,
    anchor: torch.Tensor,
    positive: torch.Tensor,
    negative: torch.Tensor | None,
    timesteps: torch.Tensor,
    members: torch.Tensor,
) -> dict[str, torch.Tensor]:
    """The identity TERM_NAMES of each identity: (S,) each.

    anchor (n, D) = E(x0_hat) of the instance samples; positive (n, D) = e_inst; negative
    (n, D) = e_prior of the paired prior samples (triplet only); timesteps (n,); members (S, n)
    bool: instance sample i counts for identity s (its identity, and it has the term).
    """
    per_sample = IDENTITY_LOSSES[config.loss](anchor, positive, negative, config.triplet_margin)
    weight = IDENTITY_WEIGHTINGS[config.identity_weighting](timesteps, config.num_train_timesteps)
    return {
        "identity_term": group_means(weight * per_sample, members),
        "identity_criterion": group_means(per_sample, members),
        "identity_weight": group_means(weight, members),
        "identity_count": members.sum(1).float(),
    }


def objective(
    config: ObjectiveConfig,
    sample_losses: torch.Tensor,
    is_prior: torch.Tensor,
    members: torch.Tensor,
    identity: dict[str, torch.Tensor] | None = None,
) -> dict[str, torch.Tensor]:
    """Every TERM_NAMES value of each identity of a packed batch: (S,) each.

    sample_losses (B,) = per-sample diffusion MSE (sample_mse); is_prior (B,) bool; members
    (S, B) bool = which samples are identity s's. loss_s = mean of s's instance losses +
    w_prior * mean of its prior losses (DreamBooth, Ruiz et al. 2023, Eq. 2) + its identity
    term (identity_terms). The packed loss is sum_s loss_s: each identity's LoRA gets exactly
    the gradient its own run would.
    """
    diffusion = group_means(sample_losses, members & ~is_prior[None, :])
    prior = group_means(sample_losses, members & is_prior[None, :])
    zero = torch.zeros_like(diffusion)
    terms = {"diffusion_loss": diffusion, "prior_loss": prior}
    terms |= dict.fromkeys(TERM_NAMES[3:], zero) | (identity or {})
    terms["loss"] = diffusion + config.prior_loss_weight * prior + terms["identity_term"]
    return terms
