"""The assignment history (issue 23): one row per epoch appended in place, read by memory
map; checkpoints hold only the last epoch's row, so neither grows with the epochs."""

from __future__ import annotations

import numpy as np
import pytest

from conftest import train_tiny
from deepcluster.checkpoint import load_checkpoint
from deepcluster.rundir import HISTORY_HEADER, RunDir


def test_rows_append_in_place_and_read_back_as_a_plain_npy(tmp_path):
    run = RunDir(tmp_path)
    rows = np.random.default_rng(0).integers(0, 50, (6, 37)).astype(np.int32)
    for e, row in enumerate(rows):
        run.append_assignments(row, e)
        assert (tmp_path / "assignments.npy").stat().st_size == HISTORY_HEADER + (e + 1) * 37 * 4
    np.testing.assert_array_equal(np.load(tmp_path / "assignments.npy"), rows)
    hist = run.read_assignments()
    assert isinstance(hist, np.memmap) and hist.dtype == np.int32
    np.testing.assert_array_equal(run.read_assignments(4), rows[:4])
    run.append_assignments(rows[0], 2)  # epoch 2 again (a resume from epoch 2): later rows are dropped
    np.testing.assert_array_equal(np.load(tmp_path / "assignments.npy"), np.stack([rows[0], rows[1], rows[0]]))


def test_an_older_run_s_history_is_converted_once(tmp_path):
    rows = np.arange(12, dtype=np.int32).reshape(3, 4)
    np.save(tmp_path / "assignments.npy", rows)  # the layout that was rewritten whole every epoch
    RunDir(tmp_path).append_assignments(np.full(4, 7), 3)
    np.testing.assert_array_equal(np.load(tmp_path / "assignments.npy"), np.vstack([rows, np.full((1, 4), 7)]))
    assert (tmp_path / "assignments.npy").stat().st_size == HISTORY_HEADER + 4 * 4 * 4


@pytest.fixture(scope="module")
def straight(tiny_mnist_root, tmp_path_factory):
    return train_tiny(tiny_mnist_root, tmp_path_factory.mktemp("h") / "run", optim={"epochs": 4},
                      run={"deterministic": True, "seed": 1})


def test_checkpoint_size_and_history_growth_do_not_depend_on_the_epoch(straight, tiny_mnist_root, tmp_path):
    short = train_tiny(tiny_mnist_root, tmp_path / "short", optim={"epochs": 1}, run={"deterministic": True, "seed": 1})
    a, b = load_checkpoint(short), load_checkpoint(straight)
    assert a["assignments"].shape == b["assignments"].shape == (1, 240)
    size = lambda run: (run / "checkpoint.pt").stat().st_size  # noqa: E731
    assert abs(size(straight) - size(short)) < 4096  # the same tensors; a few header bytes differ
    assert (straight / "assignments.npy").stat().st_size - (short / "assignments.npy").stat().st_size == 3 * 240 * 4


def test_a_kill_between_the_history_append_and_the_checkpoint_resumes_exactly(straight, tiny_mnist_root, tmp_path):
    out = train_tiny(tiny_mnist_root, tmp_path / "run", optim={"epochs": 2}, run={"deterministic": True, "seed": 1})
    # the next epoch appended its row, then the process died before its checkpoint
    RunDir(out).append_assignments(np.full(240, 9, dtype=np.int32), 2)
    assert np.load(out / "assignments.npy").shape == (3, 240) and load_checkpoint(out)["epoch"] == 2
    train_tiny(tiny_mnist_root, out, optim={"epochs": 4}, run={"deterministic": True, "seed": 1, "resume": True})
    np.testing.assert_array_equal(np.load(out / "assignments.npy"), np.load(straight / "assignments.npy"))
    a, b = load_checkpoint(out), load_checkpoint(straight)
    for k in a["model"]:
        np.testing.assert_array_equal(a["model"][k].numpy(), b["model"][k].numpy(), err_msg=k)
