"""The size rule: the settings that depend on the number of images N, chosen from N.

The ``small-images`` preset was tuned on the 60,000 Fashion-MNIST training images
(experiments/ABLATION.md). Kept unchanged on a folder of 2,000 images it left the
features worse than the random network it started from: 100 clusters of 20 images and
8 SGD steps an epoch over-fit the pseudo-labels. :func:`size_rule` scales what depends
on N from that reference point, so that the preset is unchanged at N = 60,000 and
follows the data below (and above) it; below :data:`BACKBONE_BELOW` images it also
clusters the conv stack's output instead of fc7, whose fully connected layers over-fit
the pseudo-labels of a few thousand images. The measurements that chose the rule are in
docs/RESULTS.md ("Any size of data set") and experiments/SIZES.md.

Pure functions of N: no I/O, no imports of the package (``tests/test_sizing.py``).
"""

from __future__ import annotations

import math
from typing import Any

REFERENCE_IMAGES = 60_000
"""The data size the ``small-images`` preset was tuned at: the rule returns its values there."""
REFERENCE_K = 100
REFERENCE_EPOCHS = 48
REFERENCE_BATCH = 256
REFERENCE_LR = 0.05
REFERENCE_PCA_DIM = 256
IMAGES_PER_PCA_DIM = 50
"""The PCA keeps at most N / 50 dimensions: whitening 256 directions estimated from 2,000
images scales up noise, and k-means on them finds little (docs/RESULTS.md)."""
MIN_PCA_DIM = 8
MIN_K = 10
MIN_BATCH = 32
MIN_STEPS_PER_EPOCH = 32
"""Below this many SGD steps an epoch (8 at 2,000 images and batches of 256), the batch
shrinks (to at least :data:`MIN_BATCH`) so that each clustering is trained on for long
enough; the learning rate follows the batch linearly."""

BACKBONE_BELOW = 30_000
"""Below this many images the run clusters (and offers as its features) the conv stack's
output instead of fc7. fc6 and fc7 start from random weights and are trained only on the
pseudo-labels of N images: at 2,000-10,000 Fashion-MNIST images they over-fit them, and
fc7's kNN ended 1.9-2.5 points below the random network's while the conv stack's output
ended above the random network's (experiments/SIZES.md, section 7). At 60,000 fc7 is 3.1
points above it. The switch sits between the largest size measured failing (10,000) and
the reference (60,000); sizes in between were not measured."""

SIZED_KEYS = ("cluster.k", "cluster.pca_dim", "cluster.feature", "optim.epochs", "optim.batch_size", "optim.lr")
"""The settings :func:`size_rule` chooses (``section.key``)."""


def rule_k(n: int) -> int:
    """Clusters: ``100 * sqrt(N / 60,000)``, at least 10 and at most N / 10 (about 10 images a
    cluster on average at the least; the square root keeps clusters growing with N, as the
    paper's 10,000 clusters for 1.3M images do, slower than N)."""
    k = round(REFERENCE_K * math.sqrt(n / REFERENCE_IMAGES))
    return int(max(1, min(max(MIN_K, k), n // 10)))


def rule_feature(n: int) -> str:
    """What is clustered: ``backbone`` (the conv stack's output) below :data:`BACKBONE_BELOW`
    images, else ``fc7`` (the paper's)."""
    return "backbone" if n < BACKBONE_BELOW else "fc7"


def rule_pca_dim(n: int) -> int:
    """Dimensions of the PCA-whitening before k-means: ``N / 50``, between 8 and 256."""
    return int(min(REFERENCE_PCA_DIM, max(MIN_PCA_DIM, n // IMAGES_PER_PCA_DIM)))


def steps_per_epoch(n: int, batch: int) -> int:
    return math.ceil(n / batch)


def rule_batch(n: int) -> int:
    """Images per SGD step: 256, or the power of two that gives at least
    :data:`MIN_STEPS_PER_EPOCH` steps an epoch, at least :data:`MIN_BATCH`."""
    batch = REFERENCE_BATCH
    while batch > MIN_BATCH and steps_per_epoch(n, batch) < MIN_STEPS_PER_EPOCH:
        batch //= 2
    return batch


def rule_steps(n: int) -> int:
    """SGD steps of the whole run: the reference's 48 epochs at the rule's batch."""
    return REFERENCE_EPOCHS * steps_per_epoch(n, rule_batch(n))


def size_rule(n: int, batch_size: int | None = None) -> dict[str, dict[str, Any]]:
    """The settings of a run on ``n`` images, as config overrides by section.

    ``batch_size``: a batch the user fixed; the epochs then give the rule's number of SGD
    steps at that batch (the learning rate is the rule's, for the user to scale if they wish).
    """
    if n < 1:
        raise ValueError(f"the size rule needs at least one image, got {n}")
    batch = rule_batch(n)
    lr = REFERENCE_LR * batch / REFERENCE_BATCH
    epochs = max(1, math.ceil(rule_steps(n) / steps_per_epoch(n, batch_size or batch)))
    return {"cluster": {"k": rule_k(n), "pca_dim": rule_pca_dim(n), "feature": rule_feature(n)},
            "optim": {"epochs": epochs, "batch_size": batch, "lr": lr}}


def rule_text() -> str:
    """The rule in words, from the constants above (``train --help``)."""
    return (f"k = {REFERENCE_K} sqrt(N / {REFERENCE_IMAGES:,}) in [{MIN_K}, N / 10], PCA N / {IMAGES_PER_PCA_DIM} in "
            f"[{MIN_PCA_DIM}, {REFERENCE_PCA_DIM}], batch {REFERENCE_BATCH} halved until an epoch has "
            f"{MIN_STEPS_PER_EPOCH} steps (at least {MIN_BATCH}), lr {REFERENCE_LR:g} x batch / {REFERENCE_BATCH}, "
            f"{REFERENCE_EPOCHS} epochs, clustering the conv stack's output instead of fc7 below {BACKBONE_BELOW:,} images")


def describe(n: int) -> str:
    """One line: the rule's values at ``n`` images (help texts, logs)."""
    r = size_rule(n)
    o = r["optim"]
    return (f"{n:,} images: k {r['cluster']['k']}, PCA {r['cluster']['pca_dim']}, {o['epochs']} epochs = {rule_steps(n):,} steps of "
            f"{o['batch_size']}, lr {o['lr']:g}, clustering {r['cluster']['feature']}")
