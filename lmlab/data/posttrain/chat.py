"""The project's chat format and SFT example construction.

A conversation renders as::

    <|bos|><|system|>\\n{content}<|end|>\\n<|user|>\\n{content}<|end|>\\n<|assistant|>\\n{content}<|end|>\\n

and a generation prompt appends ``<|assistant|>\\n``. The model ends its turn
with ``<|end|>``, so generation should stop on ``<|end|>`` (and ``<|eos|>``,
see :func:`stop_token_ids`).

``CHAT_TEMPLATE`` is the same format as a Jinja template, so
``tokenizer.apply_chat_template`` and :func:`format_chat` agree exactly.

For SFT only the assistant's content and its closing ``<|end|>`` are
trained on; labels are ``-100`` everywhere else. Labels are aligned with
``input_ids`` (the model shifts them), so every label is ``-100`` or the input
id at the same position.
"""

from __future__ import annotations

from typing import Any, Literal, Mapping, Sequence

from lmlab.errors import ConfigError

BOS = "<|bos|>"
EOS = "<|eos|>"
PAD = "<|pad|>"
SYSTEM = "<|system|>"
USER = "<|user|>"
ASSISTANT = "<|assistant|>"
END = "<|end|>"
SPECIAL_TOKENS: tuple[str, ...] = (PAD, BOS, EOS, SYSTEM, USER, ASSISTANT, END)
ROLES: tuple[str, ...] = ("system", "user", "assistant")
IGNORE_INDEX = -100

Message = Mapping[str, str]

CHAT_TEMPLATE = (
    "{{- '<|bos|>' -}}"
    "{%- for message in messages -%}"
    "{%- if message['role'] not in ['system', 'user', 'assistant'] -%}"
    "{{- raise_exception('unknown chat role: ' + message['role']) -}}"
    "{%- endif -%}"
    "{{- '<|' + message['role'] + '|>\\n' + message['content'] + '<|end|>\\n' -}}"
    "{%- endfor -%}"
    "{%- if add_generation_prompt -%}{{- '<|assistant|>\\n' -}}{%- endif -%}"
)

__all__ = [
    "BOS", "EOS", "PAD", "SYSTEM", "USER", "ASSISTANT", "END", "SPECIAL_TOKENS", "ROLES",
    "IGNORE_INDEX", "CHAT_TEMPLATE", "validate_messages", "format_chat", "install_chat_template",
    "stop_token_ids", "chat_segments", "tokenize_chat", "build_sft_example",
]


def validate_messages(messages: Sequence[Message], field: str = "messages") -> None:
    """Raise ``ConfigError`` unless ``messages`` is a list of ``{role, content}`` with known roles and string content."""
    if not isinstance(messages, Sequence) or isinstance(messages, (str, bytes)):
        raise ConfigError(field, f"expected a list of messages, got {type(messages).__name__}", "pass [{'role': ..., 'content': ...}, ...]")
    for i, msg in enumerate(messages):
        if not isinstance(msg, Mapping) or "role" not in msg or "content" not in msg:
            raise ConfigError(f"{field}[{i}]", "a message needs 'role' and 'content'", "pass {'role': 'user', 'content': '...'}")
        if msg["role"] not in ROLES:
            raise ConfigError(f"{field}[{i}].role", f"unknown role {msg['role']!r}", f"use one of {', '.join(ROLES)}")
        if not isinstance(msg["content"], str):
            raise ConfigError(f"{field}[{i}].content", f"content must be a string, got {type(msg['content']).__name__}", "convert it to text")


def _header(role: str) -> str:
    return f"<|{role}|>\n"


def format_chat(messages: Sequence[Message], add_generation_prompt: bool = False) -> str:
    """Render ``messages`` in the project's chat format (identical to ``CHAT_TEMPLATE``)."""
    return "".join(text for text, _ in chat_segments(messages, add_generation_prompt=add_generation_prompt))


def install_chat_template(tokenizer: Any) -> Any:
    """Set ``tokenizer.chat_template`` to :data:`CHAT_TEMPLATE`; returns the tokenizer."""
    tokenizer.chat_template = CHAT_TEMPLATE
    return tokenizer


def stop_token_ids(tokenizer: Any) -> list[int]:
    """Token ids that end a generated assistant turn: ``<|end|>`` and ``<|eos|>`` where the vocabulary has them."""
    ids = []
    for tok in (END, EOS):
        tid = tokenizer.convert_tokens_to_ids(tok)
        if tid is not None and tid != getattr(tokenizer, "unk_token_id", None):
            ids.append(int(tid))
    if not ids:
        raise ConfigError("tokenizer", f"has neither {END} nor {EOS}", "build it with lmlab's special tokens")
    return ids


def chat_segments(
    messages: Sequence[Message],
    add_generation_prompt: bool = False,
    target_start: int | None = 0,
    only_last_assistant: bool = False,
) -> list[tuple[str, bool]]:
    """Split the rendered conversation into ``(text, is_target)`` pieces that join to :func:`format_chat`.

    Targets are the content plus ``<|end|>`` of assistant messages with index
    ``>= target_start`` (``None``: no targets), or only of the last assistant
    message when ``only_last_assistant``.
    """
    validate_messages(messages)
    last_assistant = max((i for i, m in enumerate(messages) if m["role"] == "assistant"), default=-1)
    segments: list[tuple[str, bool]] = [(BOS, False)]
    for i, msg in enumerate(messages):
        is_target = (
            msg["role"] == "assistant"
            and target_start is not None
            and i >= target_start
            and (not only_last_assistant or i == last_assistant)
        )
        if is_target:
            segments.append((_header(msg["role"]), False))
            segments.append((msg["content"] + END, True))
            segments.append(("\n", False))
        else:
            segments.append((_header(msg["role"]) + msg["content"] + END + "\n", False))
    if add_generation_prompt:
        segments.append((_header("assistant"), False))
    return segments


def tokenize_chat(
    tokenizer: Any,
    messages: Sequence[Message],
    target_start: int | None = 0,
    only_last_assistant: bool = False,
    add_generation_prompt: bool = False,
) -> tuple[list[int], list[int]]:
    """Token ids and aligned labels (``-100`` off target) for a conversation.

    Each segment is tokenized on its own, so a response starts on a token
    boundary right after ``<|assistant|>\\n`` — exactly as it does when the
    model generates after a generation prompt.
    """
    ids: list[int] = []
    labels: list[int] = []
    for text, is_target in chat_segments(messages, add_generation_prompt, target_start, only_last_assistant):
        if not text:
            continue
        piece = tokenizer(text, add_special_tokens=False)["input_ids"]
        ids.extend(piece)
        labels.extend(piece if is_target else [IGNORE_INDEX] * len(piece))
    return ids, labels


def build_sft_example(
    tokenizer: Any,
    messages: Sequence[Message],
    max_length: int,
    train_on: Literal["all_assistant", "last_assistant"] = "all_assistant",
    target_start: int = 0,
) -> tuple[dict[str, Any] | None, str | None]:
    """Tokenize one conversation for SFT, training only on assistant responses.

    Sequences longer than ``max_length`` are cut from the right. Returns
    ``(example, None)`` with keys ``input_ids``, ``labels``, ``attention_mask``
    (lists), ``truncated`` (bool), ``num_truncated`` (tokens dropped) and
    ``num_targets``; or ``(None, reason)`` when nothing would be trained on:
    ``"no_assistant_turn"`` or ``"no_target_after_truncation"``. Skipping
    these keeps a batch of all ``-100`` labels from producing a NaN loss.
    """
    if max_length < 2:
        raise ConfigError("max_length", f"must be >= 2, got {max_length}", "use the model's context length")
    if train_on not in ("all_assistant", "last_assistant"):
        raise ConfigError("train_on", f"unknown value {train_on!r}", "use 'all_assistant' or 'last_assistant'")
    ids, labels = tokenize_chat(
        tokenizer, messages, target_start=target_start, only_last_assistant=train_on == "last_assistant"
    )
    if all(label == IGNORE_INDEX for label in labels):
        return None, "no_assistant_turn"
    dropped = max(0, len(ids) - max_length)
    ids, labels = ids[:max_length], labels[:max_length]
    num_targets = sum(label != IGNORE_INDEX for label in labels)
    if num_targets == 0:
        return None, "no_target_after_truncation"
    example = {
        "input_ids": ids,
        "labels": labels,
        "attention_mask": [1] * len(ids),
        "truncated": dropped > 0,
        "num_truncated": dropped,
        "num_targets": num_targets,
    }
    return example, None
