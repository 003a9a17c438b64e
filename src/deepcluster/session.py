"""A training run being set up: its data, model, optimiser, run folder and resume point.

:func:`open_session` builds everything an epoch reads (:class:`Session`) from a
:class:`~deepcluster.config.Config`, refusing what cannot work before any work is done
(a checkpoint of another architecture, ``k`` larger than the data, options the hardware
cannot honour); :func:`restore` continues from a compatible checkpoint.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import torch
from torch import nn

from .checkpoint import check_compatible, check_resume_state, load_checkpoint
from .clustering import faiss_has_gpu
from .config import Config, apply_size_rule
from .data import (DataError, ImageSource, IndexedDataset, MultiView, cluster_transform, folder_image_size,
                   image_spec, train_transform_from, training_source)
from .distributed import world_size
from .machine import machine_info
from .models import DeepClusterNet, model_from_meta
from .optim import TrainingError, build_optimizer
from .rundir import RunDir
from .runtime import seed_everything, set_deterministic

logger = logging.getLogger("deepcluster.train")

RECENT_EPOCHS = 3
"""Epochs of assignments kept in memory (the stall check of :mod:`deepcluster.diagnostics`)."""


def arch_meta(cfg: Config, image_size: int) -> dict[str, Any]:
    """The architecture keys of a checkpoint's ``meta`` (what :func:`model_from_meta` reads)."""
    return {"arch": cfg.model.arch, "sobel": cfg.model.sobel, "image_size": image_size, "fc_dim": cfg.model.fc_dim,
            "width": cfg.model.width, "cluster_feature": cfg.cluster.feature,
            "projection_dim": cfg.model.projection_dim if cfg.cluster.feature == "projection" else None}


def run_meta(cfg: Config, num_images: int, image_size: int) -> dict[str, Any]:
    return {**arch_meta(cfg, image_size), "k": cfg.cluster.k, "method": cfg.cluster.method,
            "num_images": num_images, "data": cfg.data.name,
            "machine": machine_info()}  # of the latest (re)start; RESUME_KEYS do not include it


RESUME_KEYS = ("arch", "sobel", "k", "method", "num_images", "image_size", "fc_dim", "width", "cluster_feature",
               "projection_dim")


def build_model(cfg: Config, image_size: int, num_clusters: int) -> DeepClusterNet:
    if cfg.model.width is not None and cfg.model.arch != "alexnet_small":
        raise ValueError("model.width applies to alexnet_small only")
    model = model_from_meta(arch_meta(cfg, image_size), num_clusters, dropout=cfg.model.dropout)
    model.head_temperature = cfg.optim.temperature
    return model


def build_training_source(cfg: Config) -> ImageSource:
    return training_source(cfg.data, cfg.run.seed)


@dataclass
class Session:
    """A training run in progress: what every epoch reads and updates."""

    cfg: Config
    run: RunDir
    device: torch.device
    model: DeepClusterNet
    optimizer: torch.optim.Optimizer
    cluster_ds: IndexedDataset
    train_ds: IndexedDataset
    labels: np.ndarray | None
    meta: dict[str, Any]
    scaler: torch.amp.GradScaler | None = None
    recent: np.ndarray = field(default_factory=lambda: np.zeros((0, 0), np.int32))
    """``(<= RECENT_EPOCHS, N)`` int32: the last epochs' assignments (the previous epoch's for
    the matched head and NMI vs previous, three for the stall check); the whole history is
    in the run folder's ``assignments.npy``, never in memory."""
    records: list[dict[str, Any]] = field(default_factory=list)
    start_epoch: int = 0
    manifest: Any = None
    """Folder runs: which file each row is (written to the run folder once it is ours)."""


def _check_scale_options(cfg: Config, device: torch.device) -> None:
    """Refuse options the hardware cannot honour, before any work."""
    if cfg.run.amp == "fp16" and device.type != "cuda":
        raise TrainingError("--amp fp16 needs a CUDA device; on CPU use --amp bf16 (or none)")
    if cfg.run.sync_bn and device.type != "cuda" and world_size() > 1:
        raise TrainingError("--sync-bn needs CUDA devices (SyncBatchNorm does not run on CPU); drop --sync-bn")
    if cfg.cluster.backend == "faiss-gpu" and not faiss_has_gpu():
        raise TrainingError("--kmeans faiss-gpu needs a GPU build of faiss and a GPU; use --kmeans torch "
                            "(runs on the GPU without faiss) or --kmeans faiss (CPU)")


def open_session(cfg: Config, device: torch.device) -> tuple[Session, dict[str, Any] | None, ImageSource]:
    """Data, model and optimiser of the run in ``cfg.run.output_dir``, and the
    checkpoint to resume from (checked compatible before any work)."""
    run = RunDir(cfg.run.output_dir)
    _check_run_folder(run, cfg)
    _check_scale_options(cfg, device)
    seed_everything(cfg.run.seed)
    set_deterministic(cfg.run.deterministic)
    # Data: a fixed view for clustering, a random one for training; both give (image, index).
    source = build_training_source(cfg)
    n = len(source)
    cfg, size_note = apply_size_rule(cfg, n)  # settings that depend on N, chosen from N (resumed: kept)
    if size_note:
        logger.info("%s", size_note)
    if cfg.cluster.method == "kmeans" and cfg.cluster.k > n:
        raise DataError(f"--k {cfg.cluster.k} is larger than the number of images ({n}); lower --k")
    manifest = run.check_manifest(source)  # a folder that changed under a resumed run is refused
    state = load_checkpoint(run.checkpoint, map_location=device) if cfg.run.resume and run.checkpoint.exists() else None
    if state is not None:
        check_resume_state(state, n, run.checkpoint)
    image_size = cfg.data.image_size
    if image_size is None and cfg.data.name == "folder":
        image_size = (state or {}).get("meta", {}).get("image_size")  # a resumed run keeps the size it picked
        if image_size is None:
            image_size = folder_image_size(source)
            logger.info("image size %d px: the median shorter side of the folder's images, within [28, 224] "
                        "(--image-size to choose)", image_size)
    spec = image_spec(cfg.data.name, image_size)
    augment = train_transform_from(spec, cfg.augment)
    train_ds = IndexedDataset(source, augment if cfg.augment.crops == 1 else MultiView(augment, cfg.augment.crops))
    meta = run_meta(cfg, n, spec.size)
    if state is not None:  # refuse an incompatible checkpoint before any work
        check_compatible(state, {k: meta[k] for k in RESUME_KEYS}, run.checkpoint)
    model = build_model(cfg, spec.size, cfg.cluster.k).to(device)
    if cfg.run.sync_bn and world_size() > 1:
        model = nn.SyncBatchNorm.convert_sync_batchnorm(model)
    if cfg.run.channels_last:
        model = model.to(memory_format=torch.channels_last)
    s = Session(cfg, run, device, model, build_optimizer(model, cfg), IndexedDataset(source, cluster_transform(spec)),
                train_ds, source.labels, meta, torch.amp.GradScaler(device.type) if cfg.run.amp == "fp16" else None,
                np.zeros((0, n), dtype=np.int32), run.read_metrics() if cfg.run.resume else [], manifest=manifest)
    return s, state, source


def _check_run_folder(run: RunDir, cfg: Config) -> None:
    """Refuse a folder that is not this run's to write, before anything is written."""
    if run.checkpoint.exists() and not cfg.run.resume:
        raise TrainingError(f"{run.path} already holds a run; pass --resume to continue it or choose another --output-dir")
    if cfg.run.resume and not run.checkpoint.exists() and not run.config.exists():
        raise TrainingError(f"--resume given but {run.checkpoint} does not exist")
    foreign = [f.name for f in (run.metrics, run.assignments) if f.exists()]
    if foreign and not run.checkpoint.exists() and not run.config.exists():
        raise TrainingError(f"{run.path} holds {', '.join(foreign)} but no config.yaml or checkpoint.pt of a "
                            "deepcluster run; choose an empty or new --output-dir")


def restore(s: Session, state: dict[str, Any]) -> None:
    """Continue from a compatible checkpoint: weights, optimiser, history, epoch."""
    s.model.reset_head(state["model"]["head.weight"].shape[0])
    s.model.to(s.device)
    s.model.load_state_dict(state["model"])
    s.optimizer.load_state_dict(state["optimizer"])
    if s.scaler is not None and "scaler" in state:
        s.scaler.load_state_dict(state["scaler"])
    s.start_epoch = int(state["epoch"])
    hist = s.run.read_assignments(s.start_epoch)  # rows after the checkpoint's epoch belong to no epoch
    if hist is None or len(hist) < s.start_epoch:  # an older run, or the file lost: the checkpoint's rows
        hist = state["assignments"].numpy()
    s.recent = np.asarray(hist[-RECENT_EPOCHS:], dtype=np.int32)
    logger.info("resumed %s at epoch %d", s.run.path, s.start_epoch)


def record_skipped(run: RunDir, source: ImageSource) -> None:
    """Write the folder scan's unreadable images to ``skipped_images.txt`` and count them in the log."""
    while not hasattr(source, "skipped") and hasattr(source, "base"):  # through Subset
        source = source.base
    skipped = list(getattr(source, "skipped", []))
    run.write_skipped(skipped)
    if skipped:
        logger.warning("skipped %d unreadable images (not trained on), listed with reasons in %s",
                       len(skipped), run.skipped)
