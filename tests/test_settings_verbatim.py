"""Settings files read through jsonargparse keep every string verbatim and report mistakes in one line."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Optional, Union

import pytest
import yaml

from lmlab.data.prepare.config import load_config
from lmlab.errors import ConfigError
from lmlab.settings import read_settings

# strings jsonargparse would read as YAML once more: a comment (None), null, a list, a mapping, quotes, a template
TRICKY = [
    "#### (\\-?[0-9.,]+)",
    "# not a comment",
    "'single quoted'",
    '"double quoted"',
    "{question}\nAnswer: {answer}",
    "{a: 1}",
    "[a, b]",
    "null",
    "~",
    "true",
    "0x10",
    "1e3",
    "^ = [^=].* = $",
]


@dataclass
class _Item:
    name: str
    pattern: Optional[str] = None


@dataclass
class _Section:
    opt: Optional[str] = None
    plain: str = ""
    either: Union[str, list[str], None] = None
    table: dict[str, Any] = field(default_factory=dict)
    items: list[_Item] = field(default_factory=list)
    child: Optional[_Item] = None


@pytest.mark.parametrize("text", TRICKY)
def test_strings_survive_verbatim(text):
    data = {"opt": text, "plain": text, "either": text, "table": {"k": text, "l": [text]},
            "items": [{"name": text, "pattern": text}], "child": {"name": "c", "pattern": text}}
    got = read_settings(_Section, yaml.safe_load(yaml.safe_dump(data)))
    values = [got.opt, got.plain, got.either, got.table["k"], got.table["l"][0], got.items[0].name,
              got.items[0].pattern, got.child.pattern]
    assert values == [text] * len(values)
    assert all(type(v) is str for v in values)  # plain str again, so yaml.safe_dump and json keep working
    yaml.safe_dump(got.table)


def test_lists_and_nulls_still_parse():
    got = read_settings(_Section, {"either": ["a", "b"], "opt": None, "child": None})
    assert got.either == ["a", "b"] and got.opt is None and got.child is None


def test_prepare_yaml_keeps_regexes_and_quotes(tmp_path):
    cfg = {
        "sources": [
            {"name": "web", "path": "a.jsonl", "split_pattern": "#### (\\-?[0-9.,]+)"},
            {"name": "wiki", "path": "b.txt", "split_pattern": "^ = [^=].* = $", "text_field": "'text'",
             "name_config": "null"},
        ],
        "decontaminate": {"enabled": False},
        "quality": {"apply_to": ["#web"], "reference_sources": ["wiki"]},
    }
    p = tmp_path / "mix.yaml"
    p.write_text(yaml.safe_dump(cfg))
    got = load_config(p)
    assert got.sources[0].split_pattern == "#### (\\-?[0-9.,]+)"
    assert got.sources[1].split_pattern == "^ = [^=].* = $"
    assert (got.sources[1].text_field, got.sources[1].name_config) == ("'text'", "null")
    assert got.quality.apply_to == ["#web"]


def test_reference_model_needs_no_reference_tokenizer(tmp_path):
    # the checkpoint carries its tokenizer (open_checkpoint(...).tokenizer())
    p = tmp_path / "mix.yaml"
    p.write_text(yaml.safe_dump({"sources": [{"name": "web", "path": "a.jsonl"}], "decontaminate": {"enabled": False},
                                 "quality": {"reference_model": "runs/x/last.ckpt", "keep_fraction": 0.5}}))
    got = load_config(p)
    assert got.quality.reference_model == "runs/x/last.ckpt" and got.quality.reference_tokenizer is None


@pytest.mark.parametrize(
    "change, field, fix",
    [
        ({"colour": 1}, "colour", "known keys"),
        ({"quality": {"keep_fractio": 0.5}}, "quality.keep_fractio", "keep_fraction"),
        ({"quality": 3}, "quality", "key: value"),
        ({"seed": "x"}, "seed", "int"),
        ({"sources": [{"name": "web", "weight": "heavy"}]}, "sources[0].weight", "float"),
        ({"sources": [{"path": "a.jsonl"}]}, "sources[0].name", "add name"),
        ({"sources": [{"name": "web", "colr": 1}]}, "sources[0].colr", "known keys"),
        ({"engine": {"tasks": "many"}}, "engine.tasks", "int"),
        ({"quality": {"apply_to": "web"}}, "quality.apply_to", "list"),
    ],
)
def test_prepare_mistakes_are_one_line(tmp_path, change, field, fix):
    p = tmp_path / "mix.yaml"
    p.write_text(yaml.safe_dump({"sources": [{"name": "web", "path": "a.jsonl"}], **change}))
    with pytest.raises(ConfigError) as e:
        load_config(p)
    assert e.value.field == field and fix in (e.value.fix or "")
    assert "\n" not in str(e.value)


def test_task_yaml_keeps_regexes_quotes_and_templates(tmp_path):
    from lmlab.eval.spec import load_spec_file

    text = r'''
name: toy_gen
type: generation
data: {path: "'quoted'.jsonl", fields: {query: "{question}\n#", note: "# kept"}}
description: "'{subject}' questions\n\n"
doc_to_text: "Question: {query}\nAnswer:"
doc_to_target: "{answer}"
target_delimiter: "#"
answer: answer
generation: {stop: ["\n#", "null", "Question:"]}
filters:
  - {name: strict-match, regex: "#### (\\-?[0-9\\.\\,]+)", fallback: "null"}
  - {name: flexible-extract, regex: "(-?[$0-9.,]{2,})|(-?[0-9]+)", group_select: -1}
exact_match: {regexes_to_ignore: [",", "\\$", "(?s).*#### "]}
'''
    path = tmp_path / "toy_gen.yaml"
    path.write_text(text, encoding="utf-8")
    spec = load_spec_file(path)
    assert spec.filters[0].regex == "#### (\\-?[0-9\\.\\,]+)" and spec.filters[0].fallback == "null"
    assert spec.filters[1].regex == "(-?[$0-9.,]{2,})|(-?[0-9]+)" and spec.filters[1].group_select == -1
    assert spec.exact_match.regexes_to_ignore == (",", "\\$", "(?s).*#### ")
    assert spec.generation.stop == ("\n#", "null", "Question:")
    assert spec.data.path == "'quoted'.jsonl" and spec.data.fields == {"query": "{question}\n#", "note": "# kept"}
    assert spec.description == "'{subject}' questions\n\n" and spec.doc_to_text == "Question: {query}\nAnswer:"
    assert spec.target_delimiter == "#" and spec.origin == str(path)


def test_builtin_gsm8k_regex_is_read_verbatim():
    from lmlab.eval.tasks import load_spec

    spec = load_spec("gsm8k")
    assert [f.regex for f in spec.filters] == ["#### (\\-?[0-9\\.\\,]+)", "(-?[$0-9.,]{2,})|(-?[0-9]+)"]
    assert "(?s).*#### " in spec.exact_match.regexes_to_ignore


@pytest.mark.parametrize(
    "change, field, fix",
    [
        ({"fewshot": {"nmu": 2}}, "toy.fewshot.nmu", "did you mean num?"),
        ({"fewshot": {"num": "five"}}, "toy.fewshot.num", "int"),
        ({"data": {"path": 5}}, "toy.data.path", "str"),
        ({"data": {"path": "x.jsonl", "hf": {"path": "a/b", "colour": 1}}}, "toy.data.hf.colour", "known keys"),
        ({"exact_match": {"ignore_case": "yes"}}, "toy.exact_match.ignore_case", "bool"),
        ({"doc_to_text": ["a"]}, "toy.doc_to_text", "str"),
    ],
)
def test_task_type_mistakes_are_one_line(change, field, fix):
    from lmlab.eval.spec import parse_spec

    spec = {"name": "toy", "type": "multiple_choice", "data": {"path": "toy.jsonl"}, "doc_to_text": "{query}",
            "doc_to_choice": "choices", "answer": "gold", **change}
    with pytest.raises(ConfigError) as e:
        parse_spec(spec)
    assert e.value.field == field and fix in (e.value.fix or "")
    assert "\n" not in str(e.value)
