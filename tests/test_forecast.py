"""A run's forecast of itself (pretrain/forecast/): the block and forecast.json before the first
step (a run and `--dry-run`), the refits while it runs, the warning when a run that plateaus
leaves its band, the actuals, the errors and the ledger line at the end, the next run of the same
shape forecasting from the ledger, and `lmforge runs --forecasts` on runs with known errors."""

from __future__ import annotations

import json
import os

import pytest

from lmforge.launcher.cli import main
from lmforge.pretrain.config.schema import PretrainConfig, load_config
from lmforge.pretrain.forecast.ledger import key_hash, ledger_path, read_ledger
from lmforge.pretrain.forecast.summary import collect, summarize
from lmforge.pretrain.train.loop import Callback
from tests.conftest import lmforge
from tests.runs import TINY, read_metrics


def _forecast(run_dir: str) -> dict:
    with open(os.path.join(run_dir, "forecast.json")) as f:
        return json.load(f)


def test_a_run_forecasts_itself_refits_and_is_held_to_it(reference_runs):
    """The shared 14-step reference run (eval every 5, a checkpoint every 4): the forecast it
    made before its first step, the refit from its own curve, what it measured, the errors and
    its ledger line."""
    run = reference_runs(1, "fp32")
    fc = _forecast(run)
    assert fc["dry_run"] is False and fc["total_steps"] == 14 and fc["from_step"] == 0
    assert fc["memory"]["device"] == "cpu" and fc["memory"]["peak_bytes"] > 0
    assert fc["memory"]["peak_bytes"] > fc["memory"]["estimate_bytes"]  # + runtime, heap
    assert fc["speed"]["step_seconds"] > 0 and fc["speed"]["source"] in ("peak", "ledger")
    wall = fc["wall"]
    assert (wall["steps"], wall["evals"], wall["saves"]) == (14, 3, 4)  # evals 5, 10, 14
    assert wall["seconds"] == pytest.approx(sum(wall["parts"].values()))
    assert fc["loss"]["value"] is None and "first forecast at 20%" in fc["loss"]["note"]

    # refitted at the evaluations before the last (at step 5 only with the shared parameters
    # of finished sibling runs: the reference runs of a session share a directory; after it,
    # at step 10 only if the 1% share of the training time allows another)
    updates = fc["updates"]
    assert [u["step"] for u in updates] in ([10], [5], [5, 10])
    for u in updates:
        assert u["method"] == ("shared" if fc["siblings"] else "lone")
        assert u["of"] == "val_loss" and u["low"] <= u["value"] <= u["high"]
        (row,) = [r for r in read_metrics(run) if r["kind"] == "eval" and r["step"] == u["step"]]
        assert row["forecast"] == u["value"] and row["forecast_of"] == "val_loss"
    update = updates[-1]

    actual = fc["actual"]
    assert actual["complete"] and actual["step"] == 14
    assert (actual["evals"], actual["saves"]) == (3, 4)
    assert actual["peak_bytes"] > 0 and actual["step_seconds"] > 0 and actual["wall_seconds"] > 0
    final = [r for r in read_metrics(run) if r["kind"] == "eval"][-1]
    assert actual["val_loss"] == final["val_loss"]
    errors = fc["errors"]
    assert errors["step_seconds"] == pytest.approx(
        fc["speed"]["step_seconds"] / actual["step_seconds"] - 1
    )
    assert len(errors["loss"]) == len(updates)
    loss = errors["loss"][-1]
    assert loss["error"] == pytest.approx(update["value"] / final["val_loss"] - 1)
    assert loss["inside"] == (update["low"] <= final["val_loss"] <= update["high"])
    assert 0 <= actual["overhead"] < 1

    (line,) = [
        r
        for r in read_ledger(ledger_path(os.path.dirname(run)))
        if r["run"] == os.path.basename(run)
    ]
    assert line["key_hash"] == key_hash(fc["key"])
    assert (line["steps"], line["evals"], line["saves"]) == (14, 3, 4)
    assert line["step_seconds"] == actual["step_seconds"]
    assert line["mean_step_seconds"] == actual["mean_step_seconds"] > 0


def _tiny(data: str, runs: str, name: str, *extra: str) -> PretrainConfig:
    return load_config(
        PretrainConfig,
        [
            f"data.path={data}",
            f"runs_dir={runs}",
            f"name={name}",
            *TINY,
            "train.max_steps=40",
            "train.eval_interval=4",
            "optim.lr=1e-2",
            "optim.warmup_steps=2",
            "checkpoint.interval=0",
            "forecast.max_overhead=1",  # a refit at every evaluation, however short the steps
            *extra,
        ],
    )


class Plateau(Callback):
    """From ``step`` on the learning rate is 0: the loss stops falling (a run gone flat)."""

    def __init__(self, step: int) -> None:
        self.step = step

    def on_step_end(self, trainer) -> None:
        if trainer.state.step == self.step:
            trainer.scheduler.base_lrs = [0.0 for _ in trainer.scheduler.base_lrs]


def test_a_run_that_plateaus_is_told_once_and_the_next_run_reads_the_ledger(
    tiny_data, tmp_path, capsys
):
    """Run A trains normally; run B, the same config held to a law made from A's final loss
    (+-2%), goes flat at 20% of its steps: its forecast leaves the law's band and says so once,
    and its step time and peak memory come from A's ledger line (same shape, layout and
    hardware)."""
    from lmforge.pretrain.run.pretraining import run_pretrain

    runs = str(tmp_path / "runs")
    run_pretrain(_tiny(tiny_data, runs, "a"))
    a = _forecast(os.path.join(runs, "a"))
    assert "warning" not in a and a["speed"]["source"] == "peak"
    v = a["actual"]["val_loss"]
    law = [
        f"forecast.law.loss={v}",
        f"forecast.law.low={0.98 * v}",
        f"forecast.law.high={1.02 * v}",
    ]
    capsys.readouterr()
    run_pretrain(
        _tiny(tiny_data, runs, "b", *law, "forecast.law.source=run a"), callbacks=[Plateau(8)]
    )
    out = capsys.readouterr().out
    b = _forecast(os.path.join(runs, "b"))
    assert b["speed"]["source"] == "ledger" and "(a)" in b["speed"]["detail"]
    assert b["memory"]["source"] == "ledger"
    assert b["memory"]["peak_bytes"] == pytest.approx(a["actual"]["peak_bytes"])
    assert b["loss"]["value"] == v and "run a" in out  # the law, printed before the first step
    warnings = [ln for ln in out.splitlines() if ln.startswith("warning: final val_loss now")]
    assert len(warnings) == 1 and "above the law's (run a)" in warnings[0]
    assert b["warning"]["line"] in warnings[0]
    assert b["updates"][-1]["value"] > 1.02 * v  # it stayed above
    assert [e for e in b["errors"]["loss"] if e["fraction"] == 0.0][0]["inside"] is False


def test_dry_run_prints_and_writes_the_forecast_only(tiny_data, tmp_path):
    """--dry-run: the block, and forecast.json the one file in the run directory; with --probe
    the steps it measured (a scratch run) go to the ledger, and the forecast reads them."""
    runs = tmp_path / "runs"
    args = [f"data.path={tiny_data}", f"runs_dir={runs}", "name=d", *TINY, "train.max_steps=20"]
    out = lmforge("pretrain", *args, "--dry-run").stdout
    assert "# forecast (80% intervals; forecast.json):" in out and "#   wall time:" in out
    assert os.listdir(runs) == ["d"] and os.listdir(runs / "d") == ["forecast.json"]
    fc = _forecast(str(runs / "d"))
    assert fc["dry_run"] is True and fc["wall"]["steps"] == 20 and not fc["updates"]
    assert fc["speed"]["source"] == "peak"

    out = lmforge("pretrain", *args, "--dry-run", "--probe", "--probe-steps", "4").stdout
    (line,) = read_ledger(ledger_path(str(runs)))
    assert line["probe"] is True and line["steps"] == 4 and line["key_hash"] == key_hash(fc["key"])
    assert f"probe: 4 steps of {line['step_seconds']:.3g} s each" in out
    fc = _forecast(str(runs / "d"))
    assert fc["speed"]["source"] == "probe" and fc["speed"]["step_seconds"] == line["step_seconds"]
    assert os.listdir(runs / "d") == ["forecast.json"]


def _synthetic(runs: str, name: str, *, memory: float, step: float, losses: list[tuple]) -> None:
    """A finished run's forecast.json whose errors are known: memory and step time forecast at
    (1 + error) x the measured 1 GiB and 1 s; each loss forecast (fraction, value, low, high)
    against a measured val_loss of 2.0."""
    made = [
        {"fraction": f, "of": "val_loss", "error": value / 2.0 - 1, "inside": low <= 2.0 <= high}
        for f, value, low, high in losses
    ]
    fc = {
        "speed": {"source": "ledger"},
        "memory": {"device": "cpu"},
        "actual": {"overhead": 0.001},
        "errors": {"memory": memory, "step_seconds": step, "wall_seconds": step, "loss": made},
    }
    os.makedirs(os.path.join(runs, name))
    with open(os.path.join(runs, name, "forecast.json"), "w") as f:
        json.dump(fc, f)


def test_runs_forecasts_gives_known_errors_and_coverage(tmp_path, capsys):
    runs = str(tmp_path / "runs")
    _synthetic(
        runs, "r1", memory=0.10, step=-0.05, losses=[(0.0, 2.1, 2.0, 2.2), (0.3, 2.02, 1.9, 2.1)]
    )
    _synthetic(
        runs, "r2", memory=-0.20, step=0.02, losses=[(0.0, 2.3, 2.2, 2.4), (0.25, 2.04, 1.95, 2.1)]
    )
    _synthetic(
        runs,
        "sweep/r3",
        memory=0.04,
        step=0.01,
        losses=[(0.3, 1.9, 1.8, 1.95), (0.5, 2.0, 1.9, 2.1)],
    )
    fcs = collect(runs)
    assert len(fcs) == 3
    rows = {r.what: r for r in summarize(fcs)}
    mem = rows["memory (cpu, from the estimate)"]
    assert mem.median == pytest.approx(0.10) and mem.worst == pytest.approx(-0.20)
    assert rows["step time (from the ledger)"].median == pytest.approx(0.02)
    law = rows["final loss, before the run (law)"]
    assert law.errors == pytest.approx([0.05, 0.15]) and law.coverage == 0.5
    at30 = rows["final loss, from 30% of the steps"]  # the newest refit in (20%, 30%] of each
    assert sorted(at30.errors) == pytest.approx(
        [-0.05, 0.01, 0.02]
    ) and at30.coverage == pytest.approx(2 / 3)
    assert rows["final loss, from 50% of the steps"].errors == pytest.approx([0.0])

    assert main(["runs", "--forecasts", runs]) == 0
    out = capsys.readouterr().out
    assert "forecasts of 3 finished run(s)" in out and "1/2 50%" in out
    assert os.path.isfile(os.path.join(runs, "forecasts.png"))
