"""MLP probe: a fresh fc6-fc7-classifier trained on frozen conv features (the paper's
supplementary Table 1: "retrain fc6-8").

The input is the flattened output of the frozen conv stack (conv5 after its max-pool:
exactly what fc6 sees; cached like the linear probe's features). The MLP has the
network's shape: ``dropout -> fc6 (fc_dim) -> ReLU -> dropout -> fc7 (fc_dim) -> ReLU ->
classifier``. Hyper-parameters are chosen on the validation part as for the linear probe.
"""

from __future__ import annotations

import logging
import time
from typing import Any

from torch import nn

from .classifier import Grid, select_and_fit
from .context import EvalContext

logger = logging.getLogger(__name__)

MLP_GRID = Grid(lrs=(0.05, 0.2), weight_decays=(1e-4,), epochs=10, batch_size=256)
"""Default search: 2 learning rates, weight decay 1e-4, 10 epochs (docs/EVALUATION.md)."""


def mlp_head(hidden: int, dropout: float = 0.5):
    """A factory ``(in_dim, num_classes) -> fc6-fc7-classifier`` with ``hidden`` units."""

    def make(in_dim: int, num_classes: int) -> nn.Module:
        return nn.Sequential(
            nn.Dropout(dropout), nn.Linear(in_dim, hidden), nn.ReLU(inplace=True),
            nn.Dropout(dropout), nn.Linear(hidden, hidden), nn.ReLU(inplace=True),
            nn.Linear(hidden, num_classes),
        )

    return make


def mlp_eval(ctx: EvalContext, grid: Grid = MLP_GRID, hidden: int | None = None,
             write: bool = True) -> dict[str, Any]:
    """Train a fresh fc6-fc7-classifier on the frozen conv stack's output.

    Args:
        hidden: width of fc6/fc7 (default: the network's ``fc_dim``).

    Returns:
        The result (``metrics -> {"mlp": test top-1}``); written to ``mlp.json``.
    """
    model = ctx.require_model("mlp")
    t0 = time.perf_counter()
    hidden = hidden or model.fc_dim
    train = ctx.store.get("train", ["backbone"])["backbone"]
    test = ctx.store.get("test", ["backbone"])["backbone"]
    logger.info("MLP probe: %d -> %d -> %d -> %d", train.shape[1], hidden, hidden, ctx.data.num_classes)
    r = select_and_fit(mlp_head(hidden), train, ctx.data.train_labels, ctx.data.fit, ctx.data.val, test,
                       ctx.data.test_labels, ctx.data.num_classes, grid, seed=ctx.seed, device=ctx.device)
    logger.info("MLP probe: test top-1 %.4f (val %.4f; lr %g, wd %g)", r["test_top1"], r["val_top1"], r["lr"],
                r["weight_decay"])
    out = {**ctx.header("mlp"), "input_dim": int(train.shape[1]), "hidden": hidden,
           "grid": grid.as_dict(),
           "result": r, "metrics": {"mlp": r["test_top1"]}, "seconds": time.perf_counter() - t0}
    if write:
        ctx.write("mlp", out)
    return out
