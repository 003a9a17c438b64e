"""Tests for Power Iteration Clustering (``deepcluster.clustering.pic``).

Each piece is checked against an independent brute-force numpy reference on small
inputs; the end-to-end tests check cluster recovery, the forest structure, the effect
of ``sigma`` and that nothing quadratic in N is allocated.
"""

from __future__ import annotations

import tracemalloc
import warnings

import numpy as np
import pytest
import scipy.sparse
from sklearn.metrics import normalized_mutual_info_score

from deepcluster.clustering.pic import (
    PICResult,
    find_maxima_clusters,
    knn_graph,
    power_iteration,
    run_pic,
)


def _sphere(n: int, d: int, seed: int) -> np.ndarray:
    """``(n, d)`` float32 random points on the unit sphere (the training regime)."""
    x = np.random.default_rng(seed).standard_normal((n, d)).astype(np.float32)
    return x / np.linalg.norm(x, axis=1, keepdims=True)


def _blobs(
    n_per: int, n_blobs: int, d: int, noise: float, seed: int
) -> tuple[np.ndarray, np.ndarray]:
    """L2-normalised Gaussian blobs around random unit centres, and their labels."""
    rng = np.random.default_rng(seed)
    centres = rng.standard_normal((n_blobs, d))
    centres /= np.linalg.norm(centres, axis=1, keepdims=True)
    labels = np.repeat(np.arange(n_blobs), n_per)
    x = centres[labels] + noise * rng.standard_normal((labels.size, d))
    x /= np.linalg.norm(x, axis=1, keepdims=True)
    return x.astype(np.float32), labels


def _brute_force_knn(x: np.ndarray, k: int) -> tuple[np.ndarray, np.ndarray]:
    """Exact kNN in float64, self excluded, rows sorted by (distance, index)."""
    x64 = x.astype(np.float64)
    sq = ((x64[:, None, :] - x64[None, :, :]) ** 2).sum(-1)
    np.fill_diagonal(sq, np.inf)
    order = np.lexsort((np.broadcast_to(np.arange(len(x)), sq.shape), sq), axis=-1)[:, :k]
    return order, np.take_along_axis(sq, order, axis=1)


def _same_partition(a: np.ndarray, b: np.ndarray) -> bool:
    """True when two labelings define the same partition (up to renaming)."""
    pairs = np.unique(np.stack([a, b]), axis=1)
    return pairs.shape[1] == np.unique(a).size == np.unique(b).size


# --------------------------------------------------------------------------- graph


def test_knn_graph_matches_brute_force() -> None:
    x = _sphere(60, 8, seed=0)
    k, sigma = 4, 0.5
    graph, idx, sq = knn_graph(x, n_neighbors=k, sigma=sigma)
    ref_idx, ref_sq = _brute_force_knn(x, k)

    assert scipy.sparse.issparse(graph) and graph.format == "csr"
    assert graph.shape == (60, 60)
    assert graph.nnz == 60 * k
    assert idx.shape == sq.shape == (60, k) and idx.dtype == np.int64
    np.testing.assert_array_equal(idx, ref_idx)
    np.testing.assert_allclose(sq, ref_sq, rtol=1e-5, atol=1e-6)

    # Weights exp(-d / sigma^2) against the brute-force distances, at the right places.
    dense_ref = np.zeros((60, 60))
    np.put_along_axis(dense_ref, ref_idx, np.exp(-ref_sq / sigma**2), axis=1)
    np.testing.assert_allclose(graph.toarray(), dense_ref, rtol=1e-5, atol=1e-12)

    assert np.all(graph.diagonal() == 0)
    sym = graph + graph.T
    assert abs(sym - sym.T).max() == 0
    assert np.all(sym.diagonal() == 0)
    # G itself is a directed kNN graph; with random data it is not symmetric.
    assert abs(graph - graph.T).max() > 0


def test_knn_graph_with_duplicates_excludes_self_and_is_deterministic() -> None:
    # 10 exact copies of each of 6 points: with k = 3 the point itself may not even be
    # among faiss' k + 1 results, and all distances within a group tie at zero.
    base = _sphere(6, 5, seed=1)
    x = np.repeat(base, 10, axis=0)
    graph, idx, sq = knn_graph(x, n_neighbors=3, sigma=0.2)
    rows = np.arange(len(x))[:, None]
    assert graph.nnz == len(x) * 3
    assert not np.any(idx == rows)
    assert np.all(np.diff(np.sort(idx, axis=1), axis=1) > 0)  # distinct neighbours
    assert np.all(idx // 10 == rows // 10)  # neighbours are copies of the same point
    np.testing.assert_array_equal(sq, 0)
    # Ties are broken by index: the 3 lowest-index other copies, in increasing order.
    group_start = (rows // 10) * 10
    expected = group_start + np.array([0, 1, 2, 3])
    expected = np.array([[j for j in e if j != r][:3] for e, r in zip(expected, rows[:, 0])])
    np.testing.assert_array_equal(idx, expected)
    assert np.all(graph.diagonal() == 0)

    a = run_pic(x, n_neighbors=3)
    b = run_pic(x, n_neighbors=3)
    np.testing.assert_array_equal(a.assignments, b.assignments)
    np.testing.assert_array_equal(a.local_maxima, b.local_maxima)


# --------------------------------------------------------------------------- power iteration


def test_power_iteration_matches_dense_reference() -> None:
    x = _sphere(50, 6, seed=2)
    alpha, n_iter = 0.05, 30  # a larger alpha than default so v moves visibly from 1/n
    graph, _, _ = knn_graph(x, n_neighbors=5, sigma=0.5)
    a_dense = (graph + graph.T).toarray()

    v_ref = np.full(50, 1 / 50)
    for _ in range(n_iter):
        v_ref = alpha * a_dense @ v_ref + (1 - alpha) * v_ref
        v_ref = v_ref / np.abs(v_ref).sum()

    v = power_iteration((graph + graph.T).tocsr(), alpha=alpha, n_iter=n_iter)
    np.testing.assert_allclose(v, v_ref, rtol=1e-12, atol=0)
    assert v.sum() == pytest.approx(1.0) and np.all(v > 0)
    assert np.ptp(v) > 1e-3 / 50  # non-trivial: far from the uniform start

    # Dense and sparse inputs agree, and so do the defaults.
    np.testing.assert_allclose(power_iteration(a_dense, alpha, n_iter), v, rtol=1e-12)
    v_def = power_iteration((graph + graph.T).tocsr())
    v_ref = np.full(50, 1 / 50)
    for _ in range(200):
        v_ref = 1e-3 * a_dense @ v_ref + (1 - 1e-3) * v_ref
        v_ref /= v_ref.sum()
    np.testing.assert_allclose(v_def, v_ref, rtol=1e-12)


# --------------------------------------------------------------------------- clusters


def _reference_maxima(
    v: np.ndarray, idx: np.ndarray, w: np.ndarray
) -> tuple[np.ndarray, np.ndarray]:
    """Loop version of the hill climb (as in the original DeepCluster code) + root chasing."""
    n, k = idx.shape
    parent = np.full(n, -1)
    for i in range(n):
        best = 0.0
        for m in range(k):
            gain = w[i, m] * (v[idx[i, m]] - v[i])
            if gain > best:
                best, parent[i] = gain, idx[i, m]
        if parent[i] < 0:  # plateau rule: equal v, positive weight, smaller index
            for m in range(k):
                j = idx[i, m]
                if v[j] == v[i] and w[i, m] > 0 and j < i:
                    parent[i] = j
                    break
    root = np.empty(n, dtype=np.int64)
    for i in range(n):
        r = i
        while parent[r] >= 0:
            r = parent[r]
        root[i] = r
    return parent, root


def test_find_maxima_clusters_matches_loop_reference() -> None:
    x = _sphere(300, 8, seed=3)
    graph, idx, sq = knn_graph(x, n_neighbors=5, sigma=0.3)
    w = np.exp(-sq.astype(np.float64) / 0.3**2)
    v = power_iteration((graph + graph.T).tocsr())
    labels, parent, maxima = find_maxima_clusters(v, idx, w)
    ref_parent, ref_root = _reference_maxima(v, idx, w)

    np.testing.assert_array_equal(parent, ref_parent)
    np.testing.assert_array_equal(maxima, np.flatnonzero(ref_parent < 0))
    assert _same_partition(labels, ref_root)
    assert 1 < maxima.size < 300
    # Labels are contiguous and numbered by smallest member.
    firsts = np.array([np.flatnonzero(labels == c)[0] for c in range(labels.max() + 1)])
    assert np.all(np.diff(firsts) > 0) and labels[0] == 0


def test_plateau_tie_break_joins_equal_values() -> None:
    # Two mutually nearest nodes with exactly equal v: one cluster, rooted at the
    # smaller index, instead of two local maxima.
    v = np.array([0.5, 0.5])
    idx = np.array([[1], [0]])
    w = np.ones((2, 1))
    labels, parent, maxima = find_maxima_clusters(v, idx, w)
    np.testing.assert_array_equal(parent, [-1, 0])
    np.testing.assert_array_equal(maxima, [0])
    np.testing.assert_array_equal(labels, [0, 0])


def test_run_pic_equals_composition_of_steps() -> None:
    x = _sphere(400, 12, seed=4)
    res = run_pic(x, n_neighbors=6, sigma=0.3, alpha=1e-2, n_iter=50, merge_singletons=False)
    graph, idx, sq = knn_graph(x, n_neighbors=6, sigma=0.3)
    v = power_iteration((graph + graph.T).tocsr(), alpha=1e-2, n_iter=50)
    labels, _, maxima = find_maxima_clusters(v, idx, np.exp(-sq.astype(np.float64) / 0.09))
    np.testing.assert_array_equal(res.assignments, labels)
    np.testing.assert_array_equal(res.local_maxima, maxima)


def test_recovers_gaussian_blobs() -> None:
    # PIC over-segments with few neighbours (spurious local maxima of v inside a blob):
    # with k = 5 this input splits into ~17 clusters (NMI ~0.8). With k = 40 it gives
    # NMI >= 0.967 on each of 10 seeds tried (1.0 on 9 of them).
    x, y = _blobs(n_per=150, n_blobs=5, d=16, noise=0.05, seed=5)
    res = run_pic(x, n_neighbors=40, sigma=0.2)
    assert isinstance(res, PICResult)
    nmi = normalized_mutual_info_score(y, res.assignments, average_method="geometric")
    assert nmi >= 0.95, (nmi, res.num_clusters)
    assert res.assignments.dtype == np.int64 and res.assignments.shape == (750,)
    assert res.sizes.dtype == np.int64 and res.sizes.sum() == 750
    np.testing.assert_array_equal(res.sizes, np.bincount(res.assignments))
    assert res.num_clusters == res.sizes.size == res.assignments.max() + 1
    assert res.seconds > 0


def test_each_cluster_has_exactly_one_local_maximum() -> None:
    x = _sphere(800, 16, seed=6)
    res = run_pic(x, merge_singletons=False)
    assert res.num_clusters > 10  # random data: many clusters, so the check has teeth
    assert res.local_maxima.size == res.num_clusters
    per_cluster = np.bincount(res.assignments[res.local_maxima], minlength=res.num_clusters)
    np.testing.assert_array_equal(per_cluster, 1)

    # Independently: the local maxima are exactly the nodes with no uphill neighbour.
    graph, idx, sq = knn_graph(x)
    v = power_iteration((graph + graph.T).tocsr())
    w = np.exp(-sq.astype(np.float64) / 0.2**2)
    no_uphill = ~np.any(w * (v[idx] - v[:, None]) > 0, axis=1)
    plateau = np.any((v[idx] == v[:, None]) & (idx < np.arange(800)[:, None]), axis=1)
    np.testing.assert_array_equal(res.local_maxima, np.flatnonzero(no_uphill & ~plateau))
    # Each local maximum has the largest v in its cluster.
    for m in res.local_maxima:
        members = res.assignments == res.assignments[m]
        assert v[m] == v[members].max()


def test_merge_singletons() -> None:
    x = _sphere(800, 16, seed=6)
    raw = run_pic(x, merge_singletons=False)
    merged = run_pic(x, merge_singletons=True)
    assert np.any(raw.sizes == 1)  # the input does produce singletons
    assert np.all(merged.sizes >= 2)
    np.testing.assert_array_equal(merged.local_maxima, raw.local_maxima)
    n_big = int(np.count_nonzero(raw.sizes > 1))
    assert n_big <= merged.num_clusters < raw.num_clusters
    # Non-singleton clusters are kept whole (never split) and distinct (each singleton
    # adds a single edge, so no chain of them can join two existing clusters).
    big = raw.sizes[raw.assignments] > 1
    pairs = np.unique(np.stack([raw.assignments[big], merged.assignments[big]]), axis=1)
    assert pairs.shape[1] == n_big
    assert np.unique(pairs[0]).size == np.unique(pairs[1]).size == n_big
    # Every singleton sits with its nearest neighbour.
    _, idx, _ = knn_graph(x)
    single = np.flatnonzero(raw.sizes[raw.assignments] == 1)
    np.testing.assert_array_equal(merged.assignments[single], merged.assignments[idx[single, 0]])


def test_larger_sigma_gives_no_more_clusters() -> None:
    # On random unit vectors the cluster count falls through three regimes as sigma
    # grows: weights underflow to 0 (about one cluster per point), v ordered by the
    # nearest-neighbour distance, then v ordered mostly by in-degree. Within the last
    # regime the count fluctuates by a few clusters (e.g. 43 -> 47 from sigma 0.3 to
    # 0.5 here), so monotonicity is a coarse trend, not a theorem: the sweep below
    # steps across the regimes (checked on 6 seeds, not only this one).
    x = _sphere(500, 16, seed=0)
    sigmas = [0.02, 0.03, 0.05, 0.1, 0.15, 1.0]
    counts = [run_pic(x, sigma=s, merge_singletons=False).num_clusters for s in sigmas]
    assert all(a >= b for a, b in zip(counts, counts[1:])), counts
    assert counts[0] > 5 * counts[-1], counts
    assert counts[2] > counts[-1], counts  # a real drop, not only the underflow regime

    merged = [run_pic(x, sigma=s).num_clusters for s in (0.02, 0.05, 1.0)]
    assert merged[0] > merged[1] > merged[2], merged


def test_no_dense_n_by_n_allocation() -> None:
    # A dense 50k x 50k float64 matrix would be 20 GB. tracemalloc sees numpy's
    # allocations (not faiss' internal C++ buffers, which are blocked and bounded).
    n = 50_000
    x = np.random.default_rng(7).standard_normal((n, 4)).astype(np.float32)
    tracemalloc.start()
    try:
        res = run_pic(x, n_neighbors=5)
        _, peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    assert res.assignments.shape == (n,) and res.num_clusters > 1
    assert peak < 100 * 2**20, f"peak numpy allocation {peak / 2**20:.0f} MiB"
    graph, _, _ = knn_graph(x[:1000])
    assert scipy.sparse.issparse(graph) and graph.nnz == 5 * 1000


# --------------------------------------------------------------------------- bad input


@pytest.mark.parametrize(
    ("x", "kwargs", "match"),
    [
        (np.zeros(10, dtype=np.float32), {}, "2-D"),
        (np.zeros((2, 3, 4), dtype=np.float32), {}, "2-D"),
        (_sphere(20, 4, 0), {"sigma": 0.0}, "sigma"),
        (_sphere(20, 4, 0), {"sigma": -1.0}, "sigma"),
        (_sphere(20, 4, 0), {"sigma": float("nan")}, "sigma"),
        (_sphere(20, 4, 0), {"n_neighbors": 0}, "n_neighbors"),
        (_sphere(20, 4, 0), {"n_neighbors": 20}, "n_neighbors"),
        (_sphere(20, 4, 0), {"n_neighbors": 2.5}, "n_neighbors"),
        (_sphere(20, 4, 0), {"alpha": 0.0}, "alpha"),
        (_sphere(20, 4, 0), {"alpha": 1.5}, "alpha"),
        (_sphere(20, 4, 0), {"n_iter": 0}, "n_iter"),
    ],
)
def test_bad_input_raises(x: np.ndarray, kwargs: dict, match: str) -> None:
    with pytest.raises(ValueError, match=match):
        run_pic(x, **kwargs)


def test_non_finite_rows_are_counted() -> None:
    x = _sphere(20, 4, 0)
    x[3, 1] = np.nan
    x[7, 0] = np.inf
    x[7, 2] = np.nan
    with pytest.raises(ValueError, match=r"NaN or Inf.* 2 of 20 rows"):
        run_pic(x)
    with pytest.raises(ValueError, match="NaN"):
        knn_graph(x)


def test_knn_graph_validates_too() -> None:
    with pytest.raises(ValueError, match="n_neighbors"):
        knn_graph(_sphere(5, 3, 0), n_neighbors=5)
    with pytest.raises(ValueError, match="sigma"):
        knn_graph(_sphere(5, 3, 0), n_neighbors=2, sigma=0)


def test_collapse_to_one_cluster_warns(caplog: pytest.LogCaptureFixture) -> None:
    x = np.ones((20, 3), dtype=np.float32)
    with caplog.at_level("WARNING", logger="deepcluster.clustering.pic"):
        with pytest.warns(RuntimeWarning, match=r"single cluster.*smaller sigma.*sigma=0\.1"):
            res = run_pic(x, n_neighbors=3, sigma=0.2)
    assert res.num_clusters == 1
    np.testing.assert_array_equal(res.assignments, 0)
    assert any("single cluster" in r.getMessage() for r in caplog.records)

    # A normal result does not warn.
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        assert run_pic(_sphere(100, 8, 0)).num_clusters > 1
