"""Parallel strategies: the one place that knows how a model is distributed.

Every strategy has the same small interface: it sets up the process group and device
(``device``, ``rank``, ``world_size``, ``is_main``), wraps the model and builds its optimizer
(``prepare``), runs ``no_sync`` / ``backward`` / ``step`` (clip, optimizer, schedule, zero grads),
and saves and loads model/optimizer state for the checkpoint code (``save_state`` /
``load_state``). The trainer calls these and never branches on the strategy.

- ``DDPStrategy``: replicas through Accelerate (gloo on CPU, NCCL on GPUs).
- ``FSDPStrategy``: FSDP2 ``fully_shard`` per transformer block.
- ``DeepSpeedStrategy``: a DeepSpeed engine, ZeRO 0-3 with CPU offload (deepspeed is imported
  only here).
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


def _use_cuda() -> bool:
    return torch.cuda.is_available() and os.environ.get("LMFORGE_FORCE_CPU") != "1"


def _single_process_env() -> None:
    """Rank variables for a process that was not started by a launcher (world size 1)."""
    for key, default in (
        ("RANK", "0"),
        ("LOCAL_RANK", "0"),
        ("WORLD_SIZE", "1"),
        ("MASTER_ADDR", "127.0.0.1"),
    ):
        os.environ.setdefault(key, default)
    if "MASTER_PORT" not in os.environ:
        from launcher.local import free_port

        os.environ["MASTER_PORT"] = str(free_port())


def _local_device(use_cuda: bool) -> torch.device:
    if not use_cuda:
        return torch.device("cpu")
    local = int(os.environ.get("LOCAL_RANK", "0"))
    torch.cuda.set_device(local)
    return torch.device("cuda", local)


def apply_activation_checkpointing(model: nn.Module) -> None:
    """Make every transformer block recompute its activations in backward (non-reentrant
    torch.utils.checkpoint; RNG state is replayed, so dropout masks match). The block's forward
    is wrapped in place: parameter names, and so checkpoints, do not change."""
    from torch.utils.checkpoint import checkpoint

    for block in model.layers:
        inner = block.forward

        def forward(*args, _inner=inner, **kwargs):
            return checkpoint(_inner, *args, use_reentrant=False, **kwargs)

        block.forward = forward


class DDPStrategy:
    """Data parallel through Accelerate: one process, or N processes that all-reduce gradients."""

    name = "ddp"

    def __init__(self, *, precision: str, activation_checkpointing: bool = False) -> None:
        self.activation_checkpointing = activation_checkpointing
        # Imported here so `lmforge --help` stays fast.
        from accelerate import Accelerator
        from accelerate.utils import InitProcessGroupKwargs

        use_cuda = _use_cuda()
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
        self, model: nn.Module, make_optimizer, **batch
    ) -> tuple[nn.Module, torch.optim.Optimizer]:
        """Wrap ``model`` and build its optimizer with ``make_optimizer(model)``. ``batch``
        (micro_batch_size, grad_accum, grad_clip) matters only to DeepSpeed engines."""
        if self.activation_checkpointing:
            apply_activation_checkpointing(model)
        # Mixed precision: Accelerate wraps forward in autocast and returns fp32 outputs.
        return self.accelerator.prepare(model, make_optimizer(model))

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

    # --- state for checkpoints ----------------------------------------------------------------
    def save_state(self, directory: str, *, model: nn.Module, optimizer, write_file) -> None:
        save_dcp_state(
            self,
            directory,
            model=model,
            optimizer=optimizer,
            write_file=write_file,
            extra=self._extra_state(),
        )

    def load_state(self, directory: str, *, model: nn.Module, optimizer) -> None:
        extra = load_dcp_state(self, directory, model=model, optimizer=optimizer)
        if self.accelerator.scaler is not None and "grad_scaler" in extra:
            self.accelerator.scaler.load_state_dict(extra["grad_scaler"])

    def _extra_state(self) -> dict:
        scaler = self.accelerator.scaler
        return {"grad_scaler": scaler.state_dict()} if scaler is not None else {}

    def close(self) -> None:
        close_process_group()


class FSDPStrategy:
    """FSDP2 (``fully_shard``): parameters, gradients and optimizer state sharded over all ranks.

    Each transformer block is a unit (gathered for its forward/backward, resharded after), then
    the root (embeddings, final norm, head). Mixed precision keeps fp32 master weights and
    reduces gradients in fp32; compute runs in bf16/fp16.
    """

    name = "fsdp"

    def __init__(self, *, precision: str, activation_checkpointing: bool = False) -> None:
        self.activation_checkpointing = activation_checkpointing
        use_cuda = _use_cuda()
        os.environ.setdefault("CUBLAS_WORKSPACE_CONFIG", ":4096:8")
        self.precision = resolve_precision(precision, device_type="cuda" if use_cuda else "cpu")
        if not dist.is_initialized():
            _single_process_env()  # fully_shard needs a process group even for one process
            dist.init_process_group(
                backend="nccl" if use_cuda else "gloo",
                rank=int(os.environ["RANK"]),
                world_size=int(os.environ["WORLD_SIZE"]),
                timeout=timedelta(minutes=30),
            )
        self.device = _local_device(use_cuda)
        from torch.distributed.device_mesh import init_device_mesh

        self.mesh = init_device_mesh(self.device.type, (dist.get_world_size(),))

    rank = property(lambda self: dist.get_rank())
    world_size = property(lambda self: dist.get_world_size())
    is_main = property(lambda self: dist.get_rank() == 0)
    compute_dtype = DDPStrategy.compute_dtype

    def prepare(
        self, model: nn.Module, make_optimizer, **batch
    ) -> tuple[nn.Module, torch.optim.Optimizer]:
        from torch.distributed.fsdp import MixedPrecisionPolicy, fully_shard

        model.to(self.device)
        if self.activation_checkpointing:  # before sharding, as torchtitan orders them
            apply_activation_checkpointing(model)
        policy = MixedPrecisionPolicy(param_dtype=self.compute_dtype, reduce_dtype=torch.float32)
        for block in model.layers:
            fully_shard(block, mesh=self.mesh, mp_policy=policy)
        fully_shard(model, mesh=self.mesh, mp_policy=policy)
        # The optimizer must see the sharded (DTensor) parameters that fully_shard installed.
        return model, make_optimizer(model)

    def unwrap(self, model: nn.Module) -> nn.Module:
        return getattr(model, "_orig_mod", model)  # fully_shard works in place

    @contextlib.contextmanager
    def no_sync(self, model: nn.Module, *, sync: bool):
        """Accumulate unsharded gradients locally; reduce-scatter on the last micro-batch."""
        self.unwrap(model).set_requires_gradient_sync(sync)
        yield

    def backward(self, loss: torch.Tensor) -> None:
        loss.backward()

    def step(self, model: nn.Module, optimizer, scheduler, *, grad_clip: float) -> torch.Tensor:
        norm = torch.nn.utils.clip_grad_norm_(
            model.parameters(), grad_clip if grad_clip > 0 else float("inf")
        )
        optimizer.step()
        scheduler.step()
        optimizer.zero_grad(set_to_none=True)
        norm = norm.full_tensor() if hasattr(norm, "full_tensor") else norm
        return norm.detach()

    def save_state(self, directory: str, *, model: nn.Module, optimizer, write_file) -> None:
        save_dcp_state(
            self, directory, model=model, optimizer=optimizer, write_file=write_file, extra={}
        )

    def load_state(self, directory: str, *, model: nn.Module, optimizer) -> None:
        load_dcp_state(self, directory, model=model, optimizer=optimizer)

    def close(self) -> None:
        close_process_group()


# Keys of a DeepSpeed JSON that lmforge's config decides (batch, precision, clipping).
OWNED_DS_KEYS = (
    "train_micro_batch_size_per_gpu",
    "gradient_accumulation_steps",
    "train_batch_size",
    "gradient_clipping",
    "bf16",
    "fp16",
)


def deepspeed_config(
    parallel,
    *,
    precision: str,
    world_size: int,
    micro_batch_size: int,
    grad_accum: int,
    grad_clip: float,
    num_params: int,
) -> dict:
    """The user's DeepSpeed JSON (if any) with lmforge's batch sizes, precision, clipping and
    ZeRO settings filled in, so that the two can never disagree (a differing value is replaced,
    with a warning)."""
    import json

    config: dict = {}
    if parallel.deepspeed_config:
        with open(parallel.deepspeed_config) as f:
            config = json.load(f)
    zero = dict(config.get("zero_optimization", {}), stage=parallel.stage)
    # DeepSpeed's default buckets hold 5e8 elements (2 GB of fp32) whatever the model: ZeRO-1/2
    # allocate them every micro-step, which cost a 0.2M-parameter model 6 s a step on CPU
    # (0.07 s with model-sized buckets). Size them to the model unless the user's JSON says.
    for key in ("reduce_bucket_size", "allgather_bucket_size"):
        zero.setdefault(key, int(min(5e8, max(num_params, 1e6))))
    if parallel.offload_optimizer:
        zero["offload_optimizer"] = {"device": "cpu"}
    if parallel.offload_params:
        zero["offload_param"] = {"device": "cpu"}
    ours = {
        "train_micro_batch_size_per_gpu": micro_batch_size,
        "gradient_accumulation_steps": grad_accum,
        "train_batch_size": micro_batch_size * grad_accum * world_size,
        "gradient_clipping": grad_clip,
        "bf16": {**config.get("bf16", {}), "enabled": precision == "bf16"},
        "fp16": {**config.get("fp16", {}), "enabled": precision == "fp16"},
    }
    for key in OWNED_DS_KEYS:
        if (
            key in config
            and config[key] != ours[key]
            and not (
                isinstance(config[key], dict) and config[key].get("enabled") == ours[key]["enabled"]
            )
        ):
            pdist.print0(
                f"warning: {parallel.deepspeed_config} sets {key}={config[key]}; lmforge uses "
                f"{ours[key]} from the train section"
            )
    config.update(
        ours,
        zero_optimization=zero,
        zero_allow_untested_optimizer=True,  # torch's AdamW as the client optimizer
        # With offload, torch's AdamW steps on the CPU copy: the same update as every other
        # strategy (DeepSpeedCPUAdam would need a JIT build of its own and differs slightly).
        zero_force_ds_cpu_optimizer=False,
        steps_per_print=2**31 - 1,
    )
    return config


class DeepSpeedStrategy:
    """A DeepSpeed engine with ZeRO stage 0-3 and optional CPU offload (deepspeed is imported
    only here). The engine owns gradient accumulation, clipping and the optimizer step; lmforge's
    scheduler drives the learning rate of the client optimizer's parameter groups."""

    name = "deepspeed"

    def __init__(self, *, precision: str, activation_checkpointing: bool = False, parallel) -> None:
        import deepspeed

        self.activation_checkpointing = activation_checkpointing
        self.parallel = parallel
        use_cuda = _use_cuda()
        self.precision = resolve_precision(precision, device_type="cuda" if use_cuda else "cpu")
        _single_process_env()
        # On CPU DeepSpeed picks its CPU accelerator and falls back to gloo without oneCCL.
        deepspeed.init_distributed(dist_backend="nccl" if use_cuda else "gloo", verbose=False)
        self.device = _local_device(use_cuda)
        self.engine = None

    rank = FSDPStrategy.rank
    world_size = FSDPStrategy.world_size
    is_main = FSDPStrategy.is_main
    compute_dtype = DDPStrategy.compute_dtype

    def prepare(
        self,
        model: nn.Module,
        make_optimizer,
        *,
        micro_batch_size: int,
        grad_accum: int,
        grad_clip: float,
    ) -> tuple[nn.Module, torch.optim.Optimizer]:
        import deepspeed

        if self.activation_checkpointing:
            apply_activation_checkpointing(model)
        optimizer = make_optimizer(model)
        config = deepspeed_config(
            self.parallel,
            precision=self.precision,
            world_size=self.world_size,
            micro_batch_size=micro_batch_size,
            grad_accum=grad_accum,
            grad_clip=grad_clip,
            num_params=sum(p.numel() for p in model.parameters()),
        )
        self.engine, _, _, _ = deepspeed.initialize(model=model, optimizer=optimizer, config=config)
        # The schedule steps the client optimizer's groups, which ZeRO's optimizer uses.
        return self.engine, optimizer

    def unwrap(self, model: nn.Module) -> nn.Module:
        return getattr(model, "module", model)

    def no_sync(self, model: nn.Module, *, sync: bool):
        return contextlib.nullcontext()  # the engine knows the accumulation boundary

    def backward(self, loss: torch.Tensor) -> None:
        self.engine.backward(loss, scale_wrt_gas=False)  # the trainer already divided
        if not self.engine.is_gradient_accumulation_boundary():
            self.engine.step()  # only counts the micro-step

    def step(self, model: nn.Module, optimizer, scheduler, *, grad_clip: float) -> torch.Tensor:
        self.engine.step()  # clip, optimizer step, zero grads (at the boundary)
        scheduler.step()
        norm = self.engine.get_global_grad_norm()
        return torch.as_tensor(0.0 if norm is None else float(norm))

    def save_state(self, directory: str, *, model: nn.Module, optimizer, write_file) -> None:
        from safetensors.torch import save

        self.engine.save_checkpoint(directory, tag="deepspeed", save_latest=False)
        pdist.barrier()
        if self.is_main:
            from deepspeed.utils.zero_to_fp32 import get_fp32_state_dict_from_zero_checkpoint

            full = get_fp32_state_dict_from_zero_checkpoint(directory, tag="deepspeed")
            write_file("model.safetensors", save(_dedup_tied(full), metadata={"format": "pt"}))

    def load_state(self, directory: str, *, model: nn.Module, optimizer) -> None:
        # Pickled DeepSpeed state: read only after the checkpoint's manifest checked out.
        self.engine.load_checkpoint(
            directory,
            tag="deepspeed",
            load_optimizer_states=True,
            load_lr_scheduler_states=False,
        )

    def close(self) -> None:
        close_process_group()


# --- state shared by every strategy -------------------------------------------------------------
# Model and optimizer go through torch.distributed.checkpoint (DCP) with FQN-keyed state dicts:
# the same files whatever the strategy, and DCP reshards on load, so a checkpoint written by
# FSDP on 2 ranks resumes under DDP on 1 and the other way round. A consolidated
# `model.safetensors` (full weights, rank 0) is written beside it for export and inspection.


def save_dcp_state(strategy, directory: str, *, model, optimizer, write_file, extra: dict) -> None:
    import torch.distributed.checkpoint as dcp
    from safetensors.torch import save
    from torch.distributed.checkpoint.state_dict import (
        StateDictOptions,
        get_model_state_dict,
        get_state_dict,
    )

    plain = strategy.unwrap(model)
    inner = getattr(optimizer, "optimizer", optimizer)  # Accelerate's AcceleratedOptimizer
    model_sd, optim_sd = get_state_dict(plain, inner)
    dcp.save({"model": model_sd, "optim": optim_sd}, checkpoint_id=os.path.join(directory, "dcp"))
    full = get_model_state_dict(
        plain, options=StateDictOptions(full_state_dict=True, cpu_offload=True)
    )
    if strategy.is_main:
        write_file("model.safetensors", save(_dedup_tied(full), metadata={"format": "pt"}))
        buf = io.BytesIO()
        torch.save(extra, buf)
        write_file("extra.pt", buf.getvalue())


def load_dcp_state(strategy, directory: str, *, model, optimizer) -> dict:
    """Load (and reshard) model and optimizer state; return the strategy's extra state.
    Called only after the checkpoint's manifest checked out (DCP metadata is pickled)."""
    import torch.distributed.checkpoint as dcp
    from torch.distributed.checkpoint.state_dict import get_state_dict, set_state_dict

    plain = strategy.unwrap(model)
    inner = getattr(optimizer, "optimizer", optimizer)
    model_sd, optim_sd = get_state_dict(plain, inner)
    state = {"model": model_sd, "optim": optim_sd}
    dcp.load(state, checkpoint_id=os.path.join(directory, "dcp"))
    set_state_dict(plain, inner, model_state_dict=state["model"], optim_state_dict=state["optim"])
    return torch.load(os.path.join(directory, "extra.pt"), map_location="cpu", weights_only=True)


def close_process_group() -> None:
    """Leave the process group cleanly (a barrier first avoids gloo's exit-time abort)."""
    if dist.is_available() and dist.is_initialized():
        pdist.barrier()
        dist.destroy_process_group()


def _dedup_tied(state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Keep the first name of each tied tensor (the same data, shape and strides) and give every
    tensor its own storage: safetensors refuses shared storage, and views into one flat buffer
    (DeepSpeed's consolidated state) are not tied weights."""
    seen: set[tuple] = set()
    out = {}
    for k, v in state.items():
        ident = (v.data_ptr(), tuple(v.shape), v.stride())
        if v.numel() > 0 and ident in seen:
            continue
        seen.add(ident)
        out[k] = v.detach().cpu().clone()
    return out


def check_state_format(checkpoint: str, *, strategy: str) -> None:
    """Refuse a checkpoint whose sharded state this strategy cannot read. DDP and FSDP share one
    reshardable format (DCP, `dcp/`); DeepSpeed engines keep their own (`deepspeed/`)."""
    from pretrain.errors import CheckpointError

    by_deepspeed = os.path.isdir(os.path.join(checkpoint, "deepspeed"))
    if by_deepspeed != (strategy == "deepspeed"):
        raise CheckpointError(
            f"{checkpoint} was written by "
            + (
                "a DeepSpeed engine: resume it with parallel.strategy=deepspeed"
                if by_deepspeed
                else "DDP/FSDP: resume it with parallel.strategy=ddp or fsdp"
            )
            + " (converting between DeepSpeed and DCP checkpoints is not supported yet)"
        )


STRATEGIES = {"ddp": DDPStrategy, "fsdp": FSDPStrategy, "deepspeed": DeepSpeedStrategy}


def build_strategy(*, precision: str, parallel=None):
    """The strategy of a run's `parallel` section (default: DDP)."""
    from pretrain.config import ParallelConfig

    parallel = parallel or ParallelConfig()
    extra = {"parallel": parallel} if parallel.strategy == "deepspeed" else {}
    return STRATEGIES[parallel.strategy](
        precision=precision, activation_checkpointing=parallel.activation_checkpointing, **extra
    )
