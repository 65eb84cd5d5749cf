"""Numerics and hangs: what a NaN/Inf loss or gradient, or a loss spike, does under each
`train.on_anomaly` policy (stop, skip, rollback), and a rank stuck past `parallel.timeout_s`.

The policies' exact effect is checked on the trainer alone (tests/test_trainer_loop.py's fake
strategy: fast, bit-for-bit against a run without the offending update); real runs check the
same with an injected fault (`LMFORGE_FAULT=loss@STEP+scale=nan`): two gloo ranks that agree to
skip when only one sees the NaN, a rollback through real checkpoints, today's stop, and a hang.
"""

from __future__ import annotations

import copy
import json
import os
import subprocess
import sys
import time

import pytest
import torch

import lmforge.pretrain.train.loop as trainer_module
from lmforge.pretrain.config.schema import PretrainConfig, describe_keys, load_config
from lmforge.pretrain.core.errors import ConfigurationError, TrainingError
from lmforge.pretrain.model.loss import StageLoss
from lmforge.pretrain.train.loop import AnomalyPolicy, Callback, Trainer
from tests.conftest import REPO, lmforge
from tests.gloo_workers import run_distributed
from tests.runs import TINY, latest_checkpoint, read_metrics
from tests.test_trainer_loop import FixedBatches, make_trainer

RUN = [*TINY, "train.peak_flops=1e12", "logging.plot=false"]  # no FLOP/s probe, no plot

# --- the trainer alone -------------------------------------------------------------------------


def inject(monkeypatch, factors: dict[int, float], *, once: bool = True) -> None:
    """Scale the loss of the given steps, as LMFORGE_FAULT=loss@STEP+scale=X does."""
    fired: set[int] = set()

    def fault_scale(name: str, *, step: int) -> float:
        if name != "loss" or step not in factors or (once and step in fired):
            return 1.0
        fired.add(step)
        return factors[step]

    monkeypatch.setattr(trainer_module, "fault_scale", fault_scale)


class Snapshots(Callback):
    """The weights and the schedule's position after every step, and every row."""

    def __init__(self) -> None:
        self.weights: dict[int, dict] = {}
        self.epochs: dict[int, int] = {}
        self.rows: list[dict] = []

    def on_step_end(self, trainer: Trainer) -> None:
        self.weights[trainer.state.step] = copy.deepcopy(trainer.model.state_dict())
        self.epochs[trainer.state.step] = trainer.scheduler.last_epoch

    def on_log(self, trainer: Trainer, row: dict) -> None:
        self.rows.append(row)


def same(a: dict, b: dict) -> bool:
    return a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


def load_copy(trainer: Trainer, path: str) -> dict:
    """Load the fake strategy's in-memory checkpoint ``path`` into ``trainer`` as a copy (a
    loaded optimizer state shares its tensors: training on must not change the checkpoint)."""
    saved = copy.deepcopy(trainer.strategy.saved[path])
    trainer.model.load_state_dict(saved["model"])
    trainer.optimizer.load_state_dict(saved["optim"])
    return saved["trainer"]


def with_loader(trainer: Trainer) -> Trainer:
    """Rollback's loader on the fake strategy's in-memory checkpoints."""
    trainer.load_fn = load_copy
    return trainer


class SkipsThird(FixedBatches):
    """The batches of a run that never read step 3's."""

    def next_step(self) -> list[dict]:
        if self.position == 2:
            self.position += 1
        return super().next_step()


def test_skip_drops_exactly_that_update(monkeypatch):
    """skip: no optimizer or schedule step, the step and its data count as done, no row for an
    interval of skipped steps, the count in the next rows; the weights end equal, bit for bit,
    to a run that never saw step 3's batch."""
    inject(monkeypatch, {3: float("nan")})
    seen = Snapshots()
    trainer = make_trainer(
        total_steps=6, log_interval=1, callbacks=[seen], anomaly=AnomalyPolicy("skip")
    )
    trainer.fit()
    assert trainer.state.step == 6 and trainer.state.skipped_steps == 1
    assert trainer.train_batches.position == 6  # step 3's batch was read, not trained on
    assert same(seen.weights[3], seen.weights[2]) and not same(seen.weights[4], seen.weights[3])
    assert [seen.epochs[s] for s in range(1, 7)] == [1, 2, 2, 3, 4, 5]  # no schedule step
    assert all(st["step"] == 5 for st in trainer.optimizer.state.values())  # 5 Adam updates
    train = [r for r in seen.rows if r["kind"] == "train"]
    assert [r["step"] for r in train] == [1, 2, 4, 5, 6]  # step 3 alone: no row
    assert [r["skipped_steps"] for r in train] == [0, 0, 1, 1, 1]
    assert all(r["rollbacks"] == 0 for r in train)

    reference = make_trainer(total_steps=5, log_interval=1)
    reference.train_batches = SkipsThird()
    reference.fit()
    assert same(reference.model.state_dict(), trainer.model.state_dict())


def test_spikes_and_bad_gradients_are_anomalies(monkeypatch):
    """A spike counts only after the warm-up and against the running mean of good steps;
    non-finite gradients under a finite loss are an anomaly too; `stop` with a spike threshold
    checks every step and names the step."""
    inject(monkeypatch, {2: 10.0, 5: 100.0})  # step 2 is inside the warm-up
    policy = AnomalyPolicy("skip", spike_factor=3.0, spike_warmup=3)
    trainer = make_trainer(total_steps=6, log_interval=1, anomaly=policy)
    trainer.fit()
    assert trainer.state.skipped_steps == 1  # step 5 only
    assert trainer.state.loss_avg_steps == 5 and trainer.state.loss_avg > 0

    class InfGradsAt2(Callback):
        def on_step_end(self, trainer):
            if trainer.state.step == 1:
                weight = trainer.model.out.weight
                self.hook = weight.register_hook(lambda g: g * float("inf"))

    trainer = make_trainer(
        total_steps=4, callbacks=[InfGradsAt2()], anomaly=AnomalyPolicy(spike_factor=3.0)
    )
    with pytest.raises(TrainingError, match=r"the gradients are not finite at step 2 \(loss "):
        trainer.fit()
    assert trainer.state.step == 1 and trainer.saves == []


def test_the_injected_loss_is_one_object_for_the_run(monkeypatch):
    """A pipeline builds its schedule once per loss object: a fault must not swap the object
    (on one rank only, that desynchronised the stages)."""
    inject(monkeypatch, {2: float("nan")})
    trainer = make_trainer()
    first, second = trainer._loss_fn(1), trainer._loss_fn(2)
    assert first is second and isinstance(first, StageLoss)
    batch = FixedBatches()._batch(1)
    assert torch.isnan(first(trainer.model, batch)) and first.factor != 1.0
    assert trainer._loss_fn(3)(trainer.model, batch).isfinite()


def test_skip_gives_up_after_too_many_in_a_row(monkeypatch):
    inject(monkeypatch, {s: float("nan") for s in range(2, 9)})
    policy = AnomalyPolicy("skip", max_consecutive_skips=2)
    trainer = make_trainer(total_steps=8, anomaly=policy)
    with pytest.raises(TrainingError, match="loss is nan at step 4, 3 steps in a row"):
        trainer.fit()
    assert trainer.state.skipped_steps == 2


def test_rollback_goes_back_skips_the_data_and_lowers_the_lr(monkeypatch):
    """rollback at step 5 (checkpoints every 2 steps): back to step 4's state, step 5's batch
    never read again, the learning rate halved from there; the weights end equal to a run
    resumed from step 4 past that batch with half the learning rate. Counters go into the
    checkpoints and come back on a resume."""
    inject(monkeypatch, {5: float("nan")})
    seen = Snapshots()
    policy = AnomalyPolicy("rollback", rollback_lr_factor=0.5)
    trainer = make_trainer(
        total_steps=6, checkpoint_interval=2, log_interval=1, callbacks=[seen], anomaly=policy
    )
    with_loader(trainer).fit()
    assert trainer.state.step == 6 and trainer.state.rollbacks == 1
    assert trainer.state.lr_scale == 0.5 and trainer.train_batches.position == 7
    assert trainer.saves == [2, 4, 6] and trainer.optimizer.param_groups[0]["lr"] == 0.5e-2
    saved = trainer.strategy.saved["ckpt/6"]["trainer"]
    assert (saved["rollbacks"], saved["lr_scale"], saved["skipped_steps"]) == (1, 0.5, 0)
    train = [r for r in seen.rows if r["kind"] == "train"]
    assert [(r["step"], r["rollbacks"]) for r in train] == [
        (1, 0), (2, 0), (3, 0), (4, 0), (5, 1), (6, 1)
    ]  # fmt: skip
    assert [r["lr"] for r in train][-2:] == [0.5e-2, 0.5e-2]

    reference = make_trainer(total_steps=6, checkpoint_interval=2)
    reference.strategy.saved = trainer.strategy.saved
    reference.load_state_dict(load_copy(reference, "ckpt/4"))
    reference.train_batches.position = 5
    for group in reference.optimizer.param_groups:
        group["lr"] *= 0.5
    reference.scheduler.base_lrs = [lr * 0.5 for lr in reference.scheduler.base_lrs]
    reference.fit()
    assert same(reference.model.state_dict(), trainer.model.state_dict())

    resumed = make_trainer(total_steps=6)
    resumed.load_state_dict(saved)
    assert (resumed.state.rollbacks, resumed.state.lr_scale) == (1, 0.5)
    old = {k: v for k, v in saved.items() if k not in ("rollbacks", "lr_scale", "skipped_steps")}
    resumed.load_state_dict(old)  # a checkpoint from before these counters existed
    assert (resumed.state.rollbacks, resumed.state.lr_scale, resumed.state.skipped_steps) == (
        0,
        1.0,
        0,
    )


def test_rollback_without_a_checkpoint_or_past_its_limit_is_one_line(monkeypatch):
    inject(monkeypatch, {1: float("inf")})
    trainer = make_trainer(checkpoint_interval=2, anomaly=AnomalyPolicy("rollback"))
    with pytest.raises(TrainingError) as info:
        with_loader(trainer).fit()
    assert str(info.value).startswith(
        "loss is inf at step 1 and train.on_anomaly=rollback has no checkpoint to go back to yet"
    )
    assert "\n" not in str(info.value)

    inject(monkeypatch, {3: float("nan")}, once=False)  # the same bad batch every time
    trainer = make_trainer(
        checkpoint_interval=2, anomaly=AnomalyPolicy("rollback", max_rollbacks=1)
    )
    with pytest.raises(TrainingError, match="loss is nan at step 3 after 1 rollback ") as info:
        with_loader(trainer).fit()
    assert (
        "(train.max_rollbacks=1): stopped without saving; the last good checkpoint is ckpt/2"
        in (str(info.value))
    )
    assert trainer.state.rollbacks == 1


def test_the_keys_are_checked_and_documented():
    base = ["data.path=x", "name=n", "train.max_steps=3"]
    for bad, words in [
        ("train.on_anomaly=retry", "train.on_anomaly"),
        ("train.spike_factor=0.5", "train.spike_factor"),
        ("train.max_rollbacks=0", "train.max_rollbacks"),
        ("train.max_skipped_fraction=1.5", "train.max_skipped_fraction"),
        ("train.max_skipped_fraction=-0.1", "train.max_skipped_fraction"),
        ("train.rollback_lr_factor=0", "train.rollback_lr_factor"),
        ("parallel.timeout_s=0", "parallel.timeout_s"),
    ]:
        with pytest.raises(ConfigurationError, match=words):
            load_config(PretrainConfig, [*base, bad])
    with pytest.raises(ConfigurationError, match="deepspeed"):
        load_config(PretrainConfig, [*base, "train.on_anomaly=skip", "parallel.strategy=deepspeed"])
    with pytest.raises(ConfigurationError, match="checkpoint.interval"):
        load_config(PretrainConfig, [*base, "train.on_anomaly=rollback", "checkpoint.interval=0"])
    cfg = load_config(PretrainConfig, base)
    assert cfg.train.on_anomaly == "stop" and cfg.train.spike_factor == 0
    assert cfg.parallel.timeout_s == 1800
    keys = describe_keys(PretrainConfig)
    for key in (
        "train.on_anomaly = 'stop'  # What a step with an anomaly does",
        "train.spike_factor = 0.0",
        "train.spike_warmup = 10",
        "train.max_consecutive_skips = 10",
        "train.max_skipped_fraction = 0.1  # on_anomaly=skip: a run that ends with more",
        "train.max_rollbacks = 3",
        "train.rollback_lr_factor = 1.0",
        "parallel.timeout_s = 1800.0  # Seconds a collective waits",
    ):
        assert key in keys


# --- real runs ---------------------------------------------------------------------------------


def _skip_on_two_ranks(rank, world, data, runs):
    from lmforge.pretrain.run.pretraining import run_pretrain

    seen = Snapshots()

    class Weights(Callback):
        def on_step_end(self, trainer):
            model = trainer.strategy.unwrap(trainer.model)
            seen.weights[trainer.state.step] = {
                k: v.detach().clone() for k, v in model.state_dict().items()
            }
            seen.epochs[trainer.state.step] = trainer.scheduler.last_epoch

        def on_train_end(self, trainer):
            seen.samples = trainer.train_batches.samples_consumed
            seen.global_batch = trainer.train_batches.global_batch

    cfg = load_config(
        PretrainConfig,
        [
            f"data.path={data}",
            f"runs_dir={runs}",
            "name=skip",
            "train.max_steps=5",
            "train.on_anomaly=skip",
            "train.max_skipped_fraction=0.5",  # 1 of 5 steps
            "checkpoint.interval=0",
            *RUN,
        ],
    )
    run_pretrain(cfg, callbacks=[Weights()])
    return seen.weights, seen.epochs, seen.samples, seen.global_batch


def test_two_ranks_skip_together_when_one_sees_a_nan(tiny_data, tmp_path, monkeypatch):
    """Only rank 1's loss is NaN at step 3 (its gradients, all-reduced, poison both ranks'):
    both ranks skip that update, keep identical weights, and finish; the rows count the skip."""
    monkeypatch.setenv("LMFORGE_FAULT", "loss@3+scale=nan+rank=1")
    (w0, e0, n0, gb), (w1, _, n1, _) = run_distributed(
        _skip_on_two_ranks, tiny_data, str(tmp_path), world_size=2
    )
    assert all(same(w0[s], w1[s]) for s in range(1, 6))  # the ranks agree at every step
    assert same(w0[3], w0[2]) and not same(w0[4], w0[3])
    assert all(torch.isfinite(t).all() for t in w0[5].values())
    assert [e0[s] for s in range(1, 6)] == [1, 2, 2, 3, 4]
    assert n0 == n1 == 5 * gb  # the data moved past step 3's batch
    rows = [r for r in read_metrics(os.path.join(tmp_path, "skip")) if r["kind"] == "train"]
    assert [(r["step"], r["skipped_steps"]) for r in rows] == [(1, 0), (2, 0), (4, 1), (5, 1)]


def _run(tiny_data, runs, name, *extra, fault, nproc=1):
    args = [
        f"data.path={tiny_data}",
        f"runs_dir={runs}",
        f"name={name}",
        "train.max_steps=6",
        "checkpoint.interval=2",
        *RUN,
        *extra,
    ]
    args += ["--nproc", str(nproc)] if nproc > 1 else []
    return lmforge("pretrain", *args, env={"LMFORGE_FAULT": fault}, check=False)


def _error_lines(proc) -> list[str]:
    assert "Traceback" not in proc.stderr, proc.stderr[-3000:]
    return [ln for ln in proc.stderr.splitlines() if ln.startswith("error:")]


@pytest.mark.parametrize("saves", [[], ["checkpoint.async_save=true"]], ids=["sync", "async"])
def test_stop_is_todays_behaviour(tiny_data, tmp_path, saves):
    """The default policy with an injected NaN: exit 3, one line naming the step and the last
    good checkpoint, nothing saved after it. With background saves, the stop waits for step
    2's save in flight and names it, as with synchronous saves."""
    proc = _run(tiny_data, str(tmp_path), "stop", *saves, fault="loss@3+scale=nan")
    run_dir = os.path.join(tmp_path, "stop")
    assert proc.returncode == 3, proc.stderr[-3000:]
    assert _error_lines(proc) == [
        f"error: loss is nan at step 3: stopped without saving; the last good checkpoint is "
        f"{run_dir}/checkpoints/step_00000002. Lower optim.lr, raise optim.warmup_steps or use "
        "train.precision=fp32, then rerun with resume=auto"
    ]
    assert latest_checkpoint(run_dir) == "step_00000002"


def test_a_run_that_skipped_too_many_steps_fails(tiny_data, tmp_path):
    """on_anomaly=skip: the last line counts the skipped steps; past train.max_skipped_fraction
    (1 of 6 steps > 0.1) the run ends with exit 3 and one line instead of `done`."""
    runs = str(tmp_path)
    proc = _run(tiny_data, runs, "many", "train.on_anomaly=skip", fault="loss@3+scale=nan")
    assert proc.returncode == 3, proc.stderr[-3000:]
    run_dir = os.path.join(runs, "many")
    assert _error_lines(proc) == [
        "error: 1 of 6 steps were skipped (train.on_anomaly=skip), more than "
        "train.max_skipped_fraction=0.1 of them: the model learned from 5; the checkpoint "
        f"{run_dir}/checkpoints/step_00000006 and {run_dir}/metrics.jsonl are kept. Lower "
        "optim.lr, raise optim.warmup_steps or use train.precision=fp32 and rerun, or raise "
        "train.max_skipped_fraction"
    ]
    assert not any(ln.startswith("done:") for ln in proc.stdout.splitlines())

    proc = _run(
        tiny_data,
        runs,
        "some",
        "train.on_anomaly=skip",
        "train.max_skipped_fraction=0.2",
        fault="loss@3+scale=nan",
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    last = proc.stdout.strip().splitlines()[-1]
    assert last.startswith("done: step 6, ") and ", 1 of 6 steps skipped; checkpoint " in last


def test_rollback_through_real_checkpoints(tiny_data, tmp_path):
    """NaN at step 5: the run goes back to step 4's checkpoint, skips step 5's batch, halves the
    learning rate and finishes; the rows past step 4 are the second attempt's only, and the
    checkpoint keeps the counts."""
    proc = _run(
        tiny_data,
        str(tmp_path),
        "rb",
        "train.on_anomaly=rollback",
        "train.rollback_lr_factor=0.5",
        fault="loss@5+scale=nan",
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    run_dir = os.path.join(tmp_path, "rb")
    ckpt = f"{run_dir}/checkpoints/step_00000004"
    assert (
        f"loss is nan at step 5: rolled back to {ckpt} (step 4), skipping step 5's batch, "
        "learning rate x0.5 (rollback 1 of at most 3)"
    ) in proc.stdout
    rows = [r for r in read_metrics(run_dir) if r["kind"] == "train"]
    assert [(r["step"], r["rollbacks"]) for r in rows] == [
        (1, 0), (2, 0), (3, 0), (4, 0), (5, 1), (6, 1)
    ]  # fmt: skip
    with open(os.path.join(run_dir, "checkpoints", "step_00000006", "trainer_state.json")) as f:
        state = json.load(f)
    assert (state["rollbacks"], state["lr_scale"], state["skipped_steps"]) == (1, 0.5, 0)
    per_step = 128 // 32  # windows per step
    assert state["data"]["samples_consumed"] == 7 * per_step  # 6 steps trained + 1 skipped


def test_a_stuck_rank_ends_the_job_within_the_timeout(tiny_data, tmp_path):
    """Rank 1 hangs after step 2 (2 minutes); rank 0 waits in the metrics all-reduce, fails
    after parallel.timeout_s=5 with one line naming what waited, and the launcher ends rank 1:
    the job ends well before the hang would, and before torch elastic's 30 s SIGKILL."""
    args = [
        f"data.path={tiny_data}",
        f"runs_dir={tmp_path}",
        "name=hang",
        "train.max_steps=4",
        "parallel.timeout_s=5",
        *RUN,
        "--nproc",
        "2",
    ]
    env = dict(os.environ, PYTHONUNBUFFERED="1", LMFORGE_FAULT="step@2+hang=120+rank=1")
    proc = subprocess.Popen(
        [sys.executable, "-m", "lmforge.launcher.cli", "pretrain", *args],
        cwd=REPO,
        env=env,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )
    try:
        assert proc.stdout is not None
        for line in proc.stdout:  # training starts after rank 0's first line
            if "lmforge pretrain:" in line:
                break
        started = time.monotonic()
        out, err = proc.communicate(timeout=110)
    finally:
        if proc.poll() is None:
            proc.kill()
    waited = time.monotonic() - started
    assert proc.returncode == 3, err[-3000:]
    assert waited < 25, f"the job took {waited:.0f} s to end after training started"
    done = subprocess.CompletedProcess(proc.args, proc.returncode, out, err)
    assert _error_lines(done) == [
        "error: [rank 0] the all-reduce of step 2's metrics row waited more than 5 s for the "
        "other ranks (parallel.timeout_s=5): a rank is stuck or has died, see its log; the "
        "job ends"
    ]
