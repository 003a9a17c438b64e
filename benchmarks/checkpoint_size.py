"""Size of a training checkpoint (``checkpoint.pt``) per architecture, at default settings.

Builds the dict ``train._save_epoch`` writes after one epoch (model, SGD momentum,
epoch, RNG states, assignment history, meta, config, PCA, centroids, the model the
clustering features came from) with the package's own builders, saves it with
``save_checkpoint`` and prints its size, what each key takes and the size of its
``export-model`` safetensors file. No training: the
sizes depend on shapes only. Usage::

    .venv/bin/python benchmarks/checkpoint_size.py            # the three defaults
    .venv/bin/python benchmarks/checkpoint_size.py --images 1281167
"""

from __future__ import annotations

import argparse
import io
import os
import tempfile

import numpy as np
import torch

from deepcluster.checkpoint import rng_state, save_checkpoint
from deepcluster.clustering import PCAWhitening
from deepcluster.config import resolve
from deepcluster.export_model import export_model
from deepcluster.train import _meta, build_model, build_optimizer

CASES = [("alexnet_small", 28), ("alexnet", 224), ("vgg16", 224)]


def checkpoint_state(arch: str, size: int, images: int) -> dict:
    """The dict of a checkpoint after epoch 1 of ``arch`` at ``size`` px on ``images`` images."""
    cfg = resolve(overrides={"model": {"arch": arch}})
    k, pca_dim = cfg.cluster.k, cfg.cluster.pca_dim
    model = build_model(cfg, size, k)
    optimizer = build_optimizer(model, cfg)
    for p in model.parameters():  # one step with zero gradients creates every momentum buffer
        p.grad = torch.zeros_like(p)
    optimizer.step()
    rng = np.random.default_rng(0)
    pca = PCAWhitening(pca_dim).fit(rng.standard_normal((max(2 * pca_dim, 600), model.feature_dim), np.float32))
    return {"model": model.state_dict(), "optimizer": optimizer.state_dict(), "epoch": 1, "rng": rng_state(),
            "assignments": torch.zeros(1, images, dtype=torch.int32), "meta": _meta(cfg, images, size),
            "config": cfg.to_dict(), "pca": pca.state_dict(), "centroids": torch.zeros(k, pca_dim),
            "cluster_model": {n: v.clone() for n, v in model.state_dict().items() if not n.startswith("head.")},
            "world_size": 1}


def nbytes(value) -> int:
    buf = io.BytesIO()
    torch.save(value, buf)
    return buf.tell()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--images", type=int, default=60000, help="training images (Fashion-MNIST: 60000)")
    args = parser.parse_args()
    for arch, size in CASES:
        state = checkpoint_state(arch, size, args.images)
        with tempfile.TemporaryDirectory() as d:
            save_checkpoint(state, os.path.join(d, "checkpoint.pt"))
            total = os.path.getsize(os.path.join(d, "checkpoint.pt"))
            exported = os.path.getsize(export_model(d, "safetensors", os.path.join(d, "backbone.safetensors")))
        parts = ", ".join(f"{key} {nbytes(v) / 2**20:.1f}" for key, v in state.items() if nbytes(v) > 2**20)
        print(f"{arch:14s} {size:3d} px: checkpoint {total / 2**20:7.1f} MiB ({parts}; MiB); "
              f"export-model safetensors {exported / 2**20:.1f} MiB")


if __name__ == "__main__":
    main()
