"""Reading a run directory for figures, the report and export.

The files are those ``deepcluster train`` writes (``config.yaml``, ``metrics.jsonl``,
``checkpoint.pt``, ``assignments.npy``); they are read directly (this package never
imports the training loop). Images come from the checkpoint's data configuration,
rebuilt exactly as training built them (:func:`deepcluster.data.training_source`).
"""

from __future__ import annotations

import json
import os
import tempfile
from dataclasses import dataclass, field
from functools import cached_property
from pathlib import Path
from typing import Any

import numpy as np
import torch

from ..checkpoint import CheckpointError, load_model
from ..data import ImageSource, ImageSpec, cluster_transform, image_spec, training_source
from ..models import DeepClusterNet, model_from_meta
from .images import to_display

METRICS = "metrics.jsonl"
CHECKPOINT = "checkpoint.pt"
ASSIGNMENTS = "assignments.npy"
CONFIG = "config.yaml"


def read_metrics(run_dir: str | Path) -> list[dict[str, Any]]:
    """The per-epoch records of ``metrics.jsonl``, oldest first.

    Raises:
        ValueError: the directory does not exist, has no ``metrics.jsonl``, or it is empty
            or not JSON lines.
    """
    run_dir = Path(run_dir)
    if not run_dir.is_dir():
        raise ValueError(f"run directory {run_dir} does not exist; pass the --output-dir of a `deepcluster train` run")
    path = run_dir / METRICS
    if not path.is_file():
        raise ValueError(f"{run_dir} has no {METRICS}; it is not a training run directory "
                         f"(train first: deepcluster train --output-dir {run_dir})")
    records = []
    for n, line in enumerate(path.read_text().splitlines(), 1):
        if line.strip():
            try:
                records.append(json.loads(line))
            except json.JSONDecodeError:
                raise ValueError(f"{path} line {n} is not valid JSON; the file is damaged") from None
    if not records:
        raise ValueError(f"{path} is empty: no epoch has finished yet; wait for the first epoch of training")
    return records


def read_assignments(run_dir: str | Path) -> np.ndarray | None:
    """``assignments.npy`` (``(epochs, N)`` int32), or ``None`` when absent."""
    path = Path(run_dir) / ASSIGNMENTS
    return np.load(path) if path.is_file() else None


def ensure_writable_dir(path: str | Path) -> Path:
    """Create ``path`` (and parents) and check a file can be written in it.

    Raises:
        ValueError: it cannot be created or written (naming the reason).
    """
    path = Path(path)
    try:
        path.mkdir(parents=True, exist_ok=True)
        fd, tmp = tempfile.mkstemp(dir=path, prefix=".write-test-")
        os.close(fd)
        os.unlink(tmp)
    except OSError as e:
        raise ValueError(f"output directory {path} is not writable ({e.strerror or e}); "
                         "choose another with --out") from None
    return path


@dataclass
class Run:
    """A trained run: the network, its checkpoint, its images and metrics.

    Attributes:
        path: the run directory (or the checkpoint's directory).
        model: the network in eval mode.
        state: the checkpoint dict.
        records: per-epoch metrics (empty when ``metrics.jsonl`` is absent).
        assignments: ``(epochs, N)`` cluster of every image at every epoch.
    """

    path: Path
    model: DeepClusterNet
    state: dict[str, Any]
    records: list[dict[str, Any]] = field(default_factory=list)
    assignments: np.ndarray | None = None

    @classmethod
    def load(cls, run_dir_or_checkpoint: str | Path, require_metrics: bool = False,
             device: str | torch.device = "cpu") -> "Run":
        """Load the checkpoint (a run directory or a ``.pt`` file) and what lies beside it."""
        p = Path(run_dir_or_checkpoint)
        run_dir = p if p.is_dir() else p.parent
        records = read_metrics(run_dir) if require_metrics or (run_dir / METRICS).is_file() else []
        model, state = load_model(p)
        model.to(device)
        hist = state["assignments"].numpy() if "assignments" in state else read_assignments(run_dir)
        return cls(run_dir, model, state, records, hist)

    @property
    def data_config(self) -> dict[str, Any]:
        cfg = self.state.get("config", {}).get("data")
        if not cfg:
            raise CheckpointError("the checkpoint has no data configuration (state['config']['data']); "
                                  "it was not written by deepcluster train")
        return cfg

    @property
    def seed(self) -> int:
        return int(self.state.get("config", {}).get("run", {}).get("seed", 0))

    @cached_property
    def source(self) -> ImageSource:
        """The images the run trained on, image ``i`` = row ``i`` of the assignments."""
        data = self.data_config
        source = training_source(data, self.seed)
        n = self.state.get("meta", {}).get("num_images")
        if n is not None and len(source) != n:
            raise ValueError(f"the run trained on {n} images but its data set now has {len(source)} "
                             f"({data.get('name')} at {data.get('root')}); the data changed since training")
        return source

    @cached_property
    def spec(self) -> ImageSpec:
        return image_spec(self.data_config["name"], self.state.get("meta", {}).get("image_size")
                          or self.data_config.get("image_size"))

    @property
    def labels(self) -> np.ndarray | None:
        return self.source.labels

    @property
    def class_names(self) -> list[str] | None:
        return self.source.classes

    @property
    def last_assignments(self) -> np.ndarray:
        """``(N,)`` cluster of every image at the last epoch."""
        if self.assignments is None or len(self.assignments) == 0:
            raise ValueError(f"{self.path} has no cluster assignments (assignments.npy); train at least one epoch")
        return np.asarray(self.assignments[-1], dtype=np.int64)

    def dataset_indices(self) -> np.ndarray:
        """``(N,)`` index of each run image in its data set split (differs with ``subset``)."""
        base = getattr(self.source, "indices", None)
        return np.asarray(base, dtype=np.int64) if base is not None else np.arange(len(self.source))

    def load_images(self, indices: np.ndarray) -> torch.Tensor:
        """Network inputs ``(n, 3, S, S)`` of run images ``indices`` (clustering transform)."""
        tf = cluster_transform(self.spec)
        return torch.stack([tf(self.source.load(int(i))) for i in indices])

    def display(self, x: torch.Tensor) -> np.ndarray:
        """Network inputs -> pictures ``(n, S, S, 3)`` in [0, 1]."""
        return to_display(x, self.spec.mean, self.spec.std)

    def random_model(self, seed: int = 0) -> DeepClusterNet:
        """A randomly initialised network of the same architecture (eval mode)."""
        with torch.random.fork_rng():
            torch.manual_seed(seed)
            model = model_from_meta(self.state["meta"], num_clusters=self.model.num_clusters)
        return model.to(next(self.model.parameters()).device).eval()


def sample_indices(n: int, size: int, seed: int = 0) -> np.ndarray:
    """A sorted random sample of ``min(size, n)`` of ``range(n)``."""
    if size >= n:
        return np.arange(n)
    return np.sort(np.random.default_rng(seed).choice(n, size, replace=False))
