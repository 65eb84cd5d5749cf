"""The trainer on its own: a fake strategy (one process, no process group, in-memory
checkpoints) and a tiny model, so that the loop's contract is checked exactly and fast: the
order of the hooks, the eval / log / save cadence, stop requests, saves asked by callbacks,
callback state through checkpoints, and the error paths."""

from __future__ import annotations

import copy
import math
import time

import pytest
import torch
from torch import nn

from lmforge.pretrain.config.layout import Layout
from lmforge.pretrain.config.schema import ParallelConfig
from lmforge.pretrain.core.errors import TrainingError
from lmforge.pretrain.model.loss import causal_lm_loss
from lmforge.pretrain.parallel.common import Strategy
from lmforge.pretrain.train.loop import (
    AnomalyPolicy,
    Cadence,
    Callback,
    ComputeAccounting,
    StepOptions,
    TrainData,
    Trainer,
    TrainParts,
)

VOCAB, T, B = 11, 6, 2


class FakeStrategy(Strategy):
    """One process on the CPU without a process group: the base class's forward/backward and
    clip-and-step, checkpoints kept in a dict."""

    name = "fake"

    def __init__(self) -> None:
        super().__init__(precision="fp32", layout=Layout(ParallelConfig(), 1))
        self.device = torch.device("cpu")
        self.precision = "fp32"
        self.saved: dict[str, dict] = {}

    rank = property(lambda self: 0)
    world_size = property(lambda self: 1)

    def prepare(self, model, make_optimizer, shape=None):
        return model, make_optimizer(model)

    def step(self, model, optimizer, scheduler, *, grad_clip):
        return self.clip_and_step(model.parameters(), optimizer, scheduler, grad_clip=grad_clip)

    def save_state(self, directory, *, model, optimizer, write_file):
        self.saved[directory] = {
            "model": copy.deepcopy(model.state_dict()),
            "optim": copy.deepcopy(optimizer.state_dict()),
        }

    def load_state(self, directory, *, model, optimizer):
        model.load_state_dict(self.saved[directory]["model"])
        optimizer.load_state_dict(self.saved[directory]["optim"])


class TinyLM(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        torch.manual_seed(0)
        self.emb = nn.Embedding(VOCAB, 8)
        self.out = nn.Linear(8, VOCAB)

    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        return self.out(self.emb(ids))  # (B, T, V)


class FixedBatches:
    """Deterministic micro-batches; the position is the number of steps read."""

    def __init__(self, grad_accum: int = 2) -> None:
        self.grad_accum, self.position = grad_accum, 0

    def _batch(self, k: int) -> dict:
        g = torch.Generator().manual_seed(k)
        ids = torch.randint(0, VOCAB, (B, T + 1), generator=g)
        return {"input_ids": ids[:, :-1], "labels": ids[:, 1:]}

    def next_step(self) -> list[dict]:
        self.position += 1
        return [self._batch(self.position * 10 + i) for i in range(self.grad_accum)]

    def state_dict(self) -> dict:
        return {"position": self.position, "num_windows": 100}

    def load_state_dict(self, state: dict) -> None:
        self.position = state["position"]


class Recorder(Callback):
    """Writes every hook it hears to a shared list of events."""

    def __init__(self, events: list, name: str = "rec") -> None:
        self.events, self.name = events, name

    def on_train_start(self, trainer):
        self.events.append(("start",))

    def on_step_end(self, trainer):
        self.events.append(("step", trainer.state.step))

    def on_log(self, trainer, row):
        self.events.append((row["kind"], row["step"]))

    def on_checkpoint(self, trainer, path):
        self.events.append(("save", path))

    def on_error(self, trainer, error):
        self.events.append(("error", type(error).__name__))

    def on_train_end(self, trainer):
        self.events.append(("end",))


def make_trainer(
    *,
    total_steps=6,
    log_interval=10,
    eval_interval=0,
    checkpoint_interval=0,
    anomaly=AnomalyPolicy(),
    callbacks=(),
    loss_fn=causal_lm_loss,
) -> Trainer:
    strategy = FakeStrategy()
    model, optimizer = strategy.prepare(
        TinyLM(), lambda m: torch.optim.AdamW(m.parameters(), lr=1e-2)
    )
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda s: 1.0)
    trainer = Trainer(
        parts=TrainParts(model, optimizer, scheduler, strategy),
        data=TrainData(FixedBatches(), lambda: [FixedBatches()._batch(999)]),
        cadence=Cadence(total_steps, log_interval, eval_interval, checkpoint_interval),
        compute=ComputeAccounting(tokens_per_step=2 * B * T, flops_per_token=6.0, peak_flops=1e12),
        options=StepOptions(anomaly=anomaly),
        loss_fn=loss_fn,
        callbacks=callbacks,
    )
    saves = []

    def save(tr: Trainer) -> str:
        path = f"ckpt/{tr.state.step}"
        strategy.save_state(path, model=tr.model, optimizer=tr.optimizer, write_file=None)
        strategy.saved[path]["trainer"] = copy.deepcopy(tr.state_dict())
        saves.append(tr.state.step)
        return path

    trainer.save_fn = save
    trainer.saves = saves  # type: ignore[attr-defined]
    return trainer


def test_hook_order_and_cadence():
    events: list = []
    trainer = make_trainer(
        callbacks=[Recorder(events)], log_interval=2, eval_interval=3, checkpoint_interval=4
    )
    trainer.fit()
    assert events == [
        ("start",),
        ("step", 1),
        ("step", 2),
        ("train", 2),
        ("step", 3),
        ("train", 3),  # an eval step logs the train row first
        ("eval", 3),
        ("step", 4),
        ("train", 4),  # so does a checkpoint step
        ("save", "ckpt/4"),
        ("step", 5),
        ("step", 6),
        ("train", 6),  # the last step: train row, eval, checkpoint
        ("eval", 6),
        ("save", "ckpt/6"),
        ("end",),
    ]
    assert trainer.state.step == 6 and trainer.state.tokens == 6 * 2 * B * T
    assert trainer.state.flops == 6.0 * trainer.state.tokens
    assert trainer.last_checkpoint == "ckpt/6"
    assert trainer.last_row["step"] == 6 and trainer.last_eval["step"] == 6
    # the eval row is the mean loss over label tokens, and its perplexity
    assert trainer.last_eval["val_ppl"] == pytest.approx(math.exp(trainer.last_eval["val_loss"]))


def test_stop_request_saves_and_returns():
    events: list = []

    class StopAt2(Callback):
        def on_step_end(self, trainer):
            if trainer.state.step == 2:
                trainer.request_stop()

    trainer = make_trainer(callbacks=[StopAt2(), Recorder(events)], log_interval=5)
    trainer.fit()
    assert trainer.state.step == 2
    assert trainer.saves == [2]  # off the (disabled) checkpoint interval: a stop always saves
    assert events[-3:] == [("train", 2), ("save", "ckpt/2"), ("end",)]


def test_eval_callback_asks_for_a_save_and_a_stop():
    class BestAndStop(Callback):
        def on_log(self, trainer, row):
            if row["kind"] == "eval" and row["step"] == 2:
                trainer.request_save()
            if row["kind"] == "eval" and row["step"] == 4:
                trainer.request_stop()

    trainer = make_trainer(callbacks=[BestAndStop()], eval_interval=2, total_steps=10)
    trainer.fit()
    assert trainer.saves == [2, 4]  # the asked-for save, then the stop's
    assert trainer.state.step == 4


def test_callback_state_travels_through_the_checkpoint():
    class Counter(Callback):
        state_key = "counter"

        def __init__(self) -> None:
            self.evals = 0

        def on_log(self, trainer, row):
            self.evals += row["kind"] == "eval"

        def state_dict(self) -> dict:
            return {"evals": self.evals}

        def load_state_dict(self, state: dict) -> None:
            self.evals = state["evals"]

    first = make_trainer(callbacks=[Counter()], eval_interval=2, checkpoint_interval=4)
    first.fit()
    saved = first.strategy.saved["ckpt/4"]["trainer"]
    assert saved["counter"] == {"evals": 2}  # evaluations at steps 2 and 4
    assert saved["step"] == 4 and saved["data"]["position"] == 4

    resumed_counter = Counter()
    second = make_trainer(callbacks=[resumed_counter], eval_interval=2, checkpoint_interval=4)
    second.strategy.saved = first.strategy.saved
    second.strategy.load_state("ckpt/4", model=second.model, optimizer=second.optimizer)
    second.load_state_dict(saved)
    assert resumed_counter.evals == 2 and second.state.step == 4
    second.fit()
    # the resumed run ends where the uninterrupted one did, counter and weights alike
    assert resumed_counter.evals == first.callbacks[0].evals == 3
    for a, b in zip(first.model.parameters(), second.model.parameters(), strict=True):
        assert torch.equal(a, b)


def test_nan_loss_raises_and_still_closes_every_callback():
    events: list = []

    def nan_loss(model, batch):
        return causal_lm_loss(model, batch) * float("nan")

    trainer = make_trainer(callbacks=[Recorder(events)], loss_fn=nan_loss, log_interval=1)
    with pytest.raises(TrainingError, match="loss is nan at step 1"):
        trainer.fit()
    assert events == [("start",), ("step", 1), ("error", "TrainingError"), ("end",)]
    assert trainer.saves == []  # nothing is saved from a NaN step


def test_an_error_in_a_callback_reaches_the_caller_after_every_hook():
    events: list = []

    class Boom(Callback):
        def on_step_end(self, trainer):
            if trainer.state.step == 3:
                raise RuntimeError("boom")

    class BadEnd(Callback):
        def on_train_end(self, trainer):
            raise ValueError("a second failure must not hide the first")

    trainer = make_trainer(callbacks=[Boom(), BadEnd(), Recorder(events)])
    with pytest.raises(RuntimeError, match="boom"):
        trainer.fit()
    assert events[-2:] == [("error", "RuntimeError"), ("end",)]
    assert ("step", 3) not in events  # Boom came first and stopped the hook chain


def test_rows_split_each_step_into_its_phases():
    """The rows' time split says where a step went: a slow data source shows as data wait, a
    slow save as amortised checkpoint time, and the phases add up to the step's wall time."""
    wait = 0.03

    class SlowBatches(FixedBatches):
        def next_step(self) -> list[dict]:
            time.sleep(wait)
            return super().next_step()

    trainer = make_trainer(total_steps=4, log_interval=2, checkpoint_interval=2)
    trainer.train_batches = SlowBatches()
    save = trainer.save_fn

    def slow_save(tr: Trainer) -> str:
        time.sleep(4 * wait)
        return save(tr)

    trainer.save_fn = slow_save
    rows: list[dict] = []

    class Rows(Callback):
        def on_log(self, trainer, row):
            rows.append(row)

    trainer.callbacks.append(Rows())
    trainer.fit()
    train = [r for r in rows if r["kind"] == "train"]
    assert [r["step"] for r in train] == [2, 4]
    for row in train:
        assert wait <= row["time_data"] < wait + 0.02
        assert row["time_fwd_bwd"] > 0 and row["time_optim"] > 0 and row["time_other"] >= 0
        per_step = sum(row[k] for k in ("time_data", "time_fwd_bwd", "time_optim", "time_other"))
        tokens_per_step = 2 * B * T
        assert per_step == pytest.approx(tokens_per_step / row["tokens_per_sec"], rel=1e-6)
        assert row["peak_mem_gb"] > 0.01  # this process's RSS high-water mark
    assert train[0]["time_checkpoint"] == 0  # no save yet when the first row is written
    # by step 4's row: one save (step 2's) over the 4 steps run
    assert train[1]["time_checkpoint"] == pytest.approx(4 * wait / 4, rel=0.3)
