"""Text normalisation: decoding, Unicode NFC, whitespace, Project Gutenberg boilerplate.

The steps, in order (each can be switched off in :class:`NormalizeConfig`):

1. bytes are decoded as UTF-8 with ``errors="replace"``; the number of
   undecodable byte sequences is counted (:func:`decode_bytes`);
2. byte-order marks (U+FEFF) are dropped, CRLF and lone CR become LF;
3. C0 control characters other than tab and newline are removed;
4. Unicode NFC, so that "é" typed as one code point or as "e" + combining
   accent hashes and matches the same way in dedup and decontamination;
5. Project Gutenberg header and footer are cut (:func:`strip_gutenberg`);
6. trailing spaces are stripped, runs of spaces/tabs (and other horizontal
   space such as NBSP) inside a line collapse to one space, and more than
   ``max_blank_lines`` consecutive blank lines collapse. Leading indentation is
   kept by default because it carries meaning in code and verse.
"""

from __future__ import annotations

import re
import unicodedata
from dataclasses import dataclass, field
from typing import Any, Mapping

from lmlab.data.textread import decode_text
from lmlab.errors import ConfigError


# Horizontal whitespace: everything \s matches except the line breaks.
_HSPACE = r"[^\S\n\r]"
_HSPACE_NOT_SPACE = r"[^\S \n\r]"
_TRAILING_RE = re.compile(_HSPACE + r"+$", re.MULTILINE)
# Only runs that need changing match (two+ spaces, or any tab/NBSP/...): matching
# every single space would make the substitution many times slower.
# The tab/NBSP alternative comes first so that "  \t " is one match, not "  " + "\t ".
_RUN = "(?: *" + _HSPACE_NOT_SPACE + _HSPACE + "*| {2,})"
_INNER_RUN_RE = re.compile(r"(?<=\S)" + _RUN)
_ANY_RUN_RE = re.compile(_RUN)
_CONTROL_RE = re.compile(r"[\x00-\x08\x0b\x0c\x0e-\x1f\x7f]")

# Project Gutenberg markers. Modern files: "*** START OF THE/THIS PROJECT GUTENBERG
# EBOOK <title> ***" and "*** END OF ...". Older files use "***START OF THE
# PROJECT GUTENBERG ETEXT", "*END*THE SMALL PRINT! ... *END*" at the end of the
# licence header, and "End of (the) Project Gutenberg('s) EBook/Etext of ..." as
# the last line of the book. "*** START: FULL LICENSE ***" must not match.
_PG_START_RE = re.compile(
    r"^[ \t]*\*+[ \t]*START[ \t]*(?:OF[ \t]*)?(?:THE|THIS)?[ \t]*PROJECT[ \t]+GUTENBERG\b.*$"
    r"|^[ \t]*\*END\*[ \t]*THE SMALL PRINT!.*$",
    re.IGNORECASE | re.MULTILINE,
)
_PG_END_RE = re.compile(
    r"^[ \t]*\*+[ \t]*END[ \t]*(?:OF[ \t]*)?(?:THE|THIS)?[ \t]*PROJECT[ \t]+GUTENBERG\b.*$"
    r"|^[ \t]*End of (?:the )?Project Gutenberg\b.*$",
    re.IGNORECASE | re.MULTILINE,
)
# A short credits paragraph right after the start marker ("Produced by ...").
_PG_CREDITS_RE = re.compile(
    r"\A\s*(?:Produced by|E-?text prepared by|Transcribed (?:from|by)|This (?:e-?text|e-?book) was (?:produced|prepared) by)"
    r"[^\n]*(?:\n[^\n]+)*\n\s*\n",
    re.IGNORECASE,
)
_PG_CREDITS_MAX_CHARS = 600


@dataclass
class NormalizeConfig:
    """Which normalisation steps run (see the module docstring for the order)."""

    unicode_form: str | None = "NFC"
    drop_bom: bool = True
    newlines_to_lf: bool = True
    remove_control_chars: bool = True
    strip_gutenberg: bool = True
    strip_trailing_spaces: bool = True
    collapse_spaces: bool = True
    keep_indentation: bool = True
    max_blank_lines: int | None = 1
    strip_document: bool = True

    def __post_init__(self) -> None:
        if self.unicode_form not in (None, "NFC", "NFD", "NFKC", "NFKD"):
            raise ConfigError(
                "normalize.unicode_form", f"unknown form {self.unicode_form!r}", "use NFC, NFD, NFKC, NFKD or null"
            )
        if self.max_blank_lines is not None and self.max_blank_lines < 0:
            raise ConfigError(
                "normalize.max_blank_lines",
                f"must be >= 0, got {self.max_blank_lines}",
                "use 0, 1, 2, ... or null for no limit",
            )


@dataclass
class NormalizeStats:
    """Running counts of a :class:`Normalizer`."""

    documents: int = 0
    replaced_byte_sequences: int = 0
    documents_with_decode_errors: int = 0
    gutenberg_stripped: int = 0
    chars_in: int = 0
    chars_out: int = 0
    extra: dict[str, int] = field(default_factory=dict)


def decode_bytes(data: bytes, encoding: str = "utf-8") -> tuple[str, int]:
    """Decode ``data`` with replacement; return the text and how many sequences were replaced.

    The one decoding policy of ``fit`` and ``prepare``: :func:`lmlab.data.textread.decode_text`.
    """
    return decode_text(data, encoding)


def strip_gutenberg(text: str) -> tuple[str, bool]:
    """Cut a Project Gutenberg licence header and footer; return ``(text, stripped)``.

    Keeps what lies between the first start marker and the first end marker after
    it (either may be missing), and drops a short "Produced by ..." credits
    paragraph right after the start marker. Text without any marker is returned
    unchanged with ``stripped=False``.
    """
    if "utenberg" not in text and "UTENBERG" not in text:
        return text, False
    start_m = _PG_START_RE.search(text)
    begin = start_m.end() if start_m else 0
    end_m = _PG_END_RE.search(text, begin)
    if start_m is None and end_m is None:
        return text, False
    body = text[begin : end_m.start() if end_m else len(text)]
    if start_m is not None:
        credits = _PG_CREDITS_RE.match(body)
        if credits and credits.end() <= _PG_CREDITS_MAX_CHARS:
            body = body[credits.end() :]
    return body.strip("\n"), True


def normalize_text(text: str, config: NormalizeConfig | None = None) -> str:
    """Normalise one string (no decoding, no counting); see :class:`NormalizeConfig`."""
    return _normalize(text, config or NormalizeConfig())[0]


def _normalize(text: str, cfg: NormalizeConfig) -> tuple[str, bool]:
    if cfg.drop_bom and "\ufeff" in text:
        text = text.replace("\ufeff", "")
    if cfg.newlines_to_lf and "\r" in text:
        text = text.replace("\r\n", "\n").replace("\r", "\n")
    if cfg.remove_control_chars:
        text = _CONTROL_RE.sub("", text)
    if cfg.unicode_form and not unicodedata.is_normalized(cfg.unicode_form, text):
        text = unicodedata.normalize(cfg.unicode_form, text)
    stripped = False
    if cfg.strip_gutenberg:
        text, stripped = strip_gutenberg(text)
    if cfg.strip_trailing_spaces:
        text = _TRAILING_RE.sub("", text)
    if cfg.collapse_spaces:
        text = (_INNER_RUN_RE if cfg.keep_indentation else _ANY_RUN_RE).sub(" ", text)
    if cfg.max_blank_lines is not None:
        limit = cfg.max_blank_lines + 1
        text = re.sub("\n{%d,}" % (limit + 1), "\n" * limit, text)
    if cfg.strip_document:
        text = text.strip()
    return text, stripped


class Normalizer:
    """Normalise documents (dicts with ``text``), counting decode errors and stripped boilerplate.

    ``doc["text"]`` may be ``str`` or ``bytes``. The input dict is not modified:
    a shallow copy with the new text is returned; when something was found, its
    ``metadata`` gets ``decode_errors`` (replaced byte sequences) and/or
    ``gutenberg_stripped``.
    """

    def __init__(self, config: NormalizeConfig | None = None):
        self.config = config or NormalizeConfig()
        self.stats = NormalizeStats()

    def __call__(self, doc: Mapping[str, Any]) -> dict[str, Any]:
        raw = doc.get("text")
        replaced = 0
        if isinstance(raw, (bytes, bytearray)):
            raw, replaced = decode_bytes(bytes(raw))
        elif not isinstance(raw, str):
            raise ConfigError(
                "text", f"document {doc.get('id')!r} has no str/bytes 'text'", "give every document a 'text' field"
            )
        text, stripped = _normalize(raw, self.config)
        s = self.stats
        s.documents += 1
        s.chars_in += len(raw)
        s.chars_out += len(text)
        out = dict(doc)
        out["text"] = text
        if replaced or stripped:
            meta = dict(out.get("metadata") or {})
            if replaced:
                s.replaced_byte_sequences += replaced
                s.documents_with_decode_errors += 1
                meta["decode_errors"] = replaced
            if stripped:
                s.gutenberg_stripped += 1
                meta["gutenberg_stripped"] = True
            out["metadata"] = meta
        return out
