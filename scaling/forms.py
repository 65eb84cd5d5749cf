"""Every form that predicts a larger budget, fitted to the same points, and the backtest that
chooses between them on the fitted budgets alone.

Loss at a budget C (the best loss C buys):
- ``frontier``: L(C) = E + A·C^-α through the budgets' minima;
- ``power``: L(C) = A·C^-α through the same minima (E = 0: two parameters);
- ``surface``: the minimum over N of L(N, D) = E + A/N^α + B/D^β along D = C / FLOPs-per-token,
  fitted to every point.

Loss-optimal size N* at C:
- ``allocation``: N_opt = kN·C^a through the budgets' minima (IsoFLOP, "approach 2");
- ``surface``: the argmin of the same surface minimum.

A budget's minimum is where its profile of loss against N is lowest: the profile shaped like
the surface (`profile_minimum`), or a parabola in log N (`isoflop_minima`) where the surface is
not fitted or `fit.minima` says so. Parabola minima are kept for the report and flagged where
they differ from the profile's.

Backtest: for each fitted budget from the third on, every form is fitted to the budgets below
it only (and the points in no budget below it) and predicts its minimum; a form's score is its
mean absolute relative error over the steps every form could predict (E + A·C^-α needs four
budgets, so fewer steps hold all forms). The lowest score predicts. A set of rules tuned on
one grid (e.g. "use E + A·C^-α when E's interval clears 0") picks the wrong form on another;
the backtest measures each form on the data at hand.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field

import numpy as np

from lmforge.scaling.config import SweepFitConfig
from lmforge.scaling.fit import (
    AllocationFit,
    FrontierFit,
    IsoFLOPMinimum,
    Points,
    ScalingFitError,
    SurfaceFit,
    fit_allocation,
    fit_frontier,
    fit_power_law,
    fit_surface,
    isoflop_minima,
    prediction_interval,
    profile_minimum,
)
from lmforge.scaling.grid import format_count, format_flops

LOSS_FORMS = {"frontier": "E + A·C^-α", "power": "A·C^-α", "surface": "L(N, D) optimum"}
SIZE_FORMS = {"allocation": "IsoFLOP N_opt ∝ C^a", "surface": "L(N, D) N*"}

# Where a budget's parabola minimum counts as biased (flagged): its N off the profile's by more
# than this factor, or its loss by more than this fraction.
PARABOLA_N_FACTOR = 1.25
PARABOLA_LOSS_GAP = 0.002


@dataclass
class Fitted:
    """Every form fitted to one set of points (a form that cannot be fitted is None)."""

    minima: list[IsoFLOPMinimum]  # what the frontier and the allocation are fitted through
    parabolas: list[IsoFLOPMinimum]
    profiles: list[IsoFLOPMinimum]
    surface: SurfaceFit | None
    frontier: FrontierFit | None
    power: FrontierFit | None
    allocation: AllocationFit | None
    fpt: object = None
    notes: list[str] = field(default_factory=list)

    def loss(self, form: str, C: float) -> float | None:
        if form == "surface":
            return (
                None
                if self.surface is None
                else self.surface.optimal(C, flops_per_token=self.fpt)[2]
            )
        fit = self.frontier if form == "frontier" else self.power
        return None if fit is None else float(fit.predict(C))

    def loss_interval(self, form: str, C: float) -> tuple[float, float] | None:
        if form == "surface":
            if self.surface is None:
                return None
            return self.surface.optimal_interval(C, flops_per_token=self.fpt).get("loss")
        fit = self.frontier if form == "frontier" else self.power
        return None if fit is None else fit.interval(C)

    def size(self, form: str, C: float) -> float | None:
        if form == "surface":
            return (
                None
                if self.surface is None
                else self.surface.optimal(C, flops_per_token=self.fpt)[0]
            )
        return None if self.allocation is None else float(self.allocation.N_opt(C))

    def size_interval(self, form: str, C: float) -> tuple[float, float] | None:
        if form == "surface":
            if self.surface is None:
                return None
            return self.surface.optimal_interval(C, flops_per_token=self.fpt).get("N")
        if self.allocation is None or not self.allocation.samples:
            return None
        values = [math.exp(k + a * math.log(C)) for a, k in self.allocation.samples]
        return prediction_interval(values, self.allocation.level)


def budget_minima(
    pts: Points, budgets: np.ndarray, fpt, surface: SurfaceFit | None, notes: list[str] | None
) -> tuple[list[IsoFLOPMinimum], list[IsoFLOPMinimum]]:
    """(parabola minima, profile minima) of every budget with three sizes or more; what keeps
    a budget from a minimum is noted when ``notes`` is given."""
    parabolas, profiles = [], []
    for c in sorted(set(budgets[np.isfinite(budgets)].tolist())):
        idx = np.flatnonzero(budgets == c)
        if len(idx) < 3:
            if notes is not None:
                notes.append(f"budget {format_flops(c)}: {len(idx)} run(s), no IsoFLOP minimum")
            continue
        try:
            # the points are this budget's by construction: admit them all
            spread = math.expm1(float(np.abs(np.log(pts.C[idx] / c)).max()))
            (m,) = isoflop_minima(
                pts.subset(idx), budgets=[c], rel_tol=min(spread + 1e-9, 0.999), flops_per_token=fpt
            )
            parabolas.append(m)
        except ScalingFitError as exc:
            if notes is not None:
                notes.append(str(exc))
        if surface is not None:
            p = profile_minimum(
                c,
                pts.N[idx],
                pts.D[idx],
                pts.L[idx],
                alpha=surface.alpha,
                beta=surface.beta,
                flops_per_token=fpt,
            )
            if p is not None:
                profiles.append(p)
            elif notes is not None:
                notes.append(
                    f"budget {format_flops(c)}: its profile shaped like L(N, D) has no minimum "
                    "near the sizes trained (add sizes on both sides of the minimum)"
                )
    return parabolas, profiles


def fit_all(
    pts: Points,
    budgets: np.ndarray,
    fpt,
    fit: SweepFitConfig,
    *,
    bootstrap: int,
    notes: list[str] | None = None,
    strict: bool = False,
) -> Fitted:
    """Every form fitted to ``pts`` (each point's budget in ``budgets``, NaN: none).

    strict: the surface must fit (the report's own fit: it is the form every source allows);
    otherwise a form that cannot be fitted is left None (a backtest step with little data)."""
    common = dict(bootstrap=bootstrap, level=fit.level, seed=fit.seed)
    try:
        surface = fit_surface(
            pts, delta=fit.huber_delta, exclude_highest=fit.exclude_highest, **common
        )
    except ScalingFitError:
        if strict:
            raise
        surface = None
    parabolas, profiles = budget_minima(pts, budgets, fpt, surface, notes)
    use_profiles = (
        fit.minima == "profile" and surface is not None and len(profiles) == len(parabolas)
    )
    minima = sorted(profiles if use_profiles else parabolas, key=lambda m: m.C)
    if notes is not None and fit.minima == "profile" and not use_profiles and parabolas:
        notes.append(
            "budget minima: parabolas in ln N (a budget's profile shaped like L(N, D) has no "
            "minimum, or L(N, D) is not fitted)"
        )
    cs, ls = [m.C for m in minima], [m.L_opt for m in minima]
    frontier = power = allocation = None
    if len(minima) >= 4:
        try:
            frontier = fit_frontier(cs, ls, delta=fit.huber_delta, **common)
        except ScalingFitError:
            frontier = None
    if len(minima) >= 2:
        power = fit_power_law(cs, ls, **common)
        allocation = fit_allocation(minima, **common)
    return Fitted(
        minima=minima,
        parabolas=parabolas,
        profiles=profiles,
        surface=surface,
        frontier=frontier,
        power=power,
        allocation=allocation,
        fpt=fpt,
        notes=notes if notes is not None else [],
    )


def _step_points(budgets: np.ndarray, pts: Points, below: list[float], nxt: float, tol: float):
    """The points a backtest step may see: those of the budgets ``below``, and those in no
    budget with C under the next budget's window."""
    inside = np.isin(budgets, below)
    loose = ~np.isfinite(budgets) & (pts.C < nxt / (1 + tol))
    return np.flatnonzero(inside | loose)


def backtest(pts: Points, budgets: np.ndarray, fpt, fit: SweepFitConfig, truth) -> dict:
    """For each fitted budget from the third on, every form fitted below it predicts its
    minimum (``truth``: the minima of the full fit). Returns {"steps": [{"C", "loss": {form:
    error}, "size": {form: error}}], "loss_score": {form: mean |error|}, "size_score": ...,
    "common": [C of the steps scored]}."""
    by_c = {m.C: m for m in truth}
    fitted = sorted(by_c)
    steps = []
    for k in range(2, len(fitted)):
        idx = _step_points(budgets, pts, fitted[:k], fitted[k], fit.budget_tolerance)
        f = fit_all(pts.subset(idx), budgets[idx], fpt, fit, bootstrap=0)
        m = by_c[fitted[k]]
        row: dict = {"C": fitted[k], "loss": {}, "size": {}}
        for form in LOSS_FORMS:
            pred = _safe(f.loss, form, m.C)
            if pred is not None:
                row["loss"][form] = pred / m.L_opt - 1
        for form in SIZE_FORMS:
            pred = _safe(f.size, form, m.C)
            if pred is not None:
                row["size"][form] = pred / m.N_opt - 1
        steps.append(row)
    return {
        "steps": steps,
        **_scores(steps, "loss", LOSS_FORMS),
        **_scores(steps, "size", SIZE_FORMS),
    }


def _safe(predict, form: str, C: float) -> float | None:
    """predict(form, C), or None where the form's fit cannot make one (not fitted, or not
    finite)."""
    try:
        with np.errstate(over="ignore", invalid="ignore"):
            value = predict(form, C)
    except (ScalingFitError, OverflowError, ZeroDivisionError):
        return None
    return value if value is not None and math.isfinite(value) and value > 0 else None


def _scores(steps: list[dict], kind: str, forms: dict) -> dict:
    """Mean |error| per form over the steps every form that predicted at all predicted."""
    present = [f for f in forms if any(f in s[kind] for s in steps)]
    common = [s for s in steps if all(f in s[kind] for f in present)]
    score = (
        {f: float(np.mean([abs(math.log1p(s[kind][f])) for s in common])) for f in present}
        if common
        else {}
    )
    return {f"{kind}_score": score, f"{kind}_common": [s["C"] for s in common]}


def choose(scores: dict[str, float], default: str) -> str:
    """The form with the lowest backtest score (``default`` without a backtest)."""
    return min(scores, key=scores.get) if scores else default


def disagreements(preds: dict[str, float], intervals: dict, C: float, what: str) -> list[str]:
    """Notes for each pair of forms whose predictions at C lie outside each other's interval."""
    notes = []
    forms = sorted(preds)
    for i, a in enumerate(forms):
        for b in forms[i + 1 :]:
            ia, ib = intervals.get(a), intervals.get(b)
            if ia is None or ib is None:
                continue
            if ia[1] < ib[0] or ib[1] < ia[0]:
                fmt = format_count if what == "N*" else (lambda v: f"{v:.4f}")
                notes.append(
                    f"at {format_flops(C)} the forms disagree beyond their intervals on {what}: "
                    f"{a} {fmt(preds[a])} [{fmt(ia[0])}, {fmt(ia[1])}] vs {b} {fmt(preds[b])} "
                    f"[{fmt(ib[0])}, {fmt(ib[1])}]"
                )
    return notes


def parabola_flags(fitted: Fitted) -> dict[float, str]:
    """Budgets whose parabola minimum is off the profile's (by PARABOLA_N_FACTOR in N or
    PARABOLA_LOSS_GAP in loss): the budget -> why."""
    profiles = {m.C: m for m in fitted.profiles}
    flags = {}
    for p in fitted.parabolas:
        q = profiles.get(p.C)
        if q is None:
            continue
        ratio, gap = p.N_opt / q.N_opt, p.L_opt / q.L_opt - 1
        if abs(math.log(ratio)) > math.log(PARABOLA_N_FACTOR) or abs(gap) > PARABOLA_LOSS_GAP:
            flags[p.C] = (
                f"parabola minimum off the profile's: N ×{ratio:.2f}, loss {gap:+.2%} (the "
                "parabola's symmetric shape on a coarse or off-centre grid, or noise)"
            )
    return flags
