"""Label-free quality signals of a feature space (what a user without labels can log).

- :func:`rankme`: the effective rank of the embeddings (RankMe, Garrido et al., "RankMe:
  Assessing the downstream performance of pretrained self-supervised representations by
  their rank", ICML 2023): ``exp`` of the entropy of the normalised singular values. A
  collapsed representation (every image mapped near one point or one line) scores ~1;
  the paper finds that, within one method, a higher rank goes with better linear-probe
  accuracy.
- :func:`knn_agreement`: how many of an image's ``k`` nearest neighbours (cosine) under
  one augmentation are still its neighbours under another: invariance of the
  neighbourhood structure to the augmentations DeepCluster trains with.
- :func:`cluster_stability`: mean pairwise NMI between k-means runs that differ only in
  their seed: whether the features have a cluster structure that k-means finds again.

Arrays in, floats out; ``docs/QUALITY_SIGNAL.md`` measures how each tracks labelled
quality (kNN accuracy, k-means NMI) across networks of different quality.
"""

from __future__ import annotations

import itertools
from collections.abc import Sequence

import numpy as np

from .clustering import kmeans
from .clustering.preprocess import l2_normalize
from .metrics import nmi


def _as_matrix(x: np.ndarray, name: str, min_rows: int = 1) -> np.ndarray:
    """``x`` as a finite 2-D float array with at least ``min_rows`` rows, else ValueError."""
    x = np.asarray(x)
    if x.ndim != 2 or x.shape[0] < min_rows or x.shape[1] < 1:
        raise ValueError(f"{name} must be a 2-D array (N, D) with N >= {min_rows} and D >= 1, got shape {x.shape}")
    if not np.issubdtype(x.dtype, np.number) or not np.isfinite(x).all():
        raise ValueError(f"{name} must be finite numbers (no NaN/Inf)")
    return x


def rankme(z: np.ndarray, eps: float = 1e-7) -> float:
    """RankMe (Garrido et al., ICML 2023, eq. 1): the effective rank of embeddings.

    ``p_k = sigma_k / sum(sigma) + eps`` over the singular values ``sigma`` of ``z``, and
    ``RankMe = exp(-sum_k p_k log p_k)``; as in the paper, the embeddings are not centred.
    Equals ``r`` for a matrix of ``r`` equal non-zero singular values (up to ``eps``),
    and lies in ``[1, min(N, D)]`` (slightly more through ``eps``).

    Args:
        z: ``(N, D)`` embeddings.
        eps: the paper's smoothing constant (1e-7).

    Returns:
        The effective rank; ``0.0`` for an all-zero ``z`` (rank 0).

    Raises:
        ValueError: ``z`` not 2-D or not finite.
    """
    z = _as_matrix(z, "rankme: z")
    s = np.linalg.svd(z.astype(np.float64), compute_uv=False)
    if s.sum() == 0.0:
        return 0.0
    p = s / s.sum() + eps
    return float(np.exp(-(p * np.log(p)).sum()))


def cosine_neighbors(x: np.ndarray, k: int) -> np.ndarray:
    """``(N, k)`` int64 indices of each row's ``k`` nearest rows by cosine similarity,
    itself excluded, most similar first (faiss exact inner-product search on the
    L2-normalised rows)."""
    import faiss

    xn = np.ascontiguousarray(l2_normalize(x.astype(np.float32)), dtype=np.float32)
    index = faiss.IndexFlatIP(xn.shape[1])
    index.add(xn)
    _, idx = index.search(xn, k + 1)  # (N, k + 1), usually itself first
    rows = np.arange(len(xn))[:, None]
    is_self = idx == rows
    # Drop the row itself; where a tie pushed it out of the top k + 1, drop the last.
    drop = np.where(is_self.any(1), is_self.argmax(1), k)
    keep = np.ones_like(idx, dtype=bool)
    keep[np.arange(len(xn)), drop] = False
    return idx[keep].reshape(len(xn), k).astype(np.int64)


def knn_agreement(a: np.ndarray, b: np.ndarray, k: int = 10) -> float:
    """Mean fraction of each image's ``k`` nearest neighbours in view ``a`` that are also
    among its ``k`` nearest neighbours in view ``b``.

    Neighbours by cosine similarity, the image itself excluded. ``1.0`` when both views
    have the same neighbourhoods; about ``k / (N - 1)`` for unrelated views.

    Args:
        a: ``(N, D)`` features of N images under one augmentation.
        b: ``(N, D')`` features of the same N images (same order) under another.
        k: neighbours, ``1 <= k < N``.

    Raises:
        ValueError: shapes that do not match, ``k`` out of range, non-finite features.
    """
    a = _as_matrix(a, "knn_agreement: a", 2)
    b = _as_matrix(b, "knn_agreement: b", 2)
    if len(a) != len(b):
        raise ValueError(f"knn_agreement: the views must hold the same images, got {len(a)} and {len(b)} rows")
    if isinstance(k, bool) or not isinstance(k, (int, np.integer)) or not 1 <= k < len(a):
        raise ValueError(f"knn_agreement: k must be an integer with 1 <= k < N = {len(a)}, got {k!r}")
    na, nb = cosine_neighbors(a, int(k)), cosine_neighbors(b, int(k))
    shared = (na[:, :, None] == nb[:, None, :]).any(2).sum(1)  # (N,) neighbours in both lists
    return float(shared.mean() / k)


def cluster_stability(x: np.ndarray, k: int, seeds: Sequence[int] = (0, 1, 2), niter: int = 20,
                      backend: str = "faiss") -> float:
    """Mean pairwise NMI between k-means clusterings of ``x`` that differ only in the seed.

    Args:
        x: ``(N, D)`` features (for DeepCluster, the PCA-whitened, L2-normalised ones
            that the training clusters).
        k: clusters, ``1 <= k <= N``.
        seeds: at least two distinct k-means seeds.
        niter, backend: passed to :func:`deepcluster.clustering.kmeans`.

    Returns:
        The mean NMI over the ``len(seeds) * (len(seeds) - 1) / 2`` pairs, in [0, 1].

    Raises:
        ValueError: fewer than two distinct seeds, a bad ``k`` or non-finite ``x``.
    """
    x = _as_matrix(x, "cluster_stability: x")
    seeds = [int(s) for s in seeds]
    if len(set(seeds)) < 2 or len(set(seeds)) != len(seeds):
        raise ValueError(f"cluster_stability: needs at least two distinct seeds, got {seeds}")
    labels = [kmeans(np.ascontiguousarray(x, dtype=np.float32), k, niter=niter, seed=s, backend=backend).assignments
              for s in seeds]
    return float(np.mean([nmi(p, q) for p, q in itertools.combinations(labels, 2)]))
