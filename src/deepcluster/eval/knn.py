"""Cosine k-nearest-neighbour classification on the clustering features (faiss).

Features (fc7 before its ReLU for a network, the pixels for the raw-pixel baseline) are
L2-normalised, so inner product = cosine similarity; the ``k`` most similar reference
images vote:

- **plain** (``knn``): majority vote; ties go to the class with the larger summed
  similarity;
- **weighted** (``knn_weighted``): each neighbour votes ``exp(similarity / T)``,
  ``T = 0.07`` (Wu et al. 2018, as in DINO's ``eval_knn``).

:func:`knn_eval` uses the whole training split as reference and reports on the test
split. :func:`knn_probe` is the cheap version run during training (``--eval-every``).
"""

from __future__ import annotations

import logging
import time
from typing import Any

import numpy as np
import torch

from ..clustering import l2_normalize
from ..distributed import shard_indices
from ..features import eval_mode, extract, make_loader
from ..models import DeepClusterNet
from .context import EvalContext

logger = logging.getLogger(__name__)

K = 20
TEMPERATURE = 0.07


def knn_classify(reference: np.ndarray, ref_labels: np.ndarray, queries: np.ndarray, k: int = K,
                 num_classes: int | None = None, temperature: float = TEMPERATURE,
                 chunk: int = 4096) -> tuple[np.ndarray, np.ndarray]:
    """Cosine k-NN predictions of ``queries`` from a labelled ``reference`` set.

    Args:
        reference: ``(N, D)`` features.
        ref_labels: ``(N,)`` int labels in ``0..num_classes-1``.
        queries: ``(M, D)`` features.
        k: neighbours (clamped to ``N``).
        num_classes: default ``ref_labels.max() + 1``.
        temperature: of the weighted vote.

    Returns:
        ``(plain, weighted)``: ``(M,)`` int64 predictions of the majority vote and of the
        similarity-weighted vote.
    """
    import faiss

    reference = np.asarray(reference, dtype=np.float32)
    queries = np.asarray(queries, dtype=np.float32)
    if reference.ndim != 2 or queries.ndim != 2 or reference.shape[1] != queries.shape[1]:
        raise ValueError(f"reference {reference.shape} and queries {queries.shape} must be (N, D) and (M, D)")
    ref_labels = np.asarray(ref_labels, dtype=np.int64)
    if len(ref_labels) != len(reference):
        raise ValueError(f"{len(ref_labels)} labels for {len(reference)} reference rows")
    if k < 1:
        raise ValueError(f"k must be >= 1, got {k}")
    k = min(k, len(reference))
    c = int(num_classes or ref_labels.max() + 1)
    index = faiss.IndexFlatIP(reference.shape[1])
    index.add(np.ascontiguousarray(l2_normalize(reference)))
    plain = np.empty(len(queries), dtype=np.int64)
    weighted = np.empty(len(queries), dtype=np.int64)
    for start in range(0, len(queries), chunk):
        q = np.ascontiguousarray(l2_normalize(queries[start:start + chunk]))
        sim, nn_idx = index.search(q, k)  # (m, k) each, most similar first
        lab = ref_labels[nn_idx]  # (m, k)
        m = len(q)
        cell = (np.arange(m)[:, None] * c + lab).ravel()  # (m*k,) flat (query, class) cells

        def per_class(weights: np.ndarray) -> np.ndarray:  # (m, k) -> (m, c) sums per class
            return np.bincount(cell, weights=weights.ravel(), minlength=m * c).reshape(m, c)

        sim64 = sim.astype(np.float64)
        votes = per_class(np.ones_like(sim64))
        sims = per_class(sim64)  # in [-k, k]: breaks ties of the vote count only
        plain[start:start + m] = (votes + sims / (2 * k + 2)).argmax(1)
        w = np.exp((sim64 - 1.0) / temperature)  # shifted by the largest cosine (1): no overflow
        weighted[start:start + m] = per_class(w).argmax(1)
    return plain, weighted


def knn_eval(ctx: EvalContext, k: int = K, temperature: float = TEMPERATURE, feature: str | None = None,
             write: bool = True) -> dict[str, Any]:
    """k-NN top-1 on the test split, the whole training split as reference.

    Args:
        feature: which feature (default: the clustering feature, ``fc7`` or ``pixels``;
            a network also has ``conv1``... ``conv5`` and ``backbone``, pooled).

    Returns:
        The result (``metrics -> {"knn", "knn_weighted"}``); written to ``knn.json``
        (``knn-<feature>.json`` for another feature).
    """
    t0 = time.perf_counter()
    default = ctx.encoder.clustering_feature
    feature = ctx.encoder.feature(feature)
    train = ctx.store.get("train", [feature])[feature]
    test = ctx.store.get("test", [feature])[feature]
    plain, weighted = knn_classify(train, ctx.data.train_labels, test, k, ctx.data.num_classes, temperature)
    y = ctx.data.test_labels
    metrics = {"knn": float((plain == y).mean()), "knn_weighted": float((weighted == y).mean())}
    logger.info("k-NN (k=%d, %s): test top-1 %.4f, weighted %.4f", k, feature, metrics["knn"], metrics["knn_weighted"])
    out = {**ctx.header("knn"), "feature": feature, "dim": int(train.shape[1]), "k": k, "temperature": temperature,
           "reference_images": len(train), "metrics": metrics, "seconds": time.perf_counter() - t0}
    if write:
        ctx.write("knn" if feature == default else f"knn-{feature}", out)
    return out


def knn_probe(model: DeepClusterNet, dataset, labels: np.ndarray, device: str | torch.device = "cpu", *,
              n_reference: int = 10000, n_query: int = 2000, k: int = K, temperature: float = TEMPERATURE,
              seed: int = 0, batch_size: int = 256, workers: int = 0, amp: str = "none",
              channels_last: bool = False) -> dict[str, float]:
    """The cheap k-NN probe logged during training (``deepcluster train --eval-every N``).

    A fixed random set of ``n_query`` labelled images of ``dataset`` is classified by
    cosine k-NN on the clustering features against a disjoint fixed set of
    ``n_reference`` images of the same data set (labels are read for this measurement
    only; training never sees them). With fewer than ``n_reference + n_query`` images,
    the data set is split 5:1. The same images are drawn every epoch (``seed``).

    Args:
        model: the network (its train/eval mode is restored afterwards).
        dataset: yields ``(image, index)`` without augmentation (the clustering view).
        labels: ``(len(dataset),)`` ints.

    Returns:
        ``{"knn_top1", "knn_weighted_top1", "knn_probe_s"}``.
    """
    t0 = time.perf_counter()
    labels = np.asarray(labels, dtype=np.int64)
    n = len(dataset)
    if n < 2:
        raise ValueError("the k-NN probe needs at least 2 labelled images")
    if n_reference + n_query > n:
        n_query = max(1, n // 6)
        n_reference = n - n_query
    picked = np.random.default_rng(seed).choice(n, n_reference + n_query, replace=False)
    ref, query = np.sort(picked[:n_reference]), np.sort(picked[n_reference:])
    order = np.concatenate([ref, query])
    row = np.full(n, -1, dtype=np.int64)
    row[order] = np.arange(len(order))
    # Under torch.distributed each rank extracts its shard; every rank gets all rows.
    loader = make_loader(dataset, batch_size, workers, sampler=order[shard_indices(len(order))].tolist(), seed=seed)
    with eval_mode(model):  # rows placed by data-set index
        feats = extract(model.forward_features, loader, len(order), model.feature_dim, device, amp, channels_last,
                        desc="knn probe", rows=row)
    ref_f, query_f = feats[:n_reference], feats[n_reference:]
    plain, weighted = knn_classify(ref_f, labels[ref], query_f, k, int(labels.max()) + 1, temperature)
    return {"knn_top1": float((plain == labels[query]).mean()),
            "knn_weighted_top1": float((weighted == labels[query]).mean()),
            "knn_probe_s": time.perf_counter() - t0}
