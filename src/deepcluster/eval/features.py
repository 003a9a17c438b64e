"""Frozen features for the probes: pooling rule, encoders, extraction and the disk cache.

Zhang et al.'s protocol (the paper's Table 1) probes each conv layer's ReLU'd output,
average-pooled to a fixed size so that every layer gives a comparable dimension. We pool
with ``adaptive_avg_pool2d`` to an ``s x s`` grid, ``s`` chosen per layer so that
``C * s * s`` is as close as possible to a target dimension (:func:`pool_side`):

- inputs of 128 px or more: target 9,216, which gives the paper's AlexNet sizes
  (conv1 96x10x10 = 9,600, conv2 256x6x6 = 9,216, conv3/conv4 384x5x5 = 9,600,
  conv5 256x6x6 = 9,216);
- smaller inputs: target 3,072, which gives ``alexnet_small`` at 28 px
  conv1 48x8x8 = 3,072, conv2 128x5x5 = 3,200, conv3/conv4 192x4x4 = 3,072,
  conv5 128x5x5 = 3,200.

An *encoder* turns a batch of images into named feature rows: ``conv1``...``conv5``
(pooled, flattened), ``backbone`` (the flattened input of fc6, for the MLP probe),
``fc7`` (fc7 before its ReLU, the paper's clustering features) and, for a model with one,
``projection`` (its L2-normalised projection of ReLU(fc7)) for a network; ``pixels`` (the
normalised input, pooled by the same rule) for the raw-pixel baseline. The network is
always in eval mode: batch norm uses its running statistics and is never updated.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
from collections.abc import Sequence
from pathlib import Path

import numpy as np
import torch
from torch.nn import functional as F

from ..data import ImageSource, IndexedDataset, cluster_transform
from ..features import iter_features, make_loader
from ..models import DeepClusterNet
from .splits import EvalData

logger = logging.getLogger(__name__)

TARGET_DIM_LARGE = 9216
"""Pooled dimension aimed at for inputs of ``LARGE_INPUT`` px or more (the paper: 9-10k)."""
TARGET_DIM_SMALL = 3072
"""Pooled dimension aimed at for smaller inputs (a few thousand; our choice)."""
LARGE_INPUT = 128


def default_target_dim(image_size: int) -> int:
    """The pooled dimension aimed at for ``image_size`` px inputs."""
    return TARGET_DIM_LARGE if image_size >= LARGE_INPUT else TARGET_DIM_SMALL


def pool_side(channels: int, spatial: int, target_dim: int) -> int:
    """The side ``s`` in ``1..spatial`` whose ``channels * s * s`` is nearest ``target_dim``.

    Ties go to the smaller side. A layer whose full resolution is still below the
    target keeps it (``s = spatial``: no pooling).
    """
    if channels < 1 or spatial < 1 or target_dim < 1:
        raise ValueError(f"channels, spatial and target_dim must be >= 1, got {channels}, {spatial}, {target_dim}")
    return min(range(1, spatial + 1), key=lambda s: (abs(channels * s * s - target_dim), s))


def pooled(x: torch.Tensor, side: int) -> torch.Tensor:
    """Average-pool ``(B, C, H, W)`` to ``(B, C, side, side)`` and flatten: ``(B, C*side*side)``."""
    if x.shape[-1] != side or x.shape[-2] != side:
        x = F.adaptive_avg_pool2d(x, side)
    return torch.flatten(x, 1)


class Encoder:
    """Named frozen features of an image batch. Subclasses set ``layers`` (the feature
    maps probed by default), ``all_layers`` (every probe-able one), ``names`` (every
    feature) and ``clustering_feature``."""

    layers: list[str]
    all_layers: list[str]
    names: list[str]
    clustering_feature: str
    key: str

    def dims(self) -> dict[str, dict[str, int]]:
        """``name -> {"dim", "channels", "spatial", "pool"}`` of every feature."""
        raise NotImplementedError

    def feature(self, name: str | None) -> str:
        """``name`` if this encoder has it, the clustering feature for ``None``.

        Raises:
            ValueError: an unknown name (the message lists the known ones).
        """
        if name is None:
            return self.clustering_feature
        if name not in self.names:
            raise ValueError(f"unknown feature {name!r}; this model has {', '.join(self.names)}")
        return name

    def __call__(self, images: torch.Tensor, names: Sequence[str]) -> dict[str, torch.Tensor]:
        """``(B, 3, H, W)`` -> ``name -> (B, dim)`` for each of ``names``."""
        raise NotImplementedError

    def check_layers(self, layers: Sequence[str]) -> list[str]:
        """``layers`` if all are probe-able here, else a one-line error listing them."""
        unknown = [n for n in layers if n not in self.all_layers]
        if unknown:
            extra = [n for n in self.all_layers if n not in self.layers]
            more = f" (also {', '.join(extra)})" if extra else ""
            raise ValueError(f"unknown layer(s) {', '.join(unknown)}; this model has {', '.join(self.layers)}{more} "
                             "(pass e.g. --layers conv1,conv3)")
        if not layers:
            raise ValueError(f"no layers given; choose from {', '.join(self.layers)}")
        return list(layers)


class NetEncoder(Encoder):
    """Features of a frozen :class:`DeepClusterNet` (eval mode, BN frozen).

    Args:
        model: the network (moved to ``device``, put in eval mode).
        key: identifies the weights (cache keys).
        target_dim: pooled dimension aimed at per conv layer (default by input size).
        device: where to run.
    """

    def __init__(self, model: DeepClusterNet, key: str, target_dim: int | None = None,
                 device: str | torch.device = "cpu") -> None:
        self.model = model.to(device).eval()
        self.device = torch.device(device)
        self.key = key
        self.target_dim = target_dim or default_target_dim(model.image_size)
        self.layers = [n for n in ("conv1", "conv2", "conv3", "conv4", "conv5") if n in model.conv_layers]
        self.all_layers = self.layers + [n for n in model.conv_layers if n not in self.layers]
        self.names = self.all_layers + ["backbone", "fc7"] + (["projection"] if model.projection is not None else [])
        self.clustering_feature = model.cluster_feature
        self._dims: dict[str, dict[str, int]] = {}
        self._dims = self._probe_dims()

    @torch.no_grad()
    def _probe_dims(self) -> dict[str, dict[str, int]]:
        x = torch.zeros(1, 3, self.model.image_size, self.model.image_size, device=self.device)
        acts = self._forward(x, self.all_layers, pool=False)
        dims: dict[str, dict[str, int]] = {}
        for n in self.all_layers:
            c, h = acts[n].shape[1], acts[n].shape[2]
            s = pool_side(c, h, self.target_dim)
            dims[n] = {"dim": c * s * s, "channels": c, "spatial": h, "pool": s}
        b = self.model.forward_backbone(x)
        dims["backbone"] = {"dim": int(b[0].numel()), "channels": b.shape[1], "spatial": b.shape[2], "pool": b.shape[2]}
        dims["fc7"] = {"dim": self.model.fc_dim, "channels": self.model.fc_dim, "spatial": 1, "pool": 1}
        if self.model.projection is not None:
            d = self.model.projection_dim
            dims["projection"] = {"dim": d, "channels": d, "spatial": 1, "pool": 1}
        return dims

    def dims(self) -> dict[str, dict[str, int]]:
        return self._dims

    def _forward(self, images: torch.Tensor, names: Sequence[str], pool: bool = True) -> dict[str, torch.Tensor]:
        m = self.model
        want: dict[int, list[str]] = {}  # index in ``features`` -> names (vgg16: conv3 is also conv3_3)
        for n in names:
            if n in m.conv_layers:
                want.setdefault(m.conv_layers[n], []).append(n)
        need_top = bool({"backbone", "fc7", "projection"} & set(names))
        last = len(m.features) - 1 if need_top else max(want)
        out: dict[str, torch.Tensor] = {}
        h = m.sobel(images.to(self.device))
        for i, module in enumerate(m.features):  # one pass gives every requested layer
            h = module(h)
            for n in want.get(i, ()):
                out[n] = pooled(h, self._dims[n]["pool"]) if pool else h
            if i == last:
                break
        if need_top:
            flat = torch.flatten(h, 1)  # (B, C*h*w): the input of fc6
            if "backbone" in names:
                out["backbone"] = flat
            if "fc7" in names or "projection" in names:
                fc7 = m.classifier(flat)  # fc7 before its ReLU, as clustered
                if "fc7" in names:
                    out["fc7"] = fc7
                if "projection" in names:
                    out["projection"] = m.project(fc7)
        return out

    @torch.no_grad()
    def __call__(self, images: torch.Tensor, names: Sequence[str]) -> dict[str, torch.Tensor]:
        return self._forward(images, names)


class PixelEncoder(Encoder):
    """The raw-pixel baseline: the normalised network input, pooled by the same rule.

    Args:
        image_size: input side.
        channels: 1 keeps only the first channel (greyscale data, whose three channels
            are equal), 3 keeps RGB.
        target_dim: as for :class:`NetEncoder`; at 28 px greyscale the full 784 pixels
            are below it and kept.
    """

    def __init__(self, image_size: int, channels: int = 3, target_dim: int | None = None) -> None:
        if channels not in (1, 3):
            raise ValueError(f"channels must be 1 or 3, got {channels}")
        self.channels = channels
        self.target_dim = target_dim or default_target_dim(image_size)
        s = pool_side(channels, image_size, self.target_dim)
        self._dims = {"pixels": {"dim": channels * s * s, "channels": channels, "spatial": image_size, "pool": s}}
        self.layers = ["pixels"]
        self.all_layers = ["pixels"]
        self.names = ["pixels"]
        self.clustering_feature = "pixels"
        self.key = f"pixels|{image_size}|{channels}|{self.target_dim}"

    def dims(self) -> dict[str, dict[str, int]]:
        return self._dims

    def __call__(self, images: torch.Tensor, names: Sequence[str]) -> dict[str, torch.Tensor]:
        return {"pixels": pooled(images[:, : self.channels], self._dims["pixels"]["pool"])}


def is_greyscale(source: ImageSource, n: int = 32) -> bool:
    """Whether the first ``n`` images of ``source`` have three equal channels."""
    for i in range(min(n, len(source))):
        a = np.asarray(source.load(i))
        if a.ndim == 3 and not (np.array_equal(a[..., 0], a[..., 1]) and np.array_equal(a[..., 0], a[..., 2])):
            return False
    return True


# Pooled conv activations and pixels are large: stored as float16 (exact enough for a
# linear probe, half the disk and memory); the fc features as float32.
_FLOAT16 = ("conv", "pixels")


def _dtype(name: str) -> np.dtype:
    return np.dtype(np.float16) if name.startswith(_FLOAT16) else np.dtype(np.float32)


class FeatureStore:
    """Features of an :class:`EvalData`'s splits, extracted once per (weights, split,
    feature) and cached as ``.npy`` under ``cache_dir`` (or kept in memory).

    Rows are addressed by image position in the split: extraction writes each batch at
    its indices, so the loader order does not matter. A request for several missing
    features computes them all in one pass over the images.
    """

    def __init__(self, encoder: Encoder, data: EvalData, cache_dir: str | Path | None = None,
                 batch_size: int = 256, workers: int = 0) -> None:
        self.encoder = encoder
        self.data = data
        self.cache_dir = Path(cache_dir) if cache_dir is not None else None
        self.batch_size = batch_size
        self.workers = workers
        self._memory: dict[tuple[str, str], np.ndarray] = {}
        self.extracted_images = 0  # images forwarded by this store (cost accounting)

    def _path(self, split: str, name: str) -> Path | None:
        if self.cache_dir is None:
            return None
        d = self.encoder.dims()[name]
        ident = json.dumps([self.encoder.key, self.data.keys[split], name, d, _dtype(name).str])
        return self.cache_dir / f"{split}-{name}-{hashlib.sha1(ident.encode()).hexdigest()[:16]}.npy"

    def get(self, split: str, names: Sequence[str]) -> dict[str, np.ndarray]:
        """``name -> (N_split, dim)`` arrays (memory-mapped when cached) for ``names``."""
        unknown = [n for n in names if n not in self.encoder.names]
        if unknown:
            raise ValueError(f"unknown feature(s) {unknown}; available: {self.encoder.names}")
        out: dict[str, np.ndarray] = {}
        missing = []
        for n in names:
            if (split, n) in self._memory:
                out[n] = self._memory[(split, n)]
                continue
            p = self._path(split, n)
            if p is not None and p.exists():
                out[n] = np.load(p, mmap_mode="r")
            else:
                missing.append(n)
        if missing:
            out.update(self._extract(split, missing))
        return out

    def _extract(self, split: str, names: list[str]) -> dict[str, np.ndarray]:
        source = self.data.source(split)
        n = len(source)
        dims = self.encoder.dims()
        arrays: dict[str, np.ndarray] = {}
        tmp_paths: dict[str, tuple[Path, Path]] = {}
        for name in names:
            p = self._path(split, name)
            shape = (n, dims[name]["dim"])
            if p is None:
                arrays[name] = np.zeros(shape, dtype=_dtype(name))
            else:
                p.parent.mkdir(parents=True, exist_ok=True)
                tmp = p.with_name(f".{p.stem}.{os.getpid()}.tmp.npy")
                arrays[name] = np.lib.format.open_memmap(tmp, mode="w+", dtype=_dtype(name), shape=shape)
                tmp_paths[name] = (tmp, p)
        seen = np.zeros(n, dtype=bool)
        loader = make_loader(IndexedDataset(source, cluster_transform(self.data.spec)), self.batch_size, self.workers)
        try:  # the encoder moves the images to its device and freezes the network itself
            for idx_np, feats, _ in iter_features(lambda x: self.encoder(x, names), loader, desc=f"features {split}"):
                for name in names:
                    rows = feats[name]
                    if not np.isfinite(rows).all():
                        raise ValueError(f"{name} features of {split} images are NaN/Inf; the checkpoint has diverged")
                    cast = rows.astype(arrays[name].dtype)
                    if not np.isfinite(cast).all():
                        raise ValueError(f"{name} features of {split} images exceed the float16 range of the feature "
                                         "store (|x| > 65504): the checkpoint's activations have blown up")
                    arrays[name][idx_np] = cast
                seen[idx_np] = True
        except BaseException:
            for tmp, _ in tmp_paths.values():
                tmp.unlink(missing_ok=True)
            raise
        if not seen.all():
            raise RuntimeError(f"feature extraction missed {int((~seen).sum())} {split} images")
        self.extracted_images += n
        out: dict[str, np.ndarray] = {}
        for name, arr in arrays.items():
            if name in tmp_paths:
                tmp, final = tmp_paths[name]
                arr.flush()
                os.replace(tmp, final)
                out[name] = np.load(final, mmap_mode="r")
            else:
                self._memory[(split, name)] = arr
                out[name] = arr
        return out
