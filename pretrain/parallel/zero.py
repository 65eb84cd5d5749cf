"""DeepSpeed engines: ZeRO stage 0-3 with optional CPU offload. deepspeed is imported only
here, and only when a run chooses `parallel.strategy=deepspeed`."""

from __future__ import annotations

import json
import os
import re

import torch
from torch import nn

from lmforge.pretrain.config.dsconfig import (
    OWNED_DS_KEYS,
    fill_auto,
    refuse_autos_left,
    user_json,
    zero_autos,
    zero_choice,
    zero_section,
)
from lmforge.pretrain.config.layout import Layout
from lmforge.pretrain.core import dist as pdist
from lmforge.pretrain.core.durable import Digests, digest_files
from lmforge.pretrain.core.safeload import deepspeed_reads
from lmforge.pretrain.parallel.common import (
    MakeOptimizer,
    StepShape,
    Strategy,
    apply_activation_checkpointing,
    local_device,
    resolve_precision,
    single_process_env,
    use_cuda,
)
from lmforge.pretrain.parallel.state import dedup_tied

# DeepSpeed's default buckets hold 5e8 elements (1 GB in bf16) whatever the model: ZeRO-1/2
# allocate them every micro-step, which cost a 0.2M-parameter model 6 s a step on CPU (0.07 s
# with model-sized buckets), and each is memory a rank holds beside the model. lmforge sizes them
# to the model, at most 2e8 elements (as transformers' documented ZeRO-2 JSON), unless the user's
# JSON says; pretrain/parallel/memory.py counts them from the same settings.
BUCKET_CAP = 200_000_000


def user_deepspeed_json(parallel) -> dict:
    """The user's DeepSpeed JSON (``parallel.deepspeed_config``), or {} without one."""
    return user_json(parallel)


def zero_settings(
    parallel, num_params: int, *, config: dict | None = None, hidden_size: int | None = None
) -> dict:
    """The ``zero_optimization`` section a run uses: the user's JSON's, with the stage and
    offloads of :func:`pretrain.config.dsconfig.zero_choice`, its "auto" sizes filled in for a model
    of width ``hidden_size`` (as transformers does), and lmforge's bucket sizes where the JSON
    sets none, for a model of ``num_params``."""
    if config is None:
        config = user_deepspeed_json(parallel)
    choice = zero_choice(parallel)
    zero = zero_section(config, parallel.deepspeed_config or "the DeepSpeed JSON")
    zero["stage"] = choice.stage
    if hidden_size is not None:
        fill_auto(
            {"zero_optimization": zero}, prefixed("zero_optimization", zero_autos(hidden_size))
        )
    for key in ("reduce_bucket_size", "allgather_bucket_size"):
        zero.setdefault(key, int(min(BUCKET_CAP, max(num_params, 1e6))))
    for on, key in (
        (choice.offload_optimizer, "offload_optimizer"),
        (choice.offload_params, "offload_param"),
    ):
        theirs = zero.get(key) if isinstance(zero.get(key), dict) else {}
        if on:  # the JSON's other settings of it (pin_memory, ...) stay
            zero[key] = {**theirs, "device": "cpu"}
        else:
            zero.pop(key, None)
    return zero


def prefixed(section: str, values: dict) -> dict:
    return {f"{section}.{key}": value for key, value in values.items()}


def deepspeed_config(
    parallel,
    *,
    precision: str,
    world_size: int,
    micro_batch_size: int,
    grad_accum: int,
    grad_clip: float,
    num_params: int,
    hidden_size: int | None = None,
) -> dict:
    """The engine's config: the user's JSON (if any) with lmforge's batch sizes, precision,
    clipping and ZeRO settings filled in, so that the two can never disagree ("auto" is filled
    in; a differing value is replaced, with a warning). Its optimizer and scheduler blocks,
    checked against optim.* when the config was loaded, are left out: lmforge's AdamW and
    schedule run. Lines on rank 0 say which ZeRO settings won and what was left out."""
    config = user_deepspeed_json(parallel)
    path = parallel.deepspeed_config
    name = os.path.basename(path or "")
    zero = zero_settings(parallel, num_params, config=config, hidden_size=hidden_size)
    ours = {
        "train_micro_batch_size_per_gpu": micro_batch_size,
        "gradient_accumulation_steps": grad_accum,
        "train_batch_size": micro_batch_size * grad_accum * world_size,
        "gradient_clipping": grad_clip,
        "bf16.enabled": precision == "bf16",
        "fp16.enabled": precision == "fp16",
    }
    for key, theirs, value in fill_auto(config, ours):
        pdist.print0(
            f"warning: {path} sets {key}={json.dumps(theirs)}; lmforge uses {json.dumps(value)} "
            f"from the train section"
        )
    for key in OWNED_DS_KEYS:
        if not isinstance(config.get(key), dict):
            config.pop(key, None)
    config.update({k: v for k, v in ours.items() if "." not in k})
    for key in ("bf16", "fp16"):
        config[key] = {**config.get(key, {}), "enabled": ours[f"{key}.enabled"]}
    dropped = [
        f'"{block}" ({config[block].get("type", "?")})'
        for block in ("optimizer", "scheduler")
        if isinstance(config.get(block), dict)
    ]
    config.pop("optimizer", None)
    config.pop("scheduler", None)
    if path:
        choice = zero_choice(parallel)
        if choice.notes:
            pdist.print0(f"deepspeed: {'; '.join(choice.notes)}")
        if dropped:
            pdist.print0(
                f"deepspeed: {name}'s {' and '.join(dropped)} not passed to DeepSpeed: lmforge's "
                "AdamW and learning-rate schedule run, with the values they resolve to (optim.*)"
            )
    config.update(
        zero_optimization=zero,
        zero_allow_untested_optimizer=True,  # torch's AdamW as the client optimizer
        # With offload, torch's AdamW steps on the CPU copy: the same update as every other
        # strategy (DeepSpeedCPUAdam would need a JIT build of its own and differs slightly).
        zero_force_ds_cpu_optimizer=False,
        steps_per_print=2**31 - 1,
    )
    refuse_autos_left(config, path or "the DeepSpeed config")
    return config


def hidden_size_of(model: nn.Module) -> int | None:
    """The model's width (its token embeddings' dimension), which sizes "auto" ZeRO buckets."""
    dims = [m.embedding_dim for m in model.modules() if isinstance(m, nn.Embedding)]
    return max(dims) if dims else None


def skip_cpu_inference_kernel() -> None:
    """Keep DeepSpeed from compiling its CPU shared-memory all-reduce kernel.

    On CPU, DeepSpeed's communication backend builds that C++ kernel (about 30 s, with a
    compiler, on a machine's first DeepSpeed run) the moment it starts. Only its
    `inference_all_reduce` uses it (inference-time tensor parallelism); the collectives of
    training go through torch.distributed (gloo), and `inference_all_reduce` itself falls back
    to them without the kernel. DeepSpeed keeps the ops it may build in one dict that it reads
    when the backend starts (edits to it are kept, by design), so it is marked unavailable."""
    import deepspeed.ops

    deepspeed.ops.__compatible_ops__["deepspeed_shm_comm"] = False


class DeepSpeedStrategy(Strategy):
    """A DeepSpeed engine with ZeRO stage 0-3 and optional CPU offload (deepspeed is imported
    only here). The engine owns gradient accumulation, clipping and the optimizer step; lmforge's
    scheduler drives the learning rate of the client optimizer's parameter groups."""

    name = "deepspeed"
    async_checkpoints = False  # the engine writes its checkpoint itself, synchronously

    def __init__(self, *, precision: str, layout: Layout) -> None:
        import deepspeed

        super().__init__(precision=precision, layout=layout)
        cuda = use_cuda()
        self.precision = resolve_precision(precision, device_type="cuda" if cuda else "cpu")
        single_process_env()
        if not cuda:
            skip_cpu_inference_kernel()
        # On CPU DeepSpeed picks its CPU accelerator and falls back to gloo without oneCCL.
        deepspeed.init_distributed(
            dist_backend="nccl" if cuda else "gloo",
            verbose=False,
            timeout=pdist.collective_timeout(),  # parallel.timeout_s
        )
        self.device = local_device(cuda)
        self.engine = None

    def prepare(
        self, model: nn.Module, make_optimizer: MakeOptimizer, shape: StepShape = StepShape()
    ) -> tuple[nn.Module, torch.optim.Optimizer]:
        import deepspeed

        if self.activation_checkpointing:
            apply_activation_checkpointing(model)
        optimizer = make_optimizer(model)
        # Saved with every checkpoint: lets DeepSpeed's ds_to_universal convert ZeRO-1/2
        # checkpoints too (lmforge converts them when another strategy resumes one).
        from deepspeed.checkpoint.constants import (
            UNIVERSAL_CHECKPOINT_INFO,
            UNIVERSAL_CHECKPOINT_VERSION_KEY,
            UNIVERSAL_CHECKPOINT_VERSION_VALUE,
        )

        setattr(
            model,
            UNIVERSAL_CHECKPOINT_INFO,
            {UNIVERSAL_CHECKPOINT_VERSION_KEY: UNIVERSAL_CHECKPOINT_VERSION_VALUE},
        )
        config = deepspeed_config(
            self.parallel,
            precision=self.precision,
            world_size=self.world_size,
            micro_batch_size=shape.micro_batch_size,
            grad_accum=shape.grad_accum,
            grad_clip=shape.grad_clip,
            num_params=sum(p.numel() for p in model.parameters()),
            hidden_size=hidden_size_of(model),
        )
        self.engine, _, _, _ = deepspeed.initialize(model=model, optimizer=optimizer, config=config)
        # The schedule steps the client optimizer's groups, which ZeRO's optimizer uses.
        return self.engine, optimizer

    def unwrap(self, model: nn.Module) -> nn.Module:
        return getattr(model, "module", model)

    def backward(self, loss: torch.Tensor) -> None:
        self.engine.backward(loss, scale_wrt_gas=False)  # the trainer already divided
        if not self.engine.is_gradient_accumulation_boundary():
            self.engine.step()  # only counts the micro-step

    def step(self, model: nn.Module, optimizer, scheduler, *, grad_clip: float) -> torch.Tensor:
        self.engine.step()  # clip, optimizer step, zero grads (at the boundary)
        scheduler.step()
        norm = self.engine.get_global_grad_norm()
        return torch.as_tensor(0.0 if norm is None else float(norm))

    def save_state(
        self, directory: str, *, model: nn.Module, optimizer, write_file, consolidated: bool
    ) -> Digests:
        """The engine's checkpoint under deepspeed/ (and its recovery scripts beside it), which
        DeepSpeed neither fsyncs nor hashes: each rank does both for the files it wrote, on
        several threads."""
        from safetensors.torch import save

        self.engine.save_checkpoint(directory, tag="deepspeed", save_latest=False)
        mine = _deepspeed_files_of(directory, self.rank)  # nothing else is written yet
        pdist.barrier()
        digests = digest_files(directory, mine, fsync=True)
        if consolidated and self.is_main:
            from deepspeed.utils.zero_to_fp32 import get_fp32_state_dict_from_zero_checkpoint

            full = get_fp32_state_dict_from_zero_checkpoint(directory, tag="deepspeed")
            write_file("model.safetensors", save(dedup_tied(full), metadata={"format": "pt"}))
        return digests

    def load_state(self, directory: str, *, model: nn.Module, optimizer) -> None:
        # DeepSpeed unpickles its files with weights_only=False: checked and made strict first.
        with deepspeed_reads(os.path.join(directory, "deepspeed")):
            self.engine.load_checkpoint(
                directory,
                tag="deepspeed",
                load_optimizer_states=True,
                load_lr_scheduler_states=False,
            )


_ZERO_RANK = re.compile(r"zero_pp_rank_(\d+)_")


def _deepspeed_files_of(directory: str, rank: int) -> list[str]:
    """The files a DeepSpeed save wrote on ``rank`` (paths relative to ``directory``): each
    rank's ZeRO partitions name their (data-parallel) rank; the rest is rank 0's."""
    out = []
    for parent, _, names in os.walk(directory):
        for name in names:
            found = _ZERO_RANK.search(name)
            if (int(found.group(1)) if found else 0) == rank:
                out.append(os.path.relpath(os.path.join(parent, name), directory))
    return sorted(out)
