"""`lmforge plan`: from a compute budget to a ready pretraining run.

Given a budget (FLOPs, or GPUs × hours × MFU), the prepared data and a scaling law (a sweep's fit
or published constants), the plan gives the compute-optimal N* and D* with intervals, a model
shape by the sweep's width/depth rule, the batch size and learning rate by a stated rule, the
data-repetition cost when D* exceeds the data, the parallel layout that fits the device by the
memory estimate (with ``probe``: the fastest of those measured by a few real steps), the predicted
final loss with its interval, and the wall time. It writes ``pretrain.yaml`` (an ordinary
`lmforge pretrain` config) and ``plan.md``.

Published constants (C = 6·N·D):
- Hoffmann et al. 2022, "Training Compute-Optimal Large Language Models" (arXiv:2203.15556),
  approach 3: E = 1.69, A = 406.4, B = 410.7, α = 0.34, β = 0.28.
- Besiroglu, Erdil, Barnett and You 2024, "Chinchilla Scaling: A replication attempt"
  (arXiv:2404.10102): E = 1.8172, A = 482.01, B = 2085.43, α = 0.3478, β = 0.3658.
Their losses are of their data and tokenizer; only the allocation (N*, D*) transfers.

Batch and learning rate without a sweep: DeepSeek-AI 2024, "DeepSeek LLM: Scaling Open-Source
Language Models with Longtermism" (arXiv:2401.02954), eq. 1: η_opt = 0.3118·C^-0.1250 and
B_opt = 0.2920·C^0.3271 tokens. With a sweep, its own rule: its batch, and its peak rate scaled by
width (lr · (reference width / d_model)^exponent), the rule its runs were trained and fitted with.

Data repetition: Muennighoff et al. 2023, "Scaling Data-Constrained Language Models"
(arXiv:2305.16264): U unique tokens seen E epochs are worth D' = U + U·R*·(1 − e^(−(E−1)/R*))
fresh tokens, R* ≈ 15.4; up to ~4 epochs cost little, past ~16 almost nothing is gained.
"""

from __future__ import annotations

import dataclasses
import json
import math
import os
import re
import tempfile
from dataclasses import dataclass, field

from omegaconf import OmegaConf

from lmforge.pretrain.config.schema import PretrainConfig, load_config, to_yaml
from lmforge.pretrain.core.durable import atomic_directory, check_writable
from lmforge.pretrain.core.errors import ConfigurationError
from lmforge.pretrain.forecast.forecast import to_level
from lmforge.pretrain.forecast.ledger import probe_steps
from lmforge.pretrain.model.flops import PEAK_FLOPS_TABLE, flops_per_token
from lmforge.pretrain.parallel.common import resolve_precision
from lmforge.pretrain.parallel.memory import estimate_memory
from lmforge.scaling.config import ScalingConfig, ShapeConfig, SweepFitConfig
from lmforge.scaling.fit import SurfaceFit
from lmforge.scaling.forms import LOSS_FORMS, SIZE_FORMS
from lmforge.scaling.grid import fit_params, format_count, format_flops, shape_for

PUBLISHED = {
    "hoffmann": (
        dict(E=1.69, A=406.4, B=410.7, alpha=0.34, beta=0.28),
        "Hoffmann et al. 2022, approach 3 (arXiv:2203.15556)",
    ),
    "besiroglu": (
        dict(E=1.8172, A=482.01, B=2085.43, alpha=0.3478, beta=0.3658),
        "Besiroglu et al. 2024 (arXiv:2404.10102)",
    ),
}
DEEPSEEK_LR = (0.3118, -0.1250)  # η_opt = k·C^e
DEEPSEEK_BATCH = (0.2920, 0.3271)  # B_opt (tokens) = k·C^e
REPEAT_R_STAR = 15.4  # Muennighoff et al.'s fitted R*_D

# Memory per GPU (bytes), by the names of PEAK_FLOPS_TABLE (datasheets; the largest variant).
GPU_MEMORY = {
    "H100 NVL": 94e9,
    "H100 PCIe": 80e9,
    "H100 SXM": 80e9,
    "H200 NVL": 141e9,
    "H200": 141e9,
    "A100": 80e9,
    "A10G": 24e9,
    "L40S": 48e9,
    "L4": 24e9,
    "RTX 4090": 24e9,
    "V100 PCIe": 32e9,
    "V100 SXM2": 32e9,
}


@dataclass
class Device:
    """What the run has: n devices of one kind, their peak FLOP/s and memory each."""

    count: int
    name: str  # "H100 SXM", or "cpu"
    peak: float | None  # bf16 FLOP/s per device (None on CPU: measured by --probe)
    memory: float  # bytes per device


def parse_gpus(spec: str) -> Device:
    """'8xH100' / '16xA100' / '1xH200' -> Device (the table names of pretrain/model/flops.py)."""
    m = re.fullmatch(r"\s*(\d+)\s*[x×*]\s*(.+?)\s*", spec)
    if not m or int(m.group(1)) < 1:
        raise ConfigurationError(
            f"--gpus {spec!r}: give COUNTxNAME, e.g. 8xH100 or 16xA100 (names: "
            + ", ".join(d for _, d, _ in PEAK_FLOPS_TABLE)
            + ")"
        )
    count, name = int(m.group(1)), m.group(2).lower()
    for pattern, display, peaks in PEAK_FLOPS_TABLE:
        if re.search(pattern, name):
            peak = peaks.get("bf16", peaks.get("fp16"))
            return Device(count=count, name=display, peak=peak, memory=GPU_MEMORY[display])
    raise ConfigurationError(
        f"--gpus {spec!r}: unknown GPU {m.group(2)!r}; known: "
        + ", ".join(d for _, d, _ in PEAK_FLOPS_TABLE)
        + " (or give --flops and --mfu)"
    )


def host_device(count: int) -> Device:
    try:
        memory = float(os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES"))
    except (ValueError, OSError, AttributeError):
        memory = math.inf
    return Device(count=count, name="cpu", peak=None, memory=memory / count)


def effective_tokens(tokens: float, unique: float) -> float:
    """Muennighoff et al.'s D': what ``tokens`` drawn from ``unique`` are worth in fresh data."""
    if tokens <= unique:
        return tokens
    repeats = tokens / unique - 1
    return unique + unique * REPEAT_R_STAR * (1 - math.exp(-repeats / REPEAT_R_STAR))


@dataclass
class Law:
    """Where N*, D* and the loss come from."""

    source: str  # "a sweep's fit" or a citation
    N: float
    N_interval: tuple[float, float] | None
    D_interval: tuple[float, float] | None
    D: float
    loss: float | None  # None: published constants (their data, not yours)
    loss_interval: tuple[float, float] | None
    loss_form: str
    size_form: str
    surface: SurfaceFit | None  # for the repetition cost
    published_loss: float | None = None
    notes: list[str] = field(default_factory=list)


def _published_law(name: str, C: float) -> Law:
    params, cite = PUBLISHED[name]
    surface = SurfaceFit(**params, objective=0.0, n_points=0)
    n, d, loss = surface.optimal(C)
    return Law(
        source=cite,
        N=n,
        N_interval=None,
        D_interval=None,
        D=d,
        loss=None,
        loss_interval=None,
        loss_form="none (published constants)",
        size_form="L(N, D) N* of the published fit",
        surface=surface,
        published_loss=loss,
        notes=[
            f"{cite}: only the allocation transfers; their predicted loss {loss:.3f} is of their "
            "data and tokenizer, not a prediction for this run (run a sweep and plan with --fit "
            "for one)"
        ],
    )


def _sweep_dir(fit_path: str) -> str | None:
    """The sweep directory of runs/<sweep> or runs/<sweep>/report; None for anything else."""
    path = fit_path.rstrip("/")
    if os.path.basename(path) == "report" and os.path.isfile(
        os.path.join(os.path.dirname(path), "sweep.yaml")
    ):
        path = os.path.dirname(path)
    return path if os.path.isfile(os.path.join(path, "sweep.yaml")) else None


def fitted_law(fit_path: str, C: float) -> tuple[Law, ScalingConfig | None, float]:
    """N*, D* and the loss at C by the form each backtest chose: of a sweep (its held-out
    budgets' runs are not read at all) or of points (a CSV or run directories, as `lmforge
    scaling fit` takes them); with the sweep's config and the level of the intervals."""
    from lmforge.scaling.analysis import analyse
    from lmforge.scaling.sources import load_sources, load_sweep

    sweep = _sweep_dir(fit_path)
    cfg = None
    if sweep is not None:
        cfg = load_config(ScalingConfig, [os.path.join(sweep, "sweep.yaml")])
        src = load_sweep(sweep, cfg.fit.params, skip_budgets=cfg.fit.holdout)
        fit = load_config(SweepFitConfig, [{**cfg.fit.__dict__, "holdout": []}])
        held = ", ".join(format_flops(c) for c in cfg.fit.holdout)
        source = f"the fit of sweep {sweep}" + (
            f" (its held-out budgets {held} not read)" if held else ""
        )
    elif fit_path.endswith((".csv", ".CSV")) or os.path.isdir(fit_path):
        src = load_sources([fit_path], "non_embedding")
        fit = SweepFitConfig()
        source = f"the fit of {src.what}"
    else:
        raise ConfigurationError(
            f"--fit {fit_path}: not a sweep (runs/<sweep> or its report/), a points CSV or a "
            "run directory; or use --law hoffmann|besiroglu"
        )
    analysis = analyse(src, fit, [C])
    result = analysis["result"]
    (t,) = result["targets"]
    if "best_N" not in t or "best_loss" not in t:
        raise ConfigurationError(f"--fit {fit_path}: the fit predicts no N* or loss at {C:.3g}")
    n_iv = t["best_N_interval"]
    d_iv = None
    if n_iv:  # D = C / FLOPs per token of N: the larger N, the fewer tokens

        def tokens(n: float) -> float:
            return C / (6 * n if src.fpt is None else float(src.fpt(n)))

        d_iv = (tokens(n_iv[1]), tokens(n_iv[0]))
    return (
        Law(
            source=source,
            N=t["best_N"],
            N_interval=n_iv,
            D_interval=d_iv,
            D=t["best_D"],
            loss=t["best_loss"],
            loss_interval=t["best_interval"],
            loss_form=LOSS_FORMS[result["choice"]],
            size_form=SIZE_FORMS[result["choice_size"]],
            surface=analysis["objects"]["surface"],
            notes=[n for n in result["notes"] if "disagree" in n],
        ),
        cfg,
        fit.level,
    )


@dataclass
class Plan:
    C: float
    law: Law
    device: Device
    config: PretrainConfig
    params: int  # N of the fits for the shaped model
    tokens: int
    epochs: float
    repeat_cost: float | None  # expected loss increase from repetition (nats)
    batch_rule: str
    layout: str
    layout_estimate: float  # bytes per device
    candidates: list[dict]  # every layout considered: name, estimate, fits, tokens/s
    tokens_per_sec: float | None
    wall_seconds: float | None
    mfu: float | None
    notes: list[str]


def _layouts(device: Device, world: int) -> list[tuple[str, dict]]:
    """Layouts in the order preferred when they fit (the fastest first, as a rule)."""
    if world == 1:
        return [
            ("single process", {"strategy": "ddp"}),
            ("ddp + AC", {"strategy": "ddp", "activation_checkpointing": True}),
        ]
    return [
        ("ddp", {"strategy": "ddp"}),
        ("fsdp", {"strategy": "fsdp"}),
        ("fsdp + AC", {"strategy": "fsdp", "activation_checkpointing": True}),
        ("zero-3 + AC", {"strategy": "deepspeed", "zero_stage": 3, "activation_checkpointing": True}),
        ("zero-3 + offload + AC", {"strategy": "deepspeed", "zero_stage": 3, "offload_optimizer": True, "offload_params": True, "activation_checkpointing": True}),
    ]  # fmt: skip


def _as_dict(cfg: PretrainConfig) -> dict:
    """A config as the plain dict load_config layers (its resolved YAML)."""
    return OmegaConf.to_container(OmegaConf.create(to_yaml(cfg)))


def _estimate(
    cfg: PretrainConfig, world: int, changes: dict, vocab: int, device_type: str
) -> tuple[float, PretrainConfig]:
    run = load_config(PretrainConfig, [_as_dict(cfg), {"parallel": changes}])
    micro = run.train.micro_batch_size
    accum = max(1, run.train.global_batch_tokens // (run.train.seq_len * micro * world))
    est = estimate_memory(
        dataclasses.replace(run.model, vocab_size=vocab),
        parallel=run.parallel,
        world_size=world,
        precision=resolve_precision(run.train.precision, device_type=device_type),
        micro_batch_size=micro,
        seq_len=run.train.seq_len,
        grad_accum=accum,
    )
    return est.need(device_type), run


def probe(config: PretrainConfig, nproc: int, steps: int = 12) -> float:
    """Tokens/s of the run measured by a few real steps (pretrain/forecast/ledger.py:
    ``probe_steps``: the median step after the first, which holds start-up)."""
    with tempfile.TemporaryDirectory(prefix="lmforge-plan-") as tmp:
        path = os.path.join(tmp, "probe.yaml")
        with open(path, "w") as f:
            f.write(to_yaml(config))
        row = probe_steps("pretrain", [path], nproc=nproc, steps=steps, what="--probe")
    return config.train.global_batch_tokens / row["step_seconds"]


def _base_config(sweep_cfg: ScalingConfig | None, config_args: list[str], data: str | None):
    """The pretrain config the planned run starts from: the sweep's (its pretrain section) or
    the given config arguments, with --data."""
    layers: list = []
    if sweep_cfg is not None:
        layers.append(sweep_cfg.pretrain)
    layers += config_args
    if data:
        layers.append({"data": {"path": data}})
    if not layers:
        raise ConfigurationError(
            "give the pretrain config to start from (CONFIG.yaml, a preset or key=value "
            "arguments), or --fit runs/<sweep> to start from the sweep's"
        )
    return layers


MFU_START = 0.4  # the first guess when --probe measures the MFU of a GPU-hours budget


@dataclass
class Request:
    """What a plan is asked for, besides the budget."""

    fit_path: str | None  # the law: a sweep's fit, points or run directories
    law_name: str | None  # or published constants
    config_args: list[str]  # the pretrain config to start from
    data: str | None
    name: str
    probe: bool = False
    shape: dict | None = None  # width/depth rule overrides
    gpus: str | None = None


def make_plan(
    request: Request,
    *,
    flops: float | None = None,
    hours: float | None = None,
    mfu: float | None = None,
    nproc: int = 1,
) -> Plan:
    """The plan of a budget; with --gpus/--hours and --probe but no --mfu, the MFU is measured:
    planned at MFU_START, probed, replanned at the measured MFU until it moves less than 5%
    (at most three rounds)."""
    if (request.fit_path is None) == (request.law_name is None):
        raise ConfigurationError(
            "give the law: --fit runs/<sweep> (a sweep's fit) or --law hoffmann|besiroglu"
        )
    gpus = request.gpus
    device = parse_gpus(gpus) if gpus else host_device(nproc)
    world = device.count if gpus else nproc
    if mfu is not None and not 0 < mfu <= 1:
        raise ConfigurationError(f"--mfu {mfu}: give a fraction in (0, 1], e.g. 0.4")
    if flops is not None:
        if not (math.isfinite(flops) and flops > 0):
            raise ConfigurationError(f"--flops {flops}: give a compute budget in FLOPs > 0")
        return _plan_at(flops, request, device=device, world=world, mfu=mfu)
    if hours is None or not gpus:
        raise ConfigurationError(
            "give the budget: --flops C, or --gpus COUNTxNAME --hours H (with --mfu or "
            "--probe for the rate)"
        )
    if not hours > 0:
        raise ConfigurationError(f"--hours {hours}: give a duration > 0")
    if mfu is None and not request.probe:
        raise ConfigurationError(
            "--gpus/--hours give time, not FLOPs: add --mfu (e.g. 0.4), the share of the "
            "peak your runs reach (`lmforge bench` measures it), or --probe to measure it"
        )
    rate = mfu if mfu is not None else MFU_START
    for _ in range(3):
        budget = world * device.peak * rate * hours * 3600
        plan = _plan_at(budget, request, device=device, world=world, mfu=rate)
        if mfu is not None or plan.mfu is None or abs(plan.mfu / rate - 1) < 0.05:
            break
        rate = plan.mfu
    if mfu is None:
        plan.notes.append(
            f"the budget is {hours:g} h at the MFU the probe measured ({plan.mfu:.1%})"
        )
    return plan


def _batch_and_lr(base, sweep_cfg, shaped, world: int, flops: float):
    """Global batch (tokens), peak learning rate, warmup fraction (None: the config's) and the
    rule they came from: the sweep's, else DeepSeek's published one."""
    seq = base.train.seq_len
    if sweep_cfg is not None:
        batch = base.train.global_batch_tokens
        lr = base.optim.lr * (sweep_cfg.lr_reference_width / shaped.d_model) ** (
            sweep_cfg.lr_width_exponent
        )
        batch_rule = (
            f"the sweep's: {batch:,} tokens per step, peak lr {base.optim.lr:g} × "
            f"({sweep_cfg.lr_reference_width} / d_model)^{sweep_cfg.lr_width_exponent:g}"
        )
        return batch, lr, sweep_cfg.warmup_fraction, batch_rule
    micro_tokens = seq * base.train.micro_batch_size * world
    raw = DEEPSEEK_BATCH[0] * flops ** DEEPSEEK_BATCH[1]
    batch = max(1, round(raw / micro_tokens)) * micro_tokens
    lr = DEEPSEEK_LR[0] * flops ** DEEPSEEK_LR[1]
    batch_rule = (
        f"DeepSeek-AI 2024 (arXiv:2401.02954, eq. 1): B_opt = 0.292·C^0.3271 = "
        f"{format_count(raw)} tokens, rounded to {batch:,} (whole micro-batches of "
        f"{micro_tokens:,} on {world} rank(s)); η_opt = 0.3118·C^-0.125 = {lr:.3g}"
    )
    return batch, lr, None, batch_rule


def _repetition(
    law: Law, n_fit: int, tokens: int, unique: int, data: str, notes: list[str]
) -> float | None:
    """The expected loss cost of ``tokens`` drawn from ``unique`` (by the L(N, D) fit, where
    there is one), with a note when the data repeats."""
    epochs = tokens / unique
    if epochs <= 1:
        return None
    worth = effective_tokens(tokens, unique)
    repeat_cost = None
    if law.surface is not None:
        repeat_cost = float(law.surface.predict(n_fit, worth) - law.surface.predict(n_fit, tokens))
    notes.append(
        f"D* = {format_count(tokens)} tokens is {epochs:.2f} passes over the "
        f"{format_count(unique)} training tokens of {data}: worth "
        f"{format_count(worth)} fresh tokens (Muennighoff et al. 2023, arXiv:2305.16264)"
        + (
            f", an expected loss cost of +{repeat_cost:.4f} nats by the L(N, D) fit"
            if repeat_cost is not None
            else ""
        )
        + ("; more data is the fix" if epochs > 4 else "")
    )
    return repeat_cost


def _forecast_law(law: Law, level: float, flops: float) -> dict:
    """The planned run's ``forecast.law``: the run is held to the plan's loss (pretrain/
    forecast/), its interval brought to 80%."""
    low, high = to_level(law.loss, *law.loss_interval, level)
    return {
        "loss": float(law.loss),
        "low": float(low),
        "high": float(high),
        "source": f"the plan at {format_flops(flops)} FLOPs from {law.source}",
    }


def _choose_layout(planned, request: Request, device: Device, world: int, vocab: int, n_fit: int):
    """The first (preferred) layout that fits a device by the memory estimate, or with
    ``request.probe`` the fastest of the first three that fit, measured; with every candidate
    considered and the measured tokens/s (None without a probe)."""
    candidates = []
    for label, changes in _layouts(device, world):
        try:
            need, run = _estimate(planned, world, changes, vocab, "cuda" if request.gpus else "cpu")
        except ConfigurationError as exc:
            candidates.append({"layout": label, "error": str(exc)})
            continue
        candidates.append(
            {"layout": label, "estimate": need, "fits": need <= 0.9 * device.memory, "run": run}
        )
    fitting = [c for c in candidates if c.get("fits")]
    if not fitting:
        raise ConfigurationError(
            f"no layout fits {device.count}× {device.name} ({device.memory / 1e9:.0f} GB each) "
            f"by the memory estimate for a {format_count(n_fit)}-parameter model; plan with more "
            "GPUs or a smaller budget"
        )
    if not request.probe:
        return fitting[0], candidates, None
    for c in fitting[:3]:
        c["tokens_per_sec"] = probe(c["run"], world)
    chosen = max(fitting[:3], key=lambda c: c["tokens_per_sec"])
    return chosen, candidates, chosen["tokens_per_sec"]


def _plan_at(
    flops: float, request: Request, *, device: Device, world: int, mfu: float | None
) -> Plan:
    from lmforge.pretrain.data.prepare import load_manifest

    fit_path, law_name = request.fit_path, request.law_name
    notes: list[str] = []

    sweep_cfg = None
    if fit_path is not None:
        law, sweep_cfg, level = fitted_law(fit_path, flops)
    else:
        level = None
        if law_name not in PUBLISHED:
            raise ConfigurationError(f"--law {law_name}: give one of {', '.join(PUBLISHED)}")
        law = _published_law(law_name, flops)
    notes += law.notes
    base = load_config(
        PretrainConfig,
        [
            *_base_config(sweep_cfg, request.config_args, request.data),
            {"name": request.name, "train": {"max_steps": 1}},
        ],
    )
    manifest = load_manifest(base.data.path)
    vocab = manifest["tokenizer"]["vocab_size"]
    unique = manifest["splits"]["train"]["tokens"]
    model = dataclasses.replace(base.model, vocab_size=vocab)
    seq = base.train.seq_len
    count = sweep_cfg.fit.params if sweep_cfg else "non_embedding"
    rule = sweep_cfg.shape if sweep_cfg else ShapeConfig(aspect_ratio=64, head_dim=64)
    if request.shape:
        rule = load_config(ShapeConfig, [rule.__dict__, request.shape])
    shaped = shape_for(law.N, base=model, rule=rule, count=count)
    n_fit = fit_params(shaped, count)
    fpt = flops_per_token(shaped, seq)

    batch, lr, warmup_fraction, batch_rule = _batch_and_lr(base, sweep_cfg, shaped, world, flops)
    steps = max(1, round(flops / (fpt * batch)))
    tokens = steps * batch
    epochs = tokens / unique
    repeat_cost = _repetition(law, n_fit, tokens, unique, base.data.path, notes)
    overrides = {
        "model": {"n_layer": shaped.n_layer, "d_model": shaped.d_model, "n_head": shaped.n_head},
        "train": {"max_steps": steps, "global_batch_tokens": batch},
        "optim": {"lr": lr},
    }
    if warmup_fraction is not None:
        overrides["optim"]["warmup_steps"] = round(warmup_fraction * steps)
    if level is not None and law.loss is not None and law.loss_interval:
        overrides["forecast"] = {"law": _forecast_law(law, level, flops)}
    planned = load_config(PretrainConfig, [_as_dict(base), overrides])

    chosen, candidates, rate = _choose_layout(planned, request, device, world, vocab, n_fit)
    planned = chosen["run"]
    run_flops = tokens * fpt
    wall = mfu_used = None
    if rate is not None:
        wall = tokens / rate
        if device.peak:
            mfu_used = run_flops / wall / (world * device.peak)
    elif device.peak and mfu:
        wall = run_flops / (world * device.peak * mfu)
        mfu_used = mfu
    return Plan(
        C=flops,
        law=law,
        device=device,
        config=planned,
        params=n_fit,
        tokens=tokens,
        epochs=epochs,
        repeat_cost=repeat_cost,
        batch_rule=batch_rule,
        layout=chosen["layout"],
        layout_estimate=chosen["estimate"],
        candidates=[{k: v for k, v in c.items() if k != "run"} for c in candidates],
        tokens_per_sec=rate,
        wall_seconds=wall,
        mfu=mfu_used,
        notes=notes,
    )


def _hours(seconds: float) -> str:
    return f"{seconds / 3600:.2f} h" if seconds >= 3600 else f"{seconds:.0f} s"


def render_plan(plan: Plan, out: str) -> str:
    law, cfg = plan.law, plan.config
    m = cfg.model
    iv = law.N_interval
    lines = [
        f"# Plan: {cfg.name}",
        "",
        f"Budget C = {plan.C:.4g} FLOPs on {plan.device.count}× {plan.device.name}. Law: "
        f"{law.source}; N* by {law.size_form}, the loss by {law.loss_form}.",
        "",
        "| | value | interval |",
        "|---|---|---|",
        f"| N* (law) | {format_count(law.N)} | "
        + (f"[{format_count(iv[0])}, {format_count(iv[1])}]" if iv else "—")
        + " |",
        f"| D* (law) | {format_count(law.D)} tokens | "
        + (
            f"[{format_count(law.D_interval[0])}, {format_count(law.D_interval[1])}]"
            if law.D_interval
            else "—"
        )
        + " |",
        f"| model | {m.n_layer} layers, d_model {m.d_model}, {m.n_head} heads: "
        f"{format_count(plan.params)} parameters (the law's N) | |",
        f"| tokens | {format_count(plan.tokens)} = {cfg.train.max_steps:,} steps × "
        f"{cfg.train.global_batch_tokens:,} ({plan.epochs:.2f} passes over the data) | |",
        f"| peak learning rate | {cfg.optim.lr:.4g} ({cfg.optim.schedule}, warmup "
        f"{cfg.optim.warmup_steps} steps) | |",
    ]
    if law.loss is not None:
        li = law.loss_interval
        lines.append(
            f"| predicted final loss | {law.loss:.4f} | "
            + (f"[{li[0]:.4f}, {li[1]:.4f}]" if li else "—")
            + " |"
        )
    else:
        lines.append(
            f"| predicted final loss | none for this data (the published fit says "
            f"{law.published_loss:.3f} for its own) | |"
        )
    if plan.repeat_cost is not None:
        lines.append(f"| expected cost of repeating data | +{plan.repeat_cost:.4f} nats | |")
    lines.append(
        f"| layout | {plan.layout}: {plan.layout_estimate / 1e9:.2f} GB per device by the "
        f"estimate, of {plan.device.memory / 1e9:.0f} GB | |"
    )
    if plan.wall_seconds is not None:
        how = (
            f"measured {plan.tokens_per_sec:,.0f} tokens/s by a few real steps (--probe)"
            if plan.tokens_per_sec
            else f"at MFU {plan.mfu:.0%} of {plan.device.peak / 1e12:.0f} TFLOP/s each"
        )
        lines.append(
            f"| wall time | {_hours(plan.wall_seconds)}; "
            f"{plan.wall_seconds * plan.device.count / 3600:.2f} device-hours ({how}) | |"
        )
    else:
        lines.append(
            "| wall time | unknown: add --probe (a few real steps here) or --gpus with --mfu | |"
        )
    lines += ["", f"Batch and learning rate: {plan.batch_rule}.", ""]
    lines += ["Layouts considered (the first that fits is preferred; --probe measures them):", ""]
    for c in plan.candidates:
        if "error" in c:
            lines.append(f"- {c['layout']}: not possible here ({c['error']})")
            continue
        lines.append(
            f"- {c['layout']}: {c['estimate'] / 1e9:.2f} GB per device"
            + ("" if c["fits"] else " (does not fit)")
            + (f", {c['tokens_per_sec']:,.0f} tokens/s measured" if "tokens_per_sec" in c else "")
        )
    if plan.notes:
        lines += ["", "Notes:", ""] + [f"- {n}" for n in plan.notes]
    lines += ["", f"Train it: `lmforge pretrain {out}/pretrain.yaml`.", ""]
    return "\n".join(lines)


def write_plan(plan: Plan, out: str) -> None:
    """pretrain.yaml and plan.md, written together (an older plan there is replaced)."""
    check_writable(out, "--out ")
    text = render_plan(plan, out)
    with atomic_directory(out, prefix=".plan.", replace=True) as tmp:
        with open(os.path.join(tmp, "pretrain.yaml"), "w") as f:
            f.write(to_yaml(plan.config))
        with open(os.path.join(tmp, "plan.md"), "w") as f:
            f.write(text)
        with open(os.path.join(tmp, "plan.json"), "w") as f:
            json.dump(
                {
                    "C": plan.C,
                    "N": plan.params,
                    "N_law": plan.law.N,
                    "N_interval": plan.law.N_interval,
                    "D_law": plan.law.D,
                    "D_interval": plan.law.D_interval,
                    "tokens": plan.tokens,
                    "epochs": plan.epochs,
                    "loss": plan.law.loss,
                    "loss_interval": plan.law.loss_interval,
                    "layout": plan.layout,
                    "tokens_per_sec": plan.tokens_per_sec,
                    "wall_seconds": plan.wall_seconds,
                },
                f,
                indent=1,
            )
