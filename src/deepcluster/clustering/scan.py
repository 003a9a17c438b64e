"""SCAN on frozen features: neighbour-consistency clustering, then self-labelling.

Van Gansbeke et al., "SCAN: Learning to Classify Images without Labels", ECCV 2020,
run on a fixed ``(N, D)`` feature array, as the paper's ImageNet experiments do
(``update_cluster_head_only``: the backbone frozen, only the heads trained):

1. **Mining**: the ``k`` nearest neighbours of every row (cosine, i.e. Euclidean on the
   L2-normalised rows; exact faiss search). SCAN: ``k = 20``.
2. **SCAN step**: heads mapping a row to ``K`` softmax probabilities ``p`` are trained on
   the SCAN loss (Section 3.2, Eq. 2), over batches of anchors ``i`` each paired with
   one of its neighbours ``j`` drawn at random::

       L = -1/|B| sum_i log <p_i, p_j>  -  lambda * H(mean_i p_i)

   (consistency of neighbours, minus the entropy of the mean prediction against
   collapse; uniform prior, ``lambda = 5``). Several heads are trained at once and the
   one with the lowest SCAN loss over all rows and all their neighbours is kept (the
   paper's choice among its 10 heads; no label involved).
3. **Self-labelling** (Section 3.3): rows whose kept head is confident
   (``max p > 0.99``) become prototypes; the head is trained with cross-entropy to
   predict their cluster from a *strong* view, the cluster taken from the *weak* view.

What differs from the paper, because the features are frozen: the paper's views are
image augmentations (crops and flips for the weak view, RandAugment and Cutout for the
strong one); here the weak view is the row itself and the strong view is the row with
dropout (``p = 0.5``, each kept coordinate scaled by 2) plus Gaussian noise. No image is
ever seen again. The paper's exponential moving average of the weights is not used. The
heads see the rows centred and scaled by one factor so that a coordinate has unit
variance on average (the scale of the backbone outputs the paper's learning rate was
set for; the geometry is unchanged). Linear heads cut the feature space by hyperplanes,
so groups no hyperplane separates (two moons) are out of reach.
Everything runs on the CPU in float32 under its own seeded random stream (the global
torch generator is restored afterwards), so the same features and seed give the same
groups.
"""

from __future__ import annotations

import math
import numbers
import time

import numpy as np
import torch
import torch.nn.functional as nnf
from torch import nn

from .final import FinalClusteringError, FinalClusters, _finish, _neighbors, _prepare

__all__ = ["ScanHeads", "final_scan", "scan_loss"]

# --------------------------------------------------------------------------- defaults
# Fixed once from the SCAN paper and its released configurations (Van Gansbeke et al.
# 2020, github.com/wvangansbeke/Unsupervised-Classification, configs/scan and
# configs/selflabel); none was chosen by looking at labels.
SCAN_NEIGHBORS = 20            # k of the mining step (CIFAR / STL configurations)
SCAN_ENTROPY_WEIGHT = 5.0      # lambda of Eq. 2 (every configuration)
# The frozen-backbone (ImageNet) configurations, the setting of this module:
SCAN_HEADS = 10                # heads trained at once, lowest loss kept (num_heads 10)
SCAN_EPOCHS = 100              # epochs 100
SCAN_BATCH = 512               # batch_size 512 (also for self-labelling)
SCAN_LR = 5.0                  # SGD, lr 5.0, momentum 0.9, no weight decay, constant
SELFLABEL_LR = 0.03            # self-labelling: SGD, lr 0.03, momentum 0.9, no weight decay
MOMENTUM = 0.9
SELFLABEL_EPOCHS = 25          # self-labelling: epochs 25
SELFLABEL_THRESHOLD = 0.99     # confidence of a prototype (every configuration)
# The strong view of a frozen row: dropout at the usual rate of Srivastava et al. 2014
# (AlexNet's fully connected layers) and noise of 0.1 x the features' own scale.
STRONG_DROPOUT = 0.5
STRONG_NOISE = 0.1
_EPS = 1e-8                    # the clamp of SCAN's loss (its EPS)


class ScanHeads(nn.Module):
    """``n_heads`` linear heads ``D -> K`` on a frozen feature (the paper's cluster heads)."""

    def __init__(self, dim: int, k: int, n_heads: int) -> None:
        super().__init__()
        self.heads = nn.ModuleList(nn.Linear(dim, k) for _ in range(n_heads))

    def forward(self, x: torch.Tensor) -> list[torch.Tensor]:
        """``x`` ``(B, D)`` -> one ``(B, K)`` logit tensor per head."""
        return [head(x) for head in self.heads]


def scan_loss(p_anchor: torch.Tensor, p_neighbor: torch.Tensor,
              entropy_weight: float = SCAN_ENTROPY_WEIGHT) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """The SCAN loss (Van Gansbeke et al. 2020, Eq. 2) of a batch of anchor/neighbour pairs.

    Args:
        p_anchor: ``(B, K)`` softmax probabilities of the anchors.
        p_neighbor: ``(B, K)`` those of one neighbour of each anchor.
        entropy_weight: ``lambda``.

    Returns:
        ``(total, consistency, entropy)`` scalars: ``consistency = -mean_i log <p_i, p_j>``,
        ``entropy = H(mean_i p_i)`` (natural log; the mean over the anchors), and
        ``total = consistency - entropy_weight * entropy``. The dot products and the
        mean probabilities are clamped at ``1e-8`` before their logs, as in the
        paper's code.
    """
    dot = (p_anchor * p_neighbor).sum(1)
    consistency = -torch.log(dot.clamp_min(_EPS)).mean()
    mean = p_anchor.mean(0).clamp_min(_EPS)
    entropy = -(mean * torch.log(mean)).sum()
    return consistency - entropy_weight * entropy, consistency, entropy


def _scale(z: np.ndarray) -> torch.Tensor:
    """``(N, D)`` float32 rows as the heads see them: centred, and scaled so that a
    coordinate has unit variance on average (one factor for all coordinates: the
    geometry is kept, only the scale the paper's learning rate was set for)."""
    c = z.astype(np.float64) - z.mean(0, dtype=np.float64)
    s = math.sqrt(max(float((c * c).mean()), 1e-12))
    return torch.from_numpy((c / s).astype(np.float32))


def _strong(x: torch.Tensor) -> torch.Tensor:
    """The strong view of rows ``x`` ``(B, D)``: dropout then additive Gaussian noise."""
    return nnf.dropout(x, STRONG_DROPOUT, training=True) + STRONG_NOISE * torch.randn_like(x)


def _batches(n: int, batch: int) -> list[torch.Tensor]:
    """A random permutation of ``range(n)`` cut into batches (the last may be smaller)."""
    return list(torch.randperm(n).split(batch))


def _train_scan(model: ScanHeads, x: torch.Tensor, nbrs: torch.Tensor, epochs: int, batch: int,
                entropy_weight: float) -> None:
    """The SCAN step: every head trained on :func:`scan_loss` (summed over heads), SGD
    at the paper's frozen-backbone settings."""
    opt = torch.optim.SGD(model.parameters(), lr=SCAN_LR, momentum=MOMENTUM)
    m = nbrs.shape[1]
    for _ in range(epochs):
        for b in _batches(x.shape[0], batch):
            j = nbrs[b, torch.randint(m, (b.numel(),))]
            both = model(torch.cat([x[b], x[j]]))
            loss = sum(scan_loss(*nnf.softmax(o, 1).split(b.numel()), entropy_weight)[0] for o in both)
            opt.zero_grad()
            loss.backward()
            opt.step()


@torch.no_grad()
def neighbour_loss(p: torch.Tensor, nbrs: torch.Tensor, entropy_weight: float) -> float:
    """SCAN loss of probabilities ``p`` ``(N, K)`` over all ``N m`` (row, neighbour) pairs
    of ``nbrs`` ``(N, m)``: the mean over the ``m`` neighbour columns (the entropy term is
    the same in each). How a head is chosen among several, here and in
    :mod:`deepcluster.scan_net`."""
    per_column = [scan_loss(p, p[nbrs[:, c]], entropy_weight)[0] for c in range(nbrs.shape[1])]
    return float(torch.stack(per_column).mean())


@torch.no_grad()
def _head_losses(model: ScanHeads, x: torch.Tensor, nbrs: torch.Tensor, entropy_weight: float) -> list[float]:
    """:func:`neighbour_loss` of every head on rows ``x``, no augmentation."""
    return [neighbour_loss(nnf.softmax(o, 1), nbrs, entropy_weight) for o in model(x)]


def _self_label(head: nn.Linear, x: torch.Tensor, epochs: int, batch: int,
                threshold: float) -> int:
    """Self-labelling: cross-entropy of the strong view against the weak view's cluster,
    on the rows the weak view puts above ``threshold`` (re-chosen every batch, as the
    paper). Returns the number of confident rows before the first epoch."""
    with torch.no_grad():
        start = int((nnf.softmax(head(x), 1).max(1).values > threshold).sum())
    opt = torch.optim.SGD(head.parameters(), lr=SELFLABEL_LR, momentum=MOMENTUM)
    for _ in range(epochs):
        for b in _batches(x.shape[0], batch):
            with torch.no_grad():
                conf, target = nnf.softmax(head(x[b]), 1).max(1)
            keep = conf > threshold
            if not bool(keep.any()):
                continue
            loss = nnf.cross_entropy(head(_strong(x[b][keep])), target[keep])
            opt.zero_grad()
            loss.backward()
            opt.step()
    return start


def check_count(name: str, value: int, low: int = 1, method: str = "scan") -> int:
    """``value`` as an int, or a one-line error naming the ``method`` and the option ``name``."""
    if isinstance(value, bool) or not isinstance(value, numbers.Integral) or value < low:
        raise FinalClusteringError(f"{method}: {name} must be an integer >= {low}, got {value!r}")
    return int(value)


def _real(value: object) -> bool:
    """Whether ``value`` is a real number (not a bool)."""
    return isinstance(value, numbers.Real) and not isinstance(value, bool)


def final_scan(x: np.ndarray, k: int, seed: int = 0, *, n_neighbors: int = SCAN_NEIGHBORS,
               n_heads: int = SCAN_HEADS, epochs: int = SCAN_EPOCHS,
               selflabel_epochs: int = SELFLABEL_EPOCHS, batch_size: int = SCAN_BATCH,
               entropy_weight: float = SCAN_ENTROPY_WEIGHT, threshold: float = SELFLABEL_THRESHOLD,
               normalize: bool = True) -> FinalClusters:
    """SCAN (Van Gansbeke et al. 2020) on frozen features: mine neighbours, train heads on
    the SCAN loss, keep the lowest-loss head, self-label its confident rows.

    No label enters anywhere: the function takes none. See the module docstring for what
    stands in for the paper's image augmentations.

    Args:
        x: ``(N, D)`` features.
        k: groups ``K``, ``1 <= K <= N``; a cluster the head never predicts stays empty.
        seed: seeds the heads' initialisation, the batches, the neighbour draws and the
            strong views (a private torch generator state; the global one is restored).
        n_neighbors: neighbours mined per row (paper: 20).
        n_heads: heads trained at once; the lowest SCAN loss is kept (paper: 10).
        epochs: passes of the SCAN step; selflabel_epochs: of self-labelling (0 skips it).
        batch_size: anchors per step.
        entropy_weight: ``lambda`` of the SCAN loss (paper: 5).
        threshold: confidence of a self-labelling prototype (paper: 0.99).
        normalize: L2-normalise the rows first (the neighbours are then cosine ones).

    Returns:
        :class:`FinalClusters` with ``confidence`` the kept head's largest probability;
        ``info`` holds the head losses, the kept head and the confident-row counts.
    """
    t0 = time.perf_counter()
    z = _prepare(x, k, normalize, "scan")
    if z.shape[0] < 2:
        raise FinalClusteringError(f"scan: needs at least 2 rows, got {z.shape[0]}")
    n_heads, epochs, batch_size = (check_count(n, v) for n, v in
                                   (("n_heads", n_heads), ("epochs", epochs), ("batch_size", batch_size)))
    selflabel_epochs = check_count("selflabel_epochs", selflabel_epochs, 0)
    if not _real(threshold) or not 0.0 <= threshold <= 1.0:
        raise FinalClusteringError(f"scan: threshold must be in [0, 1], got {threshold!r}")
    if not _real(entropy_weight) or not (math.isfinite(entropy_weight) and entropy_weight >= 0):
        raise FinalClusteringError(f"scan: entropy_weight must be a finite number >= 0, got {entropy_weight!r}")
    nbrs = torch.from_numpy(_neighbors(z, n_neighbors))
    xs = _scale(z)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        model = ScanHeads(z.shape[1], k, n_heads)
        _train_scan(model, xs, nbrs, epochs, batch_size, entropy_weight)
        losses = _head_losses(model, xs, nbrs, entropy_weight)
        best = int(np.argmin(losses))
        head = model.heads[best]
        confident = _self_label(head, xs, selflabel_epochs, batch_size, threshold)
        with torch.no_grad():
            p = nnf.softmax(head(xs), 1).double().numpy()
    labels = p.argmax(1)
    info = {"head_losses": losses, "head": best, "confident_before": confident,
            "confident_after": int((p.max(1) > threshold).sum()), "n_neighbors": int(nbrs.shape[1])}
    return _finish(z, labels, k, p.max(1), "scan", t0, info)
