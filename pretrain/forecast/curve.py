"""Predict a pretraining run's final loss from the first part of its loss curve.

The law is the learning-rate-annealing form of Tissue et al. 2024, "Scaling Law with Learning
Rate Annealing" (arXiv:2408.11029)::

    L(s) = L0 + A * S1(s)^(-alpha) - C * S2(s)

with eta_i the learning rate of update i divided by the peak learning rate,
S1(s) = sum_{i<s} eta_i (the forward area) and S2(s) = sum_{i<s} m_i, where the annealing
momentum is m_i = lam * m_{i-1} + (eta_{i-1} - eta_i). The schedule of every step comes from the
run's own config (pretrain.train.optim.lr_factor), so the law can be evaluated at the run's last step
under its cosine, wsd or constant schedule.

Choices, and why:

* The loss of step s is measured with the weights after s updates, so S1(s) sums the first s
  learning rates. A train row's loss is the mean over the steps since the previous row, so the
  law is averaged over the same steps before it is compared with the row.
* Warmup is left out of S2 (eta rising is not annealing; counting it would make S2 negative)
  and its rows are left out of the fit: in the first few percent of a run the loss falls from
  ln(vocab) faster than any power of S1 describes, and those rows would pull alpha.
* lam is set per run from its length, lam = 1 - 1/(tau * total_steps): the momentum's memory is
  a fraction tau of the run rather than a fixed number of steps, so one tau serves runs of 100
  and of 5,000 steps alike (lam = 0.999 of the paper is a memory of 1,000 steps, longer than
  many short runs). S2 is then multiplied by (1 - lam), which makes it the lagged drop of the
  learning rate (at most 1) and C a loss: for one run this is the paper's form with C
  rescaled, and it lets runs of different lengths share C. tau is fitted with the shared
  parameters when a sweep is available, else fixed (LONE_TAU, with C/A at LONE_RATIO).
* Shared parameters. A lone run's first 30% barely identifies the annealing term (little of a
  cosine has decayed yet, nothing of a wsd schedule) nor alpha. When other finished runs of
  the same sweep exist, alpha, A, c = C / A and tau are fitted jointly on their whole curves
  (each run keeping its own L0), and only L0 is fitted on the partial curve. On the demo
  sweep this measured better than sharing alpha, C/A and tau only and fitting L0 and A per run
  (the two are nearly degenerate on a partial curve); see docs/predict.md.
* Across sizes. The runs of a sweep differ in width and peak learning rate, and one alpha and
  A for all of them left errors systematic with width. So S1 is counted in absolute learning
  rate (the paper's S1: a run's A is scaled by (lr / lr_ref)^-alpha), and alpha and ln A are
  linear in ln d_model, the two slopes fitted with the other shared parameters (Shared.for_run
  gives a run its alpha and A from its config). On the demo sweep this took the median error
  from 30% of the steps from 2.5% to 1.2%; slopes in ln N (parameters) instead of ln d_model,
  weighting the other runs by closeness in size, or a per-run A with a prior toward the shared
  one measured worse (docs/predict.md).
* Interval. With shared parameters: the spread of the same method's relative errors on the
  sweep's other finished runs, predicted from the same fraction with the same shared
  parameters, as the 10th to 90th percentile widened by one step of the empirical quantile,
  applied to the prediction (an 80% interval: on the demo sweep it covered 84-85% of the final
  losses from 20, 30 and 50% of the steps).
  A lone run: the 10th to 90th percentile of the lone method's relative errors measured on the
  demo sweep's runs from the same fraction of the steps (LONE_ERRORS): a stated calibration,
  which `lmforge runs --forecasts` checks on the runs it has.
"""

from __future__ import annotations

import dataclasses
import math
import os
from dataclasses import dataclass, field

import numpy as np
from scipy.optimize import least_squares
from scipy.signal import lfilter

from lmforge.pretrain.config.schema import PretrainConfig, load_config
from lmforge.pretrain.core.errors import ConfigurationError, DataError
from lmforge.pretrain.train.metrics import read_metrics
from lmforge.pretrain.train.optim import lr_factor

PAPER = "Tissue et al. 2024, arXiv:2408.11029"
# A lone run (no sweep to share parameters with) fits L0, A and alpha; C/A and the momentum
# memory are fixed at what the demo sweep's 27 runs share (its joint fit: C/A 0.062, memory 0.081
# of the run): on a partial curve they are barely identified, and fitting them too made the
# final loss from 30% of the steps miss by 13% (median) instead of 2.4%.
LONE_RATIO = 0.06
LONE_TAU = 0.08
DEFAULT_ALPHA = 0.3  # start of the alpha search
# The lone method's relative errors (prediction / final - 1) on those 27 runs, 10th and 90th
# percentile by the fraction of the steps predicted from: a lone run's 80% interval.
LONE_ERRORS = (
    (0.2, -0.184, 0.050),
    (0.3, -0.188, 0.025),
    (0.4, -0.062, 0.036),
    (0.5, -0.035, 0.027),
    (0.6, -0.037, 0.027),
    (0.7, -0.030, 0.017),
    (0.8, -0.027, 0.014),
    (0.9, -0.026, 0.013),
)
FIT_START = 0.1  # rows before this fraction of the run are not fitted (the fast early drop)


@dataclass
class Curve:
    """A run's train rows and its schedule."""

    name: str
    total_steps: int
    eta: np.ndarray  # lr factor of update i (0-based), i < total_steps, peak = 1
    warmup: int
    steps: np.ndarray  # row steps (updates done when the row was logged)
    starts: np.ndarray  # first step covered by each row (the previous row's step)
    loss: np.ndarray
    val_steps: np.ndarray = field(default_factory=lambda: np.zeros(0))
    val_loss: np.ndarray = field(default_factory=lambda: np.zeros(0))
    d_model: int = 0  # the model's width (0: unknown)
    peak_lr: float = 1.0  # optim.lr, the peak learning rate

    @property
    def finished(self) -> bool:
        return len(self.steps) > 0 and int(self.steps[-1]) >= self.total_steps

    def with_rows(self, train: dict[int, float], val: dict[int, float]) -> Curve:
        """This run's schedule with the train-loss and val_loss rows ``train`` and ``val``
        (step -> loss)."""
        steps = np.array(sorted(train), dtype=int)
        return dataclasses.replace(
            self,
            steps=steps,
            starts=np.concatenate([[0], steps[:-1]]).astype(int) if len(steps) else steps,
            loss=np.array([train[s] for s in steps], dtype=float),
            val_steps=np.array(sorted(val), dtype=float),
            val_loss=np.array([val[s] for s in sorted(val)], dtype=float),
        )

    def upto(self, step: int) -> Curve:
        keep = self.steps <= step
        vkeep = self.val_steps <= step
        return Curve(
            self.name,
            self.total_steps,
            self.eta,
            self.warmup,
            self.steps[keep],
            self.starts[keep],
            self.loss[keep],
            self.val_steps[vkeep],
            self.val_loss[vkeep],
            self.d_model,
            self.peak_lr,
        )


def schedule_curve(
    name: str,
    *,
    total_steps: int,
    optim,
    d_model: int,
    train: dict[int, float],
    val: dict[int, float] | None = None,
) -> Curve:
    """The Curve of a run of ``total_steps`` under the optim section ``optim`` (its schedule and
    peak learning rate), with the train-loss rows ``train`` and val_loss rows ``val`` (step ->
    loss)."""
    total = total_steps
    eta = np.array([lr_factor(i, total_steps=total, cfg=optim) for i in range(total)])
    eta = eta / max(eta.max(), 1e-12) if len(eta) else eta
    empty = np.zeros(0)
    curve = Curve(
        name,
        total,
        eta,
        min(optim.warmup_steps, max(total - 1, 0)),
        empty.astype(int),
        empty.astype(int),
        empty,
        d_model=int(d_model),
        peak_lr=float(optim.lr),
    )
    return curve.with_rows(train, val or {})


def curve_rows(rows: list[dict], total: int) -> tuple[dict[int, float], dict[int, float]]:
    """The finite train-loss and val_loss rows of metrics ``rows`` by step (a resumed run may
    repeat steps: the last row of a step wins)."""
    train: dict[int, float] = {}
    val: dict[int, float] = {}
    for r in rows:
        step, kind = r.get("step"), r.get("kind")
        if not isinstance(step, int) or step < 1 or step > total:
            continue
        if kind == "train" and isinstance(r.get("loss"), (int, float)):
            if math.isfinite(r["loss"]):
                train[step] = float(r["loss"])
        elif kind == "eval" and isinstance(r.get("val_loss"), (int, float)):
            if math.isfinite(r["val_loss"]):
                val[step] = float(r["val_loss"])
    return train, val


def load_curve(run_dir: str) -> Curve:
    """The train rows and schedule of the run directory ``run_dir``; DataError if it has none."""
    cfg_path = os.path.join(run_dir, "config.yaml")
    if not os.path.isfile(cfg_path):
        raise DataError(f"{run_dir}: no config.yaml; give a run directory (runs/<name>)")
    cfg = load_config(PretrainConfig, [cfg_path])
    total = cfg.train.total_steps()
    rows = read_metrics(os.path.join(run_dir, "metrics.jsonl"))
    train, val = curve_rows(rows, total)
    name = os.path.basename(os.path.normpath(run_dir))
    if not train:
        what = "has not started (no metrics.jsonl)" if not rows else "has no train rows"
        raise DataError(f"{run_dir} {what}; a prediction needs the first rows of its loss curve")
    return schedule_curve(
        name, total_steps=total, optim=cfg.optim, d_model=cfg.model.d_model, train=train, val=val
    )


# ---------------------------------------------------------------------------------------------
# The law's features


def _areas(curve: Curve, tau: float) -> tuple[np.ndarray, np.ndarray]:
    """S1(s), S2(s) for s = 0..total_steps (S1(0) = 0)."""
    eta = curve.eta
    s1 = np.concatenate([[0.0], np.cumsum(eta)])
    drop = np.zeros_like(eta)
    drop[1:] = eta[:-1] - eta[1:]
    drop[: curve.warmup + 1] = 0.0  # warmup is not annealing
    lam = 1.0 - 1.0 / max(tau * curve.total_steps, 1.0)
    m = lfilter([1.0], [1.0, -lam], drop)
    s2 = np.concatenate([[0.0], np.cumsum(m)]) * (1.0 - lam)  # in units of the peak lr
    return s1, s2


def _row_means(curve: Curve, values: np.ndarray, upto: int | None = None) -> np.ndarray:
    """Mean of values[s] over the steps each row covers (its loss is the mean of those steps'
    losses: steps start..step-1 after start..step-1 updates)."""
    c = np.concatenate([[0.0], np.cumsum(values)])
    lo, hi = curve.starts, curve.steps
    return (c[hi] - c[lo]) / np.maximum(hi - lo, 1)


def _features(curve: Curve, alpha: float, ratio: float, tau: float) -> np.ndarray:
    """Per step s = 0..total: S1^-alpha - ratio * S2 (S1(0) is floored at the first update)."""
    s1, s2 = _areas(curve, tau)
    s1 = np.maximum(s1, curve.eta[0] if len(curve.eta) else 1.0)
    return s1 ** (-alpha) - ratio * s2


def _fit_rows(curve: Curve) -> np.ndarray:
    """Rows the law is fitted on: past warmup and past the first FIT_START of the run."""
    first = max(curve.warmup, int(FIT_START * curve.total_steps))
    return curve.starts >= first


def _linear(x: np.ndarray, y: np.ndarray) -> tuple[float, float]:
    """(L0, A) of y = L0 + A * x, least squares; A >= 0."""
    if len(x) < 2 or np.ptp(x) <= 0:
        return float(np.mean(y)), 0.0
    a, l0 = np.polyfit(x, y, 1)
    if a < 0:
        return float(np.mean(y)), 0.0
    return float(l0), float(a)


@dataclass
class Shared:
    """Parameters shared by a sweep's runs, fitted on finished ones: everything but L0.

    A run of width d and peak learning rate lr gets alpha(d) = alpha + alpha_slope * z and
    A(d, lr) = a * exp(a_slope * z) * (lr / lr_ref)^(-alpha(d)), z = ln(d / d_ref): S1 counted in
    absolute learning rate (the paper's S1; the learning rates of a sweep differ by size), and
    alpha and ln A linear in ln d_model across the sweep (a wider model learns differently).
    With one width in the sweep the slopes stay 0."""

    alpha: float
    ratio: float  # C / A
    tau: float
    a: float
    runs: list[str]
    alpha_slope: float = 0.0
    a_slope: float = 0.0
    d_ref: float = 0.0  # geometric mean width of the runs fitted on (0: widths unknown)
    lr_ref: float = 1.0  # geometric mean peak learning rate of those runs

    def for_run(self, curve: Curve) -> tuple[float, float]:
        """(alpha, A) of the run ``curve``, from its width and peak learning rate."""
        z = math.log(curve.d_model / self.d_ref) if curve.d_model > 0 and self.d_ref > 0 else 0.0
        alpha = max(self.alpha + self.alpha_slope * z, 0.01)
        lr = curve.peak_lr / self.lr_ref if curve.peak_lr > 0 and self.lr_ref > 0 else 1.0
        return alpha, self.a * math.exp(self.a_slope * z) * lr ** (-alpha)

    def describe(self) -> str:
        widths = (
            f" (at d_model {self.d_ref:.0f}, lr {self.lr_ref:.2e}; per ln d_model: "
            f"alpha {self.alpha_slope:+.3f}, ln A {self.a_slope:+.3f})"
            if self.alpha_slope or self.a_slope
            else ""
        )
        return (
            f"alpha={self.alpha:.3f}, A={self.a:.3f}{widths}, C/A={self.ratio:.2e}, momentum "
            f"memory {self.tau:.3f} x run length, fitted on {len(self.runs)} finished runs of "
            "the sweep"
        )


def _geomean(values: list[float]) -> float:
    good = [v for v in values if v > 0]
    return math.exp(float(np.mean(np.log(good)))) if good else 0.0


def fit_shared(curves: list[Curve], start: Shared | None = None) -> Shared:
    """alpha, A, their slopes in ln d_model, C/A and tau fitted on whole finished curves, each
    run keeping its own L0 (``start``: a previous fit to start from, e.g. on a superset of the
    runs)."""
    if not curves:
        raise DataError("no finished runs to fit the shared parameters on")
    prepared = [(c, _fit_rows(c)) for c in curves]
    prepared = [(c, rows) for c, rows in prepared if rows.any()]
    if not prepared:
        raise DataError("no finished run has rows past its first 10% to fit the law on")
    known = all(c.d_model > 0 for c, _ in prepared)
    d_ref = _geomean([c.d_model for c, _ in prepared]) if known else 0.0
    lr_ref = _geomean([c.peak_lr for c, _ in prepared]) or 1.0
    slopes = known and len({c.d_model for c, _ in prepared}) > 1

    def shared(p: np.ndarray) -> Shared:
        alpha, ratio, tau, log_a = p[:4]
        alpha_slope, a_slope = (p[4], p[5]) if slopes else (0.0, 0.0)
        return Shared(
            float(alpha),
            float(ratio),
            float(tau),
            math.exp(log_a),
            [c.name for c, _ in prepared],
            float(alpha_slope),
            float(a_slope),
            d_ref,
            lr_ref,
        )

    def residuals(p: np.ndarray) -> np.ndarray:
        sh = shared(p)
        out = []
        for c, rows in prepared:
            alpha, a = sh.for_run(c)
            x = a * _row_means(c, _features(c, alpha, sh.ratio, sh.tau))[rows]
            r = c.loss[rows] - x
            out.append((r - r.mean()) / math.sqrt(len(r)))
        return np.concatenate(out)

    if start is not None:
        starts = [[start.alpha, start.ratio, start.tau, math.log(max(start.a, 1e-6))]]
        if slopes:
            starts[0] += [start.alpha_slope, start.a_slope]
    else:
        starts = [[0.3, 0.01, tau0, 1.0] + ([0.0, 0.0] if slopes else []) for tau0 in (0.05, 0.3)]
    low, high = [0.01, 0.0, 0.005, -10.0], [3.0, 10.0, 5.0, 6.0]
    scale = [0.1, 0.01, 0.1, 0.3]
    if slopes:
        low, high, scale = low + [-2.0, -5.0], high + [2.0, 5.0], scale + [0.1, 0.1]
    best = None
    for x0 in starts:
        x0 = np.clip(x0, low, high)
        res = least_squares(residuals, x0, bounds=(low, high), x_scale=scale)
        if best is None or res.cost < best.cost:
            best = res
    return shared(best.x)


@dataclass
class Fit:
    """The law fitted to one curve."""

    l0: float
    a: float
    alpha: float
    c: float
    tau: float

    def law(self, curve: Curve) -> np.ndarray:
        """The law's loss at every step s = 0..total_steps."""
        s1, s2 = _areas(curve, self.tau)
        s1 = np.maximum(s1, curve.eta[0] if len(curve.eta) else 1.0)
        return self.l0 + self.a * s1 ** (-self.alpha) - self.c * s2

    def final_row(self, curve: Curve) -> float:
        """The law averaged over the steps of the run's last train row."""
        law = self.law(curve)
        interval = int(np.median(np.diff(curve.steps))) if len(curve.steps) > 1 else 1
        last = curve.total_steps
        first = max(last - max(interval, 1), 0)
        return float(np.mean(law[first:last]))


def fit_curve(curve: Curve, shared: Shared | None = None) -> Fit:
    """The law fitted to ``curve`` (partial or whole): L0 with ``shared``, else L0, A and alpha
    (C/A = LONE_RATIO, memory LONE_TAU)."""
    rows = _fit_rows(curve)
    need = 1 if shared is not None else 4
    if rows.sum() < need:
        raise DataError(
            f"{curve.name}: {int(rows.sum())} train rows past the first "
            f"{max(curve.warmup, int(FIT_START * curve.total_steps))} steps up to step "
            f"{int(curve.steps[-1])}; predict from later in the run (at least {need})"
        )
    y = curve.loss[rows]
    if shared is not None:
        alpha, a = shared.for_run(curve)
        x = _row_means(curve, _features(curve, alpha, shared.ratio, shared.tau))[rows]
        l0 = float(np.mean(y - a * x))
        return Fit(l0, a, alpha, a * shared.ratio, shared.tau)
    s1, s2 = _areas(curve, LONE_TAU)
    s1 = np.maximum(s1, curve.eta[0])

    def model(p: np.ndarray) -> np.ndarray:
        l0, a, alpha = p
        per_step = l0 + a * (s1 ** (-alpha) - LONE_RATIO * s2)
        return _row_means(curve, per_step)[rows]

    x0 = [float(y.min()) * 0.8, float(y.max() - y.min()) + 0.5, DEFAULT_ALPHA]
    res = least_squares(
        lambda p: model(p) - y,
        x0,
        bounds=([0.0, 0.0, 0.02], [np.inf, np.inf, 1.5]),
        x_scale=[1.0, 1.0, 0.1],
    )
    l0, a, alpha = res.x
    return Fit(float(l0), float(a), float(alpha), float(a) * LONE_RATIO, LONE_TAU)


# ---------------------------------------------------------------------------------------------
# Prediction


@dataclass
class Prediction:
    run: str
    from_step: int
    total_steps: int
    train: float  # predicted final train-loss row
    low: float
    high: float
    interval: str  # what the interval is
    shared: Shared | None
    fit: Fit
    val: float | None = None  # predicted final val_loss, when an offset could be estimated
    val_low: float | None = None
    val_high: float | None = None
    val_note: str = ""
    measured: float | None = None  # the finished run's final train-loss row
    measured_val: float | None = None

    @property
    def form(self) -> str:
        return f"L = L0 + A*S1^-alpha - C*S2 ({PAPER})"


def _cut(curve: Curve, fraction: float | None) -> Curve:
    if fraction is None:
        return curve
    if not 0 < fraction < 1:
        raise ConfigurationError(
            f"--predict-from {fraction}: give a fraction of the run's steps in (0, 1), e.g. 0.3"
        )
    if not curve.finished:
        raise DataError(
            f"{curve.name} has not finished (step {int(curve.steps[-1])} of "
            f"{curve.total_steps}); --predict-from is for checking finished runs, drop it"
        )
    return curve.upto(int(fraction * curve.total_steps))


def _quantiles(errors: list[float], lo: float, hi: float) -> tuple[float, float]:
    """Empirical quantiles of the errors, widened by one order statistic on each side."""
    e = np.sort(np.asarray(errors))
    n = len(e)
    i = max(int(math.floor(lo * (n - 1))) - 1, 0)
    j = min(int(math.ceil(hi * (n - 1))) + 1, n - 1)
    return float(e[i]), float(e[j])


def lone_errors(fraction: float) -> tuple[float, float]:
    """The lone method's 10th and 90th percentile relative error from ``fraction`` of the
    steps (LONE_ERRORS, interpolated; the ends held outside 0.2-0.9)."""
    xs = [f for f, _, _ in LONE_ERRORS]
    lo = float(np.interp(fraction, xs, [e for _, e, _ in LONE_ERRORS]))
    hi = float(np.interp(fraction, xs, [e for _, _, e in LONE_ERRORS]))
    return lo, hi


def finished_runs(sweep_dir: str, exclude: str | None = None) -> list[Curve]:
    """The finished runs of a sweep directory (run directories with config.yaml and rows)."""
    out = []
    for name in sorted(os.listdir(sweep_dir)):
        d = os.path.join(sweep_dir, name)
        if name == exclude or not os.path.isfile(os.path.join(d, "config.yaml")):
            continue
        try:
            c = load_curve(d)
        except (DataError, ConfigurationError):
            continue
        if c.finished:
            out.append(c)
    return out


def _val_offset(curve: Curve) -> tuple[float, float] | None:
    """Mean and spread of val_loss - train loss at the eval steps up to the curve's end (runs
    that evaluate periodically), from the train row at each eval's step."""
    diffs = []
    for s, v in zip(curve.val_steps, curve.val_loss, strict=True):
        at = np.nonzero(curve.steps == int(s))[0]
        if len(at) and s > curve.warmup:
            diffs.append(v - float(curve.loss[at[0]]))
    if len(diffs) < 2:
        return None
    return float(np.mean(diffs)), float(np.std(diffs, ddof=1))


def predict_curve(curve: Curve, others: list[Curve], shared: Shared | None = None) -> Prediction:
    """Predict the final train-loss row of ``curve`` (a run's rows so far) with its 80% interval.
    With 3 or more finished runs of its sweep in ``others`` (``shared``: their shared parameters,
    when already fitted), L0 is fitted with the parameters they share, and the interval is the
    10th-90th percentile of the same method's relative errors on them from the same fraction;
    else the lone fit (L0, A, alpha) with the lone method's measured error spread."""
    if not len(curve.steps):
        raise DataError(f"{curve.name}: no train rows to predict from")
    others = [o for o in others if o.name != curve.name]
    frac = float(curve.steps[-1]) / curve.total_steps
    if len(others) >= 3:
        shared = shared or fit_shared(others)
        fit = fit_curve(curve, shared)
        train = fit.final_row(curve)
        errors = []
        for o in others:
            try:
                o_fit = fit_curve(o.upto(int(frac * o.total_steps)), shared)
            except DataError:  # too short a run for this fraction
                continue
            errors.append(o_fit.final_row(o) / float(o.loss[-1]) - 1.0)
        q_lo, q_hi = _quantiles(errors, 0.1, 0.9) if errors else lone_errors(frac)
        note = (
            f"10-90% of the relative errors on {len(errors)} other finished runs predicted "
            f"from {frac:.0%} of their steps"
        )
    else:
        shared = None
        fit = fit_curve(curve)
        train = fit.final_row(curve)
        q_lo, q_hi = lone_errors(frac)
        note = (
            f"10-90% of the lone method's relative errors from {frac:.0%} of the steps, "
            "measured on the 27 runs of the demo sweep"
        )
    low, high = train / (1 + q_hi), train / (1 + q_lo)
    pred = Prediction(
        curve.name, int(curve.steps[-1]), curve.total_steps, train, low, high, note, shared, fit
    )
    offset = _val_offset(curve)
    if offset is not None:
        mean, spread = offset
        pred.val, pred.val_low, pred.val_high = (
            train + mean,
            low + mean - spread,
            high + mean + spread,
        )
        pred.val_note = f"val_loss - train loss offset {mean:+.4f} ± {spread:.4f} from evals so far"
    else:
        pred.val_note = "no periodic evals before this step: the prediction is of the train loss"
    return pred


def predict(
    run_dir: str, *, fraction: float | None = None, others: list[Curve] | None = None
) -> Prediction:
    """Predict the final train-loss row of the run at ``run_dir`` from its rows so far (or from
    its first ``fraction`` of steps, for a finished run). ``others``: finished runs of its sweep
    (default: the finished runs next to it, when its parent directory holds any)."""
    whole = load_curve(run_dir)
    curve = _cut(whole, fraction)
    if not len(curve.steps):
        raise DataError(f"{curve.name}: no train rows in the first {fraction} of the run")
    if others is None:
        parent = os.path.dirname(os.path.abspath(run_dir))
        others = finished_runs(parent, exclude=curve.name)
    pred = predict_curve(curve, others)
    if whole.finished and fraction is not None:
        pred.measured = float(whole.loss[-1])
        if len(whole.val_steps) and int(whole.val_steps[-1]) >= whole.total_steps:
            pred.measured_val = float(whole.val_loss[-1])
    elif whole.finished:
        pred.measured = float(whole.loss[-1])
    return pred


def check_sweep(
    sweep_dir: str, fractions: list[float], *, shared: bool = True
) -> tuple[list[tuple[str, float, float, float]], dict[float, float]]:
    """Leave-one-out check on a sweep's finished runs: for each run and fraction, the final
    train-loss row predicted from that fraction of its steps (the shared parameters fitted on
    the other runs) against the measured one. Returns rows (run, fraction, predicted, measured)
    and the median absolute relative error per fraction."""
    curves = finished_runs(sweep_dir)
    if len(curves) < (4 if shared else 1):
        raise DataError(
            f"{sweep_dir}: {len(curves)} finished runs; the check needs at least 4 "
            "(leave-one-out fits the shared parameters on the others)"
        )
    rows = []
    for c in curves:
        sh = fit_shared([o for o in curves if o is not c]) if shared else None
        for f in fractions:
            part = c.upto(int(f * c.total_steps))
            try:
                pred = fit_curve(part, sh).final_row(c)
            except DataError:
                pred = float("nan")
            rows.append((c.name, f, pred, float(c.loss[-1])))
    medians = {}
    for f in fractions:
        errs = [abs(p / m - 1) for n, ff, p, m in rows if ff == f and math.isfinite(p)]
        medians[f] = float(np.median(errs)) if errs else float("nan")
    return rows, medians


def write_figure(run_dir: str, pred: Prediction, path: str) -> None:
    """The curve so far, the fitted law over the whole schedule, the prediction with its
    interval, and the measured rest of a finished run, as a PNG at ``path``."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    whole = load_curve(run_dir)
    law = pred.fit.law(whole)
    seen = whole.steps <= pred.from_step
    fig, ax = plt.subplots(figsize=(7, 4.5))
    ax.plot(whole.steps[seen], whole.loss[seen], lw=0.8, color="C0", label="train loss (fitted)")
    if (~seen).any():
        ax.plot(whole.steps[~seen], whole.loss[~seen], lw=0.8, color="0.6", label="measured after")
    first = max(whole.warmup, 1)
    steps = np.arange(first, whole.total_steps + 1)
    ax.plot(steps, law[first:], color="C3", lw=1.2, label="fitted law, whole schedule")
    ax.errorbar(
        [pred.total_steps],
        [pred.train],
        yerr=[[pred.train - pred.low], [pred.high - pred.train]],
        fmt="o",
        color="C3",
        capsize=4,
        label=f"predicted final {pred.train:.3f} [{pred.low:.3f}, {pred.high:.3f}]",
    )
    ax.axhspan(pred.low, pred.high, color="C3", alpha=0.08)
    ax.axvline(
        pred.from_step, color="k", ls=":", lw=0.8, label=f"predicted from step {pred.from_step}"
    )
    shown = whole.loss[whole.steps > first] if (whole.steps > first).any() else whole.loss
    lo = min(float(np.min(shown)), pred.low)
    hi = float(np.percentile(shown, 95))
    ax.set_ylim(lo - 0.05 * (hi - lo + 0.1), max(hi, pred.high) + 0.05)
    ax.set_xlabel("step")
    ax.set_ylabel("train loss")
    ax.set_title(f"{pred.run}: L0 + A*S1^-alpha - C*S2 ({PAPER})", fontsize=9)
    ax.legend(fontsize=7)
    fig.tight_layout()
    tmp = f"{path}.tmp.png"
    fig.savefig(tmp, dpi=110)
    plt.close(fig)
    os.replace(tmp, path)
