"""Evaluation metrics against independent references (scikit-learn, vendi-score, scipy, formulas,
hand-made point sets) and on real faces with a real embedder (dlib's shipped 128-d model)."""

from __future__ import annotations

import itertools
import math
import statistics

import numpy as np
import pytest
import reference_prdc
import scipy.linalg
from hypothesis import given, settings
from hypothesis import strategies as st
from scipy.optimize import brentq
from sklearn.metrics import roc_auc_score
from sklearn.metrics import roc_curve as sklearn_roc_curve
from sklearn.metrics.pairwise import polynomial_kernel as sklearn_polynomial_kernel
from vendi_score import vendi

import metrics

# ------------------------------------------------------------------ references


def sklearn_rates(genuine, impostor):
    """(fpr, fnr, thresholds) from scikit-learn's ROC with every vertex kept."""
    labels = np.r_[np.ones(len(genuine)), np.zeros(len(impostor))]
    fpr, tpr, thresholds = sklearn_roc_curve(
        labels, np.r_[genuine, impostor], drop_intermediate=False
    )
    return fpr, 1.0 - tpr, thresholds


def reference_eer(genuine, impostor) -> float:
    """FMR = FNMR on scikit-learn's ROC polyline, found by root finding along the polyline."""
    fpr, fnr, _ = sklearn_rates(genuine, impostor)
    position = np.arange(len(fpr), dtype=float)

    def gap(s: float) -> float:  # FNMR - FMR at polyline parameter s (monotone)
        return np.interp(s, position, fnr) - np.interp(s, position, fpr)

    if gap(position[-1]) >= 0:  # only at the very end (genuine all below impostors)
        return float(fpr[-1])
    root = brentq(gap, 0.0, position[-1], xtol=1e-14, rtol=1e-14)
    return float(np.interp(root, position, fpr))


def score_sets():
    """Random and adversarial genuine/impostor sets."""
    rng = np.random.default_rng(0)
    sets = {
        "gaussian": (rng.normal(0.6, 0.1, 300), rng.normal(0.2, 0.1, 2000)),
        "overlapping": (rng.normal(0.1, 0.3, 50), rng.normal(0.0, 0.3, 70)),
        "integer ties": (
            rng.integers(0, 6, 40).astype(float),
            rng.integers(0, 4, 90).astype(float),
        ),
        "perfect separation": (np.array([0.9, 0.8, 0.85]), np.array([0.1, 0.2, 0.3, 0.2])),
        "touching separation": (np.array([0.5, 0.9]), np.array([0.5, 0.1])),
        "reversed": (np.array([0.1, 0.2]), np.array([0.8, 0.9, 0.7])),
        "all equal": (np.full(7, 0.3), np.full(11, 0.3)),
        "single pair each": (np.array([0.4]), np.array([0.4])),
        "one genuine": (np.array([0.5]), rng.normal(0.5, 0.2, 30)),
    }
    for size in (5, 17, 64):
        sets[f"random {size}"] = (rng.random(size), rng.random(size * 2))
    return sets


SCORE_SETS = score_sets()


# ------------------------------------------------------------------ verification


@pytest.mark.parametrize("name", list(SCORE_SETS))
def test_roc_matches_sklearn_vertex_for_vertex(name):
    genuine, impostor = SCORE_SETS[name]
    roc = metrics.roc_curve(genuine, impostor)
    fpr, fnr, thresholds = sklearn_rates(genuine, impostor)
    np.testing.assert_allclose(roc.fmr, fpr, atol=1e-12)
    np.testing.assert_allclose(roc.fnmr, fnr, atol=1e-12)
    np.testing.assert_array_equal(roc.thresholds, thresholds)


@pytest.mark.parametrize("name", list(SCORE_SETS))
def test_eer_auc_and_operating_points_match_sklearn(name):
    genuine, impostor = SCORE_SETS[name]
    result = metrics.verification_metrics(genuine, impostor, (1e-2, 0.1, 0.5), (1e-2, 0.1, 0.5))
    labels = np.r_[np.ones(len(genuine)), np.zeros(len(impostor))]
    assert result["auc"] == pytest.approx(
        roc_auc_score(labels, np.r_[genuine, impostor]), abs=1e-12
    )
    assert result["eer"] == pytest.approx(reference_eer(genuine, impostor), abs=1e-9)
    fpr, fnr, thresholds = sklearn_rates(genuine, impostor)
    for target in (1e-2, 0.1, 0.5):
        key = f"{target:g}"
        within = fpr <= target + 1e-12  # sklearn's 1 - tpr carries round-off at exact rates
        assert result["fnmr_at_fmr"][key]["value"] == pytest.approx(fnr[within].min())
        assert result["fnmr_at_fmr"][key]["threshold"] == thresholds[within][-1]
        reached = fnr <= target + 1e-12
        assert result["fmr_at_fnmr"][key]["value"] == pytest.approx(fpr[reached].min())
        assert result["fmr_at_fnmr"][key]["threshold"] == thresholds[reached][0]
    # The EER threshold is an achievable operating point next to the crossing.
    threshold = result["eer_threshold"]
    assert result["eer_threshold_fmr"] == pytest.approx(np.mean(impostor >= threshold))
    assert result["eer_threshold_fnmr"] == pytest.approx(np.mean(genuine < threshold))


@settings(max_examples=150, deadline=None)
@given(
    st.lists(st.integers(0, 6), min_size=1, max_size=25),
    st.lists(st.integers(0, 6), min_size=1, max_size=25),
)
def test_eer_and_auc_property_on_heavily_tied_scores(genuine, impostor):
    genuine, impostor = np.array(genuine, float), np.array(impostor, float)
    result = metrics.verification_metrics(genuine, impostor)
    labels = np.r_[np.ones(len(genuine)), np.zeros(len(impostor))]
    assert result["auc"] == pytest.approx(
        roc_auc_score(labels, np.r_[genuine, impostor]), abs=1e-12
    )
    assert result["eer"] == pytest.approx(reference_eer(genuine, impostor), abs=1e-9)


def test_auc_does_not_need_numpy_2(monkeypatch):
    # requirements.txt allows numpy 1.26, which has no np.trapezoid: simulate it.
    monkeypatch.delattr(np, "trapezoid", raising=False)
    genuine, impostor = SCORE_SETS["gaussian"]
    labels = np.r_[np.ones(len(genuine)), np.zeros(len(impostor))]
    expected = roc_auc_score(labels, np.r_[genuine, impostor])
    assert metrics.verification_metrics(genuine, impostor)["auc"] == pytest.approx(expected)


def test_eer_hand_computed_values():
    separated = metrics.verification_metrics([0.9, 0.8], [0.2, 0.1])
    assert separated["eer"] == 0.0 and separated["auc"] == 1.0
    assert separated["eer_threshold"] == 0.8  # lowest genuine score: FMR = FNMR = 0 there
    assert metrics.verification_metrics([0.3] * 4, [0.3] * 5)["eer"] == 0.5
    assert metrics.verification_metrics([0.1], [0.9])["eer"] == 1.0
    # A tie across classes makes a diagonal ROC segment (0, .5) -> (.5, 0): EER = .25.
    tied = metrics.verification_metrics([0.9, 0.5], [0.5, 0.1])
    assert tied["eer"] == pytest.approx(0.25)
    assert tied["auc"] == pytest.approx(0.875)  # P(g > i) + P(g = i) / 2 = 3/4 + 1/8


def test_fdr_and_decidability_follow_their_formulas():
    rng = np.random.default_rng(1)
    genuine, impostor = rng.normal(0.7, 0.1, 101), rng.normal(0.1, 0.2, 333)
    mu_g, mu_i = statistics.fmean(genuine), statistics.fmean(impostor)
    var_g, var_i = statistics.pvariance(genuine), statistics.pvariance(impostor)
    result = metrics.verification_metrics(genuine, impostor)
    assert result["fdr"] == pytest.approx((mu_g - mu_i) ** 2 / (var_g + var_i), rel=1e-12)
    assert result["decidability"] == pytest.approx(
        abs(mu_g - mu_i) / ((var_g + var_i) / 2) ** 0.5, rel=1e-12
    )
    assert result["genuine_mean"] == pytest.approx(mu_g)
    assert result["impostor_std"] == pytest.approx(statistics.pstdev(impostor))
    assert metrics.fisher_discriminant_ratio([1.0, 1.0], [0.0, 0.0]) == float("inf")
    assert np.isnan(metrics.decidability([1.0], [1.0]))


def test_bad_scores_raise_clear_errors():
    with pytest.raises(ValueError, match="no genuine"):
        metrics.verification_metrics([], [0.1])
    with pytest.raises(ValueError, match="NaN"):
        metrics.verification_metrics([0.1, np.nan], [0.1])


# ------------------------------------------------------------------ pairs


def test_within_set_pairs_are_exactly_all_pairs():
    labels = ["b", "a", "b", "c", "a", "b", "d"]
    genuine, impostor = metrics.within_set_pairs(labels)
    every = list(itertools.combinations(range(len(labels)), 2))
    assert sorted(map(tuple, genuine.tolist())) == [
        p for p in every if labels[p[0]] == labels[p[1]]
    ]
    assert sorted(map(tuple, impostor.tolist())) == [
        p for p in every if labels[p[0]] != labels[p[1]]
    ]


def test_cross_set_pairs_are_exactly_all_pairs():
    labels_a, labels_b = ["x", "y", "x", "z"], ["y", "x", "w", "y", "x"]
    genuine, impostor = metrics.cross_set_pairs(labels_a, labels_b)
    every = list(itertools.product(range(len(labels_a)), range(len(labels_b))))
    same = [p for p in every if labels_a[p[0]] == labels_b[p[1]]]
    assert sorted(map(tuple, genuine.tolist())) == same
    assert sorted(map(tuple, impostor.tolist())) == [p for p in every if p not in same]


@pytest.mark.parametrize("cap", [100, 1000])  # far below / near the ~1.6k pairs: both samplers
@pytest.mark.parametrize("cross", [False, True])
def test_impostor_sample_is_seeded_distinct_and_within_the_population(cross, cap):
    rng = np.random.default_rng(2)
    labels_a = rng.integers(0, 9, 60).astype(str)
    labels_b = rng.integers(0, 9, 50).astype(str)

    def pairs(cap, seed):
        if cross:
            return metrics.cross_set_pairs(labels_a, labels_b, cap, seed)[1]
        return metrics.within_set_pairs(labels_a, cap, seed)[1]

    population = {tuple(p) for p in pairs(None, 0).tolist()}
    sample = pairs(cap, 5)
    assert len(sample) == cap and len({tuple(p) for p in sample.tolist()}) == cap
    assert {tuple(p) for p in sample.tolist()} <= population
    np.testing.assert_array_equal(sample, pairs(cap, 5))
    assert not np.array_equal(sample, pairs(cap, 6))
    assert len(pairs(10**9, 0)) == len(population)  # cap above the population: all pairs


def test_impostor_sample_is_uniform_over_pairs():
    labels = list("aabbbcccc")  # 26 impostor pairs
    counts = np.zeros((9, 9))
    for seed in range(600):
        for i, j in metrics.within_set_pairs(labels, 5, seed)[1]:
            counts[i, j] += 1
    observed = counts[counts > 0]
    assert observed.size == 26  # every impostor pair gets drawn
    # 600 draws x 5 / 26 = 115 expected per pair; binomial sd ~ 9.7: allow 5 sd.
    assert np.all(np.abs(observed - 600 * 5 / 26) < 50)


def test_scores_are_cosines_of_the_pairs():
    rng = np.random.default_rng(3)
    embeddings = rng.normal(size=(9, 5))
    labels = list("aaabbbccc")
    genuine, impostor = metrics.within_set_scores(embeddings, labels)
    unit = embeddings / np.linalg.norm(embeddings, axis=1, keepdims=True)
    cosine = unit @ unit.T
    same = np.equal.outer(np.array(labels), np.array(labels))
    upper = np.triu(np.ones_like(same), k=1).astype(bool)
    np.testing.assert_allclose(np.sort(genuine), np.sort(cosine[same & upper]))
    np.testing.assert_allclose(np.sort(impostor), np.sort(cosine[~same & upper]))
    consistency = metrics.per_identity_consistency(embeddings, labels)
    assert consistency["b"]["mean"] == pytest.approx(
        np.mean(cosine[3:6, 3:6][np.triu_indices(3, 1)])
    )
    assert consistency["b"]["n_pairs"] == 3


# ------------------------------------------------------------------ diversity


@pytest.mark.parametrize("shape", [(40, 16), (12, 64), (1, 8), (30, 30)])
def test_vendi_equals_the_vendi_score_package(shape):
    features = np.random.default_rng(4).normal(size=shape)
    assert metrics.vendi_score(features) == pytest.approx(vendi.score_X(features), rel=1e-9)
    normalised = features / np.linalg.norm(features, axis=1, keepdims=True)
    assert metrics.vendi_score(features) == pytest.approx(
        vendi.score_K(normalised @ normalised.T), rel=1e-9
    )


def test_vendi_known_values_and_per_identity_summary():
    assert metrics.vendi_score(np.ones((6, 3))) == pytest.approx(1.0)  # one repeated sample
    assert metrics.vendi_score(np.eye(5)) == pytest.approx(5.0)  # five orthogonal samples
    features = np.vstack([np.ones((4, 5)), np.eye(5)])
    summary = metrics.vendi_per_identity(features, ["a"] * 4 + ["b"] * 5)
    assert summary["per_identity"]["a"]["vendi"] == pytest.approx(1.0)
    assert summary["per_identity"]["b"]["vendi"] == pytest.approx(5.0)
    assert summary["mean"] == pytest.approx(3.0) and summary["std"] == pytest.approx(2.0)
    assert summary["n_identities"] == 2 and summary["n_images"] == 9


# ------------------------------------------------------------------ fidelity


def scipy_sqrtm_frechet(mu1, sigma1, mu2, sigma2) -> float:
    """The classic FID formula with scipy.linalg.sqrtm (as in pytorch-fid / dgm-eval)."""
    covmean = scipy.linalg.sqrtm(sigma1 @ sigma2)
    covmean = np.real(covmean)
    return float(np.sum((mu1 - mu2) ** 2) + np.trace(sigma1 + sigma2 - 2 * covmean))


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_frechet_distance_equals_scipy_sqrtm_reference(seed):
    rng = np.random.default_rng(seed)
    dim = 12
    real = rng.normal(size=(200, dim)) @ rng.normal(size=(dim, dim))
    fake = rng.normal(0.3, 1.0, size=(150, dim)) @ rng.normal(size=(dim, dim))
    mu_r, sigma_r = np.mean(real, 0), np.cov(real, rowvar=False)
    mu_f, sigma_f = np.mean(fake, 0), np.cov(fake, rowvar=False)
    expected = scipy_sqrtm_frechet(mu_r, sigma_r, mu_f, sigma_f)
    assert metrics.frechet_distance(mu_r, sigma_r, mu_f, sigma_f) == pytest.approx(
        expected, rel=1e-8
    )
    result = metrics.frechet_distance_features(real, fake)
    assert result["value"] == pytest.approx(expected, rel=1e-8)
    assert (result["n_real"], result["n_generated"]) == (200, 150) and "note" not in result


def test_frechet_distance_closed_forms():
    # 1-D Gaussians: (m1 - m2)^2 + (s1 - s2)^2.
    assert metrics.frechet_distance(
        np.array([1.0]), np.array([[4.0]]), np.array([-1.0]), np.array([[9.0]])
    ) == pytest.approx(4.0 + 1.0)
    features = np.random.default_rng(5).normal(size=(20, 40))  # n < d: rank deficient
    result = metrics.frechet_distance_features(features, features)
    assert result["value"] == pytest.approx(0.0, abs=1e-8) and "note" in result


def test_mmd_matches_explicit_double_sums_and_sklearn_kernel():
    rng = np.random.default_rng(6)
    x, y = rng.normal(size=(7, 4)), rng.normal(0.5, 1.0, size=(9, 4))
    np.testing.assert_allclose(
        metrics.polynomial_kernel(x, y), sklearn_polynomial_kernel(x, y, degree=3, coef0=1)
    )

    def k(a, b):
        return (a @ b / 4 + 1) ** 3

    within_x = sum(k(x[i], x[j]) for i in range(7) for j in range(7) if i != j) / (7 * 6)
    within_y = sum(k(y[i], y[j]) for i in range(9) for j in range(9) if i != j) / (9 * 8)
    across = sum(k(a, b) for a in x for b in y) / (7 * 9)
    assert metrics.mmd2_unbiased(x, y) == pytest.approx(within_x + within_y - 2 * across)


def test_kernel_distance_subsets_and_counts():
    rng = np.random.default_rng(7)
    real, fake = rng.normal(size=(30, 6)), rng.normal(1.0, 1.0, size=(30, 6))
    # Subsets as large as the sets are permutations: every subset gives the full-set MMD.
    whole = metrics.kernel_distance(real, fake, n_subsets=5, subset_size=1000, seed=0)
    assert whole["mean"] == pytest.approx(metrics.mmd2_unbiased(real, fake))
    assert whole["std"] == pytest.approx(0.0, abs=1e-12)
    assert (whole["subset_size"], whole["n_real"], whole["n_generated"]) == (30, 30, 30)
    same = metrics.kernel_distance(real, rng.normal(size=(30, 6)), n_subsets=50, subset_size=10)
    shifted = metrics.kernel_distance(real, fake, n_subsets=50, subset_size=10)
    assert abs(same["mean"]) < shifted["mean"] / 5  # unbiased: ~0 for equal distributions


def test_kernel_distance_draws_the_subsets_dgm_eval_draws():
    rng = np.random.default_rng(11)
    real, fake = rng.normal(size=(80, 5)), rng.normal(0.3, 1.0, size=(60, 5))
    result = metrics.kernel_distance(real, fake, n_subsets=20, subset_size=25, seed=7)
    expected = reference_prdc.dgm_eval_mmd(real, fake, n_subsets=20, subset_size=25, seed=7)
    assert result["mean"] == pytest.approx(expected.mean(), rel=1e-10)
    assert result["std"] == pytest.approx(expected.std(), rel=1e-10)


def test_prdc_hand_made_k1():
    real = np.arange(10, dtype=float)[:, None]  # every real ball has radius 1
    fake = np.array([[0.5], [4.2], [20.0]])  # fake radii (k=1): 3.7, 3.7, 15.8
    result = metrics.prdc(real, fake, k=1)
    assert result["precision"] == pytest.approx(2 / 3)  # 20 lies in no real ball
    assert result["density"] == pytest.approx(4 / 3)  # 0.5 in balls of 0, 1; 4.2 in 4, 5
    assert result["coverage"] == pytest.approx(0.4)  # reals 0, 1, 4, 5 have a fake inside
    assert result["recall"] == pytest.approx(1.0)  # the outlier's huge ball recalls 5..9
    assert (result["k"], result["n_real"], result["n_generated"]) == (1, 10, 3)


def test_prdc_hand_made_k5():
    real = np.arange(10, dtype=float)[:, None]  # 5-NN radii 5 4 3 3 3 3 3 3 4 5
    fake = np.array([[4.5], [100.0], [101.0], [102.0], [103.0], [104.0]])
    result = metrics.prdc(real, fake, k=5)
    assert result["precision"] == pytest.approx(1 / 6)  # only 4.5 is in real balls (all 10)
    assert result["density"] == pytest.approx(10 / (5 * 6))
    assert result["coverage"] == pytest.approx(1.0)
    assert result["recall"] == pytest.approx(1.0)  # 4.5's 5-NN radius is 99.5
    far = metrics.prdc(real, fake[1:] + 1000.0, k=4)
    assert far["precision"] == far["density"] == far["coverage"] == far["recall"] == 0.0


def brute_force_prdc(real: np.ndarray, fake: np.ndarray, k: int) -> dict:
    """PRDC from the definitions, each distance ||a - b|| computed from the pair alone."""

    def radius(points, i):
        return sorted(np.linalg.norm(points - points[i], axis=1))[k]

    r_real = [radius(real, i) for i in range(len(real))]
    r_fake = [radius(fake, j) for j in range(len(fake))]
    d = np.linalg.norm(real[:, None] - fake[None], axis=2)  # (N_r, N_f)
    rows, columns = range(len(real)), range(len(fake))
    return {
        "precision": np.mean([any(d[i, j] < r_real[i] for i in rows) for j in columns]),
        "recall": np.mean([any(d[i, j] < r_fake[j] for j in columns) for i in rows]),
        "density": sum(d[i, j] < r_real[i] for i in rows for j in columns) / (k * len(fake)),
        "coverage": np.mean([d[i].min() < r_real[i] for i in rows]),
    }


def test_prdc_matches_brute_force_on_random_sets_and_chunking():
    rng = np.random.default_rng(8)
    real, fake = rng.normal(size=(40, 3)), rng.normal(0.4, 1.2, size=(35, 3))
    expected = brute_force_prdc(real, fake, 5)
    assert reference_prdc.compute_prdc(real, fake, 5) == pytest.approx(expected)
    for chunk in (7, 2048):
        result = metrics.prdc(real, fake, k=5, chunk=chunk)
        for key, value in expected.items():
            assert result[key] == pytest.approx(value), key
    with pytest.raises(ValueError, match="more than 5"):
        metrics.prdc(real[:5], fake, k=5)


PRDC_ONES = {"precision": 1.0, "recall": 1.0, "density": 1.0, "coverage": 1.0}


@pytest.mark.parametrize("dim", [4, 16, 32])
def test_prdc_of_an_exact_copy_is_exactly_one_as_in_prdc(dim):
    # A fake that copies a real point lies at exactly that point's real-real distances, so
    # strict '<' gives k per ball: density 1.0 exactly. The old code read 1.0004-1.0008 here
    # (real-real and real-fake distances came from differently rounded matrix products).
    real = np.random.default_rng(1).normal(size=(500, dim))
    assert reference_prdc.compute_prdc(real, real.copy(), 5) == PRDC_ONES  # what prdc gives
    permutation = np.random.default_rng(2).permutation(len(real))
    for fake in (real.copy(), real[::-1].copy(), real[permutation]):  # any order: same values
        result = metrics.prdc(real, fake, k=5)
        assert {key: result[key] for key in PRDC_ONES} == PRDC_ONES


def test_prdc_with_repeated_points_matches_pairwise_distances():
    rng = np.random.default_rng(9)
    base = rng.normal(size=(60, 6))
    real = np.concatenate([base, base[:4], base[:4]])  # points 0-3 three times: radius 0
    fake = np.concatenate([base[10:40], rng.normal(size=(25, 6)), base[10:13]])
    expected = brute_force_prdc(real, fake, 5)
    result = metrics.prdc(real, fake, k=5, chunk=16)
    assert {key: result[key] for key in expected} == pytest.approx(expected, abs=1e-15)


def cluster_features(n: int, clusters: range, seed: int) -> np.ndarray:
    """(n, 16) points of unit Gaussians around 8 centres 70 apart, uniform over `clusters`."""
    rng = np.random.default_rng(seed)
    centres = 50.0 * np.eye(16)[:8]
    return centres[rng.choice(np.asarray(clusters), n)] + rng.normal(size=(n, 16))


def expected_coverage_same_distribution(n_real: int, n_fake: int, k: int) -> float:
    """E[coverage] = 1 - C(N_r - 1, k) / C(N_r - 1 + N_f, k) for one shared distribution."""
    return 1.0 - math.comb(n_real - 1, k) / math.comb(n_real - 1 + n_fake, k)


def test_prdc_draws_equal_sample_sizes_from_both_sets_as_dgm_eval():
    real, fake = cluster_features(2000, range(8), 10), cluster_features(500, range(8), 11)
    result = metrics.prdc_dgm_eval(real, fake, k=5, max_samples=10_000, seed=3)
    assert (result["n_real"], result["n_generated"]) == (500, 500)
    assert (result["n_real_available"], result["n_generated_available"]) == (2000, 500)
    # Same distribution: E[coverage] = 0.969 at 500 vs 500 (0.673 at 2000 vs 500), E[density] 1.
    assert result["coverage"] == pytest.approx(
        expected_coverage_same_distribution(500, 500, 5), abs=0.04
    )
    assert result["density"] == pytest.approx(1.0, abs=0.15)
    rows_real, rows_fake = reference_prdc.dgm_eval_prdc_rows(2000, 500, 10_000, seed=3)
    expected = reference_prdc.compute_prdc(real[rows_real], fake[rows_fake], 5)
    assert {key: result[key] for key in expected} == pytest.approx(expected, abs=1e-12)
    # Half the modes dropped: half the real points covered.
    dropped = metrics.prdc_dgm_eval(real, cluster_features(500, range(4), 12), k=5, seed=3)
    assert dropped["coverage"] == pytest.approx(0.5, abs=0.06)
    capped = metrics.prdc_dgm_eval(real, fake, k=5, max_samples=300, seed=3)
    assert (capped["n_real"], capped["n_generated"], capped["max_samples"]) == (300, 300, 300)
    with pytest.raises(ValueError, match=r"2000 real, 500 generated\) = 5"):
        metrics.prdc_dgm_eval(real, fake, k=5, max_samples=5)


# ------------------------------------------------------------------ real faces


@pytest.fixture(scope="module")
def real_face_embeddings():
    """dlib 128-d embeddings of 7 real people x 3 variants (original, mirror, re-crop)."""
    from evaluation_data import real_face_crops, variants

    from face_embedding import DlibEmbedder

    crops = real_face_crops()
    names = sorted(crops)
    images = [np.asarray(v) for name in names for v in variants(crops[name], 3)]
    labels = [name for name in names for _ in range(3)]
    embeddings, found = DlibEmbedder().embed(images)
    assert found.all(), "dlib must find every shipped face"
    return embeddings, labels


def test_real_faces_same_person_variants_separate_from_other_people(real_face_embeddings):
    embeddings, labels = real_face_embeddings
    genuine, impostor = metrics.within_set_scores(embeddings, labels)
    result = metrics.verification_metrics(genuine, impostor)
    assert (result["n_genuine"], result["n_impostor"]) == (7 * 3, 21 * 20 // 2 - 21)
    assert result["eer"] == 0.0 and result["auc"] == 1.0
    assert result["decidability"] > 4.0 and result["fdr"] > 8.0
    assert genuine.min() > impostor.max()
    # Negative control: the same scores with identities shuffled do not separate.
    shuffled = list(np.random.default_rng(0).permutation(labels))
    control = metrics.verification_metrics(*metrics.within_set_scores(embeddings, shuffled))
    assert control["eer"] > 0.2 and control["decidability"] < 1.5


def test_real_faces_cross_set_genuine_is_same_name(real_face_embeddings):
    embeddings, labels = real_face_embeddings
    first = [i for i in range(len(labels)) if i % 3 < 2]  # original + mirror
    second = [i for i in range(len(labels)) if i % 3 == 2]  # re-cropped
    genuine, impostor = metrics.cross_set_scores(
        embeddings[first],
        [labels[i] for i in first],
        embeddings[second],
        [labels[i] for i in second],
    )
    result = metrics.verification_metrics(genuine, impostor)
    assert (result["n_genuine"], result["n_impostor"]) == (7 * 2, 14 * 7 - 14)
    assert result["eer"] == 0.0 and result["decidability"] > 4.0


@pytest.mark.parametrize("seed", range(6))
def test_eer_fvc2000_equals_pyeer(seed):
    """The official evaluation reports pyeer's EER; eer_fvc2000 is that number, exactly."""
    from pyeer.eer_stats import calculate_roc, get_eer_values

    rng = np.random.default_rng(seed)
    genuine = np.round(rng.normal(0.6, 0.15, 300), 2)  # rounded: ties, as real scores have
    impostor = np.round(rng.normal(0.2, 0.15, 3000), 2)
    _, fmr, fnmr = calculate_roc(genuine, impostor)
    expected = get_eer_values(np.asarray(fmr), np.asarray(fnmr))[-1]  # (..., EER)
    ours = metrics.verification_metrics(genuine, impostor)
    assert ours["eer_fvc2000"] == pytest.approx(expected, abs=1e-12)


def refuse_gathering(*args, **kwargs):
    raise AssertionError("pairs were scored one by one, not by matrix products")


@pytest.mark.parametrize("cap", [None, 1500, 10])  # all pairs; a dense sample; a sparse one
@pytest.mark.parametrize("cross", [False, True])
def test_scores_are_the_cosines_of_the_pairs_by_matrix_products(cross, cap, monkeypatch):
    """The block scorer gives the pairs of within/cross_set_pairs (same sample, impostors in the
    same order), and only a sample far smaller than its matrix is scored pair by pair."""
    rng = np.random.default_rng(7)
    labels_a, labels_b = rng.integers(0, 9, 60).astype(str), rng.integers(0, 11, 50).astype(str)
    a, b = rng.normal(size=(60, 16)), rng.normal(size=(50, 16))
    if not cross:
        b, labels_b = a, labels_a
    if cross:
        genuine_pairs, impostor_pairs = metrics.cross_set_pairs(labels_a, labels_b, cap, 3)
    else:
        genuine_pairs, impostor_pairs = metrics.within_set_pairs(labels_a, cap, 3)
    expected_genuine = metrics.pair_cosine_scores(a, b, genuine_pairs)
    expected_impostor = metrics.pair_cosine_scores(a, b, impostor_pairs)
    if cap != 10:
        monkeypatch.setattr(metrics, "pair_cosine_scores", refuse_gathering)
        monkeypatch.setattr(metrics, "_gathered_scores", refuse_gathering, raising=False)
    if cross:
        genuine, impostor = metrics.cross_set_scores(a, labels_a, b, labels_b, cap, 3)
    else:
        genuine, impostor = metrics.within_set_scores(a, labels_a, cap, 3)
    np.testing.assert_allclose(np.sort(genuine), np.sort(expected_genuine), rtol=0, atol=1e-14)
    np.testing.assert_allclose(impostor, expected_impostor, rtol=0, atol=1e-14)
    full = metrics.impostor_pair_count(labels_a, labels_b if cross else None)
    assert full == len(
        (metrics.cross_set_pairs if cross else metrics.within_set_pairs)(
            *((labels_a, labels_b) if cross else (labels_a,))
        )[1]
    )
