"""``lmlab data prepare``: from raw sources to the token arrays a training run reads.

Order of work (see :mod:`.stages` for the per-source graph and
:mod:`.selection` for the global decisions):

1. per source: ``collect`` (read, HTML/WARC extraction, normalise) and ``filter``;
2. per source: ``quality`` (reference-LM perplexity + diversity + safety),
   ``minhash`` and ``decontaminate``;
3. global: quality selection, dedup across sources, decontamination;
4. the tokenizer: the config's ``tokenizer`` directory, or a byte-level BPE
   trained on a weighted sample of the selected documents when it is missing;
5. per source: ``tokenize``; then ``pack`` (global shuffle, validation split,
   ``OUT/tokens``) and the report (``OUT/report``).

Per-source stages are cached under ``OUT/stages`` by a key over their
settings and inputs, so a re-run redoes only what changed: a new source, a
changed filter, a new tokenizer. ``resume=True`` also keeps the finished
shards of an interrupted stage. ``engine="datatrove"`` runs the per-source
stages as datatrove tasks (:mod:`.datatrove_steps`) and gives the same bytes.

Train on the result with ``data.init_args.prepared_dir: OUT/tokens`` (and the
same source names and weights, and the tokenizer recorded in
``OUT/tokens/meta.json``).
"""

from __future__ import annotations

import os
import time
from collections.abc import Callable
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Iterator

import numpy as np

from lmlab.atomic import FileLock, LockHeld
from lmlab.data.prepare.config import PrepareConfig, load_config
from lmlab.data.prepare.engine import StageResult, StageStore, read_jsonl_gz, run_stage, stable_hash
from lmlab.data.prepare.stages import (
    CollectStage,
    DecontaminateStage,
    FilterStage,
    MinHashStage,
    QualityStage,
    ReferenceSpec,
    StageSpec,
    TokenizeStage,
    doc_shard_path,
)
from lmlab.errors import ConfigError


@dataclass
class PrepareResult:
    """What a prepare run produced and what it had to compute."""

    out: Path
    tokens_dir: Path
    tokenizer: str
    report: dict
    report_paths: dict
    computed: list[str] = field(default_factory=list)
    reused: list[str] = field(default_factory=list)


class _Clock:
    def __init__(self) -> None:
        self.timing: dict[str, float] = {}

    @contextmanager
    def __call__(self, name: str) -> Iterator[None]:
        t = time.perf_counter()
        try:
            yield
        finally:
            self.timing[name] = self.timing.get(name, 0.0) + time.perf_counter() - t


def prepare(
    config: PrepareConfig | str | os.PathLike,
    out: str | os.PathLike | None = None,
    num_proc: int | None = None,
    resume: bool = False,
    force: bool = False,
    engine: str | None = None,
    progress: bool | None = None,
    log: Callable[[str], None] | None = None,
) -> PrepareResult:
    """Run the whole pipeline for a mixture config; see the module docstring.

    Args:
        config: A :class:`PrepareConfig` or the path of a prepare / training YAML.
        out: Output directory (default: the config's ``out``).
        num_proc: Worker processes per stage (default: the config's, else up to 4).
        resume: Keep the finished shards of an interrupted stage.
        force: Recompute every stage, ignoring caches.
        engine: ``local``, ``datatrove`` or ``slurm`` (default: the config's ``engine.name``).
        progress: Progress bars (None: only on a terminal).
        log: Receives one line per computed step, then the document counts
            of every stage and source as the report has them (default: silent).
    """
    cfg = config if isinstance(config, PrepareConfig) else load_config(config)
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    out_dir = Path(os.path.expanduser(str(out or cfg.out or ".lmlab_cache/prepared/mix")))
    nproc = int(num_proc or cfg.num_proc or min(4, os.cpu_count() or 1))
    if nproc < 1:
        raise ConfigError("--num_proc", f"must be >= 1, got {nproc}", "use e.g. --num_proc 4")
    engine_name = engine or cfg.engine.name
    if engine_name not in ("local", "datatrove", "slurm"):
        raise ConfigError("--engine", f"unknown engine {engine_name!r}", "use local, datatrove or slurm")
    executor = None
    if engine_name == "datatrove":
        from lmlab.data.prepare.datatrove_steps import datatrove_executor

        executor = datatrove_executor(out_dir / "stages" / "_datatrove", cfg.engine.tasks, cfg.engine.workers)
    elif engine_name == "slurm":
        from lmlab.data.prepare.datatrove_steps import slurm_executor

        slurm = dict(cfg.engine.slurm or {})
        if not slurm.get("partition"):
            raise ConfigError("engine.slurm.partition", "is required for the slurm engine", "name the Slurm partition to submit to")
        executor = slurm_executor(out_dir.resolve() / "stages" / "_datatrove", cfg.engine.tasks, **slurm)
    with _out_lock(out_dir):
        return _prepare(cfg, out_dir, nproc, resume, force, executor, progress, log)


@contextmanager
def _out_lock(out_dir: Path) -> Iterator[None]:
    """One prepare run per OUT at a time (a second one would race on the partial stages)."""
    lock = FileLock(out_dir / ".lock")
    try:
        lock.acquire(timeout=0)
    except LockHeld as e:
        raise ConfigError("--out", f"{out_dir} is being prepared by process {e.pid}", "wait for it, or use another --out") from None
    try:
        yield
    finally:
        lock.release()


def _prepare(cfg: PrepareConfig, out_dir: Path, nproc: int, resume: bool, force: bool, executor, progress, log) -> PrepareResult:
    say = log or (lambda _msg: None)
    store = StageStore(out_dir / "stages")
    clock = _Clock()
    computed: list[str] = []
    reused: list[str] = []
    t_start = time.perf_counter()

    def run(spec: StageSpec, procs: int | None = None) -> StageResult:
        with clock(spec.stage):
            res = run_stage(store, spec.as_run(), procs or nproc, resume=resume, force=force, progress=progress, executor=executor)
        (computed if res.computed else reused).append(f"{spec.stage}/{spec.src.name}")
        if res.computed:
            # no counts here: what survives is decided later, and logged from the report
            say(f"{spec.stage:<13} {spec.src.name:<12} computed ({res.n_shards} shards)")
        return res

    from lmlab.data.prepare.selection import check_not_empty, check_text_fields, select

    collected = {s.name: run(CollectStage(cfg, s, i)) for i, s in enumerate(cfg.sources)}
    check_text_fields(cfg, collected)
    check_not_empty(cfg, collected, "reading")
    filtered = {s.name: run(FilterStage(cfg, s, i, upstream=collected[s.name])) for i, s in enumerate(cfg.sources)}
    check_not_empty(cfg, filtered, "filtering")

    reference = ReferenceSpec.from_config(cfg, collected) if cfg.quality.enabled else None
    # a neural reference model runs in this process (batching on its device is its parallelism)
    q_procs = 1 if (reference is not None and reference.checkpoint) else None
    quality = {
        s.name: run(QualityStage(cfg, s, i, upstream=filtered[s.name], reference=reference), q_procs)
        for i, s in enumerate(cfg.sources)
    }
    minhash = None
    if cfg.dedup.exact or cfg.dedup.near:
        minhash = {s.name: run(MinHashStage(cfg, s, i, upstream=filtered[s.name])) for i, s in enumerate(cfg.sources)}
    decontam = None
    if cfg.decontaminate.enabled:
        decontam = {s.name: run(DecontaminateStage(cfg, s, i, upstream=filtered[s.name])) for i, s in enumerate(cfg.sources)}

    with clock("select"):
        selection, global_info = select(cfg, store, filtered, quality, minhash, decontam, force)
    (computed if global_info["dedup_computed"] else reused).append("dedup/global")

    with clock("tokenizer"):
        tokenizer, tok_path, trained = ensure_tokenizer(cfg, out_dir, filtered, selection, force)
    if trained:
        computed.append("tokenizer")
        say(f"trained a {len(tokenizer)}-token BPE tokenizer -> {tok_path}")
    from lmlab.data.pretrain.packing import token_dtype, tokenizer_fingerprint

    dtype = token_dtype(len(tokenizer)).name
    tok_key = tokenizer_fingerprint(tokenizer)
    tokenized = {
        s.name: run(TokenizeStage(cfg, s, i, upstream=filtered[s.name], tokenizer_path=tok_path, tokenizer_key=tok_key, dtype=dtype))
        for i, s in enumerate(cfg.sources)
    }

    from lmlab.data.prepare.pack import pack

    with clock("pack"):
        tokens_dir, meta, packed = pack(cfg, out_dir, tokenized, selection, tok_path, dtype, force=force)
    (computed if packed else reused).append("pack")

    from lmlab.data.prepare.report import build_report, stage_count_lines, write_report

    timing = dict(clock.timing)
    timing["total"] = time.perf_counter() - t_start
    report = build_report(
        cfg,
        collected,
        filtered,
        quality,
        selection,
        meta,
        {"out": str(out_dir), "dedup": global_info["dedup"], "timing": timing, "computed": computed, "reused": reused},
    )
    for line in stage_count_lines(report):
        say(line)
    with clock("report"):
        paths = write_report(report, selection, out_dir / "report", cfg.report.histogram_bins, cfg.report.wandb)
    return PrepareResult(out_dir, tokens_dir, tok_path, report, paths, computed, reused)


def ensure_tokenizer(cfg: PrepareConfig, out: Path, filtered: dict[str, StageResult], selection: dict, force: bool = False):
    """Load the config's tokenizer, or train one on the selected documents when it does not exist.

    Returns ``(tokenizer, path, trained)``. The training sample takes
    ``sample_chars * weight`` characters from each source, spread over the
    source by a seeded hash of the document position.
    """
    from lmlab.data.tokenizer import load_tokenizer, train_bpe

    path = cfg.tokenizer or str(out / "tokenizer")
    default_location = cfg.tokenizer is None
    exists = os.path.exists(os.path.expanduser(path))
    if exists and not (force and default_location):
        return load_tokenizer(path, field="tokenizer"), path, False
    tc = cfg.tokenizer_train
    weights = cfg.weights

    def texts() -> Iterator[str]:
        for s in cfg.sources:
            sel = selection[s.name]
            budget = int(tc.sample_chars * weights[s.name])
            kept_bytes = max(1, int(sel.nbytes[sel.final].sum()))
            p = min(1.0, budget / kept_bytes)
            final = dict(zip(sel.n.tolist(), sel.final.tolist()))
            rng_key = stable_hash(cfg.seed, s.name)
            used = 0
            res = filtered[s.name]
            for k in range(res.n_shards):
                for d in read_jsonl_gz(doc_shard_path(res.path, k)):
                    if used >= budget:
                        break
                    if not final.get(d["n"]) or _unit_hash(rng_key, d["n"]) > p:
                        continue
                    t = d["text"][: budget - used]
                    used += len(t)
                    yield t

    tok = train_bpe(texts(), tc.vocab_size, os.path.expanduser(path), tc.min_frequency)
    return tok, path, True


def _unit_hash(key: str, n: int) -> float:
    import hashlib

    h = hashlib.blake2b(f"{key}:{n}".encode(), digest_size=8).digest()
    return int.from_bytes(h, "little") / 2**64


def training_snippet(result: PrepareResult, cfg: PrepareConfig) -> str:
    """The ``data`` section of a training YAML that reads this prepared mixture."""
    lines = [
        "data:",
        "  class_path: lmlab.data.PretrainDataModule",
        "  init_args:",
        f"    prepared_dir: {result.tokens_dir}",
        f"    tokenizer: {result.tokenizer}",
        "    sources:",
    ]
    lines += [f"      - {{name: {s.name}, weight: {s.weight}}}" for s in cfg.sources]
    return "\n".join(lines)


def token_arrays(tokens_dir: str | os.PathLike) -> dict[str, dict[str, np.ndarray]]:
    """``{source: {"train": array, "val": array}}`` of a prepared directory (for inspection and tests)."""
    import json

    from lmlab.data.pretrain.packing import load_cache

    p = Path(tokens_dir)
    names = list(json.loads((p / "meta.json").read_text())["sources"])
    return {n: {"train": s.train, "val": s.val} for n, s in load_cache(p, names).items()}


__all__ = ["PrepareResult", "ensure_tokenizer", "prepare", "token_arrays", "training_snippet"]
