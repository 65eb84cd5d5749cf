"""`lmforge runs`: list runs; predict a run's final loss from its curve so far."""

from __future__ import annotations

import argparse
import os

from lmforge.launcher.cli.common import Handler, add_command
from lmforge.launcher.runs import describe_runs, predict_check, predict_run
from lmforge.pretrain.core.errors import ConfigurationError


def add_parsers(sub: argparse._SubParsersAction) -> None:
    sp = add_command(
        sub,
        "runs",
        "List runs: progress, checkpoints, SLURM jobs and logs; --predict: a run's final loss "
        "predicted from its curve so far (docs/predict.md); --forecasts: how far off the runs' "
        "forecasts were (docs/forecasts.md).",
        config=False,
    )
    sp.add_argument("names", nargs="*", metavar="RUN", help="runs to show (default: all)")
    sp.add_argument("--runs-dir", help="parent of the run directories (default runs)")
    sp.add_argument("--tail", type=int, default=10, help="lines of a single run's newest log")
    sp.add_argument(
        "--predict",
        action="store_true",
        help="predict RUN's final train loss (and val_loss when it evaluates periodically) "
        "from its loss curve so far, with an interval; writes <run>/predict.png. Other "
        "finished runs in the same directory (a sweep) supply the shared parameters",
    )
    sp.add_argument(
        "--predict-from",
        type=float,
        metavar="FRACTION",
        help="with --predict, for a finished run: predict from its first FRACTION of steps "
        "(in (0, 1), e.g. 0.3) and compare with the measured final loss",
    )
    sp.add_argument(
        "--predict-check",
        metavar="SWEEP_DIR",
        help="for every finished run of SWEEP_DIR, predict its final loss from the first "
        "--fractions of its steps (shared parameters fitted on the other runs) and print the "
        "errors and their median per fraction",
    )
    sp.add_argument(
        "--fractions",
        default="0.2,0.3,0.5",
        help="with --predict-check: comma-separated fractions of steps (default 0.2,0.3,0.5)",
    )
    sp.add_argument(
        "--no-shared",
        action="store_true",
        help="with --predict/--predict-check: fit every parameter on the run's own curve, "
        "nothing from other runs",
    )
    sp.add_argument(
        "--figure",
        help="with --predict: where the figure goes (default <run>/predict.png); with "
        "--forecasts: default RUNS_DIR/forecasts.png",
    )
    sp.add_argument(
        "--forecasts",
        nargs="?",
        const="",
        metavar="RUNS_DIR",
        help="how good every finished run's forecast was (forecast.json under RUNS_DIR, default "
        "--runs-dir or runs; a sweep's runs one level deeper): median and worst error of peak "
        "memory, step time and wall time, and of the final loss by how early it was made, with "
        "how often its 80%% interval held the measured value; writes a figure "
        "(docs/forecasts.md)",
    )


def _predict_check(args: argparse.Namespace) -> int:
    """--predict-check SWEEP_DIR: the predictions of every finished run of a sweep."""
    if args.names or args.predict:
        raise ConfigurationError(
            "--predict-check SWEEP_DIR checks a whole sweep: drop the run names and --predict"
        )
    if not os.path.isdir(args.predict_check):
        raise ConfigurationError(
            f"--predict-check {args.predict_check}: not a directory; give a sweep directory "
            "(runs/<sweep>) holding finished runs"
        )
    try:
        fractions = [float(f) for f in args.fractions.split(",")]
    except ValueError:
        fractions = []
    if not fractions or not all(0 < f < 1 for f in fractions):
        raise ConfigurationError(
            f"--fractions {args.fractions}: give fractions of steps in (0, 1), e.g. 0.2,0.3,0.5"
        )
    print(predict_check(args.predict_check, fractions, shared=not args.no_shared))
    return 0


def _predict(args: argparse.Namespace, runs_dir: str) -> int:
    """--predict: one run's final loss from its curve so far."""
    if len(args.names) != 1:
        raise ConfigurationError(
            f"--predict takes one run, got {len(args.names)}; e.g. `lmforge runs NAME "
            "--predict` (a sweep's run: <sweep>/<run>)"
        )
    run_dir = os.path.join(runs_dir, args.names[0])
    figure = args.figure or os.path.join(run_dir, "predict.png")
    if not os.path.isdir(os.path.dirname(os.path.abspath(figure))):
        raise ConfigurationError(f"--figure {figure}: its directory does not exist")
    print(
        predict_run(run_dir, fraction=args.predict_from, shared=not args.no_shared, figure=figure)
    )
    return 0


def _forecasts(args: argparse.Namespace) -> int:
    """--forecasts [RUNS_DIR]: the errors and coverage of the finished runs' forecasts."""
    from lmforge.pretrain.forecast.summary import collect, plot_forecasts, report_lines, summarize

    if args.names or args.predict or args.predict_from is not None:
        raise ConfigurationError(
            "--forecasts reads every finished run under a runs directory: drop the run names "
            "and --predict (give the directory as --forecasts RUNS_DIR)"
        )
    runs_dir = args.forecasts or args.runs_dir or "runs"
    fcs = collect(runs_dir)
    if not fcs:
        raise ConfigurationError(
            f"--forecasts {runs_dir}: no finished run there has a forecast.json with what it "
            "measured; runs write one as they train (forecast.enabled=true, the default)"
        )
    figure = args.figure or os.path.join(runs_dir, "forecasts.png")
    if not os.path.isdir(os.path.dirname(os.path.abspath(figure))):
        raise ConfigurationError(f"--figure {figure}: its directory does not exist")
    print("\n".join(report_lines(runs_dir, fcs, summarize(fcs))))
    plot_forecasts(fcs, figure)
    print(f"figure: {figure}")
    return 0


def _runs(args: argparse.Namespace, argv: list[str]) -> int:
    if args.forecasts is not None:
        return _forecasts(args)
    if args.tail < 0:
        raise ConfigurationError(f"--tail {args.tail}: give a number of lines >= 0")
    if args.predict_check is not None:
        return _predict_check(args)
    if args.predict_from is not None and not args.predict:
        raise ConfigurationError("--predict-from goes with --predict: add --predict")
    if args.predict_from is not None and not 0 < args.predict_from < 1:
        raise ConfigurationError(
            f"--predict-from {args.predict_from}: give a fraction of the run's steps in (0, 1), "
            "e.g. 0.3"
        )
    runs_dir = args.runs_dir or "runs"
    if args.runs_dir is not None and not os.path.isdir(runs_dir):  # (the default may be absent)
        what = "is a file" if os.path.exists(runs_dir) else "does not exist"
        raise ConfigurationError(f"--runs-dir {runs_dir} {what}; give the parent of the runs")
    missing = [n for n in args.names if not os.path.isdir(os.path.join(runs_dir, n))]
    if missing:
        raise ConfigurationError(
            f"no run {missing[0]} under {runs_dir}; `lmforge runs` lists those there"
        )
    if args.predict:
        return _predict(args, runs_dir)
    print(describe_runs(runs_dir, args.names or None, tail=args.tail))
    return 0


HANDLERS: dict[str, Handler] = {"runs": _runs}
