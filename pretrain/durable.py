"""Durable file writes shared by checkpoints, metrics and prepared data.

A file that must survive a crash is written, flushed and fsynced; one that must never be seen
half-written is written beside its target and renamed over it, then the directory is fsynced.
``fault_point`` lets crash-safety tests kill the process with SIGKILL at a named moment.
"""

from __future__ import annotations

import contextlib
import errno
import hashlib
import os
import shutil
import signal
import tempfile
import time

# "point", "point@step", or either with "+sleep=S", "+signal=NAME" or "+errno=NAME" (names may
# contain ":")
_FAULT, _, _ACTION = os.environ.get("LMFORGE_FAULT", "").partition("+")
# "...+rank=N" (last): only the process of global rank N; "+hang=S" and "+scale=X" below
_ACTION, _, _ONLY_RANK = ("+" + _ACTION).partition("+rank=")
_ACTION = _ACTION.removeprefix("+")
_FIRED: set[str] = set()  # the scale faults that fired in this process (each fires once)


def _on_this_rank() -> bool:
    return not _ONLY_RANK or os.environ.get("RANK", "0") == _ONLY_RANK


def fault_point(name: str, *, step: int | None = None) -> None:
    """Crash here with SIGKILL when ``LMFORGE_FAULT`` names this point, as ``name`` or
    ``name@step`` (crash-safety tests: a real kill of a real process at a known moment);
    ``...+sleep=S`` pauses S seconds there instead (a window for a test's signal), and
    ``...+signal=SIGUSR1`` sends this process that signal (one that arrives at that moment), and
    ``...+errno=ENOSPC`` raises that OSError there (a full disk at that write), and
    ``...+hang=S`` stops there S seconds as a stuck rank would: a stop signal keeps its default
    action and ends the process (the launcher ending a job that a collective timeout failed).
    ``...+rank=N`` at the end limits any of them to the process of global rank N."""
    if not _on_this_rank():
        return
    if _FAULT and (_FAULT == name or (step is not None and _FAULT == f"{name}@{step}")):
        if _ACTION.startswith("hang="):
            stops = (signal.SIGTERM, signal.SIGUSR1)
            previous = {sig: signal.signal(sig, signal.SIG_DFL) for sig in stops}
            time.sleep(float(_ACTION.removeprefix("hang=")))
            for sig, handler in previous.items():
                signal.signal(sig, handler)
            return
        if _ACTION.startswith("sleep="):
            time.sleep(float(_ACTION.removeprefix("sleep=")))
            return
        if _ACTION.startswith("signal="):
            os.kill(os.getpid(), getattr(signal, _ACTION.removeprefix("signal=")))
            return
        if _ACTION.startswith("errno="):
            code = getattr(errno, _ACTION.removeprefix("errno="))
            raise OSError(code, os.strerror(code))
        os.kill(os.getpid(), signal.SIGKILL)


def fault_scale(name: str, *, step: int) -> float:
    """The factor ``LMFORGE_FAULT=name@step+scale=X`` multiplies a value by here (``nan``,
    ``inf`` or a number: the training loss made NaN, or a spike, at that step), the first time
    this process reaches that point (a bad batch is read once: a rollback skips it); else 1."""
    key = f"{name}@{step}"
    if _FAULT != key or not _ACTION.startswith("scale=") or key in _FIRED or not _on_this_rank():
        return 1.0
    _FIRED.add(key)
    return float(_ACTION.removeprefix("scale="))


def fsync_dir(path: str | os.PathLike) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def write_durable(path: str | os.PathLike, data: bytes, *, step: int | None = None) -> None:
    """Write ``data`` to ``path`` and fsync it."""
    half = len(data) // 2
    with open(path, "wb") as f:
        f.write(data[:half])
        f.flush()
        fault_point("save:mid-file", step=step)  # a crash here leaves a torn file
        f.write(data[half:])
        f.flush()
        os.fsync(f.fileno())


def replace_durable(path: str | os.PathLike, data: bytes) -> None:
    """Atomically replace a file: temp file, fsync, rename, fsync the directory."""
    path = os.fspath(path)
    tmp = f"{path}.tmp-{os.getpid()}"
    write_durable(tmp, data)
    os.replace(tmp, path)
    fsync_dir(os.path.dirname(os.path.abspath(path)))


def sha256_file(path: str | os.PathLike, *, chunk_bytes: int = 1 << 20) -> str:
    """Hex sha256 of a file, read in chunks."""
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        while block := f.read(chunk_bytes):
            digest.update(block)
    return digest.hexdigest()


def check_new_dir(out: str) -> None:
    """``--out`` must not hold anything yet (an output directory is never merged into)."""
    from pretrain.errors import ConfigurationError

    if os.path.exists(out) and (not os.path.isdir(out) or os.listdir(out)):
        raise ConfigurationError(f"--out {out} exists and is not empty; choose a new directory")


def check_writable(path: str, what: str) -> None:
    """Something can be created at ``path``: the nearest existing directory at or above it is
    one this process may write into. Raises one line naming ``what`` (the key or flag, e.g.
    "--out " or "`runs_dir`=") and the path before any work starts, so that a bad output place
    never leaves a half-written result (or an unreadable traceback) behind."""
    from pretrain.errors import ConfigurationError

    place = os.path.abspath(path)
    while not os.path.lexists(place):
        place = os.path.dirname(place)
    if not os.path.isdir(place):
        raise ConfigurationError(
            f"{what}{path}: {place} is a file, not a directory; choose another place"
        )
    if not os.access(place, os.W_OK | os.X_OK):
        raise ConfigurationError(
            f"{what}{path}: {place} is not writable; choose a directory you can write to"
        )


@contextlib.contextmanager
def atomic_directory(out: str, *, prefix: str, replace: bool = False):
    """Yield a temp directory beside ``out``; on success fsync its files and rename it to
    ``out`` (which must be absent or empty, unless ``replace``: then an existing ``out`` is
    swapped out and removed), on any error remove it: readers see all or nothing."""
    if not replace:
        check_new_dir(out)
    parent = os.path.dirname(os.path.abspath(out))
    os.makedirs(parent, exist_ok=True)
    tmp = tempfile.mkdtemp(prefix=prefix, dir=parent)
    try:
        yield tmp
        for root, _, names in os.walk(tmp):
            for name in names:
                with open(os.path.join(root, name), "rb") as f:
                    os.fsync(f.fileno())
            fsync_dir(root)
        old = None
        if os.path.isdir(out) and replace:
            old = tempfile.mkdtemp(prefix=prefix + "old.", dir=parent)
            os.rename(out, os.path.join(old, "out"))
        elif os.path.isdir(out):
            os.rmdir(out)  # empty (checked above)
        os.rename(tmp, out)
        fsync_dir(parent)
        if old is not None:
            shutil.rmtree(old, ignore_errors=True)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
