"""Any size of data set: DeepCluster (``--preset small-images``, defaults unchanged across
sizes) against the random network it starts from, on Fashion-MNIST subsets and on a second
data set at its natural size (scikit-learn's 8x8 digits, 1,797 images).

For every size N: train (``deepcluster train --preset small-images --subset N``; the size
rule of ``deepcluster.sizing`` picks k, the PCA, the batch, the learning rate and the
steps), then score the trained network and three random initialisations of the same
architecture (seed 0 is the run's own starting point) with the package's protocols:

- kNN: ``deepcluster eval knn`` (cosine 20-NN on the clustering features; the N training
  images are the reference, the 10,000 test images the queries; digits: a held-out 20 %);
- NMI / ACC: ``deepcluster eval clusters --repeats 5`` (k-means with k = 10 on the test
  split; mean and sd over 5 k-means seeds).

The random networks' spread over the three seeds is the noise the comparison is read
against. Prints a table and writes ``docs/benchmarks/sizes.{json,md}`` (machine included).

    python benchmarks/sizes.py                          # 1k, 2k, 5k, 10k, 60k and digits
    python benchmarks/sizes.py --sizes 1000,2000 --no-digits
    python benchmarks/sizes.py --run 60000=runs/fmnist-full   # an existing full-size run
    python benchmarks/sizes.py --run digits=runs/digits       # an existing digits run

Runs and results are kept under ``--work-dir`` (default ``runs/sizes``): a second call
trains and evaluates only what is missing.
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import time
from pathlib import Path

import numpy as np

from deepcluster.eval import make_random_init
from deepcluster.rundir import RunDir

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "benchmarks"))

RANDOM_SEEDS = (0, 1, 2)
REPEATS = 5


def cli(*args: str) -> None:
    cmd = [sys.executable, "-m", "deepcluster", *args]
    print("$", " ".join(cmd[2:]), flush=True)
    subprocess.run(cmd, check=True)


def write_digits(root: Path) -> Path:
    """scikit-learn's digits as a labelled folder of 28 px PNGs, the images of
    ``final_clustering.DigitsSource``; regenerated when missing: nothing is committed."""
    from final_clustering import DigitsSource

    if (root / "9").is_dir() and len(list(root.glob("*/*.png"))) == 1797:
        return root
    digits = DigitsSource()
    for i, label in enumerate(digits.labels):
        d = root / str(label)
        d.mkdir(parents=True, exist_ok=True)
        digits.load(i).convert("L").save(d / f"{i:04d}.png")
    return root


def finished(run: Path) -> bool:
    """The run's checkpoint has all its epochs (metrics.jsonl has a record per epoch of config.yaml)."""
    rd = RunDir(run)
    return rd.checkpoint.is_file() and rd.config.is_file() and len(rd.read_metrics()) >= rd.read_config().optim.epochs


def random_init(run: Path, seed: int, out: Path) -> Path:
    """The run's architecture with random weights from ``seed`` (seed = the run's: its start)."""
    if not (out / "checkpoint.pt").is_file():
        make_random_init(run, out, seed=seed)
    return out


def newest_result(net: Path, protocol: str) -> dict:
    """The result file ``eval`` wrote last for ``protocol`` on the run's own feature (its name
    depends on the data flags; ``PROTOCOL-FEATURE*.json``, written by ``--feature``, are others)."""
    files = [p for p in (net / "eval").glob(f"{protocol}*.json")
             if p.name == f"{protocol}.json" or p.name.startswith(f"{protocol}--")]
    return json.loads(max(files, key=lambda p: p.stat().st_mtime_ns).read_text())


def score(net: Path, data_flags: list[str]) -> dict[str, float]:
    """kNN and k=10 NMI/ACC (mean, sd over k-means seeds) of one network, via the CLI (cached)."""
    for protocol, extra in (("knn", []), ("clusters", ["--repeats", str(REPEATS)])):
        cli("eval", protocol, "--checkpoint", str(net), "--workers", "0", *data_flags, *extra)
    knn, m = newest_result(net, "knn"), newest_result(net, "clusters")["metrics"]
    return {"knn": float(knn["metrics"]["knn"]), "queries": int(knn["data"]["test_images"]),
            "reference": int(knn["reference_images"]),
            "nmi": float(m["nmi_mean"]), "nmi_sd": float(m["nmi_sd"]), "acc": float(m["acc_mean"]),
            "acc_sd": float(m["acc_sd"])}


def run_size(name: str, slug: str, train_flags: list[str], data_flags: list[str], work: Path,
             run: Path | None) -> dict:
    run = run or work / slug
    t0 = time.time()
    if not finished(run):
        cli("train", "--preset", "small-images", "--output-dir", str(run), *train_flags)
    rd = RunDir(run)
    cfg, metrics = rd.read_config(), rd.read_metrics()
    row = {"name": name, "run": str(run), "images": cfg.size.images or 0,
           "k": cfg.cluster.k, "pca_dim": cfg.cluster.pca_dim, "feature": cfg.cluster.feature, "epochs": cfg.optim.epochs,
           "batch_size": cfg.optim.batch_size, "lr": cfg.optim.lr,
           "train_minutes": sum(m.get("epoch_s", 0.0) for m in metrics) / 60,
           "rankme_first": metrics[0].get("rankme"), "rankme_last": metrics[-1].get("rankme")}
    row["deepcluster"] = score(run, data_flags)
    row["images"] = row["images"] or len(np.load(run / "assignments.npy", mmap_mode="r")[0])
    row["random"] = [score(random_init(run, s, work / f"{slug}-random{s}"), data_flags) for s in RANDOM_SEEDS]
    row["seconds"] = time.time() - t0
    return row


def verdict(row: dict) -> dict:
    """DeepCluster minus the random networks' mean, against their spread (sd over the 3 seeds,
    floored at the binomial standard error of the kNN accuracy on the queries)."""
    rand = row["random"]
    out = {}
    for m in ("knn", "nmi", "acc"):
        v = np.array([r[m] for r in rand])
        sd = float(v.std(ddof=1))
        if m == "knn":
            sd = max(sd, float(np.sqrt(v.mean() * (1 - v.mean()) / row["deepcluster"]["queries"])))
        out[m] = {"delta": row["deepcluster"][m] - float(v.mean()), "random_mean": float(v.mean()), "noise": sd}
    out["knn_ok"] = out["knn"]["delta"] >= -2 * out["knn"]["noise"]
    out["nmi_ok"] = out["nmi"]["delta"] > 0
    return out


def table(rows: list[dict]) -> str:
    lines = ["| data | N | k / PCA / batch / lr / epochs / feature | train min | kNN DC | kNN random (3 seeds) | NMI DC | NMI random | "
             "ACC DC | ACC random | kNN not below | NMI above |", "|---|---:|---|---:|---:|---:|---:|---:|---:|---:|---|---|"]
    for r in rows:
        v, dc = r["verdict"], r["deepcluster"]
        rnd = r["random"]
        lines.append(
            f"| {r['name']} | {r['images']:,} | {r['k']} / {r['pca_dim']} / {r['batch_size']} / {r['lr']:g} / {r['epochs']} "
            f"/ {r.get('feature', 'fc7')} "
            f"| {r['train_minutes']:.1f} | {100 * dc['knn']:.1f} | {100 * v['knn']['random_mean']:.1f} ± "
            f"{100 * v['knn']['noise']:.1f} | {dc['nmi']:.3f} ± {dc['nmi_sd']:.3f} | "
            f"{v['nmi']['random_mean']:.3f} ({', '.join(format(x['nmi'], '.3f') for x in rnd)}) | "
            f"{100 * dc['acc']:.1f} | {100 * v['acc']['random_mean']:.1f} | "
            f"{'yes' if v['knn_ok'] else 'NO'} ({100 * v['knn']['delta']:+.1f}) | "
            f"{'yes' if v['nmi_ok'] else 'NO'} ({v['nmi']['delta']:+.3f}) |")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--sizes", default="1000,2000,5000,10000,60000", help="Fashion-MNIST subsets (60000: all)")
    p.add_argument("--no-digits", action="store_true", help="skip the second data set")
    p.add_argument("--run", action="append", default=[], metavar="N=DIR",
                   help="use an existing run for size N (or 'digits=DIR' for the second data set)")
    p.add_argument("--work-dir", type=Path, default=ROOT / "runs" / "sizes")
    p.add_argument("--out", type=Path, default=ROOT / "docs" / "benchmarks" / "sizes")
    args = p.parse_args(argv)
    from machine import machine_info, machine_line

    given = {k: Path(v) for k, v in (x.split("=", 1) for x in args.run)}
    args.work_dir.mkdir(parents=True, exist_ok=True)
    rows = []
    for n in [int(x) for x in args.sizes.split(",") if x]:
        flags = [] if n == 60000 else ["--subset", str(n)]
        row = run_size(f"Fashion-MNIST {n:,}", f"fmnist-{n}", flags, ["--data", "fashion-mnist", *flags], args.work_dir,
                       given.get(str(n)))
        rows.append(row)
    if not args.no_digits:
        digits = write_digits(args.work_dir / "digits-data")
        flags = ["--data", "folder", "--data-root", str(digits)]
        row = run_size("digits (scikit-learn)", "digits", [*flags, "--image-size", "28"], flags, args.work_dir,
                       given.get("digits"))
        rows.append(row)
    for row in rows:
        row["verdict"] = verdict(row)
    text = table(rows)
    print(text)
    args.out.parent.mkdir(parents=True, exist_ok=True)
    meta = {"machine": machine_info(), "command": " ".join(["python benchmarks/sizes.py", *(argv or sys.argv[1:])])}
    args.out.with_suffix(".json").write_text(json.dumps({"_meta": meta, "rows": rows}, indent=1, default=float))
    args.out.with_suffix(".md").write_text(f"{text}\n\nMachine: {machine_line(meta['machine'])}\n")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
