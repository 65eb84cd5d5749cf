"""Labelled examples -> token ids and per-token labels, batched like pretraining's windows.

Every task becomes the same thing: ``input_ids`` and ``labels`` of equal length with -100 where
no loss applies, so one loss (cross-entropy of the model output against ``labels``) and one
model output (B, T, n_out) serve all of them, pipeline stages included:

- classification: the text's tokens; the label id sits on the LAST token (the head reads the
  last non-padding position: causal attention has seen the whole text there);
- sft: the prompt and the response in the run's format (finetune/prompts.py), shifted by one
  (next-token targets); targets inside the prompt are -100, so only the response is learned;
- token_classification: each word's tokens (encoded with its leading space, as in running
  text); the word's tag id on its first sub-word, -100 on the others (Hugging Face's alignment).

Batches are right-padded (causal attention: padding after a position never changes it) to the
longest example of the micro-batch, or to ``max_len`` under pipeline parallelism (a schedule
needs one shape). :class:`ExampleSet` has the interface of pretraining's windows, so
:class:`pretrain.data.batches.TrainBatches` gives the same exact, resumable, world-size-independent order.
"""

from __future__ import annotations

import math

import numpy as np
import torch

from lmforge.finetune.prompts import PromptFormat
from lmforge.finetune.subsets import subset
from lmforge.pretrain.core import dist as pdist
from lmforge.pretrain.core.errors import ConfigurationError, DataError
from lmforge.pretrain.core.launch_env import under_local_launcher
from lmforge.pretrain.data.sources import load_rows

IGNORE = -100


# --------------------------------------------------------------------------------------------
# tables: rows from pretrain.data.sources.load_rows (also the source reader of `lmforge prepare`)
# --------------------------------------------------------------------------------------------


def warn(message: str) -> None:
    """Print a warning line once per run: on rank 0, and not in the workers of a local launcher
    (it read the same data before starting them, and said so)."""
    if pdist.is_main() and not under_local_launcher():
        print(message, flush=True)


def _is_empty(value) -> bool:
    """A missing value (None, or a float NaN: how JSONL/Parquet/`datasets` give a null of a
    number column), an empty or whitespace-only string, or an empty list."""
    if value is None:
        return True
    if isinstance(value, float):
        return math.isnan(value)
    if isinstance(value, str):
        return not value.strip()
    if isinstance(value, (list, tuple)):
        return not value
    return False


# Missing values written out as text by the tool that made the file (`str(float("nan"))`,
# `str(None)`, pandas' `astype(str)`, a JSON null printed): the readers never turn a missing
# cell into these (CSV cells are read as text, an empty cell as ""), so they are labels someone
# wrote, and nearly always missing ones. "NA" is not among them: it is a real label often enough.
NULL_SPELLINGS = ("nan", "none", "null")


def skip_empty_rows(task, rows: list[dict], *, source: str, warn=warn) -> list[dict]:
    """``rows`` without those whose text (classification), prompt or response (sft) or word
    list (token classification) is empty, whitespace-only or missing, with one warning line per
    column counting them; a DataError when no row is left."""
    keys = {"classification": ["text_column"], "sft": ["response_column", "prompt_column"]}.get(
        task.type, ["tokens_column"]
    )
    for key in keys:
        column = getattr(task, key)
        kept = [r for r in rows if not _is_empty(r.get(column))]
        skipped = len(rows) - len(kept)
        if skipped and not kept:
            raise DataError(
                f"all {len(rows):,} rows of {source} have an empty `{column}`; set `task.{key}` "
                "to the column that holds it, or fix the data"
            )
        if skipped:
            warn(
                f"warning: {skipped:,} of {len(rows):,} rows of {source} have an empty "
                f"`{column}` (empty, whitespace or null); they are skipped"
            )
        rows = kept
    return rows


def check_labels(task, rows: list[dict], *, source: str) -> None:
    """A DataError counting the rows whose label (classification) or one of whose tags (token
    classification) is empty, whitespace-only or missing; and, when ``task.labels`` does not
    declare the label set, those whose label is a missing value spelled as text ('NaN',
    'None', 'null'). A model would learn them as classes of their own."""
    if task.type == "classification":
        column = task.label_column
        empty = sum(_is_empty(r.get(column)) for r in rows)
        if empty:
            raise DataError(
                f"{empty:,} of {len(rows):,} rows of {source} have an empty label in `{column}` "
                "(empty, whitespace or null); drop those rows or give them their label"
            )
        if task.labels is None:
            spelled = [
                r[column]
                for r in rows
                if isinstance(r.get(column), str) and r[column].strip().lower() in NULL_SPELLINGS
            ]
            if spelled:
                raise DataError(
                    f"{len(spelled):,} of {len(rows):,} rows of {source} have the label "
                    f"{spelled[0]!r} in `{column}`, a missing value written as text; drop those "
                    f"rows, or set `task.labels` to the label set (with {spelled[0]!r}) if it is "
                    "a real label"
                )
    elif task.type == "token_classification":
        column = task.tags_column
        empty = sum(
            isinstance(r.get(column), list) and any(_is_empty(t) for t in r[column]) for r in rows
        )
        if empty:
            raise DataError(
                f"{empty:,} of {len(rows):,} rows of {source} have an empty tag in `{column}` "
                "(empty, whitespace or null); drop those rows or tag every word ('O' outside "
                "an entity)"
            )


def read_rows(task, source: str, *, split: str) -> list[dict]:
    """The rows of one of ``task``'s sources, checked for its columns, without empty ones."""
    rows = load_rows(
        source,
        split=split,
        dataset_config=task.dataset_config,
        escapechar=task.escapechar,
        warn=warn,
    )
    require_columns(rows, *columns_of(task), source=source)
    rows = skip_empty_rows(task, rows, source=source)
    check_labels(task, rows, source=source)
    return rows


def require_columns(rows: list[dict], columns: list[str], keys: list[str], *, source: str) -> None:
    """One line naming the missing column, the columns there are, and the key to set."""
    if not rows:
        raise DataError(f"{source} has no examples; give a file with at least one row")
    have = list(rows[0])
    for column, key in zip(columns, keys, strict=True):
        if column not in have:
            raise DataError(
                f"{source} has no column {column!r} (columns: {', '.join(map(str, have))}); "
                f"set `{key}` to the right one"
            )


# --------------------------------------------------------------------------------------------
# labels
# --------------------------------------------------------------------------------------------


def label_set(values: list) -> list[str]:
    """Distinct labels as strings, numerically sorted when all are integers."""
    names = {str(v) for v in values}
    try:
        return sorted(names, key=int)
    except ValueError:
        return sorted(names)


def label_ids(values: list, labels: list[str], *, source: str) -> list[int]:
    index = {name: i for i, name in enumerate(labels)}
    out = []
    for v in values:
        if str(v) not in index:
            raise DataError(
                f"{source} has label {str(v)!r}, which is not in the model's label set "
                f"{labels}; fix the data or set task.labels to include it (for a new model)"
            )
        out.append(index[str(v)])
    return out


def class_weights(spec: str, train_label_ids: list[int], num_labels: int) -> list[float] | None:
    """none -> None; balanced -> n / (k * count) per label (scikit-learn's 'balanced'); or the
    given comma-separated weights."""
    if spec == "none":
        return None
    if spec == "balanced":
        counts = np.bincount(np.asarray(train_label_ids), minlength=num_labels)
        n = counts.sum()
        return [float(n / (num_labels * c)) if c else 0.0 for c in counts]
    weights = [float(w) for w in spec.split(",")]
    if len(weights) != num_labels:
        raise ConfigurationError(
            f"`class_weights` has {len(weights)} weights for {num_labels} labels; give one per "
            "label in task.labels order"
        )
    return weights


# --------------------------------------------------------------------------------------------
# examples
# --------------------------------------------------------------------------------------------


class ExampleSet:
    """Tokenized examples with pretraining's window interface (``len``, ``batch(indices)``)
    and ``token_counts`` (tokens per example: what a step trains on); ``rows``: the position of
    each example's row among the rows it was made from (None for packed examples)."""

    def __init__(
        self,
        input_ids: list[list[int]],
        labels: list[list[int]],
        *,
        pad_id: int,
        max_len: int,
        pad_to_max: bool = False,
        name: str = "examples",
        rows: list[int] | None = None,
    ) -> None:
        if not input_ids:
            raise DataError(f"{name}: no examples left after tokenization; check the data")
        self.rows = rows
        self.input_ids = [np.asarray(x, dtype=np.int64) for x in input_ids]
        self.labels = [np.asarray(y, dtype=np.int64) for y in labels]
        self.token_counts = np.array([len(x) for x in self.input_ids], dtype=np.int64)
        self.pad_id = pad_id
        self.seq_len = max_len
        self.pad_to_max = pad_to_max

    def __len__(self) -> int:
        return len(self.input_ids)

    def batch(self, indices) -> dict[str, torch.Tensor]:
        indices = [int(i) for i in indices]
        T = self.seq_len if self.pad_to_max else int(max(self.token_counts[indices]))
        ids = np.full((len(indices), T), self.pad_id, dtype=np.int64)
        labels = np.full((len(indices), T), IGNORE, dtype=np.int64)
        for row, i in enumerate(indices):
            n = len(self.input_ids[i])
            ids[row, :n] = self.input_ids[i]
            labels[row, :n] = self.labels[i]
        return {"input_ids": torch.from_numpy(ids), "labels": torch.from_numpy(labels)}


def classification_example(tok, text: str, label: int, max_len: int):
    ids = tok.encode(text)[-max_len:]  # keep the end: the head reads the last token
    if not ids:
        return None
    return ids, [IGNORE] * (len(ids) - 1) + [label]


def sft_example(fmt: PromptFormat, prompt: str, response: str, *, max_len: int):
    """(input_ids, labels) of one prompt/response pair in the format ``fmt``: next-token
    targets, -100 on the prompt."""
    p, r = fmt.example(prompt, response)
    total = max_len + 1  # inputs and shifted targets
    if len(p) + len(r) > total:
        keep_r = min(len(r), max(total - len(p), total // 2))
        p, r = p[len(p) - (total - keep_r) :], r[:keep_r]
    ids = p + r
    labels = [IGNORE] * (len(p) - 1) + r
    return ids[:-1], labels


def token_classification_example(tok, words: list, tags: list[int], max_len: int):
    ids: list[int] = []
    labels: list[int] = []
    for word, tag in zip(words, tags, strict=True):
        pieces = tok.encode_word(str(word))  # as inside running text
        if not pieces:
            continue
        if len(ids) + len(pieces) > max_len:
            break
        ids += pieces
        labels += [tag] + [IGNORE] * (len(pieces) - 1)
    return (ids, labels) if ids else None


def pack(examples: list[tuple[list[int], list[int]]], max_len: int):
    """Greedy packing in order: consecutive examples share a sequence of <= max_len tokens."""
    packed: list[tuple[list[int], list[int]]] = []
    ids: list[int] = []
    labels: list[int] = []
    for x, y in examples:
        if ids and len(ids) + len(x) > max_len:
            packed.append((ids, labels))
            ids, labels = [], []
        ids, labels = ids + x, labels + y
    if ids:
        packed.append((ids, labels))
    return packed


def columns_of(task) -> tuple[list[str], list[str]]:
    """The columns a task reads, and the config keys that name them."""
    keys = {
        "classification": ["text_column", "label_column"],
        "sft": ["prompt_column", "response_column"],
        "token_classification": ["tokens_column", "tags_column"],
    }[task.type]
    return [getattr(task, k) for k in keys], [f"task.{k}" for k in keys]


def _tagged_examples(task, tok, rows: list[dict], labels: list[str] | None, *, source: str):
    """token_classification: one example per row of words and one BIO tag per word; the tag set
    (found in these rows when ``labels`` is None)."""
    from lmforge.finetune.metrics import validate_bio_labels

    for r in rows:
        words, tags = r[task.tokens_column], r[task.tags_column]
        if not isinstance(words, list) or not isinstance(tags, list):
            raise DataError(
                f"{source}: `{task.tokens_column}` and `{task.tags_column}` must be lists "
                f"(of words, of tags), an example has a {type(words).__name__} and a "
                f"{type(tags).__name__}; write the examples as JSONL/Parquet lists"
            )
    if labels is None:
        labels = label_set(t for r in rows for t in r[task.tags_column])
    validate_bio_labels(labels)
    made = []
    for r in rows:
        words, tags = list(r[task.tokens_column]), list(r[task.tags_column])
        if len(words) != len(tags):
            raise DataError(
                f"{source}: an example has {len(words)} words but {len(tags)} tags; "
                "give one tag per word"
            )
        tag_ids = label_ids(tags, labels, source=source)
        made.append(token_classification_example(tok, words, tag_ids, task.max_len))
    return made, labels


def tokenize(
    task,
    tok,
    rows: list[dict],
    *,
    source: str,
    labels: list[str] | None,
    pad_to_max: bool = False,
    is_train: bool = False,
    warn=warn,
) -> tuple[ExampleSet, list[str] | None, list[int]]:
    """The examples of ``rows``; the label set (found in these rows when ``labels`` is None);
    the label id of each classification example (for class weights and baselines). ``warn``
    gets the warning lines (skipped rows)."""
    ids: list[int] = []
    require_columns(rows, *columns_of(task), source=source)
    position = {id(r): i for i, r in enumerate(rows)}  # skip_empty_rows keeps the same dicts
    rows = skip_empty_rows(task, rows, source=source, warn=warn)
    numbers = [position[id(r)] for r in rows]
    check_labels(task, rows, source=source)
    if task.type == "classification":
        values = [r[task.label_column] for r in rows]
        labels = labels or label_set(values)
        ids = label_ids(values, labels, source=source)
        made = [
            classification_example(tok, str(r[task.text_column] or ""), y, task.max_len)
            for r, y in zip(rows, ids, strict=True)
        ]
    elif task.type == "sft":
        fmt = PromptFormat(tok, task.template)
        made = [
            sft_example(
                fmt,
                str(r[task.prompt_column] or ""),
                str(r[task.response_column] or ""),
                max_len=task.max_len,
            )
            for r in rows
        ]
        if task.packing and is_train:
            made = pack(made, task.max_len)
            numbers = None  # an example holds several rows
    else:
        made, labels = _tagged_examples(task, tok, rows, labels, source=source)
    kept = [m for m in made if m is not None]
    if not kept:
        raise DataError(f"{source}: every example is empty after tokenization; check the data")
    pad_id = tok.eos_id if tok.eos_id is not None else 0
    examples = ExampleSet(
        [k[0] for k in kept],
        [k[1] for k in kept],
        pad_id=pad_id,
        max_len=task.max_len,
        pad_to_max=pad_to_max,
        name=source,
        rows=None
        if numbers is None
        else [n for n, m in zip(numbers, made, strict=True) if m is not None],
    )
    if task.type == "classification":
        ids = [y for y, m in zip(ids, made, strict=True) if m is not None]
    return examples, labels, ids


def train_subset(task, rows: list[dict]) -> list[dict]:
    """The `task.train_examples` rows of ``rows`` (read by :func:`read_rows`: checked, none
    empty), stratified by label for classification (finetune/subsets.py)."""
    classes = [r[task.label_column] for r in rows] if task.type == "classification" else None
    keep = subset(
        classes,
        len(rows),
        size=task.train_examples,
        seed=task.subset_seed,
        what="task.train_examples",
    )
    return [rows[i] for i in keep]


class TaskData:
    """The tokenized train and validation sets of a task, and what the head needs."""

    def __init__(self, task, tokenizer, *, seed: int, labels: list[str] | None, pad_to_max: bool):
        train_rows = read_rows(task, task.train, split=task.train_split)
        if task.val is not None:
            val_rows = read_rows(task, task.val, split=task.val_split)
            val_name = task.val
        else:
            if len(train_rows) < 2:
                raise DataError(
                    f"{task.train} has {len(train_rows)} example(s); need >= 2 to hold out a "
                    "validation split (or set task.val)"
                )
            perm = np.random.default_rng(seed).permutation(len(train_rows))
            n_val = max(1, int(round(len(train_rows) * task.val_fraction)))
            val_rows = [train_rows[i] for i in sorted(perm[:n_val])]
            train_rows = [train_rows[i] for i in sorted(perm[n_val:])]
            val_name = f"{task.train} (held-out {task.val_fraction:g})"
        if task.train_examples is not None:
            train_rows = train_subset(task, train_rows)
        self.task = task
        self.train, self.labels, self.train_label_ids = tokenize(
            task,
            tokenizer,
            train_rows,
            source=task.train,
            labels=labels,
            pad_to_max=pad_to_max,
            is_train=True,
        )
        self.val, _, self.val_label_ids = tokenize(
            task, tokenizer, val_rows, source=val_name, labels=self.labels, pad_to_max=pad_to_max
        )

    @property
    def n_out(self) -> int | None:
        """Width of the task head; None = the LM head (sft)."""
        return None if self.task.type == "sft" else len(self.labels)


def steps_for(epochs: float, num_examples: int, global_batch: int) -> int:
    return max(1, math.ceil(epochs * num_examples / global_batch))
