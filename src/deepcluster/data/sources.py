"""Image sources: where the pictures come from, addressed by data-set index.

A source knows how many images there are, how to load image ``i`` as an RGB PIL image,
and, when it has them, the labels (used only for analysis, never for training) and
file paths. Data sets for training and evaluation wrap a source with a transform.
"""

from __future__ import annotations

import gzip
import hashlib
import logging
import os
import re
import shutil
import tempfile
from collections.abc import Sequence
from pathlib import Path

import numpy as np
from PIL import Image

from ..distributed import is_main_process
from .check import cache_dir, decode_reasons
from .errors import DataError
from .files import to_rgb
from .scan import IMAGE_EXTENSIONS, FoundFile, display_path, walk_images

logger = logging.getLogger(__name__)

DEBIAN_FASHION_MNIST = Path("/usr/share/datasets/fashion-mnist")
_MNIST_FILES = ("train-images-idx3-ubyte", "train-labels-idx1-ubyte", "t10k-images-idx3-ubyte", "t10k-labels-idx1-ubyte")


class ImageSource:
    """Base class. Subclasses set ``labels`` (``(N,)`` int64 or None) and ``paths``."""

    name: str = "source"
    labels: np.ndarray | None = None
    paths: list[str] | None = None
    classes: list[str] | None = None
    label_note: str = ""
    """What the labels are, as a clause of the run's first log line (``"; folder names
    used as labels ..."``; empty when nothing needs saying). Set by ``build_source``."""

    def __len__(self) -> int:
        raise NotImplementedError

    def load(self, index: int) -> Image.Image:
        """Image ``index`` as an RGB PIL image."""
        raise NotImplementedError

    def describe(self, index: int) -> str:
        """Image ``index`` as text: its path in :func:`~deepcluster.data.scan.display_path` form."""
        return display_path(self.paths[index]) if self.paths else f"{self.name}[{index}]"


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
    root = cache_dir() / "torchvision" / _content_key(idx_dir)
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


# Where torchvision reads each downloadable set (ROOT is --data-root), for the not-found message.
_IDX_LAYOUT = f"the four IDX files ({', '.join(_MNIST_FILES)}; plain or .gz) in ROOT, ROOT/raw or ROOT/{{}}/raw"
LAYOUTS = {
    "fashion-mnist": _IDX_LAYOUT.format("FashionMNIST") + " (or Debian's dataset-fashion-mnist package installed)",
    "mnist": _IDX_LAYOUT.format("MNIST"),
    "cifar10": "ROOT/cifar-10-batches-py/ with data_batch_1..5, test_batch and batches.meta "
               "(torchvision's layout: the extracted cifar-10-python.tar.gz)",
    "stl10": "ROOT/stl10_binary/ with train_X.bin, train_y.bin, test_X.bin, test_y.bin, unlabeled_X.bin and "
             "class_names.txt (torchvision's layout: the extracted stl10_binary.tar.gz)",
}


def _download_cause(e: BaseException) -> str:
    """Why a download failed, in one line: the URL error's reason where there is one
    (torchvision's MNIST wraps it in a several-line ``RuntimeError``), else the first line."""
    import urllib.error

    if isinstance(e, urllib.error.URLError):
        return f"{type(e).__name__}: {e.reason}"
    text = str(e)
    m = re.search(r"<urlopen error ([^>]*)>", text)
    if m:
        return f"URLError: {m.group(1)}"
    first = text.strip().splitlines()[0] if text.strip() else ""
    return f"{type(e).__name__}: {first}" if first else type(e).__name__


def not_found_error(name: str, where: str, download: bool, cause: BaseException | None = None) -> DataError:
    """The one-line error for data set ``name`` missing under ``where``: what is expected
    there (:data:`LAYOUTS`) and whether a download was attempted (and why it failed)."""
    if download:
        tried = f"a download was attempted and failed ({_download_cause(cause)})" if cause is not None else \
            "a download was attempted"
    else:
        tried = ("no download was attempted (downloads are off here; `deepcluster train` downloads unless "
                 "data.download is false)")
    return DataError(f"{name} not found under {where}: expected {LAYOUTS[name]}; {tried}")


def mnist_like(name: str, root: str | None, train: bool, download: bool) -> TorchvisionSource:
    """Fashion-MNIST or MNIST from ``root``, then Debian's package, then a download.

    Raises:
        DataError: the files are nowhere and the download is off or failed (one line:
            where they were looked for, the layout expected, the download's fate).
    """
    from torchvision import datasets

    cls, folder = {"fashion-mnist": (datasets.FashionMNIST, "FashionMNIST"), "mnist": (datasets.MNIST, "MNIST")}[name]
    candidates = [Path(root)] if root else []
    if name == "fashion-mnist":
        candidates.append(DEBIAN_FASHION_MNIST)
    idx_dir = _find_idx_dir(candidates, folder)
    where = " or ".join(str(c) for c in candidates) or "any data root (no --data-root given)"
    if idx_dir is not None:
        ds = cls(str(_torchvision_mnist_root(idx_dir, folder)), train=train, download=False)
    elif download:
        target = Path(root) if root else cache_dir() / "torchvision"
        logger.info("%s not found under %s; downloading to %s", name, where, target)
        try:
            ds = cls(str(target), train=train, download=True)
        except Exception as e:  # noqa: BLE001 - any network failure becomes one clear line
            raise not_found_error(name, where, True, e) from None
    else:
        raise not_found_error(name, where, False)
    return TorchvisionSource(ds, name, ds.targets.numpy().astype(np.int64), ds.classes)


def _torchvision_set(name: str, cls, root: str | None, download: bool, **kwargs):
    """``cls(root, download=download, **kwargs)`` (CIFAR-10, STL-10), a missing or failed
    download turned into :func:`not_found_error`."""
    if not root:
        raise DataError(f"{name} needs --data-root DIR holding {LAYOUTS[name]}")
    if download and not (Path(root) / cls.base_folder).is_dir():
        logger.info("%s not found under %s; downloading to %s", name, root, root)
    try:
        return cls(root, download=download, **kwargs)
    except (OSError, RuntimeError) as e:  # URLError is an OSError; torchvision's "not found" a RuntimeError
        raise not_found_error(name, root, download, e if download else None) from None


def cifar10(root: str | None, train: bool, download: bool) -> TorchvisionSource:
    """CIFAR-10's ``train`` (50,000) or test (10,000) images from ``root`` (:data:`LAYOUTS`)."""
    from torchvision import datasets

    ds = _torchvision_set("cifar10", datasets.CIFAR10, root, download, train=train)
    return TorchvisionSource(ds, "cifar10", np.asarray(ds.targets, dtype=np.int64), ds.classes)


def stl10(root: str | None, split: str, download: bool) -> TorchvisionSource:
    """STL-10; ``split`` is train, test, unlabeled (100k images) or train+unlabeled."""
    from torchvision import datasets

    ds = _torchvision_set("stl10", datasets.STL10, root, download, split=split)
    labels = np.asarray(ds.labels, dtype=np.int64)
    return TorchvisionSource(ds, "stl10", None if (labels < 0).all() else labels, ds.classes)


def _class_folders(rootp: Path) -> list[str]:
    """The ImageFolder classes of ``rootp`` (torchvision's ``find_classes``), less those
    that are links back to ``rootp`` or to a class already listed (a loop, a second
    name): they would be empty classes, each shifting the labels after it."""
    from torchvision.datasets.folder import find_classes

    classes, _ = find_classes(str(rootp))
    st = rootp.stat()
    seen, keep = {(st.st_dev, st.st_ino)}, []
    for c in classes:
        try:
            st = (rootp / c).stat()
        except OSError:
            continue
        if (st.st_dev, st.st_ino) in seen:
            logger.info("class folder %s is a link to the folder or to another class; not a class",
                        display_path(str(rootp / c)))
            continue
        seen.add((st.st_dev, st.st_ino))
        keep.append(c)
    return keep


def _walk_folder(rootp: Path) -> tuple[list[FoundFile], list[str] | None, int]:
    """``(files, classes or None, ignored)``: the image files of an ImageFolder tree (class
    sub-folders, no images at the top) or of a flat/recursive folder, loop-safe
    (:func:`~deepcluster.data.scan.walk_images`); ``FoundFile.top`` is the class index."""
    top_images = [p for p in rootp.iterdir() if p.is_file() and p.suffix.lower() in IMAGE_EXTENSIONS]
    subdirs = [p for p in rootp.iterdir() if p.is_dir() and not p.name.startswith(".")]
    classes = _class_folders(rootp) if subdirs and not top_images else None
    walk = walk_images(str(rootp), tops=classes)
    if walk.ignored:
        logger.info("ignored %d files under %s without an image extension (%s)", walk.ignored,
                    display_path(str(rootp)), " ".join(IMAGE_EXTENSIONS))
    if walk.not_entered:
        logger.info("did not enter %d directories under %s walked already (link loops, second links); first: %s",
                    len(walk.not_entered), display_path(str(rootp)), display_path(walk.not_entered[0][0]))
    if walk.duplicates:
        logger.info("listed %d files reached twice through links once; first: %s (kept %s)", len(walk.duplicates),
                    *(display_path(p) for p in walk.duplicates[0]))
    for d, reason in walk.unreadable_dirs:
        logger.warning("cannot list %s (%s); its images are not used", display_path(d), reason)
    return walk.files, classes, walk.ignored


class FolderSource(ImageSource):
    """Images under a folder: an ImageFolder tree (class sub-folders give labels, used
    only for analysis) or a flat/recursive folder of unlabelled images.

    Files are chosen by extension (``IMAGE_EXTENSIONS``, any case; other files are
    ignored and counted in ``ignored``) and listed by :func:`~deepcluster.data.scan.walk_images`
    (links followed, loops and second links to a directory not entered, a file reached
    twice listed once; docs/RELIABILITY.md "File-system hazards"); the content decides
    the decoder, so a PNG named ``.jpg`` is read. Every image is decoded once when the
    source is built (in threads; under torchrun once over all ranks, each decoding its
    share; files unchanged since the last scan of the folder are
    not decoded again, see :class:`~deepcluster.data.check.ScanMemo`). Files that cannot be used (dangling or
    looping links, FIFOs, no permission, truncated, empty, not an image, decompression
    bombs) are skipped, counted and listed in ``skipped`` as ``(display path, reason)``,
    both strings safe to write as text (:func:`~deepcluster.data.scan.display_path`:
    a name that is not UTF-8 is escaped; ``parse_display_path`` gives the name back);
    the training loop writes them to ``skipped_images.txt``. More than
    ``max_bad_fraction`` failing is an error. Odd modes (16-bit, CMYK, transparency)
    follow :func:`~deepcluster.data.files.to_rgb`.

    Attributes:
        root: the folder as given; ``paths`` start with it.
        paths: the ``N`` images, in row order (``os.fsdecode`` form, as ``open`` takes them).
        sizes, mtimes_ns, inodes: ``(N,)`` int64 size, modification time and inode
            number each had at the scan (what
            :meth:`deepcluster.data.manifest.Manifest.from_source` records).
    """

    def __init__(self, root: str, max_bad_fraction: float = 0.5, check: bool = True) -> None:
        self.name = "folder"
        rootp = Path(root)
        if not rootp.is_dir():
            raise DataError(f"image folder {display_path(str(root))} does not exist or is not a directory; "
                            "pass --data-root DIR")
        self.root = str(rootp)
        files, self.classes, self.ignored = _walk_folder(rootp)
        if not files:
            raise DataError(f"no images ({', '.join(IMAGE_EXTENSIONS)}) found under {display_path(str(root))}")
        reasons = decode_reasons(rootp, files) if check else [f.problem for f in files]
        self.skipped: list[tuple[str, str]] = [(display_path(f.path), r) for f, r in zip(files, reasons)
                                               if r is not None]
        if self.skipped:  # the same list on every rank: warned once, at debug level on the others
            say = logger.warning if is_main_process() else logger.debug
            say("skipped %d of %d unreadable images under %s (first: %s — %s)",
                len(self.skipped), len(files), display_path(str(root)), *self.skipped[0])
        if check and len(self.skipped) > max_bad_fraction * len(files):
            raise DataError(
                f"{len(self.skipped)} of {len(files)} images under {display_path(str(root))} are unreadable "
                f"(more than {max_bad_fraction:.0%}); first: {self.skipped[0][0]} ({self.skipped[0][1]})"
            )
        files = [f for f, r in zip(files, reasons) if r is None]
        self.paths = [f.path for f in files]
        self.sizes = np.asarray([f.size for f in files], dtype=np.int64)
        self.mtimes_ns = np.asarray([f.mtime_ns for f in files], dtype=np.int64)
        self.inodes = np.asarray([f.ino for f in files], dtype=np.uint64).view(np.int64)
        labels = np.asarray([f.top if self.classes is not None else -1 for f in files], dtype=np.int64)
        self.labels = labels if (labels >= 0).all() else None

    def __len__(self) -> int:
        return len(self.paths)

    def load(self, index: int) -> Image.Image:
        path = self.paths[index]
        try:
            with Image.open(path) as img:
                return to_rgb(img)
        except Exception as e:  # noqa: BLE001
            raise DataError(display_path(f"cannot read image {path} ({type(e).__name__}: {e}); "
                                         "it changed since the scan")) from None
