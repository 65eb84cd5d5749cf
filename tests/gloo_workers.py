"""Run a function in N real processes that form a gloo process group (spawn, free port).

Workers end with barrier -> destroy_process_group -> os._exit(0): gloo can abort at interpreter
exit otherwise. A worker's exception is sent back and re-raised in the test; a worker still
running 10 s before the timeout prints its threads' stacks.
"""

from __future__ import annotations

import faulthandler
import os
import pickle
import traceback

import torch.multiprocessing as mp

from lmforge.pretrain.core.dist import free_port


def _worker(rank: int, world_size: int, port: int, fn, args, queue, timeout: float) -> None:
    # Still running shortly before the parent gives up: print every thread's stack (stderr,
    # which the failing test shows), so that a hang says where it is.
    faulthandler.dump_traceback_later(max(1.0, timeout - 10), exit=False)
    os.environ.update(
        RANK=str(rank),
        LOCAL_RANK=str(rank),
        WORLD_SIZE=str(world_size),
        LOCAL_WORLD_SIZE=str(world_size),
        MASTER_ADDR="127.0.0.1",
        MASTER_PORT=str(port),
        OMP_NUM_THREADS=str(max(1, (os.cpu_count() or 1) // world_size)),
    )
    import torch
    import torch.distributed as dist

    torch.set_num_threads(int(os.environ["OMP_NUM_THREADS"]))
    code = 0
    try:
        result = fn(rank, world_size, *args)
        queue.put((rank, "ok", pickle.dumps(result)))
    except BaseException:  # noqa: BLE001 - shipped to the parent
        queue.put((rank, "error", traceback.format_exc()))
        code = 1
    try:
        if dist.is_initialized():
            if code == 0:
                dist.barrier()
            dist.destroy_process_group()
    finally:
        queue.close()
        queue.join_thread()  # os._exit would drop what the queue's feeder thread has not sent
        os._exit(code)


def run_distributed(fn, *args, world_size: int = 2, timeout: float = 150) -> list:
    """``fn(rank, world_size, *args)`` in ``world_size`` processes; returns results by rank."""
    ctx = mp.get_context("spawn")
    queue = ctx.Queue()
    port = free_port()
    procs = [
        ctx.Process(target=_worker, args=(r, world_size, port, fn, args, queue, timeout))
        for r in range(world_size)
    ]
    for p in procs:
        p.start()
    results: dict[int, object] = {}
    errors = []
    try:
        for _ in range(world_size):
            rank, status, payload = queue.get(timeout=timeout)
            if status == "ok":
                results[rank] = pickle.loads(payload)
            else:
                errors.append(f"rank {rank}:\n{payload}")
                break
    finally:
        for p in procs:
            p.join(timeout=30 if not errors else 5)
            if p.is_alive():
                p.kill()
    if errors:
        raise AssertionError("distributed worker failed\n" + "\n".join(errors))
    return [results[r] for r in range(world_size)]
