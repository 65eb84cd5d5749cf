"""The points a fit is made from, gathered from a sweep directory, run directories or a CSV
file, with what the fits need to know about them (a `PointSet`)."""

from __future__ import annotations

import json
import math
import os
from dataclasses import dataclass, field

import numpy as np

from lmforge.pretrain.core.errors import DataError
from lmforge.pretrain.model.flops import param_counts
from lmforge.pretrain.train.metrics import final_eval
from lmforge.scaling.fit import Points, load_points_csv
from lmforge.scaling.runs import read_run, read_verdict


@dataclass
class PointSet:
    """Points with what the fits need to know about them."""

    points: Points
    budgets: np.ndarray | None  # nominal budget of each point (sweeps), else None
    what: str  # where the points came from, for the report
    params: str  # which parameter count N is
    fpt: object = None  # N -> FLOPs per token, from the points (None: 6·N)
    missing: list[str] = field(default_factory=list)  # runs without a final loss
    stopped: list = field(default_factory=list)  # early stopping's verdicts (scaling/early.py)
    epochs: np.ndarray | None = None  # passes over the data per point (sweeps)


def _fpt_from_points(params: np.ndarray, fpt: np.ndarray):
    """FLOPs per token as a function of N, interpolated (log-log) between the models measured
    and held at the end ratios outside them: the attention share of the runs' shapes, without
    rebuilding shapes. (For points whose D was derived as C/(6N), this is exactly 6N.)"""
    sizes, inverse = np.unique(params, return_inverse=True)
    ratio = np.log(np.bincount(inverse, weights=fpt / params) / np.bincount(inverse))
    x = np.log(sizes)

    def fpt_of(n: float) -> float:
        return n * math.exp(float(np.interp(math.log(n), x, ratio)))

    return fpt_of


def load_sweep(sweep_dir: str, params: str, skip_budgets=()) -> PointSet:
    """A sweep's finished points; those of ``skip_budgets`` are not read at all."""
    with open(os.path.join(sweep_dir, "plan.json")) as f:
        plan = json.load(f)
    rows, missing, stopped = [], [], []
    for p in plan["points"]:
        if p["budget"] in skip_budgets:
            continue
        row = final_eval(os.path.join(sweep_dir, p["name"]), p["steps"])
        verdict = read_verdict(os.path.join(sweep_dir, p["name"])) if row is None else None
        if verdict is not None and verdict.stop:
            stopped.append(verdict)
        elif row is None:
            missing.append(p["name"])
        else:
            rows.append((p, row))
    if not rows:
        raise DataError(f"no run of {sweep_dir} has finished; run `lmforge scaling sweep` first")
    key = "params_total" if params == "total" else "params_non_embedding"
    pts = Points.from_arrays(
        N=[p[key] for p, _ in rows],
        D=[r["tokens"] for _, r in rows],
        C=[r["flops"] for _, r in rows],
        L=[r["val_loss"] for _, r in rows],
        labels=[p["name"] for p, _ in rows],
    )
    every = plan["points"]
    return PointSet(
        points=pts,
        budgets=np.array([p["budget"] for p, _ in rows]),
        what=f"sweep {sweep_dir} ({len(rows)} of {len(every)} runs finished)",
        params=params,
        fpt=_fpt_from_points(
            np.array([p[key] for p in every], float),
            np.array([p["flops_per_token"] for p in every], float),
        ),
        missing=missing,
        stopped=stopped,
        epochs=np.array([p["epochs"] for p, _ in rows]),
    )


def load_runs(run_dirs: list[str], params: str) -> PointSet:
    rows, missing = [], []
    for run in run_dirs:
        row, cfg = read_run(run)
        if row is None:
            missing.append(os.path.basename(run.rstrip("/")))
            continue
        counts = param_counts(cfg.model)
        rows.append((os.path.basename(run.rstrip("/")), counts[params], row))
    if not rows:
        raise DataError(f"none of the {len(run_dirs)} run(s) has finished: no final eval row")
    pts = Points.from_arrays(
        N=[n for _, n, _ in rows],
        D=[r["tokens"] for _, _, r in rows],
        C=[r["flops"] for _, _, r in rows],
        L=[r["val_loss"] for _, _, r in rows],
        labels=[name for name, _, _ in rows],
    )
    fpt = _fpt_from_points(pts.N, pts.C / pts.D)
    return PointSet(pts, None, f"{len(rows)} run directories", params, fpt=fpt, missing=missing)


def load_sources(sources: list[str], params: str) -> PointSet:
    if len(sources) == 1 and sources[0].endswith((".csv", ".CSV")):
        if not os.path.isfile(sources[0]):
            raise DataError(f"{sources[0]}: no such CSV file")
        pts = load_points_csv(sources[0])
        what = f"CSV {sources[0]} ({len(pts)} points)"
        return PointSet(pts, None, what, "as given", fpt=_fpt_from_points(pts.N, pts.C / pts.D))
    for s in sources:
        if not os.path.isdir(s):
            raise DataError(f"{s}: not a sweep directory, run directory or .csv file")
    if len(sources) == 1 and os.path.isfile(os.path.join(sources[0], "plan.json")):
        return load_sweep(sources[0], params)
    return load_runs(sources, params)
