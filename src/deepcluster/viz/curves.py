"""Training curves from ``metrics.jsonl`` records (the paper's Figure 2 a/b)."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
from matplotlib.figure import Figure  # noqa: E402


def plot_nmi(records: Sequence[dict[str, Any]]) -> Figure:
    """NMI of the assignments vs the labels and vs the previous epoch, per epoch."""
    fig, ax = plt.subplots(figsize=(6, 4), dpi=100)
    epochs = [r["epoch"] for r in records]
    for key, label in (("nmi_labels", "NMI(clusters, labels)"), ("nmi_prev", "NMI(epoch t-1, epoch t)")):
        pts = [(e, r[key]) for e, r in zip(epochs, records) if r.get(key) is not None]
        if pts:
            ax.plot(*zip(*pts), marker="o", label=label)
    ax.set_xlabel("epoch")
    ax.set_ylabel("NMI")
    ax.set_ylim(0, 1)
    ax.grid(alpha=0.3)
    ax.legend(loc="lower right")
    ax.set_title("DeepCluster: cluster quality and stability")
    fig.tight_layout()
    return fig


def save_figure(fig: Figure, path) -> None:
    fig.savefig(path)
    plt.close(fig)
