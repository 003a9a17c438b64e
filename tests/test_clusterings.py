"""``cluster.clusterings``: several k-means runs per epoch, one new head each, the loss
averaged over heads (DeepCluster-v2's several clusterings)."""

import json

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from conftest import train_tiny
from deepcluster.checkpoint import load_model
from deepcluster.config import ConfigError, resolve
from deepcluster.strategies import choose_head
from deepcluster.models import MultiHeadClassifier, create_model
from deepcluster.optim import pseudo_label_loss


def test_the_loss_is_the_mean_of_each_heads_cross_entropy():
    gen = torch.Generator().manual_seed(0)
    logits = torch.randn(3, 8, 5, generator=gen)
    targets = torch.randint(0, 5, (8, 3), generator=gen)
    weights = torch.rand(3, 5, generator=gen) + 0.5
    by_hand = sum(F.cross_entropy(logits[j], targets[:, j]) for j in range(3)) / 3
    assert pseudo_label_loss(logits, targets).item() == pytest.approx(by_hand.item(), rel=1e-6)
    by_hand_w = sum(F.cross_entropy(logits[j], targets[:, j], weight=weights[j]) for j in range(3)) / 3
    assert pseudo_label_loss(logits, targets, weights).item() == pytest.approx(by_hand_w.item(), rel=1e-6)
    # one clustering: plain cross-entropy, as before
    assert pseudo_label_loss(logits[0], targets[:, 0]).item() == pytest.approx(
        F.cross_entropy(logits[0], targets[:, 0]).item(), rel=1e-6)


def test_the_heads_share_fc7_and_the_first_is_the_models_own():
    torch.manual_seed(0)
    model = create_model("alexnet_small", num_clusters=7, image_size=28, dropout=0.0).eval()
    extra = [model.new_head(7, generator=torch.Generator().manual_seed(i)) for i in range(2)]
    net = MultiHeadClassifier(model, extra)
    x = torch.rand(4, 3, 28, 28)
    with torch.no_grad():
        out = net(x)
        h = torch.relu(model.forward_fc7(x))
        assert out.shape == (3, 4, 7)
        torch.testing.assert_close(out[0], model(x))
        for j, head in enumerate(extra, 1):
            torch.testing.assert_close(out[j], head(h))
    assert not torch.equal(extra[0].weight, extra[1].weight)
    assert extra[0].weight.std().item() == pytest.approx(0.01, rel=0.1)  # the paper's N(0, 0.01)


def test_settings_that_cannot_combine_are_refused():
    assert resolve(overrides={"cluster": {"clusterings": 3}}).cluster.clusterings == 3
    with pytest.raises(ConfigError, match="cluster.clusterings must be >= 1"):
        resolve(overrides={"cluster": {"clusterings": 0}})
    with pytest.raises(ConfigError, match="needs cluster.method kmeans"):
        resolve(overrides={"cluster": {"clusterings": 2, "method": "pic"}})
    with pytest.raises(ConfigError, match="needs optim.head random"):  # refused where the head seam is chosen
        choose_head(resolve(overrides={"cluster": {"clusterings": 2}, "optim": {"head": "centroids"}}))


def test_a_run_with_three_clusterings_trains_every_head(tiny_mnist_root, tmp_path, monkeypatch):
    import deepcluster.optim as optim_mod
    import deepcluster.train as train_mod

    seen = []
    real_cluster = train_mod.cluster_shards

    def spy(x, indices, num_images, cfg, seed, device=None):
        seen.append(seed)
        return real_cluster(x, indices, num_images, cfg, seed, device)

    real_loss = optim_mod.pseudo_label_loss
    shapes = []

    def loss_spy(logits, targets, weights=None):
        shapes.append((tuple(logits.shape), tuple(targets.shape), None if weights is None else tuple(weights.shape)))
        return real_loss(logits, targets, weights)

    monkeypatch.setattr(train_mod, "cluster_shards", spy)
    monkeypatch.setattr(optim_mod, "pseudo_label_loss", loss_spy)
    run = train_tiny(tiny_mnist_root, tmp_path / "run", cluster={"clusterings": 3},
                     optim={"balance": "weight", "epochs": 2})
    assert len(seen) == 6 and len(set(seen)) == 6  # 3 k-means per epoch, every one with its own seed
    (logits_shape, target_shape, weight_shape) = shapes[0]
    assert logits_shape[0] == 3 and logits_shape[2] == 10 and target_shape[1] == 3 and weight_shape == (3, 10)
    records = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    assert all(0.0 <= r["nmi_clusterings"] <= 1.0 and np.isfinite(r["convnet_loss"]) for r in records)
    model, state = load_model(run)  # the checkpoint holds the first clustering's head only
    assert model.num_clusters == 10 and not any(k.startswith("extra_heads") for k in state["model"])


def test_one_clustering_with_loss_weights_trains_on_a_k_vector(tiny_mnist_root, tmp_path, monkeypatch):
    import deepcluster.optim as optim_mod
    import deepcluster.train as train_mod

    real_loss = optim_mod.pseudo_label_loss
    shapes = []

    def loss_spy(logits, targets, weights=None):
        shapes.append((tuple(logits.shape), tuple(targets.shape), tuple(weights.shape)))
        return real_loss(logits, targets, weights)

    monkeypatch.setattr(optim_mod, "pseudo_label_loss", loss_spy)
    train_tiny(tiny_mnist_root, tmp_path / "run", optim={"balance": "weight", "epochs": 1})
    logits_shape, target_shape, weight_shape = shapes[0]
    assert len(logits_shape) == 2 and logits_shape[1] == 10 and len(target_shape) == 1 and weight_shape == (10,)
