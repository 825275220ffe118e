"""Perplexity and bits per byte of an lmlab ``CausalLM`` on any text, with a sliding window.

For documents x_1..x_N,

    PPL = exp(-(1/N) sum_i log P(x_i | x_<i)),    bpb = -sum_i log P(x_i | x_<i) / (ln 2 * bytes)

where ``bytes`` are the UTF-8 bytes the scored tokens stand for (as in the
``val/bpb`` that pretraining logs, so the two compare and bpb compares
across tokenizers). Each document is preceded by a prefix token (default
EOS: in lmlab's packed pretraining data every document follows an EOS), so
every token of the document is scored; pass ``prefix_token_id=None`` to
score from the second token on, as the transformers perplexity guide does.

A document longer than the context is scored with a sliding window (the
transformers perplexity guide's strided evaluation): windows of at most
``max_length`` input tokens advance by ``stride`` and each window scores
only the tokens the previous window did not, so every token is scored
exactly once, with at least ``max_length - stride`` tokens of context once
that much text precedes it. ``stride == max_length`` is plain chunked
evaluation; a smaller stride costs ``max_length / stride`` times the compute
and gives every token more context.

Log-probabilities are normalised over the real vocabulary (``vocab_size``),
not the padded embedding rows.
"""

from __future__ import annotations

import math
import os
from collections.abc import Iterable, Iterator, Sequence
from dataclasses import asdict, dataclass
from typing import Any, Optional

import numpy as np
import torch

from lmlab.data.pretrain.sources import SourceConfig
from lmlab.errors import ConfigError
from lmlab.eval.adapter import check_tokenizer, score_continuations
from lmlab.eval.batching import run_length_sorted

LN2 = math.log(2.0)
#: windows are scored this many batches at a time (sorted by length within the group)
_GROUP_BATCHES = 32


@dataclass
class PerplexityResult:
    """Summed statistics of a perplexity run; the derived metrics are properties.

    Attributes:
        name: the source (or ``all``).
        nll: summed negative log-likelihood (nats) of the scored tokens.
        tokens: scored tokens (N).
        bytes: UTF-8 bytes the scored tokens stand for.
        documents: documents scored.
        context: summed context length (tokens before each scored token in its window).
        windows: forward windows used.
    """

    name: str
    nll: float = 0.0
    tokens: int = 0
    bytes: int = 0
    documents: int = 0
    context: int = 0
    windows: int = 0

    @property
    def mean_nll(self) -> float:
        """Mean NLL per token (nats)."""
        return self.nll / self.tokens if self.tokens else float("nan")

    @property
    def ppl(self) -> float:
        """exp(mean NLL)."""
        return math.exp(self.mean_nll) if self.tokens else float("nan")

    @property
    def bpb(self) -> float:
        """Bits per UTF-8 byte."""
        return self.nll / (LN2 * self.bytes) if self.bytes else float("nan")

    @property
    def mean_context(self) -> float:
        """Average number of tokens each scored token was conditioned on."""
        return self.context / self.tokens if self.tokens else float("nan")

    def add(self, other: PerplexityResult) -> PerplexityResult:
        """Accumulate ``other``'s sums into this result (returns self)."""
        for key in ("nll", "tokens", "bytes", "documents", "context", "windows"):
            setattr(self, key, getattr(self, key) + getattr(other, key))
        return self

    def to_dict(self) -> dict[str, Any]:
        """The sums and the derived metrics, JSON-ready."""
        return {**asdict(self), "mean_nll": self.mean_nll, "ppl": self.ppl, "bpb": self.bpb,
                "mean_context": self.mean_context}


def window_spans(n_targets: int, max_length: int, stride: int) -> list[tuple[int, int, int]]:
    """``(begin, end, scored)`` windows over a sequence ``t_0..t_n`` whose targets are ``t_1..t_n``.

    The window feeds ``t[begin:end]`` (at most ``max_length`` tokens) and
    scores its last ``scored`` targets, ``t[end - scored + 1 .. end]``. The first
    window scores the first ``min(max_length, n)`` targets; each later one
    scores the next ``stride`` and starts where a full window ending there
    would, so the last (short) window is placed on the same grid and
    ``stride == max_length`` is exactly chunked evaluation.
    """
    if max_length < 1:
        raise ConfigError("max_length", f"must be >= 1, got {max_length}")
    if not 1 <= stride <= max_length:
        raise ConfigError("stride", f"must be in [1, max_length={max_length}], got {stride}",
                          "use stride <= max_length (stride == max_length is chunked evaluation)")
    spans = []
    end = min(max_length, n_targets)
    if n_targets > 0:
        spans.append((0, end, end))
    prev = end
    while prev < n_targets:
        end = min(prev + stride, n_targets)
        spans.append((max(0, prev + stride - max_length), end, end - prev))
        prev = end
    return spans


def score_documents(
    model: torch.nn.Module,
    documents: Iterable[Sequence[int]],
    *,
    max_length: Optional[int] = None,
    stride: Optional[int] = None,
    batch_size: int = 8,
    prefix_token_id: Optional[int] = None,
    token_bytes: Optional[np.ndarray] = None,
    pad_id: int = 0,
    device: Optional[torch.device | str] = None,
    name: str = "text",
) -> PerplexityResult:
    """Sliding-window NLL of token-id documents (see the module docstring).

    ``max_length`` defaults to the model's ``max_seq_len`` and ``stride`` to
    ``max_length // 2``. ``token_bytes[id]`` gives each token's UTF-8 length
    (for bpb). Windows from many documents are batched together, longest first.
    """
    config = model.config
    max_length = max_length or config.max_seq_len
    if max_length > config.max_seq_len:
        raise ConfigError("max_length", f"{max_length} exceeds the model's max_seq_len={config.max_seq_len}",
                          f"use at most {config.max_seq_len}")
    stride = stride or max(1, max_length // 2)
    if isinstance(batch_size, bool) or not isinstance(batch_size, int) or batch_size < 1:
        raise ConfigError("batch_size", f"must be a positive integer, got {batch_size!r}")
    device = torch.device(device) if device is not None else next(model.parameters()).device
    result = PerplexityResult(name)
    pending: list[tuple[list[int], list[int]]] = []

    def flush() -> None:
        scores = run_length_sorted(
            pending,
            lambda b: score_continuations(model, b, max_length, config.vocab_size, pad_id, device),
            batch_size,
            length=lambda it: len(it[0]) + len(it[1]),
        )
        result.nll -= sum(lp for lp, _ in scores)
        pending.clear()

    was_training = model.training
    model.eval()
    try:
        for doc in documents:
            seq = list(map(int, doc))
            if prefix_token_id is not None:
                seq = [int(prefix_token_id)] + seq
            n = len(seq) - 1
            if n < 1:
                continue
            result.documents += 1
            result.tokens += n
            if token_bytes is not None:
                ids = np.asarray(seq[1:], dtype=np.int64)
                result.bytes += int(token_bytes[np.clip(ids, 0, len(token_bytes) - 1)].sum())
            for begin, end, scored in window_spans(n, max_length, stride):
                first = end - scored + 1  # first scored target index
                pending.append((seq[begin:first], seq[first:end + 1]))
                # target i sees t[begin:i]
                result.context += sum(i - begin for i in range(first, end + 1))
                result.windows += 1
            if len(pending) >= batch_size * _GROUP_BATCHES:
                flush()
        if pending:
            flush()
    finally:
        model.train(was_training)
    return result


# --- text sources -------------------------------------------------------------------------------


def _documents(source: SourceConfig | Sequence[str] | str, max_documents: Optional[int]) -> Iterator[str]:
    from lmlab.data.pretrain.sources import iter_documents

    if isinstance(source, SourceConfig):
        texts: Iterable[str] = iter_documents(source)
    elif isinstance(source, str):
        texts = [source]
    else:
        texts = source
    for i, text in enumerate(texts):
        if max_documents is not None and i >= max_documents:
            return
        yield text


def perplexity(
    model: torch.nn.Module,
    tokenizer: Any,
    source: SourceConfig | Sequence[str] | str,
    *,
    max_length: Optional[int] = None,
    stride: Optional[int] = None,
    batch_size: int = 8,
    max_documents: Optional[int] = None,
    prefix: bool = True,
    device: Optional[torch.device | str] = None,
    name: Optional[str] = None,
) -> PerplexityResult:
    """PPL and bpb of ``model`` on a :class:`SourceConfig`'s documents, a list of texts, or one text.

    ``prefix`` puts the tokenizer's EOS before each document (so its first
    token is scored too).
    """
    from lmlab.data.tokenizer import token_byte_lengths

    check_tokenizer(tokenizer, model.config.vocab_size)
    label = name or (source.name if isinstance(source, SourceConfig) else "text")
    encoded = (tokenizer(t, add_special_tokens=False)["input_ids"] for t in _documents(source, max_documents))
    return score_documents(
        model, encoded, max_length=max_length, stride=stride, batch_size=batch_size,
        prefix_token_id=tokenizer.eos_token_id if prefix else None, token_bytes=token_byte_lengths(tokenizer),
        pad_id=_pad_id(tokenizer), device=device, name=label,
    )


def split_stream(stream: np.ndarray, eos_id: int) -> Iterator[np.ndarray]:
    """The documents of a packed token stream (EOS after each document; EOS tokens dropped)."""
    stream = np.asarray(stream)
    ends = np.flatnonzero(stream == eos_id)
    start = 0
    for end in ends:
        if end > start:
            yield stream[start:end]
        start = end + 1
    if start < len(stream):
        yield stream[start:]  # a held-out tail may end mid-document


def mixture_perplexity(
    model: torch.nn.Module,
    tokenizer: Any,
    sources: Sequence[SourceConfig],
    *,
    val_fraction: float = 0.01,
    seed: int = 1337,
    cache_dir: str | os.PathLike = ".lmlab_cache",
    max_length: Optional[int] = None,
    stride: Optional[int] = None,
    batch_size: int = 8,
    max_documents: Optional[int] = None,
    prefix: bool = True,
    device: Optional[torch.device | str] = None,
) -> dict[str, PerplexityResult]:
    """Per-source PPL/bpb on a mixture's validation split, plus ``all`` (token-weighted).

    The split is the one training holds out (same ``val_fraction``, ``seed``
    and tokenizer give the same cached streams); documents are scored with
    the sliding window.
    """
    from lmlab.data.pretrain.packing import build_or_load_cache
    from lmlab.data.pretrain.sources import validate_sources
    from lmlab.data.tokenizer import token_byte_lengths

    check_tokenizer(tokenizer, model.config.vocab_size)
    validate_sources(list(sources))
    _, streams = build_or_load_cache(list(sources), tokenizer, cache_dir, val_fraction, seed)
    eos = tokenizer.eos_token_id
    nbytes = token_byte_lengths(tokenizer)
    out: dict[str, PerplexityResult] = {}
    total = PerplexityResult("all")
    for src in sources:
        docs: Iterable[np.ndarray] = split_stream(streams[src.name].val, eos)
        if max_documents is not None:
            docs = (d for i, d in zip(range(max_documents), docs))
        res = score_documents(
            model, docs, max_length=max_length, stride=stride, batch_size=batch_size,
            prefix_token_id=eos if prefix else None, token_bytes=nbytes, pad_id=_pad_id(tokenizer),
            device=device, name=src.name,
        )
        if res.tokens:
            out[src.name] = res
            total.add(res)
    if not out:
        raise ConfigError("data.val_fraction", "the mixture has no validation tokens",
                          "use a config with val_fraction > 0")
    out["all"] = total
    return out


def experiment_mixture(config_path: str | os.PathLike) -> dict[str, Any]:
    """``sources``, ``tokenizer``, ``val_fraction``, ``seed`` and ``cache_dir`` of an experiment YAML's data section.

    The YAML is read as ``lmlab fit`` reads it, so the data module's defaults fill what it leaves out.
    """
    from lmlab.data.pretrain.sources import SourceConfig as Src
    from lmlab.training_config import init_args, load_training_config

    data = init_args(load_training_config([config_path], budget=False).get("data"))
    # a continual-pretraining config's new domain is part of the mixture it validates on
    raw = (data.get("sources") or []) + (data.get("new_sources") or [])
    if not raw:
        raise ConfigError("data.sources", f"{config_path} defines no sources", "use an experiment YAML with a data.sources list")
    try:
        sources = [Src(**s) for s in raw]
    except TypeError as e:
        raise ConfigError("data.sources", f"invalid source in {config_path}: {e}") from None
    return {
        "sources": sources,
        "tokenizer": data.get("tokenizer"),
        "val_fraction": float(data.get("val_fraction", 0.01)),
        "seed": int(data.get("seed", 1337)),
        "cache_dir": data.get("cache_dir", ".lmlab_cache"),
    }


def _pad_id(tokenizer: Any) -> int:
    return int(tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id)
