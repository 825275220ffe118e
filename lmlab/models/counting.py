"""Parameter and FLOP counts: the one definition every part of lmlab uses.

Parameter counts are exact (they equal ``sum(p.numel())`` over the unique
parameters of the built model). ``non_embedding`` is Kaplan et al.'s N: every
parameter except the vocabulary matrices (token embedding, untied output
projection) and learned position embeddings. FLOP counts use
``non_embedding + d_model * vocab`` because the unembedding is a matmul that
costs compute every token even when it is tied to the embedding.

Mixture-of-experts models (``moe_experts > 0``) have two counts: ``total``
and ``non_embedding`` hold every expert (what memory and checkpoints hold),
``active`` and ``active_non_embedding`` only the router, the top-k routed
experts and the shared experts a token passes through. FLOPs per token use
the active count (each token multiplies only by the weights it is routed to),
and so does ``N`` in run summaries and scaling fits (docs/scaling.md); for a
dense model both counts are equal.

Training FLOPs per token follow three named conventions:

- ``"6n"``: C = 6 N D with N the matmul parameters (:func:`matmul_params`), attention ignored (Kaplan
  et al. 2020's simplification; GPT-3's 3,640 PF-days for 175B use it).
- ``"kaplan"``: 6 N + 6 * n_layers * seq_len * d_attn (Kaplan et al. 2020,
  Table 1: forward 2 N + 2 n_layer n_ctx d_attn, backward twice the forward).
- ``"palm"`` (default): 6 N + 12 * n_layers * n_heads * head_dim * seq_len
  (Chowdhery et al. 2022, Appendix B), the convention behind MFU numbers.

For sliding-window and linear attention the sequence length in the attention
term becomes :func:`attention_span` (the window, or the chunk plus head_dim).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

from lmlab.models.config import TransformerConfig

FlopConvention = Literal["6n", "kaplan", "palm"]


@dataclass(frozen=True)
class ParamCounts:
    total: int
    non_embedding: int
    embedding: int
    per_block: int
    #: parameters one token passes through (router, top-k experts, shared experts); = total when dense
    active: int = -1
    active_non_embedding: int = -1

    def __post_init__(self) -> None:
        if self.active < 0:
            object.__setattr__(self, "active", self.total)
        if self.active_non_embedding < 0:
            object.__setattr__(self, "active_non_embedding", self.non_embedding)


def _norm_params(config: TransformerConfig, dim: int) -> int:
    if config.norm_type == "layernorm" and config.bias:
        return 2 * dim
    return dim


def moe_ffn_params(config: TransformerConfig) -> tuple[int, int]:
    """(all, active) parameters of one mixture-of-experts feed-forward (see :mod:`lmlab.models.moe`)."""
    d, E, k, h = config.d_model, config.moe_experts, config.moe_top_k, config.expert_hidden_dim
    router, expert = E * d, 3 * d * h
    shared = 3 * d * config.moe_shared_experts * h + d if config.moe_shared_experts else 0
    return router + E * expert + shared, router + k * expert + shared


def count_params(config: TransformerConfig) -> ParamCounts:
    """Exact parameter counts of :class:`~lmlab.models.heads.CausalLM` for ``config``.

    ``per_block`` is a dense block; expert blocks replace its MLP by :func:`moe_ffn_params`.
    """
    from lmlab.models.moe import moe_layers

    d, b = config.d_model, int(config.bias)
    hd = config.head_dim
    qkv_out = (config.n_heads + 2 * config.kv_heads) * hd
    attn = d * qkv_out + b * qkv_out + config.n_heads * hd * d + b * d
    if config.qk_norm:
        attn += 2 * hd
    if config.attention == "linear":  # per-head gate (weight and bias) and the output RMSNorm
        attn += d * config.n_heads + config.n_heads + hd
    h = config.hidden_dim
    fc_out = 2 * h if config.ffn_type == "swiglu" else h
    mlp = d * fc_out + b * fc_out + h * d + b * d
    block = attn + mlp + 2 * _norm_params(config, d)
    V = config.padded_vocab_size
    tok = V * d
    pos = config.max_seq_len * d if config.position == "learned" else 0
    head = 0 if config.tie_embeddings else V * d
    final_norm = _norm_params(config, d)
    n_moe = len(moe_layers(config))
    moe_all, moe_active = moe_ffn_params(config) if n_moe else (0, 0)
    blocks = config.n_layers * block + n_moe * (moe_all - mlp)
    active_blocks = config.n_layers * block + n_moe * (moe_active - mlp)
    total = tok + pos + blocks + final_norm + head
    non_embedding = blocks + final_norm
    return ParamCounts(total=total, non_embedding=non_embedding, embedding=total - non_embedding, per_block=block,
                       active=total - non_embedding + active_blocks + final_norm,
                       active_non_embedding=active_blocks + final_norm)


def matmul_params(config: TransformerConfig) -> int:
    """Parameters that take part in a matmul per token: active N plus the unembedding."""
    return count_params(config).active_non_embedding + config.padded_vocab_size * config.d_model


def flops_per_token(config: TransformerConfig, seq_len: int | None = None, convention: FlopConvention = "palm") -> float:
    """Training (forward + backward) FLOPs per token under ``convention``."""
    T = seq_len or config.max_seq_len
    base = 6.0 * matmul_params(config)
    d_attn = config.n_heads * config.head_dim
    if convention == "6n":
        return base
    T = attention_span(config, T)
    if convention == "kaplan":
        return base + 6.0 * config.n_layers * T * d_attn
    if convention == "palm":
        return base + 12.0 * config.n_layers * T * d_attn
    raise ValueError(f"unknown FLOP convention {convention!r}; use '6n', 'kaplan' or 'palm'")


def attention_span(config: TransformerConfig, seq_len: int) -> int:
    """Keys one query's attention matmuls cover: the T in the FLOP formulas above.

    Full attention: ``seq_len``. Sliding window: ``min(seq_len, sliding_window)``. Linear
    attention: the chunk (the decayed q.k inside it) plus ``head_dim`` (reading and updating
    the head_dim x head_dim state per token costs as much as head_dim more keys).
    """
    if config.attention == "sliding_window":
        return min(seq_len, config.sliding_window)
    if config.attention == "linear":
        return min(seq_len, config.linear_chunk_size) + config.head_dim
    return seq_len


def training_flops(
    config: TransformerConfig, tokens: float, seq_len: int | None = None, convention: FlopConvention = "palm"
) -> float:
    """Total training FLOPs for ``tokens`` tokens."""
    return flops_per_token(config, seq_len, convention) * float(tokens)
