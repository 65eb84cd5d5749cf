"""Small process helpers shared by every layer: rank info, a rank-aware logger, collectives
that are no-ops without a process group (and their timeout), and a free port. How a launcher's
environment becomes this process's world is launch_env.py's.

Part of lmforge's core: it imports nothing of lmforge above the core, so every layer, from the
model up to the launcher, may use it (docs/architecture.md).
"""

from __future__ import annotations

import os
import socket
import sys
from datetime import timedelta

import torch
import torch.distributed as dist

from lmforge.pretrain.core.errors import TrainingError

DEFAULT_TIMEOUT_S = 1800.0  # parallel.timeout_s
_timeout = timedelta(seconds=DEFAULT_TIMEOUT_S)


def rank() -> int:
    if dist.is_available() and dist.is_initialized():
        return dist.get_rank()
    return int(os.environ.get("RANK", "0"))


def world_size() -> int:
    if dist.is_available() and dist.is_initialized():
        return dist.get_world_size()
    return int(os.environ.get("WORLD_SIZE", "1"))


def is_main() -> bool:
    return rank() == 0


def print0(*args, **kwargs) -> None:
    """Print on rank 0 only (logs are rank 0's; errors are printed by every rank)."""
    if is_main():
        kwargs.setdefault("flush", True)
        print(*args, **kwargs)


def eprint(msg: str) -> None:
    """Print an error line on stderr, naming the rank when there are several."""
    prefix = f"[rank {rank()}] " if world_size() > 1 else ""
    print(f"{prefix}error: {msg}", file=sys.stderr, flush=True)


def barrier(group=None) -> None:
    """Wait for every rank (of ``group``: the default group when None)."""
    if dist.is_available() and dist.is_initialized():
        dist.barrier(group=group)


def all_reduce_mean(t: torch.Tensor) -> torch.Tensor:
    """Mean of a tensor over all ranks (a copy; the input is untouched)."""
    if not (dist.is_available() and dist.is_initialized()) or dist.get_world_size() == 1:
        return t.clone()
    out = t.clone()
    dist.all_reduce(out, op=dist.ReduceOp.SUM)
    return out / dist.get_world_size()


def all_reduce_max(t: torch.Tensor) -> torch.Tensor:
    """Element-wise maximum of a tensor over all ranks (a copy)."""
    out = t.clone()
    if dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1:
        dist.all_reduce(out, op=dist.ReduceOp.MAX)
    return out


def all_reduce_sum(t: torch.Tensor, group=None) -> torch.Tensor:
    """Sum of a tensor over all ranks (of ``group``: the default group when None; a copy)."""
    out = t.clone()
    if dist.is_available() and dist.is_initialized() and dist.get_world_size(group) > 1:
        dist.all_reduce(out, op=dist.ReduceOp.SUM, group=group)
    return out


def all_gather_object(obj, group=None) -> list:
    """Every rank's ``obj`` (picklable), in rank order (of ``group``: the default group when
    None); ``[obj]`` without a process group."""
    if not (dist.is_available() and dist.is_initialized()) or dist.get_world_size(group) == 1:
        return [obj]
    out: list = [None] * dist.get_world_size(group)
    dist.all_gather_object(out, obj, group=group)
    return out


def set_collective_timeout(seconds: float) -> None:
    """How long every collective of this process waits for the other ranks before it fails
    (``parallel.timeout_s``): the process groups the strategies create take it from
    :func:`collective_timeout`, and so do groups made without a timeout (``new_group``, device
    meshes), through torch's defaults. Call it before any group exists."""
    global _timeout
    from torch.distributed import distributed_c10d as c10d

    _timeout = timedelta(seconds=seconds)
    c10d.default_pg_timeout = _timeout
    if hasattr(c10d, "default_pg_nccl_timeout"):
        c10d.default_pg_nccl_timeout = _timeout


def collective_timeout() -> timedelta:
    return _timeout


class CollectiveTimeout(TrainingError):
    """A collective waited longer than ``parallel.timeout_s``: a rank is stuck or died."""


def collective_failure(error: BaseException, *, during: str) -> TrainingError | None:
    """One line for a collective that timed out or lost its peers (gloo raises them as
    RuntimeError on the ranks that wait), naming what waited; None for any other error (and
    in a process alone, which waits for no one)."""
    if world_size() < 2:
        return None
    text = str(error)
    seconds = f"{_timeout.total_seconds():g}"
    if "timed out" in text.lower() or "timeout" in text.lower():
        return CollectiveTimeout(
            f"{during} waited more than {seconds} s for the other ranks (parallel.timeout_s="
            f"{seconds}): a rank is stuck or has died, see its log; the job ends"
        )
    if "closed by peer" in text or "reset by peer" in text or "Broken pipe" in text:
        return TrainingError(
            f"another rank ended during {during} (its log or error says why); the job ends"
        )
    return None


def free_port() -> int:
    """A TCP port on 127.0.0.1 that is free right now (for a rendezvous on one machine)."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]
