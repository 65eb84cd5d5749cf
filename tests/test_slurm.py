"""`lmforge submit` against a real SLURM cluster on this machine (tests/slurm/cluster.sh).

Skipped where no cluster answers; .ci/run starts one. By hand:

    tests/slurm/cluster.sh start && export SLURM_CONF=/tmp/lmforge-slurm/slurm.conf
"""

from __future__ import annotations

import glob
import json
import os
import re
import shlex
import shutil
import subprocess
import time

import pytest

from tests.conftest import REPO, lmforge
from tests.runs import _args, _rows, read_metrics

DEFAULT_CONF = "/tmp/lmforge-slurm/slurm.conf"
if "SLURM_CONF" not in os.environ and os.path.isfile(DEFAULT_CONF):
    os.environ["SLURM_CONF"] = DEFAULT_CONF


def _cluster_up() -> bool:
    if shutil.which("sinfo") is None:
        return False
    try:
        out = subprocess.run(
            ["sinfo", "-h", "-o", "%T"], capture_output=True, text=True, timeout=10
        )
    except (OSError, subprocess.TimeoutExpired):
        return False
    return out.returncode == 0 and "idle" in out.stdout


pytestmark = pytest.mark.skipif(
    not _cluster_up(),
    reason="no SLURM cluster answers: run `tests/slurm/cluster.sh start` (root; installs the "
    "Debian packages) and `export SLURM_CONF=/tmp/lmforge-slurm/slurm.conf`",
)


def job_state(job: str) -> dict[str, str]:
    out = subprocess.run(
        ["scontrol", "show", "job", job], capture_output=True, text=True, check=True
    ).stdout
    return dict(re.findall(r"(\w+)=(\S*)", out))


def wait_for(job: str, states: tuple[str, ...], timeout: float = 300) -> dict[str, str]:
    deadline = time.time() + timeout
    while time.time() < deadline:
        state = job_state(job)
        if state["JobState"] in states:
            return state
        time.sleep(1)
    raise AssertionError(f"job {job} still {job_state(job)['JobState']} after {timeout} s")


def submit(*args: str, env: dict | None = None) -> str:
    out = lmforge("submit", *args, env=env).stdout
    return re.search(r"submitted job (\d+)", out).group(1)


def _job_args(data: str, runs: str, name: str, *extra: str) -> list[str]:
    return _args(data, runs, name, 1, "fp32", "parallel.strategy=ddp", *extra)


def test_submitted_job_trains_like_a_local_run(tiny_data, tmp_path, reference_runs):
    """A 2-task (1 node x 2 processes) pretrain job: metrics equal the local 2-process run's,
    checkpoints, per-rank logs, the batch script and the SLURM log are in the run directory."""
    ref = reference_runs(2, "fp32", "parallel.strategy=ddp")
    runs, name = str(tmp_path), "job"
    job = submit("configs/slurm/local.yaml", "--", "pretrain", *_job_args(tiny_data, runs, name))
    state = wait_for(job, ("COMPLETED", "FAILED", "CANCELLED", "TIMEOUT"))
    run_dir = os.path.join(runs, name)
    log = open(os.path.join(run_dir, "slurm", f"slurm-{job}.out")).read()
    assert state["JobState"] == "COMPLETED", log[-3000:]
    assert _rows(run_dir) == _rows(ref)
    assert os.path.isfile(os.path.join(run_dir, "slurm", f"job-{job}.sbatch"))
    assert os.path.isdir(os.path.join(run_dir, "checkpoints", "step_00000014"))
    assert "lmforge: exit 0" in log and "[rank0]:" in log
    assert len(glob.glob(os.path.join(run_dir, "logs", "*", "rank00[01].out"))) == 2


def test_requeued_job_resumes_from_its_checkpoint(tiny_data, tmp_path, reference_runs):
    """`scontrol requeue` of a running job: it saves on the way out (SIGTERM), restarts by
    itself, resumes from that checkpoint and ends with the uninterrupted run's losses."""
    ref = reference_runs(2, "fp32", "parallel.strategy=ddp")
    runs, name = str(tmp_path), "requeued"
    run_dir = os.path.join(runs, name)
    job = submit(
        "configs/slurm/local.yaml",
        "--",
        "pretrain",
        *_job_args(tiny_data, runs, name),
        env={"LMFORGE_FAULT": "step@3+sleep=5"},  # a 5 s pause after step 3 (sbatch passes env)
    )
    # Requeue in that pause, so that the job is surely still running whatever the machine's speed.
    deadline = time.time() + 180
    while time.time() < deadline:
        metrics = os.path.join(run_dir, "metrics.jsonl")
        if os.path.exists(metrics) and len(open(metrics).readlines()) >= 3:
            break
        time.sleep(0.2)
    subprocess.run(["scontrol", "requeue", job], check=True)
    state = wait_for(job, ("COMPLETED", "FAILED", "CANCELLED"), timeout=300)
    log = open(os.path.join(run_dir, "slurm", f"slurm-{job}.out")).read()
    assert state["JobState"] == "COMPLETED", log[-3000:]
    assert state["Restarts"] == "1"
    assert "stopped by SIGTERM after step" in log  # saved on the way out...
    assert "attempt 1" in log and "resuming from" in log  # ...and resumed by itself
    assert _rows(run_dir) == _rows(ref)


def test_time_limit_saves_on_warning_and_continues_after_requeue(tiny_data, tmp_path):
    """A job whose time limit is shorter than the run: USR1 before the limit, save, requeue,
    resume, ... until done; the steps of all attempts make one unbroken run."""
    runs, name = str(tmp_path), "limited"
    run_dir = os.path.join(runs, name)
    # SLURM checks time limits on a ~30 s tick, so USR1 comes 15-45 s into a 1-minute job: the
    # first attempt must need more than 45 s of training, on any machine and beside any other
    # load. Each of its steps pauses 0.2 s (a fault point's sleep), so 250 steps take at least
    # 50 s; the attempts after the requeue do not pause, and finish the rest in a few seconds.
    steps = 250
    job = submit(
        "configs/slurm/local.yaml",
        "time=00:01:00",
        "signal_grace=45",  # USR1 about 15 s in (SLURM may send it up to ~30 s earlier)
        "--",
        "pretrain",
        *_job_args(tiny_data, runs, name, f"train.max_steps={steps}", "checkpoint.interval=1000"),
        env={"LMFORGE_FAULT": "step+sleep=0.2+attempt=0"},
    )
    state = wait_for(job, ("COMPLETED", "FAILED", "CANCELLED", "TIMEOUT"), timeout=900)
    log = open(os.path.join(run_dir, "slurm", f"slurm-{job}.out")).read()
    assert state["JobState"] == "COMPLETED", log[-3000:]
    assert int(state["Restarts"]) >= 1 and "requeueing" in log
    train = [r["step"] for r in _rows(run_dir) if r["kind"] == "train"]
    assert train == list(range(1, steps + 1))


def submit_chain(*args: str) -> list[str]:
    out = lmforge("submit", *args).stdout
    return re.findall(r"submitted job (\d+)", out)


def test_chain_runs_in_order_and_a_failure_cancels_the_rest(tiny_data, tmp_path):
    """`A ::: B`: B starts after A succeeded (afterok); a failing stage cancels what follows."""
    runs = str(tmp_path)
    model = os.path.join(runs, "a-model")
    first, second = submit_chain(
        "configs/slurm/local.yaml",
        "--",
        "pretrain",
        *_job_args(tiny_data, runs, "a"),
        ":::",
        "consolidate",
        os.path.join(runs, "a"),
        "--out",
        model,
    )
    assert job_state(second)["Dependency"] in (f"afterok:{first}(unfulfilled)", "(null)")
    assert wait_for(second, ("COMPLETED", "FAILED", "CANCELLED"))["JobState"] == "COMPLETED"
    assert job_state(first)["JobState"] == "COMPLETED"
    assert os.path.isfile(os.path.join(model, "model.safetensors"))
    status = lmforge("runs", "--runs-dir", runs).stdout  # the helper that lists runs and jobs
    assert re.search(rf"^a\s+14\s.*step_00000014\s+{first}:COMPLETED", status, re.M), status
    # A stage that fails cancels the stage after it. (Its missing data would be refused at
    # submit: --no-preflight leaves that to the job, as for data only the nodes can see.)
    bad, after = submit_chain(
        "configs/slurm/local.yaml",
        "--no-preflight",
        "--",
        "pretrain",
        *_job_args("/no/such/data", runs, "bad"),
        ":::",
        "pretrain",
        *_job_args(tiny_data, runs, "after-bad"),
    )
    assert wait_for(bad, ("COMPLETED", "FAILED", "CANCELLED"))["JobState"] == "FAILED"
    assert wait_for(after, ("COMPLETED", "FAILED", "CANCELLED"))["JobState"] == "CANCELLED"
    assert not os.path.exists(os.path.join(runs, "after-bad", "metrics.jsonl"))  # never ran


def test_two_node_job_trains_with_four_ranks(tiny_data, tmp_path, reference_runs):
    """Two emulated nodes (two slurmd on this host), 2 processes each: 4 ranks, the same
    metrics as 4 local processes."""
    ref = reference_runs(4, "fp32", "parallel.strategy=ddp")
    runs, name = str(tmp_path), "two-nodes"
    job = submit(
        "configs/slurm/local.yaml",
        "nodes=2",
        "--",
        "pretrain",
        *_job_args(tiny_data, runs, name),
    )
    state = wait_for(job, ("COMPLETED", "FAILED", "CANCELLED"))
    log = open(os.path.join(runs, name, "slurm", f"slurm-{job}.out")).read()
    assert state["JobState"] == "COMPLETED", log[-3000:]
    assert state["NodeList"] == "node[1-2]"
    assert "4 rank(s)" in log
    assert _rows(os.path.join(runs, name)) == _rows(ref)


def test_names_paths_and_arguments_are_quoted(tiny_data, tmp_path):
    """Shell metacharacters in a job name, a path and an argument reach the job literally."""
    runs = os.path.join(str(tmp_path), "odd dir $(touch PWNED) `touch PWNED2`; & |")
    job = submit(
        "configs/slurm/local.yaml",
        "--name",
        "name 'with' $(touch PWNED3); quotes",
        "--",
        "pretrain",
        *_job_args(tiny_data, runs, "q", "train.max_steps=2"),
    )
    state = wait_for(job, ("COMPLETED", "FAILED", "CANCELLED"))
    assert state["JobState"] == "COMPLETED"
    assert job_state(job)["JobName"].startswith("name")
    assert os.path.isdir(os.path.join(runs, "q", "checkpoints", "step_00000002"))
    for cwd in (REPO, str(tmp_path)):
        assert not any(os.path.exists(os.path.join(cwd, p)) for p in ("PWNED", "PWNED2", "PWNED3"))


def test_array_runs_one_task_per_index(tiny_data, tmp_path):
    """A sweep as a job array: {index} in the command becomes each task's index."""
    runs = str(tmp_path)
    job = submit(
        "configs/slurm/local.yaml",
        "--array",
        "0-1",
        "--out-dir",
        runs,
        "--",
        "pretrain",
        *_job_args(tiny_data, runs, "arr-{index}", "seed={index}", "train.max_steps=2"),
    )
    for index in (0, 1):
        state = wait_for(f"{job}_{index}", ("COMPLETED", "FAILED", "CANCELLED"))
        assert state["JobState"] == "COMPLETED"
        assert os.path.isdir(os.path.join(runs, f"arr-{index}", "checkpoints", "step_00000002"))
    seeds = [open(os.path.join(runs, f"arr-{i}", "config.yaml")).read() for i in (0, 1)]
    assert "seed: 0" in seeds[0] and "seed: 1" in seeds[1]


def test_scaling_sweep_runs_as_one_job_array(tiny_data, tmp_path):
    """`lmforge scaling sweep` with launcher=slurm: one array task per point (the index is the
    point's), --wait until they finish, then the fit; a rerun finds every run finished and
    submits nothing."""
    from tests.test_scaling_sweep import sweep_config

    runs = str(tmp_path / "runs")
    cfg = sweep_config(
        tmp_path / "sweep.yaml",
        tiny_data,
        runs,
        launcher="slurm",
        slurm=["configs/slurm/local.yaml", "nproc_per_node=1"],
    )
    out = lmforge("scaling", "sweep", cfg, "--wait", timeout=900).stdout
    job = re.search(r"submitted job (\d+)", out).group(1)
    assert "L(N, D) =" in out
    sweep_dir = os.path.join(runs, "tiny")
    with open(os.path.join(sweep_dir, "plan.json")) as f:
        points = json.load(f)["points"]
    for p in points:
        state = job_state(f"{job}_{p['index']}")
        assert state["JobState"] == "COMPLETED"
        run = os.path.join(sweep_dir, p["name"])
        assert f"max_steps: {p['steps']}" in open(os.path.join(run, "config.yaml")).read()
        assert os.path.isfile(os.path.join(sweep_dir, "slurm", f"slurm-{job}_{p['index']}.out"))
    assert os.path.isfile(os.path.join(sweep_dir, "report", "report.md"))
    again = lmforge("scaling", "sweep", cfg).stdout
    assert f"{len(points)} finished" in again and "submitted job" not in again
    with open(os.path.join(sweep_dir, "slurm", "jobs.json")) as f:
        assert [j["job"] for j in json.load(f)] == [job]


def test_every_byte_reaches_the_job_and_sbatch(tmp_path):
    """Through the real sbatch and srun: the command's arguments reach the process srun starts
    byte for byte (newlines, quotes, `$(...)`, non-UTF-8 bytes; a stub interpreter records its
    argv), a job name and an extra option with quotes, # and tabs reach SLURM unchanged, a log
    directory with % gets the log, and no value runs a command. A name with a line break, which
    no #SBATCH line can hold, is refused in one line."""
    import yaml

    canary = tmp_path / "canary"
    canary.mkdir()
    record = tmp_path / "argv"
    python = tmp_path / "py dir $(x)" / "python"
    python.parent.mkdir()
    python.write_text(f"#!/bin/bash\nprintf '%s\\0' \"$@\" > {shlex.quote(str(record))}\n")
    python.chmod(0o755)
    t = f"touch {canary}/pwned"
    comment = f"c \"q\" 'x' #1 \t$({t}) é"
    profile = tmp_path / "profile.yaml"
    profile.write_text(
        yaml.safe_dump(
            {"partition": "debug", "sbatch": [f"--comment={comment}"], "python": str(python)},
            allow_unicode=True,
        )
    )
    command = [
        "consolidate",
        f"a\n{t} #",
        f"'; {t}; '",
        f"`{t}`",
        "\r\n#SBATCH --time=1\n",
        "-x",
        "",
        "\U0001f600 \udcff",  # the byte 0xff: not UTF-8
    ]
    name = f"n 'q' \"d\" #x \t$({t})"
    out_dir = tmp_path / "logs 50% %j"
    job = submit(str(profile), f"--name={name}", f"--out-dir={out_dir}", "--", *command)
    state = wait_for(job, ("COMPLETED", "FAILED", "CANCELLED"))
    assert state["JobState"] == "COMPLETED", open(out_dir / f"slurm-{job}.out").read()[-3000:]
    argv = record.read_bytes()[:-1].split(b"\0")
    assert argv[argv.index(b"--") + 1 :] == [os.fsencode(a) for a in command]
    for field, want in (("%j", name), ("%k", comment)):
        out = subprocess.run(
            ["squeue", "-h", "-t", "all", "-j", job, "-o", field], capture_output=True, check=True
        ).stdout
        assert out == want.encode() + b"\n", (field, out)
    assert not os.listdir(canary)
    refused = lmforge("submit", str(profile), "--name=a\nb", "--dry-run", "--", "consolidate", "x",
                      check=False)  # fmt: skip
    assert refused.returncode != 0 and "line break" in refused.stderr
    assert len(refused.stderr.strip().splitlines()) == 1


def test_plan_submits_its_run(tiny_data, tmp_path):
    """`lmforge plan --submit PROFILE`: the planned run is submitted through `lmforge submit`
    and trains to its planned last step on the cluster."""
    out, runs = str(tmp_path / "plan"), str(tmp_path / "runs")
    res = lmforge(
        "plan", f"data.path={tiny_data}", f"runs_dir={runs}", "train.seq_len=64",
        "model.max_seq_len=64", "train.micro_batch_size=8", "train.precision=fp32",
        "train.eval_samples=16", "--flops", "2e10", "--law", "besiroglu", "--head-dim", "16",
        "--aspect-ratio", "32", "--name", "planned", "--out", out,
        "--submit", "configs/slurm/local.yaml", "nproc_per_node=1",
    )  # fmt: skip
    job = re.search(r"submitted job (\d+)", res.stdout).group(1)
    state = wait_for(job, ("COMPLETED", "FAILED", "CANCELLED", "TIMEOUT"))
    run_dir = os.path.join(runs, "planned")
    assert state["JobState"] == "COMPLETED", open(
        os.path.join(run_dir, "slurm", f"slurm-{job}.out")
    ).read()[-3000:]
    steps = json.load(open(os.path.join(out, "plan.json")))["tokens"] // (64 * 8)
    evals = [r for r in read_metrics(run_dir) if r["kind"] == "eval"]
    assert evals[-1]["step"] == steps
