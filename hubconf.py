"""torch.hub entries for DeepCluster backbones exported with ``deepcluster export-model``.

Works offline and without the ``deepcluster`` package installed::

    model = torch.hub.load("/path/to/deepcluster", "deepcluster_alexnet", source="local",
                           weights="backbone.safetensors")
    feats = model.forward_features(images)  # (B, 3, H, W) normalised RGB -> (B, D)

No weights are downloaded: ``weights`` is a ``.safetensors`` file written by
``deepcluster export-model RUN --format safetensors -o FILE``.
"""

import importlib.util
import os

dependencies = ["torch"]


def _standalone():
    """``src/deepcluster/standalone.py`` loaded by path (it imports only torch)."""
    path = os.path.join(os.path.dirname(os.path.abspath(__file__)), "src", "deepcluster", "standalone.py")
    spec = importlib.util.spec_from_file_location("deepcluster_hub_standalone", path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def _load(arch, weights):
    if weights is None:
        raise ValueError(f"{arch}: pass weights=FILE, a .safetensors written by `deepcluster export-model` "
                         "(nothing is downloaded)")
    model = _standalone().load(str(weights))
    if model.arch != arch:
        raise ValueError(f"{weights} holds the {model.arch!r} backbone, not {arch!r}: use deepcluster_{model.arch}")
    return model


def deepcluster_alexnet(weights=None):
    """DeepCluster AlexNet (BN, Sobel front end folded in), 224 px: ``forward_features`` gives fc7."""
    return _load("alexnet", weights)


def deepcluster_alexnet_small(weights=None):
    """DeepCluster's AlexNet for 28-64 px images (see docs/MODELS.md): ``forward_features`` gives fc7."""
    return _load("alexnet_small", weights)


def deepcluster_vgg16(weights=None):
    """DeepCluster VGG-16-BN in torchvision's ``vgg16_bn`` layout: ``forward_features`` gives fc7."""
    return _load("vgg16", weights)
