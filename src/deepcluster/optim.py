"""Optimisation of the convnet on the pseudo-labels (step 6 of an epoch): the SGD of
the network and of the epoch's head, the learning-rate schedule, the loss, and the
training pass with its divergence checks."""

from __future__ import annotations

import math
import time
from collections.abc import Sequence

import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.data import DataLoader

from .config import Config
from .distributed import all_reduce_sum, collective_errors
from .models import DeepClusterNet
from .runtime import autocast, progress, to_device


class TrainingError(RuntimeError):
    """Training cannot continue; the message says where and what to do."""


class NonFiniteLossError(TrainingError):
    pass


def build_optimizer(model: DeepClusterNet, cfg: Config) -> torch.optim.Optimizer:
    """SGD over everything but the head (the head gets its own, rebuilt every epoch)."""
    params = [p for n, p in model.named_parameters() if not n.startswith("head.") and p.requires_grad]
    return torch.optim.SGD(params, lr=cfg.optim.lr, momentum=cfg.optim.momentum, weight_decay=cfg.optim.weight_decay)


def build_head_optimizer(params: Sequence[nn.Parameter], cfg: Config, lr: float | None = None
                         ) -> torch.optim.Optimizer | None:
    """The epoch's SGD over the head parameters (``None`` when nothing in the head trains)."""
    if not params:
        return None
    return torch.optim.SGD(list(params), lr=cfg.optim.lr if lr is None else lr,
                           momentum=cfg.optim.momentum, weight_decay=cfg.optim.weight_decay)


def epoch_lr(cfg: Config, epoch: int) -> float:
    """The learning rate of ``epoch``: ``optim.lr``, or its cosine decay over ``optim.epochs``."""
    if cfg.optim.lr_schedule == "cosine":
        return cfg.optim.lr * 0.5 * (1.0 + math.cos(math.pi * epoch / cfg.optim.epochs))
    return cfg.optim.lr


def pseudo_label_loss(logits: torch.Tensor, targets: torch.Tensor,
                      class_weights: torch.Tensor | None = None) -> torch.Tensor:
    """Cross-entropy on the pseudo-labels.

    One clustering: ``logits`` ``(B, k)``, ``targets`` ``(B,)``, ``class_weights`` ``(k,)``.
    Several (``cluster.clusterings``): ``(H, B, k)``, ``(B, H)`` and ``(H, k)``; the loss is
    the mean over the H heads of each head's cross-entropy on its clustering.
    """
    if targets.ndim == 1:
        return F.cross_entropy(logits, targets, weight=class_weights)
    return torch.stack([F.cross_entropy(logits[j], targets[:, j], weight=None if class_weights is None
                                        else class_weights[j]) for j in range(targets.shape[1])]).mean()


def train_one_epoch(model: nn.Module, loader: DataLoader, pseudo_labels: torch.Tensor,
                    optimizer: torch.optim.Optimizer, head_optimizer: torch.optim.Optimizer | None,
                    device: torch.device, epoch: int, class_weights: torch.Tensor | None = None,
                    amp: str = "none", channels_last: bool = False,
                    scaler: torch.amp.GradScaler | None = None) -> dict[str, float]:
    """6. One pass of cross-entropy on the pseudo-labels (``(N,)``, or ``(N, H)`` for H
    clusterings with a model returning ``(H, B, k)``: :func:`pseudo_label_loss`);
    returns averaged stats.

    ``model`` may be wrapped in ``DistributedDataParallel`` (the loader then yields this
    rank's share); loss and image counts are summed over ranks. ``scaler`` is needed
    with ``amp="fp16"``.

    Raises:
        NonFiniteLossError: the loss became NaN or Inf (naming epoch and step).
    """
    model.train()
    optimizers = [o for o in (optimizer, head_optimizer) if o is not None]
    weights = None if class_weights is None else class_weights.to(device)
    total, count = 0.0, 0
    t0 = time.perf_counter()
    for step, (images, idx) in enumerate(progress(loader, f"train {epoch}")):
        targets = pseudo_labels[idx]
        if images.ndim == 5:  # (B, views, C, H, W): every view of an image gets its pseudo-label
            targets = targets.repeat_interleave(images.shape[1], 0)
            images = images.flatten(0, 1)
        images = to_device(images, device, channels_last)
        targets = targets.to(device, non_blocking=True)
        with autocast(device, amp):
            loss = pseudo_label_loss(model(images), targets, weights)
        if not torch.isfinite(loss):
            raise NonFiniteLossError(
                f"loss became {loss.item()} at epoch {epoch} step {step}; the last good checkpoint is kept; "
                "resume with --resume and a lower --lr")
        _step(loss, optimizers, scaler)
        total += loss.item() * len(idx)
        count += len(idx)
    _check_finite_state(epoch, *optimizers)
    seconds = time.perf_counter() - t0
    total, count = all_reduce_sum(torch.tensor([total, float(count)], dtype=torch.float64)).tolist()
    return {"loss": total / max(count, 1), "images": int(count), "train_s": seconds,
            "images_per_s": count / seconds if seconds > 0 else 0.0}


def _step(loss: torch.Tensor, optimizers: list[torch.optim.Optimizer], scaler: torch.amp.GradScaler | None) -> None:
    for opt in optimizers:
        opt.zero_grad(set_to_none=True)
    with collective_errors("the gradient all-reduce (DistributedDataParallel)"):
        if scaler is None:
            loss.backward()
            for opt in optimizers:
                opt.step()
            return
        scaler.scale(loss).backward()
        for opt in optimizers:
            scaler.step(opt)
        scaler.update()


def _check_finite_state(epoch: int, *optimizers: torch.optim.Optimizer) -> None:
    """Refuse to go on (and to checkpoint) with NaN/Inf weights or momentum buffers.

    The loss check sees a divergence one step late: the last step of an epoch can make
    the weights non-finite with a finite loss, and the checkpoint would keep them.
    """
    for opt in optimizers:
        tensors = [p for g in opt.param_groups for p in g["params"]]
        tensors += [v for st in opt.state.values() for v in st.values() if isinstance(v, torch.Tensor)]
        if not all(bool(torch.isfinite(t).all()) for t in tensors):
            raise NonFiniteLossError(
                f"weights became NaN/Inf by the end of epoch {epoch} (the last step diverged); the last good "
                "checkpoint is kept; resume with --resume and a lower --lr")
