"""torch.distributed.checkpoint's file writer, hashing what it writes: the DCP files of a
checkpoint get their sha256 for its manifest as their bytes pass, not by reading them back.

A module of its own so that importing the rest of the checkpoint code does not import DCP (about
a second): a launcher, a dry run or a refused command never writes a checkpoint.
"""

from __future__ import annotations

import contextlib
import os
import threading

from torch.distributed.checkpoint import FileSystemWriter
from torch.distributed.checkpoint.filesystem import FileSystem

from lmforge.pretrain.core.durable import Digests, HashingWriter


class _HashingFileSystem(FileSystem):
    """DCP's local file system, hashing every file it writes as the bytes pass; the digests
    are keyed by path relative to ``root`` (the checkpoint directory)."""

    def __init__(self, root: str) -> None:
        super().__init__()
        self.root = root
        self.digests: Digests = {}
        self._lock = threading.Lock()

    def _key(self, path) -> str:
        return os.path.relpath(os.fspath(path), self.root)

    @contextlib.contextmanager
    def create_stream(self, path, mode: str):
        if mode != "wb":  # a read, or a write this class does not follow: read back
            if any(c in mode for c in "wax+"):
                with self._lock:
                    self.digests.pop(self._key(path), None)
            with super().create_stream(path, mode) as stream:
                yield stream
            return
        with super().create_stream(path, mode) as stream:
            writer = HashingWriter(stream)
            yield writer
        digest = writer.hexdigest()
        with self._lock:
            if digest is None:  # read back from disk for the manifest
                self.digests.pop(self._key(path), None)
            else:
                self.digests[self._key(path)] = (digest, writer.nbytes)

    def rename(self, path, new_path) -> None:
        super().rename(path, new_path)
        with self._lock:
            entry = self.digests.pop(self._key(path), None)
            if entry is not None:
                self.digests[self._key(new_path)] = entry

    def rm_file(self, path) -> None:
        super().rm_file(path)
        with self._lock:
            self.digests.pop(self._key(path), None)


class HashingFileSystemWriter(FileSystemWriter):
    """torch.distributed.checkpoint's file writer (the same files, byte for byte), which also
    hashes what this rank writes: ``digests`` maps each file's path relative to ``root`` to its
    sha256 and size once the save returned."""

    def __init__(self, path: str, *, root: str) -> None:
        super().__init__(path)
        self.fs = _HashingFileSystem(root)
        self.path = self.fs.init_path(path)

    @property
    def digests(self) -> Digests:
        return dict(self.fs.digests)
