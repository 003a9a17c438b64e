"""benchmarks/sizes.py: the verdict against the random networks' noise, and the table."""

from __future__ import annotations

import pytest

from conftest import load_benchmark


@pytest.fixture(scope="module")
def sizes():
    return load_benchmark("sizes")


def row(dc_knn, random_knn, dc_nmi, random_nmi, queries=10000):
    net = lambda knn, nmi: {"knn": knn, "nmi": nmi, "nmi_sd": 0.01, "acc": 0.6, "acc_sd": 0.02, "queries": queries}
    return {"name": "x", "images": 2000, "k": 18, "pca_dim": 40, "batch_size": 64, "lr": 0.0125, "epochs": 48,
            "train_minutes": 1.0, "deepcluster": net(dc_knn, dc_nmi),
            "random": [net(k, n) for k, n in zip(random_knn, random_nmi)]}


def test_verdict_reads_the_gap_against_the_random_networks_spread(sizes):
    # random kNN 0.78, 0.775, 0.781: sd 0.0032 is below the binomial SE sqrt(.779 * .221 / 10000) = 0.00415
    r = row(0.755, [0.78, 0.775, 0.781], 0.616, [0.543, 0.548, 0.551])
    v = sizes.verdict(r)
    assert v["knn"]["random_mean"] == pytest.approx(0.7787, abs=1e-4)
    assert v["knn"]["noise"] == pytest.approx((0.7787 * 0.2213 / 10000) ** 0.5, rel=1e-3)
    assert v["knn"]["delta"] == pytest.approx(0.755 - 0.7787, abs=1e-4) and not v["knn_ok"]
    assert v["nmi"]["delta"] == pytest.approx(0.616 - 0.5473, abs=1e-4) and v["nmi_ok"]
    # within two noise units below is "not below"; few queries widen the noise (360: SE 0.010)
    assert sizes.verdict(row(0.775, [0.78, 0.775, 0.781], 0.5, [0.543, 0.548, 0.551]))["knn_ok"]
    assert sizes.verdict(row(0.945, [0.955, 0.964, 0.967], 0.7, [0.7, 0.66, 0.68], queries=360))["knn_ok"]
    assert not sizes.verdict(row(0.9, [0.9, 0.9, 0.9], 0.5, [0.6, 0.6, 0.6]))["nmi_ok"]


def test_table_has_one_line_per_size_with_the_verdicts(sizes):
    rows = [row(0.755, [0.78, 0.775, 0.781], 0.616, [0.543, 0.548, 0.551]), row(0.881, [0.846, 0.857, 0.847], 0.63,
                                                                                  [0.569, 0.547, 0.519])]
    for r in rows:
        r["verdict"] = sizes.verdict(r)
    lines = sizes.table(rows).splitlines()
    assert len(lines) == 4 and "NO (-2.4)" in lines[2] and "yes (+3.1)" in lines[3]
    assert "18 / 40 / 64 / 0.0125 / 48" in lines[2]


def test_few_queries_widen_the_noise(sizes):
    # the same 1.7-point gap: beyond the noise with 10,000 queries, within it with 360
    assert not sizes.verdict(row(0.945, [0.955, 0.964, 0.967], 0.7, [0.7, 0.66, 0.68]))["knn_ok"]
    assert sizes.verdict(row(0.945, [0.955, 0.964, 0.967], 0.7, [0.7, 0.66, 0.68], queries=360))["knn_ok"]
