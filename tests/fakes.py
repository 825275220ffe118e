"""Deterministic stand-in models for the harness tests (no network or GPU).

:class:`FunctionModel` answers with plain Python functions and records every
call, so a test can construct a model with known preferences (always the gold
choice, always the longest choice, a fixed generation per question) and check
both the metrics and the requests the harness sent.
"""

from __future__ import annotations

from collections.abc import Callable

LoglikelihoodFn = Callable[[str, str], tuple[float, bool]]
GenerateFn = Callable[[str], str]


class FunctionModel:
    """A :class:`~lmlab.eval.protocol.LanguageModel` backed by functions; records its calls.

    ``loglikelihood_fn(context, continuation) -> (loglik, is_greedy)`` and
    ``generate_fn(prompt) -> text``. ``ll_batches`` / ``gen_batches`` keep each
    batch as received; ``gen_settings`` the ``(max_new_tokens, stop)`` of each
    generate call.
    """

    def __init__(self, loglikelihood_fn: LoglikelihoodFn | None = None, generate_fn: GenerateFn | None = None):
        self.loglikelihood_fn = loglikelihood_fn
        self.generate_fn = generate_fn
        self.ll_batches: list[list[tuple[str, str]]] = []
        self.gen_batches: list[list[str]] = []
        self.gen_settings: list[tuple[int, list[str]]] = []

    def loglikelihood(self, requests: list[tuple[str, str]]) -> list[tuple[float, bool]]:
        """Score each request with ``loglikelihood_fn``."""
        if self.loglikelihood_fn is None:
            raise NotImplementedError("this FunctionModel has no loglikelihood_fn")
        self.ll_batches.append(list(requests))
        return [self.loglikelihood_fn(ctx, cont) for ctx, cont in requests]

    def generate(self, prompts: list[str], max_new_tokens: int, stop: list[str]) -> list[str]:
        """Answer each prompt with ``generate_fn``."""
        if self.generate_fn is None:
            raise NotImplementedError("this FunctionModel has no generate_fn")
        self.gen_batches.append(list(prompts))
        self.gen_settings.append((max_new_tokens, list(stop)))
        return [self.generate_fn(p) for p in prompts]

    @property
    def ll_requests(self) -> list[tuple[str, str]]:
        """Every loglikelihood request, in the order sent."""
        return [r for batch in self.ll_batches for r in batch]
