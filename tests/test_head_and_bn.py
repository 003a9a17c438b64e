"""Two ablation options of the training loop, checked against reference computations:
``--head matched`` (the previous epoch's head carried to the matching new clusters) and
``--bn recompute`` (batch-norm statistics of the clustered, un-augmented views)."""

import itertools
import json

import numpy as np
import pytest
import torch
from torch import nn

from conftest import train_tiny
from deepcluster.checkpoint import load_checkpoint
from deepcluster.config import ConfigError, resolve
from deepcluster.data import IndexedDataset, build_source, cluster_transform, image_spec
from deepcluster.metrics import match_clusters
from deepcluster.models import create_model
from deepcluster.strategies import carry_head, recompute_bn_stats


def test_match_clusters_maximises_the_overlap_like_brute_force():
    rng = np.random.default_rng(0)
    for _ in range(20):
        old = rng.integers(0, 5, 60)
        new = np.where(rng.random(60) < 0.7, (old + 2) % 5, rng.integers(0, 5, 60))  # mostly a relabelling
        new_ids, old_ids = match_clusters(new, old)
        overlap = sum(int(((new == a) & (old == b)).sum()) for a, b in zip(new_ids, old_ids))
        ids = np.unique(new)
        assert len(ids) == len(np.unique(old)) == 5
        best = max(sum(int(((new == a) & (old == p[i])).sum()) for i, a in enumerate(ids))
                   for p in itertools.permutations(np.unique(old).tolist()))
        assert overlap == best and len(set(new_ids)) == len(new_ids) and len(set(old_ids)) == len(old_ids)
    # a pure relabelling is undone exactly; ids need not be contiguous
    old = np.array([0, 0, 1, 1, 7, 7])
    new_ids, old_ids = match_clusters(np.array([3, 3, 9, 9, 4, 4]), old)
    assert dict(zip(new_ids.tolist(), old_ids.tolist())) == {3: 0, 9: 1, 4: 7}


def test_carry_head_moves_rows_to_the_matched_clusters_and_keeps_the_rest_new():
    torch.manual_seed(0)
    old, new = nn.Linear(6, 4), nn.Linear(6, 5)
    fresh_w, fresh_b = new.weight.detach().clone(), new.bias.detach().clone()
    old_assign = np.array([0, 0, 1, 1, 2, 2, 3, 3])
    new_assign = np.array([2, 2, 0, 0, 4, 4, 1, 1])  # old 0 -> new 2, 1 -> 0, 2 -> 4, 3 -> 1; new 3 unmatched
    assert carry_head(old, new, old_assign, new_assign) == 4
    for o, n in {0: 2, 1: 0, 2: 4, 3: 1}.items():
        torch.testing.assert_close(new.weight[n], old.weight[o])
        torch.testing.assert_close(new.bias[n], old.bias[o])
    torch.testing.assert_close(new.weight[3], fresh_w[3])
    torch.testing.assert_close(new.bias[3], fresh_b[3])


def test_recompute_bn_stats_gives_the_exact_statistics_of_the_clustered_views(tiny_mnist_root):
    torch.manual_seed(0)
    model = create_model("alexnet_small", image_size=28, width=0.125, fc_dim=32, num_clusters=3)
    bn = model.features[1]  # conv1's batch norm
    bn.running_mean.fill_(5.0)  # as if training had drifted elsewhere
    source = build_source("fashion-mnist", str(tiny_mnist_root), "train", download=False)
    ds = IndexedDataset(source, cluster_transform(image_spec("fashion-mnist")))
    model.eval()
    assert recompute_bn_stats(model, ds, 50, seed=0, batch_size=16, workers=0, device=torch.device("cpu")) == 5
    assert not model.training  # mode restored
    idx = np.sort(np.random.default_rng(0).choice(len(ds), 50, replace=False))
    x = torch.stack([ds[int(i)][0] for i in idx])
    with torch.no_grad():
        a = model.features[0](model.sobel(x))  # conv1 pre-BN, all 50 images at once
    torch.testing.assert_close(bn.running_mean, a.mean((0, 2, 3)), rtol=1e-4, atol=1e-5)
    n = a.numel() / a.shape[1]
    torch.testing.assert_close(bn.running_var, a.var((0, 2, 3), unbiased=False) * n / (n - 1), rtol=1e-3, atol=1e-5)
    assert int(bn.num_batches_tracked) == 4  # 50 images in batches of 16


def test_bad_values_are_refused():
    with pytest.raises(ConfigError, match="cluster.bn"):
        resolve(overrides={"cluster": {"bn": "frozen"}})
    with pytest.raises(ConfigError, match="optim.head"):
        resolve(overrides={"optim": {"head": "kept"}})


def test_runs_with_matched_head_and_recomputed_bn(tiny_mnist_root, tmp_path):
    out = train_tiny(tiny_mnist_root, tmp_path / "run", cluster={"bn": "recompute"},
                     optim={"head": "matched", "epochs": 3})
    records = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    assert [r["head_rows_carried"] for r in records[:1]] == [None]  # nothing to carry at epoch 0
    assert all(r["head_rows_carried"] == 10 for r in records[1:])  # k = 10, every cluster matched
    assert all(np.isfinite(r["convnet_loss"]) for r in records)
    state = load_checkpoint(out)
    assert state["config"]["optim"]["head"] == "matched" and state["config"]["cluster"]["bn"] == "recompute"


def test_multi_view_training_gives_every_view_its_images_pseudo_label(tiny_mnist_root, tmp_path, monkeypatch):
    from deepcluster import optim as optim_module
    from deepcluster.data import MultiView

    views = MultiView(lambda img: torch.full((1, 2, 2), float(img)), 3)
    assert views(7).shape == (3, 1, 2, 2) and torch.equal(views(7), torch.full((3, 1, 2, 2), 7.0))
    with pytest.raises(ValueError, match="views"):
        MultiView(lambda img: img, 0)
    seen = []
    real = optim_module.pseudo_label_loss

    def spy(logits, targets, weights=None):
        seen.append((logits.shape[0], targets.clone()))
        return real(logits, targets, weights)

    monkeypatch.setattr(optim_module, "pseudo_label_loss", spy)
    out = train_tiny(tiny_mnist_root, tmp_path / "run", augment={"crops": 2}, optim={"epochs": 1, "batch_size": 16})
    assert seen and all(n == len(t) and n % 2 == 0 for n, t in seen)
    assert all(torch.equal(t[0::2], t[1::2]) for _, t in seen)  # views of one image are adjacent, same label
    # one epoch trains every image once (the sampler draws N), twice as views
    assert sum(n for n, _ in seen) == 2 * load_checkpoint(out)["meta"]["num_images"]
