"""Which file each row is: the ordered list of images a folder run trains on.

A run addresses images by their position in the folder's sorted file list; features,
assignments and ``assignments.npy`` rows are data-set indices. A :class:`Manifest` records,
for each row, the file's path relative to the folder, its size, its modification time
(ns) and its inode number, so that a later run (a resume, an evaluation, ``assign``) can tell whether the
folder still holds the same files in the same rows, and :func:`diff` / :meth:`ManifestDiff.remap`
say where each old row went.

On disk: one ``.npz`` (numpy's zip of ``.npy`` arrays, written atomically with
:func:`deepcluster.io.atomic_write`, read with ``allow_pickle=False``): the paths as one
``uint8`` blob of NUL-separated file-system bytes (``os.fsencode``: a name that is not
UTF-8 survives unchanged; NUL cannot occur in a name), plus ``int64`` arrays, in
:mod:`deepcluster.data.columns`' format. Deflated, 1,000,000 entries like
``dir123/img_0001234.png`` take 16 MB and load in well under a second
(benchmarks/manifest.py, docs/RELIABILITY.md). The same storage keeps the folder scan memo (``check.ScanMemo``).
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from .columns import ColumnFileError, read_columns, write_columns
from .sources import DataError


class ManifestError(DataError):
    """A manifest file cannot be read (missing, truncated, not a manifest)."""


@dataclass
class Manifest:
    """The images of a folder run in row order.

    Attributes:
        paths: ``N`` paths relative to the folder (``os.fsdecode`` form).
        sizes: ``(N,)`` int64 file sizes in bytes.
        mtimes_ns: ``(N,)`` int64 modification times in ns.
        inodes: ``(N,)`` int64 inode numbers (``st_ino`` as int64 bits; ``0`` = unknown). A
            rename keeps them; a copy to another disk does not (renames are then not
            recognised, only unchanged paths).
    """

    paths: list[str]
    sizes: np.ndarray
    mtimes_ns: np.ndarray
    inodes: np.ndarray | None = None

    def __post_init__(self) -> None:
        self.sizes = np.asarray(self.sizes, dtype=np.int64)
        self.mtimes_ns = np.asarray(self.mtimes_ns, dtype=np.int64)
        self.inodes = np.zeros(len(self.paths), np.int64) if self.inodes is None else np.asarray(self.inodes,
                                                                                                  dtype=np.int64)
        if not len(self.paths) == len(self.sizes) == len(self.mtimes_ns) == len(self.inodes):
            raise ValueError(f"manifest columns differ in length: {len(self.paths)} paths, {len(self.sizes)} "
                             f"sizes, {len(self.mtimes_ns)} mtimes, {len(self.inodes)} inodes")

    def __len__(self) -> int:
        return len(self.paths)

    @classmethod
    def from_source(cls, source) -> Manifest:
        """The manifest of a :class:`~deepcluster.data.FolderSource` (through ``Subset``-like
        wrappers with a ``base``), with the sizes and times seen by its scan.

        Raises:
            DataError: the source is not a folder (a torchvision data set has no files).
        """
        while not hasattr(source, "root") and hasattr(source, "base"):
            source = source.base
        if getattr(source, "root", None) is None or getattr(source, "paths", None) is None:
            raise DataError(f"a manifest lists the files of a folder source; {getattr(source, 'name', source)} "
                            "has none")
        root = source.root
        prefix = os.path.join(root, "")
        rel = [p[len(prefix):] if p.startswith(prefix) else os.path.relpath(p, root) for p in source.paths]
        cols = [getattr(source, k, None) for k in ("sizes", "mtimes_ns", "inodes")]
        if any(c is None for c in cols):
            stats = [os.stat(p) for p in source.paths]
            cols = [[s.st_size for s in stats], [s.st_mtime_ns for s in stats],
                    np.asarray([s.st_ino for s in stats], dtype=np.uint64).view(np.int64)]
        return cls(rel, *cols)

    def save(self, path: str | Path) -> None:
        """Write to ``path`` (``.npz``) atomically."""
        write_columns(path, {"paths": self.paths},
                      {"sizes": self.sizes, "mtimes_ns": self.mtimes_ns, "inodes": self.inodes})

    @classmethod
    def load(cls, path: str | Path) -> Manifest:
        """Read a manifest written by :meth:`save` (no pickle).

        Raises:
            ManifestError: missing, truncated or not a manifest (one line naming the file).
        """
        try:
            strings, ints = read_columns(path)
        except ColumnFileError as e:
            raise ManifestError(str(e)) from None
        try:
            return cls(strings["paths"], ints["sizes"], ints["mtimes_ns"], ints["inodes"])
        except (KeyError, ValueError) as e:
            raise ManifestError(f"{path} is not a manifest ({type(e).__name__}: {e})") from None


@dataclass
class ManifestDiff:
    """How a folder changed between two manifests (row indices into ``old`` / ``new``).

    Attributes:
        added: ``(A,)`` new rows whose file was not in ``old`` (renames excluded).
        removed: ``(R,)`` old rows whose file is not in ``new`` (renames excluded).
        changed: ``(C, 2)`` ``(old row, new row)``: same path, different size or mtime.
        unchanged: ``(U, 2)`` ``(old row, new row)``: same path, size and mtime.
        renamed: ``(M, 2)`` ``(old row, new row)``: a removed and an added file with the
            same size, mtime and inode, the pair unique on both sides (ambiguous pairs
            stay removed + added: a wrong match would be worse than none).
        remap: ``(len(old),)`` int64: each old row's new row for unchanged and renamed
            files, ``-1`` for removed and changed ones (their content is not the same).
    """

    added: np.ndarray
    removed: np.ndarray
    changed: np.ndarray
    unchanged: np.ndarray
    renamed: np.ndarray
    remap: np.ndarray

    def describe(self, since: str = "since the run started") -> str:
        """One line, e.g. ``3 images added, 5 removed, 2 changed since the run started``."""
        if not (len(self.added) or len(self.removed) or len(self.changed) or len(self.renamed)):
            return f"no image added, removed or changed {since}"
        text = f"{len(self.added)} images added, {len(self.removed)} removed, {len(self.changed)} changed"
        if len(self.renamed):
            text += f", {len(self.renamed)} renamed"
        return f"{text} {since}"


def _pairs(rows: list[tuple[int, int]]) -> np.ndarray:
    return np.asarray(rows, dtype=np.int64).reshape(-1, 2)


def _renames(old: Manifest, new: Manifest, removed: list[int], added: list[int]) -> list[tuple[int, int]]:
    """Removed/added pairs with the same (size, mtime, inode) and no other candidate on
    either side. A ``mv`` keeps all three; a deleted file and a new one share them only if
    the new one reuses the freed inode and is written with the same size in the same
    clock tick."""
    def by_key(m: Manifest, rows: list[int]) -> dict[tuple[int, int, int], list[int]]:
        out: dict[tuple[int, int, int], list[int]] = {}
        for r in rows:
            out.setdefault((int(m.sizes[r]), int(m.mtimes_ns[r]), int(m.inodes[r])), []).append(r)
        return out

    gone, came = by_key(old, removed), by_key(new, added)
    return sorted((o[0], came[k][0]) for k, o in gone.items() if len(o) == 1 and len(came.get(k, ())) == 1)


def diff(old: Manifest, new: Manifest) -> ManifestDiff:
    """Compare two manifests of the same folder (e.g. at the start of a run and now)."""
    new_row = {p: i for i, p in enumerate(new.paths)}
    removed, changed, unchanged = [], [], []
    for i, p in enumerate(old.paths):
        j = new_row.pop(p, None)
        if j is None:
            removed.append(i)
        elif old.sizes[i] == new.sizes[j] and old.mtimes_ns[i] == new.mtimes_ns[j]:
            unchanged.append((i, j))
        else:
            changed.append((i, j))
    added = sorted(new_row.values())
    renamed = _renames(old, new, removed, added)
    moved_old, moved_new = {o for o, _ in renamed}, {n for _, n in renamed}
    remap = np.full(len(old), -1, dtype=np.int64)
    for i, j in unchanged + renamed:
        remap[i] = j
    return ManifestDiff(added=np.asarray([r for r in added if r not in moved_new], dtype=np.int64),
                        removed=np.asarray([r for r in removed if r not in moved_old], dtype=np.int64),
                        changed=_pairs(changed), unchanged=_pairs(unchanged), renamed=_pairs(renamed), remap=remap)


def remap(old: Manifest, new: Manifest) -> np.ndarray:
    """``(len(old),)`` int64: for each old row its row in ``new``, or ``-1`` when the file
    was removed or changed (see :class:`ManifestDiff`)."""
    return diff(old, new).remap


__all__ = ["Manifest", "ManifestDiff", "ManifestError", "diff", "remap"]
