"""The faiss image index: self-search, save/load, metadata checks, incremental updates,
near-duplicate groups on planted copies."""

from __future__ import annotations

import numpy as np
import pytest

from deepcluster.retrieval.index import (ImageIndexError, IndexMeta, build_index, load_index, near_duplicates,
                                         remove, save_index, search, stale_paths, update)

META = IndexMeta("abc123", "rmac", 32, {"levels": 3})


def _unit(x):
    return (x / np.linalg.norm(x, axis=1, keepdims=True)).astype(np.float32)


def _data(n=200, d=32, seed=0):
    return _unit(np.random.default_rng(seed).normal(size=(n, d))), [f"img/{i:04d}.jpg" for i in range(n)]


def _stats(n):
    return np.arange(n, dtype=np.int64) + 100, np.full(n, 7, np.int64)


def test_indexed_vectors_find_themselves_first():
    x, paths = _data()
    idx = build_index(x, paths, META, _stats(len(paths)))
    assert idx.kind == "flat"
    scores, rows = search(idx, x, top=5)
    np.testing.assert_array_equal(rows[:, 0], np.arange(len(x)))
    np.testing.assert_allclose(scores[:, 0], 1.0, atol=1e-5)
    # exact search: the scores are the top-5 inner products computed directly
    np.testing.assert_allclose(scores, -np.sort(-(x @ x.T), axis=1)[:, :5], atol=1e-5)


def test_equal_scores_are_ordered_by_row():
    x = _unit(np.array([[1.0, 0.0], [0.0, 1.0], [1.0, 0.0], [1.0, 0.0]]))
    idx = build_index(x, ["a", "b", "c", "d"], IndexMeta("m", "fc7", 2), _stats(4))
    _, rows = search(idx, x[:1], top=4)
    np.testing.assert_array_equal(rows[0], [0, 2, 3, 1])


def test_save_load_round_trip_and_metadata(tmp_path):
    x, paths = _data()
    idx = build_index(x, paths, META, _stats(len(paths)))
    path = tmp_path / "images.dcindex"
    save_index(idx, path)
    back = load_index(path, META)
    assert back.paths == paths and back.meta == META and back.kind == "flat"
    np.testing.assert_array_equal(back.sizes, idx.sizes)
    s0, r0 = search(idx, x[:10], 7)
    s1, r1 = search(back, x[:10], 7)
    np.testing.assert_array_equal(r0, r1)
    np.testing.assert_allclose(s0, s1)
    other = IndexMeta("def456", "fc7", 32, {"levels": 3})
    with pytest.raises(ImageIndexError, match="checkpoint abc123, feature rmac.*checkpoint def456, feature fc7"):
        load_index(path, other)
    with pytest.raises(ImageIndexError, match=r"must be \(N, 32\)"):
        search(back, np.ones((1, 16), np.float32) / 4)
    (tmp_path / "bad").write_bytes(b"DCINDEX1\n\x05\x00\x00\x00\x00\x00\x00\x00{\"a\":")
    with pytest.raises(ImageIndexError, match="not a readable image index"):
        load_index(tmp_path / "bad")


def test_bad_vectors_are_refused():
    x, paths = _data(10)
    with pytest.raises(ImageIndexError, match="not L2-normalised"):
        build_index(x * 2, paths, META, _stats(10))
    with pytest.raises(ImageIndexError, match="distinct path"):
        build_index(x, paths[:9] + paths[:1], META, _stats(10))


def test_incremental_update_replaces_only_changed(tmp_path):
    x, paths = _data(50)
    idx = build_index(x[:40], paths[:40], META, _stats(40))
    new = _unit(np.random.default_rng(5).normal(size=(3, 32)))
    # image 3 changed, images 40 and 41 are new
    update(idx, [paths[3], paths[40], paths[41]], new, (np.array([1, 2, 3]), np.array([9, 9, 9])))
    assert len(idx) == 42 and idx.index.ntotal == 42
    scores, rows = search(idx, new, 1)
    assert [idx.paths[r] for r in rows[:, 0]] == [paths[3], paths[40], paths[41]]
    unchanged = [i for i in range(40) if i != 3]
    _, rows = search(idx, x[unchanged], 1)
    assert [idx.paths[r] for r in rows[:, 0]] == [paths[i] for i in unchanged]
    assert remove(idx, [paths[0], "not/indexed.jpg"]) == 1 and paths[0] not in idx.paths
    save_index(idx, tmp_path / "i")
    assert load_index(tmp_path / "i").paths == idx.paths


def test_stale_paths_by_size_and_mtime(tmp_path):
    files = [tmp_path / f"{i}.jpg" for i in range(3)]
    for f in files:
        f.write_bytes(b"x")
    x = _unit(np.random.default_rng(0).normal(size=(3, 32)))
    idx = build_index(x, [str(f) for f in files], META)
    assert stale_paths(idx, [str(f) for f in files]) == ([], [])
    files[1].write_bytes(b"xyz")
    (tmp_path / "3.jpg").write_bytes(b"new")
    changed, removed = stale_paths(idx, [str(files[1]), str(files[2]), str(tmp_path / "3.jpg")])
    assert changed == [str(files[1]), str(tmp_path / "3.jpg")] and removed == [str(files[0])]


def test_near_duplicate_groups_on_planted_copies():
    rng = np.random.default_rng(3)
    x = rng.normal(size=(300, 64))
    planted = [[0, 100], [5, 150], [7, 200, 250], [11, 299]]
    for group in planted:
        for j in group[1:]:
            x[j] = x[group[0]] + 0.05 * rng.normal(size=64)
    x = _unit(x)
    paths = [f"p{i:03d}" for i in range(300)]
    idx = build_index(x, paths, IndexMeta("m", "rmac", 64), _stats(300))
    sims = x @ x.T
    np.fill_diagonal(sims, -1)
    planted_pairs = {(a, b) for g in planted for a in g for b in g if a < b}
    others = [sims[a, b] for a in range(300) for b in range(a + 1, 300) if (a, b) not in planted_pairs]
    threshold = 0.9
    assert min(sims[a, b] for a, b in planted_pairs) >= threshold > max(others)  # the fixture is what it says
    groups = near_duplicates(idx, threshold)
    assert groups == [[paths[i] for i in planted[2]]] + sorted([[paths[i] for i in g] for g in planted if len(g) == 2])
    # just above the similarity of the least similar two-image group, that group is gone
    weakest = min((tuple(g) for g in planted if len(g) == 2), key=lambda p: sims[p])
    groups = near_duplicates(idx, float(sims[weakest]) + 1e-4)
    assert not any(paths[weakest[0]] in g and paths[weakest[1]] in g for g in groups)


def test_ivfpq_beyond_the_flat_limit(tmp_path):
    rng = np.random.default_rng(0)
    centers = rng.normal(size=(40, 32))
    x = _unit(centers[rng.integers(0, 40, 3000)] + 0.3 * rng.normal(size=(3000, 32)))
    paths = [f"p{i}" for i in range(3000)]
    idx = build_index(x, paths, META, _stats(3000), flat_limit=1000)
    assert idx.kind == "ivfpq"
    _, rows = search(idx, x[:200], 10)
    assert np.mean([i in rows[i] for i in range(200)]) >= 0.9
    save_index(idx, tmp_path / "ivf")
    back = load_index(tmp_path / "ivf", META)
    assert back.kind == "ivfpq" and back.index.nprobe == idx.index.nprobe
    update(back, ["p5", "new"], x[[7, 8]], _stats(2))
    assert len(back) == 3001 and back.index.ntotal == 3001
