import numpy as np
import pytest
import torch
from sklearn.decomposition import PCA

from deepcluster.clustering import PCAWhitening, l2_normalize


def correlated(n=3000, d=40, seed=0):
    rng = np.random.default_rng(seed)
    mix = rng.standard_normal((d, d)) * np.linspace(3, 0.1, d)
    return (rng.standard_normal((n, d)) @ mix + 5.0).astype(np.float32)


def test_whitened_output_has_identity_covariance_before_l2():
    x = correlated()
    pca = PCAWhitening(16, whiten=True, normalize=False).fit(x)
    y = pca.transform(x)
    assert y.shape == (3000, 16)
    cov = np.cov(y, rowvar=False)
    np.testing.assert_allclose(cov, np.eye(16), atol=1e-3)
    np.testing.assert_allclose(y.mean(0), 0, atol=1e-3)


def test_regularised_whitening_scales_each_component_by_its_eigenvalue_over_eigenvalue_plus_eps():
    x = correlated()
    ref = PCA(16, svd_solver="full").fit(x.astype(np.float64))
    lam = ref.explained_variance_ * (len(x) - 1) / len(x)  # population variance, as the fit uses
    for eps in (1e-6, 0.01, 0.5):
        y = PCAWhitening(16, whiten=True, normalize=False, eps=eps).fit_transform(x)
        want = lam / (lam + eps * lam.max())  # variance of component i after dividing by sqrt(lam_i + eps lam_max)
        np.testing.assert_allclose(y.var(0), want, rtol=2e-3, atol=1e-6)
    # eps 1e-6 is full whitening; a large eps tends to PCA without whitening, up to one global scale.
    big = PCAWhitening(16, whiten=True, normalize=False, eps=1e6).fit_transform(x)
    plain = PCAWhitening(16, whiten=False, normalize=False).fit_transform(x)
    np.testing.assert_allclose(big * np.sqrt(1e6 * lam.max()), plain, rtol=1e-3, atol=1e-3)


def test_projection_matches_sklearn_pca_up_to_sign():
    x = correlated()
    ours = PCAWhitening(8, whiten=False, normalize=False).fit_transform(x)
    ref = PCA(8, svd_solver="full").fit_transform(x.astype(np.float64))
    np.testing.assert_allclose(np.abs(ours), np.abs(ref), rtol=1e-3, atol=1e-2)
    ref_w = PCA(8, whiten=True, svd_solver="full").fit_transform(x.astype(np.float64))
    ours_w = PCAWhitening(8, whiten=True, normalize=False).fit_transform(x)
    np.testing.assert_allclose(np.abs(ours_w), np.abs(ref_w), rtol=1e-3, atol=1e-3)


def test_rows_are_unit_norm_and_state_round_trips():
    x = correlated()
    pca = PCAWhitening(10).fit(x)
    y = pca.transform(x)
    np.testing.assert_allclose(np.linalg.norm(y, axis=1), 1.0, atol=1e-5)
    state = pca.state_dict()
    assert all(isinstance(v, (torch.Tensor, int, float, bool)) for v in state.values())
    again = PCAWhitening.from_state_dict(state).transform(x)
    np.testing.assert_array_equal(again, y)


def test_dim_clamped_to_sample_rank_and_bad_input():
    x = correlated(n=20, d=40)
    assert PCAWhitening(256).fit(x).transform(x).shape == (20, 19)
    x[3, 2] = np.nan
    with pytest.raises(ValueError, match="NaN"):
        PCAWhitening(4).fit(x)
    with pytest.raises(RuntimeError):
        PCAWhitening(4).transform(x)


def test_l2_normalize_zero_row():
    y = l2_normalize(np.array([[3.0, 4.0], [0.0, 0.0]]))
    np.testing.assert_allclose(y, [[0.6, 0.8], [0.0, 0.0]])
