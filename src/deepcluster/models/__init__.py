"""Model registry: ``create_model(name, **kwargs)`` builds a registered network.

Every model is a :class:`DeepClusterNet` with ``forward_features`` (the clustering
features), ``forward_head`` and ``reset_head(num_clusters)``.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

from .alexnet import alexnet, alexnet_small
from .centroid_head import CentroidClassifier, CentroidHead
from .convnet import DeepClusterNet, MultiHeadClassifier
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


def create_model(name: str, sobel: bool = True, num_clusters: int = 100, cluster_feature: str = "fc7",
                 projection_dim: int | None = None, head_temperature: float = 0.1, **kwargs) -> DeepClusterNet:
    """Build the registered model ``name``; ``cluster_feature`` is what ``forward_features``
    returns (``fc7``, ``backbone`` or ``projection``, see :class:`DeepClusterNet`);
    ``projection`` adds a ``fc_dim -> projection_dim`` (default 128) linear layer.

    Raises:
        ValueError: if ``name`` is not registered (the message lists the known names) or
            ``cluster_feature`` is unknown.
    """
    if name not in _REGISTRY:
        raise ValueError(f"unknown architecture {name!r}; choose one of {list_models()}")
    model = _REGISTRY[name](num_clusters=num_clusters, sobel=sobel, **kwargs)
    if cluster_feature == "projection":
        model.add_projection(projection_dim or 128, num_clusters)
    elif projection_dim is not None:
        raise ValueError("projection_dim goes with cluster_feature 'projection'")
    model.head_temperature = float(head_temperature)
    model.cluster_feature = cluster_feature  # validated by the setter
    return model


def model_from_meta(meta: dict[str, Any], num_clusters: int, dropout: float = 0.5) -> DeepClusterNet:
    """The architecture a checkpoint's ``meta`` records (arch, Sobel, image size, width,
    fc width, clustering feature, projection width), with fresh weights and a head of ``num_clusters``."""
    kwargs: dict[str, Any] = {"image_size": meta["image_size"], "dropout": dropout}
    for key in ("width", "fc_dim"):
        if meta.get(key) is not None:
            kwargs[key] = meta[key]
    return create_model(meta["arch"], sobel=meta["sobel"], num_clusters=num_clusters,
                        cluster_feature=meta.get("cluster_feature") or "fc7",
                        projection_dim=meta.get("projection_dim"), **kwargs)


__all__ = ["CentroidClassifier", "CentroidHead", "DeepClusterNet", "MultiHeadClassifier", "Sobel", "create_model", "list_models", "model_from_meta",
           "register_model", "alexnet", "alexnet_small", "vgg16"]
