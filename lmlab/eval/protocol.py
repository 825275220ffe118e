"""The model side of the evaluation harness, as a structural protocol.

Any object with these two methods can be evaluated; the harness never imports a
model class. The contract follows EleutherAI's lm-evaluation-harness so that
numbers are comparable:

* ``loglikelihood``: for each ``(context, continuation)`` return
  ``(sum of natural-log P(continuation tokens | context), is_greedy)`` where
  ``is_greedy`` is True iff greedy decoding from ``context`` would reproduce the
  continuation token for token. The continuation carries its own leading
  delimiter (usually a space, e.g. ``" Paris"``). As in lm-eval, an adapter
  should move trailing whitespace of the context onto the continuation before
  tokenizing, and encode ``context + continuation`` jointly so token boundaries
  match what the model saw in training.
* ``generate``: return only the newly generated text for each prompt (not the
  prompt), greedy unless the adapter was configured otherwise, cut before the
  first occurrence of any ``stop`` string. The harness cuts at stop strings
  again, so an adapter that overshoots by a token is still scored correctly.

Adapters should batch with :mod:`lmlab.eval.batching` (longest first) so that
out-of-memory errors surface on the first batch rather than at the end.
"""

from __future__ import annotations

from typing import Protocol, runtime_checkable

#: ``(context, continuation)``; the continuation includes its leading delimiter.
LoglikelihoodRequest = tuple[str, str]
#: ``(sum log-prob of the continuation, is_greedy)``.
LoglikelihoodResult = tuple[float, bool]


@runtime_checkable
class LanguageModel(Protocol):
    """What the harness needs from a model; see the module docstring for the contract."""

    def loglikelihood(self, requests: list[tuple[str, str]]) -> list[tuple[float, bool]]:
        """Score each ``(context, continuation)``; results in request order."""
        ...

    def generate(self, prompts: list[str], max_new_tokens: int, stop: list[str]) -> list[str]:
        """Continue each prompt; results (new text only) in prompt order."""
        ...
