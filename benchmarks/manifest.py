"""Size and speed of the run manifest (``deepcluster.data.manifest``) at scale.

Builds a synthetic manifest of N entries (paths like ``dir123/img_0001234.png``,
1,000 files per directory, sizes and modification times drawn at random), then times
``save`` (deflated, the default, and stored uncompressed), ``load`` and a ``diff``
against a copy with 1 % of the files renamed, removed, added or changed. Prints a
Markdown table (docs/RELIABILITY.md, "File-system hazards").

Usage::

    OMP_NUM_THREADS=1 PYTHONPATH=src .venv/bin/python benchmarks/manifest.py --n 1000000
"""

from __future__ import annotations

import argparse
import tempfile
import time
from pathlib import Path

import numpy as np

from deepcluster.data.columns import write_columns
from deepcluster.data.manifest import Manifest, diff


def synthetic(n: int, seed: int = 0) -> Manifest:
    """``n`` entries ``dir{i // 1000}/img_{i:07d}.png`` with random sizes, times and inodes."""
    rng = np.random.default_rng(seed)
    paths = [f"dir{i // 1000}/img_{i:07d}.png" for i in range(n)]
    sizes = rng.integers(2_000, 200_000, n)
    mtimes = 1_700_000_000_000_000_000 + rng.integers(0, 10**15, n)
    return Manifest(paths, sizes, mtimes, 1000 + rng.permutation(n))


def perturbed(m: Manifest, fraction: float, seed: int = 1) -> Manifest:
    """A copy with ``fraction`` of the rows each renamed, removed, changed, plus as many added."""
    rng = np.random.default_rng(seed)
    k = int(len(m) * fraction)
    rows = rng.permutation(len(m))
    ren, rem, chg = rows[:k], set(rows[k:2 * k].tolist()), rows[2 * k:3 * k]
    paths, sizes, mtimes, inodes = list(m.paths), m.sizes.copy(), m.mtimes_ns.copy(), m.inodes
    for r in ren:
        paths[r] = paths[r].replace("img_", "renamed_")
    sizes[chg] += 1
    keep = [i for i in range(len(m)) if i not in rem]
    paths = [paths[i] for i in keep] + [f"new/img_{i:07d}.png" for i in range(k)]
    return Manifest(paths, np.concatenate([sizes[keep], np.full(k, 7)]), np.concatenate([mtimes[keep], np.arange(k)]),
                    np.concatenate([inodes[keep], np.arange(k)]))


def _timed(fn, repeats: int = 3) -> float:
    best = float("inf")
    for _ in range(repeats):
        t = time.perf_counter()
        fn()
        best = min(best, time.perf_counter() - t)
    return best


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--n", type=int, default=1_000_000, help="entries (default 1,000,000)")
    p.add_argument("--repeats", type=int, default=3, help="timings are the best of this many")
    args = p.parse_args(argv)
    m = synthetic(args.n)
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        deflated, stored = Path(tmp) / "manifest.npz", Path(tmp) / "stored.npz"
        t_save = _timed(lambda: m.save(deflated), args.repeats)
        t_stored = _timed(lambda: write_columns(stored, {"paths": m.paths},
                                                {"sizes": m.sizes, "mtimes_ns": m.mtimes_ns,
                                                                      "inodes": m.inodes}, compress=False),
                          args.repeats)
        t_load = _timed(lambda: Manifest.load(deflated), args.repeats)
        t_load_stored = _timed(lambda: Manifest.load(stored), args.repeats)
        back = Manifest.load(deflated)
        assert back.paths == m.paths and (back.sizes == m.sizes).all() and (back.mtimes_ns == m.mtimes_ns).all()
        rows.append(("deflated (default)", deflated.stat().st_size, t_save, t_load))
        rows.append(("stored (compress=False)", stored.stat().st_size, t_stored, t_load_stored))
    new = perturbed(m, 0.01)
    t = time.perf_counter()
    d = diff(m, new)
    t_diff = time.perf_counter() - t
    raw = sum(len(s) + 1 for s in m.paths) + 24 * len(m)
    print(f"{len(m):,} entries; raw paths + int64 columns: {raw / 1e6:.1f} MB\n")
    print("| format | file size | save | load |\n|---|---|---|---|")
    for name, size, ts, tl in rows:
        print(f"| {name} | {size / 1e6:.1f} MB ({size / len(m):.1f} B/entry) | {ts:.2f} s | {tl:.2f} s |")
    print(f"\ndiff against 1 % renamed, removed, changed and added: {t_diff:.2f} s -> {d.describe()}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
