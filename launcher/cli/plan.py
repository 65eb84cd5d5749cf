"""`lmforge plan`: from a compute budget to a ready pretrain config."""

from __future__ import annotations

import argparse
import os

from lmforge.launcher.cli.common import COMMANDS, Handler, add_command
from lmforge.launcher.slurm import SlurmProfile, submit_chain
from lmforge.pretrain.core.durable import check_writable
from lmforge.pretrain.core.errors import ConfigurationError


def add_parsers(sub: argparse._SubParsersAction) -> None:
    sp = add_command(
        sub,
        "plan",
        "From a compute budget to a ready pretrain config: N* and D* with intervals, the model "
        "shape, batch and learning rate, the parallel layout that fits, the predicted loss and "
        "wall time. Writes OUT/pretrain.yaml and OUT/plan.md.",
    )
    sp.add_argument("--flops", type=float, help="the budget in training FLOPs")
    sp.add_argument(
        "--gpus", help="COUNTxNAME, e.g. 8xH100: the budget is their peak × --mfu × --hours"
    )
    sp.add_argument("--hours", type=float, help="wall-clock hours on --gpus")
    sp.add_argument(
        "--mfu",
        type=float,
        help="share of the peak the run reaches (e.g. 0.4); with --probe and no --mfu, measured",
    )
    sp.add_argument(
        "--fit",
        metavar="SOURCE",
        help="the law: a sweep's fit (runs/<sweep> or runs/<sweep>/report; its held-out budgets "
        "are not read; the run starts from the sweep's pretrain config and follows its rules), "
        "or a points CSV or run directories as `scaling fit` takes them",
    )
    sp.add_argument(
        "--law",
        choices=["hoffmann", "besiroglu"],
        help="the law: published constants (only their allocation transfers to your data)",
    )
    sp.add_argument("--data", metavar="DIR", help="prepared data (default: the config's data.path)")
    sp.add_argument("--name", default=None, help="the planned run's name (default plan-<C>)")
    sp.add_argument("--out", help="directory for pretrain.yaml and plan.md (default plans/<name>)")
    sp.add_argument("--nproc", type=int, default=1, help="processes without --gpus (default 1)")
    sp.add_argument(
        "--aspect-ratio",
        type=float,
        help="width/depth rule: d_model / n_layer (default: the sweep's, else 64)",
    )
    sp.add_argument(
        "--head-dim", type=int, help="width/depth rule: head width (default: the sweep's, else 64)"
    )
    sp.add_argument(
        "--probe",
        action="store_true",
        help="measure the layouts that fit by a few real steps; the fastest is planned and its "
        "rate gives the wall time",
    )
    sp.add_argument(
        "--submit",
        nargs="+",
        metavar="PROFILE",
        help="submit the planned run through `lmforge submit` (a SLURM profile and key=value)",
    )


def _plan(args: argparse.Namespace, argv: list[str]) -> int:
    from lmforge.scaling.grid import format_flops
    from lmforge.scaling.planner import Request, make_plan, render_plan, write_plan

    if args.nproc < 1:
        raise ConfigurationError(f"--nproc {args.nproc}: give at least 1")
    budget = args.flops if args.flops is not None else 0.0
    name = args.name or (f"plan-{format_flops(budget)}" if args.flops else "plan")
    out = args.out or os.path.join("plans", name)
    if os.path.lexists(out) and not os.path.isdir(out):  # said before the fit, not after it
        raise ConfigurationError(f"--out {out} is a file; give a directory for the plan")
    check_writable(out, "--out ")
    request = Request(
        fit_path=args.fit,
        law_name=args.law,
        config_args=args.config,
        data=args.data,
        name=name,
        probe=args.probe,
        shape={
            k: v
            for k, v in (("aspect_ratio", args.aspect_ratio), ("head_dim", args.head_dim))
            if v is not None
        },
        gpus=args.gpus,
    )
    plan = make_plan(request, flops=args.flops, hours=args.hours, mfu=args.mfu, nproc=args.nproc)
    write_plan(plan, out)
    print(render_plan(plan, out))
    print(f"plan: {out}/plan.md, config: {out}/pretrain.yaml")
    if args.submit:
        from lmforge.pretrain.config.schema import load_config

        submit_chain(
            load_config(SlurmProfile, args.submit),
            command=["pretrain", os.path.join(out, "pretrain.yaml")],
            commands=COMMANDS,
            job_name=name,
            dependency=None,
            array=None,
            out_dir=None,
            dry_run=False,
        )
    return 0


HANDLERS: dict[str, Handler] = {"plan": _plan}
