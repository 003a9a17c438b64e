"""SCAN through the network: the final clustering stage that fine-tunes the run's network.

Van Gansbeke et al., "SCAN: Learning to Classify Images without Labels", ECCV 2020, as
the paper runs it on CIFAR/STL (the whole network updated), on the images to be grouped:

1. **Mining**: the 20 nearest neighbours of every image in the run's own clustering
   feature (L2-normalised, exact faiss search), computed once before any update.
2. **SCAN step**: ``SCAN_NET_HEADS`` linear heads at ``K`` read the network's fc7 (as its
   DeepCluster head does); the network and the heads are trained on the SCAN loss
   (:func:`deepcluster.clustering.scan.scan_loss`) of an augmented anchor and an
   augmented neighbour drawn at random. The augmentation is the run's own training one
   (the paper's "standard" augmentation: crops, flips). Then the head with the lowest
   SCAN loss over all images and all their neighbours (clean views) is kept.
3. **Self-labelling**: each epoch, the prototypes (:func:`prototypes`: the images the
   kept head puts above probability 0.99 on their clean view, and every group's most
   confident members) are trained with cross-entropy, class-balanced over the
   prototypes (the paper's ``ConfidenceBasedCE``), to predict their group from a
   *strong* view: the weak augmentation, then RandAugment (4 operations) and a square
   Cutout of a quarter of the image (the paper's strong augmentation).
4. The groups are the kept head's argmax on the clean view of every image; the
   confidence its largest probability.

No label enters anywhere: :func:`scan_network` takes none. Every setting is fixed once
from the SCAN paper's released CIFAR configurations (``configs/scan``,
``configs/selflabel``: Adam, lr 1e-4, weight decay 1e-4, batch 128, 20 neighbours,
entropy weight 5, threshold 0.99) except the per-group prototype share (SPICE's) and
the numbers of epochs, short for the CPU budget, 16 SCAN epochs chosen on the validation
part of the training split (experiments/CLUSTERS-scan-net.md). Runs under its own seeded random
stream (the global torch generator is restored afterwards); with ``workers=0`` the
same inputs and seed give the same groups.
"""

from __future__ import annotations

import copy
import logging
import math
import time
from collections.abc import Sequence

import numpy as np
import torch
import torch.nn.functional as nnf
from torch import nn
from torch.utils.data import Dataset
from torchvision import transforms as T

from .clustering import l2_normalize
from .clustering.final import FinalClusteringError, FinalClusters, _finish, _neighbors, _prepare
from .clustering.scan import (SCAN_ENTROPY_WEIGHT, SCAN_NEIGHBORS, SELFLABEL_THRESHOLD, check_count, neighbour_loss,
                              scan_loss)
from .data import IndexedDataset, LabelledDataset, cluster_transform
from .data.sources import ImageSource
from .data.transforms import ImageSpec
from .features import eval_mode, extract, make_loader
from .models import DeepClusterNet
from .runtime import autocast, progress, to_device

logger = logging.getLogger(__name__)

__all__ = ["SCAN_NET_EPOCHS", "SELFLABEL_NET_EPOCHS", "scan_network", "strong_transform"]

# The SCAN paper's CIFAR/STL configurations (whole network trained).
SCAN_NET_HEADS = 10            # num_heads 10, lowest SCAN loss kept
SCAN_NET_BATCH = 128           # batch_size 128 anchors (each with one neighbour)
SCAN_NET_LR = 1e-4             # Adam, lr 1e-4, weight decay 1e-4 (SCAN and self-label steps)
SCAN_NET_WEIGHT_DECAY = 1e-4
STRONG_OPS = 4                 # RandAugment operations of the strong view (num_strong_augs 4)
CUTOUT_AREA = 0.25             # Cutout: a square of half the side (length 16 of 32 px)
PROTOTYPE_SHARE = 0.5          # per group, its ceil(0.5 N / K) most confident members are prototypes (SPICE)
# Short for the CPU budget (the paper trains 50-100 SCAN and 200 self-label epochs on a
# GPU); 16 rather than 8 SCAN epochs chosen on the validation images (experiments/CLUSTERS-scan-net.md).
SCAN_NET_EPOCHS = 16
SELFLABEL_NET_EPOCHS = 4


def strong_transform(weak: T.Compose) -> T.Compose:
    """The self-labelling's strong view: ``weak``'s image operations, then RandAugment
    (``STRONG_OPS`` operations), then ``weak``'s tensor conversion, then a Cutout (a
    zeroed square of ``CUTOUT_AREA`` of the image, always applied)."""
    ops = list(weak.transforms)
    at = next((i for i, op in enumerate(ops) if isinstance(op, T.ToTensor)), None)
    if at is None:
        raise ValueError("the weak transform has no ToTensor step to insert RandAugment before")
    ops.insert(at, T.RandAugment(num_ops=STRONG_OPS))
    ops.append(T.RandomErasing(p=1.0, scale=(CUTOUT_AREA, CUTOUT_AREA), ratio=(1.0, 1.0), value=0))
    return T.Compose(ops)


class _Pairs(Dataset):
    """Item ``t``: a view of image ``anchors[t]`` and one of image ``partners[t]``
    (independent draws of ``transform``)."""

    def __init__(self, source: ImageSource, anchors: np.ndarray, partners: np.ndarray, transform) -> None:
        self.source, self.anchors, self.partners, self.transform = source, anchors, partners, transform

    def __len__(self) -> int:
        return len(self.anchors)

    def __getitem__(self, t: int):
        return (self.transform(self.source.load(int(self.anchors[t]))),
                self.transform(self.source.load(int(self.partners[t]))))


def _probs(model: DeepClusterNet, fc7: torch.Tensor, heads: Sequence[nn.Module]) -> list[torch.Tensor]:
    """Float32 softmax probabilities of every head on ``fc7``."""
    return [nnf.softmax(model.forward_head(fc7, h).float(), 1) for h in heads]


def _clean_fc7(model: DeepClusterNet, source: ImageSource, spec: ImageSpec, device: torch.device, amp: str,
               channels_last: bool, workers: int, batch: int = 512) -> torch.Tensor:
    """fc7 (before its ReLU) of every image's clean view, eval mode, float32 ``(N, fc_dim)``
    on the CPU (the one extraction path, :func:`deepcluster.features.extract`)."""
    loader = make_loader(IndexedDataset(source, cluster_transform(spec)), batch, workers)
    with eval_mode(model):
        return torch.from_numpy(extract(model.forward_fc7, loader, len(source), model.fc_dim, device, amp,
                                        channels_last, desc="scan-net extract"))


def _adam(params) -> torch.optim.Optimizer:
    return torch.optim.Adam(params, lr=SCAN_NET_LR, weight_decay=SCAN_NET_WEIGHT_DECAY)


def _step(opt: torch.optim.Optimizer, loss: torch.Tensor) -> float:
    """One optimiser step on ``loss``; returns its value (the step's one host sync)."""
    value = loss.item()
    if not math.isfinite(value):
        raise FinalClusteringError(f"scan-net: the loss became {value}; the network's weights are not "
                                   "usable (nothing was written)")
    opt.zero_grad(set_to_none=True)
    loss.backward()
    opt.step()
    return value


def _scan_epochs(model, heads, source, nbrs, weak, epochs, batch, entropy_weight, device, amp, channels_last,
                 workers, seed) -> list[float]:
    """The SCAN step; returns the mean training loss of each epoch."""
    n, m = nbrs.shape
    params = list(model.parameters()) + list(heads.parameters())
    opt = _adam(params)
    losses = []
    for epoch in range(epochs):
        anchors = torch.randperm(n).numpy()
        partners = nbrs[torch.from_numpy(anchors), torch.randint(m, (n,))].numpy()
        loader = make_loader(_Pairs(source, anchors, partners, weak), batch, workers,
                             seed=seed * 1000 + epoch, drop_last=n > batch)
        model.train()
        total, steps = 0.0, 0
        for a, b in progress(loader, desc=f"scan-net {epoch}"):
            x = to_device(torch.cat([a, b]), device, channels_last)
            with autocast(device, amp):
                probs = _probs(model, model.forward_fc7(x), heads)
            loss = sum(scan_loss(p[:len(a)], p[len(a):], entropy_weight)[0] for p in probs)
            total, steps = total + _step(opt, loss) / len(heads), steps + 1
        losses.append(total / max(steps, 1))
        logger.info("scan-net: SCAN epoch %d/%d, mean loss per head %.4f", epoch + 1, epochs, losses[-1])
    return losses


def prototypes(p: np.ndarray, threshold: float, share: float = PROTOTYPE_SHARE) -> np.ndarray:
    """The self-labelling's prototypes from clean-view probabilities ``p`` ``(N, K)``:
    the indices (sorted) of the images above ``threshold`` (SCAN) together with, in every
    group, its ``ceil(share * N / K)`` most confident members (SPICE's per-group
    selection), so that no group that still has members is left without prototypes."""
    n, k = p.shape
    group, conf = p.argmax(1), p.max(1)
    keep = conf > threshold
    quota = math.ceil(share * n / k)
    for c in range(k):
        members = np.flatnonzero(group == c)
        if members.size:
            keep[members[np.argsort(-conf[members], kind="stable")[:quota]]] = True
    return np.flatnonzero(keep)


def _selflabel_epochs(model, head, fc7, source, spec, strong, epochs, batch, threshold, device, amp,
                      channels_last, workers, seed) -> tuple[list[int], list[list[int]], torch.Tensor, np.ndarray]:
    """Self-labelling: each epoch, the prototypes (:func:`prototypes`) and their groups are
    taken from the clean views (``fc7``: those of the network as it starts; later epochs
    extract their own), then the network and ``head`` are trained with
    class-balanced cross-entropy from strong views of them. Returns the prototypes of
    each epoch, the group sizes (clean views) before each epoch and after the last, and
    the last clean-view fc7 ``(N, fc_dim)`` and probabilities ``(N, K)`` float64."""
    opt = _adam(list(model.parameters()) + list(head.parameters()))
    seen, sizes = [], []
    for epoch in range(epochs + 1):
        if epoch:
            fc7 = _clean_fc7(model, source, spec, device, amp, channels_last, workers)
        with torch.no_grad():
            p = _probs(model, fc7.to(device), [head])[0].double().cpu().numpy()
        sizes.append(np.bincount(p.argmax(1), minlength=p.shape[1]).tolist())
        if epoch == epochs:
            break
        chosen = prototypes(p, threshold)
        group = p.argmax(1)  # every image's group; only the prototypes' are read
        counts = torch.bincount(torch.from_numpy(group[chosen]), minlength=p.shape[1]).float()
        weight = torch.where(counts > 0, len(chosen) / counts.clamp_min(1), torch.zeros_like(counts)).to(device)
        images = chosen[torch.randperm(len(chosen)).numpy()]
        loader = make_loader(LabelledDataset(source, strong, labels=group, indices=images), batch, workers,
                             seed=seed * 1000 + 500 + epoch, drop_last=len(images) > batch)
        model.train()
        for s, target in progress(loader, desc=f"self-label {epoch}"):
            with autocast(device, amp):
                logits = model.forward_head(model.forward_fc7(to_device(s, device, channels_last)), head)
            _step(opt, nnf.cross_entropy(logits.float(), target.to(device), weight=weight))
        seen.append(int(len(chosen)))
        logger.info("scan-net: self-label epoch %d/%d on %d prototypes; group sizes before it %s", epoch + 1,
                    epochs, len(chosen), sizes[-1])
    return seen, sizes, fc7, p


def scan_network(model: DeepClusterNet, source: ImageSource, features: np.ndarray, k: int, *, spec: ImageSpec,
                 weak: T.Compose, seed: int = 0, epochs: int = SCAN_NET_EPOCHS,
                 selflabel_epochs: int = SELFLABEL_NET_EPOCHS, n_heads: int = SCAN_NET_HEADS,
                 n_neighbors: int = SCAN_NEIGHBORS, batch_size: int = SCAN_NET_BATCH,
                 entropy_weight: float = SCAN_ENTROPY_WEIGHT, threshold: float = SELFLABEL_THRESHOLD,
                 device: str | torch.device = "cpu", amp: str = "none", channels_last: bool = False,
                 workers: int = 0) -> tuple[FinalClusters, DeepClusterNet]:
    """SCAN with the network fine-tuned: the images of ``source`` in ``k`` groups.

    Args:
        model: the run's network; it is not modified (a copy is trained).
        source: the images to group (no labels are read).
        features: ``(N, D)`` the run's clustering feature of those images (neighbours).
        k: groups ``K``, ``1 <= K <= N``.
        spec: the images' size and normalisation (the clean view).
        weak: the weak augmentation (the run's training transform, ending in ToTensor,
            Normalize); the strong view is :func:`strong_transform` of it.
        seed: seeds the heads, the batches, the neighbour draws and the augmentations.
        epochs: SCAN-step passes over the images; selflabel_epochs: self-labelling
            passes (0 skips it).
        n_heads, n_neighbors, batch_size, entropy_weight, threshold: as the SCAN paper.
        device, amp, channels_last, workers: where and how the network runs.

    Returns:
        ``(clusters, network)``: :class:`FinalClusters` (``confidence`` = the kept head's
        largest probability; ``distance`` in the fine-tuned network's L2-normalised fc7)
        and the fine-tuned copy of the network, whose ``head`` is the kept head at ``K``.
    """
    t0 = time.perf_counter()
    z = _prepare(features, k, True, "scan-net")
    if z.shape[0] != len(source):
        raise FinalClusteringError(f"scan-net: {z.shape[0]} feature rows for {len(source)} images")
    if z.shape[0] < 2:
        raise FinalClusteringError(f"scan-net: needs at least 2 images, got {z.shape[0]}")
    epochs, selflabel_epochs, n_heads, batch_size = (
        check_count(name, value, low, "scan-net") for name, value, low in
        (("epochs", epochs, 0), ("selflabel_epochs", selflabel_epochs, 0), ("n_heads", n_heads, 1),
         ("batch_size", batch_size, 1)))
    if not 0.0 <= float(threshold) <= 1.0:
        raise FinalClusteringError(f"scan-net: threshold must be in [0, 1], got {threshold!r}")
    device = torch.device(device)
    nbrs = torch.from_numpy(_neighbors(z, n_neighbors))
    strong = strong_transform(weak)
    net = copy.deepcopy(model).to(device)
    if channels_last:
        net = net.to(memory_format=torch.channels_last)
    for p in net.parameters():
        p.requires_grad_(True)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        g = torch.Generator().manual_seed(seed)
        heads = nn.ModuleList(net.new_head(k, generator=g) for _ in range(n_heads)).to(device)
        logger.info("scan-net: %d images, K=%d, %d neighbours, %d heads; %d SCAN + %d self-label epochs",
                    len(source), k, nbrs.shape[1], n_heads, epochs, selflabel_epochs)
        scan_losses = _scan_epochs(net, heads, source, nbrs, weak, epochs, batch_size, entropy_weight, device, amp,
                                   channels_last, workers, seed)
        fc7 = _clean_fc7(net, source, spec, device, amp, channels_last, workers)
        head_losses = [neighbour_loss(p, nbrs.to(device), entropy_weight)
                       for p in _probs(net, fc7.to(device), heads)]
        best = int(np.argmin(head_losses))
        head = heads[best]
        seen, sizes, fc7, p = _selflabel_epochs(net, head, fc7, source, spec, strong, selflabel_epochs,
                                                batch_size, threshold, device, amp, channels_last, workers, seed)
    net.head = head
    net.eval()
    for q in net.parameters():
        q.requires_grad_(False)
    labels = p.argmax(1)
    info = {"scan_losses": scan_losses, "head_losses": head_losses, "head": best, "sizes": sizes,
            "prototypes": seen, "confident_after": int((p.max(1) > threshold).sum()),
            "n_neighbors": int(nbrs.shape[1]), "epochs": epochs, "selflabel_epochs": selflabel_epochs}
    return _finish(l2_normalize(fc7.numpy()), labels, k, p.max(1), "scan-net", t0, info), net
