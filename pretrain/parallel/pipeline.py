"""Pipeline parallelism with ``torch.distributed.pipelining`` (GPipe or 1F1B schedules).

The model is built whole on every rank (same seed, same weights as one process), then each
pipeline rank keeps a contiguous slice of the blocks: the first stage also holds the
embeddings, the last the final norm and the LM head. A stage is a small module whose attributes
carry the GPT's own names (``tok_embeddings``, ``layers.<i>``, ``norm``, ``output``), so
checkpoints keep the same keys as every other layout and reshard to them.

One optimizer step's gradient-accumulation micro-batches are the pipeline's micro-batches; the
schedule averages their gradients like gradient accumulation does. Ranks with the same stage
form the data-parallel dimension and average gradients after the schedule.
"""

from __future__ import annotations

import torch
import torch.distributed as dist
from torch import nn

from lmforge.pretrain.config.layout import Layout
from lmforge.pretrain.core.errors import ConfigurationError
from lmforge.pretrain.model.loss import LossFn, StageLoss
from lmforge.pretrain.parallel.common import (
    MakeOptimizer,
    StepShape,
    Strategy,
    all_reduce_grads,
    apply_activation_checkpointing,
    apply_compile,
    join_process_group,
)
from lmforge.pretrain.parallel.state import load_dcp_state


def stage_layers(n_layer: int, num_stages: int, stage: int) -> range:
    """Blocks of ``stage``: contiguous, the first ``n_layer % num_stages`` stages one more."""
    sizes = [n_layer // num_stages + (s < n_layer % num_stages) for s in range(num_stages)]
    start = sum(sizes[:stage])
    return range(start, start + sizes[stage])


class PipelineStageModule(nn.Module):
    """One stage of a GPT: ``forward(tokens or hidden (B, T[, d])) -> hidden or logits``."""

    def __init__(self, model: nn.Module, *, stage: int, num_stages: int, dtype) -> None:
        super().__init__()
        self.first, self.last = stage == 0, stage == num_stages - 1
        self.dtype = dtype
        self.tok_embeddings = model.tok_embeddings if self.first else None
        self.layers = nn.ModuleDict(
            {str(i): model.layers[i] for i in stage_layers(len(model.layers), num_stages, stage)}
        )
        self.norm = model.norm if self.last else None
        self.output = model.output if self.last else None
        self.register_buffer("rope_cos", model.rope_cos, persistent=False)  # (T_max, hs)
        self.register_buffer("rope_sin", model.rope_sin, persistent=False)
        self.cfg = model.cfg

    def forward(self, h: torch.Tensor) -> torch.Tensor:
        T = h.shape[1]
        cos, sin = self.rope_cos[:T], self.rope_sin[:T]  # (T, hs)
        enabled = self.dtype != torch.float32
        with torch.autocast(h.device.type, dtype=self.dtype, enabled=enabled):
            if self.first:
                h = self.tok_embeddings(h)  # (B, T, d)
            for layer in self.layers.values():
                h = layer(h, cos, sin)  # (B, T, d)
            if self.last:
                return self.output(self.norm(h))  # (B, T, vocab)
        return h.float()  # the residual stream travels between stages in fp32


def _output_loss(loss_fn: LossFn):
    """The part of a loss that needs only the model output and the labels (what a pipeline's
    last stage can compute)."""
    if not isinstance(loss_fn, StageLoss):
        raise ConfigurationError(
            "parallel.pipeline_parallel > 1 needs a loss of the model output and the labels; "
            "this task's loss has none: use pipeline_parallel=1"
        )
    return loss_fn.output_loss


class PipelineStrategy(Strategy):
    """``parallel.pipeline_parallel = P``: a ``(pp, dp)`` mesh, P stages, data parallel across."""

    def __init__(self, *, precision: str, layout: Layout) -> None:
        super().__init__(precision=precision, layout=layout)
        self.precision, self.device = join_process_group(precision)
        self.pp = layout.pp
        self.schedule_name = layout.parallel.pipeline_schedule
        self.mesh = layout.mesh(self.device.type)
        self.stage_index = self.mesh["pp"].get_local_rank()
        self.pp_group = self.mesh["pp"].get_group()
        self.last_rank = dist.get_global_rank(self.pp_group, self.pp - 1)
        self.name = f"pp{self.pp}-{self.schedule_name}"
        self._schedule = None

    @property
    def first(self) -> bool:
        return self.stage_index == 0

    @property
    def last(self) -> bool:
        return self.stage_index == self.pp - 1

    def prepare(
        self, model: nn.Module, make_optimizer: MakeOptimizer, shape: StepShape = StepShape()
    ) -> tuple[nn.Module, torch.optim.Optimizer]:
        from torch.distributed.pipelining import PipelineStage

        stage = PipelineStageModule(
            model, stage=self.stage_index, num_stages=self.pp, dtype=self.compute_dtype
        ).to(self.device)
        if self.activation_checkpointing:
            apply_activation_checkpointing(stage)
        if self.compile_blocks:
            apply_compile(stage)
        self.stage = PipelineStage(
            stage, self.stage_index, self.pp, self.device, group=self.pp_group
        )
        self.n_micro = shape.grad_accum
        self.n_out = model.output.out_features  # what eval_logits receives from the last stage
        return stage, make_optimizer(stage)

    def _schedule_for(self, loss_fn):
        from torch.distributed.pipelining import Schedule1F1B, ScheduleGPipe

        if self._schedule is None or self._schedule[0] is not loss_fn:
            cls = {"gpipe": ScheduleGPipe, "1f1b": Schedule1F1B}[self.schedule_name]
            # scale_grads: gradients are the mean over micro-batches, as in accumulation
            sched = cls(self.stage, self.n_micro, loss_fn=_output_loss(loss_fn), scale_grads=True)
            self._schedule = (loss_fn, sched)
        return self._schedule[1]

    def _from_last_stage(self, value: torch.Tensor) -> torch.Tensor:
        """The last stage's value on every stage of this pipeline."""
        value = value.detach().float().reshape(()).to(self.device)
        dist.broadcast(value, src=self.last_rank, group=self.pp_group)
        return value

    def forward_backward(
        self, model: nn.Module, micro_batches: list[dict], loss_fn
    ) -> torch.Tensor:
        schedule = self._schedule_for(loss_fn)
        if len(micro_batches) != self.n_micro:
            raise ConfigurationError(
                f"a pipeline step needs {self.n_micro} micro-batches, got {len(micro_batches)}"
            )
        inputs = torch.cat([b["input_ids"] for b in micro_batches]).to(self.device)
        labels = torch.cat([b["labels"] for b in micro_batches]).to(self.device)
        losses: list[torch.Tensor] = []
        if self.first and self.last:
            schedule.step(inputs, target=labels, losses=losses)
        elif self.first:
            schedule.step(inputs)
        elif self.last:
            schedule.step(target=labels, losses=losses)
        else:
            schedule.step()
        mean = torch.stack(losses).mean() if losses else torch.zeros((), device=self.device)
        return self._from_last_stage(mean)

    @torch.no_grad()
    def _relay_forward(self, model: nn.Module, batch: dict) -> torch.Tensor | None:
        """Forward only, relayed stage to stage (every rank of a pipeline reads the same batch,
        so the shapes are known without asking); the output on the last stage, else None."""
        inputs = batch["input_ids"].to(self.device)
        B, T = inputs.shape
        pp_ranks = dist.get_process_group_ranks(self.pp_group)
        if self.first:
            h = inputs
        else:
            h = torch.empty(B, T, model.cfg.d_model, device=self.device)
            dist.recv(h, src=pp_ranks[self.stage_index - 1], group=self.pp_group)
        out = model(h)
        if not self.last:
            dist.send(out.contiguous(), dst=pp_ranks[self.stage_index + 1], group=self.pp_group)
            return None
        return out

    @torch.no_grad()
    def eval_loss(self, model: nn.Module, batch: dict, loss_fn) -> torch.Tensor:
        out = self._relay_forward(model, batch)
        if out is None:
            return self._from_last_stage(torch.zeros(()))
        loss = _output_loss(loss_fn)(out, batch["labels"].to(self.device))
        return self._from_last_stage(loss)

    @torch.no_grad()
    def eval_logits(self, model: nn.Module, batch: dict) -> torch.Tensor:
        out = self._relay_forward(model, batch)
        B, T = batch["input_ids"].shape
        if out is None:
            out = torch.empty(B, T, self.n_out, device=self.device)
        out = out.float().contiguous()
        dist.broadcast(out, src=self.last_rank, group=self.pp_group)
        return out

    def step(self, model: nn.Module, optimizer, scheduler, *, grad_clip: float) -> torch.Tensor:
        params = [p for p in model.parameters() if p.grad is not None]
        if self.dp_size > 1:
            all_reduce_grads(params, self.mesh["dp"].get_group())
        # The global norm: each stage holds a disjoint part of the parameters.
        local = torch.nn.utils.get_total_norm([p.grad for p in params])
        squared = local.float() ** 2
        dist.all_reduce(squared, group=self.pp_group)
        norm = squared.sqrt()
        if grad_clip > 0:
            torch.nn.utils.clip_grads_with_norm_(params, grad_clip, norm)
        optimizer.step()
        scheduler.step()
        optimizer.zero_grad(set_to_none=True)
        return norm.detach()

    def load_state(self, directory: str, *, model: nn.Module, optimizer) -> None:
        load_dcp_state(self, directory, model=model, optimizer=optimizer)
