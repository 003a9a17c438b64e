"""Loose image files (``deepcluster assign``, search queries): decoded one by one, an
unreadable file becomes a reason, never an exception that stops the others."""

from __future__ import annotations

import warnings

import numpy as np
import torch
from PIL import Image
from torch.utils.data import Dataset

_WIDE_GREY = ("I;16", "I;16L", "I;16B", "I;16N", "I")


def to_rgb(img: Image.Image) -> Image.Image:
    """An 8-bit RGB copy of any decoded image, with one policy for the odd modes.

    - 16-bit (and 32-bit integer) grey, e.g. 16-bit PNG: scaled to 8 bits (x 255/65535)
      instead of clipped (PIL's own conversion turns nearly every pixel white);
    - transparency (RGBA, LA, PA, palette or grey/RGB with a transparent colour):
      composited over white, so hidden pixels never leak their arbitrary colour;
    - CMYK, YCbCr, palette, 1-bit, grey: PIL's conversion.
    """
    if img.mode in _WIDE_GREY:
        arr = np.asarray(img, dtype=np.float64)
        return Image.fromarray(np.clip(arr * (255.0 / 65535.0) + 0.5, 0, 255).astype(np.uint8), "L").convert("RGB")
    if img.mode in ("RGBA", "LA", "PA", "RGBa", "La") or "transparency" in img.info:
        rgba = img.convert("RGBA")
        white = Image.new("RGBA", rgba.size, (255, 255, 255, 255))
        return Image.alpha_composite(white, rgba).convert("RGB")
    return img.convert("RGB")



def read_image(path: str) -> tuple[Image.Image | None, str]:
    """``(RGB image, "")`` or ``(None, reason)`` when the file cannot be decoded."""
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("error", Image.DecompressionBombWarning)
            with Image.open(path) as img:
                img.load()
                return to_rgb(img), ""
    except Exception as e:  # noqa: BLE001 - every decoder failure is a reason to list the file
        return None, f"{type(e).__name__}: {e}".splitlines()[0]


class FileImages(Dataset):
    """Item ``i`` is ``(transform(image of paths[i]), i, reason)``: ``reason`` is ``""``
    for a decoded file; an unreadable one gives a zero image of ``shape`` and its reason
    (its features are computed and discarded by the caller)."""

    def __init__(self, paths: list[str], transform, shape: tuple[int, int, int]) -> None:
        self.paths, self.transform, self.shape = paths, transform, shape

    def __len__(self) -> int:
        return len(self.paths)

    def __getitem__(self, i: int) -> tuple[torch.Tensor, int, str]:
        img, reason = read_image(self.paths[i])
        return (torch.zeros(self.shape) if img is None else self.transform(img)), i, reason
