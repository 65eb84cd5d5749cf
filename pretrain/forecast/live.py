"""The forecast while the run goes and against what it measured: a callback on rank 0.

From ``forecast.refit_from`` of the steps on, the final loss is refitted from the run's own curve
at every evaluation (every tenth of the run when it does not evaluate periodically), with the
parameters its sibling runs share where 3 or more finished ones of the same data sit next to it
(pretrain/forecast/curve.py); the metrics row and the progress line carry the forecast and its
band. A refit is skipped while the forecast's own time exceeds ``forecast.max_overhead`` of the
training time so far, so that it never costs training more than that share. A forecast that
leaves the band it was first given (the law's, else the first refit's) on the high side is said
once. At the end (or an early stop, or a stop by signal), forecast.json gains what was measured
and the errors, and the ledger a line.
"""

from __future__ import annotations

import math
import os
import statistics
import time

import yaml

from lmforge.pretrain.config.schema import RunConfig
from lmforge.pretrain.core import dist as pdist
from lmforge.pretrain.core.errors import ConfigurationError, DataError
from lmforge.pretrain.forecast.curve import (
    Curve,
    Shared,
    curve_rows,
    fit_shared,
    load_curve,
    predict_curve,
    schedule_curve,
)
from lmforge.pretrain.forecast.forecast import GiB, write_forecast
from lmforge.pretrain.forecast.ledger import append_ledger, key_hash, ledger_path
from lmforge.pretrain.train.loop import Callback, Trainer
from lmforge.pretrain.train.metrics import read_metrics

# what a row gains from a refit (and what differs between two runs of the same config)
FORECAST_FIELDS = ("forecast", "forecast_low", "forecast_high", "forecast_of")


def _same_data(cfg: dict, data_path: str, seq_len: int) -> bool:
    data, train = cfg.get("data") or {}, cfg.get("train") or {}
    return data.get("path") == data_path and train.get("seq_len") == seq_len


def sibling_runs(runs_dir: str, name: str, cfg: RunConfig) -> list[Curve]:
    """The finished pretraining runs next to this one that trained on the same data at the same
    sequence length (a sweep's other runs): they share the law's parameters."""
    data = getattr(cfg, "data", None)
    if data is None or not os.path.isdir(runs_dir):
        return []
    out = []
    for other in sorted(os.listdir(runs_dir)):
        path = os.path.join(runs_dir, other, "config.yaml")
        if other == name or not os.path.isfile(path):
            continue
        try:
            with open(path) as f:
                other_cfg = yaml.safe_load(f)
            if not isinstance(other_cfg, dict) or not _same_data(
                other_cfg, data.path, cfg.train.seq_len
            ):
                continue
            curve = load_curve(os.path.join(runs_dir, other))
        except (OSError, yaml.YAMLError, DataError, ConfigurationError):
            continue
        if curve.finished:
            out.append(curve)
    return out


def _median_step_seconds(times: list[tuple[int, float]]) -> float | None:
    """Seconds per step over the train rows (step, cumulative train time), the first row of the
    run (warm-up, compilation) left out where there are others."""
    per = [
        (t1 - t0) / (s1 - s0)
        for (s0, t0), (s1, t1) in zip(times, times[1:], strict=False)
        if s1 > s0 and t1 >= t0
    ]
    if per:
        return float(statistics.median(per))
    if times and times[0][0] > 0:
        return times[0][1] / times[0][0]
    return None


def _mean_step_seconds(times: list[tuple[int, float]]) -> float | None:
    """The training time per step after the first row (its warm-up counts in the fixed part of
    the wall time): what the wall time needs, where the median step time does not (steps slowed
    by other work on the machine count in full)."""
    if len(times) >= 2 and times[-1][0] > times[0][0]:
        return (times[-1][1] - times[0][1]) / (times[-1][0] - times[0][0])
    return _median_step_seconds(times)


def _error(pred: float | None, actual: float | None) -> float | None:
    if pred is None or actual is None or actual <= 0:
        return None
    return pred / actual - 1.0


class LiveForecast(Callback):
    """Rank 0's forecast during and after the run (the module docstring says what it does)."""

    def __init__(self, forecast: dict, cfg: RunConfig, *, total_steps: int, started: float):
        self.fc, self.cfg, self.total = forecast, cfg, total_steps
        self.started = started  # perf_counter at the session's start: the wall time's origin
        self.run_dir = cfg.run_dir
        self.refit_from = cfg.forecast.refit_from
        self.max_overhead = cfg.forecast.max_overhead
        self.periodic = forecast["periodic_evals"]
        self.train: dict[int, float] = {}
        self.val: dict[int, float] = {}
        self.times: list[tuple[int, float]] = []
        self.eval_seconds: list[float] = []
        self.schedule = schedule_curve(  # the learning rate of every step, once
            cfg.name,
            total_steps=total_steps,
            optim=cfg.optim,
            d_model=cfg.model.d_model,
            train={},
        )
        self.spent = 0.0  # seconds of refits
        self.last_cost = 0.0  # of the newest: the next is expected to cost as much
        self.last_tenth = 0
        self.warned = False
        self.failed = False
        t0 = time.perf_counter()
        self.siblings = sibling_runs(cfg.runs_dir, cfg.name, cfg)
        self.shared: Shared | None = None
        if len(self.siblings) >= 3:
            try:
                self.shared = fit_shared(self.siblings)
            except DataError:
                self.siblings = []
        self.fc["siblings"] = [c.name for c in self.siblings] if self.shared else []
        self.fc["setup_seconds"] = time.perf_counter() - t0

    # --- rows --------------------------------------------------------------------------------------
    def on_train_start(self, trainer: Trainer) -> None:
        self.start_step = trainer.state.step
        self.start_seconds = trainer.state.train_seconds  # (a resumed run's earlier parts')
        if self.start_step:  # resumed: the rows before it are part of the curve
            rows = read_metrics(os.path.join(self.run_dir, "metrics.jsonl"))
            self.train, self.val = curve_rows(
                [r for r in rows if r.get("step", 0) <= self.start_step], self.total
            )

    def on_log(self, trainer: Trainer, row: dict) -> None:
        step = row["step"]
        if row["kind"] == "train":
            if math.isfinite(row["loss"]):
                self.train[step] = row["loss"]
            self.times.append((step - self.start_step, row["time"] - self.start_seconds))
        elif row["kind"] == "eval":
            self.val[step] = row["val_loss"]
            self.eval_seconds.append(row.get("eval_seconds", 0.0))
        if self._due(row, trainer):
            t0 = time.perf_counter()
            try:
                self._refit(row, step)
            finally:
                self.last_cost = time.perf_counter() - t0
                self.spent += self.last_cost

    def _due(self, row: dict, trainer: Trainer) -> bool:
        step = row["step"]
        if step < self.refit_from * self.total or step >= self.total:
            return False
        if self.periodic:
            due = row["kind"] == "eval"
        else:  # every tenth of the run
            tenth = int(10 * step / self.total)
            due = row["kind"] == "train" and tenth > self.last_tenth
            if due:
                self.last_tenth = tenth
        budget = self.max_overhead * trainer.state.train_seconds
        return due and (self.spent + self.last_cost <= budget or not self.fc["updates"])

    def _refit(self, row: dict, step: int) -> None:
        curve = self.schedule.with_rows(self.train, self.val)
        try:
            pred = predict_curve(curve, self.siblings, self.shared)
        except DataError:
            return  # too few rows past the fitted start yet
        if pred.val is not None:
            of, value, low, high = "val_loss", pred.val, pred.val_low, pred.val_high
        else:
            of, value, low, high = "loss", pred.train, pred.low, pred.high
        if not all(math.isfinite(v) for v in (value, low, high)):
            return
        update = {
            "step": step,
            "fraction": step / self.total,
            "of": of,
            "value": value,
            "low": low,
            "high": high,
            "train": pred.train,
            "train_low": pred.low,
            "train_high": pred.high,
            "method": "shared" if pred.shared else "lone",
        }
        self.fc["updates"].append(update)
        row.update(zip(FORECAST_FIELDS, (value, low, high, of), strict=True))
        self._warn(update)
        write_forecast(self.run_dir, self.fc)

    def _warn(self, update: dict) -> None:
        """Say once that the forecast left the band first given (the law's, else the first
        refit's) on the high side."""
        if self.warned:
            return
        law = self.fc["loss"]
        if law.get("value") is not None and law["of"] == update["of"]:
            ref, whose = law, f"the law's ({law['source']})"
        else:
            first = next((u for u in self.fc["updates"] if u["of"] == update["of"]), None)
            if first is None or first is update:
                return
            ref, whose = first, f"the forecast at step {first['step']}"
        if update["value"] <= ref["high"]:
            return
        self.warned = True
        line = (
            f"final {update['of']} now forecast {update['value']:.3f} [{update['low']:.3f}, "
            f"{update['high']:.3f}], above {whose} {ref['value']:.3f} [{ref['low']:.3f}, "
            f"{ref['high']:.3f}]: the run is doing worse than predicted (check the learning rate "
            "and the data, or stop it and keep the compute)"
        )
        self.fc["warning"] = {"step": update["step"], "line": line}
        pdist.print0(f"warning: {line}")

    # --- the end -----------------------------------------------------------------------------------
    def on_error(self, trainer: Trainer, error: BaseException) -> None:
        self.failed = True

    def on_train_end(self, trainer: Trainer) -> None:
        if self.failed or not self.times:
            return
        wall = time.perf_counter() - self.started
        complete = trainer.state.step >= self.total
        last = trainer.last_row or {}
        final_eval = trainer.last_eval if complete else None
        clock = trainer.clock
        saves = clock.checkpoints
        actual = {
            "step": trainer.state.step,
            "complete": complete,
            "peak_bytes": last.get("peak_mem_gb", 0.0) * GiB or None,
            "step_seconds": _median_step_seconds(self.times),
            "mean_step_seconds": _mean_step_seconds(self.times),
            "wall_seconds": wall,
            "evals": len(self.eval_seconds),
            "eval_seconds": statistics.median(self.eval_seconds) if self.eval_seconds else None,
            "saves": saves,
            "save_seconds": clock.checkpoint_seconds / saves if saves else None,
            "loss": last.get("loss") if complete and last.get("step") == self.total else None,
            "val_loss": final_eval.get("val_loss") if final_eval else None,
            "overhead": self.spent / max(trainer.state.train_seconds, 1e-9),
            "refit_seconds": self.spent,
        }
        self.fc["actual"] = actual
        self.fc["errors"] = self._errors(actual)
        write_forecast(self.run_dir, self.fc)
        self._ledger(actual)

    def _errors(self, actual: dict) -> dict:
        fc = self.fc
        mem = fc["memory"] or {}
        out = {
            "memory": _error(mem.get("peak_bytes"), actual["peak_bytes"]),
            "step_seconds": _error(fc["speed"]["step_seconds"], actual["step_seconds"]),
            "wall_seconds": _error(fc["wall"]["seconds"], actual["wall_seconds"])
            if actual["complete"]
            else None,
        }
        losses = []
        for f in [fc["loss"], *fc["updates"]]:
            if f.get("value") is None:
                continue
            measured = actual.get(f["of"])
            if measured is None:
                continue
            losses.append(
                {
                    "fraction": f.get("fraction", 0.0),
                    "of": f["of"],
                    "error": f["value"] / measured - 1.0,
                    "inside": f["low"] <= measured <= f["high"],
                }
            )
        out["loss"] = losses
        return out

    def _ledger(self, actual: dict) -> None:
        step, mean = actual["step_seconds"], actual["mean_step_seconds"]
        if step is None or mean is None:
            return
        ran = actual["step"] - self.start_step
        evals, saves = actual["evals"], actual["saves"]
        eval_tokens = self.fc["wall"]["eval_tokens"]
        fixed = actual["wall_seconds"] - ran * mean
        fixed -= evals * (actual["eval_seconds"] or 0.0) + saves * (actual["save_seconds"] or 0.0)
        append_ledger(
            ledger_path(self.cfg.runs_dir),
            {
                "time": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
                "run": self.cfg.name,
                "key": self.fc["key"],
                "key_hash": key_hash(self.fc["key"]),
                "step_seconds": step,
                "mean_step_seconds": mean,
                "steps": ran,
                "eval_seconds": actual["eval_seconds"],
                "eval_seconds_per_token": actual["eval_seconds"] / eval_tokens
                if actual["eval_seconds"] is not None and eval_tokens
                else None,
                "evals": evals,
                "save_seconds": actual["save_seconds"],
                "saves": saves,
                "fixed_seconds": max(fixed, 0.0),
                "wall_seconds": actual["wall_seconds"],
                "peak_bytes": actual["peak_bytes"],
                "complete": actual["complete"],
            },
        )
