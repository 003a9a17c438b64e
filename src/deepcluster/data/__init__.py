"""Data sets returning ``(image, index)``, transforms, and the cluster-balanced sampler.

``build_source(name, root, split)`` finds the images; ``IndexedDataset(source,
transform)`` is what the training loop iterates: features are stored by data-set index,
never by batch position.
"""

from __future__ import annotations

import numpy as np
import torch
from torch.utils.data import Dataset

from ..config import LABELS, DataConfig
from .manifest import Manifest, ManifestDiff, ManifestError, diff
from .sampler import ClusterBalancedSampler, balanced_plan, inverse_size_weights
from .scan import display_path, list_images, parse_display_path, walk_images
from .sources import DataError, FolderSource, ImageSource, TorchvisionSource, cifar10, mnist_like, stl10
from .transforms import (IMAGENET_MEAN, IMAGENET_STD, ImageSpec, MultiView, cluster_transform, train_transform,
                         train_transform_from)

DATASETS = ("fashion-mnist", "mnist", "cifar10", "stl10", "folder")

_SPECS = {
    "fashion-mnist": ImageSpec(28, 28, (0.2860,) * 3, (0.3530,) * 3),
    "mnist": ImageSpec(28, 28, (0.1307,) * 3, (0.3081,) * 3),
    "cifar10": ImageSpec(32, 32, (0.4914, 0.4822, 0.4465), (0.2470, 0.2435, 0.2616)),
    "stl10": ImageSpec(96, 96, (0.4467, 0.4398, 0.4066), (0.2603, 0.2566, 0.2713)),
}


def image_spec(name: str, image_size: int | None = None) -> ImageSpec:
    """Sizes and normalisation for data set ``name``; ``image_size`` overrides the size.

    Folders default to 224 px (resize 256, crop 224) with ImageNet statistics; for
    small images pass ``image_size`` (``deepcluster train`` picks it for a folder with
    :func:`folder_image_size` when none is given).
    """
    if name in _SPECS:
        spec = _SPECS[name]
        if image_size and image_size != spec.size:
            return ImageSpec(image_size, image_size, spec.mean, spec.std)
        return spec
    size = image_size or 224
    return ImageSpec(size, size if size < 128 else round(size * 256 / 224))


def folder_image_size(source: ImageSource, sample: int = 256) -> int:
    """The input size for a folder trained without ``--image-size``: the median shorter
    side of up to ``sample`` evenly spaced images (headers only, nothing decoded), kept
    within [28, 224]. Small images (thumbnails, Fashion-MNIST-like 28 px) are then trained
    at their own size instead of being blown up to 224 px, which costs ~64x the compute."""
    from PIL import Image

    paths = getattr(source, "paths", None)
    if not paths:
        return 224
    sides = []
    for i in np.unique(np.linspace(0, len(paths) - 1, min(sample, len(paths))).round().astype(int)):
        with Image.open(paths[int(i)]) as img:
            sides.append(min(img.size))
    return int(min(224, max(28, round(float(np.median(sides))))))


SPLITS: dict[str, tuple[str, ...] | None] = {
    "fashion-mnist": ("train", "test"), "mnist": ("train", "test"), "cifar10": ("train", "test"),
    "stl10": ("train", "test", "unlabeled", "train+unlabeled"), "folder": None,
}
"""The splits of each data set (``None``: a folder has one, its images; ``split`` is ignored)."""


def build_source(name: str, root: str | None = None, split: str = "train", download: bool = True,
                 max_bad_fraction: float = 0.5, labels: str = "folders") -> ImageSource:
    """The images of data set ``name`` (one of ``DATASETS``) for ``split``.

    ``split`` is one of ``SPLITS[name]`` (``train`` or ``test``; ``stl10`` also
    ``unlabeled`` and ``train+unlabeled``); ``folder`` ignores it and reads ``root``.
    ``labels`` is one of :data:`LABELS`; with ``none`` the source has no labels.

    Raises:
        DataError: unknown data set, split or labels setting (one line naming the valid
            ones), or the images cannot be found.
    """
    if name not in DATASETS:
        raise DataError(f"unknown data set {name!r}; choose one of {list(DATASETS)}")
    if labels not in LABELS:
        raise DataError(f"unknown labels setting {labels!r}; choose one of {list(LABELS)}")
    splits = SPLITS[name]
    if splits is not None and split not in splits:
        raise DataError(f"{name} has no split {split!r}; valid splits: {', '.join(splits)}")
    if name in ("fashion-mnist", "mnist"):
        source: ImageSource = mnist_like(name, root, split == "train", download)
    elif name == "cifar10":
        source = cifar10(root, split == "train", download)
    elif name == "stl10":
        source = stl10(root, split, download)
    elif not root:
        raise DataError("--data folder needs --data-root DIR, the folder of images")
    else:
        source = FolderSource(root, max_bad_fraction=max_bad_fraction)
    _apply_labels(source, labels)
    return source


def _apply_labels(source: ImageSource, labels: str) -> None:
    """Drop the labels of ``source`` for ``labels == "none"``; set its ``label_note``."""
    folder = isinstance(source, FolderSource)
    if labels == "none":
        source.labels, source.classes = None, None
        source.label_note = ("; folder names not used as labels (--labels none)" if folder
                             else "; labels not used (--labels none)")
    elif folder:
        source.label_note = ("; folder names used as labels (analysis only: NMI vs labels; --labels none if they "
                             "are not classes)" if source.labels is not None else "; no labels (no class sub-folders)")


def subset_indices(n: int, subset: int | None, seed: int) -> np.ndarray | None:
    """The fixed random subset of ``subset`` of ``n`` images a run with ``seed`` uses
    (sorted indices), or ``None`` for all of them. The one definition of the rule."""
    if subset is None or subset >= n:
        return None
    return np.sort(np.random.default_rng(seed).choice(n, subset, replace=False))


def training_source(data: DataConfig, seed: int, download: bool | None = None) -> ImageSource:
    """The images a run trained on, from its ``data`` config section.

    The same source ``deepcluster train`` builds: ``build_source`` over ``name``,
    ``root``, ``split``, then, with ``subset``, the fixed random subset drawn with the
    run's ``seed`` (:func:`subset_indices`, so image ``i`` of the run is
    ``source.indices[i]`` of the split).
    """
    source = build_source(data.name, data.root, data.split, data.download if download is None else download,
                          data.max_bad_fraction, data.labels)
    idx = subset_indices(len(source), data.subset, seed)
    return source if idx is None else Subset(source, idx)


class IndexedDataset(Dataset):
    """``source`` with ``transform``; item ``i`` is ``(transform(image_i), i)``."""

    def __init__(self, source: ImageSource, transform) -> None:
        self.source = source
        self.transform = transform

    def __len__(self) -> int:
        return len(self.source)

    def __getitem__(self, index: int) -> tuple[torch.Tensor, int]:
        return self.transform(self.source.load(index)), index


class LabelledDataset(Dataset):
    """``source`` with ``transform`` and labels; item ``i`` is ``(image, label)``.

    ``labels`` overrides the source's (pseudo-labels, or a subset's labels).
    """

    def __init__(self, source: ImageSource, transform, labels: np.ndarray | None = None,
                 indices: np.ndarray | None = None) -> None:
        labels = source.labels if labels is None else labels
        if labels is None:
            raise DataError(f"data set {source.name} has no labels; this needs a labelled data set")
        self.source, self.transform = source, transform
        self.labels = np.asarray(labels)
        self.indices = np.arange(len(source)) if indices is None else np.asarray(indices)

    def __len__(self) -> int:
        return len(self.indices)

    def __getitem__(self, i: int) -> tuple[torch.Tensor, int]:
        idx = int(self.indices[i])
        return self.transform(self.source.load(idx)), int(self.labels[idx])


class Subset(ImageSource):
    """The images ``indices`` of ``source`` (a fixed random subset, say)."""

    def __init__(self, source: ImageSource, indices: np.ndarray) -> None:
        self.base = source
        self.indices = np.asarray(indices, dtype=np.int64)
        self.name = source.name
        self.labels = None if source.labels is None else source.labels[self.indices]
        self.paths = None if source.paths is None else [source.paths[i] for i in self.indices]
        self.classes = source.classes
        self.label_note = source.label_note

    def __len__(self) -> int:
        return len(self.indices)

    def load(self, index: int):
        return self.base.load(int(self.indices[index]))


__all__ = [
    "DATASETS", "LABELS", "SPLITS", "ClusterBalancedSampler", "DataError", "FolderSource", "ImageSource", "ImageSpec",
    "IndexedDataset", "LabelledDataset", "Manifest", "ManifestDiff", "ManifestError", "MultiView", "Subset",
    "TorchvisionSource", "IMAGENET_MEAN", "IMAGENET_STD", "balanced_plan", "build_source", "cluster_transform", "diff",
    "display_path", "folder_image_size", "image_spec", "inverse_size_weights", "list_images", "parse_display_path", "subset_indices",
    "train_transform", "train_transform_from", "training_source", "walk_images",
]
