"""The DeepCluster loop: extract -> preprocess -> cluster -> relabel -> reset head ->
train one epoch -> log -> checkpoint.

Every random choice of epoch ``e`` is seeded from ``(seed, e)`` (head init, k-means,
sampler, augmentation, dropout), so a run resumed from the checkpoint of epoch ``e``
continues exactly as the uninterrupted run would (bit-identical in deterministic mode).
"""

from __future__ import annotations

import dataclasses
import errno
import fcntl
import json
import logging
import math
import os
import random
import signal
import sys
import time
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn
from torch.nn.parallel import DistributedDataParallel
from torch.utils.data import DataLoader
from tqdm import tqdm

from . import __version__
from .io import atomic_write
from .checkpoint import check_compatible, load_checkpoint, rng_state, save_checkpoint
from .clustering import (PCAWhitening, StreamingPCA, faiss_has_gpu, kmeans, resolve_pca_sample, run_pic,
                         sample_indices)
from .config import Config, save_yaml
from .data import (ClusterBalancedSampler, DataError, ImageSource, IndexedDataset, MultiView, cluster_transform,
                   folder_image_size, image_spec, inverse_size_weights, train_transform_from,
                   training_source)
from .distributed import (all_reduce_sum, barrier, broadcast_object, cleanup, collective_errors, gather_by_index,
                          init_distributed, is_distributed, is_main_process, rank, shard_indices, world_size)
from .diagnostics import collapse_warning, recent_nmi_prev
from .machine import machine_info
from .metrics import match_clusters, nmi
from .models import CentroidClassifier, CentroidHead, DeepClusterNet, MultiHeadClassifier, model_from_meta
from .tensorboard import TensorBoardWriter

logger = logging.getLogger(__name__)


class TrainingError(RuntimeError):
    """Training cannot continue; the message says where and what to do."""


class NonFiniteLossError(TrainingError):
    pass


def epoch_seed(seed: int, epoch: int, salt: int = 0) -> int:
    """A 63-bit seed for ``(seed, epoch, salt)``: independent streams per phase."""
    return int(np.random.default_rng([seed, epoch, salt]).integers(0, 2**63 - 1))


def seed_everything(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed % 2**32)
    torch.manual_seed(seed)


def set_deterministic(on: bool) -> None:
    """Deterministic kernels (slower on GPU); needed for bit-identical resume on GPU."""
    torch.use_deterministic_algorithms(on, warn_only=False)
    torch.backends.cudnn.deterministic = on
    torch.backends.cudnn.benchmark = not on
    if on:
        os.environ.setdefault("CUBLAS_WORKSPACE_CONFIG", ":4096:8")


def resolve_device(name: str) -> torch.device:
    if name.startswith("cuda") and not torch.cuda.is_available():
        raise TrainingError("--device cuda requested but no CUDA GPU is available; use --device cpu")
    return torch.device(name)


# --------------------------------------------------------------------------- data / model

def build_training_source(cfg: Config) -> ImageSource:
    return training_source(cfg.to_dict()["data"], cfg.run.seed)


def arch_meta(cfg: Config, image_size: int) -> dict[str, Any]:
    """The architecture keys of a checkpoint's ``meta`` (what :func:`model_from_meta` reads)."""
    return {"arch": cfg.model.arch, "sobel": cfg.model.sobel, "image_size": image_size, "fc_dim": cfg.model.fc_dim,
            "width": cfg.model.width, "cluster_feature": cfg.cluster.feature,
            "projection_dim": cfg.model.projection_dim if cfg.cluster.feature == "projection" else None}


def build_model(cfg: Config, image_size: int, num_clusters: int) -> DeepClusterNet:
    if cfg.model.width is not None and cfg.model.arch != "alexnet_small":
        raise ValueError("model.width applies to alexnet_small only")
    model = model_from_meta(arch_meta(cfg, image_size), num_clusters, dropout=cfg.model.dropout)
    model.head_temperature = cfg.optim.temperature
    return model


def make_loader(dataset, batch_size: int, workers: int, sampler=None, seed: int = 0, shuffle: bool = False,
                drop_last: bool = False) -> DataLoader:
    g = torch.Generator()
    g.manual_seed(seed)
    return DataLoader(dataset, batch_size=batch_size, sampler=sampler, shuffle=shuffle, num_workers=workers,
                      generator=g, drop_last=drop_last, persistent_workers=False,
                      pin_memory=False)


# --------------------------------------------------------------------------- devices & precision

AMP_DTYPES = {"bf16": torch.bfloat16, "fp16": torch.float16}


def native_bf16(device: torch.device) -> bool:
    """Whether ``device`` computes in bfloat16 in hardware: a CUDA device of compute
    capability 8 or newer, or a CPU whose oneDNN reports native bfloat16 (AVX512-BF16 or
    AMX). Emulated bfloat16 is correct but slower than float32 on a CPU."""
    if device.type == "cuda":
        return torch.cuda.is_bf16_supported(including_emulation=False)
    if device.type == "cpu":
        try:  # oneDNN's own check; private in torch 2.x, so a missing op counts as "no"
            return bool(torch.backends.mkldnn.is_available() and torch.ops.mkldnn._is_mkldnn_bf16_supported())
        except (AttributeError, RuntimeError):
            return False
    return False


def resolve_amp(amp: str, device: torch.device) -> str:
    """``auto`` -> ``bf16`` where :func:`native_bf16`, else ``none``; other values unchanged."""
    if amp != "auto":
        return amp
    return "bf16" if native_bf16(device) else "none"


def autocast(device: torch.device, amp: str = "none"):
    """Mixed-precision context for ``amp`` (``none``, ``bf16``, ``fp16``) on ``device``."""
    return torch.autocast(device_type=device.type, dtype=AMP_DTYPES.get(amp, torch.float32), enabled=amp != "none")


def to_device(images: torch.Tensor, device: torch.device, channels_last: bool = False) -> torch.Tensor:
    """``(B, 3, H, W)`` batch on ``device`` (channels_last layout when asked)."""
    images = images.to(device, non_blocking=True)
    return images.contiguous(memory_format=torch.channels_last) if channels_last else images


def per_rank_batch_size(batch_size: int, world: int) -> int:
    """Images per rank and step for a *global* batch of ``batch_size``.

    A global batch that the world size does not divide is rounded up to the next
    multiple (logged): e.g. 250 on 3 ranks gives 84 per rank, 252 per step.
    """
    per = -(-batch_size // world)
    if per * world != batch_size and is_main_process():
        logger.warning("batch size %d is not a multiple of the world size %d: using %d per rank (%d per step)",
                       batch_size, world, per, per * world)
    return per


# --------------------------------------------------------------------------- phases

@torch.no_grad()
def iter_features(model: DeepClusterNet, loader: DataLoader, device: torch.device, amp: str = "none",
                  channels_last: bool = False, desc: str = "extract") -> Iterator[tuple[np.ndarray, np.ndarray]]:
    """``(indices (B,) int64, features (B, fc_dim) float32)`` for every batch of ``loader``
    (which yields ``(images, indices)``), the model in eval mode, no augmentation."""
    was_training = model.training
    model.eval()
    try:
        for images, idx in tqdm(loader, desc=desc, leave=False, disable=None if is_main_process() else True):
            with autocast(device, amp):
                out = model.forward_features(to_device(images, device, channels_last))
            yield idx.numpy().astype(np.int64), out.float().cpu().numpy()
    finally:
        model.train(was_training)


@torch.no_grad()
def extract_features(model: DeepClusterNet, loader: DataLoader, num_images: int, device: torch.device,
                     desc: str = "extract", amp: str = "none", channels_last: bool = False) -> np.ndarray:
    """Clustering features of every image, placed by data-set index: ``(N, fc_dim)``.

    The loader must yield ``(images, indices)``; rows are written at ``indices``, so
    the order of batches does not matter. Every index must be seen exactly once.
    Under ``torch.distributed`` the loader covers this rank's shard (e.g. a sampler
    over :func:`~deepcluster.distributed.shard_indices`); the ``(index, feature)`` pairs
    of all ranks are gathered and placed by index, and every rank gets the whole array.
    This holds N x fc_dim floats: the training loop uses :func:`extract_reduced`.
    """
    if is_distributed():
        pairs = list(iter_features(model, loader, device, amp, channels_last, desc))
        idx = np.concatenate([p[0] for p in pairs]) if pairs else np.zeros(0, np.int64)
        vals = np.concatenate([p[1] for p in pairs]) if pairs else np.zeros((0, model.feature_dim), np.float32)
        try:
            return gather_by_index(idx, vals, num_images).numpy()
        except ValueError as e:
            raise TrainingError(f"feature extraction: {e}") from None
    feats = np.zeros((num_images, model.feature_dim), dtype=np.float32)
    seen = np.zeros(num_images, dtype=bool)
    for idx, out in iter_features(model, loader, device, amp, channels_last, desc):
        feats[idx] = out
        seen[idx] = True
    if not seen.all():
        raise TrainingError(f"feature extraction missed {int((~seen).sum())} images")
    return feats


def _check_finite(bad_rows: int, where: str) -> None:
    bad = int(all_reduce_sum(torch.tensor(float(bad_rows), dtype=torch.float64)).item())
    if bad:
        raise TrainingError(f"features of {bad} images{where} are NaN/Inf: the network diverged; resume with a lower --lr")


def extract_reduced(model: DeepClusterNet, dataset: IndexedDataset, cfg: Config, device: torch.device, seed: int,
                    desc: str = "extract") -> dict[str, Any]:
    """This rank's PCA-whitened, L2-normalised features, in bounded memory.

    One pass over this rank's shard of the data set (:func:`shard_indices`): the images
    of the PCA sample first (``cluster.pca_sample``, drawn with ``seed``, the same on
    every rank), whose full-width features are buffered and fitted on (all ranks
    together), then every other image, projected batch by batch. Only
    ``n_rank x pca_dim`` values (``cluster.feature_dtype``) are kept.

    Returns:
        ``indices`` (``(n_rank,)`` data-set indices, sorted), ``x`` (``(n_rank, pca_dim)``),
        ``pca`` (the fitted :class:`PCAWhitening`), ``pca_sample`` (its size),
        ``extract_s`` and ``pca_s`` (fit and projection of the sample).
    """
    c, bs, workers = cfg.cluster, cfg.optim.batch_size, cfg.run.workers
    amp, channels_last = cfg.run.amp, cfg.run.channels_last
    n = len(dataset)
    shard = shard_indices(n)
    sample = sample_indices(n, resolve_pca_sample(n, model.feature_dim, c.pca_sample), seed)
    first = np.isin(shard, sample, assume_unique=True)
    stream = StreamingPCA(PCAWhitening(c.pca_dim, whiten=c.whiten, eps=c.whiten_eps), len(shard),
                          sample_rows=int(first.sum()), dtype=np.dtype(c.feature_dtype))
    t0 = time.perf_counter()
    bad = 0
    loader = make_loader(dataset, bs, workers, sampler=shard[first].tolist(), seed=seed)
    for idx, out in iter_features(model, loader, device, amp, channels_last, desc):
        bad += int((~np.isfinite(out)).any(1).sum())
        stream.add_sample(np.searchsorted(shard, idx), out)
    _check_finite(bad, " in the PCA sample")
    t1 = time.perf_counter()
    pca = stream.fit()
    pca_s = time.perf_counter() - t1
    loader = make_loader(dataset, bs, workers, sampler=shard[~first].tolist(), seed=seed)
    for idx, out in iter_features(model, loader, device, amp, channels_last, desc):
        bad += int((~np.isfinite(out)).any(1).sum())
        stream.add(np.searchsorted(shard, idx), out)
    _check_finite(bad, "")
    return {"indices": shard, "x": stream.result(), "pca": pca, "pca_sample": len(sample),
            "extract_s": time.perf_counter() - t0 - pca_s, "pca_s": pca_s}


def recompute_bn_stats(model: DeepClusterNet, dataset: IndexedDataset, num_images: int, seed: int, batch_size: int,
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
    was_training = model.training
    model.train()
    batches = 0
    try:
        with torch.no_grad():
            for images, _ in make_loader(dataset, batch_size, workers, sampler=idx.tolist(), seed=seed):
                with autocast(device, amp):
                    model.forward_backbone(to_device(images, device, channels_last))
                batches += 1
    finally:
        for h in hooks:
            h.remove()
        model.train(was_training)
    for m in bns:
        total, squares, n = sums[id(m)]
        mean = total / n
        var = (squares / n - mean * mean).clamp_min(0) * (n / max(n - 1, 1))  # unbiased, as BatchNorm keeps it
        with torch.no_grad():
            m.running_mean.copy_(mean.to(m.running_mean))
            m.running_var.copy_(var.to(m.running_var))
            m.num_batches_tracked.fill_(batches)
    return len(bns)


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


def cluster_reduced(x: np.ndarray, indices: np.ndarray, num_images: int, cfg: Config, seed: int,
                    device: torch.device | None = None) -> dict[str, Any]:
    """k-means (or PIC) on PCA-reduced features; assignments for all ``num_images``.

    Args:
        x: ``(n_rank, pca_dim)`` this rank's features (all of them in one process).
        indices: ``(n_rank,)`` their data-set indices.
        device: where the torch k-means backend runs (default CPU).

    k-means keeps each rank's shard and all-reduces sums and counts (every backend);
    PIC needs the whole graph: the features are gathered and rank 0's result broadcast.
    The assignments of all ranks are gathered by index.
    """
    c = cfg.cluster
    t1 = time.perf_counter()
    if c.method == "kmeans":
        res = kmeans(x, c.k, niter=c.niter, seed=seed, backend=c.backend,
                     device=device if c.backend == "torch" else None, indices=indices)
        assignments = gather_by_index(indices, torch.from_numpy(res.assignments), num_images).numpy()
        out = {"assignments": assignments, "centroids": res.centroids, "loss": res.loss,
               "n_empty_fixed": res.n_empty_fixed}
    else:
        xg = gather_by_index(indices, torch.from_numpy(np.asarray(x, dtype=np.float32)), num_images).numpy()
        out = None
        if is_main_process():
            pic = run_pic(xg, n_neighbors=c.pic_neighbors, sigma=c.pic_sigma, n_iter=c.pic_iters,
                          use_gpu=c.backend != "faiss")
            assignments = pic.assignments
            centroids = np.stack([xg[assignments == j].mean(0) for j in range(pic.num_clusters)]).astype(np.float32)
            out = {"assignments": assignments, "centroids": centroids,
                   "loss": float(((xg - centroids[assignments]) ** 2).sum(1).mean()), "n_empty_fixed": 0}
        out = broadcast_object(out)
    out["assignments"] = np.asarray(out["assignments"]).astype(np.int64)
    out["cluster_s"] = time.perf_counter() - t1
    return out


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
                    optimizer: torch.optim.Optimizer, head_optimizer: torch.optim.Optimizer,
                    device: torch.device, epoch: int, class_weights: torch.Tensor | None = None,
                    amp: str = "none", channels_last: bool = False,
                    scaler: torch.amp.GradScaler | None = None) -> dict[str, float]:
    """One pass of cross-entropy on the pseudo-labels (``(N,)``, or ``(N, H)`` for H
    clusterings with a model returning ``(H, B, k)``: :func:`pseudo_label_loss`);
    returns averaged stats.

    ``model`` may be wrapped in ``DistributedDataParallel`` (the loader then yields this
    rank's share); loss and image counts are summed over ranks. ``scaler`` is needed
    with ``amp="fp16"``.

    Raises:
        NonFiniteLossError: the loss became NaN or Inf (naming epoch and step).
    """
    model.train()
    weights = None if class_weights is None else class_weights.to(device)
    total, count = 0.0, 0
    t0 = time.perf_counter()
    bar = tqdm(loader, desc=f"train {epoch}", leave=False, disable=None if is_main_process() else True)
    for step, (images, idx) in enumerate(bar):
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
                "resume with --resume and a lower --lr"
            )
        optimizer.zero_grad(set_to_none=True)
        head_optimizer.zero_grad(set_to_none=True)
        with collective_errors("the gradient all-reduce (DistributedDataParallel)"):
            if scaler is not None:
                scaler.scale(loss).backward()
                scaler.step(optimizer)
                scaler.step(head_optimizer)
                scaler.update()
            else:
                loss.backward()
                optimizer.step()
                head_optimizer.step()
        total += loss.item() * len(idx)
        count += len(idx)
    _check_finite_state(epoch, optimizer, head_optimizer)
    seconds = time.perf_counter() - t0
    total, count = all_reduce_sum(torch.tensor([total, float(count)], dtype=torch.float64)).tolist()
    count = int(count)
    return {"loss": total / max(count, 1), "images": count, "train_s": seconds,
            "images_per_s": count / seconds if seconds > 0 else 0.0}


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


# --------------------------------------------------------------------------- run directory

class RunDir:
    """The files of a run: ``config.yaml``, ``metrics.jsonl``, ``checkpoint.pt``,
    ``assignments.npy`` (int32, epochs x N), ``nmi.png``, ``train.log``, ``run.lock``,
    ``skipped_images.txt`` (unreadable images of a folder, ``path<TAB>reason``)."""

    def __init__(self, path: str | Path) -> None:
        self.path = Path(path)
        self.config = self.path / "config.yaml"
        self.metrics = self.path / "metrics.jsonl"
        self.checkpoint = self.path / "checkpoint.pt"
        self.assignments = self.path / "assignments.npy"
        self.plot = self.path / "nmi.png"
        self.log = self.path / "train.log"
        self.lock = self.path / "run.lock"
        self.skipped = self.path / "skipped_images.txt"
        self._lock_fd: int | None = None

    def acquire(self) -> None:
        """Take the run directory for this process, or refuse: another run holds it.

        ``run.lock`` (holding the pid, for the message) is locked with ``flock``: the
        kernel drops the lock when its process ends, however it ends (SIGKILL too), so a
        dead run never blocks a restart and a live one always refuses a second.
        """
        self.path.mkdir(parents=True, exist_ok=True)
        while True:
            fd = os.open(self.lock, os.O_RDWR | os.O_CREAT, 0o644)
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except OSError as e:
                holder = os.read(fd, 32).decode(errors="replace").strip() or "?"
                os.close(fd)
                if e.errno not in (errno.EWOULDBLOCK, errno.EACCES):
                    raise
                raise TrainingError(f"{self.path} is in use by process {holder} (run.lock): wait for it to end "
                                    "or choose another --output-dir") from None
            try:  # the holder may have released (and removed) the file meanwhile: lock the new one
                if os.fstat(fd).st_ino == os.stat(self.lock).st_ino:
                    break
            except FileNotFoundError:
                pass
            os.close(fd)
        os.ftruncate(fd, 0)
        os.write(fd, str(os.getpid()).encode())
        self._lock_fd = fd

    def remove_stale_temps(self) -> None:
        """Remove the ``.<name>.<random>.tmp`` files of :func:`atomic_write` that a killed
        process left behind (call while holding the lock: nobody else writes here)."""
        stale = sorted(self.path.glob(".*.tmp"))
        for p in stale:
            p.unlink(missing_ok=True)
        if stale:
            logger.info("removed %d temporary files of interrupted writes: %s", len(stale),
                        ", ".join(p.name for p in stale))

    def release(self) -> None:
        if self._lock_fd is not None:
            self.lock.unlink(missing_ok=True)
            os.close(self._lock_fd)  # drops the flock
            self._lock_fd = None

    def write_skipped(self, skipped: list[tuple[str, str]]) -> None:
        """``skipped_images.txt``: one ``path<TAB>reason`` line per unreadable image
        (removed when there are none, so it never describes an older scan)."""
        if not skipped:
            self.skipped.unlink(missing_ok=True)
            return
        clean = lambda t: t.replace("\t", " ").replace("\n", " ")  # noqa: E731
        text = "".join(f"{clean(p)}\t{clean(r)}\n" for p, r in skipped)
        atomic_write(self.skipped, lambda f: f.write(text.encode()))

    def read_metrics(self) -> list[dict[str, Any]]:
        if not self.metrics.exists():
            return []
        return [json.loads(line) for line in self.metrics.read_text().splitlines() if line.strip()]

    def write_metrics(self, records: list[dict[str, Any]]) -> None:
        text = "".join(json.dumps(r) + "\n" for r in records)
        atomic_write(self.metrics, lambda f: f.write(text.encode()))

    def write_assignments(self, history: np.ndarray) -> None:
        atomic_write(self.assignments, lambda f: np.save(f, history.astype(np.int32)))


def _record_skipped(run: RunDir, source: ImageSource) -> None:
    """Write the folder scan's unreadable images to ``skipped_images.txt`` and count them in the log."""
    while not hasattr(source, "skipped") and hasattr(source, "base"):  # through Subset
        source = source.base
    skipped = list(getattr(source, "skipped", []))
    run.write_skipped(skipped)
    if skipped:
        logger.warning("skipped %d unreadable images (not trained on), listed with reasons in %s",
                       len(skipped), run.skipped)


# --------------------------------------------------------------------------- the loop

def _meta(cfg: Config, num_images: int, image_size: int) -> dict[str, Any]:
    return {**arch_meta(cfg, image_size), "k": cfg.cluster.k, "method": cfg.cluster.method,
            "num_images": num_images, "data": cfg.data.name,
            "machine": machine_info()}  # of the latest (re)start; RESUME_KEYS do not include it


def build_optimizer(model: DeepClusterNet, cfg: Config) -> torch.optim.Optimizer:
    """SGD over everything but the head (the head gets its own, rebuilt every epoch)."""
    params = [p for n, p in model.named_parameters() if not n.startswith("head.") and p.requires_grad]
    return torch.optim.SGD(params, lr=cfg.optim.lr, momentum=cfg.optim.momentum, weight_decay=cfg.optim.weight_decay)


def epoch_lr(cfg: Config, epoch: int) -> float:
    """The learning rate of ``epoch``: ``optim.lr``, or its cosine decay over ``optim.epochs``."""
    if cfg.optim.lr_schedule == "cosine":
        return cfg.optim.lr * 0.5 * (1.0 + math.cos(math.pi * epoch / cfg.optim.epochs))
    return cfg.optim.lr


def build_head_optimizer(model: DeepClusterNet, cfg: Config, lr: float | None = None,
                         extra_heads: Sequence[nn.Module] = ()) -> torch.optim.Optimizer:
    params = [p for head in (model.head, *extra_heads) for p in head.parameters()]
    return torch.optim.SGD(params, lr=cfg.optim.lr if lr is None else lr,
                           momentum=cfg.optim.momentum, weight_decay=cfg.optim.weight_decay)


RESUME_KEYS = ("arch", "sobel", "k", "method", "num_images", "image_size", "fc_dim", "width", "cluster_feature",
               "projection_dim")


def restore(state: dict[str, Any], model: DeepClusterNet, optimizer: torch.optim.Optimizer,
            device: torch.device) -> tuple[int, np.ndarray]:
    """Load a compatible checkpoint's weights and optimiser into ``model``/``optimizer``."""
    model.reset_head(state["model"]["head.weight"].shape[0])
    model.to(device)
    model.load_state_dict(state["model"])
    optimizer.load_state_dict(state["optimizer"])
    history = state["assignments"].numpy().astype(np.int32)
    return int(state["epoch"]), history


def train(cfg: Config) -> dict[str, Any]:
    """Run DeepCluster as configured; returns the last epoch's metrics.

    Writes the run directory (see :class:`RunDir`). With ``cfg.run.resume`` it continues
    from ``checkpoint.pt`` there; without it, an existing checkpoint is an error.

    Under ``torchrun`` (or in a process group set up by the caller) every rank runs this;
    only rank 0 writes the run directory (the others log to ``train.rank<N>.log``). The
    run directory must be on a file system all ranks see (they read the checkpoint to
    resume). The checkpoint does not depend on the world size: a run can resume on a
    different number of processes.
    """
    device = resolve_device(cfg.run.device)
    device, own_group = init_distributed(cfg.run.device, cfg.run.dist_timeout)
    try:
        return _train(cfg, device)
    finally:
        if own_group:
            cleanup()


def _check_scale_options(cfg: Config, device: torch.device) -> None:
    """Refuse options the hardware cannot honour, before any work."""
    if cfg.run.amp == "fp16" and device.type != "cuda":
        raise TrainingError("--amp fp16 needs a CUDA device; on CPU use --amp bf16 (or none)")
    if cfg.run.sync_bn and device.type != "cuda" and world_size() > 1:
        raise TrainingError("--sync-bn needs CUDA devices (SyncBatchNorm does not run on CPU); drop --sync-bn")
    if cfg.cluster.backend == "faiss-gpu" and not faiss_has_gpu():
        raise TrainingError("--kmeans faiss-gpu needs a GPU build of faiss and a GPU; use --kmeans torch "
                            "(runs on the GPU without faiss) or --kmeans faiss (CPU)")


def _prepare_model(model: DeepClusterNet, cfg: Config, device: torch.device) -> DeepClusterNet:
    """SyncBatchNorm and channels_last as configured (the same parameter objects)."""
    if cfg.run.sync_bn and world_size() > 1:
        model = nn.SyncBatchNorm.convert_sync_batchnorm(model)
    if cfg.run.channels_last:
        model = model.to(memory_format=torch.channels_last)
    return model


def _train(cfg: Config, device: torch.device) -> dict[str, Any]:
    run = RunDir(cfg.run.output_dir)
    if run.checkpoint.exists() and not cfg.run.resume:
        raise TrainingError(f"{run.path} already holds a run; pass --resume to continue it or choose another --output-dir")
    if cfg.run.resume and not run.checkpoint.exists() and not run.config.exists():
        raise TrainingError(f"--resume given but {run.checkpoint} does not exist")
    _check_scale_options(cfg, device)
    saved_cfg = cfg  # config.yaml keeps "auto", so a resumed run decides again on its machine
    amp = resolve_amp(cfg.run.amp, device)
    if amp != cfg.run.amp:
        cfg = dataclasses.replace(cfg, run=dataclasses.replace(cfg.run, amp=amp))
    seed_everything(cfg.run.seed)
    set_deterministic(cfg.run.deterministic)

    # Data: a fixed view for clustering, a random one for training; both give (image, index).
    source = build_training_source(cfg)
    n = len(source)
    if cfg.cluster.method == "kmeans" and cfg.cluster.k > n:
        raise DataError(f"--k {cfg.cluster.k} is larger than the number of images ({n}); lower --k")
    state = None
    if cfg.run.resume and run.checkpoint.exists():
        state = load_checkpoint(run.checkpoint, map_location=device)
    image_size = cfg.data.image_size
    if image_size is None and cfg.data.name == "folder":
        image_size = (state or {}).get("meta", {}).get("image_size")  # a resumed run keeps the size it picked
        if image_size is None:
            image_size = folder_image_size(source)
            logger.info("image size %d px: the median shorter side of the folder's images, within [28, 224] "
                        "(--image-size to choose)", image_size)
    spec = image_spec(cfg.data.name, image_size)
    cluster_ds = IndexedDataset(source, cluster_transform(spec))
    augment = train_transform_from(spec, cfg.to_dict()["optim"])
    train_ds = IndexedDataset(source, augment if cfg.optim.crops == 1 else MultiView(augment, cfg.optim.crops))
    labels = source.labels

    meta = _meta(cfg, n, spec.size)
    if state is not None:  # refuse an incompatible checkpoint before any work
        check_compatible(state, {k: meta[k] for k in RESUME_KEYS}, run.checkpoint)

    # Model and optimiser.
    model = _prepare_model(build_model(cfg, spec.size, cfg.cluster.k).to(device), cfg, device)
    optimizer = build_optimizer(model, cfg)
    scaler = torch.amp.GradScaler(device.type) if cfg.run.amp == "fp16" else None

    if is_main_process():  # only rank 0 writes the run directory
        run.acquire()
    else:
        run.path.mkdir(parents=True, exist_ok=True)
    tb = None
    try:
        _setup_file_log(run)
        if is_main_process():
            run.remove_stale_temps()
            _record_skipped(run, source)
        if cfg.run.tensorboard and is_main_process():  # the tensorboard package is imported lazily
            tb = TensorBoardWriter(run.path)
            tb_sample = torch.stack([cluster_ds[int(i)][0] for i in np.linspace(0, n - 1, min(64, n))])
        history = np.zeros((0, n), dtype=np.int32)
        start_epoch = 0
        if state is not None:
            start_epoch, history = restore(state, model, optimizer, device)
            if scaler is not None and "scaler" in state:
                scaler.load_state_dict(state["scaler"])
            del state
            logger.info("resumed %s at epoch %d", run.path, start_epoch)
        records = [r for r in run.read_metrics() if r["epoch"] < start_epoch]
        if is_main_process():
            run.write_metrics(records)
            save_yaml(saved_cfg, run.config)
        if world_size() > 1:
            logger.info("torch.distributed: %d processes (%s); global batch %d", world_size(),
                        "nccl" if device.type == "cuda" else "gloo", cfg.optim.batch_size)
        clustering = (f"k-means k={cfg.cluster.k}" if cfg.cluster.method == "kmeans" else
                      f"PIC sigma={cfg.cluster.pic_sigma:g}, {cfg.cluster.pic_neighbors} neighbours")
        logger.info("DeepCluster %s: %s at %d px on %d images (%s, %s), epochs %d..%d, device %s", __version__,
                    cfg.model.arch, spec.size, n, cfg.data.name, clustering, start_epoch, cfg.optim.epochs - 1, device)
        if saved_cfg.run.amp == "auto":
            logger.info("--amp auto: %s on this %s", "bf16" if amp == "bf16" else "float32 (no native bfloat16)",
                        device.type.upper())
        last: dict[str, Any] = records[-1] if records else {}
        with _graceful_stop(run) as stop:
            for epoch in range(start_epoch, cfg.optim.epochs):
                last = run_epoch(cfg, epoch, model, optimizer, cluster_ds, train_ds, labels, history, device,
                                 scaler=scaler)
                history = np.concatenate([history, last.pop("_assignments")[None].astype(np.int32)])
                extra = last.pop("_checkpoint_extra")
                extra["world_size"] = world_size()
                if scaler is not None:
                    extra["scaler"] = scaler.state_dict()
                records.append(last)
                if is_main_process():
                    _save_epoch(run, cfg, model, optimizer, epoch, history, records, meta, extra)
                if tb is not None:
                    tb.log_epoch(last, model, tb_sample)
                logger.info(_summary_line(last))
                if stop.requested:
                    raise KeyboardInterrupt(stop.signum)
        barrier()  # every rank returns once rank 0's last checkpoint is written
        return last
    finally:
        if tb is not None:
            tb.close()
        run.release()
        _teardown_file_log()


BN_RECOMPUTE_IMAGES = 10_000
"""Images whose un-augmented views give the batch-norm statistics of ``cluster.bn: recompute``."""


def run_epoch(cfg: Config, epoch: int, model: DeepClusterNet, optimizer: torch.optim.Optimizer,
              cluster_ds: IndexedDataset, train_ds: IndexedDataset, labels: np.ndarray | None,
              history: np.ndarray, device: torch.device,
              scaler: torch.amp.GradScaler | None = None) -> dict[str, Any]:
    """One DeepCluster epoch; returns its metrics record (plus private keys).

    Under ``torch.distributed`` every rank extracts and clusters its shard of the data
    set, all ranks get the same assignments, and each trains on its share of the same
    epoch plan with the model wrapped in ``DistributedDataParallel``.
    """
    # Dropout & anything unseeded; rank r > 0 gets its own stream (rank 0's is the
    # single-process one), so augmentations are not repeated across ranks.
    seed_everything(epoch_seed(cfg.run.seed, epoch, 0) + rank())
    n = len(cluster_ds)
    bs, workers = cfg.optim.batch_size, cfg.run.workers

    # 1-2. Features of every image (this rank's shard), no augmentation; PCA-whitening
    # fitted on a sample and applied batch by batch, L2.
    t0 = time.perf_counter()
    cluster_seed = epoch_seed(cfg.run.seed, epoch, 2)
    if cfg.cluster.bn == "recompute":
        recompute_bn_stats(model, cluster_ds, BN_RECOMPUTE_IMAGES, epoch_seed(cfg.run.seed, epoch, 6), bs, workers,
                           device, cfg.run.amp, cfg.run.channels_last)
    red = extract_reduced(model, cluster_ds, cfg, device, cluster_seed, desc=f"extract {epoch}")
    extract_s = time.perf_counter() - t0 - red["pca_s"]
    # The network these features came from: with the PCA and centroids it maps an image
    # to this epoch's clusters (deepcluster assign); training below moves the weights.
    cluster_model = {k: v.detach().cpu().clone() for k, v in model.state_dict().items() if not k.startswith("head.")}

    # 3. Clustering (k-means sharded over ranks), assignments of every image.
    x = red.pop("x")
    res = cluster_reduced(x, red["indices"], n, cfg, cluster_seed, device)
    # Further k-means runs on the same features, each from its own seed (DeepCluster-v2).
    others = [cluster_reduced(x, red["indices"], n, cfg, epoch_seed(cfg.run.seed, epoch, 10 + j), device)
              for j in range(1, cfg.cluster.clusterings)]
    del x
    res["cluster_s"] += sum(o["cluster_s"] for o in others)
    res["pca"], res["pca_s"] = red["pca"], red["pca_s"]
    assignments = res["assignments"]
    num_clusters = int(assignments.max()) + 1 if cfg.cluster.method == "pic" else cfg.cluster.k
    sizes = np.bincount(assignments, minlength=num_clusters)

    # 4-5. Pseudo-labels, a new head, one epoch of training.
    gen = torch.Generator().manual_seed(epoch_seed(cfg.run.seed, epoch, 3))
    old_head = model.head
    model.reset_head(num_clusters, generator=gen)
    carried = None
    if cfg.optim.head == "matched" and len(history):  # the previous head's rows, to their matched clusters
        carried = carry_head(old_head, model.head, history[-1], assignments)
    del old_head
    extra_heads = [model.new_head(num_clusters, generator=gen) for _ in others]
    lr = epoch_lr(cfg, epoch)
    for group in optimizer.param_groups:  # a function of the epoch: a resumed run gets the same
        group["lr"] = lr
    head_optimizer = build_head_optimizer(model, cfg, lr, extra_heads)
    balanced = cfg.optim.balance == "sampler"
    sampler = ClusterBalancedSampler(assignments, seed=epoch_seed(cfg.run.seed, epoch, 4), balanced=balanced,
                                     rank=rank(), world_size=world_size())
    targets = np.stack([assignments] + [o["assignments"] for o in others], 1) if others else assignments
    weights = None
    if cfg.optim.balance == "weight":  # (k,) for one clustering, (H, k) for several
        weights = torch.stack([inverse_size_weights(t, num_clusters) for t in targets.reshape(n, -1).T])
        weights = weights if others else weights[0]
    train_loader = make_loader(train_ds, per_rank_batch_size(bs, world_size()), workers, sampler=sampler,
                               seed=epoch_seed(cfg.run.seed, epoch, 5) + rank())
    net: nn.Module = model
    if cfg.optim.head == "centroids":  # DeepCluster-v2: score against this epoch's centroids
        pca = res["pca"]
        head = CentroidHead(pca.mean, pca.projection, res["centroids"], cfg.optim.temperature).to(device)
        net = CentroidClassifier(model, head)
    if extra_heads:
        net = MultiHeadClassifier(model, extra_heads)
    if is_distributed():  # re-wrapped every epoch: the head is a new layer
        net = DistributedDataParallel(net, device_ids=[device.index] if device.type == "cuda" else None)
    stats = train_one_epoch(net, train_loader, torch.from_numpy(targets), optimizer, head_optimizer,
                            device, epoch, weights, amp=cfg.run.amp, channels_last=cfg.run.channels_last,
                            scaler=scaler)
    del net

    record: dict[str, Any] = {
        "epoch": epoch,
        "convnet_loss": stats["loss"],
        "clustering_loss": res["loss"],
        "nmi_prev": nmi(history[-1], assignments) if len(history) else None,
        "nmi_labels": nmi(labels, assignments) if labels is not None else None,
        # agreement of the epoch's k-means runs with the first (several clusterings only)
        "nmi_clusterings": float(np.mean([nmi(assignments, o["assignments"]) for o in others])) if others else None,
        "head_rows_carried": carried,  # optim.head matched only
        "num_clusters": num_clusters,
        "cluster_size_min": int(sizes.min()),
        "cluster_size_median": float(np.median(sizes)),
        "cluster_size_max": int(sizes.max()),
        "empty_clusters": int((sizes == 0).sum()),
        "empty_reseeded": int(res["n_empty_fixed"]),
        "extract_s": extract_s,
        "pca_s": res["pca_s"],
        "kmeans_s": res["cluster_s"],
        "train_s": stats["train_s"],
        "epoch_s": time.perf_counter() - t0,
        "images_per_s": stats["images_per_s"],
        "lr": lr,
        "amp": cfg.run.amp,  # as resolved for this machine (config.yaml may say auto)
        "_assignments": assignments,
        "_checkpoint_extra": {"pca": res["pca"].state_dict(), "centroids": torch.from_numpy(res["centroids"]),
                              "cluster_model": cluster_model},
    }
    record["collapse_warning"] = collapse_warning(sizes, recent_nmi_prev(history, assignments, record["nmi_prev"]), cfg)
    if record["collapse_warning"]:
        logger.warning("epoch %d: %s", epoch, record["collapse_warning"])
    if cfg.run.eval_every and (epoch + 1) % cfg.run.eval_every == 0 and labels is not None:
        from .eval.knn import knn_probe  # stopping criterion: cheap k-NN on held-out labelled images

        record.update(knn_probe(model, cluster_ds, labels, device, seed=cfg.run.seed, batch_size=bs, workers=workers))
    return record


def _save_epoch(run: RunDir, cfg: Config, model: DeepClusterNet, optimizer: torch.optim.Optimizer, epoch: int,
                history: np.ndarray, records: list[dict[str, Any]], meta: dict[str, Any],
                extra: dict[str, Any]) -> None:
    """Assignments, metrics, then the checkpoint (the commit point of the epoch), plot."""
    run.write_assignments(history)
    run.write_metrics(records)
    state = {
        "model": {k: v.detach().cpu() for k, v in model.state_dict().items()},
        "optimizer": optimizer.state_dict(),
        "epoch": epoch + 1,
        "rng": rng_state(),
        "assignments": torch.from_numpy(history),
        "meta": meta,
        "config": cfg.to_dict(),
        **extra,
    }
    save_checkpoint(state, run.checkpoint)
    try:
        from .viz import plot_nmi, save_figure

        save_figure(plot_nmi(records), run.plot)
    except OSError as e:
        logger.warning("could not write %s: %s", run.plot, e)


def _summary_line(r: dict[str, Any]) -> str:
    f = lambda v: "-" if v is None else f"{v:.3f}"  # noqa: E731
    return (f"epoch {r['epoch']}: convnet loss {r['convnet_loss']:.3f}, clustering loss {r['clustering_loss']:.3f}, "
            f"NMI vs labels {f(r['nmi_labels'])}, NMI vs prev {f(r['nmi_prev'])}, clusters {r['num_clusters']} "
            f"(sizes {r['cluster_size_min']}/{r['cluster_size_median']:.0f}/{r['cluster_size_max']}), "
            f"{r['epoch_s']:.0f}s (extract {r['extract_s']:.0f}, pca {r['pca_s']:.1f}, cluster {r['kmeans_s']:.1f}, "
            f"train {r['train_s']:.0f}; {r['images_per_s']:.0f} img/s)")


_file_handler: logging.Handler | None = None


class _LogFile(logging.FileHandler):
    """A log file that cannot break the run: on a full disk it says so once on stderr
    and drops its lines, instead of a traceback per line and an error at close that
    would hide the real one."""

    _failed = False

    def handleError(self, record: logging.LogRecord) -> None:
        if not self._failed:
            self._failed = True
            print(f"deepcluster: warning: cannot write {self.baseFilename} ({sys.exc_info()[1]}); "
                  "log lines go to the console only", file=sys.stderr)

    def close(self) -> None:
        try:
            super().close()
        except OSError:
            pass


_saved_level: int | None = None


def _setup_file_log(run: RunDir) -> None:
    """``train.log`` on rank 0; ``train.rank<N>.log`` at debug level on rank N > 0."""
    global _file_handler, _saved_level
    _teardown_file_log()
    r = rank()
    _file_handler = _LogFile(run.log if r == 0 else run.path / f"train.rank{r}.log")
    _file_handler.setFormatter(logging.Formatter(f"%(asctime)s %(levelname)s [rank {r}] %(name)s: %(message)s"
                                                 if r else "%(asctime)s %(levelname)s %(name)s: %(message)s"))
    pkg = logging.getLogger("deepcluster")
    if r:
        _file_handler.setLevel(logging.DEBUG)
        _saved_level = pkg.level
        pkg.setLevel(logging.DEBUG)
    pkg.addHandler(_file_handler)


def _teardown_file_log() -> None:
    global _file_handler, _saved_level
    if _file_handler is not None:
        logging.getLogger("deepcluster").removeHandler(_file_handler)
        _file_handler.close()
        _file_handler = None
    if _saved_level is not None:
        logging.getLogger("deepcluster").setLevel(_saved_level)
        _saved_level = None


class _StopFlag:
    requested = False
    signum = 0


class _graceful_stop:
    """SIGTERM/SIGINT during an epoch: finish nothing more, keep the last checkpoint.

    The first signal interrupts at once: the last complete checkpoint is the resume
    point and the epoch in progress is redone on resume (a write in progress is
    abandoned by :func:`atomic_write`, leaving the previous file). The
    ``KeyboardInterrupt`` that leaves carries ``(signum, message)``: the CLI prints the
    message (how to resume) and exits with 128 + signum (130 SIGINT, 143 SIGTERM).
    """

    def __init__(self, run: RunDir | None = None) -> None:
        self.run = run

    def __enter__(self) -> _StopFlag:
        self.flag = _StopFlag()
        self.old = {}
        for sig in (signal.SIGTERM, signal.SIGINT):
            try:
                self.old[sig] = signal.signal(sig, self._handler)
            except ValueError:  # not the main thread
                pass
        return self.flag

    def _handler(self, signum, frame) -> None:
        raise KeyboardInterrupt(signum)

    def __exit__(self, exc_type, exc, tb) -> None:
        for sig, h in self.old.items():
            signal.signal(sig, h)
        if exc_type is not KeyboardInterrupt or self.run is None:
            return
        signum = exc.args[0] if exc.args and isinstance(exc.args[0], int) else signal.SIGINT
        name = signal.Signals(signum).name
        kept = ("checkpoint.pt keeps the last complete epoch" if self.run.checkpoint.exists()
                else "no epoch had completed (the run restarts at epoch 0)")
        msg = (f"interrupted by {name}; {kept} — continue with "
               f"`deepcluster train --output-dir {self.run.path} --resume`")
        if _file_handler is not None:  # in train.log; the CLI prints it on the console
            _file_handler.handle(logger.makeRecord(logger.name, logging.WARNING, __file__, 0, msg, None, None))
        raise KeyboardInterrupt(signum, msg) from None
