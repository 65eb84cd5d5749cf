"""lmforge <-> Hugging Face Llama: parameter names and configs.

pretrain/model/transformer.py uses Llama's RoPE convention (rotate-half), RMSNorm and SwiGLU, so the
weights map one to one by name, with no permutation. The output layer is `lm_head` of
`LlamaForCausalLM`, or `score` of `LlamaForSequenceClassification` /
`LlamaForTokenClassification`.
"""

from __future__ import annotations

import inspect

from lmforge.pretrain.config.schema import ModelConfig
from lmforge.pretrain.core.errors import ConfigurationError

_NAMES = [  # lmforge name fragment -> transformers name fragment (applied in order)
    ("tok_embeddings.", "model.embed_tokens."),
    ("layers.", "model.layers."),
    ("attention.wq.", "self_attn.q_proj."),
    ("attention.wk.", "self_attn.k_proj."),
    ("attention.wv.", "self_attn.v_proj."),
    ("attention.wo.", "self_attn.o_proj."),
    ("feed_forward.w1.", "mlp.gate_proj."),
    ("feed_forward.w3.", "mlp.up_proj."),
    ("feed_forward.w2.", "mlp.down_proj."),
    ("attention_norm.", "input_layernorm."),
    ("ffn_norm.", "post_attention_layernorm."),
]

ARCHITECTURES = {
    None: "LlamaForCausalLM",
    "sft": "LlamaForCausalLM",
    "classification": "LlamaForSequenceClassification",
    "token_classification": "LlamaForTokenClassification",
}


def to_hf_name(name: str, *, head: str = "lm_head") -> str:
    """lmforge parameter name -> transformers name; ``head``: lm_head or score."""
    if name == "norm.weight":
        return "model.norm.weight"
    if name == "output.weight":
        return f"{head}.weight"
    for ours, theirs in _NAMES:
        name = name.replace(ours, theirs)
    return name


def from_hf_name(name: str) -> str | None:
    """transformers name -> lmforge name (None for what lmforge has no use for)."""
    if name in ("lm_head.weight", "score.weight"):
        return "output.weight"
    if name == "model.norm.weight":
        return "norm.weight"
    if not name.startswith(("model.embed_tokens.", "model.layers.")):
        return None
    for ours, theirs in reversed(_NAMES):
        name = name.replace(theirs, ours)
    return name


def rope_kwargs(theta: float) -> dict:
    """RoPE settings in the form this transformers version takes."""
    import transformers

    if "rope_parameters" in inspect.signature(transformers.LlamaConfig.__init__).parameters:
        return {"rope_parameters": {"rope_type": "default", "rope_theta": theta}}
    return {"rope_theta": theta}


def llama_config(cfg: ModelConfig, **extra):
    """The transformers LlamaConfig of a model shape (``extra``: token ids, labels, ...)."""
    import transformers

    return transformers.LlamaConfig(
        vocab_size=cfg.vocab_size,
        hidden_size=cfg.d_model,
        intermediate_size=cfg.hidden_dim,
        num_hidden_layers=cfg.n_layer,
        num_attention_heads=cfg.n_head,
        num_key_value_heads=cfg.kv_heads,
        head_dim=cfg.head_dim,
        max_position_embeddings=cfg.max_seq_len,
        rms_norm_eps=cfg.norm_eps,
        tie_word_embeddings=cfg.tie_embeddings,
        attention_bias=False,
        mlp_bias=False,
        hidden_act="silu",
        **rope_kwargs(cfg.rope_theta),
        **extra,
    )


def model_config_from_hf(config: dict, *, source: str) -> ModelConfig:
    """A ModelConfig from a Llama config.json (refusing what pretrain/model/transformer.py cannot run)."""
    if config.get("model_type") != "llama":
        raise ConfigurationError(
            f"{source}: model_type {config.get('model_type')!r} is not supported; lmforge "
            "loads Llama-style models (model_type llama)"
        )
    if config.get("attention_bias") or config.get("mlp_bias"):
        raise ConfigurationError(f"{source}: biases in attention/MLP are not supported")
    if config.get("hidden_act", "silu") != "silu":
        raise ConfigurationError(f"{source}: hidden_act {config['hidden_act']!r} is not silu")
    rope = config.get("rope_parameters") or config.get("rope_scaling") or {}
    if rope.get("rope_type", rope.get("type", "default")) != "default":
        raise ConfigurationError(
            f"{source}: RoPE scaling {rope.get('rope_type', rope.get('type'))!r} is not supported"
        )
    theta = rope.get("rope_theta", config.get("rope_theta", 10000.0))
    heads, d = config["num_attention_heads"], config["hidden_size"]
    if config.get("head_dim") not in (None, d // heads):
        raise ConfigurationError(f"{source}: head_dim != hidden_size / heads is not supported")
    return ModelConfig(
        n_layer=config["num_hidden_layers"],
        n_head=heads,
        n_kv_head=config.get("num_key_value_heads") or heads,
        d_model=d,
        ffn_hidden=config["intermediate_size"],
        vocab_size=config["vocab_size"],
        max_seq_len=config.get("max_position_embeddings", 2048),
        rope_theta=float(theta),
        norm_eps=config.get("rms_norm_eps", 1e-6),
        tie_embeddings=bool(config.get("tie_word_embeddings", False)),
    )
