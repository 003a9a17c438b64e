"""export -> assign: the learned clusters leave the run directory and come back.

The round trip: every training image written to a folder and assigned by ``assign``
lands in the cluster ``export`` lists for it (the last epoch's k-means cluster).
"""

import csv
import logging

import numpy as np
import pytest
import torch

from conftest import train_tiny
from deepcluster.checkpoint import CheckpointError, load_checkpoint, save_checkpoint
from deepcluster.cli import main
from deepcluster.clustering import PCAWhitening, kmeans
from deepcluster.data import DataError, build_source
from deepcluster.export import ClusterAssigner, assign_images, export_run, write_table
from deepcluster.models import create_model


@pytest.fixture(scope="module")
def tiny_run(tiny_mnist_root, tmp_path_factory):
    return train_tiny(tiny_mnist_root, tmp_path_factory.mktemp("export") / "run", run={"seed": 5})


@pytest.fixture(scope="module")
def image_folder(tiny_mnist_root, tmp_path_factory):
    """The training images as PNG files named by their data-set index."""
    folder = tmp_path_factory.mktemp("images")
    source = build_source("fashion-mnist", str(tiny_mnist_root), "train", download=False)
    for i in range(len(source)):
        source.load(i).save(folder / f"{i:05d}.png")
    return folder


def _read_csv(path):
    with open(path, newline="") as f:
        return list(csv.DictReader(f))


def test_export_then_assign_round_trip(tiny_run, image_folder, tmp_path):
    out = tmp_path / "clusters.csv"
    res = export_run(tiny_run, out, "csv")
    rows = _read_csv(out)
    assert res.rows == len(rows) == 240
    assert list(rows[0]) == ["index", "label", "cluster"]
    history = np.load(tiny_run / "assignments.npy")
    exported = {int(r["index"]): int(r["cluster"]) for r in rows}
    assert [exported[i] for i in range(240)] == history[-1].tolist()

    assigned = tmp_path / "assigned.csv"
    assert main(["assign", "--checkpoint", str(tiny_run), "--images", str(image_folder), "-o", str(assigned)]) == 0
    got = _read_csv(assigned)
    assert len(got) == 240 and all(r["error"] == "" for r in got)
    same = [int(r["cluster"]) == exported[int(r["path"].rsplit("/", 1)[1][:5])] for r in got]
    assert np.mean(same) >= 0.99, f"only {np.mean(same):.1%} of the training images land in their cluster"


def test_export_features_are_the_clustering_space(tiny_run, tmp_path):
    out = tmp_path / "clusters.npy"
    res = export_run(tiny_run, out, "npy", features="pca")
    t = np.load(out, allow_pickle=False)
    assert t.dtype.names == ("index", "label", "cluster", "distance", "feature")
    state = load_checkpoint(tiny_run)
    c = state["centroids"].numpy()
    assert t["feature"].shape == (240, c.shape[1])
    np.testing.assert_allclose(np.linalg.norm(t["feature"], axis=1), 1.0, atol=1e-5)  # L2-normalised
    d2 = ((t["feature"][:, None, :] - c[None]) ** 2).sum(-1)  # (N, k)
    np.testing.assert_allclose(t["distance"], d2[np.arange(240), t["cluster"]], rtol=1e-4, atol=1e-5)
    assert res.agreement >= 0.99 and np.mean(d2.argmin(1) == t["cluster"]) >= 0.99
    res = export_run(tiny_run, tmp_path / "fc7.npy", "npy", features="fc7")
    assert np.load(tmp_path / "fc7.npy")["feature"].shape == (240, state["meta"]["fc_dim"] or 1024)


def test_parquet_export(tiny_run, tmp_path):
    pq = pytest.importorskip("pyarrow.parquet")
    export_run(tiny_run, tmp_path / "c.parquet", "parquet", features="pca")
    table = pq.read_table(tmp_path / "c.parquet")
    assert table.column_names == ["index", "label", "cluster", "distance", "feature"]
    assert len(table["feature"][0]) == 32


def test_assigner_reproduces_kmeans_on_the_same_features():
    """The nearest-centroid rule of assign is the assignment step of k-means."""
    torch.manual_seed(0)
    model = create_model("alexnet_small", image_size=28).eval()
    x = torch.randn(300, 3, 28, 28)
    with torch.no_grad():
        f = model.forward_features(x).numpy()
    pca = PCAWhitening(16).fit(f)
    km = kmeans(pca.transform(f), 7, niter=10, seed=1)
    a = ClusterAssigner(model, pca, km.centroids)
    c, d, _, z = a.assign(x)
    assert np.mean(c == km.assignments) >= 0.99
    np.testing.assert_allclose(d, ((z - km.centroids[c]) ** 2).sum(1), rtol=1e-4, atol=1e-6)


def test_unreadable_images_are_listed_not_fatal(tiny_run, image_folder, tmp_path):
    folder = tmp_path / "mixed"
    (folder / "sub").mkdir(parents=True)
    for i in (0, 1, 2):
        (folder / "sub" / f"{i:05d}.png").write_bytes((image_folder / f"{i:05d}.png").read_bytes())
    (folder / "broken.png").write_bytes(b"not an image at all")
    (folder / "empty.jpg").write_bytes(b"")
    (folder / "notes.txt").write_text("ignored: not an image extension")
    res = assign_images(tiny_run, folder)
    by_name = {p.rsplit("/", 1)[1]: (c, e) for p, c, e in zip(res.paths, res.clusters, res.columns()["error"])}
    assert set(by_name) == {"broken.png", "empty.jpg", "00000.png", "00001.png", "00002.png"}
    assert by_name["broken.png"][0] == -1 and by_name["broken.png"][1]
    assert by_name["empty.jpg"][0] == -1 and len(res.unreadable) == 2
    assert all(by_name[f"{i:05d}.png"][0] >= 0 for i in range(3))
    out = tmp_path / "a.npy"
    assert main(["assign", "--checkpoint", str(tiny_run / "checkpoint.pt"), "--images", str(folder),
                 "--format", "npy", "-o", str(out)]) == 0
    t = np.load(out)
    assert (t["cluster"] == -1).sum() == 2 and np.isnan(t["distance"][t["cluster"] == -1]).all()

    only_bad = tmp_path / "bad"
    only_bad.mkdir()
    (only_bad / "x.png").write_bytes(b"junk")
    with pytest.raises(DataError, match="none of the 1 images"):
        assign_images(tiny_run, only_bad)
    (tmp_path / "empty").mkdir()
    with pytest.raises(DataError, match="no images"):
        assign_images(tiny_run, tmp_path / "empty")
    with pytest.raises(DataError, match="does not exist"):
        assign_images(tiny_run, tmp_path / "nowhere")


def test_checkpoint_without_centroids_is_refused(tiny_run, image_folder, tmp_path, capsys):
    state = load_checkpoint(tiny_run)
    del state["centroids"]
    save_checkpoint(state, tmp_path / "old.pt")
    with pytest.raises(CheckpointError, match="no stored centroids"):
        assign_images(tmp_path / "old.pt", image_folder)
    assert main(["assign", "--checkpoint", str(tmp_path / "old.pt"), "--images", str(image_folder)]) == 1
    err = capsys.readouterr().err
    assert err.startswith("deepcluster: error:") and "no stored centroids" in err


def test_checkpoint_without_cluster_model_falls_back_with_a_warning(tiny_run, image_folder, tmp_path, caplog):
    state = load_checkpoint(tiny_run)
    del state["cluster_model"]
    save_checkpoint(state, tmp_path / "older.pt")
    with caplog.at_level(logging.WARNING, logger="deepcluster"):
        res = assign_images(tmp_path / "older.pt", image_folder / "00000.png")
    assert res.clusters.shape == (1,) and 0 <= res.clusters[0] < 10
    assert "no cluster_model" in caplog.text


def test_export_bad_input(tiny_run, tmp_path, capsys):
    blocker = tmp_path / "file"
    blocker.write_text("x")
    with pytest.raises(ValueError, match="not writable"):
        export_run(tiny_run, blocker / "out.csv")
    with pytest.raises(ValueError, match="is a directory"):
        export_run(tiny_run, tmp_path)
    with pytest.raises(ValueError, match="unknown format"):
        export_run(tiny_run, tmp_path / "x.xls", "xls")
    with pytest.raises(ValueError, match="does not exist"):
        export_run(tmp_path / "no-run")
    assert main(["export", str(tiny_run), "-o", "-"]) == 0
    lines = capsys.readouterr().out.splitlines()
    assert lines[0] == "index,label,cluster" and len(lines) == 241


def test_write_table_csv_expands_features(tmp_path):
    write_table({"path": ["a.png", "b,c.png"], "cluster": np.array([3, 1]),
                 "feature": np.array([[0.5, 1.0], [2.0, -1.0]], dtype=np.float32)}, tmp_path / "t.csv", "csv")
    rows = _read_csv(tmp_path / "t.csv")
    assert rows == [{"path": "a.png", "cluster": "3", "f0": "0.5", "f1": "1"},
                    {"path": "b,c.png", "cluster": "1", "f0": "2", "f1": "-1"}]
    with pytest.raises(ValueError, match="differ in length"):
        write_table({"a": [1], "b": [1, 2]}, tmp_path / "u.csv", "csv")


def test_cli_choices_match_the_library():
    from deepcluster import export as lib
    from deepcluster.cli import assign as cli_assign
    from deepcluster.cli import export as cli_export

    assert cli_export.FORMATS == cli_assign.FORMATS == lib.FORMATS
    assert cli_export.FEATURE_KINDS == cli_assign.FEATURE_KINDS == lib.FEATURE_KINDS
