"""pretrain/model/transformer.py: presets, shapes, causality, init, dropout, generation, HF Llama parity."""

from __future__ import annotations

import re
from pathlib import Path

import pytest
import torch

from lmforge.pretrain.config.schema import ModelConfig, load_config
from lmforge.pretrain.core.errors import ConfigurationError
from lmforge.pretrain.model.flops import param_counts
from lmforge.pretrain.model.transformer import GPT

PRESETS = sorted((Path(__file__).resolve().parents[1] / "configs" / "model").glob("*.yaml"))


def make_cfg(**overrides: object) -> ModelConfig:
    base: dict[str, object] = dict(
        n_layer=2, n_head=4, d_model=64, vocab_size=97, max_seq_len=32, rope_theta=500.0
    )
    base.update(overrides)
    return ModelConfig(**base)  # type: ignore[arg-type]


def make_model(seed: int = 0, **overrides: object) -> GPT:
    torch.manual_seed(seed)
    return GPT(make_cfg(**overrides))


# --------------------------------------------------------------------------------------------
# presets and parameter counts
# --------------------------------------------------------------------------------------------


def test_presets_exist() -> None:
    names = {p.stem for p in PRESETS}
    assert {"tiny", "mini", "small", "base-125m", "350m", "llama-1b", "llama-7b"} <= names


@pytest.mark.parametrize("tied", [False, True])
@pytest.mark.parametrize("preset", PRESETS, ids=lambda p: p.stem)
def test_preset_builds_on_meta_and_counts_match(preset: Path, tied: bool) -> None:
    cfg = load_config(ModelConfig, [str(preset), "vocab_size=32000", f"tie_embeddings={tied}"])
    with torch.device("meta"):
        model = GPT(cfg)
    counts = param_counts(cfg)
    assert model.tied == tied
    assert model.num_params() == counts["total"]
    assert model.num_params(exclude_embedding=True) == counts["flops_params"]
    assert counts["non_embedding"] == counts["total"] - counts["embedding"]
    assert counts["embedding"] == 32000 * cfg.d_model
    if not tied:
        assert counts["flops_params"] == counts["non_embedding"]
    else:
        assert counts["non_embedding"] == counts["blocks"]


@pytest.mark.parametrize("preset", PRESETS, ids=lambda p: p.stem)
def test_preset_header_counts_are_current(preset: Path) -> None:
    """The counts written in each preset's top comment are what param_counts says."""
    text = preset.read_text()
    rows = re.findall(
        r"vocab\s+(\d+): total ([\d,]+); non-embedding ([\d,]+); FLOPs N ([\d,]+)", text
    )
    assert {int(r[0]) for r in rows} == {32000, 8000}
    for vocab, total, non_emb, n in rows:
        counts = param_counts(load_config(ModelConfig, [str(preset), f"vocab_size={vocab}"]))
        assert counts["total"] == int(total.replace(",", ""))
        assert counts["non_embedding"] == int(non_emb.replace(",", ""))
        assert counts["flops_params"] == int(n.replace(",", ""))


def test_llama_7b_matches_published_count() -> None:
    cfg = load_config(ModelConfig, [str(PRESETS[0].parent / "llama-7b.yaml"), "vocab_size=32000"])
    with torch.device("meta"):
        model = GPT(cfg)
    assert model.num_params() == param_counts(cfg)["total"] == 6_738_415_616


def test_llama_1b_matches_llama_3_2_1b() -> None:
    cfg = load_config(ModelConfig, [str(PRESETS[0].parent / "llama-1b.yaml"), "vocab_size=128256"])
    with torch.device("meta"):
        model = GPT(cfg)
    assert model.num_params() == param_counts(cfg)["total"] == 1_235_814_400


def test_state_dict_names_are_stable() -> None:
    model = make_model(n_layer=1)
    expected = {"tok_embeddings.weight", "norm.weight", "output.weight"} | {
        f"layers.0.{name}.weight"
        for name in (
            "attention_norm",
            "attention.wq",
            "attention.wk",
            "attention.wv",
            "attention.wo",
            "ffn_norm",
            "feed_forward.w1",
            "feed_forward.w2",
            "feed_forward.w3",
        )
    }
    assert set(model.state_dict()) == expected  # RoPE tables are non-persistent buffers
    assert not any(n.endswith("bias") for n, _ in model.named_parameters())


def test_tied_embedding_is_one_tensor() -> None:
    model = make_model(tie_embeddings=True)
    assert model.output.weight is model.tok_embeddings.weight
    assert len(list(model.parameters())) == len(set(model.state_dict())) - 1


# --------------------------------------------------------------------------------------------
# forward
# --------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "overrides",
    [{}, {"n_kv_head": 2}, {"n_kv_head": 1}, {"tie_embeddings": True}],
    ids=["mha", "gqa2", "mqa", "tied"],
)
def test_forward_shape(overrides: dict) -> None:
    model = make_model(**overrides)
    x = torch.randint(0, 97, (3, 17))
    logits = model(x)
    assert logits.shape == (3, 17, 97)
    assert torch.isfinite(logits).all()


@pytest.mark.parametrize("n_kv_head", [None, 2])
def test_causal(n_kv_head: int | None) -> None:
    model = make_model(n_kv_head=n_kv_head).eval()
    x = torch.randint(0, 97, (2, 20))
    t = 9
    y = x.clone()
    y[:, t + 1] = (y[:, t + 1] + 1) % 97
    with torch.no_grad():
        a, b = model(x), model(y)
    torch.testing.assert_close(a[:, : t + 1], b[:, : t + 1], rtol=0, atol=0)
    assert not torch.allclose(a[:, t + 1], b[:, t + 1])


def test_too_long_sequence_raises() -> None:
    model = make_model(max_seq_len=16)
    model(torch.zeros(1, 16, dtype=torch.long))
    with pytest.raises(ConfigurationError, match="max_seq_len"):
        model(torch.zeros(1, 17, dtype=torch.long))


def test_vocab_size_none_raises() -> None:
    with pytest.raises(ConfigurationError, match="vocab_size is not set"):
        GPT(make_cfg(vocab_size=None))


# --------------------------------------------------------------------------------------------
# initialisation
# --------------------------------------------------------------------------------------------


def test_init_is_deterministic_under_seed() -> None:
    a, b, c = make_model(seed=1), make_model(seed=1), make_model(seed=2)
    sa, sb, sc = a.state_dict(), b.state_dict(), c.state_dict()
    for name, pa in sa.items():
        pb, pc = sb[name], sc[name]
        assert torch.equal(pa, pb), name
        if not name.endswith("norm.weight"):
            assert not torch.equal(pa, pc), name


def test_init_scales() -> None:
    torch.manual_seed(0)
    cfg = make_cfg(n_layer=8, d_model=256, vocab_size=512)
    model = GPT(cfg)
    resid_std = cfg.init_std / (2 * cfg.n_layer) ** 0.5
    layer = model.layers[0]
    assert layer.attention.wq.weight.std().item() == pytest.approx(cfg.init_std, rel=0.05)
    assert layer.attention.wo.weight.std().item() == pytest.approx(resid_std, rel=0.05)
    assert layer.feed_forward.w2.weight.std().item() == pytest.approx(resid_std, rel=0.05)
    assert model.tok_embeddings.weight.std().item() == pytest.approx(cfg.init_std, rel=0.05)
    assert torch.equal(layer.ffn_norm.weight, torch.ones(cfg.d_model))


@pytest.mark.parametrize("tied", [False, True])
def test_meta_device_then_init_weights(tied: bool) -> None:
    cfg = make_cfg(tie_embeddings=tied, n_kv_head=2)
    with torch.device("meta"):
        meta_model = GPT(cfg)
    assert meta_model.rope_cos.is_meta
    meta_model.to_empty(device="cpu")
    torch.manual_seed(3)
    meta_model.init_weights()
    reference = GPT(cfg)
    torch.manual_seed(3)
    reference.init_weights()
    assert meta_model.tied == tied  # to_empty unties; init_weights ties again
    torch.testing.assert_close(meta_model.rope_cos, reference.rope_cos, rtol=0, atol=0)
    torch.testing.assert_close(meta_model.rope_sin, reference.rope_sin, rtol=0, atol=0)
    expected = reference.state_dict()
    for name, value in meta_model.state_dict().items():
        assert torch.equal(value, expected[name]), name
    x = torch.randint(0, 97, (2, 12))
    torch.testing.assert_close(meta_model(x), reference(x), rtol=0, atol=0)


# --------------------------------------------------------------------------------------------
# dropout and generation
# --------------------------------------------------------------------------------------------


def test_dropout_only_in_train_mode() -> None:
    model = make_model(dropout=0.5)
    x = torch.randint(0, 97, (2, 16))
    model.train()
    assert not torch.allclose(model(x), model(x))
    model.eval()
    torch.testing.assert_close(model(x), model(x), rtol=0, atol=0)
    no_dropout = make_model(dropout=0.0).train()
    torch.testing.assert_close(no_dropout(x), no_dropout(x), rtol=0, atol=0)


def test_generate_greedy_is_deterministic_and_crops_context() -> None:
    model = make_model(max_seq_len=16).train()
    prompt = torch.randint(0, 97, (2, 14))
    out1 = model.generate(prompt, 6, temperature=0.0)
    out2 = model.generate(prompt, 6, temperature=0.0)
    assert out1.shape == (2, 20)  # past max_seq_len: the context is cropped
    assert torch.equal(out1, out2)
    assert torch.equal(out1[:, :14], prompt)
    assert model.training  # mode restored
    assert model.generate(prompt, 0).shape == prompt.shape
    # top_k=1 and a tiny top_p both reduce sampling to greedy decoding
    assert torch.equal(model.generate(prompt, 6, top_k=1), out1)
    assert torch.equal(model.generate(prompt, 6, top_p=1e-9), out1)


@pytest.mark.parametrize("overrides", [{}, {"n_kv_head": 2}], ids=["mha", "gqa"])
def test_kv_cache_gives_the_full_forward(overrides: dict) -> None:
    """A prompt into the cache, then one token at a time: each step's logits equal the last
    row of a full forward over everything so far; generation with the cache (and with the
    sliding window once past max_seq_len) equals re-running the context each step."""
    from lmforge.pretrain.model.transformer import KVCache

    model = make_model(max_seq_len=24, **overrides).eval()
    ids = torch.randint(0, 97, (2, 20))
    cache = KVCache(len(model.layers))
    with torch.no_grad():
        torch.testing.assert_close(model(ids[:, :8], cache=cache), model(ids[:, :8]))
        for t in range(8, 20):
            step = model(ids[:, t : t + 1], cache=cache)[:, -1]
            torch.testing.assert_close(step, model(ids[:, : t + 1])[:, -1], rtol=1e-5, atol=1e-5)
        assert cache.pos == 20 and cache.keys[0].shape[2] == 20
        with pytest.raises(ValueError, match="one token at a time"):
            model(ids[:, :2], cache=cache)

    def reference(prompt: torch.Tensor, n: int) -> torch.Tensor:  # no cache: the whole window
        for _ in range(n):
            with torch.no_grad():
                logits = model(prompt[:, -model.cfg.max_seq_len :])[:, -1]
            prompt = torch.cat((prompt, logits.argmax(-1, keepdim=True)), dim=1)
        return prompt

    prompt = ids[:, :6]
    assert torch.equal(model.generate(prompt, 30, temperature=0.0), reference(prompt, 30))


def test_generate_bench_compares_cache_with_rerun(tmp_path) -> None:
    """`lmforge bench --generate` in-process: one row per case, the same tokens both ways."""
    from lmforge.launcher.bench import run_generate_bench

    out = tmp_path / "gen.md"
    text = run_generate_bench(models=["tiny"], precisions=["fp32"], new_tokens=8, out=str(out))
    row = [line for line in text.splitlines() if line.startswith("| tiny |")]
    assert len(row) == 1 and row[0].rstrip().endswith("| yes |"), text
    assert out.read_text() == text


def test_generate_sampling_follows_generator() -> None:
    model = make_model()
    prompt = torch.randint(0, 97, (3, 4))

    def sample(seed: int) -> torch.Tensor:
        g = torch.Generator().manual_seed(seed)
        return model.generate(prompt, 8, temperature=1.5, top_k=20, top_p=0.9, generator=g)

    assert torch.equal(sample(0), sample(0))
    assert sample(0).shape == (3, 12)
    assert int(sample(0).max()) < 97
    with pytest.raises(ConfigurationError):
        model.generate(prompt, 1, top_p=0.0)


# --------------------------------------------------------------------------------------------
# parity with transformers' LlamaForCausalLM
# --------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "overrides",
    [{}, {"n_kv_head": 2}, {"n_kv_head": 1, "tie_embeddings": True}],
    ids=["mha", "gqa", "mqa-tied"],
)
def test_matches_hf_llama(overrides: dict) -> None:
    transformers = pytest.importorskip("transformers")
    cfg = make_cfg(ffn_hidden=96, **overrides)
    model = make_model(seed=0, ffn_hidden=96, **overrides).eval()
    with torch.no_grad():  # norms start at one: randomise them so a swapped mapping shows
        for name, p in model.named_parameters():
            if name.endswith("norm.weight"):
                p.uniform_(0.5, 1.5)
    from lmforge.pretrain.model.hf_mapping import llama_config, to_hf_name

    hf_cfg = llama_config(cfg)
    hf = transformers.LlamaForCausalLM(hf_cfg).eval()
    state = {to_hf_name(k): v for k, v in model.state_dict().items()}
    missing, unexpected = hf.load_state_dict(state, strict=False)
    assert not unexpected and not [k for k in missing if "rotary" not in k]
    x = torch.randint(0, cfg.vocab_size, (2, cfg.max_seq_len))
    with torch.no_grad():
        ours, theirs = model(x), hf(x).logits
    torch.testing.assert_close(ours, theirs, atol=1e-5, rtol=1e-5)
