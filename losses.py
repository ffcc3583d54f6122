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


def x0_estimate(
    sample: torch.Tensor,
    model_output: torch.Tensor,
    sqrt_abar: torch.Tensor,
    sqrt_one_minus_abar: torch.Tensor,
    prediction_type: str,
) -> torch.Tensor:
    """x0 from x_t = sqrt(abar) x0 + sqrt(1 - abar) eps and the model output: the one formula
    training (predict_x0) and sampling (sampling.py's updates) share.

    epsilon: (x_t - sqrt(1-abar) eps) / sqrt(abar); v (Salimans & Ho 2022, v = sqrt(abar) eps -
    sqrt(1-abar) x0): sqrt(abar) x_t - sqrt(1-abar) v; sample: the output itself.
    """
    if prediction_type == "epsilon":
        return (sample - sqrt_one_minus_abar * model_output) / sqrt_abar
    if prediction_type == "sample":
        return model_output
    return sqrt_abar * sample - sqrt_one_minus_abar * model_output


def predict_x0(
    noisy_latents: torch.Tensor,
    model_pred: torch.Tensor,
    timesteps: torch.Tensor,
    alphas_cumprod: torch.Tensor,
    prediction_type: str,
) -> torch.Tensor:
    """x0_hat of a training step (x0_estimate at each sample's timestep).

    Computed in float32, returned in model_pred's dtype; differentiable w.r.t. model_pred.
    """
    _check_prediction_type(prediction_type)
    abar = alphas_cumprod.to(device=noisy_latents.device, dtype=torch.float32)[timesteps]
    sqrt_abar = _per_sample(abar.sqrt(), noisy_latents)  # (B, 1, 1, 1)
    sqrt_one_minus_abar = _per_sample((1.0 - abar).sqrt(), noisy_latents)
    x0 = x0_estimate(
        noisy_latents.float(), model_pred.float(), sqrt_abar, sqrt_one_minus_abar, prediction_type
    )
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


def masked_mean(values: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """Mean of values[mask] over the last dim (0 when nothing is selected): (..., n), (..., n)
    bool -> (...). A masked-out value never enters the mean, not even as 0 * NaN; no host sync
    (no boolean indexing)."""
    selected = torch.where(mask, values, torch.zeros_like(values))
    return selected.sum(-1) / mask.sum(-1).clamp_min(1)


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
    mask: torch.Tensor,
    groups: int | None = None,
) -> dict[str, torch.Tensor]:
    """The identity TERM_NAMES of one identity's batch, scalars; or of S identities at once,
    (S,), with `groups=S` (rows identity-major, n / S each).

    anchor (n, D) = E(x0_hat) of the instance samples; positive (n, D) = e_inst; negative
    (n, D) = e_prior of the paired prior samples (triplet only); timesteps (n,); mask (n,)
    bool: the samples that have the term (M).
    """
    per_sample = IDENTITY_LOSSES[config.loss](anchor, positive, negative, config.triplet_margin)
    weight = IDENTITY_WEIGHTINGS[config.identity_weighting](timesteps, config.num_train_timesteps)
    if groups is not None:  # (S, n / S): each identity's rows on a row
        per_sample, weight, mask = (t.view(groups, -1) for t in (per_sample, weight, mask))
    return {
        "identity_term": masked_mean(weight * per_sample, mask),
        "identity_criterion": masked_mean(per_sample, mask),
        "identity_weight": masked_mean(weight, mask),
        "identity_count": mask.sum(-1).float(),
    }


def objective(
    config: ObjectiveConfig,
    sample_losses: torch.Tensor,
    is_prior: torch.Tensor,
    identity: dict[str, torch.Tensor] | None = None,
) -> dict[str, torch.Tensor]:
    """Every TERM_NAMES value of one identity's batch, scalars (or of S identities of equal
    batches at once: (S, B / S) rows in, (S,) terms out).

    sample_losses (B,) = per-sample diffusion MSE (sample_mse); is_prior (B,) bool. loss = mean
    of the instance losses + w_prior * mean of the prior losses (DreamBooth, Ruiz et al. 2023,
    Eq. 2) + the identity term (identity_terms; absent for plain DreamBooth).
    """
    diffusion = masked_mean(sample_losses, ~is_prior)
    prior = masked_mean(sample_losses, is_prior)
    zero = torch.zeros_like(diffusion)
    terms = {"diffusion_loss": diffusion, "prior_loss": prior}
    terms |= dict.fromkeys(TERM_NAMES[3:], zero) | (identity or {})
    terms["loss"] = diffusion + config.prior_loss_weight * prior + terms["identity_term"]
    return terms


def objective_of_each(
    config: ObjectiveConfig,
    sample_losses: torch.Tensor,
    is_prior: torch.Tensor,
    sizes: list[int],
    identity_rows: dict[str, torch.Tensor] | None = None,
    instance_sizes: list[int] | None = None,
) -> dict[str, torch.Tensor]:
    """The objective of each identity of a packed batch on its own rows: (S,) per term.

    Rows are identity-major: identity s holds sizes[s] consecutive rows of sample_losses and
    is_prior (B,), and instance_sizes[s] consecutive rows of each identity_rows tensor
    (identity_terms' arguments by name, (n, ...)). The packed loss sum_s loss_s gives each
    identity's LoRA exactly the gradient of a run of it alone. When every identity has the
    same row counts (a pack's usual step), all are computed at once on (S, rows) views.
    """
    count = len(sizes)
    if len(set(sizes)) == 1 and (identity_rows is None or len(set(instance_sizes)) == 1):
        identity = None
        if identity_rows is not None:
            identity = identity_terms(config, **identity_rows, groups=count)
        terms = objective(config, sample_losses.view(count, -1), is_prior.view(count, -1), identity)
        return {name: terms[name] for name in TERM_NAMES}
    losses_of, priors_of = sample_losses.split(sizes), is_prior.split(sizes)
    parts = (
        {}
        if identity_rows is None
        else {name: rows.split(instance_sizes) for name, rows in identity_rows.items()}
    )
    terms = []
    for s in range(len(sizes)):
        identity = identity_terms(config, **{n: p[s] for n, p in parts.items()}) if parts else None
        terms.append(objective(config, losses_of[s], priors_of[s], identity))
    return {name: torch.stack([each[name] for each in terms]) for name in TERM_NAMES}
