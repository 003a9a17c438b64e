"""Monitoring a training run: callbacks the CLI wires into :func:`deepcluster.train.train`.

The loop itself imports no evaluation and no plotting; these callbacks bring them in:

- :class:`NmiPlot`: ``nmi.png`` in the run folder after every epoch;
- :class:`KnnProbe`: the cheap k-NN probe every ``run.eval_every`` epochs (held-out
  labelled images; the keys ``knn_top1``, ``knn_weighted_top1`` in ``metrics.jsonl``);
- :class:`TensorBoard`: scalars and image grids for ``--tensorboard``.

``default_callbacks(cfg)`` is what ``deepcluster train`` uses; a Python caller passes
it too: ``train(cfg, callbacks=default_callbacks(cfg))``.
"""

from __future__ import annotations

import logging
from typing import Any

import numpy as np
import torch

from .config import Config

logger = logging.getLogger(__name__)


class Monitor:
    """A callback that does nothing: subclasses override what they need."""

    def on_start(self, run: Any) -> None:
        """Once the run folder is ours, before the first epoch."""

    def on_epoch(self, run: Any, record: dict[str, Any]) -> None:
        """Before the epoch is saved; may add keys to ``record``."""

    def after_epoch(self, run: Any, records: list[dict[str, Any]]) -> None:
        """After the epoch's checkpoint is written."""

    def close(self) -> None:
        """When the run ends, however it ends."""


class NmiPlot(Monitor):
    """``nmi.png``: NMI over the epochs (a failed write is a warning, never the run's end)."""

    def after_epoch(self, run: Any, records: list[dict[str, Any]]) -> None:
        from .distributed import is_main_process
        from .viz import plot_nmi, save_figure

        if not is_main_process():
            return
        try:
            save_figure(plot_nmi(records), run.run.plot)
        except OSError as e:
            logger.warning("could not write %s: %s", run.run.plot, e)


class KnnProbe(Monitor):
    """The stopping criterion of the paper's Section 4: k-NN on held-out labelled images
    every ``every`` epochs (training never sees the labels). Unlabelled data: a warning
    at the first epoch, no probe."""

    def __init__(self, every: int) -> None:
        self.every = every
        self._warned = False

    def on_epoch(self, run: Any, record: dict[str, Any]) -> None:
        from .eval.knn import knn_probe

        if (record["epoch"] + 1) % self.every:
            return
        if run.labels is None:
            if not self._warned:
                logger.warning("--eval-every %d: the data set has no labels, so the k-NN probe cannot run", self.every)
                self._warned = True
            return
        cfg = run.cfg
        record.update(knn_probe(run.model, run.cluster_ds, run.labels, run.device, seed=cfg.run.seed,
                                batch_size=cfg.optim.batch_size, workers=cfg.run.workers, amp=cfg.run.amp,
                                channels_last=cfg.run.channels_last))


class TensorBoard(Monitor):
    """``RUN/tensorboard``: every numeric entry of the record, conv1 filters, top images."""

    def __init__(self) -> None:
        self.writer = None
        self.sample: torch.Tensor | None = None

    def on_start(self, run: Any) -> None:
        from .distributed import is_main_process
        from .tensorboard import TensorBoardWriter

        if is_main_process():  # the tensorboard package is imported here: missing, the run stops at once
            self.writer = TensorBoardWriter(run.run.path)
            n = len(run.cluster_ds)
            self.sample = torch.stack([run.cluster_ds[int(i)][0] for i in np.linspace(0, n - 1, min(64, n))])

    def after_epoch(self, run: Any, records: list[dict[str, Any]]) -> None:
        if self.writer is not None:
            self.writer.log_epoch(records[-1], run.model, self.sample)

    def close(self) -> None:
        if self.writer is not None:
            self.writer.close()


def default_callbacks(cfg: Config) -> list[Monitor]:
    """The monitors ``deepcluster train`` runs with ``cfg``."""
    out: list[Monitor] = [NmiPlot()]
    if cfg.run.eval_every:
        out.append(KnnProbe(cfg.run.eval_every))
    if cfg.run.tensorboard:
        out.append(TensorBoard())
    return out
