"""What the command modules share: the parser class, how a command's subparser is made, the list
of lmforge's commands, and the checks of options that several commands take."""

from __future__ import annotations

import argparse
import os
from collections.abc import Callable

from lmforge.pretrain.core.durable import check_writable
from lmforge.pretrain.core.errors import ConfigurationError

# A command's handler: (parsed arguments, the command line) -> exit code.
Handler = Callable[[argparse.Namespace, list[str]], int]

# Every lmforge command, in the order `lmforge launch` lists them for a word that is none of them
# (and the order of HANDLERS); `lmforge --help` lists them in the order of the command modules.
COMMANDS = (
    "print-config",
    "prepare",
    "pretrain",
    "finetune",
    "scaling",
    "plan",
    "launch",
    "submit",
    "runs",
    "consolidate",
    "export",
    "generate",
    "evaluate",
    "bench",
)

EPILOG = """\
Config arguments apply in order, later wins:
  CONFIG.yaml             merge a whole config file
  section=PRESET.yaml     merge a preset into one section, e.g. model=configs/model/tiny.yaml
  section=NAME            a shipped preset by name, e.g. model=tiny parallel=zero3
                          (lmforge print-config --presets lists them)
  dotted.key=value        set one key, e.g. train.max_steps=200 optim.lr=1e-3
See every key with its default and meaning: lmforge print-config --for {command} --keys
"""


class Parser(argparse.ArgumentParser):
    """argparse with its errors on one line: the value and where to look, not the usage (that
    is what --help is for). Subcommands' parsers are of this class too."""

    def error(self, message: str):  # type: ignore[override]
        self.exit(2, f"{self.prog}: error: {message}; see `{self.prog} --help`\n")


def add_command(
    sub: argparse._SubParsersAction, name: str, help_: str, *, config: bool = True
) -> argparse.ArgumentParser:
    """The subparser of command ``name``: with ``config``, the config arguments (files, presets,
    dotted keys) and the epilog that explains them; --debug always."""
    sp = sub.add_parser(
        name,
        help=help_,
        description=help_,
        epilog=EPILOG.format(
            command=name if name in ("prepare", "submit", "finetune", "scaling") else "pretrain"
        )
        if config
        else None,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    if config:
        sp.add_argument(
            "config",
            nargs="*",
            metavar="ARG",
            help="CONFIG.yaml, section=PRESET.yaml or dotted.key=value",
        )
    sp.add_argument("--debug", action="store_true", help="show tracebacks of errors")
    return sp


def add_trust_checkpoint(sp: argparse.ArgumentParser) -> None:
    """--trust-checkpoint, for the commands that read a checkpoint (resume=, init_from=,
    RUN|CHECKPOINT): its pickled parts are checked before anything is unpickled
    (pretrain/core/safeload.py)."""
    sp.add_argument(
        "--trust-checkpoint",
        action="store_true",
        help="load a checkpoint's pickled state even where it names classes lmforge's "
        "checkpoints never hold (such a file can run code): only for a checkpoint whose "
        "source you trust",
    )


def check_nproc(nproc: int) -> None:
    if nproc < 1:
        raise ConfigurationError(f"--nproc {nproc}: give at least one process per node")


def check_out_file(out: str | None, flag: str = "--out") -> None:
    """``flag`` FILE (--out): a file that can be written, said before the work, not after it."""
    if out is None:
        return
    if os.path.isdir(out):
        raise ConfigurationError(f"{flag} {out} is a directory; give a file name")
    if os.path.isfile(out):  # replaced by the new results
        if not os.access(out, os.W_OK):
            raise ConfigurationError(f"{flag} {out} is not writable; give another file name")
        return
    parent = os.path.dirname(os.path.abspath(out))
    if not os.path.lexists(parent):
        raise ConfigurationError(f"{flag} {out}: no directory {parent}; create it first")
    check_writable(out, f"{flag} ")
