"""Normalisation: whitespace, Unicode, decoding counts and Project Gutenberg boilerplate."""

from __future__ import annotations

import unicodedata

import pytest

from lmlab.data.prepare.normalize import (
    NormalizeConfig,
    Normalizer,
    decode_bytes,
    normalize_text,
    strip_gutenberg,
)
from lmlab.errors import ConfigError


def test_whitespace_rules():
    raw = "\ufeffHello   world\t\tagain  \r\nsecond\u00a0\u00a0line\r\n\r\n\r\n\r\n\r\nthird\rfourth   "
    out = normalize_text(raw)
    assert out == "Hello world again\nsecond line\n\nthird\nfourth"


def test_indentation_kept_by_default_and_collapsed_on_request():
    code = "def f():\n    return  1\n"
    assert normalize_text(code) == "def f():\n    return 1"
    assert normalize_text(code, NormalizeConfig(keep_indentation=False)) == "def f():\n return 1"


def test_blank_line_limit_is_configurable():
    assert normalize_text("a\n\n\n\n\nb", NormalizeConfig(max_blank_lines=2)) == "a\n\n\nb"
    assert normalize_text("a\n\n\n\n\nb", NormalizeConfig(max_blank_lines=0)) == "a\nb"


def test_nfc_and_control_characters():
    decomposed = "Cafe\u0301 nai\u0308ve\x07"
    out = normalize_text(decomposed)
    assert out == "Café naïve"
    assert unicodedata.is_normalized("NFC", out)


def test_decode_counts_replacements_but_not_existing_fffd():
    text, n = decode_bytes(b"ok \xff\xfe bad \xef\xbf\xbd kept")
    assert n == 2
    assert text.count("\ufffd") == 3


def test_normalizer_counts_and_marks_metadata():
    norm = Normalizer()
    doc = {"id": 1, "text": b"caf\xc3\xa9 \xff end", "metadata": {"url": "x"}}
    out = norm(doc)
    assert out["text"] == "café \ufffd end"
    assert out["metadata"] == {"url": "x", "decode_errors": 1}
    assert doc["text"] == b"caf\xc3\xa9 \xff end"  # input untouched
    norm({"id": 2, "text": "clean"})
    assert norm.stats.documents == 2
    assert norm.stats.replaced_byte_sequences == 1
    assert norm.stats.documents_with_decode_errors == 1


def test_bad_input_raises_config_error():
    with pytest.raises(ConfigError, match="text"):
        Normalizer()({"id": 3, "text": None})
    with pytest.raises(ConfigError, match="unicode_form"):
        NormalizeConfig(unicode_form="NFX")


MODERN = """\ufeffThe Project Gutenberg EBook of A Tiny Book, by Some Author\r
\r
This eBook is for the use of anyone anywhere at no cost.\r
\r
*** START OF THIS PROJECT GUTENBERG EBOOK A TINY BOOK ***\r
\r
\r
\r
\r
Produced by Kind Volunteers\r
\r
\r
\r
\r
A TINY BOOK\r
\r
Chapter 1\r
\r
It was a dark and stormy night.\r
\r
End of the Project Gutenberg EBook of A Tiny Book, by Some Author\r
\r
*** END OF THIS PROJECT GUTENBERG EBOOK A TINY BOOK ***\r
\r
*** START: FULL LICENSE ***\r
THE FULL PROJECT GUTENBERG LICENSE\r
"""

OLD = """The Project Gutenberg Etext of Old Tales
**Welcome To The World of Free Plain Vanilla Electronic Texts**
*****These eBooks Were Prepared By Thousands of Volunteers!*****
*END*THE SMALL PRINT! FOR PUBLIC DOMAIN ETEXTS*Ver.04.29.93*END*

OLD TALES

Once upon a time there was a story.

End of Project Gutenberg Etext of Old Tales
"""


def test_gutenberg_modern_markers():
    out = normalize_text(MODERN)
    assert out == "A TINY BOOK\n\nChapter 1\n\nIt was a dark and stormy night."


def test_gutenberg_old_markers():
    body, stripped = strip_gutenberg(OLD)
    assert stripped
    assert body.strip() == "OLD TALES\n\nOnce upon a time there was a story."


def test_text_without_markers_is_untouched():
    text = "A page that mentions Project Gutenberg in passing.\nNothing else."
    assert strip_gutenberg(text) == (text, False)
    assert normalize_text(text, NormalizeConfig(strip_gutenberg=False)) == text


def test_gutenberg_stripping_can_be_disabled():
    out = normalize_text(MODERN, NormalizeConfig(strip_gutenberg=False))
    assert "START OF THIS PROJECT GUTENBERG" in out


@pytest.mark.shared_data
def test_real_gutenberg_books(shared_data):
    norm = Normalizer()
    for path in sorted((shared_data / "books").glob("gutenberg_*.txt")):
        out = norm({"id": path.name, "text": path.read_bytes()})
        text = out["text"]
        assert out["metadata"]["gutenberg_stripped"] is True
        assert "project gutenberg" not in text[:2000].lower(), path.name
        assert "project gutenberg" not in text[-2000:].lower(), path.name
        assert "\r" not in text and "\ufeff" not in text
        assert len(text) > 100_000
    assert norm.stats.gutenberg_stripped == 4
    assert norm.stats.replaced_byte_sequences == 0
