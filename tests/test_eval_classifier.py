import numpy as np

from deepcluster.eval import Grid, select_and_fit, train_classifier
from deepcluster.eval.classifier import feature_stats, linear_head, top1
from deepcluster.eval.mlp import mlp_head

GRID = Grid(lrs=(0.01, 0.1), weight_decays=(0.0, 1e-3), epochs=5, batch_size=128)


def separable(n, d=40, c=4, seed=0):
    """Classes separated by a margin along random directions (linearly separable), the
    features off-centre and scaled so that standardisation matters. Returns ``(x, y)``
    with ``n`` rows; take train and test from one call so they share the directions."""
    rng = np.random.default_rng(seed)
    w = rng.standard_normal((c, d))
    x = rng.standard_normal((n * 4, d)).astype(np.float32)
    scores = x @ w.T
    top2 = np.sort(scores, 1)[:, -2:]
    keep = (top2[:, 1] - top2[:, 0]) > 0.5
    assert keep.sum() >= n
    return (x[keep][:n] * 5 + 3).astype(np.float32), scores[keep].argmax(1)[:n]


def split(n, seed=0):
    perm = np.random.default_rng(seed).permutation(n)
    return np.sort(perm[: int(0.8 * n)]), np.sort(perm[int(0.8 * n):])


def test_linear_probe_separates_a_linearly_separable_set():
    x, y = separable(4000)
    x, y, xt, yt = x[:3000], y[:3000], x[3000:], y[3000:]
    fit, val = split(len(y))
    r = select_and_fit(linear_head, x, y, fit, val, xt, yt, 4, GRID)
    assert r["test_top1"] > 0.95 and r["val_top1"] > 0.95
    assert {(g["lr"], g["weight_decay"]) for g in r["grid"]} == set(GRID.points())


def test_linear_probe_is_near_chance_on_shuffled_labels():
    rng = np.random.default_rng(0)
    x = rng.standard_normal((2000, 50)).astype(np.float32)
    y = rng.integers(0, 4, 2000)
    xt = rng.standard_normal((2000, 50)).astype(np.float32)
    yt = rng.integers(0, 4, 2000)
    fit, val = split(len(y))
    r = select_and_fit(linear_head, x, y, fit, val, xt, yt, 4, GRID)
    assert abs(r["test_top1"] - 0.25) < 0.05


def test_choice_never_looks_at_test_labels():
    x, y = separable(2000)
    x, y, xt, yt = x[:1500], y[:1500], x[1500:], y[1500:]
    fit, val = split(len(y))
    a = select_and_fit(linear_head, x, y, fit, val, xt, yt, 4, GRID)
    b = select_and_fit(linear_head, x, y, fit, val, xt, np.random.default_rng(0).permutation(yt), 4, GRID)
    assert a["grid"] == b["grid"] and (a["lr"], a["weight_decay"]) == (b["lr"], b["weight_decay"])
    assert a["val_top1"] == b["val_top1"]


def test_float16_memmap_features_train_like_float32(tmp_path):
    x, y = separable(1000)
    path = tmp_path / "x.npy"
    np.save(path, x.astype(np.float16))
    xm = np.load(path, mmap_mode="r")
    rows = np.arange(800)
    m16 = train_classifier(linear_head, xm, y, rows, 4, lr=0.1, weight_decay=0.0, epochs=5, seed=0)
    m32 = train_classifier(linear_head, x, y, rows, 4, lr=0.1, weight_decay=0.0, epochs=5, seed=0)
    test = np.arange(800, 1000)
    assert abs(top1(m16, xm, y, test) - top1(m32, x, y, test)) < 0.02


def test_feature_stats_reference():
    rng = np.random.default_rng(0)
    x = rng.standard_normal((500, 6)).astype(np.float32) * 3 + 1
    x[:, 2] = 4.0  # constant dimension: std 1, so it stays constant after standardising
    rows = np.arange(0, 500, 2)
    mean, std = feature_stats(x, rows, chunk=64)
    np.testing.assert_allclose(mean, x[rows].mean(0), rtol=1e-5, atol=1e-5)
    ref = x[rows].std(0)
    ref[2] = 1.0
    np.testing.assert_allclose(std, ref, rtol=1e-4)


def test_mlp_head_shape_and_fit():
    x, y = separable(2500)
    m = train_classifier(mlp_head(128), x, y, np.arange(2000), 4, lr=0.05, weight_decay=1e-4, epochs=10,
                         batch_size=64, seed=0)
    assert top1(m, x, y, np.arange(2000, 2500)) > 0.85
    assert len([l for l in m.inner if hasattr(l, "weight")]) == 3  # fc6, fc7, classifier
