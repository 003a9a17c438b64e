"""Export a run's clusters, and assign new images to the learned clusters.

``export_run(run_dir)`` writes one row per training image: its data-set index (and
file path when the data set has files), its label when there are labels, its cluster,
and optionally its feature vector, as CSV, Parquet or ``.npy``.

``assign_images(checkpoint, images_dir)`` puts new images through the same pipeline:
clustering transform -> ``model.forward_features`` -> the checkpoint's PCA-whitening
(``state["pca"]``) -> nearest of the checkpoint's centroids (``state["centroids"]``).

The checkpoint also keeps the weights the network had when the last epoch's features
were extracted (``state["cluster_model"]``; the clustering step comes before the
training step in an epoch, and training moves the weights). Assignment uses that
network, so a training image is assigned to exactly its k-means cluster of the last
epoch (up to floating-point ties). A checkpoint without it (older ones) falls back to
the final network, whose features the stored PCA and centroids were not fitted on:
its assignments then differ from the k-means clusters, and a warning says so.
"""

from __future__ import annotations

import copy
import csv
import io
import logging
import sys
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch

from .checkpoint import CheckpointError, load_model
from .clustering import PCAWhitening
from .checkpoint import saved_config
from .data import DataError, IndexedDataset, cluster_transform, image_spec
from .data.files import FileImages, read_image
from .data.scan import display_path, list_images
from .features import iter_features, make_loader
from .io import atomic_write, write_text
from .data.sources import IMAGE_EXTENSIONS
from .models import DeepClusterNet
from .rundir import Run, checkpoint_path, ensure_writable_dir

logger = logging.getLogger(__name__)

FORMATS = ("csv", "parquet", "npy")
FEATURE_KINDS = ("pca", "fc7")


# --------------------------------------------------------------------------- the learned clusters

class ClusterAssigner:
    """Images -> clusters with a checkpoint's network, PCA-whitening and centroids.

    Args:
        model: the trained network.
        pca: the fitted PCA-whitening of the checkpoint.
        centroids: ``(k, pca_dim)`` cluster centroids in the PCA space.
    """

    def __init__(self, model: DeepClusterNet, pca: PCAWhitening, centroids: np.ndarray) -> None:
        import faiss

        centroids = np.ascontiguousarray(centroids, dtype=np.float32)
        if centroids.ndim != 2 or centroids.shape[1] != pca.projection.shape[1]:
            raise CheckpointError(f"centroids of shape {centroids.shape} do not match the PCA dimension "
                                  f"{pca.projection.shape[1]}")
        self.model = model.eval()
        self.pca = pca
        self.centroids = centroids
        self.index = faiss.IndexFlatL2(centroids.shape[1])
        self.index.add(centroids)

    @classmethod
    def from_state(cls, model: DeepClusterNet, state: dict[str, Any], where: str = "checkpoint") -> "ClusterAssigner":
        """From a loaded checkpoint (see the module docstring for which network is used).

        Raises:
            CheckpointError: the checkpoint has no PCA or no centroids.
        """
        missing = [k for k in ("pca", "centroids") if state.get(k) is None]
        if missing:
            raise CheckpointError(f"{where} has no stored {' and '.join(missing)} (state[{missing[0]!r}]), so new "
                                  "images cannot be assigned to its clusters; use a checkpoint written by "
                                  "`deepcluster train` of this version (train or --resume one more epoch)")
        return cls(clustering_network(model, state, where), PCAWhitening.from_state_dict(state["pca"]),
                   state["centroids"].numpy())

    @property
    def num_clusters(self) -> int:
        return len(self.centroids)

    @torch.no_grad()
    def features(self, x: torch.Tensor) -> np.ndarray:
        """Clustering features: ``(B, 3, H, W)`` -> ``(B, fc_dim)`` float32."""
        device = next(self.model.parameters()).device
        return self.model.forward_features(x.to(device)).float().cpu().numpy()

    def project(self, feats: np.ndarray) -> np.ndarray:
        """PCA-whiten + L2: ``(B, fc_dim)`` -> ``(B, pca_dim)``."""
        return self.pca.transform(feats)

    def nearest(self, z: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """Nearest centroid of each row of ``z`` (``(B, pca_dim)``): ``(clusters (B,), sq. distances (B,))``."""
        dist, idx = self.index.search(np.ascontiguousarray(z, dtype=np.float32), 1)
        return idx[:, 0].astype(np.int64), dist[:, 0].astype(np.float32)

    def assign_all(self, loader, n: int, features: str | None = None, reasons: list[str] | None = None
                   ) -> tuple[np.ndarray, np.ndarray, np.ndarray | None]:
        """Every image of ``loader`` (``(images, indices, *extra)``, through
        :func:`~deepcluster.features.iter_features`): ``(clusters (n,), sq. distances (n,),
        features (n, D) or None)``, with ``features`` ``pca`` or ``fc7``. With ``reasons``,
        each batch's third element (the unreadable files' reasons) is stored there by index.

        Raises:
            RuntimeError: the loader missed images.
        """
        clusters, dists = np.full(n, -1, dtype=np.int64), np.full(n, np.nan, dtype=np.float32)
        feats, seen = None, np.zeros(n, dtype=bool)
        device = next(self.model.parameters()).device
        for idx, f, extra in iter_features(self.model.forward_features, loader, device, desc="assign"):
            z = self.project(f)
            clusters[idx], dists[idx] = self.nearest(z)
            if features is not None:
                v = z if features == "pca" else f
                feats = np.zeros((n, v.shape[1]), dtype=np.float32) if feats is None else feats
                feats[idx] = v
            if reasons is not None and extra:
                for i, r in zip(idx, extra[0]):
                    reasons[i] = r
            seen[idx] = True
        if not seen.all():
            raise RuntimeError(f"the feature pass missed {int((~seen).sum())} images")
        return clusters, dists, feats

    def assign(self, x: torch.Tensor) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
        """``(B, 3, H, W)`` inputs -> ``(clusters, sq. distances, fc7 features, PCA features)``."""
        f = self.features(x)
        z = self.project(f)
        c, d = self.nearest(z)
        return c, d, f, z


def run_features(run: Run, features: str, batch_size: int = 256, workers: int = 0
                 ) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """One pass of the run's clustering-time network over its training images.

    Args:
        run: a loaded run (its checkpoint holds the PCA and centroids of its last epoch).
        features: ``pca`` (the PCA-whitened, L2-normalised space the last epoch clustered)
            or ``fc7`` (the network's clustering features).
        batch_size, workers: the feature pass.

    Returns:
        ``(nearest centroid (N,), squared distance to it (N,), features (N, D))``, row ``i``
        for image ``i`` of the run (row ``i`` of its assignments).
    """
    assigner = ClusterAssigner.from_state(run.model, run.state, str(run.path / "checkpoint.pt"))
    loader = make_loader(IndexedDataset(run.source, cluster_transform(run.spec)), batch_size, workers)
    return assigner.assign_all(loader, len(run.source), features)


def clustering_network(model: DeepClusterNet, state: dict[str, Any], where: str = "checkpoint") -> DeepClusterNet:
    """The network whose features the checkpoint's PCA and centroids were fitted on.

    A copy of ``model`` with ``state["cluster_model"]`` loaded (every weight but the
    head), or ``model`` itself, with a warning, when the checkpoint predates that key.
    """
    weights = state.get("cluster_model")
    if weights is None:
        logger.warning("%s has no cluster_model (the network at clustering time); assigning with the final network, "
                       "so assignments will differ from the last epoch's k-means clusters", where)
        return model
    net = copy.deepcopy(model)
    missing, unexpected = net.load_state_dict(weights, strict=False)
    if unexpected or any(not k.startswith("head.") for k in missing):
        raise CheckpointError(f"{where}: cluster_model does not fit the network (missing {missing[:3]}, "
                              f"unexpected {unexpected[:3]})")
    return net.eval()


# --------------------------------------------------------------------------- tables

def check_output(path: str | Path, fmt: str) -> Path:
    """Validate ``fmt`` and that ``path``'s folder can be written (created if needed)."""
    if fmt not in FORMATS:
        raise ValueError(f"unknown format {fmt!r}; choose one of {list(FORMATS)}")
    if fmt == "parquet":
        try:
            import pyarrow  # noqa: F401
        except ImportError:
            raise ValueError("--format parquet needs pyarrow: pip install 'deepcluster[parquet]' "
                             "(or use --format csv or npy)") from None
    path = Path(path)
    if path.is_dir():
        raise ValueError(f"output {path} is a directory; give a file name such as {path / ('clusters.' + fmt)}")
    ensure_writable_dir(path.parent)
    return path


def write_table(columns: dict[str, Any], path: str | Path | None, fmt: str) -> None:
    """Write equal-length columns; a 2-D array column is a feature vector per row.

    csv: one column per feature dimension (``f0``, ``f1``, ...), written to stdout when
    ``path`` is ``None``; parquet: a fixed-size list column; npy: a structured array
    (``np.load(path)["cluster"]``; no pickle needed).
    """
    n = {len(v) for v in columns.values()}
    if len(n) > 1:
        raise ValueError(f"columns differ in length: { {k: len(v) for k, v in columns.items()} }")
    if fmt == "csv":
        header: list[str] = []
        cols: list[Sequence[Any]] = []
        for name, v in columns.items():
            arr = np.asarray(v) if not isinstance(v, list) else v
            if isinstance(arr, np.ndarray) and arr.ndim == 2:
                header += [f"f{j}" for j in range(arr.shape[1])]
                cols += [arr[:, j] for j in range(arr.shape[1])]
            else:
                header.append(name)
                cols.append(arr)
        out = io.StringIO(newline="")
        w = csv.writer(out)
        w.writerow(header)
        for row in zip(*cols):
            w.writerow([_csv_value(x) for x in row])
        if path is None:
            sys.stdout.write(out.getvalue())
        else:  # whole or not at all: a full disk leaves no partial file and names it
            write_text(path, out.getvalue())
    elif fmt == "parquet":
        import pyarrow as pa
        import pyarrow.parquet as pq

        arrays, names = [], []
        for name, v in columns.items():
            arr = np.asarray(v)
            if arr.ndim == 2:
                flat = pa.array(np.ascontiguousarray(arr, dtype=np.float32).ravel())
                arrays.append(pa.FixedSizeListArray.from_arrays(flat, arr.shape[1]))
            else:
                arrays.append(pa.array(list(v) if arr.dtype.kind in "OU" else arr))
            names.append(name)
        if path is None:
            raise ValueError("--format parquet needs --output FILE")
        table = pa.Table.from_arrays(arrays, names=names)
        atomic_write(path, lambda f: pq.write_table(table, f))
    elif fmt == "npy":
        if path is None:
            raise ValueError("--format npy needs --output FILE")
        dtype, values = [], []
        for name, v in columns.items():
            arr = np.asarray(v)
            if arr.dtype.kind in "OU":
                arr = arr.astype(str)
                dtype.append((name, f"U{max(1, max((len(s) for s in arr), default=1))}"))
            elif arr.ndim == 2:
                dtype.append((name, arr.dtype, (arr.shape[1],)))
            else:
                dtype.append((name, arr.dtype))
            values.append(arr)
        table = np.empty(len(values[0]) if values else 0, dtype=dtype)
        for (name, *_), arr in zip(dtype, values):
            table[name] = arr
        atomic_write(path, lambda f: np.save(f, table, allow_pickle=False))
    else:
        raise ValueError(f"unknown format {fmt!r}; choose one of {list(FORMATS)}")


def _csv_value(x: Any) -> Any:
    if isinstance(x, (np.floating, float)):
        return "" if x != x else f"{float(x):.6g}"
    if isinstance(x, np.integer):
        return int(x)
    return x


# --------------------------------------------------------------------------- export

@dataclass
class ExportResult:
    """What :func:`export_run` wrote.

    Attributes:
        path: the file (None for stdout).
        rows: images written.
        agreement: with features, the share of images whose nearest centroid under the
            checkpoint (what ``assign`` computes) is their exported ``cluster``; else None.
    """

    path: Path | None
    rows: int
    agreement: float | None = None


def export_run(run_dir: str | Path, output: str | Path | None = None, fmt: str = "csv",
               features: str | None = None, batch_size: int = 256, workers: int = 0,
               device: str = "cpu", epoch: int | str | None = None) -> ExportResult:
    """Write every training image's cluster at the last epoch.

    Columns: ``index`` (the image's index in its data-set split), ``path`` (folder data
    sets), ``label`` (labelled data sets), ``cluster`` (the last row of
    ``assignments.npy``). With ``features``, a pass of the clustering-time network over
    the images adds ``distance`` (squared distance to the centroid in the PCA space) and
    ``feature`` (the vector).

    Args:
        run_dir: a ``deepcluster train`` output directory.
        output: the file (default ``RUN_DIR/clusters.<fmt>``); ``"-"`` writes CSV to stdout.
        fmt: ``csv``, ``parquet`` or ``npy``.
        features: ``pca`` (the PCA-whitened, L2-normalised space the centroids live in)
            or ``fc7`` (the network's clustering features), or None.
        batch_size, workers: the feature pass.
        device: where the network runs.
    """
    if features is not None and features not in FEATURE_KINDS:
        raise ValueError(f"unknown feature kind {features!r}; choose one of {list(FEATURE_KINDS)}")
    run_dir = Path(run_dir)
    if not run_dir.is_dir():
        raise ValueError(f"run directory {run_dir} does not exist")
    if output == "-":
        if fmt != "csv":
            raise ValueError("only --format csv can be written to stdout; give --output FILE")
        out_path = None
    else:
        out_path = check_output(output if output is not None else run_dir / f"clusters.{fmt}", fmt)
    run = Run.load(checkpoint_path(run_dir, epoch), device=device)
    clusters = run.last_assignments
    n = len(run.source)
    if len(clusters) != n:
        raise ValueError(f"assignments cover {len(clusters)} images but the data set has {n}; the data changed")

    columns: dict[str, Any] = {"index": run.dataset_indices()}
    if run.source.paths is not None:
        columns["path"] = [display_path(p) for p in run.source.paths]  # non-UTF-8 bytes as \xNN (docs/REPORT.md)
    if run.labels is not None:
        columns["label"] = np.asarray(run.labels, dtype=np.int64)
    columns["cluster"] = clusters
    agreement = None
    if features is not None:
        nearest, dists, feats = run_features(run, features, batch_size, workers)
        agreement = float((nearest == clusters).mean())
        columns["distance"] = dists
        columns["feature"] = feats
        logger.info("nearest centroid == last k-means cluster for %.2f%% of the images", 100 * agreement)
    write_table(columns, out_path, fmt)
    logger.info("exported %d images to %s", n, out_path or "stdout")
    return ExportResult(out_path, n, agreement)


# --------------------------------------------------------------------------- assign

@dataclass
class AssignResult:
    """Outcome of :func:`assign_images`.

    Attributes:
        paths: every image file considered, sorted.
        clusters: ``(len(paths),)`` cluster of each, ``-1`` for unreadable files.
        distances: squared distance to the centroid in the PCA space (NaN if unreadable).
        unreadable: ``(path, reason)`` of the files that could not be decoded.
        features: ``(len(paths), D)`` features when asked for (zeros for unreadable files).
    """

    paths: list[str]
    clusters: np.ndarray
    distances: np.ndarray
    unreadable: list[tuple[str, str]] = field(default_factory=list)
    features: np.ndarray | None = None

    def columns(self) -> dict[str, Any]:
        bad = dict(self.unreadable)
        cols: dict[str, Any] = {"path": [display_path(p) for p in self.paths], "cluster": self.clusters,
                                "distance": self.distances, "error": [bad.get(p, "") for p in self.paths]}
        if self.features is not None:
            cols["feature"] = self.features
        return cols


def find_images(root: str | Path, problems: list[tuple[str, str]] | None = None) -> list[str]:
    """Image files (by extension) under ``root``, or ``root`` itself, listed by the same
    walker as a training folder (:func:`~deepcluster.data.scan.list_images`: links
    followed once, loops cut). Entries that cannot be read (dangling links, ...) are
    appended to ``problems`` as ``(display path, reason)``."""
    root = Path(root)
    if root.is_file():
        return [str(root)]
    if not root.is_dir():
        raise DataError(f"--images {root} does not exist; pass a folder of images (or one image file)")
    files, bad = list_images(str(root))
    if problems is not None:
        problems += bad
    if not files and not bad:
        raise DataError(f"no images ({', '.join(IMAGE_EXTENSIONS)}) found under {root}")
    return files


def assign_images(checkpoint: str | Path, images: str | Path, features: str | None = None, batch_size: int = 256,
                  device: str = "cpu") -> AssignResult:
    """Assign every image file under ``images`` to the checkpoint's clusters.

    Unreadable files are listed in the result (cluster ``-1``), not fatal; a folder
    where none can be read is an error.

    Raises:
        CheckpointError: the checkpoint has no PCA or centroids.
        DataError: no images, or none readable.
    """
    if features is not None and features not in FEATURE_KINDS:
        raise ValueError(f"unknown feature kind {features!r}; choose one of {list(FEATURE_KINDS)}")
    model, state = load_model(checkpoint)
    model.to(device)
    assigner = ClusterAssigner.from_state(model, state, str(checkpoint))
    data = saved_config(state, str(checkpoint)).data if state.get("config") else None
    spec = image_spec(data.name if data else "folder", state.get("meta", {}).get("image_size")
                      or (data.image_size if data else None))
    listing_problems: list[tuple[str, str]] = []
    paths = find_images(images, listing_problems)
    n = len(paths)
    files = FileImages(paths, cluster_transform(spec), (3, spec.size, spec.size))
    reasons: list[str] = [""] * n
    clusters, dists, feats = assigner.assign_all(make_loader(files, batch_size, 0), n, features, reasons)
    unreadable = [(p, r) for p, r in zip(paths, reasons) if r] + listing_problems
    bad = np.array([bool(r) for r in reasons], dtype=bool)
    clusters[bad], dists[bad] = -1, np.nan
    if feats is not None:
        feats[bad] = 0
    if unreadable:
        logger.warning("%d of %d images could not be read (listed with cluster -1); first: %s (%s)",
                       len(unreadable), n, *unreadable[0])
    if n == 0 or len(unreadable) == n + len(listing_problems):
        raise DataError(f"none of the {n} images under {images} could be read; first: {unreadable[0][0]} "
                        f"({unreadable[0][1]})")
    return AssignResult(paths, clusters, dists, unreadable, feats)


__all__ = ["AssignResult", "ClusterAssigner", "ExportResult", "FEATURE_KINDS", "FORMATS", "assign_images",
           "export_run", "find_images", "read_image", "write_table"]
