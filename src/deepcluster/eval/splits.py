"""Which images an evaluation uses: labelled train/test sources, the held-out validation
part, quick-mode subsets and class-balanced label fractions.

Rules (docs/EVALUATION.md):

- Reporting is on the data set's **test** split. Hyper-parameters are chosen on a
  **validation part held out of the training split** (stratified, fixed seed), never on
  test. A ``folder`` data set has no test split: pass ``test_root``, or a stratified 20 %
  of the folder is held out as the test part (fixed seed).
- Every subset is a sorted index array drawn with a fixed seed, so two evaluations of two
  checkpoints see exactly the same images.
"""

from __future__ import annotations

import hashlib
import math
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from ..data import DataError, ImageSource, ImageSpec, Subset, build_source, folder_image_size, image_spec

FOLDER_TEST_FRACTION = 0.2
"""Part of a ``folder`` data set held out as its test split when no ``test_root`` is given."""


def require_labels(source: ImageSource, what: str, where: str) -> np.ndarray:
    """The labels of ``source`` (``(N,)`` int64), or a one-line error naming the fix.

    Args:
        source: the images.
        what: the protocol that needs labels (``"linear"``, ...), for the message.
        where: where the images came from (data set name and root), for the message.
    """
    if source.labels is None:
        raise DataError(
            f"{what} needs labels but {where} has none (an unlabelled folder or split); pass --data/--data-root "
            "of a labelled data set (an ImageFolder tree with one sub-folder per class, or a torchvision set)"
        )
    return np.asarray(source.labels, dtype=np.int64)


def random_subset(n: int, size: int | None, seed: int) -> np.ndarray:
    """Sorted indices of a fixed random subset of ``size`` of ``range(n)`` (all if ``None``)."""
    if size is None or size >= n:
        return np.arange(n, dtype=np.int64)
    if size < 1:
        raise ValueError(f"subset size must be >= 1, got {size}")
    return np.sort(np.random.default_rng(seed).choice(n, size, replace=False)).astype(np.int64)


def stratified_holdout(labels: np.ndarray, fraction: float, seed: int) -> tuple[np.ndarray, np.ndarray]:
    """Split positions ``0..N-1`` into ``(kept, held_out)``, stratified by class.

    Each class with ``n_c >= 2`` images gives ``max(1, round(fraction * n_c))`` of them
    (at most ``n_c - 1``) to the held-out part; a class with a single image stays in
    ``kept``. Both arrays are sorted and disjoint, and cover all positions.
    """
    if not 0.0 < fraction < 1.0:
        raise ValueError(f"held-out fraction must be in (0, 1), got {fraction}")
    labels = np.asarray(labels)
    rng = np.random.default_rng(seed)
    held: list[np.ndarray] = []
    for c in np.unique(labels):
        members = np.flatnonzero(labels == c)
        if len(members) < 2:
            continue
        m = min(len(members) - 1, max(1, int(math.floor(fraction * len(members) + 0.5))))
        held.append(rng.choice(members, m, replace=False))
    held_out = np.sort(np.concatenate(held)) if held else np.zeros(0, dtype=np.int64)
    mask = np.ones(len(labels), dtype=bool)
    mask[held_out] = False
    return np.flatnonzero(mask).astype(np.int64), held_out.astype(np.int64)


def balanced_label_subset(labels: np.ndarray, fraction: float, seed: int, total: int | None = None) -> np.ndarray:
    """A class-balanced subset holding ``fraction`` of the labels: sorted positions.

    Every class gets the same number of images, ``m = round(fraction * total / C)``
    (a class with fewer images gives all it has), drawn with ``seed`` from ``labels``.

    Args:
        labels: ``(N,)`` labels of the images to draw from.
        fraction: the part of the labels kept.
        seed: seeds the draw.
        total: the number of images ``fraction`` refers to (default ``N``; e.g. the whole
            training split when drawing from its part outside the validation images).

    Raises:
        ValueError: ``fraction`` is not in (0, 1], or ``m`` is 0 (a class would be empty).
    """
    if not 0.0 < fraction <= 1.0:
        raise ValueError(f"--label-fraction must be in (0, 1], got {fraction}")
    labels = np.asarray(labels)
    classes = np.unique(labels)
    n, c = (total or len(labels)), len(classes)
    per_class = int(math.floor(fraction * n / c + 0.5))
    if per_class < 1:
        raise ValueError(
            f"--label-fraction {fraction:g} leaves every class empty ({fraction * n / c:.2f} images per class "
            f"from {n} labelled images in {c} classes); use --label-fraction >= {c / n:.2g}"
        )
    rng = np.random.default_rng(seed)
    picked = []
    for cls in classes:
        members = np.flatnonzero(labels == cls)
        picked.append(rng.choice(members, min(per_class, len(members)), replace=False))
    return np.sort(np.concatenate(picked)).astype(np.int64)


def fraction_tag(fraction: float) -> str:
    """``0.01 -> "1pct"``, ``0.1 -> "10pct"``, ``0.005 -> "0.5pct"`` (file and metric names)."""
    return f"{fraction * 100:g}pct"


def _digest(indices: np.ndarray) -> str:
    return hashlib.sha1(np.ascontiguousarray(indices, dtype=np.int64).tobytes()).hexdigest()[:12]


@dataclass
class EvalData:
    """The labelled images of an evaluation.

    Attributes:
        name: data set name (``fashion-mnist``, ``folder``, ...).
        root: its root (``None``: the default location).
        spec: image size and normalisation (the checkpoint's input size).
        train: the labelled training images (after ``subset``).
        test: the test images (after ``test_subset``).
        fit: positions in ``train`` used to fit classifiers while choosing
            hyper-parameters (``(N_fit,)``, sorted).
        val: positions in ``train`` held out for that choice (``(N_val,)``, sorted).
        num_classes: number of classes (max label + 1 over train and test).
        keys: identity of each split (name, root, size, indices digest) for cache keys.
        info: what the JSON results record about the data.
        test_root: ``folder`` only: the separate test folder (``None``: a held-out part).
    """

    name: str
    root: str | None
    spec: ImageSpec
    train: ImageSource
    test: ImageSource
    fit: np.ndarray
    val: np.ndarray
    num_classes: int
    keys: dict[str, str] = field(default_factory=dict)
    info: dict[str, Any] = field(default_factory=dict)
    test_root: str | None = None

    @property
    def train_labels(self) -> np.ndarray:
        return np.asarray(self.train.labels, dtype=np.int64)

    @property
    def test_labels(self) -> np.ndarray:
        return np.asarray(self.test.labels, dtype=np.int64)

    def source(self, split: str) -> ImageSource:
        if split not in ("train", "test"):
            raise ValueError(f"split must be train or test, got {split!r}")
        return self.train if split == "train" else self.test


def load_eval_data(name: str, root: str | None, image_size: int | None, *, protocol: str,
                   test_root: str | None = None, subset: int | None = None, test_subset: int | None = None,
                   val_fraction: float = 0.1, seed: int = 0, download: bool = False) -> EvalData:
    """Labelled train/test images of data set ``name`` for ``protocol``.

    Args:
        name, root: the data set (``deepcluster.data.build_source`` names).
        image_size: network input side (the checkpoint's).
        protocol: the protocol asking, named in the no-labels error.
        test_root: ``folder`` only: a separate labelled folder used as the test split.
        subset, test_subset: fixed random subsets (quick runs); ``None`` keeps all.
        val_fraction: part of the training images held out for hyper-parameter choice.
        seed: seeds the subsets, the folder test part and the validation part.
        download: allow torchvision downloads (never in tests).

    Raises:
        DataError: the data set has no labels (the message names the fix).
    """
    where = f"data set {name!r}" + (f" at {root}" if root else "")
    spec = image_spec(name, image_size)
    if name == "folder":
        full = build_source(name, root, "train", download)
        labels = require_labels(full, protocol, where)
        if image_size is None:  # raw pixels without --image-size: the size training would pick
            spec = image_spec(name, folder_image_size(full))
        if test_root:
            train_src: ImageSource = full
            test_src: ImageSource = build_source(name, test_root, "test", download)
            require_labels(test_src, protocol, f"test folder {test_root}")
            if test_src.classes != full.classes:
                raise DataError(f"test folder {test_root} has classes {test_src.classes}, training folder {root} "
                                f"has {full.classes}; use folders with the same class sub-folders")
            test_desc = f"folder {test_root}"
        else:
            kept, held = stratified_holdout(labels, FOLDER_TEST_FRACTION, seed + 1)
            train_src, test_src = Subset(full, kept), Subset(full, held)
            test_desc = (f"stratified {FOLDER_TEST_FRACTION:.0%} of {root} (seed {seed + 1}); "
                         "pass --test-root for a real test set")
    else:
        train_src = build_source(name, root, "train", download)
        require_labels(train_src, protocol, where + " (train split)")
        test_src = build_source(name, root, "test", download)
        require_labels(test_src, protocol, where + " (test split)")
        test_desc = "test split"
    train_idx = random_subset(len(train_src), subset, seed)
    test_idx = random_subset(len(test_src), test_subset, seed + 2)
    train = Subset(train_src, train_idx) if len(train_idx) < len(train_src) else train_src
    test = Subset(test_src, test_idx) if len(test_idx) < len(test_src) else test_src
    fit, val = stratified_holdout(np.asarray(train.labels), val_fraction, seed + 3)
    num_classes = int(max(np.max(train.labels), np.max(test.labels))) + 1
    base = f"{name}|{root}|{spec.size}|{test_root}|{seed}"
    keys = {"train": f"{base}|train|{len(train_src)}|{_digest(train_idx)}",
            "test": f"{base}|test|{len(test_src)}|{_digest(test_idx)}"}
    info = {"name": name, "root": root, "image_size": spec.size, "train_images": len(train),
            "train_fit": len(fit), "val_images": len(val), "test_images": len(test), "test": test_desc,
            "subset": subset, "test_subset": test_subset, "val_fraction": val_fraction, "seed": seed,
            "num_classes": num_classes}
    return EvalData(name, root, spec, train, test, fit, val, num_classes, keys, info, test_root)
