"""Document-level stages of the data pipeline.

A document is a dict with at least ``text`` (plus usually ``id``, ``source`` and
``metadata``). The stages, each in its own module:

- :mod:`.normalize` — decoding, NFC, whitespace, Project Gutenberg boilerplate;
- :mod:`.filters` — Gopher / C4 / FineWeb / code / language filters and stacks;
- :mod:`.quality` — perplexity + diversity + safety quality score, selection;
- :mod:`.agreement` — agreement of filters and score with human labels;
- :mod:`.dedup` — exact and MinHash-LSH near-duplicate removal;
- :mod:`.decontaminate` / :mod:`.eval_sets` — 13-gram overlap with eval sets.

:mod:`.prepare` runs them as ``lmlab data prepare``: a cached, resumable,
parallel pipeline from a mixture's sources to the token arrays a training run
reads (see ``docs/data.md``).
"""

from __future__ import annotations

from lmlab.data.prepare.decontaminate import (
    ContaminationIndex,
    ContaminationReport,
    Decontaminator,
    decontaminate,
)
from lmlab.data.prepare.dedup import (
    DedupResult,
    MinHashConfig,
    MinHashDeduplicator,
    exact_dedup,
    lsh_params_for_threshold,
    near_dedup,
)
from lmlab.data.prepare.eval_sets import EvalItem, iter_eval_dir
from lmlab.data.prepare.filters import (
    C4Filter,
    CodeFilter,
    FilterStack,
    FineWebFilter,
    GopherQualityFilter,
    GopherRepetitionFilter,
    LanguageFilter,
    SourceRouter,
    default_stack,
)
from lmlab.data.prepare.normalize import NormalizeConfig, Normalizer, decode_bytes, normalize_text, strip_gutenberg
from lmlab.data.prepare.quality import (
    BigramReferenceModel,
    QualityFilter,
    QualityScorer,
    QualityWeights,
    select_by_threshold,
    select_top_fraction,
)
from lmlab.data.prepare.stats import DocStats

__all__ = [
    "BigramReferenceModel",
    "C4Filter",
    "CodeFilter",
    "ContaminationIndex",
    "ContaminationReport",
    "Decontaminator",
    "DedupResult",
    "DocStats",
    "EvalItem",
    "FilterStack",
    "FineWebFilter",
    "GopherQualityFilter",
    "GopherRepetitionFilter",
    "LanguageFilter",
    "MinHashConfig",
    "MinHashDeduplicator",
    "NormalizeConfig",
    "Normalizer",
    "QualityFilter",
    "QualityScorer",
    "QualityWeights",
    "SourceRouter",
    "decode_bytes",
    "decontaminate",
    "default_stack",
    "exact_dedup",
    "iter_eval_dir",
    "lsh_params_for_threshold",
    "near_dedup",
    "normalize_text",
    "select_by_threshold",
    "select_top_fraction",
    "strip_gutenberg",
]
