"""`lmforge submit`: run any lmforge command as a SLURM batch job.

The batch script is generated here rather than through submitit: submitit pickles a Python
callable and hides the script behind it, while users of clusters want a script they can read,
keep and resubmit by hand. Ours is plain bash, saved in the run directory and printed by
``--dry-run``:

- ``srun`` starts one ``lmforge launch`` per node; each finds its node rank and the node count in
  SLURM's variables and meets the others at the first node (static rendezvous);
- ``--signal=B:USR1@<grace>`` warns the batch shell before the time limit; it forwards USR1 to the
  training, which finishes its step, saves and exits 138, and the script then requeues the job
  (``scontrol requeue``), which resumes from that checkpoint (``resume=auto``);
- SIGTERM (``scancel``, preemption) is forwarded too: the training saves and exits 143 and the
  job is not requeued by us (a cluster that requeues preempted jobs restarts it the same way);
- a run that finishes exits 0 and never requeues; ``--open-mode=append`` keeps the log of every
  attempt in one file.

Every value that reaches the script is quoted (shlex for the shell, double quotes for #SBATCH
lines), and sbatch runs without a shell.
"""

from __future__ import annotations

import dataclasses
import os
import re
import shlex
import shutil
import subprocess
import sys
import time
from dataclasses import dataclass, field

from launcher.commands import TRAINING_COMMANDS, load_command_config
from pretrain.errors import ConfigurationError, LMForgeError
from pretrain.signals import PENDING_ENV


@dataclass
class SlurmProfile:
    """A cluster profile (configs/slurm/*.yaml): where and how big a job is."""

    partition: str | None = None
    """Partition (queue); null = the cluster's default."""
    account: str | None = None
    """Account to charge; null = your default."""
    qos: str | None = None
    """Quality of service; null = the default."""
    nodes: int = 1
    """Nodes per job."""
    gpus_per_node: int = 0
    """GPUs per node (0 on CPU clusters)."""
    nproc_per_node: int | None = None
    """Training processes per node; null = gpus_per_node, or 1 without GPUs."""
    cpus_per_node: int | None = None
    """CPUs per node for the job (OMP threads are split between its processes); null = default."""
    mem: str | None = None
    """Memory per node, e.g. 64G (0 = all of it); null = the cluster's default."""
    time: str = "01:00:00"
    """Time limit per attempt ([D-]HH:MM:SS); a longer run continues after a requeue."""
    signal_grace: int = 120
    """Seconds before the time limit at which SLURM sends USR1: enough to finish a step and
    save a checkpoint."""
    requeue: bool = True
    """Requeue the job after saving on the time-limit warning (and let the cluster requeue it
    after a preemption)."""
    setup: list[str] = field(default_factory=list)
    """Shell lines run before training, e.g. `module load cuda/12.4`, `source venv/bin/activate`."""
    sbatch: list[str] = field(default_factory=list)
    """Extra #SBATCH options, e.g. `--exclusive`, `--constraint=h100`."""
    python: str | None = None
    """Python interpreter on the nodes; null = the one running `lmforge submit`."""

    def __post_init__(self) -> None:
        if self.nodes < 1:
            raise ConfigurationError(f"`nodes` must be >= 1, got {self.nodes}")
        if self.signal_grace < 10:
            raise ConfigurationError(
                f"`signal_grace` is {self.signal_grace} s; give a step and a save time (>= 10)"
            )
        if not re.fullmatch(r"(\d+-)?\d{1,2}(:\d{2}){0,2}", self.time):
            raise ConfigurationError(f"`time` must be [D-]HH:MM:SS, got {self.time!r}")

    @property
    def procs(self) -> int:
        return self.nproc_per_node or self.gpus_per_node or 1


def _one_line(value: str) -> str:
    """Refuse a value that could end its line (and so add lines to the script)."""
    if any(c in value for c in "\n\r\0"):
        raise ConfigurationError(f"{value!r}: line breaks are not allowed in SLURM options")
    return value


def _sbatch_value(value: str) -> str:
    """A value for an #SBATCH line, double-quoted (sbatch reads it literally: no shell)."""
    return '"' + _one_line(value).replace("\\", "\\\\").replace('"', '\\"') + '"'


def command_with_resume(command: list[str]) -> list[str]:
    """Training commands resume by themselves after a requeue: add resume=auto unless given."""
    if command and command[0] in TRAINING_COMMANDS:
        if not any(a.startswith("resume=") for a in command[1:]):
            return [*command, "resume=auto"]
    return command


INDEX = "{index}"  # in a command submitted with --array: this task's index
# sbatch --array: comma-separated indices or ranges with an optional step, then an optional %limit
ARRAY_SPEC = re.compile(r"\d+(-\d+(:\d+)?)?(,\d+(-\d+(:\d+)?)?)*(%\d+)?")


def _shell_arg(arg: str) -> str:
    """One argument for the script: quoted, with {index} as the array task's index."""
    parts = arg.split(INDEX)
    return '"${SLURM_ARRAY_TASK_ID}"'.join(shlex.quote(p) if p else "" for p in parts) or "''"


def batch_script(
    profile: SlurmProfile,
    *,
    command: list[str],
    job_name: str,
    log_dir: str,
    workdir: str,
    submitted: str,
    array: bool = False,
) -> str:
    """The batch script of ``lmforge <command>`` (a list of arguments, quoted here)."""
    python = profile.python or sys.executable
    options = [
        ("--job-name", job_name),
        ("--nodes", str(profile.nodes)),
        ("--ntasks-per-node", "1"),
        ("--time", profile.time),
        ("--output", os.path.join(log_dir, "slurm-%A_%a.out" if array else "slurm-%j.out")),
        ("--open-mode", "append"),
        ("--signal", f"B:USR1@{profile.signal_grace}"),
    ]
    for flag, value in (
        ("--partition", profile.partition),
        ("--account", profile.account),
        ("--qos", profile.qos),
        ("--cpus-per-task", profile.cpus_per_node and str(profile.cpus_per_node)),
        ("--gpus-per-node", profile.gpus_per_node and str(profile.gpus_per_node)),
        ("--mem", profile.mem),
    ):
        if value:
            options.append((flag, value))
    lines = [
        "#!/bin/bash",
        f"# Generated by `lmforge submit` on {time.strftime('%Y-%m-%d %H:%M:%S')}:",
        f"#   {submitted}",
        *(f"#SBATCH {flag}={_sbatch_value(value)}" for flag, value in options),
        *(["#SBATCH --requeue"] if profile.requeue else ["#SBATCH --no-requeue"]),
        *(f"#SBATCH {_one_line(extra)}" for extra in profile.sbatch),
        "",
        "set -u",
        "export PYTHONUNBUFFERED=1",
        "# USR1 (time limit ahead) and TERM (scancel, preemption): the training saves and exits.",
        "# One that comes before the training has started is handed to it when it starts.",
        "child='' pending=''",
        'trap \'pending=USR1; [ -n "$child" ] && kill -USR1 "$child" 2>/dev/null\' USR1',
        'trap \'pending=TERM; [ -n "$child" ] && kill -TERM "$child" 2>/dev/null\' TERM',
        *profile.setup,
        f"cd {shlex.quote(workdir)}",
        "",
        "# One launcher per node; node 0 hosts the rendezvous.",
        'first=$(scontrol show hostnames "$SLURM_JOB_NODELIST" | head -n 1)',
        "# the node's address as SLURM knows it (NodeAddr), else its name",
        "MASTER_ADDR=$(scontrol show node \"$first\" | sed -n 's/.*NodeAddr=\\([^ ]*\\).*/\\1/p')",
        "MASTER_ADDR=${MASTER_ADDR:-$first}",
        "MASTER_PORT=$(( 20000 + SLURM_JOB_ID % 20000 ))",
        'echo "lmforge: job $SLURM_JOB_ID attempt ${SLURM_RESTART_COUNT:-0} on '
        '$SLURM_JOB_NODELIST at $(date)"',
        f'[ -n "$pending" ] && export {PENDING_ENV}="$pending"',
        " ".join(
            [
                "srun --kill-on-bad-exit=1 --ntasks-per-node=1",
                shlex.quote(python),
                "-m launcher.cli launch",
                f"--nproc {profile.procs}",
                '--master-addr "$MASTER_ADDR" --master-port "$MASTER_PORT"',
                "--",
                *(_shell_arg(a) for a in command),
                "&",
            ]
        ),
        "child=$!",
        "while :; do",
        '  wait "$child"; code=$?',
        '  kill -0 "$child" 2>/dev/null || break  # wait returned for a signal: keep waiting',
        "done",
    ]
    if profile.requeue:
        lines += [
            'if [ "$code" -eq 138 ]; then  # saved on the time-limit warning, not done yet',
            '  echo "lmforge: checkpoint saved before the time limit; requeueing $SLURM_JOB_ID"',
            '  scontrol requeue "$SLURM_JOB_ID"',
            "fi",
        ]
    lines += ['echo "lmforge: exit $code at $(date)"', 'exit "$code"', ""]
    return "\n".join(lines)


def run_dir_of(command: list[str]) -> str | None:
    """The run directory of a training command (where its script and logs go); its config is
    checked here, before anything is submitted (array indices as 0)."""
    if not command or command[0] not in TRAINING_COMMANDS:
        return None
    return load_command_config(command[0], [a.replace(INDEX, "0") for a in command[1:]]).run_dir


def submit(
    profile: SlurmProfile,
    *,
    command: list[str],
    job_name: str | None = None,
    dependency: str | None = None,
    array: str | None = None,
    out_dir: str | None = None,
    dry_run: bool = False,
) -> str:
    """Write the batch script and submit it; return the job id ("" with dry_run)."""
    if not command:
        raise ConfigurationError(
            "lmforge submit needs a command after `--`, e.g. "
            "`lmforge submit configs/slurm/local.yaml -- pretrain configs/pretrain/demo.yaml`"
        )
    if command[0] in ("submit", "launch"):
        raise ConfigurationError(f"`lmforge submit -- {command[0]}` is not a job; name a stage")
    if command[0] not in TRAINING_COMMANDS:  # one process does these (prepare, consolidate)
        profile = dataclasses.replace(profile, nodes=1, nproc_per_node=1)
    if array is not None and not ARRAY_SPEC.fullmatch(array):
        raise ConfigurationError(
            f"--array {array!r} is not a SLURM array: use indices like 0-7, 1,3,5, 0-15:4 or "
            "0-99%10"
        )
    command = command_with_resume(command)
    run_dir = run_dir_of(command)
    if any(INDEX in a for a in command) and not array:
        raise ConfigurationError(f"the command uses {INDEX}: give --array INDICES (e.g. 0-7)")
    if array or run_dir is None:  # one place for every task of an array / non-run commands
        base = out_dir or os.path.join("runs", "slurm")
    else:
        base = out_dir or os.path.join(run_dir, "slurm")
    base = os.path.abspath(base)
    name = job_name or (os.path.basename(run_dir) if run_dir else command[0])
    if array:
        name = job_name or command[0] + "-array"
    submitted = "lmforge " + " ".join(shlex.quote(a) for a in command)
    script = batch_script(
        profile,
        command=command,
        job_name=name,
        log_dir=base,
        workdir=os.getcwd(),
        submitted=submitted,
        array=bool(array),
    )
    if dry_run:
        print(script, end="")
        return ""
    sbatch = shutil.which("sbatch")
    if sbatch is None:
        raise ConfigurationError(
            "sbatch not found: run `lmforge submit` on a SLURM login node (or add --dry-run to "
            "see the script)"
        )
    os.makedirs(base, exist_ok=True)
    path = os.path.join(base, f"{re.sub(r'[^A-Za-z0-9._-]+', '_', name)}-{time.time_ns()}.sbatch")
    with open(path, "w") as f:
        f.write(script)
    args = [sbatch, "--parsable"]
    if dependency:
        args.append(f"--dependency={dependency}")
    if array:
        args.append(f"--array={array}")
    proc = subprocess.run([*args, path], capture_output=True, text=True)
    if proc.returncode != 0:
        raise LMForgeError(f"sbatch refused {path}: {proc.stderr.strip().splitlines()[-1:]}")
    job = proc.stdout.strip().split(";")[0]
    final = os.path.join(base, f"job-{job}.sbatch")
    os.replace(path, final)
    log = f"slurm-{job}_<index>.out" if array else f"slurm-{job}.out"
    print(f"submitted job {job}: {submitted}\n  script {final}\n  log    {base}/{log}")
    return job


STAGE_SEPARATOR = ":::"


def submit_chain(profile: SlurmProfile, *, command: list[str], dependency=None, **kwargs) -> list:
    """``A ::: B ::: C``: one job per stage, each starting only after the previous one
    succeeded (afterok); a failing stage cancels the stages after it. Returns the job ids."""
    if not command:
        raise ConfigurationError(
            "lmforge submit needs a command after `--`, e.g. "
            "`lmforge submit configs/slurm/local.yaml -- pretrain configs/pretrain/demo.yaml`"
        )
    stages: list[list[str]] = [[]]
    for arg in command:
        if arg == STAGE_SEPARATOR:
            stages.append([])
        else:
            stages[-1].append(arg)
    if any(not stage for stage in stages):
        raise ConfigurationError(f"an empty stage in `{' '.join(command)}`: A ::: B ::: C")
    for stage in stages:  # check every stage's config before submitting any
        if stage[0] in ("submit", "launch"):
            raise ConfigurationError(f"`{stage[0]}` is not a stage")
        run_dir_of(stage)
    jobs: list[str] = []
    for stage in stages:
        after = f"afterok:{jobs[-1]}" if jobs else dependency
        jobs.append(submit(profile, command=stage, dependency=after, **kwargs))
    if len(jobs) > 1 and jobs[0]:
        print(f"chain: {' -> '.join(jobs)} (each after the previous one succeeded)")
    return jobs


# --- job states and job arrays (`lmforge runs`, `lmforge scaling sweep`) -------------------------

# The states of a job, or of a task of a job array, that has not ended: it waits or runs.
ACTIVE_STATES = (
    "PENDING",
    "RUNNING",
    "CONFIGURING",
    "COMPLETING",
    "REQUEUED",
    "RESIZING",
    "SUSPENDED",
)


def _task_states(job: str) -> list[str]:
    """The JobState of every record `scontrol show job` gives for ``job``: one for a job, one
    per task (or per group of waiting tasks) for a job array; none for a job SLURM forgot."""
    out = subprocess.run(["scontrol", "show", "job", job], capture_output=True, text=True)
    return re.findall(r"JobState=(\S+)", out.stdout)


def job_states(jobs: list[str]) -> dict[str, str]:
    """SLURM state of each job id (scontrol keeps finished jobs for MinJobAge)."""
    if not jobs or shutil.which("scontrol") is None:
        return {}
    states = {}
    for job in jobs:
        found = _task_states(job)
        states[job] = found[0] if found else "gone"
    return states


class SlurmArrays:
    """Job arrays on SLURM for `lmforge scaling sweep` (its `JobArrays`), with the cluster
    profile of the sweep config's ``slurm`` list (profile files and key=value overrides), read
    when an array is submitted."""

    def __init__(self, overrides: list[str]) -> None:
        self.overrides = list(overrides)

    def submit_array(
        self, *, command: list[str], job_name: str, indices: str, out_dir: str, dry_run: bool
    ) -> str:
        from pretrain.config import load_config

        return submit(
            load_config(SlurmProfile, self.overrides),
            command=command,
            job_name=job_name,
            array=indices,
            out_dir=out_dir,
            dry_run=dry_run,
        )

    def active(self, jobs: list[str]) -> list[str]:
        """Those of ``jobs`` with a task still waiting or running."""
        if shutil.which("scontrol") is None:
            return []
        return [job for job in jobs if any(s in ACTIVE_STATES for s in _task_states(job))]
