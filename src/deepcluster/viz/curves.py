"""Training curves from ``metrics.jsonl`` records (the paper's Figure 2 a/b)."""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path
from typing import Any

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
from matplotlib.figure import Figure  # noqa: E402
from matplotlib.ticker import MaxNLocator  # noqa: E402


def _epoch_axis(ax, epochs: Sequence[int]) -> None:
    """Integer epoch ticks, with room around the points when there are few epochs."""
    ax.set_xlabel("epoch")
    if epochs:
        lo, hi = min(epochs), max(epochs)
        if hi - lo < 4:
            ax.set_xlim(lo - 0.5, hi + 0.5)
    ax.xaxis.set_major_locator(MaxNLocator(integer=True))


def _legend(ax, **kwargs: Any) -> None:
    """``ax.legend(**kwargs)`` when ``ax`` has labelled artists (an unlabelled run's first
    epoch has no NMI to plot: matplotlib would warn "No artists with labels found")."""
    if ax.get_legend_handles_labels()[0]:
        ax.legend(**kwargs)


def plot_nmi(records: Sequence[dict[str, Any]]) -> Figure:
    """NMI of the assignments vs the labels and vs the previous epoch, per epoch."""
    fig, ax = plt.subplots(figsize=(6, 4), dpi=100)
    epochs = [r["epoch"] for r in records]
    for key, label in (("nmi_labels", "NMI(clusters, labels)"), ("nmi_prev", "NMI(epoch t-1, epoch t)")):
        pts = [(e, r[key]) for e, r in zip(epochs, records) if r.get(key) is not None]
        if pts:
            ax.plot(*zip(*pts), marker="o", label=label)
    _epoch_axis(ax, epochs)
    ax.set_ylabel("NMI")
    ax.set_ylim(0, 1)
    ax.grid(alpha=0.3)
    _legend(ax, loc="lower right")
    ax.set_title("DeepCluster: cluster quality and stability")
    fig.tight_layout()
    return fig


def save_figure(fig: Figure, path) -> None:
    """Write ``fig`` atomically (a reader, or a crash, never sees half a file) and close it."""
    from ..io import atomic_write

    fmt = Path(path).suffix.lstrip(".") or "png"
    try:
        atomic_write(path, lambda f: fig.savefig(f, format=fmt))
    finally:
        plt.close(fig)


def _epochs_and(records: Sequence[dict[str, Any]], key: str) -> tuple[list[int], list[float]]:
    pts = [(r["epoch"], r[key]) for r in records if r.get(key) is not None]
    return ([e for e, _ in pts], [v for _, v in pts]) if pts else ([], [])


def plot_losses(records: Sequence[dict[str, Any]]) -> Figure:
    """Convnet loss (cross-entropy on the pseudo-labels) and clustering loss (mean
    squared distance to the centroid, in the PCA-whitened space), per epoch.

    The two are on different scales, so each has its own panel.
    """
    fig, axes = plt.subplots(1, 2, figsize=(9, 3.6), dpi=100)
    for ax, key, title in ((axes[0], "convnet_loss", "convnet loss (cross-entropy)"),
                           (axes[1], "clustering_loss", "clustering loss (k-means)")):
        e, v = _epochs_and(records, key)
        ax.plot(e, v, marker="o")
        _epoch_axis(ax, [r["epoch"] for r in records])
        ax.set_title(title, fontsize=10)
        ax.grid(alpha=0.3)
    fig.tight_layout()
    return fig


def plot_cluster_sizes(records: Sequence[dict[str, Any]]) -> Figure:
    """Spread of the cluster sizes per epoch: min, median, max (log scale) and the
    number of empty clusters (re-seeded by the empty-cluster rule)."""
    fig, ax = plt.subplots(figsize=(6, 4), dpi=100)
    for key, label in (("cluster_size_max", "largest"), ("cluster_size_median", "median"),
                       ("cluster_size_min", "smallest")):
        e, v = _epochs_and(records, key)
        ax.plot(e, [max(x, 0.5) for x in v], marker="o", label=label)
    ax.set_yscale("log")
    _epoch_axis(ax, [r["epoch"] for r in records])
    ax.set_ylabel("images per cluster")
    ax.grid(alpha=0.3, which="both")
    e, v = _epochs_and(records, "empty_reseeded")
    title = "cluster sizes"
    if v and any(v):
        title += f" (empty clusters re-seeded: {int(sum(v))} in all)"
    ax.set_title(title, fontsize=10)
    _legend(ax, loc="best", fontsize=8)
    fig.tight_layout()
    return fig


PHASES = (("extract_s", "extract features"), ("pca_s", "PCA"), ("kmeans_s", "clustering"), ("train_s", "train"))


def plot_timings(records: Sequence[dict[str, Any]]) -> Figure:
    """Seconds per phase of each epoch, stacked (the rest of ``epoch_s`` is "other")."""
    fig, ax = plt.subplots(figsize=(6, 4), dpi=100)
    epochs = [r["epoch"] for r in records]
    bottom = [0.0] * len(records)
    for key, label in PHASES:
        vals = [float(r.get(key) or 0.0) for r in records]
        ax.bar(epochs, vals, bottom=bottom, label=label)
        bottom = [b + v for b, v in zip(bottom, vals)]
    other = [max(0.0, float(r.get("epoch_s") or 0.0) - b) for r, b in zip(records, bottom)]
    if any(o > 0.005 * max(bottom + [1e-9]) for o in other):
        ax.bar(epochs, other, bottom=bottom, label="other", color="0.75")
    _epoch_axis(ax, epochs)
    ax.set_ylabel("seconds")
    ax.set_title("time per phase", fontsize=10)
    _legend(ax, loc="best", fontsize=8)
    ax.grid(alpha=0.3, axis="y")
    fig.tight_layout()
    return fig


def plot_size_histogram(sizes, title: str | None = None) -> Figure:
    """Histogram of cluster sizes (how many clusters have how many images), with
    logarithmic bins when the sizes span more than a factor 10."""
    import numpy as np

    sizes = np.asarray(sizes)
    nonempty = sizes[sizes > 0]
    fig, ax = plt.subplots(figsize=(6, 4), dpi=100)
    if nonempty.size:
        lo, hi = nonempty.min(), nonempty.max()
        if hi > 10 * lo:
            bins = np.logspace(np.log10(lo * 0.99), np.log10(hi * 1.01), 30)  # margins: rounding keeps ends in
            ax.set_xscale("log")
        else:
            bins = min(30, max(5, int(hi - lo + 1)))
        ax.hist(nonempty, bins=bins, color="C0", edgecolor="white")
    ax.set_xlabel("images in the cluster")
    ax.set_ylabel("number of clusters")
    n_empty = int((sizes == 0).sum())
    ax.set_title(title or f"cluster sizes ({len(sizes)} clusters, {n_empty} empty)", fontsize=10)
    ax.grid(alpha=0.3)
    fig.tight_layout()
    return fig
