"""Length-sorted batching: longest first, bounded batch size, original order restored."""

from __future__ import annotations

import random

import pytest

from fakes import FunctionModel
from lmlab.eval.batching import LengthSortedBatcher, default_length, run_length_sorted
from lmlab.eval.harness import run_task
from lmlab.eval.tasks import task_from_rows


def _random_requests(n: int, seed: int) -> list[tuple[str, str]]:
    rng = random.Random(seed)
    return [("c" * rng.randint(0, 40), " x" * rng.randint(1, 10)) for _ in range(n)]


def test_batches_are_longest_first_and_bounded():
    items = _random_requests(53, seed=0)
    batcher = LengthSortedBatcher(items)
    batches = list(batcher.batches(8))
    assert len(batches) == batcher.num_batches(8) == 7
    assert all(1 <= len(b) <= 8 for b in batches)
    flat_lengths = [len(c) + len(x) for b in batches for (c, x) in b]
    assert flat_lengths == sorted(flat_lengths, reverse=True)
    assert sorted(r for b in batches for r in b) == sorted(items)  # nothing lost or duplicated


def test_restore_puts_results_back_in_request_order():
    items = _random_requests(37, seed=1)
    batcher = LengthSortedBatcher(items)
    processed = [f"{c}|{x}" for batch in batcher.batches(5) for (c, x) in batch]
    assert processed != [f"{c}|{x}" for c, x in items]  # sorting did permute them
    assert batcher.restore(processed) == [f"{c}|{x}" for c, x in items]


def test_restore_rejects_wrong_count():
    batcher = LengthSortedBatcher(["a", "bb"])
    with pytest.raises(ValueError):
        batcher.restore(["x"])


def test_ties_keep_original_order():
    items = ["aa", "b1", "cc", "d", "ee"]
    order = [x for batch in LengthSortedBatcher(items).batches(10) for x in batch]
    assert order == ["aa", "b1", "cc", "ee", "d"]


def test_run_length_sorted_with_custom_length_and_progress():
    words = ["one", "three", "seventeen", "a", "twenty"]
    seen_batches: list[list[str]] = []
    progress: list[int] = []

    def fn(batch: list[str]) -> list[str]:
        seen_batches.append(batch)
        return [w.upper() for w in batch]

    # rank by vowel count instead of characters: a token-count stand-in
    vowels = lambda w: sum(ch in "aeiou" for ch in w)  # noqa: E731
    out = run_length_sorted(words, fn, batch_size=2, length=vowels, on_batch=progress.append)
    assert out == [w.upper() for w in words]
    # vowels: one=2, three=2, seventeen=4, a=1, twenty=1 -> most first, ties in input order
    assert seen_batches == [["seventeen", "one"], ["three", "a"], ["twenty"]]
    assert sum(progress) == len(words) and max(progress) <= 2


def test_run_length_sorted_checks_result_count():
    with pytest.raises(ValueError):
        run_length_sorted(["a", "b"], lambda batch: batch[:1], batch_size=2)


def test_default_length():
    assert default_length("abc") == 3
    assert default_length(("ab", " cde")) == 6
    with pytest.raises(TypeError):
        default_length(3)


def test_harness_sends_longest_requests_first_and_scores_in_doc_order():
    # choices of very different lengths; the model prefers choice "b" everywhere
    rows = [
        {"q": "Q1", "choices": ["a" * 30, "b", "c" * 3], "gold": 1},
        {"q": "Q2", "choices": ["b" * 2, "x" * 50, "y"], "gold": 0},
        {"q": "Q3", "choices": ["z" * 10, "w" * 20, "b" * 7], "gold": 2},
    ]
    spec = {"name": "t", "type": "multiple_choice", "data": {"path": "unused.jsonl"},
            "doc_to_text": "{q}", "doc_to_choice": "choices", "answer": "gold"}
    task = task_from_rows(spec, rows)
    model = FunctionModel(lambda ctx, cont: (0.0 if cont.strip().startswith("b") else -5.0, False))
    records = run_task(model, task, task.docs, batch_size=2)
    sent = model.ll_requests
    lengths = [len(c) + len(x) for c, x in sent]
    assert lengths == sorted(lengths, reverse=True)
    assert all(len(b) <= 2 for b in model.ll_batches)
    assert [r.doc_id for r in records] == [0, 1, 2]
    assert [r.metrics["acc"] for r in records] == [1.0, 1.0, 1.0]
    # each record's scores line up with its own choices, not with the sorted order
    assert records[1].log["scores"] == [0.0, -5.0, -5.0]
