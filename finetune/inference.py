"""`lmforge generate` (sampling, streamed to the terminal) and `lmforge evaluate` (perplexity on
text files, per file and in total; task metrics of a finetuned model on a labelled file, and its
prediction for each example), for any checkpoint, run, consolidated or exported model directory
(finetune/model.py reads them all). Scoring runs without autograd, several windows or examples
per forward pass, in the precision the run trained in (:class:`Scorer`)."""

from __future__ import annotations

import contextlib
import json
import math
import sys
import time
from dataclasses import dataclass

import torch
import torch.nn.functional as F

from lmforge.finetune.data import IGNORE
from lmforge.finetune.model import build_model
from lmforge.finetune.prompts import PromptFormat
from lmforge.pretrain.checkpoint.model_source import ModelSource, check_tokenizer_fits, load_source
from lmforge.pretrain.core.durable import replace_durable
from lmforge.pretrain.core.errors import ConfigurationError, DataError
from lmforge.pretrain.data.tokenizer import Tokenizer, load_tokenizer
from lmforge.pretrain.parallel.common import (
    DTYPES,
    cpu_supports_bf16,
    resolve_precision,
    use_cuda,
)


def load_model(path: str):
    """A model directory's source, its model (eval mode, on the host) and its tokenizer."""
    src = load_source(path)
    if src.tokenizer is None:
        raise ConfigurationError(
            f"{path}: no tokenizer found; copy the tokenizer.model it was trained with (its "
            f"prepared data's) into {src.path}"
        )
    tok = load_tokenizer(src.tokenizer)
    check_tokenizer_fits(src.tokenizer, tok.vocab_size, src.model.vocab_size)
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
    format (finetune/prompts.py: its template or its tokenizer's chat template) unless
    ``raw``, and the response ends at the format's end (EOS, or the chat's end of turn)."""
    stream = stream or sys.stdout
    src, model, tok = load_model(path)
    if src.n_out is not None:
        raise ConfigurationError(
            f"{path} is a {src.task['type']} model (a label head, no LM head): it classifies, "
            "it does not generate; use `lmforge evaluate`"
        )
    task = src.task or {}
    sft = task.get("type") == "sft"
    fmt = PromptFormat(tok, task.get("template")) if sft else None
    ids = fmt.prompt_ids(prompt) if fmt is not None and not raw else tok.encode(prompt)
    if not ids:
        ids = [tok.bos_id if tok.bos_id is not None else tok.eos_id]
    stop_ids = fmt.stop_ids if fmt is not None else ()
    generator = torch.Generator().manual_seed(seed)
    new: list[int] = []
    shown = ""

    def on_token(column: torch.Tensor) -> None:
        # decode the whole continuation each time: byte-fallback pieces of one character
        # only form text together, and SentencePiece's spaces depend on the neighbours
        nonlocal shown
        token = int(column[0])
        if token in stop_ids or token == tok.eos_id:
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
        stop_ids=stop_ids,
        on_token=on_token,
    )
    full = tok.decode(new)
    stream.write(full[len(shown) :] + "\n")
    stream.flush()
    return full


# --------------------------------------------------------------------------------------------
# scoring: the model on its device, in the precision it was trained in, without autograd
# --------------------------------------------------------------------------------------------

# A --text input of at least this many tokens shows its progress on stderr even when stderr is
# not a terminal (a log): about half a minute of scoring on a 2-core CPU for the demo's model.
PROGRESS_TOKENS = 1 << 19


def inference_precision(src: ModelSource, device_type: str) -> str:
    """The precision a model is scored in: its run's ``train.precision`` as training resolves it
    on this device (auto: bf16 where the CPU/GPU has it); bf16 or fp16 only where this device
    computes in it, else fp32; fp32 for a model directory that does not say (an export)."""
    trained = src.precision or "fp32"
    if trained == "auto":
        trained = resolve_precision("auto", device_type=device_type)
    if trained in ("bf16", "fp8"):  # fp8 runs compute outside their float8 matmuls in bf16
        fast = torch.cuda.is_bf16_supported() if device_type == "cuda" else cpu_supports_bf16()
        return "bf16" if fast else "fp32"
    return trained if trained == "fp16" and device_type == "cuda" else "fp32"


@dataclass
class Scorer:
    """A model ready to score: on its device, under the precision it computes in. Call it under
    ``torch.inference_mode()``."""

    model: torch.nn.Module
    device: torch.device
    precision: str

    @classmethod
    def of(cls, src: ModelSource, model: torch.nn.Module) -> Scorer:
        device = torch.device("cuda" if use_cuda() else "cpu")
        return cls(model.to(device), device, inference_precision(src, device.type))

    def logits(self, input_ids: torch.Tensor) -> torch.Tensor:
        """The model's output (B, T, n_out) in fp32, on the model's device."""
        amp = (
            torch.autocast(self.device.type, dtype=DTYPES[self.precision])
            if self.precision != "fp32"
            else contextlib.nullcontext()
        )
        with amp:
            out = self.model(input_ids.to(self.device))
        return out.float()

    def window_nll(self, windows: list[torch.Tensor]) -> torch.Tensor:
        """The summed negative log-likelihood (nats) of each window's tokens after its first,
        each predicted from those before it: one forward over the windows, right-padded to the
        longest (causal attention: padding after a position never changes it)."""
        width = max(len(w) for w in windows) - 1
        inputs = torch.zeros((len(windows), width), dtype=torch.long)
        labels = torch.full((len(windows), width), IGNORE, dtype=torch.long)
        for row, w in enumerate(windows):
            inputs[row, : len(w) - 1], labels[row, : len(w) - 1] = w[:-1], w[1:]
        return token_nll(self.logits(inputs), labels).sum(-1).cpu()


def token_nll(logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    """Cross-entropy (nats) of each position of ``logits`` (B, T, n) against ``labels`` (B, T),
    in fp32; 0 where the label is -100."""
    labels = labels.to(logits.device)
    nll = F.cross_entropy(
        logits.float().flatten(0, 1), labels.flatten(), ignore_index=IGNORE, reduction="none"
    )
    return nll.view(labels.shape)


def default_batch_size(seq_len: int, vocab: int, device_type: str) -> int:
    """Windows per forward pass when none is given. On a CPU, as many as keep a pass's fp32
    logits within 16 MiB: the softmax over the vocabulary then runs in cache, and larger passes
    are slower (BENCHMARKS.md, "Evaluating text"); on a GPU, about 8,192 tokens, within 1 GiB of
    logits."""
    logits = 4 * seq_len * vocab  # bytes of one window's fp32 logits
    if device_type == "cuda":
        return max(1, min(8192 // seq_len, (1 << 30) // logits))
    return max(1, (16 << 20) // logits)


def text_windows(ids: list[int], seq_len: int) -> list[torch.Tensor]:
    """One stream of tokens cut into windows of ``seq_len + 1`` tokens, each starting on the
    last token of the one before: every token after the first is predicted once, from the
    tokens before it in its window. The last window is shorter."""
    stream = torch.tensor(ids, dtype=torch.long)
    return [stream[s : s + seq_len + 1] for s in range(0, max(len(ids) - 1, 0), seq_len)]


class _Progress:
    """Tokens scored so far, on stderr: a bar on a terminal; for a long input (a log), a line at
    each tenth; nothing for a short one off a terminal (stdout stays the JSON)."""

    def __init__(self, total: int) -> None:
        from tqdm.auto import tqdm

        self.total, self.done, self.shown, self.t0 = total, 0, 0, time.perf_counter()
        self.bar = None
        self.lines = not sys.stderr.isatty() and total >= PROGRESS_TOKENS
        if sys.stderr.isatty():
            self.bar = tqdm(total=total, unit="tok", unit_scale=True, leave=False, file=sys.stderr)

    def update(self, n: int) -> None:
        self.done += n
        if self.bar is not None:
            self.bar.update(n)
        elif self.lines and self.done * 10 // self.total > self.shown:
            self.shown = self.done * 10 // self.total
            rate = self.done / max(time.perf_counter() - self.t0, 1e-9)
            print(
                f"scored {self.done:,} of {self.total:,} tokens ({self.done / self.total:.0%}), "
                f"{rate:,.0f} tokens/s, eta {(self.total - self.done) / rate:.0f} s",
                file=sys.stderr,
                flush=True,
            )

    def close(self) -> None:
        if self.bar is not None:
            self.bar.close()


def read_windows(files: list[str], tok: Tokenizer, seq_len: int) -> list[tuple[int, torch.Tensor]]:
    """The windows (:func:`text_windows`) of each text file, in order, with the index of the
    file each comes from."""
    out = []
    for i, name in enumerate(files):
        try:
            with open(name, encoding="utf-8") as f:
                ids = tok.encode(f.read())
        except (OSError, UnicodeDecodeError) as exc:
            raise DataError(f"cannot read {name}: {exc}") from None
        out += [(i, w) for w in text_windows(ids, seq_len)]
    return out


def score_windows(
    scorer: Scorer, windows: list[torch.Tensor], batch_size: int, progress=None
) -> list[float]:
    """The summed negative log-likelihood of each window (:meth:`Scorer.window_nll`),
    ``batch_size`` windows per forward pass; ``progress`` hears the tokens of each pass."""
    sums: list[float] = []
    with torch.inference_mode():
        for start in range(0, len(windows), batch_size):
            chunk = windows[start : start + batch_size]
            sums += scorer.window_nll(chunk).tolist()
            if progress is not None:
                progress(sum(len(w) - 1 for w in chunk))
    return sums


def _scored(nll: float, tokens: int) -> dict:
    """tokens, mean loss and perplexity of ``tokens`` tokens of summed negative log-likelihood
    ``nll`` (loss and perplexity null without a token)."""
    loss = nll / tokens if tokens else None
    return {
        "tokens": tokens,
        "loss": loss,
        "perplexity": math.exp(min(loss, 50.0)) if tokens else None,
    }


def perplexity(
    path: str,
    *,
    files: list[str],
    seq_len: int | None = None,
    batch_size: int | None = None,
) -> dict:
    """Token-level perplexity of the model on text files: each file is one stream cut into
    windows of ``seq_len`` (default the model's context) predicted left to right
    (:func:`text_windows`), ``batch_size`` windows per forward pass (default
    :func:`default_batch_size`), in the run's precision (:func:`inference_precision`). One row
    per file and the total over all of them: the token-weighted mean loss, and its
    perplexity."""
    src, model, tok = load_model(path)
    if src.n_out is not None:
        raise ConfigurationError(f"{path} is a classifier: perplexity needs a language model")
    T = seq_len or src.model.max_seq_len
    if T > src.model.max_seq_len:
        raise ConfigurationError(
            f"--seq-len {T} exceeds the context of {path} ({src.model.max_seq_len} tokens); "
            f"use --seq-len {src.model.max_seq_len} or less"
        )
    windows = read_windows(files, tok, T)
    count = sum(len(w) - 1 for _, w in windows)
    if count == 0:
        raise DataError(f"{', '.join(files)}: no text to score (need at least 2 tokens)")
    scorer = Scorer.of(src, model)
    batch_size = batch_size or default_batch_size(T, src.model.vocab_size, scorer.device.type)
    progress = _Progress(count)
    try:
        sums = score_windows(scorer, [w for _, w in windows], batch_size, progress.update)
    finally:
        progress.close()
    nll, tokens = [0.0] * len(files), [0] * len(files)
    for (i, w), s in zip(windows, sums, strict=True):
        nll[i] += s
        tokens[i] += len(w) - 1
    return {
        **_scored(sum(nll), count),
        "files": [
            {"path": name, **_scored(n, t)} for name, n, t in zip(files, nll, tokens, strict=True)
        ],
        "seq_len": T,
        "batch_size": batch_size,
        "dtype": scorer.precision,
    }


@dataclass
class ExampleScores:
    """A finetuned model on a labelled file: its task metrics, and one row per example in file
    order (what ``evaluate --predictions`` writes, and what the demo's paired comparison
    reads)."""

    metrics: dict
    rows: list[dict]


def evaluate_examples(
    path: str,
    *,
    data: str,
    columns: dict[str, str] | None = None,
    batch_size: int | None = None,
) -> ExampleScores:
    """The finetuned model's task metrics on a labelled file (columns as in training, or
    overridden by ``columns``: {"text_column": ..., "label_column": ...}) and its prediction for
    each example (:func:`example_rows`), ``batch_size`` examples per forward pass (default 32),
    in the run's precision."""
    from lmforge.finetune.data import load_rows, tokenize
    from lmforge.finetune.tasks import evaluator_for

    src, model, tok = load_model(path)
    task = _task_of(path, src, data, columns or {})
    rows = load_rows(
        data,
        split=task.val_split,
        dataset_config=task.dataset_config,
        escapechar=task.escapechar,
        warn=_warn,
    )
    ex, _, _ = tokenize(task, tok, rows, source=data, labels=task.labels, warn=_warn)
    evaluator = evaluator_for(task.type, task.labels)
    if evaluator is not None:
        evaluator.reset()
    scorer = Scorer.of(src, model)
    batch_size = batch_size or 32
    total, count, scored = 0.0, 0, []
    with torch.inference_mode():
        for start in range(0, len(ex), batch_size):
            batch = ex.batch(range(start, min(start + batch_size, len(ex))))
            logits = scorer.logits(batch["input_ids"])
            nll = token_nll(logits, batch["labels"]).cpu()
            if task.type != "sft":  # sft's rows need only the loss, not the vocabulary's logits
                logits = logits.cpu()
            total += float(nll.sum())
            count += int((batch["labels"] != IGNORE).sum())
            if evaluator is not None:
                evaluator.update(logits, batch)
            scored += example_rows(task.type, task.labels, logits, batch["labels"], nll)
    out = {"examples": len(ex), "loss": total / max(count, 1)}
    if evaluator is not None:
        out.update(evaluator.compute(evaluator.counts().double()))
    else:
        out["perplexity"] = math.exp(min(out["loss"], 50.0))
    out["dtype"] = scorer.precision  # not "precision": a tagger's metric
    for i, row in enumerate(scored):
        n = ex.rows[i]
        ident = {"id": rows[n]["id"]} if "id" in rows[n] else {}
        scored[i] = {"row": n, **ident, **row}
    return ExampleScores(out, scored)


def _task_of(path: str, src: ModelSource, data: str, columns: dict[str, str]):
    """The task a finetuned model was trained for, reading ``data`` (with ``columns`` as
    the task's columns where given)."""
    from lmforge.finetune.config import TaskConfig

    if not src.task:
        raise ConfigurationError(
            f"{path} is a base language model with no task; evaluate its perplexity with --text"
        )
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
    return task


def example_rows(
    task_type: str,
    names: list[str] | None,
    logits: torch.Tensor,
    labels: torch.Tensor,
    nll: torch.Tensor,
) -> list[dict]:
    """One dict per example of a batch: its mean ``loss`` over its labelled positions, and
    - classification: the gold ``label``, the ``prediction`` (the most probable label),
      ``correct``, ``score`` (the prediction's probability) and every label's ``probabilities``;
    - token_classification: per word the model read, the gold ``labels``, the ``predictions``
      and their ``scores``; ``correct`` of ``words`` right;
    - sft: the response's ``tokens``."""
    out = []
    if task_type == "sft":
        for b in range(labels.shape[0]):
            mask = labels[b] != IGNORE
            n = int(mask.sum())
            out.append({"loss": float(nll[b][mask].sum()) / max(n, 1), "tokens": n})
        return out
    probs, preds = logits.softmax(-1), logits.argmax(-1)
    for b in range(labels.shape[0]):
        mask = labels[b] != IGNORE
        gold, pred, p = labels[b][mask].tolist(), preds[b][mask].tolist(), probs[b][mask]
        loss = float(nll[b][mask].sum()) / max(len(gold), 1)
        score = [float(p[j, q]) for j, q in enumerate(pred)]
        right = sum(g == q for g, q in zip(gold, pred, strict=True))
        if task_type == "classification":
            out.append(
                {
                    "label": names[gold[0]],
                    "prediction": names[pred[0]],
                    "correct": bool(right),
                    "score": score[0],
                    "loss": loss,
                    "probabilities": dict(zip(names, p[0].tolist(), strict=True)),
                }
            )
        else:
            out.append(
                {
                    "labels": [names[g] for g in gold],
                    "predictions": [names[q] for q in pred],
                    "scores": score,
                    "correct": right,
                    "words": len(gold),
                    "loss": loss,
                }
            )
    return out


def write_predictions(path: str, rows: list[dict]) -> None:
    """The rows as JSON lines, written atomically (a temp file renamed over ``path``) with the
    mode the umask gives a new file."""
    text = "".join(json.dumps(r, ensure_ascii=False, default=str) + "\n" for r in rows)
    replace_durable(path, text.encode("utf-8"))


def _warn(message: str) -> None:
    """evaluate's warnings go to stderr: stdout is its JSON."""
    print(message, file=sys.stderr, flush=True)


def print_json(result: dict, out: str | None) -> None:
    text = json.dumps(result, indent=1)
    print(text)
    if out:
        with open(out, "w") as f:
            f.write(text + "\n")
