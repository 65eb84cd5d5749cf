"""The loss-curve law of pretrain/forecast/curve.py: predictions from part of synthetic curves drawn from
the law (cosine and wsd schedules, with noise), the shared-parameter path, and `lmforge runs
--predict` / `--predict-check` on run directories written here (no training)."""

from __future__ import annotations

import json
import os

import numpy as np
import pytest
import yaml

from lmforge.launcher.cli import main
from lmforge.pretrain.forecast.curve import Fit, check_sweep, load_curve, predict
from tests.conftest import lmforge

LAW = {"a": 3.0, "alpha": 0.4, "c": 0.3, "tau": 0.2}  # c = C of the law, tau its memory


def law_for_width(d: int) -> dict:
    """The law of a run of width d with lr = 1e-3 * 64 / d: alpha and ln A linear in ln d, and
    A scaled by lr^-alpha (S1 in absolute learning rate), the form the sweep path fits."""
    z = np.log(d / 64)
    alpha = LAW["alpha"] + 0.05 * z
    a = LAW["a"] * np.exp(0.3 * z) * (64 / d) ** (-alpha)
    return {"a": a, "alpha": alpha, "c": LAW["c"] * a / LAW["a"], "tau": LAW["tau"], "d": d}


def write_run(
    run_dir: str,
    *,
    steps: int = 1000,
    schedule: str = "cosine",
    l0: float = 2.5,
    noise: float = 0.01,
    upto: float = 1.0,
    seed: int = 0,
    evals: bool = False,
    law: dict | None = None,
) -> float:
    """A run directory whose train rows follow the law (plus noise) up to ``upto`` of its
    steps; returns the noiseless final row."""
    os.makedirs(run_dir, exist_ok=True)
    cfg = {
        "name": os.path.basename(run_dir),
        "data": {"path": "data/none"},
        "train": {"max_steps": steps, "log_interval": 10},
        "optim": {
            "lr": 1e-3 * 64 / law["d"] if law else 1e-3,
            "schedule": schedule,
            "warmup_steps": steps // 20,
            "min_lr_ratio": 0.1,
            "decay_fraction": 0.2,
        },
    }
    if law:
        cfg["model"] = {"d_model": law["d"], "n_head": 1}
    law = law or LAW
    with open(os.path.join(run_dir, "config.yaml"), "w") as f:
        yaml.safe_dump(cfg, f)
    with open(os.path.join(run_dir, "metrics.jsonl"), "w"):
        pass
    curve = load_curve_schedule(run_dir)
    law = Fit(l0, law["a"], law["alpha"], law["c"], law["tau"]).law(curve)
    rng = np.random.default_rng(seed)
    ends = [*range(10, steps, 10), steps]
    rows, prev = [], 0
    for end in ends:
        if end > upto * steps:
            break
        clean = float(np.mean(law[prev:end]))
        rows.append({"kind": "train", "step": end, "loss": clean + rng.normal(0, noise)})
        if evals and end % 100 == 0:
            rows.append({"kind": "eval", "step": end, "val_loss": clean + 0.05})
        prev = end
    with open(os.path.join(run_dir, "metrics.jsonl"), "w") as f:
        f.writelines(json.dumps(r) + "\n" for r in rows)
    return float(np.mean(law[ends[-2] : steps]))


def load_curve_schedule(run_dir: str):
    """The schedule of a run directory with no rows yet (a one-row stand-in curve)."""
    with open(os.path.join(run_dir, "metrics.jsonl"), "w") as f:
        f.write(json.dumps({"kind": "train", "step": 1, "loss": 9.0}) + "\n")
    return load_curve(run_dir)


@pytest.mark.parametrize("steps", [600, 2000])
def test_lone_cosine_run_from_half(tmp_path, steps):
    """A lone run (no sweep next to it): all four parameters from its first half; within 3% of
    the law's final row, and the bootstrap interval covers it. (From 30% a lone curve does not
    pin alpha and C down: docs/predict.md; the shared path below is the one for 30%.)"""
    run = str(tmp_path / "lone")
    truth = write_run(run, steps=steps, noise=0.005, upto=0.5)
    pred = predict(run)
    assert pred.shared is None
    assert abs(pred.train / truth - 1) < 0.03, (pred.train, truth)
    assert pred.low <= truth <= pred.high, (pred.low, truth, pred.high)
    assert pred.from_step == steps // 2


@pytest.mark.parametrize("schedule", ["cosine", "wsd"])
def test_shared_parameters_from_a_sweep(tmp_path, schedule):
    """Five finished runs of a sweep (different lengths, L0, widths and learning rates) supply
    alpha and A as functions of width, C/A and the momentum memory; a sixth, of a width between
    theirs and stopped at 30%, fits only its L0. On wsd nothing has annealed at 30%, so the
    annealing term can only come from the others. Within 1%, interval covers."""
    sweep = tmp_path / "sweep"
    runs = [(500, 2.2, 32), (800, 2.4, 64), (1200, 2.6, 128), (700, 2.8, 64), (1500, 2.3, 32)]
    for i, (steps, l0, d) in enumerate(runs):
        law = law_for_width(d)
        write_run(str(sweep / f"r{i}"), steps=steps, l0=l0, schedule=schedule, seed=i, law=law)
    law = law_for_width(48)
    truth = write_run(
        str(sweep / "new"), steps=1000, l0=2.5, schedule=schedule, upto=0.3, seed=9, law=law
    )
    pred = predict(str(sweep / "new"))
    assert pred.shared is not None and len(pred.shared.runs) == 5
    assert abs(pred.fit.alpha - law["alpha"]) < 0.1, (pred.fit.alpha, law["alpha"])
    assert pred.shared.alpha_slope != 0 and "per ln d_model" in pred.shared.describe()
    assert abs(pred.train / truth - 1) < 0.01, (pred.train, truth)
    assert pred.low <= truth <= pred.high, (pred.low, truth, pred.high)
    rows, medians = check_sweep(str(sweep), [0.3, 0.5])
    assert {r[0] for r in rows} == {f"r{i}" for i in range(5)}  # the unfinished run is left out
    assert medians[0.3] < 0.01 and medians[0.5] < 0.01, medians


def test_val_offset_from_periodic_evals(tmp_path):
    run = str(tmp_path / "evals")
    write_run(run, steps=1000, upto=0.4, evals=True)  # val_loss = train loss + 0.05 (+ noise)
    pred = predict(run)
    assert pred.val is not None and abs(pred.val - pred.train - 0.05) < 0.02
    assert pred.val_low <= pred.val <= pred.val_high


def test_cli_predict_and_bad_input(tmp_path, capsys):
    """`lmforge runs NAME --predict[-from]` on run directories written here (a real process);
    bad input (in-process, as the command's handler sees it): one line, non-zero exit, no
    figure."""
    runs = tmp_path / "runs"
    write_run(str(runs / "done"), steps=600, seed=3)
    out = lmforge("runs", "done", "--runs-dir", str(runs), "--predict", "--predict-from", "0.3")
    text = out.stdout
    assert "predicted final train loss" in text and "from step 180 (30% of the run)" in text
    assert "arXiv:2408.11029" in text and "measured final train loss" in text
    assert "shared: nothing" in text and "lone method" in text
    assert os.path.getsize(runs / "done" / "predict.png") > 1000

    write_run(str(runs / "partial"), steps=600, upto=0.5, seed=4)
    (runs / "empty").mkdir()
    (runs / "empty" / "config.yaml").write_text((runs / "done" / "config.yaml").read_text())
    (runs / "evalonly").mkdir()
    (runs / "evalonly" / "config.yaml").write_text((runs / "done" / "config.yaml").read_text())
    (runs / "evalonly" / "metrics.jsonl").write_text(
        '{"kind": "eval", "step": 10, "val_loss": 3}\n'
    )
    cases = [
        (["empty", "--predict"], "has not started"),
        (["evalonly", "--predict"], "has no train rows"),
        (["done", "--predict", "--predict-from", "1.5"], "--predict-from 1.5"),
        (["done", "--predict", "--predict-from", "0"], "in (0, 1)"),
        (["partial", "--predict", "--predict-from", "0.3"], "has not finished"),
        (["done", "--predict-from", "0.3"], "add --predict"),
        (["done", "partial", "--predict"], "one run"),
        (["--predict-check", str(runs), "--fractions", "0.3,2"], "--fractions 0.3,2"),
        (["--predict-check", str(runs / "nope")], "not a directory"),
    ]
    for args, expected in cases:
        try:
            code = main(["runs", *args, "--runs-dir", str(runs)])
        except SystemExit as exc:  # argparse
            code = exc.code
        err = capsys.readouterr().err.strip()
        assert code != 0 and expected in err and len(err.splitlines()) == 1, (args, err)
    for name in ("empty", "evalonly", "partial"):
        assert not (runs / name / "predict.png").exists()
