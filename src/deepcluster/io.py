"""Files written whole or not at all: the lowest layer of the package (imports nothing of ours).

Every file the package writes (checkpoints, ``config.yaml``, ``metrics.jsonl``, the
assignments, reports, figures, exports) goes through :func:`atomic_write`: a temporary
file in the same directory, flushed to disk, then renamed over the target, with the
permissions the process umask gives (like any ``open(..., "w")``). A crash, a signal or
a full disk leaves the previous file intact and says which file could not be written.
"""

from __future__ import annotations

import errno
import os
import tempfile
from pathlib import Path

# A write that fails for lack of room, and how to say so.
_NO_ROOM = {errno.ENOSPC: "disk full", errno.EDQUOT: "disk quota exceeded", errno.EFBIG: "file size limit reached"}


def _no_room_errno(e: BaseException) -> int | None:
    """The errno of a no-room failure in ``e`` or its chain, else None.

    ``torch.save`` reports a failed write as a ``RuntimeError`` ("unexpected pos ...")
    whose ``__context__`` is the ``OSError``: the chain is searched.
    """
    seen = set()
    while e is not None and id(e) not in seen:
        seen.add(id(e))
        if isinstance(e, OSError) and e.errno in _NO_ROOM:
            return e.errno
        e = e.__cause__ or e.__context__
    return None


def _umask() -> int:
    """The process umask, read without changing it where Linux shows it (setting and
    restoring it would briefly affect files other threads create)."""
    try:
        with open("/proc/self/status") as f:
            for line in f:
                if line.startswith("Umask:"):
                    return int(line.split()[1], 8)
    except (OSError, ValueError, IndexError):
        pass
    mask = os.umask(0o022)
    os.umask(mask)
    return mask


class _Stream:
    """The temp file as writers see it: every write goes through Python's ``write``, so
    a full disk raises an ``OSError`` with its errno. (Given the real file, numpy writes
    arrays with C ``fwrite`` and reports a full disk as "N requested and 0 written",
    with no errno to recognise it by.)"""

    def __init__(self, f) -> None:
        self._f = f

    def write(self, data) -> int:
        return self._f.write(data)

    def flush(self) -> None:
        self._f.flush()

    def read(self, size: int = -1) -> bytes:  # zip writers (numpy's savez) check for it
        return self._f.read(size)

    def tell(self) -> int:
        return self._f.tell()

    def seek(self, offset: int, whence: int = 0) -> int:
        return self._f.seek(offset, whence)

    def seekable(self) -> bool:
        return True

    def writable(self) -> bool:
        return True

    def readable(self) -> bool:
        return False

    @property
    def closed(self) -> bool:  # pyarrow's writer checks it
        return self._f.closed


def atomic_write(path: str | Path, write_fn) -> None:
    """Call ``write_fn(file_object)`` on a temp file, fsync, then rename onto ``path``.

    The temp file is ``.<name>.<random>.tmp`` in the same directory. On any failure
    (a full disk, a quota, a file-size limit, an exception, a signal) the temp file is
    removed and ``path`` is untouched; a process killed outright (SIGKILL) may leave the
    temp file behind, never a partial ``path``. A full disk is reported as one clear
    ``OSError`` whatever layer (``torch.save``, numpy) hit it.
    """
    path = Path(path)
    tmp = None
    try:
        fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
        with os.fdopen(fd, "wb") as f:
            write_fn(_Stream(f))
            f.flush()
            os.fsync(f.fileno())
        os.chmod(tmp, 0o666 & ~_umask())  # mkstemp's 0600 would make results private to one user
        os.replace(tmp, path)
    except BaseException as e:
        if tmp is not None:
            try:
                os.unlink(tmp)
            except FileNotFoundError:
                pass
        code = _no_room_errno(e)
        if code is not None:
            raise OSError(code, f"{_NO_ROOM[code]} while writing {path} ({os.strerror(code)}); "
                                "the previous file is intact") from None
        raise
    try:  # make the rename durable
        dfd = os.open(path.parent, os.O_RDONLY)
        try:
            os.fsync(dfd)
        finally:
            os.close(dfd)
    except OSError:
        pass


def write_text(path: str | Path, text: str) -> None:
    """``text`` (UTF-8) to ``path`` atomically."""
    data = text.encode("utf-8")
    atomic_write(path, lambda f: f.write(data))


def writable_dir(path: str | Path) -> Path:
    """Create ``path`` (and parents) and check a file can be written in it.

    Raises:
        OSError: it cannot be created or written (``strerror`` says why).
    """
    path = Path(path)
    path.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path, prefix=".write-test-")
    os.close(fd)
    os.unlink(tmp)
    return path
