"""Losses and the two forms the rest of lmforge calls them in.

A loss is called as ``loss_fn(model, batch) -> scalar`` (:class:`LossFn`): the trainer and every
strategy that runs the whole model use that form. A pipeline's last stage sees only the model
output and the labels, and evaluation with task metrics needs the output anyway, so a loss may
also have its stage-output form ``loss_fn.output_loss(output, labels) -> scalar``
(:class:`StageLoss`). Pretraining's next-token loss and every finetuning task's loss are one
class, :class:`CrossEntropyLoss`, that has both.
"""

from __future__ import annotations

from typing import Protocol, runtime_checkable

import torch
import torch.nn.functional as F
from torch import nn

Batch = dict[str, torch.Tensor]
IGNORE = -100  # label of positions that carry no loss (padding, prompts)


@runtime_checkable
class LossFn(Protocol):
    """A training loss of the whole model: ``(model, batch) -> scalar``."""

    def __call__(self, model: nn.Module, batch: Batch) -> torch.Tensor: ...


@runtime_checkable
class StageLoss(LossFn, Protocol):
    """A loss that can also be computed from the model output and the labels alone."""

    def output_loss(self, output: torch.Tensor, labels: torch.Tensor) -> torch.Tensor: ...


def lm_cross_entropy(logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    """Mean next-token cross-entropy of logits (B, T, V) against labels (B, T); labels of -100
    are ignored. Computed in fp32."""
    return F.cross_entropy(logits.float().flatten(0, 1), labels.flatten(), ignore_index=IGNORE)


class CrossEntropyLoss:
    """Cross-entropy of the model output (B, T, n_out) against labels (B, T), -100 ignored, in
    fp32: next-token prediction (pretraining, sft) and every classification head alike. Class
    ``weights`` give sum(w·loss) / sum(w), as torch's weighted cross-entropy."""

    def __init__(self, weights: list[float] | None = None) -> None:
        self.weights = weights

    def output_loss(self, output: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
        if self.weights is None:
            return lm_cross_entropy(output, labels)
        w = torch.tensor(self.weights, dtype=torch.float32, device=output.device)
        return F.cross_entropy(
            output.float().flatten(0, 1), labels.flatten(), weight=w, ignore_index=IGNORE
        )

    def __call__(self, model: nn.Module, batch: Batch) -> torch.Tensor:
        return self.output_loss(model(batch["input_ids"]), batch["labels"])


causal_lm_loss = CrossEntropyLoss()
"""The pretraining loss: next-token cross-entropy of the model's logits."""
