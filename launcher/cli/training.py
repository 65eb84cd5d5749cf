"""`lmforge pretrain` and `lmforge finetune`: check everything that can fail before any process
starts, then train here or in ``--nproc`` local processes."""

from __future__ import annotations

import argparse
import os

from lmforge.launcher.cli.common import Handler, add_command, add_trust_checkpoint, check_nproc
from lmforge.launcher.commands import (
    check_run_dir,
    check_start,
    load_command_config,
    workload,
)
from lmforge.pretrain.core.errors import ConfigurationError

PROBE_STEPS = 10  # `--probe` without a number


def _add_forecast_flags(sp: argparse.ArgumentParser) -> None:
    sp.add_argument(
        "--law",
        metavar="FIT",
        help="forecast the final loss before the run from a scaling law: a sweep (runs/<sweep>), "
        "its report/fit.json, a points CSV or run directories; sets forecast.law (docs/"
        "forecasts.md)",
    )
    sp.add_argument(
        "--probe",
        action="store_true",
        help="before the run, measure --probe-steps real steps of it in a scratch directory and "
        "add them to the runs directory's ledger, so that the forecast of step and wall time "
        "comes from them when no earlier run of this shape, layout and hardware has (with "
        "--dry-run: measure and forecast, train nothing)",
    )
    sp.add_argument(
        "--probe-steps",
        type=int,
        default=PROBE_STEPS,
        metavar="N",
        help=f"with --probe: steps to measure (default {PROBE_STEPS}; the first is warm-up)",
    )


def add_parsers(sub: argparse._SubParsersAction) -> None:
    sp = add_command(
        sub,
        "pretrain",
        "Pretrain a GPT-style model on prepared data (1..N processes), from random weights or "
        "from a model you have (init_from=RUN|CHECKPOINT|EXPORT|HUB_DIR).",
    )
    sp.add_argument(
        "--nproc", type=int, default=1, help="local processes (data parallel); default 1"
    )
    sp.add_argument(
        "--dry-run",
        action="store_true",
        help="make every check the run's start makes (config, run directory, data, tokenizer, "
        "layout, memory, resume checkpoint); print the resolved config, parameter counts, "
        "FLOPs, layout, memory estimate and the run's forecast, write nothing but "
        "<run>/forecast.json (the run replaces it), then stop",
    )
    _add_forecast_flags(sp)
    add_trust_checkpoint(sp)

    sp = add_command(
        sub,
        "finetune",
        "Finetune a pretrained model (init_from=RUN|CHECKPOINT|HF_DIR) on a labelled task: "
        "classification, sft or token_classification (1..N processes).",
    )
    sp.add_argument(
        "--nproc", type=int, default=1, help="local processes (data parallel); default 1"
    )
    sp.add_argument(
        "--dry-run",
        action="store_true",
        help="make every check the run's start makes (config, run directory, base model, task "
        "data, layout, memory, resume checkpoint); print the resolved config, the examples, "
        "optimizer steps and epochs, layout, memory estimate and the run's forecast, write "
        "nothing but <run>/forecast.json (the run replaces it), then stop (with --label-curve: "
        "the curve's runs, nothing written)",
    )
    sp.add_argument(
        "--label-curve",
        nargs="?",
        const="",
        metavar="SIZES",
        help="the config's run at several numbers of labelled examples (e.g. 100,300,1000,all; "
        "default: label_curve.sizes), from init_from and from label_curve.against (default: "
        "the same model from random weights), each at every rate of label_curve.lrs, kept on "
        "validation; prints test accuracy per size with the paired standard error and verdict, "
        "writes label_curve.json and label_efficiency.png (docs/label-curves.md). --nproc: "
        "processes per run (1: every run in this process)",
    )
    sp.add_argument(
        "--parallel",
        type=int,
        default=1,
        metavar="P",
        help="with --label-curve: train P runs at a time, each in processes of its own sharing "
        "the CPUs (OMP_NUM_THREADS = CPUs / (P x nproc)); default 1 (one after another)",
    )
    _add_forecast_flags(sp)
    add_trust_checkpoint(sp)


def _launch_workers(argv: list[str], nproc: int, run_dir: str) -> int:
    """Re-run this command line in ``nproc`` local processes (without --nproc)."""
    from lmforge.launcher.local import launch_local

    worker_argv = [a for a in argv if not a.startswith("--nproc")]
    if "--nproc" in argv:  # "--nproc N" as two words
        i = argv.index("--nproc")
        worker_argv = argv[:i] + argv[i + 2 :]
    # this launcher holds the run's lock for its workers (pretrain/core/runlock.py)
    logs = os.path.join(run_dir, "logs")
    return launch_local(worker_argv, nproc=nproc, log_dir=logs, run_dir=run_dir)


def _forecast_inputs(args: argparse.Namespace, argv: list[str]) -> tuple[list[str], list[str]]:
    """``--law`` and ``--probe``, once, in the launching process: the law becomes
    ``forecast.law.*`` overrides (the workers get them in place of ``--law``, and no
    ``--probe``: `_probe` runs it here)."""
    from lmforge.launcher.forecast import law_overrides

    if args.probe and args.probe_steps < 3:
        raise ConfigurationError(
            f"--probe {args.probe_steps}: give at least 3 steps (the first is warm-up), e.g. "
            f"--probe-steps {PROBE_STEPS}"
        )
    if "LOCAL_RANK" in os.environ:  # a worker: `lmforge launch` or `submit` started it
        if args.probe:
            raise ConfigurationError(
                "--probe measures steps before any worker starts: run `lmforge "
                f"{args.command} ... --probe` on one node first, or drop it here"
            )
        if args.law is None or os.environ.get("RANK", "0") != "0":  # the forecast is rank 0's
            return args.config, argv
    config = list(args.config)
    if args.law is not None:
        work = workload(args.command, load_command_config(args.command, config))
        work.prepare()  # the model's vocabulary and the run's tokens
        config += law_overrides(args.law, work)
    rest, skip = [], False
    for a in argv:  # the workers' command line: the law's overrides instead of --law, no probe
        if skip:
            skip = False
        elif a in ("--law", "--probe-steps"):
            skip = True
        elif a != "--probe" and not a.startswith(("--law=", "--probe-steps=")):
            rest.append(a)
    return config, rest + config[len(args.config) :]


def _probe(args: argparse.Namespace, cfg) -> None:
    """``--probe``, after the checks of the run's start (a run that would be refused is not
    probed): its steps go to the ledger, where the run's forecast finds them."""
    if args.probe and "LOCAL_RANK" not in os.environ:
        from lmforge.launcher.forecast import probe_into_ledger

        steps = args.probe_steps
        print(probe_into_ledger(args.command, args.config, nproc=args.nproc, steps=steps, cfg=cfg))


def _dry_run(args: argparse.Namespace) -> int:
    """--dry-run: every check of the run's start, the config as the run would resolve it
    (vocabulary, base model's shape), the layout, the memory and the forecast (with --probe:
    from measured steps)."""
    from lmforge.pretrain.config.schema import to_yaml

    work, plan, resume_from = check_start(
        args.command, args.config, world_size=args.nproc, local_ranks=args.nproc
    )
    _probe(args, work.cfg)
    print(to_yaml(work.cfg), end="")
    note = work.eval_samples_note()
    for line in [*work.dry_run_lines(), *([note] if note else [])]:
        print(f"# {line}")
    print(f"# resumes from {resume_from}" if resume_from else "# a new run (nothing to resume)")
    print(f"# layout: {plan.layout.describe()}")
    print(f"# memory per rank (estimate): {plan.describe_memory()}")
    if work.cfg.forecast.enabled:
        from lmforge.launcher.forecast import dry_run_forecast
        from lmforge.pretrain.forecast.forecast import forecast_lines

        fc = dry_run_forecast(work, plan, nproc=args.nproc)
        for line in forecast_lines(fc):
            print(f"# {line}")
    return 0


def _train(args: argparse.Namespace, argv: list[str]) -> int:
    """pretrain and finetune: check everything that can fail before any process starts (config,
    data, base model, layout, memory), then run here or in ``--nproc`` local processes."""
    check_nproc(args.nproc)
    if getattr(args, "parallel", 1) != 1 and args.label_curve is None:
        raise ConfigurationError(
            f"--parallel {args.parallel} trains a label curve's runs side by side: add "
            "--label-curve, or drop --parallel"
        )
    if getattr(args, "label_curve", None) is not None:
        from lmforge.launcher.label_curve import run_label_curve

        if args.law is not None or args.probe:
            raise ConfigurationError(
                "--law and --probe forecast one run; a label curve's runs forecast themselves: "
                "drop them"
            )

        return run_label_curve(args)
    if args.law is not None or args.probe:
        args.config, argv = _forecast_inputs(args, argv)
    if args.dry_run:
        return _dry_run(args)
    work = workload(args.command, load_command_config(args.command, args.config))
    if "LOCAL_RANK" not in os.environ:  # (a launcher checked it for its workers)
        check_run_dir(work.cfg)
        _probe(args, work.cfg)
    if args.nproc > 1 and "LOCAL_RANK" not in os.environ:
        # bad data, base, tokenizer, layout or memory: one line here, before any worker starts
        work.preflight(world_size=args.nproc, local_ranks=args.nproc)
        return _launch_workers(argv, args.nproc, work.cfg.run_dir)
    from lmforge.pretrain.run.session import run_session

    # 0 when done; 128 + signal when SIGUSR1/SIGTERM stopped it early (after saving)
    return run_session(work)["exit_code"]


HANDLERS: dict[str, Handler] = {"pretrain": _train, "finetune": _train}
