"""PCA-whitening and L2 normalisation of the features before clustering.

Paper, Section 3.3 / original code: features are PCA-reduced to 256 dimensions,
whitened (eigenvalues raised to the power -0.5) and L2-normalised before k-means.
The transform is *fitted* on a sample and *applied* batch by batch, so the full-width
features never need to be held for the whole data set (see ``fit``/``transform``).

Only the top ``dim`` eigenpairs of the ``D x D`` covariance are needed, so the fit never
runs a full dense eigendecomposition when ``dim < D`` (``docs/SCALE.md``, "PCA fit on
wide features"): :func:`top_eigh` asks LAPACK for the top ``dim`` pairs only, and
``fit`` on fewer rows than dimensions (``n < D``) eigendecomposes the ``n x n`` Gram
matrix instead and maps its eigenvectors back (:func:`gram_top_eigh`).
Both are exact methods (no sampling), equal to the full eigendecomposition up to
rounding and the sign of each eigenvector, which the fit fixes afterwards.
"""

from __future__ import annotations

import logging

import numpy as np
import scipy.linalg
import torch

logger = logging.getLogger(__name__)


def l2_normalize(x: np.ndarray, eps: float = 1e-10) -> np.ndarray:
    """Rows of ``x`` scaled to unit L2 norm (zero rows stay zero): ``(N, D) -> (N, D)``."""
    norms = np.linalg.norm(x, axis=1, keepdims=True)
    return x / np.maximum(norms, eps)


def top_eigh(sym: np.ndarray, k: int) -> tuple[np.ndarray, np.ndarray]:
    """The ``k`` largest eigenpairs of a symmetric ``(D, D)`` matrix, largest first.

    For ``k < D`` only those pairs are computed (``scipy.linalg.eigh`` with
    ``subset_by_index``, LAPACK ``dsyevx``: bisection and inverse iteration on the
    tridiagonal form): the reduction to tridiagonal form is that of a full solve, but the
    eigenvectors of the other ``D - k`` pairs are never formed nor back-transformed
    (1.7-1.9 x faster at D = 4096, k = 256, and 5-30 % faster than the MRRR driver
    ``dsyevr`` in our measurements, ``benchmarks/pca_fit.py --solvers``). Should inverse
    iteration fail to converge (tight eigenvalue clusters), MRRR is used. For ``k = D``
    it is ``numpy.linalg.eigh``.

    Args:
        sym: ``(D, D)`` symmetric matrix (float64 recommended).
        k: eigenpairs wanted, ``1 <= k <= D``.

    Returns:
        ``(eigenvalues (k,), eigenvectors (D, k))``, eigenvalues in descending order.
    """
    d = sym.shape[0]
    if k >= d:
        val, vec = np.linalg.eigh(sym)
    else:
        try:
            val, vec = scipy.linalg.eigh(sym, subset_by_index=[d - k, d - 1], driver="evx", check_finite=False)
        except np.linalg.LinAlgError:
            val, vec = scipy.linalg.eigh(sym, subset_by_index=[d - k, d - 1], driver="evr", check_finite=False)
    order = np.argsort(val)[::-1][:k]
    return val[order], vec[:, order]


def gram_top_eigh(xc: np.ndarray, k: int) -> tuple[np.ndarray, np.ndarray]:
    """Top ``k`` eigenpairs of ``xc.T @ xc`` from the ``(n, n)`` Gram matrix ``xc @ xc.T``.

    For centred rows ``xc`` (``(n, D)``, ``n < D``) both matrices share their non-zero
    eigenvalues, and if ``G u = lam u`` then ``v = xc.T u / sqrt(lam)`` is a unit
    eigenvector of ``xc.T xc``. This costs ``O(n^2 D + n^3)`` instead of ``O(n D^2 + D^3)``.
    The mapped vectors are orthonormalised by a QR decomposition: for well separated
    non-zero eigenvalues that only normalises them (and removes rounding), and for (near)
    zero eigenvalues, whose mapped vectors are noise, it completes the basis with unit
    vectors orthogonal to the others, as arbitrary as the null-space eigenvectors of a
    full solve.

    Args:
        xc: ``(n, D)`` centred rows, float64.
        k: eigenpairs wanted, ``1 <= k <= n``.

    Returns:
        ``(eigenvalues (k,), eigenvectors (D, k))`` of ``xc.T @ xc``, descending;
        eigenvalues clipped at 0.
    """
    lam, u = top_eigh(xc @ xc.T, k)  # (k,), (n, k)
    lam = np.clip(lam, 0.0, None)
    q, _ = np.linalg.qr(xc.T @ u)  # (D, k); the columns before QR have norms sqrt(lam)
    return lam, q


class PCAWhitening:
    """PCA to ``dim`` components, optional whitening, optional row L2 normalisation.

    Args:
        dim: number of principal components kept (paper: 256). Clamped to the rank the
            fitting sample allows (``min(D, n - 1)``), with a log message.
        whiten: divide each component by ``sqrt(eigenvalue + eps)`` (eigen power -0.5).
        normalize: L2-normalise each output row.
        eps: added to the eigenvalues before whitening, relative to the largest one, so
            that near-null directions are not blown up into noise.
    """

    def __init__(self, dim: int = 256, whiten: bool = True, normalize: bool = True, eps: float = 1e-6) -> None:
        if dim < 1:
            raise ValueError(f"PCA dim must be >= 1, got {dim}")
        self.dim = dim
        self.whiten = whiten
        self.normalize = normalize
        self.eps = eps
        self.mean: np.ndarray | None = None  # (D,)
        self.projection: np.ndarray | None = None  # (D, dim), whitening folded in
        self.eigenvalues: np.ndarray | None = None  # (dim,)

    @property
    def fitted(self) -> bool:
        return self.projection is not None

    def fit(self, x: np.ndarray) -> "PCAWhitening":
        """Fit on a sample ``(n, D)`` in float64: from the ``(D, D)`` covariance, or from
        the ``(n, n)`` Gram matrix of the centred rows when ``n < D``."""
        x = np.asarray(x)
        if x.ndim != 2 or x.shape[0] < 2:
            raise ValueError(f"PCA needs a 2-D sample with at least 2 rows, got shape {x.shape}")
        if not np.isfinite(x).all():
            bad = int((~np.isfinite(x)).any(1).sum())
            raise ValueError(f"features contain NaN or Inf in {bad} rows; the network has diverged")
        n, d = x.shape
        mean = x.mean(0, dtype=np.float64)
        if n < d:  # fewer rows than dimensions: the n x n Gram matrix is the smaller problem
            dim = self._clamped_dim(d, n)
            eigval, eigvec = gram_top_eigh(x.astype(np.float64) - mean, dim)
            return self._set_components(mean, eigval / (n - 1), eigvec)
        cov = np.zeros((d, d), dtype=np.float64)
        for start in range(0, n, 8192):  # chunked so the float64 copy stays small
            xc = x[start:start + 8192].astype(np.float64) - mean
            cov += xc.T @ xc
        cov /= n - 1
        return self.fit_moments(mean, cov, n)

    def fit_moments(self, mean: np.ndarray, cov: np.ndarray, n: int) -> "PCAWhitening":
        """Fit from the sample mean ``(D,)`` and covariance ``(D, D)`` (float64) of ``n``
        rows: what :meth:`fit` computes, and what sharded fits all-reduce."""
        eigval, eigvec = top_eigh(cov, self._clamped_dim(cov.shape[0], n))
        return self._set_components(mean, eigval, eigvec)

    def _clamped_dim(self, d: int, n: int) -> int:
        """``dim`` clamped to the rank that ``n`` rows of ``d`` features allow (logged)."""
        dim = min(self.dim, d, n - 1)
        if dim < self.dim:
            logger.info("PCA dim %d clamped to %d (feature dim %d, %d samples)", self.dim, dim, d, n)
        return dim

    def _set_components(self, mean: np.ndarray, eigval: np.ndarray, eigvec: np.ndarray) -> "PCAWhitening":
        """Store the mean ``(D,)`` and the projection from the covariance's top eigenpairs
        (``(dim,)`` descending, ``(D, dim)``), with signs fixed and whitening folded in."""
        dim = len(eigval)
        eigval = np.clip(eigval, 0.0, None)
        # Fix each component's sign (largest-magnitude loading positive) for reproducibility.
        signs = np.sign(eigvec[np.abs(eigvec).argmax(0), np.arange(dim)])
        eigvec = eigvec * np.where(signs == 0, 1.0, signs)
        proj = eigvec
        if self.whiten:
            proj = eigvec / np.sqrt(eigval + self.eps * max(eigval.max(), 1e-30))
        self.mean = mean.astype(np.float32)
        self.projection = proj.astype(np.float32)
        self.eigenvalues = eigval.astype(np.float32)
        return self

    def transform(self, x: np.ndarray) -> np.ndarray:
        """Project ``(N, D) -> (N, dim)`` float32 (whitened and normalised as configured)."""
        if not self.fitted:
            raise RuntimeError("PCAWhitening.transform called before fit")
        y = (np.asarray(x, dtype=np.float32) - self.mean) @ self.projection
        return l2_normalize(y) if self.normalize else y

    def fit_transform(self, x: np.ndarray) -> np.ndarray:
        return self.fit(x).transform(x)

    def state_dict(self) -> dict[str, object]:
        """Tensors and plain values only, so it loads with ``torch.load(weights_only=True)``."""
        if not self.fitted:
            raise RuntimeError("PCAWhitening is not fitted")
        return {
            "dim": self.projection.shape[1], "whiten": self.whiten, "normalize": self.normalize,
            "eps": self.eps, "mean": torch.from_numpy(self.mean),
            "projection": torch.from_numpy(self.projection),
            "eigenvalues": torch.from_numpy(self.eigenvalues),
        }

    @classmethod
    def from_state_dict(cls, state: dict[str, object]) -> "PCAWhitening":
        pca = cls(int(state["dim"]), bool(state["whiten"]), bool(state["normalize"]), float(state["eps"]))
        pca.mean = state["mean"].numpy()
        pca.projection = state["projection"].numpy()
        pca.eigenvalues = state["eigenvalues"].numpy()
        return pca
