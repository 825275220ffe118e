"""Per-document text statistics computed once and shared by every filter.

Each filter in a :class:`~lmlab.data.prepare.filters.FilterStack` needs some of
the same views of a document (its lines, its whitespace words, the lowercased
text, word hashes). :class:`DocStats` computes each view lazily, on first use,
and caches it, so a stack of four filters splits a document into words once, not
four times. Everything is done with ``str`` methods, compiled regexes and numpy,
never with a Python loop over characters.
"""

from __future__ import annotations

import re
from functools import cached_property
from typing import Any, Mapping

import numpy as np

from lmlab.data.prepare._hashing import extend_ngrams, token_hashes
from lmlab.errors import ConfigError

# Runs of letters/digits: the tokenisation used wherever punctuation must not
# glue onto words (stop-word checks, the quality model, decontamination).
WORD_TOKEN_RE = re.compile(r"[^\W_]+")
_PARAGRAPH_SPLIT_RE = re.compile(r"\n[ \t]*\n\s*")
_NEWLINES_RE = re.compile(r"\n+")


def word_tokens(text: str) -> list[str]:
    """Lowercased alphanumeric tokens of ``text`` (punctuation and ``_`` dropped)."""
    return WORD_TOKEN_RE.findall(text.lower())



def _ngrams_upto(grams: dict[int, np.ndarray], word_hashes: np.ndarray, n: int) -> np.ndarray:
    """The n-gram hashes of ``word_hashes`` from the cache ``grams``, extended one order at a time from
    the largest order computed so far (asking for n = 2, 3, ..., 10 costs one vectorised step each)."""
    if n not in grams:
        if not grams:
            grams[1] = word_hashes
        k = max(grams)
        while k < n:
            grams[k + 1] = extend_ngrams(grams[k], word_hashes, k)
            k += 1
    return grams[n]

class DocStats:
    """Lazily computed, cached views of one document's text.

    Views: ``lines`` (split on ``\\n``), ``nonempty_lines``, ``paragraphs`` (split
    on blank lines), ``words`` (split on whitespace, as in Gopher), ``lower``,
    ``word_lengths``, ``word_hashes`` and ``ngram_hashes(n)``; ``ref_words`` and
its hashes are the word tokens of datatrove's English tokenizer (Gopher rules). A ``DocStats`` is
    tied to one string: when a filter rewrites the text, the stack builds a new
    one.
    """

    def __init__(self, text: str):
        self.text = text
        self._ngrams: dict[int, np.ndarray] = {}
        self._ref_ngrams: dict[int, np.ndarray] = {}

    @classmethod
    def of(cls, doc: Mapping[str, Any] | str) -> "DocStats":
        """Stats for a document dict (its ``text``) or a bare string."""
        if isinstance(doc, str):
            return cls(doc)
        text = doc.get("text")
        if not isinstance(text, str):
            raise ConfigError(
                "text", f"document {doc.get('id')!r} has no string 'text' field", "give every document a 'text' string"
            )
        return cls(text)

    @property
    def n_chars(self) -> int:
        return len(self.text)

    @cached_property
    def lower(self) -> str:
        return self.text.lower()

    @cached_property
    def lines(self) -> list[str]:
        return self.text.split("\n")

    @cached_property
    def nonempty_lines(self) -> list[str]:
        """Lines with surrounding whitespace removed, blank ones dropped."""
        return [s for s in map(str.strip, self.lines) if s]

    @cached_property
    def newline_split_lines(self) -> list[str]:
        """Lines split on runs of newlines (blank lines merged, as in Gopher)."""
        return _NEWLINES_RE.split(self.text.strip("\n"))

    @cached_property
    def paragraphs(self) -> list[str]:
        return _PARAGRAPH_SPLIT_RE.split(self.text.strip())

    @cached_property
    def words(self) -> list[str]:
        return self.text.split()

    @property
    def n_words(self) -> int:
        return len(self.words)

    @cached_property
    def word_lengths(self) -> np.ndarray:
        return np.fromiter(map(len, self.words), dtype=np.int64, count=len(self.words))

    @cached_property
    def n_word_chars(self) -> int:
        """Characters inside words (all non-whitespace characters)."""
        return int(self.word_lengths.sum())

    @cached_property
    def word_hashes(self) -> np.ndarray:
        return token_hashes(self.words)

    @cached_property
    def ref_words_by_line(self) -> list[list[str]]:
        """:attr:`ref_words` of each line of ``text.splitlines()`` (tokens never span lines)."""
        from lmlab.data.prepare.filters.words import words

        return [words(line) for line in self.text.splitlines()]

    @cached_property
    def ref_words(self) -> list[str]:
        """English word tokens as datatrove's filters count them (:func:`~lmlab.data.prepare.filters.words.words`)."""
        return [w for line in self.ref_words_by_line for w in line]

    @cached_property
    def ref_joined(self) -> str:
        """:attr:`ref_words` joined by newlines (no token contains one), for whole-list regex counts."""
        return "\n".join(self.ref_words)

    @cached_property
    def ref_word_lengths(self) -> np.ndarray:
        if not self.ref_words:
            return np.zeros(0, dtype=np.int64)
        # token lengths from the separator positions, without a Python call per token
        codes = np.frombuffer(self.ref_joined.encode("utf-32-le"), dtype=np.uint32)
        ends = np.append(np.flatnonzero(codes == 10), len(codes))
        return np.diff(np.concatenate(([-1], ends))).astype(np.int64) - 1

    @cached_property
    def ref_word_hashes(self) -> np.ndarray:
        return token_hashes(self.ref_words)

    def ref_ngram_hashes(self, n: int) -> np.ndarray:
        """Unmixed hashes of the n-grams of :attr:`ref_words` (equal n-grams, equal hashes)."""
        return _ngrams_upto(self._ref_ngrams, self.ref_word_hashes, n)

    @cached_property
    def tokens(self) -> list[str]:
        """Lowercased alphanumeric tokens (see :func:`word_tokens`)."""
        return WORD_TOKEN_RE.findall(self.lower)

    def ngram_hashes(self, n: int) -> np.ndarray:
        """Unmixed hashes of the whitespace-word n-grams (equal n-grams, equal hashes).

        Built incrementally from the largest ``n`` computed so far, so asking for
        n = 2, 3, ..., 10 in turn costs one vectorised step each.
        """
        return _ngrams_upto(self._ngrams, self.word_hashes, n)
