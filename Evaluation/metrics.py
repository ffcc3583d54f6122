"""Evaluation metrics: identity verification, diversity (Vendi) and fidelity (FD, KD, PRDC).

Every function is plain numpy on arrays already in memory, so the script (`evaluate.py`),
the notebooks and the tests share one implementation.

Conventions (also written into every `metrics.json`, see `METRIC_DEFINITIONS`):
- A comparison score is the cosine similarity of two face embeddings; higher = more alike.
  A pair is accepted ("match") when score >= threshold.
- FMR(t) = #impostor scores >= t / #impostor, FNMR(t) = #genuine scores < t / #genuine.
- The ROC has one vertex per distinct score (tied scores move together, as in
  scikit-learn's `roc_curve(drop_intermediate=False)`) plus the vertex t = +inf (0, 0).
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass

import numpy as np

METRIC_DEFINITIONS = {
    "score": "cosine similarity of two embeddings; a pair is accepted when score >= threshold",
    "genuine": "all pairs of images with the same identity (within a set: i < j; across two "
    "sets: same identity folder name in both)",
    "impostor": "all pairs of images with different identities, or a uniform seeded sample "
    "without replacement of max_impostor_pairs of them when there are more",
    "roc": "one operating point per distinct score (ties grouped) plus threshold +inf; "
    "FMR(t) = share of impostor scores >= t, FNMR(t) = share of genuine scores < t",
    "eer": "the point where the ROC polyline (straight segments between operating points) "
    "crosses FMR = FNMR; exact linear interpolation between the two bracketing points",
    "eer_fvc2000": "EER as pyeer (used by the official ID-Booth evaluation) reports it: the "
    "midpoint (FMR + FNMR) / 2 at the operating point next to the crossing with the smaller "
    "FMR + FNMR (FVC2000's convention); it departs from eer where the ROC steps are coarse "
    "(few pairs, tied scores)",
    "eer_threshold": "threshold of the ROC operating point next to the EER crossing with the "
    "smaller |FMR - FNMR| (an achievable threshold; its FMR/FNMR are reported beside it)",
    "fnmr_at_fmr": "FNMR(t) at t = the lowest threshold with FMR(t) <= target, i.e. the lowest "
    "FNMR any threshold reaches within the FMR budget (no interpolation)",
    "fmr_at_fnmr": "FMR(t) at t = the highest threshold with FNMR(t) <= target, i.e. the lowest "
    "FMR any threshold reaches within the FNMR budget (no interpolation)",
    "auc": "area under the ROC (TPR = 1 - FNMR against FMR), trapezoidal = "
    "P(genuine > impostor) + 0.5 P(genuine = impostor)",
    "fdr": "Fisher discriminant ratio (mu_g - mu_i)^2 / (s_g^2 + s_i^2), population std (ddof 0)",
    "decidability": "d' = |mu_g - mu_i| / sqrt((s_g^2 + s_i^2) / 2), population std (ddof 0)",
    "vendi": "exp(-sum_i l_i log l_i), l_i the eigenvalues of K / n with K_ij the cosine "
    "similarity of the L2-normalised features (Friedman & Dieng 2023, q = 1)",
    "frechet_distance": "||mu_r - mu_g||^2 + tr(S_r) + tr(S_g) - 2 tr((S_r^1/2 S_g S_r^1/2)^1/2), "
    "unbiased covariances (ddof 1)",
    "kernel_distance": "unbiased MMD^2 with k(x, y) = (x.y / d + 1)^3 (the KID estimator) on "
    "n_subsets random subsets of subset_size images of each set (np.random.RandomState(seed), "
    "without replacement, real then generated, as dgm-eval); mean and std over subsets "
    "(dgm-eval: 100 subsets of 1000)",
    "prdc": "precision, recall, density, coverage of Naeem et al. 2020 with k nearest "
    "neighbours (Euclidean, strict '<' as in the reference code; float64, and a repeated "
    "vector is at exactly the same distances as its copy, so duplicates count exactly), on "
    "n = min(max_samples, N_real, N_generated) images drawn from EACH set, uniformly without "
    "replacement with np.random.RandomState(seed), real first (dgm-eval: reduced_n 10000)",
}

# Which way is better, for every number the report ranks ("higher" / "lower"; the paper marks
# each column with an arrow). Pose spread: higher = more varied poses (the paper's reading).
METRIC_DIRECTIONS = {
    "eer": "lower",
    "eer_fvc2000": "lower",
    "fnmr_at_fmr": "lower",
    "fmr_at_fnmr": "lower",
    "auc": "higher",
    "fdr": "higher",
    "decidability": "higher",
    "vendi": "higher",
    "frechet_distance": "lower",
    "kernel_distance": "lower",
    "precision": "higher",
    "recall": "higher",
    "density": "higher",
    "coverage": "higher",
    "crfiqa": "higher",
    "pose_std_per_identity": "higher",
}
ARROWS = {"higher": "↑", "lower": "↓"}


def arrow(metric: str) -> str:
    """'↑' / '↓' of a METRIC_DIRECTIONS key."""
    return ARROWS[METRIC_DIRECTIONS[metric]]


def definitions_with_directions() -> dict[str, str]:
    """METRIC_DEFINITIONS (plus CR-FIQA and pose) with '↑ higher is better: ' or '↓ lower is
    better: ' in front of every ranked metric, as metrics.json and the report state them."""
    definitions = {**METRIC_DEFINITIONS, **SECTION_DEFINITIONS}
    for metric, direction in METRIC_DIRECTIONS.items():
        if metric in definitions:
            definitions[metric] = f"{arrow(metric)} {direction} is better: {definitions[metric]}"
    return definitions


SECTION_DEFINITIONS = {
    "precision": "prdc: share of generated samples inside some real sample's k-NN ball (fidelity)",
    "recall": "prdc: share of real samples inside some generated sample's k-NN ball (diversity)",
    "density": "prdc: mean number of real k-NN balls holding a generated sample, over k",
    "coverage": "prdc: share of real samples whose k-NN ball holds a generated sample",
    "crfiqa": "CR-FIQA quality score of a detected, aligned face: the predicted relative "
    "classifiability (similarity to its own class centre over that to the nearest other), the "
    "quality head's raw output; mean +- std over the set's faces",
    "pose_std_per_identity": "population std of yaw, pitch or roll over one identity's faces, "
    "then mean +- std over identities (the paper's pose table, with mean +- std of each angle "
    "over all faces); degrees, 6DRepNet's signs: yaw > 0 turned to the image's left, pitch > 0 "
    "looking up, roll > 0 clockwise",
}

# ----------------------------------------------------------------------------- pairs


def l2_normalise(features: np.ndarray) -> np.ndarray:
    """Rows x / ||x||_2 in float64; ValueError on an all-zero row (no direction to keep)."""
    features = np.asarray(features, dtype=np.float64)
    norms = np.linalg.norm(features, axis=1, keepdims=True)
    if np.any(norms == 0):
        raise ValueError(f"{int(np.sum(norms == 0))} feature rows are all zero; drop them first")
    return features / norms


def _group_ends(labels: Sequence[str]) -> tuple[np.ndarray, np.ndarray]:
    """Stable sort by label: (order (N,), end of each sorted position's label group (N,))."""
    _, codes = np.unique(np.asarray(labels, dtype=object).astype(str), return_inverse=True)
    order = np.argsort(codes, kind="stable")
    return order, np.searchsorted(codes[order], codes[order], side="right")


def _sample_without_replacement(total: int, size: int, rng: np.random.Generator) -> np.ndarray:
    """Sorted uniform `size`-subset of range(total) in O(size) memory when size << total."""
    if total <= 4 * size:
        return np.sort(rng.permutation(total)[:size])
    # Distinct values of i.i.d. uniform draws, then a uniform subset of them: by symmetry every
    # size-subset is equally likely, and memory stays O(size) however many pairs there are.
    chosen = _sorted_distinct(rng.integers(0, total, size=size + size // 8 + 16, dtype=np.int64))
    while chosen.size < size:
        extra = rng.integers(0, total, size=size - chosen.size + 16, dtype=np.int64)
        chosen = _sorted_distinct(np.concatenate([chosen, extra]))
    return np.sort(rng.choice(chosen, size=size, replace=False))


def _sorted_distinct(values: np.ndarray) -> np.ndarray:
    """Sorted distinct values (sort-based; faster than np.unique's hashing for int64 here)."""
    values = np.sort(values)
    return values[np.r_[True, values[1:] != values[:-1]]] if values.size else values


def _expand_rows(counts: np.ndarray, cap: int | None, seed: int) -> tuple[np.ndarray, np.ndarray]:
    """(row, offset) for all sum(counts) slots, or a uniform sample of `cap` without replacement."""
    total = int(counts.sum())
    if cap is None or total <= cap:
        linear = np.arange(total, dtype=np.int64)
    else:
        linear = _sample_without_replacement(total, cap, np.random.default_rng(seed))
    row_ends = np.cumsum(counts)
    rows = np.searchsorted(row_ends, linear, side="right")
    offsets = linear - (row_ends[rows] - counts[rows])
    return rows, offsets


def _ordered_pairs(first: np.ndarray, second: np.ndarray) -> np.ndarray:
    """(P, 2) int64 pairs with the smaller index first."""
    return np.stack([np.minimum(first, second), np.maximum(first, second)], axis=1).astype(np.int64)


def within_set_pairs(
    labels: Sequence[str], max_impostor_pairs: int | None = None, seed: int = 0
) -> tuple[np.ndarray, np.ndarray]:
    """Index pairs (i < j) of one set: genuine (G, 2) same label, impostor (I, 2) different."""
    order, ends = _group_ends(labels)
    positions = np.arange(len(order))
    # Sorted position p pairs with the later positions of its own group: (p, ends[p]).
    rows, offsets = _expand_rows(ends - positions - 1, None, seed)
    genuine_pairs = _ordered_pairs(order[rows], order[rows + 1 + offsets])
    # ... and with every later position of another group: [ends[p], N).
    rows, offsets = _expand_rows(len(order) - ends, max_impostor_pairs, seed)
    impostor_pairs = _ordered_pairs(order[rows], order[ends[rows] + offsets])
    return genuine_pairs, impostor_pairs


def _shared_codes(
    labels_a: Sequence[str], labels_b: Sequence[str]
) -> tuple[np.ndarray, np.ndarray]:
    """Integer codes (N_A,), (N_B,) of both sets' labels in one vocabulary (equal name = code)."""
    names_a = np.asarray(labels_a, dtype=object).astype(str)
    names_b = np.asarray(labels_b, dtype=object).astype(str)
    vocabulary = np.unique(np.concatenate([names_a, names_b]))
    return np.searchsorted(vocabulary, names_a), np.searchsorted(vocabulary, names_b)


def cross_set_pairs(
    labels_a: Sequence[str],
    labels_b: Sequence[str],
    max_impostor_pairs: int | None = None,
    seed: int = 0,
) -> tuple[np.ndarray, np.ndarray]:
    """Pairs (i in A, j in B): genuine (G, 2) same label name, impostor (I, 2) different."""
    codes_a, codes_b = _shared_codes(labels_a, labels_b)
    order_b = np.argsort(codes_b, kind="stable")
    sorted_b = codes_b[order_b]
    group_start = np.searchsorted(sorted_b, codes_a, side="left")  # (N_A,) B-group of a's label
    group_end = np.searchsorted(sorted_b, codes_a, side="right")
    group_size = group_end - group_start
    rows, offsets = _expand_rows(group_size, None, seed)
    genuine_pairs = np.stack([rows, order_b[group_start[rows] + offsets]], axis=1)
    # Row i's impostors are B's sorted positions outside [group_start, group_end).
    rows, offsets = _expand_rows(len(order_b) - group_size, max_impostor_pairs, seed)
    positions = np.where(offsets < group_start[rows], offsets, offsets + group_size[rows])
    impostor_pairs = np.stack([rows, order_b[positions]], axis=1)
    return genuine_pairs.astype(np.int64), impostor_pairs.astype(np.int64)


# Scores come from blocks of matrix products (unit_a[rows] @ unit_b.T): 15-30 ns per entry in
# float64 on one core of the 2-core test machine, where gathering the two embeddings of each pair
# took 1-3 us per pair. A sampled pair set far smaller than its matrix is still gathered.
BLOCK_ENTRIES = 1 << 22  # score entries per block of a matrix product (32 MB of float64)
GATHER_OVER_MATMUL = 64  # a gathered pair costs about this many matrix-product entries


def _row_blocks(n_rows: int, n_columns: int) -> list[tuple[int, int]]:
    """[begin, end) row ranges whose (rows x n_columns) products hold about BLOCK_ENTRIES."""
    step = max(1, BLOCK_ENTRIES // max(n_columns, 1))
    return [(begin, min(begin + step, n_rows)) for begin in range(0, n_rows, step)]


KeepMask = Callable[[int, int, np.ndarray], np.ndarray]  # (begin, end, columns) -> bool mask
FirstColumn = Callable[[int], int]  # block's first row -> first column it can keep


def _dense_scores(
    unit_a: np.ndarray,
    unit_b: np.ndarray,
    keep: KeepMask,
    total: int,
    first_column: FirstColumn | None = None,
) -> np.ndarray:
    """(total,) cos(a_r, b_c) of every kept entry in row-major order, block by block.

    keep(begin, end, columns) -> bool (end - begin, len(columns)) mask of the entries of rows
    [begin, end) against the columns given; first_column(begin) -> the first column any row of
    the block can keep (the rest is not multiplied).
    """
    scores = np.empty(total, dtype=np.float64)
    filled = 0
    for begin, end in _row_blocks(len(unit_a), len(unit_b)):
        start = first_column(begin) if first_column is not None else 0
        products = unit_a[begin:end] @ unit_b[start:].T  # (rows, columns)
        chosen = products[keep(begin, end, np.arange(start, len(unit_b)))]
        scores[filled : filled + chosen.size] = chosen
        filled += chosen.size
    return scores


def _sampled_scores(
    unit_a: np.ndarray,
    unit_b: np.ndarray,
    rows: np.ndarray,
    columns: np.ndarray,
    first_column: FirstColumn | None = None,
) -> np.ndarray:
    """cos(a_rows[p], b_columns[p]) (P,) for pairs sorted by row: by blocks of matrix products
    when the pairs fill their blocks enough, else pair by pair (first_column as _dense_scores)."""
    if len(rows) * GATHER_OVER_MATMUL < len(unit_a) * len(unit_b):
        return _gathered_scores(unit_a, unit_b, np.stack([rows, columns], axis=1))
    scores = np.empty(len(rows), dtype=np.float64)
    for begin, end in _row_blocks(len(unit_a), len(unit_b)):
        first, last = np.searchsorted(rows, [begin, end])
        start = first_column(begin) if first_column is not None else 0
        products = unit_a[begin:end] @ unit_b[start:].T  # (rows, columns from start)
        scores[first:last] = products[rows[first:last] - begin, columns[first:last] - start]
    return scores


def _gathered_scores(
    unit_a: np.ndarray, unit_b: np.ndarray, pairs: np.ndarray, chunk: int = 16384
) -> np.ndarray:
    """a_i . b_j of unit rows for each pair (i, j) of `pairs` (P, 2) -> (P,), in chunks."""
    scores = np.empty(len(pairs), dtype=np.float64)
    for begin in range(0, len(pairs), chunk):
        block = pairs[begin : begin + chunk]
        scores[begin : begin + chunk] = np.einsum(
            "pd,pd->p", unit_a[block[:, 0]], unit_b[block[:, 1]]
        )
    return scores


def pair_cosine_scores(
    embeddings_a: np.ndarray, embeddings_b: np.ndarray, pairs: np.ndarray
) -> np.ndarray:
    """cos(a_i, b_j) for each pair (i, j) of `pairs` (P, 2) -> (P,) float64."""
    return _gathered_scores(l2_normalise(embeddings_a), l2_normalise(embeddings_b), pairs)


def _group_bounds(codes: np.ndarray) -> dict[int, tuple[int, int]]:
    """{code: [start, end)} of each run of equal values in sorted `codes`."""
    values, starts, sizes = np.unique(codes, return_index=True, return_counts=True)
    return {int(v): (int(s), int(s + n)) for v, s, n in zip(values, starts, sizes, strict=True)}


def within_set_scores(
    embeddings: np.ndarray,
    labels: Sequence[str],
    max_impostor_pairs: int | None = None,
    seed: int = 0,
) -> tuple[np.ndarray, np.ndarray]:
    """Genuine and impostor cosine scores of one set of (N, D) embeddings: the pairs of
    within_set_pairs (the same sample for the same cap and seed), scored by matrix products."""
    order, ends = _group_ends(labels)
    unit = l2_normalise(embeddings)[order]  # (N, D) grouped by label
    genuine = [
        _dense_scores(
            unit[start:end],
            unit[start:end],
            lambda b, e, columns: columns[None, :] > np.arange(b, e)[:, None],  # i < j
            (end - start) * (end - start - 1) // 2,
            first_column=lambda b: b + 1,
        )
        for start, end in _group_bounds(ends).values()
    ]
    # Sorted position p's impostors: every later position of another group, [ends[p], N).
    counts = len(order) - ends
    total = int(counts.sum())
    if max_impostor_pairs is None or total <= max_impostor_pairs:
        impostor = _dense_scores(
            unit,
            unit,
            lambda b, e, columns: columns[None, :] >= ends[b:e, None],
            total,
            first_column=lambda b: ends[b],
        )
    else:
        rows, offsets = _expand_rows(counts, max_impostor_pairs, seed)
        impostor = _sampled_scores(
            unit, unit, rows, ends[rows] + offsets, first_column=lambda b: ends[b]
        )
    return np.concatenate([np.zeros(0), *genuine]), impostor


def cross_set_scores(
    embeddings_a: np.ndarray,
    labels_a: Sequence[str],
    embeddings_b: np.ndarray,
    labels_b: Sequence[str],
    max_impostor_pairs: int | None = None,
    seed: int = 0,
) -> tuple[np.ndarray, np.ndarray]:
    """Genuine and impostor cosine scores between set A (e.g. synthetic) and set B (real): the
    pairs of cross_set_pairs (the same sample for the same cap and seed), by matrix products."""
    codes_a, codes_b = _shared_codes(labels_a, labels_b)
    order_a, order_b = np.argsort(codes_a, kind="stable"), np.argsort(codes_b, kind="stable")
    unit_a = l2_normalise(embeddings_a)  # (N_A, D) in A's order
    unit_b = l2_normalise(embeddings_b)[order_b]  # (N_B, D) grouped by label
    groups_b = _group_bounds(codes_b[order_b])
    sorted_a = unit_a[order_a]
    genuine = [
        _dense_scores(
            sorted_a[start:end],
            unit_b[groups_b[code][0] : groups_b[code][1]],
            lambda b, e, columns: np.ones((e - b, columns.size), dtype=bool),
            (end - start) * (groups_b[code][1] - groups_b[code][0]),
        )
        for code, (start, end) in _group_bounds(codes_a[order_a]).items()
        if code in groups_b
    ]
    # Row i's impostors are B's grouped positions outside its own label's [start, end).
    group_start = np.searchsorted(codes_b[order_b], codes_a, side="left")  # (N_A,)
    group_end = np.searchsorted(codes_b[order_b], codes_a, side="right")
    counts = len(order_b) - (group_end - group_start)
    total = int(counts.sum())
    if max_impostor_pairs is None or total <= max_impostor_pairs:
        impostor = _dense_scores(
            unit_a,
            unit_b,
            lambda b, e, columns: (
                (columns[None, :] < group_start[b:e, None])
                | (columns[None, :] >= group_end[b:e, None])
            ),
            total,
        )
    else:
        rows, offsets = _expand_rows(counts, max_impostor_pairs, seed)
        group_size = (group_end - group_start)[rows]
        positions = np.where(offsets < group_start[rows], offsets, offsets + group_size)
        impostor = _sampled_scores(unit_a, unit_b, rows, positions)
    return np.concatenate([np.zeros(0), *genuine]), impostor


def impostor_pair_count(labels_a: Sequence[str], labels_b: Sequence[str] | None = None) -> int:
    """Impostor pairs within one set (labels_b None) or between two sets: their full number."""
    if labels_b is None:
        _, sizes = np.unique(np.asarray(labels_a, dtype=object).astype(str), return_counts=True)
        return int((sizes.sum() ** 2 - np.sum(sizes**2)) // 2)
    codes_a, codes_b = _shared_codes(labels_a, labels_b)
    vocabulary_size = max(codes_a.max(initial=0), codes_b.max(initial=0)) + 1
    same = np.sum(np.bincount(codes_a, minlength=vocabulary_size)[codes_b])
    return int(len(codes_a) * len(codes_b) - same)


def per_identity_consistency(embeddings: np.ndarray, labels: Sequence[str]) -> dict[str, dict]:
    """Per identity: mean and minimum cosine over its genuine pairs (i < j), and counts."""
    labels = np.asarray(labels, dtype=object).astype(str)
    unit = l2_normalise(embeddings)
    result = {}
    for name in np.unique(labels):
        members = unit[labels == name]  # (n, D)
        first, second = np.triu_indices(len(members), k=1)
        scores = np.einsum("pd,pd->p", members[first], members[second])
        result[str(name)] = {
            "n_images": int(len(members)),
            "n_pairs": int(scores.size),
            "mean": float(scores.mean()) if scores.size else math.nan,
            "min": float(scores.min()) if scores.size else math.nan,
        }
    return result


# ------------------------------------------------------------------- verification


@dataclass(frozen=True)
class RocCurve:
    """Operating points of 'accept when score >= threshold', thresholds descending."""

    thresholds: np.ndarray  # (K,) thresholds[0] = +inf
    fmr: np.ndarray  # (K,) non-decreasing, 0 -> 1
    fnmr: np.ndarray  # (K,) non-increasing, 1 -> 0
    n_genuine: int  # FNMR moves in steps of 1 / n_genuine
    n_impostor: int  # FMR moves in steps of 1 / n_impostor


def _check_scores(genuine: np.ndarray, impostor: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Float64 1-D copies; ValueError when a set is empty or holds NaN/inf."""
    genuine = np.asarray(genuine, dtype=np.float64).ravel()
    impostor = np.asarray(impostor, dtype=np.float64).ravel()
    for name, values in (("genuine", genuine), ("impostor", impostor)):
        if values.size == 0:
            raise ValueError(f"no {name} scores: need at least one {name} pair")
        if not np.all(np.isfinite(values)):
            raise ValueError(f"{name} scores contain NaN or inf")
    return genuine, impostor


def roc_curve(genuine: np.ndarray, impostor: np.ndarray) -> RocCurve:
    """ROC vertices at +inf and at every distinct score (ties grouped)."""
    genuine, impostor = _check_scores(genuine, impostor)
    scores = np.concatenate([genuine, impostor])
    is_genuine = np.concatenate([np.ones(genuine.size, bool), np.zeros(impostor.size, bool)])
    order = np.argsort(-scores, kind="mergesort")
    scores, is_genuine = scores[order], is_genuine[order]
    last_of_tie = np.r_[np.flatnonzero(np.diff(scores)), scores.size - 1]
    accepted_genuine = np.cumsum(is_genuine)[last_of_tie]
    accepted_impostor = np.cumsum(~is_genuine)[last_of_tie]
    return RocCurve(
        thresholds=np.r_[np.inf, scores[last_of_tie]],
        fmr=np.r_[0, accepted_impostor] / impostor.size,
        fnmr=np.r_[genuine.size, genuine.size - accepted_genuine] / genuine.size,
        n_genuine=int(genuine.size),
        n_impostor=int(impostor.size),
    )


def equal_error_rate(roc: RocCurve) -> dict[str, float]:
    """EER where the ROC polyline crosses FMR = FNMR, and the nearest achievable threshold."""
    gap = roc.fnmr - roc.fmr  # non-increasing from 1 (t = +inf) to -1 (t = min score)
    after = int(np.argmax(gap <= 0))
    if gap[after] == 0:
        eer, nearest = float(roc.fmr[after]), after
    else:
        before = after - 1
        fraction = gap[before] / (gap[before] - gap[after])
        eer = float(roc.fmr[before] + fraction * (roc.fmr[after] - roc.fmr[before]))
        use_before = before > 0 and abs(gap[before]) <= abs(gap[after])
        nearest = before if use_before else after
    return {
        "eer": eer,
        "eer_threshold": float(roc.thresholds[nearest]),
        "eer_threshold_fmr": float(roc.fmr[nearest]),
        "eer_threshold_fnmr": float(roc.fnmr[nearest]),
    }


def eer_fvc2000(roc: RocCurve) -> float:
    """EER as pyeer reports it (the convention of the official ID-Booth evaluation; Maio et al.,
    FVC2000, IEEE TPAMI 2002): at the first threshold (ascending) where FMR <= FNMR, or the one
    before it, whichever has the smaller FMR + FNMR, the midpoint (FMR + FNMR) / 2."""
    # Ascending thresholds as pyeer's ROC, plus the vertex +inf (FMR 0, FNMR 1) last: pyeer
    # has no such point and returns EER = 1 when every score ties; here that gives 0.5.
    fmr, fnmr = roc.fmr[::-1], roc.fnmr[::-1]
    diff = fmr - fnmr
    after = int(np.flatnonzero(diff <= 0)[0])  # the vertex +inf qualifies
    before = after - 1 if diff[after] != 0 and after != 0 else after
    chosen = before if fmr[before] + fnmr[before] <= fmr[after] + fnmr[after] else after
    return float((fmr[chosen] + fnmr[chosen]) / 2)


def fnmr_at_fmr(roc: RocCurve, target: float) -> dict[str, float]:
    """Lowest FNMR among thresholds with FMR <= target, and that threshold."""
    index = int(np.flatnonzero(roc.fmr <= target)[-1])  # vertex +inf always qualifies
    return {"value": float(roc.fnmr[index]), "threshold": float(roc.thresholds[index])}


def fmr_at_fnmr(roc: RocCurve, target: float) -> dict[str, float]:
    """Lowest FMR among thresholds with FNMR <= target, and that threshold."""
    index = int(np.flatnonzero(roc.fnmr <= target)[0])  # the lowest score always qualifies
    return {"value": float(roc.fmr[index]), "threshold": float(roc.thresholds[index])}


def roc_auc(roc: RocCurve) -> float:
    """Trapezoidal area sum_i (FMR_i+1 - FMR_i) (TPR_i+1 + TPR_i) / 2, TPR = 1 - FNMR."""
    # Written out rather than np.trapezoid (numpy >= 2.0 only; requirements allow 1.26).
    tpr = 1.0 - roc.fnmr
    return float((np.diff(roc.fmr) * (tpr[1:] + tpr[:-1]) / 2.0).sum())


def fisher_discriminant_ratio(genuine: np.ndarray, impostor: np.ndarray) -> float:
    """FDR = (mu_g - mu_i)^2 / (s_g^2 + s_i^2); inf when both spreads are 0 and means differ."""
    genuine, impostor = _check_scores(genuine, impostor)
    numerator = (genuine.mean() - impostor.mean()) ** 2
    denominator = genuine.var() + impostor.var()
    return _safe_ratio(numerator, denominator)


def decidability(genuine: np.ndarray, impostor: np.ndarray) -> float:
    """Daugman's d' = |mu_g - mu_i| / sqrt((s_g^2 + s_i^2) / 2)."""
    genuine, impostor = _check_scores(genuine, impostor)
    numerator = abs(genuine.mean() - impostor.mean())
    denominator = math.sqrt((genuine.var() + impostor.var()) / 2.0)
    return _safe_ratio(numerator, denominator)


def _safe_ratio(numerator: float, denominator: float) -> float:
    """numerator / denominator with x/0 = inf (x > 0) and 0/0 = nan."""
    if denominator > 0:
        return float(numerator / denominator)
    return math.inf if numerator > 0 else math.nan


def verification_metrics(
    genuine: np.ndarray,
    impostor: np.ndarray,
    fmr_targets: Sequence[float] = (1e-2, 1e-3),
    fnmr_targets: Sequence[float] = (1e-2, 1e-3),
) -> dict:
    """All identity-separability numbers of one genuine/impostor score set (see definitions)."""
    genuine, impostor = _check_scores(genuine, impostor)
    roc = roc_curve(genuine, impostor)
    return {
        "n_genuine": int(genuine.size),
        "n_impostor": int(impostor.size),
        "genuine_mean": float(genuine.mean()),
        "genuine_std": float(genuine.std()),
        "impostor_mean": float(impostor.mean()),
        "impostor_std": float(impostor.std()),
        **equal_error_rate(roc),
        "eer_fvc2000": eer_fvc2000(roc),
        "auc": roc_auc(roc),
        "fdr": fisher_discriminant_ratio(genuine, impostor),
        "decidability": decidability(genuine, impostor),
        "fnmr_at_fmr": {f"{t:g}": fnmr_at_fmr(roc, t) for t in fmr_targets},
        "fmr_at_fnmr": {f"{t:g}": fmr_at_fnmr(roc, t) for t in fnmr_targets},
    }


# ---------------------------------------------------------------------- diversity


def vendi_score(features: np.ndarray) -> float:
    """Vendi score exp(-sum l log l), l = eigenvalues of K/n, K = cosine-similarity kernel."""
    unit = l2_normalise(features)  # (n, d)
    n, dim = unit.shape
    # X X^T / n and X^T X / n share their non-zero eigenvalues; take the smaller matrix.
    gram = (unit.T @ unit if dim < n else unit @ unit.T) / n
    eigenvalues = np.linalg.eigvalsh(gram)
    eigenvalues = eigenvalues[eigenvalues > 0]  # drop round-off negatives, as vendi-score does
    return float(np.exp(-np.sum(eigenvalues * np.log(eigenvalues))))


def vendi_per_identity(features: np.ndarray, labels: Sequence[str]) -> dict:
    """Vendi score of each identity's features, with mean and population std over identities."""
    labels = np.asarray(labels, dtype=object).astype(str)
    per_identity = {
        name: {
            "vendi": vendi_score(features[labels == name]),
            "n_images": int(np.sum(labels == name)),
        }
        for name in np.unique(labels)
    }
    values = np.array([entry["vendi"] for entry in per_identity.values()])
    return {
        "mean": float(values.mean()),
        "std": float(values.std()),
        "n_identities": len(per_identity),
        "n_images": int(labels.size),
        "per_identity": per_identity,
    }


# ----------------------------------------------------------------------- fidelity


def gaussian_statistics(features: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Mean (D,) and unbiased covariance (D, D) of (N, D) features."""
    features = np.asarray(features, dtype=np.float64)
    if features.ndim != 2 or features.shape[0] < 2:
        raise ValueError(f"need (N >= 2, D) features for a covariance, got {features.shape}")
    return features.mean(axis=0), np.cov(features, rowvar=False)


def _psd_eigenvalues_clipped(eigenvalues: np.ndarray) -> np.ndarray:
    """Eigenvalues below the rank tolerance max|l| * n * eps (round-off of a PSD matrix) -> 0."""
    tolerance = np.max(np.abs(eigenvalues), initial=0.0) * eigenvalues.size * np.finfo(float).eps
    return np.where(eigenvalues > tolerance, eigenvalues, 0.0)


def _psd_sqrt(matrix: np.ndarray) -> np.ndarray:
    """Symmetric square root of a symmetric PSD matrix via eigh."""
    eigenvalues, eigenvectors = np.linalg.eigh((matrix + matrix.T) / 2.0)
    return (eigenvectors * np.sqrt(_psd_eigenvalues_clipped(eigenvalues))) @ eigenvectors.T


def frechet_distance(
    mu_a: np.ndarray, sigma_a: np.ndarray, mu_b: np.ndarray, sigma_b: np.ndarray
) -> float:
    """||mu_a - mu_b||^2 + tr(S_a + S_b) - 2 tr sqrt(S_a^1/2 S_b S_a^1/2) (= tr sqrt(S_a S_b))."""
    if mu_a.shape != mu_b.shape or sigma_a.shape != sigma_b.shape:
        raise ValueError(f"feature sizes differ: {mu_a.shape} vs {mu_b.shape}")
    root_a = _psd_sqrt(sigma_a)
    middle = root_a @ sigma_b @ root_a  # symmetric PSD, same spectrum as S_a S_b
    middle_eigenvalues = _psd_eigenvalues_clipped(np.linalg.eigvalsh((middle + middle.T) / 2.0))
    mean_term = float(np.sum((mu_a - mu_b) ** 2))
    trace_sqrt = float(np.sum(np.sqrt(middle_eigenvalues)))
    return mean_term + float(np.trace(sigma_a) + np.trace(sigma_b)) - 2.0 * trace_sqrt


def frechet_distance_features(real: np.ndarray, generated: np.ndarray) -> dict:
    """Frechet distance between Gaussian fits of (N_r, D) real and (N_g, D) generated features."""
    value = frechet_distance(*gaussian_statistics(real), *gaussian_statistics(generated))
    result = {"value": value, "n_real": int(len(real)), "n_generated": int(len(generated))}
    if min(len(real), len(generated)) <= real.shape[1]:
        result["note"] = (
            f"fewer samples than feature dimensions ({real.shape[1]}): covariances are "
            "rank-deficient and the estimate is strongly biased; compare only at equal N"
        )
    return result


def polynomial_kernel(
    x: np.ndarray, y: np.ndarray, degree: int = 3, gamma: float | None = None, coef0: float = 1.0
) -> np.ndarray:
    """k(x, y) = (gamma x.y + coef0)^degree, gamma = 1/D by default -> (N_x, N_y)."""
    gamma = 1.0 / x.shape[1] if gamma is None else gamma
    return (gamma * (np.asarray(x, np.float64) @ np.asarray(y, np.float64).T) + coef0) ** degree


def mmd2_unbiased(x: np.ndarray, y: np.ndarray) -> float:
    """Unbiased MMD^2 = mean_{i!=j} k(x_i,x_j) + mean_{i!=j} k(y_i,y_j) - 2 mean k(x_i,y_j)."""
    m, n = len(x), len(y)
    if m < 2 or n < 2:
        raise ValueError(f"unbiased MMD needs >= 2 samples per set, got {m} and {n}")
    k_xx, k_yy, k_xy = polynomial_kernel(x, x), polynomial_kernel(y, y), polynomial_kernel(x, y)
    within_x = (k_xx.sum() - np.trace(k_xx)) / (m * (m - 1))
    within_y = (k_yy.sum() - np.trace(k_yy)) / (n * (n - 1))
    return float(within_x + within_y - 2.0 * k_xy.mean())


def kernel_distance(
    real: np.ndarray,
    generated: np.ndarray,
    n_subsets: int = 100,
    subset_size: int = 1000,
    seed: int = 0,
) -> dict:
    """KD (KID form): MMD^2 over random equal-size subsets, as dgm-eval's compute_mmd."""
    size = min(subset_size, len(real), len(generated))
    # dgm-eval draws with np.random.choice (legacy global RNG), real then generated per subset;
    # a seeded RandomState gives those same draws without the global state.
    choice = np.random.RandomState(seed).choice
    values = np.array(
        [
            mmd2_unbiased(
                real[choice(len(real), size, replace=False)],
                generated[choice(len(generated), size, replace=False)],
            )
            for _ in range(n_subsets)
        ]
    )
    return {
        "mean": float(values.mean()),
        "std": float(values.std()),
        "n_subsets": int(n_subsets),
        "subset_size": int(size),
        "n_real": int(len(real)),
        "n_generated": int(len(generated)),
    }


def _distinct_rows(
    real: np.ndarray, generated: np.ndarray
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Bitwise-distinct rows U (M, D) of both sets in order of first appearance, and each real
    (N_r,) / generated (N_g,) row's index into U (a plain range when nothing repeats)."""
    both = np.ascontiguousarray(np.concatenate([real, generated]))  # (N_r + N_g, D)
    as_bytes = both.view(np.dtype((np.void, both.dtype.itemsize * both.shape[1]))).ravel()
    _, first, inverse = np.unique(as_bytes, return_index=True, return_inverse=True)
    order = np.argsort(first)  # distinct rows by first appearance
    rank = np.empty_like(order)
    rank[order] = np.arange(order.size)
    index = rank[inverse.reshape(-1)]
    return both[first[order]], index[: len(real)], index[len(real) :]


def _columns(matrix: np.ndarray, index: np.ndarray) -> np.ndarray:
    """matrix[:, index], as a view when index is a contiguous range (the usual, duplicate-free
    case), which saves a gather of the whole block."""
    if index.size and np.all(np.diff(index) == 1):
        return matrix[:, index[0] : index[-1] + 1]
    return matrix[:, index]


def _distances_from(rows: np.ndarray, points: np.ndarray, squared_norms: np.ndarray) -> np.ndarray:
    """Euclidean distances (c, M) from points[rows] to every point, 0 to the row's own point.

    sqrt(max(|a|^2 + |b|^2 - 2 a.b, 0)) in float64. A BLAS product rounds the same pair
    differently at different positions, so PRDC takes every distance it compares from one row
    of one call against the distinct points: a duplicate is the same entry, not a near-copy.
    """
    distances = points[rows] @ points.T  # (c, M), becomes the squared distances in place
    distances *= -2.0
    distances += squared_norms[rows, None]
    distances += squared_norms[None, :]
    distances[np.arange(len(rows)), rows] = 0.0
    np.maximum(distances, 0.0, out=distances)
    return np.sqrt(distances, out=distances)


def _ball_memberships(
    centres: np.ndarray,
    others: np.ndarray,
    points: np.ndarray,
    k: int,
    chunk: int,
) -> tuple[np.ndarray, np.ndarray]:
    """k-NN balls around each centre (radius: k-th nearest other centre, strict '<'):
    how many balls hold each of `others` (N_o,), and whether each ball holds any (N_c,).

    centres (N_c,) and others (N_o,) index rows of `points` (the distinct vectors).
    """
    squared_norms = np.einsum("md,md->m", points, points)
    holding = np.zeros(len(others), dtype=np.int64)
    holds_any = np.zeros(len(centres), dtype=bool)
    for begin in range(0, len(centres), chunk):
        distances = _distances_from(centres[begin : begin + chunk], points, squared_norms)
        # The centre itself (distance 0) is index 0, as in prdc's k + 1-th smallest.
        radii = np.partition(_columns(distances, centres), k, axis=1)[:, k]  # (c,)
        inside = _columns(distances, others) < radii[:, None]  # (c, N_o)
        holding += inside.sum(axis=0)
        holds_any[begin : begin + chunk] = inside.any(axis=1)
    return holding, holds_any


def prdc(real: np.ndarray, generated: np.ndarray, k: int = 5, chunk: int = 512) -> dict:
    """Precision, recall, density, coverage (Naeem et al. 2020) with k-NN balls."""
    real = np.asarray(real, dtype=np.float64)
    generated = np.asarray(generated, dtype=np.float64)
    if len(real) <= k or len(generated) <= k:
        raise ValueError(
            f"PRDC with k={k} needs more than {k} samples per set, "
            f"got {len(real)} real and {len(generated)} generated"
        )
    points, real_index, generated_index = _distinct_rows(real, generated)
    # Real balls: which fakes they hold (precision, density) and whether any (coverage).
    fakes_in_real_balls, real_covered = _ball_memberships(
        real_index, generated_index, points, k, chunk
    )
    # Fake balls: which reals they hold (recall).
    reals_in_fake_balls, _ = _ball_memberships(generated_index, real_index, points, k, chunk)
    return {
        "precision": float(np.mean(fakes_in_real_balls > 0)),
        "recall": float(np.mean(reals_in_fake_balls > 0)),
        "density": float(fakes_in_real_balls.sum() / (k * len(generated))),
        "coverage": float(np.mean(real_covered)),
        "k": int(k),
        "n_real": int(len(real)),
        "n_generated": int(len(generated)),
    }


def dgm_eval_sample_rows(
    n_real: int, n_generated: int, max_samples: int, seed: int
) -> tuple[np.ndarray, np.ndarray]:
    """dgm-eval's PRDC draw: n = min(max_samples, N_r, N_g) row indices of EACH set, uniform
    without replacement, real first, from one np.random.RandomState(seed)."""
    # dgm-eval (__main__.compute_scores) calls np.random.choice on the global legacy RNG; a
    # seeded RandomState is that generator without the global state.
    size = min(max_samples, n_real, n_generated)
    random = np.random.RandomState(seed)
    real_rows = random.choice(n_real, size, replace=False)
    return real_rows, random.choice(n_generated, size, replace=False)


def prdc_dgm_eval(
    real: np.ndarray, generated: np.ndarray, k: int = 5, max_samples: int = 10_000, seed: int = 0
) -> dict:
    """PRDC as dgm-eval runs it: on n = min(max_samples, N_r, N_g) images drawn from each set."""
    size = min(max_samples, len(real), len(generated))
    if size <= k:
        raise ValueError(
            f"PRDC with k={k} needs more than {k} images drawn from each set, got "
            f"min(max {max_samples}, {len(real)} real, {len(generated)} generated) = {size}"
        )
    real_rows, generated_rows = dgm_eval_sample_rows(len(real), len(generated), max_samples, seed)
    result = prdc(np.asarray(real)[real_rows], np.asarray(generated)[generated_rows], k)
    return {
        **result,
        "n_real_available": int(len(real)),
        "n_generated_available": int(len(generated)),
        "max_samples": int(max_samples),
        "seed": int(seed),
    }
