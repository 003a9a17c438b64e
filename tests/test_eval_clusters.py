import numpy as np
import pytest

from deepcluster.eval import cluster_scores
from deepcluster.eval.clusters import best_kmeans


def test_cluster_scores_of_a_permuted_labelling_are_perfect():
    rng = np.random.default_rng(0)
    truth = rng.integers(0, 10, 500)
    s = cluster_scores(rng.permutation(10)[truth], truth)
    assert s == pytest.approx({"nmi": 1.0, "ari": 1.0, "acc": 1.0, "purity": 1.0})


def test_cluster_scores_reference():
    truth = np.array([0, 0, 0, 1, 1, 1])
    pred = np.array([0, 0, 1, 1, 2, 2])  # 3 clusters for 2 classes
    s = cluster_scores(pred, truth)
    assert s["acc"] == pytest.approx(4 / 6)  # one-to-one: cluster 0 -> class 0, cluster 2 -> class 1
    assert s["purity"] == pytest.approx(5 / 6)  # many-to-one: cluster 1 is half and half


def test_best_kmeans_recovers_separated_blobs():
    rng = np.random.default_rng(0)
    centers = rng.standard_normal((4, 8)) * 10
    truth = np.repeat(np.arange(4), 50)
    x = (centers[truth] + rng.standard_normal((200, 8))).astype(np.float32)
    s = cluster_scores(best_kmeans(x, 4, n_init=3, seed=0), truth)
    assert s["nmi"] == pytest.approx(1.0) and s["acc"] == 1.0
