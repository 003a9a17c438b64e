"""Process-group helpers on ``torch.distributed``. Without a process group: rank 0 of 1.

Launch with ``torchrun`` (it sets ``RANK``, ``WORLD_SIZE``, ``LOCAL_RANK``,
``MASTER_ADDR`` and ``MASTER_PORT``); :func:`init_distributed` joins that group with
NCCL on GPUs and gloo on CPU, with a timeout on every collective, so that a rank that
fails or stops makes the others exit with a one-line :class:`DistributedError` instead
of hanging. Every helper here is a no-op (or the identity) in a single process, so the
same code runs with and without ``torchrun``.

Features and assignments are addressed by data-set index, never by position:
:func:`shard_indices` splits ``0..N-1`` over the ranks (sizes differ by at most one, no
padding, no duplicates) and :func:`gather_by_index` reassembles ``(index, value)`` pairs
from every rank, checking that each index arrives exactly once.
"""

from __future__ import annotations

import logging
import os
from collections.abc import Iterator
from contextlib import contextmanager
from datetime import timedelta
from typing import Any, TypeVar

import numpy as np
import torch
import torch.distributed as dist

logger = logging.getLogger(__name__)

T = TypeVar("T")

DEFAULT_TIMEOUT_S = 1800.0
"""Collective timeout: long enough for rank 0 to cluster or write a checkpoint while the
others wait, short enough that a dead rank does not hold a GPU job for hours."""


class DistributedError(RuntimeError):
    """A collective failed or timed out (another rank failed or stopped), or the
    process group cannot be set up as asked; the message says which and what to do."""


def is_distributed() -> bool:
    return dist.is_available() and dist.is_initialized()


def rank() -> int:
    return dist.get_rank() if is_distributed() else 0


def world_size() -> int:
    return dist.get_world_size() if is_distributed() else 1


def local_rank() -> int:
    """This process's index on its node (``LOCAL_RANK`` from torchrun; 0 without it)."""
    return int(os.environ.get("LOCAL_RANK", "0"))


def is_main_process() -> bool:
    return rank() == 0


def launched_world_size() -> int:
    """World size a launcher asked for (``WORLD_SIZE``), 1 without one."""
    return int(os.environ.get("WORLD_SIZE", "1"))


# --------------------------------------------------------------------------- setup

def init_distributed(device: str = "cpu", timeout_s: float = DEFAULT_TIMEOUT_S) -> tuple[torch.device, bool]:
    """Join the process group described by torchrun's environment variables.

    NCCL when ``device`` is ``cuda`` (each rank on GPU ``LOCAL_RANK``), gloo on CPU.
    Without a launcher (or with ``WORLD_SIZE=1``) nothing is initialised and the run is
    single-process.

    Args:
        device: ``"cpu"``, ``"cuda"`` or ``"cuda:N"`` (``N`` is ignored under a launcher:
            each rank takes the GPU of its local rank).
        timeout_s: timeout of every collective, in seconds.

    Returns:
        ``(device, created)``: this rank's device, and whether this call created the
        process group (then the caller should :func:`cleanup` it).

    Raises:
        DistributedError: CUDA asked for but absent, fewer GPUs than local ranks, or the
            rendezvous failed.
    """
    cuda = device.startswith("cuda")
    if cuda and not torch.cuda.is_available():
        raise DistributedError(f"--device {device} requested but no CUDA GPU is available; use --device cpu")
    if timeout_s <= 0:
        raise ValueError(f"the collective timeout must be > 0 seconds, got {timeout_s}")
    if is_distributed():  # already set up (by a test harness or a caller)
        return (torch.device("cuda", torch.cuda.current_device()) if cuda else torch.device("cpu")), False
    world = launched_world_size()
    if world <= 1:
        return torch.device(device), False
    missing = [v for v in ("RANK", "MASTER_ADDR", "MASTER_PORT") if v not in os.environ]
    if missing:
        raise DistributedError(f"WORLD_SIZE={world} but {', '.join(missing)} not set; launch with torchrun")
    backend = "gloo"
    dev = torch.device("cpu")
    if cuda:
        n_gpu = torch.cuda.device_count()
        if local_rank() >= n_gpu:
            raise DistributedError(f"local rank {local_rank()} has no GPU (this node has {n_gpu}); "
                                   f"use torchrun --nproc-per-node {n_gpu}")
        dev = torch.device("cuda", local_rank())
        torch.cuda.set_device(dev)
        backend = "nccl"
    kwargs: dict[str, Any] = {"backend": backend, "timeout": timedelta(seconds=timeout_s)}
    if cuda:
        kwargs["device_id"] = dev
    try:
        dist.init_process_group(**kwargs)
    except (RuntimeError, ValueError) as e:
        raise DistributedError(f"rank {os.environ.get('RANK')}: joining the {backend} process group of "
                               f"{world} failed: {_first_line(e)}") from None
    logger.debug("rank %d/%d joined the %s group (timeout %.0fs) on %s", rank(), world_size(), backend, timeout_s, dev)
    return dev, True


def cleanup() -> None:
    """Leave the process group (a no-op without one)."""
    if is_distributed():
        try:
            dist.destroy_process_group()
        except (RuntimeError, ValueError) as e:  # a peer may already be gone
            logger.debug("destroy_process_group: %s", _first_line(e))


# --------------------------------------------------------------------------- collectives

def _first_line(e: BaseException) -> str:
    s = str(e).strip()
    return s.splitlines()[0] if s else type(e).__name__


@contextmanager
def collective_errors(op: str) -> Iterator[None]:
    """Turn a failed or timed-out collective into one clear :class:`DistributedError`."""
    try:
        yield
    except DistributedError:
        raise
    except RuntimeError as e:  # DistBackendError, gloo timeouts, closed connections
        if not is_distributed():  # no collective ran: an out-of-memory or shape error is itself
            raise
        raise DistributedError(
            f"rank {rank()} of {world_size()}: {op} failed ({_first_line(e)}); another rank has probably "
            "failed or stopped: see its log (train.rank<N>.log in the run directory) and the launcher's output"
        ) from None


def _comm_device() -> torch.device:
    """Where tensors must live for the group's backend (NCCL: the current GPU)."""
    if is_distributed() and dist.get_backend() == "nccl":
        return torch.device("cuda", torch.cuda.current_device())
    return torch.device("cpu")


def all_reduce_sum(t: torch.Tensor) -> torch.Tensor:
    """In-place sum over ranks (a no-op in a single process); returns ``t``.

    CPU tensors are staged through the GPU under NCCL, so callers need not care.
    """
    if not is_distributed():
        return t
    dev = _comm_device()
    with collective_errors("all_reduce"):
        if t.device == dev:
            dist.all_reduce(t, op=dist.ReduceOp.SUM)
        else:
            tmp = t.to(dev)
            dist.all_reduce(tmp, op=dist.ReduceOp.SUM)
            t.copy_(tmp)
    return t


def broadcast_(t: torch.Tensor, src: int = 0) -> torch.Tensor:
    """In place: every rank gets rank ``src``'s ``t`` (same shape and dtype everywhere)."""
    if not is_distributed():
        return t
    dev = _comm_device()
    with collective_errors("broadcast"):
        if t.device == dev:
            dist.broadcast(t, src)
        else:
            tmp = t.to(dev)
            dist.broadcast(tmp, src)
            t.copy_(tmp)
    return t


def broadcast_object(obj: T, src: int = 0) -> T:
    """Rank ``src``'s picklable ``obj`` on every rank (the identity in a single process)."""
    if not is_distributed():
        return obj
    box = [obj]
    with collective_errors("broadcast_object"):
        dist.broadcast_object_list(box, src=src, device=_comm_device())
    return box[0]


def all_gather_object(obj: T) -> list[T]:
    """Every rank's picklable ``obj``, in rank order (``[obj]`` in a single process).

    For small per-rank results (a few MB pickled): the objects travel whole, through
    the GPU under NCCL; arrays of features go through :func:`gather_by_index` instead.
    """
    if not is_distributed():
        return [obj]
    out: list[Any] = [None] * world_size()
    with collective_errors("all_gather_object"):
        dist.all_gather_object(out, obj)
    return out


def barrier() -> None:
    if is_distributed():
        with collective_errors("barrier"):
            if dist.get_backend() == "nccl":
                dist.barrier(device_ids=[torch.cuda.current_device()])
            else:
                dist.barrier()


def all_gather_counts(n_local: int) -> list[int]:
    """Every rank's ``n_local``, in rank order."""
    if not is_distributed():
        return [n_local]
    t = torch.tensor([n_local], dtype=torch.int64, device=_comm_device())
    out = [torch.zeros_like(t) for _ in range(world_size())]
    with collective_errors("all_gather"):
        dist.all_gather(out, t)
    return [int(c.item()) for c in out]


# --------------------------------------------------------------------------- sharding by index

def shard_indices(num_items: int, rank_: int | None = None, world: int | None = None) -> np.ndarray:
    """This rank's data-set indices: ``rank, rank + W, rank + 2W, ...`` (sorted).

    Every index belongs to exactly one rank; shard sizes differ by at most one, so no
    rank pads its shard with duplicates (the gather handles the unequal sizes).
    """
    r = rank() if rank_ is None else rank_
    w = world_size() if world is None else world
    return np.arange(r, num_items, w, dtype=np.int64)


def gather_by_index(indices: np.ndarray | torch.Tensor, values: np.ndarray | torch.Tensor, num_items: int,
                    chunk_bytes: int = 64 << 20) -> torch.Tensor:
    """Assemble ``(index, value)`` pairs from every rank into one array placed by index.

    Each rank passes its own pairs; every rank receives the whole array (on CPU). The
    transfer goes in row blocks of about ``chunk_bytes`` over all ranks, so the only
    large allocation is the result. Shards of unequal length are padded for the
    transfer with index ``-1``, and the padding is dropped: nothing is duplicated.

    Args:
        indices: ``(n_local,)`` data-set indices in ``[0, num_items)``.
        values: ``(n_local, *S)`` the value of each index (any dtype the backend carries).
        num_items: ``N``, the size of the result.

    Returns:
        ``(N, *S)`` tensor, row ``i`` holding the value sent with index ``i``.

    Raises:
        ValueError: an index out of range, an index sent twice, or an index nobody sent.
    """
    idx = torch.as_tensor(np.asarray(indices) if not isinstance(indices, torch.Tensor) else indices)
    idx = idx.to(torch.int64).flatten().cpu()
    vals = torch.as_tensor(values).cpu()
    if vals.shape[0] != idx.shape[0]:
        raise ValueError(f"gather_by_index: {idx.shape[0]} indices but {vals.shape[0]} values")
    if idx.numel() and (int(idx.min()) < 0 or int(idx.max()) >= num_items):
        raise ValueError(f"gather_by_index: indices must lie in [0, {num_items}), got "
                         f"[{int(idx.min())}, {int(idx.max())}]")
    out = torch.zeros((num_items, *vals.shape[1:]), dtype=vals.dtype)
    seen = torch.zeros(num_items, dtype=torch.int32)
    if not is_distributed():
        out[idx] = vals
        seen.index_add_(0, idx, torch.ones_like(idx, dtype=torch.int32))
    else:
        w, dev = world_size(), _comm_device()
        counts = all_gather_counts(int(idx.numel()))
        row_bytes = int(np.prod(vals.shape[1:], dtype=np.int64)) * vals.element_size()
        block = max(1, chunk_bytes // (row_bytes * w))
        for start in range(0, max(counts), block):
            stop = min(start + block, max(counts))
            ib = torch.full((stop - start,), -1, dtype=torch.int64)
            vb = torch.zeros((stop - start, *vals.shape[1:]), dtype=vals.dtype)
            mine = idx[start:stop]
            ib[: mine.numel()] = mine
            vb[: mine.numel()] = vals[start:stop]
            ib_all = [torch.empty_like(ib, device=dev) for _ in range(w)]
            vb_all = [torch.empty_like(vb, device=dev) for _ in range(w)]
            with collective_errors("all_gather (gather_by_index)"):
                dist.all_gather(ib_all, ib.to(dev))
                dist.all_gather(vb_all, vb.to(dev))
            for ib_r, vb_r in zip(ib_all, vb_all):
                ib_r, vb_r = ib_r.cpu(), vb_r.cpu()
                keep = ib_r >= 0
                ib_r = ib_r[keep]
                out[ib_r] = vb_r[keep]
                seen.index_add_(0, ib_r, torch.ones_like(ib_r, dtype=torch.int32))
    dup = int((seen > 1).sum())
    missing = int((seen == 0).sum())
    if dup or missing:
        first = int(torch.nonzero(seen != 1)[0])
        raise ValueError(f"gather_by_index: {missing} of {num_items} indices missing and {dup} sent more than "
                         f"once (first: {first}); every index must come from exactly one rank")
    return out
