"""Does the scaling law carry into a downstream task? After a sweep is fitted, each budget's best
run (the lowest final validation loss among the budget's points) is finetuned on a task with a
fixed small label budget, from its weights and from the same shape's random weights: a label
curve of one size (finetune/label_curve.py: the same subset, steps and rate grid for every
budget, each arm's rate picked on validation, both compared on the test split). Test accuracy is
then fitted as a line in log10 of the pretraining compute, with its interval.

Written to ``<sweep>/transfer/``: a label curve per budget (``<run>/``), ``transfer.json`` and
``transfer.png`` (the loss frontier beside accuracy against compute). Resumable like the
sweep: finished finetunings are kept.
"""

from __future__ import annotations

import json
import math
import os

import numpy as np

from lmforge.finetune.config import FinetuneConfig
from lmforge.finetune.label_curve import curve_dir, run_curve
from lmforge.pretrain.config.schema import load_config
from lmforge.pretrain.core.durable import replace_durable
from lmforge.pretrain.core.errors import ConfigurationError, DataError
from lmforge.pretrain.train.metrics import final_eval
from lmforge.scaling.config import ScalingConfig
from lmforge.scaling.figures import _figure, _save

LEVEL = 0.90  # the interval of the fitted slope


def best_runs(sweep_dir: str) -> list[dict]:
    """Per budget (smallest first): its finished point with the lowest final validation loss."""
    with open(os.path.join(sweep_dir, "plan.json")) as f:
        points = json.load(f)["points"]
    best: dict[float, dict] = {}
    for p in points:
        row = final_eval(os.path.join(sweep_dir, p["name"]), p["steps"])
        if row is None:
            continue
        if p["budget"] not in best or row["val_loss"] < best[p["budget"]]["loss"]:
            best[p["budget"]] = {
                "budget": p["budget"], "run": p["name"], "loss": row["val_loss"],
                "flops": p["flops"], "params": p["params"], "held_out": p["holdout"],
            }  # fmt: skip
    if not best:
        raise DataError(f"{sweep_dir}: no finished run to finetune; run the sweep first")
    return [best[b] for b in sorted(best)]


def transfer_config(cfg: ScalingConfig, run: str) -> FinetuneConfig:
    """The one-size label curve of one budget's best run."""
    t = cfg.transfer
    root = os.path.join(cfg.sweep_dir, "transfer")
    keys = [
        f"init_from={os.path.join(cfg.sweep_dir, run)}",
        f"label_curve.sizes=[{t.train_examples}]",
        f"label_curve.steps=[{t.steps}]",
        f"label_curve.out={os.path.join(root, run)}",
        "label_curve.against=scratch",
        *([f"label_curve.lrs=[{','.join(f'{lr:g}' for lr in t.lrs)}]"] if t.lrs else []),
    ]
    return load_config(FinetuneConfig, [t.finetune, *t.overrides, *keys])


def check_transfer(cfg: ScalingConfig) -> None:
    """Before the sweep trains: the transfer's finetune config loads and can make a label curve
    (keys, task type, test file), so a typo does not wait for the whole grid."""
    from lmforge.finetune.label_curve import check_curve

    if cfg.transfer.finetune is None:
        return
    if not os.path.isfile(cfg.transfer.finetune):
        raise ConfigurationError(f"transfer.finetune={cfg.transfer.finetune}: no such file")
    check_curve(transfer_config(cfg, "<best run>"))


def slope_fit(x: list[float], y: list[float], level: float = LEVEL) -> dict | None:
    """Least squares y = a + b·x: b, its standard error and its two-sided ``level`` interval
    (Student's t with n - 2 degrees of freedom); None with fewer than 3 points."""
    from scipy import stats

    if len(x) < 3:
        return None
    fit = stats.linregress(x, y)
    t = float(stats.t.ppf(0.5 + level / 2, len(x) - 2))
    b, se = float(fit.slope), float(fit.stderr)
    return {
        "intercept": float(fit.intercept), "slope": b, "se": se, "level": level,
        "interval": [b - t * se, b + t * se], "r": float(fit.rvalue), "n": len(x),
    }  # fmt: skip


def transfer(cfg: ScalingConfig, *, say=print) -> dict:
    """Finetune each budget's best run (what is missing), fit accuracy against compute, write
    transfer.json and transfer.png; returns the result."""
    if cfg.transfer.finetune is None:
        raise ConfigurationError("the sweep has no `transfer.finetune` config")
    root = os.path.join(cfg.sweep_dir, "transfer")
    rows = []
    for b in best_runs(cfg.sweep_dir):
        ft = transfer_config(cfg, b["run"])
        say(f"\n=== transfer: {b['run']} (budget {b['budget']:.3g}, val_loss {b['loss']:.4f})")
        curve = run_curve(ft, say=say)
        p = curve["points"][0]
        rows.append({
            **b, "curve": curve_dir(ft), "examples": p["size"], "steps": p["steps"],
            "accuracy": p["arms"]["base"]["test_accuracy"],
            "scratch": p["arms"]["against"]["test_accuracy"],
            "difference": p["difference"], "se": p["se"], "verdict": p["verdict"],
            "test_examples": p["test_examples"], "majority": curve["majority"]["accuracy"],
        })  # fmt: skip
    x = [math.log10(r["flops"]) for r in rows]
    result = {
        "budgets": rows,
        "accuracy_per_decade": slope_fit(x, [r["accuracy"] for r in rows]),
        "gain_per_decade": slope_fit(x, [r["difference"] for r in rows]),
        "finetune": cfg.transfer.finetune,
    }
    replace_durable(
        os.path.join(root, "transfer.json"), (json.dumps(result, indent=1) + "\n").encode()
    )
    plot_transfer(result, os.path.join(root, "transfer.png"))
    return result


def transfer_lines(result: dict) -> list[str]:
    """The table and the fitted trend, as the sweep prints them."""
    rows = result["budgets"]
    n = rows[0]["test_examples"]
    lines = [
        f"transfer: each budget's best run finetuned on {rows[0]['examples']:,} labels for "
        f"{rows[0]['steps']} steps; test accuracy on {n:,} examples (majority "
        f"{rows[0]['majority']:.4f})",
        f"  {'budget':>8} {'run':<18} {'val_loss':>8}  {'pretrained':<16} {'scratch':<8} "
        "pretrained - scratch",
    ]
    for r in rows:
        se_acc = math.sqrt(r["accuracy"] * (1 - r["accuracy"]) / n)
        lines.append(
            f"  {r['flops']:>8.3g} {r['run']:<18} {r['loss']:>8.4f}  {r['accuracy']:.4f} ± "
            f"{se_acc:.4f}  {r['scratch']:.4f}   {100 * r['difference']:+.2f} ± "
            f"{100 * r['se']:.2f} points ({r['verdict']})"
        )
    for key, what in (("accuracy_per_decade", "test accuracy"), ("gain_per_decade", "the gain")):
        f = result[key]
        if f is None:
            lines.append(f"  {what}: fewer than 3 budgets, no trend fitted")
            continue
        lo, hi = f["interval"]
        lines.append(
            f"  {what} per decade of pretraining compute: {100 * f['slope']:+.2f} ± "
            f"{100 * f['se']:.2f} points ({100 * f['level']:.0f}% interval "
            f"[{100 * lo:+.2f}, {100 * hi:+.2f}]; {f['n']} budgets, r {f['r']:.2f})"
        )
    return lines


def plot_transfer(result: dict, path: str) -> None:
    """transfer.png: each budget's best validation loss against compute (the frontier the fit
    describes), and test accuracy against compute, pretrained and from scratch, with the fitted
    line."""
    rows = result["budgets"]
    c = np.array([r["flops"] for r in rows])
    n = rows[0]["test_examples"]
    fig, (left, right) = _figure(2, (10, 4))
    left.plot(c, [r["loss"] for r in rows], "o-", color="tab:purple")
    left.set(xscale="log", xlabel="pretraining FLOPs", ylabel="best validation loss (nats)",
             title="loss frontier (each budget's best run)")  # fmt: skip
    for key, colour, marker, label in (
        ("accuracy", "tab:blue", "o", "finetuned from the budget's best run"),
        ("scratch", "tab:gray", "s", "the same shape from random weights"),
    ):
        acc = np.array([r[key] for r in rows])
        right.errorbar(c, acc, yerr=np.sqrt(acc * (1 - acc) / n), color=colour, marker=marker,
                       linestyle="none", capsize=3, label=label)  # fmt: skip
    f = result["accuracy_per_decade"]
    if f is not None:
        xs = np.linspace(np.log10(c.min()), np.log10(c.max()), 50)
        right.plot(10**xs, f["intercept"] + f["slope"] * xs, color="tab:blue", alpha=0.6,
                   label=f"fit: {100 * f['slope']:+.1f} ± {100 * f['se']:.1f} points/decade")  # fmt: skip
    right.axhline(rows[0]["majority"], color="tab:red", linestyle=":", label="majority class")
    right.set(xscale="log", xlabel="pretraining FLOPs", ylabel="test accuracy",
              title=f"{rows[0]['examples']:,} labels, {rows[0]['steps']} steps")  # fmt: skip
    right.legend(fontsize=7)
    _save(fig, os.path.dirname(path), os.path.basename(path))
