"""Linear layers with their weights packed once for MKL's GEMM, for decoding on the CPU.

At serving batch sizes (a few to a few dozen rows) a float32 ``F.linear``
spends about as long packing its weight into MKL's blocked layout as
multiplying with it, and it repacks on every call. :func:`pack_linears`
gives a model's ``nn.Linear`` layers that layout from the start (``torch.ops.mkl._mkl_linear``, the kernel inductor's CPU freezing
uses). A packed weight serves products of exactly the row count it was packed
for (the engine packs for its batch, the row count of every full decode
step); other row counts take the ordinary GEMM, bit-identical to
``F.linear``. The packed product itself equals the unpacked one in the last
bits only where MKL picks the same kernel for both (at 16 and more rows in
our measurements, not for a few rows), so the serving engine packs only its
compiled decode step, whose logits already differ from eager ones in the last
bits. It changes the model in place; the engine packs a :func:`shared_copy`
(every parameter shared with the original), and the packed weights are a
snapshot: pack again after changing the weights.
"""

from __future__ import annotations

import copy

import torch
import torch.nn.functional as F
from torch import nn

__all__ = ["PackedLinear", "can_pack", "pack_linears", "shared_copy"]


def can_pack(model: nn.Module) -> bool:
    """Whether :func:`pack_linears` applies: float32 weights on the CPU and a torch built with MKL."""
    param = next(model.parameters(), None)
    return (param is not None and param.device.type == "cpu" and param.dtype == torch.float32
            and torch.backends.mkl.is_available() and hasattr(torch.ops.mkl, "_mkl_linear"))


class PackedLinear(nn.Module):
    """``nn.Linear`` whose weight is also kept in MKL's packed layout (see the module docstring)."""

    def __init__(self, linear: nn.Linear, rows: int):
        super().__init__()
        self.in_features, self.out_features, self.rows = linear.in_features, linear.out_features, rows
        # the original tensors, shared, not copied: the MKL op multiplies other row counts with the plain weight
        self.weight = linear.weight
        self.bias = linear.bias
        self.register_buffer("packed", torch.ops.mkl._mkl_reorder_linear_weight(linear.weight.detach(), rows),
                             persistent=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if x.dtype != torch.float32 or torch.is_grad_enabled():
            return F.linear(x, self.weight, self.bias)
        # rows flattened: the op's fallback for another row count is then the 2-D GEMM F.linear uses (on a
        # (rows, 1, features) input it would run one matrix-vector product per row)
        out = torch.ops.mkl._mkl_linear(x.reshape(-1, self.in_features), self.packed, self.weight, self.bias, self.rows)
        return out.view(*x.shape[:-1], self.out_features)


def pack_linears(model: nn.Module, rows: int) -> nn.Module:
    """Turn every float32 ``nn.Linear`` of ``model`` into a :class:`PackedLinear` packed for products of
    ``rows`` rows, in place (pass a :func:`shared_copy` to keep the original); nothing changes when
    :func:`can_pack` is False. Returns ``model``."""
    if not can_pack(model):
        return model
    for module in list(model.modules()):
        for name, child in list(module.named_children()):
            if type(child) is nn.Linear and child.weight.dtype == torch.float32:
                setattr(module, name, PackedLinear(child, rows))
    return model


def shared_copy(model: nn.Module) -> nn.Module:
    """A copy of ``model``'s module tree that shares its parameters and buffers (no tensor is copied)."""
    shared = {id(t): t for t in list(model.parameters()) + list(model.buffers())}
    return copy.deepcopy(model, memo=shared)
