"""`lmforge pretrain`: a new GPT on prepared token windows.

What pretraining trains (:class:`Pretraining`); the run session (pretrain/run/session.py) does the
rest: layout, strategy, resume, trainer, checkpoints, run directory, signals.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import os

from torch import nn

from lmforge.pretrain.checkpoint.model_source import (
    UNTIED,
    ModelSource,
    check_tokenizer_fits,
    load_source,
    load_weights_into,
    model_from_source,
    source_record,
    untie_for_layout,
)
from lmforge.pretrain.checkpoint.store import read_trainer_state
from lmforge.pretrain.config.schema import ModelConfig, PretrainConfig
from lmforge.pretrain.core.durable import write_durable
from lmforge.pretrain.core.errors import CheckpointError, ConfigurationError
from lmforge.pretrain.data.batches import TokenWindows, ValidationSet, tokenize_extra_val
from lmforge.pretrain.data.tokenizer import tokenizer_sha256
from lmforge.pretrain.model.flops import flops_per_token, param_counts
from lmforge.pretrain.model.loss import LossFn
from lmforge.pretrain.model.transformer import GPT
from lmforge.pretrain.run.session import RunSession, Workload, run_session
from lmforge.pretrain.train.loop import Callback


def check_vocab(*, model_vocab: int | None, data_vocab: int, data_path: str) -> int:
    if model_vocab is not None and model_vocab != data_vocab:
        raise ConfigurationError(
            f"model.vocab_size={model_vocab} but the tokenizer of {data_path} has {data_vocab} "
            "pieces; drop model.vocab_size (it comes from the data) or prepare with that vocab"
        )
    return data_vocab


def data_sha256(manifest: dict) -> str:
    """The identity of prepared data, wherever it lies: a sha256 over what its manifest records
    of the content (token dtype, the tokenizer's sha256, every shard's sha256 in order, per
    split). Checkpoints record it, so that `resume` accepts the data at another path and
    refuses other data."""
    content = {
        "dtype": manifest["dtype"],
        "tokenizer": manifest["tokenizer"]["sha256"],
        "splits": {
            name: [shard.get("sha256") for shard in split["shards"]]
            for name, split in sorted(manifest["splits"].items())
        },
    }
    return hashlib.sha256(json.dumps(content, sort_keys=True).encode()).hexdigest()


class Pretraining(Workload):
    """Next-token prediction on the windows of a prepared dataset (`lmforge prepare`)."""

    command = "pretrain"
    tokenizer_fix = "use the data.path it was trained on"
    cfg: PretrainConfig

    def __init__(self, cfg: PretrainConfig, *, loss_fn: LossFn | None = None) -> None:
        super().__init__(cfg)
        if loss_fn is not None:
            self.loss_fn = loss_fn
        self.shuffle = cfg.data.shuffle
        self.src: ModelSource | None = None  # the model it continues, with init_from
        self.untied = False  # its tied source untied (untie_for_layout)
        self.tokens_per_step = cfg.train.global_batch_tokens

    def prepare(self) -> None:
        cfg, tcfg = self.cfg, self.cfg.train
        self.train_data = TokenWindows(data_dir=cfg.data.path, split="train", seq_len=tcfg.seq_len)
        tok = self.train_data.manifest["tokenizer"]
        extra = tokenize_extra_val(
            tcfg.extra_val,
            tokenizer_path=os.path.join(cfg.data.path, tok["file"]),
            add_bos=bool(tok.get("add_bos")),
            dtype=self.train_data.manifest["dtype"],
        )
        self.val_data = ValidationSet(data_dir=cfg.data.path, seq_len=tcfg.seq_len, extra=extra)
        if cfg.init_from:
            self.src = self._source(tok)
        else:
            cfg.model.vocab_size = check_vocab(
                model_vocab=cfg.model.vocab_size,
                data_vocab=tok["vocab_size"],
                data_path=cfg.data.path,
            )
        self.tokenizer_sha256 = tok["sha256"]
        self.tokenizer_path = os.path.abspath(os.path.join(cfg.data.path, tok["file"]))
        self.data_sha256 = data_sha256(self.train_data.manifest)

    def _source(self, tok: dict) -> ModelSource:
        """The model to continue pretraining (``init_from``): its shape becomes the run's, and
        the data must be tokenized with its tokenizer."""
        cfg = self.cfg
        src = load_source(cfg.init_from)
        if src.n_out is not None or src.lora:
            what = "a task head" if src.n_out is not None else "unmerged LoRA adapters"
            raise ConfigurationError(
                f"init_from={cfg.init_from} holds {what}; pretraining continues a language model: "
                "start from its base, or from its `lmforge export` (adapters merged)"
            )
        cfg.model = model_from_source(cfg.model, src, cfg.init_from)
        cfg.model, self.untied = untie_for_layout(cfg.model, cfg.parallel)
        if cfg.train.seq_len > cfg.model.max_seq_len:
            raise ConfigurationError(
                f"`train.seq_len`={cfg.train.seq_len} exceeds the max_seq_len "
                f"{cfg.model.max_seq_len} of init_from={cfg.init_from}; lower train.seq_len"
            )
        data_tok = os.path.join(cfg.data.path, tok["file"])
        if src.tokenizer is None:
            raise ConfigurationError(
                f"init_from={cfg.init_from} holds no tokenizer (tokenizer.model or "
                "tokenizer.json): the data must be tokenized with the model's own; put its "
                "tokenizer files beside its weights"
            )
        if tokenizer_sha256(src.tokenizer) != tok["sha256"]:
            raise ConfigurationError(
                f"data.path={cfg.data.path} was prepared with another tokenizer ({data_tok}) "
                f"than init_from={cfg.init_from} was trained with ({src.tokenizer}); prepare the "
                f"data again with tokenizer.path={os.path.dirname(src.tokenizer)}"
            )
        check_tokenizer_fits(data_tok, tok["vocab_size"], cfg.model.vocab_size)
        return src

    @property
    def shape_in_config(self) -> bool:  # type: ignore[override]
        return not self.cfg.init_from  # else the source's shape, read by prepare

    def global_batch(self) -> tuple[str, int, list[tuple[str, int]]]:
        t = self.cfg.train
        factors = [("seq_len", t.seq_len), ("micro_batch_size", t.micro_batch_size)]
        return "global_batch_tokens", t.global_batch_tokens, factors

    def total_steps(self) -> int:
        return self.cfg.train.total_steps()

    @property
    def seq_len(self) -> int:
        return self.cfg.train.seq_len

    def dry_run_lines(self) -> list[str]:
        c = param_counts(self.cfg.model)
        return [
            f"params: {c['total']:,} total, {c['non_embedding']:,} non-embedding; "
            f"{flops_per_token(self.cfg.model, self.cfg.train.seq_len):,} training FLOPs/token"
        ]

    def val_samples_held(self) -> tuple[str, str, str]:
        return (
            f"the validation split of {self.cfg.data.path}",
            f"windows of train.seq_len={self.cfg.train.seq_len}",
            "raise val_fraction in prepare for more",
        )

    def check_resume(self, ckpt: str, saved_cfg: dict) -> None:
        """Shape and numerics must match; dropout and init may change between attempts. The
        data must be the same (its checksums), wherever it lies now."""
        # (a key a checkpoint's config lacks was added since: its default is what it ran)
        old = {**dataclasses.asdict(ModelConfig()), **saved_cfg["model"]}
        if self.src is not None and self.cfg.model.tie_embeddings and not old["tie_embeddings"]:
            # its source untied for tensor or pipeline parallelism: it stays untied
            self.cfg.model = dataclasses.replace(self.cfg.model, tie_embeddings=False)
            self.untied = True
        for key, value in dataclasses.asdict(self.cfg.model).items():  # (sections as dicts)
            if key not in ("dropout", "init_std") and old.get(key) != value:
                raise CheckpointError(
                    f"{ckpt} has model.{key}={old.get(key)} but this run sets model.{key}="
                    f"{value}; resume with the checkpoint's model config"
                )
        trained_on = read_trainer_state(ckpt).get("data_sha256")  # (older checkpoints: none)
        if isinstance(trained_on, str) and trained_on != self.data_sha256:
            was = (saved_cfg.get("data") or {}).get("path")
            where = f" (at data.path={was} then)" if was else ""
            raise CheckpointError(
                f"{ckpt} was trained on other data than data.path={self.cfg.data.path}: the "
                f"prepared data it was trained on{where} has sha256 {trained_on[:12]}…, this "
                f"has {self.data_sha256[:12]}…; resume with data.path=<where that data is now> "
                "(moved data is recognised by its checksums), or start a new run with name=..."
            )

    def checkpoint_extra(self) -> dict:
        extra = {"data_sha256": self.data_sha256}
        if self.src is not None:  # the compute that went into the weights it started from
            extra["base"] = self.src.compute
        return extra

    def on_main_start(self, session: RunSession) -> None:
        if self.src is not None:
            record = source_record(self.src, self.cfg.init_from)
            write_durable(os.path.join(self.cfg.run_dir, "base.json"), json.dumps(record).encode())

    def check_resumed_data(self, ckpt: str, saved_samples: int) -> None:
        if saved_samples != len(self.train_data):
            raise CheckpointError(
                f"{ckpt} was trained on {saved_samples} samples of seq_len "
                f"{self.cfg.train.seq_len}, {self.cfg.data.path} has {len(self.train_data)}: "
                "resume with the same data.path and train.seq_len"
            )

    def build_model(self) -> nn.Module:
        model = GPT(self.cfg.model)
        if self.src is not None:  # (a resumed run then loads its checkpoint over these)
            load_weights_into(model, self.src.weights, self.src.path)
        return model

    def flops_per_token(self, model: nn.Module) -> float:
        return flops_per_token(self.cfg.model, self.cfg.train.seq_len)

    def describe(self, session: RunSession) -> str:
        cfg, strategy, plan = self.cfg, session.strategy, session.plan
        trainer = session.trainer
        assert trainer is not None
        counts = param_counts(cfg.model)
        what = (
            f"resuming from {session.resume_from} (step {trainer.state.step})"
            if session.resume_from
            else "new run"
        )
        return (
            f"lmforge pretrain: {cfg.run_dir} ({what}); {strategy.world_size} rank(s) "
            f"[{strategy.name}, data parallel {strategy.dp_size}] on "
            f"{strategy.device.type}, {strategy.precision}; params {counts['total']:,} total, "
            f"{counts['non_embedding']:,} non-embedding; {session.flops_per_token:,} "
            f"FLOPs/token; peak {session.peak / 1e12:.3g} TFLOP/s ({session.peak_source}); "
            f"grad_accum {plan.grad_accum}; {plan.total_steps} steps of "
            f"{cfg.train.global_batch_tokens:,} tokens" + (f"; {UNTIED}" if self.untied else "")
        )


def run_pretrain(
    cfg: PretrainConfig,
    *,
    callbacks: list[Callback] | None = None,
    loss_fn: LossFn | None = None,
) -> dict:
    """Train per ``cfg`` (every rank runs this); return the final metrics rows.

    ``callbacks`` and ``loss_fn`` plug into the trainer (see pretrain/train/loop.py)."""
    return run_session(Pretraining(cfg, loss_fn=loss_fn), callbacks=callbacks or ())
