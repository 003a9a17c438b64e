"""Fine-tuning on a small labelled set (the paper's transfer setting, Pascal VOC there).

A class-balanced subset holding ``label_fraction`` of the labels is drawn (fixed seed)
from the fitting part of the training split (the validation part stays out, so its
accuracy is an honest check). The network gets a new classifier head (one output per
class) and is trained with the training-time augmentation for a fixed number of SGD
steps, then scored on the test split.

Modes:

- ``all``: every layer is trained (from the checkpoint's weights);
- ``fc``: only fc6, fc7 and the head (the paper's fc6-8 setting); the conv stack,
  batch norm included, is frozen;
- ``scratch``: the same architecture from random weights (initialised as the run was),
  every layer trained: the baseline fine-tuning has to beat.

Every mode uses the same steps, batch size and learning-rate schedule, so the
comparison between them is fair. These hyper-parameters are fixed (not searched): a
grid of whole-network trainings would cost more than everything else together.
"""

from __future__ import annotations

import copy
import logging
import time
from typing import Any

import numpy as np
import torch

from ..checkpoint import saved_config
from ..config import AugmentConfig
from ..data import LabelledDataset, train_transform
from .context import EvalContext
from .nettrain import fresh_model, predict_network, train_network
from .splits import balanced_label_subset, fraction_tag

logger = logging.getLogger(__name__)

MODES = ("all", "fc", "scratch")
STEPS = 500
BATCH_SIZE = 64
LR = 0.01
WEIGHT_DECAY = 5e-4


def metric_name(mode: str, label_fraction: float) -> str:
    """``finetune_1pct`` (all layers), ``finetune_fc_1pct``, ``scratch_1pct``."""
    tag = fraction_tag(label_fraction)
    return {"all": f"finetune_{tag}", "fc": f"finetune_fc_{tag}", "scratch": f"scratch_{tag}"}[mode]


def finetune_eval(ctx: EvalContext, label_fraction: float, mode: str = "all", steps: int = STEPS,
                  batch_size: int = BATCH_SIZE, lr: float = LR, weight_decay: float = WEIGHT_DECAY,
                  write: bool = True) -> dict[str, Any]:
    """Fine-tune (or train from scratch) on ``label_fraction`` of the labels; test top-1.

    Args:
        label_fraction: in (0, 1]; e.g. 0.01 and 0.1.
        mode: ``all``, ``fc`` or ``scratch`` (module docstring).
        steps, batch_size, lr, weight_decay: SGD, momentum 0.9, cosine decay to 0.

    Returns:
        The result (``metrics -> {metric_name(mode, label_fraction): test top-1}``);
        written to ``finetune_<mode>_<N>pct.json``.

    Raises:
        ValueError: the fraction leaves a class empty (the message gives the minimum).
    """
    if mode not in MODES:
        raise ValueError(f"unknown fine-tuning mode {mode!r}; choose one of {MODES}")
    base = ctx.require_model("finetune")
    t0 = time.perf_counter()
    fit_labels = ctx.data.train_labels[ctx.data.fit]
    chosen = ctx.data.fit[balanced_label_subset(fit_labels, label_fraction, ctx.seed, total=len(ctx.data.train))]
    per_class = np.bincount(ctx.data.train_labels[chosen], minlength=ctx.data.num_classes)
    if mode == "scratch":
        model = fresh_model(ctx.state or {})
    else:
        model = copy.deepcopy(base)  # the context's network stays as loaded
    model.reset_head(ctx.data.num_classes, generator=torch.Generator().manual_seed(ctx.seed))
    aug = saved_config(ctx.state).augment if ctx.state else AugmentConfig()
    crop_scale = tuple(aug.crop_scale)
    transform = train_transform(ctx.data.spec, crop_scale, aug.hflip)
    dataset = LabelledDataset(ctx.data.train, transform, indices=chosen)
    logger.info("fine-tune (%s) on %d labelled images (%s of the labels, %d per class), %d steps of %d", mode,
                len(chosen), fraction_tag(label_fraction), int(per_class.max()), steps, batch_size)
    stats = train_network(model, dataset, steps=steps, batch_size=batch_size, lr=lr, weight_decay=weight_decay,
                          schedule="cosine", trainable="fc" if mode == "fc" else "all", seed=ctx.seed,
                          device=ctx.device, workers=ctx.workers, desc=f"finetune {mode}")
    test_pred = predict_network(model, ctx.data.test, ctx.data.spec, batch_size=ctx.batch_size, device=ctx.device,
                                workers=ctx.workers)
    val_pred = predict_network(model, ctx.data.train, ctx.data.spec, ctx.data.val, batch_size=ctx.batch_size,
                               device=ctx.device, workers=ctx.workers)
    test_top1 = float((test_pred == ctx.data.test_labels).mean())
    val_top1 = float((val_pred == ctx.data.train_labels[ctx.data.val]).mean())
    name = metric_name(mode, label_fraction)
    logger.info("fine-tune (%s, %s): test top-1 %.4f (val %.4f)", mode, fraction_tag(label_fraction), test_top1,
                val_top1)
    out = {**ctx.header("finetune"), "mode": mode, "label_fraction": label_fraction,
           "labelled_images": int(len(chosen)), "per_class": per_class.tolist(),
           "settings": {"steps": steps, "batch_size": batch_size, "lr": lr, "momentum": 0.9,
                        "weight_decay": weight_decay, "schedule": "cosine", "crop_scale": list(crop_scale)},
           "train": stats, "test_top1": test_top1, "val_top1": val_top1, "metrics": {name: test_top1},
           "seconds": time.perf_counter() - t0}
    if write:
        ctx.write(f"finetune_{mode}_{fraction_tag(label_fraction)}", out)
    return out
