"""What every strategy shares: precision, devices, process groups, and the abstract base class
:class:`Strategy`, whose ``forward_backward`` runs one optimizer step's micro-batches (pipeline
parallelism overrides it)."""

from __future__ import annotations

import contextlib
import faulthandler
import os
import sys
import threading
from abc import ABC, abstractmethod
from collections.abc import Callable
from dataclasses import dataclass

import torch
import torch.distributed as dist
from torch import nn
from torch.optim.lr_scheduler import LRScheduler
from torch.utils.checkpoint import checkpoint

from lmforge.pretrain.config.layout import Layout
from lmforge.pretrain.core import dist as pdist
from lmforge.pretrain.core.durable import Digests
from lmforge.pretrain.core.errors import ConfigurationError
from lmforge.pretrain.model.loss import Batch, LossFn
from lmforge.pretrain.parallel.float8 import check_float8
from lmforge.pretrain.parallel.state import WriteFile, save_dcp_state, start_dcp_save

# The compute dtype of each precision (fp8: bf16 outside the float8 matmuls; parallel/float8.py).
DTYPES = {
    "fp32": torch.float32,
    "bf16": torch.bfloat16,
    "fp16": torch.float16,
    "fp8": torch.bfloat16,
}


def cpu_supports_bf16() -> bool:
    """bf16 autocast on CPU pays only with native bf16 dot products (AVX512-BF16 or AMX)."""
    try:
        with open("/proc/cpuinfo") as f:
            flags = f.read()
    except OSError:
        return False
    return "avx512_bf16" in flags or "amx_bf16" in flags


def resolve_precision(precision: str, *, device_type: str) -> str:
    """auto -> bf16 where it is fast and supported, fp16 on older GPUs, fp32 otherwise; fp8
    only where float8 training runs (else one line saying why not)."""
    if precision == "auto":
        if device_type == "cuda":
            return "bf16" if torch.cuda.is_bf16_supported() else "fp16"
        return "bf16" if cpu_supports_bf16() else "fp32"
    if precision == "fp16" and device_type != "cuda":
        raise ConfigurationError(
            "`train.precision=fp16` needs a GPU (loss scaling on CPU is not supported); "
            "use bf16 or fp32"
        )
    if precision == "fp8":
        check_float8(device_type)
    return precision


def use_cuda() -> bool:
    return torch.cuda.is_available() and os.environ.get("LMFORGE_FORCE_CPU") != "1"


def single_process_env() -> None:
    """Rank variables for a process that was not started by a launcher (world size 1)."""
    for key, default in (
        ("RANK", "0"),
        ("LOCAL_RANK", "0"),
        ("WORLD_SIZE", "1"),
        ("MASTER_ADDR", "127.0.0.1"),
    ):
        os.environ.setdefault(key, default)
    if "MASTER_PORT" not in os.environ:
        os.environ["MASTER_PORT"] = str(pdist.free_port())


def init_process_group(cuda: bool) -> None:
    """Join the process group described by RANK / WORLD_SIZE / MASTER_ADDR / MASTER_PORT (set by
    torchrun, `lmforge launch` or SLURM's launcher); a lone process makes a group of one."""
    if not dist.is_initialized():
        single_process_env()
        dist.init_process_group(
            backend="nccl" if cuda else "gloo",
            rank=int(os.environ["RANK"]),
            world_size=int(os.environ["WORLD_SIZE"]),
            timeout=pdist.collective_timeout(),  # parallel.timeout_s
        )


def join_process_group(precision: str) -> tuple[str, torch.device]:
    """For strategies on torch.distributed directly: join the group, pick this rank's device;
    return the resolved precision and the device."""
    cuda = use_cuda()
    # Deterministic cuBLAS (train.deterministic) needs this before the first CUDA call.
    os.environ.setdefault("CUBLAS_WORKSPACE_CONFIG", ":4096:8")
    resolved = resolve_precision(precision, device_type="cuda" if cuda else "cpu")
    init_process_group(cuda)
    return resolved, local_device(cuda)


def local_device(cuda: bool) -> torch.device:
    if not cuda:
        return torch.device("cpu")
    local = int(os.environ.get("LOCAL_RANK", "0"))
    torch.cuda.set_device(local)
    return torch.device("cuda", local)


def blocks(model: nn.Module) -> list[nn.Module]:
    """The transformer blocks of a model or of a pipeline stage (a ModuleDict of its blocks)."""
    layers = model.layers
    return list(layers.values()) if isinstance(layers, nn.ModuleDict) else list(layers)


def apply_activation_checkpointing(model: nn.Module) -> None:
    """Make every transformer block recompute its activations in backward (non-reentrant
    torch.utils.checkpoint; RNG state is replayed, so dropout masks match). The block's forward
    is wrapped in place: parameter names, and so checkpoints, do not change."""
    for block in blocks(model):
        inner = block.forward

        def forward(*args, _inner=inner, **kwargs):
            return checkpoint(_inner, *args, use_reentrant=False, **kwargs)

        block.forward = forward


class _CompileFallback:
    """What the compiled blocks of one model share: once a compile fails, every block runs
    eagerly (one line says so, on rank 0)."""

    def __init__(self) -> None:
        self.failed = False

    def fail(self, exc: BaseException) -> None:
        if not self.failed:
            lines = [line.strip() for line in str(exc).splitlines() if line.strip()]
            reason = (lines[0] if lines else type(exc).__name__)[:240]
            pdist.print0(
                f"warning: train.compile: torch.compile failed ({reason}); the run continues "
                "in eager mode"
            )
        self.failed = True


def apply_compile(model: nn.Module) -> None:
    """Compile every transformer block's forward with ``torch.compile(fullgraph=True)``: one
    graph, which the blocks share (same code, same shapes). Like activation checkpointing, the
    forward is replaced in place: parameter names, and so checkpoints, do not change. Call it
    after tensor parallel and activation checkpointing (which it then compiles too) and before
    FSDP sharding or DDP wrapping, whose hooks stay outside the compiled graph.

    Training calls (gradients on) run compiled; evaluation and generation (no gradients, or a
    KV cache) run eagerly, sparing a second compile for what is a small share of a run. The
    first call compiles the backward with the forward, so a backend that cannot compile (no C++
    compiler for inductor on a CPU, no Triton on a GPU, an op it cannot trace) fails there; every
    block then runs eagerly for the rest of the run, with one warning line."""
    from torch.distributed._functional_collectives import AsyncCollectiveTensor

    def settled(x):
        # Tensor parallel's redistributions are asynchronous: the first block's input is the
        # embedding's pending reduce-scatter. A copy waits for it (differentiably), so that the
        # compiled graph only ever sees plain tensors (AOTAutograd mishandles the pending kind:
        # a wrong gradient for it, or a graph traced on one kind handed the other).
        return x.clone() if isinstance(x, AsyncCollectiveTensor) else x

    fallback = _CompileFallback()
    # The backward is compiled at the first call too (where a failing backend is caught); an
    # older torch without this switch compiles it at the first backward.
    eager_backward = (
        {"force_non_lazy_backward_lowering": True}
        if hasattr(torch._functorch.config, "force_non_lazy_backward_lowering")
        else {}
    )
    for block in blocks(model):
        eager = block.forward
        compiled = torch.compile(eager, fullgraph=True)

        def forward(x, cos, sin, cache=None, _eager=eager, _compiled=compiled):
            if fallback.failed or cache is not None or not torch.is_grad_enabled():
                return _eager(x, cos, sin) if cache is None else _eager(x, cos, sin, cache)
            try:
                with torch._functorch.config.patch(eager_backward):
                    return _compiled(settled(x), cos, sin)
            except torch._dynamo.exc.TorchDynamoException as exc:
                fallback.fail(exc)
                return _eager(x, cos, sin)

        block.forward = forward


# How long leaving the process group may take before the run goes on without it.
CLOSE_TIMEOUT_S = 60.0


def close_process_group(timeout_s: float = CLOSE_TIMEOUT_S) -> None:
    """Leave the process group cleanly (a barrier first avoids gloo's exit-time abort).

    Leaving a gloo group hangs now and then after a run that ended well (here about one 2-rank
    run in a few hundred on a busy CPU; torch's destroy_process_group has an open issue of this
    kind, pytorch/pytorch#75097). So on gloo the barrier and the destroy run on a thread of their
    own, and a rank still waiting after ``timeout_s`` prints where it waits (every thread's
    stack) and a line saying so, and goes on: a worker process exits next, which releases its
    peers."""
    if not (dist.is_available() and dist.is_initialized()):
        return
    if dist.get_backend() != "gloo":  # NCCL's barrier runs on the calling thread's device
        pdist.barrier()
        dist.destroy_process_group()
        return
    errors: list[BaseException] = []

    def leave() -> None:
        try:
            pdist.barrier()
            dist.destroy_process_group()
        except BaseException as exc:  # noqa: BLE001 - reported below, on the caller's thread
            errors.append(exc)

    thread = threading.Thread(target=leave, name="lmforge-close-process-group", daemon=True)
    thread.start()
    thread.join(timeout_s)
    if thread.is_alive():
        faulthandler.dump_traceback(all_threads=True)
        print(
            f"[rank {pdist.rank()}] warning: leaving the process group took over {timeout_s:.0f} "
            "s (a known intermittent hang in torch's destroy_process_group; the run itself "
            "ended well); exiting without it",
            file=sys.stderr,
            flush=True,
        )
    elif errors:
        raise errors[0]


def all_reduce_grads(params, group) -> None:
    """Average gradients over a data-parallel process group (replicas under tensor or pipeline
    parallelism), one flat buffer per dtype. DTensor gradients are reduced through their local
    shards: every replica holds the same placement, so the average of shards is the shard of
    the average."""
    grads = [p.grad for p in params if p.grad is not None]
    local = [getattr(g, "_local_tensor", g) for g in grads]
    by_dtype: dict[torch.dtype, list[torch.Tensor]] = {}
    for g in local:
        by_dtype.setdefault(g.dtype, []).append(g)
    size = dist.get_world_size(group)
    for tensors in by_dtype.values():
        flat = torch.cat([t.reshape(-1) for t in tensors])
        dist.all_reduce(flat, group=group)
        flat /= size
        offset = 0
        for t in tensors:
            t.copy_(flat[offset : offset + t.numel()].view_as(t))
            offset += t.numel()


MakeOptimizer = Callable[[nn.Module], torch.optim.Optimizer]


@dataclass(frozen=True)
class StepShape:
    """How one optimizer step is cut, for strategies that schedule it themselves (DeepSpeed's
    engine, pipeline schedules): micro-batch size per rank, micro-batches per step, and the
    gradient-norm clip."""

    micro_batch_size: int = 1
    grad_accum: int = 1
    grad_clip: float = 1.0


class Strategy(ABC):
    """How a model is distributed: the interface the trainer and the checkpoint code use.

    Every strategy is built the same way, ``Strategy(precision=..., layout=...)`` (the layout
    carries the run's ``parallel`` section): it joins the process group and picks the device,
    then sets ``device`` and ``precision`` (resolved: fp32, bf16, fp16 or fp8). Subclasses implement
    ``prepare``, ``step``, ``save_state`` and ``load_state``; the rest has defaults that suit
    most of them."""

    name: str = "base"
    device: torch.device
    precision: str
    # The unwrapped model is whole on every rank and runs a plain forward outside the training
    # step (what sampled generations during training need).
    whole_model_per_rank: bool = False
    # ``prepare`` compiles each transformer block (``train.compile``; see apply_compile).
    compile_blocks: bool = False
    # ``start_save_state`` works (``checkpoint.async_save``): the state is written through DCP.
    async_checkpoints: bool = True

    def __init__(self, *, precision: str, layout: Layout) -> None:
        self.layout = layout
        self.parallel = layout.parallel
        self.activation_checkpointing = layout.parallel.activation_checkpointing

    @property
    def rank(self) -> int:
        return dist.get_rank()

    @property
    def world_size(self) -> int:
        return dist.get_world_size()

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    @property
    def dp_rank(self) -> int:
        """This rank's index among the data-parallel replicas (which part of a batch it reads)."""
        return self.layout.dp_rank(self.rank)

    @property
    def dp_size(self) -> int:
        """The data-parallel degree: how many different micro-batches one step reads at once."""
        return self.layout.dp

    @property
    def compute_dtype(self) -> torch.dtype:
        return DTYPES[self.precision]

    # --- what each strategy must say -------------------------------------------------------------
    @abstractmethod
    def prepare(
        self, model: nn.Module, make_optimizer: MakeOptimizer, shape: StepShape = StepShape()
    ) -> tuple[nn.Module, torch.optim.Optimizer]:
        """Distribute ``model`` and build its optimizer with ``make_optimizer`` (on the
        parameters the distributed model really has); return both, wrapped as this strategy
        runs them. ``shape`` matters to strategies that schedule micro-batches."""

    @abstractmethod
    def step(
        self,
        model: nn.Module,
        optimizer: torch.optim.Optimizer,
        scheduler: LRScheduler,
        *,
        grad_clip: float,
    ) -> torch.Tensor:
        """Clip by the global gradient norm, step optimizer and schedule, zero the gradients;
        return the norm before clipping (a detached tensor)."""

    def save_state(
        self,
        directory: str,
        *,
        model: nn.Module,
        optimizer: torch.optim.Optimizer,
        write_file: Callable[[str, bytes], None],
        consolidated: bool,
    ) -> Digests | None:
        """Write model and optimizer state under ``directory`` (every rank together; small
        files through ``write_file(name, data)``, which writes and hashes them durably), and
        on rank 0 the full weights as model.safetensors when ``consolidated``. Return the
        sha256 and size of the files this rank wrote otherwise and hashed as it wrote them, or
        made durable and hashed (the manifest reads back and fsyncs any file left out).
        By default torch.distributed.checkpoint's dcp/ plus ``extra_state()`` in extra.pt."""
        return save_dcp_state(
            self,
            directory,
            model=model,
            optimizer=optimizer,
            write_file=write_file,
            extra=self.extra_state(),
            consolidated=consolidated,
        )

    @abstractmethod
    def load_state(
        self, directory: str, *, model: nn.Module, optimizer: torch.optim.Optimizer
    ) -> None:
        """Load what ``save_state`` (or another layout's strategy) wrote, resharded to this one."""

    # --- defaults --------------------------------------------------------------------------------
    def extra_state(self) -> dict:
        """The strategy's state besides model and optimizer, for extra.pt (DDP's grad scaler)."""
        return {}

    def start_save_state(
        self,
        directory: str,
        *,
        model: nn.Module,
        optimizer: torch.optim.Optimizer,
        group,
        consolidated: bool,
    ) -> Callable[[WriteFile], Digests | None]:
        """``save_state`` in two halves, for ``checkpoint.async_save`` (every rank together):
        copy the state to host memory and start writing it under ``directory`` in the
        background, collectives on ``group``; return ``finish(write_file)``, which the
        background thread calls to wait for that write and write the rest, returning what
        ``save_state`` returns (see ``pretrain.parallel.state.start_dcp_save``)."""
        if not self.async_checkpoints:
            raise ConfigurationError(
                f"parallel.strategy={self.name} has no asynchronous checkpoints; set "
                "checkpoint.async_save=false"
            )
        return start_dcp_save(
            self,
            directory,
            model=model,
            optimizer=optimizer,
            extra=self.extra_state(),
            group=group,
            consolidated=consolidated,
        )

    def unwrap(self, model: nn.Module) -> nn.Module:
        """The plain module under wrappers (DDP and engines in subclasses)."""
        return model

    def autocast(self) -> contextlib.AbstractContextManager:
        """The context the forward runs in (mixed precision where the wrapper does not cast)."""
        return contextlib.nullcontext()

    def no_sync(self, model: nn.Module, *, sync: bool) -> contextlib.AbstractContextManager:
        """Skip gradient reduction on all but the last micro-batch of a step."""
        return contextlib.nullcontext()

    def backward(self, loss: torch.Tensor) -> None:
        loss.backward()

    def forward_backward(
        self, model: nn.Module, micro_batches: list[Batch], loss_fn: LossFn
    ) -> torch.Tensor:
        """Forward and backward over one step's micro-batches (gradients accumulate, reduced on
        the last); return the mean loss, detached, on the device."""
        total = torch.zeros((), device=self.device)
        n = len(micro_batches)
        for i, batch in enumerate(micro_batches):
            batch = {k: v.to(self.device, non_blocking=True) for k, v in batch.items()}
            with self.no_sync(model, sync=i == n - 1):
                with self.autocast():
                    loss = loss_fn(model, batch)
                self.backward(loss / n)
            total += loss.detach() / n
        return total

    @torch.no_grad()
    def eval_loss(self, model: nn.Module, batch: Batch, loss_fn: LossFn) -> torch.Tensor:
        """The loss of one validation batch (no gradients)."""
        batch = {k: v.to(self.device, non_blocking=True) for k, v in batch.items()}
        with self.autocast():
            return loss_fn(model, batch).detach().float()

    @torch.no_grad()
    def eval_logits(self, model: nn.Module, batch: Batch) -> torch.Tensor:
        """The model output (B, T, n_out) of one validation batch in fp32, the same on every
        rank that reads this batch (task metrics need more than the loss)."""
        with self.autocast():
            return model(batch["input_ids"].to(self.device, non_blocking=True)).float()

    def clip_and_step(
        self,
        params,
        optimizer: torch.optim.Optimizer,
        scheduler: LRScheduler,
        *,
        grad_clip: float,
    ) -> torch.Tensor:
        """Clip by the global norm, step optimizer and schedule, zero the grads; return the norm
        before clipping. DTensor norms (FSDP, TP) are gathered to a plain tensor."""
        norm = torch.nn.utils.clip_grad_norm_(params, grad_clip if grad_clip > 0 else float("inf"))
        optimizer.step()
        scheduler.step()
        optimizer.zero_grad(set_to_none=True)
        norm = norm.full_tensor() if hasattr(norm, "full_tensor") else norm
        return norm.detach()

    def close(self) -> None:
        close_process_group()
