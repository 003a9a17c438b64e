"""Quality benchmark: every evaluation protocol on DeepCluster runs and on the baselines
(raw pixels, random init, supervised), in one harness and one run; prints the table and
writes ``docs/RESULTS.md`` and ``docs/results.json``.

Usage::

    # full measurement on finished runs (their data set, all images)
    .venv/bin/python benchmarks/quality.py runs/fashion-mnist [more run dirs ...]

    # print the estimated duration of the full measurement and stop
    .venv/bin/python benchmarks/quality.py runs/fashion-mnist --estimate-only

    # quick end-to-end check: trains a tiny run when none is given, 2000 train / 500 test
    # images, few epochs; writes to a temporary folder, never to docs/
    .venv/bin/python benchmarks/quality.py --quick

Per data set, the rows are raw pixels, random init (the run's architecture with its
initial weights), each DeepCluster run, and the supervised top-line (the same
architecture trained with labels from the same initial weights for the run's number of
epochs, same optimiser and augmentation). The baselines use the first run of each data
set as reference. Baseline checkpoints and the pixel results go to ``--work-dir``; each
run's results to ``RUN/eval/``. See docs/EVALUATION.md for the protocols.
"""

from __future__ import annotations

import argparse
import json
import logging
import shutil
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import numpy as np
import torch

from deepcluster.checkpoint import load_checkpoint
from deepcluster.data import IndexedDataset, build_source, cluster_transform
from deepcluster.eval import (LINEAR_GRID, MLP_GRID, Grid, clusters_eval, finetune_eval, knn_eval, linear_eval,
                              machine_info, make_random_init, mlp_eval, open_checkpoint, open_pixels, train_supervised)
from deepcluster.eval.classifier import linear_head, train_classifier
from deepcluster.eval.finetune import metric_name
from deepcluster.eval.mlp import mlp_head
from deepcluster.eval.splits import fraction_tag

logger = logging.getLogger("quality")

ROOT = Path(__file__).resolve().parent.parent

# Published numbers on Fashion-MNIST shown beside our table.
ANCHORS = {
    "fashion-mnist": [
        {"method": "k-means on raw pixels", "nmi": 0.51, "acc": 0.47,
         "source": "project SPEC section 5 (commonly cited, e.g. in the N2D paper's comparison table: "
                   "ACC 0.474 / NMI 0.512)"},
        {"method": "DEC", "nmi": 0.65, "acc": 0.62,
         "source": "project SPEC section 5 / issue 3 (primary source not re-checked here)"},
        {"method": "N2D", "nmi": 0.684, "acc": 0.672,
         "source": "McConville et al., N2D: (Not Too) Deep Clustering, arXiv:1908.05968 (2019)"},
        {"method": "supervised small CNNs", "top1": "0.92-0.93",
         "source": "project SPEC section 5 (Fashion-MNIST benchmark, Xiao et al. arXiv:1708.07747)"},
    ],
}

QUICK_RUN = "deepcluster-quick"

COLUMNS = (["linear_conv1", "linear_conv2", "linear_conv3", "linear_conv4", "linear_conv5", "linear_pixels", "mlp",
            "knn", "nmi", "acc", "ari"])
HEADERS = {"linear_conv1": "lin conv1", "linear_conv2": "lin conv2", "linear_conv3": "lin conv3",
           "linear_conv4": "lin conv4", "linear_conv5": "lin conv5", "linear_pixels": "lin pixels", "mlp": "MLP",
           "knn": "kNN", "nmi": "NMI", "acc": "ACC", "ari": "ARI"}


# --------------------------------------------------------------------------- settings

def settings(args: argparse.Namespace) -> dict[str, Any]:
    """Protocol settings of this benchmark (full or quick)."""
    quick = args.quick
    lin = Grid(LINEAR_GRID.lrs, LINEAR_GRID.weight_decays, args.linear_epochs or (3 if quick else LINEAR_GRID.epochs),
               LINEAR_GRID.batch_size)
    mlp = Grid(MLP_GRID.lrs, MLP_GRID.weight_decays, args.mlp_epochs or (2 if quick else MLP_GRID.epochs),
               MLP_GRID.batch_size)
    return {
        "subset": args.subset if args.subset is not None else (2000 if quick else None),
        "test_subset": args.test_subset if args.test_subset is not None else (500 if quick else None),
        "linear": lin, "mlp": mlp,
        "fractions": args.fractions,
        "finetune_steps": args.finetune_steps or (40 if quick else 500),
        "supervised_epochs": args.supervised_epochs,
        "protocols": [p for p in ("linear", "mlp", "knn", "clusters", "finetune") if p not in args.skip],
    }


# --------------------------------------------------------------------------- cost estimate

def measure_throughput(checkpoint: Path) -> dict[str, float]:
    """Seconds per unit of work on this machine, measured on a few batches."""
    from deepcluster.checkpoint import load_model

    torch.manual_seed(0)
    model, state = load_model(checkpoint)
    cfg = state.get("config", {}).get("data", {})
    from deepcluster.data import image_spec

    spec = image_spec(cfg.get("name", "fashion-mnist"), model.image_size)
    source = build_source(cfg.get("name", "fashion-mnist"), cfg.get("root"), "train", False)
    ds = IndexedDataset(source, cluster_transform(spec))
    t = time.perf_counter()
    for i in range(256):
        ds[i]
    load_s = (time.perf_counter() - t) / 256
    x = torch.randn(256, 3, model.image_size, model.image_size)
    with torch.no_grad():
        model(x[:32])
        t = time.perf_counter()
        for _ in range(2):
            model(x)
    fwd_s = (time.perf_counter() - t) / 512
    model.train()
    opt = torch.optim.SGD(model.parameters(), lr=1e-3)
    xb, yb = x[:64], torch.randint(0, model.num_clusters, (64,))
    t = time.perf_counter()
    for _ in range(3):
        loss = torch.nn.functional.cross_entropy(model(xb), yb)
        opt.zero_grad()
        loss.backward()
        opt.step()
    train_s = (time.perf_counter() - t) / 192
    rng = np.random.default_rng(0)
    n_lin = 8192
    feats = rng.standard_normal((n_lin, 3072)).astype(np.float32)
    labels = rng.integers(0, 10, n_lin)
    train_classifier(linear_head, feats[:512], labels[:512], np.arange(512), 10, lr=0.01, weight_decay=0.0, epochs=1)
    secs = {}
    for epochs in (1, 4):  # a fixed part per training (statistics, copies) and a part per epoch
        t = time.perf_counter()
        train_classifier(linear_head, feats, labels, np.arange(n_lin), 10, lr=0.01, weight_decay=0.0, epochs=epochs)
        secs[epochs] = time.perf_counter() - t
    linear_epoch_s = max(secs[4] - secs[1], 1e-9) / (3 * n_lin * 3072)  # per sample-dimension-epoch
    linear_fixed_s = max(secs[1] - linear_epoch_s * n_lin * 3072, 0.0) / (n_lin * 3072)  # per sample-dimension
    in_dim = int(torch.flatten(model.forward_backbone(x[:1]), 1).shape[1])
    t = time.perf_counter()
    train_classifier(mlp_head(model.feature_dim), feats[:4096, :in_dim], labels[:4096], np.arange(4096), 10,
                     lr=0.01, weight_decay=0.0, epochs=1)
    mlp_s = (time.perf_counter() - t) / 4096  # per sample-epoch
    a = torch.randn(1024, 1024)
    t = time.perf_counter()
    for _ in range(4):
        a @ a
    flops = 4 * 2 * 1024 ** 3 / (time.perf_counter() - t)
    return {"load_s": load_s, "fwd_s": fwd_s, "train_s": train_s, "linear_epoch_s": linear_epoch_s,
            "linear_fixed_s": linear_fixed_s, "mlp_s": mlp_s,
            "flops": flops, "fc_dim": model.feature_dim, "backbone_dim": in_dim}


def estimate(plan: dict[str, Any], tp: dict[str, float]) -> dict[str, float]:
    """Seconds per phase for ``plan`` (sizes and counts) at throughput ``tp``."""
    n, m, nets, runs = plan["n_train"], plan["n_test"], plan["nets"], plan["runs"]
    s = plan["settings"]
    lin, mlp = s["linear"], s["mlp"]
    per_image = tp["fwd_s"] + tp["load_s"]
    per_train_image = tp["train_s"] + tp["load_s"]
    out = {"extract": nets * (n + m) * per_image + (n + m) * tp["load_s"]}
    protos = s["protocols"]
    if "linear" in protos:
        dims = plan["layer_dims"]
        trainings = len(lin.points()) + 1  # the grid, then the retraining on the whole training split
        per_dim = lin.epochs * tp["linear_epoch_s"] + tp["linear_fixed_s"]
        out["linear"] = trainings * n * per_dim * (nets * sum(dims) + plan["pixel_dim"])
    if "mlp" in protos:
        out["mlp"] = nets * (len(mlp.points()) + 1) * mlp.epochs * n * tp["mlp_s"]
    if "knn" in protos:
        out["knn"] = (nets * tp["fc_dim"] + plan["pixel_dim"]) * 2.0 * n * m / tp["flops"]
    if "clusters" in protos:  # PCA fit on the training features dominates
        out["clusters"] = (nets * tp["fc_dim"] ** 2 + plan["pixel_dim"] ** 2) * 2.0 * n / tp["flops"]
    if "finetune" in protos:
        trainings = (2 * runs + 1) * len(s["fractions"])  # all + fc per run, scratch (random-init row)
        out["finetune"] = trainings * s["finetune_steps"] * 64 * per_train_image + trainings * (m + n // 10) * per_image
    out["supervised"] = plan["supervised_epochs"] * n * per_train_image
    out["total"] = sum(out.values())
    return out


def format_duration(seconds: float) -> str:
    if seconds < 120:
        return f"{seconds:.0f} s"
    if seconds < 7200:
        return f"{seconds / 60:.0f} min"
    return f"{seconds / 3600:.1f} h"


# --------------------------------------------------------------------------- running

def _field(result: dict[str, Any], key: str) -> Any:
    """``result["a"]["b"]`` for ``key`` ``"a.b"``; ``None`` where missing."""
    for part in key.split("."):
        result = result.get(part) if isinstance(result, dict) else None
    return result


def previous_result(ctx, name: str, expect: dict[str, Any], fresh: bool) -> dict[str, Any] | None:
    """``RUN/eval/<name>.json`` (keyed by subsets: ``EvalContext.result_path``) from an earlier benchmark, if it measured exactly this.

    It must name the same checkpoint (path and epoch), the same images (``data`` facts:
    subsets, splits, seed) and the same protocol settings (``expect``), and be newer than
    the checkpoint file; otherwise the protocol runs again.
    """
    path = ctx.result_path(name)
    if fresh or not path.exists():
        return None
    try:
        old = json.loads(path.read_text())
    except (OSError, ValueError):
        return None
    if ctx.checkpoint is not None:
        from deepcluster.eval.context import checkpoint_file

        ckpt = checkpoint_file(ctx.checkpoint)
        if not ckpt.exists() or path.stat().st_mtime < ckpt.stat().st_mtime:
            return None
    header = ctx.header(old.get("protocol", ""))
    same = (old.get("checkpoint") == header["checkpoint"] and old.get("epoch") == header["epoch"]
            and old.get("data") == json.loads(json.dumps(header["data"]))
            and all(_field(old, k) == v for k, v in expect.items()) and isinstance(old.get("metrics"), dict))
    if same:
        logger.info("reusing %s (same checkpoint, images and settings; --fresh to measure again)", path)
        return old
    return None


def run_protocols(ctx, s: dict[str, Any], net: bool, finetune_modes: list[str],
                  fresh: bool = False) -> tuple[dict[str, float], dict[str, Any]]:
    """Every protocol of ``s`` on ``ctx``; returns the merged metrics and facts for the table.

    A protocol whose result file already holds this exact measurement is read back, not
    run again (``fresh=True`` measures everything); ``info["eval_s"]`` sums the seconds of
    every protocol, measured now or then.
    """
    metrics: dict[str, float] = {}
    info: dict[str, Any] = {"eval_s": 0.0, "reused": []}
    p = s["protocols"]
    feature = ctx.encoder.clustering_feature
    jobs: list[tuple[str, dict[str, Any], Any]] = []  # (result file, settings it must match, how to measure)
    if "linear" in p:
        jobs.append(("linear", {"grid": s["linear"].as_dict()}, lambda: linear_eval(ctx, grid=s["linear"])))
    if "mlp" in p and net:
        jobs.append(("mlp", {"grid": s["mlp"].as_dict()}, lambda: mlp_eval(ctx, grid=s["mlp"])))
    if "knn" in p:
        jobs.append(("knn", {"feature": feature}, lambda: knn_eval(ctx)))
    if "clusters" in p:
        jobs.append(("clusters", {"feature": feature}, lambda: clusters_eval(ctx)))
    if "finetune" in p:
        for f in s["fractions"]:
            for mode in finetune_modes:
                jobs.append((f"finetune_{mode}_{fraction_tag(f)}",
                             {"label_fraction": f, "mode": mode, "settings.steps": s["finetune_steps"]},
                             lambda f=f, mode=mode: finetune_eval(ctx, f, mode, steps=s["finetune_steps"])))
    done: dict[str, dict[str, Any]] = {}
    for name, expect, _ in jobs:
        old = previous_result(ctx, name, expect, fresh)
        if old is not None:
            done[name] = old
            info["reused"].append(name)
    names: list[str] = []  # every feature still needed, in one pass over the images
    names += list(ctx.encoder.layers) if "linear" in p and "linear" not in done else []
    names += ["backbone"] if "mlp" in p and net and "mlp" not in done else []
    names += [feature] if {"knn", "clusters"} & set(p) and not {"knn", "clusters"} <= set(done) else []
    if names:
        t0 = time.perf_counter()
        for split in ("train", "test"):
            ctx.store.get(split, names)
        info["eval_s"] += time.perf_counter() - t0
    for name, _, measure in jobs:
        r = done.get(name)
        if r is None:
            t0 = time.perf_counter()
            r = measure()
            info["eval_s"] += time.perf_counter() - t0
        else:
            info["eval_s"] += float(r.get("seconds", 0.0))
        metrics.update(r["metrics"])
        if name == "clusters":
            info["kmeans_prep"] = r["best"]
    return metrics, info


def deepcluster_train_time(run: Path) -> tuple[float | None, int]:
    path = run / "metrics.jsonl"
    if not path.exists():
        return None, 0
    records = [json.loads(line) for line in path.read_text().splitlines() if line.strip()]
    return float(sum(r.get("epoch_s", 0.0) for r in records)), len(records)


def quick_run(work: Path) -> Path:
    """A tiny DeepCluster run on Fashion-MNIST for --quick without run directories."""
    from deepcluster.config import resolve
    from deepcluster.train import train

    out = work / QUICK_RUN
    if not (out / "checkpoint.pt").exists():
        logger.info("training a tiny DeepCluster run (2000 images, 2 epochs) in %s", out)
        train(resolve(overrides={"data": {"subset": 2000, "download": False}, "cluster": {"k": 20, "pca_dim": 64},
                                 "optim": {"epochs": 2, "batch_size": 128},
                                 "run": {"output_dir": str(out), "workers": 0}}))
    return out


def benchmark_dataset(name: str, runs: list[Path], s: dict[str, Any], args: argparse.Namespace,
                      work: Path) -> tuple[dict[str, dict[str, float]], dict[str, Any]]:
    """All rows of one data set. Returns ``(method -> metrics, method -> row info)``."""
    ref = runs[0]
    ref_state = load_checkpoint(ref)
    data_cfg = ref_state.get("config", {}).get("data", {})
    common = dict(subset=s["subset"], test_subset=s["test_subset"], workers=args.workers, seed=0)
    results: dict[str, dict[str, float]] = {}
    rows: dict[str, Any] = {}

    def finish(key: str, label: str, measured: tuple[dict[str, float], dict[str, Any]],
               train_s: float | None, machine: Any, ctx=None) -> None:
        metrics, info = measured
        metrics = dict(metrics)
        metrics["eval_time_s"] = info.pop("eval_s")  # evaluation only, read-back cells included
        if train_s is not None:
            metrics["train_time_s"] = train_s
        results[key] = metrics
        rows[key] = {"label": label, "train_machine": machine, **info}
        if ctx is not None and not args.keep_cache:
            shutil.rmtree(ctx.results_dir / "cache", ignore_errors=True)
        logger.info("%s: %s", label, {k: round(v, 4) for k, v in metrics.items() if v is not None})

    # Raw pixels.
    ctx = open_pixels(name, work / f"pixels-{name}", data_root=data_cfg.get("root"),
                      image_size=ref_state["meta"]["image_size"], **common)
    finish("raw_pixels", "raw pixels", run_protocols(ctx, s, net=False, finetune_modes=[], fresh=args.fresh), 0.0, "-", ctx)

    # Random init: the reference run's architecture with its initial weights.
    rand = work / f"random-{name}" / "checkpoint.pt"
    if (args.retrain_baselines or not rand.exists()
            or load_checkpoint(rand).get("source_checkpoint") != str(ref)):  # deterministic: keep the file
        rand = make_random_init(ref, rand)
    ctx = open_checkpoint(rand, device=args.device, **common)
    finish("random_init", "random init", run_protocols(ctx, s, net=True, finetune_modes=["all"], fresh=args.fresh), 0.0, "-", ctx)
    for f in s["fractions"]:  # fine-tuning a random network is training from scratch
        results["random_init"][f"scratch_{fraction_tag(f)}"] = results["random_init"].get(metric_name("all", f))

    # DeepCluster runs.
    for run in runs:
        key = "deepcluster" if len(runs) == 1 else f"deepcluster:{run.name}"
        ctx = open_checkpoint(run, device=args.device, **common)
        measured = run_protocols(ctx, s, net=True, finetune_modes=["all", "fc"], fresh=args.fresh)
        train_s, epochs = deepcluster_train_time(run)
        run_state = load_checkpoint(run)
        machine = (run_state.get("meta", {}).get("machine") or args.machine_note
                   or "not recorded (a run from before deepcluster recorded its machine)")
        cfg = run_state.get("config", {})
        how = [f"preset {cfg['preset']}"] if cfg.get("preset") else []
        how += changes_from_preset(cfg)
        finish(key, f"DeepCluster ({run.name}: {', '.join(how + [f'{epochs} epochs'])})", measured, train_s,
               machine, ctx)

    # Supervised top-line.
    sup_path = work / f"supervised-{name}" / "checkpoint.pt"
    epochs = s["supervised_epochs"] or int(ref_state.get("epoch", 1))
    subset = s["subset"] if s["subset"] is not None else data_cfg.get("subset")
    n_src = len(build_source(name, data_cfg.get("root"), "train", False))
    expected_images = min(subset, n_src) if subset else n_src
    reuse = False
    if sup_path.exists() and not args.retrain_baselines:
        st = load_checkpoint(sup_path)
        reuse = (st.get("source_checkpoint") == str(ref) and st.get("epoch") == epochs
                 and st.get("train_images") == expected_images)
        if reuse:
            logger.info("reusing the supervised baseline %s (--retrain-baselines to train it again)", sup_path)
    if not reuse:
        train_supervised(ref, sup_path, epochs=epochs, subset=subset, device=args.device, workers=args.workers)
    st = load_checkpoint(sup_path)
    ctx = open_checkpoint(sup_path, device=args.device, **common)
    modes: list[str] = []  # fine-tuning a network trained on all labels says nothing
    s_sup = {**s, "protocols": [p for p in s["protocols"] if p != "finetune"]}
    finish("supervised", f"supervised ({epochs} epochs)", run_protocols(ctx, s_sup, net=True, finetune_modes=modes,
                                                                  fresh=args.fresh),
           float(st.get("train_seconds", 0.0)), st.get("machine", "-"), ctx)
    return results, rows


# --------------------------------------------------------------------------- report

def fmt(v: Any) -> str:
    return "—" if v is None else f"{v:.3f}" if isinstance(v, float) else str(v)


def table(name: str, results: dict[str, dict[str, float]], rows: dict[str, Any], fractions: list[float]) -> str:
    ft_cols = [f"finetune_{fraction_tag(f)}" for f in fractions]
    cols = [c for c in COLUMNS if any(c in r for r in results.values())] + ft_cols
    head = ["method"] + [HEADERS.get(c, c.replace("finetune_", "FT ").replace("pct", " %")) for c in cols] + \
        ["k-means on", "train time"]
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for key, r in results.items():
        vals = []
        for c in cols:
            v = r.get(c)
            if key == "random_init" and c.startswith("finetune_"):
                v = r.get(c.replace("finetune_", "scratch_"))
            vals.append(fmt(v))
        t = r.get("train_time_s")
        prep = rows[key].get("kmeans_prep", "—")
        lines.append("| " + " | ".join([rows[key]["label"]] + vals + [prep, "—" if t is None else format_duration(t)])
                     + " |")
    return "\n".join(lines)


KEPT_MARKER = "<!-- Sections below are written by other benchmarks; benchmarks/quality.py keeps them. -->"
"""RESULTS.md past this line (the size table of benchmarks/sizes.py, the final clustering of
benchmarks/final_clustering.py) survives a new invocation of this benchmark."""


def write_keeping_sections(target: Path, text: str) -> None:
    """Write ``text`` to ``target``, followed by what ``target`` held past :data:`KEPT_MARKER`."""
    old = target.read_text() if target.is_file() else ""
    kept = old.split(KEPT_MARKER, 1)[1] if KEPT_MARKER in old else ""
    target.write_text(text + (f"\n\n{KEPT_MARKER}{kept}" if kept else ""))


def write_report(all_results: dict[str, Any], all_rows: dict[str, Any], meta: dict[str, Any], out_dir: Path,
                 s: dict[str, Any]) -> None:
    out_dir.mkdir(parents=True, exist_ok=True)
    js = {name: res for name, res in all_results.items()}
    js["_meta"] = meta
    (out_dir / "results.json").write_text(json.dumps(js, indent=2, default=str) + "\n")
    m = meta["machine"]
    lin, mlp = s["linear"], s["mlp"]
    total_eval_s = sum(r.get("eval_time_s") or 0.0 for res in all_results.values() for r in res.values())
    parts = [
        "# Results: evaluation protocols on DeepCluster and baselines",
        "",
        f"Generated by `benchmarks/quality.py` ({meta['mode']} mode) on {m['date'][:10]}: {m['cpu']}, "
        f"{m['cores']} cores, "
        f"torch {m['torch']}{', GPU ' + m['gpu'] if 'gpu' in m else ''}; this invocation took "
        f"{format_duration(meta['seconds'])}"
        + (" (cells measured by earlier invocations were read back: listed under each table; measuring all "
           f"cells took {format_duration(total_eval_s)} of evaluation, not counting the supervised baseline's training)"
           if any(r.get("reused") for rows in all_rows.values() for r in rows.values()) else "")
        + ". The same numbers are in `docs/results.json` "
        "(`{dataset: {method: {metric: value}}}`; `_meta` holds settings and machines).",
        "",
        "How each run was trained (per-run training pages, metrics, the ablation that chose the presets): "
        "[experiments/](../experiments/), in particular [experiments/ABLATION.md](../experiments/ABLATION.md).",
        "",
        "Protocols (docs/EVALUATION.md): linear probes on pooled, frozen conv layers (lr x weight decay chosen on a "
        f"validation part of the training split: {len(lin.points())} grid points x {lin.epochs} epochs), MLP = fresh "
        f"fc6-fc7-classifier on the frozen conv stack ({len(mlp.points())} grid points x {mlp.epochs} epochs), kNN = "
        "cosine 20-NN on the clustering features (fc7, or pixels), NMI / ACC / ARI = k-means with k = number of "
        "classes on the test split (preprocessing chosen on the validation part), FT = fine-tuning all layers on a "
        f"class-balanced fraction of the labels ({s['finetune_steps']} steps of 64; the random-init row is training "
        "from scratch). All numbers are test-split top-1 accuracy unless named otherwise. \"k-means on\" names the "
        "preprocessing whose NMI/ACC/ARI the row shows (PCA-whitened + L2 as in training, or L2 only), the better on "
        "the validation part; both are under \"More numbers\". \"—\" marks a cell that does not apply: raw "
        "pixels have no conv layers and no network to fine-tune, \"lin pixels\" is for raw pixels only, and "
        "fine-tuning the supervised network, already trained on every label, on 1 % of them says nothing.",
        "",
    ]
    if meta["mode"] == "quick":
        parts += ["**Quick mode**: subsets and few epochs; these numbers only show that the pipeline runs. "
                  "Do not compare them with published numbers.", ""]
    skipped = [p for p in ("linear", "mlp", "knn", "clusters", "finetune") if p not in s["protocols"]]
    if skipped:
        parts += [f"**Not measured in this run**: {', '.join(skipped)} (skipped with `--skip`, for time), so "
                  "their columns are absent; `benchmarks/quality.py` without `--skip` fills them.", ""]
    for name, results in all_results.items():
        parts += [f"## {name}", "", table(name, results, all_rows[name], s["fractions"]), ""]
        extra = []
        for key, r in results.items():
            bits = [f"{k} {fmt(v)}" for k, v in r.items() if k.startswith(("finetune_fc", "scratch_", "knn_weighted",
                                                                              "whitened_", "l2_", "train_assign_"))]
            if bits:
                extra.append(f"- {all_rows[name][key]['label']}: " + ", ".join(bits))
        if extra:
            parts += ["More numbers (fc-only fine-tuning, weighted kNN, both k-means preprocessings, the run's own "
                      "training-time assignments at its k):", ""] + extra + [""]
        parts += ["Where each row was trained: " + "; ".join(
            f"{all_rows[name][k]['label']}: {fmt_machine(all_rows[name][k]['train_machine'])}" for k in results), ""]
        reused = [f"{all_rows[name][k]['label']}: {', '.join(all_rows[name][k]['reused'])}"
                  for k in results if all_rows[name][k].get("reused")]
        if reused:
            parts += ["Read back from an earlier invocation of this benchmark (the same checkpoint, images and "
                      "settings; their measured seconds count in the eval times; `--fresh` measures all again): "
                      + "; ".join(reused) + ".", ""]
        if name in ANCHORS:
            parts += ["Published anchors (other protocols and architectures; NMI/ACC of clusterings on all 70k "
                      "images; not directly comparable):", "", "| method | NMI | ACC | test top-1 | source |",
                      "|---|---|---|---|---|"]
            for a in ANCHORS[name]:
                cells = [a["method"], a.get("nmi", "—"), a.get("acc", "—"), a.get("top1", "—"), a["source"]]
                parts.append("| " + " | ".join(str(c) for c in cells) + " |")
            parts.append("")
    parts += ["Settings: " + json.dumps({k: v for k, v in meta["settings"].items()}, default=str), ""]
    write_keeping_sections(out_dir / "RESULTS.md", "\n".join(parts))


def fmt_machine(m: Any) -> str:
    if isinstance(m, dict):
        return f"{m.get('cpu', '?')} x{m.get('cores', '?')}, torch {m.get('torch', '?')}"
    return str(m)


# --------------------------------------------------------------------------- main

def changes_from_preset(cfg: dict[str, Any]) -> list[str]:
    """What a run's settings change from its preset, e.g. ``["PIC", "lr_schedule cosine"]``
    (model, clustering and optimisation keys, and ``run.amp``; the epochs are reported separately)."""
    from deepcluster.config import Config, apply_size_rule, migrate, resolve

    try:
        base = resolve(preset=cfg.get("preset") or "paper")
    except ValueError:  # a preset this release does not know (ConfigError)
        return []
    size = cfg.get("size") or {}
    if size.get("rule") == "auto" and size.get("images"):  # the preset at the run's size (deepcluster.sizing)
        base = apply_size_rule(base, int(size["images"]))[0]
    preset = base.to_dict()
    # A key missing from an older run's config is an option added since: the run had its
    # default (the paper's behaviour), which may differ from today's preset.
    defaults = Config().to_dict()
    cfg = migrate(cfg)  # older runs kept the augmentation in optim
    out = []
    for section in ("model", "cluster", "augment", "optim"):
        for key, value in {**defaults[section], **cfg.get(section, {})}.items():
            if key == "epochs" or preset[section].get(key) == value:  # to_dict gives lists, as YAML does
                continue
            out.append("PIC" if (section, key, value) == ("cluster", "method", "pic") else f"{key} {value}")
    amp = cfg.get("run", {}).get("amp", defaults["run"]["amp"])
    if amp != preset["run"]["amp"]:  # the network's arithmetic, though a run-section key
        out.append(f"amp {amp}")
    return out


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], formatter_class=argparse.RawTextHelpFormatter)
    p.add_argument("runs", nargs="*", type=Path, help="DeepCluster run directories")
    p.add_argument("--quick", action="store_true", help="subsets and few epochs; output to a temp folder")
    p.add_argument("--subset", type=int, help="training images (default: all; quick: 2000)")
    p.add_argument("--test-subset", type=int, help="test images (default: all; quick: 500)")
    p.add_argument("--work-dir", type=Path, help="baselines and pixel results (default runs/quality; quick: temp)")
    p.add_argument("--out-dir", type=Path, help="RESULTS.md and results.json (default docs/; quick: temp)")
    p.add_argument("--device", default="cpu")
    p.add_argument("--workers", type=int, default=2)
    p.add_argument("--fractions", type=lambda t: [float(v) for v in t.split(",")], default=[0.01, 0.1],
                   help="label fractions for fine-tuning (default 0.01,0.1)")
    p.add_argument("--finetune-steps", type=int, help="default 500 (quick: 40)")
    p.add_argument("--linear-epochs", type=int, help=f"default {LINEAR_GRID.epochs} (quick: 3)")
    p.add_argument("--mlp-epochs", type=int, help=f"default {MLP_GRID.epochs} (quick: 2)")
    p.add_argument("--supervised-epochs", type=int, help="default: the reference run's epochs")
    p.add_argument("--skip", type=lambda t: t.split(","), default=[], help="protocols to skip, e.g. mlp,finetune")
    p.add_argument("--retrain-baselines", action="store_true", help="do not reuse baseline checkpoints in --work-dir")
    p.add_argument("--fresh", action="store_true",
                   help="measure every protocol again (default: read back RUN/eval/<protocol>.json files that "
                        "hold exactly this measurement: same checkpoint, images and settings)")
    p.add_argument("--machine-note",
                   help="what to say of a run that does not record its machine (runs trained before deepcluster "
                        "recorded it), e.g. 'this machine (trained here, not recorded in the run)'")
    p.add_argument("--keep-cache", action="store_true", help="keep cached features (GBs at full size)")
    p.add_argument("--estimate-only", action="store_true", help="print the estimated duration and stop")
    p.add_argument("--threads", type=int,
                   help="torch threads (default: torch's). On a machine shared with other jobs 1 can be several "
                        "times faster: small ops then wait on no descheduled thread")
    args = p.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(message)s", datefmt="%H:%M:%S")
    logging.getLogger("faiss.loader").setLevel(logging.WARNING)

    t_start = time.perf_counter()
    tmp = Path(tempfile.mkdtemp(prefix="dc-quality-")) if args.quick else None
    work = args.work_dir or (tmp / "work" if tmp else ROOT / "runs" / "quality")
    out_dir = args.out_dir or (tmp / "out" if tmp else ROOT / "docs")
    work.mkdir(parents=True, exist_ok=True)
    runs = list(args.runs)
    if not runs:
        if not args.quick:
            p.error("give DeepCluster run directories (train one with `deepcluster train --output-dir "
                    "runs/fashion-mnist`), or use --quick")
        runs = [quick_run(work)]
    for r in runs:
        if not (r / "checkpoint.pt").exists():
            p.error(f"{r} has no checkpoint.pt; pass finished run directories")
    s = settings(args)

    by_data: dict[str, list[Path]] = {}
    for r in runs:
        data_name = load_checkpoint(r).get("config", {}).get("data", {}).get("name", "fashion-mnist")
        by_data.setdefault(data_name, []).append(r)

    # Estimate this benchmark and the full one from measured throughput.
    tp = measure_throughput(runs[0])
    ref_state = load_checkpoint(runs[0])
    from deepcluster.eval.features import NetEncoder
    from deepcluster.checkpoint import load_model

    enc = NetEncoder(load_model(runs[0])[0], key="estimate")
    layer_dims = [enc.dims()[n]["dim"] for n in enc.layers]
    name0 = next(iter(by_data))
    src_n = len(build_source(name0, ref_state["config"]["data"].get("root"), "train", False))
    test_n = len(build_source(name0, ref_state["config"]["data"].get("root"), "test", False))
    pixel_dim = min(ref_state["meta"]["image_size"] ** 2, 3072)
    plans = {}
    for label, n, m, st in (("this run", min(s["subset"] or src_n, src_n), min(s["test_subset"] or test_n, test_n), s),
                            ("full mode", src_n, test_n, settings(argparse.Namespace(**{**vars(args), "quick": False,
                                                                                       "subset": None,
                                                                                       "test_subset": None})))):
        plan = {"n_train": n, "n_test": m, "nets": len(runs) + 2, "runs": len(runs), "settings": st,
                "layer_dims": layer_dims, "pixel_dim": pixel_dim,
                "supervised_epochs": st["supervised_epochs"] or int(ref_state.get("epoch", 1))}
        plans[label] = estimate(plan, tp)
        print(f"estimated duration ({label}: {n} train / {m} test images, {len(runs)} run(s)): "
              f"{format_duration(plans[label]['total'])}  [" +
              ", ".join(f"{k} {format_duration(v)}" for k, v in plans[label].items() if k != "total") + "]",
              flush=True)
    if args.estimate_only:
        return 0

    all_results: dict[str, Any] = {}
    all_rows: dict[str, Any] = {}
    for name, rs in by_data.items():
        all_results[name], all_rows[name] = benchmark_dataset(name, rs, s, args, work)
    seconds = time.perf_counter() - t_start
    meta = {"mode": "quick" if args.quick else "full", "machine": machine_info(), "seconds": seconds,
            "estimated_seconds": plans["this run"]["total"], "estimate_full_seconds": plans["full mode"]["total"],
            "runs": [str(r) for r in runs], "work_dir": str(work),
            "rows": all_rows,
            "settings": {**{k: v for k, v in s.items() if k not in ("linear", "mlp")},
                         "linear": vars(s["linear"]), "mlp": vars(s["mlp"])}}
    write_report(all_results, all_rows, meta, out_dir, s)
    for name, results in all_results.items():
        print(f"\n## {name}\n")
        print(table(name, results, all_rows[name], s["fractions"]))
    print(f"\nwrote {out_dir / 'RESULTS.md'} and {out_dir / 'results.json'} in {format_duration(seconds)} "
          f"(estimated {format_duration(plans['this run']['total'])}; full mode estimated "
          f"{format_duration(plans['full mode']['total'])})")
    return 0


if __name__ == "__main__":
    sys.exit(main())
