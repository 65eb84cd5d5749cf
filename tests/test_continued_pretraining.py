"""Continued pretraining: `lmforge pretrain init_from=<a Hub model directory>` on the bundled plays,
tokenized with that model's own tokenizer (tiny random Qwen3 and Llama-3-style models built with
transformers' config classes, as in test_families.py; nothing is downloaded).

- Qwen3, 2 processes: the loss falls; killed with SIGKILL after step 10 and resumed with
  `resume=auto`, the run equals the uninterrupted one row for row and bitwise; base.json names
  the source and the sha256 of its weights;
- Llama 3 (RoPE scaling, tied embeddings): continued, then finetuned as a classifier, and its
  export generates with transformers exactly what `lmforge generate` prints;
- Qwen2 (q/k/v biases, tied embeddings) continued under FSDP, ZeRO-3, tensor and pipeline
  parallel on 2 processes trains as one process does;
- refused in one line: data tokenized with another tokenizer, a model shape set beside
  init_from, a sequence longer than the model's.
"""

from __future__ import annotations

import json
import os

import pytest
import torch

from lmforge.launcher.cli import main
from lmforge.pretrain.config.schema import PrepareConfig, load_config
from lmforge.pretrain.data.prepare import prepare
from tests.conftest import lmforge, plays_dir
from tests.runs import QUIET, _rows, checkpoint_weights, latest_checkpoint
from tests.test_families import _hub_model, tokenizer_files  # noqa: F401 - a fixture

STEPS = 14
RUN = [
    "train.seq_len=64",
    "train.micro_batch_size=4",
    "train.global_batch_tokens=1024",
    f"train.max_steps={STEPS}",
    "train.precision=fp32",
    "train.log_interval=1",
    "train.eval_interval=7",
    "train.eval_samples=8",
    "optim.lr=3e-3",
    "optim.warmup_steps=2",
    "checkpoint.interval=4",
    "checkpoint.keep_last=2",
    *QUIET,
]


def _data(tmp_path, *tokenizer: str) -> str:
    """Two plays, a document per paragraph, tokenized as ``tokenizer`` (overrides) says."""
    out = str(tmp_path / "data")
    plays = sorted(os.listdir(os.path.join(plays_dir(), "comedies")))[:2]
    sources = ", ".join(
        f"{{path: '{os.path.join(plays_dir(), 'comedies', p)}', text_unit: paragraph}}"
        for p in plays
    )
    cfg = load_config(
        PrepareConfig, [f"out={out}", f"sources=[{sources}]", *tokenizer, "num_proc=1"]
    )
    prepare(cfg, log=lambda _: None)
    return out


@pytest.fixture(scope="module")
def qwen3(tmp_path_factory, tokenizer_files):  # noqa: F811
    root = tmp_path_factory.mktemp("qwen3")
    _hub_model("qwen3", root / "hub", tokenizer_files)
    return root / "hub", _data(root, f"tokenizer.path={root / 'hub'}")


def test_a_hub_model_continues_and_resumes_exactly(qwen3, tmp_path):
    hub, data = qwen3
    args = [f"data.path={data}", f"init_from={hub}", f"runs_dir={tmp_path}", *RUN]
    lmforge("pretrain", *args, "name=whole", "--nproc", "2")
    whole = str(tmp_path / "whole")
    losses = [r["loss"] for r in _rows(whole) if r["kind"] == "train"]
    assert losses[-1] < losses[0] - 0.05, losses  # (from a random start: near ln(vocab))

    killed = lmforge(
        "pretrain", *args, "name=cut", "--nproc", "2", env={"LMFORGE_FAULT": "step@10"}, check=False
    )
    assert killed.returncode != 0
    cut = str(tmp_path / "cut")
    assert latest_checkpoint(cut) == "step_00000008"
    lmforge("pretrain", *args, "name=cut", "resume=auto", "--nproc", "2")
    assert _rows(cut) == _rows(whole)
    a, b = checkpoint_weights(cut, STEPS), checkpoint_weights(whole, STEPS)
    assert a.keys() == b.keys() and all(a[k].equal(b[k]) for k in a)
    # the model it started from, and its weights' sha256
    base = json.loads(open(os.path.join(whole, "base.json")).read())
    assert base["init_from"] == str(hub) and base["kind"] == "hf"
    from lmforge.pretrain.core.durable import sha256_file

    assert base["weights_sha256"] == {"model.safetensors": sha256_file(hub / "model.safetensors")}


SHORT = ["train.max_steps=3", "train.eval_interval=0", "checkpoint.interval=0"]


@pytest.fixture(scope="module")
def qwen2_alone(tmp_path_factory, tokenizer_files):  # noqa: F811
    """A Qwen2 directory (q/k/v biases, tied embeddings), the plays in its tokenizer, and the
    losses of 3 steps continued from it by one process."""
    root = tmp_path_factory.mktemp("qwen2")
    hub = root / "hub"
    _hub_model("qwen2", hub, tokenizer_files)
    args = [
        f"data.path={_data(root, f'tokenizer.path={hub}')}",
        f"init_from={hub}",
        f"runs_dir={root}",
        *RUN,
        *SHORT,
    ]
    lmforge("pretrain", *args, "name=one")
    return args, [r["loss"] for r in _rows(str(root / "one")) if r["kind"] == "train"]


@pytest.mark.parametrize(
    "layout",
    [
        "parallel.strategy=fsdp",
        "parallel.strategy=deepspeed parallel.zero_stage=3",
        "parallel.tensor_parallel=2",
        "parallel.pipeline_parallel=2",
    ],
    ids=["fsdp", "zero3", "tp2", "pp2"],
)
def test_every_layout_starts_from_the_hub_weights(layout, qwen2_alone, tmp_path):
    """Continued on 2 ranks in each sharded layout, the Qwen2 trains as one process does from
    the same weights: the first steps' losses, which a weight loaded into the wrong shard (or
    left at its random start) would change from the first step. Under tensor and pipeline
    parallelism its tied embeddings are untied."""
    args, one = qwen2_alone
    out = lmforge(
        "pretrain", *args, *layout.split(), f"runs_dir={tmp_path}", "name=two", "--nproc", "2"
    ).stdout
    two = [r["loss"] for r in _rows(str(tmp_path / "two")) if r["kind"] == "train"]
    assert len(one) == len(two) == 3
    # Tensor and pipeline parallelism untie the table and the head (the head starts as a copy,
    # said in one line): the same first step, then updates of two tensors instead of one.
    split = "tensor_parallel" in layout or "pipeline_parallel" in layout
    assert ("are untied" in out) == split
    n = 1 if split else 3
    torch.testing.assert_close(torch.tensor(two[:n]), torch.tensor(one[:n]), rtol=1e-4, atol=1e-5)


def test_what_does_not_go_with_init_from_is_refused(qwen3, tmp_path, capsys):
    hub, data = qwen3
    common = ["pretrain", f"runs_dir={tmp_path}", "name=r", *RUN]

    def error(*extra: str) -> str:
        assert main([*common, *extra]) == 2
        assert not (tmp_path / "r").exists()
        return capsys.readouterr().err.strip().splitlines()[-1]

    sp_data = _data(tmp_path / "sp", "tokenizer.vocab_size=400")  # a SentencePiece of its own
    assert error(f"data.path={sp_data}", f"init_from={hub}") == (
        f"error: data.path={sp_data} was prepared with another tokenizer "
        f"({sp_data}/tokenizer.model) than init_from={hub} was trained with "
        f"({hub}/tokenizer.json); prepare the data again with tokenizer.path={hub}"
    )
    assert "model.n_layer=8 but" in error(
        f"data.path={data}", f"init_from={hub}", "model.n_layer=8"
    )
    assert error(f"data.path={data}", f"init_from={hub}", "train.seq_len=512") == (
        f"error: `train.seq_len`=512 exceeds the max_seq_len 256 of init_from={hub}; lower "
        "train.seq_len"
    )


def test_llama3_continues_finetunes_and_exports_what_it_generates(tmp_path, tokenizer_files):  # noqa: F811
    from transformers import AutoModelForCausalLM, AutoTokenizer

    hub = tmp_path / "hub"
    _hub_model("llama3", hub, tokenizer_files)
    data = _data(tmp_path, f"tokenizer.path={hub}")
    runs = str(tmp_path / "runs")
    args = [f"data.path={data}", f"init_from={hub}", f"runs_dir={runs}", "name=cp", *RUN]
    lmforge("pretrain", *args, "train.max_steps=6")
    run = os.path.join(runs, "cp")

    # a classifier finetuned from the continued model
    import csv

    with open(tmp_path / "t.csv", "w", newline="") as f:
        rows = [("a fine film", "fresh"), ("dull", "rotten")] * 20
        csv.writer(f).writerows([("text", "label"), *rows])
    lmforge(
        "finetune",
        f"runs_dir={runs}",
        "name=cls",
        f"init_from={run}",
        f"task.train={tmp_path / 't.csv'}",
        f"task.val={tmp_path / 't.csv'}",
        "task.max_len=16",
        "train.micro_batch_size=8",
        "train.global_batch_size=8",
        "train.max_steps=2",
        "train.precision=fp32",
        *QUIET,
    )

    out = str(tmp_path / "hf")
    assert main(["export", run, "--out", out]) == 0
    hf = AutoModelForCausalLM.from_pretrained(out).eval()
    assert type(hf).__name__ == "LlamaForCausalLM"
    tok = AutoTokenizer.from_pretrained(out)
    prompt = "Now is the winter of our"
    ids = tok(prompt, return_tensors="pt", add_special_tokens=False)["input_ids"]
    with torch.no_grad():
        greedy = hf.generate(ids, max_new_tokens=10, do_sample=False, eos_token_id=None)
    want = tok.decode(greedy[0, ids.shape[1] :], skip_special_tokens=True)
    for where in (out, run):
        got = lmforge(
            "generate", where, "--prompt", prompt, "--max-new-tokens", "10", "--temperature", "0"
        )
        assert got.stdout == want + "\n"
