"""Continual pretraining with replay: a new domain mixed with the original mixture.

A continued run names its new-domain sources (``data.new_sources``) beside the
original mixture (``data.sources``) and the share of training samples that
replays the original mixture (``data.replay_fraction``, f). Both lists become
ONE mixture for the one :class:`~lmlab.data.pretrain.mixture.MixtureSampler`:

    weight(old source i) = f       * w_i / sum(old w)
    weight(new source j) = (1 - f) * v_j / sum(new v)

so the replayed share, the proportions inside each side, determinism and exact
resume all come from the sampler. Every source keeps its validation split,
also at weight 0 (f = 0 still measures forgetting on the original mixture),
and validation reports the two sides pooled as ``val/old_*`` and ``val/new_*``.
"""

from __future__ import annotations

import math
import re
from contextlib import contextmanager
from dataclasses import replace
from typing import Iterator, Optional, Sequence

from lmlab.data.pretrain.sources import SourceConfig, validate_sources
from lmlab.errors import ConfigError

#: names of the two validation groups (``val/old_bpb``, ``val/new_bpb``)
OLD, NEW = "old", "new"


def check_replay(
    sources: Sequence[SourceConfig],
    new_sources: Optional[Sequence[SourceConfig]],
    replay_fraction: Optional[float],
    check_files: bool = True,
) -> None:
    """One-line errors for a bad continual-pretraining setup (nothing to check when neither key is set)."""
    if new_sources is None:
        if replay_fraction is not None:
            raise ConfigError(
                "data.replay_fraction", "is set but data.new_sources is not", "add the new-domain sources or drop replay_fraction"
            )
        return
    if replay_fraction is None:
        raise ConfigError(
            "data.replay_fraction",
            "continual pretraining (data.new_sources) needs the replayed share of the original mixture",
            "set it in [0, 1], e.g. 0.05",
        )
    if not (isinstance(replay_fraction, (int, float)) and math.isfinite(replay_fraction) and 0 <= replay_fraction <= 1):
        raise ConfigError(
            "data.replay_fraction",
            f"must be in [0, 1], got {replay_fraction}",
            "0 trains on the new domain only, 1 on the original mixture only",
        )
    if len(new_sources) == 0:
        raise ConfigError("data.new_sources", "the new domain has no source", "add at least one new-domain source")
    clash = sorted({s.name for s in new_sources} & {s.name for s in sources})
    if clash:
        raise ConfigError(
            "data.new_sources", f"source names {clash} are also in data.sources", "give the new-domain sources their own names"
        )
    if check_files:
        with new_source_fields(0, [s.name for s in new_sources]):
            validate_sources(list(new_sources))


def replay_mixture(
    sources: Sequence[SourceConfig], new_sources: Sequence[SourceConfig], replay_fraction: float
) -> list[SourceConfig]:
    """The original sources then the new ones, with weights ``f * w_i / sum(w)`` and ``(1 - f) * v_j / sum(v)``."""
    old_total = sum(s.weight for s in sources)
    new_total = sum(s.weight for s in new_sources)
    if old_total <= 0 or new_total <= 0:
        field = "data.sources" if old_total <= 0 else "data.new_sources"
        raise ConfigError(field, "weights sum to zero", "give at least one source a positive weight")
    f = float(replay_fraction)
    return [replace(s, weight=f * s.weight / old_total) for s in sources] + [
        replace(s, weight=(1.0 - f) * s.weight / new_total) for s in new_sources
    ]


@contextmanager
def new_source_fields(offset: int, names: Sequence[str]) -> Iterator[None]:
    """Re-address errors about the new-domain sources of a combined list to ``data.new_sources``.

    The tokenizer cache, the sampler and :func:`validate_sources` see one list
    and name its entries ``data.sources[k]`` (or ``data.sources[name]``); for
    the entries from ``offset`` on, which came from ``data.new_sources``, the
    user's key is ``data.new_sources[k - offset]``.
    """
    try:
        yield
    except ConfigError as e:
        m = re.match(r"data\.sources(\[([^\]]+)\])?(.*)$", e.field)
        if m is None:
            raise
        key, rest = m.group(2), m.group(3)
        if key is None:
            if offset:
                raise
            field = "data.new_sources" + rest
        elif key.isdigit() and int(key) >= offset:
            field = f"data.new_sources[{int(key) - offset}]{rest}"
        elif key in names:
            field = f"data.new_sources[{list(names).index(key)}]{rest}"
        else:
            raise
        fix = e.fix.replace("from the mixture", "from data.new_sources") if e.fix else e.fix
        raise ConfigError(field, e.problem, fix) from None
