"""AdamW with decay/no-decay parameter groups, and learning-rate schedules."""

from __future__ import annotations

import math

import torch
from torch import nn

from lmforge.pretrain.config.schema import OptimConfig


def param_groups(model: nn.Module, *, weight_decay: float) -> list[dict]:
    """Decay matrices of linear layers; not norms, biases or embedding tables (GPT-2 / nanoGPT).

    A tied embedding/LM-head table is an embedding: no decay. An empty group is left out (a
    LoRA or frozen-trunk finetune trains matrices only): torch.distributed.checkpoint cannot
    load an optimizer state with an empty parameter group.
    """
    embedding_ids = {id(m.weight) for m in model.modules() if isinstance(m, nn.Embedding)}
    decay, no_decay = [], []
    for p in model.parameters():  # each shared tensor once
        if not p.requires_grad:
            continue
        (decay if p.dim() >= 2 and id(p) not in embedding_ids else no_decay).append(p)
    groups = [
        {"params": decay, "weight_decay": weight_decay},
        {"params": no_decay, "weight_decay": 0.0},
    ]
    return [g for g in groups if g["params"]]


def build_optimizer(model: nn.Module, cfg: OptimConfig) -> torch.optim.Optimizer:
    """AdamW with the fused kernel (one pass over all parameters) on GPUs and CPUs: on a CPU
    it is several times faster than the default per-tensor loop (``lmforge bench`` shows the
    optimizer's share of a step)."""
    fused = all(p.device.type in ("cuda", "cpu") for p in model.parameters())
    return torch.optim.AdamW(
        param_groups(model, weight_decay=cfg.weight_decay),
        lr=cfg.lr,
        betas=(cfg.beta1, cfg.beta2),
        eps=cfg.eps,
        fused=fused or None,
    )


def lr_factor(step: int, *, total_steps: int, cfg: OptimConfig) -> float:
    """Multiplier of the peak lr for optimizer step ``step`` (0-based) of ``total_steps``."""
    warmup = min(cfg.warmup_steps, max(total_steps - 1, 0))
    if step < warmup:
        return (step + 1) / (warmup + 1)
    if cfg.schedule == "constant":
        return 1.0
    floor = cfg.min_lr_ratio
    if cfg.schedule == "cosine":
        span = max(total_steps - warmup - 1, 1)
        progress = min((step - warmup) / span, 1.0)
        return floor + (1 - floor) * 0.5 * (1 + math.cos(math.pi * progress))
    # wsd: warmup, flat, then linear decay over the last decay_fraction of the run.
    decay_steps = max(int(round(cfg.decay_fraction * total_steps)), 1)
    decay_start = max(total_steps - decay_steps, warmup)
    if step < decay_start:
        return 1.0
    progress = min((step - decay_start + 1) / decay_steps, 1.0)
    return 1.0 - (1 - floor) * progress


def build_scheduler(
    optimizer: torch.optim.Optimizer, *, total_steps: int, cfg: OptimConfig
) -> torch.optim.lr_scheduler.LambdaLR:
    return torch.optim.lr_scheduler.LambdaLR(
        optimizer, lambda s: lr_factor(s, total_steps=total_steps, cfg=cfg)
    )
