"""A synthetic scale run: N tiny images in a class-folder tree, two DeepCluster epochs.

What grows with the number of images, outside the network? This builds (once, then
reuses) a folder of ``--images`` generated PNGs of about 100 bytes each, ImageNet's
layout (``--classes`` sub-folders), then runs ``deepcluster train`` on it in a child
process with the smallest network (``alexnet_small`` at width 1/8, 16 px, fc 256), so that
the network is not the cost, and measures:

- the folder scan (walk + decode of every file), cold (no memo) and warm (memo hit),
  the scan memo's size and load time;
- peak RSS, and RSS after the scan and after each epoch;
- per epoch: the phases the run records (extract, PCA, k-means, train) and, timed by
  wrapping the functions the loop calls, the parts outside the network: the sampler's
  epoch plan, the epoch record (NMI with the previous epoch and with the folder labels,
  cluster sizes), the history append, ``metrics.jsonl``, the checkpoint;
- the network alone on random tensors (forward, and forward + backward, same batch,
  threads and precision), so that ``extract + train - network`` is the data pipeline;
- the run folder's size after each epoch (disk growth per epoch).

Writes ``docs/benchmarks/scale.json`` and prints a Markdown table (docs/SCALE.md,
"A synthetic scale run").

Usage::

    python benchmarks/scale.py --images 1280000 --folder /tmp/scale-images --work /tmp/scale
    python benchmarks/scale.py --images 20000 --folder /tmp/s20k --work /tmp/s20k-run   # a quick look
"""

from __future__ import annotations

import argparse
import io
import json
import os
import resource
import shutil
import subprocess
import sys
import time
from collections import defaultdict
from pathlib import Path
from typing import Any

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent))
from machine import machine_info, machine_line  # noqa: E402

OUT = Path(__file__).resolve().parents[1] / "docs" / "benchmarks" / "scale.json"
MARKER = ".scale-folder.json"
NETWORK = ["--arch", "alexnet_small", "--width", "0.125", "--fc-dim", "256", "--image-size", "16"]


# ------------------------------------------------------------------- the folder

def tiny_png(rng: np.random.Generator, cls: int, px: int) -> bytes:
    """A ``px`` x ``px`` greyscale PNG: a gradient whose direction depends on the class,
    plus a few random pixels (about 100 bytes)."""
    from PIL import Image

    angle = 2 * np.pi * (cls % 64) / 64
    yy, xx = np.mgrid[0:px, 0:px]
    img = 128 + 60 * (np.cos(angle) * (xx - px / 2) + np.sin(angle) * (yy - px / 2)) / px
    img = img.astype(np.int16)
    spots = rng.integers(0, px * px, 3)
    img.flat[spots] = rng.integers(0, 256, 3)
    buf = io.BytesIO()
    Image.fromarray(np.clip(img, 0, 255).astype(np.uint8), mode="L").save(buf, format="PNG", optimize=True)
    return buf.getvalue()


def make_folder(root: Path, n: int, classes: int, px: int = 12, seed: int = 0) -> dict[str, Any]:
    """``root/c0000/i0000000.png`` ...: ``n`` images over ``classes`` sub-folders. Kept
    and reused when its marker says it has the same ``n``, ``classes`` and ``px``."""
    want = {"images": n, "classes": classes, "px": px, "seed": seed}
    marker = root / MARKER
    if marker.is_file():
        done = json.loads(marker.read_text())
        if {k: done.get(k) for k in want} == want:
            return done
    if root.exists():
        shutil.rmtree(root)
    rng = np.random.default_rng(seed)
    t0, total = time.perf_counter(), 0
    per_class = -(-n // classes)
    for c in range(classes):
        d = root / f"c{c:04d}"
        d.mkdir(parents=True)
        for i in range(c * per_class, min(n, (c + 1) * per_class)):
            data = tiny_png(rng, c, px)
            (d / f"i{i:07d}.png").write_bytes(data)
            total += len(data)
    done = {**want, "bytes": total, "mean_bytes": total / n, "write_s": time.perf_counter() - t0}
    marker.write_text(json.dumps(done))
    return done


# ------------------------------------------------------------------- the child

def _rss_mb() -> float:
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) / 1024
    return float("nan")


def _dir_bytes(path: Path) -> int:
    return sum(p.stat().st_size for p in path.rglob("*") if p.is_file())


def _network_rates(args: argparse.Namespace, amp: str) -> dict[str, float]:
    """Images/s of the network alone on random inputs (``peak.throughput``: the package's
    training step and extraction loop), contiguous layout as the run used."""
    from peak import throughput  # here: peak.py imports torch-heavy modules at import

    from deepcluster.models import create_model

    model = create_model("alexnet_small", num_clusters=args.k, image_size=16, width=0.125, fc_dim=256)
    rates = throughput(model, amp, False, args.batch, 20, image_size=16)
    return {"forward_img_s": rates["extract"], "train_img_s": rates["train"]}


def child(args: argparse.Namespace) -> None:
    """Train on the folder with the loop's helpers wrapped in timers; write the facts as JSON."""
    import deepcluster.data.sampler as sampler_mod
    import deepcluster.rundir as rundir_mod
    import deepcluster.session as session_mod
    import deepcluster.train as train_mod
    from deepcluster.cli import main as cli_main

    timers: dict[str, float] = defaultdict(float)
    facts: dict[str, Any] = {"rss_start_mb": _rss_mb(), "epochs": []}

    def timed(name: str, fn):
        def wrapper(*a, **kw):
            t0 = time.perf_counter()
            try:
                return fn(*a, **kw)
            finally:
                timers[name] += time.perf_counter() - t0
        return wrapper

    build_source = session_mod.build_training_source

    def scan(cfg):
        t0 = time.perf_counter()
        source = build_source(cfg)
        facts["scan_cold_s"] = time.perf_counter() - t0
        facts["rss_after_scan_mb"] = _rss_mb()
        return source

    session_mod.build_training_source = scan
    sampler_mod.balanced_plan = timed("sampler_plan", sampler_mod.balanced_plan)
    train_mod.epoch_record = timed("record", train_mod.epoch_record)
    train_mod.save_checkpoint = timed("checkpoint", train_mod.save_checkpoint)
    rundir_mod.RunDir.append_assignments = timed("history", rundir_mod.RunDir.append_assignments)
    rundir_mod.RunDir.write_metrics = timed("metrics", rundir_mod.RunDir.write_metrics)
    save_epoch = train_mod._save_epoch
    run_dir = Path(args.work) / "run"

    def save_and_measure(s, epoch, extra):
        t0 = time.perf_counter()
        save_epoch(s, epoch, extra)
        facts["epochs"].append({"epoch": epoch, "save_s": time.perf_counter() - t0, **dict(timers),
                                "rss_mb": _rss_mb(), "run_dir_bytes": _dir_bytes(run_dir)})
        timers.clear()

    train_mod._save_epoch = save_and_measure
    if run_dir.exists():
        shutil.rmtree(run_dir)
    t0 = time.perf_counter()
    rc = cli_main(["train", "--data", "folder", "--data-root", args.folder, *NETWORK, "--k", str(args.k),
                   "--pca-dim", str(args.pca_dim), "--epochs", str(args.epochs), "--batch-size", str(args.batch),
                   "--workers", str(args.workers), "--amp", "auto", "--output-dir", str(run_dir)])
    facts["train_wall_s"] = time.perf_counter() - t0
    facts["rc"] = rc
    facts["peak_rss_mb"] = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    facts["metrics"] = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    amp = facts["metrics"][0].get("amp", "none")

    # The warm scan: the memo knows every file, so nothing is decoded again.
    from deepcluster.data.check import ScanMemo
    from deepcluster.data.sources import FolderSource

    t0 = time.perf_counter()
    FolderSource(args.folder)
    facts["scan_warm_s"] = time.perf_counter() - t0
    t0 = time.perf_counter()
    memo = ScanMemo(Path(args.folder))  # reads the memo the scans wrote
    facts["memo"] = {"load_s": time.perf_counter() - t0, "bytes": memo.path.stat().st_size,
                     "entries": len(memo.entries)}
    facts["files"] = {p.name: p.stat().st_size for p in run_dir.iterdir() if p.is_file()}
    facts["network"] = _network_rates(args, amp)
    Path(args.facts).write_text(json.dumps(facts, indent=1))


# ------------------------------------------------------------------- summary

def summarise(folder: dict[str, Any], facts: dict[str, Any]) -> dict[str, Any]:
    """Per-epoch rows: the recorded phases, the network's share, and what is outside it."""
    n = folder["images"]
    fwd, step = facts["network"]["forward_img_s"], facts["network"]["train_img_s"]
    rows = []
    for rec, ep in zip(facts["metrics"], facts["epochs"], strict=True):
        network = n / fwd + n / step
        outside = {"sampler plan": ep.get("sampler_plan", 0.0), "epoch record (NMI, sizes)": ep.get("record", 0.0),
                   "history append": ep.get("history", 0.0), "metrics.jsonl": ep.get("metrics", 0.0),
                   "checkpoint": ep.get("checkpoint", 0.0)}
        rows.append({"epoch": rec["epoch"], "epoch_s": rec["epoch_s"] + ep["save_s"], "extract_s": rec["extract_s"],
                     "pca_s": rec["pca_s"], "kmeans_s": rec["kmeans_s"], "train_s": rec["train_s"],
                     "network_s": network, "pipeline_s": rec["extract_s"] + rec["train_s"] - network,
                     "outside": outside, "rss_mb": ep["rss_mb"], "run_dir_bytes": ep["run_dir_bytes"]})
    growth = [b["run_dir_bytes"] - a["run_dir_bytes"] for a, b in zip(rows, rows[1:])]
    return {"rows": rows, "disk_growth_per_epoch_bytes": growth}


def table(folder: dict[str, Any], facts: dict[str, Any], summary: dict[str, Any]) -> str:
    n = folder["images"]
    lines = [f"{n:,} images of {folder['mean_bytes']:.0f} bytes in {folder['classes']} folders "
             f"(written in {folder['write_s']:.0f} s); network alone: forward {facts['network']['forward_img_s']:,.0f} "
             f"img/s, training step {facts['network']['train_img_s']:,.0f} img/s", "",
             f"- scan: cold {facts['scan_cold_s']:.0f} s ({n / facts['scan_cold_s']:,.0f} files/s), warm "
             f"{facts['scan_warm_s']:.1f} s; memo {facts['memo']['bytes'] / 1e6:.1f} MB, loads in "
             f"{facts['memo']['load_s']:.2f} s",
             f"- RSS: {facts['rss_start_mb']:.0f} MB at start, {facts['rss_after_scan_mb']:.0f} MB after the scan, "
             f"peak {facts['peak_rss_mb']:.0f} MB", "",
             "| epoch | epoch s | extract | PCA | k-means | train | network (est.) | data pipeline | sampler | "
             "record | history | metrics | checkpoint | RSS MB | run folder MB |",
             "|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|"]
    for r in summary["rows"]:
        o = r["outside"]
        lines.append(f"| {r['epoch']} | {r['epoch_s']:.0f} | {r['extract_s']:.0f} | {r['pca_s']:.1f} | "
                     f"{r['kmeans_s']:.1f} | {r['train_s']:.0f} | {r['network_s']:.0f} | {r['pipeline_s']:.0f} | "
                     f"{o['sampler plan']:.2f} | {o['epoch record (NMI, sizes)']:.2f} | {o['history append']:.3f} | "
                     f"{o['metrics.jsonl']:.3f} | {o['checkpoint']:.2f} | {r['rss_mb']:.0f} | "
                     f"{r['run_dir_bytes'] / 1e6:.1f} |")
    lines += ["", "Disk growth per epoch: " + (", ".join(f"{g / 1e6:.2f} MB" for g in
                                                      summary["disk_growth_per_epoch_bytes"]) or "-")]
    return "\n".join(lines)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--images", type=int, default=1_280_000)
    p.add_argument("--classes", type=int, default=1000)
    p.add_argument("--folder", required=True, help="where the images are (generated there once, then reused)")
    p.add_argument("--work", required=True, help="the run folder and the scan cache go here")
    p.add_argument("--epochs", type=int, default=2)
    p.add_argument("--k", type=int, default=1000)
    p.add_argument("--pca-dim", type=int, default=64)
    p.add_argument("--batch", type=int, default=256)
    p.add_argument("--workers", type=int, default=0)
    p.add_argument("--out", default=str(OUT))
    p.add_argument("--child", action="store_true", help=argparse.SUPPRESS)
    p.add_argument("--facts", help=argparse.SUPPRESS)
    args = p.parse_args()
    if args.child:
        child(args)
        return
    work = Path(args.work)
    work.mkdir(parents=True, exist_ok=True)
    folder = make_folder(Path(args.folder), args.images, args.classes)
    print(f"folder: {folder}", flush=True)
    cache = work / "cache"  # a cold scan: no memo from an earlier run
    if cache.exists():
        shutil.rmtree(cache)
    facts_path = work / "facts.json"
    cmd = [sys.executable, __file__, "--child", "--facts", str(facts_path), "--folder", args.folder,
           "--work", args.work, "--images", str(args.images), "--epochs", str(args.epochs), "--k", str(args.k),
           "--pca-dim", str(args.pca_dim), "--batch", str(args.batch), "--workers", str(args.workers)]
    subprocess.run(cmd, check=True, env={**os.environ, "DEEPCLUSTER_CACHE": str(cache)})
    facts = json.loads(facts_path.read_text())
    summary = summarise(folder, facts)
    text = table(folder, facts, summary)
    print(text)
    result = {"machine": machine_info(), "folder": folder, "settings": {
        "network": " ".join(NETWORK), "k": args.k, "pca_dim": args.pca_dim, "epochs": args.epochs,
        "batch": args.batch, "workers": args.workers, "threads": os.environ.get("OMP_NUM_THREADS")},
        "facts": facts, "summary": summary, "table": text}
    Path(args.out).write_text(json.dumps(result, indent=1) + "\n")
    print(f"\nMachine: {machine_line(result['machine'])}. Wrote {args.out}")


if __name__ == "__main__":
    main()
