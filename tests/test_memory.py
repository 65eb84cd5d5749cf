"""Will it fit? pretrain/parallel/memory.py's estimate against memory measured on real models, and the
refusal of a layout that cannot fit. (Per-rank parameter and optimizer bytes of every parallel
layout are checked against the estimate in tests/test_distributed.py.)"""

from __future__ import annotations

import json
import os

import pytest
import torch

from lmforge.pretrain.config.schema import ModelConfig, ParallelConfig, RopeScalingConfig
from lmforge.pretrain.model.transformer import GPT
from lmforge.pretrain.parallel import apply_activation_checkpointing
from lmforge.pretrain.parallel.memory import estimate_memory
from lmforge.pretrain.train.loop import causal_lm_loss
from lmforge.pretrain.train.metrics import read_metrics
from tests.conftest import lmforge


def saved_for_backward(model, batch, dtype) -> int:
    """Bytes autograd keeps for backward after one forward: every saved tensor's storage once,
    parameters excluded (bf16 copies of them made by autocast count: they live until backward)."""
    params = {p.untyped_storage().data_ptr() for p in model.parameters()}
    seen: dict[int, int] = {}

    def pack(t):
        storage = t.untyped_storage()
        if storage.data_ptr() not in params:
            seen[storage.data_ptr()] = max(seen.get(storage.data_ptr(), 0), storage.nbytes())
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        with torch.autocast("cpu", dtype=dtype, enabled=dtype != torch.float32):
            causal_lm_loss(model, batch)
    return sum(seen.values())


@pytest.mark.parametrize(
    "shape",
    [
        dict(n_layer=2, d_model=64, n_head=4, vocab_size=512, batch=4, seq=64),
        dict(n_layer=3, d_model=128, n_head=4, n_kv_head=2, vocab_size=1024, batch=2, seq=128),
        dict(n_layer=2, d_model=256, n_head=8, vocab_size=4096, batch=2, seq=96),
        # a Hub family's switch: q/k/v biases (Qwen2)
        dict(
            n_layer=2,
            d_model=128,
            n_head=4,
            n_kv_head=2,
            vocab_size=1024,
            batch=2,
            seq=128,
            qkv_bias=True,
            family="qwen2",
        ),
        # qk-norm and heads wider than the model (Qwen3: 16 heads of 128 at width 1024)
        dict(
            n_layer=2,
            d_model=128,
            n_head=4,
            n_kv_head=2,
            head_dim=64,
            vocab_size=1024,
            batch=2,
            seq=128,
            qk_norm=True,
            family="qwen3",
        ),
    ],
    ids=["d64", "d128-gqa", "d256", "qwen2", "qwen3"],
)
@pytest.mark.parametrize("precision", ["fp32", "bf16", "bf16-weights"])
@pytest.mark.parametrize("checkpointing", [False, True], ids=["", "ac"])
def test_activation_estimate_matches_measured(shape, precision, checkpointing):
    """fp32; bf16 under autocast (DDP, TP, PP); bf16-weights: the weights themselves in bf16,
    as FSDP's mixed precision and DeepSpeed compute (no autocast, no weight copies)."""
    shape = dict(shape)
    batch, seq = shape.pop("batch"), shape.pop("seq")
    cfg = ModelConfig(**shape, max_seq_len=seq)
    torch.manual_seed(0)
    model = GPT(cfg)
    if precision == "bf16-weights":
        model.to(torch.bfloat16)
    if checkpointing:
        apply_activation_checkpointing(model)
    x = torch.randint(0, cfg.vocab_size, (batch, seq + 1))
    dtype = torch.bfloat16 if precision == "bf16" else torch.float32  # autocast's
    measured = saved_for_backward(model, {"input_ids": x[:, :-1], "labels": x[:, 1:]}, dtype)
    weights = precision == "bf16-weights"
    est = estimate_memory(
        cfg,
        parallel=ParallelConfig(
            activation_checkpointing=checkpointing, strategy="fsdp" if weights else "ddp"
        ),
        world_size=1,
        precision="bf16" if weights else precision,
        micro_batch_size=batch,
        seq_len=seq,
        grad_accum=1,
    )
    # What a forward leaves for backward: the kept activations and autocast's weight copies
    # (the block recomputed under checkpointing exists only during backward).
    estimated = est.activations - est.recompute + (0 if weights else est.working)
    print(f"{precision} ac={checkpointing}: estimated {estimated:,.0f} measured {measured:,}")
    assert abs(estimated / measured - 1) < 0.05, (estimated, measured)


# 125M-class shapes of the Hub families lmforge reads (SmolLM2-135M is Llama's own; the Qwen and
# Mistral shapes are their published small configs cut to 6 layers and a 32k vocabulary).
FAMILY_SHAPES = {
    "llama3": dict(
        n_layer=6, d_model=576, n_head=9, n_kv_head=3, ffn_hidden=1536, vocab_size=49152,
        tie_embeddings=True, rope_scaling=RopeScalingConfig(), family="llama",
    ),
    "mistral": dict(
        n_layer=6, d_model=768, n_head=12, n_kv_head=4, ffn_hidden=2048, vocab_size=32768,
        family="mistral",
    ),
    "qwen2": dict(
        n_layer=6, d_model=896, n_head=14, n_kv_head=2, ffn_hidden=4864, vocab_size=32768,
        qkv_bias=True, tie_embeddings=True, family="qwen2",
    ),
    "qwen3": dict(
        n_layer=6, d_model=1024, n_head=16, n_kv_head=8, head_dim=128, ffn_hidden=3072,
        vocab_size=32768, qk_norm=True, tie_embeddings=True, family="qwen3",
    ),
}  # fmt: skip


@pytest.mark.parametrize("family", list(FAMILY_SHAPES))
def test_a_familys_125m_class_shape_is_estimated_within_10_percent(family):
    """Parameters (GQA, head width, biases, tied tables) exactly as the model holds them, and
    the activations of one micro-batch within 10% of what autograd keeps (fp32)."""
    cfg = ModelConfig(**FAMILY_SHAPES[family], max_seq_len=128)
    torch.manual_seed(0)
    model = GPT(cfg)
    est = estimate_memory(
        cfg,
        parallel=ParallelConfig(),
        world_size=1,
        precision="fp32",
        micro_batch_size=1,
        seq_len=128,
        grad_accum=1,
    )
    assert est.params == 4 * sum(p.numel() for p in model.parameters())
    x = torch.randint(0, cfg.vocab_size, (1, 129))
    measured = saved_for_backward(
        model, {"input_ids": x[:, :-1], "labels": x[:, 1:]}, torch.float32
    )
    print(f"{family}: estimated {est.activations:,.0f} measured {measured:,}")
    assert abs(est.activations / measured - 1) < 0.10, (est.activations, measured)


def test_dry_run_prints_layout_and_memory(tiny_data):
    out = lmforge(
        "pretrain",
        "name=x",
        f"data.path={tiny_data}",
        "train.max_steps=1",
        "parallel=configs/parallel/fsdp-tp2.yaml",
        "--nproc",
        "4",
        "--dry-run",
    ).stdout
    assert "# layout: dp 2 x tp 2 x pp 1 = 4 rank(s)" in out
    assert "# memory per rank (estimate): params" in out and "activations" in out


def test_layout_that_cannot_fit_is_refused_with_one_that_does(tiny_data, tmp_path):
    """A 7B model on this machine: refused before any process starts, naming a layout that fits
    (here: none of the standard remedies fits a CPU's memory, so it says what else to do)."""
    proc = lmforge(
        "pretrain",
        "name=big",
        f"data.path={tiny_data}",
        f"runs_dir={tmp_path}",
        "train.max_steps=1",
        "model=configs/model/llama-7b.yaml",
        "model.vocab_size=null",
        "--nproc",
        "2",
        check=False,
    )
    assert proc.returncode != 0
    err = proc.stderr.strip().splitlines()
    assert len(err) == 1 and "estimated memory per rank" in err[0] and "exceeds 90%" in err[0]
    assert "parallel.check_memory=false" in err[0]
    assert not (tmp_path / "big").exists()
    # A model that fits only with sharding: the suggestion is FSDP (4 ranks split 16 bytes/param).
    proc = lmforge(
        "pretrain",
        "name=mid",
        f"data.path={tiny_data}",
        f"runs_dir={tmp_path}",
        "train.max_steps=1",
        "model=configs/model/llama-1b.yaml",
        "train.seq_len=64",
        "train.micro_batch_size=1",
        "train.global_batch_tokens=256",
        "--nproc",
        "4",
        "--dry-run",
        check=False,
    )
    assert proc.returncode != 0 and "try parallel.strategy=fsdp" in proc.stderr, proc.stderr


def test_run_records_its_estimate_and_measured_peak(reference_runs):
    """A run writes memory.json (the estimate by part, and what rank 0 held before the model
    existed) and its rows carry the measured peak of the largest rank, which covers at least
    that runtime and stays near runtime + estimate (the estimate leaves out allocator slack and
    communication buffers)."""
    run = reference_runs(2, "fp32", "parallel.strategy=ddp")
    with open(os.path.join(run, "memory.json")) as f:
        memory = json.load(f)
    parts = memory["estimate_bytes"]
    names = ("params", "grads", "optimizer", "activations", "working")
    assert parts["total"] == pytest.approx(sum(parts[k] for k in names))
    assert parts["params"] > 0 and parts["optimizer"] == pytest.approx(2 * parts["params"])
    runtime = memory["runtime_bytes_before_model"]
    assert 50 * 2**20 < runtime < 4 * 2**30  # a Python process with torch and a process group
    rows = [r for r in read_metrics(os.path.join(run, "metrics.jsonl")) if r["kind"] == "train"]
    peak = max(r["peak_mem_gb"] for r in rows) * 2**30
    assert runtime <= peak < runtime + parts["total"] + 512 * 2**20


def test_zero_buffers_follow_the_deepspeed_settings(tmp_path):
    """DeepSpeed's reduction buckets and ZeRO-3's live parameters are counted as the engine is
    configured: lmforge's model-sized default, or the user's JSON."""
    from lmforge.pretrain.parallel.zero import deepspeed_config

    cfg = ModelConfig(n_layer=2, d_model=64, n_head=4, vocab_size=512, max_seq_len=64)
    n = sum(p.numel() for p in GPT(cfg).parameters())
    args = dict(world_size=2, precision="bf16", micro_batch_size=2, seq_len=64, grad_accum=1)
    zero2 = ParallelConfig(strategy="deepspeed", zero_stage=2)
    engine = deepspeed_config(
        zero2, precision="bf16", world_size=2, micro_batch_size=2, grad_accum=1, grad_clip=1.0,
        num_params=n,
    )  # fmt: skip
    bucket = engine["zero_optimization"]["reduce_bucket_size"]
    assert estimate_memory(cfg, parallel=zero2, **args).buffers == bucket * 2  # bf16, one
    user = tmp_path / "ds.json"
    user.write_text(
        json.dumps(
            {
                "zero_optimization": {
                    "reduce_bucket_size": 1000,
                    "overlap_comm": True,
                    "stage3_max_live_parameters": 500,
                }
            }
        )
    )
    zero3 = ParallelConfig(strategy="deepspeed", zero_stage=3, deepspeed_config=str(user))
    est = estimate_memory(cfg, parallel=zero3, **args)
    assert (est.buffers, est.working) == (1000 * 2 * 2, 500 * 2)
    assert "buffers 3.91 KiB" in est.describe()
