"""`lmforge finetune` config: the base model, the task and its data, and how to adapt.

The run fields and the model, optimizer, parallel, checkpoint and logging sections are every
run's (``RunConfig``, pretrain/config/schema.py) and the loop's common fields ``LoopConfig``'s; only what
differs for a labelled task is new here. The model's shape and tokenizer come from
`init_from`; the run stores them (`model`, `tokenizer`) in its resolved config.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Literal

from omegaconf import MISSING

from lmforge.pretrain.config.schema import (
    LoopConfig,
    ModelConfig,
    OptimConfig,
    RunConfig,
    check_escapechar,
)
from lmforge.pretrain.core.errors import ConfigurationError


@dataclass
class TaskConfig:
    """The downstream task and its labelled data."""

    type: Literal["classification", "sft", "token_classification"] = "classification"
    """classification: one label per text (a head on the last non-padding token);
    sft: prompt -> response (loss on the response tokens only); token_classification: one BIO
    tag per word (NER-style; the label is put on the first sub-word of each word)."""
    train: str = MISSING
    """Training examples: a CSV/TSV/JSONL/Parquet file (`pkg://PACKAGE/path` inside a package
    works too), or a `datasets` name / saved dataset directory (split `train_split`)."""
    val: str | None = None
    """Validation examples (same forms as `train`); null = hold out `val_fraction` of `train`."""
    train_split: str = "train"
    """Split of a `datasets` source for `train`."""
    val_split: str = "validation"
    """Split of a `datasets` source for `val`."""
    dataset_config: str | None = None
    """Configuration name of a `datasets` source."""
    escapechar: str | None = None
    """CSV/TSV files of `train` and `val`: the character that escapes a quote inside a quoted
    field, as in `"He said \\"hi\\""`; null = quotes are doubled (`""`), the CSV standard. In
    YAML: `escapechar: "\\\\"` (a backslash). It makes the next character literal and is itself
    dropped: `\\\\` reads as `\\`, and `\\n` as `n`."""
    val_fraction: float = 0.1
    """When `val` is null: this fraction of `train` (seeded) is held out."""
    text_column: str = "text"
    """classification: the column holding the text."""
    label_column: str = "label"
    """classification: the column holding the label (any strings or integers)."""
    labels: list[str] | None = None
    """classification / token_classification: the label set in head order; null = the sorted
    distinct labels of the training data. Saved with the model (id2label on export)."""
    prompt_column: str = "prompt"
    """sft: the column holding the prompt (instruction)."""
    response_column: str = "response"
    """sft: the column holding the response the model learns to produce."""
    template: str | None = None
    """sft: the text the prompt is put into; `{prompt}` is replaced. The response follows it
    directly and ends with EOS. null: the tokenizer's own chat template when it has one (a Hub
    model's: the prompt is one user message, the response the assistant's turn, as transformers'
    apply_chat_template writes them), else "### Instruction:\n{prompt}\n\n### Response:\n"."""
    packing: bool = False
    """sft: pack several short examples into one sequence of up to `max_len` tokens (fewer
    padding tokens; examples then attend to the earlier ones in their pack)."""
    tokens_column: str = "tokens"
    """token_classification: the column holding the list of words."""
    tags_column: str = "tags"
    """token_classification: the column holding one BIO tag per word (B-X, I-X, O)."""
    train_examples: int | None = None
    """Train on a subset of this many training examples (after `val_fraction` is held out):
    seeded by `subset_seed`, stratified by label for classification (each label keeps its share,
    and at least 2 examples), and nested: for one seed, the subset of 100 lies inside the subset
    of 300. null = all of them. What a label curve (`finetune --label-curve`) varies."""
    subset_seed: int = 0
    """Seed of the `train_examples` subset (not of the weights or the data order: `seed`)."""
    max_len: int = 128
    """Longest example in tokens; longer ones are cut (classification keeps the end of the text,
    where the head reads; sft keeps the prompt's end and the response's start; token
    classification keeps the first words)."""

    def __post_init__(self) -> None:
        check_escapechar(self.escapechar, "task.escapechar")
        if self.max_len < 2:
            raise ConfigurationError(f"`task.max_len` must be >= 2, got {self.max_len}")
        if not 0.0 < self.val_fraction < 0.5:
            raise ConfigurationError(
                f"`task.val_fraction` must be in (0, 0.5), got {self.val_fraction}"
            )
        if self.type == "sft" and self.template is not None and "{prompt}" not in self.template:
            raise ConfigurationError(
                f"`task.template` must contain {{prompt}}, got {self.template!r}"
            )
        if self.train_examples is not None and self.train_examples < 1:
            raise ConfigurationError(
                f"`task.train_examples` must be >= 1 (or null for all), got {self.train_examples}"
            )
        if self.labels is not None and len(set(self.labels)) != len(self.labels):
            raise ConfigurationError(f"`task.labels` has duplicates: {self.labels}")
        if self.labels is not None and any(not str(x).strip() for x in self.labels):
            raise ConfigurationError(
                f"`task.labels` has an empty label: {self.labels}; remove it (rows without a "
                "label are refused: drop them from the data)"
            )


@dataclass
class FinetuneTrainConfig(LoopConfig):
    """The finetuning loop (batches count examples, not tokens)."""

    micro_batch_size: int = 16
    """Examples per forward/backward on each rank."""
    max_steps: int | None = None
    """Optimizer steps. At most one of `max_steps` and `epochs`; neither = 1 epoch."""
    eval_interval: int = 50
    """Validate (loss and task metrics) every this many steps, and at the end; 0 = at the end."""
    global_batch_size: int = 32
    """Examples per optimizer step across all ranks; sets gradient accumulation."""
    epochs: float | None = None
    """Passes over the training examples (rounded up to whole steps)."""
    eval_samples: int | None = None
    """Validation examples to use (the first ones); null = all."""
    samples: int = 3
    """sft: generations from the first validation prompts written to the log at each
    evaluation (greedy)."""
    sample_tokens: int = 48
    """sft: new tokens per logged generation."""

    def __post_init__(self) -> None:
        if self.max_steps is not None and self.epochs is not None:
            raise ConfigurationError(
                "set one of `train.max_steps` and `train.epochs`, not both "
                f"(got max_steps={self.max_steps}, epochs={self.epochs}); clear the other with "
                "train.epochs=null or train.max_steps=null"
            )
        if self.global_batch_size < 1:
            raise ConfigurationError(
                f"`train.global_batch_size` must be >= 1, got {self.global_batch_size}"
            )
        super().__post_init__()
        if self.epochs is not None and not self.epochs > 0:
            raise ConfigurationError(f"`train.epochs` must be > 0, got {self.epochs}")
        if self.eval_samples is not None and self.eval_samples < 1:
            raise ConfigurationError(f"`train.eval_samples` must be >= 1, got {self.eval_samples}")


@dataclass
class LoraConfig:
    """Low-rank adapters (through `peft`) instead of training the full weights."""

    enabled: bool = False
    """Train LoRA adapters on `target_modules`; everything else is frozen except the task head.
    Exports merge the adapters into the weights."""
    r: int = 8
    """Adapter rank."""
    alpha: float = 16.0
    """Scaling numerator: the update is (alpha / r) * B @ A."""
    dropout: float = 0.0
    """Dropout on the adapter's input."""
    target_modules: list[str] = field(
        default_factory=lambda: ["wq", "wk", "wv", "wo", "w1", "w2", "w3"]
    )
    """Linear layers (by attribute name in pretrain/model/transformer.py) that get adapters."""

    def __post_init__(self) -> None:
        if self.r < 1 or not self.alpha > 0 or not 0.0 <= self.dropout < 1.0:
            raise ConfigurationError(
                f"`lora.r` must be >= 1, `lora.alpha` > 0 and `lora.dropout` in [0, 1) "
                f"(got {self.r}, {self.alpha}, {self.dropout})"
            )


@dataclass
class EarlyStoppingConfig:
    """Stop when the validation metric stops improving."""

    patience: int = 0
    """Stop after this many evaluations without improvement; 0 = never stop early."""
    metric: str | None = None
    """The eval row's key to watch; null = macro_f1 (classification), f1 (token
    classification), val_loss (sft)."""
    mode: Literal["auto", "max", "min"] = "auto"
    """auto: min for *loss*/*ppl* metrics, max otherwise."""
    min_delta: float = 0.0
    """An improvement smaller than this does not count."""
    keep_best: bool = False
    """Checkpoint at each evaluation that improves `metric` and keep the best one
    (checkpoints/best, never pruned): export, evaluate, generate, consolidate and init_from of
    the run directory then use it instead of the latest (like transformers'
    load_best_model_at_end). Works with patience 0 too (no early stop)."""

    def __post_init__(self) -> None:
        if self.patience < 0 or self.min_delta < 0:
            raise ConfigurationError(
                "`early_stopping.patience` and `early_stopping.min_delta` must be >= 0"
            )


@dataclass
class LabelCurveConfig:
    """`lmforge finetune CONFIG --label-curve`: this config's run at several numbers of labelled
    examples, from its base and from a second start (docs/label-curves.md). Fixed before any
    run; a plain `lmforge finetune` ignores it."""

    sizes: list[Any] = field(default_factory=lambda: [100, 300, 1000, "all"])
    """Training examples per point, ascending (`all`: every one): stratified, seeded and nested
    subsets (`task.train_examples`, `task.subset_seed`)."""
    steps: list[int] | None = None
    """Optimizer steps at each size, the same for both arms; null = `train.max_steps`, else
    `train.epochs` over each subset."""
    lrs: list[float] | None = None
    """The learning rates each arm is trained with at each size; each arm keeps the one with the
    best validation accuracy (then macro-F1, then the first). null = [optim.lr]."""
    against: str = "scratch"
    """The second arm: `scratch` (init_from's shape and tokenizer from random weights), or
    another base model (a run, checkpoint, export or Hub directory), compared with init_from."""
    test: str | None = None
    """The labelled file the picked models are compared on, example by example (the test split:
    never used to pick); null = the validation split (then the same examples picked the learning
    rate, which the report says)."""
    out: str | None = None
    """The curve's directory (every point's run, the report and the figure); null =
    `<runs_dir>/<name>-curve`."""

    def __post_init__(self) -> None:
        sizes = self.sizes
        if not sizes:
            raise ConfigurationError("`label_curve.sizes` is empty; give e.g. [100, 300, all]")
        bad = [s for s in sizes if s != "all" and not (str(s).isdigit() and int(s) >= 1)]
        if bad:
            raise ConfigurationError(
                f"`label_curve.sizes` has {bad[0]!r}: give positive numbers of examples, or all"
            )
        numbers = [int(s) for s in sizes if s != "all"]
        if numbers != sorted(set(numbers)) or "all" in sizes[:-1]:
            raise ConfigurationError(
                f"`label_curve.sizes`={list(sizes)} must rise without repeats (all last)"
            )
        self.sizes = [s if s == "all" else int(s) for s in sizes]
        if self.steps is not None and (
            len(self.steps) != len(sizes) or any(s < 1 for s in self.steps)
        ):
            raise ConfigurationError(
                f"`label_curve.steps`={list(self.steps)}: give one step count >= 1 per size "
                f"({len(sizes)}: {', '.join(map(str, sizes))}), or null"
            )
        if self.lrs is not None and (not self.lrs or any(not lr > 0 for lr in self.lrs)):
            raise ConfigurationError(
                f"`label_curve.lrs`={self.lrs}: give at least one learning rate > 0, or null for "
                "optim.lr"
            )


@dataclass
class FinetuneConfig(RunConfig):
    """`lmforge finetune`: adapt a pretrained model to a labelled task."""

    seed: int = 1337
    """Seed of the new weights (head, adapters), the data order and dropout."""
    resume: str | None = None
    """null: new run; `auto`: resume from the run's latest checkpoint; or a checkpoint dir."""
    model: ModelConfig = field(default_factory=ModelConfig)
    """Model shape: comes from init_from (only `model.dropout` may be set then)."""
    train: FinetuneTrainConfig = field(default_factory=FinetuneTrainConfig)
    """Training loop."""
    optim: OptimConfig = field(
        default_factory=lambda: OptimConfig(lr=1e-4, warmup_steps=20, weight_decay=0.01)
    )
    """Optimizer and schedule."""
    init_from: str | None = None
    """The base model: an lmforge run (its latest checkpoint, or its best one), a checkpoint
    directory, a `consolidate`/`export` output, or a Hugging Face Llama directory with a
    SentencePiece tokenizer.model. null = a new model of shape `model` with tokenizer `tokenizer`."""
    from_scratch: bool = False
    """Take init_from's shape and tokenizer but re-initialise every weight: the baseline that
    shows what pretraining buys at the same finetuning budget."""
    tokenizer: str | None = None
    """SentencePiece .model; null = init_from's. Given with init_from, it must be the same file
    (sha256)."""
    task: TaskConfig = field(default_factory=TaskConfig)
    """The task and its data."""
    freeze: Literal["none", "trunk"] = "none"
    """trunk: train only the task head (embeddings and blocks frozen: a linear probe)."""
    lora: LoraConfig = field(default_factory=LoraConfig)
    """LoRA adapters."""
    class_weights: str = "none"
    """classification / token_classification: none; balanced (n / (k * count) per label, as
    scikit-learn); or comma-separated weights in label order, e.g. "1.0,3.0"."""
    early_stopping: EarlyStoppingConfig = field(default_factory=EarlyStoppingConfig)
    """Early stopping on a validation metric."""
    label_curve: LabelCurveConfig = field(default_factory=LabelCurveConfig)
    """The experiment of `lmforge finetune --label-curve` (ignored by a plain run)."""

    def __post_init__(self) -> None:
        super().__post_init__()
        if self.init_from is None and self.tokenizer is None:
            raise ConfigurationError(
                "set `init_from=runs/<pretrained run>` (or a checkpoint / export directory), or "
                "both `tokenizer=<.model>` and a `model` shape to start from new weights"
            )
        if self.from_scratch and self.init_from is None:
            raise ConfigurationError("`from_scratch=true` needs `init_from` (for its shape)")
        if self.lora.enabled and self.freeze != "none":
            raise ConfigurationError(
                "`lora.enabled` already freezes the base weights; leave `freeze=none`"
            )
        if self.lora.enabled and (
            self.parallel.tensor_parallel > 1 or self.parallel.pipeline_parallel > 1
        ):
            raise ConfigurationError(
                "LoRA runs under data parallel strategies (ddp, fsdp, deepspeed); set "
                "parallel.tensor_parallel=1 and parallel.pipeline_parallel=1"
            )
        if self.class_weights != "none" and self.task.type == "sft":
            raise ConfigurationError("`class_weights` applies to classification tasks, not sft")
        if self.class_weights not in ("none", "balanced"):
            try:
                weights = [float(w) for w in self.class_weights.split(",")]
            except ValueError:
                weights = []
            if not weights or any(not w > 0 for w in weights):
                raise ConfigurationError(
                    f"`class_weights`={self.class_weights!r}: use none, balanced, or positive "
                    "comma-separated weights in label order"
                )
