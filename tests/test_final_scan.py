"""Tests for SCAN on frozen features (``deepcluster.clustering.scan``, method ``scan``).

The data, helpers and result contract are those of ``test_final_clustering.py``. The
SCAN loss is checked against a value computed by hand; the method is checked to be a
function of the features and the seed only (it takes no labels).
"""

from __future__ import annotations

import inspect
import math

import numpy as np
import pytest
import torch
from sklearn.metrics import adjusted_rand_score
from test_final_clustering import _blobs, _brute_knn, _check_result, _moons, _unit

from deepcluster.clustering import FINAL_METHODS, FinalClusteringError, final_clustering
from deepcluster.clustering import scan as S


def test_scan_loss_against_hand_computation():
    pa = torch.tensor([[0.5, 0.5], [0.9, 0.1]], dtype=torch.float64)
    pn = torch.tensor([[0.5, 0.5], [0.8, 0.2]], dtype=torch.float64)
    total, cons, ent = S.scan_loss(pa, pn, entropy_weight=5.0)
    # <p_i, p_j> = 0.5 and 0.9 * 0.8 + 0.1 * 0.2 = 0.74; mean anchor prediction (0.7, 0.3).
    ref_cons = -(math.log(0.5) + math.log(0.74)) / 2
    ref_ent = -(0.7 * math.log(0.7) + 0.3 * math.log(0.3))
    assert cons.item() == pytest.approx(ref_cons, abs=1e-12) and ref_cons == pytest.approx(0.497126, abs=1e-6)
    assert ent.item() == pytest.approx(ref_ent, abs=1e-12) and ref_ent == pytest.approx(0.610864, abs=1e-6)
    assert total.item() == pytest.approx(ref_cons - 5.0 * ref_ent, abs=1e-12)
    # A collapsed, agreeing batch: no consistency cost, no entropy; disjoint predictions hit the clamp.
    one = torch.tensor([[1.0, 0.0], [1.0, 0.0]])
    assert [v.item() for v in S.scan_loss(one, one)] == pytest.approx([0.0, 0.0, 0.0], abs=1e-6)
    assert S.scan_loss(one, one.flip(1))[1].item() == pytest.approx(-math.log(1e-8), rel=1e-6)


def test_head_choice_loss_is_the_scan_loss_over_all_neighbour_pairs():
    rng = np.random.default_rng(0)
    x = torch.from_numpy(rng.standard_normal((50, 6)).astype(np.float32))
    nbrs = torch.from_numpy(_brute_knn(x.numpy(), 4))
    torch.manual_seed(0)
    model = S.ScanHeads(6, 3, n_heads=2)
    got = S._head_losses(model, x, nbrs, 5.0)
    for head, value in zip(model.heads, got):
        logits = x.double().numpy() @ head.weight.detach().double().numpy().T + head.bias.detach().double().numpy()
        p = np.exp(logits - logits.max(1, keepdims=True))
        p /= p.sum(1, keepdims=True)
        pairs = [(i, j) for i in range(50) for j in nbrs[i].tolist()]  # every row with each of its 4 neighbours
        cons = -np.mean([math.log(max(p[i] @ p[j], 1e-8)) for i, j in pairs])
        mean = p.mean(0)
        assert value == pytest.approx(cons + 5.0 * float((mean * np.log(mean)).sum()), abs=1e-5)


def test_separated_blobs_recovered_and_contract():
    x, labels = _blobs()
    res = final_clustering(x, 5, "scan", seed=0)
    _check_result(res, x, 5)
    assert res.method == "scan" and FINAL_METHODS["scan"] is S.final_scan
    assert adjusted_rand_score(labels, res.assignments) >= 0.99
    assert res.info["head"] == int(np.argmin(res.info["head_losses"])) and len(res.info["head_losses"]) == S.SCAN_HEADS
    # Blobs this far apart: every row's kept head is near-certain, and consistent with its neighbours.
    assert res.info["confident_after"] >= 0.9 * x.shape[0]
    nbrs = _brute_knn(_unit(x), S.SCAN_NEIGHBORS)
    assert (res.assignments[nbrs] == res.assignments[:, None]).mean() > 0.95


def test_two_moons_are_beyond_linear_heads():
    # SCAN is a neighbour-consistency objective on a classifier of the rows; linear heads
    # cannot draw the moons' boundary (documented in docs/CLUSTERS.md).
    x, labels = _moons()
    assert adjusted_rand_score(labels, S.final_scan(x, 2, 0).assignments) < 0.6


def test_takes_no_labels_and_is_a_function_of_features_and_seed():
    params = set(inspect.signature(S.final_scan).parameters)
    assert not params & {"labels", "y", "targets", "target", "classes"}
    x, _ = _blobs(n_per=40, k=4, noise=0.2, seed=3)
    before = torch.get_rng_state()
    torch.manual_seed(123)  # the global stream must neither matter nor be consumed
    a = S.final_scan(x, 4, 7, epochs=20, selflabel_epochs=5)
    expected = torch.rand(3)
    torch.manual_seed(456)
    b = S.final_scan(x, 4, 7, epochs=20, selflabel_epochs=5)
    torch.manual_seed(123)
    np.testing.assert_array_equal(torch.rand(3).numpy(), expected.numpy())
    torch.set_rng_state(before)
    np.testing.assert_array_equal(a.assignments, b.assignments)
    np.testing.assert_array_equal(a.confidence, b.confidence)
    c = S.final_scan(x, 4, 8, epochs=20, selflabel_epochs=5)  # the seed does drive it
    assert not np.array_equal(a.confidence, c.confidence)


def test_self_labelling_trains_on_confident_rows_only():
    x, _ = _blobs(n_per=40, k=4, noise=0.3, seed=5)
    kept = S.final_scan(x, 4, 0, epochs=30, selflabel_epochs=0)
    none_confident = S.final_scan(x, 4, 0, epochs=30, selflabel_epochs=10, threshold=1.0)
    np.testing.assert_array_equal(kept.assignments, none_confident.assignments)
    np.testing.assert_allclose(kept.confidence, none_confident.confidence, rtol=0, atol=0)
    trained = S.final_scan(x, 4, 0, epochs=30, selflabel_epochs=10, threshold=0.5)
    assert trained.info["confident_before"] == int((kept.confidence > 0.5).sum())  # same SCAN step before it
    assert not np.array_equal(trained.confidence, kept.confidence)  # it did train: the head moved


def test_strong_view_is_dropout_plus_noise():
    torch.manual_seed(0)
    x = torch.ones(200, 500)
    v = S._strong(x)
    dropped = (v.abs() < 0.6).float().mean().item()  # kept coordinates are 2 + noise, dropped ones noise
    assert dropped == pytest.approx(S.STRONG_DROPOUT, abs=0.01)
    noise = v[v.abs() < 0.6]
    assert noise.std().item() == pytest.approx(S.STRONG_NOISE, rel=0.05)


@pytest.mark.parametrize("opts, match", [
    ({"epochs": 0}, r"scan: epochs must be an integer >= 1, got 0"),
    ({"n_heads": True}, r"scan: n_heads must be an integer >= 1, got True"),
    ({"selflabel_epochs": -1}, r"scan: selflabel_epochs must be an integer >= 0"),
    ({"threshold": 1.5}, r"scan: threshold must be in \[0, 1\]"),
    ({"threshold": "high"}, r"scan: threshold must be in \[0, 1\], got 'high'"),
    ({"entropy_weight": float("nan")}, r"scan: entropy_weight must be a finite number >= 0"),
    ({"labels": np.zeros(10)}, r"unknown option\(s\) \['labels'\]"),
])
def test_bad_options_are_one_line_errors(opts, match):
    x, _ = _blobs(n_per=5, k=2)
    with pytest.raises(FinalClusteringError, match=match) as e:
        final_clustering(x, 2, "scan", **opts)
    assert "\n" not in str(e.value)
