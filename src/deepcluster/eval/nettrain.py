"""Training and scoring a whole network on labelled images: the loop shared by
fine-tuning (:mod:`.finetune`) and the supervised baseline (:mod:`.baselines`).

Written here rather than imported from ``deepcluster.train``: ``eval`` must not depend
on the DeepCluster loop.
"""

from __future__ import annotations

import itertools
import logging
import math
import time
from collections import deque
from collections.abc import Iterator
from typing import Any

import numpy as np
import torch
from torch import nn
from torch.utils.data import DataLoader, RandomSampler

from ..checkpoint import saved_config
from ..config import Config
from ..data import ImageSource, IndexedDataset, cluster_transform
from ..data.transforms import ImageSpec
from ..features import extract, make_loader
from ..models import DeepClusterNet, model_from_meta
from ..runtime import autocast, progress

logger = logging.getLogger(__name__)

TRAINABLE = ("all", "fc")


def fresh_model(state: dict[str, Any], seed: int | None = None, num_clusters: int | None = None) -> DeepClusterNet:
    """The checkpoint's architecture with random weights, initialised as the run was.

    ``torch.manual_seed(seed)`` then ``model_from_meta`` with the run's settings, in the
    order the training loop uses: with the run's seed and ``k`` this gives the
    DeepCluster run's initial weights (the random-init baseline).
    """
    meta = state.get("meta", {})
    cfg = saved_config(state) if state.get("config") else Config()
    torch.manual_seed(cfg.run.seed if seed is None else seed)
    k = num_clusters or meta.get("k") or state["model"]["head.weight"].shape[0]
    return model_from_meta(meta, num_clusters=k, dropout=cfg.model.dropout)


def set_trainable(model: DeepClusterNet, trainable: str) -> list[nn.Parameter]:
    """Freeze what ``trainable`` excludes; returns the parameters to optimise.

    ``all``: every parameter. ``fc``: fc6, fc7 and the head (the paper's fc6-8 setting);
    the conv stack, batch norm included, is frozen and kept in eval mode.
    """
    if trainable not in TRAINABLE:
        raise ValueError(f"trainable must be one of {TRAINABLE}, got {trainable!r}")
    for p in model.features.parameters():
        p.requires_grad_(trainable == "all")
    return [p for p in model.parameters() if p.requires_grad]


def _train_mode(model: DeepClusterNet, trainable: str) -> None:
    model.train()
    if trainable == "fc":
        model.features.eval()  # frozen batch-norm statistics


def train_network(model: DeepClusterNet, dataset, *, steps: int, batch_size: int, lr: float, momentum: float = 0.9,
                  weight_decay: float = 0.0, schedule: str = "cosine", trainable: str = "all", seed: int = 0,
                  device: str | torch.device = "cpu", workers: int = 0, desc: str = "train",
                  amp: str = "none") -> dict[str, float]:
    """Cross-entropy training of ``model`` (logits = ``model(x)``) for ``steps`` SGD steps.

    Progress: a bar on a terminal, else a log line every minute (:func:`deepcluster.runtime.progress`).

    Args:
        model: the network; its head must already have one output per class.
        dataset: yields ``(image, label)`` (augmented by its transform).
        steps: optimisation steps (the data are cycled through in reshuffled passes).
        schedule: ``cosine`` (decay to 0) or ``constant`` (the DeepCluster setting).
        trainable: ``all`` or ``fc`` (see :func:`set_trainable`).
        seed: seeds the batch order and dropout.
        amp: ``none`` (float32) or ``bf16`` (autocast of the forward pass and the loss;
            weights, gradients and the optimiser stay float32).

    Returns:
        ``{"loss" (mean of the last pass), "steps", "images", "seconds", "images_per_s"}``.
    """
    if steps < 1:
        raise ValueError(f"steps must be >= 1, got {steps}")
    if schedule not in ("cosine", "constant"):
        raise ValueError(f"schedule must be cosine or constant, got {schedule!r}")
    if amp not in ("none", "bf16"):
        raise ValueError(f"amp must be none or bf16 here (fp16 needs a gradient scaler), got {amp!r}")
    device = torch.device(device)
    model.to(device)
    params = set_trainable(model, trainable)
    opt = torch.optim.SGD(params, lr=lr, momentum=momentum, weight_decay=weight_decay)
    sched = torch.optim.lr_scheduler.CosineAnnealingLR(opt, T_max=steps) if schedule == "cosine" else None
    gen = torch.Generator().manual_seed(seed)
    torch.manual_seed(seed)
    loader = DataLoader(dataset, batch_size=batch_size, sampler=RandomSampler(dataset, generator=gen),
                        num_workers=workers, generator=gen, drop_last=len(dataset) > batch_size)
    _train_mode(model, trainable)
    step, images, t0 = 0, 0, time.perf_counter()
    recent: deque[float] = deque(maxlen=len(loader))  # the losses of the last pass

    def passes() -> Iterator[Any]:  # reshuffled passes over the data, as many as the steps need
        while True:
            yield from loader

    for x, y in progress(itertools.islice(passes(), steps), desc, total=steps):
        with autocast(device, amp):
            loss = nn.functional.cross_entropy(model(x.to(device)), y.to(device))
        value = loss.item()  # the one host sync of the step
        if not math.isfinite(value):
            raise RuntimeError(f"loss became {value} at step {step} of {desc}; lower --lr")
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        if sched is not None:
            sched.step()
        recent.append(value)
        step += 1
        images += len(y)
    for p in model.parameters():
        p.requires_grad_(True)
    model.eval()
    seconds = time.perf_counter() - t0
    return {"loss": float(np.mean(recent)), "steps": step, "images": images, "seconds": seconds,
            "images_per_s": images / seconds if seconds > 0 else 0.0}


@torch.no_grad()
def predict_network(model: DeepClusterNet, source: ImageSource, spec: ImageSpec, positions: np.ndarray | None = None,
                    batch_size: int = 256, device: str | torch.device = "cpu", workers: int = 0) -> np.ndarray:
    """Predicted class (argmax of the logits, eval mode, no augmentation) of each image.

    Returns:
        ``(len(positions),)`` int64 (all of ``source`` when ``positions`` is None), in order.
    """
    positions = np.arange(len(source)) if positions is None else np.asarray(positions)
    loader = make_loader(IndexedDataset(source, cluster_transform(spec)), batch_size, workers,
                         sampler=positions.tolist())
    row = np.full(len(source), -1, dtype=np.int64)
    row[positions] = np.arange(len(positions))
    model.eval().to(device)
    logits = extract(model, loader, len(positions), model.num_clusters, device, desc="predict", rows=row)
    return logits.argmax(1).astype(np.int64)
