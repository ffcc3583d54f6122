"""PRDC and kernel distance re-typed from the reference code, for the tests only.

- `compute_prdc`: clovaai/generative-evaluation-prdc `prdc/prdc.py` (copied unchanged into
  layer6ai-labs/dgm-eval `dgm_eval/metrics/prdc.py`), distances from scikit-learn.
- `dgm_eval_prdc_rows`: the PRDC sampling in dgm-eval `dgm_eval/__main__.py` `compute_scores`.
- `dgm_eval_mmd`: dgm-eval `dgm_eval/metrics/mmd.py` `compute_mmd` / `compute_polynomial_mmd`.

dgm-eval draws from the global legacy RNG (`np.random.choice`, seeded by `np.random.seed` in
its data loader); here an `np.random.RandomState(seed)` stands in for it: the same generator,
the same calls in the same order, without touching global state.
"""

from __future__ import annotations

import numpy as np
import sklearn.metrics
from sklearn.metrics.pairwise import polynomial_kernel


def compute_pairwise_distance(data_x: np.ndarray, data_y: np.ndarray | None = None) -> np.ndarray:
    """prdc: sklearn Euclidean distances (N_x, N_y), n_jobs=8 as in the reference."""
    if data_y is None:
        data_y = data_x
    return sklearn.metrics.pairwise_distances(data_x, data_y, metric="euclidean", n_jobs=8)


def get_kth_value(unsorted: np.ndarray, k: int, axis: int = -1) -> np.ndarray:
    """prdc: the k-th smallest value along an axis (max of the k smallest)."""
    indices = np.argpartition(unsorted, k, axis=axis)[..., :k]
    k_smallests = np.take_along_axis(unsorted, indices, axis=axis)
    return k_smallests.max(axis=axis)


def compute_nearest_neighbour_distances(input_features: np.ndarray, nearest_k: int) -> np.ndarray:
    """prdc: distance to the k-th nearest neighbour (the k + 1-th value counts the self 0)."""
    distances = compute_pairwise_distance(input_features)
    return get_kth_value(distances, k=nearest_k + 1, axis=-1)


def compute_prdc(real_features: np.ndarray, fake_features: np.ndarray, nearest_k: int) -> dict:
    """prdc: precision, recall, density, coverage."""
    real_radii = compute_nearest_neighbour_distances(real_features, nearest_k)
    fake_radii = compute_nearest_neighbour_distances(fake_features, nearest_k)
    distance_real_fake = compute_pairwise_distance(real_features, fake_features)
    precision = (distance_real_fake < np.expand_dims(real_radii, axis=1)).any(axis=0).mean()
    recall = (distance_real_fake < np.expand_dims(fake_radii, axis=0)).any(axis=1).mean()
    density = (1.0 / float(nearest_k)) * (
        distance_real_fake < np.expand_dims(real_radii, axis=1)
    ).sum(axis=0).mean()
    coverage = (distance_real_fake.min(axis=1) < real_radii).mean()
    return {
        "precision": float(precision),
        "recall": float(recall),
        "density": float(density),
        "coverage": float(coverage),
    }


def dgm_eval_prdc_rows(
    n_real: int, n_generated: int, reduced_n: int, seed: int
) -> tuple[np.ndarray, np.ndarray]:
    """dgm-eval compute_scores: inds0, inds1 of its 'prdc' branch (realism off)."""
    random = np.random.RandomState(seed)
    reduced_n = min(reduced_n, n_real, n_generated)
    inds0 = random.choice(n_real, reduced_n, replace=False)
    inds1 = np.arange(n_generated)
    inds1 = random.choice(inds1, min(inds1.shape[0], reduced_n), replace=False)
    return inds0, inds1


def dgm_eval_mmd(
    feat_real: np.ndarray,
    feat_gen: np.ndarray,
    n_subsets: int = 100,
    subset_size: int = 1000,
    seed: int = 0,
) -> np.ndarray:
    """dgm-eval compute_mmd: unbiased polynomial-kernel MMD^2 of each random subset pair."""
    m = min(feat_real.shape[0], feat_gen.shape[0])
    subset_size = min(subset_size, m)
    mmds = np.zeros(n_subsets)
    choice = np.random.RandomState(seed).choice
    for i in range(n_subsets):
        g = feat_real[choice(len(feat_real), subset_size, replace=False)]
        r = feat_gen[choice(len(feat_gen), subset_size, replace=False)]
        mmds[i] = compute_polynomial_mmd(g, r)
    return mmds


def compute_polynomial_mmd(feat_r: np.ndarray, feat_gen: np.ndarray) -> float:
    """dgm-eval: k(x, y) = (<x, y> / d + 1)^3, then _mmd2_and_variance's MMD^2."""
    k_xx = polynomial_kernel(feat_r, degree=3, gamma=None, coef0=1)
    k_yy = polynomial_kernel(feat_gen, degree=3, gamma=None, coef0=1)
    k_xy = polynomial_kernel(feat_r, feat_gen, degree=3, gamma=None, coef0=1)
    m = k_xx.shape[0]
    kt_xx_sum = (k_xx.sum(axis=1) - np.diagonal(k_xx)).sum()
    kt_yy_sum = (k_yy.sum(axis=1) - np.diagonal(k_yy)).sum()
    mmd2 = (kt_xx_sum + kt_yy_sum) / (m * (m - 1))
    return float(mmd2 - 2 * k_xy.sum(axis=0).sum() / (m * m))
