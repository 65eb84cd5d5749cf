"""Early stopping in a sweep (sweep key early_stop; scaling/early.py, scaling/sweep.py): a
running point whose predicted final loss cannot be its budget's minimum is stopped (its
process terminated, its verdict written, the sweep no longer trains it); one within reach of
the best continues. The sweep's runs are run directories written here with curves drawn from
the loss-curve law; the running points are real processes."""

from __future__ import annotations

import os
import subprocess
import sys

from pretrain.config import load_config
from scaling.config import ScalingConfig
from scaling.plan import Point
from scaling.runs import read_verdict
from scaling.sweep import _judge_running, point_status
from tests.test_curve import write_run


def _point(name: str, budget: float, steps: int) -> Point:
    return Point(
        index=0, name=name, budget=budget, target_params=1e5, n_layer=1, d_model=16, n_head=1,
        params=100_000, params_total=100_000, params_non_embedding=100_000,
        flops_per_token=600_000, steps=steps, tokens=steps * 1000, flops=steps * 6e8, epochs=1.0,
        lr=1e-3, holdout=False, config="",
    )  # fmt: skip


def test_a_point_that_cannot_be_its_budgets_minimum_is_stopped(tmp_path):
    cfg = load_config(
        ScalingConfig,
        [{"name": "sweep", "runs_dir": str(tmp_path), "budgets": [1e12, 2e12], "early_stop": 0.3}],
    )
    root = cfg.sweep_dir
    every = []
    # finished runs: the shared parameters of the law, and the best of budget 2e12 (l0 2.2)
    for i, (steps, l0, budget) in enumerate(
        [(500, 2.6, 1e12), (800, 2.5, 1e12), (700, 2.7, 1e12), (1000, 2.2, 2e12)]
    ):
        name = f"done{i}"
        write_run(os.path.join(root, name), steps=steps, l0=l0, seed=i, evals=True)
        every.append(_point(name, budget, steps))
    # two running points of budget 2e12 at 30%: one far above the best, one within reach
    running = {}
    for name, l0 in (("bad", 3.0), ("close", 2.21)):
        write_run(os.path.join(root, name), steps=1000, l0=l0, upto=0.3, seed=7)
        p = _point(name, 2e12, 1000)
        every.append(p)
        proc = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(120)"])
        running[proc] = (p, 0.0, None)
    judged: dict = {}
    try:
        _judge_running(cfg, running, judged, every)
        bad, close = judged["bad"], judged["close"]
        assert bad.stop and bad.sibling == "done3" and bad.low > bad.sibling_high
        assert bad.step == 300 and bad.flops_saved == 700 * 6e8
        assert not close.stop and close.flops_saved == 0
        procs = {p.name: proc for proc, (p, _, _) in running.items()}
        assert procs["bad"].wait(timeout=30) != 0  # terminated
        assert procs["close"].poll() is None  # still running
        assert read_verdict(os.path.join(root, "bad")).stop
        assert read_verdict(os.path.join(root, "close")) is None
        assert point_status(root, every[-2]) == "stopped"
        # judged once: a second pass judges nothing again
        again = dict(judged)
        _judge_running(cfg, running, judged, every)
        assert judged == again
    finally:
        for proc in running:
            if proc.poll() is None:
                proc.terminate()
                proc.wait()
