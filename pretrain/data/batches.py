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
from collections.abc import Iterable, Iterator, Sequence
from dataclasses import dataclass
from typing import Protocol

import numpy as np
import torch

from lmforge.pretrain.core.errors import DataError
from lmforge.pretrain.data.tokenizer import load_tokenizer


class TokenWindows:
    """Windows of ``seq_len + 1`` tokens over the memmapped shards of one split."""

    def __init__(self, *, data_dir: str, split: str, seq_len: int) -> None:
        from lmforge.pretrain.data.prepare import load_manifest

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
) -> Iterable[dict[str, torch.Tensor]]:
    """A fixed validation set: the first ``num_samples`` windows of the split, the same at every
    evaluation and for every world size; each rank takes a contiguous part of it. A
    :class:`ValidationSet` gives its groups' batches instead (:class:`GroupedBatches`)."""
    if isinstance(windows, ValidationSet):
        return windows.batches(
            micro_batch=micro_batch, num_samples=num_samples, rank=rank, world_size=world_size
        )
    return _plain_batches(
        windows, micro_batch=micro_batch, num_samples=num_samples, rank=rank, world_size=world_size
    )


def _plain_batches(
    windows: Samples, *, micro_batch: int, num_samples: int, rank: int, world_size: int
) -> Iterator[dict[str, torch.Tensor]]:
    n = min(len(windows), num_samples)
    if n < world_size:
        raise DataError(
            f"the validation split has {len(windows)} samples, fewer than the {world_size} ranks; "
            "raise val_fraction in prepare or lower train.seq_len"
        )
    mine = np.array_split(np.arange(n), world_size)[rank]
    for b in range(0, len(mine), micro_batch):
        yield windows.batch(mine[b : b + micro_batch])


# --------------------------------------------------------------------------------------------
# validation per source, and extra held-out texts
# --------------------------------------------------------------------------------------------

# A window: (token array, start, length); length is seq_len + 1 except for a text or a source
# part too short for one (its tokens are then one shorter window, padded in the batch).
Window = tuple[np.ndarray, int, int]


class _Windows:
    """The windows of ``seq_len + 1`` tokens at stride ``seq_len`` inside parts of token arrays
    (a source's part of each shard, or a whole text), counted without listing them: a part too
    short for one gives one shorter window (if it has 2 tokens or more)."""

    def __init__(self, parts: list[tuple[np.ndarray, int, int]], seq_len: int) -> None:
        self.seq_len = seq_len
        self.parts = [(a, lo, hi, self._count(lo, hi)) for a, lo, hi in parts]
        self.parts = [p for p in self.parts if p[3]]
        self._ends = np.cumsum([p[3] for p in self.parts], dtype=np.int64)

    def _count(self, lo: int, hi: int) -> int:
        return (hi - lo - 1) // self.seq_len or int(hi - lo >= 2)

    def __len__(self) -> int:
        return int(self._ends[-1]) if len(self._ends) else 0

    def __getitem__(self, index: int) -> Window:
        part = int(np.searchsorted(self._ends, index, side="right"))
        tokens, lo, hi, _ = self.parts[part]
        local = index - (int(self._ends[part - 1]) if part else 0)
        start = lo + local * self.seq_len
        return tokens, start, min(self.seq_len + 1, hi - start)


def _spread(count: int, k: int) -> np.ndarray:
    """``k`` of ``count`` indices spread evenly from the first to the last."""
    if k >= count:
        return np.arange(count)
    return np.unique(np.linspace(0, count - 1, k).round().astype(np.int64))


def _shares(total: int, available: list[int]) -> list[int]:
    """``total`` windows shared in proportion to what each group has (largest remainders, ties
    to the first), at least one per group that has any: taken from the largest shares, or past
    ``total`` when there are more such groups than windows."""
    n = min(total, sum(available))
    quota = [n * a / max(sum(available), 1) for a in available]
    take = [int(q) for q in quota]
    order = sorted(range(len(quota)), key=lambda i: (take[i] - quota[i], i))
    for i in order[: n - sum(take)]:
        take[i] += 1
    take = [max(t, min(1, a)) for t, a in zip(take, available, strict=True)]
    while sum(take) > n and max(take) > 1:
        take[take.index(max(take))] -= 1
    return take


@dataclass
class ValGroup:
    """Validation windows reported as ``val_loss/<name>``; ``in_total``: they are part of
    ``val_loss`` too (a source of the val split; an extra held-out text is not)."""

    name: str
    windows: list[Window]
    in_total: bool


class GroupedBatches:
    """One rank's validation batches as ``(group, batch)``: ``group`` indexes ``groups``, or is
    None for windows that count in ``val_loss`` only. Every rank gets as many batches (the
    short ones end with batches whose labels are all -100, which carry no loss): a sharded
    model's forward is a collective."""

    def __init__(
        self, groups: list[ValGroup], items: list[tuple[int | None, list[dict]]], count: int
    ) -> None:
        self.groups = [g.name for g in groups]
        self.in_total = [g.in_total for g in groups]
        self._items = items
        self._count = count

    def __iter__(self) -> Iterator[tuple[int | None, dict[str, torch.Tensor]]]:
        yield from self._items
        seq = next((b["input_ids"].shape[1] for _, b in self._items), 1)
        for _ in range(self._count - len(self._items)):
            ids = torch.zeros(1, seq, dtype=torch.int64)
            yield None, {"input_ids": ids, "labels": torch.full_like(ids, -100)}


class ValidationSet:
    """A pretraining run's validation data: the val split's windows (per source when the data
    mixes sources and its manifest records where each lies) and extra held-out texts.

    Without per-source ranges (older prepared data, or one source) the split evaluates as
    :class:`TokenWindows` does: its first ``num_samples`` windows. With them, every source gets
    its own windows (none straddles two sources or two shards), spread evenly over its part of
    the split; ``num_samples`` is shared in proportion to each source's windows, at least one
    each: ``val_loss`` is the mean over all of them, ``val_loss/<label>`` over a source's. An
    extra text (tokenized with the run's tokenizer, one document) gets up to ``num_samples``
    windows of its own, reported as ``val_loss/<name>`` and not in ``val_loss``."""

    def __init__(
        self,
        *,
        data_dir: str,
        seq_len: int,
        extra: Sequence[tuple[str, np.ndarray]] = (),
    ) -> None:
        self.split = TokenWindows(data_dir=data_dir, split="val", seq_len=seq_len)
        self.manifest = self.split.manifest
        self.seq_len = seq_len
        ranges = self.manifest["splits"]["val"].get("sources") or []
        # (label, windows) per source of the split with any tokens in it
        self.sources: list[tuple[str, _Windows]] = []
        if len([r for r in ranges if r["tokens"]]) > 1:
            self.sources = self._source_windows(data_dir, ranges)
        self.extra = [
            (name, _Windows([(tokens, 0, len(tokens))], seq_len)) for name, tokens in extra
        ]
        self._plans: dict[int, tuple] = {}
        taken = {label for label, _ in self.sources}
        for name, _ in self.extra:
            if name in taken:
                raise DataError(
                    f"extra validation text {name!r} has the name of a source of the data or "
                    "of another extra text; rename the file"
                )
            taken.add(name)

    def _source_windows(self, data_dir: str, ranges: list[dict]) -> list[tuple[str, _Windows]]:
        info = self.manifest["splits"]["val"]
        dtype = np.dtype(self.manifest["dtype"])
        shards, offset = [], 0  # (start in the split, memmap)
        for s in info["shards"]:
            path = os.path.join(data_dir, s["file"])
            shards.append((offset, np.memmap(path, dtype=dtype, mode="r")))
            offset += s["tokens"]
        out = []
        for r in ranges:
            start, end = r["start"], r["start"] + r["tokens"]
            parts = []
            for first, shard in shards:  # the source's part of each shard
                lo, hi = max(start, first), min(end, first + len(shard))
                if hi > lo:
                    parts.append((shard, lo - first, hi - first))
            windows = _Windows(parts, self.seq_len)
            if len(windows):
                out.append((r["label"], windows))
        return out

    def __len__(self) -> int:
        return len(self.split)

    def batch(self, indices: np.ndarray) -> dict[str, torch.Tensor]:
        return self.split.batch(indices)

    def plan(self, num_samples: int) -> tuple[list[ValGroup], list[tuple[int | None, Window]]]:
        """The groups and the whole validation set as (group, window), the same on every rank
        (worked out once per ``num_samples``)."""
        if num_samples not in self._plans:
            self._plans[num_samples] = self._plan(num_samples)
        return self._plans[num_samples]

    def _plan(self, num_samples: int) -> tuple[list[ValGroup], list[tuple[int | None, Window]]]:
        groups: list[ValGroup] = []
        items: list[tuple[int | None, Window]] = []
        if self.sources:
            shares = _shares(num_samples, [len(w) for _, w in self.sources])
            for (label, windows), k in zip(self.sources, shares, strict=True):
                picked = [windows[i] for i in _spread(len(windows), k)]
                items += [(len(groups), w) for w in picked]
                groups.append(ValGroup(label, picked, True))
        else:
            n = min(len(self.split), num_samples)
            items += [(None, self._split_window(i)) for i in range(n)]
        for name, windows in self.extra:
            picked = [windows[i] for i in _spread(len(windows), num_samples)]
            items += [(len(groups), w) for w in picked]
            groups.append(ValGroup(name, picked, False))
        return groups, items

    def _split_window(self, index: int) -> Window:
        split = self.split
        shard = int(np.searchsorted(split._ends, index, side="right"))
        local = index - (int(split._ends[shard - 1]) if shard else 0)
        return split.shards[shard], local * self.seq_len, self.seq_len + 1

    def label_tokens(self, num_samples: int) -> dict[str, int]:
        """Label tokens per reported group (what ``val_loss/<name>`` averages over)."""
        groups, _ = self.plan(num_samples)
        return {g.name: sum(n - 1 for _, _, n in g.windows) for g in groups}

    def batches(
        self, *, micro_batch: int, num_samples: int, rank: int, world_size: int
    ) -> Iterable:
        if not self.sources and not self.extra:  # as before: plain batches
            return _plain_batches(
                self.split,
                micro_batch=micro_batch,
                num_samples=num_samples,
                rank=rank,
                world_size=world_size,
            )
        groups, items = self.plan(num_samples)
        if len(items) < world_size:
            raise DataError(
                f"the validation set has {len(items)} samples, fewer than the {world_size} "
                "ranks; raise train.eval_samples or val_fraction in prepare"
            )
        parts = np.array_split(np.arange(len(items)), world_size)
        counts = [len(self._chunks([items[i] for i in p], micro_batch)) for p in parts]
        mine = self._chunks([items[i] for i in parts[rank]], micro_batch)
        return GroupedBatches(groups, [(g, self._batch(ws)) for g, ws in mine], max(counts))

    @staticmethod
    def _chunks(items: list, micro_batch: int) -> list[tuple[int | None, list[Window]]]:
        """Consecutive items of one group, at most ``micro_batch`` per batch."""
        out: list[tuple[int | None, list[Window]]] = []
        for group, window in items:
            if out and out[-1][0] == group and len(out[-1][1]) < micro_batch:
                out[-1][1].append(window)
            else:
                out.append((group, [window]))
        return out

    def _batch(self, windows: list[Window]) -> dict[str, torch.Tensor]:
        rows = np.zeros((len(windows), self.seq_len + 1), dtype=np.int64)
        labels = np.full((len(windows), self.seq_len), -100, dtype=np.int64)
        for row, (tokens, start, n) in enumerate(windows):
            rows[row, :n] = tokens[start : start + n]
            labels[row, : n - 1] = rows[row, 1:n]
        return {"input_ids": torch.from_numpy(rows[:, :-1]), "labels": torch.from_numpy(labels)}


def tokenize_extra_val(paths: Sequence[str], *, tokenizer_path: str, add_bos: bool, dtype: str):
    """``(name, tokens)`` of each held-out text file (``train.extra_val``): the whole file as one
    document, as prepare writes one (``[bos]`` when the data has it, the text, ``[eos]``); the
    name is the file name without its extension."""
    tok = load_tokenizer(tokenizer_path)
    out = []
    for path in paths:
        try:
            with open(os.path.expanduser(path), encoding="utf-8", errors="replace") as f:
                text = f.read()
        except OSError as exc:
            raise DataError(
                f"train.extra_val: cannot read {path} ({exc.strerror}); give existing text files"
            ) from None
        if not text.strip():
            raise DataError(f"train.extra_val: {path} holds no text; give a non-empty text file")
        ids = ([tok.bos_id] if add_bos else []) + tok.encode(text) + [tok.eos_id]
        name = os.path.basename(path.rstrip("/"))
        name = name.split(".")[0] or name
        out.append((name, np.asarray(ids, dtype=np.dtype(dtype))))
    names = [n for n, _ in out]
    for name in names:
        if names.count(name) > 1:
            raise DataError(
                f"train.extra_val: two files are named {name!r} (the metric key is the file name "
                "without extension); rename one"
            )
    return out
