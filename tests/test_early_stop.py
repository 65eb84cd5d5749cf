"""Early stopping in a sweep (sweep key early_stop; scaling/early.py, scaling/sweep.py): a
running point whose predicted final loss cannot be its budget's minimum is stopped (its
process terminated, its verdict written, the sweep no longer trains it); one within reach of
the best continues. The sweep's runs are run directories written here with curves drawn from
the loss-curve law; the running points are real processes."""

from __future__ import annotations

import os
import subprocess
import sys

from lmforge.pretrain.config.schema import load_config
from lmforge.scaling.config import ScalingConfig
from lmforge.scaling.grid import Point
from lmforge.scaling.runs import read_verdict
from lmforge.scaling.sweep import _judge_running, point_status
from tests.test_curve import write_run


def _point(name: str, budget: float, steps: int, n: int) -> Point:
    return Point(
        index=0, name=name, budget=budget, target_params=n, n_layer=1, d_model=16, n_head=1,
        params=n, params_total=n, params_non_embedding=n,
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
    # finished runs: the shared parameters of the law; budget 2e12's best (l0 2.2) and two
    # more; budget 3e12's only one
    for i, (steps, l0, budget, n) in enumerate(
        [(500, 2.6, 1e12, 1e5), (800, 2.5, 1e12, 2e5), (700, 2.7, 1e12, 4e5),
         (1000, 2.2, 2e12, 1e5), (900, 2.45, 2e12, 2e5), (1100, 2.5, 2e12, 5e4),
         (1000, 2.2, 3e12, 1e5)]
    ):  # fmt: skip
        name = f"done{i}"
        write_run(os.path.join(root, name), steps=steps, l0=l0, seed=i, evals=True)
        every.append(_point(name, budget, steps, int(n)))
    # running points at 30%: of budget 2e12 one far above the best (N beyond the best's
    # neighbour), one within reach, and one far above it but the nearest size below the best;
    # of budget 3e12 one far above its only other run, which its budget keeps for a minimum
    running = {}
    for name, l0, budget, n in (
        ("bad", 3.0, 2e12, 4e5), ("close", 2.21, 2e12, 1.5e5), ("bracket", 3.0, 2e12, 7e4),
        ("kept", 3.0, 3e12, 4e5),
    ):  # fmt: skip
        write_run(os.path.join(root, name), steps=1000, l0=l0, upto=0.3, seed=7)
        p = _point(name, budget, 1000, int(n))
        every.append(p)
        proc = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(120)"])
        running[proc] = (p, 0.0, None)
    judged: dict = {}
    try:
        _judge_running(cfg, running, judged, every)
        bad, close = judged["bad"], judged["close"]
        assert bad.stop and bad.sibling == "done3" and bad.low > bad.sibling_high
        assert bad.step == 300 and bad.flops_saved == 700 * 6e8
        assert not close.stop and close.flops_saved == 0 and not close.kept_for_minimum
        for name in ("kept", "bracket"):
            v = judged[name]
            assert v.kept_for_minimum and not v.stop and v.low > v.sibling_high
        procs = {p.name: proc for proc, (p, _, _) in running.items()}
        assert procs["bad"].wait(timeout=30) != 0  # terminated
        assert all(procs[n].poll() is None for n in ("close", "bracket", "kept"))  # running
        assert read_verdict(os.path.join(root, "bad")).stop
        assert read_verdict(os.path.join(root, "close")) is None
        assert point_status(root, every[-4]) == "stopped"
        # judged once: a second pass judges nothing again
        again = dict(judged)
        _judge_running(cfg, running, judged, every)
        assert judged == again
    finally:
        for proc in running:
            if proc.poll() is None:
                proc.terminate()
                proc.wait()
