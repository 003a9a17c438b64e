"""Checking a folder once per run: every image decoded once, what failed and why.

:func:`decode_reasons` gives, for each listed file, ``None`` (usable) or the reason it
cannot be used: the walk's own (dangling link, FIFO, no permission), the scan memo's
(:class:`ScanMemo`: files unchanged since the last scan are not decoded again), else a
full decode now (:func:`check_image`, in threads). Under a process group the decoding is
shared: each file is decoded once over all ranks (docs/SCALE.md, "the folder is checked
once").
"""

from __future__ import annotations

import hashlib
import logging
import os
import warnings
from collections.abc import Sequence
from pathlib import Path

import numpy as np
from PIL import Image

from ..distributed import all_gather_object, broadcast_object, is_distributed, is_main_process, shard_indices
from .columns import ColumnFileError, read_columns, write_columns
from .errors import DataError
from .files import to_rgb
from .scan import FoundFile, display_path

logger = logging.getLogger(__name__)


def cache_dir() -> Path:
    """Where the package keeps what it can rebuild: ``$DEEPCLUSTER_CACHE``, else ``~/.cache/deepcluster``."""
    return Path(os.environ.get("DEEPCLUSTER_CACHE", Path.home() / ".cache" / "deepcluster"))


def check_image(path: str) -> str | None:
    """Decode ``path`` fully; ``None`` if usable, else the reason: a non-empty string,
    safe to write as text (:func:`~deepcluster.data.scan.display_path`: a decoder's
    message quoting a name that is not UTF-8 is escaped like the name).

    Images larger than ``PIL.Image.MAX_IMAGE_PIXELS`` (89.5 M pixels by default) are
    refused as decompression bombs before any pixel is decoded.
    """
    try:
        with Image.open(path) as img:  # reads the header only
            w, h = img.size
            if Image.MAX_IMAGE_PIXELS and w * h > Image.MAX_IMAGE_PIXELS:
                return (f"DecompressionBombError: {w} x {h} = {w * h} pixels, over the limit of "
                        f"{Image.MAX_IMAGE_PIXELS} (PIL.Image.MAX_IMAGE_PIXELS)")
            img.load()
            to_rgb(img)
    except Exception as e:  # noqa: BLE001 - every decoder failure is a reason to skip
        return _reason(e, path)
    return None


def _reason(e: Exception, path: str) -> str:
    """``"ExceptionType: first line of the message"``, without the file's own name (it is
    the skip list's first column, and a decoder quotes it with ``repr``, which would
    spell a non-UTF-8 name as ``\\udcff``); text-safe (:func:`display_path`)."""
    msg = str(e).replace(repr(path), "").replace(path, "").strip().rstrip(":").strip()
    msg = msg.splitlines()[0] if msg else ""
    return display_path(f"{type(e).__name__}: {msg}" if msg else type(e).__name__)


_UNKNOWN = object()  # ScanMemo.get: not in the memo (private: never a reason, never leaks out)


class ScanMemo:
    """What the last scan of a folder found, per file: readable, or why not.

    Kept in ``$DEEPCLUSTER_CACHE/folder-scans/<hash of the real folder>.npz`` (the column
    format of :mod:`deepcluster.data.columns`: paths as one NUL-separated blob, sizes and
    times as int64, reasons as a blob with ``""`` for readable; ~6 MB per million files,
    written atomically) and trusted for a file only while its size and modification time
    are unchanged, so a resumed run, an evaluation or a report over the same folder does
    not decode every image again. Best effort: an unwritable or unreadable cache only
    costs the rescan. The JSON memo of earlier releases is removed (a debug line).
    """

    def __init__(self, root: Path) -> None:
        self.base = str(root)  # file paths are under the folder as given; the memo is per real folder
        self.root = str(root.resolve())
        key = hashlib.sha1(self.root.encode("utf-8", "surrogateescape")).hexdigest()[:16]
        self.path = cache_dir() / "folder-scans" / (key + ".npz")
        self.entries: dict[str, tuple[int, int, str | None]] = {}
        old_json = self.path.with_suffix(".json")
        if old_json.exists():
            logger.debug("discarding the JSON folder scan memo of an earlier release: %s", old_json)
            old_json.unlink(missing_ok=True)
        try:
            strings, ints = read_columns(self.path)
            if strings["root"] == [self.root]:
                self.entries = {rel: (int(size), int(mtime), reason or None) for rel, size, mtime, reason in
                                zip(strings["paths"], ints["sizes"].tolist(), ints["mtimes_ns"].tolist(),
                                    strings["reasons"], strict=True)}
        except (ColumnFileError, KeyError, ValueError) as e:
            logger.debug("no usable folder scan memo in %s: %s", self.path, e)

    def _rel(self, path: str) -> str:
        prefix = os.path.join(self.base, "")
        return path[len(prefix):] if path.startswith(prefix) else os.path.relpath(path, self.base)

    def get(self, f: FoundFile) -> object:
        """The reason ``f`` is unusable, ``None`` if usable, ``_UNKNOWN`` if not known
        (not in the memo, or its size or modification time differ)."""
        e = self.entries.get(self._rel(f.path))
        if e is None or (e[0], e[1]) != (f.size, f.mtime_ns):
            return _UNKNOWN
        return e[2]

    def update(self, results) -> None:
        """Remember ``(FoundFile, reason)`` pairs (decoded now)."""
        for f, reason in results:
            self.entries[self._rel(f.path)] = (f.size, f.mtime_ns, reason)

    def save(self, files: Sequence[FoundFile]) -> None:
        """Write the entries of ``files`` (the folder's files now; deleted ones are dropped)."""
        rels = [r for r in (self._rel(f.path) for f in files) if r in self.entries]
        rows = [self.entries[r] for r in rels]
        try:
            self.path.parent.mkdir(parents=True, exist_ok=True)
            write_columns(self.path, {"root": [self.root], "paths": rels, "reasons": [r[2] or "" for r in rows]},
                          {"sizes": np.asarray([r[0] for r in rows], dtype=np.int64),
                           "mtimes_ns": np.asarray([r[1] for r in rows], dtype=np.int64)})
        except OSError as e:
            logger.debug("could not keep the folder scan in %s: %s", self.path, e)


def scan_threads() -> int:
    """Decoder threads of this process: the node's cores shared among the ranks on it
    (``LOCAL_WORLD_SIZE``, set by torchrun), at most 16."""
    per_rank = (os.cpu_count() or 1) // max(1, int(os.environ.get("LOCAL_WORLD_SIZE", "1")))
    return max(1, min(16, per_rank))


def decode_reasons(rootp: Path, files: list[FoundFile]) -> list[str | None]:
    """For each file, why it cannot be used (a string) or ``None``: the walk's reason
    (dangling link, FIFO, no permission), else the memo's, else a full decode now.

    Under a process group (torchrun) the folder is checked once per run, not once per
    rank: rank 0 alone reads and writes the memo, the files left to decode are split over
    the ranks (:func:`~deepcluster.distributed.shard_indices`), each rank decodes its
    share and the reasons are all-gathered, so every rank ends with the same list and
    each file is decoded exactly once over all ranks.
    """
    memo = ScanMemo(rootp) if is_main_process() else None
    reasons: list | None = None
    if memo is not None:
        reasons = [f.problem if f.problem is not None else memo.get(f) for f in files]
    reasons, todo = _agree_on_files(rootp, files, reasons)
    decoded = _decode_share(files, todo)
    for i in todo:
        reasons[i] = decoded[i]
    if memo is not None:
        memo.update((files[i], decoded[i]) for i in todo)
        readable = [f for f in files if f.problem is None]
        if len(todo) < len(readable):
            logger.info("scan of %s: %d of %d images unchanged since the last scan, not decoded again (%s)",
                        display_path(str(rootp)), len(readable) - len(todo), len(readable), memo.path)
        memo.save(readable)
    return reasons


def _listing_key(files: Sequence[FoundFile]) -> str:
    """A hash of the listing (paths, sizes, modification times), to compare it across ranks."""
    h = hashlib.sha1()
    for f in files:
        h.update(f"{f.path}\0{f.size}\0{f.mtime_ns}\0".encode("utf-8", "surrogateescape"))
    return h.hexdigest()


def _agree_on_files(rootp: Path, files: Sequence[FoundFile], reasons: list | None) -> tuple[list, list[int]]:
    """``(reasons, todo)``: rank 0's known reasons (``None`` where unknown) and the indices
    of the files still to decode, the same on every rank.

    Args:
        reasons: on rank 0 (and in a single process) one entry per file, ``_UNKNOWN``
            where the memo does not know it; ``None`` on the other ranks.

    Raises:
        DataError: the ranks do not list the same files (raised on every rank).
    """
    todo: list[int] = []
    if reasons is not None:
        todo = [i for i, r in enumerate(reasons) if r is _UNKNOWN]
        reasons = [None if r is _UNKNOWN else r for r in reasons]
    if not is_distributed():
        return reasons, todo
    keys = all_gather_object(_listing_key(files))
    differ = [r for r, k in enumerate(keys) if k != keys[0]]
    if differ:
        raise DataError(f"rank(s) {', '.join(map(str, differ))} list other files under {display_path(str(rootp))} "
                        "than rank 0 (the folder changed during the scan, or it is not the same on every node)")
    return broadcast_object((reasons, todo) if is_main_process() else None)


def _decode_share(files: Sequence[FoundFile], todo: Sequence[int]) -> dict[int, str | None]:
    """``{index: reason or None}`` for every index in ``todo`` (the same list on every
    rank), this rank decoding its :func:`~deepcluster.distributed.shard_indices` share
    in threads and the shares all-gathered (all of them in a single process)."""
    from concurrent.futures import ThreadPoolExecutor

    mine = [todo[j] for j in shard_indices(len(todo))]
    # Over-size images are refused explicitly in check_image; the filter (global to
    # the process, so set once here, not per thread) only keeps PIL's warning quiet.
    with warnings.catch_warnings(), ThreadPoolExecutor(scan_threads()) as pool:  # decoders release the GIL
        warnings.simplefilter("ignore", Image.DecompressionBombWarning)
        decoded = list(pool.map(check_image, [files[i].path for i in mine]))
    out: dict[int, str | None] = {}
    for part in all_gather_object(list(zip(mine, decoded))):
        out.update(part)
    return out
