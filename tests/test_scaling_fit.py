"""scaling/fit.py: Chinchilla's data refitted as Besiroglu et al. did, recovery of known laws with
bootstrap coverage, compute-optimal allocation, and one-line errors on bad input."""

from __future__ import annotations

import math
import os

import numpy as np
import pytest

from lmforge.pretrain.core.errors import ConfigurationError
from lmforge.scaling.fit import (
    Points,
    ScalingFitError,
    SurfaceFit,
    fit_allocation,
    fit_frontier,
    fit_power_law,
    fit_surface,
    group_budgets,
    isoflop_minima,
    load_points_csv,
)

CHINCHILLA_CSV = os.path.join(os.path.dirname(__file__), "data", "chinchilla_svg_extracted.csv")
CHINCHILLA_C = 5.76e23  # Chinchilla's training budget in FLOPs
# The budgets of Chinchilla's IsoFLOP profiles (Hoffmann et al. 2022, figure 3)
CHINCHILLA_ISOFLOPS = [6e18, 1e19, 3e19, 6e19, 1e20, 3e20, 6e20, 1e21, 3e21]

# Besiroglu et al. 2024 (arXiv:2404.10102), Huber/L-BFGS refit, 5 highest-loss points excluded.
BESIROGLU = dict(E=1.8172, A=482.01, B=2085.43, alpha=0.3478, beta=0.3658)

# A known law for the synthetic checks (Chinchilla-like exponents).
TRUE = dict(E=2.0, A=400.0, B=1500.0, alpha=0.34, beta=0.30)
TRUE_LAW = SurfaceFit(**TRUE, objective=0.0, n_points=0)


@pytest.fixture(scope="module")
def chinchilla() -> Points:
    return load_points_csv(CHINCHILLA_CSV)


def huber_objective(params: dict, points: Points, delta: float = 1e-3) -> float:
    """Summed Huber loss of log-residuals, written out here independently of scaling.fit."""
    predicted = params["E"] + params["A"] / points.N ** params["alpha"]
    predicted = predicted + params["B"] / points.D ** params["beta"]
    r = np.abs(np.log(predicted) - np.log(points.L))
    return float(np.where(r <= delta, 0.5 * r**2, delta * (r - 0.5 * delta)).sum())


def isoflop_grid(noise: float, seed: int) -> Points:
    """6 budgets (1e17..1e20 FLOPs) x 7 sizes spread over N*/6..6·N* of the true law, C = 6·N·D,
    with log-normal noise of `noise` on L. N spans ~1e6..1e9 and D ~4e8..7e11."""
    N, C = [], []
    for budget in np.logspace(17, 20, 6):
        n_star, _, _ = TRUE_LAW.optimal(budget)
        N.extend(n_star * np.logspace(-0.8, 0.8, 7))
        C.extend([budget] * 7)
    N, C = np.array(N), np.array(C)
    D = C / (6 * N)
    L = TRUE_LAW.predict(N, D) * np.exp(np.random.default_rng(seed).normal(0, noise, len(N)))
    return Points.from_arrays(N=N, D=D, L=L)


# --------------------------------------------------------------------------------------------
# Chinchilla's data
# --------------------------------------------------------------------------------------------


def test_load_chinchilla_csv(chinchilla: Points) -> None:
    assert len(chinchilla) == 245
    np.testing.assert_allclose(chinchilla.C, 6 * chinchilla.N * chinchilla.D, rtol=1e-12)
    assert chinchilla.labels[0] == "row 2"  # the first row under the header


def test_besiroglu_refit(chinchilla: Points) -> None:
    """Their refit on 240 points: E, alpha, beta within 1%, A and B within 3% (the fit gives
    E 1.8172, A 477.8, B 2143.4, alpha 0.3473, beta 0.3672: B is the loosest, +2.8%).
    Under the same objective, this optimum is at least as low as their published constants."""
    fit = fit_surface(chinchilla, exclude_highest=5)
    print(f"\n240 points: {fit.params()}")

    highest = sorted(int(i) for i in np.argsort(chinchilla.L)[-5:])
    assert fit.excluded == highest
    assert fit.n_points == 240
    for name, tol in (("E", 0.01), ("alpha", 0.01), ("beta", 0.01), ("A", 0.03), ("B", 0.03)):
        assert getattr(fit, name) == pytest.approx(BESIROGLU[name], rel=tol), name
    assert fit.a == pytest.approx(0.51, abs=0.01)

    used = chinchilla.subset([i for i in range(len(chinchilla)) if i not in fit.excluded])
    assert fit.objective == pytest.approx(huber_objective(fit.params(), used), rel=1e-9)
    assert fit.objective <= huber_objective(BESIROGLU, used)

    N, D, L = fit.optimal(CHINCHILLA_C)
    print(f"tokens per parameter at C = {CHINCHILLA_C:.3g}: {D / N:.1f} (N={N:.3g}, D={D:.3g})")
    assert 16 <= D / N <= 20  # Besiroglu et al.'s constants give 18.4 by the same closed form
    assert 6 * N * D == pytest.approx(CHINCHILLA_C, rel=1e-9)


def test_chinchilla_all_points(chinchilla: Points) -> None:
    """All 245 points, same method. Reference (Besiroglu et al.'s method on all points):
    E 1.89, A 496, B 12,846, alpha 0.349, beta 0.453; the fit matches to 1%."""
    fit = fit_surface(chinchilla)
    print(f"\n245 points: {fit.params()}")
    assert fit.excluded == [] and fit.n_points == 245
    reference = dict(E=1.89, A=496.0, B=12846.0, alpha=0.349, beta=0.453)
    for name, value in reference.items():
        assert getattr(fit, name) == pytest.approx(value, rel=0.01), name


# --------------------------------------------------------------------------------------------
# recovery of known laws
# --------------------------------------------------------------------------------------------


def test_surface_recovery_and_bootstrap_coverage() -> None:
    """42 points with 0.5% noise: E, alpha, beta within 5% of the truth, A and B within 20%
    (they trade off against the exponents), and every 95% bootstrap interval covers the truth."""
    fit = fit_surface(isoflop_grid(noise=0.005, seed=0), bootstrap=200, seed=0)
    print(f"\nfit {fit.params()}\nci {fit.ci}")
    assert fit.bootstrap == 200
    for name in ("E", "alpha", "beta"):
        assert getattr(fit, name) == pytest.approx(TRUE[name], rel=0.05), name
    for name in ("A", "B"):
        assert getattr(fit, name) == pytest.approx(TRUE[name], rel=0.20), name
    for name, value in TRUE.items():
        lo, hi = fit.ci[name]
        assert lo <= value <= hi, (name, value, fit.ci[name])
    assert set(fit.ci) == {"E", "A", "B", "alpha", "beta", "a", "b"}
    assert fit.ci["a"][0] <= TRUE_LAW.a <= fit.ci["a"][1]


def test_frontier_recovery_and_bootstrap_coverage() -> None:
    """The compute-optimal loss of the surface law is exactly L(C) = E + A'·C^(-alpha') with
    alpha' = alpha·beta/(alpha+beta); 15 budgets 1e17..1e22 with 0.5% noise recover it."""
    alpha, beta = TRUE["alpha"], TRUE["beta"]
    G = (alpha * TRUE["A"] / (beta * TRUE["B"])) ** (1 / (alpha + beta))
    exponent = alpha * beta / (alpha + beta)
    truth = dict(
        E=TRUE["E"],
        A=(TRUE["A"] * G**-alpha + TRUE["B"] * G**beta) * 6**exponent,
        alpha=exponent,
    )
    C = np.logspace(17, 22, 15)
    exact = truth["E"] + truth["A"] * C ** -truth["alpha"]
    np.testing.assert_allclose(exact, [TRUE_LAW.optimal(c)[2] for c in C], rtol=1e-12)

    L = exact * np.exp(np.random.default_rng(0).normal(0, 0.005, len(C)))
    fit = fit_frontier(C, L, bootstrap=200, seed=0)
    print(f"\nfrontier {fit.params()} truth {truth}\nci {fit.ci}")
    assert fit.E == pytest.approx(truth["E"], rel=0.05)
    assert fit.alpha == pytest.approx(truth["alpha"], rel=0.05)
    assert fit.A == pytest.approx(truth["A"], rel=0.20)
    assert fit.bootstrap == 200
    for name, value in truth.items():
        lo, hi = fit.ci[name]
        assert lo <= value <= hi, (name, value, fit.ci[name])
    assert fit.predict(1e20) == pytest.approx(
        truth["E"] + truth["A"] * 1e20 ** -truth["alpha"], rel=0.01
    )


def test_power_law_recovery_and_bootstrap_coverage() -> None:
    """L(C) = A·C^(-alpha) (the frontier with E = 0) from 8 budgets with 0.5% noise."""
    C = np.logspace(11, 14, 8)
    L = 40.0 * C**-0.1 * np.exp(np.random.default_rng(1).normal(0, 0.005, len(C)))
    fit = fit_power_law(C, L, bootstrap=200, seed=0)
    assert fit.E == 0.0 and fit.n_points == 8 and fit.bootstrap == 200
    assert fit.alpha == pytest.approx(0.1, rel=0.05) and fit.A == pytest.approx(40.0, rel=0.2)
    for name, value in (("A", 40.0), ("alpha", 0.1)):
        lo, hi = fit.ci[name]
        assert lo <= value <= hi, (name, fit.ci[name])
    assert fit.predict(1e15) == pytest.approx(40.0 * 1e15**-0.1, rel=0.02)
    with pytest.raises(ScalingFitError, match="at least 2 distinct C"):
        fit_power_law([1e12, 1e12], [3.0, 3.1])
    with pytest.raises(ScalingFitError, match="loss"):
        fit_power_law([1e11, 1e12], [3.0, float("nan")])


def test_isoflop_allocation_recovery() -> None:
    """IsoFLOP parabolas on the noisy grid: the allocation exponent a is within 0.02 of
    beta/(alpha+beta) = 0.469, and b = 1 − a since C = 6·N·D; noiseless, a is exact."""
    minima = isoflop_minima(isoflop_grid(noise=0.005, seed=0))
    assert len(minima) == 6 and all(m.inside and m.n_points == 7 for m in minima)
    for m in minima:
        assert m.D_opt == pytest.approx(m.C / (6 * m.N_opt))
        assert m.N_opt == pytest.approx(TRUE_LAW.optimal(m.C)[0], rel=0.1)
    allocation = fit_allocation(minima, bootstrap=200, seed=0)
    print(f"\nallocation a={allocation.a:.4f} b={allocation.b:.4f} ci {allocation.ci}")
    assert allocation.a == pytest.approx(TRUE_LAW.a, abs=0.02)
    assert allocation.a + allocation.b == pytest.approx(1.0, abs=1e-9)
    assert allocation.n_budgets == 6
    assert allocation.ci["a"][0] < allocation.a < allocation.ci["a"][1]

    noiseless = fit_allocation(isoflop_minima(isoflop_grid(noise=0.0, seed=0)))
    assert noiseless.a == pytest.approx(TRUE_LAW.a, abs=1e-6)
    assert noiseless.N_opt(1e21) == pytest.approx(TRUE_LAW.optimal(1e21)[0], rel=0.05)


def test_isoflop_budgets_group_nearby_compute() -> None:
    """Runs whose C is a little off the nominal budget (whole steps) still form one budget."""
    points = isoflop_grid(noise=0.0, seed=0)
    jitter = 1 + 0.01 * np.random.default_rng(1).uniform(-1, 1, len(points))
    jittered = Points.from_arrays(N=points.N, C=points.C * jitter, L=points.L)
    nominal = np.logspace(17, 20, 6)
    grouped = isoflop_minima(jittered)
    named = isoflop_minima(jittered, budgets=nominal)
    assert [m.n_points for m in grouped] == [7] * 6
    np.testing.assert_allclose([m.C for m in named], nominal)
    np.testing.assert_allclose([m.C for m in grouped], nominal, rtol=0.01)


def continuous_grid(seed: int) -> tuple[Points, np.ndarray]:
    """The 6 x 7 IsoFLOP grid of the known law with every C its own (uniform within ±8% of its
    budget, D = C/6N, 0.3% noise on L) and 7 runs between the budgets (one at each log-midpoint,
    one below, one above): no two C equal. Returns the points and each one's nominal budget
    (NaN for the runs between)."""
    rng = np.random.default_rng(seed)
    grid = isoflop_grid(noise=0.0, seed=0)
    nominal = np.logspace(17, 20, 6)
    between = np.concatenate([[10**16.4], np.sqrt(nominal[:-1] * nominal[1:]), [10**20.6]])
    N = np.concatenate([grid.N, [TRUE_LAW.optimal(c)[0] for c in between]])
    C = np.concatenate([grid.C * rng.uniform(0.92, 1.08, len(grid)), between])
    D = C / (6 * N)
    L = TRUE_LAW.predict(N, D) * np.exp(rng.normal(0, 0.003, len(N)))
    budget = np.concatenate([grid.C, np.full(len(between), np.nan)])
    return Points.from_arrays(N=N, D=D, L=L), budget


def test_budgets_from_continuous_compute() -> None:
    """Points whose C is continuous form the budgets of the grid they came from, at the
    geometric mean of their C; the runs between the budgets form none. The minima of those
    budgets give the allocation exponent of the law."""
    points, nominal = continuous_grid(seed=0)
    assert len(np.unique(points.C)) == len(points) == 49
    found = group_budgets(points.C, 0.2)
    budgets = np.unique(found[np.isfinite(found)])
    assert len(budgets) == 6
    for b in budgets:
        members = np.flatnonzero(found == b)
        assert len(members) == 7 and np.ptp(np.log(nominal[members])) < 1e-9  # one budget's
        assert b == pytest.approx(math.exp(np.log(points.C[members]).mean()))
        assert b == pytest.approx(nominal[members[0]], rel=0.05)
    assert np.isnan(found[np.isnan(nominal)]).all()
    minima = isoflop_minima(points, rel_tol=0.2)  # the same rule, points between left out
    assert [m.n_points for m in minima] == [7] * 6
    assert fit_allocation(minima).a == pytest.approx(TRUE_LAW.a, abs=0.03)
    # the tolerance is the width of a budget: at 5% these budgets (±8%) are not found whole
    assert len(np.unique(group_budgets(points.C, 0.05)[np.isfinite(found)])) != 6


def test_chinchilla_budgets_are_its_isoflop_profiles(chinchilla: Points) -> None:
    """Chinchilla's 245 points have 230 distinct C: grouped, they are the 9 budgets of its
    IsoFLOP profiles (the extracted C a few % under the nominal), and the 101 runs between them
    join none; the allocation through their minima is Hoffmann et al.'s approach 2, a ≈ 0.5."""
    found = group_budgets(chinchilla.C, 0.2)
    budgets = np.unique(found[np.isfinite(found)])
    np.testing.assert_allclose(budgets, CHINCHILLA_ISOFLOPS, rtol=0.1)
    assert int(np.isnan(found).sum()) == 101
    minima = isoflop_minima(chinchilla, rel_tol=0.2)
    assert [m.C for m in minima] == budgets.tolist()
    assert fit_allocation(minima).a == pytest.approx(0.5, abs=0.03)
    with pytest.raises(ScalingFitError, match=r"budget tolerance 1: give a relative width"):
        group_budgets(chinchilla.C, 1.0)
    single = Points.from_arrays(N=[1e7, 1e8], C=[1e18, 1e18], L=[3.0, 2.9])
    with pytest.raises(ScalingFitError, match=r"no compute budget among the 2 points \(a budget"):
        isoflop_minima(single)


def _legends_clear_of_axes(name: str, fig) -> int:
    """Draw `fig`; assert every legend lies inside the figure and overlaps no axes (plots and
    colorbars); return how many legends it has."""
    fig.canvas.draw()
    renderer = fig.canvas.get_renderer()
    legends = [*fig.legends, *(ax.get_legend() for ax in fig.axes if ax.get_legend())]
    page = fig.bbox
    for legend in legends:
        box = legend.get_window_extent(renderer)
        assert page.x0 <= box.x0 and box.x1 <= page.x1, (name, box, page)
        assert page.y0 <= box.y0 and box.y1 <= page.y1, (name, box, page)
        for ax in fig.axes:
            assert not box.overlaps(ax.get_window_extent(renderer)), (name, ax.get_title())
    return len(legends)


@pytest.mark.parametrize("which", ["continuous-grid", "chinchilla"])
def test_report_figures_keep_legends_off_the_axes(which: str, chinchilla: Points) -> None:
    """Every figure of the report, with a held-out budget and a legend of every kind of mark:
    the legends sit outside the axes, and the budgets are a colorbar, not legend entries."""
    from lmforge.scaling.analysis import analyse
    from lmforge.scaling.config import SweepFitConfig
    from lmforge.scaling.figures import build_figures
    from lmforge.scaling.sources import PointSet

    points = continuous_grid(seed=1)[0] if which == "continuous-grid" else chinchilla
    holdout = 1e20 if which == "continuous-grid" else 3e21
    src = PointSet(points, None, which, "as given")
    analysis = analyse(src, SweepFitConfig(holdout=[holdout], bootstrap=0), [1e22])
    r = analysis["result"]
    assert len(r["budgets"]["found"]) == (6 if which == "continuous-grid" else 9)
    assert holdout in r["budgets"]["found"] and r["holdout"][0]["C"] == holdout
    finetune = [
        dict(run="a", metric="accuracy", value=0.7, total_flops=1e15, from_scratch=False),
        dict(run="b", metric="accuracy", value=0.6, total_flops=1e13, from_scratch=True),
    ]
    figures = dict(build_figures(src, analysis, finetune))
    assert sorted(figures) == [
        "finetune.png", "isoflop.png", "loss_vs_flops.png", "residuals.png", "surface.png"
    ]  # fmt: skip
    for name, fig in figures.items():
        legends = _legends_clear_of_axes(name, fig)
        assert legends == (0 if name == "finetune.png" else 1), name
        if name in ("isoflop.png", "surface.png"):
            labels = [t.get_text() for t in fig.legends[0].get_texts()]
            assert not any(label.startswith("C=") for label in labels), labels
            assert any(ax.get_ylabel() == "compute budget C (FLOPs)" for ax in fig.axes)
    import matplotlib.pyplot as plt

    plt.close("all")


# --------------------------------------------------------------------------------------------
# compute-optimal allocation from the surface
# --------------------------------------------------------------------------------------------


def test_optimal_numeric_matches_closed_form() -> None:
    for C in (1e18, 1e21, CHINCHILLA_C):
        closed = TRUE_LAW.optimal(C)
        numeric = TRUE_LAW.optimal(C, flops_per_token=lambda N: 6 * N)
        np.testing.assert_allclose(numeric, closed, rtol=1e-3)


def test_optimal_with_attention_flops_is_a_minimum() -> None:
    """With a FLOP count above 6·N, fewer tokens fit the budget: the optimum is a true minimum of
    L(N, C / fpt(N)) and spends exactly C."""
    C = 1e21

    def fpt(N):
        return 6 * N + 12 * 24 * 1024 * 2048  # + attention of a 24-layer, d=1024, T=2048 model

    N, D, L = TRUE_LAW.optimal(C, flops_per_token=fpt)
    assert D * fpt(N) == pytest.approx(C)
    for factor in (0.99, 1.01):
        assert TRUE_LAW.predict(N * factor, C / fpt(N * factor)) > L
    assert L > TRUE_LAW.optimal(C)[2]


# --------------------------------------------------------------------------------------------
# bad input: one-line ScalingFitError (a ConfigurationError)
# --------------------------------------------------------------------------------------------


def test_errors_are_configuration_errors() -> None:
    assert issubclass(ScalingFitError, ConfigurationError)


def test_too_few_points() -> None:
    points = isoflop_grid(noise=0.0, seed=0).subset(range(5))
    with pytest.raises(ScalingFitError, match=r"at least 6 points; got 5 \(run more sweep points"):
        fit_surface(points)
    chinchilla = load_points_csv(CHINCHILLA_CSV).subset(range(8))
    with pytest.raises(ScalingFitError, match=r"needs at least 6 points; got 5 after excluding 3"):
        fit_surface(chinchilla, exclude_highest=3)
    with pytest.raises(
        ScalingFitError, match=r"3 free parameters and needs at least 4 points; got 3"
    ):
        fit_frontier([1e18, 1e19, 1e20], [3.0, 2.8, 2.6])
    with pytest.raises(ScalingFitError, match=r"at least 3 distinct C values; got 2"):
        fit_frontier([1e18, 1e18, 1e19, 1e19], [3.0, 3.1, 2.8, 2.9])
    same_size = Points.from_arrays(N=[1e8] * 6, D=np.logspace(9, 10, 6), L=np.linspace(3, 2.5, 6))
    with pytest.raises(ScalingFitError, match=r"2 distinct N values; all points have N=1e\+08"):
        fit_surface(same_size)
    with pytest.raises(ScalingFitError, match=r"needs at least 2 compute budgets; got 1"):
        fit_allocation(isoflop_minima(isoflop_grid(noise=0.0, seed=0).subset(range(7))))


def test_bad_values() -> None:
    L = [3.0, 2.9, 2.8]
    with pytest.raises(ScalingFitError, match=r"^N must be > 0: point 1 has N=0$"):
        Points.from_arrays(N=[1e6, 0, 1e7], D=[1e9] * 3, L=L)
    with pytest.raises(ScalingFitError, match=r"^D must be > 0: point 2 has D=-1e\+09$"):
        Points.from_arrays(N=[1e6, 1e7, 1e8], D=[1e9, 1e9, -1e9], L=L)
    with pytest.raises(
        ScalingFitError,
        match=r"^loss must be finite: point 2 \(N=1e\+08, D=1e\+09\) has loss nan; drop the point",
    ):
        Points.from_arrays(N=[1e6, 1e7, 1e8], D=[1e9] * 3, L=[3.0, 2.9, math.nan])
    with pytest.raises(ScalingFitError, match=r"D has 2 values but loss has 3"):
        Points.from_arrays(N=[1e6, 1e7, 1e8], D=[1e9] * 2, L=L)
    with pytest.raises(ScalingFitError, match=r"need two of N, D, C; got only N"):
        Points.from_arrays(N=[1e6, 1e7, 1e8], L=L)
    with pytest.raises(ScalingFitError, match=r"C must be > 0: point 0 has C=0"):
        fit_frontier([0, 1e19, 1e20, 1e21], [3.0, 2.8, 2.6, 2.5])


def test_isoflop_budget_errors() -> None:
    two_sizes = Points.from_arrays(N=[1e7, 1e7, 1e8], C=[1e18] * 3, L=[3.0, 3.1, 2.9])
    with pytest.raises(
        ScalingFitError,
        match=r"budget C=1e\+18 has 2 distinct model size\(s\).*add sizes on both sides",
    ):
        isoflop_minima(two_sizes)
    downward = Points.from_arrays(N=[1e7, 1e8, 1e9], C=[1e18] * 3, L=[3.0, 3.2, 3.0])
    with pytest.raises(ScalingFitError, match=r"budget C=1e\+18: the loss parabola opens downward"):
        isoflop_minima(downward)
    far = Points.from_arrays(N=[1e7, 1e8, 1e9], C=[1e18, 1e18, 1.3e18], L=[3.0, 2.8, 3.0])
    with pytest.raises(
        ScalingFitError, match=r"point 2 has C=1\.3e\+18, not within 5% of any budget"
    ):
        isoflop_minima(far, budgets=[1e18])


def test_csv_errors(tmp_path) -> None:
    missing = tmp_path / "missing.csv"
    missing.write_text("params,loss\n1e6,3.0\n")
    with pytest.raises(
        ScalingFitError, match=r"missing\.csv has columns \['params', 'loss'\]; need"
    ):
        load_points_csv(str(missing))

    bad_cell = tmp_path / "bad.csv"
    bad_cell.write_text("Params,Tokens,Val_Loss\n1e6,1e9,3.0\n1e7,abc,2.9\n")
    with pytest.raises(
        ScalingFitError, match=r"bad\.csv row 3, column 'Tokens': 'abc' is not a number"
    ):
        load_points_csv(str(bad_cell))

    empty = tmp_path / "empty.csv"
    empty.write_text("")
    with pytest.raises(ScalingFitError, match=r"empty\.csv is empty"):
        load_points_csv(str(empty))
    with pytest.raises(ScalingFitError, match=r"points file not found"):
        load_points_csv(str(tmp_path / "nope.csv"))

    nan_loss = tmp_path / "nan.csv"
    nan_loss.write_text("run,N,D,loss\na,1e6,1e9,3.0\nb,1e7,1e9,nan\n")
    with pytest.raises(ScalingFitError, match=r"loss must be finite: point 1 \(b\)"):
        load_points_csv(str(nan_loss))

    ok = tmp_path / "ok.csv"
    ok.write_text("run,N,tokens,FLOPs,loss\na,1e6,1e9,7e15,3.0\n")
    points = load_points_csv(str(ok))
    assert points.labels == ["a"] and points.C[0] == 7e15  # a given C is kept as is
