"""Readers that turn evaluation sets into plain texts, one :class:`EvalItem` per test item.

Formats handled (as found in ``shared/data/eval``):

- GSM8K ``{"question", "answer"}`` JSONL: question + answer;
- llm-foundry ICL JSONL: ``{"query", "choices", "gold"}`` (multiple choice:
  query + gold choice), ``{"context", "continuation"}`` (language modelling:
  context + continuation), ``{"context_options", "continuation", "gold"}``
  (schema: gold context + continuation);
- HumanEval ``{"prompt", "canonical_solution"}`` JSONL(.gz): prompt + solution;
- MMLU (Hendrycks) ``data/<split>/<subject>_<split>.csv`` inside a tar.gz, rows
  ``question, A, B, C, D, answer``: question + the four options.

An item's text is what a model sees (and what a leak would copy); the
decontamination index is built from these texts.
"""

from __future__ import annotations

import csv
import gzip
import io
import json
import tarfile
from dataclasses import dataclass
from pathlib import Path
from typing import Iterator

from lmlab.errors import ConfigError


@dataclass(frozen=True)
class EvalItem:
    """One evaluation item: its task name, an id within the task, and its text."""

    task: str
    item_id: str
    text: str


def _open_text(path: Path) -> io.TextIOBase:
    if path.suffix == ".gz":
        return io.TextIOWrapper(gzip.open(path, "rb"), encoding="utf-8")
    return open(path, encoding="utf-8")


def _jsonl(path: Path) -> Iterator[tuple[int, dict]]:
    with _open_text(path) as f:
        for i, line in enumerate(f):
            if line.strip():
                yield i, json.loads(line)


def read_gsm8k(path: str | Path, task: str = "gsm8k") -> Iterator[EvalItem]:
    """GSM8K test items: question, newline, worked answer."""
    for i, row in _jsonl(Path(path)):
        yield EvalItem(task, str(i), f"{row['question']}\n{row['answer']}")


def read_icl_jsonl(path: str | Path, task: str | None = None) -> Iterator[EvalItem]:
    """llm-foundry in-context-learning JSONL; ``task`` defaults to the file stem without ``_icl``."""
    path = Path(path)
    task = task or path.name.split(".")[0].removesuffix("_icl")
    for i, row in _jsonl(path):
        if "query" in row and "choices" in row:
            gold = row.get("gold", 0)
            choices = row["choices"]
            answer = choices[gold] if isinstance(gold, int) and 0 <= gold < len(choices) else ""
            text = f"{row['query']} {answer}".strip()
        elif "context_options" in row:
            opts = row["context_options"]
            gold = row.get("gold", 0)
            text = f"{opts[gold] if 0 <= gold < len(opts) else opts[0]} {row.get('continuation', '')}".strip()
        elif "context" in row:
            cont = row.get("continuation", "")
            if isinstance(cont, list):
                cont = cont[0] if cont else ""
            text = f"{row['context']} {cont}".strip()
        else:
            raise ConfigError(
                str(path), f"line {i + 1} has none of query/context/context_options", "use llm-foundry ICL format"
            )
        yield EvalItem(task, str(i), text)


def read_humaneval(path: str | Path, task: str = "humaneval") -> Iterator[EvalItem]:
    """HumanEval problems: prompt (signature + docstring) followed by the canonical solution."""
    for i, row in _jsonl(Path(path)):
        yield EvalItem(task, str(row.get("task_id", i)), row["prompt"] + row.get("canonical_solution", ""))


def read_mmlu_tar(path: str | Path, splits: tuple[str, ...] = ("test",), task: str = "mmlu") -> Iterator[EvalItem]:
    """MMLU questions from the Hendrycks tarball, items id'd ``<subject>/<split>/<row>``."""
    with tarfile.open(path, "r:*") as tar:
        members = sorted((m for m in tar.getmembers() if m.isfile() and m.name.endswith(".csv")), key=lambda m: m.name)
        for m in members:
            parts = Path(m.name).parts
            if len(parts) < 2 or parts[-2] not in splits:
                continue
            split = parts[-2]
            subject = Path(m.name).stem.removesuffix(f"_{split}")
            f = tar.extractfile(m)
            if f is None:
                continue
            reader = csv.reader(io.TextIOWrapper(f, encoding="utf-8"))
            for r, row in enumerate(reader):
                if len(row) < 6:
                    continue
                yield EvalItem(task, f"{subject}/{split}/{r}", " ".join([row[0], *row[1:5]]))


def iter_eval_dir(path: str | Path) -> Iterator[EvalItem]:
    """All items of the recognised evaluation files in a directory (sorted by file name)."""
    path = Path(path)
    if not path.is_dir():
        raise ConfigError("eval_dir", f"{path} is not a directory", "point to the folder holding the eval files")
    for f in sorted(path.iterdir()):
        name = f.name.lower()
        if name.startswith("gsm8k") and name.endswith((".jsonl", ".jsonl.gz")):
            yield from read_gsm8k(f)
        elif name.endswith(("_icl.jsonl", "_icl.jsonl.gz")):
            yield from read_icl_jsonl(f)
        elif name.startswith("humaneval") and name.endswith((".jsonl", ".jsonl.gz")):
            yield from read_humaneval(f)
        elif name.startswith("mmlu") and name.endswith((".tar.gz", ".tgz", ".tar")):
            yield from read_mmlu_tar(f)
