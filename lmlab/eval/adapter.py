"""``LmlabLM``: the evaluation harness's :class:`~lmlab.eval.protocol.LanguageModel` over an lmlab ``CausalLM``.

Scoring follows lm-evaluation-harness's HF backend, so numbers compare:

* ``loglikelihood``: trailing whitespace of the context moves onto the
  continuation; ``context + continuation`` is encoded jointly and the
  continuation tokens are those after the context's own encoding; an empty
  context is replaced by one prefix token (default EOS, the token that
  precedes every document in lmlab's packed pretraining data); the sequence
  is cut from the left to ``max_length + 1`` tokens. A continuation longer
  than ``max_length`` (possible with small test models) is scored in chunks
  of ``max_length // 2`` tokens, each given the window before it. Requests run in
  length-sorted batches (longest first), right padded (causal attention
  never looks right, so padding needs no mask), and only the continuation
  positions go through the LM head.
* ``generate``: prompts are cut from the left to leave room for
  ``max_new_tokens``, batched with left padding through
  :func:`lmlab.models.generate` (KV cache), greedy by default. Decoding stops
  at EOS / ``<|end|>`` tokens and, checked every ``stop_check_every`` tokens,
  at stop strings; text is cut before the first stop string. Why each
  generation ended is kept in :attr:`LmlabLM.finish_reasons` (``"length"``
  when it was cut at ``max_new_tokens``) and totals in :attr:`LmlabLM.stats`.

Log-probabilities are normalised over the real ``vocab_size`` (the padded
embedding rows are not tokens), as in :func:`lmlab.models.generate`.
"""

from __future__ import annotations

import os
from collections.abc import Sequence
from typing import Any, Optional

import torch

from lmlab.errors import ConfigError
from lmlab.eval.batching import run_length_sorted
from lmlab.models.generation import generate as lm_generate
from lmlab.models.generation import left_pad


def check_tokenizer(tokenizer: Any, vocab_size: int, field: str = "tokenizer") -> None:
    """Raise :class:`ConfigError` unless ``tokenizer`` has an EOS token and fits the model's vocabulary."""
    if tokenizer is None or not callable(getattr(tokenizer, "decode", None)):
        raise ConfigError(field, f"expected a transformers tokenizer, got {type(tokenizer).__name__}",
                          "pass a tokenizer directory or a loaded tokenizer")
    if tokenizer.eos_token_id is None:
        raise ConfigError(field, "the tokenizer has no EOS token (needed as document prefix and stop token)",
                          "use a tokenizer with an eos_token, e.g. one trained by lmlab")
    if len(tokenizer) > vocab_size:
        raise ConfigError(field, f"has {len(tokenizer)} tokens but the model only {vocab_size}",
                          "use the tokenizer the model was trained with")


class LmlabLM:
    """Evaluate an lmlab :class:`~lmlab.models.heads.CausalLM` with the harness.

    Args:
        model: the language model (anything with ``config``, ``backbone`` and ``lm_head``).
        tokenizer: a loaded transformers tokenizer with an EOS token.
        batch_size: requests per forward pass / generation batch.
        max_length: longest sequence fed to the model (default and maximum:
            ``config.max_seq_len``); longer contexts lose their start.
        device: where to run (default: where the model's weights are).
        temperature, top_k, top_p: sampling for ``generate`` (``temperature=0``: greedy).
        seed: seeds the sampling generator.
        prefix_token_id: the token standing in for an empty context (default EOS).
        stop_check_every: with stop strings, decode in segments of this many
            tokens and drop prompts whose text already contains one.
    """

    def __init__(
        self,
        model: torch.nn.Module,
        tokenizer: Any,
        batch_size: int = 16,
        max_length: Optional[int] = None,
        device: Optional[torch.device | str] = None,
        *,
        temperature: float = 0.0,
        top_k: int = 0,
        top_p: float = 1.0,
        seed: int = 1234,
        prefix_token_id: Optional[int] = None,
        stop_check_every: int = 64,
    ):
        config = model.config
        if isinstance(batch_size, bool) or not isinstance(batch_size, int) or batch_size < 1:
            raise ConfigError("batch_size", f"must be a positive integer, got {batch_size!r}")
        limit = config.max_seq_len
        if max_length is not None and not 2 <= max_length <= limit:
            raise ConfigError("max_length", f"must be in [2, max_seq_len={limit}], got {max_length}",
                              f"use at most {limit}")
        if stop_check_every < 1:
            raise ConfigError("stop_check_every", f"must be >= 1, got {stop_check_every}")
        check_tokenizer(tokenizer, config.vocab_size)
        self.model = model.to(device) if device is not None else model
        self.device = torch.device(device) if device is not None else next(model.parameters()).device
        self.tokenizer = tokenizer
        self.batch_size = batch_size
        self.max_length = max_length or limit
        self.vocab_size = config.vocab_size
        self.temperature, self.top_k, self.top_p = temperature, top_k, top_p
        self.generator = torch.Generator(device=self.device).manual_seed(seed)
        self.eos_id = int(tokenizer.eos_token_id)
        self.prefix_token_id = self.eos_id if prefix_token_id is None else int(prefix_token_id)
        self.pad_id = int(tokenizer.pad_token_id) if tokenizer.pad_token_id is not None else self.eos_id
        self.stop_ids = _stop_token_ids(tokenizer)
        self.stop_check_every = stop_check_every
        self.finish_reasons: list[str] = []
        self.stats = {"loglikelihood_requests": 0, "truncated_contexts": 0, "split_continuations": 0, "generations": 0,
                      "hit_max_new_tokens": 0, "truncated_prompts": 0}

    @classmethod
    def from_checkpoint(
        cls,
        ckpt: str | os.PathLike,
        tokenizer: Any = None,
        batch_size: int = 16,
        max_length: Optional[int] = None,
        device: Optional[torch.device | str] = None,
        dtype: Optional[torch.dtype] = None,
        **kwargs: Any,
    ) -> LmlabLM:
        """Build from a Lightning ``.ckpt`` (``weights_only``), an lmlab export or an HF export directory.

        ``tokenizer`` (a directory or a loaded tokenizer) defaults to the one
        recorded in the checkpoint (see :meth:`~lmlab.models.checkpoint.Checkpoint.tokenizer`).
        """
        from lmlab.models.checkpoint import open_checkpoint

        source = open_checkpoint(ckpt, "--ckpt")
        model = source.causal_lm(device=device, dtype=dtype)
        tok = source.tokenizer(tokenizer)
        return cls(model, tok, batch_size=batch_size, max_length=max_length, device=device, **kwargs)

    # --- helpers -------------------------------------------------------------------------------

    def encode(self, text: str) -> list[int]:
        """Token ids of ``text`` without special tokens added."""
        return list(self.tokenizer(text, add_special_tokens=False)["input_ids"])

    def decode(self, ids: Sequence[int]) -> str:
        """Text of ``ids`` (special tokens dropped, as lm-eval decodes)."""
        return self.tokenizer.decode(list(ids), skip_special_tokens=True)

    def _encode_pair(self, context: str, continuation: str) -> tuple[list[int], list[int]]:
        n_spaces = len(context) - len(context.rstrip())
        if n_spaces:
            continuation = context[-n_spaces:] + continuation
            context = context[:-n_spaces]
        if not context:
            return [self.prefix_token_id], self.encode(continuation)
        whole = self.encode(context + continuation)
        ctx = self.encode(context)
        return ctx, whole[len(ctx):]

    # --- LanguageModel -------------------------------------------------------------------------

    def loglikelihood(self, requests: list[tuple[str, str]]) -> list[tuple[float, bool]]:
        """Summed log-prob of each continuation given its context, and whether greedy decoding reproduces it."""
        owners, pieces = [], []
        for i, (ctx, cont) in enumerate(requests):
            for piece in self._pieces(*self._encode_pair(ctx, cont)):
                owners.append(i)
                pieces.append(piece)
        self.stats["loglikelihood_requests"] += len(requests)
        cap = self.max_length + 1
        with _eval_mode(self.model):
            scores = run_length_sorted(
                pieces, self._score_batch, self.batch_size, length=lambda it: min(cap, len(it[0]) + len(it[1]))
            )
        out = [(0.0, True)] * len(requests)
        for i, (ll, greedy) in zip(owners, scores):
            out[i] = (out[i][0] + ll, out[i][1] and greedy)
        return out

    def _pieces(self, ctx: list[int], cont: list[int]) -> list[tuple[list[int], list[int]]]:
        """The request itself, or, for a continuation longer than ``max_length``, consecutive chunks of
        half a window, each scored given everything before it (cut to the window), so every token keeps
        at least ``max_length // 2`` tokens of context."""
        if len(cont) <= self.max_length:
            return [(ctx, cont)]
        self.stats["split_continuations"] += 1
        step = max(1, self.max_length // 2)
        seq = ctx + cont
        pieces = []
        for a in range(len(ctx), len(seq), step):
            b = min(a + step, len(seq))
            pieces.append((seq[max(0, b - 1 - self.max_length):a], seq[a:b]))
        return pieces

    def _score_batch(self, batch: list[tuple[list[int], list[int]]]) -> list[tuple[float, bool]]:
        for ctx, cont in batch:
            if len(ctx) + len(cont) > self.max_length + 1:
                self.stats["truncated_contexts"] += 1
        return score_continuations(self.model, batch, self.max_length, self.vocab_size, self.pad_id, self.device)

    def generate(self, prompts: list[str], max_new_tokens: int, stop: list[str]) -> list[str]:
        """Continue each prompt (new text only), cut before the first stop string."""
        if max_new_tokens < 1:
            raise ConfigError("max_new_tokens", f"must be >= 1, got {max_new_tokens}")
        max_new = min(max_new_tokens, self.max_length - 1)  # keep at least one prompt token
        budget = self.max_length - max_new
        items = []
        for i, prompt in enumerate(prompts):
            ids = self.encode(prompt) or [self.prefix_token_id]
            if len(ids) > budget:
                self.stats["truncated_prompts"] += 1
                ids = ids[-budget:]
            items.append((i, ids))
        stop = [s for s in stop if s]
        with _eval_mode(self.model):
            results = run_length_sorted(
                items, lambda b: self._generate_batch(b, max_new, stop), self.batch_size, length=lambda it: len(it[1])
            )
        self.finish_reasons = [reason for _, reason in results]
        self.stats["generations"] += len(results)
        self.stats["hit_max_new_tokens"] += sum(reason == "length" for reason in self.finish_reasons)
        return [text for text, _ in results]

    def _generate_batch(self, batch: list[tuple[int, list[int]]], max_new: int, stop: list[str]) -> list[tuple[str, str]]:
        prompts = [ids for _, ids in batch]
        generated: list[list[int]] = [[] for _ in batch]
        reasons: list[Optional[str]] = [None] * len(batch)
        produced = 0
        while produced < max_new:
            active = [i for i, r in enumerate(reasons) if r is None]
            if not active:
                break
            step = max_new - produced if not stop else min(self.stop_check_every, max_new - produced)
            ids, mask = left_pad([prompts[i] + generated[i] for i in active], self.pad_id, self.device)
            out = lm_generate(
                self.model, ids, mask, max_new_tokens=step, temperature=self.temperature, top_k=self.top_k,
                top_p=self.top_p, stop_token_ids=self.stop_ids, pad_id=self.pad_id, generator=self.generator,
            )
            for row, i in enumerate(active):
                tokens = out.responses[row][out.response_mask[row].bool()].tolist()
                if bool(out.finished[row]):
                    tokens = tokens[:-1]  # the stop token is not part of the text
                    reasons[i] = "stop_token"
                generated[i].extend(tokens)
                if stop and reasons[i] is None and _find_stop(self.decode(generated[i]), stop) is not None:
                    reasons[i] = "stop_string"
            produced += step
        results = []
        for i in range(len(batch)):
            text = self.decode(generated[i])
            cut = _find_stop(text, stop)
            if cut is not None:
                text = text[:cut]
                reasons[i] = reasons[i] or "stop_string"
            results.append((text, reasons[i] or "length"))
        return results


def score_continuations(
    model: torch.nn.Module,
    batch: Sequence[tuple[Sequence[int], Sequence[int]]],
    max_length: int,
    vocab_size: int,
    pad_id: int,
    device: torch.device,
) -> list[tuple[float, bool]]:
    """``(sum log P(cont | ctx), is_greedy)`` for token-id pairs, in one right-padded forward pass.

    Each ``ctx + cont`` is cut from the left to ``max_length + 1`` tokens (the
    continuation must fit in ``max_length``). Only the positions predicting
    continuation tokens go through the LM head, so memory stays at
    (continuation tokens x vocab) rather than (batch x length x vocab).
    """
    seqs, conts = [], []
    for ctx, cont in batch:
        whole = list(ctx) + list(cont)
        whole = whole[-(max_length + 1):]
        seqs.append(whole[:-1])
        conts.append(list(cont))
    width = max(len(s) for s in seqs)
    ids = torch.full((len(seqs), width), pad_id, dtype=torch.long)
    for i, s in enumerate(seqs):
        ids[i, : len(s)] = torch.as_tensor(s, dtype=torch.long)
    with torch.no_grad():
        hidden = model.backbone(ids.to(device))
        picked = torch.cat([hidden[i, len(s) - len(c): len(s)] for i, (s, c) in enumerate(zip(seqs, conts))])
        logp = model.lm_head(picked)[:, :vocab_size].float().log_softmax(-1)
    targets = torch.as_tensor([t for c in conts for t in c], dtype=torch.long, device=logp.device)
    token_lp = logp.gather(1, targets[:, None]).squeeze(1).tolist()
    greedy = (logp.argmax(-1) == targets).tolist()
    out, start = [], 0
    for c in conts:
        n = len(c)
        out.append((float(sum(token_lp[start: start + n])), all(greedy[start: start + n])))
        start += n
    return out


def _find_stop(text: str, stop: list[str]) -> Optional[int]:
    hits = [i for i in (text.find(s) for s in stop) if i >= 0]
    return min(hits) if hits else None


def _stop_token_ids(tokenizer: Any) -> list[int]:
    from lmlab.data.posttrain.chat import stop_token_ids

    try:
        return stop_token_ids(tokenizer)
    except ConfigError:
        return [int(tokenizer.eos_token_id)]


class _eval_mode:
    """Put a module in eval mode for a block, restoring its previous mode afterwards."""

    def __init__(self, module: torch.nn.Module):
        self.module = module

    def __enter__(self) -> None:
        self.was_training = self.module.training
        self.module.eval()

    def __exit__(self, *exc: Any) -> None:
        self.module.train(self.was_training)
