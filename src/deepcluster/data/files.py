"""Loose image files (``deepcluster assign``, search queries): decoded one by one, an
unreadable file becomes a reason, never an exception that stops the others."""

from __future__ import annotations

import warnings

import torch
from PIL import Image
from torch.utils.data import Dataset


def read_image(path: str) -> tuple[Image.Image | None, str]:
    """``(RGB image, "")`` or ``(None, reason)`` when the file cannot be decoded."""
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("error", Image.DecompressionBombWarning)
            with Image.open(path) as img:
                img.load()
                return img.convert("RGB"), ""
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
