"""Sampling uniformly over clusters (the paper's answer to trivial parametrisation)."""

from __future__ import annotations

from collections.abc import Iterator

import numpy as np
import torch
from torch.utils.data import Sampler


def balanced_plan(assignments: np.ndarray, num_samples: int, rng: np.random.Generator) -> np.ndarray:
    """Data-set indices of one epoch, uniform over the non-empty clusters.

    Paper, Section 3.4: "sample images based on a uniform distribution over the classes,
    or pseudo-labels". Each non-empty cluster contributes ``ceil(num_samples / C)``
    draws (without replacement when it is large enough, with replacement otherwise);
    the plan is shuffled and cut to ``num_samples``.

    Args:
        assignments: ``(N,)`` cluster index of each image.
        num_samples: length of the plan (the paper: N).
    Returns:
        ``(num_samples,)`` int64 data-set indices.
    """
    assignments = np.asarray(assignments)
    order = np.argsort(assignments, kind="stable")
    clusters, starts, counts = np.unique(assignments[order], return_index=True, return_counts=True)
    per_cluster = -(-num_samples // len(clusters))
    parts = []
    for s, c in zip(starts, counts):
        members = order[s:s + c]
        parts.append(rng.choice(members, per_cluster, replace=c < per_cluster))
    plan = np.concatenate(parts)
    rng.shuffle(plan)
    return plan[:num_samples].astype(np.int64)


def inverse_size_weights(assignments: np.ndarray, num_clusters: int) -> torch.Tensor:
    """Per-cluster loss weights ``N / (C * size_c)`` (zero for empty clusters), ``(k,)``.

    The alternative to uniform sampling: each cluster then contributes equally in
    expectation to the loss of a uniformly shuffled epoch.
    """
    sizes = np.bincount(assignments, minlength=num_clusters).astype(np.float64)
    nonempty = sizes > 0
    w = np.zeros(num_clusters)
    w[nonempty] = len(assignments) / (nonempty.sum() * sizes[nonempty])
    return torch.as_tensor(w, dtype=torch.float32)


class ClusterBalancedSampler(Sampler[int]):
    """Sampler over data-set indices, uniform over clusters, sharded across ranks.

    Every rank builds the same epoch plan from ``(seed, epoch)``, pads it to a multiple
    of ``world_size`` by wrapping around, and takes every ``world_size``-th index from
    position ``rank`` (as ``DistributedSampler`` does). Call ``set_epoch`` each epoch.

    Args:
        assignments: ``(N,)`` pseudo-labels.
        num_samples: draws per epoch over all ranks (default N).
        balanced: False gives a plain random permutation (used with loss weighting).
    """

    def __init__(self, assignments: np.ndarray, num_samples: int | None = None, seed: int = 0,
                 rank: int = 0, world_size: int = 1, balanced: bool = True) -> None:
        self.assignments = np.asarray(assignments)
        self.num_samples = int(num_samples or len(self.assignments))
        self.seed, self.rank, self.world_size, self.balanced = seed, rank, world_size, balanced
        self.epoch = 0

    def set_epoch(self, epoch: int) -> None:
        self.epoch = epoch

    def plan(self) -> np.ndarray:
        rng = np.random.default_rng([self.seed, self.epoch])
        if self.balanced:
            full = balanced_plan(self.assignments, self.num_samples, rng)
        else:
            full = rng.permutation(len(self.assignments))[: self.num_samples]
        total = -(-len(full) // self.world_size) * self.world_size
        full = np.resize(full, total)  # wraps around to pad
        return full[self.rank::self.world_size]

    def __iter__(self) -> Iterator[int]:
        return iter(self.plan().tolist())

    def __len__(self) -> int:
        return -(-self.num_samples // self.world_size)
