"""Hook for training-data decontamination against the evaluation sets.

The data pipeline's n-gram (13-gram) decontamination calls :func:`task_texts`
for every task and removes training documents that overlap; the n-gram side
lives with the data pipeline, not here.
"""

from __future__ import annotations

import os
from collections.abc import Iterator

from lmlab.eval.base import Task
from lmlab.eval.tasks import load_task


def task_texts(
    task: Task | str | os.PathLike,
    data_dir: str | os.PathLike | None = None,
    *,
    include_answer: bool = True,
) -> Iterator[str]:
    """Yield the text of each evaluation item of ``task`` (a task object, name or YAML path).

    The text is the prompt without few-shot examples, followed by the gold
    answer (the correct choice, the last word, the reference solution) unless
    ``include_answer`` is False. Every doc is yielded, not just a ``limit``.
    """
    if not isinstance(task, Task):
        task = load_task(task, data_dir, num_fewshot=0)
    for doc in task.docs:
        yield task.decontamination_text(doc, include_answer=include_answer)
