"""Heads on the shared backbone: the language-model head and the scalar head.

``CausalLM`` (pretraining, SFT, PPO policy, DPO) and ``ScalarModel`` (reward
and value models) both own a :class:`~lmlab.models.transformer.Transformer`
under the attribute ``backbone``, so a checkpoint of one stage loads into the
next stage's backbone by key prefix.
"""

from __future__ import annotations

from typing import Optional

import torch
from torch import nn

from lmlab.models.config import TransformerConfig
from lmlab.models.transformer import KVCache, Transformer, init_weights


class CausalLM(nn.Module):
    """Backbone plus a (possibly tied) projection to vocabulary logits."""

    def __init__(self, config: TransformerConfig):
        super().__init__()
        self.config = config
        self.backbone = Transformer(config)
        self.lm_head = nn.Linear(config.d_model, config.padded_vocab_size, bias=False)
        init_weights(self, config)
        if config.tie_embeddings:
            self.lm_head.weight = self.backbone.tok_emb.weight

    def forward(
        self,
        input_ids: torch.Tensor,
        position_ids: Optional[torch.Tensor] = None,
        doc_ids: Optional[torch.Tensor] = None,
        attention_mask: Optional[torch.Tensor] = None,
        cache: Optional[KVCache] = None,
    ) -> torch.Tensor:
        """Logits (B, T, padded_vocab_size)."""
        h = self.backbone(input_ids, position_ids, doc_ids, attention_mask, cache)
        return self.lm_head(h)


class ScalarModel(nn.Module):
    """Backbone plus a linear head giving one scalar per position (reward or value).

    Args:
        config: backbone shape.
        zero_init_head: start the head at zero, so a fresh value model predicts 0
            (one of the PPO implementation details); reward models keep a small
            normal init so pairs are distinguishable from step one.
    """

    def __init__(self, config: TransformerConfig, zero_init_head: bool = False):
        super().__init__()
        self.config = config
        self.backbone = Transformer(config)
        self.score = nn.Linear(config.d_model, 1, bias=True)
        init_weights(self, config)
        nn.init.normal_(self.score.weight, std=1.0 / (config.d_model + 1) ** 0.5)
        nn.init.zeros_(self.score.bias)
        if zero_init_head:
            nn.init.zeros_(self.score.weight)

    def forward(
        self,
        input_ids: torch.Tensor,
        position_ids: Optional[torch.Tensor] = None,
        doc_ids: Optional[torch.Tensor] = None,
        attention_mask: Optional[torch.Tensor] = None,
    ) -> torch.Tensor:
        """Per-position scalars (B, T)."""
        h = self.backbone(input_ids, position_ids, doc_ids, attention_mask)
        return self.score(h).squeeze(-1)

    def score_last(self, input_ids: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
        """Score at the last non-pad token of each sequence (left or right padded): (B,)."""
        values = self(input_ids, attention_mask=attention_mask)
        return values.gather(1, last_token_index(attention_mask).unsqueeze(1)).squeeze(1)


def last_token_index(attention_mask: torch.Tensor) -> torch.Tensor:
    """Index of the last position whose mask is 1, for left or right padding."""
    T = attention_mask.shape[1]
    idx = torch.arange(T, device=attention_mask.device).expand_as(attention_mask)
    return torch.where(attention_mask.bool(), idx, torch.zeros_like(idx)).max(dim=1).values
