"""Named row transforms for data whose raw schema cannot be mapped by renaming alone.

A spec selects one with ``data.transform`` (or ``data.hf.transform``). Each
takes a raw row and returns a new row; raising ``KeyError``/``ValueError``
marks the row malformed (it is then counted and skipped). The preprocessing
mirrors lm-evaluation-harness so prompts are identical to its prompts.
"""

from __future__ import annotations

import re
from collections.abc import Callable
from typing import Any

Row = dict[str, Any]


def mmlu(row: Row) -> Row:
    """MMLU (cais/mmlu schema): strip the question, add a readable ``subject_name``."""
    out = dict(row)
    out["question"] = str(row["question"]).strip()
    out["subject_name"] = str(row["subject"]).replace("_", " ")
    return out


def _hellaswag_clean(text: str) -> str:
    # lm-eval's hellaswag preprocess: WikiHow "[title]" markers become sentence breaks,
    # other bracketed annotations are dropped.
    text = text.strip().replace(" [title]", ". ")
    text = re.sub(r"\[.*?\]", "", text)
    return text.replace("  ", " ")


def hellaswag(row: Row) -> Row:
    """HellaSwag hub schema -> ``query``/``choices``/``gold`` as lm-eval builds them."""
    ctx = row["ctx_a"] + " " + row["ctx_b"].capitalize()
    return {
        "query": _hellaswag_clean(row["activity_label"] + ": " + ctx),
        "choices": [_hellaswag_clean(e) for e in row["endings"]],
        "gold": int(row["label"]),
    }


def winogrande_blank(row: Row) -> Row:
    """WinoGrande hub schema (sentence with ``_``) -> option-filled contexts + shared suffix.

    This is lm-eval's partial scoring: each option fills the blank to form a
    context, and the model scores the text *after* the blank given that context.
    """
    sentence = row["sentence"]
    blank = sentence.index("_")
    options = [row["option1"], row["option2"]]
    return {
        "context_options": [sentence[:blank] + opt for opt in options],
        "continuation": sentence[blank + 1 :].strip(),
        "gold": {"1": 0, "2": 1}[str(row["answer"])],
    }


def lambada_last_word(row: Row) -> Row:
    """LAMBADA hub schema (one ``text``) -> ``context`` and the last word as ``continuation``."""
    words = row["text"].split(" ")
    if len(words) < 2:
        raise ValueError("LAMBADA text has no last word to predict")
    return {"context": " ".join(words[:-1]), "continuation": words[-1]}


def strip_strings(row: Row) -> Row:
    """Strip surrounding whitespace from every top-level string field (lm-eval's ``question.strip()``)."""
    return {k: v.strip() if isinstance(v, str) else v for k, v in row.items()}


TRANSFORMS: dict[str, Callable[[Row], Row]] = {
    "mmlu": mmlu,
    "hellaswag": hellaswag,
    "winogrande_blank": winogrande_blank,
    "lambada_last_word": lambada_last_word,
    "strip_strings": strip_strings,
}
