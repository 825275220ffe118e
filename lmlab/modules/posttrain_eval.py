"""Measure a policy on held-out prompts: exact match, reward and KL to a reference.

Used by ``benchmarks/posttrain_chain.py`` and the post-training tests to
compare the policies of the chain (fresh, SFT, PPO) on the same prompts with
the same sampler seed.
"""

from __future__ import annotations

from typing import Any, Callable, Optional, Sequence

import torch

from lmlab.data.posttrain.chat import stop_token_ids
from lmlab.data.posttrain.records import build_prompt_example
from lmlab.models.generation import generate, left_pad
from lmlab.models.heads import CausalLM, ScalarModel
from lmlab.modules.reward import score_sequences
from lmlab.modules.rlhf_math import logprobs_from_logits

__all__ = ["policy_report", "prompt_ids"]


def prompt_ids(tokenizer: Any, prompts: Sequence[str | Sequence[dict]]) -> list[list[int]]:
    """Token ids of each prompt (a user message, or a message list) followed by the generation prompt."""
    out = []
    for p in prompts:
        messages = [{"role": "user", "content": p}] if isinstance(p, str) else list(p)
        example, _ = build_prompt_example(tokenizer, messages)
        out.append(example["input_ids"])
    return out


def _decode(tokenizer: Any, ids: torch.Tensor, mask: torch.Tensor) -> list[str]:
    return [tokenizer.decode(row[m.bool()].tolist(), skip_special_tokens=False) for row, m in zip(ids, mask)]


@torch.no_grad()
def policy_report(
    policy: CausalLM,
    tokenizer: Any,
    prompts: Sequence[str | Sequence[dict]],
    *,
    reward_fn: Optional[Callable[[str, str], float]] = None,
    reward_model: Optional[ScalarModel] = None,
    ref_model: Optional[CausalLM] = None,
    exact_match_fn: Optional[Callable[[str, str], bool]] = None,
    max_new_tokens: int = 8,
    sample_temperature: float = 1.0,
    batch_size: int = 128,
    seed: int = 0,
) -> dict[str, float]:
    """Greedy and sampled statistics of ``policy`` on ``prompts``.

    Returns ``greedy_exact_match`` (with ``exact_match_fn``), ``greedy_reward``
    and ``sample_reward`` (with ``reward_fn``; sampled at ``sample_temperature``
    with a fixed seed), ``greedy_rm_score`` and ``sample_rm_score`` (with
    ``reward_model``), ``sample_kl`` (with
    ``ref_model``: mean over prompts of the summed ``log pi - log pi_ref`` of
    the sampled tokens, a Monte-Carlo estimate of KL(pi || pi_ref)),
    ``greedy_eos_rate`` and ``sample_length``.
    """
    device = next(policy.parameters()).device
    was_training = policy.training
    policy.eval()
    stops = stop_token_ids(tokenizer)
    pad = int(tokenizer.pad_token_id)
    ids_all = prompt_ids(tokenizer, prompts)
    sums: dict[str, float] = {}

    def add(key: str, values: torch.Tensor) -> None:
        sums[key] = sums.get(key, 0.0) + float(values.float().sum())

    generator = torch.Generator(device=device).manual_seed(seed)
    for start in range(0, len(ids_all), batch_size):
        ids, mask = left_pad(ids_all[start : start + batch_size], pad, device=device)
        P = ids.shape[1]
        for mode, temperature in (("greedy", 0.0), ("sample", sample_temperature)):
            gen = generate(policy, ids, mask, max_new_tokens=max_new_tokens, temperature=temperature,
                           stop_token_ids=stops, pad_id=pad, generator=generator)
            full_mask = torch.cat([mask, gen.response_mask.long()], dim=1)
            pos = (full_mask.cumsum(1) - 1).clamp(min=0)
            texts = None
            if reward_fn is not None or exact_match_fn is not None:
                texts = (_decode(tokenizer, ids, mask), _decode(tokenizer, gen.responses, gen.response_mask))
            if reward_model is not None:
                add(f"{mode}_rm_score", score_sequences(reward_model.eval(), gen.sequences, full_mask, pos))
            if reward_fn is not None:
                add(f"{mode}_reward", torch.tensor([float(reward_fn(p, r)) for p, r in zip(*texts)]))
            if mode == "greedy":
                add("greedy_eos_rate", gen.finished)
                if exact_match_fn is not None:
                    add("greedy_exact_match", torch.tensor([bool(exact_match_fn(p, r)) for p, r in zip(*texts)]))
            else:
                rmask = gen.response_mask.bool()
                add("sample_length", rmask.sum(1))
                if ref_model is not None:
                    vocab = policy.config.vocab_size
                    lp = logprobs_from_logits(policy(gen.sequences, position_ids=pos, attention_mask=full_mask)[:, P - 1 : -1, :vocab],
                                              gen.responses, temperature, ignore_index=None)
                    ref = logprobs_from_logits(ref_model.eval()(gen.sequences, position_ids=pos, attention_mask=full_mask)[:, P - 1 : -1, :vocab],
                                               gen.responses, temperature, ignore_index=None)
                    add("sample_kl", (lp - ref).masked_fill(~rmask, 0).sum(1))
    policy.train(was_training)
    n = max(len(ids_all), 1)
    return {k: v / n for k, v in sorted(sums.items())}
