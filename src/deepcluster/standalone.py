"""DeepCluster backbones in plain PyTorch: copy this file next to the exported weights.

This file imports nothing but ``torch`` (and the standard library); it does not need
the ``deepcluster`` package. It rebuilds the networks of DeepCluster (Caron et al.,
ECCV 2018) in the layout that ``deepcluster export-model --format safetensors`` writes,
and reads that file itself (no ``safetensors`` package needed)::

    import standalone                      # this file
    model = standalone.load("backbone.safetensors")
    feats = model.forward_features(images)  # (B, 3, H, W) normalised RGB -> (B, D)

Layout (torchvision's VGG naming, so a ``vgg16`` file loads into
``torchvision.models.vgg16_bn`` too): ``features`` (conv, BN, ReLU, max-pool; with the
Sobel front end ``features.0`` is ``Sequential(fixed 3x3 RGB -> 2 Sobel conv, conv1)``,
exact), ``avgpool`` (VGG: adaptive 7x7, else identity), ``classifier`` = fc6, ReLU,
dropout, fc7, ReLU, dropout and, without a projection, the last epoch's cluster
classifier; with a projection (DeepCluster-v2) ``projection`` and ``head``.
"""

from __future__ import annotations

import json
import struct
from typing import Any

import torch
from torch import nn
from torch.nn import functional as F

# Per conv layer: (name, kernel, stride, padding, channels, max-pool after as (kernel, stride) or None).
_ALEXNET_POOLS = [(3, 2), (3, 2), None, None, (3, 2)]
_SMALL_POOLS = [(2, 2), (2, 2), None, None, (3, 2)]
_ALEXNET_WIDTHS = [96, 256, 384, 384, 256]
_VGG_BLOCKS = [[64, 64], [128, 128], [256, 256, 256], [512, 512, 512], [512, 512, 512]]
ARCHS = ("alexnet", "alexnet_small", "vgg16")


def conv_specs(arch: str, width: float = 1.0) -> list[tuple[str, int, int, int, int, tuple[int, int] | None]]:
    """The conv layers of ``arch`` (``alexnet``, ``alexnet_small`` or ``vgg16``) in order."""
    if arch == "vgg16":
        return [(f"conv{b}_{i}", 3, 1, 1, c, (2, 2) if i == len(block) else None)
                for b, block in enumerate(_VGG_BLOCKS, start=1) for i, c in enumerate(block, start=1)]
    if arch not in ARCHS:
        raise ValueError(f"unknown architecture {arch!r}; this file builds {list(ARCHS)}")
    shapes = [(11, 4, 2), (5, 1, 2)] if arch == "alexnet" else [(5, 1, 2), (5, 1, 2)]
    pools = _ALEXNET_POOLS if arch == "alexnet" else _SMALL_POOLS
    return [(f"conv{i + 1}", k, s, p, max(1, int(round(c * width))), pool)
            for i, ((k, s, p), c, pool) in enumerate(zip(shapes + [(3, 1, 1)] * 3, _ALEXNET_WIDTHS, pools))]


class Backbone(nn.Module):
    """A DeepCluster network, Sobel front end folded into the first conv layer (exactly).

    Args:
        meta: ``arch``, ``sobel``, ``image_size``, ``fc_dim``, ``width`` (channel scale,
            ``alexnet_small``), ``cluster_feature`` (``fc7``, ``backbone`` or
            ``projection``), ``projection_dim``, ``num_classes`` (the last epoch's k) and
            ``head_temperature``: the ``meta`` entry of the exported file's header.

    ``conv_layers`` maps ``conv1`` ... ``conv5`` (VGG: also ``conv{block}_{i}``) to the
    index in ``features`` of the ReLU ending that layer.
    """

    def __init__(self, meta: dict[str, Any]) -> None:
        super().__init__()
        missing = [k for k in ("arch", "sobel", "image_size", "fc_dim", "num_classes") if k not in meta]
        if missing:
            raise ValueError(f"backbone meta lacks {missing}")
        self.arch, self.image_size = meta["arch"], int(meta["image_size"])
        self.cluster_feature = meta.get("cluster_feature") or "fc7"
        self.head_temperature = float(meta.get("head_temperature") or 0.1)
        layers: list[nn.Module] = []
        self.conv_layers: dict[str, int] = {}
        cin = 3
        for i, (name, k, s, p, c, pool) in enumerate(conv_specs(self.arch, float(meta.get("width") or 1.0))):
            conv: nn.Module = nn.Conv2d(cin, c, k, s, p)
            if i == 0 and meta["sobel"]:  # grey + Sobel as one fixed 3x3 RGB -> 2 conv, then conv1
                conv = nn.Sequential(nn.Conv2d(3, 2, 3, padding=1, bias=False), nn.Conv2d(2, c, k, s, p))
                conv[0].weight.requires_grad_(False)  # fixed, as in the paper
            layers += [conv, nn.BatchNorm2d(c), nn.ReLU(inplace=True)]
            self.conv_layers[name] = len(layers) - 1
            if pool is not None:
                layers.append(nn.MaxPool2d(*pool))
                if "_" in name:  # the last conv of a VGG block also answers to the block's name
                    self.conv_layers[name.split("_")[0]] = self.conv_layers[name]
            cin = c
        self.features = nn.Sequential(*layers)
        self.avgpool = nn.AdaptiveAvgPool2d((7, 7)) if self.arch == "vgg16" else nn.Identity()
        fc, k, proj = int(meta["fc_dim"]), int(meta["num_classes"]), meta.get("projection_dim")
        head = [] if proj else [nn.Linear(fc, k)]
        self.classifier = nn.Sequential(nn.Linear(self._flat_dim(), fc), nn.ReLU(True), nn.Dropout(),
                                        nn.Linear(fc, fc), nn.ReLU(True), nn.Dropout(), *head)
        if proj:
            self.projection = nn.Linear(fc, int(proj))
            self.head = nn.Linear(int(proj), k)

    def _flat_dim(self) -> int:
        with torch.no_grad():
            self.features.eval()
            out = self.avgpool(self.features(torch.zeros(1, 3, self.image_size, self.image_size)))
            self.features.train()
        return out.numel()

    def forward_conv(self, x: torch.Tensor, layers: list[str]) -> dict[str, torch.Tensor]:
        """ReLU'd activations of the named conv layers: name -> ``(B, C_l, H_l, W_l)``."""
        unknown = [n for n in layers if n not in self.conv_layers]
        if unknown:
            raise ValueError(f"unknown layer(s) {unknown}; this model has {list(self.conv_layers)}")
        wanted = {self.conv_layers[n]: n for n in layers}
        out: dict[str, torch.Tensor] = {}
        for i, module in enumerate(self.features[:max(wanted) + 1]):
            x = module(x)
            if i in wanted:
                out[wanted[i]] = x
        return out

    def forward_backbone(self, x: torch.Tensor) -> torch.Tensor:
        """The conv stack: ``(B, 3, H, W) -> (B, C, h, w)``."""
        return self.features(x)

    def forward_fc7(self, x: torch.Tensor) -> torch.Tensor:
        """fc7 before its ReLU: ``(B, 3, H, W) -> (B, fc_dim)``."""
        return self.classifier[:4](torch.flatten(self.avgpool(self.features(x)), 1))

    def forward_features(self, x: torch.Tensor) -> torch.Tensor:
        """The clustering feature, as in training: ``(B, 3, H, W) -> (B, D)``: fc7 before its
        ReLU (the paper), the flattened conv output (``backbone``) or the L2-normalised
        projection of ReLU(fc7) (``projection``)."""
        if self.cluster_feature == "backbone":
            return torch.flatten(self.features(x), 1)
        fc7 = self.forward_fc7(x)
        if self.cluster_feature == "projection":
            return F.normalize(self.projection(torch.relu(fc7)), dim=1)
        return fc7

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """Logits over the last epoch's clusters: ``(B, 3, H, W) -> (B, k)``."""
        fc7 = self.forward_fc7(x)
        if not hasattr(self, "projection"):
            return self.classifier[6](torch.relu(fc7))
        return self.head(F.normalize(self.projection(torch.relu(fc7)), dim=1)) / self.head_temperature


def build(meta: dict[str, Any]) -> Backbone:
    """A :class:`Backbone` with fresh weights for ``meta`` (see :class:`Backbone`)."""
    return Backbone(meta)


_DTYPES = {"F64": torch.float64, "F32": torch.float32, "F16": torch.float16, "BF16": torch.bfloat16,
           "I64": torch.int64, "I32": torch.int32, "I16": torch.int16, "I8": torch.int8, "U8": torch.uint8,
           "BOOL": torch.bool}


def read_safetensors(path: str) -> tuple[dict[str, torch.Tensor], dict[str, str]]:
    """Tensors and header metadata of a ``.safetensors`` file, read with torch alone.

    The format: an 8-byte little-endian header length, a JSON header (name -> dtype,
    shape, byte offsets; ``__metadata__`` -> str: str), then the raw little-endian data.
    """
    with open(path, "rb") as f:
        data = bytearray(f.read())
    if len(data) < 8:
        raise ValueError(f"{path} is not a safetensors file (too short)")
    (n,) = struct.unpack("<Q", data[:8])
    try:
        header = json.loads(data[8:8 + n])
    except ValueError:
        raise ValueError(f"{path} is not a safetensors file (bad header)") from None
    metadata = header.pop("__metadata__", None) or {}
    tensors = {}
    for name, info in header.items():
        start, end = info["data_offsets"]
        if info["dtype"] not in _DTYPES:
            raise ValueError(f"{path}: tensor {name!r} has dtype {info['dtype']}, which this reader does not know")
        dtype = _DTYPES[info["dtype"]]
        flat = (torch.frombuffer(data, dtype=dtype, count=(end - start) // dtype.itemsize, offset=8 + n + start)
                if end > start else torch.empty(0, dtype=dtype))
        tensors[name] = flat.reshape(info["shape"]).clone()
    return tensors, metadata


def load(path: str, map_location: str | torch.device = "cpu") -> Backbone:
    """The :class:`Backbone` stored in an exported ``.safetensors`` file, in eval mode."""
    tensors, metadata = read_safetensors(path)
    if "meta" not in metadata:
        raise ValueError(f"{path} has no 'meta' entry in its header: not written by `deepcluster export-model`")
    with torch.device("meta"):  # no random initialisation of weights about to be replaced
        model = build(json.loads(metadata["meta"]))
    try:
        model.load_state_dict(tensors, strict=True, assign=True)
    except RuntimeError as e:
        first = str(e).strip().splitlines()[0]
        raise ValueError(f"{path} does not fit its own header's architecture: {first}") from None
    return model.to(map_location).eval()
