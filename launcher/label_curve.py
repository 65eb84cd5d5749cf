"""`lmforge finetune CONFIG --label-curve [SIZES]`: the experiment of finetune/label_curve.py,
its runs trained one after another in this process (the default), one after another in
``--nproc`` processes each, or ``--parallel`` at a time in processes of their own that share
the CPUs (tiny models train faster on one thread each, side by side)."""

from __future__ import annotations

import argparse
import os
import subprocess
import sys
import time

from lmforge.launcher.commands import load_command_config
from lmforge.pretrain.core.launch_env import threads_per_rank


def _command(config: str, nproc: int) -> list[str]:
    return [sys.executable, "-m", "lmforge.launcher.cli", "finetune", config, "--nproc", str(nproc)]


def side_by_side(configs: list[str], *, parallel: int, nproc: int) -> list[str]:
    """``parallel`` runs at a time, each in its own processes with the CPUs shared out, its
    output in <curve>/logs/<run>.log; returns the names of those that failed."""
    env = dict(os.environ)
    env.setdefault("OMP_NUM_THREADS", str(threads_per_rank(nproc * parallel)))
    queue, running, failed = list(configs), {}, []
    try:
        _drive(queue, running, failed, configs, parallel=parallel, nproc=nproc, env=env)
    except KeyboardInterrupt:  # each run stops; `resume=auto` continues it from its checkpoint
        for proc in running:
            proc.terminate()
        for proc in running:
            proc.wait()
        raise
    return failed


def _drive(queue, running, failed, configs, *, parallel: int, nproc: int, env: dict) -> None:
    """Start runs from ``queue`` while fewer than ``parallel`` are ``running``; report each as
    it ends (``failed`` gets the names of those that failed)."""
    from lmforge.pretrain.train.metrics import read_metrics

    done = 0
    while queue or running:
        while queue and len(running) < parallel:
            config = queue.pop(0)
            root, name = os.path.dirname(os.path.dirname(config)), os.path.basename(config)[:-5]
            os.makedirs(os.path.join(root, "logs"), exist_ok=True)
            log = open(os.path.join(root, "logs", f"{name}.log"), "a")
            proc = subprocess.Popen(
                _command(config, nproc), stdout=log, stderr=subprocess.STDOUT, env=env
            )
            running[proc] = (root, name, log, time.time())
        time.sleep(0.2)
        for proc in [p for p in running if p.poll() is not None]:
            root, name, log, start = running.pop(proc)
            log.close()
            done += 1
            evals = [r for r in read_metrics(os.path.join(root, name, "metrics.jsonl"))
                     if r.get("kind") == "eval"]  # fmt: skip
            if proc.returncode == 0 and evals:
                print(
                    f"[{done}/{len(configs)}] {name}: val accuracy {evals[-1]['accuracy']:.4f} "
                    f"in {time.time() - start:.0f} s",
                    flush=True,
                )
            else:
                failed.append(name)
                print(f"[{done}/{len(configs)}] {name}: FAILED (exit {proc.returncode}); "
                      f"log {log.name}", flush=True)  # fmt: skip


def run_label_curve(args: argparse.Namespace) -> int:
    from lmforge.finetune.label_curve import (
        check_curve,
        curve_dir,
        one_after_another,
        report_lines,
        run_curve,
    )
    from lmforge.pretrain.core.errors import ConfigurationError

    overrides = list(args.config)
    if args.label_curve:
        overrides.append(f"label_curve.sizes=[{args.label_curve}]")
    if args.parallel < 1:
        raise ConfigurationError(f"--parallel {args.parallel}: give at least 1 run at a time")
    cfg = load_command_config("finetune", overrides)
    check_curve(cfg)
    if args.dry_run:
        from lmforge.finetune.label_curve import describe_plan

        print("\n".join(describe_plan(cfg)))
        return 0
    if args.parallel > 1:

        def runner(configs):
            return side_by_side(configs, parallel=args.parallel, nproc=args.nproc)
    elif args.nproc > 1:

        def runner(configs):
            return one_after_another(
                configs, lambda c: subprocess.run(_command(c, args.nproc)).returncode
            )
    else:
        runner = one_after_another
    report = run_curve(cfg, runner)
    print("\n" + "\n".join(report_lines(report)))
    print(f"curve: {curve_dir(cfg)}/ (label_curve.json, label_efficiency.png, a run per point)")
    return 0
