"""Raw records of a source, read tolerantly, and their conversion into documents.

Reading is split in two so that the costly part runs in parallel:

- :func:`iter_raw_records` (one process, in file order) yields cheap raw
  records: a JSONL line's bytes, a text file's bytes, an HTML page's bytes, a
  string from ``datasets``. A file that cannot be opened or breaks mid-way is
  skipped and counted (``unreadable_file``), never fatal, unless the source
  has no readable file at all.
- :func:`record_to_document` (any process) parses, extracts main text,
  truncates, drops gigantic lines and normalises one record, returning the
  document or the reason it was skipped (``malformed_json``,
  ``no_text_field``, ``non_string_text``, ``extraction_empty``, ``empty``).
  Decoding and the text field follow :mod:`lmlab.data.textread`, shared with
  ``lmlab fit``.

``files`` sources use these readers for text, JSON and JSON-lines files
(optionally ``.gz``/``.bz2``/``.xz``); Parquet files, ``hf`` and ``stdlib``
sources go through :func:`lmlab.data.pretrain.sources.iter_documents` (``datasets``).
"""

from __future__ import annotations

import dataclasses
import glob
import json
import lzma
import os
import re
import tarfile
import zlib
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Iterator

from lmlab.data.prepare.config import PrepSource
from lmlab.data.prepare.normalize import Normalizer, decode_bytes
from lmlab.data.pretrain.sources import _builder_for, iter_documents, resolve_files
from lmlab.data.textread import TextFieldTally, open_file, parse_json
from lmlab.errors import ConfigError

_READ_ERRORS = (OSError, EOFError, zlib.error, lzma.LZMAError, ValueError, tarfile.TarError)
_HTML_SUFFIXES = (".html", ".htm", ".xhtml")
_WARC_SUFFIXES = (".warc", ".warc.gz", ".arc.gz")


@dataclass
class RawRecord:
    """One candidate document before parsing: ``kind`` says how to read ``payload``.

    Kinds: ``jsonline`` (bytes of one JSON line), ``json`` (a parsed object),
    ``bytes`` (text file contents), ``text`` (a string), ``html`` (page bytes).
    """

    kind: str
    payload: Any
    origin: str
    size: int
    meta: dict = field(default_factory=dict)


def _is_tar(name: str) -> bool:
    return name.endswith((".tar", ".tgz", ".tar.gz"))


def _wanted(src_type: str, name: str) -> bool:
    low = name.lower()
    if src_type == "warc":
        return low.endswith(_WARC_SUFFIXES)
    return _is_tar(low) or low.removesuffix(".gz").endswith(_HTML_SUFFIXES)


def _glob(src: PrepSource, idx: int) -> list[str]:
    p = os.path.expanduser(src.path)
    if os.path.isdir(p):
        files = sorted(str(f) for f in Path(p).rglob("*") if f.is_file())
    else:
        files = sorted(glob.glob(p, recursive=True))
    files = [f for f in files if _wanted(src.type, f)]
    if not files:
        kinds = "/".join(_WARC_SUFFIXES) if src.type == "warc" else ".html/.htm(.gz) or .tar"
        raise ConfigError(f"sources[{idx}].path", f"no {src.type} files match {src.path!r}", f"point it at existing {kinds} files")
    return files


@dataclass
class SkipLog:
    """Counts of what reading skipped, with a few examples (file and error)."""

    counts: Counter = field(default_factory=Counter)
    examples: list = field(default_factory=list)

    def add(self, reason: str, example: str | None = None) -> None:
        self.counts[reason] += 1
        if example is not None and len(self.examples) < 20:
            self.examples.append(example)

    def take(self) -> tuple[dict, list]:
        """Return and clear what was logged since the last call."""
        out = dict(self.counts), list(self.examples)
        self.counts.clear()
        self.examples.clear()
        return out


def source_files(src: PrepSource, idx: int) -> list[str]:
    """The files a file-based source reads (empty for ``hf``/``stdlib``); a ConfigError when none match."""
    if src.type == "files":
        return resolve_files(src.source_config(), idx)
    if src.type in ("warc", "html"):
        return _glob(src, idx)
    return []


def source_fingerprint(src: PrepSource, idx: int) -> dict[str, Any]:
    """Everything that decides a source's records: its settings and its files' sizes and mtimes."""
    d = dataclasses.asdict(src)
    for k in ("weight", "kind", "filters", "quality", "max_missing_text_fraction"):  # they do not change what is read
        d.pop(k)
    files = source_files(src, idx)
    d["files"] = [[f, os.stat(f).st_size, int(os.stat(f).st_mtime)] for f in files]
    if src.type == "stdlib":
        import sys

        d["python"] = sys.version
    return d


def iter_raw_records(src: PrepSource, idx: int, skips: SkipLog) -> Iterator[RawRecord]:
    """Raw records of a source in a fixed order (at most ``max_documents``); file errors go to ``skips``."""
    n = 0
    limit = src.max_documents
    for rec in _records(src, idx, skips):
        yield rec
        n += 1
        if limit is not None and n >= limit:
            return


def _records(src: PrepSource, idx: int, skips: SkipLog) -> Iterator[RawRecord]:
    if src.type in ("hf", "stdlib"):
        sc = dataclasses.replace(src.source_config(), max_documents=None, max_chars=None)
        for i, text in enumerate(iter_documents(sc, idx)):
            yield RawRecord("text", text, f"{src.name}:{i}", len(text.encode("utf-8", errors="replace")))
        return
    files = source_files(src, idx)
    readable = 0
    for path in files:
        try:
            if src.type == "warc":
                yield from _warc_records(path, skips)
            elif src.type == "html":
                yield from _html_records(path)
            else:
                yield from _file_records(src, idx, path)
            readable += 1
        except ConfigError as e:
            if e.field == "sources.type":  # a missing package, not a bad file
                raise
            skips.add("unreadable_file", f"{path}: {e}")
        except _READ_ERRORS as e:
            skips.add("unreadable_file", f"{path}: {type(e).__name__}: {str(e).splitlines()[0][:120] if str(e) else ''}")
    if readable == 0:
        raise ConfigError(
            f"sources[{idx}].path",
            f"none of the {len(files)} files of source {src.name!r} could be read",
            "check the files (permissions, compression, format)",
        )


def _file_records(src: PrepSource, idx: int, path: str) -> Iterator[RawRecord]:
    builder = _builder_for(path)
    if builder == "text":
        with open_file(path) as f:
            data = f.read()
        if src.split_pattern:
            text, replaced = decode_bytes(data)
            starts = [m.start() for m in re.finditer(src.split_pattern, text, re.MULTILINE)]
            bounds = sorted({0, *starts, len(text)})
            for j, (a, b) in enumerate(zip(bounds[:-1], bounds[1:])):
                meta = {"decode_errors": replaced} if (replaced and j == 0) else {}
                piece = text[a:b]
                yield RawRecord("text", piece, f"{path}#{j}", len(piece.encode("utf-8")), meta)
        else:
            yield RawRecord("bytes", data, path, len(data))
    elif builder == "json":
        low = path.lower()
        if ".jsonl" in low:
            yield from _jsonl_records(path)
            return
        with open_file(path) as f:
            data = f.read()
        try:
            obj, replaced = parse_json(data)
        except ValueError:
            yield from _jsonl_records(path)  # .json files holding JSON lines
            return
        rows = obj if isinstance(obj, list) else [obj]
        for j, row in enumerate(rows):
            meta = {"decode_errors": replaced} if (replaced and j == 0) else {}
            yield RawRecord("json", row, f"{path}:{j}", len(json.dumps(row, ensure_ascii=False).encode()), meta)
    elif builder == "parquet":
        sc = dataclasses.replace(src.source_config(), path=path, max_documents=None, max_chars=None)
        for j, text in enumerate(iter_documents(sc, idx)):
            yield RawRecord("text", text, f"{path}:{j}", len(text.encode("utf-8", errors="replace")))
    else:  # resolve_files only returns known builders
        raise OSError(f"unsupported file type: {path}")


def _jsonl_records(path: str) -> Iterator[RawRecord]:
    with open_file(path) as f:
        for j, line in enumerate(f):
            if line.strip():
                yield RawRecord("jsonline", line, f"{path}:{j + 1}", len(line))


def _warc_records(path: str, skips: SkipLog) -> Iterator[RawRecord]:
    from lmlab.data.prepare.extract import iter_warc

    with open(path, "rb") as f:
        for page in iter_warc(f, skips.counts):
            meta = {"url": page.url, "warc_record_id": page.record_id}
            yield RawRecord("html", page.html, page.url or path, len(page.html), meta)


def _html_records(path: str) -> Iterator[RawRecord]:
    low = path.lower()
    if low.endswith((".tar", ".tgz", ".tar.gz")):
        from lmlab.data.prepare.extract import iter_html_tar

        for name, data in iter_html_tar(path):
            yield RawRecord("html", data, f"{path}:{name}", len(data))
        return
    with open_file(path) as f:
        data = f.read()
    yield RawRecord("html", data, path, len(data))


# -- record -> document -------------------------------------------------------------------


_META_KEYS = ("id", "url", "source", "title")


def record_to_document(
    rec: RawRecord,
    src: PrepSource,
    normalizer: Normalizer,
    max_line_chars: int | None,
    extract_opts: dict | None,
    counts: Counter,
    tally: TextFieldTally | None = None,
) -> tuple[dict | None, str | None]:
    """Turn a raw record into ``{"text", "origin", "meta"}`` (or ``None`` and the skip reason).

    JSON records are counted in ``tally`` (for :func:`lmlab.data.textread.check_text_field`).
    """
    tally = tally if tally is not None else TextFieldTally()
    meta = dict(rec.meta)
    text: Any
    if rec.kind == "jsonline":
        try:
            row, replaced = parse_json(rec.payload)  # invalid UTF-8 in a fine line: kept, replaced
        except ValueError:
            return None, "malformed_json"
        if replaced:
            meta["decode_errors"] = replaced
        if not isinstance(row, dict):
            return None, "malformed_json"
        text, why = tally.text(row, src.text_field)
        if why:
            return None, why
        meta.update({k: row[k] for k in _META_KEYS if isinstance(row.get(k), (str, int)) and k != src.text_field})
    elif rec.kind == "json":
        if not isinstance(rec.payload, dict):
            return None, "malformed_json"
        text, why = tally.text(rec.payload, src.text_field)
        if why:
            return None, why
        meta.update({k: rec.payload[k] for k in _META_KEYS if isinstance(rec.payload.get(k), (str, int)) and k != src.text_field})
    elif rec.kind == "html":
        from lmlab.data.prepare.extract import extract_main_text

        text = extract_main_text(rec.payload, url=meta.get("url"), options=extract_opts)
        if not text.strip():
            return None, "extraction_empty"
    elif rec.kind == "bytes":
        text, replaced = decode_bytes(rec.payload)  # before truncating: never cut a character in half
        if replaced:
            meta["decode_errors"] = replaced
    else:
        text = rec.payload
    if src.max_chars is not None and len(text) > src.max_chars:
        text = text[: src.max_chars]
        counts["truncated_documents"] += 1
    if max_line_chars is not None and len(text) > max_line_chars:
        text = _drop_long_lines(text, max_line_chars, counts)
    doc = normalizer({"text": text, "metadata": meta})
    out_meta = doc.get("metadata") or {}
    if meta.get("decode_errors") and not out_meta.get("decode_errors"):
        out_meta["decode_errors"] = meta["decode_errors"]
    if out_meta.get("decode_errors"):
        counts["documents_with_decode_errors"] += 1
        counts["replaced_byte_sequences"] += int(out_meta["decode_errors"])
    if out_meta.get("gutenberg_stripped"):
        counts["gutenberg_stripped"] += 1
    if not doc["text"]:
        return None, "empty"
    return {"text": doc["text"], "origin": rec.origin, "meta": out_meta}, None


def _drop_long_lines(text: str, limit: int, counts: Counter) -> str:
    """Remove lines longer than ``limit`` characters (minified blobs, base64, binary noise)."""
    lines = text.split("\n")
    kept = [ln for ln in lines if len(ln) <= limit]
    if len(kept) != len(lines):
        counts["long_lines_removed"] += len(lines) - len(kept)
        return "\n".join(kept)
    return text
