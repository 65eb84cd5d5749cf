"""`lmforge bench --checkpoint`: how fast checkpoints are written and read, in one process.

For a model preset with its AdamW state populated (one real training step), on the file system
of the current directory:

- a synchronous save (``save_checkpoint``) as training makes it between the first step and
  the last (``checkpoint.consolidated=final``, the default: no ``model.safetensors``): its time
  and bytes;
- a raw write of the same number of bytes (1 MiB blocks, then fsync) in the same directory: what
  the disk gives, against which the save's throughput is read (both are the mean of two, taken
  in turns: save, raw, save, raw);
- the final save (the one that ends training, with the consolidated ``model.safetensors``): its
  time against the raw write's rate, and the share of its parts, each timed again on its own:
  DCP's write of model and optimizer state (hashed for the manifest as it is written), rank 0's
  consolidated ``model.safetensors`` (read back from the DCP files, written and hashed), and
  the rest (the small files, the manifest, fsyncs of the directories, the rename);
- a load: the manifest's check, then model, optimizer and RNG, from a cold page cache (the
  checkpoint's pages are dropped first, for its files only);
- an asynchronous save (``AsyncCheckpointer``): how long the call blocks training (the copy of
  the state to host memory) against the synchronous save, and how long until it is published.

Everything is written into a temporary directory that is removed at the end.
"""

from __future__ import annotations

import os
import platform
import shutil
import socket
import sys
import tempfile
import time
import warnings

import torch

from lmforge.pretrain.checkpoint.store import (
    AsyncCheckpointer,
    load_checkpoint,
    save_checkpoint,
    verify_checkpoint,
)
from lmforge.pretrain.config.schema import ModelConfig, OptimConfig, load_config
from lmforge.pretrain.core.durable import check_writable, write_durable_hashed
from lmforge.pretrain.model.loss import causal_lm_loss
from lmforge.pretrain.model.transformer import GPT
from lmforge.pretrain.parallel import build_strategy
from lmforge.pretrain.parallel.common import StepShape, single_process_env
from lmforge.pretrain.parallel.dcp_files import HashingFileSystemWriter
from lmforge.pretrain.parallel.state import consolidated_bytes
from lmforge.pretrain.train.optim import build_optimizer, build_scheduler

VOCAB = 8192  # the vocabulary of `lmforge bench`'s CPU cases
SEQ_LEN = 64  # the one training step that fills AdamW's state
BLOCK = 1 << 20  # the raw write's block


def run_checkpoint_bench(*, models: list[str], out: str | None = None, place: str = ".") -> str:
    """Benchmark checkpoints of each preset in ``models`` under ``place``; print and return the
    results as markdown (also written to ``out``)."""
    check_writable(os.path.join(place, "x"), "bench --checkpoint writes under ")
    single_process_env()
    strategy = build_strategy(precision="fp32")
    _bench_model("tiny", strategy, place)  # first-time costs (imports, pools) are not timed
    results = [_bench_model(preset, strategy, place) for preset in models]
    text = _markdown(results, place)
    print(text, end="", flush=True)
    if out:
        with open(out, "w") as f:
            f.write(text)
    strategy.close()
    return text


def _model_cfg(preset: str) -> ModelConfig:
    here = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    path = os.path.join(here, "configs", "model", f"{preset}.yaml")
    return load_config(ModelConfig, [path, f"vocab_size={VOCAB}", f"max_seq_len={SEQ_LEN}"])


def _trained(preset: str, strategy):
    """The preset's model and optimizer after one training step (AdamW's moments exist)."""
    torch.manual_seed(0)
    model = GPT(_model_cfg(preset))
    optim = OptimConfig()
    model, optimizer = strategy.prepare(model, lambda m: build_optimizer(m, optim), StepShape())
    scheduler = build_scheduler(optimizer, total_steps=10, cfg=optim)
    ids = torch.randint(0, VOCAB, (1, SEQ_LEN + 1))
    batch = {"input_ids": ids[:, :-1], "labels": ids[:, 1:]}
    strategy.forward_backward(model, [batch], causal_lm_loss)
    strategy.step(model, optimizer, scheduler, grad_clip=1.0)
    return model, optimizer


def _timed(fn, *args, **kwargs) -> tuple[float, object]:
    t0 = time.perf_counter()
    result = fn(*args, **kwargs)
    return time.perf_counter() - t0, result


def _files(path: str) -> list[str]:
    return [os.path.join(d, n) for d, _, names in os.walk(path) for n in names]


def _size(path: str) -> int:
    return sum(os.path.getsize(f) for f in _files(path))


def _drop_cache(path: str) -> None:
    """Drop the page cache of every file under ``path`` (written and fsynced: clean pages), so
    that the next read comes from the disk."""
    for file in _files(path):
        fd = os.open(file, os.O_RDONLY)
        try:
            os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED)
        finally:
            os.close(fd)


def _raw_write(path: str, nbytes: int) -> float:
    """Seconds to write ``nbytes`` to a new file in 1 MiB blocks and fsync it."""
    block = os.urandom(BLOCK)
    t0 = time.perf_counter()
    with open(path, "wb", buffering=0) as f:
        left = nbytes
        while left > 0:
            left -= f.write(block[: min(left, BLOCK)])
        os.fsync(f.fileno())
    seconds = time.perf_counter() - t0
    os.remove(path)
    return seconds


def _bench_model(preset: str, strategy, place: str) -> dict:
    import torch.distributed.checkpoint as dcp
    from torch.distributed.checkpoint.state_dict import StateDictOptions, get_state_dict

    model, optimizer = _trained(preset, strategy)
    params = sum(p.numel() for p in model.parameters())
    # private (mkdtemp's 0700) on purpose: scratch that is removed when the benchmark ends
    work = tempfile.mkdtemp(prefix=".lmforge-ckpt-bench-", dir=place)
    try:
        root = os.path.join(work, "checkpoints")
        common = dict(
            root=root,
            strategy=strategy,
            model=model,
            optimizer=optimizer,
            trainer_state={"step": 0},
            config_yaml=f"model: {preset}\n",
            keep_last=10,
        )
        sync_s, path = _timed(save_checkpoint, step=1, consolidated=False, **common)
        total = _size(path)
        dcp_bytes = _size(os.path.join(path, "dcp"))
        # the raw write twice, around a second synchronous save: a shared disk varies
        raw_s = _raw_write(os.path.join(work, "raw.bin"), total)
        again_s, _ = _timed(save_checkpoint, step=4, consolidated=False, **common)
        raw_s = (raw_s + _raw_write(os.path.join(work, "raw.bin"), total)) / 2
        sync_s = (sync_s + again_s) / 2
        final_s, final_path = _timed(save_checkpoint, step=5, consolidated=True, **common)
        final_bytes = _size(final_path)
        consolidated = os.path.getsize(os.path.join(final_path, "model.safetensors"))

        # the parts of the final save, each on its own
        plain = strategy.unwrap(model)
        sds = get_state_dict(
            plain,
            getattr(optimizer, "optimizer", optimizer),
            options=StateDictOptions(flatten_optimizer_state_dict=True),
        )
        parts = os.path.join(work, "parts")
        writer = HashingFileSystemWriter(os.path.join(parts, "dcp"), root=parts)
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", UserWarning)
            dcp_s, _ = _timed(dcp.save, {"model": sds[0], "optim": sds[1]}, storage_writer=writer)

        def consolidate() -> None:
            data = consolidated_bytes(os.path.join(path, "dcp"), tied=plain.cfg.tie_embeddings)
            write_durable_hashed(os.path.join(parts, "model.safetensors"), data)

        consolidate_s, _ = _timed(consolidate)
        shutil.rmtree(parts)

        _drop_cache(path)
        verify_s, _ = _timed(verify_checkpoint, path)
        _drop_cache(path)
        read_s, _ = _timed(
            load_checkpoint, path, strategy=strategy, model=model, optimizer=optimizer, verify=False
        )

        background = AsyncCheckpointer()
        stall_s, _ = _timed(background.save, step=2, consolidated=False, **common)
        wait_s, _ = _timed(background.wait)
        return {
            "model": preset,
            "params": params,
            "bytes": total,
            "dcp_bytes": dcp_bytes,
            "consolidated_bytes": consolidated,
            "final_bytes": final_bytes,
            "sync_s": sync_s,
            "raw_s": raw_s,
            "final_s": final_s,
            "dcp_s": dcp_s,
            "consolidate_s": consolidate_s,
            "verify_s": verify_s,
            "read_s": read_s,
            "stall_s": stall_s,
            "async_s": stall_s + wait_s,
        }
    finally:
        shutil.rmtree(work, ignore_errors=True)


def _filesystem(place: str) -> str:
    """The type and device of the file system that holds ``place``."""
    place = os.path.realpath(place)
    best = ("", "?", "?")
    try:
        with open("/proc/mounts") as f:
            for line in f:
                device, mount, kind = line.split()[:3]
                inside = place == mount or place.startswith(mount.rstrip("/") + "/")
                if inside and len(mount) > len(best[0]):
                    best = (mount, kind, device)
    except OSError:
        pass
    return f"{best[1]} on {best[2]}"


def _cpu() -> str:
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def _memory_gib() -> float:
    return os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES") / 2**30


def _part(seconds: float, whole: float, nbytes: int | None = None) -> str:
    size = f", {nbytes / 1e9:.2f} GB" if nbytes else ""
    return f"{seconds:.1f} s ({seconds / whole:.0%}{size})"


def _markdown(results: list[dict], place: str) -> str:
    mb = 1e6

    def rate(nbytes: float, seconds: float) -> str:
        return f"{nbytes / mb / seconds:,.0f} MB/s"

    lines = [
        f"command: `lmforge {' '.join(sys.argv[1:]) or 'bench --checkpoint'}`  ",
        f"machine: {socket.gethostname()}, {_cpu()}, {os.cpu_count()} cores, "
        f"{_memory_gib():.0f} GiB; {os.path.realpath(place)} ({_filesystem(place)})  ",
        f"torch {torch.__version__}, {time.strftime('%Y-%m-%d %H:%M %Z')}; one process, fp32, "
        f"AdamW state after one step, vocab {VOCAB}",
        "",
        "| model | params | checkpoint | sync save | save | raw write + fsync | save/raw "
        "| final save (+ model.safetensors) | final/raw | load (verify + read) "
        "| async save blocks | stall/sync | async until published |",
        "|---|---|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    for r in results:
        load_s = r["verify_s"] + r["read_s"]
        raw_rate = r["bytes"] / r["raw_s"]  # the final save's bytes, written raw at that rate
        lines.append(
            f"| {r['model']} | {r['params'] / 1e6:.0f}M | {r['bytes'] / 1e9:.2f} GB "
            f"| {r['sync_s']:.1f} s | {rate(r['bytes'], r['sync_s'])} "
            f"| {rate(r['bytes'], r['raw_s'])} | {r['raw_s'] / r['sync_s']:.2f} "
            f"| {r['final_s']:.1f} s, {r['final_bytes'] / 1e9:.2f} GB "
            f"| {r['final_bytes'] / raw_rate / r['final_s']:.2f} "
            f"| {load_s:.1f} s ({r['verify_s']:.1f} + {r['read_s']:.1f}), "
            f"{rate(r['bytes'], load_s)} | {r['stall_s']:.2f} s "
            f"| {r['stall_s'] / r['sync_s']:.1%} | {r['async_s']:.1f} s |"
        )
    lines += [
        "",
        "The parts of the final save, each timed on its own (share of that save's time; the "
        "saves before it write all but model.safetensors):",
        "",
        "| model | DCP write, hashed as written (model + optimizer) "
        "| consolidated model.safetensors | the rest |",
        "|---|---|---|---|",
    ]
    for r in results:
        rest = r["final_s"] - r["dcp_s"] - r["consolidate_s"]
        lines.append(
            f"| {r['model']} | {_part(r['dcp_s'], r['final_s'], r['dcp_bytes'])} "
            f"| {_part(r['consolidate_s'], r['final_s'], r['consolidated_bytes'])} "
            # parts timed alone can add up to more than the whole on a busy or variable disk
            f"| {_part(rest, r['final_s']) if rest > 0 else '— (the parts alone took longer)'} |"
        )
    return "\n".join(lines) + "\n"
