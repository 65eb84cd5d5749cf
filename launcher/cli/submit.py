"""`lmforge submit`: lmforge commands as SLURM batch jobs."""

from __future__ import annotations

import argparse

from lmforge.launcher.cli.common import COMMANDS, Handler, add_command
from lmforge.launcher.slurm import SlurmProfile, submit_chain


def add_parsers(sub: argparse._SubParsersAction) -> None:
    sp = add_command(
        sub,
        "submit",
        "Submit lmforge commands to SLURM: lmforge submit [PROFILE.yaml] [key=value ...] "
        "[--flags] -- COMMAND ARGS ... [::: COMMAND ARGS ...] (stages after ::: wait for the "
        "previous one to succeed; the batch script is saved in the run directory). A training "
        "command is checked here as its start will check it (config, run directory, data, base "
        "model, tokenizer, layout, resume checkpoint; memory on the nodes) before submitting.",
    )
    sp.add_argument("--name", help="job name (default: the run's name, or the command)")
    sp.add_argument("--dependency", help="sbatch dependency, e.g. afterok:1234")
    sp.add_argument(
        "--array", help="job array indices, e.g. 0-7; {index} in the command is the task's index"
    )
    sp.add_argument("--out-dir", help="where the script and log go (default: <run>/slurm)")
    sp.add_argument(
        "--dry-run",
        action="store_true",
        help="check, print the batch script, submit nothing",
    )
    sp.add_argument(
        "--no-preflight",
        action="store_true",
        help="check only the config of a training command here, not its data, base model, "
        "layout and resume checkpoint (for inputs that exist only on the job's nodes)",
    )


def _submit(args: argparse.Namespace, argv: list[str]) -> int:
    from lmforge.pretrain.config.schema import load_config

    submit_chain(
        load_config(SlurmProfile, args.config),
        command=args.cmd,
        commands=COMMANDS,
        job_name=args.name,
        dependency=args.dependency,
        array=args.array,
        out_dir=args.out_dir,
        dry_run=args.dry_run,
        preflight=not args.no_preflight,
    )
    return 0


HANDLERS: dict[str, Handler] = {"submit": _submit}
