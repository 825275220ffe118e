"""Prompts and the response pairs judged between models.

Every unordered pair of models meets on every prompt. Which model is shown
as "A" (left) is drawn per pair from ``seed`` and the pair id alone, so the
assignment does not depend on the order of the prompt file or the models and
is the same after a restart. The order pairs are presented in is shuffled with
the same seed, so a judge does not see one prompt many times in a row.

Prompt files: ``.txt`` (one prompt per non-blank line), ``.jsonl`` or ``.json``
(a list); each record a string, or an object with ``prompt`` (a string or a
list of ``{role, content}`` messages) or ``messages``, and an optional ``id``.
Without an ``id`` a prompt is identified by a hash of its text, so judgments
stay attached to the right prompt when the file is reordered or extended.
"""

from __future__ import annotations

import hashlib
import itertools
import json
import random
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from lmlab.errors import ConfigError

#: A model as the comparison sees it: prompts in, responses (new text only) out.
Generator = Callable[[list[str]], list[str]]

__all__ = ["Generator", "Prompt", "Pair", "load_prompts", "parse_prompt", "pair_id", "build_pairs", "check_model_name"]

_ROLES = ("system", "user", "assistant")
_NAME_CHARS = set("abcdefghijklmnopqrstuvwxyzABCDEFGHIJKLMNOPQRSTUVWXYZ0123456789_.-")


@dataclass(frozen=True)
class Prompt:
    """A prompt: ``id`` (stable across reorderings) and its chat ``messages`` (ending with a user turn)."""

    id: str
    messages: tuple[tuple[str, str], ...]  # (role, content); tuples keep Prompt hashable

    @property
    def text(self) -> str:
        """What a judge reads: the user's message, or the whole conversation with role labels."""
        if len(self.messages) == 1:
            return self.messages[0][1]
        return "\n\n".join(f"{role.capitalize()}: {content}" for role, content in self.messages)

    def as_messages(self) -> list[dict[str, str]]:
        """``[{role, content}]`` for :func:`lmlab.data.posttrain.chat.format_chat`."""
        return [{"role": r, "content": c} for r, c in self.messages]


@dataclass(frozen=True)
class Pair:
    """Two models' responses to one prompt, as displayed: ``model_a`` on the left, ``model_b`` on the right."""

    pair_id: str
    prompt_id: str
    prompt: str
    model_a: str
    model_b: str
    response_a: str
    response_b: str
    position: int  # presentation order


def check_model_name(name: str, field: str = "--model") -> str:
    """Model names label results and database rows: letters, digits, ``_ . -`` only."""
    if not name or len(name) > 64 or not set(name) <= _NAME_CHARS:
        raise ConfigError(field, f"bad model name {name!r}", "use 1-64 letters, digits, '_', '.' or '-'")
    return name


def _text_id(text: str) -> str:
    return hashlib.sha1(text.encode("utf-8")).hexdigest()[:12]


def parse_prompt(record: Any, where: str) -> Prompt:
    """One prompt from a string or a ``{prompt | messages, id?}`` object; ``where`` names it in errors."""
    pid = None
    if isinstance(record, Mapping):
        if "id" in record and record["id"] is not None:
            pid = str(record["id"])
        body = record.get("prompt", record.get("messages"))
    else:
        body = record
    if isinstance(body, str):
        messages = (("user", body),)
    elif isinstance(body, Sequence) and body and all(isinstance(m, Mapping) for m in body):
        # checked here rather than with lmlab.data.posttrain.chat, whose package pulls in Lightning
        for i, m in enumerate(body):
            if m.get("role") not in _ROLES or not isinstance(m.get("content"), str):
                raise ConfigError(f"{where}[{i}]", "a message needs a role (system, user or assistant) and string content", 'write {"role": "user", "content": "..."}')
        messages = tuple((m["role"], m["content"]) for m in body)
    else:
        raise ConfigError(where, "expected a string, or an object with 'prompt' (text or messages) or 'messages'", 'write e.g. {"prompt": "..."}')
    if not any(content.strip() for _, content in messages):
        raise ConfigError(where, "the prompt is empty", "remove the record")
    if messages[-1][0] != "user":
        raise ConfigError(where, f"the conversation ends with a {messages[-1][0]} turn", "end it with the user turn to answer")
    if pid is None:
        pid = _text_id(json.dumps(messages))
    return Prompt(pid, messages)


def load_prompts(path: str | Path, field: str = "--prompts") -> list[Prompt]:
    """Read a prompt file (see the module docstring); ids must be unique and the file non-empty."""
    p = Path(path).expanduser()
    if not p.is_file():
        raise ConfigError(field, f"{p} does not exist", "give a .txt, .jsonl or .json prompt file")
    try:
        text = p.read_text(encoding="utf-8")
    except UnicodeDecodeError:
        raise ConfigError(field, f"{p} is not UTF-8 text", "re-save it as UTF-8") from None
    records: list[tuple[str, Any]] = []
    if p.suffix == ".jsonl":
        for n, line in enumerate(text.splitlines(), 1):
            if line.strip():
                try:
                    records.append((f"{p.name}:{n}", json.loads(line)))
                except json.JSONDecodeError as e:
                    raise ConfigError(field, f"{p.name}:{n} is not valid JSON ({e.msg})", "write one JSON value per line") from None
    elif p.suffix == ".json":
        try:
            data = json.loads(text)
        except json.JSONDecodeError as e:
            raise ConfigError(field, f"{p.name} is not valid JSON ({e.msg})", "write a JSON list of prompts") from None
        if not isinstance(data, list):
            raise ConfigError(field, f"{p.name} holds a {type(data).__name__}, not a list", "write a JSON list of prompts")
        records = [(f"{p.name}[{i}]", r) for i, r in enumerate(data)]
    elif p.suffix == ".txt":
        records = [(f"{p.name}:{n}", line) for n, line in enumerate(text.splitlines(), 1) if line.strip()]
    else:
        raise ConfigError(field, f"unknown prompt file type {p.suffix!r}", "use .txt, .jsonl or .json")
    prompts = [parse_prompt(rec, where) for where, rec in records]
    if not prompts:
        raise ConfigError(field, f"{p} holds no prompts", "add at least one prompt")
    seen: dict[str, int] = {}
    for i, pr in enumerate(prompts):
        if pr.id in seen:
            raise ConfigError(field, f"{records[i][0]} repeats prompt id {pr.id!r} (first at {records[seen[pr.id]][0]})", "remove duplicate prompts or give unique ids")
        seen[pr.id] = i
    return prompts


def pair_id(prompt_id: str, model_x: str, model_y: str) -> str:
    """Stable id of the comparison of two models on one prompt (independent of their order)."""
    lo, hi = sorted((model_x, model_y))
    return hashlib.sha1(f"{prompt_id}\x00{lo}\x00{hi}".encode("utf-8")).hexdigest()[:16]


def build_pairs(prompts: Sequence[Prompt], responses: Mapping[str, Mapping[str, str]], seed: int = 0) -> list[Pair]:
    """All model pairs on all prompts from ``responses[model][prompt_id]``, sides and order drawn from ``seed``."""
    models = list(responses)
    if len(models) < 2:
        raise ConfigError("--model", f"need at least two models to compare, got {len(models)}", "give --a and --b (and more with --model)")
    pairs = []
    for prompt in prompts:
        for x, y in itertools.combinations(models, 2):
            pid = pair_id(prompt.id, x, y)
            lo, hi = sorted((x, y))
            # string seeds are hashed deterministically by random.Random (unlike hash())
            a, b = (hi, lo) if random.Random(f"{seed}:side:{pid}").random() < 0.5 else (lo, hi)
            pairs.append((pid, prompt, a, b))
    order = sorted(pairs, key=lambda t: random.Random(f"{seed}:order:{t[0]}").random())
    return [
        Pair(pid, prompt.id, prompt.text, a, b, responses[a][prompt.id], responses[b][prompt.id], position)
        for position, (pid, prompt, a, b) in enumerate(order)
    ]
