"""One run, one writer (pretrain/core/runlock.py): the ranks die with their launcher, a second start of
a running run is refused before it writes anything, and the lock of a holder that died is taken
over with a warning. Real processes, real SIGKILLs; timing comes from fault points, not sleeps."""

from __future__ import annotations

import contextlib
import json
import os
import signal
import socket
import subprocess
import sys
import time

from lmforge.launcher.local import child_pids
from tests.conftest import REPO, lmforge
from tests.runs import _args, latest_checkpoint
from tests.test_resume import assert_same_run


def _start(args: list[str], fault: str) -> subprocess.Popen:
    """`lmforge pretrain ARGS` in the background, paused where ``fault`` says."""
    return subprocess.Popen(
        [sys.executable, "-m", "lmforge.launcher.cli", "pretrain", *args],
        cwd=REPO,
        env=dict(os.environ, PYTHONUNBUFFERED="1", LMFORGE_FAULT=fault),
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
    )


def _alive(pid: int) -> bool:
    """A process that still runs (a zombie waiting to be reaped has ended)."""
    try:
        with open(f"/proc/{pid}/stat") as f:
            state = f.read().rsplit(")", 1)[1].split()[0]
    except (OSError, IndexError):
        return False
    return state not in ("Z", "X")


def _wait(condition, proc: subprocess.Popen, *, seconds: float) -> None:
    deadline = time.time() + seconds
    while time.time() < deadline and proc.poll() is None and not condition():
        time.sleep(0.05)


def _holder(run_dir: str) -> dict:
    """Who the run directory's lock file says holds it ({} when nobody does)."""
    try:
        with open(os.path.join(run_dir, ".lock")) as f:
            return json.loads(f.read() or "{}")
    except (OSError, ValueError):
        return {}


def test_ranks_die_with_their_launcher_and_the_run_resumes_exactly(
    tiny_data, tmp_path, reference_runs
):
    """kill -9 of `lmforge pretrain --nproc 2` mid-run: its ranks die with it (they would go on
    training and saving, unowned), and resume=auto continues exactly, taking over the dead
    launcher's lock with a warning."""
    ref = reference_runs(2, "fp32", "parallel.strategy=ddp")
    runs, name = str(tmp_path), "orphaned"
    run_dir = os.path.join(runs, name)
    args = _args(tiny_data, runs, name, 2, "fp32", "parallel.strategy=ddp")
    launcher = _start(args, "step@5+sleep=30")  # the ranks pause after step 5
    latest = os.path.join(run_dir, "checkpoints", "latest")
    ranks: list[int] = []
    try:
        _wait(lambda: os.path.exists(latest), launcher, seconds=240)
        assert launcher.poll() is None, launcher.communicate()[0][-3000:]
        ranks = child_pids(launcher.pid)
        assert len(ranks) == 2, ranks
        launcher.kill()
        launcher.communicate(timeout=60)
        deadline = time.time() + 5
        while time.time() < deadline and any(_alive(p) for p in ranks):
            time.sleep(0.05)
        assert not [p for p in ranks if _alive(p)], "ranks outlived their launcher's kill -9"
    finally:
        for pid in ranks:  # ranks left running by a failure above
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, signal.SIGKILL)
    assert latest_checkpoint(run_dir) == "step_00000004"
    out = lmforge("pretrain", *args, "resume=auto")
    warning = [line for line in out.stderr.splitlines() if "taking it over" in line]
    assert len(warning) == 1 and f"pid {launcher.pid} on {socket.gethostname()}" in warning[0], (
        out.stderr[-3000:]
    )
    assert_same_run(run_dir, ref)
    assert not os.path.exists(os.path.join(run_dir, ".lock"))  # released at the end


def test_a_second_start_of_a_running_run_is_refused(tiny_data, tmp_path, reference_runs):
    """While `pretrain --nproc 2 resume=auto` runs, the same command (its launcher refuses) and a
    single process (its rank 0 refuses) both exit 2 with one line naming the holder, and write
    nothing: the run directory holds exactly the first run's metrics and checkpoints."""
    ref = reference_runs(2, "fp32", "parallel.strategy=ddp")
    runs, name = str(tmp_path), "contested"
    run_dir = os.path.join(runs, name)
    args = _args(tiny_data, runs, name, 2, "fp32", "parallel.strategy=ddp", "resume=auto")
    # The first start takes the lock, then pauses 5 s before its ranks start: the others try
    # while it holds the lock (as it does until its ranks are done).
    first = _start(args, "launch+sleep=5")
    _wait(lambda: _holder(run_dir).get("pid") == first.pid, first, seconds=60)
    others = [
        subprocess.Popen(
            [sys.executable, "-m", "lmforge.launcher.cli", "pretrain", *a],
            cwd=REPO,
            env=dict(os.environ, PYTHONUNBUFFERED="1"),
            stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT,
            text=True,
        )
        for a in (args, args[: args.index("--nproc")])
    ]
    outs = [p.communicate(timeout=300)[0] for p in others]
    out = first.communicate(timeout=300)[0]
    assert first.returncode == 0, out[-3000:]
    holder = f"pid {first.pid} on {socket.gethostname()}"
    for proc, text in zip(others, outs, strict=True):
        lines = text.strip().splitlines()
        assert proc.returncode == 2, text[-3000:]
        assert len(lines) == 1 and holder in lines[0] and "in use" in lines[0], lines[-20:]
    assert_same_run(run_dir, ref)  # one run's rows and weights: nobody else wrote
    with open(os.path.join(run_dir, "provenance.jsonl")) as f:
        assert len(f.readlines()) == 1
    assert len(os.listdir(os.path.join(run_dir, "logs"))) == 1  # one launcher's rank logs


def test_a_stale_lock_is_taken_over_with_a_warning(tmp_path, capsys):
    """A holder killed with -9 leaves its record in the lock file but not the lock: the next
    start takes it over and says whose it was; a live holder is named in a one-line refusal."""
    from lmforge.pretrain.core.errors import LMForgeError
    from lmforge.pretrain.core.runlock import lock_run_dir

    run_dir = str(tmp_path / "run")
    take_and = f"from lmforge.pretrain.core.runlock import lock_run_dir; held = lock_run_dir({run_dir!r}); "
    dead = subprocess.Popen(
        [sys.executable, "-c", take_and + "import os; os.kill(os.getpid(), 9)"], cwd=REPO
    )
    assert dead.wait(timeout=60) == -signal.SIGKILL
    assert _holder(run_dir)["pid"] == dead.pid  # its record stays behind
    with lock_run_dir(run_dir):
        err = capsys.readouterr().err.strip().splitlines()
        assert len(err) == 1 and "taking it over" in err[0], err
        assert f"pid {dead.pid} on {socket.gethostname()}" in err[0]
        assert _holder(run_dir)["pid"] == os.getpid()
    assert not os.path.exists(os.path.join(run_dir, ".lock"))  # a clean end leaves no record
    with lock_run_dir(run_dir):
        assert capsys.readouterr().err == ""
    # a start that fails before it writes anything leaves no directory it made
    with lock_run_dir(str(tmp_path / "new" / "run")):
        pass
    assert not os.path.exists(tmp_path / "new")

    live = subprocess.Popen(
        [sys.executable, "-c", take_and + "import sys; print(flush=True); sys.stdin.read()"],
        cwd=REPO,
        stdin=subprocess.PIPE,
        stdout=subprocess.PIPE,
        text=True,
    )
    try:
        live.stdout.readline()  # it holds the lock now
        try:
            lock_run_dir(run_dir)
        except LMForgeError as exc:
            message = str(exc)
        else:
            raise AssertionError("a second holder was let in")
        assert "\n" not in message and f"pid {live.pid} on {socket.gethostname()}" in message
        assert "since" in message and "resume=auto" in message
    finally:
        live.kill()
        live.communicate()


def test_a_worker_whose_launcher_is_already_gone_dies_at_once():
    """The race the kernel's parent-death signal leaves open: the launcher died before the
    worker asked for it. The worker sees that its parent is not the launcher that started it."""
    from lmforge.pretrain.core.runlock import LAUNCHER_ENV

    boot = "import lmforge.pretrain.core.runlock as r; r.die_with_launcher(); print('running')"
    for launcher, survives in ((os.getpid(), True), (1, False)):
        out = subprocess.run(
            [sys.executable, "-c", boot],
            cwd=REPO,
            env=dict(os.environ, **{LAUNCHER_ENV: str(launcher)}),
            capture_output=True,
            text=True,
            timeout=60,
        )
        assert (out.returncode, out.stdout) == ((0, "running\n") if survives else (-9, ""))
