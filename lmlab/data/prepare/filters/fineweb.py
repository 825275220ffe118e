"""FineWeb's custom quality rules (Penedo et al. 2024, "The FineWeb Datasets", §3.5).

The paper lists three rules: drop a document when the fraction of lines ending
in punctuation is at most 0.12, when the fraction of characters in duplicated
lines is at least 0.1, or when the fraction of lines of at most 30 characters is
at least 0.67. Those are the defaults; the comparisons at the exact threshold
are strict here, as in datatrove (a fraction of exactly 0.12 passes). datatrove's ``FineWebQualityFilter`` differs: its
duplicated-character default is 0.01 and it adds a "list" rule (newlines per
word > 0.3); set ``max_dup_line_char_fraction=0.01`` and
``max_newline_word_ratio=0.3`` to reproduce it.
"""

from __future__ import annotations

from collections import Counter
from dataclasses import dataclass

from lmlab.data.prepare.filters.base import (
    DocumentFilter,
    FilterResult,
    check_fraction,
    check_positive,
)
from lmlab.data.prepare.stats import DocStats

# Sentence-final punctuation of the common scripts (Latin, CJK full-width,
# Devanagari danda, Arabic question mark, Armenian full stop, Ethiopic).
FINEWEB_TERMINAL_PUNCTUATION = (
    ".",
    "!",
    "?",
    "…",
    "。",
    "！",
    "？",
    "．",
    "｡",
    "।",
    "॥",
    "؟",
    "۔",
    "։",
    "።",
    "፧",
    "‼",
    "⁇",
    "⁈",
    "⁉",
)


@dataclass
class FineWebParams:
    """FineWeb thresholds (defaults: the paper). ``None`` disables a rule."""

    min_line_punct_fraction: float | None = 0.12
    line_punct_exclude_zero: bool = False
    max_short_line_fraction: float | None = 0.67
    short_line_length: int = 30
    max_dup_line_char_fraction: float | None = 0.1
    max_newline_word_ratio: float | None = None
    terminal_punctuation: tuple[str, ...] = FINEWEB_TERMINAL_PUNCTUATION

    def __post_init__(self) -> None:
        check_fraction("fineweb.min_line_punct_fraction", self.min_line_punct_fraction)
        check_fraction("fineweb.max_short_line_fraction", self.max_short_line_fraction)
        check_positive("fineweb.short_line_length", self.short_line_length)
        check_fraction("fineweb.max_dup_line_char_fraction", self.max_dup_line_char_fraction)
        check_positive("fineweb.max_newline_word_ratio", self.max_newline_word_ratio)
        self.terminal_punctuation = tuple(self.terminal_punctuation)


class FineWebFilter(DocumentFilter):
    """FineWeb line-level rules over the non-blank lines of a document.

    Reasons: ``empty``, ``line_punct_ratio``, ``short_line_ratio``,
    ``dup_line_char_ratio``, ``list_ratio``.
    """

    name = "fineweb"
    Params = FineWebParams

    def check(self, stats: DocStats) -> FilterResult:
        p = self.params
        lines = stats.nonempty_lines
        if not lines:
            return False, "empty"
        n = len(lines)
        if p.min_line_punct_fraction is not None:
            ends = p.terminal_punctuation
            ratio = sum(1 for s in lines if s.endswith(ends)) / n
            if ratio < p.min_line_punct_fraction and not (ratio == 0 and p.line_punct_exclude_zero):
                return False, "line_punct_ratio"
        if p.max_short_line_fraction is not None:
            limit = p.short_line_length
            if sum(1 for s in lines if len(s) <= limit) / n > p.max_short_line_fraction:
                return False, "short_line_ratio"
        if p.max_dup_line_char_fraction is not None:
            counts = Counter(lines)
            if len(counts) < n:
                dup_chars = sum(len(k) * (v - 1) for k, v in counts.items() if v > 1)
                denom = max(1, stats.n_chars - stats.text.count("\n"))
                if dup_chars / denom > p.max_dup_line_char_fraction:
                    return False, "dup_line_char_ratio"
        if p.max_newline_word_ratio is not None and stats.n_words:
            if stats.text.count("\n") / stats.n_words > p.max_newline_word_ratio:
                return False, "list_ratio"
        return True, None
