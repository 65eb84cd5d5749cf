"""What differs between tasks once examples are tokens (finetune/data.py): the loss weights,
the validation metrics, and the trainer callbacks finetuning adds (early stopping, samples)."""

from __future__ import annotations

import json
import os

import torch

from lmforge.finetune.data import IGNORE
from lmforge.finetune.metrics import ConfusionMatrix, EntityCounts, entity_types_from_labels
from lmforge.finetune.prompts import PromptFormat
from lmforge.pretrain.checkpoint.store import (
    best_checkpoint,
    mark_best,
    read_trainer_state,
    step_dir_name,
)
from lmforge.pretrain.core import dist as pdist
from lmforge.pretrain.core.errors import ConfigurationError
from lmforge.pretrain.model.loss import CrossEntropyLoss
from lmforge.pretrain.train.loop import Callback
from lmforge.pretrain.train.metrics import truncate_metrics


def make_loss(weights: list[float] | None) -> CrossEntropyLoss:
    """Cross-entropy of the model output (B, T, n_out) against labels (B, T) with -100 ignored:
    every task's loss (finetune/data.py), optionally class-weighted; ``output_loss`` is what a
    pipeline's last stage computes."""
    return CrossEntropyLoss(weights)


# --------------------------------------------------------------------------------------------
# validation metrics (counts summed over ranks by the trainer, then computed)
# --------------------------------------------------------------------------------------------


def _labelled(logits: torch.Tensor, labels: torch.Tensor):
    """Predictions and targets at the labelled positions, row by row."""
    labels = labels.to(logits.device)
    preds = logits.argmax(-1)
    for b in range(labels.shape[0]):
        mask = labels[b] != IGNORE
        yield preds[b][mask], labels[b][mask]


class ClassificationEvaluator:
    """Accuracy, macro-F1 and per-class P/R/F1 of the label predicted at the last token."""

    def __init__(self, labels: list[str]) -> None:
        self.labels = labels
        self.cm = ConfusionMatrix(len(labels))

    def reset(self) -> None:
        self.cm.reset()

    def update(self, logits: torch.Tensor, batch: dict) -> None:
        mask = batch["labels"] != IGNORE
        self.cm.update(logits.argmax(-1).cpu()[mask], batch["labels"][mask])

    def counts(self) -> torch.Tensor:
        return self.cm.counts

    def compute(self, counts: torch.Tensor) -> dict:
        return ConfusionMatrix.compute(counts, self.labels)


class TokenEvaluator:
    """Entity-level precision/recall/F1 (seqeval's default mode) and token accuracy."""

    def __init__(self, labels: list[str]) -> None:
        self.labels = labels
        self.types = entity_types_from_labels(labels)
        self.counter = EntityCounts(self.types)

    def reset(self) -> None:
        self.counter.reset()

    def update(self, logits: torch.Tensor, batch: dict) -> None:
        true, pred = [], []
        for p, t in _labelled(logits.cpu(), batch["labels"]):
            true.append([self.labels[i] for i in t.tolist()])
            pred.append([self.labels[i] for i in p.tolist()])
        self.counter.update(true, pred)

    def counts(self) -> torch.Tensor:
        return self.counter.counts

    def compute(self, counts: torch.Tensor) -> dict:
        return EntityCounts.compute(counts, self.types)


def evaluator_for(task_type: str, labels: list[str] | None):
    if task_type == "classification":
        return ClassificationEvaluator(labels)
    if task_type == "token_classification":
        return TokenEvaluator(labels)
    return None  # sft: validation loss (and perplexity) only


def default_metric(task_type: str) -> str:
    return {"classification": "macro_f1", "token_classification": "f1"}.get(task_type, "val_loss")


# --------------------------------------------------------------------------------------------
# callbacks
# --------------------------------------------------------------------------------------------


class EarlyStopping(Callback):
    """Stop when the watched validation metric has not improved for ``patience`` evaluations.
    Every rank sees the same (all-reduced) eval row, so every rank stops after the same step.
    Its counters are saved in checkpoints (``state_key``): a resumed run stops where the
    uninterrupted one would, and a stopped run stays stopped."""

    state_key = "early_stopping"

    def __init__(
        self,
        *,
        metric: str,
        mode: str,
        patience: int,
        min_delta: float,
        keep_best_in: str | None = None,
    ) -> None:
        """``keep_best_in``: a checkpoints directory: checkpoint every new best there and mark
        it (``pretrain.checkpoint.store.mark_best``)."""
        if mode == "auto":
            mode = "min" if ("loss" in metric or "ppl" in metric) else "max"
        self.metric, self.mode, self.patience, self.min_delta = metric, mode, patience, min_delta
        self.keep_best_in = keep_best_in
        self.best: float | None = None
        self.best_step = 0
        self.bad = 0
        self.stopped = False

    def on_log(self, trainer, row: dict) -> None:
        if row["kind"] != "eval":
            return
        if self.metric not in row:
            raise ConfigurationError(
                f"early_stopping.metric={self.metric!r} is not in the eval rows (keys: "
                f"{', '.join(k for k in row if k not in ('kind', 'step'))})"
            )
        value = float(row[self.metric])
        sign = 1.0 if self.mode == "max" else -1.0
        if self.best is None or sign * (value - self.best) > self.min_delta:
            self.best, self.best_step, self.bad = value, row["step"], 0
            if self.keep_best_in:
                trainer.request_save()
        else:
            self.bad += 1
        if self.patience and self.bad >= self.patience and row["step"] < trainer.total_steps:
            self.stopped = True
            pdist.print0(
                f"early stopping at step {row['step']}: {self.metric} has not improved for "
                f"{self.bad} evaluations (best {self.best:.4f} at step {self.best_step}"
                + (", kept as checkpoints/best)" if self.keep_best_in else ")")
            )
            trainer.request_stop(done=True)

    def on_checkpoint(self, trainer, path: str) -> None:
        # the checkpoint's own step: one written in the background is heard steps later
        best = os.path.basename(path) == step_dir_name(self.best_step)
        if self.keep_best_in and trainer.strategy.is_main and best:
            mark_best(self.keep_best_in, self.best_step)

    def on_train_start(self, trainer) -> None:
        """After a resume: a run that had stopped early has nothing left to do, and the mark
        follows the restored counters (a crash may have come between a best's save and its
        mark; an explicit earlier resume=... abandons bests past it)."""
        if self.stopped:
            trainer.total_steps = trainer.state.step
        if not (self.keep_best_in and trainer.strategy.is_main):
            return
        if self.best_step and os.path.isdir(
            os.path.join(self.keep_best_in, step_dir_name(self.best_step))
        ):
            mark_best(self.keep_best_in, self.best_step)
        else:
            marked = best_checkpoint(self.keep_best_in)
            if marked and read_trainer_state(marked)["step"] > trainer.state.step:
                mark_best(self.keep_best_in, None)

    def state_dict(self) -> dict:
        return {
            "best": self.best,
            "best_step": self.best_step,
            "bad": self.bad,
            "stopped": self.stopped,
        }

    def load_state_dict(self, state: dict) -> None:
        self.best, self.best_step = state["best"], state["best_step"]
        self.bad, self.stopped = state["bad"], state["stopped"]


class SampleGenerations(Callback):
    """sft: greedy generations for the first validation prompts at each evaluation, printed
    and appended to ``<run>/samples.jsonl`` (rank 0, on a full replica of the model)."""

    def __init__(
        self,
        *,
        prompts: list[str],
        fmt: PromptFormat,
        max_new_tokens: int,
        run_dir: str,
        start_step: int,
    ) -> None:
        self.prompts, self.fmt = prompts, fmt
        self.max_new_tokens, self.path = max_new_tokens, os.path.join(run_dir, "samples.jsonl")
        # A resumed run repeats the evaluations past its checkpoint: drop their old samples,
        # as metrics.jsonl drops its rows.
        truncate_metrics(self.path, after_step=start_step)

    def on_log(self, trainer, row: dict) -> None:
        if row["kind"] != "eval" or not trainer.strategy.is_main:
            return
        model = trainer.strategy.unwrap(trainer.model)
        device = trainer.strategy.device
        out = []
        for prompt in self.prompts:
            ids = torch.tensor([self.fmt.prompt_ids(prompt)], device=device)
            new = generate_ids(
                model, ids, self.max_new_tokens, stop_ids=self.fmt.stop_ids, temperature=0.0
            )
            text = self.fmt.tok.decode(new)
            out.append({"step": row["step"], "prompt": prompt, "generation": text})
            pdist.print0(f"sample @ step {row['step']}: {prompt[:60]!r} -> {text[:120]!r}")
        with open(self.path, "a") as f:
            f.writelines(json.dumps(r) + "\n" for r in out)


def generate_ids(
    model, ids: torch.Tensor, max_new_tokens: int, *, stop_ids: tuple[int, ...], **sampling
) -> list[int]:
    """New token ids after ``ids`` (1, T), up to the first of ``stop_ids`` (not included).
    ``model``: a GPT, or a peft wrapper of one (its adapters active); ``sampling``:
    GPT.generate's options."""
    gpt = model.base_model.model if hasattr(model, "peft_config") else model
    out = gpt.generate(ids, max_new_tokens, stop_ids=stop_ids, **sampling)[0, ids.shape[1] :]
    new = out.tolist()
    end = next((k for k, t in enumerate(new) if t in stop_ids), len(new))
    return new[:end]
