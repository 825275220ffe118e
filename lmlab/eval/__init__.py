"""Model-agnostic evaluation harness (lm-evaluation-harness compatible scoring).

Entry points (imported lazily, so ``import lmlab.eval.protocol`` stays cheap):

* :func:`evaluate` -- run tasks against any :class:`LanguageModel`;
* :func:`load_task`, :func:`list_tasks` -- task specs in ``lmlab/eval/tasks/*.yaml``;
* :func:`task_texts` -- evaluation texts for training-data decontamination.
"""

from __future__ import annotations

from typing import Any

_EXPORTS = {
    "evaluate": "lmlab.eval.harness",
    "LanguageModel": "lmlab.eval.protocol",
    "load_task": "lmlab.eval.tasks",
    "list_tasks": "lmlab.eval.tasks",
    "task_texts": "lmlab.eval.contamination",
    "LmlabLM": "lmlab.eval.adapter",
    "EvalCallback": "lmlab.eval.callback",
}
__all__ = sorted(_EXPORTS)


def __getattr__(name: str) -> Any:
    if name in _EXPORTS:
        import importlib

        return getattr(importlib.import_module(_EXPORTS[name]), name)
    raise AttributeError(f"module 'lmlab.eval' has no attribute {name!r}")
