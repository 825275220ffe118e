"""The per-source stages of ``lmlab data prepare`` as sharded, cacheable units.

Graph (per source; every box is cached under ``OUT/stages/<stage>/<source>/``)::

    collect ──> filter ──┬──> quality      (terms per document; scores + selection)
                         ├──> minhash      (exact hash + MinHash signature per document)
                         ├──> decontaminate (eval n-gram hits per document)
                         └──> tokenize     (token ids per document)

``collect`` reads the source, extracts HTML main text and normalises
(:mod:`.readers`); ``filter`` applies the source kind's
:class:`~lmlab.data.prepare.filters.FilterStack`. The four stages after
``filter`` read its shards and do not depend on each other, so tuning the
quality threshold recomputes one cheap step, and adding a source computes
only that source's stages. The global decisions (quality selection first,
then dedup among the selected documents of all sources, then decontamination
among the survivors) are taken afterwards by :mod:`.prepare`.

Every document carries ``n``, its position in the source's raw record stream,
as a stable id through all stages.
"""

from __future__ import annotations

import dataclasses
import json
import os
from collections import Counter
from dataclasses import dataclass
from pathlib import Path
from typing import Any, ClassVar, Iterator

import numpy as np

from lmlab.atomic import atomic_write_bytes
from lmlab.data.prepare.config import PrepareConfig, PrepSource
from lmlab.data.prepare.engine import (
    ENGINE_VERSION,
    ShardTask,
    StageResult,
    StageRun,
    encode_jsonl_gz,
    finish_shard,
    read_jsonl_gz,
    save_npy,
    shard_name,
    stable_hash,
)
from lmlab.errors import ConfigError
from lmlab.eval.data import ENV_DATA_DIR

#: Part of the collect key: bump when the reading policy (lmlab.data.textread) changes what is read.
TEXTREAD_VERSION = "textread-1"

#: Models and indexes built once per process and shared by the stages that need them.
_MEMO: dict[tuple[str, str], Any] = {}


def _memo(kind: str, key: str, build):
    k = (kind, key)
    if k not in _MEMO:
        _MEMO[k] = build()
    return _MEMO[k]


def utf8_len(text: str) -> int:
    return len(text.encode("utf-8", errors="replace"))


def doc_shard_path(stage_dir: Path, k: int) -> Path:
    return stage_dir / f"{shard_name(k)}.jsonl.gz"


@dataclass
class StageSpec:
    """Base of the per-source stages: subclasses set ``stage`` and implement the hooks."""

    stage: ClassVar[str] = "stage"
    cfg: PrepareConfig
    src: PrepSource
    idx: int

    def key(self) -> str:
        raise NotImplementedError

    def tasks(self) -> Iterator[tuple[int, Any]]:
        raise NotImplementedError

    def context(self) -> Any:
        return None

    def process(self, ctx: Any, task: ShardTask) -> dict:
        raise NotImplementedError

    def finalize(self, partial: Path, n_shards: int) -> dict:
        return {}

    def as_run(self) -> StageRun:
        return StageRun(
            stage=self.stage,
            source=self.src.name,
            key=self.key(),
            tasks=self.tasks,
            process=self.process,
            context=self.context,
            finalize=self.finalize,
            label=f"{self.stage:<13} {self.src.name}",
        )


# -- collect ----------------------------------------------------------------------------------


@dataclass
class CollectStage(StageSpec):
    """Read, extract (HTML/WARC), truncate, drop gigantic lines, normalise; count what is skipped."""

    stage: ClassVar[str] = "collect"

    def key(self) -> str:
        from lmlab.data.prepare.extract import extract_options
        from lmlab.data.prepare.readers import source_fingerprint

        extract = extract_options(self.src.extract, f"sources[{self.idx}].extract") if self.src.type in ("html", "warc") else None
        return stable_hash(
            "collect",
            ENGINE_VERSION,
            TEXTREAD_VERSION,
            source_fingerprint(self.src, self.idx),
            dataclasses.asdict(self.cfg.normalize),
            self.cfg.max_line_chars,
            self.cfg.shard_docs,
            extract,
        )

    def tasks(self) -> Iterator[tuple[int, Any]]:
        from lmlab.data.prepare.readers import SkipLog, iter_raw_records

        log = SkipLog()
        size = self.cfg.shard_docs
        batch: list = []
        k = 0
        for rec in iter_raw_records(self.src, self.idx, log):
            batch.append(rec)
            if len(batch) == size:
                yield k, (batch, *log.take())
                k += 1
                batch = []
        counts, examples = log.take()
        if batch or counts or k == 0:
            yield k, (batch, counts, examples)

    def context(self) -> Any:
        from lmlab.data.prepare.extract import extract_options
        from lmlab.data.prepare.normalize import Normalizer

        return Normalizer(self.cfg.normalize), extract_options(self.src.extract)

    def process(self, ctx: Any, task: ShardTask) -> dict:
        from lmlab.data.prepare.readers import record_to_document
        from lmlab.data.textread import TextFieldTally

        normalizer, opts = ctx
        tally = TextFieldTally()
        records, reader_skips, examples = task.payload
        skipped: Counter = Counter(reader_skips)
        counts: Counter = Counter()
        docs = []
        base = task.index * self.cfg.shard_docs
        for j, rec in enumerate(records):
            doc, why = record_to_document(rec, self.src, normalizer, self.cfg.max_line_chars, opts, counts, tally)
            if doc is None:
                skipped[why] += 1
                continue
            docs.append({"n": base + j, "origin": doc["origin"], "text": doc["text"], "meta": doc["meta"]})
        atomic_write_bytes(doc_shard_path(task.out_dir, task.index), encode_jsonl_gz(docs))
        return finish_shard(
            task,
            {
                "docs_in": len(records),
                "docs_out": len(docs),
                "bytes_in": sum(r.size for r in records),
                "bytes_out": sum(utf8_len(d["text"]) for d in docs),
                "skipped": dict(skipped),
                "counts": dict(counts),
                "examples": list(examples),
                # for check_text_field once all shards are in
                "json_records": tally.rows,
                "json_records_without_text": tally.missing,
                "fields_of_records_without_text": dict(tally.fields),
            },
        )


# -- filter -----------------------------------------------------------------------------------


@dataclass
class _DownstreamStage(StageSpec):
    """A stage whose input batches are the shards of an earlier stage of the same source."""

    upstream: StageResult | None = None
    upstream_path: str = ""
    upstream_key: str = ""
    upstream_shards: int = 0

    def __post_init__(self) -> None:
        if self.upstream is not None:
            self.upstream_path = str(self.upstream.path)
            self.upstream_key = self.upstream.key
            self.upstream_shards = self.upstream.n_shards
            self.upstream = None  # keep the spec small for pickling to other processes

    def tasks(self) -> Iterator[tuple[int, Any]]:
        for k in range(self.upstream_shards):
            yield k, str(doc_shard_path(Path(self.upstream_path), k))


@dataclass
class FilterStage(_DownstreamStage):
    """The source's filter stack (prose or code, or its own list); counts drops per ``filter:reason``."""

    stage: ClassVar[str] = "filter"

    def key(self) -> str:
        return stable_hash("filter", ENGINE_VERSION, self.upstream_key, self.cfg.filter_specs(self.src))

    def context(self) -> Any:
        return self.cfg.filter_stack(self.src)

    def process(self, stack: Any, task: ShardTask) -> dict:
        docs = read_jsonl_gz(Path(task.payload))
        kept = []
        dropped: Counter = Counter()
        modified = 0
        bytes_in = 0
        for d in docs:
            bytes_in += utf8_len(d["text"])
            if stack is None:
                kept.append(d)
                continue
            before = d["text"]
            keep, reason = stack(d)
            if keep:
                modified += d["text"] is not before
                kept.append(d)
            else:
                dropped[reason] += 1
        atomic_write_bytes(doc_shard_path(task.out_dir, task.index), encode_jsonl_gz(kept))
        return finish_shard(
            task,
            {
                "docs_in": len(docs),
                "docs_out": len(kept),
                "bytes_in": bytes_in,
                "bytes_out": sum(utf8_len(d["text"]) for d in kept),
                "dropped": dict(dropped),
                "modified": modified,
            },
        )


# -- quality --------------------------------------------------------------------------------------


@dataclass
class ReferenceSpec:
    """Where the quality score's reference perplexity comes from (bigram fit or a checkpoint)."""

    key: str
    collect_dirs: list
    max_chars: int
    checkpoint: str | None = None
    tokenizer: str | None = None
    max_tokens: int = 1024
    device: str = "cpu"

    @classmethod
    def from_config(cls, cfg: PrepareConfig, collected: dict[str, StageResult]) -> "ReferenceSpec":
        q = cfg.quality
        if q.reference_model:
            p = Path(os.path.expanduser(q.reference_model))
            if not p.exists():
                raise ConfigError("quality.reference_model", f"{p} does not exist", "give an lmlab .ckpt or export directory")
            files = sorted(p.rglob("*")) if p.is_dir() else [p]
            stat = [[str(f), f.stat().st_size, int(f.stat().st_mtime)] for f in files if f.is_file()]
            key = stable_hash("checkpoint", stat, q.reference_tokenizer, q.reference_max_tokens)
            return cls(key, [], 0, str(p), q.reference_tokenizer, q.reference_max_tokens, q.device)
        names = [s.name for s in cfg.sources if s.name in (q.reference_sources or [])]
        dirs = [str(collected[n].path) for n in names]
        key = stable_hash("bigram", [collected[n].key for n in names], q.reference_max_chars)
        return cls(key, dirs, q.reference_max_chars)

    def perplexity_fn(self):
        if self.checkpoint:
            from lmlab.data.prepare.reference_lm import CheckpointPerplexity

            return _memo("ckpt", self.key, lambda: CheckpointPerplexity(self.checkpoint, self.tokenizer, self.max_tokens, self.device))
        return _memo("bigram", self.key, self._fit_bigram)

    def _fit_bigram(self):
        from lmlab.data.prepare.quality import BigramReferenceModel

        budget = self.max_chars // max(1, len(self.collect_dirs))

        def texts() -> Iterator[str]:
            for d in self.collect_dirs:
                used = 0
                done = json.loads((Path(d) / "done.json").read_text())
                for k in range(len(done["shard_docs"])):
                    for doc in read_jsonl_gz(doc_shard_path(Path(d), k)):
                        if used >= budget:
                            break
                        t = doc["text"][: budget - used]
                        used += len(t)
                        yield t

        return BigramReferenceModel.fit(texts())


_TERMS_DTYPE = np.dtype([("n", "<i8"), ("ppl", "<f8"), ("diversity", "<f8"), ("safety", "<f8"), ("nbytes", "<i8")])


@dataclass
class QualityStage(_DownstreamStage):
    """Perplexity, diversity and safety terms of every filtered document; scores and selection at the end.

    The perplexity normalisation is ``quality.perplexity_range`` or, when unset,
    calibrated on this source's own documents (5th/95th percentiles, CCNet-style
    per-corpus buckets). Selection (``threshold``/``keep_fraction``) applies only
    where :meth:`PrepareConfig.quality_applies` says so; elsewhere scores are
    only reported.
    """

    stage: ClassVar[str] = "quality"
    reference: ReferenceSpec | None = None

    def settings(self) -> dict:
        q = self.cfg.quality
        applies = self.cfg.quality_applies(self.src)
        return {
            "enabled": q.enabled,
            "weights": q.weights,
            "range": q.perplexity_range,
            "window": q.diversity_window,
            "unsafe": q.max_unsafe_rate,
            "applies": applies,
            "threshold": q.threshold if applies else None,
            "keep_fraction": q.keep_fraction if applies else None,
        }

    def key(self) -> str:
        ref = self.reference.key if (self.reference is not None and self.cfg.quality.enabled) else None
        return stable_hash("quality", ENGINE_VERSION, self.upstream_key, self.settings(), ref)

    def context(self) -> Any:
        if not self.cfg.quality.enabled or self.reference is None:
            return None
        from lmlab.data.prepare.quality import scorer_from_config

        q = self.cfg.quality
        return scorer_from_config(
            {"weights": q.weights, "diversity_window": q.diversity_window, "max_unsafe_rate": q.max_unsafe_rate},
            self.reference.perplexity_fn(),
        )

    def process(self, scorer: Any, task: ShardTask) -> dict:
        docs = read_jsonl_gz(Path(task.payload))
        arr = np.zeros(len(docs), dtype=_TERMS_DTYPE)
        for i, d in enumerate(docs):
            arr[i]["n"] = d["n"]
            arr[i]["nbytes"] = utf8_len(d["text"])
            if scorer is None:
                arr[i]["ppl"] = arr[i]["diversity"] = arr[i]["safety"] = np.nan
            else:
                t = scorer.terms(d["text"])
                arr[i]["ppl"], arr[i]["diversity"], arr[i]["safety"] = t.raw_perplexity, t.diversity, t.safety
        save_npy(task.out_dir / f"{shard_name(task.index)}.npy", arr)
        return finish_shard(task, {"docs_in": len(docs), "docs_out": len(docs), "bytes_in": int(arr["nbytes"].sum())})

    def finalize(self, partial: Path, n_shards: int) -> dict:
        from lmlab.data.prepare.quality import LogPerplexityNorm, select_by_threshold, select_top_fraction

        parts = [np.load(partial / f"{shard_name(k)}.npy") for k in range(n_shards)]
        arr = np.concatenate(parts) if parts else np.zeros(0, dtype=_TERMS_DTYPE)
        s = self.settings()
        norm_range = None
        if not s["enabled"] or len(arr) == 0 or np.isnan(arr["ppl"]).all():
            scores = np.full(len(arr), np.nan)
        else:
            if s["range"] is not None:
                norm = LogPerplexityNorm(*map(float, s["range"]))
            else:
                finite = arr["ppl"][np.isfinite(arr["ppl"]) & (arr["ppl"] > 0)]
                norm = LogPerplexityNorm.fit(finite) if len(finite) >= 2 else LogPerplexityNorm()
            norm_range = [norm.lo, norm.hi]
            from lmlab.data.prepare.quality import QualityWeights

            ppl_term = np.array([norm(float(p)) for p in arr["ppl"]])
            terms = np.stack([ppl_term, arr["diversity"], arr["safety"]], axis=1)
            scores = terms @ QualityWeights(**self.cfg.quality.weights).as_array()
        selected = np.ones(len(arr), dtype=bool)
        if s["applies"] and len(arr):
            if s["threshold"] is not None:
                selected &= select_by_threshold(scores, float(s["threshold"]))
            if s["keep_fraction"] is not None:
                selected &= select_top_fraction(scores, float(s["keep_fraction"]))
        save_npy(partial / "scores.npy", scores.astype(np.float64))
        save_npy(partial / "selected.npy", selected)
        save_npy(partial / "n.npy", arr["n"].astype(np.int64))
        return {
            "norm": norm_range,
            "applies": s["applies"],
            "selected_docs": int(selected.sum()),
            "selected_bytes": int(arr["nbytes"][selected].sum()),
        }


# -- minhash ----------------------------------------------------------------------------------------


def minhash_dtype(num_perm: int) -> np.dtype:
    return np.dtype([("n", "<i8"), ("nbytes", "<i8"), ("exact", "<u8", (2,)), ("has_sig", "?"), ("sig", "<u4", (num_perm,))])


@dataclass
class MinHashStage(_DownstreamStage):
    """Exact-dedup digest and MinHash signature of every filtered document (clustered globally later)."""

    stage: ClassVar[str] = "minhash"

    def key(self) -> str:
        mh = dataclasses.asdict(self.cfg.dedup.minhash_config())
        return stable_hash("minhash", ENGINE_VERSION, self.upstream_key, mh)

    def context(self) -> Any:
        from lmlab.data.prepare.dedup import MinHashDeduplicator

        return MinHashDeduplicator(self.cfg.dedup.minhash_config())

    def process(self, dedup: Any, task: ShardTask) -> dict:
        from lmlab.data.prepare.dedup import exact_hash

        docs = read_jsonl_gz(Path(task.payload))
        arr = np.zeros(len(docs), dtype=minhash_dtype(dedup.config.num_perm))
        for i, d in enumerate(docs):
            arr[i]["n"] = d["n"]
            arr[i]["nbytes"] = utf8_len(d["text"])
            arr[i]["exact"] = np.frombuffer(bytes.fromhex(exact_hash(d["text"])), dtype="<u8")
            sig = dedup.signature(d["text"])
            if sig is not None:
                arr[i]["has_sig"] = True
                arr[i]["sig"] = sig.hashvalues
        save_npy(task.out_dir / f"{shard_name(task.index)}.npy", arr)
        return finish_shard(task, {"docs_in": len(docs), "docs_out": len(docs)})


def load_minhash(result: StageResult) -> np.ndarray:
    parts = [np.load(result.path / f"{shard_name(k)}.npy") for k in range(result.n_shards)]
    return np.concatenate(parts) if parts else np.zeros(0, dtype=minhash_dtype(1))


# -- decontaminate --------------------------------------------------------------------------------------


def eval_fingerprint(p: Path) -> list:
    if not p.is_dir():
        raise ConfigError(
            "decontaminate.eval_dir",
            f"{p} is not a directory",
            f"point it (or ${ENV_DATA_DIR}) at the evaluation data folder, or set decontaminate.enabled: false",
        )
    return [[f.name, f.stat().st_size, int(f.stat().st_mtime)] for f in sorted(p.iterdir()) if f.is_file()]


@dataclass
class DecontaminateStage(_DownstreamStage):
    """Evaluation-set n-gram hits of every filtered document (dropping is decided globally)."""

    stage: ClassVar[str] = "decontaminate"

    def index_key(self) -> str:
        d = self.cfg.decontaminate
        return stable_hash(eval_fingerprint(d.eval_path()), d.n, d.min_item_tokens)

    def key(self) -> str:
        return stable_hash("decontaminate", ENGINE_VERSION, self.upstream_key, self.index_key())

    def context(self) -> Any:
        from lmlab.data.prepare.decontaminate import ContaminationIndex

        d = self.cfg.decontaminate
        return _memo(
            "eval_index",
            self.index_key(),
            lambda: ContaminationIndex.from_eval_dir(d.eval_path(), d.n, d.min_item_tokens),
        )

    def process(self, index: Any, task: ShardTask) -> dict:
        docs = read_jsonl_gz(Path(task.payload))
        flags = []
        by_task: Counter = Counter()
        for d in docs:
            found = index.lookup(d["text"])
            if found:
                tasks = {t: v["ngrams"] for t, v in sorted(found.items())}
                by_task.update(tasks.keys())
                examples = {t: v["example_item"] for t, v in sorted(found.items())}
                flags.append({"n": d["n"], "nbytes": utf8_len(d["text"]), "tasks": tasks, "items": examples})
        data = "".join(json.dumps(f, sort_keys=True) + "\n" for f in flags).encode()
        atomic_write_bytes(task.out_dir / f"{shard_name(task.index)}.jsonl", data)
        return finish_shard(task, {"docs_in": len(docs), "docs_out": len(docs), "contaminated": len(flags), "by_task": dict(by_task)})


def load_flags(result: StageResult) -> list[dict]:
    out = []
    for k in range(result.n_shards):
        with open(result.path / f"{shard_name(k)}.jsonl", encoding="utf-8") as f:
            out.extend(json.loads(line) for line in f if line.strip())
    return out


# -- tokenize --------------------------------------------------------------------------------------------

_INDEX_DTYPE = np.dtype([("n", "<i8"), ("length", "<i8")])


@dataclass
class TokenizeStage(_DownstreamStage):
    """Token ids (EOS appended) of every filtered document, batch-encoded by the fast tokenizer."""

    stage: ClassVar[str] = "tokenize"
    tokenizer_path: str = ""
    tokenizer_key: str = ""
    dtype: str = "uint16"

    def key(self) -> str:
        return stable_hash("tokenize", ENGINE_VERSION, self.upstream_key, self.tokenizer_key, self.dtype)

    def context(self) -> Any:
        from lmlab.data.tokenizer import load_tokenizer

        return _memo("tokenizer", self.tokenizer_key, lambda: load_tokenizer(self.tokenizer_path, field="tokenizer"))

    def process(self, tok: Any, task: ShardTask) -> dict:
        from lmlab.data.tokenizer import ids_encoder

        docs = read_jsonl_gz(Path(task.payload))
        eos = tok.eos_token_id
        encode = _memo("ids_encoder", self.tokenizer_key, lambda: ids_encoder(tok))
        index = np.zeros(len(docs), dtype=_INDEX_DTYPE)
        chunks = []
        for start in range(0, len(docs), 1024):
            batch = docs[start : start + 1024]
            flat: list[int] = []  # one array per batch, not per document
            for i, (d, row) in enumerate(zip(batch, encode([d["text"] for d in batch]))):
                row.append(eos)
                index[start + i] = (d["n"], len(row))
                flat.extend(row)
            chunks.append(np.asarray(flat, dtype=self.dtype))
        tokens = np.concatenate(chunks) if chunks else np.zeros(0, dtype=self.dtype)
        atomic_write_bytes(task.out_dir / f"{shard_name(task.index)}.tokens.bin", tokens.tobytes())
        save_npy(task.out_dir / f"{shard_name(task.index)}.index.npy", index)
        return finish_shard(task, {"docs_in": len(docs), "docs_out": len(docs), "tokens": int(len(tokens))})

    def finalize(self, partial: Path, n_shards: int) -> dict:
        return {"dtype": self.dtype, "tokenizer": self.tokenizer_path}


def load_token_index(result: StageResult) -> list[tuple[np.ndarray, np.ndarray]]:
    """``(index, tokens memmap)`` per shard of a tokenize stage."""
    out = []
    for k in range(result.n_shards):
        index = np.load(result.path / f"{shard_name(k)}.index.npy")
        path = result.path / f"{shard_name(k)}.tokens.bin"
        dtype = np.dtype(result.done.get("dtype", "uint16"))
        tokens = np.memmap(path, dtype=dtype, mode="r") if os.path.getsize(path) else np.zeros(0, dtype=dtype)
        out.append((index, tokens))
    return out
