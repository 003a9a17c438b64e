"""benchmarks/peak.py: FLOPs per image counted as by hand, and a quick run whose fractions
are its own throughputs x FLOPs / peak."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

pytestmark = pytest.mark.slow  # a benchmark script run small: in the full suite, not the quick part

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "benchmarks"))
peak = pytest.importorskip("peak")


class TwoLinear(torch.nn.Module):
    """Features: ``Linear(3*4*4 -> 5)`` of the flattened 4 x 4 image; head ``Linear(5 -> 3)``."""

    def __init__(self) -> None:
        super().__init__()
        self.body, self.head = torch.nn.Linear(48, 5), torch.nn.Linear(5, 3)

    def forward_features(self, x: torch.Tensor) -> torch.Tensor:
        return self.body(x.flatten(1))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(torch.relu(self.forward_features(x)))


def test_flops_per_image_match_a_hand_count():
    f = peak.flops_per_image(TwoLinear(), image_size=4, batch=6)
    body, head = 2 * 48 * 5, 2 * 5 * 3  # a multiply-add is 2 FLOPs
    assert f["features"] == body
    assert f["forward"] == body + head
    # backward: the head's weight and input gradients, the body's weight gradient only
    # (the image needs no gradient)
    assert f["train"] == (body + head) + (head + head) + body


def test_quick_run_reports_fractions_of_its_own_peak(tmp_path):
    out = tmp_path / "peak"
    env = {**os.environ, "PYTHONPATH": str(ROOT / "src"), "OMP_NUM_THREADS": "1"}
    p = subprocess.run([sys.executable, str(ROOT / "benchmarks" / "peak.py"), "--quick", "--out", str(out)],
                       capture_output=True, text=True, env=env, timeout=120)
    assert p.returncode == 0, p.stderr
    r = json.loads(out.with_suffix(".json").read_text())
    assert r["threads"] == 1 and r["batch"] == 16
    for prec in ("float32", "bfloat16"):
        assert r["peak_gflops"][prec] == max(r["peaks_gflops"][prec].values()) > 0
    assert [s["precision"] for s in r["settings"]] == ["float32"] * 2 + ["bfloat16"] * 2 * r["native_bf16"]
    for s in r["settings"]:
        for phase, f in (("train", "train"), ("extract", "features")):
            assert s[f"{phase}_fraction"] == pytest.approx(s[phase] * r["flops_per_image"][f] / 1e9 / s["peak"])
    md = out.with_suffix(".md").read_text()
    assert md.count("| training (fwd + bwd + SGD) |") == len(r["settings"])
    assert "Target (issue 23): training >= 50% of the measured peak" in md
