"""Lightning DataModules for post-training: instruction (SFT), preference (RM, DPO) and prompt (PPO) sets.

Each DataModule reads its records with the readers of :mod:`lmlab.data.posttrain.records`
(a hub dataset, a local ``.jsonl``/``.json``/``.parquet``/``.csv`` file) or
generates them from a verifiable toy task (:class:`VerifiableData`), tokenizes
them once in ``setup`` and serves padded batches. Bad records (identical
pairs, empty responses, over-long prompts, nothing to train on) are counted,
reported in one warning and skipped; a source left with nothing raises
``ConfigError``.

``batch_size`` is per device; ``micro_batch_size`` (read by the module) splits
each batch into forward/backward chunks for gradient accumulation.

The tokenizer is a directory, ``tokenizer.json`` or hub name, or ``"char"``
for the character-level tokenizer of :mod:`lmlab.data.posttrain.verifiable`.
:func:`tokenizer_fingerprint` identifies a vocabulary so stages can refuse a
model trained with a different tokenizer.
"""

from __future__ import annotations

import hashlib
import json
import random
from dataclasses import dataclass
from functools import partial
from typing import Any, Literal, Optional, Sequence

import lightning.pytorch as pl
import torch
from torch.utils.data import DataLoader, Dataset, RandomSampler, Sampler

from lmlab.data.posttrain.chat import IGNORE_INDEX, stop_token_ids
from lmlab.data.posttrain.records import (
    Format,
    collate_preferences,
    collate_prompts,
    collate_sft,
    pack_sft,
    read_preferences,
    read_prompts,
    read_sft,
    tokenize_preferences,
    tokenize_prompts,
    tokenize_sft,
)
from lmlab.errors import ConfigError

__all__ = [
    "VerifiableData",
    "load_posttrain_tokenizer",
    "tokenizer_fingerprint",
    "tokenizer_info",
    "ListDataset",
    "PreferenceBatchCollator",
    "SFTDataModule",
    "PreferenceDataModule",
    "PromptDataModule",
]


# --------------------------------------------------------------------------- tokenizer


def load_posttrain_tokenizer(spec: str, field: str = "data.tokenizer") -> Any:
    """Load a tokenizer (``"char"``: the verifiable tasks' character tokenizer); it must have a pad token."""
    if spec == "char":
        from lmlab.data.posttrain.verifiable import build_char_tokenizer

        tok = build_char_tokenizer()
    else:
        from lmlab.data.tokenizer import load_tokenizer

        tok = load_tokenizer(spec, field)
    if tok.pad_token_id is None:
        raise ConfigError(field, f"tokenizer {spec!r} has no pad token", "train it with lmlab's special tokens")
    return tok


def tokenizer_fingerprint(tokenizer: Any) -> str:
    """A short hash of the token-to-id map (special tokens included): equal iff the vocabularies are equal."""
    items = sorted(tokenizer.get_vocab().items(), key=lambda kv: (kv[1], kv[0]))
    return hashlib.sha256(json.dumps(items, ensure_ascii=False).encode("utf-8")).hexdigest()[:16]


def tokenizer_info(tokenizer: Any) -> dict[str, Any]:
    """``{"vocab_size", "fingerprint"}`` recorded in checkpoints to catch tokenizer mismatches."""
    return {"vocab_size": int(len(tokenizer)), "fingerprint": tokenizer_fingerprint(tokenizer)}


# --------------------------------------------------------------------------- generated records


@dataclass
class VerifiableData:
    """Generate records from a verifiable toy task (:mod:`lmlab.data.posttrain.verifiable`) instead of reading a file.

    Training records come from the task's train split and validation records
    from its held-out split, so the two never share a prompt.

    Args:
        task: ``addition`` (``"12+34="`` -> ``"46"``) or ``reversal`` (``"rev:abc="`` -> ``"cba"``).
        n: Training records.
        val_n: Held-out validation records (0: none).
        min_digits: Addition: fewest digits per operand.
        max_digits: Addition: most digits per operand.
        min_len: Reversal: shortest string.
        max_len: Reversal: longest string.
        seed: Fixes which prompts are drawn.
        eval_fraction: Share of the prompt space held out.
        insert_fraction: Share of preference pairs whose rejected answer is the
            correct one with an extra character inserted. The task's own wrong
            answers are never longer than the right one for reversal (and rarely
            for addition), so a reward model trained on them alone learns
            "longer is better" and PPO exploits it by padding answers.
    """

    task: Literal["addition", "reversal"] = "addition"
    n: int = 2000
    val_n: int = 200
    min_digits: int = 1
    max_digits: int = 2
    min_len: int = 2
    max_len: int = 6
    seed: int = 0
    eval_fraction: float = 0.1
    insert_fraction: float = 0.0

    def make_task(self):
        """The configured :class:`~lmlab.data.posttrain.verifiable.VerifiableTask`."""
        from lmlab.data.posttrain.verifiable import AdditionTask, ReversalTask

        if self.task == "addition":
            return AdditionTask(self.min_digits, self.max_digits, seed=self.seed, eval_fraction=self.eval_fraction)
        if self.task == "reversal":
            return ReversalTask(self.min_len, self.max_len, seed=self.seed, eval_fraction=self.eval_fraction)
        raise ConfigError("data.verifiable.task", f"unknown task {self.task!r}", "use 'addition' or 'reversal'")

    def records(self, kind: Literal["sft", "preference", "prompts"], split: Literal["train", "eval"]) -> list[dict]:
        """Records of one kind for one split: SFT pairs, preference pairs or prompts (with their answer)."""
        task = self.make_task()
        n = self.n if split == "train" else self.val_n
        if kind == "sft":
            return task.sft_pairs(n, split)
        if kind == "preference":
            return self._with_insertions(task, task.preference_pairs(n, split), split)
        return task.prompt_records(n, split)

    def _with_insertions(self, task, pairs: list[dict], split: str) -> list[dict]:
        """Replace ``insert_fraction`` of the rejected answers by the right answer with one character too many."""
        if not 0.0 <= self.insert_fraction <= 1.0:
            raise ConfigError("data.verifiable.insert_fraction", f"must lie in [0, 1], got {self.insert_fraction}")
        if self.insert_fraction == 0.0:
            return pairs
        rng = random.Random(f"insert/{self.task}/{self.seed}/{split}")
        alphabet = "0123456789" if self.task == "addition" else task.alphabet
        for pair in pairs:
            if rng.random() < self.insert_fraction:
                right = pair["chosen"]
                pos = rng.randint(1 if self.task == "addition" else 0, len(right))  # no leading zero
                pair["rejected"] = right[:pos] + rng.choice(alphabet) + right[pos:]
        return pairs


# --------------------------------------------------------------------------- datasets and collators


class ListDataset(Dataset):
    """A map-style dataset over an in-memory list (Lightning adds a distributed sampler when needed)."""

    def __init__(self, items: Sequence[Any]):
        self.items = list(items)

    def __len__(self) -> int:
        return len(self.items)

    def __getitem__(self, i: int) -> Any:
        return self.items[i]


class ResumedSampler(Sampler[int]):
    """A seeded ``RandomSampler`` continued after ``batches`` batches of ``batch_size`` (a resumed run).

    The first pass replays the draws of the epochs already finished and skips
    the samples already trained on in the current one, so a run resumed from a
    checkpoint sees the batches the uninterrupted run would have; later passes
    are the plain sampler's. (A checkpoint written by a stop at an epoch's very
    last batch is not continued exactly: Lightning then restarts the next epoch
    with the finished epoch's batch count.)
    """

    def __init__(self, sampler: RandomSampler, batches: int, batch_size: int, batches_per_epoch: int, drop_last: bool):
        self.sampler = sampler
        self._skip: Optional[tuple[int, int]] = None
        if batches > 0 and batches_per_epoch > 0:
            self._skip = (batches // batches_per_epoch, (batches % batches_per_epoch) * batch_size)
        # the trainer stops after an epoch's last batch; the sampler only runs past its first
        # permutation (drawing a second) when a partial last batch has to be completed
        self._exhausted_each_epoch = not drop_last and len(sampler) % batch_size != 0

    def __len__(self) -> int:
        return len(self.sampler)

    def __iter__(self):
        if self._skip is None:
            yield from self.sampler
            return
        epochs, samples = self._skip
        self._skip = None
        for _ in range(epochs):
            finished = iter(self.sampler)
            next(finished, None)  # draws the epoch's permutation
            if self._exhausted_each_epoch:
                for _ in finished:
                    pass
            # each epoch's DataLoader iterator also draws its workers' base seed from the generator
            torch.empty((), dtype=torch.int64).random_(generator=self.sampler.generator)
        order = iter(self.sampler)
        for _ in range(samples):
            next(order, None)
        yield from order


@dataclass
class PreferenceBatchCollator:
    """Right-pads preference pairs (:func:`~lmlab.data.posttrain.records.collate_preferences`) and carries
    precomputed reference log-probs (``ref_chosen_logps``/``ref_rejected_logps``) when every example has them."""

    pad_id: int

    def __call__(self, batch: Sequence[dict[str, Any]]) -> dict[str, torch.Tensor]:
        out = collate_preferences(batch, self.pad_id)
        for key in ("ref_chosen_logps", "ref_rejected_logps"):
            if batch and all(key in ex for ex in batch):
                out[key] = torch.tensor([float(ex[key]) for ex in batch], dtype=torch.float32)
        return out


def _trim_to_last_target(ids: list[int], labels: list[int]) -> tuple[list[int], list[int]]:
    """Cut the tokens after the last trained token (the ``\\n`` after ``<|end|>``).

    A reward model then scores the sequence at ``<|end|>``, which is also where a
    generated response stops during PPO: training and use see the same position.
    """
    last = max(i for i, label in enumerate(labels) if label != IGNORE_INDEX)
    return ids[: last + 1], labels[: last + 1]


# --------------------------------------------------------------------------- shared base


class _PostTrainDataModule(pl.LightningDataModule):
    """Reading, splitting and loading shared by the post-training DataModules."""

    kind: Literal["sft", "preference", "prompts"] = "sft"

    def __init__(
        self,
        tokenizer: str,
        source: Optional[str] = None,
        val_source: Optional[str] = None,
        verifiable: Optional[VerifiableData] = None,
        split: str = "train",
        val_split: str = "train",
        limit: Optional[int] = None,
        val_limit: Optional[int] = None,
        val_fraction: float = 0.0,
        batch_size: int = 32,
        micro_batch_size: Optional[int] = None,
        val_batch_size: Optional[int] = None,
        num_workers: int = 0,
        seed: int = 0,
    ):
        super().__init__()
        if (source is None) == (verifiable is None):
            raise ConfigError("data.source", "give exactly one of data.source and data.verifiable", "name a dataset file/hub name, or a verifiable task")
        if batch_size < 1:
            raise ConfigError("data.batch_size", f"must be >= 1, got {batch_size}")
        if micro_batch_size is not None and micro_batch_size < 1:
            raise ConfigError("data.micro_batch_size", f"must be >= 1, got {micro_batch_size}")
        if not 0.0 <= val_fraction < 1.0:
            raise ConfigError("data.val_fraction", f"must lie in [0, 1), got {val_fraction}")
        self.tokenizer_spec = tokenizer
        self.source = source
        self.val_source = val_source
        self.verifiable = verifiable
        self.split = split
        self.val_split = val_split
        self.limit = limit
        self.val_limit = val_limit
        self.val_fraction = val_fraction
        self.batch_size = batch_size
        self._micro = micro_batch_size
        self.val_batch_size = val_batch_size or batch_size
        self.num_workers = num_workers
        self.seed = seed
        self._tokenizer = None
        self.train_examples: Optional[list[dict]] = None
        self.val_examples: list[dict] = []
        self.reports: dict[str, Any] = {}

    # -- tokenizer ----------------------------------------------------------------
    @property
    def tokenizer(self) -> Any:
        if self._tokenizer is None:
            self._tokenizer = load_posttrain_tokenizer(self.tokenizer_spec)
        return self._tokenizer

    @property
    def vocab_size(self) -> int:
        return len(self.tokenizer)

    @property
    def pad_id(self) -> int:
        return int(self.tokenizer.pad_token_id)

    @property
    def eos_id(self) -> int:
        return int(self.tokenizer.eos_token_id)

    @property
    def stop_ids(self) -> list[int]:
        """Token ids that end an assistant turn (``<|end|>``, ``<|eos|>``)."""
        return stop_token_ids(self.tokenizer)

    @property
    def tokenizer_info(self) -> dict[str, Any]:
        return tokenizer_info(self.tokenizer)

    @property
    def micro_batch_size(self) -> int:
        return self._micro or self.batch_size

    # -- records --------------------------------------------------------------------
    def _read(self, source: Any, split: str, limit: Optional[int]) -> list[dict]:
        raise NotImplementedError

    def _tokenize(self, records: list[dict], what: str) -> list[dict]:
        raise NotImplementedError

    def _raw_records(self) -> tuple[Any, Any]:
        """(train source, validation source or None) as something the readers accept."""
        if self.verifiable is not None:
            train = self.verifiable.records(self.kind, "train")
            val = self.verifiable.records(self.kind, "eval") if self.verifiable.val_n > 0 else None
            return train, val
        return self.source, self.val_source

    def setup(self, stage: Optional[str] = None) -> None:
        if self.train_examples is not None:
            return
        train_src, val_src = self._raw_records()
        train = self._read(train_src, self.split, self.limit)
        val: list[dict] = []
        if val_src is not None:
            val = self._read(val_src, self.val_split, self.val_limit)
        elif self.val_fraction > 0 and len(train) > 1:
            order = list(range(len(train)))
            random.Random(self.seed).shuffle(order)
            n_val = max(1, int(round(self.val_fraction * len(train))))
            held = set(order[:n_val])
            val = [r for i, r in enumerate(train) if i in held]
            train = [r for i, r in enumerate(train) if i not in held]
        self.train_examples = self._tokenize(train, "train")
        self.val_examples = self._tokenize(val, "val") if val else []

    # -- loaders ----------------------------------------------------------------------
    def _collate(self):
        raise NotImplementedError

    def train_dataloader(self) -> DataLoader:
        self.setup()
        generator = torch.Generator().manual_seed(self.seed)
        drop_last = len(self.train_examples) >= self.batch_size
        dataset = ListDataset(self.train_examples)
        resumed = getattr(self, "_resume_batches", 0)
        trainer = getattr(self, "trainer", None)
        # under several processes Lightning swaps in a DistributedSampler with its own order; only one process continues exactly
        if resumed and (trainer is None or trainer.world_size == 1):
            n = len(dataset)
            per_epoch = n // self.batch_size if drop_last else -(-n // self.batch_size)
            sampler = ResumedSampler(RandomSampler(dataset, generator=generator), resumed, self.batch_size, per_epoch, drop_last)
            self._resume_batches = 0
            return DataLoader(dataset, batch_size=self.batch_size, sampler=sampler, generator=generator, drop_last=drop_last,
                              collate_fn=self._collate(), num_workers=self.num_workers)
        return DataLoader(
            dataset,
            batch_size=self.batch_size,
            shuffle=True,
            generator=generator,
            drop_last=drop_last,
            collate_fn=self._collate(),
            num_workers=self.num_workers,
        )

    def val_dataloader(self) -> list[DataLoader]:
        self.setup()
        if not self.val_examples:
            return []
        return [DataLoader(ListDataset(self.val_examples), batch_size=self.val_batch_size, shuffle=False,
                           collate_fn=self._collate(), num_workers=self.num_workers)]

    def test_dataloader(self) -> list[DataLoader]:
        return self.val_dataloader()

    def state_dict(self) -> dict:
        state = {"seed": int(self.seed)}
        trainer = getattr(self, "trainer", None)
        if trainer is not None:
            # training batches run so far: a resumed run continues the shuffled order after them
            state["batches"] = int(trainer.fit_loop.epoch_loop.batch_progress.total.processed)
        return state

    def load_state_dict(self, state: dict) -> None:
        if int(state.get("seed", self.seed)) == self.seed:
            self._resume_batches = int(state.get("batches", 0))


# --------------------------------------------------------------------------- SFT


class SFTDataModule(_PostTrainDataModule):
    """Instruction data for :class:`~lmlab.modules.sft.SFTModule`.

    Conversations in any format :func:`~lmlab.data.posttrain.records.read_sft` reads
    (``messages``, ``prompt``/``completion``, preference ``chosen``, Alpaca)
    are rendered in the chat format with role tokens; labels are ``-100``
    everywhere except the assistant replies (and their ``<|end|>``).

    Args:
        tokenizer: Tokenizer directory / hub name, or ``"char"``.
        source: Dataset (hub name or local file); or use ``verifiable``.
        val_source: Held-out dataset (default: ``val_fraction`` of ``source``,
            or the verifiable task's held-out split).
        verifiable: Generate a verifiable task's SFT pairs instead of reading a file.
        fmt: Force the record format (default: detected from the columns).
        split: Split of ``source`` (hub datasets).
        val_split: Split of ``val_source``.
        limit: Keep the first rows of ``source``.
        val_limit: Keep the first rows of ``val_source``.
        val_fraction: Share of ``source`` held out when there is no ``val_source``.
        max_length: Tokens per example; longer ones are cut (and counted), ones
            with no reply left are skipped.
        train_on: ``all_assistant`` replies or only the ``last_assistant`` one.
        packing: Pack several examples into each row of ``max_length`` tokens,
            with positions restarting and attention kept inside each example.
        batch_size: Examples per batch and device (packed into fewer rows with ``packing``).
        micro_batch_size: Rows per forward/backward (default: the whole batch).
        val_batch_size: Examples per validation batch.
        num_workers: Data-loader workers.
        seed: Shuffling and the validation hold-out.
    """

    kind = "sft"

    def __init__(
        self,
        tokenizer: str,
        source: Optional[str] = None,
        val_source: Optional[str] = None,
        verifiable: Optional[VerifiableData] = None,
        fmt: Optional[Format] = None,
        split: str = "train",
        val_split: str = "train",
        limit: Optional[int] = None,
        val_limit: Optional[int] = None,
        val_fraction: float = 0.0,
        max_length: int = 512,
        train_on: Literal["all_assistant", "last_assistant"] = "all_assistant",
        packing: bool = False,
        batch_size: int = 32,
        micro_batch_size: Optional[int] = None,
        val_batch_size: Optional[int] = None,
        num_workers: int = 0,
        seed: int = 0,
    ):
        super().__init__(tokenizer, source, val_source, verifiable, split, val_split, limit, val_limit,
                         val_fraction, batch_size, micro_batch_size, val_batch_size, num_workers, seed)
        if max_length < 2:
            raise ConfigError("data.max_length", f"must be >= 2, got {max_length}")
        self.fmt = fmt
        self.max_length = max_length
        self.train_on = train_on
        self.packing = packing

    @property
    def seq_len(self) -> int:
        return self.max_length

    def _read(self, source, split, limit):
        # over-long prompts are skipped (and counted) when tokenizing: no reply token survives the cut
        records, report = read_sft(source, fmt=self.fmt, split=split, limit=limit)
        self.reports.setdefault("read", []).append(report)
        return records

    def _tokenize(self, records, what):
        examples, report = tokenize_sft(self.tokenizer, records, self.max_length, self.train_on)
        self.reports[what] = report
        return examples

    def _collate(self):
        if self.packing:
            return partial(pack_sft, max_length=self.max_length, pad_id=self.pad_id)
        return partial(collate_sft, pad_id=self.pad_id)


# --------------------------------------------------------------------------- preferences


class PreferenceDataModule(_PostTrainDataModule):
    """Preference pairs (prompt, chosen, rejected) for reward modelling and DPO.

    Both sides are rendered as prompt + reply in the chat format, labels mark
    the reply, and each side ends at the reply's ``<|end|>`` (so a reward model
    scores the token where generation stops). Pairs with identical sides,
    empty replies, over-long prompts or no reply left after truncation are
    skipped with a warning.

    Args:
        tokenizer: Tokenizer directory / hub name, or ``"char"``.
        source: Dataset with ``chosen``/``rejected`` (+ ``prompt``); or use ``verifiable``.
        val_source: Held-out pairs (default: ``val_fraction`` of ``source``,
            or the verifiable task's held-out split).
        verifiable: Generate a verifiable task's (correct, wrong) answer pairs.
        split: Split of ``source``.
        val_split: Split of ``val_source``.
        limit: Keep the first rows of ``source``.
        val_limit: Keep the first rows of ``val_source``.
        val_fraction: Share of ``source`` held out when there is no ``val_source``.
        max_length: Tokens per side; longer sides are cut.
        max_prompt_tokens: Skip pairs whose prompt is longer (default: ``max_length - 1``).
        batch_size: Pairs per batch and device.
        micro_batch_size: Pairs per forward/backward.
        val_batch_size: Pairs per validation batch.
        num_workers: Data-loader workers.
        seed: Shuffling and the validation hold-out.
    """

    kind = "preference"

    def __init__(
        self,
        tokenizer: str,
        source: Optional[str] = None,
        val_source: Optional[str] = None,
        verifiable: Optional[VerifiableData] = None,
        split: str = "train",
        val_split: str = "train",
        limit: Optional[int] = None,
        val_limit: Optional[int] = None,
        val_fraction: float = 0.0,
        max_length: int = 512,
        max_prompt_tokens: Optional[int] = None,
        batch_size: int = 16,
        micro_batch_size: Optional[int] = None,
        val_batch_size: Optional[int] = None,
        num_workers: int = 0,
        seed: int = 0,
    ):
        super().__init__(tokenizer, source, val_source, verifiable, split, val_split, limit, val_limit,
                         val_fraction, batch_size, micro_batch_size, val_batch_size, num_workers, seed)
        if max_length < 2:
            raise ConfigError("data.max_length", f"must be >= 2, got {max_length}")
        self.max_length = max_length
        self.max_prompt_tokens = max_prompt_tokens if max_prompt_tokens is not None else max_length - 1

    @property
    def seq_len(self) -> int:
        return self.max_length

    def _read(self, source, split, limit):
        records, report = read_preferences(source, split=split, limit=limit, tokenizer=self.tokenizer,
                                           max_prompt_tokens=self.max_prompt_tokens)
        self.reports.setdefault("read", []).append(report)
        return records

    def _tokenize(self, records, what):
        examples, report = tokenize_preferences(self.tokenizer, records, self.max_length)
        self.reports[what] = report
        for i, ex in enumerate(examples):
            for side in ("chosen", "rejected"):
                ex[f"{side}_input_ids"], ex[f"{side}_labels"] = _trim_to_last_target(ex[f"{side}_input_ids"], ex[f"{side}_labels"])
            ex["index"] = i
        return examples

    def _collate(self):
        return PreferenceBatchCollator(self.pad_id)


# --------------------------------------------------------------------------- prompts


class PromptDataModule(_PostTrainDataModule):
    """Prompt sets for RL rollouts (PPO): left-padded prompts ending in the generation prompt.

    Any format :func:`~lmlab.data.posttrain.records.read_prompts` reads works (a
    ``prompt`` column, or the context of SFT/preference records). Prompts over
    ``max_prompt_tokens`` are skipped with a warning; the module checks that
    ``max_prompt_tokens`` plus its response length fits the context.

    Args:
        tokenizer: Tokenizer directory / hub name, or ``"char"``.
        source: Prompt dataset; or use ``verifiable``.
        val_source: Held-out prompts (default: ``val_fraction`` of ``source``,
            or the verifiable task's held-out split).
        verifiable: Generate a verifiable task's prompts (with their answers).
        fmt: Force the record format.
        split: Split of ``source``.
        val_split: Split of ``val_source``.
        limit: Keep the first rows of ``source``.
        val_limit: Keep the first rows of ``val_source``.
        val_fraction: Share of ``source`` held out when there is no ``val_source``.
        max_prompt_tokens: Longest prompt kept, in tokens.
        keep_columns: Record columns carried into each batch as lists (e.g. ``answer``).
        batch_size: Prompts per rollout batch and device.
        val_batch_size: Prompts per validation batch.
        num_workers: Data-loader workers.
        seed: Shuffling and the validation hold-out.
    """

    kind = "prompts"

    def __init__(
        self,
        tokenizer: str,
        source: Optional[str] = None,
        val_source: Optional[str] = None,
        verifiable: Optional[VerifiableData] = None,
        fmt: Optional[Format] = None,
        split: str = "train",
        val_split: str = "train",
        limit: Optional[int] = None,
        val_limit: Optional[int] = None,
        val_fraction: float = 0.0,
        max_prompt_tokens: int = 256,
        keep_columns: Optional[list[str]] = None,
        batch_size: int = 64,
        val_batch_size: Optional[int] = None,
        num_workers: int = 0,
        seed: int = 0,
    ):
        super().__init__(tokenizer, source, val_source, verifiable, split, val_split, limit, val_limit,
                         val_fraction, batch_size, None, val_batch_size, num_workers, seed)
        if max_prompt_tokens < 1:
            raise ConfigError("data.max_prompt_tokens", f"must be >= 1, got {max_prompt_tokens}")
        self.fmt = fmt
        self.max_prompt_tokens = max_prompt_tokens
        if keep_columns is None:
            keep_columns = ["answer"] if verifiable is not None else []
        self.keep_columns = list(keep_columns)

    def _read(self, source, split, limit):
        records, report = read_prompts(source, fmt=self.fmt, split=split, limit=limit, tokenizer=self.tokenizer,
                                       max_prompt_tokens=self.max_prompt_tokens, keep_columns=self.keep_columns)
        self.reports.setdefault("read", []).append(report)
        return records

    def _tokenize(self, records, what):
        examples, report = tokenize_prompts(self.tokenizer, records, self.max_prompt_tokens)
        self.reports[what] = report
        return examples

    @property
    def longest_prompt(self) -> int:
        """Tokens in the longest prompt kept (train and validation)."""
        self.setup()
        return max(len(ex["input_ids"]) for ex in [*self.train_examples, *self.val_examples])

    def _collate(self):
        return partial(collate_prompts, pad_id=self.pad_id)
