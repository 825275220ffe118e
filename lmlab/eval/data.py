"""Reading task data: local files (JSONL, gzipped JSONL, JSON, CSV, the MMLU tar) or the hub.

Rows are read raw, then a named transform and the spec's field mapping turn
them into the fields the templates use. A row that cannot be read or mapped is
*malformed*: it is counted and skipped with a :class:`DataWarning`, and the run
goes on. A missing file is a :class:`~lmlab.errors.ConfigError`, raised before
any model work.
"""

from __future__ import annotations

import csv
import gzip
import io
import json
import os
import re
import tarfile
import warnings
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from lmlab.errors import ConfigError
from lmlab.eval.spec import HubSource, TaskSpec, infer_format
from lmlab.eval.templates import TemplateError, render
from lmlab.eval.transforms import TRANSFORMS

ENV_DATA_DIR = "LMLAB_EVAL_DATA"
ENV_ONLINE = "LMLAB_EVAL_ONLINE"
#: Where task data is looked for when neither ``data_dir`` nor ``$LMLAB_EVAL_DATA`` names a
#: folder: ``data/eval`` under the working directory.
DEFAULT_DATA_DIR = Path("data") / "eval"
SPLIT_AWARE_FORMATS = ("mmlu_tar",)
_MMLU_LETTERS = "ABCD"


class DataWarning(UserWarning):
    """Malformed rows were skipped while loading a task."""


@dataclass
class Doc:
    """One evaluation item: its row index in the source (a stable id) and its fields."""

    id: int
    fields: dict[str, Any]


@dataclass
class DocSet:
    """Docs built from one source, plus what was skipped and why."""

    docs: list[Doc]
    source: str
    skipped: int = 0
    problems: list[str] = field(default_factory=list)  # the first few reasons, for the warning


def resolve_data_dir(data_dir: str | os.PathLike | None = None) -> Path:
    """The evaluation-data folder: ``data_dir`` if given, else ``$LMLAB_EVAL_DATA``, else ``data/eval``.

    One setting serves ``lmlab eval``, the :class:`~lmlab.eval.callback.EvalCallback`
    and the data pipeline's decontamination stage, so they read the same sets.
    ``~`` is expanded; a relative path is relative to the working directory.
    """
    if data_dir is None:
        data_dir = os.environ.get(ENV_DATA_DIR) or DEFAULT_DATA_DIR
    return Path(os.path.expanduser(data_dir))


def resolve_online(online: bool | None) -> bool:
    """Whether hub downloads are allowed: ``online`` if given, else ``$LMLAB_EVAL_ONLINE`` is 1/true."""
    if online is not None:
        return online
    return os.environ.get(ENV_ONLINE, "").strip().lower() in ("1", "true", "yes")


# --- raw rows --------------------------------------------------------------------------------


def iter_file_rows(path: Path, fmt: str, split: str | None = None) -> Iterator[tuple[int, dict | str]]:
    """Yield ``(row index, row)`` from a local file, or ``(row index, problem)`` for an unreadable row."""
    if fmt in ("jsonl", "jsonl.gz"):
        opener = gzip.open if fmt == "jsonl.gz" else open
        with opener(path, "rt", encoding="utf-8") as fh:
            index = 0
            for line in fh:
                if not line.strip():
                    continue  # blank lines are padding, not rows
                yield index, _json_object(line)
                index += 1
    elif fmt == "json":
        data = json.loads(path.read_text(encoding="utf-8"))
        if isinstance(data, dict) and isinstance(data.get("data"), list):
            data = data["data"]
        if not isinstance(data, list):
            raise ConfigError(str(path), "a .json task file must hold a list of rows", "or use JSONL")
        for index, row in enumerate(data):
            yield index, row if isinstance(row, dict) else f"not an object: {type(row).__name__}"
    elif fmt == "csv":
        with open(path, newline="", encoding="utf-8") as fh:
            for index, row in enumerate(csv.DictReader(fh)):
                yield index, ("wrong number of columns" if None in row or None in row.values() else dict(row))
    elif fmt == "mmlu_tar":
        yield from _iter_mmlu_tar(path, split or "test")
    else:  # spec validation makes this unreachable; kept for direct callers
        raise ValueError(f"unknown data format {fmt!r}")


def _json_object(line: str) -> dict | str:
    try:
        row = json.loads(line)
    except json.JSONDecodeError as e:
        return f"invalid JSON ({e.msg})"
    return row if isinstance(row, dict) else f"not an object: {type(row).__name__}"


def _iter_mmlu_tar(path: Path, split: str) -> Iterator[tuple[int, dict | str]]:
    """Rows of the original MMLU CSVs (``data/<split>/<subject>_<split>.csv``) read straight from the tar.

    Rows come out in the ``cais/mmlu`` hub schema (``question``, ``subject``,
    ``choices``, integer ``answer``) so one spec serves both sources.
    """
    pattern = re.compile(rf"(?:^|/){re.escape(split)}/([^/]+)_{re.escape(split)}\.csv$")
    with tarfile.open(path, "r:*") as tar:
        members = sorted(
            (m for m in tar.getmembers() if m.isfile() and pattern.search(m.name)), key=lambda m: m.name
        )
        if not members:
            raise ConfigError(str(path), f"no MMLU CSVs for split {split!r}", "MMLU splits are dev, val, test")
        index = 0
        for member in members:
            subject = pattern.search(member.name).group(1)  # type: ignore[union-attr]
            text = tar.extractfile(member).read().decode("utf-8")  # type: ignore[union-attr]
            for record in csv.reader(io.StringIO(text)):
                if len(record) != 6:
                    yield index, f"{member.name}: expected 6 columns, got {len(record)}"
                elif record[5].strip() not in _MMLU_LETTERS or not record[5].strip():
                    yield index, f"{member.name}: answer {record[5]!r} is not one of A-D"
                else:
                    yield index, {
                        "question": record[0],
                        "subject": subject,
                        "choices": record[1:5],
                        "answer": _MMLU_LETTERS.index(record[5].strip()),
                    }
                index += 1


def iter_hub_rows(hub: HubSource, split: str, task_name: str) -> Iterator[tuple[int, dict | str]]:
    """Rows of a hub dataset via ``datasets.load_dataset`` (network, or the local HF cache)."""
    import datasets  # imported lazily: it is slow to import and only needed here

    try:
        ds = datasets.load_dataset(hub.path, hub.name, split=split, revision=hub.revision)
    except Exception as e:  # any failure here is a source the user has to fix
        raise ConfigError(
            f"{task_name}.data.hf", f"could not load {hub.path} ({split}): {e}",
            "check the dataset id, or put the local file under data_dir",
        ) from None
    for index, row in enumerate(ds):
        yield index, dict(row)


# --- rows -> docs ----------------------------------------------------------------------------


def lookup(row: dict, dotted: str) -> Any:
    """``row[dotted]`` if present, else walk ``a.b.0`` through nested dicts and lists."""
    if dotted in row:
        return row[dotted]
    current: Any = row
    for part in dotted.split("."):
        if isinstance(current, dict):
            current = current[part]
        elif isinstance(current, (list, tuple)) and re.fullmatch(r"-?\d+", part):
            current = current[int(part)]
        else:
            raise KeyError(dotted)
    return current


def map_fields(row: dict, fields: dict[str, Any]) -> dict:
    """The row plus each mapped field: a dotted path, a ``{template}``, or a list of those."""

    def resolve(source: Any) -> Any:
        if isinstance(source, list):
            return [resolve(s) for s in source]
        if "{" in source:
            return render(source, row)
        return lookup(row, source)

    out = dict(row)
    for name, source in fields.items():
        out[name] = resolve(source)
    return out


def build_docs(
    rows: Iterator[tuple[int, dict | str]],
    source: str,
    transform: str | None,
    fields: dict[str, Any],
    check: Callable[[Doc], None],
) -> DocSet:
    """Turn raw rows into checked docs; malformed rows are counted, not raised."""
    fn = TRANSFORMS[transform] if transform else None
    result = DocSet(docs=[], source=source)
    for index, row in rows:
        try:
            if isinstance(row, str):
                raise ValueError(row)
            if fn is not None:
                row = fn(row)
            doc = Doc(index, map_fields(row, fields))
            check(doc)
        except (KeyError, IndexError, TypeError, ValueError, TemplateError) as e:
            result.skipped += 1
            if len(result.problems) < 3:
                reason = f"missing field {e.args[0]!r}" if isinstance(e, KeyError) else str(e)
                result.problems.append(f"row {index}: {reason}")
            continue
        result.docs.append(doc)
    return result


def warn_skipped(task_name: str, docset: DocSet) -> None:
    """Emit one :class:`DataWarning` summarising the malformed rows of ``docset`` (if any)."""
    if docset.skipped:
        warnings.warn(
            f"{task_name}: skipped {docset.skipped} malformed row(s) in {docset.source} "
            f"({'; '.join(docset.problems)})",
            DataWarning,
            stacklevel=3,
        )


def load_docs(
    spec: TaskSpec,
    data_dir: Path,
    check: Callable[[Doc], None],
    *,
    online: bool,
    split: str | None = None,
    path: str | None = None,
    hub_split: str | None = None,
) -> DocSet:
    """Load the docs a spec describes (or another split / file of the same task).

    Local files win; the hub is used only when the local file is missing, the
    spec has ``data.hf`` and ``online`` is true.
    """
    rel = path or spec.data.path
    fmt = (infer_format(path) or spec.data.format) if path is not None else spec.data.format
    local = None
    if rel is not None:
        local = Path(rel) if Path(rel).is_absolute() else data_dir / rel
        if local.is_file():
            if split is not None and fmt not in SPLIT_AWARE_FORMATS:
                raise ConfigError(
                    f"{spec.name}.fewshot.split", f"{fmt} files have no splits",
                    "use fewshot.path for a separate few-shot file",
                )
            use_split = split or spec.data.split
            rows = iter_file_rows(local, fmt or "jsonl", use_split)
            source = str(local) + (f" [{use_split or 'test'}]" if fmt in SPLIT_AWARE_FORMATS else "")
            return build_docs(rows, source, spec.data.transform, spec.data.fields, check)
    hub = spec.data.hf
    if hub is not None and online:
        hsplit = hub_split or hub.split
        fields = hub.fields if hub.fields is not None else spec.data.fields
        rows = iter_hub_rows(hub, hsplit, spec.name)
        return build_docs(rows, f"hf:{hub.path}[{hsplit}]", hub.transform, fields, check)
    fix = f"put the file there, set data_dir or ${ENV_DATA_DIR}"
    if hub is not None:
        fix += f", or pass online=True to download {hub.path}"
    key = "fewshot.path" if path is not None else "data.path"
    raise ConfigError(f"{spec.name}.{key}", f"data file not found: {local or '(no data.path)'}", fix)
