"""Label curves (`lmforge finetune --label-curve`, finetune/label_curve.py; what `make demo`
reports): the subsets (stratified, seeded, nested), the paired standard error against a hand
computation, the verdict rule, the labels-to-match interpolation, and the command on a tiny
model, whose every figure is checked against the files its runs wrote."""

from __future__ import annotations

import csv
import json
import math
import os
import random
from collections import Counter

import numpy as np
import pytest

from lmforge.finetune.label_curve import (
    Z_CLEAR,
    labels_to_match,
    paired_difference,
    report_lines,
    verdict,
)
from lmforge.finetune.subsets import example_order, subset
from lmforge.pretrain.core.errors import ConfigurationError
from tests.conftest import lmforge
from tests.runs import QUIET, read_metrics

# --------------------------------------------------------------------------------------------
# subsets
# --------------------------------------------------------------------------------------------

# 57% / 33% / 10%: an uneven split with a rare class
CLASSES = ["fresh"] * 570 + ["rotten"] * 330 + ["meh"] * 100
random.Random(3).shuffle(CLASSES)


@pytest.mark.parametrize("seed", [0, 1, 7])
def test_subsets_are_stratified_seeded_and_nested(seed):
    shares = {c: k / len(CLASSES) for c, k in Counter(CLASSES).items()}
    previous: set[int] = set()
    for size in (20, 30, 100, 300, 1000):
        got = subset(CLASSES, len(CLASSES), size=size, seed=seed, what="n")
        assert len(got) == len(set(got)) == size and list(got) == sorted(got)
        counts = Counter(CLASSES[i] for i in got)
        for c, share in shares.items():  # every class within one example of its share
            assert abs(counts[c] - share * size) <= 1, (size, c, counts[c], share * size)
        assert previous <= set(got)  # nested: the smaller subset lies inside the larger
        previous = set(got)
    # every prefix of the order, not only these sizes, keeps the shares
    order = example_order(CLASSES, len(CLASSES), seed)
    for size in range(1, len(CLASSES) + 1, 7):
        counts = Counter(CLASSES[i] for i in order[:size])
        assert all(abs(counts[c] - s * size) <= 1 for c, s in shares.items())
    again = subset(CLASSES, len(CLASSES), size=100, seed=seed, what="n")
    other = subset(CLASSES, len(CLASSES), size=100, seed=seed + 100, what="n")
    assert np.array_equal(subset(CLASSES, len(CLASSES), size=100, seed=seed, what="n"), again)
    assert not np.array_equal(again, other)  # another seed, other examples
    # without classes (sft, tagging): a seeded shuffle's prefixes, nested too
    plain = [set(subset(None, 50, size=k, seed=seed, what="n")) for k in (5, 20, 50)]
    assert plain[0] < plain[1] < plain[2] == set(range(50))


def test_subset_refusals_name_the_value_and_the_fix():
    with pytest.raises(ConfigurationError, match=r"n=2000 is more than the 1,000 training"):
        subset(CLASSES, len(CLASSES), size=2000, seed=0, what="n")
    # 10 examples stratified give "meh" (10%) one example: the smallest that gives it 2
    with pytest.raises(ConfigurationError) as err:
        subset(CLASSES, len(CLASSES), size=10, seed=0, what="n")
    need = int(str(err.value).rsplit("at least ", 1)[1].split()[0])
    assert "label 'meh' 1 example(s)" in str(err.value)
    got = subset(CLASSES, len(CLASSES), size=need, seed=0, what="n")
    assert Counter(CLASSES[i] for i in got)["meh"] == 2
    with pytest.raises(ConfigurationError, match="at least 2 of every label"):
        subset(["a"] * 9 + ["b"], 10, size=5, seed=0, what="n")


# --------------------------------------------------------------------------------------------
# statistics
# --------------------------------------------------------------------------------------------


def test_paired_standard_error_against_a_hand_computation():
    # per-example differences 1, 0, 0, 1, -1: mean 0.2; squared deviations 0.64, 0.04, 0.04,
    # 0.64, 1.44 sum to 2.8; sample variance 2.8 / 4 = 0.7; SE sqrt(0.7 / 5)
    diff, se = paired_difference([1, 1, 0, 1, 0], [0, 1, 0, 0, 1])
    assert diff == pytest.approx(0.2) and se == pytest.approx(math.sqrt(0.14))
    # the same two accuracies (0.6 vs 0.5) paired two ways: the SE follows the per-example
    # differences, not the accuracies
    a = [1] * 60 + [0] * 40
    agree = paired_difference(a, [1] * 50 + [0] * 50)  # b's right ones are a's too
    apart = paired_difference(a, [0] * 50 + [1] * 50)  # right on other examples
    assert agree[0] == pytest.approx(0.1) and apart[0] == pytest.approx(0.1)
    assert agree[1] == pytest.approx(math.sqrt((10 * 0.9**2 + 90 * 0.1**2) / 99 / 100))
    assert apart[1] > 3 * agree[1]
    assert paired_difference([1, 0, 1, 0], [1, 0, 1, 0]) == (0.0, 0.0)
    with pytest.raises(ValueError, match="same examples: 3 vs 2"):
        paired_difference([1, 0, 1], [1, 0])
    with pytest.raises(ValueError, match="at least 2 examples, got 1"):
        paired_difference([1], [0])


@pytest.mark.parametrize(
    ("diff", "se", "differ", "word"),
    [
        (0.03, 0.01, True, "helps"),  # 3 SE
        (0.02, 0.01, True, "helps"),  # exactly Z_CLEAR: not noise
        (0.0199, 0.01, True, "within noise"),
        (-0.0199, 0.01, True, "within noise"),
        (-0.02, 0.01, True, "hurts"),
        (0.01, 0.0, True, "helps"),  # disagreeing only one way: no spread at all
        (0.0, 0.0, False, "no difference"),  # right on exactly the same examples
    ],
)
def test_verdict_rule(diff, se, differ, word):
    got, z = verdict(diff, se, differ=differ)
    assert got == word
    if se > 0:
        assert z == pytest.approx(diff / se)
    assert Z_CLEAR == 2.0


def test_labels_to_match_interpolates_on_log_labels():
    sizes = [100, 300, 1000, 3000]
    # B reaches A's 0.70 at 100 between 300 (0.65) and 1,000 (0.75): halfway on log labels
    got = labels_to_match(sizes, [0.70, 0.72, 0.76, 0.80], [0.60, 0.65, 0.75, 0.79])
    assert got["at"] == 1000 and got["labels"] == pytest.approx(math.sqrt(300 * 1000))
    never = labels_to_match(sizes, [0.90, 0.9, 0.9, 0.9], [0.6, 0.7, 0.8, 0.85])
    assert never == {"target": 0.90, "at": None}
    assert labels_to_match(sizes, [0.6, 0.7, 0.8, 0.9], [0.6, 0.7, 0.8, 0.9]) is None


# --------------------------------------------------------------------------------------------
# the command, on a tiny model
# --------------------------------------------------------------------------------------------


def _csv(path: str, rows: list[dict]) -> str:
    with open(path, "w", encoding="utf-8", newline="") as f:
        w = csv.DictWriter(f, fieldnames=["text", "label"])
        w.writeheader()
        w.writerows({"text": r["text"], "label": r["label"]} for r in rows)
    return path


@pytest.fixture(scope="module")
def task(tmp_path_factory) -> dict:
    """240 training, 64 validation and 96 test reviews of the bundled task."""
    from lmforge.finetune.bundled import rotten_tomatoes

    out = str(tmp_path_factory.mktemp("curve-task"))
    rotten_tomatoes(out)
    split = {}
    for name, n in (("train", 240), ("val", 64), ("test", 96)):
        with open(os.path.join(out, f"{name}.csv"), encoding="utf-8", newline="") as f:
            rows = list(csv.DictReader(f))
        random.Random(0).shuffle(rows)
        split[name] = _csv(os.path.join(out, f"{name}-small.csv"), rows[:n])
    return split


def test_task_data_takes_the_nested_stratified_subset(reference_runs, task):
    """task.train_examples through TaskData: the rows kept are the subset's, nested by size."""
    from lmforge.finetune.config import TaskConfig
    from lmforge.finetune.data import TaskData
    from lmforge.pretrain.checkpoint.model_source import load_source
    from lmforge.pretrain.data.tokenizer import load_tokenizer

    tok = load_tokenizer(load_source(reference_runs(1, "fp32")).tokenizer)
    with open(task["train"], encoding="utf-8", newline="") as f:
        texts = {r["text"]: r["label"] for r in csv.DictReader(f)}
    kept = {}
    for n in (20, 60, None):
        t = TaskConfig(train=task["train"], val=task["val"], max_len=48, train_examples=n)
        data = TaskData(t, tok, seed=0, labels=None, pad_to_max=False)
        assert len(data.train) == (n or 240)
        ids = {tuple(x.tolist()) for x in data.train.input_ids}
        kept[n] = ids
        shares = Counter(data.labels[i] for i in data.train_label_ids)
        whole = Counter(texts.values())
        for label, k in shares.items():
            assert abs(k - whole[label] * len(data.train) / 240) <= 1
    assert kept[20] < kept[60] < kept[None]


def test_label_curve_command(reference_runs, task, tmp_path):
    """Two sizes x two arms x two learning rates on the tiny base: every figure of the report
    is the one its runs' files give (the pick by validation accuracy, the test accuracy, the
    paired difference and its verdict); the table, the figure; a second call trains nothing."""
    base = reference_runs(1, "fp32")
    runs = str(tmp_path / "runs")
    args = [
        "finetune",
        f"runs_dir={runs}",
        "name=rt",
        f"init_from={base}",
        f"task.train={task['train']}",
        f"task.val={task['val']}",
        "task.max_len=48",
        "train.micro_batch_size=16",
        "train.global_batch_size=16",
        "train.precision=fp32",
        "train.eval_interval=0",
        "checkpoint.interval=0",
        *QUIET,
        "label_curve.steps=[2,4]",
        "label_curve.lrs=[1e-3,3e-3]",
        f"label_curve.test={task['test']}",
        "--label-curve",
        "24,all",
    ]
    out = lmforge(*args, "--parallel", "2").stdout  # two runs at a time, in processes
    root = os.path.join(runs, "rt-curve")
    with open(os.path.join(root, "label_curve.json")) as f:
        report = json.load(f)
    assert [r["size"] for r in report["points"]] == [24, 240]
    assert report["protocol"]["steps"] == [2, 4] and report["protocol"]["lrs"] == [1e-3, 3e-3]
    for r in report["points"]:
        scores = {}
        for arm in ("base", "against"):
            a = r["arms"][arm]
            finals = {}
            for lr in ("0.001", "0.003"):
                run = os.path.join(root, f"n{r['label']}-{arm}-lr{lr}")
                rows = read_metrics(run)
                assert max(x["step"] for x in rows) == r["steps"]
                finals[lr] = [x for x in rows if x["kind"] == "eval"][-1]
                with open(os.path.join(root, "configs", f"n{r['label']}-{arm}-lr{lr}.yaml")) as f:
                    text = f.read()
                assert ("from_scratch: true" in text) == (arm == "against")
            best = max(finals, key=lambda lr: (finals[lr]["accuracy"], finals[lr]["macro_f1"]))
            assert f"{a['lr']:g}" == best and a["val_accuracy"][best] == finals[best]["accuracy"]
            with open(os.path.join(root, a["run"], "test_predictions.jsonl")) as f:
                pred = [json.loads(line) for line in f]
            assert len(pred) == 96 == r["test_examples"]
            scores[arm] = [int(p["correct"]) for p in pred]
            assert a["test_accuracy"] == pytest.approx(sum(scores[arm]) / 96)
        diff, se = paired_difference(scores["base"], scores["against"])
        assert (r["difference"], r["se"]) == pytest.approx((diff, se))
        assert r["verdict"] == verdict(diff, se, differ=scores["base"] != scores["against"])[0]
    with open(os.path.join(root, "label_efficiency.png"), "rb") as f:
        assert f.read(8) == b"\x89PNG\r\n\x1a\n"
    for line in report_lines(report):
        assert line in out
    assert out.count("[8/8] ") == 1 and "FAILED" not in out
    for i in range(1, 9):  # each run's own log
        assert f"[{i}/8] n" in out
    assert len(os.listdir(os.path.join(root, "logs"))) == 8
    again = lmforge(*args).stdout  # in this process: trains nothing
    assert "8 runs (2 sizes x 2 arms x 2 learning rates), 8 finished" in again
    assert "=== label curve" not in again
    with open(os.path.join(root, "label_curve.json")) as f:
        assert json.load(f) == report


def test_runs_of_other_precisions_follow_each_other_in_one_process(reference_runs, task, tmp_path):
    """A label curve trains its points in one process: a run after another of another
    precision starts cleanly, also after a run that left Accelerate's per-process state behind
    (it is reset as a run starts and as it closes)."""
    from accelerate import Accelerator

    from lmforge.finetune.config import FinetuneConfig
    from lmforge.finetune.label_curve import run_in_process
    from lmforge.pretrain.config.schema import load_config, to_yaml

    Accelerator(cpu=True, mixed_precision="no")  # as a run that failed before closing leaves it
    losses = {}
    for precision in ("bf16", "fp32", "bf16"):
        name = f"{precision}-{len(losses)}"
        cfg = load_config(FinetuneConfig, [
            f"runs_dir={tmp_path}", f"name={name}", f"init_from={reference_runs(1, 'fp32')}",
            f"task.train={task['train']}", f"task.val={task['val']}", "task.max_len=48",
            "train.max_steps=2", "train.micro_batch_size=8", "train.global_batch_size=8",
            "train.log_interval=1",
            f"train.precision={precision}", *QUIET,
        ])  # fmt: skip
        path = tmp_path / f"{name}.yaml"
        path.write_text(to_yaml(cfg))
        assert run_in_process(str(path)) == 0
        losses[name] = [
            r["loss"] for r in read_metrics(str(tmp_path / name)) if r["kind"] == "train"
        ]
    # the same run twice in one process: the same losses, bitwise
    assert losses["bf16-0"] == losses["bf16-2"] and losses["bf16-0"] != losses["fp32-1"]


def test_report_lines_say_each_verdict():
    """The table's verdict column, including a difference whose disagreements all go one way
    (no spread: z is not a number, stored as null)."""

    def point(size, diff, se, z, word):
        arm = {"test_accuracy": 0.6, "lr": 1e-3}
        return {"size": size, "steps": 10, "arms": {"base": arm, "against": arm},
                "difference": diff, "se": se, "z": z, "verdict": word, "test_examples": 100}  # fmt: skip

    report = {
        "arms": {"base": "from a", "against": "from scratch"},
        "protocol": {"test": "t.csv", "picked_on": "v.csv", "lrs": [1e-3]},
        "majority": {"accuracy": 0.5, "label": "x"},
        "labels_to_match": None,
        "points": [
            point(10, 0.05, 0.01, 5.0, "helps"),
            point(20, 0.01, 0.0, None, "helps"),
            point(30, -0.01, 0.01, -1.0, "within noise"),
            point(40, 0.0, 0.0, 0.0, "no difference"),
        ],
    }
    rows = report_lines(report)[4:8]
    assert rows[0].endswith("A helps (5.0 SE)")
    assert rows[1].endswith("A helps (every disagreement one way)")
    assert rows[2].endswith("within noise (1.0 SE < 2)")
    assert rows[3].endswith("no difference")
    assert (
        report_lines(report)[-1] == "  at 10 labels A is not ahead of B: no labels saved to report"
    )
