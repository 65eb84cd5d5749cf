"""The IsoFLOP grid of a sweep: for each budget C, model sizes N (shapes by the width/depth rule
of `ShapeConfig`), tokens D = C / FLOPs-per-token, and one ordinary pretrain config per point.

Nothing here trains or writes; `scaling/sweep.py` does, from the `SweepGrid` this returns.
"""

from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass, field

from lmforge.pretrain.config.schema import ModelConfig, PretrainConfig, load_config, to_yaml
from lmforge.pretrain.core.errors import ConfigurationError
from lmforge.pretrain.model.flops import flops_per_token, param_counts
from lmforge.scaling.config import ScalingConfig, ShapeConfig


def format_flops(c: float) -> str:
    """1e11 -> '1e11', 1.6e12 -> '1.6e12' (run names and tables)."""
    mantissa, exponent = f"{c:.3g}".split("e") if "e" in f"{c:.3g}" else (f"{c:.3g}", "0")
    return f"{mantissa}e{int(exponent)}"


def format_count(n: float) -> str:
    """51234 -> '51.2k', 2.1e6 -> '2.1M'."""
    for scale, suffix in ((1e9, "B"), (1e6, "M"), (1e3, "k")):
        if n >= scale:
            return f"{n / scale:.3g}{suffix}"
    return f"{n:.3g}"


def fit_params(model: ModelConfig, which: str) -> int:
    """The N of the fits (`fit.params`): non_embedding (the N of C = 6·N·D: the LM head counts,
    the input table does not) or total."""
    return param_counts(model)[which]


def shape_for(target: float, *, base: ModelConfig, rule: ShapeConfig, count: str) -> ModelConfig:
    """The model of about ``target`` parameters (``count`` as in `fit_params`) by the rule of
    `ShapeConfig`: depth from the aspect ratio, then the width nearest the target."""
    n_layer = round((target / (12 * rule.aspect_ratio**2)) ** (1 / 3))
    n_layer = min(max(n_layer, rule.min_layers), rule.max_layers)
    best, best_gap = None, math.inf
    heads = 1
    while True:
        d_model = heads * rule.head_dim
        model = dataclasses.replace(
            base, n_layer=n_layer, d_model=d_model, n_head=heads, n_kv_head=None, ffn_hidden=None
        )
        gap = abs(math.log(fit_params(model, count) / target))
        if gap < best_gap:
            best, best_gap = model, gap
        elif fit_params(model, count) > target:  # past the target and getting worse
            break
        heads += 1
    assert best is not None
    return best


@dataclass
class Point:
    """One run of the grid."""

    index: int
    name: str
    budget: float  # nominal C
    target_params: float  # the size asked for
    n_layer: int
    d_model: int
    n_head: int
    params: int  # N of the fits (fit.params)
    params_total: int
    params_non_embedding: int
    flops_per_token: int
    steps: int
    tokens: int  # D
    flops: float  # actual C = steps · batch tokens · FLOPs per token
    epochs: float  # passes over the training data
    lr: float  # peak learning rate
    holdout: bool
    config: str = field(repr=False)  # the run's pretrain config, YAML

    def row(self) -> dict:
        return {k: v for k, v in dataclasses.asdict(self).items() if k != "config"}


@dataclass
class SweepGrid:
    points: list[Point]
    skipped: list[str]  # why each left-out (budget, size) was left out
    train_tokens: int
    batch_tokens: int


def _sizes(cfg: ScalingConfig, budget: float, fpt_guess) -> list[float]:
    """Target sizes at one budget: the explicit list, or `count` sizes `spacing` apart centred
    on the N whose run has D = tokens_per_param·N."""
    s = cfg.sizes
    if s.explicit:
        return list(s.explicit)
    # centre: the N with D/N = r, D = C / fpt(N), i.e. N · fpt(N) = C / r (increasing in N):
    # bisection in log N
    lo, hi = 0.0, math.log(budget)
    for _ in range(60):
        mid = (lo + hi) / 2
        n = math.exp(mid)
        lo, hi = (mid, hi) if n * fpt_guess(n) < budget / s.tokens_per_param else (lo, mid)
    centre = math.exp((lo + hi) / 2)
    half = (s.count - 1) / 2
    return [centre * s.spacing ** (i - half) for i in range(s.count)]


def make_grid(cfg: ScalingConfig) -> SweepGrid:
    """Every point of the sweep, each with its validated pretrain config."""
    from lmforge.pretrain.data.prepare import load_manifest

    base = load_config(
        PretrainConfig, [cfg.pretrain, {"name": cfg.name, "train": {"max_steps": 1}}]
    )
    manifest = load_manifest(base.data.path)
    vocab = manifest["tokenizer"]["vocab_size"]
    if base.model.vocab_size not in (None, vocab):
        raise ConfigurationError(
            f"pretrain.model.vocab_size={base.model.vocab_size} but {base.data.path} has a "
            f"{vocab}-piece tokenizer; remove model.vocab_size"
        )
    model = dataclasses.replace(base.model, vocab_size=vocab)
    seq, batch = base.train.seq_len, base.train.global_batch_tokens
    train_tokens = manifest["splits"]["train"]["tokens"]
    usable = (train_tokens // seq) * seq  # what the sample stream reads in one pass
    count = cfg.fit.params

    def fpt_of(n: float) -> float:  # FLOPs/token of the model the rule gives for size n
        shaped = shape_for(n, base=model, rule=cfg.shape, count=count)
        return flops_per_token(shaped, seq) * n / fit_params(shaped, count)

    points: list[Point] = []
    skipped: list[str] = []
    for budget in sorted(cfg.budgets):
        seen = set()
        for target in _sizes(cfg, budget, fpt_of):
            shaped = shape_for(target, base=model, rule=cfg.shape, count=count)
            key = (shaped.n_layer, shaped.d_model)
            label = f"C={format_flops(budget)} N≈{format_count(target)} (L{key[0]} d{key[1]})"
            if key in seen:
                skipped.append(f"{label}: same shape as a smaller size of this budget")
                continue
            seen.add(key)
            fpt = flops_per_token(shaped, seq)
            steps = round(budget / (fpt * batch))
            if steps < cfg.min_steps:
                skipped.append(f"{label}: {steps} steps < min_steps={cfg.min_steps}")
                continue
            tokens = steps * batch
            epochs = tokens / usable
            if epochs > cfg.max_epochs:
                skipped.append(
                    f"{label}: {epochs:.1f} passes over the data > max_epochs={cfg.max_epochs:g}"
                )
                continue
            name = f"c{format_flops(budget)}-L{shaped.n_layer}-d{shaped.d_model}"
            run = load_config(
                PretrainConfig,
                [
                    cfg.pretrain,
                    {
                        "name": name,
                        "runs_dir": cfg.sweep_dir,
                        "model": {
                            "n_layer": shaped.n_layer,
                            "d_model": shaped.d_model,
                            "n_head": shaped.n_head,
                        },
                        "train": {"max_steps": steps},
                        "optim": {
                            "warmup_steps": round(cfg.warmup_fraction * steps),
                            "lr": base.optim.lr
                            * (cfg.lr_reference_width / shaped.d_model) ** cfg.lr_width_exponent,
                        },
                    },
                ],
            )
            counts = param_counts(shaped)
            points.append(
                Point(
                    index=len(points),
                    name=name,
                    budget=budget,
                    target_params=target,
                    n_layer=shaped.n_layer,
                    d_model=shaped.d_model,
                    n_head=shaped.n_head,
                    params=counts[count],
                    params_total=counts["total"],
                    params_non_embedding=counts["non_embedding"],
                    flops_per_token=fpt,
                    steps=steps,
                    tokens=tokens,
                    flops=float(tokens * fpt),
                    epochs=epochs,
                    lr=run.optim.lr,
                    holdout=budget in cfg.fit.holdout,
                    config=to_yaml(run),
                )
            )
    if not points:
        raise ConfigurationError(
            "every point of the sweep was left out: " + (skipped[0] if skipped else "no sizes")
        )
    return SweepGrid(points=points, skipped=skipped, train_tokens=usable, batch_tokens=batch)


def describe_grid(plan: SweepGrid, status: dict[str, str] | None = None) -> str:
    """The grid as a table (what --dry-run prints)."""
    status = status or {}
    head = (
        f"{'#':>3} {'run':<22} {'budget':>7} {'L':>3} {'d':>5} {'N':>8} {'steps':>6} "
        f"{'D tokens':>9} {'D/N':>6} {'epochs':>6} {'lr':>8} {'FLOPs':>9}  status"
    )
    lines = [head]
    for p in plan.points:
        lines.append(
            f"{p.index:>3} {p.name:<22} {format_flops(p.budget):>7} {p.n_layer:>3} "
            f"{p.d_model:>5} {format_count(p.params):>8} {p.steps:>6} {format_count(p.tokens):>9} "
            f"{p.tokens / p.params:>6.1f} {p.epochs:>6.2f} {p.lr:>8.2e} {p.flops:>9.3g}  "
            + status.get(p.name, "")
            + (" (held out)" if p.holdout else "")
        )
    total = sum(p.flops for p in plan.points)
    lines.append(
        f"{len(plan.points)} runs, {total:.3g} FLOPs in all; {format_count(plan.train_tokens)} "
        f"training tokens, {format_count(plan.batch_tokens)} tokens per step"
    )
    lines += [f"left out: {s}" for s in plan.skipped]
    return "\n".join(lines)
