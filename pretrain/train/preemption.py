"""Stop cleanly on a signal: every rank finishes its step, a checkpoint is saved, the run returns.

- SIGUSR1: SLURM's warning before the time limit (``--signal=B:USR1@<grace>``, forwarded by the
  batch script); the job script requeues the job when the run is not done.
- SIGTERM: ``scancel``, preemption, a cluster shutting down, or a user's ``kill``.

A signal may reach the ranks at different steps (or only some of them), so the ranks agree by a
max-all-reduce of the flag after every step over a small gloo group: host memory only, no
device sync, and every rank stops after the same step. The exit code then says what happened:
0 when the run is done, 128 + the signal's number when it stopped early (138 for SIGUSR1, 143 for
SIGTERM), which is what a job script and a chain of dependent jobs need to know.
"""

from __future__ import annotations

import signal

import torch
import torch.distributed as dist

from lmforge.pretrain.core.signals import STOP_SIGNALS, pending_stop_signal
from lmforge.pretrain.train.loop import Callback


class GracefulStop(Callback):
    """Install on every rank. After ``fit``, ``signal`` is the number of the signal that stopped
    the run (0 when none did)."""

    def __init__(self) -> None:
        self.received = 0
        self.signal = 0
        self._previous: dict[int, object] = {}
        self._group = None

    def _handle(self, signum: int, frame) -> None:
        self.received = self.received or signum

    def on_train_start(self, trainer) -> None:
        # a signal that came while the process was starting (pretrain/core/signals.py)
        self.received = self.received or pending_stop_signal()
        for sig in STOP_SIGNALS:
            self._previous[sig] = signal.signal(sig, self._handle)
        if dist.is_initialized() and dist.get_world_size() > 1:
            # Collective: every rank installs this callback.
            self._group = dist.new_group(backend="gloo")

    def on_step_end(self, trainer) -> None:
        flag = torch.tensor([self.received], dtype=torch.int64)
        if self._group is not None:
            dist.all_reduce(flag, op=dist.ReduceOp.MAX, group=self._group)
        if flag.item() and not self.signal:
            self.signal = int(flag.item())
            trainer.request_stop()

    def on_train_end(self, trainer) -> None:
        for sig, previous in self._previous.items():
            signal.signal(sig, previous)
        self._previous.clear()

    def exit_code(self, *, done: bool) -> int:
        return 0 if done or not self.signal else 128 + self.signal
