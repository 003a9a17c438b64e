"""The one feature-extraction path: index-addressed, amp and channels_last aware,
sharded under ``torch.distributed``.

Every pass of a frozen network over images goes through :func:`iter_features`: the
training loop's extraction (:func:`extract_reduced`), the probes' feature store, the
k-NN probe, the report, ``export`` and ``assign``. A loader yields
``(images, indices, *extra)``; features are placed by data-set index, never by batch
position (the order of batches, and how they are split over ranks, does not matter).
"""

from __future__ import annotations

import contextlib
import time
from collections.abc import Callable, Iterator
from typing import Any

import numpy as np
import torch
from torch import nn
from torch.utils.data import DataLoader

from .clustering import PCAWhitening, StreamingPCA, resolve_pca_sample, sample_indices
from .distributed import all_reduce_sum, broadcast_object, gather_by_index, is_distributed, shard_indices
from .labelfree import rankme
from .runtime import autocast, progress, to_device

RANKME_ROWS = 2048
"""Images of the PCA sample whose clustering features give the epoch's RankMe (an SVD of
2048 x fc_dim: about a second for 4096-d fc7 on one core)."""

Forward = Callable[[torch.Tensor], "torch.Tensor | dict[str, torch.Tensor]"]


class ExtractionError(RuntimeError):
    """Extraction cannot give usable features; the message says why and what to do."""


def make_loader(dataset, batch_size: int, workers: int, sampler=None, seed: int = 0, shuffle: bool = False,
                drop_last: bool = False) -> DataLoader:
    """A ``DataLoader`` whose shuffling/sampling is seeded by ``seed``."""
    g = torch.Generator()
    g.manual_seed(seed)
    return DataLoader(dataset, batch_size=batch_size, sampler=sampler, shuffle=shuffle, num_workers=workers,
                      generator=g, drop_last=drop_last, persistent_workers=False, pin_memory=False)


@contextlib.contextmanager
def eval_mode(model: nn.Module) -> Iterator[nn.Module]:
    """``model`` in eval mode inside the block, its previous mode restored after."""
    was_training = model.training
    model.eval()
    try:
        yield model
    finally:
        model.train(was_training)


def _numpy(out: torch.Tensor | dict[str, torch.Tensor]) -> np.ndarray | dict[str, np.ndarray]:
    if isinstance(out, dict):
        return {k: v.float().cpu().numpy() for k, v in out.items()}
    return out.float().cpu().numpy()


@torch.no_grad()
def iter_features(forward: Forward, loader, device: torch.device | str = "cpu", amp: str = "none",
                  channels_last: bool = False, desc: str = "extract",
                  ) -> Iterator[tuple[np.ndarray, Any, tuple]]:
    """``(indices (B,) int64, features, extra)`` for every batch of ``loader``.

    Args:
        forward: batch ``(B, 3, H, W)`` on ``device`` -> ``(B, D)`` tensor, or a dict of
            them (several features in one pass); features come back as float32 numpy.
            The caller sets the network's mode (:func:`eval_mode`).
        loader: yields ``(images, indices, *extra)``; ``extra`` is passed through.
    """
    device = torch.device(device)
    for batch in progress(loader, desc):
        images, idx = batch[0], batch[1]
        with autocast(device, amp):
            out = forward(to_device(images, device, channels_last))
        yield np.asarray(idx, dtype=np.int64), _numpy(out), tuple(batch[2:])


def extract(forward: Forward, loader, num_rows: int, dim: int, device: torch.device | str = "cpu",
            amp: str = "none", channels_last: bool = False, desc: str = "extract",
            rows: np.ndarray | None = None) -> np.ndarray:
    """Features ``(num_rows, dim)`` float32, row ``rows[index]`` (default ``index``) for
    each image the loader yields; every row must be filled exactly once.

    Under ``torch.distributed`` the loader covers this rank's shard; the rows of all
    ranks are gathered by index and every rank gets the whole array.

    Raises:
        ExtractionError: rows were missed, or features are NaN/Inf.
    """
    pairs = [((idx if rows is None else rows[idx]), out)
             for idx, out, _ in iter_features(forward, loader, device, amp, channels_last, desc)]
    idx = np.concatenate([p[0] for p in pairs]) if pairs else np.zeros(0, np.int64)
    vals = np.concatenate([p[1] for p in pairs]) if pairs else np.zeros((0, dim), np.float32)
    if not np.isfinite(vals).all():
        raise ExtractionError(f"{desc}: features are NaN/Inf; the network has diverged")
    if is_distributed():
        try:
            return gather_by_index(idx, vals, num_rows).numpy()
        except ValueError as e:
            raise ExtractionError(f"{desc}: {e}") from None
    feats = np.zeros((num_rows, dim), dtype=np.float32)
    seen = np.zeros(num_rows, dtype=bool)
    feats[idx], seen[idx] = vals, True
    if not seen.all():
        raise ExtractionError(f"{desc}: missed {int((~seen).sum())} images")
    return feats


def _check_finite(bad_rows: int, where: str) -> None:
    bad = int(all_reduce_sum(torch.tensor(float(bad_rows), dtype=torch.float64)).item())
    if bad:
        raise ExtractionError(f"features of {bad} images{where} are NaN/Inf: the network diverged; "
                              "resume with a lower --lr")


def extract_reduced(model: nn.Module, dataset, cluster: Any, batch_size: int, workers: int,
                    device: torch.device, seed: int, amp: str = "none", channels_last: bool = False,
                    desc: str = "extract") -> dict[str, Any]:
    """This rank's PCA-whitened, L2-normalised clustering features, in bounded memory.

    One pass over this rank's shard of the data set (:func:`shard_indices`): the images
    of the PCA sample first (``cluster.pca_sample``, drawn with ``seed``, the same on
    every rank), whose full-width features are buffered and fitted on (all ranks
    together), then every other image, projected batch by batch. Only
    ``n_rank x pca_dim`` values (``cluster.feature_dtype``) are kept.

    Args:
        cluster: the run's ``cluster`` config section (pca_dim, whiten, whiten_eps,
            pca_sample, feature_dtype).

    Returns:
        ``indices`` (``(n_rank,)`` data-set indices, sorted), ``x`` (``(n_rank, pca_dim)``),
        ``pca`` (the fitted :class:`PCAWhitening`), ``pca_sample`` (its size), ``rankme``
        (the label-free effective rank of the clustering features: :data:`RANKME_ROWS`
        un-augmented images of the sample, :func:`~deepcluster.labelfree.rankme`),
        ``extract_s`` and ``pca_s`` (fit and projection of the sample).
    """
    n = len(dataset)
    shard = shard_indices(n)
    picked = sample_indices(n, resolve_pca_sample(n, model.feature_dim, cluster.pca_sample), seed)
    n_sample = len(picked)
    first = np.isin(shard, picked, assume_unique=True)
    stream = StreamingPCA(PCAWhitening(cluster.pca_dim, whiten=cluster.whiten, eps=cluster.whiten_eps), len(shard),
                          sample_rows=int(first.sum()), dtype=np.dtype(cluster.feature_dtype))
    t0 = time.perf_counter()
    pca_s, bad = 0.0, 0
    with eval_mode(model):
        for part, add in ((first, stream.add_sample), (~first, stream.add)):
            loader = make_loader(dataset, batch_size, workers, sampler=shard[part].tolist(), seed=seed)
            for idx, out, _ in iter_features(model.forward_features, loader, device, amp, channels_last, desc):
                bad += int((~np.isfinite(out)).any(1).sum())
                add(np.searchsorted(shard, idx), out)
            if add == stream.add_sample:
                _check_finite(bad, " in the PCA sample")
                sample = stream.sample(RANKME_ROWS)  # rank 0's rows decide, every rank gets its value
                quality = broadcast_object(rankme(sample) if len(sample) > 1 else None)
                t1 = time.perf_counter()
                pca = stream.fit()
                pca_s = time.perf_counter() - t1
    _check_finite(bad, "")
    return {"indices": shard, "x": stream.result(), "pca": pca, "pca_sample": n_sample, "rankme": quality,
            "extract_s": time.perf_counter() - t0 - pca_s, "pca_s": pca_s}
