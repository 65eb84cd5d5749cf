"""Small process helpers shared by every layer: rank info, a rank-aware logger, collectives
that are no-ops without a process group, a free port and a share of the cores.

Part of lmforge's core (with errors.py and durable.py): it imports nothing else of lmforge, so
every layer, from the model up to the launcher, may use it (docs/architecture.md).
"""

from __future__ import annotations

import os
import socket
import sys

import torch
import torch.distributed as dist


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


def barrier() -> None:
    if dist.is_available() and dist.is_initialized():
        dist.barrier()


def all_reduce_mean(t: torch.Tensor) -> torch.Tensor:
    """Mean of a tensor over all ranks (a copy; the input is untouched)."""
    if not (dist.is_available() and dist.is_initialized()) or dist.get_world_size() == 1:
        return t.clone()
    out = t.clone()
    dist.all_reduce(out, op=dist.ReduceOp.SUM)
    return out / dist.get_world_size()


def all_reduce_sum(t: torch.Tensor) -> torch.Tensor:
    """Sum of a tensor over all ranks (a copy)."""
    out = t.clone()
    if dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1:
        dist.all_reduce(out, op=dist.ReduceOp.SUM)
    return out


def free_port() -> int:
    """A TCP port on 127.0.0.1 that is free right now (for a rendezvous on one machine)."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def threads_per_rank(nproc: int) -> int:
    """OMP threads per rank: the CPUs this node gives the job (SLURM's, else all) shared out."""
    cpus = int(os.environ.get("SLURM_CPUS_ON_NODE", "0")) or os.cpu_count() or 1
    return max(1, cpus // nproc)
