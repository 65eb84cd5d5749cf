"""`lmforge runs`: what runs exist, how far they are, and the SLURM jobs behind them."""

from __future__ import annotations

import glob
import json
import os
import re

from launcher.slurm import job_states


def _last_rows(metrics: str) -> tuple[dict | None, dict | None]:
    train = evaluation = None
    if os.path.isfile(metrics):
        with open(metrics, errors="replace") as f:  # a torn or corrupt file: skip such lines
            for line in f:
                try:
                    row = json.loads(line)
                except json.JSONDecodeError:
                    continue  # a line being written right now
                if not isinstance(row, dict):
                    continue
                if row.get("kind") == "train":
                    train = row
                elif row.get("kind") == "eval":
                    evaluation = row
    return train, evaluation


def _number(row: dict | None, key: str) -> str:
    value = (row or {}).get(key)
    return f"{value:.4f}" if isinstance(value, (int, float)) else "-"


def describe_runs(runs_dir: str, names: list[str] | None = None, *, tail: int = 10) -> str:
    """A table of the runs under ``runs_dir`` (or the named ones); for one named run, also the
    end of its newest SLURM log."""
    if not os.path.isdir(runs_dir):
        return f"no runs under {runs_dir}"
    names = names or sorted(
        d
        for d in os.listdir(runs_dir)
        if os.path.isfile(os.path.join(runs_dir, d, "metrics.jsonl"))
        or os.path.isdir(os.path.join(runs_dir, d, "slurm"))
    )
    lines = [f"{'run':<24} {'step':>7} {'loss':>8} {'val_loss':>8}  {'checkpoint':<14} jobs"]
    newest_log = None
    for name in names:
        run = os.path.join(runs_dir, name)
        train, evaluation = _last_rows(os.path.join(run, "metrics.jsonl"))
        latest = os.path.join(run, "checkpoints", "latest")
        ckpt = "-"
        if os.path.isfile(latest):
            with open(latest, errors="replace") as f:
                ckpt = f.read().strip()[:40] or "-"
        jobs = sorted(
            (
                re.sub(r"\D", "", os.path.basename(p))
                for p in glob.glob(f"{run}/slurm/job-*.sbatch")
            ),
            key=int,
        )
        states = job_states(jobs)
        logs = sorted(glob.glob(f"{run}/slurm/slurm-*.out"), key=os.path.getmtime)
        newest_log = logs[-1] if logs else newest_log
        step = str(train.get("step", "-")) if train else "-"
        loss = _number(train, "loss")
        val = _number(evaluation, "val_loss")
        job_text = " ".join(f"{j}:{states.get(j, '?')}" for j in jobs) or "-"
        lines.append(f"{name:<24} {step:>7} {loss:>8} {val:>8}  {ckpt:<14} {job_text}")
    if len(names) == 1 and newest_log:
        with open(newest_log, errors="replace") as f:
            end = f.readlines()[-tail:] if tail > 0 else []
        lines += ["", f"== {newest_log} (last {len(end)} lines)", *(ln.rstrip() for ln in end)]
        rank_logs = sorted(glob.glob(os.path.join(runs_dir, names[0], "logs", "*")))
        if rank_logs:
            lines.append(f"== per-rank logs: {rank_logs[-1]}/")
    return "\n".join(lines)
