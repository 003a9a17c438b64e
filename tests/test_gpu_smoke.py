"""benchmarks/gpu.py --smoke: one PASS/FAIL/SKIP line per CUDA path, a non-zero exit on a FAIL.

This machine has no GPU: the CUDA run is checked to SKIP everything and exit 0, and the
same checks are run on the CPU (``--device cpu``, gloo for NCCL), so that the code a lent
GPU will run has been run once here.
"""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

from conftest import load_benchmark

pytestmark = pytest.mark.slow  # a benchmark script run small: in the full suite, not the quick part

ROOT = Path(__file__).resolve().parents[1]
SCRIPT = ROOT / "benchmarks" / "gpu.py"
CHECKS = ["train_step", "bf16_autocast", "channels_last", "kmeans_torch", "faiss_gpu", "process_group"]


def smoke(*args: str) -> subprocess.CompletedProcess:
    env = {**os.environ, "CUDA_VISIBLE_DEVICES": "", "PYTHONPATH": str(ROOT / "src")}
    return subprocess.run([sys.executable, str(SCRIPT), "--smoke", *args], capture_output=True, text=True,
                          env=env, timeout=60)


def statuses(stdout: str) -> dict[str, str]:
    """``{check: PASS|FAIL|SKIP}`` from the lines ``STATUS name: detail (t s)``."""
    out = {}
    for line in stdout.splitlines():
        status, _, rest = line.partition(" ")
        if status in ("PASS", "FAIL", "SKIP"):
            out[rest.split(":", 1)[0]] = status
    return out


def test_without_cuda_every_check_is_skipped_and_the_exit_status_is_0():
    p = smoke()
    assert p.returncode == 0, p.stderr
    assert statuses(p.stdout) == dict.fromkeys(CHECKS, "SKIP")
    assert p.stdout.count("no CUDA device") == len(CHECKS) + 1  # the header and each line


def test_the_same_checks_pass_on_the_cpu_with_gloo():
    p = smoke("--device", "cpu")
    assert p.returncode == 0, p.stdout + p.stderr
    assert statuses(p.stdout) == {**dict.fromkeys(CHECKS, "PASS"), "faiss_gpu": "SKIP"}, p.stdout
    assert "gloo group of 1" in p.stdout


def test_a_failing_check_prints_fail_the_others_still_run_and_the_status_is_1(capsys, monkeypatch):
    gpu = load_benchmark("gpu")

    def broken(device):
        raise RuntimeError("CUDA error: an illegal memory access was encountered\nmore lines")

    monkeypatch.setattr(gpu, "smoke_channels_last", broken)
    monkeypatch.setattr(gpu, "smoke_process_group", lambda device: "fine")  # no group in the test process
    assert gpu.smoke("cpu") == 1
    out = capsys.readouterr().out
    assert statuses(out) == {**dict.fromkeys(CHECKS, "PASS"), "faiss_gpu": "SKIP", "channels_last": "FAIL"}
    assert "FAIL channels_last: RuntimeError: CUDA error: an illegal memory access was encountered (" in out
    assert "more lines" not in out
