"""Multiple choice by log-likelihood (ARC, HellaSwag, PIQA, MMLU, CommonsenseQA, WinoGrande).

Scored exactly as lm-evaluation-harness scores ``multiple_choice`` tasks:

* each choice is a continuation ``target_delimiter + choice`` (a leading space)
  of the same context; ``acc`` is 1 when ``argmax`` of the summed log-probs is
  the gold index;
* ``acc_norm`` takes ``argmax(loglik / len(choice))`` with the length in
  characters of the choice string (without the delimiter) -- lm-eval's
  ``completion_len``;
* partial scoring (``doc_to_contexts``, WinoGrande): each option fills the
  blank to give one context per option, and the shared text *after* the blank
  is scored given each; the option-filled contexts play the role of the choices
  (so ``acc_norm`` divides by their length, as lm-eval does).

Ties go to the first choice, like ``numpy.argmax``.
"""

from __future__ import annotations

import re
from typing import Any

import numpy as np

from lmlab.eval.base import SampleRecord, Task
from lmlab.eval.data import Doc, lookup
from lmlab.eval.templates import render


def resolve_gold(value: Any, choices: list[str], labels: list[str] | None = None) -> int:
    """The gold index from an answer field: an index, a label (``"B"``), a digit string or the choice text."""
    if isinstance(value, bool):
        raise ValueError(f"answer {value!r} is a boolean, not an index")
    if isinstance(value, float) and value.is_integer():
        value = int(value)
    if isinstance(value, int):
        index = value
    elif isinstance(value, str):
        v = value.strip()
        if labels is not None:
            if v not in labels:
                raise ValueError(f"answer {value!r} is not one of the labels {labels}")
            index = labels.index(v)
        elif re.fullmatch(r"-?\d+", v):
            index = int(v)
        elif v in choices:
            index = choices.index(v)
        else:
            raise ValueError(f"answer {value!r} is not an index, a label or a choice")
    else:
        raise ValueError(f"answer {value!r} has unsupported type {type(value).__name__}")
    if not 0 <= index < len(choices):
        raise ValueError(f"answer index {index} out of range for {len(choices)} choices")
    return index


class MultipleChoiceTask(Task):
    """Pick the choice the model finds most likely."""

    type_name = "multiple_choice"
    request_kind = "loglikelihood"

    @property
    def partial(self) -> bool:
        """Whether this is partial (WinoGrande-style) scoring."""
        return self.spec.doc_to_contexts is not None

    def choices(self, doc: Doc) -> list[str]:
        """The choice strings (for partial scoring: the option-filled contexts)."""
        spec = self.spec
        if isinstance(spec.doc_to_choice, tuple):
            return list(spec.doc_to_choice)
        source = spec.doc_to_contexts if self.partial else spec.doc_to_choice
        assert source is not None
        value = lookup(doc.fields, source)
        if not isinstance(value, list) or not value or not all(isinstance(c, str) for c in value):
            raise ValueError(f"field {source!r} must be a non-empty list of strings")
        return value

    def labels(self, doc: Doc) -> list[str] | None:
        """Labels a string answer is looked up in, if the spec gives any."""
        labels = self.spec.answer_labels
        if labels is None or isinstance(labels, tuple):
            return None if labels is None else list(labels)
        return [str(x) for x in lookup(doc.fields, labels)]

    def gold(self, doc: Doc) -> int:
        """The gold choice index."""
        value = doc.fields[self.spec.answer]
        choices = self.choices(doc)
        # integer answers never need labels (local files store indices, the hub letters)
        labels = None if isinstance(value, int) else self.labels(doc)
        return resolve_gold(value, choices, labels)

    def continuation(self, doc: Doc) -> str:
        """Partial scoring: the shared text after the blank."""
        assert self.spec.doc_to_target is not None
        return render(self.spec.doc_to_target, doc.fields)

    def check_example(self, doc: Doc) -> None:
        self.gold(doc)
        self.example_text(doc)

    def example_text(self, doc: Doc) -> str:
        choices, gold = self.choices(doc), self.gold(doc)
        delim = self.spec.target_delimiter
        if self.partial:
            return choices[gold] + delim + self.continuation(doc)
        return self.doc_text(doc) + delim + choices[gold]

    def doc_text(self, doc: Doc) -> str:
        if self.partial and self.spec.doc_to_text is None:
            # no shared question: the gold-free text is the continuation alone
            return self.continuation(doc)
        return super().doc_text(doc)

    def build_requests(self, doc: Doc) -> list[tuple[str, str]]:
        prefix = self.fewshot_prefix(doc)
        delim = self.spec.target_delimiter
        if self.partial:
            target = delim + self.continuation(doc)
            return [(prefix + ctx, target) for ctx in self.choices(doc)]
        context = prefix + self.doc_text(doc)
        return [(context, delim + choice) for choice in self.choices(doc)]

    def score(self, doc: Doc, requests: list[tuple[str, str]], responses: list[tuple[float, bool]]) -> SampleRecord:
        choices, gold = self.choices(doc), self.gold(doc)
        lls = np.array([float(r[0]) for r in responses])
        # character length of the choice string, as lm-eval; guard the empty choice
        lengths = np.array([float(max(1, len(c))) for c in choices])
        pred = int(np.argmax(lls))
        pred_norm = int(np.argmax(lls / lengths))
        values: dict[str, float] = {}
        if "acc" in self.spec.metrics:
            values["acc"] = float(pred == gold)
        if "acc_norm" in self.spec.metrics:
            values["acc_norm"] = float(pred_norm == gold)
        log = {
            "prompt": [q[0] for q in requests] if self.partial else requests[0][0],
            "continuations": [q[1] for q in requests],
            "choices": choices,
            "target": gold,
            "scores": lls.tolist(),
            "is_greedy": [bool(r[1]) for r in responses],
            "prediction": pred,
            "prediction_norm": pred_norm,
            "correct": pred == gold,
        }
        return SampleRecord(doc.id, values, log, self.group_of(doc))
