"""Listing the images under a folder without trusting the file system to be a tree.

One walker for every command that lists image files (``FolderSource`` for training and
evaluation, ``deepcluster assign``), so that a folder lists the same files in the same
order everywhere. What it follows and what it refuses (docs/RELIABILITY.md, "File-system
hazards"):

- **Links to directories** are followed, each real directory (``st_dev``, ``st_ino``)
  entered at most once: a link loop (``ln -s . loop``, ``a/up -> ..``) or a second link
  to a directory already walked is not entered again, and a link to a directory outside
  the root is walked once, under the first path that reaches it.
- **Order**: directories in sorted order of their path (exactly ``sorted(os.walk(...))``
  for a plain tree, so runs made before this walker address the same images), files by
  name within a directory. The walk pops the smallest path first, so a directory reached
  by two routes is walked under the one that sorts first.
- **A file reached twice** through links (same real path: the directory's real path plus
  the name, or the link's target) is listed once, under the first path in that order.
  Hard links are separate files (two names, two rows), as before.
- **Mount points** are crossed (as ``os.walk`` does); a bind mount that loops back is
  caught by the same (``st_dev``, ``st_ino``) check.
- **Files that cannot be images** are listed with a reason (a string, never a code):
  ``"dangling symbolic link"``, ``"symbolic link loop"``, ``"not a regular file (fifo)"``
  (opening a FIFO would block forever), ``"unreadable: Permission denied"``. Directories
  that cannot be listed are reported in ``ImageWalk.unreadable_dirs``.

File names are kept as Python strings decoded with ``os.fsdecode`` (``surrogateescape``:
a byte that is not UTF-8 becomes a lone surrogate), which ``open`` accepts as is; to
write such a name to text, use :func:`display_path`, and :func:`parse_display_path` to
read it back.
"""

from __future__ import annotations

import errno
import heapq
import os
import re
import stat
from collections.abc import Sequence
from dataclasses import dataclass, field

IMAGE_EXTENSIONS = (".jpg", ".jpeg", ".png", ".webp", ".bmp", ".tif", ".tiff", ".gif", ".ppm", ".pgm")

_ESCAPE = re.compile(r"[\\\x00-\x1f\x7f\ud800-\udfff]")
_UNESCAPE = re.compile(r"\\(?:x([0-9a-f]{2})|u([0-9a-f]{4})|(\\)|)")  # the empty branch: a stray backslash


def _escape_char(m: re.Match) -> str:
    c = m.group(0)
    if c == "\\":
        return "\\\\"
    o = ord(c)
    if o < 0x80:  # a control character (tab, newline, ...): one line, one field
        return f"\\x{o:02x}"
    if 0xDC80 <= o <= 0xDCFF:  # os.fsdecode's surrogateescape form of the byte o - 0xDC00
        return f"\\x{o - 0xDC00:02x}"
    return f"\\u{o:04x}"  # another lone surrogate (not from a file name, but representable)


def display_path(p: str) -> str:
    """``p`` as text that can be written anywhere (UTF-8, one line, no tab) and read back.

    File names on Linux are bytes; ``os.fsdecode`` turns a byte that is not UTF-8 into a
    lone surrogate (U+DC80..U+DCFF), which cannot be encoded as UTF-8: writing it to a
    CSV, parquet or text file fails. The escaping:

    - an undecodable byte ``0xNN`` (always >= 0x80) -> ``\\xNN`` (lower-case hex);
    - a control character U+0000..U+001F, U+007F (tab, newline) -> ``\\xNN`` (< 0x80);
    - a backslash -> ``\\\\``; any other lone surrogate -> ``\\uNNNN``;
    - everything else unchanged: a UTF-8 name (``é``, ``猫``) stays readable, and a name
      without backslashes or control characters is its own display form.

    So ``bad\\xff\\xfename.png`` on disk is written ``bad\\xff\\xfename.png`` (with real
    backslashes), and :func:`parse_display_path` gives back the string ``open`` accepts.

    Args:
        p: a path as Python gives it (``os.fsdecode`` of the bytes).

    Returns:
        The display form, encodable as UTF-8 without errors.
    """
    return _ESCAPE.sub(_escape_char, p)


def _unescape_match(m: re.Match) -> str:
    hex2, hex4, backslash = m.groups()
    if backslash:
        return "\\"
    if hex2 is None and hex4 is None:
        raise ValueError(f"not a display path (a backslash that starts no escape): {m.string!r}")
    if hex2:
        o = int(hex2, 16)
        return chr(o) if o < 0x80 else chr(0xDC00 + o)
    return chr(int(hex4, 16))


def parse_display_path(s: str) -> str:
    """The inverse of :func:`display_path`: ``parse_display_path(display_path(p)) == p``.

    Raises:
        ValueError: ``s`` holds a backslash that starts none of the escapes above.
    """
    return _UNESCAPE.sub(_unescape_match, s)


@dataclass(frozen=True)
class FoundFile:
    """One image-named file the walk found.

    Attributes:
        path: its path under the root as given (``root/sub/name.png``), ``os.fsdecode`` form.
        top: index of the top-level directory (in ``tops``) it was found under.
        size: bytes (``-1`` when it could not be stat'ed).
        mtime_ns: modification time in ns (``-1`` when it could not be stat'ed).
        ino: inode number (``0`` when it could not be stat'ed); a rename keeps it.
        problem: ``None`` if it is a readable regular file, else why it cannot be an image.
    """

    path: str
    top: int
    size: int
    mtime_ns: int
    ino: int
    problem: str | None


@dataclass
class ImageWalk:
    """What :func:`walk_images` found: ``files`` in listing order, each real file once."""

    files: list[FoundFile] = field(default_factory=list)
    ignored: int = 0  # files without an image extension
    not_entered: list[tuple[str, str]] = field(default_factory=list)  # (dir, why): loops, second links
    duplicates: list[tuple[str, str]] = field(default_factory=list)  # (path dropped, path kept)
    unreadable_dirs: list[tuple[str, str]] = field(default_factory=list)  # (dir, reason)


def _found(entry: os.DirEntry, top: int) -> FoundFile:
    """The :class:`FoundFile` of an image-named directory entry, with its problem if any."""
    try:
        st = entry.stat()  # follows a link
    except OSError as e:
        if entry.is_symlink():
            problem = "symbolic link loop" if e.errno == errno.ELOOP else "dangling symbolic link"
        else:
            problem = f"unreadable: {e.strerror}"
        return FoundFile(entry.path, top, -1, -1, 0, problem)
    problem = None
    if not stat.S_ISREG(st.st_mode):
        kind = "fifo" if stat.S_ISFIFO(st.st_mode) else "socket" if stat.S_ISSOCK(st.st_mode) else "device"
        problem = f"not a regular file ({kind})"
    elif not os.access(entry.path, os.R_OK):
        problem = "unreadable: Permission denied"
    return FoundFile(entry.path, top, st.st_size, st.st_mtime_ns, st.st_ino, problem)


def _list_dir(path: str, walk: ImageWalk) -> list[os.DirEntry] | None:
    try:
        with os.scandir(path) as it:
            return list(it)
    except OSError as e:
        walk.unreadable_dirs.append((path, f"unreadable directory: {e.strerror}"))
        return None


def _is_dir(entry: os.DirEntry) -> bool:
    try:
        return entry.is_dir()  # follows links, like os.walk(followlinks=True)
    except OSError:
        return False


def walk_images(root: str | os.PathLike, tops: Sequence[str] | None = None,
                extensions: Sequence[str] = IMAGE_EXTENSIONS) -> ImageWalk:
    """Every image-named file under ``root`` (or under each of ``tops`` in turn), loop-safe.

    Args:
        root: the folder as given; paths in the result start with it.
        tops: sub-directory names of ``root`` walked one after the other (an ImageFolder's
            class folders, ``FoundFile.top`` their index); ``None`` walks ``root`` itself.
            With ``tops``, ``root`` counts as visited, so a link back to it is not entered.
        extensions: lower-case suffixes that make a file an image (any case on disk).

    Returns:
        An :class:`ImageWalk`. Files are in listing order (see the module docstring); each
        real file appears once; ``problem`` says why one cannot be read, without opening it.
    """
    root = os.fspath(root)
    walk = ImageWalk()
    visited: set[tuple[int, int]] = set()
    seen_files: dict[str, str] = {}
    exts = tuple(e.lower() for e in extensions)
    starts = [root] if tops is None else [os.path.join(root, t) for t in tops]
    if tops is not None:
        st = os.stat(root)
        visited.add((st.st_dev, st.st_ino))
    for top, start in enumerate(starts):
        heap = [start]
        while heap:
            dirpath = heapq.heappop(heap)
            try:
                st = os.stat(dirpath)
            except OSError as e:
                walk.unreadable_dirs.append((dirpath, f"unreadable directory: {e.strerror}"))
                continue
            if (st.st_dev, st.st_ino) in visited:
                walk.not_entered.append((dirpath, "already walked (a link loop or a second link to it)"))
                continue
            visited.add((st.st_dev, st.st_ino))
            entries = _list_dir(dirpath, walk)
            if entries is None:
                continue
            real_dir = os.path.realpath(dirpath).rstrip("/") + "/"  # concatenated: join is slow per file
            for entry in sorted(entries, key=lambda e: e.name):
                if _is_dir(entry):
                    heapq.heappush(heap, entry.path)
                elif not entry.name.lower().endswith(exts):
                    walk.ignored += 1
                else:
                    _add_file(walk, seen_files, entry, real_dir, top)
    return walk


def _add_file(walk: ImageWalk, seen: dict[str, str], entry: os.DirEntry, real_dir: str, top: int) -> None:
    """Append ``entry`` to ``walk.files`` unless its real path was listed already (a link
    is identified by its target when that exists, else by itself: two dangling links are
    two entries). ``real_dir`` is the real path of its directory, ending in ``/``."""
    real = real_dir + entry.name
    if entry.is_symlink() and os.path.exists(entry.path):
        real = os.path.realpath(entry.path)
    if real in seen:
        walk.duplicates.append((entry.path, seen[real]))
        return
    seen[real] = entry.path
    walk.files.append(_found(entry, top))


def list_images(root: str | os.PathLike) -> tuple[list[str], list[tuple[str, str]]]:
    """``(paths, problems)``: readable image files under ``root`` in listing order, and
    ``(display_path(path), reason)`` for the image-named entries that cannot be read
    (dangling links, FIFOs, no permission). For ``deepcluster assign`` and other listings
    that must agree with :class:`FolderSource`'s order (before its decode check)."""
    walk = walk_images(root)
    paths = [f.path for f in walk.files if f.problem is None]
    problems = [(display_path(f.path), f.problem) for f in walk.files if f.problem is not None]
    return paths, problems


__all__ = ["FoundFile", "IMAGE_EXTENSIONS", "ImageWalk", "display_path", "list_images", "parse_display_path",
           "walk_images"]
