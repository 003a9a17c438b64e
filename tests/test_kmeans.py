import faiss
import numpy as np
import pytest
import torch

from deepcluster.clustering import kmeans, split_empty_clusters
from deepcluster.metrics import nmi


def blobs(n_per=200, k=5, d=8, seed=0, spread=0.05):
    rng = np.random.default_rng(seed)
    centers = rng.standard_normal((k, d)) * 3
    x = np.concatenate([c + spread * rng.standard_normal((n_per, d)) for c in centers]).astype(np.float32)
    return x, np.repeat(np.arange(k), n_per)


@pytest.mark.parametrize("backend", ["faiss", "torch"])
def test_recovers_blobs(backend):
    x, y = blobs()
    # Lloyd's algorithm only finds a local minimum: the best of a few seeds (by loss) must
    # recover the blobs exactly.
    res = min((kmeans(x, 5, niter=20, seed=s, backend=backend) for s in range(5)), key=lambda r: r.loss)
    assert nmi(res.assignments, y) > 0.99
    assert res.sizes.sum() == len(x) and (res.sizes > 0).all()
    # loss is the mean squared distance to the assigned centroid
    ref = ((x - res.centroids[res.assignments]) ** 2).sum(1).mean()
    assert res.loss == pytest.approx(ref, rel=1e-4)


def test_faiss_and_torch_backends_agree_from_same_init():
    rng = np.random.default_rng(1)
    x = rng.standard_normal((3000, 16)).astype(np.float32)
    init = x[rng.choice(3000, 30, replace=False)]
    a = kmeans(x, 30, niter=10, seed=4, backend="faiss", init_centroids=init)
    b = kmeans(x, 30, niter=10, seed=4, backend="torch", init_centroids=init)
    np.testing.assert_array_equal(a.assignments, b.assignments)
    np.testing.assert_allclose(a.centroids, b.centroids, atol=1e-4)


def test_objective_close_to_bare_faiss():
    rng = np.random.default_rng(2)
    x = rng.standard_normal((5000, 32)).astype(np.float32)
    ours = [kmeans(x, 50, niter=20, seed=s).loss for s in range(3)]
    ref = []
    for s in range(3):
        km = faiss.Kmeans(32, 50, niter=20, seed=s, max_points_per_centroid=10**7)
        km.train(x)
        d, _ = km.index.search(x, 1)
        ref.append(d.mean())
    assert np.mean(ours) == pytest.approx(np.mean(ref), rel=0.01)


def test_empty_cluster_is_reseeded_from_a_donor_and_points_split():
    x, _ = blobs(n_per=100, k=2, d=4, spread=0.5)
    # Cluster 2's centroid is far from every point: it would stay empty.
    init = np.stack([x[0], x[150], np.full(4, 1e3, dtype=np.float32)])
    res = kmeans(x, 3, niter=5, seed=0, init_centroids=init)
    assert res.n_empty_fixed >= 1
    assert (res.sizes > 0).all() and res.sizes.sum() == 200
    assert np.abs(res.centroids).max() < 100  # the far centroid was replaced


def test_split_rule_directly():
    rng = np.random.default_rng(0)
    x = torch.from_numpy(rng.standard_normal((100, 3)).astype(np.float32))
    labels = torch.zeros(100, dtype=torch.int64)
    labels[90:] = 1
    centroids = torch.stack([x[:90].mean(0), x[90:].mean(0), torch.full((3,), 50.0)])
    counts = torch.tensor([90.0, 10.0, 0.0], dtype=torch.float64)
    n = split_empty_clusters(x, labels, centroids, counts, np.random.default_rng(0))
    assert n == 1
    assert counts.tolist()[2] > 0 and counts.sum() == 100
    assert torch.bincount(labels, minlength=3).tolist() == counts.long().tolist()
    # the new centroid and its donor are the means of their points
    for c in range(3):
        torch.testing.assert_close(centroids[c], x[labels == c].mean(0))


def test_identical_points_still_give_no_empty_cluster():
    x = np.zeros((10, 4), dtype=np.float32)
    res = kmeans(x, 3, niter=3, seed=0)
    assert (np.bincount(res.assignments, minlength=3) > 0).all()


def test_bad_input():
    x = np.random.default_rng(0).standard_normal((10, 4)).astype(np.float32)
    with pytest.raises(ValueError, match="larger than the number of points"):
        kmeans(x, 11)
    with pytest.raises(ValueError, match="backend"):
        kmeans(x, 2, backend="sklearn")
    x[2, 1] = np.inf
    with pytest.raises(ValueError, match="NaN or Inf in 1 rows"):
        kmeans(x, 2)


def test_stopping_at_a_fixed_point_returns_what_all_iterations_would():
    x, _ = blobs(n_per=100, k=4, d=6, spread=0.3)
    short = kmeans(x, 4, niter=30, seed=1, backend="torch")
    assert short.iterations < 30  # converged: no assignment changed
    long = kmeans(x, 4, niter=300, seed=1, backend="torch")
    np.testing.assert_array_equal(short.assignments, long.assignments)
    np.testing.assert_array_equal(short.centroids, long.centroids)
    assert short.iterations == long.iterations


def test_global_row_numbers_pick_the_same_start_whatever_the_row_order():
    """``indices`` names each row's global number: a shuffled copy of the data with its
    original row numbers clusters exactly like the original (the distributed init)."""
    x, _ = blobs(n_per=50, k=5, d=4, spread=0.4)
    perm = np.random.default_rng(3).permutation(len(x))
    for backend in ("faiss", "torch"):
        ref = kmeans(x, 5, niter=10, seed=7, backend=backend)
        got = kmeans(x[perm], 5, niter=10, seed=7, backend=backend, indices=perm)
        np.testing.assert_array_equal(got.assignments, ref.assignments[perm])
        np.testing.assert_allclose(got.centroids, ref.centroids, atol=1e-5)
    with pytest.raises(ValueError, match="duplicates"):
        kmeans(x, 5, indices=np.zeros(len(x), dtype=np.int64))


def test_float16_points_are_read_in_chunks_by_the_torch_backend():
    x, y = blobs(n_per=100, k=5, d=8)
    init = x[[0, 100, 200, 300, 400]]
    a = kmeans(x, 5, niter=10, seed=0, backend="torch", init_centroids=init)
    b = kmeans(x.astype(np.float16), 5, niter=10, seed=0, backend="torch", init_centroids=init)
    np.testing.assert_array_equal(a.assignments, b.assignments)
    np.testing.assert_allclose(a.centroids, b.centroids, atol=5e-3)
    assert b.loss == pytest.approx(a.loss, rel=0.05, abs=1e-3)
