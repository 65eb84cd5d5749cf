"""Models to finetune, evaluate, sample from or export, built from a model on disk
(pretrain/checkpoint/model_source.py reads them) and adapted: a task head, LoRA adapters."""

from __future__ import annotations

import torch

from lmforge.pretrain.checkpoint.model_source import ModelSource, load_weights_into
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
        load_weights_into(peft_model, src.weights, src.path)
        model = peft_model.merge_and_unload() if merge else peft_model
    else:
        load_weights_into(model, src.weights, src.path)
    return model.eval()
