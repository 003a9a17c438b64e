"""Image search with a trained network: describe image files, index a folder (only new
or changed files are described again), search it, list near-duplicates.

Images go through the checkpoint's clustering transform (resize + center crop to the
size the network was trained at, the data set's normalisation), exactly as
``deepcluster assign`` feeds them. Two descriptors:

- ``rmac``: R-MAC of the last conv layer's ReLU'd map (:func:`~.descriptors.rmac`,
  3 levels, no whitening), summed over scales 1, 1/sqrt(2), 1/2 (:func:`~.descriptors.multiscale`);
- ``fc7``: the network's fc7 (before its ReLU), L2-normalised (one scale: the FC layers
  need the training size).
"""

from __future__ import annotations

import functools
import hashlib
import logging
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch

from ..checkpoint import load_model, saved_config
from ..clustering import PCAWhitening
from ..data import DataError, ImageSpec, cluster_transform, image_spec
from ..data.files import FileImages
from ..export import find_images
from ..features import iter_features, make_loader
from ..models import DeepClusterNet
from .descriptors import SCALES, conv_map_fn, multiscale, multiscale_regions, rmac
from .index import (ImageIndex, IndexMeta, build_index, check_meta, load_index, model_fingerprint, remove,
                    save_index, search, stale_paths, update)

logger = logging.getLogger(__name__)

FEATURES = ("rmac", "fc7")
RMAC_LEVELS = 3


def checkpoint_spec(state: dict[str, Any]) -> ImageSpec:
    """Image size and normalisation the checkpoint's network was trained with."""
    data = saved_config(state).data if state.get("config") else None
    return image_spec(data.name if data else "folder", state.get("meta", {}).get("image_size")
                      or (data.image_size if data else None))


def whitening_to_json(w: PCAWhitening) -> dict[str, Any]:
    """A fitted whitening as JSON-able lists (float32 values survive the round trip)."""
    return {"dim": int(w.projection.shape[1]), "whiten": w.whiten, "normalize": w.normalize, "eps": w.eps,
            "mean": w.mean.tolist(), "projection": w.projection.tolist(), "eigenvalues": w.eigenvalues.tolist()}


def whitening_from_json(d: dict[str, Any]) -> PCAWhitening:
    """Inverse of :func:`whitening_to_json`."""
    return PCAWhitening.from_state_dict({**d, **{k: torch.tensor(d[k], dtype=torch.float32)
                                                 for k in ("mean", "projection", "eigenvalues")}})


def whitening_fingerprint(w: PCAWhitening | None) -> str:
    """``"none"``, or the first 16 hex digits of the SHA-256 of its mean and projection."""
    if w is None:
        return "none"
    return hashlib.sha256(w.mean.tobytes() + w.projection.tobytes()).hexdigest()[:16]


class ImageDescriber:
    """Image files -> L2-normalised descriptors ``(N, D)`` with one network.

    Args:
        model: the network (put in eval mode).
        spec: input size and normalisation (:func:`checkpoint_spec`).
        feature: ``"rmac"`` or ``"fc7"``.
        checkpoint: where the network came from (kept with an index, not compared).
        whitening: for ``rmac``, a fitted R-MAC whitening (:meth:`fit_whitening`) or None.
    """

    def __init__(self, model: DeepClusterNet, spec: ImageSpec, feature: str = "rmac", checkpoint: str = "",
                 whitening: PCAWhitening | None = None) -> None:
        if feature not in FEATURES:
            raise ValueError(f"unknown retrieval feature {feature!r}; choose one of {list(FEATURES)}")
        self.model = model.eval()
        self.spec = spec
        self.feature = feature
        self.checkpoint = checkpoint
        self.transform = cluster_transform(spec)
        self.conv_map = conv_map_fn(model)
        self.fingerprint = model_fingerprint(model)
        device = next(model.parameters()).device
        probe = torch.zeros(1, 3, spec.size, spec.size, device=device)
        self.channels = int(self.conv_map(probe).shape[1])
        self.set_whitening(whitening)

    def set_whitening(self, whitening: PCAWhitening | None) -> None:
        """Use ``whitening`` (fitted on this network's regional descriptors) from now on."""
        if whitening is not None and self.feature != "rmac":
            raise ValueError(f"whitening applies to rmac descriptors, not {self.feature}")
        if whitening is not None and whitening.projection.shape[0] != self.channels:
            raise ValueError(f"the whitening was fitted on {whitening.projection.shape[0]}-d regional descriptors, "
                             f"this network's last conv layer has {self.channels} channels")
        self.whitening = whitening
        self.describe_batch = functools.partial(multiscale, conv_map=self.conv_map, scales=SCALES,
                                                describe=functools.partial(rmac, whitening=whitening))
        if self.feature == "fc7":
            self.dim = int(self.model.fc_dim)
        else:
            self.dim = self.channels if whitening is None else int(whitening.projection.shape[1])

    @property
    def meta(self) -> IndexMeta:
        """What this describer's vectors are (compared with an index's)."""
        params: dict[str, Any] = {"image_size": self.spec.size}
        if self.feature == "rmac":
            params.update(levels=RMAC_LEVELS, scales=[round(s, 6) for s in SCALES],
                          whitening=whitening_fingerprint(self.whitening))
        return IndexMeta(self.fingerprint, self.feature, self.dim, params)

    @classmethod
    def from_checkpoint(cls, checkpoint: str | Path, feature: str = "rmac", device: str = "cpu") -> "ImageDescriber":
        """The final network of a checkpoint (a run directory or a ``.pt`` file)."""
        model, state = load_model(checkpoint)
        return cls(model.to(device), checkpoint_spec(state), feature, str(Path(checkpoint).resolve()))

    @classmethod
    def for_index(cls, index: ImageIndex, checkpoint: str | Path | None = None,
                  device: str = "cpu") -> "ImageDescriber":
        """The describer of ``index``'s vectors: its recorded checkpoint (or ``checkpoint``),
        feature and whitening."""
        checkpoint = checkpoint or index.info.get("checkpoint")
        if not checkpoint:
            raise ValueError("the index does not record its checkpoint; pass --checkpoint")
        describer = cls.from_checkpoint(checkpoint, index.meta.feature, device)
        if index.info.get("whitening"):
            describer.set_whitening(whitening_from_json(index.info["whitening"]))
        return describer

    def fit_whitening(self, paths: Sequence[str], dim: int | None = None, batch_size: int = 64) -> PCAWhitening:
        """Fit the R-MAC PCA-whitening on the regional descriptors (every region, every
        scale) of the images ``paths`` — the paper learns it on a different image set
        than the one searched. ``dim`` defaults to the number of channels."""
        sample = []
        device = next(self.model.parameters()).device
        with torch.no_grad():  # every region of every readable image: not one row per image, so no iter_features
            for x, _, reasons in make_loader(self.files(paths), batch_size, 0):
                ok = torch.tensor([not r for r in reasons])
                if ok.any():
                    sample.append(multiscale_regions(x[ok].to(device), self.conv_map, SCALES, RMAC_LEVELS).cpu().numpy())
        if not sample:
            raise DataError(f"none of the {len(paths)} whitening images could be read")
        return PCAWhitening(dim or self.channels, whiten=True, normalize=True).fit(np.concatenate(sample))

    @torch.no_grad()
    def describe(self, x: torch.Tensor) -> np.ndarray:
        """``(B, 3, size, size)`` transformed images -> ``(B, D)`` float32, rows L2-normalised."""
        device = next(self.model.parameters()).device
        if self.feature == "fc7":
            v = torch.nn.functional.normalize(self.model.forward_fc7(x.to(device)).float(), dim=1)
        else:
            v = self.describe_batch(x.to(device))
        return v.cpu().numpy().astype(np.float32)

    def describe_files(self, paths: Sequence[str], batch_size: int = 64) -> tuple[np.ndarray, list[int],
                                                                                  list[tuple[str, str]]]:
        """Describe image files; unreadable ones are skipped.

        Returns:
            ``(vectors (M, D), rows (M,) positions in paths, unreadable [(path, reason)])``.
        """
        vectors, rows, unreadable = [], [], []
        device = next(self.model.parameters()).device
        forward = (lambda x: self.model.forward_fc7(x)) if self.feature == "fc7" else self.describe_batch
        for idx, v, (reasons,) in iter_features(forward, make_loader(self.files(paths), batch_size, 0), device,
                                                desc="describe"):
            ok = np.array([not r for r in reasons], dtype=bool)
            unreadable += [(paths[i], r) for i, r in zip(idx, reasons) if r]
            v = v[ok]
            vectors.append(v / np.maximum(np.linalg.norm(v, axis=1, keepdims=True), 1e-12))
            rows += idx[ok].tolist()
        v = np.concatenate(vectors).astype(np.float32) if vectors else np.zeros((0, self.dim), np.float32)
        return v, rows, unreadable

    def files(self, paths: Sequence[str]) -> FileImages:
        """``paths`` as a data set of ``(image, index, reason)`` (:class:`~deepcluster.data.files.FileImages`)."""
        return FileImages(list(paths), self.transform, (3, self.spec.size, self.spec.size))


@dataclass
class IndexReport:
    """What :func:`index_folder` did: images indexed in all, described now, dropped from the
    index (gone or no longer readable), unreadable."""

    path: Path
    total: int
    described: int
    removed: int
    unreadable: list[tuple[str, str]] = field(default_factory=list)
    kind: str = "flat"


def index_folder(describer: ImageDescriber, images: str | Path, output: str | Path, batch_size: int = 64,
                 rebuild: bool = False, whiten_images: str | Path | None = None,
                 whiten_dim: int | None = None) -> IndexReport:
    """Index every image under ``images`` into ``output``; when ``output`` is an index of
    the same descriptors (and not ``rebuild``), only new or changed files (size or mtime)
    are described, and files gone are dropped.

    With ``whiten_images`` (a different image set), R-MAC is PCA-whitened
    (:meth:`ImageDescriber.fit_whitening`) and the whitening is stored in the index;
    without it, an existing index's stored whitening is used again.

    Raises:
        DataError: no image at all can be read.
        ImageIndexError: ``output`` holds descriptors of another network, feature or whitening.
    """
    paths = find_images(images)
    output = Path(output)
    old = load_index(output) if output.exists() and not rebuild else None
    if whiten_images is not None and describer.feature != "rmac":
        raise ValueError(f"whitening applies to rmac descriptors, not {describer.feature}")
    if whiten_images is not None:
        describer.set_whitening(describer.fit_whitening(find_images(whiten_images), whiten_dim, batch_size))
    elif old is not None and old.info.get("whitening") and old.meta.feature == describer.feature:
        describer.set_whitening(whitening_from_json(old.info["whitening"]))
    if old is not None:
        check_meta(old, describer.meta, str(output))
    changed, gone = stale_paths(old, paths) if old is not None else (paths, [])
    vectors, rows, unreadable = describer.describe_files(changed, batch_size)
    if unreadable:
        logger.warning("%d of %d images could not be read and are not indexed; first: %s (%s)",
                       len(unreadable), len(changed), *unreadable[0])
    done = [changed[i] for i in rows]
    info = {"checkpoint": describer.checkpoint,
            "whitening": None if describer.whitening is None else whitening_to_json(describer.whitening)}
    removed = 0
    if old is None:
        if not done:
            raise DataError(f"none of the {len(paths)} images under {images} could be read; first: "
                            f"{unreadable[0][0]} ({unreadable[0][1]})")
        index = build_index(vectors, done, describer.meta, info=info)
    else:
        index = old
        removed = remove(index, gone + [p for p, _ in unreadable])
        update(index, done, vectors)
        index.info.update(info)
    if len(index) == 0:
        raise DataError(f"no readable image left under {images}; {output} not written")
    save_index(index, output)
    return IndexReport(output, len(index), len(done), removed, unreadable, index.kind)


@dataclass
class QueryResult:
    """One query's answer: ``results`` as ``(path, similarity)`` best first, or ``error``."""

    query: str
    results: list[tuple[str, float]] = field(default_factory=list)
    error: str = ""


def search_files(index: ImageIndex, describer: ImageDescriber, queries: Sequence[str], top: int = 10,
                 batch_size: int = 64) -> list[QueryResult]:
    """Search ``index`` with each query image (``describer``: :meth:`ImageDescriber.for_index`);
    a query that cannot be read gets an error, the others are answered."""
    check_meta(index, describer.meta)
    out = [QueryResult(str(q)) for q in queries]
    for q in out:
        if not Path(q.query).is_file():
            q.error = "no such file"
    readable = [i for i, q in enumerate(out) if not q.error]
    vectors, rows, unreadable = describer.describe_files([out[i].query for i in readable], batch_size)
    for path, reason in unreadable:
        next(q for q in out if q.query == path and not q.error).error = reason
    if rows:
        scores, hits = search(index, vectors, top)
        for r, s, h in zip(rows, scores, hits):
            out[readable[r]].results = [(index.paths[j], float(v)) for j, v in zip(h, s) if j >= 0]
    return out


__all__ = ["FEATURES", "ImageDescriber", "IndexReport", "QueryResult", "checkpoint_spec", "index_folder",
           "search_files", "whitening_fingerprint", "whitening_from_json", "whitening_to_json"]
