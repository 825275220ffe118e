"""The hub fallback: no local file and online=True loads through datasets.load_dataset (mocked)."""

from __future__ import annotations

import pytest

from lmlab.errors import ConfigError
from lmlab.eval.tasks import load_task


@pytest.fixture
def fake_hub(monkeypatch):
    """Replace datasets.load_dataset with a lookup in a dict; records the calls."""
    import datasets

    tables: dict[tuple[str, str], list[dict]] = {}
    calls: list[tuple] = []

    def fake_load_dataset(path, name=None, split=None, revision=None):
        calls.append((path, name, split))
        if (path, split) not in tables:
            raise FileNotFoundError(f"{path} has no split {split}")
        return tables[(path, split)]

    monkeypatch.setattr(datasets, "load_dataset", fake_load_dataset)
    return tables, calls


def test_winogrande_hub_rows_get_partial_scoring(tmp_path, fake_hub):
    tables, calls = fake_hub
    tables[("allenai/winogrande", "validation")] = [
        {"sentence": "Sarah was a better surgeon than Maria so _ got the easier cases.",
         "option1": "Sarah", "option2": "Maria", "answer": "2"},
        {"sentence": "broken row without a blank", "option1": "a", "option2": "b", "answer": "1"},
    ]
    with pytest.warns(UserWarning, match="skipped 1 malformed"):
        task = load_task("winogrande", tmp_path, online=True)  # tmp_path has no local file
    assert calls == [("allenai/winogrande", "winogrande_xl", "validation")]
    assert task.source.startswith("hf:allenai/winogrande")
    assert task.build_requests(task.docs[0]) == [
        ("Sarah was a better surgeon than Maria so Sarah", " got the easier cases."),
        ("Sarah was a better surgeon than Maria so Maria", " got the easier cases."),
    ]
    assert task.gold(task.docs[0]) == 1


def test_commonsense_qa_letter_answers_and_fewshot_split(tmp_path, fake_hub):
    tables, calls = fake_hub

    def row(q, answer):
        return {"question": f"  {q} ", "answerKey": answer,
                "choices": {"label": ["A", "B", "C", "D", "E"], "text": ["v", "w", "x", "y", "z"]}}

    tables[("tau/commonsense_qa", "validation")] = [row("Where?", "C"), row("Why?", "E")]
    tables[("tau/commonsense_qa", "train")] = [row("Train q?", "B")]
    task = load_task("commonsense_qa", tmp_path, online=True, num_fewshot=1)
    assert [task.gold(d) for d in task.docs] == [2, 4]
    context, cont = task.build_requests(task.docs[0])[0]
    assert cont == " A"
    assert context == ("Question: Train q?\nA. v\nB. w\nC. x\nD. y\nE. z\nAnswer: B\n\n"
                       "Question: Where?\nA. v\nB. w\nC. x\nD. y\nE. z\nAnswer:")
    assert ("tau/commonsense_qa", None, "train") in calls


def test_hub_failure_is_config_error(tmp_path, fake_hub):
    with pytest.raises(ConfigError) as info:
        load_task("piqa", tmp_path, online=True)
    assert info.value.field == "piqa.data.hf" and "baber/piqa" in info.value.problem
