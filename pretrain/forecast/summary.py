"""How good the forecasts have been: `lmforge runs --forecasts [RUNS_DIR]` reads every finished
run's forecast.json under a runs directory (runs and a sweep's runs one level deeper, resumed
parts of a run included) and states, for each figure, the median and worst error and, for the
final loss, how often the stated 80% interval held the measured value, by how early the forecast
was made."""

from __future__ import annotations

import glob
import math
import os
from dataclasses import dataclass

import numpy as np

from lmforge.pretrain.core.errors import DataError
from lmforge.pretrain.forecast.forecast import FORECAST_FILE, read_forecast

# When a final-loss forecast was made: before the run (a law), or the newest refit at or before
# each of these fractions of the steps.
WHEN = (0.0, 0.2, 0.3, 0.5, 0.8)


def collect(runs_dir: str) -> list[dict]:
    """The finished forecasts (with what was measured) under ``runs_dir``."""
    if not os.path.isdir(runs_dir):
        raise DataError(f"--forecasts {runs_dir}: no such directory; give a runs directory")
    paths = sorted(
        glob.glob(os.path.join(runs_dir, "*", FORECAST_FILE))
        + glob.glob(os.path.join(runs_dir, "*", "*", FORECAST_FILE))
    )
    out = []
    for path in paths:
        fc = read_forecast(os.path.dirname(path))
        if fc is None:
            continue
        for part in [*fc.get("previous", []), fc]:
            if isinstance(part, dict) and isinstance(part.get("actual"), dict):
                out.append(part)
    return out


@dataclass
class Errors:
    """The errors of one figure over runs (forecast / measured - 1) and, for intervals, how
    many held the measured value."""

    what: str
    errors: list[float]
    inside: list[bool] | None = None

    @property
    def median(self) -> float:
        return float(np.median(np.abs(self.errors)))

    @property
    def worst(self) -> float:
        return max(self.errors, key=abs)

    @property
    def coverage(self) -> float | None:
        return float(np.mean(self.inside)) if self.inside else None


def _loss_at(fc: dict, when: float) -> dict | None:
    """The final-loss forecast of ``fc`` made at ``when`` (0: before the run; else the newest
    refit at or before that fraction of the steps, and after the previous one of WHEN)."""
    errors = fc.get("errors", {}).get("loss", [])
    if when == 0.0:
        return next((e for e in errors if e["fraction"] == 0.0), None)
    before = WHEN[WHEN.index(when) - 1]
    made = [e for e in errors if before < e["fraction"] <= when + 1e-9]
    return made[-1] if made else None


def summarize(fcs: list[dict]) -> list[Errors]:
    """Errors of memory, step time and wall time (by where the forecast came from), and of the
    final loss by when it was made."""
    out = []
    label = {
        "ledger": "from the ledger",
        "probe": "from a probe",
        "peak": "from peak x MFU",
        "estimate": "from the estimate",
    }
    for what, field in (
        ("memory", "memory"),
        ("step time", "step_seconds"),
        ("wall time", "wall_seconds"),
    ):
        groups: dict[str, list[float]] = {}
        for fc in fcs:
            err = fc.get("errors", {}).get(field)
            if not isinstance(err, (int, float)) or not math.isfinite(err):
                continue
            # by where the forecast came from (memory also by device: a CPU's is the resident set)
            if field == "memory":
                mem = fc["memory"]
                source = f"{mem['device']}, {label[mem.get('source', 'estimate')]}"
            else:
                source = label.get(fc["speed"]["source"], fc["speed"]["source"])
            groups.setdefault(source, []).append(float(err))
        for source, errs in sorted(groups.items()):
            out.append(Errors(f"{what} ({source})", errs))
    for when in WHEN:
        made = [m for m in (_loss_at(fc, when) for fc in fcs) if m is not None]
        if made:
            name = "before the run (law)" if when == 0.0 else f"from {when:.0%} of the steps"
            out.append(
                Errors(
                    f"final loss, {name}",
                    [m["error"] for m in made],
                    [bool(m["inside"]) for m in made],
                )
            )
    return out


def report_lines(runs_dir: str, fcs: list[dict], rows: list[Errors]) -> list[str]:
    lines = [
        f"{runs_dir}: forecasts of {len(fcs)} finished run(s) against what they measured "
        "(error = forecast / measured - 1; intervals are 80%)",
        f"{'figure':<44} {'runs':>5} {'median |err|':>12} {'worst':>8} {'80% covered':>12}",
    ]
    for r in rows:
        cov = f"{sum(r.inside)}/{len(r.inside)} {r.coverage:.0%}" if r.inside else "-"
        lines.append(
            f"{r.what:<44} {len(r.errors):>5} {r.median:>11.1%} {r.worst:>+8.1%} {cov:>12}"
        )
    over = [fc["actual"].get("overhead") for fc in fcs]
    over = [o for o in over if isinstance(o, (int, float))]
    if over:
        lines.append(
            f"refits' share of the training time: median {np.median(over):.2%}, "
            f"largest {max(over):.2%}"
        )
    return lines


def plot_forecasts(fcs: list[dict], path: str) -> None:
    """The final-loss error of each run against when its forecast was made (law at 0), the
    80% bands as bars; and the other figures' errors, one point per run."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, (ax, bx) = plt.subplots(1, 2, figsize=(11, 4.2))
    for fc in fcs:
        errs = fc.get("errors", {}).get("loss", [])
        if not errs:
            continue
        x = [e["fraction"] for e in errs]
        y = [100 * e["error"] for e in errs]
        ax.plot(x, y, "-", lw=0.6, color="0.6")
        ax.scatter(x, y, s=10, c=["C0" if e["inside"] else "C3" for e in errs], zorder=3)
    ax.axhline(0, color="k", lw=0.6)
    ax.set_xlabel("fraction of the steps when the forecast was made (0: the law, before)")
    ax.set_ylabel("final loss: forecast / measured - 1 (%)")
    ax.set_title("final loss (blue: measured inside the 80% band, red: outside)", fontsize=9)
    names = ("memory", "step_seconds", "wall_seconds")
    for i, name in enumerate(names):
        vals = [fc["errors"].get(name) for fc in fcs if fc.get("errors")]
        vals = [100 * v for v in vals if isinstance(v, (int, float))]
        bx.scatter([i] * len(vals), vals, s=12, alpha=0.7)
    bx.axhline(0, color="k", lw=0.6)
    bx.set_xticks(range(len(names)), ["peak memory", "step time", "wall time"])
    bx.set_ylabel("forecast / measured - 1 (%)")
    bx.set_title("memory and speed, one point per run", fontsize=9)
    fig.tight_layout()
    tmp = f"{path}.tmp.png"
    fig.savefig(tmp, dpi=110)
    plt.close(fig)
    os.replace(tmp, path)
