"""What a judgment is, and the checks every judgment passes before it is stored or counted.

A judgment names the two models as shown (``model_a`` left, ``model_b``
right) and, for ``overall`` and each axis of :data:`AXES`, which was better:
``"a"``, ``"b"`` or ``"tie"``. ``overall`` is always required; an axis may be
``None`` (not judged) where the source has no opinion on it, e.g. a reward
model or a JSONL file with overall preferences only.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

from lmlab.errors import ConfigError

AXES: tuple[str, ...] = ("helpfulness", "harmlessness", "honesty")
CRITERIA: tuple[str, ...] = ("overall", *AXES)
CHOICES: tuple[str, ...] = ("a", "b", "tie")
SOURCES: tuple[str, ...] = ("web", "jsonl", "reward-model")
MAX_ANNOTATOR_LEN = 64

__all__ = ["AXES", "CRITERIA", "CHOICES", "SOURCES", "Judgment", "check_choice", "outcomes_for"]


@dataclass(frozen=True)
class Judgment:
    """One judge's verdict on one pair (choices refer to the displayed sides ``a``/``b``)."""

    pair_id: str
    model_a: str
    model_b: str
    overall: str
    helpfulness: str | None = None
    harmlessness: str | None = None
    honesty: str | None = None
    source: str = "web"
    annotator: str = ""
    created: float = 0.0

    def choice(self, criterion: str) -> str | None:
        """The choice for ``overall`` or an axis."""
        return getattr(self, criterion)


def check_choice(value: Any, field: str, required: bool) -> str | None:
    """``value`` if it is one of :data:`CHOICES` (or ``None`` when not ``required``), else ``ConfigError``."""
    if value is None and not required:
        return None
    if not isinstance(value, str) or value not in CHOICES:
        raise ConfigError(field, f"must be one of {', '.join(CHOICES)}, got {value!r}", "use 'a', 'b' or 'tie'")
    return value


def outcomes_for(judgments: list[Judgment], criterion: str) -> list:
    """:class:`~lmlab.eval.compare.ratings.Outcome` list for ``criterion``, skipping judgments without that axis."""
    from lmlab.eval.compare.ratings import outcomes_from_pairs

    if criterion not in CRITERIA:
        raise ConfigError("criterion", f"unknown criterion {criterion!r}", f"use one of {', '.join(CRITERIA)}")
    return outcomes_from_pairs((j.model_a, j.model_b, j.choice(criterion)) for j in judgments if j.choice(criterion) is not None)


def judgment_from_mapping(obj: Mapping[str, Any], **fixed: Any) -> Judgment:
    """Build a :class:`Judgment` from choices in ``obj`` plus ``fixed`` fields (pair id, models, source ...)."""
    values = {c: check_choice(obj.get(c), c, required=c == "overall") for c in CRITERIA}
    return Judgment(**fixed, **values)
