"""Finetuning's task data read from tables (pretrain.data.sources.load_rows -> finetune.data): CSV
with backslash-escaped quotes, and rows whose text is empty, whitespace-only or missing.

In-process and cheap: a small tokenizer trained once on two real plays, files of a few rows.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from lmforge.finetune.config import TaskConfig
from lmforge.finetune.data import TaskData, skip_empty_rows, tokenize
from lmforge.pretrain.core.errors import ConfigurationError, DataError
from lmforge.pretrain.core.runlock import LAUNCHER_ENV
from lmforge.pretrain.data.sources import load_rows
from lmforge.pretrain.data.tokenizer import Tokenizer, train_tokenizer
from tests.conftest import plays_dir

REVIEWS = [
    ('He said "hi" to me', "pos"),
    ('A "quoted, comma" here', "neg"),
    ("a backslash \\ stays", "pos"),
    ("plain, with a comma", "neg"),
    ('"starts quoted"', "pos"),
    ("no quotes at all", "neg"),
]


@pytest.fixture(scope="module")
def tok(tmp_path_factory) -> Tokenizer:
    comedies = sorted((Path(plays_dir()) / "comedies").glob("*.md"))[:2]
    out = tmp_path_factory.mktemp("tok") / "t.model"
    texts = [f.read_text(encoding="utf-8") for f in comedies]
    return train_tokenizer(texts=iter(texts), out_path=out, vocab_size=400)


def escaped_csv(path: Path, rows: list[tuple[str, str]], delimiter: str = ",") -> None:
    """Every field quoted; quotes and backslashes inside escaped with a backslash."""

    def field(value: str) -> str:
        return '"' + value.replace("\\", "\\\\").replace('"', '\\"') + '"'

    lines = [f"text{delimiter}label"] + [delimiter.join(map(field, r)) for r in rows]
    path.write_text("\n".join(lines) + "\n", encoding="utf-8")


def test_backslash_escaped_csv(tmp_path, tok):
    expected = [{"text": t, "label": y} for t, y in REVIEWS]
    for name, delimiter in (("r.csv", ","), ("r.tsv", "\t")):
        escaped_csv(tmp_path / name, REVIEWS, delimiter)
        assert load_rows(str(tmp_path / name), split="train", escapechar="\\") == expected
    # The labelled examples of a classification task: every review, exactly.
    task = TaskConfig(train=str(tmp_path / "r.csv"), val=str(tmp_path / "r.tsv"), escapechar="\\")
    data = TaskData(task, tok, seed=0, labels=None, pad_to_max=False)
    assert len(data.train) == len(data.val) == len(REVIEWS) and data.labels == ["neg", "pos"]
    assert [tok.decode(x) for x in data.train.input_ids] == [t for t, _ in REVIEWS]

    # Without the option: one line that names the file and the key to set.
    with pytest.raises(DataError) as exc:
        TaskData(
            TaskConfig(train=str(tmp_path / "r.csv")), tok, seed=0, labels=None, pad_to_max=False
        )
    message = str(exc.value)
    assert "\n" not in message and message.startswith(f"cannot read {tmp_path / 'r.csv'}: ")
    assert message.endswith(
        f'; {tmp_path / "r.csv"} holds backslash-escaped quotes (\\"): set '
        '`task.escapechar: "\\\\"` to read them'
    ), message

    # A file that parses without it (no delimiter after an escaped quote) is read wrongly; a
    # warning says so.
    escaped_csv(tmp_path / "q.csv", [REVIEWS[0], REVIEWS[3]])
    warnings: list[str] = []
    rows = load_rows(str(tmp_path / "q.csv"), split="train", warn=warnings.append)
    assert rows[0]["text"] != REVIEWS[0][0]
    assert warnings == [
        f'warning: 1 value(s) of {tmp_path / "q.csv"} hold \\" (a backslash before a quote): '
        'if the file escapes quotes so, set `task.escapechar: "\\\\"`, or those rows are read '
        "wrongly"
    ]


def test_escapechar_must_be_one_character():
    for bad in ("\\\\", "", '"', ","):
        with pytest.raises(ConfigurationError) as exc:
            TaskConfig(train="t.csv", escapechar=bad)
        assert str(exc.value).startswith("`task.escapechar` must be one character"), bad


def test_empty_rows_are_counted_and_skipped(tmp_path, tok, capsys):
    rows = [(f"review number {i} of a film", "pos" if i % 2 else "neg") for i in range(20)]
    rows[3] = ("", "pos")
    rows[7] = ("  \t ", "neg")
    escaped_csv(tmp_path / "t.csv", rows)
    val = [{"text": "a fine film", "label": "pos"}, {"text": None, "label": "neg"}]
    val += [{"text": "a dull film", "label": "neg"}]
    (tmp_path / "v.jsonl").write_text("".join(json.dumps(r) + "\n" for r in val))
    task = TaskConfig(train=str(tmp_path / "t.csv"), val=str(tmp_path / "v.jsonl"))
    data = TaskData(task, tok, seed=0, labels=None, pad_to_max=False)
    assert (len(data.train), len(data.val)) == (18, 2)
    assert capsys.readouterr().out.splitlines() == [
        f"warning: 2 of 20 rows of {tmp_path / 't.csv'} have an empty `text` (empty, whitespace "
        "or null); they are skipped",
        f"warning: 1 of 3 rows of {tmp_path / 'v.jsonl'} have an empty `text` (empty, whitespace "
        "or null); they are skipped",
    ]
    # Held out from train: counted once, for the file, before the split.
    TaskData(TaskConfig(train=str(tmp_path / "t.csv")), tok, seed=0, labels=None, pad_to_max=False)
    assert capsys.readouterr().out.count("warning: 2 of 20 rows") == 1
    # `lmforge evaluate --data` goes through `tokenize` directly: the same warning.
    examples, _, ids = tokenize(
        task, tok, load_rows(task.train, split="train"), source="t.csv", labels=["neg", "pos"]
    )
    assert len(examples) == len(ids) == 18
    assert "2 of 20 rows of t.csv" in capsys.readouterr().out
    # The workers of a local launcher do not repeat what the launcher said.
    with pytest.MonkeyPatch.context() as patch:
        patch.setenv(LAUNCHER_ENV, "1")
        TaskData(task, tok, seed=0, labels=None, pad_to_max=False)
    assert capsys.readouterr().out == ""

    # sft: an empty response; token classification: an empty word list. All empty: an error.
    sft = TaskConfig(type="sft", train="s")
    sft_rows = [{"prompt": "p", "response": r} for r in ("yes", "", None, "no")]
    assert len(skip_empty_rows(sft, sft_rows, source="s", warn=lambda m: None)) == 2
    ner = TaskConfig(type="token_classification", train="n")
    ner_rows = [{"tokens": w, "tags": ["O"] * len(w or [])} for w in (["a"], [], None)]
    said: list[str] = []
    assert len(skip_empty_rows(ner, ner_rows, source="n", warn=said.append)) == 1
    assert said == [
        "warning: 2 of 3 rows of n have an empty `tokens` (empty, whitespace or null); "
        "they are skipped"
    ]
    with pytest.raises(DataError) as exc:
        skip_empty_rows(sft, sft_rows[1:3], source="s")
    assert str(exc.value) == (
        "all 2 rows of s have an empty `response`; set `task.response_column` to the column "
        "that holds it, or fix the data"
    )
