"""Judgments that do not come from the web page: a JSONL file, or a reward model acting as judge.

JSONL: one object per line with ``model_a``, ``model_b``, ``overall`` (``"a"``
means ``model_a`` was preferred), optional ``helpfulness`` / ``harmlessness`` /
``honesty`` and ``annotator``, and either ``pair_id`` (a pair of the database)
or ``prompt`` (text or messages; the pair id is derived from it). Other keys
(responses, rationales) are ignored. Every line is checked; the first bad one
is reported with its line number.

Reward model: any ``score(prompt, response) -> float``. The response with the
higher score wins ``overall``; scores within ``tie_margin`` tie. A reward model
says nothing about the separate axes, so they stay unjudged.
"""

from __future__ import annotations

import json
import math
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path
from typing import Any

from lmlab.errors import ConfigError
from lmlab.eval.compare.pairs import Pair, check_model_name, pair_id, parse_prompt
from lmlab.eval.compare.schema import MAX_ANNOTATOR_LEN, Judgment, judgment_from_mapping
from lmlab.eval.compare.store import JudgmentStore

Scorer = Callable[[str, str], float]

__all__ = ["Scorer", "read_jsonl_judgments", "judge_with_scorer", "load_reward_scorer"]


def _judgment_from_record(
    rec: Any, where: str, pairs: Mapping[str, Pair] | None, models: Sequence[str] | None
) -> Judgment:
    if not isinstance(rec, Mapping):
        raise ConfigError(where, f"expected a JSON object, got {type(rec).__name__}", 'write {"model_a": ..., "model_b": ..., "overall": "a"}')
    names = []
    for key in ("model_a", "model_b"):
        value = rec.get(key)
        if not isinstance(value, str):
            raise ConfigError(f"{where}.{key}", "missing or not a string", "name the model shown on that side")
        check_model_name(value, f"{where}.{key}")
        if models is not None and value not in models:
            raise ConfigError(f"{where}.{key}", f"unknown model {value!r}", f"the compared models are {list(models)}")
        names.append(value)
    a, b = names
    if a == b:
        raise ConfigError(f"{where}.model_b", f"same model as model_a ({a!r})", "compare two different models")
    if "pair_id" in rec:
        pid = rec["pair_id"]
        if not isinstance(pid, str) or not pid:
            raise ConfigError(f"{where}.pair_id", "must be a non-empty string", "copy it from the pairs of the database")
        if pairs is not None:
            pair = pairs.get(pid)
            if pair is None:
                raise ConfigError(f"{where}.pair_id", f"unknown pair {pid!r}", "use a pair id of this --db, or give 'prompt' instead")
            if {pair.model_a, pair.model_b} != {a, b}:
                raise ConfigError(f"{where}.pair_id", f"pair {pid!r} compares {pair.model_a} and {pair.model_b}, not {a} and {b}", "fix model_a/model_b")
    elif "prompt" in rec:
        pid = pair_id(parse_prompt({"prompt": rec["prompt"]}, f"{where}.prompt").id, a, b)
    else:
        raise ConfigError(where, "needs 'pair_id' or 'prompt'", "say which comparison was judged")
    annotator = rec.get("annotator", "")
    if not isinstance(annotator, str) or len(annotator) > MAX_ANNOTATOR_LEN:
        raise ConfigError(f"{where}.annotator", f"must be a string of at most {MAX_ANNOTATOR_LEN} characters", "shorten it")
    try:
        return judgment_from_mapping(rec, pair_id=pid, model_a=a, model_b=b, source="jsonl", annotator=annotator)
    except ConfigError as e:
        raise ConfigError(f"{where}.{e.field}", e.problem, e.fix) from None


def read_jsonl_judgments(
    path: str | Path,
    pairs: Mapping[str, Pair] | None = None,
    models: Sequence[str] | None = None,
    field: str = "--judgments",
) -> list[Judgment]:
    """Read and check a judgments file (see the module docstring), in file order.

    ``pairs`` (pairs of a database) lets ``pair_id`` references be checked;
    ``models`` restricts the model names allowed.
    """
    p = Path(path).expanduser()
    if not p.is_file():
        raise ConfigError(field, f"{p} does not exist", "give a .jsonl file of judgments")
    out = []
    with p.open(encoding="utf-8") as fh:
        for n, line in enumerate(fh, 1):
            if not line.strip():
                continue
            where = f"{p.name}:{n}"
            try:
                rec = json.loads(line)
            except json.JSONDecodeError as e:
                raise ConfigError(field, f"{where} is not valid JSON ({e.msg})", "write one JSON object per line") from None
            out.append(_judgment_from_record(rec, where, pairs, models))
    if not out:
        raise ConfigError(field, f"{p} holds no judgments", "add at least one line")
    return out


def judge_with_scorer(
    store: JudgmentStore, pairs: Sequence[Pair], score: Scorer, tie_margin: float = 0.0, annotator: str = ""
) -> int:
    """Judge every pair not yet judged by this scorer (stored as source ``reward-model``); returns how many were added."""
    if not tie_margin >= 0:
        raise ConfigError("--tie_margin", f"must be >= 0, got {tie_margin}", "use 0 for strict preferences")
    done = store.judged_ids("reward-model", annotator)
    added = 0
    for pair in pairs:
        if pair.pair_id in done:
            continue
        sa, sb = float(score(pair.prompt, pair.response_a)), float(score(pair.prompt, pair.response_b))
        if not (math.isfinite(sa) and math.isfinite(sb)):
            raise ConfigError("--reward_model", f"scored pair {pair.pair_id} as {sa}, {sb}", "check the reward checkpoint")
        overall = "tie" if abs(sa - sb) <= tie_margin else ("a" if sa > sb else "b")
        store.add_judgment(Judgment(pair.pair_id, pair.model_a, pair.model_b, overall, source="reward-model", annotator=annotator))
        added += 1
    return added


def load_reward_scorer(path: str | Path, tokenizer: Any = None, device: str | None = None) -> Scorer:
    """``score(prompt, response)`` from a reward checkpoint (a :class:`~lmlab.models.ScalarModel`).

    The pair is rendered as a user turn and an assistant turn in the project's
    chat format, tokenized like reward-model training data, and cut to the
    model's context length; the score is the head's value at the last token.
    ``tokenizer``: a loaded tokenizer, its path, or ``None`` for the one the
    checkpoint records.
    """
    import torch

    from lmlab.data.posttrain.chat import tokenize_chat
    from lmlab.models.checkpoint import open_checkpoint

    ckpt = open_checkpoint(path, "--reward_model")
    model = ckpt.scalar_model()
    tok = ckpt.tokenizer(tokenizer)
    dev = torch.device(device or ("cuda" if torch.cuda.is_available() else "cpu"))
    model.to(dev).eval()
    max_len = model.config.max_seq_len

    @torch.no_grad()
    def score(prompt: str, response: str) -> float:
        messages = [{"role": "user", "content": prompt}, {"role": "assistant", "content": response}]
        ids, _ = tokenize_chat(tok, messages, target_start=None)
        ids = ids[:max_len]
        x = torch.tensor([ids], dtype=torch.long, device=dev)
        return float(model.score_last(x, torch.ones_like(x)).item())

    return score
