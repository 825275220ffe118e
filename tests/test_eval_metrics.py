"""Metric arithmetic and answer extraction, checked against independent formulas."""

from __future__ import annotations

import json
import math
import statistics
from fractions import Fraction

import numpy as np
import pytest

from lmlab.eval.extract import (
    apply_filter,
    extract_answer_is,
    extract_boxed,
    extract_flexible,
    extract_strict,
    gsm8k_reference,
    normalize_math_answer,
    regex_extract,
    truncate_at_stop,
)
from lmlab.eval.metrics import (
    bootstrap_stderr,
    exact_match,
    mean_stderr,
    pass_at_k,
    perplexity,
)
from lmlab.eval.spec import FilterSpec

GSM8K_IGNORE = [",", "\\$", "(?s).*#### ", "\\.$"]


@pytest.mark.parametrize(
    "n,c,k",
    [(1, 0, 1), (1, 1, 1), (5, 2, 1), (5, 2, 3), (5, 3, 3), (10, 3, 5), (20, 0, 10),
     (20, 20, 1), (50, 7, 10), (200, 13, 100), (100, 99, 50), (7, 1, 7)],
)
def test_pass_at_k_matches_combinatorial_formula(n, c, k):
    expected = 1 - Fraction(math.comb(n - c, k), math.comb(n, k))  # exact rational arithmetic
    assert pass_at_k(n, c, k) == pytest.approx(float(expected), rel=1e-12, abs=1e-15)


def test_pass_at_1_is_fraction_passed():
    for n in (1, 4, 10):
        for c in range(n + 1):
            assert pass_at_k(n, c, 1) == pytest.approx(c / n)


@pytest.mark.parametrize("n,c,k", [(3, 1, 4), (3, 4, 1), (3, -1, 1), (3, 1, 0)])
def test_pass_at_k_rejects_impossible_arguments(n, c, k):
    with pytest.raises(ValueError):
        pass_at_k(n, c, k)


def test_mean_stderr_is_sample_std_over_sqrt_n():
    values = [1.0, 0.0, 1.0, 1.0, 0.0, 1.0, 0.0]
    expected = statistics.stdev(values) / math.sqrt(len(values))  # stdev uses n-1
    assert mean_stderr(values) == pytest.approx(expected)
    assert mean_stderr([1.0]) is None


def test_perplexity_and_bootstrap_stderr():
    lls = [-1.0, -2.0, -0.5, -3.0, -1.5]
    assert perplexity(lls) == pytest.approx(math.exp(sum(-x for x in lls) / len(lls)))
    se = bootstrap_stderr(perplexity, lls, iters=500, seed=0)
    assert se is not None and se > 0
    assert se == bootstrap_stderr(perplexity, lls, iters=500, seed=0)  # seeded: reproducible
    # the bootstrap stderr of a mean approaches the analytic one
    rng = np.random.default_rng(0)
    xs = rng.normal(size=400).tolist()
    boot = bootstrap_stderr(lambda a: float(np.mean(a)), xs, iters=2000, seed=1)
    assert boot == pytest.approx(mean_stderr(xs), rel=0.1)


def test_exact_match_normalisation_like_lm_eval():
    assert exact_match("1,234", "The total is... #### 1234", regexes_to_ignore=GSM8K_IGNORE)
    assert exact_match("$18.", "#### 18", regexes_to_ignore=GSM8K_IGNORE)
    assert not exact_match("18.5", "#### 18", regexes_to_ignore=GSM8K_IGNORE)
    assert exact_match("Paris", "paris", ignore_case=True)
    assert not exact_match("Paris", "paris")
    assert exact_match("it's", "its", ignore_punctuation=True)


def test_regex_filter_semantics():
    text = "First 12 apples, then 3,400 pears and finally $5."
    assert regex_extract(text, r"(-?[$0-9.,]{2,})|(-?[0-9]+)", group_select=0) == "12"
    assert regex_extract(text, r"(-?[$0-9.,]{2,})|(-?[0-9]+)", group_select=-1) == "$5."
    assert regex_extract("no digits", r"#### (\d+)") == "[invalid]"
    assert regex_extract("a 7 b", r"(-?[$0-9.,]{2,})|(-?[0-9]+)", -1) == "7"  # second group


def test_gsm8k_extraction_on_model_style_outputs():
    out = "Janet has 16 - 3 - 4 = 9 eggs.\nShe makes 9 * 2 = $18.\n#### 18"
    assert extract_strict(out) == "18"
    assert extract_flexible(out) == "18"
    cot = "There are 15 trees. 21 - 15 = 6. The answer is 6."
    assert extract_strict(cot) == "[invalid]"
    assert extract_flexible(cot) == "6."  # lm-eval keeps the dot; exact match strips it
    assert extract_answer_is(cot) == "6"
    assert extract_answer_is("So the answer is 1,000. ok") == "[invalid]"  # case-sensitive, as lm-eval
    assert extract_answer_is("The answer is -1,000.") == "-1,000"
    assert exact_match(extract_flexible(cot), "#### 6", ignore_case=True, regexes_to_ignore=GSM8K_IGNORE)


@pytest.mark.shared_data
def test_gsm8k_extraction_on_real_answers(shared_data):
    path = shared_data / "eval" / "gsm8k_test.jsonl"
    rows = [json.loads(line) for line in path.read_text(encoding="utf-8").splitlines()[:40]]
    for row in rows:
        answer = row["answer"]
        final = answer.rsplit("####", 1)[1].strip()
        assert extract_strict(answer) == final
        assert extract_flexible(answer) == final  # the final number is the last number
        assert gsm8k_reference(answer) == final.replace(",", "")
        assert exact_match(extract_strict(answer), answer, ignore_case=True, regexes_to_ignore=GSM8K_IGNORE)
        wrong = str(int(final.replace(",", "")) + 1)
        assert not exact_match(wrong, answer, ignore_case=True, regexes_to_ignore=GSM8K_IGNORE)


def test_boxed_extraction_and_math_normalisation():
    text = r"so $x = \frac{1}{2}$ and finally \boxed{\dfrac{3}{4}} is it; earlier \boxed{1}"
    assert extract_boxed(text) == "1"  # the last box
    assert extract_boxed(r"answer: \boxed{\frac{a}{\sqrt{b}}} done") == r"\frac{a}{\sqrt{b}}"
    assert extract_boxed("no box here") is None
    assert extract_boxed(r"\boxed{unbalanced") is None
    assert normalize_math_answer(r"\left( 3, \dfrac{1}{2} \right)") == r"(3,\frac{1}{2})"
    assert normalize_math_answer("5.00") == "5"
    boxed = FilterSpec(name="boxed", function="boxed")
    assert apply_filter(boxed, r"We get \boxed{ 10 }.") == "10"
    assert apply_filter(boxed, "no box") == "[invalid]"


def test_truncate_at_stop_uses_earliest_stop():
    assert truncate_at_stop("abc\n\nQuestion: x\nclass", ["\nclass", "Question:"]) == "abc\n\n"
    assert truncate_at_stop("abc", ["zzz", ""]) == "abc"
