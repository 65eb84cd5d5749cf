"""`lmforge print-config`: a command's resolved config, its keys, or the shipped presets."""

from __future__ import annotations

import argparse

from lmforge.launcher.cli.common import Handler, add_command
from lmforge.launcher.slurm import SlurmProfile
from lmforge.pretrain.config.presets import listing


def add_parsers(sub: argparse._SubParsersAction) -> None:
    sp = add_command(sub, "print-config", "Print the resolved config of a command.")
    sp.add_argument(
        "--keys", action="store_true", help="list every key with its default and meaning instead"
    )
    sp.add_argument(
        "--presets",
        action="store_true",
        help="list the presets shipped with lmforge (configs/<section>/<name>.yaml), by section, "
        "instead: give one as section=NAME (model=tiny parallel=zero3), by its configs/ path, or "
        "a command's config by name (lmforge pretrain demo)",
    )
    sp.add_argument(
        "--for",
        dest="target",
        choices=["prepare", "pretrain", "finetune", "submit", "scaling"],
        default="pretrain",
        help="which command's config (default pretrain; submit: the SLURM profile; scaling: "
        "a sweep)",
    )


def _schema(command: str):
    """The config dataclass of ``command`` (print-config --for)."""
    from lmforge.finetune.config import FinetuneConfig
    from lmforge.pretrain.config.schema import PrepareConfig, PretrainConfig
    from lmforge.scaling.config import ScalingConfig

    return {
        "prepare": PrepareConfig,
        "pretrain": PretrainConfig,
        "finetune": FinetuneConfig,
        "submit": SlurmProfile,
        "scaling": ScalingConfig,
    }[command]


def _print_config(args: argparse.Namespace, argv: list[str]) -> int:
    from lmforge.pretrain.config.schema import describe_keys, load_config, to_yaml

    schema = _schema(args.target)
    if args.presets:
        print(listing())
    elif args.keys:
        print(describe_keys(schema))
    else:
        print(to_yaml(load_config(schema, args.config)), end="")
    return 0


HANDLERS: dict[str, Handler] = {"print-config": _print_config}
