"""The network shape shared by every DeepCluster model.

A model is ``[Sobel] -> features (conv stack) -> classifier (fc6, fc7) -> head``. The
head is the only part that changes between epochs: ``reset_head`` replaces its weights
in place (no layer is stripped or re-appended at run time, unlike the original code).
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import nn
from torch.nn import functional as F

from .sobel import Sobel


class DeepClusterNet(nn.Module):
    """Convnet with a clustering-feature output and a resettable linear head.

    Args:
        features: the convolutional stack; input channels 2 with Sobel, else 3.
        conv_layers: name -> index in ``features`` of the ReLU that ends that conv layer
            (``conv1`` ... ``conv5``), used by the probes and visualisations.
        feature_shape: ``(C, H, W)`` of the output of ``features`` for ``image_size``.
        fc_dim: width of fc6 and fc7.
        num_clusters: initial size of the head.
        sobel: whether the fixed Sobel front end is used.
        image_size: the side of the square input images this model was built for.
        dropout: dropout probability before fc6 and fc7 (the paper uses dropout).
        cluster_feature: what ``forward_features`` returns, i.e. what the training loop
            clusters: ``"fc7"`` (the paper: fc7 before its ReLU), ``"backbone"`` (the
            flattened output of the conv stack, the input of fc6) or ``"projection"``
            (DeepCluster-v2: a linear projection of ReLU(fc7), L2-normalised; added by
            :meth:`add_projection`). The pseudo-label classifier is ``fc6 -> fc7 -> head``,
            with the projection between fc7 and the head when there is one.

    ``head_temperature`` (attribute, default 0.1, DeepCluster-v2's): the head's logits are
    divided by it when it reads the projection (a unit vector: without it a linear head
    starting at N(0, 0.01) gives near-uniform softmaxes).
    """

    CLUSTER_FEATURES = ("fc7", "backbone", "projection")

    def __init__(
        self,
        features: nn.Sequential,
        conv_layers: dict[str, int],
        feature_shape: Sequence[int],
        fc_dim: int,
        num_clusters: int,
        sobel: bool,
        image_size: int,
        dropout: float = 0.5,
        cluster_feature: str = "fc7",
    ) -> None:
        super().__init__()
        self.sobel = Sobel() if sobel else nn.Identity()
        self.features = features
        self.conv_layers = dict(conv_layers)
        self.image_size = image_size
        self.fc_dim = fc_dim
        self.projection: nn.Linear | None = None
        self.head_temperature = 0.1  # set by create_model / the training loop (optim.temperature)
        self.cluster_feature = cluster_feature
        c, h, w = feature_shape
        self.backbone_dim = c * h * w
        # fc7 is the clustering feature, taken *before* its ReLU as in the original.
        self.classifier = nn.Sequential(
            nn.Dropout(dropout),
            nn.Linear(c * h * w, fc_dim),
            nn.ReLU(inplace=True),
            nn.Dropout(dropout),
            nn.Linear(fc_dim, fc_dim),
        )
        self.head = nn.Linear(self.head_dim, num_clusters)
        self._init_weights()
        self.reset_head(num_clusters)

    def _init_weights(self) -> None:
        # The original initialisation: He-style normal for convs, N(0, 0.01) for linears.
        for m in self.modules():
            if isinstance(m, nn.Conv2d):
                n = m.kernel_size[0] * m.kernel_size[1] * m.out_channels
                nn.init.normal_(m.weight, 0.0, (2.0 / n) ** 0.5)
                if m.bias is not None:
                    nn.init.zeros_(m.bias)
            elif isinstance(m, nn.BatchNorm2d):
                nn.init.ones_(m.weight)
                nn.init.zeros_(m.bias)
            elif isinstance(m, nn.Linear):
                nn.init.normal_(m.weight, 0.0, 0.01)
                nn.init.zeros_(m.bias)

    @property
    def cluster_feature(self) -> str:
        return self._cluster_feature

    @cluster_feature.setter
    def cluster_feature(self, name: str) -> None:
        if name not in self.CLUSTER_FEATURES:
            raise ValueError(f"unknown clustering feature {name!r}; choose one of {list(self.CLUSTER_FEATURES)}")
        if (name == "projection") != (self.projection is not None):
            raise ValueError(f"clustering feature {name!r} does not fit this model "
                             f"({'with' if self.projection is not None else 'without'} a projection)")
        self._cluster_feature = name

    @property
    def feature_dim(self) -> int:
        """Width of ``forward_features``' output: ``fc_dim``, ``backbone_dim`` (``C*h*w``)
        or ``projection_dim``."""
        return {"fc7": self.fc_dim, "backbone": self.backbone_dim, "projection": self.head_dim}[self.cluster_feature]

    @property
    def projection_dim(self) -> int | None:
        return None if self.projection is None else self.projection.out_features

    @property
    def head_dim(self) -> int:
        """Width of the head's input: ``projection_dim`` with a projection, else ``fc_dim``."""
        return self.fc_dim if self.projection is None else self.projection.out_features

    @property
    def num_clusters(self) -> int:
        return self.head.out_features

    def new_head(self, num_clusters: int, generator: torch.Generator | None = None) -> nn.Linear:
        """A fresh ``head_dim -> num_clusters`` linear layer on the model's device: weights
        N(0, 0.01), bias 0 (the paper's initialisation of the classifier)."""
        if num_clusters < 1:
            raise ValueError(f"num_clusters must be >= 1, got {num_clusters}")
        p = next(self.classifier.parameters())
        head = nn.Linear(self.head_dim, num_clusters, device=p.device, dtype=p.dtype)
        with torch.no_grad():
            w = torch.randn(head.weight.shape, generator=generator, dtype=p.dtype) * 0.01
            head.weight.copy_(w.to(p.device))
            head.bias.zero_()
        return head

    def add_projection(self, dim: int, num_clusters: int) -> None:
        """Insert a ``fc_dim -> dim`` linear projection (N(0, 0.01) weights, 0 bias, as every
        linear layer here) between fc7 and a new head of ``num_clusters``, and make its
        L2-normalised output the clustering feature (DeepCluster-v2)."""
        if self.projection is not None:
            raise ValueError("this model already has a projection")
        if dim < 1:
            raise ValueError(f"projection_dim must be >= 1, got {dim}")
        p = next(self.classifier.parameters())
        self.projection = nn.Linear(self.fc_dim, dim, device=p.device, dtype=p.dtype)
        with torch.no_grad():
            nn.init.normal_(self.projection.weight, 0.0, 0.01)
            nn.init.zeros_(self.projection.bias)
        self.reset_head(num_clusters)
        self.cluster_feature = "projection"

    def reset_head(self, num_clusters: int, generator: torch.Generator | None = None) -> None:
        """Replace the head by :meth:`new_head` (paper: a new classifier every epoch,
        since the cluster indices of two epochs are unrelated). The parameters are new
        objects, so optimisers holding the old head must be rebuilt.
        """
        self.head = self.new_head(num_clusters, generator)

    def forward_conv(self, x: torch.Tensor, layers: Sequence[str]) -> dict[str, torch.Tensor]:
        """ReLU'd activations of the named conv layers: name -> ``(B, C_l, H_l, W_l)``."""
        unknown = [n for n in layers if n not in self.conv_layers]
        if unknown:
            raise ValueError(
                f"unknown layer(s) {unknown}; this model has {list(self.conv_layers)}"
            )
        wanted = {self.conv_layers[n]: n for n in layers}
        last = max(wanted)
        out: dict[str, torch.Tensor] = {}
        h = self.sobel(x)
        for i, module in enumerate(self.features):
            h = module(h)
            if i in wanted:
                out[wanted[i]] = h
            if i == last:
                break
        return out

    def forward_backbone(self, x: torch.Tensor) -> torch.Tensor:
        """Output of the conv stack: ``(B, 3, H, W) -> (B, C, h, w)``."""
        return self.features(self.sobel(x))

    def features_from_backbone(self, backbone: torch.Tensor) -> torch.Tensor:
        """Clustering features from ``forward_backbone``' output: ``(B, C, h, w) -> (B, feature_dim)``."""
        return top_features(torch.flatten(backbone, 1), self.cluster_feature, self.classifier, self.projection)

    def project(self, fc7: torch.Tensor) -> torch.Tensor:
        """The L2-normalised projection of ReLU(fc7): ``(B, fc_dim) -> (B, projection_dim)``."""
        if self.projection is None:
            raise ValueError("this model has no projection (cluster_feature 'projection')")
        return project(fc7, self.projection)

    def forward_features(self, x: torch.Tensor) -> torch.Tensor:
        """Clustering features (``cluster_feature``; default fc7 before its ReLU):
        ``(B, 3, H, W) -> (B, feature_dim)``."""
        return self.features_from_backbone(self.forward_backbone(x))

    def forward_fc7(self, x: torch.Tensor) -> torch.Tensor:
        """fc7 before its ReLU, whatever is clustered: ``(B, 3, H, W) -> (B, fc_dim)``."""
        return self.classifier(torch.flatten(self.forward_backbone(x), 1))

    def forward_head(self, fc7: torch.Tensor, head: nn.Module | None = None) -> torch.Tensor:
        """Logits over clusters from ``forward_fc7``' output: ``(B, fc_dim) -> (B, k)``,
        by ``self.head`` or another head on the same fc7 (several clusterings); with a
        projection the head reads it and its logits are divided by ``head_temperature``."""
        head = self.head if head is None else head
        if self.projection is None:
            return head(torch.relu(fc7))
        return head(project(fc7, self.projection)) / self.head_temperature

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.forward_head(self.forward_fc7(x))


def project(fc7: torch.Tensor, projection: nn.Module) -> torch.Tensor:
    """``L2(projection(ReLU(fc7)))``, the DeepCluster-v2 clustering feature."""
    return F.normalize(projection(torch.relu(fc7)), dim=1)


def top_features(flat: torch.Tensor, cluster_feature: str, classifier: nn.Module,
                 projection: nn.Module | None) -> torch.Tensor:
    """The clustering feature from the flattened conv output ``flat`` (fc6's input):
    ``flat`` itself (backbone), fc7 before its ReLU, or its projection."""
    if cluster_feature == "backbone":
        return flat
    fc7 = classifier(flat)
    return fc7 if cluster_feature == "fc7" else project(fc7, projection)


def conv_bn_relu(
    layers: list[nn.Module], names: dict[str, int], name: str, cin: int, cout: int, k: int,
    stride: int = 1, padding: int = 0,
) -> None:
    """Append conv + BN + ReLU to ``layers`` and record the ReLU's index as ``name``."""
    layers += [nn.Conv2d(cin, cout, k, stride, padding), nn.BatchNorm2d(cout), nn.ReLU(inplace=True)]
    names[name] = len(layers) - 1


def output_shape(features: nn.Module, in_channels: int, image_size: int) -> tuple[int, int, int]:
    with torch.no_grad():
        was_training = features.training
        features.eval()
        try:
            out = features(torch.zeros(1, in_channels, image_size, image_size))
        except RuntimeError:
            out = torch.zeros(1, 1, 0, 0)
        features.train(was_training)
    if out.shape[-1] < 1 or out.shape[-2] < 1:
        raise ValueError(f"image_size {image_size} is too small for this architecture; use a larger "
                         "--image-size or --arch alexnet_small")
    return tuple(out.shape[1:])  # type: ignore[return-value]


class MultiHeadClassifier(nn.Module):
    """``model`` (shared, not copied) with ``model.head`` and further heads on the same
    fc7: what is trained in an epoch with several clusterings (``cluster.clusterings``).

    ``forward`` returns ``(H, B, k)`` logits, head ``j`` scoring clustering ``j``.
    """

    def __init__(self, model: DeepClusterNet, extra_heads: Sequence[nn.Module]) -> None:
        super().__init__()
        self.model = model
        self.extra_heads = nn.ModuleList(extra_heads)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        fc7 = self.model.forward_fc7(x)
        return torch.stack([self.model.forward_head(fc7, head) for head in (self.model.head, *self.extra_heads)])
