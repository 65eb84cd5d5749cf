"""One run, one writer: the run directory's lock, and workers that die with their launcher.

Two jobs writing one run directory interleave its metrics and overwrite each other's
checkpoints. So a run holds an advisory lock (``fcntl.flock``) on ``<run>/.lock`` for its whole
life, taken before anything is written there; the file records the holder (host, pid, since
when). A second start is refused with one line naming the holder, before it writes anything.
The kernel releases a dead holder's lock (kill -9, a crashed node); its record stays in the
file (a holder that ends removes the file), so the next start takes the lock over with a
warning naming it. A requeued SLURM job is a new process after the old one died: it finds the
lock free.

Who holds it: an lmforge launcher (``pretrain --nproc N``, ``lmforge launch`` on the node that
hosts rank 0) takes it before it starts its workers, so a second start fails at once, before a
worker or a log file exists; its rank 0 sees the lock held by its own parent process and goes
on. A run started some other way (one process, or torchrun / srun starting the workers
directly) has no such parent: rank 0 takes the lock itself, and every rank hears a refusal.

flock holds across hosts only where the file system implements it so (local disks; NFSv4 and
Lustre or GPFS with locking enabled); on NFS mounted with ``nolock`` or ``local_lock`` it only
keeps out writers on the same host.

Part of the core, standard library only: a worker imports it first thing (``die_with_launcher``),
before torch.
"""

from __future__ import annotations

import contextlib
import ctypes
import errno
import fcntl
import json
import os
import signal
import socket
import sys
import threading
import time
from collections.abc import Iterator

from lmforge.pretrain.core.errors import LMForgeError

LOCK_FILE = ".lock"
# Set by a launcher for the workers it starts: its pid (they die with it).
LAUNCHER_ENV = "LMFORGE_LAUNCHER_PID"
PR_SET_PDEATHSIG = 1  # linux/prctl.h


class RunInUse(LMForgeError):
    """Another process holds the run directory's lock."""


def _host() -> str:
    return socket.gethostname()


def _read(fd: int) -> dict:
    """The holder recorded in an open lock file ({} when none is)."""
    os.lseek(fd, 0, os.SEEK_SET)
    text = os.read(fd, 4096).decode(errors="replace")
    try:
        holder = json.loads(text) if text.strip() else {}
    except ValueError:
        return {}
    return holder if isinstance(holder, dict) else {}


def _describe(holder: dict) -> str:
    return (
        f"pid {holder.get('pid', '?')} on {holder.get('host', '?')} "
        f"since {holder.get('since', '?')}"
    )


class RunLock:
    """This process's hold on a run directory (``release``, or use it as a context manager)."""

    def __init__(self, run_dir: str, fd: int, created: list[str]) -> None:
        self.run_dir, self.fd, self.created = run_dir, fd, created

    def release(self) -> None:
        """Remove the lock file, then let go: a run that ends leaves no record (one that dies
        leaves its record for the next to see), and a start that failed before writing
        anything leaves no directory it made."""
        if self.fd < 0:
            return
        with contextlib.suppress(OSError):
            os.unlink(os.path.join(self.run_dir, LOCK_FILE))  # while still holding it
        for directory in self.created:  # innermost first; stops at one that holds something
            try:
                os.rmdir(directory)
            except OSError:
                break
        os.close(self.fd)  # closing the only descriptor releases the flock
        self.fd = -1

    def __enter__(self) -> RunLock:
        return self

    def __exit__(self, *exc) -> None:
        self.release()


def _try_lock(run_dir: str) -> RunLock | dict:
    """Take ``run_dir``'s lock (a :class:`RunLock`), or return the record of who holds it."""
    path = os.path.join(run_dir, LOCK_FILE)
    created: list[str] = []  # the directories this call makes, innermost first
    while True:
        missing, parent = [], os.path.abspath(run_dir)
        while not os.path.isdir(parent):
            missing.append(parent)
            parent = os.path.dirname(parent)
        os.makedirs(run_dir, exist_ok=True)
        created = created or missing
        # O_CLOEXEC (Python's default too): a worker never inherits the launcher's hold.
        try:
            # 0o666: the umask decides, as for every file lmforge writes
            fd = os.open(path, os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o666)
        except FileNotFoundError:  # a holder that made the directory removed it as it ended
            continue
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            # The holder writes its record right after taking the lock: give it a moment.
            holder, deadline = _read(fd), time.monotonic() + 2
            while not holder and time.monotonic() < deadline:
                time.sleep(0.05)
                holder = _read(fd)
            os.close(fd)
            return holder or {"pid": "?", "host": "?", "since": "?"}
        except OSError as exc:
            if exc.errno not in (errno.ENOLCK, errno.EOPNOTSUPP, errno.ENOSYS):
                raise
            # (e.g. NFS mounted without a lock service): run, but say that nothing guards it
            print(
                f"warning: cannot lock {path} ({exc.strerror}): this file system has no flock, "
                "so nothing keeps a second run from writing here",
                file=sys.stderr,
                flush=True,
            )
        # The file may have been removed by a holder that ended between our open and flock:
        # a lock on it would exclude nobody. Then open the new one.
        with contextlib.suppress(OSError):
            here, held = os.stat(path), os.fstat(fd)
            if (here.st_dev, here.st_ino) == (held.st_dev, held.st_ino):
                break
        os.close(fd)
    stale = _read(fd)
    if stale:
        print(
            f"warning: {run_dir} was locked by {_describe(stale)}, which no longer holds it "
            "(killed or crashed): taking it over",
            file=sys.stderr,
            flush=True,
        )
    record = {"host": _host(), "pid": os.getpid(), "since": time.strftime("%Y-%m-%dT%H:%M:%S%z")}
    os.ftruncate(fd, 0)
    os.pwrite(fd, (json.dumps(record) + "\n").encode(), 0)
    os.fsync(fd)
    return RunLock(run_dir, fd, created)


def in_use_message(run_dir: str, holder: dict) -> str:
    return (
        f"run directory {run_dir} is in use by {_describe(holder)} (one run has one writer): "
        f"let it finish, or stop it (kill {holder.get('pid', '?')} on {holder.get('host', '?')} "
        "saves a checkpoint) and continue with resume=auto; or start another run with name=..."
    )


def lock_run_dir(run_dir: str) -> RunLock:
    """Take ``run_dir``'s lock for this process (creating the directory), or raise
    :class:`RunInUse` naming the holder."""
    held = _try_lock(run_dir)
    if isinstance(held, dict):
        raise RunInUse(in_use_message(run_dir, held))
    return held


def _from_rank0(message: str | None) -> str | None:
    """Rank 0's ``message`` on every rank (as is without a process group)."""
    import torch.distributed as dist

    if not (dist.is_available() and dist.is_initialized()) or dist.get_world_size() == 1:
        return message
    box = [message]
    dist.broadcast_object_list(box, src=0)
    return box[0]


@contextlib.contextmanager
def rank_lock(run_dir: str, *, main: bool) -> Iterator[None]:
    """Around a run, on every rank (a collective once a process group exists): rank 0
    (``main``) takes the lock unless its launcher, its parent process, holds it for it; when
    another process holds it, every rank raises :class:`RunInUse`."""
    lock, refusal = None, None
    if main:
        held = _try_lock(run_dir)
        if isinstance(held, RunLock):
            lock = held
        elif held.get("pid") != os.getppid() or held.get("host") != _host():
            refusal = in_use_message(run_dir, held)
    refusal = _from_rank0(refusal)
    if refusal:
        raise RunInUse(refusal)
    try:
        yield
    finally:
        if lock is not None:
            lock.release()


def die_with_launcher() -> None:
    """In a worker of an lmforge launcher, first thing: die when the launcher dies.

    torch elastic starts each worker in a session of its own, so a launcher killed with -9
    (by a user, the OOM killer or a scheduler) would leave its workers training and saving,
    unowned, beside the next attempt. On Linux the kernel sends this process SIGKILL when its
    parent dies (``prctl(PR_SET_PDEATHSIG)``): no thread, no polling, it works while the worker
    is blocked in a collective, and it does not touch SIGTERM/SIGUSR1, which the launcher
    forwards for a clean save. The signal comes when the *thread* that started the worker ends:
    torch elastic's agent starts workers from the launcher's main thread, which lives as long
    as the launcher. A launcher that died before the prctl call is caught by comparing the
    parent with the pid the launcher passed down. Elsewhere a watchdog thread polls the
    parent once a second."""
    expected = int(os.environ.get(LAUNCHER_ENV, "0") or 0)
    if not expected:
        return  # not started by an lmforge launcher (torchrun, srun, by hand)
    armed = False
    if sys.platform.startswith("linux"):
        with contextlib.suppress(OSError, AttributeError):
            libc = ctypes.CDLL(None, use_errno=True)
            armed = libc.prctl(PR_SET_PDEATHSIG, int(signal.SIGKILL), 0, 0, 0) == 0
    if os.getppid() != expected:  # the launcher is gone already
        os.kill(os.getpid(), signal.SIGKILL)
    if not armed:

        def watch() -> None:
            while os.getppid() == expected:
                time.sleep(1.0)
            os.kill(os.getpid(), signal.SIGKILL)

        threading.Thread(target=watch, name="lmforge-launcher-watchdog", daemon=True).start()
