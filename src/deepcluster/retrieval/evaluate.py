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
