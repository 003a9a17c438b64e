"""Bounded-memory PCA: sample fit + batch projection (deepcluster.clustering.streaming)."""

import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from deepcluster.clustering import (PCAWhitening, StreamingPCA, default_pca_sample, resolve_pca_sample,
                                    sample_indices)

ROOT = Path(__file__).resolve().parents[1]


def low_rank(n, d, rank=8, seed=0, noise=0.1):
    """Rows with a rank-``rank`` signal of decaying scale plus isotropic noise."""
    rng = np.random.default_rng(seed)
    w = rng.standard_normal((rank, d)) * np.linspace(4, 1, rank)[:, None]
    return (rng.standard_normal((n, rank)) @ w + noise * rng.standard_normal((n, d)) + 2.0).astype(np.float32)


def stream(x, sample, dim, batch=64, dtype=np.float32, whiten=True):
    """Feed ``x`` through StreamingPCA as the training loop does: sample rows first."""
    sp = StreamingPCA(PCAWhitening(dim, whiten=whiten), len(x), sample_rows=len(sample), dtype=dtype)
    for s in range(0, len(sample), batch):
        sp.add_sample(sample[s:s + batch], x[sample[s:s + batch]])
    sp.fit()
    rest = np.setdiff1d(np.arange(len(x)), sample)
    for s in range(0, len(rest), batch):
        sp.add(rest[s:s + batch], x[rest[s:s + batch]])
    return sp


def test_default_sample_is_everything_when_small_else_20_times_the_dimension():
    assert default_pca_sample(60_000, 1024) == 60_000  # 245 MB: the in-memory fit
    assert default_pca_sample(65_536, 4096) == 65_536  # exactly 1 GiB
    assert default_pca_sample(1_281_167, 4096) == 81_920  # ImageNet: 20 x 4096
    assert default_pca_sample(2_000_000, 256) == 50_000  # 2.05e9 bytes > 1 GiB: the 50k floor
    assert default_pca_sample(3_000_000, 512) == 50_000  # the floor
    assert resolve_pca_sample(1000, 64, None) == 1000
    assert resolve_pca_sample(1000, 64, 5000) == 1000
    with pytest.raises(ValueError, match="--pca-sample must be >= 2"):
        resolve_pca_sample(1000, 64, 1)


def test_sample_indices_are_sorted_distinct_and_seeded():
    a = sample_indices(1000, 100, seed=3)
    assert a.shape == (100,) and np.all(np.diff(a) > 0) and a.min() >= 0 and a.max() < 1000
    np.testing.assert_array_equal(a, sample_indices(1000, 100, seed=3))
    assert not np.array_equal(a, sample_indices(1000, 100, seed=4))
    np.testing.assert_array_equal(sample_indices(50, 80, seed=0), np.arange(50))


def test_whole_sample_equals_the_in_memory_fit_exactly():
    x = low_rank(500, 24)
    ref = PCAWhitening(6).fit_transform(x)
    got = stream(x, np.arange(500), 6).result()
    np.testing.assert_array_equal(got, ref)


def test_sample_fit_projects_every_row_with_the_sample_pca():
    x = low_rank(1200, 16, seed=1)
    sample = sample_indices(1200, 300, seed=0)
    sp = stream(x, sample, 5, batch=50)
    ref = PCAWhitening(5).fit(x[sample]).transform(x)
    np.testing.assert_allclose(sp.result(), ref, rtol=0, atol=1e-6)
    np.testing.assert_allclose(np.linalg.norm(sp.result(), axis=1), 1.0, atol=1e-5)


def test_a_20x_sample_finds_the_same_principal_subspace_as_all_rows():
    d, dim = 32, 8
    x = low_rank(20_000, d, rank=dim, seed=2)
    full = PCAWhitening(dim, whiten=False, normalize=False).fit(x)
    sample = sample_indices(len(x), 20 * d, seed=1)
    part = PCAWhitening(dim, whiten=False, normalize=False).fit(x[sample])
    # cosines of the principal angles between the two dim-dimensional subspaces
    cos = np.linalg.svd(full.projection.T @ part.projection, compute_uv=False)
    assert cos.min() > 0.999
    np.testing.assert_allclose(part.eigenvalues, full.eigenvalues, rtol=0.25)


def test_float16_storage_halves_memory_and_stays_close():
    x = low_rank(400, 20, seed=3)
    s32 = stream(x, sample_indices(400, 200, 0), 8).result()
    s16 = stream(x, sample_indices(400, 200, 0), 8, dtype=np.float16).result()
    assert s16.dtype == np.float16 and s16.nbytes * 2 == s32.nbytes
    np.testing.assert_allclose(s16.astype(np.float32), s32, atol=2e-3)


def test_fit_moments_is_what_fit_computes():
    x = low_rank(300, 12, seed=4)
    a = PCAWhitening(4).fit(x)
    mean = x.mean(0, dtype=np.float64)
    xc = x.astype(np.float64) - mean
    b = PCAWhitening(4).fit_moments(mean, xc.T @ xc / (len(x) - 1), len(x))
    np.testing.assert_allclose(a.projection, b.projection, rtol=1e-5, atol=1e-7)
    np.testing.assert_allclose(a.mean, b.mean)


def test_misuse_is_reported():
    x = low_rank(100, 8)
    sp = StreamingPCA(PCAWhitening(3), 100, sample_rows=10)
    with pytest.raises(RuntimeError, match="before fit"):
        sp.add(np.arange(5), x[:5])
    with pytest.raises(ValueError, match="more than sample_rows=10"):
        sp.add_sample(np.arange(11), x[:11])
    sp.add_sample(np.arange(10), x[:10])
    sp.fit()
    with pytest.raises(RuntimeError, match="after fit"):
        sp.add_sample(np.arange(10, 12), x[10:12])
    sp.add(np.arange(10, 90), x[10:90])
    with pytest.raises(ValueError, match="10 of 100 rows were never added"):
        sp.result()
    with pytest.raises(ValueError, match="float32 or float16"):
        StreamingPCA(PCAWhitening(3), 10, dtype=np.float64)


def test_memory_benchmark_stays_far_below_the_full_width_features(tmp_path):
    """benchmarks/memory.py --quick: 200k x 1024 -> 256, sample 20k. Holding the
    features would take 781 MiB above the baseline; the stream needs the sample
    (78 MiB) and the result (195 MiB) plus allocator slack."""
    p = subprocess.run([sys.executable, str(ROOT / "benchmarks" / "memory.py"), "--quick", "--json",
                        "--out", str(tmp_path / "m.md")], capture_output=True, text=True, timeout=300)
    assert p.returncode == 0, p.stderr
    import json

    r = json.loads(p.stdout.strip().splitlines()[-1])
    assert r["pca_sample"] == 20_000 and r["result_mib"] < 200
    # Anonymous memory (the arrays), not RSS: RSS also counts shared-library pages, which
    # vary by hundreds of MiB between runs on a busy machine (see benchmarks/memory.py).
    assert r["peak_anon_above_baseline_mib"] < 0.75 * r["full_width_mib"]
    assert (tmp_path / "m.md").read_text().count("200,000 x 1024 -> 256") == 1
