"""The decoder-only transformer backbone shared by every training stage.

Attention is softmax(Q K^T / sqrt(d_k)) V computed by
``torch.nn.functional.scaled_dot_product_attention``: with no explicit mask it
takes the fused causal path (flash / memory-efficient kernels on GPU). Masks
are built only when they are needed: document boundaries in packed sequences
(``cross_document_attention=False``), left padding, or a KV cache.

The rotary embedding uses the "rotate half" layout, the one transformers'
LLaMA uses, so weights export to ``LlamaForCausalLM`` without permutation.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Optional

import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.checkpoint import checkpoint

from lmlab.models.config import TransformerConfig
from lmlab.models.cpu_attention import causal_attention_bf16_cpu, wants_bf16_cpu_attention
from lmlab.models.moe import MoEFeedForward, is_moe_layer


def make_norm(config: TransformerConfig, dim: int) -> nn.Module:
    if config.norm_type == "rmsnorm":
        return nn.RMSNorm(dim, eps=config.norm_eps)
    return nn.LayerNorm(dim, eps=config.norm_eps, bias=config.bias)


class RotaryEmbedding(nn.Module):
    """Cos/sin tables for rotary position embedding (Su et al. 2021)."""

    def __init__(self, head_dim: int, max_seq_len: int, theta: float):
        super().__init__()
        inv_freq = 1.0 / (theta ** (torch.arange(0, head_dim, 2, dtype=torch.float64) / head_dim))
        t = torch.arange(max_seq_len, dtype=torch.float64)
        freqs = torch.outer(t, inv_freq)
        emb = torch.cat([freqs, freqs], dim=-1)
        # Not persistent: they are a function of the config, and leaving them out of
        # the state dict keeps checkpoints portable across max_seq_len changes.
        self.register_buffer("cos", emb.cos().float(), persistent=False)
        self.register_buffer("sin", emb.sin().float(), persistent=False)

    def forward(self, position_ids: torch.Tensor, dtype: torch.dtype) -> tuple[torch.Tensor, torch.Tensor]:
        # position_ids: (B, T) -> (B, 1, T, head_dim) broadcast over heads
        cos = self.cos[position_ids].unsqueeze(1).to(dtype)
        sin = self.sin[position_ids].unsqueeze(1).to(dtype)
        return cos, sin


def _rotate_half(x: torch.Tensor) -> torch.Tensor:
    x1, x2 = x.chunk(2, dim=-1)
    return torch.cat((-x2, x1), dim=-1)


def apply_rotary(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    return x * cos + _rotate_half(x) * sin


@dataclass
class KVCache:
    """Preallocated keys and values for incremental decoding.

    ``length`` is the number of positions already written; every sequence of the
    batch shares it (left padding keeps prompts aligned on the right).
    """

    keys: list[torch.Tensor]
    values: list[torch.Tensor]
    length: int = 0

    @classmethod
    def allocate(cls, config: TransformerConfig, batch_size: int, max_len: int, device, dtype) -> "KVCache":
        shape = (batch_size, config.kv_heads, max_len, config.head_dim)
        keys = [torch.zeros(shape, device=device, dtype=dtype) for _ in range(config.n_layers)]
        values = [torch.zeros(shape, device=device, dtype=dtype) for _ in range(config.n_layers)]
        return cls(keys, values, 0)

    @property
    def capacity(self) -> int:
        return self.keys[0].shape[2]


class Attention(nn.Module):
    def __init__(self, config: TransformerConfig):
        super().__init__()
        self.config = config
        self.n_heads = config.n_heads
        self.kv_heads = config.kv_heads
        self.head_dim = config.head_dim
        qkv_out = (config.n_heads + 2 * config.kv_heads) * config.head_dim
        # One fused projection: a single GEMM is faster than three small ones.
        self.qkv = nn.Linear(config.d_model, qkv_out, bias=config.bias)
        self.proj = nn.Linear(config.n_heads * config.head_dim, config.d_model, bias=config.bias)
        self.proj.is_residual_output = True
        if config.qk_norm:
            self.q_norm = nn.RMSNorm(config.head_dim, eps=config.norm_eps)
            self.k_norm = nn.RMSNorm(config.head_dim, eps=config.norm_eps)
        else:
            self.q_norm = self.k_norm = None
        self.dropout = config.dropout
        #: bf16 causal attention on CPU through the matmul backward (set for compiled blocks, where it is fused)
        self.bf16_cpu_attention = False

    def project_qkv(
        self, x: torch.Tensor, rope: Optional[tuple[torch.Tensor, torch.Tensor]]
    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """Queries (B, n_heads, T, head_dim), keys and values (B, kv_heads, T, head_dim), normed and rotated."""
        B, T, _ = x.shape
        q, k, v = self.qkv(x).split(
            [self.n_heads * self.head_dim, self.kv_heads * self.head_dim, self.kv_heads * self.head_dim], dim=-1
        )
        q = q.view(B, T, self.n_heads, self.head_dim).transpose(1, 2)
        k = k.view(B, T, self.kv_heads, self.head_dim).transpose(1, 2)
        v = v.view(B, T, self.kv_heads, self.head_dim).transpose(1, 2)
        if self.q_norm is not None:
            q, k = self.q_norm(q), self.k_norm(k)
        if rope is not None:
            cos, sin = rope
            q, k = apply_rotary(q, cos, sin), apply_rotary(k, cos, sin)
        return q, k, v

    def forward(
        self,
        x: torch.Tensor,
        rope: Optional[tuple[torch.Tensor, torch.Tensor]],
        mask: Optional[torch.Tensor],
        cache: Optional[KVCache] = None,
        layer: int = 0,
    ) -> torch.Tensor:
        B, T, _ = x.shape
        q, k, v = self.project_qkv(x, rope)
        if cache is not None:
            start = cache.length
            cache.keys[layer][:, :, start : start + T] = k
            cache.values[layer][:, :, start : start + T] = v
            k = cache.keys[layer][:, :, : start + T]
            v = cache.values[layer][:, :, : start + T]
        if self.kv_heads != self.n_heads:
            rep = self.n_heads // self.kv_heads
            k = k.repeat_interleave(rep, dim=1)
            v = v.repeat_interleave(rep, dim=1)
        dropout_p = self.dropout if self.training else 0.0
        if self.bf16_cpu_attention and wants_bf16_cpu_attention(q, mask, cache, dropout_p):
            y = causal_attention_bf16_cpu(q, k, v)
        else:
            y = F.scaled_dot_product_attention(
                q, k, v, attn_mask=mask, dropout_p=dropout_p, is_causal=mask is None and cache is None
            )
        y = y.transpose(1, 2).reshape(B, T, self.n_heads * self.head_dim)
        return self.proj(y)


class MLP(nn.Module):
    def __init__(self, config: TransformerConfig):
        super().__init__()
        self.ffn_type = config.ffn_type
        hidden = config.hidden_dim
        if config.ffn_type == "swiglu":
            # gate and up projections fused into one matmul
            self.fc = nn.Linear(config.d_model, 2 * hidden, bias=config.bias)
        else:
            self.fc = nn.Linear(config.d_model, hidden, bias=config.bias)
        self.proj = nn.Linear(hidden, config.d_model, bias=config.bias)
        self.proj.is_residual_output = True

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self.fc(x)
        if self.ffn_type == "swiglu":
            gate, up = h.chunk(2, dim=-1)
            h = F.silu(gate) * up
        else:
            h = F.gelu(h, approximate="tanh")
        return self.proj(h)


def make_ffn(config: TransformerConfig, layer: int) -> nn.Module:
    """The feed-forward of block ``layer``: routed experts where the config places them, else the dense MLP."""
    return MoEFeedForward(config) if is_moe_layer(config, layer) else MLP(config)


class Block(nn.Module):
    """Pre-norm transformer block: x + Attn(Norm(x)), then x + MLP(Norm(x))."""

    def __init__(self, config: TransformerConfig, layer: int = 0):
        super().__init__()
        self.norm1 = make_norm(config, config.d_model)
        self.attn = Attention(config) if config.attention == "full" else _variant_attention(config)
        self.norm2 = make_norm(config, config.d_model)
        self.mlp = make_ffn(config, layer)
        self.drop = nn.Dropout(config.dropout)

    def forward(self, x, rope, mask, cache: Optional[KVCache] = None, layer: int = 0):
        x = x + self.drop(self.attn(self.norm1(x), rope, mask, cache, layer))
        x = x + self.drop(self.mlp(self.norm2(x)))
        return x


def _variant_attention(config: TransformerConfig) -> nn.Module:
    from lmlab.models.attention import build_attention  # it subclasses Attention, so it imports this module

    return build_attention(config)


def positions_from_documents(doc_ids: torch.Tensor) -> torch.Tensor:
    """Position ids that restart at 0 at the first token of each document."""
    B, T = doc_ids.shape
    idx = torch.arange(T, device=doc_ids.device).expand(B, T)
    starts = torch.ones_like(doc_ids, dtype=torch.bool)
    starts[:, 1:] = doc_ids[:, 1:] != doc_ids[:, :-1]
    start_idx = torch.where(starts, idx, torch.zeros_like(idx))
    start_idx = torch.cummax(start_idx, dim=1).values
    return idx - start_idx


def documents_from_eos(input_ids: torch.Tensor, eos_id: int) -> torch.Tensor:
    """Document ids for a packed batch: a new document starts after each EOS token."""
    is_eos = (input_ids == eos_id).long()
    # the EOS belongs to the document it ends
    return torch.cumsum(is_eos, dim=1) - is_eos


def build_attention_mask(
    q_len: int,
    kv_len: int,
    device: torch.device,
    doc_ids: Optional[torch.Tensor] = None,
    key_padding: Optional[torch.Tensor] = None,
) -> torch.Tensor:
    """Boolean mask (B or 1, 1, q_len, kv_len); True where attention is allowed.

    Queries occupy the last ``q_len`` key positions (a KV cache holds the
    earlier ones). Each query may always see itself, so rows that are all
    padding stay finite instead of producing NaN.
    """
    offset = kv_len - q_len
    q_pos = torch.arange(q_len, device=device).unsqueeze(1) + offset
    k_pos = torch.arange(kv_len, device=device).unsqueeze(0)
    mask = (k_pos <= q_pos).unsqueeze(0)  # (1, q, k)
    if doc_ids is not None:
        same = doc_ids[:, -q_len:].unsqueeze(2) == doc_ids.unsqueeze(1)
        mask = mask & same
    if key_padding is not None:
        mask = mask & key_padding.bool()[:, None, :kv_len]
    diag = q_pos == k_pos
    mask = mask | diag.unsqueeze(0)
    return mask.unsqueeze(1)


class Transformer(nn.Module):
    """Token embedding, blocks and the final norm. Returns hidden states.

    Heads live in :mod:`lmlab.models.heads`; every stage shares this module.
    """

    def __init__(self, config: TransformerConfig):
        super().__init__()
        self.config = config
        self.tok_emb = nn.Embedding(config.padded_vocab_size, config.d_model)
        self.pos_emb = nn.Embedding(config.max_seq_len, config.d_model) if config.position == "learned" else None
        self.rotary = (
            RotaryEmbedding(config.head_dim, config.max_seq_len, config.rope_theta) if config.position == "rope" else None
        )
        self.drop = nn.Dropout(config.dropout)
        self.blocks = nn.ModuleList(Block(config, i) for i in range(config.n_layers))
        self.norm = make_norm(config, config.d_model)
        self.activation_checkpointing = config.activation_checkpointing
        # Compiled views of the blocks (regional compilation), kept in a plain list so they add
        # no state-dict keys: checkpoints stay interchangeable between compiled and eager runs.
        self._compiled_blocks: list = []

    def compile_blocks(self, **compile_kwargs) -> None:
        """Compile each block on its own (regional compilation) for the cache-free forward.

        Every block has the same code, so Dynamo traces and Inductor compiles
        one graph and the other blocks reuse it: start-up costs one block's
        compile, not the whole model's. Incremental decoding (a KV cache)
        keeps the eager blocks, whose shapes change every token.
        """
        for block in self.blocks:
            if isinstance(block.attn, Attention) and type(block.attn).forward is Attention.forward:
                block.attn.bf16_cpu_attention = True
        self._compiled_blocks = [torch.compile(block, **compile_kwargs) for block in self.blocks]

    def forward(
        self,
        input_ids: torch.Tensor,
        position_ids: Optional[torch.Tensor] = None,
        doc_ids: Optional[torch.Tensor] = None,
        attention_mask: Optional[torch.Tensor] = None,
        cache: Optional[KVCache] = None,
    ) -> torch.Tensor:
        """Hidden states (B, T, d_model).

        Args:
            input_ids: (B, T) token ids.
            position_ids: (B, T); default counts from 0 (or from the cache
                length), restarting per document when ``doc_ids`` is given.
            doc_ids: (B, T) document index of each token in a packed sequence;
                attention stays inside a document.
            attention_mask: (B, T_total) 1 for real tokens, 0 for padding, over
                the cached plus new positions.
            cache: a :class:`KVCache` to read and extend.
        """
        B, T = input_ids.shape
        start = cache.length if cache is not None else 0
        if T + start > self.config.max_seq_len:
            raise ValueError(f"sequence length {T + start} exceeds max_seq_len={self.config.max_seq_len}")
        if position_ids is None:
            if doc_ids is not None:
                position_ids = positions_from_documents(doc_ids)
            else:
                position_ids = torch.arange(start, start + T, device=input_ids.device).unsqueeze(0).expand(B, T)
        mask = None
        if self.config.attention != "full":
            from lmlab.models.attention import variant_mask

            mask = variant_mask(self.config, T, start, input_ids.device, doc_ids, attention_mask, cache)
        elif doc_ids is not None or attention_mask is not None or (cache is not None and T > 1 and start > 0):
            mask = build_attention_mask(T, start + T, input_ids.device, doc_ids, attention_mask)
        elif cache is not None and T > 1:
            mask = build_attention_mask(T, T, input_ids.device)

        x = self.tok_emb(input_ids)
        if self.pos_emb is not None:
            x = x + self.pos_emb(position_ids)
        x = self.drop(x)
        rope = self.rotary(position_ids, x.dtype) if self.rotary is not None else None
        blocks = self._compiled_blocks if cache is None and self._compiled_blocks else self.blocks
        for i, block in enumerate(blocks):
            if self.activation_checkpointing and self.training and torch.is_grad_enabled():
                x = checkpoint(block, x, rope, mask, cache, i, use_reentrant=False)
            else:
                x = block(x, rope, mask, cache, i)
        if cache is not None:
            cache.length = start + T
        return self.norm(x)


def init_weights(module: nn.Module, config: TransformerConfig) -> None:
    """Normal(0, init_std) for weights, zero biases; residual outputs scaled by 1/sqrt(2L)."""
    resid_std = config.init_std / math.sqrt(2 * config.n_layers) if config.scaled_residual_init else config.init_std
    for m in module.modules():
        if isinstance(m, nn.Linear):
            std = resid_std if getattr(m, "is_residual_output", False) else config.init_std
            nn.init.normal_(m.weight, mean=0.0, std=std)
            if m.bias is not None:
                nn.init.zeros_(m.bias)
        elif isinstance(m, nn.Embedding):
            nn.init.normal_(m.weight, mean=0.0, std=config.init_std)
        elif isinstance(m, (nn.LayerNorm, nn.RMSNorm)):
            if m.weight is not None:
                nn.init.ones_(m.weight)
            if getattr(m, "bias", None) is not None:
                nn.init.zeros_(m.bias)
        elif isinstance(m, MoEFeedForward):
            m.reset_expert_parameters(config.init_std, resid_std)
