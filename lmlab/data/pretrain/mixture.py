"""Deterministic weighted sampling of training windows from several sources.

The global sample stream is cut into chunks of ``chunk_size`` samples. Each
chunk receives a per-source count by largest remainder on carried-over credit,
so after any number of chunks every source's realised share differs from its
weight by less than one sample per chunk boundary; within a chunk the order is
a seeded shuffle. The j-th sample drawn from a source is window
``perm_e[j mod n]`` of that source, where ``perm_e`` is a seeded permutation
for epoch ``e = j // n``: sources smaller than their share are repeated, each
pass in a fresh order, and the repetition is reported by :meth:`epochs`.

Everything is a pure function of (seed, sample index), which is what makes a
resumed run continue the exact same stream.
"""

from __future__ import annotations

from functools import lru_cache
from typing import Sequence

import numpy as np

from lmlab.errors import ConfigError


class MixtureSampler:
    """Maps a global sample index to (source index, window index).

    Args:
        names: Source names.
        weights: Non-negative weights (normalised here).
        sizes: Number of windows in each source.
        seed: Fixes chunk shuffles and per-epoch permutations.
        chunk_size: Samples per allocation chunk.
    """

    def __init__(
        self, names: Sequence[str], weights: Sequence[float], sizes: Sequence[int], seed: int = 0, chunk_size: int = 256
    ):
        w = np.asarray(weights, dtype=np.float64)
        if len(names) != len(w) or len(w) != len(sizes):
            raise ValueError("names, weights and sizes must have the same length")
        if np.any(~np.isfinite(w)) or np.any(w < 0):
            raise ConfigError("data.sources.weight", f"weights must be finite and >= 0, got {list(weights)}")
        if w.sum() <= 0:
            raise ConfigError("data.sources.weight", "weights sum to zero", "give at least one source a positive weight")
        self.names = list(names)
        self.weights = w / w.sum()
        self.sizes = np.asarray(sizes, dtype=np.int64)
        for name, wt, n in zip(self.names, self.weights, self.sizes):
            if wt > 0 and n <= 0:
                raise ConfigError(
                    f"data.sources[{name}]",
                    f"source {name!r} has no training window at this sequence length",
                    "add data, lower data.seq_len or set its weight to 0",
                )
        self.seed = int(seed)
        self.chunk_size = int(chunk_size)
        # counts[c] = samples per source in chunk c; starts[c] = samples per source before chunk c
        self._counts: list[np.ndarray] = []
        self._starts: list[np.ndarray] = [np.zeros(len(w), dtype=np.int64)]
        self._credit = np.zeros(len(w))

    def _extend(self, n_chunks: int) -> None:
        while len(self._counts) < n_chunks:
            self._credit += self.chunk_size * self.weights
            base = np.floor(self._credit).astype(np.int64)
            short = self.chunk_size - int(base.sum())
            if short > 0:
                order = np.argsort(-(self._credit - base), kind="stable")
                base[order[:short]] += 1
            self._credit -= base
            self._counts.append(base)
            self._starts.append(self._starts[-1] + base)

    @lru_cache(maxsize=64)
    def _chunk(self, c: int) -> tuple[np.ndarray, np.ndarray]:
        self._extend(c + 1)
        counts = self._counts[c]
        src = np.repeat(np.arange(len(counts)), counts)
        rng = np.random.default_rng([self.seed, 0xC0FFEE, c])
        src = src[rng.permutation(len(src))]
        # ordinal of each sample within its source over the whole stream
        ordinal = np.empty(len(src), dtype=np.int64)
        for s in range(len(counts)):
            pos = np.nonzero(src == s)[0]
            ordinal[pos] = self._starts[c][s] + np.arange(len(pos))
        return src, ordinal

    @lru_cache(maxsize=256)
    def _perm(self, s: int, epoch: int) -> np.ndarray:
        return np.random.default_rng([self.seed, s, epoch]).permutation(int(self.sizes[s]))

    def draw(self, start: int, stop: int) -> tuple[np.ndarray, np.ndarray]:
        """(source, window) arrays for global samples ``start`` to ``stop - 1``."""
        srcs, wins = [], []
        i = start
        while i < stop:
            c, off = divmod(i, self.chunk_size)
            take = min(stop - i, self.chunk_size - off)
            src, ordinal = self._chunk(c)
            src, ordinal = src[off : off + take], ordinal[off : off + take]
            win = np.empty(take, dtype=np.int64)
            for k in range(take):
                s = int(src[k])
                epoch, j = divmod(int(ordinal[k]), int(self.sizes[s]))
                win[k] = self._perm(s, epoch)[j]
            srcs.append(src)
            wins.append(win)
            i += take
        if not srcs:
            return np.zeros(0, dtype=np.int64), np.zeros(0, dtype=np.int64)
        return np.concatenate(srcs), np.concatenate(wins)

    def counts(self, num_samples: int) -> np.ndarray:
        """Samples per source among the first ``num_samples``."""
        src, _ = self.draw(0, num_samples)
        return np.bincount(src, minlength=len(self.names))

    def epochs(self, num_samples: int) -> dict[str, float]:
        """How many passes over each source the first ``num_samples`` samples make."""
        counts = self.counts(num_samples)
        return {n: float(c / max(1, s)) for n, c, s in zip(self.names, counts, self.sizes)}
