"""Pipeline-parallel building block: cut an lmlab model into sequential stages.

Lightning has no pipeline-parallel strategy. :func:`split_stages` cuts a
``CausalLM`` (or ``ScalarModel``) into ``n`` modules -- embeddings and the
first blocks, middle blocks, last blocks with the final norm and head --
whose composition ``stage[n-1](...stage[1](stage[0](ids)))`` is the full
model's forward. The stages share the model's parameters (no copies), so they
drop into ``torch.distributed.pipelining.PipelineStage`` with a GPipe or 1F1B
schedule in a plain PyTorch loop, one stage per rank.

Between stages only the hidden states ``(B, T, d_model)`` travel; positions
are recomputed per stage from the sequence length, so stages support the
plain causal (packed, cross-document) forward, not document masks or KV caches.
"""

from __future__ import annotations

from typing import Optional, Sequence

import torch
from torch import nn


def balance_layers(n_layers: int, n_stages: int, embedding_weight: float = 1.0, head_weight: float = 2.0) -> list[int]:
    """Blocks per stage so that stage costs are even.

    The first stage also pays for the embedding lookup and the last for the
    LM head and loss, counted in units of one block (``embedding_weight``,
    ``head_weight``); the head's vocabulary matmul is often worth a block or two.
    """
    if not 1 <= n_stages <= n_layers:
        raise ValueError(f"need 1 <= n_stages <= n_layers, got {n_stages} stages for {n_layers} layers")
    total = n_layers + embedding_weight + head_weight
    target = total / n_stages
    counts, used = [], 0
    for i in range(n_stages):
        left_stages = n_stages - i
        extra = (embedding_weight if i == 0 else 0.0) + (head_weight if i == n_stages - 1 else 0.0)
        k = int(round(target - extra))
        # leave at least one block for every later stage, take everything on the last
        k = max(1, min(k, n_layers - used - (left_stages - 1)))
        if i == n_stages - 1:
            k = n_layers - used
        counts.append(k)
        used += k
    return counts


class Stage(nn.Module):
    """One pipeline stage: optional embedding, a run of blocks, optional final norm and head."""

    def __init__(self, model: nn.Module, first: int, last: int, is_first: bool, is_last: bool):
        super().__init__()
        backbone = model.backbone
        self.config = backbone.config
        self.is_first, self.is_last = is_first, is_last
        self.first_layer = first
        self.tok_emb = backbone.tok_emb if is_first else None
        self.pos_emb = backbone.pos_emb if is_first else None
        self.drop = backbone.drop if is_first else None
        self.rotary = backbone.rotary
        self.blocks = nn.ModuleList(backbone.blocks[first:last])
        self.norm = backbone.norm if is_last else None
        head = getattr(model, "lm_head", None) or getattr(model, "score", None)
        self.head = head if is_last else None
        self.scalar_head = is_last and hasattr(model, "score") and not hasattr(model, "lm_head")
        self.activation_checkpointing = backbone.activation_checkpointing

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """Token ids (first stage) or hidden states -> hidden states, or logits (last stage)."""
        B, T = x.shape[:2]
        positions = torch.arange(T, device=x.device).unsqueeze(0).expand(B, T)
        if self.is_first:
            h = self.tok_emb(x)
            if self.pos_emb is not None:
                h = h + self.pos_emb(positions)
            x = self.drop(h)
        rope = self.rotary(positions, x.dtype) if self.rotary is not None else None
        for i, block in enumerate(self.blocks):
            if self.activation_checkpointing and self.training and torch.is_grad_enabled():
                x = torch.utils.checkpoint.checkpoint(block, x, rope, None, None, self.first_layer + i, use_reentrant=False)
            else:
                x = block(x, rope, None, None, self.first_layer + i)
        if self.is_last:
            x = self.head(self.norm(x))
            if self.scalar_head:
                x = x.squeeze(-1)
        return x


def split_stages(model: nn.Module, n_stages: int, layers_per_stage: Optional[Sequence[int]] = None) -> list[Stage]:
    """Cut ``model`` into ``n_stages`` :class:`Stage` modules sharing its parameters.

    Args:
        model: A ``CausalLM`` or ``ScalarModel``.
        n_stages: Number of stages (pipeline ranks).
        layers_per_stage: Blocks per stage; default :func:`balance_layers`.
    """
    n_layers = len(model.backbone.blocks)
    counts = list(layers_per_stage) if layers_per_stage is not None else balance_layers(n_layers, n_stages)
    if len(counts) != n_stages or sum(counts) != n_layers or min(counts) < 0:
        raise ValueError(f"layers_per_stage {counts} must have {n_stages} entries summing to {n_layers}")
    stages, start = [], 0
    for i, k in enumerate(counts):
        stages.append(Stage(model, start, start + k, i == 0, i == n_stages - 1))
        start += k
    return stages
