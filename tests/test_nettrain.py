"""The labelled-training loop shared by fine-tuning and the supervised baseline:
precision, step count, and progress in the log when stderr is not a terminal."""

import logging

import pytest
import torch
from torch.utils.data import TensorDataset

from deepcluster import runtime
from deepcluster.eval.nettrain import train_network
from deepcluster.models import create_model


def _data(n=96, classes=4, seed=0):
    g = torch.Generator().manual_seed(seed)
    return TensorDataset(torch.randn(n, 3, 16, 16, generator=g), torch.randint(0, classes, (n,), generator=g))


@pytest.mark.parametrize("amp", ["none", "bf16"])
def test_steps_precision_and_weights(amp):
    model = create_model("alexnet_small", num_clusters=4, image_size=16, width=0.125, fc_dim=32)
    before = {k: v.clone() for k, v in model.state_dict().items()}
    stats = train_network(model, _data(), steps=7, batch_size=32, lr=0.01, amp=amp)  # 3 batches a pass: 2 passes + 1
    assert stats["steps"] == 7 and stats["images"] == 7 * 32 and torch.isfinite(torch.tensor(stats["loss"]))
    after = model.state_dict()
    assert all(v.dtype == before[k].dtype for k, v in after.items())  # weights stay float32 under bf16 autocast
    assert any(not torch.equal(before[k], v) for k, v in after.items() if v.is_floating_point())


def test_bf16_autocast_is_what_runs(monkeypatch):
    """The forward pass runs under bfloat16 autocast with amp=bf16 and not without."""
    seen = []
    model = create_model("alexnet_small", num_clusters=4, image_size=16, width=0.125, fc_dim=32)
    model.register_forward_hook(lambda m, i, o: seen.append(torch.is_autocast_enabled("cpu")))
    train_network(model, _data(), steps=1, batch_size=32, lr=0.01, amp="bf16")
    train_network(model, _data(), steps=1, batch_size=32, lr=0.01, amp="none")
    assert seen == [True, False]
    with pytest.raises(ValueError, match="amp must be none or bf16"):
        train_network(model, _data(), steps=1, batch_size=32, lr=0.01, amp="fp16")


def test_progress_is_logged_without_a_terminal(monkeypatch, caplog):
    monkeypatch.setattr(runtime, "PROGRESS_INTERVAL", 0.0)
    model = create_model("alexnet_small", num_clusters=4, image_size=16, width=0.125, fc_dim=32)
    with caplog.at_level(logging.INFO, logger="deepcluster"):
        train_network(model, _data(), steps=4, batch_size=32, lr=0.01, desc="supervised")
    lines = [r.getMessage() for r in caplog.records if r.getMessage().startswith("supervised: ")]
    assert lines and lines[-1].startswith("supervised: 4/4 steps")
