"""`lmforge evaluate`: perplexity of text files scored several windows per forward pass (the same
numbers as one window at a time), per file and in total, with its progress on stderr only for
long inputs off a terminal; and `--predictions`, one row per labelled example of every task type,
from the code path the demo's paired comparison reads. `lmforge bench --evaluate` puts the
scoring next to training the same model.

The models are a 2-step tiny pretraining run (fp32) and three 2-step finetunes of it: a
classifier, an sft model and a tagger; what is checked is how evaluate counts and reports, not
what they learned.
"""

from __future__ import annotations

import csv
import json
import math
import os
import stat

import pytest
import torch

from lmforge.launcher.cli import main
from tests.conftest import lmforge, plays_dir
from tests.runs import TINY

PLAY = os.path.join(
    plays_dir(), "comedies", sorted(os.listdir(os.path.join(plays_dir(), "comedies")))[0]
)
FINETUNE = [
    "task.max_len=32",
    "train.max_steps=2",
    "train.micro_batch_size=4",
    "train.global_batch_size=4",
    "train.eval_interval=0",
    "train.precision=fp32",
    "logging.plot=false",
    "logging.progress=false",
    "logging.tensorboard=false",
]
WORDS = "a merry jest of the king and his fool in the forest at night".split()


def _play(chars: int) -> str:
    with open(PLAY, encoding="utf-8") as f:
        return f.read()[:chars]


def _classification_rows() -> list[dict]:
    """An id column (not in order), labels, and one row with no text (skipped, with a
    warning)."""
    rows = [
        {"id": f"r{100 - i}", "text": " ".join(WORDS[i % 5 : i % 5 + 4 + i % 3]), "label": "pos"}
        for i in range(14)
    ]
    for i, row in enumerate(rows):
        row["label"] = "pos" if i % 3 else "neg"
    rows[5]["text"] = ""
    return rows


@pytest.fixture(scope="module")
def models(tiny_data, tmp_path_factory) -> dict:
    root = tmp_path_factory.mktemp("evaluate")
    runs = root / "runs"
    lmforge(
        "pretrain",
        "name=lm",
        f"runs_dir={runs}",
        f"data.path={tiny_data}",
        *TINY,
        "train.max_steps=2",
        "logging.plot=false",
    )
    cls = root / "cls.csv"
    with open(cls, "w", newline="", encoding="utf-8") as f:
        writer = csv.DictWriter(f, fieldnames=["id", "text", "label"])
        writer.writeheader()
        writer.writerows(_classification_rows())
    sft = root / "sft.csv"
    sft.write_text(
        "prompt,response\n"
        + "".join(f"say {w},{w} {WORDS[(i + 1) % len(WORDS)]}\n" for i, w in enumerate(WORDS))
    )
    tags = root / "tags.jsonl"
    with open(tags, "w", encoding="utf-8") as f:
        for i in range(10):
            words = WORDS[i : i + 3] + ["Hamlet", "of", "Denmark"]
            f.write(json.dumps({"tokens": words, "tags": ["O"] * 3 + ["B-PER", "O", "B-LOC"]}))
            f.write("\n")
    for name, kind, data in (
        ("cls", "classification", cls),
        ("sft", "sft", sft),
        ("tag", "token_classification", tags),
    ):
        lmforge(
            "finetune",
            f"name={name}",
            f"runs_dir={runs}",
            f"init_from={runs}/lm",
            f"task.type={kind}",
            f"task.train={data}",
            *FINETUNE,
        )
    return {
        "root": root,
        **{name: str(runs / name) for name in ("lm", "cls", "sft", "tag")},
        "cls_data": str(cls),
        "sft_data": str(sft),
        "tag_data": str(tags),
    }


def _cli(capsys, *argv: str) -> tuple[dict, str]:
    """In-process `lmforge ...`: its JSON stdout (nothing else may be there) and its stderr."""
    code = main(list(argv))
    out, err = capsys.readouterr()
    assert code == 0, err
    return json.loads(out), err


def _rows(path) -> list[dict]:
    with open(path, encoding="utf-8") as f:
        return [json.loads(line) for line in f]


# --------------------------------------------------------------------------------------------
# --text: batched, per file, the same numbers
# --------------------------------------------------------------------------------------------


def test_batched_scoring_equals_one_window_at_a_time(models, tmp_path):
    """Batch 1 and batch 7 give the loss of the windows scored one by one, cut as evaluate has
    always cut them (windows of seq_len + 1 tokens, each starting on the last token of the one
    before, the last one shorter), in fp32 to 1e-5."""
    from lmforge.finetune.inference import load_model, perplexity

    text = tmp_path / "play.txt"
    text.write_text(_play(6000))
    one = perplexity(models["lm"], files=[str(text)], batch_size=1)
    seven = perplexity(models["lm"], files=[str(text)], batch_size=7)
    src, model, tok = load_model(models["lm"])
    ids = tok.encode(text.read_text())
    T = src.model.max_seq_len
    windows = (len(ids) - 1 + T - 1) // T
    assert windows % 7 and (len(ids) - 1) % T  # a part-filled last batch and a shorter window
    total = 0.0
    with torch.no_grad():
        for start in range(0, len(ids) - 1, T):
            chunk = torch.tensor([ids[start : start + T + 1]])
            logits = model(chunk[:, :-1])
            total += torch.nn.functional.cross_entropy(
                logits[0], chunk[0, 1:], reduction="sum"
            ).item()
    assert one["dtype"] == seven["dtype"] == "fp32"  # the run trained in fp32
    assert (one["batch_size"], seven["batch_size"], one["seq_len"]) == (1, 7, T)
    assert one["tokens"] == seven["tokens"] == len(ids) - 1
    assert one["loss"] == pytest.approx(total / (len(ids) - 1), rel=1e-5)
    assert seven["loss"] == pytest.approx(one["loss"], rel=1e-5)
    assert seven["perplexity"] == pytest.approx(math.exp(one["loss"]), rel=1e-5)


def test_one_row_per_file_weighted_to_the_total(models, tmp_path, capsys):
    """A row per file, each the file's own perplexity; the total is their token-weighted mean;
    a file with nothing to predict has its row with no loss. Short input off a terminal: no
    progress on stderr."""
    files = {"long.txt": _play(3000), "short.txt": "Now is the winter.", "empty.txt": ""}
    for name, text in files.items():
        (tmp_path / name).write_text(text)
    paths = [str(tmp_path / n) for n in files]
    result, err = _cli(capsys, "evaluate", models["lm"], "--text", *paths, "--batch-size", "3")
    assert err == ""
    assert [r["path"] for r in result["files"]] == paths
    long, short, empty = result["files"]
    assert empty == {"path": paths[2], "tokens": 0, "loss": None, "perplexity": None}
    assert long["tokens"] + short["tokens"] == result["tokens"]
    weighted = (long["loss"] * long["tokens"] + short["loss"] * short["tokens"]) / result["tokens"]
    assert result["loss"] == pytest.approx(weighted, rel=1e-9)
    assert result["perplexity"] == pytest.approx(math.exp(result["loss"]), rel=1e-9)
    for row, path in zip(result["files"][:2], paths, strict=False):
        alone, _ = _cli(capsys, "evaluate", models["lm"], "--text", path)
        assert (alone["tokens"], alone["files"][0]["tokens"]) == (row["tokens"], row["tokens"])
        assert alone["loss"] == pytest.approx(row["loss"], rel=1e-5)


def test_long_input_off_a_terminal_shows_its_progress(models, tmp_path, capsys, monkeypatch):
    """Past PROGRESS_TOKENS, a line on stderr at each tenth of the tokens; stdout stays the
    JSON."""
    from lmforge.finetune import inference

    (tmp_path / "play.txt").write_text(_play(20000))
    monkeypatch.setattr(inference, "PROGRESS_TOKENS", 100)
    result, err = _cli(
        capsys, "evaluate", models["lm"], "--text", str(tmp_path / "play.txt"), "--batch-size", "2"
    )
    lines = err.splitlines()
    assert 5 <= len(lines) <= 10, err
    assert all(line.startswith("scored ") and "tokens/s" in line for line in lines)
    assert lines[-1].startswith(
        f"scored {result['tokens']:,} of {result['tokens']:,} tokens (100%)"
    )


@pytest.mark.parametrize(
    "trained, device, fast, expected",
    [
        ("fp32", "cpu", True, "fp32"),
        ("auto", "cpu", True, "bf16"),
        ("auto", "cpu", False, "fp32"),
        ("bf16", "cpu", True, "bf16"),
        ("bf16", "cpu", False, "fp32"),
        ("fp8", "cpu", True, "bf16"),
        ("fp16", "cpu", True, "fp32"),
        (None, "cpu", True, "fp32"),  # an export: nothing says, fp32
    ],
)
def test_scored_in_the_precision_the_run_trained_in(monkeypatch, trained, device, fast, expected):
    from lmforge.finetune import inference
    from lmforge.pretrain.parallel import common

    monkeypatch.setattr(inference, "cpu_supports_bf16", lambda: fast)
    monkeypatch.setattr(common, "cpu_supports_bf16", lambda: fast)

    class Source:
        precision = trained

    assert inference.inference_precision(Source(), device) == expected


# --------------------------------------------------------------------------------------------
# --data --predictions
# --------------------------------------------------------------------------------------------


def test_classification_predictions_are_the_reported_metrics_example_by_example(
    models, tmp_path, capsys
):
    from lmforge.pretrain.core.durable import umask

    out = tmp_path / "p.jsonl"
    data = models["cls_data"]
    result, err = _cli(capsys, "evaluate", models["cls"], "--data", data, "--predictions", str(out))
    assert "1 of 14 rows" in err  # the empty text's warning: on stderr, stdout is the JSON
    rows = _rows(out)
    with open(data, encoding="utf-8", newline="") as f:
        given = list(csv.DictReader(f))
    assert len(rows) == result["examples"] == result["n"] == 13
    assert sum(r["correct"] for r in rows) / len(rows) == result["accuracy"]
    assert sum(r["loss"] for r in rows) / len(rows) == pytest.approx(result["loss"], rel=1e-6)
    assert [r["row"] for r in rows] == [i for i in range(14) if i != 5]  # row 5 had no text
    for r in rows:
        assert r["id"] == given[r["row"]]["id"] and r["label"] == given[r["row"]]["label"]
        probs = r["probabilities"]
        assert set(probs) == {"neg", "pos"} and sum(probs.values()) == pytest.approx(1.0)
        assert r["prediction"] == max(probs, key=probs.get)
        assert r["score"] == probs[r["prediction"]]
        assert r["correct"] == (r["prediction"] == r["label"])
        assert r["loss"] == pytest.approx(-math.log(probs[r["label"]]), rel=1e-5)
    assert stat.S_IMODE(os.stat(out).st_mode) == 0o666 & ~umask()
    assert [p for p in os.listdir(tmp_path) if p != "p.jsonl"] == []  # no temp file left
    # written again: replaced, not appended to
    _cli(capsys, "evaluate", models["cls"], "--data", data, "--predictions", str(out))
    assert _rows(out) == rows


def test_sft_and_tagging_predictions(models, tmp_path, capsys):
    """sft: each example's loss over its response tokens, weighted to the reported loss;
    token classification: the gold tags, predictions and their probabilities of the words the
    model read, right ones counted to the reported token accuracy."""
    sft, _ = _cli(
        capsys,
        "evaluate",
        models["sft"],
        "--data",
        models["sft_data"],
        "--predictions",
        str(tmp_path / "sft.jsonl"),
        "--batch-size",
        "5",
    )
    rows = _rows(tmp_path / "sft.jsonl")
    assert [r["row"] for r in rows] == list(range(len(WORDS))) and sft["examples"] == len(rows)
    assert all(set(r) == {"row", "loss", "tokens"} and r["tokens"] > 0 for r in rows)
    weighted = sum(r["loss"] * r["tokens"] for r in rows) / sum(r["tokens"] for r in rows)
    assert weighted == pytest.approx(sft["loss"], rel=1e-5)

    tag, _ = _cli(
        capsys,
        "evaluate",
        models["tag"],
        "--data",
        models["tag_data"],
        "--predictions",
        str(tmp_path / "tag.jsonl"),
    )
    rows = _rows(tmp_path / "tag.jsonl")
    assert [r["row"] for r in rows] == list(range(10)) and tag["examples"] == 10
    for r in rows:
        assert r["labels"] == ["O"] * 3 + ["B-PER", "O", "B-LOC"]  # every word fits in 32
        assert len(r["predictions"]) == len(r["scores"]) == r["words"] == 6
        assert r["correct"] == sum(
            p == g for p, g in zip(r["predictions"], r["labels"], strict=True)
        )
        assert all(0 < s <= 1 for s in r["scores"])
    words = sum(r["words"] for r in rows)
    assert sum(r["correct"] for r in rows) / words == pytest.approx(tag["accuracy"])
    # the entity precision stays a metric: the precision computed in is `dtype`
    assert isinstance(tag["precision"], float) and tag["dtype"] == sft["dtype"] == "fp32"


# --------------------------------------------------------------------------------------------
# bench --evaluate
# --------------------------------------------------------------------------------------------


def test_bench_puts_scoring_next_to_training(models, tmp_path, capsys):
    (tmp_path / "play.txt").write_text(_play(4000))
    out = tmp_path / "bench.md"
    code = main(
        [
            "bench",
            "--evaluate",
            models["lm"],
            "--text",
            str(tmp_path / "play.txt"),
            "--windows",
            "1",
            "--steps",
            "1",
            "--batch-size",
            "4",
            "--out",
            str(out),
        ]
    )
    assert code == 0
    rows = [r for r in out.read_text().splitlines() if r.startswith("| ") and "---" not in r]
    assert rows[0].startswith("| candidate | tok/s")
    names = [r.split(" | ")[0][2:] for r in rows[1:]]
    assert names == [  # an fp32 run: no bf16 row
        "training step (fp32, micro-batch 8)",
        "evaluate, 1 window a pass, fp32 (as before)",
        "evaluate, 4 windows a pass, fp32",
    ]
    assert float(rows[1].split(" | ")[2]) == 1.0
    one, four = (float(r.split(" | ")[3].rstrip(" |")) for r in rows[2:])
    assert one == pytest.approx(four, abs=2e-6)  # the same loss, batched or not


@pytest.mark.parametrize(
    "extra, expect",
    [
        ([], "--evaluate needs --text FILE"),
        (["--text", "t.txt", "--batch-size", "0"], "--batch-size 0: give at least 1"),
        (["--text", "t.txt", "--micro-batch", "0"], "--micro-batch 0: give at least 1"),
    ],
)
def test_bench_evaluate_refuses_bad_options_in_one_line(models, capsys, extra, expect):
    code = main(["bench", "--evaluate", models["lm"], *extra])
    err = capsys.readouterr().err.strip().splitlines()
    assert code != 0 and len(err) == 1 and expect in err[0], err
