"""Named text sources of a training mixture.

A :class:`SourceConfig` names one source (``web``, ``books``, ...) and where its
documents come from:

- ``type: hf`` — a Hugging Face hub dataset (``path`` is the dataset name,
  ``name`` its config, ``split``, ``streaming``), read with
  ``datasets.load_dataset``.
- ``type: files`` — local files: ``path`` is a file, a directory or a glob
  (txt, json/jsonl, parquet, optionally .gz/.bz2/.xz compressed). Plain-text
  files are one document each; text and JSON files are read by
  :mod:`lmlab.data.textread` (the same reading, invalid-UTF-8 and text-field
  policy as ``lmlab data prepare``), Parquet files through ``datasets``.
- ``type: stdlib`` — text that ships with every Python installation, so a
  mixture builds offline anywhere: ``path: code`` is the standard library's
  Python source, ``path: docs`` the reference documentation topics from
  ``pydoc_data`` plus module docstrings.
"""

from __future__ import annotations

import glob
import hashlib
import logging
import os
import sys
import sysconfig
from dataclasses import dataclass, field
from pathlib import Path
from typing import Iterator, Literal, Optional

from lmlab.data.textread import (
    DEFAULT_MAX_MISSING_TEXT_FRACTION,
    TextFieldTally,
    check_text_field,
    decode_text,
    open_file,
    parse_json,
)
from lmlab.errors import ConfigError

log = logging.getLogger(__name__)

_BUILDERS = {
    ".txt": "text",
    ".text": "text",
    ".md": "text",
    ".json": "json",
    ".jsonl": "json",
    ".parquet": "parquet",
}


@dataclass
class SourceConfig:
    """One named source of the mixture.

    Args:
        name: Source name used in logs and reports (``web``, ``books``, ...).
        weight: Share of training tokens drawn from this source. Weights are
            normalised over the mixture, so they need not sum to one.
        type: ``hf``, ``files`` or ``stdlib`` (see the module docstring).
        path: Hub dataset name, local path/glob, or ``code``/``docs`` for stdlib.
        name_config: Hub dataset config name (``datasets.load_dataset(path, name_config)``).
        split: Dataset split to read.
        streaming: Stream a hub dataset instead of downloading it whole.
        text_field: Column holding the document text. ``None`` means ``text``
            for JSON/JSON-lines files (never another column: records without
            it are skipped and counted) and, for Parquet and hub datasets,
            ``text`` or else the first string column.
        max_missing_text_fraction: Share of a JSON source's records that may
            lack the text field (they are skipped and logged); more is a
            ConfigError, and so is a field that no record has.
        max_documents: Read at most this many documents (``None``: all).
        max_chars: Truncate each document to this many characters (guards
            against gigantic single-line files).
    """

    name: str
    weight: float = 1.0
    type: Literal["hf", "files", "stdlib"] = "files"
    path: str = ""
    name_config: Optional[str] = None
    split: str = "train"
    streaming: bool = False
    text_field: Optional[str] = None
    max_documents: Optional[int] = None
    max_chars: Optional[int] = 1_000_000
    max_missing_text_fraction: float = DEFAULT_MAX_MISSING_TEXT_FRACTION

    def fingerprint(self) -> str:
        """A string that changes whenever the source's documents may change."""
        parts = [self.name, self.type, self.path, str(self.name_config), self.split, str(self.text_field)]
        parts += [str(self.max_documents), str(self.max_chars)]
        if self.type == "files":
            for f in resolve_files(self):
                st = os.stat(f)
                parts.append(f"{f}:{st.st_size}:{int(st.st_mtime)}")
        elif self.type == "stdlib":
            parts.append(sys.version)
        return hashlib.sha256("|".join(parts).encode()).hexdigest()[:16]


def _field(src: SourceConfig, idx: int | None, key: str) -> str:
    return f"data.sources[{idx}].{key}" if idx is not None else f"source {src.name!r}: {key}"


def resolve_files(src: SourceConfig, idx: int | None = None) -> list[str]:
    """Expand a ``files`` source's path (file, directory or glob) to a sorted file list."""
    p = os.path.expanduser(src.path)
    if os.path.isdir(p):
        files = sorted(str(f) for f in Path(p).rglob("*") if f.is_file())
    else:
        files = sorted(glob.glob(p, recursive=True))
    files = [f for f in files if _builder_for(f) is not None]
    if not files:
        raise ConfigError(
            _field(src, idx, "path"),
            f"no readable files match {src.path!r}",
            "point it at existing .txt/.json/.jsonl/.parquet files (optionally .gz/.bz2)",
        )
    return files


def _builder_for(path: str) -> Optional[str]:
    name = path.lower()
    for comp in (".gz", ".bz2", ".xz", ".zst"):
        if name.endswith(comp):
            name = name[: -len(comp)]
    return _BUILDERS.get(os.path.splitext(name)[1])


def _pick_text_field(columns: dict, src: SourceConfig, idx: int | None) -> str:
    if src.text_field:
        if src.text_field not in columns:
            raise ConfigError(
                _field(src, idx, "text_field"),
                f"column {src.text_field!r} not found (columns: {sorted(columns)})",
                "set text_field to one of the columns",
            )
        return src.text_field
    if "text" in columns:
        return "text"
    for key, feat in columns.items():
        if getattr(feat, "dtype", None) in ("string", "large_string"):
            return key
    raise ConfigError(_field(src, idx, "text_field"), "no string column found", "set text_field")


def iter_documents(src: SourceConfig, idx: int | None = None) -> Iterator[str]:
    """Yield the documents of a source as strings (empty documents skipped)."""
    if src.type == "stdlib":
        docs = _stdlib_documents(src, idx)
    elif src.type in ("files", "hf"):
        docs = _datasets_documents(src, idx)
    else:
        raise ConfigError(_field(src, idx, "type"), f"unknown source type {src.type!r}", "use hf, files or stdlib")
    count = 0
    for text in docs:
        if not text or not text.strip():
            continue
        if src.max_chars is not None:
            text = text[: src.max_chars]
        yield text
        count += 1
        if src.max_documents is not None and count >= src.max_documents:
            break


def _datasets_documents(src: SourceConfig, idx: int | None) -> Iterator[str]:
    import datasets

    datasets.disable_progress_bars()
    if src.type == "files":
        files = resolve_files(src, idx)
        builders = {_builder_for(f) for f in files}
        if len(builders) > 1:
            raise ConfigError(
                _field(src, idx, "path"), f"mixes file kinds {sorted(builders)}", "split it into one source per kind"
            )
        builder = builders.pop()
        if builder in ("text", "json"):
            yield from _file_documents(src, idx, files, builder)
            return
        try:
            ds = datasets.load_dataset(builder, data_files=files, split="train", streaming=True)
        except Exception as e:  # datasets raises many types for unreadable input
            raise ConfigError(_field(src, idx, "path"), f"cannot read {src.path!r}: {e}".splitlines()[0]) from None
    else:
        try:
            ds = datasets.load_dataset(src.path, src.name_config, split=src.split, streaming=src.streaming)
        except Exception as e:
            raise ConfigError(
                _field(src, idx, "path"),
                f"cannot load hub dataset {src.path!r}: {e}".splitlines()[0],
                "check the name and network, or use type: files with local data",
            ) from None
    text_key = None
    try:
        for row in ds:
            if text_key is None:
                text_key = _pick_text_field(
                    getattr(ds, "features", None) or {k: _StrFeat(v) for k, v in row.items()}, src, idx
                )
            value = row.get(text_key)
            if isinstance(value, str):
                yield value
    except ConfigError:
        raise
    except Exception as e:
        raise ConfigError(_field(src, idx, "path"), f"cannot read {src.path!r}: {e}".splitlines()[0]) from None


def _file_documents(src: SourceConfig, idx: int | None, files: list[str], builder: str) -> Iterator[str]:
    """Text and JSON files, read as ``lmlab data prepare`` reads them; counts checked when the source ends."""
    tally = TextFieldTally()
    replaced = damaged = 0

    def decoded(text: str, n: int) -> str:
        nonlocal replaced, damaged
        replaced += n
        damaged += n > 0
        return text

    for path in files:
        try:
            if builder == "text":
                with open_file(path) as f:
                    text, n = decode_text(f.read())
                # universal newlines, as text-mode reading gives
                yield decoded(text.replace("\r\n", "\n").replace("\r", "\n"), n)
                continue
            for where, row, n in _json_rows(path):
                if not isinstance(row, dict):
                    raise ConfigError(_field(src, idx, "path"), f"{where}: a JSON record is not an object")
                text, _ = tally.text(row, src.text_field)
                if text is not None:
                    yield decoded(text, n)
        except ConfigError:
            raise
        except (OSError, EOFError, ValueError) as e:  # unreadable, truncated archive, malformed JSON
            raise ConfigError(_field(src, idx, "path"), f"cannot read {path}: {e}".splitlines()[0], "fix or remove the file") from None
    if replaced:
        log.warning(
            "source %r: %d invalid UTF-8 byte sequences in %d documents replaced with U+FFFD", src.name, replaced, damaged
        )
    check_text_field(
        _field(src, idx, "text_field"),
        _field(src, idx, "max_missing_text_fraction"),
        src.name,
        src.text_field,
        tally.rows,
        tally.missing,
        tally.fields,
        src.max_missing_text_fraction,
    )


def _json_rows(path: str) -> Iterator[tuple[str, object, int]]:
    """``(location, record, replaced byte sequences)`` of a JSON array/object file or a JSON-lines file.

    A malformed line is a ValueError naming the file and line.
    """
    with open_file(path) as f:
        if ".jsonl" not in path.lower():
            data = f.read()
            try:
                obj, n = parse_json(data)
            except ValueError:
                lines = data.splitlines()  # a .json file holding JSON lines
            else:
                for j, row in enumerate(obj if isinstance(obj, list) else [obj]):
                    yield f"{path}:{j}", row, n if j == 0 else 0
                return
        else:
            lines = f
        for j, line in enumerate(lines):
            if not line.strip():
                continue
            try:
                row, n = parse_json(line)
            except ValueError:
                raise ValueError(f"{path}:{j + 1}: malformed JSON line") from None
            yield f"{path}:{j + 1}", row, n


class _StrFeat:
    def __init__(self, v):
        self.dtype = "string" if isinstance(v, str) else type(v).__name__


def _stdlib_documents(src: SourceConfig, idx: int | None) -> Iterator[str]:
    stdlib = Path(sysconfig.get_paths()["stdlib"])
    if src.path == "code":
        for f in sorted(stdlib.rglob("*.py")):
            rel = f.relative_to(stdlib).parts
            # tests and vendored packages are noisy and version-specific
            if any(p in ("test", "tests", "idlelib", "site-packages", "lib2to3", "turtledemo") for p in rel):
                continue
            try:
                yield f.read_text(encoding="utf-8")
            except (UnicodeDecodeError, OSError):
                continue
    elif src.path == "docs":
        try:
            from pydoc_data.topics import topics
        except ImportError:  # some minimal Python builds drop pydoc_data
            topics = {}
        for key in sorted(topics):
            yield topics[key]
        for f in sorted(stdlib.glob("*.py")):
            try:
                doc = module_docstring(f.read_text(encoding="utf-8"))
            except (SyntaxError, UnicodeDecodeError, OSError):
                continue
            if doc and len(doc) > 200:
                yield doc
    else:
        raise ConfigError(_field(src, idx, "path"), f"unknown stdlib part {src.path!r}", "use code or docs")


def module_docstring(source: str) -> Optional[str]:
    """``ast.get_docstring(ast.parse(source))``, parsing only the module's first statement.

    The docstring is the first statement, so compiling the rest of a large
    module (most of the time of reading the ``docs`` source) is wasted work.
    Unlike a whole-module parse, a syntax error after the first statement is
    not noticed (the standard library's own modules always compile).
    """
    import ast
    import io
    import tokenize

    skip = (tokenize.ENCODING, tokenize.COMMENT, tokenize.NL, tokenize.NEWLINE, tokenize.INDENT, tokenize.DEDENT)
    end = None
    try:
        tokens = tokenize.generate_tokens(io.StringIO(source).readline)
        first = next((t for t in tokens if t.type not in skip), None)
        if first is None or (first.type != tokenize.STRING and first.string != "("):
            return None
        depth = int(first.string == "(")
        for t in tokens:
            if t.type == tokenize.OP and t.string in ("(", "[", "{"):
                depth += 1
            elif t.type == tokenize.OP and t.string in (")", "]", "}"):
                depth -= 1
            elif t.type in (tokenize.NEWLINE, tokenize.ENDMARKER) or (t.type == tokenize.OP and t.string == ";" and depth == 0):
                end = t.start
                break
    except (tokenize.TokenError, SyntaxError):
        end = None
    if end is not None:
        lines = io.StringIO(source).readlines()  # the lines tokenize numbered (str.splitlines also splits at \f)
        head = "".join(lines[: end[0] - 1]) + lines[end[0] - 1][: end[1]] if end[0] <= len(lines) else source
        try:
            return ast.get_docstring(ast.parse(head))
        except SyntaxError:
            pass
    return ast.get_docstring(ast.parse(source))


def validate_sources(sources: list[SourceConfig]) -> None:
    """Check names and weights before any work starts."""
    if not sources:
        raise ConfigError("data.sources", "the mixture has no sources", "add at least one source")
    names = [s.name for s in sources]
    if len(set(names)) != len(names):
        raise ConfigError("data.sources", f"duplicate source names {names}", "give each source a unique name")
    for i, s in enumerate(sources):
        if s.type not in ("hf", "files", "stdlib"):
            raise ConfigError(f"data.sources[{i}].type", f"unknown source type {s.type!r}", "use hf, files or stdlib")
        if not (s.weight >= 0):
            raise ConfigError(f"data.sources[{i}].weight", f"weight must be >= 0, got {s.weight}", "use a non-negative weight")
        if s.type == "files":
            resolve_files(s, i)
    if sum(s.weight for s in sources) <= 0:
        raise ConfigError("data.sources", "weights sum to zero", "give at least one source a positive weight")
