"""Image arrays for figures: un-normalising network inputs, grids, PNG files.

Every function here works on numpy arrays of floats in ``[0, 1]`` laid out
``(N, H, W, C)`` (``C`` = 1 or 3) or ``(N, H, W)`` for grey images, so figures can be
composed without matplotlib and saved losslessly.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from pathlib import Path

import numpy as np
import torch
from PIL import Image


def to_display(x: torch.Tensor, mean: Sequence[float], std: Sequence[float]) -> np.ndarray:
    """Network inputs back to pictures: ``(B, 3, H, W)`` normalised -> ``(B, H, W, 3)`` in [0, 1].

    Inverts ``Normalize(mean, std)`` and clips to the valid pixel range.
    """
    if x.ndim != 4 or x.shape[1] != 3:
        raise ValueError(f"expected images of shape (B, 3, H, W), got {tuple(x.shape)}")
    m = torch.as_tensor(mean, dtype=x.dtype).view(1, 3, 1, 1)
    s = torch.as_tensor(std, dtype=x.dtype).view(1, 3, 1, 1)
    return (x.detach().cpu() * s + m).clamp(0, 1).permute(0, 2, 3, 1).numpy()


def stretch(img: np.ndarray, low: float = 1.0, high: float = 99.0) -> np.ndarray:
    """Contrast-stretch one image to [0, 1] between its ``low``/``high`` percentiles.

    Used for synthesised images, whose values have no natural range.
    """
    lo, hi = np.percentile(img, [low, high])
    if hi - lo < 1e-12:
        return np.full_like(img, 0.5, dtype=np.float64)
    return np.clip((img - lo) / (hi - lo), 0.0, 1.0)


def symmetric_scale(w: np.ndarray) -> np.ndarray:
    """Map a signed array to [0, 1] with 0 at 0.5 and the largest magnitude at 0 or 1."""
    m = float(np.abs(w).max())
    return np.full_like(w, 0.5, dtype=np.float64) if m == 0 else 0.5 + 0.5 * w / m


def _as_nhwc(images: np.ndarray | Sequence[np.ndarray]) -> np.ndarray:
    arr = np.asarray(images, dtype=np.float64)
    if arr.ndim == 3:
        arr = arr[..., None]
    if arr.ndim != 4 or arr.shape[-1] not in (1, 3):
        raise ValueError(f"expected images (N, H, W) or (N, H, W, 1|3), got shape {arr.shape}")
    if arr.shape[-1] == 1:
        arr = np.repeat(arr, 3, axis=-1)
    return arr


def make_grid(images: np.ndarray | Sequence[np.ndarray], ncols: int | None = None, pad: int = 1,
              pad_value: float = 1.0) -> np.ndarray:
    """Tile images row by row into one picture.

    Args:
        images: ``(N, H, W)`` or ``(N, H, W, 1|3)`` floats in [0, 1] (all the same size).
        ncols: images per row (default: ``ceil(sqrt(N))``).
        pad: pixels between images and around the border.
        pad_value: grey level of the padding.

    Returns:
        ``(rows * (H + pad) + pad, ncols * (W + pad) + pad, 3)`` float array; cells
        after the last image are left at ``pad_value``.
    """
    arr = _as_nhwc(images)
    n, h, w, _ = arr.shape
    if n == 0:
        raise ValueError("make_grid needs at least one image")
    ncols = ncols or math.ceil(math.sqrt(n))
    nrows = math.ceil(n / ncols)
    out = np.full((nrows * (h + pad) + pad, ncols * (w + pad) + pad, 3), pad_value, dtype=np.float64)
    for i in range(n):
        r, c = divmod(i, ncols)
        y, x = pad + r * (h + pad), pad + c * (w + pad)
        out[y:y + h, x:x + w] = arr[i]
    return out


def to_uint8(img: np.ndarray) -> np.ndarray:
    """``[0, 1]`` floats -> uint8 (rounded, clipped)."""
    return np.clip(np.rint(np.asarray(img, dtype=np.float64) * 255.0), 0, 255).astype(np.uint8)


def upscale_factor(side: int, target: int = 512) -> int:
    """Integer factor that brings a picture of ``side`` pixels near ``target`` (>= 1)."""
    return max(1, target // max(side, 1))


def save_png(img: np.ndarray, path: str | Path, scale: int = 1) -> Path:
    """Write a ``(H, W)``/``(H, W, 3)`` [0, 1] image as PNG, enlarged ``scale`` times
    with nearest-neighbour pixels (small images stay crisp in a browser)."""
    arr = to_uint8(img)
    if arr.ndim == 3 and arr.shape[-1] == 1:
        arr = arr[..., 0]
    pil = Image.fromarray(arr)
    if scale > 1:
        pil = pil.resize((pil.width * scale, pil.height * scale), Image.NEAREST)
    path = Path(path)
    from ..io import atomic_write

    atomic_write(path, lambda f: pil.save(f, format="PNG"))
    return path


def run_display(run, x: torch.Tensor) -> np.ndarray:
    """A run's network inputs ``(n, 3, S, S)`` -> pictures ``(n, S, S, 3)`` in [0, 1]."""
    return to_display(x, run.spec.mean, run.spec.std)
