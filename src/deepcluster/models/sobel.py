"""The fixed Sobel front end of the paper (Section 4, "Preprocessing").

Colour is removed and local contrast increased by a fixed linear layer: a grayscale
conversion followed by the two 3x3 Sobel filters. Its weights are buffers, never trained.
"""

from __future__ import annotations

import torch
from torch import nn


class Sobel(nn.Module):
    """Grayscale then Sobel x/y: ``(B, 3, H, W) -> (B, 2, H, W)``.

    The grayscale step is the plain channel mean (weights 1/3), as in the original code.
    """

    out_channels = 2

    def __init__(self) -> None:
        super().__init__()
        gray = torch.full((1, 3, 1, 1), 1.0 / 3.0)
        gx = torch.tensor([[1.0, 0.0, -1.0], [2.0, 0.0, -2.0], [1.0, 0.0, -1.0]])
        sobel = torch.stack([gx, gx.t()]).unsqueeze(1)  # (2, 1, 3, 3): x then y
        self.register_buffer("gray_weight", gray)
        self.register_buffer("sobel_weight", sobel)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if x.shape[1] != 3:
            raise ValueError(f"Sobel expects 3-channel images, got shape {tuple(x.shape)}")
        g = nn.functional.conv2d(x, self.gray_weight)  # (B, 1, H, W)
        return nn.functional.conv2d(g, self.sobel_weight, padding=1)  # (B, 2, H, W)
