"""The filter protocol, parameter validation helpers and the :class:`FilterStack`.

A filter is a callable ``filter(doc) -> (keep, reason)``: ``keep`` says whether
the document survives, ``reason`` names the rule that dropped it (``None`` when
kept). Filters do their work in ``check(stats)`` over a shared
:class:`~lmlab.data.prepare.stats.DocStats`, so a stack computes each view of a
document once. A filter that rewrites text (C4 line filtering) overrides
``evaluate`` and returns the new text; ``__call__`` then stores it in
``doc["text"]`` (in place) when the document is kept.
"""

from __future__ import annotations

import dataclasses
from abc import ABC, abstractmethod
from collections import Counter
from dataclasses import dataclass, field
from typing import Any, ClassVar, Iterable, Iterator, Mapping, MutableMapping, Sequence

from lmlab.data.prepare.stats import DocStats
from lmlab.errors import ConfigError

FilterResult = tuple[bool, "str | None"]


def check_fraction(field_name: str, value: float | None) -> None:
    """Raise ``ConfigError`` unless ``value`` is ``None`` or within [0, 1]."""
    if value is not None and not (0.0 <= float(value) <= 1.0):
        raise ConfigError(
            field_name,
            f"must be a fraction in [0, 1], got {value}",
            "use a value between 0 and 1, or null to disable the rule",
        )


def check_positive(field_name: str, value: float | None, allow_zero: bool = False) -> None:
    """Raise ``ConfigError`` unless ``value`` is ``None`` or positive (or zero when allowed)."""
    if value is None:
        return
    if value < 0 or (value == 0 and not allow_zero):
        bound = ">= 0" if allow_zero else "> 0"
        raise ConfigError(
            field_name, f"must be {bound}, got {value}", f"use a value {bound}, or null to disable the rule"
        )


def check_range(field_lo: str, lo: float | None, field_hi: str, hi: float | None) -> None:
    """Raise ``ConfigError`` when both bounds are set and ``lo > hi``."""
    if lo is not None and hi is not None and lo > hi:
        raise ConfigError(field_lo, f"{lo} is larger than {field_hi}={hi}", f"make {field_lo} <= {field_hi}")


class DocumentFilter(ABC):
    """Base class of the heuristic document filters.

    Subclasses set ``name``, ``Params`` (a dataclass holding the thresholds, with
    the published values as defaults) and implement :meth:`check`.
    """

    name: ClassVar[str] = "filter"
    Params: ClassVar[type] = object
    modifies_text: ClassVar[bool] = False

    def __init__(self, params: Any = None, **overrides: Any):
        if params is None:
            params = self.Params()
        elif isinstance(params, Mapping):
            overrides = {**params, **overrides}
            params = self.Params()
        elif not isinstance(params, self.Params):
            raise ConfigError(
                f"{self.name}.params",
                f"expected {self.Params.__name__}, got {type(params).__name__}",
                "pass the filter's Params dataclass or a dict of its fields",
            )
        if overrides:
            known = {f.name for f in dataclasses.fields(self.Params)}
            unknown = sorted(set(overrides) - known)
            if unknown:
                raise ConfigError(
                    f"{self.name}.{unknown[0]}", "unknown parameter", f"known parameters: {', '.join(sorted(known))}"
                )
            params = dataclasses.replace(params, **overrides)
        self.params = params
        self._setup()

    def _setup(self) -> None:  # noqa: B027 - optional hook, deliberately a no-op by default
        """Precompute anything derived from ``self.params`` (compiled regexes, sets)."""

    @abstractmethod
    def check(self, stats: DocStats) -> FilterResult:
        """Decide on one document given its stats: ``(keep, reason)``."""

    def evaluate(self, stats: DocStats) -> tuple[bool, str | None, str | None]:
        """``(keep, reason, new_text)``; ``new_text`` is ``None`` unless the filter rewrites text."""
        keep, reason = self.check(stats)
        return keep, reason, None

    def __call__(self, doc: MutableMapping[str, Any] | str) -> FilterResult:
        keep, reason, new_text = self.evaluate(DocStats.of(doc))
        if keep and new_text is not None and not isinstance(doc, str):
            doc["text"] = new_text
        return keep, reason

    def __repr__(self) -> str:
        return f"{type(self).__name__}({self.params})"


@dataclass
class StackReport:
    """Counts of a :class:`FilterStack`: documents seen/kept, drops per ``filter:reason``."""

    seen: int = 0
    kept: int = 0
    modified: int = 0
    chars_in: int = 0
    chars_out: int = 0
    dropped: Counter = field(default_factory=Counter)

    @property
    def dropped_total(self) -> int:
        return self.seen - self.kept

    def as_dict(self) -> dict[str, Any]:
        return {
            "seen": self.seen,
            "kept": self.kept,
            "dropped": self.dropped_total,
            "modified": self.modified,
            "chars_in": self.chars_in,
            "chars_out": self.chars_out,
            "dropped_by_reason": dict(self.dropped.most_common()),
        }


class FilterStack:
    """Run filters in order on each document, sharing one :class:`DocStats`, and count outcomes.

    The first filter that drops a document decides its reason, recorded as
    ``"<filter name>:<reason>"`` in :attr:`report`. A filter that rewrites the text
    updates ``doc["text"]`` in place and the following filters see the new text.
    """

    def __init__(self, filters: Sequence[DocumentFilter], name: str = "stack"):
        if not filters:
            raise ConfigError(f"{name}.filters", "the stack has no filters", "list at least one filter")
        self.filters = list(filters)
        self.name = name
        self.report = StackReport()

    @classmethod
    def from_config(cls, specs: Iterable[str | Mapping[str, Any]], name: str = "stack") -> "FilterStack":
        """Build from names or ``{"name": ..., <param>: ...}`` dicts (see ``FILTERS``)."""
        from lmlab.data.prepare.filters import FILTERS

        filters: list[DocumentFilter] = []
        for i, spec in enumerate(specs):
            if isinstance(spec, str):
                spec = {"name": spec}
            spec = dict(spec)
            fname = spec.pop("name", None)
            if fname not in FILTERS:
                raise ConfigError(
                    f"{name}.filters[{i}].name",
                    f"unknown filter {fname!r}",
                    f"use one of: {', '.join(sorted(FILTERS))}",
                )
            filters.append(FILTERS[fname](**spec))
        return cls(filters, name=name)

    def __call__(self, doc: MutableMapping[str, Any]) -> FilterResult:
        stats = DocStats.of(doc)
        self.report.seen += 1
        self.report.chars_in += stats.n_chars
        changed = False
        for f in self.filters:
            keep, reason, new_text = f.evaluate(stats)
            if not keep:
                self.report.dropped[f"{f.name}:{reason}"] += 1
                return False, f"{f.name}:{reason}"
            if new_text is not None and new_text != stats.text:
                doc["text"] = new_text
                stats = DocStats(new_text)
                changed = True
        self.report.kept += 1
        self.report.modified += changed
        self.report.chars_out += stats.n_chars
        return True, None

    def explain(self, doc: Mapping[str, Any]) -> dict[str, FilterResult]:
        """Every filter's verdict on ``doc`` (no short-circuit, no counting, doc not modified).

        Text rewrites still flow to later filters, as in :meth:`__call__`.
        """
        stats = DocStats.of(doc)
        out: dict[str, FilterResult] = {}
        for f in self.filters:
            keep, reason, new_text = f.evaluate(stats)
            out[f.name] = (keep, reason)
            if keep and new_text is not None and new_text != stats.text:
                stats = DocStats(new_text)
        return out

    def filter(self, docs: Iterable[MutableMapping[str, Any]]) -> Iterator[MutableMapping[str, Any]]:
        """Yield the kept documents (with rewritten text where a filter changed it)."""
        for doc in docs:
            if self(doc)[0]:
                yield doc

    def reset(self) -> None:
        self.report = StackReport()

    def __repr__(self) -> str:
        return f"FilterStack({self.name!r}, {[f.name for f in self.filters]})"
