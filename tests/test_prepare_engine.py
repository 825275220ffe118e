"""The stage engine (ordered parallel map, cached/partial stages) and the datatrove engine."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from lmlab.data.prepare.config import PrepareConfig
from lmlab.data.prepare.engine import (
    ShardTask,
    StageRun,
    StageStore,
    encode_jsonl_gz,
    finish_shard,
    merge_stats,
    ordered_map,
    read_jsonl_gz,
    run_stage,
    stable_hash,
)
from lmlab.data.prepare.prepare import prepare
from test_prepare_corpus import all_texts, mixture_config, write_mixture


def _square(ctx, x):
    return ctx * x * x


def test_ordered_map_keeps_input_order_across_processes():
    items = list(range(40))
    assert list(ordered_map(_square, 3, iter(items), num_proc=2, in_flight=3)) == [3 * x * x for x in items]
    assert list(ordered_map(_square, 1, iter(items), num_proc=1)) == [x * x for x in items]


def test_stable_hash_and_stats_merge():
    assert stable_hash({"a": 1, "b": [1, 2]}) == stable_hash({"b": [1, 2], "a": 1})
    assert stable_hash({"a": 1}) != stable_hash({"a": 2})
    merged = merge_stats([{"docs": 2, "dropped": {"x": 1}, "ex": ["a"]}, {"docs": 3, "dropped": {"x": 2, "y": 1}, "ex": ["b"]}])
    assert merged == {"docs": 5, "dropped": {"x": 3, "y": 1}, "ex": ["a", "b"]}


def test_jsonl_gz_shards_are_byte_deterministic(tmp_path):
    rows = [{"n": i, "text": f"doc {i} é"} for i in range(5)]
    assert encode_jsonl_gz(rows) == encode_jsonl_gz([dict(r) for r in rows])
    (tmp_path / "s.jsonl.gz").write_bytes(encode_jsonl_gz(rows))
    assert read_jsonl_gz(tmp_path / "s.jsonl.gz") == rows


def _write(ctx, task: ShardTask) -> dict:
    (task.out_dir / f"out-{task.index}.txt").write_text(str(task.payload * ctx))
    return finish_shard(task, {"docs_in": 1, "docs_out": 1, "value": task.payload * ctx})


def _run(key: str, n: int = 4) -> StageRun:
    return StageRun("toy", "src", key, tasks=lambda: iter(enumerate(range(10, 10 + n))), process=_write, context=lambda: 2)


def test_stage_is_cached_by_key_and_partial_work_needs_resume(tmp_path, monkeypatch):
    import lmlab.data.prepare.engine as engine

    store = StageStore(tmp_path)
    res = run_stage(store, _run("k1"))
    assert res.computed and res.stats["value"] == 2 * (10 + 11 + 12 + 13) and res.shard_docs == [1, 1, 1, 1]
    assert not run_stage(store, _run("k1")).computed  # same key: reused
    assert store.load("toy", "src", "k2") is None  # another key: not a hit

    calls = []

    def crash(stage, source, k):
        calls.append(k)
        if k == 1:
            raise RuntimeError("boom")

    monkeypatch.setattr(engine, "after_shard_hook", crash)
    with pytest.raises(RuntimeError):
        run_stage(store, _run("k2"))
    assert store.load("toy", "src", "k1") is not None  # the finished stage is untouched by the crash
    calls.clear()
    monkeypatch.setattr(engine, "after_shard_hook", lambda s, src, k: calls.append(k))
    res = run_stage(store, _run("k2"), resume=True)
    assert calls == [2, 3] and res.computed and res.key == "k2"
    # a partial directory written under another key is never reused
    monkeypatch.setattr(engine, "after_shard_hook", crash)
    with pytest.raises(RuntimeError):
        run_stage(store, _run("k3"))
    calls.clear()
    monkeypatch.setattr(engine, "after_shard_hook", lambda s, src, k: calls.append(k))
    run_stage(store, _run("k4"), resume=True)
    assert calls == [0, 1, 2, 3]


@pytest.fixture(scope="module")
def small_mixture(tmp_path_factory):
    from lmlab.data.tokenizer import train_bpe

    root = tmp_path_factory.mktemp("engine")
    paths = write_mixture(root / "corpus", seed=5, n_web=40)
    train_bpe(all_texts(paths), 300, root / "tok")
    return root, paths


def _files(d: Path, pattern: str) -> dict[str, bytes]:
    return {str(p.relative_to(d)): p.read_bytes() for p in sorted(d.rglob(pattern)) if p.is_file() and "_datatrove" not in p.parts}


def _engine_cfg(small_mixture, **engine) -> PrepareConfig:
    root, paths = small_mixture
    return PrepareConfig(**mixture_config(
        paths, str(root / "tok"), sources=("web", "books"), shard_docs=8, decontaminate={"enabled": False},
        engine=engine or {"name": "local"},
    ))


@pytest.fixture(scope="module")
def local_run(small_mixture, tmp_path_factory):
    return prepare(_engine_cfg(small_mixture), out=tmp_path_factory.mktemp("local"), progress=False)


def test_datatrove_engine_gives_the_in_process_bytes(small_mixture, local_run, tmp_path):
    pytest.importorskip("datatrove")
    dt = prepare(_engine_cfg(small_mixture, name="datatrove", tasks=3, workers=2), out=tmp_path / "dt", progress=False)
    assert dt.computed == local_run.computed  # every stage ran, through datatrove
    logs = tmp_path / "dt" / "stages" / "_datatrove" / "filter" / "web"
    (key_dir,) = list(logs.iterdir())
    assert sorted(p.name for p in (key_dir / "completions").iterdir()) == ["00000", "00001", "00002"]
    assert _files(dt.tokens_dir, "*.bin") == _files(local_run.tokens_dir, "*.bin")
    assert _files(tmp_path / "dt" / "stages", "shard-*") == _files(local_run.out / "stages", "shard-*")
    assert dt.report["sources"]["web"]["stages"] == local_run.report["sources"]["web"]["stages"]


def test_slurm_engine_submits_every_stage_and_waits_for_it(small_mixture, local_run, tmp_path, monkeypatch):
    pytest.importorskip("datatrove")
    import datatrove.executor as dex

    submitted = []

    class FakeSlurm(dex.LocalPipelineExecutor):
        """Stands in for sbatch: records the submission, runs the array's tasks here."""

        def __init__(self, pipeline, tasks, time, partition, job_name, logging_dir, skip_completed, **kw):
            submitted.append({"job": job_name, "partition": partition, "time": time, "tasks": tasks, **kw})
            super().__init__(pipeline, tasks=tasks, workers=1, logging_dir=logging_dir, skip_completed=skip_completed)

    monkeypatch.setattr(dex, "SlurmPipelineExecutor", FakeSlurm)
    cfg = _engine_cfg(small_mixture, name="slurm", tasks=2,
                      slurm={"partition": "cpu", "time": "01:00:00", "cpus_per_task": 2, "poll_seconds": 0.01})
    res = prepare(cfg, out=tmp_path / "slurm", progress=False)
    assert [s["job"] for s in submitted] == [f"lmlab-{c.replace('/', '-')}" for c in local_run.computed if c.count("/") == 1 and not c.startswith("dedup")]
    assert all(s["partition"] == "cpu" and s["tasks"] == 2 and s["cpus_per_task"] == 2 for s in submitted)
    assert _files(res.tokens_dir, "*.bin") == _files(local_run.tokens_dir, "*.bin")
    with pytest.raises(Exception, match="engine.slurm.partition"):
        _engine_cfg(small_mixture, name="slurm", tasks=2)


def test_lmlab_filters_inside_a_datatrove_pipeline(small_mixture, tmp_path):
    pytest.importorskip("datatrove")
    from datatrove.data import Document
    from datatrove.executor import LocalPipelineExecutor

    from lmlab.data.prepare import default_stack
    from lmlab.data.prepare.datatrove_steps import LmlabDocumentFilter

    _, paths = small_mixture
    rows = [json.loads(line) for line in paths["web"].read_text().splitlines()]
    out_dir = tmp_path / "kept"

    def reader(data, rank, world_size):
        for i, r in enumerate(rows):
            if i % world_size == rank:
                yield Document(text=r["text"], id=r["id"])

    def writer(data, rank, world_size):
        out_dir.mkdir(exist_ok=True)
        (out_dir / f"{rank}.txt").write_text("".join(f"{d.id}\n" for d in data))
        return iter(())

    LocalPipelineExecutor(
        pipeline=[reader, LmlabDocumentFilter(default_stack("prose"), name="lmlab prose"), writer],
        tasks=2, workers=2, logging_dir=str(tmp_path / "logs"), start_method="fork",
    ).run()
    kept = {line for f in out_dir.iterdir() for line in f.read_text().split()}
    stack = default_stack("prose")
    expected = {r["id"] for r in rows if stack(dict(r))[0]}
    assert kept == expected and 0 < len(kept) < len(rows)
    stats = json.loads((tmp_path / "logs" / "stats.json").read_text())
    assert any("lmlab prose" in json.dumps(s) for s in stats)
