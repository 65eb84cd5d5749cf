"""A GPT-style decoder with Llama-style blocks, in one readable file (nanoGPT style).

    tokens -> tok_embeddings -> n_layer x [x + attention(attention_norm(x)),
                                           x + feed_forward(ffn_norm(x))] -> norm -> output

- no position embedding: RoPE (rotate-half form) rotates queries and keys instead, with Llama
  3's frequency scaling when `rope_scaling` says so;
- RMSNorm pre-norm, computed in fp32; SwiGLU MLP; no biases (but on q/k/v with `qkv_bias`);
- grouped-query attention when `n_kv_head` < `n_head`; optional tied input/output embeddings;
  heads of an explicit width (`head_dim`) and RMSNorm on each head's q and k (`qk_norm`).

Those switches are what Llama 3, Mistral, Qwen2/2.5 and Qwen3 add to the Llama block; off,
they cost nothing (no parameter, no op).

The parameter names and the RoPE convention are exactly those of Hugging Face's Llama (up to a
renaming table), so an export to `LlamaForCausalLM` gives identical logits. The config
(`ModelConfig`) lives in pretrain/config/schema.py with the other configs.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import torch
import torch.nn as nn
import torch.nn.functional as F

from lmforge.pretrain.config.schema import ModelConfig, RopeScalingConfig
from lmforge.pretrain.core.errors import ConfigurationError


class RMSNorm(nn.Module):
    """Root-mean-square norm (no mean subtraction, no bias), as in Llama.

    The statistics are computed in fp32 whatever the input dtype, because in bf16 the mean of
    squares over thousands of channels loses most of its precision; the result is cast back
    before the weight multiplies it (the same order as HF's LlamaRMSNorm).
    """

    def __init__(self, dim: int, eps: float) -> None:
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(dim))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        xf = x.float()
        xf = xf * torch.rsqrt(xf.pow(2).mean(-1, keepdim=True) + self.eps)
        return self.weight * xf.type_as(x)

    def reset_parameters(self) -> None:
        nn.init.ones_(self.weight)


def rope_tables(
    head_dim: int,
    max_seq_len: int,
    theta: float,
    device: torch.device | str | None = None,
    scaling: RopeScalingConfig | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """cos and sin tables, each (max_seq_len, head_dim), fp32, in HF's rotate-half layout.

    Frequency i (of head_dim/2) is theta^(-2i/head_dim); the tables repeat the frequencies twice
    (`cat(freqs, freqs)`) so that channel j and j + head_dim/2 rotate together. ``scaling``:
    Llama 3's rescaled frequencies (`llama3_frequencies`).
    """
    inv_freq = 1.0 / (theta ** (torch.arange(0, head_dim, 2, device=device).float() / head_dim))
    if scaling is not None:
        inv_freq = llama3_frequencies(inv_freq, scaling)
    t = torch.arange(max_seq_len, device=device).float()
    freqs = torch.outer(t, inv_freq)  # (T, hs/2)
    emb = torch.cat((freqs, freqs), dim=-1)  # (T, hs)
    return emb.cos(), emb.sin()


def llama3_frequencies(inv_freq: torch.Tensor, s: RopeScalingConfig) -> torch.Tensor:
    """Llama 3.1's RoPE scaling: low frequencies (wavelength above original context /
    low_freq_factor) slowed down by `factor`, high ones (below context / high_freq_factor) kept,
    and a smooth blend between, so that the model reaches past the context it was trained at."""
    wavelen = 2 * math.pi / inv_freq
    old = s.original_max_position_embeddings
    scaled = torch.where(wavelen > old / s.low_freq_factor, inv_freq / s.factor, inv_freq)
    smooth = (old / wavelen - s.low_freq_factor) / (s.high_freq_factor - s.low_freq_factor)
    blended = (1 - smooth) * scaled / s.factor + smooth * scaled
    medium = (wavelen >= old / s.high_freq_factor) & (wavelen <= old / s.low_freq_factor)
    return torch.where(medium, blended, scaled)


def rotate_half(x: torch.Tensor) -> torch.Tensor:
    """(x1, x2) -> (-x2, x1) on the two halves of the last dim."""
    x1, x2 = x.chunk(2, dim=-1)
    return torch.cat((-x2, x1), dim=-1)


def apply_rope(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """Rotate x (B, nh, T, hs) by position; cos/sin are (T, hs) and broadcast over B and nh."""
    # cast the tables, not x: under autocast x is bf16 and HF does the same cast
    return x * cos.to(x.dtype) + rotate_half(x) * sin.to(x.dtype)


def repeat_kv(x: torch.Tensor, n_rep: int) -> torch.Tensor:
    """(B, nkv, T, hs) -> (B, nkv * n_rep, T, hs): query head h reads kv head h // n_rep (the
    order of HF's repeat_kv). A view plus one copy, shapes only: no host-device sync."""
    B, nkv, T, hs = x.shape
    return x[:, :, None].expand(B, nkv, n_rep, T, hs).reshape(B, nkv * n_rep, T, hs)


class KVCache:
    """Keys and values of the positions seen so far, one pair per layer (for generation).

    `GPT.forward(ids, cache=...)` appends each layer's new keys/values (already rotated) and
    attends over all of them, so decoding one token costs one token's forward instead of the
    whole context's. `pos` is how many positions the cache holds.
    """

    def __init__(self, n_layer: int) -> None:
        self.keys: list[torch.Tensor | None] = [None] * n_layer
        self.values: list[torch.Tensor | None] = [None] * n_layer
        self.pos = 0

    def update(
        self, layer: int, k: torch.Tensor, v: torch.Tensor
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """Append k, v (B, nkv, T, hs) for ``layer``; return all of its keys and values."""
        if self.keys[layer] is not None:
            k = torch.cat((self.keys[layer], k), dim=2)
            v = torch.cat((self.values[layer], v), dim=2)
        self.keys[layer], self.values[layer] = k, v
        return k, v


class Attention(nn.Module):
    """Causal self-attention with RoPE; grouped-query when there are fewer kv heads. Family
    switches: biases on q/k/v (`qkv_bias`, Qwen2), RMSNorm over each head's q and k before RoPE
    (`qk_norm`, Qwen3)."""

    def __init__(self, cfg: ModelConfig) -> None:
        super().__init__()
        self.head_dim = hs = cfg.head_size
        self.wq = nn.Linear(cfg.d_model, cfg.n_head * hs, bias=cfg.qkv_bias)
        self.wk = nn.Linear(cfg.d_model, cfg.kv_heads * hs, bias=cfg.qkv_bias)
        self.wv = nn.Linear(cfg.d_model, cfg.kv_heads * hs, bias=cfg.qkv_bias)
        self.wo = nn.Linear(cfg.n_head * hs, cfg.d_model, bias=False)
        self.q_norm = RMSNorm(hs, cfg.norm_eps) if cfg.qk_norm else None
        self.k_norm = RMSNorm(hs, cfg.norm_eps) if cfg.qk_norm else None
        self.dropout = cfg.dropout
        self.resid_dropout = nn.Dropout(cfg.dropout)

    def forward(
        self,
        x: torch.Tensor,
        cos: torch.Tensor,
        sin: torch.Tensor,
        cache: tuple[KVCache, int] | None = None,
    ) -> torch.Tensor:
        """``cache``: (the KV cache, this layer's index) when generating; cos/sin then cover
        the new positions only."""
        B, T, _ = x.shape
        # heads as -1, not cfg.n_head: under tensor parallelism each rank holds only its local
        # heads, and this code then runs unchanged
        q = self.wq(x).view(B, T, -1, self.head_dim).transpose(1, 2)  # (B, nh, T, hs)
        k = self.wk(x).view(B, T, -1, self.head_dim).transpose(1, 2)  # (B, nkv, T, hs)
        v = self.wv(x).view(B, T, -1, self.head_dim).transpose(1, 2)  # (B, nkv, T, hs)
        if self.q_norm is not None:  # per head, over hs
            q, k = self.q_norm(q), self.k_norm(k)
        q, k = apply_rope(q, cos, sin), apply_rope(k, cos, sin)
        if cache is not None:
            k, v = cache[0].update(cache[1], k, v)  # (B, nkv, pos + T, hs)
        if k.size(1) != q.size(1):
            # GQA: repeating kv heads here rather than passing enable_gqa keeps every SDPA
            # kernel (flash, memory-efficient) eligible
            k, v = repeat_kv(k, q.size(1) // k.size(1)), repeat_kv(v, q.size(1) // v.size(1))
        # One new query sees every cached key (SDPA's causal mask is aligned top-left, so it
        # would let it see only the first); a longer chunk starts at position 0 (prefill).
        y = F.scaled_dot_product_attention(
            q, k, v, dropout_p=self.dropout if self.training else 0.0, is_causal=T > 1
        )  # (B, nh, T, hs)
        y = y.transpose(1, 2).reshape(B, T, -1)  # (B, T, nh * hs): heads side by side again
        return self.resid_dropout(self.wo(y))


class FeedForward(nn.Module):
    """SwiGLU: w2(silu(w1 x) * w3 x); w1 is the gate, w3 the up projection, w2 the down one."""

    def __init__(self, cfg: ModelConfig) -> None:
        super().__init__()
        self.w1 = nn.Linear(cfg.d_model, cfg.hidden_dim, bias=False)
        self.w2 = nn.Linear(cfg.hidden_dim, cfg.d_model, bias=False)
        self.w3 = nn.Linear(cfg.d_model, cfg.hidden_dim, bias=False)
        self.dropout = nn.Dropout(cfg.dropout)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.dropout(self.w2(F.silu(self.w1(x)) * self.w3(x)))  # (B, T, d)


class Block(nn.Module):
    """Pre-norm block: only the branch inputs are normalised, never the residual stream, so
    gradients reach early layers undiminished (why pre-norm trains deep stacks stably)."""

    def __init__(self, cfg: ModelConfig) -> None:
        super().__init__()
        self.attention_norm = RMSNorm(cfg.d_model, cfg.norm_eps)
        self.attention = Attention(cfg)
        self.ffn_norm = RMSNorm(cfg.d_model, cfg.norm_eps)
        self.feed_forward = FeedForward(cfg)

    def forward(
        self,
        x: torch.Tensor,
        cos: torch.Tensor,
        sin: torch.Tensor,
        cache: tuple[KVCache, int] | None = None,
    ) -> torch.Tensor:
        h = self.attention_norm(x)
        # without a cache, exactly (h, cos, sin): the tensor-parallel plan's PrepareModuleInput
        # lays out those three inputs and no more
        x = x + (
            self.attention(h, cos, sin) if cache is None else self.attention(h, cos, sin, cache)
        )
        return x + self.feed_forward(self.ffn_norm(x))


class GPT(nn.Module):
    """The language model: `forward(input_ids (B, T)) -> logits (B, T, vocab_size)`.

    Build on the meta device and materialise later (FSDP, big models)::

        with torch.device("meta"):
            model = GPT(cfg)
        model.to_empty(device="cpu")
        model.init_weights()  # parameters and the (non-persistent) RoPE tables
    """

    def __init__(self, cfg: ModelConfig, *, n_out: int | None = None) -> None:
        """``n_out``: width of the output layer when it is a task head (e.g. the labels of a
        classifier, pretrain/../finetune) instead of the LM head over the vocabulary."""
        super().__init__()
        if cfg.vocab_size is None:
            raise ConfigurationError(
                "model.vocab_size is not set; it normally comes from the prepared data "
                "(or set `model.vocab_size=N`)"
            )
        self.cfg = cfg
        self.tok_embeddings = nn.Embedding(cfg.vocab_size, cfg.d_model)
        self.layers = nn.ModuleList(Block(cfg) for _ in range(cfg.n_layer))
        self.norm = RMSNorm(cfg.d_model, cfg.norm_eps)
        self.n_out = n_out or cfg.vocab_size
        if n_out is not None and cfg.tie_embeddings:
            raise ConfigurationError(
                "a task head cannot share the embedding table: model.tie_embeddings must be false"
            )
        self.output = nn.Linear(cfg.d_model, self.n_out, bias=False)
        # non-persistent: derived from the config, so they stay out of state_dict (and out of
        # checkpoints and exports); fp32 so long positions keep their precision. Filled by
        # init_weights, which must run again after materialising a meta-device model.
        table = (cfg.max_seq_len, cfg.head_size)
        self.register_buffer("rope_cos", torch.empty(table), persistent=False)  # (T_max, hs)
        self.register_buffer("rope_sin", torch.empty(table), persistent=False)  # (T_max, hs)
        self.init_weights()

    def init_weights(self) -> None:
        """(Re)initialise every parameter and the RoPE tables, deterministically under
        torch's global seed: normal(0, init_std) for embeddings and linears, with the residual
        output projections (`wo`, `w2`) at init_std / sqrt(2 * n_layer) so that the residual
        stream's variance does not grow with depth (GPT-2); norms to one."""
        cfg = self.cfg
        if cfg.tie_embeddings and not self.tied:
            # (re)tie here: Module.to_empty replaces the two references separately, untying them
            self.output.weight = self.tok_embeddings.weight
        device = self.rope_cos.device
        cos, sin = rope_tables(
            cfg.head_size, cfg.max_seq_len, cfg.rope_theta, device=device, scaling=cfg.rope_scaling
        )
        self.rope_cos, self.rope_sin = cos, sin
        std, resid_std = cfg.init_std, cfg.init_std / math.sqrt(2 * cfg.n_layer)
        nn.init.normal_(self.tok_embeddings.weight, mean=0.0, std=std)
        for layer in self.layers:
            attn, ffn = layer.attention, layer.feed_forward
            for linear in (attn.wq, attn.wk, attn.wv, ffn.w1, ffn.w3):
                nn.init.normal_(linear.weight, mean=0.0, std=std)
                if linear.bias is not None:
                    nn.init.zeros_(linear.bias)
            for linear in (attn.wo, ffn.w2):
                nn.init.normal_(linear.weight, mean=0.0, std=resid_std)
            for norm in (layer.attention_norm, layer.ffn_norm, attn.q_norm, attn.k_norm):
                if norm is not None:
                    norm.reset_parameters()
        self.norm.reset_parameters()
        if not cfg.tie_embeddings:
            nn.init.normal_(self.output.weight, mean=0.0, std=std)

    @property
    def tied(self) -> bool:
        return self.output.weight is self.tok_embeddings.weight

    def num_params(self, *, exclude_embedding: bool = False) -> int:
        """Number of parameters; a tied table counts once.

        `exclude_embedding=True` leaves out the input embedding table when it is NOT tied (it is
        a lookup, not a matmul); a tied table is also the LM head, so it is kept. The result is
        then the N of the FLOPs convention: `pretrain.model.flops.param_counts(cfg)["flops_params"]`.
        """
        n = sum(p.numel() for p in self.parameters())  # parameters() yields shared ones once
        if exclude_embedding and not self.tied:
            n -= self.tok_embeddings.weight.numel()
        return n

    def forward(self, input_ids: torch.Tensor, cache: KVCache | None = None) -> torch.Tensor:
        """``cache`` (generation): ``input_ids`` are the positions after the cached ones, either
        a whole prompt into an empty cache or one token at a time."""
        B, T = input_ids.shape
        start = cache.pos if cache is not None else 0
        if start + T > self.cfg.max_seq_len:
            raise ConfigurationError(
                f"sequence length {start + T} exceeds `model.max_seq_len`={self.cfg.max_seq_len}; "
                "shorten the input or raise model.max_seq_len"
            )
        if start and T > 1:
            raise ValueError("with a filled KV cache, feed one token at a time")
        cos, sin = self.rope_cos[start : start + T], self.rope_sin[start : start + T]  # (T, hs)
        h = self.tok_embeddings(input_ids)  # (B, T, d)
        for i, layer in enumerate(self.layers):
            h = layer(h, cos, sin, None if cache is None else (cache, i))  # (B, T, d)
        if cache is not None:
            cache.pos += T
        return self.output(self.norm(h))  # (B, T, n_out): vocab, or labels of a task head

    @torch.no_grad()
    def generate(
        self,
        input_ids: torch.Tensor,
        max_new_tokens: int,
        *,
        temperature: float = 1.0,
        top_k: int | None = None,
        top_p: float | None = None,
        generator: torch.Generator | None = None,
        stop_ids: Sequence[int] = (),
        on_token=None,
    ) -> torch.Tensor:
        """Append `max_new_tokens` sampled tokens to `input_ids` (B, T); returns (B, T + new).

        `stop_ids` (EOS, a chat template's end of turn): stop early once every row has produced
        one of them (rows that finished first keep getting tokens until then).
        `on_token(ids (B,))` sees each new column as it comes (streaming to a terminal).

        temperature 0 is greedy decoding; top_k keeps the k most likely tokens, top_p the
        smallest set whose probability reaches p (nucleus). A KV cache makes each new token one
        token's forward while the text fits in max_seq_len; past it the context window slides
        (the last max_seq_len tokens, at positions 0..max_seq_len-1) and is re-run each step.
        Runs in eval mode (no dropout) and restores the previous mode.
        """
        if temperature < 0 or (top_k is not None and top_k < 1):
            raise ConfigurationError(
                f"need temperature >= 0 and top_k >= 1, got {temperature}, {top_k}"
            )
        if top_p is not None and not 0.0 < top_p <= 1.0:
            raise ConfigurationError(f"top_p must be in (0, 1], got {top_p}")
        was_training = self.training
        self.eval()
        done = None
        stops = torch.tensor(list(stop_ids), dtype=torch.long, device=input_ids.device)
        cache: KVCache | None = None
        try:
            for _ in range(max_new_tokens):
                if input_ids.size(1) > self.cfg.max_seq_len:  # full: slide the window
                    cache = None
                    logits = self(input_ids[:, -self.cfg.max_seq_len :])
                elif cache is None:  # the prompt
                    cache = KVCache(len(self.layers))
                    logits = self(input_ids, cache=cache)
                else:
                    logits = self(input_ids[:, -1:], cache=cache)
                logits = logits[:, -1, :].float()  # (B, vocab)
                if temperature == 0:
                    next_id = logits.argmax(dim=-1, keepdim=True)  # (B, 1)
                else:
                    next_id = self._sample(logits / temperature, top_k, top_p, generator)
                input_ids = torch.cat((input_ids, next_id), dim=1)
                if on_token is not None:
                    on_token(next_id[:, 0])
                if len(stops):
                    hit = torch.isin(next_id[:, 0], stops)
                    done = hit if done is None else done | hit
                    if bool(done.all()):
                        break
        finally:
            self.train(was_training)
        return input_ids

    @staticmethod
    def _sample(
        logits: torch.Tensor,
        top_k: int | None,
        top_p: float | None,
        generator: torch.Generator | None,
    ) -> torch.Tensor:
        if top_k is not None:
            kth = torch.topk(logits, min(top_k, logits.size(-1))).values[:, [-1]]  # (B, 1)
            logits = logits.masked_fill(logits < kth, float("-inf"))
        if top_p is not None and top_p < 1.0:
            sorted_logits, order = torch.sort(logits, dim=-1, descending=True)  # (B, vocab)
            probs = F.softmax(sorted_logits, dim=-1)
            # drop a token when the tokens before it already reach top_p (the first always stays)
            drop = probs.cumsum(dim=-1) - probs >= top_p
            sorted_logits = sorted_logits.masked_fill(drop, float("-inf"))
            logits = torch.full_like(logits, float("-inf")).scatter(-1, order, sorted_logits)
        probs = F.softmax(logits, dim=-1)  # (B, vocab)
        return torch.multinomial(probs, num_samples=1, generator=generator)  # (B, 1)
