"""The commands that train: their config schema and what they train, in one table that the CLI,
`lmforge launch` and `lmforge submit` all read (so their pre-launch checks are one code path)."""

from __future__ import annotations

from typing import Any

from lmforge.pretrain.core.errors import ConfigurationError

# Commands that run as one process per rank; the rest run once, on one node.
TRAINING_COMMANDS = ("pretrain", "finetune")


def config_schema(command: str) -> type:
    """The config dataclass of a training command."""
    if command == "pretrain":
        from lmforge.pretrain.config.schema import PretrainConfig

        return PretrainConfig
    from lmforge.finetune.config import FinetuneConfig

    return FinetuneConfig


def load_command_config(command: str, args: list[str]) -> Any:
    """The validated config of ``lmforge <command> <args>`` for a training command (flags are
    left out)."""
    from lmforge.pretrain.config.schema import load_config

    return load_config(config_schema(command), [a for a in args if not a.startswith("-")])


def workload(command: str, cfg: Any):
    """What a training command trains (a pretrain.run.session.Workload) for its config."""
    if command == "pretrain":
        from lmforge.pretrain.run.pretraining import Pretraining

        return Pretraining(cfg)
    from lmforge.finetune.run import Finetuning

    return Finetuning(cfg)


def check_run_dir(cfg: Any) -> None:
    """Before anything starts: the run directory can be written, and a new run (no `resume`)
    would not write into an existing one. (The run session checks the resume target itself.)"""
    from lmforge.pretrain.core.durable import check_writable
    from lmforge.pretrain.run.session import resolve_resume

    check_writable(cfg.run_dir, "run directory ")
    if cfg.resume is None:
        resolve_resume(run_dir=cfg.run_dir, resume=None)


def check_start(command: str, args: list[str], *, world_size: int, local_ranks: int, on_host=True):
    """Every check the start of ``lmforge <command> <args>`` makes before its first step, in the
    order the run makes them, without a process group and writing nothing: the config, the run
    directory, the data, the base model and tokenizer, the layout, the batch split, the memory
    (``on_host`` False: not at `lmforge submit`, whose host is not the job's nodes) and the
    checkpoint it would resume from. `--dry-run` and `lmforge submit` call it, so that they
    refuse what the run would refuse, with the same line. Returns the workload, its plan and
    the checkpoint it resumes from (None: a new run)."""
    from lmforge.pretrain.run.session import check_resume_target

    work = workload(command, load_command_config(command, args))
    check_run_dir(work.cfg)
    plan = work.preflight(world_size=world_size, local_ranks=local_ranks, memory=on_host)
    return work, plan, check_resume_target(work)


def check_no_nproc(command: list[str], *, launcher: str, option: str, usage: str) -> None:
    """Under `lmforge launch` and `lmforge submit` the processes per node are the launcher's
    ``option`` (``usage``: a command line that gives it), not the command's own ``--nproc``."""
    if any(a == "--nproc" or a.startswith("--nproc=") for a in command[1:]):
        raise ConfigurationError(
            f"`--nproc` after `{command[0]}`: with lmforge {launcher} the processes per node are "
            f"{option}; write `{usage.format(command=command[0])}`"
        )
