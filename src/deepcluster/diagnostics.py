"""Health checks of a running DeepCluster: is the clustering collapsing?

Two signs, checked after every epoch (see :func:`collapse_warning`):

- one cluster holds more than half of the images: the features no longer separate
  the data (the "trivial solution" the paper's uniform sampling guards against);
- the assignments stop changing: NMI between consecutive epochs >= 0.999 for several
  epochs in a row, so the network is trained on the same labels again and again.

Neither stops the run (both can be transient); each gives a warning in ``train.log``
and a ``collapse_warning`` string in the epoch's metrics record, naming likely causes.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import TYPE_CHECKING

import numpy as np

from .metrics import nmi

if TYPE_CHECKING:  # the configuration is only read here (names of settings in the message)
    from .config import Config

MAX_CLUSTER_FRACTION = 0.5
"""A cluster holding more than this fraction of the images is a collapse."""
STALL_NMI = 0.999
"""NMI between consecutive epochs at or above this means the assignments did not change."""
STALL_EPOCHS = 3
"""Consecutive epochs of stalled assignments before a warning."""


def recent_nmi_prev(history: np.ndarray, assignments: np.ndarray, current: float | None,
                    count: int = STALL_EPOCHS) -> list[float]:
    """NMI between consecutive epochs for the last ``count`` epochs, oldest first.

    Args:
        history: ``(E, N)`` assignments of the previous epochs.
        assignments: ``(N,)`` this epoch's assignments.
        current: ``nmi(history[-1], assignments)`` when already computed (else None).
        count: how many values at most.

    Only computes older values while the newer ones are at or above :data:`STALL_NMI`
    (so the common case costs nothing beyond ``current``).
    """
    if len(history) == 0:
        return []
    series = [nmi(history[-1], assignments) if current is None else float(current)]
    for back in range(1, count):
        if series[-1] < STALL_NMI or len(history) < back + 1:
            break
        series.append(nmi(history[-back - 1], history[-back]))
    return series[::-1]


def collapse_warning(sizes: np.ndarray, nmi_prev: Sequence[float], cfg: Config) -> str | None:
    """A one-line warning with likely causes if the clustering collapsed, else None.

    Args:
        sizes: ``(k,)`` images per cluster this epoch.
        nmi_prev: NMI between consecutive epochs, oldest first, ending with this epoch's
            (see :func:`recent_nmi_prev`).
        cfg: the run's configuration (to name the settings that may be at fault).
    """
    sizes = np.asarray(sizes)
    n = int(sizes.sum())
    problems, causes = [], []
    if n and sizes.max() > MAX_CLUSTER_FRACTION * n:
        problems.append(f"one cluster holds {sizes.max() / n:.0%} of the images ({int(sizes.max())} of {n})")
        causes.append(f"learning rate too high (optim.lr={cfg.optim.lr:g}: try a lower --lr)")
        causes.append(f"too few clusters (k={cfg.cluster.k}: over-segment, try a larger --k)")
        if cfg.optim.balance == "none":
            causes.append("no balancing (--balance none: use the default uniform sampler)")
        if not cfg.model.sobel:
            causes.append("Sobel off (--no-sobel): on colour images k-means groups by colour")
        causes.append("many duplicate or near-identical images in the data")
    recent = list(nmi_prev)[-STALL_EPOCHS:]
    if len(recent) == STALL_EPOCHS and min(recent) >= STALL_NMI:
        problems.append(f"the assignments have not changed for {STALL_EPOCHS} epochs "
                        f"(NMI vs previous >= {STALL_NMI})")
        causes.append(f"learning rate too low to move the features (optim.lr={cfg.optim.lr:g})")
        causes.append("a collapsed representation (check the cluster sizes)")
        causes.append("training has converged: later epochs add nothing (consider stopping)")
    if not problems:
        return None
    seen: list[str] = []
    for c in causes:
        if c not in seen:
            seen.append(c)
    return f"possible collapse: {'; '.join(problems)}. Likely causes: {'; '.join(seen)}"


RANKME_FLOOR = 0.05
"""A RankMe below this fraction of its epoch-0 value (the random network's) is a warning.

Measured (docs/QUALITY_SIGNAL.md): RankMe falls steadily in ordinary training (210 -> 86
-> 44 -> 21, i.e. to 10 %, over four short epochs of 2,000 Fashion-MNIST images) and to
1.7 (0.8 %) for a network degraded by a learning rate of 1.0; on the 240-image test
fixture, lr 0.5 takes it to 10 % and lr 0.5 with weight decay 0.05 to 3 %. The floor sits
between ordinary decline and a collapsed representation. Provisional: chosen on a handful
of networks; a data set of very few, very separable classes has a low rank by nature."""


def quality_warning(rankme: float | None, first: float | None, epoch: int) -> str | None:
    """A one-line warning when the label-free RankMe of the clustering features fell below
    :data:`RANKME_FLOOR` times its first value (the network the run started from), else None."""
    if rankme is None or first is None or first <= 0 or epoch == 0:
        return None
    if rankme >= RANKME_FLOOR * first:
        return None
    return (f"the features' effective rank (RankMe) fell to {rankme:.1f}, below {RANKME_FLOOR:g} x its epoch-0 "
            f"value {first:.1f}: the network may now be worse than the one it started from (collapse or "
            "over-fitting the pseudo-labels); try a lower --lr, fewer epochs or a smaller --k, "
            "or --stop-when-worse")
