"""PCA-whitening fit on wide (4096-d) features: the full eigendecomposition vs the fast fit.

``before``: the fit as it was until issue 23: the float64 covariance (accumulated in
8,192-row chunks) and a full ``numpy.linalg.eigh`` of it, the top ``dim`` pairs kept.
``after``: ``PCAWhitening(dim).fit(x)`` as it is now: the ``n x n`` Gram matrix when
``n < D``, else the covariance and the top-``dim`` solver (``scipy.linalg.eigh``,
``subset_by_index``, driver ``evx``). Agreement columns: the largest relative eigenvalue
difference and the smallest cosine of the principal angles between the two fitted
``dim``-dimensional subspaces. ``--solvers`` also times the eigensolvers alone on the
``D x D`` covariance of 2,000 rows (numpy, torch, scipy evr/evx subsets).

Features: ``relu(z W)``, ``z`` an ``(N, 512)`` Gaussian with geometrically decaying
scales and ``W`` a fixed random ``(512, 4096)`` map: non-negative, correlated, full rank,
like fc7 activations. BLAS threads: set ``OMP_NUM_THREADS`` (printed in the header).

    OMP_NUM_THREADS=1 python benchmarks/pca_fit.py                 # N = 64, 2,000, 50,000: ~3 min
    OMP_NUM_THREADS=1 python benchmarks/pca_fit.py --sizes 64 2000 --solvers
"""

from __future__ import annotations

import argparse
import os
import time

import numpy as np

from deepcluster.clustering import PCAWhitening


def wide_features(n: int, d: int = 4096, latent: int = 512, seed: int = 0) -> np.ndarray:
    """``(n, d)`` float32 fc7-like rows (see the module docstring), built in chunks."""
    rng = np.random.default_rng(seed)
    w = (rng.standard_normal((latent, d)) / np.sqrt(latent)).astype(np.float32)
    scales = np.geomspace(3.0, 0.03, latent).astype(np.float32)
    x = np.empty((n, d), dtype=np.float32)
    for start in range(0, n, 8192):
        z = rng.standard_normal((min(8192, n - start), latent)).astype(np.float32) * scales
        x[start:start + len(z)] = np.maximum(z @ w, 0.0)
    return x


def covariance(x: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Float64 mean ``(D,)`` and covariance ``(D, D)``, accumulated in chunks (the fit's way)."""
    mean = x.mean(0, dtype=np.float64)
    cov = np.zeros((x.shape[1],) * 2)
    for start in range(0, len(x), 8192):
        xc = x[start:start + 8192].astype(np.float64) - mean
        cov += xc.T @ xc
    return mean, cov / (len(x) - 1)


def before_fit(x: np.ndarray, dim: int) -> tuple[np.ndarray, np.ndarray]:
    """The pre-issue-23 fit: full eigendecomposition; ``(eigenvalues (dim,), vectors (D, dim))``."""
    _, cov = covariance(x)
    val, vec = np.linalg.eigh(cov)
    order = np.argsort(val)[::-1][:min(dim, len(x) - 1)]
    return np.clip(val[order], 0, None), vec[:, order]


def timed(fn, *args):
    t = time.perf_counter()
    out = fn(*args)
    return out, time.perf_counter() - t


def fit_table(sizes: list[int], d: int, dim: int) -> None:
    print(f"| N x D -> dim | path (after) | before: cov + full eigh (s) | after: fit (s) | speed-up "
          f"| max rel. eigenvalue diff | min principal cosine |")
    print("|---|---|---|---|---|---|---|")
    for n in sizes:
        x = wide_features(n, d)
        (val_b, vec_b), t_b = timed(before_fit, x, dim)
        pca, t_a = timed(PCAWhitening(dim, normalize=False).fit, x)
        v = pca.projection / np.linalg.norm(pca.projection, axis=0)
        live = val_b > 1e-9 * val_b[0]
        rel = np.abs(pca.eigenvalues[live] - val_b[live]) / val_b[live]
        cos = np.linalg.svd(v[:, live].astype(np.float64).T @ vec_b[:, live], compute_uv=False).min()
        path = "Gram n x n + top-k" if n < d else "cov + top-k"
        print(f"| {n:,} x {d} -> {len(val_b)} | {path} | {t_b:.2f} | {t_a:.2f} | {t_b / t_a:.1f} x "
              f"| {rel.max():.1e} | {cos:.7f} |", flush=True)


def solver_table(d: int, dim: int) -> None:
    import scipy.linalg
    import torch

    _, cov = covariance(wide_features(2000, d))
    solvers = {
        "numpy.linalg.eigh (all pairs, before)": lambda: np.linalg.eigh(cov),
        f"torch.linalg.eigh (all pairs, {torch.get_num_threads()} torch threads)":
            lambda: torch.linalg.eigh(torch.from_numpy(cov)),
        f"scipy.linalg.eigh evr, top {dim}":
            lambda: scipy.linalg.eigh(cov, subset_by_index=[d - dim, d - 1], driver="evr"),
        f"scipy.linalg.eigh evx, top {dim} (after)":
            lambda: scipy.linalg.eigh(cov, subset_by_index=[d - dim, d - 1], driver="evx"),
    }
    print(f"\n| eigensolver on the {d} x {d} covariance of 2,000 rows | seconds |\n|---|---|")
    for name, fn in solvers.items():
        print(f"| {name} | {timed(fn)[1]:.2f} |", flush=True)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--sizes", type=int, nargs="+", default=[64, 2000, 50_000], help="rows N")
    p.add_argument("--dim-in", type=int, default=4096, help="feature width D (default 4096)")
    p.add_argument("--dim", type=int, default=256, help="PCA components (default 256)")
    p.add_argument("--solvers", action="store_true", help="also time the eigensolvers alone")
    args = p.parse_args()
    print(f"OMP_NUM_THREADS={os.environ.get('OMP_NUM_THREADS', 'unset')}, {os.cpu_count()} CPUs visible\n")
    fit_table(args.sizes, args.dim_in, args.dim)
    if args.solvers:
        solver_table(args.dim_in, args.dim)


if __name__ == "__main__":
    main()
