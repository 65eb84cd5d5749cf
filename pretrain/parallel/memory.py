"""Will it fit? Per-rank memory of a training layout, estimated before anything starts.

    parameters + gradients + optimizer state + activations (+ working copies)

- Parameters are fp32 master weights (4 bytes) split by tensor parallel (projections, embedding
  and head; norms are replicated), by pipeline stage (the largest stage counts), and by the data
  parallel degree under FSDP and ZeRO-3. DeepSpeed keeps bf16 parameters (2 bytes) and an fp32
  master copy in its optimizer state.
- Gradients have the parameters' size and dtype; FSDP and ZeRO-2/3 shard them.
- AdamW keeps two fp32 moments (8 bytes per parameter), sharded by FSDP and ZeRO >= 1; CPU
  offload moves them (and ZeRO-3 parameters) off the device.
- Activations are what autograd saves for backward, per token of a micro-batch, measured on this
  model (see tests/test_memory.py): a block saves about 41·d + 16·F bytes in fp32, 35·d + 8·F
  under bf16 autocast (DDP, tensor and pipeline parallel: the residual stream stays fp32) and
  21·d + 9·F where the weights themselves are bf16 (FSDP's mixed precision, DeepSpeed), with
  d = model width, F = MLP width, where the attention's width (heads × head width, hq) is d.
  A Hub family's attention of another width adds 4 tensors of hq - d per block (the queries,
  the keys and values repeated to every head, the output: 16 bytes each in fp32, 8 in bf16),
  and qk-norm keeps the queries and keys before and after their norm (hq + hkv wide, hkv the
  key-value heads' width: 8 bytes in fp32, 5.5 under autocast, 6.5 in bf16 weights). The head
  4·V + 12·d (4·V + 8·d in bf16 weights; V = vocabulary, the fp32 log-probabilities
  dominate). Activation checkpointing keeps a block's input (4·d) and recomputes one block at a
  time. Tensor parallel with sequence parallel divides a block's activations by tp except the
  gathered inputs of the projections; a 1F1B pipeline's first stage holds min(pp,
  micro-batches) micro-batches in flight, GPipe all of them.
- Working copies: autocast caches bf16 copies of the weights until backward; FSDP gathers about
  two blocks' full weights at a time; ZeRO-3 keeps up to ``stage3_max_live_parameters`` (10^9 by
  default, so the whole model at these sizes) gathered between forward and backward.
- Buffers: DeepSpeed's gradient reduction bucket under ZeRO 1-3 (``reduce_bucket_size``
  elements of the gradients' dtype, two of them with ``overlap_comm``, DeepSpeed's default at
  stage 3), sized as pretrain/parallel/zero.py configures it.

Not counted: the allocator's own overhead (on a CPU, glibc keeps freed memory of the heap for
reuse, which adds 10-55% to the resident set of these runs; on a GPU the caching allocator's
reserve), the CUDA context (~0.5-1 GiB) and temporary buffers of single kernels; hence the 10%
margin of the check.
"""

from __future__ import annotations

import contextlib
import dataclasses
import os
import re
import resource
from dataclasses import dataclass

import psutil
import torch

from lmforge.pretrain.config.layout import Layout
from lmforge.pretrain.core.errors import ConfigurationError
from lmforge.pretrain.parallel.common import resolve_precision, use_cuda
from lmforge.pretrain.parallel.zero import zero_settings

GiB = 1024**3


@dataclass
class MemoryEstimate:
    params: float
    grads: float
    optimizer: float
    activations: float
    working: float
    offloaded: float  # bytes kept in host memory instead (CPU offload)
    recompute: float = 0.0  # part of `activations`: one block recomputed in backward (AC)
    buffers: float = 0.0  # communication buffers (DeepSpeed's reduction buckets)

    @property
    def total(self) -> float:
        return (
            self.params + self.grads + self.optimizer + self.activations + self.working
        ) + self.buffers

    def need(self, device_type: str) -> float:
        """Bytes the device must hold (on a CPU, offloaded state stays in the same memory)."""
        return self.total + (self.offloaded if device_type == "cpu" else 0.0)

    def describe(self) -> str:
        parts = [
            f"params {_fmt(self.params)}",
            f"grads {_fmt(self.grads)}",
            f"optimizer {_fmt(self.optimizer)}",
            f"activations {_fmt(self.activations)}",
        ]
        if self.working:
            parts.append(f"working copies {_fmt(self.working)}")
        if self.buffers:
            parts.append(f"buffers {_fmt(self.buffers)}")
        text = ", ".join(parts) + f" = {_fmt(self.total)}"
        if self.offloaded:
            text += f" (+{_fmt(self.offloaded)} offloaded to host memory)"
        return text


def _fmt(n: float) -> str:
    for unit, size in (("GiB", GiB), ("MiB", 1024**2), ("KiB", 1024)):
        if n >= size:
            return f"{n / size:.2f} {unit}"
    return f"{n:.0f} B"


def _param_split(model) -> dict[str, int]:
    """Parameter counts by kind: what tensor parallel splits, what it replicates."""
    d, F, L, V = model.d_model, model.hidden_dim, model.n_layer, model.vocab_size
    hd = model.head_size
    attn = d * model.n_head * hd * 2 + d * model.kv_heads * hd * 2
    if model.qkv_bias:  # split with their projections
        attn += (model.n_head + 2 * model.kv_heads) * hd
    return {
        "block_split": attn + 3 * d * F,  # projections, per block
        "block_norms": 2 * d + (2 * hd if model.qk_norm else 0),  # per block
        "embedding": V * d,
        "head": 0 if model.tie_embeddings else V * d,
        "final_norm": d,
        "layers": L,
    }


def _activations_per_token(
    model, parallel, layout: Layout, *, half: bool, bf16_weights: bool, grad_accum: int
) -> tuple[float, float]:
    """Activation bytes per token of the busiest rank, and the part of them that is one block
    recomputed in backward (activation checkpointing); measured coefficients (module
    docstring)."""
    d, F, V = model.d_model, model.hidden_dim, model.vocab_size
    tp, pp = layout.tp, layout.pp
    layers = -(-model.n_layer // pp)  # blocks of the largest (first) stage
    hq, hkv = model.n_head * model.head_size, model.kv_heads * model.head_size
    if bf16_weights:
        per_block, wide, qk = 21 * d + 9 * F, 8, 6.5
    elif half:
        per_block, wide, qk = 35 * d + 8 * F, 8, 5.5
    else:
        per_block, wide, qk = 41 * d + 16 * F, 16, 8
    per_block += wide * (hq - d) + (qk * (hq + hkv) if model.qk_norm else 0)
    if tp > 1:  # sequence parallel: all but the gathered projection inputs split by tp
        gathered = 2 * d * (2 if half else 4)
        per_block = (per_block - gathered) / tp + gathered
    kept = (
        (2 if bf16_weights else 4) * d if parallel.activation_checkpointing else per_block
    )  # per block, until backward
    recompute = per_block if parallel.activation_checkpointing else 0  # one block at a time
    head = 4 * V / tp + (8 if bf16_weights else 12) * d
    if pp == 1:
        return layers * kept + recompute + head, recompute
    # the first stage holds the most micro-batches, the last one the head
    gpipe = parallel.pipeline_schedule == "gpipe"
    first = (grad_accum if gpipe else min(pp, grad_accum)) * layers * kept
    last = (grad_accum if gpipe else 1) * layers * kept + head
    return max(first, last) + recompute, recompute


def estimate_memory(
    model,
    *,
    parallel,
    world_size: int,
    precision: str,
    micro_batch_size: int,
    seq_len: int,
    grad_accum: int,
) -> MemoryEstimate:
    """Per-rank bytes of a layout on its busiest rank (``model`` is a ModelConfig with
    vocab_size set; ``precision`` is resolved: fp32, bf16, fp16 or fp8, estimated as bf16)."""
    layout = Layout(parallel, world_size)
    tp, pp, dp = layout.tp, layout.pp, layout.dp
    s = _param_split(model)
    d = model.d_model
    layers = -(-s["layers"] // pp)  # blocks of the largest (first) stage
    block = s["block_split"] / tp + s["block_norms"]
    embedding, head = s["embedding"] / tp, s["head"] / tp + s["final_norm"]
    if pp == 1:
        n_local = layers * block + embedding + head
    else:  # the first stage holds the embeddings, the last one (fewest blocks) the head
        n_local = max(layers * block + embedding, (s["layers"] // pp) * block + head)

    ds = layout.strategy == "deepspeed"
    half = precision in ("bf16", "fp16", "fp8")  # fp8: bf16 copies (float8 ones are smaller)
    param_bytes = 2 if (ds and half) else 4
    # FSDP's mixed precision and DeepSpeed compute with bf16 weights, the others under autocast
    bf16_weights = half and (ds or layout.fsdp)

    params = n_local * param_bytes / (dp if layout.shards_params else 1)
    grads = n_local * param_bytes / (dp if layout.shards_grads else 1)
    optim_per_param = 8 + (4 if ds else 0)  # + DeepSpeed's fp32 master partition
    optimizer = n_local * optim_per_param / (dp if layout.shards_optimizer else 1)
    offloaded = 0.0
    if ds and parallel.offloads_optimizer:
        offloaded += optimizer
        optimizer = 0.0
    if ds and parallel.offloads_params:
        offloaded += params
        params = 0.0

    tokens = micro_batch_size * seq_len
    per_token, recompute = _activations_per_token(
        model, parallel, layout, half=half, bf16_weights=bf16_weights, grad_accum=grad_accum
    )
    activations = tokens * per_token

    working, buffers = 0.0, 0.0
    if ds and layout.zero_stage >= 1:
        total = s["layers"] * (s["block_split"] + s["block_norms"])
        total += s["embedding"] + s["head"] + s["final_norm"]
        zero = zero_settings(parallel, int(total), hidden_size=d)
        if zero.get("contiguous_gradients", True) is not False or layout.zero_stage == 3:
            bucket = _number(zero.get("reduce_bucket_size"))
            overlap = zero.get("overlap_comm", layout.zero_stage == 3)
            buffers = bucket * param_bytes * (2 if overlap is True else 1)
        if layout.zero_stage == 3:  # parameters stay gathered up to max_live_parameters
            live = _number(zero.get("stage3_max_live_parameters"), default=1e9)
            working = min(n_local, live) * param_bytes
    elif layout.shards_params:  # about two blocks gathered at a time, in the compute dtype
        working = 2 * block * (2 if half else 4)
    elif half and not ds:  # autocast's bf16 copies of the matmul weights, held until backward
        # (checkpointed blocks drop theirs and cast again when recomputed); the head is V*d
        cached_blocks = 0 if parallel.activation_checkpointing else layers * s["block_split"]
        working = 2 * (cached_blocks + s["embedding"]) / tp
    return MemoryEstimate(
        params, grads, optimizer, activations, working, offloaded, tokens * recompute, buffers
    )


def _number(value, default: float = 0.0) -> float:
    """A DeepSpeed setting that may be absent or a placeholder such as "auto"."""
    return (
        float(value) if isinstance(value, (int, float)) and not isinstance(value, bool) else default
    )


def device_memory(device_type: str, *, local_ranks: int) -> tuple[float, str]:
    """Bytes one rank may use, and where the figure comes from."""
    if device_type == "cuda":
        import torch

        free, total = torch.cuda.mem_get_info()
        return float(total), f"{torch.cuda.get_device_name()} memory"
    try:
        total = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")
    except (ValueError, OSError, AttributeError):
        return float("inf"), "unknown host memory"
    return total / max(local_ranks, 1), f"host memory / {local_ranks} local rank(s)"


def check_fits(
    estimate: MemoryEstimate, *, available: float, source: str, device_type: str, suggest
) -> None:
    """Refuse a layout whose estimate exceeds 90% of what a rank has; ``suggest()`` names a
    layout that fits (or None)."""
    if estimate.need(device_type) <= 0.9 * available:
        return
    hint = suggest()
    raise ConfigurationError(
        f"estimated memory per rank {_fmt(estimate.need(device_type))} "
        f"({estimate.describe()}) exceeds 90% of {_fmt(available)} ({source}); "
        + (f"try {hint}" if hint else "use more ranks, a smaller model or micro-batch")
        + " (or parallel.check_memory=false to try anyway)"
    )


def suggest_layout(
    model,
    *,
    parallel,
    world_size: int,
    precision: str,
    micro_batch_size: int,
    seq_len: int,
    grad_accum: int,
    available: float,
    device_type: str,
) -> str | None:
    """The first of a few standard remedies whose estimate fits, as overrides to add."""
    ac = {"activation_checkpointing": True}
    fsdp = {"strategy": "fsdp", "tensor_parallel": parallel.tensor_parallel}
    offload = {
        "strategy": "deepspeed",
        "zero_stage": 3,
        "offload_optimizer": True,
        "offload_params": True,
        **ac,
    }
    candidates = [
        (ac, micro_batch_size),
        (fsdp, micro_batch_size),
        ({**fsdp, **ac}, micro_batch_size),
    ]
    if world_size > 1 and parallel.tensor_parallel == 1 and device_type == "cuda":
        candidates.append((offload, micro_batch_size))  # on a CPU, offloading gains nothing
    mb = micro_batch_size
    while mb > 1:
        mb //= 2
        candidates.append(({**fsdp, **ac}, mb))
    plain = {
        "zero_stage": None,
        "offload_optimizer": False,
        "offload_params": False,
        "deepspeed_config": None,
        "pipeline_parallel": 1,
    }
    for changes, micro in candidates:
        keep = {} if "strategy" not in changes else plain
        try:
            candidate = dataclasses.replace(parallel, **{**keep, **changes})
        except ConfigurationError:
            continue
        est = estimate_memory(
            model,
            parallel=candidate,
            world_size=world_size,
            precision=precision,
            micro_batch_size=micro,
            seq_len=seq_len,
            grad_accum=max(1, grad_accum * micro_batch_size // micro),
        )
        if est.need(device_type) <= 0.9 * available:
            words = [
                f"parallel.{k}={str(v).lower()}"
                for k, v in changes.items()
                if getattr(parallel, k) != v
            ]
            if micro != micro_batch_size:
                words.append(f"train.micro_batch_size={micro}")
            return " ".join(words) + f" (estimated {_fmt(est.need(device_type))} per rank)"
    return None


def plan_memory(
    model,
    *,
    layout: Layout,
    precision: str,
    micro_batch_size: int,
    seq_len: int,
    grad_accum: int,
    local_ranks: int,
) -> tuple[MemoryEstimate, float, str]:
    """The estimate of a run (``model``: its ModelConfig, vocab_size set; ``precision`` as
    configured, auto resolved here) on ``layout``, with what one rank has; raises
    ConfigurationError when it does not fit (unless parallel.check_memory=false)."""
    device_type = "cuda" if use_cuda() else "cpu"
    args = dict(
        world_size=layout.world_size,
        precision=resolve_precision(precision, device_type=device_type),
        micro_batch_size=micro_batch_size,
        seq_len=seq_len,
        grad_accum=grad_accum,
    )
    parallel = layout.parallel
    estimate = estimate_memory(model, parallel=parallel, **args)
    available, source = device_memory(device_type, local_ranks=local_ranks)
    if parallel.check_memory:
        check_fits(
            estimate,
            available=available,
            source=source,
            device_type=device_type,
            suggest=lambda: suggest_layout(
                model, parallel=parallel, available=available, device_type=device_type, **args
            ),
        )
    return estimate, available, source


# --- what a process really holds -----------------------------------------------------------------


def current_memory(device: torch.device) -> float:
    """Bytes this process holds now: GPU allocations, or the resident set on a CPU."""
    if device.type == "cuda":
        return float(torch.cuda.memory_allocated(device))
    return float(psutil.Process().memory_info().rss)


def reset_peak_memory(device: torch.device) -> None:
    """Start the peak of :func:`peak_memory` again from what the process holds now (e.g. after
    the matmul probe, whose buffers are freed but would stay in the high-water mark)."""
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
        return
    with contextlib.suppress(OSError):  # Linux: "5" resets the resident set's high-water mark
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")


def peak_memory(device: torch.device) -> float:
    """This process's peak memory in bytes since the start or :func:`reset_peak_memory`: the
    device's allocations on a GPU, the resident set's high-water mark on a CPU."""
    if device.type == "cuda":
        return float(torch.cuda.max_memory_allocated(device))
    with contextlib.suppress(OSError):
        with open("/proc/self/status") as f:
            found = re.search(r"^VmHWM:\s+(\d+) kB", f.read(), re.MULTILINE)
        if found:
            return float(found.group(1)) * 1024
    return float(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss) * 1024  # KiB on Linux
