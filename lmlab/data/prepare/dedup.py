"""Exact and near-duplicate document removal.

**Exact**: documents whose normalised text (NFC, lowercased, whitespace runs
collapsed to one space, trimmed) has the same BLAKE2b digest are duplicates.

**Near** (MinHash LSH, Broder 1997; Leskovec et al., *Mining of Massive
Datasets* ch. 3, via ``datasketch``): each document becomes the set of its word
5-gram shingles (lowercased alphanumeric tokens); a MinHash of ``num_perm``
permutations estimates Jaccard similarity; LSH splits the signature into
``bands`` bands of ``rows`` rows and makes two documents candidates when any band
matches, which happens with probability ``1 - (1 - J**rows)**bands``. The default
14 x 8 = 112 permutations (as in FineWeb) makes pairs at J = 0.8 candidates with
probability 0.92 and at J = 0.9 with 0.9995, while pairs at J = 0.5 become
candidates with probability 0.05. :func:`lsh_params_for_threshold` picks
``(bands, rows)`` for another target.

Candidates are optionally verified by their estimated Jaccard similarity (the
fraction of equal MinHash values). Because the estimate has standard deviation
``sqrt(J (1 - J) / num_perm)``, the default verification threshold sits three
standard deviations below the target threshold, so true pairs at the target are
not lost to estimation noise, while pairs far below it (J < 0.5 at target 0.8)
are rejected. Verified pairs are merged into clusters with union-find; each
cluster keeps its document with the lowest id (integers numerically, other ids
as strings), so the result does not depend on input order.
"""

from __future__ import annotations

import hashlib
import math
import re
import unicodedata
from collections import defaultdict
from dataclasses import dataclass, field
from typing import Any, Hashable, Iterable, Mapping, Sequence

import numpy as np
from datasketch import MinHash, MinHashLSH

from lmlab.data.prepare._hashing import ngram_hashes, sorted_unique, token_hashes
from lmlab.data.prepare.stats import word_tokens
from lmlab.errors import ConfigError

_WS_RE = re.compile(r"\s+")
_UPDATE_CHUNK = 32_768  # bounds the (shingles x permutations) temporary array


def _id_sort_key(doc_id: Hashable) -> tuple[int, Any]:
    if isinstance(doc_id, (int, np.integer)) and not isinstance(doc_id, bool):
        return (0, int(doc_id))
    return (1, str(doc_id))


def _doc_ids(docs: Sequence[Mapping[str, Any]]) -> list[Hashable]:
    ids = [d.get("id", i) for i, d in enumerate(docs)]
    if len(set(ids)) != len(ids):
        seen: set = set()
        dup = next(x for x in ids if x in seen or seen.add(x))
        raise ConfigError("id", f"document id {dup!r} occurs more than once", "give every document a unique 'id'")
    return ids


def normalized_for_exact(text: str) -> str:
    """The form compared by exact dedup: NFC, lowercase, single spaces, trimmed."""
    return _WS_RE.sub(" ", unicodedata.normalize("NFC", text).lower()).strip()


def exact_hash(text: str) -> str:
    """Hex BLAKE2b-128 digest of :func:`normalized_for_exact`."""
    return hashlib.blake2b(normalized_for_exact(text).encode("utf-8"), digest_size=16).hexdigest()


class UnionFind:
    """Disjoint sets over ``0..n-1`` with path halving and union by size."""

    def __init__(self, n: int):
        self.parent = list(range(n))
        self.size = [1] * n

    def find(self, x: int) -> int:
        parent = self.parent
        while parent[x] != x:
            parent[x] = parent[parent[x]]
            x = parent[x]
        return x

    def union(self, a: int, b: int) -> bool:
        ra, rb = self.find(a), self.find(b)
        if ra == rb:
            return False
        if self.size[ra] < self.size[rb]:
            ra, rb = rb, ra
        self.parent[rb] = ra
        self.size[ra] += self.size[rb]
        return True

    def groups(self) -> list[list[int]]:
        out: dict[int, list[int]] = defaultdict(list)
        for i in range(len(self.parent)):
            out[self.find(i)].append(i)
        return list(out.values())


@dataclass
class DedupResult:
    """Outcome of a dedup pass.

    ``clusters``: groups of two or more duplicate ids, each sorted with the kept
    id first; ``duplicate_of`` maps every removed id to the id kept in its place.
    """

    kept_ids: list[Hashable]
    duplicate_of: dict[Hashable, Hashable]
    clusters: list[list[Hashable]]
    n_docs: int
    n_candidate_pairs: int = 0
    n_verified_pairs: int = 0
    stats: dict[str, Any] = field(default_factory=dict)

    @property
    def n_removed(self) -> int:
        return len(self.duplicate_of)

    def filter(self, docs: Iterable[Mapping[str, Any]]) -> list[Mapping[str, Any]]:
        """The documents not removed, in input order."""
        return [d for i, d in enumerate(docs) if d.get("id", i) not in self.duplicate_of]


def _result_from_groups(ids: list[Hashable], groups: Iterable[list[int]], **extra: Any) -> DedupResult:
    duplicate_of: dict[Hashable, Hashable] = {}
    clusters: list[list[Hashable]] = []
    for g in groups:
        if len(g) < 2:
            continue
        members = sorted((ids[i] for i in g), key=_id_sort_key)
        clusters.append(members)
        for other in members[1:]:
            duplicate_of[other] = members[0]
    clusters.sort(key=lambda c: _id_sort_key(c[0]))
    kept = [i for i in ids if i not in duplicate_of]
    return DedupResult(kept, duplicate_of, clusters, len(ids), **extra)


def exact_dedup(docs: Sequence[Mapping[str, Any]]) -> DedupResult:
    """Group documents with identical normalised text; keep the lowest id of each group."""
    ids = _doc_ids(docs)
    by_hash: dict[str, list[int]] = defaultdict(list)
    for i, d in enumerate(docs):
        by_hash[exact_hash(d["text"])].append(i)
    return _result_from_groups(ids, by_hash.values())


def candidate_probability(similarity: float | np.ndarray, bands: int, rows: int) -> float | np.ndarray:
    """Probability that LSH with ``bands`` x ``rows`` makes a pair at this Jaccard similarity a candidate."""
    s = np.asarray(similarity, dtype=float)
    return 1.0 - (1.0 - s**rows) ** bands


def lsh_params_for_threshold(
    threshold: float, num_perm: int = 112, fp_weight: float = 0.5, fn_weight: float = 0.5
) -> tuple[int, int]:
    """``(bands, rows)`` with ``bands * rows <= num_perm`` minimising weighted FP + FN area.

    False-positive area: integral of the candidate probability over [0, threshold];
    false-negative area: integral of its complement over [threshold, 1].
    """
    if not 0.0 < threshold < 1.0:
        raise ConfigError("dedup.threshold", f"must be in (0, 1), got {threshold}", "use e.g. 0.8")
    lo = np.linspace(0.0, threshold, 201)
    hi = np.linspace(threshold, 1.0, 201)
    best, best_err = (2, 1), math.inf
    for b in range(2, num_perm + 1):
        for r in range(1, num_perm // b + 1):
            fp = np.trapezoid(candidate_probability(lo, b, r), lo)
            fn = np.trapezoid(1.0 - candidate_probability(hi, b, r), hi)
            err = fp_weight * fp + fn_weight * fn
            if err < best_err - 1e-12:
                best, best_err = (b, r), err
    return best


def shingle_hashes(text: str, ngram: int = 5) -> np.ndarray:
    """Distinct 32-bit hashes of the word ``ngram``-shingles of ``text`` (sorted ``uint32``).

    A text with fewer than ``ngram`` tokens is one shingle of all its tokens; an
    empty text has none.
    """
    tokens = word_tokens(text)
    if not tokens:
        return np.empty(0, dtype=np.uint32)
    h = token_hashes(tokens)
    grams = ngram_hashes(h, min(ngram, len(tokens)))
    return sorted_unique((grams & np.uint64(0xFFFFFFFF)).astype(np.uint32))


def exact_jaccard(a: np.ndarray | set, b: np.ndarray | set) -> float:
    """Jaccard similarity of two shingle sets."""
    sa, sb = (
        (set(a.tolist()) if isinstance(a, np.ndarray) else a),
        (set(b.tolist()) if isinstance(b, np.ndarray) else b),
    )
    if not sa and not sb:
        return 1.0
    return len(sa & sb) / len(sa | sb)


def _identity(x: int) -> int:
    return x


@dataclass
class MinHashConfig:
    """Near-dedup settings. ``bands``/``rows`` ``None``: chosen by :func:`lsh_params_for_threshold`."""

    num_perm: int = 112
    bands: int | None = 14
    rows: int | None = 8
    ngram: int = 5
    threshold: float = 0.8
    verify: bool = True
    verify_threshold: float | None = None
    seed: int = 1

    def __post_init__(self) -> None:
        if self.num_perm < 2:
            raise ConfigError("dedup.num_perm", f"must be >= 2, got {self.num_perm}", "use e.g. 112")
        if self.ngram < 1:
            raise ConfigError("dedup.ngram", f"must be >= 1, got {self.ngram}", "use e.g. 5")
        if not 0.0 < self.threshold < 1.0:
            raise ConfigError("dedup.threshold", f"must be in (0, 1), got {self.threshold}", "use e.g. 0.8")
        if (self.bands is None) != (self.rows is None):
            raise ConfigError(
                "dedup.bands",
                "bands and rows must be given together",
                "set both, or both to null to derive them from threshold",
            )
        if self.bands is None:
            self.bands, self.rows = lsh_params_for_threshold(self.threshold, self.num_perm)
        assert self.rows is not None
        if self.bands < 2 or self.rows < 1:
            raise ConfigError(
                "dedup.bands",
                f"need bands >= 2 and rows >= 1, got {self.bands} x {self.rows}",
                "use e.g. 14 bands x 8 rows",
            )
        if self.bands * self.rows > self.num_perm:
            raise ConfigError(
                "dedup.bands",
                f"{self.bands} bands x {self.rows} rows exceeds num_perm={self.num_perm}",
                "lower bands/rows or raise num_perm",
            )
        if self.verify_threshold is None:
            sd = math.sqrt(self.threshold * (1 - self.threshold) / self.num_perm)
            self.verify_threshold = max(0.0, self.threshold - 3 * sd)
        elif not 0.0 <= self.verify_threshold <= 1.0:
            raise ConfigError(
                "dedup.verify_threshold",
                f"must be in [0, 1], got {self.verify_threshold}",
                "use e.g. 0.7 or null for the default",
            )


class MinHashDeduplicator:
    """Near-duplicate detection with datasketch ``MinHash`` + ``MinHashLSH`` (see module docstring)."""

    def __init__(self, config: MinHashConfig | None = None, **overrides: Any):
        if config is None:
            config = MinHashConfig(**overrides)
        elif overrides:
            raise ConfigError(
                "dedup", "pass either a MinHashConfig or keyword settings, not both", "merge the settings into one"
            )
        self.config = config
        self._template = MinHash(num_perm=config.num_perm, seed=config.seed, hashfunc=_identity)

    def signature(self, text: str) -> MinHash | None:
        """MinHash of the text's shingle set (``None`` for a text without tokens)."""
        shingles = shingle_hashes(text, self.config.ngram)
        if len(shingles) == 0:
            return None
        mh = MinHash(
            seed=self.config.seed,
            hashfunc=_identity,
            permutations=self._template.permutations,
            hashvalues=self._template.hashvalues,
            scheme=self._template.scheme,
        )
        values = shingles.tolist()
        for start in range(0, len(values), _UPDATE_CHUNK):
            mh.update_batch(values[start : start + _UPDATE_CHUNK])
        return mh

    def run(self, docs: Sequence[Mapping[str, Any]]) -> DedupResult:
        """Cluster near-duplicates among ``docs``; documents without tokens are never merged."""
        ids = _doc_ids(docs)
        return self.cluster(ids, [self.signature(d["text"]) for d in docs])

    def from_hashvalues(self, hashvalues: np.ndarray) -> MinHash:
        """Rebuild a signature from stored :attr:`MinHash.hashvalues` (same config and seed)."""
        return MinHash(
            seed=self.config.seed,
            hashfunc=_identity,
            permutations=self._template.permutations,
            hashvalues=hashvalues,
            scheme=self._template.scheme,
        )

    def cluster(self, ids: Sequence[Hashable], sigs: Sequence[MinHash | None]) -> DedupResult:
        """Cluster precomputed signatures (``None``: never merged); ids are kept as given.

        Lets a caller compute signatures in parallel or cache them, then cluster
        all of them at once; :meth:`run` is ``cluster(ids, [signature(...)])``.
        """
        cfg = self.config
        ids = list(ids)
        if len(ids) != len(sigs):
            raise ConfigError("dedup", f"{len(ids)} ids but {len(sigs)} signatures", "pass one signature per id")
        lsh = MinHashLSH(threshold=cfg.threshold, num_perm=cfg.num_perm, params=(cfg.bands, cfg.rows))
        with lsh.insertion_session() as session:
            for i, mh in enumerate(sigs):
                if mh is not None:
                    session.insert(i, mh, check_duplication=False)
        uf = UnionFind(len(ids))
        n_candidates = n_verified = 0
        for i, mh in enumerate(sigs):
            if mh is None:
                continue
            for j in lsh.query(mh):
                if j <= i:
                    continue  # each unordered pair once
                n_candidates += 1
                if cfg.verify and mh.jaccard(sigs[j]) < cfg.verify_threshold:
                    continue
                n_verified += 1
                uf.union(i, j)
        return _result_from_groups(
            ids,
            uf.groups(),
            n_candidate_pairs=n_candidates,
            n_verified_pairs=n_verified,
            stats={"bands": cfg.bands, "rows": cfg.rows, "verify_threshold": cfg.verify_threshold},
        )


def near_dedup(docs: Sequence[Mapping[str, Any]], config: MinHashConfig | None = None) -> DedupResult:
    """Shortcut for ``MinHashDeduplicator(config).run(docs)``."""
    return MinHashDeduplicator(config).run(docs)
