"""evaluate(): several tasks, results JSON and sample logs on disk, limits and overrides."""

from __future__ import annotations

import json
import math
import statistics
from pathlib import Path

import pytest
import yaml

from fakes import FunctionModel
from lmlab.eval.harness import evaluate
from lmlab.eval.protocol import LanguageModel

MC_ROWS = [
    {"query": "Q: one", "choices": ["aa", "b", "cccc"], "gold": 2},
    {"query": "Q: two", "choices": ["dd", "eeeee", "f"], "gold": 0},
    {"query": "Q: three", "choices": ["g", "hhh"], "gold": 1},
    {"query": "Q: four", "choices": ["iiiiii", "jj", "k"], "gold": 0},
    {"query": "Q: five", "choices": ["ll", "m"], "gold": 1},
]
GEN_ROWS = [{"question": f"{a}+{b}?", "answer": f"#### {a + b}"} for a, b in [(1, 2), (3, 4), (5, 6), (7, 8)]]


def _setup(tmp_path: Path) -> tuple[Path, Path]:
    data = tmp_path / "data"
    data.mkdir()
    (data / "mc.jsonl").write_text("".join(json.dumps(r) + "\n" for r in MC_ROWS))
    (data / "add.jsonl").write_text("".join(json.dumps(r) + "\n" for r in GEN_ROWS))
    specs = tmp_path / "specs"
    specs.mkdir()
    (specs / "mc.yaml").write_text(yaml.safe_dump({
        "name": "mc", "type": "multiple_choice", "data": {"path": "mc.jsonl"},
        "doc_to_text": "{query}\nAnswer:", "doc_to_choice": "choices", "answer": "gold",
        "metrics": ["acc", "acc_norm"],
    }))
    (specs / "add.yaml").write_text(yaml.safe_dump({
        "name": "add", "type": "generation", "data": {"path": "add.jsonl"},
        "doc_to_text": "Question: {question}\nAnswer:", "answer": "answer",
        "fewshot": {"num": 1}, "generation": {"max_new_tokens": 8, "stop": ["\n"]},
        "filters": [{"name": "strict-match", "regex": "#### (\\-?[0-9\\.\\,]+)"}],
        "exact_match": {"regexes_to_ignore": ["(?s).*#### "]},
    }))
    return data, specs


def _model() -> FunctionModel:
    def gen(prompt: str) -> str:
        a, b = prompt.rsplit("Question: ", 1)[1].split("?")[0].split("+")
        total = int(a) + int(b)
        return f" #### {total if total < 10 else total + 1}\nQuestion: more"  # right only below 10

    # prefers the longest choice
    return FunctionModel(lambda ctx, cont: (float(len(cont)), False), gen)


def test_fake_model_satisfies_the_protocol():
    assert isinstance(_model(), LanguageModel)


def test_evaluate_writes_results_and_sample_logs(tmp_path):
    data, specs = _setup(tmp_path)
    out_dir = tmp_path / "out"
    model = _model()
    out = evaluate(model, [str(specs / "mc.yaml"), str(specs / "add.yaml")], data_dir=data,
                   batch_size=4, seed=11, output_dir=out_dir, progress=False)

    on_disk = json.loads((out_dir / "results.json").read_text())
    assert on_disk["results"] == out["results"]
    assert on_disk["config"]["seed"] == 11 and on_disk["config"]["batch_size"] == 4
    assert sorted(p.name for p in out_dir.iterdir()) == ["results.json", "samples_add.jsonl", "samples_mc.jsonl"]

    # multiple choice: the longest choice wins
    expected = [float(max(range(len(r["choices"])), key=lambda i: len(r["choices"][i])) == r["gold"]) for r in MC_ROWS]
    mc = out["results"]["mc"]
    assert mc["n"] == 5 and mc["acc"] == pytest.approx(sum(expected) / 5)
    assert mc["acc_stderr"] == pytest.approx(statistics.stdev(expected) / math.sqrt(5))

    samples = [json.loads(line) for line in (out_dir / "samples_mc.jsonl").read_text().splitlines()]
    assert [s["doc_id"] for s in samples] == list(range(5))
    for s, row, ok in zip(samples, MC_ROWS, expected):
        assert s["prompt"] == row["query"] + "\nAnswer:"
        assert s["choices"] == row["choices"] and s["target"] == row["gold"]
        assert s["scores"] == [float(len(c) + 1) for c in row["choices"]]
        assert s["correct"] == bool(ok) and s["metrics"]["acc"] == ok

    # generation: 1-shot prompts, stop at newline, sums >= 10 answered wrong
    add = out["results"]["add"]
    assert add["exact_match,strict-match"] == pytest.approx(2 / 4) and add["num_fewshot"] == 1
    gen_samples = [json.loads(line) for line in (out_dir / "samples_add.jsonl").read_text().splitlines()]
    assert all(s["prompt"].count("Question: ") == 2 for s in gen_samples)
    assert all("\n" not in s["output"] for s in gen_samples)
    assert [s["correct"]["strict-match"] for s in gen_samples] == [True, True, False, False]


def test_limit_and_num_fewshot_override(tmp_path):
    data, specs = _setup(tmp_path)
    model = _model()
    out = evaluate(model, [str(specs / "add.yaml")], data_dir=data, limit=0.5, num_fewshot=0, progress=False)
    assert out["results"]["add"]["n"] == 2 and out["results"]["add"]["num_fewshot"] == 0
    assert all(p.count("Question: ") == 1 for batch in model.gen_batches for p in batch)
    out = evaluate(_model(), [str(specs / "mc.yaml")], data_dir=data, limit=3, progress=False)
    assert out["results"]["mc"]["n"] == 3


def test_same_seed_same_prompts_and_rewrite_is_atomic(tmp_path):
    data, specs = _setup(tmp_path)
    out_dir = tmp_path / "out"
    a, b = _model(), _model()
    evaluate(a, [str(specs / "add.yaml")], data_dir=data, seed=5, output_dir=out_dir, progress=False)
    first = (out_dir / "samples_add.jsonl").read_text()
    evaluate(b, [str(specs / "add.yaml")], data_dir=data, seed=5, output_dir=out_dir, progress=False)
    assert a.gen_batches == b.gen_batches
    assert (out_dir / "samples_add.jsonl").read_text() == first
    assert not [p for p in out_dir.iterdir() if p.name.startswith(".")]  # no temp files left behind


@pytest.mark.shared_data
def test_builtin_tasks_on_shared_data_with_subtasks(shared_data, tmp_path):
    gold = {}
    for line in (shared_data / "eval" / "mmlu_small_icl.jsonl").read_text().splitlines():
        row = json.loads(line)
        gold[row["query"] + "Answer:"] = " " + row["choices"][row["gold"]]
    model = FunctionModel(lambda ctx, cont: (0.0 if gold.get(ctx) == cont else -3.0, False))
    out = evaluate(model, ["mmlu_small"], data_dir=shared_data / "eval", output_dir=tmp_path, progress=False)
    res = out["results"]["mmlu_small"]
    assert res["acc"] == 1.0 and res["n"] == 4
    assert sum(s["n"] for s in res["subtasks"].values()) == 4
    assert all(s["acc"] == 1.0 for s in res["subtasks"].values())
