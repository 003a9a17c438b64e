"""THE run folder: every reader and writer of a run goes through this module.

A run directory holds:

| file | written by | content |
|---|---|---|
| ``config.yaml`` | train | the resolved configuration (``--resume`` starts from it) |
| ``metrics.jsonl`` | train | one JSON record per finished epoch |
| ``assignments.npy`` | train | int32 ``(epochs, N)``: every epoch's cluster of every image |
| ``checkpoint.pt`` | train | everything a resume needs (:mod:`deepcluster.checkpoint`) |
| ``checkpoint-epochE.pt`` | train ``--keep-every`` | the run after E epochs, without the optimiser |
| ``best.pt`` | train (``--eval-every``) | the epoch with the best ``run.best_metric``, without the optimiser |
| ``nmi.png`` | train (monitor) | NMI over the epochs |
| ``train.log`` / ``train.rank<N>.log`` | train | the log of rank 0 / rank N |
| ``run.lock`` | train | held (``flock``) while a training process owns the folder |
| ``skipped_images.txt`` | train | unreadable images of a folder: ``path<TAB>reason`` |
| ``manifest.npz`` | train | folder runs: which file each row is (path, size, mtime, inode) |
| ``eval/``, ``report/``, ``viz/`` | eval, report, viz | results of the other commands |

:class:`RunDir` names the files and reads/writes them (atomically, :mod:`deepcluster.io`);
:class:`Run` is a trained run loaded for use (network, checkpoint, typed config, images).
"""

from __future__ import annotations

import errno
import fcntl
import json
import logging
import os
import sys
from dataclasses import dataclass, field
from functools import cached_property
from pathlib import Path
from typing import Any

import numpy as np
import torch

from .checkpoint import CheckpointError, load_model, saved_config
from .config import Config, load_yaml, config_from_saved, save_yaml
from .data import (DataError, ImageSource, ImageSpec, Manifest, cluster_transform, diff, image_spec,
                   training_source)
from .io import atomic_write, write_text, writable_dir
from .models import DeepClusterNet, model_from_meta

logger = logging.getLogger(__name__)

CONFIG, METRICS, ASSIGNMENTS, CHECKPOINT = "config.yaml", "metrics.jsonl", "assignments.npy", "checkpoint.pt"


class RunDirError(ValueError):
    """A run directory cannot be used as asked; the message names the file."""


class RunDir:
    """The files of one run directory (see the module docstring)."""

    def __init__(self, path: str | Path) -> None:
        self.path = Path(path)
        self.config = self.path / CONFIG
        self.metrics = self.path / METRICS
        self.checkpoint = self.path / CHECKPOINT
        self.assignments = self.path / ASSIGNMENTS
        self.plot = self.path / "nmi.png"
        self.log = self.path / "train.log"
        self.lock = self.path / "run.lock"
        self.skipped = self.path / "skipped_images.txt"
        self.manifest = self.path / "manifest.npz"
        self._lock_fd: int | None = None

    # ------------------------------------------------------------------ ownership

    def acquire(self) -> None:
        """Take the run directory for this process, or refuse: another run holds it.

        ``run.lock`` (holding the pid, for the message) is locked with ``flock``: the
        kernel drops the lock when its process ends, however it ends (SIGKILL too), so a
        dead run never blocks a restart and a live one always refuses a second.
        """
        self.path.mkdir(parents=True, exist_ok=True)
        while True:
            fd = os.open(self.lock, os.O_RDWR | os.O_CREAT, 0o644)
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except OSError as e:
                holder = os.read(fd, 32).decode(errors="replace").strip() or "?"
                os.close(fd)
                if e.errno not in (errno.EWOULDBLOCK, errno.EACCES):
                    raise
                raise RunDirError(f"{self.path} is in use by process {holder} (run.lock): wait for it to end "
                                  "or choose another --output-dir") from None
            try:  # the holder may have released (and removed) the file meanwhile: lock the new one
                if os.fstat(fd).st_ino == os.stat(self.lock).st_ino:
                    break
            except FileNotFoundError:
                pass
            os.close(fd)
        os.ftruncate(fd, 0)
        os.write(fd, str(os.getpid()).encode())
        self._lock_fd = fd

    def release(self) -> None:
        if self._lock_fd is not None:
            self.lock.unlink(missing_ok=True)
            os.close(self._lock_fd)  # drops the flock
            self._lock_fd = None

    def remove_stale_temps(self) -> None:
        """Remove the ``.<name>.<random>.tmp`` files of :func:`~deepcluster.io.atomic_write`
        that a killed process left behind (call while holding the lock)."""
        stale = sorted(self.path.glob(".*.tmp"))
        for p in stale:
            p.unlink(missing_ok=True)
        if stale:
            logger.info("removed %d temporary files of interrupted writes: %s", len(stale),
                        ", ".join(p.name for p in stale))

    # ------------------------------------------------------------------ files

    def read_metrics(self, required: bool = False) -> list[dict[str, Any]]:
        """The per-epoch records of ``metrics.jsonl``, oldest first (``[]`` when absent).

        Raises:
            RunDirError: a line is not JSON (naming the file and line); with ``required``,
                the file is missing or empty.
        """
        if required and not self.path.is_dir():
            raise RunDirError(f"run directory {self.path} does not exist; pass the --output-dir of a "
                              "`deepcluster train` run")
        if not self.metrics.is_file():
            if required:
                raise RunDirError(f"{self.path} has no {METRICS}; it is not a training run directory "
                                  f"(train first: deepcluster train --output-dir {self.path})")
            return []
        records = []
        for n, line in enumerate(self.metrics.read_text(errors="replace").splitlines(), 1):
            if line.strip():
                try:
                    records.append(json.loads(line))
                except json.JSONDecodeError:
                    raise RunDirError(f"{self.metrics} line {n} is not valid JSON; the file is damaged") from None
        if required and not records:
            raise RunDirError(f"{self.metrics} is empty: no epoch has finished yet; wait for the first epoch")
        return records

    def write_metrics(self, records: list[dict[str, Any]]) -> None:
        write_text(self.metrics, "".join(json.dumps(r) + "\n" for r in records))

    def read_assignments(self, epochs: int | None = None) -> np.ndarray | None:
        """``(epochs, N)`` int32, memory-mapped (nothing is read until used), or ``None``
        when absent; ``epochs`` keeps the first rows only (a row appended after the last
        checkpoint belongs to no committed epoch)."""
        if not self.assignments.is_file():
            return None
        hist = np.load(self.assignments, mmap_mode="r")
        return hist if epochs is None else hist[:epochs]

    def append_assignments(self, row: np.ndarray, epoch: int) -> None:
        """Write ``row`` (``(N,)``) as row ``epoch`` of ``assignments.npy``, in place.

        The file is an ``.npy`` whose header has a fixed size (:data:`HISTORY_HEADER`
        bytes), so an epoch costs one row of N int32 and a header rewrite, however many
        epochs came before; readers see a plain ``.npy`` (``np.load``). The row goes first,
        then the header: a kill in between leaves the previous epochs readable, and the
        checkpoint (the commit point) says how many rows count. A file of the older layout
        (rewritten whole every epoch) is converted once.
        """
        row = np.ascontiguousarray(row, dtype="<i4")
        n = len(row)
        if self.assignments.is_file() and _history_header_ok(self.assignments, n):
            mode = "r+b"
        else:
            old = self.read_assignments(epoch)
            atomic_write(self.assignments, lambda f: (f.write(_history_header(0, n)),
                                                      f.write(np.ascontiguousarray(old, "<i4").tobytes())
                                                      if old is not None else None))
            mode = "r+b"
        with open(self.assignments, mode) as f:
            f.seek(HISTORY_HEADER + epoch * n * 4)
            f.write(row.tobytes())
            f.truncate()
            f.flush()
            os.fsync(f.fileno())
            f.seek(0)
            f.write(_history_header(epoch + 1, n))
            f.flush()
            os.fsync(f.fileno())

    def read_config(self) -> Config:
        """The typed configuration of ``config.yaml`` (older layouts migrated)."""
        return config_from_saved(load_yaml(self.config))

    def write_config(self, cfg: Config) -> None:
        save_yaml(cfg, self.config)

    def write_skipped(self, skipped: list[tuple[str, str]]) -> None:
        """``skipped_images.txt``: one ``path<TAB>reason`` line per unreadable image
        (removed when there are none, so it never describes an older scan)."""
        if not skipped:
            self.skipped.unlink(missing_ok=True)
            return
        clean = lambda t: str(t).replace("\t", " ").replace("\n", " ")  # noqa: E731
        write_text(self.skipped, "".join(f"{clean(p)}\t{clean(r)}\n" for p, r in skipped))

    # ------------------------------------------------------------------ which file each row is

    def check_manifest(self, source: ImageSource) -> Manifest | None:
        """Refuse a folder that changed since the run started: rows are images by position,
        so an added, removed, renamed or rewritten file would silently give rows to other
        files. Returns the folder's manifest now (``None`` for data sets without files).

        Raises:
            RunDirError: the folder's files differ from ``manifest.npz`` (one line: what changed).
        """
        try:
            now = Manifest.from_source(source)
        except DataError:  # a torchvision data set: its rows cannot move
            return None
        if self.manifest.is_file():
            d = diff(Manifest.load(self.manifest), now)
            same = len(d.remap) == len(now) and bool((d.remap == np.arange(len(now))).all())
            if not same or len(d.added):
                root = getattr(source, "root", None) or getattr(getattr(source, "base", None), "root", "the folder")
                raise RunDirError(f"{root}: {d.describe()}, so the run's rows no longer name the same files; "
                                  f"restore the folder or start a new run (another --output-dir)")
        return now

    # ------------------------------------------------------------------ snapshots

    def snapshot(self, epoch: int) -> Path:
        """``checkpoint-epochE.pt``: the run after ``epoch`` completed epochs."""
        return self.path / f"checkpoint-epoch{epoch}.pt"

    @property
    def best(self) -> Path:
        return self.path / "best.pt"

    def snapshots(self) -> dict[int, Path]:
        """Completed epochs -> ``checkpoint-epochE.pt``, oldest first."""
        found = {}
        for p in self.path.glob("checkpoint-epoch*.pt"):
            tail = p.stem[len("checkpoint-epoch"):]
            if tail.isdigit():
                found[int(tail)] = p
        return dict(sorted(found.items()))

    def prune_snapshots(self, keep_last: int) -> list[Path]:
        """Remove all but the ``keep_last`` newest snapshots (0: keep all); returns the removed."""
        snaps = list(self.snapshots().values())
        gone = snaps[:-keep_last] if keep_last and len(snaps) > keep_last else []
        for p in gone:
            p.unlink(missing_ok=True)
        return gone

    def checkpoint_for(self, epoch: int | str | None = None) -> Path:
        """The checkpoint of ``epoch``: ``None`` the last (``checkpoint.pt``), ``"best"``
        (``best.pt``), or ``E`` completed epochs (``checkpoint-epochE.pt``, or
        ``checkpoint.pt`` when that is the last epoch).

        Raises:
            RunDirError: no such checkpoint (the message lists the ones there are).
        """
        if epoch is None:
            return self.checkpoint
        if epoch == "best":
            if self.best.is_file():
                return self.best
        else:
            e = parse_epoch(epoch)
            snaps = self.snapshots()
            if e in snaps:
                return snaps[e]
            if self.checkpoint.is_file() and (self.read_metrics() or [{}])[-1].get("epoch") == e - 1:
                return self.checkpoint
        have = [f"{e}" for e in self.snapshots()] + (["best"] if self.best.is_file() else [])
        want = self.best.name if epoch == "best" else self.snapshot(parse_epoch(epoch)).name
        raise RunDirError(f"{self.path} has no {want} for --epoch {epoch}; available: "
                          f"{', '.join(have) or 'only the last (checkpoint.pt): train with --keep-every N'}")

    def output_dir(self, name: str, override: str | Path | None = None) -> Path:
        """``RUN/<name>`` (or ``override``), created and checked writable.

        Raises:
            RunDirError: it cannot be created or written (naming the reason).
        """
        return ensure_writable_dir(override if override is not None else self.path / name)


HISTORY_HEADER = 128
"""Bytes of the ``assignments.npy`` header: fixed, so rows can be appended in place."""


def _history_header(rows: int, n: int) -> bytes:
    """An ``.npy`` version 1.0 header for ``(rows, n)`` little-endian int32, padded to
    :data:`HISTORY_HEADER` bytes (the format allows any multiple of 64)."""
    d = "{'descr': '<i4', 'fortran_order': False, 'shape': (%d, %d), }" % (rows, n)
    body = d.ljust(HISTORY_HEADER - 10 - 1) + "\n"
    return b"\x93NUMPY\x01\x00" + len(body).to_bytes(2, "little") + body.encode("latin1")


def _history_header_ok(path: Path, n: int) -> bool:
    """Whether ``path`` has the fixed-size header of :func:`_history_header` for width ``n``."""
    with open(path, "rb") as f:
        head = f.read(HISTORY_HEADER)
    return (len(head) == HISTORY_HEADER and head[:10] == b"\x93NUMPY\x01\x00" + (HISTORY_HEADER - 10).to_bytes(2, "little")
            and f", {n}), " in head.decode("latin1") and "'<i4'" in head.decode("latin1"))


def parse_epoch(value: int | str) -> int | str:
    """``--epoch`` as given: ``"best"`` or a positive number of completed epochs."""
    if value == "best":
        return value
    try:
        e = int(value)
    except (TypeError, ValueError):
        raise RunDirError(f"--epoch must be a number of completed epochs or 'best', got {value!r}") from None
    if e < 1:
        raise RunDirError(f"--epoch must be >= 1 (epochs completed), got {e}")
    return e


def checkpoint_path(run_or_checkpoint: str | Path, epoch: int | str | None = None) -> Path:
    """The checkpoint file ``--checkpoint RUN [--epoch E|best]`` names: a run directory
    with an epoch resolves through :meth:`RunDir.checkpoint_for`; a ``.pt`` file is itself."""
    p = Path(run_or_checkpoint)
    if epoch is None:
        return p
    if not p.is_dir():
        raise RunDirError(f"--epoch needs a run directory, not the file {p}")
    return RunDir(p).checkpoint_for(epoch)


def ensure_writable_dir(path: str | Path) -> Path:
    """Create ``path`` (and parents) and check a file can be written in it.

    Raises:
        RunDirError: it cannot be created or written (naming the reason).
    """
    try:
        return writable_dir(path)
    except OSError as e:
        raise RunDirError(f"output directory {path} is not writable ({e.strerror or e}); "
                          "choose another with --out") from None


# ---------------------------------------------------------------------- the log file

class _LogFile(logging.FileHandler):
    """A log file that cannot break the run: on a full disk it says so once on stderr
    and drops its lines, instead of a traceback per line and an error at close that
    would hide the real one."""

    _failed = False

    def handleError(self, record: logging.LogRecord) -> None:
        if not self._failed:
            self._failed = True
            print(f"deepcluster: warning: cannot write {self.baseFilename} ({sys.exc_info()[1]}); "
                  "log lines go to the console only", file=sys.stderr)

    def close(self) -> None:
        try:
            super().close()
        except OSError:
            pass


class RunLog:
    """``train.log`` on rank 0, ``train.rank<N>.log`` at debug level on rank N > 0,
    attached to the package's logger while the ``with`` block runs."""

    def __init__(self, run: RunDir, rank: int) -> None:
        self.run, self.rank = run, rank
        self.handler: logging.Handler | None = None
        self._saved_level: int | None = None

    def __enter__(self) -> "RunLog":
        r = self.rank
        self.handler = _LogFile(self.run.log if r == 0 else self.run.path / f"train.rank{r}.log")
        self.handler.setFormatter(logging.Formatter(f"%(asctime)s %(levelname)s [rank {r}] %(name)s: %(message)s"
                                                    if r else "%(asctime)s %(levelname)s %(name)s: %(message)s"))
        pkg = logging.getLogger("deepcluster")
        if r:
            self.handler.setLevel(logging.DEBUG)
            self._saved_level = pkg.level
            pkg.setLevel(logging.DEBUG)
        pkg.addHandler(self.handler)
        return self

    def write(self, level: int, msg: str) -> None:
        """One line in the file only (the console gets it from the caller)."""
        if self.handler is not None:
            self.handler.handle(logger.makeRecord(logger.name, level, __file__, 0, msg, None, None))

    def __exit__(self, *exc: Any) -> None:
        pkg = logging.getLogger("deepcluster")
        if self.handler is not None:
            pkg.removeHandler(self.handler)
            self.handler.close()
            self.handler = None
        if self._saved_level is not None:
            pkg.setLevel(self._saved_level)
            self._saved_level = None


# ---------------------------------------------------------------------- a trained run

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
        run = RunDir(p if p.is_dir() else p.parent)
        records = run.read_metrics(required=require_metrics)
        model, state = load_model(p)
        model.to(device)
        epochs = int(state.get("epoch") or 0)
        hist = run.read_assignments(epochs)  # the run's history file, up to this checkpoint's epoch
        if (hist is None or len(hist) < epochs) and "assignments" in state:  # a copied .pt: its own rows
            hist = state["assignments"].numpy()
        return cls(run.path, model, state, records, hist)

    @cached_property
    def config(self) -> Config:
        """The typed configuration the run was trained with."""
        return saved_config(self.state)

    @property
    def seed(self) -> int:
        return self.config.run.seed

    @cached_property
    def source(self) -> ImageSource:
        """The images the run trained on, image ``i`` = row ``i`` of the assignments."""
        data = self.config.data
        source = training_source(data, self.seed)
        RunDir(self.path).check_manifest(source)  # renamed or replaced files: refused, never shifted
        n = self.state.get("meta", {}).get("num_images")
        if n is not None and len(source) != n:
            raise RunDirError(f"the run trained on {n} images but its data set now has {len(source)} "
                              f"({data.name} at {data.root}); the data changed since training")
        return source

    @cached_property
    def spec(self) -> ImageSpec:
        return image_spec(self.config.data.name, self.state.get("meta", {}).get("image_size")
                          or self.config.data.image_size)

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
            raise RunDirError(f"{self.path} has no cluster assignments (assignments.npy); train at least one epoch")
        return np.asarray(self.assignments[-1], dtype=np.int64)

    def dataset_indices(self) -> np.ndarray:
        """``(N,)`` index of each run image in its data set split (differs with ``subset``)."""
        base = getattr(self.source, "indices", None)
        return np.asarray(base, dtype=np.int64) if base is not None else np.arange(len(self.source))

    def load_images(self, indices: np.ndarray) -> torch.Tensor:
        """Network inputs ``(n, 3, S, S)`` of run images ``indices`` (clustering transform)."""
        tf = cluster_transform(self.spec)
        return torch.stack([tf(self.source.load(int(i))) for i in indices])

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


__all__ = ["ASSIGNMENTS", "CHECKPOINT", "CONFIG", "METRICS", "Run", "RunDir", "RunDirError", "RunLog",
           "CheckpointError", "checkpoint_path", "ensure_writable_dir", "parse_epoch", "sample_indices"]
