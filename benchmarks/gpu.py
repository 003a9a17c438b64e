"""GPU throughput of the three DeepCluster phases, on synthetic data already on the device.

1. **train**: AlexNet (Sobel, BN) at 224 px, head of ``--k`` clusters, SGD as in the
   paper, through :func:`deepcluster.optim.train_one_epoch` (the training loop's own
   step) with ``--amp bf16`` and ``channels_last``; images/s after a warm-up.
2. **extract**: :func:`deepcluster.features.iter_features` (eval mode, fc7 before ReLU,
   copied back to the host as in the loop); images/s.
3. **k-means**: ``kmeans(backend="torch")`` on 1,281,167 x 256 unit vectors on the
   GPU, k = 10,000, 20 iterations (ImageNet at the paper's k); seconds. Target: < 15 s.
   Also ``faiss-gpu`` when faiss has GPU support.

Made to fit one device call of at most 8 minutes on an H100/H200 (about a minute of
work plus start-up). ``--tiny`` runs the same code at toy sizes on whatever device
exists (the CPU here), which the test suite does.

    python benchmarks/gpu.py                 # on a GPU machine: writes docs/benchmarks/gpu.md
    python benchmarks/gpu.py --tiny          # seconds on CPU (tests/test_scale_benchmarks.py)
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from pathlib import Path

os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")  # see benchmarks/kmeans.py

import torch  # noqa: E402

from deepcluster.clustering import faiss_has_gpu, kmeans  # noqa: E402
from deepcluster.models import create_model  # noqa: E402
from deepcluster.features import eval_mode, iter_features  # noqa: E402
from deepcluster.optim import train_one_epoch  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def bench_train(model, device, batch, steps, warmup, amp, channels_last, k) -> float:
    """Images/s of the training step on one synthetic batch reused ``steps`` times."""
    images = torch.randn(batch, 3, model.image_size, model.image_size, device=device)
    idx = torch.arange(batch)
    labels = torch.randint(0, k, (batch,))
    params = [p for n, p in model.named_parameters() if not n.startswith("head.")]
    opt = torch.optim.SGD(params, lr=0.05, momentum=0.9, weight_decay=1e-5)
    head_opt = torch.optim.SGD(model.head.parameters(), lr=0.05, momentum=0.9, weight_decay=1e-5)
    scaler = torch.amp.GradScaler(device.type) if amp == "fp16" else None
    run = lambda n: train_one_epoch(model, [(images, idx)] * n, labels, opt, head_opt, device, 0,  # noqa: E731
                                    amp=amp, channels_last=channels_last, scaler=scaler)
    run(warmup)
    sync(device)
    t0 = time.perf_counter()
    stats = run(steps)
    sync(device)
    return stats["images"] / (time.perf_counter() - t0)


def bench_extract(model, device, batch, steps, warmup, amp, channels_last) -> float:
    images = torch.randn(batch, 3, model.image_size, model.image_size, device=device)
    idx = torch.arange(batch)
    with eval_mode(model):
        for _ in iter_features(model.forward_features, [(images, idx)] * warmup, device, amp, channels_last):
            pass
        sync(device)
        t0 = time.perf_counter()
        n = 0
        for i, _, _ in iter_features(model.forward_features, [(images, idx)] * steps, device, amp, channels_last):
            n += len(i)
    sync(device)
    return n / (time.perf_counter() - t0)


def bench_kmeans(device, n, d, k, niter, backend) -> tuple[float, float, int]:
    g = torch.Generator(device=device).manual_seed(0)
    x = torch.randn(n, d, device=device, generator=g)
    x /= x.norm(dim=1, keepdim=True)
    if backend == "faiss-gpu":
        x = x.cpu().numpy()  # faiss takes host arrays and copies them per search
    sync(device)
    t0 = time.perf_counter()
    res = kmeans(x, k, niter=niter, seed=0, backend=backend, device=device if backend == "torch" else None)
    sync(device)
    return time.perf_counter() - t0, res.loss, res.n_empty_fixed


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--tiny", action="store_true", help="toy sizes on any device (CPU test)")
    p.add_argument("--device", default=None, help="default: cuda if available, else cpu")
    p.add_argument("--batch", type=int, default=256)
    p.add_argument("--steps", type=int, default=60)
    p.add_argument("--warmup", type=int, default=10)
    p.add_argument("--amp", choices=["none", "bf16", "fp16"], default="bf16")
    p.add_argument("--no-channels-last", dest="channels_last", action="store_false")
    p.add_argument("--k", type=int, default=10_000, help="head size and k-means k")
    p.add_argument("--kmeans-n", type=int, default=1_281_167)
    p.add_argument("--kmeans-dim", type=int, default=256)
    p.add_argument("--kmeans-iters", type=int, default=20)
    p.add_argument("--out", default=None, help="Markdown file (default docs/benchmarks/gpu[-tiny].md)")
    a = p.parse_args(argv)
    if a.tiny:
        a.batch, a.steps, a.warmup, a.k = 4, 2, 1, 20
        a.kmeans_n, a.kmeans_dim, a.kmeans_iters = 2000, 32, 3
    device = torch.device(a.device or ("cuda" if torch.cuda.is_available() else "cpu"))
    if device.type == "cuda" and not torch.cuda.is_available():
        raise SystemExit("benchmarks/gpu.py: error: --device cuda but no CUDA GPU is available; use --tiny on CPU")
    if device.type == "cpu" and not a.tiny:
        print("note: no GPU; the full sizes on CPU take long: use --tiny", file=sys.stderr)
    if device.type == "cuda":
        torch.backends.cudnn.benchmark = True
    amp = a.amp if (device.type == "cuda" or a.amp != "fp16") else "bf16"
    name = torch.cuda.get_device_name(device) if device.type == "cuda" else "CPU"

    t_all = time.perf_counter()
    torch.manual_seed(0)
    model = create_model("alexnet", sobel=True, num_clusters=a.k, image_size=224).to(device)
    if a.channels_last:
        model = model.to(memory_format=torch.channels_last)
    r: dict = {"device": name, "torch": torch.__version__, "batch": a.batch, "amp": amp,
               "channels_last": a.channels_last, "k": a.k}
    r["train_images_per_s"] = bench_train(model, device, a.batch, a.steps, a.warmup, amp, a.channels_last, a.k)
    print(f"train   : {r['train_images_per_s']:10.0f} images/s (AlexNet 224 px, batch {a.batch}, {amp}, "
          f"channels_last={a.channels_last})", flush=True)
    r["extract_images_per_s"] = bench_extract(model, device, a.batch, a.steps, a.warmup, amp, a.channels_last)
    print(f"extract : {r['extract_images_per_s']:10.0f} images/s", flush=True)
    del model
    if device.type == "cuda":
        r["train_peak_gpu_gib"] = torch.cuda.max_memory_allocated(device) / 2**30
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats(device)
    kinfo = f"{a.kmeans_n:,} x {a.kmeans_dim}, k={a.k:,}, {a.kmeans_iters} iterations"
    sec, loss, fixed = bench_kmeans(device, a.kmeans_n, a.kmeans_dim, a.k, a.kmeans_iters, "torch")
    r.update(kmeans_torch_s=sec, kmeans_torch_loss=loss, kmeans_empty_reseeded=fixed, kmeans=kinfo)
    print(f"k-means : {sec:10.2f} s torch ({kinfo}; loss {loss:.4f}, {fixed} empty re-seeded)", flush=True)
    if device.type == "cuda":
        r["kmeans_peak_gpu_gib"] = torch.cuda.max_memory_allocated(device) / 2**30
        if faiss_has_gpu():
            sec, loss, _ = bench_kmeans(device, a.kmeans_n, a.kmeans_dim, a.k, a.kmeans_iters, "faiss-gpu")
            r.update(kmeans_faiss_gpu_s=sec, kmeans_faiss_gpu_loss=loss)
            print(f"k-means : {sec:10.2f} s faiss-gpu", flush=True)
    r["total_s"] = time.perf_counter() - t_all
    target = "met" if r["kmeans_torch_s"] < 15 else "missed"
    lines = [
        f"Command: `python benchmarks/gpu.py {' '.join(argv if argv is not None else sys.argv[1:])}` on {name}, "
        f"torch {torch.__version__} (synthetic data on the device).", "",
        "| phase | result |", "|---|---|",
        f"| train (AlexNet-Sobel 224 px, batch {a.batch}, {amp}, channels_last={a.channels_last}) | "
        f"{r['train_images_per_s']:,.0f} images/s |",
        f"| extract (fc7, eval, to host) | {r['extract_images_per_s']:,.0f} images/s |",
        f"| k-means torch ({kinfo}) | {r['kmeans_torch_s']:.2f} s (target < 15 s: {target}) |",
    ]
    if "kmeans_faiss_gpu_s" in r:
        lines.append(f"| k-means faiss-gpu (same) | {r['kmeans_faiss_gpu_s']:.2f} s |")
    out = Path(a.out) if a.out else ROOT / "docs" / "benchmarks" / f"gpu{'-tiny' if a.tiny else ''}.md"
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text("\n".join(lines) + "\n\n```json\n" + json.dumps(r, indent=1) + "\n```\n")
    print(json.dumps(r))
    return 0


if __name__ == "__main__":
    sys.exit(main())
