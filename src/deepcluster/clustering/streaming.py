"""PCA-whitening in bounded memory: fit on a random sample, project batch by batch.

The original code holds every image's fc7 feature (N x 4096 float32, 21 GB for
ImageNet) before its PCA. Here the full-width features of only a random *sample* are
held: the sample is extracted first, the PCA-whitening is fitted on it, the sample is
projected and dropped, and every further batch is projected as it arrives. The data set
then lives in memory only as ``N x pca_dim`` (float32, or float16 on request).

The sample is a random subset of the data set, so the fit is the same estimator the
paper uses on all images, with the variance of a random sample: with the default
``max(20 x D, 50,000)`` rows (81,920 for 4096-d features) each covariance entry is
estimated from many more rows than there are dimensions. When all features fit in
``max_bytes`` (1 GB by default: 60,000 x 4096 floats), the sample is the whole data set
and the result is exactly the in-memory fit.

Cost: one pass over the data (the sample is extracted first, then the rest: the order
of extraction does not matter because features are placed by index). Peak memory is
``sample x D x 4`` bytes for the buffered sample plus the ``N x pca_dim`` result plus
a ``D x D`` float64 covariance (``docs/SCALE.md`` has measured figures).

Distributed: each rank buffers its part of the sample; mean and covariance are
all-reduced in float64 (centred with the global mean), so no full-width feature crosses
the network, and rank 0's fitted projection is broadcast.
"""

from __future__ import annotations

import logging

import numpy as np
import torch

from ..distributed import all_gather_counts, all_reduce_sum, broadcast_, is_distributed
from .preprocess import PCAWhitening

logger = logging.getLogger(__name__)

DEFAULT_MAX_BYTES = 1 << 30
"""Below this size (N x D x 4 bytes) the PCA is fitted on every image."""


def default_pca_sample(num_images: int, dim: int, max_bytes: int = DEFAULT_MAX_BYTES, per_dim: int = 20,
                       minimum: int = 50_000) -> int:
    """Rows to fit the PCA on: all when ``num_images x dim`` float32 fit in ``max_bytes``,
    else ``max(per_dim x dim, minimum)`` (never more than ``num_images``)."""
    if num_images * dim * 4 <= max_bytes:
        return num_images
    return min(num_images, max(per_dim * dim, minimum))


def resolve_pca_sample(num_images: int, dim: int, pca_sample: int | None) -> int:
    """The configured sample size (``None``: :func:`default_pca_sample`), clamped to N.

    Raises:
        ValueError: a sample of fewer than 2 images.
    """
    if pca_sample is None:
        return default_pca_sample(num_images, dim)
    if pca_sample < 2:
        raise ValueError(f"--pca-sample must be >= 2 images (a covariance needs two), got {pca_sample}")
    return min(pca_sample, num_images)


def sample_indices(num_images: int, sample: int, seed: int) -> np.ndarray:
    """Sorted ``(sample,)`` int64 data-set indices drawn without replacement (all if
    ``sample >= num_images``); the same on every rank for the same seed."""
    if sample >= num_images:
        return np.arange(num_images, dtype=np.int64)
    return np.sort(np.random.default_rng(seed).choice(num_images, sample, replace=False)).astype(np.int64)


def fit_pca_sharded(x_local: np.ndarray, pca: PCAWhitening) -> PCAWhitening:
    """Fit ``pca`` on the union over ranks of the rows ``x_local`` (``(n_r, D)``).

    In one process this is ``pca.fit(x_local)``. Distributed: the global mean, then the
    covariance of the rows centred by it, are all-reduced in float64; the rank-0 fit is
    broadcast so that every rank projects identically.

    Raises:
        ValueError: fewer than 2 rows in all, or NaN/Inf rows (the network diverged).
    """
    if not is_distributed():
        return pca.fit(x_local)
    x_local = np.asarray(x_local, dtype=np.float32)
    # A rank without sample rows does not know D: take it from the others.
    dim_in = max(all_gather_counts(x_local.shape[1] if len(x_local) else 0))
    x_local = x_local.reshape(len(x_local), dim_in)
    stats = torch.tensor([float(len(x_local)), float((~np.isfinite(x_local)).any(1).sum())], dtype=torch.float64)
    n, bad = (int(v) for v in all_reduce_sum(stats).tolist())
    if bad:
        raise ValueError(f"features contain NaN or Inf in {bad} rows; the network has diverged")
    if n < 2:
        raise ValueError(f"PCA needs a sample of at least 2 rows over all ranks, got {n}")
    total = torch.from_numpy(x_local.sum(0, dtype=np.float64))
    mean = (all_reduce_sum(total) / n).numpy()
    cov = np.zeros((dim_in, dim_in), dtype=np.float64)
    for start in range(0, len(x_local), 8192):
        xc = x_local[start:start + 8192].astype(np.float64) - mean
        cov += xc.T @ xc
    cov = all_reduce_sum(torch.from_numpy(cov)).numpy() / (n - 1)
    pca.fit_moments(mean, cov, n)
    for name in ("mean", "projection", "eigenvalues"):
        t = torch.from_numpy(np.ascontiguousarray(getattr(pca, name)))
        setattr(pca, name, broadcast_(t).numpy())
    return pca


class StreamingPCA:
    """Buffer a sample of full-width rows, fit the PCA on it, then project batch by batch.

    Usage (every rank, the sample's batches first)::

        sp = StreamingPCA(PCAWhitening(256), num_rows=len(my_indices))
        for rows, feats in sample_batches: sp.add_sample(rows, feats)
        sp.fit()                      # collective when distributed
        for rows, feats in other_batches: sp.add(rows, feats)
        x = sp.result()               # (num_rows, 256)

    Args:
        pca: an unfitted :class:`PCAWhitening` (its dim, whitening, normalisation).
        num_rows: rows of the result (this rank's images); ``rows`` passed to
            :meth:`add_sample`/:meth:`add` are positions in it.
        sample_rows: how many rows :meth:`add_sample` will receive at most (the buffer
            is allocated once at that size; ``None``: grown as needed).
        dtype: of the result, ``float32`` or ``float16``.
    """

    def __init__(self, pca: PCAWhitening, num_rows: int, sample_rows: int | None = None,
                 dtype: np.dtype | str = np.float32) -> None:
        if np.dtype(dtype) not in (np.dtype(np.float32), np.dtype(np.float16)):
            raise ValueError(f"feature dtype must be float32 or float16, got {np.dtype(dtype)}")
        self.pca = pca
        self.num_rows = num_rows
        self.sample_rows = sample_rows
        self.dtype = np.dtype(dtype)
        self._buf: np.ndarray | None = None  # (sample_rows, D)
        self._buf_rows: list[np.ndarray] = []
        self._filled = 0
        self._out: np.ndarray | None = None  # (num_rows, dim)
        self._written = np.zeros(num_rows, dtype=bool)

    def add_sample(self, rows: np.ndarray, feats: np.ndarray) -> None:
        """Buffer ``feats`` (``(B, D)``) destined for result rows ``rows`` (``(B,)``)."""
        if self.pca.fitted:
            raise RuntimeError("add_sample after fit(); use add()")
        rows = np.asarray(rows, dtype=np.int64)
        feats = np.asarray(feats, dtype=np.float32)
        if self._buf is None:
            cap = self.sample_rows if self.sample_rows is not None else max(len(feats), 1024)
            self._buf = np.empty((cap, feats.shape[1]), dtype=np.float32)
        if self._filled + len(feats) > len(self._buf):
            if self.sample_rows is not None:
                raise ValueError(f"more than sample_rows={self.sample_rows} sample rows were added")
            grown = np.empty((max(2 * len(self._buf), self._filled + len(feats)), self._buf.shape[1]), np.float32)
            grown[: self._filled] = self._buf[: self._filled]
            self._buf = grown
        self._buf[self._filled:self._filled + len(feats)] = feats
        self._buf_rows.append(rows)
        self._filled += len(feats)

    def sample(self, limit: int | None = None) -> np.ndarray:
        """The buffered full-width sample rows, ``(min(filled, limit), D)`` (before :meth:`fit`)."""
        if self._buf is None:
            return np.zeros((0, 0), np.float32)
        return self._buf[: self._filled if limit is None else min(self._filled, limit)]

    def fit(self) -> PCAWhitening:
        """Fit on the buffered sample (all ranks' when distributed), project it, free it."""
        sample = self._buf[: self._filled] if self._buf is not None else np.zeros((0, 0), np.float32)
        fit_pca_sharded(sample, self.pca)
        rows = np.concatenate(self._buf_rows) if self._buf_rows else np.zeros(0, np.int64)
        for start in range(0, self._filled, 8192):  # chunked: no second full-width copy of the sample
            self._write(rows[start:start + 8192], self.pca.transform(sample[start:start + 8192]))
        self._buf, self._buf_rows, self._filled = None, [], 0
        return self.pca

    def add(self, rows: np.ndarray, feats: np.ndarray) -> None:
        """Project ``feats`` (``(B, D)``) and store them at result rows ``rows``."""
        if not self.pca.fitted:
            raise RuntimeError("StreamingPCA.add before fit(); buffer the sample with add_sample first")
        self._write(np.asarray(rows, dtype=np.int64), self.pca.transform(feats))

    def _write(self, rows: np.ndarray, y: np.ndarray) -> None:
        if self._out is None:
            self._out = np.zeros((self.num_rows, y.shape[1]), dtype=self.dtype)
        self._out[rows] = y
        self._written[rows] = True

    def result(self) -> np.ndarray:
        """``(num_rows, dim)`` projected features.

        Raises:
            ValueError: some rows were never added.
        """
        missing = int((~self._written).sum())
        if missing:
            raise ValueError(f"{missing} of {self.num_rows} rows were never added to the PCA stream")
        if self._out is None:  # no rows at all on this rank
            return np.zeros((0, self.pca.projection.shape[1]), dtype=self.dtype)
        return self._out
