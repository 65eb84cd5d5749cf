"""`lmforge generate` (sampling, streamed to the terminal) and `lmforge evaluate` (perplexity on
text files; task metrics of a finetuned model on a labelled file), for any checkpoint, run,
consolidated or exported model directory (finetune/model.py reads them all)."""

from __future__ import annotations

import json
import math
import sys

import torch

from lmforge.finetune.model import build_model, load_source
from lmforge.pretrain.core.errors import ConfigurationError, DataError
from lmforge.pretrain.data.tokenizer import Tokenizer


def _load(path: str):
    src = load_source(path)
    if src.tokenizer is None:
        raise ConfigurationError(
            f"{path}: no tokenizer found; copy the tokenizer.model it was trained with (its "
            f"prepared data's) into {src.path}"
        )
    tok = Tokenizer(src.tokenizer)
    if tok.vocab_size != src.model.vocab_size:
        raise ConfigurationError(
            f"{src.tokenizer} has {tok.vocab_size} pieces but the model's vocabulary is "
            f"{src.model.vocab_size}: the checkpoint and its tokenizer do not belong together"
        )
    return src, build_model(src), tok


def generate(
    path: str,
    *,
    prompt: str,
    max_new_tokens: int = 100,
    temperature: float = 0.8,
    top_k: int | None = 50,
    top_p: float | None = None,
    seed: int = 0,
    raw: bool = False,
    stream=None,
) -> str:
    """Sample a continuation of ``prompt``, writing it to ``stream`` (default: the standard
    output at the time of the call) as it comes; return it. An SFT model's prompt goes into its
    template unless ``raw``."""
    stream = stream or sys.stdout
    src, model, tok = _load(path)
    if src.n_out is not None:
        raise ConfigurationError(
            f"{path} is a {src.task['type']} model (a label head, no LM head): it classifies, "
            "it does not generate; use `lmforge evaluate`"
        )
    task = src.task or {}
    text = prompt
    if task.get("type") == "sft" and not raw:
        text = task["template"].replace("{prompt}", prompt)
    ids = tok.encode(text)
    if not ids:
        ids = [tok.bos_id if tok.bos_id is not None else tok.eos_id]
    generator = torch.Generator().manual_seed(seed)
    new: list[int] = []
    shown = ""

    def on_token(column: torch.Tensor) -> None:
        # decode the whole continuation each time: byte-fallback pieces of one character
        # only form text together, and SentencePiece's spaces depend on the neighbours
        nonlocal shown
        token = int(column[0])
        if token == tok.eos_id:
            return
        new.append(token)
        full = tok.decode(new)
        if not full.endswith("\ufffd"):
            stream.write(full[len(shown) :])
            stream.flush()
            shown = full

    model.generate(
        torch.tensor([ids]),
        max_new_tokens,
        temperature=temperature,
        top_k=top_k,
        top_p=top_p,
        generator=generator,
        eos_id=tok.eos_id if task.get("type") == "sft" else None,
        on_token=on_token,
    )
    full = tok.decode(new)
    stream.write(full[len(shown) :] + "\n")
    stream.flush()
    return full


@torch.no_grad()
def perplexity(path: str, *, files: list[str], seq_len: int | None = None) -> dict:
    """Token-level perplexity of the model on text files: each file is one stream cut into
    windows of ``seq_len`` (default the model's context) predicted left to right."""
    src, model, tok = _load(path)
    if src.n_out is not None:
        raise ConfigurationError(f"{path} is a classifier: perplexity needs a language model")
    T = seq_len or src.model.max_seq_len
    if T > src.model.max_seq_len:
        raise ConfigurationError(
            f"--seq-len {T} exceeds the context of {path} ({src.model.max_seq_len} tokens); "
            f"use --seq-len {src.model.max_seq_len} or less"
        )
    total, count = 0.0, 0
    for name in files:
        try:
            with open(name, encoding="utf-8") as f:
                ids = tok.encode(f.read())
        except (OSError, UnicodeDecodeError) as exc:
            raise DataError(f"cannot read {name}: {exc}") from None
        for start in range(0, max(len(ids) - 1, 0), T):
            chunk = torch.tensor([ids[start : start + T + 1]])
            if chunk.shape[1] < 2:
                break
            logits = model(chunk[:, :-1]).float()
            loss = torch.nn.functional.cross_entropy(
                logits.flatten(0, 1), chunk[:, 1:].flatten(), reduction="sum"
            )
            total += float(loss)
            count += chunk.shape[1] - 1
    if count == 0:
        raise DataError(f"{', '.join(files)}: no text to score (need at least 2 tokens)")
    nll = total / count
    return {"tokens": count, "loss": nll, "perplexity": math.exp(min(nll, 50.0))}


@torch.no_grad()
def task_metrics(
    path: str, *, data: str, columns: dict[str, str] | None = None, batch_size: int = 32
) -> dict:
    """The finetuned model's task metrics on a labelled file (columns as in training, or
    overridden by ``columns``: {"text_column": ..., "label_column": ...})."""
    from lmforge.finetune.config import TaskConfig
    from lmforge.finetune.data import load_rows, tokenize, warn
    from lmforge.finetune.tasks import evaluator_for, make_loss

    src, model, tok = _load(path)
    if not src.task:
        raise ConfigurationError(
            f"{path} is a base language model with no task; evaluate its perplexity with --text"
        )
    columns = columns or {}
    keys = {k for k in TaskConfig.__dataclass_fields__}
    settable = sorted(k for k in keys if k.endswith("_column"))
    unknown = [k for k in columns if k not in settable]
    if unknown:
        raise ConfigurationError(
            f"--column {unknown[0]}={columns[unknown[0]]}: {unknown[0]!r} is not a task column; "
            f"use one of {', '.join(settable)}"
        )
    task = TaskConfig(**{k: v for k, v in {**src.task, **columns}.items() if k in keys})
    task.train = task.val = data
    rows = load_rows(
        data,
        split=task.val_split,
        dataset_config=task.dataset_config,
        escapechar=task.escapechar,
        warn=warn,
    )
    ex, _, _ = tokenize(task, tok, rows, source=data, labels=task.labels)
    evaluator = evaluator_for(task.type, task.labels)
    loss_fn = make_loss(None)
    if evaluator is not None:
        evaluator.reset()
    total, count = 0.0, 0
    for start in range(0, len(ex), batch_size):
        batch = ex.batch(range(start, min(start + batch_size, len(ex))))
        logits = model(batch["input_ids"]).float()
        n = int((batch["labels"] != -100).sum())
        total += float(loss_fn.output_loss(logits, batch["labels"])) * n
        count += n
        if evaluator is not None:
            evaluator.update(logits, batch)
    out = {"examples": len(ex), "loss": total / max(count, 1)}
    if evaluator is not None:
        out.update(evaluator.compute(evaluator.counts().double()))
    else:
        out["perplexity"] = math.exp(min(out["loss"], 50.0))
    return out


def print_json(result: dict, out: str | None) -> None:
    text = json.dumps(result, indent=1)
    print(text)
    if out:
        with open(out, "w") as f:
            f.write(text + "\n")
