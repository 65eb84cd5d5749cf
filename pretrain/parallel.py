"""Parallel strategies: the one place that knows how a model is distributed.

A :class:`Strategy` sets up the process group and device, wraps model and optimizer, runs the
backward pass and gradient clipping, and gives the checkpoint code one interface to save and load
model/optimizer state (``save_state`` / ``load_state``). The trainer calls these methods and never
branches on the strategy. deepspeed is imported only inside a DeepSpeed strategy.

Now: ``DDPStrategy`` on Accelerate (one process, or N processes of DDP; CPU with gloo, GPU with NCCL).
"""

from __future__ import annotations

import contextlib
import io
import os
from datetime import timedelta

import torch
import torch.distributed as dist
from torch import nn

from pretrain import dist as pdist
from pretrain.errors import ConfigurationError


def cpu_supports_bf16() -> bool:
    """bf16 autocast on CPU pays only with native bf16 dot products (AVX512-BF16 or AMX)."""
    try:
        with open("/proc/cpuinfo") as f:
            flags = f.read()
    except OSError:
        return False
    return "avx512_bf16" in flags or "amx_bf16" in flags


def resolve_precision(precision: str, *, device_type: str) -> str:
    """auto -> bf16 where it is fast and supported, fp16 on older GPUs, fp32 otherwise."""
    if precision == "auto":
        if device_type == "cuda":
            return "bf16" if torch.cuda.is_bf16_supported() else "fp16"
        return "bf16" if cpu_supports_bf16() else "fp32"
    if precision == "fp16" and device_type != "cuda":
        raise ConfigurationError(
            "`train.precision=fp16` needs a GPU (loss scaling on CPU is not supported); "
            "use bf16 or fp32"
        )
    return precision


class DDPStrategy:
    """Data parallel through Accelerate: one process, or N processes that all-reduce gradients."""

    name = "ddp"

    def __init__(self, *, precision: str) -> None:
        # Imported here so `lmforge --help` stays fast.
        from accelerate import Accelerator
        from accelerate.utils import InitProcessGroupKwargs

        use_cuda = torch.cuda.is_available() and os.environ.get("LMFORGE_FORCE_CPU") != "1"
        # Deterministic cuBLAS (train.deterministic) needs this before the first CUDA call.
        os.environ.setdefault("CUBLAS_WORKSPACE_CONFIG", ":4096:8")
        self.precision = resolve_precision(precision, device_type="cuda" if use_cuda else "cpu")
        mixed = {"fp32": "no", "bf16": "bf16", "fp16": "fp16"}[self.precision]
        # Accelerate on CPU is silently single-process unless cpu=True (DESIGN.md facts); the
        # backend is named only when there are several processes (else Accelerate wants a group).
        distributed = int(os.environ.get("WORLD_SIZE", "1")) > 1
        group = InitProcessGroupKwargs(
            backend="nccl" if use_cuda else "gloo", timeout=timedelta(minutes=30)
        )
        self.accelerator = Accelerator(
            cpu=not use_cuda, mixed_precision=mixed, kwargs_handlers=[group] if distributed else []
        )
        if int(os.environ.get("WORLD_SIZE", "1")) != self.world_size:
            raise ConfigurationError(
                f"WORLD_SIZE={os.environ.get('WORLD_SIZE')} but the process group has "
                f"{self.world_size} ranks; launch with `lmforge launch` or torchrun"
            )

    # --- process facts ------------------------------------------------------------------------
    @property
    def device(self) -> torch.device:
        return self.accelerator.device

    @property
    def rank(self) -> int:
        return self.accelerator.process_index

    @property
    def world_size(self) -> int:
        return self.accelerator.num_processes

    @property
    def is_main(self) -> bool:
        return self.accelerator.is_main_process

    @property
    def compute_dtype(self) -> torch.dtype:
        return {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}[
            self.precision
        ]

    # --- wrapping and the step ----------------------------------------------------------------
    def prepare(
        self, model: nn.Module, optimizer: torch.optim.Optimizer
    ) -> tuple[nn.Module, torch.optim.Optimizer]:
        # Mixed precision: Accelerate wraps forward in autocast and returns fp32 outputs.
        return self.accelerator.prepare(model, optimizer)

    def unwrap(self, model: nn.Module) -> nn.Module:
        """The plain model under DDP / torch.compile wrappers. (Accelerate's unwrap_model would
        import deepspeed whenever it is installed: DeepSpeed loads only for its strategies.)"""
        if isinstance(model, torch.nn.parallel.DistributedDataParallel):
            model = model.module
        return getattr(model, "_orig_mod", model)

    def no_sync(self, model: nn.Module, *, sync: bool):
        """Skip the gradient all-reduce on all but the last micro-batch of a step."""
        return contextlib.nullcontext() if sync else self.accelerator.no_sync(model)

    def autocast(self):
        return self.accelerator.autocast()

    def backward(self, loss: torch.Tensor) -> None:
        self.accelerator.backward(loss)

    def clip_grad_norm(self, model: nn.Module, max_norm: float) -> torch.Tensor:
        """Clip (unscaling fp16 grads first) and return the global norm before clipping."""
        norm = self.accelerator.clip_grad_norm_(
            model.parameters(), max_norm if max_norm > 0 else float("inf")
        )
        return norm.detach() if isinstance(norm, torch.Tensor) else torch.tensor(norm)

    # --- state for checkpoints ----------------------------------------------------------------
    def save_state(self, directory: str, *, model: nn.Module, optimizer, write_file) -> None:
        """Write model weights (safetensors) and optimizer state. ``write_file(name, bytes)``
        writes one file of the checkpoint durably; only rank 0 writes (DDP replicas agree)."""
        from safetensors.torch import save

        if not self.is_main:
            return
        state = _dedup_tied(self.unwrap(model).state_dict())
        write_file("model.safetensors", save(state, metadata={"format": "pt"}))
        extra = {"optimizer": optimizer.state_dict()}
        if self.accelerator.scaler is not None:
            extra["grad_scaler"] = self.accelerator.scaler.state_dict()
        buf = io.BytesIO()
        torch.save(extra, buf)
        write_file("optimizer.pt", buf.getvalue())

    def load_state(self, directory: str, *, model: nn.Module, optimizer) -> None:
        load_model_weights(self.unwrap(model), os.path.join(directory, "model.safetensors"))
        # lmforge's own file, checked against the checkpoint manifest before this call.
        extra = torch.load(
            os.path.join(directory, "optimizer.pt"), map_location="cpu", weights_only=True
        )
        optimizer.load_state_dict(extra["optimizer"])
        if self.accelerator.scaler is not None and "grad_scaler" in extra:
            self.accelerator.scaler.load_state_dict(extra["grad_scaler"])

    def close(self) -> None:
        """Leave the process group cleanly (a barrier first avoids gloo's exit-time abort)."""
        if dist.is_available() and dist.is_initialized():
            pdist.barrier()
            dist.destroy_process_group()


def _dedup_tied(state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """safetensors refuses shared storage: keep the first name of each tied tensor."""
    seen: dict[int, str] = {}
    out = {}
    for k, v in state.items():
        ptr = v.untyped_storage().data_ptr()
        if ptr in seen and v.numel() > 0:
            continue
        seen[ptr] = k
        out[k] = v.detach().contiguous().cpu()
    return out


def load_model_weights(model: nn.Module, path: str) -> None:
    """Load a safetensors file into ``model``; tied weights may appear under one name only."""
    from safetensors.torch import load_file

    state = load_file(path)
    missing, unexpected = model.load_state_dict(state, strict=False)
    tied = {n for n in missing if _is_tied(model, n)}
    missing = [n for n in missing if n not in tied]
    if missing or unexpected:
        from pretrain.errors import CheckpointError

        raise CheckpointError(
            f"{path} does not match the model: missing {missing[:3]}, unexpected {unexpected[:3]}; "
            "is model.* the same as in the run that wrote it?"
        )


def _is_tied(model: nn.Module, name: str) -> bool:
    params = dict(model.named_parameters(remove_duplicate=False))
    if name not in params:
        return False
    ptr = params[name].data_ptr()
    return any(p.data_ptr() == ptr for n, p in params.items() if n != name)


def build_strategy(*, precision: str) -> DDPStrategy:
    """The strategy for a run's config (more strategies join through the `parallel` section)."""
    return DDPStrategy(precision=precision)
