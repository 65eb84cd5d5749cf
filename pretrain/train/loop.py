"""A small training loop that pretraining and finetuning share.

The loop is fixed: one step's micro-batches -> forward/backward (the strategy's: gradient
reduction on the last micro-batch, or a pipeline schedule) -> clip -> optimizer and schedule
step. Everything else plugs in:

- ``loss_fn(model, batch) -> scalar loss`` (pretrain/model/loss.py; causal LM by default, finetuning
  passes its own),
- callbacks (progress bar, metric sinks, early stopping, signal handling) see every step and
  row, hear about errors, and may keep state that the checkpoint saves and a resume restores,
- ``save_fn(trainer) -> path`` writes a checkpoint when the cadence says so (or starts writing
  it in the background and returns None: ``checkpoint_wait()`` then waits for it);
  ``trainer.final_save`` says whether it is the one that ends training,
- the strategy (pretrain/parallel/) decides how gradients are reduced and state is sharded,
- an ``evaluator`` adds task metrics (accuracy, F1, ...) to the validation rows: it sees the
  model output of every validation batch and returns counts that are summed over the ranks.

Host syncs happen only on logging steps: the loss is accumulated on the device in between.

Anomalies (``AnomalyPolicy``, the ``train.on_anomaly`` keys): a NaN/Inf loss stops the run at the
next metrics row by default. With ``skip`` or ``rollback`` (or a spike threshold) every step's
loss is checked before the update, by one all-reduce whose result every rank shares, so that the
ranks decide alike: the update is dropped (skip), or the last checkpoint is reloaded and the data
since it skipped (rollback). A collective that times out (``parallel.timeout_s``) ends the run
with one line naming what waited.
"""

from __future__ import annotations

import contextlib
import math
import sys
import time
from collections.abc import Callable, Iterable, Iterator
from dataclasses import asdict, dataclass, field
from typing import Protocol

import torch
from torch import nn
from torch.optim.lr_scheduler import LRScheduler

from lmforge.pretrain.config.schema import LoopConfig, RunConfig
from lmforge.pretrain.core import dist as pdist
from lmforge.pretrain.core.errors import CheckpointError, TrainingError
from lmforge.pretrain.core.faults import fault_point, fault_scale
from lmforge.pretrain.model.loss import Batch, LossFn, StageLoss, causal_lm_loss
from lmforge.pretrain.parallel.common import Strategy
from lmforge.pretrain.parallel.memory import peak_memory


class StepBatches(Protocol):
    """The training data as the trainer reads it: one optimizer step's micro-batches at a
    time, with a position that checkpoints save (pretrain.data.batches.TrainBatches)."""

    def next_step(self) -> list[Batch]: ...

    def state_dict(self) -> dict: ...

    def load_state_dict(self, state: dict) -> None: ...


class Evaluator(Protocol):
    """Task metrics of the validation rows from the model output (finetune/tasks.py)."""

    def reset(self) -> None: ...

    def update(self, logits: torch.Tensor, batch: Batch) -> None: ...

    def counts(self) -> torch.Tensor: ...

    def compute(self, counts: torch.Tensor) -> dict: ...


class Callback:
    """Hooks into the loop; override what you need. ``trainer`` gives access to everything.

    A callback with a ``state_key`` keeps state across a resume: ``state_dict()`` is saved in
    every checkpoint under that key and ``load_state_dict`` gets it back before
    ``on_train_start``. ``on_error`` hears of an exception that ends ``fit`` (before
    ``on_train_end``, which runs whatever happened)."""

    state_key: str | None = None

    def on_train_start(self, trainer: Trainer) -> None: ...

    def on_step_end(self, trainer: Trainer) -> None: ...

    def on_log(self, trainer: Trainer, row: dict) -> None: ...

    def on_checkpoint(self, trainer: Trainer, path: str) -> None:
        """Checkpoint ``path`` is complete and ``latest`` names it. A checkpoint written in the
        background (``checkpoint.async_save``) is heard when the trainer next waits for it (the
        next save, a rollback, an anomaly that stops the run, the end of ``fit``), when
        ``trainer.state`` may be past its step: the step is in its name."""

    def on_rollback(self, trainer: Trainer, path: str) -> None:
        """The loop went back to checkpoint ``path`` (``train.on_anomaly=rollback``): the steps
        after it are undone (metric sinks drop their rows)."""

    def on_error(self, trainer: Trainer, error: BaseException) -> None: ...

    def on_train_end(self, trainer: Trainer) -> None: ...

    def state_dict(self) -> dict:
        return {}

    def load_state_dict(self, state: dict) -> None: ...


@dataclass
class TrainerState:
    """Counters that make resume exact (saved in every checkpoint)."""

    step: int = 0
    tokens: int = 0
    flops: float = 0.0
    train_seconds: float = 0.0
    skipped_steps: int = 0  # updates dropped (on_anomaly=skip), over the whole run
    rollbacks: int = 0  # rollbacks to a checkpoint (on_anomaly=rollback), over the whole run
    lr_scale: float = 1.0  # the product of the rollbacks' rollback_lr_factor
    loss_avg: float = 0.0  # running mean of the applied steps' losses (spike detection)
    loss_avg_steps: int = 0


@dataclass(frozen=True)
class AnomalyPolicy:
    """What a step with a NaN/Inf loss or gradient, or a loss spike, does (``train.on_anomaly``
    and its companions in pretrain/config/schema.py's LoopConfig)."""

    on_anomaly: str = "stop"  # stop | skip | rollback
    spike_factor: float = 0.0  # 0: no spike detection
    spike_warmup: int = 10
    max_consecutive_skips: int = 10
    max_skipped_fraction: float = 1.0  # a done run past this share of skipped steps fails
    max_rollbacks: int = 3
    rollback_lr_factor: float = 1.0

    @classmethod
    def from_config(cls, cfg: LoopConfig) -> AnomalyPolicy:
        """The policy of the ``train`` section."""
        return cls(
            on_anomaly=cfg.on_anomaly,
            spike_factor=cfg.spike_factor,
            spike_warmup=cfg.spike_warmup,
            max_consecutive_skips=cfg.max_consecutive_skips,
            max_skipped_fraction=cfg.max_skipped_fraction,
            max_rollbacks=cfg.max_rollbacks,
            rollback_lr_factor=cfg.rollback_lr_factor,
        )

    @property
    def every_step(self) -> bool:
        """Check each step before its update (else the loss is checked at the metrics rows)."""
        return self.on_anomaly != "stop" or self.spike_factor > 0


AVERAGE_SPAN = 10  # the running loss mean covers about this many steps

PHASES = ("data", "fwd_bwd", "optim")
# the rows' split of a step: each phase, the rest, checkpoint saves amortised (seconds per step)
TIME_FIELDS = tuple(f"time_{name}" for name in (*PHASES, "other", "checkpoint"))


class StepClock:
    """Where a step's time goes, for the rows' ``time_*`` fields (seconds per step): waiting for
    data, forward+backward (with the gradient reduction that DDP and FSDP overlap with the
    backward), the optimizer (clipping, the update, the schedule; DeepSpeed's ZeRO
    communication), and the rest (checks, callbacks, logging); checkpoint saves are amortised
    over the steps this process ran. On a GPU kernels run behind the host, so a phase's wall
    time is only exact when the clock waits for the device at each boundary (``sync``:
    ``train.timing_sync``); on a CPU the work is done when the call returns."""

    def __init__(self, device: torch.device, *, sync: bool = False) -> None:
        self.sync = sync and device.type == "cuda"
        self.seconds = dict.fromkeys(PHASES, 0.0)  # since the last row
        self.checkpoint_seconds = 0.0  # this process's saves
        self.checkpoints = 0  # how many
        self.steps = 0  # this process's steps

    @contextlib.contextmanager
    def phase(self, name: str) -> Iterator[None]:
        if self.sync:
            torch.cuda.synchronize()
        t0 = time.perf_counter()
        try:
            yield
        finally:
            if self.sync:
                torch.cuda.synchronize()
            self.seconds[name] += time.perf_counter() - t0

    def split(self, steps: int, elapsed: float) -> list[float]:
        """Seconds per step of each phase, then the rest, then the amortised checkpoint
        time; the interval's counters restart."""
        per_step = [self.seconds[name] / steps for name in PHASES]
        rest = max(elapsed / steps - sum(per_step), 0.0)
        self.seconds = dict.fromkeys(PHASES, 0.0)
        return [*per_step, rest, self.checkpoint_seconds / max(self.steps, 1)]


class FaultLoss:
    """The training loss times the factor an injected fault sets for a step (``loss@STEP+scale=X``:
    NaN, Inf or a spike, gradients included); factor 1 leaves the loss untouched. One object for
    the whole run, with the stage-output form when the loss has one: a pipeline builds its
    schedule once per loss object, on every rank alike."""

    def __init__(self, loss_fn: LossFn) -> None:
        self.loss_fn, self.factor = loss_fn, 1.0
        if isinstance(loss_fn, StageLoss):
            self.output_loss = lambda out, labels: self._scaled(loss_fn.output_loss(out, labels))

    def _scaled(self, loss: torch.Tensor) -> torch.Tensor:
        return loss if self.factor == 1.0 else loss * self.factor

    def __call__(self, model: nn.Module, batch: Batch) -> torch.Tensor:
        return self._scaled(self.loss_fn(model, batch))


ANOMALY_FIELDS = ("skipped_steps", "rollbacks", "lr_scale", "loss_avg", "loss_avg_steps")


# --- what a trainer is built from ----------------------------------------------------------------


@dataclass(frozen=True)
class TrainParts:
    """What the steps update and how: the model and its optimizer as ``Strategy.prepare``
    returned them, the learning-rate schedule (pretrain/train/optim.py) and the strategy."""

    model: nn.Module
    optimizer: torch.optim.Optimizer
    scheduler: LRScheduler
    strategy: Strategy


@dataclass(frozen=True)
class TrainData:
    """The training batches, one step's micro-batches at a time, and the validation batches: a
    function that gives them anew for every evaluation (None: no evaluation)."""

    train_batches: StepBatches
    val_batches: Callable[[], Iterable[Batch]] | None = None


@dataclass(frozen=True)
class Cadence:
    """When the loop does what, in optimizer steps: it trains until ``total_steps``, writes a
    metrics row every ``log_interval`` steps, evaluates every ``eval_interval`` steps (0: only
    at the end) and checkpoints every ``checkpoint_interval`` steps (0: only at a stop and at
    the end); a step that evaluates or checkpoints writes a row too."""

    total_steps: int
    log_interval: int = 10
    eval_interval: int = 0
    checkpoint_interval: int = 0

    @classmethod
    def from_config(cls, cfg: RunConfig, *, total_steps: int) -> Cadence:
        """``train.log_interval``, ``train.eval_interval`` and ``checkpoint.interval``;
        ``total_steps`` is the workload's (it may come from tokens or epochs, not max_steps)."""
        return cls(
            total_steps=total_steps,
            log_interval=cfg.train.log_interval,
            eval_interval=cfg.train.eval_interval,
            checkpoint_interval=cfg.checkpoint.interval,
        )


@dataclass(frozen=True)
class ComputeAccounting:
    """What a step counts: its tokens, its FLOPs (``flops_per_token`` times the tokens) and, in
    the rows, the MFU against ``peak_flops`` (one device's peak FLOP/s). ``tokens_per_step``
    None: steps differ in size (padded task examples) and the batches say how many tokens the
    last step trained on (``train_batches.last_step_tokens``, the global count, known on every
    rank without communication)."""

    tokens_per_step: int | None
    flops_per_token: float
    peak_flops: float


@dataclass(frozen=True)
class CheckpointHooks:
    """How the loop saves and loads checkpoints (None: it does not). ``save_fn(trainer)``
    writes a checkpoint when the cadence says so and returns its path, or starts writing it in
    the background and returns None: ``checkpoint_wait()`` then waits for it and returns its
    path (None when none is in flight). ``load_fn(trainer, path)`` loads a checkpoint's model
    and optimizer state (and RNG) and returns its trainer state: what
    ``train.on_anomaly=rollback`` goes back with."""

    save_fn: Callable[[Trainer], str | None] | None = None
    checkpoint_wait: Callable[[], str | None] | None = None
    load_fn: Callable[[Trainer, str], dict] | None = None


@dataclass(frozen=True)
class StepOptions:
    """How every step runs: the gradient-norm clip (0: none), what an anomaly does, and
    whether the step clock waits for the device at each phase boundary (``timing_sync``: see
    :class:`StepClock`)."""

    grad_clip: float = 1.0
    anomaly: AnomalyPolicy = field(default_factory=AnomalyPolicy)
    timing_sync: bool = False

    @classmethod
    def from_config(cls, cfg: LoopConfig) -> StepOptions:
        """``train.grad_clip``, the ``train.on_anomaly`` keys and ``train.timing_sync``."""
        return cls(
            grad_clip=cfg.grad_clip,
            anomaly=AnomalyPolicy.from_config(cfg),
            timing_sync=cfg.timing_sync,
        )


class Trainer:
    """The loop of the module docstring, built from groups (:class:`TrainParts`,
    :class:`TrainData`, :class:`Cadence`, :class:`ComputeAccounting`, :class:`CheckpointHooks`,
    :class:`StepOptions`). Each group's fields become the trainer's attributes of the same
    names (``trainer.model``, ``trainer.train_batches``, ``trainer.total_steps``,
    ``trainer.save_fn``, ``trainer.anomaly``, ...; ``timing_sync`` is ``trainer.clock.sync``),
    which callbacks read and may change (early stopping shortens ``total_steps``)."""

    def __init__(
        self,
        *,
        parts: TrainParts,
        data: TrainData,
        cadence: Cadence,
        compute: ComputeAccounting,
        checkpoints: CheckpointHooks = CheckpointHooks(),
        options: StepOptions = StepOptions(),
        loss_fn: LossFn = causal_lm_loss,
        evaluator: Evaluator | None = None,
        callbacks: Iterable[Callback] = (),
    ) -> None:
        self.model = parts.model
        self.optimizer = parts.optimizer
        self.scheduler = parts.scheduler
        self.strategy = parts.strategy
        self.train_batches = data.train_batches
        self.val_batches = data.val_batches
        self.total_steps = cadence.total_steps
        self.log_interval = cadence.log_interval
        self.eval_interval = cadence.eval_interval
        self.checkpoint_interval = cadence.checkpoint_interval
        self.tokens_per_step = compute.tokens_per_step
        self.flops_per_token = compute.flops_per_token
        self.peak_flops = compute.peak_flops
        self.save_fn = checkpoints.save_fn
        self.checkpoint_wait = checkpoints.checkpoint_wait
        self.load_fn = checkpoints.load_fn
        self.grad_clip = options.grad_clip
        self.anomaly = options.anomaly
        self.clock = StepClock(self.strategy.device, sync=options.timing_sync)
        self.loss_fn = loss_fn
        self._train_loss = FaultLoss(loss_fn)
        self.evaluator = evaluator
        self.callbacks = list(callbacks)
        self.state = TrainerState()
        # the newest complete checkpoint (one still written in the background is not named)
        self.last_checkpoint: str | None = None
        self._phase = "the start of training"  # what a collective that times out waited in
        self._skips_in_a_row = 0
        self.last_row: dict | None = None
        self.last_eval: dict | None = None
        self._stop = False
        self._done = False  # the stop asked for ends training (early stopping)
        self._save = False
        # True while ``save_fn`` writes the checkpoint that ends training: max_steps reached or
        # early stopping (not a stop by signal or preemption, which a resume continues)
        self.final_save = False

    # --- control -------------------------------------------------------------------------------
    def request_stop(self, *, done: bool = False) -> None:
        """Finish the current step, checkpoint and return from `fit` (every rank must call it).
        ``done``: training is complete (early stopping), not interrupted: that checkpoint is
        the final one (``final_save``)."""
        self._stop = True
        self._done = self._done or done

    def request_save(self) -> None:
        """Checkpoint after this step's evaluation even off the checkpoint interval (an eval
        callback asks; every rank must call it, as every rank sees the same eval row)."""
        self._save = True

    def _stateful(self) -> Iterator[Callback]:
        return (cb for cb in self.callbacks if cb.state_key)

    def state_dict(self) -> dict:
        """What a checkpoint saves of the loop: counters, schedule, data position, and the
        state of every callback that has a ``state_key`` (under that key)."""
        return {
            **asdict(self.state),
            "scheduler": self.scheduler.state_dict(),
            "data": self.train_batches.state_dict(),
            **{cb.state_key: cb.state_dict() for cb in self._stateful()},
        }

    def load_state_dict(self, state: dict) -> None:
        self.state = TrainerState(
            **{k: state[k] for k in ("step", "tokens", "flops", "train_seconds")},
            # counters of anomalies (absent from checkpoints written before they existed)
            **{k: state[k] for k in ANOMALY_FIELDS if k in state},
        )
        self.scheduler.load_state_dict(state["scheduler"])
        self.train_batches.load_state_dict(state["data"])
        for cb in self._stateful():
            if state.get(cb.state_key):
                cb.load_state_dict(state[cb.state_key])

    def _emit(self, hook: str, *args) -> None:
        for cb in self.callbacks:
            getattr(cb, hook)(self, *args)

    def _emit_after_error(self, hook: str, *args) -> None:
        """Every callback hears ``hook`` even if another one fails: the error that ended the
        loop is the one to report."""
        for cb in self.callbacks:
            with contextlib.suppress(Exception):
                getattr(cb, hook)(self, *args)

    # --- the loop ------------------------------------------------------------------------------
    def fit(self) -> TrainerState:
        """Train until ``total_steps`` or a stop request; every callback's ``on_train_end``
        runs however the loop ends (sinks are closed after an error too)."""
        try:
            try:
                self._emit("on_train_start")
                self._loop()
                self._settle_checkpoint()  # every normal end waits for a save in flight
            except RuntimeError as error:  # a collective that timed out or lost its peers
                line = pdist.collective_failure(error, during=self._phase)
                if line is None:
                    raise
                raise line from error
        except BaseException as error:
            self._emit_after_error("on_error", error)
            self._emit_after_error("on_train_end")
            raise
        self._emit("on_train_end")
        return self.state

    def _loop(self) -> None:
        device = self.strategy.device
        loss_acc = torch.zeros((), device=device)
        norm_acc = torch.zeros((), device=device)
        # steps_acc: the applied steps since the last row; steps_run: all of them (skipped too)
        steps_acc = tokens_acc = steps_run = 0
        t_start = time.perf_counter()
        while self.state.step < self.total_steps:
            self.model.train()
            step = self.state.step + 1
            self._phase = f"the forward/backward of step {step}"
            clock = self.clock
            with clock.phase("data"):
                micro_batches = self.train_batches.next_step()
            with clock.phase("fwd_bwd"):
                loss = self.strategy.forward_backward(
                    self.model, micro_batches, self._loss_fn(step)
                )
            anomaly = self._check(loss, step) if self.anomaly.every_step else None
            if anomaly is not None and self.anomaly.on_anomaly == "stop":
                raise self._stop_error(anomaly)
            if anomaly is not None and self.anomaly.on_anomaly == "rollback":
                self._rollback(anomaly, step)  # back to the checkpoint's step, data moved on
                loss_acc.zero_()
                norm_acc.zero_()
                steps_acc = tokens_acc = steps_run = 0
                self.clock.split(1, 0.0)  # the undone steps' times are dropped with them
                t_start = time.perf_counter()
                continue
            if anomaly is not None:
                self._skip(anomaly)
            else:
                self._phase = f"the optimizer step of step {step}"
                with clock.phase("optim"):
                    norm_acc += self.strategy.step(
                        self.model, self.optimizer, self.scheduler, grad_clip=self.grad_clip
                    )
                loss_acc += loss
                steps_acc += 1
                self._skips_in_a_row = 0
            step_tokens = self._step_tokens()
            tokens_acc += step_tokens
            steps_run += 1
            clock.steps += 1
            self.state.step += 1
            self.state.tokens += step_tokens
            self.state.flops += self.flops_per_token * step_tokens
            self._phase = f"the callbacks after step {step}"
            self._emit("on_step_end")
            fault_point("step", step=self.state.step)

            last = self.state.step >= self.total_steps
            stop = self._stop or last
            do_eval = self.val_batches is not None and (
                last or (self.eval_interval and step % self.eval_interval == 0)
            )
            do_save = self.save_fn is not None and (
                stop or (self.checkpoint_interval and step % self.checkpoint_interval == 0)
            )
            if step % self.log_interval == 0 or do_eval or do_save or stop:
                elapsed = time.perf_counter() - t_start
                self.state.train_seconds += elapsed
                split = self.clock.split(max(steps_run, 1), elapsed)
                if steps_acc:  # an interval whose every step was skipped writes no row
                    self._phase = f"the all-reduce of step {step}'s metrics row"
                    self._log_train(
                        loss_acc / steps_acc, norm_acc / steps_acc, tokens_acc, elapsed, split
                    )
                loss_acc.zero_()
                norm_acc.zero_()
                steps_acc = tokens_acc = steps_run = 0
                if do_eval:
                    self._phase = f"the evaluation at step {step}"
                    self.evaluate()
                    if self._stop and not stop:  # asked on this evaluation (early stopping)
                        stop, do_save = True, self.save_fn is not None
                    if self._save:  # asked on this evaluation (a new best to keep)
                        self._save, do_save = False, self.save_fn is not None
                if do_save:
                    self._save_checkpoint(final=stop and (last or self._done))
                t_start = time.perf_counter()
            if stop:
                break

    def _save_checkpoint(self, *, final: bool) -> None:
        """Save now (after the one in flight, if any), timed for the rows' split; ``final``: the
        save that ends training (``final_save`` while it runs)."""
        assert self.save_fn is not None
        t_save = time.perf_counter()
        self._settle_checkpoint()  # at most one save in flight
        self._phase = f"the checkpoint save at step {self.state.step}"
        self.final_save = final
        try:
            path = self.save_fn(self)
        finally:
            self.final_save = False
        self.clock.checkpoint_seconds += time.perf_counter() - t_save
        self.clock.checkpoints += 1
        if path is not None:  # None: it is being written in the background
            self.last_checkpoint = path
            self._emit("on_checkpoint", path)

    # --- anomalies -------------------------------------------------------------------------------
    def _loss_fn(self, step: int) -> LossFn:
        """The loss of ``step``: the trainer's, scaled where a fault is injected (tests)."""
        if self._train_loss.loss_fn is not self.loss_fn:  # the loss was replaced
            self._train_loss = FaultLoss(self.loss_fn)
        self._train_loss.factor = fault_scale("loss", step=step)
        return self._train_loss

    def _check(self, loss: torch.Tensor, step: int) -> str | None:
        """What is wrong with this step before its update, the same on every rank, or None.

        One all-reduce of (loss, gradients not finite): a NaN/Inf loss on any rank makes the
        sum NaN/Inf, and every rank sees the same sums, so every rank decides alike. The running
        loss mean moves on good steps only."""
        self._phase = f"the anomaly check of step {step}"
        loss = loss.detach().float().reshape(())
        flags = torch.stack([loss, self._grads_not_finite().to(loss.device)])
        total, bad_grads = pdist.all_reduce_sum(flags).tolist()
        mean = total / self.strategy.world_size
        if not math.isfinite(mean):
            return f"loss is {mean} at step {step}"
        if bad_grads:
            return f"the gradients are not finite at step {step} (loss {mean:.4g})"
        state, policy = self.state, self.anomaly
        if (
            policy.spike_factor > 0
            and state.loss_avg_steps >= policy.spike_warmup
            and mean > policy.spike_factor * state.loss_avg
        ):
            return (
                f"loss {mean:.4g} at step {step} is {mean / state.loss_avg:.1f}x its running mean "
                f"{state.loss_avg:.4g} (train.spike_factor={policy.spike_factor:g})"
            )
        state.loss_avg_steps += 1
        state.loss_avg += (mean - state.loss_avg) / min(state.loss_avg_steps, AVERAGE_SPAN)
        return None

    def _grads_not_finite(self) -> torch.Tensor:
        """1 when a gradient this rank holds is NaN/Inf (0 under fp16: its loss scaler skips
        overflowing steps itself and lowers its scale)."""
        grads = [p.grad for p in self.model.parameters() if p.grad is not None]
        if not grads or self.strategy.precision == "fp16":
            return torch.zeros(())
        local = [getattr(g, "_local_tensor", g) for g in grads]  # DTensor shards (FSDP, TP)
        peak = torch.nn.utils.get_total_norm(local, norm_type=float("inf"))
        return (~torch.isfinite(peak)).float()

    def _settle_checkpoint(self) -> None:
        """Wait for a checkpoint written in the background, if one is: from then on
        ``last_checkpoint`` names it and callbacks have heard ``on_checkpoint``. Its failure is
        raised here (every rank reaches this point alike)."""
        if self.checkpoint_wait is None:
            return
        self._phase = "the wait for the checkpoint written in the background"
        path = self.checkpoint_wait()
        if path is not None:
            self.last_checkpoint = path
            self._emit("on_checkpoint", path)

    def _stop_error(self, anomaly: str, why: str = "") -> TrainingError:
        # the error names the newest good checkpoint: one in flight counts once it is written
        # (the anomaly, not a failed save, is what this run reports)
        with contextlib.suppress(CheckpointError):
            self._settle_checkpoint()
        where = self.last_checkpoint or "none (no checkpoint was saved yet)"
        return TrainingError(
            f"{anomaly}{why}: stopped without saving; the last good checkpoint is {where}. "
            "Lower optim.lr, raise optim.warmup_steps or use train.precision=fp32, then rerun "
            "with resume=auto"
        )

    def _skip(self, anomaly: str) -> None:
        """Drop this step's update (every rank does, having decided alike): no optimizer or
        schedule step; the gradients are zeroed (a loss scaler saw no step either)."""
        self._skips_in_a_row += 1
        if self._skips_in_a_row > self.anomaly.max_consecutive_skips:
            raise self._stop_error(
                anomaly,
                f", {self._skips_in_a_row} steps in a row "
                f"(train.max_consecutive_skips={self.anomaly.max_consecutive_skips})",
            )
        self.optimizer.zero_grad(set_to_none=True)
        self.state.skipped_steps += 1
        pdist.print0(
            f"{anomaly}: skipped its update (train.on_anomaly=skip; "
            f"{self.state.skipped_steps} skipped so far)"
        )

    def _rollback(self, anomaly: str, step: int) -> None:
        """Reload the last checkpoint, keep the data position (the batches read since that
        checkpoint, the offending one included, are not read again), scale the learning rate."""
        policy, done = self.anomaly, self.state.rollbacks
        self._settle_checkpoint()  # the checkpoint to go back to may still be being written
        if done >= policy.max_rollbacks:
            raise self._stop_error(
                anomaly,
                f" after {done} rollback{'s' * (done != 1)} "
                f"(train.max_rollbacks={policy.max_rollbacks})",
            )
        if self.last_checkpoint is None or self.load_fn is None:
            raise TrainingError(
                f"{anomaly} and train.on_anomaly=rollback has no checkpoint to go back to yet "
                f"(checkpoint.interval={self.checkpoint_interval}); lower optim.lr or raise "
                "optim.warmup_steps, save earlier, or use train.on_anomaly=skip"
            )
        path = self.last_checkpoint
        self._phase = f"the rollback to {path} at step {step}"
        data = self.train_batches.state_dict()
        kept = {
            "skipped_steps": self.state.skipped_steps,
            "rollbacks": done + 1,
            "lr_scale": self.state.lr_scale * policy.rollback_lr_factor,
            "train_seconds": self.state.train_seconds,  # time spent, undone steps included
        }
        self.optimizer.zero_grad(set_to_none=True)
        self.load_state_dict(self.load_fn(self, path))
        self.train_batches.load_state_dict(data)
        factor = kept["lr_scale"] / self.state.lr_scale  # the checkpoint's schedule has its own
        if factor != 1.0:
            self.scheduler.base_lrs = [lr * factor for lr in self.scheduler.base_lrs]
            for group in self.optimizer.param_groups:
                group["lr"] *= factor
            self.scheduler._last_lr = [group["lr"] for group in self.optimizer.param_groups]
        for key, value in kept.items():
            setattr(self.state, key, value)
        self._skips_in_a_row = 0
        self._emit("on_rollback", path)
        lr = f", learning rate x{self.state.lr_scale:g}" if self.state.lr_scale != 1 else ""
        since = self.state.step + 1
        batches = (
            f"step {step}'s batch" if since == step else f"the batches of steps {since}-{step}"
        )
        pdist.print0(
            f"{anomaly}: rolled back to {path} (step {self.state.step}), skipping {batches}{lr} "
            f"(rollback {self.state.rollbacks} of at most {policy.max_rollbacks})"
        )

    def _step_tokens(self) -> int:
        if self.tokens_per_step is not None:
            return self.tokens_per_step
        return int(self.train_batches.last_step_tokens)

    def _log_train(
        self,
        loss: torch.Tensor,
        grad_norm: torch.Tensor,
        tokens: int,
        elapsed: float,
        split: list[float],
    ) -> None:
        stats = pdist.all_reduce_mean(torch.stack([loss, grad_norm]).float())
        loss_v, norm_v = stats.tolist()  # the one host sync of the interval
        # the slowest rank's split and the largest peak memory
        worst = pdist.all_reduce_max(
            torch.tensor(
                [*split, peak_memory(self.strategy.device) / 2**30],
                dtype=torch.float64,
                device=self.strategy.device,
            )
        ).tolist()
        step = self.state.step
        if not math.isfinite(loss_v):
            raise self._stop_error(f"loss is {loss_v} at step {step}")
        tps = tokens / max(elapsed, 1e-9)
        per_device = tps / self.strategy.world_size
        row = {
            "kind": "train",
            "step": step,
            "tokens": self.state.tokens,
            "flops": self.state.flops,
            "loss": loss_v,
            "lr": self.scheduler.get_last_lr()[0],
            "grad_norm": norm_v,
            "tokens_per_sec": tps,
            "mfu": per_device * self.flops_per_token / self.peak_flops,
            "time": self.state.train_seconds,
            "skipped_steps": self.state.skipped_steps,
            "rollbacks": self.state.rollbacks,
            **dict(zip(TIME_FIELDS, worst[:-1], strict=True)),
            "peak_mem_gb": worst[-1],
        }
        self.last_row = row
        self._emit("on_log", row)

    @torch.no_grad()
    def evaluate(self) -> dict:
        """Validation loss over the fixed validation batches of every rank (the mean over label
        tokens: the same value whatever the world size), plus the evaluator's task metrics.

        Batches in groups (pretrain.data.batches.GroupedBatches: the sources of a mixed corpus, extra
        held-out texts) add ``val_loss/<group>`` for each group; ``val_loss`` is the mean over
        the groups that are part of the val split. One all-reduce of every sum, whose result
        every rank shares."""
        assert self.val_batches is not None
        t0 = time.perf_counter()
        self.model.eval()
        device = self.strategy.device
        if self.evaluator is not None:
            self.evaluator.reset()
        batches = self.val_batches()
        groups: list[str] = getattr(batches, "groups", [])
        in_total: list[bool] = getattr(batches, "in_total", [])
        # row 0: val_loss; row 1 + g: group g (loss sum, label tokens)
        sums = torch.zeros(1 + len(groups), 2, device=device)
        for item in batches:
            group, batch = item if isinstance(item, tuple) else (None, item)
            n = (batch["labels"] != -100).sum().item()
            if self.evaluator is None:
                loss = self.strategy.eval_loss(self.model, batch, self.loss_fn)
            else:
                assert isinstance(self.loss_fn, StageLoss), "task metrics need output_loss"
                logits = self.strategy.eval_logits(self.model, batch)
                loss = self.loss_fn.output_loss(logits, batch["labels"].to(device))
                self.evaluator.update(logits, batch)
            if n == 0:  # a batch that keeps this rank in step with the others: no loss
                continue
            part = torch.stack([loss * n, torch.tensor(float(n), device=loss.device)])
            if group is None or in_total[group]:
                sums[0] += part
            if group is not None:
                sums[1 + group] += part
        totals = pdist.all_reduce_sum(sums).tolist()
        val = totals[0][0] / max(totals[0][1], 1)
        row = {
            "kind": "eval",
            "step": self.state.step,
            "tokens": self.state.tokens,
            "flops": self.state.flops,
            "val_loss": val,
            "val_ppl": math.exp(min(val, 50.0)),
        }
        for name, (total, count) in zip(groups, totals[1:], strict=True):
            if count:
                row[f"val_loss/{name}"] = total / count
        if self.evaluator is not None:
            counts = pdist.all_reduce_sum(self.evaluator.counts().to(device).double())
            # tensor- and pipeline-parallel peers read the same batches: count each batch once
            copies = self.strategy.world_size // self.strategy.dp_size
            row.update(self.evaluator.compute((counts / copies).round().cpu()))
        row["eval_seconds"] = time.perf_counter() - t0
        self.last_eval = row
        self._emit("on_log", row)
        self.model.train()
        return row


class MetricsCallback(Callback):
    """Sends every row to a :class:`pretrain.train.metrics.MetricsWriter` (rank 0)."""

    def __init__(self, writer) -> None:
        self.writer = writer

    def on_log(self, trainer: Trainer, row: dict) -> None:
        self.writer.write(row)

    def on_rollback(self, trainer: Trainer, path: str) -> None:
        self.writer.rewind(after_step=trainer.state.step)

    def on_train_end(self, trainer: Trainer) -> None:
        self.writer.close()


class ProgressBar(Callback):
    """tqdm bar on rank 0: steps, loss, tokens/s, MFU and ETA. When stderr is not a terminal
    (logs, CI, SLURM), one plain line per metrics row instead."""

    def on_train_start(self, trainer: Trainer) -> None:
        from tqdm.auto import tqdm

        self.bar = None
        self.t0 = time.perf_counter()
        self.start_step = trainer.state.step
        if sys.stderr.isatty():
            self.bar = tqdm(
                total=trainer.total_steps,
                initial=trainer.state.step,
                unit="step",
                dynamic_ncols=True,
                leave=True,
            )

    def on_step_end(self, trainer: Trainer) -> None:
        if self.bar is not None:
            self.bar.update(1)

    def on_rollback(self, trainer: Trainer, path: str) -> None:
        if self.bar is not None:
            self.bar.n = trainer.state.step
            self.bar.refresh()

    def on_log(self, trainer: Trainer, row: dict) -> None:
        if self.bar is None:
            done = row["step"] - self.start_step
            eta = (
                (time.perf_counter() - self.t0) / max(done, 1) * (trainer.total_steps - row["step"])
            )
            if row["kind"] == "train":
                print(
                    f"step {row['step']}/{trainer.total_steps} loss {row['loss']:.4f} "
                    f"lr {row['lr']:.2e} grad_norm {row['grad_norm']:.3f} "
                    f"tok/s {row['tokens_per_sec']:,.0f} mfu {row['mfu']:.1%} eta {eta:.0f}s"
                    + _forecast_text(row),
                    flush=True,
                )
            else:
                print(f"step {row['step']}: {_val_line(row)}{_forecast_text(row)}", flush=True)
        elif row["kind"] == "train":
            self.bar.set_postfix(
                loss=f"{row['loss']:.3f}",
                tok_s=f"{row['tokens_per_sec']:.0f}",
                mfu=f"{row['mfu']:.1%}",
                refresh=False,
            )
        else:
            self.bar.write(f"step {row['step']}: {_val_line(row)}{_forecast_text(row)}")

    def on_train_end(self, trainer: Trainer) -> None:
        if getattr(self, "bar", None) is not None:
            self.bar.close()


def _forecast_text(row: dict) -> str:
    """The final-loss forecast a row carries (pretrain/forecast/live.py adds it), as text."""
    if not isinstance(row.get("forecast"), (int, float)):
        return ""
    what = "final val_loss" if row.get("forecast_of") == "val_loss" else "final loss"
    return (
        f"; {what} forecast {row['forecast']:.3f} "
        f"[{row['forecast_low']:.3f}, {row['forecast_high']:.3f}]"
    )


def _val_line(row: dict) -> str:
    """``val_loss 2.1234`` and the groups' losses, ``(web 2.0012, code 2.3456)``."""
    parts = [
        f"{k[len('val_loss/') :]} {v:.4f}" for k, v in row.items() if k.startswith("val_loss/")
    ]
    return f"val_loss {row['val_loss']:.4f}" + (f" ({', '.join(parts)})" if parts else "")
