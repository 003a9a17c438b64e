"""Clustering quality: k-means with k = number of classes on the learned features, scored
against the labels (NMI, ARI, and accuracy under the best one-to-one matching), and the
same scores for the run's own training-time assignments (at its k).

Two preprocessings of the clustering features (fc7 before ReLU, or pixels):

- ``whitened``: PCA to the run's ``pca_dim`` with whitening, then L2, as in training
  (PCA fitted on the training split's features);
- ``l2``: L2 normalisation only.

Both are reported. Which one the table shows (``best``) is decided on the held-out
validation part of the training split (higher NMI there), never on the reported split.
k-means runs ``n_init`` times with different seeds and keeps the lowest k-means loss
(an unsupervised choice).
"""

from __future__ import annotations

import logging
import time
from typing import Any

import numpy as np

from ..clustering import PCAWhitening, kmeans, l2_normalize
from ..checkpoint import saved_config
from ..data import training_source
from ..metrics import ari, contingency, hungarian_accuracy, nmi
from .context import EvalContext

logger = logging.getLogger(__name__)

PREPROCESSINGS = ("whitened", "l2")


def cluster_scores(pred: np.ndarray, truth: np.ndarray) -> dict[str, float]:
    """``{"nmi", "ari", "acc", "purity"}`` of cluster assignments ``pred`` vs labels ``truth``.

    ``acc``: one-to-one (Hungarian) matching, unmatched clusters count as errors;
    ``purity``: each cluster mapped to its majority class (many-to-one), the fairer
    number when there are more clusters than classes.
    """
    table = contingency(pred, truth)
    purity = float(table.max(1).sum() / table.sum())
    return {"nmi": float(nmi(pred, truth)), "ari": float(ari(pred, truth)),
            "acc": float(hungarian_accuracy(pred, truth)), "purity": purity}


def best_kmeans(x: np.ndarray, k: int, n_init: int = 3, niter: int = 20, seed: int = 0) -> np.ndarray:
    """Assignments ``(N,)`` of the lowest-loss of ``n_init`` k-means runs on ``x`` ``(N, D)``."""
    best = None
    for i in range(n_init):
        res = kmeans(np.ascontiguousarray(x, dtype=np.float32), k, niter=niter, seed=seed + i, backend="faiss")
        if best is None or res.loss < best.loss:
            best = res
    return best.assignments


def _training_source_labels(ctx: EvalContext) -> np.ndarray | None:
    """Labels of the images the run clustered, in its order (``None`` if unavailable)."""
    try:
        cfg = saved_config(ctx.state or {})
        src = training_source(cfg.data, cfg.run.seed, download=False)
    except (ValueError, OSError) as e:
        logger.warning("training-time assignments not scored: cannot open the run's data (%s)", e)
        return None
    return None if src.labels is None else np.asarray(src.labels)


def clusters_eval(ctx: EvalContext, split: str = "test", n_init: int = 3, niter: int = 20,
                  pca_dim: int | None = None, write: bool = True, feature: str | None = None,
                  repeats: int = 1) -> dict[str, Any]:
    """k-means (k = number of classes) on ``split``'s features; training-time assignments.

    Args:
        split: ``test`` (default) or ``train``: the images clustered and scored.
        n_init: k-means restarts (lowest loss kept).
        pca_dim: PCA dimension of the ``whitened`` variant (default: the run's, else 256).
        feature: which feature (default: the clustering feature; see :func:`knn_eval`).
        repeats: k-means draws on the chosen preprocessing, draw ``r`` seeded
            ``seed + r * n_init`` (draw 0 is the protocol's, whose scores ``nmi`` / ``acc`` /
            ``ari`` stay); with more than one, ``nmi_mean`` / ``nmi_sd`` (sample standard
            deviation) and the same for ``acc`` and ``ari`` are added, and every draw's
            scores are listed under ``repeats``. The preprocessing choice is not redrawn.

    Returns:
        The result (``metrics -> {"nmi", "acc", "ari", "purity"}`` of the variant chosen on
        validation, and ``<variant>_nmi`` ... for both); written to ``clusters.json``.
    """
    if n_init < 1 or repeats < 1:
        raise ValueError(f"eval clusters: --n-init and --repeats must be >= 1, got {n_init} and {repeats}")
    t0 = time.perf_counter()
    default = ctx.encoder.clustering_feature
    feature = ctx.encoder.feature(feature)
    k = ctx.data.num_classes
    train = np.asarray(ctx.store.get("train", [feature])[feature], dtype=np.float32)
    evald = train if split == "train" else np.asarray(ctx.store.get(split, [feature])[feature], dtype=np.float32)
    truth = ctx.data.train_labels if split == "train" else ctx.data.test_labels
    pca_dim = pca_dim or (saved_config(ctx.state).cluster.pca_dim if ctx.state else 256)
    pca = PCAWhitening(pca_dim, whiten=True, normalize=True).fit(train)
    prep = {"whitened": pca.transform, "l2": l2_normalize}
    val = ctx.data.val
    variants: dict[str, Any] = {}
    for name in PREPROCESSINGS:
        f = prep[name]
        val_pred = best_kmeans(f(train[val]), k, n_init, niter, ctx.seed)
        pred = best_kmeans(f(evald), k, n_init, niter, ctx.seed)
        variants[name] = {"val": cluster_scores(val_pred, ctx.data.train_labels[val]), **cluster_scores(pred, truth)}
        logger.info("k-means k=%d on %s %s features: NMI %.4f ACC %.4f ARI %.4f (val NMI %.4f)", k, split, name,
                    variants[name]["nmi"], variants[name]["acc"], variants[name]["ari"], variants[name]["val"]["nmi"])
    best = max(PREPROCESSINGS, key=lambda v: variants[v]["val"]["nmi"])
    metrics = {m: variants[best][m] for m in ("nmi", "acc", "ari", "purity")}
    for v in PREPROCESSINGS:
        metrics.update({f"{v}_{m}": variants[v][m] for m in ("nmi", "acc", "ari")})
    draws = [variants[best]]  # draw 0: the protocol's (seed + 0 * n_init)
    if repeats > 1:
        x = prep[best](evald)
        draws += [cluster_scores(best_kmeans(x, k, n_init, niter, ctx.seed + r * n_init), truth)
                  for r in range(1, repeats)]
        for m in ("nmi", "acc", "ari"):
            values = np.array([d[m] for d in draws])
            metrics[f"{m}_mean"], metrics[f"{m}_sd"] = float(values.mean()), float(values.std(ddof=1))
        logger.info("%d k-means draws on %s features: NMI %.4f +- %.4f, ACC %.4f +- %.4f (mean +- sd)", repeats, best,
                    metrics["nmi_mean"], metrics["nmi_sd"], metrics["acc_mean"], metrics["acc_sd"])

    training: dict[str, Any] | None = None
    hist = (ctx.state or {}).get("assignments")
    if hist is not None and len(hist) > 0:
        labels = _training_source_labels(ctx)
        last = np.asarray(hist[-1]).astype(np.int64)
        if labels is not None and len(labels) == len(last):
            training = {"k": int(last.max()) + 1, "epoch": int((ctx.state or {}).get("epoch", len(hist))),
                        **cluster_scores(last, labels)}
            metrics.update({f"train_assign_{m}": training[m] for m in ("nmi", "acc", "ari", "purity")})
            logger.info("training-time assignments (k=%d): NMI %.4f ACC %.4f ARI %.4f purity %.4f", training["k"],
                        training["nmi"], training["acc"], training["ari"], training["purity"])
        elif labels is not None:
            logger.warning("training-time assignments cover %d images but the run's data has %d; not scored",
                           len(last), len(labels))
    out = {**ctx.header("clusters"), "feature": feature, "split": split, "k": k, "pca_dim": pca.projection.shape[1],
           "n_init": n_init, "niter": niter, "variants": variants, "best": best, "training_assignments": training,
           "repeats": [{m: d[m] for m in ("nmi", "acc", "ari")} for d in draws],
           "metrics": metrics, "seconds": time.perf_counter() - t0}
    if write:
        ctx.write("clusters" if feature == default else f"clusters-{feature}", out, split=split)
    return out
