"""Start the worker processes of an lmforge command on this node (torch elastic, as `torchrun`
does): N local processes, or one node of a multi-node job (`lmforge launch`, which takes
torchrun's options and their spellings; :func:`rendezvous` maps them).

Workers get RANK / LOCAL_RANK / WORLD_SIZE / MASTER_ADDR / MASTER_PORT from torch elastic, and an
OMP_NUM_THREADS share of the cores so that N ranks on one machine do not oversubscribe it. A user
error in any worker is written to a per-rank file; the parent prints each distinct message once,
naming the ranks, instead of torch elastic's traceback dump. With a log directory each rank's
stdout and stderr also go to its own file (the run directory's `logs/`).

One run, one writer (pretrain/core/runlock.py): given the run directory, the launcher holds the run's
lock while its workers live, taken before anything is written there (a second start fails here,
before any worker or log file exists), and every worker dies with its launcher.
"""

from __future__ import annotations

import contextlib
import logging
import os
import signal
import socket
import sys
import tempfile
import time

from lmforge.pretrain.core.dist import free_port
from lmforge.pretrain.core.errors import ConfigurationError
from lmforge.pretrain.core.faults import fault_point
from lmforge.pretrain.core.launch_env import threads_per_rank
from lmforge.pretrain.core.runlock import LAUNCHER_ENV, lock_run_dir
from lmforge.pretrain.core.signals import PENDING_ENV, STOP_SIGNALS, pending_stop_signal

ERROR_DIR_ENV = "LMFORGE_ERROR_DIR"
# Signals torch elastic's agent turns into "kill the workers"; SIGTERM and SIGUSR1 are forwarded
# to the workers instead (forward_stop_signals), which save before they exit.
ELASTIC_SIGNALS = "SIGINT,SIGHUP,SIGQUIT"
# The exit codes of workers that saved and stopped on SIGUSR1 / SIGTERM
# (pretrain/train/preemption.py).
STOPPED = {128 + int(sig) for sig in STOP_SIGNALS}
# What each worker runs: `python -m lmforge.launcher.cli ARGV`, after tying itself to this launcher
# (pretrain.core.runlock.die_with_launcher, standard library only: before torch is imported).
WORKER_BOOT = (
    "import runpy, lmforge.pretrain.core.runlock as r; r.die_with_launcher(); "
    "runpy.run_module('lmforge.launcher.cli', run_name='__main__', alter_sys=True)"
)


def record_worker_error(message: str) -> bool:
    """In a worker started by :func:`launch_local`, file the error for the parent; True if filed."""
    directory = os.environ.get(ERROR_DIR_ENV)
    if not directory or not os.path.isdir(directory):
        return False
    try:
        with open(os.path.join(directory, f"rank{os.environ.get('RANK', '0')}"), "w") as f:
            f.write(message)
    except OSError:  # e.g. that filesystem is full too: the worker prints it itself
        return False
    return True


def child_pids(pid: int) -> list[int]:
    """Processes whose parent is ``pid`` (from /proc: the workers torch elastic started)."""
    out = []
    for entry in os.listdir("/proc"):
        if not entry.isdigit():
            continue
        try:
            with open(f"/proc/{entry}/stat") as f:
                # "pid (comm) state ppid ...": comm may hold spaces, so split after its ")"
                ppid = int(f.read().rsplit(")", 1)[1].split()[1])
        except (OSError, IndexError, ValueError):
            continue
        if ppid == pid:
            out.append(int(entry))
    return out


@contextlib.contextmanager
def forward_stop_signals():
    """SIGTERM and SIGUSR1 reaching the launcher go to every worker, which finish their step,
    save a checkpoint and exit (pretrain/train/preemption.py); the launcher keeps waiting for them.
    torch elastic would otherwise kill the workers on SIGTERM (after 30 s at most) and die of
    SIGUSR1, losing the save: the launch config leaves SIGTERM to us (ELASTIC_SIGNALS)."""

    def forward(signum, frame) -> None:
        for pid in child_pids(os.getpid()):
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, signum)

    previous = {sig: signal.signal(sig, forward) for sig in (signal.SIGTERM, signal.SIGUSR1)}
    try:
        yield
    finally:
        for sig, handler in previous.items():
            signal.signal(sig, handler)


def rank_logs(log_dir: str):
    """torch elastic log destinations: ``<log_dir>/<time>-<host>/rank<RANK>.out|.err`` per
    attempt (a requeued job keeps the first attempt's logs), teed to the console."""
    from torch.distributed.elastic.multiprocessing.api import LogsDest, LogsSpecs, Std

    class RankLogs(LogsSpecs):
        def __init__(self) -> None:
            super().__init__(log_dir=log_dir, redirects=Std.ALL, tee=Std.ALL)
            self._attempt = os.path.join(
                log_dir, f"{time.strftime('%Y%m%d-%H%M%S')}-{socket.gethostname()}"
            )

        @property
        def root_log_dir(self) -> str:
            return log_dir

        def reify(self, envs: dict[int, dict[str, str]]) -> LogsDest:
            os.makedirs(self._attempt, exist_ok=True)
            out, err, errors = {}, {}, {}
            for local, env in envs.items():
                stem = os.path.join(self._attempt, f"rank{int(env['RANK']):03d}")
                out[local], err[local], errors[local] = f"{stem}.out", f"{stem}.err", f"{stem}.json"
                env["TORCHELASTIC_ERROR_FILE"] = errors[local]
            return LogsDest(out, err, dict(out), dict(err), errors)

    return RankLogs()


def static_rendezvous(rdzv_backend: str | None, rdzv_endpoint: str | None) -> bool:
    """Whether the nodes meet by static rendezvous (each node gives its node rank; node rank 0
    hosts rank 0): ``rdzv_backend=static``, or no backend and no ``rdzv_endpoint`` (with an
    endpoint c10d is the default, which deals the node ranks on arrival)."""
    return rdzv_backend == "static" or (not rdzv_backend and not rdzv_endpoint)


def check_rendezvous(
    *,
    nnodes: int,
    node_rank: int,
    master_addr: str | None = None,
    master_port: int | None = None,
    rdzv_endpoint: str | None = None,
    rdzv_backend: str | None = None,
    standalone: bool = False,
    max_restarts: int = 0,
) -> None:
    """Node rank, port, rendezvous endpoint and torchrun options that can work (`lmforge
    launch`'s), before anything waits on them."""
    if max_restarts != 0:
        raise ConfigurationError(
            f"--max-restarts {max_restarts}: lmforge launch does not restart failed "
            "workers (a failure ends the job); give 0, and resume with resume=auto (or let "
            "`lmforge submit` requeue the job)"
        )
    if standalone:
        given = [
            flag
            for flag, value in (
                ("--rdzv-endpoint", rdzv_endpoint),
                ("--master-addr", master_addr),
                ("--nnodes", nnodes if nnodes != 1 else None),
            )
            if value is not None
        ]
        if given:
            raise ConfigurationError(
                f"--standalone runs one node on a local rendezvous; drop {' and '.join(given)} "
                "(or --standalone for a multi-node job)"
            )
    if static_rendezvous(rdzv_backend, rdzv_endpoint) and not 0 <= node_rank < nnodes:
        raise ConfigurationError(
            f"--node-rank {node_rank}: with --nnodes {nnodes} give a node rank in 0..{nnodes - 1}"
        )
    if master_port is not None and not 0 < master_port < 65536:
        raise ConfigurationError(f"--master-port {master_port}: give a port in 1..65535")
    if rdzv_endpoint is not None:
        host, _, port = rdzv_endpoint.rpartition(":")
        if not host or not port.isdigit() or not 0 < int(port) < 65536:
            raise ConfigurationError(
                f"--rdzv-endpoint {rdzv_endpoint!r}: give HOST:PORT, e.g. 10.0.0.1:29400"
            )


def rendezvous(
    *,
    nnodes: int = 1,
    node_rank: int = 0,
    master_addr: str | None = None,
    master_port: int | None = None,
    rdzv_endpoint: str | None = None,
    rdzv_backend: str | None = None,
    standalone: bool = False,
) -> tuple[str, str, dict]:
    """torch elastic's rendezvous (backend, endpoint, configs) for torchrun's options:
    ``standalone`` or one node without an address: a free local port; else ``rdzv_endpoint``
    (c10d unless ``rdzv_backend=static``: node ranks dealt on arrival) or
    ``master_addr:master_port`` (static with this ``node_rank`` unless ``rdzv_backend=c10d``)."""
    if standalone or not (rdzv_endpoint or master_addr or master_port):
        if nnodes > 1:
            raise ConfigurationError(
                f"--nnodes {nnodes} needs --master-addr (and --master-port, --node-rank) or "
                "--rdzv-endpoint HOST:PORT so that the nodes can find each other"
            )
        backend = rdzv_backend or "c10d"
        return backend, f"127.0.0.1:{free_port()}", {"rank": 0} if backend == "static" else {}
    if master_port and not (master_addr or rdzv_endpoint) and nnodes > 1:
        raise ConfigurationError(
            f"--master-port {master_port} with --nnodes {nnodes} needs --master-addr too (the "
            "address of node 0)"
        )
    static = static_rendezvous(rdzv_backend, rdzv_endpoint)
    backend = "static" if static else (rdzv_backend or "c10d")
    endpoint = rdzv_endpoint or f"{master_addr or '127.0.0.1'}:{master_port or 29500}"
    return backend, endpoint, {"rank": node_rank} if backend == "static" else {}


def launch(
    argv: list[str],
    *,
    nproc: int,
    nnodes: int = 1,
    node_rank: int = 0,
    master_addr: str | None = None,
    master_port: int | None = None,
    rdzv_endpoint: str | None = None,
    rdzv_backend: str | None = None,
    standalone: bool = False,
    run_id: str | None = None,
    log_dir: str | None = None,
    run_dir: str | None = None,
) -> int:
    """Run ``lmforge <argv>`` in ``nproc`` processes on this node, as one of ``nnodes`` nodes;
    return the exit code. Rendezvous as torchrun's options say (:func:`rendezvous`): by default
    ``rdzv_endpoint`` (c10d, node ranks assigned on arrival), else ``master_addr:master_port``
    with this ``node_rank`` (static), else a free local port (one node). With ``run_dir`` (this
    node hosts rank 0 of a training command) the launcher holds that run's lock for its workers,
    or refuses to start (RunInUse)."""
    from torch.distributed.elastic.multiprocessing.errors import ChildFailedError
    from torch.distributed.launcher.api import LaunchConfig, elastic_launch

    backend, endpoint, rdzv = rendezvous(
        nnodes=nnodes,
        node_rank=node_rank,
        master_addr=master_addr,
        master_port=master_port,
        rdzv_endpoint=rdzv_endpoint,
        rdzv_backend=rdzv_backend,
        standalone=standalone,
    )
    os.environ.setdefault("OMP_NUM_THREADS", str(threads_per_rank(nproc)))
    # Before anything is written to the run directory (the rank logs too); released on return,
    # or by the kernel when this process dies.
    held = lock_run_dir(run_dir) if run_dir is not None else contextlib.nullcontext()
    fault_point("launch")
    if pending_stop_signal():  # it came while this launcher was starting: the workers stop too
        os.environ[PENDING_ENV] = str(pending_stop_signal())
    # In memory where the machine has /dev/shm: the reports of a full disk must not need disk.
    shm = "/dev/shm" if os.access("/dev/shm", os.W_OK) else None
    errors_dir = tempfile.TemporaryDirectory(prefix="lmforge-errors-", dir=shm)
    with held, errors_dir as errors, forward_stop_signals():
        os.environ[ERROR_DIR_ENV] = errors
        os.environ[LAUNCHER_ENV] = str(os.getpid())  # the workers die with this process
        config = LaunchConfig(
            min_nodes=nnodes,
            max_nodes=nnodes,
            nproc_per_node=nproc,
            run_id=run_id or os.environ.get("SLURM_JOB_ID", "lmforge"),
            rdzv_backend=backend,
            rdzv_endpoint=endpoint,
            rdzv_configs=rdzv,
            max_restarts=0,
            monitor_interval=0.2,
            signals_to_handle=ELASTIC_SIGNALS,
            log_line_prefix_template="[rank${rank}]:",  # console lines teed from rank logs
            **({"logs_specs": rank_logs(log_dir)} if log_dir else {}),
        )
        # torch elastic logs each failed worker (exit code, pid, binary); lmforge says it in
        # one line per distinct failure below, so its own lines would only repeat it.
        quiet = logging.getLogger("torch.distributed.elastic.multiprocessing.api")
        level = quiet.level
        if "--debug" not in argv:
            quiet.setLevel(logging.CRITICAL)
        try:
            elastic_launch(config, entrypoint=sys.executable)("-c", WORKER_BOOT, *argv)
            return 0
        except ChildFailedError as exc:
            messages: dict[str, list[str]] = {}
            for name in sorted(os.listdir(errors)):
                with open(os.path.join(errors, name)) as f:
                    messages.setdefault(f.read().strip(), []).append(name.removeprefix("rank"))
            if not messages:  # no worker said why (killed, crashed): say how each ended
                for rank, failure in exc.failures.items():  # (keyed by global rank)
                    if failure.exitcode in STOPPED:  # saved and stopped by a signal: no failure
                        continue
                    messages.setdefault(_how_it_ended(failure.exitcode), []).append(str(rank))
            for msg, ranks in messages.items():
                print(f"error: [rank {','.join(ranks)}] {msg}", file=sys.stderr, flush=True)
            codes = [f.exitcode for f in exc.failures.values()]
            return next((c for c in codes if c and c > 0), 1)
        finally:
            quiet.setLevel(level)
            os.environ.pop(ERROR_DIR_ENV, None)
            os.environ.pop(PENDING_ENV, None)
            os.environ.pop(LAUNCHER_ENV, None)


def _how_it_ended(exitcode: int) -> str:
    if exitcode < 0:
        with contextlib.suppress(ValueError):
            return f"worker killed by {signal.Signals(-exitcode).name}"
    return f"worker exited with code {exitcode} (its log above says why)"


def launch_local(
    argv: list[str], *, nproc: int, log_dir: str | None = None, run_dir: str | None = None
) -> int:
    """``lmforge <command> --nproc N``: N processes on this machine (sugar for `launch`)."""
    return launch(argv, nproc=nproc, log_dir=log_dir, run_dir=run_dir)
