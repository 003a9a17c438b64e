"""The DeepCluster-v2 classifier (``--head centroids``): checked against the k-means
assignment it stands for, and trained end to end through the real loop."""

import json

import numpy as np
import pytest
import torch

from conftest import train_tiny
from deepcluster.clustering import PCAWhitening, kmeans
from deepcluster.models import CentroidClassifier, CentroidHead, create_model


def test_logits_are_cosines_to_the_centroids_in_the_clustering_space():
    rng = np.random.default_rng(0)
    f = rng.normal(size=(500, 64)).astype(np.float32) @ rng.normal(size=(64, 64)).astype(np.float32)
    pca = PCAWhitening(16, whiten=True).fit(f)
    x = pca.transform(f)  # what k-means sees: whitened, L2-normalised
    res = kmeans(x, 8, niter=20, seed=0)
    head = CentroidHead(pca.mean, pca.projection, res.centroids, temperature=0.5)
    logits = head(torch.from_numpy(f)).numpy()
    c = res.centroids / np.linalg.norm(res.centroids, axis=1, keepdims=True)
    np.testing.assert_allclose(logits, x @ c.T / 0.5, rtol=1e-4, atol=1e-4)
    # argmax of cosine to normalised centroids = the k-means assignment for almost all points
    assert (logits.argmax(1) == res.assignments).mean() > 0.95
    # fixed: nothing to train in the head itself
    assert list(head.parameters()) == [] and head.num_clusters == 8


def test_bad_shapes_and_temperature_are_errors():
    with pytest.raises(ValueError, match="do not fit together"):
        CentroidHead(np.zeros(10), np.zeros((10, 4)), np.zeros((3, 5)))
    with pytest.raises(ValueError, match="temperature"):
        CentroidHead(np.zeros(10), np.zeros((10, 4)), np.ones((3, 4)), temperature=0)


def test_classifier_shares_the_networks_layers_and_trains_them():
    model = create_model("alexnet_small", num_clusters=5, width=0.125, fc_dim=32, image_size=28)
    head = CentroidHead(np.zeros(32), np.eye(32, 8), np.eye(5, 8))
    net = CentroidClassifier(model, head)
    assert {id(p) for p in net.parameters()} == {id(p) for n, p in model.named_parameters()
                                                  if not n.startswith("head.")}
    x = torch.randn(4, 3, 28, 28)
    model.eval()
    torch.testing.assert_close(net.eval()(x), head(model.forward_features(x)))
    loss = torch.nn.functional.cross_entropy(net.train()(x), torch.tensor([0, 1, 2, 3]))
    loss.backward()
    assert model.features[0].weight.grad is not None and model.head.weight.grad is None


def test_training_with_centroid_head_runs_and_is_deterministic(tiny_mnist_root, tmp_path):
    def run(name):
        out = train_tiny(tiny_mnist_root, tmp_path / name, model={"width": 0.125, "fc_dim": 64},
                         cluster={"pca_dim": 16}, optim={"head": "centroids"}, run={"deterministic": True, "seed": 1})
        return [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]

    a, b = run("a"), run("b")
    assert len(a) == 2 and all(np.isfinite(r["convnet_loss"]) for r in a)
    assert [r["convnet_loss"] for r in a] == [r["convnet_loss"] for r in b]
    assert [r["nmi_labels"] for r in a] == [r["nmi_labels"] for r in b]
