"""`lmforge scaling sweep` config: budgets, the sizes at each budget, the width/depth rule, the
pretraining config every run starts from, where the runs execute, and how they are fitted.

See configs/scaling/demo.yaml for a commented example and `lmforge print-config --for scaling
--keys` for every key.
"""

from __future__ import annotations

import math
import os
from dataclasses import dataclass, field
from typing import Any, Literal

from omegaconf import MISSING

from lmforge.pretrain.core.errors import ConfigurationError

# Keys of the pretrain config that the sweep sets for each point: a value given in `pretrain`
# would be silently replaced, so it is refused.
SET_PER_POINT = (
    "name",
    "runs_dir",
    "resume",
    "model.n_layer",
    "model.d_model",
    "model.n_head",
    "model.n_kv_head",
    "model.ffn_hidden",
    "train.max_steps",
    "train.max_tokens",
    "optim.warmup_steps",
)


@dataclass
class ShapeConfig:
    """The width/depth rule: how a target parameter count N becomes a model shape.

    Depth from the aspect ratio, width solved for N: n_layer = round((N / (12·r²))^(1/3)) (a
    block holds about 12·d_model² parameters and d_model ≈ r·n_layer), clipped to
    [min_layers, max_layers]; then d_model is the multiple of head_dim whose parameter count
    (the sweep's `fit.params` count, LM head included) is nearest N in log space. n_head =
    d_model / head_dim; the feed-forward width follows the model's default rule (8/3·d_model,
    rounded up to model.multiple_of)."""

    aspect_ratio: float = 32.0
    """Target d_model / n_layer (Kaplan et al. 2020 find loss flat across 20-200)."""
    head_dim: int = 32
    """Attention head width; d_model is a multiple of it."""
    min_layers: int = 1
    """Fewest layers."""
    max_layers: int = 64
    """Most layers."""

    def __post_init__(self) -> None:
        if not self.aspect_ratio > 0:
            raise ConfigurationError(f"`shape.aspect_ratio` must be > 0, got {self.aspect_ratio}")
        if self.head_dim < 1 or self.head_dim % 2:
            raise ConfigurationError(
                f"`shape.head_dim` must be a positive even number (rotary), got {self.head_dim}"
            )
        if not 1 <= self.min_layers <= self.max_layers:
            raise ConfigurationError(
                f"need 1 <= shape.min_layers <= shape.max_layers, got {self.min_layers} and "
                f"{self.max_layers}"
            )


@dataclass
class SizesConfig:
    """The model sizes trained at each budget (an IsoFLOP profile)."""

    count: int = 5
    """Sizes per budget (>= 3 for a parabola; odd counts centre one size on the guess)."""
    spacing: float = 2.0
    """Ratio between neighbouring sizes of a budget."""
    tokens_per_param: float = 20.0
    """Where each budget's sizes are centred: the N whose run has D = tokens_per_param·N
    tokens (Hoffmann et al.'s ~20)."""
    explicit: list[float] = field(default_factory=list)
    """Instead of count/spacing/tokens_per_param: these target sizes at every budget."""

    def __post_init__(self) -> None:
        if self.count < 1 or not self.spacing > 1 or not self.tokens_per_param > 0:
            raise ConfigurationError(
                "need sizes.count >= 1, sizes.spacing > 1 and sizes.tokens_per_param > 0; got "
                f"{self.count}, {self.spacing}, {self.tokens_per_param}"
            )
        bad = [n for n in self.explicit if not (math.isfinite(n) and n >= 1)]
        if bad:
            raise ConfigurationError(f"`sizes.explicit` must hold sizes >= 1, got {bad[0]}")


@dataclass
class SweepFitConfig:
    """What `lmforge scaling fit` (and the sweep when it finishes) fits and predicts."""

    params: Literal["non_embedding", "total"] = "non_embedding"
    """N of the fits: non_embedding = every parameter but the input embedding table (the LM head
    counts: the N of C = 6·N·D); total = every parameter."""
    holdout: list[float] = field(default_factory=list)
    """Budgets (nominal FLOPs) left out of every fit and predicted instead: the check."""
    target_flops: list[float] = field(default_factory=list)
    """More budgets to predict the compute-optimal N*, D* and loss for."""
    exclude_highest: int = 0
    """Leave the k highest-loss points out of the L(N, D) fit (listed in the report)."""
    bootstrap: int = 200
    """Bootstrap resamples for the confidence intervals (0 = none)."""
    level: float = 0.95
    """Confidence level of the intervals."""
    huber_delta: float = 1e-3
    """Huber loss delta on log-loss residuals (Hoffmann et al.)."""
    seed: int = 0
    """Bootstrap seed."""
    minima: Literal["profile", "parabola"] = "profile"
    """Each budget's loss-optimal N and loss, which the frontier and the IsoFLOP allocation are
    fitted through: profile = the minimum of c0 + c1·N^-α + c2·D^-β fitted to the budget's
    runs, α and β from L(N, D) (unbiased on a coarse or off-centre grid); parabola = the
    minimum of a parabola in ln N (Hoffmann et al.'s approach 2). The report lists both."""
    budget_tolerance: float = 0.2
    """Points without nominal budgets (run directories, a CSV) form a budget when at least 3 of
    them have C within a factor 1 + budget_tolerance of each other and at least twice as many
    as the same width of C just below and just above; the rest join no budget (L(N, D) only).
    A held-out budget claims the budget found within that factor of it."""

    def __post_init__(self) -> None:
        if not 0 <= self.budget_tolerance < 1:
            raise ConfigurationError(
                f"`fit.budget_tolerance` (--budget-tolerance) must be in [0, 1), got "
                f"{self.budget_tolerance:g} (e.g. 0.2: C within a factor 1.2 of each other)"
            )
        if self.exclude_highest < 0 or self.bootstrap < 0:
            raise ConfigurationError("`fit.exclude_highest` and `fit.bootstrap` must be >= 0")
        if not 0 < self.level < 1:
            raise ConfigurationError(f"`fit.level` must be in (0, 1), got {self.level}")
        if not self.huber_delta > 0:
            raise ConfigurationError(f"`fit.huber_delta` must be > 0, got {self.huber_delta}")
        for key in ("holdout", "target_flops"):
            bad = [c for c in getattr(self, key) if not (math.isfinite(c) and c > 0)]
            if bad:
                raise ConfigurationError(f"`fit.{key}` must hold FLOPs > 0, got {bad[0]}")


@dataclass
class TransferConfig:
    """Downstream transfer of a finished sweep (scaling/transfer.py): each budget's best run
    finetuned on a task with a fixed small label budget, from its weights and from random ones."""

    finetune: str | None = None
    """A finetune config (a classification task with `label_curve.test`, e.g.
    configs/finetune/demo.yaml); null = no transfer step."""
    overrides: list[str] = field(default_factory=list)
    """Dotted keys applied to it (e.g. train.micro_batch_size=32)."""
    train_examples: int = 300
    """Labelled training examples (a stratified, seeded subset: the same for every budget)."""
    steps: int = 80
    """Optimizer steps of each finetuning (the same for every budget and both arms)."""
    lrs: list[float] | None = None
    """The rate grid each finetuning picks from on validation; null = the finetune config's
    label_curve.lrs."""

    def __post_init__(self) -> None:
        if self.train_examples < 1 or self.steps < 1:
            raise ConfigurationError(
                f"`transfer.train_examples` and `transfer.steps` must be >= 1, got "
                f"{self.train_examples}, {self.steps}"
            )


@dataclass
class ScalingConfig:
    """`lmforge scaling sweep`: an IsoFLOP grid of ordinary pretraining runs."""

    name: str = MISSING
    """Sweep name: its directory is `<runs_dir>/<name>`, each run a directory inside it."""
    runs_dir: str = "runs"
    """Parent of the sweep directory."""
    pretrain: dict[str, Any] = field(default_factory=dict)
    """The pretrain config of every run (keys of `lmforge print-config --for pretrain`), less the
    model shape, run length, warmup, name and runs_dir, which the sweep sets per point."""
    budgets: list[float] = MISSING
    """Compute budgets C in training FLOPs (6·N + attention per token, pretrain/model/flops.py)."""
    sizes: SizesConfig = field(default_factory=SizesConfig)
    """Model sizes per budget."""
    shape: ShapeConfig = field(default_factory=ShapeConfig)
    """Width/depth rule."""
    lr_width_exponent: float = 0.0
    """Each point's peak learning rate: pretrain.optim.lr · (lr_reference_width / d_model)^this.
    1.0 is the μP-style rule for Adam (the best rate falls as 1/width); 0 = one rate for all."""
    lr_reference_width: int = 64
    """The width at which a point gets pretrain.optim.lr itself."""
    warmup_fraction: float = 0.05
    """Warmup steps as a fraction of each run's steps (the schedule's length is the run's)."""
    min_steps: int = 20
    """Points with fewer optimizer steps are left out of the grid (listed by --dry-run)."""
    max_epochs: float = 4.0
    """Points that would read the training data more often than this are left out; below it,
    the plan and the report show each run's passes over the data."""
    launcher: Literal["local", "slurm"] = "local"
    """local: one run after another on this machine; slurm: one job array of the missing runs."""
    nproc: int = 1
    """Processes per run (local launcher; under SLURM the profile decides)."""
    parallel: int = 1
    """Runs at once (local launcher); the CPUs are shared out between their processes
    (OMP_NUM_THREADS, unless set). Tiny models train fastest on one thread each."""
    slurm: list[str] = field(default_factory=list)
    """SLURM profile arguments (a profile file and key=value overrides, as `lmforge submit`)."""
    slurm_parallel: int = 0
    """Most array tasks running at once under SLURM (0 = no limit)."""
    early_stop: float = 0.0
    """Local launcher: judge each run at this fraction of its steps (e.g. 0.3) and stop it when
    its predicted final loss cannot be its budget's minimum (the low end of its interval above
    the high end of a sibling's; `lmforge runs --predict`); 0 = never. The report lists the
    stopped runs and the compute saved; `lmforge scaling fit SWEEP --simulate-early-stop 0.3`
    replays the rule on a finished sweep first."""
    fit: SweepFitConfig = field(default_factory=SweepFitConfig)
    """Fits and predictions."""
    transfer: TransferConfig = field(default_factory=TransferConfig)
    """After the fit: each budget's best run finetuned on a task (accuracy against compute)."""

    def __post_init__(self) -> None:
        if not self.name or "/" in self.name or self.name in (".", ".."):
            raise ConfigurationError(f"`name`={self.name!r} must be a plain directory name")
        if not self.budgets:
            raise ConfigurationError("`budgets` is empty; list compute budgets in FLOPs")
        bad = [c for c in self.budgets if not (math.isfinite(c) and c > 0)]
        if bad:
            raise ConfigurationError(f"`budgets` must hold FLOPs > 0, got {bad[0]:g}")
        if len(set(self.budgets)) != len(self.budgets):
            raise ConfigurationError(f"`budgets` lists a budget twice: {self.budgets}")
        unknown = [c for c in self.fit.holdout if c not in self.budgets]
        if unknown:
            raise ConfigurationError(
                f"`fit.holdout` budget {unknown[0]:g} is not in `budgets`; list it there too"
            )
        if not 0 <= self.early_stop < 1:
            raise ConfigurationError(
                f"`early_stop` must be in [0, 1) (a fraction of each run, 0 = off), got "
                f"{self.early_stop}"
            )
        if self.early_stop and self.launcher != "local":
            raise ConfigurationError(
                f"`early_stop={self.early_stop:g}` judges runs as they train here: use it with "
                "launcher=local, or set early_stop=0 for launcher=slurm"
            )
        if not 0 <= self.warmup_fraction < 1:
            raise ConfigurationError(
                f"`warmup_fraction` must be in [0, 1), got {self.warmup_fraction}"
            )
        if self.lr_reference_width < 1:
            raise ConfigurationError(
                f"`lr_reference_width` must be >= 1, got {self.lr_reference_width}"
            )
        if self.min_steps < 1 or not self.max_epochs > 0 or self.nproc < 1 or self.parallel < 1:
            raise ConfigurationError(
                "need min_steps >= 1, max_epochs > 0, nproc >= 1 and parallel >= 1; got "
                f"{self.min_steps}, {self.max_epochs}, {self.nproc}, {self.parallel}"
            )
        for key in SET_PER_POINT:
            node: Any = self.pretrain
            for part in key.split("."):
                node = node.get(part) if isinstance(node, dict) else None
            if node is not None:
                raise ConfigurationError(
                    f"`pretrain.{key}` is set by the sweep for each point; remove it"
                )

    @property
    def sweep_dir(self) -> str:
        return os.path.join(self.runs_dir, self.name)
