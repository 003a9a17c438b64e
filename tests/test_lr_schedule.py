"""``optim.lr_schedule``: the learning rate is a function of the epoch, so a resumed run
trains at the rate its epoch calls for, and a new ``--lr`` on resume takes effect."""

import json
import math

import pytest

from conftest import train_tiny
from deepcluster.checkpoint import load_checkpoint
from deepcluster.config import ConfigError, resolve
from deepcluster.optim import epoch_lr
from deepcluster.train import train


def test_cosine_values():
    cfg = resolve(overrides={"optim": {"lr": 0.1, "epochs": 4, "lr_schedule": "cosine"}})
    got = [epoch_lr(cfg, e) for e in range(4)]
    want = [0.1 * 0.5 * (1 + math.cos(math.pi * e / 4)) for e in range(4)]
    assert got == pytest.approx(want) and got[0] == pytest.approx(0.1) and got[2] == pytest.approx(0.05)
    const = resolve(overrides={"optim": {"lr": 0.1, "epochs": 4}})
    assert [epoch_lr(const, e) for e in range(4)] == [0.1] * 4
    with pytest.raises(ConfigError, match="optim.lr_schedule"):
        resolve(overrides={"optim": {"lr_schedule": "step"}})


def _records(run):
    return [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]


def test_a_cosine_run_records_and_uses_each_epochs_rate(tiny_mnist_root, tmp_path):
    run = train_tiny(tiny_mnist_root, tmp_path / "run", optim={"epochs": 2, "lr": 0.08, "lr_schedule": "cosine"})
    assert [r["lr"] for r in _records(run)] == pytest.approx([0.08, 0.04])
    state = load_checkpoint(run)
    assert [g["lr"] for g in state["optimizer"]["param_groups"]] == pytest.approx([0.04])


def test_a_resumed_run_takes_the_new_lr(tiny_mnist_root, tmp_path):
    run = train_tiny(tiny_mnist_root, tmp_path / "run", optim={"epochs": 1, "lr": 0.05})
    train(resolve(overrides={"data": {"root": str(tiny_mnist_root), "download": False},
                             "cluster": {"k": 10, "pca_dim": 32},
                             "optim": {"epochs": 2, "batch_size": 64, "lr": 0.01},
                             "run": {"output_dir": str(run), "workers": 0, "resume": True}}))
    assert [r["lr"] for r in _records(run)] == pytest.approx([0.05, 0.01])
    assert load_checkpoint(run)["optimizer"]["param_groups"][0]["lr"] == pytest.approx(0.01)
