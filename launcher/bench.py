"""`lmforge bench`: tokens/s and MFU of lmforge's training step next to a minimal PyTorch loop.

Both loops train the same model (same init, same batches, same AdamW) in the same process, one
after the other; the ratio ``lmforge / minimal`` is the pipeline's overhead (Accelerate wrapper,
trainer bookkeeping, data path). MFU is against the peak of the training dtype: the GPU table, or a
matmul probe on CPUs (pretrain/model/flops.py). Results are printed as a markdown table.
"""

from __future__ import annotations

import contextlib
import json
import os
import platform
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from dataclasses import dataclass
from importlib import metadata

import numpy as np
import torch
import torch.nn.functional as F

from lmforge.pretrain.config.schema import ModelConfig, OptimConfig, load_config
from lmforge.pretrain.model.flops import flops_per_token, param_counts, peak_flops
from lmforge.pretrain.model.transformer import GPT
from lmforge.pretrain.train.optim import build_optimizer, build_scheduler

SEQ_LEN = 256
MICRO_BATCH = 8
VOCAB = 8192
WARMUP = 2  # untimed steps per candidate before the windows (allocations, compilation)


def _version(package: str) -> str:
    try:
        return metadata.version(package)
    except metadata.PackageNotFoundError:
        return "not installed"


class SyntheticBatches:
    """Random token batches with the interface of :class:`pretrain.data.batches.TrainBatches`."""

    def __init__(self, *, micro_batch: int, seq_len: int, vocab: int, seed: int = 0) -> None:
        rng = np.random.default_rng(seed)
        self.pool = torch.from_numpy(rng.integers(0, vocab, (16, micro_batch, seq_len + 1)))
        self.i = 0
        self.last_indices = np.empty(0)

    def next_step(self) -> list[dict[str, torch.Tensor]]:
        t = self.pool[self.i % len(self.pool)]
        self.i += 1
        return [{"input_ids": t[:, :-1], "labels": t[:, 1:]}]

    def state_dict(self) -> dict:
        return {"i": self.i}

    def load_state_dict(self, state: dict) -> None:
        self.i = state["i"]


def _finish(lines: list[str], out: str | None) -> str:
    """The results table as text, also written to ``out`` when given."""
    text = "\n".join(lines) + "\n"
    if out:
        with open(out, "w") as f:
            f.write(text)
    return text


# `--family`: a preset's shape with the switches of a Hub family (the same widths, heads and
# layers; Qwen2's q/k/v biases, Qwen3's qk-norm).
FAMILY_SWITCHES = {
    "llama": [],
    "mistral": ["family=mistral"],
    "qwen2": ["family=qwen2", "qkv_bias=true"],
    "qwen3": ["family=qwen3", "qk_norm=true"],
}


def _model_cfg(
    preset: str, *, vocab: int = VOCAB, seq_len: int = SEQ_LEN, family: str = "llama"
) -> ModelConfig:
    here = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    path = os.path.join(here, "configs", "model", f"{preset}.yaml")
    overrides = [f"vocab_size={vocab}", f"max_seq_len={seq_len}", *FAMILY_SWITCHES[family]]
    return load_config(ModelConfig, [path, *overrides])


def _device() -> torch.device:
    return torch.device("cuda" if torch.cuda.is_available() else "cpu")


def _sync() -> None:
    if torch.cuda.is_available():
        torch.cuda.synchronize()


@dataclass
class Candidate:
    """One way to train the benchmark's model: ``run(n)`` trains ``n`` more steps and returns
    the last step's loss (a host value: the device has finished). ``split`` gives lmforge's
    time split of the last window (its metrics row), when the candidate has one."""

    name: str
    run: Callable[[int], float]
    split: Callable[[], dict] | None = None
    model: torch.nn.Module | None = None
    trainer: object | None = None  # lmforge's Trainer, for its clock


def _amp(precision: str) -> contextlib.AbstractContextManager:
    if precision == "bf16":
        return torch.autocast(_device().type, dtype=torch.bfloat16)
    return contextlib.nullcontext()


def _plain_loop(
    model: torch.nn.Module,
    opt: torch.optim.Optimizer,
    precision: str,
    loss_of: Callable[[torch.nn.Module, dict], torch.Tensor],
) -> Callable[[int], float]:
    """The loop every peer gets: forward under autocast, backward, clip at 1.0, AdamW step."""
    batches = SyntheticBatches(micro_batch=MICRO_BATCH, seq_len=SEQ_LEN, vocab=VOCAB)
    device = _device()

    def run(n: int) -> float:
        for _ in range(n):
            (batch,) = batches.next_step()
            batch = {k: v.to(device, non_blocking=True) for k, v in batch.items()}
            with _amp(precision):
                loss = loss_of(model, batch)
            loss.backward()
            torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
            opt.step()
            opt.zero_grad(set_to_none=True)
        return loss.item()

    return run


def floor_candidate(cfg: ModelConfig, precision: str) -> Candidate:
    """The floor: a hand-written loop on lmforge's model with lmforge's AdamW groups."""
    torch.manual_seed(0)
    model = GPT(cfg).to(_device())
    opt = build_optimizer(model, OptimConfig())

    def loss_of(model: torch.nn.Module, batch: dict) -> torch.Tensor:
        logits = model(batch["input_ids"])
        return F.cross_entropy(logits.float().flatten(0, 1), batch["labels"].flatten())

    return Candidate("floor", _plain_loop(model, opt, precision, loss_of), model=model)


def lmforge_candidate(
    cfg: ModelConfig,
    precision: str,
    *,
    compile: bool = False,
    seq_len: int = SEQ_LEN,
    micro_batch: int = MICRO_BATCH,
) -> Candidate:
    """lmforge's path: the DDP strategy (Accelerate) and the Trainer with its bookkeeping;
    each window extends the run by ``n`` steps and ends on a metrics row. ``precision`` fp8:
    bf16 with float8 matmuls (a GPU that has them)."""
    from accelerate.state import AcceleratorState

    from lmforge.pretrain.parallel import build_strategy
    from lmforge.pretrain.train.loop import (
        Cadence,
        ComputeAccounting,
        TrainData,
        Trainer,
        TrainParts,
    )

    AcceleratorState._reset_state(reset_partial_state=True)  # a new precision per case
    strategy = build_strategy(precision=precision)
    strategy.compile_blocks = compile  # as train.compile: each block, inside prepare
    torch.manual_seed(0)
    model = GPT(cfg)
    model, opt = strategy.prepare(model, lambda m: build_optimizer(m, OptimConfig()))
    sched = build_scheduler(opt, total_steps=10**9, cfg=OptimConfig(warmup_steps=0))
    trainer = Trainer(
        parts=TrainParts(model, opt, sched, strategy),
        data=TrainData(
            SyntheticBatches(micro_batch=micro_batch, seq_len=seq_len, vocab=cfg.vocab_size)
        ),
        cadence=Cadence(total_steps=0, log_interval=10**9),  # one row per window: its last step
        compute=ComputeAccounting(
            tokens_per_step=micro_batch * seq_len,
            flops_per_token=flops_per_token(cfg, seq_len),
            peak_flops=1.0,
        ),
    )

    def run(n: int) -> float:
        trainer.total_steps += n
        trainer.fit()
        return trainer.last_row["loss"]

    def split() -> dict:
        return {k: v for k, v in trainer.last_row.items() if k.startswith("time_")}

    name = "lmforge+compile" if compile else "lmforge"
    return Candidate(name, run, split, model=model, trainer=trainer)


def transformers_candidate(cfg: ModelConfig, precision: str) -> Candidate:
    """transformers' own class of the shape's family (LlamaForCausalLM, Qwen3ForCausalLM, ...;
    SDPA attention), with the same initial weights as the others (lmforge's names map one to one
    onto the family's), trained by the plain loop with the loss from ``labels=`` (transformers
    shifts the labels itself, so it gets the unshifted window and predicts one token fewer per
    sample: the same compute)."""
    import transformers

    from lmforge.pretrain.model.hf_mapping import architecture, hf_config, to_hf_name

    torch.manual_seed(0)
    ours = GPT(cfg)
    model_class = getattr(transformers, architecture(cfg.family, None))
    model = model_class(hf_config(cfg, attn_implementation="sdpa")).to(_device())
    weights = {to_hf_name(k): v for k, v in ours.state_dict().items()}
    if cfg.tie_embeddings:
        weights.pop("lm_head.weight", None)
    missing, unexpected = model.load_state_dict(weights, strict=False)
    if unexpected or set(missing) - ({"lm_head.weight"} if cfg.tie_embeddings else set()):
        raise RuntimeError(
            f"the weights do not map onto {model_class.__name__}: {missing} {unexpected}"
        )
    model.tie_weights()
    opt = torch.optim.AdamW(
        model.parameters(), lr=OptimConfig.lr, betas=(0.9, 0.95), weight_decay=0.1
    )

    def loss_of(model: torch.nn.Module, batch: dict) -> torch.Tensor:
        return model(input_ids=batch["input_ids"], labels=batch["input_ids"]).loss

    return Candidate("transformers", _plain_loop(model, opt, precision, loss_of), model=model)


def interleave(
    candidates: list[Candidate], *, windows: int, steps: int, warmup: int
) -> tuple[dict[str, list[float]], dict[str, float]]:
    """Seconds per step of every window of every candidate, and each one's last loss: each
    warms up, then the candidates take turns window by window (the order rotates, so none
    always follows the same one), so a machine that slows down or speeds up weighs on all of
    them alike."""
    for cand in candidates:
        cand.run(warmup)
    times: dict[str, list[float]] = {c.name: [] for c in candidates}
    losses: dict[str, float] = {}
    for w in range(windows):
        k = w % len(candidates)
        for cand in candidates[k:] + candidates[:k]:
            _sync()
            t0 = time.perf_counter()
            losses[cand.name] = cand.run(steps)
            _sync()
            times[cand.name].append((time.perf_counter() - t0) / steps)
    return times, losses


def _ratio_name(name: str) -> str:
    """The ratio column of a candidate: lmforge against it, or compiled against eager."""
    return "compile/eager" if name == "lmforge+compile" else f"lmforge/{name}"


def _bench_header(
    names: list[str], *, peers: bool, compile: bool, family: str, steps: int, windows: int
) -> list[str]:
    """The training bench's title line (what ran, where, when) and its table header."""
    device = _device()
    return [
        f"lmforge bench{' --peers' * peers}{' --compile' * compile}"
        + (f" --family {family}" if family != "llama" else "")
        + ": "
        f"{torch.cuda.get_device_name() if device.type == 'cuda' else 'CPU'} "
        f"({platform.machine()}), {torch.get_num_threads()} threads, torch {torch.__version__}"
        + (f", transformers {_version('transformers')}" if peers else "")
        + f", seq {SEQ_LEN}, micro-batch {MICRO_BATCH}, vocab {VOCAB}; {windows} windows of "
        f"{steps} steps per candidate, interleaved, after {WARMUP} warm-up; "
        f"{time.strftime('%Y-%m-%d')}",
        "",
        "| model | params | dtype | "
        + " | ".join(f"{n} tok/s (spread)" for n in names)
        + " | MFU lmforge | "
        + " | ".join(_ratio_name(n) for n in names if n != "lmforge")
        + " | lmforge step: data / fwd+bwd / optim / other |",
        "|---" * (4 + 2 * len(names)) + "|",
    ]


def run_bench(
    *,
    models: list[str],
    precisions: list[str],
    steps: int,
    windows: int,
    peers: bool,
    compile: bool,
    out: str | None,
    family: str = "llama",
) -> str:
    """The training step of lmforge next to the floor (and with ``peers``, transformers' own
    class of the ``family``; with ``compile``, lmforge with torch.compile per block), each
    preset with the family's switches (`FAMILY_SWITCHES`): tokens/s as the median of the
    windows, the spread (min-max) around it, MFU against the peak measured in this run, the
    ratios to lmforge, and lmforge's time split."""
    device = _device()
    tokens = MICRO_BATCH * SEQ_LEN
    names = ["floor", "lmforge"] + ["lmforge+compile"] * compile + ["transformers"] * peers
    lines = _bench_header(
        names, peers=peers, compile=compile, family=family, steps=steps, windows=windows
    )
    print("\n".join(lines), flush=True)
    for preset in models:
        cfg = _model_cfg(preset, family=family)
        counts = param_counts(cfg)
        fpt = flops_per_token(cfg, SEQ_LEN)
        for precision in precisions:
            dtype = {"fp32": torch.float32, "bf16": torch.bfloat16}[precision]
            peak, src = peak_flops(device, dtype)
            cands = [floor_candidate(cfg, precision), lmforge_candidate(cfg, precision)]
            if compile:
                cands.append(lmforge_candidate(cfg, precision, compile=True))
            if peers:
                cands.append(transformers_candidate(cfg, precision))
            times, losses = interleave(cands, windows=windows, steps=steps, warmup=WARMUP)
            tps = {n: [tokens / t for t in ts] for n, ts in times.items()}
            med = {n: statistics.median(v) for n, v in tps.items()}
            split = cands[1].split()
            cells = [
                f"{med[n]:,.0f} ({min(tps[n]) / med[n] - 1:+.0%}/{max(tps[n]) / med[n] - 1:+.0%})"
                for n in names
            ]
            ratios = [
                f"{med[n] / med['lmforge']:.3f}"
                if n == "lmforge+compile"
                else f"{med['lmforge'] / med[n]:.3f}"
                for n in names
                if n != "lmforge"
            ]
            step_s = sum(split[f"time_{k}"] for k in ("data", "fwd_bwd", "optim", "other"))
            shares = " / ".join(
                f"{split[f'time_{k}'] / step_s:.0%}" for k in ("data", "fwd_bwd", "optim", "other")
            )
            row = (
                f"| {preset} | {counts['total'] / 1e6:.1f}M | {precision} | "
                + " | ".join(cells)
                + f" | {med['lmforge'] * fpt / peak:.1%} | "
                + " | ".join(ratios)
                + f" | {shares} |"
            )
            lines.append(row)
            print(
                row,
                f"(peak {peak / 1e12:.3f} TFLOP/s: {src}; last losses: "
                + ", ".join(f"{n} {v:.4f}" for n, v in losses.items())
                + ")",
                flush=True,
            )
            del cands
    lines += [
        "",
        "tok/s: the median of the windows; spread: the slowest and fastest window against it. "
        "MFU: against the matmul peak of the dtype measured in this run (CPU) or the "
        "datasheet (GPU).",
    ]
    return _finish(lines, out)


def run_generate_bench(
    *, models: list[str], precisions: list[str], new_tokens: int, out: str | None
) -> str:
    """Greedy decoding speed of ``GPT.generate`` (KV cache) next to re-running the whole
    context for every new token (what generate did before it had a cache), same model, same
    prompt, in this process. Both must produce the same tokens (fp32; in bf16 a near-tie can
    break the other way, so bf16 reports whether they matched)."""
    device = _device()
    batch, prompt_len = 1, SEQ_LEN - new_tokens
    if prompt_len < 1:
        raise ValueError(f"--new-tokens must be below {SEQ_LEN}")
    lines = [
        f"lmforge bench --generate: {torch.cuda.get_device_name() if device.type == 'cuda' else 'CPU'} "
        f"({platform.machine()}), {torch.get_num_threads()} threads, torch {torch.__version__}, "
        f"batch {batch}, prompt {prompt_len} + {new_tokens} new tokens (greedy), vocab {VOCAB}, "
        f"{time.strftime('%Y-%m-%d')}",
        "",
        "| model | dtype | re-run context tok/s | KV cache tok/s | cache/re-run | same tokens |",
        "|---|---|---|---|---|---|",
    ]
    print("\n".join(lines), flush=True)

    def rerun(model: GPT, ids: torch.Tensor) -> torch.Tensor:
        for _ in range(new_tokens):
            next_id = model(ids[:, -SEQ_LEN:])[:, -1].float().argmax(-1, keepdim=True)
            ids = torch.cat((ids, next_id), dim=1)
        return ids

    def timed(fn, *args, **kwargs) -> tuple[float, torch.Tensor]:
        fn(*args, **kwargs)  # warm-up (kernels, allocator)
        _sync()
        t0 = time.perf_counter()
        out = fn(*args, **kwargs)
        _sync()
        return new_tokens * batch / (time.perf_counter() - t0), out

    for preset in models:
        cfg = _model_cfg(preset)
        torch.manual_seed(0)
        model = GPT(cfg).to(device).eval()
        ids = torch.randint(0, VOCAB, (batch, prompt_len), device=device)
        for precision in precisions:
            amp = (
                torch.autocast(device.type, dtype=torch.bfloat16)
                if precision == "bf16"
                else contextlib.nullcontext()
            )
            with amp, torch.no_grad():
                base, want = timed(rerun, model, ids)
                ours, got = timed(model.generate, ids, new_tokens, temperature=0.0)
            row = (
                f"| {preset} | {precision} | {base:,.1f} | {ours:,.1f} | {ours / base:.2f} "
                f"| {'yes' if torch.equal(want, got) else 'no'} |"
            )
            lines.append(row)
            print(row, flush=True)
    return _finish(lines, out)


def scoring_candidate(name: str, scorer, windows: list[torch.Tensor], batch_size: int) -> Candidate:
    """`lmforge evaluate --text`'s scoring (finetune/inference.py ``score_windows``) of the
    whole text, ``batch_size`` windows per forward pass: each unit is one pass over every
    window, and returns the mean loss of the pass (nats per token)."""
    from lmforge.finetune.inference import score_windows

    tokens = sum(len(w) - 1 for w in windows)

    def run(n: int) -> float:
        loss = float("nan")
        for _ in range(n):
            loss = sum(score_windows(scorer, windows, batch_size)) / tokens
        return loss

    score_windows(scorer, windows[:batch_size], batch_size)  # warm-up (kernels, allocator)
    return Candidate(name, run)


def run_evaluate_bench(
    *,
    path: str,
    files: list[str],
    seq_len: int | None,
    batch_size: int | None,
    micro_batch: int,
    steps: int,
    windows: int,
    out: str | None,
) -> str:
    """`lmforge evaluate --text` next to training the same model, in this process: the
    trainer's step (forward, backward, AdamW) on the model's shape in the precision evaluate
    scores in, against scoring the text one window per forward pass in fp32 (how evaluate
    scored before it batched), ``batch_size`` windows per pass in fp32, and (where the run
    trained in bf16) the default: batched, in the run's precision. The candidates take turns
    window by window; tokens/s is the median of the windows."""
    from lmforge.finetune.inference import Scorer, default_batch_size, load_model, read_windows
    from lmforge.pretrain.core.errors import DataError

    src, model, tok = load_model(path)
    T = seq_len or src.model.max_seq_len
    text = [w for _, w in read_windows(files, tok, T)]
    tokens = sum(len(w) - 1 for w in text)
    if tokens == 0:
        raise DataError(f"{', '.join(files)}: no text to score (need at least 2 tokens)")
    scorer = Scorer.of(src, model)
    device, precision = scorer.device, scorer.precision
    B = batch_size or default_batch_size(T, src.model.vocab_size, device.type)
    fp32 = Scorer(scorer.model, device, "fp32")
    train = lmforge_candidate(src.model, precision, seq_len=T, micro_batch=micro_batch)
    train.run(WARMUP)
    cands = [
        Candidate(
            f"training step ({precision}, micro-batch {micro_batch})",
            lambda n: train.run(n * steps),
        ),
        scoring_candidate("evaluate, 1 window a pass, fp32 (as before)", fp32, text, 1),
        scoring_candidate(f"evaluate, {B} windows a pass, fp32", fp32, text, B),
    ]
    if precision != "fp32":
        cands.append(
            scoring_candidate(
                f"evaluate, {B} windows a pass, {precision} (the default)", scorer, text, B
            )
        )
    per_unit = [steps * micro_batch * T] + [tokens] * (len(cands) - 1)
    lines = [
        f"lmforge bench --evaluate {path}: "
        f"{torch.cuda.get_device_name() if device.type == 'cuda' else 'CPU'} ({platform.machine()}), "
        f"{torch.get_num_threads()} threads, torch {torch.__version__}; "
        f"{param_counts(src.model)['total'] / 1e6:.2f}M parameters, vocab {src.model.vocab_size}, "
        f"window {T}; {len(files)} file(s), {tokens:,} tokens; {windows} windows of {steps} "
        f"training steps and one pass over the text per candidate, interleaved; "
        f"{time.strftime('%Y-%m-%d')}",
        "",
        "| candidate | tok/s (spread) | / training | loss (nats/token) |",
        "|---|---|---|---|",
    ]
    print("\n".join(lines), flush=True)
    times, losses = interleave(cands, windows=windows, steps=1, warmup=0)
    tps = {c.name: [n / t for t in times[c.name]] for c, n in zip(cands, per_unit, strict=True)}
    med = {n: statistics.median(v) for n, v in tps.items()}
    base = med[cands[0].name]
    for cand in cands:
        v, m = tps[cand.name], med[cand.name]
        row = (
            f"| {cand.name} | {m:,.0f} ({min(v) / m - 1:+.0%}/{max(v) / m - 1:+.0%}) "
            f"| {m / base:.2f} | {'—' if cand is cands[0] else f'{losses[cand.name]:.6f}'} |"
        )
        lines.append(row)
        print(row, flush=True)
    lines += [
        "",
        "tok/s: the median of the windows; spread: the slowest and fastest window against it. "
        "Training: tokens trained per second (synthetic tokens, same shape); evaluate: tokens "
        "scored per second.",
    ]
    return _finish(lines, out)


GPU_SEQ_LEN = 2048
GPU_VOCAB = 32000
GPU_MODES = {  # name -> (precision, compile)
    "eager": ("bf16", False),
    "compile": ("bf16", True),
    "compile+fp8": ("fp8", True),
}


def _estimate(cfg: ModelConfig, micro_batch: int, seq_len: int) -> float:
    from lmforge.pretrain.config.schema import ParallelConfig
    from lmforge.pretrain.parallel.memory import estimate_memory

    return estimate_memory(
        cfg,
        parallel=ParallelConfig(),
        world_size=1,
        precision="bf16",
        micro_batch_size=micro_batch,
        seq_len=seq_len,
        grad_accum=1,
    ).total


def require_cuda() -> None:
    """bench --gpu's one line on a machine without a CUDA GPU."""
    from lmforge.pretrain.core.errors import ConfigurationError

    if not torch.cuda.is_available():
        raise ConfigurationError(
            "bench --gpu needs a CUDA GPU and this machine has none; run it on a GPU node "
            "(make bench-gpu), or drop --gpu for the CPU benchmark"
        )


def largest_micro_batch(cfg: ModelConfig, seq_len: int, *, limit: int = 64) -> int:
    """The largest power-of-two micro-batch (up to ``limit``) that trains two eager bf16 steps
    on this GPU: tried from the largest the memory estimate allows (90% of the device), halved
    on running out of memory."""
    total = torch.cuda.get_device_properties(0).total_memory
    mb = limit
    while mb > 1 and _estimate(cfg, mb, seq_len) > 0.9 * total:
        mb //= 2
    while True:
        try:
            lmforge_candidate(cfg, "bf16", seq_len=seq_len, micro_batch=mb).run(2)
            return mb
        except torch.OutOfMemoryError:
            if mb == 1:
                raise
            mb //= 2
        finally:
            torch.cuda.empty_cache()


def run_gpu_bench(
    *, models: list[str], modes: list[str], windows: int, steps: int, out: str | None
) -> str:
    """One GPU, sequence 2048, the largest micro-batch that fits: lmforge's trainer in eager
    bf16, with torch.compile per block, and with compile and float8 matmuls; tokens/s (median
    of the windows), MFU against the datasheet's bf16 peak, and the peak memory next to the
    estimate."""
    require_cuda()
    name = torch.cuda.get_device_name()
    peak, src = peak_flops(torch.device("cuda"), torch.bfloat16)
    lines = [
        f"lmforge bench --gpu: {name}, torch {torch.__version__}, seq {GPU_SEQ_LEN}, vocab "
        f"{GPU_VOCAB}, {windows} windows of {steps} steps after {WARMUP} warm-up; MFU against "
        f"{peak / 1e12:.0f} TFLOP/s ({src}, bf16 dense); {time.strftime('%Y-%m-%d')}",
        "",
        "| model | params | mode | micro-batch | tokens/s (spread) | MFU | peak GiB | estimate GiB "
        "| data / fwd+bwd / optim / other |",
        "|---|---|---|---|---|---|---|---|---|",
    ]
    print("\n".join(lines), flush=True)
    for preset in models:
        cfg = _model_cfg(preset, vocab=GPU_VOCAB, seq_len=GPU_SEQ_LEN)
        fpt = flops_per_token(cfg, GPU_SEQ_LEN)
        mb = largest_micro_batch(cfg, GPU_SEQ_LEN)
        for mode in modes:
            precision, compiled = GPU_MODES[mode]
            torch.cuda.reset_peak_memory_stats()
            try:
                cand = lmforge_candidate(
                    cfg, precision, compile=compiled, seq_len=GPU_SEQ_LEN, micro_batch=mb
                )
                times, _ = interleave([cand], windows=windows, steps=steps, warmup=WARMUP)
            except Exception as error:  # a mode this GPU or build cannot run: say so, go on
                row = f"| {preset} | | {mode} | {mb} | failed: {str(error).splitlines()[0][:160]} |"
                lines.append(row)
                print(row, flush=True)
                continue
            tps = [mb * GPU_SEQ_LEN / t for t in times[cand.name]]
            med = statistics.median(tps)
            cand.trainer.clock.sync = True  # one more window, waiting at each phase: the split
            cand.run(steps)
            split = cand.split()
            row = (
                f"| {preset} | {param_counts(cfg)['total'] / 1e9:.2f}B | {mode} | {mb} "
                f"| {med:,.0f} ({min(tps) / med - 1:+.0%}/{max(tps) / med - 1:+.0%}) "
                f"| {med * fpt / peak:.1%} "
                f"| {torch.cuda.max_memory_allocated() / 2**30:.1f} "
                f"| {_estimate(cfg, mb, GPU_SEQ_LEN) / 2**30:.1f} | "
                + " / ".join(
                    f"{split[f'time_{k}']:.3f}" for k in ("data", "fwd_bwd", "optim", "other")
                )
                + " |"
            )
            lines.append(row)
            print(row, flush=True)
            del cand
            torch.cuda.empty_cache()
    return _finish(lines, out)


def parse_strategies(spec: str, nproc: int) -> list[tuple[str, int]]:
    """``ddp:1,fsdp,zero2`` -> [("ddp", 1), ("fsdp", nproc), ("zero2", nproc)]."""
    out = []
    for item in spec.split(","):
        name, _, count = item.partition(":")
        out.append((name, int(count) if count else nproc))
    return out


def _gib(n: float) -> str:
    return f"{n / 2**30:.2f}"


def run_strategy_bench(
    *,
    data: str,
    strategies: list[tuple[str, int]],
    models: list[str] | None,
    precisions: list[str],
    steps: int,
    seq_len: int | None = None,
    micro_batch: int | None = None,
    tensor_peak: bool = False,
    out: str | None,
) -> str:
    """Each (model, parallel preset, process count, dtype): a real `lmforge pretrain` on
    prepared ``data`` (``models`` None: the demo model of configs/pretrain/demo.yaml, else
    presets of configs/model), ``steps`` steps whose first quarter (at least one) is not timed.
    Reports tokens/s and MFU (the mean of the timed rows), the step's time split, and the
    measured peak memory of the largest rank next to the run's estimate (memory.json: what the
    process held before the model, plus the estimate of what training adds). ``tensor_peak``:
    glibc maps every allocation of 1 MiB or more on its own and unmaps it when freed, so the
    resident set's high-water mark follows the live tensors, which the estimate counts, rather
    than the heap glibc keeps for reuse (slower steps)."""
    here = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    skip = max(1, steps // 4)
    shape = (f", seq {seq_len}" if seq_len else "") + (
        f", micro-batch {micro_batch} per rank" if micro_batch else ""
    )
    env = dict(os.environ)
    if tensor_peak:  # a fixed threshold also stops glibc from raising it as blocks are freed
        env["MALLOC_MMAP_THRESHOLD_"] = str(2**20)
        shape += ", peaks of live tensors (--tensor-peak: tokens/s slower than normal)"
    lines = [
        f"lmforge bench --strategies: {'demo model' if models is None else ', '.join(models)} "
        f"on {data}{shape}, {steps} steps (the first {skip} not timed), "
        f"{platform.machine()}, {os.cpu_count()} cores, torch {torch.__version__}, "
        f"{time.strftime('%Y-%m-%d')}",
        "",
        "| model | strategy | procs | dtype | tokens/s | vs first strategy | MFU "
        "| s/step: data / fwd+bwd / optim / other | peak GiB/rank | estimate GiB (runtime + "
        "training) | training measured/estimate |",
        "|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    print("\n".join(lines), flush=True)
    with tempfile.TemporaryDirectory(prefix="lmforge-bench-") as runs:
        for model in models or [None]:
            for precision in precisions:
                base: float | None = None  # the first strategy of this model and precision
                for name, nproc in strategies:
                    run = f"{model or 'demo'}-{name}-{nproc}-{precision}"
                    overrides = [
                        f"parallel={os.path.join(here, 'configs', 'parallel', name + '.yaml')}",
                        f"data.path={data}", f"runs_dir={runs}", f"name={run}",
                        f"train.max_steps={steps}", f"train.precision={precision}",
                        "train.log_interval=1", "train.eval_interval=0", "checkpoint.interval=0",
                        "logging.progress=false", "logging.tensorboard=false",
                        "logging.plot=false",
                    ]  # fmt: skip
                    if model is not None:
                        overrides.append(
                            f"model={os.path.join(here, 'configs', 'model', model + '.yaml')}"
                        )
                    if seq_len:
                        overrides += [f"train.seq_len={seq_len}", f"model.max_seq_len={seq_len}"]
                    if micro_batch:
                        overrides.append(f"train.micro_batch_size={micro_batch}")
                    if seq_len or micro_batch:  # one micro-batch per rank and step
                        per_rank = (seq_len or 256) * (micro_batch or 8)
                        overrides += [
                            f"train.global_batch_tokens={per_rank * nproc}",
                            f"train.eval_samples={(micro_batch or 8) * nproc}",
                        ]
                    cmd = [
                        sys.executable, "-m", "lmforge.launcher.cli", "pretrain",
                        os.path.join(here, "configs", "pretrain", "demo.yaml"), *overrides,
                        "--nproc", str(nproc),
                    ]  # fmt: skip
                    proc = subprocess.run(cmd, capture_output=True, text=True, env=env)
                    if proc.returncode != 0:
                        row = f"| {model or 'demo'} | {name} | {nproc} | {precision} | failed: "
                        row += (proc.stderr.strip().splitlines() or ["?"])[-1][:200] + " |"
                        lines.append(row)
                        print(row, flush=True)
                        continue
                    row = _strategy_row(os.path.join(runs, run), skip)
                    base = base or row["tps"]
                    runtime, estimate = row["runtime"], row["estimate"]
                    text = (
                        f"| {model or 'demo'} | {name} | {nproc} | {precision} "
                        f"| {row['tps']:,.0f} | {row['tps'] / base:.2f} | {row['mfu']:.1%} "
                        f"| {row['split']} | {_gib(row['peak'])} "
                        f"| {_gib(runtime + estimate)} ({_gib(runtime)} + {_gib(estimate)}) "
                        f"| {(row['peak'] - runtime) / estimate:.2f} |"
                    )
                    lines.append(text)
                    print(text, flush=True)
    return _finish(lines, out)


def _strategy_row(run_dir: str, skip: int) -> dict:
    """The figures of one benchmark run: its timed rows' means and its memory."""
    with open(os.path.join(run_dir, "metrics.jsonl")) as f:
        rows = [json.loads(line) for line in f]
    timed = [r for r in rows if r["kind"] == "train" and r["step"] > skip]
    with open(os.path.join(run_dir, "memory.json")) as f:
        memory = json.load(f)

    def mean(key: str) -> float:
        return statistics.fmean(r[key] for r in timed)

    # tokens over time (not the mean of the rows' rates, which a slow step would weigh less)
    previous = {r["step"]: r["tokens"] for r in rows if r["kind"] == "train"}
    tokens = [r["tokens"] - previous.get(r["step"] - 1, 0) for r in timed]
    seconds = sum(n / r["tokens_per_sec"] for n, r in zip(tokens, timed, strict=True))
    tps = sum(tokens) / seconds
    return {
        "tps": tps,
        "mfu": tps * timed[0]["mfu"] / timed[0]["tokens_per_sec"],
        "split": " / ".join(
            f"{mean(f'time_{k}'):.2f}" for k in ("data", "fwd_bwd", "optim", "other")
        ),
        "peak": max(r["peak_mem_gb"] for r in rows if r["kind"] == "train") * 2**30,
        "runtime": memory["runtime_bytes_before_model"],
        "estimate": memory["estimate_bytes"]["total"],
    }
