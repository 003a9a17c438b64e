"""Take the backbone out of a run: weights any PyTorch user can load (issue 19).

``export_model(run, "safetensors" | "torchscript" | "onnx", out)`` writes the trained
network of a checkpoint without the ``deepcluster`` package inside:

- **safetensors**: the weights in the layout of :mod:`deepcluster.standalone` (a
  self-contained, torch-only model file), which for ``vgg16`` is exactly
  ``torchvision.models.vgg16_bn``'s; the header's metadata says what the weights are
  (architecture, input size, normalisation, training data, epochs, k, versions).
- **torchscript** / **onnx**: the folded network as a graph, ``(B, 3, H, W)``
  normalised RGB -> ``(B, D)`` clustering features (fc7 before its ReLU by default).

The Sobel front end is folded exactly into the first layer (:mod:`deepcluster.models.fold`).
"""

from __future__ import annotations

import copy
import inspect
import io
import json
import subprocess
from pathlib import Path
from typing import Any

import torch
from torch import nn
from torch.nn import functional as F

from . import __version__, standalone
from .checkpoint import load_model, saved_config
from .io import atomic_write
from .rundir import RunDirError, checkpoint_path
from .models import DeepClusterNet, Sobel, alexnet_small
from .models.fold import exact_front

FORMATS = ("safetensors", "torchscript", "onnx")


class ExportError(ValueError):
    """A backbone cannot be exported as asked; the message names what is wrong."""


def resolve_checkpoint(run: str | Path, epoch: int | str | None = None) -> Path:
    """The checkpoint file of ``run`` (:func:`deepcluster.rundir.checkpoint_path`: a ``.pt``
    file as is, or in a run directory ``checkpoint.pt``, ``checkpoint-epochE.pt`` or
    ``best.pt``).

    Raises:
        ExportError: no such file (the message lists the checkpoints that are there).
    """
    p = Path(run)
    if not p.exists():
        raise ExportError(f"no run directory or checkpoint file at {p}")
    try:
        found = checkpoint_path(p, epoch)
    except RunDirError as e:
        raise ExportError(str(e)) from None
    found = found / "checkpoint.pt" if found.is_dir() else found
    if not found.is_file():
        there = sorted(f.name for f in p.glob("*.pt"))
        raise ExportError(f"{p} has no {found.name} (checkpoints there: {', '.join(there) or 'none'})")
    return found


def backbone_meta(model: DeepClusterNet, state: dict[str, Any]) -> dict[str, Any]:
    """What :func:`deepcluster.standalone.build` needs, every default resolved."""
    meta = state.get("meta", {})
    arch = meta.get("arch")
    if arch not in standalone.ARCHS:
        raise ExportError(f"architecture {arch!r} cannot be exported; export-model knows {list(standalone.ARCHS)}")
    width = meta.get("width")
    if arch == "alexnet_small" and width is None:
        width = inspect.signature(alexnet_small).parameters["width"].default
    return {"arch": arch, "sobel": isinstance(model.sobel, Sobel), "image_size": model.image_size,
            "fc_dim": model.fc_dim, "width": width, "cluster_feature": model.cluster_feature,
            "projection_dim": model.projection_dim, "num_classes": model.num_clusters,
            "head_temperature": float(saved_config(state).optim.temperature if state.get("config")
                                      else model.head_temperature)}


def _vgg_fc6(weight: torch.Tensor, shape: tuple[int, int, int]) -> torch.Tensor:
    """fc6 weights ``(O, C*h*w)`` for torchvision's ``AdaptiveAvgPool2d(7)`` input ``(O, C*49)``.

    The pool is a linear map ``A`` (49 x hw) per channel; with ``h, w <= 7`` it has full
    column rank, so ``W' = W pinv(A)`` gives ``W' A = W`` (exact up to rounding).
    """
    c, h, w = shape
    if h > 7 or w > 7:
        raise ExportError(f"vgg16 features of {h}x{w} (image_size > 224) do not survive torchvision's 7x7 "
                          "average pool; export a model trained at 224 px or less")
    expanded = weight.reshape(weight.shape[0], c, h * w) @ torch.linalg.pinv(_pool7_matrix(h, w)).to(weight.dtype)
    return expanded.reshape(weight.shape[0], c * 49)  # (O, C*49)


def _pool7_matrix(h: int, w: int) -> torch.Tensor:
    """``AdaptiveAvgPool2d(7)`` on one ``h x w`` channel as a ``(49, h*w)`` float64 matrix."""
    basis = torch.eye(h * w, dtype=torch.float64).reshape(h * w, 1, h, w)
    return F.adaptive_avg_pool2d(basis, 7).reshape(h * w, 49).T


class _FixedPool7(nn.Module):
    """``AdaptiveAvgPool2d(7)`` for ``h x w`` inputs as a matrix product: ``(B, C, h, w) -> (B, C, 7, 7)``.

    ONNX has no adaptive pool whose output does not divide its input (vgg16 below 224 px);
    the graph formats are traced at one input size, where this is the same linear map.
    """

    def __init__(self, h: int, w: int) -> None:
        super().__init__()
        self.register_buffer("matrix", _pool7_matrix(h, w).float().T.contiguous())  # (hw, 49)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return (torch.flatten(x, 2) @ self.matrix).reshape(x.shape[0], x.shape[1], 7, 7)


def backbone_state_dict(model: DeepClusterNet, meta: dict[str, Any]) -> dict[str, torch.Tensor]:
    """``model``'s weights in :mod:`deepcluster.standalone`'s layout (Sobel folded into ``features.0``)."""
    sd = {k: v.detach().cpu() for k, v in model.state_dict().items()}
    front = exact_front(model.sobel, model.features[0])  # Sobel folded in, exactly
    out = {f"features.0.{k}": v.detach().cpu() for k, v in front.state_dict().items()}
    out.update({k: v for k, v in sd.items() if k.startswith("features.") and not k.startswith("features.0.")})
    fc6 = sd["classifier.1.weight"]
    if meta["arch"] == "vgg16":
        with torch.no_grad():
            fc6 = _vgg_fc6(fc6, tuple(model.forward_backbone(torch.zeros(1, 3, model.image_size, model.image_size,
                                                                         device=fc6.device)).shape[1:]))
    out.update({"classifier.0.weight": fc6, "classifier.0.bias": sd["classifier.1.bias"],
                "classifier.3.weight": sd["classifier.4.weight"], "classifier.3.bias": sd["classifier.4.bias"]})
    head = "head" if meta["projection_dim"] else "classifier.6"
    out.update({f"{head}.{p}": sd[f"head.{p}"] for p in ("weight", "bias")})
    out.update({k: v for k, v in sd.items() if k.startswith("projection.")})
    return {k: v.contiguous() for k, v in out.items()}


def to_backbone(model: DeepClusterNet, state: dict[str, Any]) -> tuple[standalone.Backbone, dict[str, Any]]:
    """The :class:`deepcluster.standalone.Backbone` (eval mode, CPU) of a trained model and its meta."""
    meta = backbone_meta(model, state)
    with torch.device("meta"):  # shapes only: every tensor comes from the model
        backbone = standalone.build(meta)
    was_training = model.training
    try:
        weights = backbone_state_dict(model.eval(), meta)  # eval: vgg16's shape probe must not move BN stats
    finally:
        model.train(was_training)
    backbone.load_state_dict(weights, strict=True, assign=True)
    return backbone.eval(), meta


def _git_commit() -> str:
    """``git rev-parse HEAD`` of the checkout this package runs from, else ``"unknown"`` (an
    installed package inside some other repository does not take that repository's commit)."""
    here = Path(__file__).resolve().parent
    try:
        res = subprocess.run(["git", "rev-parse", "--show-toplevel", "HEAD"], cwd=here, capture_output=True,
                             text=True, timeout=10)
    except (OSError, subprocess.SubprocessError):
        return "unknown"
    lines = res.stdout.split()
    if res.returncode != 0 or len(lines) != 2 or Path(lines[0]).resolve() / "src" / "deepcluster" != here:
        return "unknown"
    return lines[1]


def header_metadata(meta: dict[str, Any], state: dict[str, Any]) -> dict[str, str]:
    """The safetensors header: str -> str, lists and dicts as JSON."""
    from .data import image_spec

    run = state.get("meta", {})
    spec = image_spec(str(run.get("data")), meta["image_size"])
    info = {"format": "deepcluster-backbone", "architecture": meta["arch"], "sobel": meta["sobel"],
            "layout": "torchvision.models.vgg16_bn" if meta["arch"] == "vgg16" else "deepcluster standalone.py",
            "input_size": [3, meta["image_size"], meta["image_size"]], "mean": list(spec.mean), "std": list(spec.std),
            "training_data": run.get("data"), "training_images": run.get("num_images"), "epochs": state.get("epoch"),
            "k": run.get("k"), "feature": meta["cluster_feature"], "deepcluster_version": __version__,
            "git_commit": _git_commit(), "meta": meta}
    return {k: v if isinstance(v, str) else json.dumps(v) for k, v in info.items()}


class _Features(nn.Module):
    """``forward`` = the backbone's ``forward_features`` (what tracing and ONNX record)."""

    def __init__(self, backbone: standalone.Backbone) -> None:
        super().__init__()
        self.backbone = backbone

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.backbone.forward_features(x)


def _serialise(backbone: standalone.Backbone, meta: dict[str, Any], metadata: dict[str, str], fmt: str) -> bytes:
    if fmt == "safetensors":
        try:
            from safetensors.torch import save
        except ImportError:
            raise ExportError("--format safetensors needs the safetensors package: pip install safetensors") from None

        return save(dict(backbone.state_dict()), metadata=metadata)
    example = torch.randn(2, 3, meta["image_size"], meta["image_size"])
    if meta["arch"] == "vgg16":
        backbone = copy.deepcopy(backbone)
        backbone.avgpool = _FixedPool7(*backbone.forward_backbone(example).shape[-2:])
    buf = io.BytesIO()
    if fmt == "torchscript":
        traced = torch.jit.trace(_Features(backbone).eval(), example)
        torch.jit.save(traced, buf, _extra_files={"deepcluster.json": json.dumps(metadata)})
    else:
        try:
            import onnx  # torch.onnx needs it too
        except ImportError:
            raise ExportError("--format onnx needs the onnx package: pip install onnx") from None
        torch.onnx.export(_Features(backbone).eval(), (example,), buf, dynamo=False, input_names=["image"],
                          output_names=["features"], dynamic_axes={"image": {0: "batch"}, "features": {0: "batch"}})
        graph = onnx.load_from_string(buf.getvalue())
        onnx.helper.set_model_props(graph, metadata)  # the safetensors header, as ONNX metadata_props
        return graph.SerializeToString()
    return buf.getvalue()


def export_model(checkpoint_or_run: str | Path, fmt: str, out: str | Path, epoch: int | str | None = None) -> Path:
    """Write the backbone of a checkpoint (run directory or ``.pt`` file) as ``fmt`` to ``out``.

    Args:
        checkpoint_or_run: a run directory or a checkpoint file.
        fmt: ``safetensors``, ``torchscript`` or ``onnx``.
        out: the file to write (atomically).
        epoch: in a run directory, ``checkpoint-epoch{epoch}.pt`` or (``"best"``) ``best.pt``
            instead of ``checkpoint.pt``.

    Returns:
        ``out`` as a Path.

    Raises:
        ExportError: unknown format, missing checkpoint or architecture without export.
    """
    if fmt not in FORMATS:
        raise ExportError(f"unknown export format {fmt!r}; choose one of {list(FORMATS)}")
    model, state = load_model(resolve_checkpoint(checkpoint_or_run, epoch))
    backbone, meta = to_backbone(model, state)
    data = _serialise(backbone, meta, header_metadata(meta, state), fmt)
    atomic_write(out, lambda f: f.write(data))
    return Path(out)
