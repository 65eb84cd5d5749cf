"""Evaluation metrics for finetuning tasks, computed from counts that can be summed across ranks.

Every metric here is a function of a small integer tensor of counts. Each rank accumulates counts
over its shard of the evaluation set, the caller sums them across ranks
(``torch.distributed.all_reduce(counts)``, which this module never calls itself), and the metrics
are computed from the summed counts. The result is therefore the same for any number of ranks and
any split of the data, and equals what the reference libraries give on the whole set.

Conventions shared by both tasks:

* **zero_division = 0**: a precision with no predictions, a recall with no gold instances, and an
  F1 whose precision and recall are both 0 are reported as 0.0 (scikit-learn and seqeval with
  ``zero_division=0``). Accuracy over zero items is 0.0.
* Result dicts hold plain Python ``float``/``int`` values; per-label keys are
  ``<metric>_<label>`` with the label sanitized to ``[A-Za-z0-9_]`` (other characters become
  ``_``), so every key is safe for JSON, TensorBoard and W&B.

Sequence classification (:class:`ConfusionMatrix`) follows scikit-learn's ``accuracy_score`` and
``precision_recall_fscore_support(labels=range(C), zero_division=0)``: ``macro_f1`` averages over
*all* ``C`` labels, including labels that occur neither in the targets nor in the predictions.

Token classification (:class:`EntityCounts`) follows seqeval's default mode (``mode=None``, the
conlleval-compatible, non-strict chunking of :func:`entities`): ``precision``/``recall``/``f1``
are seqeval's micro averages (``f1_score()`` defaults, the "micro avg" row of
``classification_report``), ``macro_f1`` is its "macro avg" row, and ``accuracy`` is its
token-level ``accuracy_score``.
"""

from __future__ import annotations

import re
from collections import Counter
from collections.abc import Iterable, Sequence

import torch

from lmforge.pretrain.core.errors import DataError

__all__ = [
    "ConfusionMatrix",
    "EntityCounts",
    "entities",
    "entity_types_from_labels",
    "majority_baseline",
    "validate_bio_labels",
]


def _divide(numerator: float, denominator: float) -> float:
    """numerator / denominator, or 0.0 when the denominator is 0 (zero_division=0)."""
    return float(numerator) / float(denominator) if denominator else 0.0


def _key(name: str) -> str:
    """A label name made safe for a metric key: characters outside [A-Za-z0-9_] become '_'."""
    return re.sub(r"[^A-Za-z0-9_]", "_", str(name)) or "_"


def _keys(names: Sequence[str]) -> list[str]:
    """Sanitized keys for ``names``; two names that sanitize to the same key are an error."""
    keys = [_key(n) for n in names]
    seen: dict[str, str] = {}
    for name, key in zip(names, keys, strict=True):
        if key in seen:
            raise DataError(
                f"labels {seen[key]!r} and {name!r} both become metric key {key!r}; "
                "rename one so that they differ in letters, digits or '_'"
            )
        seen[key] = name
    return keys


# --------------------------------------------------------------------------------------------
# Sequence classification
# --------------------------------------------------------------------------------------------


class ConfusionMatrix:
    """Counts of (true label, predicted label) pairs for single-label classification.

    ``counts[t, p]`` is the number of examples with true label ``t`` predicted as ``p`` (rows are
    true labels, columns predictions), an int64 tensor of shape ``(num_labels, num_labels)`` on
    ``device``. Put it on the GPU when ranks are summed with NCCL.
    """

    def __init__(self, num_labels: int, device: torch.device | str | None = None) -> None:
        if num_labels < 1:
            raise ValueError(f"num_labels must be at least 1, got {num_labels}")
        self.num_labels = num_labels
        self.counts = torch.zeros(num_labels, num_labels, dtype=torch.int64, device=device)

    def reset(self) -> None:
        self.counts.zero_()

    def update(self, preds: torch.Tensor, targets: torch.Tensor) -> None:
        """Add a batch: ``preds`` and ``targets`` are 1-D integer tensors of class indices."""
        if preds.shape != targets.shape or preds.dim() != 1:
            raise ValueError(
                f"preds and targets must be 1-D of the same length, got shapes "
                f"{tuple(preds.shape)} and {tuple(targets.shape)}"
            )
        if preds.numel() == 0:
            return
        c = self.num_labels
        preds = preds.to(self.counts.device, torch.int64)
        targets = targets.to(self.counts.device, torch.int64)
        lo = int(torch.minimum(preds.min(), targets.min()))
        hi = int(torch.maximum(preds.max(), targets.max()))
        if lo < 0 or hi >= c:
            raise ValueError(f"class indices must lie in [0, {c}), got values in [{lo}, {hi}]")
        pairs = torch.bincount(targets * c + preds, minlength=c * c)
        self.counts += pairs.view(c, c)

    @staticmethod
    def compute(counts: torch.Tensor, label_names: Sequence[str]) -> dict[str, float | int]:
        """Metrics from a (summed) confusion matrix.

        Returns ``accuracy``, ``macro_f1`` (unweighted mean of the per-label F1 over all labels in
        ``label_names``, zero_division=0, as scikit-learn's ``f1_score(average="macro",
        labels=range(C), zero_division=0)``), ``n`` (number of examples) and, per label,
        ``precision_<label>``, ``recall_<label>``, ``f1_<label>``.
        """
        counts = counts.detach().to("cpu", torch.int64)
        c = len(label_names)
        if counts.shape != (c, c):
            raise ValueError(
                f"counts has shape {tuple(counts.shape)} but there are {c} label names"
            )
        keys = _keys(label_names)
        tp = counts.diagonal().tolist()
        gold = counts.sum(dim=1).tolist()  # row sums: examples whose true label is i
        predicted = counts.sum(dim=0).tolist()  # column sums: examples predicted as i
        n = int(counts.sum())

        out: dict[str, float | int] = {"accuracy": _divide(sum(tp), n)}
        per_label: dict[str, float] = {}
        f1s = []
        for key, tp_i, gold_i, pred_i in zip(keys, tp, gold, predicted, strict=True):
            f1 = _divide(2 * tp_i, gold_i + pred_i)
            f1s.append(f1)
            per_label[f"precision_{key}"] = _divide(tp_i, pred_i)
            per_label[f"recall_{key}"] = _divide(tp_i, gold_i)
            per_label[f"f1_{key}"] = f1
        out["macro_f1"] = sum(f1s) / len(f1s)
        out["n"] = n
        out.update(per_label)
        return out


def majority_baseline(
    train_labels: Iterable[int | str] | torch.Tensor,
    eval_labels: Iterable[int | str] | torch.Tensor,
) -> float:
    """Accuracy on ``eval_labels`` of always predicting the most frequent training label.

    Ties between equally frequent training labels go to the smallest label (in sort order), so the
    result does not depend on the order of the data. Returns 0.0 for an empty evaluation set.
    """
    if isinstance(train_labels, torch.Tensor):
        train_labels = train_labels.tolist()
    if isinstance(eval_labels, torch.Tensor):
        eval_labels = eval_labels.tolist()
    freq = Counter(train_labels)
    if not freq:
        raise DataError("the majority-class baseline needs at least one training label")
    top = max(freq.values())
    majority = min(label for label, count in freq.items() if count == top)
    eval_labels = list(eval_labels)
    return _divide(sum(1 for y in eval_labels if y == majority), len(eval_labels))


# --------------------------------------------------------------------------------------------
# Token classification (NER-style chunks)
# --------------------------------------------------------------------------------------------

_PREFIXES = ("B", "I", "E", "S")


def _split_tag(tag: str) -> tuple[str, str]:
    """``"O"`` -> ``("O", "")``; ``"B-PER"`` -> ``("B", "PER")``; the type may itself hold '-'."""
    if tag == "O":
        return "O", ""
    if (
        isinstance(tag, str)
        and len(tag) > 2
        and tag[1] == "-"
        and tag[0] in _PREFIXES
        and not tag[2:].isspace()
    ):
        return tag[0], tag[2:]
    raise DataError(
        f"tag {tag!r} is not 'O' or <prefix>-<type> with prefix B, I, E or S "
        "(e.g. B-PER, I-PER); fix the label list of the dataset"
    )


def entities(tags: Sequence[str]) -> set[tuple[str, int, int]]:
    """The chunks ``(type, start, end)`` (``end`` inclusive) of one tag sequence.

    Chunking follows seqeval's default, conlleval-compatible (non-strict) mode, which tolerates
    ill-formed sequences:

    * ``B-X`` and ``S-X`` always start a new chunk (closing any open one);
    * ``I-X`` and ``E-X`` continue the open chunk when the previous tag is ``B-X`` or ``I-X`` of
      the same type, and otherwise start a new chunk: a lone ``I-PER`` is an entity, and
      ``B-PER I-LOC`` is two entities, ``PER`` then ``LOC``;
    * a chunk ends after ``E-X`` and ``S-X``, and before ``O``.

    The BIO, IO and IOBES schemes are all handled. Tags must be ``"O"`` or ``P-TYPE`` with ``P``
    one of B, I, E, S; anything else raises :class:`~pretrain.core.errors.DataError` (seqeval instead
    warns and guesses, e.g. a bare ``"B"`` becomes a chunk of type ``"_"``).
    """
    chunks: set[tuple[str, int, int]] = set()
    open_type = ""  # type of the current chunk, "" when there is none
    start = 0
    prev_prefix = "O"
    for i, tag in enumerate(tags):
        prefix, type_ = _split_tag(tag)
        # Only a chunk whose last tag is B or I can be extended; E and S close it.
        continues = prefix in ("I", "E") and prev_prefix in ("B", "I") and type_ == open_type
        if open_type and not continues:
            chunks.add((open_type, start, i - 1))
            open_type = ""
        if prefix != "O" and not continues:
            open_type, start = type_, i
        prev_prefix = prefix
    if open_type:
        chunks.add((open_type, start, len(tags) - 1))
    return chunks


def validate_bio_labels(labels: Sequence[str]) -> None:
    """Raise :class:`~pretrain.core.errors.DataError` unless every label is ``"O"``, ``B-X`` or ``I-X``.

    ``X`` is any non-blank entity type (it may contain '-'). The IO scheme (no ``B-`` labels) is
    accepted; IOBES labels (``E-X``, ``S-X``) are not.
    """
    if not labels:
        raise DataError("the token-classification label list is empty; it needs at least 'O'")
    for i, label in enumerate(labels):
        ok = label == "O" or (
            isinstance(label, str)
            and len(label) > 2
            and label[:2] in ("B-", "I-")
            and not label[2:].isspace()
        )
        if not ok:
            raise DataError(
                f"token label {label!r} (index {i}) is not 'O' or B-<type>/I-<type>; "
                "NER labels must use the BIO scheme, e.g. ['O', 'B-PER', 'I-PER']"
            )


def entity_types_from_labels(labels: Iterable[str]) -> list[str]:
    """The sorted entity types named by a tag list: ``["O", "B-PER", "I-PER", "B-LOC"]`` ->
    ``["LOC", "PER"]``. Raises :class:`~pretrain.core.errors.DataError` on a malformed tag."""
    return sorted({type_ for prefix, type_ in map(_split_tag, labels) if prefix != "O"})


class EntityCounts:
    """Entity-level and token-level counts for NER-style evaluation.

    ``counts`` is an int64 tensor of shape ``(len(entity_types) + 1, 3)``; row ``i`` holds
    ``(true positives, predicted, gold)`` chunks of type ``entity_types[i]``, and the last row
    holds the token-level ``(correct tokens, tokens, tokens)``, so one ``all_reduce`` of a single
    tensor sums everything. A predicted chunk is a true positive when a gold chunk of the same type
    has exactly the same span. Chunks never cross sentence boundaries.
    """

    def __init__(self, entity_types: Sequence[str], device: torch.device | str | None = None):
        self.entity_types = list(entity_types)
        if len(set(self.entity_types)) != len(self.entity_types):
            raise ValueError(f"entity_types has duplicates: {self.entity_types}")
        self._row = {t: i for i, t in enumerate(self.entity_types)}
        self.counts = torch.zeros(len(self.entity_types) + 1, 3, dtype=torch.int64, device=device)

    def reset(self) -> None:
        self.counts.zero_()

    def _rows(self, chunks: set[tuple[str, int, int]], where: str) -> list[int]:
        rows = []
        for type_, _, _ in chunks:
            if type_ not in self._row:
                raise DataError(
                    f"{where} tags contain entity type {type_!r}, which is not one of "
                    f"{self.entity_types}; build entity_types from the full label list"
                )
            rows.append(self._row[type_])
        return rows

    def update(
        self, true_tags: Sequence[Sequence[str]], pred_tags: Sequence[Sequence[str]]
    ) -> None:
        """Add a batch of sentences: ``true_tags[k]`` and ``pred_tags[k]`` are the gold and
        predicted tags of sentence ``k`` and must have the same length."""
        if len(true_tags) != len(pred_tags):
            raise ValueError(
                f"{len(true_tags)} gold sentences but {len(pred_tags)} predicted sentences"
            )
        batch = [[0, 0, 0] for _ in range(len(self.entity_types) + 1)]
        for k, (gold, pred) in enumerate(zip(true_tags, pred_tags, strict=True)):
            if len(gold) != len(pred):
                raise ValueError(
                    f"sentence {k} has {len(gold)} gold tags but {len(pred)} predicted tags"
                )
            gold_chunks, pred_chunks = entities(gold), entities(pred)
            for row in self._rows(gold_chunks & pred_chunks, "gold"):
                batch[row][0] += 1
            for row in self._rows(pred_chunks, "predicted"):
                batch[row][1] += 1
            for row in self._rows(gold_chunks, "gold"):
                batch[row][2] += 1
            token = batch[-1]
            token[0] += sum(1 for g, p in zip(gold, pred, strict=True) if g == p)
            token[1] += len(gold)
            token[2] += len(gold)
        self.counts += torch.tensor(batch, dtype=torch.int64).to(self.counts.device)

    @staticmethod
    def compute(counts: torch.Tensor, entity_types: Sequence[str]) -> dict[str, float | int]:
        """Metrics from (summed) counts, zero_division=0 throughout.

        * ``precision``, ``recall``, ``f1``: micro averages over all chunks (seqeval's
          ``precision_score``/``recall_score``/``f1_score`` defaults, the "micro avg" row of its
          ``classification_report``);
        * ``macro_f1``: unweighted mean of the per-type F1 over the types that occur in the gold
          or the predicted chunks, as seqeval's "macro avg" row (types in ``entity_types`` that
          occur in neither are left out of the mean; 0.0 when there are no chunks at all);
        * ``accuracy``: fraction of tokens whose predicted tag equals the gold tag (seqeval's
          ``accuracy_score``);
        * ``n_entities`` (gold chunks) and ``n_tokens``;
        * per type ``precision_<T>``, ``recall_<T>``, ``f1_<T>`` (0.0 for a type with no chunks).
        """
        counts = counts.detach().to("cpu", torch.int64)
        if counts.shape != (len(entity_types) + 1, 3):
            raise ValueError(
                f"counts has shape {tuple(counts.shape)}, expected ({len(entity_types) + 1}, 3) "
                f"for {len(entity_types)} entity types"
            )
        keys = _keys(entity_types)
        rows = counts[:-1].tolist()
        tp, predicted, gold = counts[:-1].sum(dim=0).tolist()
        token_correct, n_tokens, _ = counts[-1].tolist()

        def prf(tp: int, predicted: int, gold: int) -> tuple[float, float, float]:
            p, r = _divide(tp, predicted), _divide(tp, gold)
            return p, r, _divide(2 * p * r, p + r)

        p, r, f1 = prf(tp, predicted, gold)
        out: dict[str, float | int] = {"precision": p, "recall": r, "f1": f1}
        per_type: dict[str, float] = {}
        present_f1s = []
        for key, (tp_t, pred_t, gold_t) in zip(keys, rows, strict=True):
            p_t, r_t, f1_t = prf(tp_t, pred_t, gold_t)
            if pred_t or gold_t:
                present_f1s.append(f1_t)
            per_type[f"precision_{key}"] = p_t
            per_type[f"recall_{key}"] = r_t
            per_type[f"f1_{key}"] = f1_t
        out["macro_f1"] = sum(present_f1s) / len(present_f1s) if present_f1s else 0.0
        out["accuracy"] = _divide(token_correct, n_tokens)
        out["n_entities"] = gold
        out["n_tokens"] = n_tokens
        out.update(per_type)
        return out
