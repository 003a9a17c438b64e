"""What every protocol needs: the frozen encoder, the labelled data, the feature store,
where results go. Built from a checkpoint (:func:`open_checkpoint`) or for the raw-pixel
baseline (:func:`open_pixels`).

Results of a checkpoint go to ``eval/`` in its run directory (``RUN/eval/<protocol>.json``),
or to ``<stem>_eval/`` next to a ``.pt`` file with another name; cached features to
``cache/`` inside that folder. Results on another data set, split or subset than the
run's own data set, test split, all images are kept beside them, keyed by those
(:func:`result_name`: ``linear--cifar10-test-sub500.json``).
"""

from __future__ import annotations

import json
import logging
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from ..checkpoint import CheckpointError, load_model, saved_config
from ..io import atomic_write
from ..machine import machine_info
from ..rundir import ensure_writable_dir
from ..models import DeepClusterNet
from .features import Encoder, FeatureStore, NetEncoder, PixelEncoder, is_greyscale
from .splits import EvalData, load_eval_data

logger = logging.getLogger(__name__)


def results_dir_for(checkpoint: str | Path) -> Path:
    """``RUN/eval`` for a run directory or ``RUN/checkpoint.pt``; ``DIR/<stem>_eval`` for ``DIR/<stem>.pt``."""
    p = Path(checkpoint)
    if p.is_dir():
        return p / "eval"
    if p.name == "checkpoint.pt":
        return p.parent / "eval"
    return p.parent / f"{p.stem}_eval"


def _slug(text: str) -> str:
    """``text`` safe in a file name: runs of characters other than letters, digits and
    ``. _ + -`` become ``_``."""
    return re.sub(r"[^A-Za-z0-9._+-]+", "_", text).strip("_") or "_"


def result_name(protocol: str, data: str, root: str | None = None, *, own: bool = True, split: str = "test",
                subset: int | None = None, test_subset: int | None = None, test_root: str | None = None) -> str:
    """The stem of a result file: ``protocol`` for the run's own data set (``own``), its
    test split and all images; else ``<protocol>--<data>-<split>[-sub<N>][-testsub<M>]``.

    Args:
        protocol: ``linear``, ``knn-conv3``, ... (the protocol's own name).
        data, root: the data set evaluated on; a folder is named by its root's last
            part (``folder-photos``).
        own: whether ``data`` is the data set the checkpoint was trained on.
        split: the split the scores are measured on (``clusters --split train``).
        subset, test_subset: the fixed random subsets of the training and test splits.
        test_root: a folder's separate test folder, named in the split part.
    """
    if own and split == "test" and subset is None and test_subset is None and test_root is None:
        return protocol
    tag = f"folder-{_slug(Path(root).name)}" if data == "folder" and root else _slug(data)
    parts = [tag, f"{split}-{_slug(Path(test_root).name)}" if test_root and split == "test" else split]
    parts += [f"sub{subset}"] if subset is not None else []
    parts += [f"testsub{test_subset}"] if test_subset is not None else []
    return f"{protocol}--{'-'.join(parts)}"


def checkpoint_file(checkpoint: str | Path) -> Path:
    p = Path(checkpoint)
    return p / "checkpoint.pt" if p.is_dir() else p


@dataclass
class EvalContext:
    """Everything a protocol function needs.

    Attributes:
        encoder: frozen features (a network's or raw pixels).
        data: the labelled train/test images and the validation part.
        store: cached features of ``data`` under ``encoder``.
        results_dir: where ``<protocol>.json`` files go.
        device: where networks run.
        model: the network (``None`` for raw pixels).
        state: the checkpoint dict (``None`` for raw pixels).
        checkpoint: the checkpoint path (``None`` for raw pixels).
        method: ``deepcluster``, ``random``, ``supervised`` (from the checkpoint) or ``pixels``.
        batch_size, workers, seed: extraction / training settings shared by the protocols.
        own_data: ``data`` is the data set the checkpoint was trained on (raw pixels: the
            data set asked for); results elsewhere get keyed file names (:func:`result_name`).
    """

    encoder: Encoder
    data: EvalData
    store: FeatureStore
    results_dir: Path
    device: torch.device
    model: DeepClusterNet | None = None
    state: dict[str, Any] | None = None
    checkpoint: str | None = None
    method: str = "deepcluster"
    batch_size: int = 256
    workers: int = 0
    seed: int = 0
    extra: dict[str, Any] = field(default_factory=dict)
    own_data: bool = True

    def require_model(self, protocol: str) -> DeepClusterNet:
        if self.model is None:
            raise ValueError(f"{protocol} trains a network and needs --checkpoint RUN_DIR_OR_FILE, not raw pixels")
        return self.model

    def header(self, protocol: str) -> dict[str, Any]:
        """The common part of every result file."""
        meta = (self.state or {}).get("meta", {})
        return {
            "protocol": protocol,
            "method": self.method,
            "checkpoint": self.checkpoint,
            "epoch": (self.state or {}).get("epoch"),
            "arch": meta.get("arch"),
            "data": self.data.info,
            "machine": machine_info(),
        }

    def result_path(self, name: str, split: str = "test") -> Path:
        """``results_dir/<stem>.json`` for protocol ``name`` scored on ``split`` of this
        context's data (the stem keyed by data set, split and subsets: :func:`result_name`)."""
        info = self.data.info
        stem = result_name(name, self.data.name, self.data.root, own=self.own_data, split=split,
                           subset=info.get("subset"), test_subset=info.get("test_subset"),
                           test_root=self.data.test_root)
        return self.results_dir / f"{stem}.json"

    def write(self, name: str, payload: dict[str, Any], split: str = "test") -> Path:
        """Atomically write ``payload`` as :meth:`result_path` ``(name, split)``; returns the path."""
        self.results_dir.mkdir(parents=True, exist_ok=True)
        path = self.result_path(name, split)
        text = json.dumps(payload, indent=2, sort_keys=False, default=_jsonable)
        atomic_write(path, lambda f: f.write(text.encode()))
        logger.info("wrote %s", path)
        return path


def _jsonable(o: Any) -> Any:
    if hasattr(o, "item"):
        return o.item()
    if hasattr(o, "tolist"):
        return o.tolist()
    return str(o)


def _run_data(state: dict[str, Any]) -> tuple[str | None, str | None]:
    """``(name, root)`` of the data set the checkpoint was trained on (``None`` where unknown)."""
    run_data = saved_config(state).data if state.get("config") else None
    return (run_data.name if run_data else None) or state.get("meta", {}).get("data"), \
        run_data.root if run_data else None


def _resolve_data(state: dict[str, Any], data: str | None, data_root: str | None) -> tuple[str, str | None]:
    run_name, run_root = _run_data(state)
    name = data or run_name
    if not name:
        raise CheckpointError("the checkpoint does not say which data set it was trained on; pass --data NAME")
    if data_root is not None:
        return name, data_root
    # A different data set than the checkpoint's must not inherit its root.
    return name, run_root if name == run_name else None


def _is_own_data(state: dict[str, Any], name: str, root: str | None) -> bool:
    """Whether ``(name, root)`` is the checkpoint's training data set (a folder: the same
    folder; a torchvision set: the same set wherever its files are)."""
    run_name, run_root = _run_data(state)
    if name != run_name:
        return False
    return name != "folder" or root is None or run_root is None or Path(root).resolve() == Path(run_root).resolve()


def open_checkpoint(checkpoint: str | Path, *, protocol: str = "eval", data: str | None = None,
                    data_root: str | None = None, test_root: str | None = None, subset: int | None = None,
                    test_subset: int | None = None, val_fraction: float = 0.1, seed: int = 0,
                    device: str = "cpu", batch_size: int = 256, workers: int = 0, cache: bool = True,
                    target_dim: int | None = None, download: bool = False) -> EvalContext:
    """An :class:`EvalContext` for a checkpoint (a run directory or a ``.pt`` file).

    The evaluation data default to the checkpoint's data set (name, root) at its input
    size; ``data``/``data_root`` replace them.

    Raises:
        CheckpointError: the checkpoint cannot be loaded.
        DataError: the data set has no labels (the message names the fix).
    """
    if device.startswith("cuda") and not torch.cuda.is_available():
        raise ValueError("--device cuda requested but no CUDA GPU is available; use --device cpu")
    model, state = load_model(checkpoint, map_location=device)
    ensure_writable_dir(results_dir_for(checkpoint))  # a read-only run folder fails now, not after the work
    name, root = _resolve_data(state, data, data_root)
    ev = load_eval_data(name, root, model.image_size, protocol=protocol, test_root=test_root, subset=subset,
                        test_subset=test_subset, val_fraction=val_fraction, seed=seed, download=download)
    f = checkpoint_file(checkpoint)
    st = f.stat()
    key = f"{f.resolve()}|{st.st_size}|{st.st_mtime_ns}|{state.get('epoch')}"
    encoder = NetEncoder(model, key, target_dim=target_dim, device=device)
    out = results_dir_for(checkpoint)
    store = FeatureStore(encoder, ev, out / "cache" if cache else None, batch_size=batch_size, workers=workers)
    method = state.get("meta", {}).get("method", "deepcluster")
    method = "deepcluster" if method in ("kmeans", "pic") else method
    return EvalContext(encoder, ev, store, out, torch.device(device), model, state, str(checkpoint), method,
                       batch_size, workers, seed, own_data=_is_own_data(state, name, root))


def open_pixels(data: str, output_dir: str | Path, *, protocol: str = "eval", data_root: str | None = None,
                test_root: str | None = None, image_size: int | None = None, subset: int | None = None,
                test_subset: int | None = None, val_fraction: float = 0.1, seed: int = 0, batch_size: int = 256,
                workers: int = 0, cache: bool = True, target_dim: int | None = None,
                download: bool = False) -> EvalContext:
    """An :class:`EvalContext` for the raw-pixel baseline on data set ``data``.

    Results go to ``output_dir`` (``<output_dir>/<protocol>.json``).
    """
    ev = load_eval_data(data, data_root, image_size, protocol=protocol, test_root=test_root, subset=subset,
                        test_subset=test_subset, val_fraction=val_fraction, seed=seed, download=download)
    channels = 1 if is_greyscale(ev.train) else 3
    encoder = PixelEncoder(ev.spec.size, channels, target_dim)
    out = Path(output_dir)
    store = FeatureStore(encoder, ev, out / "cache" if cache else None, batch_size=batch_size, workers=workers)
    return EvalContext(encoder, ev, store, out, torch.device("cpu"), None, None, None, "pixels",
                       batch_size, workers, seed)
