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

Every value that reaches the script is encoded so that no byte of it can leave its argument
(see :func:`shell_word` and :func:`_sbatch_value`): whatever a name, a path or an argument holds,
the script has the same lines, all ``#SBATCH`` lines come before its first command, and
``srun`` hands the training exactly the arguments it was given. sbatch runs without a shell.
"""

from __future__ import annotations

import dataclasses
import os
import re
import shutil
import subprocess
import sys
import time
from collections.abc import Collection
from dataclasses import dataclass, field

from lmforge.launcher.commands import (
    TRAINING_COMMANDS,
    check_no_nproc,
    check_start,
    load_command_config,
)
from lmforge.pretrain.core.errors import ConfigurationError, LMForgeError
from lmforge.pretrain.core.signals import PENDING_ENV


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
    """Extra #SBATCH options, one option per entry, each passed to sbatch as one argument (write
    `--constraint=a|b`, no shell quotes), e.g. `--exclusive`, `--constraint=h100`."""
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


# How values reach the script. Two places read them, each with its own rules:
#
# - bash reads the commands. Every argument is one shell word that bash turns back into exactly
#   the bytes the user gave (os.fsencode: an argument that was not valid UTF-8 keeps its bytes):
#   plain when it holds only characters that mean nothing to the shell, in single quotes when it
#   is printable ASCII, else in ANSI-C quotes, $'...', where every byte that is not printable
#   ASCII (newlines, CR, tabs, controls, every byte of non-ASCII text) and ' and \ are written as
#   \xHH. An encoded word is therefore always one line of printable ASCII: no value can end a
#   line, so none can add a command, break `bash -n`, or put a command before an #SBATCH line,
#   and the header comment that repeats the command is as safe as the command. The argv could
#   instead travel as a JSON file beside the script, read back by lmforge in the job; quoting
#   keeps the script self-contained (it can be read, kept and resubmitted by hand, and nothing
#   goes missing when only the script is copied) and needs no second reader of the argv.
# - sbatch reads the #SBATCH lines itself, up to the first command, with its own parser: a line
#   ends at a newline, double quotes group, a backslash escapes the next character, an unquoted
#   # starts a comment. Each value is written in double quotes with \ and " escaped, which
#   carries every character but a line break (checked against SLURM 22.05: quotes, #, tabs, CR,
#   non-ASCII and invalid UTF-8 come back unchanged). A value with a line break cannot be
#   written there and is refused with one line, except a job name lmforge made up itself (from
#   the run's name), whose unprintable characters become "_".

_PLAIN_WORD = re.compile(r"[A-Za-z0-9_@%+=:,./-]+")


def _bytes_of(value: str, what: str) -> bytes:
    try:
        data = os.fsencode(value)
    except UnicodeEncodeError:
        raise ConfigurationError(
            f"{what} {value!r} is not text that a command line can hold"
        ) from None
    if b"\0" in data:
        raise ConfigurationError(f"{what} {value!r}: a NUL byte cannot be passed to a job")
    return data


def shell_word(value: str) -> str:
    """``value`` as one bash word that expands to exactly its bytes: one line of printable
    ASCII, whatever the value holds."""
    data = _bytes_of(value, "argument")
    if _PLAIN_WORD.fullmatch(value):
        return value
    if all(0x20 <= b < 0x7F for b in data):
        return "'" + value.replace("'", "'\\''") + "'"
    return (
        "$'"
        + "".join(chr(b) if 0x20 <= b < 0x7F and b not in b"'\\" else f"\\x{b:02x}" for b in data)
        + "'"
    )


def _no_line_break(value: str, what: str) -> str:
    _bytes_of(value, what)
    if "\n" in value:
        raise ConfigurationError(
            f"{what} {value!r}: an #SBATCH line cannot hold a line break; choose another value"
        )
    return value


def _sbatch_value(value: str, what: str) -> str:
    """A value for an #SBATCH line, double-quoted (sbatch's own parser: no shell)."""
    value = _no_line_break(value, what)
    return '"' + value.replace("\\", "\\\\").replace('"', '\\"') + '"'


def _sbatch_extra(option: str) -> str:
    """One entry of the profile's ``sbatch`` list: one option, one argument."""
    if not option.startswith("-") or option == "--":
        raise ConfigurationError(
            f"sbatch option {option!r}: each entry of `sbatch` is one option, like --exclusive "
            "or --constraint=h100"
        )
    if _PLAIN_WORD.fullmatch(option):
        return option
    return _sbatch_value(option, "sbatch option")


def _output_pattern(log_dir: str, name: str) -> str:
    """--output: the log directory as a SLURM file name pattern, then ``name`` (a pattern)."""
    for char, what in (("\n", "a line break"), ("\\", "a backslash")):
        if char in log_dir:  # (with a backslash sbatch would drop it and expand no %j)
            raise ConfigurationError(
                f"log directory {log_dir!r}: SLURM cannot write a log under a path with {what}; "
                "give --out-dir elsewhere"
            )
    _bytes_of(log_dir, "log directory")
    return os.path.join(log_dir.replace("%", "%%"), name)


def _job_name(name: str) -> str:
    """A job name lmforge chose (from the run's name): unprintable characters become _."""
    return "".join(c if c.isprintable() else "_" for c in name) or "lmforge"


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
    """One argument for the script: encoded, with {index} as the array task's index."""
    parts = arg.split(INDEX)
    return '"${SLURM_ARRAY_TASK_ID}"'.join(shell_word(p) if p else "" for p in parts) or "''"


def command_line(command: list[str]) -> str:
    """``lmforge <command>`` as one line that a shell reads back as ``command`` (for the
    script's header and the messages of submit: never more than one line)."""
    return " ".join(["lmforge", *(shell_word(a) for a in command)])


def batch_script(
    profile: SlurmProfile,
    *,
    command: list[str],
    job_name: str,
    log_dir: str,
    workdir: str,
    array: bool = False,
) -> str:
    """The batch script of ``lmforge <command>`` (a list of arguments, encoded here)."""
    python = profile.python or sys.executable
    if python.startswith("-"):
        raise ConfigurationError(f"python {python!r}: give the interpreter's path")
    options = [
        ("--job-name", job_name),
        ("--nodes", str(profile.nodes)),
        ("--ntasks-per-node", "1"),
        ("--time", profile.time),
        ("--output", _output_pattern(log_dir, "slurm-%A_%a.out" if array else "slurm-%j.out")),
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
        *(f"#SBATCH {flag}={_sbatch_value(value, flag)}" for flag, value in options),
        *(["#SBATCH --requeue"] if profile.requeue else ["#SBATCH --no-requeue"]),
        *(f"#SBATCH {_sbatch_extra(extra)}" for extra in profile.sbatch),
        f"# Generated by `lmforge submit` on {time.strftime('%Y-%m-%d %H:%M:%S')}:",
        f"#   {command_line(command)}",
        "",
        # The stop signals, trapped first thing: USR1 (the time limit is near) and TERM (scancel,
        # preemption) make the training save and exit. The shell hands each one on exactly once
        # and drops none. Before srun starts, a signal is held and goes into srun's environment
        # (LMFORGE_STOP_SIGNAL: pretrain/core/signals.py holds it until the training can stop after
        # a step); once srun's pid is known it is sent to srun. Two gaps are closed on the way:
        # - while bash forks srun, the environment is already fixed and the pid not yet known:
        #   a signal then is seen after `lmforge_pid=$!` (lmforge_pending differs from what went
        #   into the environment) and sent at once;
        # - until the forked copy of this shell has exec'd srun, a signal sent to that pid would
        #   reach the copy's trap and vanish with it at exec: lmforge_stop waits for the exec
        #   (the process's name in /proc changes) before it sends.
        # What is left is inside SLURM: srun may drop a signal that comes while it is still
        # creating its step, and one in srun's (or the launcher's) first instants ends it with
        # 128 + the signal (138 is requeued below, like a save on the warning: nothing had run).
        "lmforge_pid='' lmforge_pending='' lmforge_sent=''",
        "lmforge_stop() {  # $1: USR1 or TERM",
        "  lmforge_pending=$1",
        '  if [ -n "$lmforge_pid" ] && [ "$lmforge_sent" != "$1" ]; then',
        "    lmforge_sent=$1",
        "    lmforge_until_exec",
        '    kill -s "$1" "$lmforge_pid"',
        "  fi",
        "} 2>/dev/null",
        "lmforge_until_exec() {  # until the forked shell has become srun (at most ~1 s)",
        "  local me it n=0",
        "  read -r me < /proc/$$/comm || return 0",
        '  while read -r it < "/proc/$lmforge_pid/comm" && [ "$it" = "$me" ] &&'
        " [ $((n += 1)) -lt 100000 ]; do :; done",
        "}",
        "trap 'lmforge_stop USR1' USR1",
        "trap 'lmforge_stop TERM' TERM",
        "set -u",
        "export PYTHONUNBUFFERED=1",
        *profile.setup,
        f"cd {shell_word(workdir)}",
        "",
        "# One launcher per node; node 0 hosts the rendezvous.",
        'first=$(scontrol show hostnames "$SLURM_JOB_NODELIST" | head -n 1)',
        "# the node's address as SLURM knows it (NodeAddr), else its name",
        "MASTER_ADDR=$(scontrol show node \"$first\" | sed -n 's/.*NodeAddr=\\([^ ]*\\).*/\\1/p')",
        "MASTER_ADDR=${MASTER_ADDR:-$first}",
        "MASTER_PORT=$(( 20000 + SLURM_JOB_ID % 20000 ))",
        'echo "lmforge: job $SLURM_JOB_ID attempt ${SLURM_RESTART_COUNT:-0} on '
        '$SLURM_JOB_NODELIST at $(date)"',
        "lmforge_sent=$lmforge_pending  # a signal held so far goes into srun's environment",
        f'if [ -n "$lmforge_sent" ]; then export {PENDING_ENV}="$lmforge_sent"; fi',
        " ".join(
            [
                "srun --kill-on-bad-exit=1 --ntasks-per-node=1",
                shell_word(python),
                "-m lmforge.launcher.cli launch",
                f"--nproc {profile.procs}",
                '--master-addr "$MASTER_ADDR" --master-port "$MASTER_PORT"',
                "--",
                *(_shell_arg(a) for a in command),
                "&",
            ]
        ),
        "lmforge_pid=$!",
        "# one that came while srun was being forked: send it now",
        'if [ "$lmforge_pending" != "$lmforge_sent" ]; then lmforge_stop "$lmforge_pending"; fi',
        "while :; do",
        '  wait "$lmforge_pid"; code=$?',
        '  kill -0 "$lmforge_pid" 2>/dev/null || break  # wait returned for a signal: keep waiting',
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


def check_script(script: str) -> None:
    """Refuse a script that bash cannot read (only the profile's ``setup`` lines, shell code by
    design, can make one): better one line now than a job that fails at once or, with an
    unterminated here-document, never starts its training; sbatch refuses DOS line breaks."""
    if "\r\n" in script:
        raise ConfigurationError(
            "the batch script has a DOS line break (\\r\\n); check the profile's `setup` lines"
        )
    bash = shutil.which("bash")
    if bash is None:
        return
    proc = subprocess.run(
        [bash, "-n"], input=script.encode("utf-8", "surrogateescape"), capture_output=True
    )
    if proc.returncode != 0 or proc.stderr.strip():
        said = proc.stderr.decode("utf-8", "replace").strip().splitlines()[-1:]
        raise ConfigurationError(
            f"the batch script does not parse ({said[0] if said else 'bash -n failed'}); "
            "check the profile's `setup` lines"
        )


def _print_script(script: str) -> None:
    """Print the script byte for byte (an argument that was not UTF-8 keeps its bytes)."""
    buffer = getattr(sys.stdout, "buffer", None)
    if buffer is None:
        sys.stdout.write(script)
        return
    sys.stdout.flush()
    buffer.write(script.encode("utf-8", "surrogateescape"))
    buffer.flush()


def run_dir_of(command: list[str]) -> str | None:
    """The run directory of a training command (where its script and logs go); its config is
    checked here, before anything is submitted (array indices as 0)."""
    if not command or command[0] not in TRAINING_COMMANDS:
        return None
    return load_command_config(command[0], [a.replace(INDEX, "0") for a in command[1:]]).run_dir


def find_sbatch() -> str:
    sbatch = shutil.which("sbatch")
    if sbatch is None:
        raise ConfigurationError(
            "sbatch not found: run `lmforge submit` on a SLURM login node (or add --dry-run to "
            "see the script)"
        )
    return sbatch


def check_job_start(profile: SlurmProfile, command: list[str]) -> None:
    """What can be checked here of a training job before it is submitted: everything its start
    checks (`launcher.commands.check_start`: config, run directory, data, base model, tokenizer,
    layout for the profile's world size, resume target) but the memory and the precision on
    the devices of its nodes, which this host may not have. Array indices are checked as 0."""
    if not command or command[0] not in TRAINING_COMMANDS:
        return
    args = [a.replace(INDEX, "0") for a in command_with_resume(command)[1:]]
    world = profile.nodes * profile.procs
    from lmforge.pretrain.core.safeload import TRUST_ENV  # (torch: not for --help)

    before = os.environ.get(TRUST_ENV)
    if "--trust-checkpoint" in command:  # read here as the job will read it
        os.environ[TRUST_ENV] = "1"
    try:
        check_start(command[0], args, world_size=world, local_ranks=profile.procs, on_host=False)
    finally:
        if before is None:
            os.environ.pop(TRUST_ENV, None)
        else:
            os.environ[TRUST_ENV] = before


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
    if not job_name:  # made up here: printable whatever the run's name holds
        name = os.path.basename(run_dir) if run_dir else command[0]
        name = _job_name(command[0] + "-array" if array else name)
    else:
        name = _no_line_break(job_name, "--name")
    submitted = command_line(command)
    script = batch_script(
        profile,
        command=command,
        job_name=name,
        log_dir=base,
        workdir=os.getcwd(),
        array=bool(array),
    )
    check_script(script)
    if dry_run:
        _print_script(script)
        return ""
    sbatch = find_sbatch()
    os.makedirs(base, exist_ok=True)
    path = os.path.join(base, f"{re.sub(r'[^A-Za-z0-9._-]+', '_', name)}-{time.time_ns()}.sbatch")
    with open(path, "w", encoding="utf-8", errors="surrogateescape") as f:
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


def submit_chain(
    profile: SlurmProfile,
    *,
    command: list[str],
    dependency=None,
    commands: Collection[str] = (),
    preflight: bool = True,
    **kwargs,
) -> list:
    """``A ::: B ::: C``: one job per stage, each starting only after the previous one
    succeeded (afterok); a failing stage cancels the stages after it. Returns the job ids.
    ``commands``: the lmforge commands a stage may run (the CLI's), checked before submitting;
    the first stage's start is checked here too (``check_job_start``) unless not ``preflight``,
    the later ones' configs only (their inputs may be what the stages before them make)."""
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
    if not kwargs.get("dry_run"):
        find_sbatch()  # before checking what could not be submitted anyway
    for i, stage in enumerate(stages):  # check every stage before submitting any
        if stage[0] in ("submit", "launch"):
            raise ConfigurationError(f"`{stage[0]}` is not a stage")
        if commands and stage[0] not in commands:
            raise ConfigurationError(
                f"`{stage[0]}` is not an lmforge command; a stage is one of: "
                f"{', '.join(sorted(set(commands) - {'submit', 'launch'}))}"
            )
        if stage[0] in TRAINING_COMMANDS:  # its processes are the profile's to give
            check_no_nproc(
                stage,
                launcher="submit",
                option="the profile's `nproc_per_node`",
                usage="lmforge submit nproc_per_node=N -- {command} ...",
            )
        if i == 0 and preflight:
            check_job_start(profile, stage)
        else:
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
        from lmforge.pretrain.config.schema import load_config

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


# --- inside a job: where `lmforge launch` runs under srun -----------------------------------------


def slurm_nodes() -> tuple[int, int]:
    """(nodes, this node's index) of the srun step an `lmforge launch` runs in (of the job
    outside a step; 1, 0 outside SLURM). A step with more tasks than nodes would start several
    launchers per node: refused."""
    env = os.environ
    if "SLURM_STEP_ID" in env and "SLURM_STEP_NUM_NODES" in env:
        nodes, tasks = int(env["SLURM_STEP_NUM_NODES"]), int(env.get("SLURM_STEP_NUM_TASKS", "1"))
        if tasks > nodes:
            raise ConfigurationError(
                f"lmforge launch runs once per node, but this srun step has {tasks} tasks on "
                f"{nodes} node(s): run `srun --ntasks-per-node=1 lmforge launch --nproc N ...`, "
                "or let srun start the ranks: `srun lmforge pretrain ...`"
            )
        return nodes, int(env.get("SLURM_NODEID", "0"))
    return int(env.get("SLURM_NNODES", "1")), int(env.get("SLURM_NODEID", "0"))
