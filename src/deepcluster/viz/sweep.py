"""The k sweep as a figure: each metric against the number of clusters k (the paper's
Figure 3, which plots NMI and transfer quality against k on a log axis)."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
from matplotlib.figure import Figure  # noqa: E402
from matplotlib.ticker import FixedLocator, NullLocator, ScalarFormatter  # noqa: E402

from .curves import _legend  # noqa: E402

PANELS: tuple[tuple[str, tuple[tuple[str, str], ...], bool], ...] = (
    ("labelled (test split, k-means at the number of classes)",
     (("knn", "k-NN top-1"), ("nmi", "k-means NMI"), ("acc", "k-means ACC")), False),
    ("label-free agreement", (("stability", "stability across k-means seeds"),
                              ("nmi_prev", "NMI(epoch t-1, epoch t)"),
                              ("nmi_chance", "chance level (clusters shuffled)")), False),
    ("label-free: RankMe of the clustering features", (("rankme", "RankMe"),), False),
    ("cluster sizes at the last epoch", (("size_max", "max"), ("size_median", "median"), ("size_min", "min")), True),
)
"""(title, ((row key, label), ...), log y axis) of each panel."""


def _k_axis(ax, ks: Sequence[int]) -> None:
    """A log x axis labelled with exactly the values of k swept."""
    ax.set_xscale("log")
    ax.set_xlabel("k (clusters during training)")
    if ks:
        ax.set_xlim(min(ks) / 1.5, max(ks) * 1.5)
        ax.xaxis.set_major_locator(FixedLocator(sorted(ks)))
        ax.xaxis.set_minor_locator(NullLocator())
        ax.set_xticklabels([str(k) for k in sorted(ks)])


def plot_sweep(rows: Sequence[dict[str, Any]], title: str | None = None) -> Figure:
    """Four panels of the sweep's metrics against k (log axis), one point per run.

    Args:
        rows: one dict per run with ``k`` and any of the keys of :data:`PANELS`
            (``None`` or missing values are not drawn: an unlabelled data set leaves the
            first panel empty, with a note).
        title: the figure's title.
    """
    rows = sorted(rows, key=lambda r: r["k"])
    ks = [r["k"] for r in rows]
    fig, axes = plt.subplots(2, 2, figsize=(10, 7), dpi=100)
    for ax, (name, series, log_y) in zip(axes.flat, PANELS):
        for key, label in series:
            pts = [(r["k"], r[key]) for r in rows if r.get(key) is not None]
            if pts:
                style = {"linestyle": "--", "color": "grey"} if key == "nmi_chance" else {}
                ax.plot(*zip(*pts), marker="o", label=label, **style)
        if not ax.lines:
            ax.text(0.5, 0.5, "not measured (no labels)" if series[0][0] == "knn" else "not measured",
                    ha="center", va="center", transform=ax.transAxes, color="grey")
        _k_axis(ax, ks)
        if log_y and ax.lines:  # symmetric log: an empty cluster (size 0) stays on the axis
            ax.set_yscale("symlog", linthresh=1)
            ax.yaxis.set_major_formatter(ScalarFormatter())
            ax.set_ylim(bottom=0)
        elif not log_y and series[0][0] != "rankme":
            ax.set_ylim(0, 1)
        ax.set_title(name, fontsize=10)
        ax.grid(alpha=0.3)
        _legend(ax, fontsize=8)
    fig.suptitle(title or "DeepCluster: metrics against k")
    fig.tight_layout()
    return fig
