"""Deterministic token and n-gram hashing shared by the filters, dedup and decontamination.

Python's built-in ``hash`` of a string is salted per process, so anything that is
stored (an n-gram index, MinHash signatures) or must give the same answer in two
runs uses ``xxhash`` (a dependency of ``datasets``) and falls back to CRC-32 when it
is missing. N-gram hashes are built from token hashes with vectorised numpy
arithmetic (uint64, wrapping), so no Python loop runs per n-gram.
"""

from __future__ import annotations

import zlib
from typing import Sequence

import numpy as np

try:  # ``datasets`` depends on xxhash, so it is normally present.
    import xxhash

    _token_hash = xxhash.xxh3_64_intdigest
except ImportError:  # pragma: no cover - exercised only without xxhash
    xxhash = None

    def _token_hash(b: bytes) -> int:
        # Two CRCs with different seeds give 64 bits; good enough to tell tokens apart.
        return (zlib.crc32(b) << 32) | zlib.crc32(b, 0x9E3779B9)


# Odd 64-bit multiplier (golden ratio): a bijection on uint64, mixes well.
_MULT = np.uint64(0x9E3779B97F4A7C15)
_C1 = np.uint64(0xBF58476D1CE4E5B9)
_C2 = np.uint64(0x94D049BB133111EB)


def token_hashes(tokens: Sequence[str]) -> np.ndarray:
    """64-bit hash of each token (``uint64`` array), stable across processes."""
    return np.fromiter(map(_token_hash, map(str.encode, tokens)), dtype=np.uint64, count=len(tokens))


def mix64(h: np.ndarray) -> np.ndarray:
    """SplitMix64 finaliser: spreads entropy into the low bits before truncating.

    (Array arithmetic on uint64 wraps silently in numpy; only scalar ops warn.)
    """
    h = h ^ (h >> np.uint64(30))
    h = h * _C1
    h = h ^ (h >> np.uint64(27))
    h = h * _C2
    return h ^ (h >> np.uint64(31))


def extend_ngrams(grams: np.ndarray, hashes: np.ndarray, n: int) -> np.ndarray:
    """Turn unmixed ``n``-gram sums into ``(n+1)``-gram sums (polynomial in ``_MULT``)."""
    count = len(hashes) - n
    if count <= 0:
        return np.empty(0, dtype=np.uint64)
    return grams[:count] * _MULT + hashes[n : n + count]


def ngram_hashes(hashes: np.ndarray, n: int, mix: bool = True) -> np.ndarray:
    """Order-sensitive hash of every run of ``n`` consecutive token hashes.

    Returns an array of length ``len(hashes) - n + 1`` (empty when too short).
    ``mix=False`` skips the finaliser: equality is unchanged, which is all that
    within-document repetition counting needs.
    """
    out = hashes
    for k in range(1, n):
        out = extend_ngrams(out, hashes, k)
    if len(out) == 0:
        return np.empty(0, dtype=np.uint64)
    return mix64(out) if mix else out


def sorted_unique(a: np.ndarray) -> np.ndarray:
    """Sorted distinct values of ``a``.

    Same result as ``np.unique`` but sort-based: numpy 2's hash-based unique is
    several times slower on large uint64 arrays.
    """
    if len(a) == 0:
        return a.copy()
    s = np.sort(a)
    keep = np.empty(len(s), dtype=bool)
    keep[0] = True
    np.not_equal(s[1:], s[:-1], out=keep[1:])
    return s[keep]
