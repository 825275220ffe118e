"""Bad task YAML is a one-line ConfigError; malformed data rows are counted and skipped."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import yaml

from fakes import FunctionModel
from lmlab.errors import ConfigError
from lmlab.eval.data import DataWarning
from lmlab.eval.harness import evaluate
from lmlab.eval.spec import parse_spec
from lmlab.eval.tasks import list_tasks, load_spec, load_task

GOOD = {
    "name": "toy", "type": "multiple_choice", "data": {"path": "toy.jsonl"},
    "doc_to_text": "{query}", "doc_to_choice": "choices", "answer": "gold",
}


def _write_task(tmp_path: Path, spec: dict, rows: list | None = None, raw_lines: list[str] | None = None) -> Path:
    path = tmp_path / f"{spec.get('name', 'toy')}.yaml"
    path.write_text(yaml.safe_dump(spec), encoding="utf-8")
    if rows is not None or raw_lines is not None:
        lines = [json.dumps(r) for r in rows or []] + list(raw_lines or [])
        (tmp_path / "toy.jsonl").write_text("\n".join(lines) + "\n", encoding="utf-8")
    return path


def _error(spec: dict) -> ConfigError:
    with pytest.raises(ConfigError) as info:
        parse_spec(spec)
    assert "\n" not in str(info.value)  # one line for the CLI
    return info.value


def test_all_builtin_specs_parse():
    names = list_tasks()
    for required in ("hellaswag", "arc_easy", "arc_challenge", "piqa", "winogrande", "mmlu", "lambada",
                     "gsm8k", "humaneval"):
        assert required in names
    for name in names:
        spec = load_spec(name)
        assert spec.name == name and spec.answer and spec.metrics


def test_unknown_type():
    err = _error(dict(GOOD, type="essay"))
    assert err.field == "toy.type" and "essay" in err.problem and "multiple_choice" in err.fix


def test_missing_answer_field():
    spec = dict(GOOD)
    del spec["answer"]
    err = _error(spec)
    assert err.field == "toy.answer" and "required" in err.problem


@pytest.mark.parametrize(
    "change,field",
    [
        ({"metrics": ["bleu"]}, "toy.metrics"),
        ({"colour": "red"}, "toy.colour"),
        ({"doc_to_choice": None}, "toy.doc_to_choice"),
        ({"doc_to_text": "{unclosed"}, "toy.doc_to_text"),
        ({"fewshot": {"num": -1}}, "toy.fewshot.num"),
        ({"fewshot": {"sampler": "best"}}, "toy.fewshot.sampler"),
        ({"data": {"path": "x.parquet"}}, "toy.data.format"),
        ({"data": {"path": "x.jsonl", "transform": "nope"}}, "toy.data.transform"),
        ({"data": {}}, "toy.data.path"),
    ],
)
def test_other_spec_mistakes_name_the_key(change, field):
    spec = {k: v for k, v in {**GOOD, **change}.items() if v is not None}
    assert _error(spec).field == field


def test_code_spec_checks():
    code = {"name": "c", "type": "code", "data": {"path": "c.jsonl"}, "doc_to_text": "{prompt}", "answer": "test"}
    assert _error(code).field == "c.code"
    err = _error(dict(code, code={"program": "{prompt}{completion}", "num_samples": 1}, metrics=["pass@5"]))
    assert err.field == "c.code.num_samples"
    assert _error(dict(code, code={"program": "{prompt}"})).field == "c.code.program"


def test_missing_data_file_is_config_error(tmp_path):
    path = _write_task(tmp_path, GOOD)
    with pytest.raises(ConfigError) as info:
        load_task(path, data_dir=tmp_path / "nowhere", online=False)
    assert info.value.field == "toy.data.path"
    assert "not found" in info.value.problem


def test_missing_data_file_mentions_hub_when_configured(tmp_path):
    spec = dict(GOOD, data={"path": "toy.jsonl", "hf": {"path": "org/toy"}})
    with pytest.raises(ConfigError) as info:
        load_task(_write_task(tmp_path, spec), data_dir=tmp_path, online=False)
    assert "online=True" in info.value.fix


def test_invalid_yaml_and_unknown_task(tmp_path):
    bad = tmp_path / "bad.yaml"
    bad.write_text("name: [unclosed\n", encoding="utf-8")
    with pytest.raises(ConfigError, match="invalid YAML"):
        load_task(bad, data_dir=tmp_path)
    with pytest.raises(ConfigError, match="unknown task"):
        load_task("no_such_task", data_dir=tmp_path)


def test_malformed_rows_are_counted_skipped_and_the_run_goes_on(tmp_path):
    rows = [
        {"query": "q0", "choices": ["a", "b"], "gold": 0},
        {"query": "q1", "choices": ["a", "b"]},  # no answer
        {"query": "q2", "choices": ["a", "b"], "gold": 5},  # answer out of range
        {"query": "q3", "choices": "ab", "gold": 0},  # choices not a list
        {"query": "q4", "choices": ["a", "b"], "gold": 1},
    ]
    path = _write_task(tmp_path, GOOD, rows, raw_lines=["{not json", "[1, 2]", ""])
    model = FunctionModel(lambda ctx, cont: (0.0 if cont == " a" else -1.0, False))
    with pytest.warns(DataWarning, match="skipped 5 malformed row"):
        out = evaluate(model, [str(path)], data_dir=tmp_path, progress=False)
    res = out["results"]["toy"]
    assert res["skipped_rows"] == 5 and res["n"] == 2
    assert res["acc"] == pytest.approx(0.5)  # q0 right (a), q4 wrong


def test_all_rows_malformed_is_config_error(tmp_path):
    path = _write_task(tmp_path, dict(GOOD, answer="label"), [{"query": "q", "choices": ["a"], "gold": 0}])
    with pytest.raises(ConfigError, match="no usable rows"), pytest.warns(DataWarning):
        load_task(path, data_dir=tmp_path)


def test_evaluate_rejects_bad_arguments(tmp_path):
    path = _write_task(tmp_path, GOOD, [{"query": "q", "choices": ["a", "b"], "gold": 0}])
    model = FunctionModel(lambda c, x: (0.0, False))
    with pytest.raises(ConfigError, match="limit"):
        evaluate(model, [str(path)], data_dir=tmp_path, limit=0, progress=False)
    with pytest.raises(ConfigError, match="batch_size"):
        evaluate(model, [str(path)], data_dir=tmp_path, batch_size=0, progress=False)
    with pytest.raises(TypeError):
        evaluate(object(), [str(path)], data_dir=tmp_path, progress=False)  # type: ignore[arg-type]
