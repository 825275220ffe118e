"""Training-set decontamination by n-gram overlap with evaluation items.

Following GPT-3 (Brown et al. 2020, App. C): texts are lowercased and
punctuation is removed (we keep runs of letters and digits as tokens), and a
training document is contaminated when it shares any 13-gram with an
evaluation item. Evaluation items shorter than 13 tokens but at least
``min_item_tokens`` long are matched as a whole (the document must contain the
entire item as a token sequence); shorter ones are skipped and counted, since
a handful of words says nothing about a leak.

The index holds 64-bit hashes of the evaluation n-grams in sorted numpy arrays,
so checking a document is one vectorised ``searchsorted``; the task(s) and the
first item owning a matching n-gram are looked up only for the (rare) hits.
"""

from __future__ import annotations

from collections import Counter, defaultdict
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Iterable, MutableMapping, Sequence

import numpy as np

from lmlab.data.prepare._hashing import extend_ngrams, mix64, ngram_hashes, sorted_unique, token_hashes
from lmlab.data.prepare.eval_sets import EvalItem, iter_eval_dir
from lmlab.data.prepare.stats import word_tokens
from lmlab.errors import ConfigError


def contamination_tokens(text: str) -> list[str]:
    """Lowercased tokens with punctuation removed (the GPT-3 normalisation)."""
    return word_tokens(text)


@dataclass
class _Table:
    hashes: np.ndarray  # sorted uint64
    tasks: np.ndarray  # int32 task index per hash
    items: np.ndarray  # int32 item index per hash (first item with this n-gram in the task)


class ContaminationIndex:
    """N-gram index over evaluation items; :meth:`lookup` finds the tasks a text overlaps.

    Args:
        n: n-gram length (13 as in GPT-3).
        min_item_tokens: items with fewer tokens than ``n`` but at least this many
            are matched whole; shorter items are skipped.
    """

    def __init__(self, n: int = 13, min_item_tokens: int = 8):
        if n < 1:
            raise ConfigError("decontaminate.n", f"must be >= 1, got {n}", "use 13")
        if not 1 <= min_item_tokens <= n:
            raise ConfigError(
                "decontaminate.min_item_tokens", f"must be in [1, n={n}], got {min_item_tokens}", "use e.g. 8"
            )
        self.n = n
        self.min_item_tokens = min_item_tokens
        self.tasks: list[str] = []
        self._task_ids: dict[str, int] = {}
        self.items: list[EvalItem] = []
        self.items_per_task: Counter[str] = Counter()
        self.skipped_short: Counter[str] = Counter()
        self._pending: dict[int, list[tuple[np.ndarray, int, int]]] = defaultdict(list)
        self._tables: dict[int, _Table] = {}

    @classmethod
    def from_items(cls, items: Iterable[EvalItem], n: int = 13, min_item_tokens: int = 8) -> "ContaminationIndex":
        index = cls(n, min_item_tokens)
        for item in items:
            index.add(item)
        return index.build()

    @classmethod
    def from_eval_dir(cls, path: str | Path, n: int = 13, min_item_tokens: int = 8) -> "ContaminationIndex":
        """Index every recognised file of an eval directory (see :func:`iter_eval_dir`)."""
        return cls.from_items(iter_eval_dir(path), n, min_item_tokens)

    def add(self, item: EvalItem) -> None:
        tokens = contamination_tokens(item.text)
        self.items_per_task[item.task] += 1
        if len(tokens) < self.min_item_tokens:
            self.skipped_short[item.task] += 1
            return
        task_id = self._task_ids.setdefault(item.task, len(self._task_ids))
        if task_id == len(self.tasks):
            self.tasks.append(item.task)
        length = min(self.n, len(tokens))
        grams = sorted_unique(ngram_hashes(token_hashes(tokens), length))
        self._pending[length].append((grams, task_id, len(self.items)))
        self.items.append(item)

    def build(self) -> "ContaminationIndex":
        """Sort the added n-grams into lookup tables (call after the last :meth:`add`)."""
        for length, parts in self._pending.items():
            old = self._tables.get(length)
            h = [p[0] for p in parts] + ([old.hashes] if old else [])
            t = [np.full(len(p[0]), p[1], dtype=np.int32) for p in parts] + ([old.tasks] if old else [])
            it = [np.full(len(p[0]), p[2], dtype=np.int32) for p in parts] + ([old.items] if old else [])
            hashes, tasks, items = np.concatenate(h), np.concatenate(t), np.concatenate(it)
            order = np.lexsort((items, tasks, hashes))
            hashes, tasks, items = hashes[order], tasks[order], items[order]
            # keep one row per (hash, task): the lowest item index
            keep = np.ones(len(hashes), dtype=bool)
            keep[1:] = (hashes[1:] != hashes[:-1]) | (tasks[1:] != tasks[:-1])
            self._tables[length] = _Table(hashes[keep], tasks[keep], items[keep])
        self._pending.clear()
        return self

    @property
    def n_ngrams(self) -> int:
        return sum(len(t.hashes) for t in self._tables.values())

    def lookup(self, text: str) -> dict[str, dict[str, Any]]:
        """Tasks whose items share an n-gram with ``text``: ``{task: {"ngrams": k, "example_item": id}}``."""
        if self._pending:
            raise ConfigError(
                "decontaminate.index", "items were added after the last build()", "call build() before lookup()"
            )
        tokens = contamination_tokens(text)
        if not tokens or not self._tables:
            return {}
        th = token_hashes(tokens)
        found: dict[str, dict[str, Any]] = {}
        # Grow the n-grams one length at a time, probing each indexed length.
        grams, k = th, 1
        for length in sorted(self._tables):
            while k < length:
                grams = extend_ngrams(grams, th, k)
                k += 1
            table = self._tables[length]
            if len(grams) == 0 or len(table.hashes) == 0:
                continue
            # Sorted queries make the binary searches walk the table in order.
            probe = np.sort(mix64(grams))
            pos = np.minimum(np.searchsorted(table.hashes, probe), len(table.hashes) - 1)
            hits = probe[table.hashes[pos] == probe]
            for g in sorted_unique(hits):
                lo = np.searchsorted(table.hashes, g, "left")
                hi = np.searchsorted(table.hashes, g, "right")
                for r in range(lo, hi):
                    task = self.tasks[table.tasks[r]]
                    entry = found.setdefault(task, {"ngrams": 0, "example_item": self.items[table.items[r]].item_id})
                    entry["ngrams"] += 1
        return found


@dataclass
class ContaminationReport:
    """Per-source and per-task counts of contaminated documents, and the flagged documents."""

    n_docs: int = 0
    n_contaminated: int = 0
    docs_by_source: Counter = field(default_factory=Counter)
    contaminated_by_source: Counter = field(default_factory=Counter)
    contaminated_by_task: Counter = field(default_factory=Counter)
    flagged: list[dict[str, Any]] = field(default_factory=list)

    def as_dict(self) -> dict[str, Any]:
        return {
            "n_docs": self.n_docs,
            "n_contaminated": self.n_contaminated,
            "docs_by_source": dict(self.docs_by_source),
            "contaminated_by_source": dict(self.contaminated_by_source),
            "contaminated_by_task": dict(self.contaminated_by_task),
        }


class Decontaminator:
    """Check documents against a :class:`ContaminationIndex`; ``doc -> (keep, reason)``.

    With ``drop=False`` every document is kept but contaminated ones are still
    counted and get ``metadata["contamination"]`` (tasks and n-gram counts).
    """

    name = "decontaminate"

    def __init__(self, index: ContaminationIndex, drop: bool = True):
        self.index = index
        self.drop = drop
        self.report = ContaminationReport()

    def __call__(self, doc: MutableMapping[str, Any]) -> tuple[bool, str | None]:
        source = str(doc.get("source", "unknown"))
        r = self.report
        r.n_docs += 1
        r.docs_by_source[source] += 1
        found = self.index.lookup(doc["text"])
        if not found:
            return True, None
        r.n_contaminated += 1
        r.contaminated_by_source[source] += 1
        for task in found:
            r.contaminated_by_task[task] += 1
        r.flagged.append({"id": doc.get("id"), "source": source, "tasks": found})
        if not self.drop:
            meta = doc.get("metadata")
            if not isinstance(meta, dict):
                meta = {} if meta is None else dict(meta)
                doc["metadata"] = meta
            meta["contamination"] = found
            return True, None
        return False, "contaminated:" + ",".join(sorted(found))


def decontaminate(
    docs: Iterable[MutableMapping[str, Any]], index: ContaminationIndex, drop: bool = True
) -> tuple[list[MutableMapping[str, Any]], ContaminationReport]:
    """Check all ``docs``; return the kept ones (all of them when ``drop=False``) and the report."""
    d = Decontaminator(index, drop=drop)
    kept = [doc for doc in docs if d(doc)[0]]
    return kept, d.report


def report_table(report: ContaminationReport, tasks: Sequence[str] | None = None) -> str:
    """Plain-text table of a report: per source, then per task."""
    lines = [f"{'source':24s} {'docs':>8s} {'contaminated':>13s}"]
    for src in sorted(report.docs_by_source):
        lines.append(f"{src:24s} {report.docs_by_source[src]:8d} {report.contaminated_by_source.get(src, 0):13d}")
    lines.append(f"{'task':24s} {'contaminated docs':>22s}")
    for task in tasks or sorted(report.contaminated_by_task):
        lines.append(f"{task:24s} {report.contaminated_by_task.get(task, 0):22d}")
    return "\n".join(lines)
