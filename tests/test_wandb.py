"""W&B (logging.wandb=true), offline: a run stopped mid-way (SIGTERM, as a preemption or a
requeue stops it) and resumed continues the same W&B run (its id kept in `<run>/wandb_id`), and
the offline run files hold the scalars of both attempts."""

from __future__ import annotations

import glob
import os
import struct
import sys

import pytest

from tests.conftest import lmforge
from tests.runs import TINY, latest_checkpoint, read_metrics

wandb_pb = pytest.importorskip("wandb.proto.wandb_internal_pb2")

BLOCK = 32 * 1024  # the .wandb file: a 7-byte header, then records in 32 KiB blocks


def history(path: str) -> list[dict]:
    """The `history` records of an offline run's .wandb file as {key: value} (values JSON)."""
    with open(path, "rb") as f:
        data = f.read()
    assert data[:4] == b":W&B", path
    pos, chunks, rows = 7, b"", []
    while pos + 7 <= len(data):
        left = BLOCK - pos % BLOCK
        if left < 7:  # the rest of a block too short for a header is padding
            pos += left
            continue
        _, length, kind = struct.unpack("<IHB", data[pos : pos + 7])
        if kind == 0 and length == 0:
            pos += left
            continue
        chunks += data[pos + 7 : pos + 7 + length]
        pos += 7 + length
        if kind in (1, 4):  # FULL or LAST: a whole record
            record = wandb_pb.Record()
            record.ParseFromString(chunks)
            chunks = b""
            if record.WhichOneof("record_type") == "history":
                rows.append(
                    {i.key or "/".join(i.nested_key): i.value_json for i in record.history.item}
                )
    return rows


def test_stopped_run_resumes_the_same_wandb_run_offline(tiny_data, tmp_path):
    runs, wandb_dir = tmp_path / "runs", tmp_path / "wandb"
    wandb_dir.mkdir()
    env = {"WANDB_MODE": "offline", "WANDB_DIR": str(wandb_dir), "WANDB_SILENT": "true"}
    args = [
        "pretrain",
        f"data.path={tiny_data}",
        f"runs_dir={runs}",
        "name=w",
        *TINY,
        "train.max_steps=6",
        "checkpoint.interval=2",
        "logging.wandb=true",
        "logging.wandb_project=lmforge-test",
    ]
    stopped = lmforge(*args, env={**env, "LMFORGE_FAULT": "step@3+signal=SIGTERM"}, check=False)
    assert stopped.returncode == 128 + 15, stopped.stdout[-2000:] + stopped.stderr[-2000:]
    run_dir = runs / "w"
    run_id = (run_dir / "wandb_id").read_text().strip()
    stop = int(latest_checkpoint(str(run_dir)).removeprefix("step_"))  # saved at the stop
    assert run_id
    lmforge(*args, "resume=auto", env=env)
    assert (run_dir / "wandb_id").read_text().strip() == run_id
    assert not (run_dir / "wandb").exists()  # $WANDB_DIR wins over the run directory
    attempts = sorted(glob.glob(str(wandb_dir / "wandb" / f"offline-run-*-{run_id}")))
    assert len(attempts) == 2, os.listdir(wandb_dir / "wandb")
    logged = []
    for attempt in attempts:
        (path,) = glob.glob(os.path.join(attempt, f"run-{run_id}.wandb"))
        logged.append(history(path))
    first = [int(float(r["_step"])) for r in logged[0] if "train/loss" in r]
    second = [int(float(r["_step"])) for r in logged[1] if "train/loss" in r]
    assert first == list(range(1, stop + 1)) and 3 <= stop < 6, first
    assert second == list(range(stop + 1, 7)), second
    rows = [r for r in read_metrics(str(run_dir)) if r["step"] > stop]
    for row in rows:  # the same scalars as TensorBoard: every numeric field of every row
        (got,) = [h for h in logged[1] if int(float(h["_step"])) == row["step"]
                  and f"{row['kind']}/tokens" in h]  # fmt: skip
        for key, value in row.items():
            if key not in ("step", "kind") and isinstance(value, (int, float)):
                assert float(got[f"{row['kind']}/{key}"]) == pytest.approx(value), (row, key)
    assert {r["kind"] for r in rows} == {"train", "eval"}, rows


def test_wandb_without_the_extra_is_one_line(monkeypatch):
    """`logging.wandb=true` where wandb cannot be imported: the config says which extra to
    install, before anything runs (sys.modules[name] = None is how Python marks a module that
    cannot be imported)."""
    from lmforge.pretrain.config.schema import PretrainConfig, load_config
    from lmforge.pretrain.core.errors import ConfigurationError

    monkeypatch.setitem(sys.modules, "wandb", None)
    with pytest.raises(ConfigurationError) as err:
        load_config(PretrainConfig, ["demo", "logging.wandb=true"])
    assert str(err.value).startswith(
        "`logging.wandb=true` needs the wandb extra: pip install 'lmforge[wandb]'"
    )
    assert load_config(PretrainConfig, ["demo"]).logging.wandb is False
