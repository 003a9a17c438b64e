"""The two transforms of DeepCluster: clustering-time (deterministic) and training-time."""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torchvision import transforms as T

from ..config import AugmentConfig

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)


@dataclass(frozen=True)
class ImageSpec:
    """How a data set's images are sized and normalised.

    ``resize`` is the side images are resized to before the ``size`` center crop at
    clustering time (256 -> 224 for ImageNet-size images; equal to ``size`` for data
    sets whose images already have their native size).
    """

    size: int
    resize: int
    mean: tuple[float, float, float] = IMAGENET_MEAN
    std: tuple[float, float, float] = IMAGENET_STD


def cluster_transform(spec: ImageSpec) -> T.Compose:
    """Resize + center crop, no randomness (features for clustering and evaluation)."""
    return T.Compose([
        T.Resize(spec.resize),
        T.CenterCrop(spec.size),
        T.ToTensor(),
        T.Normalize(spec.mean, spec.std),
    ])


class MultiView:
    """``views`` independent draws of ``transform`` on one image, stacked ``(views, C, H, W)``
    (multi-crop at one resolution: every view gets the image's pseudo-label)."""

    def __init__(self, transform, views: int) -> None:
        if views < 1:
            raise ValueError(f"views must be >= 1, got {views}")
        self.transform, self.views = transform, views

    def __call__(self, image) -> torch.Tensor:
        return torch.stack([self.transform(image) for _ in range(self.views)])

    def __repr__(self) -> str:
        return f"MultiView({self.views} x {self.transform!r})"


def blur_kernel(size: int) -> int:
    """The odd Gaussian-blur kernel side for ``size`` px images: about 10 % of it, at least 3."""
    k = max(3, int(round(0.1 * size)))
    return k if k % 2 else k + 1


def train_transform(spec: ImageSpec, crop_scale: tuple[float, float] = (0.08, 1.0), hflip: bool = True,
                    affine: float = 0.0, erasing: float = 0.0, jitter: float = 0.0, blur: float = 0.0) -> T.Compose:
    """Random resized crop + horizontal flip (the paper's training augmentation).

    Args:
        crop_scale: area range of ``RandomResizedCrop`` (paper: torchvision's default
            0.08-1).
        hflip: random horizontal flips.
        affine: if > 0, a random affine warp first: rotation up to ``15 * affine``
            degrees, translation up to ``0.1 * affine`` of the side, shear up to
            ``10 * affine`` degrees (an option for small grey images, where crops and flips
            are almost the only invariances the paper's augmentation teaches).
        erasing: probability of ``RandomErasing`` (a random rectangle set to 0 after
            normalisation), 0 to disable.
        jitter: strength ``s`` of a colour jitter applied with probability 0.8 (SimCLR's
            recipe without hue): brightness, contrast and saturation factors drawn in
            ``[1 - 0.4 s, 1 + 0.4 s]``; on grey images only brightness and contrast act.
            0 to disable.
        blur: probability of a Gaussian blur (kernel about 10 % of the side, odd, at least
            3; sigma 0.1-2), 0 to disable.
    """
    ops: list = []
    if affine > 0:
        ops.append(T.RandomAffine(degrees=15 * affine, translate=(0.1 * affine, 0.1 * affine), shear=10 * affine))
    ops.append(T.RandomResizedCrop(spec.size, scale=crop_scale))
    if hflip:
        ops.append(T.RandomHorizontalFlip())
    if jitter > 0:
        ops.append(T.RandomApply([T.ColorJitter(0.4 * jitter, 0.4 * jitter, 0.4 * jitter)], p=0.8))
    if blur > 0:
        ops.append(T.RandomApply([T.GaussianBlur(blur_kernel(spec.size), sigma=(0.1, 2.0))], p=blur))
    ops += [T.ToTensor(), T.Normalize(spec.mean, spec.std)]
    if erasing > 0:
        ops.append(T.RandomErasing(p=erasing, scale=(0.02, 0.2)))
    return T.Compose(ops)


def train_transform_from(spec: ImageSpec, augment: AugmentConfig) -> T.Compose:
    """:func:`train_transform` with a run's ``augment`` config section."""
    return train_transform(spec, tuple(augment.crop_scale), augment.hflip, affine=augment.affine,
                           erasing=augment.erasing, jitter=augment.jitter, blur=augment.blur)
