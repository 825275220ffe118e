"""Generation with few-shot prompts, answer extraction and exact match (GSM8K, MATH-style).

As lm-eval's ``generate_until`` tasks: the model continues the prompt until a
stop string; each configured filter extracts an answer (GSM8K: ``strict-match``
takes the number after ``#### ``, ``flexible-extract`` the last number); the
extracted answer and the reference go through the same exact-match
normalisation (e.g. dropping ``,``, ``$``, everything up to ``#### `` and a
final ``.``) and are compared. One metric per filter:
``exact_match,<filter name>``.
"""

from __future__ import annotations

from lmlab.eval.base import SampleRecord, Task
from lmlab.eval.data import Doc
from lmlab.eval.extract import apply_filter, truncate_at_stop
from lmlab.eval.metrics import exact_match
from lmlab.eval.spec import FilterSpec
from lmlab.eval.templates import render

_RAW = FilterSpec(name="none", function="none")


class GenerationTask(Task):
    """Generate an answer and compare it with the reference."""

    type_name = "generation"
    request_kind = "generate"

    def reference(self, doc: Doc) -> str:
        """The reference answer (also the few-shot target)."""
        if self.spec.doc_to_target is not None:
            return render(self.spec.doc_to_target, doc.fields)
        value = doc.fields[self.spec.answer]
        if value is None:
            raise ValueError(f"field {self.spec.answer!r} is empty")
        return str(value)

    def example_text(self, doc: Doc) -> str:
        return self.doc_text(doc) + self.spec.target_delimiter + self.reference(doc)

    def build_requests(self, doc: Doc) -> list[str]:
        return [self.fewshot_prefix(doc) + self.doc_text(doc)]

    def score(self, doc: Doc, requests: list[str], responses: list[str]) -> SampleRecord:
        output = truncate_at_stop(str(responses[0]), self.spec.generation.stop)
        reference = self.reference(doc)
        em = self.spec.exact_match
        opts = dict(
            ignore_case=em.ignore_case, ignore_punctuation=em.ignore_punctuation,
            regexes_to_ignore=em.regexes_to_ignore,
        )
        values: dict[str, float] = {}
        extracted: dict[str, str] = {}
        correct: dict[str, bool] = {}
        for f in self.spec.filters or (_RAW,):
            key = "exact_match" if not self.spec.filters else f"exact_match,{f.name}"
            extracted[f.name] = apply_filter(f, output)
            correct[f.name] = exact_match(extracted[f.name], reference, **opts)
            values[key] = float(correct[f.name])
        log = {
            "prompt": requests[0],
            "target": reference,
            "output": output,
            "prediction": extracted,
            "correct": correct,
        }
        return SampleRecord(doc.id, values, log, self.group_of(doc))
