"""Clustering metrics: NMI, ARI and Hungarian accuracy. Pure functions on label arrays.

NMI follows the paper: ``NMI(A; B) = I(A; B) / sqrt(H(A) H(B))`` (the geometric mean
normalisation; scikit-learn's ``average_method="geometric"``).
"""

from __future__ import annotations

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
