"""Corpus sources for `lmforge prepare`: local files, `datasets` names or saved datasets, and
`pkg://` directories inside installed packages -> one `text` column, one row per document.
`load_rows` reads the same kinds of source (tables: CSV/TSV/JSONL/Parquet files, saved datasets,
`datasets` names) as rows of every column, for finetuning's labelled examples.

Policies (invalid UTF-8, empty files and documents, skipped extensions) are described in
pretrain/data/prepare.py and counted in the manifest's `warnings`.

CSV/TSV: both readers (`datasets`' for prepare, pyarrow's for finetuning) take quotes doubled
(`""`) inside quoted fields, and with `escapechar` set, quotes escaped by that character
(`\\"`). A file that fails to parse without it while holding `\\"` gets an error saying to set
it; one that parses but whose values hold `\\"` (an escaped quote without a delimiter after it
reads without error, wrongly) gets a warning.
"""

from __future__ import annotations

import bz2
import codecs
import contextlib
import glob
import gzip
import importlib.util
import lzma
import os
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass, field
from pathlib import Path

from lmforge.pretrain.config.schema import SourceConfig
from lmforge.pretrain.core.errors import DataError

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
# Rows per map/write batch are chosen so that one batch holds about this much text.
_BATCH_BYTES = 8 << 20
# `text_unit: paragraph`: a file with a paragraph this big, or with no blank line in this many
# lines, is most likely not separated into paragraphs by blank lines (a warning says so).
_HUGE_PARAGRAPH_BYTES = 1 << 20
_LINES_WITHOUT_PARAGRAPHS = 1000
_ESCAPED_QUOTE = b'\\"'

Log = Callable[[str], None]


# --------------------------------------------------------------------------------------------
# sources -> one `text` column per source
# --------------------------------------------------------------------------------------------


@dataclass
class LoadedSource:
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


class _Paragraphs:
    """Paragraph sizes of a byte stream as the `datasets` text builder cuts it: universal
    newlines ("\\r\\n", "\\r", "\\n"), paragraphs separated by a blank line ("\\n\\n")."""

    def __init__(self) -> None:
        self.longest = self.current = self.breaks = self.lines = 0
        self._held = b""  # a trailing "\r" that may be the first half of "\r\n"
        self._after_newline = False

    def feed(self, chunk: bytes, *, final: bool = False) -> None:
        data, self._held = self._held + chunk, b""
        if data.endswith(b"\r") and not final:
            data, self._held = data[:-1], b"\r"
        data = data.replace(b"\r\n", b"\n").replace(b"\r", b"\n")
        if not data:
            return
        self.lines += data.count(b"\n")
        parts = data.split(b"\n\n")
        if self._after_newline and parts[0].startswith(b"\n"):  # a break across chunks
            self._close()
            parts[0] = parts[0][1:]
        self.current += len(parts[0])
        for part in parts[1:]:
            self._close()
            self.current = len(part)
        self._after_newline = data.endswith(b"\n")

    def _close(self) -> None:
        self.longest = max(self.longest, self.current)
        self.breaks += 1
        self.current = 0

    def finish(self) -> None:
        self.feed(b"", final=True)
        self.longest = max(self.longest, self.current)


def _scan_text_file(path: Path, name: str, paragraphs: _Paragraphs | None = None):
    """(decompressed bytes, whether they are valid UTF-8), reading in 1 MiB chunks; feeds
    ``paragraphs`` if given. A file with NUL bytes is binary (text never holds them): an error
    naming it."""
    _, compression = _format_of(path)
    opener = _OPENERS.get(compression or "", open)
    decoder = codecs.getincrementaldecoder("utf-8")("strict")
    size, valid = 0, True
    with opener(path, "rb") as f:
        while chunk := f.read(1 << 20):
            if b"\0" in chunk:
                raise DataError(
                    f"source {name!r}: {path} holds NUL bytes: it is binary, not text; remove "
                    "it from the source or fix `sources[].path`"
                )
            size += len(chunk)
            if paragraphs is not None:
                paragraphs.feed(chunk)
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
    if paragraphs is not None:
        paragraphs.finish()
    return size, valid


def _paragraph_problem(path: Path, p: _Paragraphs) -> str | None:
    """Why `text_unit: paragraph` is likely wrong for a file, or None."""
    if p.breaks == 0 and p.lines >= _LINES_WITHOUT_PARAGRAPHS:
        return f"{path} has no blank line, so its {p.lines:,} lines become one document"
    if p.longest > _HUGE_PARAGRAPH_BYTES:
        return (
            f"{path} has a {p.longest / 1e6:.1f} MB paragraph (no blank line in it): one document"
        )
    return None


def _holds_escaped_quotes(path: Path) -> bool:
    """Whether the (decompressed) file holds a backslash-escaped quote."""
    _, compression = _format_of(path)
    tail = b""
    with _OPENERS.get(compression or "", open)(path, "rb") as f:
        while chunk := f.read(1 << 20):
            if _ESCAPED_QUOTE in tail + chunk:
                return True
            tail = chunk[-1:]
    return False


def _escape_advice(paths: Iterable[Path], key: str) -> str:
    """'; FILE holds ... set `key`' for the first file holding a backslash-escaped quote."""
    for path in paths:
        with contextlib.suppress(OSError, EOFError):
            if _holds_escaped_quotes(path):
                return (
                    f'; {path} holds backslash-escaped quotes (\\"): set `{key}: "\\\\"` to read '
                    "them"
                )
    return ""


def _escaped_quote_values(columns) -> int:
    """How many string values of pyarrow ``columns`` hold a backslash before a quote."""
    import pyarrow as pa
    import pyarrow.compute as pc

    found = 0
    for column in columns:
        if pa.types.is_string(column.type) or pa.types.is_large_string(column.type):
            found += pc.sum(pc.match_substring(column, '\\"')).as_py() or 0
    return found


def _escaped_quote_warning(count: int, what: str, key: str) -> str:
    return (
        f'warning: {count:,} value(s) of {what} hold \\" (a backslash before a quote): if the '
        f'file escapes quotes so, set `{key}: "\\\\"`, or those rows are read wrongly'
    )


def _first_line(exc: Exception, limit: int) -> str:
    """The first line of an error's message (its type's name if empty), cut at ``limit``."""
    return (str(exc).strip().splitlines() or [type(exc).__name__])[0][:limit]


def _read_error(name: str, what: str, exc: BaseException) -> DataError:
    while exc.__cause__ is not None:  # `datasets` wraps the reader's error: name that one
        exc = exc.__cause__
    first = _first_line(exc, 300)  # type: ignore[arg-type]
    return DataError(f"source {name!r}: cannot read {what} ({type(exc).__name__}: {first})")


def _load_files(
    src: SourceConfig, files: list[tuple[Path, str]], cache_dir: Path, warnings, log: Log
):
    """One Dataset per (format, delimiter) group of `files`, concatenated; plus check_fffd."""
    import datasets

    groups: dict[tuple[str, str | None], list[Path]] = {}
    check_fffd = False
    odd_paragraphs: list[str] = []
    for file, fmt in files:
        if fmt == "text":
            paragraphs = _Paragraphs() if src.text_unit == "paragraph" else None
            try:
                size, valid = _scan_text_file(file, src.name, paragraphs)
            except (OSError, EOFError) as exc:  # unreadable, or a corrupt .gz/.bz2/.xz
                raise _read_error(src.name, str(file), exc) from None
            if not valid:
                warnings["files_with_invalid_utf8"] += 1
                check_fffd = True
            if paragraphs is not None and (problem := _paragraph_problem(file, paragraphs)):
                odd_paragraphs.append(problem)
        else:
            size = file.stat().st_size
        if size == 0:
            warnings["empty_files_skipped"] += 1
            continue
        delimiter = "\t" if fmt == "csv" and ".tsv" in file.name.lower() else None
        groups.setdefault((fmt, delimiter), []).append(file)
    if not groups:
        raise DataError(
            f"source {src.name!r}: all {len(files)} file(s) are empty; add text or remove the source"
        )
    if odd_paragraphs:
        warnings["files_with_huge_paragraphs"] += len(odd_paragraphs)
        more = f" (and {len(odd_paragraphs) - 1} more file(s))" if len(odd_paragraphs) > 1 else ""
        log(
            f"warning: source {src.name!r}: {odd_paragraphs[0]} under `text_unit: paragraph`"
            f"{more}; if blank lines do not separate its paragraphs, set `text_unit: line`"
        )
    parts = []
    for (fmt, delimiter), paths in groups.items():
        kwargs: dict = {}
        if fmt == "text":
            kwargs = {"sample_by": src.text_unit, "encoding_errors": "replace"}
        elif fmt == "csv":
            kwargs = {"keep_default_na": False}  # "NA" or "null" is text, not a missing value
            if delimiter:
                kwargs["delimiter"] = delimiter
            if src.escapechar:
                kwargs["escapechar"] = src.escapechar
        try:
            ds = datasets.load_dataset(
                _BUILDERS[fmt],
                # data_files are patterns to `datasets`: escape names such as "scene[1].txt"
                data_files=[glob.escape(str(p)) for p in paths],
                split="train",
                cache_dir=str(cache_dir),
                **kwargs,
            )
        except Exception as exc:  # the builders raise many types; the source name is what matters
            error = _read_error(src.name, f"its {fmt} files", exc)
            if fmt == "csv" and not src.escapechar:
                error = DataError(f"{error}{_escape_advice(paths, 'sources[].escapechar')}")
            raise error from exc
        if fmt == "csv" and any(c.startswith("__index_level_") for c in ds.column_names):
            # pandas makes the extra leading fields of rows longer than the header an index
            advice = "" if src.escapechar else _escape_advice(paths, "sources[].escapechar")
            raise DataError(
                f"source {src.name!r}: cannot read its csv files (some rows have more fields "
                f"than the header){advice or '; check the quoting and the delimiter'}"
            )
        ds = _text_column(ds, src, "text" if fmt == "text" else src.text_column)
        if fmt == "csv" and not src.escapechar:
            escaped = _escaped_quote_values([ds.data.column("text")])
            if escaped:
                what = f"source {src.name!r} (column {src.text_column!r})"
                log(_escaped_quote_warning(escaped, what, "sources[].escapechar"))
        parts.append(ds)
    return (parts[0] if len(parts) == 1 else datasets.concatenate_datasets(parts)), check_fffd


def _is_saved_dataset(path: Path) -> bool:
    return path.is_dir() and (
        (path / "dataset_dict.json").is_file() or (path / "state.json").is_file()
    )


class _MissingSplit(Exception):
    """A saved DatasetDict without the requested split; ``splits`` are the ones it has."""

    def __init__(self, splits: list[str]) -> None:
        super().__init__(", ".join(splits))
        self.splits = splits


def _open_dataset(
    location: str, local: Path, *, split: str, config: str | None, cache_dir: Path | None = None
):
    """Split ``split`` of the `save_to_disk` directory or the directory of data files at
    ``local``, or else of the `datasets` name ``location``. A saved DatasetDict without ``split``
    raises _MissingSplit; the loaders' own errors propagate (the caller names the source)."""
    import datasets

    if _is_saved_dataset(local):
        ds = datasets.load_from_disk(str(local))
        if isinstance(ds, datasets.DatasetDict):
            if split not in ds:
                raise _MissingSplit(list(ds))
            ds = ds[split]
        return ds
    if local.exists():
        cache = None if cache_dir is None else str(cache_dir)
        return datasets.load_dataset(str(local), config, split=split, cache_dir=cache)
    # A hub name: use the user's HF cache, so a dataset downloaded once works offline.
    return datasets.load_dataset(location, config, split=split)


def _load_saved_or_named(src: SourceConfig, location: str, cache_dir: Path):
    """A `save_to_disk` directory, a local directory of data files, or a `datasets` name."""
    local = Path(location).expanduser()
    try:
        ds = _open_dataset(
            location, local, split=src.split, config=src.dataset_config, cache_dir=cache_dir
        )
    except _MissingSplit as exc:
        raise DataError(
            f"source {src.name!r} has no split {src.split!r} (splits: "
            f"{', '.join(exc.splits)}); set `sources[].split`"
        ) from None
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
    _check_utf8(ds.data.column("text"), src.name)
    return ds


def _check_utf8(column, name: str) -> None:
    """Arrow string data must be UTF-8 (the JSON reader, for one, does not check); reading an
    invalid value later would fail deep inside tokenization."""
    import pyarrow as pa

    try:
        column.validate(full=True)
    except pa.ArrowInvalid as exc:
        raise DataError(
            f"source {name!r} is not valid UTF-8 ({_first_line(exc, 120)}); JSONL/CSV/Parquet "
            "sources must be UTF-8: re-encode the file"
        ) from None


def _has_text(ds, batch_rows: int) -> bool:
    for batch in ds.iter(batch_size=batch_rows):
        if any(t and not t.isspace() for t in batch["text"]):
            return True
    return False


@contextlib.contextmanager
def _no_progress_bars() -> Iterator[None]:
    """Hide `datasets`' per-file bars while loading ("Downloading data" for local files), and
    its log lines about a file it cannot read (the error that follows names the source)."""
    import datasets

    was_disabled = datasets.are_progress_bars_disabled()
    verbosity = datasets.logging.get_verbosity()
    datasets.disable_progress_bars()
    datasets.logging.set_verbosity(datasets.logging.CRITICAL)
    try:
        yield
    finally:
        datasets.logging.set_verbosity(verbosity)
        if not was_disabled:
            datasets.enable_progress_bars()


def load_source(
    index: int, src: SourceConfig, out: Path, cache_dir: Path, warnings, log: Log | None = None
) -> LoadedSource:
    """Source ``src`` as one `text` column; counts go into ``warnings``, warning lines to
    ``log``."""
    with _no_progress_bars():
        return _load_source_quietly(index, src, out, cache_dir, warnings, log or _ignore)


def _ignore(_: str) -> None:
    pass


def _load_source_quietly(index, src: SourceConfig, out: Path, cache_dir: Path, warnings, log):
    check_fffd = False
    if src.path is not None and not _is_saved_dataset(resolve_source_path(src.path)):
        files = _list_files(src, out, warnings)
        ds, check_fffd = _load_files(src, files, cache_dir, warnings, log)
        stats = {"files": len(files), "text_files": sum(fmt == "text" for _, fmt in files)}
    else:
        location = src.dataset if src.dataset is not None else str(resolve_source_path(src.path))
        ds = _load_saved_or_named(src, location, cache_dir)
        stats = {}
    source = LoadedSource(index, src.name, src.weight, ds, check_fffd, stats)
    if not _has_text(ds, source.batch_rows):
        raise DataError(
            f"source {src.name!r} has no non-empty documents ({len(ds)} rows, all empty or "
            "whitespace); check the path, `text_column` and `text_unit`"
        )
    return source


# --------------------------------------------------------------------------------------------
# table sources -> rows (finetuning's labelled examples)
# --------------------------------------------------------------------------------------------


def load_rows(
    source: str,
    *,
    split: str,
    dataset_config: str | None = None,
    escapechar: str | None = None,
    escapechar_key: str = "task.escapechar",
    warn: Log | None = None,
) -> list[dict]:
    """Rows of a CSV/TSV/JSONL/Parquet file (optionally .gz/.bz2/.xz), a saved dataset
    directory, or a `datasets` name (split ``split``). ``escapechar``: of CSV/TSV files (the
    config key that sets it is ``escapechar_key``, named in the advice); ``warn`` gets warning
    lines."""
    path = resolve_source_path(source)
    fmt, _ = _format_of(path)
    if path.is_file():
        if fmt not in ("csv", "jsonl", "parquet"):
            raise DataError(
                f"{source}: unknown file type; use .csv, .tsv, .jsonl/.json or .parquet"
            )
        table = _read_table(path, fmt, source, escapechar, escapechar_key)
        if fmt == "csv" and not escapechar and warn is not None:
            escaped = _escaped_quote_values(table.columns)
            if escaped:
                warn(_escaped_quote_warning(escaped, source, escapechar_key))
        return table.to_pylist()
    if fmt is not None and not path.exists():
        raise DataError(f"{source}: no such file")
    try:
        ds = _open_dataset(source, path, split=split, config=dataset_config)
    except _MissingSplit as exc:
        raise DataError(
            f"{source} has no split {split!r} (splits: {', '.join(exc.splits)})"
        ) from None
    except Exception as exc:  # the loaders raise many types; the source is what matters
        first = _first_line(exc, 200)
        raise DataError(f"cannot load {source!r} split {split!r}: {first}") from None
    return ds.to_list()


def _read_table(
    path: Path,
    fmt: str,
    source: str,
    escapechar: str | None = None,
    escapechar_key: str = "task.escapechar",
):
    """A pyarrow Table of a csv, jsonl or parquet file."""
    import pyarrow as pa
    import pyarrow.csv as pacsv
    import pyarrow.json as pajson
    import pyarrow.parquet as pq

    # one block holds the longest line (the readers' default blocks are 1 MiB)
    block = min(max(path.stat().st_size + 1, 1 << 20), 1 << 30)
    try:
        if fmt == "parquet":
            table = pq.read_table(path)
        elif fmt == "jsonl":
            table = pajson.read_json(path, read_options=pajson.ReadOptions(block_size=block))
        else:
            delimiter = "\t" if ".tsv" in path.name.lower() else ","
            parse = pacsv.ParseOptions(
                delimiter=delimiter, newlines_in_values=True, escape_char=escapechar or False
            )
            # every column as text: labels such as "01" or "NA" stay what they are
            table = pacsv.read_csv(
                path,
                read_options=pacsv.ReadOptions(block_size=block),
                parse_options=parse,
                convert_options=pacsv.ConvertOptions(
                    strings_can_be_null=False,
                    quoted_strings_can_be_null=False,
                    column_types=_all_strings(path, parse, block),
                ),
            )
        table.validate(full=True)  # strings must be UTF-8 (the JSON reader does not check)
        return table
    except (pa.ArrowInvalid, OSError, UnicodeDecodeError) as exc:
        advice = ""
        if fmt == "csv" and not escapechar and isinstance(exc, pa.ArrowInvalid):
            advice = _escape_advice([path], escapechar_key)
        raise DataError(f"cannot read {source}: {_first_line(exc, 200)}{advice}") from None


def _all_strings(path: Path, parse, block: int) -> dict:
    import pyarrow as pa
    import pyarrow.csv as pacsv

    header = pacsv.open_csv(
        path, read_options=pacsv.ReadOptions(block_size=block), parse_options=parse
    )
    return {name: pa.string() for name in header.schema.names}
