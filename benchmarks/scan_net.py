"""SCAN through the network (``deepcluster cluster --method scan-net``) at K = 10 on the
Fashion-MNIST test images: NMI, ACC, time, and the k-NN accuracy of each fine-tuned network.

Runs the user's command once per seed, exactly as a user would::

    deepcluster cluster RUN --k 10 --method scan-net --split test --seed S \\
        [--epochs E --selflabel-epochs L] -o WORK/seedS.csv --save-network WORK/seedS
    deepcluster eval knn --checkpoint WORK/seedS          # with --knn

then scores the CSV's groups against the test labels (the labels are read here only).
Prints a Markdown table and writes ``docs/benchmarks/scan_net.json``:

    python benchmarks/scan_net.py --checkpoint runs/fmnist-full [--seeds 5] [--knn] [--work /tmp/scan-net]
"""

from __future__ import annotations

import argparse
import csv
import json
import sys
import time
from pathlib import Path

import numpy as np

from deepcluster.cli import main as cli
from deepcluster.data import build_source
from deepcluster.io import write_text
from deepcluster.metrics import hungarian_accuracy, nmi

sys.path.insert(0, str(Path(__file__).resolve().parent))
from machine import machine_info, machine_line  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]
K = 10


def groups(path: Path) -> np.ndarray:
    with open(path, newline="") as f:
        return np.array([int(r["cluster"]) for r in csv.DictReader(f)], dtype=np.int64)


def one_seed(args: argparse.Namespace, seed: int, labels: np.ndarray) -> dict:
    out, net = args.work / f"seed{seed}.csv", args.work / f"seed{seed}"
    cmd = ["cluster", str(args.checkpoint), "--k", str(K), "--method", "scan-net", "--split", "test",
           "--seed", str(seed), "--workers", str(args.workers), "-o", str(out), "--save-network", str(net)]
    for flag, value in (("--epochs", args.epochs), ("--selflabel-epochs", args.selflabel_epochs)):
        if value is not None:
            cmd += [flag, str(value)]
    t0, c0 = time.perf_counter(), time.process_time()
    if cli(cmd) != 0:
        raise SystemExit(f"failed: deepcluster {' '.join(cmd)}")
    row = {"seed": seed, "seconds": time.perf_counter() - t0, "cpu_seconds": time.process_time() - c0}
    pred = groups(out)
    row.update(nmi=nmi(pred, labels), acc=hungarian_accuracy(pred, labels), min_size=int(np.bincount(pred, minlength=K).min()))
    import torch

    state = torch.load(net / "checkpoint.pt", map_location="cpu", weights_only=True)
    row["info"] = state["scan_net"]
    if args.knn:
        if cli(["eval", "knn", "--checkpoint", str(net), "--workers", str(args.workers)]) != 0:
            raise SystemExit(f"failed: deepcluster eval knn --checkpoint {net}")
        row["knn"] = json.loads((net / "eval" / "knn.json").read_text())["metrics"]["knn"]
    print(f"seed {seed}: NMI {row['nmi']:.4f} ACC {row['acc']:.4f} in {row['seconds']:.0f} s"
          + (f", kNN {row['knn']:.4f}" if "knn" in row else ""), flush=True)
    return row


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--checkpoint", type=Path, required=True, help="a trained run (directory or .pt)")
    ap.add_argument("--seeds", type=int, default=5)
    ap.add_argument("--first-seed", type=int, default=0)
    ap.add_argument("--epochs", type=int, default=None, help="default: the command's")
    ap.add_argument("--selflabel-epochs", type=int, default=None, help="default: the command's")
    ap.add_argument("--knn", action="store_true", help="also the k-NN accuracy of each fine-tuned network")
    ap.add_argument("--workers", type=int, default=1)
    ap.add_argument("--work", type=Path, default=Path("/tmp/scan-net"), help="where the CSVs and networks go")
    ap.add_argument("--out", type=Path, default=ROOT / "docs/benchmarks/scan_net.json")
    args = ap.parse_args()
    args.work.mkdir(parents=True, exist_ok=True)
    labels = np.asarray(build_source("fashion-mnist", split="test").labels, dtype=np.int64)
    runs = [one_seed(args, s, labels) for s in range(args.first_seed, args.first_seed + args.seeds)]
    summary = {}
    for m in ("nmi", "acc", "seconds", "cpu_seconds", *(("knn",) if args.knn else ())):
        v = np.array([r[m] for r in runs], dtype=np.float64)
        summary[m], summary[f"{m}_sd"] = float(v.mean()), float(v.std(ddof=1)) if v.size > 1 else 0.0
    cells = [str(args.checkpoint), str(len(runs)), *(f"{summary[m]:.{d}f} ± {summary[m + '_sd']:.{d}f}" for m, d in
                                                    (("nmi", 3), ("acc", 3), ("seconds", 0), ("knn", 4)) if m in summary)]
    heads = ["checkpoint", "seeds", "NMI", "ACC", "wall s", "kNN"][:len(cells)]
    print("\n| " + " | ".join(heads) + " |\n|" + "---|" * len(heads) + "\n| " + " | ".join(cells) + " |")
    info = machine_info()
    print(machine_line(info))
    result = {"checkpoint": str(args.checkpoint), "k": K, "split": "test", "epochs": args.epochs,
              "selflabel_epochs": args.selflabel_epochs, "runs": runs, "summary": summary,
              "machine": info, "command": " ".join(sys.argv)}
    args.out.parent.mkdir(parents=True, exist_ok=True)
    write_text(args.out, json.dumps(result, indent=1, default=float) + "\n")
    print(args.out)


if __name__ == "__main__":
    main()
