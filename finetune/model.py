"""Models to finetune, evaluate, sample from or export, built from a model on disk
(pretrain/checkpoint/model_source.py reads them) and adapted: a task head, LoRA adapters."""

from __future__ import annotations

import torch

from lmforge.pretrain.checkpoint.model_source import ModelSource
from lmforge.pretrain.core.errors import CheckpointError
from lmforge.pretrain.model.transformer import GPT

# --------------------------------------------------------------------------------------------
# building
# --------------------------------------------------------------------------------------------


def wrap_lora(model: GPT, lora: dict) -> torch.nn.Module:
    """LoRA adapters (peft) on the named linears; the task/LM head stays trainable."""
    from peft import LoraConfig, get_peft_model

    peft_model = get_peft_model(
        model,
        LoraConfig(
            r=int(lora["r"]),
            lora_alpha=float(lora["alpha"]),
            lora_dropout=float(lora["dropout"]),
            target_modules=list(lora["target_modules"]),
            bias="none",
        ),
    )
    # peft freezes everything but the adapters; a new head must learn too. (Not through
    # modules_to_save: that renames the head's weights in every checkpoint.)
    peft_model.base_model.model.output.weight.requires_grad_(True)
    return peft_model


def build_model(src: ModelSource, *, merge: bool = True) -> GPT:
    """The model of a source with its weights, adapters merged (for inference and export)."""
    model = GPT(src.model, n_out=src.n_out)
    if src.lora:
        peft_model = wrap_lora(model, src.lora)
        _load(peft_model, src.weights, src.path)
        model = peft_model.merge_and_unload() if merge else peft_model
    else:
        _load(model, src.weights, src.path)
    return model.eval()


def _load(model: torch.nn.Module, weights: dict, where: str) -> None:
    missing, unexpected = model.load_state_dict(weights, strict=False)
    tied = getattr(model, "tied", False)
    missing = [k for k in missing if not (tied and k == "output.weight")]
    if missing or unexpected:
        raise CheckpointError(
            f"{where}: weights do not fit the model (missing {missing[:3]}, unexpected "
            f"{unexpected[:3]}); was it written by another version?"
        )
