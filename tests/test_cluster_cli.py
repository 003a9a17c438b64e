"""End to end: ``deepcluster cluster RUN --k K`` on a tiny run: the CSV, its agreement
with the method run on the same features, ``merge`` of the run's own clusters, errors."""

import csv

import numpy as np
import pytest

from conftest import train_tiny
from deepcluster.cli import main
from deepcluster.clustering import final_clustering
from deepcluster.eval import open_checkpoint


@pytest.fixture(scope="module")
def tiny_run(tiny_mnist_root, tmp_path_factory):
    return train_tiny(tiny_mnist_root, tmp_path_factory.mktemp("cluster") / "run")


def _rows(path):
    with open(path, newline="") as f:
        return list(csv.DictReader(f))


def test_cluster_csv_matches_the_method_on_the_run_features(tiny_run, tmp_path):
    out = tmp_path / "groups.csv"
    assert main(["cluster", str(tiny_run), "--k", "4", "--method", "spectral", "--workers", "0", "-o", str(out)]) == 0
    rows = _rows(out)
    assert list(rows[0]) == ["index", "image", "cluster", "confidence", "distance"] and len(rows) == 240
    assert [r["image"] for r in rows[:2]] == ["fashion-mnist[0]", "fashion-mnist[1]"]
    ctx = open_checkpoint(tiny_run, protocol="cluster", workers=0)
    x = np.asarray(ctx.store.get("train", ["fc7"])["fc7"], dtype=np.float32)
    ref = final_clustering(x, 4, "spectral", seed=0)
    np.testing.assert_array_equal([int(r["cluster"]) for r in rows], ref.assignments)
    np.testing.assert_allclose([float(r["confidence"]) for r in rows], ref.confidence, rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose([float(r["distance"]) for r in rows], ref.distance, rtol=1e-5, atol=1e-6)


def test_cluster_merge_groups_whole_training_clusters(tiny_run):
    assert main(["cluster", str(tiny_run), "--k", "3", "--method", "merge", "--workers", "0"]) == 0
    rows = _rows(tiny_run / "eval" / "final-merge-k3-train.csv")
    groups = np.array([int(r["cluster"]) for r in rows])
    fine = np.load(tiny_run / "assignments.npy")[-1]
    assert np.unique(groups).size == 3
    for c in np.unique(fine):  # a training cluster is never split
        assert np.unique(groups[fine == c]).size == 1


@pytest.mark.parametrize("args, message", [
    (["--k", "0"], "--k must be >= 1"),
    (["--k", "3", "--method", "merge", "--split", "test"], "--method merge needs the images the run clustered"),
    (["--k", "3", "--method", "dbscan"], "unknown final clustering method 'dbscan'"),
    (["--k", "500"], "K=500 groups asked of only N=240 rows"),
])
def test_cluster_errors_are_one_line(tiny_run, capsys, args, message):
    assert main(["cluster", str(tiny_run), *args, "--workers", "0"]) == 1
    err = capsys.readouterr().err
    assert message in err and err.count("\n") == 1
