"""benchmarks/scale.py: the generated folder (deterministic, reused, ImageFolder layout,
readable by the package's folder source) and the arithmetic of its per-epoch summary."""

import json

import numpy as np
import pytest
from PIL import Image

from conftest import load_benchmark
from deepcluster.data.sources import FolderSource

scale = load_benchmark("scale")


def test_folder_is_deterministic_reused_and_readable(tmp_path, monkeypatch):
    monkeypatch.setenv("DEEPCLUSTER_CACHE", str(tmp_path / "cache"))
    a = scale.make_folder(tmp_path / "a", 53, 5)
    files = sorted((tmp_path / "a").rglob("*.png"))
    assert a["images"] == 53 == len(files) and len({f.parent.name for f in files}) == 5
    assert a["bytes"] == sum(f.stat().st_size for f in files) and a["mean_bytes"] < 200
    with Image.open(files[0]) as img:
        assert img.size == (12, 12) and img.mode == "L"
    stamp = files[0].stat().st_mtime_ns
    assert scale.make_folder(tmp_path / "a", 53, 5) == a and files[0].stat().st_mtime_ns == stamp  # reused
    b = scale.make_folder(tmp_path / "b", 53, 5)
    assert [f.read_bytes() for f in sorted((tmp_path / "b").rglob("*.png"))] == [f.read_bytes() for f in files]
    assert scale.make_folder(tmp_path / "a", 60, 5)["images"] == 60  # another size: written again
    src = FolderSource(str(tmp_path / "a"))
    assert len(src) == 60 and not src.skipped and src.classes == [f"c{c:04d}" for c in range(5)]
    assert np.bincount(src.labels).tolist() == [12] * 5


def test_summary_arithmetic():
    folder = {"images": 1000, "mean_bytes": 120.0, "classes": 10, "write_s": 1.0}
    metrics = [{"epoch": e, "epoch_s": 10.0 + e, "extract_s": 3.0, "pca_s": 0.1, "kmeans_s": 0.5, "train_s": 6.0}
               for e in range(2)]
    epochs = [{"epoch": e, "save_s": 0.5, "sampler_plan": 0.01, "record": 0.02, "history": 0.003, "metrics": 0.001,
               "checkpoint": 0.2, "rss_mb": 100.0, "run_dir_bytes": 1000 + 4000 * e} for e in range(2)]
    facts = {"metrics": metrics, "epochs": epochs, "network": {"forward_img_s": 500.0, "train_img_s": 250.0},
             "scan_cold_s": 2.0, "scan_warm_s": 0.1, "memo": {"bytes": 7000, "load_s": 0.01},
             "rss_start_mb": 50.0, "rss_after_scan_mb": 60.0, "peak_rss_mb": 120.0}
    summary = scale.summarise(folder, facts)
    row = summary["rows"][1]
    assert row["network_s"] == pytest.approx(1000 / 500 + 1000 / 250)  # 6 s
    assert row["pipeline_s"] == pytest.approx(3.0 + 6.0 - 6.0)
    assert row["epoch_s"] == pytest.approx(11.5) and row["outside"]["checkpoint"] == 0.2
    assert summary["disk_growth_per_epoch_bytes"] == [4000]
    text = scale.table(folder, facts, summary)
    assert "| 1 | 12 | 3 | 0.1 | 0.5 | 6 | 6 | 3 | 0.01 | 0.02 | 0.003 | 0.001 | 0.20 | 100 | 0.0 |" in text
    assert "Disk growth per epoch: 0.00 MB" in text and json.dumps(summary)
