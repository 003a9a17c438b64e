"""VGG-16 with batch norm, as used in the paper's Table 5 / transfer experiments."""

from __future__ import annotations

from torch import nn

from .convnet import DeepClusterNet, conv_bn_relu, output_shape

_CFG = [[64, 64], [128, 128], [256, 256, 256], [512, 512, 512], [512, 512, 512]]


def vgg16(
    num_clusters: int = 1000, sobel: bool = True, image_size: int = 224, dropout: float = 0.5,
    fc_dim: int = 4096,
) -> DeepClusterNet:
    """VGG-16-BN: five blocks of 3x3 convs with BN, max-pool 2x2 after each block.

    ``conv1`` ... ``conv5`` name the last conv of each block (for the probes); each conv
    is also addressable as ``conv{block}_{i}``.
    """
    in_ch = 2 if sobel else 3
    layers: list[nn.Module] = []
    names: dict[str, int] = {}
    cin = in_ch
    for b, block in enumerate(_CFG, start=1):
        for i, cout in enumerate(block, start=1):
            conv_bn_relu(layers, names, f"conv{b}_{i}", cin, cout, 3, 1, 1)
            cin = cout
        names[f"conv{b}"] = names[f"conv{b}_{len(block)}"]
        layers.append(nn.MaxPool2d(2, 2))
    features = nn.Sequential(*layers)
    shape = output_shape(features, in_ch, image_size)
    return DeepClusterNet(features, names, shape, fc_dim, num_clusters, sobel, image_size, dropout)
