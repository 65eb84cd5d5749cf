"""The parallel layout of a run: one object that knows every degree.

    world_size = data_parallel x tensor_parallel x pipeline_parallel

:class:`Layout` is built once from the run's ``parallel`` section and the world size. It checks
every degree against the model and the precision (one message naming all degrees and the world
size), builds the device mesh once, and answers every question about the layout: the degrees,
which data-parallel replica a rank is (which samples it reads), what is sharded. The strategies
(pretrain/parallel/), the memory estimate (pretrain/parallel/memory.py), the data sharding and the
pre-launch checks of the CLI all read it; nothing else computes a degree.

:func:`~lmforge.pretrain.config.schema.check_parallel_options` (beside the ``parallel`` section,
which runs it when it is loaded) holds the checks that need no world size: which options go with
which strategy.

This module imports neither torch nor a strategy at load time: the CLI checks a layout before any
worker process starts.
"""

from __future__ import annotations

import os
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

from lmforge.pretrain.config.schema import ModelConfig, ParallelConfig
from lmforge.pretrain.core.errors import ConfigurationError

if TYPE_CHECKING:
    from torch.distributed.device_mesh import DeviceMesh


def launched_world_size() -> int:
    """The world size the launcher gave this process (1 without a launcher)."""
    return int(os.environ.get("WORLD_SIZE", "1"))


@dataclass
class Layout:
    """The degrees of a run on ``world_size`` ranks and the mesh they form.

    Build it with :meth:`of` (checked) or directly (unchecked: the memory estimate tries layouts
    that may not fit). ``parallel`` is the run's ParallelConfig."""

    parallel: ParallelConfig
    world_size: int
    _mesh: Any = field(default=None, init=False, repr=False, compare=False)

    @classmethod
    def of(
        cls,
        parallel: ParallelConfig,
        *,
        world_size: int,
        model: ModelConfig | None = None,
        precision: str | None = None,
    ) -> Layout:
        """The layout, or a ConfigurationError naming every degree, the world size and the fix.
        ``model`` (the run's ModelConfig) and ``precision`` (the configured one) are checked
        when given."""
        layout = cls(parallel, world_size)
        layout.check(model=model, precision=precision)
        return layout

    # --- degrees --------------------------------------------------------------------------------
    @property
    def tp(self) -> int:
        return self.parallel.tensor_parallel

    @property
    def pp(self) -> int:
        return self.parallel.pipeline_parallel

    @property
    def dp(self) -> int:
        """Data-parallel degree: how many different micro-batches one step reads at once."""
        return max(1, self.world_size // (self.tp * self.pp))

    @property
    def strategy(self) -> str:
        return self.parallel.strategy

    @property
    def fsdp(self) -> bool:
        return self.strategy == "fsdp"

    @property
    def zero_stage(self) -> int:
        """The DeepSpeed ZeRO stage (0 for every other strategy)."""
        return self.parallel.stage if self.strategy == "deepspeed" else 0

    @property
    def shards_params(self) -> bool:
        return self.fsdp or self.zero_stage == 3

    @property
    def shards_grads(self) -> bool:
        return self.fsdp or self.zero_stage >= 2

    @property
    def shards_optimizer(self) -> bool:
        return self.fsdp or self.zero_stage >= 1

    def describe(self) -> str:
        """``dp 2 x tp 1 x pp 1 = 2 rank(s)``, and for deepspeed its ZeRO stage and offloads with
        where each came from (``; deepspeed ZeRO-3 (ds.json)``)."""
        out = f"dp {self.dp} x tp {self.tp} x pp {self.pp} = {self.world_size} rank(s)"
        if self.strategy == "deepspeed":
            out += f"; deepspeed {self.parallel.zero.describe()}"
        return out

    # --- checks ---------------------------------------------------------------------------------
    def check(self, *, model: ModelConfig | None = None, precision: str | None = None) -> None:
        tp, pp, world = self.tp, self.pp, self.world_size
        degrees = (
            f"(world_size={world}, tensor_parallel={tp}, pipeline_parallel={pp}, "
            f"data_parallel=world_size/(tp*pp)={world / (tp * pp):g})"
        )
        problems = []
        if world % (tp * pp):
            problems.append(
                f"world_size must be a multiple of tensor_parallel*pipeline_parallel={tp * pp}: "
                f"launch {tp * pp * max(1, world // (tp * pp))} processes or lower the degrees"
            )
        if model is not None:
            if tp > 1 and (model.n_head % tp or model.kv_heads % tp):
                divisors = [d for d in range(1, model.kv_heads + 1) if model.kv_heads % d == 0]
                problems.append(
                    f"tensor_parallel={tp} must divide model.n_head={model.n_head} and the KV "
                    f"heads ({model.kv_heads}); use tensor_parallel in {divisors}"
                )
            if pp > model.n_layer:
                problems.append(
                    f"pipeline_parallel={pp} exceeds model.n_layer={model.n_layer} (a stage "
                    f"needs at least one block); use pipeline_parallel <= {model.n_layer}"
                )
            if tp > 1 and model.qk_norm:
                # its weights would see only a rank's heads: their gradients need a sum over
                # the tensor-parallel ranks that the plan does not do yet
                problems.append(
                    "model.qk_norm=true (Qwen3) is not split by tensor parallelism yet; use "
                    "tensor_parallel=1 (ddp, fsdp, deepspeed or pipeline stages)"
                )
            if (tp > 1 or pp > 1) and model.tie_embeddings:
                problems.append(
                    "model.tie_embeddings=true cannot be split by tensor or pipeline "
                    "parallelism; set model.tie_embeddings=false or use ddp/fsdp/deepspeed"
                )
        if problems:
            raise ConfigurationError(f"parallel layout {degrees}: " + "; ".join(problems))
        if precision == "fp16" and (self.fsdp or tp > 1 or pp > 1):
            raise ConfigurationError(
                "train.precision=fp16 needs loss scaling, which lmforge does under ddp and "
                "deepspeed only; use train.precision=bf16 with fsdp, tensor or pipeline parallel"
            )
        if precision == "fp8" and (self.strategy == "deepspeed" or tp > 1 or pp > 1):
            raise ConfigurationError(
                f"train.precision=fp8 runs under ddp and fsdp without tensor or pipeline "
                f"parallel (got strategy={self.strategy}, tensor_parallel={tp}, "
                f"pipeline_parallel={pp}); use train.precision=bf16 for this layout"
            )

    # --- the mesh -------------------------------------------------------------------------------
    def mesh(self, device_type: str) -> DeviceMesh:
        """The device mesh, built once (the process group must exist): ``("pp", "dp")`` with
        pipeline stages, else ``("dp", "tp")``; with tensor parallel on several replicas the
        two are also flattened to ``dp_tp`` (one all-reduce for norms of 2-D DTensors)."""
        if self._mesh is None:
            from torch.distributed.device_mesh import init_device_mesh

            if self.pp > 1:
                mesh = init_device_mesh(
                    device_type, (self.pp, self.dp), mesh_dim_names=("pp", "dp")
                )
            else:
                mesh = init_device_mesh(
                    device_type, (self.dp, self.tp), mesh_dim_names=("dp", "tp")
                )
                if self.tp > 1 and self.dp > 1:
                    mesh["dp", "tp"]._flatten("dp_tp")
            self._mesh = mesh
        return self._mesh

    def dp_rank(self, rank: int) -> int:
        """Which data-parallel replica global ``rank`` belongs to (which samples it reads);
        tensor- and pipeline-parallel peers share it. The same coordinates as :meth:`mesh`."""
        if self.pp > 1:  # ("pp", "dp"): consecutive ranks are replicas of one stage
            return rank % self.dp
        return rank // self.tp  # ("dp", "tp"): consecutive ranks split one replica
