"""Per-document perplexity under an lmlab checkpoint, as the quality score's reference model.

CCNet scores web text by its perplexity under a language model trained on
clean reference text. :class:`CheckpointPerplexity` plugs any lmlab model
(a Lightning ``.ckpt`` or an ``lmlab export`` directory, opened without
unpickling by :func:`lmlab.models.checkpoint.open_checkpoint`) into
:class:`~lmlab.data.prepare.quality.QualityScorer` in place of the default
bigram model: ``text -> exp(mean NLL)`` over the document's first
``max_tokens`` tokens, each predicted from an EOS prefix and the tokens before
it (the way documents follow an EOS in packed pretraining data).
"""

from __future__ import annotations

import math
import os
from typing import Any

from lmlab.errors import ConfigError


class CheckpointPerplexity:
    """``text -> perplexity`` under a trained lmlab ``CausalLM``.

    Args:
        checkpoint: ``.ckpt`` file or export directory holding the model config.
        tokenizer: Tokenizer directory (or a loaded tokenizer) the model was trained with;
            None for the one the checkpoint records.
        max_tokens: Tokens scored per document (the rest is ignored).
        device: ``cpu`` or ``cuda``.
    """

    def __init__(self, checkpoint: str | os.PathLike, tokenizer: Any = None, max_tokens: int = 1024, device: str = "cpu"):
        import torch

        from lmlab.models.checkpoint import open_checkpoint

        ckpt = open_checkpoint(checkpoint, "quality.reference_model")
        self.device = torch.device(device)
        self.model = ckpt.causal_lm(device=self.device)
        config = self.config = self.model.config
        self.tokenizer = ckpt.tokenizer(tokenizer, field="quality.reference_tokenizer")
        if len(self.tokenizer) > config.vocab_size:
            raise ConfigError(
                "quality.reference_tokenizer",
                f"has {len(self.tokenizer)} tokens but the model only {config.vocab_size}",
                "give the tokenizer the checkpoint was trained with",
            )
        self.max_tokens = max(1, min(int(max_tokens), config.max_seq_len))
        self.prefix_id = self.tokenizer.eos_token_id

    def nll(self, text: str) -> tuple[float, int]:
        """(summed negative log-likelihood in nats, number of scored tokens)."""
        import torch

        ids = self.tokenizer(text, add_special_tokens=False)["input_ids"][: self.max_tokens]
        if not ids:
            return 0.0, 0
        seq = torch.tensor([[self.prefix_id, *ids]], device=self.device)
        with torch.inference_mode():
            logits = self.model(seq[:, :-1])[..., : self.config.vocab_size].float()
            logp = torch.log_softmax(logits, dim=-1)
            picked = logp.gather(-1, seq[:, 1:].unsqueeze(-1)).squeeze(-1)
        return float(-picked.sum()), len(ids)

    def __call__(self, text: str) -> float:
        total, n = self.nll(text)
        return math.exp(total / n) if n else math.inf
