"""Peak memory of the bounded-memory PCA stream (fit on a sample, project batch by batch).

Streams N fake D-dimensional "fc7 features" (a low-rank signal plus noise, generated
batch by batch from a seed, so no N x D array ever exists) through
:class:`deepcluster.clustering.StreamingPCA` exactly as the training loop does: the
sample's rows first (buffered, then fitted on), then every other row, projected to
``pca_dim`` and stored. Prints the peak resident set size next to what holding the
full-width features would need, and writes a Markdown table.

    python benchmarks/memory.py                   # N=1,000,000 x 4096 -> 256 (~5 min on 2 cores)
    python benchmarks/memory.py --quick           # N=200,000 x 1024 -> 256, sample 20,000 (seconds)
    python benchmarks/memory.py --feature-dtype float16

Peak RSS is ``ru_maxrss`` of this process (Linux: KiB), measured once at the end; the
baseline is the RSS after imports and after the generator's fixed matrices exist. RSS
also counts the pages of torch's shared libraries that happen to be touched, which vary
from run to run by hundreds of MiB on a busy machine; the data arrays are *anonymous*
memory, so the figure the claims rest on is the peak of ``RssAnon`` (sampled every 5 ms
by a thread) above its baseline.
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import sys
import threading
import time
from pathlib import Path

os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")  # see benchmarks/kmeans.py

import numpy as np  # noqa: E402
import torch  # noqa: E402

from deepcluster.clustering import PCAWhitening, StreamingPCA, resolve_pca_sample, sample_indices  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]


def rss_mb() -> float:
    """Current resident set size in MiB (from /proc; Linux)."""
    with open("/proc/self/statm") as f:
        pages = int(f.read().split()[1])
    return pages * resource.getpagesize() / 2**20


def anon_mb() -> float:
    """Current anonymous resident memory (``RssAnon``) in MiB; Linux."""
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith("RssAnon:"):
                return int(line.split()[1]) / 1024
    return 0.0


class AnonPeak:
    """Samples :func:`anon_mb` every ``interval`` seconds in a thread; ``peak`` is the max."""

    def __init__(self, interval: float = 0.005) -> None:
        self.interval, self.peak, self._stop = interval, anon_mb(), threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    def _run(self) -> None:
        while not self._stop.is_set():
            self.peak = max(self.peak, anon_mb())
            time.sleep(self.interval)

    def __enter__(self) -> "AnonPeak":
        self._thread.start()
        return self

    def __exit__(self, *exc) -> None:
        self._stop.set()
        self._thread.join()
        self.peak = max(self.peak, anon_mb())


def peak_rss_mb() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # KiB on Linux


class FakeFeatures:
    """Deterministic fake features by index: ``x_i = z_i W + 0.3 e_i`` (rank-``rank`` signal).

    ``batch(idx)`` is a pure function of the indices' block, so the sample pass and the
    projection pass can ask for any rows in any order, as the extraction does.
    """

    def __init__(self, dim: int, rank: int = 64, seed: int = 0) -> None:
        g = torch.Generator().manual_seed(seed)
        self.dim = dim
        self.w = torch.randn(rank, dim, generator=g) / rank**0.5  # (r, D)
        self.scale = torch.linspace(3.0, 0.5, rank)[:, None]  # a decaying spectrum

    def batch(self, idx: np.ndarray) -> np.ndarray:
        g = torch.Generator().manual_seed(int(idx[0]) * 7919 + len(idx))
        z = torch.randn(len(idx), self.w.shape[0], generator=g)
        x = z @ (self.scale * self.w) + 0.3 * torch.randn(len(idx), self.dim, generator=g)
        return x.numpy()


def run(n: int, dim: int, pca_dim: int, pca_sample: int | None, batch: int, dtype: str, seed: int = 0) -> dict:
    gen = FakeFeatures(dim, seed=seed)
    base = rss_mb()
    base_anon = anon_mb()
    monitor = AnonPeak().__enter__()
    sample = sample_indices(n, resolve_pca_sample(n, dim, pca_sample), seed)
    first = np.zeros(n, dtype=bool)
    first[sample] = True
    rest = np.nonzero(~first)[0]
    stream = StreamingPCA(PCAWhitening(pca_dim), n, sample_rows=len(sample), dtype=dtype)
    t0 = time.perf_counter()
    for s in range(0, len(sample), batch):
        idx = sample[s:s + batch]
        stream.add_sample(idx, gen.batch(idx))
    t1 = time.perf_counter()
    stream.fit()
    t2 = time.perf_counter()
    for s in range(0, len(rest), batch):
        idx = rest[s:s + batch]
        stream.add(idx, gen.batch(idx))
    x = stream.result()
    t3 = time.perf_counter()
    peak = peak_rss_mb()
    monitor.__exit__(None, None, None)
    assert x.shape == (n, pca_dim) and np.isfinite(x[: 1000].astype(np.float32)).all()
    mib = 2**20
    return {
        "n": n, "dim": dim, "pca_dim": pca_dim, "pca_sample": len(sample), "feature_dtype": dtype, "batch": batch,
        "baseline_rss_mib": round(base, 1), "peak_rss_mib": round(peak, 1),
        "peak_above_baseline_mib": round(peak - base, 1),
        "peak_anon_above_baseline_mib": round(monitor.peak - base_anon, 1),
        "full_width_mib": round(n * dim * 4 / mib, 1),
        "result_mib": round(x.nbytes / mib, 1),
        "sample_buffer_mib": round(len(sample) * dim * 4 / mib, 1),
        "covariance_mib": round(dim * dim * 8 / mib, 1),
        "sample_pass_s": round(t1 - t0, 1), "fit_s": round(t2 - t1, 1), "project_pass_s": round(t3 - t2, 1),
        "threads": torch.get_num_threads(),
    }


def markdown(r: dict) -> str:
    return "\n".join([
        f"| N x D -> pca_dim | PCA sample | dtype | peak RSS | above baseline | peak anonymous above baseline | full-width features | "
        f"result | sample buffer | covariance | time (sample / fit / project) |",
        "|---|---|---|---|---|---|---|---|---|---|---|",
        f"| {r['n']:,} x {r['dim']} -> {r['pca_dim']} | {r['pca_sample']:,} | {r['feature_dtype']} | "
        f"{r['peak_rss_mib']:,.0f} MiB | {r['peak_above_baseline_mib']:,.0f} MiB | "
        f"{r['peak_anon_above_baseline_mib']:,.0f} MiB | {r['full_width_mib']:,.0f} MiB | "
        f"{r['result_mib']:,.0f} MiB | {r['sample_buffer_mib']:,.0f} MiB | {r['covariance_mib']:,.0f} MiB | "
        f"{r['sample_pass_s']} / {r['fit_s']} / {r['project_pass_s']} s |",
    ])


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--n", type=int, default=1_000_000)
    p.add_argument("--dim", type=int, default=4096)
    p.add_argument("--pca-dim", type=int, default=256)
    p.add_argument("--pca-sample", type=int, default=None, help="default: the training default for N x D")
    p.add_argument("--batch", type=int, default=4096)
    p.add_argument("--feature-dtype", choices=["float32", "float16"], default="float32")
    p.add_argument("--quick", action="store_true", help="N=200,000 x 1024 -> 256, sample 20,000")
    p.add_argument("--out", default=None, help="Markdown file to write (default docs/benchmarks/memory[-quick].md)")
    p.add_argument("--json", action="store_true", help="print the result as JSON too")
    a = p.parse_args(argv)
    if a.quick:
        a.n, a.dim, a.pca_sample = 200_000, 1024, a.pca_sample or 20_000
    r = run(a.n, a.dim, a.pca_dim, a.pca_sample, a.batch, a.feature_dtype)
    md = markdown(r)
    print(md)
    if a.json:
        print(json.dumps(r))
    out = Path(a.out) if a.out else ROOT / "docs" / "benchmarks" / f"memory{'-quick' if a.quick else ''}.md"
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(f"Command: `python benchmarks/memory.py {' '.join(argv if argv is not None else sys.argv[1:])}`"
                   f" ({r['threads']} threads)\n\n{md}\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
