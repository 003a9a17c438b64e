"""Compact tables on disk: string and int64 columns in one ``.npz``, no pickle.

The storage of :class:`~deepcluster.data.manifest.Manifest` and of the folder scan memo.
Strings are packed into one ``uint8`` blob of NUL-separated file-system bytes
(``os.fsencode``'s ``surrogateescape``: a file name that is not UTF-8 is written back as
the same bytes); ints are ``int64`` arrays; the file is written atomically with
:func:`deepcluster.io.atomic_write` and read with ``np.load(allow_pickle=False)``.
Imports nothing of ours but ``deepcluster.io``.
"""

from __future__ import annotations

import sys
import zipfile
from pathlib import Path

import numpy as np

from ..io import atomic_write

FORMAT = 1


class ColumnFileError(ValueError):
    """A column file cannot be read (missing, truncated, not in this format)."""


def pack_strings(strings: list[str]) -> np.ndarray:
    """``strings`` as one ``(B,)`` uint8 blob of NUL-separated file-system bytes.

    Strings are encoded like ``os.fsencode`` (``surrogateescape``), so the undecodable
    bytes of a file name are written back as the same bytes. NUL must not occur in them.
    """
    data = "\0".join(strings).encode(sys.getfilesystemencoding(), "surrogateescape")
    return np.frombuffer(data, dtype=np.uint8)


def unpack_strings(blob: np.ndarray, n: int) -> list[str]:
    """The inverse of :func:`pack_strings`, given the number ``n`` of strings."""
    if n == 0:
        return []
    out = blob.tobytes().decode(sys.getfilesystemencoding(), "surrogateescape").split("\0")
    if len(out) != n:
        raise ValueError(f"the string blob holds {len(out)} strings, expected {n}")
    return out


def write_columns(path: str | Path, strings: dict[str, list[str]], ints: dict[str, np.ndarray],
                  compress: bool = True) -> None:
    """One ``.npz`` holding string columns (packed blobs) and int64 columns, atomically."""
    arrays = {"format": np.asarray([FORMAT], dtype=np.int64)}
    for k, v in strings.items():
        arrays[f"s_{k}"] = pack_strings(v)
        arrays[f"n_{k}"] = np.asarray([len(v)], dtype=np.int64)
    for k, v in ints.items():
        arrays[f"i_{k}"] = np.ascontiguousarray(v, dtype=np.int64)
    save = np.savez_compressed if compress else np.savez
    atomic_write(path, lambda f: save(f, **arrays))


def read_columns(path: str | Path) -> tuple[dict[str, list[str]], dict[str, np.ndarray]]:
    """``(strings, ints)`` as written by :func:`write_columns`.

    Raises:
        ColumnFileError: the file is missing, truncated or not in this format (one line).
    """
    try:
        with np.load(path, allow_pickle=False) as z:
            if "format" not in z.files or int(z["format"][0]) != FORMAT:
                raise ValueError(f"not a format-{FORMAT} column file")
            strings = {k[2:]: unpack_strings(z[k], int(z["n_" + k[2:]][0])) for k in z.files if k.startswith("s_")}
            ints = {k[2:]: z[k].astype(np.int64, copy=False) for k in z.files if k.startswith("i_")}
    except FileNotFoundError:
        raise ColumnFileError(f"{path} does not exist") from None
    except (OSError, ValueError, KeyError, EOFError, AttributeError, TypeError, zipfile.BadZipFile) as e:
        raise ColumnFileError(f"cannot read {path} ({type(e).__name__}: {e})") from None
    return strings, ints


__all__ = ["ColumnFileError", "pack_strings", "read_columns", "unpack_strings", "write_columns"]
