"""Contact sheets of clusters: member images of the largest, smallest and random
clusters, with their purity against the labels when there are labels (the paper's
cluster-purity analysis, appendix Figure 3/4)."""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass

import numpy as np
from matplotlib.figure import Figure

from .images import make_grid


@dataclass
class ClusterPick:
    """A cluster chosen for display: its id, why (``largest``/``smallest``/``random``),
    its size, and its purity and majority label when labels exist."""

    cluster: int
    kind: str
    size: int
    purity: float | None = None
    majority: int | None = None


def cluster_purity_of(assignments: np.ndarray, labels: np.ndarray, cluster: int) -> tuple[float, int]:
    """Purity of one cluster: the fraction of its members in its most common label,
    and that label. ``assignments`` and ``labels`` are ``(N,)``."""
    members = np.asarray(labels)[np.asarray(assignments) == cluster]
    if members.size == 0:
        raise ValueError(f"cluster {cluster} is empty")
    values, counts = np.unique(members, return_counts=True)
    best = int(np.argmax(counts))
    return float(counts[best] / members.size), int(values[best])


def pick_clusters(assignments: np.ndarray, n_largest: int = 3, n_smallest: int = 3, n_random: int = 3,
                  seed: int = 0, labels: np.ndarray | None = None) -> list[ClusterPick]:
    """The ``n_largest`` largest, ``n_smallest`` smallest (non-empty) and ``n_random``
    random other clusters of ``assignments`` (``(N,)``), each at most once."""
    assignments = np.asarray(assignments)
    sizes = np.bincount(assignments)
    nonempty = np.flatnonzero(sizes > 0)
    by_size = nonempty[np.argsort(-sizes[nonempty], kind="stable")]
    chosen: list[tuple[int, str]] = [(int(c), "largest") for c in by_size[:n_largest]]
    taken = {c for c, _ in chosen}
    smallest = [int(c) for c in by_size[::-1] if int(c) not in taken][:n_smallest]
    chosen += [(c, "smallest") for c in smallest]
    taken |= set(smallest)
    rest = np.array([c for c in nonempty if int(c) not in taken], dtype=np.int64)
    if rest.size and n_random:
        rng = np.random.default_rng(seed)
        chosen += [(int(c), "random") for c in np.sort(rng.choice(rest, min(n_random, rest.size), replace=False))]
    picks = []
    for c, kind in chosen:
        p = ClusterPick(c, kind, int(sizes[c]))
        if labels is not None:
            p.purity, p.majority = cluster_purity_of(assignments, labels, c)
        picks.append(p)
    return picks


def cluster_members(assignments: np.ndarray, cluster: int, n: int, seed: int = 0) -> np.ndarray:
    """Up to ``n`` random members (sorted data-set indices) of ``cluster``."""
    members = np.flatnonzero(np.asarray(assignments) == cluster)
    if members.size > n:
        members = np.sort(np.random.default_rng(seed).choice(members, n, replace=False))
    return members


def contact_sheet(load: Callable[[int], np.ndarray], members: Sequence[int], ncols: int = 8) -> np.ndarray:
    """The pictures ``load(i)`` (``(H, W, 3)`` in [0, 1]) of ``members`` tiled in a grid."""
    if len(members) == 0:
        raise ValueError("a contact sheet needs at least one image")
    return make_grid(np.stack([load(int(i)) for i in members]), ncols=min(ncols, len(members)), pad=1)


def cluster_title(pick: ClusterPick, class_names: Sequence[str] | None = None) -> str:
    """``cluster 17 (largest): 1,234 images, purity 0.83 (Trouser)``."""
    text = f"cluster {pick.cluster} ({pick.kind}): {pick.size:,} images"
    if pick.purity is not None:
        name = class_names[pick.majority] if class_names is not None and pick.majority is not None \
            and 0 <= pick.majority < len(class_names) else str(pick.majority)
        text += f", purity {pick.purity:.2f} ({name})"
    return text


def plot_contact_sheet(sheet: np.ndarray, title: str) -> Figure:
    """One cluster's contact sheet with its title."""
    h, w = sheet.shape[:2]
    width = 4.8
    fig = Figure(figsize=(width, width * h / w + 0.45), dpi=100)
    ax = fig.add_subplot()
    ax.imshow(sheet, interpolation="nearest")
    ax.set_axis_off()
    ax.set_title(title, fontsize=9)
    fig.tight_layout()
    return fig
