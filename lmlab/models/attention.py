"""Efficient attention variants of the backbone, chosen by ``TransformerConfig.attention``.

``sliding_window`` (local softmax attention, Beltagy et al. 2020; Jiang et al. 2023, Mistral 7B)
    Query ``i`` attends to key ``j`` when ``i - W < j <= i`` (W = ``sliding_window``): itself and
    the ``W - 1`` tokens before it. This is transformers' Mistral mask exactly
    (``kv_idx > q_idx - sliding_window`` on top of the causal mask), so such a model exports to
    ``MistralForCausalLM``. The window composes with document masks (``doc_ids``), left padding
    and grouped-query attention. Training sequences longer than W are computed block-locally:
    queries are cut into blocks of W, each attending to its own block and the one before, so
    time and memory grow as T * W instead of T^2. Generation keeps a ring buffer of W keys
    and values per layer (:class:`RingKVCache`), constant in the generated length; with the
    ordinary :class:`~lmlab.models.transformer.KVCache` (the serving engine) the window is
    applied in the mask instead.

``linear`` (gated linear attention with a scalar per-head forget gate; Yang et al. 2024,
"Gated Linear Attention Transformers with Hardware-Efficient Training", in the scalar-gate
form also used by RetNet/Mamba-2)
    With ``q_t, k_t`` (scaled by 1/sqrt(head_dim)) and ``v_t`` per head and a gate
    ``g_t = sigmoid(w_g . x_t + b_g) ** (1/16)`` in (0, 1)::

        S_t = g_t S_{t-1} + k_t^T v_t        (a head_dim x head_dim state)
        o_t = RMSNorm(q_t S_t)

    equivalently ``o_t = sum_{s<=t} (prod_{r=s+1..t} g_r) (q_t . k_s) v_s``, i.e. softmax replaced
    by a data-dependent decay. Training uses the chunked parallel form (chunks of
    ``linear_chunk_size`` tokens: the decay-weighted ``q k^T`` inside a chunk, plus the state
    carried between chunks), linear in T; generation uses the recurrent form with one
    state per layer (:class:`LinearStateCache`). Documents reset the state; padding tokens
    contribute nothing. There is no transformers class for this layer, so it exports only
    in lmlab's own layout. Attention-weight dropout does not apply to it.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal, Optional

import torch
import torch.nn.functional as F
from torch import nn

from lmlab.models.config import TransformerConfig
from lmlab.models.transformer import Attention, KVCache, build_attention_mask

# GLA's gate normaliser: log g = logsigmoid(.) / 16 keeps the initial decay near 0.96 per token
GATE_NORMALIZER = 16.0


# --- caches ------------------------------------------------------------------------------------


@dataclass
class RingKVCache:
    """Keys and values of the last ``capacity`` positions per layer; position p lives in slot p % capacity."""

    keys: list[torch.Tensor]
    values: list[torch.Tensor]
    length: int = 0

    @classmethod
    def allocate(cls, config: TransformerConfig, batch_size: int, max_len: int, device, dtype) -> "RingKVCache":
        # the same per-layer buffers as a full cache, only window-long
        full = KVCache.allocate(config, batch_size, min(config.sliding_window, max_len), device, dtype)
        return cls(full.keys, full.values, 0)

    @property
    def capacity(self) -> int:
        return self.keys[0].shape[2]

    def slot_positions(self, device) -> torch.Tensor:
        """Absolute position held by each slot before the current step (negative: never written)."""
        last = self.length - 1
        return last - torch.remainder(last - torch.arange(self.capacity, device=device), self.capacity)

    def write(self, layer: int, k: torch.Tensor, v: torch.Tensor) -> None:
        T = k.shape[2]
        n = min(T, self.capacity)
        slots = torch.arange(self.length + T - n, self.length + T, device=k.device) % self.capacity
        self.keys[layer][:, :, slots] = k[:, :, T - n :]
        self.values[layer][:, :, slots] = v[:, :, T - n :]


@dataclass
class LinearStateCache:
    """The recurrent state of every linear-attention layer: (B, n_heads, head_dim, head_dim) in fp32."""

    states: list[torch.Tensor]
    length: int = 0

    @classmethod
    def allocate(cls, config: TransformerConfig, batch_size: int, max_len: int, device, dtype) -> "LinearStateCache":
        shape = (batch_size, config.n_heads, config.head_dim, config.head_dim)
        return cls([torch.zeros(shape, device=device, dtype=torch.float32) for _ in range(config.n_layers)], 0)


def allocate_cache(config: TransformerConfig, batch_size: int, max_len: int, device, dtype):
    """The generation cache of ``config.attention``: a KV cache, a KV ring buffer, or recurrent states."""
    if config.attention == "sliding_window":
        return RingKVCache.allocate(config, batch_size, max_len, device, dtype)
    if config.attention == "linear":
        return LinearStateCache.allocate(config, batch_size, max_len, device, dtype)
    return KVCache.allocate(config, batch_size, max_len, device, dtype)


# --- masks -------------------------------------------------------------------------------------


@dataclass
class VariantMask:
    """What a variant layer needs to mask one forward (built once per forward by :func:`variant_mask`).

    ``mode``: ``dense`` (``dense`` holds the full boolean mask, or None for the fused causal
    kernel), ``blocked`` (block-local sliding window over a long sequence), ``ring`` (decode
    against a :class:`RingKVCache`) or ``linear``.
    """

    mode: Literal["dense", "blocked", "ring", "linear"]
    start: int
    window: Optional[int] = None
    dense: Optional[torch.Tensor] = None
    doc_ids: Optional[torch.Tensor] = None
    key_padding: Optional[torch.Tensor] = None  # (B, start + T): 1 for real tokens


def window_band(q_len: int, kv_len: int, window: int, device) -> torch.Tensor:
    """(q_len, kv_len) True where ``0 <= q - k < window``; queries are the last q_len key positions."""
    q_pos = torch.arange(q_len, device=device).unsqueeze(1) + (kv_len - q_len)
    k_pos = torch.arange(kv_len, device=device).unsqueeze(0)
    return (k_pos <= q_pos) & (q_pos - k_pos < window)


def variant_mask(config: TransformerConfig, T: int, start: int, device, doc_ids, attention_mask, cache) -> VariantMask:
    """The :class:`VariantMask` of one forward of a sliding-window or linear model."""
    if config.attention == "linear":
        pad = attention_mask[:, start : start + T] if attention_mask is not None else None
        return VariantMask("linear", start, doc_ids=doc_ids, key_padding=pad)
    W = config.sliding_window
    if isinstance(cache, RingKVCache) and start > 0:
        return VariantMask("ring", start, W, key_padding=attention_mask)
    if isinstance(cache, KVCache):
        # the serving engine's full-length cache: the window goes into the mask
        mask = build_attention_mask(T, start + T, device, doc_ids, attention_mask)
        mask = mask & window_band(T, start + T, W, device)
        return VariantMask("dense", start, W, dense=mask)
    if T > W:
        return VariantMask("blocked", start, W, doc_ids=doc_ids, key_padding=attention_mask)
    # the whole sequence fits in the window: plain causal attention (fused kernel when nothing is masked)
    dense = None
    if doc_ids is not None or attention_mask is not None:
        dense = build_attention_mask(T, T, device, doc_ids, attention_mask)
    return VariantMask("dense", start, W, dense=dense)


# --- sliding window ----------------------------------------------------------------------------


def repeat_kv(x: torch.Tensor, n_heads: int) -> torch.Tensor:
    rep = n_heads // x.shape[1]
    return x if rep == 1 else x.repeat_interleave(rep, dim=1)


def local_attention(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    window: int,
    doc_ids: Optional[torch.Tensor] = None,
    key_padding: Optional[torch.Tensor] = None,
    dropout_p: float = 0.0,
) -> torch.Tensor:
    """Sliding-window attention in blocks of ``window`` queries over (B, H, T, D) q, k, v (same head count).

    Block i attends to the keys of blocks i-1 and i, which contain every key of its queries'
    windows, so scores take O(T * window) memory.
    """
    B, H, T, D = q.shape
    W = window
    nb = -(-T // W)
    pad = nb * W - T
    if pad:
        q, k, v = (F.pad(t, (0, 0, 0, pad)) for t in (q, k, v))
    qb = q.view(B, H, nb, W, D)

    def with_previous(t: torch.Tensor) -> torch.Tensor:
        blocks = t.view(B, H, nb, W, D)
        prev = torch.cat([torch.zeros_like(blocks[:, :, :1]), blocks[:, :, :-1]], dim=2)
        return torch.cat([prev, blocks], dim=3)  # (B, H, nb, 2W, D)

    kb, vb = with_previous(k), with_previous(v)
    device = q.device
    q_pos = torch.arange(nb * W, device=device).view(nb, W)
    k_pos = (torch.arange(nb, device=device) * W - W).unsqueeze(1) + torch.arange(2 * W, device=device)
    diff = q_pos.unsqueeze(2) - k_pos.unsqueeze(1)  # (nb, W, 2W)
    allowed = ((diff >= 0) & (diff < W) & (k_pos >= 0).unsqueeze(1)).unsqueeze(0)  # (1, nb, W, 2W)
    k_idx = k_pos.clamp(min=0).flatten()
    if doc_ids is not None:
        docs = F.pad(doc_ids, (0, pad), value=-1)
        same = docs.view(B, nb, W).unsqueeze(3) == docs[:, k_idx].view(B, nb, 1, 2 * W)
        allowed = allowed & same
    if key_padding is not None:
        keys_ok = F.pad(key_padding[:, :T].bool(), (0, pad), value=False)
        allowed = allowed & keys_ok[:, k_idx].view(B, nb, 1, 2 * W)
    allowed = allowed | (diff == 0).unsqueeze(0)  # a query always sees itself (all-padding rows stay finite)
    # SDPA's kernels take 4-D inputs: fold the blocks into the batch
    fold = lambda t: t.transpose(1, 2).reshape(B * nb, H, t.shape[3], D)  # noqa: E731
    mask = allowed.expand(B, nb, W, 2 * W).reshape(B * nb, 1, W, 2 * W)
    y = F.scaled_dot_product_attention(fold(qb), fold(kb), fold(vb), attn_mask=mask, dropout_p=dropout_p)
    y = y.view(B, nb, H, W, D).transpose(1, 2).reshape(B, H, nb * W, D)
    return y[:, :, :T]


class SlidingWindowAttention(Attention):
    """Softmax attention over the last ``sliding_window`` positions (see the module docstring).

    Same parameters as :class:`~lmlab.models.transformer.Attention`, so weights move between
    full and sliding-window models unchanged.
    """

    def __init__(self, config: TransformerConfig):
        super().__init__(config)
        self.window = config.sliding_window

    def forward(self, x, rope, mask: VariantMask, cache=None, layer: int = 0) -> torch.Tensor:
        if mask.mode == "dense" and not isinstance(cache, RingKVCache):
            return super().forward(x, rope, mask.dense, cache, layer)
        B, T, _ = x.shape
        q, k, v = self.project_qkv(x, rope)
        dropout = self.dropout if self.training else 0.0
        if mask.mode == "ring":
            y = self._attend_ring(q, k, v, mask, cache, layer)
        else:
            kr, vr = repeat_kv(k, self.n_heads), repeat_kv(v, self.n_heads)
            if mask.mode == "blocked":
                y = local_attention(q, kr, vr, self.window, mask.doc_ids, mask.key_padding, dropout)
            else:
                y = F.scaled_dot_product_attention(q, kr, vr, attn_mask=mask.dense, dropout_p=dropout,
                                                   is_causal=mask.dense is None)
            if cache is not None:  # a prefill into an empty ring
                cache.write(layer, k, v)
        y = y.transpose(1, 2).reshape(B, T, self.n_heads * self.head_dim)
        return self.proj(y)

    def _attend_ring(self, q, k, v, mask: VariantMask, cache: RingKVCache, layer: int) -> torch.Tensor:
        T, start, device = q.shape[2], mask.start, q.device
        k_pos = torch.cat([cache.slot_positions(device), torch.arange(start, start + T, device=device)])
        q_pos = torch.arange(start, start + T, device=device)
        diff = q_pos.unsqueeze(1) - k_pos.unsqueeze(0)
        allowed = ((k_pos >= 0).unsqueeze(0) & (diff >= 0) & (diff < self.window)).unsqueeze(0)
        if mask.key_padding is not None:
            allowed = allowed & mask.key_padding.bool()[:, k_pos.clamp(min=0)].unsqueeze(1)
        allowed = (allowed | (diff == 0).unsqueeze(0)).unsqueeze(1)
        keys = torch.cat([cache.keys[layer], k], dim=2)
        values = torch.cat([cache.values[layer], v], dim=2)
        cache.write(layer, k, v)
        return F.scaled_dot_product_attention(
            q, repeat_kv(keys, self.n_heads), repeat_kv(values, self.n_heads), attn_mask=allowed
        )


# --- gated linear attention --------------------------------------------------------------------


def linear_attention_recurrent(
    q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, log_g: torch.Tensor, state: Optional[torch.Tensor] = None
) -> tuple[torch.Tensor, torch.Tensor]:
    """Token-by-token form: S_t = g_t S_{t-1} + k_t^T v_t, o_t = q_t S_t. Returns (o, final S).

    q, k: (B, H, T, D); v: (B, H, T, Dv); log_g: (B, H, T); state: (B, H, D, Dv).
    """
    B, H, T, D = q.shape
    S = state if state is not None else q.new_zeros(B, H, D, v.shape[-1])
    out = []
    for t in range(T):
        S = log_g[:, :, t, None, None].exp() * S + k[:, :, t, :, None] * v[:, :, t, None, :]
        out.append(torch.einsum("bhd,bhde->bhe", q[:, :, t], S))
    return torch.stack(out, dim=2), S


def linear_attention_chunked(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    log_g: torch.Tensor,
    chunk: int,
    state: Optional[torch.Tensor] = None,
    segments: Optional[torch.Tensor] = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """The same function as :func:`linear_attention_recurrent`, computed chunk-parallel.

    Inside a chunk with cumulative log-gates b: o_i = sum_{j<=i} e^{b_i - b_j} (q_i.k_j) v_j
    + e^{b_i} q_i S_prev; the state leaving it is e^{b_C} S_prev + sum_j e^{b_C - b_j} k_j^T v_j.
    ``segments`` (B, T), e.g. document ids, zeroes every term that crosses a segment change.
    """
    B, H, T, D = q.shape
    Dv = v.shape[-1]
    C = min(chunk, T)
    n = -(-T // C)
    pad = n * C - T
    if pad:
        q, k, v = (F.pad(t, (0, 0, 0, pad)) for t in (q, k, v))
        log_g = F.pad(log_g, (0, pad))
        if segments is not None:
            segments = torch.cat([segments, segments[:, -1:].expand(B, pad)], dim=1)
    q, k, v = q.view(B, H, n, C, D), k.view(B, H, n, C, D), v.view(B, H, n, C, Dv)
    b = log_g.view(B, H, n, C).cumsum(-1)
    b_end = b[..., -1]
    allowed = torch.ones(C, C, dtype=torch.bool, device=q.device).tril()
    into = torch.ones_like(b, dtype=torch.bool)  # token i reads the state entering its chunk
    out_of = torch.ones_like(b, dtype=torch.bool)  # token j writes into the state leaving its chunk
    carry = b_end.exp()
    if segments is not None:
        seg = segments.view(B, 1, n, C)
        prev = torch.cat([seg[..., :1, :1], seg[:, :, :-1, -1:]], dim=2)  # segment before each chunk
        allowed = allowed & (seg.unsqueeze(-1) == seg.unsqueeze(-2))
        into = (seg == prev).expand_as(b)
        out_of = (seg == seg[..., -1:]).expand_as(b)
        carry = carry * (seg[..., -1] == prev[..., 0])
    decay = (b.unsqueeze(-1) - b.unsqueeze(-2)).masked_fill(~allowed, float("-inf")).exp()
    o = ((q @ k.transpose(-1, -2)) * decay) @ v
    w = (b_end.unsqueeze(-1) - b).exp() * out_of
    U = (k * w.unsqueeze(-1)).transpose(-1, -2) @ v  # (B, H, n, D, Dv)
    S = state if state is not None else q.new_zeros(B, H, D, Dv)
    entering = []
    # unbind once: indexing U[:, :, i] per chunk would make the backward quadratic in the chunk count
    for carry_i, U_i in zip(carry.unbind(2), U.unbind(2)):
        entering.append(S)
        S = carry_i[..., None, None] * S + U_i
    o = o + (q * (b.exp() * into).unsqueeze(-1)) @ torch.stack(entering, dim=2)
    return o.reshape(B, H, n * C, Dv)[:, :, :T], S


class LinearAttention(Attention):
    """Gated linear attention (see the module docstring): the q/k/v/output projections of
    :class:`~lmlab.models.transformer.Attention` plus a per-head gate and an output RMSNorm."""

    def __init__(self, config: TransformerConfig):
        super().__init__(config)
        self.gate = nn.Linear(config.d_model, config.n_heads, bias=True)
        self.out_norm = nn.RMSNorm(config.head_dim, eps=config.norm_eps)
        self.chunk = config.linear_chunk_size

    def forward(self, x, rope, mask: VariantMask, cache: Optional[LinearStateCache] = None, layer: int = 0):
        B, T, _ = x.shape
        q, k, v = self.project_qkv(x, rope)
        k, v = repeat_kv(k, self.n_heads), repeat_kv(v, self.n_heads)
        dtype = q.dtype
        # fp32 for the decays and the state, whatever the autocast dtype
        q, k, v = q.float() * self.head_dim**-0.5, k.float(), v.float()
        if mask.key_padding is not None:
            k = k * mask.key_padding[:, None, :, None].to(k.dtype)
        log_g = F.logsigmoid(self.gate(x).float()).transpose(1, 2) / GATE_NORMALIZER
        state = cache.states[layer] if cache is not None and mask.start > 0 else None
        with torch.autocast(x.device.type, enabled=False):  # keep the decays and states in fp32 under autocast
            if T == 1 and state is not None:
                y, state = linear_attention_recurrent(q, k, v, log_g, state)
            else:
                y, state = linear_attention_chunked(q, k, v, log_g, self.chunk, state, mask.doc_ids)
        if cache is not None:
            cache.states[layer] = state
        y = self.out_norm(y.to(dtype))
        y = y.transpose(1, 2).reshape(B, T, self.n_heads * self.head_dim)
        return self.proj(y)


def build_attention(config: TransformerConfig) -> nn.Module:
    """The attention layer of ``config.attention`` (``full`` is :class:`~lmlab.models.transformer.Attention`)."""
    if config.attention == "sliding_window":
        return SlidingWindowAttention(config)
    if config.attention == "linear":
        return LinearAttention(config)
    return Attention(config)


__all__ = [
    "RingKVCache", "LinearStateCache", "allocate_cache", "VariantMask", "variant_mask", "local_attention",
    "SlidingWindowAttention", "LinearAttention", "linear_attention_recurrent", "linear_attention_chunked",
    "build_attention",
]
