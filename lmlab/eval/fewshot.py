"""Few-shot example selection, deterministic for a seed.

``random`` draws a fresh sample per doc from ``random.Random(f"{seed}:{doc.id}")``,
so a doc's prompt depends only on the seed and its id -- not on ``limit``, on
evaluation order or on other tasks. ``first_n`` takes the pool's first examples
(MMLU's fixed dev-set prompts). When the pool is the evaluation split itself the
doc is never its own example: like lm-eval, one extra example is drawn and the
doc dropped if it was picked.
"""

from __future__ import annotations

import random
from collections import defaultdict

from lmlab.eval.data import Doc


class FewshotSampler:
    """Chooses the few-shot examples for each doc from a pool."""

    def __init__(
        self,
        pool: list[Doc],
        num: int,
        sampler: str = "random",
        seed: int = 1234,
        group_by: str | None = None,
        exclude_self: bool = False,
    ):
        if sampler not in ("random", "first_n"):
            raise ValueError(f"unknown sampler {sampler!r}")
        self.pool = pool
        self.num = num
        self.sampler = sampler
        self.seed = seed
        self.group_by = group_by
        self.exclude_self = exclude_self
        self._groups: dict[object, list[Doc]] = defaultdict(list)
        if group_by is not None:
            for d in pool:
                if group_by in d.fields:
                    self._groups[d.fields[group_by]].append(d)

    def candidates(self, doc: Doc) -> list[Doc]:
        """The examples ``doc`` may draw from (its group's, when grouping)."""
        if self.group_by is None:
            return self.pool
        return self._groups.get(doc.fields.get(self.group_by), [])

    def select(self, doc: Doc) -> list[Doc]:
        """Up to ``num`` examples for ``doc`` (fewer only if the pool is that small)."""
        if self.num <= 0:
            return []
        candidates = self.candidates(doc)
        extra = 1 if self.exclude_self else 0
        if self.sampler == "first_n":
            drawn = candidates[: self.num + extra]
        else:
            rng = random.Random(f"{self.seed}:{doc.id}")
            drawn = rng.sample(candidates, min(len(candidates), self.num + extra))
        if self.exclude_self:
            drawn = [d for d in drawn if d.id != doc.id]
        return drawn[: self.num]
