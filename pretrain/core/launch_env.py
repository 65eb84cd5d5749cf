"""The world a launcher started: the environments of torchrun, `lmforge launch`, `accelerate
launch` and srun translated into this process's rank, world size and rendezvous address.

Every launcher speaks its own dialect: torchrun, `lmforge launch` (torch elastic) and `accelerate
launch --multi_gpu` set torch's variables (RANK, WORLD_SIZE, LOCAL_RANK, LOCAL_WORLD_SIZE,
MASTER_ADDR, MASTER_PORT); an srun task has only SLURM's (SLURM_PROCID, SLURM_NTASKS,
SLURM_STEP_NODELIST, ...), which :func:`join_launched_world` turns into torch's, asking
``scontrol`` for the first host's address where it is installed. Launchers lmforge cannot join
(MPI, accelerate's plugins, its single-process launcher asked for several) are refused in one
line. Nothing else in lmforge reads these variables to decide who this process is.
"""

from __future__ import annotations

import os
import re
import shutil
import socket
import subprocess
from dataclasses import dataclass

import torch

from lmforge.pretrain.core.errors import ConfigurationError
from lmforge.pretrain.core.runlock import LAUNCHER_ENV


def threads_per_rank(nproc: int) -> int:
    """OMP threads per rank: the CPUs this node gives the job (SLURM's, else all) shared out."""
    cpus = int(os.environ.get("SLURM_CPUS_ON_NODE", "0")) or os.cpu_count() or 1
    return max(1, cpus // nproc)


# Accelerate's launch sets these to run its own DeepSpeed / FSDP / Megatron plugins, which lmforge
# does not read (its parallel section decides).
ACCELERATE_PLUGINS = {
    "ACCELERATE_USE_DEEPSPEED": "parallel.strategy=deepspeed (parallel.deepspeed_config=FILE)",
    "ACCELERATE_USE_FSDP": "parallel.strategy=fsdp",
    "ACCELERATE_USE_MEGATRON_LM": "parallel.tensor_parallel / pipeline_parallel",
}
# MPI launchers' world sizes (Open MPI, MPICH / Intel MPI): lmforge reads none of their ranks.
MPI_SIZES = ("OMPI_COMM_WORLD_SIZE", "PMI_SIZE")


@dataclass(frozen=True)
class LaunchedWorld:
    """This process's place in the world a launcher started."""

    launcher: str
    rank: int
    world_size: int
    local_rank: int
    local_world_size: int

    def describe(self) -> str:
        return (
            f"rank {self.rank} of {self.world_size} ({self.local_world_size} on this node) "
            f"started by {self.launcher}"
        )


def _launcher(env) -> str:
    if under_local_launcher(env):
        return "lmforge launch"
    if any(key.startswith("ACCELERATE_") for key in env):
        return "accelerate launch"
    if "TORCHELASTIC_RUN_ID" in env:
        return "torchrun"
    if "SLURM_STEP_ID" in env and env.get("LMFORGE_FROM_SLURM") == "1":
        return "srun"
    return "a launcher (RANK/WORLD_SIZE are set)"


def _int(env, key: str, who: str) -> int:
    try:
        return int(env[key])
    except (KeyError, ValueError):
        raise ConfigurationError(
            f"{who} set {key}={env.get(key)!r}, not a number: lmforge cannot join that world; "
            "check how the job is launched"
        ) from None


def tasks_on_node(spec: str, node: int) -> int:
    """Tasks on the ``node``-th node of a SLURM per-node count such as ``2(x3),1``."""
    counts: list[int] = []
    for part in spec.split(","):
        found = re.fullmatch(r"(\d+)(?:\(x(\d+)\))?", part.strip())
        if not found:
            raise ValueError(spec)
        counts += [int(found.group(1))] * int(found.group(2) or 1)
    return counts[node]


def first_host(nodelist: str) -> str:
    """The first host of a SLURM host list (``node[03-05,7],gpu1`` -> ``node03``): scontrol's
    expansion where it is installed, else the list's first name and first index."""
    if shutil.which("scontrol"):
        try:
            out = subprocess.run(
                ["scontrol", "show", "hostnames", nodelist],
                capture_output=True,
                text=True,
                timeout=30,
            )
            if out.returncode == 0 and out.stdout.split():
                return out.stdout.split()[0]
        except (OSError, subprocess.TimeoutExpired):
            pass
    found = re.match(r"([^,\[]+)(?:\[([^\]]+)\])?", nodelist)
    if not found:
        return nodelist
    prefix, ranges = found.group(1), found.group(2)
    return prefix + ranges.split(",")[0].split("-")[0] if ranges else prefix


def node_address(host: str) -> str:
    """An address other nodes reach ``host`` at: the name itself where it resolves, else
    SLURM's NodeAddr for it (as lmforge's batch scripts do)."""
    try:
        socket.getaddrinfo(host, None)
        return host
    except OSError:
        pass
    if shutil.which("scontrol"):
        try:
            out = subprocess.run(
                ["scontrol", "show", "node", "-o", host], capture_output=True, text=True, timeout=30
            )
            found = re.search(r"\bNodeAddr=(\S+)", out.stdout)
            if found:
                return found.group(1)
        except (OSError, subprocess.TimeoutExpired):
            pass
    return host


def slurm_port(env) -> int:
    """The rendezvous port of an srun step: MASTER_PORT where set, else one derived from the job
    and step ids (every task of the step computes the same)."""
    job, step = int(env.get("SLURM_JOB_ID", "0")), env.get("SLURM_STEP_ID", "0")
    return 20000 + (job * 31 + (int(step) if step.isdigit() else 0) + 1) % 20000


def _from_slurm(env) -> None:
    """The torch variables of an srun task (one task = one rank), from SLURM's."""
    who = "srun"
    world = _int(
        env, "SLURM_STEP_NUM_TASKS" if "SLURM_STEP_NUM_TASKS" in env else "SLURM_NTASKS", who
    )
    node = _int(env, "SLURM_NODEID", who) if "SLURM_NODEID" in env else 0
    spec = env.get("SLURM_STEP_TASKS_PER_NODE") or env.get("SLURM_TASKS_PER_NODE") or str(world)
    try:
        local_world = tasks_on_node(spec, node)
    except (ValueError, IndexError):
        raise ConfigurationError(
            f"srun set SLURM_STEP_TASKS_PER_NODE={spec!r}, which lmforge cannot read for node "
            f"{node}; set LOCAL_WORLD_SIZE (and RANK, WORLD_SIZE, LOCAL_RANK, MASTER_ADDR, "
            "MASTER_PORT) yourself"
        ) from None
    nodes = env.get("SLURM_STEP_NODELIST") or env.get("SLURM_NODELIST") or "127.0.0.1"
    env.update(
        RANK=str(_int(env, "SLURM_PROCID", who)),
        WORLD_SIZE=str(world),
        LOCAL_RANK=str(_int(env, "SLURM_LOCALID", who) if "SLURM_LOCALID" in env else 0),
        LOCAL_WORLD_SIZE=str(local_world),
        LMFORGE_FROM_SLURM="1",
    )
    if "OMP_NUM_THREADS" not in env:  # the node's CPUs shared out, as `lmforge launch` does
        env["OMP_NUM_THREADS"] = str(threads_per_rank(local_world))
        torch.set_num_threads(int(env["OMP_NUM_THREADS"]))
    env.setdefault("MASTER_ADDR", node_address(first_host(nodes)))
    env.setdefault("MASTER_PORT", str(slurm_port(env)))


def launched_world(env=None) -> LaunchedWorld | None:
    """The world in this process's environment (RANK / WORLD_SIZE / LOCAL_RANK /
    LOCAL_WORLD_SIZE), or None for a process alone (no launcher, or a world of one that no
    launcher made)."""
    env = os.environ if env is None else env
    if "RANK" not in env and "WORLD_SIZE" not in env:
        return None
    who = _launcher(env)
    for key in ("RANK", "WORLD_SIZE"):
        if key not in env:
            raise ConfigurationError(
                f"{'WORLD_SIZE' if key == 'RANK' else 'RANK'} is set but {key} is not: lmforge "
                f"joins a launcher's world from RANK, WORLD_SIZE, LOCAL_RANK, MASTER_ADDR and "
                "MASTER_PORT; launch with torchrun, srun or `lmforge launch`, or unset it"
            )
    rank, world = _int(env, "RANK", who), _int(env, "WORLD_SIZE", who)
    if world == 1 and "TORCHELASTIC_RUN_ID" not in env:
        return None  # alone (e.g. the variables a lone process set for itself)
    if world < 1 or not 0 <= rank < world:
        raise ConfigurationError(
            f"{who} set RANK={rank} and WORLD_SIZE={world}: a rank must be in 0..WORLD_SIZE-1"
        )
    local_rank = _int(env, "LOCAL_RANK", who) if "LOCAL_RANK" in env else None
    if world > 1:
        missing = [k for k in ("LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT") if k not in env]
        if missing:
            raise ConfigurationError(
                f"{who} set RANK={rank} and WORLD_SIZE={world} but not {', '.join(missing)}: "
                "lmforge cannot join that world; set them too, or launch with torchrun, srun or "
                "`lmforge launch`"
            )
    local_world = _int(env, "LOCAL_WORLD_SIZE", who) if "LOCAL_WORLD_SIZE" in env else world
    return LaunchedWorld(who, rank, world, local_rank or 0, local_world)


def join_launched_world(*, nproc: int = 1, env=None) -> LaunchedWorld | None:
    """Before a training command runs: the world a launcher started this process in, which it
    joins as one rank (torchrun, `lmforge launch` and `accelerate launch` set torch's variables;
    an srun task's are set here from SLURM's). Refuses in one line what would run a different
    world than the launcher started: ``--nproc`` other than the launcher's processes on this
    node, accelerate's single-process launcher asked for several, an MPI launcher, accelerate's
    own DeepSpeed/FSDP plugins. None for a process alone."""
    env = os.environ if env is None else env
    if "RANK" not in env and "WORLD_SIZE" not in env:
        tasks = env.get("SLURM_STEP_NUM_TASKS") or env.get("SLURM_NTASKS") or "1"
        if "SLURM_STEP_ID" in env and "SLURM_PROCID" in env and tasks.isdigit() and int(tasks) > 1:
            _from_slurm(env)  # srun started this task as one of several
        elif "ACCELERATE_USE_CPU" in env and "MASTER_ADDR" in env:
            raise ConfigurationError(
                "accelerate launch was asked for several processes but started this one alone "
                "(its single-process launcher, used with --cpu or without several GPUs); run "
                "`accelerate launch --multi_gpu --num_processes N` (torch elastic: CPUs too), or "
                "`lmforge launch --nproc N`"
            )
        else:
            for key in MPI_SIZES:
                if env.get(key, "1").isdigit() and int(env.get(key, "1")) > 1:
                    raise ConfigurationError(
                        f"started by an MPI launcher ({key}={env[key]}), whose ranks lmforge "
                        "does not read: launch with torchrun, srun or `lmforge launch --nproc N`"
                    )
    world = launched_world(env)
    if world is None:
        return None
    for key, instead in ACCELERATE_PLUGINS.items():
        if env.get(key, "").lower() in ("1", "true", "yes"):
            raise ConfigurationError(
                f"accelerate launch set {key}={env[key]}: lmforge does not use accelerate's "
                f"plugins (its parallel section decides); set {instead} and launch with plain "
                "`accelerate launch --multi_gpu` or torchrun"
            )
    mixed = env.get("ACCELERATE_MIXED_PRECISION", "no")
    if mixed not in ("no", "") and world.rank == 0:
        print(
            f"note: accelerate's mixed_precision={mixed} is not read; lmforge's train.precision "
            "decides the run's precision",
            flush=True,
        )
    if nproc > 1 and nproc != world.local_world_size:
        raise ConfigurationError(
            f"--nproc {nproc}: {world.launcher} started this process as one of "
            f"{world.world_size} ranks ({world.local_world_size} on this node), and lmforge "
            "joins that world as one rank; drop --nproc (the launcher decides how many run)"
        )
    return world


def under_local_launcher(env=None) -> bool:
    """Whether this process is a worker that lmforge's own launcher (`lmforge launch`, or a
    command with ``--nproc``) started: that launcher read the data and checked the config before
    it started the workers, and has already said what they would say again."""
    env = os.environ if env is None else env
    return bool(env.get(LAUNCHER_ENV))
