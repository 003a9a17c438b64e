"""The DeepCluster loop (Caron et al., ECCV 2018, Section 3): every epoch

    extract -> preprocess -> cluster -> relabel -> new head -> train one epoch -> record

:func:`run_epoch` is that sentence, one call per phase; the variants plug in at the
named seams of :mod:`deepcluster.strategies` (head, balancing, batch-norm statistics).
:func:`train` opens the run folder (:mod:`deepcluster.rundir`), builds data, model and
optimiser, resumes, and runs the epochs; monitoring (the k-NN probe, TensorBoard, the NMI
plot) comes in as callbacks that the CLI wires (:mod:`deepcluster.monitor`).

Every random choice of epoch ``e`` is seeded from ``(seed, e)`` (head init, k-means,
sampler, augmentation, dropout), so a run resumed from the checkpoint of epoch ``e``
continues exactly as the uninterrupted run would (bit-identical in deterministic mode).
"""

from __future__ import annotations

import dataclasses
import logging
import time
from collections.abc import Sequence
from typing import Any, Protocol

import numpy as np
import torch
from torch.nn.parallel import DistributedDataParallel

from . import __version__
from .checkpoint import rng_state, save_checkpoint
from .clustering import cluster_shards
from .config import Config
from .diagnostics import collapse_warning, quality_warning, recent_nmi_prev
from .distributed import barrier, cleanup, init_distributed, is_distributed, is_main_process, rank, world_size
from .features import extract_reduced, make_loader
from .metrics import nmi
from .optim import NonFiniteLossError, TrainingError, build_head_optimizer, epoch_lr, train_one_epoch
from .rundir import RunDirError, RunLog
from .runtime import epoch_seed, graceful_stop, per_rank_batch_size, resolve_amp, resolve_device, seed_everything
from .session import RECENT_EPOCHS, RESUME_KEYS, Session, build_model, open_session, record_skipped, restore
from .strategies import (BN_RECOMPUTE_IMAGES, EpochClusters, balanced_sampler, choose_head, class_weights,
                         recompute_bn_stats)

logger = logging.getLogger(__name__)


class Callback(Protocol):
    """Monitoring wired by the caller (:mod:`deepcluster.monitor`). ``on_start`` runs once
    the run folder is ours; ``on_epoch`` may add keys to the epoch's record before it is
    saved (the k-NN probe); ``after_epoch`` runs once it is saved."""

    def on_start(self, run: "Session") -> None: ...

    def on_epoch(self, run: "Session", record: dict[str, Any]) -> None: ...

    def after_epoch(self, run: "Session", records: list[dict[str, Any]]) -> None: ...

    def close(self) -> None: ...


# --------------------------------------------------------------------------- phases

def cluster_phase(red: dict[str, Any], num_images: int, cfg: Config, epoch: int,
                  device: torch.device) -> tuple[EpochClusters, dict[str, Any]]:
    """3. k-means (or PIC) on the reduced features; ``cluster.clusterings`` runs, each
    from its own seed (DeepCluster-v2), the first being the run's clustering."""
    x = red.pop("x")
    runs = [cluster_shards(x, red["indices"], num_images, cfg.cluster,
                           epoch_seed(cfg.run.seed, epoch, 2 if j == 0 else 10 + j), device)
            for j in range(cfg.cluster.clusterings)]
    first = runs[0]
    k = int(first["assignments"].max()) + 1 if cfg.cluster.method == "pic" else cfg.cluster.k
    clusters = EpochClusters(first["assignments"], k, first["centroids"], red["pca"],
                             [r["assignments"] for r in runs[1:]])
    stats = {"clustering_loss": first["loss"], "empty_reseeded": int(first["n_empty_fixed"]),
             "kmeans_s": sum(r["cluster_s"] for r in runs)}
    return clusters, stats


# --------------------------------------------------------------------------- the epoch

def run_epoch(s: Session, epoch: int) -> dict[str, Any]:
    """One DeepCluster epoch; returns its metrics record (plus private keys).

    Under ``torch.distributed`` every rank extracts and clusters its shard of the data
    set, all ranks get the same assignments, and each trains on its share of the same
    epoch plan with the model wrapped in ``DistributedDataParallel``.
    """
    cfg, model, seed = s.cfg, s.model, s.cfg.run.seed
    # Dropout & anything unseeded; rank r > 0 gets its own stream (rank 0's is the
    # single-process one), so augmentations are not repeated across ranks.
    seed_everything(epoch_seed(seed, epoch, 0) + rank())
    t0 = time.perf_counter()
    # 1-2. Features of every image (this rank's shard), no augmentation; PCA-whitening
    # fitted on a sample and applied batch by batch, L2.
    if cfg.cluster.bn == "recompute":
        recompute_bn_stats(model, s.cluster_ds, BN_RECOMPUTE_IMAGES, epoch_seed(seed, epoch, 6), cfg.optim.batch_size,
                           cfg.run.workers, s.device, cfg.run.amp, cfg.run.channels_last)
    red = extract_reduced(model, s.cluster_ds, cfg.cluster, cfg.optim.batch_size, cfg.run.workers, s.device,
                          epoch_seed(seed, epoch, 2), cfg.run.amp, cfg.run.channels_last, desc=f"extract {epoch}")
    # The network these features came from: with the PCA and centroids it maps an image
    # to this epoch's clusters (deepcluster assign); training below moves the weights.
    cluster_model = {k: v.detach().cpu().clone() for k, v in model.state_dict().items() if not k.startswith("head.")}
    # 3. Clustering; 4. every image relabelled with its cluster.
    clusters, cstats = cluster_phase(red, len(s.cluster_ds), cfg, epoch, s.device)
    # 5. A new head for the new labels (the seam: random, matched or centroids).
    previous = s.recent[-1] if len(s.recent) else None
    heads = choose_head(cfg).build(model, clusters, previous, torch.Generator().manual_seed(epoch_seed(seed, epoch, 3)),
                                   cfg.optim.temperature, s.device)
    lr = epoch_lr(cfg, epoch)
    for group in s.optimizer.param_groups:  # a function of the epoch: a resumed run gets the same
        group["lr"] = lr
    # 6. One epoch on the pseudo-labels, sampled uniformly over clusters (the balance seam).
    sampler = balanced_sampler(cfg.optim.balance, clusters.assignments, epoch_seed(seed, epoch, 4), rank(),
                               world_size())
    loader = make_loader(s.train_ds, per_rank_batch_size(cfg.optim.batch_size, world_size()),
                         cfg.run.workers, sampler=sampler, seed=epoch_seed(seed, epoch, 5) + rank())
    net = heads.net
    if is_distributed():  # re-wrapped every epoch: the head is a new layer
        net = DistributedDataParallel(net, device_ids=[s.device.index] if s.device.type == "cuda" else None)
    stats = train_one_epoch(net, loader, torch.from_numpy(clusters.targets), s.optimizer,
                            build_head_optimizer(heads.params, cfg, lr), s.device, epoch,
                            class_weights(cfg.optim.balance, clusters.targets, clusters.num_clusters),
                            amp=cfg.run.amp, channels_last=cfg.run.channels_last, scaler=s.scaler)
    # 7. The record (the caller saves it and the checkpoint).
    record = epoch_record(s, epoch, clusters, {**cstats, **stats, "lr": lr, "carried": heads.carried,
                                               "extract_s": red["extract_s"], "pca_s": red["pca_s"],
                                               "rankme": red["rankme"],
                                               "epoch_s": time.perf_counter() - t0})
    record["_checkpoint_extra"] = {"pca": clusters.pca.state_dict(), "centroids": torch.from_numpy(clusters.centroids),
                                   "cluster_model": cluster_model}
    return record


def epoch_record(s: Session, epoch: int, clusters: EpochClusters, st: dict[str, Any]) -> dict[str, Any]:
    """The epoch's line of ``metrics.jsonl`` (with its collapse check)."""
    a, prev = clusters.assignments, (s.recent[-1] if len(s.recent) else None)
    sizes = np.bincount(a, minlength=clusters.num_clusters)
    record: dict[str, Any] = {
        "epoch": epoch,
        "convnet_loss": st["loss"],
        "clustering_loss": st["clustering_loss"],
        "nmi_prev": nmi(prev, a) if prev is not None else None,
        "nmi_labels": nmi(s.labels, a) if s.labels is not None else None,
        # agreement of the epoch's k-means runs with the first (several clusterings only)
        "nmi_clusterings": float(np.mean([nmi(a, o) for o in clusters.others])) if clusters.others else None,
        "rankme": st["rankme"],  # label-free: effective rank of the clustering features (docs/QUALITY_SIGNAL.md)
        "head_rows_carried": st["carried"],  # optim.head matched only
        "num_clusters": clusters.num_clusters,
        "cluster_size_min": int(sizes.min()),
        "cluster_size_median": float(np.median(sizes)),
        "cluster_size_max": int(sizes.max()),
        "empty_clusters": int((sizes == 0).sum()),
        "empty_reseeded": st["empty_reseeded"],
        "extract_s": st["extract_s"],
        "pca_s": st["pca_s"],
        "kmeans_s": st["kmeans_s"],
        "train_s": st["train_s"],
        "epoch_s": st["epoch_s"],
        "images_per_s": st["images_per_s"],
        "lr": st["lr"],
        "amp": s.cfg.run.amp,  # as resolved for this machine (config.yaml may say auto)
        "_assignments": a,
    }
    record["collapse_warning"] = collapse_warning(sizes, recent_nmi_prev(s.recent, a, record["nmi_prev"]), s.cfg)
    first = next((r.get("rankme") for r in s.records if r.get("rankme") is not None), None)
    record["quality_warning"] = quality_warning(st["rankme"], first, epoch)
    for key in ("collapse_warning", "quality_warning"):
        if record[key]:
            logger.warning("epoch %d: %s", epoch, record[key])
    return record


# --------------------------------------------------------------------------- the run

def train(cfg: Config, callbacks: Sequence[Callback] | None = None) -> dict[str, Any]:
    """Run DeepCluster as configured; returns the last epoch's metrics.

    Writes the run directory (:mod:`deepcluster.rundir`). With ``cfg.run.resume`` it
    continues from ``checkpoint.pt`` there; without it, an existing checkpoint is an error.
    ``callbacks`` monitor the run (:func:`deepcluster.monitor.default_callbacks` gives
    the CLI's: the NMI plot, the k-NN probe of ``run.eval_every``, TensorBoard).

    Under ``torchrun`` (or in a process group set up by the caller) every rank runs this;
    only rank 0 writes the run directory (the others log to ``train.rank<N>.log``). The
    run directory must be on a file system all ranks see (they read the checkpoint to
    resume). The checkpoint does not depend on the world size: a run can resume on a
    different number of processes.
    """
    choose_head(cfg)  # an unsupported combination of variants is refused before any work
    if callbacks is None and (cfg.run.eval_every or cfg.run.tensorboard):
        logger.warning("run.eval_every / run.tensorboard need their monitors: pass "
                       "callbacks=deepcluster.monitor.default_callbacks(cfg) (the CLI does)")
    try:
        resolve_device(cfg.run.device)
    except ValueError as e:
        raise TrainingError(str(e)) from None
    device, own_group = init_distributed(cfg.run.device, cfg.run.dist_timeout)
    try:
        return _train(cfg, device, list(callbacks or ()))
    finally:
        if own_group:
            cleanup()


def _train(saved_cfg: Config, device: torch.device, callbacks: list[Callback]) -> dict[str, Any]:
    cfg = saved_cfg  # config.yaml keeps "auto", so a resumed run decides again on its machine
    amp = resolve_amp(cfg.run.amp, device)
    if amp != cfg.run.amp:
        cfg = dataclasses.replace(cfg, run=dataclasses.replace(cfg.run, amp=amp))
    s, state, source = open_session(cfg, device)
    # config.yaml records the values the size rule chose, and keeps amp as given ("auto").
    saved_cfg = dataclasses.replace(s.cfg, run=dataclasses.replace(s.cfg.run, amp=saved_cfg.run.amp))
    if is_main_process():  # only rank 0 writes the run directory
        try:
            s.run.acquire()
        except RunDirError as e:
            raise TrainingError(str(e)) from None
    else:
        s.run.path.mkdir(parents=True, exist_ok=True)
    try:
        if is_main_process() and s.manifest is not None and not s.run.manifest.is_file():
            s.manifest.save(s.run.manifest)
        with RunLog(s.run, rank()) as log:
            if is_main_process():
                s.run.remove_stale_temps()
                record_skipped(s.run, source)
            if state is not None:
                restore(s, state)
            del state
            s.records = [r for r in s.records if r["epoch"] < s.start_epoch]
            if is_main_process():
                s.run.write_metrics(s.records)
                s.run.write_config(saved_cfg)
            _log_start(s, saved_cfg)
            for cb in callbacks:
                cb.on_start(s)
            return _loop(s, callbacks, log)
    finally:
        for cb in callbacks:
            cb.close()
        s.run.release()


def _log_start(s: Session, saved_cfg: Config) -> None:
    cfg = s.cfg
    if world_size() > 1:
        logger.info("torch.distributed: %d processes (%s); global batch %d", world_size(),
                    "nccl" if s.device.type == "cuda" else "gloo", cfg.optim.batch_size)
    clustering = (f"k-means k={cfg.cluster.k}" if cfg.cluster.method == "kmeans" else
                  f"PIC sigma={cfg.cluster.pic_sigma:g}, {cfg.cluster.pic_neighbors} neighbours")
    logger.info("DeepCluster %s: %s at %d px on %d images (%s, %s), epochs %d..%d, device %s%s", __version__,
                cfg.model.arch, s.meta["image_size"], len(s.cluster_ds), cfg.data.name, clustering, s.start_epoch,
                cfg.optim.epochs - 1, s.device, s.cluster_ds.source.label_note)
    if saved_cfg.run.amp == "auto":
        logger.info("--amp auto: %s on this %s", "bf16" if cfg.run.amp == "bf16" else "float32 (no native bfloat16)",
                    s.device.type.upper())


def _loop(s: Session, callbacks: list[Callback], log: RunLog) -> dict[str, Any]:
    def interrupted(name: str) -> str:
        kept = ("checkpoint.pt keeps the last complete epoch" if s.run.checkpoint.exists()
                else "no epoch had completed (the run restarts at epoch 0)")
        msg = f"interrupted by {name}; {kept} — continue with `deepcluster train --output-dir {s.run.path} --resume`"
        log.write(logging.WARNING, msg)  # in train.log; the CLI prints it on the console
        return msg

    last: dict[str, Any] = s.records[-1] if s.records else {}
    with graceful_stop(interrupted):
        for epoch in range(s.start_epoch, s.cfg.optim.epochs):
            last = run_epoch(s, epoch)
            s.recent = np.concatenate([s.recent, last.pop("_assignments")[None].astype(np.int32)])[-RECENT_EPOCHS:]
            extra = last.pop("_checkpoint_extra")
            extra["world_size"] = world_size()
            if s.scaler is not None:
                extra["scaler"] = s.scaler.state_dict()
            for cb in callbacks:
                cb.on_epoch(s, last)
            s.records.append(last)
            if is_main_process():
                _save_epoch(s, epoch, extra)
            for cb in callbacks:
                cb.after_epoch(s, s.records)
            logger.info(_summary_line(last))
            if s.cfg.run.stop_when_worse and last.get("quality_warning"):
                logger.warning("--stop-when-worse: stopping after epoch %d (checkpoint.pt keeps it; best.pt, if any, "
                               "an earlier epoch)", epoch)
                break
    barrier()  # every rank returns once rank 0's last checkpoint is written
    return last


def _save_epoch(s: Session, epoch: int, extra: dict[str, Any]) -> None:
    """Assignments, metrics, then the checkpoint (the commit point of the epoch); then the
    snapshots: ``checkpoint-epochE.pt`` every ``run.keep_every`` epochs, ``best.pt`` when
    the record's ``run.best_metric`` is the best so far (both without the optimiser)."""
    s.run.append_assignments(s.recent[-1], epoch)  # one row: the whole history is in the file
    s.run.write_metrics(s.records)
    state = {"model": {k: v.detach().cpu() for k, v in s.model.state_dict().items()}, "epoch": epoch + 1,
             "assignments": torch.from_numpy(s.recent[-1:].copy()),  # the last epoch's: (1, N)
             "meta": s.meta, "config": s.cfg.to_dict(), **extra}
    save_checkpoint({**state, "optimizer": s.optimizer.state_dict(), "rng": rng_state()}, s.run.checkpoint)
    run = s.cfg.run
    if run.keep_every and (epoch + 1) % run.keep_every == 0:
        save_checkpoint(state, s.run.snapshot(epoch + 1))
        s.run.prune_snapshots(run.keep_last)
    score = s.records[-1].get(run.best_metric)
    earlier = [r[run.best_metric] for r in s.records[:-1] if r.get(run.best_metric) is not None]
    if score is not None and (not earlier or score > max(earlier) or not s.run.best.is_file()):
        save_checkpoint({**state, "best": {"metric": run.best_metric, "value": score}}, s.run.best)
        logger.info("best.pt: epoch %d (%s %.4f)", epoch, run.best_metric, score)


def _summary_line(r: dict[str, Any]) -> str:
    f = lambda v: "-" if v is None else f"{v:.3f}"  # noqa: E731
    return (f"epoch {r['epoch']}: convnet loss {r['convnet_loss']:.3f}, clustering loss {r['clustering_loss']:.3f}, "
            f"NMI vs labels {f(r['nmi_labels'])}, NMI vs prev {f(r['nmi_prev'])}, clusters {r['num_clusters']} "
            f"(sizes {r['cluster_size_min']}/{r['cluster_size_median']:.0f}/{r['cluster_size_max']}), "
            f"{r['epoch_s']:.0f}s (extract {r['extract_s']:.0f}, pca {r['pca_s']:.1f}, cluster {r['kmeans_s']:.1f}, "
            f"train {r['train_s']:.0f}; {r['images_per_s']:.0f} img/s)")


__all__ = ["Callback", "NonFiniteLossError", "RESUME_KEYS", "Session", "TrainingError", "build_model", "cluster_phase",
           "epoch_record", "run_epoch", "train"]
