import json
import subprocess
import sys

import numpy as np
import pytest
import torch

from deepcluster.checkpoint import CheckpointError, load_checkpoint
from deepcluster.config import resolve
from deepcluster.data import DataError
from deepcluster.monitor import default_callbacks
from deepcluster.rundir import RunDirError
from deepcluster.train import TrainingError, train


def tiny_cfg(root, out, **over):
    o = {
        "data": {"root": str(root), "download": False},
        "cluster": {"k": 10, "pca_dim": 32},
        "optim": {"epochs": 2, "batch_size": 64},
        "run": {"output_dir": str(out), "workers": 0, "deterministic": True, "seed": 1},
    }
    for sec, vals in over.items():
        o.setdefault(sec, {}).update(vals)
    return resolve(overrides=o)


def test_end_to_end_two_epochs_writes_the_run_directory(tiny_mnist_root, tmp_path):
    out = tmp_path / "run"
    cfg = tiny_cfg(tiny_mnist_root, out)
    last = train(cfg, callbacks=default_callbacks(cfg))  # as the CLI wires them (nmi.png)
    for name in ("config.yaml", "metrics.jsonl", "checkpoint.pt", "assignments.npy", "nmi.png", "train.log"):
        assert (out / name).exists(), name
    assert not (out / "run.lock").exists()
    records = [json.loads(l) for l in (out / "metrics.jsonl").read_text().splitlines()]
    assert [r["epoch"] for r in records] == [0, 1]
    r = records[1]
    for key in ("convnet_loss", "clustering_loss", "nmi_prev", "nmi_labels", "cluster_size_min",
                "cluster_size_median", "cluster_size_max", "empty_clusters", "extract_s", "pca_s",
                "kmeans_s", "train_s", "images_per_s"):
        assert r[key] is not None, key
    assert records[0]["nmi_prev"] is None and 0 <= r["nmi_labels"] <= 1
    assert np.isfinite(r["convnet_loss"]) and r["empty_clusters"] == 0
    hist = np.load(out / "assignments.npy")
    assert hist.shape == (2, 240) and hist.dtype == np.int32 and hist.max() < 10
    state = load_checkpoint(out)
    assert state["epoch"] == 2 and state["meta"]["k"] == 10
    assert state["meta"]["machine"]["cores"] >= 1 and state["meta"]["machine"]["torch"] == torch.__version__
    assert state["centroids"].shape == (10, 32) and state["pca"]["projection"].shape[1] == 32
    np.testing.assert_array_equal(state["assignments"].numpy(), hist[-1:])  # the checkpoint holds the last epoch's
    assert last["epoch"] == 1


def test_resume_gives_the_same_weights_as_an_uninterrupted_run(tiny_mnist_root, tmp_path):
    straight = tmp_path / "straight"
    train(tiny_cfg(tiny_mnist_root, straight, optim={"epochs": 3}))
    resumed = tmp_path / "resumed"
    train(tiny_cfg(tiny_mnist_root, resumed, optim={"epochs": 2}))
    train(tiny_cfg(tiny_mnist_root, resumed, optim={"epochs": 3}, run={"resume": True}))
    a, b = load_checkpoint(straight), load_checkpoint(resumed)
    for k in a["model"]:
        torch.testing.assert_close(a["model"][k], b["model"][k], rtol=0, atol=0, msg=k)
    np.testing.assert_array_equal(a["assignments"].numpy(), b["assignments"].numpy())
    np.testing.assert_array_equal(np.load(straight / "assignments.npy"), np.load(resumed / "assignments.npy"))
    lines = (resumed / "metrics.jsonl").read_text().splitlines()
    assert [json.loads(l)["epoch"] for l in lines] == [0, 1, 2]


def test_bad_requests_fail_before_work_and_lose_nothing(tiny_mnist_root, tmp_path):
    out = tmp_path / "run"
    with pytest.raises(DataError, match="--k 500 is larger than the number of images"):
        train(tiny_cfg(tiny_mnist_root, out, cluster={"k": 500}))
    assert not (out / "checkpoint.pt").exists()
    train(tiny_cfg(tiny_mnist_root, out, optim={"epochs": 1}, data={"subset": 100}))
    before = (out / "checkpoint.pt").read_bytes()
    with pytest.raises(TrainingError, match="already holds a run"):
        train(tiny_cfg(tiny_mnist_root, out, data={"subset": 100}))
    with pytest.raises(CheckpointError, match="k=10.*k=12"):
        train(tiny_cfg(tiny_mnist_root, out, data={"subset": 100}, cluster={"k": 12}, run={"resume": True}))
    with pytest.raises(CheckpointError, match="arch='alexnet_small'.*arch='vgg16'"):
        train(tiny_cfg(tiny_mnist_root, out, data={"subset": 100}, model={"arch": "vgg16"},
                       run={"resume": True}))
    assert (out / "checkpoint.pt").read_bytes() == before
    if not torch.cuda.is_available():  # where a GPU exists, --device cuda is a valid request
        with pytest.raises(TrainingError, match="no CUDA GPU"):
            train(tiny_cfg(tiny_mnist_root, tmp_path / "gpu", run={"device": "cuda"}))


def run_cli(*args):
    return subprocess.run([sys.executable, "-m", "deepcluster", *args], capture_output=True, text=True, timeout=300)


def test_cli_errors_are_one_line(tiny_mnist_root, tmp_path):
    (tmp_path / "resnet.yaml").write_text("model:\n  arch: resnet\n")  # --arch itself offers only the registered
    for args, needle in [
        (["--config", str(tmp_path / "resnet.yaml")], "unknown architecture 'resnet'"),
        (["--k", "1000"], "larger than the number of images"),
        (["--data", "folder", "--data-root", str(tmp_path / "nothing")], "does not exist"),
        (["--config", str(tmp_path / "missing.yaml")], "does not exist"),
    ]:
        p = run_cli("train", "--data-root", str(tiny_mnist_root), "--output-dir", str(tmp_path / "o"), *args)
        assert p.returncode != 0
        err = [l for l in p.stderr.splitlines() if l.startswith("deepcluster: error")]
        assert len(err) == 1 and needle in err[0], p.stderr
        assert "Traceback" not in p.stderr


def test_cli_train_and_resume_with_saved_config(tiny_mnist_root, tmp_path):
    out = tmp_path / "cli"
    p = run_cli("train", "--data-root", str(tiny_mnist_root), "--output-dir", str(out), "--k", "8",
                "--epochs", "1", "--batch-size", "64", "--workers", "0", "--pca-dim", "16")
    assert p.returncode == 0, p.stderr
    p = run_cli("train", "--output-dir", str(out), "--resume", "--epochs", "2")
    assert p.returncode == 0, p.stderr
    state = load_checkpoint(out)
    assert state["epoch"] == 2 and state["meta"]["k"] == 8
    assert "k: 8" in (out / "config.yaml").read_text()


def test_a_folder_picks_its_image_size_and_a_resumed_run_keeps_it(tmp_path):
    from PIL import Image

    folder = tmp_path / "imgs"
    folder.mkdir()
    rng = np.random.default_rng(0)
    for i in range(12):
        Image.fromarray(rng.integers(0, 255, (32, 40, 3), dtype=np.uint8)).save(folder / f"{i}.png")

    def run(epochs, resume=False):
        train(resolve(overrides={"data": {"name": "folder", "root": str(folder)},
                                 "cluster": {"k": 2, "pca_dim": 4}, "optim": {"epochs": epochs, "batch_size": 8},
                                 "run": {"output_dir": str(tmp_path / "run"), "workers": 0, "resume": resume}}))
        return load_checkpoint(tmp_path / "run")["meta"]["image_size"]

    assert run(1) == 32  # the shorter side of 40 x 32 images
    assert run(2, resume=True) == 32  # a resumed run keeps the size it picked
    # Most images replaced by larger ones (same count, same names): the rows would now be
    # other pictures, so the resume is refused with one line saying what changed, and
    # nothing in the run folder is touched (issue 22).
    before = {p.name: p.read_bytes() for p in (tmp_path / "run").iterdir() if p.is_file()}
    for i in range(8):
        Image.fromarray(rng.integers(0, 255, (64, 64, 3), dtype=np.uint8)).save(folder / f"{i}.png")
    with pytest.raises(RunDirError, match="8 changed since the run started"):
        run(3, resume=True)
    assert {p.name: p.read_bytes() for p in (tmp_path / "run").iterdir() if p.is_file()} == before


def test_whiten_eps_reaches_the_training_pca(tiny_mnist_root, tmp_path):
    from conftest import train_tiny

    from deepcluster.clustering import PCAWhitening

    out = train_tiny(tiny_mnist_root, tmp_path / "run", cluster={"whiten_eps": 0.05}, optim={"epochs": 1})
    pca = PCAWhitening.from_state_dict(load_checkpoint(out)["pca"])
    assert pca.eps == 0.05
    # the saved projection divides eigenvector i by sqrt(lam_i + 0.05 lam_max): its column norms say so
    lam = pca.eigenvalues.astype(np.float64)
    np.testing.assert_allclose(np.linalg.norm(pca.projection, axis=0), 1 / np.sqrt(lam + 0.05 * lam.max()), rtol=1e-3)
