"""torch.distributed paths on CPU with gloo: processes spawned by the tests, bounded in time.

One 2-process job computes everything the equivalence tests compare against a
single-process run in this process (extraction, the bounded-memory PCA stream, k-means
on both backends, gather_by_index); a second job checks that a failed or stuck rank
makes the other fail with a clear message; the slow test launches real training with
``torchrun`` and resumes it on 2 and on 1 process.
"""

from __future__ import annotations

import json
import logging
import shutil
import subprocess
import sys
import time

import numpy as np
import pytest
import torch

from conftest import run_ranks
from deepcluster import distributed as D
from deepcluster.checkpoint import load_checkpoint
from deepcluster.clustering import kmeans
from deepcluster.config import resolve
from deepcluster.models import create_model
from deepcluster.features import eval_mode, extract, extract_reduced, make_loader
from deepcluster.runtime import per_rank_batch_size
from deepcluster.train import TrainingError, train

N_IMG = 203  # odd: the shards of 2 ranks differ in length
CPU = torch.device("cpu")


# --------------------------------------------------------------------------- harness

# run_ranks (conftest.py): fn on spawned gloo ranks, {rank: (ok, result)}


# --------------------------------------------------------------------------- fixtures shared by the ranks

class SynthImages(torch.utils.data.Dataset):
    """``(image (3, 28, 28), index)``, each image a pure function of its index."""

    def __init__(self, n: int) -> None:
        self.n = n

    def __len__(self) -> int:
        return self.n

    def __getitem__(self, i: int):
        g = torch.Generator().manual_seed(1000 + i)
        return torch.rand(3, 28, 28, generator=g), i


def tiny_model():
    torch.manual_seed(0)
    return create_model("alexnet_small", sobel=True, num_clusters=4, image_size=28, width=0.125, fc_dim=32).eval()


def blobs(n_per=60, k=6, d=8, seed=0):
    rng = np.random.default_rng(seed)
    centers = rng.standard_normal((k, d)) * 4
    x = np.concatenate([c + 0.3 * rng.standard_normal((n_per, d)) for c in centers]).astype(np.float32)
    return x[rng.permutation(len(x))]


REDUCE_CFG = {"cluster": {"pca_dim": 8, "pca_sample": 60}, "optim": {"batch_size": 16}, "run": {"workers": 0}}


def extract_features(model, loader) -> np.ndarray:
    with eval_mode(model):
        return extract(model.forward_features, loader, N_IMG, model.feature_dim, CPU)


def reduce(model, ds) -> dict:
    cfg = resolve(overrides=REDUCE_CFG)
    return extract_reduced(model, ds, cfg.cluster, cfg.optim.batch_size, cfg.run.workers, CPU, seed=5)


def _job_everything() -> dict:
    """What each rank computes; compared with one process in the tests below."""
    out: dict = {"rank": D.rank(), "world": D.world_size(), "shard": D.shard_indices(N_IMG)}
    model, ds = tiny_model(), SynthImages(N_IMG)
    loader = make_loader(ds, 16, 0, sampler=D.shard_indices(N_IMG).tolist())
    out["features"] = extract_features(model, loader)
    red = reduce(model, ds)
    out["reduced"] = D.gather_by_index(red["indices"], torch.from_numpy(red["x"]), N_IMG).numpy()
    out["pca_projection"] = red["pca"].projection
    x = blobs()
    shard = D.shard_indices(len(x))
    for backend in ("torch", "faiss"):
        res = kmeans(x[shard], 6, niter=10, seed=3, backend=backend, indices=shard)
        full = D.gather_by_index(shard, torch.from_numpy(res.assignments), len(x)).numpy()
        out[f"kmeans_{backend}"] = (full, res.centroids, res.loss, res.sizes)
    out["gathered"] = D.all_gather_object({"rank": D.rank(), "items": list(range(D.rank() + 1))})
    try:  # every rank sends index 0: 0 twice, 1 and 2 never
        D.gather_by_index(np.array([0]), torch.zeros(1, 2), 3)
    except ValueError as e:
        out["dup_error"] = str(e)
    return out


@pytest.fixture(scope="module")
def two_ranks():
    res = run_ranks(_job_everything, world=2)
    for r, (ok, val) in res.items():
        assert ok, f"rank {r}: {val}"
    return res[0][1], res[1][1]


# --------------------------------------------------------------------------- single process

def test_without_a_process_group_we_are_rank_0_of_1(monkeypatch):
    for var in ("RANK", "WORLD_SIZE", "LOCAL_RANK"):
        monkeypatch.delenv(var, raising=False)
    assert (D.rank(), D.world_size(), D.is_main_process(), D.is_distributed()) == (0, 1, True, False)
    assert D.init_distributed("cpu") == (CPU, False)
    t = torch.arange(3.0)
    assert D.all_reduce_sum(t) is t and t.tolist() == [0.0, 1.0, 2.0]
    assert D.broadcast_object({"a": 1}) == {"a": 1}
    D.barrier()
    got = D.gather_by_index(np.array([2, 0, 1]), torch.tensor([[2.0], [0.0], [1.0]]), 3)
    assert got.flatten().tolist() == [0.0, 1.0, 2.0]
    # Without a process group no collective can fail: an error inside is shown as it is,
    # not blamed on "another rank".
    with pytest.raises(RuntimeError, match="out of memory") as err:
        with D.collective_errors("the gradient all-reduce"):
            raise torch.OutOfMemoryError("CUDA out of memory. Tried to allocate 2 GiB")
    assert not isinstance(err.value, D.DistributedError)


@pytest.mark.parametrize("n,world", [(203, 2), (10, 3), (2, 4), (0, 2)])
def test_shards_cover_every_index_exactly_once(n, world):
    shards = [D.shard_indices(n, r, world) for r in range(world)]
    allidx = np.concatenate(shards)
    np.testing.assert_array_equal(np.sort(allidx), np.arange(n))
    sizes = [len(s) for s in shards]
    assert max(sizes) - min(sizes) <= 1


def test_gather_by_index_refuses_missing_duplicate_and_out_of_range():
    with pytest.raises(ValueError, match="2 of 3 indices missing and 1 sent more than once"):
        D.gather_by_index(np.array([0, 0]), torch.zeros(2), 3)
    with pytest.raises(ValueError, match=r"indices must lie in \[0, 3\)"):
        D.gather_by_index(np.array([0, 3]), torch.zeros(2), 3)
    with pytest.raises(ValueError, match="2 indices but 1 values"):
        D.gather_by_index(np.array([0, 1]), torch.zeros(1), 2)


def test_bad_requests_give_one_line_errors(monkeypatch, tiny_mnist_root, tmp_path):
    monkeypatch.setenv("WORLD_SIZE", "2")
    monkeypatch.delenv("RANK", raising=False)
    with pytest.raises(D.DistributedError, match="RANK.* not set; launch with torchrun"):
        D.init_distributed("cpu")
    monkeypatch.delenv("WORLD_SIZE")
    if not torch.cuda.is_available():
        with pytest.raises(D.DistributedError, match="no CUDA GPU is available; use --device cpu"):
            D.init_distributed("cuda")
    from deepcluster.clustering import faiss_has_gpu

    base = {"data": {"root": str(tiny_mnist_root), "download": False}, "cluster": {"k": 5, "pca_dim": 8},
            "optim": {"epochs": 1}, "run": {"output_dir": str(tmp_path / "r"), "workers": 0}}
    if not faiss_has_gpu():
        with pytest.raises(ValueError, match="faiss-gpu needs a GPU build of faiss"):
            kmeans(blobs(), 3, backend="faiss-gpu")
        cfg = resolve(overrides={**base, "cluster": {**base["cluster"], "backend": "faiss-gpu"}})
        with pytest.raises(TrainingError, match="faiss-gpu needs a GPU build of faiss.*use --kmeans torch"):
            train(cfg)
    with pytest.raises(TrainingError, match="--amp fp16 needs a CUDA device"):
        train(resolve(overrides={**base, "run": {**base["run"], "amp": "fp16"}}))
    assert not (tmp_path / "r" / "checkpoint.pt").exists()


def test_global_batch_that_the_world_size_does_not_divide_is_rounded_up(caplog):
    with caplog.at_level(logging.WARNING, logger="deepcluster"):
        assert per_rank_batch_size(256, 4) == 64
        assert per_rank_batch_size(250, 3) == 84
    assert "not a multiple of the world size 3: using 84 per rank (252 per step)" in caplog.text


# --------------------------------------------------------------------------- 2 processes

@pytest.mark.distributed
def test_distributed_extraction_places_each_index_once_and_equals_one_process(two_ranks):
    r0, r1 = two_ranks
    assert (r0["world"], r1["world"]) == (2, 2)
    assert len(r0["shard"]) == 102 and len(r1["shard"]) == 101
    assert not set(r0["shard"]) & set(r1["shard"])
    ref = extract_features(tiny_model(), make_loader(SynthImages(N_IMG), 16, 0))
    np.testing.assert_array_equal(r0["features"], r1["features"])  # every rank gets the same array
    np.testing.assert_allclose(r0["features"], ref, rtol=1e-5, atol=1e-6)
    assert np.abs(ref).sum(1).min() > 0  # no row left at its zero initialisation


@pytest.mark.distributed
def test_distributed_pca_stream_equals_one_process(two_ranks):
    r0, r1 = two_ranks
    red = reduce(tiny_model(), SynthImages(N_IMG))
    np.testing.assert_array_equal(red["indices"], np.arange(N_IMG))
    np.testing.assert_array_equal(r0["pca_projection"], r1["pca_projection"])  # broadcast from rank 0
    np.testing.assert_allclose(r0["pca_projection"], red["pca"].projection, rtol=1e-3, atol=1e-4)
    np.testing.assert_allclose(r0["reduced"], red["x"], atol=1e-4)


@pytest.mark.distributed
@pytest.mark.parametrize("backend", ["torch", "faiss"])
def test_distributed_kmeans_equals_one_process(two_ranks, backend):
    r0, r1 = two_ranks
    ref = kmeans(blobs(), 6, niter=10, seed=3, backend=backend)
    for r in (r0, r1):
        assignments, centroids, loss, sizes = r[f"kmeans_{backend}"]
        np.testing.assert_array_equal(assignments, ref.assignments)
        np.testing.assert_allclose(centroids, ref.centroids, rtol=1e-5, atol=1e-6)
        np.testing.assert_array_equal(sizes, ref.sizes)
        # The loss is a float32 mean of squared distances summed per shard then across ranks,
        # in another order than one process sums them: its relative rounding error grows
        # with the number of terms (about n * 2**-24 in the worst case, 1.8e-5 for n = len(blobs())
        # ~ 300). Assignments, sizes and centroids above are exact or near-exact; the loss
        # only has to agree to that bound (1e-6 failed on an Intel Xeon: 2.7745432 vs 2.7745460).
        assert loss == pytest.approx(ref.loss, rel=len(blobs()) * 2.0 ** -24)


@pytest.mark.distributed
def test_all_gather_object_gives_every_rank_each_ranks_object_in_rank_order(two_ranks):
    expected = [{"rank": 0, "items": [0]}, {"rank": 1, "items": [0, 1]}]  # unequal sizes travel whole
    assert [r["gathered"] for r in two_ranks] == [expected, expected]
    assert D.all_gather_object(("alone", 3)) == [("alone", 3)]  # no process group: a list of one


def test_distributed_gather_refuses_duplicates_on_every_rank(two_ranks):
    for r in two_ranks:
        assert "1 sent more than once" in r["dup_error"] and "2 of 3 indices missing" in r["dup_error"]


def _job_one_rank_fails(mode: str):
    if D.rank() == 1:
        if mode == "crash":
            raise RuntimeError("rank 1 fails on purpose")
        time.sleep(5)  # stuck: alive but never joins the collective
        return None
    t0 = time.monotonic()
    try:
        D.all_reduce_sum(torch.ones(3))
    except D.DistributedError as e:
        return str(e), time.monotonic() - t0
    return "no error", time.monotonic() - t0


@pytest.mark.distributed
@pytest.mark.slow  # waits out a collective timeout
@pytest.mark.parametrize("mode", ["crash", "stuck"])
def test_a_failed_or_stuck_rank_makes_the_other_exit_with_a_clear_message(mode):
    res = run_ranks(_job_one_rank_fails, world=2, timeout_s=2, deadline_s=90, mode=mode)
    ok, val = res[0]
    assert ok, val
    msg, seconds = val
    assert msg.startswith("rank 0 of 2: all_reduce failed (") and "another rank has probably failed" in msg
    assert "\n" not in msg and seconds < 30
    if mode == "crash":
        assert res[1] == (False, "RuntimeError: rank 1 fails on purpose")


# --------------------------------------------------------------------------- torchrun training

def _torchrun(nproc: int, *args: str) -> subprocess.CompletedProcess:
    launcher = [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc-per-node={nproc}"]
    cmd = (launcher if nproc > 1 else [sys.executable]) + ["-m", "deepcluster", "train", *args]
    return subprocess.run(cmd, capture_output=True, text=True, timeout=240)


@pytest.mark.slow
@pytest.mark.distributed
def test_torchrun_two_processes_train_two_epochs_and_resume_on_two_and_on_one(tiny_mnist_root, tmp_path):
    out = tmp_path / "ddp"
    common = ["--workers", "0", "--dist-timeout", "60"]
    p = _torchrun(2, "--data-root", str(tiny_mnist_root), "--output-dir", str(out), "--k", "6", "--pca-dim", "8",
                  "--width", "0.25", "--fc-dim", "64", "--epochs", "2", "--batch-size", "64", *common)
    assert p.returncode == 0, p.stderr[-3000:]
    state = load_checkpoint(out)
    assert state["epoch"] == 2 and state["world_size"] == 2 and state["assignments"].shape == (1, 240)
    assert sorted(f.name for f in out.glob("train*.log")) == ["train.log", "train.rank1.log"]
    assert "DEBUG [rank 1]" in (out / "train.rank1.log").read_text()
    assert "epoch 1:" in (out / "train.log").read_text()
    records = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    assert [r["epoch"] for r in records] == [0, 1] and records[1]["empty_clusters"] == 0
    assert records[0]["num_clusters"] == 6 and 0 <= records[1]["nmi_prev"] <= 1

    one = tmp_path / "resumed-on-one"
    shutil.copytree(out, one)
    p = _torchrun(2, "--output-dir", str(out), "--resume", "--epochs", "3", *common)
    assert p.returncode == 0, p.stderr[-3000:]
    p = _torchrun(1, "--output-dir", str(one), "--resume", "--epochs", "3", *common)
    assert p.returncode == 0, p.stderr[-3000:]
    for run, world in ((out, 2), (one, 1)):
        state = load_checkpoint(run)
        assert state["epoch"] == 3 and state["world_size"] == world
        hist = np.load(run / "assignments.npy")
        assert hist.shape == (3, 240) and state["assignments"].shape == (1, 240)
        np.testing.assert_array_equal(hist[-1:], state["assignments"].numpy())
        np.testing.assert_array_equal(hist[:2], np.load(tmp_path / "ddp" / "assignments.npy")[:2])
        lines = (run / "metrics.jsonl").read_text().splitlines()
        assert [json.loads(line)["epoch"] for line in lines] == [0, 1, 2]
    assert not (one / "run.lock").exists() and not (out / "run.lock").exists()


@pytest.mark.slow
@pytest.mark.distributed
@pytest.mark.parametrize("option", [["--clusterings", "2"], ["--head", "centroids"]])
def test_torchrun_trains_the_epochs_own_classifier(tiny_mnist_root, tmp_path, option):
    """Under DistributedDataParallel the wrapped module is the epoch's classifier: the
    extra heads of several clusterings, or the centroid head, which leaves the linear
    head at its initialisation (it was once the bare model, whose linear head trained)."""
    from deepcluster.runtime import epoch_seed

    out = tmp_path / "ddp"
    p = _torchrun(2, "--data-root", str(tiny_mnist_root), "--output-dir", str(out), "--k", "6", "--pca-dim", "8",
                  "--width", "0.25", "--fc-dim", "64", "--epochs", "1", "--batch-size", "64", "--workers", "0",
                  "--dist-timeout", "60", *option)
    assert p.returncode == 0, p.stderr[-3000:]
    state = load_checkpoint(out)
    (record,) = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    model = create_model("alexnet_small", num_clusters=6, image_size=28, width=0.25, fc_dim=64)
    model.reset_head(6, generator=torch.Generator().manual_seed(epoch_seed(0, 0, 3)))
    untouched = torch.equal(state["model"]["head.weight"], model.head.weight.detach())
    if option[0] == "--head":
        assert untouched
    else:
        assert not untouched and 0 <= record["nmi_clusterings"] <= 1
