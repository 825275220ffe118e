"""Length-sorted batching of model requests, with the original order restored.

Sorting longest-first (as lm-evaluation-harness does) makes batches hold
similar lengths, so little compute is wasted on padding, and puts the largest
batch first, so an out-of-memory error happens at once instead of after hours.
Results come back in sorted order and are put back into request order here, so
callers never see the permutation.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator, Sequence
from typing import Any, Generic, TypeVar

T = TypeVar("T")
R = TypeVar("R")


def default_length(item: Any) -> int:
    """Character length of a request: a string, or the sum over a tuple's string parts."""
    if isinstance(item, str):
        return len(item)
    if isinstance(item, (tuple, list)):
        return sum(len(part) for part in item if isinstance(part, str))
    raise TypeError(f"no default length for {type(item).__name__}; pass length=")


class LengthSortedBatcher(Generic[T]):
    """Orders ``items`` longest first, yields batches, and restores results to item order.

    ``length`` measures an item; pass a token counter for token-exact sorting
    (the default counts characters, which ranks the same way closely enough).
    Ties keep their original relative order, so the batching is deterministic.
    """

    def __init__(self, items: Sequence[T], length: Callable[[T], int] = default_length):
        self.items = list(items)
        lengths = [length(item) for item in self.items]
        # Python's sort is stable: equal lengths stay in request order.
        self.order: list[int] = sorted(range(len(self.items)), key=lambda i: -lengths[i])

    def __len__(self) -> int:
        return len(self.items)

    def num_batches(self, batch_size: int) -> int:
        """How many batches ``batches(batch_size)`` yields."""
        _check_batch_size(batch_size)
        return -(-len(self.items) // batch_size)

    def batches(self, batch_size: int) -> Iterator[list[T]]:
        """Yield lists of at most ``batch_size`` items, longest items first."""
        _check_batch_size(batch_size)
        for start in range(0, len(self.order), batch_size):
            yield [self.items[i] for i in self.order[start : start + batch_size]]

    def restore(self, sorted_results: Sequence[R]) -> list[R]:
        """Map results given in sorted (batch) order back to the original item order."""
        if len(sorted_results) != len(self.order):
            raise ValueError(f"expected {len(self.order)} results, got {len(sorted_results)}")
        out: list[Any] = [None] * len(self.order)
        for position, original_index in enumerate(self.order):
            out[original_index] = sorted_results[position]
        return out


def run_length_sorted(
    items: Sequence[T],
    fn: Callable[[list[T]], Sequence[R]],
    batch_size: int,
    length: Callable[[T], int] = default_length,
    on_batch: Callable[[int], None] | None = None,
) -> list[R]:
    """Call ``fn`` on length-sorted batches of ``items``; return its results in item order.

    ``fn`` must return one result per item of the batch it was given.
    ``on_batch(n_items)`` is called after each batch (e.g. to advance a progress bar).
    """
    batcher = LengthSortedBatcher(items, length)
    results: list[R] = []
    for batch in batcher.batches(batch_size):
        out = list(fn(batch))
        if len(out) != len(batch):
            raise ValueError(f"batch function returned {len(out)} results for {len(batch)} items")
        results.extend(out)
        if on_batch is not None:
            on_batch(len(batch))
    return batcher.restore(results)


def _check_batch_size(batch_size: int) -> None:
    if batch_size < 1:
        raise ValueError(f"batch_size must be >= 1, got {batch_size}")
