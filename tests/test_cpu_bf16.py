"""bfloat16 autocast and channels_last on the CPU (``--amp bf16|auto``, ``--channels-last``):
the mixed-precision network computes what the float32 one computes, to bfloat16's
precision, and ``auto`` picks bfloat16 only where the device has it natively."""

import logging
from pathlib import Path

import pytest
import torch
import yaml

from conftest import train_tiny
from deepcluster.checkpoint import load_model
from deepcluster.config import ConfigError, resolve
from deepcluster.models import create_model
from deepcluster.runtime import autocast, native_bf16, resolve_amp

CPU = torch.device("cpu")


def test_auto_follows_the_devices_native_support(monkeypatch):
    import deepcluster.runtime as train_mod  # where native_bf16 lives

    for value in ("none", "bf16", "fp16"):
        assert resolve_amp(value, CPU) == value  # explicit choices are never changed
    monkeypatch.setattr(train_mod, "native_bf16", lambda device: True)
    assert resolve_amp("auto", CPU) == "bf16"
    monkeypatch.setattr(train_mod, "native_bf16", lambda device: False)
    assert resolve_amp("auto", CPU) == "none"
    assert resolve(overrides={"run": {"amp": "auto"}}).run.amp == "auto"
    with pytest.raises(ConfigError, match="run.amp"):
        resolve(overrides={"run": {"amp": "bf32"}})


def test_native_bf16_on_cpu_matches_the_cpu_flags():
    cpuinfo = Path("/proc/cpuinfo")
    if not cpuinfo.exists():
        pytest.skip("no /proc/cpuinfo to compare with")
    flags = cpuinfo.read_text().split()
    has = "avx512_bf16" in flags or "amx_bf16" in flags
    assert native_bf16(CPU) == has


def _model():
    torch.manual_seed(0)
    return create_model("alexnet_small", num_clusters=10, image_size=28, dropout=0.0).eval()


def test_bf16_features_match_float32_features():
    model = _model()
    x = torch.rand(32, 3, 28, 28)
    with torch.no_grad():
        ref = model.forward_features(x)
        with autocast(CPU, "bf16"):
            low = model.forward_features(x)
        cl = model.to(memory_format=torch.channels_last)
        with autocast(CPU, "bf16"):
            low_cl = cl.forward_features(x.contiguous(memory_format=torch.channels_last))
    assert low.dtype == torch.bfloat16
    for got in (low.float(), low_cl.float()):
        cos = torch.nn.functional.cosine_similarity(got, ref, dim=1)
        assert cos.min() > 0.99  # bfloat16 keeps 8 bits of mantissa: about 0.4 % per value
        assert not torch.equal(got, ref)  # it did compute in bfloat16


def test_bf16_gradients_point_where_float32_gradients_point():
    gen = torch.Generator().manual_seed(1)
    x, y = torch.rand(64, 3, 28, 28, generator=gen), torch.randint(0, 10, (64,), generator=gen)
    grads, losses = {}, {}
    for amp in ("none", "bf16"):
        model = _model().train()
        with autocast(CPU, amp):
            loss = torch.nn.functional.cross_entropy(model(x), y)
        loss.backward()
        losses[amp] = loss.item()
        # The bias of a conv followed by batch norm has a true gradient of 0 (the norm
        # removes it): only rounding is left there, so it is not compared.
        grads[amp] = {n: p.grad for n, p in model.named_parameters()
                      if not (n.startswith("features.") and n.endswith(".bias") and p.ndim == 1
                              and isinstance(model.features[int(n.split(".")[1])], torch.nn.Conv2d))}
        assert all(g.dtype == torch.float32 for g in grads[amp].values())  # float32 weights and gradients
    assert losses["bf16"] == pytest.approx(losses["none"], rel=1e-3)
    cos = {n: torch.nn.functional.cosine_similarity(grads["bf16"][n].flatten(), g.flatten(), dim=0).item()
           for n, g in grads["none"].items()}
    assert len(cos) == 21 and min(cos.values()) > 0.9, cos  # 0.95-1.0 measured at initialisation


def test_a_bf16_channels_last_run_trains_and_keeps_auto_in_its_config(tiny_mnist_root, tmp_path, monkeypatch,
                                                                      caplog):
    import deepcluster.runtime as train_mod  # where native_bf16 lives

    caplog.set_level(logging.INFO, logger="deepcluster")
    monkeypatch.setattr(train_mod, "native_bf16", lambda device: True)
    run = train_tiny(tiny_mnist_root, tmp_path / "run", optim={"epochs": 1},
                     run={"amp": "auto", "channels_last": True})
    assert yaml.safe_load((run / "config.yaml").read_text())["run"]["amp"] == "auto"
    assert "--amp auto: bf16 on this CPU" in (run / "train.log").read_text()
    assert "epoch 0:" in caplog.text
    model, _ = load_model(run)  # float32 weights, usable without autocast
    assert all(p.dtype == torch.float32 and torch.isfinite(p).all() for p in model.parameters())
