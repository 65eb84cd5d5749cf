"""Atomic, verified checkpoints.

Layout of ``<run>/checkpoints/``::

    step_00000100/          one complete checkpoint
        dcp/                model and optimizer state as torch.distributed.checkpoint shards
                            (DDP, FSDP, TP, pipelines: one FQN-keyed format, resharded on load)
        extra.pt            the strategy's other state, e.g. DDP's grad scaler (may be empty)
        deepspeed/          instead of dcp/ and extra.pt under a DeepSpeed engine: its own
                            checkpoint (ZeRO partitions of model and optimizer state)
        model.safetensors   consolidated full fp32 weights, from dcp/ or deepspeed/ (rank 0)
        rng_rank00000.pt    python / numpy / torch (/ cuda) RNG states of each rank
        trainer_state.json  counters, data position, scheduler, tokenizer reference
        config.yaml         the resolved config of the run
        manifest.json       format version + sha256 and size of every file above (written last)
    latest                  text file naming the newest good step directory (replaced last)

A save writes into ``.step_XXXXXXXX.tmp``, fsyncs every file and the directory, renames it into
place, fsyncs the parent, then replaces ``latest`` the same way. A crash at any moment leaves the
previous ``latest`` pointing at a complete checkpoint; stale temp directories are removed at the next
save. Loading checks the manifest first, so pickled state (DCP metadata, ``extra.pt``, DeepSpeed's
files, RNG) is read only from lmforge's own checkpoints whose sums match; lmforge's own ``.pt``
files (``extra.pt``, RNG) are then loaded with ``weights_only=True``. The strategies write and
read dcp/, extra.pt, deepspeed/ and model.safetensors (pretrain/parallel/state.py, zero.py).
"""

from __future__ import annotations

import io
import json
import os
import random
import re
import shutil
import time

import numpy as np
import torch

from pretrain import dist as pdist
from pretrain.durable import fault_point, fsync_dir, replace_durable, sha256_file, write_durable
from pretrain.errors import CheckpointError

FORMAT_VERSION = 1
STEP_DIR = re.compile(r"^step_(\d{8})$")


def step_dir_name(step: int) -> str:
    return f"step_{step:08d}"


# --- RNG ---------------------------------------------------------------------------------------


def rng_state() -> dict:
    np_state = np.random.get_state()
    state = {
        "python": random.getstate(),
        "numpy": [np_state[0], torch.from_numpy(np_state[1].astype(np.int64)), *np_state[2:]],
        "torch": torch.get_rng_state(),
    }
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state()
    return state


def set_rng_state(state: dict) -> None:
    py = state["python"]
    random.setstate((py[0], tuple(py[1]), py[2]))
    kind, keys, *rest = state["numpy"]
    np.random.set_state((kind, keys.numpy().astype(np.uint32), *rest))
    torch.set_rng_state(state["torch"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state(state["cuda"])


# --- save --------------------------------------------------------------------------------------


def save_checkpoint(
    *,
    root: str,
    step: int,
    strategy,
    model,
    optimizer,
    trainer_state: dict,
    config_yaml: str,
    keep_last: int,
) -> str:
    """Save a complete checkpoint of ``step`` under ``root``; every rank calls this together."""
    final = os.path.join(root, step_dir_name(step))
    tmp = os.path.join(root, f".{step_dir_name(step)}.tmp")
    if strategy.is_main:
        os.makedirs(root, exist_ok=True)
        for name in os.listdir(root):  # leftovers of a crashed save
            if name.startswith(".step_") and name.endswith(".tmp"):
                shutil.rmtree(os.path.join(root, name), ignore_errors=True)
        os.makedirs(tmp)
    pdist.barrier()

    def write_file(name: str, data: bytes) -> None:
        write_durable(os.path.join(tmp, name), data, step=step)

    strategy.save_state(tmp, model=model, optimizer=optimizer, write_file=write_file)
    buf = io.BytesIO()
    torch.save(rng_state(), buf)
    write_file(f"rng_rank{strategy.rank:05d}.pt", buf.getvalue())
    if strategy.is_main:
        state = dict(trainer_state, format_version=FORMAT_VERSION, world_size=strategy.world_size)
        write_file("trainer_state.json", json.dumps(state, indent=1).encode())
        write_file("config.yaml", config_yaml.encode())
    pdist.barrier()  # every rank's files are on disk

    if strategy.is_main:
        files = {
            name: {
                "sha256": sha256_file(os.path.join(tmp, name)),
                "bytes": os.path.getsize(os.path.join(tmp, name)),
            }
            for name in _files_under(tmp)
        }
        manifest = {
            "format_version": FORMAT_VERSION,
            "step": step,
            "created": time.time(),
            "files": files,
        }
        write_file("manifest.json", json.dumps(manifest, indent=1).encode())
        fsync_dir(tmp)
        fault_point("save:before-rename", step=step)
        if os.path.exists(final):  # a previous attempt reached this step but not `latest`
            shutil.rmtree(final)
        os.rename(tmp, final)
        fsync_dir(root)
        fault_point("save:before-latest", step=step)
        replace_durable(os.path.join(root, "latest"), (step_dir_name(step) + "\n").encode())
        _prune(root, keep_last=keep_last, protect=step_dir_name(step))
    pdist.barrier()
    return final


def _files_under(root: str) -> list[str]:
    """Every file below ``root`` as a relative path (sharded state lives in subdirectories),
    fsyncing each subdirectory on the way: the rename of ``root`` must publish them complete."""
    out = []
    for dirpath, _, names in os.walk(root):
        if dirpath != root:
            fsync_dir(dirpath)
        out.extend(os.path.relpath(os.path.join(dirpath, n), root) for n in names)
    return sorted(out)


def _prune(root: str, *, keep_last: int, protect: str) -> None:
    """Keep the newest ``keep_last`` checkpoints, ``protect`` and the one ``best`` names."""
    steps = sorted(n for n in os.listdir(root) if STEP_DIR.match(n))
    keep = {protect, _pointer(root, "best")}
    for name in steps[:-keep_last]:
        if name not in keep:
            shutil.rmtree(os.path.join(root, name), ignore_errors=True)


def mark_best(root: str, step: int | None) -> None:
    """Name checkpoint ``step`` under ``root`` as the run's best (finetuning's
    ``early_stopping.keep_best``): kept from pruning, and what a run directory resolves to in
    export, evaluate, generate, consolidate and init_from. None removes the mark."""
    path = os.path.join(root, "best")
    if step is None:
        if os.path.exists(path):
            os.remove(path)
            fsync_dir(root)
        return
    replace_durable(path, (step_dir_name(step) + "\n").encode())


# --- find, verify, load ------------------------------------------------------------------------


def _pointer(root: str, which: str) -> str | None:
    """The directory name the pointer file ``root/which`` holds, or None without one."""
    pointer = os.path.join(root, which)
    if not os.path.isfile(pointer):
        return None
    with open(pointer) as f:
        return f.read().strip()


def best_checkpoint(root: str) -> str | None:
    """The checkpoint ``best`` names (see ``mark_best``), or None."""
    name = _pointer(root, "best")
    path = os.path.join(root, name) if name else None
    return path if path and STEP_DIR.match(name) and os.path.isdir(path) else None


def latest_checkpoint(root: str) -> str | None:
    """The checkpoint ``latest`` names, or None when the run has none yet."""
    name = _pointer(root, "latest")
    if name is None:
        return None
    pointer = os.path.join(root, "latest")
    path = os.path.join(root, name)
    if not STEP_DIR.match(name) or not os.path.isdir(path):
        raise CheckpointError(
            f"{pointer} names {name!r}, which is not a checkpoint directory; "
            f"pass resume=<a step_* directory under {root}>"
        )
    return path


def verify_checkpoint(path: str) -> dict:
    """Check the manifest's format version and every file's sha256; return the manifest."""
    mpath = os.path.join(path, "manifest.json")
    if not os.path.isfile(mpath):
        raise CheckpointError(f"{path} is not a complete lmforge checkpoint (no manifest.json)")
    try:
        with open(mpath, encoding="utf-8") as f:
            manifest = json.load(f)
    except (UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise CheckpointError(
            f"{mpath} is not valid JSON ({exc}): the checkpoint is corrupt; use an earlier one"
        ) from None
    if not isinstance(manifest, dict) or not isinstance(manifest.get("files"), dict):
        what = (
            "holds prepared data (`lmforge prepare`'s output)"
            if isinstance(manifest, dict) and "splits" in manifest
            else "has a manifest.json that is not a checkpoint's"
        )
        raise CheckpointError(
            f"{path} {what}, not a checkpoint: pass a run, a checkpoint or a model directory"
        )
    if manifest.get("format_version") != FORMAT_VERSION:
        raise CheckpointError(
            f"{path} has checkpoint format {manifest.get('format_version')}, this lmforge reads "
            f"{FORMAT_VERSION}"
        )
    for name, info in manifest["files"].items():
        fpath = os.path.join(path, name)
        if not os.path.isfile(fpath):
            raise CheckpointError(f"checkpoint file {fpath} is missing; resume from another one")
        digest = sha256_file(fpath)
        if digest != info["sha256"]:
            raise CheckpointError(
                f"checkpoint file {fpath} does not match its manifest (sha256 {digest[:12]}… != "
                f"{info['sha256'][:12]}…): it is corrupt; resume from an earlier checkpoint"
            )
    return manifest


def read_trainer_state(path: str) -> dict:
    with open(os.path.join(path, "trainer_state.json")) as f:
        return json.load(f)


def load_checkpoint(path: str, *, strategy, model, optimizer, restore_rng: bool = True) -> dict:
    """Load a verified checkpoint into model and optimizer; restore this rank's RNG states."""
    verify_checkpoint(path)
    state = read_trainer_state(path)
    strategy.load_state(path, model=model, optimizer=optimizer)
    rng_file = os.path.join(path, f"rng_rank{strategy.rank:05d}.pt")
    if restore_rng and state.get("world_size") == strategy.world_size and os.path.isfile(rng_file):
        set_rng_state(torch.load(rng_file, weights_only=True))
    elif restore_rng:
        pdist.print0(
            f"warning: checkpoint was written by {state.get('world_size')} ranks, this run has "
            f"{strategy.world_size}: RNG streams (dropout) restart from the seed"
        )
    return state
