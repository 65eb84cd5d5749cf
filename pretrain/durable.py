"""Durable file writes shared by checkpoints, metrics and prepared data.

A file that must survive a crash is written, flushed and fsynced; one that must never be seen
half-written is written beside its target and renamed over it, then the directory is fsynced.
``fault_point`` lets crash-safety tests kill the process with SIGKILL at a named moment.
"""

from __future__ import annotations

import contextlib
import hashlib
import os
import shutil
import signal
import tempfile
import time

# "point", "point@step", or either with "+sleep=S" or "+signal=NAME" (names may contain ":")
_FAULT, _, _ACTION = os.environ.get("LMFORGE_FAULT", "").partition("+")


def fault_point(name: str, *, step: int | None = None) -> None:
    """Crash here with SIGKILL when ``LMFORGE_FAULT`` names this point, as ``name`` or
    ``name@step`` (crash-safety tests: a real kill of a real process at a known moment);
    ``...+sleep=S`` pauses S seconds there instead (a window for a test's signal), and
    ``...+signal=SIGUSR1`` sends this process that signal (one that arrives at that moment)."""
    if _FAULT and (_FAULT == name or (step is not None and _FAULT == f"{name}@{step}")):
        if _ACTION.startswith("sleep="):
            time.sleep(float(_ACTION.removeprefix("sleep=")))
            return
        if _ACTION.startswith("signal="):
            os.kill(os.getpid(), getattr(signal, _ACTION.removeprefix("signal=")))
            return
        os.kill(os.getpid(), signal.SIGKILL)


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
