"""One run session for every training command: build -> parallelize -> (resume) -> train ->
checkpoint, in that order, written once.

A command says only what it trains, as a :class:`Workload` (pretrain/run/pretraining.py: prepared token
windows and a new GPT; finetune/run.py: labelled examples, a base model with a task head, a task
loss and evaluator). :func:`run_session` does everything else on every rank, the same way for
both:

1. ``Workload.preflight``: read and check the data, the model shape and the layout
   (:class:`pretrain.config.layout.Layout`), the batch split and the memory estimate, before any process
   group exists (the CLI runs it before it starts workers, too);
2. the strategy joins the process group; the resume target is found and checked against this
   run (state format, tokenizer, what the workload checks);
3. the model is built from the common seed (identical weights on every rank) and handed to
   the strategy with its optimizer (which compiles each block where asked); schedule; per-rank
   dropout streams;
4. batches of this rank's data-parallel share, validation batches, the checkpoint saver, the
   trainer; resume loads model, optimizer, counters, data position and callback state;
5. rank 0 writes the run directory (config, provenance, metric sinks, progress) and says what
   runs; SIGUSR1/SIGTERM stop after a step with a checkpoint; ``fit``; plot; the last line.

See docs/architecture.md for the whole data flow and the checkpoint format.
"""

from __future__ import annotations

import json
import os
import platform
import random
import signal
import socket
import subprocess
import sys
import time
from abc import ABC, abstractmethod
from collections.abc import Iterable
from dataclasses import asdict, dataclass
from importlib import metadata
from typing import ClassVar

import numpy as np
import torch
from torch import nn

from lmforge.pretrain.checkpoint.store import (
    AsyncCheckpointer,
    check_resume_checkpoint,
    load_checkpoint,
    read_checkpoint_config,
    read_trainer_state,
    resume_point,
    save_checkpoint,
)
from lmforge.pretrain.config.layout import Layout, launched_world_size
from lmforge.pretrain.config.schema import RunConfig, to_container, to_yaml
from lmforge.pretrain.core import dist as pdist
from lmforge.pretrain.core.errors import CheckpointError, ConfigurationError, TrainingError
from lmforge.pretrain.core.faults import fault_point
from lmforge.pretrain.core.runlock import rank_lock
from lmforge.pretrain.data.batches import Samples, TrainBatches, eval_batches
from lmforge.pretrain.data.tokenizer import load_tokenizer
from lmforge.pretrain.forecast.forecast import (
    RunFacts,
    forecast_lines,
    make_forecast,
    read_forecast,
    write_forecast,
)
from lmforge.pretrain.forecast.live import LiveForecast
from lmforge.pretrain.model.flops import device_name, peak_flops
from lmforge.pretrain.model.loss import Batch, LossFn, causal_lm_loss
from lmforge.pretrain.parallel import Strategy, build_strategy, check_state_format
from lmforge.pretrain.parallel.common import StepShape, resolve_precision
from lmforge.pretrain.parallel.memory import (
    MemoryEstimate,
    current_memory,
    plan_memory,
    reset_peak_memory,
)
from lmforge.pretrain.train.loop import (
    Cadence,
    Callback,
    CheckpointHooks,
    ComputeAccounting,
    Evaluator,
    MetricsCallback,
    ProgressBar,
    StepOptions,
    TrainData,
    Trainer,
    TrainParts,
)
from lmforge.pretrain.train.metrics import MetricsWriter, plot_loss_vs_flops, truncate_metrics
from lmforge.pretrain.train.optim import build_optimizer, build_scheduler
from lmforge.pretrain.train.preemption import GracefulStop

PACKAGES = (
    "torch",
    "accelerate",
    "deepspeed",
    "datasets",
    "sentencepiece",
    "omegaconf",
    "safetensors",
    "numpy",
    "transformers",
)

# Different dropout streams per rank: seed + RANK_SEED_STRIDE * rank + 1 (weights come from
# the common seed, drawn before).
RANK_SEED_STRIDE = 1000003


# --- run directory -----------------------------------------------------------------------------


def resolve_resume(*, run_dir: str, resume: str | None) -> str | None:
    """The checkpoint to resume from (None = fresh start), or an error saying what to do."""
    ckpt_root = os.path.join(run_dir, "checkpoints")
    has_history = os.path.exists(os.path.join(run_dir, "metrics.jsonl")) or os.path.isdir(ckpt_root)
    if resume is None:
        if has_history:
            raise ConfigurationError(
                f"run directory {run_dir} already exists; continue it with resume=auto, or start "
                "a new run with another name=..."
            )
        return None
    if resume == "auto":  # the newest checkpoint that verifies, with a warning for any other
        return resume_point(ckpt_root) if os.path.isdir(ckpt_root) else None
    if os.path.isfile(resume):  # checkpoints/latest or checkpoints/best: the one it names
        with open(resume, errors="replace") as f:
            named = os.path.join(os.path.dirname(resume), f.read().strip())
        if os.path.isdir(named):
            resume = named
    if not os.path.isdir(resume):
        raise CheckpointError(f"resume={resume}: no such checkpoint directory")
    check_resume_checkpoint(resume)
    return resume


def git_commit() -> str | None:
    here = os.path.dirname(os.path.abspath(__file__))
    try:
        out = subprocess.run(
            ["git", "-C", here, "rev-parse", "HEAD"], capture_output=True, text=True, timeout=5
        )
    except (OSError, subprocess.TimeoutExpired):
        return None
    return out.stdout.strip() or None


def provenance(*, world_size: int, resumed_from: str | None) -> dict:
    versions = {}
    for name in PACKAGES:
        try:
            versions[name] = metadata.version(name)
        except metadata.PackageNotFoundError:
            pass
    return {
        "time": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
        "argv": [os.path.basename(sys.argv[0]), *sys.argv[1:]],
        "cwd": os.getcwd(),
        "git_commit": git_commit(),
        "host": socket.gethostname(),
        "platform": platform.platform(),
        "python": platform.python_version(),
        "world_size": world_size,
        "cuda": torch.cuda.get_device_name() if torch.cuda.is_available() else None,
        "packages": versions,
        "resumed_from": resumed_from,
    }


def seed_everything(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed % 2**32)
    torch.manual_seed(seed)


def check_resume_compatible(
    ckpt: str, *, strategy: str, tokenizer_sha: str, tokenizer_fix: str
) -> dict:
    """Refuse a checkpoint whose state format or tokenizer differs from this run's; say when
    it was written under another parallel layout. Returns the checkpoint's resolved config."""
    check_state_format(ckpt, strategy=strategy)
    saved = read_trainer_state(ckpt)
    if saved.get("tokenizer_sha256") not in (None, tokenizer_sha):
        raise CheckpointError(
            f"{ckpt} was trained with another tokenizer (sha256 {saved['tokenizer_sha256'][:12]}…) "
            f"than this run's ({tokenizer_sha[:12]}…); {tokenizer_fix}"
        )
    return read_checkpoint_config(ckpt)


def note_layout_change(ckpt: str, saved_cfg: dict, parallel: dict) -> None:
    layout_keys = ("strategy", "zero_stage", "tensor_parallel", "pipeline_parallel")
    before = {k: saved_cfg.get("parallel", {}).get(k) for k in layout_keys}
    now = {k: parallel.get(k) for k in layout_keys}
    if before != now:
        pdist.print0(
            f"note: {ckpt} was written under parallel {before}, this run uses {now}: weights and "
            "optimizer state are resharded; dropout RNG streams do not carry over between layouts"
        )


def check_resume_target(work: Workload) -> str | None:
    """The checkpoint ``work`` resumes from (None: a fresh start), refused in one line when it
    does not fit: its state format, tokenizer, model, task or data. Needs ``work`` prepared, and
    no process group: every rank calls it before training, and `--dry-run` and `lmforge submit`
    call it before anything starts."""
    cfg = work.cfg
    ckpt = resolve_resume(run_dir=cfg.run_dir, resume=cfg.resume)
    if ckpt is None:
        return None
    saved_cfg = check_resume_compatible(
        ckpt,
        strategy=cfg.parallel.strategy,
        tokenizer_sha=work.tokenizer_sha256,
        tokenizer_fix=work.tokenizer_fix,
    )
    note_layout_change(ckpt, saved_cfg, to_container(cfg.parallel))
    work.check_resume(ckpt, saved_cfg)
    data = read_trainer_state(ckpt).get("data")
    samples = data.get("num_windows") if isinstance(data, dict) else None
    if not isinstance(samples, int):
        raise CheckpointError(
            f"{ckpt}/trainer_state.json does not say how many samples it was trained on; "
            "resume from another checkpoint"
        )
    work.check_resumed_data(ckpt, samples)
    return ckpt


def open_run_dir(
    cfg: RunConfig, trainer: Trainer, *, config_yaml: str, world: int, resumed_from: str | None
) -> int:
    """Rank 0, before training: write the resolved config and provenance, drop metric rows past
    the resumed checkpoint, attach the metric sinks and the progress bar to ``trainer``; return
    how many rows were dropped."""
    run_dir = cfg.run_dir
    os.makedirs(run_dir, exist_ok=True)
    with open(os.path.join(run_dir, "config.yaml"), "w") as f:
        f.write(config_yaml)
    dropped = truncate_metrics(
        os.path.join(run_dir, "metrics.jsonl"), after_step=trainer.state.step
    )
    with open(os.path.join(run_dir, "provenance.jsonl"), "a") as f:
        f.write(json.dumps(provenance(world_size=world, resumed_from=resumed_from)) + "\n")
    writer = MetricsWriter(
        run_dir=run_dir,
        start_step=trainer.state.step,
        tensorboard=cfg.logging.tensorboard,
        wandb=cfg.logging.wandb,
        config=to_container(cfg),
    )
    trainer.callbacks.append(MetricsCallback(writer))
    if cfg.logging.progress:
        trainer.callbacks.append(ProgressBar())
    return dropped


def skipped_share_error(trainer: Trainer, *, run_dir: str) -> str | None:
    """The one-line failure of a run that skipped more than ``train.max_skipped_fraction`` of
    its steps (``train.on_anomaly=skip``): it learned from too few of them to end as done."""
    skipped, steps = trainer.state.skipped_steps, trainer.state.step
    limit = trainer.anomaly.max_skipped_fraction
    if not steps or skipped / steps <= limit:
        return None
    ckpt = trainer.last_checkpoint
    kept = f"the checkpoint {ckpt} and " if ckpt else ""
    return (
        f"{skipped} of {steps} steps were skipped (train.on_anomaly=skip), more than "
        f"train.max_skipped_fraction={limit:g} of them: the model learned from "
        f"{steps - skipped}; {kept}{run_dir}/metrics.jsonl are kept. Lower optim.lr, raise "
        "optim.warmup_steps or use train.precision=fp32 and rerun, or raise "
        "train.max_skipped_fraction"
    )


def finish_message(
    trainer: Trainer, stopper: GracefulStop, *, done: bool, run_dir: str, failed: bool = False
) -> None:
    """The last line of a training command: stopped by a signal (resume hint) or done (with the
    steps skipped, if any). None when the run ``failed`` (it skipped too many steps): its last
    line is run_session's error."""
    skipped = trainer.state.skipped_steps
    if failed:
        return
    if stopper.signal and not done:
        pdist.print0(
            f"stopped by {signal.Signals(stopper.signal).name} after step {trainer.state.step} "
            f"of {trainer.total_steps}; saved {trainer.last_checkpoint}; continue with resume=auto"
        )
    elif trainer.strategy.is_main:
        ev = trainer.last_eval
        pdist.print0(
            f"done: step {trainer.state.step}, {trainer.state.tokens:,} tokens, "
            f"{trainer.state.flops:.3e} FLOPs"
            + (f", val_loss {ev['val_loss']:.4f}" if ev else "")
            + (f", {skipped} of {trainer.state.step} steps skipped" if skipped else "")
            + f"; checkpoint {trainer.last_checkpoint}; metrics {run_dir}/metrics.jsonl"
        )


def write_memory_plan(run_dir: str, plan: RunPlan, *, runtime: float) -> None:
    """``memory.json``: the per-rank estimate by part and the memory rank 0 held before the
    model was built, to set against the rows' measured ``peak_mem_gb``."""
    estimate = asdict(plan.memory)
    with open(os.path.join(run_dir, "memory.json"), "w") as f:
        json.dump(
            {
                "estimate_bytes": {**estimate, "total": plan.memory.total},
                "runtime_bytes_before_model": runtime,
                "available_bytes": plan.available_memory,
                "available_source": plan.memory_source,
            },
            f,
            indent=1,
        )


def _count(first: int, last: int, every: int) -> int:
    """Steps in (first, last] that are multiples of ``every``, or ``last`` itself."""
    if last <= first:
        return 0
    multiples = last // every - first // every if every > 0 else 0
    return multiples + (0 if every > 0 and last % every == 0 else 1)


def forecast_facts(
    work: Workload,
    plan: RunPlan,
    *,
    device: torch.device,
    peak: tuple[float, str],
    flops_per_token: float,
    runtime_bytes: float,
    from_step: int,
    threads: int,
) -> RunFacts:
    """What the forecast needs of ``work`` and its ``plan`` (the run's session, and `--dry-run`
    before any process starts)."""
    cfg, layout = work.cfg, plan.layout
    tcfg = cfg.train
    samples = tcfg.micro_batch_size * plan.grad_accum * layout.dp
    counts = getattr(work.train_data, "token_counts", None)
    step_tokens = work.tokens_per_step or samples * (
        float(np.mean(counts)) if counts is not None and len(counts) else work.seq_len
    )
    precision = resolve_precision(tcfg.precision, device_type=device.type)
    key = {
        "command": work.command,
        "device": device_name(device),
        "threads": threads if device.type == "cpu" else None,
        "world_size": layout.world_size,
        "layout": layout.describe(),
        "parallel": to_container(cfg.parallel),
        "precision": precision,
        "compile": bool(tcfg.compile),
        "model": to_container(cfg.model),
        "seq_len": work.seq_len,
        "micro_batch_size": tcfg.micro_batch_size,
        "grad_accum": plan.grad_accum,
    }
    held_val = len(work.val_data)
    memory = plan.memory
    has_val = held_val > 0  # (every run evaluates at its last step when it has them)
    return RunFacts(
        name=cfg.name,
        command=work.command,
        runs_dir=cfg.runs_dir,
        total_steps=plan.total_steps,
        from_step=from_step,
        step_tokens=float(step_tokens),
        flops_per_token=float(flops_per_token),
        peak=peak[0],
        peak_source=peak[1],
        world_size=layout.world_size,
        device_type=device.type,
        memory=memory,
        runtime_bytes=runtime_bytes,
        available_bytes=plan.available_memory,
        strategy=cfg.parallel.strategy,
        zero_stage=cfg.parallel.zero_stage,
        evals=_count(from_step, plan.total_steps, tcfg.eval_interval) if has_val else 0,
        eval_tokens=float(min(work.eval_samples or held_val, held_val) * work.seq_len),
        saves=_count(from_step, plan.total_steps, cfg.checkpoint.interval),
        save_bytes=(memory.params + memory.optimizer + memory.offloaded) if memory else 0.0,
        target="val_loss" if has_val else "loss",
        periodic_evals=bool(tcfg.eval_interval) and tcfg.eval_interval < plan.total_steps,
        key=key,
    )


# --- what a command trains ---------------------------------------------------------------------


@dataclass
class RunPlan:
    """What preflight decided: the layout, the batch split, the length and the memory."""

    layout: Layout
    grad_accum: int
    total_steps: int
    memory: MemoryEstimate | None  # None: not estimated (preflight(memory=False))
    available_memory: float
    memory_source: str

    def describe_memory(self) -> str:
        return (
            f"{self.memory.describe()} of {self.available_memory / 2**30:.1f} GiB "
            f"({self.memory_source})"
        )


def grad_accum_steps(*, key: str, total: int, factors: list[tuple[str, int]], world: int) -> int:
    """Micro-batches per rank and step: ``total`` (the global batch, ``train.<key>``) over the
    product of ``factors`` (what one micro-batch of every replica holds), or an error that
    names every factor and a global batch that works."""
    per_step = 1
    for _, value in factors:
        per_step *= value
    if total % per_step:
        names = "*".join(name for name, _ in factors)
        values = "*".join(str(value) for _, value in factors)
        raise ConfigurationError(
            f"train.{key}={total} is not a multiple of {names} = {values} = {per_step} "
            f"(world_size {world}); use e.g. {max(1, round(total / per_step)) * per_step}"
        )
    return total // per_step


class Workload(ABC):
    """What a training command trains; :func:`run_session` does the rest.

    ``prepare`` reads and checks everything the command needs before any process group exists
    (data, tokenizer, base model, ``cfg.model`` completed) and sets ``train_data`` and
    ``val_data`` (token windows or task examples, :class:`pretrain.data.batches.Samples`),
    ``tokenizer_sha256`` and ``tokenizer_path`` (the file every checkpoint gets a copy of). It
    runs in the launching process before workers start and again in every worker, and must
    decide the same every time."""

    command: ClassVar[str]
    tokenizer_fix: ClassVar[str]  # what to do when a checkpoint has another tokenizer
    loss_fn: LossFn = causal_lm_loss
    evaluator: Evaluator | None = None
    shuffle: bool = True
    tokens_per_step: int | None = None  # None: steps differ in size (padded examples)
    shape_in_config: bool = True  # the model's shape is the config's (False: prepare decides it)
    train_data: Samples
    val_data: Samples
    tokenizer_sha256: str
    tokenizer_path: str

    def __init__(self, cfg: RunConfig) -> None:
        self.cfg = cfg

    # --- before any process group ----------------------------------------------------------------
    @abstractmethod
    def prepare(self) -> None: ...

    @abstractmethod
    def global_batch(self) -> tuple[str, int, list[tuple[str, int]]]:
        """``(key, value, factors)``: the global batch's config key under ``train`` and value,
        and what one micro-batch of one replica holds, as ``(name, value)`` pairs."""

    @abstractmethod
    def total_steps(self) -> int: ...

    @property
    @abstractmethod
    def seq_len(self) -> int:
        """The longest sequence a micro-batch holds (for the memory estimate)."""

    def preflight(self, *, world_size: int, local_ranks: int, memory: bool = True) -> RunPlan:
        """Everything that can fail before training, without a process group: the data and the
        model shape (``prepare``), the layout, the batch split and the memory estimate
        (``memory`` False: not estimated here, where the devices are not the run's own, as at
        `lmforge submit`)."""
        cfg = self.cfg
        fault_point("preflight")

        def layout() -> Layout:
            return Layout.of(
                cfg.parallel, world_size=world_size, model=cfg.model, precision=cfg.train.precision
            )

        # A layout that cannot run is the first thing to say, unless the shape comes with the
        # data (a finetuning base model).
        plan_layout = layout() if self.shape_in_config else None
        self.prepare()
        plan_layout = plan_layout or layout()
        key, total, factors = self.global_batch()
        grad_accum = grad_accum_steps(
            key=key,
            total=total,
            factors=[*factors, ("data_parallel", plan_layout.dp)],
            world=world_size,
        )
        estimate: tuple = (None, 0.0, "not estimated")
        if memory:
            estimate = plan_memory(
                cfg.model,
                layout=plan_layout,
                precision=cfg.train.precision,
                micro_batch_size=cfg.train.micro_batch_size,
                seq_len=self.seq_len,
                grad_accum=grad_accum,
                local_ranks=local_ranks,
            )
        return RunPlan(plan_layout, grad_accum, self.total_steps(), *estimate)

    def dry_run_lines(self) -> list[str]:
        """What `--dry-run` says of this command after preflight (the layout and the memory
        estimate follow)."""
        return []

    def val_samples_held(self) -> tuple[str, str, str]:
        """For :meth:`eval_samples_note`: where the validation samples come from, what one is,
        and how to get more."""
        return ("the validation data", "samples", "give more validation data")

    def eval_samples_note(self) -> str | None:
        """The line saying that the validation data holds fewer samples than
        ``train.eval_samples`` asks for (every evaluation uses all it holds), or None. The run
        says it once, and so does `--dry-run`."""
        held, asked = len(self.val_data), self.cfg.train.eval_samples  # type: ignore[attr-defined]
        if asked is None or held >= asked:
            return None
        where, unit, more = self.val_samples_held()
        return (
            f"note: {where} holds {held} {unit}, fewer than train.eval_samples={asked}: "
            f"evaluation uses those {held}; set train.eval_samples={held}, or {more}"
        )

    # --- the run ---------------------------------------------------------------------------------
    @property
    def eval_samples(self) -> int:
        return self.cfg.train.eval_samples  # type: ignore[attr-defined]

    def check_resume(self, ckpt: str, saved_cfg: dict) -> None:
        """Refuse a checkpoint that does not fit this command (beyond tokenizer and format)."""
        return None

    @abstractmethod
    def check_resumed_data(self, ckpt: str, saved_samples: int) -> None:
        """Refuse a checkpoint trained on other data (a different number of samples)."""

    @abstractmethod
    def build_model(self) -> nn.Module:
        """The model to train (the session has seeded every RNG with the run's seed)."""

    @abstractmethod
    def flops_per_token(self, model: nn.Module) -> float:
        """Training FLOPs per token of ``model`` (before the strategy wraps it)."""

    def callbacks(self, run_dir: str) -> list[Callback]:
        """The command's own callbacks (every rank), before the session's."""
        return []

    def checkpoint_extra(self) -> dict:
        """What else the checkpoint's trainer_state.json carries for this command."""
        return {}

    @abstractmethod
    def describe(self, session: RunSession) -> str:
        """Rank 0's first line: what runs, on what, how long."""

    def on_main_start(self, session: RunSession) -> None:
        """Rank 0, after the run directory is written: the command's own extras."""
        return None

    def finished(self, trainer: Trainer) -> bool:
        return trainer.state.step >= trainer.total_steps

    def on_finish(self, session: RunSession, result: dict) -> None:
        """After training and the last line (every rank): the command's own summary."""
        return None


# --- the session -------------------------------------------------------------------------------


class RunSession:
    """One run of a :class:`Workload` on one rank (see the module docstring for the order)."""

    def __init__(
        self,
        work: Workload,
        strategy: Strategy,
        plan: RunPlan,
        *,
        callbacks: Iterable[Callback] = (),
    ) -> None:
        self.work, self.strategy, self.plan = work, strategy, plan
        self.cfg = work.cfg
        self.extra_callbacks = list(callbacks)
        self.trainer: Trainer | None = None
        self.resume_from: str | None = None

    def _peak_flops(self) -> tuple[float, str]:
        """One device's peak FLOP/s for MFU and where it comes from (``train.peak_flops``, a
        table of known GPUs, or a matmul probe). The ranks of a node take turns to probe (on a
        CPU they share the cores: probing at once, each would read a fraction of its own peak)."""
        strategy = self.strategy
        local_rank = int(os.environ.get("LOCAL_RANK", "0"))
        for turn in range(int(os.environ.get("LOCAL_WORLD_SIZE", "1"))):
            if turn == local_rank:
                measured = peak_flops(
                    strategy.device, strategy.compute_dtype, override=self.cfg.train.peak_flops
                )
            if strategy.device.type == "cpu":
                pdist.barrier()
        return measured

    def _data(self) -> TrainData:
        """This rank's data-parallel share of the training samples, one step at a time, and of
        the fixed validation samples."""
        cfg, work, strategy = self.cfg, self.work, self.strategy
        train = TrainBatches(
            work.train_data,
            micro_batch=cfg.train.micro_batch_size,
            grad_accum=self.plan.grad_accum,
            rank=strategy.dp_rank,
            world_size=strategy.dp_size,
            seed=cfg.seed,
            shuffle=work.shuffle,
        )

        def val() -> Iterable[Batch]:
            return eval_batches(
                work.val_data,
                micro_batch=cfg.train.micro_batch_size,
                num_samples=work.eval_samples,
                rank=strategy.dp_rank,
                world_size=strategy.dp_size,
            )

        return TrainData(train, val)

    def _checkpoint_hooks(self, config_yaml: str) -> CheckpointHooks:
        """The trainer's ``save_fn`` and ``checkpoint_wait``: synchronous saves, or with
        ``checkpoint.async_save`` saves written in the background (a gloo group of their own is
        made here, on every rank alike). ``checkpoint.consolidated`` decides which of them
        hold model.safetensors (``final``: the one that ends training, ``trainer.final_save``).
        Every checkpoint carries the run's tokenizer (read once, here, by rank 0) and names it
        relative to itself: a run directory works wherever it is copied. ``load_fn`` loads one
        back (``train.on_anomaly=rollback``)."""
        cfg, work, strategy = self.cfg, self.work, self.strategy
        background = AsyncCheckpointer() if cfg.checkpoint.async_save else None
        mode = cfg.checkpoint.consolidated
        tok = load_tokenizer(work.tokenizer_path)
        tokenizer = None
        if strategy.is_main:
            tokenizer = {name: file.read_bytes() for name, file in tok.files().items()}

        def save(trainer: Trainer) -> str | None:
            return (background.save if background else save_checkpoint)(
                root=os.path.join(cfg.run_dir, "checkpoints"),
                step=trainer.state.step,
                strategy=strategy,
                model=trainer.model,
                optimizer=trainer.optimizer,
                trainer_state={
                    **trainer.state_dict(),
                    "tokenizer_sha256": work.tokenizer_sha256,
                    "tokenizer": tok.file_name,  # in the checkpoint itself
                    **work.checkpoint_extra(),
                },
                config_yaml=config_yaml,
                keep_last=cfg.checkpoint.keep_last,
                consolidated=mode == "every" or (mode == "final" and trainer.final_save),
                tokenizer=tokenizer,
            )

        def load(trainer: Trainer, path: str) -> dict:
            return load_checkpoint(
                path, strategy=strategy, model=trainer.model, optimizer=trainer.optimizer
            )

        return CheckpointHooks(save, background.wait if background else None, load)

    def _resume(self, trainer: Trainer) -> None:
        """Load the resume checkpoint (verified by ``resolve_resume``) into ``trainer``: model,
        optimizer, counters, schedule, data position and callback state."""
        assert self.resume_from is not None
        state = load_checkpoint(
            self.resume_from,
            strategy=self.strategy,
            model=trainer.model,
            optimizer=trainer.optimizer,
            verify=False,
        )
        trainer.load_state_dict(state)
        trainer.last_checkpoint = self.resume_from

    def build(self) -> Trainer:
        """Steps 2-4: everything up to a trainer ready to ``fit`` (resumed when asked)."""
        cfg, work, strategy, plan = self.cfg, self.work, self.strategy, self.plan
        tcfg = cfg.train
        self.resume_from = check_resume_target(work)
        pdist.barrier()  # every rank has checked everything before any rank writes
        self.peak, self.peak_source = self._peak_flops()
        # What this process holds before the model exists (the runtime: Python, torch, the
        # process group), for memory.json: the estimate counts only what training adds. The
        # peak restarts here, so the probe's freed buffers are not in the rows' peak_mem_gb.
        reset_peak_memory(strategy.device)
        self.runtime_memory = current_memory(strategy.device)
        seed_everything(cfg.seed)  # identical initial weights on every rank
        model = work.build_model()
        if tcfg.deterministic:
            torch.use_deterministic_algorithms(True, warn_only=True)
        self.flops_per_token = work.flops_per_token(model)  # before the strategy wraps it
        strategy.compile_blocks = tcfg.compile  # each block, inside prepare (apply_compile)
        model, optimizer = strategy.prepare(
            model,
            lambda m: build_optimizer(m, cfg.optim),
            StepShape(tcfg.micro_batch_size, plan.grad_accum, tcfg.grad_clip),
        )
        scheduler = build_scheduler(optimizer, total_steps=plan.total_steps, cfg=cfg.optim)
        seed_everything(cfg.seed + RANK_SEED_STRIDE * strategy.rank + 1)
        self.config_yaml = to_yaml(cfg)
        trainer = Trainer(
            parts=TrainParts(model, optimizer, scheduler, strategy),
            data=self._data(),
            cadence=Cadence.from_config(cfg, total_steps=plan.total_steps),
            compute=ComputeAccounting(work.tokens_per_step, self.flops_per_token, self.peak),
            checkpoints=self._checkpoint_hooks(self.config_yaml),
            options=StepOptions.from_config(tcfg),
            loss_fn=work.loss_fn,
            evaluator=work.evaluator,
            callbacks=[*work.callbacks(cfg.run_dir), *self.extra_callbacks],
        )
        if self.resume_from is not None:
            self._resume(trainer)
        self.trainer = trainer
        return trainer

    def _forecast(self, trainer: Trainer, started: float) -> None:
        """Rank 0: the forecast before the first step (forecast.json, the printed block) and
        the callback that refits it and checks it at the end (pretrain/forecast/)."""
        cfg, work = self.cfg, self.work
        facts = forecast_facts(
            work,
            self.plan,
            device=self.strategy.device,
            peak=(self.peak, self.peak_source),
            flops_per_token=self.flops_per_token,
            runtime_bytes=self.runtime_memory,
            from_step=trainer.state.step,
            threads=torch.get_num_threads(),
        )
        fc = make_forecast(facts, cfg.forecast)
        earlier = read_forecast(cfg.run_dir)  # a resumed run keeps the forecasts before it
        if earlier is not None and not earlier.get("dry_run"):
            fc["previous"] = [*earlier.pop("previous", []), earlier]
        live = LiveForecast(fc, cfg, total_steps=self.plan.total_steps, started=started)
        write_forecast(cfg.run_dir, fc)
        for line in forecast_lines(fc):
            pdist.print0(line)
        trainer.callbacks.insert(0, live)  # before the metric sinks: rows carry the refits

    def run(self) -> dict:
        """Build, open the run directory, train; return the final rows and the exit code."""
        cfg, work, strategy = self.cfg, self.work, self.strategy
        started = time.perf_counter()
        trainer = self.build()
        if strategy.is_main:
            dropped = open_run_dir(
                cfg,
                trainer,
                config_yaml=self.config_yaml,
                world=strategy.world_size,
                resumed_from=self.resume_from,
            )
            pdist.print0(
                work.describe(self)
                + (f"; dropped {dropped} metric rows past the checkpoint" if dropped else "")
            )
            pdist.print0(f"memory per rank (estimate): {self.plan.describe_memory()}")
            write_memory_plan(cfg.run_dir, self.plan, runtime=self.runtime_memory)
            if cfg.forecast.enabled:
                self._forecast(trainer, started)
            note = work.eval_samples_note()
            if note:
                pdist.print0(note)
            work.on_main_start(self)
        # On every rank: SIGUSR1 / SIGTERM finish the step, save and return (preemption.py).
        stopper = GracefulStop()
        trainer.callbacks.append(stopper)
        pdist.barrier()

        trainer.fit()
        done = work.finished(trainer)
        result = {
            "train": trainer.last_row,
            "eval": trainer.last_eval,
            "checkpoint": trainer.last_checkpoint,
            "trainer": trainer,
            "exit_code": stopper.exit_code(done=done),
            # set when the run skipped too many steps: run_session raises it (exit 3)
            "failure": skipped_share_error(trainer, run_dir=cfg.run_dir) if done else None,
        }
        if strategy.is_main and cfg.logging.plot:
            result["plot"] = plot_loss_vs_flops(
                metrics_path=os.path.join(cfg.run_dir, "metrics.jsonl"),
                out_path=os.path.join(cfg.run_dir, "loss_vs_flops.png"),
                title=f"{cfg.name}: loss vs compute",
            )
        finish_message(
            trainer, stopper, done=done, run_dir=cfg.run_dir, failed=bool(result["failure"])
        )
        work.on_finish(self, result)
        return result


def run_session(work: Workload, *, callbacks: Iterable[Callback] = ()) -> dict:
    """Run ``work`` on this rank (every rank calls this); return the final rows and the exit
    code (0 when done; 128 + the signal when SIGUSR1/SIGTERM stopped it after a save), or raise
    TrainingError (exit 3) for a run that skipped more than train.max_skipped_fraction."""
    cfg = work.cfg
    plan = work.preflight(
        world_size=launched_world_size(),
        local_ranks=int(os.environ.get("LOCAL_WORLD_SIZE", "1")),
    )
    pdist.set_collective_timeout(cfg.parallel.timeout_s)  # before any process group exists
    strategy = build_strategy(precision=cfg.train.precision, layout=plan.layout)
    # One run, one writer: rank 0 (or its launcher) holds the run directory's lock until the
    # run ends; a refusal reaches every rank (pretrain/core/runlock.py).
    with rank_lock(cfg.run_dir, main=strategy.is_main):
        result = RunSession(work, strategy, plan, callbacks=callbacks).run()
    # Only on success: after an error on one rank a barrier could wait forever.
    strategy.close()
    if result["failure"]:  # every rank alike (the skips were decided alike)
        raise TrainingError(result["failure"])
    return result
