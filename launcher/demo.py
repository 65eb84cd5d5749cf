"""`make demo`: the whole pipeline on bundled real text, printing each command it runs.

1. the Rotten Tomatoes task's splits (bundled in finetune/data/), split by movie;
2. prepare: Shakespeare's plays + the TRAINING reviews' text (no labels) -> tokenizer -> shards;
3. pretrain a tiny Llama-style GPT (2 processes on CPU, or one per GPU);
4. finetune it to classify reviews fresh/rotten, and the same model from scratch (same budget);
5. export the classifier to Hugging Face format and evaluate it on the test split, with lmforge
   and with transformers (the same predictions);
6. sample from the pretrained model.

Goals checked at the end: pretraining's validation loss at least 1 nat below the unigram entropy
of the training tokens; the finetuned classifier clearly (5 points) above the majority class on
the test split. Pretrained vs scratch is reported as measured.
"""

from __future__ import annotations

import csv
import json
import os
import shlex
import shutil
import subprocess
import sys
import time

TASK = "data/demo/rotten_tomatoes"
DATA = "data/demo/pretrain"
RUN, FT, SCRATCH, EXPORT = "runs/demo", "runs/demo-rt", "runs/demo-rt-scratch", "runs/demo-rt-hf"


def step(title: str, *args: str, capture: bool = False) -> str:
    cmd = ["lmforge", *args]
    print(f"\n=== {title}\n$ {shlex.join(cmd)}", flush=True)
    proc = subprocess.run(
        [sys.executable, "-m", "launcher.cli", *args],
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


def main() -> int:
    import torch

    from finetune.bundled import rotten_tomatoes

    t0 = time.time()
    for path in (TASK, DATA, RUN, FT, SCRATCH, EXPORT):  # the demo's own outputs only
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
    step(
        "4/6 finetune: classify reviews fresh/rotten, from the pretrained model",
        "finetune",
        "configs/finetune/demo.yaml",
        f"init_from={RUN}",
        "--nproc",
        nproc,
    )
    step(
        "4/6 finetune: the same model and budget from random weights (the baseline)",
        "finetune",
        "configs/finetune/demo.yaml",
        f"init_from={RUN}",
        "from_scratch=true",
        f"name={os.path.basename(SCRATCH)}",
        "--nproc",
        nproc,
    )
    step("5/6 export the classifier to Hugging Face format", "export", FT, "--out", EXPORT)
    test = f"{TASK}/test.csv"
    ours = json.loads(
        step(
            "5/6 evaluate the export on the test split",
            "evaluate",
            EXPORT,
            "--data",
            test,
            capture=True,
        )
    )
    scratch = json.loads(
        step(
            "5/6 evaluate the from-scratch model on the test split",
            "evaluate",
            SCRATCH,
            "--data",
            test,
            capture=True,
        )
    )
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
    with open(f"{TASK}/train.csv", encoding="utf-8", newline="") as f:
        train_labels = [r["label"] for r in csv.DictReader(f)]
    with open(test, encoding="utf-8", newline="") as f:
        test_labels = [r["label"] for r in csv.DictReader(f)]
    majority = max(set(train_labels), key=train_labels.count)
    baseline = sum(lbl == majority for lbl in test_labels) / len(test_labels)
    print(
        f"\n=== done in {time.time() - t0:.0f} s\n"
        f"pretrain:  val_loss {val['val_loss']:.3f} nats vs unigram entropy {entropy:.3f}: "
        f"{gap:.2f} nats below (goal >= 1)\n"
        f"finetune (test split, {len(test_labels):,} reviews):\n"
        f"  from pretrained  accuracy {ours['accuracy']:.4f}  macro-F1 {ours['macro_f1']:.4f}\n"
        f"  from scratch     accuracy {scratch['accuracy']:.4f}  macro-F1 "
        f"{scratch['macro_f1']:.4f}  (same model, steps and data)\n"
        f"  majority class   accuracy {baseline:.4f}  (always '{majority}')\n"
        f"  transformers on the export: accuracy {hf_acc:.4f} (lmforge: {ours['accuracy']:.4f})\n"
        f"runs:   {RUN}/, {FT}/, {SCRATCH}/ (metrics.jsonl, checkpoints/, tb/, *.png)\n"
        f"export: {EXPORT}/ (config.json, model.safetensors, tokenizer.json, README.md)"
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
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
