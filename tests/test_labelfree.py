"""Label-free signals (deepcluster.labelfree) against direct numpy reference computations."""

import numpy as np
import pytest

from deepcluster.clustering import kmeans
from deepcluster.labelfree import cluster_stability, cosine_neighbors, knn_agreement, rankme
from deepcluster.metrics import nmi


def rankme_reference(z, eps=1e-7):
    s = np.linalg.svd(np.asarray(z, np.float64), compute_uv=False)
    p = s / np.abs(s).sum() + eps
    return float(np.exp(-np.sum(p * np.log(p))))


def brute_force_neighbors(x, k):
    """Each row's k most cosine-similar other rows, by a full numpy similarity matrix."""
    xn = x / np.linalg.norm(x, axis=1, keepdims=True)
    sim = xn @ xn.T
    np.fill_diagonal(sim, -np.inf)
    return np.argsort(-sim, axis=1, kind="stable")[:, :k]


def test_rankme_matches_the_svd_reference():
    rng = np.random.default_rng(0)
    for shape in [(200, 50), (30, 80)]:
        z = rng.standard_normal(shape) * np.geomspace(5, 0.01, shape[1])
        assert rankme(z) == pytest.approx(rankme_reference(z), rel=1e-10)


@pytest.mark.parametrize("r", [1, 3, 17])
def test_rankme_of_a_rank_r_matrix_with_equal_singular_values_is_r(r):
    rng = np.random.default_rng(r)
    u, _ = np.linalg.qr(rng.standard_normal((120, r)))
    v, _ = np.linalg.qr(rng.standard_normal((40, r)))
    z = 3.0 * u @ v.T  # singular values: r times 3, then zeros
    # exp(entropy) of r equal probabilities is r; eps adds ~ -min(N,D) eps log eps.
    assert rankme(z) == pytest.approx(r, rel=1e-4)
    assert rankme(np.zeros((10, 4))) == 0.0


def test_rankme_rejects_bad_input():
    with pytest.raises(ValueError, match="rankme"):
        rankme(np.ones(5))
    with pytest.raises(ValueError, match="NaN"):
        rankme(np.array([[1.0, np.nan]]))


def test_cosine_neighbors_equal_brute_force_and_exclude_self():
    x = np.random.default_rng(1).standard_normal((300, 16)).astype(np.float32)
    nn = cosine_neighbors(x, 7)
    assert nn.shape == (300, 7) and not (nn == np.arange(300)[:, None]).any()
    np.testing.assert_array_equal(nn, brute_force_neighbors(x.astype(np.float64), 7))


def test_knn_agreement_equals_the_brute_force_fraction():
    rng = np.random.default_rng(2)
    a = rng.standard_normal((400, 12))
    b = a + 0.7 * rng.standard_normal((400, 12))  # a noisy second view
    k = 10
    na, nb = brute_force_neighbors(a, k), brute_force_neighbors(b, k)
    want = np.mean([len(set(p) & set(q)) / k for p, q in zip(na, nb)])
    assert 0.05 < want < 0.95  # a case between the two extremes
    assert knn_agreement(a, b, k) == pytest.approx(want, abs=1e-12)


def test_knn_agreement_hand_cases():
    rng = np.random.default_rng(3)
    a = rng.standard_normal((500, 8))
    assert knn_agreement(a, a, 10) == 1.0
    assert knn_agreement(a, 5.0 * a, 10) == 1.0  # cosine: invariant to scale
    # Independent views: each of the k neighbours in b is one of N - 1 others at random.
    agree = knn_agreement(a, rng.standard_normal((500, 8)), 10)
    assert agree == pytest.approx(10 / 499, abs=0.01)


def test_knn_agreement_rejects_bad_input():
    a = np.zeros((5, 3)) + 1.0
    with pytest.raises(ValueError, match="same images"):
        knn_agreement(a, np.ones((6, 3)))
    with pytest.raises(ValueError, match="k must be"):
        knn_agreement(a, a, k=5)


def blobs(n_per=100, centres=4, d=8, spread=0.05, seed=0):
    rng = np.random.default_rng(seed)
    c = rng.standard_normal((centres, d)) * 3
    return (np.repeat(c, n_per, 0) + spread * rng.standard_normal((centres * n_per, d))).astype(np.float32)


def test_cluster_stability_is_the_mean_pairwise_nmi_of_seeded_kmeans():
    x = np.random.default_rng(4).standard_normal((300, 6)).astype(np.float32)  # no structure
    labels = [kmeans(x, 8, seed=s).assignments for s in (0, 1, 2)]
    want = np.mean([nmi(labels[0], labels[1]), nmi(labels[0], labels[2]), nmi(labels[1], labels[2])])
    assert cluster_stability(x, 8) == pytest.approx(want, abs=1e-12)
    assert want < 0.95  # random data: the seeds disagree
    # Separated blobs (k = their number) are found again by most seeds (random starts can
    # still merge two blobs); unstructured points of the same shape are cut anew each time.
    structured = cluster_stability(blobs(centres=10), 10)
    unstructured = cluster_stability(np.random.default_rng(5).standard_normal((1000, 8)).astype(np.float32), 10)
    assert structured > 0.8 and structured > unstructured + 0.2
    with pytest.raises(ValueError, match="two distinct seeds"):
        cluster_stability(x, 8, seeds=(1, 1))
