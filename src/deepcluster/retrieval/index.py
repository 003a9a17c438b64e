"""A faiss index of image descriptors: build, save/load, search, incremental updates and
near-duplicate groups.

The vectors are L2-normalised descriptors (R-MAC, fc7, ...), so inner product is cosine
similarity. The index kind is chosen from the number of vectors at build time:

- up to ``flat_limit`` (1,000,000) vectors: exact search, ``IndexFlatIP`` inside an
  ``IndexIDMap2`` (ids let single images be replaced);
- beyond: ``IndexIVFPQ`` (inner product), ``nlist = min(4 sqrt(N), N / 39)`` coarse
  cells (faiss's rule of thumb, and at least 39 training points per cell), ``m`` = the
  largest divisor of ``D`` not above ``D / 4`` and 64 sub-quantizers of 8 bits (``m``
  bytes per image), trained on up to ``64 nlist`` vectors drawn with seed 0, searched
  with ``nprobe = min(nlist, 32)``. Search and duplicate groups are then approximate.

The kind is kept by :func:`update`; build again to re-choose it.

A saved index is one file written atomically: ``DCINDEX1\\n``, the length of a JSON header
(8 bytes, little endian), the header (metadata, paths, sizes, mtimes, ids, kind), then
``faiss.serialize_index``'s bytes. Loading checks the metadata against what the query side
expects (:class:`IndexMeta`): descriptors from another checkpoint, feature or dimension
are not comparable, and the error names both sides.
"""

from __future__ import annotations

import json
import math
import os
import struct
from collections.abc import Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import faiss
import numpy as np

from ..io import atomic_write

FLAT_LIMIT = 1_000_000
MAGIC = b"DCINDEX1\n"
_HEADER_LEN = struct.Struct("<Q")


class ImageIndexError(ValueError):
    """An index that cannot be built, read or used as asked."""


@dataclass(frozen=True)
class IndexMeta:
    """What the indexed descriptors are, so that only comparable queries are searched.

    Attributes:
        checkpoint: identity of the network (e.g. :func:`model_fingerprint`, or path+epoch).
        feature: descriptor kind, e.g. ``"rmac"`` or ``"fc7"``.
        dim: descriptor width ``D``.
        params: further settings that change the descriptors (levels, scales, image size).
    """

    checkpoint: str
    feature: str
    dim: int
    params: dict[str, Any] = field(default_factory=dict)

    def describe(self) -> str:
        extra = "".join(f", {k} {v}" for k, v in sorted(self.params.items()))
        return f"checkpoint {self.checkpoint}, feature {self.feature}, dim {self.dim}{extra}"


@dataclass
class ImageIndex:
    """An index and the files it holds.

    Attributes:
        index: the faiss index (ids = ``ids``).
        meta: what the vectors are.
        paths: ``(N,)`` image paths, row ``i`` has faiss id ``ids[i]`` (ids increasing).
        sizes: ``(N,)`` int64 file sizes in bytes (-1: unknown).
        mtimes: ``(N,)`` int64 modification times in ns (-1: unknown).
        ids: ``(N,)`` int64 faiss ids.
        kind: ``"flat"`` or ``"ivfpq"``.
        info: facts that are not part of the identity (e.g. the checkpoint's path).
    """

    index: Any
    meta: IndexMeta
    paths: list[str]
    sizes: np.ndarray
    mtimes: np.ndarray
    ids: np.ndarray
    kind: str
    info: dict[str, Any] = field(default_factory=dict)

    def __len__(self) -> int:
        return len(self.paths)


def file_stats(paths: Sequence[str]) -> tuple[np.ndarray, np.ndarray]:
    """``(sizes, mtimes_ns)`` int64 of each file; -1 for a file that cannot be stat'ed."""
    sizes, mtimes = np.full(len(paths), -1, np.int64), np.full(len(paths), -1, np.int64)
    for i, p in enumerate(paths):
        try:
            st = os.stat(p)
        except OSError:
            continue
        sizes[i], mtimes[i] = st.st_size, st.st_mtime_ns
    return sizes, mtimes


def model_fingerprint(model) -> str:
    """SHA-256 (first 16 hex digits) of a model's parameters and buffers except the head
    (the head does not change conv maps nor fc7), in name order."""
    import hashlib

    h = hashlib.sha256()
    for name, t in sorted({**dict(model.named_parameters()), **dict(model.named_buffers())}.items()):
        if name.startswith("head."):
            continue
        h.update(name.encode())
        h.update(t.detach().cpu().contiguous().numpy().tobytes())
    return h.hexdigest()[:16]


def _check_vectors(x: np.ndarray, dim: int, what: str) -> np.ndarray:
    x = np.ascontiguousarray(np.asarray(x, dtype=np.float32))
    if x.ndim != 2 or x.shape[1] != dim:
        raise ImageIndexError(f"{what} must be (N, {dim}) descriptors, got shape {x.shape}")
    if not np.isfinite(x).all():
        raise ImageIndexError(f"{what}: {int((~np.isfinite(x)).any(1).sum())} descriptors hold NaN or Inf")
    off = np.abs(np.linalg.norm(x, axis=1) - 1.0) > 1e-3
    if off.any():
        raise ImageIndexError(f"{what}: {int(off.sum())} descriptors are not L2-normalised (e.g. row "
                              f"{int(np.flatnonzero(off)[0])}); an all-zero descriptor comes from an all-zero conv map")
    return x


def _pq_subquantizers(dim: int) -> int:
    return max(m for m in range(1, min(64, max(1, dim // 4)) + 1) if dim % m == 0)


def _new_faiss_index(x: np.ndarray, flat_limit: int) -> tuple[Any, str]:
    n, d = x.shape
    if n <= flat_limit:
        return faiss.IndexIDMap2(faiss.IndexFlatIP(d)), "flat"
    nlist = max(1, min(int(4 * math.sqrt(n)), n // 39))
    quantizer = faiss.IndexFlatIP(d)
    index = faiss.IndexIVFPQ(quantizer, d, nlist, _pq_subquantizers(d), 8, faiss.METRIC_INNER_PRODUCT)
    sample = x if n <= 64 * nlist else x[np.sort(np.random.default_rng(0).choice(n, 64 * nlist, replace=False))]
    index.train(sample)
    index.nprobe = min(nlist, 32)  # faiss's Python wrapper keeps ``quantizer`` alive with ``index``
    return index, "ivfpq"


def build_index(vectors: np.ndarray, paths: Sequence[str], meta: IndexMeta,
                stats: tuple[np.ndarray, np.ndarray] | None = None, flat_limit: int = FLAT_LIMIT,
                info: dict[str, Any] | None = None) -> ImageIndex:
    """Index ``vectors`` ``(N, D)`` (float32, L2-normalised) of the images ``paths``.

    Args:
        vectors: one descriptor per image, ``D == meta.dim``.
        paths: ``(N,)`` distinct image paths.
        meta: what the descriptors are (checked again at load and search).
        stats: ``(sizes, mtimes_ns)`` of the files; default :func:`file_stats`.
        flat_limit: largest ``N`` indexed exactly (see the module docstring).
        info: JSON-able facts kept with the index that do not take part in the checks.
    """
    x = _check_vectors(vectors, meta.dim, "indexed vectors")
    paths = [str(p) for p in paths]
    if len(paths) != len(x) or len(set(paths)) != len(paths):
        raise ImageIndexError(f"need one distinct path per vector: {len(x)} vectors, {len(paths)} paths "
                              f"({len(set(paths))} distinct)")
    if len(x) == 0:
        raise ImageIndexError("no images to index")
    index, kind = _new_faiss_index(x, flat_limit)
    ids = np.arange(len(x), dtype=np.int64)
    index.add_with_ids(x, ids)
    sizes, mtimes = file_stats(paths) if stats is None else (np.asarray(s, np.int64) for s in stats)
    return ImageIndex(index, meta, paths, sizes, mtimes, ids, kind, dict(info or {}))


def check_meta(index: ImageIndex, expected: IndexMeta, where: str = "index") -> None:
    """Raise :class:`ImageIndexError` naming both sides unless ``expected`` is ``index.meta``."""
    if index.meta != expected:
        raise ImageIndexError(f"{where} holds descriptors of {index.meta.describe()}; the query side has "
                              f"{expected.describe()}: rebuild the index (deepcluster index --rebuild) or use the "
                              "same network and feature")


def search(index: ImageIndex, queries: np.ndarray, top: int = 10) -> tuple[np.ndarray, np.ndarray]:
    """The ``top`` most similar indexed images of each query.

    Args:
        index: the image index.
        queries: ``(Q, D)`` L2-normalised descriptors of the same kind (``index.meta``).
        top: number of results per query.

    Returns:
        ``(scores, rows)``, each ``(Q, min(top, N))``: inner products (cosine), best first,
        equal scores ordered by row; ``rows`` index ``index.paths`` (-1 where an
        approximate index found fewer).
    """
    if top < 1:
        raise ImageIndexError(f"top must be >= 1, got {top}")
    q = _check_vectors(queries, index.meta.dim, "queries")
    k = min(top, len(index))
    scores, ids = index.index.search(q, k)
    rows = np.where(ids >= 0, np.searchsorted(index.ids, ids), -1)
    order = np.lexsort((np.where(rows < 0, np.iinfo(np.int64).max, rows), -scores), axis=1)
    return np.take_along_axis(scores, order, 1), np.take_along_axis(rows, order, 1)


def remove(index: ImageIndex, paths: Sequence[str]) -> int:
    """Drop ``paths`` (those indexed) from the index; returns how many were removed."""
    gone = set(map(str, paths))
    keep = np.array([p not in gone for p in index.paths], dtype=bool)
    if keep.all():
        return 0
    index.index.remove_ids(faiss.IDSelectorBatch(index.ids[~keep]))
    index.paths = [p for p, k in zip(index.paths, keep) if k]
    index.sizes, index.mtimes, index.ids = index.sizes[keep], index.mtimes[keep], index.ids[keep]
    return int((~keep).sum())


def update(index: ImageIndex, paths: Sequence[str], vectors: np.ndarray,
           stats: tuple[np.ndarray, np.ndarray] | None = None) -> None:
    """Add new images and replace changed ones: only ``paths`` (the files whose
    descriptors were re-extracted) are touched; the others keep their vectors.

    Args:
        index: updated in place.
        paths: ``(M,)`` distinct paths, new or already indexed.
        vectors: their ``(M, D)`` descriptors.
        stats: their ``(sizes, mtimes_ns)``; default :func:`file_stats`.
    """
    x = _check_vectors(vectors, index.meta.dim, "updated vectors")
    paths = [str(p) for p in paths]
    if len(paths) != len(x) or len(set(paths)) != len(paths):
        raise ImageIndexError(f"need one distinct path per vector: {len(x)} vectors, {len(paths)} paths")
    if not paths:
        return
    remove(index, paths)
    start = int(index.ids.max()) + 1 if len(index.ids) else 0
    new_ids = np.arange(start, start + len(paths), dtype=np.int64)
    index.index.add_with_ids(x, new_ids)
    sizes, mtimes = file_stats(paths) if stats is None else (np.asarray(s, np.int64) for s in stats)
    index.paths += paths
    index.sizes = np.concatenate([index.sizes, sizes])
    index.mtimes = np.concatenate([index.mtimes, mtimes])
    index.ids = np.concatenate([index.ids, new_ids])


def stale_paths(index: ImageIndex, paths: Sequence[str]) -> tuple[list[str], list[str]]:
    """Compare the files now present (``paths``) with the index.

    Returns:
        ``(changed, removed)``: paths that are new or whose size or mtime differ from the
        indexed ones (or were unknown), and indexed paths that are no longer present.
    """
    known = {p: (s, m) for p, s, m in zip(index.paths, index.sizes.tolist(), index.mtimes.tolist())}
    paths = [str(p) for p in paths]
    sizes, mtimes = file_stats(paths)
    changed = [p for p, s, m in zip(paths, sizes.tolist(), mtimes.tolist())
               if known.get(p) != (s, m) or s < 0]
    present = set(paths)
    return changed, [p for p in index.paths if p not in present]


def _stored_vectors(index: ImageIndex) -> np.ndarray:
    """The indexed vectors in row order (exact for flat, PQ reconstructions for IVF-PQ)."""
    if index.kind == "flat":
        internal = faiss.downcast_index(index.index.index).reconstruct_n(0, index.index.ntotal)
        order = np.searchsorted(index.ids, faiss.vector_to_array(index.index.id_map))
        out = np.empty_like(internal)
        out[order] = internal
        return out
    index.index.set_direct_map_type(faiss.DirectMap.Hashtable)  # ids are not 0..N-1 after updates
    try:
        return np.stack([index.index.reconstruct(int(i)) for i in index.ids]).astype(np.float32)
    finally:
        index.index.set_direct_map_type(faiss.DirectMap.NoMap)  # remove_ids needs no map


def near_duplicates(index: ImageIndex, threshold: float = 0.95, batch: int = 4096) -> list[list[str]]:
    """Groups of near-identical images: connected components of the graph whose edges are
    the pairs with similarity ``>= threshold`` (found by ``faiss`` range search).

    Returns:
        Groups of 2+ paths, each sorted, largest group first (then by first path).
    """
    from scipy.sparse import coo_matrix
    from scipy.sparse.csgraph import connected_components

    if not -1.0 <= threshold <= 1.0:
        raise ImageIndexError(f"similarity threshold must be in [-1, 1], got {threshold}")
    x = _stored_vectors(index)
    radius = float(np.nextafter(np.float32(threshold), np.float32(-np.inf)))  # faiss keeps scores > radius
    rows, cols = [], []
    for start in range(0, len(x), batch):
        lims, sims, ids = index.index.range_search(x[start:start + batch], radius)
        keep = (sims >= threshold) & (ids >= 0)
        q = np.repeat(np.arange(start, start + len(lims) - 1), np.diff(lims.astype(np.int64)))
        rows.append(q[keep])
        cols.append(np.searchsorted(index.ids, ids[keep]))
    r, c = np.concatenate(rows), np.concatenate(cols)
    graph = coo_matrix((np.ones(r.size), (r, c)), shape=(len(x), len(x)))
    _, labels = connected_components(graph, directed=False)
    sizes = np.bincount(labels)
    members = np.flatnonzero(sizes[labels] > 1)  # rows in a group of 2+
    members = members[np.argsort(labels[members], kind="stable")]
    splits = np.cumsum(sizes[np.unique(labels[members])])[:-1]
    groups = [sorted(index.paths[i] for i in part) for part in np.split(members, splits)] if members.size else []
    return sorted(groups, key=lambda g: (-len(g), g[0]))


def save_index(index: ImageIndex, path: str | Path) -> None:
    """Write ``index`` to ``path`` atomically (format in the module docstring)."""
    header = json.dumps({"meta": asdict(index.meta), "kind": index.kind, "paths": index.paths,
                         "sizes": index.sizes.tolist(), "mtimes": index.mtimes.tolist(),
                         "ids": index.ids.tolist(), "info": index.info}).encode()
    blob = faiss.serialize_index(index.index).tobytes()

    def write(f) -> None:
        f.write(MAGIC)
        f.write(_HEADER_LEN.pack(len(header)))
        f.write(header)
        f.write(blob)

    atomic_write(path, write)


def load_index(path: str | Path, expected: IndexMeta | None = None) -> ImageIndex:
    """Read an index written by :func:`save_index`; with ``expected``, refuse one whose
    metadata differs (:func:`check_meta`)."""
    path = Path(path)
    try:
        data = path.read_bytes()
    except OSError as e:
        raise ImageIndexError(f"cannot read index {path}: {e.strerror}") from None
    try:
        if not data.startswith(MAGIC):
            raise ValueError("not a deepcluster image index")
        (n,) = _HEADER_LEN.unpack_from(data, len(MAGIC))
        start = len(MAGIC) + _HEADER_LEN.size
        head = json.loads(data[start:start + n])
        meta = IndexMeta(**head["meta"])
        index = faiss.deserialize_index(np.frombuffer(data[start + n:], dtype=np.uint8))
        out = ImageIndex(index, meta, list(head["paths"]), np.asarray(head["sizes"], np.int64),
                         np.asarray(head["mtimes"], np.int64), np.asarray(head["ids"], np.int64), head["kind"],
                         dict(head.get("info", {})))
    except Exception as e:  # noqa: BLE001 - struct, json, faiss and key errors all mean "not an index"
        raise ImageIndexError(f"{path} is not a readable image index ({type(e).__name__}: "
                              f"{str(e).splitlines()[0] if str(e) else ''})") from None
    if out.index.ntotal != len(out.paths) or out.index.d != meta.dim:
        raise ImageIndexError(f"{path} is inconsistent: {out.index.ntotal} vectors of {out.index.d} dims, "
                              f"{len(out.paths)} paths, metadata dim {meta.dim}")
    if expected is not None:
        check_meta(out, expected, str(path))
    return out
