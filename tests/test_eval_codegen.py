"""Code tasks end to end: generated code is executed, failures are recorded, pass@k is computed."""

from __future__ import annotations

import gzip
import json
import math
from collections import Counter

import pytest

from fakes import FunctionModel
from lmlab.eval.harness import evaluate, run_task
from lmlab.eval.sandbox import sandbox_problem
from lmlab.eval.tasks import task_from_rows

# code tasks refuse to execute without the OS sandbox (tests/test_eval_sandbox.py covers the refusal)
pytestmark = pytest.mark.skipif(sandbox_problem() is not None, reason=f"no sandbox: {sandbox_problem()}")

CODE_SPEC = {
    "name": "toy_code", "type": "code", "data": {"path": "unused.jsonl"},
    "doc_to_text": "{prompt}", "answer": "test", "target_delimiter": "",
    "generation": {"max_new_tokens": 128, "stop": ["\ndef", "\nif"]},
    "code": {"program": "{prompt}{completion}\n{test}\ncheck({entry_point})\n", "timeout_s": 2.0,
             "memory_mb": 256, "num_samples": 4, "workers": 2},
    "metrics": ["pass@1", "pass@2", "pass@4"],
}
ROWS = [
    {"prompt": "def double(x):\n", "entry_point": "double",
     "test": "def check(f):\n    assert f(2) == 4\n    assert f(-1) == -2\n"},
    {"prompt": "def square(x):\n", "entry_point": "square",
     "test": "def check(f):\n    assert f(3) == 9\n"},
    {"prompt": "def neg(x):\n", "entry_point": "neg",
     "test": "def check(f):\n    assert f(5) == -5\n"},
]
# four samples per problem, with a known number of correct ones (2, 1 and 0)
SAMPLES = {
    "def double(x):\n": ["    return 2 * x\n", "    return x + x\ndef extra():\n    pass", "    return x\n",
                         "    while True:\n        pass\n"],
    "def square(x):\n": ["    return x ** 2\n", "    return x * 2\n", "    return open('/etc/passwd').read()\n",
                         "    return 0\n"],
    "def neg(x):\n": ["    return x\n", "    return abs(x)\n", "    import socket; socket.socket()\n",
                      "    return None\n"],
}
CORRECT = {"def double(x):\n": 2, "def square(x):\n": 1, "def neg(x):\n": 0}


def _sampling_model():
    seen: Counter[str] = Counter()

    def gen(prompt: str) -> str:
        i = seen[prompt]
        seen[prompt] += 1
        return SAMPLES[prompt][i]

    return FunctionModel(generate_fn=gen)


def _unbiased(n: int, c: int, k: int) -> float:
    return 1.0 - math.comb(n - c, k) / math.comb(n, k)


def test_pass_at_k_over_executed_samples():
    task = task_from_rows(CODE_SPEC, ROWS)
    model = _sampling_model()
    records = run_task(model, task, task.docs, batch_size=8)
    agg = task.aggregate(records)
    for k in (1, 2, 4):
        expected = sum(_unbiased(4, CORRECT[r["prompt"]], k) for r in ROWS) / len(ROWS)
        assert agg[f"pass@{k}"] == pytest.approx(expected)
    assert [r.log["num_passed"] for r in records] == [2, 1, 0]
    statuses = records[0].log["statuses"]
    assert statuses == ["passed", "passed", "failed", "timed_out"]  # the hang is recorded, the run goes on
    assert records[0].log["completions"][1] == "    return x + x"  # cut at the stop string
    # /etc/passwd is not in the sandbox's file system at all
    assert records[1].log["statuses"][2] == "failed" and "FileNotFoundError" in records[1].log["reasons"][2]
    assert records[2].log["isolation"] == "bwrap"


@pytest.mark.shared_data
def test_humaneval_canonical_solutions_pass_and_broken_ones_fail(shared_data, tmp_path):
    with gzip.open(shared_data / "eval" / "HumanEval.jsonl.gz", "rt", encoding="utf-8") as fh:
        problems = [json.loads(next(fh)) for _ in range(3)]
    solutions = {p["prompt"]: p["canonical_solution"] for p in problems}
    good = FunctionModel(generate_fn=lambda prompt: solutions[prompt])
    out = evaluate(good, ["humaneval"], data_dir=shared_data / "eval", limit=3, output_dir=tmp_path, progress=False)
    assert out["results"]["humaneval"]["pass@1"] == 1.0 and out["results"]["humaneval"]["n"] == 3
    assert good.gen_settings[0] == (1024, ["\nclass", "\ndef", "\n#", "\nif", "\nprint"])
    bad = FunctionModel(generate_fn=lambda prompt: "    return None\n")
    out = evaluate(bad, ["humaneval"], data_dir=shared_data / "eval", limit=3, progress=False)
    assert out["results"]["humaneval"]["pass@1"] == 0.0
    lines = (tmp_path / "samples_humaneval.jsonl").read_text().splitlines()
    assert [json.loads(line)["statuses"] for line in lines] == [["passed"]] * 3


@pytest.mark.slow
@pytest.mark.shared_data
def test_every_humaneval_canonical_solution_passes_in_the_sandbox(shared_data):
    # the sandbox changes no pass@k: all 164 reference solutions still pass (as before the OS sandbox)
    with gzip.open(shared_data / "eval" / "HumanEval.jsonl.gz", "rt", encoding="utf-8") as fh:
        problems = [json.loads(line) for line in fh]
    solutions = {p["prompt"]: p["canonical_solution"] for p in problems}
    out = evaluate(FunctionModel(generate_fn=lambda prompt: solutions[prompt]), ["humaneval"],
                   data_dir=shared_data / "eval", progress=False)
    assert out["results"]["humaneval"]["n"] == len(problems) == 164
    assert out["results"]["humaneval"]["pass@1"] == 1.0
