"""Stop signals that arrive before training has its handlers.

SIGUSR1 (a SLURM time limit ahead) and SIGTERM (scancel, preemption) may come at any moment,
also while a process is still starting: importing torch, reading data, building the model.
A process that will train calls :func:`hold_stop_signals` first thing; from then on such a
signal is recorded instead of killing it, and the training (pretrain/train/preemption.py) starts with
it pending: it stops after its first step with a checkpoint and exits 128 + the signal, as it
would have later. A launcher (or a SLURM batch script) hands a signal it held to the processes
it starts, through ``LMFORGE_STOP_SIGNAL`` (a number or a name such as USR1).

Part of the core: standard library only, imported before anything heavy.
"""

from __future__ import annotations

import os
import signal

STOP_SIGNALS = (signal.SIGUSR1, signal.SIGTERM)
PENDING_ENV = "LMFORGE_STOP_SIGNAL"

_pending = 0


def _record(signum: int, frame) -> None:
    global _pending
    _pending = _pending or signum


def _from_env() -> int:
    """A signal held for this process by whoever started it: a number or a name (USR1)."""
    value = os.environ.get(PENDING_ENV, "").strip()
    if value.isdigit():
        return int(value)
    sig = getattr(signal, "SIG" + value.removeprefix("SIG"), None) if value else None
    return int(sig) if sig in STOP_SIGNALS else 0


def hold_stop_signals() -> None:
    """Record SIGUSR1 and SIGTERM from now on (main thread only), starting with one that the
    launcher or the batch script held for this process."""
    global _pending
    _pending = _pending or _from_env()
    for sig in STOP_SIGNALS:
        signal.signal(sig, _record)


def pending_stop_signal() -> int:
    """The first stop signal held so far (0 when none came)."""
    return _pending
