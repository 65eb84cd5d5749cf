"""`lmforge pretrain`: build -> parallelize -> (resume) -> train -> checkpoint, in that order.

Also the run-directory helpers that finetuning reuses: existence checks, provenance, resume lookup.
"""

from __future__ import annotations

import json
import os
import platform
import random
import socket
import subprocess
import sys
import time
from importlib import metadata

import numpy as np
import torch

from pretrain import dist as pdist
from pretrain.checkpoint import latest_checkpoint, load_checkpoint, save_checkpoint
from pretrain.config import PretrainConfig, to_container, to_yaml
from pretrain.data import TokenWindows, TrainBatches, eval_batches
from pretrain.errors import CheckpointError, ConfigurationError
from pretrain.flops import flops_per_token, param_counts, peak_flops
from pretrain.memory import plan_memory
from pretrain.metrics import MetricsWriter, plot_loss_vs_flops, truncate_metrics
from pretrain.model import GPT
from pretrain.optim import build_optimizer, build_scheduler
from pretrain.parallel import build_strategy, check_layout, check_state_format
from pretrain.preemption import GracefulStop
from pretrain.trainer import MetricsCallback, ProgressBar, Trainer

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
    if resume == "auto":
        return latest_checkpoint(ckpt_root) if os.path.isdir(ckpt_root) else None
    if not os.path.isdir(resume):
        raise CheckpointError(f"resume={resume}: no such checkpoint directory")
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


def check_vocab(*, model_vocab: int | None, data_vocab: int, data_path: str) -> int:
    if model_vocab is not None and model_vocab != data_vocab:
        raise ConfigurationError(
            f"model.vocab_size={model_vocab} but the tokenizer of {data_path} has {data_vocab} "
            "pieces; drop model.vocab_size (it comes from the data) or prepare with that vocab"
        )
    return data_vocab


def check_resume_compatible(
    *, ckpt: str, cfg_model: dict, cfg_parallel: dict, tokenizer_sha: str
) -> None:
    """Refuse a checkpoint whose model shape, tokenizer or state format differs from this run's."""
    from omegaconf import OmegaConf

    check_state_format(ckpt, strategy=cfg_parallel["strategy"])
    with open(os.path.join(ckpt, "trainer_state.json")) as f:
        saved = json.load(f)
    if saved.get("tokenizer_sha256") not in (None, tokenizer_sha):
        raise CheckpointError(
            f"{ckpt} was trained with another tokenizer (sha256 {saved['tokenizer_sha256'][:12]}…) "
            f"than data.path's ({tokenizer_sha[:12]}…); use the data it was trained on"
        )
    saved_cfg = OmegaConf.to_container(OmegaConf.load(os.path.join(ckpt, "config.yaml")))
    old = saved_cfg["model"]
    # Shape and numerics must match; dropout and init may change between attempts.
    diff = [k for k in cfg_model if k not in ("dropout", "init_std") and old.get(k) != cfg_model[k]]
    layout_keys = ("strategy", "zero_stage", "tensor_parallel", "pipeline_parallel")
    before = {k: saved_cfg.get("parallel", {}).get(k) for k in layout_keys}
    now = {k: cfg_parallel.get(k) for k in layout_keys}
    if before != now:
        pdist.print0(
            f"note: {ckpt} was written under parallel {before}, this run uses {now}: weights and "
            "optimizer state are resharded; dropout RNG streams do not carry over between layouts"
        )
    if diff:
        k = diff[0]
        raise CheckpointError(
            f"{ckpt} has model.{k}={old.get(k)} but this run sets model.{k}={cfg_model[k]}; "
            "resume with the checkpoint's model config"
        )


def open_run_dir(cfg, trainer: Trainer, *, config_yaml: str, world: int, resumed_from) -> int:
    """Rank 0, before training: write the resolved config and provenance, drop metric rows past
    the resumed checkpoint, attach the metric sinks and the progress bar to ``trainer``; return
    how many rows were dropped. ``cfg``: any run config with run_dir and a logging section."""
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


def checkpoint_saver(cfg, strategy, *, config_yaml: str, extra):
    """The trainer's ``save_fn``: a checkpoint of the trainer's state plus ``extra()`` (what
    else a resume needs: tokenizer, ...) under ``<run>/checkpoints``, every rank together."""

    def save(trainer: Trainer) -> str:
        return save_checkpoint(
            root=os.path.join(cfg.run_dir, "checkpoints"),
            step=trainer.state.step,
            strategy=strategy,
            model=trainer.model,
            optimizer=trainer.optimizer,
            trainer_state={**trainer.state_dict(), **extra()},
            config_yaml=config_yaml,
            keep_last=cfg.checkpoint.keep_last,
        )

    return save


def finish_message(trainer: Trainer, stopper: GracefulStop, *, total_steps: int, run_dir: str):
    """The last line of a training command: stopped by a signal (resume hint) or done."""
    done = trainer.state.step >= total_steps
    if stopper.signal and not done:
        import signal

        pdist.print0(
            f"stopped by {signal.Signals(stopper.signal).name} after step {trainer.state.step} "
            f"of {total_steps}; saved {trainer.last_checkpoint}; continue with resume=auto"
        )
    elif trainer.strategy.is_main:
        ev = trainer.last_eval
        pdist.print0(
            f"done: step {trainer.state.step}, {trainer.state.tokens:,} tokens, "
            f"{trainer.state.flops:.3e} FLOPs"
            + (f", val_loss {ev['val_loss']:.4f}" if ev else "")
            + f"; checkpoint {trainer.last_checkpoint}; metrics {run_dir}/metrics.jsonl"
        )


# --- the command -------------------------------------------------------------------------------


def run_pretrain(cfg: PretrainConfig, *, callbacks: list | None = None, loss_fn=None) -> dict:
    """Train per ``cfg`` (every rank runs this); return the final metrics rows.

    ``callbacks`` and ``loss_fn`` plug into the trainer (see pretrain/trainer.py)."""
    check_layout(cfg.parallel, cfg.model, world_size=int(os.environ.get("WORLD_SIZE", "1")))
    strategy = build_strategy(precision=cfg.train.precision, parallel=cfg.parallel)
    result = _pretrain(cfg, strategy, callbacks=callbacks or [], loss_fn=loss_fn)
    # Only on success: after an error on one rank a barrier could wait forever.
    strategy.close()
    return result


def _pretrain(cfg: PretrainConfig, strategy, *, callbacks: list, loss_fn) -> dict:
    world = strategy.world_size
    # Which samples a rank reads: its data-parallel coordinate (tensor- and pipeline-parallel
    # peers read the same ones).
    dp_rank, dp_size = strategy.dp_rank, strategy.dp_size
    run_dir = cfg.run_dir
    tcfg = cfg.train

    # Decide everything that can fail on every rank before any rank writes.
    train_windows = TokenWindows(data_dir=cfg.data.path, split="train", seq_len=tcfg.seq_len)
    val_windows = TokenWindows(data_dir=cfg.data.path, split="val", seq_len=tcfg.seq_len)
    tok = train_windows.manifest["tokenizer"]
    cfg.model.vocab_size = check_vocab(
        model_vocab=cfg.model.vocab_size, data_vocab=tok["vocab_size"], data_path=cfg.data.path
    )
    per_step = tcfg.seq_len * tcfg.micro_batch_size * dp_size
    if tcfg.global_batch_tokens % per_step:
        raise ConfigurationError(
            f"train.global_batch_tokens={tcfg.global_batch_tokens} is not a multiple of "
            f"seq_len*micro_batch_size*data_parallel = {tcfg.seq_len}*{tcfg.micro_batch_size}*"
            f"{dp_size} = {per_step} (world_size {world}); use e.g. "
            f"{max(1, round(tcfg.global_batch_tokens / per_step)) * per_step}"
        )
    grad_accum = tcfg.global_batch_tokens // per_step
    local_ranks = int(os.environ.get("LOCAL_WORLD_SIZE", "1"))
    memory, available, mem_source = plan_memory(cfg, world_size=world, local_ranks=local_ranks)
    total_steps = tcfg.total_steps()
    resume_from = resolve_resume(run_dir=run_dir, resume=cfg.resume)
    if resume_from is not None:
        check_resume_compatible(
            ckpt=resume_from,
            cfg_model=to_container(cfg.model),
            cfg_parallel=to_container(cfg.parallel),
            tokenizer_sha=tok["sha256"],
        )
    pdist.barrier()

    # Build on every rank from the same seed: identical initial weights.
    seed_everything(cfg.seed)
    model = GPT(cfg.model)
    if tcfg.deterministic:
        torch.use_deterministic_algorithms(True, warn_only=True)
    counts = param_counts(cfg.model)
    fpt = flops_per_token(cfg.model, tcfg.seq_len)
    if tcfg.compile:
        model = torch.compile(model)
    model, optimizer = strategy.prepare(
        model,
        lambda m: build_optimizer(m, cfg.optim),
        micro_batch_size=tcfg.micro_batch_size,
        grad_accum=grad_accum,
        grad_clip=tcfg.grad_clip,
    )
    scheduler = build_scheduler(optimizer, total_steps=total_steps, cfg=cfg.optim)
    # Different dropout streams per rank (weights were drawn from the common seed above).
    seed_everything(cfg.seed + 1000003 * strategy.rank + 1)

    batches = TrainBatches(
        train_windows,
        micro_batch=tcfg.micro_batch_size,
        grad_accum=grad_accum,
        rank=dp_rank,
        world_size=dp_size,
        seed=cfg.seed,
        shuffle=cfg.data.shuffle,
    )
    peak, peak_src = peak_flops(strategy.device, strategy.compute_dtype, override=tcfg.peak_flops)

    def val_batches():
        return eval_batches(
            val_windows,
            micro_batch=tcfg.micro_batch_size,
            num_samples=tcfg.eval_samples,
            rank=dp_rank,
            world_size=dp_size,
        )

    config_yaml = to_yaml(cfg)

    save = checkpoint_saver(
        cfg,
        strategy,
        config_yaml=config_yaml,
        extra=lambda: {
            "tokenizer_sha256": tok["sha256"],
            "tokenizer": os.path.abspath(os.path.join(cfg.data.path, tok["file"])),
        },
    )

    trainer = Trainer(
        model=model,
        optimizer=optimizer,
        scheduler=scheduler,
        strategy=strategy,
        train_batches=batches,
        val_batches=val_batches,
        total_steps=total_steps,
        tokens_per_step=tcfg.global_batch_tokens,
        flops_per_token=fpt,
        peak_flops=peak,
        grad_clip=tcfg.grad_clip,
        log_interval=tcfg.log_interval,
        eval_interval=tcfg.eval_interval,
        checkpoint_interval=cfg.checkpoint.interval,
        save_fn=save,
        callbacks=callbacks,
        **({"loss_fn": loss_fn} if loss_fn else {}),
    )
    if resume_from is not None:
        state = load_checkpoint(resume_from, strategy=strategy, model=model, optimizer=optimizer)
        if state["data"]["num_windows"] != len(train_windows):
            raise CheckpointError(
                f"{resume_from} was trained on {state['data']['num_windows']} samples of "
                f"seq_len {tcfg.seq_len}, {cfg.data.path} has {len(train_windows)}: resume with "
                "the same data.path and train.seq_len"
            )
        trainer.load_state_dict(state)
        trainer.last_checkpoint = resume_from

    if strategy.is_main:
        dropped = open_run_dir(
            cfg, trainer, config_yaml=config_yaml, world=world, resumed_from=resume_from
        )
        what = (
            f"resuming from {resume_from} (step {trainer.state.step})" if resume_from else "new run"
        )
        pdist.print0(
            f"lmforge pretrain: {run_dir} ({what}); {world} rank(s) [{strategy.name}, data "
            f"parallel {dp_size}] on "
            f"{strategy.device.type}, {strategy.precision}; params {counts['total']:,} total, "
            f"{counts['non_embedding']:,} non-embedding; {fpt:,} FLOPs/token; peak "
            f"{peak / 1e12:.3g} TFLOP/s ({peak_src}); grad_accum {grad_accum}; "
            f"{total_steps} steps of {tcfg.global_batch_tokens:,} tokens"
            + (f"; dropped {dropped} metric rows past the checkpoint" if dropped else "")
        )
        pdist.print0(
            f"memory per rank (estimate): {memory.describe()} of {available / 2**30:.1f} GiB "
            f"({mem_source})"
        )
    # On every rank: SIGUSR1 / SIGTERM finish the step, save and return (pretrain/preemption.py).
    stopper = GracefulStop()
    trainer.callbacks.append(stopper)
    pdist.barrier()

    trainer.fit()
    done = trainer.state.step >= total_steps

    result = {
        "train": trainer.last_row,
        "eval": trainer.last_eval,
        "checkpoint": trainer.last_checkpoint,
        "trainer": trainer,
        "exit_code": stopper.exit_code(done=done),
    }
    if strategy.is_main and cfg.logging.plot:
        plot = plot_loss_vs_flops(
            metrics_path=os.path.join(run_dir, "metrics.jsonl"),
            out_path=os.path.join(run_dir, "loss_vs_flops.png"),
            title=f"{cfg.name}: loss vs compute",
        )
        result["plot"] = plot
    finish_message(trainer, stopper, total_steps=total_steps, run_dir=run_dir)
    return result
