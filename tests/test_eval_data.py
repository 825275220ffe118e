"""Loading the shared evaluation files, and the decontamination hook over them."""

from __future__ import annotations

import gzip
import json

import pytest

from lmlab.eval.contamination import task_texts
from lmlab.eval.data import resolve_data_dir
from lmlab.eval.tasks import load_task

pytestmark = pytest.mark.shared_data

JSONL_TASKS = {
    # task: (file, number of choices per doc or None)
    "arc_easy": ("arc_easy_test_icl.jsonl", 4),
    "arc_challenge": ("arc_challenge_test_icl.jsonl", 4),
    "piqa": ("piqa_val_icl.jsonl", 2),
    "hellaswag": ("hellaswag_small_icl.jsonl", 4),
    "mmlu_small": ("mmlu_small_icl.jsonl", 4),
    "winogrande": ("winogrande_icl.jsonl", 2),
    "lambada": ("lambada_openai_test_icl.jsonl", None),
    "gsm8k": ("gsm8k_test.jsonl", None),
}


def _first_rows(path, n=3):
    with open(path, encoding="utf-8") as fh:
        return [json.loads(next(fh)) for _ in range(n)]


@pytest.mark.parametrize("name", sorted(JSONL_TASKS))
def test_shared_jsonl_tasks_load_every_row(shared_data, name):
    file, n_choices = JSONL_TASKS[name]
    path = shared_data / "eval" / file
    task = load_task(name, shared_data / "eval", num_fewshot=0)
    n_lines = sum(1 for line in path.read_text(encoding="utf-8").split("\n") if line.strip())
    assert len(task.docs) == n_lines and task.skipped_rows == 0
    for doc, row in zip(task.docs[:3], _first_rows(path)):
        reqs = task.build_requests(doc)
        if n_choices is not None:
            assert len(reqs) == n_choices
            assert all(cont.startswith(" ") for _, cont in reqs)
        if "choices" in row:
            assert [c[1:] for _, c in reqs] == row["choices"]
            assert reqs[0][0].startswith(row["query"].rstrip("\n"))
        if "context_options" in row:
            assert reqs == [(c, " " + row["continuation"]) for c in row["context_options"]]
        if name == "lambada":
            assert reqs == [(row["context"], " " + row["continuation"])]
        if name == "gsm8k":
            assert reqs == [f"Question: {row['question']}\nAnswer:"]


def test_arc_prompt_matches_lm_eval_layout(shared_data):
    task = load_task("arc_easy", shared_data / "eval")
    row = _first_rows(shared_data / "eval" / "arc_easy_test_icl.jsonl", 1)[0]
    assert task.build_requests(task.docs[0])[0] == (row["query"] + "\nAnswer:", " " + row["choices"][0])


def test_mmlu_reads_csvs_from_the_tar(shared_data):
    task = load_task("mmlu", shared_data / "eval", num_fewshot=5)
    assert len(task.docs) > 14000
    doc = task.docs[0]
    assert doc.fields["subject"] == "abstract_algebra" and len(doc.fields["choices"]) == 4
    assert isinstance(doc.fields["answer"], int)
    context, cont = task.build_requests(doc)[0]
    assert cont == " A"
    assert context.startswith(
        "The following are multiple choice questions (with answers) about abstract algebra.\n\n"
    )
    assert context.count("\nAnswer:") == 6  # five dev examples and the question
    assert context.endswith(doc.fields["question"] + "\nA. " + "\nB. ".join(doc.fields["choices"][:2]) + "\nC. "
                            + doc.fields["choices"][2] + "\nD. " + doc.fields["choices"][3] + "\nAnswer:")
    # examples are the first five dev questions of the same subject
    subjects = {d.fields["subject"] for d in task.sampler.select(task.docs[-1])}
    assert subjects == {task.docs[-1].fields["subject"]}


def test_humaneval_loads_from_gzip(shared_data):
    task = load_task("humaneval", shared_data / "eval")
    with gzip.open(shared_data / "eval" / "HumanEval.jsonl.gz", "rt", encoding="utf-8") as fh:
        first = json.loads(fh.readline())
    assert len(task.docs) == 164
    assert task.build_requests(task.docs[0]) == [first["prompt"]]
    program = task.program(task.docs[0], first["canonical_solution"])
    assert program.startswith(first["prompt"] + first["canonical_solution"])
    assert program.rstrip().endswith(f"check({first['entry_point']})")


def test_data_dir_from_environment(shared_data, monkeypatch):
    monkeypatch.setenv("LMLAB_EVAL_DATA", str(shared_data / "eval"))
    assert resolve_data_dir() == shared_data / "eval"
    assert len(load_task("hellaswag").docs) == 4
    monkeypatch.delenv("LMLAB_EVAL_DATA")
    assert resolve_data_dir().as_posix() == "data/eval"  # the documented default, under the working directory
    assert resolve_data_dir(shared_data / "eval") == shared_data / "eval"  # an explicit folder wins over the variable


def test_task_texts_yield_every_item_with_its_answer(shared_data):
    texts = list(task_texts("arc_challenge", shared_data / "eval"))
    rows = _first_rows(shared_data / "eval" / "arc_challenge_test_icl.jsonl", 2)
    assert len(texts) == 1172
    for text, row in zip(texts, rows):
        assert row["query"] in text and text.endswith(" " + row["choices"][row["gold"]])
    lambada = next(iter(task_texts("lambada", shared_data / "eval", include_answer=False)))
    row = _first_rows(shared_data / "eval" / "lambada_openai_test_icl.jsonl", 1)[0]
    assert lambada == row["context"]
