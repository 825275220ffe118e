"""FineWeb's custom quality rules (Penedo et al. 2024, "The FineWeb Datasets", §3.5), as datatrove applies them.

Three line rules, over the document's non-blank lines (taken as they are, not
stripped): drop it when the fraction of lines ending in terminal punctuation is
below 0.12, when lines of at most 30 characters are more than 0.67 of them, or
when the characters of lines that repeat an earlier line are more than 0.01 of
the document's characters (newlines excluded); plus datatrove's "list" rule,
more than 0.3 newlines per word. The defaults are those of datatrove's
``FineWebQualityFilter``, which built the FineWeb dataset; the paper's text
gives 0.1 for the duplicated-character fraction and has no list rule (set
``max_dup_line_char_fraction=0.1, max_newline_word_ratio=None`` for that
reading). Comparisons at the exact threshold are strict, as in datatrove.

Words for the list rule are the tokens of datatrove's English tokenizer
(:func:`lmlab.data.prepare.filters.words.words`). One difference remains,
outside English text: the terminal punctuation is that of the common scripts
below (datatrove lists every Unicode sentence terminal). On the 499 DCLM web
pages the decisions agree on every page (``tests/test_filter_agreement.py``).
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
    """FineWeb thresholds (defaults: datatrove's ``FineWebQualityFilter``). ``None`` disables a rule."""

    min_line_punct_fraction: float | None = 0.12
    line_punct_exclude_zero: bool = False
    max_short_line_fraction: float | None = 0.67
    short_line_length: int = 30
    max_dup_line_char_fraction: float | None = 0.01
    max_newline_word_ratio: float | None = 0.3
    terminal_punctuation: tuple[str, ...] = FINEWEB_TERMINAL_PUNCTUATION

    def __post_init__(self) -> None:
        check_fraction("fineweb.min_line_punct_fraction", self.min_line_punct_fraction)
        check_fraction("fineweb.max_short_line_fraction", self.max_short_line_fraction)
        check_positive("fineweb.short_line_length", self.short_line_length)
        check_fraction("fineweb.max_dup_line_char_fraction", self.max_dup_line_char_fraction)
        check_positive("fineweb.max_newline_word_ratio", self.max_newline_word_ratio)
        self.terminal_punctuation = tuple(self.terminal_punctuation)


class FineWebFilter(DocumentFilter):
    """FineWeb line-level rules over the non-blank lines of a document (unstripped, as in datatrove).

    Reasons: ``empty``, ``line_punct_ratio``, ``short_line_ratio``,
    ``dup_line_char_ratio``, ``list_ratio``.
    """

    name = "fineweb"
    Params = FineWebParams

    def check(self, stats: DocStats) -> FilterResult:
        p = self.params
        # datatrove keeps a line's surrounding spaces: "end. " does not end in punctuation
        lines = [s for s in stats.lines if s.strip()]
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
            newlines = stats.text.count("\n")
            # Every whitespace word is at least one token, so only a page over the limit with
            # whitespace words needs datatrove's token count.
            if newlines / stats.n_words > p.max_newline_word_ratio:
                if newlines / len(stats.ref_words) > p.max_newline_word_ratio:
                    return False, "list_ratio"
        return True, None
