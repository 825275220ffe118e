"""Verifiable toy tasks a tiny model can learn on CPU, with exact-match rewards.

Two tasks, both with answers checkable by a program:

* addition: ``"12+345="`` -> ``"357"``;
* reversal: ``"rev:abc="`` -> ``"cba"``.

Generators are deterministic in ``seed``. Every prompt belongs to exactly one
split, decided by a stable hash of the prompt text (``eval_fraction`` of all
prompts are held out), so training and held-out sets never overlap whatever
``n`` or ``seed`` is asked for.

Rewards (:func:`reward`): 1.0 for an exact match; otherwise 0.0, or with
``partial_credit=True`` ``0.5 * (share of answer characters matched position
by position, right-aligned for addition and left-aligned for reversal)``, so
any wrong answer stays strictly below a right one.

:func:`build_char_tokenizer` makes a character-level tokenizer with the
project's special tokens and chat template.
"""

from __future__ import annotations

import random
import re
import string
import zlib
from pathlib import Path
from typing import Any, Literal

from lmlab.data.posttrain.chat import ASSISTANT, BOS, END, EOS, PAD, SYSTEM, USER, install_chat_template
from lmlab.errors import ConfigError

Split = Literal["train", "eval"]
UNK = "<|unk|>"
# fixed ids: pad first so zero-initialised buffers read as padding
CHAR_SPECIAL_TOKENS: tuple[str, ...] = (PAD, BOS, EOS, SYSTEM, USER, ASSISTANT, END, UNK)
CHAR_ALPHABET: str = string.digits + string.ascii_lowercase + string.ascii_uppercase + " \n+-*/=:.,?!'\"()#"

_ADD_RE = re.compile(r"(\d+)\+(\d+)=")
_REV_RE = re.compile(r"rev:([a-z]*)=")

__all__ = [
    "AdditionTask", "ReversalTask", "VerifiableTask", "task_for_prompt", "answer_for",
    "normalize_response", "exact_match", "reward", "build_char_tokenizer",
    "CHAR_SPECIAL_TOKENS", "CHAR_ALPHABET",
]


def _stable_bucket(prompt: str) -> float:
    # crc32 rather than hash(): Python salts str hashes per process
    return zlib.crc32(prompt.encode("utf-8")) / 2**32


class VerifiableTask:
    """A family of prompts with one correct answer each; subclasses define sampling, solving and wrong answers."""

    name = "base"

    def __init__(self, seed: int = 0, eval_fraction: float = 0.1):
        if not 0.0 < eval_fraction < 1.0:
            raise ConfigError("eval_fraction", f"must lie in (0, 1), got {eval_fraction}", "use e.g. 0.1")
        self.seed = seed
        self.eval_fraction = eval_fraction

    # -- to implement
    def sample_prompt(self, rng: random.Random) -> str:
        """Draw one prompt."""
        raise NotImplementedError

    def answer(self, prompt: str) -> str:
        """The correct answer to ``prompt``."""
        raise NotImplementedError

    def wrong_answer(self, prompt: str, rng: random.Random) -> str:
        """A plausible but wrong answer to ``prompt``."""
        raise NotImplementedError

    def num_prompts(self) -> int:
        """Size of the prompt space (both splits)."""
        raise NotImplementedError

    def partial_score(self, answer: str, response: str) -> float:
        """Share of answer characters matched in place, in [0, 1]."""
        raise NotImplementedError

    # -- shared
    def split_of(self, prompt: str) -> Split:
        """Which split ``prompt`` belongs to; fixed by the prompt text alone."""
        return "eval" if _stable_bucket(prompt) < self.eval_fraction else "train"

    def _rng(self, split: Split, kind: str) -> random.Random:
        return random.Random(f"{self.name}/{self.seed}/{split}/{kind}")

    def prompts(self, n: int, split: Split = "eval", kind: str = "prompts") -> list[str]:
        """``n`` distinct prompts from ``split``, deterministic in ``(seed, split, kind)``."""
        if split not in ("train", "eval"):
            raise ConfigError("split", f"unknown split {split!r}", "use 'train' or 'eval'")
        if n < 0:
            raise ConfigError("n", f"must be >= 0, got {n}", "ask for a non-negative number of examples")
        rng = self._rng(split, kind)
        seen: set[str] = set()
        out: list[str] = []
        misses = 0
        budget = 50 * n + 2000
        while len(out) < n:
            p = self.sample_prompt(rng)
            if p in seen or self.split_of(p) != split:
                misses += 1
                if misses > budget:
                    raise ConfigError(
                        "n",
                        f"found only {len(out)} distinct {split} prompts of the {n} asked for "
                        f"(about {self.num_prompts()} prompts exist in both splits)",
                        "ask for fewer examples or widen the task (more digits / longer strings)",
                    )
                continue
            seen.add(p)
            out.append(p)
        return out

    def sft_pairs(self, n: int, split: Split = "train") -> list[dict[str, str]]:
        """``n`` ``{"prompt", "completion"}`` records with correct completions."""
        return [{"prompt": p, "completion": self.answer(p)} for p in self.prompts(n, split, kind="sft")]

    def preference_pairs(self, n: int, split: Split = "train") -> list[dict[str, str]]:
        """``n`` ``{"prompt", "chosen", "rejected"}`` records: chosen is correct, rejected plausibly wrong."""
        rng = self._rng(split, "rejected")
        out = []
        for p in self.prompts(n, split, kind="preference"):
            out.append({"prompt": p, "chosen": self.answer(p), "rejected": self.wrong_answer(p, rng)})
        return out

    def prompt_records(self, n: int, split: Split = "eval") -> list[dict[str, str]]:
        """``n`` ``{"prompt", "answer"}`` records (for RL rollouts and evaluation)."""
        return [{"prompt": p, "answer": self.answer(p)} for p in self.prompts(n, split, kind="prompts")]


class AdditionTask(VerifiableTask):
    """``"a+b="`` -> decimal sum, with operands of ``min_digits`` to ``max_digits`` digits."""

    name = "addition"

    def __init__(self, min_digits: int = 1, max_digits: int = 3, seed: int = 0, eval_fraction: float = 0.1):
        super().__init__(seed, eval_fraction)
        if not 1 <= min_digits <= max_digits:
            raise ConfigError("min_digits/max_digits", f"need 1 <= min_digits <= max_digits, got {min_digits}, {max_digits}", "e.g. min_digits=1, max_digits=3")
        self.min_digits = min_digits
        self.max_digits = max_digits

    def _operand(self, rng: random.Random) -> int:
        digits = rng.randint(self.min_digits, self.max_digits)
        lo = 0 if digits == 1 else 10 ** (digits - 1)
        return rng.randint(lo, 10**digits - 1)

    def sample_prompt(self, rng: random.Random) -> str:
        return f"{self._operand(rng)}+{self._operand(rng)}="

    def num_prompts(self) -> int:
        lo = 0 if self.min_digits == 1 else 10 ** (self.min_digits - 1)
        return (10**self.max_digits - lo) ** 2

    def answer(self, prompt: str) -> str:
        match = _ADD_RE.fullmatch(prompt.strip())
        if match is None:
            raise ConfigError("prompt", f"{prompt!r} is not an addition prompt", "use the form '12+345='")
        return str(int(match.group(1)) + int(match.group(2)))

    def wrong_answer(self, prompt: str, rng: random.Random) -> str:
        """One of: a digit off by one, the whole sum off by one, a dropped carry, two digits swapped."""
        match = _ADD_RE.fullmatch(prompt.strip())
        if match is None:
            raise ConfigError("prompt", f"{prompt!r} is not an addition prompt", "use the form '12+345='")
        a, b = int(match.group(1)), int(match.group(2))
        right = str(a + b)
        for _ in range(100):
            kind = rng.choice(("digit", "total", "carry", "swap"))
            if kind == "digit":
                i = rng.randrange(len(right))
                d = int(right[i]) + rng.choice((-1, 1))
                if not 0 <= d <= 9 or (i == 0 and d == 0 and len(right) > 1):
                    continue
                cand = right[:i] + str(d) + right[i + 1 :]
            elif kind == "total":
                cand = str(max(0, a + b + rng.choice((-1, 1))))
            elif kind == "carry":
                sa, sb = str(a)[::-1], str(b)[::-1]
                cols = [(int(sa[i]) if i < len(sa) else 0) + (int(sb[i]) if i < len(sb) else 0) for i in range(max(len(sa), len(sb)))]
                cand = str(int("".join(str(c % 10) for c in reversed(cols))))
            else:
                if len(right) < 2:
                    continue
                i = rng.randrange(len(right) - 1)
                cand = right[:i] + right[i + 1] + right[i] + right[i + 2 :]
                if cand[0] == "0":
                    continue
            if cand != right:
                return cand
        # every sum has a neighbour that differs, so this is only reached in theory
        return str(a + b + 1)

    def partial_score(self, answer: str, response: str) -> float:
        a, r = answer[::-1], response[::-1]
        hits = sum(1 for i in range(min(len(a), len(r))) if a[i] == r[i])
        return hits / max(len(a), len(r), 1)


class ReversalTask(VerifiableTask):
    """``"rev:abc="`` -> ``"cba"`` over lowercase strings of ``min_len`` to ``max_len`` letters from ``alphabet``."""

    name = "reversal"

    def __init__(self, min_len: int = 2, max_len: int = 6, alphabet: str = "abcdefghij", seed: int = 0, eval_fraction: float = 0.1):
        super().__init__(seed, eval_fraction)
        if not 1 <= min_len <= max_len:
            raise ConfigError("min_len/max_len", f"need 1 <= min_len <= max_len, got {min_len}, {max_len}", "e.g. min_len=2, max_len=6")
        if len(set(alphabet)) < 2 or not set(alphabet) <= set(string.ascii_lowercase):
            raise ConfigError("alphabet", f"needs at least two distinct lowercase letters, got {alphabet!r}", "use e.g. 'abcdefghij'")
        self.min_len = min_len
        self.max_len = max_len
        self.alphabet = "".join(sorted(set(alphabet)))

    def sample_prompt(self, rng: random.Random) -> str:
        length = rng.randint(self.min_len, self.max_len)
        return "rev:" + "".join(rng.choice(self.alphabet) for _ in range(length)) + "="

    def num_prompts(self) -> int:
        return sum(len(self.alphabet) ** k for k in range(self.min_len, self.max_len + 1))

    def answer(self, prompt: str) -> str:
        match = _REV_RE.fullmatch(prompt.strip())
        if match is None:
            raise ConfigError("prompt", f"{prompt!r} is not a reversal prompt", "use the form 'rev:abc='")
        return match.group(1)[::-1]

    def wrong_answer(self, prompt: str, rng: random.Random) -> str:
        """One of: two neighbouring letters swapped, a letter replaced, a letter dropped, the input unreversed."""
        right = self.answer(prompt)
        source = right[::-1]
        for _ in range(100):
            kind = rng.choice(("swap", "replace", "drop", "copy"))
            if kind == "swap" and len(right) >= 2:
                i = rng.randrange(len(right) - 1)
                cand = right[:i] + right[i + 1] + right[i] + right[i + 2 :]
            elif kind == "replace":
                i = rng.randrange(len(right))
                cand = right[:i] + rng.choice([c for c in self.alphabet if c != right[i]]) + right[i + 1 :]
            elif kind == "drop" and len(right) >= 2:
                i = rng.randrange(len(right))
                cand = right[:i] + right[i + 1 :]
            else:
                cand = source
            if cand != right:
                return cand
        return right + self.alphabet[0]

    def partial_score(self, answer: str, response: str) -> float:
        hits = sum(1 for x, y in zip(answer, response) if x == y)
        return hits / max(len(answer), len(response), 1)


def task_for_prompt(prompt: str) -> tuple[VerifiableTask, str]:
    """The task and the bare problem (``"12+345="``) found in ``prompt``.

    ``prompt`` may be the bare problem or chat-formatted text containing it
    (the last problem in the text counts).
    """
    add = list(_ADD_RE.finditer(prompt))
    rev = list(_REV_RE.finditer(prompt))
    if not add and not rev:
        raise ConfigError("prompt", f"no addition or reversal problem found in {prompt[:80]!r}", "pass a prompt like '12+345=' or 'rev:abc='")
    last_add = add[-1] if add else None
    last_rev = rev[-1] if rev else None
    if last_rev is None or (last_add is not None and last_add.start() > last_rev.start()):
        return AdditionTask(), last_add.group(0)  # type: ignore[union-attr]
    return ReversalTask(), last_rev.group(0)


def answer_for(prompt: str) -> str:
    """The correct answer to the problem in ``prompt``."""
    task, problem = task_for_prompt(prompt)
    return task.answer(problem)


def normalize_response(response: str) -> str:
    """Text of a response up to the first end-of-turn marker, without surrounding whitespace."""
    for marker in (END, EOS):
        cut = response.find(marker)
        if cut >= 0:
            response = response[:cut]
    return response.strip()


def exact_match(prompt: str, response: str) -> bool:
    """Whether ``response`` (normalised with :func:`normalize_response`) is the correct answer."""
    return normalize_response(response) == answer_for(prompt)


def reward(prompt: str, response: str, partial_credit: bool = False) -> float:
    """1.0 for the correct answer; else 0.0, or ``0.5 * partial_score`` with ``partial_credit`` (see module doc)."""
    task, problem = task_for_prompt(prompt)
    right = task.answer(problem)
    got = normalize_response(response)
    if got == right:
        return 1.0
    if not partial_credit:
        return 0.0
    return 0.5 * task.partial_score(right, got)


def build_char_tokenizer(save_dir: str | Path | None = None, alphabet: str = CHAR_ALPHABET) -> Any:
    """A character-level ``PreTrainedTokenizerFast`` with the project's special tokens and chat template.

    Ids: the special tokens of :data:`CHAR_SPECIAL_TOKENS` first (``<|pad|>`` is
    0), then one id per character of ``alphabet``; any other character maps to
    ``<|unk|>``. Saved with ``save_pretrained`` when ``save_dir`` is given, so
    ``AutoTokenizer.from_pretrained(save_dir)`` reloads it.
    """
    from tokenizers import Regex, Tokenizer, decoders, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    chars = list(dict.fromkeys(alphabet))
    vocab = {tok: i for i, tok in enumerate(CHAR_SPECIAL_TOKENS)}
    for ch in chars:
        if ch in vocab:
            raise ConfigError("alphabet", f"character {ch!r} collides with a special token", "remove it")
        vocab[ch] = len(vocab)
    core = Tokenizer(models.WordLevel(vocab=vocab, unk_token=UNK))
    # [\s\S] rather than '.' so newlines become tokens too
    core.pre_tokenizer = pre_tokenizers.Split(Regex(r"[\s\S]"), behavior="isolated")
    core.decoder = decoders.Fuse()
    core.add_special_tokens(list(CHAR_SPECIAL_TOKENS))
    tok = PreTrainedTokenizerFast(
        tokenizer_object=core,
        bos_token=BOS,
        eos_token=EOS,
        pad_token=PAD,
        unk_token=UNK,
        additional_special_tokens=[SYSTEM, USER, ASSISTANT, END],
    )
    install_chat_template(tok)
    if save_dir is not None:
        tok.save_pretrained(str(save_dir))
    return tok
