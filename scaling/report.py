"""`lmforge scaling fit` and the end of `lmforge scaling sweep`: gather points (a sweep, run
directories or a CSV: scaling/sources.py), fit them and predict the held-out budgets and the
targets (scaling/analysis.py), and write the report directory all at once: ``report.md``
(scaling/markdown.py), ``fit.json``, ``points.csv`` and the figures (scaling/figures.py).
"""

from __future__ import annotations

import csv
import json
import math
import os

import numpy as np

from lmforge.pretrain.config.schema import load_config
from lmforge.pretrain.core.durable import atomic_directory, check_writable
from lmforge.pretrain.core.errors import ConfigurationError
from lmforge.scaling.analysis import analyse
from lmforge.scaling.config import ScalingConfig, SweepFitConfig
from lmforge.scaling.figures import plot_all, plot_finetune
from lmforge.scaling.forms import LOSS_FORMS
from lmforge.scaling.grid import format_count, format_flops
from lmforge.scaling.markdown import render_finetune_markdown, render_markdown
from lmforge.scaling.runs import finetune_points
from lmforge.scaling.sources import PointSet, load_sources


def write_points_csv(path: str, src: PointSet, budgets: np.ndarray, held: np.ndarray) -> None:
    p = src.points
    with open(path, "w", newline="") as f:
        w = csv.writer(f)
        w.writerow(["run", "budget", "N", "D", "C", "loss", "epochs", "held_out"])
        for i in range(len(p)):
            ep = "" if src.epochs is None else f"{src.epochs[i]:.3f}"
            w.writerow(
                [
                    p.labels[i],
                    f"{budgets[i]:.10g}" if np.isfinite(budgets[i]) else "",  # "": in none
                    f"{p.N[i]:.0f}",
                    f"{p.D[i]:.0f}",
                    f"{p.C[i]:.12g}",
                    f"{p.L[i]:.6f}",
                    ep,
                    int(held[i]),
                ]
            )


def _jsonable(obj):
    if isinstance(obj, dict):
        return {k: _jsonable(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [_jsonable(v) for v in obj]
    if isinstance(obj, (np.floating, np.integer)):
        return obj.item()
    if isinstance(obj, (np.bool_,)):
        return bool(obj)
    return obj


def write_report(
    src: PointSet, fit: SweepFitConfig, out: str, *, targets: list[float], finetune: list[str]
) -> dict:
    """Fit, then write the report directory all at once (an older report is replaced)."""
    analysis = analyse(src, fit, targets)
    analysis["result"]["finetune"] = finetune = finetune_points(finetune) if finetune else []
    objects = analysis["objects"]
    with atomic_directory(out, prefix=".report.", replace=True) as tmp:
        write_points_csv(os.path.join(tmp, "points.csv"), src, objects["budgets"], objects["held"])
        figures = plot_all(src, analysis, tmp, finetune=finetune)
        with open(os.path.join(tmp, "fit.json"), "w") as f:
            json.dump(_jsonable(analysis["result"]), f, indent=1)
        with open(os.path.join(tmp, "report.md"), "w") as f:
            f.write(render_markdown(src, analysis, figures, fit))
    return analysis["result"]


def write_finetune_report(runs: list[str], out: str) -> dict:
    """Only the finetuned runs' metric against total compute (no points to fit)."""
    rows = finetune_points(runs)
    with atomic_directory(out, prefix=".report.", replace=True) as tmp:
        figure = plot_finetune(rows, tmp)
        with open(os.path.join(tmp, "fit.json"), "w") as f:
            json.dump({"finetune": rows}, f, indent=1)
        with open(os.path.join(tmp, "report.md"), "w") as f:
            f.write(render_finetune_markdown(rows, figure))
    for r in rows:
        print(f"{r['run']}: {r['metric']} {r['value']:.4f} at {r['total_flops']:.3g} FLOPs in all")
    print(f"report: {out}/report.md")
    return {"finetune": rows}


def summary_lines(result: dict) -> list[str]:
    """What the command prints: the budgets and how they were formed, the fits in a line
    each, and every held-out check."""
    b = result["budgets"]
    lines = [
        f"budgets: {len(b['found'])} ({b['rule']})"
        + (f"; {b['points_in_none']} points in none (L(N, D) only)" if b["points_in_none"] else "")
    ]
    if "surface" in result:
        s = result["surface"]
        lines.append(
            f"L(N, D) = {s['E']:.3f} + {s['A']:.4g}/N^{s['alpha']:.3f} + "
            f"{s['B']:.4g}/D^{s['beta']:.3f}  (a = {s['a']:.3f}, {s['n_points']} points)"
        )
    if "frontier" in result:
        fr = result["frontier"]
        lines.append(f"L(C) = {fr['E']:.3f} + {fr['A']:.4g}·C^-{fr['alpha']:.4f}")
    if "power_law" in result:
        pw = result["power_law"]
        lines.append(f"L(C) = {pw['A']:.4g}·C^-{pw['alpha']:.4f} (E = 0)")
    bt = result["backtest"]
    if bt["loss_score"]:
        lines.append(
            "backtest (mean |ln ratio| predicting each fitted budget from those below): "
            + ", ".join(
                f"{LOSS_FORMS[f]} {v:.4f}" + (" [chosen]" if f == result["choice"] else "")
                for f, v in bt["loss_score"].items()
            )
        )
    for c in result["holdout"]:
        parts = [f"held-out {format_flops(c['C'])}: measured best {c['measured_best']:.4f}"]
        for form, value in c["loss"].items():
            chosen = " [chosen]" if form == result["choice"] else ""
            parts.append(
                f"{LOSS_FORMS[form]} predicts {value:.4f} ({c['error'][form]:+.2%}){chosen}"
            )
        lines.append("; ".join(parts))
    for t in result["targets"]:
        if "best_loss" in t and "best_N" in t:
            iv = t["best_interval"]
            lines.append(
                f"target {format_flops(t['C'])}: loss {t['best_loss']:.4f}"
                + (f" [{iv[0]:.4f}, {iv[1]:.4f}]" if iv else "")
                + f" ({LOSS_FORMS[result['choice']]}), N* {format_count(t['best_N'])}, D* "
                f"{format_count(t['best_D'])}"
            )
    return lines


def fit_sources(
    sources: list[str],
    *,
    out: str | None = None,
    target_flops: list[float] | None = None,
    holdout: list[float] | None = None,
    exclude_highest: int | None = None,
    bootstrap: int | None = None,
    budget_tolerance: float | None = None,
    params: str | None = None,
    finetune: list[str] | None = None,
) -> dict:
    """`lmforge scaling fit`: a sweep's own fit settings, overridden by the flags given."""
    sweep = len(sources) == 1 and os.path.isfile(os.path.join(sources[0], "sweep.yaml"))
    fit = SweepFitConfig()
    if sweep:
        fit = load_config(ScalingConfig, [os.path.join(sources[0], "sweep.yaml")]).fit
    overrides = {
        "holdout": holdout,
        "exclude_highest": exclude_highest,
        "bootstrap": bootstrap,
        "budget_tolerance": budget_tolerance,
        "params": params,
    }
    fit = load_config(
        SweepFitConfig, [fit.__dict__, {k: v for k, v in overrides.items() if v is not None}]
    )
    bad = [c for c in target_flops or [] if not (math.isfinite(c) and c > 0)]
    if bad:
        raise ConfigurationError(f"--target-flops {bad[0]:g}: give a compute budget in FLOPs > 0")
    targets = sorted(set(fit.target_flops) | set(target_flops or []))
    out = out or (os.path.join(sources[0], "report") if sweep else "scaling-report")
    if os.path.lexists(out) and not os.path.isdir(out):  # said before the fit, not after it
        raise ConfigurationError(f"--out {out} is a file; give a directory for the report")
    check_writable(out, "--out ")
    if not sources:
        if not finetune:
            raise ConfigurationError(
                "give the points to fit (a sweep directory, run directories or a CSV) and/or "
                "--finetune RUN ..."
            )
        return write_finetune_report(finetune, out)
    src = load_sources(sources, fit.params)
    result = write_report(src, fit, out, targets=targets, finetune=finetune or [])
    for line in summary_lines(result):
        print(line)
    print(f"report: {out}/report.md")
    return result


def report_sweep(sweep_dir: str) -> dict:
    """The sweep's report with its own fit settings (sweep.yaml)."""
    return fit_sources([sweep_dir])
