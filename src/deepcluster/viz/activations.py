"""One forward pass over a sample of images, and the top-activating images of filters
(the paper's Figures 4, 5 and 7: "the top 9 activated images ... for target filters").

A filter's response to an image is the maximum over positions of its ReLU'd activation
map: a filter fires on a pattern wherever it is in the image.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np
import torch
from matplotlib.figure import Figure

from ..features import eval_mode, iter_features
from ..models import DeepClusterNet
from .images import make_grid


def check_layer(model: DeepClusterNet, layer: str) -> None:
    """Raise a ``ValueError`` naming the valid layers if ``layer`` is not one of the model's."""
    if layer not in model.conv_layers:
        raise ValueError(f"layer {layer!r} does not exist in this model; choose one of {list(model.conv_layers)}")


@dataclass
class SamplePass:
    """What one forward pass over a sample of images gives.

    Attributes:
        features: ``(n, fc_dim)`` clustering features (fc7 before its ReLU).
        scores: layer name -> ``(n, C_layer)`` per-filter max over positions of the
            ReLU'd activation.
    """

    features: np.ndarray
    scores: dict[str, np.ndarray]


@torch.no_grad()
def forward_pass(model: DeepClusterNet, images: torch.Tensor, layers: Sequence[str] = (),
                 batch_size: int = 256) -> SamplePass:
    """Features and per-filter responses of ``images`` in one pass of the network.

    Args:
        model: the network (put in eval mode for the pass, restored after).
        images: ``(n, 3, H, W)`` normalised network inputs.
        layers: conv layers whose filter responses are wanted (``conv1``...).
        batch_size: images per forward call.
    """
    for layer in layers:
        check_layer(model, layer)
    wanted = {model.conv_layers[name]: name for name in layers}
    device = next(model.parameters()).device

    def forward(x: torch.Tensor) -> dict[str, torch.Tensor]:
        out, h = {}, model.sobel(x)
        for i, module in enumerate(model.features):
            h = module(h)
            if i in wanted:
                out[wanted[i]] = h.amax(dim=(2, 3))  # (B, C): each filter's strongest response
        out["\0features"] = model.features_from_backbone(h)  # (B, feature_dim): what is clustered
        return out

    n = len(images)
    batches = [(images[s:s + batch_size], torch.arange(s, min(n, s + batch_size))) for s in range(0, n, batch_size)]
    feats = np.zeros((n, model.feature_dim), np.float32)
    scores: dict[str, np.ndarray] = {}
    with eval_mode(model):
        for idx, out, _ in iter_features(forward, batches, device, desc="forward pass"):
            feats[idx] = out.pop("\0features")
            for name, v in out.items():
                scores.setdefault(name, np.zeros((n, v.shape[1]), np.float32))[idx] = v
    return SamplePass(features=feats, scores={name: scores.get(name, np.zeros((0, 0), np.float32)) for name in layers})


def top_activating(scores: np.ndarray, filters: Sequence[int], k: int = 9) -> np.ndarray:
    """Indices of the ``k`` images with the highest response, per filter.

    Args:
        scores: ``(n, C)`` responses of ``n`` images to ``C`` filters.
        filters: filter indices.
        k: images per filter (at most ``n``).

    Returns:
        ``(len(filters), min(k, n))`` int64 row indices into ``scores``, strongest first
        (ties broken by the lower index).
    """
    scores = np.asarray(scores)
    if scores.ndim != 2:
        raise ValueError(f"scores must be (n, C), got shape {scores.shape}")
    bad = [f for f in filters if not 0 <= f < scores.shape[1]]
    if bad:
        raise ValueError(f"filter(s) {bad} out of range; the layer has {scores.shape[1]} filters")
    k = min(k, scores.shape[0])
    return np.stack([np.argsort(-scores[:, f], kind="stable")[:k] for f in filters]).astype(np.int64)


def pick_filters(scores: np.ndarray, n: int, seed: int = 0) -> list[int]:
    """A random sample of ``n`` *live* filters (sorted): filters that respond to at
    least one image; dead filters (always zero after the ReLU) show nothing."""
    live = np.flatnonzero(np.asarray(scores).max(0) > 0) if len(scores) else np.arange(0)
    if live.size == 0:
        live = np.arange(np.asarray(scores).shape[1])
    rng = np.random.default_rng(seed)
    return sorted(int(f) for f in rng.choice(live, min(n, live.size), replace=False))


def plot_top_images(display: np.ndarray, top: np.ndarray, filters: Sequence[int], layer: str,
                    ncols: int = 4) -> Figure:
    """One 3x3 tile (or ``sqrt(k)`` square) of top images per filter.

    Args:
        display: ``(n, H, W, 3)`` pictures in [0, 1] of the sample images.
        top: ``(F, k)`` output of :func:`top_activating`.
        filters: the ``F`` filter indices (titles).
        layer: layer name (title).
    """
    f = len(filters)
    ncols = min(ncols, f)
    nrows = -(-f // ncols)
    side = int(np.ceil(np.sqrt(top.shape[1])))
    fig = Figure(figsize=(2.4 * ncols, 2.5 * nrows + 0.4), dpi=100)
    for i, filt in enumerate(filters):
        ax = fig.add_subplot(nrows, ncols, i + 1)
        ax.imshow(make_grid(display[top[i]], ncols=side, pad=1), interpolation="nearest")
        ax.set_title(f"{layer} filter {filt}", fontsize=9)
        ax.set_axis_off()
    fig.suptitle(f"top-{top.shape[1]} activating images, {layer}", fontsize=11)
    fig.tight_layout()
    return fig
