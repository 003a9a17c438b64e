"""k-means with the paper's empty-cluster rule, on faiss or torch.

Lloyd's algorithm with two interchangeable *assignment* steps (nearest centroid):
``faiss`` (``IndexFlatL2``, CPU, or GPU when faiss has GPU support) and ``torch``
(batched matrix products on any device; under ``torch.distributed`` each rank keeps
its shard of the points and centroid sums and counts are all-reduced, the
DeepCluster-v2 design). The *update* step and the empty-cluster rule are shared, so
both backends give identical assignments from the same initial centroids.

Empty clusters (paper, Section 3.3): "when a cluster becomes empty, we randomly select
a non-empty cluster and use its centroid with a small random perturbation as the new
centroid for the empty cluster. We then reassign the points belonging to the non-empty
cluster to the two resulting clusters." We pick the donor uniformly among clusters
with at least two points (a singleton donor would only move the problem), perturb the
two centroids symmetrically along a random direction and split the donor's points by
the side of the hyperplane they lie on (equivalently, by the nearer of the two new
centroids). The rule is applied after every assignment step, including the last, so
the returned assignment never has an empty cluster.
"""

from __future__ import annotations

import logging
import time
from dataclasses import dataclass

import numpy as np
import torch

from ..distributed import all_reduce_sum

logger = logging.getLogger(__name__)

BACKENDS = ("faiss", "faiss-gpu", "torch")


@dataclass
class KMeansResult:
    """Outcome of :func:`kmeans`.

    Attributes:
        assignments: ``(N,)`` int64 cluster of each point (this rank's points when
            distributed), every cluster non-empty.
        centroids: ``(k, D)`` float32.
        loss: mean squared distance of the points to their centroid (all ranks).
        sizes: ``(k,)`` int64 cluster sizes (all ranks).
        n_empty_fixed: how many empty clusters were re-seeded over all iterations.
        seconds: wall time.
    """

    assignments: np.ndarray
    centroids: np.ndarray
    loss: float
    sizes: np.ndarray
    n_empty_fixed: int
    seconds: float


def _faiss_assign(x: np.ndarray, centroids: np.ndarray, gpu: bool) -> tuple[np.ndarray, np.ndarray]:
    import faiss

    d = centroids.shape[1]
    index = faiss.IndexFlatL2(d)
    if gpu:
        index = faiss.index_cpu_to_all_gpus(index)
    index.add(np.ascontiguousarray(centroids, dtype=np.float32))
    dist, idx = index.search(x, 1)
    return idx[:, 0].astype(np.int64), dist[:, 0]


def _torch_assign(x: torch.Tensor, centroids: torch.Tensor, chunk: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    k = centroids.shape[0]
    chunk = chunk or max(1, (1 << 26) // max(k, 1))  # ~256 MB of float32 distances per chunk
    c_sq = (centroids * centroids).sum(1)
    labels = torch.empty(x.shape[0], dtype=torch.int64, device=x.device)
    dists = torch.empty(x.shape[0], dtype=torch.float32, device=x.device)
    for s in range(0, x.shape[0], chunk):
        xb = x[s:s + chunk]
        d2 = (xb * xb).sum(1, keepdim=True) - 2.0 * (xb @ centroids.T) + c_sq
        val, idx = d2.min(1)
        labels[s:s + chunk] = idx
        dists[s:s + chunk] = val.clamp_min_(0.0)
    return labels, dists


def _sums_counts(x: torch.Tensor, labels: torch.Tensor, k: int) -> tuple[torch.Tensor, torch.Tensor]:
    sums = torch.zeros(k, x.shape[1], dtype=torch.float64, device=x.device)
    sums.index_add_(0, labels, x.to(torch.float64))
    counts = torch.bincount(labels, minlength=k).to(torch.float64)
    all_reduce_sum(sums)
    all_reduce_sum(counts)
    return sums, counts


def split_empty_clusters(
    x: torch.Tensor, labels: torch.Tensor, centroids: torch.Tensor, counts: torch.Tensor,
    rng: np.random.Generator, rel_eps: float = 1.0 / 1024,
) -> int:
    """Re-seed every empty cluster from a random donor and split the donor's points.

    Modifies ``labels`` (``(N,)``, this rank's points), ``centroids`` (``(k, D)``) and
    ``counts`` (``(k,)``, global) in place. ``rng`` must be seeded identically on every
    rank: donor choice and perturbation direction are then the same everywhere.

    Returns:
        The number of empty clusters re-seeded.
    """
    fixed = 0
    empty = torch.nonzero(counts == 0).flatten().tolist()
    for j in empty:
        donors = torch.nonzero(counts >= 2).flatten().cpu().numpy()
        if donors.size == 0:
            break  # fewer distinct points than clusters: nothing to split
        i = int(rng.choice(donors))
        direction = torch.from_numpy(rng.standard_normal(centroids.shape[1])).to(centroids)
        direction /= direction.norm().clamp_min(1e-12)
        scale = rel_eps * float(centroids[i].norm().clamp_min(1e-6))
        ci = centroids[i].clone()
        centroids[j] = ci + scale * direction
        centroids[i] = ci - scale * direction
        # The donor's points go to the nearer of the two new centroids: the side of the
        # hyperplane through c_i orthogonal to the perturbation.
        members = torch.nonzero(labels == i).flatten()
        side = ((x[members] - ci) @ direction) > 0
        n_side = all_reduce_sum(torch.tensor([float(side.sum()), float(members.numel())], dtype=torch.float64, device=x.device))
        if n_side[0] == 0 or n_side[0] == n_side[1]:
            # Degenerate (identical points): split by position instead.
            side = torch.arange(members.numel(), device=x.device) % 2 == 1
            n_side = all_reduce_sum(torch.tensor([float(side.sum()), float(members.numel())], dtype=torch.float64, device=x.device))
        moved = members[side]
        labels[moved] = j
        # Both new clusters get the mean of their points.
        for c in (i, j):
            sel = labels == c
            s = all_reduce_sum(x[sel].to(torch.float64).sum(0))
            n = all_reduce_sum(torch.tensor(float(sel.sum()), dtype=torch.float64, device=x.device))
            counts[c] = n
            if n > 0:
                centroids[c] = (s / n).to(centroids.dtype)
        fixed += 1
    return fixed


def kmeans(
    x: np.ndarray | torch.Tensor,
    k: int,
    niter: int = 20,
    seed: int = 0,
    backend: str = "faiss",
    init_centroids: np.ndarray | None = None,
    device: str | torch.device | None = None,
) -> KMeansResult:
    """Cluster the rows of ``x`` (``(N, D)`` float32) into ``k`` clusters.

    Args:
        x: the points (this rank's shard when distributed; then ``backend`` must be
            ``"torch"`` and ``init_centroids`` must be given or ``seed`` equal on ranks).
        k: number of clusters; must not exceed the number of points.
        niter: Lloyd iterations (paper: 20). All points are used (no subsampling).
        seed: seeds the initial centroids (``k`` distinct random points) and the
            empty-cluster rule. The paper draws a new seed every epoch.
        backend: ``"faiss"``, ``"faiss-gpu"`` or ``"torch"`` (see module docstring).
        init_centroids: ``(k, D)`` start instead of random points.
        device: device for the torch backend (default: where ``x`` lives, else CPU).
    """
    t0 = time.perf_counter()
    if backend not in BACKENDS:
        raise ValueError(f"unknown k-means backend {backend!r}; choose one of {BACKENDS}")
    if backend == "faiss-gpu":
        import faiss

        if not hasattr(faiss, "StandardGpuResources") or faiss.get_num_gpus() == 0:
            raise ValueError("--kmeans faiss-gpu needs a GPU build of faiss and a GPU; use --kmeans torch")
    xt = torch.as_tensor(x)
    if device is not None:
        xt = xt.to(device)
    xt = xt.to(torch.float32).contiguous()
    if xt.ndim != 2:
        raise ValueError(f"k-means expects a 2-D array, got shape {tuple(xt.shape)}")
    n_local, d = xt.shape
    n_total = int(all_reduce_sum(torch.tensor(float(n_local), dtype=torch.float64, device=xt.device)).item())
    if k < 1:
        raise ValueError(f"k must be >= 1, got {k}")
    if k > n_total:
        raise ValueError(f"k={k} is larger than the number of points ({n_total}); lower --k")
    if not torch.isfinite(xt).all():
        bad = int((~torch.isfinite(xt)).any(1).sum())
        raise ValueError(f"k-means input has NaN or Inf in {bad} rows")
    rng = np.random.default_rng(seed)
    if init_centroids is not None:
        centroids = torch.as_tensor(np.asarray(init_centroids, dtype=np.float32)).to(xt.device).clone()
        if centroids.shape != (k, d):
            raise ValueError(f"init_centroids has shape {tuple(centroids.shape)}, expected {(k, d)}")
    else:
        if n_local != n_total:
            raise ValueError("distributed k-means needs init_centroids chosen on one rank and broadcast")
        centroids = xt[torch.from_numpy(rng.choice(n_local, k, replace=False)).to(xt.device)].clone()

    x_np = xt.numpy() if backend.startswith("faiss") else None

    def assign(c: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        if x_np is not None:
            lab, dist = _faiss_assign(x_np, c.cpu().numpy(), backend == "faiss-gpu")
            return torch.from_numpy(lab), torch.from_numpy(dist)
        return _torch_assign(xt, c)

    fixed = 0
    for _ in range(niter):
        labels, _dist = assign(centroids)
        sums, counts = _sums_counts(xt, labels, k)
        nonempty = counts > 0
        centroids[nonempty] = (sums[nonempty] / counts[nonempty, None]).to(centroids.dtype)
        fixed += split_empty_clusters(xt, labels, centroids, counts, rng)
    labels, dist = assign(centroids)
    counts = all_reduce_sum(torch.bincount(labels, minlength=k).to(torch.float64))
    n_fixed_final = split_empty_clusters(xt, labels, centroids, counts, rng)
    fixed += n_fixed_final
    if n_fixed_final:
        dist = ((xt - centroids[labels]) ** 2).sum(1)
    loss = float(all_reduce_sum(dist.to(torch.float64).sum()).item()) / n_total
    seconds = time.perf_counter() - t0
    logger.debug("k-means: N=%d D=%d k=%d loss=%.4f empty-fixed=%d %.2fs", n_total, d, k, loss, fixed, seconds)
    return KMeansResult(
        assignments=labels.cpu().numpy().astype(np.int64),
        centroids=centroids.cpu().numpy().astype(np.float32),
        loss=loss,
        sizes=counts.cpu().numpy().astype(np.int64),
        n_empty_fixed=fixed,
        seconds=seconds,
    )
