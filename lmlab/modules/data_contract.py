"""What a stage's DataModule provides to its LightningModule (and to callbacks).

A stage reads its DataModule only through these protocols, so a new
DataModule knows exactly what to implement and a missing property fails at
the type, not deep inside a training step.
"""

from __future__ import annotations

import inspect
from typing import Any, Optional, Protocol, Sequence, runtime_checkable

from lmlab.errors import ConfigError

__all__ = ["StageData", "PretrainData", "PostTrainData", "SequenceData", "PromptData", "PreferenceData", "provides", "require"]


@runtime_checkable
class StageData(Protocol):
    """Every stage's DataModule: its tokenizer, vocabulary size (checked against the model) and rows per forward/backward."""

    @property
    def tokenizer(self) -> Any: ...

    @property
    def vocab_size(self) -> int: ...

    @property
    def micro_batch_size(self) -> int: ...


@runtime_checkable
class PretrainData(StageData, Protocol):
    """Token windows of a pretraining mixture."""

    seq_len: int
    schedule: Any  # lmlab.data.pretrain.batching.BatchSchedule: samples per optimizer step

    @property
    def eos_id(self) -> Optional[int]: ...

    @property
    def val_source_names(self) -> list[str]: ...

    def token_bytes(self) -> Sequence[int]:
        """UTF-8 bytes of each token id (for bits per byte)."""
        ...


@runtime_checkable
class PostTrainData(StageData, Protocol):
    """Chat-formatted post-training data and the record of the tokenizer it was encoded with."""

    @property
    def tokenizer_info(self) -> dict[str, Any]: ...

    @property
    def pad_id(self) -> int: ...


@runtime_checkable
class SequenceData(PostTrainData, Protocol):
    """Post-training data of fixed maximum length (SFT, preference pairs)."""

    @property
    def seq_len(self) -> int: ...


@runtime_checkable
class PromptData(PostTrainData, Protocol):
    """Prompts for RL: prompts per batch, the stop tokens of a reply and the longest prompt."""

    batch_size: int

    @property
    def stop_ids(self) -> list[int]: ...

    @property
    def longest_prompt(self) -> int: ...


@runtime_checkable
class PreferenceData(SequenceData, Protocol):
    """Preference pairs, tokenized in memory so reference log-probs can be attached to them."""

    train_examples: list[dict]
    val_examples: list[dict]
    val_batch_size: int


def _members(protocol: type) -> set[str]:
    names: set[str] = set()
    for base in protocol.__mro__:
        if not getattr(base, "_is_protocol", False) or base is Protocol:
            continue
        names.update(getattr(base, "__annotations__", {}))
        names.update(n for n, v in vars(base).items() if not n.startswith("_") and (callable(v) or isinstance(v, property)))
    return names


def missing(obj: Any, protocol: type) -> list[str]:
    """Members of ``protocol`` that ``obj`` lacks, found without evaluating any property."""
    absent = []
    for name in sorted(_members(protocol)):
        try:
            inspect.getattr_static(obj, name)
        except AttributeError:
            absent.append(name)
    return absent


def provides(obj: Any, protocol: type) -> bool:
    """Whether ``obj`` has every member of ``protocol`` (properties are not evaluated)."""
    return not missing(obj, protocol)


def require(dm: Any, protocol: type) -> None:
    """``ConfigError`` naming what ``dm`` lacks when it does not provide ``protocol``."""
    absent = missing(dm, protocol)
    if absent:
        raise ConfigError(
            "data",
            f"{type(dm).__name__} lacks {', '.join(absent)}, which this stage reads ({protocol.__name__})",
            "use the DataModule of this stage",
        )
