"""Pairwise preference evaluation: paired responses, judgments, and ratings of any number of models.

Pieces, each a small module:

* :mod:`~lmlab.eval.compare.pairs` -- prompt files, pair ids, side assignment;
* :mod:`~lmlab.eval.compare.session` -- generate responses and build the pairs;
* :mod:`~lmlab.eval.compare.store` -- SQLite (WAL) storage of responses, pairs, judgments;
* :mod:`~lmlab.eval.compare.server` and :mod:`~lmlab.eval.compare.page` -- the judging web page;
* :mod:`~lmlab.eval.compare.judges` -- judgments from a JSONL file or a reward model;
* :mod:`~lmlab.eval.compare.ratings` -- win rates, Bradley-Terry, Elo, bootstrap intervals;
* :mod:`~lmlab.eval.compare.report` -- tables, ``results.json`` and ``ratings.png``.

The command line is :mod:`lmlab.eval.compare_cli` (``lmlab eval compare``).
Names below are imported on first use, so importing the package stays cheap.
"""

from __future__ import annotations

from typing import Any

_EXPORTS = {
    "Prompt": "lmlab.eval.compare.pairs",
    "Pair": "lmlab.eval.compare.pairs",
    "load_prompts": "lmlab.eval.compare.pairs",
    "build_pairs": "lmlab.eval.compare.pairs",
    "prepare_pairs": "lmlab.eval.compare.session",
    "JudgmentStore": "lmlab.eval.compare.store",
    "Judgment": "lmlab.eval.compare.schema",
    "CompareApp": "lmlab.eval.compare.server",
    "CompareServer": "lmlab.eval.compare.server",
    "read_jsonl_judgments": "lmlab.eval.compare.judges",
    "judge_with_scorer": "lmlab.eval.compare.judges",
    "load_reward_scorer": "lmlab.eval.compare.judges",
    "Outcome": "lmlab.eval.compare.ratings",
    "rate": "lmlab.eval.compare.ratings",
    "bradley_terry": "lmlab.eval.compare.ratings",
    "sequential_elo": "lmlab.eval.compare.ratings",
    "build_report": "lmlab.eval.compare.report",
    "write_results": "lmlab.eval.compare.report",
}
__all__ = sorted(_EXPORTS)


def __getattr__(name: str) -> Any:
    if name in _EXPORTS:
        import importlib

        return getattr(importlib.import_module(_EXPORTS[name]), name)
    raise AttributeError(f"module 'lmlab.eval.compare' has no attribute {name!r}")
