"""losses.py against independent references: torch's own losses, diffusers' scheduler, formulas."""

import pytest
import torch
import torch.nn.functional as F
from diffusers import DDPMScheduler

from losses import (
    TERM_NAMES,
    ObjectiveConfig,
    cosine_identity_loss,
    diffusion_target,
    identity_terms,
    objective,
    objective_of_each,
    predict_x0,
    sample_mse,
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


# ---------------------------------------------------------------------------- the objective


def _per_sample_losses(seed: int, batch: int) -> tuple[torch.Tensor, torch.Tensor]:
    generator = torch.Generator().manual_seed(seed)
    model_pred = torch.randn(batch, 4, 8, 8, generator=generator)
    target = torch.randn(batch, 4, 8, 8, generator=generator)
    return model_pred, target


def test_objective_is_instance_mse_plus_weighted_prior_mse() -> None:
    """DreamBooth's Eq. 2 against F.mse_loss per part, with a prior weight other than 1."""
    model_pred, target = _per_sample_losses(5, 5)
    is_prior = torch.tensor([False, False, True, True, True])
    config = ObjectiveConfig(loss="dreambooth", prior_loss_weight=0.3)
    terms = objective(config, sample_mse(model_pred, target), is_prior)
    instance = F.mse_loss(model_pred[:2], target[:2])
    prior = F.mse_loss(model_pred[2:], target[2:])
    torch.testing.assert_close(terms["diffusion_loss"], instance)
    torch.testing.assert_close(terms["prior_loss"], prior)
    torch.testing.assert_close(terms["loss"], instance + 0.3 * prior)
    assert set(terms) == set(TERM_NAMES) and terms["identity_term"] == 0


def test_objective_without_prior_rows_is_the_instance_mse() -> None:
    model_pred, target = _per_sample_losses(6, 3)
    terms = objective(
        ObjectiveConfig(loss="dreambooth", prior_loss_weight=2.0),
        sample_mse(model_pred, target),
        torch.zeros(3, dtype=torch.bool),
    )
    torch.testing.assert_close(terms["loss"], F.mse_loss(model_pred, target))
    assert terms["prior_loss"] == 0


def test_sample_mse_of_fp16_inputs_is_fp32_and_checks_shapes() -> None:
    model_pred = torch.randn(2, 4, 4, 4).half().requires_grad_(True)
    losses = sample_mse(model_pred, torch.randn(2, 4, 4, 4).half())
    assert losses.shape == (2,) and losses.dtype == torch.float32
    losses.sum().backward()
    assert model_pred.grad is not None and model_pred.grad.dtype == torch.float16
    with pytest.raises(ValueError, match="target"):
        sample_mse(model_pred, model_pred[:1])


def test_identity_terms_average_only_masked_in_samples_even_nan_ones() -> None:
    """The triplet term over M (the masked-in samples) with w(t) weights; a NaN in a masked-out
    sample reaches no term and no gradient."""
    anchor, positive, negative = _embeddings(7, batch=4)
    anchor = anchor.clone().requires_grad_(True)
    anchor_with_nan = torch.cat([anchor[:3], torch.full_like(anchor[3:], float("nan"))])
    timesteps = torch.tensor([0, 500, 900, 100])
    mask = torch.tensor([True, False, True, False])
    config = ObjectiveConfig(loss="triplet", triplet_margin=0.5)
    terms = identity_terms(config, anchor_with_nan, positive, negative, timesteps, mask)
    criterion = triplet_identity_loss(anchor[[0, 2]], positive[[0, 2]], negative[[0, 2]], 0.5)
    weight = timestep_weight(timesteps[[0, 2]])
    torch.testing.assert_close(terms["identity_term"], (weight * criterion).mean())
    torch.testing.assert_close(terms["identity_criterion"], criterion.mean())
    torch.testing.assert_close(terms["identity_weight"], weight.mean())
    assert terms["identity_count"] == 2
    terms["identity_term"].backward()
    assert anchor.grad.isfinite().all() and anchor.grad[[1, 3]].abs().sum() == 0


def test_objective_adds_the_identity_term_to_the_weighted_diffusion_loss() -> None:
    model_pred, target = _per_sample_losses(8, 4)
    anchor, positive, negative = _embeddings(9, batch=2)
    config = ObjectiveConfig(loss="identity", prior_loss_weight=0.25)
    identity = identity_terms(
        config, anchor, positive, None, torch.tensor([10, 20]), torch.ones(2, dtype=torch.bool)
    )
    is_prior = torch.tensor([False, False, True, True])
    terms = objective(config, sample_mse(model_pred, target), is_prior, identity)
    expected = F.mse_loss(model_pred[:2], target[:2]) + 0.25 * F.mse_loss(
        model_pred[2:], target[2:]
    )
    torch.testing.assert_close(terms["loss"], expected + identity["identity_term"])


def test_packed_objective_of_unequal_identities_equals_each_alone() -> None:
    """Identities of 4 rows (2 + 2 prior) and 2 rows (1 + 1 prior) in one packed batch: each
    identity's terms, and the gradient of the summed loss, are those of its batch alone."""
    model_pred, target = _per_sample_losses(10, 6)
    model_pred.requires_grad_(True)
    anchor, positive, negative = _embeddings(11, batch=3)
    timesteps = torch.tensor([100, 800, 300])
    mask = torch.tensor([True, False, True])
    is_prior = torch.tensor([False, False, True, True, False, True])
    config = ObjectiveConfig(loss="triplet", prior_loss_weight=0.7)
    rows = {
        "anchor": anchor,
        "positive": positive,
        "negative": negative,
        "timesteps": timesteps,
        "mask": mask,
    }
    sample_losses = sample_mse(model_pred, target)
    packed = objective_of_each(config, sample_losses, is_prior, [4, 2], rows, [2, 1])
    for s, (batch_rows, instance_rows) in enumerate(
        [(slice(0, 4), slice(0, 2)), (slice(4, 6), slice(2, 3))]
    ):
        alone_identity = identity_terms(
            config,
            *(
                rows[name][instance_rows]
                for name in ("anchor", "positive", "negative", "timesteps", "mask")
            ),
        )
        alone = objective(config, sample_losses[batch_rows], is_prior[batch_rows], alone_identity)
        for name in TERM_NAMES:
            torch.testing.assert_close(packed[name][s], alone[name], msg=name)
    (grad,) = torch.autograd.grad(packed["loss"].sum(), model_pred)
    first = F.mse_loss(model_pred[:2], target[:2]) + 0.7 * F.mse_loss(model_pred[2:4], target[2:4])
    second = F.mse_loss(model_pred[4:5], target[4:5]) + 0.7 * F.mse_loss(model_pred[5:], target[5:])
    (expected,) = torch.autograd.grad(first + second, model_pred)
    torch.testing.assert_close(grad, expected)
