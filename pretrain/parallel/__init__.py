"""Layer 3, parallel strategies: the one place that knows how a model is distributed.

Every strategy has the same small interface, the abstract :class:`pretrain.parallel.common.Strategy`,
and is built the same way, ``Strategy(precision=..., layout=...)``, from the run's
:class:`pretrain.config.layout.Layout` (its degrees, its device mesh, its ``parallel`` section). It
sets up the process group and device (``device``, ``rank``, ``world_size``, ``is_main``, and
``dp_rank`` / ``dp_size``, the data-parallel coordinates that decide which samples a rank reads),
wraps the model and builds its optimizer (``prepare``), runs one step's micro-batches
(``forward_backward``) and the update (``step``: clip, optimizer, schedule, zero grads), evaluates
(``eval_loss``, ``eval_logits``), and saves and loads model/optimizer state for the checkpoint
code (``save_state`` / ``load_state``). The trainer calls these and never branches on the strategy.

- ``DDPStrategy`` (ddp.py): replicas through Accelerate (gloo on CPU, NCCL on GPUs).
- ``MeshStrategy`` (mesh.py): FSDP2 ``fully_shard`` and/or DTensor tensor parallel on a
  ``(dp, tp)`` mesh.
- ``PipelineStrategy`` (pipeline.py): ``torch.distributed.pipelining`` stages (GPipe, 1F1B) on a
  ``(pp, dp)`` mesh.
- ``DeepSpeedStrategy`` (zero.py): a DeepSpeed engine, ZeRO 0-3 with CPU offload (deepspeed is
  imported only there).

Adding a strategy: subclass ``Strategy``, implement its four abstract methods, and choose it in
:func:`build_strategy` (docs/architecture.md).
"""

from __future__ import annotations

from lmforge.pretrain.config.layout import Layout, launched_world_size
from lmforge.pretrain.parallel.common import (
    Strategy,
    apply_activation_checkpointing,
    cpu_supports_bf16,
    resolve_precision,
)
from lmforge.pretrain.parallel.state import check_state_format, consolidated_weights
from lmforge.pretrain.parallel.zero import (
    deepspeed_config,  # deepspeed itself loads only in a strategy
)

__all__ = [
    "Strategy",
    "apply_activation_checkpointing",
    "build_strategy",
    "check_state_format",
    "consolidated_weights",
    "cpu_supports_bf16",
    "deepspeed_config",
    "resolve_precision",
]


def strategy_class(layout: Layout) -> type[Strategy]:
    """The strategy that runs ``layout`` (strategies are imported only when chosen)."""
    if layout.pp > 1:
        from lmforge.pretrain.parallel.pipeline import PipelineStrategy

        return PipelineStrategy
    if layout.fsdp or layout.tp > 1:
        from lmforge.pretrain.parallel.mesh import MeshStrategy

        return MeshStrategy
    if layout.strategy == "deepspeed":
        from lmforge.pretrain.parallel.zero import DeepSpeedStrategy

        return DeepSpeedStrategy
    from lmforge.pretrain.parallel.ddp import DDPStrategy

    return DDPStrategy


def build_strategy(*, precision: str, layout: Layout | None = None) -> Strategy:
    """The strategy of a run's layout (default: DDP over the launched processes); the layout
    is checked against ``precision`` first."""
    if layout is None:
        from lmforge.pretrain.config.schema import ParallelConfig

        layout = Layout(ParallelConfig(), launched_world_size())
    layout.check(precision=precision)
    return strategy_class(layout)(precision=precision, layout=layout)
