"""Heuristic document filters: Gopher, C4, FineWeb, code, language, and stacks of them.

Every filter is ``filter(doc) -> (keep, reason)`` with its thresholds in a
``Params`` dataclass whose defaults are the published values (for Gopher, C4
and FineWeb: those of datatrove's reference implementations, whose keep/drop
decisions these filters reproduce; see each module). Build stacks with
:class:`FilterStack` (or :func:`default_stack` / :class:`SourceRouter` for the
usual prose-vs-code split).
"""

from __future__ import annotations

from typing import Any, Mapping, MutableMapping

from lmlab.data.prepare.filters.base import (
    DocumentFilter,
    FilterResult,
    FilterStack,
    StackReport,
)
from lmlab.data.prepare.filters.c4 import C4Filter, C4Params
from lmlab.data.prepare.filters.code import CodeFilter, CodeParams
from lmlab.data.prepare.filters.fineweb import FineWebFilter, FineWebParams
from lmlab.data.prepare.filters.gopher import (
    GopherQualityFilter,
    GopherQualityParams,
    GopherRepetitionFilter,
    GopherRepetitionParams,
)
from lmlab.data.prepare.filters.language import LanguageFilter, LanguageParams, english_stopword_score
from lmlab.errors import ConfigError

FILTERS: dict[str, type[DocumentFilter]] = {
    cls.name: cls
    for cls in (GopherQualityFilter, GopherRepetitionFilter, C4Filter, FineWebFilter, CodeFilter, LanguageFilter)
}

# datatrove's FineWeb order: repetition first (cheap rejections of spam), C4 last
# before FineWeb so that FineWeb sees the C4-cleaned lines.
PROSE_FILTERS = ("gopher_repetition", "gopher_quality", "c4", "fineweb")
CODE_FILTERS = ("code",)


def default_stack(kind: str = "prose") -> FilterStack:
    """The standard stack for ``"prose"`` (Gopher + C4 + FineWeb) or ``"code"``."""
    if kind == "prose":
        return FilterStack.from_config(PROSE_FILTERS, name="prose")
    if kind == "code":
        return FilterStack.from_config(CODE_FILTERS, name="code")
    raise ConfigError("filters.kind", f"unknown stack kind {kind!r}", "use 'prose' or 'code'")


class SourceRouter:
    """Send each document to the stack of its source: code sources to the code filters.

    A document goes to ``code`` when its ``source`` is in ``code_sources`` or its
    ``metadata["kind"] == "code"``; otherwise to ``prose``. Both stacks keep their
    own reports.
    """

    def __init__(
        self,
        prose: FilterStack | None = None,
        code: FilterStack | None = None,
        code_sources: tuple[str, ...] = ("code",),
    ):
        self.prose = prose or default_stack("prose")
        self.code = code or default_stack("code")
        self.code_sources = frozenset(code_sources)

    def is_code(self, doc: Mapping[str, Any]) -> bool:
        meta = doc.get("metadata") or {}
        return doc.get("source") in self.code_sources or meta.get("kind") == "code"

    def __call__(self, doc: MutableMapping[str, Any]) -> FilterResult:
        return (self.code if self.is_code(doc) else self.prose)(doc)


__all__ = [
    "C4Filter",
    "C4Params",
    "CodeFilter",
    "CodeParams",
    "DocumentFilter",
    "FILTERS",
    "FilterResult",
    "FilterStack",
    "FineWebFilter",
    "FineWebParams",
    "GopherQualityFilter",
    "GopherQualityParams",
    "GopherRepetitionFilter",
    "GopherRepetitionParams",
    "LanguageFilter",
    "LanguageParams",
    "SourceRouter",
    "StackReport",
    "default_stack",
    "english_stopword_score",
]
