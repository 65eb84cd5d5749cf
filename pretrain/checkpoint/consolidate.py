"""`lmforge consolidate`: one checkpoint of any layout -> a standalone model directory.

    OUT/model.safetensors   full weights (fp32 unless --dtype), names as in pretrain/model/transformer.py
    OUT/config.yaml         the run's resolved config (the `model` section builds the GPT)
    OUT/tokenizer.model     the SentencePiece model the run was trained with: the checkpoint's
                            own (older checkpoints: the file they name, while it is there)
    OUT/consolidated.json   where it came from: checkpoint, step, tokens, FLOPs, sha256 sums

The weights are rebuilt from the sharded state itself (DCP shards of DDP/FSDP/TP/pipelines,
or DeepSpeed's ZeRO partitions through zero_to_fp32), after the checkpoint's manifest checked
out, so no process group and no GPU are needed; the pickled parts (DCP metadata, DeepSpeed's
files) are read through pretrain/core/safeload.py, so a checkpoint from someone else runs no code.
The output holds safetensors weights only. The directory is written atomically.
"""

from __future__ import annotations

import json
import os
import shutil

import torch

from lmforge.pretrain.checkpoint.store import (
    best_checkpoint,
    checkpoint_tokenizer,
    latest_checkpoint,
    read_checkpoint_config,
    read_trainer_state,
    verify_checkpoint,
)
from lmforge.pretrain.core.durable import (
    atomic_directory,
    check_new_dir,
    sha256_file,
    write_durable,
)
from lmforge.pretrain.core.errors import CheckpointError, ConfigurationError
from lmforge.pretrain.core.safeload import deepspeed_reads
from lmforge.pretrain.data.tokenizer import load_tokenizer

DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}


def resolve_checkpoint(path: str) -> str:
    """A checkpoint directory, or a run directory: the checkpoint it marked best (a finetune
    run with ``early_stopping.keep_best``), else its latest."""
    if os.path.isfile(os.path.join(path, "manifest.json")):
        return path
    root = os.path.join(path, "checkpoints")
    found = (best_checkpoint(root) or latest_checkpoint(root)) if os.path.isdir(root) else None
    if found is None:
        raise CheckpointError(
            f"{path} is neither a checkpoint (no manifest.json) nor a run directory with "
            "checkpoints/latest; pass runs/<name> or runs/<name>/checkpoints/step_<N>"
        )
    return found


def full_weights(checkpoint: str) -> dict[str, torch.Tensor]:
    """fp32 weights of a verified checkpoint, rebuilt from its sharded state."""
    ds_dir = os.path.join(checkpoint, "deepspeed")
    if os.path.isdir(ds_dir):
        from deepspeed.utils.zero_to_fp32 import get_fp32_state_dict_from_zero_checkpoint

        from lmforge.pretrain.parallel.state import dedup_tied

        with deepspeed_reads(ds_dir):  # zero_to_fp32 unpickles with weights_only=False
            full = get_fp32_state_dict_from_zero_checkpoint(checkpoint, tag="deepspeed")
        return dedup_tied(full)
    from lmforge.pretrain.parallel.state import consolidated_weights

    tied = bool(read_checkpoint_config(checkpoint)["model"].get("tie_embeddings", False))
    return consolidated_weights(os.path.join(checkpoint, "dcp"), tied=tied)


def consolidate(path: str, *, out: str, dtype: str = "fp32") -> str:
    """Write the model directory of checkpoint (or run) ``path`` to ``out``; return ``out``."""
    from safetensors.torch import save

    if dtype not in DTYPES:
        raise ConfigurationError(f"--dtype {dtype}: use one of {', '.join(DTYPES)}")
    check_new_dir(out)
    checkpoint = resolve_checkpoint(path)
    verify_checkpoint(checkpoint)
    state = read_trainer_state(checkpoint)
    tokenizer = checkpoint_tokenizer(checkpoint, state)
    weights = {k: v.to(DTYPES[dtype]).contiguous() for k, v in full_weights(checkpoint).items()}

    with atomic_directory(out, prefix=".consolidate-") as tmp:
        write_durable(os.path.join(tmp, "model.safetensors"), save(weights, {"format": "pt"}))
        shutil.copyfile(os.path.join(checkpoint, "config.yaml"), os.path.join(tmp, "config.yaml"))
        if tokenizer:
            for name, file in load_tokenizer(tokenizer).files().items():
                shutil.copyfile(file, os.path.join(tmp, name))
        info = {
            "checkpoint": os.path.abspath(checkpoint),
            "step": state.get("step"),
            "tokens": state.get("tokens"),
            "flops": state.get("flops"),
            "dtype": dtype,
            "parameters": sum(v.numel() for v in weights.values()),
            "tokenizer_sha256": state.get("tokenizer_sha256"),
            "base": state.get("base"),  # a finetuned model's base compute (finetune/model.py)
        }
        info["sha256"] = {n: sha256_file(os.path.join(tmp, n)) for n in sorted(os.listdir(tmp))}
        write_durable(os.path.join(tmp, "consolidated.json"), json.dumps(info, indent=2).encode())
    print(
        f"consolidated {checkpoint} (step {info['step']}, {info['parameters']:,} parameters, "
        f"{dtype}) -> {out}"
    )
    return out
