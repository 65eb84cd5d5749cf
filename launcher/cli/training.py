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
        "layout, memory, resume checkpoint) and write nothing; print the resolved config, "
        "parameter counts, FLOPs, layout and memory estimate, then stop",
    )
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
        "data, layout, memory, resume checkpoint) and write nothing; print the resolved config, "
        "the examples, optimizer steps and epochs, layout and memory estimate, then stop (with "
        "--label-curve: the curve's runs)",
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


def _train(args: argparse.Namespace, argv: list[str]) -> int:
    """pretrain and finetune: check everything that can fail before any process starts (config,
    data, base model, layout, memory), then run here or in ``--nproc`` local processes."""
    from lmforge.pretrain.config.schema import to_yaml

    check_nproc(args.nproc)
    if getattr(args, "parallel", 1) != 1 and args.label_curve is None:
        raise ConfigurationError(
            f"--parallel {args.parallel} trains a label curve's runs side by side: add "
            "--label-curve, or drop --parallel"
        )
    if getattr(args, "label_curve", None) is not None:
        from lmforge.launcher.label_curve import run_label_curve

        return run_label_curve(args)
    if args.dry_run:  # the config as the run would resolve it (vocabulary, base model's shape)
        work, plan, resume_from = check_start(
            args.command, args.config, world_size=args.nproc, local_ranks=args.nproc
        )
        print(to_yaml(work.cfg), end="")
        note = work.eval_samples_note()
        for line in [*work.dry_run_lines(), *([note] if note else [])]:
            print(f"# {line}")
        print(f"# resumes from {resume_from}" if resume_from else "# a new run (nothing to resume)")
        print(f"# layout: {plan.layout.describe()}")
        print(f"# memory per rank (estimate): {plan.describe_memory()}")
        return 0
    work = workload(args.command, load_command_config(args.command, args.config))
    if "LOCAL_RANK" not in os.environ:  # (a launcher checked it for its workers)
        check_run_dir(work.cfg)
    if args.nproc > 1 and "LOCAL_RANK" not in os.environ:
        # bad data, base, tokenizer, layout or memory: one line here, before any worker starts
        work.preflight(world_size=args.nproc, local_ranks=args.nproc)
        return _launch_workers(argv, args.nproc, work.cfg.run_dir)
    from lmforge.pretrain.run.session import run_session

    # 0 when done; 128 + signal when SIGUSR1/SIGTERM stopped it early (after saving)
    return run_session(work)["exit_code"]


HANDLERS: dict[str, Handler] = {"pretrain": _train, "finetune": _train}
