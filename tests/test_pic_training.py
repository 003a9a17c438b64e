"""`deepcluster train --clustering pic` end to end: the head follows the number of
clusters PIC finds each epoch, the count is logged, resume works, and the two doc
scripts that compare PIC with k-means read such runs."""

import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from conftest import train_tiny
from deepcluster.checkpoint import load_checkpoint

ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def runs(tiny_mnist_root, tmp_path_factory):
    base = tmp_path_factory.mktemp("pic-train")
    kmeans_run = train_tiny(tiny_mnist_root, base / "kmeans")
    pic_run = train_tiny(tiny_mnist_root, base / "pic", cluster={"method": "pic"})
    return kmeans_run, pic_run


def test_the_head_follows_the_number_of_clusters_pic_finds(runs):
    _, pic_run = runs
    records = [json.loads(line) for line in (pic_run / "metrics.jsonl").read_text().splitlines()]
    hist = np.load(pic_run / "assignments.npy")
    assert len(records) == 2 and hist.shape == (2, 240)
    for r, a in zip(records, hist):
        n = r["num_clusters"]
        assert n == len(np.unique(a)) == a.max() + 1  # labels 0..n-1, every one used
        assert r["cluster_size_min"] >= 1 and r["empty_clusters"] == 0
    state = load_checkpoint(pic_run)
    assert state["model"]["head.weight"].shape[0] == records[-1]["num_clusters"]
    assert state["meta"]["method"] == "pic"


def test_a_pic_run_resumes_with_a_head_of_another_size(runs, tiny_mnist_root):
    _, pic_run = runs
    from deepcluster.config import resolve
    from deepcluster.train import train

    cfg = resolve(overrides={"data": {"root": str(tiny_mnist_root), "download": False},
                             "cluster": {"k": 10, "pca_dim": 32, "method": "pic"},
                             "optim": {"epochs": 3, "batch_size": 64},
                             "run": {"output_dir": str(pic_run), "workers": 0, "resume": True}})
    train(cfg)
    records = [json.loads(line) for line in (pic_run / "metrics.jsonl").read_text().splitlines()]
    assert [r["epoch"] for r in records] == [0, 1, 2]
    state = load_checkpoint(pic_run)
    assert state["epoch"] == 3 and state["model"]["head.weight"].shape[0] == records[-1]["num_clusters"]


def test_the_pic_doc_scripts_read_the_runs(runs, tmp_path):
    kmeans_run, pic_run = runs
    doc, png = tmp_path / "PIC.md", tmp_path / "sizes.png"
    doc.write_text("intro\n<!-- pic_vs_kmeans:start -->\nold\n<!-- pic_vs_kmeans:end -->\noutro\n")
    p = subprocess.run([sys.executable, str(ROOT / "benchmarks" / "pic_vs_kmeans.py"), str(kmeans_run), str(pic_run),
                        "--out", str(doc), "--png", str(png)], capture_output=True, text=True, timeout=300)
    assert p.returncode == 0, p.stderr[-2000:]
    text = doc.read_text()
    assert text.startswith("intro\n") and text.endswith("outro\n") and "old" not in text
    pic_row = next(line for line in text.splitlines() if line.startswith("| PIC |"))
    n = json.loads((pic_run / "metrics.jsonl").read_text().splitlines()[-1])["num_clusters"]
    assert pic_row.split(" | ")[1] == str(n)
    assert png.read_bytes().startswith(b"\x89PNG")

    out = tmp_path / "TRAINING-pic.md"
    p = subprocess.run([sys.executable, str(ROOT / "benchmarks" / "summarize_run.py"), str(pic_run), str(out),
                        "--name", "tiny-pic"], capture_output=True, text=True, timeout=300)
    assert p.returncode == 0, p.stderr[-2000:]
    summary = out.read_text()
    assert "PIC (σ 0.2, 5 neighbours" in summary and "k-means k =" not in summary
    assert (tmp_path / "runs" / "tiny-pic" / "metrics.jsonl").exists()
