"""``--cluster-feature projection`` (DeepCluster-v2): a trained linear projection of
ReLU(fc7), L2-normalised, is what k-means clusters and what the head reads; checked
against a reference computation and followed through training, checkpoints and eval."""

import json

import numpy as np
import pytest
import torch

from conftest import assigned_like_training, train_tiny
from deepcluster.checkpoint import CheckpointError, load_checkpoint, load_model
from deepcluster.cli import main
from deepcluster.clustering import PCAWhitening
from deepcluster.config import ConfigError, resolve
from deepcluster.eval.features import NetEncoder
from deepcluster.models import CentroidClassifier, CentroidHead, create_model
from deepcluster.train import TrainingError, train


def small(**kw):
    return create_model("alexnet_small", image_size=28, width=0.125, fc_dim=32, **kw)


def test_projection_is_the_normalised_linear_map_of_relu_fc7_and_the_head_reads_it():
    torch.manual_seed(0)
    m = small(num_clusters=7, cluster_feature="projection", projection_dim=12, head_temperature=0.25).eval()
    x = torch.randn(5, 3, 28, 28)
    with torch.no_grad():
        fc7 = m.classifier(torch.flatten(m.features(m.sobel(x)), 1))
        z = torch.relu(fc7) @ m.projection.weight.T + m.projection.bias
        z = z / z.norm(dim=1, keepdim=True)
        torch.testing.assert_close(m.forward_features(x), z)
        torch.testing.assert_close(m(x), (z @ m.head.weight.T + m.head.bias) / 0.25)
    assert m.feature_dim == m.head_dim == m.projection_dim == m.head.in_features == 12
    assert torch.allclose(m.forward_features(x).norm(dim=1), torch.ones(5))
    m.reset_head(3)
    assert m.head.in_features == 12 and m(x).shape == (5, 3)
    # without a projection nothing changes: the head reads ReLU(fc7), no temperature
    plain = small(num_clusters=7, head_temperature=0.25).eval()
    with torch.no_grad():
        torch.testing.assert_close(plain(x), plain.head(torch.relu(plain.forward_features(x))))
    assert plain.projection is None and plain.projection_dim is None


def test_projection_misuse_is_refused():
    with pytest.raises(ValueError, match="goes with cluster_feature 'projection'"):
        small(projection_dim=8)
    m = small()
    with pytest.raises(ValueError, match="does not fit this model"):
        m.cluster_feature = "projection"
    m.add_projection(8, 4)
    with pytest.raises(ValueError, match="already has a projection"):
        m.add_projection(8, 4)
    with pytest.raises(ValueError, match="does not fit this model"):
        m.cluster_feature = "fc7"
    with pytest.raises(ValueError, match="projection_dim must be >= 1"):
        small().add_projection(0, 4)
    with pytest.raises(ConfigError, match="projection_dim"):
        resolve(overrides={"model": {"projection_dim": 0}, "cluster": {"feature": "projection"}})


def test_centroid_head_on_the_projection_scores_cosines_in_the_pca_space():
    torch.manual_seed(1)
    m = small(num_clusters=5, cluster_feature="projection", projection_dim=16).eval()
    x = torch.randn(40, 3, 28, 28)
    with torch.no_grad():
        z = m.forward_features(x).numpy()
    pca = PCAWhitening(8, whiten=False).fit(z)
    centroids = np.random.default_rng(0).normal(size=(5, 8)).astype(np.float32)
    net = CentroidClassifier(m, CentroidHead(pca.mean, pca.projection, centroids, temperature=0.1)).eval()
    c = centroids / np.linalg.norm(centroids, axis=1, keepdims=True)
    with torch.no_grad():
        np.testing.assert_allclose(net(x).numpy(), pca.transform(z) @ c.T / 0.1, rtol=1e-4, atol=1e-4)
    # the projection is trained through the centroid head; the unused linear head is not in it
    names = {id(p) for p in net.parameters()}
    assert id(m.projection.weight) in names and id(m.head.weight) not in names


@pytest.fixture(scope="module")
def projection_run(tiny_mnist_root, tmp_path_factory):
    return train_tiny(tiny_mnist_root, tmp_path_factory.mktemp("proj") / "run",
                      model={"projection_dim": 24}, cluster={"feature": "projection"})


def test_the_run_clusters_and_trains_the_projection(projection_run, tiny_mnist_root, tmp_path):
    state = load_checkpoint(projection_run)
    assert state["meta"]["cluster_feature"] == "projection" and state["meta"]["projection_dim"] == 24
    model, _ = load_model(projection_run)
    assert model.projection_dim == 24 and model.head.in_features == 24
    # the PCA was fitted on the 24-d projection (pca_dim 32 clamped to 24)
    assert state["pca"]["mean"].numel() == 24 and state["pca"]["projection"].shape == (24, 24)
    # the projection moved away from its initialisation: it is trained, not a fixed random map
    fresh = train_tiny(tiny_mnist_root, tmp_path / "one", model={"projection_dim": 24},
                       cluster={"feature": "projection"}, optim={"epochs": 1})
    w0 = load_checkpoint(fresh)["model"]["projection.weight"]
    assert not torch.equal(w0, state["model"]["projection.weight"])
    records = [json.loads(line) for line in (projection_run / "metrics.jsonl").read_text().splitlines()]
    assert len(records) == 2 and all(np.isfinite(r["convnet_loss"]) for r in records)


def test_eval_defaults_to_the_projection(projection_run):
    model, _ = load_model(projection_run)
    enc = NetEncoder(model, key="t")
    assert enc.clustering_feature == "projection" and enc.dims()["projection"]["dim"] == 24
    out = enc(torch.randn(3, 3, 28, 28), ["fc7", "projection"])
    torch.testing.assert_close(out["projection"], model.project(out["fc7"]))
    assert main(["eval", "knn", "--checkpoint", str(projection_run), "--workers", "0"]) == 0
    knn = json.loads((projection_run / "eval" / "knn.json").read_text())
    assert knn["feature"] == "projection" and knn["dim"] == 24


def test_resume_with_another_projection_width_is_refused(projection_run, tiny_mnist_root):
    cfg = resolve(overrides={"data": {"root": str(tiny_mnist_root), "download": False},
                             "model": {"projection_dim": 16},
                             "cluster": {"k": 10, "pca_dim": 32, "feature": "projection"},
                             "optim": {"epochs": 3, "batch_size": 64},
                             "run": {"output_dir": str(projection_run), "workers": 0, "resume": True}})
    with pytest.raises((CheckpointError, TrainingError), match="projection_dim=24"):
        train(cfg)
    assert len((projection_run / "metrics.jsonl").read_text().splitlines()) == 2


def test_training_with_projection_and_centroid_head_is_deterministic(tiny_mnist_root, tmp_path):
    def run(name):
        out = train_tiny(tiny_mnist_root, tmp_path / name, model={"width": 0.125, "fc_dim": 64, "projection_dim": 16},
                         cluster={"feature": "projection", "whiten": False},
                         optim={"head": "centroids"}, run={"deterministic": True, "seed": 1})
        return [json.loads(line)["convnet_loss"] for line in (out / "metrics.jsonl").read_text().splitlines()]

    a, b = run("a"), run("b")
    assert len(a) == 2 and all(np.isfinite(a)) and a == b
    # F.cross_entropy of cosine / 0.1 logits is bounded by 2 / 0.1 + log(k) = 22.3 for k = 10
    assert max(a) < 2 / 0.1 + np.log(10)


def test_assign_maps_training_images_to_their_projection_clusters(projection_run, tiny_mnist_root, tmp_path):
    assert assigned_like_training(projection_run, tiny_mnist_root, tmp_path) >= 0.99
