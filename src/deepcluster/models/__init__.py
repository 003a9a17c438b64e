"""Model registry: ``create_model(name, **kwargs)`` builds a registered network.

Every model is a :class:`DeepClusterNet` with ``forward_features`` (the clustering
features), ``forward_head`` and ``reset_head(num_clusters)``.
"""

from __future__ import annotations

from collections.abc import Callable

from .alexnet import alexnet, alexnet_small
from .centroid_head import CentroidClassifier, CentroidHead
from .convnet import DeepClusterNet
from .sobel import Sobel
from .vgg import vgg16

_REGISTRY: dict[str, Callable[..., DeepClusterNet]] = {
    "alexnet": alexnet,
    "alexnet_small": alexnet_small,
    "vgg16": vgg16,
}


def register_model(name: str, builder: Callable[..., DeepClusterNet]) -> None:
    """Add ``builder`` under ``name``; it must return a :class:`DeepClusterNet`."""
    if name in _REGISTRY:
        raise ValueError(f"model {name!r} is already registered")
    _REGISTRY[name] = builder


def list_models() -> list[str]:
    return sorted(_REGISTRY)


def create_model(name: str, sobel: bool = True, num_clusters: int = 100, **kwargs) -> DeepClusterNet:
    """Build the registered model ``name``.

    Raises:
        ValueError: if ``name`` is not registered (the message lists the known names).
    """
    if name not in _REGISTRY:
        raise ValueError(f"unknown architecture {name!r}; choose one of {list_models()}")
    return _REGISTRY[name](num_clusters=num_clusters, sobel=sobel, **kwargs)


__all__ = ["CentroidClassifier", "CentroidHead", "DeepClusterNet", "Sobel", "create_model", "list_models",
           "register_model", "alexnet", "alexnet_small", "vgg16"]
