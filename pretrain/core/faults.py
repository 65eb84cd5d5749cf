"""Fault injection, for tests only: ``LMFORGE_FAULT`` names a point in the code where this
process is killed, paused, signalled, made to fail a write or to hang, or where a value (the
training loss) is scaled -- a real fault in a real process at a known moment, which is how the
crash-safety, resume, signal and anomaly tests work. Unset (always, outside tests), every point is
a no-op that costs one comparison.

The points are named where they sit: ``launch`` (the local launcher), ``preflight`` (a run's
session), ``step`` and ``loss`` (the loop), ``save:mid-file``, ``save:before-rename``,
``save:before-latest`` and ``save:background`` (checkpoint writes).

The value: ``point``, ``point@step``, or either with ``+sleep=S``, ``+signal=NAME``,
``+errno=NAME``, ``+hang=S`` or ``+scale=X``, then ``+attempt=N`` to limit it to one attempt
of a SLURM job and ``+rank=N`` (last) to one rank.
"""

from __future__ import annotations

import errno
import os
import signal
import time

# "point", "point@step", or either with "+sleep=S", "+signal=NAME" or "+errno=NAME" (names may
# contain ":")
_FAULT, _, _ACTION = os.environ.get("LMFORGE_FAULT", "").partition("+")
# "...+rank=N" (last): only the process of global rank N; before it "...+attempt=N": only in
# the N-th attempt of a SLURM job (SLURM_RESTART_COUNT, 0 before any requeue); "+hang=S" and
# "+scale=X" below
_ACTION, _, _ONLY_RANK = ("+" + _ACTION).partition("+rank=")
_ACTION, _, _ONLY_ATTEMPT = _ACTION.partition("+attempt=")
_ACTION = _ACTION.removeprefix("+")
_FIRED: set[str] = set()  # the scale faults that fired in this process (each fires once)


def _applies_here() -> bool:
    attempt = os.environ.get("SLURM_RESTART_COUNT", "0")
    return (not _ONLY_RANK or os.environ.get("RANK", "0") == _ONLY_RANK) and (
        not _ONLY_ATTEMPT or attempt == _ONLY_ATTEMPT
    )


def fault_point(name: str, *, step: int | None = None) -> None:
    """Crash here with SIGKILL when ``LMFORGE_FAULT`` names this point, as ``name`` or
    ``name@step`` (crash-safety tests: a real kill of a real process at a known moment);
    ``...+sleep=S`` pauses S seconds there instead (a window for a test's signal), and
    ``...+signal=SIGUSR1`` sends this process that signal (one that arrives at that moment), and
    ``...+errno=ENOSPC`` raises that OSError there (a full disk at that write), and
    ``...+hang=S`` stops there S seconds as a stuck rank would: a stop signal keeps its default
    action and ends the process (the launcher ending a job that a collective timeout failed).
    ``...+rank=N`` at the end limits any of them to the process of global rank N, and
    ``...+attempt=N`` before it to the N-th attempt of a requeued SLURM job."""
    if not _applies_here():
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
    if _FAULT != key or not _ACTION.startswith("scale=") or key in _FIRED or not _applies_here():
        return 1.0
    _FIRED.add(key)
    return float(_ACTION.removeprefix("scale="))
