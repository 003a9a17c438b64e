"""TensorBoard logging for ``deepcluster train --tensorboard``.

Per epoch: every numeric entry of the metrics record as a scalar (grouped as ``nmi/``,
``loss/``, ``clusters/``, ``time/``), the first-layer filters as an image, and, given
sample images, the images once plus a grid of the sample images that most excite a few
conv5 filters. Event files go to ``RUN_DIR/tensorboard``; view them with
``tensorboard --logdir RUN_DIR/tensorboard``.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np
import torch

from .models import DeepClusterNet

SUBDIR = "tensorboard"

# metrics.jsonl key -> TensorBoard tag
TAGS = {
    "nmi_labels": "nmi/vs_labels", "nmi_prev": "nmi/vs_previous_epoch",
    "convnet_loss": "loss/convnet", "clustering_loss": "loss/clustering",
    "num_clusters": "clusters/count", "cluster_size_min": "clusters/size_min",
    "cluster_size_median": "clusters/size_median", "cluster_size_max": "clusters/size_max",
    "empty_clusters": "clusters/empty", "empty_reseeded": "clusters/empty_reseeded",
    "extract_s": "time/extract_s", "pca_s": "time/pca_s", "kmeans_s": "time/cluster_s", "train_s": "time/train_s",
    "epoch_s": "time/epoch_s", "images_per_s": "time/images_per_s",
}


def scalars(record: dict[str, Any]) -> dict[str, float]:
    """The record's numeric entries as ``tag -> value`` (None, private ``_`` keys and
    the epoch itself left out; unknown keys go under ``other/``)."""
    out = {}
    for key, value in record.items():
        if key == "epoch" or key.startswith("_") or value is None or isinstance(value, bool):
            continue
        if isinstance(value, (int, float, np.integer, np.floating)):
            out[TAGS.get(key, f"other/{key}")] = float(value)
    return out


class TensorBoardWriter:
    """Writes a run's per-epoch scalars and a few image grids for TensorBoard.

    Args:
        run_dir: the run directory; events go to ``run_dir/tensorboard``.

    Raises:
        RuntimeError: the ``tensorboard`` package is not installed (one line, with the fix).
    """

    def __init__(self, run_dir: str | Path) -> None:
        try:
            from torch.utils.tensorboard import SummaryWriter
        except ImportError:
            raise RuntimeError("--tensorboard needs the tensorboard package: pip install 'deepcluster[tensorboard]' "
                               "(or train without --tensorboard)") from None
        self.log_dir = Path(run_dir) / SUBDIR
        self.writer = SummaryWriter(log_dir=str(self.log_dir))
        self._logged_inputs = False

    def log_epoch(self, record: dict[str, Any], model: DeepClusterNet, sample_images: torch.Tensor | None) -> None:
        """Log one epoch.

        Args:
            record: the epoch's metrics record (``epoch`` plus numbers).
            model: the network after the epoch.
            sample_images: ``(B, 3, H, W)`` normalised images to draw with (or None).
        """
        from .viz.filters import filter_grid

        step = int(record["epoch"])
        for tag, value in scalars(record).items():
            self.writer.add_scalar(tag, value, step)
        grid = filter_grid(model)  # (H, W, 3) in [0, 1]
        self.writer.add_image("filters/conv1", grid.astype(np.float32), step, dataformats="HWC")
        if sample_images is not None and len(sample_images):
            x = sample_images.detach().cpu()
            shown = _minmax(x)
            if not self._logged_inputs:
                self.writer.add_image("inputs/sample", _grid(shown), step, dataformats="HWC")
                self._logged_inputs = True
            top = _top_grid(model, x, shown)
            if top is not None:
                self.writer.add_image("activations/conv5_top", top, step, dataformats="HWC")
        self.writer.flush()

    def close(self) -> None:
        self.writer.close()


def _minmax(x: torch.Tensor) -> np.ndarray:
    """``(B, 3, H, W)`` -> ``(B, H, W, 3)`` each image stretched to [0, 1] (no data-set statistics needed)."""
    flat = x.flatten(1)
    lo, hi = flat.min(1).values.view(-1, 1, 1, 1), flat.max(1).values.view(-1, 1, 1, 1)
    return ((x - lo) / (hi - lo).clamp_min(1e-8)).permute(0, 2, 3, 1).numpy()


def _grid(images: np.ndarray, ncols: int | None = None) -> np.ndarray:
    from .viz.images import make_grid

    return make_grid(images, ncols=ncols).astype(np.float32)


@torch.no_grad()
def _top_grid(model: DeepClusterNet, x: torch.Tensor, shown: np.ndarray, n_filters: int = 8,
              k: int = 4) -> np.ndarray | None:
    """Rows: for the first ``n_filters`` live filters of the last conv layer, the ``k``
    sample images that excite each most."""
    from .viz.activations import forward_pass, top_activating

    layer = list(model.conv_layers)[-1]
    device = next(model.parameters()).device
    scores = forward_pass(model, x.to(device), [layer]).scores[layer]
    live = np.flatnonzero(scores.max(0) > 0)[:n_filters]
    if live.size == 0:
        return None
    top = top_activating(scores, live.tolist(), min(k, len(x)))
    return _grid(shown[top.ravel()], ncols=top.shape[1])
