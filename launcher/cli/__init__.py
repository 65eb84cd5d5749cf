"""`lmforge`: one console script, one subcommand per stage.

    lmforge <command> [CONFIG.yaml ...] [section=PRESET.yaml ...] [dotted.key=value ...] [--flags]

Config files and overrides apply in order, later wins. `--flags` are operational options that are
not part of the run's config. Errors a user can fix print one line and exit non-zero; `--debug`
shows the traceback.

Each command lives in a module of this package, which adds its subparser and arguments
(``add_parsers``) and maps the command to its handler (``HANDLERS``: (args, argv) -> exit code).
Handlers import heavy libraries (torch, transformers, ...) where they need them, so that
`lmforge --help` stays fast.
"""

from __future__ import annotations

import argparse
import os
import sys

from lmforge.launcher.cli import (
    bench,
    launch,
    models,
    plan,
    prepare,
    print_config,
    runs,
    scaling,
    submit,
    training,
)
from lmforge.launcher.cli.common import COMMANDS, Handler, Parser
from lmforge.pretrain.core.errors import LMForgeError
from lmforge.pretrain.core.signals import hold_stop_signals

# The command modules, in the order `lmforge --help` lists their commands.
COMMAND_MODULES = (
    prepare,
    training,  # pretrain, finetune
    launch,
    submit,
    runs,
    models,  # consolidate, export, generate, evaluate
    scaling,  # scaling sweep, scaling fit
    plan,
    print_config,
    bench,
)

_BY_NAME = {name: h for module in COMMAND_MODULES for name, h in module.HANDLERS.items()}
# command -> handler(args, argv) -> exit code, in the order of COMMANDS
HANDLERS: dict[str, Handler] = {name: _BY_NAME[name] for name in COMMANDS}


def _parser() -> argparse.ArgumentParser:
    p = Parser(
        prog="lmforge",
        description="Distributed training pipeline for GPT-style language models.",
    )
    sub = p.add_subparsers(dest="command", metavar="COMMAND")
    for module in COMMAND_MODULES:
        module.add_parsers(sub)
    return p


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    cmd: list[str] = []
    if argv[:1] == ["submit"] and "--" in argv:  # submit's own args, then the job's command
        cmd, argv = argv[argv.index("--") + 1 :], argv[: argv.index("--")]
    parser = _parser()
    # Config arguments and --flags may be interleaved: collect the positional leftovers.
    args, extra = parser.parse_known_args(argv)
    unknown = [a for a in extra if a.startswith("-")]
    if unknown or (extra and not hasattr(args, "config")):
        parser.error(f"unrecognized arguments: {' '.join(unknown or extra)}")
    if extra:
        args.config = [*args.config, *extra]
    if not args.command:
        parser.print_help()
        return 2
    if args.command == "submit":
        args.cmd = cmd
    if getattr(args, "trust_checkpoint", False):
        from lmforge.pretrain.core.safeload import TRUST_ENV

        os.environ[TRUST_ENV] = "1"  # read where checkpoints are loaded, worker processes too
    if args.command in ("pretrain", "finetune", "launch"):
        # SIGUSR1/SIGTERM while starting up: stop after the first step, not die unsaved
        hold_stop_signals()
    in_worker = False
    try:
        if args.command in ("pretrain", "finetune"):
            # Started by torchrun, srun, accelerate or `lmforge launch`: join that world as one
            # rank (srun's variables become torch's), or refuse one that cannot be joined.
            from lmforge.pretrain.core.launch_env import join_launched_world

            join_launched_world(nproc=args.nproc)
        in_worker = "LOCAL_RANK" in os.environ and int(os.environ.get("WORLD_SIZE", "1")) > 1
        code = HANDLERS[args.command](args, argv)
    except LMForgeError as exc:
        if args.debug:
            raise
        msg = str(exc).splitlines()[0] if str(exc) else type(exc).__name__
        from lmforge.launcher.local import record_worker_error

        if not (in_worker and record_worker_error(msg)):
            from lmforge.pretrain.core.dist import eprint

            eprint(msg)
        code = exc.exit_code
    except KeyboardInterrupt:
        code = 130
    if in_worker:
        # gloo can abort at interpreter exit (SIGABRT in a destructor): leave without atexit
        # handlers.
        sys.stdout.flush()
        sys.stderr.flush()
        os._exit(code)
    return code
