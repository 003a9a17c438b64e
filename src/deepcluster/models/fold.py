"""Fold the fixed Sobel front end (paper, Section 4, "Preprocessing") into plain convolutions.

The front end is ``grey`` (the channel mean: a 1x1 convolution RGB -> 1, no padding)
then the two 3x3 Sobel filters (padding 1), then ``conv1`` (kernel ``k``, stride ``s``,
padding ``p``). All three are linear, so two folds are possible:

1. **grey into Sobel** (:func:`sobel_rgb_conv`): one 3x3 convolution RGB -> 2 with
   padding 1 whose weights are the Sobel filters divided by 3 on each colour channel.
   It is *exact everywhere*: a 1x1 convolution of the zero padding is zero, so padding
   the RGB image by 1 and padding the grey image by 1 give the same Sobel output. The
   exported front end is this layer (fixed) followed by the unchanged ``conv1``
   (:func:`exact_front`).
2. **everything into conv1** (:func:`fold_conv`): one ``(k+2) x (k+2)`` convolution
   RGB -> C with stride ``s`` and padding ``p + 1``. It equals the original only where
   conv1's window stays inside the image. The original zero-pads the *Sobel output*
   before conv1; the folded convolution instead reads Sobel values computed on the
   zero-padded image, which at the one-pixel ring just outside the image are not zero
   (the Sobel filter there still sees the first row/column of pixels). For ``p >= 1``
   every output whose window touches that ring differs: conv1's outer rows and columns
   (:func:`border_mask`; 1 or 2 of them for our models), by up to 0.5-1.6 on random
   normal images where conv1's outputs reach 2-4 (measured in ``docs/EXPORT.md``). No
   single zero-padded convolution can be exact: its kernel is fixed by the interior,
   and that kernel gives the border values above. An exact border correction exists
   (subtract conv1 applied to the Sobel ring alone) but needs the Sobel responses
   again, so it is no simpler than fold 1.

For ``p = 0`` fold 2 would be exact too (conv1 never reads padding); every registered
model has ``p >= 1``, so the export uses fold 1.
"""

from __future__ import annotations

import torch
from torch import nn
from torch.nn import functional as F

from .sobel import Sobel


def sobel_rgb_weight(sobel: Sobel) -> torch.Tensor:
    """Grey folded into Sobel: ``(2, 3, 3, 3)`` weights of one 3x3 conv RGB -> (Sobel x, Sobel y)."""
    # (2, 1, 3, 3) Sobel x (1, 3, 1, 1) grey -> (2, 3, 3, 3): w[m, c] = sobel[m] * gray[c]
    return sobel.sobel_weight * sobel.gray_weight.reshape(1, 3, 1, 1)


def sobel_rgb_conv(sobel: Sobel) -> nn.Conv2d:
    """The whole Sobel front end as a fixed ``nn.Conv2d(3, 2, 3, padding=1, bias=False)``:
    ``(B, 3, H, W) -> (B, 2, H, W)``, exact at every position (grey has no padding)."""
    conv = nn.Conv2d(3, 2, 3, padding=1, bias=False)
    with torch.no_grad():
        conv.weight.copy_(sobel_rgb_weight(sobel))
    conv.weight.requires_grad_(False)
    return conv


def exact_front(sobel: nn.Module, conv1: nn.Conv2d) -> nn.Module:
    """The exact RGB front end: ``Sequential(sobel_rgb_conv, conv1)`` with Sobel, else
    ``conv1`` itself (for a model without the Sobel layer, ``sobel`` is ``nn.Identity``).

    The returned modules are copies; keys of the Sobel version are ``0.weight`` (the fixed
    RGB -> 2 filter), ``1.weight`` and ``1.bias`` (conv1).
    """
    conv = _copy_conv(conv1, conv1.weight, conv1.in_channels, conv1.kernel_size, conv1.padding)
    if not isinstance(sobel, Sobel):
        return conv
    return nn.Sequential(sobel_rgb_conv(sobel), conv)


def fold_conv(first: nn.Conv2d, conv: nn.Conv2d) -> nn.Conv2d:
    """``conv ∘ first`` as one convolution, for a stride-1 ``first`` without bias.

    Args:
        first: ``nn.Conv2d(Cin, M, a, padding=q)``, stride 1, no bias (e.g. :func:`sobel_rgb_conv`).
        conv: ``nn.Conv2d(M, C, k, stride=s, padding=p)``.

    Returns:
        ``nn.Conv2d(Cin, C, k + a - 1, stride=s, padding=p + q)``: equal to
        ``conv(first(x))`` wherever ``conv``'s window does not reach ``first``'s padding
        ring (see the module docstring for why the border differs).
    """
    if first.bias is not None or first.stride != (1, 1) or conv.in_channels != first.out_channels:
        raise ValueError("fold_conv needs a stride-1, bias-free first convolution feeding conv")
    # out[o, c, i + a] = sum_m conv.w[o, m, i] * first.w[m, c, a]: a transposed convolution
    # of conv's kernel (as a batch of C images with M channels) by first's kernel.
    weight = F.conv_transpose2d(conv.weight.detach(), first.weight.detach())  # (C, Cin, k+a-1, k+a-1)
    padding = tuple(p + q for p, q in zip(conv.padding, first.padding))
    return _copy_conv(conv, weight, first.in_channels, tuple(weight.shape[-2:]), padding)


def border_mask(conv: nn.Conv2d, height: int, width: int) -> torch.Tensor:
    """Where :func:`fold_conv` of a padding-1 first layer into ``conv`` differs from the
    original, for ``(height, width)`` inputs: a ``(H_out, W_out)`` bool mask of the outputs
    whose window covers the ring just outside the image."""
    (ph, pw), (kh, kw) = conv.padding, conv.kernel_size
    ring = torch.zeros(1, 1, height + 2 * ph, width + 2 * pw)  # conv's padded input
    if ph >= 1:
        ring[..., [ph - 1, ph + height], pw - 1 if pw else 0:pw + width + 1] = 1
    if pw >= 1:
        ring[..., ph - 1 if ph else 0:ph + height + 1, [pw - 1, pw + width]] = 1
    return F.conv2d(ring, torch.ones(1, 1, kh, kw), stride=conv.stride)[0, 0] > 0


def _copy_conv(conv: nn.Conv2d, weight: torch.Tensor, in_channels: int, kernel: tuple[int, ...],
               padding: tuple[int, ...]) -> nn.Conv2d:
    """A new ``nn.Conv2d`` with ``conv``'s stride, bias and output width and the given weights."""
    new = nn.Conv2d(in_channels, conv.out_channels, kernel, conv.stride, padding, bias=conv.bias is not None)
    with torch.no_grad():
        new.weight.copy_(weight)
        if conv.bias is not None:
            new.bias.copy_(conv.bias)
    return new.to(conv.weight.device)
