"""A run's forecast of itself, made before its first step: peak memory per rank, step time and
tokens/s, wall time to the last step, and the final loss when a law gives one; then, at the end,
what it measured and how far off each forecast was.

Where each figure comes from (the forecast says which):

- **memory**: what earlier runs of the same key held (the ledger), else the estimate of
  pretrain/parallel/memory.py (live tensors, per rank) plus what the process held before the
  model was built. On a CPU the resident set is forecast too: glibc
  keeps freed heap memory for reuse, which adds a share that depends on the strategy (measured
  at 125M: DDP 1.11x the estimate, ZeRO-1/2 1.33x, ZeRO-3 1.45x, FSDP 1.47x; none when
  ``MALLOC_MMAP_THRESHOLD_`` makes glibc map every large block on its own). On a GPU the
  estimate is of the caching allocator's allocated bytes (``torch.cuda.max_memory_allocated``).
- **step time**: the ledger's earlier runs of the same key (pretrain/forecast/ledger.py: the
  command, hardware, layout, precision, shape, batch), else a probe's (`--probe`), else the
  FLOPs of a step at an assumed MFU of the device's peak (``forecast.mfu``).
- **wall time**: steps x step time + evaluations x their cost + saves x theirs + the fixed part
  (start-up, the first steps' warm-up, the end), each measured by the ledger where it can be;
  without it, an evaluation is a third of a training step's FLOPs per token at the same MFU, a
  save the checkpoint's bytes at WRITE_RATE, and the fixed part is not counted (said so).
- **final loss**: a law's (``forecast.law``: `lmforge plan` writes it, `--law` sets it), with
  its 80% interval; else none until the run's own curve can be fitted (pretrain/forecast/
  live.py refits it while the run goes).
"""

from __future__ import annotations

import json
import os
import time
from dataclasses import dataclass, field

from scipy.stats import norm

from lmforge.pretrain.config.schema import ForecastConfig
from lmforge.pretrain.forecast.ledger import Measured, ledger_path, lookup
from lmforge.pretrain.parallel.memory import MemoryEstimate

FORECAST_FILE = "forecast.json"
LEVEL = 0.8  # every interval stated is an 80% interval
WRITE_RATE = 0.5e9  # bytes/s a save is assumed to write at when the ledger has measured none
DEFAULT_MFU = {"cpu": 0.5, "cuda": 0.4}
MMAP_ENV = "MALLOC_MMAP_THRESHOLD_"
GiB = 2**30


def to_level(value: float, low: float, high: float, level: float) -> tuple[float, float]:
    """An interval at ``level`` brought to LEVEL, each side scaled by the ratio of the normal
    quantiles (a 95% interval's sides x 1.2816 / 1.9600)."""
    if abs(level - LEVEL) < 1e-9:
        return low, high
    ratio = float(norm.ppf(0.5 + LEVEL / 2) / norm.ppf(0.5 + level / 2))
    return float(value - ratio * (value - low)), float(value + ratio * (high - value))


def heap_factor(strategy: str, zero_stage: int | None) -> float:
    """The resident set over the estimate's live tensors on a CPU (glibc's heap), by strategy:
    the 125M measurements of BENCHMARKS.md ("The memory estimate, revised"), both precisions
    averaged; 1.0 when glibc maps every large block (``MALLOC_MMAP_THRESHOLD_`` set)."""
    if os.environ.get(MMAP_ENV):
        return 1.0
    if strategy == "fsdp":
        return 1.47
    if strategy == "deepspeed":
        return 1.45 if zero_stage == 3 else 1.33
    return 1.11


@dataclass
class RunFacts:
    """What a forecast needs to know of a run (pretrain/run/session.py gathers it, for the
    run itself and for `--dry-run`)."""

    name: str
    command: str
    runs_dir: str
    total_steps: int
    from_step: int  # a resumed run forecasts the steps it has left
    step_tokens: float  # tokens of one optimizer step, all ranks
    flops_per_token: float
    peak: float  # FLOP/s of one device
    peak_source: str
    world_size: int
    device_type: str
    memory: MemoryEstimate | None
    runtime_bytes: float  # what a rank holds before the model (the process, torch, the group)
    available_bytes: float
    strategy: str
    zero_stage: int | None
    evals: int  # evaluations in the steps to run
    eval_tokens: float  # tokens one evaluation reads, all ranks
    saves: int  # checkpoint saves in the steps to run
    save_bytes: float  # bytes one rank writes per save
    target: str  # what the final loss is: "val_loss" (evaluated at the end) or "loss"
    periodic_evals: bool
    key: dict = field(default_factory=dict)


def _memory(facts: RunFacts, measured: Measured | None) -> dict | None:
    est = facts.memory
    if est is None:
        return None
    need = est.need(facts.device_type)
    out = {
        "estimate_bytes": need,
        "runtime_bytes": facts.runtime_bytes,
        "available_bytes": facts.available_bytes,
        "device": facts.device_type,
        "source": "estimate",
    }
    if facts.device_type == "cpu":
        factor = heap_factor(facts.strategy, facts.zero_stage)
        out.update(heap_factor=factor, peak_bytes=facts.runtime_bytes + need * factor)
        out["of"] = "resident set (VmHWM)"
    else:
        out.update(peak_bytes=facts.runtime_bytes + need, of="allocated (max_memory_allocated)")
    if measured is not None and measured.peak_bytes:  # what the same key really held
        out.update(peak_bytes=measured.peak_bytes, source="ledger")
    return out


def _rate(facts: RunFacts, cfg: ForecastConfig) -> tuple[float, float]:
    """The FLOP/s assumed for the whole run without a measurement, and the MFU it assumes."""
    mfu = cfg.mfu or DEFAULT_MFU.get(facts.device_type, 0.4)
    return facts.peak * facts.world_size * mfu, mfu


def _speed(facts: RunFacts, cfg: ForecastConfig, measured: Measured | None) -> dict:
    if measured is not None:
        step = measured.step_seconds
        source, detail = ("probe" if measured.probe else "ledger"), measured.describe()
    else:
        rate, mfu = _rate(facts, cfg)
        step = facts.step_tokens * facts.flops_per_token / rate
        source = "peak"
        detail = (
            f"{facts.flops_per_token:,.0f} FLOPs/token at {mfu:.0%} MFU of "
            f"{facts.peak / 1e12:.3g} TFLOP/s x {facts.world_size} ({facts.peak_source}); "
            "no ledger line of this shape, layout and hardware (`--probe` measures one)"
        )
    return {
        "step_seconds": step,
        "tokens_per_sec": facts.step_tokens / step if step > 0 else None,
        "source": source,
        "detail": detail,
    }


def _wall(facts: RunFacts, cfg: ForecastConfig, measured: Measured | None, step: float) -> dict:
    steps = facts.total_steps - facts.from_step
    notes = []
    if measured is not None and measured.mean_step_seconds:
        step = measured.mean_step_seconds  # slow steps count in full in the wall time
    per_token = measured.eval_seconds_per_token if measured else None
    if per_token is not None:  # the ledger's evaluations, scaled to this run's eval tokens
        eval_s = per_token * facts.eval_tokens
    else:  # a forward pass: a third of a training step's FLOPs per token
        eval_s = facts.eval_tokens * facts.flops_per_token / 3 / _rate(facts, cfg)[0]
        if facts.evals:
            notes.append("evaluations from their FLOPs")
    save_s = measured.save_seconds if measured else None
    if save_s is None:
        save_s = facts.save_bytes / WRITE_RATE
        if facts.saves:
            notes.append(f"saves at {WRITE_RATE / 1e9:.1f} GB/s")
    fixed = measured.fixed_seconds if measured else None
    if fixed is None:
        notes.append("start-up not counted")
    parts = {
        "steps": steps * step,
        "evals": facts.evals * eval_s,
        "saves": facts.saves * save_s,
        "fixed": fixed or 0.0,
    }
    return {
        "seconds": sum(parts.values()),
        "parts": parts,
        "steps": steps,
        "evals": facts.evals,
        "saves": facts.saves,
        "eval_tokens": facts.eval_tokens,
        "eval_seconds": eval_s,
        "save_seconds": save_s,
        "notes": notes,
    }


def _loss(facts: RunFacts, cfg: ForecastConfig) -> dict:
    law = cfg.law
    if law.loss is None:
        return {
            "of": facts.target,
            "value": None,
            "note": f"no law: first forecast at {cfg.refit_from:.0%} of the steps",
        }
    return {
        "of": "val_loss",
        "value": law.loss,
        "low": law.low,
        "high": law.high,
        "level": LEVEL,
        "source": law.source or "forecast.law",
    }


def make_forecast(facts: RunFacts, cfg: ForecastConfig, *, dry_run: bool = False) -> dict:
    """The forecast of the run ``facts`` describes (the content of forecast.json)."""
    measured = lookup(ledger_path(facts.runs_dir), facts.key)
    speed = _speed(facts, cfg, measured)
    return {
        "version": 1,
        "run": facts.name,
        "command": facts.command,
        "made": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
        "dry_run": dry_run,
        "from_step": facts.from_step,
        "total_steps": facts.total_steps,
        "level": LEVEL,
        "periodic_evals": facts.periodic_evals,
        "key": facts.key,
        "memory": _memory(facts, measured),
        "speed": speed,
        "wall": _wall(facts, cfg, measured, speed["step_seconds"]),
        "loss": _loss(facts, cfg),
        "updates": [],
    }


def _gib(n: float) -> str:
    return f"{n / GiB:.2f} GiB"


def _duration(seconds: float) -> str:
    if seconds < 120:
        return f"{seconds:.0f} s"
    if seconds < 7200:
        return f"{seconds / 60:.1f} min"
    return f"{seconds / 3600:.1f} h"


def forecast_lines(fc: dict) -> list[str]:
    """The short block a run prints before its first step."""
    lines = [f"forecast ({fc['level']:.0%} intervals; {FORECAST_FILE}):"]
    mem = fc["memory"]
    if mem is not None and mem["source"] == "ledger":
        lines.append(
            f"  peak memory per rank: {_gib(mem['peak_bytes'])}, the {mem['of']} of earlier "
            f"runs of this key (the estimate: {_gib(mem['estimate_bytes'])} of tensors)"
        )
    elif mem is not None:
        text = f"  peak memory per rank: {_gib(mem['estimate_bytes'])} of tensors"
        if mem["device"] == "cpu":
            text += (
                f"; resident set {_gib(mem['peak_bytes'])} (with {_gib(mem['runtime_bytes'])} "
                f"before the model, x{mem['heap_factor']:.2f} for the heap)"
            )
        else:
            text += f"; allocated {_gib(mem['peak_bytes'])}"
        lines.append(text)
    speed = fc["speed"]
    tps = speed["tokens_per_sec"]
    lines.append(
        f"  step time: {speed['step_seconds']:.3g} s"
        + (f" ({tps:,.0f} tokens/s)" if tps else "")
        + f", from {speed['detail']}"
    )
    wall = fc["wall"]
    parts = wall["parts"]
    lines.append(
        f"  wall time: {_duration(wall['seconds'])} to step {fc['total_steps']} "
        f"(steps: {wall['steps']}, {_duration(parts['steps'])}; evaluations: {wall['evals']}, "
        f"{_duration(parts['evals'])}; saves: {wall['saves']}, {_duration(parts['saves'])}; "
        f"fixed: {_duration(parts['fixed'])}"
        + (f"; {', '.join(wall['notes'])}" if wall["notes"] else "")
        + ")"
    )
    loss = fc["loss"]
    if loss.get("value") is None:
        lines.append(f"  final loss: {loss['note']}")
    else:
        lines.append(
            f"  final {loss['of']}: {loss['value']:.4f} [{loss['low']:.4f}, {loss['high']:.4f}] "
            f"from {loss['source']}"
        )
    return lines


def write_forecast(run_dir: str, fc: dict) -> None:
    """forecast.json in ``run_dir``, replaced atomically (a reader never sees half of it; not
    fsynced: it is rewritten at every refit, and a crash loses at most the newest refit)."""
    os.makedirs(run_dir, exist_ok=True)
    path = os.path.join(run_dir, FORECAST_FILE)
    tmp = f"{path}.{os.getpid()}.tmp"
    with open(tmp, "w") as f:
        f.write(json.dumps(fc, indent=1) + "\n")
    os.replace(tmp, path)


def read_forecast(run_dir: str) -> dict | None:
    path = os.path.join(run_dir, FORECAST_FILE)
    try:
        with open(path) as f:
            fc = json.load(f)
    except (OSError, ValueError):
        return None
    return fc if isinstance(fc, dict) else None
