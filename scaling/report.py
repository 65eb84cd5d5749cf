"""`lmforge scaling fit` and the end of `lmforge scaling sweep`: gather points (a sweep, run
directories or a CSV), fit (scaling/fit.py), predict the held-out budgets and the targets, and
write ``report.md``, ``fit.json``, ``points.csv`` and the figures.

What is fitted (see scaling/fit.py for the methods):
- IsoFLOP minima: a parabola in log N per budget; N_opt = kN·C^a and D_opt = kD·C^b through them.
- The compute frontier L(C) = E + A·C^-alpha through the IsoFLOP minima (the best loss a budget
  buys), and the nested A·C^-alpha (E = 0), which predicts where the budgets do not identify E.
- The loss surface L(N, D) = E + A/N^alpha + B/D^beta through every point; its compute-optimal
  N*, D*, L* at a budget C minimise L along D = C / FLOPs-per-token(N).
Held-out budgets are left out of all three and predicted; the report compares each prediction
with the best loss measured at that budget.
"""

from __future__ import annotations

import csv
import json
import math
import os
from dataclasses import dataclass, field

import numpy as np

from pretrain.errors import ConfigurationError, DataError
from scaling.config import SweepFitConfig
from scaling.fit import (
    IsoFLOPMinimum,
    Points,
    ScalingFitError,
    fit_allocation,
    fit_frontier,
    fit_power_law,
    fit_surface,
    isoflop_minima,
    load_points_csv,
)
from scaling.plan import format_count, format_flops
from scaling.sweep import final_eval

# --- gathering points --------------------------------------------------------------------------


@dataclass
class Source:
    """Points with what the fits need to know about them."""

    points: Points
    budgets: np.ndarray | None  # nominal budget of each point (sweeps), else None
    what: str  # where the points came from, for the report
    params: str  # which parameter count N is
    fpt: object = None  # N -> FLOPs per token, from the points (None: 6·N)
    missing: list[str] = field(default_factory=list)  # runs without a final loss
    epochs: np.ndarray | None = None  # passes over the data per point (sweeps)


def _final_eval(run_dir: str):
    """(final eval row or None, the run's PretrainConfig) of a pretrain run directory."""
    from pretrain.config import PretrainConfig, load_config

    cfg_path = os.path.join(run_dir, "config.yaml")
    if not os.path.isfile(cfg_path):
        raise DataError(f"{run_dir} is not a run directory (no config.yaml); give a sweep or run")
    cfg = load_config(PretrainConfig, [cfg_path])
    return final_eval(run_dir, cfg.train.total_steps()), cfg


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


def load_sweep(sweep_dir: str, params: str) -> Source:
    with open(os.path.join(sweep_dir, "plan.json")) as f:
        plan = json.load(f)
    rows, missing = [], []
    for p in plan["points"]:
        row = final_eval(os.path.join(sweep_dir, p["name"]), p["steps"])
        if row is None:
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
    return Source(
        points=pts,
        budgets=np.array([p["budget"] for p, _ in rows]),
        what=f"sweep {sweep_dir} ({len(rows)} of {len(every)} runs finished)",
        params=params,
        fpt=_fpt_from_points(
            np.array([p[key] for p in every], float),
            np.array([p["flops_per_token"] for p in every], float),
        ),
        missing=missing,
        epochs=np.array([p["epochs"] for p, _ in rows]),
    )


def load_runs(run_dirs: list[str], params: str) -> Source:
    from pretrain.flops import param_counts

    rows, missing = [], []
    for run in run_dirs:
        row, cfg = _final_eval(run)
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
    return Source(pts, None, f"{len(rows)} run directories", params, fpt=fpt, missing=missing)


def load_sources(sources: list[str], params: str) -> Source:
    if len(sources) == 1 and sources[0].endswith((".csv", ".CSV")):
        if not os.path.isfile(sources[0]):
            raise DataError(f"{sources[0]}: no such CSV file")
        pts = load_points_csv(sources[0])
        what = f"CSV {sources[0]} ({len(pts)} points)"
        return Source(pts, None, what, "as given", fpt=_fpt_from_points(pts.N, pts.C / pts.D))
    for s in sources:
        if not os.path.isdir(s):
            raise DataError(f"{s}: not a sweep directory, run directory or .csv file")
    if len(sources) == 1 and os.path.isfile(os.path.join(sources[0], "plan.json")):
        return load_sweep(sources[0], params)
    return load_runs(sources, params)


# --- fitting -----------------------------------------------------------------------------------


def _budget_groups(src: Source, rel_tol: float = 0.05) -> np.ndarray:
    """Each point's budget: the sweep's nominal one, else points within rel_tol share one."""
    if src.budgets is not None:
        return src.budgets
    C = src.points.C
    out = np.zeros_like(C)
    for i in np.argsort(C):
        for j in np.argsort(C):
            if out[j] and abs(math.log(C[i] / out[j])) <= math.log1p(rel_tol):
                out[i] = out[j]
                break
        else:
            out[i] = C[i]
    return out


def _frontier_form(frontier, minima: list[IsoFLOPMinimum], notes: list[str]) -> str:
    """Which frontier form predicts: E + A·C^-α only where the budgets identify E, i.e. its
    bootstrap interval stays clear of 0 (a lower end above 1% of the smallest loss); otherwise
    the nested A·C^-α, which fits the same minima with one parameter fewer. Without bootstrap
    intervals, a backtest decides: both forms fitted without the largest fitted budget predict
    its minimum. The held-out budgets are looked at by neither rule."""
    floor = 0.01 * min(m.L_opt for m in minima)
    if "E" in frontier.ci:
        lo, hi = frontier.ci["E"]
        identified = lo > floor
        notes.append(
            f"frontier form: E = {frontier.E:.4g} with interval [{lo:.3g}, {hi:.3g}]"
            + (
                ": E is identified, predictions use E + A·C^-α"
                if identified
                else " reaches 0: these budgets do not identify E, predictions use A·C^-α"
            )
        )
        return "frontier" if identified else "power_law"
    if len(minima) < 5:
        return "frontier"
    last, rest = minima[-1], minima[:-1]
    cs, ls = [m.C for m in rest], [m.L_opt for m in rest]
    free = float(fit_frontier(cs, ls).predict(last.C)) / last.L_opt - 1
    zero = float(fit_power_law(cs, ls).predict(last.C)) / last.L_opt - 1
    choice = "frontier" if abs(free) <= abs(zero) else "power_law"
    notes.append(
        f"frontier form by backtest (no bootstrap intervals; fitted without budget "
        f"{format_flops(last.C)}, predicting its minimum {last.L_opt:.4f}): E + A·C^-α "
        f"{free:+.2%}, A·C^-α {zero:+.2%}; predictions use "
        f"{'E + A·C^-α' if choice == 'frontier' else 'A·C^-α'}"
    )
    return choice


def analyse(src: Source, fit: SweepFitConfig, targets: list[float]) -> dict:
    """Every fit and prediction, as plain data (fit.json) plus the fit objects (figures)."""
    pts = src.points
    budgets = _budget_groups(src)
    for h in fit.holdout:  # a held-out budget claims the points within 5% of it
        budgets = np.where(np.abs(np.log(budgets / h)) <= math.log1p(0.05), h, budgets)
    held = np.isin(budgets, fit.holdout) if fit.holdout else np.zeros(len(pts), bool)
    train_idx = np.flatnonzero(~held)
    if len(train_idx) == 0:
        raise ConfigurationError("every point is held out; hold out fewer budgets")
    train = pts.subset(train_idx)
    notes: list[str] = []

    # IsoFLOP minima, budget by budget: a budget without a minimum is noted, not fatal.
    minima: list[IsoFLOPMinimum] = []
    for c in sorted(set(budgets.tolist())):
        idx = np.flatnonzero(budgets == c)
        if len(idx) < 3:
            notes.append(f"budget {format_flops(c)}: {len(idx)} run(s), no IsoFLOP parabola")
            continue
        try:
            (m,) = isoflop_minima(pts.subset(idx), budgets=[c], flops_per_token=src.fpt)
        except ScalingFitError as exc:
            notes.append(str(exc))
            continue
        if not m.inside:
            notes.append(
                f"budget {format_flops(c)}: the parabola's minimum N={format_count(m.N_opt)} "
                "lies outside the sizes trained (an extrapolation; add sizes beyond it)"
            )
        minima.append(m)
    fit_minima = [m for m in minima if m.C not in fit.holdout]

    result: dict = {
        "source": src.what,
        "params": src.params,
        "notes": notes,
        "holdout_budgets": list(fit.holdout),
    }
    objects: dict = {"minima": minima, "held": held, "budgets": budgets}
    common = dict(bootstrap=fit.bootstrap, level=fit.level, seed=fit.seed)
    try:
        surface = fit_surface(
            train, delta=fit.huber_delta, exclude_highest=fit.exclude_highest, **common
        )
        objects["surface"] = surface
        result["surface"] = {
            **surface.params(),
            "ci": surface.ci,
            "n_points": surface.n_points,
            "excluded": [train.labels[i] for i in surface.excluded],
            "objective": surface.objective,
        }
    except ScalingFitError as exc:  # the form every source can be fitted with: a hard error
        raise ScalingFitError(f"{src.what}: {exc}") from None
    if len(fit_minima) >= 4:
        frontier = fit_frontier(
            [m.C for m in fit_minima],
            [m.L_opt for m in fit_minima],
            delta=fit.huber_delta,
            **common,
        )
        objects["frontier"] = frontier
        result["frontier"] = {**frontier.params(), "ci": frontier.ci, "n_points": frontier.n_points}
    else:
        notes.append(
            f"L(C) = E + A·C^-α not fitted: {len(fit_minima)} IsoFLOP minima outside the "
            "held-out budgets; it needs 4 (add budgets)"
        )
    if len(fit_minima) >= 2:
        cs, ls = [m.C for m in fit_minima], [m.L_opt for m in fit_minima]
        power = fit_power_law(cs, ls, **common)
        objects["power"] = power
        result["power_law"] = {**power.params(), "ci": power.ci, "n_points": power.n_points}
        result["frontier_choice"] = (
            _frontier_form(objects["frontier"], fit_minima, notes)
            if "frontier" in objects
            else "power_law"
        )
    if len(fit_minima) >= 2:
        alloc = fit_allocation(fit_minima, **common)
        objects["allocation"] = alloc
        result["allocation"] = {
            "a": alloc.a,
            "kN": alloc.kN,
            "b": alloc.b,
            "kD": alloc.kD,
            "ci": alloc.ci,
            "n_budgets": alloc.n_budgets,
        }
    result["minima"] = [
        {
            "C": m.C,
            "N_opt": m.N_opt,
            "D_opt": m.D_opt,
            "L_opt": m.L_opt,
            "n": m.n_points,
            "inside": m.inside,
            "held_out": m.C in fit.holdout,
        }
        for m in minima
    ]

    def predictions(c: float) -> dict:
        out: dict = {"C": c}
        if "frontier" in objects:
            out["frontier_loss"] = float(objects["frontier"].predict(c))
        if "power" in objects:
            out["power_loss"] = float(objects["power"].predict(c))
            out["best_loss"] = out[
                "frontier_loss" if result["frontier_choice"] == "frontier" else "power_loss"
            ]
        if "surface" in objects:
            n, d, loss = objects["surface"].optimal(c, flops_per_token=src.fpt)
            out.update(surface_N=n, surface_D=d, surface_loss=loss)
        if "allocation" in objects:
            out.update(
                alloc_N=float(objects["allocation"].N_opt(c)),
                alloc_D=float(objects["allocation"].D_opt(c)),
            )
        return out

    checks = []
    for c in fit.holdout:
        idx = np.flatnonzero(budgets == c)
        if not len(idx):
            notes.append(f"held-out budget {format_flops(c)} has no finished run to check")
            continue
        best = idx[np.argmin(pts.L[idx])]
        row = predictions(c)
        row.update(
            measured_best=float(pts.L[best]),
            measured_run=pts.labels[best],
            measured_N=float(pts.N[best]),
        )
        m = next((m for m in minima if m.C == c), None)
        if m is not None:
            row["measured_parabola"], row["parabola_N"] = m.L_opt, m.N_opt
        for k in ("frontier_loss", "power_loss", "best_loss", "surface_loss"):
            if k in row:
                row[k.replace("loss", "error")] = (row[k] - row["measured_best"]) / row[
                    "measured_best"
                ]
        checks.append(row)
    result["holdout"] = checks
    result["targets"] = [predictions(c) for c in targets]
    return {"result": result, "objects": objects}


# --- the report --------------------------------------------------------------------------------


def _ci(ci: dict, key: str, fmt: str) -> str:
    if key not in ci:
        return ""
    lo, hi = ci[key]
    return f" [{format(lo, fmt)}, {format(hi, fmt)}]"


def write_points_csv(path: str, src: Source, budgets: np.ndarray, held: np.ndarray) -> None:
    p = src.points
    with open(path, "w", newline="") as f:
        w = csv.writer(f)
        w.writerow(["run", "budget", "N", "D", "C", "loss", "epochs", "held_out"])
        for i in range(len(p)):
            ep = "" if src.epochs is None else f"{src.epochs[i]:.3f}"
            w.writerow(
                [
                    p.labels[i],
                    f"{budgets[i]:.10g}",
                    f"{p.N[i]:.0f}",
                    f"{p.D[i]:.0f}",
                    f"{p.C[i]:.12g}",
                    f"{p.L[i]:.6f}",
                    ep,
                    int(held[i]),
                ]
            )


def render_markdown(src: Source, analysis: dict, figures: list[str], fit: SweepFitConfig) -> str:
    r = analysis["result"]
    level = f"{fit.level:.0%}"
    lines = [
        "# Scaling-law fit",
        "",
        f"Source: {r['source']}. N = "
        + {
            "non_embedding": "parameters without the input embedding table (the LM head "
            "counts; the N of C = 6·N·D)",
            "total": "all parameters",
        }.get(src.params, "as given in the CSV")
        + "; D = training tokens; C = training FLOPs (6·N plus attention per token, "
        "pretrain/flops.py, for runs; as given for a CSV); loss = final validation loss "
        "(nats/token).",
        "",
    ]
    if src.missing:
        lines += [f"Runs without a final loss (left out): {', '.join(src.missing)}.", ""]
    if src.epochs is not None and src.epochs.max() > 1:
        rep = int((src.epochs > 1).sum())
        lines += [
            f"Data repetition: {rep} of {len(src.epochs)} runs read the training data more than "
            f"once (at most {src.epochs.max():.2f} passes); see points.csv.",
            "",
        ]
    if fit.holdout:
        lines += [
            "Held out of every fit and predicted: "
            + ", ".join(format_flops(c) for c in fit.holdout)
            + " FLOPs.",
            "",
        ]
    checks = r["holdout"]
    if checks:
        lines += [
            "## Prediction of the held-out budgets",
            "",
            "| budget | measured best loss (run) | E + A·C^-α | error | A·C^-α | error | "
            "L(N, D) optimum | error | N* of L(N, D) | N_opt of the IsoFLOP fit | "
            "measured best N | its parabola's N_opt |",
            "|---|---|---|---|---|---|---|---|---|---|---|---|",
        ]
        for c in checks:
            lines.append(
                f"| {format_flops(c['C'])} | {c['measured_best']:.4f} ({c['measured_run']}) | "
                + "".join(
                    f"{c[k + '_loss']:.4f} | {c[k + '_error']:+.2%} | "
                    if k + "_loss" in c
                    else "— | — | "
                    for k in ("frontier", "power")
                )
                + (
                    f"{c['surface_loss']:.4f} | {c['surface_error']:+.2%} | "
                    f"{format_count(c['surface_N'])} | "
                    if "surface_loss" in c
                    else "— | — | — | "
                )
                + (f"{format_count(c['alloc_N'])} | " if "alloc_N" in c else "— | ")
                + f"{format_count(c['measured_N'])} | "
                + (f"{format_count(c['parabola_N'])} |" if "parabola_N" in c else "— |")
            )
        lines += [""]
        if "frontier_choice" in r:
            form = "E + A·C^-α" if r["frontier_choice"] == "frontier" else "A·C^-α"
            lines += [
                f"The prediction of the best loss is the frontier {form}: "
                + ", ".join(
                    f"{format_flops(c['C'])}: {c['best_loss']:.4f} ({c['best_error']:+.2%})"
                    for c in checks
                    if "best_loss" in c
                )
                + " (the form is chosen on the fitted budgets alone; see the notes).",
                "",
            ]
        if any("measured_parabola" in c for c in checks):
            lines += [
                "The held-out budgets' own parabola minima: "
                + ", ".join(
                    f"{format_flops(c['C'])}: {c['measured_parabola']:.4f}"
                    for c in checks
                    if "measured_parabola" in c
                )
                + ".",
                "",
            ]
    if "surface" in r:
        s = r["surface"]
        lines += [
            "## L(N, D) = E + A / N^α + B / D^β",
            "",
            f"Huber (δ = {fit.huber_delta:g}) on log-loss, L-BFGS from a grid of starts; "
            f"{s['n_points']} points"
            + (
                f", {len(s['excluded'])} highest-loss excluded: {', '.join(s['excluded'])}"
                if s["excluded"]
                else ", none excluded"
            )
            + (f"; {level} bootstrap intervals ({fit.bootstrap} resamples)." if s["ci"] else "."),
            "",
            "| parameter | value | interval |",
            "|---|---|---|",
        ]
        for k, fmt in (
            ("E", ".4g"),
            ("A", ".4g"),
            ("B", ".4g"),
            ("alpha", ".4f"),
            ("beta", ".4f"),
            ("a", ".4f"),
            ("b", ".4f"),
        ):
            lines.append(f"| {k} | {format(s[k], fmt)} | {_ci(s['ci'], k, fmt).strip()} |")
        lines += ["", "a = β/(α+β) (N* ∝ C^a), b = α/(α+β) (D* ∝ C^b).", ""]
    if "power_law" in r:
        pw = r["power_law"]
        lines += [
            "## Compute frontier with E = 0: L(C) = A · C^-α",
            "",
            f"Least squares in log-log through the same minima: A = {pw['A']:.4g}"
            f"{_ci(pw['ci'], 'A', '.4g')}, α = {pw['alpha']:.4f}{_ci(pw['ci'], 'alpha', '.4f')}.",
            "",
        ]
    if "frontier" in r:
        fr = r["frontier"]
        lines += [
            "## Compute frontier L(C) = E + A · C^-α",
            "",
            f"Through the IsoFLOP minima of {fr['n_points']} budgets: E = {fr['E']:.4g}"
            f"{_ci(fr['ci'], 'E', '.4g')}, A = {fr['A']:.4g}{_ci(fr['ci'], 'A', '.4g')}, "
            f"α = {fr['alpha']:.4f}{_ci(fr['ci'], 'alpha', '.4f')}.",
            "",
        ]
    if r["minima"]:
        lines += [
            "## IsoFLOP minima (parabola in ln N per budget)",
            "",
            "| budget | runs | N_opt | D_opt | D/N | loss at minimum | |",
            "|---|---|---|---|---|---|---|",
        ]
        for m in r["minima"]:
            flag = (
                "held out"
                if m["held_out"]
                else ("outside the sizes trained" if not m["inside"] else "")
            )
            lines.append(
                f"| {format_flops(m['C'])} | {m['n']} | {format_count(m['N_opt'])} | "
                f"{format_count(m['D_opt'])} | {m['D_opt'] / m['N_opt']:.1f} | {m['L_opt']:.4f} "
                f"| {flag} |"
            )
        lines += [""]
    if "allocation" in r:
        a = r["allocation"]
        lines += [
            f"N_opt ∝ C^a with a = {a['a']:.3f}{_ci(a['ci'], 'a', '.3f')}; D_opt ∝ C^b with "
            f"b = {a['b']:.3f}{_ci(a['ci'], 'b', '.3f')} ({a['n_budgets']} budgets).",
            "",
        ]
    if r["targets"]:
        lines += [
            "## Predictions for target budgets",
            "",
            "| C | N* (surface) | D* (surface) | D*/N* | loss (surface) | loss (frontier) | "
            "N_opt (IsoFLOP) | D_opt (IsoFLOP) |",
            "|---|---|---|---|---|---|---|---|",
        ]
        for t in r["targets"]:
            lines.append(
                f"| {format_flops(t['C'])} | "
                + (
                    f"{format_count(t['surface_N'])} | {format_count(t['surface_D'])} | "
                    f"{t['surface_D'] / t['surface_N']:.1f} | {t['surface_loss']:.4f} | "
                    if "surface_N" in t
                    else "— | — | — | — | "
                )
                + (f"{t['best_loss']:.4f} | " if "best_loss" in t else "— | ")
                + (
                    f"{format_count(t['alloc_N'])} | {format_count(t['alloc_D'])} |"
                    if "alloc_N" in t
                    else "— | — |"
                )
            )
        lines += [""]
    if r["finetune"]:
        lines += _finetune_table(r["finetune"])
    if r["notes"]:
        lines += ["## Notes", ""] + [f"- {n}" for n in r["notes"]] + [""]
    if figures:
        lines += ["## Figures", ""] + [f"![{f}]({f})" for f in figures] + [""]
    return "\n".join(lines)


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
    src: Source, fit: SweepFitConfig, out: str, *, targets: list[float], finetune: list[str]
) -> dict:
    """Fit, then write the report directory all at once (an older report is replaced)."""
    from pretrain.durable import atomic_directory
    from scaling.figures import finetune_points, plot_all

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


def _finetune_table(rows: list[dict]) -> list[str]:
    lines = [
        "## Finetuned runs: downstream metric vs total compute",
        "",
        "The metric is the evaluation of the run's model: its checkpoint marked best "
        "(early_stopping.keep_best), else its last; finetuning FLOPs are those up to that step.",
        "",
        "| run | metric | value | step | pretraining FLOPs | finetuning FLOPs | total |",
        "|---|---|---|---|---|---|---|",
    ]
    for f in rows:
        lines.append(
            f"| {f['run']}{' (from scratch)' if f['from_scratch'] else ''} | {f['metric']} "
            f"| {f['value']:.4f} | {f['step']} | {f['pretrain_flops']:.3g} | "
            f"{f['finetune_flops']:.3g} | "
            f"{f['total_flops']:.3g} |"
        )
    return lines + [""]


def write_finetune_report(runs: list[str], out: str) -> dict:
    """Only the finetuned runs' metric against total compute (no points to fit)."""
    from pretrain.durable import atomic_directory
    from scaling.figures import finetune_points, plot_finetune

    rows = finetune_points(runs)
    with atomic_directory(out, prefix=".report.", replace=True) as tmp:
        figure = plot_finetune(rows, tmp)
        with open(os.path.join(tmp, "fit.json"), "w") as f:
            json.dump({"finetune": rows}, f, indent=1)
        text = ["# Finetuning compute", "", *_finetune_table(rows), f"![{figure}]({figure})", ""]
        with open(os.path.join(tmp, "report.md"), "w") as f:
            f.write("\n".join(text))
    for r in rows:
        print(f"{r['run']}: {r['metric']} {r['value']:.4f} at {r['total_flops']:.3g} FLOPs in all")
    print(f"report: {out}/report.md")
    return {"finetune": rows}


def summary_lines(result: dict) -> list[str]:
    """What the command prints: the fits in a line each, and every held-out check."""
    lines = []
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
    for c in result["holdout"]:
        parts = [f"held-out {format_flops(c['C'])}: measured best {c['measured_best']:.4f}"]
        for k, form in (("frontier", "E + A·C^-α"), ("power", "A·C^-α")):
            if k + "_loss" in c:
                chosen = " [chosen]" if c.get("best_loss") == c[k + "_loss"] else ""
                parts.append(
                    f"{form} predicts {c[k + '_loss']:.4f} ({c[k + '_error']:+.2%}){chosen}"
                )
        if "surface_loss" in c:
            parts.append(f"L(N, D) predicts {c['surface_loss']:.4f} ({c['surface_error']:+.2%})")
        lines.append("; ".join(parts))
    for t in result["targets"]:
        if "surface_N" in t:
            lines.append(
                f"target {format_flops(t['C'])}: N* {format_count(t['surface_N'])}, D* "
                f"{format_count(t['surface_D'])}, loss {t['surface_loss']:.4f}"
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
    params: str | None = None,
    finetune: list[str] | None = None,
) -> dict:
    """`lmforge scaling fit`: a sweep's own fit settings, overridden by the flags given."""
    from pretrain.config import load_config

    sweep = len(sources) == 1 and os.path.isfile(os.path.join(sources[0], "sweep.yaml"))
    fit = SweepFitConfig()
    if sweep:
        from scaling.config import ScalingConfig

        fit = load_config(ScalingConfig, [os.path.join(sources[0], "sweep.yaml")]).fit
    overrides = {
        "holdout": holdout,
        "exclude_highest": exclude_highest,
        "bootstrap": bootstrap,
        "params": params,
    }
    fit = load_config(
        SweepFitConfig, [fit.__dict__, {k: v for k, v in overrides.items() if v is not None}]
    )
    targets = sorted(set(fit.target_flops) | set(target_flops or []))
    out = out or (os.path.join(sources[0], "report") if sweep else "scaling-report")
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
