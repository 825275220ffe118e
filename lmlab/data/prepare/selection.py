"""Global decisions over all sources: quality selection, then dedup, then decontamination.

Every filtered document of every source is in one of the per-source stage
outputs, in the same order (the filter stage's). This module combines them:

1. **quality**: the per-source ``selected`` mask of the quality stage;
2. **dedup** among the selected documents of *all* sources: exact duplicates
   (same normalised-text digest) first, then MinHash-LSH near duplicates
   (:meth:`MinHashDeduplicator.cluster` over the cached signatures). Global ids
   order sources as listed in the config, then documents by position, so each
   cluster keeps the document of the first-listed source, earliest first
   (put the source you trust most first);
3. **decontamination** among the survivors: documents sharing an n-gram with
   an evaluation item are counted per source and task, and removed when
   ``decontaminate.drop`` is set.

The dedup clustering is cached in ``OUT/stages/dedup/global.json`` under a key
over the signature and selection inputs.
"""

from __future__ import annotations

import json
from collections import Counter, defaultdict
from dataclasses import dataclass, field

import numpy as np

from lmlab.data.prepare.config import PrepareConfig
from lmlab.data.prepare.engine import StageResult, StageStore, stable_hash, write_stage_json
from lmlab.data.prepare.stages import load_flags, load_minhash
from lmlab.errors import ConfigError

_SOURCE_SHIFT = 40  # global id = source index << 40 | document position n


@dataclass
class SourceSelection:
    """Per-document masks of one source, aligned with its filter-stage output."""

    name: str
    n: np.ndarray
    nbytes: np.ndarray
    quality: np.ndarray
    scores: np.ndarray
    dedup_exact: np.ndarray
    dedup_near: np.ndarray
    contaminated: np.ndarray
    final: np.ndarray
    contaminated_tasks: Counter = field(default_factory=Counter)
    removed_because_of: Counter = field(default_factory=Counter)

    def stats(self) -> dict:
        q = self.quality
        after_dedup = q & ~self.dedup_exact & ~self.dedup_near
        return {
            "filtered_docs": int(len(self.n)),
            "filtered_bytes": int(self.nbytes.sum()),
            "quality_docs": int(q.sum()),
            "quality_bytes": int(self.nbytes[q].sum()),
            "dedup_exact_removed": int(self.dedup_exact.sum()),
            "dedup_near_removed": int(self.dedup_near.sum()),
            "dedup_bytes_removed": int(self.nbytes[self.dedup_exact | self.dedup_near].sum()),
            "dedup_docs": int(after_dedup.sum()),
            "dedup_bytes": int(self.nbytes[after_dedup].sum()),
            "contaminated_docs": int((after_dedup & self.contaminated).sum()),
            "contaminated_by_task": dict(sorted(self.contaminated_tasks.items())),
            "duplicates_kept_in": dict(sorted(self.removed_because_of.items())),
            "final_docs": int(self.final.sum()),
            "final_bytes": int(self.nbytes[self.final].sum()),
        }


def _dedup_key(cfg: PrepareConfig, minhash: dict[str, StageResult], quality: dict[str, StageResult]) -> str:
    return stable_hash(
        "dedup",
        [(s.name, minhash[s.name].key, quality[s.name].key) for s in cfg.sources],
        cfg.dedup.exact,
        cfg.dedup.near,
    )


def global_dedup(
    cfg: PrepareConfig,
    store: StageStore,
    minhash: dict[str, StageResult],
    quality: dict[str, StageResult],
    selected: dict[str, np.ndarray],
    force: bool = False,
) -> tuple[dict, bool]:
    """Removed documents per source (``{source: [[n, kept_source, kept_n, "exact"|"near"], ...]}``) and stats.

    Returns ``(result, computed)``; the result is reused when its key matches.
    """
    key = _dedup_key(cfg, minhash, quality)
    path = store.root / "dedup" / "global.json"
    try:
        cached = json.loads(path.read_text())
        if cached.get("key") == key and not force:
            return cached, False
    except (OSError, ValueError):
        pass
    names = [s.name for s in cfg.sources]
    ids: list[int] = []
    exact: list[bytes] = []
    sig_rows: list[np.ndarray | None] = []
    for si, name in enumerate(names):
        arr = load_minhash(minhash[name])
        mask = selected[name]
        if len(arr) != len(mask):
            raise RuntimeError(f"dedup: {name} has {len(arr)} signatures but {len(mask)} quality decisions")
        for row in arr[mask]:
            ids.append((si << _SOURCE_SHIFT) | int(row["n"]))
            exact.append(row["exact"].tobytes())
            sig_rows.append(row["sig"].copy() if row["has_sig"] else None)
    removed: dict[str, list] = defaultdict(list)
    n_exact = n_near = 0
    alive = list(range(len(ids)))
    if cfg.dedup.exact:
        first: dict[bytes, int] = {}
        survivors = []
        for i in alive:  # ids ascend, so the first occurrence is the lowest id
            j = first.setdefault(exact[i], i)
            if j != i:
                removed[names[ids[i] >> _SOURCE_SHIFT]].append(_removal(ids[i], ids[j], names, "exact"))
                n_exact += 1
            else:
                survivors.append(i)
        alive = survivors
    clusters = 0
    if cfg.dedup.near and alive:
        from lmlab.data.prepare.dedup import MinHashDeduplicator

        dd = MinHashDeduplicator(cfg.dedup.minhash_config())
        sigs = [dd.from_hashvalues(sig_rows[i]) if sig_rows[i] is not None else None for i in alive]
        res = dd.cluster([ids[i] for i in alive], sigs)
        clusters = len(res.clusters)
        for dup, kept in sorted(res.duplicate_of.items()):
            removed[names[dup >> _SOURCE_SHIFT]].append(_removal(dup, kept, names, "near"))
            n_near += 1
    result = {
        "key": key,
        "removed": {k: sorted(v) for k, v in sorted(removed.items())},
        "stats": {
            "documents": len(ids),
            "exact_removed": n_exact,
            "near_removed": n_near,
            "near_clusters": clusters,
        },
    }
    write_stage_json(path, result)
    return result, True


def _removal(dup: int, kept: int, names: list[str], kind: str) -> list:
    mask = (1 << _SOURCE_SHIFT) - 1
    return [dup & mask, names[kept >> _SOURCE_SHIFT], kept & mask, kind]


def select(
    cfg: PrepareConfig,
    store: StageStore,
    filtered: dict[str, StageResult],
    quality: dict[str, StageResult],
    minhash: dict[str, StageResult] | None,
    decontam: dict[str, StageResult] | None,
    force: bool = False,
) -> tuple[dict[str, SourceSelection], dict]:
    """Final per-source document masks and the global dedup/decontamination summary."""
    base: dict[str, dict] = {}
    for s in cfg.sources:
        q = quality[s.name]
        n = np.load(q.path / "n.npy")
        arr_bytes = _quality_bytes(q)
        base[s.name] = {
            "n": n,
            "nbytes": arr_bytes,
            "selected": np.load(q.path / "selected.npy"),
            "scores": np.load(q.path / "scores.npy"),
        }
    dedup_info: dict = {"stats": {}, "removed": {}}
    computed = False
    if minhash is not None:
        dedup_info, computed = global_dedup(cfg, store, minhash, quality, {k: v["selected"] for k, v in base.items()}, force)
    out: dict[str, SourceSelection] = {}
    for i, s in enumerate(cfg.sources):
        b = base[s.name]
        n = b["n"]
        pos = {int(v): j for j, v in enumerate(n)}
        ex = np.zeros(len(n), dtype=bool)
        near = np.zeros(len(n), dtype=bool)
        because: Counter = Counter()
        for dn, kept_src, _kept_n, kind in dedup_info["removed"].get(s.name, []):
            (ex if kind == "exact" else near)[pos[int(dn)]] = True
            because[kept_src] += 1
        cont = np.zeros(len(n), dtype=bool)
        tasks: Counter = Counter()
        alive = b["selected"] & ~ex & ~near
        if decontam is not None:
            for flag in load_flags(decontam[s.name]):
                j = pos[int(flag["n"])]
                cont[j] = True
                if alive[j]:
                    tasks.update(flag["tasks"].keys())
        final = alive & ~cont if cfg.decontaminate.drop else alive
        out[s.name] = SourceSelection(s.name, n, b["nbytes"], b["selected"], b["scores"], ex, near, cont, final, tasks, because)
    for i, s in enumerate(cfg.sources):
        sel = out[s.name]
        if sel.final.sum() == 0:
            st = sel.stats()
            where = (
                "quality selection" if st["quality_docs"] == 0 else
                "dedup" if st["dedup_docs"] == 0 else "decontamination"
            )
            raise ConfigError(
                f"sources[{i}]",
                f"source {s.name!r} has no documents left after {where} ({st['filtered_docs']} after filtering)",
                "loosen quality/dedup/decontaminate settings for it, or remove it from the mixture",
            )
    return out, {"dedup": dedup_info.get("stats", {}), "dedup_computed": computed}


def _quality_bytes(q: StageResult) -> np.ndarray:
    from lmlab.data.prepare.engine import shard_name

    parts = [np.load(q.path / f"{shard_name(k)}.npy")["nbytes"] for k in range(q.n_shards)]
    return np.concatenate(parts).astype(np.int64) if parts else np.zeros(0, dtype=np.int64)


def check_text_fields(cfg: PrepareConfig, collected: dict[str, StageResult]) -> None:
    """The text-field policy of :func:`lmlab.data.textread.check_text_field` over each source's JSON records."""
    from lmlab.data.textread import check_text_field

    for i, s in enumerate(cfg.sources):
        st = collected[s.name].stats
        check_text_field(
            f"sources[{i}].text_field",
            f"sources[{i}].max_missing_text_fraction",
            s.name,
            s.text_field,
            st.get("json_records", 0),
            st.get("json_records_without_text", 0),
            st.get("fields_of_records_without_text", {}),
            s.max_missing_text_fraction,
        )


def check_not_empty(cfg: PrepareConfig, results: dict[str, StageResult], stage: str) -> None:
    """One-line ConfigError for the first source that an early stage left without documents."""
    for i, s in enumerate(cfg.sources):
        st = results[s.name].stats
        if st.get("docs_out", 0) == 0:
            detail = st.get("skipped") if stage == "reading" else st.get("dropped")
            reasons = ", ".join(f"{k}: {v}" for k, v in sorted((detail or {}).items(), key=lambda kv: -kv[1])[:3])
            raise ConfigError(
                f"sources[{i}]",
                f"source {s.name!r} has no documents left after {stage} ({st.get('docs_in', 0)} in"
                + (f"; {reasons}" if reasons else "")
                + ")",
                "check its path/text_field and filters, or remove it from the mixture",
            )

