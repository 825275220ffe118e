"""Causal attention for bf16 training on CPU: the flash forward, a matmul backward.

PyTorch's CPU flash-attention kernel is fast forward, but its bf16 backward
walks the (T, T) scores in small blocks and takes 4-6x its forward (T = 256).
For short sequences the whole score matrix of one head fits in cache, so the
backward is cheaper as five batched matmuls around one elementwise pass,
which Inductor fuses when the block is compiled:

    P = exp(Q K^T * s - lse)             (lse saved by the flash forward)
    dV = P^T dO,  dP = dO V^T,  dS = P * (dP - rowsum(dO * O)) * s
    dQ = dS K,    dK = dS^T Q

The gradients are those of the same attention, rounded differently (P and
dS in bf16 for the matmuls, as the flash kernel rounds its blocks). The
backward holds (B, H, T, T) scores, so longer sequences (above
``MAX_SEQ_LEN``, not measured to pay) keep the flash backward.
"""

from __future__ import annotations

import torch

#: longest sequence that takes the matmul backward: its (T, T) scores per head stay small
MAX_SEQ_LEN = 512


class _CausalAttention(torch.autograd.Function):
    @staticmethod
    def forward(ctx, q, k, v, scale: float):
        out, lse = torch.ops.aten._scaled_dot_product_flash_attention_for_cpu(q, k, v, 0.0, True, scale=scale)[:2]
        ctx.save_for_backward(q, k, v, out, lse)
        ctx.scale = scale
        return out

    @staticmethod
    def backward(ctx, grad_out):
        q, k, v, out, lse = ctx.saved_tensors
        t_q, t_k = q.shape[-2], k.shape[-2]
        future = torch.ones(t_q, t_k, dtype=torch.bool, device=q.device).triu(1)
        scores = (q @ k.transpose(-2, -1)).float() * ctx.scale
        # P is kept in bf16 only: it feeds dV's matmul anyway, and an fp32 copy for dS would be
        # one more (B, H, T, T) buffer written and read back across the matmuls
        p = torch.exp(scores - lse.unsqueeze(-1)).masked_fill(future, 0.0).to(q.dtype)
        dv = p.transpose(-2, -1) @ grad_out
        dp = (grad_out @ v.transpose(-2, -1)).float()
        delta = (grad_out.float() * out.float()).sum(-1, keepdim=True)
        ds = (p.float() * (dp - delta) * ctx.scale).to(q.dtype)
        return ds @ k, ds.transpose(-2, -1) @ q, dv, None


def causal_attention_bf16_cpu(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
    """``scaled_dot_product_attention(q, k, v, is_causal=True)`` in bf16 on CPU, with the matmul backward.

    ``q``, ``k``, ``v``: (B, H, T, head_dim), same number of heads; cast to
    bf16 here (autocast does not reach into a custom function).
    """
    dt = torch.bfloat16
    return _CausalAttention.apply(q.to(dt), k.to(dt), v.to(dt), q.shape[-1] ** -0.5)


def wants_bf16_cpu_attention(q: torch.Tensor, mask, cache, dropout_p: float) -> bool:
    """Whether :func:`causal_attention_bf16_cpu` applies: plain causal, no dropout, bf16 (or bf16 autocast) on CPU."""
    if mask is not None or cache is not None or dropout_p > 0 or q.device.type != "cpu":
        return False
    if q.shape[-2] > MAX_SEQ_LEN:
        return False
    if q.dtype == torch.bfloat16:
        return True
    return torch.is_autocast_enabled("cpu") and torch.get_autocast_dtype("cpu") == torch.bfloat16
