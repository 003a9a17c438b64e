"""The clustering phase of an epoch on features spread over ranks."""

from __future__ import annotations

import time
from typing import Any

import numpy as np
import torch

from ..distributed import broadcast_object, gather_by_index, is_main_process
from .kmeans import kmeans
from .pic import run_pic


def cluster_shards(x: np.ndarray, indices: np.ndarray, num_images: int, cluster: Any, seed: int,
                   device: torch.device | None = None) -> dict[str, Any]:
    """k-means (or PIC) on PCA-reduced features; assignments of all ``num_images``.

    Args:
        x: ``(n_rank, pca_dim)`` this rank's features (all of them in one process).
        indices: ``(n_rank,)`` their data-set indices.
        cluster: the run's ``cluster`` config section (method, k, niter, backend, pic_*).
        device: where the torch k-means backend runs (default CPU).

    k-means keeps each rank's shard and all-reduces sums and counts (every backend);
    PIC needs the whole graph: the features are gathered and rank 0's result broadcast.
    The assignments of all ranks are gathered by index.

    Returns:
        ``assignments`` (``(num_images,)`` int64), ``centroids``, ``loss``,
        ``n_empty_fixed`` and ``cluster_s``.
    """
    c = cluster
    t1 = time.perf_counter()
    if c.method == "kmeans":
        res = kmeans(x, c.k, niter=c.niter, seed=seed, backend=c.backend,
                     device=device if c.backend == "torch" else None, indices=indices)
        assignments = gather_by_index(indices, torch.from_numpy(res.assignments), num_images).numpy()
        out = {"assignments": assignments, "centroids": res.centroids, "loss": res.loss,
               "n_empty_fixed": res.n_empty_fixed}
    else:
        xg = gather_by_index(indices, torch.from_numpy(np.asarray(x, dtype=np.float32)), num_images).numpy()
        out = None
        if is_main_process():
            pic = run_pic(xg, n_neighbors=c.pic_neighbors, sigma=c.pic_sigma, n_iter=c.pic_iters,
                          use_gpu=c.backend != "faiss")
            assignments = pic.assignments
            centroids = np.stack([xg[assignments == j].mean(0) for j in range(pic.num_clusters)]).astype(np.float32)
            out = {"assignments": assignments, "centroids": centroids,
                   "loss": float(((xg - centroids[assignments]) ** 2).sum(1).mean()), "n_empty_fixed": 0}
        out = broadcast_object(out)
    out["assignments"] = np.asarray(out["assignments"]).astype(np.int64)
    out["cluster_s"] = time.perf_counter() - t1
    return out
