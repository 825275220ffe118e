"""One-token attention written as reductions, for the compiled decode step of the serving engine.

``F.scaled_dot_product_attention`` on the CPU runs one small matrix product
per row and head for a single query; inductor cannot fuse into it. Written as
a multiply-and-sum over the key axis, the scores, the mask, the softmax and
the weighted sum of values become a couple of fused loops that read each
cached key and value once. Outside a one-token step with a cache (prefill,
training) the layer is the ordinary :class:`~lmlab.models.transformer.Attention`.
"""

from __future__ import annotations

import math
from typing import Optional

import torch
from torch import nn

from lmlab.models.transformer import Attention, KVCache

__all__ = ["ReductionDecodeAttention", "use_reduction_decode_attention"]


class ReductionDecodeAttention(Attention):
    """:class:`Attention` whose one-token cached step is written as reductions (see the module docstring)."""

    def forward(self, x: torch.Tensor, rope, mask: Optional[torch.Tensor], cache: Optional[KVCache] = None,
                layer: int = 0) -> torch.Tensor:
        B, T, _ = x.shape
        if cache is None or T != 1 or self.training:
            return super().forward(x, rope, mask, cache, layer)
        q, k, v = self.project_qkv(x, rope)  # (B, heads, 1, head_dim)
        start = cache.length
        cache.keys[layer][:, :, start : start + 1] = k
        cache.values[layer][:, :, start : start + 1] = v
        keys = cache.keys[layer][:, :, : start + 1]
        values = cache.values[layer][:, :, : start + 1]
        rep = self.n_heads // self.kv_heads
        # queries of one kv head side by side: (B, kv_heads, rep, 1, head_dim) against (B, kv_heads, 1, L, head_dim)
        q = q.view(B, self.kv_heads, rep, 1, self.head_dim)
        scores = (q * keys[:, :, None]).sum(-1) * (1.0 / math.sqrt(self.head_dim))  # (B, kv, rep, L)
        if mask is not None:  # (B or 1, 1, 1, L), True where allowed
            scores = scores.masked_fill(~mask[:, :, None, 0, :], float("-inf"))
        weights = scores.softmax(-1)
        y = (weights[..., None] * values[:, :, None]).sum(-2)  # (B, kv, rep, head_dim)
        return self.proj(y.reshape(B, 1, self.n_heads * self.head_dim))


def use_reduction_decode_attention(model: nn.Module) -> nn.Module:
    """Turn every plain :class:`Attention` layer of ``model`` (in place: pass a copy) into a
    :class:`ReductionDecodeAttention`; other attention variants stay as they are."""
    for module in model.modules():
        if type(module) is Attention:
            module.__class__ = ReductionDecodeAttention
    return model
