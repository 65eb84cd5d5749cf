"""Short real runs shared by the resume, signal and launcher tests: their arguments, their
metrics without wall-clock fields, and uninterrupted reference runs made once per session."""

from __future__ import annotations

import json
import os

import pytest

STEPS = 14
COMMON = [
    "model.n_layer=2",
    "model.n_head=4",
    "model.d_model=64",
    "model.max_seq_len=64",
    "model.dropout=0.1",
    "train.seq_len=64",
    "train.micro_batch_size=4",
    "train.global_batch_tokens=2048",
    f"train.max_steps={STEPS}",
    "train.log_interval=1",
    "train.eval_interval=5",
    "train.eval_samples=16",
    "optim.warmup_steps=3",
    "optim.lr=2e-3",
    "checkpoint.interval=4",
    "checkpoint.keep_last=2",
    "logging.progress=false",
    "logging.tensorboard=false",
    "data.shuffle=true",
]
VOLATILE = {"time", "tokens_per_sec", "mfu"}  # wall-clock figures differ between runs


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


def _rows(run_dir: str) -> list[dict]:
    with open(os.path.join(run_dir, "metrics.jsonl")) as f:
        rows = [json.loads(line) for line in f]
    return [{k: v for k, v in r.items() if k not in VOLATILE} for r in rows]


@pytest.fixture(scope="session")
def reference_runs(tiny_data, tmp_path_factory):
    """Uninterrupted runs, made once per (processes, precision) and shared by the tests below."""
    from tests.conftest import lmforge  # (conftest imports this module)

    runs = str(tmp_path_factory.mktemp("ref"))
    made: dict[tuple, str] = {}

    def get(nproc: int, precision: str, *extra: str) -> str:
        key = (nproc, precision, *extra)
        if key not in made:
            name = f"ref-{len(os.listdir(runs))}"  # a failed run leaves its directory
            lmforge("pretrain", *_args(tiny_data, runs, name, nproc, precision, *extra))
            made[key] = os.path.join(runs, name)
        return made[key]

    return get
