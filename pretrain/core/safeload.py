"""Reading a checkpoint that someone else may have written, without running their code.

A checkpoint's manifest (sha256 of every file) shows that its files are the ones written with it,
not that whoever wrote them meant well: a crafted checkpoint comes with a manifest that matches.
Unpickling runs whatever callable a pickle names, so every pickled file lmforge reads from a
checkpoint goes through a check here first:

- ``dcp/.metadata`` (which torch's reader unpickles with plain ``pickle.load``): ``SafeReader``
  unpickles it with ``MetadataUnpickler``, which resolves only the classes in
  ``DCP_METADATA_GLOBALS`` (and torch's dtypes): what DCP writes for DDP, FSDP, TP and pipelines.
- DCP's non-tensor entries (the optimizer's hyperparameters, which torch's planner loads with
  ``weights_only=False``): ``SafeLoadPlanner`` loads them with ``weights_only=True``.
- lmforge's own ``.pt`` files (``extra.pt``, RNG states): ``torch.load(weights_only=True)``.
- DeepSpeed's files (``deepspeed/``), which DeepSpeed's engine and converters load with
  ``weights_only=False``: ``deepspeed_reads`` refuses any file whose pickle names a global outside
  torch's ``weights_only`` set and ``DEEPSPEED_GLOBALS`` before DeepSpeed opens it, then makes
  DeepSpeed's own ``torch.load`` calls ``weights_only=True`` while it reads them.

A refusal is a ``CheckpointError`` naming the file and the global. ``--trust-checkpoint`` (the
CLI sets ``LMFORGE_TRUST_CHECKPOINT=1``, so that worker processes see it too) turns the checks
off for a checkpoint whose source the user trusts. Weights that leave lmforge or come in from
elsewhere (``consolidate``, ``export``, Hugging Face directories) are safetensors, which hold
no code.
"""

from __future__ import annotations

import contextlib
import functools
import importlib
import os
import pickle
import re

import torch

from lmforge.pretrain.core.errors import CheckpointError

TRUST_ENV = "LMFORGE_TRUST_CHECKPOINT"
TRUST_HINT = "pass --trust-checkpoint only if you trust where this checkpoint came from"

# Every global a DCP metadata pickle names, as torch 2.11-2.13 write them for DDP, FSDP, TP and
# pipeline checkpoints (and torch.<dtype>, see `_allowed_in_metadata`). Each is a plain data
# class, an enum, torch.Size, a path, or torch's layout lookup by name: calling any of them with
# whatever arguments a pickle supplies builds data and runs nothing else.
DCP_METADATA_GLOBALS = frozenset(
    {
        ("torch.distributed.checkpoint.metadata", "Metadata"),
        ("torch.distributed.checkpoint.metadata", "MetadataIndex"),
        ("torch.distributed.checkpoint.metadata", "StorageMeta"),
        ("torch.distributed.checkpoint.metadata", "TensorStorageMetadata"),
        ("torch.distributed.checkpoint.metadata", "BytesStorageMetadata"),
        ("torch.distributed.checkpoint.metadata", "ChunkStorageMetadata"),
        ("torch.distributed.checkpoint.metadata", "TensorProperties"),
        ("torch.distributed.checkpoint.metadata", "_MEM_FORMAT_ENCODING"),
        ("torch.distributed.checkpoint.filesystem", "_StorageInfo"),
        ("torch.serialization", "_get_layout"),
        ("torch", "Size"),
        ("pathlib", "PosixPath"),  # StorageMeta.checkpoint_id
    }
)

# The globals of DeepSpeed's ZeRO checkpoints beyond torch's own weights_only set (tensors,
# storages, torch.Size, OrderedDict): the optimizer file's loss scaler (a DynamicLossScaler with
# fp16), ZeRO stage enum and, for ZeRO-1/2, the parameter slice mappings.
DEEPSPEED_GLOBALS = frozenset(
    {
        "deepspeed.runtime.fp16.loss_scaler.LossScaler",
        "deepspeed.runtime.fp16.loss_scaler.DynamicLossScaler",
        "deepspeed.runtime.zero.config.ZeroStageEnum",
        "deepspeed.utils.tensor_fragment.fragment_address",
    }
)


def trusted() -> bool:
    """Whether the user vouched for the checkpoint (--trust-checkpoint): no checks then."""
    return os.environ.get(TRUST_ENV, "") not in ("", "0")


def _refused(path, what: str) -> CheckpointError:
    return CheckpointError(f"{path}: {what}; refusing to load it (it could run code): {TRUST_HINT}")


def _why_not_weights_only(exc: Exception) -> str:
    """What torch's weights_only unpickler refused, from its (many-line) message."""
    text = str(exc)
    found = re.search(r"GLOBAL (\S+)", text)
    if found:
        return f"names {found.group(1)}, which lmforge's checkpoints never hold"
    lines = [line.strip() for line in text.splitlines() if line.strip()]
    useful = [line for line in lines if not line.startswith(("Weights only", "Check the doc"))]
    return (useful or lines or [type(exc).__name__])[0]


# --- torch.distributed.checkpoint --------------------------------------------------------------


def _allowed_in_metadata(module: str, name: str) -> bool:
    if (module, name) in DCP_METADATA_GLOBALS:
        return True
    return module == "torch" and isinstance(getattr(torch, name, None), torch.dtype)


class MetadataUnpickler(pickle.Unpickler):
    """Unpickles DCP metadata, resolving only the globals DCP metadata holds."""

    def __init__(self, file, *, source) -> None:
        super().__init__(file)
        self.source = source

    def find_class(self, module: str, name: str):
        if not _allowed_in_metadata(module, name):
            raise _refused(self.source, f"names {module}.{name}, which DCP metadata never holds")
        return super().find_class(module, name)


def read_dcp_metadata(path):
    """The Metadata object of a DCP metadata file, unpickled by ``MetadataUnpickler`` and
    checked: its shards must be files of the checkpoint's own directory."""
    from torch.distributed.checkpoint.filesystem import _StorageInfo
    from torch.distributed.checkpoint.metadata import Metadata

    try:
        with open(path, "rb") as f:
            metadata = MetadataUnpickler(f, source=path).load()
    except CheckpointError:
        raise
    except FileNotFoundError:
        raise CheckpointError(f"{path} is missing: not a complete DCP checkpoint") from None
    except Exception as exc:  # any malformed pickle: truncated, wrong opcodes, bad arguments
        raise CheckpointError(f"{path} is not DCP metadata ({type(exc).__name__}: {exc})") from None
    if not isinstance(metadata, Metadata):
        raise _refused(path, f"holds a {type(metadata).__name__}, not DCP metadata")
    for info in (metadata.storage_data or {}).values():
        name = getattr(info, "relative_path", None)
        if (
            not isinstance(info, _StorageInfo)
            or not isinstance(name, str)
            or name in ("", ".", "..")
            or os.path.basename(name) != name
        ):
            raise _refused(path, f"points at {name!r}, which is not a file beside it")
    return metadata


@functools.cache
def _reader_class():
    from torch.distributed.checkpoint import FileSystemReader
    from torch.distributed.checkpoint.metadata import StorageMeta

    class SafeReader(FileSystemReader):
        """torch's file-system reader with the metadata read by ``read_dcp_metadata``."""

        def read_metadata(self, *args, **kwargs):
            if trusted():
                return super().read_metadata(*args, **kwargs)
            rank = kwargs.get("rank")
            if hasattr(self, "_get_metadata_path"):  # torch >= 2.12: per-rank metadata too
                path = self._get_metadata_path(rank)
            else:
                path = self.fs.concat_path(self.path, ".metadata")
            metadata = read_dcp_metadata(path)
            # as FileSystemReader.read_metadata does after unpickling
            if getattr(metadata, "storage_meta", None) is None:
                metadata.storage_meta = StorageMeta()
            metadata.storage_meta.load_id = self.load_id
            return metadata

    return SafeReader


@functools.cache
def _planner_class():
    from torch.distributed.checkpoint import DefaultLoadPlanner
    from torch.distributed.checkpoint._traverse import set_element

    class SafeLoadPlanner(DefaultLoadPlanner):
        """torch's default load planner, loading non-tensor entries with weights_only=True."""

        def __init__(self, dcp_dir: str, **kwargs) -> None:
            super().__init__(**kwargs)
            self.dcp_dir = dcp_dir

        def load_bytes(self, read_item, value) -> None:
            if trusted():
                return super().load_bytes(read_item, value)
            fqn = read_item.dest_index.fqn
            try:
                obj = torch.load(value, weights_only=True)
            except pickle.UnpicklingError as exc:
                storage = getattr(self, "metadata", None) and self.metadata.storage_data
                name = storage[read_item.storage_index].relative_path if storage else "?"
                where = f"{os.path.join(self.dcp_dir, name)} (entry {fqn})"
                raise _refused(where, _why_not_weights_only(exc)) from None
            # as DefaultLoadPlanner.load_bytes does with what it unpickled
            if self.flatten_state_dict:
                set_element(self.original_state_dict, self.mappings[fqn], obj)
            else:
                self.state_dict[fqn] = obj

    return SafeLoadPlanner


def dcp_reader(dcp_dir: str):
    """A ``FileSystemReader`` of ``dcp_dir`` that reads its metadata safely."""
    return _reader_class()(dcp_dir)


def dcp_planner(dcp_dir: str, **kwargs):
    """A ``DefaultLoadPlanner`` that loads the non-tensor entries of ``dcp_dir`` with
    ``weights_only=True``."""
    return _planner_class()(dcp_dir, **kwargs)


def load_dcp(state: dict, dcp_dir: str, **kwargs) -> None:
    """``dcp.load(state)`` from ``dcp_dir`` through ``dcp_reader`` and ``dcp_planner``. A refusal
    is raised as itself (DCP would wrap it into a CheckpointException with a traceback)."""
    import torch.distributed.checkpoint as dcp
    from torch.distributed.checkpoint.api import CheckpointException

    reader = dcp_reader(dcp_dir)
    reader.read_metadata()  # refuse here, on every rank alike, before DCP's collectives
    try:
        dcp.load(state, storage_reader=reader, planner=dcp_planner(dcp_dir), **kwargs)
    except CheckpointException as exc:
        for failure in exc.failures.values():
            inner = failure[0] if isinstance(failure, tuple) else failure
            if isinstance(inner, CheckpointError):
                raise inner from None
        raise


# --- DeepSpeed ---------------------------------------------------------------------------------


def check_deepspeed_files(ds_dir: str) -> None:
    """Refuse a DeepSpeed checkpoint directory holding a file that is not a ``torch.save`` zip
    or whose pickle names a global outside torch's weights_only set and ``DEEPSPEED_GLOBALS``.
    The pickles are read as opcodes, never run."""
    from torch.serialization import get_unsafe_globals_in_checkpoint

    for dirpath, _, names in sorted(os.walk(ds_dir)):
        for name in sorted(names):
            path = os.path.join(dirpath, name)
            try:
                found = get_unsafe_globals_in_checkpoint(path)
            except Exception as exc:  # not a torch zip, TorchScript, an opcode torch never writes
                what = str(exc).strip().splitlines()[0] if str(exc).strip() else ""
                raise _refused(
                    path, f"is not a plain torch.save file ({type(exc).__name__}: {what})"
                ) from None
            unexpected = sorted(set(found) - DEEPSPEED_GLOBALS)
            if unexpected:
                raise _refused(
                    path, f"names {unexpected[0]}, which DeepSpeed's checkpoints never hold"
                )


def _deepspeed_safe_globals() -> list:
    out = []
    for dotted in sorted(DEEPSPEED_GLOBALS):
        module, _, name = dotted.rpartition(".")
        out.append(getattr(importlib.import_module(module), name))
    return out


def load_deepspeed_file(path: str):
    """One of DeepSpeed's checkpoint files, unpickled with weights_only=True."""
    try:
        with torch.serialization.safe_globals(_deepspeed_safe_globals()):
            return torch.load(path, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as exc:
        if trusted():
            return torch.load(path, map_location="cpu", weights_only=False)
        raise _refused(path, _why_not_weights_only(exc)) from None


@contextlib.contextmanager
def deepspeed_reads(ds_dir: str):
    """Hand DeepSpeed's checkpoint directory ``ds_dir`` to DeepSpeed inside this block: every file
    is checked first (``check_deepspeed_files``), and DeepSpeed's ``torch.load`` calls, which ask
    for ``weights_only=False``, get ``weights_only=True`` with ``DEEPSPEED_GLOBALS`` allowed (the
    check reads opcodes; this makes the unpickling itself as strict)."""
    if trusted():
        yield
        return
    check_deepspeed_files(ds_dir)
    allowed = _deepspeed_safe_globals()
    real_load = torch.load

    @functools.wraps(real_load)
    def strict_load(*args, **kwargs):
        kwargs["weights_only"] = True
        with torch.serialization.safe_globals(allowed):
            return real_load(*args, **kwargs)

    torch.load = strict_load
    try:
        yield
    finally:
        torch.load = real_load
