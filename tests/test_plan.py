"""`lmforge plan`: from a budget and a law to a ready pretrain config (scaling/planner.py).

The law comes from the demo sweep's measured points (tests/data/scaling_demo_points.csv, its
held-out budget left out) or from published constants; the data is the tests' four prepared
plays. The planned run is checked against the fit it came from, the width/depth rule, the
batch/learning-rate rule and the memory estimate; --probe measures real steps.
"""

from __future__ import annotations

import csv
import json
import math
import os

import pytest

from lmforge.launcher.cli import main
from lmforge.pretrain.config.schema import ModelConfig, PretrainConfig, load_config
from lmforge.pretrain.model.flops import flops_per_token
from lmforge.scaling.analysis import analyse
from lmforge.scaling.config import ShapeConfig, SweepFitConfig
from lmforge.scaling.fit import SurfaceFit
from lmforge.scaling.grid import shape_for
from lmforge.scaling.planner import DEEPSEEK_BATCH, DEEPSEEK_LR, PUBLISHED, effective_tokens
from lmforge.scaling.sources import load_sources

DATA = os.path.join(os.path.dirname(__file__), "data")
BASE = [
    "model.max_seq_len=128",
    "model.tie_embeddings=false",
    "train.seq_len=128",
    "train.micro_batch_size=16",
    "train.precision=fp32",
]


def _run(argv: list[str], capsys) -> tuple[int, str, str]:
    try:
        code = main(argv)
    except SystemExit as exc:  # argparse
        code = exc.code if isinstance(exc.code, int) else 1
    out, err = capsys.readouterr()
    return code, out, err


@pytest.fixture(scope="module")
def fitted_points(tmp_path_factory) -> str:
    """The demo sweep's points without its held-out budget (the plan must not see it)."""
    path = str(tmp_path_factory.mktemp("points") / "points.csv")
    with open(os.path.join(DATA, "scaling_demo_points.csv")) as f, open(path, "w") as out:
        rows = list(csv.DictReader(f))
        w = csv.DictWriter(out, fieldnames=list(rows[0]))
        w.writeheader()
        w.writerows(r for r in rows if r["held_out"] == "0")
    return path


def test_plan_from_a_fit_writes_the_run_its_law_and_rules_give(
    tiny_data, fitted_points, tmp_path, capsys
):
    C = 4.8e12
    out = str(tmp_path / "plan")
    code, stdout, err = _run(
        ["plan", *BASE, f"data.path={tiny_data}", "--flops", str(C), "--fit", fitted_points,
         "--head-dim", "16", "--aspect-ratio", "32", "--out", out, "--probe"],
        capsys,
    )  # fmt: skip
    assert code == 0, err
    doc = json.load(open(os.path.join(out, "plan.json")))
    run = load_config(PretrainConfig, [os.path.join(out, "pretrain.yaml")])

    # N*, D* and the loss are those `lmforge scaling fit` predicts at C from the same points
    (target,) = analyse(load_sources([fitted_points], "non_embedding"), SweepFitConfig(), [C])[
        "result"
    ]["targets"]
    assert doc["N_law"] == pytest.approx(target["best_N"], rel=1e-9)
    assert doc["loss"] == pytest.approx(target["best_loss"], rel=1e-9)
    lo, hi = doc["loss_interval"]
    assert lo < doc["loss"] < hi
    law = run.forecast.law  # the run is held to the plan: its law, the interval brought to 80%
    assert law.loss == pytest.approx(doc["loss"]) and lo < law.low < law.loss < law.high < hi
    assert law.source.startswith("the plan at 4.8e12 FLOPs from ")
    n_lo, n_hi = doc["N_interval"]
    d_lo, d_hi = doc["D_interval"]
    assert n_lo < doc["N_law"] < n_hi and d_lo < doc["D_law"] < d_hi
    # the shape by the width/depth rule, the steps the budget buys, DeepSeek's batch and rate
    vocab = json.load(open(os.path.join(tiny_data, "manifest.json")))["tokenizer"]["vocab_size"]
    base = load_config(ModelConfig, ["max_seq_len=128", "tie_embeddings=false"])
    base = base.__class__(**{**base.__dict__, "vocab_size": vocab})
    shaped = shape_for(
        target["best_N"], base=base, rule=ShapeConfig(aspect_ratio=32, head_dim=16),
        count="non_embedding",
    )  # fmt: skip
    assert (run.model.n_layer, run.model.d_model) == (shaped.n_layer, shaped.d_model)
    batch = run.train.global_batch_tokens
    assert batch % (128 * 16) == 0
    assert abs(math.log(batch / (DEEPSEEK_BATCH[0] * C ** DEEPSEEK_BATCH[1]))) < math.log(2)
    assert run.optim.lr == pytest.approx(DEEPSEEK_LR[0] * C ** DEEPSEEK_LR[1])
    assert run.train.max_steps == round(C / (flops_per_token(shaped, 128) * batch))
    assert doc["tokens"] == run.train.max_steps * batch
    # four plays hold far fewer tokens than D*: the repetition and its cost are stated
    unique = json.load(open(os.path.join(tiny_data, "manifest.json")))["splits"]["train"]["tokens"]
    assert doc["epochs"] == pytest.approx(doc["tokens"] / unique)
    assert f"{doc['epochs']:.2f} passes over the" in stdout and "Muennighoff" in stdout
    assert "more data is the fix" in stdout
    # --probe: every layout that fits was measured, the fastest planned, its rate the wall time
    assert doc["tokens_per_sec"] > 0
    assert doc["wall_seconds"] == pytest.approx(doc["tokens"] / doc["tokens_per_sec"])
    assert stdout.count("tokens/s measured") == 2
    md = open(os.path.join(out, "plan.md")).read()
    assert f"lmforge pretrain {out}/pretrain.yaml" in md and "| predicted final loss |" in md


@pytest.mark.parametrize(
    ("gpus", "count", "hours", "layout"), [("8xH100", 8, 24, "ddp"), ("64xH100", 64, 168, "fsdp")]
)
def test_plan_with_published_constants_and_gpu_hours(
    tiny_data, tmp_path, capsys, gpus, count, hours, layout
):
    """GPUs × hours at 40% MFU with Hoffmann et al.'s constants: their allocation, no loss for
    this data, and the first layout that fits 80 GB per GPU by the estimate (a 1B model
    unsharded; an 8B one needs its weights and optimizer state sharded)."""
    out = str(tmp_path / "plan")
    code, stdout, err = _run(
        ["plan", f"data.path={tiny_data}", "train.seq_len=2048", "model.max_seq_len=2048",
         "train.micro_batch_size=1", "--gpus", gpus, "--hours", str(hours), "--mfu", "0.4",
         "--law", "hoffmann", "--out", out],
        capsys,
    )  # fmt: skip
    assert code == 0, err
    C = count * 989e12 * 0.4 * hours * 3600
    law = SurfaceFit(**PUBLISHED["hoffmann"][0], objective=0.0, n_points=0)
    n_star, d_star, _ = law.optimal(C)
    doc = json.load(open(os.path.join(out, "plan.json")))
    assert doc["C"] == pytest.approx(C)
    assert doc["N_law"] == pytest.approx(n_star) and doc["loss"] is None
    assert abs(math.log(doc["N"] / n_star)) < math.log(1.3)  # the rule's nearest shape
    assert "only the allocation transfers" in stdout and "none for this data" in stdout
    assert doc["wall_seconds"] == pytest.approx(hours * 3600, rel=0.3)
    assert doc["layout"] == layout and f"| layout | {layout}:" in stdout


def test_repetition_is_worth_less_than_fresh_data():
    assert effective_tokens(100, 200) == 100
    assert 360 < effective_tokens(400, 100) < 380  # 4 epochs: 7% short of fresh data
    assert effective_tokens(10_000, 100) < 100 * (1 + 15.4)  # the limit of repetition


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (["--flops", "1e12"], "give the law: --fit"),
        (["--flops", "1e12", "--law", "hoffmann", "--fit", "x.csv"], "give the law: --fit"),
        (["--law", "hoffmann"], "give the budget: --flops C"),
        (["--gpus", "8xH100", "--hours", "2", "--law", "hoffmann"], "add --mfu (e.g. 0.4)"),
        (["--gpus", "8xB999", "--hours", "2", "--mfu", "0.4", "--law", "hoffmann"], "unknown GPU"),
        (["--gpus", "eight", "--hours", "2", "--mfu", "0.4", "--law", "hoffmann"], "COUNTxNAME"),
        (["--flops", "1e12", "--mfu", "1.5", "--law", "hoffmann"], "--mfu 1.5"),
        (["--flops", "-1", "--law", "hoffmann"], "--flops -1.0"),
        (["--flops", "1e12", "--fit", "nowhere"], "--fit nowhere: not a sweep"),
        (["--flops", "1e12", "--law", "hoffmann", "--out", "FILE"], "is a file"),
    ],
    ids=["no-law", "two-laws", "no-budget", "no-mfu", "unknown-gpu", "bad-gpus", "mfu", "flops",
         "fit-path", "out-file"],
)  # fmt: skip
def test_plan_bad_input_is_one_line_and_writes_nothing(tiny_data, tmp_path, capsys, args, message):
    out = str(tmp_path / "plan")
    if "FILE" in args:  # --out names an existing file: refused before any work, file kept
        (tmp_path / "file").write_text("mine")
        args = [str(tmp_path / "file") if a == "FILE" else a for a in args]
    else:
        args = [*args, "--out", out]
    code, _, err = _run(["plan", f"data.path={tiny_data}", *args], capsys)
    assert code == 2 and message in err
    assert len(err.strip().splitlines()) == 1
    assert not os.path.exists(out)
    assert not (tmp_path / "file").exists() or (tmp_path / "file").read_text() == "mine"
