"""Atomic, verified checkpoints.

Layout of ``<run>/checkpoints/``::

    step_00000100/          one complete checkpoint
        dcp/                model and optimizer state as torch.distributed.checkpoint shards
                            (DDP, FSDP, TP, pipelines: one FQN-keyed format, resharded on load)
        extra.pt            the strategy's other state, e.g. DDP's grad scaler (may be empty)
        deepspeed/          instead of dcp/ and extra.pt under a DeepSpeed engine: its own
                            checkpoint (ZeRO partitions of model and optimizer state)
        model.safetensors   consolidated full fp32 weights, from dcp/ or deepspeed/ (rank 0);
                            only in the checkpoint saved at the end of training by default
                            (``checkpoint.consolidated``: final, every or never). Nothing reads
                            it back: consolidate, export, generate, evaluate, init_from and
                            resume rebuild the weights from dcp/ or deepspeed/
        rng_rank00000.pt    python / numpy / torch (/ cuda) RNG states of each rank
        tokenizer.model     the tokenizer the run trains with (rank 0): a SentencePiece model,
        (or tokenizer.json  or a Hugging Face tokenizer.json with the files beside it that
         and its files)     name its special tokens), so that a checkpoint is usable wherever
                            it is copied, without the prepared data (:func:`checkpoint_tokenizer`
                            finds it)
        trainer_state.json  counters, data position, scheduler, tokenizer sha256 (and, for
                            pretraining, the sha256 of the prepared data); no absolute paths
        config.yaml         the resolved config of the run
        manifest.json       format version + sha256 and size of every file above (written last)
    latest                  text file naming the newest good step directory (replaced last)

A save writes into ``.step_XXXXXXXX.tmp``, fsyncs every file and the directory, renames it into
place, fsyncs the parent, then replaces ``latest`` the same way. A crash at any moment leaves the
previous ``latest`` pointing at a complete checkpoint; stale temp directories are removed at the next
save. With ``checkpoint.async_save`` (:class:`AsyncCheckpointer`) the state is copied to host
memory and the same steps run on a background thread, ``latest`` moving once every rank's files
are durable. The manifest's sums cost no pass over the files: each rank hashes what it writes
as it writes it (lmforge's own files from the bytes in memory, DCP's shards as they stream out,
DeepSpeed's files on several threads right after the engine wrote them), the digests travel to
rank 0 with the ranks' verdict, and rank 0 reads back only a file that nobody hashed.
Loading checks the manifest first (several files at once); that catches a torn or corrupted
file, not a malicious one (whoever crafts a checkpoint writes a matching manifest). So nothing
pickled is trusted: DCP metadata and DeepSpeed's files go through the checks of
pretrain/core/safeload.py, which refuse any class lmforge's checkpoints never hold
(``--trust-checkpoint`` overrides), and lmforge's own ``.pt`` files (``extra.pt``, RNG) are
loaded with ``weights_only=True``. The strategies write and read dcp/, extra.pt, deepspeed/ and
model.safetensors (pretrain/parallel/state.py, zero.py).
"""

from __future__ import annotations

import contextlib
import errno
import io
import json
import os
import random
import re
import shutil
import threading
import time
import warnings
from concurrent.futures import Future

import numpy as np
import torch
import torch.distributed as dist

from lmforge.pretrain.core import dist as pdist
from lmforge.pretrain.core.durable import (
    Digests,
    digest_files,
    fsync_dir,
    replace_durable,
    sha256_files,
    write_durable,
    write_durable_hashed,
)
from lmforge.pretrain.core.errors import CheckpointError, ConfigurationError
from lmforge.pretrain.core.faults import fault_point

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
    consolidated: bool,
    tokenizer: dict[str, bytes] | None = None,
) -> str:
    """Save a complete checkpoint of ``step`` under ``root``; every rank calls this together.
    ``consolidated``: with the full weights as model.safetensors. ``tokenizer``: the files of the
    tokenizer the run trains with (name -> bytes, ``Tokenizer.files``), written by rank 0. A
    full disk (or quota) is one
    :class:`CheckpointError` naming the place and the bytes needed; the partial checkpoint is
    removed and the previous one stays in use."""
    final, tmp = _places(root, step)
    failure: BaseException | None = None
    digests: Digests = {}
    try:
        _prepare(root, tmp, main=strategy.is_main)
        write_file = _file_writer(tmp, step, digests)
        state_digests = strategy.save_state(
            tmp,
            model=model,
            optimizer=optimizer,
            write_file=write_file,
            consolidated=consolidated,
        )
        digests.update(state_digests or {})
        for name, data in _small_files(strategy, trainer_state, config_yaml, tokenizer).items():
            write_file(name, data)
    except _save_failures() as exc:
        failure = exc
    return _conclude(
        failure,
        root=root,
        step=step,
        tmp=tmp,
        final=final,
        keep_last=keep_last,
        main=strategy.is_main,
        digests=digests,
    )


class AsyncCheckpointer:
    """``checkpoint.async_save``: a save stalls training only while the state is copied to host
    memory; the rest runs on a background thread of each rank: torch.distributed.checkpoint's
    write of dcp/ (``dcp.async_save``), rank 0's consolidated model.safetensors (when asked),
    the small files, every rank's verdict (the gather of [failed, out of space, digests] that
    the synchronous save makes) and rank 0's publication (manifest, rename, ``latest``,
    retention), in that order, with the same atomic rules: ``latest`` moves only once every
    rank's files are fsynced and every rank agreed they were. Collectives of the background go
    over a gloo group of their own, created once here (every rank together), never the
    training's.

    At most one save is in flight: ``save`` first waits for the previous one. ``wait`` returns
    the path of the checkpoint once it is published (None when none was in flight) or raises
    its failure (the one-line full-disk :class:`CheckpointError`, on every rank alike; its
    temp directory is removed and the previous checkpoint stays ``latest``). The trainer waits
    at the next save, at a rollback, when an anomaly stops the run and at the end of ``fit``."""

    def __init__(self) -> None:
        self.group = (
            dist.new_group(backend="gloo", timeout=pdist.collective_timeout())
            if dist.is_available() and dist.is_initialized()
            else None
        )
        if self.group is None:  # one process without a group: DCP saves it alone, as meant
            warnings.filterwarnings("ignore", "torch.distributed is disabled", UserWarning)
        self._pending: Future | None = None

    def save(
        self,
        *,
        root: str,
        step: int,
        strategy,
        model,
        optimizer,
        trainer_state: dict,
        config_yaml: str,
        keep_last: int,
        consolidated: bool,
        tokenizer: dict[str, bytes] | None = None,
    ) -> None:
        """Start saving checkpoint ``step`` (every rank together); returns once the state is
        in host memory. The previous save is waited for first (its failure is raised).
        ``consolidated``: with the full weights as model.safetensors; ``tokenizer`` as in
        :func:`save_checkpoint`."""
        self.wait()
        final, tmp = _places(root, step)
        failure: BaseException | None = None
        finish, files = None, {}
        try:
            _prepare(root, tmp, main=strategy.is_main)  # before any rank writes into tmp
            finish = strategy.start_save_state(
                tmp,
                model=model,
                optimizer=optimizer,
                group=self.group,
                consolidated=consolidated,
            )
            files = _small_files(strategy, trainer_state, config_yaml, tokenizer)  # as they are now
        except _save_failures() as exc:
            failure = exc
        main = strategy.is_main

        def background() -> str:
            nonlocal failure
            digests: Digests = {}
            try:
                if failure is None:
                    write_file = _file_writer(tmp, step, digests)
                    digests.update(finish(write_file) or {})
                    fault_point("save:background", step=step)
                    for name, data in files.items():
                        write_file(name, data)
            except _save_failures() as exc:
                failure = exc
            return _conclude(
                failure,
                root=root,
                step=step,
                tmp=tmp,
                final=final,
                keep_last=keep_last,
                main=main,
                digests=digests,
                group=self.group,
            )

        future: Future = Future()

        def run() -> None:
            try:
                future.set_result(background())
            except BaseException as exc:  # noqa: BLE001 - raised again by wait()
                future.set_exception(exc)

        # A daemon: an error that ends the process does not wait for a save in flight (the
        # checkpoint is then published if it completes first; else its temp directory stays
        # until the next save removes it, and `latest` names the previous one).
        threading.Thread(target=run, name=f"lmforge-checkpoint-{step}", daemon=True).start()
        self._pending = future

    def wait(self) -> str | None:
        """Block until the save in flight is published and return its path; None when there
        is none. Its failure is raised here, on every rank alike."""
        pending, self._pending = self._pending, None
        return None if pending is None else pending.result()


def _places(root: str, step: int) -> tuple[str, str]:
    """The checkpoint directory of ``step`` and the temp directory it is written in."""
    return os.path.join(root, step_dir_name(step)), os.path.join(
        root, f".{step_dir_name(step)}.tmp"
    )


def _prepare(root: str, tmp: str, *, main: bool) -> None:
    """Every rank: rank 0 removes the leftovers of crashed saves and makes ``tmp``; the others
    wait for it before they write into ``tmp``."""
    if main:
        os.makedirs(root, exist_ok=True)
        for name in os.listdir(root):  # leftovers of a crashed save
            if name.startswith(".step_") and name.endswith(".tmp"):
                shutil.rmtree(os.path.join(root, name), ignore_errors=True)
        os.makedirs(tmp)
    pdist.barrier()


def _file_writer(tmp: str, step: int, digests: Digests):
    """A save's ``write_file(name, data)``: writes ``tmp/name`` durably and records its sha256,
    computed from the bytes in memory while they are written, in ``digests``."""

    def write_file(name: str, data: bytes) -> None:
        sha = write_durable_hashed(os.path.join(tmp, name), data, step=step)
        digests[name] = (sha, len(data))

    return write_file


def _small_files(
    strategy, trainer_state: dict, config_yaml: str, tokenizer: dict[str, bytes] | None
) -> dict[str, bytes]:
    """This rank's files besides model and optimizer state: its RNG states; on rank 0 the
    trainer state, the config and the tokenizer (when given)."""
    buf = io.BytesIO()
    torch.save(rng_state(), buf)
    files = {f"rng_rank{strategy.rank:05d}.pt": buf.getvalue()}
    if strategy.is_main:
        state = dict(trainer_state, format_version=FORMAT_VERSION, world_size=strategy.world_size)
        files["trainer_state.json"] = json.dumps(state, indent=1).encode()
        files["config.yaml"] = config_yaml.encode()
        files.update(tokenizer or {})
    return files


def _conclude(
    failure: BaseException | None,
    *,
    root: str,
    step: int,
    tmp: str,
    final: str,
    keep_last: int,
    main: bool,
    digests: Digests,
    group=None,
) -> str:
    """Every rank, once its files are written (or failed): agree, then publish or clean up.
    ``digests``: the sha256 and size of the files this rank hashed as it wrote them."""
    # Every rank learns whether any rank failed (and whether for want of space) before anyone
    # touches the temp directory again: rank 0 removes it only once no rank writes there. The
    # same gather brings rank 0 every rank's digests, for the manifest, and every rank the free
    # space each measured: the ranks' one-line errors must be the same text (the launcher says
    # each distinct one), so they all state the least of them rather than each its own moment's.
    out_of_space = failure is not None and _out_of_space(failure, root)
    verdicts = pdist.all_gather_object(
        (
            failure is not None,
            out_of_space,
            digests if failure is None else {},
            _free_bytes(root) if out_of_space else None,
        ),
        group=group,
    )
    failed = any(v[0] for v in verdicts)
    no_space = any(v[1] for v in verdicts)
    if failed:
        if main:
            shutil.rmtree(tmp, ignore_errors=True)
        if no_space:
            free = min((v[3] for v in verdicts if v[3] is not None), default=None)
            raise CheckpointError(_no_space_message(root, step, free=free)) from failure
        if failure is not None:
            raise failure
        raise CheckpointError(f"saving checkpoint step {step} failed on another rank (its error)")
    if main:
        hashed: Digests = {}
        for verdict in verdicts:
            hashed.update(verdict[2])
        try:
            _publish(
                root=root, step=step, tmp=tmp, final=final, keep_last=keep_last, digests=hashed
            )
        except _save_failures() as exc:
            if not _out_of_space(exc, root):
                raise
            shutil.rmtree(tmp, ignore_errors=True)
            raise CheckpointError(_no_space_message(root, step, free=_free_bytes(root))) from exc
    pdist.barrier(group=group)
    return final


def _publish(
    *, root: str, step: int, tmp: str, final: str, keep_last: int, digests: Digests
) -> None:
    """Rank 0, once every rank's files are on disk: the manifest, the rename into place, then
    ``latest``, then retention. ``digests``: what the ranks hashed as they wrote; any other
    file (or one whose size changed since) is fsynced and read back, several at once."""
    names = _files_under(tmp)
    known = {
        name: digests[name]
        for name in names
        if name in digests and digests[name][1] == os.path.getsize(os.path.join(tmp, name))
    }
    known.update(digest_files(tmp, [n for n in names if n not in known], fsync=True))
    files = {name: {"sha256": known[name][0], "bytes": known[name][1]} for name in names}
    manifest = {
        "format_version": FORMAT_VERSION,
        "step": step,
        "created": time.time(),
        "files": files,
    }
    write_durable(os.path.join(tmp, "manifest.json"), json.dumps(manifest, indent=1).encode())
    fsync_dir(tmp)
    fault_point("save:before-rename", step=step)
    if os.path.exists(final):  # a previous attempt reached this step but not `latest`
        shutil.rmtree(final)
    os.rename(tmp, final)
    fsync_dir(root)
    fault_point("save:before-latest", step=step)
    replace_durable(os.path.join(root, "latest"), (step_dir_name(step) + "\n").encode())
    _prune(root, keep_last=keep_last, protect=step_dir_name(step))


_NO_SPACE = (errno.ENOSPC, errno.EDQUOT)


def _save_failures() -> tuple[type[BaseException], ...]:
    """What a failed save raises: torch.distributed.checkpoint raises a BaseException that
    holds every rank's failure. (Imported when a save fails, not with this module, so that a
    process that never saves does not import DCP.)"""
    from torch.distributed.checkpoint.api import CheckpointException

    return (Exception, CheckpointException)


_NEARLY_FULL = 1 << 20  # bytes left on a filesystem that a failed write just filled


def _out_of_space(exc: BaseException, root: str) -> bool:
    """Whether a failed save ran out of disk: an ENOSPC/EDQUOT anywhere in the exception's
    chain (torch.distributed.checkpoint wraps every rank's failure in its own exception), or
    any failure on a filesystem with less than 1 MiB left (torch.save reports a short write
    without an errno)."""
    seen: set[int] = set()
    todo: list[BaseException] = [exc]
    while todo:
        e = todo.pop()
        if id(e) in seen:
            continue
        seen.add(id(e))
        if isinstance(e, OSError) and e.errno in _NO_SPACE:
            return True
        if "No space left on device" in str(e) or "Disk quota exceeded" in str(e):
            return True
        todo.extend(x for x in (e.__cause__, e.__context__) if x is not None)
        for failure in (getattr(e, "failures", None) or {}).values():  # DCP: rank -> (exc, tb)
            todo.extend(x for x in failure if isinstance(x, BaseException))
    try:  # a write torch reports without errno ("unexpected pos"), on a filesystem now full
        st = os.statvfs(root)
        return st.f_bavail * st.f_frsize < _NEARLY_FULL
    except OSError:
        return False


def _human(n: float) -> str:
    for unit in ("B", "KiB", "MiB", "GiB", "TiB"):
        if n < 1024 or unit == "TiB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1024
    raise AssertionError


def checkpoint_bytes(path: str) -> int | None:
    """Total size of a checkpoint from its manifest, or None when it has no readable one."""
    try:
        with open(os.path.join(path, "manifest.json"), encoding="utf-8") as f:
            files = json.load(f)["files"]
        return sum(int(info["bytes"]) for info in files.values())
    except (OSError, ValueError, KeyError, TypeError):
        return None


def _free_bytes(root: str) -> int | None:
    """Bytes free for this user on the filesystem of ``root`` (None: unknown)."""
    try:
        st = os.statvfs(root)
    except OSError:
        return None
    return st.f_bavail * st.f_frsize


def _no_space_message(root: str, step: int, *, free: int | None) -> str:
    """The one line of a save that ran out of space (``free``: the bytes free then)."""
    previous = None
    with contextlib.suppress(CheckpointError, OSError):
        previous = latest_checkpoint(root)
    need = checkpoint_bytes(previous) if previous else None
    free_text = f"{_human(free)} free" if free is not None else "free space unknown"
    size = f"about {_human(need)} (the size of the last checkpoint)" if need else "more room"
    kept = (
        f"{previous} is intact; resume=auto continues from it"
        if previous
        else "no earlier checkpoint exists"
    )
    return (
        f"no space left on device saving checkpoint step {step} under {root}: a checkpoint needs "
        f"{size}, {free_text}; the partial checkpoint was removed and {kept} once there is room"
    )


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
    """Keep the newest ``keep_last`` checkpoints up to ``protect`` (the one just written, hashed
    from disk), ``protect`` and the one ``best`` names. Checkpoints newer than ``protect`` are
    left alone and not counted: after ``resume=auto`` fell back past a corrupt one, the
    checkpoint it resumed from stays until ``keep_last`` newer good ones exist."""
    steps = sorted(n for n in os.listdir(root) if STEP_DIR.match(n) and n <= protect)
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
    """Check the manifest's format version and every file's sha256; return the manifest. Every
    reader calls this before it parses anything else of a checkpoint, so a corrupt file is one
    :class:`CheckpointError` line, never a parser's traceback."""
    mpath = os.path.join(path, "manifest.json")
    if not os.path.isfile(mpath):
        raise CheckpointError(f"{path} is not a complete lmforge checkpoint (no manifest.json)")
    manifest = read_json_file(mpath)
    files = manifest.get("files")
    if not isinstance(files, dict):
        what = (
            "holds prepared data (`lmforge prepare`'s output)"
            if "splits" in manifest
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
    checks = []
    for name, info in files.items():
        fpath = os.path.normpath(os.path.join(path, name))
        if not isinstance(info, dict) or not isinstance(info.get("sha256"), str):
            raise CheckpointError(f"{mpath} is corrupt (entry {name!r}); use an earlier checkpoint")
        if os.path.isabs(name) or not fpath.startswith(os.path.normpath(path) + os.sep):
            raise CheckpointError(f"{mpath} names {name!r}, outside the checkpoint: it is not one")
        if not os.path.isfile(fpath):
            raise CheckpointError(f"checkpoint file {fpath} is missing; resume from another one")
        checks.append((fpath, info))
    digests = sha256_files([fpath for fpath, _ in checks])  # several files at once
    for (fpath, info), digest in zip(checks, digests, strict=True):
        if digest != info["sha256"]:
            raise CheckpointError(
                f"checkpoint file {fpath} does not match its manifest (sha256 {digest[:12]}… != "
                f"{info['sha256'][:12]}…): it is corrupt; resume from an earlier checkpoint"
            )
    return manifest


def read_json_file(path: str) -> dict:
    """A checkpoint's JSON file as a dict, or one line saying it is corrupt."""
    try:
        with open(path, encoding="utf-8") as f:
            data = json.load(f)
    except FileNotFoundError:
        raise CheckpointError(f"{path} is missing: the checkpoint is incomplete") from None
    except (UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise CheckpointError(
            f"{path} is not valid JSON ({exc}): the checkpoint is corrupt; use an earlier one"
        ) from None
    if not isinstance(data, dict):
        raise CheckpointError(f"{path} is corrupt (not a JSON object); use an earlier checkpoint")
    return data


def read_trainer_state(path: str) -> dict:
    """``trainer_state.json`` of checkpoint ``path`` (call ``verify_checkpoint`` first)."""
    return read_json_file(os.path.join(path, "trainer_state.json"))


def checkpoint_tokenizer(path: str, state: dict) -> str | None:
    """The main file of the tokenizer of checkpoint ``path`` (``state``: its trainer state): the
    one it carries (tokenizer.model, or tokenizer.json with the files beside it); for a
    checkpoint written before checkpoints carried one, the file its trainer state names, while
    that is still there. Either must be the tokenizer the run trained with (the sha256 the
    trainer state records), else one line says which file to put where. None when there is
    none."""
    from lmforge.pretrain.data.tokenizer import find_tokenizer, tokenizer_sha256

    recorded = state.get("tokenizer")
    candidates = [
        find_tokenizer(path),
        os.path.join(path, recorded) if isinstance(recorded, str) and recorded else None,
    ]  # (an absolute path that the state names stays as it is)
    want = state.get("tokenizer_sha256")
    for file in candidates:
        if file is None or not os.path.isfile(file):
            continue
        got = tokenizer_sha256(file)
        name = os.path.basename(file)
        beside = " and the files beside it" if name.endswith(".json") else ""
        if isinstance(want, str) and got != want:
            raise CheckpointError(
                f"{file} is not the tokenizer {path} was trained with (sha256 {got[:12]}… != "
                f"{want[:12]}…); copy the tokenizer it was trained with (its prepared data's "
                f"{name}{beside}) to {os.path.join(path, name)}"
            )
        return file
    return None


def read_checkpoint_config(path: str) -> dict:
    """The resolved config a checkpoint was written with (its ``config.yaml``), as a dict."""
    from omegaconf import OmegaConf
    from omegaconf.errors import OmegaConfBaseException
    from yaml import YAMLError

    file = os.path.join(path, "config.yaml")
    try:
        cfg = OmegaConf.to_container(OmegaConf.load(file))
    except FileNotFoundError:
        raise CheckpointError(f"{file} is missing: the checkpoint is incomplete") from None
    except (OSError, UnicodeDecodeError, YAMLError, OmegaConfBaseException) as exc:
        reason = str(exc).splitlines()[0] if str(exc) else type(exc).__name__
        raise CheckpointError(
            f"{file} cannot be read ({reason}): the checkpoint is corrupt; use an earlier one"
        ) from None
    if not isinstance(cfg, dict) or not isinstance(cfg.get("model"), dict):
        raise CheckpointError(f"{file} is corrupt (no model section); use an earlier checkpoint")
    return cfg


def enclosing_checkpoint(path: str) -> str | None:
    """The checkpoint directory (one holding a manifest and a trainer state, whatever its name)
    that ``path`` is or would be written inside, or None: a file put there is outside the
    manifest that verifies the checkpoint, and retention would delete it with the checkpoint."""
    place = os.path.realpath(os.path.abspath(path))
    while True:
        if all(
            os.path.isfile(os.path.join(place, f)) for f in ("manifest.json", "trainer_state.json")
        ):
            return place
        parent = os.path.dirname(place)
        if parent == place:
            return None
        place = parent


def check_outside_checkpoints(out: str, what: str = "--out ") -> None:
    """Refuse an output place inside a checkpoint (see :func:`enclosing_checkpoint`)."""
    inside = enclosing_checkpoint(out)
    if inside is not None:
        raise ConfigurationError(
            f"{what}{out} is inside the checkpoint {inside}, which must hold only what its "
            "manifest lists; choose a directory outside the run's checkpoints"
        )


def step_dirs(root: str) -> list[str]:
    """The ``step_*`` directories under ``root``, newest first."""
    if not os.path.isdir(root):
        return []
    names = sorted((n for n in os.listdir(root) if STEP_DIR.match(n)), reverse=True)
    return [os.path.join(root, n) for n in names if os.path.isdir(os.path.join(root, n))]


def newest_verified(root: str, *, before: str | None = None, warn=None) -> str | None:
    """The newest checkpoint under ``root`` that verifies; only those older than ``before`` (a
    step directory) when given. ``warn(message)`` hears of each one skipped."""
    for path in step_dirs(root):
        if before is not None and os.path.basename(path) >= os.path.basename(before):
            continue
        try:
            verify_checkpoint(path)
        except CheckpointError as exc:
            if warn:
                warn(str(exc))
            continue
        return path
    return None


def resume_point(root: str) -> str | None:
    """``resume=auto``: the checkpoint ``latest`` names when it verifies; otherwise (a corrupt
    or missing one, or a broken ``latest``) warn, naming what failed, and fall back to the
    newest checkpoint that verifies. None when the run has no checkpoint."""
    skipped: list[str] = []  # what failed, told once the checkpoint to fall back to is known
    found = None
    try:
        found = _resume_point(root, skipped.append)
    finally:
        for message in skipped:
            # the message's own fix ("use an earlier checkpoint") is what happens here
            fallback = f"; resume=auto falls back to {found}" if found else ""
            pdist.print0(f"warning: {_EARLIER_FIX.sub('', message)}{fallback}")
    return found


# the fix that ends a checkpoint's error for an explicit resume=, dropped from resume=auto's
# warning, which names the checkpoint it falls back to instead
_EARLIER_FIX = re.compile(r"; (use an earlier|resume from an(other| earlier)|pass resume=)[^;]*$")


def _resume_point(root: str, warn) -> str | None:
    latest, broken = None, False
    try:
        latest = latest_checkpoint(root)
    except CheckpointError as exc:
        warn(str(exc))
        broken = True
    if latest is not None:
        try:
            verify_checkpoint(latest)
            return latest
        except CheckpointError as exc:
            warn(str(exc))
        # A step directory newer than `latest` is one whose save was cut short before `latest`
        # moved; `latest` never named it, so the search starts below `latest`.
        found = newest_verified(root, before=latest, warn=warn)
    elif not step_dirs(root):
        return None
    else:
        if not broken:
            warn(f"{os.path.join(root, 'latest')} is missing")
        found = newest_verified(root, warn=warn)
    if found is None:
        raise CheckpointError(
            f"no checkpoint under {root} verifies; start a new run with another name=..."
        )
    return found


def check_resume_checkpoint(path: str) -> None:
    """An explicit ``resume=PATH`` must verify; the error names the newest earlier checkpoint
    beside it that does."""
    try:
        verify_checkpoint(path)
    except CheckpointError as exc:
        previous = newest_verified(os.path.dirname(os.path.abspath(path)), before=path)
        hint = (
            f"; the previous good checkpoint is {previous}: resume={previous}" if previous else ""
        )
        raise CheckpointError(f"{exc}{hint}") from None


def load_checkpoint(
    path: str, *, strategy, model, optimizer, restore_rng: bool = True, verify: bool = True
) -> dict:
    """Load a checkpoint into model and optimizer; restore this rank's RNG states. ``verify``
    False: the caller has just verified it."""
    if verify:
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
