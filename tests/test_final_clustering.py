"""Tests for the final clustering stage (``deepcluster.clustering.final``).

Synthetic data whose answer is known: well-separated blobs on the sphere (every method
recovers them), two moons (only the graph methods can), a planted two-level hierarchy
(``merge`` must undo it exactly). Centres, distances, confidences, the spectral
embedding and the merge rule are checked against direct numpy computations.
"""

from __future__ import annotations

import sys

import numpy as np
import pytest
from sklearn.datasets import make_moons
from sklearn.metrics import adjusted_rand_score

from deepcluster.clustering import (FINAL_METHODS, FinalClusteringError, FinalClusters, MissingDependencyError,
                                    final_clustering, kmeans)
from deepcluster.clustering import final as F


def _unit(a: np.ndarray) -> np.ndarray:
    return a / np.linalg.norm(a, axis=-1, keepdims=True)


def _blobs(n_per: int = 60, k: int = 5, d: int = 16, noise: float = 0.05, seed: int = 0):
    """Gaussian blobs around random unit centres: ``(k * n_per, d)`` float32 and labels."""
    rng = np.random.default_rng(seed)
    centres = _unit(rng.standard_normal((k, d)))
    labels = np.repeat(np.arange(k), n_per)
    return (centres[labels] + noise * rng.standard_normal((labels.size, d))).astype(np.float32), labels


def _moons(n: int = 300, seed: int = 0):
    """Two moons lifted to 3-D with a constant third coordinate, so that the package's
    L2 normalisation keeps their shape (it rescales each point by 1 +- 3 %)."""
    xy, labels = make_moons(n, noise=0.05, random_state=seed)
    return np.column_stack([xy, np.full(n, 10.0)]).astype(np.float32), labels


def _brute_knn(z: np.ndarray, m: int) -> np.ndarray:
    """``(N, m)`` nearest neighbours of each row in float64, itself excluded."""
    z64 = z.astype(np.float64)
    sq = ((z64[:, None] - z64[None]) ** 2).sum(-1)
    np.fill_diagonal(sq, np.inf)
    return np.argsort(sq, axis=1, kind="stable")[:, :m]


def _same_partition(a: np.ndarray, b: np.ndarray) -> bool:
    pairs = np.unique(np.stack([a, b]), axis=1)
    return pairs.shape[1] == np.unique(a).size == np.unique(b).size


def _check_result(res: FinalClusters, x: np.ndarray, k: int) -> None:
    """The result contract, against numpy: shapes, ranges, numbering, centres, distances."""
    n = x.shape[0]
    z = _unit(x.astype(np.float64))
    assert res.k == k and res.assignments.shape == (n,) and res.assignments.dtype == np.int64
    assert res.assignments.min() >= 0 and res.assignments.max() < k
    assert res.confidence.shape == (n,) and np.all((res.confidence >= 0) & (res.confidence <= 1))
    sizes = np.bincount(res.assignments, minlength=k)
    np.testing.assert_array_equal(res.sizes, sizes)
    assert np.all(np.diff(sizes) <= 0), "groups are numbered by decreasing size"
    centres = np.stack([z[res.assignments == g].mean(0) for g in range(k)])
    np.testing.assert_allclose(res.centres, centres, atol=1e-5)
    np.testing.assert_allclose(res.distance, np.linalg.norm(z - centres[res.assignments], axis=1), atol=1e-5)


def _fine_kmeans(x: np.ndarray, k_fine: int) -> np.ndarray:
    return kmeans(_unit(x).astype(np.float32), k_fine, seed=0).assignments


@pytest.mark.parametrize("method", list(FINAL_METHODS))
def test_separated_blobs_recovered_by_every_method(method):
    x, labels = _blobs()
    opts = {"fine_assignments": _fine_kmeans(x, 15)} if method == "merge" else {}
    res = final_clustering(x, 5, method, seed=0, **opts)
    _check_result(res, x, 5)
    assert res.method == method
    assert adjusted_rand_score(labels, res.assignments) >= 0.99


@pytest.mark.parametrize("method", ["spectral", "leiden"])
def test_two_moons_graph_methods_succeed(method):
    x, labels = _moons()
    res = FINAL_METHODS[method](x, 2, 0)
    _check_result(res, x, 2)
    assert adjusted_rand_score(labels, res.assignments) >= 0.95
    if method == "spectral":
        assert res.info["components"] == 1  # the eigenvector path, not the component shortcut


def test_two_moons_kmeans_fails():
    x, labels = _moons()
    assert adjusted_rand_score(labels, FINAL_METHODS["kmeans"](x, 2, 0).assignments) < 0.6


def test_kmeans_is_the_lowest_loss_protocol_and_margin_confidence():
    x, _ = _blobs(seed=1)
    res = F.final_kmeans(x, 5, seed=3, n_init=3)
    z = _unit(x).astype(np.float32)
    ref = min((kmeans(z, 5, niter=20, seed=3 + i) for i in range(3)), key=lambda r: r.loss)
    assert _same_partition(res.assignments, ref.assignments)
    # Converged Lloyd: the centroids are the group means, so the margin can be recomputed from them.
    d = np.sort(np.linalg.norm(_unit(x.astype(np.float64))[:, None] - res.centres[None].astype(np.float64), axis=2), 1)
    np.testing.assert_allclose(res.confidence, 1 - d[:, 0] / d[:, 1], atol=1e-4)


def test_spectral_embedding_spans_the_leading_eigenvectors():
    rng = np.random.default_rng(0)
    z = _unit(rng.standard_normal((120, 6))).astype(np.float32)
    w = F._symmetric_graph(F._neighbors(z, 8))
    a = F._knn_matrix(_brute_knn(z, 8)).toarray()
    np.testing.assert_allclose(w.toarray(), (a + a.T) / 2)  # the graph itself, against brute force
    d = 1 / np.sqrt(w.toarray().sum(1))
    vals, vecs = np.linalg.eigh(d[:, None] * w.toarray() * d[None, :])
    assert vals[-4] - vals[-5] > 1e-3  # a well-defined leading subspace
    u = F._spectral_embedding(w, 4, seed=0)
    ref = vecs[:, -4:]
    np.testing.assert_allclose(u @ u.T, ref @ ref.T, atol=1e-6)  # same subspace, any basis


def test_graph_confidence_is_neighbour_agreement():
    x, _ = _moons(seed=2)
    res = F.final_leiden(x, 2, 0)
    nbrs = _brute_knn(_unit(x), F.LEIDEN_NEIGHBORS)
    ref = (res.assignments[nbrs] == res.assignments[:, None]).mean(1)
    np.testing.assert_allclose(res.confidence, ref)


@pytest.mark.parametrize("method", ["leiden", "spectral"])
def test_graph_methods_merge_components_when_they_outnumber_k(method):
    x, labels = _blobs(n_per=40, k=6, noise=0.03, seed=4)  # six kNN components: K=4 is below any resolution
    res = FINAL_METHODS[method](x, 4, 0)
    _check_result(res, x, 4)
    if method == "leiden":
        assert res.info["communities"] > 4 and res.info["merged"] == res.info["communities"] - 4
    else:
        assert res.info["components"] == 6
    for c in range(6):  # a blob is never split: groups are unions of blobs
        assert np.unique(res.assignments[labels == c]).size == 1
    again = FINAL_METHODS[method](x, 4, 0)
    np.testing.assert_array_equal(res.assignments, again.assignments)


def test_merge_smallest_follows_links_then_nearest_mean():
    # Groups of sizes 4, 3, 2, 1 (labels 0..3). Row 9 (group 3) is linked to group 1 only;
    # group 2 has no link, and its mean is nearest group 0's.
    labels = np.array([0, 0, 0, 0, 1, 1, 1, 2, 2, 3])
    z = np.zeros((10, 2))
    z[labels == 0], z[labels == 1], z[labels == 2], z[9] = [1, 0], [0, 1], [0.9, 0.1], [0, -1]
    w = np.zeros((10, 10))
    w[9, 4] = w[4, 9] = 1.0
    w[0, 4] = w[4, 0] = 1.0
    out = F._merge_smallest(labels, F.scipy.sparse.csr_matrix(w), z, 2)
    # Step 1: group 3 (size 1) -> group 1 (its only link).
    # Step 2: group 2 (size 2) has no link -> the nearest mean, group 0's.
    assert _same_partition(out, np.array([0, 0, 0, 0, 1, 1, 1, 0, 0, 1]))


def _hierarchy(k: int = 3, fine_per: int = 4, n_per: int = 40, seed: int = 0):
    """Coarse blobs on the sphere, each cut into ``fine_per`` angular sectors around its centre
    (adjacent sectors touch; blobs are far apart): rows, coarse labels, fine labels."""
    rng = np.random.default_rng(seed)
    centres = _unit(rng.standard_normal((k, 8))) * 4.0
    coarse = np.repeat(np.arange(k), fine_per * n_per)
    offset = 0.3 * rng.standard_normal((coarse.size, 2))
    sector = np.floor((np.arctan2(offset[:, 1], offset[:, 0]) + np.pi) / (2 * np.pi) * fine_per).astype(int)
    x = centres[coarse] + np.column_stack([offset, 0.02 * rng.standard_normal((coarse.size, 6))])
    fine = coarse * fine_per + np.minimum(sector, fine_per - 1)
    return x.astype(np.float32), coarse, fine


def test_merge_undoes_a_planted_hierarchy_exactly():
    x, coarse, fine = _hierarchy()
    perm = np.random.default_rng(1).permutation(12)  # fine numbers need not be grouped or contiguous
    res = F.final_merge(x, 3, fine_assignments=perm[fine] * 7 + 2)
    _check_result(res, x, 3)
    assert _same_partition(res.assignments, coarse)
    assert res.info["fine_clusters"] == 12


def test_merge_affinity_against_direct_count():
    x, _, fine = _hierarchy(seed=3)
    m = F.MERGE_NEIGHBORS
    nbrs = _brute_knn(_unit(x), m)
    edges = np.zeros((12, 12))
    for i in range(x.shape[0]):
        for j in nbrs[i]:
            edges[fine[i], fine[j]] += 1
    share = edges / (np.bincount(fine)[:, None] * m)
    got = F._between(F._knn_matrix(F._neighbors(_unit(x).astype(np.float32), m)), fine, 12)
    np.testing.assert_allclose(got / (np.bincount(fine)[:, None] * m), share)


@pytest.mark.parametrize("method", ["kmeans", "spectral", "leiden"])
def test_same_seed_same_groups(method):
    x, _ = _moons(n=200, seed=5)
    a, b = (FINAL_METHODS[method](x, 3, 7) for _ in range(2))
    np.testing.assert_array_equal(a.assignments, b.assignments)


@pytest.mark.parametrize("method", list(FINAL_METHODS))
def test_k_above_n_is_one_line_error(method):
    x, _ = _blobs(n_per=2, k=3)
    with pytest.raises(FinalClusteringError, match=r"K=7 groups asked of only N=6 rows") as e:
        final_clustering(x, 7, method, **({"fine_assignments": np.arange(6)} if method == "merge" else {}))
    assert "\n" not in str(e.value) and isinstance(e.value, ValueError)


def test_merge_k_above_fine_clusters_and_bad_fine():
    x, _ = _blobs(n_per=10, k=3)
    with pytest.raises(FinalClusteringError, match=r"K=4 exceeds the 3 fine clusters"):
        F.final_merge(x, 4, fine_assignments=np.repeat([0, 5, 9], 10))
    with pytest.raises(FinalClusteringError, match=r"needs fine_assignments"):
        F.final_merge(x, 2)
    with pytest.raises(FinalClusteringError, match=r"fine_assignments must be \(30,\)"):
        F.final_merge(x, 2, fine_assignments=np.zeros(29, dtype=int))


def test_bad_features_method_and_options():
    x, _ = _blobs(n_per=5, k=2)
    bad = x.copy()
    bad[3, 1] = np.nan
    with pytest.raises(FinalClusteringError, match="NaN or Inf in 1 rows"):
        final_clustering(bad, 2, "spectral")
    with pytest.raises(FinalClusteringError, match="unknown final clustering method 'dbscan'"):
        final_clustering(x, 2, "dbscan")
    with pytest.raises(FinalClusteringError, match=r"unknown option\(s\) \['resolution'\]"):
        final_clustering(x, 2, "leiden", resolution=1.0)
    with pytest.raises(FinalClusteringError, match="K must be an integer >= 1"):
        final_clustering(x, 0, "kmeans")


@pytest.mark.parametrize("module, package, method", [
    ("leidenalg", "leidenalg", "leiden"), ("igraph", "igraph", "leiden"),
    ("umap", "umap-learn", "umap-kmeans"), ("sklearn.mixture", "scikit-learn", "umap-gmm"),
])
def test_missing_optional_dependency_names_the_package(monkeypatch, module, package, method):
    monkeypatch.setitem(sys.modules, module, None)  # makes `import module` raise ImportError
    x, _ = _blobs(n_per=10, k=2)
    with pytest.raises(MissingDependencyError) as e:
        final_clustering(x, 2, method)
    assert str(e.value) == f"{package} is not installed: pip install 'deepcluster[cluster]'"
    assert isinstance(e.value, ValueError) and isinstance(e.value, ImportError)
