"""FLOP accounting: parameter counts, training FLOPs per token, peak FLOP/s, MFU.

The convention of every FLOP count lmforge reports (metrics, MFU, scaling plans), from PaLM
(Chowdhery et al. 2022, appendix B) and nanoGPT's `GPT.estimate_mfu`: training (forward +
backward) FLOPs per token are

    6·N + 12·L·d_attn·T

- N: all parameters except embedding tables used only for input (an untied input table is a
  lookup, not a matmul); the LM head counts; a tied table counts once, as the LM head.
  Each such weight costs 2 FLOPs per token forward (a multiply-add) and 4 backward (gradients
  w.r.t. the input and w.r.t. the weight): 6·N.
- 12·L·d_attn·T: the two attention matmuls (QKᵀ and PV), 2·T·d_attn FLOPs each per token and
  layer forward, 3× that with backward. d_attn = n_head·head_dim. The full T×T score matrix is
  counted, not the causal half, as `torch.utils.flop_counter.FlopCounterMode` counts SDPA.

Norm weights are in N although they do no matmul (a fraction of a percent of N); element-wise
work, softmax and the loss are not counted. MFU = achieved model FLOP/s / peak FLOP/s of the device in the dtype
the matmuls run in (dense tensor-core numbers, no 2:4 sparsity).
"""

from __future__ import annotations

import contextlib
import json
import math
import os
import platform
import re
import tempfile
import time
from pathlib import Path

import torch

from lmforge.pretrain.config.schema import ModelConfig
from lmforge.pretrain.core.durable import share
from lmforge.pretrain.core.errors import ConfigurationError

# --------------------------------------------------------------------------------------------
# parameter counts and FLOPs per token
# --------------------------------------------------------------------------------------------


def param_counts(cfg: ModelConfig) -> dict[str, int]:
    """Parameter counts of `pretrain.model.transformer.GPT(cfg)`, analytically (no model is built).

    - ``total``: every parameter, a tied table once (== ``GPT.num_params()``).
    - ``embedding``: the input embedding table, V·d.
    - ``non_embedding``: ``total - embedding``, always, tied or not. For a tied model this also
      removes the LM head, which shares that table, and equals ``blocks``.
    - ``flops_params``: N of the FLOPs convention: ``total`` minus the input table only when it
      is NOT tied (a tied table is the LM head, a matmul, so it stays)
      (== ``GPT.num_params(exclude_embedding=True)``). For an untied model it equals
      ``non_embedding``.
    - ``blocks``: the transformer blocks plus the final norm, i.e. without the input table and
      without the LM head: independent of the vocabulary (Kaplan et al.'s "non-embedding N",
      and the size the presets in configs/model are named by).
    """
    if cfg.vocab_size is None:
        raise ConfigurationError(
            "model.vocab_size is not set; it normally comes from the prepared data"
        )
    d, hd, L = cfg.d_model, cfg.head_size, cfg.n_layer
    attention = d * cfg.n_head * hd * 2 + d * cfg.kv_heads * hd * 2  # wq, wo + wk, wv
    if cfg.qkv_bias:
        attention += (cfg.n_head + 2 * cfg.kv_heads) * hd
    feed_forward = 3 * d * cfg.hidden_dim  # w1, w2, w3
    norms = 2 * d + (2 * hd if cfg.qk_norm else 0)  # attention_norm, ffn_norm (q_norm, k_norm)
    embedding = cfg.vocab_size * d
    lm_head = 0 if cfg.tie_embeddings else cfg.vocab_size * d
    blocks = L * (attention + feed_forward + norms) + d  # + final norm
    total = embedding + blocks + lm_head
    return {
        "total": total,
        "embedding": embedding,
        "non_embedding": total - embedding,
        "flops_params": total if cfg.tie_embeddings else total - embedding,
        "blocks": blocks,
    }


def flops_per_token(cfg: ModelConfig, seq_len: int, *, n_out: int | None = None) -> int:
    """Training (forward + backward) FLOPs per token at context length `seq_len`:
    6·N + 12·L·d_attn·T (PaLM appendix B; nanoGPT `estimate_mfu`). See the module docstring.

    ``n_out``: the output layer is a task head of that width instead of the LM head (a
    classifier); N then counts d·n_out for it instead of d·vocab."""
    n = param_counts(cfg)["flops_params"]
    if n_out is not None:
        n += cfg.d_model * (n_out - cfg.vocab_size)  # (a task head is never tied)
    d_attn = cfg.n_head * cfg.head_size
    return 6 * n + 12 * cfg.n_layer * d_attn * seq_len


def trained_flops_per_token(model, seq_len: int) -> int:
    """Training FLOPs per token of a GPT in which only some weights train (finetuning with a
    frozen trunk or LoRA adapters), counted from the model's ``requires_grad`` flags by the same
    convention: every weight costs 2 FLOPs a token forward; backward, 2 for each weight the
    gradient passes through (the blocks from the lowest one that holds a trainable weight up, and
    the head above them) and 2 for each trainable weight; attention 4·d_attn·T a layer forward and 8·d_attn·T
    a layer backward where the gradient passes. With everything trainable this is
    ``flops_per_token`` exactly (6·N + 12·L·d_attn·T); a frozen trunk costs about 2·N, LoRA
    about 4·N. Within the lowest trainable block the input gradients are counted whole, though
    autograd may skip some (e.g. a LoRA layer's frozen neighbours): an overestimate of at most
    one block's backward.

    ``model``: a ``pretrain.model.transformer.GPT``, or a peft wrapper of one (adapters count as weights)."""
    gpt = model.base_model.model if hasattr(model, "peft_config") else model
    cfg = gpt.cfg

    def size(params) -> int:
        return sum(p.numel() for p in params)

    blocks = [list(layer.parameters()) for layer in gpt.layers]
    head = [*gpt.norm.parameters(), *gpt.output.parameters()]  # a tied table is here once
    table = gpt.tok_embeddings.weight
    trainable = [p for p in (*[p for b in blocks for p in b], *head) if p.requires_grad]
    L = len(blocks)
    if table.requires_grad:  # the gradient reaches the input table: through every block
        lowest = 0
    else:
        lowest = next((i for i, b in enumerate(blocks) if any(p.requires_grad for p in b)), L)
    d_attn = cfg.n_head * cfg.head_size
    forward = 2 * (size(head) + sum(map(size, blocks))) + 4 * L * d_attn * seq_len
    backward_input = 0  # only the head trains: no gradient is needed below its weight
    if lowest < L:
        backward_input = 2 * (size(head) + sum(map(size, blocks[lowest:])))
        backward_input += 8 * (L - lowest) * d_attn * seq_len
    return forward + backward_input + 2 * size(trainable)


def mfu(tokens_per_sec_per_device: float, flops_per_token: float, peak: float) -> float:
    """Model FLOPs utilisation, a fraction: achieved model FLOP/s of one device over its peak.

    Uses the model's FLOPs (``flops_per_token``), not the hardware's: recomputation for
    activation checkpointing does not count, as in PaLM."""
    return tokens_per_sec_per_device * flops_per_token / peak


# --------------------------------------------------------------------------------------------
# peak FLOP/s
# --------------------------------------------------------------------------------------------

# Dense (no 2:4 sparsity) peak FLOP/s per matmul dtype. Datasheets print the sparse number
# with an asterisk; these are half of it. "tf32" is fp32 matmuls on tensor cores (what torch
# runs when TF32 is allowed); "fp32" is the plain CUDA-core rate. The first pattern that matches
# the lower-cased device name wins, so more specific names come first ("h100.*nvl" before
# "h100"; "\bl4\b" so that an L40 is not taken for an L4).
# Sources (NVIDIA datasheets / whitepapers):
# - H100 SXM / PCIe / NVL: https://www.nvidia.com/en-us/data-center/h100/ (H100 datasheet)
# - H200 (SXM) / H200 NVL: https://www.nvidia.com/en-us/data-center/h200/
# - A100 (SXM and PCIe): https://www.nvidia.com/en-us/data-center/a100/ (A100 datasheet)
# - A10G (AWS G5 only; not the A10, which has 125 TFLOP/s bf16): NVIDIA publishes no datasheet
#   for it; figures as AWS quotes them, collected in
#   https://www.baseten.co/blog/nvidia-a10-vs-a10g-for-ml-model-inference/
# - L4: NVIDIA L4 datasheet; L40S: NVIDIA L40S datasheet
# - RTX 4090: NVIDIA Ada Lovelace architecture whitepaper, appendix A (fp16/bf16 tensor with
#   fp32 accumulate, the rate mixed-precision training gets; fp16 accumulate is 2x)
# - V100 SXM2 / PCIe: NVIDIA V100 datasheet (tensor cores do fp16 only: no bf16, no tf32)
# Cross-checked against torchtitan `get_peak_flops` and nanochat's table (bf16 entries).
_E12 = 1e12
PEAK_FLOPS_TABLE: tuple[tuple[str, str, dict[str, float]], ...] = (
    # (regex searched in the lower-cased device name, display name, {dtype: FLOP/s})
    (r"h100.*nvl", "H100 NVL", {"bf16": 835 * _E12, "fp16": 835 * _E12, "tf32": 417.5 * _E12, "fp32": 60 * _E12}),
    (r"h100.*pcie", "H100 PCIe", {"bf16": 756 * _E12, "fp16": 756 * _E12, "tf32": 378 * _E12, "fp32": 51 * _E12}),
    ("h100", "H100 SXM", {"bf16": 989 * _E12, "fp16": 989 * _E12, "tf32": 494.5 * _E12, "fp32": 67 * _E12}),
    (r"h200.*nvl", "H200 NVL", {"bf16": 835 * _E12, "fp16": 835 * _E12, "tf32": 417.5 * _E12, "fp32": 60 * _E12}),
    ("h200", "H200", {"bf16": 989 * _E12, "fp16": 989 * _E12, "tf32": 494.5 * _E12, "fp32": 67 * _E12}),
    ("a100", "A100", {"bf16": 312 * _E12, "fp16": 312 * _E12, "tf32": 156 * _E12, "fp32": 19.5 * _E12}),
    ("a10g", "A10G", {"bf16": 70 * _E12, "fp16": 70 * _E12, "tf32": 35 * _E12, "fp32": 35 * _E12}),
    ("l40s", "L40S", {"bf16": 362 * _E12, "fp16": 362 * _E12, "tf32": 183 * _E12, "fp32": 91.6 * _E12}),
    (r"\bl4\b", "L4", {"bf16": 121 * _E12, "fp16": 121 * _E12, "tf32": 60 * _E12, "fp32": 30.3 * _E12}),
    (r"4090", "RTX 4090", {"bf16": 165.2 * _E12, "fp16": 165.2 * _E12, "tf32": 82.6 * _E12, "fp32": 82.6 * _E12}),
    ("v100-pcie", "V100 PCIe", {"fp16": 112 * _E12, "fp32": 14 * _E12}),
    ("v100", "V100 SXM2", {"fp16": 125 * _E12, "fp32": 15.7 * _E12}),
)  # fmt: skip

_DTYPE_KEYS = {torch.bfloat16: "bf16", torch.float16: "fp16", torch.float32: "fp32"}


def _tf32_enabled() -> bool:
    """Whether fp32 matmuls on CUDA run on tensor cores (TF32)."""
    return (
        torch.backends.cuda.matmul.allow_tf32 or torch.get_float32_matmul_precision() != "highest"
    )


def lookup_peak_flops(device_name: str, dtype: torch.dtype) -> tuple[float, str] | None:
    """Table peak FLOP/s for a GPU name as `torch.cuda.get_device_name()` reports it
    (e.g. "NVIDIA H100 80GB HBM3", "NVIDIA A100-SXM4-80GB", "Tesla V100-SXM2-16GB").

    Returns (FLOP/s, display name), or None when the GPU or the dtype on it is unknown (e.g.
    bf16 on a V100, which only emulates it). fp32 maps to the TF32 rate when TF32 is enabled.
    """
    key = _DTYPE_KEYS.get(dtype)
    if key == "fp32" and _tf32_enabled():
        key = "tf32"
    name = device_name.lower()
    for pattern, display, peaks in PEAK_FLOPS_TABLE:
        if re.search(pattern, name):
            return (peaks[key], display) if key in peaks else None
    return None


def _cache_file() -> Path:
    root = os.environ.get("LMFORGE_CACHE") or os.path.join(Path.home(), ".cache", "lmforge")
    return Path(root) / "peak_flops.json"


def device_name(device: torch.device) -> str:
    """A stable name of the hardware behind `device` (the CPU model for CPUs)."""
    if device.type == "cuda":
        return torch.cuda.get_device_name(device)
    if device.type == "cpu":
        with contextlib.suppress(OSError):
            for line in Path("/proc/cpuinfo").read_text().splitlines():
                if line.startswith("model name"):
                    return "cpu:" + line.split(":", 1)[1].strip()
        return "cpu:" + (platform.processor() or platform.machine() or "unknown")
    return device.type


def _synchronize(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    elif device.type != "cpu" and hasattr(torch, "accelerator"):
        torch.accelerator.synchronize()


def measure_matmul_flops(
    dtype: torch.dtype,
    device: torch.device | str,
    *,
    n: int | None = None,
    seconds: float = 0.4,
) -> float:
    """Measured matmul FLOP/s: square n×n matmuls in `dtype` on `device` for about `seconds`
    after a warm-up, with the current `torch.get_num_threads()` threads. n defaults to 2048 on
    CPU and 4096 elsewhere (small matmuls would not fill a GPU). Counts 2·n³ FLOPs a matmul."""
    device = torch.device(device)
    # 1024^3 under-reads a CPU's peak (~60% here): a training step's large matmuls then show MFU
    # above 100%. 2048^3 is within a few percent of 4096^3 and still takes well under a second.
    n = n or (2048 if device.type == "cpu" else 4096)
    # A private generator: the probe must not move the global RNG (dropout, exact resume).
    gen = torch.Generator(device=device).manual_seed(0)
    a = torch.randn(n, n, device=device, generator=gen).to(dtype)
    b = torch.randn(n, n, device=device, generator=gen).to(dtype)
    for _ in range(2):  # warm-up: thread pools, kernel selection, clocks
        torch.mm(a, b)
    _synchronize(device)
    iters, start = 0, time.perf_counter()
    while True:
        torch.mm(a, b)
        iters += 1
        if device.type == "cpu" or iters % 8 == 0:  # don't sync every launch on a GPU
            _synchronize(device)
            elapsed = time.perf_counter() - start
            if elapsed >= seconds:
                return 2.0 * n**3 * iters / elapsed


# Square sizes the in-run probe tries: a CPU's best sustained rate needs large matmuls (1024^3
# reads ~60% of it on the development machine), a GPU's larger still.
PROBE_SIZES = {"cpu": (1024, 2048, 4096), "other": (2048, 4096, 8192)}
PROBE_ENV = "LMFORGE_PEAK_PROBE"  # "run" (default): measure in this run; "cache": reuse the best


def measure_peak_matmul(
    dtype: torch.dtype,
    device: torch.device | str,
    *,
    sizes: tuple[int, ...] | None = None,
    seconds: float = 0.25,
) -> tuple[float, int]:
    """The best sustained matmul FLOP/s over several square sizes (4096 included by default),
    and the size that reached it."""
    device = torch.device(device)
    sizes = sizes or PROBE_SIZES["cpu" if device.type == "cpu" else "other"]
    rates = {n: measure_matmul_flops(dtype, device, n=n, seconds=seconds) for n in sizes}
    n = max(rates, key=rates.__getitem__)
    return rates[n], n


def _read_cache(path: Path) -> dict:
    with contextlib.suppress(OSError, ValueError):
        loaded = json.loads(path.read_text())
        return loaded if isinstance(loaded, dict) else {}
    return {}


def _write_cache(path: Path, cache: dict) -> None:
    # atomic replace: concurrent runs may probe at once, and a torn file would break them all
    tmp = None
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=".peak_flops.", suffix=".tmp")
        with os.fdopen(fd, "w") as f:
            json.dump(cache, f, indent=1, sort_keys=True)
        share(tmp)  # mkstemp makes it 0600; the cache gets the umask's mode like any file
        os.replace(tmp, path)
    except OSError:  # a read-only cache only costs the next run another probe
        if tmp is not None:
            with contextlib.suppress(OSError):
                os.unlink(tmp)


def _probe(device: torch.device, dtype: torch.dtype) -> tuple[float, str]:
    """The matmul peak of this hardware for ``dtype`` with this process's threads: measured in
    this run (``measure_peak_matmul``) and kept as the best ever measured in
    ``$LMFORGE_CACHE/peak_flops.json``. The larger of the two is the peak, so a probe that read
    low because the machine was busy (now or when the cache was written) never lowers it.
    ``LMFORGE_PEAK_PROBE=cache`` reuses a cached best without measuring (tests)."""
    key = f"{device_name(device)}|{dtype}|threads={torch.get_num_threads()}|v2"
    path = _cache_file()
    cache = _read_cache(path)
    cached = cache.get(key)
    cached = float(cached) if isinstance(cached, (int, float)) and math.isfinite(cached) else 0.0
    if os.environ.get(PROBE_ENV) == "cache" and cached > 0:
        return cached, f"probe: cached best {cached / 1e12:.3g} TFLOP/s"
    now, n = measure_peak_matmul(dtype, device)
    if now > cached:
        cache[key] = now
        _write_cache(path, cache)
        return now, f"probe: {now / 1e12:.3g} TFLOP/s at {n}^3 in this run, the best so far"
    return cached, (
        f"probe: {now / 1e12:.3g} TFLOP/s at {n}^3 in this run, below the best measured here "
        f"before ({cached / 1e12:.3g}), which is used"
    )


def peak_flops(
    device: torch.device | str, dtype: torch.dtype, *, override: float | None = None
) -> tuple[float, str]:
    """Peak FLOP/s of one device for matmuls in `dtype`, and how it was obtained.

    `override` (e.g. `train.peak_flops`) wins: ("override"). Known GPUs come from
    PEAK_FLOPS_TABLE: ("table:<gpu name>"). CPUs and unknown GPUs measure their matmul peak in
    this run (``_probe``: best of several sizes, 4096^3 included; the best ever measured on this
    hardware is kept in `$LMFORGE_CACHE/peak_flops.json`, default ~/.cache/lmforge): ("probe:
    ..." says what was measured and what was used). A probe measures what matmuls really reach,
    so MFU against it reads higher than against a datasheet peak; ranks sharing a CPU take turns
    (``RunSession``), so that each measures with the others idle.
    """
    if override is not None:
        if not (override > 0 and math.isfinite(override)):
            raise ConfigurationError(
                f"`train.peak_flops` must be a positive number, got {override}"
            )
        return float(override), "override"
    device = torch.device(device)
    if device.type == "cuda":
        hit = lookup_peak_flops(torch.cuda.get_device_name(device), dtype)
        if hit is not None:
            return hit[0], f"table:{hit[1]}"
    return _probe(device, dtype)
