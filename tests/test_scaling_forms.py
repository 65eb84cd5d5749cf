"""Which form predicts a larger budget: the backtest on the fitted budgets (scaling/forms.py),
on IsoFLOP grids drawn from known laws (different exponents, E, noise and grid placements), on
the Chinchilla points, and on the demo sweep's measured points; and the budget minima of
profiles shaped like L(N, D) against parabolas."""

from __future__ import annotations

import math
import os

import numpy as np
import pytest

from lmforge.scaling.analysis import analyse
from lmforge.scaling.config import SweepFitConfig
from lmforge.scaling.fit import Points, SurfaceFit, load_points_csv
from lmforge.scaling.sources import PointSet, load_sources

DATA = os.path.join(os.path.dirname(__file__), "data")

# (E, A, B, alpha, beta): Hoffmann et al.'s and Besiroglu et al.'s fits, steeper exponents, a
# low irreducible loss.
LAWS = {
    "hoffmann": (1.69, 406.4, 410.7, 0.34, 0.28),
    "besiroglu": (1.82, 482.0, 2085.0, 0.348, 0.366),
    "steep": (2.0, 300.0, 800.0, 0.5, 0.4),
    "low-E": (0.5, 200.0, 900.0, 0.3, 0.3),
}

# law, budgets (first, ratio, count: the last is held out), grid centre (× the N whose D = 20·N),
# spacing of the 5 sizes, noise (relative, per point)
CASES = [
    ("hoffmann", (1e18, 3.0, 6), 1.0, 2.0, 0.005),
    ("hoffmann", (1e17, 2.0, 7), 3.0, 2.0, 0.01),
    ("besiroglu", (1e17, 2.0, 7), 4.0, 4.0, 0.002),  # coarse and off-centre
    ("besiroglu", (1e18, 3.0, 6), 0.5, 4.0, 0.005),
    ("steep", (1e18, 3.0, 6), 0.5, 4.0, 0.005),
    ("low-E", (1e17, 2.0, 7), 3.0, 2.0, 0.002),
]


def _law(name: str) -> SurfaceFit:
    E, A, B, alpha, beta = LAWS[name]
    return SurfaceFit(E=E, A=A, B=B, alpha=alpha, beta=beta, objective=0.0, n_points=0)


def _grid(law: SurfaceFit, budgets, centre: float, spacing: float, noise: float, seed=0):
    rng = np.random.default_rng(seed)
    rows = []
    for c in budgets:
        mid = math.sqrt(c / (6 * 20)) * centre
        for i in range(5):
            n = mid * spacing ** (i - 2)
            d = c / (6 * n)
            rows.append((c, n, d, float(law.predict(n, d)) * math.exp(rng.normal(0, noise))))
    b, n, d, loss = (np.array(v) for v in zip(*rows, strict=True))
    return PointSet(
        points=Points.from_arrays(N=n, D=d, L=loss),
        budgets=b,
        what="a synthetic grid",
        params="total",
    )


@pytest.mark.parametrize(("law_name", "budgets", "centre", "spacing", "noise"), CASES)
def test_the_chosen_form_predicts_the_held_out_budget_of_a_known_law_within_2_percent(
    law_name, budgets, centre, spacing, noise
):
    first, ratio, count = budgets
    cs = [first * ratio**k for k in range(count)]
    law = _law(law_name)
    src = _grid(law, cs, centre, spacing, noise)
    fit = SweepFitConfig(holdout=[cs[-1]], bootstrap=20)
    r = analyse(src, fit, targets=[])["result"]
    (check,) = r["holdout"]
    truth = law.optimal(cs[-1])[2]
    assert set(r["backtest"]["loss_score"]) == {"frontier", "power", "surface"}
    assert r["choice"] == min(r["backtest"]["loss_score"], key=r["backtest"]["loss_score"].get)
    assert check["best_loss"] == pytest.approx(truth, rel=0.02)
    # every form's prediction comes with a bootstrap interval
    for form, value in check["loss"].items():
        lo, hi = check["loss_interval"][form]
        assert lo <= hi and value > 0


def test_profile_minima_correct_the_parabola_on_a_coarse_off_centre_grid():
    """Five sizes a factor 4 apart centred 4× above the optimum: the parabola's minima are off
    by several percent in N and are flagged; the profile's are within 2% and feed the fits."""
    cs = [1e17 * 2**k for k in range(6)]
    law = _law("besiroglu")
    r = analyse(_grid(law, cs, 4.0, 4.0, 0.0), SweepFitConfig(bootstrap=0), targets=[])["result"]
    assert r["minima_method"] == "profile"
    for m in r["minima"]:
        n_true, _, l_true = law.optimal(m["C"])
        assert m["profile"]["N_opt"] == pytest.approx(n_true, rel=0.02)
        assert m["profile"]["L_opt"] == pytest.approx(l_true, rel=1e-4)
        assert abs(m["parabola"]["N_opt"] / n_true - 1) > 0.04
    assert any("parabola minimum off the profile's" in m["flag"] for m in r["minima"])
    parabola = analyse(
        _grid(law, cs, 4.0, 4.0, 0.0), SweepFitConfig(bootstrap=0, minima="parabola"), targets=[]
    )["result"]
    assert parabola["minima_method"] == "parabola"


def test_the_chinchilla_points_predict_their_largest_budget():
    """Hoffmann et al.'s points (as extracted by Besiroglu et al.), the largest IsoFLOP budget
    (3e21) held out: the chosen form predicts its minimum within 2%, and the report says
    where the forms disagree beyond their intervals."""
    pts = load_points_csv(os.path.join(DATA, "chinchilla_svg_extracted.csv"))
    src = PointSet(points=pts, budgets=None, what="Chinchilla", params="total")
    r = analyse(src, SweepFitConfig(holdout=[3e21], bootstrap=20), targets=[1e23])["result"]
    (check,) = r["holdout"]
    assert check["best_loss"] == pytest.approx(check["measured_minimum"], rel=0.02)
    assert len(r["backtest"]["steps"]) == 6  # the 3rd..8th of the 8 fitted budgets
    (target,) = r["targets"]
    assert 10 < target["best_D"] / target["best_N"] < 40


def test_the_demo_sweep_predicts_its_held_out_budget():
    """The measured points of `make scaling-demo` (tests/data/scaling_demo_points.csv), the
    4.8e12 budget held out: the chosen form within 2% of the best run measured there."""
    src = load_sources([os.path.join(DATA, "scaling_demo_points.csv")], "non_embedding")
    r = analyse(src, SweepFitConfig(holdout=[4.8e12], bootstrap=20), targets=[])["result"]
    (check,) = r["holdout"]
    assert abs(check["best_error"]) < 0.02
