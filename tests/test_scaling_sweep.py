"""`lmforge scaling sweep` and `lmforge scaling fit` end to end: a real IsoFLOP grid of tiny runs
on real text, killed mid-way and resumed, its report, and the fit command's errors.

The fits' mathematics are tested in tests/test_scaling_fit.py; the SLURM-array launcher in
tests/test_slurm.py.
"""

from __future__ import annotations

import csv
import json
import math
import os

import pytest
import yaml

from lmforge.launcher.cli import main
from tests.conftest import REPO, lmforge
from tests.runs import read_metrics

CHINCHILLA = os.path.join(REPO, "tests", "data", "chinchilla_svg_extracted.csv")


def sweep_config(path, data: str, runs: str, **extra) -> str:
    """Two budgets x three explicit sizes of 1-2 layer models: 8 to 84 steps each."""
    cfg = {
        "name": "tiny",
        "runs_dir": runs,
        "pretrain": {
            "data": {"path": data},
            "model": {"max_seq_len": 64},
            "train": {
                "seq_len": 64,
                "micro_batch_size": 8,
                "global_batch_tokens": 512,
                "precision": "fp32",
                "eval_interval": 0,
                "eval_samples": 16,
                "log_interval": 2,
            },
            "optim": {"lr": 3.0e-3},
            "checkpoint": {"interval": 4, "keep_last": 2},
            "logging": {"tensorboard": False, "progress": False, "plot": False},
        },
        "budgets": [8.0e8, 1.6e9],
        "sizes": {"explicit": [6000, 12000, 24000]},
        "shape": {"aspect_ratio": 16, "head_dim": 8},
        "min_steps": 8,
        "parallel": 2,
        "fit": {"bootstrap": 20, "target_flops": [1.0e11]},
        **extra,
    }
    with open(path, "w") as f:
        yaml.safe_dump(cfg, f)
    return str(path)


def _tiny_task(tmp_path) -> list[str]:
    """The sweep's transfer keys for a small slice of the bundled review task."""
    from lmforge.finetune.bundled import rotten_tomatoes

    out = str(tmp_path / "task")
    rotten_tomatoes(out)
    for name, n in (("train", 120), ("val", 32), ("test", 48)):
        with open(os.path.join(out, f"{name}.csv"), encoding="utf-8", newline="") as f:
            rows = list(csv.DictReader(f))[:n]
        with open(os.path.join(out, f"{name}-small.csv"), "w", encoding="utf-8", newline="") as f:
            w = csv.DictWriter(f, fieldnames=list(rows[0]))
            w.writeheader()
            w.writerows(rows)
    ft = {
        "name": "rt",
        "task": {
            "train": f"{out}/train-small.csv",
            "val": f"{out}/val-small.csv",
            "max_len": 48,
        },
        "train": {"micro_batch_size": 16, "global_batch_size": 16, "precision": "fp32"},
        "label_curve": {"test": f"{out}/test-small.csv"},
        "logging": {"tensorboard": False, "progress": False, "plot": False},
    }
    path = tmp_path / "ft.yaml"
    with open(path, "w") as f:
        yaml.safe_dump(ft, f)
    return [
        f"transfer.finetune={path}",
        "transfer.train_examples=40",
        "transfer.steps=3",
        "transfer.lrs=[3e-3]",
    ]


def _losses(run_dir: str) -> list[tuple[int, float]]:
    rows = read_metrics(run_dir)
    return [(r["step"], r["loss"] if r["kind"] == "train" else r["val_loss"]) for r in rows]


def test_sweep_trains_the_grid_resumes_after_a_kill_and_reports(tiny_data, tmp_path):
    runs = str(tmp_path / "runs")
    cfg = sweep_config(tmp_path / "sweep.yaml", tiny_data, runs)
    sweep_dir = os.path.join(runs, "tiny")

    # --dry-run: the grid, nothing written
    out = lmforge("scaling", "sweep", cfg, "--dry-run").stdout
    assert "6 runs" in out and "c8e8-L1-d8" in out and "pending" in out
    slurm = lmforge(
        "scaling", "sweep", cfg, "launcher=slurm", "slurm=[configs/slurm/local.yaml]", "--dry-run"
    ).stdout
    assert "one job array of 6 task(s)" in slurm
    assert not os.path.exists(sweep_dir)
    plan_names = [line.split()[1] for line in out.splitlines()[1:7]]

    # Every run is SIGKILLed at step 6 (after its checkpoint at step 4): the sweep says so.
    killed = lmforge("scaling", "sweep", cfg, env={"LMFORGE_FAULT": "step@6"}, check=False)
    assert killed.returncode != 0
    assert "6 run(s) failed" in killed.stderr and "run the sweep again" in killed.stderr
    with open(os.path.join(sweep_dir, "plan.json")) as f:
        plan = json.load(f)
    assert [p["name"] for p in plan["points"]] == plan_names
    for p in plan["points"]:
        assert os.path.isdir(os.path.join(sweep_dir, p["name"], "checkpoints", "step_00000004"))

    # Rerun: every run resumes from its checkpoint and finishes; then fit and report.
    resumed = lmforge("scaling", "sweep", cfg).stdout
    assert "0 finished, 6 to resume, 0 to start" in resumed
    assert "L(N, D) =" in resumed and "report:" in resumed
    for p in plan["points"]:
        log = open(os.path.join(sweep_dir, "logs", f"{p['name']}.log")).read()
        assert "resuming from" in log
        assert p["tokens"] == p["steps"] * 512 and p["flops"] == p["tokens"] * p["flops_per_token"]

    # A resumed point equals the same point trained without interruption, loss for loss.
    first = plan["points"][0]
    lmforge("pretrain", os.path.join(sweep_dir, "points", "0.yaml"), f"runs_dir={tmp_path}/ref")
    assert _losses(os.path.join(sweep_dir, first["name"])) == _losses(
        os.path.join(tmp_path, "ref", first["name"])
    )

    # The report: every point with its measured C, D and loss, the fit, the figures.
    report = os.path.join(sweep_dir, "report")
    with open(os.path.join(report, "points.csv")) as f:
        points = list(csv.DictReader(f))
    assert [r["run"] for r in points] == plan_names
    for row, p in zip(points, plan["points"], strict=True):
        assert float(row["D"]) == p["tokens"] and float(row["C"]) == pytest.approx(p["flops"])
        assert int(row["N"]) == p["params_non_embedding"]
    fit = json.load(open(os.path.join(report, "fit.json")))
    s = fit["surface"]
    assert s["n_points"] == 6 and set(s["ci"]) >= {"E", "alpha"}
    # the target's compute-optimal (N, D) and loss lie on the fitted L(N, D)
    t = fit["targets"][0]
    assert t["C"] == 1.0e11
    n, d = t["N"]["surface"], t["D"]["surface"]
    law = s["E"] + s["A"] / n ** s["alpha"] + s["B"] / d ** s["beta"]
    assert t["loss"]["surface"] == pytest.approx(law, rel=1e-9)
    md = open(os.path.join(report, "report.md")).read()
    assert "L(N, D) = E + A / N^α + B / D^β" in md and "N = parameters without" in md
    for png in ("loss_vs_flops.png", "isoflop.png", "surface.png", "residuals.png"):
        assert os.path.getsize(os.path.join(report, png)) > 10_000

    # A third run trains nothing.
    again = lmforge("scaling", "sweep", cfg).stdout
    assert "6 finished, 0 to resume, 0 to start" in again and "[1/" not in again

    # The transfer step: each budget's best run (lowest final val_loss) finetuned on 40 labels
    # from its weights and from random ones; the figures are its label curves'.
    task = _tiny_task(tmp_path)
    out = lmforge("scaling", "sweep", cfg, *task).stdout
    with open(os.path.join(sweep_dir, "transfer", "transfer.json")) as f:
        result = json.load(f)
    assert [r["budget"] for r in result["budgets"]] == [8.0e8, 1.6e9]
    for r in result["budgets"]:
        same = [p for p in plan["points"] if p["budget"] == r["budget"]]
        finals = {
            p["name"]: [
                x for x in read_metrics(os.path.join(sweep_dir, p["name"])) if x["kind"] == "eval"
            ][-1]["val_loss"]
            for p in same
        }
        assert r["run"] == min(finals, key=finals.get) and r["loss"] == finals[r["run"]]
        with open(os.path.join(r["curve"], "label_curve.json")) as f:
            curve = json.load(f)["points"][0]
        assert curve["size"] == r["examples"] == 40 and curve["steps"] == r["steps"] == 3
        assert r["accuracy"] == curve["arms"]["base"]["test_accuracy"]
        assert r["scratch"] == curve["arms"]["against"]["test_accuracy"]
        assert f"{r['run']:<18}" in out
    assert result["accuracy_per_decade"] is None  # two budgets: no trend
    assert "test accuracy: fewer than 3 budgets, no trend fitted" in out
    assert os.path.getsize(os.path.join(sweep_dir, "transfer", "transfer.png")) > 10_000

    # Changing a started run's settings under the same name is refused, nothing written.
    before = open(os.path.join(sweep_dir, "points", "0.yaml")).read()
    changed = lmforge("scaling", "sweep", cfg, "pretrain.optim.lr=1e-3", check=False)
    assert changed.returncode == 2
    assert "was started with another config" in changed.stderr
    assert len(changed.stderr.strip().splitlines()) == 1
    assert open(os.path.join(sweep_dir, "points", "0.yaml")).read() == before


def test_fit_command_on_chinchilla_csv_excludes_outliers_and_predicts(tmp_path):
    """`lmforge scaling fit CSV`: Besiroglu et al.'s refit through the command, with the
    excluded points named in the report."""
    out = str(tmp_path / "report")
    res = lmforge(
        "scaling", "fit", CHINCHILLA, "--exclude-highest", "5", "--bootstrap", "10",
        "--target-flops", "5.76e23", "--out", out,
    )  # fmt: skip
    assert "target 5.76e23: loss " in res.stdout
    # 230 distinct C: the 9 budgets of Chinchilla's IsoFLOP profiles, the 101 runs between none
    assert res.stdout.startswith("budgets: 9 (") and "; 101 points in none" in res.stdout
    fit = json.load(open(os.path.join(out, "fit.json")))
    isoflops = [6e18, 1e19, 3e19, 6e19, 1e20, 3e20, 6e20, 1e21, 3e21]  # Hoffmann et al. fig. 3
    assert [m["C"] for m in fit["minima"]] == pytest.approx(isoflops, rel=0.1)
    with open(os.path.join(out, "points.csv")) as f:
        assert sum(row["budget"] == "" for row in csv.DictReader(f)) == 101
    s = fit["surface"]
    assert s["n_points"] == 240 and len(s["excluded"]) == 5
    assert s["E"] == pytest.approx(1.8172, rel=0.03) and s["alpha"] == pytest.approx(
        0.3478, rel=0.03
    )
    target = fit["targets"][0]
    assert 15 < target["D"]["surface"] / target["N"]["surface"] < 25
    assert 15 < target["best_D"] / target["best_N"] < 25
    md = open(os.path.join(out, "report.md")).read()
    assert "5 highest-loss excluded" in md and "row " in md


@pytest.mark.parametrize(
    ("rows", "args", "message"),
    [
        ("N,D,loss\n" + "".join(f"{n},{n * 20},3.0\n" for n in (1e6, 2e6, 4e6, 8e6)), [], "at least 6"),
        ("N,D,loss\n1e6,2e7,nan\n" + "".join(f"{n},{n * 20},3.0\n" for n in range(2, 9)), [], "nan"),
        ("N,D,loss\n0,2e7,3.0\n" + "".join(f"{n},{n * 20},3.0\n" for n in range(2, 9)), [], "N"),
        ("params,loss\n1e6,3.0\n", [], "two of"),
        (
            "N,D,loss\n" + "".join(f"{n},{n * 20},3.0\n" for n in range(1, 9)),
            ["--budget-tolerance", "1.5"],
            "`fit.budget_tolerance` (--budget-tolerance) must be in [0, 1), got 1.5 (e.g. 0.2",
        ),
    ],
    ids=["too-few-points", "nan-loss", "non-positive-N", "missing-column", "budget-tolerance"],
)  # fmt: skip
def test_fit_command_bad_inputs_are_one_line_errors(tmp_path, capsys, rows, args, message):
    """In-process, as the command's handler sees them: one line on stderr, exit 2, no report."""
    path = tmp_path / "points.csv"
    path.write_text(rows)
    out = tmp_path / "report"
    code = main(["scaling", "fit", str(path), "--out", str(out), *args])
    err = capsys.readouterr().err
    assert code == 2, err
    assert len(err.strip().splitlines()) == 1 and message in err
    assert not out.exists()


def test_sweep_config_errors_are_one_line(tiny_data, tmp_path, capsys):
    """In-process, as the command's handler sees them: one line on stderr, exit 2."""
    cfg = sweep_config(tmp_path / "sweep.yaml", tiny_data, str(tmp_path / "runs"))
    for args, message in [
        (["pretrain.model.n_layer=4"], "set by the sweep for each point"),
        (["fit.holdout=[1e20]"], "not in `budgets`"),
        (["budgets=[-1.0]"], "FLOPs > 0"),
        (["sizes.spacing=1"], "sizes.spacing > 1"),
        (["pretrain.data.path=/nonexistent"], "no prepared data"),
        (["budgets=[1.0e3]"], "every point of the sweep was left out"),
        (["early_stop=0.3", "launcher=slurm"], "use it with launcher=local"),
        (["early_stop=1.5"], "`early_stop` must be in [0, 1)"),
    ]:
        code = main(["scaling", "sweep", cfg, *args, "--dry-run"])
        err = capsys.readouterr().err
        assert code == 2 and message in err, (args, err)
        assert len(err.strip().splitlines()) == 1


def test_plan_follows_the_width_depth_rule_and_matches_the_schedule_to_d(tiny_data, tmp_path):
    """Each point: the documented shape rule, D = C / FLOPs-per-token in whole steps, the run's
    own schedule length and warmup, and the learning rate scaled by width."""
    from omegaconf import OmegaConf

    from lmforge.pretrain.config.schema import ModelConfig, load_config
    from lmforge.pretrain.model.flops import flops_per_token, param_counts
    from lmforge.scaling.config import ScalingConfig
    from lmforge.scaling.grid import make_grid

    path = sweep_config(tmp_path / "sweep.yaml", tiny_data, str(tmp_path / "runs"))
    cfg = load_config(
        ScalingConfig,
        [path, "lr_width_exponent=1.0", "lr_reference_width=16", "warmup_fraction=0.25"],
    )
    plan = make_grid(cfg)
    assert len(plan.points) == 6
    for p in plan.points:
        run = OmegaConf.create(p.config)
        # depth from the aspect ratio (16), width a multiple of head_dim (8) nearest the target
        assert p.n_layer == max(1, round((p.target_params / (12 * 16**2)) ** (1 / 3)))
        assert p.d_model % 8 == 0 and p.n_head == p.d_model // 8

        def count(d: int, n_layer: int = p.n_layer) -> int:
            model = ModelConfig(n_layer=n_layer, d_model=d, n_head=d // 8, vocab_size=512)
            return param_counts(model)["non_embedding"]

        nearest = min(range(8, 400, 8), key=lambda d: abs(math.log(count(d) / p.target_params)))
        assert p.d_model == nearest and p.params == count(p.d_model)
        shaped = ModelConfig(**{**OmegaConf.to_container(run.model), "vocab_size": 512})
        assert (shaped.n_layer, shaped.d_model, shaped.n_head) == (p.n_layer, p.d_model, p.n_head)
        assert flops_per_token(shaped, 64) == p.flops_per_token
        # D = C / FLOPs-per-token in whole steps of 512 tokens; the schedule is the run's own
        assert run.train.max_steps == p.steps == round(p.budget / (p.flops_per_token * 512))
        assert p.tokens == p.steps * 512 and abs(p.flops / p.budget - 1) <= 0.5 / p.steps
        assert run.optim.warmup_steps == round(0.25 * p.steps)
        assert run.optim.lr == pytest.approx(3.0e-3 * 16 / p.d_model)
        assert run.name == p.name and run.runs_dir == os.path.join(str(tmp_path / "runs"), "tiny")


def test_fit_command_on_an_isoflop_grid_predicts_the_held_out_budget(tmp_path):
    """A CSV IsoFLOP grid drawn from a known L(N, D) (C = 6ND, 0.3% noise) whose C are all
    different (within ±5% of the budget), its largest budget held out: the budgets found,
    minima, allocation, both frontier forms with the backtest, the surface, and the held-out
    prediction, through the command."""
    import numpy as np

    from lmforge.scaling.fit import SurfaceFit

    law = SurfaceFit(E=2.0, A=400.0, B=1500.0, alpha=0.34, beta=0.30, objective=0.0, n_points=0)
    rng = np.random.default_rng(0)
    budgets = np.logspace(18, 21, 6)
    path = tmp_path / "grid.csv"
    with open(path, "w") as f:
        f.write("run,params,tokens,flops,loss\n")
        for c in budgets:
            n_star = law.optimal(c)[0]
            for k, n in enumerate(n_star * np.logspace(-0.6, 0.6, 5)):
                ck = c * rng.uniform(0.95, 1.05)
                d = ck / (6 * n)
                loss = law.predict(n, d) * math.exp(rng.normal(0, 0.003))
                f.write(f"c{c:.0e}-{k},{n:.6g},{d:.6g},{ck:.6g},{loss:.6f}\n")
    out = str(tmp_path / "report")
    res = lmforge(
        "scaling", "fit", str(path), "--holdout", f"{budgets[-1]:.6g}", "--bootstrap", "50",
        "--target-flops", "1e23", "--out", out,
    )  # fmt: skip
    assert "[chosen]" in res.stdout
    assert res.stdout.startswith("budgets: 6 (a budget is at least 3 points whose C lie within ")
    fit = json.load(open(os.path.join(out, "fit.json")))
    assert fit["budgets"]["points_in_none"] == 0 and len(fit["budgets"]["found"]) == 6
    assert len(fit["minima"]) == 6 and [m["held_out"] for m in fit["minima"]] == [False] * 5 + [
        True
    ]
    assert fit["allocation"]["a"] == pytest.approx(0.30 / 0.64, abs=0.05)
    assert fit["surface"]["n_points"] == 25 and fit["surface"]["E"] == pytest.approx(2.0, rel=0.05)
    (check,) = fit["holdout"]
    true_best = law.optimal(budgets[-1])[2]
    assert check["measured_minimum"] == pytest.approx(true_best, rel=0.01)
    assert abs(check["best_error"]) < 0.01 and abs(check["error"]["surface"]) < 0.01
    # every form was backtested on the fitted budgets (3rd to 5th), and the best one predicts
    bt = fit["backtest"]
    assert [s["C"] for s in bt["steps"]] == pytest.approx(budgets[2:5].tolist(), rel=0.06)
    assert set(bt["loss_score"]) == {"frontier", "power", "surface"}
    assert fit["choice"] == min(bt["loss_score"], key=bt["loss_score"].get)
    lo, hi = check["best_interval"]
    assert lo < check["best_loss"] < hi
    target = fit["targets"][0]
    n_star, d_star, l_star = law.optimal(1e23)
    assert target["N"]["surface"] == pytest.approx(n_star, rel=0.5)
    assert target["loss"]["surface"] == pytest.approx(l_star, rel=0.02)
    assert target["best_loss"] == pytest.approx(l_star, rel=0.02)
    md = open(os.path.join(out, "report.md")).read()
    assert "## Which form predicts: the backtest" in md and "## Compute frontier with E = 0" in md
    assert "## Budget minima" in md and "| held out |" in md


def test_transfer_slope_against_a_hand_computation():
    """The accuracy-per-decade fit: least squares with Student's t interval (n - 2 dof)."""
    from lmforge.scaling.transfer import slope_fit

    # x 0..3, y 1, 3, 2, 5: Sxy 5.5, Sxx 5 -> slope 1.1, intercept 1.1; residuals -0.1, 0.8,
    # -1.3, 0.6 -> SSE 2.7, s^2 1.35, SE sqrt(1.35 / 5); t(0.95, 2 dof) = 2.919986
    f = slope_fit([0, 1, 2, 3], [1, 3, 2, 5])
    se = math.sqrt(1.35 / 5)
    assert f["slope"] == pytest.approx(1.1) and f["intercept"] == pytest.approx(1.1)
    assert f["se"] == pytest.approx(se)
    assert f["interval"] == pytest.approx([1.1 - 2.919986 * se, 1.1 + 2.919986 * se], rel=1e-6)
    assert slope_fit([0, 1], [1, 2]) is None
