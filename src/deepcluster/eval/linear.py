"""Linear probes on frozen conv layers (Zhang et al.'s protocol, the paper's Table 1).

For each conv layer the ReLU'd activations of the frozen network (batch norm frozen too)
are average-pooled to about a fixed dimension (:mod:`.features`), flattened and cached;
a linear classifier is trained on the labelled training split with (lr, weight decay)
chosen on the held-out validation part, then retrained on the whole training split and
reported on the test split (:func:`.classifier.select_and_fit`).
"""

from __future__ import annotations

import logging
import time
from collections.abc import Sequence
from typing import Any

from .classifier import Grid, linear_head, select_and_fit
from .context import EvalContext

logger = logging.getLogger(__name__)

LINEAR_GRID = Grid(lrs=(0.01, 0.1), weight_decays=(1e-3, 1e-2), epochs=10, batch_size=256)
"""Default search: 2 learning rates x 2 weight decays, 10 epochs each (docs/EVALUATION.md)."""


def linear_eval(ctx: EvalContext, layers: Sequence[str] | None = None, grid: Grid = LINEAR_GRID,
                write: bool = True) -> dict[str, Any]:
    """Linear probe of each of ``layers`` (default: every conv layer, or ``pixels``).

    Returns:
        The result: ``layers -> {test_top1, val_top1, lr, weight_decay, dim, pool, ...}``
        and ``metrics -> {"linear_<layer>": test top-1}``; written to ``linear.json``.
    """
    t0 = time.perf_counter()
    layers = ctx.encoder.check_layers(list(layers) if layers else ctx.encoder.layers)
    dims = ctx.encoder.dims()
    train = ctx.store.get("train", layers)  # one pass over the images for every layer
    test = ctx.store.get("test", layers)
    results: dict[str, Any] = {}
    for name in layers:
        logger.info("linear probe %s: %d dims (pool %dx%d), %d train / %d val / %d test images", name,
                    dims[name]["dim"], dims[name]["pool"], dims[name]["pool"], len(ctx.data.fit), len(ctx.data.val),
                    len(ctx.data.test))
        r = select_and_fit(linear_head, train[name], ctx.data.train_labels, ctx.data.fit, ctx.data.val,
                           test[name], ctx.data.test_labels, ctx.data.num_classes, grid, seed=ctx.seed,
                           device=ctx.device)
        results[name] = {**dims[name], **r}
        logger.info("linear probe %s: test top-1 %.4f (val %.4f; lr %g, wd %g)", name, r["test_top1"],
                    r["val_top1"], r["lr"], r["weight_decay"])
    out = {**ctx.header("linear"), "grid": grid.as_dict(),
           "layers": results, "metrics": {f"linear_{n}": results[n]["test_top1"] for n in layers},
           "seconds": time.perf_counter() - t0}
    if write:
        ctx.write("linear", out)
    return out
