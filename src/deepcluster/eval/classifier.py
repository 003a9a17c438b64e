"""Classifiers trained on cached feature arrays, with hyper-parameters chosen on a
held-out validation part (never on test). Shared by the linear and MLP probes.

Procedure (:func:`select_and_fit`):

1. standardise every feature dimension with the mean / std of the fitting images
   (an affine map a linear layer could absorb: it only makes one learning-rate grid
   fit every layer);
2. for each grid point (learning rate x weight decay), train on the *fit* part of the
   training split and measure top-1 on the *validation* part;
3. retrain with the best grid point on the whole training split (fit + validation,
   re-standardised) and report top-1 on the test split.

Training: SGD with momentum 0.9, mini-batches, cosine learning-rate decay to zero over
a fixed number of epochs, cross-entropy. The (possibly memory-mapped, float16) cached
features are read once into a float32 tensor (60,000 x 3,200 floats: 0.8 GB).
"""

from __future__ import annotations

import itertools
import logging
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch
from torch import nn

logger = logging.getLogger(__name__)

HeadFactory = Callable[[int, int], nn.Module]
"""``(in_dim, num_classes) -> module`` mapping ``(B, in_dim)`` to ``(B, num_classes)`` logits."""


def as_tensor(x: np.ndarray | torch.Tensor, chunk: int = 8192) -> torch.Tensor:
    """``(N, D)`` features as one float32 tensor in memory (converted chunk by chunk, so a
    float16 memory-mapped file is read once, not once per epoch)."""
    if isinstance(x, torch.Tensor):
        return x.float()
    out = torch.empty(x.shape, dtype=torch.float32)
    for start in range(0, len(x), chunk):
        out[start:start + chunk] = torch.from_numpy(np.array(x[start:start + chunk], dtype=np.float32))
    return out


def feature_stats(x: np.ndarray | torch.Tensor, rows: np.ndarray, chunk: int = 8192) -> tuple[np.ndarray, np.ndarray]:
    """Per-dimension mean and std ``(D,), (D,)`` (float32) of ``x[rows]``, in float64.

    Dimensions with (near) zero variance get std 1, so they stay constant (zero).
    """
    d = x.shape[1]
    s = torch.zeros(d, dtype=torch.float64)
    s2 = torch.zeros(d, dtype=torch.float64)
    for start in range(0, len(rows), chunk):
        xb = as_tensor(x[rows[start:start + chunk]]).double()
        s += xb.sum(0)
        s2 += (xb * xb).sum(0)
    n = max(len(rows), 1)
    mean = s / n
    std = (s2 / n - mean * mean).clamp_min(0.0).sqrt()
    std[std < 1e-6] = 1.0
    return mean.float().numpy(), std.float().numpy()


class Standardized(nn.Module):
    """``(x - mean) / std`` then ``inner``: ``(B, D) -> inner's output``."""

    def __init__(self, mean: np.ndarray, std: np.ndarray, inner: nn.Module) -> None:
        super().__init__()
        self.register_buffer("mean", torch.from_numpy(np.asarray(mean, dtype=np.float32)))
        self.register_buffer("std", torch.from_numpy(np.asarray(std, dtype=np.float32)))
        self.inner = inner

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.inner((x - self.mean) / self.std)


def linear_head(in_dim: int, num_classes: int) -> nn.Module:
    """A linear classifier ``(B, in_dim) -> (B, num_classes)``, zero-initialised bias."""
    layer = nn.Linear(in_dim, num_classes)
    nn.init.normal_(layer.weight, 0.0, 0.01)
    nn.init.zeros_(layer.bias)
    return layer


def train_classifier(make_head: HeadFactory, x: np.ndarray | torch.Tensor, y: np.ndarray, rows: np.ndarray,
                     num_classes: int, *, lr: float, weight_decay: float, epochs: int, batch_size: int = 256,
                     seed: int = 0, device: str | torch.device = "cpu") -> nn.Module:
    """Train ``Standardized(make_head(D, C))`` on ``x[rows]``, ``y[rows]``.

    Args:
        make_head: builds the classifier (linear, MLP).
        x: ``(N, D)`` features (float16/float32 array, may be memory-mapped, or a tensor).
        y: ``(N,)`` int labels in ``0..num_classes-1``.
        rows: ``(n,)`` rows to train on.
        lr, weight_decay, epochs, batch_size: SGD (momentum 0.9, cosine decay to 0).
        seed: seeds the initialisation and the batch order.

    Returns:
        The trained module, in eval mode, on ``device``.
    """
    device = torch.device(device)
    rows = np.asarray(rows)
    if len(rows) == 0:
        raise ValueError("no training rows")
    # A copy (advanced indexing), so standardising it in place leaves the caller's array alone.
    xt = as_tensor(x[rows] if not isinstance(x, torch.Tensor) else x[torch.from_numpy(rows)]).to(device)  # (n, D)
    yt = torch.as_tensor(np.asarray(y)[rows], dtype=torch.int64, device=device)  # (n,)
    torch.manual_seed(seed)
    mean, std = feature_stats(xt, np.arange(len(rows)))
    model = Standardized(mean, std, make_head(xt.shape[1], num_classes)).to(device)
    xt.sub_(model.mean).div_(model.std)  # standardised once; the module does it at prediction time
    head = model.inner
    opt = torch.optim.SGD(head.parameters(), lr=lr, momentum=0.9, weight_decay=weight_decay)
    steps = epochs * ((len(rows) + batch_size - 1) // batch_size)
    sched = torch.optim.lr_scheduler.CosineAnnealingLR(opt, T_max=max(steps, 1))
    gen = torch.Generator().manual_seed(seed)
    model.train()
    for _ in range(epochs):
        for b in torch.randperm(len(rows), generator=gen).to(device).split(batch_size):
            loss = nn.functional.cross_entropy(head(xt[b]), yt[b])
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            sched.step()
        if not torch.isfinite(loss):
            break  # diverged: this grid point loses on validation
    return model.eval()


@torch.no_grad()
def predict(model: nn.Module, x: np.ndarray | torch.Tensor, rows: np.ndarray, batch_size: int = 4096,
            device: str | torch.device = "cpu") -> np.ndarray:
    """Predicted class of each of ``x[rows]``: ``(len(rows),)`` int64, in ``rows`` order."""
    device = torch.device(device)
    rows = np.asarray(rows)
    out = np.empty(len(rows), dtype=np.int64)
    for start in range(0, len(rows), batch_size):
        b = rows[start:start + batch_size]
        if isinstance(x, torch.Tensor):
            xb = x[torch.from_numpy(b)]
        else:
            xb = torch.from_numpy(np.asarray(x[b], dtype=np.float32))
        logits = model(xb.float().to(device))
        out[start:start + len(b)] = logits.argmax(1).cpu().numpy()
    return out


def top1(model: nn.Module, x: np.ndarray | torch.Tensor, y: np.ndarray, rows: np.ndarray,
         device: str | torch.device = "cpu") -> float:
    """Top-1 accuracy of ``model`` on ``x[rows]`` against ``y[rows]``."""
    rows = np.asarray(rows)
    return float((predict(model, x, rows, device=device) == np.asarray(y)[rows]).mean())


@dataclass
class Grid:
    """The hyper-parameters tried on the validation part, and the fixed ones."""

    lrs: Sequence[float]
    weight_decays: Sequence[float]
    epochs: int
    batch_size: int = 256

    def points(self) -> list[tuple[float, float]]:
        return list(itertools.product(self.lrs, self.weight_decays))

    def as_dict(self) -> dict[str, Any]:
        """The grid as a result file records it (lists, so a JSON round trip compares equal)."""
        return {"lrs": list(self.lrs), "weight_decays": list(self.weight_decays), "epochs": self.epochs,
                "batch_size": self.batch_size}


def select_and_fit(make_head: HeadFactory, x_train: np.ndarray, y_train: np.ndarray, fit: np.ndarray,
                   val: np.ndarray, x_test: np.ndarray, y_test: np.ndarray, num_classes: int, grid: Grid,
                   seed: int = 0, device: str | torch.device = "cpu") -> dict[str, Any]:
    """Choose (lr, weight decay) on ``val``, retrain on all training rows, report test.

    Args:
        x_train, y_train: ``(N, D)`` features and ``(N,)`` labels of the training split.
        fit, val: disjoint row sets of the training split (see ``EvalData``).
        x_test, y_test: ``(M, D)``, ``(M,)``: only used after the choice is made.
        grid: the search space.

    Returns:
        ``{"test_top1", "val_top1", "train_top1", "lr", "weight_decay", "grid":
        [{"lr", "weight_decay", "val_top1"}...], "seconds"}``.
    """
    t0 = time.perf_counter()
    x_train = as_tensor(x_train)  # read (and converted from float16) once for the whole grid
    table = []
    for lr, wd in grid.points():
        m = train_classifier(make_head, x_train, y_train, fit, num_classes, lr=lr, weight_decay=wd,
                             epochs=grid.epochs, batch_size=grid.batch_size, seed=seed, device=device)
        acc = top1(m, x_train, y_train, val, device)
        table.append({"lr": lr, "weight_decay": wd, "val_top1": acc})
        logger.debug("lr %g wd %g: val top-1 %.4f", lr, wd, acc)
    # Highest validation accuracy; ties go to the stronger regularisation, then the smaller lr.
    best = max(table, key=lambda r: (r["val_top1"], r["weight_decay"], -r["lr"]))
    all_rows = np.sort(np.concatenate([fit, val]))
    final = train_classifier(make_head, x_train, y_train, all_rows, num_classes, lr=best["lr"],
                             weight_decay=best["weight_decay"], epochs=grid.epochs, batch_size=grid.batch_size,
                             seed=seed, device=device)
    test_rows = np.arange(len(y_test))
    return {
        "test_top1": top1(final, x_test, y_test, test_rows, device),
        "val_top1": best["val_top1"],
        "train_top1": top1(final, x_train, y_train, all_rows, device),
        "lr": best["lr"],
        "weight_decay": best["weight_decay"],
        "epochs": grid.epochs,
        "batch_size": grid.batch_size,
        "grid": table,
        "seconds": time.perf_counter() - t0,
    }
