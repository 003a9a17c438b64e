import numpy as np
import pytest
import torch
from sklearn.neighbors import KNeighborsClassifier

from deepcluster.data import IndexedDataset, build_source, cluster_transform, image_spec
from deepcluster.eval import knn_classify, knn_probe
from deepcluster.models import create_model


def reference_knn(ref, ref_labels, queries, k, c, temperature):
    """Brute-force cosine k-NN in numpy: majority vote (ties: larger summed similarity)
    and exp(sim / T)-weighted vote."""
    r = ref / np.linalg.norm(ref, axis=1, keepdims=True)
    q = queries / np.linalg.norm(queries, axis=1, keepdims=True)
    sim = q @ r.T
    plain, weighted = [], []
    for row in sim:
        nn = np.argsort(-row, kind="stable")[:k]
        votes = np.bincount(ref_labels[nn], minlength=c).astype(float)
        sums = np.bincount(ref_labels[nn], weights=row[nn], minlength=c)
        best = np.flatnonzero(votes == votes.max())
        plain.append(best[np.argmax(sums[best])])
        weighted.append(np.argmax(np.bincount(ref_labels[nn], weights=np.exp(row[nn] / temperature), minlength=c)))
    return np.array(plain), np.array(weighted)


@pytest.mark.parametrize("seed", range(3))
def test_knn_matches_brute_force_reference(seed):
    rng = np.random.default_rng(seed)
    centers = rng.standard_normal((5, 16))
    labels = rng.integers(0, 5, 400)
    ref = (centers[labels] + 0.8 * rng.standard_normal((400, 16))).astype(np.float32)
    q_labels = rng.integers(0, 5, 150)
    queries = (centers[q_labels] + 0.8 * rng.standard_normal((150, 16))).astype(np.float32)
    plain, weighted = knn_classify(ref, labels, queries, k=20, num_classes=5, temperature=0.07, chunk=64)
    ref_plain, ref_weighted = reference_knn(ref.astype(np.float64), labels, queries.astype(np.float64), 20, 5, 0.07)
    assert (plain == ref_plain).mean() >= 0.99  # float32 vs float64 may reorder a near-tie
    assert (weighted == ref_weighted).mean() >= 0.99
    assert (plain == q_labels).mean() > 0.8


def test_knn_matches_sklearn_cosine_majority_vote():
    rng = np.random.default_rng(0)
    ref = rng.standard_normal((300, 8)).astype(np.float32)
    labels = (ref[:, 0] + 0.5 * rng.standard_normal(300) > 0).astype(np.int64)  # 2 classes, odd k: no ties
    queries = rng.standard_normal((100, 8)).astype(np.float32)
    plain, _ = knn_classify(ref, labels, queries, k=7)
    sk = KNeighborsClassifier(n_neighbors=7, metric="cosine", algorithm="brute").fit(ref, labels)
    assert (plain == sk.predict(queries)).mean() >= 0.99


def test_knn_input_errors():
    with pytest.raises(ValueError, match="must be"):
        knn_classify(np.zeros((4, 3)), np.zeros(4), np.zeros((2, 5)))
    with pytest.raises(ValueError, match="labels"):
        knn_classify(np.ones((4, 3)), np.zeros(3), np.ones((2, 3)))


def test_knn_probe_on_a_tiny_data_set_restores_train_mode(tiny_mnist_root):
    source = build_source("fashion-mnist", str(tiny_mnist_root), "train", download=False)
    ds = IndexedDataset(source, cluster_transform(image_spec("fashion-mnist")))
    torch.manual_seed(0)
    model = create_model("alexnet_small", image_size=28, num_clusters=10).train()
    out = knn_probe(model, ds, source.labels, n_reference=100, n_query=40, batch_size=64)
    assert set(out) == {"knn_top1", "knn_weighted_top1", "knn_probe_s"}
    assert 0.0 <= out["knn_top1"] <= 1.0 and model.training
    # Fewer images than asked: a 5:1 split of what there is.
    out2 = knn_probe(model, ds, source.labels, n_reference=10000, n_query=2000, batch_size=64)
    assert 0.0 <= out2["knn_top1"] <= 1.0
    # Deterministic: the same images every call.
    assert knn_probe(model, ds, source.labels, n_reference=100, n_query=40)["knn_top1"] == out["knn_top1"]
