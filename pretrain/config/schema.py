"""Structured configs: dataclass defaults -> YAML files -> dotted overrides (omegaconf).

Every field has a docstring (shown by ``lmforge print-config --keys``). Cross-field checks live
in ``__post_init__`` so that ``OmegaConf.to_object`` runs them; their messages name the key and the
fix. Derived values are properties, never stored fields.

CLI contract: ``lmforge <command> [CONFIG.yaml ...] [section=PRESET.yaml ...]
[dotted.key=value ...]``: applied in order, later wins.
"""

from __future__ import annotations

import ast
import difflib
import importlib.util
import inspect
import math
import os
import re
import textwrap
from dataclasses import dataclass, field, fields, is_dataclass
from typing import Any, Literal

import yaml
from omegaconf import MISSING, DictConfig, OmegaConf
from omegaconf.errors import (
    ConfigAttributeError,
    ConfigKeyError,
    OmegaConfBaseException,
    ValidationError,
)

from lmforge.pretrain.config import presets
from lmforge.pretrain.config.dsconfig import ZeroChoice, check_deepspeed_json, zero_choice
from lmforge.pretrain.core.errors import ConfigurationError

# --------------------------------------------------------------------------------------------
# prepare
# --------------------------------------------------------------------------------------------


def check_escapechar(value: str | None, key: str) -> None:
    """An escape character for CSV/TSV readers: one character that is not a quote, a field
    delimiter or a line break."""
    if value is None:
        return
    if not isinstance(value, str) or len(value) != 1 or value in '",\t\r\n':
        raise ConfigurationError(
            f"`{key}` must be one character other than a quote, comma, tab or line break, got "
            f'{value!r}; for a backslash write {key.rpartition(".")[2]}: "\\\\" in YAML'
        )


@dataclass
class SourceConfig:
    """One input of the corpus."""

    path: str | None = None
    """Local file, directory (read recursively) or glob; `pkg://PACKAGE/sub/dir` points inside an
    installed Python package (the bundled demo corpus). Exactly one of `path` and `dataset`."""
    dataset: str | None = None
    """A `datasets` name (or local dataset script/directory) loaded with `datasets.load_dataset`."""
    dataset_config: str | None = None
    """Optional `datasets` configuration name (second argument of `load_dataset`)."""
    split: str = "train"
    """Split of a `datasets` source to read."""
    format: Literal["auto", "text", "jsonl", "csv", "parquet"] = "auto"
    """File format of `path` sources; `auto` picks by file extension (.txt/.md -> text)."""
    text_column: str = "text"
    """Column holding the text in JSONL/CSV/Parquet/`datasets` sources."""
    text_unit: Literal["document", "paragraph", "line"] = "document"
    """Text files only: what one document is (a whole file, a blank-line-separated paragraph,
    or a line)."""
    weight: float = 1.0
    """Passes over this source in the mixture: 2.0 repeats it twice, 0.5 takes half its documents."""
    escapechar: str | None = None
    """CSV/TSV files only: the character that escapes a quote inside a quoted field, as in
    `"He said \\"hi\\""` (scraped data often writes quotes so); null = quotes are doubled (`""`),
    the CSV standard. In YAML: `escapechar: "\\\\"` (a backslash). It makes the next character
    literal and is itself dropped: `\\\\` reads as `\\`, and `\\n` as `n`."""

    def __post_init__(self) -> None:
        check_escapechar(self.escapechar, "sources[].escapechar")
        if (self.path is None) == (self.dataset is None):
            raise ConfigurationError(
                "each entry of `sources` needs exactly one of `path` and `dataset` "
                f"(got path={self.path!r}, dataset={self.dataset!r})"
            )
        if not (self.weight > 0 and math.isfinite(self.weight)):
            raise ConfigurationError(
                f"`sources[].weight` must be a positive number, got {self.weight} "
                f"for {self.path or self.dataset!r}"
            )

    @property
    def name(self) -> str:
        return self.path if self.path is not None else f"datasets:{self.dataset}"


@dataclass
class TokenizerConfig:
    """The tokenizer: trained on the corpus, or one that exists (a model's own)."""

    path: str | None = None
    """An existing tokenizer to reuse: a SentencePiece `.model`, a Hugging Face `tokenizer.json`
    (its `tokenizer_config.json` beside it names the special tokens), or a model directory
    holding either (such as one downloaded from the Hub); null trains a new one on the corpus."""
    kind: Literal["sentencepiece", "bpe_bytes"] = "sentencepiece"
    """What a newly trained tokenizer is: SentencePiece (BPE or Unigram over characters, with
    byte fallback), or bpe_bytes: byte-level BPE as GPT-2, Llama 3 and Qwen use, written as a
    Hugging Face tokenizer.json."""
    vocab_size: int = 8000
    """Vocabulary size of a newly trained tokenizer (special and byte pieces included)."""
    model_type: Literal["bpe", "unigram"] = "bpe"
    """SentencePiece model type (with kind=sentencepiece)."""
    train_max_bytes: int = 50_000_000
    """At most this many bytes of text (first in corpus order) are used to train the tokenizer."""
    add_bos: bool = False
    """Put BOS before each document (EOS always ends each document)."""
    newline_pieces: bool = True
    """Train on whole documents, newlines included, so that pieces such as "\\n", "\\n\\n" or
    ".\\n" are learned (the demo plays: 10% fewer tokens); false = train line by line, so that
    every newline is the byte-fallback piece `<0x0A>`. Only for a newly trained SentencePiece
    tokenizer."""

    def __post_init__(self) -> None:
        if self.path is None and self.vocab_size < 300:
            raise ConfigurationError(
                f"`tokenizer.vocab_size`={self.vocab_size} is too small: the 256 byte pieces and "
                "the special tokens alone need more; use at least 300"
            )
        if self.kind == "bpe_bytes":
            if self.path is not None:
                raise ConfigurationError(
                    "`tokenizer.kind`=bpe_bytes trains a tokenizer, but `tokenizer.path` names "
                    f"one to reuse ({self.path}); drop one of them"
                )
            for key, value, default in (
                ("model_type", self.model_type, "bpe"),
                ("newline_pieces", self.newline_pieces, True),
            ):
                if value != default:
                    raise ConfigurationError(
                        f"`tokenizer.{key}`={value} is a SentencePiece option, not one of "
                        "`tokenizer.kind`=bpe_bytes; drop it or use kind=sentencepiece"
                    )


@dataclass
class PrepareConfig:
    """`lmforge prepare`: text -> tokenizer -> memmap shards with a manifest."""

    out: str = MISSING
    """Output directory (created; must not already hold a prepared dataset unless `overwrite`)."""
    sources: list[SourceConfig] = field(default_factory=list)
    """Inputs of the corpus (a weighted mixture when several)."""
    tokenizer: TokenizerConfig = field(default_factory=TokenizerConfig)
    """Tokenizer to train or reuse."""
    val_fraction: float = 0.01
    """Fraction of documents (chosen by a seeded hash) held out for validation."""
    shard_tokens: int = 100_000_000
    """Tokens per shard file."""
    num_proc: int = 0
    """Processes for tokenization (`datasets.map(num_proc=...)`); 0 = number of CPU cores."""
    seed: int = 1234
    """Seed of the train/val split and of sub-sampling sources with weight < 1."""
    overwrite: bool = False
    """Replace an existing prepared dataset in `out`."""

    def __post_init__(self) -> None:
        if not self.sources:
            raise ConfigurationError(
                "`sources` is empty: give at least one, e.g. sources='[{path: corpus.txt}]' "
                "or a YAML list of {path: ...} / {dataset: ...} entries"
            )
        if not 0.0 < self.val_fraction < 0.5:
            raise ConfigurationError(f"`val_fraction` must be in (0, 0.5), got {self.val_fraction}")
        if self.shard_tokens < 1024:
            raise ConfigurationError(f"`shard_tokens` must be >= 1024, got {self.shard_tokens}")
        if self.num_proc < 0:
            raise ConfigurationError(f"`num_proc` must be >= 0, got {self.num_proc}")

    @property
    def resolved_num_proc(self) -> int:
        return self.num_proc or (os.cpu_count() or 1)


# --------------------------------------------------------------------------------------------
# model
# --------------------------------------------------------------------------------------------


@dataclass
class RopeScalingConfig:
    """Llama 3's RoPE frequency scaling (`rope_scaling: {rope_type: llama3, ...}` in a Hugging
    Face config.json): wavelengths longer than original_max_position_embeddings / low_freq_factor
    are divided by `factor`, those shorter than .../high_freq_factor kept, and the ones between
    blended smoothly."""

    rope_type: Literal["llama3"] = "llama3"
    """The only scaling lmforge implements (yarn, dynamic, linear ... are refused)."""
    factor: float = 8.0
    low_freq_factor: float = 1.0
    high_freq_factor: float = 4.0
    original_max_position_embeddings: int = 8192

    def __post_init__(self) -> None:
        if not (self.factor >= 1 and self.high_freq_factor > self.low_freq_factor > 0):
            raise ConfigurationError(
                "`model.rope_scaling` needs factor >= 1 and high_freq_factor > low_freq_factor "
                f"> 0, got factor={self.factor}, low_freq_factor={self.low_freq_factor}, "
                f"high_freq_factor={self.high_freq_factor}"
            )
        if self.original_max_position_embeddings < 1:
            raise ConfigurationError(
                "`model.rope_scaling.original_max_position_embeddings` must be >= 1, got "
                f"{self.original_max_position_embeddings}"
            )


@dataclass
class ModelConfig:
    """A GPT-style decoder with Llama-style blocks (RMSNorm, RoPE, SwiGLU, no biases), and the
    switches of the families lmforge imports and exports (Llama 3, Mistral, Qwen2/2.5, Qwen3)."""

    n_layer: int = 4
    """Number of transformer blocks."""
    n_head: int = 4
    """Attention (query) heads."""
    n_kv_head: int | None = None
    """Key/value heads (grouped-query attention); null = `n_head` (multi-head attention)."""
    d_model: int = 128
    """Residual stream width; divisible by `n_head` unless `head_dim` is set."""
    head_dim: int | None = None
    """Width of each attention head; null = d_model / n_head. Qwen3 sets it (128 at every size),
    so that n_head * head_dim may differ from d_model."""
    ffn_hidden: int | None = None
    """SwiGLU hidden width; null = 8/3 * d_model rounded up to a multiple of `multiple_of`."""
    multiple_of: int = 32
    """Rounding of the derived SwiGLU hidden width."""
    vocab_size: int | None = None
    """Vocabulary size; null = taken from the prepared data (a mismatch is an error)."""
    max_seq_len: int = 2048
    """Longest sequence the RoPE tables are built for."""
    rope_theta: float = 10000.0
    """RoPE base frequency."""
    rope_scaling: RopeScalingConfig | None = None
    """RoPE frequency scaling (Llama 3.1+: rope_type llama3); null = none."""
    qkv_bias: bool = False
    """Biases on the query, key and value projections (Qwen2 and Qwen2.5)."""
    qk_norm: bool = False
    """RMSNorm over each head's queries and keys before RoPE (Qwen3)."""
    norm_eps: float = 1e-5
    """RMSNorm epsilon."""
    tie_embeddings: bool = False
    """Share the input embedding table with the LM head."""
    dropout: float = 0.0
    """Dropout on attention probabilities and residual branches (0 for pretraining)."""
    init_std: float = 0.02
    """Std of the normal init; output projections use init_std / sqrt(2 * n_layer)."""
    family: Literal["llama", "mistral", "qwen2", "qwen3"] = "llama"
    """The Hugging Face family an export is written as (LlamaForCausalLM, MistralForCausalLM,
    Qwen2ForCausalLM, Qwen3ForCausalLM, and their classification heads); an imported model
    keeps its own. The switches above must be ones the family has."""

    def __post_init__(self) -> None:
        for name in ("n_layer", "n_head", "d_model", "max_seq_len", "multiple_of"):
            if getattr(self, name) < 1:
                raise ConfigurationError(f"`model.{name}` must be >= 1, got {getattr(self, name)}")
        if self.head_dim is not None and self.head_dim < 2:
            raise ConfigurationError(f"`model.head_dim` must be >= 2, got {self.head_dim}")
        if self.head_dim is None and self.d_model % self.n_head:
            raise ConfigurationError(
                f"`model.d_model`={self.d_model} must be divisible by `model.n_head`={self.n_head} "
                "(or set `model.head_dim`)"
            )
        if self.head_size % 2:
            raise ConfigurationError(
                f"the head width {self.head_size} must be even for RoPE; change `model.d_model`, "
                "`model.n_head` or `model.head_dim`"
            )
        if self.kv_heads < 1 or self.n_head % self.kv_heads:
            raise ConfigurationError(
                f"`model.n_head`={self.n_head} must be a multiple of `model.n_kv_head`="
                f"{self.n_kv_head}"
            )
        if not 0.0 <= self.dropout < 1.0:
            raise ConfigurationError(f"`model.dropout` must be in [0, 1), got {self.dropout}")
        if self.vocab_size is not None and self.vocab_size < 2:
            raise ConfigurationError(f"`model.vocab_size` must be >= 2, got {self.vocab_size}")
        # Each switch belongs to one family, which always has it (its transformers class builds
        # those weights whatever its config says).
        for family, switch in (("qwen2", "qkv_bias"), ("qwen3", "qk_norm")):
            if getattr(self, switch) and self.family != family:
                raise ConfigurationError(
                    f"`model.{switch}`=true is not part of `model.family`={self.family}; set "
                    f"model.family={family} (the family an export is written as) or drop it"
                )
            if self.family == family and not getattr(self, switch):
                raise ConfigurationError(
                    f"`model.family`={family} has `model.{switch}`; set model.{switch}=true "
                    "or choose another family"
                )
        if self.family == "qwen2" and self.head_size * self.n_head != self.d_model:
            raise ConfigurationError(
                "`model.family`=qwen2 has heads of d_model / n_head; drop `model.head_dim`"
            )

    @property
    def head_size(self) -> int:
        """The width of each head: `head_dim`, else d_model / n_head."""
        return self.head_dim if self.head_dim is not None else self.d_model // self.n_head

    @property
    def kv_heads(self) -> int:
        return self.n_kv_head if self.n_kv_head is not None else self.n_head

    @property
    def hidden_dim(self) -> int:
        if self.ffn_hidden is not None:
            return self.ffn_hidden
        hidden = int(8 * self.d_model / 3)
        return self.multiple_of * math.ceil(hidden / self.multiple_of)


# --------------------------------------------------------------------------------------------
# pretrain
# --------------------------------------------------------------------------------------------


@dataclass
class DataConfig:
    """Prepared data to train on (the output directory of `lmforge prepare`)."""

    path: str = MISSING
    """Directory holding `manifest.json` and the shards."""
    shuffle: bool = True
    """Shuffle training samples (seeded; re-shuffled every epoch)."""


@dataclass
class LoopConfig:
    """What every training loop has: the base of pretraining's and finetuning's `train`
    sections (pretrain/run/session.py reads these)."""

    micro_batch_size: int = 8
    """Samples per forward/backward on each rank."""
    max_steps: int | None = None
    """Optimizer steps to run."""
    precision: Literal["auto", "fp32", "bf16", "fp16", "fp8"] = "auto"
    """Mixed precision: auto = bf16 where supported (CPU with bf16 ops, Ampere+), else fp16 on
    GPUs, else fp32. fp8: the transformer blocks' projections compute in float8 (torchao,
    dynamic per-tensor scales; float8 all-gathers under fsdp), the rest in bf16; needs an NVIDIA
    GPU of compute capability 8.9+ (H100-class) and torchao (`pip install torchao`), under ddp
    or fsdp without tensor or pipeline parallel. MFU is then measured against the bf16 peak."""
    grad_clip: float = 1.0
    """Clip the global gradient norm to this (0 disables)."""
    log_interval: int = 10
    """Write a metrics row every this many steps (and at checkpoints and the end)."""
    eval_interval: int = 100
    """Validate every this many steps (and at the end); 0 = only at the end."""
    compile: bool = False
    """Compile each transformer block with torch.compile (fullgraph, inductor), after tensor
    parallel and activation checkpointing, before FSDP sharding or the DDP wrapper; parameter
    names and checkpoints do not change. The first steps pay the compile time (cached on disk
    for later runs: TORCHINDUCTOR_CACHE_DIR). Where the backend cannot compile (no C++
    compiler on a CPU, no Triton on a GPU) one warning says so and the run continues eagerly.
    ddp, fsdp, tensor and pipeline parallel; not with deepspeed."""
    timing_sync: bool = False
    """Wait for the GPU at each phase boundary of a step, so that the metrics rows' time split
    (`time_data`, `time_fwd_bwd`, `time_optim`, `time_other`, `time_checkpoint`: seconds per
    step) is exact on GPUs, at the cost of the overlap of host and device work. CPUs need no
    wait: their split is always exact."""
    peak_flops: float | None = None
    """Peak FLOP/s of one device for MFU; null = table of known GPUs, else a matmul probe."""
    deterministic: bool = True
    """Ask torch for deterministic algorithms (needed for bitwise resume on GPUs)."""
    on_anomaly: Literal["stop", "skip", "rollback"] = "stop"
    """What a step with an anomaly does: a NaN/Inf loss, NaN/Inf gradients (not under fp16,
    whose loss scaler skips those steps itself) or a loss spike (`spike_factor`). stop: end the
    run without saving (exit 3) naming the last good checkpoint. skip: every rank drops that
    step's update (no optimizer or schedule step); the step, its data, tokens and FLOPs count as
    done; counted in the rows' `skipped_steps`. rollback: reload the last checkpoint, skip the
    data read since it (the offending batch included), scale the learning rate by
    `rollback_lr_factor` and go on; counted in `rollbacks` (needs `checkpoint.interval`). skip
    and rollback check every step (one small all-reduce and host sync per step); stop checks the
    loss at each metrics row, or every step when `spike_factor` is set. Not with deepspeed."""
    spike_factor: float = 0.0
    """A step whose loss (the mean over ranks) exceeds this many times the running mean of the
    previous losses is an anomaly too, e.g. 3; 0 = only NaN/Inf are. The running mean covers
    about the last 10 steps that were applied and is kept in checkpoints."""
    spike_warmup: int = 10
    """Steps averaged before a loss spike can be one (the first losses fall fast)."""
    max_consecutive_skips: int = 10
    """on_anomaly=skip: this many skipped steps in a row end the run as `stop` does (every step
    failing is not a bad batch)."""
    max_skipped_fraction: float = 0.1
    """on_anomaly=skip: a run that ends with more than this share of its steps skipped exits 3
    (it learned from too few steps) instead of 0; the last line says how many were skipped.
    1 = never."""
    max_rollbacks: int = 3
    """on_anomaly=rollback: the most rollbacks of a run (kept across resumes); an anomaly after
    the last one ends the run as `stop` does."""
    rollback_lr_factor: float = 1.0
    """on_anomaly=rollback: multiply the learning rate (the whole schedule) by this at every
    rollback, e.g. 0.5; 1 = unchanged."""

    def __post_init__(self) -> None:
        for name in ("micro_batch_size", "log_interval"):
            if getattr(self, name) < 1:
                raise ConfigurationError(f"`train.{name}` must be >= 1, got {getattr(self, name)}")
        if self.max_steps is not None and self.max_steps < 1:
            raise ConfigurationError(f"`train.max_steps` must be >= 1, got {self.max_steps}")
        if self.eval_interval < 0 or self.grad_clip < 0:
            raise ConfigurationError("`train.eval_interval` and `train.grad_clip` must be >= 0")
        if self.spike_factor != 0 and not (
            self.spike_factor > 1 and math.isfinite(self.spike_factor)
        ):
            raise ConfigurationError(
                f"`train.spike_factor` must be 0 (off) or a number > 1, got {self.spike_factor}"
            )
        for name in ("spike_warmup", "max_consecutive_skips", "max_rollbacks"):
            if getattr(self, name) < 1:
                raise ConfigurationError(f"`train.{name}` must be >= 1, got {getattr(self, name)}")
        if not 0 <= self.max_skipped_fraction <= 1:
            raise ConfigurationError(
                "`train.max_skipped_fraction` must be in [0, 1] (a share of the steps, e.g. 0.1), "
                f"got {self.max_skipped_fraction}"
            )
        if not 0 < self.rollback_lr_factor <= 1:
            raise ConfigurationError(
                f"`train.rollback_lr_factor` must be in (0, 1], got {self.rollback_lr_factor}"
            )


@dataclass
class TrainConfig(LoopConfig):
    """The training loop."""

    max_steps: int | None = None
    """Optimizer steps to run. Exactly one of `max_steps` and `max_tokens`."""
    seq_len: int = 256
    """Tokens per training sample (context length)."""
    global_batch_tokens: int = 16384
    """Tokens per optimizer step across all ranks; sets gradient accumulation steps."""
    max_tokens: int | None = None
    """Training tokens to run (rounded up to whole steps)."""
    eval_samples: int = 256
    """Validation samples (the first windows of the val split, split across ranks). When the
    data mixes sources, the windows are shared among them in proportion to their part of the
    val split (at least one each) and every metrics eval row has `val_loss/<source>` too."""
    extra_val: list[str] = field(default_factory=list)
    """Held-out text files evaluated at every evaluation besides the val split, each reported as
    `val_loss/<file name without extension>` (not part of `val_loss`): tokenized with the data's
    tokenizer at the start, one document per file, up to `eval_samples` windows each."""

    def __post_init__(self) -> None:
        if self.max_steps is not None and self.max_tokens is not None:
            raise ConfigurationError(
                "can't provide both `train.max_steps` and `train.max_tokens`; choose one "
                f"(got max_steps={self.max_steps}, max_tokens={self.max_tokens})"
            )
        for name in ("seq_len", "global_batch_tokens", "eval_samples"):
            if getattr(self, name) < 1:
                raise ConfigurationError(f"`train.{name}` must be >= 1, got {getattr(self, name)}")
        super().__post_init__()
        if self.max_tokens is not None and self.max_tokens < 1:
            raise ConfigurationError(f"`train.max_tokens` must be >= 1, got {self.max_tokens}")

    def total_steps(self) -> int:
        if self.max_steps is not None:
            return self.max_steps
        assert self.max_tokens is not None
        return math.ceil(self.max_tokens / self.global_batch_tokens)


@dataclass
class OptimConfig:
    """AdamW with decay/no-decay groups and a learning-rate schedule."""

    lr: float = 3e-4
    """Peak learning rate."""
    min_lr_ratio: float = 0.1
    """Final learning rate as a fraction of `lr` (cosine and wsd)."""
    weight_decay: float = 0.1
    """Decoupled weight decay on matrices (not on norms, biases or embeddings)."""
    beta1: float = 0.9
    """Adam beta1."""
    beta2: float = 0.95
    """Adam beta2."""
    eps: float = 1e-8
    """Adam epsilon."""
    schedule: Literal["cosine", "wsd", "constant"] = "cosine"
    """cosine: warmup then cosine decay; wsd: warmup-stable-decay (linear decay at the end);
    constant: warmup then flat."""
    warmup_steps: int = 100
    """Linear warmup steps (clipped to the run length)."""
    decay_fraction: float = 0.2
    """wsd only: fraction of the run spent in the final decay."""

    def __post_init__(self) -> None:
        if not (self.lr > 0 and math.isfinite(self.lr)):
            raise ConfigurationError(
                f"`optim.lr` must be > 0, got {self.lr}: give a finite learning rate, e.g. "
                "optim.lr=3e-4"
            )
        if not (self.weight_decay >= 0 and math.isfinite(self.weight_decay)):
            raise ConfigurationError(
                f"`optim.weight_decay` must be a finite number >= 0, got {self.weight_decay}"
            )
        if not (self.eps > 0 and math.isfinite(self.eps)):
            raise ConfigurationError(f"`optim.eps` must be a finite number > 0, got {self.eps}")
        if not 0.0 <= self.min_lr_ratio <= 1.0:
            raise ConfigurationError(
                f"`optim.min_lr_ratio` must be in [0, 1], got {self.min_lr_ratio}"
            )
        if self.warmup_steps < 0:
            raise ConfigurationError(f"`optim.warmup_steps` must be >= 0, got {self.warmup_steps}")
        if not 0.0 < self.decay_fraction <= 1.0:
            raise ConfigurationError(
                f"`optim.decay_fraction` must be in (0, 1], got {self.decay_fraction}"
            )
        for name in ("beta1", "beta2"):
            if not 0.0 <= getattr(self, name) < 1.0:
                raise ConfigurationError(
                    f"`optim.{name}` must be in [0, 1), got {getattr(self, name)}"
                )


@dataclass
class CheckpointConfig:
    """When and how many checkpoints to keep, and whether training waits for their writes."""

    interval: int = 500
    """Save every this many steps (and always at the end); 0 = only at the end."""
    keep_last: int = 3
    """Keep this many most recent checkpoints (older ones are deleted after a good save)."""
    async_save: bool = False
    """Write checkpoints in the background: training stalls only while model and optimizer
    state are copied to host memory (one more copy of this rank's state in RAM while a save is
    in flight). The files, the checks and the atomic rules are the synchronous save's: `latest` moves only once every rank's files are fsynced and
    all ranks agree they were. One save at a time: the next save, a rollback and the end of
    training wait for the one in flight, and its failure (e.g. a full disk) is reported
    there. A checkpoint counts (it is the one a rollback or an error names) once it is
    written. Not with parallel.strategy=deepspeed."""
    consolidated: Literal["final", "every", "never"] = "final"
    """Which checkpoints also hold the full fp32 weights as `model.safetensors` (rank 0 reads
    them back from the sharded state and writes them again: about a quarter of a checkpoint's
    bytes with AdamW): final = only the one saved at the end of training (max_steps reached or
    early stopping; not a stop by signal or preemption), every = all, never = none. Nothing
    needs it: consolidate, export, generate, evaluate, init_from and resume rebuild the weights
    from the sharded state."""

    def __post_init__(self) -> None:
        if self.interval < 0 or self.keep_last < 1:
            raise ConfigurationError(
                f"`checkpoint.interval` must be >= 0 and `checkpoint.keep_last` >= 1 "
                f"(got {self.interval}, {self.keep_last})"
            )


@dataclass
class LoggingConfig:
    """Where metrics go besides metrics.jsonl."""

    tensorboard: bool = True
    """Write TensorBoard event files to `<run>/tb`."""
    wandb: bool = False
    """Log the same scalars to Weights & Biases (rank 0; needs `pip install 'lmforge[wandb]'`).
    A resumed or requeued run continues the same W&B run: its id is kept in `<run>/wandb_id`.
    Files go to `<run>/wandb` unless $WANDB_DIR is set (docs/presets.md)."""
    wandb_project: str = "lmforge"
    """W&B project (with logging.wandb=true)."""
    wandb_entity: str | None = None
    """W&B entity (team or user); null: the account's default."""
    wandb_name: str | None = None
    """W&B run display name; null: the run's `name`."""
    wandb_mode: Literal["online", "offline"] | None = None
    """online (stream to the server) or offline (files only, `wandb sync` later); null: as
    $WANDB_MODE says, else online."""
    progress: bool = True
    """Show a progress bar on rank 0."""
    plot: bool = True
    """Write loss_vs_flops.png at the end."""

    def __post_init__(self) -> None:
        if self.wandb and importlib.util.find_spec("wandb") is None:
            raise ConfigurationError(
                "`logging.wandb=true` needs the wandb extra: pip install 'lmforge[wandb]' "
                "(or set logging.wandb=false)"
            )


@dataclass
class LawConfig:
    """The final loss a scaling law predicts for this run, with its 80% interval: `lmforge plan`
    writes it into the config it plans, `--law FIT.json|SWEEP_DIR` sets it from a sweep's fit.
    All of loss, low and high, or none."""

    loss: float | None = None
    """The predicted final val_loss (null: no law)."""
    low: float | None = None
    """Lower end of its 80% interval."""
    high: float | None = None
    """Upper end of its 80% interval."""
    source: str | None = None
    """Where the law comes from, in words (printed with the forecast)."""

    def __post_init__(self) -> None:
        given = [v is not None for v in (self.loss, self.low, self.high)]
        if any(given) and not all(given):
            raise ConfigurationError(
                "`forecast.law` needs loss, low and high together (got loss="
                f"{self.loss}, low={self.low}, high={self.high}); set all three or none"
            )
        if all(given) and not (0 < self.low <= self.loss <= self.high):  # type: ignore[operator]
            raise ConfigurationError(
                f"`forecast.law`: low <= loss <= high, all positive (got {self.low}, "
                f"{self.loss}, {self.high})"
            )


@dataclass
class ForecastConfig:
    """What the run predicts of itself before its first step (peak memory, step time, wall
    time, final loss), refits while it runs and checks against what it measured at the end:
    `<run>/forecast.json`, one line per run in `<runs_dir>/ledger.jsonl`, `lmforge runs
    --forecasts` (docs/forecasts.md)."""

    enabled: bool = True
    """Forecast, refit and record (false: none of it, no forecast.json, no ledger line)."""
    refit_from: float = 0.2
    """From this fraction of the steps on, the final loss is refitted from the run's own curve
    at every evaluation (every tenth of the run when it does not evaluate periodically)."""
    mfu: float | None = None
    """The MFU assumed for the step time when neither the ledger nor a probe (`--probe`) has
    measured this shape, layout and hardware (null: 0.5 against the matmul peak measured on a
    CPU, 0.4 against a GPU's datasheet peak)."""
    max_overhead: float = 0.01
    """Refits during training may take at most this share of the training time so far; a refit
    due when the share is spent waits for a later evaluation."""
    law: LawConfig = field(default_factory=LawConfig)
    """The final loss a scaling law predicts for this run (`lmforge plan` writes it)."""

    def __post_init__(self) -> None:
        if not 0 < self.refit_from < 1:
            raise ConfigurationError(
                f"`forecast.refit_from`={self.refit_from}: give a fraction of the steps in "
                "(0, 1), e.g. 0.2"
            )
        if self.mfu is not None and not 0 < self.mfu <= 1:
            raise ConfigurationError(
                f"`forecast.mfu`={self.mfu}: give a fraction in (0, 1], e.g. 0.4, or null"
            )
        if not 0 < self.max_overhead <= 1:
            raise ConfigurationError(
                f"`forecast.max_overhead`={self.max_overhead}: give a fraction in (0, 1], e.g. 0.01"
            )


def check_parallel_options(parallel: ParallelConfig) -> None:
    """Refuse options that do not go together, whatever the world size."""
    ds_only = {
        "zero_stage": parallel.zero_stage is not None,
        "offload_optimizer": bool(parallel.offload_optimizer),
        "offload_params": bool(parallel.offload_params),
        "deepspeed_config": parallel.deepspeed_config is not None,
    }
    for key in ("tensor_parallel", "pipeline_parallel"):
        if getattr(parallel, key) < 1:
            raise ConfigurationError(f"`parallel.{key}` must be >= 1, got {getattr(parallel, key)}")
    if parallel.strategy == "deepspeed" and (
        parallel.tensor_parallel > 1 or parallel.pipeline_parallel > 1
    ):
        raise ConfigurationError(
            "`parallel.tensor_parallel`/`pipeline_parallel` > 1 run under strategy ddp or fsdp "
            "(DTensor / torch pipelining), not deepspeed; set parallel.strategy=ddp or fsdp"
        )
    if parallel.pipeline_parallel > 1 and (
        parallel.strategy != "ddp" or parallel.tensor_parallel > 1
    ):
        raise ConfigurationError(
            f"`parallel.pipeline_parallel={parallel.pipeline_parallel}` combines with data "
            f"parallel only (strategy=ddp, tensor_parallel=1); got strategy={parallel.strategy}, "
            f"tensor_parallel={parallel.tensor_parallel}"
        )
    if parallel.strategy != "deepspeed":
        for key, used in ds_only.items():
            if used:
                raise ConfigurationError(
                    f"`parallel.{key}` needs `parallel.strategy=deepspeed` (got "
                    f"strategy={parallel.strategy})"
                )
        return
    if parallel.zero_stage is not None and parallel.zero_stage not in (0, 1, 2, 3):
        raise ConfigurationError(f"`parallel.zero_stage` must be 0-3, got {parallel.zero_stage}")
    if parallel.deepspeed_config is not None and not os.path.isfile(parallel.deepspeed_config):
        raise ConfigurationError(
            f"`parallel.deepspeed_config`: no such file {parallel.deepspeed_config}"
        )
    check_deepspeed_json(parallel)  # its ZeRO section and "auto" values (optim.*: RunConfig)
    zero = zero_choice(parallel)  # the JSON's stage and offload where parallel.* leaves them
    name = os.path.basename(parallel.deepspeed_config or "")
    if zero.offload_optimizer and zero.stage == 0:
        what = "`parallel.offload_optimizer`"
        if zero.offload_optimizer_from == name:
            what = f"{name}'s zero_optimization.offload_optimizer"
        raise ConfigurationError(
            f"{what} needs ZeRO stage >= 1 (got stage 0 from {zero.stage_from}); set "
            "parallel.zero_stage=1, 2 or 3, or parallel.offload_optimizer=false"
        )
    if zero.offload_params and zero.stage != 3:
        what = "`parallel.offload_params`"
        if zero.offload_params_from == name:
            what = f"{name}'s zero_optimization.offload_param"
        raise ConfigurationError(
            f"{what} needs parallel.zero_stage=3 (got stage {zero.stage} from "
            f"{zero.stage_from}); set parallel.zero_stage=3, or parallel.offload_params=false"
        )


@dataclass
class ParallelConfig:
    """How the model is distributed over the ranks (presets in configs/parallel/)."""

    strategy: Literal["ddp", "fsdp", "deepspeed"] = "ddp"
    """ddp: replicas, gradients all-reduced (Accelerate); fsdp: FSDP2 `fully_shard`, parameters,
    gradients and optimizer state sharded over all ranks (per transformer block); deepspeed:
    a DeepSpeed engine with ZeRO stage `zero_stage`."""
    zero_stage: int | None = None
    """deepspeed only: ZeRO stage 0 (DDP-like), 1 (optimizer state sharded), 2 (+ gradients),
    3 (+ parameters). null: the `deepspeed_config` JSON's zero_optimization.stage, else 2. When
    set (in a config file, a preset such as configs/parallel/zero3.yaml, or on the command line)
    it wins over the JSON, and the run's first lines say so."""
    offload_optimizer: bool | None = None
    """deepspeed only (ZeRO >= 1): keep optimizer state (and its step) in CPU memory. null: as
    the JSON's zero_optimization.offload_optimizer says (device cpu), else false; when set it
    wins over the JSON."""
    offload_params: bool | None = None
    """deepspeed only (ZeRO 3): keep parameters in CPU memory between uses. null: as the JSON's
    zero_optimization.offload_param says (device cpu), else false; when set it wins."""
    deepspeed_config: str | None = None
    """deepspeed only: a DeepSpeed JSON to start from (docs/launching.md). Its batch sizes,
    precision and gradient clipping are lmforge's (train.*; a differing value is replaced with a
    warning); "auto" values are filled in from the train and optim sections as transformers
    does; an optimizer or scheduler block must agree with optim.* (lmforge's AdamW and schedule
    run); ZeRO stage and offload come from it unless the keys above are set."""
    activation_checkpointing: bool = False
    """Recompute each transformer block's activations in the backward pass instead of keeping
    them: less memory for about one more forward's compute."""
    tensor_parallel: int = 1
    """Tensor-parallel degree: each block's attention heads and MLP units are split over this many
    ranks (DTensor, Megatron-style, with sequence parallel norms). Must divide the heads and KV
    heads. Combines with ddp (replicas) or fsdp (2-D mesh FSDP x TP)."""
    pipeline_parallel: int = 1
    """Pipeline-parallel degree: the blocks are split into this many consecutive stages; one
    step's gradient-accumulation micro-batches are the pipeline's micro-batches (raise
    train.global_batch_tokens or lower train.micro_batch_size for more, and a smaller bubble).
    Combines with ddp-style data parallel."""
    pipeline_schedule: Literal["1f1b", "gpipe"] = "1f1b"
    """Pipeline schedule: 1f1b (one forward, one backward: activations of at most pp
    micro-batches alive) or gpipe (all forwards, then all backwards)."""
    check_memory: bool = True
    """Before training, estimate each rank's memory (parameters, gradients, optimizer state,
    activations; see pretrain/parallel/memory.py) and refuse a layout that exceeds 90% of the device's,
    suggesting one that fits. false: try anyway."""
    timeout_s: float = 1800.0
    """Seconds a collective waits for every rank before it fails: a rank stuck (or dead) that
    long ends the job instead of hanging it. On gloo the waiting ranks raise and print one line
    naming what waited; NCCL's watchdog aborts them with its own report. Process groups,
    device meshes and DeepSpeed take it alike; raise it for very slow checkpoint saves."""

    def __post_init__(self) -> None:
        if not (self.timeout_s > 0 and math.isfinite(self.timeout_s)):
            raise ConfigurationError(f"`parallel.timeout_s` must be > 0, got {self.timeout_s}")
        check_parallel_options(self)

    @property
    def stage(self) -> int:
        """The ZeRO stage a deepspeed run uses (zero_stage, else the JSON's, else 2)."""
        return self.zero.stage

    @property
    def offloads_optimizer(self) -> bool:
        return self.strategy == "deepspeed" and self.zero.offload_optimizer

    @property
    def offloads_params(self) -> bool:
        return self.strategy == "deepspeed" and self.zero.offload_params

    @property
    def zero(self) -> ZeroChoice:
        """Stage and offloads, and where each came from (pretrain/config/dsconfig.py)."""
        return zero_choice(self)


@dataclass
class RunConfig:
    """What every training command's config has (pretrain, finetune): the run's name and
    directory, its seed, resume, and the model, loop, optimizer, parallel, checkpoint and
    logging sections. The run session (pretrain/run/session.py) reads only these."""

    name: str = MISSING
    """Run name: the run directory is `<runs_dir>/<name>`."""
    runs_dir: str = "runs"
    """Parent directory of run directories."""
    seed: int = 1337
    """Seed of initialisation, data order and dropout."""
    resume: str | None = None
    """null: start a new run (error if the run exists); `auto`: resume from the latest checkpoint
    of the run (or start if none); or a checkpoint directory to resume from."""
    model: ModelConfig = field(default_factory=ModelConfig)
    """Model shape (presets in configs/model/)."""
    train: LoopConfig = field(default_factory=LoopConfig)
    """Training loop."""
    optim: OptimConfig = field(default_factory=OptimConfig)
    """Optimizer and schedule."""
    parallel: ParallelConfig = field(default_factory=ParallelConfig)
    """Parallel strategy (presets in configs/parallel/)."""
    checkpoint: CheckpointConfig = field(default_factory=CheckpointConfig)
    """Checkpointing."""
    logging: LoggingConfig = field(default_factory=LoggingConfig)
    """Metric sinks."""
    forecast: ForecastConfig = field(default_factory=ForecastConfig)
    """The run's forecast of its memory, speed, wall time and final loss (docs/forecasts.md)."""

    def __post_init__(self) -> None:
        if (
            not self.name
            or "/" in self.name
            or self.name in (".", "..")
            or not self.name.isprintable()
        ):
            raise ConfigurationError(
                f"`name`={self.name!r} must be a plain directory name (no '/', no control "
                "characters)"
            )
        if self.train.compile and self.parallel.strategy == "deepspeed":
            raise ConfigurationError(
                "`train.compile=true` is not supported with parallel.strategy=deepspeed; use "
                "train.compile=false, or parallel.strategy=ddp or fsdp"
            )
        policy = self.train.on_anomaly
        if policy != "stop" and self.parallel.strategy == "deepspeed":
            raise ConfigurationError(
                f"`train.on_anomaly={policy}` does not work with parallel.strategy=deepspeed (its "
                "engine steps on its own); use train.on_anomaly=stop, or ddp or fsdp"
            )
        if self.checkpoint.async_save and self.parallel.strategy == "deepspeed":
            raise ConfigurationError(
                "`checkpoint.async_save=true` does not work with parallel.strategy=deepspeed "
                "(its engine writes its checkpoints itself, synchronously); set "
                "checkpoint.async_save=false, or use parallel.strategy=ddp or fsdp"
            )
        if policy == "rollback" and self.checkpoint.interval == 0:
            raise ConfigurationError(
                "`train.on_anomaly=rollback` needs checkpoints to roll back to: set "
                "checkpoint.interval=N (e.g. 100), or use train.on_anomaly=skip"
            )
        # A DeepSpeed JSON's optimizer and scheduler blocks must agree with optim.* (checked
        # here, before any process starts; pretrain/config/dsconfig.py).
        total = self.train.total_steps() if isinstance(self.train, TrainConfig) else None
        check_deepspeed_json(self.parallel, self.optim, total_steps=total or self.train.max_steps)

    @property
    def run_dir(self) -> str:
        return os.path.join(self.runs_dir, self.name)


@dataclass
class PretrainConfig(RunConfig):
    """`lmforge pretrain`: train a GPT-style model on prepared data."""

    train: TrainConfig = field(default_factory=TrainConfig)
    """Training loop."""
    data: DataConfig = field(default_factory=DataConfig)
    """Prepared data."""
    init_from: str | None = None
    """Continue pretraining a model instead of starting from random weights: an lmforge run (its
    latest checkpoint) or checkpoint, a consolidate or export directory, or a Hugging Face model
    directory (Llama 2/3.x, SmolLM2, Mistral, Qwen2/2.5, Qwen3; docs/hub-models.md). The model
    shape comes from it (another model.* than model.dropout is refused), the data must be
    prepared with its tokenizer (`lmforge prepare tokenizer.path=<it>`), and the optimizer and
    learning-rate schedule start fresh (warmup included). null: random weights."""

    def __post_init__(self) -> None:
        if self.train.max_steps is None and self.train.max_tokens is None:
            raise ConfigurationError(
                "set the run length: `train.max_steps=N` or `train.max_tokens=N`"
            )
        super().__post_init__()
        # (with init_from the shape is the source's: checked once it is read)
        if self.init_from is None and self.train.seq_len > self.model.max_seq_len:
            raise ConfigurationError(
                f"`train.seq_len`={self.train.seq_len} exceeds `model.max_seq_len`="
                f"{self.model.max_seq_len}; raise model.max_seq_len or lower train.seq_len"
            )


# --------------------------------------------------------------------------------------------
# loading: files -> presets -> dotted overrides
# --------------------------------------------------------------------------------------------


def _field_names(schema: type, path: list[str]) -> list[str]:
    """Valid keys at a dotted path of a dataclass schema (for 'did you mean'); a list of
    sections (`sources`) stands for its entries' keys."""

    def entries(node):  # a list of dataclass sections -> one entry's keys
        element = node._metadata.element_type if OmegaConf.is_list(node) else None
        return OmegaConf.structured(element) if is_dataclass(element) else None

    node = OmegaConf.structured(schema)
    for part in path:
        node = entries(node) if OmegaConf.is_list(node) else node
        node = node.get(part) if isinstance(node, DictConfig) and part in node else None
    node = entries(node) if OmegaConf.is_list(node) else node
    return list(node.keys()) if isinstance(node, DictConfig) else []


def _short(text: str, limit: int = 80) -> str:
    """``text`` cut to ``limit`` characters (a key or value read from a huge line)."""
    return text if len(text) <= limit else text[: limit - 1] + "…"


def _one_line(
    exc: OmegaConfBaseException, schema: type, arg_key: str | None = None
) -> ConfigurationError:
    """Turn an omegaconf error into one actionable line naming the key (``arg_key``: the key
    of the `key=value` argument being applied, which omegaconf leaves out of errors inside a
    list of sections and of errors about the whole value)."""
    key = getattr(exc, "full_key", None) or arg_key or ""
    if arg_key and key != arg_key and not key.startswith((arg_key + ".", arg_key + "[")):
        top = _field_names(schema, [])
        if re.split(r"[.\[]", key)[0] not in top:  # e.g. `pth` inside sources=[{pth: ...}]
            key = f"{arg_key}.{key}"
    msg = _short(str(exc).splitlines()[0] if str(exc) else type(exc).__name__, 300)
    if isinstance(exc, (ConfigKeyError, ConfigAttributeError)):
        parts = key.split(".") if key else []
        valid = _field_names(schema, parts[:-1]) if parts else []
        leaf = parts[-1] if parts else key
        hint = difflib.get_close_matches(leaf, valid, n=1)
        did = f"; did you mean `{'.'.join(parts[:-1] + [hint[0]])}`?" if hint else ""
        where = ".".join(parts[:-1]) or "the top level"
        return ConfigurationError(
            f"unknown config key `{_short(key)}`{did} (valid keys in {where}: {', '.join(valid)})"
        )
    if isinstance(exc, ValidationError):
        return ConfigurationError(f"config key `{_short(key)}`: {msg}; see `lmforge print-config`")
    return ConfigurationError(f"config error at `{_short(key)}`: {msg}")


def _load_yaml(path: str) -> DictConfig:
    if os.path.isdir(path):
        raise ConfigurationError(f"config file {path} is a directory; give a YAML file")
    if not os.path.isfile(path):
        raise ConfigurationError(f"config file not found: {path}")
    try:
        with open(path, encoding="utf-8") as f:
            raw = yaml.safe_load(f)  # what the file holds at the top (a bare word is a str)
        loaded = OmegaConf.load(path) if isinstance(raw, dict) else OmegaConf.create()
    except Exception as exc:  # yaml.YAMLError, UnicodeDecodeError and friends
        first = _short(str(exc).splitlines()[0] if str(exc) else type(exc).__name__, 200)
        raise ConfigurationError(f"cannot parse YAML {path}: {first}") from exc
    if raw is not None and not isinstance(raw, dict):
        raise ConfigurationError(
            f"{path} must hold a mapping of config keys, not a {type(raw).__name__}"
        )
    return loaded


def _parse_override(arg: str, key: str, value: str) -> DictConfig:
    """``key=value`` as a config (the value is read as YAML), or one line saying why not."""
    try:
        value.encode("utf-8")
    except UnicodeEncodeError:
        raise ConfigurationError(
            f"config key `{_short(key)}`: the value is not valid UTF-8; pass it as UTF-8 text"
        ) from None
    if ("\n" in value or "\r" in value) and not value.lstrip().startswith(("'", '"', "[", "{")):
        # YAML folds a bare line break into a space and reads a line from '#' on as a comment:
        # 'name=a<line break>#SBATCH ...' would silently become name=a
        raise ConfigurationError(
            f"config key `{_short(key)}`: the value {_short(value)!r} has a line break, which "
            "YAML reads as a space (or the rest as a comment); write it on one line, or quote it "
            f"""as a YAML string with \\n for the break, e.g. {_short(key)}='"a\\nb"'"""
        )
    try:
        return OmegaConf.from_dotlist([arg])
    except yaml.YAMLError as exc:
        first = _short(str(exc).splitlines()[0] if str(exc) else type(exc).__name__, 120)
        raise ConfigurationError(
            f"config key `{_short(key)}`: {_short(value)!r} is not a YAML value ({first}); "
            f"quote it as a YAML string, e.g. {_short(key)}='\"...\"' (no control characters)"
        ) from None


def load_config(schema: type, args: list[str]) -> Any:
    """Build a validated config object of dataclass ``schema`` from CLI-style arguments.

    Each argument is applied in order: ``file.yaml`` merges a whole config; ``a.b=preset.yaml``
    merges a YAML file into section ``a.b``; ``a.b=value`` sets one key (value parsed as YAML); a
    mapping (dict) merges as a whole. A file that does not exist here may name a packaged preset,
    by its repository path (``configs/model/tiny.yaml``) or by name (``model=tiny``, and ``demo``
    for a command's whole config): pretrain/config/presets.py.
    """
    cfg = OmegaConf.structured(schema)
    arg_key = None  # the key of the `key=value` being applied, for errors that lose it
    arg_value = None  # and its value as written
    try:
        for arg in args:
            arg_key = arg_value = None
            if isinstance(arg, (dict, DictConfig)):  # a mapping merged as a whole (e.g. a section)
                cfg = OmegaConf.merge(cfg, arg)
                continue
            if "=" not in arg:  # a file, a repository spelling or a preset name (`demo`)
                own = presets.COMMAND_SECTIONS.get(schema.__name__)
                cfg = OmegaConf.merge(cfg, _load_yaml(presets.resolve(arg, own) or arg))
                continue
            key, value = arg.split("=", 1)
            if not key:
                raise ConfigurationError(f"override {arg!r} has no key; write key=value")
            arg_key, arg_value = key, value
            section = OmegaConf.select(cfg, key, throw_on_missing=False)
            if isinstance(section, DictConfig):  # section=PRESET.yaml, section=NAME
                path = presets.resolve(value, key.rsplit(".", 1)[-1], key)
                if path is not None:
                    OmegaConf.update(cfg, key, _load_yaml(path), merge=True)
                    continue
            cfg = OmegaConf.merge(cfg, _parse_override(arg, key, value))
        missing = sorted(OmegaConf.missing_keys(cfg))
        if missing:
            raise ConfigurationError(
                f"required config key `{missing[0]}` is not set; add `{missing[0]}=...` "
                "on the command line or in a config file"
            )
        return OmegaConf.to_object(cfg)
    except OmegaConfBaseException as exc:
        if arg_value is not None and re.search(r"'(DictConfig|ListConfig)' to ", str(exc)):
            # text such as 'Q: {prompt}<line break>A:' is read as YAML: a mapping, not a string
            raise ConfigurationError(
                f"config key `{_short(arg_key or '')}`: {_short(arg_value)!r} reads as a YAML "
                f"mapping or list, not text; quote it as a YAML string, e.g. "
                f"""{_short(arg_key or "")}='"Q: {{prompt}}\\nA:"'"""
            ) from None
        raise _one_line(exc, schema, arg_key) from None


def to_yaml(obj: Any) -> str:
    """Resolved config as YAML (what `print-config` shows and runs store)."""
    return OmegaConf.to_yaml(OmegaConf.structured(obj))


def to_container(obj: Any) -> dict:
    return OmegaConf.to_container(OmegaConf.structured(obj), resolve=True)  # type: ignore[return-value]


def describe_keys(schema: type) -> str:
    """Every key with its type, default and docstring, from the dataclass sources (a field's
    docstring is the one of the most derived class that declares it)."""

    def docs_of(cls: type) -> dict[str, str]:
        out: dict[str, str] = {}
        for base in reversed(cls.__mro__):
            if is_dataclass(base):
                out.update(docs_declared_in(base))
        return out

    def docs_declared_in(cls: type) -> dict[str, str]:
        tree = ast.parse(textwrap.dedent(inspect.getsource(cls)))
        body = tree.body[0].body  # type: ignore[attr-defined]
        out: dict[str, str] = {}
        for a, b in zip(body, body[1:], strict=False):
            if (
                isinstance(a, ast.AnnAssign)
                and isinstance(b, ast.Expr)
                and isinstance(getattr(b, "value", None), ast.Constant)
            ):
                out[a.target.id] = " ".join(str(b.value.value).split())  # type: ignore[union-attr]
        return out

    lines: list[str] = []

    def walk(cls: type, prefix: str) -> None:
        docs = docs_of(cls)
        for f in fields(cls):
            default = f.default_factory() if callable(f.default_factory) else f.default
            if is_dataclass(default):
                lines.append(f"{prefix}{f.name}:  {docs.get(f.name, '')}")
                walk(type(default), prefix + f.name + ".")
                continue
            shown = "???" if default is MISSING else repr(default)
            lines.append(f"{prefix}{f.name} = {shown}  # {docs.get(f.name, '')}")

    walk(schema, "")
    return "\n".join(lines)
