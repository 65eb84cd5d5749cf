"""Durable file writes shared by checkpoints, metrics and prepared data.

A file that must survive a crash is written, flushed and fsynced; one that must never be seen
half-written is written beside its target and renamed over it, then the directory is fsynced.
``fault_point`` lets crash-safety tests kill the process with SIGKILL at a named moment.
"""

from __future__ import annotations

import hashlib
import os
import signal

# "point", "point@step", or either with "+sleep=S" (point names may contain ":")
_FAULT, _, _ACTION = os.environ.get("LMFORGE_FAULT", "").partition("+")


def fault_point(name: str, *, step: int | None = None) -> None:
    """Crash here with SIGKILL when ``LMFORGE_FAULT`` names this point, as ``name`` or
    ``name@step`` (crash-safety tests: a real kill of a real process at a known moment);
    ``name@step+sleep=S`` pauses S seconds there instead (a window for a test's signal)."""
    if _FAULT and (_FAULT == name or (step is not None and _FAULT == f"{name}@{step}")):
        if _ACTION.startswith("sleep="):
            import time

            time.sleep(float(_ACTION.removeprefix("sleep=")))
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
