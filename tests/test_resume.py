"""Exact resume, tested the hard way: real processes killed with SIGKILL, then relaunched.

The runs shuffle their data, accumulate gradients (> 1 micro-batch per step), use dropout (which
draws random numbers every step), and are killed at a step that is not on the checkpoint cadence.
The relaunched run must give the uninterrupted run's per-step losses and final parameters bitwise.
"""

from __future__ import annotations

import json
import os
import shutil

import pytest
import torch

from lmforge.launcher.cli import main
from tests.conftest import lmforge
from tests.runs import STEPS, _args, _rows, checkpoint_weights, latest_checkpoint


def assert_same_run(run_dir: str, ref_dir: str) -> None:
    got, want = _rows(run_dir), _rows(ref_dir)
    steps = [r["step"] for r in got if r["kind"] == "train"]
    assert steps == list(range(1, STEPS + 1)), f"train rows not one per step: {steps}"
    assert got == want, "metrics differ from the uninterrupted run"
    a, b = checkpoint_weights(run_dir, STEPS), checkpoint_weights(ref_dir, STEPS)
    assert a.keys() == b.keys()
    for k in a:
        assert a[k].dtype == b[k].dtype and a[k].equal(b[k]), f"{k} differs bitwise"


@pytest.mark.parametrize(
    "nproc,precision,strategy",
    [
        (1, "fp32", "ddp"),
        (1, "bf16", "ddp"),
        (2, "fp32", "ddp"),
        (2, "bf16", "ddp"),
        (2, "fp32", "fsdp"),
        (2, "bf16", "fsdp"),
        (2, "fp32", "deepspeed"),
        (2, "fp32", "deepspeed parallel.zero_stage=3"),
        (2, "fp32", "ddp parallel.tensor_parallel=2"),
        (2, "bf16", "ddp parallel.pipeline_parallel=2"),
        (2, "bf16", "deepspeed parallel.zero_stage=1"),
        (4, "fp32", "fsdp parallel.tensor_parallel=2"),
    ],
)
def test_sigkill_mid_run_resumes_exactly(
    tiny_data, tmp_path, capsys, reference_runs, nproc, precision, strategy
):
    par, *more = f"parallel.strategy={strategy}".split()
    ref = reference_runs(nproc, precision, par, *more)
    runs, name = str(tmp_path), "crashy"
    run_dir = os.path.join(runs, name)
    # Killed by SIGKILL right after step 10 (checkpoints every 4 steps: the last good one is 8).
    killed = lmforge(
        "pretrain",
        *_args(tiny_data, runs, name, nproc, precision, par, *more),
        env={"LMFORGE_FAULT": "step@10"},
        check=False,
    )
    assert killed.returncode != 0
    assert latest_checkpoint(run_dir) == "step_00000008"
    assert max(r["step"] for r in _rows(run_dir)) == 9  # rows past the checkpoint exist...
    # Starting the same run again without resume is refused with what to do (before any
    # process starts: checked in this one).
    args = _args(tiny_data, runs, name, nproc, precision, par, *more)
    assert main(["pretrain", *args]) == 2 and "resume=auto" in capsys.readouterr().err
    lmforge("pretrain", *args, "resume=auto")
    assert_same_run(run_dir, ref)  # ...and are not counted twice after the resume
    with open(os.path.join(run_dir, "provenance.jsonl")) as f:
        attempts = [json.loads(line) for line in f]
    assert [a["resumed_from"] is not None for a in attempts] == [False, True]
    assert attempts[1]["resumed_from"].endswith("step_00000008")


@pytest.mark.parametrize("point", ["save:mid-file", "save:before-rename", "save:before-latest"])
def test_crash_during_save_keeps_previous_checkpoint(tiny_data, tmp_path, reference_runs, point):
    """SIGKILL at each moment of step 8's save: `latest` still names step 4, and resume=auto
    gives the uninterrupted run. The mid-file crash runs with checkpoint.consolidated=every: it
    tears model.safetensors (rank 0's first file), and every checkpoint of the resumed run holds
    the weights that consolidate and export rebuild from the reference run's checkpoints, which
    (consolidated=final) hold none but at the end."""
    ref = reference_runs(1, "fp32", "parallel.strategy=ddp")
    runs, name = str(tmp_path), "torn"
    run_dir = os.path.join(runs, name)
    every = ["checkpoint.consolidated=every"] if point == "save:mid-file" else []
    killed = lmforge(
        "pretrain",
        *_args(tiny_data, runs, name, 1, "fp32", *every),
        env={"LMFORGE_FAULT": f"{point}@8"},
        check=False,
    )
    assert killed.returncode != 0
    assert latest_checkpoint(run_dir) == "step_00000004", (
        "latest must still name the previous checkpoint"
    )
    lmforge("pretrain", *_args(tiny_data, runs, name, 1, "fp32", *every, "resume=auto"))
    with open(os.path.join(run_dir, "provenance.jsonl")) as f:
        last = [json.loads(line) for line in f][-1]
    assert last["resumed_from"].endswith("step_00000004")
    assert_same_run(run_dir, ref)
    leftovers = [n for n in os.listdir(os.path.join(run_dir, "checkpoints")) if n.endswith(".tmp")]
    assert not leftovers
    if every:
        _assert_intermediate_checkpoints_rebuild(run_dir, ref, tmp_path)


def _assert_intermediate_checkpoints_rebuild(every_dir: str, ref_dir: str, tmp_path) -> None:
    """``every_dir`` (checkpoint.consolidated=every) holds model.safetensors in each checkpoint;
    ``ref_dir`` (the default, final) only in the last. Consolidate and export rebuild the
    weights of the reference's step 12 from its shards: those of the other run's copy, bitwise."""
    from safetensors.torch import load_file

    from lmforge.finetune.export import export
    from lmforge.pretrain.checkpoint.consolidate import consolidate
    from lmforge.pretrain.model.hf_mapping import to_hf_name

    def has_copy(run: str, step: int) -> bool:
        return os.path.isfile(
            os.path.join(run, "checkpoints", f"step_{step:08d}", "model.safetensors")
        )

    assert has_copy(every_dir, 12) and has_copy(every_dir, STEPS)
    assert not has_copy(ref_dir, 12) and has_copy(ref_dir, STEPS)
    want = checkpoint_weights(every_dir, 12)
    step12 = os.path.join(ref_dir, "checkpoints", "step_00000012")
    got = load_file(os.path.join(consolidate(step12, out=str(tmp_path / "c")), "model.safetensors"))
    assert got.keys() == want.keys() and all(got[k].equal(want[k]) for k in want)
    hf = load_file(os.path.join(export(step12, out=str(tmp_path / "e")), "model.safetensors"))
    assert hf.keys() == {to_hf_name(k) for k in want}
    assert all(hf[to_hf_name(k)].equal(v) for k, v in want.items())


def _stopped_after_step_8(ref: str, run_dir: str) -> None:
    """A copy of the finished run ``ref`` as a run stopped at step 10 would leave it: its
    checkpoints up to step 8 (``latest`` naming it), metric rows past it."""
    shutil.copytree(ref, run_dir)
    ckpts = os.path.join(run_dir, "checkpoints")
    for step in (12, STEPS):
        shutil.rmtree(os.path.join(ckpts, f"step_{step:08d}"))
    with open(os.path.join(ckpts, "latest"), "w") as f:
        f.write("step_00000008")
    assert max(r["step"] for r in _rows(run_dir)) == STEPS  # resume drops the rows past 8


def test_resume_with_other_data_or_shape_is_refused(tiny_data, tmp_path, reference_runs):
    ref = reference_runs(1, "fp32", "parallel.strategy=ddp")
    shutil.copytree(ref, str(tmp_path / "copy"))
    base = _args(tiny_data, str(tmp_path), "copy", 1, "fp32", "resume=auto")
    out = lmforge("pretrain", *base, "train.seq_len=32", check=False)
    assert out.returncode == 2 and "same data.path and train.seq_len" in out.stderr
    out = lmforge("pretrain", *base, "model.d_model=32", check=False)
    assert out.returncode == 2 and "model.d_model=64" in out.stderr
    out = lmforge("pretrain", *base, "parallel.strategy=deepspeed", check=False)
    assert out.returncode == 2 and "resume it with parallel.strategy=ddp or fsdp" in out.stderr


@pytest.mark.parametrize(
    "before,after",
    [
        ((2, "parallel.strategy=fsdp"), (1, "parallel.strategy=ddp")),
        ((1, "parallel.strategy=ddp"), (2, "parallel.strategy=fsdp")),
        ((2, "parallel.tensor_parallel=2"), (2, "parallel.strategy=ddp")),
        ((2, "parallel.pipeline_parallel=2"), (1, "parallel.strategy=ddp")),
        ((2, "parallel.strategy=deepspeed", "parallel.zero_stage=3"), (1, "parallel.strategy=ddp")),
        (
            (2, "parallel.strategy=deepspeed", "parallel.zero_stage=2"),
            (2, "parallel.strategy=fsdp"),
        ),
    ],
    ids=[
        "fsdp2-to-ddp1",
        "ddp1-to-fsdp2",
        "tp2-to-dp2",
        "pp2-to-ddp1",
        "zero3-to-ddp1",
        "zero2-to-fsdp2",
    ],
)
def test_resume_across_strategy_and_world_size(tiny_data, tmp_path, reference_runs, before, after):
    """Weights and optimizer state are resharded on load (DCP); the data order only depends on
    the global batch, so the continuation sees the same samples. Dropout is off: RNG streams
    are per rank and cannot be carried to another world size."""
    # (the reference keeps every checkpoint: its step 8 is where a run stopped at step 10
    # resumes from; the sigkill test above kills real runs)
    ref = reference_runs(
        before[0], "fp32", *before[1:], "model.dropout=0.0", "checkpoint.keep_last=4"
    )
    runs, name = str(tmp_path), "moved"
    _stopped_after_step_8(ref, os.path.join(runs, name))
    out = lmforge(
        "pretrain",
        *_args(
            tiny_data, runs, name, after[0], "fp32", *after[1:], "model.dropout=0.0", "resume=auto"
        ),
    )
    assert "resharded" in out.stdout  # the layout changed: said, not hidden
    if before[0] != after[0]:
        assert "RNG streams" in out.stdout  # so did the world size
    got = [r for r in _rows(os.path.join(runs, name)) if r["kind"] == "train"]
    want = [r for r in _rows(ref) if r["kind"] == "train"]
    assert [r["step"] for r in got] == list(range(1, STEPS + 1))
    torch.testing.assert_close(
        torch.tensor([r["loss"] for r in got]),
        torch.tensor([r["loss"] for r in want]),
        rtol=1e-5,
        atol=1e-6,
    )
    a, b = checkpoint_weights(os.path.join(runs, name), STEPS), checkpoint_weights(ref, STEPS)
    for k in a:
        torch.testing.assert_close(a[k], b[k], rtol=1e-4, atol=1e-6)


@pytest.mark.parametrize(
    "nproc,signame", [(2, "SIGTERM"), (1, "SIGUSR1")], ids=["term-2ranks", "usr1-1rank"]
)
def test_signal_saves_and_resumes_exactly(tiny_data, tmp_path, reference_runs, nproc, signame):
    """SIGTERM (scancel, preemption) or SIGUSR1 (SLURM's time-limit warning) sent to the launcher
    mid-run: every rank finishes its step, saves, exits with 128 + signal; resume=auto then
    gives the uninterrupted run bitwise."""
    import signal
    import subprocess
    import sys
    import time

    from tests.conftest import REPO

    ref = reference_runs(nproc, "fp32", "parallel.strategy=ddp")
    runs, name = str(tmp_path), "signalled"
    run_dir = os.path.join(runs, name)
    args = _args(tiny_data, runs, name, nproc, "fp32", "parallel.strategy=ddp")
    proc = subprocess.Popen(
        [sys.executable, "-m", "lmforge.launcher.cli", "pretrain", *args],
        cwd=REPO,
        env=dict(os.environ, LMFORGE_FAULT="step@6+sleep=3"),  # a 3 s window at step 6
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
    )
    metrics = os.path.join(run_dir, "metrics.jsonl")
    deadline = time.time() + 120
    while time.time() < deadline and proc.poll() is None:
        if os.path.exists(metrics) and any(r["step"] >= 5 for r in _rows(run_dir)):
            break
        time.sleep(0.05)
    proc.send_signal(getattr(signal, signame))
    out, _ = proc.communicate(timeout=120)
    assert proc.returncode == 128 + getattr(signal, signame), out[-3000:]
    assert f"stopped by {signame} after step" in out
    stopped = int(latest_checkpoint(run_dir).removeprefix("step_"))
    assert stopped in (6, 7), stopped  # saved at the stop, not at the 4-step cadence
    # a stop is not the end of training: no consolidated copy (checkpoint.consolidated=final)
    ckpt = os.path.join(run_dir, "checkpoints", f"step_{stopped:08d}")
    assert not os.path.exists(os.path.join(ckpt, "model.safetensors"))
    lmforge("pretrain", *args, "resume=auto")
    assert_same_run(run_dir, ref)


@pytest.mark.parametrize(
    "nproc,fault,signame",
    [(2, "launch", "SIGUSR1"), (1, "preflight", "SIGTERM")],
    ids=["usr1-to-the-launcher-2ranks", "term-during-setup-1rank"],
)
def test_signal_while_starting_stops_after_the_first_step(
    tiny_data, tmp_path, reference_runs, nproc, fault, signame
):
    """A stop signal that comes while the processes are still starting (SLURM may send its
    time-limit warning at once) does not kill them unsaved: it is held, the training stops after
    its first step with a checkpoint and exits 128 + signal, and resume=auto gives the
    uninterrupted run. With 2 ranks the launcher gets it before any worker exists and hands it
    on; with 1 the process gets it while reading its data."""
    import signal

    ref = reference_runs(nproc, "fp32", "parallel.strategy=ddp")
    runs, name = str(tmp_path), "early"
    run_dir = os.path.join(runs, name)
    args = _args(tiny_data, runs, name, nproc, "fp32", "parallel.strategy=ddp")
    proc = lmforge(
        "pretrain", *args, env={"LMFORGE_FAULT": f"{fault}+signal={signame}"}, check=False
    )
    out = proc.stdout + proc.stderr
    assert proc.returncode == 128 + getattr(signal, signame), out[-3000:]
    assert f"stopped by {signame} after step 1 of {STEPS}" in out
    assert latest_checkpoint(run_dir) == "step_00000001"
    lmforge("pretrain", *args, "resume=auto")
    assert_same_run(run_dir, ref)


def test_a_checkpoint_older_than_the_family_switches_still_resumes(
    tiny_data, tmp_path, capsys, reference_runs
):
    """A checkpoint whose config predates model.head_dim, qkv_bias, qk_norm, rope_scaling and
    family (keys it does not hold) ran their defaults: `resume=auto` accepts it."""
    import hashlib

    import yaml

    ref = reference_runs(1, "fp32", "parallel.strategy=ddp")
    run = tmp_path / "old"
    shutil.copytree(ref, run)
    ckpt = run / "checkpoints" / latest_checkpoint(str(run))
    cfg = yaml.safe_load((ckpt / "config.yaml").read_text())
    for key in ("head_dim", "qkv_bias", "qk_norm", "rope_scaling", "family"):
        del cfg["model"][key]
    data = yaml.safe_dump(cfg).encode()
    (ckpt / "config.yaml").write_bytes(data)
    manifest = json.loads((ckpt / "manifest.json").read_text())
    manifest["files"]["config.yaml"] = {
        "sha256": hashlib.sha256(data).hexdigest(),
        "bytes": len(data),
    }
    (ckpt / "manifest.json").write_text(json.dumps(manifest, indent=1))
    args = _args(tiny_data, str(tmp_path), "old", 1, "fp32", "parallel.strategy=ddp")
    assert main(["pretrain", *args, "resume=auto", "--dry-run"]) == 0, capsys.readouterr().err
    assert f"# resumes from {ckpt}" in capsys.readouterr().out
