"""Baselines evaluated in the same harness as DeepCluster.

- **raw pixels**: :func:`~deepcluster.eval.context.open_pixels` gives an evaluation
  context whose only feature is the normalised input (linear, k-NN and k-means run on it).
- **random init**: :func:`make_random_init` writes a checkpoint of the run's architecture
  with the weights the run started from (same seed, same construction order).
- **supervised**: :func:`train_supervised` trains the same architecture from the same
  initial weights with the labels, for the run's number of epochs, with the run's
  optimiser (SGD, constant lr, momentum, weight decay, batch size) and augmentation, and
  writes a checkpoint.

Both checkpoints load with :func:`~deepcluster.checkpoint.load_model`, so every protocol
runs on them unchanged (``meta["method"]`` is ``random`` / ``supervised``).
"""

from __future__ import annotations

import logging
import math
import time
from pathlib import Path
from typing import Any

import numpy as np
import torch

from ..checkpoint import load_checkpoint, save_checkpoint, saved_config
from ..data import LabelledDataset, Subset, build_source, image_spec, subset_indices, train_transform_from
from ..runtime import resolve_amp
from ..machine import machine_record
from .nettrain import fresh_model, train_network
from .splits import require_labels

logger = logging.getLogger(__name__)


def checkpoint_target(output: str | Path) -> Path:
    """The checkpoint file for ``output``: ``output`` itself if it ends in ``.pt``, else
    ``output/checkpoint.pt``; its folder is created (an unwritable place fails now)."""
    out = Path(output)
    if out.suffix != ".pt":
        out.mkdir(parents=True, exist_ok=True)
        out = out / "checkpoint.pt"
    else:
        out.parent.mkdir(parents=True, exist_ok=True)
    return out


def derived_state(state: dict[str, Any], model, method: str, epoch: int, extra: dict[str, Any]) -> dict[str, Any]:
    """A checkpoint of ``model`` made from the run checkpoint ``state`` (a baseline, a
    fine-tuned copy): the run's meta and config, ``meta.method = method``, ``meta.k`` the
    model's head, and ``extra``'s keys."""
    meta = dict(state.get("meta", {}))
    meta.update({"method": method, "k": int(model.num_clusters)})
    return {"model": {k: v.detach().cpu() for k, v in model.state_dict().items()}, "meta": meta,
            "config": state.get("config", {}), "epoch": epoch, **extra}


def make_random_init(checkpoint: str | Path, output: str | Path, seed: int | None = None) -> Path:
    """Write the random-init baseline of ``checkpoint``'s run to ``output`` (a directory
    or a ``.pt`` path); returns the checkpoint file.

    ``seed``: the torch seed of the initialisation (default: the run's, i.e. the weights
    the run started from); other seeds give the spread of random networks.
    """
    state = load_checkpoint(checkpoint)
    model = fresh_model(state, seed=seed)
    out = checkpoint_target(output)
    extra = {"source_checkpoint": str(checkpoint), "train_seconds": 0.0}
    if seed is not None:
        extra["init_seed"] = seed
    save_checkpoint(derived_state(state, model, "random", 0, extra), out)
    logger.info("random-init baseline of %s written to %s", checkpoint, out)
    return out


def train_supervised(checkpoint: str | Path, output: str | Path, *, epochs: int | None = None,
                     subset: int | None = None, device: str = "cpu", workers: int = 0,
                     data_root: str | None = None) -> Path:
    """Train the supervised top-line of ``checkpoint``'s run and write it to ``output``.

    Args:
        checkpoint: the DeepCluster run (architecture, seed, optimiser, epochs, data).
        output: a directory (``checkpoint.pt`` inside) or a ``.pt`` path.
        epochs: default: the run's number of completed epochs.
        subset: train on a fixed random subset of this many images (quick runs);
            default: the run's own subset setting.
        data_root: replaces the run's data root.

    Raises:
        DataError: the run's training data has no labels.
    """
    state = load_checkpoint(checkpoint)
    cfg = saved_config(state, str(checkpoint))
    name, root = cfg.data.name, data_root or cfg.data.root
    source = build_source(name, root, "train", False)
    labels = require_labels(source, "the supervised baseline", f"data set {name!r}" + (f" at {root}" if root else ""))
    idx = subset_indices(len(source), subset if subset is not None else cfg.data.subset, cfg.run.seed)
    if idx is not None:  # the training loop's subset rule
        source = Subset(source, idx)
        labels = np.asarray(source.labels)
    epochs = epochs if epochs is not None else int(state.get("epoch", cfg.optim.epochs))
    if epochs < 1:
        raise ValueError(f"the supervised baseline needs >= 1 epoch, got {epochs}; pass --epochs")
    num_classes = int(labels.max()) + 1
    model = fresh_model(state)  # the DeepCluster run's initial weights
    model.reset_head(num_classes, generator=torch.Generator().manual_seed(cfg.run.seed))
    spec = image_spec(name, state["meta"]["image_size"])
    transform = train_transform_from(spec, cfg.augment)
    opt = cfg.optim
    steps = epochs * math.ceil(len(source) / opt.batch_size)
    amp = resolve_amp(cfg.run.amp, torch.device(device))  # the run's precision ("auto": bf16 where native)
    amp = amp if amp in ("none", "bf16") else "none"
    logger.info("supervised baseline: %s on %d labelled images, %d epochs (%d steps of %d), lr %g constant, %s",
                state["meta"]["arch"], len(source), epochs, steps, opt.batch_size, opt.lr,
                "bfloat16 autocast" if amp == "bf16" else "float32")
    t0 = time.perf_counter()
    stats = train_network(model, LabelledDataset(source, transform), steps=steps, batch_size=opt.batch_size,
                          lr=opt.lr, momentum=opt.momentum, weight_decay=opt.weight_decay, schedule="constant",
                          trainable="all", seed=cfg.run.seed, device=device, workers=workers, desc="supervised",
                          amp=amp)
    seconds = time.perf_counter() - t0
    out = checkpoint_target(output)
    save_checkpoint(derived_state(state, model, "supervised", epochs, {
        "source_checkpoint": str(checkpoint), "train_seconds": seconds, "train_images": len(source),
        "train_stats": stats, "amp": amp, "machine": machine_record()}), out)
    logger.info("supervised baseline written to %s (%.0f s, last-pass loss %.3f)", out, seconds, stats["loss"])
    return out
