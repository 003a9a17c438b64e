"""Facts about the machine, recorded with every run, evaluation and benchmark result."""

from __future__ import annotations

import datetime as _dt
import os
import platform
from typing import Any


def machine_info() -> dict[str, Any]:
    """CPU model, usable cores, GPU, library versions and the date (local time, ISO 8601)."""
    import faiss
    import numpy
    import torch

    cpu = platform.processor() or platform.machine() or "unknown"
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    cpu = line.split(":", 1)[1].strip()
                    break
    except OSError:
        pass
    info: dict[str, Any] = {
        "cpu": cpu,
        "cores": len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count(),
        "torch": str(torch.__version__),
        "torch_threads": torch.get_num_threads(),
        "python": platform.python_version(),
        "faiss": faiss.__version__,
        "numpy": numpy.__version__,
        "host": platform.node(),
        "date": _dt.datetime.now().astimezone().isoformat(timespec="seconds"),
    }
    if torch.cuda.is_available():
        info["gpu"] = torch.cuda.get_device_name(0)
    return info


def machine_record() -> dict[str, str | int]:
    """:func:`machine_info` as a checkpoint keeps it: its string and integer values only."""
    return {k: v for k, v in machine_info().items() if isinstance(v, (str, int))}


def machine_line(info: dict[str, Any]) -> str:
    """One line for a document: ``2026-11-27 03:50 UTC: AMD EPYC, 2 cores, no GPU; Python ...``."""
    try:
        date = _dt.datetime.fromisoformat(str(info["date"])).astimezone(_dt.timezone.utc).strftime("%Y-%m-%d %H:%M UTC")
    except (KeyError, ValueError):
        date = str(info.get("date", "?"))
    gpu = f", GPU {info['gpu']}" if info.get("gpu") else ", no GPU"
    return (f"{date}: {info.get('cpu', '?')}, {info.get('cores', '?')} cores{gpu}; Python {info.get('python', '?')}, "
            f"torch {info.get('torch', '?')}, faiss {info.get('faiss', '?')}")
