"""Models on disk: where a run starts from (`init_from`), or what is evaluated, sampled from or
exported.

`load_source(path)` reads any of
- an lmforge run directory (its latest checkpoint) or a checkpoint directory, of any parallel
  layout (the weights are rebuilt from the shards, pretrain/checkpoint/consolidate.py),
- a `lmforge consolidate` directory (model.safetensors + config.yaml),
- a Hugging Face model directory of a supported family (Llama 2/3.x, SmolLM2, Mistral,
  Qwen2/2.5, Qwen3: config.json + *.safetensors + tokenizer.model or tokenizer.json), such as a
  Hub download or what `lmforge export` writes,
into one :class:`ModelSource`: the model shape, fp32 weights under lmforge's names, the tokenizer, the
task (for a finetuned model) and the compute that went into it.
"""

from __future__ import annotations

import dataclasses
import functools
import glob
import json
import os
from collections.abc import Callable
from dataclasses import dataclass, field

import torch
from safetensors.torch import load_file

from lmforge.pretrain.checkpoint.consolidate import full_weights, resolve_checkpoint
from lmforge.pretrain.checkpoint.store import (
    checkpoint_tokenizer,
    read_checkpoint_config,
    read_json_file,
    read_trainer_state,
    verify_checkpoint,
)
from lmforge.pretrain.config.schema import ModelConfig, RopeScalingConfig
from lmforge.pretrain.core.durable import sha256_file
from lmforge.pretrain.core.errors import CheckpointError, ConfigurationError
from lmforge.pretrain.data.tokenizer import find_tokenizer
from lmforge.pretrain.model.hf_mapping import from_hf_name, ignored_hf_name, model_config_from_hf


@dataclass
class ModelSource:
    path: str
    model: ModelConfig
    load_weights: Callable[[], dict[str, torch.Tensor]]  # read only when used (large models)
    tokenizer: str | None
    task: dict | None = None  # {"type", "labels", ...} of a finetuned model
    lora: dict | None = None  # the LoRA config when the weights hold unmerged adapters
    compute: dict = field(default_factory=dict)  # {"tokens", "flops", "steps", ...} all stages
    kind: str = "checkpoint"
    precision: str | None = None  # the run's train.precision (auto, fp32, bf16...); None: not said

    @functools.cached_property
    def weights(self) -> dict[str, torch.Tensor]:
        """fp32 weights under lmforge's names."""
        return self.load_weights()

    @property
    def n_out(self) -> int | None:
        if self.task and self.task.get("type") != "sft" and self.task.get("labels"):
            return len(self.task["labels"])
        return None


def _model_cfg(section: dict) -> ModelConfig:
    """The ModelConfig of a run's saved config section (a plain dict from its config.yaml)."""
    keys = {f for f in ModelConfig.__dataclass_fields__}
    values = {k: v for k, v in section.items() if k in keys}
    if isinstance(values.get("rope_scaling"), dict):
        values["rope_scaling"] = RopeScalingConfig(**values["rope_scaling"])
    return ModelConfig(**values)


def load_source(path: str) -> ModelSource:
    """Whatever model directory ``path`` is (see the module docstring)."""

    if not os.path.exists(path):
        raise ConfigurationError(f"{path}: no such run, checkpoint or model directory")
    if os.path.isfile(os.path.join(path, "config.json")):
        return _load_hf(path)
    if os.path.isfile(os.path.join(path, "consolidated.json")):
        info = read_json_file(os.path.join(path, "consolidated.json"))
        _verify_consolidated(path, info)
        cfg = read_checkpoint_config(path)
        return ModelSource(
            path=path,
            model=_model_cfg(cfg["model"]),
            load_weights=lambda: load_file(os.path.join(path, "model.safetensors")),
            tokenizer=find_tokenizer(path),
            task=cfg.get("task"),  # (finetuning configs only have one)
            lora=cfg.get("lora") if cfg.get("lora", {}).get("enabled") else None,
            compute=_compute(info, cfg),
            kind="consolidated",
            precision=_precision(cfg),
        )
    checkpoint = resolve_checkpoint(path)
    verify_checkpoint(checkpoint)
    state = read_trainer_state(checkpoint)
    cfg = read_checkpoint_config(checkpoint)
    return ModelSource(
        path=checkpoint,
        model=_model_cfg(cfg["model"]),
        load_weights=lambda: full_weights(checkpoint),
        tokenizer=checkpoint_tokenizer(checkpoint, state),
        task=cfg.get("task"),  # (finetuning configs only have one)
        lora=cfg.get("lora") if cfg.get("lora", {}).get("enabled") else None,
        compute=_compute(state, cfg),
        precision=_precision(cfg),
    )


def _precision(cfg: dict) -> str | None:
    """The train.precision a run's config says it trained in."""
    precision = (cfg.get("train") or {}).get("precision")
    return str(precision) if precision is not None else None


def _compute(state: dict, cfg: dict) -> dict:
    """This model's own training compute plus that of the model it started from."""
    base = state.get("base") or {}
    own = {"tokens": state.get("tokens") or 0, "flops": state.get("flops") or 0.0}
    stage = "finetune" if "task" in cfg else "pretrain"
    return {
        "stages": [*base.get("stages", []), {"stage": stage, "name": cfg.get("name"), **own}],
        "tokens": (base.get("tokens") or 0) + own["tokens"],
        "flops": (base.get("flops") or 0.0) + own["flops"],
    }


def _verify_consolidated(path: str, info: dict) -> None:
    """The sha256 sums `lmforge consolidate` recorded in consolidated.json still match."""
    sums = info.get("sha256")
    if not isinstance(sums, dict):
        raise CheckpointError(f"{path}/consolidated.json is corrupt (no sha256 sums)")
    for name, digest in sums.items():
        file = os.path.join(path, os.path.basename(str(name)))
        if not os.path.isfile(file) or sha256_file(file) != digest:
            raise CheckpointError(
                f"{file} is missing or does not match consolidated.json: the model directory "
                "is corrupt; consolidate it again"
            )


def _load_hf(path: str) -> ModelSource:
    config = read_json_file(os.path.join(path, "config.json"))
    model_cfg = model_config_from_hf(config, source=path)
    files = sorted(glob.glob(os.path.join(path, "*.safetensors")))
    if not files:
        raise CheckpointError(
            f"{path} has no *.safetensors weights (pickled .bin weights are not loaded: they "
            "can run code); convert them to safetensors"
        )

    def load_weights() -> dict[str, torch.Tensor]:
        weights = {}
        for file in files:
            for name, tensor in load_file(file).items():
                ours = from_hf_name(name)
                if ours is not None:
                    weights[ours] = tensor.float()
                elif name == "score.bias" and not bool((tensor == 0).all()):
                    # (lmforge's exports write zeros there: its heads have no bias)
                    raise ConfigurationError(
                        f"{path}: score.bias is not zero, and lmforge's task heads have no bias; "
                        "a model with one cannot be loaded without changing its outputs"
                    )
                elif not ignored_hf_name(name):
                    raise ConfigurationError(
                        f"{path}: the weight {name} has no place in lmforge's "
                        f"{model_cfg.family} model; a model with it cannot be loaded"
                    )
        if model_cfg.tie_embeddings:
            weights.pop("output.weight", None)
        return weights

    meta = {}
    if os.path.isfile(os.path.join(path, "lmforge.json")):
        with open(os.path.join(path, "lmforge.json")) as f:
            meta = json.load(f)
    task = None
    arch = (config.get("architectures") or ["ForCausalLM"])[0]
    if arch.endswith(("ForSequenceClassification", "ForTokenClassification")):
        labels = [config["id2label"][str(i)] for i in range(len(config["id2label"]))]
        kind = "classification" if "Sequence" in arch else "token_classification"
        task = {"type": kind, "labels": labels, **meta.get("task", {})}
    elif meta.get("task"):
        task = meta["task"]
    return ModelSource(
        path=path,
        model=model_cfg,
        load_weights=load_weights,
        tokenizer=find_tokenizer(path),
        task=task,
        compute=meta.get("compute", {}),
        kind="hf",
    )


def check_tokenizer_fits(tokenizer: str, vocab: int, model_vocab: int) -> None:
    """A model reads every id of its tokenizer: the tokenizer's vocabulary (``vocab``) may be
    smaller than the model's embedding table (Hub models pad it: Qwen has 151,936 rows for
    151,665 tokens), never larger."""
    if vocab > model_vocab:
        raise ConfigurationError(
            f"the tokenizer {tokenizer} has {vocab:,} tokens but the model's vocabulary is "
            f"{model_vocab:,}: the model and this tokenizer do not belong together; use the "
            "tokenizer the model was trained with"
        )


def model_from_source(model: ModelConfig, src: ModelSource, init_from: str) -> ModelConfig:
    """The model section of a run that starts from ``src``: its shape, with this run's dropout.
    A key the run set (away from its default) to another value than the source's is refused:
    the shape comes from init_from."""
    user, default = dataclasses.asdict(model), dataclasses.asdict(ModelConfig())
    base = dataclasses.asdict(src.model)
    for key, value in user.items():
        if key != "dropout" and value != default[key] and value != base[key]:
            raise ConfigurationError(
                f"model.{key}={value} but {init_from} has model.{key}={base[key]}: the shape "
                "comes from init_from; drop the override (only model.dropout may be set)"
            )
    return dataclasses.replace(src.model, dropout=model.dropout)


def untie_for_layout(model: ModelConfig, parallel) -> tuple[ModelConfig, bool]:
    """A tied shape under tensor or pipeline parallelism, which cannot split a tied pair: the
    same shape untied (`load_weights_into` starts its LM head as a copy of the input table),
    and whether it was untied."""
    if model.tie_embeddings and (parallel.tensor_parallel > 1 or parallel.pipeline_parallel > 1):
        return dataclasses.replace(model, tie_embeddings=False), True
    return model, False


UNTIED = (
    "the embeddings of init_from, tied there, are untied (tensor and pipeline parallelism "
    "cannot split a tied pair): the LM head starts as a copy of the input table"
)


def load_weights_into(model: torch.nn.Module, weights: dict, where: str) -> None:
    """Put ``weights`` (of the model directory ``where``) into ``model``, a GPT of their shape
    and output width, every one of them: a weight that does not fit is a CheckpointError."""
    tied = getattr(model, "tied", False)
    if not tied and "output.weight" not in weights and "tok_embeddings.weight" in weights:
        # a tied source in its untied shape (`untie_for_layout`): the head starts as the table
        weights = {**weights, "output.weight": weights["tok_embeddings.weight"].clone()}
    missing, unexpected = model.load_state_dict(weights, strict=False)
    missing = [k for k in missing if not (tied and k == "output.weight")]
    if missing or unexpected:
        raise CheckpointError(
            f"{where}: weights do not fit the model (missing {missing[:3]}, unexpected "
            f"{unexpected[:3]}); was it written by another version?"
        )


def source_record(src: ModelSource, init_from: str) -> dict:
    """What a run that starts from ``src`` records of it (base.json): where it is, what kind,
    the sha256 of its weight files (a Hub or export directory's safetensors, a consolidation's
    model.safetensors, a checkpoint's manifest, which holds every file's), and the compute that
    went into it."""
    if src.kind == "hf":
        files = sorted(glob.glob(os.path.join(src.path, "*.safetensors")))
    elif src.kind == "consolidated":
        files = [os.path.join(src.path, "model.safetensors")]
    else:
        files = [os.path.join(src.path, "manifest.json")]
    return {
        "init_from": init_from,
        "source": os.path.abspath(src.path),
        "kind": src.kind,
        "weights_sha256": {os.path.basename(f): sha256_file(f) for f in files},
        "pretrain_tokens": src.compute.get("tokens"),
        "pretrain_flops": src.compute.get("flops"),
        "stages": src.compute.get("stages", []),
    }
