"""Ablations for small images (issue 6): one change at a time from a base setting, each
run trained on a fixed subset of the training split and scored with ``deepcluster eval``
(k-means with k = classes on the test split: NMI / ACC; cosine k-NN, the subset as
reference). Prints the table and writes ``experiments/ABLATION.md`` (with the commands and the
time each run took) and ``experiments/benchmarks/ablation.json``.

Usage::

    # the default ablation list, 10k-image subset, 8 epochs, two runs at a time
    .venv/bin/python benchmarks/ablation.py --jobs 2

    # chosen variants only (names from --list), more epochs
    .venv/bin/python benchmarks/ablation.py --only base,no-sobel --epochs 12

    # tiny end-to-end check (1k images, 1 epoch, temporary folder, docs untouched)
    .venv/bin/python benchmarks/ablation.py --quick

A variant is the base flags plus its own (later flags win). Finished runs in
``--work-dir`` are reused, so the table can be grown variant by variant; ``random``
is the base network at initialisation (``deepcluster eval baseline random``).
"""

from __future__ import annotations

import argparse
import json
import os
import shlex
import subprocess
import sys
import tempfile
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT / "benchmarks"))
from machine import machine_info, machine_line  # noqa: E402

PAPER = ["--preset", "paper"]
SMALL_BF16 = ["--dropout", "0", "--crop-scale", "0.5", "1", "--amp", "bf16", "--channels-last"]
JM = SMALL_BF16 + ["--jitter", "1", "--head", "matched"]  # the small-images preset's settings (at 6 epochs)


def with_flag(flags: list[str], flag: str, *values: str) -> list[str]:
    """``flags`` with ``flag``'s values replaced in place (appended if absent)."""
    if flag not in flags:
        return flags + [flag, *values]
    i = flags.index(flag)
    j = next((n for n in range(i + 1, len(flags)) if flags[n].startswith("--")), len(flags))
    return flags[:i] + [flag, *values] + flags[j:]


# name -> (what changes, flags added to the base); "base" is the paper's settings.
VARIANTS: dict[str, tuple[str, list[str]]] = {
    "base": ("paper settings (alexnet_small, Sobel, k=100, crop 0.08-1, flip, lr 0.05, PCA 256)", []),
    "no-sobel": ("raw grey input instead of Sobel", ["--no-sobel"]),
    "crop-0.5": ("milder crops: scale 0.5-1", ["--crop-scale", "0.5", "1"]),
    "crop-0.2": ("crops scale 0.2-1", ["--crop-scale", "0.2", "1"]),
    "crop-0.9": ("almost no crop: scale 0.9-1 (the object's size and position kept)", ["--crop-scale", "0.9", "1"]),
    "affine-nocrop": ("no crop (scale 1) + mild random affine (7.5 deg, 5 % shift, 5 deg shear)",
                      ["--crop-scale", "1", "1", "--affine", "0.5"]),
    "affine": ("+ random affine (15 deg, 10 % shift, 10 deg shear), crops 0.5-1",
               ["--affine", "1", "--crop-scale", "0.5", "1"]),
    "erasing": ("+ random erasing p=0.5", ["--erasing", "0.5"]),
    "k10": ("k = 10 (no over-segmentation)", ["--k", "10"]),
    "k30": ("k = 30", ["--k", "30"]),
    "k300": ("k = 300", ["--k", "300"]),
    "pca64": ("PCA to 64 dimensions", ["--pca-dim", "64"]),
    "no-whiten": ("PCA without whitening", ["--no-whiten"]),
    "lr0.01": ("lr 0.01", ["--lr", "0.01"]),
    "lr0.1": ("lr 0.1", ["--lr", "0.1"]),
    "dropout0": ("no dropout in fc6/fc7", ["--dropout", "0"]),
    "batch64": ("batch 64 (4x the steps per epoch)", ["--batch-size", "64"]),
    "dropout0-crop0.5": ("no dropout and crops 0.5-1 together", ["--dropout", "0", "--crop-scale", "0.5", "1"]),
    "balance-weight": ("loss weights instead of the uniform sampler", ["--balance", "weight"]),
    "dropout0-crop0.9": ("no dropout, crops 0.9-1", ["--dropout", "0", "--crop-scale", "0.9", "1"]),
    "dropout0-affine": ("no dropout, no crop, mild affine (0.5)",
                        ["--dropout", "0", "--crop-scale", "1", "1", "--affine", "0.5"]),
    "head-centroids": ("DeepCluster-v2 head: cosine to the fixed centroids / 0.1 instead of a new random "
                       "linear layer each epoch", ["--head", "centroids"]),
    "cluster-backbone": ("k-means on the conv stack's output (fc6's input, 1152-d) instead of fc7; NMI and kNN "
                         "columns then score that feature", ["--cluster-feature", "backbone"]),
    "cosine": ("cosine learning-rate decay over the epochs (0.05 -> 0.003)", ["--lr-schedule", "cosine"]),
    "small-backbone": ("no dropout, crops 0.5-1 (the small-images preset's changes) + k-means on the conv "
                       "stack's output", ["--dropout", "0", "--crop-scale", "0.5", "1", "--cluster-feature", "backbone"]),
    "small-cosine": ("no dropout, crops 0.5-1 + cosine learning-rate decay",
                     ["--dropout", "0", "--crop-scale", "0.5", "1", "--lr-schedule", "cosine"]),
    "width1": ("full-width alexnet_small (width 1)", ["--width", "1"]),
    "small-bf16": ("no dropout, crops 0.5-1, trained and extracted in bfloat16 autocast with channels_last "
                   "(the same epochs in about half the time on an AVX512-BF16 CPU)", SMALL_BF16),
    "small-cosine-bf16": ("no dropout, crops 0.5-1, cosine decay, bfloat16 autocast + channels_last",
                          ["--dropout", "0", "--crop-scale", "0.5", "1", "--lr-schedule", "cosine", "--amp", "bf16",
                           "--channels-last"]),
    "small-bf16-clusterings3": ("small-bf16 + 3 k-means per epoch (own seeds), one head each, loss averaged "
                                "(DeepCluster-v2)", SMALL_BF16 + ["--clusterings", "3"]),
    "small-bf16-width1": ("small-bf16 with the full-width alexnet_small (width 1: twice the channels)",
                          SMALL_BF16 + ["--width", "1"]),
    "small-bf16-centroids": ("small-bf16 + the DeepCluster-v2 centroid head (cosine to the fixed centroids / 0.1)",
                             SMALL_BF16 + ["--head", "centroids"]),
    "small-bf16-centroids-nowhiten": ("small-bf16-centroids with PCA not whitened (DeepCluster-v2 does not whiten)",
                                      SMALL_BF16 + ["--head", "centroids", "--no-whiten"]),
    "small-bf16-projection": ("small-bf16 + k-means on a trained 128-d projection of ReLU(fc7), L2-normalised, "
                              "read by the new random head / 0.1 (DeepCluster-v2); NMI and kNN columns score the "
                              "projection", SMALL_BF16 + ["--cluster-feature", "projection"]),
    "small-bf16-projection-centroids": ("small-bf16-projection with the centroid head (DeepCluster-v2's whole "
                                        "classifier)",
                                        SMALL_BF16 + ["--cluster-feature", "projection", "--head", "centroids"]),
    "small-bf16-jitter": ("small-bf16 + brightness/contrast jitter (strength 1: +-40 %, p 0.8)",
                          SMALL_BF16 + ["--jitter", "1"]),
    "small-bf16-blur": ("small-bf16 + Gaussian blur (p 0.5, 3x3, sigma 0.1-2)", SMALL_BF16 + ["--blur", "0.5"]),
    "small-bf16-head-matched": ("small-bf16, the previous epoch's head kept, its rows moved to the matching new "
                                "clusters, instead of a new random head", SMALL_BF16 + ["--head", "matched"]),
    "small-bf16-bn-recompute": ("small-bf16, batch-norm statistics recomputed on the un-augmented views before "
                                "each extraction (precise BN)", SMALL_BF16 + ["--bn", "recompute"]),
    "small-bf16-balance-none": ("small-bf16 without the uniform sampler over clusters (plain shuffling)",
                                SMALL_BF16 + ["--balance", "none"]),
    "small-bf16-crops2": ("small-bf16 + 2 augmented views of each image per step, both on its pseudo-label "
                          "(multi-crop at one resolution; twice the training compute per epoch)",
                          SMALL_BF16 + ["--crops", "2"]),
    "small-bf16-jitter-matched": ("small-bf16 + jitter (strength 1) + the matched head together", JM),
    "jm-jitter0.5": ("small-bf16-jitter-matched with half the jitter (strength 0.5: +-20 %)",
                     with_flag(JM, "--jitter", "0.5")),
    "jm-jitter2": ("small-bf16-jitter-matched with twice the jitter (strength 2: +-80 %)",
                   with_flag(JM, "--jitter", "2")),
    "jm-crop0.3": ("small-bf16-jitter-matched with stronger crops (scale 0.3-1)",
                   with_flag(JM, "--crop-scale", "0.3", "1")),
    "jm-k30": ("small-bf16-jitter-matched with k = 30", with_flag(JM, "--k", "30")),
    "jm-wd5e-4": ("small-bf16-jitter-matched with weight decay 5e-4 instead of the paper's 1e-5",
                  with_flag(JM, "--weight-decay", "5e-4")),
    "jm-lr0.1": ("small-bf16-jitter-matched with lr 0.1", with_flag(JM, "--lr", "0.1")),
    "jm-nowhiten": ("small-bf16-jitter-matched with PCA not whitened before k-means (the space in which "
                    "k = 10 k-means scores best at evaluation)", with_flag(JM, "--no-whiten")),
    "jm-weps0.01": ("small-bf16-jitter-matched with regularised whitening (eps 0.01 x the largest eigenvalue: "
                    "components weaker than 1 % of the strongest stay damped)", with_flag(JM, "--whiten-eps", "0.01")),
    "jm-weps0.1": ("small-bf16-jitter-matched with regularised whitening (eps 0.1 x the largest eigenvalue)",
                   with_flag(JM, "--whiten-eps", "0.1")),
    "jm-cosine": ("small-bf16-jitter-matched with cosine learning-rate decay over the 6 epochs (as the preset "
                  "over its 48)", with_flag(JM, "--lr-schedule", "cosine")),
    "small-cosine-bf16-clusterings3": ("small-cosine-bf16 + 3 k-means per epoch, one head each",
                                       ["--dropout", "0", "--crop-scale", "0.5", "1", "--lr-schedule", "cosine",
                                        "--amp", "bf16", "--channels-last", "--clusterings", "3"]),
}


def run_cmd(cmd: list[str], log: Path, threads: int) -> float:
    env = {**os.environ, "OMP_NUM_THREADS": str(threads), "MKL_NUM_THREADS": str(threads),
           "OMP_WAIT_POLICY": "PASSIVE"}
    t0 = time.perf_counter()
    with open(log, "a") as f:
        f.write("$ " + shlex.join(cmd) + "\n")
        f.flush()
        p = subprocess.run(cmd, stdout=f, stderr=subprocess.STDOUT, env=env, cwd=ROOT)
    if p.returncode:
        raise RuntimeError(f"failed ({p.returncode}), see {log}: {shlex.join(cmd)}")
    return time.perf_counter() - t0


def finished_epochs(run: Path) -> int:
    m = run / "metrics.jsonl"
    return len(m.read_text().splitlines()) if m.exists() else 0


def eval_result(run: Path, protocol: str, args: argparse.Namespace) -> dict[str, Any]:
    """The result ``deepcluster eval`` wrote for ``protocol`` with :func:`evaluate`'s subsets."""
    from deepcluster.config import load_yaml
    from deepcluster.eval.context import result_name

    name = result_name(protocol, load_yaml(run / "config.yaml")["data"]["name"],
                       subset=args.eval_subset or None, test_subset=args.test_subset or None)
    return json.loads((run / "eval" / f"{name}.json").read_text())


def evaluate(run: Path, args: argparse.Namespace, log: Path) -> dict[str, Any]:
    dc = [sys.executable, "-m", "deepcluster", "eval"]
    common = ["--checkpoint", str(run), "--workers", "0", "--threads", str(args.threads)]
    if args.eval_subset:
        common += ["--subset", str(args.eval_subset)]
    if args.test_subset:
        common += ["--test-subset", str(args.test_subset)]
    t = run_cmd(dc + ["clusters", *common], log, args.threads)
    t += run_cmd(dc + ["knn", *common], log, args.threads)
    clusters, knn = eval_result(run, "clusters", args), eval_result(run, "knn", args)
    out = {"feature": clusters["feature"], "nmi": clusters["metrics"]["nmi"], "acc": clusters["metrics"]["acc"],
           "ari": clusters["metrics"]["ari"], "knn": knn["metrics"]["knn"]}
    if clusters["feature"] != "backbone":  # the conv stack's output too: what fc6 reads
        t += run_cmd(dc + ["clusters", *common, "--feature", "backbone"], log, args.threads)
        t += run_cmd(dc + ["knn", *common, "--feature", "backbone"], log, args.threads)
        clusters, knn = eval_result(run, "clusters-backbone", args), eval_result(run, "knn-backbone", args)
    out.update({"nmi_backbone": clusters["metrics"]["nmi"], "acc_backbone": clusters["metrics"]["acc"],
                "knn_backbone": knn["metrics"]["knn"], "eval_s": t})
    return out


def one(name: str, args: argparse.Namespace) -> dict[str, Any]:
    run = args.work_dir / name
    log = args.work_dir / f"{name}.log"
    what, flags = VARIANTS[name]
    cmd = [sys.executable, "-m", "deepcluster", "train", *PAPER, "--subset", str(args.subset), "--epochs",
           str(args.epochs), "--seed", str(args.seed), "--workers", "0", "--output-dir", str(run),
           *args.base_flags, *flags]
    if finished_epochs(run) >= args.epochs:
        train_s = json.loads((args.work_dir / f"{name}.time").read_text())["train_s"]
    else:
        if run.exists() and finished_epochs(run) == 0:
            raise RuntimeError(f"{run} holds an unfinished run: delete it or resume it by hand")
        train_s = run_cmd(cmd + (["--resume"] if run.exists() else []), log, args.threads)
        (args.work_dir / f"{name}.time").write_text(json.dumps({"train_s": train_s}))
    recs = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    shown = [str(Path(a).relative_to(ROOT)) if a.startswith(str(ROOT) + "/") else a for a in cmd[3:]]
    res = {"name": name, "what": what, "command": shlex.join(["deepcluster", *shown]), "train_s": train_s,
           "nmi_labels": [r.get("nmi_labels") for r in recs], **evaluate(run, args, log)}
    print(f"{name:16s} NMI {res['nmi']:.3f} ACC {res['acc']:.3f} kNN {res['knn']:.3f} "
          f"train {train_s / 60:.1f} min  train-NMI {res['nmi_labels'][0]:.3f} -> {res['nmi_labels'][-1]:.3f}",
          flush=True)
    return res


def random_row(args: argparse.Namespace, ref: str) -> dict[str, Any]:
    out = args.work_dir / "random"
    log = args.work_dir / "random.log"
    if not (out / "checkpoint.pt").exists():
        run_cmd([sys.executable, "-m", "deepcluster", "eval", "baseline", "random", "--checkpoint",
                 str(args.work_dir / ref), "--output", str(out)], log, args.threads)
    res = {"name": "random", "what": f"the {ref} network at initialisation", "command": "", "train_s": 0.0,
           "nmi_labels": [], **evaluate(out, args, log)}
    print(f"{'random':16s} NMI {res['nmi']:.3f} ACC {res['acc']:.3f} kNN {res['knn']:.3f}", flush=True)
    return res


def relative(command: str) -> str:
    """``command`` with this checkout's absolute paths made relative to the repository root."""
    return command.replace(str(ROOT) + "/", "")


def write_docs(rows: list[dict[str, Any]], args: argparse.Namespace, info: dict[str, Any]) -> None:
    base = next((r for r in rows if r["name"] == "base"), None)
    lines = [
        "# Ablations on small images (issue 6)",
        "",
        f"Measured {machine_line(info)}; {args.jobs} run(s) at a time, {args.threads} thread(s) each.",
        "",
        f"Each row trains DeepCluster on a fixed random subset of {args.subset} Fashion-MNIST training images for "
        f"{args.epochs} epochs (seed {args.seed}), starting from `--preset paper` "
        f"{'plus `' + shlex.join(args.base_flags) + '` ' if args.base_flags else ''}and changing one thing. "
        "Scores come from `deepcluster eval`: **NMI / ACC** of k-means with k = 10 on the clustered features "
        "(fc7, unless the row says otherwise) of the "
        f"{'%d' % args.test_subset if args.test_subset else '10000'} test images (the better of whitened / "
        "L2 preprocessing, chosen on a validation part), **kNN** the cosine 20-NN top-1 on the test images "
        f"with the {args.eval_subset or 'full'} training images as reference. **train NMI** is the NMI of "
        "the training-time assignments (k of the run) against the labels at the first and last epoch. "
        "**backbone** columns score the conv stack's output (fc6's input) the same way (— : rows measured "
        "before that column existed). "
        "Δ columns are against `base` (against base's backbone scores for a row that clusters the backbone); "
        "`train min` is wall-clock training time with "
        f"{args.jobs} run(s) sharing the machine. Rows are kept between invocations of the script; "
        "this table merges:",
        "",
        "```",
        *dict.fromkeys(r.get("invocation", "") for r in rows if r.get("invocation")),
        "```",
        "",
        "| variant | change | NMI | ΔNMI | ACC | kNN | ΔkNN | backbone NMI / ACC / kNN | train NMI first → last "
        "| train min |",
        "|---|---|---|---|---|---|---|---|---|---|",
    ]
    for r in rows:
        # a row that clusters the backbone is scored there: compare it with base's backbone
        ref = ({"nmi": base.get("nmi_backbone"), "knn": base.get("knn_backbone")}
               if base and r.get("feature") == "backbone" else base)
        dn = f"{r['nmi'] - ref['nmi']:+.3f}" if ref and ref["nmi"] is not None and r is not base else ""
        dk = f"{r['knn'] - ref['knn']:+.3f}" if ref and ref["knn"] is not None and r is not base else ""
        bb = (f"{r['nmi_backbone']:.3f} / {r['acc_backbone']:.3f} / {r['knn_backbone']:.3f}"
              if "nmi_backbone" in r else "—")
        tn = f"{r['nmi_labels'][0]:.3f} → {r['nmi_labels'][-1]:.3f}" if r["nmi_labels"] else ""
        lines.append(f"| `{r['name']}` | {r['what']} | {r['nmi']:.3f} | {dn} | {r['acc']:.3f} | {r['knn']:.3f} | "
                     f"{dk} | {bb} | {tn} | {r['train_s'] / 60:.1f} |")
    lines += ["", "Commands of the rows (run from the repository root):", "", "```"]
    lines += [relative(r["command"]) for r in rows if r["command"]]
    lines += ["```", ""]
    extra = args.out_dir / "ABLATION.notes.md"
    if extra.exists():
        lines += [extra.read_text()]
    (args.out_dir / "ABLATION.md").write_text("\n".join(lines) + "\n")
    (args.out_dir / "benchmarks").mkdir(parents=True, exist_ok=True)
    (args.out_dir / "benchmarks" / "ablation.json").write_text(
        json.dumps({"machine": info, "settings": {k: str(v) if isinstance(v, Path) else v
                                                  for k, v in vars(args).items()}, "rows": rows}, indent=1) + "\n")


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--only", type=lambda t: t.split(","), help="comma-separated variant names (default: all)")
    p.add_argument("--list", action="store_true", help="print the variants and stop")
    p.add_argument("--subset", type=int, default=10000, help="training images per run (default 10000)")
    p.add_argument("--epochs", type=int, default=8)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--base-flags", type=shlex.split, default=[], help="flags added to every run, e.g. '--k 30'")
    p.add_argument("--eval-subset", type=int, help="kNN reference / PCA-fit images (default: --subset)")
    p.add_argument("--test-subset", type=int, help="test images scored (default: all 10000)")
    p.add_argument("--jobs", type=int, default=1, help="runs at a time")
    p.add_argument("--threads", type=int, default=None, help="threads per run (default: cores / jobs)")
    p.add_argument("--work-dir", type=Path, default=ROOT / "runs" / "ablation")
    p.add_argument("--out-dir", type=Path, default=ROOT / "experiments")
    p.add_argument("--docs-only", action="store_true",
                   help="rewrite experiments/ABLATION.md from experiments/benchmarks/ablation.json (after editing the notes)")
    p.add_argument("--quick", action="store_true", help="1000 images, 1 epoch, temporary folder, docs untouched")
    args = p.parse_args(argv)
    if args.list:
        for name, (what, flags) in VARIANTS.items():
            print(f"{name:16s} {what}  {shlex.join(flags)}")
        return 0
    if args.quick:
        tmp = Path(tempfile.mkdtemp(prefix="ablation-"))
        args.subset, args.epochs, args.test_subset = 1000, 1, 500
        args.work_dir, args.out_dir = tmp / "runs", tmp / "docs"
        args.only = args.only or ["base", "k10"]
        args.base_flags = args.base_flags + ["--width", "0.25", "--fc-dim", "256", "--pca-dim", "32"]
    if args.docs_only:
        saved = json.loads((args.out_dir / "benchmarks" / "ablation.json").read_text())
        for key, value in saved["settings"].items():  # the measurement's settings, as they were
            if key not in ("work_dir", "out_dir"):
                setattr(args, key, value)
        write_docs(saved["rows"], args, saved["machine"])
        print(f"wrote {args.out_dir / 'ABLATION.md'}")
        return 0
    args.eval_subset = args.eval_subset or args.subset
    args.threads = args.threads or max(1, (os.cpu_count() or 1) // args.jobs)
    names = args.only or list(VARIANTS)
    unknown = [n for n in names if n not in VARIANTS]
    if unknown:
        p.error(f"unknown variant(s) {', '.join(unknown)}; see --list")
    args.work_dir.mkdir(parents=True, exist_ok=True)
    args.out_dir.mkdir(parents=True, exist_ok=True)
    info = machine_info()
    order = (["base"] if "base" in names else []) + [n for n in names if n != "base"]
    rows: list[dict[str, Any]] = []
    if "base" in order:  # first: the others are compared with it, and random needs its checkpoint
        rows.append(one("base", args))
        rows.append(random_row(args, "base"))
    with ThreadPoolExecutor(args.jobs) as pool:
        rows += list(pool.map(lambda n: one(n, args), [n for n in order if n != "base"]))
    previous = args.out_dir / "benchmarks" / "ablation.json"
    if previous.exists() and not args.quick:  # keep rows measured earlier, replaced by re-measured ones
        done = {r["name"] for r in rows}
        rows += [r for r in json.loads(previous.read_text())["rows"] if r["name"] not in done]
    invocation = shlex.join([".venv/bin/python", "benchmarks/ablation.py", *(sys.argv[1:] if argv is None else argv)])
    for r in rows:
        r.setdefault("invocation", invocation)
    rows.sort(key=lambda r: (r["name"] != "base", r["name"] != "random", list(VARIANTS).index(r["name"])
                             if r["name"] in VARIANTS else 0))
    write_docs(rows, args, info)
    print(f"wrote {args.out_dir / 'ABLATION.md'}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
