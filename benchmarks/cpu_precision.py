"""How much faster does DeepCluster train on a CPU in bfloat16 and channels_last?

Times, in one process and alternating the settings round by round (so each sees the
same machine load), one SGD step on a batch of Fashion-MNIST-sized inputs (what the
training phase of an epoch repeats) and one feature forward pass (what the extraction
phase repeats), for float32 / float32 + channels_last / bfloat16 autocast /
bfloat16 + channels_last, with the ``alexnet_small`` of the presets. Also reports how
close the bfloat16 features are to the float32 ones (cosine per image).

    python benchmarks/cpu_precision.py                      # 5 rounds x 10 steps, batch 256
    python benchmarks/cpu_precision.py --rounds 1 --steps 1 --batch 8 --out /tmp/x   # quick

Writes ``docs/benchmarks/cpu_precision.json`` and the table in ``docs/BENCHMARKS.md``
(between the markers of its section), or ``OUT.json`` / ``OUT.md`` with ``--out``.
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from epoch_overhead import replace_section  # noqa: E402
from machine import machine_info, machine_line  # noqa: E402

from deepcluster.config import resolve  # noqa: E402
from deepcluster.runtime import autocast, native_bf16
from deepcluster.train import build_model  # noqa: E402

DOCS = Path(__file__).resolve().parent.parent / "docs"
SETTINGS = [("float32", "none", False), ("float32 + channels_last", "none", True),
            ("bf16", "bf16", False), ("bf16 + channels_last", "bf16", True)]


def preset_model():
    """The presets' ``alexnet_small`` at 28 px without dropout, k = 100 head."""
    return build_model(resolve(overrides={"model": {"dropout": 0.0}}), 28, 100)


def seconds_per_call(fn, steps: int):
    """Mean seconds of ``steps`` calls of ``fn`` after one untimed warm-up call (oneDNN
    picks and caches its kernels on the first); the last call's result."""
    out = fn()
    t0 = time.perf_counter()
    for _ in range(steps):
        out = fn()
    return (time.perf_counter() - t0) / steps, out


def time_setting(amp: str, channels_last: bool, x: torch.Tensor, y: torch.Tensor, steps: int,
                 state: dict) -> tuple[float, float, torch.Tensor]:
    """Seconds per training step and per feature forward; the features of ``x``."""
    cpu = torch.device("cpu")
    model = preset_model()
    model.load_state_dict(state)
    fmt = torch.channels_last if channels_last else torch.contiguous_format
    model = model.to(memory_format=fmt)
    xs = x.contiguous(memory_format=fmt)
    opt = torch.optim.SGD(model.parameters(), lr=0.01, momentum=0.9)

    def train_step() -> None:
        with autocast(cpu, amp):
            loss = torch.nn.functional.cross_entropy(model(xs), y)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()

    def features() -> torch.Tensor:
        with torch.no_grad(), autocast(cpu, amp):
            return model.forward_features(xs)

    model.train()
    train_s, _ = seconds_per_call(train_step, steps)
    model.load_state_dict(state)  # the features of the same weights in every setting
    model.eval()
    forward_s, feats = seconds_per_call(features, steps)
    return train_s, forward_s, feats.float()


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--rounds", type=int, default=5)
    ap.add_argument("--steps", type=int, default=10, help="timed steps per setting and round")
    ap.add_argument("--batch", type=int, default=256)
    ap.add_argument("--out", type=Path, default=None, help="write OUT.json and OUT.md instead of docs/")
    args = ap.parse_args(argv)
    gen = torch.Generator().manual_seed(0)
    x = torch.rand(args.batch, 3, 28, 28, generator=gen)
    y = torch.randint(0, 100, (args.batch,), generator=gen)
    torch.manual_seed(0)
    state = preset_model().state_dict()
    times: dict[str, dict[str, list[float]]] = {name: {"train": [], "forward": []} for name, _, _ in SETTINGS}
    feats: dict[str, torch.Tensor] = {}
    for r in range(args.rounds):
        for name, amp, cl in SETTINGS:
            tr, fw, feats[name] = time_setting(amp, cl, x, y, args.steps, state)
            times[name]["train"].append(tr)
            times[name]["forward"].append(fw)
        print(f"round {r}: " + ", ".join(f"{n} {times[n]['train'][-1]:.3f}s" for n, _, _ in SETTINGS), flush=True)
    med = {n: {k: statistics.median(v) for k, v in t.items()} for n, t in times.items()}
    ref = feats["float32"]
    cos = {n: torch.nn.functional.cosine_similarity(f, ref, dim=1) for n, f in feats.items()}
    base = med["float32"]
    rows = ["| setting | train step (s) | speed-up | feature forward (s) | speed-up | fc7: 1 - cosine to float32, max / mean |",
            "|---|---:|---:|---:|---:|---|"]
    for n, _, _ in SETTINGS:
        rows.append(f"| {n} | {med[n]['train']:.3f} | {base['train'] / med[n]['train']:.2f}x | "
                    f"{med[n]['forward']:.3f} | {base['forward'] / med[n]['forward']:.2f}x | "
                    f"{1 - cos[n].min().item():.1e} / {1 - cos[n].mean().item():.1e} |")
    info = machine_info()
    cpu = torch.device("cpu")
    text = "\n".join([
        f"alexnet_small at 28 px (Sobel, no dropout), batch {args.batch}, k = 100 head; median of {args.rounds} "
        f"alternating rounds of {args.steps} timed steps; {torch.get_num_threads()} thread(s). Native bfloat16 on "
        f"this CPU (oneDNN): {'yes' if native_bf16(cpu) else 'no (bf16 is emulated: expect it slower)'}.", "",
        *rows, "", f"Machine: {machine_line(info)}.",
        "Command: `python benchmarks/cpu_precision.py" + (f" --rounds {args.rounds}" if args.rounds != 5 else "")
        + (f" --steps {args.steps}" if args.steps != 10 else "") + (f" --batch {args.batch}" if args.batch != 256 else "")
        + "`"])
    print(text)
    result = {"machine": info, "batch": args.batch, "rounds": args.rounds, "steps": args.steps,
              "native_bf16": native_bf16(cpu), "median_s": med, "raw_s": times,
              "cosine_min": {n: c.min().item() for n, c in cos.items()},
              "cosine_mean": {n: c.mean().item() for n, c in cos.items()}}
    if args.out:
        args.out.with_suffix(".json").write_text(json.dumps(result, indent=2))
        args.out.with_suffix(".md").write_text(text + "\n")
        return 0
    (DOCS / "benchmarks").mkdir(parents=True, exist_ok=True)
    (DOCS / "benchmarks" / "cpu_precision.json").write_text(json.dumps(result, indent=2))
    replace_section(DOCS / "BENCHMARKS.md", "cpu_precision", text)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
