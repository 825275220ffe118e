"""Exact and MinHash-LSH near-duplicate detection, with planted near-duplicates of real text."""

from __future__ import annotations

import random

import numpy as np
import pytest

from lmlab.data.prepare.dedup import (
    MinHashConfig,
    MinHashDeduplicator,
    UnionFind,
    candidate_probability,
    exact_dedup,
    exact_jaccard,
    lsh_params_for_threshold,
    near_dedup,
    shingle_hashes,
)
from lmlab.data.prepare.stats import word_tokens
from lmlab.errors import ConfigError


def shingles(words: list[str], n: int = 5) -> set[tuple[str, ...]]:
    toks = word_tokens(" ".join(words))
    return {tuple(toks[i : i + n]) for i in range(len(toks) - n + 1)}


def true_jaccard(a: list[str], b: list[str]) -> float:
    sa, sb = shingles(a), shingles(b)
    return len(sa & sb) / len(sa | sb)


def variant_at(
    base: list[str], target: float, rng: random.Random, tag: str, below: bool = False
) -> tuple[list[str], float]:
    """Replace words (in a fixed random order) by new tokens: the most edits keeping J >= target
    (or, with ``below``, the fewest edits bringing J under target).

    Each replacement removes the shingles that cover the word, so J falls
    monotonically with the number of edits and a binary search finds the count.
    """
    order = list(range(len(base)))
    rng.shuffle(order)

    def edited(k: int) -> list[str]:
        out = list(base)
        for e, pos in enumerate(order[:k]):
            out[pos] = f"{tag}q{e}x"
        return out

    lo, hi = 0, len(base)
    while lo < hi:
        mid = (lo + hi + 1) // 2
        if true_jaccard(base, edited(mid)) >= target:
            lo = mid
        else:
            hi = mid - 1
    var = edited(lo + 1 if below else lo)
    return var, true_jaccard(base, var)


def planted_set(words: list[str], n_pairs: int, seed: int = 0):
    rng = random.Random(seed)
    docs, positives, negatives = [], [], []
    for b in range(2 * n_pairs):
        base = words[b * 400 : b * 400 + 300]
        if b % 2 == 0:
            var, j = variant_at(base, rng.uniform(0.8, 0.99), rng, f"p{b}")
            positives.append((f"base{b}", f"var{b}", j))
        else:
            var, j = variant_at(base, rng.uniform(0.05, 0.5), rng, f"n{b}", below=True)
            negatives.append((f"base{b}", f"var{b}", j))
        docs.append({"id": f"base{b}", "text": " ".join(base)})
        docs.append({"id": f"var{b}", "text": " ".join(var)})
    return docs, positives, negatives


def cluster_of(result) -> dict:
    out = {}
    for c in result.clusters:
        for member in c:
            out[member] = c[0]
    return out


def check_planted(docs, positives, negatives, config=None):
    result = near_dedup(docs, config)
    cl = cluster_of(result)
    same = lambda a, b: cl.get(a, a) == cl.get(b, b)  # noqa: E731
    recall = np.mean([same(a, b) for a, b, _ in positives])
    false_merges = [(a, b, j) for a, b, j in negatives if same(a, b)]
    # precision: no cluster mixes two different base passages
    for c in result.clusters:
        assert len({m.removeprefix("base").removeprefix("var") for m in c}) == 1, c
    return result, recall, false_merges


@pytest.mark.shared_data
def test_planted_near_duplicates_in_real_text(shared_data):
    text = (shared_data / "books" / "gutenberg_2701_moby_dick.txt").read_text(encoding="utf-8")
    words = text.split()[2000:]
    docs, positives, negatives = planted_set(words, n_pairs=60)
    assert min(j for *_, j in positives) >= 0.8 and max(j for *_, j in negatives) < 0.5
    result, recall, false_merges = check_planted(docs, positives, negatives)
    assert recall >= 0.95
    assert false_merges == []
    assert result.n_removed == len(result.clusters)  # every cluster is one planted pair
    assert all(c[0].startswith("base") for c in result.clusters)  # lowest id kept ("base" < "var")


def test_planted_near_duplicates_synthetic_vocabulary():
    # Same check without shared data: Zipf-distributed words from a fixed vocabulary.
    rng = np.random.default_rng(1)
    vocab = [f"w{i}" for i in range(3000)]
    probs = 1.0 / np.arange(1, 3001)
    words = list(rng.choice(vocab, size=40 * 400, p=probs / probs.sum()))
    docs, positives, negatives = planted_set(words, n_pairs=20, seed=3)
    _, recall, false_merges = check_planted(docs, positives, negatives)
    assert recall >= 0.95 and false_merges == []


def test_near_dedup_is_order_independent_and_deterministic():
    base = "the quick brown fox jumps over the lazy dog while the cat watches from the old wooden fence " * 3
    docs = [
        {"id": 7, "text": base},
        {"id": 3, "text": base + " and then it rains"},
        {"id": 12, "text": "a completely different document about the history of mathematics and its many uses"},
        {"id": 10, "text": base.replace("lazy", "sleepy", 1)},
    ]
    r1 = near_dedup(docs)
    r2 = near_dedup(list(reversed(docs)))
    assert r1.clusters == r2.clusters == [[3, 7, 10]]
    assert r1.kept_ids == [3, 12] and r1.duplicate_of == {7: 3, 10: 3}
    assert [d["id"] for d in r1.filter(docs)] == [3, 12]


def test_empty_documents_are_never_merged():
    r = near_dedup([{"id": 1, "text": ""}, {"id": 2, "text": "  !!! "}, {"id": 3, "text": "word"}])
    assert r.clusters == [] and r.kept_ids == [1, 2, 3]


def test_exact_dedup_normalises_case_and_whitespace():
    docs = [
        {"id": 10, "text": "Hello   World\n"},
        {"id": 9, "text": "hello world"},
        {"id": 11, "text": "hello, world"},
        {"id": "x", "text": "HELLO WORLD"},
    ]
    r = exact_dedup(docs)
    # integer ids compare numerically (9 < 10), and before string ids
    assert r.clusters == [[9, 10, "x"]]
    assert r.kept_ids == [9, 11]


def test_duplicate_ids_are_rejected():
    with pytest.raises(ConfigError, match="id"):
        exact_dedup([{"id": 1, "text": "a"}, {"id": 1, "text": "b"}])


def test_lsh_parameters():
    assert candidate_probability(0.8, 14, 8) == pytest.approx(0.9235, abs=1e-3)
    assert candidate_probability(0.5, 14, 8) < 0.06
    b, r = lsh_params_for_threshold(0.8, 112)
    assert b * r <= 112 and b >= 2
    assert candidate_probability(0.9, b, r) > 0.9 > 0.1 > candidate_probability(0.5, b, r)
    cfg = MinHashConfig(bands=None, rows=None, threshold=0.7)
    assert (cfg.bands, cfg.rows) == lsh_params_for_threshold(0.7, 112)
    assert MinHashConfig().verify_threshold == pytest.approx(0.8 - 3 * (0.8 * 0.2 / 112) ** 0.5)


def test_config_errors():
    with pytest.raises(ConfigError, match="dedup.bands"):
        MinHashConfig(bands=20, rows=8)
    with pytest.raises(ConfigError, match="dedup.threshold"):
        MinHashConfig(threshold=1.2)
    with pytest.raises(ConfigError, match="dedup.bands"):
        MinHashConfig(bands=14, rows=None)


def test_shingles_and_signatures():
    text = "One two three four five six seven."
    h = shingle_hashes(text)
    assert h.dtype == np.uint32 and len(h) == 3
    assert len(shingle_hashes("just three words")) == 1
    assert exact_jaccard(shingle_hashes(text), shingle_hashes(text.upper())) == 1.0
    d = MinHashDeduplicator()
    assert d.signature("") is None
    assert np.array_equal(d.signature(text).hashvalues, MinHashDeduplicator().signature(text).hashvalues)


def test_union_find():
    uf = UnionFind(5)
    assert uf.union(0, 1) and uf.union(3, 4) and uf.union(1, 4)
    assert not uf.union(0, 3)
    assert sorted(sorted(g) for g in uf.groups()) == [[0, 1, 3, 4], [2]]
