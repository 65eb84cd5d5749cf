"""The trainer's plug points (callbacks, loss), NaN handling, schedules and the sample order."""

from __future__ import annotations

import os

import numpy as np
import pytest

from lmforge.pretrain.config.schema import OptimConfig
from lmforge.pretrain.data.batches import SampleOrder
from lmforge.pretrain.train.optim import lr_factor
from tests.gloo_workers import run_distributed
from tests.runs import TINY, latest_checkpoint, read_metrics


def _plugged(rank, world, data, runs):
    """A custom loss (label smoothing) and a callback that records what it sees."""
    import torch.nn.functional as F

    from lmforge.pretrain.config.schema import PretrainConfig, load_config
    from lmforge.pretrain.run.pretraining import run_pretrain
    from lmforge.pretrain.train.loop import Callback

    seen = {"losses": [], "steps": [], "rows": [], "checkpoints": [], "ended": False}

    def smoothed_loss(model, batch):
        logits = model(batch["input_ids"])
        loss = F.cross_entropy(
            logits.float().flatten(0, 1), batch["labels"].flatten(), label_smoothing=0.2
        )
        seen["losses"].append(loss.item())
        return loss

    class Spy(Callback):
        def on_step_end(self, trainer):
            seen["steps"].append(trainer.state.step)

        def on_log(self, trainer, row):
            seen["rows"].append(row)

        def on_checkpoint(self, trainer, path):
            seen["checkpoints"].append(os.path.basename(path))

        def on_train_end(self, trainer):
            seen["ended"] = True

    cfg = load_config(
        PretrainConfig,
        [
            f"data.path={data}",
            f"runs_dir={runs}",
            "name=plug",
            "train.max_steps=4",
            "checkpoint.interval=2",
            *TINY,
        ],
    )
    run_pretrain(cfg, callbacks=[Spy()], loss_fn=smoothed_loss)
    import sys

    seen["deepspeed_imported"] = "deepspeed" in sys.modules  # only DeepSpeed strategies load it
    return seen


def test_callback_and_custom_loss_plug_in(tiny_data, tmp_path):
    (seen,) = run_distributed(_plugged, tiny_data, str(tmp_path), world_size=1)
    assert seen["steps"] == [1, 2, 3, 4] and seen["ended"]
    assert not seen["deepspeed_imported"]
    assert seen["checkpoints"] == ["step_00000002", "step_00000004"]
    train_rows = [r for r in seen["rows"] if r["kind"] == "train"]
    # 2 micro-batches per step (128 / (32 * 2)); the logged loss is the custom loss's mean.
    for row in train_rows:
        i = 2 * (row["step"] - 1)
        assert row["loss"] == pytest.approx(np.mean(seen["losses"][i : i + 2]), rel=1e-6)
    eval_rows = [r for r in seen["rows"] if r["kind"] == "eval"]
    assert len(eval_rows) == 1 and eval_rows[0]["step"] == 4  # eval only at the end


def _nan_at_step_3(rank, world, data, runs):
    import torch

    from lmforge.pretrain.config.schema import PretrainConfig, load_config
    from lmforge.pretrain.core.errors import TrainingError
    from lmforge.pretrain.run.pretraining import run_pretrain
    from lmforge.pretrain.train.loop import causal_lm_loss

    calls = {"n": 0}

    def loss_fn(model, batch):
        calls["n"] += 1
        loss = causal_lm_loss(model, batch)
        return loss * torch.tensor(float("nan")) if calls["n"] > 4 else loss  # step 3 on

    cfg = load_config(
        PretrainConfig,
        [
            f"data.path={data}",
            f"runs_dir={runs}",
            "name=nan",
            "train.max_steps=6",
            "checkpoint.interval=2",
            *TINY,
        ],
    )
    try:
        run_pretrain(cfg, loss_fn=loss_fn)
    except TrainingError as exc:
        return str(exc)
    return None


def test_nan_loss_stops_and_keeps_last_good_checkpoint(tiny_data, tmp_path):
    (msg,) = run_distributed(_nan_at_step_3, tiny_data, str(tmp_path), world_size=1)
    assert msg is not None and "loss is nan at step 3" in msg and "step_00000002" in msg
    run_dir = os.path.join(tmp_path, "nan")
    ckpts = os.path.join(run_dir, "checkpoints")
    assert sorted(n for n in os.listdir(ckpts) if n.startswith("step_")) == ["step_00000002"]
    assert latest_checkpoint(run_dir) == "step_00000002"
    assert [r["step"] for r in read_metrics(run_dir)] == [1, 2]


def test_sample_order_is_exact_and_crosses_epochs():
    order = SampleOrder(num_samples=10, seed=3, shuffle=True)
    stream = order.take(0, 25)
    assert sorted(stream[:10]) == list(range(10)) and sorted(stream[10:20]) == list(range(10))
    assert list(stream[:10]) != list(stream[10:20])  # re-shuffled each epoch
    fresh = SampleOrder(num_samples=10, seed=3, shuffle=True)
    assert list(fresh.take(7, 9)) == list(stream[7:16])  # random access = resume from anywhere


@pytest.mark.parametrize("schedule", ["cosine", "wsd", "constant"])
def test_lr_schedules(schedule):
    cfg = OptimConfig(schedule=schedule, warmup_steps=10, min_lr_ratio=0.1, decay_fraction=0.2)
    f = [lr_factor(s, total_steps=100, cfg=cfg) for s in range(100)]
    assert f[0] == pytest.approx(1 / 11) and f[9] == pytest.approx(10 / 11)
    assert max(f) == pytest.approx(1.0)
    if schedule == "constant":
        assert f[-1] == 1.0
    else:
        assert f[-1] == pytest.approx(0.1)
    if schedule == "wsd":
        assert f[79] == 1.0 and f[80] < 1.0  # stable until the last 20% of the run
