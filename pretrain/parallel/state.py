"""Model and optimizer state in checkpoints, for every strategy but DeepSpeed's engines.

Model and optimizer go through torch.distributed.checkpoint (DCP) with FQN-keyed state dicts and
the optimizer state flattened per parameter (``state.<fqn>.exp_avg``, ``param_groups.<fqn>.lr``):
the same keys whatever the layout, and DCP reshards on load, so a checkpoint written by FSDP on 2
ranks, by TP=2 or by a 2-stage pipeline (each stage holding only its own parameters) resumes under
DDP on 1 and the other way round. A consolidated ``model.safetensors`` (full fp32 weights) is
written beside it, read back from the DCP files by rank 0: one code path for every layout, shared
with ``lmforge consolidate``.
"""

from __future__ import annotations

import io
import os
import warnings

import torch

from pretrain import dist as pdist
from pretrain.errors import CheckpointError


def _options():
    from torch.distributed.checkpoint.state_dict import StateDictOptions

    return StateDictOptions(flatten_optimizer_state_dict=True)


def _state_dicts(strategy, model, optimizer) -> tuple:
    from torch.distributed.checkpoint.state_dict import get_state_dict

    plain = strategy.unwrap(model)
    inner = getattr(optimizer, "optimizer", optimizer)  # Accelerate's AcceleratedOptimizer
    return plain, inner, *get_state_dict(plain, inner, options=_options())


def save_dcp_state(strategy, directory: str, *, model, optimizer, write_file, extra: dict) -> None:
    import torch.distributed.checkpoint as dcp
    from safetensors.torch import save

    plain, _, model_sd, optim_sd = _state_dicts(strategy, model, optimizer)
    dcp.save({"model": model_sd, "optim": optim_sd}, checkpoint_id=os.path.join(directory, "dcp"))
    pdist.barrier()  # every rank's shards are on disk before rank 0 reads them back
    if strategy.is_main:
        tied = bool(getattr(getattr(plain, "cfg", None), "tie_embeddings", False))
        full = consolidated_weights(os.path.join(directory, "dcp"), tied=tied)
        write_file("model.safetensors", save(full, metadata={"format": "pt"}))
        buf = io.BytesIO()
        torch.save(extra, buf)
        write_file("extra.pt", buf.getvalue())


def load_dcp_state(strategy, directory: str, *, model, optimizer) -> dict:
    """Load (and reshard) model and optimizer state; return the strategy's extra state.
    Called only after the checkpoint's manifest checked out (DCP metadata is pickled)."""
    import torch.distributed.checkpoint as dcp
    from torch.distributed.checkpoint.state_dict import set_state_dict

    plain, inner, model_sd, optim_sd = _state_dicts(strategy, model, optimizer)
    state = {"model": model_sd, "optim": optim_sd}
    dcp.load(state, checkpoint_id=os.path.join(directory, "dcp"))
    set_state_dict(
        plain,
        inner,
        model_state_dict=state["model"],
        optim_state_dict=state["optim"],
        options=_options(),
    )
    return torch.load(os.path.join(directory, "extra.pt"), map_location="cpu", weights_only=True)


def consolidated_weights(dcp_dir: str, *, tied: bool) -> dict[str, torch.Tensor]:
    """Full model weights from a DCP directory, whatever layout wrote it (no process group
    needed). With tied embeddings the head (`output.weight`) is the input table and is left out,
    as the rest of lmforge and Hugging Face's Llama expect."""
    import torch.distributed.checkpoint as dcp
    from torch.distributed.checkpoint.metadata import TensorStorageMetadata

    reader = dcp.FileSystemReader(dcp_dir)
    meta = reader.read_metadata().state_dict_metadata
    state = {
        key: torch.empty(m.size, dtype=m.properties.dtype)
        for key, m in meta.items()
        if key.startswith("model.") and isinstance(m, TensorStorageMetadata)
    }
    if not state:
        raise CheckpointError(f"{dcp_dir} holds no model weights")
    with warnings.catch_warnings():  # "assuming the intent is to load in a single process": yes
        warnings.simplefilter("ignore", UserWarning)
        dcp.load(state, storage_reader=reader, no_dist=True)
    out = {key.removeprefix("model."): t for key, t in state.items()}
    if tied:
        out.pop("output.weight", None)
    return out


def dedup_tied(state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Keep the first name of each tied tensor (the same data, shape and strides) and give every
    tensor its own storage: safetensors refuses shared storage, and views into one flat buffer
    (DeepSpeed's consolidated state) are not tied weights."""
    seen: set[tuple] = set()
    out = {}
    for k, v in state.items():
        ident = (v.data_ptr(), tuple(v.shape), v.stride())
        if v.numel() > 0 and ident in seen:
            continue
        seen.add(ident)
        out[k] = v.detach().cpu().clone()
    return out


def check_state_format(checkpoint: str, *, strategy: str) -> None:
    """Refuse a checkpoint whose sharded state this strategy cannot read. DDP, FSDP, TP and
    pipelines share one reshardable format (DCP, `dcp/`); DeepSpeed engines keep their own
    (`deepspeed/`)."""
    by_deepspeed = os.path.isdir(os.path.join(checkpoint, "deepspeed"))
    if by_deepspeed != (strategy == "deepspeed"):
        raise CheckpointError(
            f"{checkpoint} was written by "
            + (
                "a DeepSpeed engine: resume it with parallel.strategy=deepspeed"
                if by_deepspeed
                else "DDP/FSDP: resume it with parallel.strategy=ddp or fsdp"
            )
            + " (converting between DeepSpeed and DCP checkpoints is not supported yet)"
        )
