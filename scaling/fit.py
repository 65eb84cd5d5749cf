"""Scaling-law fits: the loss surface L(N, D), the compute frontier L(C), IsoFLOP allocation.

Conventions
-----------
- N: parameters. Which count (with or without embeddings) is the caller's choice; a report built
  on these fits states it. D: training tokens. C: training FLOPs. L: final loss (nats/token).
- C = 6·N·D unless told otherwise (`Points.from_arrays(flops_per_param_token=...)`, or a
  `flops_per_token` callable N -> FLOPs per token where an optimum is searched).
- log is the natural log throughout.

Fits
----
``fit_surface``: L(N, D) = E + A / N^α + B / D^β, "approach 3" of Hoffmann et al. 2022,
"Training Compute-Optimal Large Language Models" (appendix D.2), done as in Besiroglu, Erdil,
Barnett and You 2024, "Chinchilla Scaling: A replication attempt" (arXiv:2404.10102):

- E = exp(e), A = exp(a), B = exp(b); log L is modelled as LSE(a − α·log N, b − β·log D, e),
  with LSE the log-sum-exp, so the model is positive and smooth in every parameter.
- The objective is the Huber loss (δ = 1e-3) of the residual LSE(...) − log L, *summed* over
  points (as in the papers; the mean has the same minimiser). With δ that small it is nearly a
  sum of absolute log-errors, robust to the odd bad run.
- It is minimised by L-BFGS (scipy's L-BFGS-B, analytic gradient) from a grid of starts:
  α, β ∈ {0, 0.5, 1, 1.5, 2}, e ∈ {−1, −0.5, 0, 0.5, 1}, a, b ∈ {0, 5, ..., 25} (4,500 starts).
  The objective of all 4,500 is evaluated at once, and L-BFGS runs from the 50 best only: on
  Chinchilla's data those reach the same optimum as L-BFGS from all 4,500, at 1/90 of the
  cost. The best result is kept.
- Internally log N and log D are centred (a − α·log N = a' − α·(log N − mean log N)); this is
  the same model, but removes the strong correlation between a and α that slows L-BFGS.
- Uncertainty: a bootstrap over the points used (resampled with replacement); percentile
  intervals. Each resample is refitted by L-BFGS from the full-data optimum, which is close to
  the resample's optimum (on Chinchilla's data, adding the best grid starts changes no
  interval).

``fit_frontier``: L(C) = E + A·C^(−α), the same method with LSE(a − α·log C, e). FLOPs span
1e11..1e24, so log C is taken relative to the geometric mean C_ref of the data; the fit's
A' = A·C_ref^(−α) (the reducible loss at C_ref) is converted back at the end.

``isoflop_minima`` and ``fit_allocation``: "approach 2" of Hoffmann et al.: for each compute
budget, a parabola in log N through that budget's runs gives the loss-optimal N; a line in
log-log through those minima gives N_opt = kN·C^a and D_opt = kD·C^b.

``group_budgets``: which points share a compute budget when C is measured, not nominal (runs'
whole steps, or another study's points with C continuous): the densest clusters of log C that
stand out from the C values around them (`budget_rule` says it in words).

Compute-optimal allocation from the surface (C = 6·N·D), Hoffmann et al. eq. 4:
G = (αA / (βB))^(1/(α+β)), N* = G·(C/6)^a, D* = (C/6)^b / G, a = β/(α+β), b = α/(α+β).
"""

from __future__ import annotations

import contextlib
import csv
import math
import os
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field

import numpy as np
from scipy.optimize import minimize, minimize_scalar

from lmforge.pretrain.core.errors import ConfigurationError


class ScalingFitError(ConfigurationError):
    """Scaling-law data or a fit request is unusable; the message says what to change."""


# --------------------------------------------------------------------------------------------
# data
# --------------------------------------------------------------------------------------------


def _where(labels: Sequence[str], i: int) -> str:
    """'point 3' or 'point 3 (row 5)': how an error names a point."""
    label = labels[i] if labels else f"point {i}"
    return f"point {i}" if label == f"point {i}" else f"point {i} ({label})"


def _as_array(name: str, values) -> np.ndarray:
    try:
        arr = np.asarray(values, dtype=float)
    except (TypeError, ValueError) as e:
        raise ScalingFitError(f"{name} must be numbers: {e}") from None
    if arr.ndim != 1:
        raise ScalingFitError(f"{name} must be a 1-D sequence of numbers; got shape {arr.shape}")
    return arr


def _check_positive(name: str, values: np.ndarray, labels: Sequence[str]) -> None:
    for i, v in enumerate(values):
        if not math.isfinite(v):
            raise ScalingFitError(f"{name} must be finite: {_where(labels, i)} has {name}={v}")
        if v <= 0:
            raise ScalingFitError(f"{name} must be > 0: {_where(labels, i)} has {name}={v:g}")


@dataclass
class Points:
    """The data a fit runs on: float arrays of equal length, one entry per training run."""

    N: np.ndarray  # parameters
    D: np.ndarray  # training tokens
    C: np.ndarray  # training FLOPs
    L: np.ndarray  # final loss
    labels: list[str]  # a name per point (run name, or "row 7")

    def __len__(self) -> int:
        return len(self.L)

    @classmethod
    def from_arrays(
        cls, *, N=None, D=None, C=None, L, labels=None, flops_per_param_token: float = 6.0
    ) -> Points:
        """Points from any two of N, D, C (the third is C = k·N·D, k = flops_per_param_token)
        and the loss L. All three may be given, e.g. when C was counted another way."""
        given = {k: _as_array(k, v) for k, v in (("N", N), ("D", D), ("C", C)) if v is not None}
        if len(given) < 2:
            raise ScalingFitError(
                f"points need two of N, D, C; got only {', '.join(given) or 'none'} "
                "(pass the missing one, e.g. D = tokens seen)"
            )
        L = _as_array("loss", L)
        n = len(L)
        labels = [f"point {i}" for i in range(n)] if labels is None else [str(s) for s in labels]
        for name, arr in (*given.items(), ("labels", labels)):
            if len(arr) != n:
                raise ScalingFitError(
                    f"{name} has {len(arr)} values but loss has {n}; give one value per point"
                )
        if not flops_per_param_token > 0:
            raise ScalingFitError(
                f"flops_per_param_token must be > 0; got {flops_per_param_token} (6 is standard)"
            )
        for name, arr in given.items():
            _check_positive(name, arr, labels)

        k = float(flops_per_param_token)
        N_ = given["N"] if "N" in given else given["C"] / (k * given["D"])
        D_ = given["D"] if "D" in given else given["C"] / (k * given["N"])
        C_ = given["C"] if "C" in given else k * given["N"] * given["D"]

        for i, v in enumerate(L):
            what = f"{_where(labels, i)} (N={N_[i]:.3g}, D={D_[i]:.3g})"
            if not math.isfinite(v):
                raise ScalingFitError(
                    f"loss must be finite: {what} has loss {v}; drop the point or rerun it"
                )
            if v <= 0:
                raise ScalingFitError(
                    f"loss must be > 0: {what} has loss {v:g}; drop the point or rerun it"
                )
        return cls(N=N_, D=D_, C=C_, L=L, labels=labels)

    def subset(self, index) -> Points:
        index = np.asarray(index, dtype=int)
        return Points(
            N=self.N[index],
            D=self.D[index],
            C=self.C[index],
            L=self.L[index],
            labels=[self.labels[i] for i in index],
        )


# Header names (compared lower-case, stripped) that load_points_csv understands.
_COLUMN_ALIASES = {
    "N": ("n", "params", "parameters", "model size", "model_size"),
    "D": ("d", "tokens"),
    "C": ("c", "flops", "training flop", "training_flops", "compute"),
    "L": ("loss", "l", "val_loss"),
    "label": ("run", "name", "label"),
}


def load_points_csv(path: str, *, flops_per_param_token: float = 6.0) -> Points:
    """Points from a CSV with a header: the loss and two (or three) of N, D, C.

    Column names are matched case-insensitively against `_COLUMN_ALIASES`; other columns are
    ignored. A "run"/"name"/"label" column, if present, names the points; otherwise each point
    is named by its row in the file ("row 2" is the first row under the header).
    """
    if not os.path.isfile(path):
        raise ScalingFitError(f"points file not found: {path}")
    try:
        with open(path, newline="", encoding="utf-8") as f:
            rows = [row for row in csv.reader(f)]
    except (UnicodeDecodeError, csv.Error) as exc:  # binary, another encoding, a huge field
        first = (str(exc).splitlines() or [type(exc).__name__])[0][:120]
        raise ScalingFitError(
            f"{path} is not a UTF-8 CSV file ({first}); give a CSV with a header row, then one "
            "row per run"
        ) from None
    numbered = [(i + 1, row) for i, row in enumerate(rows) if any(cell.strip() for cell in row)]
    if not numbered:
        raise ScalingFitError(f"{path} is empty; expected a header row, then one row per run")
    _, header = numbered[0]
    data = numbered[1:]
    if not data:
        raise ScalingFitError(f"{path} has a header but no data rows; add one row per run")

    names = [h.strip().lower() for h in header]
    columns: dict[str, int] = {}
    for key, aliases in _COLUMN_ALIASES.items():
        found = [j for j, h in enumerate(names) if h in aliases]
        if len(found) > 1:
            both = ", ".join(repr(header[j].strip()) for j in found)
            raise ScalingFitError(f"{path}: columns {both} all mean {key}; keep one of them")
        if found:
            columns[key] = found[0]
    have = [k for k in ("N", "D", "C") if k in columns]
    if "L" not in columns or len(have) < 2:
        raise ScalingFitError(
            f"{path} has columns {[h.strip() for h in header]}; need a loss column "
            "('loss', 'L' or 'val_loss') and two of N ('N', 'params', 'model size'), "
            "D ('D', 'tokens'), C ('C', 'flops', 'training flop', 'compute')"
        )

    values: dict[str, list[float]] = {k: [] for k in (*have, "L")}
    labels = []
    for line, row in data:
        if len(row) < len(header):
            raise ScalingFitError(
                f"{path} row {line} has {len(row)} cells but the header has {len(header)}; "
                "fill in or remove the row"
            )
        for key in values:
            cell = row[columns[key]].strip()
            try:
                values[key].append(float(cell))
            except ValueError:
                raise ScalingFitError(
                    f"{path} row {line}, column {header[columns[key]].strip()!r}: {cell!r} is "
                    "not a number; fix or remove the row"
                ) from None
        labels.append(row[columns["label"]].strip() if "label" in columns else f"row {line}")

    return Points.from_arrays(
        **{k: values[k] for k in have},
        L=values["L"],
        labels=labels,
        flops_per_param_token=flops_per_param_token,
    )


# --------------------------------------------------------------------------------------------
# the Huber / log-sum-exp objective, shared by the surface and the frontier fits
# --------------------------------------------------------------------------------------------
#
# A model with J power-law terms has parameters theta = (a_1..a_J, e, alpha_1..alpha_J) and
# predicts log L = LSE(a_1 − alpha_1·X_1, ..., a_J − alpha_J·X_J, e), where X_j are (centred)
# log features: J = 2 (log N, log D) for the surface, J = 1 (log C) for the frontier.

_LBFGS_OPTIONS = {"ftol": 1e-15, "gtol": 1e-12, "maxiter": 5000}


def _one_blas_thread():
    """scipy >= 1.15's L-BFGS-B makes LAPACK calls on tiny matrices; a multi-threaded OpenBLAS
    then spins its threads and, on a busy machine, makes each fit tens of times slower (scipy
    issue #22438). Run the optimiser with BLAS on one thread where threadpoolctl is installed."""
    try:
        from threadpoolctl import threadpool_limits
    except ImportError:
        return contextlib.nullcontext()
    return threadpool_limits(limits=1, user_api="blas")


def _objective(thetas: np.ndarray, X: np.ndarray, log_loss: np.ndarray, delta: float):
    """Summed Huber loss of the log-loss residuals, and its gradient, for a batch of parameter
    vectors. thetas: (G, 2J+1); X: (J, n). Returns (G,) values and (G, 2J+1) gradients."""
    J = X.shape[0]
    coef, e, expo = thetas[:, :J], thetas[:, J], thetas[:, J + 1 :]
    terms = np.concatenate(
        [
            coef[:, :, None] - expo[:, :, None] * X[None],  # (G, J, n)
            np.broadcast_to(e[:, None, None], (len(thetas), 1, X.shape[1])),
        ],
        axis=1,
    )
    top = terms.max(axis=1, keepdims=True)
    exp_terms = np.exp(terms - top)
    total = exp_terms.sum(axis=1, keepdims=True)
    lse = (top + np.log(total))[:, 0]  # (G, n)
    weights = exp_terms / total  # d LSE / d term_k: the softmax of the terms

    r = lse - log_loss
    abs_r = np.abs(r)
    huber = np.where(abs_r <= delta, 0.5 * r * r, delta * (abs_r - 0.5 * delta))
    psi = np.clip(r, -delta, delta)  # Huber'(r)

    grad_terms = (psi[:, None, :] * weights).sum(axis=2)  # (G, J+1): d/d a_j and d/d e
    grad_expo = -(psi[:, None, :] * weights[:, :J] * X[None]).sum(axis=2)  # d/d alpha_j
    return huber.sum(axis=1), np.concatenate([grad_terms, grad_expo], axis=1)


def _minimise(starts: np.ndarray, X: np.ndarray, log_loss: np.ndarray, delta: float):
    """L-BFGS from each start; the lowest finite result as (theta, objective, converged)."""

    def fun(theta):
        f, g = _objective(theta[None], X, log_loss, delta)
        return f[0], g[0]

    best = None
    with _one_blas_thread():
        for start in starts:
            res = minimize(fun, start, jac=True, method="L-BFGS-B", options=_LBFGS_OPTIONS)
            if not (np.all(np.isfinite(res.x)) and np.isfinite(res.fun)):
                continue
            if best is None or res.fun < best.fun:
                best = res
    if best is None:
        return None, math.inf, False
    # status 1 is "iteration limit reached"; 0 (converged) and 2 (the line search found no
    # further descent, common at the kinks of a near-L1 objective) both mark an optimum.
    return best.x, float(best.fun), best.status != 1


def _best_starts(grid: np.ndarray, k: int, X, log_loss, delta) -> np.ndarray:
    values, _ = _objective(grid, X, log_loss, delta)
    values = np.where(np.isfinite(values), values, np.inf)
    return grid[np.argsort(values, kind="stable")[:k]]


def _percentiles(samples: dict[str, list[float]], level: float) -> dict[str, tuple[float, float]]:
    lo, hi = 50 * (1 - level), 50 * (1 + level)
    return {
        k: (float(np.percentile(v, lo)), float(np.percentile(v, hi))) for k, v in samples.items()
    }


def _bootstrap(theta, X, log_loss, delta, to_fit, n: int, seed: int, level: float):
    """Percentile intervals from ``n`` resamples of the points (with replacement), each refitted
    by L-BFGS from the full-data optimum ``theta``; ``to_fit`` maps a solution to the reported
    parameters (None: drop the resample). Returns (intervals, the resamples' parameters)."""
    rng = np.random.default_rng(seed)
    fits: list[dict[str, float]] = []
    for _ in range(n):
        idx = rng.integers(0, len(log_loss), size=len(log_loss))
        theta_b, _, ok = _minimise(theta[None], X[:, idx], log_loss[idx], delta)
        fit = to_fit(theta_b) if theta_b is not None and ok else None
        if fit is not None:
            fits.append(fit)
    return _intervals(fits, level), fits


def _intervals(fits: list[dict[str, float]], level: float) -> dict[str, tuple[float, float]]:
    """Percentile intervals of each parameter over bootstrap fits ({} without any)."""
    if not fits:
        return {}
    return _percentiles({k: [f[k] for f in fits] for k in fits[0]}, level)


def prediction_interval(values, level: float) -> tuple[float, float] | None:
    """The percentile interval of a prediction over bootstrap fits (None without any)."""
    values = np.asarray([v for v in values if math.isfinite(v)], dtype=float)
    if not len(values):
        return None
    lo, hi = np.percentile(values, [50 * (1 - level), 50 * (1 + level)])
    return float(lo), float(hi)


def _check_fit_options(delta: float, exclude_highest: int, bootstrap: int, level: float) -> None:
    if not delta > 0:
        raise ScalingFitError(f"delta must be > 0; got {delta} (1e-3 is standard)")
    if not isinstance(exclude_highest, (int, np.integer)) or exclude_highest < 0:
        raise ScalingFitError(f"exclude_highest must be an integer >= 0; got {exclude_highest!r}")
    if not isinstance(bootstrap, (int, np.integer)) or bootstrap < 0:
        raise ScalingFitError(f"bootstrap must be an integer >= 0; got {bootstrap!r}")
    if not 0 < level < 1:
        raise ScalingFitError(f"level must be in (0, 1); got {level} (e.g. 0.95)")


def _split_highest(L: np.ndarray, k: int) -> tuple[np.ndarray, list[int]]:
    """Indices kept and indices of the k highest losses (excluded), both ascending."""
    n_kept = max(len(L) - k, 0)
    order = np.argsort(L, kind="stable")
    return np.sort(order[:n_kept]), sorted(int(i) for i in order[n_kept:])


def _scalar_or_array(x: np.ndarray):
    return float(x) if np.ndim(x) == 0 else x


# --------------------------------------------------------------------------------------------
# L(N, D) = E + A / N^alpha + B / D^beta
# --------------------------------------------------------------------------------------------

# Hoffmann et al.'s grid, in their parameter order (a, b, e, alpha, beta).
_SURFACE_GRID = np.stack(
    np.meshgrid(
        np.arange(0.0, 30.0, 5.0),  # a = log A
        np.arange(0.0, 30.0, 5.0),  # b = log B
        np.array([-1.0, -0.5, 0.0, 0.5, 1.0]),  # e = log E
        np.arange(0.0, 2.5, 0.5),  # alpha
        np.arange(0.0, 2.5, 0.5),  # beta
        indexing="ij",
    ),
    axis=-1,
).reshape(-1, 5)
_SURFACE_STARTS = 50  # L-BFGS runs from this many of the best grid starts


@dataclass
class SurfaceFit:
    """L(N, D) = E + A / N^alpha + B / D^beta."""

    E: float
    A: float
    B: float
    alpha: float
    beta: float
    objective: float  # summed Huber loss at the optimum
    n_points: int  # points used
    excluded: list[int] = field(default_factory=list)  # indices into the input Points
    ci: dict[str, tuple[float, float]] = field(default_factory=dict)  # bootstrap intervals
    level: float = 0.95
    bootstrap: int = 0  # bootstrap resamples that converged
    samples: list[dict[str, float]] = field(default_factory=list, repr=False)  # their params

    @property
    def a(self) -> float:
        """N_opt ∝ C^a."""
        return self.beta / (self.alpha + self.beta)

    @property
    def b(self) -> float:
        """D_opt ∝ C^b."""
        return self.alpha / (self.alpha + self.beta)

    def predict(self, N, D):
        N, D = np.asarray(N, dtype=float), np.asarray(D, dtype=float)
        return _scalar_or_array(self.E + self.A / N**self.alpha + self.B / D**self.beta)

    def optimal(
        self, C: float, *, flops_per_token: Callable[[float], float] | None = None
    ) -> tuple[float, float, float]:
        """Compute-optimal (N*, D*, L*) at a budget of C FLOPs.

        Without `flops_per_token`, C = 6·N·D and the closed form applies. With it (a callable
        N -> training FLOPs per token, increasing in N, e.g. 6·N plus attention), D = C / fpt(N)
        and L(N, D) is minimised over log N numerically.
        """
        C = float(C)
        if not (math.isfinite(C) and C > 0):
            raise ScalingFitError(f"the compute budget C must be finite and > 0; got {C}")
        G = (self.alpha * self.A / (self.beta * self.B)) ** (1 / (self.alpha + self.beta))
        N_star = G * (C / 6) ** self.a
        D_star = (C / 6) ** self.b / G
        if flops_per_token is None:
            return N_star, D_star, float(self.predict(N_star, D_star))

        def tokens(log_n: float) -> float:
            fpt = float(flops_per_token(math.exp(log_n)))
            if not (math.isfinite(fpt) and fpt > 0):
                raise ScalingFitError(
                    f"flops_per_token(N={math.exp(log_n):.3g}) returned {fpt}; it must be > 0"
                )
            return C / fpt

        # The closed-form answer is within a few factors of e of the exact one for any
        # sensible FLOP count; search e^±10 around it.
        lo, hi = math.log(N_star) - 10, math.log(N_star) + 10
        res = minimize_scalar(
            lambda x: self.predict(math.exp(x), tokens(x)),
            bounds=(lo, hi),
            method="bounded",
            options={"xatol": 1e-10},
        )
        if min(res.x - lo, hi - res.x) < 1e-6:
            raise ScalingFitError(
                f"no compute-optimal N found within a factor e^10 of {N_star:.3g} at C={C:.3g}; "
                "flops_per_token must be increasing in N and close to 6·N"
            )
        N_opt = math.exp(res.x)
        return N_opt, tokens(res.x), float(res.fun)

    def optimal_interval(
        self, C: float, *, flops_per_token: Callable[[float], float] | None = None
    ) -> dict[str, tuple[float, float]]:
        """Bootstrap intervals of N*, D* and L* at C: `optimal` of every resample's fit
        ({} without bootstrap)."""
        rows = []
        for p in self.samples:
            with contextlib.suppress(ScalingFitError, OverflowError, ZeroDivisionError):
                rows.append(
                    SurfaceFit(**p, objective=0.0, n_points=0).optimal(
                        C, flops_per_token=flops_per_token
                    )
                )
        if not rows:
            return {}
        out = {}
        for k, values in zip(("N", "D", "loss"), zip(*rows, strict=True), strict=True):
            interval = prediction_interval(values, self.level)
            if interval is not None:
                out[k] = interval
        return out

    def params(self) -> dict[str, float]:
        return dict(
            E=self.E, A=self.A, B=self.B, alpha=self.alpha, beta=self.beta, a=self.a, b=self.b
        )


def fit_surface(
    points: Points,
    *,
    delta: float = 1e-3,
    exclude_highest: int = 0,
    bootstrap: int = 0,
    level: float = 0.95,
    seed: int = 0,
) -> SurfaceFit:
    """Fit L(N, D) = E + A / N^alpha + B / D^beta (method: see the module docstring).

    exclude_highest=k drops the k highest-loss points first (Besiroglu et al. drop 5 of
    Chinchilla's 245). bootstrap=n adds percentile intervals at `level` from n resamples.
    """
    _check_fit_options(delta, exclude_highest, bootstrap, level)
    keep, excluded = _split_highest(points.L, int(exclude_highest))
    if len(keep) < 6:
        raise ScalingFitError(
            f"the L(N, D) fit has 5 free parameters and needs at least 6 points; got {len(keep)}"
            + (f" after excluding {len(excluded)}" if excluded else "")
            + " (run more sweep points or fit the frontier only)"
        )
    for name, values in (("N", points.N[keep]), ("D", points.D[keep])):
        distinct = len(np.unique(values))
        if distinct < 2:
            raise ScalingFitError(
                f"the L(N, D) fit needs at least 2 distinct {name} values; all points have "
                f"{name}={values[0]:.3g} (vary {name} across the sweep or fit the frontier only)"
            )

    log_n, log_d, log_loss = np.log(points.N[keep]), np.log(points.D[keep]), np.log(points.L[keep])
    centre = np.array([log_n.mean(), log_d.mean()])
    X = np.stack([log_n, log_d]) - centre[:, None]

    def to_centred(theta: np.ndarray) -> np.ndarray:  # a -> a − alpha·mean(log N), same for b
        theta = np.array(theta, dtype=float)
        theta[..., :2] -= theta[..., 3:] * centre
        return theta

    def to_fit(theta: np.ndarray) -> dict[str, float]:
        a, b = theta[:2] + theta[3:] * centre
        E, A, B = (float(np.exp(v)) for v in (theta[2], a, b))
        alpha, beta = float(theta[3]), float(theta[4])
        return dict(E=E, A=A, B=B, alpha=alpha, beta=beta)

    grid = to_centred(_SURFACE_GRID)
    starts = _best_starts(grid, _SURFACE_STARTS, X, log_loss, delta)
    theta, objective, _ = _minimise(starts, X, log_loss, delta)
    if theta is None:
        raise ScalingFitError("the L(N, D) fit failed from every start; check the data")

    def with_exponents(fit: dict[str, float]) -> dict[str, float] | None:
        if fit["alpha"] + fit["beta"] <= 0:
            return None
        total = fit["alpha"] + fit["beta"]
        return {**fit, "a": fit["beta"] / total, "b": fit["alpha"] / total}

    ci, samples = _bootstrap(
        theta, X, log_loss, delta, lambda t: with_exponents(to_fit(t)), bootstrap, seed, level
    )

    return SurfaceFit(
        **to_fit(theta),
        objective=objective,
        n_points=len(keep),
        excluded=excluded,
        ci=ci,
        level=level,
        bootstrap=len(samples),
        samples=[{k: v for k, v in f.items() if k not in ("a", "b")} for f in samples],
    )


# --------------------------------------------------------------------------------------------
# L(C) = E + A · C^(-alpha)
# --------------------------------------------------------------------------------------------

# Starts in (a', e, alpha), a' = log of the reducible loss at the reference compute: it is
# between ~0.02 and ~3 nats; alpha for C in FLOPs is typically 0.03..0.3.
_FRONTIER_GRID = np.stack(
    np.meshgrid(
        np.arange(-4.0, 1.5, 1.0),  # a'
        np.array([-1.0, -0.5, 0.0, 0.5, 1.0]),  # e = log E
        np.array([0.0, 0.05, 0.1, 0.2, 0.3, 0.5, 1.0]),  # alpha
        indexing="ij",
    ),
    axis=-1,
).reshape(-1, 3)
_FRONTIER_STARTS = 20


@dataclass
class FrontierFit:
    """L(C) = E + A · C^(-alpha)."""

    E: float
    A: float
    alpha: float
    objective: float
    n_points: int
    excluded: list[int] = field(default_factory=list)
    ci: dict[str, tuple[float, float]] = field(default_factory=dict)
    level: float = 0.95
    bootstrap: int = 0
    samples: list[dict[str, float]] = field(default_factory=list, repr=False)  # resamples' fits

    def predict(self, C):
        C = np.asarray(C, dtype=float)
        return _scalar_or_array(self.E + self.A * C ** (-self.alpha))

    def interval(self, C: float) -> tuple[float, float] | None:
        """Bootstrap interval of the loss predicted at C (None without bootstrap)."""
        with np.errstate(over="ignore", invalid="ignore"):
            values = [p.get("E", 0.0) + p["A"] * float(C) ** (-p["alpha"]) for p in self.samples]
        return prediction_interval(values, self.level)

    def params(self) -> dict[str, float]:
        return dict(E=self.E, A=self.A, alpha=self.alpha)


def fit_frontier(
    C,
    L,
    *,
    delta: float = 1e-3,
    exclude_highest: int = 0,
    bootstrap: int = 0,
    level: float = 0.95,
    seed: int = 0,
) -> FrontierFit:
    """Fit L(C) = E + A · C^(-alpha) to (compute, loss) points, e.g. the lowest loss per budget.

    Options as in `fit_surface`."""
    _check_fit_options(delta, exclude_highest, bootstrap, level)
    C, L = _as_array("C", C), _as_array("loss", L)
    if len(C) != len(L):
        raise ScalingFitError(f"C has {len(C)} values but loss has {len(L)}; give one per point")
    _check_positive("C", C, [])
    _check_positive("loss", L, [])
    keep, excluded = _split_highest(L, int(exclude_highest))
    if len(keep) < 4:
        raise ScalingFitError(
            f"the L(C) fit has 3 free parameters and needs at least 4 points; got {len(keep)}"
            + (f" after excluding {len(excluded)}" if excluded else "")
            + " (add compute budgets)"
        )
    if len(np.unique(C[keep])) < 3:
        raise ScalingFitError(
            f"the L(C) fit needs at least 3 distinct C values; got {len(np.unique(C[keep]))} "
            "(add compute budgets)"
        )

    log_c, log_loss = np.log(C[keep]), np.log(L[keep])
    log_c_ref = log_c.mean()  # log of the geometric mean of C
    X = (log_c - log_c_ref)[None]

    def to_fit(theta: np.ndarray) -> dict[str, float]:
        a_ref, e, alpha = theta
        return dict(
            E=float(np.exp(e)), A=float(np.exp(a_ref + alpha * log_c_ref)), alpha=float(alpha)
        )

    starts = _best_starts(_FRONTIER_GRID, _FRONTIER_STARTS, X, log_loss, delta)
    theta, objective, _ = _minimise(starts, X, log_loss, delta)
    if theta is None:
        raise ScalingFitError("the L(C) fit failed from every start; check the data")

    ci, samples = _bootstrap(theta, X, log_loss, delta, to_fit, bootstrap, seed, level)

    return FrontierFit(
        **to_fit(theta),
        objective=objective,
        n_points=len(keep),
        excluded=excluded,
        ci=ci,
        level=level,
        bootstrap=len(samples),
        samples=samples,
    )


def fit_power_law(C, L, *, bootstrap: int = 0, level: float = 0.95, seed: int = 0) -> FrontierFit:
    """Fit L(C) = A · C^(-alpha), the frontier with E = 0: least squares of log L on log C.

    The nested alternative to `fit_frontier` when a few budgets cannot pin the irreducible loss
    down (its interval then spans from 0 to the data): two parameters, a straight line in
    log-log. bootstrap=n resamples the points for intervals on A and alpha."""
    _check_fit_options(1e-3, 0, bootstrap, level)
    C, L = _as_array("C", C), _as_array("loss", L)
    if len(C) != len(L):
        raise ScalingFitError(f"C has {len(C)} values but loss has {len(L)}; give one per point")
    _check_positive("C", C, [])
    _check_positive("loss", L, [])
    log_c, log_loss = np.log(C), np.log(L)
    if len(np.unique(log_c)) < 2:
        raise ScalingFitError(
            f"the power law A·C^-alpha needs at least 2 distinct C values; got "
            f"{len(np.unique(log_c))} (add compute budgets)"
        )

    def line(x: np.ndarray, y: np.ndarray) -> dict[str, float]:
        slope, intercept = np.polyfit(x, y, 1)
        return {"E": 0.0, "A": float(np.exp(intercept)), "alpha": float(-slope)}

    fit = line(log_c, log_loss)
    residual = log_loss - (np.log(fit["A"]) - fit["alpha"] * log_c)
    samples: list[dict[str, float]] = []
    rng = np.random.default_rng(seed)
    for _ in range(bootstrap if len(C) >= 3 else 0):
        idx = rng.integers(0, len(C), size=len(C))
        if len(np.unique(log_c[idx])) < 2:
            continue  # one budget drawn every time: no slope
        samples.append({k: v for k, v in line(log_c[idx], log_loss[idx]).items() if k != "E"})
    return FrontierFit(
        **fit,
        objective=float(np.sum(residual**2)),
        n_points=len(C),
        excluded=[],
        ci=_intervals(samples, level),
        level=level,
        bootstrap=len(samples),
        samples=samples,
    )


# --------------------------------------------------------------------------------------------
# IsoFLOP profiles and the N_opt(C), D_opt(C) allocation
# --------------------------------------------------------------------------------------------


@dataclass
class IsoFLOPMinimum:
    """The loss-optimal model size at one compute budget, from a parabola in log N."""

    C: float  # the budget
    N_opt: float  # argmin of L = p0 + p1·x + p2·x², x = log N
    D_opt: float  # C / (6·N_opt), or C / flops_per_token(N_opt)
    L_opt: float  # the parabola's minimum
    n_points: int
    curvature: float  # p2 (> 0)
    inside: bool  # N_opt within [min N, max N] of the budget's points
    method: str = "parabola"  # or "profile" (`profile_minimum`)


BUDGET_MIN_POINTS = 3  # a parabola's worth of points
BUDGET_CONTRAST = 2.0  # a budget holds this many times the points of each flank


def budget_rule(tolerance: float) -> str:
    """`group_budgets`' rule in words, for reports and messages."""
    return (
        f"a budget is at least {BUDGET_MIN_POINTS} points whose C lie within a factor "
        f"{1 + tolerance:.4g} of each other and at least {BUDGET_CONTRAST:g} times as many as "
        "in the same width of C just below and just above them (densest first), at the "
        "geometric mean of their C"
    )


def group_budgets(C, tolerance: float) -> np.ndarray:
    """Each point's compute budget, NaN for a point in none (`budget_rule`).

    Windows [log C, log C + log(1 + tolerance)] are taken from the one holding the most points
    down; a window becomes a budget, of the points no earlier budget took, when those are at
    least BUDGET_MIN_POINTS and at least BUDGET_CONTRAST times the points in the window of the
    same width on either side of it. An IsoFLOP grid with C a little off its nominal budgets
    forms its budgets; points spread over C (other runs between the budgets) join none: only
    the clusters that stand out are budgets. Budgets closer than a factor (1 + tolerance)^2
    need a smaller tolerance.
    """
    if not 0 <= tolerance < 1:
        raise ScalingFitError(
            f"budget tolerance {tolerance:g}: give a relative width in [0, 1), e.g. 0.2 (C "
            "within a factor 1.2 of each other; 0: equal C only)"
        )
    x = np.log(_as_array("C", C))
    out = np.full(len(x), np.nan)
    if len(x) == 0:
        return out
    width = math.log1p(tolerance)
    order = np.argsort(x, kind="stable")
    xs = x[order]
    first = np.arange(len(xs))
    end = np.searchsorted(xs, xs + width, side="right")  # window i: sorted points first..end-1
    below = first - np.searchsorted(xs, xs - width, side="left")
    above = np.searchsorted(xs, xs + 2 * width, side="right") - end
    free = np.ones(len(xs), dtype=bool)
    for i in sorted(first, key=lambda i: (-(end[i] - i), xs[i])):
        members = np.flatnonzero(free[i : end[i]]) + i
        n = len(members)
        if n < BUDGET_MIN_POINTS or n < BUDGET_CONTRAST * max(below[i], above[i]):
            continue
        free[members] = False
        out[order[members]] = math.exp(float(xs[members].mean()))
    return out


def _group_budgets(C: np.ndarray, budgets, rel_tol: float, labels) -> list[tuple[float, list]]:
    """[(budget, point indices)], budgets ascending; without `budgets`, points in no budget
    (`group_budgets`) are left out."""
    tol = math.log1p(rel_tol)
    log_c = np.log(C)
    if budgets is None:
        grouped = group_budgets(C, rel_tol)
        found = np.unique(grouped[np.isfinite(grouped)])
        if not len(found):
            raise ScalingFitError(
                f"no compute budget among the {len(C)} points ({budget_rule(rel_tol)}); list "
                "the budgets, or raise rel_tol"
            )
        return [(float(b), np.flatnonzero(grouped == b).tolist()) for b in found]

    budgets = sorted(float(b) for b in _as_array("budgets", budgets))
    _check_positive("budget", np.array(budgets), [])
    log_b = np.log(budgets)
    members: list[list[int]] = [[] for _ in budgets]
    for i, lc in enumerate(log_c):
        j = int(np.argmin(np.abs(log_b - lc)))
        if abs(log_b[j] - lc) > tol:
            raise ScalingFitError(
                f"{_where(labels, i)} has C={C[i]:.4g}, not within {rel_tol:.0%} of any budget "
                f"(nearest {budgets[j]:.4g}); add its budget or raise rel_tol"
            )
        members[j].append(i)
    for b, m in zip(budgets, members, strict=True):
        if not m:
            raise ScalingFitError(f"budget C={b:.4g} has no points; remove it from budgets")
    return list(zip(budgets, members, strict=True))


def isoflop_minima(
    points: Points,
    *,
    budgets=None,
    rel_tol: float = 0.05,
    flops_per_token: Callable[[float], float] | None = None,
) -> list[IsoFLOPMinimum]:
    """Per compute budget, the least-squares parabola of L in log N and its minimum.

    Without `budgets`, `group_budgets(C, rel_tol)` forms them (a sweep's actual C differs
    slightly from the nominal one because step counts are whole numbers), each at the geometric
    mean of its C, and points in no budget are left out; with `budgets` (the nominal ones),
    each point joins the nearest, which must be within `rel_tol`.
    """
    if not 0 <= rel_tol < 1:
        raise ScalingFitError(f"rel_tol must be in [0, 1); got {rel_tol} (e.g. 0.05)")
    minima = []
    for C, idx in _group_budgets(points.C, budgets, rel_tol, points.labels):
        N, L = points.N[idx], points.L[idx]
        sizes = len(np.unique(N))
        if sizes < 3:
            raise ScalingFitError(
                f"budget C={C:.4g} has {sizes} distinct model size(s); a parabola needs at "
                "least 3 (add sizes on both sides of the minimum)"
            )
        x = np.log(N)
        x_mid = x.mean()  # fit in x − x_mid for conditioning; the curvature is unchanged
        q2, q1, q0 = np.polyfit(x - x_mid, L, 2)
        if not q2 > 0:
            raise ScalingFitError(
                f"budget C={C:.4g}: the loss parabola opens downward (curvature {q2:.3g}), so "
                "it has no minimum (add sizes on both sides of the minimum)"
            )
        x_opt = x_mid - q1 / (2 * q2)
        N_opt = float(np.exp(x_opt))
        fpt = 6 * N_opt if flops_per_token is None else float(flops_per_token(N_opt))
        minima.append(
            IsoFLOPMinimum(
                C=C,
                N_opt=N_opt,
                D_opt=C / fpt,
                L_opt=float(q0 - q1 * q1 / (4 * q2)),
                n_points=len(idx),
                curvature=float(q2),
                inside=bool(N.min() <= N_opt <= N.max()),
            )
        )
    return minima


def profile_minimum(
    C: float,
    N,
    D,
    L,
    *,
    alpha: float,
    beta: float,
    flops_per_token: Callable[[float], float] | None = None,
) -> IsoFLOPMinimum | None:
    """One budget's loss-optimal N from a profile shaped like the L(N, D) surface.

    A parabola in log N is symmetric, but a budget's profile under L = E + A/N^α + B/D^β is
    not: along D = C / (6·N) it is c0 + c1·N^-α + c2·D^-β, steep on the small-N side and
    shallow on the other, so a parabola through a coarse or off-centre grid puts the minimum
    off (by tens of percent in N, up to ~1% in loss, on synthetic laws). Here α and β come
    from the surface fitted to all budgets, and c0, c1, c2 by linear least squares to this
    budget's points alone (three coefficients, like the parabola's); the minimum follows D =
    C / flops_per_token(N) (6·N without it). None where the fitted profile has no minimum
    (c1 or c2 not positive)."""
    N, D, L = (np.asarray(v, dtype=float) for v in (N, D, L))
    if len(L) < 3 or len(np.unique(N)) < 3:
        return None
    n_mid, d_mid = np.exp(np.log(N).mean()), np.exp(np.log(D).mean())
    X = np.stack([np.ones_like(L), (N / n_mid) ** -alpha, (D / d_mid) ** -beta], axis=1)
    (c0, c1, c2), *_ = np.linalg.lstsq(X, L, rcond=None)
    if not (c1 > 0 and c2 > 0):
        return None

    def tokens(x: float) -> float:
        n = math.exp(x)
        return C / (6 * n if flops_per_token is None else float(flops_per_token(n)))

    def loss(x: float) -> float:
        return c0 + c1 * (math.exp(x) / n_mid) ** -alpha + c2 * (tokens(x) / d_mid) ** -beta

    lo, hi = math.log(N.min()) - 3, math.log(N.max()) + 3
    res = minimize_scalar(loss, bounds=(lo, hi), method="bounded", options={"xatol": 1e-9})
    if min(res.x - lo, hi - res.x) < 1e-6:
        return None  # no minimum within e^3 of the sizes trained
    h = 1e-3  # the profile's curvature at its minimum, as a parabola's coefficient
    curvature = (loss(res.x + h) - 2 * res.fun + loss(res.x - h)) / (2 * h * h)
    N_opt = math.exp(res.x)
    return IsoFLOPMinimum(
        C=float(C),
        N_opt=N_opt,
        D_opt=tokens(res.x),
        L_opt=float(res.fun),
        n_points=len(L),
        curvature=float(curvature),
        inside=bool(N.min() <= N_opt <= N.max()),
        method="profile",
    )


@dataclass
class AllocationFit:
    """N_opt = kN · C^a and D_opt = kD · C^b, least squares in log-log."""

    a: float
    kN: float
    b: float
    kD: float
    ci: dict[str, tuple[float, float]]  # bootstrap intervals of a and b
    n_budgets: int
    level: float = 0.95
    samples: list[tuple[float, float]] = field(default_factory=list, repr=False)  # (a, ln kN)

    def N_opt(self, C):
        return _scalar_or_array(self.kN * np.asarray(C, dtype=float) ** self.a)

    def D_opt(self, C):
        return _scalar_or_array(self.kD * np.asarray(C, dtype=float) ** self.b)


def fit_allocation(
    minima: list[IsoFLOPMinimum], *, bootstrap: int = 0, level: float = 0.95, seed: int = 0
) -> AllocationFit:
    """Power laws through the IsoFLOP minima. bootstrap=n resamples the budgets n times for
    intervals on a and b (only with at least 3 budgets)."""
    if not isinstance(bootstrap, (int, np.integer)) or bootstrap < 0:
        raise ScalingFitError(f"bootstrap must be an integer >= 0; got {bootstrap!r}")
    if not 0 < level < 1:
        raise ScalingFitError(f"level must be in (0, 1); got {level} (e.g. 0.95)")
    log_c = np.log([m.C for m in minima])
    if len(np.unique(log_c)) < 2:
        raise ScalingFitError(
            f"the allocation fit needs at least 2 compute budgets; got {len(np.unique(log_c))} "
            "(run IsoFLOP sweeps at more budgets)"
        )
    log_n = np.log([m.N_opt for m in minima])
    log_d = np.log([m.D_opt for m in minima])
    a, log_kn = np.polyfit(log_c, log_n, 1)
    b, log_kd = np.polyfit(log_c, log_d, 1)

    ci: dict[str, tuple[float, float]] = {}
    fits: list[tuple[float, float]] = []
    if bootstrap and len(minima) >= 3:
        rng = np.random.default_rng(seed)
        samples: dict[str, list[float]] = {"a": [], "b": []}
        for _ in range(bootstrap):
            idx = rng.integers(0, len(minima), size=len(minima))
            if len(np.unique(log_c[idx])) < 2:
                continue  # one budget drawn every time: no slope
            a_b, log_kn_b = np.polyfit(log_c[idx], log_n[idx], 1)
            fits.append((float(a_b), float(log_kn_b)))
            samples["a"].append(a_b)
            samples["b"].append(np.polyfit(log_c[idx], log_d[idx], 1)[0])
        if samples["a"]:
            ci = _percentiles(samples, level)

    return AllocationFit(
        a=float(a),
        kN=float(np.exp(log_kn)),
        b=float(b),
        kD=float(np.exp(log_kd)),
        ci=ci,
        n_budgets=len(minima),
        level=level,
        samples=fits,
    )
