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

    python benchmarks/gpu.py --smoke         # first, under a minute: every CUDA path once, PASS/FAIL/SKIP
    python benchmarks/gpu.py                 # on a GPU machine: writes docs/benchmarks/gpu.md
    python benchmarks/gpu.py --tiny          # seconds on CPU (tests/test_scale_benchmarks.py)

``--smoke`` runs each check once on tiny inputs and prints one line per check
(``PASS``/``FAIL``/``SKIP name: detail``); it exits 1 if any check failed. Without CUDA
every check is a SKIP and the exit status 0; ``--smoke --device cpu`` runs the same
checks on the CPU (gloo in place of NCCL), which the test suite does.
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

from deepcluster import distributed as D  # noqa: E402
from deepcluster.clustering import faiss_has_gpu, kmeans  # noqa: E402
from deepcluster.models import create_model  # noqa: E402
from deepcluster.features import eval_mode, iter_features  # noqa: E402
from deepcluster.optim import train_one_epoch  # noqa: E402
from deepcluster.runtime import autocast  # noqa: E402

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


# --------------------------------------------------------------------------- --smoke: every CUDA path once

SMOKE_CHECKS = ("train_step", "bf16_autocast", "channels_last", "kmeans_torch", "faiss_gpu", "process_group")


def _tiny_model(device: torch.device, k: int = 4) -> torch.nn.Module:
    torch.manual_seed(0)
    return create_model("alexnet_small", sobel=True, num_clusters=k, image_size=28, width=0.25, fc_dim=64).to(device)


def _tiny_step(device: torch.device, amp: str, channels_last: bool) -> tuple[torch.nn.Module, float, float]:
    """Two training steps of ``alexnet_small`` on 2 batches of 16 (28 px) through
    :func:`train_one_epoch`: ``(model, loss, largest change of a weight)``."""
    model = _tiny_model(device)
    if channels_last:
        model = model.to(memory_format=torch.channels_last)
    g = torch.Generator().manual_seed(0)
    batches = [(torch.rand(16, 3, 28, 28, generator=g), torch.arange(i * 16, i * 16 + 16)) for i in range(2)]
    labels = torch.arange(32) % 4
    before = [p.detach().clone() for p in model.parameters()]
    opt = torch.optim.SGD([p for n, p in model.named_parameters() if not n.startswith("head.")], lr=0.05,
                          momentum=0.9)
    head_opt = torch.optim.SGD(model.head.parameters(), lr=0.05)
    stats = train_one_epoch(model, batches, labels, opt, head_opt, device, 0, amp=amp, channels_last=channels_last)
    moved = max(float((p.detach() - b).abs().max()) for p, b in zip(model.parameters(), before))
    return model, float(stats["loss"]), moved


def smoke_train_step(device: torch.device) -> str:
    _, loss, moved = _tiny_step(device, "none", False)
    if not (moved > 0 and loss == loss):
        raise AssertionError(f"the weights did not change (loss {loss})")
    return f"2 steps float32, loss {loss:.3f}, largest weight change {moved:.2e}"


def smoke_bf16(device: torch.device) -> str:
    model, loss, moved = _tiny_step(device, "bf16", False)
    with torch.no_grad(), autocast(device, "bf16"):
        out = model.eval()(torch.rand(4, 3, 28, 28, device=device))
    if out.dtype != torch.bfloat16 or not moved > 0:
        raise AssertionError(f"autocast bf16 gave {out.dtype} (weights moved {moved})")
    return f"2 steps under autocast, output {out.dtype}, loss {loss:.3f}"


def smoke_channels_last(device: torch.device) -> str:
    model, loss, _ = _tiny_step(device, "none", True)
    x = torch.rand(8, 3, 28, 28, device=device)
    with torch.no_grad():
        model.eval()
        a = model.forward_features(x.contiguous(memory_format=torch.channels_last))
        b = model.to(memory_format=torch.contiguous_format).forward_features(x)
    err = float((a - b).abs().max() / b.abs().max().clamp_min(1e-12))
    if err > 1e-3:
        raise AssertionError(f"channels_last features differ from contiguous ones by {err:.2e} (relative)")
    return f"2 steps, features equal to the contiguous layout's (relative error {err:.1e})"


def _blobs(k: int = 8, per: int = 250, d: int = 16) -> torch.Tensor:
    """``(k * per, d)`` points around ``k`` random centres."""
    g = torch.Generator().manual_seed(0)
    centres = torch.randn(k, d, generator=g) * 5
    return centres.repeat_interleave(per, 0) + 0.1 * torch.randn(k * per, d, generator=g)


def _same_partition(a, b) -> bool:
    """Whether two labellings group the points identically (up to renaming)."""
    pairs = {(int(x), int(y)) for x, y in zip(a, b)}
    return len(pairs) == len({x for x, _ in pairs}) == len({y for _, y in pairs})


def _smoke_kmeans(device: torch.device, backend: str) -> str:
    x = _blobs()
    res = kmeans(x.numpy(), 8, niter=20, seed=0, backend=backend, device=device if backend == "torch" else None)
    ref = kmeans(x.numpy(), 8, niter=20, seed=0, backend="torch", device="cpu")
    if not _same_partition(res.assignments, ref.assignments):
        raise AssertionError(f"{backend} on {device} grouped the points unlike torch on the CPU")
    return f"{len(x)} x {x.shape[1]}, k=8: the same partition as torch on the CPU, loss {res.loss:.4f}"


def smoke_kmeans_torch(device: torch.device) -> str:
    return _smoke_kmeans(device, "torch")


def smoke_faiss_gpu(device: torch.device) -> str | None:
    """``None`` (a SKIP) where faiss has no GPU support."""
    return _smoke_kmeans(device, "faiss-gpu") if device.type == "cuda" and faiss_has_gpu() else None


def smoke_process_group(device: torch.device) -> str:
    """A group of 1 (NCCL on CUDA, gloo on CPU), joined through :func:`D.init_distributed`."""
    import socket

    import torch.distributed as dist

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), RANK="0", WORLD_SIZE="1", LOCAL_RANK="0")
    backend = "nccl" if device.type == "cuda" else "gloo"
    kwargs = {"device_id": device} if device.type == "cuda" else {}
    dist.init_process_group(backend, rank=0, world_size=1, **kwargs)  # init_distributed makes none for 1 process
    try:
        dev, created = D.init_distributed(device.type, timeout_s=60)
        t = torch.arange(4, dtype=torch.float32, device=dev)
        D.all_reduce_sum(t)
        cpu = D.all_reduce_sum(torch.ones(3))  # staged through the GPU under NCCL
        got = D.all_gather_object({"rank": D.rank()})
        if t.tolist() != [0, 1, 2, 3] or cpu.tolist() != [1, 1, 1] or got != [{"rank": 0}] or created:
            raise AssertionError(f"all_reduce gave {t.tolist()} / {cpu.tolist()}, all_gather_object {got}")
        return f"{dist.get_backend()} group of {D.world_size()}: all_reduce, all_gather_object"
    finally:
        D.cleanup()


def smoke(device_name: str | None) -> int:
    """Run every check once; one line each; ``1`` if any failed, else ``0``."""
    device = torch.device(device_name or "cuda")
    if device.type == "cuda" and device.index is None:
        device = torch.device("cuda", 0)
    checks = dict(zip(SMOKE_CHECKS, (smoke_train_step, smoke_bf16, smoke_channels_last, smoke_kmeans_torch,
                                     smoke_faiss_gpu, smoke_process_group)))
    have = device.type == "cpu" or torch.cuda.is_available()
    where = torch.cuda.get_device_name(device) if device.type == "cuda" and have else device.type
    print(f"smoke test on {where if have else 'no CUDA device'} (torch {torch.__version__})", flush=True)
    failed = 0
    for name, check in checks.items():
        t0 = time.perf_counter()
        try:
            detail = check(device) if have else None
            status = "PASS" if detail is not None else "SKIP"
            detail = detail or ("no CUDA device" if not have else "faiss without GPU support, or not on CUDA")
        except Exception as e:  # noqa: BLE001 - every failure is one line, and the other checks still run
            status, detail = "FAIL", f"{type(e).__name__}: {str(e).strip().splitlines()[0] if str(e).strip() else ''}"
            failed += 1
        print(f"{status} {name}: {detail} ({time.perf_counter() - t0:.1f} s)", flush=True)
    return 1 if failed else 0


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--smoke", action="store_true", help="every CUDA path once, PASS/FAIL/SKIP lines (< 60 s)")
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
    if a.smoke:
        return smoke(a.device)
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
