"""First-layer filters as pictures (the paper's Figure 3).

With the Sobel front end, conv1 sees two gradient channels, not pixels. Its filters are
shown as the *effective* filter on the grey image: each conv1 kernel convolved with
the Sobel kernel of its input channel and summed over the two channels, a
``(k + 2) x (k + 2)`` kernel that conv1 ∘ Sobel applies to the grey level (the
grey conversion is the channel mean, so the same kernel / 3 acts on each of R, G, B).
Without Sobel, each filter is shown in colour, its RGB weights as they are.
"""

from __future__ import annotations

import math

import numpy as np
import torch
from matplotlib.figure import Figure
from scipy.signal import convolve2d

from ..models import DeepClusterNet, Sobel
from .images import make_grid, symmetric_scale


def first_conv(model: DeepClusterNet) -> torch.nn.Conv2d:
    """The network's first convolution (conv1, before batch norm)."""
    for m in model.features:
        if isinstance(m, torch.nn.Conv2d):
            return m
    raise ValueError("model has no convolution in its features")


def first_layer_filters(model: DeepClusterNet) -> np.ndarray:
    """conv1's filters as they act on the input image.

    Returns:
        Sobel models: ``(F, k + 2, k + 2)`` effective kernels on the grey level (see the
        module docstring). Raw-RGB models: ``(F, k, k, 3)`` kernels on R, G, B.
    """
    w = first_conv(model).weight.detach().cpu().double().numpy()  # (F, C_in, k, k)
    if isinstance(model.sobel, Sobel):
        s = model.sobel.sobel_weight.detach().cpu().double().numpy()[:, 0]  # (2, 3, 3): x, y
        if w.shape[1] != s.shape[0]:
            raise ValueError(f"conv1 has {w.shape[1]} input channels, the Sobel layer gives {s.shape[0]}")
        # conv1(Sobel(g)): two cross-correlations compose into one whose kernel is the
        # true (flipped) convolution of the two kernels.
        return np.stack([sum(convolve2d(wf[c], s[c], mode="full") for c in range(s.shape[0])) for wf in w])
    if w.shape[1] != 3:
        raise ValueError(f"conv1 of a raw-RGB model should have 3 input channels, has {w.shape[1]}")
    return w.transpose(0, 2, 3, 1)


def filter_grid(model: DeepClusterNet, ncols: int | None = None, pad: int = 1) -> np.ndarray:
    """All first-layer filters tiled into one ``(H, W, 3)`` picture in [0, 1].

    Each filter is scaled on its own, symmetric about zero: mid-grey is 0, black and
    white (or saturated colours) are its most negative and positive weights.
    """
    f = first_layer_filters(model)
    tiles = np.stack([symmetric_scale(x) for x in f])
    return make_grid(tiles, ncols=ncols or math.ceil(math.sqrt(len(tiles))), pad=pad, pad_value=1.0)


def plot_filters(model: DeepClusterNet, title: str | None = None) -> Figure:
    """The filter grid in a matplotlib figure with a title saying what is shown."""
    grid = filter_grid(model)
    kind = "conv1 ∘ Sobel on the grey image" if isinstance(model.sobel, Sobel) else "conv1 on RGB"
    fig = Figure(figsize=(6, 6 * grid.shape[0] / grid.shape[1] + 0.4), dpi=100)
    ax = fig.add_subplot()
    ax.imshow(grid, interpolation="nearest")
    ax.set_axis_off()
    ax.set_title(title or f"first-layer filters ({kind}), {len(first_layer_filters(model))} filters")
    fig.tight_layout()
    return fig
