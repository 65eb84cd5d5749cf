"""Data parallel through Accelerate: one process, or N processes that all-reduce gradients."""

from __future__ import annotations

import contextlib
import os

import torch
from torch import nn

from lmforge.pretrain.config.layout import Layout
from lmforge.pretrain.core import dist as pdist
from lmforge.pretrain.core.errors import ConfigurationError
from lmforge.pretrain.parallel.common import (
    MakeOptimizer,
    StepShape,
    Strategy,
    apply_activation_checkpointing,
    apply_compile,
    resolve_precision,
    use_cuda,
)
from lmforge.pretrain.parallel.float8 import convert_to_float8
from lmforge.pretrain.parallel.state import load_dcp_state


def _reset_accelerate_state(*, partial: bool) -> None:
    """Accelerate keeps one state (precision; with ``partial``, also the device and process
    group) per process, and refuses a second Accelerator with another precision. Runs that
    follow each other in one process (a label curve's points; a run after one that failed
    before closing) each start from a clean one; accelerate resets it this way in its own
    tests."""
    from accelerate.state import AcceleratorState, GradientState

    AcceleratorState._reset_state(reset_partial_state=partial)
    GradientState._reset_state()


class DDPStrategy(Strategy):
    """Replicas of the whole model; Accelerate handles devices, autocast and gradient scaling."""

    name = "ddp"
    whole_model_per_rank = True

    def __init__(self, *, precision: str, layout: Layout) -> None:
        super().__init__(precision=precision, layout=layout)
        # Imported here so `lmforge --help` stays fast.
        from accelerate import Accelerator
        from accelerate.utils import InitProcessGroupKwargs

        cuda = use_cuda()
        # Deterministic cuBLAS (train.deterministic) needs this before the first CUDA call.
        os.environ.setdefault("CUBLAS_WORKSPACE_CONFIG", ":4096:8")
        self.precision = resolve_precision(precision, device_type="cuda" if cuda else "cpu")
        # fp8: the float8 layers cast their own inputs; the rest runs under bf16 autocast
        mixed = {"fp32": "no", "bf16": "bf16", "fp16": "fp16", "fp8": "bf16"}[self.precision]
        # Accelerate on CPU is silently single-process unless cpu=True: N ranks would train N
        # unsynchronised copies. The backend is named only when there are several processes
        # (else Accelerate wants a process group).
        distributed = int(os.environ.get("WORLD_SIZE", "1")) > 1
        group = InitProcessGroupKwargs(
            backend="nccl" if cuda else "gloo", timeout=pdist.collective_timeout()
        )
        _reset_accelerate_state(partial=False)  # another precision's run may have come first
        self.accelerator = Accelerator(
            cpu=not cuda, mixed_precision=mixed, kwargs_handlers=[group] if distributed else []
        )
        if int(os.environ.get("WORLD_SIZE", "1")) != self.world_size:
            raise ConfigurationError(
                f"WORLD_SIZE={os.environ.get('WORLD_SIZE')} but the process group has "
                f"{self.world_size} ranks; launch with `lmforge launch` or torchrun"
            )

    def close(self) -> None:
        super().close()
        _reset_accelerate_state(partial=True)

    device = property(lambda self: self.accelerator.device)
    rank = property(lambda self: self.accelerator.process_index)
    world_size = property(lambda self: self.accelerator.num_processes)
    is_main = property(lambda self: self.accelerator.is_main_process)

    def prepare(
        self, model: nn.Module, make_optimizer: MakeOptimizer, shape: StepShape = StepShape()
    ) -> tuple[nn.Module, torch.optim.Optimizer]:
        """Wrap ``model`` and build its optimizer with ``make_optimizer(model)``."""
        if self.precision == "fp8":
            convert_to_float8(model, fsdp=False)
        if self.activation_checkpointing:
            apply_activation_checkpointing(model)
        if self.compile_blocks:  # after checkpointing, before the DDP wrapper
            apply_compile(model)
        # Mixed precision: Accelerate wraps forward in autocast and returns fp32 outputs.
        return self.accelerator.prepare(model, make_optimizer(model))

    def unwrap(self, model: nn.Module) -> nn.Module:
        """The plain model under the DDP wrapper. (Accelerate's unwrap_model would import
        deepspeed whenever it is installed: DeepSpeed loads only for its strategies.)"""
        if isinstance(model, torch.nn.parallel.DistributedDataParallel):
            model = model.module
        return model

    def no_sync(self, model: nn.Module, *, sync: bool):
        return contextlib.nullcontext() if sync else self.accelerator.no_sync(model)

    def autocast(self):
        return self.accelerator.autocast()

    def backward(self, loss: torch.Tensor) -> None:
        self.accelerator.backward(loss)  # scales fp16 losses

    def step(self, model: nn.Module, optimizer, scheduler, *, grad_clip: float) -> torch.Tensor:
        """Clip (unscaling fp16 grads first), step optimizer and schedule, zero the grads;
        return the global gradient norm before clipping."""
        norm = self.accelerator.clip_grad_norm_(
            model.parameters(), grad_clip if grad_clip > 0 else float("inf")
        )
        optimizer.step()
        scheduler.step()
        optimizer.zero_grad(set_to_none=True)
        return norm.detach() if isinstance(norm, torch.Tensor) else torch.tensor(norm)

    def extra_state(self) -> dict:
        scaler = self.accelerator.scaler
        return {"grad_scaler": scaler.state_dict()} if scaler is not None else {}

    def load_state(self, directory: str, *, model: nn.Module, optimizer) -> None:
        extra = load_dcp_state(self, directory, model=model, optimizer=optimizer)
        if self.accelerator.scaler is not None and "grad_scaler" in extra:
            self.accelerator.scaler.load_state_dict(extra["grad_scaler"])
