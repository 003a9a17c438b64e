"""Score descriptors on an Oxford / Paris benchmark: rank the database by inner product
for each query, then mAP and mP@k in each setting of the ground truth."""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np

from ..metrics import RETRIEVAL_KAPPAS, RetrievalScores, mean_average_precision, rank_database
from .groundtruth import GroundTruth


def score_retrieval(queries: np.ndarray, database: np.ndarray, gt: GroundTruth,
                    kappas: Sequence[int] = RETRIEVAL_KAPPAS) -> dict[str, RetrievalScores]:
    """mAP / mP@k of L2-normalised descriptors under ``gt``'s protocol.

    Args:
        queries: ``(Q, D)`` descriptors of the (cropped) query images, in ``gt.qimlist`` order.
        database: ``(N, D)`` descriptors of the database images, in ``gt.imlist`` order.
        gt: the ground truth (:func:`~.groundtruth.load_ground_truth`).
        kappas: the ``k`` of mP@k.

    Returns:
        Setting name (``easy``/``medium``/``hard``, or ``classic``) -> scores. Database
        items with equal similarity are ranked by index (:func:`deepcluster.metrics.rank_database`).
    """
    queries, database = np.asarray(queries, np.float32), np.asarray(database, np.float32)
    if queries.ndim != 2 or database.ndim != 2 or queries.shape[1] != database.shape[1]:
        raise ValueError(f"queries {queries.shape} and database {database.shape} must be (Q, D) and (N, D)")
    if len(queries) != len(gt.qimlist) or len(database) != len(gt.imlist):
        raise ValueError(f"the ground truth has {len(gt.qimlist)} queries and {len(gt.imlist)} database images; "
                         f"got {len(queries)} query and {len(database)} database descriptors")
    rankings = rank_database(queries @ database.T)
    return {name: mean_average_precision(rankings, g, kappas) for name, g in gt.settings().items()}


def _rankings(queries: np.ndarray, database: np.ndarray, k: int, metric: str) -> np.ndarray:
    """``(Q, k)`` database rows best first (``ip``: largest inner product first; ``l2``:
    smallest Euclidean distance first). A top list (``k < N``) comes from exact faiss
    search; a whole ranking from numpy scores and a full sort (faiss's heap is slower
    when ``k`` is the whole database). Exact ties are ordered arbitrarily."""
    if k < len(database):
        import faiss

        index = faiss.IndexFlatIP(database.shape[1]) if metric == "ip" else faiss.IndexFlatL2(database.shape[1])
        index.add(database)
        return index.search(queries, k)[1].astype(np.int64)
    scores = queries @ database.T
    if metric == "l2":  # -|q - x|^2 up to a per-query constant
        scores = 2.0 * scores - (database * database).sum(1)[None, :]
    return np.argsort(-scores, axis=1)


def trapezoid_ap(relevant: np.ndarray, positives: np.ndarray) -> np.ndarray:
    """Per-row AP of boolean relevance lists, revisitop's trapezoidal rule, vectorised.

    The ``j``-th relevant item (0-based) at rank ``r`` adds ``(j/r + (j+1)/(r+1)) / 2``
    (``j/r`` read as 1 at ``r = 0``); the sum is divided by ``positives``. Equal to
    :func:`deepcluster.metrics.average_precision` of the same ranking without junk.

    Args:
        relevant: ``(Q, K)`` bool, whether the item at each rank is relevant.
        positives: ``(Q,)`` the denominators (> 0 where the AP is wanted; NaN elsewhere).
    """
    rel = np.asarray(relevant, dtype=bool)
    j = np.cumsum(rel, axis=1) - 1.0
    r = np.arange(rel.shape[1], dtype=np.float64)[None, :]
    p0 = np.where(r == 0, 1.0, j / np.maximum(r, 1.0))
    terms = np.where(rel, (p0 + (j + 1.0) / (r + 1.0)) / 2.0, 0.0)
    with np.errstate(invalid="ignore", divide="ignore"):
        return np.where(np.asarray(positives) > 0, terms.sum(1) / np.asarray(positives, np.float64), np.nan)


def labelled_map(queries: np.ndarray, database: np.ndarray, query_labels: np.ndarray, database_labels: np.ndarray,
                 top: int | None = None, metric: str = "ip", block: int = 512) -> dict[str, float]:
    """Category-retrieval mAP: relevant = database items of the query's label.

    Rankings are exact (``metric="ip"``: inner product, use L2-normalised rows;
    ``"l2"``: Euclidean distance), ``block`` queries at a time: faiss search for a top
    list, a numpy sort for the whole database.

    - ``top=None`` (mAP@all): AP over the whole ranking, divided by the number of
      database items of the label; equal to :func:`deepcluster.metrics.mean_average_precision`
      of the same rankings.
    - ``top=k`` (mAP@k, as in the hashing literature's mAP@1000): AP of the first ``k``
      results divided by the number of relevant items among them (0 when there is none).

    Queries whose label has no database item are left out. Args: queries ``(Q, D)``,
    database ``(N, D)``, query_labels ``(Q,)``, database_labels ``(N,)``.

    Returns:
        ``{"map": float, "queries": int}`` (queries scored).
    """
    if metric not in ("ip", "l2"):
        raise ValueError(f"metric must be 'ip' or 'l2', got {metric!r}")
    q, db = np.ascontiguousarray(queries, np.float32), np.ascontiguousarray(database, np.float32)
    ql, dl = np.asarray(query_labels), np.asarray(database_labels)
    if q.ndim != 2 or db.ndim != 2 or q.shape[1] != db.shape[1] or len(ql) != len(q) or len(dl) != len(db):
        raise ValueError(f"queries {q.shape} / labels {ql.shape} and database {db.shape} / labels {dl.shape} "
                         "must be (Q, D) / (Q,) and (N, D) / (N,)")
    k = len(db) if top is None else min(int(top), len(db))
    if k < 1:
        raise ValueError(f"top must be >= 1, got {top}")
    counts = {lab: int(c) for lab, c in zip(*np.unique(dl, return_counts=True))}
    aps = []
    for s in range(0, len(q), block):
        rel = dl[_rankings(q[s:s + block], db, k, metric)] == ql[s:s + block, None]
        n = rel.sum(1) if top is not None else np.array([counts.get(lab, 0) for lab in ql[s:s + block]])
        has = np.array([counts.get(lab, 0) > 0 for lab in ql[s:s + block]])
        aps.append(np.where(has, np.nan_to_num(trapezoid_ap(rel, n), nan=0.0), np.nan))
    aps = np.concatenate(aps)
    done = ~np.isnan(aps)
    return {"map": float(aps[done].mean()) if done.any() else float("nan"), "queries": int(done.sum())}
