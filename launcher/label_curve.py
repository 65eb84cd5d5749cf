"""`lmforge finetune CONFIG --label-curve [SIZES]`: the experiment of finetune/label_curve.py,
each of its runs trained in this process (``--nproc 1``) or in ``--nproc`` local processes."""

from __future__ import annotations

import argparse
import subprocess
import sys

from lmforge.launcher.commands import load_command_config


def run_label_curve(args: argparse.Namespace) -> int:
    from lmforge.finetune.label_curve import (
        check_curve,
        curve_dir,
        report_lines,
        run_curve,
        run_in_process,
    )

    overrides = list(args.config)
    if args.label_curve:
        overrides.append(f"label_curve.sizes=[{args.label_curve}]")
    cfg = load_command_config("finetune", overrides)
    check_curve(cfg)
    if args.dry_run:
        from lmforge.finetune.label_curve import describe_plan

        print("\n".join(describe_plan(cfg)))
        return 0

    def run_point(config: str) -> int:
        if args.nproc == 1:
            return run_in_process(config)
        cmd = [sys.executable, "-m", "lmforge.launcher.cli", "finetune", config]
        return subprocess.run([*cmd, "--nproc", str(args.nproc)]).returncode

    report = run_curve(cfg, run_point)
    print("\n" + "\n".join(report_lines(report)))
    print(f"curve: {curve_dir(cfg)}/ (label_curve.json, label_efficiency.png, a run per point)")
    return 0
