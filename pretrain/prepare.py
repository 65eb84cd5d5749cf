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
- empty files are skipped (`empty_files_skipped`), as are empty or whitespace-only documents
  (`empty_documents_skipped`); a source with no document left is an error;
- directories are read recursively in sorted order; hidden entries, `__pycache__` and files whose
  extension does not match the format are skipped (`files_skipped_by_extension`);
- U+2581 ("▁") decodes as a space in SentencePiece: documents holding it are counted
  (`documents_with_u2581`) because they do not round-trip exactly.
"""

from __future__ import annotations

import bz2
import codecs
import contextlib
import glob
import gzip
import hashlib
import importlib.util
import json
import lzma
import math
import os
import re
import shutil
import time
import uuid
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from datetime import datetime, timezone
from functools import partial
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc

from pretrain.config import PrepareConfig, SourceConfig, to_container
from pretrain.errors import ConfigurationError, DataError
from pretrain.tokenizer import Tokenizer, file_sha256, train_tokenizer

FORMAT_VERSION = 1
MANIFEST = "manifest.json"
TOKENIZER_FILE = "tokenizer.model"
SPLITS = ("train", "val")

_EXTENSION_FORMATS = {
    ".txt": "text",
    ".md": "text",
    ".text": "text",
    ".jsonl": "jsonl",
    ".json": "jsonl",
    ".csv": "csv",
    ".tsv": "csv",
    ".parquet": "parquet",
}
_OPENERS: dict[str, Callable] = {".gz": gzip.open, ".bz2": bz2.open, ".xz": lzma.open}
_BUILDERS = {"text": "text", "jsonl": "json", "csv": "csv", "parquet": "parquet"}
_SHARD_NAME = re.compile(r"^(train|val)_\d{5}\.bin$")
# Rows per map/write batch are chosen so that one batch holds about this much text.
_BATCH_BYTES = 8 << 20
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
# sources -> one `text` column per source
# --------------------------------------------------------------------------------------------


@dataclass
class _Source:
    index: int
    name: str
    weight: float
    dataset: object  # datasets.Dataset with one column `text`
    check_fffd: bool  # some file was not valid UTF-8: count documents holding U+FFFD
    stats: dict = field(default_factory=dict)

    @property
    def batch_rows(self) -> int:
        rows = max(1, len(self.dataset))
        per_row = max(1, self.dataset.data.nbytes // rows)
        return int(min(1000, max(1, _BATCH_BYTES // per_row)))


def resolve_source_path(path: str) -> Path:
    """A local path; `pkg://PACKAGE/sub/dir` is a directory inside an installed package."""
    if not path.startswith("pkg://"):
        return Path(path).expanduser()
    package, _, sub = path[len("pkg://") :].partition("/")
    try:
        spec = importlib.util.find_spec(package)
    except (ImportError, ValueError):
        spec = None
    if spec is None:
        raise DataError(
            f"source {path!r}: Python package {package!r} is not installed; "
            f"`pip install {package}` or change `sources[].path`"
        )
    if spec.submodule_search_locations:
        base = Path(next(iter(spec.submodule_search_locations)))
    else:
        base = Path(spec.origin or "").parent
    return base / sub


def _format_of(path: Path) -> tuple[str | None, str | None]:
    """(format, compression suffix) from the file name; format None if unknown."""
    name = path.name.lower()
    compression = next((c for c in _OPENERS if name.endswith(c)), None)
    if compression:
        name = name[: -len(compression)]
    return _EXTENSION_FORMATS.get(os.path.splitext(name)[1]), compression


def _walk(directory: Path, skip: Path) -> Iterator[Path]:
    """Files under `directory`, sorted, without hidden entries, Python package files
    (`__pycache__`, `__init__.py`: `pkg://` sources point into packages) and `skip`."""
    for root, dirs, files in os.walk(directory):
        dirs[:] = sorted(
            d
            for d in dirs
            if not d.startswith(".") and d != "__pycache__" and Path(root, d).resolve() != skip
        )
        for name in sorted(files):
            if not name.startswith(".") and name != "__init__.py":
                yield Path(root, name)


def _list_files(src: SourceConfig, out: Path, warnings: dict) -> list[tuple[Path, str]]:
    """(file, format) of a `path` source, in corpus order."""
    name = src.name
    path = resolve_source_path(src.path or "")
    chosen = None if src.format == "auto" else src.format
    found: list[tuple[Path, bool]] = []  # (file, named explicitly by the user)
    if any(ch in str(path) for ch in "*?["):
        matches = sorted(glob.glob(str(path), recursive=True))
        if not matches:
            raise DataError(f"source {name!r}: the glob matches no files; check `sources[].path`")
        for match in map(Path, matches):
            found += [(f, False) for f in _walk(match, out)] if match.is_dir() else [(match, True)]
    elif path.is_dir():
        found = [(f, False) for f in _walk(path, out)]
    elif path.is_file():
        found = [(path, True)]
    else:
        raise DataError(f"source {name!r}: {path} does not exist; fix `sources[].path`")
    files: list[tuple[Path, str]] = []
    skipped = 0
    for file, explicit in found:
        by_extension, _ = _format_of(file)
        if explicit:
            fmt = chosen or by_extension
            if fmt is None:
                raise DataError(
                    f"source {name!r}: cannot tell the format of {file.name} from its extension; "
                    "set `format` to text, jsonl, csv or parquet"
                )
        elif by_extension is None or (chosen and by_extension != chosen):
            skipped += 1
            continue
        else:
            fmt = by_extension
        files.append((file, fmt))
    warnings["files_skipped_by_extension"] += skipped
    if not files:
        extensions = "/".join(k for k, v in _EXTENSION_FORMATS.items() if chosen in (None, v))
        raise DataError(
            f"source {name!r}: no {extensions} files in {path}; point `sources[].path` at a "
            "file, or at a glob such as 'dir/**/*.log' with `format` set"
        )
    return files


def _scan_text_file(path: Path) -> tuple[int, bool]:
    """(decompressed bytes, whether they are valid UTF-8), reading in 1 MiB chunks."""
    _, compression = _format_of(path)
    opener = _OPENERS.get(compression or "", open)
    decoder = codecs.getincrementaldecoder("utf-8")("strict")
    size, valid = 0, True
    with opener(path, "rb") as f:
        while chunk := f.read(1 << 20):
            size += len(chunk)
            if valid:
                try:
                    decoder.decode(chunk)
                except UnicodeDecodeError:
                    valid = False
        if valid:
            try:
                decoder.decode(b"", final=True)
            except UnicodeDecodeError:
                valid = False
    return size, valid


def _read_error(name: str, what: str, exc: Exception) -> DataError:
    first = (str(exc).strip().splitlines() or [type(exc).__name__])[0][:300]
    return DataError(f"source {name!r}: cannot read {what} ({type(exc).__name__}: {first})")


def _load_files(src: SourceConfig, files: list[tuple[Path, str]], cache_dir: Path, warnings):
    """One Dataset per (format, delimiter) group of `files`, concatenated; plus check_fffd."""
    import datasets

    groups: dict[tuple[str, str | None], list[str]] = {}
    check_fffd = False
    for file, fmt in files:
        if fmt == "text":
            size, valid = _scan_text_file(file)
            if not valid:
                warnings["files_with_invalid_utf8"] += 1
                check_fffd = True
        else:
            size = file.stat().st_size
        if size == 0:
            warnings["empty_files_skipped"] += 1
            continue
        delimiter = "\t" if fmt == "csv" and ".tsv" in file.name.lower() else None
        # data_files are patterns to `datasets`: escape names such as "scene[1].txt"
        groups.setdefault((fmt, delimiter), []).append(glob.escape(str(file)))
    if not groups:
        raise DataError(
            f"source {src.name!r}: all {len(files)} file(s) are empty; add text or remove the source"
        )
    parts = []
    for (fmt, delimiter), data_files in groups.items():
        kwargs: dict = {}
        if fmt == "text":
            kwargs = {"sample_by": src.text_unit, "encoding_errors": "replace"}
        elif fmt == "csv":
            kwargs = {"keep_default_na": False}  # "NA" or "null" is text, not a missing value
            if delimiter:
                kwargs["delimiter"] = delimiter
        try:
            ds = datasets.load_dataset(
                _BUILDERS[fmt],
                data_files=data_files,
                split="train",
                cache_dir=str(cache_dir),
                **kwargs,
            )
        except Exception as exc:  # the builders raise many types; the source name is what matters
            raise _read_error(src.name, f"its {fmt} files", exc) from exc
        parts.append(_text_column(ds, src, "text" if fmt == "text" else src.text_column))
    return (parts[0] if len(parts) == 1 else datasets.concatenate_datasets(parts)), check_fffd


def _is_saved_dataset(path: Path) -> bool:
    return path.is_dir() and (
        (path / "dataset_dict.json").is_file() or (path / "state.json").is_file()
    )


def _load_saved_or_named(src: SourceConfig, location: str, cache_dir: Path):
    """A `save_to_disk` directory, a local directory of data files, or a `datasets` name."""
    import datasets

    local = Path(location).expanduser()
    try:
        if _is_saved_dataset(local):
            ds = datasets.load_from_disk(str(local))
            if isinstance(ds, datasets.DatasetDict):
                if src.split not in ds:
                    raise DataError(
                        f"source {src.name!r} has no split {src.split!r} (splits: "
                        f"{', '.join(ds)}); set `sources[].split`"
                    )
                ds = ds[src.split]
        elif local.exists():
            ds = datasets.load_dataset(
                str(local), src.dataset_config, split=src.split, cache_dir=str(cache_dir)
            )
        else:
            # A hub name: use the user's HF cache, so a dataset downloaded once works offline.
            ds = datasets.load_dataset(location, src.dataset_config, split=src.split)
    except DataError:
        raise
    except Exception as exc:
        raise _read_error(src.name, "the dataset", exc) from exc
    return _text_column(ds, src, src.text_column)


def _text_column(ds, src: SourceConfig, column: str):
    """`ds` reduced to one string column named `text`."""
    if column not in ds.column_names:
        raise DataError(
            f"source {src.name!r} has no column {column!r} (columns: "
            f"{', '.join(ds.column_names)}); set `text_column` to the one holding the text"
        )
    ds = ds.select_columns([column])
    if column != "text":
        ds = ds.rename_column(column, "text")
    dtype = getattr(ds.features["text"], "dtype", None)
    if dtype not in ("string", "large_string"):
        raise DataError(
            f"source {src.name!r}: column {column!r} holds {ds.features['text']}, not text; "
            "set `text_column` to a string column"
        )
    return ds


def _has_text(ds, batch_rows: int) -> bool:
    for batch in ds.iter(batch_size=batch_rows):
        if any(t and not t.isspace() for t in batch["text"]):
            return True
    return False


@contextlib.contextmanager
def _no_progress_bars() -> Iterator[None]:
    """Hide `datasets`' per-file bars while loading ("Downloading data" for local files)."""
    import datasets

    was_disabled = datasets.are_progress_bars_disabled()
    datasets.disable_progress_bars()
    try:
        yield
    finally:
        if not was_disabled:
            datasets.enable_progress_bars()


def _load_source(index: int, src: SourceConfig, out: Path, cache_dir: Path, warnings) -> _Source:
    with _no_progress_bars():
        return _load_source_quietly(index, src, out, cache_dir, warnings)


def _load_source_quietly(index, src: SourceConfig, out: Path, cache_dir: Path, warnings):
    check_fffd = False
    if src.path is not None and not _is_saved_dataset(resolve_source_path(src.path)):
        files = _list_files(src, out, warnings)
        ds, check_fffd = _load_files(src, files, cache_dir, warnings)
        stats = {"files": len(files)}
    else:
        location = src.dataset if src.dataset is not None else str(resolve_source_path(src.path))
        ds = _load_saved_or_named(src, location, cache_dir)
        stats = {}
    source = _Source(index, src.name, src.weight, ds, check_fffd, stats)
    if not _has_text(ds, source.batch_rows):
        raise DataError(
            f"source {src.name!r} has no non-empty documents ({len(ds)} rows, all empty or "
            "whitespace); check the path, `text_column` and `text_unit`"
        )
    return source


# --------------------------------------------------------------------------------------------
# tokenization (runs inside datasets.map workers)
# --------------------------------------------------------------------------------------------


class _TokenizeBatch:
    """`Dataset.map` function: a batch of documents -> ids and bookkeeping columns.

    Rows are kept one-to-one with the source (skipped documents get empty ids) so that the
    bookkeeping columns count them. Picklable: the tokenizer loads lazily in each worker.
    """

    def __init__(self, *, tokenizer_path: str, source: _Source, cfg: PrepareConfig, threads: int):
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
            self._tokenizer = Tokenizer(self.tokenizer_path)
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
            "empty": empty,
            "fffd": [self.check_fffd and bool(t) and "\ufffd" in t for t in texts],
            "u2581": [bool(t) and "\u2581" in t for t in texts],
        }


def _tokenize_source(source: _Source, tok: Tokenizer, cfg: PrepareConfig, work: Path, log: Log):
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
            "empty": datasets.Value("bool"),
            "fffd": datasets.Value("bool"),
            "u2581": datasets.Value("bool"),
        }
    )
    started = time.perf_counter()
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


def _train_documents(sources: list[_Source], cfg: PrepareConfig) -> Iterator[str]:
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


def _arrow_batches(tokenized) -> Iterator[pa.RecordBatch]:
    """Record batches of a mapped dataset, read as a stream (not memory-mapped, so resident
    memory stays one batch however big the files are)."""
    assert tokenized._indices is None, "a mapped dataset has no indices mapping"
    for cache_file in tokenized.cache_files:
        with pa.OSFile(cache_file["filename"]) as f:
            yield from pa.ipc.open_stream(f)


def _write_shards(
    sources: list[_Source], tokenized: list, tok: Tokenizer, cfg: PrepareConfig, work: Path
) -> tuple[dict, np.ndarray]:
    """Stream every source's tokens into the split writers; fill per-source stats."""
    dtype = token_dtype(tok.vocab_size)
    writers = {s: _ShardWriter(work, s, dtype, cfg.shard_tokens) for s in SPLITS}
    documents = dict.fromkeys(SPLITS, 0)
    unigram = np.zeros(tok.vocab_size, dtype=np.int64)
    for source, tokens in zip(sources, tokenized, strict=True):
        stats = source.stats
        stats.update(dict.fromkeys(("rows", "empty", "fffd", "u2581", "documents"), 0))
        stats.update({f"{s}_tokens": 0 for s in SPLITS})
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
                for split_code, split in enumerate(SPLITS):
                    rows = (is_val == split_code) & (copies > copy)
                    n_rows = int(rows.sum())
                    if not n_rows:
                        continue
                    chosen = values if n_rows == len(rows) else values[np.repeat(rows, lengths)]
                    writers[split].write(chosen)
                    documents[split] += n_rows
                    stats["documents"] += n_rows
                    stats[f"{split}_tokens"] += len(chosen)
                    if split == "train":
                        unigram += np.bincount(chosen, minlength=tok.vocab_size)
    splits = {}
    for split in SPLITS:
        shards = writers[split].close()
        splits[split] = {
            "tokens": sum(s["tokens"] for s in shards),
            "documents": documents[split],
            "shards": shards,
        }
    return splits, unigram


def _entropy_nats(counts: np.ndarray) -> float:
    p = counts[counts > 0] / counts.sum()
    return float(-(p * np.log(p)).sum())


# --------------------------------------------------------------------------------------------
# prepare
# --------------------------------------------------------------------------------------------


def _write_json_atomic(path: Path, obj: dict) -> None:
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    with open(tmp, "w", encoding="utf-8") as f:
        json.dump(obj, f, indent=2)
        f.write("\n")
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)
    _fsync_dir(path.parent)


def _fsync_dir(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _publish(work: Path, out: Path, manifest: dict) -> None:
    """Move the new files into `out`, manifest last; an old manifest goes first so that `out`
    never pairs a manifest with files of another run."""
    (out / MANIFEST).unlink(missing_ok=True)
    _fsync_dir(out)
    for old in out.iterdir():
        if _SHARD_NAME.match(old.name):
            old.unlink()
    for new in sorted(work.iterdir()):
        if new.is_file():
            os.replace(new, out / new.name)
    _fsync_dir(out)
    _write_json_atomic(out / MANIFEST, manifest)


def _get_tokenizer(sources: list[_Source], cfg: PrepareConfig, work: Path, log: Log) -> Tokenizer:
    target = work / TOKENIZER_FILE
    started = time.perf_counter()
    if cfg.tokenizer.path:
        given = Tokenizer(cfg.tokenizer.path)
        shutil.copyfile(given.path, target)
        with open(target, "rb") as f:
            os.fsync(f.fileno())
        tok = Tokenizer(target)
        log(f"tokenizer: reusing {given.path} (vocab {tok.vocab_size:,})")
    else:
        try:
            tok = train_tokenizer(
                texts=_train_documents(sources, cfg),
                out_path=target,
                vocab_size=cfg.tokenizer.vocab_size,
                model_type=cfg.tokenizer.model_type,
                max_bytes=cfg.tokenizer.train_max_bytes,
            )
        except DataError:
            if next(_train_documents(sources, cfg), None) is None:
                raise DataError(
                    f"`val_fraction`={cfg.val_fraction} put every document into the validation "
                    "split; lower `val_fraction` or use more documents (e.g. `text_unit: paragraph`)"
                ) from None
            raise
        log(
            f"tokenizer: trained {cfg.tokenizer.model_type} vocab {tok.vocab_size:,} in "
            f"{time.perf_counter() - started:.1f} s"
        )
    if tok.eos_id is None:
        raise DataError(
            f"tokenizer {cfg.tokenizer.path} has no EOS piece, which ends every document; "
            "use a SentencePiece model with eos_id set"
        )
    if cfg.tokenizer.add_bos and tok.bos_id is None:
        raise DataError(
            f"`tokenizer.add_bos`=true but tokenizer {cfg.tokenizer.path} has no BOS piece; "
            "set add_bos=false or use a model with bos_id set"
        )
    return tok


def _check_splits(splits: dict, cfg: PrepareConfig) -> None:
    total = sum(splits[s]["documents"] for s in SPLITS)
    if splits["val"]["documents"] == 0:
        raise DataError(
            f"`val_fraction`={cfg.val_fraction} put none of the {total} documents into the "
            f"validation split; raise `val_fraction` (about {min(0.49, 3 / max(total, 1)):.2g} "
            "expects 3 documents) or use more documents (e.g. `text_unit: paragraph`)"
        )
    if splits["train"]["documents"] == 0:
        raise DataError(
            f"`val_fraction`={cfg.val_fraction} put all {total} documents into the validation "
            "split; lower `val_fraction` or use more documents (e.g. `text_unit: paragraph`)"
        )


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
    out.mkdir(parents=True, exist_ok=True)
    work = out / f".tmp-prepare-{os.getpid()}"
    shutil.rmtree(work, ignore_errors=True)
    (work / "cache").mkdir(parents=True)
    try:
        manifest = _prepare_in(cfg, out.resolve(), work, log)
        _publish(work, out, manifest)
    finally:
        shutil.rmtree(work, ignore_errors=True)
    train, val = manifest["splits"]["train"], manifest["splits"]["val"]
    log(
        f"prepared {out}: train {train['documents']:,} documents / {train['tokens']:,} tokens, "
        f"val {val['documents']:,} / {val['tokens']:,}, vocab {manifest['tokenizer']['vocab_size']:,}, "
        f"{len(train['shards']) + len(val['shards'])} shards, "
        f"{time.perf_counter() - started:.1f} s"
    )
    return manifest


def _prepare_in(cfg: PrepareConfig, out: Path, work: Path, log: Log) -> dict:
    warnings = dict.fromkeys(
        (
            "empty_documents_skipped",
            "documents_with_invalid_utf8",
            "documents_with_u2581",
            "empty_files_skipped",
            "files_with_invalid_utf8",
            "files_skipped_by_extension",
        ),
        0,
    )
    sources = []
    for index, src in enumerate(cfg.sources):
        source = _load_source(index, src, out, work / "cache", warnings)
        files = f"{source.stats['files']} files, " if "files" in source.stats else ""
        log(
            f"source {index} {source.name}: {files}{len(source.dataset):,} rows, "
            f"{source.dataset.data.nbytes / 1e6:.1f} MB, weight {source.weight}"
        )
        sources.append(source)
    tok = _get_tokenizer(sources, cfg, work, log)
    tokenized = [_tokenize_source(s, tok, cfg, work, log) for s in sources]
    splits, unigram = _write_shards(sources, tokenized, tok, cfg, work)
    _check_splits(splits, cfg)
    for source in sources:
        warnings["empty_documents_skipped"] += source.stats["empty"]
        warnings["documents_with_invalid_utf8"] += source.stats["fffd"]
        warnings["documents_with_u2581"] += source.stats["u2581"]
        if source.stats["documents"] == 0:
            log(f"warning: source {source.name} contributed no documents (weight {source.weight})")
    for key, value in warnings.items():
        if value:
            log(f"warning: {key.replace('_', ' ')}: {value:,}")
    return {
        "format_version": FORMAT_VERSION,
        "created": datetime.now(timezone.utc).isoformat(timespec="seconds"),
        "tokenizer": {
            "file": TOKENIZER_FILE,
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
        if file_sha256(tokenizer_path) != tokenizer["sha256"]:
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
    except (KeyError, TypeError) as exc:
        raise DataError(f"{manifest_path} is malformed (missing {exc}); {redo}") from None
    return manifest


def verify_shards(path: str | os.PathLike) -> dict:
    """`load_manifest` plus the sha256 of every shard (reads all the data)."""
    manifest = load_manifest(path)
    for split in SPLITS:
        for shard in manifest["splits"][split]["shards"]:
            shard_path = Path(path) / shard["file"]
            if file_sha256(shard_path) != shard["sha256"]:
                raise DataError(
                    f"shard {shard_path} does not match its sha256 (corrupted); "
                    "re-run `lmforge prepare` with overwrite=true"
                )
    return manifest
