"""How exact each fold of the Sobel front end into conv1 is (docs/EXPORT.md).

For each architecture at its default size, on 8 random N(0, 1) RGB images (what
normalised images look like), the largest absolute difference from the original
``conv1(Sobel(x))`` over every output position of: the exported front end (grey folded
into Sobel, then conv1) and the single ``(k+2) x (k+2)`` folded convolution, the latter
split into the border ring :func:`deepcluster.models.fold.border_mask` predicts and the
rest. Usage::

    .venv/bin/python benchmarks/fold_exactness.py
"""

from __future__ import annotations

import torch

from deepcluster.models import create_model
from deepcluster.models.fold import border_mask, exact_front, fold_conv, sobel_rgb_conv

CASES = [("alexnet_small", 28), ("alexnet", 224), ("vgg16", 224)]


def main() -> None:
    torch.manual_seed(0)
    print("| arch | px | conv1 output | exported front: max diff | single conv: border positions | "
          "border max diff | elsewhere max diff | conv1 output max |")
    print("|---|---|---|---|---|---|---|---|")
    for arch, size in CASES:
        model = create_model(arch, image_size=size).eval()
        conv1, x = model.features[0], torch.randn(8, 3, size, size)
        with torch.no_grad():
            ref = conv1(model.sobel(x))
            exact = (exact_front(model.sobel, conv1)(x) - ref).abs().max().item()
            diff = (fold_conv(sobel_rgb_conv(model.sobel), conv1)(x) - ref).abs().amax((0, 1))
        mask = border_mask(conv1, size, size)
        print(f"| {arch} | {size} | {diff.shape[0]}x{diff.shape[1]} | {exact:.1e} | {int(mask.sum())} | "
              f"{diff[mask].max():.2f} | {diff[~mask].max():.1e} | {ref.abs().max():.2f} |")


if __name__ == "__main__":
    main()
