"""Cross-entropy fused with the vocabulary projection, in chunks of rows.

For N tokens and a vocabulary of V, the plain path materialises the (N, V)
logits, their fp32 copy, the log-softmax kept for backward and the (N, V)
gradient: with V = 128k and N = 16k tokens that is several GiB for one
micro-batch. :func:`linear_cross_entropy` instead projects ``chunk_rows``
rows at a time, takes each chunk's NLL and, when gradients are needed, its
gradient right away:

    d loss / d logits_i = (softmax(logits_i) - onehot(t_i)) / normaliser

so ``d hidden`` (N, d) and ``d weight`` (V, d) are accumulated in the forward
pass and the backward pass only scales them by the incoming gradient. Only
one chunk of logits lives at a time and no matmul is repeated. The loss is
``sum_i nll_i / normaliser``, the pretraining objective, so the gradient is
exact up to floating-point summation order (the weight gradient is summed
over chunks in fp32).
"""

from __future__ import annotations

from typing import Optional

import torch

#: logits elements per chunk: 2**25 fp32 values are 128 MiB
CHUNK_ELEMENTS = 2**25


def chunk_rows_for(vocab: int, elements: int = CHUNK_ELEMENTS) -> int:
    """Rows per chunk so one chunk's fp32 logits hold about ``elements`` values."""
    return max(1, elements // max(vocab, 1))


class _LinearCrossEntropy(torch.autograd.Function):
    @staticmethod
    def forward(ctx, hidden, weight, targets, normaliser, chunk_rows, compute_dtype, ignore_index):
        need_h, need_w = ctx.needs_input_grad[0], ctx.needs_input_grad[1]
        n = hidden.shape[0]
        device_type = hidden.device.type
        nll = torch.empty(n, dtype=torch.float32, device=hidden.device)
        grad_h = torch.empty(hidden.shape, dtype=compute_dtype, device=hidden.device) if need_h else None
        grad_w = torch.zeros(weight.shape, dtype=torch.float32, device=weight.device) if need_w else None
        inv = 1.0 / normaliser
        # dtypes are chosen here once, as autocast would (the projection in the autocast dtype,
        # the softmax in fp32); autocast inside would only add casts
        with torch.autocast(device_type, enabled=False):
            h = hidden.to(compute_dtype)
            w = weight.to(compute_dtype)
            for start in range(0, n, chunk_rows):
                stop = min(start + chunk_rows, n)
                t = targets[start:stop]
                valid = t != ignore_index
                safe = torch.where(valid, t, torch.zeros_like(t)).unsqueeze(1)
                logits = (h[start:stop] @ w.t()).float()
                lse = torch.logsumexp(logits, dim=-1)
                picked = logits.gather(1, safe).squeeze(1)
                nll[start:stop] = torch.where(valid, lse - picked, torch.zeros_like(lse))
                if not (need_h or need_w):
                    continue
                g = logits.sub_(lse.unsqueeze(1)).exp_()  # softmax, in the logits' memory
                g.scatter_add_(1, safe, -torch.ones_like(safe, dtype=g.dtype))
                g.mul_(valid.unsqueeze(1).to(g.dtype) * inv)
                g = g.to(compute_dtype)
                if need_h:
                    grad_h[start:stop] = g @ w
                if need_w:
                    grad_w += (g.t() @ h[start:stop]).float()
        ctx.save_for_backward(grad_h, grad_w)
        ctx.dtypes = (hidden.dtype, weight.dtype)
        ctx.mark_non_differentiable(nll)
        return nll.sum() / normaliser, nll

    @staticmethod
    def backward(ctx, grad_loss, _grad_nll):
        grad_h, grad_w = ctx.saved_tensors
        h_dtype, w_dtype = ctx.dtypes
        dh = (grad_h * grad_loss).to(h_dtype) if grad_h is not None else None
        dw = (grad_w * grad_loss).to(w_dtype) if grad_w is not None else None
        return dh, dw, None, None, None, None, None


def linear_cross_entropy(
    hidden: torch.Tensor,
    weight: torch.Tensor,
    targets: torch.Tensor,
    normaliser: float = 1.0,
    chunk_rows: Optional[int] = None,
    ignore_index: int = -100,
) -> tuple[torch.Tensor, torch.Tensor]:
    """``(loss, nll)`` of ``hidden @ weight.T`` against ``targets`` without the full logits.

    Args:
        hidden: (..., d) final hidden states.
        weight: (V, d) output projection (the LM head, possibly tied).
        targets: (...) token ids; ``ignore_index`` positions count 0.
        normaliser: the loss is ``nll.sum() / normaliser``.
        chunk_rows: rows projected at a time (default: about 128 MiB of fp32 logits).
        ignore_index: target id that contributes nothing.

    Returns:
        The differentiable scalar loss and the detached per-token NLL (fp32,
        shaped like ``targets``).
    """
    device_type = hidden.device.type
    if torch.is_autocast_enabled(device_type):
        compute_dtype = torch.get_autocast_dtype(device_type)
    else:
        compute_dtype = weight.dtype
    rows = chunk_rows or chunk_rows_for(weight.shape[0])
    loss, nll = _LinearCrossEntropy.apply(
        hidden.reshape(-1, hidden.shape[-1]), weight, targets.reshape(-1), float(normaliser), rows, compute_dtype,
        ignore_index,
    )
    return loss, nll.view(targets.shape)


def token_nll(logits: torch.Tensor, targets: torch.Tensor, ignore_index: int = -100) -> torch.Tensor:
    """Per-token fp32 NLL of (B, T, V) ``logits`` against (B, T) ``targets`` (0 where ``ignore_index``)."""
    # cross_entropy runs in fp32 under autocast anyway; casting here keeps fp32 for bf16-true runs
    nll = torch.nn.functional.cross_entropy(logits.float().flatten(0, 1), targets.flatten(), reduction="none",
                                            ignore_index=ignore_index)
    return nll.view(targets.shape)


def head_nll(hidden: torch.Tensor, weight: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    """Per-token fp32 NLL of ``hidden @ weight.T`` against ``targets`` (the plain path: full logits)."""
    return token_nll(torch.nn.functional.linear(hidden, weight), targets)


_compiled_head_nll = None


def compiled_head_nll(hidden: torch.Tensor, weight: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    """:func:`head_nll` under ``torch.compile``: the same loss, without the logits' extra passes.

    Eager, the loss reads and writes the (N, V) logits several times: the fp32
    copy, log-softmax, the gathered NLL, and in backward a zero-filled gradient,
    the log-softmax gradient and its cast back. Compiled, the casts, the
    log-sum-exp and the NLL become one pass over the logits and the backward
    one more (softmax minus one-hot, written in the logits' dtype), around the
    same two matmuls.
    """
    global _compiled_head_nll
    if _compiled_head_nll is None:
        _compiled_head_nll = torch.compile(head_nll)
    return _compiled_head_nll(hidden, weight, targets)
