"""Early stopping in a sweep: a point whose predicted final loss cannot be its budget's minimum
is stopped, and the compute it would have used is saved.

A point is judged once, when it has trained `early_stop` of its steps: its final train loss is
predicted from its curve so far (pretrain/forecast/curve.py; shared parameters from the sweep's finished
runs) with an interval. It is stopped when even the low end of that interval is above the high
end of a sibling's (a point of the same budget): a finished sibling's measured final train loss,
or a judged sibling's predicted interval. The comparison is of train losses on both sides: the
points' validation losses are only measured at their end.

`simulate` replays that rule on a finished sweep (every point judged from the same fraction of
its steps against its siblings' predictions from that fraction) and refits without the points
it would have stopped, so that the compute saved and what it changes in the fit can be measured
before a sweep relies on it.
"""

from __future__ import annotations

import json
import math
import os

import numpy as np

from lmforge.pretrain.config.schema import load_config
from lmforge.pretrain.core.errors import ConfigurationError, DataError
from lmforge.pretrain.forecast.curve import Curve, finished_runs, predict
from lmforge.scaling.analysis import analyse
from lmforge.scaling.config import ScalingConfig
from lmforge.scaling.fit import BUDGET_MIN_POINTS
from lmforge.scaling.runs import Verdict
from lmforge.scaling.sources import load_sweep


def check_fraction(fraction: float) -> None:
    if not 0 < fraction < 1:
        raise ConfigurationError(
            f"early stopping at {fraction:g} of a run: give a fraction in (0, 1), e.g. 0.3"
        )


def judge(
    run: str,
    budget: float,
    prediction,
    siblings: dict[str, tuple[float, float]],
    flops_per_step: float,
    *,
    others_left: int,
    brackets: bool,
) -> Verdict:
    """The verdict on a point from its prediction (pretrain.forecast.curve.Prediction) and its siblings'
    (low, high) final train losses. A point out of reach is kept where its budget needs it for
    a minimum: while fewer than BUDGET_MIN_POINTS of the budget's other points would be left
    (``others_left``: finished, running or to run, not stopped), or when it ``brackets`` the
    budget's best (the nearest size to it on one side: `brackets_best`)."""
    best = min(siblings.items(), key=lambda kv: kv[1][1]) if siblings else None
    beaten = best is not None and prediction.low > best[1][1]
    stop = beaten and others_left >= BUDGET_MIN_POINTS and not brackets
    return Verdict(
        run=run,
        budget=budget,
        step=prediction.from_step,
        total_steps=prediction.total_steps,
        predicted=prediction.train,
        low=prediction.low,
        high=prediction.high,
        sibling=best[0] if best else None,
        sibling_high=best[1][1] if best else None,
        stop=stop,
        flops_saved=(prediction.total_steps - prediction.from_step) * flops_per_step
        if stop
        else 0.0,
        kept_for_minimum=beaten and not stop,
    )


def brackets_best(size: float, sizes: dict[str, float], best: str | None) -> bool:
    """Whether a point of N ``size`` is the nearest to the budget's best on its side (``sizes``:
    N of the budget's other points not stopped, the best among them): the points either side of
    the best are what pins a budget's minimum down."""
    if best is None or best not in sizes:
        return False
    n_best = sizes[best]
    side = [n for name, n in sizes.items() if name != best and (n > n_best) == (size > n_best)]
    return all(abs(math.log(size / n_best)) <= abs(math.log(n / n_best)) for n in side)


def live_prediction(run_dir: str, others: list[Curve]):
    """The prediction of a running point from its rows so far (None before it has any)."""
    try:
        return predict(run_dir, others=others)
    except DataError:
        return None


def simulate(sweep_dir: str, fraction: float) -> dict:
    """Replay the rule on a finished sweep: which points it stops from ``fraction`` of their
    steps, the compute saved, and the fit without them against the fit with every point."""
    check_fraction(fraction)
    cfg = load_config(ScalingConfig, [os.path.join(sweep_dir, "sweep.yaml")])
    with open(os.path.join(sweep_dir, "plan.json")) as f:
        plan = json.load(f)
    curves = {c.name: c for c in finished_runs(sweep_dir)}
    points = [p for p in plan["points"] if p["name"] in curves]
    if len(points) < 4:
        raise DataError(f"{sweep_dir}: {len(points)} finished runs; the replay needs at least 4")
    preds = {}
    for p in points:
        others = [c for n, c in curves.items() if n != p["name"]]
        preds[p["name"]] = predict(
            os.path.join(sweep_dir, p["name"]), fraction=fraction, others=others
        )
    verdicts = []
    stopped_so_far: set[str] = set()
    for p in sorted(points, key=lambda p: -preds[p["name"]].low):  # the worst are judged first
        budget = [q for q in points if q["budget"] == p["budget"] and q["name"] != p["name"]]
        live = [q for q in budget if q["name"] not in stopped_so_far]
        siblings = {q["name"]: (preds[q["name"]].low, preds[q["name"]].high) for q in live}
        best = min(siblings, key=lambda n: siblings[n][1]) if siblings else None
        v = judge(
            p["name"], p["budget"], preds[p["name"]], siblings, p["flops"] / p["steps"],
            others_left=len(live),
            brackets=brackets_best(p["params"], {q["name"]: q["params"] for q in live}, best),
        )  # fmt: skip
        if v.stop:
            stopped_so_far.add(p["name"])
        verdicts.append(v)
    stopped = {v.run for v in verdicts if v.stop}
    total = sum(p["flops"] for p in points)
    saved = sum(v.flops_saved for v in verdicts)
    # the fit with every point, and without the stopped ones
    src = load_sweep(sweep_dir, cfg.fit.params)
    fits = {}
    for key, keep in (
        ("all", np.ones(len(src.points), bool)),
        ("without", ~np.isin(src.points.labels, sorted(stopped))),
    ):
        idx = np.flatnonzero(keep)
        sub = type(src)(
            points=src.points.subset(idx),
            budgets=src.budgets[idx],
            what=src.what,
            params=src.params,
            fpt=src.fpt,
            epochs=None if src.epochs is None else src.epochs[idx],
        )
        fits[key] = analyse(sub, cfg.fit, list(cfg.fit.target_flops))["result"]
    # a stopped point must not have been its budget's best
    best = {}
    for p in points:
        loss = float(curves[p["name"]].loss[-1])
        if p["budget"] not in best or loss < best[p["budget"]][1]:
            best[p["budget"]] = (p["name"], loss)
    wrong = sorted(stopped & {name for name, _ in best.values()})
    return {
        "fraction": fraction,
        "verdicts": verdicts,
        "flops_saved": saved,
        "flops_total": total,
        "stopped_a_best": wrong,
        "fits": fits,
    }


def describe_simulation(sim: dict) -> str:
    lines = [
        f"early stopping replayed from {sim['fraction']:.0%} of each run's steps "
        "(each point against its siblings' predicted intervals from the same fraction):"
    ]
    lines += [f"  {v.describe()}" for v in sim["verdicts"] if v.stop or v.kept_for_minimum]
    n = sum(v.stop for v in sim["verdicts"])
    lines.append(
        f"{n} of {len(sim['verdicts'])} runs stopped; {sim['flops_saved']:.3g} of "
        f"{sim['flops_total']:.3g} FLOPs saved ({sim['flops_saved'] / sim['flops_total']:.1%})"
        + (
            f"; it would have stopped a budget's best run: {', '.join(sim['stopped_a_best'])}"
            if sim["stopped_a_best"]
            else "; no budget's best run was stopped"
        )
    )
    for key, what in (("all", "with every run"), ("without", "without the stopped runs")):
        r = sim["fits"][key]
        parts = [f"fit {what}: loss form {r['choice']}"]
        for c in r["holdout"]:
            if "best_loss" in c:
                parts.append(
                    f"held-out {c['C']:.3g}: {c['best_loss']:.4f} ({c['best_error']:+.2%})"
                )
        for t in r["targets"]:
            if "best_loss" in t and "best_N" in t:
                parts.append(f"{t['C']:.3g}: loss {t['best_loss']:.4f}, N* {t['best_N']:.3g}")
        lines.append("; ".join(parts))
    return "\n".join(lines)
