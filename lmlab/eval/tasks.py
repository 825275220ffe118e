"""The task registry: built-in task YAMLs, task types, and loading a task with its data.

Built-in tasks are the YAML files in ``lmlab/eval/tasks/``; adding a task is
adding a file there (or passing the path of a YAML anywhere). Task types:

=================  ======================================  ==========================
type               scoring                                 tasks
=================  ======================================  ==========================
multiple_choice    log-likelihood argmax: acc, acc_norm     arc_*, hellaswag, piqa,
                                                            mmlu, winogrande (partial)
cloze              is_greedy acc, last-word perplexity      lambada
generation         extract answer, exact match             gsm8k
code               execute tests, unbiased pass@k          humaneval (mbpp via hub)
=================  ======================================  ==========================
"""

from __future__ import annotations

import os
from collections.abc import Sequence
from pathlib import Path

from lmlab.errors import ConfigError
from lmlab.eval.base import Task
from lmlab.eval.cloze import ClozeTask
from lmlab.eval.codegen import CodeTask
from lmlab.eval.data import resolve_data_dir, resolve_online
from lmlab.eval.generation import GenerationTask
from lmlab.eval.multiple_choice import MultipleChoiceTask
from lmlab.eval.spec import TaskSpec, load_spec_file, parse_spec

TASK_DIR = Path(__file__).resolve().parent / "tasks"

TASK_TYPES: dict[str, type[Task]] = {
    cls.type_name: cls for cls in (MultipleChoiceTask, ClozeTask, GenerationTask, CodeTask)
}


def list_tasks() -> list[str]:
    """Names of the built-in tasks."""
    return sorted(p.stem for p in TASK_DIR.glob("*.yaml"))


def task_file(name_or_path: str | os.PathLike) -> Path:
    """The YAML for a built-in task name, or the given path if it names a file."""
    text = os.fspath(name_or_path)
    if text.endswith((".yaml", ".yml")) or os.sep in text:
        return Path(text)
    path = TASK_DIR / f"{text}.yaml"
    if not path.is_file():
        raise ConfigError("tasks", f"unknown task {text!r}", f"built-in tasks: {', '.join(list_tasks())}")
    return path


def load_spec(name_or_path: str | os.PathLike | TaskSpec | dict) -> TaskSpec:
    """A validated spec from a task name, a YAML path, a mapping, or a spec (returned as is)."""
    if isinstance(name_or_path, TaskSpec):
        return name_or_path
    if isinstance(name_or_path, dict):
        return parse_spec(name_or_path)
    return load_spec_file(task_file(name_or_path))


def make_task(spec: TaskSpec | dict | str, *, num_fewshot: int | None = None, seed: int = 1234) -> Task:
    """An empty task object of the spec's type (no data yet)."""
    spec = load_spec(spec)
    return TASK_TYPES[spec.type](spec, num_fewshot=num_fewshot, seed=seed)


def load_task(
    name_or_path: str | os.PathLike | TaskSpec | dict,
    data_dir: str | os.PathLike | None = None,
    *,
    num_fewshot: int | None = None,
    seed: int = 1234,
    online: bool | None = None,
) -> Task:
    """Load a task and its data.

    ``data_dir`` defaults to ``$LMLAB_EVAL_DATA``, else ``data/eval``;
    ``online`` (default ``$LMLAB_EVAL_ONLINE``) allows falling back to the hub
    when the local file is missing. ``num_fewshot`` overrides the spec's count.
    """
    task = make_task(name_or_path, num_fewshot=num_fewshot, seed=seed)
    return task.load(resolve_data_dir(data_dir), online=resolve_online(online))


def task_from_rows(
    spec: TaskSpec | dict | str,
    rows: Sequence[dict],
    *,
    fewshot_rows: Sequence[dict] | None = None,
    num_fewshot: int | None = None,
    seed: int = 1234,
) -> Task:
    """A task over in-memory rows (for notebooks and tests); same checks as file data."""
    return make_task(spec, num_fewshot=num_fewshot, seed=seed).load_rows(rows, fewshot_rows)
