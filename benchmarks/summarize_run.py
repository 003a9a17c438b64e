"""Summarise a training run for the docs: per-epoch table of ``metrics.jsonl``.

    python benchmarks/summarize_run.py RUN_DIR experiments/TRAINING-paper.md --name fmnist-paper-10ep --shared \
        --command "deepcluster train --output-dir runs/fmnist-paper-10ep --epochs 10 --workers 1 --eval-every 1"

Copies ``metrics.jsonl`` and ``nmi.png`` to ``experiments/runs/NAME/`` and writes the table
(NMI vs labels and vs the previous epoch, cluster sizes, losses, kNN probe, seconds).
"""

from __future__ import annotations

import argparse
import json
import shutil
import sys
from pathlib import Path

import yaml

sys.path.insert(0, str(Path(__file__).resolve().parent))
from machine import machine_info, machine_line  # noqa: E402

from deepcluster.config import migrate  # noqa: E402


def fmt(v, spec=".3f") -> str:
    return "—" if v is None else format(v, spec)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("run", type=Path)
    ap.add_argument("out", type=Path)
    ap.add_argument("--name", required=True)
    ap.add_argument("--command", help="the command that ran (default: rebuilt from config.yaml)")
    ap.add_argument("--shared", action="store_true", help="the machine was shared during the run")
    ap.add_argument("--machine-note", help="how busy the machine was, in words (replaces the --shared text)")
    args = ap.parse_args()
    records = [json.loads(l) for l in (args.run / "metrics.jsonl").read_text().splitlines() if l.strip()]
    cfg = yaml.safe_load((args.run / "config.yaml").read_text())
    dest = args.out.parent / "runs" / args.name
    dest.mkdir(parents=True, exist_ok=True)
    for f in ("metrics.jsonl", "nmi.png", "config.yaml"):
        if (args.run / f).exists():
            shutil.copy(args.run / f, dest / f)
    probe = any(r.get("knn_top1") is not None for r in records)
    rows = ["| epoch | NMI vs labels | NMI vs prev |" + (" kNN probe |" if probe else "") + " convnet loss | "
            "clustering loss | clusters | sizes min / median / max | extract s | PCA s | clustering s | train s | img/s |",
            "|" + "---|" * (13 if probe else 12)]
    for r in records:
        knn = f" {fmt(r.get('knn_top1'))} |" if probe else ""
        rows.append(f"| {r['epoch']} | {fmt(r.get('nmi_labels'))} | {fmt(r.get('nmi_prev'))} |{knn}"
                    f" {r['convnet_loss']:.3f} | {r['clustering_loss']:.3f} | {r.get('num_clusters', '—')} | "
                    f"{r['cluster_size_min']} / "
                    f"{r['cluster_size_median']:.0f} / {r['cluster_size_max']} | {r['extract_s']:.0f} | {r['pca_s']:.1f} "
                    f"| {r['kmeans_s']:.1f} | {r['train_s']:.0f} | {r['images_per_s']:.0f} |")
    total = sum(r["epoch_s"] for r in records)
    cfg = migrate(cfg)  # older runs kept the augmentation in optim
    m, c, o = cfg["model"], cfg["cluster"], {**cfg["optim"], **cfg.get("augment", {})}
    preset = cfg.get("preset") or "paper"
    which = "the **paper's settings**" if preset == "paper" else f"the **`{preset}` preset**"
    machine = ("a 2-core CPU that was shared with other jobs during this run (the seconds below are therefore upper "
               "bounds; an idle machine does an epoch in about 2 minutes, see BENCHMARKS.md)") if args.shared else \
        "an otherwise idle 2-core CPU"
    machine = args.machine_note or machine
    command = args.command or (f"deepcluster train --preset {preset} --output-dir runs/{args.name} --epochs "
                               f"{len(records)} --workers {cfg['run']['workers']} --eval-every {cfg['run']['eval_every']}")
    probe_text = ("; the kNN probe (`--eval-every 1`) classifies 2,000 held-out training images by their 20 nearest "
                  "neighbours among 10,000 others in fc7 space") if probe else ""
    counts = [r.get("num_clusters") for r in records if r.get("num_clusters") is not None]
    if c.get("method", "kmeans") == "pic":
        clustering = (f"PIC (σ {c['pic_sigma']}, {c['pic_neighbors']} neighbours, {c['pic_iters']} power iterations; "
                      f"{min(counts)}–{max(counts)} clusters over the epochs)")
        at_k = "at the run's number of clusters (PIC: thousands)"
    else:
        clustering = f"k-means k = {c['k']} ({c['niter']} iterations, {c.get('backend', 'faiss')})"
        at_k = f"at the run's k (= {c['k']})"
    whiten = "whitened + L2" if c.get("whiten", True) else "+ L2 (no whitening)"
    if c.get("feature", "fc7") != "fc7":
        whiten += f" of the {c['feature']} features"
    lrs = [r["lr"] for r in records if r.get("lr") is not None]
    schedule = (f"cosine decay over the epochs ({lrs[0]:g} → {lrs[-1]:.2g} in the last epoch)"
                if o.get("lr_schedule", "constant") == "cosine" and lrs else "constant")
    augment = f"random resized crop scale {tuple(o['crop_scale'])}" + (" + flip" if o.get("hflip", True) else "")
    for key, what in (("affine", "affine warp {}"), ("jitter", "colour jitter {}"), ("blur", "blur p {}"),
                      ("erasing", "erasing p {}")):
        if o.get(key):
            augment += " + " + what.format(o[key])
    if o.get("crops", 1) > 1:
        augment += f", {o['crops']} views per image per step"
    head = {"random": "a new random head every epoch", "centroids": "the centroid head (DeepCluster-v2)",
            "matched": "the previous epoch's head carried to the matched clusters"}.get(o.get("head", "random"))
    balance = {"sampler": "uniform sampling over clusters", "weight": "loss weighted by inverse cluster size",
               "none": "no balancing"}.get(o.get("balance", "sampler"))
    text = f"""# Training: {args.name}

Fashion-MNIST, {len(records)} epochs with {which}
(`--preset {preset}`): `{m['arch']}` (Sobel {m['sobel']}, dropout {m.get('dropout')}), PCA {c['pca_dim']}
{whiten}, {clustering}, SGD lr {o['lr']} {schedule}, momentum
{o['momentum']}, weight decay {o['weight_decay']}, batch {o['batch_size']}, {augment}, {head},
{balance}. Total {total / 60:.0f} minutes of epochs; machine:
{machine}.

Files: [metrics.jsonl](runs/{args.name}/metrics.jsonl), [config.yaml](runs/{args.name}/config.yaml),
![NMI over epochs](runs/{args.name}/nmi.png)

{chr(10).join(rows)}

NMI vs labels is computed {at_k} against the 10 classes, for analysis only{probe_text}.
Machine: {machine_line(machine_info())}.

Command: `{command}`
"""
    args.out.write_text(text)
    print(text)


if __name__ == "__main__":
    main()
