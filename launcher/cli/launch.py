"""`lmforge launch`: an lmforge command in N processes on this node, or as one node of a
multi-node job; torchrun's options in both spellings."""

from __future__ import annotations

import argparse
import os

from lmforge.launcher.cli.common import COMMANDS, Handler, add_command, check_nproc
from lmforge.launcher.commands import (
    TRAINING_COMMANDS,
    check_no_nproc,
    check_run_dir,
    load_command_config,
    workload,
)
from lmforge.launcher.slurm import slurm_nodes
from lmforge.pretrain.core.errors import ConfigurationError


def _nproc_value(text: str) -> int:
    """``--nproc`` / torchrun's ``--nproc-per-node``: a number, or gpu, cpu, auto."""
    if text in ("gpu", "cpu", "auto"):
        import torch

        gpus = torch.cuda.device_count()
        if text == "gpu" and not gpus:
            raise argparse.ArgumentTypeError("gpu: this node has no visible GPU")
        return gpus if text == "gpu" or (text == "auto" and gpus) else os.cpu_count() or 1
    try:
        return int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r}: give a number, gpu, cpu or auto") from None


def _nnodes_value(text: str) -> int:
    """``--nnodes N`` or torchrun's ``N:N``; an elastic range MIN:MAX cannot be honoured."""
    low, _, high = text.partition(":")
    try:
        n, m = int(low), int(high or low)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r}: give a number of nodes") from None
    if n != m:
        raise argparse.ArgumentTypeError(
            f"{text}: lmforge runs a fixed number of nodes, not an elastic range; give N"
        )
    return n


def add_parsers(sub: argparse._SubParsersAction) -> None:
    sp = add_command(
        sub,
        "launch",
        "Run an lmforge command in N processes on this node, or as one node of a multi-node\n"
        "job (torch elastic underneath; `pretrain --nproc N` is sugar for it). torchrun's\n"
        "options work in both spellings (--nproc-per-node, --nproc_per_node, --node_rank, ...).\n"
        "Plain `torchrun ... $(which lmforge) pretrain ...`, `srun lmforge pretrain ...` and\n"
        "`accelerate launch --multi_gpu ... $(which lmforge) pretrain ...` work as well: each\n"
        "process joins the launcher's world as one rank (docs/launching.md).",
        config=False,
    )
    sp.add_argument(
        "--nproc",
        "--nproc-per-node",
        "--nproc_per_node",
        dest="nproc",
        metavar="N",
        type=_nproc_value,
        default=1,
        help="processes on this node (default 1); gpu = one per visible GPU, cpu = one per CPU, "
        "auto = gpu where there are GPUs, else cpu",
    )
    sp.add_argument(
        "--nnodes",
        type=_nnodes_value,
        metavar="N",
        help="nodes in the job, a fixed number (N or N:N; default: the srun step's nodes, else 1)",
    )
    sp.add_argument(
        "--node-rank",
        "--node_rank",
        dest="node_rank",
        metavar="RANK",
        type=int,
        help="this node's rank (default: $SLURM_NODEID, else 0)",
    )
    _add_rendezvous_options(sp)
    sp.add_argument(
        "--max-restarts",
        "--max_restarts",
        dest="max_restarts",
        type=int,
        default=0,
        metavar="N",
        help="only 0: a failed worker ends the job (resume it with resume=auto, or let "
        "`lmforge submit` requeue it)",
    )
    sp.add_argument(
        "--log-dir",
        "--log_dir",
        dest="log_dir",
        metavar="DIR",
        help="per-rank stdout/stderr files here (default for pretrain: the run's logs/)",
    )
    sp.add_argument(
        "cmd", nargs=argparse.REMAINDER, metavar="COMMAND ...", help="e.g. pretrain CONFIG.yaml"
    )


def _add_rendezvous_options(sp: argparse.ArgumentParser) -> None:
    """Where the nodes meet: torchrun's --master-addr/--master-port, --standalone, --rdzv-*."""
    sp.add_argument(
        "--master-addr",
        "--master_addr",
        dest="master_addr",
        metavar="ADDR",
        help="address of node 0 (static rendezvous)",
    )
    sp.add_argument(
        "--master-port",
        "--master_port",
        dest="master_port",
        metavar="PORT",
        type=int,
        help="port on node 0 (default 29500)",
    )
    sp.add_argument(
        "--standalone",
        action="store_true",
        help="one node, rendezvous on a free local port (what lmforge does by default on one node)",
    )
    sp.add_argument(
        "--rdzv-backend",
        "--rdzv_backend",
        dest="rdzv_backend",
        choices=["c10d", "static"],
        help="c10d (the default with --rdzv-endpoint: node ranks dealt on arrival) or static "
        "(--node-rank; the default with --master-addr)",
    )
    sp.add_argument(
        "--rdzv-endpoint",
        "--rdzv_endpoint",
        dest="rdzv_endpoint",
        metavar="HOST:PORT",
        help="rendezvous address instead of --master-addr/--master-port",
    )
    sp.add_argument(
        "--rdzv-id",
        "--rdzv_id",
        dest="rdzv_id",
        metavar="ID",
        help="job id every node gives (default: $SLURM_JOB_ID, else lmforge)",
    )


def _check_command(args: argparse.Namespace) -> None:
    """The command to launch: an lmforge command other than launch and submit, without its own
    --nproc (args.cmd loses a leading ``--``)."""
    if args.nnodes is not None and args.nnodes < 1:
        raise ConfigurationError(f"--nnodes {args.nnodes}: give at least one node")
    args.cmd = args.cmd[1:] if args.cmd[:1] == ["--"] else args.cmd
    if not args.cmd or args.cmd[0] in ("launch", "submit"):
        raise ConfigurationError(
            "lmforge launch needs the command to run, e.g. "
            "`lmforge launch --nproc 2 pretrain configs/pretrain/demo.yaml`"
        )
    if args.cmd[0] not in COMMANDS:
        raise ConfigurationError(
            f"`{args.cmd[0]}` is not an lmforge command; run one of {', '.join(COMMANDS)}"
        )
    check_no_nproc(
        args.cmd,
        launcher="launch",
        option="launch's option",
        usage="lmforge launch --nproc N {command} ...",
    )


def _launch(args: argparse.Namespace, argv: list[str]) -> int:
    from lmforge.launcher.local import check_rendezvous, launch, static_rendezvous

    check_nproc(args.nproc)
    _check_command(args)
    # Under srun each node's launcher finds its place in SLURM's variables.
    slurm_count, slurm_node = (1, 0) if args.standalone else slurm_nodes()
    nnodes = args.nnodes or slurm_count
    node_rank = slurm_node if args.node_rank is None else args.node_rank
    rdzv = {
        "master_addr": args.master_addr,
        "master_port": args.master_port,
        "rdzv_endpoint": args.rdzv_endpoint,
        "rdzv_backend": args.rdzv_backend,
        "standalone": args.standalone,
    }
    check_rendezvous(nnodes=nnodes, node_rank=node_rank, max_restarts=args.max_restarts, **rdzv)
    run_dir = None
    cfg = None
    if args.cmd[0] in TRAINING_COMMANDS:
        cfg = load_command_config(args.cmd[0], args.cmd[1:])
        run_dir = cfg.run_dir
    elif args.nproc * nnodes > 1:
        raise ConfigurationError(
            f"`lmforge {args.cmd[0]}` runs once, not once per process: run it without launch "
            f"(only {' and '.join(TRAINING_COMMANDS)} run one process per rank)"
        )
    log_dir = args.log_dir
    if log_dir is None and run_dir is not None:
        log_dir = os.path.join(run_dir, "logs")
    if cfg is not None and "--dry-run" not in args.cmd:
        # bad data, base, tokenizer, layout, memory or run directory: one line here, before any
        # process starts (each worker would otherwise print it)
        check_run_dir(cfg)
        workload(args.cmd[0], cfg).preflight(world_size=args.nproc * nnodes, local_ranks=args.nproc)
    # The launcher of rank 0's node holds the run's lock for its workers (pretrain/core/runlock.py):
    # the one node, or node rank 0 of a static rendezvous; with c10d ranks are dealt on
    # arrival, so rank 0 takes it itself. --dry-run writes nothing and takes no lock.
    static = static_rendezvous(args.rdzv_backend, args.rdzv_endpoint)
    if "--dry-run" in args.cmd or not (nnodes == 1 or (static and node_rank == 0)):
        run_dir = None
    return launch(
        args.cmd,
        nproc=args.nproc,
        nnodes=nnodes,
        node_rank=node_rank,
        run_id=args.rdzv_id,
        log_dir=log_dir,
        run_dir=run_dir,
        **rdzv,
    )


HANDLERS: dict[str, Handler] = {"launch": _launch}
