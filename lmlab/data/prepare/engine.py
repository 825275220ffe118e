"""Sharded, resumable, cached execution of per-source pipeline stages.

A stage (``collect``, ``filter``, ...) turns one source's input into numbered
output shards. Each shard ``k`` is a pure function of input batch ``k`` and the
stage's context, so shards can be computed in any order, in any process, on
any machine, and the result is the same bytes.

On disk (``OUT/stages/<stage>/<source>/``):

- while running, shards go to ``<source>.partial/``: each data file is written
  under a temporary name and renamed; a ``shard-NNNNN.stats.json`` sidecar is
  written last and marks the shard complete; ``key.txt`` names the stage key;
- when every shard is there, ``done.json`` (key, merged stats, per-shard
  document counts) is written and the directory is renamed to ``<source>/``.

A stage is reused only when ``<source>/done.json`` carries the expected key
(a hash of the stage config and of its input's key), so nothing partially
written is ever read back as complete. ``resume=True`` also keeps the finished
shards of an interrupted run whose key matches.

:func:`ordered_map` runs shard functions in ``num_proc`` forked processes with
a bounded number in flight and yields results in input order.
"""

from __future__ import annotations

import gzip
import hashlib
import io
import json
import multiprocessing as mp
import os
import shutil
import sys
from collections import Counter, deque
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Iterable, Iterator, Mapping

from lmlab.atomic import atomic_write_bytes, atomic_write_json, publish_dir

#: Bumped when a stage's output format or semantics change, so old caches are not reused.
ENGINE_VERSION = "1"

#: Test hook: called in the main process as ``hook(stage, source, shard_index)`` after a shard is complete.
after_shard_hook: Callable[[str, str, int], None] | None = None


def stable_hash(*parts: Any) -> str:
    """Hex SHA-256 (20 chars) of JSON-serialised parts (dict keys sorted)."""
    h = hashlib.sha256()
    for p in parts:
        h.update(json.dumps(p, sort_keys=True, default=str).encode())
        h.update(b"\x00")
    return h.hexdigest()[:20]


# -- atomic, deterministic file writing ---------------------------------------------


def write_stage_json(path: Path, obj: Any) -> None:
    """A stage's JSON side file (sorted keys, numpy scalars as numbers), written atomically."""
    atomic_write_json(path, obj, sort_keys=True, default=_json_default)


def _json_default(o: Any) -> Any:
    if hasattr(o, "item"):  # numpy scalars
        return o.item()
    if isinstance(o, (set, frozenset)):
        return sorted(o)
    raise TypeError(f"not JSON serialisable: {type(o).__name__}")


def encode_jsonl_gz(records: Iterable[Mapping[str, Any]], level: int = 3) -> bytes:
    """JSON lines, gzip-compressed with a fixed header (no name, mtime 0): same records, same bytes."""
    raw = io.BytesIO()
    with gzip.GzipFile(filename="", mode="wb", fileobj=raw, compresslevel=level, mtime=0) as gz:
        for r in records:
            gz.write(json.dumps(r, ensure_ascii=False, separators=(",", ":")).encode("utf-8"))
            gz.write(b"\n")
    return raw.getvalue()


def read_jsonl_gz(path: Path) -> list[dict[str, Any]]:
    with gzip.open(path, "rb") as f:
        return [json.loads(line) for line in f if line.strip()]


def save_npy(path: Path, array: Any) -> None:
    import numpy as np

    buf = io.BytesIO()
    np.save(buf, array, allow_pickle=False)
    atomic_write_bytes(path, buf.getvalue())


# -- stats ------------------------------------------------------------------------------


def merge_stats(parts: Iterable[Mapping[str, Any]]) -> dict[str, Any]:
    """Sum numbers and merge nested count dicts across shard stats."""
    out: dict[str, Any] = {}
    for p in parts:
        for k, v in p.items():
            if isinstance(v, Mapping):
                cur = Counter(out.get(k, {}))
                for kk, vv in v.items():
                    cur[kk] += vv
                out[k] = dict(cur)
            elif isinstance(v, (int, float)) and not isinstance(v, bool):
                out[k] = out.get(k, 0) + v
            elif isinstance(v, list):
                out[k] = (out.get(k, []) + list(v))[:20]  # examples: keep a few
            else:
                out.setdefault(k, v)
    return out


# -- stage store ----------------------------------------------------------------------------


def shard_name(k: int) -> str:
    return f"shard-{k:05d}"


@dataclass
class StageResult:
    """A finished stage of one source: its directory and ``done.json`` contents."""

    stage: str
    source: str
    path: Path
    done: dict[str, Any]
    computed: bool = False

    @property
    def key(self) -> str:
        return self.done["key"]

    @property
    def stats(self) -> dict[str, Any]:
        return self.done["stats"]

    @property
    def shard_docs(self) -> list[int]:
        return self.done["shard_docs"]

    @property
    def n_shards(self) -> int:
        return len(self.done["shard_docs"])


class StageStore:
    """``OUT/stages``: finished stage directories, keyed; partial ones for resuming."""

    def __init__(self, root: str | os.PathLike):
        self.root = Path(root)

    def final_dir(self, stage: str, source: str) -> Path:
        return self.root / stage / source

    def partial_dir(self, stage: str, source: str) -> Path:
        return self.root / stage / f"{source}.partial"

    def load(self, stage: str, source: str, key: str) -> StageResult | None:
        """The finished stage if its ``done.json`` carries ``key``, else ``None``."""
        d = self.final_dir(stage, source)
        try:
            done = json.loads((d / "done.json").read_text())
        except (OSError, ValueError):
            return None
        if done.get("key") != key:
            return None
        return StageResult(stage, source, d, done)

    def open_partial(self, stage: str, source: str, key: str, resume: bool) -> tuple[Path, set[int]]:
        """The partial directory for ``key`` and the shards already complete in it (with ``resume``)."""
        d = self.partial_dir(stage, source)
        if d.exists():
            try:
                same = (d / "key.txt").read_text().strip() == key
            except OSError:
                same = False
            if not (resume and same):
                shutil.rmtree(d)
        d.mkdir(parents=True, exist_ok=True)
        atomic_write_bytes(d / "key.txt", key.encode())
        done = set()
        for f in d.glob("shard-*.stats.json"):
            done.add(int(f.name[len("shard-") : len("shard-") + 5]))
        return d, done

    def commit(self, stage: str, source: str, key: str, partial: Path, n_shards: int, extra: dict | None = None) -> StageResult:
        """Merge shard stats, write ``done.json`` and move the partial directory into place."""
        shard_stats = []
        for k in range(n_shards):
            f = partial / f"{shard_name(k)}.stats.json"
            if not f.exists():
                raise RuntimeError(f"{stage}/{source}: shard {k} is missing; the stage did not finish")
            shard_stats.append(json.loads(f.read_text()))
        done = {
            "key": key,
            "stage": stage,
            "source": source,
            "shard_docs": [int(s.get("docs_out", 0)) for s in shard_stats],
            "stats": merge_stats(shard_stats),
            **(extra or {}),
        }
        write_stage_json(partial / "done.json", done)
        final = self.final_dir(stage, source)
        publish_dir(partial, final)
        return StageResult(stage, source, final, done, computed=True)


# -- parallel map ------------------------------------------------------------------------

_WORKER_STATE: dict[str, Any] = {}


def _init_worker(fn: Callable, context: Any) -> None:
    os.environ["TOKENIZERS_PARALLELISM"] = "false"
    _WORKER_STATE["fn"] = fn
    _WORKER_STATE["context"] = context


def _call_worker(item: Any) -> Any:
    return _WORKER_STATE["fn"](_WORKER_STATE["context"], item)


def _mp_context():
    # fork shares the (possibly large) context copy-on-write instead of pickling it;
    # platforms without fork fall back to spawn, which pickles it once per worker.
    methods = mp.get_all_start_methods()
    return mp.get_context("fork" if "fork" in methods and sys.platform != "darwin" else "spawn")


def ordered_map(
    fn: Callable[[Any, Any], Any],
    context: Any,
    items: Iterable[Any],
    num_proc: int = 1,
    in_flight: int | None = None,
) -> Iterator[Any]:
    """Yield ``fn(context, item)`` for each item, in input order, using ``num_proc`` processes.

    At most ``in_flight`` items (default ``2 * num_proc``) are submitted ahead of
    the one being waited for, so a long input stream is never read into memory.
    """
    if num_proc <= 1:
        for item in items:
            yield fn(context, item)
        return
    window = in_flight or 2 * num_proc
    with _mp_context().Pool(num_proc, initializer=_init_worker, initargs=(fn, context)) as pool:
        pending: deque = deque()
        for item in items:
            pending.append(pool.apply_async(_call_worker, (item,)))
            if len(pending) >= window:
                yield pending.popleft().get()
        while pending:
            yield pending.popleft().get()


# -- running a stage -------------------------------------------------------------------------


@dataclass
class ShardTask:
    """Input batch ``index`` of a stage and where its output goes."""

    index: int
    payload: Any
    out_dir: Path


ShardFn = Callable[[Any, ShardTask], dict]


@dataclass
class StageRun:
    """Everything needed to compute one stage of one source.

    ``tasks()`` yields ``(index, payload)`` for every input batch, in order;
    ``process(context, ShardTask)`` writes shard ``index`` into ``out_dir`` and
    returns its stats (with ``docs_out``); ``context()`` builds what
    ``process`` needs (filters, models), once per process.
    """

    stage: str
    source: str
    key: str
    tasks: Callable[[], Iterator[tuple[int, Any]]]
    process: ShardFn
    context: Callable[[], Any]
    finalize: Callable[[Path, int], dict] | None = None
    label: str = ""
    extra: dict = field(default_factory=dict)


def finish_shard(task: ShardTask, stats: dict) -> dict:
    """Write the stats sidecar that marks shard ``task.index`` complete."""
    write_stage_json(task.out_dir / f"{shard_name(task.index)}.stats.json", stats)
    return stats


def run_stage(
    store: StageStore,
    run: StageRun,
    num_proc: int = 1,
    resume: bool = False,
    force: bool = False,
    progress: bool | None = None,
    executor: Callable[[StageRun, Path], None] | None = None,
) -> StageResult:
    """Return the cached stage or compute it (resuming finished shards when asked).

    ``executor`` replaces the in-process map, e.g. to run the shards as
    datatrove tasks; it must leave every shard complete in the partial directory.
    """
    if not force:
        cached = store.load(run.stage, run.source, run.key)
        if cached is not None:
            return cached
    partial, done = store.open_partial(run.stage, run.source, run.key, resume=resume and not force)
    if executor is not None:
        executor(run, partial)
        n_shards = _count_shards(partial)
    else:
        n_shards = _run_local(run, partial, done, num_proc, progress)
    extra = dict(run.extra)
    if run.finalize is not None:
        extra.update(run.finalize(partial, n_shards))
    return store.commit(run.stage, run.source, run.key, partial, n_shards, extra)


def _count_shards(partial: Path) -> int:
    total = partial / "n_shards.txt"
    if not total.exists():
        raise RuntimeError(f"{partial}: the executor did not record how many shards the stage has")
    return int(total.read_text())


def _run_local(run: StageRun, partial: Path, done: set[int], num_proc: int, progress: bool | None) -> int:
    from tqdm.auto import tqdm

    n = 0
    submitted: deque[int] = deque()

    def todo() -> Iterator[ShardTask]:
        nonlocal n
        for index, payload in run.tasks():
            n = index + 1
            if index not in done:
                submitted.append(index)
                yield ShardTask(index, payload, partial)

    tasks = todo()
    first = next(tasks, None)  # build the (possibly costly) context only when there is work
    if first is not None:
        context = run.context()

        def chained() -> Iterator[ShardTask]:
            yield first
            yield from tasks

        bar = tqdm(
            desc=run.label or f"{run.stage} {run.source}",
            unit="shard",
            leave=False,
            disable=None if progress is None else not progress,
        )
        for _ in ordered_map(run.process, context, chained(), num_proc):
            index = submitted.popleft()
            bar.update(1)
            if after_shard_hook is not None:
                after_shard_hook(run.stage, run.source, index)
        bar.close()
    atomic_write_bytes(partial / "n_shards.txt", str(n).encode())
    return n
