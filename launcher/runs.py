"""`lmforge runs`: what runs exist, how far they are, and the SLURM jobs behind them."""

from __future__ import annotations

import glob
import json
import os
import re

from lmforge.launcher.slurm import job_states


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


def predict_run(run_dir: str, *, fraction: float | None, shared: bool, figure: str) -> str:
    """`lmforge runs NAME --predict`: the final loss predicted from the curve so far (or from
    its first ``fraction`` of a finished run), as text; the figure goes to ``figure``."""
    from lmforge.pretrain.forecast.curve import predict, write_figure

    pred = predict(run_dir, fraction=fraction, others=None if shared else [])
    write_figure(run_dir, pred, figure)
    lines = [
        f"{pred.run}: predicted final train loss {pred.train:.4f} "
        f"[{pred.low:.4f}, {pred.high:.4f}] at step {pred.total_steps}, "
        f"from step {pred.from_step} ({pred.from_step / pred.total_steps:.0%} of the run)",
        f"  form: {pred.form}",
        f"  fitted here: L0={pred.fit.l0:.4f}"
        + (
            ""
            if pred.shared
            else f", A={pred.fit.a:.4f}, alpha={pred.fit.alpha:.4f}, C={pred.fit.c:.2e}"
        ),
        "  shared: "
        + (
            pred.shared.describe()
            if pred.shared
            else "nothing (fewer than 3 other finished runs next to it, or --no-shared): "
            "L0, A and alpha fitted on this curve, C/A and the momentum memory fixed"
        ),
        f"  interval: {pred.interval}",
    ]
    if pred.val is not None:
        lines.append(
            f"  predicted final val_loss {pred.val:.4f} [{pred.val_low:.4f}, {pred.val_high:.4f}]"
            f" ({pred.val_note})"
        )
    else:
        lines.append(f"  val_loss: {pred.val_note}")
    if pred.measured is not None and fraction is not None:
        err = pred.train / pred.measured - 1
        inside = "inside" if pred.low <= pred.measured <= pred.high else "OUTSIDE"
        lines.append(
            f"  measured final train loss {pred.measured:.4f}: error {err:+.2%} ({inside} the "
            "interval)"
        )
        if pred.measured_val is not None and pred.val is not None:
            lines.append(f"  measured final val_loss {pred.measured_val:.4f}")
    lines.append(f"  figure: {figure}")
    return "\n".join(lines)


def predict_check(sweep_dir: str, fractions: list[float], *, shared: bool) -> str:
    """`lmforge runs --predict-check SWEEP_DIR`: every finished run's final train loss predicted
    from each fraction of its steps (shared parameters fitted on the other runs), with the
    median absolute error per fraction."""
    from lmforge.pretrain.forecast.curve import check_sweep

    rows, medians = check_sweep(sweep_dir, fractions, shared=shared)
    head = f"{'run':<24} {'from':>5} {'predicted':>9} {'measured':>9} {'error':>8}"
    lines = [
        f"{sweep_dir}: final train loss predicted from the first part of each finished run "
        + (
            "(alpha, A, C/A, momentum memory fitted on the OTHER runs: leave-one-out)"
            if shared
            else "(L0, A and alpha fitted on the run's own partial curve)"
        ),
        head,
    ]
    for name, frac, pred, measured in rows:
        err = f"{pred / measured - 1:+.2%}" if pred == pred else "too few rows"
        lines.append(f"{name:<24} {frac:>5.0%} {pred:>9.4f} {measured:>9.4f} {err:>8}")
    lines.append("")
    for frac, med in medians.items():
        lines.append(f"median |error| from {frac:.0%} of the steps: {med:.2%}")
    return "\n".join(lines)
