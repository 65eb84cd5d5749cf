"""float8 training (``train.precision=fp8``) through torchao.

The Linear layers of the transformer blocks (attention and MLP projections) run their three
matmuls (output, input gradient, weight gradient) in float8 with dynamic per-tensor scales
(``torchao.float8.convert_to_float8_training``); everything else computes in bf16, with fp32
master weights as under bf16. The LM or task head, projections wrapped by LoRA and layers whose
dimensions are not multiples of 16 (what float8 matmuls need) stay in bf16. Under FSDP2 the weights are
all-gathered in float8 and their scales computed for all layers at once after each optimizer
step (``precompute_float8_dynamic_scale_for_fsdp``).

float8 matmuls need an NVIDIA GPU of compute capability 8.9 or later (Ada, Hopper and newer).
:func:`float8_problem` says why this machine cannot train in float8 (the run's preflight
refuses it in one line); torchao is imported only when a run converts a model.
"""

from __future__ import annotations

import importlib.util

import torch
from torch import nn

from lmforge.pretrain.core import dist as pdist
from lmforge.pretrain.core.errors import ConfigurationError

MIN_CAPABILITY = (8, 9)
PROJECTIONS = ("wq", "wk", "wv", "wo", "w1", "w2", "w3")


def float8_problem(device_type: str) -> str | None:
    """Why ``train.precision=fp8`` cannot run on this machine's ``device_type`` ("cuda" or
    "cpu", as the run will use it), or None when it can."""
    if device_type != "cuda" or not torch.cuda.is_available():
        if torch.cuda.is_available():
            return "this run trains on the CPU (LMFORGE_FORCE_CPU=1): use train.precision=bf16"
        return "this machine has no CUDA GPU: use train.precision=bf16"
    capability = torch.cuda.get_device_capability()
    if capability < MIN_CAPABILITY:
        return (
            f"{torch.cuda.get_device_name()} has compute capability "
            f"{capability[0]}.{capability[1]}: use train.precision=bf16"
        )
    if importlib.util.find_spec("torchao") is None:
        return "torchao is not installed: pip install torchao (or lmforge[fp8])"
    return None


def check_float8(device_type: str) -> None:
    """Raise a one-line ConfigurationError when float8 training cannot run here."""
    problem = float8_problem(device_type)
    if problem is not None:
        raise ConfigurationError(
            "train.precision=fp8 needs an NVIDIA GPU with float8 (compute capability 8.9+, "
            f"H100-class) and torchao; {problem}"
        )


def float8_eligible(module: nn.Module, fqn: str) -> bool:
    """A transformer block's projection (wq ... w3: not the head, not one wrapped by LoRA)
    whose dimensions are multiples of 16."""
    parts = fqn.split(".")
    return (
        isinstance(module, nn.Linear)
        and "layers" in parts
        and parts[-1] in PROJECTIONS
        and module.in_features % 16 == 0
        and module.out_features % 16 == 0
    )


def convert_to_float8(model: nn.Module, *, fsdp: bool, emulate: bool = False) -> list[str]:
    """Swap the eligible Linear layers of ``model`` for torchao's Float8Linear, in place
    (parameter names, and so checkpoints, do not change), say so in one line on rank 0 and
    return their names. ``fsdp``: the weights will be sharded by FSDP2 and all-gathered in
    float8. ``emulate`` computes the float8 matmuls in high precision (for checking the
    conversion without float8 hardware)."""
    from torchao.float8 import Float8LinearConfig, convert_to_float8_training

    converted: list[str] = []

    def keep(module: nn.Module, fqn: str) -> bool:
        if float8_eligible(module, fqn):
            converted.append(fqn)
            return True
        return False

    config = Float8LinearConfig(enable_fsdp_float8_all_gather=fsdp, emulate=emulate)
    linears = sum(isinstance(m, nn.Linear) for m in model.modules())
    convert_to_float8_training(model, module_filter_fn=keep, config=config)
    pdist.print0(
        f"fp8: {len(converted)} of {linears} Linear layers compute in float8 (torchao"
        + (", float8 all-gathers" if fsdp else "")
        + f"); the other {linears - len(converted)} and the rest of the model in bf16"
    )
    return converted


def precompute_fsdp_scales(model: nn.Module) -> None:
    """The float8 scales of every FSDP2-sharded float8 weight, in one all-reduce (after each
    optimizer step and after loading weights; without it each all-gather computes its own)."""
    from torchao.float8 import precompute_float8_dynamic_scale_for_fsdp

    precompute_float8_dynamic_scale_for_fsdp(model)
