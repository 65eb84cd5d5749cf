"""`lmforge finetune`: base model -> task head / adapters -> pretraining's trainer, strategies
and checkpoints on labelled examples.

Nothing here is a second training loop: the examples (finetune/data.py) have the interface of
pretraining's windows, every task's loss is a masked cross-entropy of the model output, and the
trainer, the parallel strategies, checkpointing, metrics and signal handling are pretraining's.
What finetuning adds is the model surgery (head, LoRA, freezing), task metrics in the eval rows,
early stopping, sampled generations, and the base model's compute in the run's metadata.
"""

from __future__ import annotations

import dataclasses
import json
import os

import torch

from finetune.config import FinetuneConfig
from finetune.data import TaskData, class_weights, steps_for
from finetune.model import Source, build_model, load_source, wrap_lora
from finetune.tasks import EarlyStopping, Samples, default_metric, evaluator_for, make_loss
from pretrain import dist as pdist
from pretrain.checkpoint import load_checkpoint
from pretrain.config import ModelConfig, to_container, to_yaml
from pretrain.data import TrainBatches, eval_batches
from pretrain.errors import CheckpointError, ConfigurationError
from pretrain.flops import peak_flops, trained_flops_per_token
from pretrain.metrics import plot_loss_vs_flops
from pretrain.optim import build_optimizer, build_scheduler
from pretrain.parallel import build_strategy, check_layout
from pretrain.preemption import GracefulStop
from pretrain.run import (
    checkpoint_saver,
    finish_message,
    open_run_dir,
    resolve_resume,
    seed_everything,
)
from pretrain.tokenizer import Tokenizer
from pretrain.trainer import Trainer


def resolve_base(cfg: FinetuneConfig) -> tuple[Source | None, Tokenizer]:
    """The base model and tokenizer; fills ``cfg.model`` with the base's shape. Refuses a model
    section that contradicts the base, and a tokenizer that is not the base's."""
    src = load_source(cfg.init_from) if cfg.init_from else None
    if src is not None:
        user = dataclasses.asdict(cfg.model)
        default = dataclasses.asdict(ModelConfig())
        base = dataclasses.asdict(src.model)
        for key, value in user.items():
            if key != "dropout" and value != default[key] and value != base[key]:
                raise ConfigurationError(
                    f"model.{key}={value} but {cfg.init_from} has model.{key}={base[key]}: the "
                    "shape comes from init_from; drop the override (only model.dropout may be set)"
                )
        cfg.model = dataclasses.replace(src.model, dropout=cfg.model.dropout)
    path = cfg.tokenizer or (src.tokenizer if src else None)
    if path is None:
        raise ConfigurationError(
            f"{cfg.init_from} does not say which tokenizer it was trained with; set "
            "tokenizer=<its SentencePiece .model>"
        )
    tok = Tokenizer(path)
    if src is not None and cfg.tokenizer and src.tokenizer:
        if Tokenizer(src.tokenizer).sha256 != tok.sha256:
            raise ConfigurationError(
                f"tokenizer={cfg.tokenizer} is not the tokenizer {cfg.init_from} was trained "
                f"with ({src.tokenizer}); drop `tokenizer` to use the base's"
            )
    vocab = cfg.model.vocab_size
    if vocab is not None and vocab != tok.vocab_size:
        raise ConfigurationError(
            f"the tokenizer {path} has {tok.vocab_size} pieces but the model's vocabulary is "
            f"{vocab}: use the tokenizer the model was trained with"
        )
    cfg.model.vocab_size = tok.vocab_size
    cfg.tokenizer = os.path.abspath(path)
    return src, tok


def initial_model(cfg: FinetuneConfig, src: Source | None, n_out: int | None):
    """The model to train: base weights (unless from scratch), a new head when the task needs
    one, LoRA adapters or a frozen trunk."""
    from pretrain.model import GPT

    seed_everything(cfg.seed)
    model = GPT(cfg.model, n_out=n_out)
    if src is not None and not cfg.from_scratch:
        weights = build_model(src).state_dict()
        same_head = src.n_out == n_out and (src.task or {}).get("labels") == cfg.task.labels
        if not same_head:  # the LM head (or another task's head) is not this task's
            weights = {k: v for k, v in weights.items() if not k.startswith("output.")}
        missing, unexpected = model.load_state_dict(weights, strict=False)
        assert not unexpected and all(k.startswith("output.") for k in missing), missing
    if cfg.freeze == "trunk":
        for name, p in model.named_parameters():
            p.requires_grad_(name.startswith("output."))
    if cfg.lora.enabled:
        model = wrap_lora(model, to_container(cfg.lora))
    return model


def prepare_run(cfg: FinetuneConfig):
    """Everything that can fail before training, without a process group and without reading
    the base's weights: the base's shape and tokenizer, the task data, the layout. Run by the
    launching process before it starts workers, and by every worker."""
    src, tok = resolve_base(cfg)
    if cfg.task.max_len > cfg.model.max_seq_len:
        raise ConfigurationError(
            f"task.max_len={cfg.task.max_len} exceeds the model's max_seq_len "
            f"{cfg.model.max_seq_len}; lower task.max_len"
        )
    # The data can fail in many ways: read and check it before any process group exists.
    data = TaskData(
        cfg.task,
        tok,
        seed=cfg.seed,
        labels=cfg.task.labels,
        pad_to_max=cfg.parallel.pipeline_parallel > 1,
    )
    cfg.task.labels = data.labels
    if data.n_out is not None and cfg.model.tie_embeddings:
        # a tied base's LM head is not this task's head: untie (the embeddings stay)
        cfg.model = dataclasses.replace(cfg.model, tie_embeddings=False)
    return src, tok, data


def run_finetune(cfg: FinetuneConfig) -> dict:
    """Finetune per ``cfg`` (every rank runs this); return the final rows and exit code."""
    src, tok, data = prepare_run(cfg)
    check_layout(cfg.parallel, cfg.model, world_size=int(os.environ.get("WORLD_SIZE", "1")))
    strategy = build_strategy(precision=cfg.train.precision, parallel=cfg.parallel)
    result = _finetune(cfg, strategy, src, tok, data)
    strategy.close()
    return result


def _finetune(cfg: FinetuneConfig, strategy, src: Source | None, tok: Tokenizer, data) -> dict:
    tcfg, run_dir = cfg.train, cfg.run_dir
    dp_rank, dp_size, world = strategy.dp_rank, strategy.dp_size, strategy.world_size
    n_out = data.n_out
    weights = None
    if n_out is not None:
        weights = class_weights(cfg.class_weights, data.train_label_ids, n_out)
    per_step = tcfg.micro_batch_size * dp_size
    if tcfg.global_batch_size % per_step:
        raise ConfigurationError(
            f"train.global_batch_size={tcfg.global_batch_size} is not a multiple of "
            f"micro_batch_size*data_parallel = {tcfg.micro_batch_size}*{dp_size}; use e.g. "
            f"{max(1, round(tcfg.global_batch_size / per_step)) * per_step}"
        )
    grad_accum = tcfg.global_batch_size // per_step
    total_steps = tcfg.max_steps or steps_for(
        tcfg.epochs or 1.0, len(data.train), tcfg.global_batch_size
    )
    resume_from = resolve_resume(run_dir=run_dir, resume=cfg.resume)
    if resume_from is not None:
        _check_resume(resume_from, cfg, tok)
    pdist.barrier()

    model = initial_model(cfg, src, n_out)
    if tcfg.deterministic:
        torch.use_deterministic_algorithms(True, warn_only=True)
    mean_len = max(1, round(float(data.train.token_counts.mean())))
    fpt = trained_flops_per_token(model, mean_len)  # what trains: all, the head, or LoRA
    n_params = sum(p.numel() for p in model.parameters())
    trainable = sum(p.numel() for p in model.parameters() if p.requires_grad)
    model, optimizer = strategy.prepare(
        model,
        lambda m: build_optimizer(m, cfg.optim),
        micro_batch_size=tcfg.micro_batch_size,
        grad_accum=grad_accum,
        grad_clip=tcfg.grad_clip,
    )
    scheduler = build_scheduler(optimizer, total_steps=total_steps, cfg=cfg.optim)
    seed_everything(cfg.seed + 1000003 * strategy.rank + 1)  # per-rank dropout streams
    batches = TrainBatches(
        data.train,
        micro_batch=tcfg.micro_batch_size,
        grad_accum=grad_accum,
        rank=dp_rank,
        world_size=dp_size,
        seed=cfg.seed,
        shuffle=True,
    )
    peak, _ = peak_flops(strategy.device, strategy.compute_dtype, override=tcfg.peak_flops)

    def val_batches():
        return eval_batches(
            data.val,
            micro_batch=tcfg.micro_batch_size,
            num_samples=tcfg.eval_samples or len(data.val),
            rank=dp_rank,
            world_size=dp_size,
        )

    base = src.compute if src is not None and not cfg.from_scratch else {}
    stopper_es = EarlyStopping(
        metric=cfg.early_stopping.metric or default_metric(cfg.task.type),
        mode=cfg.early_stopping.mode,
        patience=cfg.early_stopping.patience,
        min_delta=cfg.early_stopping.min_delta,
        keep_best_in=os.path.join(run_dir, "checkpoints") if cfg.early_stopping.keep_best else None,
    )
    config_yaml = to_yaml(cfg)

    save = checkpoint_saver(
        cfg,
        strategy,
        config_yaml=config_yaml,
        extra=lambda: {
            "tokenizer_sha256": tok.sha256,
            "tokenizer": str(tok.path.resolve()),
            "base": base,
            "early_stopping": stopper_es.state_dict(),
        },
    )

    loss_fn = make_loss(weights)
    trainer = Trainer(
        model=model,
        optimizer=optimizer,
        scheduler=scheduler,
        strategy=strategy,
        train_batches=batches,
        val_batches=val_batches,
        total_steps=total_steps,
        tokens_per_step=None,
        flops_per_token=fpt,
        peak_flops=peak,
        grad_clip=tcfg.grad_clip,
        log_interval=tcfg.log_interval,
        eval_interval=tcfg.eval_interval,
        checkpoint_interval=cfg.checkpoint.interval,
        save_fn=save,
        loss_fn=loss_fn,
        evaluator=evaluator_for(cfg.task.type, data.labels),
        callbacks=[stopper_es],
    )
    if resume_from is not None:
        state = load_checkpoint(resume_from, strategy=strategy, model=model, optimizer=optimizer)
        if state["data"]["num_windows"] != len(data.train):
            raise CheckpointError(
                f"{resume_from} was trained on {state['data']['num_windows']} examples, "
                f"{cfg.task.train} gives {len(data.train)}: resume with the same task data"
            )
        trainer.load_state_dict(state)
        trainer.last_checkpoint = resume_from
        if state.get("early_stopping"):
            stopper_es.load_state_dict(state["early_stopping"])
            if stopper_es.stopped:
                trainer.total_steps = trainer.state.step  # it stopped early: nothing to do

    if strategy.is_main:
        dropped = open_run_dir(
            cfg, trainer, config_yaml=config_yaml, world=world, resumed_from=resume_from
        )
        _write_json(os.path.join(run_dir, "base.json"), _base_info(cfg, src, base))
        what = f"resuming from {resume_from} (step {trainer.state.step})" if resume_from else "new"
        start = "new weights" if src is None or cfg.from_scratch else f"from {src.path}"
        pdist.print0(
            f"lmforge finetune: {run_dir} ({what}); {cfg.task.type} on {len(data.train):,} train "
            f"/ {len(data.val):,} val examples"
            + (f", {len(data.labels)} labels" if n_out else "")
            + f"; {start}; {world} rank(s) [{strategy.name}] on {strategy.device.type}, "
            f"{strategy.precision}; params {n_params:,}, trainable {trainable:,}; "
            f"grad_accum {grad_accum}; {total_steps} steps of {tcfg.global_batch_size} examples"
            + (f"; dropped {dropped} metric rows past the checkpoint" if dropped else "")
        )
        if cfg.task.type == "sft" and tcfg.samples:
            if strategy.name == "ddp" and not cfg.parallel.tensor_parallel > 1:
                prompts = _val_prompts(cfg, tcfg.samples)
                trainer.callbacks.append(
                    Samples(
                        prompts=prompts,
                        tokenizer=tok,
                        template=cfg.task.template,
                        max_new_tokens=tcfg.sample_tokens,
                        run_dir=run_dir,
                        start_step=trainer.state.step,
                    )
                )
            else:
                pdist.print0(f"note: samples are generated under ddp only, not {strategy.name}")
    stopper = GracefulStop()
    trainer.callbacks.append(stopper)
    pdist.barrier()

    trainer.fit()
    done = trainer.state.step >= trainer.total_steps or stopper_es.stopped
    result = {
        "train": trainer.last_row,
        "eval": trainer.last_eval,
        "checkpoint": trainer.last_checkpoint,
        "trainer": trainer,
        "exit_code": stopper.exit_code(done=done),
        "labels": data.labels,
    }
    if strategy.is_main and cfg.logging.plot:
        plot_loss_vs_flops(
            metrics_path=os.path.join(run_dir, "metrics.jsonl"),
            out_path=os.path.join(run_dir, "loss_vs_flops.png"),
            title=f"{cfg.name}: loss vs compute",
        )
    finish_message(trainer, stopper, total_steps=trainer.total_steps, run_dir=run_dir)
    if strategy.is_main and trainer.last_eval and n_out:
        ev = trainer.last_eval
        key = "accuracy" if "accuracy" in ev else None
        if cfg.task.type == "classification":
            from finetune.metrics import majority_baseline

            base_acc = majority_baseline(data.train_label_ids, data.val_label_ids)
            pdist.print0(
                f"validation: accuracy {ev['accuracy']:.4f}, macro-F1 {ev['macro_f1']:.4f} "
                f"(majority-class baseline accuracy {base_acc:.4f})"
            )
        elif key:
            pdist.print0(f"validation: entity F1 {ev['f1']:.4f}, token accuracy {ev[key]:.4f}")
    return result


def _check_resume(ckpt: str, cfg: FinetuneConfig, tok: Tokenizer) -> None:
    from omegaconf import OmegaConf

    from pretrain.parallel import check_state_format

    check_state_format(ckpt, strategy=cfg.parallel.strategy)
    with open(os.path.join(ckpt, "trainer_state.json")) as f:
        saved = json.load(f)
    if saved.get("tokenizer_sha256") not in (None, tok.sha256):
        raise CheckpointError(f"{ckpt} was trained with another tokenizer; use the same base")
    old = OmegaConf.to_container(OmegaConf.load(os.path.join(ckpt, "config.yaml")))
    for key in ("labels", "type"):
        if old["task"].get(key) != getattr(cfg.task, key):
            raise CheckpointError(
                f"{ckpt} has task.{key}={old['task'].get(key)} but this run has "
                f"{getattr(cfg.task, key)}; resume with the run's own task config"
            )
    if old.get("lora", {}).get("enabled") != cfg.lora.enabled or old.get("freeze") != cfg.freeze:
        raise CheckpointError(f"{ckpt} was trained with other lora/freeze settings; keep them")


def _val_prompts(cfg: FinetuneConfig, n: int) -> list[str]:
    from finetune.data import load_rows

    source = cfg.task.val or cfg.task.train
    split = cfg.task.val_split if cfg.task.val else cfg.task.train_split
    rows = load_rows(source, split=split, dataset_config=cfg.task.dataset_config)
    return [str(r[cfg.task.prompt_column]) for r in rows[:n]]


def _base_info(cfg: FinetuneConfig, src: Source | None, base: dict) -> dict:
    return {
        "init_from": cfg.init_from,
        "from_scratch": cfg.from_scratch,
        "source": src.path if src else None,
        "kind": src.kind if src else None,
        "pretrain_tokens": base.get("tokens"),
        "pretrain_flops": base.get("flops"),
        "stages": base.get("stages", []),
    }


def _write_json(path: str, obj: dict) -> None:
    with open(path, "w") as f:
        json.dump(obj, f, indent=1)
