"""k-means with the paper's empty-cluster rule, on faiss or torch, in one process or many.

Lloyd's algorithm with interchangeable *assignment* steps (nearest centroid):
``faiss`` (``IndexFlatL2`` on CPU), ``faiss-gpu`` (the same index on this rank's GPU,
when faiss has GPU support) and ``torch`` (batched matrix products on any device). The
*update* step and the empty-cluster rule are shared, so every backend gives identical
assignments from the same initial centroids.

Distributed (DeepCluster-v2 design, as in swav's ``main_deepclusterv2.py``): under
``torch.distributed`` each rank keeps only its shard of the points; the initial
centroids are chosen on rank 0 (``k`` distinct global row numbers, the rows then
contributed by the ranks that own them), centroid sums, counts and the loss are
all-reduced, and the empty-cluster rule draws from a generator seeded identically on
every rank (rank 0's seed is broadcast). Given the global index of every local row, a
sharded run starts from exactly the centroids a single process would pick with the same
seed, and gives the same assignments up to the summation order of the centroid sums.

Empty clusters (paper, Section 3.3): "when a cluster becomes empty, we randomly select
a non-empty cluster and use its centroid with a small random perturbation as the new
centroid for the empty cluster. We then reassign the points belonging to the non-empty
cluster to the two resulting clusters." We pick the donor uniformly among clusters
with at least two points (a singleton donor would only move the problem), perturb the
two centroids symmetrically along a random direction and split the donor's points by
the side of the hyperplane they lie on (equivalently, by the nearer of the two new
centroids). The rule is applied after every assignment step, including the last, so
the returned assignment never has an empty cluster.

Memory: the points are never copied whole. The torch backend reads them in row chunks
(so they may be stored as float16/bfloat16 and are converted chunk by chunk); the
faiss backends need a float32 array (a float16 input is converted once, with a warning
in the log).
"""

from __future__ import annotations

import logging
import time
from dataclasses import dataclass

import numpy as np
import torch

from ..distributed import (all_gather_counts, all_reduce_sum, broadcast_, broadcast_object, is_distributed, local_rank,
                           rank)

logger = logging.getLogger(__name__)

BACKENDS = ("faiss", "faiss-gpu", "torch")

_SUM_CHUNK = 1 << 20  # rows per sparse product in the update step (float32 inside, float64 across)


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
        iterations: Lloyd iterations run (fewer than asked once no assignment changes:
            the result is then the same as running them all).
    """

    assignments: np.ndarray
    centroids: np.ndarray
    loss: float
    sizes: np.ndarray
    n_empty_fixed: int
    seconds: float
    iterations: int = 0


def faiss_has_gpu() -> bool:
    """Whether the installed faiss was built with GPU support and sees a GPU."""
    try:
        import faiss
    except ImportError:
        return False
    return hasattr(faiss, "StandardGpuResources") and faiss.get_num_gpus() > 0


class _FaissAssigner:
    """Nearest centroid with a flat L2 index, on CPU or on this rank's GPU."""

    def __init__(self, gpu: bool) -> None:
        import faiss

        self.faiss = faiss
        self.res = faiss.StandardGpuResources() if gpu else None
        self.gpu_id = local_rank() % max(faiss.get_num_gpus(), 1) if gpu else -1

    def __call__(self, x: np.ndarray, centroids: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        index = self.faiss.IndexFlatL2(centroids.shape[1])
        if self.res is not None:
            index = self.faiss.index_cpu_to_gpu(self.res, self.gpu_id, index)
        index.add(np.ascontiguousarray(centroids, dtype=np.float32))
        dist, idx = index.search(x, 1)
        return idx[:, 0].astype(np.int64), dist[:, 0]


def _torch_assign(x: torch.Tensor, centroids: torch.Tensor, chunk: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    """Nearest centroid of every row of ``x`` (``(N, D)``, any float dtype) among
    ``centroids`` (``(k, D)`` float32): labels ``(N,)`` int64 and squared distances
    ``(N,)`` float32. Rows go in chunks of about 256 MB of distances."""
    k = centroids.shape[0]
    chunk = chunk or max(1, (1 << 26) // max(k, 1))
    c_sq = (centroids * centroids).sum(1)
    labels = torch.empty(x.shape[0], dtype=torch.int64, device=x.device)
    dists = torch.empty(x.shape[0], dtype=torch.float32, device=x.device)
    for s in range(0, x.shape[0], chunk):
        xb = x[s:s + chunk].to(torch.float32)
        # ||x||^2 is the same for every centroid: argmin over ||c||^2 - 2 x.c, added after.
        d2 = torch.addmm(c_sq, xb, centroids.T, alpha=-2.0)
        val, idx = d2.min(1)
        labels[s:s + chunk] = idx
        dists[s:s + chunk] = (val + (xb * xb).sum(1)).clamp_min_(0.0)
    return labels, dists


def _sums_counts(x: torch.Tensor, labels: torch.Tensor, k: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-cluster sums ``(k, D)`` and counts ``(k,)`` in float64, over all ranks.

    Chunks of rows are summed in float32 (a sparse one-hot product on CPU, ``index_add_``
    on GPU: faiss' own update accumulates in float32 too) and the chunks in float64.
    """
    sums = torch.zeros(k, x.shape[1], dtype=torch.float64, device=x.device)
    for s in range(0, x.shape[0], _SUM_CHUNK):
        xb = x[s:s + _SUM_CHUNK].to(torch.float32)
        lb = labels[s:s + _SUM_CHUNK]
        if x.device.type == "cpu":
            onehot = torch.sparse_coo_tensor(torch.stack([lb, torch.arange(lb.numel())]),
                                             torch.ones(lb.numel()), (k, lb.numel()), check_invariants=False)
            sums += torch.sparse.mm(onehot, xb)
        else:
            sums += torch.zeros(k, x.shape[1], dtype=torch.float32, device=x.device).index_add_(0, lb, xb)
    counts = torch.bincount(labels, minlength=k).to(torch.float64)
    all_reduce_sum(sums)
    all_reduce_sum(counts)
    return sums, counts


def _n_changed(new: torch.Tensor, old: torch.Tensor) -> int:
    """Points whose cluster changed, over all ranks."""
    return int(all_reduce_sum(torch.tensor(float((new != old).sum()), dtype=torch.float64)).item())


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
        side = ((x[members].to(centroids.dtype) - ci) @ direction) > 0
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


def _global_rows(n_local: int, indices: np.ndarray | torch.Tensor | None, n_total: int) -> np.ndarray:
    """Global row number of each local row: ``indices`` if given, else rank order."""
    if indices is None:
        counts = all_gather_counts(n_local)
        offset = sum(counts[:rank()])
        return np.arange(offset, offset + n_local, dtype=np.int64)
    ids = np.asarray(indices.cpu() if isinstance(indices, torch.Tensor) else indices).astype(np.int64).ravel()
    if ids.shape[0] != n_local:
        raise ValueError(f"indices has {ids.shape[0]} entries for {n_local} points")
    if ids.size and (ids.min() < 0 or ids.max() >= n_total):
        raise ValueError(f"indices must lie in [0, {n_total}) (the number of points over all ranks)")
    if np.unique(ids).size != ids.size:
        raise ValueError("indices contains duplicates; each point needs its own global index")
    return ids


def _initial_centroids(x: torch.Tensor, k: int, rng: np.random.Generator, n_total: int,
                       indices: np.ndarray | torch.Tensor | None) -> torch.Tensor:
    """``k`` distinct random points (global rows drawn on rank 0), ``(k, D)`` float32."""
    chosen = rng.choice(n_total, k, replace=False)  # same draw as a single process with this seed
    if not is_distributed() and indices is None:
        return x[torch.from_numpy(chosen).to(x.device)].to(torch.float32).clone()
    chosen = broadcast_object(chosen)  # rank 0's choice wins
    ids = _global_rows(x.shape[0], indices, n_total)
    order = np.argsort(ids)
    pos = np.searchsorted(ids[order], chosen)
    pos = np.minimum(pos, max(len(ids) - 1, 0))
    owned = (ids[order][pos] == chosen) if len(ids) else np.zeros(k, dtype=bool)
    init = torch.zeros(k, x.shape[1], dtype=torch.float32, device=x.device)
    rows = torch.from_numpy(order[pos[owned]]).to(x.device)
    init[torch.from_numpy(np.nonzero(owned)[0]).to(x.device)] = x[rows].to(torch.float32)
    return all_reduce_sum(init)  # each row is contributed by exactly one rank


def _checked_input(x: np.ndarray | torch.Tensor, k: int, backend: str, device: str | torch.device | None
                   ) -> tuple[torch.Tensor, int]:
    """``x`` as the backend wants it (float32 on CPU for faiss), and the number of points
    over all ranks; a one-line ``ValueError`` for what k-means cannot take."""
    if backend not in BACKENDS:
        raise ValueError(f"unknown k-means backend {backend!r}; choose one of {BACKENDS}")
    if backend == "faiss-gpu" and not faiss_has_gpu():
        raise ValueError("--kmeans faiss-gpu needs a GPU build of faiss and a GPU; use --kmeans torch "
                         "(runs on the GPU without faiss) or --kmeans faiss (CPU)")
    xt = torch.as_tensor(x)
    if device is not None and backend == "torch":
        xt = xt.to(device)
    if backend != "torch" or xt.dtype not in (torch.float16, torch.bfloat16, torch.float32):
        if xt.dtype in (torch.float16, torch.bfloat16) and backend != "torch":
            logger.info("k-means %s: converting %s points to float32 (%.1f GB)", backend, xt.dtype,
                        xt.numel() * 4 / 1e9)
        xt = xt.to(torch.float32)
    if backend != "torch":
        xt = xt.cpu()
    xt = xt.contiguous()
    if xt.ndim != 2:
        raise ValueError(f"k-means expects a 2-D array, got shape {tuple(xt.shape)}")
    n_local = xt.shape[0]
    n_total = int(all_reduce_sum(torch.tensor(float(n_local), dtype=torch.float64)).item())
    if k < 1:
        raise ValueError(f"k must be >= 1, got {k}")
    if k > n_total:
        raise ValueError(f"k={k} is larger than the number of points ({n_total}); lower --k")
    bad = torch.zeros((), dtype=torch.float64)
    for s in range(0, n_local, _SUM_CHUNK):  # a row with a NaN/Inf has a non-finite sum (much faster than isfinite)
        bad += float((~torch.isfinite(xt[s:s + _SUM_CHUNK].sum(1, dtype=torch.float64))).sum())
    if int(all_reduce_sum(bad).item()):
        raise ValueError(f"k-means input has NaN or Inf in {int(bad.item())} rows")
    return xt, n_total


def _given_centroids(init_centroids: np.ndarray, k: int, d: int, device: torch.device) -> torch.Tensor:
    """``init_centroids`` checked for shape, as every rank gets rank 0's."""
    centroids = torch.as_tensor(np.asarray(init_centroids, dtype=np.float32)).to(device).clone()
    if centroids.shape != (k, d):
        raise ValueError(f"init_centroids has shape {tuple(centroids.shape)}, expected {(k, d)}")
    broadcast_(centroids)
    return centroids


def _lloyd(xt: torch.Tensor, centroids: torch.Tensor, k: int, niter: int, rng: np.random.Generator,
           assign) -> tuple[torch.Tensor, torch.Tensor, int, int]:
    """Up to ``niter`` Lloyd iterations on ``centroids`` (updated in place), empty clusters
    re-seeded after each; returns ``(labels, distances, clusters re-seeded, iterations)``
    with the labels of the final centroids."""
    fixed, fixed_last, iterations = 0, 0, 0
    labels: torch.Tensor | None = None
    converged = False
    for _ in range(niter):
        new_labels, dist = assign(centroids)
        if labels is not None and not fixed_last and _n_changed(new_labels, labels) == 0:
            # A fixed point: the centroids are already the means of these assignments,
            # so every further iteration would reproduce them exactly.
            labels, converged = new_labels, True
            break
        labels = new_labels
        iterations += 1
        sums, counts = _sums_counts(xt, labels, k)
        nonempty = counts > 0
        centroids[nonempty] = (sums[nonempty] / counts[nonempty, None]).to(centroids.dtype)
        fixed_last = split_empty_clusters(xt, labels, centroids, counts, rng)
        fixed += fixed_last
    if not converged:
        labels, dist = assign(centroids)
    return labels, dist, fixed, iterations


def kmeans(
    x: np.ndarray | torch.Tensor,
    k: int,
    niter: int = 20,
    seed: int = 0,
    backend: str = "faiss",
    init_centroids: np.ndarray | None = None,
    device: str | torch.device | None = None,
    indices: np.ndarray | torch.Tensor | None = None,
) -> KMeansResult:
    """Cluster the rows of ``x`` (``(N, D)``) into ``k`` clusters.

    Args:
        x: the points, float32 (float16/bfloat16 accepted: the torch backend converts
            chunk by chunk). Under ``torch.distributed``: this rank's shard; every
            backend then works on its shard and all-reduces sums and counts.
        k: number of clusters; must not exceed the number of points (over all ranks).
        niter: Lloyd iterations (paper: 20). All points are used (no subsampling).
            Stops earlier at a fixed point (no assignment changed), which gives the
            same result as running all ``niter``.
        seed: seeds the initial centroids (``k`` distinct random points) and the
            empty-cluster rule. The paper draws a new seed every epoch. Distributed:
            rank 0's value is used on every rank.
        backend: ``"faiss"``, ``"faiss-gpu"`` or ``"torch"`` (see module docstring).
        init_centroids: ``(k, D)`` start instead of random points (rank 0's is used).
        device: device for the torch backend (default: where ``x`` lives, else CPU).
        indices: ``(N,)`` global row number of each local row (distributed only; the
            default numbers the rows rank after rank). With the data-set indices, a
            sharded run draws the same initial points as one process on the whole set.

    Raises:
        ValueError: unknown backend, ``faiss-gpu`` without GPU faiss, ``k`` out of
            range, a NaN/Inf in ``x``, or malformed ``init_centroids``/``indices``.
    """
    t0 = time.perf_counter()
    xt, n_total = _checked_input(x, k, backend, device)
    n_local, d = xt.shape
    seed = broadcast_object(seed)
    rng = np.random.default_rng(seed)
    centroids = (_given_centroids(init_centroids, k, d, xt.device) if init_centroids is not None
                 else _initial_centroids(xt, k, rng, n_total, indices))

    faiss_assign = _FaissAssigner(backend == "faiss-gpu") if backend != "torch" else None
    x_np = xt.numpy() if faiss_assign is not None else None

    def assign(c: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        if faiss_assign is not None:
            lab, dist = faiss_assign(x_np, c.cpu().numpy())
            return torch.from_numpy(lab), torch.from_numpy(dist)
        return _torch_assign(xt, c)

    labels, dist, fixed, iterations = _lloyd(xt, centroids, k, niter, rng, assign)
    counts = all_reduce_sum(torch.bincount(labels, minlength=k).to(torch.float64))
    n_fixed_final = split_empty_clusters(xt, labels, centroids, counts, rng)
    fixed += n_fixed_final
    if n_fixed_final:
        dist = torch.cat([((xt[s:s + _SUM_CHUNK].to(torch.float32) - centroids[labels[s:s + _SUM_CHUNK]]) ** 2).sum(1)
                          for s in range(0, n_local, _SUM_CHUNK)]) if n_local else dist
    loss = float(all_reduce_sum(dist.to(torch.float64).sum()).item()) / n_total
    seconds = time.perf_counter() - t0
    logger.debug("k-means %s: N=%d D=%d k=%d loss=%.4f empty-fixed=%d iterations=%d %.2fs", backend, n_total, d, k,
                 loss, fixed, iterations, seconds)
    return KMeansResult(
        assignments=labels.cpu().numpy().astype(np.int64),
        centroids=centroids.cpu().numpy().astype(np.float32),
        loss=loss,
        sizes=counts.cpu().numpy().astype(np.int64),
        n_empty_fixed=fixed,
        seconds=seconds,
        iterations=iterations,
    )
