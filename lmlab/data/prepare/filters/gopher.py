"""Gopher quality and repetition filters (Rae et al. 2021, "Scaling Language Models", App. A).

Words are whitespace-separated tokens, as in the paper's description, with one
exception: the "80% of words contain a letter" rule is sensitive to how
punctuation is tokenised, and the paper does not say. With whitespace tokens
almost every web page passes (a trailing comma rides on its word); with word
tokenisers that split leading/trailing punctuation into tokens of their own
(spaCy, NLTK, and so datatrove's reference implementation used for FineWeb) the
rule removes punctuation- and number-heavy pages. The default,
``alpha_word_split="edge_punctuation"``, counts tokens that way (each leading or
trailing punctuation character of a whitespace word is a token, inner
punctuation as in "e.g." or "3.5" stays inside); on the DCLM human-labelled
tuning pages it is the better of the two at the published 0.8 threshold
(whole Gopher+C4+FineWeb stack: 0.610 vs 0.573 accuracy on the 218 tuning pages).
``"whitespace"`` gives the literal reading. Lines are split on newlines;
paragraphs on blank lines. Character fractions in the repetition filter are measured on
non-whitespace characters, so the numerator (characters of words) and the
denominator are counted the same way.
"""

from __future__ import annotations

import re
from collections import Counter
from dataclasses import dataclass

import numpy as np

from lmlab.data.prepare.filters.base import (
    DocumentFilter,
    FilterResult,
    check_fraction,
    check_positive,
    check_range,
)
from lmlab.data.prepare.stats import DocStats
from lmlab.errors import ConfigError

GOPHER_STOP_WORDS = ("the", "be", "to", "of", "and", "that", "have", "with")

# Whitespace tokens without any letter (digits, symbols): Gopher's "alphabetic"
# rule. The symbol-only tokens (not counted as words) are the subset without digits.
_NO_LETTER_TOKEN_RE = re.compile(r"(?<!\S)(?:[^\w\s]|[\d_])+(?!\S)")
_DIGIT_RE = re.compile(r"\d")
# Punctuation runs at the start / end of a whitespace token (symbol-only tokens
# match both whole); used for edge_punctuation token counting.
_LEADING_PUNCT_RE = re.compile(r"(?<!\S)[^\w\s]+")
_TRAILING_PUNCT_RE = re.compile(r"[^\w\s]+(?!\S)")
_BULLET_LINE_RE = re.compile(r"^[ \t]*[•●○◦▪▫‣⁃■□➢►▶\-*]", re.MULTILINE)
_ELLIPSIS_LINE_RE = re.compile(r"(?:\.\.\.|…)[ \t]*$", re.MULTILINE)


@dataclass
class GopherQualityParams:
    """Thresholds of the Gopher quality rules (defaults: Rae et al. 2021, Table A1 / App. A.1.1).

    ``None`` disables a rule.
    """

    min_words: int | None = 50
    max_words: int | None = 100_000
    min_mean_word_length: float | None = 3.0
    max_mean_word_length: float | None = 10.0
    max_symbol_word_ratio: float | None = 0.1
    max_bullet_line_fraction: float | None = 0.9
    max_ellipsis_line_fraction: float | None = 0.3
    min_alpha_word_fraction: float | None = 0.8
    min_stop_words: int | None = 2
    stop_words: tuple[str, ...] = GOPHER_STOP_WORDS
    alpha_word_split: str = "edge_punctuation"

    def __post_init__(self) -> None:
        if self.alpha_word_split not in ("edge_punctuation", "whitespace"):
            raise ConfigError(
                "gopher_quality.alpha_word_split",
                f"unknown value {self.alpha_word_split!r}",
                "use 'edge_punctuation' or 'whitespace'",
            )
        check_positive("gopher_quality.min_words", self.min_words, allow_zero=True)
        check_positive("gopher_quality.max_words", self.max_words)
        check_range("gopher_quality.min_words", self.min_words, "gopher_quality.max_words", self.max_words)
        check_positive("gopher_quality.min_mean_word_length", self.min_mean_word_length, allow_zero=True)
        check_positive("gopher_quality.max_mean_word_length", self.max_mean_word_length)
        check_range(
            "gopher_quality.min_mean_word_length",
            self.min_mean_word_length,
            "gopher_quality.max_mean_word_length",
            self.max_mean_word_length,
        )
        check_positive("gopher_quality.max_symbol_word_ratio", self.max_symbol_word_ratio, allow_zero=True)
        check_fraction("gopher_quality.max_bullet_line_fraction", self.max_bullet_line_fraction)
        check_fraction("gopher_quality.max_ellipsis_line_fraction", self.max_ellipsis_line_fraction)
        check_fraction("gopher_quality.min_alpha_word_fraction", self.min_alpha_word_fraction)
        check_positive("gopher_quality.min_stop_words", self.min_stop_words, allow_zero=True)
        if self.min_stop_words and len(set(self.stop_words)) < self.min_stop_words:
            raise ConfigError(
                "gopher_quality.stop_words",
                f"has {len(set(self.stop_words))} distinct words but min_stop_words={self.min_stop_words}",
                "list more stop words or lower min_stop_words",
            )


class GopherQualityFilter(DocumentFilter):
    """Gopher quality heuristics: length, word length, symbols, bullets, ellipses, letters, stop words.

    Reasons: ``too_few_words``, ``too_many_words``, ``short_mean_word_length``,
    ``long_mean_word_length``, ``too_many_hashes``, ``too_many_ellipses``,
    ``too_many_bullet_lines``, ``too_many_ellipsis_lines``, ``too_few_alpha_words``,
    ``too_few_stop_words``.
    """

    name = "gopher_quality"
    Params = GopherQualityParams

    def _setup(self) -> None:
        words = "|".join(re.escape(w.lower()) for w in sorted(set(self.params.stop_words)))
        self._stop_re = re.compile(r"\b(?:%s)\b" % words) if words else None

    def check(self, stats: DocStats) -> FilterResult:
        p = self.params
        text = stats.text
        n_tokens = stats.n_words
        no_letter = _NO_LETTER_TOKEN_RE.findall(text) if n_tokens else []
        symbol_tokens = [t for t in no_letter if not _DIGIT_RE.search(t)]
        n_words = n_tokens - len(symbol_tokens)
        if p.min_words is not None and n_words < p.min_words:
            return False, "too_few_words"
        if p.max_words is not None and n_words > p.max_words:
            return False, "too_many_words"
        if n_words == 0:
            # Only reachable with min_words disabled; nothing below is defined.
            return True, None
        mean_len = (stats.n_word_chars - sum(map(len, symbol_tokens))) / n_words
        if p.min_mean_word_length is not None and mean_len < p.min_mean_word_length:
            return False, "short_mean_word_length"
        if p.max_mean_word_length is not None and mean_len > p.max_mean_word_length:
            return False, "long_mean_word_length"
        if p.max_symbol_word_ratio is not None:
            if text.count("#") / n_tokens > p.max_symbol_word_ratio:
                return False, "too_many_hashes"
            if (text.count("...") + text.count("…")) / n_tokens > p.max_symbol_word_ratio:
                return False, "too_many_ellipses"
        n_lines = len(stats.nonempty_lines)
        if n_lines:
            if p.max_bullet_line_fraction is not None:
                if len(_BULLET_LINE_RE.findall(text)) / n_lines > p.max_bullet_line_fraction:
                    return False, "too_many_bullet_lines"
            if p.max_ellipsis_line_fraction is not None:
                if len(_ELLIPSIS_LINE_RE.findall(text)) / n_lines > p.max_ellipsis_line_fraction:
                    return False, "too_many_ellipsis_lines"
        if p.min_alpha_word_fraction is not None:
            with_letter = n_tokens - len(no_letter)
            if p.alpha_word_split == "whitespace":
                n_split = n_tokens
            else:
                # Each edge punctuation character is a token; a symbol-only token is
                # matched whole by both edge regexes but must count once per character.
                n_split = n_words - sum(map(len, symbol_tokens))
                n_split += sum(map(len, _LEADING_PUNCT_RE.findall(text)))
                n_split += sum(map(len, _TRAILING_PUNCT_RE.findall(text)))
            alpha = with_letter / n_split
            if alpha < p.min_alpha_word_fraction:
                return False, "too_few_alpha_words"
        if p.min_stop_words and self._stop_re is not None:
            seen: set[str] = set()
            for m in self._stop_re.finditer(stats.lower):
                seen.add(m.group())
                if len(seen) >= p.min_stop_words:
                    break  # usually within the first sentence
            else:
                return False, "too_few_stop_words"
        return True, None


def _duplicate_counts(items: list[str]) -> tuple[int, int]:
    """(number of items that repeat an earlier one, characters in those repeats)."""
    counts = Counter(items)
    n_dup = len(items) - len(counts)
    if not n_dup:
        return 0, 0
    return n_dup, sum(len(k) * (v - 1) for k, v in counts.items() if v > 1)


@dataclass
class GopherRepetitionParams:
    """Thresholds of the Gopher repetition rules (defaults: Rae et al. 2021, Table A1).

    ``top_ngram_char_fractions``: ``(n, max fraction)`` of characters covered by the
    most frequent n-gram. ``dup_ngram_char_fractions``: ``(n, max fraction)`` of
    characters covered by n-grams that repeat an earlier occurrence.
    """

    max_dup_line_fraction: float | None = 0.3
    max_dup_para_fraction: float | None = 0.3
    max_dup_line_char_fraction: float | None = 0.2
    max_dup_para_char_fraction: float | None = 0.2
    top_ngram_char_fractions: tuple[tuple[int, float], ...] = ((2, 0.20), (3, 0.18), (4, 0.16))
    dup_ngram_char_fractions: tuple[tuple[int, float], ...] = (
        (5, 0.15),
        (6, 0.14),
        (7, 0.13),
        (8, 0.12),
        (9, 0.11),
        (10, 0.10),
    )

    def __post_init__(self) -> None:
        for f in (
            "max_dup_line_fraction",
            "max_dup_para_fraction",
            "max_dup_line_char_fraction",
            "max_dup_para_char_fraction",
        ):
            check_fraction(f"gopher_repetition.{f}", getattr(self, f))
        for fname in ("top_ngram_char_fractions", "dup_ngram_char_fractions"):
            pairs = tuple(tuple(x) for x in getattr(self, fname))
            for n, frac in pairs:
                if int(n) != n or n < 1:
                    raise ConfigError(
                        f"gopher_repetition.{fname}",
                        f"n-gram size {n} is not a positive integer",
                        "use pairs like [5, 0.15]",
                    )
                check_fraction(f"gopher_repetition.{fname}[{n}]", frac)
            ns = [n for n, _ in pairs]
            if ns != sorted(set(ns)):
                raise ConfigError(
                    f"gopher_repetition.{fname}",
                    f"n-gram sizes {ns} are not strictly increasing",
                    "list each n once, smallest first",
                )
            object.__setattr__(self, fname, pairs)


class GopherRepetitionFilter(DocumentFilter):
    """Gopher repetition heuristics over lines, paragraphs and word n-grams.

    Reasons: ``dup_para_fraction``, ``dup_para_char_fraction``, ``dup_line_fraction``,
    ``dup_line_char_fraction``, ``top_<n>_gram``, ``dup_<n>_grams``.
    """

    name = "gopher_repetition"
    Params = GopherRepetitionParams

    def check(self, stats: DocStats) -> FilterResult:
        p = self.params
        if not stats.text.strip():
            return False, "empty"
        n_chars = stats.n_chars
        paras = stats.paragraphs
        n_dup, dup_chars = _duplicate_counts(paras)
        if p.max_dup_para_fraction is not None and n_dup / len(paras) > p.max_dup_para_fraction:
            return False, "dup_para_fraction"
        if p.max_dup_para_char_fraction is not None and dup_chars / n_chars > p.max_dup_para_char_fraction:
            return False, "dup_para_char_fraction"
        lines = stats.newline_split_lines
        n_dup, dup_chars = _duplicate_counts(lines)
        if p.max_dup_line_fraction is not None and n_dup / len(lines) > p.max_dup_line_fraction:
            return False, "dup_line_fraction"
        if p.max_dup_line_char_fraction is not None and dup_chars / n_chars > p.max_dup_line_char_fraction:
            return False, "dup_line_char_fraction"

        total = stats.n_word_chars
        if total == 0:
            return True, None
        lengths = stats.word_lengths
        cum = np.concatenate(([0], np.cumsum(lengths)))
        for n, max_frac in p.top_ngram_char_fractions:
            h = stats.ngram_hashes(n)
            if len(h) < 2:
                continue
            srt = np.sort(h)
            group_starts = np.concatenate(([0], np.flatnonzero(srt[1:] != srt[:-1]) + 1))
            runs = np.diff(np.append(group_starts, len(srt)))
            top = int(runs.max())
            if top < 2:  # a single occurrence is not a repetition
                continue
            # Cheap bound first: even the longest n-gram repeated `top` times may pass.
            spans = cum[n:] - cum[:-n]
            if top * int(spans.max()) / total <= max_frac:
                continue
            top_hashes = srt[group_starts[runs == top]]
            chars = int(spans[np.isin(h, top_hashes)].max())
            if top * chars / total > max_frac:
                return False, f"top_{n}_gram"
        dup = p.dup_ngram_char_fractions
        for i, (n, max_frac) in enumerate(dup):
            h = stats.ngram_hashes(n)
            if len(h) < 2:
                break
            order = np.argsort(h, kind="stable")
            srt = h[order]
            # With a stable sort, an occurrence is a repeat when its predecessor in
            # sorted order has the same hash (the first occurrence comes first).
            repeat = np.zeros(len(h), dtype=bool)
            np.equal(srt[1:], srt[:-1], out=repeat[1:])
            dup_starts = order[repeat]
            if len(dup_starts) == 0:
                break  # no repeated n-gram means no repeated (n+1)-gram either
            cover = np.zeros(len(lengths) + 1, dtype=np.int64)
            cover[dup_starts] += 1
            cover[dup_starts + n] -= 1
            frac = lengths[np.cumsum(cover[:-1]) > 0].sum() / total
            if frac > max_frac:
                return False, f"dup_{n}_grams"
            # Repeats of (n+1)-grams cover a subset of what repeats of n-grams
            # cover, so the fraction only shrinks as n grows.
            if frac <= min(f for _, f in dup[i:]):
                break
        return True, None
