import gzip
import multiprocessing as mp
import os
import queue
import socket
import struct
import time

import numpy as np
import pytest

os.environ.setdefault("DEEPCLUSTER_CACHE", "/tmp/deepcluster-test-cache")
# faiss and torch each bring OpenMP threads that busy-wait between parallel regions; on
# 2 shared cores that makes small tests several times slower (test_kmeans: 20 s -> 4 s).
# Must be set before torch/faiss load their OpenMP runtime; subprocesses inherit it.
os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")


def write_idx(path, array: np.ndarray) -> None:
    """Write ``array`` (uint8) in the IDX format MNIST uses, gzipped."""
    dims = array.shape
    header = struct.pack(">HBB", 0, 0x08, len(dims)) + b"".join(struct.pack(">I", d) for d in dims)
    with gzip.open(path, "wb") as f:
        f.write(header + array.astype(np.uint8).tobytes())


@pytest.fixture(scope="session")
def tiny_mnist_root(tmp_path_factory):
    """A Fashion-MNIST-format data root with 240 train / 60 test synthetic images.

    Each class is a bright square at a class-specific position, so labels are learnable.
    """
    root = tmp_path_factory.mktemp("tiny-fmnist")
    rng = np.random.default_rng(0)

    def make(n):
        labels = np.arange(n) % 10
        imgs = rng.integers(0, 40, size=(n, 28, 28)).astype(np.uint8)
        for i, c in enumerate(labels):
            r, col = 2 + (c // 5) * 12, 2 + (c % 5) * 5
            imgs[i, r:r + 10, col:col + 5] = 220
        return imgs, labels.astype(np.uint8)

    for prefix, n in (("train", 240), ("t10k", 60)):
        imgs, labels = make(n)
        write_idx(root / f"{prefix}-images-idx3-ubyte.gz", imgs)
        write_idx(root / f"{prefix}-labels-idx1-ubyte.gz", labels)
    return root


def load_benchmark(name: str):
    """``benchmarks/<name>.py`` imported as a module (the scripts are not a package)."""
    import importlib.util
    from pathlib import Path

    path = Path(__file__).resolve().parents[1] / "benchmarks" / f"{name}.py"
    spec = importlib.util.spec_from_file_location(f"{name}_bench", path)
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


def train_tiny(root, out, **sections):
    """A tiny DeepCluster run into ``out`` (returned): the fixture data at ``root``, k = 10,
    PCA 32, 2 epochs of batch 64, no loader workers. ``sections`` update the settings
    key by key, e.g. ``run={"seed": 3}``."""
    from deepcluster.config import resolve
    from deepcluster.monitor import default_callbacks
    from deepcluster.train import train

    overrides = {"data": {"root": str(root), "download": False}, "cluster": {"k": 10, "pca_dim": 32},
                 "optim": {"epochs": 2, "batch_size": 64}, "run": {"output_dir": str(out), "workers": 0}}
    for section, values in sections.items():
        overrides.setdefault(section, {}).update(values)
    cfg = resolve(overrides=overrides)
    train(cfg, callbacks=default_callbacks(cfg))  # as deepcluster train runs it
    return out


def assigned_like_training(run, root, tmp_path) -> float:
    """``deepcluster assign`` on the fixture's training images written as PNG files: the
    fraction that get the cluster the run's last epoch gave them."""
    import csv

    from deepcluster.cli import main
    from deepcluster.data import build_source

    folder = tmp_path / "images"
    folder.mkdir()
    source = build_source("fashion-mnist", str(root), "train", download=False)
    for i in range(len(source)):
        source.load(i).save(folder / f"{i:05d}.png")
    out = tmp_path / "assigned.csv"
    assert main(["assign", "--checkpoint", str(run), "--images", str(folder), "-o", str(out)]) == 0
    with open(out, newline="") as f:
        rows = list(csv.DictReader(f))
    assert len(rows) == len(source)
    last = np.load(run / "assignments.npy")[-1]
    return float(np.mean([int(r["cluster"]) == last[int(r["path"].rsplit("/", 1)[1][:5])] for r in rows]))


def pytest_terminal_summary(terminalreporter) -> None:
    """The reliability matrix's figures (quoted in docs/RELIABILITY.md), when it ran."""
    import sys

    for mod in list(sys.modules.values()):
        figures = getattr(mod, "FIGURES", None)
        if getattr(mod, "__name__", "").endswith("test_reliability") and figures and any(figures.values()):
            terminalreporter.write_line(f"reliability figures: SIGKILL points survived {figures['sigkill']}, "
                                        f"bad files tried {figures['bad_files']}, committed bytes lost 0")


# --------------------------------------------------------------------------- distributed jobs (gloo, spawned)

def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _worker(fn, rank: int, world: int, port: int, timeout_s: float, out: mp.Queue, kwargs: dict) -> None:
    import torch

    from deepcluster import distributed as D

    os.environ.update(RANK=str(rank), WORLD_SIZE=str(world), LOCAL_RANK=str(rank), MASTER_ADDR="127.0.0.1",
                      MASTER_PORT=str(port))
    torch.set_num_threads(1)
    try:
        D.init_distributed("cpu", timeout_s=timeout_s)
        out.put((rank, True, fn(**kwargs)))
    except BaseException as e:  # noqa: BLE001 - reported to the test
        out.put((rank, False, f"{type(e).__name__}: {e}"))
    finally:
        D.cleanup()


def run_ranks(fn, world: int = 2, timeout_s: float = 60, deadline_s: float = 150, **kwargs) -> dict[int, tuple]:
    """Run ``fn(**kwargs)`` on ``world`` spawned gloo ranks; ``{rank: (ok, result)}``.

    ``timeout_s`` is the collective timeout; the whole job is killed after ``deadline_s``.
    """
    ctx = mp.get_context("spawn")
    q = ctx.Queue()
    port = _free_port()
    procs = [ctx.Process(target=_worker, args=(fn, r, world, port, timeout_s, q, kwargs), daemon=True)
             for r in range(world)]
    for p in procs:
        p.start()
    results: dict[int, tuple] = {}
    end = time.monotonic() + deadline_s
    try:
        while len(results) < world:
            try:
                r, ok, res = q.get(timeout=1.0)
                results[r] = (ok, res)
                continue
            except queue.Empty:
                pass
            dead = [r for r, p in enumerate(procs) if p.exitcode is not None and r not in results]
            if dead and q.empty():
                pytest.fail(f"rank(s) {dead} died without a result (exit codes "
                            f"{[procs[r].exitcode for r in dead]})")
            if time.monotonic() > end:
                pytest.fail(f"distributed job did not finish in {deadline_s}s; got ranks {sorted(results)}")
    finally:
        for p in procs:
            p.join(timeout=10)
            if p.is_alive():
                p.kill()
    return results
