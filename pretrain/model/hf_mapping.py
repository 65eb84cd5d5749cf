"""lmforge <-> Hugging Face: parameter names and configs of the families lmforge reads and
writes: Llama (2, 3.x, SmolLM2), Mistral (without a sliding window), Qwen2/Qwen2.5 and Qwen3.

pretrain/model/transformer.py uses Llama's RoPE convention (rotate-half), RMSNorm and SwiGLU, so the
weights map one to one by name, with no permutation; the four families share those names (Qwen2
adds q/k/v biases, Qwen3 `q_norm`/`k_norm`). The output layer is `lm_head` of `...ForCausalLM`,
or `score` of `...ForSequenceClassification` / `...ForTokenClassification`. Anything a config
holds that lmforge does not implement is refused in one line naming the field, never dropped.
"""

from __future__ import annotations

import inspect

from lmforge.pretrain.config.schema import ModelConfig, RopeScalingConfig
from lmforge.pretrain.core.errors import ConfigurationError

_NAMES = [  # lmforge name fragment -> transformers name fragment (applied in order)
    ("tok_embeddings.", "model.embed_tokens."),
    ("layers.", "model.layers."),
    ("attention.wq.", "self_attn.q_proj."),
    ("attention.wk.", "self_attn.k_proj."),
    ("attention.wv.", "self_attn.v_proj."),
    ("attention.wo.", "self_attn.o_proj."),
    ("attention.q_norm.", "self_attn.q_norm."),
    ("attention.k_norm.", "self_attn.k_norm."),
    ("feed_forward.w1.", "mlp.gate_proj."),
    ("feed_forward.w3.", "mlp.up_proj."),
    ("feed_forward.w2.", "mlp.down_proj."),
    ("attention_norm.", "input_layernorm."),
    ("ffn_norm.", "post_attention_layernorm."),
]

# family -> the prefix of its transformers classes, and its config.json model_type
CLASS_PREFIX = {"llama": "Llama", "mistral": "Mistral", "qwen2": "Qwen2", "qwen3": "Qwen3"}
HEADS = {
    None: "ForCausalLM",
    "sft": "ForCausalLM",
    "classification": "ForSequenceClassification",
    "token_classification": "ForTokenClassification",
}


def architecture(family: str, kind: str | None) -> str:
    """The transformers class of a family's model with the head of a task ``kind``."""
    return CLASS_PREFIX[family] + HEADS[kind]


def to_hf_name(name: str, *, head: str = "lm_head") -> str:
    """lmforge parameter name -> transformers name; ``head``: lm_head or score."""
    if name == "norm.weight":
        return "model.norm.weight"
    if name == "output.weight":
        return f"{head}.weight"
    for ours, theirs in _NAMES:
        name = name.replace(ours, theirs)
    return name


def ignored_hf_name(name: str) -> bool:
    """Whether a tensor of a Hub checkpoint is one lmforge may drop: RoPE frequencies that older
    checkpoints saved (lmforge derives them from the config), and the bias of a task head,
    which lmforge's exports write as zeros (checked to be zero where it is read)."""
    return name.endswith("rotary_emb.inv_freq") or name == "score.bias"


def from_hf_name(name: str) -> str | None:
    """transformers name -> lmforge name (None for what lmforge has no use for)."""
    if name in ("lm_head.weight", "score.weight"):
        return "output.weight"
    if name == "model.norm.weight":
        return "norm.weight"
    if not name.startswith(("model.embed_tokens.", "model.layers.")) or ignored_hf_name(name):
        return None
    for ours, theirs in reversed(_NAMES):
        name = name.replace(theirs, ours)
    return name


def rope_kwargs(theta: float, scaling: RopeScalingConfig | None = None) -> dict:
    """RoPE settings in the form this transformers version takes."""
    import transformers

    params = {"rope_type": "default", "rope_theta": theta}
    if scaling is not None:
        params.update(
            rope_type=scaling.rope_type,
            factor=scaling.factor,
            low_freq_factor=scaling.low_freq_factor,
            high_freq_factor=scaling.high_freq_factor,
            original_max_position_embeddings=scaling.original_max_position_embeddings,
        )
    if "rope_parameters" in inspect.signature(transformers.LlamaConfig.__init__).parameters:
        return {"rope_parameters": params}
    scaled = {k: v for k, v in params.items() if k != "rope_theta"}
    return {"rope_theta": theta, "rope_scaling": scaled if scaling is not None else None}


def hf_config(cfg: ModelConfig, **extra):
    """The transformers config of a model shape in its family (``extra``: token ids, labels,
    the architectures, ...)."""
    import transformers

    common = {
        "vocab_size": cfg.vocab_size,
        "hidden_size": cfg.d_model,
        "intermediate_size": cfg.hidden_dim,
        "num_hidden_layers": cfg.n_layer,
        "num_attention_heads": cfg.n_head,
        "num_key_value_heads": cfg.kv_heads,
        "max_position_embeddings": cfg.max_seq_len,
        "rms_norm_eps": cfg.norm_eps,
        "tie_word_embeddings": cfg.tie_embeddings,
        "hidden_act": "silu",
        **rope_kwargs(cfg.rope_theta, cfg.rope_scaling),
    }
    if cfg.family != "qwen2":  # Qwen2's heads are always hidden_size / heads wide
        common["head_dim"] = cfg.head_size
    family = {
        "llama": {"attention_bias": False, "mlp_bias": False},
        "mistral": {"sliding_window": None},
        "qwen2": {"use_sliding_window": False},
        "qwen3": {"use_sliding_window": False, "attention_bias": False},
    }[cfg.family]
    config_class = getattr(transformers, CLASS_PREFIX[cfg.family] + "Config")
    return config_class(**common, **family, **extra)


def llama_config(cfg: ModelConfig, **extra):
    """The transformers LlamaConfig of a Llama-family shape (``extra``: token ids, ...)."""
    if cfg.family != "llama":
        raise ConfigurationError(f"model.family={cfg.family} is not a Llama shape")
    return hf_config(cfg, **extra)


# What each family's config.json may hold that lmforge does not implement, as (field, the value
# lmforge runs): another value is refused, naming the field.
_UNSUPPORTED = {
    "llama": (("attention_bias", False), ("mlp_bias", False)),
    "mistral": (("sliding_window", None),),
    "qwen2": (("use_sliding_window", False),),
    "qwen3": (("use_sliding_window", False), ("attention_bias", False)),
}
_MODEL_TYPES = {"llama": "llama", "mistral": "mistral", "qwen2": "qwen2", "qwen3": "qwen3"}


def model_config_from_hf(config: dict, *, source: str) -> ModelConfig:
    """A ModelConfig from a config.json of a supported family, refusing in one line every
    field pretrain/model/transformer.py does not implement."""
    family = next((f for f, t in _MODEL_TYPES.items() if config.get("model_type") == t), None)
    if family is None:
        raise ConfigurationError(
            f"{source}: model_type {config.get('model_type')!r} is not supported; lmforge reads "
            f"{', '.join(_MODEL_TYPES.values())} (Llama 2/3.x, SmolLM2, Mistral, Qwen2/2.5, "
            "Qwen3)"
        )
    for key, runs in _UNSUPPORTED[family]:
        if config.get(key) not in (None, runs):  # absent or null: the default, which it runs
            raise ConfigurationError(
                f"{source}: {key}={config[key]!r} is not implemented in lmforge (it runs "
                f"{key}={runs!r}); a {family} model with it cannot be loaded"
            )
    if config.get("hidden_act", "silu") != "silu":
        raise ConfigurationError(
            f"{source}: hidden_act={config['hidden_act']!r} is not implemented in lmforge "
            "(SwiGLU with silu only)"
        )
    rope = dict(config.get("rope_parameters") or config.get("rope_scaling") or {})
    rope_type = rope.get("rope_type", rope.get("type", "default"))
    scaling = None
    if rope_type == "llama3":
        scaling = RopeScalingConfig(
            factor=float(rope["factor"]),
            low_freq_factor=float(rope["low_freq_factor"]),
            high_freq_factor=float(rope["high_freq_factor"]),
            original_max_position_embeddings=int(rope["original_max_position_embeddings"]),
        )
    elif rope_type != "default":
        raise ConfigurationError(
            f"{source}: rope_scaling with rope_type={rope_type!r} is not implemented in lmforge "
            "(it runs default RoPE and llama3 scaling)"
        )
    theta = rope.get("rope_theta", config.get("rope_theta", 10000.0))
    heads, d = config["num_attention_heads"], config["hidden_size"]
    head_dim = config.get("head_dim")
    return ModelConfig(
        n_layer=config["num_hidden_layers"],
        n_head=heads,
        n_kv_head=config.get("num_key_value_heads") or heads,
        d_model=d,
        head_dim=None if head_dim in (None, d // heads) else int(head_dim),
        ffn_hidden=config["intermediate_size"],
        vocab_size=config["vocab_size"],
        max_seq_len=config.get("max_position_embeddings", 2048),
        rope_theta=float(theta),
        rope_scaling=scaling,
        qkv_bias=family == "qwen2",
        qk_norm=family == "qwen3",
        norm_eps=config.get("rms_norm_eps", 1e-6),
        tie_embeddings=bool(config.get("tie_word_embeddings", False)),
        family=family,
    )
