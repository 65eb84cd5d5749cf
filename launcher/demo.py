"""`make demo`: the whole pipeline on bundled real text, printing each command it runs.

1. the Rotten Tomatoes task's splits (bundled in finetune/data/), split by movie;
2. prepare: Shakespeare's plays + the TRAINING reviews' text (no labels) -> tokenizer -> shards;
3. pretrain a tiny Llama-style GPT (2 processes on CPU, or one per GPU);
4. finetune it to classify reviews fresh/rotten, and the same model from scratch (same steps and
   data), each at every learning rate of LRS; each arm keeps the one with the better validation
   accuracy (the test split is not looked at);
5. export the picked classifier to Hugging Face format and evaluate it on the test split, with
   lmforge and with transformers (the same predictions), and the picked from-scratch model;
   each review's prediction goes to the kept runs' test_predictions.jsonl (--predictions);
6. sample from the pretrained model.

Goals checked at the end: pretraining's validation loss at least 1 nat below the unigram entropy
of the training tokens; the finetuned classifier clearly (5 points) above the majority class on
the test split. Pretrained vs scratch is reported as measured: the difference in test accuracy
with its paired standard error (both models predict the same reviews) and what it means.
"""

from __future__ import annotations

import csv
import json
import math
import os
import shlex
import shutil
import subprocess
import sys
import time

TASK = "data/demo/rotten_tomatoes"
DATA = "data/demo/pretrain"
RUN, FT, SCRATCH, EXPORT = "runs/demo", "runs/demo-rt", "runs/demo-rt-scratch", "runs/demo-rt-hf"
# The finetuning learning rates each arm is trained with (the preset's first): the same choice
# for both, each arm keeping its best on validation.
LRS = ("5e-4", "1.5e-3")
Z_CLEAR = 2.0  # a difference of at least this many standard errors is not noise (~95%)


def lr_run(base: str, lr: str) -> str:
    """The run directory of an arm at a learning rate: the preset's keeps the arm's name."""
    return base if lr == LRS[0] else f"{base}-lr{lr}"


def step(title: str, *args: str, capture: bool = False) -> str:
    cmd = ["lmforge", *args]
    print(f"\n=== {title}\n$ {shlex.join(cmd)}", flush=True)
    proc = subprocess.run(
        [sys.executable, "-m", "lmforge.launcher.cli", *args],
        stdout=subprocess.PIPE if capture else None,
        text=True,
    )
    if proc.returncode:
        sys.exit(f"demo failed: `{shlex.join(cmd)}` exited {proc.returncode}")
    if capture:
        print(proc.stdout, end="")
    return proc.stdout or ""


def last_eval(run: str) -> dict:
    with open(os.path.join(run, "metrics.jsonl")) as f:
        return [r for r in map(json.loads, f) if r["kind"] == "eval"][-1]


def pick_lr(runs: dict[str, str]) -> str:
    """The learning rate (a key of ``runs``: lr -> run directory) whose run ends with the best
    validation accuracy; ties go to the better macro-F1, then to the first."""
    score = {
        lr: (last_eval(run)["accuracy"], last_eval(run)["macro_f1"]) for lr, run in runs.items()
    }
    return max(runs, key=lambda lr: score[lr])


def read_correct(predictions: str) -> list[int]:
    """The per-example scores of a `lmforge evaluate --predictions` file: 1 where right."""
    with open(predictions, encoding="utf-8") as f:
        return [int(json.loads(line)["correct"]) for line in f]


def paired_difference(a: list[float], b: list[float]) -> tuple[float, float]:
    """The mean of the per-example differences a_i - b_i and its standard error, the sample
    standard deviation of the differences over sqrt(n): the paired SE of the difference between
    two models scored on the same n examples (their shared easy and hard examples cancel)."""
    if len(a) != len(b):
        raise ValueError(f"paired scores need the same examples: {len(a)} vs {len(b)} scores")
    n = len(a)
    if n < 2:
        raise ValueError(f"a standard error needs at least 2 examples, got {n}")
    d = [x - y for x, y in zip(a, b, strict=True)]
    mean = sum(d) / n
    return mean, math.sqrt(sum((x - mean) ** 2 for x in d) / (n - 1) / n)


def comparison_lines(pretrained: list[int], scratch: list[int], what: str) -> list[str]:
    """Pretrained minus scratch in accuracy on the same examples (``what``), with its paired
    standard error, and a line that says what it means: a difference of Z_CLEAR standard errors
    or more helps or hurts, a smaller one is within noise (none at all: the same examples
    right)."""
    diff, se = paired_difference(pretrained, scratch)
    z = diff / se if se > 0 else (0.0 if diff == 0 else math.copysign(math.inf, diff))
    only_pre = sum(p > s for p, s in zip(pretrained, scratch, strict=True))
    only_scratch = sum(s > p for p, s in zip(pretrained, scratch, strict=True))
    lines = [
        f"  pretrained - scratch  {100 * diff:+.2f} ± {100 * se:.2f} points of accuracy (paired "
        f"standard error over the same {len(scratch):,} {what}: {only_pre:,} right only from "
        f"pretrained, {only_scratch:,} only from scratch)"
    ]
    if only_pre == only_scratch == 0:
        lines.append("  => no difference: both models are right on exactly the same examples")
    elif abs(z) >= Z_CLEAR:
        lines.append(
            f"  => pretraining {'helps' if diff > 0 else 'hurts'} by {100 * abs(diff):.2f} ± "
            f"{100 * se:.2f} points ({abs(z):.1f} standard errors from no difference)"
        )
    else:
        lines.append(
            f"  => the difference is within noise ({abs(z):.1f} standard errors, under "
            f"{Z_CLEAR:g}): this test split does not show pretraining helping or hurting"
        )
    return lines


def transformers_accuracy(export: str, test_csv: str) -> tuple[float, list[int]]:
    """Test accuracy of the export loaded by transformers alone (offline)."""
    import torch
    from transformers import AutoModelForSequenceClassification, AutoTokenizer

    tok = AutoTokenizer.from_pretrained(export, local_files_only=True)
    model = AutoModelForSequenceClassification.from_pretrained(export, local_files_only=True)
    with open(test_csv, encoding="utf-8", newline="") as f:
        rows = list(csv.DictReader(f))
    preds = []
    with torch.no_grad():
        for i in range(0, len(rows), 64):
            chunk = [r["text"] for r in rows[i : i + 64]]
            tok.truncation_side = "left"  # as lmforge: the head reads the end of the text
            batch = tok(
                chunk,
                add_special_tokens=False,
                padding=True,
                truncation=True,
                max_length=96,
                return_tensors="pt",
            )
            preds += model(**batch).logits.argmax(-1).tolist()
    label2id = model.config.label2id
    correct = sum(p == label2id[r["label"]] for p, r in zip(preds, rows, strict=True))
    return correct / len(rows), preds


def majority_baseline(train: str, test: str) -> tuple[str, float, int]:
    """The most common label of the ``train`` CSV, its accuracy on ``test``, and how many
    examples ``test`` holds."""
    labels = {}
    for name, path in (("train", train), ("test", test)):
        with open(path, encoding="utf-8", newline="") as f:
            labels[name] = [r["label"] for r in csv.DictReader(f)]
    majority = max(set(labels["train"]), key=labels["train"].count)
    hits = sum(label == majority for label in labels["test"])
    return majority, hits / len(labels["test"]), len(labels["test"])


def main() -> int:
    import torch

    from lmforge.finetune.bundled import rotten_tomatoes

    t0 = time.time()
    arms = {
        FT: {lr: lr_run(FT, lr) for lr in LRS},
        SCRATCH: {lr: lr_run(SCRATCH, lr) for lr in LRS},
    }
    runs = [run for arm in arms.values() for run in arm.values()]
    for path in (TASK, DATA, RUN, *runs, EXPORT):  # the demo's own outputs only
        shutil.rmtree(path, ignore_errors=True)
    nproc = str(torch.cuda.device_count() or 2)
    print(f"\n=== 1/6 the downstream task: Rotten Tomatoes snippets -> {TASK}/", flush=True)
    sizes = rotten_tomatoes(TASK)
    print(", ".join(f"{k} {v:,}" for k, v in sizes.items()) + " reviews (split by movie)")
    step(
        "2/6 prepare: plays + training reviews -> SentencePiece BPE -> memmap shards",
        "prepare",
        "configs/prepare/demo.yaml",
        f"out={DATA}",
    )
    step(
        f"3/6 pretrain: tiny Llama-style GPT, {nproc} processes",
        "pretrain",
        "configs/pretrain/demo.yaml",
        f"data.path={DATA}",
        "--nproc",
        nproc,
    )
    for base, start, extra in (
        (FT, "from the pretrained model", []),
        (
            SCRATCH,
            "the same model, steps and data from random weights (the baseline)",
            ["from_scratch=true"],
        ),
    ):
        for lr, run in arms[base].items():
            step(
                f"4/6 finetune: classify reviews fresh/rotten, {start}; learning rate {lr}",
                "finetune",
                "configs/finetune/demo.yaml",
                f"init_from={RUN}",
                *extra,
                f"name={os.path.basename(run)}",
                f"optim.lr={lr}",
                "--nproc",
                nproc,
            )
    picked = {base: pick_lr(arm) for base, arm in arms.items()}
    ft, scratch_run = arms[FT][picked[FT]], arms[SCRATCH][picked[SCRATCH]]
    step("5/6 export the picked classifier to Hugging Face format", "export", ft, "--out", EXPORT)
    test = f"{TASK}/test.csv"
    predictions = {run: os.path.join(run, "test_predictions.jsonl") for run in (ft, scratch_run)}
    ours, scratch = (
        json.loads(
            step(
                f"5/6 evaluate {what} on the test split",
                *("evaluate", path, "--data", test, "--predictions", file),
                capture=True,
            )
        )
        for what, path, file in (
            ("the export (and each review's prediction)", EXPORT, predictions[ft]),
            ("the picked from-scratch model", scratch_run, predictions[scratch_run]),
        )
    )
    per_example = {run: read_correct(file) for run, file in predictions.items()}
    hf_acc, _ = transformers_accuracy(EXPORT, test)
    step(
        "6/6 generate: sample from the pretrained model",
        "generate",
        RUN,
        "--prompt",
        "This movie is",
        "--max-new-tokens",
        "40",
        "--seed",
        "1",
    )

    with open(os.path.join(DATA, "manifest.json")) as f:
        entropy = json.load(f)["unigram_entropy_nats"]
    val = last_eval(RUN)
    gap = entropy - val["val_loss"]
    majority, baseline, n_test = majority_baseline(f"{TASK}/train.csv", test)

    def chosen(base: str) -> str:
        """The arm's learning rate and the validation accuracies it was picked by."""
        acc = {lr: last_eval(run)["accuracy"] for lr, run in arms[base].items()}
        others = "; ".join(f"{lr}: {a:.4f}" for lr, a in acc.items() if lr != picked[base])
        return f"lr {picked[base]} (val accuracy {acc[picked[base]]:.4f}; {others})"

    print(
        f"\n=== done in {time.time() - t0:.0f} s\n"
        f"pretrain:  val_loss {val['val_loss']:.3f} nats vs unigram entropy {entropy:.3f}: "
        f"{gap:.2f} nats below (goal >= 1)\n"
        f"finetune: each arm at learning rates {', '.join(LRS)}, keeping its best on the val "
        f"split; test split, {n_test:,} reviews:\n"
        f"  from pretrained  {chosen(FT)}  test accuracy {ours['accuracy']:.4f}  macro-F1 "
        f"{ours['macro_f1']:.4f}\n"
        f"  from scratch     {chosen(SCRATCH)}  test accuracy {scratch['accuracy']:.4f}  macro-F1 "
        f"{scratch['macro_f1']:.4f}  (same model, steps and data)\n"
        f"  majority class   accuracy {baseline:.4f}  (always '{majority}')\n"
        + "\n".join(comparison_lines(per_example[ft], per_example[scratch_run], "reviews"))
        + f"\n  transformers on the export: accuracy {hf_acc:.4f} "
        f"(lmforge: {ours['accuracy']:.4f})\n"
        f"runs:   {RUN}/, {', '.join(run + '/' for run in runs)} (metrics.jsonl, checkpoints/, "
        "tb/, *.png; the picked ones' test_predictions.jsonl: each review's prediction)\n"
        f"export: {EXPORT}/ (config.json, model.safetensors, tokenizer.json, README.md) of {ft}/"
    )
    ok = True
    if gap < 1.0:
        print("demo goal not reached: validation loss is not 1 nat below the unigram entropy")
        ok = False
    if ours["accuracy"] < baseline + 0.05:
        print("demo goal not reached: the classifier is not 5 points above the majority class")
        ok = False
    if abs(hf_acc - ours["accuracy"]) > 1e-9:
        print("transformers and lmforge disagree on the exported model's predictions")
        ok = False
    for run, result in ((ft, ours), (scratch_run, scratch)):
        scores = per_example[run]
        if len(scores) != result["n"] or abs(sum(scores) / len(scores) - result["accuracy"]) > 1e-9:
            print(f"{predictions[run]} disagrees with `lmforge evaluate`'s accuracy")
            ok = False
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
