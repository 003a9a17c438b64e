"""Retrieval AP / mAP / mP@k (revisited Oxford/Paris protocol) against rankings worked
out by hand in the comments."""

from __future__ import annotations

import numpy as np
import pytest

from deepcluster.metrics import (average_precision, mean_average_precision, precision_at_k, rank_database,
                                 revisited_ground_truth, revisited_map)


def test_ap_trapezoids_by_hand():
    # positives at ranks 0 and 2: (1 + 1)/2 and (1/2 + 2/3)/2, over 2 positives -> 19/24
    assert average_precision([0, 1, 2, 3, 4], [0, 2]) == pytest.approx(19 / 24)
    # positives at ranks 1 and 3: (0 + 1/2)/2 + (1/3 + 2/4)/2 = 1/4 + 5/12, over 2 -> 1/3
    assert average_precision([3, 0, 1, 2, 4], [0, 2]) == pytest.approx(1 / 3)


def test_junk_is_removed_from_the_ranking():
    # junk 3 and 1 removed: [0, 2, 4] -> positives at ranks 0, 1 -> AP 1
    assert average_precision([3, 0, 1, 2, 4], [0, 2], junk=[3, 1]) == pytest.approx(1.0)
    # one junk before the second positive only: [3, 0, 2, 4] -> ranks 1, 2:
    # (0 + 1/2)/2 + (1/2 + 2/3)/2 = 1/4 + 7/12, over 2 -> 5/12
    assert average_precision([3, 0, 1, 2, 4], [0, 2], junk=[1]) == pytest.approx(5 / 12)


def test_positive_missing_from_a_truncated_ranking_counts():
    # positive 5 never retrieved: only rank 0 contributes 1, over 2 positives -> 1/2
    assert average_precision([0, 1], [0, 5]) == pytest.approx(0.5)


def test_precision_at_k_is_capped_at_the_last_positive():
    # positives at 1-based ranks 1 and 3: P@1 = 1; P@5 and P@10 have k capped at 3 -> 2/3
    np.testing.assert_allclose(precision_at_k(np.arange(10), [0, 2]), [1.0, 2 / 3, 2 / 3])
    # with junk 0 removed: positives 2, 5 at ranks [1, 2, 3, 4, 5, ...] -> 2 and 5 ->
    # P@1 = 0, P@5 = 2/5, P@10 capped at 5 -> 2/5
    np.testing.assert_allclose(precision_at_k(np.arange(10), [2, 5], junk=[0]), [0.0, 0.4, 0.4])
    np.testing.assert_allclose(precision_at_k([1, 2], [7]), [0.0, 0.0, 0.0])


def test_ties_are_broken_by_database_index():
    scores = np.array([[0.5, 0.9, 0.5, 0.9], [1.0, 1.0, 1.0, 1.0]])
    np.testing.assert_array_equal(rank_database(scores), [[1, 3, 0, 2], [0, 1, 2, 3]])
    # the same query with database item 2 positive: rank 3 -> (0 + 1/4)/2 = 1/8;
    # item 0 (tied with it, smaller index) ranks first among the two: rank 2 -> (0 + 1/3)/2 = 1/6
    ranking = rank_database(scores)[0]
    assert average_precision(ranking, [2]) == pytest.approx(1 / 8)
    assert average_precision(ranking, [0]) == pytest.approx(1 / 6)
    with pytest.raises(ValueError, match="NaN"):
        rank_database(np.array([[0.1, np.nan]]))


def test_queries_without_positives_are_skipped():
    rankings = np.array([[0, 1, 2, 3, 4], [3, 0, 1, 2, 4], [4, 3, 2, 1, 0]])
    gt = [{"ok": [0, 2]}, {"ok": [], "junk": [1]}, {"ok": [0, 2], "junk": [1]}]
    res = mean_average_precision(rankings, gt)
    # query 3: [4, 3, 2, 0] -> ranks 2, 3: (0 + 1/3)/2 + (1/3 + 2/4)/2 = 1/6 + 5/12 -> 7/24
    np.testing.assert_allclose(res.aps, [19 / 24, np.nan, 7 / 24])
    assert res.map == pytest.approx((19 / 24 + 7 / 24) / 2)
    assert np.isnan(res.precisions[1]).all()
    # P@k of query 3: 1-based ranks 3, 4 -> P@1 0, P@5 capped at 4 -> 2/4, P@10 2/4
    np.testing.assert_allclose(res.mp, ([1, 2 / 3, 2 / 3] + np.array([0, 0.5, 0.5])) / 2)
    empty = mean_average_precision(rankings[:1], [{"ok": []}])
    assert np.isnan(empty.map)


def test_revisited_settings_by_hand():
    gnd = [{"easy": [0], "hard": [2], "junk": [1]}]
    ranking = np.array([[3, 1, 2, 0]])
    res = revisited_map(ranking, gnd)
    # easy: ok [0], junk [1, 2] -> [3, 0]: rank 1 -> 1/4
    # medium: ok [0, 2], junk [1] -> [3, 2, 0]: ranks 1, 2 -> (1/4 + 7/12) / 2 = 5/12
    # hard: ok [2], junk [1, 0] -> [3, 2]: rank 1 -> 1/4
    assert res["easy"].map == pytest.approx(1 / 4)
    assert res["medium"].map == pytest.approx(5 / 12)
    assert res["hard"].map == pytest.approx(1 / 4)
    # easy P@k: positive at 1-based rank 2 -> P@1 0, P@5 and P@10 capped at 2 -> 1/2
    np.testing.assert_allclose(res["easy"].mp, [0.0, 0.5, 0.5])
    hard = revisited_ground_truth(gnd, "hard")[0]
    assert sorted(hard["ok"]) == [2] and sorted(hard["junk"]) == [0, 1]


def test_bad_inputs_are_one_line_errors():
    with pytest.raises(ValueError, match="both positive and junk"):
        average_precision([0, 1, 2], [0, 1], junk=[1])
    with pytest.raises(ValueError, match="at least one positive"):
        average_precision([0, 1], [])
    with pytest.raises(ValueError, match="one row per ground-truth query"):
        mean_average_precision(np.zeros((2, 3), dtype=int), [{"ok": [0]}])
    with pytest.raises(ValueError, match="unknown revisited setting"):
        revisited_ground_truth([], "medium-rare")


def test_score_retrieval_ranks_by_inner_product():
    import numpy as np

    from deepcluster.retrieval import GroundTruth, score_retrieval

    # database 0..3 on the unit circle at 0, 30, 60, 90 degrees; the query at 80 degrees is
    # 80, 50, 20, 10 degrees from them, so the ranking is [3, 2, 1, 0]
    angles = np.deg2rad([0, 30, 60, 90])
    db = np.stack([np.cos(angles), np.sin(angles)], 1)
    q = np.array([[np.cos(np.deg2rad(80)), np.sin(np.deg2rad(80))]])
    gt = GroundTruth("revisited", ["a", "b", "c", "d"], ["q"], np.array([[0, 0, 1, 1.0]]),
                     [{"easy": np.array([1]), "hard": np.array([0]), "junk": np.array([2])}])
    res = score_retrieval(q, db, gt)
    # easy: ok [1], junk [2, 0] -> [3, 1]: rank 1 -> 1/4
    # medium: ok [1, 0], junk [2] -> [3, 1, 0]: ranks 1, 2 -> (1/4 + 7/12) / 2 = 5/12
    # hard: ok [0], junk [2, 1] -> [3, 0]: rank 1 -> 1/4
    assert res["easy"].map == pytest.approx(1 / 4)
    assert res["medium"].map == pytest.approx(5 / 12)
    assert res["hard"].map == pytest.approx(1 / 4)
    with pytest.raises(ValueError, match="1 queries and 4 database images"):
        score_retrieval(q, db[:3], gt)
