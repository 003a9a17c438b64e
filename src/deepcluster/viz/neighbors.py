"""Nearest-neighbour queries in feature space, random network vs trained (the paper's
appendix Figure 2).

Neighbours are found by cosine similarity of the clustering features (fc7 before its
ReLU), exactly (faiss ``IndexFlatIP`` on L2-normalised rows); a query is never its
own neighbour.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
from matplotlib.figure import Figure
from matplotlib.patches import Rectangle

from ..clustering import l2_normalize


def nearest_neighbors(features: np.ndarray, queries: Sequence[int] | np.ndarray, k: int = 5) -> np.ndarray:
    """The ``k`` most cosine-similar rows of ``features`` to each query row.

    Args:
        features: ``(n, D)`` float features.
        queries: row indices of the queries.
        k: neighbours per query (at most ``n - 1``).

    Returns:
        ``(len(queries), k)`` int64 row indices, most similar first, query excluded.
    """
    import faiss

    x = np.ascontiguousarray(l2_normalize(np.asarray(features, dtype=np.float32)), dtype=np.float32)
    q = np.asarray(queries, dtype=np.int64)
    n = len(x)
    if n < 2:
        raise ValueError(f"nearest neighbours need at least 2 images, got {n}")
    if q.size and (q.min() < 0 or q.max() >= n):
        raise ValueError(f"query indices must be in [0, {n}), got {q.min()}..{q.max()}")
    k = min(k, n - 1)
    index = faiss.IndexFlatIP(x.shape[1])
    index.add(x)
    _, idx = index.search(x[q], k + 1)
    out = np.empty((len(q), k), dtype=np.int64)
    for r, (qi, row) in enumerate(zip(q, idx)):
        row = [int(j) for j in row if j != qi and j >= 0]
        out[r] = row[:k]
    return out


def neighbor_label_agreement(features: np.ndarray, labels: np.ndarray, k: int = 5,
                             max_queries: int = 2000, seed: int = 0) -> float:
    """Fraction of the ``k`` nearest neighbours that share the query's label, averaged
    over up to ``max_queries`` random queries: a one-number summary of how semantic the
    feature space is (chance level is about the sum of squared class frequencies)."""
    labels = np.asarray(labels)
    rng = np.random.default_rng(seed)
    q = rng.choice(len(features), min(max_queries, len(features)), replace=False)
    nn = nearest_neighbors(features, q, k)
    return float((labels[nn] == labels[q, None]).mean())


def plot_neighbors(display: np.ndarray, queries: Sequence[int], nn_random: np.ndarray, nn_trained: np.ndarray,
                   labels: np.ndarray | None = None, class_names: Sequence[str] | None = None) -> Figure:
    """Rows: a query, its neighbours under the random network, then under the trained one.

    Args:
        display: ``(n, H, W, 3)`` pictures in [0, 1].
        queries: ``Q`` query row indices.
        nn_random, nn_trained: ``(Q, k)`` neighbour indices.
        labels: optional ``(n,)`` labels; neighbours with the query's label get a green
            frame, others a red one (labels are for reading the figure only).
        class_names: optional names of the labels (shown under the query).
    """
    q, k = nn_trained.shape
    ncols = 1 + 2 * k
    fig = Figure(figsize=(1.05 * ncols + 0.3, 1.15 * q + 0.7), dpi=100)
    axes = fig.subplots(q, ncols, squeeze=False)
    for r, qi in enumerate(queries):
        cells = [qi, *nn_random[r], *nn_trained[r]]
        for c, idx in enumerate(cells):
            ax = axes[r, c]
            ax.imshow(display[idx], interpolation="nearest")
            ax.set_xticks([])
            ax.set_yticks([])
            for s in ax.spines.values():
                s.set_visible(False)
            if c > 0 and labels is not None:
                ok = labels[idx] == labels[qi]
                h, w = display[idx].shape[:2]
                ax.add_patch(Rectangle((-0.5, -0.5), w, h, fill=False, lw=2.5,
                                       edgecolor="#2ca02c" if ok else "#d62728"))
            if c == 0 and labels is not None and class_names is not None:
                ax.set_xlabel(str(class_names[int(labels[qi])]), fontsize=7)
        if r == 0:
            axes[0, 0].set_title("query", fontsize=9)
            axes[0, 1 + k // 2].set_title("random network", fontsize=9)
            axes[0, 1 + k + k // 2].set_title("trained (DeepCluster)", fontsize=9)
    fig.tight_layout()
    return fig
