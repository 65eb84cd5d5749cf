"""`lmforge bench`: tokens/s and MFU of lmforge's training step next to a minimal PyTorch loop.

Both loops train the same model (same init, same batches, same AdamW) in the same process, one
after the other; the ratio ``lmforge / minimal`` is the pipeline's overhead (Accelerate wrapper,
trainer bookkeeping, data path). MFU is against the peak of the training dtype: the GPU table, or a
matmul probe on CPUs (pretrain/flops.py). Results are printed as a markdown table.
"""

from __future__ import annotations

import json
import os
import platform
import subprocess
import sys
import tempfile
import time
from contextlib import nullcontext

import numpy as np
import torch
import torch.nn.functional as F

from pretrain.config import ModelConfig, OptimConfig, load_config
from pretrain.flops import flops_per_token, param_counts, peak_flops
from pretrain.model import GPT
from pretrain.optim import build_optimizer, build_scheduler

SEQ_LEN = 256
MICRO_BATCH = 8
VOCAB = 8192


class SyntheticBatches:
    """Random token batches with the interface of :class:`pretrain.data.TrainBatches`."""

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


def _model_cfg(preset: str) -> ModelConfig:
    here = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    path = os.path.join(here, "configs", "model", f"{preset}.yaml")
    return load_config(ModelConfig, [path, f"vocab_size={VOCAB}", f"max_seq_len={SEQ_LEN}"])


def _device() -> torch.device:
    return torch.device("cuda" if torch.cuda.is_available() else "cpu")


def _sync() -> None:
    if torch.cuda.is_available():
        torch.cuda.synchronize()


def minimal_loop(cfg: ModelConfig, precision: str, steps: int, warmup: int) -> float:
    """The baseline: a hand-written loop (model, AdamW, autocast, backward, clip, step)."""
    device = _device()
    torch.manual_seed(0)
    model = GPT(cfg).to(device)
    opt = build_optimizer(model, OptimConfig())
    batches = SyntheticBatches(micro_batch=MICRO_BATCH, seq_len=SEQ_LEN, vocab=VOCAB)
    amp = (
        torch.autocast(device.type, dtype=torch.bfloat16) if precision == "bf16" else nullcontext()
    )
    t0 = 0.0
    for i in range(warmup + steps):
        if i == warmup:
            _sync()
            t0 = time.perf_counter()
        (batch,) = batches.next_step()
        batch = {k: v.to(device, non_blocking=True) for k, v in batch.items()}
        with amp:
            logits = model(batch["input_ids"])
        loss = F.cross_entropy(logits.float().flatten(0, 1), batch["labels"].flatten())
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        opt.zero_grad(set_to_none=True)
    loss.item()
    _sync()
    return steps * MICRO_BATCH * SEQ_LEN / (time.perf_counter() - t0)


def lmforge_loop(cfg: ModelConfig, precision: str, steps: int, warmup: int) -> float:
    """lmforge's path: DDP strategy (Accelerate) + Trainer with its metrics bookkeeping."""
    from accelerate.state import AcceleratorState

    from pretrain.parallel import build_strategy
    from pretrain.trainer import Callback, Trainer

    AcceleratorState._reset_state(reset_partial_state=True)  # a new precision per case
    strategy = build_strategy(precision=precision)
    torch.manual_seed(0)
    model = GPT(cfg)
    model, opt = strategy.prepare(model, lambda m: build_optimizer(m, OptimConfig()))
    sched = build_scheduler(opt, total_steps=warmup + steps, cfg=OptimConfig(warmup_steps=0))

    class Clock(Callback):
        def on_step_end(self, trainer) -> None:
            if trainer.state.step == warmup:
                _sync()
                self.t0 = time.perf_counter()

    clock = Clock()
    fpt = flops_per_token(cfg, SEQ_LEN)
    trainer = Trainer(
        model=model,
        optimizer=opt,
        scheduler=sched,
        strategy=strategy,
        train_batches=SyntheticBatches(micro_batch=MICRO_BATCH, seq_len=SEQ_LEN, vocab=VOCAB),
        val_batches=None,
        total_steps=warmup + steps,
        tokens_per_step=MICRO_BATCH * SEQ_LEN,
        flops_per_token=fpt,
        peak_flops=1.0,
        log_interval=10,
        callbacks=[clock],
    )
    trainer.fit()
    _sync()
    return steps * MICRO_BATCH * SEQ_LEN / (time.perf_counter() - clock.t0)


def run_bench(*, models: list[str], precisions: list[str], steps: int, out: str | None) -> str:
    threads = torch.get_num_threads()
    device = _device()
    lines = [
        f"lmforge bench: {torch.cuda.get_device_name() if device.type == 'cuda' else 'CPU'} "
        f"({platform.machine()}), {threads} threads, "
        f"torch {torch.__version__}, seq {SEQ_LEN}, micro-batch {MICRO_BATCH}, vocab {VOCAB}, "
        f"{steps} timed steps after 3 warm-up, {time.strftime('%Y-%m-%d')}",
        "",
        "| model | params (non-emb) | dtype | minimal tok/s | lmforge tok/s | lmforge/minimal "
        "| minimal MFU | lmforge MFU |",
        "|---|---|---|---|---|---|---|---|",
    ]
    print("\n".join(lines), flush=True)
    for preset in models:
        cfg = _model_cfg(preset)
        counts = param_counts(cfg)
        fpt = flops_per_token(cfg, SEQ_LEN)
        for precision in precisions:
            dtype = {"fp32": torch.float32, "bf16": torch.bfloat16}[precision]
            peak, src = peak_flops(device, dtype)
            base = minimal_loop(cfg, precision, steps, warmup=3)
            ours = lmforge_loop(cfg, precision, steps, warmup=3)
            row = (
                f"| {preset} | {counts['total'] / 1e6:.2f}M ({counts['non_embedding'] / 1e6:.2f}M)"
                f" | {precision} | {base:,.0f} | {ours:,.0f} | {ours / base:.3f} "
                f"| {base * fpt / peak:.1%} | {ours * fpt / peak:.1%} |"
            )
            lines.append(row)
            print(row, f"(peak {peak / 1e9:.0f} GFLOP/s, {src})", flush=True)
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
                else nullcontext()
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


def run_strategy_bench(
    *, data: str, strategies: list[str], nproc: int, steps: int, precision: str, out: str | None
) -> str:
    """tokens/s of each parallel preset (configs/parallel/<name>.yaml) with ``nproc`` processes,
    next to DDP, each a real `lmforge pretrain` of the demo model on prepared ``data``."""
    here = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    lines = [
        f"lmforge bench --strategies: {nproc} processes, {precision}, demo model "
        f"(configs/pretrain/demo.yaml) on {data}, {steps} steps (the first 5 not timed), "
        f"{platform.machine()}, {os.cpu_count()} cores, {time.strftime('%Y-%m-%d')}",
        "",
        "| strategy | tokens/s | vs ddp | MFU |",
        "|---|---|---|---|",
    ]
    print("\n".join(lines), flush=True)
    base = None
    with tempfile.TemporaryDirectory(prefix="lmforge-bench-") as runs:
        for name in strategies:
            cmd = [
                sys.executable, "-m", "launcher.cli", "pretrain",
                os.path.join(here, "configs", "pretrain", "demo.yaml"),
                f"parallel={os.path.join(here, 'configs', 'parallel', name + '.yaml')}",
                f"data.path={data}", f"runs_dir={runs}", f"name={name}",
                f"train.max_steps={steps}", f"train.precision={precision}",
                "train.log_interval=1", "train.eval_interval=0", "checkpoint.interval=0",
                "logging.progress=false", "logging.tensorboard=false", "logging.plot=false",
                "--nproc", str(nproc),
            ]  # fmt: skip
            subprocess.run(cmd, check=True, capture_output=True, text=True)
            with open(os.path.join(runs, name, "metrics.jsonl")) as f:
                rows = [json.loads(line) for line in f]
            timed = [r for r in rows if r["kind"] == "train" and r["step"] > 5]
            tps = sum(r["tokens_per_sec"] for r in timed) / len(timed)
            mfu = sum(r["mfu"] for r in timed) / len(timed)
            base = base or tps
            row = f"| {name} | {tps:,.0f} | {tps / base:.2f} | {mfu:.1%} |"
            lines.append(row)
            print(row, flush=True)
    return _finish(lines, out)
