"""The commands that train: their config schema and what they train, in one table that the CLI,
`lmforge launch` and `lmforge submit` all read (so their pre-launch checks are one code path)."""

from __future__ import annotations

from typing import Any

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
