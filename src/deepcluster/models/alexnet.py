"""AlexNet with batch norm, as used by DeepCluster, and its small-image variant."""

from __future__ import annotations

from torch import nn

from .convnet import DeepClusterNet, conv_bn_relu, output_shape


def _alexnet(
    kernels: list[tuple[int, int, int]], pools: list[nn.Module], widths: list[int],
    fc_dim: int, num_clusters: int, sobel: bool, image_size: int, dropout: float,
) -> DeepClusterNet:
    in_ch = 2 if sobel else 3
    layers: list[nn.Module] = []
    names: dict[str, int] = {}
    cin = in_ch
    pool_after = {0: pools[0], 1: pools[1], 4: pools[2]}
    for i, ((k, s, p), cout) in enumerate(zip(kernels, widths)):
        conv_bn_relu(layers, names, f"conv{i + 1}", cin, cout, k, s, p)
        if i in pool_after:
            layers.append(pool_after[i])
        cin = cout
    features = nn.Sequential(*layers)
    shape = output_shape(features, in_ch, image_size)
    return DeepClusterNet(features, names, shape, fc_dim, num_clusters, sobel, image_size, dropout)


def alexnet(
    num_clusters: int = 1000, sobel: bool = True, image_size: int = 224, dropout: float = 0.5,
    fc_dim: int = 4096,
) -> DeepClusterNet:
    """The paper's AlexNet: conv 96/256/384/384/256 (11x11 s4, 5x5, 3x3 x3), BN, no LRN,
    max-pool 3x3/2 after conv1, conv2 and conv5, fc6 and fc7 of 4096. Built for 224 px."""
    kernels = [(11, 4, 2), (5, 1, 2), (3, 1, 1), (3, 1, 1), (3, 1, 1)]
    pools = [nn.MaxPool2d(3, 2), nn.MaxPool2d(3, 2), nn.MaxPool2d(3, 2)]
    widths = [96, 256, 384, 384, 256]
    return _alexnet(kernels, pools, widths, fc_dim, num_clusters, sobel, image_size, dropout)


def alexnet_small(
    num_clusters: int = 100, sobel: bool = True, image_size: int = 28, dropout: float = 0.5,
    width: float = 0.5, fc_dim: int = 1024,
) -> DeepClusterNet:
    """AlexNet's shape scaled for 28-64 px images (our choice; see docs/MODELS.md).

    Five conv layers with BN and the same width ratios (96/256/384/384/256 times
    ``width``, default 0.5), conv1 5x5 stride 1 instead of 11x11 stride 4 (a 28 px image
    cannot afford a 4x reduction in its first layer), max-pool 2x2 after conv1 and conv2
    and 3x3/2 after conv5 (28 px -> 14 -> 7 -> 3), then fc6/fc7 of ``fc_dim`` (1024).
    At the defaults one training epoch on 60k 28 px images takes about 2 minutes on two
    CPU cores; the full-width variant (``width=1, fc_dim=4096``) about 4x longer.
    """
    if width <= 0:
        raise ValueError(f"width must be > 0, got {width}")
    kernels = [(5, 1, 2), (5, 1, 2), (3, 1, 1), (3, 1, 1), (3, 1, 1)]
    pools = [nn.MaxPool2d(2, 2), nn.MaxPool2d(2, 2), nn.MaxPool2d(3, 2)]
    widths = [max(1, int(round(c * width))) for c in (96, 256, 384, 384, 256)]
    return _alexnet(kernels, pools, widths, fc_dim, num_clusters, sobel, image_size, dropout)
