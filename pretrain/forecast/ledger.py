"""The ledger: one JSON line per run (or resumed part of a run, or `--probe`) in
``<runs_dir>/ledger.jsonl``, saying what its steps, evaluations and checkpoint saves cost on
which hardware, so that the next run of the same shape and layout there can forecast its speed
and wall time from measurements instead of from the matmul peak.

A line's ``key`` is everything that decides the cost of a step: the command, the hardware (the
device's name; on a CPU also the threads per rank), the world size and parallel layout, the
precision, compile, the model's shape, the sequence length, the micro-batch and the gradient
accumulation; ``key_hash`` is its digest. Lines are appended with one ``write`` of a whole line
(O_APPEND: concurrent runs of a sweep do not tear each other's lines); a line that does not parse
is skipped when read.
"""

from __future__ import annotations

import hashlib
import json
import os
import statistics
import subprocess
import sys
import tempfile
from dataclasses import dataclass

from lmforge.pretrain.core.errors import ConfigurationError

LEDGER = "ledger.jsonl"
NEWEST = 3  # lines of the same key a forecast takes the median of (the newest)


def ledger_path(runs_dir: str) -> str:
    return os.path.join(runs_dir, LEDGER)


def key_hash(key: dict) -> str:
    return hashlib.sha256(json.dumps(key, sort_keys=True).encode()).hexdigest()[:16]


def read_ledger(path: str) -> list[dict]:
    """Every well-formed line of the ledger at ``path`` (none when it does not exist)."""
    if not os.path.isfile(path):
        return []
    out = []
    with open(path, errors="replace") as f:
        for line in f:
            try:
                row = json.loads(line)
            except json.JSONDecodeError:
                continue  # a line being written, or damaged: the others still count
            if isinstance(row, dict) and isinstance(row.get("key_hash"), str):
                out.append(row)
    return out


def append_ledger(path: str, row: dict) -> None:
    """Append ``row`` as one line (a single write on a file opened for appending)."""
    data = (json.dumps(row, sort_keys=True) + "\n").encode()
    fd = os.open(path, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o666)
    try:
        os.write(fd, data)
    finally:
        os.close(fd)


def _median(rows: list[dict], field: str) -> float | None:
    values = [r[field] for r in rows if isinstance(r.get(field), (int, float)) and r[field] >= 0]
    return float(statistics.median(values)) if values else None


@dataclass
class Measured:
    """What the ledger's newest lines of one key measured (medians)."""

    step_seconds: float  # the median step
    mean_step_seconds: float | None  # the training time per step: what the wall time needs
    eval_seconds_per_token: float | None  # an evaluation's cost over the tokens it read
    save_seconds: float | None  # one checkpoint save (the part training waits for)
    fixed_seconds: float | None  # start-up to the first step, the first steps' warm-up, the end
    peak_bytes: float | None  # the largest rank's peak (resident set on a CPU, allocated on a GPU)
    lines: int
    runs: list[str]
    probe: bool  # all of them came from `--probe`

    def describe(self) -> str:
        what = "probe" if self.probe else "earlier run"
        names = ", ".join(self.runs[-2:])
        return f"ledger: {self.lines} {what}{'s' if self.lines > 1 else ''} of this shape, layout and hardware ({names})"


def lookup(path: str, key: dict) -> Measured | None:
    """The cost of a step (and of an evaluation, a save, the fixed part) of runs with ``key``,
    from the newest NEWEST lines of the ledger that measured it; None when there is none. Real
    runs are preferred to probes (a probe's few steps see less of a run's steady state)."""
    digest = key_hash(key)
    rows = [r for r in read_ledger(path) if r["key_hash"] == digest and r.get("step_seconds")]
    runs = [r for r in rows if not r.get("probe")]
    rows = (runs or rows)[-NEWEST:]
    step = _median(rows, "step_seconds")
    if step is None or step <= 0:
        return None
    return Measured(
        step_seconds=step,
        mean_step_seconds=_median(rows, "mean_step_seconds"),
        eval_seconds_per_token=_median(
            [r for r in rows if r.get("evals")], "eval_seconds_per_token"
        ),
        save_seconds=_median([r for r in rows if r.get("saves")], "save_seconds"),
        fixed_seconds=_median(rows, "fixed_seconds"),
        peak_bytes=_median(rows, "peak_bytes"),
        lines=len(rows),
        runs=[str(r.get("run", "?")) for r in rows],
        probe=not runs,
    )


def probe_steps(command: str, config: list[str], *, nproc: int, steps: int, what: str) -> dict:
    """Run ``steps`` real steps of ``lmforge <command> <config>`` in a scratch runs directory
    (the same config, one evaluation and one save at the end, nothing kept) and return the
    ledger line they wrote, marked as a probe. ``what`` names the caller in errors (`--probe`).
    The steps run in processes of their own, as the run will (launched as the command line is,
    `--nproc` local processes)."""
    with tempfile.TemporaryDirectory(prefix="lmforge-probe-") as tmp:
        cmd = [
            sys.executable, "-m", "lmforge.launcher.cli", command, *config,
            f"runs_dir={tmp}", f"train.max_steps={steps}", "train.log_interval=1",
            "train.eval_interval=0", "checkpoint.interval=0", "resume=null",
            "logging.plot=false", "logging.tensorboard=false", "logging.wandb=false",
            "logging.progress=false", "forecast.enabled=true", "--nproc", str(nproc),
        ]  # fmt: skip
        done = subprocess.run(cmd, capture_output=True, text=True)
        if done.returncode != 0:
            last = (done.stderr.strip().splitlines() or ["no output"])[-1]
            raise ConfigurationError(f"{what}: {steps} steps of the run failed: {last}")
        rows = read_ledger(ledger_path(tmp))
    if not rows:
        raise ConfigurationError(f"{what}: the {steps} steps recorded nothing to forecast from")
    return {**rows[-1], "probe": True}
