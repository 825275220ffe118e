"""Code generation checked by execution, scored with unbiased pass@k (HumanEval, MBPP).

For each problem the model generates ``num_samples`` completions of the prompt
(stopping at e.g. a new top-level ``def``/``class``/``if``/``print``); each
completion is built into a test program from the spec's ``code.program``
template (HumanEval: prompt + completion + the test + ``check(entry_point)``)
and run in :mod:`lmlab.eval.sandbox`. With ``c`` of ``n`` samples passing,
``pass@k = 1 - C(n-c, k) / C(n, k)`` (Chen et al. 2021), averaged over problems.
A completion that hangs, exhausts memory or touches the file system or network
is a failed sample; the run goes on. Without the sandbox nothing is executed
unless ``allow_unsandboxed`` is set (see :func:`lmlab.eval.sandbox.isolation`).
"""

from __future__ import annotations

from typing import Any

from tqdm.auto import tqdm

from lmlab.eval.base import SampleRecord, Task
from lmlab.eval.data import Doc
from lmlab.eval.extract import truncate_at_stop
from lmlab.eval.metrics import pass_at_k
from lmlab.eval.sandbox import Limits, run_programs
from lmlab.eval.spec import CodeSpec
from lmlab.eval.templates import render


class CodeTask(Task):
    """Generate code, run it against the problem's tests, report pass@k."""

    type_name = "code"
    request_kind = "generate"
    executes_code = True
    #: the user's acknowledgement to run completions without the OS sandbox where it is unavailable
    allow_unsandboxed = False

    @property
    def code(self) -> CodeSpec:
        """The spec's ``code`` section (always present for this type)."""
        assert self.spec.code is not None
        return self.spec.code

    def program(self, doc: Doc, completion: str) -> str:
        """The test program for one completion."""
        return render(self.code.program, {**doc.fields, "completion": completion})

    def check_doc(self, doc: Doc) -> None:
        super().check_doc(doc)
        doc.fields[self.spec.answer]  # noqa: B018 - the tests must exist
        self.program(doc, "")

    def check_example(self, doc: Doc) -> None:
        self.doc_text(doc)

    def example_text(self, doc: Doc) -> str:
        target = render(self.spec.doc_to_target, doc.fields) if self.spec.doc_to_target else ""
        return self.doc_text(doc) + self.spec.target_delimiter + target

    def build_requests(self, doc: Doc) -> list[str]:
        return [self.fewshot_prefix(doc) + self.doc_text(doc)] * self.code.num_samples

    def score(self, doc: Doc, requests: list[str], responses: list[str]) -> SampleRecord:
        return self.score_all([doc], [requests], [responses])[0]

    def score_all(
        self, docs: list[Doc], requests: list[list[Any]], responses: list[list[Any]], progress: bool = False
    ) -> list[SampleRecord]:
        stop = self.spec.generation.stop
        completions = [[truncate_at_stop(str(r), stop) for r in rs] for rs in responses]
        programs = [self.program(d, c) for d, cs in zip(docs, completions) for c in cs]
        limits = Limits(timeout_s=self.code.timeout_s, memory_mb=self.code.memory_mb)
        with tqdm(total=len(programs), desc=f"{self.name} (execute)", unit="prog", disable=not progress) as bar:
            results = run_programs(programs, limits, workers=self.code.workers,
                                   allow_unsandboxed=self.allow_unsandboxed, on_done=lambda: bar.update(1))
        records, i = [], 0
        for doc, reqs, comps in zip(docs, requests, completions):
            outcomes = results[i : i + len(comps)]
            i += len(comps)
            n, c = len(comps), sum(o.passed for o in outcomes)
            values = {f"pass@{k}": pass_at_k(n, c, k) for k in self.spec.pass_at_ks if k <= n}
            log = {
                "prompt": reqs[0] if reqs else "",
                "target": doc.fields[self.spec.answer],
                "completions": comps,
                "statuses": [o.status.value for o in outcomes],
                "reasons": [o.reason for o in outcomes],
                "isolation": outcomes[0].isolation if outcomes else "",
                "num_passed": c,
                "prediction": comps[0] if comps else "",
                "correct": c > 0,
            }
            records.append(SampleRecord(doc.id, values, log, self.group_of(doc)))
        return records
