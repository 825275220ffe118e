"""Bytes and JSON rows to document text: the one policy of ``lmlab fit`` and ``lmlab data prepare``.

Both commands read local files through these functions, so a file gives the
same documents, and the same complaints, to both:

- **Invalid UTF-8** never stops a run: each undecodable byte sequence becomes
  U+FFFD and is counted (:func:`decode_text`); ``fit`` logs the count per
  source, ``prepare`` reports it (``replaced_byte_sequences``,
  ``documents_with_decode_errors``).
- **The text field** of a JSON/JSON-lines record is the source's
  ``text_field`` (default ``text``); no other column is ever used in its
  place. Records without it are counted (:class:`TextFieldTally`) and
  :func:`check_text_field` turns the counts into a one-line ConfigError when
  no record has the field (listing the fields the records do have) or when
  more than ``max_missing_text_fraction`` of them lack it; below that it logs
  the count.
"""

from __future__ import annotations

import bz2
import gzip
import json
import logging
import lzma
from collections import Counter
from dataclasses import dataclass, field
from typing import IO, Any, Mapping

from lmlab.errors import ConfigError

log = logging.getLogger(__name__)

DEFAULT_TEXT_FIELD = "text"
#: Records of a JSON source that may lack the text field before reading fails.
DEFAULT_MAX_MISSING_TEXT_FRACTION = 0.01

_REPLACEMENT = "\ufffd"
_REPLACEMENT_BYTES = _REPLACEMENT.encode("utf-8")


def decode_text(data: bytes, encoding: str = "utf-8") -> tuple[str, int]:
    """Decode ``data`` with replacement; return the text and how many byte sequences were replaced.

    U+FFFD characters already present (validly encoded) in the input are not counted.
    """
    text = data.decode(encoding, errors="replace")
    replaced = text.count(_REPLACEMENT)
    if replaced and encoding.replace("-", "").lower() in ("utf8", "utf8sig"):
        replaced -= data.count(_REPLACEMENT_BYTES)
    return text, replaced


def open_file(path: str) -> IO[bytes]:
    """Open a possibly compressed file (.gz, .bz2, .xz, .zst) for reading bytes."""
    low = path.lower()
    if low.endswith(".gz"):
        return gzip.open(path, "rb")
    if low.endswith(".bz2"):
        return bz2.open(path, "rb")
    if low.endswith(".xz"):
        return lzma.open(path, "rb")
    if low.endswith(".zst"):
        try:
            import zstandard
        except ImportError:
            raise OSError("reading .zst needs the zstandard package") from None
        return zstandard.open(path, "rb")
    return open(path, "rb")


def parse_json(data: bytes) -> tuple[Any, int]:
    """Parse JSON bytes, replacing invalid UTF-8 first when needed; ``(value, replaced)``. ValueError when malformed."""
    try:
        return json.loads(data), 0
    except UnicodeDecodeError:
        text, replaced = decode_text(data)
        return json.loads(text), replaced


def row_text(row: Mapping[str, Any], text_field: str | None) -> tuple[str | None, str | None]:
    """The record's text, or ``None`` and why not (``no_text_field``, ``non_string_text``)."""
    v = row.get(text_field or DEFAULT_TEXT_FIELD)
    if v is None:
        return None, "no_text_field"
    if not isinstance(v, str):
        return None, "non_string_text"
    return v, None


@dataclass
class TextFieldTally:
    """Counts, over a source's JSON records, of those without usable text and of the fields seen."""

    rows: int = 0
    missing: int = 0
    fields: Counter = field(default_factory=Counter)

    def text(self, row: Mapping[str, Any], text_field: str | None) -> tuple[str | None, str | None]:
        """:func:`row_text`, counted."""
        self.rows += 1
        text, why = row_text(row, text_field)
        if why is not None:
            self.missing += 1
            if len(self.fields) < 1000:  # a few distinct keys are enough to name them
                self.fields.update(k for k in row if isinstance(k, str))
        return text, why


def check_text_field(
    setting: str,
    limit_setting: str,
    source: str,
    text_field: str | None,
    rows: int,
    missing: int,
    fields: Mapping[str, int],
    max_missing_fraction: float = DEFAULT_MAX_MISSING_TEXT_FRACTION,
) -> None:
    """Fail when the text field is absent or missing from too many records; log what was skipped.

    ``setting`` and ``limit_setting`` name the source's ``text_field`` and
    ``max_missing_text_fraction`` keys (``data.sources[0].text_field``);
    ``fields`` counts the keys of the records that lacked it.
    """
    if rows == 0 or missing == 0:
        return
    name = text_field or DEFAULT_TEXT_FIELD
    if missing == rows:
        have = ", ".join(sorted(fields)) or "none"
        raise ConfigError(
            setting,
            f"no record of source {source!r} has the text field {name!r} (its records have: {have})",
            "set text_field to the field holding the text",
        )
    share = missing / rows
    log.warning("source %r: %d of %d records (%.2f%%) have no text in field %r; skipped", source, missing, rows, 100 * share, name)
    if share > max_missing_fraction:
        raise ConfigError(
            limit_setting,
            f"{missing} of {rows} records ({share:.2%}) of source {source!r} have no text in field {name!r}, "
            f"more than the allowed {max_missing_fraction:g}",
            "fix the files or text_field, or raise max_missing_text_fraction",
        )
