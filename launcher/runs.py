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
        with open(metrics) as f:
            for line in f:
                try:
                    row = json.loads(line)
                except json.JSONDecodeError:
                    continue  # a line being written right now
                if row.get("kind") == "train":
                    train = row
                elif row.get("kind") == "eval":
                    evaluation = row
    return train, evaluation


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
        ckpt = open(latest).read().strip() if os.path.isfile(latest) else "-"
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
        step = str(train["step"]) if train else "-"
        loss = f"{train['loss']:.4f}" if train else "-"
        val = f"{evaluation['val_loss']:.4f}" if evaluation else "-"
        job_text = " ".join(f"{j}:{states.get(j, '?')}" for j in jobs) or "-"
        lines.append(f"{name:<24} {step:>7} {loss:>8} {val:>8}  {ckpt:<14} {job_text}")
    if len(names) == 1 and newest_log:
        with open(newest_log, errors="replace") as f:
            end = f.readlines()[-tail:]
        lines += ["", f"== {newest_log} (last {len(end)} lines)", *(ln.rstrip() for ln in end)]
        rank_logs = sorted(glob.glob(os.path.join(runs_dir, names[0], "logs", "*")))
        if rank_logs:
            lines.append(f"== per-rank logs: {rank_logs[-1]}/")
    return "\n".join(lines)
