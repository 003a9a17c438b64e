"""Clustering metrics: NMI, ARI and Hungarian accuracy. Pure functions on label arrays.

NMI follows the paper: ``NMI(A; B) = I(A; B) / sqrt(H(A) H(B))`` (the geometric mean
normalisation; scikit-learn's ``average_method="geometric"``).
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import NamedTuple

import numpy as np
from scipy.optimize import linear_sum_assignment


def _check_pair(a: np.ndarray, b: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    a = np.asarray(a).ravel()
    b = np.asarray(b).ravel()
    if a.shape != b.shape:
        raise ValueError(f"labelings differ in length: {a.size} vs {b.size}")
    if a.size == 0:
        raise ValueError("labelings are empty")
    return a, b


def contingency(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    """Dense contingency table ``(n_labels_a, n_labels_b)`` of two labelings."""
    a, b = _check_pair(a, b)
    _, ai = np.unique(a, return_inverse=True)
    _, bi = np.unique(b, return_inverse=True)
    table = np.zeros((ai.max() + 1, bi.max() + 1), dtype=np.int64)
    np.add.at(table, (ai, bi), 1)
    return table


def _entropy(counts: np.ndarray) -> float:
    p = counts[counts > 0] / counts.sum()
    return float(-(p * np.log(p)).sum())


def nmi(a: np.ndarray, b: np.ndarray) -> float:
    """Normalised mutual information ``I(A;B) / sqrt(H(A) H(B))`` in [0, 1].

    Two constant labelings are identical (1.0); one constant labeling against a
    non-constant one shares no information (0.0).
    """
    table = contingency(a, b).astype(np.float64)
    n = table.sum()
    ha, hb = _entropy(table.sum(1)), _entropy(table.sum(0))
    if ha == 0.0 and hb == 0.0:
        return 1.0
    if ha == 0.0 or hb == 0.0:
        return 0.0
    nz = table > 0
    pij = table[nz] / n
    outer = np.outer(table.sum(1), table.sum(0))[nz] / (n * n)
    mi = float((pij * np.log(pij / outer)).sum())
    return max(0.0, min(1.0, mi / np.sqrt(ha * hb)))


def ari(a: np.ndarray, b: np.ndarray) -> float:
    """Adjusted Rand index (Hubert & Arabie), 1.0 for identical partitions."""
    table = contingency(a, b).astype(np.float64)
    n = table.sum()
    comb = lambda x: x * (x - 1) / 2.0  # noqa: E731
    sum_ij = comb(table).sum()
    sum_a, sum_b = comb(table.sum(1)).sum(), comb(table.sum(0)).sum()
    expected = sum_a * sum_b / comb(n) if n > 1 else 0.0
    max_index = (sum_a + sum_b) / 2.0
    if max_index == expected:
        return 1.0
    return float((sum_ij - expected) / (max_index - expected))


def hungarian_accuracy(pred: np.ndarray, truth: np.ndarray) -> float:
    """Accuracy of ``pred`` under the best one-to-one matching of its clusters to classes.

    Clusters left unmatched (more clusters than classes) count as errors.
    """
    table = contingency(pred, truth)
    rows, cols = linear_sum_assignment(-table)
    return float(table[rows, cols].sum() / table.sum())


def match_clusters(new: np.ndarray, old: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """The one-to-one matching of ``new``'s cluster ids to ``old``'s that maximises the
    number of items with matched ids (two labellings of the same items).

    Returns:
        ``(new_ids, old_ids)``, equal-length arrays of matched cluster ids (ids that
        appear in the labellings; with different numbers of clusters some stay unmatched).
    """
    rows, cols = linear_sum_assignment(-contingency(new, old))  # rows/cols: sorted unique ids
    return np.unique(np.ravel(new))[rows], np.unique(np.ravel(old))[cols]


def cluster_purity(pred: np.ndarray, truth: np.ndarray) -> np.ndarray:
    """Per cluster (sorted cluster ids), the fraction of members in its majority class."""
    table = contingency(pred, truth)
    return table.max(1) / table.sum(1)


# ---------------------------------------------------------------------------------------
# Retrieval: average precision and precision@k as the revisited Oxford / Paris protocol
# computes them (Radenović, Iscen, Tolias, Avrithis, Chum, CVPR 2018; ``compute_ap`` and
# ``compute_map`` of their ``revisitop`` code, which keep Philbin et al.'s trapezoidal AP).
# ---------------------------------------------------------------------------------------

REVISITED_SETTINGS = ("easy", "medium", "hard")
RETRIEVAL_KAPPAS = (1, 5, 10)


class RetrievalScores(NamedTuple):
    """mAP and mean precision@k over the queries that have positives.

    Attributes:
        map: mean AP in [0, 1] (NaN when no query has a positive).
        aps: ``(Q,)`` AP per query, NaN for a query without positives (skipped).
        mp: ``(K,)`` mean precision at each of ``kappas``.
        precisions: ``(Q, K)`` precision@k per query, NaN rows for skipped queries.
        kappas: the ``k`` values.
    """

    map: float
    aps: np.ndarray
    mp: np.ndarray
    precisions: np.ndarray
    kappas: tuple[int, ...]


def rank_database(scores: np.ndarray) -> np.ndarray:
    """Database indices by decreasing score, one row per query: ``(Q, N) -> (Q, N)`` int64.

    Ties are broken by database index, smallest first (a stable sort of ``-scores``), so
    a ranking never depends on the sort algorithm or on the machine.

    Raises:
        ValueError: ``scores`` is not 2-D or holds NaN.
    """
    scores = np.asarray(scores)
    if scores.ndim != 2:
        raise ValueError(f"scores must be (queries, database), got shape {scores.shape}")
    if np.isnan(scores).any():
        raise ValueError(f"scores hold NaN for {int(np.isnan(scores).any(1).sum())} queries")
    return np.argsort(-scores, axis=1, kind="stable").astype(np.int64)


def _positive_ranks(ranking: np.ndarray, positives: np.ndarray, junk: np.ndarray) -> np.ndarray:
    """0-based ranks of the positives once the junk images are removed from ``ranking``."""
    if np.intersect1d(positives, junk).size:
        raise ValueError(f"images {np.intersect1d(positives, junk)[:5].tolist()} are both positive and junk "
                         "for one query")
    kept = ranking[~np.isin(ranking, junk)]
    return np.flatnonzero(np.isin(kept, positives))


def average_precision(ranking: np.ndarray, positives: np.ndarray, junk: np.ndarray = ()) -> float:
    """AP of one query, as revisitop's ``compute_ap``: junk images are removed from the
    ranking, then the area under the precision-recall curve is summed as trapezoids.

    For the ``j``-th positive (0-based) at rank ``r`` (0-based, junk removed) the term is
    ``(p0 + p1) / 2 / n`` with ``p0 = j / r`` (1 when ``r = 0``), ``p1 = (j + 1) / (r + 1)``
    and ``n`` the number of positives (those missing from a truncated ranking count in
    ``n`` and add nothing).

    Args:
        ranking: ``(N,)`` database indices, best first (see :func:`rank_database`).
        positives: database indices of the relevant images (non-empty).
        junk: database indices to ignore.

    Raises:
        ValueError: no positives, or an image both positive and junk.
    """
    positives = np.unique(np.asarray(positives, dtype=np.int64))
    if positives.size == 0:
        raise ValueError("average precision needs at least one positive")
    ranks = _positive_ranks(np.asarray(ranking), positives, np.asarray(junk, dtype=np.int64))
    j = np.arange(ranks.size)
    p0 = np.where(ranks == 0, 1.0, j / np.maximum(ranks, 1))
    p1 = (j + 1) / (ranks + 1)
    return float(((p0 + p1) / 2.0).sum() / positives.size)


def precision_at_k(ranking: np.ndarray, positives: np.ndarray, junk: np.ndarray = (),
                   kappas: Sequence[int] = RETRIEVAL_KAPPAS) -> np.ndarray:
    """Precision@k of one query as revisitop's ``compute_map``: junk removed, and
    ``k`` capped at the (1-based) rank of the last positive retrieved, so that a query
    with 3 positives all in the top 3 has precision@10 = 1. ``(K,)``; zeros when no
    positive is in ``ranking``."""
    if min(kappas, default=1) < 1:
        raise ValueError(f"precision@k needs k >= 1, got {list(kappas)}")
    positives = np.unique(np.asarray(positives, dtype=np.int64))
    ranks = _positive_ranks(np.asarray(ranking), positives, np.asarray(junk, dtype=np.int64)) + 1
    if ranks.size == 0:
        return np.zeros(len(kappas))
    caps = np.minimum(ranks.max(), np.asarray(kappas))
    return np.array([(ranks <= k).sum() / k for k in caps], dtype=np.float64)


def mean_average_precision(rankings: np.ndarray, ground_truth: Sequence[Mapping[str, Sequence[int]]],
                           kappas: Sequence[int] = RETRIEVAL_KAPPAS) -> RetrievalScores:
    """mAP and mP@k over queries, as revisitop's ``compute_map``.

    Args:
        rankings: ``(Q, N)`` database indices per query, best first (``N`` may be a
            truncated top list).
        ground_truth: per query a mapping with ``"ok"`` (positives) and optionally
            ``"junk"`` (ignored images), database indices. A query without positives
            is skipped (NaN in ``aps`` and ``precisions``, left out of the means).
        kappas: the ``k`` of precision@k (protocol: 1, 5, 10).
    """
    rankings = np.asarray(rankings)
    if rankings.ndim != 2 or rankings.shape[0] != len(ground_truth):
        raise ValueError(f"rankings must be (queries, database) with one row per ground-truth query "
                         f"({len(ground_truth)}), got shape {rankings.shape}")
    aps = np.full(len(ground_truth), np.nan)
    prs = np.full((len(ground_truth), len(kappas)), np.nan)
    for i, g in enumerate(ground_truth):
        if len(g["ok"]) == 0:
            continue
        junk = g.get("junk", ())
        aps[i] = average_precision(rankings[i], g["ok"], junk)
        prs[i] = precision_at_k(rankings[i], g["ok"], junk, kappas)
    done = ~np.isnan(aps)
    mean_ap = float(aps[done].mean()) if done.any() else float("nan")
    mp = prs[done].mean(0) if done.any() else np.full(len(kappas), np.nan)
    return RetrievalScores(mean_ap, aps, mp, prs, tuple(int(k) for k in kappas))


def revisited_ground_truth(gnd: Sequence[Mapping[str, Sequence[int]]], setting: str) -> list[dict[str, np.ndarray]]:
    """The revisited protocol's positives and junk for ``setting``, from per-query
    ``{"easy", "hard", "junk"}`` index lists:

    - easy: positives = easy, junk = junk + hard;
    - medium: positives = easy + hard, junk = junk;
    - hard: positives = hard, junk = junk + easy.
    """
    if setting not in REVISITED_SETTINGS:
        raise ValueError(f"unknown revisited setting {setting!r}; choose one of {list(REVISITED_SETTINGS)}")
    parts = {"easy": (("easy",), ("junk", "hard")), "medium": (("easy", "hard"), ("junk",)),
             "hard": (("hard",), ("junk", "easy"))}[setting]
    return [{name: np.concatenate([np.asarray(g[k], dtype=np.int64).ravel() for k in keys])
             for name, keys in zip(("ok", "junk"), parts)} for g in gnd]


def revisited_map(rankings: np.ndarray, gnd: Sequence[Mapping[str, Sequence[int]]],
                  kappas: Sequence[int] = RETRIEVAL_KAPPAS) -> dict[str, RetrievalScores]:
    """:func:`mean_average_precision` in each revisited setting (easy, medium, hard)."""
    return {s: mean_average_precision(rankings, revisited_ground_truth(gnd, s), kappas) for s in REVISITED_SETTINGS}
