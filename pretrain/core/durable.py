"""Durable file writes shared by checkpoints, metrics and prepared data.

A file that must survive a crash is written, flushed and fsynced; one that must never be seen
half-written is written beside its target and renamed over it, then the directory is fsynced.
The writes pass fault points (faults.py) where crash-safety tests stop the process.

Checkpoint manifests need the sha256 of every file. Files written from bytes in memory are
hashed from those bytes while they are written (``write_durable_hashed``), streams written by
others are hashed as the bytes pass through them (``HashingWriter``), and what is left is read
back on several threads at once (``sha256_files``): hashlib releases the GIL on large buffers.

What lmforge writes for people to use (runs, checkpoints, prepared data, exports, plans...) gets
the modes the user's umask gives any new file or directory. Temp directories and files from
``tempfile`` are private (0700/0600) whatever the umask, so a writer that renames one into place
widens it first with ``share``/``share_tree`` (``atomic_directory`` does it for its callers).
"""

from __future__ import annotations

import contextlib
import hashlib
import os
import shutil
import stat
import tempfile
import threading
from concurrent.futures import Future, ThreadPoolExecutor

from lmforge.pretrain.core.faults import fault_point

# The sha256 (hex) and size of files, by path relative to the directory they were written in.
Digests = dict[str, tuple[str, int]]


# --- the modes of new files ----------------------------------------------------------------------

_PROC_STATUS = "/proc/self/status"


def _proc_umask() -> int | None:
    """The umask as Linux (4.7+) reports it in /proc/self/status, or None where it does not."""
    try:
        with open(_PROC_STATUS) as f:
            for line in f:
                if line.startswith("Umask:"):
                    return int(line.split()[1], 8)
    except (OSError, ValueError, IndexError):
        pass
    return None


def _swap_umask() -> int:
    mask = os.umask(0o077)
    os.umask(mask)
    return mask


# The only way to read the umask portably is to set it and set it back, and a file another thread
# creates between the two gets the wrong mode. So where /proc cannot tell it (macOS, old Linux),
# it is read that way once, here at import, when lmforge has started no thread yet; where /proc
# can, it is read there on every call, so a umask the program changes later is respected.
_IMPORT_UMASK: int | None = None if _proc_umask() is not None else _swap_umask()


def umask() -> int:
    """This process's umask, read without changing it."""
    if _IMPORT_UMASK is not None:
        return _IMPORT_UMASK
    mask = _proc_umask()
    return _swap_umask() if mask is None else mask  # /proc gone since import: cannot happen


def share(path: str | os.PathLike) -> None:
    """Give ``path``, a directory or file this process just made, the mode a new one gets under
    the umask (0o777 or 0o666, less the umask; a file the owner may execute keeps execute):
    for temp directories and files, which ``tempfile`` makes private whatever the umask, before
    they are renamed to where people read them."""
    mode = os.lstat(path).st_mode
    if stat.S_ISLNK(mode):  # chmod would follow it to somewhere this process did not make
        return
    full = 0o777 if stat.S_ISDIR(mode) or mode & stat.S_IXUSR else 0o666
    want = full & ~umask()
    if stat.S_IMODE(mode) != want:
        os.chmod(path, want)


def share_tree(root: str | os.PathLike) -> None:
    """``share`` ``root`` and everything under it (libraries that write through temp files of
    their own, such as safetensors' ``save_file``, leave private files behind)."""
    share(root)
    for where, dirs, files in os.walk(root):
        for name in dirs + files:
            share(os.path.join(where, name))


def fsync_dir(path: str | os.PathLike) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def write_durable(path: str | os.PathLike, data: bytes, *, step: int | None = None) -> None:
    """Write ``data`` to ``path`` and fsync it."""
    view = memoryview(data)  # halves without copies
    half = len(view) // 2
    with open(path, "wb") as f:
        f.write(view[:half])
        f.flush()
        fault_point("save:mid-file", step=step)  # a crash here leaves a torn file
        f.write(view[half:])
        f.flush()
        os.fsync(f.fileno())


def write_durable_hashed(path: str | os.PathLike, data: bytes, *, step: int | None = None) -> str:
    """``write_durable``, returning the hex sha256 of ``data``: computed from the bytes in
    memory on another thread while they are written and fsynced, never read back."""
    if len(data) < PARALLEL_HASH_BYTES:
        write_durable(path, data, step=step)
        return hashlib.sha256(data).hexdigest()
    pending = _hashers().submit(_sha256_hex, data)
    write_durable(path, data, step=step)
    return pending.result()


def replace_durable(path: str | os.PathLike, data: bytes) -> None:
    """Atomically replace a file: temp file, fsync, rename, fsync the directory."""
    path = os.fspath(path)
    tmp = f"{path}.tmp-{os.getpid()}"
    write_durable(tmp, data)
    os.replace(tmp, path)
    fsync_dir(os.path.dirname(os.path.abspath(path)))


def sha256_file(path: str | os.PathLike, *, chunk_bytes: int = 1 << 20, fsync: bool = False) -> str:
    """Hex sha256 of a file, read in chunks; ``fsync``: make it durable first (a file that
    another library wrote and did not sync)."""
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        if fsync:
            os.fsync(f.fileno())
        while block := f.read(chunk_bytes):
            digest.update(block)
    return digest.hexdigest()


# --- hashing on threads ------------------------------------------------------------------------

# Buffers at least this large are hashed on a thread of the pool (below, the hand-over costs
# more than it saves).
PARALLEL_HASH_BYTES = 1 << 20
_HASH_THREADS = max(2, min(8, os.cpu_count() or 1))
_pool: ThreadPoolExecutor | None = None
_pool_lock = threading.Lock()


def _hashers() -> ThreadPoolExecutor:
    """The threads that hash (made on first use, shared by the whole process)."""
    global _pool
    with _pool_lock:
        if _pool is None:
            _pool = ThreadPoolExecutor(_HASH_THREADS, thread_name_prefix="lmforge-sha256")
        return _pool


def _sha256_hex(data) -> str:
    return hashlib.sha256(data).hexdigest()


def sha256_files(paths: list[str], *, fsync: bool = False) -> list[str]:
    """``sha256_file`` of each path, several files at once; in the order of ``paths``."""
    if len(paths) < 2:
        return [sha256_file(p, fsync=fsync) for p in paths]
    return list(_hashers().map(lambda p: sha256_file(p, fsync=fsync), paths))


def digest_files(root: str, names: list[str], *, fsync: bool = False) -> Digests:
    """The sha256 and size of files ``names`` (relative to ``root``), read on several threads;
    ``fsync``: each made durable first."""
    paths = [os.path.join(root, n) for n in names]
    sums = sha256_files(paths, fsync=fsync)
    return {n: (h, os.path.getsize(p)) for n, p, h in zip(names, paths, sums, strict=True)}


class HashingWriter:
    """A binary file open for writing that hashes (sha256) every byte passing through
    ``write``: a large buffer on a thread of the pool while this thread writes it, so that the
    hash costs the writer little more than the write. ``hexdigest()`` is None when the file
    was not written front to back (a seek or truncate): then it has to be read back. Everything
    else is the file's own (``tell``, ``fileno``, ``flush``, ``close``...)."""

    def __init__(self, raw) -> None:
        self._raw = raw
        self._sha = hashlib.sha256()
        self._linear = True
        self.nbytes = 0

    def write(self, b) -> int:
        try:
            view = memoryview(b).cast("B")
        except TypeError:  # not a contiguous buffer: written, not hashed
            self._linear = False
            return self._raw.write(b)
        pending: Future | None = None
        if view.nbytes >= PARALLEL_HASH_BYTES:
            pending = _hashers().submit(self._sha.update, view)
        else:
            self._sha.update(view)
        try:
            n = self._raw.write(view)
        finally:
            if pending is not None:
                pending.result()
        if n != view.nbytes:  # a short write: the digest ran ahead of the file
            self._linear = False
        self.nbytes += view.nbytes if n is None else n
        return n

    def seek(self, *args):
        self._linear = False
        return self._raw.seek(*args)

    def truncate(self, *args):
        self._linear = False
        return self._raw.truncate(*args)

    def writelines(self, lines) -> None:
        for line in lines:
            self.write(line)

    def writable(self) -> bool:
        return True

    def hexdigest(self) -> str | None:
        return self._sha.hexdigest() if self._linear else None

    def __getattr__(self, name: str):
        return getattr(self._raw, name)

    def __enter__(self) -> HashingWriter:
        return self

    def __exit__(self, *exc) -> None:
        self._raw.close()


def check_new_dir(out: str) -> None:
    """``--out`` must not hold anything yet (an output directory is never merged into)."""
    from lmforge.pretrain.core.errors import ConfigurationError

    if os.path.exists(out) and (not os.path.isdir(out) or os.listdir(out)):
        raise ConfigurationError(f"--out {out} exists and is not empty; choose a new directory")


def check_writable(path: str, what: str) -> None:
    """Something can be created at ``path``: the nearest existing directory at or above it is
    one this process may write into. Raises one line naming ``what`` (the key or flag, e.g.
    "--out " or "`runs_dir`=") and the path before any work starts, so that a bad output place
    never leaves a half-written result (or an unreadable traceback) behind."""
    from lmforge.pretrain.core.errors import ConfigurationError

    place = os.path.abspath(path)
    while not os.path.lexists(place):
        place = os.path.dirname(place)
    if not os.path.isdir(place):
        raise ConfigurationError(
            f"{what}{path}: {place} is a file, not a directory; choose another place"
        )
    if not os.access(place, os.W_OK | os.X_OK):
        raise ConfigurationError(
            f"{what}{path}: {place} is not writable; choose a directory you can write to"
        )


@contextlib.contextmanager
def atomic_directory(out: str, *, prefix: str, replace: bool = False):
    """Yield a temp directory beside ``out``; on success fsync its files and rename it to
    ``out`` (which must be absent or empty, unless ``replace``: then an existing ``out`` is
    swapped out and removed), on any error remove it: readers see all or nothing."""
    if not replace:
        check_new_dir(out)
    parent = os.path.dirname(os.path.abspath(out))
    os.makedirs(parent, exist_ok=True)
    tmp = tempfile.mkdtemp(prefix=prefix, dir=parent)
    try:
        yield tmp
        share_tree(tmp)  # mkdtemp's 0700, and private files libraries wrote into it
        for root, _, names in os.walk(tmp):
            for name in names:
                with open(os.path.join(root, name), "rb") as f:
                    os.fsync(f.fileno())
            fsync_dir(root)
        old = None
        if os.path.isdir(out) and replace:
            # private is right here: it only holds the replaced ``out`` until it is removed
            old = tempfile.mkdtemp(prefix=prefix + "old.", dir=parent)
            os.rename(out, os.path.join(old, "out"))
        elif os.path.isdir(out):
            os.rmdir(out)  # empty (checked above)
        os.rename(tmp, out)
        fsync_dir(parent)
        if old is not None:
            shutil.rmtree(old, ignore_errors=True)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
