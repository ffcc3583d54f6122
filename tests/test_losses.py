"""losses.py against independent references: torch's own losses, diffusers' scheduler, formulas."""

import pytest
import torch
import torch.nn.functional as F
from diffusers import DDPMScheduler

from losses import (
    cosine_identity_loss,
    diffusion_target,
    predict_x0,
    prior_preservation_loss,
    timestep_weight,
    triplet_identity_loss,
)


def _sd_scheduler(prediction_type: str) -> DDPMScheduler:
    """SD-2.1-style DDPM scheduler (scaled_linear 0.00085..0.012, 1000 steps)."""
    return DDPMScheduler(
        num_train_timesteps=1000,
        beta_start=0.00085,
        beta_end=0.012,
        beta_schedule="scaled_linear",
        prediction_type=prediction_type,
    )


def _embeddings(seed: int, batch: int = 8, dim: int = 512) -> tuple[torch.Tensor, ...]:
    generator = torch.Generator().manual_seed(seed)
    return tuple(torch.randn(batch, dim, generator=generator) for _ in range(3))


def _torch_triplet(margin: float) -> torch.nn.TripletMarginWithDistanceLoss:
    return torch.nn.TripletMarginWithDistanceLoss(
        distance_function=lambda a, b: 1.0 - F.cosine_similarity(a, b), margin=margin
    )


@pytest.mark.parametrize("margin", [0.05, 0.2, 0.5, 1.0, 2.5])
@pytest.mark.parametrize("seed", [0, 1, 2])
def test_triplet_matches_torch(margin: float, seed: int) -> None:
    anchor, positive, negative = _embeddings(seed)
    ours = triplet_identity_loss(anchor, positive, negative, margin=margin)
    assert ours.shape == (8,)
    expected = _torch_triplet(margin)(anchor, positive, negative)
    torch.testing.assert_close(ours.mean(), expected, rtol=1e-6, atol=1e-6)
    per_sample = torch.nn.TripletMarginWithDistanceLoss(
        distance_function=lambda a, b: 1.0 - F.cosine_similarity(a, b),
        margin=margin,
        reduction="none",
    )(anchor, positive, negative)
    torch.testing.assert_close(ours, per_sample, rtol=1e-6, atol=1e-6)


def test_triplet_default_margin_is_one() -> None:
    anchor, positive, negative = _embeddings(3)
    torch.testing.assert_close(
        triplet_identity_loss(anchor, positive, negative).mean(),
        _torch_triplet(1.0)(anchor, positive, negative),
    )


def test_triplet_zero_margin_and_negative_margin() -> None:
    """torch refuses margin 0; ours allows it (plain hinge) and refuses a negative margin."""
    anchor, positive, negative = _embeddings(9)
    d_pos = 1.0 - F.cosine_similarity(anchor, positive)
    d_neg = 1.0 - F.cosine_similarity(anchor, negative)
    torch.testing.assert_close(
        triplet_identity_loss(anchor, positive, negative, margin=0.0), (d_pos - d_neg).clamp_min(0)
    )
    with pytest.raises(ValueError, match="margin"):
        triplet_identity_loss(anchor, positive, negative, margin=-0.1)


def test_triplet_zero_loss_case() -> None:
    """Anchor on the positive and opposite the negative: d_p - d_n + m = 0 - 2 + 1 < 0 -> 0."""
    _, positive, _ = _embeddings(4)
    anchor = positive * 3.0  # same direction, different norm: cosine ignores norm
    negative = -positive
    ours = triplet_identity_loss(anchor, positive, negative, margin=1.0)
    torch.testing.assert_close(ours, torch.zeros(8), atol=1e-6, rtol=0)
    torch.testing.assert_close(ours.mean(), _torch_triplet(1.0)(anchor, positive, negative))
    # Exactly at the hinge with margin 2: loss stays 0, margin 2.5 gives 0.5 everywhere.
    torch.testing.assert_close(
        triplet_identity_loss(anchor, positive, negative, margin=2.5), torch.full((8,), 0.5)
    )


def test_triplet_mixed_active_and_inactive_samples() -> None:
    anchor, positive, negative = _embeddings(5, batch=16)
    anchor[:8] = positive[:8] + 0.01 * anchor[:8]  # first half: easy triplets
    ours = triplet_identity_loss(anchor, positive, negative, margin=0.5)
    assert (ours[:8] == 0).all() and (ours[8:] > 0).all()
    torch.testing.assert_close(ours.mean(), _torch_triplet(0.5)(anchor, positive, negative))


@pytest.mark.parametrize("seed", [0, 1])
def test_identity_loss_is_one_minus_cosine(seed: int) -> None:
    anchor, positive, _ = _embeddings(seed)
    ours = cosine_identity_loss(anchor, positive)
    torch.testing.assert_close(ours, 1.0 - F.cosine_similarity(anchor, positive), atol=1e-6, rtol=0)
    torch.testing.assert_close(
        cosine_identity_loss(positive, positive), torch.zeros(8), atol=1e-6, rtol=0
    )
    torch.testing.assert_close(cosine_identity_loss(positive, -positive), torch.full((8,), 2.0))


def test_cosine_epsilons_are_the_reference_ones() -> None:
    """The reference's identity loss is 1 - torch.nn.CosineSimilarity(dim=1, eps=1e-6), its
    triplet distance 1 - F.cosine_similarity (eps 1e-8): equal on near-zero anchors too."""
    _, positive, negative = _embeddings(9)
    tiny = 3e-7 * F.normalize(positive, dim=1)  # norm between the two epsilons
    reference_identity = 1 - torch.nn.CosineSimilarity(dim=1, eps=1e-6)(tiny, positive)
    assert (reference_identity - (1 - F.cosine_similarity(tiny, positive))).abs().min() > 0.1
    torch.testing.assert_close(cosine_identity_loss(tiny, positive), reference_identity)
    reference_triplet = torch.nn.TripletMarginWithDistanceLoss(
        distance_function=lambda x, y: 1 - F.cosine_similarity(x, y), reduction="none"
    )
    torch.testing.assert_close(
        triplet_identity_loss(tiny, positive, negative), reference_triplet(tiny, positive, negative)
    )


def test_gradients_reach_the_anchor_only() -> None:
    anchor, positive, negative = _embeddings(6)
    anchor.requires_grad_(True)
    positive.requires_grad_(True)  # even if a caller forgets to detach, no grad flows there
    negative.requires_grad_(True)
    (
        triplet_identity_loss(anchor, positive, negative) + cosine_identity_loss(anchor, positive)
    ).sum().backward()
    assert anchor.grad is not None and anchor.grad.abs().sum() > 0
    assert positive.grad is None and negative.grad is None


def test_gradients_with_precomputed_constant_embeddings() -> None:
    """API usage: positive/negative are precomputed constants; the anchor gets torch's grad."""
    anchor, positive, negative = _embeddings(7)
    assert not positive.requires_grad and not negative.requires_grad
    anchor_ours = anchor.clone().requires_grad_(True)
    anchor_ref = anchor.clone().requires_grad_(True)
    triplet_identity_loss(anchor_ours, positive, negative, margin=0.7).mean().backward()
    _torch_triplet(0.7)(anchor_ref, positive, negative).backward()
    torch.testing.assert_close(anchor_ours.grad, anchor_ref.grad)


def test_embedding_shape_mismatch_is_a_clear_error() -> None:
    anchor, positive, negative = _embeddings(8)
    with pytest.raises(ValueError, match="embeddings"):
        triplet_identity_loss(anchor, positive[:4], negative)
    with pytest.raises(ValueError, match="embeddings"):
        cosine_identity_loss(anchor[0], positive[0])


def _noise_setup(seed: int, batch: int = 6) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    generator = torch.Generator().manual_seed(seed)
    latents = torch.randn(batch, 4, 8, 8, generator=generator)
    noise = torch.randn(batch, 4, 8, 8, generator=generator)
    timesteps = torch.tensor([0, 1, 250, 500, 900, 999][:batch])
    return latents, noise, timesteps


@pytest.mark.parametrize("prediction_type", ["epsilon", "v_prediction"])
def test_predict_x0_inverts_add_noise(prediction_type: str) -> None:
    scheduler = _sd_scheduler(prediction_type)
    latents, noise, timesteps = _noise_setup(0)
    noisy = scheduler.add_noise(latents, noise, timesteps)
    perfect_pred = diffusion_target(noise, latents, timesteps, scheduler)
    x0 = predict_x0(noisy, perfect_pred, timesteps, scheduler.alphas_cumprod, prediction_type)
    # float32 round trip; epsilon divides by sqrt(abar_999) ~ 0.068, hence the looser atol.
    torch.testing.assert_close(x0, latents, atol=2e-4, rtol=1e-4)


def test_predict_x0_matches_scheduler_step_original_sample() -> None:
    """diffusers' own x0 (pred_original_sample of DDPMScheduler.step) for both prediction types."""
    latents, noise, _ = _noise_setup(1)
    model_pred = torch.randn_like(latents)
    for prediction_type in ("epsilon", "v_prediction"):
        scheduler = _sd_scheduler(prediction_type)
        scheduler.config.clip_sample = False
        scheduler.set_timesteps(1000)
        for row, t in enumerate([5, 400, 998]):
            step = scheduler.step(model_pred[row : row + 1], t, latents[row : row + 1])
            ours = predict_x0(
                latents[row : row + 1],
                model_pred[row : row + 1],
                torch.tensor([t]),
                scheduler.alphas_cumprod,
                prediction_type,
            )
            torch.testing.assert_close(ours, step.pred_original_sample, atol=1e-4, rtol=1e-4)


def test_predict_x0_is_differentiable_and_keeps_dtype() -> None:
    scheduler = _sd_scheduler("epsilon")
    latents, noise, timesteps = _noise_setup(2)
    model_pred = noise.clone().half().requires_grad_(True)
    x0 = predict_x0(latents, model_pred, timesteps, scheduler.alphas_cumprod, "epsilon")
    assert x0.dtype == torch.float16
    x0.float().sum().backward()
    abar = scheduler.alphas_cumprod[timesteps]
    expected = (-(1 - abar).sqrt() / abar.sqrt()).reshape(-1, 1, 1, 1).expand_as(latents)
    torch.testing.assert_close(model_pred.grad.float(), expected, rtol=2e-3, atol=1e-3)


def test_unknown_prediction_type_lists_options() -> None:
    latents, noise, timesteps = _noise_setup(3)
    with pytest.raises(ValueError, match="epsilon, v_prediction"):
        predict_x0(latents, noise, timesteps, torch.ones(1000), "sample")
    scheduler = _sd_scheduler("sample")
    with pytest.raises(ValueError, match="epsilon, v_prediction"):
        diffusion_target(noise, latents, timesteps, scheduler)


def test_diffusion_target() -> None:
    latents, noise, timesteps = _noise_setup(4)
    assert diffusion_target(noise, latents, timesteps, _sd_scheduler("epsilon")) is noise
    v_scheduler = _sd_scheduler("v_prediction")
    velocity = diffusion_target(noise, latents, timesteps, v_scheduler)
    torch.testing.assert_close(velocity, v_scheduler.get_velocity(latents, noise, timesteps))
    abar = v_scheduler.alphas_cumprod[timesteps].reshape(-1, 1, 1, 1)
    torch.testing.assert_close(velocity, abar.sqrt() * noise - (1 - abar).sqrt() * latents)


def test_timestep_weight_formula() -> None:
    timesteps = torch.tensor([0, 1, 250, 500, 750, 999])
    weights = timestep_weight(timesteps)
    expected = torch.tensor([(1 - t / 1000) ** 2 for t in timesteps.tolist()])
    torch.testing.assert_close(weights, expected)
    assert weights.dtype == torch.float32 and weights[0] == 1.0
    torch.testing.assert_close(
        timestep_weight(torch.tensor([50]), num_train_timesteps=100), torch.tensor([0.25])
    )


def test_prior_preservation_loss_is_manual_mse_split() -> None:
    generator = torch.Generator().manual_seed(5)
    model_pred = torch.randn(5, 4, 8, 8, generator=generator)
    target = torch.randn(5, 4, 8, 8, generator=generator)
    loss, instance_loss, prior_loss = prior_preservation_loss(model_pred, target, 2, 0.7)
    manual_instance = ((model_pred[:2] - target[:2]) ** 2).mean()
    manual_prior = ((model_pred[2:] - target[2:]) ** 2).mean()
    torch.testing.assert_close(instance_loss, manual_instance)
    torch.testing.assert_close(prior_loss, manual_prior)
    torch.testing.assert_close(loss, manual_instance + 0.7 * manual_prior)


def test_prior_preservation_loss_without_prior_and_bad_split() -> None:
    model_pred, target = torch.randn(3, 4, 2, 2), torch.randn(3, 4, 2, 2)
    loss, instance_loss, prior_loss = prior_preservation_loss(model_pred, target, 3, 1.0)
    torch.testing.assert_close(loss, F.mse_loss(model_pred, target))
    assert prior_loss == 0 and instance_loss == loss
    for bad in (0, 4):
        with pytest.raises(ValueError, match="num_instance"):
            prior_preservation_loss(model_pred, target, bad, 1.0)
    with pytest.raises(ValueError, match="target"):
        prior_preservation_loss(model_pred, target[:2], 1, 1.0)


def test_prior_preservation_loss_fp16_inputs_give_fp32_loss() -> None:
    model_pred = torch.randn(2, 4, 4, 4).half().requires_grad_(True)
    target = torch.randn(2, 4, 4, 4).half()
    loss, _, _ = prior_preservation_loss(model_pred, target, 1, 1.0)
    assert loss.dtype == torch.float32
    loss.backward()
    assert model_pred.grad is not None and model_pred.grad.dtype == torch.float16
