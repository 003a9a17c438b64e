"""k-means wall time: bare faiss, our ``kmeans`` (faiss and torch backends), scikit-learn, GPU.

Data: N points in 256-d drawn around 2,000 random centres and L2-normalised (what the
PCA-whitened, normalised features look like to k-means). Every method runs up to 20
Lloyd iterations on all points (no subsampling) from its own random start and returns
an assignment of every point; each stops early once converged (faiss: the objective no
longer decreases; ours and sklearn: no assignment changes), and the table lists the
iterations run:

- ``faiss``      bare ``faiss.Kmeans(max_points_per_centroid=10**9)`` + the final
                 ``index.search`` that gives the assignments (what the original code did);
- ``ours-faiss`` ``deepcluster.clustering.kmeans(backend="faiss")`` (20 iterations + final
                 assignment, the paper's empty-cluster rule);
- ``ours-torch`` ``kmeans(backend="torch")`` on CPU;
- ``sklearn``    ``KMeans(init="random", n_init=1, max_iter=20, tol=0, algorithm="lloyd")``,
                 skipped where its time, extrapolated linearly in N x k from its last
                 measured run, would exceed ``--sklearn-budget`` seconds (default 600);
- ``ours-torch-cuda`` / ``ours-faiss-gpu`` when a GPU (and GPU faiss) is present.

Targets on CPU: ours-faiss within 1.1 x bare faiss; >= 4 x faster than scikit-learn.
``OMP_WAIT_POLICY`` defaults to ``PASSIVE`` here (set it to ``ACTIVE`` to override).

    python benchmarks/kmeans.py --quick       # N=20k, k=100/500, 10 iterations, best of 3: about a minute
    python benchmarks/kmeans.py               # the full grid (the lead runs it; see the estimate printed by --quick)

Writes ``docs/benchmarks/kmeans[-quick].md`` and ``.json`` (after every row, so a
partial run leaves its results).
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import sys
import time
from pathlib import Path

# OpenMP threads that busy-wait between parallel regions steal the CPU from each other
# (faiss and torch each bring an OpenMP runtime) and from other processes: on a shared
# machine that made faiss 10x slower. Passive waiting costs little on a dedicated one.
os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")

import numpy as np  # noqa: E402
import torch  # noqa: E402

from deepcluster.clustering import faiss_has_gpu, kmeans  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]
FULL_SIZES = (60_000, 200_000, 1_000_000)
FULL_KS = (100, 1_000, 10_000)


def make_data(n: int, d: int = 256, centres: int = 2000, seed: int = 0) -> np.ndarray:
    """``(n, d)`` float32 unit rows around ``centres`` random directions (chunked)."""
    rng = np.random.default_rng(seed)
    c = rng.standard_normal((centres, d)).astype(np.float32)
    x = np.empty((n, d), dtype=np.float32)
    for s in range(0, n, 100_000):
        m = min(100_000, n - s)
        x[s:s + m] = c[rng.integers(0, centres, m)] + 0.7 * rng.standard_normal((m, d), dtype=np.float32)
    x /= np.linalg.norm(x, axis=1, keepdims=True)
    return x


def run_bare_faiss(x: np.ndarray, k: int, niter: int, seed: int) -> tuple[float, float, int]:
    """Seconds, mean squared distance, iterations (faiss stops once the objective stalls)."""
    import faiss

    t0 = time.perf_counter()
    km = faiss.Kmeans(x.shape[1], k, niter=niter, seed=seed, max_points_per_centroid=10**9, verbose=False)
    km.train(x)
    dist, _ = km.index.search(x, 1)
    return time.perf_counter() - t0, float(dist.mean()), len(km.obj)


def run_ours(x: np.ndarray, k: int, niter: int, seed: int, backend: str,
             device: str | None = None) -> tuple[float, float, int]:
    """Seconds, loss, iterations (ours stops at a fixed point: no assignment changed)."""
    xt = torch.from_numpy(x).to(device) if device else x
    if device and device.startswith("cuda"):
        torch.cuda.synchronize()
    t0 = time.perf_counter()
    res = kmeans(xt, k, niter=niter, seed=seed, backend=backend, device=device)
    return time.perf_counter() - t0, res.loss, res.iterations


def run_sklearn(x: np.ndarray, k: int, niter: int, seed: int) -> tuple[float, float, int]:
    """Seconds, inertia / N, iterations (tol=0: sklearn stops when no label changes)."""
    from sklearn.cluster import KMeans

    t0 = time.perf_counter()
    km = KMeans(n_clusters=k, init="random", n_init=1, max_iter=niter, tol=0.0, algorithm="lloyd",
                random_state=seed).fit(x)
    return time.perf_counter() - t0, float(km.inertia_) / len(x), int(km.n_iter_)


def methods(gpu: bool) -> list[str]:
    out = ["faiss", "ours-faiss", "ours-torch", "sklearn"]
    if gpu and torch.cuda.is_available():
        out.append("ours-torch-cuda")
    if gpu and faiss_has_gpu():
        out.append("ours-faiss-gpu")
    return out


def table(rows: list[dict]) -> str:
    meths = sorted({m for r in rows for m in r["seconds"]}, key=lambda m: methods(True).index(m)
                   if m in methods(True) else 99)
    head = ("| N | k | " + " | ".join(f"{m} s" for m in meths) + " | ours-faiss / faiss | sklearn / ours-faiss | "
            "objective (ours-faiss, ours-torch vs faiss) | iterations (" + ", ".join(meths) + ") |")
    lines = [head, "|" + "---|" * (len(meths) + 6)]
    for r in rows:
        s, obj = r["seconds"], r["objective"]
        cells = [f"{s[m]:.2f}" if isinstance(s.get(m), float) else str(s.get(m, "-")) for m in meths]
        measured = lambda *ms: all(isinstance(s.get(m), float) for m in ms)  # noqa: E731
        ratio = f"{s['ours-faiss'] / s['faiss']:.2f}" if measured("ours-faiss", "faiss") else "-"
        sk = f"{s['sklearn'] / s['ours-faiss']:.1f}" if measured("sklearn", "ours-faiss") else "-"
        rel = ", ".join(f"{100 * (obj[m] / obj['faiss'] - 1):+.2f}%" for m in ("ours-faiss", "ours-torch")
                        if m in obj and "faiss" in obj)
        its = ", ".join(str(r.get("iterations", {}).get(m, "-")) for m in meths)
        lines.append(f"| {r['n']:,} | {r['k']:,} | " + " | ".join(cells) + f" | {ratio} | {sk} | {rel} | {its} |")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--quick", action="store_true", help="N=20,000, k=100 and 500, 10 iterations")
    p.add_argument("--sizes", default=",".join(map(str, FULL_SIZES)))
    p.add_argument("--ks", default=",".join(map(str, FULL_KS)))
    p.add_argument("--dim", type=int, default=256)
    p.add_argument("--niter", type=int, default=20)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--repeat", type=int, default=1, help="runs per method, round-robin; the fastest is reported")
    p.add_argument("--methods", default=None, help="comma-separated subset of " + ",".join(methods(True)))
    p.add_argument("--sklearn-budget", type=float, default=600.0, help="skip sklearn runs projected above this (s)")
    p.add_argument("--no-gpu", action="store_true", help="skip the GPU methods even when a GPU is present")
    p.add_argument("--out", default=None, help="output stem (default docs/benchmarks/kmeans[-quick])")
    a = p.parse_args(argv)
    if a.quick:
        a.sizes, a.ks, a.niter, a.repeat = "20000", "100,500", 10, 3
    sizes = [int(v) for v in a.sizes.split(",")]
    ks = [int(v) for v in a.ks.split(",")]
    meths = a.methods.split(",") if a.methods else methods(not a.no_gpu)
    stem = Path(a.out) if a.out else ROOT / "docs" / "benchmarks" / f"kmeans{'-quick' if a.quick else ''}"
    stem.parent.mkdir(parents=True, exist_ok=True)
    env = {"cpu_threads": torch.get_num_threads(), "torch": torch.__version__, "machine": platform.processor() or
           platform.machine(), "gpu": torch.cuda.get_device_name(0) if torch.cuda.is_available() else None,
           "niter": a.niter, "dim": a.dim}
    try:
        import faiss

        env["faiss"] = faiss.__version__
    except ImportError:
        pass
    rows: list[dict] = []
    sk_rate = 0.0  # sklearn seconds per (point x cluster), from its last measured run
    t_start = time.perf_counter()
    for n in sizes:
        x = make_data(n, a.dim, seed=a.seed)
        for k in ks:
            if k > n:
                continue
            row = {"n": n, "k": k, "seconds": {}, "objective": {}, "iterations": {}}
            for m in [m for _ in range(a.repeat) for m in meths]:  # round-robin: load drifts hit all alike
                if m == "sklearn" and sk_rate * n * k > a.sklearn_budget:
                    row["seconds"][m] = f"skipped (~{sk_rate * n * k / 60:.0f} min)"
                    continue
                if m == "faiss":
                    sec, obj, its = run_bare_faiss(x, k, a.niter, a.seed)
                elif m == "ours-faiss":
                    sec, obj, its = run_ours(x, k, a.niter, a.seed, "faiss")
                elif m == "ours-torch":
                    sec, obj, its = run_ours(x, k, a.niter, a.seed, "torch")
                elif m == "ours-torch-cuda":
                    sec, obj, its = run_ours(x, k, a.niter, a.seed, "torch", device="cuda")
                elif m == "ours-faiss-gpu":
                    sec, obj, its = run_ours(x, k, a.niter, a.seed, "faiss-gpu")
                elif m == "sklearn":
                    sec, obj, its = run_sklearn(x, k, a.niter, a.seed)
                    sk_rate = sec / (n * k)
                else:
                    raise SystemExit(f"unknown method {m!r}; choose from {methods(True)}")
                prev = row["seconds"].get(m)
                row["seconds"][m] = min(sec, prev) if isinstance(prev, float) else sec
                row["objective"][m], row["iterations"][m] = obj, its
                print(f"N={n:>9,} k={k:>6,} {m:>16}: {sec:8.2f} s  objective {obj:.5f}  {its} iterations", flush=True)
            rows.append(row)
            stem.with_suffix(".json").write_text(json.dumps({"env": env, "rows": rows}, indent=1))  # before any formatting
            md = table(rows)
            cmd = " ".join(argv if argv is not None else sys.argv[1:])
            stem.with_suffix(".md").write_text(
                f"Command: `python benchmarks/kmeans.py {cmd}` — {a.niter} iterations, D={a.dim}, best of {a.repeat}, "
                f"{env['cpu_threads']} CPU threads ({env['machine']}), torch {env['torch']}, faiss {env.get('faiss')}"
                f"{', GPU ' + env['gpu'] if env['gpu'] else ''}.\n\n{md}\n")
            stem.with_suffix(".json").write_text(json.dumps({"env": env, "rows": rows}, indent=1))
    total = time.perf_counter() - t_start
    print()
    print(table(rows))
    if a.quick:  # flops of a run ~ N k D (niter + 1): scale the measured time to the full grid
        work = sum(n * k for n in sizes for k in ks)
        per = {m: sum(r["seconds"][m] for r in rows if isinstance(r["seconds"].get(m), float)) / work
               for m in ("faiss", "ours-faiss", "ours-torch")}
        full = sum(FULL_SIZES) * sum(FULL_KS) * (20 + 1) / (a.niter + 1)
        est = sum(per.values()) * full
        print(f"\nquick run: {total:.0f} s. Estimated full grid on this machine without sklearn/GPU: "
              f"{est / 3600:.1f} h ({', '.join(f'{m} {v * full / 3600:.1f} h' for m, v in per.items())}); "
              f"sklearn adds at most {len(FULL_KS)} x {len(FULL_SIZES)} x the budget ({a.sklearn_budget:.0f} s).")
    return 0


if __name__ == "__main__":
    sys.exit(main())
