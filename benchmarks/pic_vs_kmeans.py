"""PIC against k-means: cluster-size histograms (the paper's appendix Figure 3) and a table.

    python benchmarks/pic_vs_kmeans.py KMEANS_RUN PIC_RUN --out docs/PIC.md --png docs/pic_vs_kmeans_sizes.png

Both runs should use the same data, epochs and preset (only ``--clustering`` differs).
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402
import yaml  # noqa: E402

sys.path.insert(0, str(Path(__file__).resolve().parent))
from machine import machine_info, machine_line  # noqa: E402


def last_sizes(run: Path) -> np.ndarray:
    hist = np.load(run / "assignments.npy")
    return np.bincount(hist[-1])


def series(values: list[float]) -> str:
    """Every value for a short run; first -> last (min-max) for a long one."""
    if len(values) <= 6:
        return " ".join(f"{v:.3f}" for v in values)
    return f"{values[0]:.3f} → {values[-1]:.3f} ({min(values):.3f}–{max(values):.3f})"


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("kmeans_run", type=Path)
    ap.add_argument("pic_run", type=Path)
    ap.add_argument("--out", type=Path, required=True)
    ap.add_argument("--png", type=Path, required=True)
    args = ap.parse_args()
    fig, axes = plt.subplots(1, 2, figsize=(11, 4), dpi=100)
    rows = []
    for ax, (name, run) in zip(axes, (("k-means", args.kmeans_run), ("PIC", args.pic_run))):
        sizes = last_sizes(run)
        recs = [json.loads(l) for l in (run / "metrics.jsonl").read_text().splitlines() if l.strip()]
        bins = np.logspace(0, np.log10(sizes.max() * 1.01), 30)
        ax.hist(sizes[sizes > 0], bins=bins, color="C0" if name == "k-means" else "C1", edgecolor="white")
        ax.set_xscale("log")
        ax.set_xlabel("images in the cluster")
        ax.set_ylabel("number of clusters")
        ax.set_title(f"{name}: {len(sizes)} clusters, last epoch")
        ax.grid(alpha=0.3)
        counts = [r.get("num_clusters") for r in recs if r.get("num_clusters") is not None]
        rows.append(f"| {name} | {len(sizes)} | {min(counts)}–{max(counts)} | "
                    f"{sizes.min()} / {np.median(sizes):.0f} / {sizes.max()} | {(sizes < 10).mean():.0%} | "
                    + series([r["nmi_labels"] for r in recs]) + " | "
                    + series([r["nmi_prev"] for r in recs if r.get("nmi_prev") is not None]) + " | "
                    + f"{np.mean([r['kmeans_s'] for r in recs]):.1f} | {sum(r['epoch_s'] for r in recs) / 60:.1f} |")
    fig.tight_layout()
    args.png.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(args.png)
    cfg = yaml.safe_load((args.pic_run / "config.yaml").read_text())
    text = "\n".join([
        "| clustering | clusters (last epoch) | clusters over the epochs | sizes min / median / max (last epoch) "
        "| clusters < 10 images | NMI vs labels | NMI vs previous epoch | clustering s / epoch | total min |",
        "|---|---|---|---|---|---|---|---|---|",
        *rows, "",
        "NMI columns: every epoch for runs of up to 6 epochs, else first → last epoch (lowest–highest).",
        "",
        f"Data: {cfg['data']['name']}, "
        f"{'all images' if cfg['data']['subset'] is None else 'subset ' + str(cfg['data']['subset'])}, "
        f"{cfg['optim']['epochs']} epochs, preset "
        f"{cfg['preset']}, PIC sigma {cfg['cluster']['pic_sigma']}, {cfg['cluster']['pic_neighbors']} neighbours, "
        f"{cfg['cluster']['pic_iters']} iterations. Table made on: {machine_line(machine_info())}.",
        f"Command: `python benchmarks/pic_vs_kmeans.py {args.kmeans_run} {args.pic_run} --out {args.out} --png {args.png}`",
    ])
    print(text)
    doc = args.out.read_text() if args.out.exists() else ""
    start, end = "<!-- pic_vs_kmeans:start -->", "<!-- pic_vs_kmeans:end -->"
    if start in doc:
        doc = doc.split(start)[0] + f"{start}\n{text}\n{end}" + doc.split(end, 1)[1]
    else:
        doc += f"\n{start}\n{text}\n{end}\n"
    args.out.write_text(doc)


if __name__ == "__main__":
    main()
