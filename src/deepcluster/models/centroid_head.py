"""A classifier made of this epoch's k-means centroids (the DeepCluster-v2 idea).

The paper replaces the classifier by a randomly initialised linear layer every epoch.
With tens of thousands of images an epoch is a few hundred steps, and the first of them
send the gradients of a random classifier into the network. DeepCluster-v2 (Caron et
al., 2020) instead scores each image against the centroids themselves: the logits are
cosine similarities, divided by a temperature, between the image's clustering feature
and the L2-normalised centroids. Training then pulls each image's (augmented) feature
towards its own cluster's centroid from the first step, and nothing is learned from
scratch each epoch.

Here the clustering feature of an image is the one k-means saw: fc7 (before its ReLU),
or the model's L2-normalised projection (``cluster_feature="projection"``), PCA-reduced
(whitened unless configured otherwise) with this epoch's fitted PCA, L2-normalised. The
PCA and the centroids are fixed buffers for the epoch; the gradient flows through them
into the network.
"""

from __future__ import annotations

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from .convnet import DeepClusterNet, top_features


class CentroidHead(nn.Module):
    """Logits ``cos(L2(PCA(f)), L2(c_j)) / temperature`` for clustering features ``f``.

    Args:
        mean: ``(D,)`` PCA mean of the clustering features.
        projection: ``(D, p)`` PCA projection (whitening included when fitted so).
        centroids: ``(k, p)`` k-means centroids in the projected space.
        temperature: softmax temperature (DeepCluster-v2: 0.1).
    """

    def __init__(self, mean: np.ndarray | torch.Tensor, projection: np.ndarray | torch.Tensor,
                 centroids: np.ndarray | torch.Tensor, temperature: float = 0.1) -> None:
        super().__init__()
        mean, projection, centroids = (torch.as_tensor(np.asarray(a), dtype=torch.float32)
                                       for a in (mean, projection, centroids))
        if projection.ndim != 2 or mean.shape != (projection.shape[0],) or centroids.ndim != 2 \
                or centroids.shape[1] != projection.shape[1]:
            raise ValueError(f"centroid head: mean {tuple(mean.shape)}, projection {tuple(projection.shape)} and "
                             f"centroids {tuple(centroids.shape)} do not fit together")
        if not temperature > 0:
            raise ValueError(f"temperature must be > 0, got {temperature}")
        self.register_buffer("mean", mean)
        self.register_buffer("projection", projection)
        self.register_buffer("centroids", F.normalize(centroids, dim=1))
        self.temperature = float(temperature)

    @property
    def num_clusters(self) -> int:
        return self.centroids.shape[0]

    def forward(self, features: torch.Tensor) -> torch.Tensor:
        """``(B, D)`` clustering features (fc7 before the ReLU, or the projection) -> ``(B, k)`` logits."""
        y = F.normalize((features.float() - self.mean) @ self.projection, dim=1)
        return y @ self.centroids.T / self.temperature


class CentroidClassifier(nn.Module):
    """``model``'s Sobel, conv, fc layers and projection if any (shared, not copied) followed
    by a :class:`CentroidHead` on its clustering feature: what is trained in an epoch of
    ``--head centroids``.

    ``model.head`` is not part of it, so ``DistributedDataParallel`` sees only
    parameters that receive gradients.
    """

    def __init__(self, model: DeepClusterNet, head: CentroidHead) -> None:
        super().__init__()
        if model.cluster_feature == "backbone":
            raise ValueError("the centroid head scores fc7 or the projection, not the backbone")
        self.sobel, self.features, self.classifier = model.sobel, model.features, model.classifier
        self.projection, self.cluster_feature = model.projection, model.cluster_feature
        self.head = head

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        flat = torch.flatten(self.features(self.sobel(x)), 1)
        return self.head(top_features(flat, self.cluster_feature, self.classifier, self.projection))
