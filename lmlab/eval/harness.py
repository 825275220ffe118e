"""Run evaluation tasks against any :class:`~lmlab.eval.protocol.LanguageModel`.

``evaluate`` loads every task first (so a bad YAML or a missing file fails
before any model work), then per task builds all requests, sends them to the
model in length-sorted batches (longest first) behind a tqdm progress bar,
scores the responses, aggregates metrics with standard errors, and -- with an
``output_dir`` -- atomically writes ``results.json`` and one
``samples_<task>.jsonl`` per task.
"""

from __future__ import annotations

import dataclasses
import datetime as _dt
import math
import os
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from tqdm.auto import tqdm

from lmlab.errors import ConfigError
from lmlab.eval.base import SampleRecord, Task
from lmlab.eval.batching import run_length_sorted
from lmlab.eval.data import Doc, resolve_data_dir, resolve_online
from lmlab.eval.protocol import LanguageModel
from lmlab.eval.results import atomic_write_json, atomic_write_jsonl
from lmlab.eval.sandbox import isolation
from lmlab.eval.tasks import load_task

RESULTS_FILE = "results.json"


def evaluate(
    model: LanguageModel,
    tasks: Sequence[str | os.PathLike] | str,
    data_dir: str | os.PathLike | None = None,
    limit: int | float | None = None,
    num_fewshot: int | None = None,
    batch_size: int = 32,
    seed: int = 1234,
    output_dir: str | os.PathLike | None = None,
    *,
    online: bool | None = None,
    progress: bool = True,
    bootstrap_iters: int = 1000,
    allow_unsandboxed: bool = False,
) -> dict[str, Any]:
    """Evaluate ``model`` on the named tasks (built-in names or YAML paths); return the results dict.

    ``limit``: the first N docs of each task (an int), or a fraction of them (a
    float below 1). ``num_fewshot`` overrides every task's default. ``seed``
    fixes few-shot sampling and bootstrap resampling. The returned dict is what
    ``results.json`` holds: ``results[task]`` maps metric names (lm-eval style:
    ``acc``, ``acc_stderr``, ``exact_match,strict-match``, ``pass@1``) to values,
    plus ``n``, ``num_fewshot``, ``skipped_rows`` and ``subtasks`` where defined.
    Code tasks execute model-written programs in the OS sandbox
    (:mod:`lmlab.eval.sandbox`); where it is unavailable they refuse with a
    ``ConfigError`` before any model work, unless ``allow_unsandboxed`` is True.
    """
    if not isinstance(model, LanguageModel):
        raise TypeError(f"{type(model).__name__} lacks loglikelihood()/generate(); see lmlab.eval.protocol")
    names = [tasks] if isinstance(tasks, (str, os.PathLike)) else list(tasks)
    if not names:
        raise ConfigError("tasks", "no tasks given", "name at least one task, e.g. arc_easy")
    if isinstance(batch_size, bool) or not isinstance(batch_size, int) or batch_size < 1:
        raise ConfigError("batch_size", f"must be a positive integer, got {batch_size!r}", None)
    _check_limit(limit)
    data_path = resolve_data_dir(data_dir)
    is_online = resolve_online(online)

    loaded = [load_task(n, data_path, num_fewshot=num_fewshot, seed=seed, online=is_online) for n in names]
    seen: set[str] = set()
    for task in loaded:
        if task.name in seen:
            raise ConfigError("tasks", f"task {task.name!r} is listed twice", "list each task once")
        seen.add(task.name)
    if any(task.executes_code for task in loaded):
        isolation(allow_unsandboxed)  # refuse before any model work

    results: dict[str, Any] = {}
    samples: dict[str, list[dict]] = {}
    for task in loaded:
        docs = _apply_limit(task.docs, limit)
        records = run_task(model, task, docs, batch_size=batch_size, progress=progress,
                           allow_unsandboxed=allow_unsandboxed)
        entry = task.aggregate(records, bootstrap_iters)
        entry.update(num_fewshot=task.num_fewshot, skipped_rows=task.skipped_rows, source=task.source)
        groups = task.aggregate_groups(records, bootstrap_iters)
        if groups:
            entry["subtasks"] = groups
        results[task.name] = entry
        samples[task.name] = [sample_log(task.name, r) for r in records]

    out: dict[str, Any] = {
        "results": results,
        "config": {
            "model": type(model).__name__,
            "tasks": [os.fspath(n) for n in names],
            "data_dir": str(data_path),
            "limit": limit,
            "num_fewshot": num_fewshot,
            "batch_size": batch_size,
            "seed": seed,
            "online": is_online,
            "bootstrap_iters": bootstrap_iters,
            "allow_unsandboxed": allow_unsandboxed,
        },
        "task_specs": {t.name: dataclasses.asdict(t.spec) for t in loaded},
        "created": _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds"),
    }
    if output_dir is not None:
        out_dir = Path(output_dir)
        files = {}
        for name, rows in samples.items():
            files[name] = str(atomic_write_jsonl(out_dir / f"samples_{name}.jsonl", rows))
        out["sample_files"] = files
        atomic_write_json(out_dir / RESULTS_FILE, out)
    return out


def run_task(
    model: LanguageModel, task: Task, docs: list[Doc], *, batch_size: int = 32, progress: bool = False,
    allow_unsandboxed: bool = False,
) -> list[SampleRecord]:
    """Build, run and score all requests of ``task`` over ``docs``; one record per doc.

    ``allow_unsandboxed``: see :func:`evaluate`.
    """
    if task.executes_code:
        isolation(allow_unsandboxed)
        task.allow_unsandboxed = allow_unsandboxed  # type: ignore[attr-defined]
    requests = [task.build_requests(d) for d in docs]
    flat = [r for rs in requests for r in rs]
    answers = _run_requests(model, task, flat, batch_size, progress)
    grouped, i = [], 0
    for rs in requests:
        grouped.append(answers[i : i + len(rs)])
        i += len(rs)
    return task.score_all(docs, requests, grouped, progress=progress)


def _run_requests(model: LanguageModel, task: Task, requests: list, batch_size: int, progress: bool) -> list:
    bar = tqdm(total=len(requests), desc=f"{task.name} ({task.request_kind})", unit="req", disable=not progress)
    if task.request_kind == "loglikelihood":

        def call(batch: list) -> list:
            return [_check_ll(r) for r in model.loglikelihood(batch)]
    else:
        gen = task.spec.generation

        def call(batch: list) -> list:
            out = model.generate(batch, gen.max_new_tokens, list(gen.stop))
            return [_check_text(r) for r in out]

    try:
        return run_length_sorted(requests, call, batch_size, on_batch=bar.update)
    finally:
        bar.close()


def _check_ll(result: Any) -> tuple[float, bool]:
    try:
        ll, greedy = result
        return float(ll), bool(greedy)
    except (TypeError, ValueError):
        raise TypeError(f"loglikelihood() must return (float, bool) pairs, got {result!r}") from None


def _check_text(result: Any) -> str:
    if not isinstance(result, str):
        raise TypeError(f"generate() must return strings, got {type(result).__name__}")
    return result


def sample_log(task_name: str, record: SampleRecord) -> dict[str, Any]:
    """One line of a samples file: task, doc id, the type's log fields and per-doc metrics."""
    return {"task": task_name, "doc_id": record.doc_id, **record.log, "metrics": record.metrics}


def _check_limit(limit: int | float | None) -> None:
    if limit is None:
        return
    ok = not isinstance(limit, bool) and (
        (isinstance(limit, int) and limit >= 1) or (isinstance(limit, float) and 0.0 < limit <= 1.0)
    )
    if not ok:
        raise ConfigError("limit", f"must be a positive int or a fraction in (0, 1], got {limit!r}", None)


def _apply_limit(docs: list[Doc], limit: int | float | None) -> list[Doc]:
    if limit is None:
        return docs
    if isinstance(limit, float):
        return docs[: max(1, math.ceil(len(docs) * limit))]
    return docs[:limit]
