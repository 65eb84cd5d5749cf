"""`lmforge scaling sweep` (train an IsoFLOP grid) and `lmforge scaling fit` (fit the laws and
write a report)."""

from __future__ import annotations

import argparse
import os

from lmforge.launcher.cli.common import Handler, add_command
from lmforge.launcher.slurm import SlurmArrays
from lmforge.pretrain.core.errors import ConfigurationError


def add_parsers(sub: argparse._SubParsersAction) -> None:
    sp = add_command(
        sub,
        "scaling",
        "Scaling laws: `scaling sweep CONFIG` trains an IsoFLOP grid of runs (here or as a SLURM "
        "array); `scaling fit SOURCE` fits L(C), L(N, D) and the compute-optimal allocation, "
        "chooses the form that predicts by a backtest on the fitted budgets, and writes a "
        "report.",
        config=False,
    )
    scaling = sp.add_subparsers(dest="scaling_command", metavar="sweep|fit")
    _add_sweep(scaling)
    _add_fit(scaling)


def _add_sweep(scaling: argparse._SubParsersAction) -> None:
    ssp = scaling.add_parser(
        "sweep",
        help="train the grid of a sweep config (configs/scaling/), then fit and report",
        description="Train every run of an IsoFLOP grid that is not finished (finished runs "
        "are skipped, interrupted ones resume), then fit and write <runs_dir>/<name>/report/; "
        "with a `transfer` section, finetune each budget's best run on a task (pretrained vs "
        "scratch) and fit test accuracy against compute (<runs_dir>/<name>/transfer/).",
        epilog="Config arguments apply in order, later wins:\n"
        "  CONFIG.yaml        merge a sweep config (configs/scaling/demo.yaml)\n"
        "  dotted.key=value   set one key, e.g. budgets=[1e12,2e12,4e12] fit.holdout=[4e12]\n"
        "                     pretrain.optim.lr=1e-3 (pretrain.* is every run's pretrain config)\n"
        "See every key with its default and meaning: lmforge print-config --for scaling --keys",
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    ssp.add_argument("config", nargs="*", metavar="ARG", help="CONFIG.yaml or dotted.key=value")
    ssp.add_argument(
        "--dry-run", action="store_true", help="print the grid and each run's status, then stop"
    )
    ssp.add_argument(
        "--wait", action="store_true", help="launcher=slurm: wait for the array, then fit"
    )
    ssp.add_argument("--debug", action="store_true", help="show tracebacks of errors")


def _add_fit(scaling: argparse._SubParsersAction) -> None:
    ssp = scaling.add_parser(
        "fit",
        help="fit scaling laws to a sweep directory, run directories or a CSV",
        description="Fit L(C) = E + A·C^-alpha to the IsoFLOP minima, L(N, D) = E + A/N^alpha + "
        "B/D^beta (Huber on log-loss, L-BFGS from a grid of starts, bootstrap intervals) and "
        "N_opt, D_opt ~ C^a, C^b; predict the held-out budgets and --target-flops; write "
        "report.md, fit.json, points.csv and figures. A CSV needs a loss column and two of "
        "N/params, D/tokens, C/flops (D = C / 6N when D is missing). Budgets: a sweep's are "
        "its nominal ones; for run directories or a CSV, a budget is at least 3 points whose C "
        "lie within a factor 1 + --budget-tolerance of each other and at least twice as many "
        "as in the same width of C just below and just above them (densest first); points in "
        "no budget enter the L(N, D) fit only. The output says the budgets found.",
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    ssp.add_argument(
        "sources",
        nargs="*",
        metavar="SOURCE",
        help="a sweep directory (runs/<name>), pretrain run directories, or a CSV file",
    )
    ssp.add_argument(
        "--out", help="report directory (default: <sweep>/report, else ./scaling-report)"
    )
    ssp.add_argument(
        "--target-flops",
        type=float,
        action="append",
        default=[],
        metavar="C",
        help="predict N*, D* and the loss at this budget (repeatable)",
    )
    ssp.add_argument(
        "--holdout",
        type=float,
        action="append",
        metavar="C",
        help="leave this budget out of the fits and predict it (repeatable; default: the "
        "sweep's fit.holdout)",
    )
    ssp.add_argument(
        "--exclude-highest",
        type=int,
        metavar="K",
        help="leave the K highest-loss points out of the L(N, D) fit",
    )
    ssp.add_argument("--bootstrap", type=int, metavar="B", help="bootstrap resamples (default 200)")
    ssp.add_argument(
        "--budget-tolerance",
        type=float,
        metavar="REL",
        help="the C of one budget lie within a factor 1 + REL of each other (default 0.2; "
        "budgets closer than a factor (1 + REL)^2 need a smaller one)",
    )
    ssp.add_argument(
        "--params",
        choices=["non_embedding", "total"],
        help="which parameter count is N for runs (default non_embedding)",
    )
    ssp.add_argument(
        "--simulate-early-stop",
        type=float,
        metavar="FRACTION",
        help="on a finished sweep: which runs early stopping (sweep key early_stop) would have "
        "stopped from this fraction of their steps, the compute saved, and the fit without them",
    )
    ssp.add_argument(
        "--finetune",
        nargs="+",
        default=[],
        metavar="RUN",
        help="finetuned run directories: plot their downstream metric against total "
        "(pretrain + finetune) compute",
    )
    ssp.add_argument("--debug", action="store_true", help="show tracebacks of errors")


def _sweep(args: argparse.Namespace) -> int:
    from lmforge.pretrain.config.schema import load_config
    from lmforge.scaling.config import ScalingConfig
    from lmforge.scaling.sweep import sweep

    cfg = load_config(ScalingConfig, args.config)
    jobs = SlurmArrays(cfg.slurm) if cfg.launcher == "slurm" else None
    return sweep(cfg, dry_run=args.dry_run, wait=args.wait, jobs=jobs)


def _fit(args: argparse.Namespace) -> int:
    from lmforge.scaling.report import fit_sources

    if args.simulate_early_stop is not None:
        from lmforge.scaling.early import describe_simulation, simulate

        if len(args.sources) != 1 or not os.path.isfile(
            os.path.join(args.sources[0], "sweep.yaml")
        ):
            raise ConfigurationError(
                "--simulate-early-stop replays a finished sweep: give one sweep directory"
            )
        print(describe_simulation(simulate(args.sources[0], args.simulate_early_stop)))
        return 0
    fit_sources(
        args.sources,
        out=args.out,
        target_flops=args.target_flops,
        holdout=args.holdout,
        exclude_highest=args.exclude_highest,
        bootstrap=args.bootstrap,
        budget_tolerance=args.budget_tolerance,
        params=args.params,
        finetune=args.finetune,
    )
    return 0


def _scaling(args: argparse.Namespace, argv: list[str]) -> int:
    if args.scaling_command == "sweep":
        return _sweep(args)
    if args.scaling_command == "fit":
        return _fit(args)
    raise ConfigurationError("lmforge scaling needs a subcommand: sweep CONFIG or fit SOURCE")


HANDLERS: dict[str, Handler] = {"scaling": _scaling}
