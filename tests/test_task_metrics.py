"""Finetuning metrics checked against scikit-learn and seqeval on seeded random data."""

from __future__ import annotations

import random

import pytest
import torch
from seqeval.metrics import accuracy_score as seq_accuracy
from seqeval.metrics import classification_report
from seqeval.metrics import f1_score as seq_f1
from seqeval.metrics import precision_score as seq_precision
from seqeval.metrics import recall_score as seq_recall
from seqeval.metrics.sequence_labeling import get_entities
from sklearn.metrics import accuracy_score, confusion_matrix, f1_score
from sklearn.metrics import precision_recall_fscore_support as sk_prfs

from lmforge.finetune.metrics import (
    ConfusionMatrix,
    EntityCounts,
    entities,
    entity_types_from_labels,
    majority_baseline,
    validate_bio_labels,
)
from lmforge.pretrain.core.errors import DataError

approx = lambda x: pytest.approx(x, rel=1e-12, abs=1e-12)  # noqa: E731

# --------------------------------------------------------------------------------------------
# Sequence classification
# --------------------------------------------------------------------------------------------


def random_classification(rng: random.Random, num_labels: int, n: int):
    """Targets and predictions with a skewed label distribution; the last label never occurs in
    the targets and label 0 is never predicted, so both zero-division paths are exercised."""
    weights = [rng.random() + 0.05 for _ in range(num_labels)]
    targets = rng.choices(range(num_labels - 1), weights=weights[:-1], k=n)
    preds = [
        t if rng.random() < 0.5 and t != 0 else rng.choice(range(1, num_labels)) for t in targets
    ]
    return preds, targets


def confusion_metrics(preds, targets, names, splits=1):
    """Metrics of ``ConfusionMatrix`` with the data spread over ``splits`` simulated ranks."""
    total = torch.zeros(len(names), len(names), dtype=torch.int64)
    for r in range(splits):
        cm = ConfusionMatrix(len(names))
        cm.update(torch.tensor(preds[r::splits]), torch.tensor(targets[r::splits]))
        total += cm.counts  # what all_reduce does
    return ConfusionMatrix.compute(total, names)


@pytest.mark.parametrize("num_labels", [2, 3, 6])
def test_confusion_matrix_matches_sklearn(num_labels):
    rng = random.Random(num_labels)
    names = [f"label{i}" for i in range(num_labels)]
    labels = list(range(num_labels))
    for _ in range(20):
        preds, targets = random_classification(rng, num_labels, rng.randint(1, 200))
        cm = ConfusionMatrix(num_labels)
        # Several batches, as an evaluation loop feeds them.
        for s in range(0, len(preds), 17):
            cm.update(torch.tensor(preds[s : s + 17]), torch.tensor(targets[s : s + 17]))
        assert cm.counts.tolist() == confusion_matrix(targets, preds, labels=labels).tolist()
        m = ConfusionMatrix.compute(cm.counts, names)

        assert m["n"] == len(targets)
        assert m["accuracy"] == approx(accuracy_score(targets, preds))
        assert m["macro_f1"] == approx(
            f1_score(targets, preds, labels=labels, average="macro", zero_division=0)
        )
        p, r, f, _ = sk_prfs(targets, preds, labels=labels, average=None, zero_division=0)
        for i, name in enumerate(names):
            assert m[f"precision_{name}"] == approx(p[i])
            assert m[f"recall_{name}"] == approx(r[i])
            assert m[f"f1_{name}"] == approx(f[i])


def test_confusion_matrix_macro_f1_counts_labels_absent_everywhere():
    # Label 2 occurs neither in targets nor predictions: it still counts (F1 0) in the mean.
    m = ConfusionMatrix.compute(torch.tensor([[3, 1, 0], [0, 4, 0], [0, 0, 0]]), ["a", "b", "c"])
    f_a, f_b = 2 * 3 / (4 + 3), 2 * 4 / (4 + 5)
    assert m["macro_f1"] == approx((f_a + f_b + 0.0) / 3)
    assert m["accuracy"] == approx(7 / 8)
    assert m["precision_c"] == m["recall_c"] == m["f1_c"] == 0.0
    assert m["recall_a"] == approx(0.75) and m["precision_a"] == approx(1.0)


def test_confusion_matrix_rank_split_is_exact():
    rng = random.Random(7)
    names = ["neg", "neu", "pos", "mixed"]
    preds, targets = random_classification(rng, len(names), 301)
    whole = confusion_metrics(preds, targets, names)
    assert confusion_metrics(preds, targets, names, splits=2) == whole
    assert confusion_metrics(preds, targets, names, splits=3) == whole
    assert whole["accuracy"] == approx(accuracy_score(targets, preds))


def test_confusion_matrix_keys_are_sanitized():
    m = ConfusionMatrix.compute(
        torch.eye(3, dtype=torch.int64), ["very positive", "neg/ative", "ok"]
    )
    assert {"f1_very_positive", "precision_neg_ative", "recall_ok"} <= set(m)
    assert all(k.replace("_", "").isalnum() for k in m)
    with pytest.raises(DataError, match="both become"):
        ConfusionMatrix.compute(torch.eye(2, dtype=torch.int64), ["a-b", "a b"])


def test_confusion_matrix_rejects_bad_input():
    cm = ConfusionMatrix(3)
    with pytest.raises(ValueError, match=r"class indices .* \[-1, 1\]"):
        cm.update(torch.tensor([0, 1]), torch.tensor([0, -1]))
    with pytest.raises(ValueError, match="class indices"):
        cm.update(torch.tensor([0, 3]), torch.tensor([0, 1]))
    with pytest.raises(ValueError, match="same length"):
        cm.update(torch.tensor([0, 1]), torch.tensor([0]))
    cm.update(torch.tensor([], dtype=torch.long), torch.tensor([], dtype=torch.long))
    assert int(cm.counts.sum()) == 0
    m = ConfusionMatrix.compute(cm.counts, ["a", "b", "c"])
    assert m["accuracy"] == 0.0 and m["macro_f1"] == 0.0 and m["n"] == 0


def test_majority_baseline():
    assert majority_baseline([1, 1, 0, 2], [1, 0, 1, 1, 2]) == approx(3 / 5)
    assert majority_baseline(torch.tensor([0, 0, 1]), torch.tensor([1, 1, 1, 0])) == approx(1 / 4)
    # A tie goes to the smallest label, whatever the order of the training data.
    assert majority_baseline([2, 1, 2, 1], [1, 1, 2]) == approx(2 / 3)
    assert majority_baseline(["pos", "neg"], ["neg", "pos", "pos"]) == approx(1 / 3)
    assert majority_baseline([0], []) == 0.0
    with pytest.raises(DataError):
        majority_baseline([], [0])


# --------------------------------------------------------------------------------------------
# Token classification
# --------------------------------------------------------------------------------------------

TYPES = ["PER", "LOC", "ORG", "DATE-TIME"]
BIO = ["O"] + [f"{p}-{t}" for t in TYPES for p in "BI"]
IOBES = ["O"] + [f"{p}-{t}" for t in TYPES for p in "BIES"]


def random_tags(rng: random.Random, vocab: list[str], n: int) -> list[str]:
    """Random, often ill-formed tags (I- after O, B-X I-Y, ...), biased towards O."""
    return [rng.choice(vocab) if rng.random() < 0.6 else "O" for _ in range(n)]


def corrupt(rng: random.Random, gold: list[str], vocab: list[str], rate: float) -> list[str]:
    """A prediction: the gold tags with a fraction replaced at random."""
    return [rng.choice(vocab) if rng.random() < rate else t for t in gold]


def random_corpus(seed: int, n_sent: int = 120):
    rng = random.Random(seed)
    gold, pred = [], []
    for k in range(n_sent):
        sent = random_tags(rng, BIO, rng.randint(0, 14))  # includes empty sentences
        gold.append(sent)
        if k % 10 == 0:
            pred.append(["O"] * len(sent))  # no predicted entities at all
        else:
            pred.append(corrupt(rng, sent, BIO, rng.choice([0.0, 0.2, 0.6, 1.0])))
    return gold, pred


def entity_metrics(gold, pred, types, splits=1):
    total = torch.zeros(len(types) + 1, 3, dtype=torch.int64)
    for r in range(splits):
        ec = EntityCounts(types)
        ec.update(gold[r::splits], pred[r::splits])
        total += ec.counts
    return EntityCounts.compute(total, types)


def check_against_seqeval(gold, pred, types):
    m = entity_metrics(gold, pred, types)
    assert m["precision"] == approx(seq_precision(gold, pred, zero_division=0))
    assert m["recall"] == approx(seq_recall(gold, pred, zero_division=0))
    assert m["f1"] == approx(seq_f1(gold, pred, zero_division=0))
    assert m["accuracy"] == approx(seq_accuracy(gold, pred))
    assert m["n_tokens"] == sum(map(len, gold))

    report = classification_report(gold, pred, output_dict=True, zero_division=0)
    micro, macro = report.pop("micro avg"), report.pop("macro avg")
    report.pop("weighted avg")
    assert m["precision"] == approx(micro["precision"])
    assert m["recall"] == approx(micro["recall"])
    assert m["f1"] == approx(micro["f1-score"])
    assert m["macro_f1"] == approx(macro["f1-score"])
    assert m["n_entities"] == micro["support"]
    for t in types:
        key = t.replace("-", "_")
        row = report.get(t, {"precision": 0.0, "recall": 0.0, "f1-score": 0.0})
        assert m[f"precision_{key}"] == approx(row["precision"])
        assert m[f"recall_{key}"] == approx(row["recall"])
        assert m[f"f1_{key}"] == approx(row["f1-score"])
    return m


@pytest.mark.parametrize("seed", range(6))
def test_entity_metrics_match_seqeval(seed):
    gold, pred = random_corpus(seed)
    m = check_against_seqeval(gold, pred, sorted(TYPES))
    assert 0.0 < m["f1"] < 1.0  # the data exercise both hits and misses


def test_entity_metrics_edge_cases_match_seqeval():
    # A type present only in the predictions, one only in the gold, and one in neither.
    gold = [["B-PER", "I-PER", "O", "B-LOC"], ["O", "I-LOC", "I-LOC"]]
    pred = [["B-PER", "I-PER", "O", "B-ORG"], ["O", "B-LOC", "I-LOC"]]
    m = check_against_seqeval(gold, pred, sorted(TYPES))
    assert m["precision"] == approx(2 / 3) and m["recall"] == approx(2 / 3)
    assert m["precision_LOC"] == 1.0 and m["recall_LOC"] == 0.5 and m["f1_ORG"] == 0.0
    # seqeval's macro average leaves out DATE-TIME, which occurs nowhere.
    assert m["macro_f1"] == approx((1.0 + 2 / 3 + 0.0) / 3)
    assert m["f1_DATE_TIME"] == 0.0

    # Perfect predictions, and predictions without any entity.
    gold, _ = random_corpus(11, n_sent=30)
    assert check_against_seqeval(gold, gold, sorted(TYPES))["f1"] == 1.0
    empty = [["O"] * len(s) for s in gold]
    m = check_against_seqeval(gold, empty, sorted(TYPES))
    assert m["f1"] == m["precision"] == m["recall"] == 0.0


def test_entity_metrics_without_any_chunk():
    gold = pred = [["O", "O"], []]
    m = entity_metrics(gold, pred, ["PER"])
    assert m["f1"] == m["precision"] == m["recall"] == m["macro_f1"] == 0.0
    assert m["f1"] == seq_f1(gold, pred, zero_division=0)
    assert m["accuracy"] == 1.0 and m["n_tokens"] == 2 and m["n_entities"] == 0
    assert entity_metrics([], [], ["PER"])["accuracy"] == 0.0


@pytest.mark.parametrize("splits", [2, 3])
def test_entity_counts_rank_split_is_exact(splits):
    gold, pred = random_corpus(42)
    types = sorted(TYPES)
    whole = entity_metrics(gold, pred, types)
    assert entity_metrics(gold, pred, types, splits=splits) == whole
    assert whole["f1"] == approx(seq_f1(gold, pred, zero_division=0))


def test_entities_match_seqeval_get_entities():
    rng = random.Random(0)
    for vocab in (BIO, IOBES, ["O", "I-PER", "I-LOC"]):
        for _ in range(400):
            tags = random_tags(rng, vocab, rng.randint(0, 20))
            assert entities(tags) == set(get_entities(tags)), tags


def test_entities_chunking_rules():
    assert entities(["I-PER"]) == {("PER", 0, 0)}
    assert entities(["B-PER", "I-LOC"]) == {("PER", 0, 0), ("LOC", 1, 1)}
    assert entities(["B-PER", "I-PER", "B-PER", "O", "I-PER", "I-PER"]) == {
        ("PER", 0, 1),
        ("PER", 2, 2),
        ("PER", 4, 5),
    }
    assert entities(["O", "I-LOC", "B-LOC", "I-ORG", "I-ORG"]) == {
        ("LOC", 1, 1),
        ("LOC", 2, 2),
        ("ORG", 3, 4),
    }
    assert entities(["B-DATE-TIME", "I-DATE-TIME"]) == {("DATE-TIME", 0, 1)}
    assert entities(["B-PER", "E-PER", "I-PER", "S-LOC", "E-LOC"]) == {
        ("PER", 0, 1),
        ("PER", 2, 2),
        ("LOC", 3, 3),
        ("LOC", 4, 4),
    }
    assert entities([]) == set() and entities(["O", "O"]) == set()
    with pytest.raises(DataError, match="'PER'"):
        entities(["O", "PER"])


def test_entity_counts_rejects_bad_input():
    with pytest.raises(ValueError, match="duplicates"):
        EntityCounts(["PER", "LOC", "PER"])
    ec = EntityCounts(["PER"])
    with pytest.raises(DataError, match="'LOC'"):
        ec.update([["B-LOC"]], [["O"]])
    with pytest.raises(ValueError, match="sentence 0"):
        ec.update([["O", "O"]], [["O"]])
    with pytest.raises(ValueError, match="predicted sentences"):
        ec.update([["O"]], [])
    with pytest.raises(ValueError, match="shape"):
        EntityCounts.compute(torch.zeros(2, 3, dtype=torch.int64), ["PER", "LOC"])


def test_entity_types_from_labels_and_validation():
    labels = ["O", "B-PER", "I-PER", "B-LOC", "I-DATE-TIME"]
    assert entity_types_from_labels(labels) == ["DATE-TIME", "LOC", "PER"]
    assert entity_types_from_labels(["O"]) == []
    validate_bio_labels(labels)
    validate_bio_labels(["O", "I-PER"])  # the IO scheme
    for bad in ["PER", "B-", "b-PER", "E-PER", "S-LOC", "B_PER", "", "o"]:
        with pytest.raises(DataError) as info:
            validate_bio_labels(["O", "B-PER", bad])
        message = str(info.value)
        assert repr(bad) in message and "index 2" in message and "\n" not in message
    with pytest.raises(DataError):
        validate_bio_labels([])
    with pytest.raises(DataError):
        entity_types_from_labels(["O", "X-PER"])
