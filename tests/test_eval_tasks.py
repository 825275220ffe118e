"""Task types on tiny hand-made items whose correct scores are known by construction."""

from __future__ import annotations

import math
import statistics

import numpy as np
import pytest

from fakes import FunctionModel
from lmlab.eval.harness import run_task
from lmlab.eval.tasks import task_from_rows

MC_SPEC = {
    "name": "mc", "type": "multiple_choice", "data": {"path": "unused.jsonl"},
    "doc_to_text": "Question: {q}\nAnswer:", "doc_to_choice": "choices", "answer": "gold",
    "metrics": ["acc", "acc_norm"],
}
# gold is sometimes the shortest, sometimes the longest, sometimes neither
MC_ROWS = [
    {"q": "sky colour?", "choices": ["blue", "green and yellow", "red"], "gold": 0},
    {"q": "2+2?", "choices": ["four", "3", "twenty-two"], "gold": 2},
    {"q": "capital of France?", "choices": ["Paris", "Lyon", "Marseille", "Nice"], "gold": 0},
    {"q": "opposite of up?", "choices": ["down", "sideways", "u"], "gold": 2},
    {"q": "fruit?", "choices": ["apple", "carrot", "potato"], "gold": 0},
]


def _first_argmax(values):
    best = 0
    for i, v in enumerate(values):
        if v > values[best]:
            best = i
    return best


def _score(model, task):
    records = run_task(model, task, task.docs, batch_size=3)
    agg = task.aggregate(records)
    return records, agg


def test_oracle_model_gets_full_accuracy():
    task = task_from_rows(MC_SPEC, MC_ROWS)
    gold = {f"Question: {r['q']}\nAnswer:": " " + r["choices"][r["gold"]] for r in MC_ROWS}
    model = FunctionModel(lambda ctx, cont: (0.0 if gold[ctx] == cont else -7.0, gold[ctx] == cont))
    records, agg = _score(model, task)
    assert agg["acc"] == 1.0 and agg["acc_norm"] == 1.0 and agg["n"] == len(MC_ROWS)
    assert agg["acc_stderr"] == 0.0
    assert [r.log["prediction"] for r in records] == [r["gold"] for r in MC_ROWS]


def test_requests_use_leading_space_continuations():
    task = task_from_rows(MC_SPEC, MC_ROWS[:1])
    assert task.build_requests(task.docs[0]) == [
        ("Question: sky colour?\nAnswer:", " blue"),
        ("Question: sky colour?\nAnswer:", " green and yellow"),
        ("Question: sky colour?\nAnswer:", " red"),
    ]


def test_longest_choice_model_acc_and_acc_norm_differ_as_computed():
    # log-lik = -(number of characters in the continuation): short choices look likely in
    # total, but per character the longest choice wins (-(L+1)/L grows with L).
    task = task_from_rows(MC_SPEC, MC_ROWS)
    model = FunctionModel(lambda ctx, cont: (-float(len(cont)), False))
    _, agg = _score(model, task)
    exp_acc, exp_norm = [], []
    for row in MC_ROWS:
        lls = [-(len(c) + 1.0) for c in row["choices"]]  # " " + choice
        exp_acc.append(float(_first_argmax(lls) == row["gold"]))
        exp_norm.append(float(_first_argmax([ll / len(c) for ll, c in zip(lls, row["choices"])]) == row["gold"]))
    assert agg["acc"] == pytest.approx(sum(exp_acc) / len(exp_acc))
    assert agg["acc_norm"] == pytest.approx(sum(exp_norm) / len(exp_norm))
    assert agg["acc"] != agg["acc_norm"]  # the items were chosen so the two disagree
    assert agg["acc_norm_stderr"] == pytest.approx(statistics.stdev(exp_norm) / math.sqrt(len(exp_norm)))


def test_prefers_longest_choice_model():
    task = task_from_rows(MC_SPEC, MC_ROWS)
    model = FunctionModel(lambda ctx, cont: (float(len(cont)), False))
    _, agg = _score(model, task)
    longest = [max(range(len(r["choices"])), key=lambda i: len(r["choices"][i])) for r in MC_ROWS]
    expected = np.mean([i == r["gold"] for i, r in zip(longest, MC_ROWS)])
    assert agg["acc"] == pytest.approx(expected)


def test_string_labels_and_literal_choices():
    spec = dict(MC_SPEC, doc_to_choice=["A", "B", "C"], answer="key", answer_labels=["A", "B", "C"],
                doc_to_text="{q}\nA. {opts[0]}\nB. {opts[1]}\nC. {opts[2]}\nAnswer:", metrics=["acc"])
    rows = [{"q": "pick", "opts": ["x", "y", "z"], "key": "C"}, {"q": "again", "opts": ["x", "y", "z"], "key": "A"}]
    task = task_from_rows(spec, rows)
    reqs = task.build_requests(task.docs[0])
    assert [c for _, c in reqs] == [" A", " B", " C"]
    assert reqs[0][0] == "pick\nA. x\nB. y\nC. z\nAnswer:"
    model = FunctionModel(lambda ctx, cont: (1.0 if cont == " C" else 0.0, False))
    _, agg = _score(model, task)
    assert agg["acc"] == 0.5


WINO_SPEC = {
    "name": "wino", "type": "multiple_choice", "data": {"path": "unused.jsonl"},
    "doc_to_contexts": "context_options", "doc_to_target": "{continuation}", "answer": "gold",
    "metrics": ["acc"],
}
WINO_ROWS = [
    {"context_options": ["The trophy didn't fit in the suitcase because the trophy",
                         "The trophy didn't fit in the suitcase because the suitcase"],
     "continuation": "was too big.", "gold": 0},
    {"context_options": ["Ann thanked Mary because Ann", "Ann thanked Mary because Mary"],
     "continuation": "had helped her.", "gold": 1},
    {"context_options": ["Tom beat Bob because Tom", "Tom beat Bob because Bob"],
     "continuation": "was weaker.", "gold": 1},
]


def test_winogrande_partial_scoring_requests():
    task = task_from_rows(WINO_SPEC, WINO_ROWS)
    reqs = task.build_requests(task.docs[0])
    # the suffix after the blank is scored given each option-filled prefix
    assert reqs == [
        ("The trophy didn't fit in the suitcase because the trophy", " was too big."),
        ("The trophy didn't fit in the suitcase because the suitcase", " was too big."),
    ]


def test_winogrande_partial_scoring_accuracy():
    # the model likes contexts ending in a particular word
    liked = {"trophy", "Ann", "Tom"}
    model = FunctionModel(lambda ctx, cont: (0.0 if ctx.split()[-1] in liked else -1.0, False))
    task = task_from_rows(WINO_SPEC, WINO_ROWS)
    records, agg = _score(model, task)
    expected = [float(next(i for i, c in enumerate(r["context_options"]) if c.split()[-1] in liked) == r["gold"])
                for r in WINO_ROWS]
    assert agg["acc"] == pytest.approx(sum(expected) / len(expected))
    assert expected == [1.0, 0.0, 0.0]
    assert records[0].log["prompt"] == WINO_ROWS[0]["context_options"]


def test_winogrande_fewshot_example_is_gold_filled_sentence():
    task = task_from_rows(WINO_SPEC, WINO_ROWS, num_fewshot=1, seed=3)
    reqs = task.build_requests(task.docs[0])
    example = task.sampler.select(task.docs[0])[0]
    row = WINO_ROWS[example.id]
    prefix = row["context_options"][row["gold"]] + " " + row["continuation"] + "\n\n"
    assert example.id != 0
    assert [ctx for ctx, _ in reqs] == [prefix + c for c in WINO_ROWS[0]["context_options"]]


CLOZE_SPEC = {
    "name": "cloze", "type": "cloze", "data": {"path": "unused.jsonl"},
    "doc_to_text": "{context}", "answer": "continuation", "metrics": ["perplexity", "acc"],
}
CLOZE_ROWS = [
    {"context": "The cat sat on the", "continuation": "mat"},
    {"context": "She opened the", "continuation": "door"},
    {"context": "He drank a glass of", "continuation": "water"},
    {"context": "They walked to the", "continuation": "station"},
]


def test_cloze_accuracy_is_greedy_and_perplexity_of_last_word():
    known = {"mat", "water"}
    model = FunctionModel(lambda ctx, cont: (-0.5 * len(cont), cont.strip() in known))
    task = task_from_rows(CLOZE_SPEC, CLOZE_ROWS)
    records, agg = _score(model, task)
    assert model.ll_requests[0] in {(r["context"], " " + r["continuation"]) for r in CLOZE_ROWS}
    lls = [-0.5 * (len(r["continuation"]) + 1) for r in CLOZE_ROWS]
    assert agg["acc"] == pytest.approx(2 / 4)
    assert agg["perplexity"] == pytest.approx(math.exp(-sum(lls) / len(lls)))
    assert agg["perplexity_stderr"] is not None and agg["perplexity_stderr"] > 0
    assert [r.log["correct"] for r in records] == [True, False, True, False]


GSM_SPEC = {
    "name": "gsm", "type": "generation", "data": {"path": "unused.jsonl"},
    "doc_to_text": "Question: {question}\nAnswer:", "doc_to_target": "{answer}", "answer": "answer",
    "generation": {"max_new_tokens": 64, "stop": ["Question:"]},
    "filters": [
        {"name": "strict-match", "regex": "#### (\\-?[0-9\\.\\,]+)"},
        {"name": "flexible-extract", "regex": "(-?[$0-9.,]{2,})|(-?[0-9]+)", "group_select": -1},
    ],
    "exact_match": {"ignore_case": True, "regexes_to_ignore": [",", "\\$", "(?s).*#### ", "\\.$"]},
}
GSM_ROWS = [
    {"question": "1+1?", "answer": "1+1=2\n#### 2"},
    {"question": "10*100?", "answer": "10*100=1000\n#### 1,000"},
    {"question": "5-7?", "answer": "5-7=-2\n#### -2"},
    {"question": "3*3?", "answer": "3*3=9\n#### 9"},
]
GSM_OUTPUTS = {
    "1+1?": " 1+1=2\n#### 2\n\nQuestion: what next",  # right, and the stop string cuts the rest
    "10*100?": " It is 1000. The answer is $1,000.",  # right only for flexible extraction
    "5-7?": " 5-7=2\n#### 2",  # wrong
    "3*3?": " #### 9.",  # right for both (the final "." is ignored)
}


def _gsm_model():
    def gen(prompt: str) -> str:
        question = prompt.rsplit("Question: ", 1)[1].split("\n", 1)[0]
        return GSM_OUTPUTS[question]
    return FunctionModel(generate_fn=gen)


def test_generation_strict_and_flexible_exact_match():
    task = task_from_rows(GSM_SPEC, GSM_ROWS)
    model = _gsm_model()
    records, agg = _score(model, task)
    assert agg["exact_match,strict-match"] == pytest.approx(2 / 4)
    assert agg["exact_match,flexible-extract"] == pytest.approx(3 / 4)
    assert "exact_match_stderr,strict-match" in agg
    assert model.gen_settings[0] == (64, ["Question:"])
    assert records[0].log["output"] == " 1+1=2\n#### 2\n\n"
    assert records[1].log["prediction"] == {"strict-match": "[invalid]", "flexible-extract": "$1,000."}


def test_generation_fewshot_prompt_layout_and_determinism():
    task = task_from_rows(GSM_SPEC, GSM_ROWS, num_fewshot=2, seed=7)
    prompt = task.build_requests(task.docs[1])[0]
    examples = task.sampler.select(task.docs[1])
    assert len(examples) == 2 and all(e.id != 1 for e in examples)
    expected = "".join(
        f"Question: {GSM_ROWS[e.id]['question']}\nAnswer: {GSM_ROWS[e.id]['answer']}\n\n" for e in examples
    ) + "Question: 10*100?\nAnswer:"
    assert prompt == expected
    again = task_from_rows(GSM_SPEC, GSM_ROWS, num_fewshot=2, seed=7)
    assert again.build_requests(again.docs[1]) == [prompt]
    # a different seed gives a different draw for at least one doc
    other = task_from_rows(GSM_SPEC, GSM_ROWS, num_fewshot=2, seed=8)
    assert any(
        [e.id for e in other.sampler.select(d)] != [e.id for e in task.sampler.select(d)] for d in task.docs
    )


def test_first_n_fewshot_grouped_by_field_with_description():
    spec = dict(MC_SPEC, description="About {topic}.\n\n",
                fewshot={"num": 2, "sampler": "first_n", "group_by": "topic"}, metrics=["acc"])
    rows = [dict(r, topic="t1") for r in MC_ROWS[:2]]
    pool = [
        {"q": "p1", "choices": ["a", "b"], "gold": 1, "topic": "t2"},
        {"q": "p2", "choices": ["a", "b"], "gold": 0, "topic": "t1"},
        {"q": "p3", "choices": ["a", "b"], "gold": 1, "topic": "t1"},
        {"q": "p4", "choices": ["a", "b"], "gold": 0, "topic": "t1"},
    ]
    task = task_from_rows(spec, rows, fewshot_rows=pool)
    ctx = task.build_requests(task.docs[0])[0][0]
    assert ctx == ("About t1.\n\nQuestion: p2\nAnswer: a\n\nQuestion: p3\nAnswer: b\n\n"
                   "Question: sky colour?\nAnswer:")
