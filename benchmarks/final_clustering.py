"""Final clustering methods at K = 10 on Fashion-MNIST test images: NMI, ACC and time.

Two feature sets, neither trained (rows for trained networks are pending):

- ``pixels``: the 784 grey values, L2-normalised, PCA to 50 dimensions;
- ``random fc7``: fc7 (before its ReLU) of a randomly initialised ``alexnet_small``
  (torch seed 0, eval mode, the clustering transform), L2-normalised, PCA to 50.

PCA is fitted on the same images (no label is used anywhere but in the scores). Every
method of ``FINAL_METHODS`` runs with its fixed defaults and seeds 0, 1, 2; ``merge``
merges a k-means at k = 100 (seeded the same; what a DeepCluster epoch would cluster
at), whose time is not counted. Times are the CPU seconds of the process during the
call (``time.process_time``; the wall time, also recorded, depends on what else the
machine runs). Single process, one thread:

    OMP_NUM_THREADS=1 NUMBA_NUM_THREADS=1 PYTHONPATH=src python benchmarks/final_clustering.py

Prints a Markdown table and writes ``docs/benchmarks/final_clustering.json``.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from pathlib import Path

os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")

import numpy as np  # noqa: E402
import torch  # noqa: E402

from deepcluster.clustering import FINAL_METHODS, PCAWhitening, final_clustering, kmeans, l2_normalize  # noqa: E402
from deepcluster.data import IndexedDataset, build_source, cluster_transform, image_spec  # noqa: E402
from deepcluster.io import write_text  # noqa: E402
from deepcluster.metrics import hungarian_accuracy, nmi  # noqa: E402
from deepcluster.models import create_model  # noqa: E402

sys.path.insert(0, str(Path(__file__).resolve().parent))
from machine import machine_info, machine_line  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]
K = 10
K_FINE = 100
PCA_DIM = 50


def pixel_features(source) -> np.ndarray:
    """``(N, 784)`` float32 grey values in [0, 1]."""
    return np.stack([np.asarray(source.load(i).convert("L"), dtype=np.float32).ravel() / 255.0
                     for i in range(len(source))])


@torch.no_grad()
def random_fc7(source, seed: int = 0, batch_size: int = 500) -> np.ndarray:
    """``(N, fc_dim)`` fc7 before its ReLU of an untrained ``alexnet_small`` (eval mode)."""
    torch.manual_seed(seed)
    model = create_model("alexnet_small", num_clusters=K_FINE).eval()
    data = IndexedDataset(source, cluster_transform(image_spec("fashion-mnist")))
    loader = torch.utils.data.DataLoader(data, batch_size=batch_size, shuffle=False)
    out = np.empty((len(source), model.fc_dim), dtype=np.float32)
    for images, index in loader:
        out[index.numpy()] = model.forward_features(images).numpy()
    return out


def reduce(x: np.ndarray) -> np.ndarray:
    """L2-normalise, then PCA to :data:`PCA_DIM` (no whitening)."""
    z = l2_normalize(x)
    return PCAWhitening(PCA_DIM, whiten=False, normalize=False).fit(z).transform(z)


def run_method(method: str, x: np.ndarray, labels: np.ndarray, seed: int) -> dict[str, float]:
    """Scores and seconds of one method, one seed."""
    opts = {}
    if method == "merge":
        opts["fine_assignments"] = kmeans(l2_normalize(x).astype(np.float32), K_FINE, seed=seed).assignments
    cpu = time.process_time()
    res = final_clustering(x, K, method, seed=seed, **opts)
    cpu = time.process_time() - cpu
    return {"seed": seed, "nmi": nmi(res.assignments, labels), "acc": hungarian_accuracy(res.assignments, labels),
            "cpu_seconds": cpu, "seconds": res.seconds, "min_size": int(res.sizes.min()), "info": res.info}


def summary(runs: list[dict[str, float]]) -> dict[str, float]:
    """Mean and sample sd of NMI, ACC, CPU and wall seconds over the seeds."""
    out = {}
    for m in ("nmi", "acc", "cpu_seconds", "seconds"):
        v = np.array([r[m] for r in runs], dtype=np.float64)
        out[m], out[f"{m}_sd"] = float(v.mean()), float(v.std(ddof=1)) if v.size > 1 else 0.0
    return out


def table(results: dict[str, dict[str, dict]]) -> str:
    """Markdown: one row per method, NMI / ACC / CPU seconds per feature set."""
    sets = list(results)
    head = "| method | " + " | ".join(f"{s} NMI | {s} ACC | {s} CPU s" for s in sets) + " |"
    rows = [head, "|---|" + "---|---|---|" * len(sets)]
    for method in FINAL_METHODS:
        cells = []
        for s in sets:
            r = results[s][method]["summary"]
            cells += [f"{r['nmi']:.3f} ± {r['nmi_sd']:.3f}", f"{r['acc']:.3f} ± {r['acc_sd']:.3f}",
                      f"{r['cpu_seconds']:.1f} ± {r['cpu_seconds_sd']:.1f}"]
        rows.append(f"| {method} | " + " | ".join(cells) + " |")
    return "\n".join(rows)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--seeds", type=int, default=3)
    ap.add_argument("--subset", type=int, default=None, help="first N test images only (a quick check)")
    ap.add_argument("--methods", nargs="+", default=list(FINAL_METHODS), choices=list(FINAL_METHODS))
    ap.add_argument("--out", type=Path, default=ROOT / "docs/benchmarks/final_clustering.json")
    args = ap.parse_args()
    t0 = time.perf_counter()
    source = build_source("fashion-mnist", split="test")
    n = min(args.subset or len(source), len(source))
    labels = np.asarray(source.labels)[:n]
    features = {"pixels": lambda: reduce(pixel_features(source)[:n]),
                "random fc7": lambda: reduce(random_fc7(source)[:n])}
    results: dict[str, dict[str, dict]] = {}
    for name, make in features.items():
        x = make()
        results[name] = {}
        for method in args.methods:
            runs = [run_method(method, x, labels, seed) for seed in range(args.seeds)]
            results[name][method] = {"runs": runs, "summary": summary(runs)}
            s = results[name][method]["summary"]
            print(f"{name:10s} {method:12s} NMI {s['nmi']:.3f}±{s['nmi_sd']:.3f} "
                  f"ACC {s['acc']:.3f}±{s['acc_sd']:.3f} CPU {s['cpu_seconds']:.1f}±{s['cpu_seconds_sd']:.1f} s "
                  f"(wall {s['seconds']:.1f} s)", flush=True)
    text = table(results) if args.methods == list(FINAL_METHODS) else ""
    print(text)
    info = machine_info()
    payload = {"cpu_seconds": time.process_time(), "k": K, "k_fine": K_FINE, "pca_dim": PCA_DIM, "images": n,
               "seeds": args.seeds, "threads": os.environ.get("OMP_NUM_THREADS"), "results": results, "table": text,
               "total_seconds": time.perf_counter() - t0, "machine": info, "machine_line": machine_line(info)}
    args.out.parent.mkdir(parents=True, exist_ok=True)
    write_text(args.out, json.dumps(payload, indent=2, default=float) + "\n")
    print(f"{machine_line(info)}; total {payload['total_seconds']:.0f} s; wrote {args.out}")


if __name__ == "__main__":
    main()
