"""The scale-out benchmark scripts run (at toy sizes, on CPU) and report sound numbers."""

import json
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]

pytestmark = pytest.mark.slow  # a benchmark script run small: in the full suite, not the quick part


def run(script, *args):
    p = subprocess.run([sys.executable, str(ROOT / "benchmarks" / script), *args], capture_output=True, text=True,
                       timeout=300)
    assert p.returncode == 0, p.stderr[-2000:]
    return p


def test_gpu_benchmark_runs_tiny_on_cpu(tmp_path):
    """benchmarks/gpu.py is meant for a lent GPU; --tiny runs the same code on the CPU."""
    out = tmp_path / "gpu.md"
    p = run("gpu.py", "--tiny", "--device", "cpu", "--out", str(out))
    r = json.loads(p.stdout.strip().splitlines()[-1])
    assert r["device"] == "CPU" and r["amp"] == "bf16" and r["channels_last"]
    assert r["train_images_per_s"] > 0 and r["extract_images_per_s"] > 0
    assert 0 < r["kmeans_torch_s"] and 0 < r["kmeans_torch_loss"] < 2  # unit vectors: squared distances <= 4
    assert "| k-means torch (2,000 x 32, k=20, 3 iterations) |" in out.read_text()


def test_kmeans_benchmark_backends_reach_the_same_objective(tmp_path):
    """Different random starts, same problem: our faiss and torch backends and sklearn
    land within 1% of bare faiss' objective."""
    stem = tmp_path / "km"
    run("kmeans.py", "--sizes", "20000", "--ks", "100", "--niter", "10", "--out", str(stem))
    data = json.loads(stem.with_suffix(".json").read_text())
    (row,) = data["rows"]
    assert set(row["seconds"]) >= {"faiss", "ours-faiss", "ours-torch", "sklearn"}
    ref = row["objective"]["faiss"]
    for m in ("ours-faiss", "ours-torch", "sklearn"):
        assert row["objective"][m] == pytest.approx(ref, rel=0.01), m
    md = stem.with_suffix(".md").read_text()
    assert "| 20,000 | 100 |" in md and "ours-faiss / faiss" in md


def test_kmeans_benchmark_with_a_subset_of_methods(tmp_path):
    """A row without ours-faiss (e.g. --methods ours-torch,sklearn to fill in cells) is
    written with "-" in the ratio columns instead of crashing after the measurement."""
    stem = tmp_path / "km"
    run("kmeans.py", "--sizes", "5000", "--ks", "20", "--niter", "3", "--methods", "ours-torch,sklearn",
        "--out", str(stem))
    (row,) = json.loads(stem.with_suffix(".json").read_text())["rows"]
    assert set(row["seconds"]) == {"ours-torch", "sklearn"}
    line = next(l for l in stem.with_suffix(".md").read_text().splitlines() if l.startswith("| 5,000 | 20 |"))
    assert "| - | - |" in line


def test_cpu_precision_benchmark_runs_and_compares_with_float32(tmp_path):
    stem = tmp_path / "prec"
    run("cpu_precision.py", "--rounds", "1", "--steps", "1", "--batch", "8", "--out", str(stem))
    r = json.loads(stem.with_suffix(".json").read_text())
    names = ["float32", "float32 + channels_last", "bf16", "bf16 + channels_last"]
    assert list(r["median_s"]) == names and all(r["median_s"][n]["train"] > 0 for n in names)
    assert r["cosine_min"]["float32"] == pytest.approx(1.0, abs=1e-6)  # the reference against itself
    assert r["cosine_min"]["float32 + channels_last"] > 0.9999  # same arithmetic, another memory layout
    assert 0.99 < r["cosine_min"]["bf16"] < 1.0
    assert "| bf16 + channels_last |" in stem.with_suffix(".md").read_text()
