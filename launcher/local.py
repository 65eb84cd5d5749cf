"""Start N local worker processes of an lmforge command (torch elastic, as `torchrun` does).

Workers get RANK / LOCAL_RANK / WORLD_SIZE / MASTER_ADDR / MASTER_PORT from torch elastic, and an
OMP_NUM_THREADS share of the cores so that N ranks on one machine do not oversubscribe it. A user
error in any worker is written to a per-rank file; the parent prints each distinct message once,
naming the ranks, instead of torch elastic's traceback dump.
"""

from __future__ import annotations

import os
import socket
import sys
import tempfile

ERROR_DIR_ENV = "LMFORGE_ERROR_DIR"


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def threads_per_rank(nproc: int) -> int:
    return max(1, (os.cpu_count() or 1) // nproc)


def record_worker_error(message: str) -> bool:
    """In a worker started by :func:`launch_local`, file the error for the parent; True if filed."""
    directory = os.environ.get(ERROR_DIR_ENV)
    if not directory or not os.path.isdir(directory):
        return False
    with open(os.path.join(directory, f"rank{os.environ.get('RANK', '0')}"), "w") as f:
        f.write(message)
    return True


def launch_local(argv: list[str], *, nproc: int) -> int:
    """Run ``lmforge <argv>`` in ``nproc`` processes on this machine; return the exit code."""
    from torch.distributed.elastic.multiprocessing.errors import ChildFailedError
    from torch.distributed.launcher.api import LaunchConfig, elastic_launch

    os.environ.setdefault("OMP_NUM_THREADS", str(threads_per_rank(nproc)))
    with tempfile.TemporaryDirectory(prefix="lmforge-errors-") as errors:
        os.environ[ERROR_DIR_ENV] = errors
        config = LaunchConfig(
            min_nodes=1,
            max_nodes=1,
            nproc_per_node=nproc,
            run_id="lmforge-local",
            rdzv_backend="c10d",
            rdzv_endpoint=f"127.0.0.1:{free_port()}",
            max_restarts=0,
            monitor_interval=0.2,
        )
        try:
            elastic_launch(config, entrypoint=sys.executable)("-m", "launcher.cli", *argv)
            return 0
        except ChildFailedError as exc:
            messages: dict[str, list[str]] = {}
            for name in sorted(os.listdir(errors)):
                with open(os.path.join(errors, name)) as f:
                    messages.setdefault(f.read().strip(), []).append(name.removeprefix("rank"))
            for msg, ranks in messages.items():
                print(f"error: [rank {','.join(ranks)}] {msg}", file=sys.stderr, flush=True)
            codes = [f.exitcode for f in exc.failures.values()]
            return next((c for c in codes if c and c > 0), 1)
        finally:
            os.environ.pop(ERROR_DIR_ENV, None)
