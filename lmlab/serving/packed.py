"""Linear layers with their weights packed once for MKL's GEMM, for decoding on the CPU.

At serving batch sizes (a few to a few dozen rows) a float32 ``F.linear``
spends about as long packing its weight into MKL's blocked layout as
multiplying with it, and it repacks on every call. :func:`pack_linears`
returns a copy of a model whose ``nn.Linear`` layers hold that layout from
the start (``torch.ops.mkl._mkl_linear``, the kernel inductor's CPU freezing
uses). MKL computes the packed product with the same kernels as the unpacked
one, so the outputs are bit-identical to the original model's (the serving
tests compare them); the copy shares every parameter with the original, and
the packed weights are a snapshot: pack again after changing the weights.
"""

from __future__ import annotations

import copy

import torch
import torch.nn.functional as F
from torch import nn

__all__ = ["PackedLinear", "can_pack", "pack_linears", "shared_copy"]

# the row count MKL packs for; the packed layout serves any number of rows
_PACK_ROWS = 16


def can_pack(model: nn.Module) -> bool:
    """Whether :func:`pack_linears` applies: float32 weights on the CPU and a torch built with MKL."""
    param = next(model.parameters(), None)
    return (param is not None and param.device.type == "cpu" and param.dtype == torch.float32
            and torch.backends.mkl.is_available() and hasattr(torch.ops.mkl, "_mkl_linear"))


class PackedLinear(nn.Module):
    """``nn.Linear`` whose weight is also kept in MKL's packed layout (see the module docstring)."""

    def __init__(self, linear: nn.Linear):
        super().__init__()
        self.in_features, self.out_features = linear.in_features, linear.out_features
        # the original tensors, shared, not copied: the MKL op also reads the plain weight (for its shape)
        self.weight = linear.weight
        self.bias = linear.bias
        self.register_buffer("packed", torch.ops.mkl._mkl_reorder_linear_weight(linear.weight.detach(), _PACK_ROWS),
                             persistent=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if x.dtype != torch.float32 or torch.is_grad_enabled():
            return F.linear(x, self.weight, self.bias)
        return torch.ops.mkl._mkl_linear(x, self.packed, self.weight, self.bias, _PACK_ROWS)


def pack_linears(model: nn.Module) -> nn.Module:
    """A copy of ``model`` sharing its parameters, with every float32 ``nn.Linear`` a :class:`PackedLinear`
    (``model`` itself is unchanged); ``model`` when :func:`can_pack` is False."""
    if not can_pack(model):
        return model
    packed = shared_copy(model)
    for module in list(packed.modules()):
        for name, child in list(module.named_children()):
            if type(child) is nn.Linear and child.weight.dtype == torch.float32:
                setattr(module, name, PackedLinear(child))
    return packed


def shared_copy(model: nn.Module) -> nn.Module:
    """A copy of ``model``'s module tree that shares its parameters and buffers (no tensor is copied)."""
    shared = {id(t): t for t in list(model.parameters()) + list(model.buffers())}
    return copy.deepcopy(model, memo=shared)
