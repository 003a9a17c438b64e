"""Final clustering methods at K = 10 on Fashion-MNIST test images: NMI, ACC and time.

Feature sets (``--sets``; labels are used only in the scores):

- ``pixels``: the 784 grey values, L2-normalised, PCA to 50 dimensions;
- ``random``: fc7 (before its ReLU) of a randomly initialised ``alexnet_small``
  (torch seed 0, eval mode, the clustering transform), L2-normalised, PCA to 50;
- ``trained``: the same fc7 of a trained run's network (``--checkpoint``, loaded with
  ``deepcluster.checkpoint.load_model``), L2-normalised, PCA to 50;
- ``digits-pixels`` / ``digits-random``: the same two untrained sets on a second data
  set, scikit-learn's 8x8 digits (``load_digits``, 1,797 images, 10 classes; the 64
  values, or the image scaled to 28 px through the same random network).

PCA is fitted on the same images. Nothing is tuned: every method of ``FINAL_METHODS``
runs with its fixed defaults and seeds ``0..seeds-1``; ``merge`` merges a k-means at
k = 100 (seeded the same; what a DeepCluster epoch would cluster at), whose time is not
counted. Times are the CPU seconds of the process during the call
(``time.process_time``; the wall time, also recorded, depends on what else the machine
runs). Single process, one thread:

    OMP_NUM_THREADS=1 NUMBA_NUM_THREADS=1 PYTHONPATH=src python benchmarks/final_clustering.py \
        [--checkpoint runs/fmnist-preset/checkpoint.pt] [--sets ...] [--update]

Prints a Markdown table and writes ``docs/benchmarks/final_clustering.json``
(``--update`` keeps the sets and methods already there that this call does not measure).
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
from PIL import Image  # noqa: E402

from deepcluster.checkpoint import load_model  # noqa: E402
from deepcluster.data import IndexedDataset, build_source, cluster_transform, image_spec  # noqa: E402
from deepcluster.features import eval_mode, extract  # noqa: E402
from deepcluster.io import write_text  # noqa: E402
from deepcluster.metrics import hungarian_accuracy, nmi  # noqa: E402
from deepcluster.models import create_model  # noqa: E402

sys.path.insert(0, str(Path(__file__).resolve().parent))
from machine import machine_info, machine_line  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]
K = 10
K_FINE = 100
PCA_DIM = 50
SETS = ["pixels", "random", "trained", "digits-pixels", "digits-random", "digits-trained"]


def pixel_features(source) -> np.ndarray:
    """``(N, 784)`` float32 grey values in [0, 1]."""
    return np.stack([np.asarray(source.load(i).convert("L"), dtype=np.float32).ravel() / 255.0
                     for i in range(len(source))])


def network_fc7(model, source, batch_size: int = 500, data: str = "fashion-mnist") -> np.ndarray:
    """``(N, fc_dim)`` fc7 before its ReLU of ``model`` (eval mode) on the images of
    ``source`` through the clustering transform of data set ``data`` (at 28 px)."""
    data = IndexedDataset(source, cluster_transform(image_spec(data, 28)))
    loader = torch.utils.data.DataLoader(data, batch_size=batch_size, shuffle=False)
    with eval_mode(model):
        return extract(model.forward_fc7, loader, len(source), model.fc_dim, desc="fc7")


def random_fc7(source, seed: int = 0) -> np.ndarray:
    """fc7 of an untrained ``alexnet_small`` (torch seed ``seed``)."""
    torch.manual_seed(seed)
    return network_fc7(create_model("alexnet_small", num_clusters=K_FINE), source)


class DigitsSource:
    """scikit-learn's 8x8 digits as 28 px RGB images of grey (bilinear; 16 grey levels to 255)."""

    name = "digits"

    def __init__(self) -> None:
        from sklearn.datasets import load_digits

        bunch = load_digits()
        self.values, self.labels = bunch.data.astype(np.float32) / 16.0, bunch.target.astype(np.int64)

    def __len__(self) -> int:
        return len(self.labels)

    def load(self, index: int) -> Image.Image:
        img = Image.fromarray(np.uint8(np.round(self.values[index].reshape(8, 8) * 255)), mode="L")
        return img.resize((28, 28), Image.BILINEAR).convert("RGB")  # as the torchvision sources give


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


def table(results: dict[str, dict]) -> str:
    """Markdown: one row per feature set and method: NMI, ACC, CPU seconds (mean ± sd)."""
    rows = ["| features | method | NMI | ACC | CPU s |", "|---|---|---|---|---|"]
    for name, entry in results.items():
        for method, r in entry["methods"].items():
            r = r["summary"]
            rows.append(f"| {name} | {method} | {r['nmi']:.3f} ± {r['nmi_sd']:.3f} | {r['acc']:.3f} ± {r['acc_sd']:.3f} "
                        f"| {r['cpu_seconds']:.1f} ± {r['cpu_seconds_sd']:.1f} |")
    return "\n".join(rows)


def trained_fc7(checkpoint: Path, source) -> tuple[np.ndarray, dict]:
    """fc7 of the network saved in ``checkpoint`` (through its own data set's transform) and
    what it was (epochs trained)."""
    model, state = load_model(checkpoint)
    data = (state.get("meta") or {}).get("data") or "fashion-mnist"
    return network_fc7(model, source, data=data), {"checkpoint": str(checkpoint), "epochs_trained": state.get("epoch")}


def feature_sets(names: list[str], n: int | None, checkpoint: Path | None, digits_checkpoint: Path | None = None):
    """``name -> () -> (features (N, 50), labels (N,), notes)`` for the sets asked."""
    fmnist = build_source("fashion-mnist", split="test") if any(not x.startswith("digits") for x in names) else None
    m = min(n or len(fmnist), len(fmnist)) if fmnist is not None else 0
    y = np.asarray(fmnist.labels)[:m] if fmnist is not None else None
    digits = DigitsSource() if any(x.startswith("digits") for x in names) else None
    makers = {
        "pixels": lambda: (reduce(pixel_features(fmnist)[:m]), y, {}),
        "random": lambda: (reduce(random_fc7(fmnist)[:m]), y, {}),
        "trained": lambda: (lambda f, note: (reduce(f[:m]), y, note))(*trained_fc7(checkpoint, fmnist)),
        "digits-pixels": lambda: (reduce(digits.values), digits.labels, {}),
        "digits-random": lambda: (reduce(random_fc7(digits)), digits.labels, {}),
        "digits-trained": lambda: (lambda f, note: (reduce(f), digits.labels, note))(
            *trained_fc7(digits_checkpoint, digits)),
    }
    if "trained" in names and checkpoint is None:
        raise SystemExit("--sets trained needs --checkpoint")
    if "digits-trained" in names and digits_checkpoint is None:
        raise SystemExit("--sets digits-trained needs --digits-checkpoint")
    return {name: makers[name] for name in names}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--seeds", type=int, default=5)
    ap.add_argument("--subset", type=int, default=None, help="first N test images only (a quick check)")
    ap.add_argument("--methods", nargs="+", default=list(FINAL_METHODS), choices=list(FINAL_METHODS))
    ap.add_argument("--sets", nargs="+", default=None, choices=SETS,
                    help="feature sets (default: all; 'trained' only with --checkpoint)")
    ap.add_argument("--checkpoint", type=Path, default=None, help="a trained run's checkpoint.pt (or run directory)")
    ap.add_argument("--digits-checkpoint", type=Path, default=None,
                    help="a run trained on the digits folder of benchmarks/sizes.py (set digits-trained)")
    ap.add_argument("--update", action="store_true",
                    help="keep the sets and methods of --out that this call does not measure")
    ap.add_argument("--out", type=Path, default=ROOT / "docs/benchmarks/final_clustering.json")
    args = ap.parse_args()
    sets = args.sets or [x for x in SETS if (x != "trained" or args.checkpoint)
                         and (x != "digits-trained" or args.digits_checkpoint)]
    t0 = time.perf_counter()
    old = json.loads(args.out.read_text()) if args.update and args.out.exists() else {}
    results: dict[str, dict] = dict(old.get("results", {}))
    for name, make in feature_sets(sets, args.subset, args.checkpoint, args.digits_checkpoint).items():
        x, labels, notes = make()
        kept = results.get(name, {}).get("methods", {})  # --update: the methods this call does not run stay
        results[name] = {"images": int(x.shape[0]), **notes, "methods": kept}
        for method in args.methods:
            runs = [run_method(method, x, labels, seed) for seed in range(args.seeds)]
            results[name]["methods"][method] = {"runs": runs, "summary": summary(runs)}
            s = results[name]["methods"][method]["summary"]
            print(f"{name:14s} {method:12s} NMI {s['nmi']:.3f}±{s['nmi_sd']:.3f} "
                  f"ACC {s['acc']:.3f}±{s['acc_sd']:.3f} CPU {s['cpu_seconds']:.1f}±{s['cpu_seconds_sd']:.1f} s "
                  f"(wall {s['seconds']:.1f} s)", flush=True)
    text = table(results)
    print(text)
    info = machine_info()
    payload = {"cpu_seconds": time.process_time(), "k": K, "k_fine": K_FINE, "pca_dim": PCA_DIM,
               "seeds": args.seeds, "threads": os.environ.get("OMP_NUM_THREADS"), "results": results, "table": text,
               "total_seconds": time.perf_counter() - t0, "machine": info, "machine_line": machine_line(info),
               "runs": old.get("runs", []) + [{"sets": sets, "methods": args.methods, "seeds": args.seeds,
                                               "total_seconds": time.perf_counter() - t0,
                                               "machine_line": machine_line(info)}]}
    args.out.parent.mkdir(parents=True, exist_ok=True)
    write_text(args.out, json.dumps(payload, indent=2, default=float) + "\n")
    print(f"{machine_line(info)}; total {payload['total_seconds']:.0f} s; wrote {args.out}")


if __name__ == "__main__":
    main()
