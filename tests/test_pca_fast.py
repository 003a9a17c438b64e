"""The fast PCA fit (top-k eigensolver, Gram matrix when N < D) against the exact one.

Reference: ``numpy.linalg.eigh`` of the float64 covariance, all ``D`` pairs, the top
``dim`` kept, the same whitening formula as ``PCAWhitening``. Tolerances: a backward-
stable eigensolver is exact to ``~1e-16 x lam_max`` in the eigenvalues and to
``~1e-16 x lam_max / gap`` in the eigenvectors; the test spectra have relative gaps
``>= 1e-3``, so float64 agreement is ~1e-12 and what remains is the float32 storage of
the projection (~1e-7 relative). Eigenvalues are compared to rtol 1e-4 (the brief's
bound), subspaces by the cosines of their principal angles, and whitened outputs
column by column up to sign, never raw eigenvectors of (near-)zero eigenvalues, which
any solver may return as an arbitrary basis of the null space.
"""

import numpy as np
import pytest

from deepcluster.clustering import PCAWhitening, StreamingPCA, sample_indices
from deepcluster.clustering.preprocess import gram_top_eigh, top_eigh


def spectrum_data(n, d, rank=None, seed=0):
    """``(n, d)`` float32 rows: a random rotation of independent components with
    well-separated scales (``rank`` non-zero ones, default all), plus an offset."""
    rng = np.random.default_rng(seed)
    r = d if rank is None else rank
    rot, _ = np.linalg.qr(rng.standard_normal((d, r)))  # (d, r) orthonormal columns
    scales = np.geomspace(10.0, 0.3, r)
    return (rng.standard_normal((n, r)) * scales @ rot.T + 3.0).astype(np.float32)


def exact_reference(x, dim, eps=1e-6):
    """Mean, top-``dim`` eigenpairs (descending, clipped) and whitened outputs via a full eigh."""
    x64 = x.astype(np.float64)
    mean = x64.mean(0)
    xc = x64 - mean
    val, vec = np.linalg.eigh(xc.T @ xc / (len(x) - 1))
    order = np.argsort(val)[::-1][:dim]
    val, vec = np.clip(val[order], 0, None), vec[:, order]
    y = xc @ vec / np.sqrt(val + eps * val.max())
    return val, vec, y


def unwhitened_components(pca):
    """Unit eigenvectors ``(D, dim)`` recovered from a fitted (whitened) PCA's projection."""
    return pca.projection / np.linalg.norm(pca.projection, axis=0)


def check_against_exact(pca, x, live):
    """``pca`` (fitted on ``x``, whitened, not normalised) equals the exact fit; ``live``:
    the number of components with non-zero eigenvalues."""
    dim = pca.projection.shape[1]
    val, vec, y_ref = exact_reference(x, dim, pca.eps)
    lam_max = val[0]
    np.testing.assert_allclose(pca.eigenvalues[:live], val[:live], rtol=1e-4)
    np.testing.assert_allclose(pca.eigenvalues[live:], 0.0, atol=1e-9 * lam_max)
    v = unwhitened_components(pca).astype(np.float64)
    # The live subspace: principal-angle cosines, then each component up to sign.
    cosines = np.linalg.svd(v[:, :live].T @ vec[:, :live], compute_uv=False)
    assert cosines.min() > 1 - 1e-6
    dots = np.abs(np.sum(v[:, :live] * vec[:, :live], axis=0))
    np.testing.assert_allclose(dots, 1.0, atol=1e-6)
    # Whitened outputs on the data, column signs aligned; the null columns are ~0 in both.
    signs = np.sign(np.sum(v * vec, axis=0))
    signs[live:] = 1.0
    y = pca.transform(x).astype(np.float64)
    np.testing.assert_allclose(y[:, :live], y_ref[:, :live] * signs[:live], atol=2e-4 * np.abs(y_ref).max())
    if live < dim:
        assert np.abs(y[:, live:]).max() < 1e-2 and np.abs(y_ref[:, live:]).max() < 1e-2


def test_top_eigh_equals_the_full_eigendecomposition():
    rng = np.random.default_rng(1)
    a = rng.standard_normal((300, 300))
    sym = a @ a.T
    val, vec = np.linalg.eigh(sym)
    for k in (1, 17, 300):
        top_val, top_vec = top_eigh(sym, k)
        assert top_val.shape == (k,) and top_vec.shape == (300, k)
        np.testing.assert_allclose(top_val, val[::-1][:k], rtol=1e-10)
        np.testing.assert_allclose(np.abs(np.sum(top_vec * vec[:, ::-1][:, :k], 0)), 1.0, atol=1e-8)


def test_gram_eigenpairs_are_the_covariance_eigenpairs_and_orthonormal_even_when_rank_deficient():
    x = spectrum_data(40, 150, rank=6, seed=2).astype(np.float64)
    xc = x - x.mean(0)
    lam, v = gram_top_eigh(xc, 20)
    np.testing.assert_allclose(v.T @ v, np.eye(20), atol=1e-10)  # null part completed to a basis
    ref = np.linalg.eigvalsh(xc.T @ xc)[::-1][:20]
    np.testing.assert_allclose(lam[:6], ref[:6], rtol=1e-10)
    np.testing.assert_allclose(lam[6:], 0.0, atol=1e-9 * ref[0])
    np.testing.assert_allclose(xc.T @ (xc @ v[:, :6]), v[:, :6] * lam[:6], atol=1e-8 * ref[0])


@pytest.mark.parametrize("n, d, dim", [(60, 200, 32),    # N < D: the Gram path
                                       (800, 120, 24),   # N > D: the top-k solver on the covariance
                                       (30, 500, 64)])   # dim clamped to N - 1 = 29
def test_fast_fit_equals_the_exact_fit(n, d, dim):
    x = spectrum_data(n, d, seed=n)
    pca = PCAWhitening(dim, whiten=True, normalize=False).fit(x)
    live = min(dim, n - 1)
    assert pca.projection.shape == (d, live)
    check_against_exact(pca, x, live)


@pytest.mark.parametrize("n, d", [(50, 120), (400, 100)])  # Gram path, covariance path
def test_rank_deficient_data_whitens_the_live_part_and_keeps_null_columns_small(n, d):
    x = spectrum_data(n, d, rank=10, seed=3)
    pca = PCAWhitening(16, whiten=True, normalize=False).fit(x)
    check_against_exact(pca, x, live=10)
    # Normalised outputs (what k-means sees) are finite unit rows.
    y = PCAWhitening(16).fit(x).transform(x)
    np.testing.assert_allclose(np.linalg.norm(y, axis=1), 1.0, atol=1e-5)


def test_fit_moments_uses_the_top_k_solver_and_agrees_with_the_gram_fit():
    x = spectrum_data(80, 300, seed=4)
    gram = PCAWhitening(24, normalize=False).fit(x)  # n < D: Gram path
    mean = x.mean(0, dtype=np.float64)
    xc = x.astype(np.float64) - mean
    moments = PCAWhitening(24, normalize=False).fit_moments(mean, xc.T @ xc / (len(x) - 1), len(x))
    np.testing.assert_allclose(gram.eigenvalues, moments.eigenvalues, rtol=1e-5)
    np.testing.assert_allclose(gram.transform(x), moments.transform(x), atol=1e-4)
    check_against_exact(moments, x, 24)


def test_streaming_pca_with_a_small_wide_sample_equals_the_exact_fit_on_that_sample():
    x = spectrum_data(500, 256, seed=5)
    sample = sample_indices(500, 100, seed=0)  # 100 rows < 256 dimensions: the Gram path
    sp = StreamingPCA(PCAWhitening(32, normalize=False), len(x), sample_rows=len(sample))
    for s in range(0, len(sample), 32):
        sp.add_sample(sample[s:s + 32], x[sample[s:s + 32]])
    pca = sp.fit()
    rest = np.setdiff1d(np.arange(len(x)), sample)
    sp.add(rest, x[rest])
    check_against_exact(pca, x[sample], 32)
    _, vec, _ = exact_reference(x[sample], 32)
    v = unwhitened_components(pca).astype(np.float64)
    signs = np.sign(np.sum(v * vec, axis=0))
    val = pca.eigenvalues.astype(np.float64)
    ref_rest = (x[rest].astype(np.float64) - x[sample].mean(0, dtype=np.float64)) @ (vec * signs)
    ref_rest /= np.sqrt(val + pca.eps * val.max())
    np.testing.assert_allclose(sp.result()[rest], ref_rest, atol=2e-4 * np.abs(ref_rest).max())


def test_state_dict_format_is_unchanged():
    pca = PCAWhitening(8).fit(spectrum_data(20, 64, seed=6))
    state = pca.state_dict()
    assert set(state) == {"dim", "whiten", "normalize", "eps", "mean", "projection", "eigenvalues"}
    assert tuple(state["projection"].shape) == (64, 8) and tuple(state["eigenvalues"].shape) == (8,)
    assert str(state["projection"].dtype) == "torch.float32"
