"""Gopher quality and repetition filters (Rae et al. 2021, "Scaling Language Models", App. A), as datatrove applies them.

The rules and thresholds are the paper's (Table A1); their definitions follow
datatrove's ``GopherQualityFilter`` and ``GopherRepetitionFilter``, the
reference implementation FineWeb was built with, so that the two make the same
keep/drop decision (measured on the DCLM web pages in
``tests/test_filter_agreement.py``). In particular:

* words are the English word tokens of datatrove's tokenizer, which splits off
  punctuation ("word," is "word" and ","), computed by
  :func:`lmlab.data.prepare.filters.words.words` without spaCy; "words" for the
  length and mean-length rules are the tokens with a character outside
  :data:`GOPHER_SYMBOLS`; the alphabetic-word rule and the hash / ellipsis ratios
  divide by all tokens; stop words are matched case-sensitively;
* bullet lines start with "•" or "-", lines are ``str.splitlines`` (blank lines
  included), paragraphs are split on two or more newlines;
* the repetition fractions divide by the length of the whole text (whitespace
  included); the most frequent n-gram is the first one to reach the highest
  count, its characters counted with the spaces between its words, even when
  it occurs once (so a page of a dozen words fails ``top_2_gram``); repeated
  n-grams are counted by datatrove's left-to-right scan (after a repeat, the
  next n-1 positions are skipped).

``alpha_word_split="whitespace"`` gives the literal reading of the
alphabetic-word rule (whitespace-separated words, where a trailing comma rides
on its word), which lets almost every web page pass it.
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
from lmlab.data.prepare.filters.fineweb import FINEWEB_TERMINAL_PUNCTUATION
from lmlab.data.prepare.stats import DocStats
from lmlab.errors import ConfigError

GOPHER_STOP_WORDS = ("the", "be", "to", "of", "and", "that", "have", "with")

# A token made only of these characters is a symbol, not a word (as datatrove's
# punctuation set: ASCII punctuation, common typographic and full-width marks,
# control characters, and the sentence terminals).
GOPHER_SYMBOLS = frozenset(
    "!\"#$%&'()*+,-./:;<=>?@[\\]^_`{|}~—–”“„’´«»…►━∶％１〈〉、【】「」，；《》．（）？！：～。"
    + "".join(map(chr, (*range(0, 9), *range(11, 32), *range(127, 160))))
    + "".join(FINEWEB_TERMINAL_PUNCTUATION)
)
_PARAGRAPH_RE = re.compile(r"\n{2,}")
_NO_ASCII_ALNUM_RE = re.compile(r"^[^A-Za-z0-9\n]+$", re.MULTILINE)
_NO_ASCII_LETTER_RE = re.compile(r"^[^A-Za-z\n]+$", re.MULTILINE)
_LINES_RE = re.compile("\n+")


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
    alpha_word_split: str = "reference"

    def __post_init__(self) -> None:
        if self.alpha_word_split not in ("reference", "whitespace"):
            raise ConfigError(
                "gopher_quality.alpha_word_split",
                f"unknown value {self.alpha_word_split!r}",
                "use 'reference' (datatrove's word tokens) or 'whitespace'",
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
        self._stop = frozenset(self.params.stop_words)

    def check(self, stats: DocStats) -> FilterResult:
        p = self.params
        text = stats.text
        words = stats.ref_words
        n_tokens = len(words)
        # Symbol tokens contain no ASCII letter or digit: check only those candidates exactly.
        symbols = [w for w in _NO_ASCII_ALNUM_RE.findall(stats.ref_joined) if GOPHER_SYMBOLS.issuperset(w)]
        n_words = n_tokens - len(symbols)
        if p.min_words and n_words < p.min_words:
            return False, "too_few_words"
        if p.max_words and n_words > p.max_words:
            return False, "too_many_words"
        if n_words == 0:
            # Only reachable with min_words disabled; nothing below is defined.
            return True, None
        mean_len = (int(stats.ref_word_lengths.sum()) - sum(map(len, symbols))) / n_words
        if p.min_mean_word_length and mean_len < p.min_mean_word_length:
            return False, "short_mean_word_length"
        if p.max_mean_word_length and mean_len > p.max_mean_word_length:
            return False, "long_mean_word_length"
        if p.max_symbol_word_ratio:
            if text.count("#") / n_tokens > p.max_symbol_word_ratio:
                return False, "too_many_hashes"
            if (text.count("...") + text.count("…")) / n_tokens > p.max_symbol_word_ratio:
                return False, "too_many_ellipses"
        lines = text.splitlines()
        if lines:
            if p.max_bullet_line_fraction:
                bullets = sum(1 for s in lines if s.lstrip().startswith(("•", "-")))
                if bullets / len(lines) > p.max_bullet_line_fraction:
                    return False, "too_many_bullet_lines"
            if p.max_ellipsis_line_fraction:
                ellipses = sum(1 for s in lines if s.rstrip().endswith(("...", "…")))
                if ellipses / len(lines) > p.max_ellipsis_line_fraction:
                    return False, "too_many_ellipsis_lines"
        if p.min_alpha_word_fraction:
            tokens = words if p.alpha_word_split == "reference" else stats.words
            joined = stats.ref_joined if p.alpha_word_split == "reference" else "\n".join(tokens)
            # tokens without a letter have no ASCII letter: check only those candidates exactly
            no_letter = sum(1 for w in _NO_ASCII_LETTER_RE.findall(joined) if not _has_letter(w))
            alpha = len(tokens) - no_letter
            if alpha / max(1, len(tokens)) < p.min_alpha_word_fraction:
                return False, "too_few_alpha_words"
        if p.min_stop_words and len(self._stop.intersection(words)) < p.min_stop_words:
            return False, "too_few_stop_words"
        return True, None


def _has_letter(word: str) -> bool:
    return any(c.isalpha() for c in word)


def _find_duplicates(items: list[str]) -> tuple[int, int]:
    """(items that repeat an earlier one, characters in those repeats), as datatrove counts them."""
    seen: set[str] = set()
    n_dup = chars = 0
    for x in items:
        if x in seen:
            n_dup += 1
            chars += len(x)
        else:
            seen.add(x)
    return n_dup, chars


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
        text = stats.text
        if not text.strip():
            # datatrove drops only the empty string; whitespace is as empty (its quality filter drops it too)
            return False, "empty"
        n_chars = len(text)
        paras = _PARAGRAPH_RE.split(text.strip())
        n_dup, dup_chars = _find_duplicates(paras)
        if p.max_dup_para_fraction and n_dup / len(paras) > p.max_dup_para_fraction:
            return False, "dup_para_fraction"
        if p.max_dup_para_char_fraction and dup_chars / n_chars > p.max_dup_para_char_fraction:
            return False, "dup_para_char_fraction"
        lines = _LINES_RE.split(text)
        n_dup, dup_chars = _find_duplicates(lines)
        if p.max_dup_line_fraction and n_dup / len(lines) > p.max_dup_line_fraction:
            return False, "dup_line_fraction"
        if p.max_dup_line_char_fraction and dup_chars / n_chars > p.max_dup_line_char_fraction:
            return False, "dup_line_char_fraction"

        lengths = stats.ref_word_lengths
        cum = np.concatenate(([0], np.cumsum(lengths)))
        # Positions whose n-gram occurs again somewhere, for n = 1, 2, ...: an n-gram recurs
        # only where the (n-1)-grams at i and i+1 both recur, so each step sorts only those.
        recurring = {1: _recurring(stats.ref_ngram_hashes(1), None)}

        def recurring_at(n: int) -> np.ndarray:
            if n not in recurring:
                prev = recurring_at(n - 1)
                recurring[n] = _recurring(stats.ref_ngram_hashes(n), prev[:-1] & prev[1:])
            return recurring[n]

        for n, max_frac in p.top_ngram_char_fractions:
            h = stats.ref_ngram_hashes(n)
            if len(h) == 0:
                continue
            # datatrove: the first n-gram (in text order) to reach the highest count, with its
            # spaces; as there, an n-gram seen once counts too (a page of a few words fails here)
            rec = np.flatnonzero(recurring_at(n))
            if len(rec):
                _, first, counts = np.unique(h[rec], return_index=True, return_counts=True)
                top = int(counts.max())
                start = int(rec[first[counts == top].min()])
            else:
                top, start = 1, 0
            chars = int(cum[start + n] - cum[start]) + n - 1
            if top * chars / n_chars > max_frac:
                return False, f"top_{n}_gram"
        for n, max_frac in p.dup_ngram_char_fractions:
            h = stats.ref_ngram_hashes(n)
            if len(h) < 2:
                continue
            if _scanned_repeat_chars(h, recurring_at(n), cum, n) / n_chars > max_frac:
                return False, f"dup_{n}_grams"
        return True, None


def _recurring(h: np.ndarray, candidates: np.ndarray | None) -> np.ndarray:
    """Mask of the positions whose hash occurs more than once (only ``candidates`` can)."""
    out = np.zeros(len(h), dtype=bool)
    idx = np.arange(len(h)) if candidates is None else np.flatnonzero(candidates)
    if len(idx) < 2:
        return out
    sub = h[idx]
    order = np.argsort(sub, kind="stable")
    srt = sub[order]
    same = srt[1:] == srt[:-1]
    if same.any():
        out[idx[order[1:][same]]] = True
        out[idx[order[:-1][same]]] = True
    return out


def _scanned_repeat_chars(h: np.ndarray, recurring: np.ndarray, cum: np.ndarray, n: int) -> int:
    """Characters of repeated n-grams found by datatrove's scan, which skips n-1 positions after a repeat.

    Only n-grams occurring more than once (``recurring``) can be repeats, and
    whether an n-gram occurring once was skipped changes nothing, so the scan
    visits only the positions of n-grams that recur.
    """
    seen: set[int] = set()
    skip_until = 0
    chars = 0
    for pos in np.flatnonzero(recurring).tolist():
        if pos < skip_until:
            continue
        key = int(h[pos])
        if key in seen:
            chars += int(cum[pos + n] - cum[pos])  # the n-gram joined without spaces, as datatrove measures it
            skip_until = pos + n
        else:
            seen.add(key)
    return chars
