"""Training samples from prepared shards, and the exact, resumable order ranks read them in.

A sample is a window of ``seq_len + 1`` tokens (inputs and shifted targets) at stride ``seq_len``
inside one shard (windows never straddle shards). The global sample stream is a concatenation of
epochs, each a seeded permutation of all windows; optimizer step ``s`` consumes global samples
``[s*G, (s+1)*G)`` with ``G = micro_batch * world * grad_accum``. Rank ``r`` takes the contiguous
``G / world`` slice ``r``, split into micro-batches. So the position is one integer (samples
consumed), the union of the ranks' samples is the one-process global batch, and the order does
not depend on the world size as long as the global batch is the same.
"""

from __future__ import annotations

import os
from collections.abc import Iterator
from typing import Protocol

import numpy as np
import torch

from pretrain.errors import DataError


class TokenWindows:
    """Windows of ``seq_len + 1`` tokens over the memmapped shards of one split."""

    def __init__(self, *, data_dir: str, split: str, seq_len: int) -> None:
        from pretrain.prepare import load_manifest

        self.manifest = load_manifest(data_dir)
        info = self.manifest["splits"][split]
        dtype = np.dtype(self.manifest["dtype"])
        self.seq_len = seq_len
        # np.memmap keeps the corpus on disk: memory does not grow with corpus size.
        self.shards = [
            np.memmap(os.path.join(data_dir, s["file"]), dtype=dtype, mode="r")
            for s in info["shards"]
            if s["tokens"] > seq_len
        ]
        counts = [(len(s) - 1) // seq_len for s in self.shards]
        self._ends = np.cumsum(counts, dtype=np.int64)
        if len(self) == 0:
            raise DataError(
                f"the {split} split of {data_dir} has {info['tokens']} tokens, fewer than one "
                f"sample of seq_len+1={seq_len + 1}; lower train.seq_len or prepare more text"
            )

    def __len__(self) -> int:
        return int(self._ends[-1]) if len(self._ends) else 0

    def window(self, index: int) -> np.ndarray:
        shard = int(np.searchsorted(self._ends, index, side="right"))
        local = index - (int(self._ends[shard - 1]) if shard else 0)
        start = local * self.seq_len
        return self.shards[shard][start : start + self.seq_len + 1]

    def batch(self, indices: np.ndarray) -> dict[str, torch.Tensor]:
        rows = np.stack([self.window(int(i)) for i in indices]).astype(np.int64)
        t = torch.from_numpy(rows)
        return {"input_ids": t[:, :-1], "labels": t[:, 1:]}


class SampleOrder:
    """The global sample stream: epoch after epoch of a seeded permutation of all windows."""

    def __init__(self, *, num_samples: int, seed: int, shuffle: bool) -> None:
        self.n = num_samples
        self.seed = seed
        self.shuffle = shuffle
        self._epoch = -1
        self._perm: np.ndarray | None = None

    def _order(self, epoch: int) -> np.ndarray:
        if epoch != self._epoch:
            if self.shuffle:
                self._perm = np.random.default_rng([self.seed, epoch]).permutation(self.n)
            else:
                self._perm = np.arange(self.n)
            self._epoch = epoch
        assert self._perm is not None
        return self._perm

    def take(self, start: int, count: int) -> np.ndarray:
        """Global samples ``[start, start + count)`` as window indices (crossing epochs)."""
        out = np.empty(count, dtype=np.int64)
        filled = 0
        while filled < count:
            pos = start + filled
            epoch, offset = divmod(pos, self.n)
            chunk = min(count - filled, self.n - offset)
            out[filled : filled + chunk] = self._order(epoch)[offset : offset + chunk]
            filled += chunk
        return out


class Samples(Protocol):
    """What batches are read from: pretraining's :class:`TokenWindows` and finetuning's
    examples (finetune/data.py). Fixed-length samples have ``seq_len``; variable-length ones
    ``token_counts`` (tokens per sample) instead."""

    def __len__(self) -> int: ...

    def batch(self, indices: np.ndarray) -> dict[str, torch.Tensor]: ...


class TrainBatches:
    """This rank's micro-batches, step by step; resumable from `samples_consumed`."""

    def __init__(
        self,
        windows: Samples,
        *,
        micro_batch: int,
        grad_accum: int,
        rank: int,
        world_size: int,
        seed: int,
        shuffle: bool,
        samples_consumed: int = 0,
    ) -> None:
        self.windows = windows
        self.micro_batch = micro_batch
        self.grad_accum = grad_accum
        self.rank = rank
        self.world_size = world_size
        self.order = SampleOrder(num_samples=len(windows), seed=seed, shuffle=shuffle)
        self.samples_consumed = samples_consumed
        self.last_indices = np.empty(0, dtype=np.int64)
        self.last_step_tokens = 0

    @property
    def global_batch(self) -> int:
        return self.micro_batch * self.world_size * self.grad_accum

    @property
    def epoch(self) -> float:
        return self.samples_consumed / len(self.windows)

    def next_step(self) -> list[dict[str, torch.Tensor]]:
        """The micro-batches of this rank for the next optimizer step."""
        per_rank = self.micro_batch * self.grad_accum
        start = self.samples_consumed + self.rank * per_rank
        idx = self.order.take(start, per_rank)
        self.last_indices = idx  # what this rank read (tests check ranks are disjoint)
        # Tokens the whole step trains on, over all ranks: every rank knows the global order,
        # so no communication. Variable-length samples (finetuning) count their own tokens.
        counts = getattr(self.windows, "token_counts", None)
        if counts is None:
            self.last_step_tokens = self.global_batch * self.windows.seq_len
        else:
            step = self.order.take(self.samples_consumed, self.global_batch)
            self.last_step_tokens = int(counts[step].sum())
        self.samples_consumed += self.global_batch
        return [
            self.windows.batch(idx[m * self.micro_batch : (m + 1) * self.micro_batch])
            for m in range(self.grad_accum)
        ]

    def state_dict(self) -> dict:
        return {"samples_consumed": self.samples_consumed, "num_windows": len(self.windows)}

    def load_state_dict(self, state: dict) -> None:
        self.samples_consumed = int(state["samples_consumed"])


def eval_batches(
    windows: Samples, *, micro_batch: int, num_samples: int, rank: int, world_size: int
) -> Iterator[dict[str, torch.Tensor]]:
    """A fixed validation set: the first ``num_samples`` windows of the split, the same at every
    evaluation and for every world size; each rank takes a contiguous part of it."""
    n = min(len(windows), num_samples)
    if n < world_size:
        raise DataError(
            f"the validation split has {len(windows)} samples, fewer than the {world_size} ranks; "
            "raise val_fraction in prepare or lower train.seq_len"
        )
    mine = np.array_split(np.arange(n), world_size)[rank]
    for b in range(0, len(mine), micro_batch):
        yield windows.batch(mine[b : b + micro_batch])
