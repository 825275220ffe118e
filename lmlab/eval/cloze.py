"""Cloze last-word prediction by log-likelihood (LAMBADA).

As lm-eval's ``lambada_openai``: one request ``(context, " " + last_word)``;
``acc`` is the model's ``is_greedy`` flag (greedy decoding reproduces the whole
word), and ``perplexity`` is ``exp(-mean(loglik of the last word))`` over docs,
with a bootstrapped standard error.
"""

from __future__ import annotations

from lmlab.eval import metrics as M
from lmlab.eval.base import SampleRecord, Task
from lmlab.eval.data import Doc
from lmlab.eval.templates import render


class ClozeTask(Task):
    """Predict a held-out continuation (usually the last word)."""

    type_name = "cloze"
    request_kind = "loglikelihood"
    aggregations = {"perplexity": M.perplexity}

    def target(self, doc: Doc) -> str:
        """The continuation to score, without the delimiter."""
        if self.spec.doc_to_target is not None:
            value = render(self.spec.doc_to_target, doc.fields)
        else:
            value = doc.fields[self.spec.answer]
        if not isinstance(value, str) or not value:
            raise ValueError(f"field {self.spec.answer!r} must be a non-empty string")
        return value

    def example_text(self, doc: Doc) -> str:
        return self.doc_text(doc) + self.spec.target_delimiter + self.target(doc)

    def build_requests(self, doc: Doc) -> list[tuple[str, str]]:
        return [(self.fewshot_prefix(doc) + self.doc_text(doc), self.spec.target_delimiter + self.target(doc))]

    def score(self, doc: Doc, requests: list[tuple[str, str]], responses: list[tuple[float, bool]]) -> SampleRecord:
        ll, is_greedy = float(responses[0][0]), bool(responses[0][1])
        values: dict[str, float] = {}
        if "perplexity" in self.spec.metrics:
            values["perplexity"] = ll  # aggregated as exp(-mean(ll))
        if "acc" in self.spec.metrics:
            values["acc"] = float(is_greedy)
        log = {
            "prompt": requests[0][0],
            "target": requests[0][1],
            "scores": [ll],
            "is_greedy": is_greedy,
            "prediction": is_greedy,
            "correct": is_greedy,
        }
        return SampleRecord(doc.id, values, log, self.group_of(doc))
