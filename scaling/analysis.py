"""The fits and predictions of a report, made from the points of a `PointSet`
(scaling/sources.py) by every form of scaling/forms.py: the budgets' minima (profiles shaped like
L(N, D), or parabolas), the frontier E + A·C^-α and A·C^-α through them, the IsoFLOP allocation,
and L(N, D) through every point. A backtest on the fitted budgets chooses the form that predicts
the loss and the one that predicts N*; held-out budgets are left out of everything and each form's
prediction of them is compared with the best loss measured there.
"""

from __future__ import annotations

import math

import numpy as np

from lmforge.pretrain.core.errors import ConfigurationError
from lmforge.scaling.config import SweepFitConfig
from lmforge.scaling.fit import IsoFLOPMinimum, ScalingFitError, budget_rule, group_budgets
from lmforge.scaling.forms import (
    LOSS_FORMS,
    SIZE_FORMS,
    backtest,
    budget_minima,
    choose,
    disagreements,
    fit_all,
    parabola_flags,
)
from lmforge.scaling.grid import format_count, format_flops
from lmforge.scaling.sources import PointSet


def _budget_groups(src: PointSet, tolerance: float) -> tuple[np.ndarray, str]:
    """Each point's budget (NaN: none) and the rule that formed them: a sweep's nominal
    budgets, else `group_budgets` (the measured C of run directories or a CSV)."""
    if src.budgets is not None:
        return src.budgets.astype(float), "the sweep's nominal budgets"
    return group_budgets(src.points.C, tolerance), budget_rule(tolerance)


def _minimum_row(m: IsoFLOPMinimum) -> dict:
    return {"N_opt": m.N_opt, "D_opt": m.D_opt, "L_opt": m.L_opt, "inside": m.inside}


def analyse(src: PointSet, fit: SweepFitConfig, targets: list[float]) -> dict:
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

    try:
        full = fit_all(
            train,
            budgets[train_idx],
            src.fpt,
            fit,
            bootstrap=fit.bootstrap,
            notes=notes,
            strict=True,
        )
    except ScalingFitError as exc:  # the form every source can be fitted with: a hard error
        raise ScalingFitError(f"{src.what}: {exc}") from None
    # The held-out budgets' own minima (what their prediction is compared with), by the
    # surface fitted without them.
    held_parabolas, held_profiles = budget_minima(
        pts.subset(np.flatnonzero(held)), budgets[held], src.fpt, full.surface, None
    )
    profiled = bool(full.minima) and full.minima[0].method == "profile"
    held_minima = held_profiles if profiled else held_parabolas
    for m in [*full.minima, *held_minima]:
        if not m.inside:
            notes.append(
                f"budget {format_flops(m.C)}: the minimum N={format_count(m.N_opt)} lies outside "
                "the sizes trained (an extrapolation; add sizes beyond it)"
            )
    flags = parabola_flags(full)
    for c, why in flags.items():
        notes.append(f"budget {format_flops(c)}: {why}")
    bt = backtest(train, budgets[train_idx], src.fpt, fit, full.minima)
    choice = choose(bt["loss_score"], "surface")
    choice_size = choose(bt["size_score"], "surface")
    scored = ", ".join(format_flops(c) for c in bt["loss_common"]) or "none"
    notes.append(
        "loss predicted by "
        + LOSS_FORMS[choice]
        + (
            f": the smallest backtest error (mean |error| predicting budgets {scored} from the "
            "budgets below each)"
            if bt["loss_score"]
            else ": no backtest (fewer than three fitted budgets with a minimum)"
        )
    )

    result: dict = {
        "source": src.what,
        "params": src.params,
        "notes": notes,
        "holdout_budgets": list(fit.holdout),
        "budgets": {"rule": rule, "found": found, "points_in_none": loose},
        "minima_method": full.minima[0].method if full.minima else None,
        "choice": choice,
        "choice_size": choice_size,
        "backtest": bt,
    }
    objects: dict = {
        "minima": full.minima,
        "parabolas": full.parabolas + held_parabolas,
        "held_minima": held_minima,
        "held": held,
        "budgets": budgets,
        "fitted": full,
    }
    surface = full.surface
    objects["surface"] = surface
    result["surface"] = {
        **surface.params(),
        "ci": surface.ci,
        "n_points": surface.n_points,
        "excluded": [train.labels[i] for i in surface.excluded],
        "objective": surface.objective,
    }
    if full.frontier is not None:
        objects["frontier"] = fr = full.frontier
        result["frontier"] = {**fr.params(), "ci": fr.ci, "n_points": fr.n_points}
    else:
        notes.append(
            f"L(C) = E + A·C^-α not fitted: {len(full.minima)} budget minima outside the "
            "held-out budgets; it needs 4 (add budgets)"
        )
    if full.power is not None:
        objects["power"] = pw = full.power
        result["power_law"] = {**pw.params(), "ci": pw.ci, "n_points": pw.n_points}
    if full.allocation is not None:
        objects["allocation"] = alloc = full.allocation
        result["allocation"] = {
            "a": alloc.a,
            "kN": alloc.kN,
            "b": alloc.b,
            "kD": alloc.kD,
            "ci": alloc.ci,
            "n_budgets": alloc.n_budgets,
        }
    profiles = {m.C: m for m in full.profiles + held_profiles}
    result["minima"] = [
        {
            "C": p.C,
            "n": p.n_points,
            "held_out": p.C in fit.holdout,
            "parabola": _minimum_row(p),
            **({"profile": _minimum_row(profiles[p.C])} if p.C in profiles else {}),
            "flag": flags.get(p.C, ""),
        }
        for p in sorted(full.parabolas + held_parabolas, key=lambda m: m.C)
    ]

    def predictions(c: float) -> dict:
        out: dict = {"C": c, "loss": {}, "loss_interval": {}, "N": {}, "N_interval": {}, "D": {}}
        for form in LOSS_FORMS:
            value = full.loss(form, c)
            if value is not None and math.isfinite(value):
                out["loss"][form] = value
                out["loss_interval"][form] = full.loss_interval(form, c)
        for form in SIZE_FORMS:
            value = full.size(form, c)
            if value is not None:
                out["N"][form] = value
                out["N_interval"][form] = full.size_interval(form, c)
                out["D"][form] = c / (6 * value if src.fpt is None else float(src.fpt(value)))
        if choice in out["loss"]:
            out["best_loss"] = out["loss"][choice]
            out["best_interval"] = out["loss_interval"][choice]
        if choice_size in out["N"]:
            out["best_N"] = out["N"][choice_size]
            out["best_N_interval"] = out["N_interval"][choice_size]
            out["best_D"] = out["D"][choice_size]
        notes.extend(disagreements(out["loss"], out["loss_interval"], c, "the loss"))
        notes.extend(disagreements(out["N"], out["N_interval"], c, "N*"))
        return out

    checks = []
    held_by_c = {m.C: m for m in objects["held_minima"]}
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
        if c in held_by_c:
            row["measured_minimum"], row["minimum_N"] = held_by_c[c].L_opt, held_by_c[c].N_opt
        row["error"] = {f: v / row["measured_best"] - 1 for f, v in row["loss"].items()}
        if "best_loss" in row:
            row["best_error"] = row["best_loss"] / row["measured_best"] - 1
        checks.append(row)
    result["holdout"] = checks
    result["targets"] = [predictions(c) for c in targets]
    return {"result": result, "objects": objects}
