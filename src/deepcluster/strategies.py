"""The seams where DeepCluster's variants plug in, each chosen once per run.

- **Head** (``optim.head``): what classifies the pseudo-labels in an epoch.
  ``random`` (the paper: a new linear layer, N(0, 0.01), every epoch; with
  ``cluster.clusterings`` > 1 one per clustering, DeepCluster-v2), ``matched`` (the
  previous epoch's head, its rows carried to the new clusters sharing the most images),
  ``centroids`` (DeepCluster-v2: cosine similarity to the epoch's fixed centroids).
- **Balance** (``optim.balance``): against the trivial parametrisation (the paper's
  Section 3.3): ``sampler`` (uniform over clusters), ``weight`` (loss / cluster size), ``none``.
- **Batch-norm statistics** of the features clustered (``cluster.bn``): ``running`` or
  ``recompute`` ("precise BN" on the un-augmented views).

An unsupported combination is refused where the seam is chosen (:func:`choose_head`),
before any work, with a one-line :class:`~deepcluster.config.ConfigError`.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import numpy as np
import torch
from torch import nn

from .config import Config, ConfigError
from .data import ClusterBalancedSampler, inverse_size_weights
from .features import eval_mode, make_loader
from .metrics import match_clusters
from .models import CentroidClassifier, CentroidHead, DeepClusterNet, MultiHeadClassifier
from .runtime import autocast, to_device


@dataclass
class EpochClusters:
    """The clustering phase's outcome for one epoch.

    Attributes:
        assignments: ``(N,)`` the run's clustering (the first k-means run).
        num_clusters: rows of the head (``k``, or PIC's outcome).
        centroids: ``(num_clusters, pca_dim)`` in the PCA space.
        pca: the epoch's fitted PCA-whitening.
        others: ``(N,)`` assignments of the further clusterings (``cluster.clusterings`` - 1).
    """

    assignments: np.ndarray
    num_clusters: int
    centroids: np.ndarray
    pca: Any
    others: list[np.ndarray] = field(default_factory=list)

    @property
    def targets(self) -> np.ndarray:
        """Pseudo-labels: ``(N,)``, or ``(N, H)`` with several clusterings."""
        return np.stack([self.assignments, *self.others], 1) if self.others else self.assignments


@dataclass
class Heads:
    """What an epoch trains: ``net`` (the model with its head(s), called on images),
    ``params`` (the head parameters, optimised by an SGD rebuilt every epoch) and
    ``carried`` (rows carried by the matched head, else None)."""

    net: nn.Module
    params: list[nn.Parameter]
    carried: int | None = None


def carry_head(old: nn.Linear, new: nn.Linear, old_assignments: np.ndarray, assignments: np.ndarray) -> int:
    """Copy into ``new`` the rows of ``old`` (the previous epoch's trained head) of the
    clusters matched to this epoch's (:func:`~deepcluster.metrics.match_clusters`: most
    images in common); rows of unmatched clusters keep ``new``'s fresh values. Returns
    the number of rows carried."""
    new_ids, old_ids = match_clusters(assignments, old_assignments)
    keep = (new_ids < new.out_features) & (old_ids < old.out_features)
    new_ids, old_ids = torch.from_numpy(new_ids[keep]), torch.from_numpy(old_ids[keep])
    with torch.no_grad():
        new.weight[new_ids] = old.weight[old_ids].to(new.weight)
        new.bias[new_ids] = old.bias[old_ids].to(new.bias)
    return int(keep.sum())


class RandomHead:
    """The paper: a new randomly initialised linear head every epoch (one per clustering)."""

    def build(self, model: DeepClusterNet, clusters: EpochClusters, previous: np.ndarray | None,
              gen: torch.Generator, temperature: float, device: torch.device) -> Heads:
        model.reset_head(clusters.num_clusters, generator=gen)
        extra = [model.new_head(clusters.num_clusters, generator=gen) for _ in clusters.others]
        net = MultiHeadClassifier(model, extra) if extra else model
        return Heads(net, [p for h in (model.head, *extra) for p in h.parameters()])


class MatchedHead:
    """The previous epoch's head, each row moved to the new cluster sharing the most images."""

    def build(self, model: DeepClusterNet, clusters: EpochClusters, previous: np.ndarray | None,
              gen: torch.Generator, temperature: float, device: torch.device) -> Heads:
        old = model.head
        model.reset_head(clusters.num_clusters, generator=gen)
        carried = carry_head(old, model.head, previous, clusters.assignments) if previous is not None else None
        return Heads(model, list(model.head.parameters()), carried)


class CentroidsHead:
    """DeepCluster-v2: logits are the cosine similarity to the epoch's centroids over a
    temperature; nothing in the head is trained. (``model.head`` is still reset, untrained,
    so that a checkpoint records the number of clusters as for the other heads.)"""

    def build(self, model: DeepClusterNet, clusters: EpochClusters, previous: np.ndarray | None,
              gen: torch.Generator, temperature: float, device: torch.device) -> Heads:
        model.reset_head(clusters.num_clusters, generator=gen)
        pca = clusters.pca
        head = CentroidHead(pca.mean, pca.projection, clusters.centroids, temperature).to(device)
        return Heads(CentroidClassifier(model, head), [])


HEADS = {"random": RandomHead, "matched": MatchedHead, "centroids": CentroidsHead}


def choose_head(cfg: Config) -> RandomHead | MatchedHead | CentroidsHead:
    """The head strategy of ``cfg``, or a one-line error for a combination it cannot serve."""
    name = cfg.optim.head
    if name not in HEADS:
        raise ConfigError(f"optim.head must be one of {sorted(HEADS)}, got {name!r}")
    if cfg.cluster.clusterings > 1 and name != "random":
        raise ConfigError("cluster.clusterings > 1 needs optim.head random (one new linear head per clustering)")
    if name == "centroids" and cfg.cluster.feature == "backbone":
        raise ConfigError("optim.head centroids scores fc7 or the projection against the centroids: "
                          "not cluster.feature backbone")
    return HEADS[name]()


def balanced_sampler(balance: str, assignments: np.ndarray, seed: int, rank: int, world: int
                     ) -> ClusterBalancedSampler:
    """The epoch's sampler: uniform over clusters for ``balance == "sampler"`` (the
    paper), else a plain shuffle (``weight``, ``none``)."""
    return ClusterBalancedSampler(assignments, seed=seed, balanced=balance == "sampler", rank=rank, world_size=world)


def class_weights(balance: str, targets: np.ndarray, num_clusters: int) -> torch.Tensor | None:
    """Loss weights for ``balance == "weight"``: ``(k,)``, or ``(H, k)`` for ``targets``
    ``(N, H)`` of several clusterings; ``None`` otherwise."""
    if balance != "weight":
        return None
    per_head = torch.stack([inverse_size_weights(t, num_clusters) for t in targets.reshape(len(targets), -1).T])
    return per_head if targets.ndim == 2 else per_head[0]


BN_RECOMPUTE_IMAGES = 10_000
"""Images whose un-augmented views give the batch-norm statistics of ``cluster.bn: recompute``."""


def recompute_bn_stats(model: DeepClusterNet, dataset, num_images: int, seed: int, batch_size: int,
                       workers: int, device: torch.device, amp: str = "none", channels_last: bool = False) -> int:
    """Replace the conv layers' batch-norm running statistics by the exact mean and
    variance over ``num_images`` images of ``dataset`` (the un-augmented clustering views),
    drawn with ``seed`` (the same on every rank, so every rank gets the same statistics).

    During training the running statistics follow the augmented crops; the features that
    k-means sees are computed with them. This makes them the statistics of the views
    being clustered ("precise BN"). Returns the number of batch-norm layers reset.
    """
    bns = [m for m in model.modules() if isinstance(m, nn.modules.batchnorm._BatchNorm) and m.track_running_stats]
    if not bns:
        return 0
    # Per-channel sums of each batch-norm layer's input, over every image and position
    # (float64); the forward pass itself normalises with batch statistics, as in training.
    sums: dict[int, list] = {id(m): [0.0, 0.0, 0] for m in bns}

    def accumulate(module: nn.Module, inputs: tuple[torch.Tensor, ...]) -> None:
        x = inputs[0].detach().double()
        dims = [0] + list(range(2, x.ndim))
        acc = sums[id(module)]
        acc[0] = acc[0] + x.sum(dims)
        acc[1] = acc[1] + (x * x).sum(dims)
        acc[2] += x.numel() // x.shape[1]

    hooks = [m.register_forward_pre_hook(accumulate) for m in bns]
    idx = np.sort(np.random.default_rng(seed).choice(len(dataset), min(num_images, len(dataset)), replace=False))
    batches = 0
    try:
        with torch.no_grad(), eval_mode(model):
            model.train()
            for images, _ in make_loader(dataset, batch_size, workers, sampler=idx.tolist(), seed=seed):
                with autocast(device, amp):
                    model.forward_backbone(to_device(images, device, channels_last))
                batches += 1
    finally:
        for h in hooks:
            h.remove()
    for m in bns:
        total, squares, n = sums[id(m)]
        mean = total / n
        var = (squares / n - mean * mean).clamp_min(0) * (n / max(n - 1, 1))  # unbiased, as BatchNorm keeps it
        with torch.no_grad():
            m.running_mean.copy_(mean.to(m.running_mean))
            m.running_var.copy_(var.to(m.running_var))
            m.num_batches_tracked.fill_(batches)
    return len(bns)
