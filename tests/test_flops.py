"""pretrain/model/flops.py: FLOPs per token against FlopCounterMode, peak FLOP/s, MFU."""

from __future__ import annotations

import json
import os
import types

import pytest
import torch
import torch.nn.functional as F
from torch.nn.attention import SDPBackend, sdpa_kernel
from torch.utils.flop_counter import FlopCounterMode

from lmforge.pretrain.config.schema import ModelConfig
from lmforge.pretrain.core.errors import ConfigurationError
from lmforge.pretrain.model import flops
from lmforge.pretrain.model.flops import (
    flops_per_token,
    lookup_peak_flops,
    measure_matmul_flops,
    mfu,
    param_counts,
    peak_flops,
)
from lmforge.pretrain.model.transformer import GPT

SHAPES = {
    "mha": dict(n_layer=2, n_head=4, d_model=64, vocab_size=128),
    "gqa": dict(n_layer=3, n_head=8, n_kv_head=2, d_model=128, vocab_size=256),
    "tied": dict(n_layer=2, n_head=4, d_model=96, vocab_size=300, tie_embeddings=True),
    "gqa-tied-ffn": dict(
        n_layer=2, n_head=6, n_kv_head=3, d_model=96, ffn_hidden=200, vocab_size=64,
        tie_embeddings=True,
    ),
}  # fmt: skip


@pytest.mark.parametrize(
    ("shape", "seq_len"), [("mha", 64), ("gqa", 32), ("tied", 96), ("gqa-tied-ffn", 48)]
)
def test_flops_per_token_matches_flop_counter(shape: str, seq_len: int) -> None:
    """6·N + 12·L·d·T against torch's FlopCounterMode on one forward+backward (+ cross-entropy).

    The attention runs on SDPA's math backend here: on CPU the default (flash) kernel has no
    FLOP formula registered, so FlopCounterMode would count zero for it; the math backend
    decomposes into bmm's that it counts over the full T×T score matrix, as it counts SDPA on
    GPUs — the convention's "full, not causal" attention term.

    What remains is exact and small: N includes the RMSNorm weights ((2·L + 1)·d), which the
    formula charges 6 FLOPs a token although they do no matmul, and FlopCounterMode counts no
    element-wise work, softmax or cross-entropy at all. The embedding lookup is in neither (an
    untied input table is not in N; a tied one is counted once, as the LM head matmul).
    """
    cfg = ModelConfig(max_seq_len=128, **SHAPES[shape])  # type: ignore[arg-type]
    torch.manual_seed(0)
    model = GPT(cfg)
    batch = 2
    x = torch.randint(0, cfg.vocab_size, (batch, seq_len))
    y = torch.randint(0, cfg.vocab_size, (batch, seq_len))
    with sdpa_kernel(SDPBackend.MATH), FlopCounterMode(display=False) as counter:
        logits = model(x)
        F.cross_entropy(logits.view(-1, cfg.vocab_size), y.view(-1)).backward()
    counted = counter.get_total_flops()
    predicted = flops_per_token(cfg, seq_len) * batch * seq_len
    assert abs(predicted - counted) / counted < 0.02
    norm_params = (2 * cfg.n_layer + 1) * cfg.d_model
    assert predicted - counted == 6 * norm_params * batch * seq_len


@pytest.mark.parametrize("mode", ["all", "head", "lora-qv", "lora-ffn"])
def test_trained_flops_per_token_matches_flop_counter(mode: str) -> None:
    """Finetuning FLOPs count only what trains, against FlopCounterMode (autograd skips the
    weight gradients of frozen weights, and every gradient below the lowest trainable one).

    All trainable: flops_per_token exactly; head only: exact up to the norm weights' forward.
    LoRA: an overestimate by less than one block's backward (the input gradients of the lowest
    block with an adapter are counted whole) and the norm weights."""
    from lmforge.finetune.model import wrap_lora
    from lmforge.pretrain.model.flops import trained_flops_per_token

    cfg = ModelConfig(n_layer=3, n_head=4, n_kv_head=2, d_model=64, vocab_size=128, max_seq_len=64)
    torch.manual_seed(0)
    model = GPT(cfg, n_out=3)
    if mode == "head":
        for name, p in model.named_parameters():
            p.requires_grad_(name.startswith("output."))
    if mode.startswith("lora"):
        targets = ["wq", "wv"] if mode == "lora-qv" else ["w1", "w2"]
        model = wrap_lora(model, dict(r=4, alpha=8, dropout=0.0, target_modules=targets))
    batch, seq_len = 2, 48
    x = torch.randint(0, cfg.vocab_size, (batch, seq_len))
    with sdpa_kernel(SDPBackend.MATH), FlopCounterMode(display=False) as counter:
        model(x).pow(2).mean().backward()
    counted = counter.get_total_flops() / (batch * seq_len)
    predicted = trained_flops_per_token(model, seq_len)
    norms = (2 * cfg.n_layer + 1) * cfg.d_model
    if mode == "all":
        assert predicted == flops_per_token(cfg, seq_len, n_out=3)
        assert predicted - counted == 6 * norms
    elif mode == "head":
        assert predicted - counted == 2 * norms
        assert predicted < flops_per_token(cfg, seq_len, n_out=3) / 2.9  # about 2N, not 6N
    else:
        block = sum(p.numel() for p in model.base_model.model.layers[0].parameters())
        d_attn = cfg.n_head * cfg.head_size
        assert 0 < predicted - counted <= 2 * block + 8 * d_attn * seq_len + 6 * norms
        assert predicted < flops_per_token(cfg, seq_len, n_out=3) * 0.75  # about 4N, not 6N


def test_flops_per_token_by_hand() -> None:
    cfg = ModelConfig(n_layer=32, n_head=32, d_model=4096, ffn_hidden=11008, vocab_size=32000)
    n = 6_738_415_616 - 32000 * 4096  # untied: the input table is not in N, the LM head is
    assert param_counts(cfg)["flops_params"] == n
    assert flops_per_token(cfg, 4096) == 6 * n + 12 * 32 * 4096 * 4096
    tied = ModelConfig(n_layer=2, n_head=2, d_model=8, vocab_size=10, tie_embeddings=True)
    counts = param_counts(tied)
    assert counts["flops_params"] == counts["total"]  # a tied table counts once, as the head
    assert counts["non_embedding"] == counts["total"] - 10 * 8 == counts["blocks"]


def test_param_counts_need_vocab() -> None:
    with pytest.raises(ConfigurationError, match="vocab_size"):
        param_counts(ModelConfig())


def test_mfu() -> None:
    assert mfu(1000.0, 6e9, 12e12) == pytest.approx(0.5)
    assert mfu(0.0, 6e9, 1e12) == 0.0


# --------------------------------------------------------------------------------------------
# peak FLOP/s
# --------------------------------------------------------------------------------------------


def test_override_is_returned_as_is() -> None:
    assert peak_flops(torch.device("cpu"), torch.bfloat16, override=123e12) == (123e12, "override")
    with pytest.raises(ConfigurationError, match="peak_flops"):
        peak_flops("cpu", torch.bfloat16, override=0.0)


@pytest.mark.parametrize(
    ("name", "dtype", "expected"),
    [
        ("NVIDIA H100 80GB HBM3", torch.bfloat16, (989e12, "H100 SXM")),
        ("NVIDIA H100 PCIe", torch.float16, (756e12, "H100 PCIe")),
        ("NVIDIA H100 NVL", torch.bfloat16, (835e12, "H100 NVL")),
        ("NVIDIA H200", torch.bfloat16, (989e12, "H200")),
        ("NVIDIA A100-SXM4-80GB", torch.bfloat16, (312e12, "A100")),
        ("NVIDIA A100-PCIE-40GB", torch.float32, (19.5e12, "A100")),
        ("NVIDIA A10G", torch.bfloat16, (70e12, "A10G")),
        ("NVIDIA L4", torch.bfloat16, (121e12, "L4")),
        ("NVIDIA L40S", torch.bfloat16, (362e12, "L40S")),
        ("NVIDIA GeForce RTX 4090", torch.bfloat16, (165.2e12, "RTX 4090")),
        ("Tesla V100-SXM2-16GB", torch.float16, (125e12, "V100 SXM2")),
        ("Tesla V100-PCIE-32GB", torch.float16, (112e12, "V100 PCIe")),
        ("Tesla V100-SXM2-16GB", torch.bfloat16, None),  # no bf16 on Volta: probe instead
        ("NVIDIA L40", torch.bfloat16, None),  # not an L4
        ("NVIDIA A10", torch.bfloat16, None),  # not an A10G nor an A100
        ("Some Future GPU", torch.bfloat16, None),
    ],
)
def test_table_lookup(name: str, dtype: torch.dtype, expected: tuple | None) -> None:
    assert lookup_peak_flops(name, dtype) == expected


def test_table_lookup_tf32(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(flops, "_tf32_enabled", lambda: True)
    assert lookup_peak_flops("NVIDIA H100 80GB HBM3", torch.float32) == (494.5e12, "H100 SXM")
    assert lookup_peak_flops("NVIDIA A100-SXM4-40GB", torch.float32) == (156e12, "A100")


def test_peak_flops_uses_table_for_known_gpu(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(torch.cuda, "get_device_name", lambda device=None: "NVIDIA H100 80GB HBM3")
    assert peak_flops(torch.device("cuda"), torch.bfloat16) == (989e12, "table:H100 SXM")
    monkeypatch.setattr(torch.cuda, "get_device_name", lambda device=None: "Some Future GPU")
    monkeypatch.setattr(flops, "_probe", lambda device, dtype: (42e12, "probe: 42"))
    assert peak_flops(torch.device("cuda"), torch.bfloat16) == (42e12, "probe: 42")


def test_probe_measures_in_the_run_and_keeps_the_best(tmp_path, monkeypatch) -> None:
    """Each run measures; a cached best that reads lower is replaced, a higher one is kept (a
    probe on a busy machine never lowers the peak); `LMFORGE_PEAK_PROBE=cache` reuses it."""
    monkeypatch.setenv("LMFORGE_CACHE", str(tmp_path / "cache"))
    monkeypatch.delenv(flops.PROBE_ENV, raising=False)
    monkeypatch.setitem(flops.PROBE_SIZES, "cpu", (64, 256))
    value, source = peak_flops(torch.device("cpu"), torch.float32)
    assert source.startswith("probe: ") and source.endswith("in this run, the best so far")
    # A rate this CPU can have: over 0.1 GFLOP/s, and under 64 fp32 FLOPs a cycle (two 16-lane
    # FMA units) at 6 GHz on every logical CPU.
    assert 1e8 < value < (os.cpu_count() or 1) * 64 * 6e9
    cache_file = tmp_path / "cache" / "peak_flops.json"
    cached = json.loads(cache_file.read_text())
    (key,) = cached
    assert key.startswith("cpu:") and "torch.float32" in key
    assert f"|threads={torch.get_num_threads()}|" in key
    assert cached[key] == value

    rates = {64: 5e9, 256: 7e9}  # a slower run: the best measured before is used, and kept
    monkeypatch.setattr(flops, "measure_matmul_flops", lambda dtype, device, n, seconds: rates[n])
    cache_file.write_text(json.dumps({key: 9e9}))
    assert peak_flops("cpu", torch.float32) == (
        9e9,
        "probe: 0.007 TFLOP/s at 256^3 in this run, below the best measured here before "
        "(0.009), which is used",
    )
    cache_file.write_text(json.dumps({key: 1e9}))  # a cache written on a busy machine: replaced
    assert peak_flops("cpu", torch.float32)[0] == 7e9
    assert json.loads(cache_file.read_text())[key] == 7e9
    monkeypatch.setenv(flops.PROBE_ENV, "cache")
    rates.clear()  # no measuring now
    assert peak_flops("cpu", torch.float32) == (7e9, "probe: cached best 0.007 TFLOP/s")


def test_the_probe_tries_several_sizes_and_4096(monkeypatch) -> None:
    seen = []

    def rate(dtype, device, n, seconds):
        seen.append(n)
        return {1024: 1.0, 2048: 3.0, 4096: 2.0}[n]

    monkeypatch.setattr(flops, "measure_matmul_flops", rate)
    assert flops.measure_peak_matmul(torch.bfloat16, "cpu") == (3.0, 2048)
    assert seen == [1024, 2048, 4096]


def test_measure_matmul_flops_counts_2n3_flops_a_matmul(monkeypatch: pytest.MonkeyPatch) -> None:
    """On a clock that advances 1/16 s per matmul, the measured rate is 2·n³ FLOPs x 16."""
    now = {"t": 0.0, "reads": 0}
    mm = torch.mm

    def sixteenth_second_mm(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
        now["t"] += 1 / 16
        return mm(a, b)

    def perf_counter() -> float:
        now["reads"] += 1
        assert now["reads"] < 1000, "the probe timed something other than torch.mm"
        return now["t"]

    monkeypatch.setattr(torch, "mm", sixteenth_second_mm)
    monkeypatch.setattr(flops, "time", types.SimpleNamespace(perf_counter=perf_counter))
    # 5 timed matmuls (5/16 s >= 0.3 s) after the warm-up ones
    assert measure_matmul_flops(torch.float32, "cpu", n=256, seconds=0.3) == 2 * 256**3 * 16
