"""Checkpoints: written atomically, loaded with ``weights_only=True``, checked for fit.

A checkpoint is one dict of tensors and plain values (no pickled objects), so loading
it never runs code. Writing goes to a temporary file in the same directory, is flushed
to disk, then renamed over the target: a crash or a full disk leaves the previous
checkpoint intact.
"""

from __future__ import annotations

import errno
import os
import random
import tempfile
from pathlib import Path
from typing import Any

import numpy as np
import torch

from . import __version__

FORMAT_VERSION = 1


class CheckpointError(ValueError):
    """A checkpoint cannot be used as asked; the message names the mismatch."""


def atomic_write(path: str | Path, write_fn) -> None:
    """Call ``write_fn(file_object)`` on a temp file, fsync, then rename onto ``path``.

    On any failure (ENOSPC included) the temp file is removed and ``path`` is untouched.
    """
    path = Path(path)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        with os.fdopen(fd, "wb") as f:
            write_fn(f)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException as e:
        try:
            os.unlink(tmp)
        except FileNotFoundError:
            pass
        if isinstance(e, OSError) and e.errno == errno.ENOSPC:
            raise OSError(errno.ENOSPC, f"disk full while writing {path}; the previous file is intact") from None
        raise
    try:  # make the rename durable
        dfd = os.open(path.parent, os.O_RDONLY)
        try:
            os.fsync(dfd)
        finally:
            os.close(dfd)
    except OSError:
        pass


def save_checkpoint(state: dict[str, Any], path: str | Path) -> None:
    """Atomically ``torch.save`` ``state`` (tensors and plain values only) to ``path``."""
    state = dict(state)
    state.setdefault("format_version", FORMAT_VERSION)
    state.setdefault("package_version", __version__)
    atomic_write(path, lambda f: torch.save(state, f))


def load_checkpoint(path: str | Path, map_location: str | torch.device = "cpu") -> dict[str, Any]:
    """Load a checkpoint (a run directory or a ``.pt`` file) without unpickling code."""
    p = Path(path)
    if p.is_dir():
        p = p / "checkpoint.pt"
    if not p.is_file():
        raise CheckpointError(f"no checkpoint at {p}")
    try:
        state = torch.load(p, map_location=map_location, weights_only=True)
    except Exception as e:  # noqa: BLE001 - unsafe or corrupt files get one clear line
        first = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        raise CheckpointError(f"cannot load checkpoint {p} safely (weights_only=True): {first}") from None
    if not isinstance(state, dict) or "model" not in state:
        raise CheckpointError(f"{p} is not a deepcluster checkpoint (no 'model' entry)")
    if state.get("format_version") != FORMAT_VERSION:
        raise CheckpointError(
            f"{p} has checkpoint format {state.get('format_version')} (package {state.get('package_version')}), "
            f"this package reads format {FORMAT_VERSION} (package {__version__})"
        )
    return state


def check_compatible(state: dict[str, Any], expected: dict[str, Any], path: str | Path = "checkpoint") -> None:
    """Refuse ``state`` if any ``expected`` key (``arch``, ``k``, ...) differs."""
    for key, want in expected.items():
        have = state.get("meta", {}).get(key)
        if have != want:
            raise CheckpointError(
                f"checkpoint {path} was written with {key}={have!r}, this run has {key}={want!r}; "
                "use the same setting or a new --output-dir"
            )


def rng_state() -> dict[str, Any]:
    """RNG states of torch, numpy and python, as tensors/plain values."""
    np_state = np.random.get_state()
    return {
        "torch": torch.get_rng_state(),
        "numpy": {"name": np_state[0], "keys": torch.from_numpy(np_state[1].astype(np.int64)),
                  "pos": int(np_state[2]), "has_gauss": int(np_state[3]), "gauss": float(np_state[4])},
        "python": [list(x) if isinstance(x, tuple) else x for x in random.getstate()],
        "cuda": torch.cuda.get_rng_state_all() if torch.cuda.is_available() else [],
    }


def set_rng_state(state: dict[str, Any]) -> None:
    torch.set_rng_state(state["torch"])
    n = state["numpy"]
    np.random.set_state((n["name"], n["keys"].numpy().astype(np.uint32), n["pos"], n["has_gauss"], n["gauss"]))
    py = state["python"]
    random.setstate((py[0], tuple(py[1]), py[2]))
    if state.get("cuda") and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])
