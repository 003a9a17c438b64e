"""The process a run lives in: seeds, devices, precision, and stopping on a signal.

Nothing here knows DeepCluster: these are the facilities the training loop, the
evaluations and the export share (one definition of "bf16 where native", one autocast).
"""

from __future__ import annotations

import logging
import os
import random
import signal
import sys
import time
from collections.abc import Callable, Iterable, Iterator
from typing import TypeVar

import numpy as np
import torch

from .distributed import is_main_process

logger = logging.getLogger(__name__)

AMP_DTYPES = {"bf16": torch.bfloat16, "fp16": torch.float16}
PROGRESS_INTERVAL = 30.0
"""Seconds between two progress lines when stderr is not a terminal (:func:`progress`)."""

T = TypeVar("T")


def epoch_seed(seed: int, epoch: int, salt: int = 0) -> int:
    """A 63-bit seed for ``(seed, epoch, salt)``: independent streams per phase."""
    return int(np.random.default_rng([seed, epoch, salt]).integers(0, 2**63 - 1))


def seed_everything(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed % 2**32)
    torch.manual_seed(seed)


def set_deterministic(on: bool) -> None:
    """Deterministic kernels (slower on GPU); needed for bit-identical resume on GPU."""
    torch.use_deterministic_algorithms(on, warn_only=False)
    torch.backends.cudnn.deterministic = on
    torch.backends.cudnn.benchmark = not on
    if on:
        os.environ.setdefault("CUBLAS_WORKSPACE_CONFIG", ":4096:8")


def resolve_device(name: str) -> torch.device:
    """``torch.device(name)``, or a one-line error when CUDA is asked for and absent."""
    if name.startswith("cuda") and not torch.cuda.is_available():
        raise ValueError("--device cuda requested but no CUDA GPU is available; use --device cpu")
    return torch.device(name)


def native_bf16(device: torch.device) -> bool:
    """Whether ``device`` computes in bfloat16 in hardware: a CUDA device of compute
    capability 8 or newer, or a CPU whose oneDNN reports native bfloat16 (AVX512-BF16 or
    AMX). Emulated bfloat16 is correct but slower than float32 on a CPU."""
    if device.type == "cuda":
        return torch.cuda.is_bf16_supported(including_emulation=False)
    if device.type == "cpu":
        try:  # oneDNN's own check; private in torch 2.x, so a missing op counts as "no"
            return bool(torch.backends.mkldnn.is_available() and torch.ops.mkldnn._is_mkldnn_bf16_supported())
        except (AttributeError, RuntimeError):
            return False
    return False


def resolve_amp(amp: str, device: torch.device) -> str:
    """``auto`` -> ``bf16`` where :func:`native_bf16`, else ``none``; other values unchanged."""
    if amp != "auto":
        return amp
    return "bf16" if native_bf16(device) else "none"


def autocast(device: torch.device, amp: str = "none"):
    """Mixed-precision context for ``amp`` (``none``, ``bf16``, ``fp16``) on ``device``."""
    return torch.autocast(device_type=device.type, dtype=AMP_DTYPES.get(amp, torch.float32), enabled=amp != "none")


def to_device(images: torch.Tensor, device: torch.device, channels_last: bool = False) -> torch.Tensor:
    """``(B, 3, H, W)`` batch on ``device`` (channels_last layout when asked)."""
    images = images.to(device, non_blocking=True)
    return images.contiguous(memory_format=torch.channels_last) if channels_last else images


def per_rank_batch_size(batch_size: int, world: int, warn: Callable[[str], None] | None = None) -> int:
    """Images per rank and step for a *global* batch of ``batch_size``.

    A global batch that the world size does not divide is rounded up to the next
    multiple (``warn`` is told, by default the log): e.g. 250 on 3 ranks gives 84 per
    rank, 252 per step.
    """
    per = -(-batch_size // world)
    if per * world != batch_size and is_main_process():
        (warn or logger.warning)(f"batch size {batch_size} is not a multiple of the world size {world}: using {per} per rank "
             f"({per * world} per step)")
    return per


class graceful_stop:
    """SIGTERM/SIGINT while the block runs: stop at once, keep the last checkpoint.

    The first signal interrupts immediately: the last complete checkpoint is the resume
    point and the epoch in progress is redone on resume (a write in progress is
    abandoned by :func:`~deepcluster.io.atomic_write`, leaving the previous file). The
    ``KeyboardInterrupt`` that leaves carries ``(signum, message)``, the message from
    ``describe()`` (say, how to resume): the CLI prints it and exits with 128 + signum
    (130 SIGINT, 143 SIGTERM). ``describe`` returning ``None`` leaves the plain
    interrupt to the caller.
    """

    def __init__(self, describe: Callable[[str], str | None] = lambda name: None) -> None:
        self.describe = describe

    def __enter__(self) -> "graceful_stop":
        self.old = {}
        for sig in (signal.SIGTERM, signal.SIGINT):
            try:
                self.old[sig] = signal.signal(sig, self._handler)
            except ValueError:  # not the main thread
                pass
        return self

    @staticmethod
    def _handler(signum, frame) -> None:
        raise KeyboardInterrupt(signum)

    def __exit__(self, exc_type, exc, tb) -> None:
        for sig, h in self.old.items():
            signal.signal(sig, h)
        if exc_type is not KeyboardInterrupt:
            return
        signum = exc.args[0] if exc.args and isinstance(exc.args[0], int) else signal.SIGINT
        msg = self.describe(signal.Signals(signum).name)
        if msg is not None:
            raise KeyboardInterrupt(signum, msg) from None


def _batch_images(item: object) -> int | None:
    """Images in a loader's batch ``(images (B, ...), indices, ...)``: ``B``; ``None`` for
    anything else (then only steps are counted)."""
    first = item[0] if isinstance(item, (tuple, list)) and item else None
    return len(first) if isinstance(first, torch.Tensor) and first.ndim >= 1 else None


def _clock_text(seconds: float) -> str:
    """``seconds`` as ``m:ss`` or ``h:mm:ss``."""
    m, sec = divmod(int(round(seconds)), 60)
    return f"{m // 60}:{m % 60:02d}:{sec:02d}" if m >= 60 else f"{m}:{sec:02d}"


def _progress_line(desc: str, steps: int, total: int | None, images: int | None, elapsed: float) -> str:
    """``"train 3: 120/469 steps, 30720 images, 1024 images/s, ETA 5:41"`` (rates over ``elapsed`` s)."""
    done = f"{steps}/{total} steps" if total else f"{steps} steps"
    if images is not None:
        done += f", {images} images"
    count, unit = (images, "images") if images is not None else (steps, "steps")
    rate = count / elapsed if elapsed > 0 else float("inf")
    line = f"{desc}: {done}, {rate:.{1 if rate < 100 else 0}f} {unit}/s"
    if total and steps < total and elapsed > 0:
        line += f", ETA {_clock_text((total - steps) * elapsed / steps)}"
    return line


def progress(iterable: Iterable[T], desc: str, total: int | None = None, *, interval: float | None = None,
             clock: Callable[[], float] = time.monotonic) -> Iterator[T]:
    """``iterable``'s items, with progress shown: a tqdm bar when stderr is a terminal, else
    an INFO log line every ``interval`` seconds (steps done of ``total``, images done when
    the items are batches ``(images (B, ...), ...)``, rate and ETA) and, if any was logged,
    one when the iteration ends. Silent on ranks other than 0 (``torch.distributed``).

    Args:
        iterable: the loader (or any iterable); its ``len`` is the default ``total``.
        desc: what is being done (``"train 3"``, ``"extract"``), the line's prefix.
        total: steps expected (default ``len(iterable)`` when it has one).
        interval: seconds between log lines (time-based, by ``clock``; default
            :data:`PROGRESS_INTERVAL`, read at the call).
        clock: monotonic seconds (a fake one in tests).
    """
    if total is None:
        try:
            total = len(iterable)  # type: ignore[arg-type]
        except TypeError:
            total = None
    if not is_main_process():
        yield from iterable
        return
    if getattr(sys.stderr, "isatty", lambda: False)():
        from tqdm import tqdm

        yield from tqdm(iterable, desc=desc, total=total, leave=False)
        return
    interval = PROGRESS_INTERVAL if interval is None else interval
    t0 = last = now = clock()
    steps, images = 0, 0
    counted = True
    for item in iterable:
        yield item
        steps += 1
        b = _batch_images(item)
        counted = counted and b is not None
        images += b or 0
        now = clock()
        if now - last >= interval:
            last = now
            logger.info(_progress_line(desc, steps, total, images if counted else None, now - t0))
    if last > t0 and last < now:  # a long iteration: its last line too (unless just logged)
        logger.info(_progress_line(desc, steps, total, images if counted else None, now - t0))
