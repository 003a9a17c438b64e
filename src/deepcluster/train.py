"""The DeepCluster loop: extract -> preprocess -> cluster -> relabel -> reset head ->
train one epoch -> log -> checkpoint.

Every random choice of epoch ``e`` is seeded from ``(seed, e)`` (head init, k-means,
sampler, augmentation, dropout), so a run resumed from the checkpoint of epoch ``e``
continues exactly as the uninterrupted run would (bit-identical in deterministic mode).
"""

from __future__ import annotations

import json
import logging
import os
import random
import signal
import time
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn
from torch.utils.data import DataLoader
from tqdm import tqdm

from . import __version__
from .checkpoint import atomic_write, check_compatible, load_checkpoint, rng_state, save_checkpoint
from .clustering import PCAWhitening, kmeans, run_pic
from .config import Config, save_yaml
from .data import (ClusterBalancedSampler, DataError, ImageSource, IndexedDataset, Subset, build_source,
                   cluster_transform, image_spec, inverse_size_weights, train_transform)
from .metrics import nmi
from .models import DeepClusterNet, create_model

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
    source = build_source(cfg.data.name, cfg.data.root, cfg.data.split, cfg.data.download, cfg.data.max_bad_fraction)
    if cfg.data.subset is not None and cfg.data.subset < len(source):
        idx = np.sort(np.random.default_rng(cfg.run.seed).choice(len(source), cfg.data.subset, replace=False))
        source = Subset(source, idx)
    return source


def model_kwargs(cfg: Config, image_size: int) -> dict[str, Any]:
    kw: dict[str, Any] = {"image_size": image_size, "dropout": cfg.model.dropout}
    if cfg.model.width is not None:
        if cfg.model.arch != "alexnet_small":
            raise ValueError("model.width applies to alexnet_small only")
        kw["width"] = cfg.model.width
    if cfg.model.fc_dim is not None:
        kw["fc_dim"] = cfg.model.fc_dim
    return kw


def build_model(cfg: Config, image_size: int, num_clusters: int) -> DeepClusterNet:
    return create_model(cfg.model.arch, sobel=cfg.model.sobel, num_clusters=num_clusters,
                        **model_kwargs(cfg, image_size))


def make_loader(dataset, batch_size: int, workers: int, sampler=None, seed: int = 0, shuffle: bool = False,
                drop_last: bool = False) -> DataLoader:
    g = torch.Generator()
    g.manual_seed(seed)
    return DataLoader(dataset, batch_size=batch_size, sampler=sampler, shuffle=shuffle, num_workers=workers,
                      generator=g, drop_last=drop_last, persistent_workers=False,
                      pin_memory=False)


# --------------------------------------------------------------------------- phases

@torch.no_grad()
def extract_features(model: DeepClusterNet, loader: DataLoader, num_images: int, device: torch.device,
                     desc: str = "extract") -> np.ndarray:
    """Clustering features of every image, placed by data-set index: ``(N, fc_dim)``.

    The loader must yield ``(images, indices)``; rows are written at ``indices``, so
    the order of batches does not matter. Every index must be seen exactly once.
    """
    was_training = model.training
    model.eval()
    feats = np.zeros((num_images, model.feature_dim), dtype=np.float32)
    seen = np.zeros(num_images, dtype=bool)
    for images, idx in tqdm(loader, desc=desc, leave=False, disable=None):
        out = model.forward_features(images.to(device, non_blocking=True)).float().cpu().numpy()
        idx = idx.numpy()
        feats[idx] = out
        seen[idx] = True
    model.train(was_training)
    if not seen.all():
        raise TrainingError(f"feature extraction missed {int((~seen).sum())} images")
    return feats


def cluster(features: np.ndarray, cfg: Config, seed: int) -> dict[str, Any]:
    """PCA-whiten + L2 the features, then k-means (or PIC). Returns assignments and stats."""
    c = cfg.cluster
    t0 = time.perf_counter()
    if not np.isfinite(features).all():
        bad = int((~np.isfinite(features)).any(1).sum())
        raise TrainingError(f"features of {bad} images are NaN/Inf: the network diverged; resume with a lower --lr")
    n = len(features)
    rng = np.random.default_rng(seed)
    fit_on = features
    if c.pca_sample is not None and c.pca_sample < n:
        fit_on = features[np.sort(rng.choice(n, c.pca_sample, replace=False))]
    pca = PCAWhitening(c.pca_dim, whiten=c.whiten).fit(fit_on)
    x = pca.transform(features)
    t_pca = time.perf_counter() - t0
    t1 = time.perf_counter()
    if c.method == "kmeans":
        res = kmeans(x, c.k, niter=c.niter, seed=seed, backend=c.backend)
        assignments, centroids, loss, n_fixed = res.assignments, res.centroids, res.loss, res.n_empty_fixed
    else:
        res = run_pic(x, n_neighbors=c.pic_neighbors, sigma=c.pic_sigma, n_iter=c.pic_iters,
                      use_gpu=c.backend != "faiss")
        assignments = res.assignments
        k = res.num_clusters
        centroids = np.stack([x[assignments == j].mean(0) for j in range(k)]).astype(np.float32)
        loss = float(((x - centroids[assignments]) ** 2).sum(1).mean())
        n_fixed = 0
    return {"assignments": assignments.astype(np.int64), "centroids": centroids, "pca": pca,
            "loss": loss, "n_empty_fixed": n_fixed, "pca_s": t_pca, "cluster_s": time.perf_counter() - t1}


def train_one_epoch(model: DeepClusterNet, loader: DataLoader, pseudo_labels: torch.Tensor,
                    optimizer: torch.optim.Optimizer, head_optimizer: torch.optim.Optimizer,
                    device: torch.device, epoch: int, class_weights: torch.Tensor | None = None) -> dict[str, float]:
    """One pass of cross-entropy on the pseudo-labels; returns averaged stats.

    Raises:
        NonFiniteLossError: the loss became NaN or Inf (naming epoch and step).
    """
    model.train()
    criterion = nn.CrossEntropyLoss(weight=None if class_weights is None else class_weights.to(device))
    total, count = 0.0, 0
    t0 = time.perf_counter()
    for step, (images, idx) in enumerate(tqdm(loader, desc=f"train {epoch}", leave=False, disable=None)):
        images = images.to(device, non_blocking=True)
        targets = pseudo_labels[idx].to(device, non_blocking=True)
        loss = criterion(model(images), targets)
        if not torch.isfinite(loss):
            raise NonFiniteLossError(
                f"loss became {loss.item()} at epoch {epoch} step {step}; the last good checkpoint is kept; "
                "resume with --resume and a lower --lr"
            )
        optimizer.zero_grad(set_to_none=True)
        head_optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
        head_optimizer.step()
        total += loss.item() * len(idx)
        count += len(idx)
    seconds = time.perf_counter() - t0
    return {"loss": total / max(count, 1), "images": count, "train_s": seconds,
            "images_per_s": count / seconds if seconds > 0 else 0.0}


# --------------------------------------------------------------------------- run directory

class RunDir:
    """The files of a run: ``config.yaml``, ``metrics.jsonl``, ``checkpoint.pt``,
    ``assignments.npy`` (int32, epochs x N), ``nmi.png``, ``train.log``, ``run.lock``."""

    def __init__(self, path: str | Path) -> None:
        self.path = Path(path)
        self.config = self.path / "config.yaml"
        self.metrics = self.path / "metrics.jsonl"
        self.checkpoint = self.path / "checkpoint.pt"
        self.assignments = self.path / "assignments.npy"
        self.plot = self.path / "nmi.png"
        self.log = self.path / "train.log"
        self.lock = self.path / "run.lock"
        self._locked = False

    def acquire(self) -> None:
        """Take the run directory; a live lock held by another process is an error."""
        self.path.mkdir(parents=True, exist_ok=True)
        try:
            fd = os.open(self.lock, os.O_CREAT | os.O_EXCL | os.O_WRONLY)
        except FileExistsError:
            try:
                pid = int(self.lock.read_text().strip() or 0)
            except (OSError, ValueError):
                pid = 0
            if pid and _pid_alive(pid) and pid != os.getpid():
                raise TrainingError(f"{self.path} is in use by process {pid} (run.lock); use another --output-dir") from None
            self.lock.unlink(missing_ok=True)  # stale lock of a dead process
            fd = os.open(self.lock, os.O_CREAT | os.O_EXCL | os.O_WRONLY)
        with os.fdopen(fd, "w") as f:
            f.write(str(os.getpid()))
        self._locked = True

    def release(self) -> None:
        if self._locked:
            self.lock.unlink(missing_ok=True)
            self._locked = False

    def read_metrics(self) -> list[dict[str, Any]]:
        if not self.metrics.exists():
            return []
        return [json.loads(line) for line in self.metrics.read_text().splitlines() if line.strip()]

    def write_metrics(self, records: list[dict[str, Any]]) -> None:
        text = "".join(json.dumps(r) + "\n" for r in records)
        atomic_write(self.metrics, lambda f: f.write(text.encode()))

    def write_assignments(self, history: np.ndarray) -> None:
        atomic_write(self.assignments, lambda f: np.save(f, history.astype(np.int32)))


def _pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


# --------------------------------------------------------------------------- the loop

def _meta(cfg: Config, num_images: int, image_size: int) -> dict[str, Any]:
    return {"arch": cfg.model.arch, "sobel": cfg.model.sobel, "k": cfg.cluster.k, "method": cfg.cluster.method,
            "num_images": num_images, "image_size": image_size, "fc_dim": cfg.model.fc_dim,
            "width": cfg.model.width, "data": cfg.data.name}


def build_optimizer(model: DeepClusterNet, cfg: Config) -> torch.optim.Optimizer:
    """SGD over everything but the head (the head gets its own, rebuilt every epoch)."""
    params = [p for n, p in model.named_parameters() if not n.startswith("head.") and p.requires_grad]
    return torch.optim.SGD(params, lr=cfg.optim.lr, momentum=cfg.optim.momentum, weight_decay=cfg.optim.weight_decay)


def build_head_optimizer(model: DeepClusterNet, cfg: Config) -> torch.optim.Optimizer:
    return torch.optim.SGD(model.head.parameters(), lr=cfg.optim.lr, momentum=cfg.optim.momentum,
                           weight_decay=cfg.optim.weight_decay)


RESUME_KEYS = ("arch", "sobel", "k", "method", "num_images", "image_size", "fc_dim", "width")


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
    """
    run = RunDir(cfg.run.output_dir)
    if run.checkpoint.exists() and not cfg.run.resume:
        raise TrainingError(f"{run.path} already holds a run; pass --resume to continue it or choose another --output-dir")
    if cfg.run.resume and not run.checkpoint.exists():
        raise TrainingError(f"--resume given but {run.checkpoint} does not exist")
    device = resolve_device(cfg.run.device)
    seed_everything(cfg.run.seed)
    set_deterministic(cfg.run.deterministic)

    # Data: a fixed view for clustering, a random one for training; both give (image, index).
    source = build_training_source(cfg)
    n = len(source)
    if cfg.cluster.method == "kmeans" and cfg.cluster.k > n:
        raise DataError(f"--k {cfg.cluster.k} is larger than the number of images ({n}); lower --k")
    spec = image_spec(cfg.data.name, cfg.data.image_size)
    cluster_ds = IndexedDataset(source, cluster_transform(spec))
    train_ds = IndexedDataset(source, train_transform(spec, cfg.optim.crop_scale, cfg.optim.hflip))
    labels = source.labels

    meta = _meta(cfg, n, spec.size)
    state = None
    if cfg.run.resume:  # refuse an incompatible checkpoint before any work
        state = load_checkpoint(run.checkpoint, map_location=device)
        check_compatible(state, {k: meta[k] for k in RESUME_KEYS}, run.checkpoint)

    # Model and optimiser.
    model = build_model(cfg, spec.size, cfg.cluster.k).to(device)
    optimizer = build_optimizer(model, cfg)

    run.acquire()
    try:
        _setup_file_log(run)
        history = np.zeros((0, n), dtype=np.int32)
        start_epoch = 0
        if state is not None:
            start_epoch, history = restore(state, model, optimizer, device)
            del state
            logger.info("resumed %s at epoch %d", run.path, start_epoch)
        records = [r for r in run.read_metrics() if r["epoch"] < start_epoch]
        run.write_metrics(records)
        save_yaml(cfg, run.config)
        logger.info("DeepCluster %s: %s on %d images (%s, k=%d), epochs %d..%d, device %s",
                    __version__, cfg.model.arch, n, cfg.data.name, cfg.cluster.k, start_epoch, cfg.optim.epochs - 1, device)
        last: dict[str, Any] = records[-1] if records else {}
        with _graceful_stop() as stop:
            for epoch in range(start_epoch, cfg.optim.epochs):
                last = run_epoch(cfg, epoch, model, optimizer, cluster_ds, train_ds, labels, history, device)
                history = np.concatenate([history, last.pop("_assignments")[None].astype(np.int32)])
                extra = last.pop("_checkpoint_extra")
                records.append(last)
                _save_epoch(run, cfg, model, optimizer, epoch, history, records, meta, extra)
                logger.info(_summary_line(last))
                if stop.requested:
                    raise KeyboardInterrupt(stop.signum)
        return last
    finally:
        run.release()
        _teardown_file_log()


def run_epoch(cfg: Config, epoch: int, model: DeepClusterNet, optimizer: torch.optim.Optimizer,
              cluster_ds: IndexedDataset, train_ds: IndexedDataset, labels: np.ndarray | None,
              history: np.ndarray, device: torch.device) -> dict[str, Any]:
    """One DeepCluster epoch; returns its metrics record (plus private keys)."""
    seed_everything(epoch_seed(cfg.run.seed, epoch, 0))  # dropout & anything unseeded
    n = len(cluster_ds)
    bs, workers = cfg.optim.batch_size, cfg.run.workers

    # 1. Features of every image, no augmentation.
    t0 = time.perf_counter()
    loader = make_loader(cluster_ds, bs, workers, seed=epoch_seed(cfg.run.seed, epoch, 1))
    features = extract_features(model, loader, n, device, desc=f"extract {epoch}")
    extract_s = time.perf_counter() - t0

    # 2-3. PCA-whitening, L2, clustering.
    res = cluster(features, cfg, epoch_seed(cfg.run.seed, epoch, 2))
    del features
    assignments = res["assignments"]
    num_clusters = int(assignments.max()) + 1 if cfg.cluster.method == "pic" else cfg.cluster.k
    sizes = np.bincount(assignments, minlength=num_clusters)

    # 4-5. Pseudo-labels, a new head, one epoch of training.
    gen = torch.Generator().manual_seed(epoch_seed(cfg.run.seed, epoch, 3))
    model.reset_head(num_clusters, generator=gen)
    head_optimizer = build_head_optimizer(model, cfg)
    balanced = cfg.optim.balance == "sampler"
    sampler = ClusterBalancedSampler(assignments, seed=epoch_seed(cfg.run.seed, epoch, 4), balanced=balanced)
    weights = inverse_size_weights(assignments, num_clusters) if cfg.optim.balance == "weight" else None
    train_loader = make_loader(train_ds, bs, workers, sampler=sampler, seed=epoch_seed(cfg.run.seed, epoch, 5))
    stats = train_one_epoch(model, train_loader, torch.from_numpy(assignments), optimizer, head_optimizer,
                            device, epoch, weights)

    record: dict[str, Any] = {
        "epoch": epoch,
        "convnet_loss": stats["loss"],
        "clustering_loss": res["loss"],
        "nmi_prev": nmi(history[-1], assignments) if len(history) else None,
        "nmi_labels": nmi(labels, assignments) if labels is not None else None,
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
        "_assignments": assignments,
        "_checkpoint_extra": {"pca": res["pca"].state_dict(), "centroids": torch.from_numpy(res["centroids"])},
    }
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


def _setup_file_log(run: RunDir) -> None:
    global _file_handler
    _teardown_file_log()
    _file_handler = logging.FileHandler(run.log)
    _file_handler.setFormatter(logging.Formatter("%(asctime)s %(levelname)s %(name)s: %(message)s"))
    logging.getLogger("deepcluster").addHandler(_file_handler)


def _teardown_file_log() -> None:
    global _file_handler
    if _file_handler is not None:
        logging.getLogger("deepcluster").removeHandler(_file_handler)
        _file_handler.close()
        _file_handler = None


class _StopFlag:
    requested = False
    signum = 0


class _graceful_stop:
    """SIGTERM/SIGINT during an epoch: finish nothing more, keep the last checkpoint.

    The first signal interrupts at once (the last complete checkpoint is the resume
    point; the epoch in progress is redone on resume).
    """

    def __enter__(self) -> _StopFlag:
        self.flag = _StopFlag()
        self.old = {}
        for sig in (signal.SIGTERM,):
            try:
                self.old[sig] = signal.signal(sig, self._handler)
            except ValueError:  # not the main thread
                pass
        return self.flag

    def _handler(self, signum, frame) -> None:
        raise KeyboardInterrupt(signum)

    def __exit__(self, *exc) -> None:
        for sig, h in self.old.items():
            signal.signal(sig, h)
