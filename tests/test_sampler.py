import numpy as np
import torch

from deepcluster.data import ClusterBalancedSampler, balanced_plan, inverse_size_weights


def skewed(n=10000, seed=0):
    # cluster c has size proportional to 2**c: 1, 2, 4, ... 512 parts, cluster 3 empty
    rng = np.random.default_rng(seed)
    p = 2.0 ** np.arange(10)
    p[3] = 0
    return rng.choice(10, n, p=p / p.sum())


def test_plan_draws_equally_from_every_nonempty_cluster():
    a = skewed()
    counts = np.zeros(10)
    for e in range(20):
        plan = balanced_plan(a, len(a), np.random.default_rng(e))
        assert plan.shape == (len(a),) and plan.dtype == np.int64
        counts += np.bincount(a[plan], minlength=10)
    counts /= 20
    assert counts[3] == 0
    nonempty = np.delete(counts, 3)
    expected = len(a) / 9
    np.testing.assert_allclose(nonempty, expected, rtol=0.02)


def test_large_clusters_are_sampled_without_replacement():
    a = np.repeat([0, 1], [900, 100])
    plan = balanced_plan(a, 1000, np.random.default_rng(0))
    big = plan[a[plan] == 0]
    assert len(np.unique(big)) == len(big)  # no repeats from the large cluster
    assert abs(len(big) - 500) <= 1


def test_sampler_is_deterministic_per_epoch_and_shards_partition_the_plan():
    a = skewed(1001)
    full = ClusterBalancedSampler(a, seed=3)
    full.set_epoch(2)
    plan = full.plan()
    again = ClusterBalancedSampler(a, seed=3)
    again.set_epoch(2)
    assert plan.tolist() == list(again)
    again.set_epoch(3)
    assert plan.tolist() != list(again)
    shards = []
    for r in range(3):
        s = ClusterBalancedSampler(a, seed=3, rank=r, world_size=3)
        s.set_epoch(2)
        shards.append(s.plan())
        assert len(s) == len(shards[-1]) == 334
    merged = np.empty(1002, dtype=np.int64)
    for r in range(3):
        merged[r::3] = shards[r]
    np.testing.assert_array_equal(merged[:1001], plan)


def test_unbalanced_mode_is_a_permutation():
    a = skewed(500)
    s = ClusterBalancedSampler(a, balanced=False)
    assert sorted(s) == list(range(500))


def test_inverse_size_weights_equalise_expected_loss_mass():
    a = skewed()
    w = inverse_size_weights(a, 12)
    sizes = np.bincount(a, minlength=12)
    mass = w.numpy() * sizes
    nonempty = sizes > 0
    np.testing.assert_allclose(mass[nonempty], len(a) / nonempty.sum(), rtol=1e-5)
    assert (w.numpy()[~nonempty] == 0).all()
    assert isinstance(w, torch.Tensor)
