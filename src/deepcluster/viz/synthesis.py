"""Filters synthesised by gradient ascent (the paper's Figure 4 method).

Paper, Section 5.2: "we learn an input image that maximizes the activation of a target
filter ... [using] a cross entropy function between the target filter and the other
filters of the same layer". Here: start from noise; at every step take the spatial
mean of each filter's ReLU'd activation map as the logits of a softmax over the
layer's filters, and climb ``log softmax[target] - weight_decay * ||x||^2`` with a
normalised gradient step; blur the image every few steps (a prior for natural images
that removes high-frequency adversarial patterns). Images stay inside the range of
valid pixels. All filters asked for are synthesised together as one batch (each image
has its own target; the network is in eval mode, so the images do not interact).
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import numpy as np
import torch
from matplotlib.figure import Figure

from ..models import DeepClusterNet, Sobel
from .activations import check_layer
from .images import make_grid, stretch


def gaussian_kernel1d(sigma: float) -> torch.Tensor:
    """Normalised 1-D Gaussian of standard deviation ``sigma``, radius ``round(3 sigma)``
    (at least 1; scipy's ``gaussian_filter`` truncation)."""
    if sigma <= 0:
        raise ValueError(f"blur sigma must be > 0, got {sigma}")
    r = max(1, int(3 * sigma + 0.5))
    t = torch.arange(-r, r + 1, dtype=torch.float64)
    k = torch.exp(-0.5 * (t / sigma) ** 2)
    return (k / k.sum()).float()


def gaussian_blur(x: torch.Tensor, sigma: float) -> torch.Tensor:
    """Separable Gaussian blur of each channel, reflect padding: ``(B, C, H, W) -> same``."""
    k = gaussian_kernel1d(sigma).to(x)
    r = (len(k) - 1) // 2
    c = x.shape[1]
    mode = "reflect" if min(x.shape[-2:]) > r else "replicate"
    y = torch.nn.functional.pad(x, (r, r, 0, 0), mode=mode)
    y = torch.nn.functional.conv2d(y, k.view(1, 1, 1, -1).expand(c, 1, 1, -1), groups=c)
    y = torch.nn.functional.pad(y, (0, 0, r, r), mode=mode)
    return torch.nn.functional.conv2d(y, k.view(1, 1, -1, 1).expand(c, 1, -1, 1), groups=c)


def layer_mean_activations(model: DeepClusterNet, layer: str, x: torch.Tensor) -> torch.Tensor:
    """Spatial mean of every filter's ReLU'd activation: ``(B, 3, H, W) -> (B, C_layer)``."""
    check_layer(model, layer)
    return model.forward_conv(x, [layer])[layer].mean(dim=(2, 3))


def noise_images(n: int, image_size: int, mean: Sequence[float], std: Sequence[float], grey: bool,
                 seed: int = 0, noise_std: float = 0.1) -> torch.Tensor:
    """Starting points: pixels ``0.5 + noise_std * N(0, 1)`` (grey for Sobel models,
    which only see the grey level), clipped to [0, 1] and normalised like network
    inputs: ``(n, 3, S, S)``."""
    g = torch.Generator().manual_seed(seed)
    shape = (n, 1 if grey else 3, image_size, image_size)
    px = (0.5 + noise_std * torch.randn(shape, generator=g)).clamp(0, 1).expand(n, 3, image_size, image_size)
    m = torch.as_tensor(mean).view(1, 3, 1, 1)
    s = torch.as_tensor(std).view(1, 3, 1, 1)
    return ((px - m) / s).contiguous()


def synthesize(model: DeepClusterNet, layer: str, filters: Sequence[int], mean: Sequence[float],
               std: Sequence[float], steps: int = 200, lr: float = 0.05, weight_decay: float = 1e-4,
               blur_every: int = 4, blur_sigma: float = 0.5, noise_std: float = 0.1,
               seed: int = 0) -> torch.Tensor:
    """Images that maximise the chosen filters of ``layer``, one per filter.

    Args:
        model: the network (eval mode is used; its weights are not changed).
        layer: conv layer (``conv1`` ... ``conv5``).
        filters: target filter indices in that layer.
        mean, std: the input normalisation (to start from noise in pixel space and to
            keep pixels in [0, 1]).
        steps: gradient steps (the report uses a few hundred at most).
        lr: step size as the RMS change of a (normalised) input value per step.
        weight_decay: weight of the ``||x||^2`` penalty.
        blur_every, blur_sigma: Gaussian blur of the image every ``blur_every`` steps.
        noise_std: standard deviation of the starting noise, in pixel units.
        seed: seeds the starting noise.

    Returns:
        ``(F, 3, H, W)`` synthesised images in the normalised input space.
    """
    check_layer(model, layer)
    filters = [int(f) for f in filters]
    if steps < 0:
        raise ValueError(f"steps must be >= 0, got {steps}")
    device = next(model.parameters()).device
    was_training = model.training
    model.eval()
    grey = isinstance(model.sobel, Sobel)
    x = noise_images(len(filters), model.image_size, mean, std, grey, seed, noise_std).to(device)
    lo = (-torch.as_tensor(mean) / torch.as_tensor(std)).view(1, 3, 1, 1).to(device)
    hi = ((1 - torch.as_tensor(mean)) / torch.as_tensor(std)).view(1, 3, 1, 1).to(device)
    target = torch.tensor(filters, device=device)
    n_out = None
    step_norm = lr * math.sqrt(x[0].numel())
    try:
        for it in range(steps):
            x.requires_grad_(True)
            logits = layer_mean_activations(model, layer, x)  # (F, C)
            if n_out is None:
                n_out = logits.shape[1]
                bad = [f for f in filters if not 0 <= f < n_out]
                if bad:
                    raise ValueError(f"filter(s) {bad} out of range; {layer} has {n_out} filters")
            objective = (-torch.nn.functional.cross_entropy(logits, target, reduction="sum")
                         - weight_decay * (x ** 2).sum())
            (grad,) = torch.autograd.grad(objective, x)
            with torch.no_grad():
                norms = grad.flatten(1).norm(dim=1).clamp_min(1e-12).view(-1, 1, 1, 1)
                x = x.detach() + step_norm * grad / norms
                if blur_every and (it + 1) % blur_every == 0:
                    x = gaussian_blur(x, blur_sigma)
                x = torch.maximum(torch.minimum(x, hi), lo)
    finally:
        model.train(was_training)
    return x.detach()


def synthesis_display(x: torch.Tensor, grey: bool) -> np.ndarray:
    """Synthesised images ``(F, 3, H, W)`` as pictures ``(F, H, W, 3)`` in [0, 1], each
    contrast-stretched on its own; grey (the channel mean) for Sobel models."""
    arr = x.detach().cpu().double()
    if grey:
        arr = arr.mean(1, keepdim=True).expand(-1, 3, -1, -1)
    return np.stack([stretch(a) for a in arr.permute(0, 2, 3, 1).numpy()])


def plot_synthesis(display: np.ndarray, filters: Sequence[int], layer: str, ncols: int = 8) -> Figure:
    """The synthesised images in a grid, titled with their filter indices."""
    f = len(filters)
    ncols = min(ncols, f)
    nrows = -(-f // ncols)
    fig = Figure(figsize=(1.6 * ncols, 1.75 * nrows + 0.4), dpi=100)
    for i, filt in enumerate(filters):
        ax = fig.add_subplot(nrows, ncols, i + 1)
        ax.imshow(make_grid(display[i:i + 1], ncols=1, pad=0), interpolation="bicubic")
        ax.set_title(f"filter {filt}", fontsize=8)
        ax.set_axis_off()
    fig.suptitle(f"{layer}: images synthesised by gradient ascent", fontsize=10)
    fig.tight_layout()
    return fig
