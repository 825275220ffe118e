"""Post-training data: read instruction, preference and prompt sets; tokenize; collate.

Sources are anything ``datasets`` can load — a hub name, or a local
``.jsonl``/``.json``/``.parquet``/``.csv`` file (optionally compressed) — or an
in-memory ``datasets.Dataset`` / list of dicts. Recognised record formats
(detected from the column names, or forced with ``fmt``):

========================  ==============================================================
``messages``              ``messages`` (or ``conversations``): ``[{role, content}]``;
                          ShareGPT ``{from, value}`` turns are mapped too
``prompt_completion``     ``prompt`` + ``completion`` (or ``response``); strings or
                          message lists
``preference``            ``chosen`` + ``rejected`` (+ optional ``prompt``); strings in
                          the HH-RLHF ``"\\n\\nHuman: ...\\n\\nAssistant: ..."`` convention,
                          plain strings next to a ``prompt`` column, or message lists
``alpaca``                ``instruction`` (+ ``input``) + ``output``; or ``instruction`` +
                          ``instances: [{input, output}]`` (Self-Instruct seed tasks)
``prompt``                ``prompt`` only
========================  ==============================================================

Every format is normalised to messages. Records that cannot be trained on
— identical chosen/rejected, empty responses, prompts over the token budget,
unparseable text — are skipped and counted in a :class:`SkipReport`, which
logs one warning per read; a read that keeps nothing raises ``ConfigError``.
"""

from __future__ import annotations

import logging
import re
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Iterable, Iterator, Literal, Mapping, Sequence

import torch

from lmlab.data.posttrain.chat import IGNORE_INDEX, ROLES, build_sft_example, format_chat, tokenize_chat
from lmlab.errors import ConfigError

log = logging.getLogger(__name__)

Format = Literal["messages", "prompt_completion", "preference", "alpaca", "prompt"]
Messages = list[dict[str, str]]

__all__ = [
    "SkipReport", "load_records", "detect_format", "parse_hh_dialogue",
    "read_sft", "read_preferences", "read_prompts",
    "tokenize_sft", "build_preference_example", "tokenize_preferences",
    "build_prompt_example", "tokenize_prompts",
    "collate_sft", "collate_preferences", "collate_prompts", "pack_sft",
]


# --------------------------------------------------------------------------- skip accounting


@dataclass
class SkipReport:
    """Counts of records read, kept and skipped (per reason), with a few example indices per reason.

    ``truncated`` counts kept items that were cut to fit the length limit.
    """

    what: str = "records"
    seen: int = 0
    kept: int = 0
    counts: Counter = field(default_factory=Counter)
    examples: dict[str, list[int]] = field(default_factory=dict)
    truncated: int = 0  # kept, but cut to fit

    @property
    def skipped(self) -> int:
        """Total number of skipped records."""
        return sum(self.counts.values())

    def keep(self) -> None:
        """Record one kept item."""
        self.seen += 1
        self.kept += 1

    def skip(self, reason: str, index: int | None = None) -> None:
        """Record one skipped item and why."""
        self.seen += 1
        self.counts[reason] += 1
        if index is not None:
            bucket = self.examples.setdefault(reason, [])
            if len(bucket) < 5:
                bucket.append(index)

    def summary(self) -> str:
        """One line: kept/seen and the count per reason."""
        reasons = ", ".join(f"{r}={n}" for r, n in sorted(self.counts.items()))
        return f"{self.what}: kept {self.kept}/{self.seen}" + (f"; skipped {reasons}" if reasons else "")

    def warn(self) -> None:
        """Log the summary as a warning when anything was skipped."""
        if self.skipped:
            hints = "; ".join(f"{r} e.g. records {idx}" for r, idx in sorted(self.examples.items()))
            log.warning("%s (%s)", self.summary(), hints)

    def finish(self, field_name: str = "source") -> None:
        """Warn about skips; raise ``ConfigError`` if nothing was kept."""
        self.warn()
        if self.seen and not self.kept:
            raise ConfigError(field_name, f"no usable {self.what} ({self.summary()})", "check the data format and length limits")


class _Skip(Exception):
    """A record (not the whole source) is unusable; caught and counted by the readers."""

    def __init__(self, reason: str):
        super().__init__(reason)
        self.reason = reason


# --------------------------------------------------------------------------- loading


_BUILDERS = {".jsonl": "json", ".json": "json", ".parquet": "parquet", ".csv": "csv"}
_COMPRESSED = {".gz", ".bz2", ".xz", ".zst", ".zip"}


def load_records(
    source: str | Path | Any,
    split: str = "train",
    name: str | None = None,
    limit: int | None = None,
) -> Any:
    """Load ``source`` as a ``datasets.Dataset``.

    ``source`` is a local file, a hub dataset name (with config ``name`` and
    ``split``), a ``Dataset``, or a list of dicts. ``limit`` keeps the first rows.
    """
    import datasets

    if isinstance(source, datasets.Dataset):
        ds = source
    elif isinstance(source, (list, tuple)):
        ds = datasets.Dataset.from_list(list(source))
    else:
        path = Path(source)
        suffixes = [s for s in path.suffixes if s not in _COMPRESSED]
        builder = _BUILDERS.get(suffixes[-1].lower()) if suffixes else None
        if path.is_file():
            if builder is None:
                raise ConfigError("source", f"cannot tell the format of {path}", "use a .jsonl, .json, .parquet or .csv file")
            if path.stat().st_size == 0:  # the datasets loader would fail with a bare StopIteration
                raise ConfigError("source", f"{path} is empty (no records)", "point it at a file with records")
            ds = datasets.load_dataset(builder, data_files=str(path), split="train")
        elif path.is_dir():
            ds = datasets.load_dataset(str(path), name=name, split=split)
        elif builder is not None or str(source).startswith((".", "/", "~")):
            raise ConfigError("source", f"file {path} does not exist", "check the path")
        else:
            ds = datasets.load_dataset(str(source), name=name, split=split)
    if limit is not None:
        ds = ds.select(range(min(limit, len(ds))))
    return ds


def detect_format(columns: Iterable[str]) -> Format:
    """The record format implied by a dataset's column names (see the module table)."""
    cols = set(columns)
    if cols & {"messages", "conversations"}:
        return "messages"
    if {"chosen", "rejected"} <= cols:
        return "preference"
    if "prompt" in cols and cols & {"completion", "response"}:
        return "prompt_completion"
    if "instruction" in cols and cols & {"output", "instances"}:
        return "alpaca"
    if "prompt" in cols:
        return "prompt"
    raise ConfigError(
        "source",
        f"columns {sorted(cols)} match no known format",
        "provide messages, prompt+completion/response, chosen+rejected, instruction+output, or prompt",
    )


# --------------------------------------------------------------------------- normalisation to messages

_HH_TURN = re.compile(r"\n\n(Human|Assistant):[ ]?")
_SHAREGPT_ROLES = {"human": "user", "gpt": "assistant", "user": "user", "assistant": "assistant", "system": "system"}


def parse_hh_dialogue(text: str) -> Messages:
    """Split an HH-RLHF transcript (``"\\n\\nHuman: ...\\n\\nAssistant: ..."``) into messages.

    Raises ``ValueError`` for text that does not follow the convention.
    """
    if text.startswith(("Human:", "Assistant:")):
        text = "\n\n" + text
    parts = _HH_TURN.split(text)
    if parts[0].strip() or len(parts) < 3:
        raise ValueError("text does not start with a 'Human:' or 'Assistant:' turn")
    return [
        {"role": "user" if role == "Human" else "assistant", "content": content.strip()}
        for role, content in zip(parts[1::2], parts[2::2])
    ]


def _is_hh(text: str) -> bool:
    return text.startswith(("Human:", "\n\nHuman:")) or "\n\nHuman:" in text[:200]


def _messages(value: Any) -> Messages:
    """Coerce a list of role/content (or ShareGPT from/value) dicts to clean messages."""
    if not isinstance(value, (list, tuple)) or not value:
        raise _Skip("malformed")
    out = []
    for turn in value:
        if not isinstance(turn, Mapping):
            raise _Skip("malformed")
        if "role" in turn and "content" in turn:
            role, content = turn["role"], turn["content"]
        elif "from" in turn and "value" in turn:
            role, content = _SHAREGPT_ROLES.get(str(turn["from"]).lower()), turn["value"]
        else:
            raise _Skip("malformed")
        if role not in ROLES or not isinstance(content, str):
            raise _Skip("malformed")
        out.append({"role": role, "content": content.strip()})
    return out


def _as_turns(value: Any, role: str) -> Messages:
    if isinstance(value, str):
        return [{"role": role, "content": value.strip()}]
    return _messages(value)


def _prompt_turns(prompt: Any) -> Messages:
    """A prompt column as messages; an HH transcript ending in an empty ``Assistant:`` turn is parsed."""
    if isinstance(prompt, str) and _is_hh(prompt):
        try:
            turns = parse_hh_dialogue(prompt)
        except ValueError:
            raise _Skip("malformed") from None
        if turns[-1]["role"] == "assistant" and not turns[-1]["content"]:
            turns = turns[:-1]
        return turns
    return _as_turns(prompt, "user")


def _check_responses(turns: Messages) -> None:
    assistants = [m for m in turns if m["role"] == "assistant"]
    if not assistants:
        raise _Skip("no_response")
    if any(not m["content"] for m in assistants):
        raise _Skip("empty_response")


def _split_shared_prefix(chosen: Messages, rejected: Messages) -> tuple[Messages, Messages, Messages]:
    k = 0
    while k < min(len(chosen), len(rejected)) and chosen[k] == rejected[k]:
        k += 1
    prompt, c, r = chosen[:k], chosen[k:], rejected[k:]
    if not c and not r:
        raise _Skip("identical_pair")
    if not c or not r:
        raise _Skip("empty_response")
    if not prompt:
        raise _Skip("no_prompt")
    if c[0]["role"] != "assistant" or r[0]["role"] != "assistant":
        raise _Skip("malformed")
    return prompt, c, r


def _preference(record: Mapping[str, Any]) -> dict[str, Messages]:
    chosen, rejected, prompt = record["chosen"], record["rejected"], record.get("prompt")
    if prompt is not None:
        p = _prompt_turns(prompt)
        c, r = _as_turns(chosen, "assistant"), _as_turns(rejected, "assistant")
    elif isinstance(chosen, str) and isinstance(rejected, str):
        if not (_is_hh(chosen) and _is_hh(rejected)):
            raise _Skip("no_prompt")
        try:
            p, c, r = _split_shared_prefix(parse_hh_dialogue(chosen), parse_hh_dialogue(rejected))
        except ValueError:
            raise _Skip("malformed") from None
    else:
        p, c, r = _split_shared_prefix(_messages(chosen), _messages(rejected))
    if not p or all(not m["content"] for m in p):
        raise _Skip("no_prompt")
    _check_responses(c)
    _check_responses(r)
    if c == r:
        raise _Skip("identical_pair")
    return {"prompt": p, "chosen": c, "rejected": r}


def _alpaca_user(instruction: Any, inp: Any) -> str:
    instruction = (instruction or "").strip()
    inp = (inp or "").strip()
    return f"{instruction}\n\n{inp}" if inp else instruction


def _conversations(record: Mapping[str, Any], fmt: Format) -> list[Messages]:
    """All conversations in one record (Self-Instruct seed tasks hold several)."""
    if fmt == "messages":
        return [_messages(record.get("messages", record.get("conversations")))]
    if fmt == "prompt_completion":
        completion = record.get("completion", record.get("response"))
        return [_prompt_turns(record["prompt"]) + _as_turns(completion, "assistant")]
    if fmt == "preference":
        pair = _preference(record)
        return [pair["prompt"] + pair["chosen"]]
    if fmt == "alpaca":
        if record.get("instances") is not None:
            instances = record["instances"] or []
            if not instances:
                raise _Skip("no_response")
            return [
                [{"role": "user", "content": _alpaca_user(record["instruction"], inst.get("input"))},
                 {"role": "assistant", "content": (inst.get("output") or "").strip()}]
                for inst in instances
            ]
        return [[{"role": "user", "content": _alpaca_user(record["instruction"], record.get("input"))},
                 {"role": "assistant", "content": (record.get("output") or "").strip()}]]
    raise _Skip("no_response")


def _prompt_of(record: Mapping[str, Any], fmt: Format) -> Messages:
    if fmt in ("prompt", "prompt_completion") or (fmt == "preference" and record.get("prompt") is not None):
        return _prompt_turns(record["prompt"])
    if fmt == "preference":
        # the responses' quality does not matter for a prompt set: take the chosen transcript's context
        chosen = record["chosen"]
        if isinstance(chosen, str):
            if not _is_hh(chosen):
                raise _Skip("no_prompt")
            try:
                conv = parse_hh_dialogue(chosen)
            except ValueError:
                raise _Skip("malformed") from None
        else:
            conv = _messages(chosen)
    else:
        conv = _conversations(record, fmt)[0]
    # the prompt is everything before the final assistant reply
    while conv and conv[-1]["role"] == "assistant":
        conv = conv[:-1]
    return conv


def _prompt_before_last_reply(messages: Messages) -> Messages:
    last = max(i for i, m in enumerate(messages) if m["role"] == "assistant")
    return messages[:last]


class _PromptBudget:
    """Checks prompt length in tokens, rendered with the generation prompt as the model will see it."""

    def __init__(self, tokenizer: Any | None, max_prompt_tokens: int | None):
        if max_prompt_tokens is not None and tokenizer is None:
            raise ConfigError("max_prompt_tokens", "needs a tokenizer to count tokens", "pass tokenizer=...")
        if max_prompt_tokens is not None and max_prompt_tokens < 1:
            raise ConfigError("max_prompt_tokens", f"must be >= 1, got {max_prompt_tokens}", "use the context length minus room for a response")
        self.tokenizer = tokenizer
        self.limit = max_prompt_tokens

    def check(self, prompt: Messages) -> None:
        if self.limit is None:
            return
        text = format_chat(prompt, add_generation_prompt=True)
        if len(self.tokenizer(text, add_special_tokens=False)["input_ids"]) > self.limit:
            raise _Skip("prompt_too_long")


def _iter_records(source: Any, fmt: Format | None, split: str, limit: int | None) -> tuple[Format, Iterator[Mapping[str, Any]]]:
    ds = load_records(source, split=split, limit=limit)
    detected = detect_format(ds.column_names) if fmt is None else fmt
    if detected not in ("messages", "prompt_completion", "preference", "alpaca", "prompt"):
        raise ConfigError("fmt", f"unknown format {fmt!r}", "use messages, prompt_completion, preference, alpaca or prompt")
    return detected, iter(ds)


def read_sft(
    source: Any,
    *,
    fmt: Format | None = None,
    split: str = "train",
    limit: int | None = None,
    tokenizer: Any | None = None,
    max_prompt_tokens: int | None = None,
) -> tuple[list[dict[str, Messages]], SkipReport]:
    """Read conversations for SFT: returns ``([{"messages": [...]}, ...], report)``.

    Preference data contributes prompt + chosen. Conversations without an
    assistant reply, with an empty one, or whose prompt (before the last
    reply) exceeds ``max_prompt_tokens`` are skipped.
    """
    detected, records = _iter_records(source, fmt, split, limit)
    if detected == "prompt":
        raise ConfigError("source", "holds prompts only; SFT needs responses", "use a dataset with completions, messages or chosen")
    budget = _PromptBudget(tokenizer, max_prompt_tokens)
    report = SkipReport("SFT conversations")
    out: list[dict[str, Messages]] = []
    for i, record in enumerate(records):
        try:
            convs = _conversations(record, detected)
        except _Skip as skip:
            report.skip(skip.reason, i)
            continue
        for conv in convs:
            try:
                _check_responses(conv)
                prompt = _prompt_before_last_reply(conv)
                if not any(m["content"] for m in prompt if m["role"] != "assistant"):
                    raise _Skip("no_prompt")
                budget.check(prompt)
            except _Skip as skip:
                report.skip(skip.reason, i)
                continue
            report.keep()
            out.append({"messages": conv})
    report.finish()
    return out, report


def read_preferences(
    source: Any,
    *,
    split: str = "train",
    limit: int | None = None,
    tokenizer: Any | None = None,
    max_prompt_tokens: int | None = None,
) -> tuple[list[dict[str, Messages]], SkipReport]:
    """Read preference pairs: returns ``([{"prompt", "chosen", "rejected"}, ...], report)``, all message lists.

    ``chosen``/``rejected`` hold only the completion turns; the shared
    conversation before them is the ``prompt``.
    """
    detected, records = _iter_records(source, "preference", split, limit)
    budget = _PromptBudget(tokenizer, max_prompt_tokens)
    report = SkipReport("preference pairs")
    out = []
    for i, record in enumerate(records):
        try:
            pair = _preference(record)
            budget.check(pair["prompt"])
        except _Skip as skip:
            report.skip(skip.reason, i)
            continue
        except KeyError as err:
            raise ConfigError("source", f"preference data needs column {err}", "provide chosen and rejected columns") from None
        report.keep()
        out.append(pair)
    report.finish()
    return out, report


def read_prompts(
    source: Any,
    *,
    fmt: Format | None = None,
    split: str = "train",
    limit: int | None = None,
    tokenizer: Any | None = None,
    max_prompt_tokens: int | None = None,
    keep_columns: Sequence[str] = (),
) -> tuple[list[dict[str, Any]], SkipReport]:
    """Read prompts (for RL rollouts or evaluation) from any format: returns ``([{"prompt": [...], ...}], report)``.

    Columns named in ``keep_columns`` (e.g. a reference ``answer``) are copied
    into each record.
    """
    detected, records = _iter_records(source, fmt, split, limit)
    budget = _PromptBudget(tokenizer, max_prompt_tokens)
    report = SkipReport("prompts")
    out = []
    for i, record in enumerate(records):
        try:
            prompt = _prompt_of(record, detected)
            if not prompt or not any(m["content"] for m in prompt):
                raise _Skip("no_prompt")
            budget.check(prompt)
        except _Skip as skip:
            report.skip(skip.reason, i)
            continue
        report.keep()
        item: dict[str, Any] = {"prompt": prompt}
        for col in keep_columns:
            if col not in record:
                raise ConfigError("keep_columns", f"column {col!r} is not in the data", f"choose from {sorted(record)}")
            item[col] = record[col]
        out.append(item)
    report.finish()
    return out, report


# --------------------------------------------------------------------------- tokenization


def tokenize_sft(
    tokenizer: Any,
    conversations: Iterable[Mapping[str, Any] | Sequence[Mapping[str, str]]],
    max_length: int,
    train_on: Literal["all_assistant", "last_assistant"] = "all_assistant",
) -> tuple[list[dict[str, Any]], SkipReport]:
    """:func:`~lmlab.data.posttrain.chat.build_sft_example` over many conversations, counting skips and truncations.

    Kept examples that had to be cut are counted in ``report.truncated``.
    """
    report = SkipReport("SFT examples")
    truncated = 0
    out = []
    for i, conv in enumerate(conversations):
        messages = conv["messages"] if isinstance(conv, Mapping) else conv
        example, reason = build_sft_example(tokenizer, messages, max_length, train_on=train_on)
        if example is None:
            report.skip(reason or "unknown", i)
            continue
        truncated += example["truncated"]
        report.keep()
        out.append(example)
    report.truncated = truncated
    if truncated:
        log.info("SFT examples: %d of %d truncated to %d tokens", truncated, report.kept, max_length)
    report.finish("max_length")
    return out, report


def build_preference_example(
    tokenizer: Any, pair: Mapping[str, Messages], max_length: int
) -> tuple[dict[str, Any] | None, str | None]:
    """Tokenize a ``{prompt, chosen, rejected}`` pair; labels cover only the completion turns.

    Returns ``(example, None)`` with ``chosen_input_ids``, ``chosen_labels``,
    ``rejected_input_ids``, ``rejected_labels`` (each cut to ``max_length``),
    or ``(None, reason)``: ``"no_target_after_truncation"`` when a side keeps
    no completion token, ``"identical_after_truncation"`` when both sides are
    the same tokens once cut (a zero-information pair).
    """
    if max_length < 2:
        raise ConfigError("max_length", f"must be >= 2, got {max_length}", "use the model's context length")
    prompt = list(pair["prompt"])
    out: dict[str, Any] = {}
    truncated = False
    for side in ("chosen", "rejected"):
        ids, labels = tokenize_chat(tokenizer, prompt + list(pair[side]), target_start=len(prompt))
        truncated |= len(ids) > max_length
        ids, labels = ids[:max_length], labels[:max_length]
        if all(label == IGNORE_INDEX for label in labels):
            return None, "no_target_after_truncation"
        out[f"{side}_input_ids"] = ids
        out[f"{side}_labels"] = labels
    if out["chosen_input_ids"] == out["rejected_input_ids"]:
        return None, "identical_after_truncation"
    out["truncated"] = truncated
    return out, None


def tokenize_preferences(
    tokenizer: Any, pairs: Iterable[Mapping[str, Messages]], max_length: int
) -> tuple[list[dict[str, Any]], SkipReport]:
    """:func:`build_preference_example` over many pairs, counting skips."""
    report = SkipReport("preference examples")
    out = []
    for i, pair in enumerate(pairs):
        example, reason = build_preference_example(tokenizer, pair, max_length)
        if example is None:
            report.skip(reason or "unknown", i)
            continue
        report.keep()
        out.append(example)
    report.finish("max_length")
    return out, report


def build_prompt_example(
    tokenizer: Any, prompt: Sequence[Mapping[str, str]], max_prompt_tokens: int | None = None
) -> tuple[dict[str, Any] | None, str | None]:
    """Token ids of a prompt followed by the generation prompt ``<|assistant|>\\n``.

    Returns ``(None, "prompt_too_long")`` past ``max_prompt_tokens``.
    """
    ids, _ = tokenize_chat(tokenizer, prompt, target_start=None, add_generation_prompt=True)
    if max_prompt_tokens is not None and len(ids) > max_prompt_tokens:
        return None, "prompt_too_long"
    return {"input_ids": ids}, None


def tokenize_prompts(
    tokenizer: Any, records: Iterable[Mapping[str, Any]], max_prompt_tokens: int | None = None
) -> tuple[list[dict[str, Any]], SkipReport]:
    """:func:`build_prompt_example` over ``read_prompts`` records; other keys are carried along."""
    report = SkipReport("prompt examples")
    out = []
    for i, record in enumerate(records):
        example, reason = build_prompt_example(tokenizer, record["prompt"], max_prompt_tokens)
        if example is None:
            report.skip(reason or "unknown", i)
            continue
        report.keep()
        out.append({**{k: v for k, v in record.items() if k != "prompt"}, "prompt": record["prompt"], **example})
    report.finish("max_prompt_tokens")
    return out, report


# --------------------------------------------------------------------------- collation


def _pad_right(rows: Sequence[Sequence[int]], value: int, length: int) -> torch.Tensor:
    out = torch.full((len(rows), length), value, dtype=torch.long)
    for i, row in enumerate(rows):
        out[i, : len(row)] = torch.as_tensor(row, dtype=torch.long)
    return out


def _padded_length(lengths: Iterable[int], multiple: int | None) -> int:
    n = max(lengths, default=0)
    if multiple:
        n = -(-n // multiple) * multiple
    return n


def collate_sft(batch: Sequence[Mapping[str, Any]], pad_id: int, pad_to_multiple_of: int | None = None) -> dict[str, torch.Tensor]:
    """Right-pad SFT examples: ``input_ids``, ``labels`` (``-100`` on padding), ``attention_mask``."""
    length = _padded_length((len(ex["input_ids"]) for ex in batch), pad_to_multiple_of)
    ids = [ex["input_ids"] for ex in batch]
    return {
        "input_ids": _pad_right(ids, pad_id, length),
        "labels": _pad_right([ex["labels"] for ex in batch], IGNORE_INDEX, length),
        "attention_mask": _pad_right([[1] * len(r) for r in ids], 0, length),
    }


def collate_preferences(batch: Sequence[Mapping[str, Any]], pad_id: int, pad_to_multiple_of: int | None = None) -> dict[str, torch.Tensor]:
    """Right-pad chosen and rejected sides to one shared length, so they can be concatenated into one forward pass.

    Keys: ``{chosen,rejected}_{input_ids,labels,attention_mask}``, each ``(B, T)``.
    """
    lengths = [len(ex[f"{side}_input_ids"]) for ex in batch for side in ("chosen", "rejected")]
    length = _padded_length(lengths, pad_to_multiple_of)
    out = {}
    for side in ("chosen", "rejected"):
        ids = [ex[f"{side}_input_ids"] for ex in batch]
        out[f"{side}_input_ids"] = _pad_right(ids, pad_id, length)
        out[f"{side}_labels"] = _pad_right([ex[f"{side}_labels"] for ex in batch], IGNORE_INDEX, length)
        out[f"{side}_attention_mask"] = _pad_right([[1] * len(r) for r in ids], 0, length)
    return out


def collate_prompts(batch: Sequence[Mapping[str, Any]], pad_id: int) -> dict[str, Any]:
    """LEFT-pad prompts for generation, so every prompt ends at the last column and new tokens line up.

    Returns ``input_ids``, ``attention_mask``, and every other key as a list.
    """
    length = max((len(ex["input_ids"]) for ex in batch), default=0)
    ids = torch.full((len(batch), length), pad_id, dtype=torch.long)
    mask = torch.zeros((len(batch), length), dtype=torch.long)
    for i, ex in enumerate(batch):
        n = len(ex["input_ids"])
        if n:
            ids[i, length - n :] = torch.as_tensor(ex["input_ids"], dtype=torch.long)
            mask[i, length - n :] = 1
    out: dict[str, Any] = {"input_ids": ids, "attention_mask": mask}
    for key in batch[0] if batch else ():
        if key not in ("input_ids", "attention_mask"):
            out[key] = [ex[key] for ex in batch]
    return out


def pack_sft(batch: Sequence[Mapping[str, Any]], max_length: int, pad_id: int) -> dict[str, torch.Tensor]:
    """Pack SFT examples into rows of at most ``max_length`` tokens, keeping documents apart.

    First-fit decreasing, deterministic. Returns ``input_ids``, ``labels``,
    ``attention_mask``, ``position_ids`` (restarting at 0 for each example)
    and ``doc_ids`` (index of the example within its row, ``-1`` on padding),
    all ``(R, L)`` with ``R <= len(batch)`` rows. Attention must be
    block-diagonal in ``doc_ids`` (the model's ``doc_ids`` argument). The first
    label of every example is ``-100``: it would otherwise be predicted from
    the previous document's last token.
    """
    for i, ex in enumerate(batch):
        if len(ex["input_ids"]) > max_length:
            raise ConfigError("max_length", f"example {i} has {len(ex['input_ids'])} tokens, more than the packing length {max_length}", "truncate examples to max_length first")
    order = sorted(range(len(batch)), key=lambda i: -len(batch[i]["input_ids"]))
    rows: list[list[int]] = []
    fill: list[int] = []
    for i in order:
        n = len(batch[i]["input_ids"])
        for r, used in enumerate(fill):
            if used + n <= max_length:
                rows[r].append(i)
                fill[r] += n
                break
        else:
            rows.append([i])
            fill.append(n)
    length = max(fill, default=0)
    R = len(rows)
    ids = torch.full((R, length), pad_id, dtype=torch.long)
    labels = torch.full((R, length), IGNORE_INDEX, dtype=torch.long)
    pos = torch.zeros((R, length), dtype=torch.long)
    docs = torch.full((R, length), -1, dtype=torch.long)
    for r, members in enumerate(rows):
        start = 0
        for d, i in enumerate(members):
            ex = batch[i]
            n = len(ex["input_ids"])
            ids[r, start : start + n] = torch.as_tensor(ex["input_ids"], dtype=torch.long)
            lab = torch.as_tensor(ex["labels"], dtype=torch.long).clone()
            lab[0] = IGNORE_INDEX
            labels[r, start : start + n] = lab
            pos[r, start : start + n] = torch.arange(n)
            docs[r, start : start + n] = d
            start += n
    return {"input_ids": ids, "labels": labels, "attention_mask": (docs >= 0).long(), "position_ids": pos, "doc_ids": docs}
