"""Checkpoints written in the background (`checkpoint.async_save=true`), with real processes:
the same files as synchronous saves, exact resume, a crash while a background write is in
flight, a full disk in the background, a graceful stop and a rollback that wait for the save in
flight."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys

from lmforge.pretrain.checkpoint.store import verify_checkpoint
from tests.conftest import REPO, lmforge
from tests.runs import QUIET, STEPS, _args, latest_checkpoint, read_metrics
from tests.test_anomalies import _run
from tests.test_faults import _one_line
from tests.test_resume import assert_same_run

ASYNC = "checkpoint.async_save=true"


def _checkpoint_files(ckpt: str) -> dict[str, bytes]:
    """What a checkpoint holds that must not depend on how it was written: every file but the
    manifest (its creation time), DCP's metadata (it records the path it was written to) and
    the config (it names the run); the trainer state without its wall-clock seconds."""
    out = {}
    for parent, _, names in os.walk(ckpt):
        for name in names:
            path = os.path.join(parent, name)
            rel = os.path.relpath(path, ckpt)
            if rel in ("manifest.json", "config.yaml", os.path.join("dcp", ".metadata")):
                continue
            with open(path, "rb") as f:
                data = f.read()
            if rel == "trainer_state.json":
                state = json.loads(data)
                state.pop("train_seconds")
                data = json.dumps(state, sort_keys=True).encode()
            out[rel] = data
    return out


def test_async_saves_survive_a_crash_a_stop_and_resume_exactly(tiny_data, tmp_path, reference_runs):
    """Two ranks, DDP, every save in the background. SIGKILL inside step 8's background write:
    `latest` still names step 4 (written in the background too). resume=auto from it, then
    SIGTERM after step 10: the stop's save is waited for before the exit (143, `latest` at the
    stop). resume=auto again: the losses, the weights and every checkpoint file of steps 12
    and 14 equal those of the uninterrupted run with synchronous saves, bitwise."""
    ref = reference_runs(2, "fp32", "parallel.strategy=ddp")
    runs, name = str(tmp_path), "bg"
    run_dir = os.path.join(runs, name)
    root = os.path.join(run_dir, "checkpoints")
    args = _args(tiny_data, runs, name, 2, "fp32", "parallel.strategy=ddp", ASYNC)

    killed = lmforge("pretrain", *args, env={"LMFORGE_FAULT": "save:background@8"}, check=False)
    assert killed.returncode != 0
    assert latest_checkpoint(run_dir) == "step_00000004"
    verify_checkpoint(os.path.join(root, "step_00000004"))
    assert not os.path.exists(os.path.join(root, "step_00000008"))

    stopped = lmforge(
        "pretrain",
        *args,
        "resume=auto",
        env={"LMFORGE_FAULT": "step@10+signal=SIGTERM"},
        check=False,
    )
    out = stopped.stdout + stopped.stderr
    assert stopped.returncode == 128 + signal.SIGTERM, out[-3000:]
    step = int(latest_checkpoint(run_dir).removeprefix("step_"))
    assert step in (10, 11), step  # the ranks agree after the step that saw the signal
    ckpt = os.path.join(root, f"step_{step:08d}")
    verify_checkpoint(ckpt)
    assert f"stopped by SIGTERM after step {step} of {STEPS}; saved {ckpt}" in out
    assert not [n for n in os.listdir(root) if n.endswith(".tmp")]  # step 8's leftovers

    lmforge("pretrain", *args, "resume=auto")
    assert_same_run(run_dir, ref)
    for step in (12, 14):
        got = _checkpoint_files(os.path.join(root, f"step_{step:08d}"))
        want = _checkpoint_files(os.path.join(ref, "checkpoints", f"step_{step:08d}"))
        assert got.keys() == want.keys()
        for rel in got:
            assert got[rel] == want[rel], f"step {step}: {rel} differs from the synchronous save"


def test_a_full_disk_in_the_background_is_one_line(tiny_data, tmp_path):
    """ENOSPC in rank 1's background write of step 8: both ranks report the one-line full-disk
    error at their next wait (the save of step 12) and exit non-zero; step 8's temp directory
    is gone and step 4 stays `latest`, intact."""
    runs, name = str(tmp_path), "full"
    run_dir = os.path.join(runs, name)
    root = os.path.join(run_dir, "checkpoints")
    args = _args(tiny_data, runs, name, 2, "fp32", "parallel.strategy=ddp", ASYNC)
    line = _one_line(
        lmforge(
            "pretrain",
            *args,
            env={"LMFORGE_FAULT": "save:mid-file@8+errno=ENOSPC+rank=1"},
            check=False,
        )
    )
    assert line.startswith("error: [rank 0,1] no space left on device saving checkpoint step 8")
    assert f"{root}/step_00000004 is intact" in line, line
    assert latest_checkpoint(run_dir) == "step_00000004"
    verify_checkpoint(os.path.join(root, "step_00000004"))
    assert sorted(os.listdir(root)) == ["latest", "step_00000004"], "partial checkpoint left"


def test_rollback_waits_for_the_checkpoint_in_flight(tiny_data, tmp_path):
    """train.on_anomaly=rollback with background saves: the NaN at step 5 goes back to step 4's
    checkpoint once its write is published, as with synchronous saves. With
    checkpoint.consolidated=never not even the last checkpoint holds model.safetensors."""
    proc = _run(
        tiny_data,
        str(tmp_path),
        "rb",
        "train.on_anomaly=rollback",
        "train.rollback_lr_factor=0.5",
        "checkpoint.consolidated=never",
        ASYNC,
        fault="loss@5+scale=nan",
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    run_dir = os.path.join(tmp_path, "rb")
    assert f"rolled back to {run_dir}/checkpoints/step_00000004 (step 4)" in proc.stdout
    rows = [r for r in read_metrics(run_dir) if r["kind"] == "train"]
    assert [(r["step"], r["rollbacks"]) for r in rows] == [
        (1, 0), (2, 0), (3, 0), (4, 0), (5, 1), (6, 1)
    ]  # fmt: skip
    assert latest_checkpoint(run_dir) == "step_00000006"
    last = os.path.join(run_dir, "checkpoints", "step_00000006")
    with open(os.path.join(last, "trainer_state.json")) as f:
        assert json.load(f)["rollbacks"] == 1
    assert not os.path.exists(os.path.join(last, "model.safetensors"))
    verify_checkpoint(last)


def test_keep_best_marks_a_checkpoint_written_in_the_background(tmp_path, reference_runs):
    """Finetuning with early_stopping.keep_best: the best (step 2) is saved in the background
    and heard as complete only at step 4's save; it is still the one marked `best` and kept
    past keep_last=1. Early stopping ends the training: step 4's checkpoint is the final one,
    the one with model.safetensors (checkpoint.consolidated=final)."""
    task = tmp_path / "task.csv"
    task.write_text(
        "text,label\n"
        + "".join(f"line {i} of a tale,{'pos' if i % 3 else 'neg'}\n" for i in range(64))
    )
    run = os.path.join(tmp_path, "es")
    lmforge(
        "finetune",
        f"runs_dir={tmp_path}",
        "name=es",
        f"init_from={reference_runs(2, 'fp32', 'parallel.strategy=ddp')}",  # the first test's
        f"task.train={task}",
        "task.max_len=32",
        "train.micro_batch_size=8",
        "train.global_batch_size=16",
        "train.max_steps=8",
        "train.eval_interval=2",
        "train.precision=fp32",
        "checkpoint.interval=4",
        "checkpoint.keep_last=1",
        "early_stopping.patience=1",
        "early_stopping.metric=val_loss",
        "early_stopping.min_delta=100",  # nothing counts as better: stops at the 2nd eval
        "early_stopping.keep_best=true",
        "logging.plot=false",
        *QUIET,
        ASYNC,
    )
    ckpts = os.path.join(run, "checkpoints")
    assert latest_checkpoint(run) == "step_00000004"
    with open(os.path.join(ckpts, "best")) as f:
        assert f.read().strip() == "step_00000002"
    assert sorted(n for n in os.listdir(ckpts) if n.startswith("step_")) == [
        "step_00000002",
        "step_00000004",
    ]
    assert not os.path.exists(os.path.join(ckpts, "step_00000002", "model.safetensors"))
    assert os.path.isfile(os.path.join(ckpts, "step_00000004", "model.safetensors"))


def test_checkpoint_bench_measures_in_the_current_directory(tmp_path):
    """`lmforge bench --checkpoint` on the tiny preset: a row of figures (the saves between the
    first step and the last, the final one with model.safetensors), the parts of the final
    save, the file system named, and nothing left behind where it wrote."""
    out = tmp_path / "bench.md"
    proc = subprocess.run(
        [sys.executable, "-m", "lmforge.launcher.cli", "bench", "--checkpoint", "--models", "tiny"]
        + ["--out", str(out)],
        cwd=tmp_path,
        env=dict(os.environ, PYTHONPATH=REPO),
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    text = out.read_text()
    assert text == proc.stdout
    assert f"{tmp_path} (" in text and "torch " in text
    figures, parts = (
        [c.strip() for c in line.strip("|").split("|")]
        for line in text.splitlines()
        if line.startswith("| tiny |")
    )
    assert len(figures) == 13 and figures[2].endswith(" GB") and figures[4].endswith(" MB/s")
    assert float(figures[6]) > 0  # the save's throughput over the raw write's
    assert figures[7].endswith(" GB") and float(figures[8]) > 0  # the final save, with its copy
    assert len(parts) == 4 and all(p.endswith("%)") or "%, " in p for p in parts[1:3]), parts
    assert parts[3].endswith("%)") or parts[3].startswith("—"), parts  # the rest, if any is left
    assert os.listdir(tmp_path) == ["bench.md"]
