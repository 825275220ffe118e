"""Sampling from a :class:`~lmlab.models.heads.CausalLM` with a KV cache.

Prompts are left padded so every sequence's next token sits in the same
column; positions are counted from each sequence's first real token, so a
padded prompt produces the same logits as the unpadded one.

The returned log-probabilities are those of the sampled tokens under the
temperature-scaled distribution (before top-k/top-p truncation), which is what
PPO's importance ratios need: a forward pass over the finished sequence with
logits divided by the same temperature reproduces them.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Optional, Sequence

import torch
import torch.nn.functional as F

from lmlab.models.heads import CausalLM
from lmlab.models.attention import allocate_cache


@dataclass
class GenerationOutput:
    """Result of :func:`generate`.

    Attributes:
        sequences: (B, P + L) prompt (left padded) followed by generated tokens.
        responses: (B, L) generated tokens; positions after a stop token hold ``pad_id``.
        logprobs: (B, L) log-probability of each generated token (0 after stop).
        response_mask: (B, L) 1 for generated tokens up to and including the stop token.
        prompt_mask: (B, P) the input attention mask.
        finished: (B,) whether the sequence emitted a stop token.
    """

    sequences: torch.Tensor
    responses: torch.Tensor
    logprobs: torch.Tensor
    response_mask: torch.Tensor
    prompt_mask: torch.Tensor
    finished: torch.Tensor


def filter_logits(logits: torch.Tensor, top_k: int = 0, top_p: float = 1.0) -> torch.Tensor:
    """Mask logits outside the top-k set and outside the top-p nucleus with -inf."""
    if top_k and top_k > 0:
        k = min(top_k, logits.shape[-1])
        kth = torch.topk(logits, k, dim=-1).values[..., -1:]
        logits = logits.masked_fill(logits < kth, float("-inf"))
    if top_p < 1.0:
        sorted_logits, order = torch.sort(logits, descending=True, dim=-1)
        probs = sorted_logits.softmax(-1)
        # drop a token when the mass before it already reaches top_p (the first token always stays)
        drop = probs.cumsum(-1) - probs >= top_p
        sorted_logits = sorted_logits.masked_fill(drop, float("-inf"))
        logits = torch.full_like(logits, float("-inf")).scatter(-1, order, sorted_logits)
    return logits


def left_pad(sequences: Sequence[Sequence[int]], pad_id: int, device=None) -> tuple[torch.Tensor, torch.Tensor]:
    """Left-pad token lists into (ids, attention_mask)."""
    width = max(len(s) for s in sequences)
    ids = torch.full((len(sequences), width), pad_id, dtype=torch.long)
    mask = torch.zeros((len(sequences), width), dtype=torch.long)
    for i, s in enumerate(sequences):
        if len(s):
            ids[i, width - len(s) :] = torch.as_tensor(list(s), dtype=torch.long)
            mask[i, width - len(s) :] = 1
    return ids.to(device), mask.to(device)


@torch.no_grad()
def generate(
    model: CausalLM,
    input_ids: torch.Tensor,
    attention_mask: Optional[torch.Tensor] = None,
    max_new_tokens: int = 32,
    temperature: float = 1.0,
    top_k: int = 0,
    top_p: float = 1.0,
    stop_token_ids: Sequence[int] = (),
    pad_id: int = 0,
    generator: Optional[torch.Generator] = None,
) -> GenerationOutput:
    """Sample up to ``max_new_tokens`` tokens per prompt.

    ``temperature=0`` means greedy decoding. A sequence stops after emitting any
    of ``stop_token_ids``; decoding ends early when every sequence has stopped.
    """
    was_training = model.training
    model.eval()
    device = input_ids.device
    B, P = input_ids.shape
    if attention_mask is None:
        attention_mask = torch.ones_like(input_ids)
    total = P + max_new_tokens
    if total > model.config.max_seq_len:
        raise ValueError(
            f"prompt length {P} + max_new_tokens {max_new_tokens} exceeds max_seq_len={model.config.max_seq_len}"
        )
    param = next(model.parameters())
    dtype = torch.get_autocast_dtype(device.type) if torch.is_autocast_enabled(device.type) else param.dtype
    # a KV cache, a sliding-window ring buffer or linear-attention states, by config.attention
    cache = allocate_cache(model.config, B, total, device, dtype)
    mask = torch.zeros((B, total), dtype=torch.long, device=device)
    mask[:, :P] = attention_mask
    positions = (attention_mask.long().cumsum(1) - 1).clamp(min=0)
    stop = torch.tensor(list(stop_token_ids), device=device, dtype=torch.long)

    logits = model(input_ids, position_ids=positions, attention_mask=mask[:, :P], cache=cache)[:, -1]
    next_pos = positions[:, -1] + 1
    responses = torch.full((B, max_new_tokens), pad_id, dtype=torch.long, device=device)
    logprobs = torch.zeros((B, max_new_tokens), dtype=torch.float32, device=device)
    resp_mask = torch.zeros((B, max_new_tokens), dtype=torch.long, device=device)
    done = torch.zeros(B, dtype=torch.bool, device=device)
    vocab = model.config.vocab_size
    steps = 0
    for t in range(max_new_tokens):
        # padded vocab rows are never valid tokens
        logits = logits.float()[:, :vocab]
        if temperature <= 0:
            token = logits.argmax(-1)
            logp = torch.log_softmax(logits, -1).gather(1, token[:, None]).squeeze(1)
        else:
            scaled = logits / temperature
            logp_all = torch.log_softmax(scaled, -1)
            probs = F.softmax(filter_logits(scaled, top_k, top_p), -1)
            token = torch.multinomial(probs, 1, generator=generator).squeeze(1)
            logp = logp_all.gather(1, token[:, None]).squeeze(1)
        active = ~done
        responses[:, t] = torch.where(active, token, torch.full_like(token, pad_id))
        logprobs[:, t] = torch.where(active, logp, torch.zeros_like(logp))
        resp_mask[:, t] = active.long()
        if len(stop):
            done = done | (active & torch.isin(token, stop))
        steps = t + 1
        if bool(done.all()) or t == max_new_tokens - 1:
            break
        mask[:, P + t] = 1
        logits = model(
            responses[:, t : t + 1], position_ids=next_pos[:, None], attention_mask=mask[:, : P + t + 1], cache=cache
        )[:, -1]
        next_pos = next_pos + 1
    model.train(was_training)
    responses, logprobs, resp_mask = responses[:, :steps], logprobs[:, :steps], resp_mask[:, :steps]
    return GenerationOutput(
        sequences=torch.cat([input_ids, responses], dim=1),
        responses=responses,
        logprobs=logprobs,
        response_mask=resp_mask,
        prompt_mask=attention_mask,
        finished=done,
    )
