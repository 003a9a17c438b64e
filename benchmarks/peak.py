"""Training and extraction throughput against the machine's matrix-multiply peak (CPU).

1. **Peak**: ``torch.matmul`` of two square ``--n`` x ``--n`` matrices in float32 and in
   bfloat16 (``2 n^3`` FLOPs each), best of ``--repeats``, with ``torch.get_num_threads()``
   threads; measured before and after the throughput runs, the better kept (the machine
   may be shared). Also a 1 x 1 convolution (a matrix product through oneDNN, the
   library of the network's convolutions): float32 ``torch.matmul`` goes through MKL,
   which on an AMD CPU can stay below what oneDNN reaches, and a peak below the
   network's own rate would give fractions over 100 %. The larger of the two is the peak.
2. **FLOPs per image** of the presets' ``alexnet_small`` at 28 px (Sobel, k = 100 head),
   counted by ``torch.utils.flop_counter.FlopCounterMode`` (a multiply-add is 2 FLOPs,
   as in the peak): the forward of the whole network, forward + backward of a training
   step, and the feature forward (``forward_features``, what extraction runs).
3. **Images/s**: ``deepcluster.optim.train_one_epoch`` on ``--steps`` synthetic batches of
   ``--batch`` after one warm-up batch, and ``deepcluster.features.iter_features`` on the
   same; float32 and, where the CPU computes it natively (``runtime.native_bf16``),
   bfloat16 autocast; both layouts (contiguous, channels_last).

Each throughput is turned into GFLOP/s (images/s x FLOPs per image) and divided by the
peak at its precision. The issue's target: training at >= 50 % of that peak.

    python benchmarks/peak.py                     # writes docs/benchmarks/peak.json + the BENCHMARKS.md table
    python benchmarks/peak.py --quick --out /tmp/peak   # seconds (tests/test_peak_benchmark.py)
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from pathlib import Path

import torch
from torch.utils.flop_counter import FlopCounterMode

sys.path.insert(0, str(Path(__file__).resolve().parent))
from cpu_precision import preset_model  # noqa: E402
from epoch_overhead import replace_section  # noqa: E402
from machine import machine_info, machine_line  # noqa: E402

from deepcluster.features import eval_mode, iter_features  # noqa: E402
from deepcluster.io import write_text  # noqa: E402
from deepcluster.optim import train_one_epoch  # noqa: E402
from deepcluster.runtime import native_bf16  # noqa: E402

DOCS = Path(__file__).resolve().parent.parent / "docs"
CPU = torch.device("cpu")
K = 100
TARGET = 0.5


def matmul_gflops(n: int, dtype: torch.dtype, repeats: int) -> float:
    """Best GFLOP/s of ``torch.matmul`` of two ``(n, n)`` matrices of ``dtype`` (``2 n^3`` FLOPs)."""
    g = torch.Generator().manual_seed(0)
    a, b = (torch.randn(n, n, generator=g).to(dtype) for _ in range(2))
    torch.matmul(a, b)  # warm-up: the library picks its kernel
    best = float("inf")
    for _ in range(repeats):
        t0 = time.perf_counter()
        torch.matmul(a, b)
        best = min(best, time.perf_counter() - t0)
    return 2 * n**3 / best / 1e9


def conv1x1_gflops(c: int, dtype: torch.dtype, repeats: int) -> float:
    """Best GFLOP/s of a 1 x 1 convolution, ``c`` -> ``c`` channels on ``(32, c, 16, 16)``
    channels_last inputs: a ``(8192, c) @ (c, c)`` matrix product through oneDNN, the
    library the network's convolutions use (``2 * 8192 * c^2`` FLOPs)."""
    g = torch.Generator().manual_seed(0)
    x = torch.randn(32, c, 16, 16, generator=g).to(dtype).contiguous(memory_format=torch.channels_last)
    w = torch.randn(c, c, 1, 1, generator=g).to(dtype).contiguous(memory_format=torch.channels_last)
    best = float("inf")
    with torch.no_grad():
        torch.nn.functional.conv2d(x, w)  # warm-up
        for _ in range(repeats):
            t0 = time.perf_counter()
            torch.nn.functional.conv2d(x, w)
            best = min(best, time.perf_counter() - t0)
    return 2 * 8192 * c**2 / best / 1e9


def peaks_gflops(n: int, repeats: int) -> dict[str, dict[str, float]]:
    """``{precision: {"matmul": GFLOP/s, "conv1x1": GFLOP/s}}`` for float32 and bfloat16."""
    return {name: {"matmul": matmul_gflops(n, dtype, repeats), "conv1x1": conv1x1_gflops(max(64, n // 4), dtype,
                                                                                          repeats)}
            for name, dtype in (("float32", torch.float32), ("bfloat16", torch.bfloat16))}


def count_flops(fn) -> int:
    """FLOPs of the operations ``fn()`` runs (FlopCounterMode: matmuls and convolutions,
    forward and backward; elementwise work is not counted)."""
    with FlopCounterMode(display=False) as counter:
        fn()
    return int(counter.get_total_flops())


def flops_per_image(model: torch.nn.Module, image_size: int = 28, batch: int = 8) -> dict[str, float]:
    """``{"forward", "train", "features"}``: FLOPs per image of the forward pass, of forward
    + backward of the cross-entropy loss (a training step), and of ``forward_features``."""
    x = torch.rand(batch, 3, image_size, image_size)
    y = torch.zeros(batch, dtype=torch.int64)
    model.train()

    def step() -> None:
        torch.nn.functional.cross_entropy(model(x), y).backward()

    with eval_mode(model), torch.no_grad():
        forward = count_flops(lambda: model(x))
        features = count_flops(lambda: model.forward_features(x))
    train = count_flops(step)
    model.zero_grad(set_to_none=True)
    return {"forward": forward / batch, "train": train / batch, "features": features / batch}


def throughput(model: torch.nn.Module, amp: str, channels_last: bool, batch: int, steps: int,
               image_size: int = 28) -> dict[str, float]:
    """Training and extraction images/s of ``model`` (trained in place) in one setting, on
    random ``image_size`` px batches through the package's own training step and
    extraction loop (one untimed warm-up batch each)."""
    if channels_last:
        model = model.to(memory_format=torch.channels_last)
    g = torch.Generator().manual_seed(0)
    images, idx = torch.rand(batch, 3, image_size, image_size, generator=g), torch.arange(batch)
    labels = torch.randint(0, model.num_clusters, (batch,), generator=g)
    opt = torch.optim.SGD([p for n, p in model.named_parameters() if not n.startswith("head.")], lr=0.01,
                          momentum=0.9)
    head_opt = torch.optim.SGD(model.head.parameters(), lr=0.01)

    def run_train(n: int) -> None:
        train_one_epoch(model, [(images, idx)] * n, labels, opt, head_opt, CPU, 0, amp=amp,
                        channels_last=channels_last)

    def run_extract(n: int) -> None:
        for _ in iter_features(model.forward_features, [(images, idx)] * n, CPU, amp, channels_last):
            pass

    out = {}
    for name, run in (("train", run_train), ("extract", run_extract)):
        with eval_mode(model) if name == "extract" else torch.enable_grad():
            run(1)
            t0 = time.perf_counter()
            run(steps)
            out[name] = batch * steps / (time.perf_counter() - t0)
    return out


def table(r: dict) -> list[str]:
    """The Markdown rows: one per setting and phase, GFLOP/s and the fraction of the peak."""
    rows = ["| phase | precision, layout | images/s | FLOPs/image | GFLOP/s | peak at that precision (GFLOP/s) | "
            "fraction of the peak |", "|---|---|---:|---:|---:|---:|---:|"]
    for s in r["settings"]:
        for phase in ("train", "extract"):
            f = r["flops_per_image"]["train" if phase == "train" else "features"]
            rows.append(f"| {'training (fwd + bwd + SGD)' if phase == 'train' else 'extraction (fc7)'} | "
                        f"{s['name']} | {s[phase]:,.0f} | {f / 1e6:.1f} M | {s[phase + '_gflops']:.1f} | "
                        f"{s['peak']:.1f} | {s[phase + '_fraction']:.0%} |")
    return rows


def verdict(r: dict) -> str:
    """Whether the best training setting of each precision reaches the target fraction."""
    parts = []
    for prec in sorted({s["precision"] for s in r["settings"]}):
        best = max((s for s in r["settings"] if s["precision"] == prec), key=lambda s: s["train_fraction"])
        met = best["train_fraction"] >= TARGET
        short = f"missed, {100 * (TARGET - best['train_fraction']):.0f} points short ({best['train_fraction'] / TARGET:.2f} x the target)"
        parts.append(f"{prec}: best training {best['train_fraction']:.0%} ({best['name']}), " + ("met" if met else short))
    return f"Target (issue 23): training >= {TARGET:.0%} of the measured peak at its precision. " + "; ".join(parts)


def measure(args: argparse.Namespace) -> dict:
    """Peaks, FLOPs per image and every setting's throughput and fraction of the peak."""
    precisions = {"float32": ("none", torch.float32)}
    if native_bf16(CPU):
        precisions["bfloat16"] = ("bf16", torch.bfloat16)
    before = peaks_gflops(args.n, args.repeats)
    print(f"peak before: {before}", flush=True)
    torch.manual_seed(0)
    model = preset_model()
    state = {k: v.clone() for k, v in model.state_dict().items()}
    flops = flops_per_image(model)

    def fresh(weights: dict) -> torch.nn.Module:  # every setting starts from the same weights
        net = preset_model()
        net.load_state_dict(weights)
        return net

    settings = []
    for prec, (amp, _) in precisions.items():
        for cl in (False, True):
            s = {"name": f"{prec}, {'channels_last' if cl else 'contiguous'}", "precision": prec, "amp": amp,
                 "channels_last": cl, **throughput(fresh(state), amp, cl, args.batch, args.steps)}
            print(f"{s['name']}: train {s['train']:.0f} images/s, extract {s['extract']:.0f} images/s", flush=True)
            settings.append(s)
    after = peaks_gflops(args.n, args.repeats)
    print(f"peak after: {after}", flush=True)
    peaks = {p: {kind: max(before[p][kind], after[p][kind]) for kind in before[p]} for p in before}
    best = {p: max(v.values()) for p, v in peaks.items()}
    for s in settings:
        s["peak"] = best[s["precision"]]
        for phase, f in (("train", flops["train"]), ("extract", flops["features"])):
            s[f"{phase}_gflops"] = s[phase] * f / 1e9
            s[f"{phase}_fraction"] = s[f"{phase}_gflops"] / s["peak"]
    return {"machine": machine_info(), "threads": torch.get_num_threads(), "native_bf16": native_bf16(CPU),
            "matmul_n": args.n, "repeats": args.repeats, "batch": args.batch, "steps": args.steps,
            "peak_gflops": best, "peaks_gflops": peaks, "peaks_before": before, "peaks_after": after,
            "flops_per_image": flops, "settings": settings, "target_fraction": TARGET}


def _pair(r: dict, kind: str) -> str:
    p = r["peaks_gflops"]
    return f"{p['float32'][kind]:.1f} GFLOP/s float32, {p['bfloat16'][kind]:.1f} GFLOP/s bfloat16"


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--n", type=int, default=4096, help="side of the square matrices of the peak")
    ap.add_argument("--repeats", type=int, default=5, help="matmuls timed per precision (the best is kept)")
    ap.add_argument("--batch", type=int, default=256)
    ap.add_argument("--steps", type=int, default=5, help="timed batches per setting and phase")
    ap.add_argument("--quick", action="store_true", help="toy sizes (seconds), for the tests")
    ap.add_argument("--out", type=Path, default=None, help="write OUT.json and OUT.md instead of docs/")
    args = ap.parse_args(argv)
    if args.quick:
        args.n, args.repeats, args.batch, args.steps = 256, 2, 16, 1
    r = measure(args)
    f = r["flops_per_image"]
    text = "\n".join([
        f"`alexnet_small` at 28 px (presets' width, Sobel, dropout off, k = {K} head): {f['forward'] / 1e6:.1f} M "
        f"FLOPs per image forward, {f['train'] / 1e6:.1f} M forward + backward ({f['train'] / f['forward']:.2f} x), "
        f"{f['features'] / 1e6:.1f} M for the features (FlopCounterMode; a multiply-add is 2 FLOPs). "
        f"Peak (best of {r['repeats']}, before and after the runs, {r['threads']} thread(s)): `torch.matmul` of "
        f"{r['matmul_n']} x {r['matmul_n']} matrices {_pair(r, 'matmul')}; a 1 x 1 convolution "
        f"(8192 x {max(64, r['matmul_n'] // 4)} @ {max(64, r['matmul_n'] // 4)} x {max(64, r['matmul_n'] // 4)} "
        f"through oneDNN) {_pair(r, 'conv1x1')}; the larger of the two is the peak below. "
        f"Batch {r['batch']}, {r['steps']} timed batches per row.", "",
        *table(r), "", verdict(r) + ".", "", f"Machine: {machine_line(r['machine'])}.",
        "Command: `" + (f"OMP_NUM_THREADS={os.environ['OMP_NUM_THREADS']} " if "OMP_NUM_THREADS" in os.environ else "")
        + "python benchmarks/peak.py" + (" --quick" if args.quick else "") + (f" --out {args.out}" if args.out else "")
        + "`"])
    print(text)
    if args.out:
        write_text(args.out.with_suffix(".json"), json.dumps(r, indent=2))
        write_text(args.out.with_suffix(".md"), text + "\n")
        return 0
    write_text(DOCS / "benchmarks" / "peak.json", json.dumps(r, indent=2))
    replace_section(DOCS / "BENCHMARKS.md", "peak", text)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
