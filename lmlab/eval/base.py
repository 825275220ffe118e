"""The task base class shared by all task types.

A task owns its docs and few-shot sampler, turns each doc into model requests,
scores the model's responses per doc, and aggregates per-doc metrics. The
harness does the model calls in between, batched across the whole task.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from collections import defaultdict
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, ClassVar

from lmlab.errors import ConfigError
from lmlab.eval import metrics as M
from lmlab.eval.data import Doc, DocSet, build_docs, load_docs, warn_skipped
from lmlab.eval.fewshot import FewshotSampler
from lmlab.eval.spec import TaskSpec
from lmlab.eval.templates import render


@dataclass
class SampleRecord:
    """The outcome for one doc: per-doc metric values and a log entry for the sample file."""

    doc_id: int
    metrics: dict[str, float]
    log: dict[str, Any]
    group: str | None = None


def stderr_key(metric: str) -> str:
    """lm-eval's stderr key: ``acc`` -> ``acc_stderr``, ``exact_match,f`` -> ``exact_match_stderr,f``."""
    name, sep, filt = metric.partition(",")
    return f"{name}_stderr{sep}{filt}"


class Task(ABC):
    """Base class of the task types; construct through :func:`lmlab.eval.tasks.load_task`."""

    type_name: ClassVar[str]
    #: which ``LanguageModel`` method answers this task's requests
    request_kind: ClassVar[str]  # "loglikelihood" | "generate"
    #: whether scoring runs model-written code (then the harness checks for the sandbox first)
    executes_code: ClassVar[bool] = False
    #: how a per-doc metric is aggregated when not by the mean (metric name -> function)
    aggregations: ClassVar[dict[str, Callable[[Sequence[float]], float]]] = {}

    def __init__(self, spec: TaskSpec, num_fewshot: int | None = None, seed: int = 1234):
        self.spec = spec
        self.num_fewshot = spec.fewshot.num if num_fewshot is None else num_fewshot
        if self.num_fewshot < 0:
            raise ConfigError("num_fewshot", f"must be >= 0, got {self.num_fewshot}", None)
        self.seed = spec.fewshot.seed if spec.fewshot.seed is not None else seed
        self.docs: list[Doc] = []
        self.skipped_rows = 0
        self.source = ""
        self.sampler = FewshotSampler([], 0)

    @property
    def name(self) -> str:
        """The task name from the spec."""
        return self.spec.name

    # --- loading -------------------------------------------------------------------------

    def load(self, data_dir: Path, online: bool = False) -> Task:
        """Read docs and the few-shot pool from ``data_dir`` (or the hub); returns self."""
        docset = load_docs(self.spec, data_dir, self.check_doc, online=online)
        self._set_docs(docset)
        if self.num_fewshot > 0:
            f, hub = self.spec.fewshot, self.spec.data.hf
            if f.path is not None:
                pool = load_docs(self.spec, data_dir, self.check_example, online=online, path=f.path)
            elif f.split is not None or (docset.source.startswith("hf:") and hub and hub.fewshot_split):
                hub_split = (hub.fewshot_split if hub else None) or f.split
                pool = load_docs(
                    self.spec, data_dir, self.check_example, online=online, split=f.split, hub_split=hub_split
                )
            else:
                pool = None  # draw from the evaluation docs themselves
            self._set_pool(pool)
        return self

    def load_rows(self, rows: Sequence[dict], fewshot_rows: Sequence[dict] | None = None) -> Task:
        """Use in-memory rows (same transform, field mapping and checks as files); returns self."""
        spec = self.spec
        docset = build_docs(
            ((i, dict(r)) for i, r in enumerate(rows)), "<rows>", spec.data.transform, spec.data.fields, self.check_doc
        )
        self._set_docs(docset)
        pool = None
        if fewshot_rows is not None:
            pool = build_docs(
                ((i, dict(r)) for i, r in enumerate(fewshot_rows)), "<fewshot rows>",
                spec.data.transform, spec.data.fields, self.check_example,
            )
        self._set_pool(pool)
        return self

    def _set_docs(self, docset: DocSet) -> None:
        warn_skipped(self.name, docset)
        if not docset.docs:
            raise ConfigError(
                f"{self.name}.data", f"no usable rows in {docset.source} ({'; '.join(docset.problems) or 'empty'})",
                "check data.fields, answer and the templates against the data",
            )
        self.docs, self.skipped_rows, self.source = docset.docs, docset.skipped, docset.source

    def _set_pool(self, pool: DocSet | None) -> None:
        f = self.spec.fewshot
        if pool is not None:
            warn_skipped(self.name, pool)
        self.sampler = FewshotSampler(
            pool.docs if pool is not None else self.docs,
            self.num_fewshot,
            sampler=f.sampler,
            seed=self.seed,
            group_by=f.group_by,
            exclude_self=pool is None,
        )

    # --- per-type hooks --------------------------------------------------------------------

    def check_doc(self, doc: Doc) -> None:
        """Raise ``KeyError``/``ValueError`` if ``doc`` cannot be evaluated (it is then skipped)."""
        self.check_example(doc)
        if self.spec.description:
            render(self.spec.description, doc.fields)
        if self.num_fewshot > 0 and self.spec.fewshot.group_by is not None:
            doc.fields[self.spec.fewshot.group_by]  # noqa: B018 - KeyError marks the row malformed

    def check_example(self, doc: Doc) -> None:
        """Raise if ``doc`` cannot serve as a solved few-shot example."""
        self.example_text(doc)

    def doc_text(self, doc: Doc) -> str:
        """The doc's prompt without few-shot examples."""
        assert self.spec.doc_to_text is not None
        return render(self.spec.doc_to_text, doc.fields)

    @abstractmethod
    def example_text(self, doc: Doc) -> str:
        """The doc as a solved example (prompt, delimiter, answer) for few-shot prompts."""

    @abstractmethod
    def build_requests(self, doc: Doc) -> list[Any]:
        """The model requests for one doc: ``(context, continuation)`` pairs or prompts."""

    @abstractmethod
    def score(self, doc: Doc, requests: list[Any], responses: list[Any]) -> SampleRecord:
        """Per-doc metrics and log from the model's responses to ``build_requests(doc)``."""

    def score_all(
        self, docs: list[Doc], requests: list[list[Any]], responses: list[list[Any]], progress: bool = False
    ) -> list[SampleRecord]:
        """Score every doc (code tasks override this to run programs in parallel)."""
        return [self.score(d, q, r) for d, q, r in zip(docs, requests, responses)]

    def decontamination_text(self, doc: Doc, include_answer: bool = True) -> str:
        """The doc's text as it could appear in training data: the prompt, and the answer if asked."""
        return self.example_text(doc) if include_answer else self.doc_text(doc)

    # --- shared helpers ---------------------------------------------------------------------

    def fewshot_prefix(self, doc: Doc) -> str:
        """Description plus solved examples, each followed by the few-shot delimiter (lm-eval layout)."""
        parts = [render(self.spec.description, doc.fields)] if self.spec.description else []
        for example in self.sampler.select(doc):
            parts.append(self.example_text(example) + self.spec.fewshot_delimiter)
        return "".join(parts)

    def group_of(self, doc: Doc) -> str | None:
        """The doc's subtask (``subtask_field`` value), if the spec asks for a breakdown."""
        field_name = self.spec.subtask_field
        return None if field_name is None else str(doc.fields.get(field_name))

    def aggregate(self, records: Sequence[SampleRecord], bootstrap_iters: int = 1000) -> dict[str, Any]:
        """Task-level metrics with standard errors, in the order the records report them."""
        names: list[str] = []
        for r in records:
            names.extend(m for m in r.metrics if m not in names)
        out: dict[str, Any] = {}
        for name in names:
            values = [r.metrics[name] for r in records if name in r.metrics]
            fn = self.aggregations.get(name.partition(",")[0])
            if fn is None:
                out[name] = M.mean(values)
                out[stderr_key(name)] = M.mean_stderr(values)
            else:
                out[name] = fn(values)
                out[stderr_key(name)] = M.bootstrap_stderr(fn, values, iters=bootstrap_iters, seed=self.seed)
        out["n"] = len(records)
        return out

    def aggregate_groups(self, records: Sequence[SampleRecord], bootstrap_iters: int = 1000) -> dict[str, dict]:
        """``aggregate`` per subtask group (empty without ``subtask_field``)."""
        groups: dict[str, list[SampleRecord]] = defaultdict(list)
        for r in records:
            if r.group is not None:
                groups[r.group].append(r)
        return {g: self.aggregate(rs, bootstrap_iters) for g, rs in sorted(groups.items())}
