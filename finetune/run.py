"""`lmforge finetune`: base model -> task head / adapters -> pretraining's trainer, strategies
and checkpoints on labelled examples.

Nothing here is a second training loop: the examples (finetune/data.py) have the interface of
pretraining's windows, every task's loss is a masked cross-entropy of the model output, and the
run session (pretrain/run/session.py: layout, strategy, resume, trainer, checkpoints, metrics and
signal handling) is pretraining's. :class:`Finetuning` says only what is specific.
What finetuning adds is the model surgery (head, LoRA, freezing), task metrics in the eval rows,
early stopping, sampled generations, and the base model's compute in the run's metadata.
"""

from __future__ import annotations

import dataclasses
import json
import os

from torch import nn

from lmforge.finetune.config import FinetuneConfig
from lmforge.finetune.data import TaskData, class_weights, load_rows, steps_for
from lmforge.finetune.metrics import majority_baseline
from lmforge.finetune.model import build_model, wrap_lora
from lmforge.finetune.prompts import PromptFormat
from lmforge.finetune.tasks import (
    EarlyStopping,
    SampleGenerations,
    default_metric,
    evaluator_for,
    make_loss,
)
from lmforge.pretrain.checkpoint.model_source import (
    ModelSource,
    check_tokenizer_fits,
    load_source,
    model_from_source,
    untie_for_layout,
)
from lmforge.pretrain.config.schema import to_container
from lmforge.pretrain.core import dist as pdist
from lmforge.pretrain.core.errors import CheckpointError, ConfigurationError
from lmforge.pretrain.data.tokenizer import Tokenizer, load_tokenizer
from lmforge.pretrain.model.flops import trained_flops_per_token
from lmforge.pretrain.model.transformer import GPT
from lmforge.pretrain.run.session import RunSession, Workload, seed_everything
from lmforge.pretrain.train.loop import Callback, Trainer


def resolve_base(cfg: FinetuneConfig) -> tuple[ModelSource | None, Tokenizer]:
    """The base model and tokenizer; fills ``cfg.model`` with the base's shape. Refuses a model
    section that contradicts the base, and a tokenizer that is not the base's."""
    src = load_source(cfg.init_from) if cfg.init_from else None
    if src is not None:
        cfg.model = model_from_source(cfg.model, src, cfg.init_from)
    path = cfg.tokenizer or (src.tokenizer if src else None)
    if path is None:
        raise ConfigurationError(
            f"{cfg.init_from} does not say which tokenizer it was trained with; set "
            "tokenizer=<its tokenizer.model, tokenizer.json or model directory>"
        )
    tok = load_tokenizer(path)
    if src is not None and cfg.tokenizer and src.tokenizer:
        if load_tokenizer(src.tokenizer).sha256 != tok.sha256:
            raise ConfigurationError(
                f"tokenizer={cfg.tokenizer} is not the tokenizer {cfg.init_from} was trained "
                f"with ({src.tokenizer}); drop `tokenizer` to use the base's"
            )
    if cfg.model.vocab_size is None:
        cfg.model.vocab_size = tok.vocab_size
    check_tokenizer_fits(path, tok.vocab_size, cfg.model.vocab_size)
    cfg.tokenizer = os.path.abspath(path)
    return src, tok


def initial_model(cfg: FinetuneConfig, src: ModelSource | None, n_out: int | None):
    """The model to train: base weights (unless from scratch), a new head when the task needs
    one, LoRA adapters or a frozen trunk."""
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
    if cfg.task.type == "sft":  # the format, recorded: null stays only for a chat template
        cfg.task.template = PromptFormat(tok, cfg.task.template).template
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
    elif src is not None:  # a base's LM head under tensor or pipeline parallelism: a copy
        cfg.model, _ = untie_for_layout(cfg.model, cfg.parallel)
    return src, tok, data


class Finetuning(Workload):
    """A labelled task on a base model: examples, head / adapters, task loss and metrics."""

    command = "finetune"
    tokenizer_fix = "resume with the base it was trained on"
    cfg: FinetuneConfig
    shape_in_config = False  # the base model's shape, read by prepare

    def prepare(self) -> None:
        cfg = self.cfg
        self.src, self.tok, self.data = prepare_run(cfg)
        # an sft run's prompt format (the tokenizer's chat template, or the template)
        self.fmt = PromptFormat(self.tok, cfg.task.template) if cfg.task.type == "sft" else None
        self.train_data, self.val_data = self.data.train, self.data.val
        self.tokenizer_sha256 = self.tok.sha256
        self.tokenizer_path = str(self.tok.path.resolve())
        n_out = self.data.n_out
        weights = None
        if n_out is not None:
            weights = class_weights(cfg.class_weights, self.data.train_label_ids, n_out)
        self.loss_fn = make_loss(weights)
        self.evaluator = evaluator_for(cfg.task.type, self.data.labels)
        self.base = self.src.compute if self.src is not None and not cfg.from_scratch else {}

    def global_batch(self) -> tuple[str, int, list[tuple[str, int]]]:
        t = self.cfg.train
        return "global_batch_size", t.global_batch_size, [("micro_batch_size", t.micro_batch_size)]

    def total_steps(self) -> int:
        t = self.cfg.train
        return t.max_steps or steps_for(t.epochs or 1.0, len(self.data.train), t.global_batch_size)

    @property
    def seq_len(self) -> int:
        return self.cfg.task.max_len

    @property
    def eval_samples(self) -> int:
        return self.cfg.train.eval_samples or len(self.data.val)

    def val_samples_held(self) -> tuple[str, str, str]:
        task = self.cfg.task
        if task.val:
            return f"task.val={task.val}", "examples", "give task.val more examples"
        return (
            f"the held-out share of {task.train} (task.val_fraction={task.val_fraction:g})",
            "examples",
            "raise task.val_fraction, or give task.val",
        )

    def dry_run_lines(self) -> list[str]:
        t, n = self.cfg.train, len(self.data.train)
        steps = self.total_steps()
        return [
            f"data: {n:,} train / {len(self.data.val):,} val examples"
            + (f", {len(self.data.labels)} labels" if self.data.n_out else ""),
            f"{steps:,} optimizer steps of {t.global_batch_size} examples = "
            f"{steps * t.global_batch_size / n:.2f} epochs over {n:,} train examples",
        ]

    def check_resume(self, ckpt: str, saved_cfg: dict) -> None:
        cfg = self.cfg
        if not isinstance(saved_cfg.get("task"), dict):
            raise CheckpointError(
                f"{ckpt} is not a finetuning checkpoint (no task): to start from it, use "
                f"init_from={ckpt} in a run of another name=..."
            )
        for key in ("labels", "type"):
            if saved_cfg["task"].get(key) != getattr(cfg.task, key):
                raise CheckpointError(
                    f"{ckpt} has task.{key}={saved_cfg['task'].get(key)} but this run has "
                    f"{getattr(cfg.task, key)}; resume with the run's own task config"
                )
        if (
            saved_cfg.get("lora", {}).get("enabled") != cfg.lora.enabled
            or saved_cfg.get("freeze") != cfg.freeze
        ):
            raise CheckpointError(f"{ckpt} was trained with other lora/freeze settings; keep them")

    def check_resumed_data(self, ckpt: str, saved_samples: int) -> None:
        if saved_samples != len(self.data.train):
            raise CheckpointError(
                f"{ckpt} was trained on {saved_samples} examples, "
                f"{self.cfg.task.train} gives {len(self.data.train)}: resume with the same task data"
            )

    def build_model(self) -> nn.Module:
        model = initial_model(self.cfg, self.src, self.data.n_out)
        self.n_params = sum(p.numel() for p in model.parameters())
        self.trainable = sum(p.numel() for p in model.parameters() if p.requires_grad)
        return model

    def flops_per_token(self, model: nn.Module) -> float:
        mean_len = max(1, round(float(self.data.train.token_counts.mean())))
        return trained_flops_per_token(model, mean_len)  # what trains: all, the head, or LoRA

    def callbacks(self, run_dir: str) -> list[Callback]:
        es = self.cfg.early_stopping
        self.early_stopping = EarlyStopping(
            metric=es.metric or default_metric(self.cfg.task.type),
            mode=es.mode,
            patience=es.patience,
            min_delta=es.min_delta,
            keep_best_in=os.path.join(run_dir, "checkpoints") if es.keep_best else None,
        )
        return [self.early_stopping]

    def checkpoint_extra(self) -> dict:
        return {"base": self.base}

    def describe(self, session: RunSession) -> str:
        cfg, strategy, plan, data = self.cfg, session.strategy, session.plan, self.data
        trainer = session.trainer
        assert trainer is not None
        what = (
            f"resuming from {session.resume_from} (step {trainer.state.step})"
            if session.resume_from
            else "new"
        )
        start = "new weights" if self.src is None or cfg.from_scratch else f"from {self.src.path}"
        return (
            f"lmforge finetune: {cfg.run_dir} ({what}); {cfg.task.type} on {len(data.train):,} "
            f"train / {len(data.val):,} val examples"
            + (f", {len(data.labels)} labels" if data.n_out else "")
            + (f", prompts in {self.fmt.describe()}" if self.fmt is not None else "")
            + f"; {start}; {strategy.world_size} rank(s) [{strategy.name}] on "
            f"{strategy.device.type}, {strategy.precision}; params {self.n_params:,}, trainable "
            f"{self.trainable:,}; grad_accum {plan.grad_accum}; {plan.total_steps} steps of "
            f"{cfg.train.global_batch_size} examples"
        )

    def on_main_start(self, session: RunSession) -> None:
        cfg, strategy, trainer = self.cfg, session.strategy, session.trainer
        assert trainer is not None
        _write_json(os.path.join(cfg.run_dir, "base.json"), _base_info(cfg, self.src, self.base))
        if self.fmt is None or not cfg.train.samples:
            return
        if strategy.whole_model_per_rank:
            trainer.callbacks.append(
                SampleGenerations(
                    prompts=_val_prompts(cfg, cfg.train.samples),
                    fmt=self.fmt,
                    max_new_tokens=cfg.train.sample_tokens,
                    run_dir=cfg.run_dir,
                    start_step=trainer.state.step,
                )
            )
        else:
            pdist.print0(f"note: samples are generated under ddp only, not {strategy.name}")

    def finished(self, trainer: Trainer) -> bool:
        return trainer.state.step >= trainer.total_steps or self.early_stopping.stopped

    def on_finish(self, session: RunSession, result: dict) -> None:
        result["labels"] = self.data.labels
        ev = session.trainer.last_eval if session.trainer else None
        if not (session.strategy.is_main and ev and self.data.n_out):
            return
        if self.cfg.task.type == "classification":
            base_acc = majority_baseline(self.data.train_label_ids, self.data.val_label_ids)
            pdist.print0(
                f"validation: accuracy {ev['accuracy']:.4f}, macro-F1 {ev['macro_f1']:.4f} "
                f"(majority-class baseline accuracy {base_acc:.4f})"
            )
        elif "accuracy" in ev:
            pdist.print0(
                f"validation: entity F1 {ev['f1']:.4f}, token accuracy {ev['accuracy']:.4f}"
            )


def _val_prompts(cfg: FinetuneConfig, n: int) -> list[str]:
    source = cfg.task.val or cfg.task.train
    split = cfg.task.val_split if cfg.task.val else cfg.task.train_split
    rows = load_rows(
        source, split=split, dataset_config=cfg.task.dataset_config, escapechar=cfg.task.escapechar
    )
    return [str(r[cfg.task.prompt_column]) for r in rows[:n]]


def _base_info(cfg: FinetuneConfig, src: ModelSource | None, base: dict) -> dict:
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
