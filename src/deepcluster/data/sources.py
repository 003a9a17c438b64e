"""Image sources: where the pictures come from, addressed by data-set index.

A source knows how many images there are, how to load image ``i`` as an RGB PIL image,
and, when it has them, the labels (used only for analysis, never for training) and
file paths. Data sets for training and evaluation wrap a source with a transform.
"""

from __future__ import annotations

import gzip
import hashlib
import json
import logging
import os
import shutil
import tempfile
import warnings
from collections.abc import Sequence
from pathlib import Path

import numpy as np
from PIL import Image

logger = logging.getLogger(__name__)

DEBIAN_FASHION_MNIST = Path("/usr/share/datasets/fashion-mnist")
IMAGE_EXTENSIONS = (".jpg", ".jpeg", ".png", ".webp", ".bmp", ".tif", ".tiff", ".gif", ".ppm", ".pgm")
_MNIST_FILES = ("train-images-idx3-ubyte", "train-labels-idx1-ubyte", "t10k-images-idx3-ubyte", "t10k-labels-idx1-ubyte")


class DataError(ValueError):
    """A data set cannot be used as asked; the message says why and what to do."""


class ImageSource:
    """Base class. Subclasses set ``labels`` (``(N,)`` int64 or None) and ``paths``."""

    name: str = "source"
    labels: np.ndarray | None = None
    paths: list[str] | None = None
    classes: list[str] | None = None

    def __len__(self) -> int:
        raise NotImplementedError

    def load(self, index: int) -> Image.Image:
        """Image ``index`` as an RGB PIL image."""
        raise NotImplementedError

    def describe(self, index: int) -> str:
        return self.paths[index] if self.paths else f"{self.name}[{index}]"


class TorchvisionSource(ImageSource):
    """A torchvision data set whose ``__getitem__`` gives ``(PIL image, target)``."""

    def __init__(self, dataset, name: str, labels: np.ndarray | None, classes: Sequence[str] | None) -> None:
        self.dataset = dataset
        self.name = name
        self.labels = labels
        self.classes = list(classes) if classes is not None else None

    def __len__(self) -> int:
        return len(self.dataset)

    def load(self, index: int) -> Image.Image:
        img = self.dataset[index][0]
        return img.convert("RGB")


def _cache_dir() -> Path:
    return Path(os.environ.get("DEEPCLUSTER_CACHE", Path.home() / ".cache" / "deepcluster"))


def _find_idx_dir(candidates: Sequence[Path], folder_name: str) -> Path | None:
    """First directory holding the four MNIST-format files (plain or ``.gz``)."""
    for base in candidates:
        for d in (base, base / folder_name / "raw", base / "raw", base / folder_name):
            if all((d / f).exists() or (d / (f + ".gz")).exists() for f in _MNIST_FILES):
                return d
    return None


def _content_key(idx_dir: Path) -> str:
    """A short hash of the four MNIST-format files in ``idx_dir`` (as stored, plain or ``.gz``)."""
    h = hashlib.sha1()
    for f in _MNIST_FILES:
        src = idx_dir / f if (idx_dir / f).exists() else idx_dir / (f + ".gz")
        h.update(src.name.encode())
        with open(src, "rb") as inp:
            for chunk in iter(lambda: inp.read(1 << 20), b""):
                h.update(chunk)
    return h.hexdigest()[:16]


def _torchvision_mnist_root(idx_dir: Path, folder_name: str) -> Path:
    """A root torchvision's MNIST-style classes read: ``ROOT/<folder_name>/raw/<files>``.

    torchvision reads the decompressed IDX files only; Debian ships them gzipped, so
    they are decompressed once into the cache (atomically) when needed.
    """
    if idx_dir.name == "raw" and idx_dir.parent.name == folder_name and all(
        (idx_dir / f).exists() for f in _MNIST_FILES
    ):
        return idx_dir.parent.parent
    # Keyed by the files' content: two data roots holding different files under the same
    # names (a test fixture and the real data set, say) must never share a cache entry.
    root = _cache_dir() / "torchvision" / _content_key(idx_dir)
    raw = root / folder_name / "raw"
    raw.mkdir(parents=True, exist_ok=True)
    for f in _MNIST_FILES:
        target = raw / f
        if target.exists():
            continue
        src = idx_dir / f
        fd, tmp = tempfile.mkstemp(dir=raw, prefix=f".{f}.")
        with os.fdopen(fd, "wb") as out:
            if src.exists():
                with open(src, "rb") as inp:
                    shutil.copyfileobj(inp, out)
            else:
                with gzip.open(str(src) + ".gz", "rb") as inp:
                    shutil.copyfileobj(inp, out)
        os.replace(tmp, target)
    return root


def mnist_like(name: str, root: str | None, train: bool, download: bool) -> TorchvisionSource:
    """Fashion-MNIST or MNIST from ``root``, then Debian's package, then a download."""
    from torchvision import datasets

    cls, folder = {"fashion-mnist": (datasets.FashionMNIST, "FashionMNIST"), "mnist": (datasets.MNIST, "MNIST")}[name]
    candidates = [Path(root)] if root else []
    if name == "fashion-mnist":
        candidates.append(DEBIAN_FASHION_MNIST)
    idx_dir = _find_idx_dir(candidates, folder)
    if idx_dir is not None:
        ds = cls(str(_torchvision_mnist_root(idx_dir, folder)), train=train, download=False)
    elif download:
        target = Path(root) if root else _cache_dir() / "torchvision"
        logger.info("%s not found locally; downloading to %s", name, target)
        try:
            ds = cls(str(target), train=train, download=True)
        except Exception as e:  # noqa: BLE001 - any network failure becomes one clear line
            raise DataError(
                f"{name} not found under {candidates or 'any data root'} and the download failed ({e}); "
                + ("install Debian's dataset-fashion-mnist or " if name == "fashion-mnist" else "")
                + "pass --data-root DIR holding the IDX files"
            ) from None
    else:
        raise DataError(
            f"{name} not found under {[str(c) for c in candidates]}; "
            + ("install Debian's dataset-fashion-mnist or " if name == "fashion-mnist" else "")
            + "pass --data-root DIR holding the four IDX files (.gz or plain)"
        )
    return TorchvisionSource(ds, name, ds.targets.numpy().astype(np.int64), ds.classes)


def cifar10(root: str | None, train: bool, download: bool) -> TorchvisionSource:
    from torchvision import datasets

    if not root:
        raise DataError("cifar10 needs --data-root DIR (the folder holding cifar-10-batches-py)")
    try:
        ds = datasets.CIFAR10(root, train=train, download=download)
    except RuntimeError as e:
        raise DataError(f"cifar10 not found under {root}: {e}") from None
    return TorchvisionSource(ds, "cifar10", np.asarray(ds.targets, dtype=np.int64), ds.classes)


def stl10(root: str | None, split: str, download: bool) -> TorchvisionSource:
    """STL-10; ``split`` is train, test, unlabeled (100k images) or train+unlabeled."""
    from torchvision import datasets

    if not root:
        raise DataError("stl10 needs --data-root DIR (the folder holding stl10_binary)")
    try:
        ds = datasets.STL10(root, split=split, download=download)
    except RuntimeError as e:
        raise DataError(f"stl10 not found under {root}: {e}") from None
    labels = np.asarray(ds.labels, dtype=np.int64)
    return TorchvisionSource(ds, "stl10", None if (labels < 0).all() else labels, ds.classes)


_WIDE_GREY = ("I;16", "I;16L", "I;16B", "I;16N", "I")


def to_rgb(img: Image.Image) -> Image.Image:
    """An 8-bit RGB copy of any decoded image, with one policy for the odd modes.

    - 16-bit (and 32-bit integer) grey, e.g. 16-bit PNG: scaled to 8 bits (x 255/65535)
      instead of clipped (PIL's own conversion turns nearly every pixel white);
    - transparency (RGBA, LA, PA, palette or grey/RGB with a transparent colour):
      composited over white, so hidden pixels never leak their arbitrary colour;
    - CMYK, YCbCr, palette, 1-bit, grey: PIL's conversion.
    """
    if img.mode in _WIDE_GREY:
        arr = np.asarray(img, dtype=np.float64)
        return Image.fromarray(np.clip(arr * (255.0 / 65535.0) + 0.5, 0, 255).astype(np.uint8), "L").convert("RGB")
    if img.mode in ("RGBA", "LA", "PA", "RGBa", "La") or "transparency" in img.info:
        rgba = img.convert("RGBA")
        white = Image.new("RGBA", rgba.size, (255, 255, 255, 255))
        return Image.alpha_composite(white, rgba).convert("RGB")
    return img.convert("RGB")


def _check_image(path: str) -> str | None:
    """Decode ``path`` fully; ``None`` if usable, else the reason.

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
        return f"{type(e).__name__}: {e}".splitlines()[0] if str(e) else type(e).__name__
    return None


class _ScanMemo:
    """What the last scan of a folder found, per file: readable, or why not.

    Kept in ``$DEEPCLUSTER_CACHE/folder-scans/`` (one JSON file per folder, written
    atomically) and trusted for a file only while its size and modification time are
    unchanged, so a resumed run, an evaluation or a report over the same folder does not
    decode every image again. Best effort: an unwritable cache only costs the rescan.
    """

    def __init__(self, root: Path) -> None:
        self.base = str(root)  # file paths are under the folder as given; the memo is per real folder
        self.root = str(root.resolve())
        self.path = _cache_dir() / "folder-scans" / (hashlib.sha1(self.root.encode()).hexdigest()[:16] + ".json")
        self.entries: dict[str, list] = {}
        self.stats: dict[str, tuple[int, int] | None] = {}
        try:
            data = json.loads(self.path.read_text())
            if data.get("root") == self.root:
                self.entries = data.get("entries", {})
        except (OSError, ValueError, AttributeError):
            pass

    def _stat(self, path: str) -> tuple[int, int] | None:
        if path not in self.stats:
            try:
                st = os.stat(path)
                self.stats[path] = (st.st_size, st.st_mtime_ns)
            except OSError:
                self.stats[path] = None
        return self.stats[path]

    def get(self, path: str) -> str | None | bool:
        """The reason ``path`` is unusable, ``None`` if usable, ``False`` if not known."""
        e = self.entries.get(os.path.relpath(path, self.base))
        st = self._stat(path)
        if e is None or st is None or (e[0], e[1]) != st:
            return False
        return e[2]

    def update(self, results) -> None:
        for path, reason in results:
            st = self._stat(path)
            if st is not None:
                self.entries[os.path.relpath(path, self.base)] = [st[0], st[1], reason]

    def save(self, paths: Sequence[str]) -> None:
        """Write the entries of ``paths`` (the folder's files now; deleted ones are dropped)."""
        from ..io import atomic_write

        keep = {rel: self.entries[rel] for rel in (os.path.relpath(p, self.base) for p in paths) if rel in self.entries}
        text = json.dumps({"root": self.root, "entries": keep})
        try:
            self.path.parent.mkdir(parents=True, exist_ok=True)
            atomic_write(self.path, lambda f: f.write(text.encode()))
        except OSError as e:
            logger.debug("could not keep the folder scan in %s: %s", self.path, e)


def _scan_threads() -> int:
    return max(1, min(16, os.cpu_count() or 1))


class FolderSource(ImageSource):
    """Images under a folder: an ImageFolder tree (class sub-folders give labels, used
    only for analysis) or a flat/recursive folder of unlabelled images.

    Files are chosen by extension (``IMAGE_EXTENSIONS``, any case; other files are
    ignored and counted in ``ignored``); the content decides the decoder, so a PNG named
    ``.jpg`` is read. Every image is decoded once when the source is built (in threads;
    files unchanged since the last scan of the folder are not decoded again, see
    :class:`_ScanMemo`);
    files that fail (truncated, empty, not an image, decompression bombs) are skipped,
    counted and listed in ``skipped`` as ``(path, reason)``; the training loop writes
    them to ``skipped_images.txt`` in the run directory. More than ``max_bad_fraction``
    failing is an error. Odd modes (16-bit, CMYK, transparency) follow :func:`to_rgb`.
    """

    def __init__(self, root: str, max_bad_fraction: float = 0.5, check: bool = True) -> None:
        from torchvision.datasets.folder import find_classes

        self.name = "folder"
        rootp = Path(root)
        if not rootp.is_dir():
            raise DataError(f"image folder {root} does not exist or is not a directory; pass --data-root DIR")
        top_images = [p for p in rootp.iterdir() if p.is_file() and p.suffix.lower() in IMAGE_EXTENSIONS]
        subdirs = [p for p in rootp.iterdir() if p.is_dir() and not p.name.startswith(".")]
        files: list[tuple[str, int]] = []
        self.ignored = 0
        if subdirs and not top_images:
            classes, class_to_idx = find_classes(str(rootp))
            for c in classes:
                for dirpath, _, names in sorted(os.walk(rootp / c, followlinks=True)):
                    for fn in sorted(names):
                        if fn.lower().endswith(IMAGE_EXTENSIONS):
                            files.append((os.path.join(dirpath, fn), class_to_idx[c]))
                        else:
                            self.ignored += 1
            self.classes = classes
        else:
            for dirpath, dirnames, names in sorted(os.walk(rootp, followlinks=True)):
                dirnames.sort()
                for fn in sorted(names):
                    if fn.lower().endswith(IMAGE_EXTENSIONS):
                        files.append((os.path.join(dirpath, fn), -1))
                    else:
                        self.ignored += 1
        if self.ignored:
            logger.info("ignored %d files under %s without an image extension (%s)", self.ignored, root,
                        " ".join(IMAGE_EXTENSIONS))
        if not files:
            raise DataError(f"no images ({', '.join(IMAGE_EXTENSIONS)}) found under {root}")
        self.skipped: list[tuple[str, str]] = []
        if check:
            from concurrent.futures import ThreadPoolExecutor

            good = []
            # Over-size images are refused explicitly in _check_image; the filter (global to
            # the process, so set once here, not per thread) only keeps PIL's warning quiet.
            memo = _ScanMemo(rootp)
            todo = [p for p, _ in files if memo.get(p) is False]
            with warnings.catch_warnings(), ThreadPoolExecutor(_scan_threads()) as pool:  # decoders release the GIL
                warnings.simplefilter("ignore", Image.DecompressionBombWarning)
                memo.update(zip(todo, pool.map(_check_image, todo)))
            reasons = [memo.get(p) for p, _ in files]
            if len(todo) < len(files):
                logger.info("scan of %s: %d of %d images unchanged since the last scan, not decoded again (%s)",
                            root, len(files) - len(todo), len(files), memo.path)
            memo.save([p for p, _ in files])
            for (path, label), reason in zip(files, reasons):
                if reason is None:
                    good.append((path, label))
                else:
                    self.skipped.append((path, reason))
            if self.skipped:
                logger.warning("skipped %d of %d unreadable images under %s (first: %s — %s)",
                               len(self.skipped), len(files), root, *self.skipped[0])
            if len(self.skipped) > max_bad_fraction * len(files):
                raise DataError(
                    f"{len(self.skipped)} of {len(files)} images under {root} are unreadable "
                    f"(more than {max_bad_fraction:.0%}); first: {self.skipped[0][0]} ({self.skipped[0][1]})"
                )
            files = good
        self.paths = [p for p, _ in files]
        labels = np.asarray([lab for _, lab in files], dtype=np.int64)
        self.labels = labels if (labels >= 0).all() else None

    def __len__(self) -> int:
        return len(self.paths)

    def load(self, index: int) -> Image.Image:
        path = self.paths[index]
        try:
            with Image.open(path) as img:
                return to_rgb(img)
        except Exception as e:  # noqa: BLE001
            raise DataError(f"cannot read image {path} ({type(e).__name__}: {e}); it changed since the scan") from None
