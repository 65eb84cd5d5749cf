"""Parallel strategies: the one place that knows how a model is distributed.

Every strategy has the same small interface (:class:`pretrain.parallel.common.Strategy`): it
sets up the process group and device (``device``, ``rank``, ``world_size``, ``is_main``, and
``dp_rank`` / ``dp_size``, the data-parallel coordinates that decide which samples a rank reads),
wraps the model and builds its optimizer (``prepare``), runs one step's micro-batches
(``forward_backward``) and the update (``step``: clip, optimizer, schedule, zero grads), evaluates
(``eval_loss``), and saves and loads model/optimizer state for the checkpoint code
(``save_state`` / ``load_state``). The trainer calls these and never branches on the strategy.

- ``DDPStrategy`` (ddp.py): replicas through Accelerate (gloo on CPU, NCCL on GPUs).
- ``MeshStrategy`` (mesh.py): FSDP2 ``fully_shard`` and/or DTensor tensor parallel on a
  ``(dp, tp)`` mesh.
- ``PipelineStrategy`` (pipeline.py): ``torch.distributed.pipelining`` stages (GPipe, 1F1B) on a
  ``(pp, dp)`` mesh.
- ``DeepSpeedStrategy`` (zero.py): a DeepSpeed engine, ZeRO 0-3 with CPU offload (deepspeed is
  imported only there).

Degrees: world size = data parallel × tensor parallel × pipeline parallel; data parallel is
inferred. :func:`check_layout` validates a layout against the model before anything starts.
"""

from __future__ import annotations

from pretrain.errors import ConfigurationError
from pretrain.parallel.common import (
    Strategy,
    apply_activation_checkpointing,
    cpu_supports_bf16,
    resolve_precision,
)
from pretrain.parallel.state import check_state_format, consolidated_weights
from pretrain.parallel.zero import deepspeed_config  # deepspeed itself loads only in a strategy

__all__ = [
    "Strategy",
    "apply_activation_checkpointing",
    "build_strategy",
    "check_layout",
    "check_state_format",
    "consolidated_weights",
    "cpu_supports_bf16",
    "deepspeed_config",
    "layout",
    "resolve_precision",
]


def layout(parallel, *, world_size: int) -> dict[str, int]:
    """The degrees of a run: ``{"world": W, "dp": W/(tp*pp), "tp": .., "pp": ..}``."""
    tp, pp = parallel.tensor_parallel, parallel.pipeline_parallel
    return {"world": world_size, "dp": world_size // (tp * pp), "tp": tp, "pp": pp}


def check_layout(parallel, model, *, world_size: int) -> dict[str, int]:
    """Refuse a layout that cannot run, naming every degree and the world size; return the
    degrees. ``model`` is the run's ModelConfig."""
    tp, pp = parallel.tensor_parallel, parallel.pipeline_parallel
    degrees = (
        f"(world_size={world_size}, tensor_parallel={tp}, pipeline_parallel={pp}, "
        f"data_parallel=world_size/(tp*pp)={world_size / (tp * pp):g})"
    )
    problems = []
    if world_size % (tp * pp):
        problems.append(
            f"world_size must be a multiple of tensor_parallel*pipeline_parallel={tp * pp}: "
            f"launch {tp * pp * max(1, world_size // (tp * pp))} processes or lower the degrees"
        )
    if tp > 1 and (model.n_head % tp or model.kv_heads % tp):
        divisors = [d for d in range(1, model.kv_heads + 1) if model.kv_heads % d == 0]
        problems.append(
            f"tensor_parallel={tp} must divide model.n_head={model.n_head} and the KV heads "
            f"({model.kv_heads}); use tensor_parallel in {divisors}"
        )
    if pp > model.n_layer:
        problems.append(
            f"pipeline_parallel={pp} exceeds model.n_layer={model.n_layer} (a stage needs at "
            f"least one block); use pipeline_parallel <= {model.n_layer}"
        )
    if (tp > 1 or pp > 1) and model.tie_embeddings:
        problems.append(
            "model.tie_embeddings=true cannot be split by tensor or pipeline parallelism; "
            "set model.tie_embeddings=false or use ddp/fsdp/deepspeed"
        )
    if problems:
        raise ConfigurationError(f"parallel layout {degrees}: " + "; ".join(problems))
    return layout(parallel, world_size=world_size)


def build_strategy(*, precision: str, parallel=None) -> Strategy:
    """The strategy of a run's ``parallel`` section (default: DDP)."""
    from pretrain.config import ParallelConfig

    parallel = parallel or ParallelConfig()
    if precision == "fp16" and (
        parallel.strategy == "fsdp"
        or parallel.tensor_parallel > 1
        or parallel.pipeline_parallel > 1
    ):
        raise ConfigurationError(
            "train.precision=fp16 needs loss scaling, which lmforge does under ddp and deepspeed "
            "only; use train.precision=bf16 with fsdp, tensor or pipeline parallel"
        )
    if parallel.pipeline_parallel > 1:
        from pretrain.parallel.pipeline import PipelineStrategy

        return PipelineStrategy(precision=precision, parallel=parallel)
    if parallel.strategy == "fsdp" or parallel.tensor_parallel > 1:
        from pretrain.parallel.mesh import MeshStrategy

        return MeshStrategy(precision=precision, parallel=parallel)
    if parallel.strategy == "deepspeed":
        from pretrain.parallel.zero import DeepSpeedStrategy

        return DeepSpeedStrategy(
            precision=precision,
            activation_checkpointing=parallel.activation_checkpointing,
            parallel=parallel,
        )
    from pretrain.parallel.ddp import DDPStrategy

    return DDPStrategy(
        precision=precision, activation_checkpointing=parallel.activation_checkpointing
    )
