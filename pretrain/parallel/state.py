"""Model and optimizer state in checkpoints, for every strategy but DeepSpeed's engines.

Model and optimizer go through torch.distributed.checkpoint (DCP) with FQN-keyed state dicts and
the optimizer state flattened per parameter (``state.<fqn>.exp_avg``, ``param_groups.<fqn>.lr``):
the same keys whatever the layout, and DCP reshards on load, so a checkpoint written by FSDP on 2
ranks, by TP=2 or by a 2-stage pipeline (each stage holding only its own parameters) resumes under
DDP on 1 and the other way round. When the save asks for it (``checkpoint.consolidated``), a
consolidated ``model.safetensors`` (full fp32 weights) is written beside it, read back from the
DCP files by rank 0: one code path for every layout, shared with ``lmforge consolidate``. With
``checkpoint.async_save`` the same files are written by ``start_dcp_save``: the state is copied
to host memory first and written in the background. Each rank hashes (sha256) the DCP files it
writes as their bytes pass (``HashingWriter``), for the checkpoint's manifest.
"""

from __future__ import annotations

import argparse
import contextlib
import glob
import io
import os
import shutil
import tempfile
import warnings
from collections.abc import Callable

import torch

from lmforge.pretrain.core import dist as pdist
from lmforge.pretrain.core.durable import Digests
from lmforge.pretrain.core.errors import CheckpointError
from lmforge.pretrain.core.safeload import (
    dcp_reader,
    deepspeed_reads,
    load_dcp,
    load_deepspeed_file,
)


def _options():
    from torch.distributed.checkpoint.state_dict import StateDictOptions

    return StateDictOptions(flatten_optimizer_state_dict=True)


def _state_dicts(strategy, model, optimizer) -> tuple:
    from torch.distributed.checkpoint.state_dict import get_state_dict

    plain = strategy.unwrap(model)
    inner = getattr(optimizer, "optimizer", optimizer)  # Accelerate's AcceleratedOptimizer
    return plain, inner, *get_state_dict(plain, inner, options=_options())


WriteFile = Callable[[str, bytes], None]


def save_dcp_state(
    strategy, directory: str, *, model, optimizer, write_file, extra: dict, consolidated: bool
) -> Digests:
    """Write dcp/ (every rank) and rank 0's extra.pt, with model.safetensors when
    ``consolidated``; return the sha256 and size of the DCP files this rank wrote."""
    import torch.distributed.checkpoint as dcp

    from lmforge.pretrain.parallel.dcp_files import HashingFileSystemWriter

    plain, _, model_sd, optim_sd = _state_dicts(strategy, model, optimizer)
    writer = HashingFileSystemWriter(os.path.join(directory, "dcp"), root=directory)
    with warnings.catch_warnings():  # one process has no group: that is what it means
        warnings.filterwarnings("ignore", "torch.distributed is disabled", UserWarning)
        dcp.save({"model": model_sd, "optim": optim_sd}, storage_writer=writer)
    pdist.barrier()  # every rank's shards are on disk before rank 0 reads them back
    if strategy.is_main:
        _write_main_files(
            directory,
            tied=_tied(plain),
            extra=_to_bytes(extra),
            write_file=write_file,
            consolidated=consolidated,
        )
    return writer.digests


def start_dcp_save(
    strategy, directory: str, *, model, optimizer, extra: dict, group, consolidated: bool
) -> Callable[[WriteFile], Digests]:
    """``save_dcp_state`` in two halves (``checkpoint.async_save``). Now, on the training
    thread: model and optimizer state are copied to host memory (``dcp.async_save`` stages
    them) and DCP starts writing dcp/ on a thread of its own, its collectives on ``group`` (a
    gloo group that only checkpoints use, so that they never interleave with the training's).
    Returned: ``finish(write_file)``, for the background thread: it waits for that write
    (every rank's shards are on disk and fsynced when DCP's save returns on rank 0, which
    coordinates it), then rank 0 writes extra.pt (and model.safetensors, read back from dcp/,
    when ``consolidated``); it returns the digests of this rank's DCP files. The host copy is
    torch's default staging: new buffers for each save, freed once it is written (buffers kept
    across saves would hold a copy for the whole run for a few percent of the copy's time on a
    CPU)."""
    import torch.distributed.checkpoint as dcp
    from torch.distributed.checkpoint.staging import DefaultStager, StagingOptions

    from lmforge.pretrain.parallel.dcp_files import HashingFileSystemWriter

    plain, _, model_sd, optim_sd = _state_dicts(strategy, model, optimizer)
    tied, extra_bytes = _tied(plain), _to_bytes(extra)  # as they are now, not when it finishes
    writer = HashingFileSystemWriter(os.path.join(directory, "dcp"), root=directory)
    # the stager dcp.async_save makes when it is given none (the writer would stage otherwise)
    stager = DefaultStager(StagingOptions(False, False, False, False))
    try:
        response = dcp.async_save(
            {"model": model_sd, "optim": optim_sd},
            storage_writer=writer,
            async_stager=stager,
            process_group=group,
        )
    except BaseException:
        stager.close()
        raise
    # a Future; an AsyncSaveResponse (staging and upload) when torch stages in the background
    written = getattr(response, "upload_completion", response)
    written.add_done_callback(lambda _: stager.close())

    def finish(write_file: WriteFile) -> Digests:
        written.result()
        if strategy.is_main:
            _write_main_files(
                directory,
                tied=tied,
                extra=extra_bytes,
                write_file=write_file,
                consolidated=consolidated,
            )
        return writer.digests

    return finish


def _tied(plain) -> bool:
    return bool(getattr(getattr(plain, "cfg", None), "tie_embeddings", False))


def _to_bytes(extra: dict) -> bytes:
    buf = io.BytesIO()
    torch.save(extra, buf)
    return buf.getvalue()


def consolidated_bytes(dcp_dir: str, *, tied: bool) -> bytes:
    """The consolidated ``model.safetensors`` of a DCP directory, in memory."""
    from safetensors.torch import save

    return save(consolidated_weights(dcp_dir, tied=tied), metadata={"format": "pt"})


def _write_main_files(
    directory: str, *, tied: bool, extra: bytes, write_file: WriteFile, consolidated: bool
) -> None:
    """Rank 0, once dcp/ is complete: the strategy's extra state and, when ``consolidated``,
    the full weights."""
    if consolidated:
        write_file(
            "model.safetensors", consolidated_bytes(os.path.join(directory, "dcp"), tied=tied)
        )
    write_file("extra.pt", extra)


def load_dcp_state(strategy, directory: str, *, model, optimizer) -> dict:
    """Load (and reshard) model and optimizer state; return the strategy's extra state.
    DCP's pickled metadata and entries are read through pretrain/core/safeload.py (a checkpoint may
    come from anyone). A checkpoint written by a DeepSpeed engine is converted on the way in."""
    from torch.distributed.checkpoint.state_dict import set_state_dict

    if os.path.isdir(os.path.join(directory, "deepspeed")):
        load_deepspeed_state(strategy, directory, model=model, optimizer=optimizer)
        return {}

    plain, inner, model_sd, optim_sd = _state_dicts(strategy, model, optimizer)
    state = {"model": model_sd, "optim": optim_sd}
    load_dcp(state, os.path.join(directory, "dcp"))
    set_state_dict(
        plain,
        inner,
        model_state_dict=state["model"],
        optim_state_dict=state["optim"],
        options=_options(),
    )
    return torch.load(os.path.join(directory, "extra.pt"), map_location="cpu", weights_only=True)


def load_deepspeed_state(strategy, directory: str, *, model, optimizer) -> None:
    """Resume a DeepSpeed (ZeRO 0-3) checkpoint under DDP, FSDP, TP or a pipeline: DeepSpeed's
    own converter (``ds_to_universal``) turns its flat partitions into per-parameter fp32
    weights and Adam moments, which are then loaded as a full state dict and resharded by
    ``set_state_dict`` to this layout. Each rank converts into a private temporary directory
    (the shards are read, never changed; DeepSpeed reads them inside ``deepspeed_reads``)."""
    from deepspeed.checkpoint import ds_to_universal
    from torch.distributed.checkpoint.state_dict import (
        StateDictOptions,
        get_state_dict,
        set_state_dict,
    )

    ds_dir = os.path.join(directory, "deepspeed")
    tmp = tempfile.mkdtemp(prefix="lmforge-universal-")  # private: removed once loaded
    try:
        args = argparse.Namespace(
            input_folder=ds_dir,
            output_folder=os.path.join(tmp, "universal"),
            num_extract_workers=1,
            num_merge_workers=1,
            keep_temp_folder=False,
            strict=True,
            inject_missing_state=False,
        )
        with (
            deepspeed_reads(ds_dir),
            contextlib.redirect_stdout(io.StringIO()),
            contextlib.redirect_stderr(io.StringIO()),
        ):
            ds_to_universal.main(args)
        params = os.path.join(tmp, "universal", "zero")
        step, groups = _deepspeed_optimizer_meta(ds_dir)

        def tensor(fqn: str, name: str, like: torch.Tensor) -> torch.Tensor:
            # ZeRO-3's universal tensors are flat: take the parameter's shape
            t = torch.load(os.path.join(params, fqn, name + ".pt"), weights_only=True)
            t = t["param"] if isinstance(t, dict) else t  # ZeRO-1/2 files: {"param": ..., ...}
            return t.reshape(like.shape)

        plain = strategy.unwrap(model)
        inner = getattr(optimizer, "optimizer", optimizer)
        # Nested (not flattened) optimizer state: torch 2.13's set_state_dict fails on a full
        # state dict that is also flattened.
        options = StateDictOptions(full_state_dict=True)
        model_sd, optim_sd = get_state_dict(plain, inner, options=options)  # FQN-keyed
        model_sd = {fqn: tensor(fqn, "fp32", like) for fqn, like in model_sd.items()}
        for fqn, state in optim_sd["state"].items():
            for name, like in state.items():
                state[name] = (
                    torch.tensor(float(step)) if name == "step" else tensor(fqn, name, like)
                )
        if len(groups) != len(optim_sd["param_groups"]):
            raise CheckpointError(
                f"{directory}: the DeepSpeed optimizer has {len(groups)} parameter groups, this "
                f"run's {len(optim_sd['param_groups'])}; resume with the same optim settings"
            )
        for ours, theirs in zip(optim_sd["param_groups"], groups, strict=True):
            ours.update(theirs)  # the learning rate (and decay) where the run stopped
        set_state_dict(
            plain, inner, model_state_dict=model_sd, optim_state_dict=optim_sd, options=options
        )
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    pdist.print0(
        f"converted {directory} from DeepSpeed ZeRO to this layout (weights and Adam state)"
    )


def _deepspeed_optimizer_meta(ds_dir: str) -> tuple[int, list[dict]]:
    """Adam's step count (every parameter steps together) and the client optimizer's parameter
    groups (learning rate at the checkpoint, decay, betas) from a DeepSpeed checkpoint."""
    path = sorted(glob.glob(os.path.join(ds_dir, "*optim_states.pt")))[0]
    state = load_deepspeed_file(path)["optimizer_state_dict"]
    # the client optimizer's own state dict: ZeRO-3 and ZeRO-1/2 name it differently
    inner = state.get("optimizer_state_dict") or state.get("base_optimizer_state") or state
    steps = [int(v["step"]) for v in inner["state"].values() if "step" in v]
    groups = [{k: v for k, v in g.items() if k != "params"} for g in inner["param_groups"]]
    return (max(steps) if steps else 0), groups


def consolidated_weights(dcp_dir: str, *, tied: bool) -> dict[str, torch.Tensor]:
    """Full model weights from a DCP directory, whatever layout wrote it (no process group
    needed). With tied embeddings the head (`output.weight`) is the input table and is left out,
    as the rest of lmforge and Hugging Face's Llama expect."""
    from torch.distributed.checkpoint.metadata import TensorStorageMetadata

    meta = dcp_reader(dcp_dir).read_metadata().state_dict_metadata
    state = {
        key: torch.empty(m.size, dtype=m.properties.dtype)
        for key, m in meta.items()
        if key.startswith("model.") and isinstance(m, TensorStorageMetadata)
    }
    if not state:
        raise CheckpointError(f"{dcp_dir} holds no model weights")
    with warnings.catch_warnings():  # "assuming the intent is to load in a single process": yes
        warnings.simplefilter("ignore", UserWarning)
        load_dcp(state, dcp_dir, no_dist=True)
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
    pipelines share one reshardable format (DCP, `dcp/`) and also read DeepSpeed's
    (`deepspeed/`, converted on load); DeepSpeed engines read only their own."""
    by_deepspeed = os.path.isdir(os.path.join(checkpoint, "deepspeed"))
    if strategy == "deepspeed" and not by_deepspeed:
        raise CheckpointError(
            f"{checkpoint} was written by DDP/FSDP/TP/PP (torch.distributed.checkpoint), which a "
            "DeepSpeed engine cannot load: resume it with parallel.strategy=ddp or fsdp "
            "(DeepSpeed checkpoints convert the other way, not this one)"
        )


def measured_state_bytes(model, optimizer) -> dict[str, int]:
    """Bytes this rank really holds of parameters and optimizer state (moments, step counts and
    DeepSpeed's fp32 master partitions): local shards of DTensors (FSDP, TP), ZeRO-3 partitions
    (``ds_tensor``). What the estimate's `params` + `optimizer` should match."""

    def local(t):
        t = getattr(t, "ds_tensor", t)  # ZeRO-3 keeps only this rank's partition
        return t.to_local() if hasattr(t, "to_local") else t

    def nbytes(t) -> int:
        return local(t).numel() * t.element_size()

    params = sum(nbytes(p) for p in {id(p): p for p in model.parameters()}.values())
    inner = getattr(model, "optimizer", None)  # a DeepSpeed engine's ZeRO optimizer
    client = getattr(inner, "optimizer", None) or getattr(optimizer, "optimizer", optimizer)
    state = sum(
        nbytes(t) for st in client.state.values() for t in st.values() if torch.is_tensor(t)
    )
    for name in ("fp32_partitioned_groups_flat", "single_partition_of_fp32_groups"):
        # DeepSpeed's fp32 master partitions: the client optimizer steps them, in place of the
        # (bf16 or fp32) model parameters
        state += sum(t.numel() * t.element_size() for t in getattr(inner, name, None) or [])
    return {"params": params, "optimizer": state}
