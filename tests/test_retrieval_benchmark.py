"""benchmarks/retrieval.py: the vectorised category mAP against the reference metric, the
photograph benchmark's ground truth, and a smoke run of ``--quick``."""

import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

from deepcluster.metrics import average_precision, mean_average_precision, rank_database
from deepcluster.retrieval import labelled_map, mac, multiscale, multiscale_many, rmac, spoc, trapezoid_ap

ROOT = Path(__file__).resolve().parents[1]


def _case(seed=0, q=30, n=200, d=8, classes=5):
    rng = np.random.default_rng(seed)
    return (rng.normal(size=(q, d)).astype(np.float32), rng.normal(size=(n, d)).astype(np.float32),
            rng.integers(0, classes, q), rng.integers(0, classes, n))


def test_trapezoid_ap_by_hand():
    # relevant at ranks 0 and 2 of 2 positives: (1 + 1)/2 + (1/2 + 2/3)/2, over 2
    assert trapezoid_ap(np.array([[True, False, True]]), np.array([2]))[0] == pytest.approx((1 + 7 / 12) / 2)
    assert trapezoid_ap(np.array([[False, True]]), np.array([1]))[0] == pytest.approx(
        average_precision(np.array([5, 7]), [7]))


@pytest.mark.parametrize("metric", ["ip", "l2"])
def test_labelled_map_at_all_equals_the_reference(metric):
    q, db, ql, dl = _case()
    scores = q @ db.T if metric == "ip" else -((q[:, None, :] - db[None]) ** 2).sum(-1)
    ref = mean_average_precision(rank_database(scores), [{"ok": np.flatnonzero(dl == c)} for c in ql])
    got = labelled_map(q, db, ql, dl, metric=metric, block=7)
    assert got["queries"] == 30 and got["map"] == pytest.approx(ref.map, abs=1e-12)


def test_labelled_map_at_k_is_ap_of_the_top_k_over_the_positives_found():
    q, db, ql, dl = _case(1)
    top = rank_database(q @ db.T)[:, :25]
    gt = [{"ok": np.intersect1d(np.flatnonzero(dl == c), t)} for c, t in zip(ql, top)]
    found = np.array([len(g["ok"]) > 0 for g in gt])
    ref = mean_average_precision(top, gt).aps  # NaN (skipped) where no positive is in the top 25
    got = labelled_map(q, db, ql, dl, top=25)["map"]
    assert got == pytest.approx(np.where(found, ref, 0.0).mean(), abs=1e-12)


def test_labelled_map_skips_queries_of_an_absent_label_and_refuses_bad_shapes():
    q, db, ql, dl = _case(2, classes=3)
    ql[:4] = 9
    assert labelled_map(q, db, ql, dl)["queries"] == 26
    with pytest.raises(ValueError, match="must be"):
        labelled_map(q, db[:, :4], ql, dl)
    with pytest.raises(ValueError, match="metric"):
        labelled_map(q, db, ql, dl, metric="cos")


def test_multiscale_many_equals_one_multiscale_per_descriptor():
    conv = torch.nn.Sequential(torch.nn.Conv2d(3, 6, 3, padding=1), torch.nn.ReLU())
    torch.manual_seed(0)
    x = torch.randn(2, 3, 20, 16)
    with torch.no_grad():
        many = multiscale_many(x, conv, {"rmac": rmac, "mac": mac, "spoc": spoc})
        for name, fn in (("rmac", rmac), ("mac", mac), ("spoc", spoc)):
            torch.testing.assert_close(many[name], multiscale(x, conv, fn), rtol=1e-5, atol=1e-6)


def test_photo_ground_truth_follows_the_geometry():
    sys.path.insert(0, str(ROOT / "benchmarks"))
    from retrieval_photos import PHOTOS, covered, make_benchmark

    bench = make_benchmark(0, PHOTOS[:2], 1, 2, photo_distractors=2, fmnist_distractors=0, size=32)
    views = [d for d in bench.database if d.photo in PHOTOS[:2]]
    assert len(bench.queries) == 2 and len(bench.database) == len(views) + 2
    for q, g in zip(bench.queries, bench.gnd):
        for i in g["easy"]:
            assert bench.database[i].level == "easy" and covered(bench.database[i].box, q.box) >= 0.6
        for i in g["hard"]:
            assert bench.database[i].photo == q.photo and covered(bench.database[i].box, q.box) >= 0.3
        for i in g["junk"]:
            assert bench.database[i].photo == q.photo and covered(bench.database[i].box, q.box) < 0.3
        others = set(range(len(bench.database))) - {*g["easy"], *g["hard"], *g["junk"]}
        assert all(bench.database[i].photo != q.photo for i in others)
    again = make_benchmark(0, PHOTOS[:2], 1, 2, photo_distractors=2, fmnist_distractors=0, size=32)
    assert np.array_equal(np.asarray(again.database[1].image), np.asarray(bench.database[1].image))


@pytest.mark.slow  # the benchmark script end to end
def test_quick_benchmark_writes_sane_results(tmp_path):
    out = tmp_path / "retrieval.json"
    p = subprocess.run([sys.executable, str(ROOT / "benchmarks" / "retrieval.py"), "--quick", "--out", str(out)],
                       capture_output=True, text=True, timeout=120)
    assert p.returncode == 0, p.stderr[-2000:]
    r = json.loads(out.read_text())
    assert set(r) == {"category", "instance", "duplicates", "speed"}
    for part in r.values():
        assert part["mode"] == "quick" and part["machine"] and "retrieval.py --quick" in part["command"]
    cat = r["category"]
    assert (cat["queries"], cat["database"], cat["classes"]) == (100, 500, 10)
    assert set(cat["rows"]) == {"raw pixels", "random alexnet_small (28 px) fc7", "random alexnet_small (28 px) rmac"}
    for row in cat["rows"].values():
        assert 0.1 <= row["map_all"] <= 1 and 0.1 <= row["map_1000"] <= 1  # 10 classes: chance is about 0.1
    inst = r["instance"]
    assert set(inst["rows"]) == {"raw pixels", "random alexnet (96 px)", "random alexnet_small (28 px)"}
    for name, row in inst["rows"].items():
        for feat in ("rmac", "mac", "spoc"):
            for setting in ("easy", "medium", "hard"):
                assert 0 <= row[feat][setting]["map"] <= 1 and 0 <= row[feat][setting]["mp"]["10"] <= 1
    for row in r["duplicates"]["rows"].values():
        assert all(0 <= c["precision"] <= 1 and 0 <= c["recall"] <= 1 for c in row["curve"])
        recalls = [c["recall"] for c in row["curve"]]
        assert recalls == sorted(recalls, reverse=True)  # a higher threshold never finds more pairs
    speed = r["speed"]
    assert all(e["images_per_s"] > 0 for e in speed["extraction"])
    assert speed["index"]["n"] == 2000 and 0 <= speed["index"]["ivfpq"]["recall_at_10"] <= 1
    assert "| network | input | descriptor |" in p.stdout
