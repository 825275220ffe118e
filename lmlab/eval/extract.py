"""Answer extraction from generated text (GSM8K-style numbers, MATH-style ``\\boxed{}``).

The regex filter reproduces lm-evaluation-harness's ``regex`` filter exactly:
``findall``, pick match ``group_select`` (0 first, -1 last), and when the
pattern has several groups take the first non-empty one; no match gives the
fallback ``"[invalid]"``.
"""

from __future__ import annotations

import re
from collections.abc import Sequence

from lmlab.eval.spec import FilterSpec

#: lm-eval gsm8k "strict-match": the number after the dataset's ``#### `` marker.
GSM8K_STRICT = r"#### (\-?[0-9\.\,]+)"
#: lm-eval gsm8k "flexible-extract" (used with group_select=-1: the last number in the text).
GSM8K_FLEXIBLE = r"(-?[$0-9.,]{2,})|(-?[0-9]+)"
#: lm-eval gsm8k-cot "strict-match": chain-of-thought answers end "The answer is N.".
ANSWER_IS = r"The answer is (\-?[0-9\.\,]+)."
FALLBACK = "[invalid]"


def regex_extract(text: str, pattern: str, group_select: int = 0, fallback: str = FALLBACK) -> str:
    """lm-eval's regex filter on one response."""
    matches = re.findall(pattern, text)
    if not matches:
        return fallback
    try:
        match = matches[group_select]
    except IndexError:
        return fallback
    if isinstance(match, tuple):  # several groups: the first that matched
        nonempty = [m for m in match if m]
        if not nonempty:
            return fallback
        match = nonempty[0]
    return match.strip()


def extract_strict(text: str) -> str:
    """GSM8K strict extraction: the number after ``#### `` (first occurrence)."""
    return regex_extract(text, GSM8K_STRICT, 0)


def extract_flexible(text: str) -> str:
    """GSM8K flexible extraction: the last number-like span in the text."""
    return regex_extract(text, GSM8K_FLEXIBLE, -1)


def extract_answer_is(text: str) -> str:
    """Chain-of-thought extraction: the number in "The answer is N."."""
    return regex_extract(text, ANSWER_IS, 0)


def gsm8k_reference(answer: str) -> str:
    """The final number of a GSM8K solution (``... #### 1,234`` -> ``1234``)."""
    return answer.split("####")[-1].strip().replace(",", "")


def extract_boxed(text: str) -> str | None:
    """Contents of the last ``\\boxed{...}`` (or ``\\fbox{...}``), braces balanced; None if absent."""
    start = max(text.rfind("\\boxed"), text.rfind("\\fbox"))
    if start < 0:
        return None
    i = text.find("{", start)
    if i < 0:
        # "\boxed 5" form: the token after the command
        tail = text[start:].split(None, 1)
        return tail[1].split("$")[0].strip() if len(tail) == 2 else None
    depth = 0
    for j in range(i, len(text)):
        if text[j] == "{":
            depth += 1
        elif text[j] == "}":
            depth -= 1
            if depth == 0:
                return text[i + 1 : j]
    return None  # unbalanced: treat as no answer


def normalize_math_answer(answer: str) -> str:
    """Light LaTeX normalisation for comparing MATH answers (spacing, ``\\left``, ``dfrac``, ``$``)."""
    s = answer.strip().strip("$").strip()
    s = re.sub(r"\\text\{\s*([^}]*)\}", r"\1", s)
    for old, new in (("\\left", ""), ("\\right", ""), ("\\!", ""), ("\\,", ""), ("\\;", ""),
                     ("dfrac", "frac"), ("tfrac", "frac"), ("^\\circ", ""), ("^{\\circ}", "")):
        s = s.replace(old, new)
    s = re.sub(r"\s+", "", s)
    s = s.rstrip(".")
    if re.fullmatch(r"-?\d+\.0+", s):
        s = s.split(".")[0]
    return s


def truncate_at_stop(text: str, stop: Sequence[str]) -> str:
    """Cut ``text`` before the earliest occurrence of any stop string."""
    cut = len(text)
    for s in stop:
        if s:
            i = text.find(s)
            if 0 <= i < cut:
                cut = i
    return text[:cut]


def apply_filter(spec: FilterSpec, text: str) -> str:
    """Run one configured extraction step on a generation."""
    if spec.function == "regex":
        assert spec.regex is not None  # guaranteed by spec validation
        return regex_extract(text, spec.regex, spec.group_select, spec.fallback)
    if spec.function == "boxed":
        boxed = extract_boxed(text)
        return spec.fallback if boxed is None else normalize_math_answer(boxed)
    return text  # "none": the raw generation
