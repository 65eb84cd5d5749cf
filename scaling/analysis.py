"""The fits and predictions of a report, made from the points of a `Source`
(scaling/sources.py) with the methods of scaling/fit.py:
- IsoFLOP minima: a parabola in log N per budget; N_opt = kN·C^a and D_opt = kD·C^b through them.
- The compute frontier L(C) = E + A·C^-alpha through the IsoFLOP minima (the best loss a budget
  buys), and the nested A·C^-alpha (E = 0), which predicts where the budgets do not identify E.
- The loss surface L(N, D) = E + A/N^alpha + B/D^beta through every point; its compute-optimal
  N*, D*, L* at a budget C minimise L along D = C / FLOPs-per-token(N).
Held-out budgets are left out of all three and predicted; the report compares each prediction
with the best loss measured at that budget.
"""

from __future__ import annotations

import math

import numpy as np

from pretrain.errors import ConfigurationError
from scaling.config import SweepFitConfig
from scaling.fit import (
    IsoFLOPMinimum,
    ScalingFitError,
    budget_rule,
    fit_allocation,
    fit_frontier,
    fit_power_law,
    fit_surface,
    group_budgets,
    isoflop_minima,
)
from scaling.plan import format_count, format_flops
from scaling.sources import Source


def _budget_groups(src: Source, tolerance: float) -> tuple[np.ndarray, str]:
    """Each point's budget (NaN: none) and the rule that formed them: a sweep's nominal
    budgets, else `group_budgets` (the measured C of run directories or a CSV)."""
    if src.budgets is not None:
        return src.budgets.astype(float), "the sweep's nominal budgets"
    return group_budgets(src.points.C, tolerance), budget_rule(tolerance)


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
    budgets, rule = _budget_groups(src, fit.budget_tolerance)
    near = math.log1p(fit.budget_tolerance)
    with np.errstate(invalid="ignore"):  # NaN: a point in no budget
        for h in fit.holdout:  # a held-out budget claims the budget found within the tolerance
            budgets = np.where(np.abs(np.log(budgets / h)) <= near, h, budgets)
    held = np.isin(budgets, fit.holdout) if fit.holdout else np.zeros(len(pts), bool)
    train_idx = np.flatnonzero(~held)
    if len(train_idx) == 0:
        raise ConfigurationError("every point is held out; hold out fewer budgets")
    train = pts.subset(train_idx)
    notes: list[str] = []
    found = sorted(set(budgets[np.isfinite(budgets)].tolist()))
    loose = int((~np.isfinite(budgets)).sum())  # in no budget: L(N, D) only

    # IsoFLOP minima, budget by budget: a budget without a minimum is noted, not fatal.
    minima: list[IsoFLOPMinimum] = []
    for c in found:
        idx = np.flatnonzero(budgets == c)
        if len(idx) < 3:
            notes.append(f"budget {format_flops(c)}: {len(idx)} run(s), no IsoFLOP parabola")
            continue
        try:
            # the points are this budget's by construction: admit them all
            spread = math.expm1(float(np.abs(np.log(pts.C[idx] / c)).max()))
            (m,) = isoflop_minima(
                pts.subset(idx),
                budgets=[c],
                rel_tol=min(spread + 1e-9, 0.999),
                flops_per_token=src.fpt,
            )
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
        "budgets": {"rule": rule, "found": found, "points_in_none": loose},
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
