"""FSDP2 and tensor parallelism on a 2-D device mesh ``(dp, tp)``, in torchtitan's order:
tensor parallel inside each block, then activation checkpointing, then ``fully_shard`` over the
data-parallel dimension. Without FSDP the ``dp`` replicas average their gradients explicitly.

Tensor parallel (Megatron-style, DTensor ``parallelize_module``): wq/wk/wv and w1/w3 are split by
output columns (each rank owns whole heads and a slice of the hidden units), wo and w2 by input
rows with one all-reduce each; the norms and the residual stream between blocks are sharded along
the sequence (sequence parallel), so each rank keeps 1/tp of those activations. The embedding is
split by vocabulary rows and the LM head by vocabulary columns, its logits gathered.
"""

from __future__ import annotations

import contextlib

import torch
from torch import nn

from lmforge.pretrain.config.layout import Layout
from lmforge.pretrain.parallel.common import (
    MakeOptimizer,
    StepShape,
    Strategy,
    all_reduce_grads,
    apply_activation_checkpointing,
    apply_compile,
    blocks,
    join_process_group,
)
from lmforge.pretrain.parallel.float8 import convert_to_float8, precompute_fsdp_scales
from lmforge.pretrain.parallel.state import load_dcp_state


def apply_tensor_parallel(model: nn.Module, tp_mesh) -> None:
    """Shard ``model`` (a GPT, in place) over ``tp_mesh``; parameter names do not change."""
    from torch.distributed.tensor import Replicate, Shard
    from torch.distributed.tensor.parallel import (
        ColwiseParallel,
        PrepareModuleInput,
        RowwiseParallel,
        SequenceParallel,
        parallelize_module,
    )

    parallelize_module(
        model,
        tp_mesh,
        {
            # tokens (replicated) -> embeddings sharded along the sequence
            "tok_embeddings": RowwiseParallel(input_layouts=Replicate(), output_layouts=Shard(1)),
            "norm": SequenceParallel(),
            # full logits on every rank, so any loss function works unchanged
            "output": ColwiseParallel(input_layouts=Shard(1), output_layouts=Replicate()),
        },
    )
    for block in blocks(model):
        parallelize_module(
            block,
            tp_mesh,
            {
                "attention_norm": SequenceParallel(),
                # (x, cos, sin): gather x's sequence shards before the projections
                "attention": PrepareModuleInput(
                    input_layouts=(Shard(1), None, None),
                    desired_input_layouts=(Replicate(), None, None),
                ),
                "attention.wq": ColwiseParallel(),
                "attention.wk": ColwiseParallel(),
                "attention.wv": ColwiseParallel(),
                "attention.wo": RowwiseParallel(output_layouts=Shard(1)),
                "ffn_norm": SequenceParallel(),
                "feed_forward": PrepareModuleInput(
                    input_layouts=(Shard(1),), desired_input_layouts=(Replicate(),)
                ),
                "feed_forward.w1": ColwiseParallel(),
                "feed_forward.w3": ColwiseParallel(),
                "feed_forward.w2": RowwiseParallel(output_layouts=Shard(1)),
            },
        )


class MeshStrategy(Strategy):
    """``parallel.strategy=fsdp`` (any tensor-parallel degree) or ``ddp`` with
    ``tensor_parallel > 1``: parameters are DTensors on the mesh.

    FSDP: each transformer block is a unit (gathered for its forward/backward, resharded after),
    then the root (embeddings, final norm, head); mixed precision keeps fp32 master weights and
    reduces gradients in fp32, compute runs in bf16. Without FSDP, forward runs under autocast.
    """

    def __init__(self, *, precision: str, layout: Layout) -> None:
        super().__init__(precision=precision, layout=layout)
        # fully_shard needs a process group even for one process
        self.precision, self.device = join_process_group(precision)
        self.shard = layout.fsdp
        self.tp = layout.tp
        self.mesh = layout.mesh(self.device.type)
        self.name = ("fsdp" if self.shard else "ddp") + (f"+tp{self.tp}" if self.tp > 1 else "")

    def prepare(
        self, model: nn.Module, make_optimizer: MakeOptimizer, shape: StepShape = StepShape()
    ) -> tuple[nn.Module, torch.optim.Optimizer]:
        from torch.distributed.fsdp import MixedPrecisionPolicy, fully_shard

        model.to(self.device)
        fp8 = self.precision == "fp8"
        if fp8:  # before TP and sharding (torchao's order); Layout refuses fp8 with TP
            convert_to_float8(model, fsdp=self.shard)
        if self.tp > 1:
            apply_tensor_parallel(model, self.mesh["tp"])
        if self.activation_checkpointing:  # after TP, before sharding (torchtitan's order)
            apply_activation_checkpointing(model)
        if self.compile_blocks:  # after TP and checkpointing, before sharding
            apply_compile(model)
        if self.shard:
            policy = MixedPrecisionPolicy(
                param_dtype=self.compute_dtype, reduce_dtype=torch.float32
            )
            for block in blocks(model):
                fully_shard(block, mesh=self.mesh["dp"], mp_policy=policy)
            fully_shard(model, mesh=self.mesh["dp"], mp_policy=policy)
        # The optimizer must see the DTensor parameters that TP / fully_shard installed.
        optimizer = make_optimizer(model)
        if fp8 and self.shard:  # float8 all-gathers: every weight's scale after each update
            optimizer.register_step_post_hook(lambda *_: precompute_fsdp_scales(model))
        return model, optimizer

    def autocast(self):
        if self.shard or self.precision == "fp32":  # FSDP casts through its policy
            return contextlib.nullcontext()
        return torch.autocast(self.device.type, dtype=self.compute_dtype)

    @contextlib.contextmanager
    def no_sync(self, model: nn.Module, *, sync: bool):
        """FSDP: accumulate unsharded gradients locally; reduce-scatter on the last micro-batch."""
        if self.shard:
            self.unwrap(model).set_requires_gradient_sync(sync)
        yield

    def step(self, model: nn.Module, optimizer, scheduler, *, grad_clip: float) -> torch.Tensor:
        if not self.shard and self.dp_size > 1:
            all_reduce_grads(model.parameters(), self.mesh["dp"].get_group())
        return self.clip_and_step(model.parameters(), optimizer, scheduler, grad_clip=grad_clip)

    def load_state(self, directory: str, *, model: nn.Module, optimizer) -> None:
        load_dcp_state(self, directory, model=model, optimizer=optimizer)
        if self.precision == "fp8" and self.shard:  # the scales of the loaded weights
            precompute_fsdp_scales(model)
