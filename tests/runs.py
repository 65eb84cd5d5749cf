"""What the tests that make real runs share: the config overrides of short runs, a run's metrics
(with or without wall-clock fields), its checkpoints, and uninterrupted reference runs made once
per session (the `reference_runs` fixture, re-exported by conftest.py)."""

from __future__ import annotations

import json
import os

import pytest

from lmforge.pretrain.config.schema import PretrainConfig, load_config, to_yaml
from lmforge.pretrain.forecast.live import FORECAST_FIELDS
from lmforge.pretrain.train.loop import TIME_FIELDS

# Logging that only a person watching would read: no progress bar, no TensorBoard files, no
# loss_vs_flops.png.
QUIET = ["logging.progress=false", "logging.tensorboard=false", "logging.plot=false"]

# The smallest model that trains: 1 layer, width 32, 32-token windows, 2 per micro-batch, fp32.
TINY = [
    "model.n_layer=1",
    "model.n_head=2",
    "model.d_model=32",
    "model.max_seq_len=32",
    "train.seq_len=32",
    "train.micro_batch_size=2",
    "train.global_batch_tokens=128",
    "train.log_interval=1",
    "train.eval_interval=0",
    "train.eval_samples=4",
    "train.precision=fp32",
    *QUIET,
]

# The model of the short runs that are compared with each other: 2 layers, 4 heads, width 64,
# 64-token windows, 4 per micro-batch.
SMALL_MODEL = [
    "model.n_layer=2",
    "model.n_head=4",
    "model.d_model=64",
    "model.max_seq_len=64",
    "train.seq_len=64",
    "train.micro_batch_size=4",
]

# The resume, signal, launcher and SLURM runs (and the finetuning tests' base model): shuffled
# data, dropout, gradient accumulation, a checkpoint every 4 of 14 steps.
STEPS = 14
COMMON = [
    *SMALL_MODEL,
    "model.dropout=0.1",
    "train.global_batch_tokens=2048",
    f"train.max_steps={STEPS}",
    "train.log_interval=1",
    "train.eval_interval=5",
    "train.eval_samples=16",
    "optim.warmup_steps=3",
    "optim.lr=2e-3",
    "checkpoint.interval=4",
    "checkpoint.keep_last=2",
    *QUIET,
    "data.shuffle=true",
]
# wall-clock figures and memory peaks differ between runs
VOLATILE = {
    "time",
    "tokens_per_sec",
    "mfu",
    "peak_mem_gb",
    "eval_seconds",
    *TIME_FIELDS,
    *FORECAST_FIELDS,
}


def _args(data, runs, name, nproc, precision, *extra):
    out = [
        f"data.path={data}",
        f"runs_dir={runs}",
        f"name={name}",
        f"train.precision={precision}",
        *COMMON,
        *extra,
    ]
    return out + (["--nproc", str(nproc)] if nproc > 1 else [])


def read_metrics(run_dir: str) -> list[dict]:
    """The rows of a run's metrics.jsonl, as written."""
    with open(os.path.join(run_dir, "metrics.jsonl")) as f:
        return [json.loads(line) for line in f]


def _rows(run_dir: str) -> list[dict]:
    """The rows of a run's metrics.jsonl without the wall-clock fields: equal for equal runs."""
    return [{k: v for k, v in r.items() if k not in VOLATILE} for r in read_metrics(run_dir)]


def latest_checkpoint(run_dir: str) -> str:
    """The checkpoint a run's `checkpoints/latest` names (e.g. "step_00000008")."""
    with open(os.path.join(run_dir, "checkpoints", "latest")) as f:
        return f.read().strip()


def checkpoint_weights(run_dir: str, step: int) -> dict:
    """The consolidated model weights of a run's checkpoint at `step`."""
    from safetensors.torch import load_file

    path = os.path.join(run_dir, "checkpoints", f"step_{step:08d}", "model.safetensors")
    return load_file(path)


@pytest.fixture(scope="session")
def reference_runs(tiny_data, tmp_path_factory):
    """Uninterrupted runs, made once per (processes, resolved config) and shared by the tests
    that compare against them (by every test process of the session: `made_once`)."""
    import hashlib

    from tests.conftest import lmforge, made_once  # (conftest imports this module)

    def get(nproc: int, precision: str, *extra: str) -> str:
        # Runs whose configs resolve alike are one run (e.g. an explicit default strategy).
        args = _args(tiny_data, "RUNS", "ref", 1, precision, *extra)  # (nproc 1: no flags)
        key = f"{nproc}\n{to_yaml(load_config(PretrainConfig, args))}"
        name = f"ref-{hashlib.sha256(key.encode()).hexdigest()[:12]}"

        def make(run_dir: str) -> None:
            runs, name = os.path.split(run_dir)
            lmforge("pretrain", *_args(tiny_data, runs, name, nproc, precision, *extra))

        return made_once(tmp_path_factory, name, make)

    return get
