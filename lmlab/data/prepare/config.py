"""The ``lmlab data prepare`` configuration: sources of the mixture and settings of every stage.

A prepare YAML looks like a training config's ``data.init_args`` with extra
sections (every key optional except ``sources``)::

    seed: 1337
    out: .lmlab_cache/prepared/mix    # OUT; tokens land in OUT/tokens
    num_proc: 4
    train_tokens: 2.0e+9              # budget used to report epochs per source
    tokenizer: .lmlab_cache/tokenizers/mix-8192   # trained on the filtered data if missing
    tokenizer_train: {vocab_size: 8192, sample_chars: 10000000}
    val_fraction: 0.01
    sources:
      - {name: web, weight: 0.65, type: files, path: data/web/*.jsonl, kind: prose}
      - {name: crawl, weight: 0.1, type: warc, path: data/crawl/*.warc.gz}
      - {name: code, weight: 0.06, type: files, path: data/code.jsonl, kind: code}
    normalize: {unicode_form: NFC, strip_gutenberg: true}
    filters:                          # per kind; a source may override with its own list
      prose: [gopher_repetition, gopher_quality, {name: c4, enabled: false}, fineweb]
      code: [code]
    quality: {weights: {perplexity: 0.7, diversity: 0.15, safety: 0.15}, keep_fraction: 0.8, apply_to: [web]}
    dedup: {exact: true, near: true, threshold: 0.8}
    decontaminate: {eval_dir: data/eval, drop: true}

A training experiment YAML (``model``/``trainer``/``data``) is accepted too:
its ``data.init_args`` gives the sources, tokenizer, validation fraction and
seed, and every other setting takes its default.

Source entries take every :class:`~lmlab.data.pretrain.sources.SourceConfig` field plus:
``type: warc`` (WARC files, HTML responses go through main-text extraction) or
``type: html`` (``.html``/``.html.gz`` files, directories or ``.tar`` archives of
them), ``kind`` (``prose`` or ``code``: picks the filter stack), ``filters``
(this source's own stack), ``split_pattern`` (a regex; in text files a new
document starts at every match), ``extract`` (trafilatura options) and
``quality`` (force quality selection on or off for this source).
"""

from __future__ import annotations

import dataclasses
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Mapping, Optional

import yaml

from lmlab.data.prepare.normalize import NormalizeConfig
from lmlab.data.pretrain.sources import SourceConfig
from lmlab.data.textread import DEFAULT_MAX_MISSING_TEXT_FRACTION
from lmlab.data.tokenizer import TokenizerTrainConfig
from lmlab.errors import ConfigError
from lmlab.eval.data import resolve_data_dir
from lmlab.settings import read_settings

SOURCE_TYPES = ("files", "hf", "stdlib", "warc", "html")
KINDS = ("prose", "code")
ENGINES = ("local", "datatrove", "slurm")

DEFAULT_FILTERS: dict[str, list[Any]] = {
    "prose": ["gopher_repetition", "gopher_quality", "c4", "fineweb"],
    "code": ["code"],
}


@dataclass
class PrepSource:
    """One source of the mixture as the prepare pipeline reads it (see the module docstring)."""

    name: str
    weight: float = 1.0
    type: str = "files"
    path: str = ""
    name_config: Optional[str] = None
    split: str = "train"
    streaming: bool = False
    text_field: Optional[str] = None
    max_documents: Optional[int] = None
    max_chars: Optional[int] = 1_000_000
    kind: Optional[str] = None
    filters: Optional[list[Any]] = None
    split_pattern: Optional[str] = None
    extract: Optional[dict[str, Any]] = None
    quality: Optional[bool] = None
    max_missing_text_fraction: float = DEFAULT_MAX_MISSING_TEXT_FRACTION

    def __post_init__(self) -> None:
        if self.kind is None:
            # Same rule as the filters' SourceRouter: a source named code is code.
            self.kind = "code" if self.name == "code" or (self.type == "stdlib" and self.path == "code") else "prose"

    def source_config(self) -> SourceConfig:
        """The plain :class:`SourceConfig` (for ``files``/``hf``/``stdlib`` reading and training YAMLs)."""
        return SourceConfig(
            name=self.name,
            weight=self.weight,
            type=self.type if self.type in ("files", "hf", "stdlib") else "files",  # type: ignore[arg-type]
            path=self.path,
            name_config=self.name_config,
            split=self.split,
            streaming=self.streaming,
            text_field=self.text_field,
            max_documents=self.max_documents,
            max_chars=self.max_chars,
            max_missing_text_fraction=self.max_missing_text_fraction,
        )


@dataclass
class QualitySettings:
    """Quality scoring and selection.

    Args:
        enabled: Score documents at all (scores are reported for every source).
        weights: ``{perplexity, diversity, safety}`` term weights.
        perplexity_range: ``[lo, hi]`` perplexities mapped to 1 and 0; ``null``
            calibrates per source at its 5th/95th percentile (as CCNet buckets
            each language by its own quantiles).
        threshold: Keep documents scoring at least this much.
        keep_fraction: Keep the best fraction of each selected source.
        apply_to: Names or kinds of the sources selection applies to; ``null``:
            prose sources that are not reference sources.
        reference_sources: Sources whose text fits the bigram reference model.
        reference_max_chars: Characters of reference text used for the fit.
        reference_model: An lmlab checkpoint (``.ckpt`` or export directory)
            whose per-document perplexity replaces the bigram model.
        reference_tokenizer: Tokenizer of ``reference_model`` (default: the one
            the checkpoint carries, see :meth:`lmlab.models.checkpoint.Checkpoint.tokenizer`).
        reference_max_tokens: Tokens of each document the neural model scores.
        device: Device for the neural reference model (``cpu``, ``cuda``).
        diversity_window: Segment length of the type-token ratio.
        max_unsafe_rate: Unsafe-token rate at which the safety term reaches 0.
    """

    enabled: bool = True
    weights: dict[str, float] = field(default_factory=lambda: {"perplexity": 0.7, "diversity": 0.15, "safety": 0.15})
    perplexity_range: Optional[list[float]] = None
    threshold: Optional[float] = None
    keep_fraction: Optional[float] = None
    apply_to: Optional[list[str]] = None
    reference_sources: list[str] = field(default_factory=lambda: ["reference", "books"])
    reference_max_chars: int = 5_000_000
    reference_model: Optional[str] = None
    reference_tokenizer: Optional[str] = None
    reference_max_tokens: int = 1024
    device: str = "cpu"
    diversity_window: int = 100
    max_unsafe_rate: float = 0.01

    def __post_init__(self) -> None:
        bad = sorted(set(self.weights or {}) - {"perplexity", "diversity", "safety"})
        if bad:
            raise ConfigError(f"quality.weights.{bad[0]}", "unknown term", "terms are perplexity, diversity, safety")
        if self.keep_fraction is not None and not 0.0 < float(self.keep_fraction) <= 1.0:
            raise ConfigError("quality.keep_fraction", f"must be in (0, 1], got {self.keep_fraction}", "use e.g. 0.8")
        if self.perplexity_range is not None and len(self.perplexity_range) != 2:
            raise ConfigError("quality.perplexity_range", "must be [lo, hi]", "e.g. [100, 3000], or null to calibrate")


@dataclass
class DedupSettings:
    """Exact and MinHash near-duplicate removal across all sources (first source, then earliest document, wins)."""

    exact: bool = True
    near: bool = True
    num_perm: int = 112
    bands: Optional[int] = 14
    rows: Optional[int] = 8
    ngram: int = 5
    threshold: float = 0.8
    verify: bool = True
    verify_threshold: Optional[float] = None
    seed: int = 1

    def __post_init__(self) -> None:
        self.minhash_config()  # validates the MinHash settings now, before any work

    def minhash_config(self):
        from lmlab.data.prepare.dedup import MinHashConfig

        d = dataclasses.asdict(self)
        d.pop("exact")
        d.pop("near")
        return MinHashConfig(**d)


@dataclass
class DecontamSettings:
    """13-gram decontamination against evaluation sets.

    Args:
        enabled: Check documents at all.
        eval_dir: Folder of evaluation files (see :mod:`lmlab.data.prepare.eval_sets`);
            unset, the one ``lmlab eval`` reads: ``$LMLAB_EVAL_DATA``, else ``data/eval``.
        n: N-gram length.
        min_item_tokens: Shorter evaluation items are skipped.
        drop: Remove contaminated documents (else only report them).
    """

    enabled: bool = True
    eval_dir: Optional[str] = None
    n: int = 13
    min_item_tokens: int = 8
    drop: bool = True

    def eval_path(self) -> Path:
        """The evaluation-data folder this stage reads (see :func:`lmlab.eval.data.resolve_data_dir`)."""
        return resolve_data_dir(self.eval_dir)


@dataclass
class EngineSettings:
    """Where the per-source stages run.

    Args:
        name: ``local`` (``num_proc`` processes), ``datatrove`` (datatrove's
            ``LocalPipelineExecutor``: ``tasks`` tasks, ``workers`` at a time) or
            ``slurm`` (a ``SlurmPipelineExecutor`` job array of ``tasks`` per stage).
        tasks: Tasks per stage (datatrove/slurm).
        workers: Tasks running at once (datatrove).
        slurm: Settings for ``slurm``: ``partition`` (required), ``time``,
            ``cpus_per_task``, ``mem_per_cpu_gb``, ``venv_path``, ``sbatch_args``,
            ``poll_seconds``, ``max_wait_seconds``, ...
    """

    name: str = "local"
    tasks: int = 4
    workers: int = 2
    slurm: Optional[dict[str, Any]] = None

    def __post_init__(self) -> None:
        if self.name not in ENGINES:
            raise ConfigError("engine.name", f"unknown engine {self.name!r}", f"use one of {', '.join(ENGINES)}")
        if self.tasks < 1 or self.workers < 1:
            raise ConfigError("engine.tasks", "tasks and workers must be >= 1", "use e.g. tasks: 4, workers: 2")
        if self.name == "slurm" and not (self.slurm or {}).get("partition"):
            raise ConfigError("engine.slurm.partition", "is required for the slurm engine", "name the Slurm partition to submit to")


@dataclass
class ReportSettings:
    """Report options: histogram bins, W&B logging when a run is active."""

    histogram_bins: int = 30
    wandb: bool = True


@dataclass
class PrepareConfig:
    """The whole ``lmlab data prepare`` configuration (see the module docstring).

    :func:`load_config` reads it with :func:`lmlab.settings.read_settings`;
    built directly, mapping sections (``quality={...}``) are read the same way.
    ``sources`` entries are read one by one so errors name ``sources[i]``.
    """

    sources: list[Any]
    seed: int = 1337
    out: Optional[str] = None
    num_proc: Optional[int] = None
    shard_docs: int = 1000
    val_fraction: float = 0.01
    train_tokens: Optional[float] = None
    tokenizer: Optional[str] = None
    tokenizer_train: TokenizerTrainConfig = field(default_factory=TokenizerTrainConfig)
    normalize: NormalizeConfig = field(default_factory=NormalizeConfig)
    max_line_chars: Optional[int] = 100_000
    filters: Optional[dict[str, Any]] = None
    quality: QualitySettings = field(default_factory=QualitySettings)
    dedup: DedupSettings = field(default_factory=DedupSettings)
    decontaminate: DecontamSettings = field(default_factory=DecontamSettings)
    engine: EngineSettings = field(default_factory=EngineSettings)
    report: ReportSettings = field(default_factory=ReportSettings)

    def __post_init__(self) -> None:
        if not isinstance(self.sources, list) or not self.sources:
            raise ConfigError("sources", "the mixture has no sources", "list at least one source")
        self.sources = [self._source(i, s) for i, s in enumerate(self.sources)]
        names = [s.name for s in self.sources]
        dup = sorted({n for n in names if names.count(n) > 1})
        if dup:
            raise ConfigError("sources", f"duplicate source name {dup[0]!r}", "give each source a unique name")
        if sum(s.weight for s in self.sources) <= 0:
            raise ConfigError("sources", "weights sum to zero", "give at least one source a positive weight")
        self.tokenizer_train = read_settings(TokenizerTrainConfig, self.tokenizer_train, "tokenizer_train")
        self.normalize = read_settings(NormalizeConfig, self.normalize, "normalize")
        self.quality = read_settings(QualitySettings, self.quality, "quality")
        self.dedup = read_settings(DedupSettings, self.dedup, "dedup")
        self.decontaminate = read_settings(DecontamSettings, self.decontaminate, "decontaminate")
        self.engine = read_settings(EngineSettings, self.engine, "engine")
        self.report = read_settings(ReportSettings, self.report, "report")
        filters = dict(DEFAULT_FILTERS)
        if self.filters is not None:
            if not isinstance(self.filters, Mapping):
                raise ConfigError("filters", "expected a mapping kind -> list of filters", "e.g. filters: {prose: [c4]}")
            bad = sorted(set(self.filters) - set(KINDS))
            if bad:
                raise ConfigError(f"filters.{bad[0]}", "unknown source kind", "use prose or code")
            filters.update({k: list(v or []) for k, v in self.filters.items()})
        self.filters = filters
        if not 0 <= self.val_fraction < 1:
            raise ConfigError("val_fraction", f"must be in [0, 1), got {self.val_fraction}", "use e.g. 0.01")
        if self.shard_docs < 1:
            raise ConfigError("shard_docs", f"must be >= 1, got {self.shard_docs}", "use e.g. 1000")
        if self.max_line_chars is not None and self.max_line_chars < 1:
            raise ConfigError("max_line_chars", "must be positive or null", "use e.g. 100000")
        refs = set(self.quality.reference_sources or [])
        if self.quality.enabled and self.quality.reference_model is None and not refs & set(names):
            if self.quality.threshold is not None or self.quality.keep_fraction is not None:
                raise ConfigError(
                    "quality.reference_sources",
                    f"none of {sorted(refs)} is a source of the mixture",
                    "name the clean sources the bigram reference model is fitted on, or set quality.reference_model",
                )
            # scores would only be reported: without reference text there is nothing to score against
            self.quality.enabled = False
        for s in self.sources:
            # Fail before any work on filter names or parameters that do not exist.
            self.filter_stack(s)

    @staticmethod
    def _source(i: int, s: Any) -> PrepSource:
        where = f"sources[{i}]"
        if isinstance(s, PrepSource):
            src = s
        elif isinstance(s, SourceConfig):
            src = PrepSource(**dataclasses.asdict(s))
        else:
            src = read_settings(PrepSource, s, where)
        if not src.name or not isinstance(src.name, str) or "/" in src.name or src.name.startswith("."):
            raise ConfigError(f"{where}.name", f"invalid source name {src.name!r}", "use a short name such as web")
        if src.type not in SOURCE_TYPES:
            raise ConfigError(f"{where}.type", f"unknown source type {src.type!r}", f"use one of {', '.join(SOURCE_TYPES)}")
        if src.kind not in KINDS:
            raise ConfigError(f"{where}.kind", f"unknown kind {src.kind!r}", "use prose or code")
        if not (src.weight >= 0):
            raise ConfigError(f"{where}.weight", f"must be >= 0, got {src.weight}", "use a non-negative weight")
        if src.max_documents is not None and src.max_documents < 1:
            raise ConfigError(f"{where}.max_documents", "must be positive or null", "use e.g. 1000")
        if src.split_pattern is not None:
            import re

            try:
                re.compile(src.split_pattern, re.MULTILINE)
            except re.error as e:
                raise ConfigError(f"{where}.split_pattern", f"invalid regex: {e}", "fix the pattern") from None
        return src

    # -- derived settings -----------------------------------------------------------
    def source_index(self, name: str) -> int:
        return [s.name for s in self.sources].index(name)

    def filter_specs(self, src: PrepSource) -> list[Any]:
        """The filter specs of a source, with disabled entries (``enabled: false``) removed."""
        specs = src.filters if src.filters is not None else self.filters.get(src.kind, [])
        out = []
        for spec in specs:
            if isinstance(spec, Mapping):
                spec = dict(spec)
                if not spec.pop("enabled", True):
                    continue
            out.append(spec)
        return out

    def filter_stack(self, src: PrepSource):
        """The :class:`FilterStack` of a source, or ``None`` when it has no filters."""
        from lmlab.data.prepare.filters import FilterStack

        specs = self.filter_specs(src)
        if not specs:
            return None
        i = self.source_index(src.name)
        try:
            return FilterStack.from_config(specs, name=src.name)
        except ConfigError as e:
            where = f"sources[{i}].filters" if src.filters is not None else f"filters.{src.kind}"
            raise ConfigError(f"{where}: {e.field}", e.problem, e.fix) from None

    def quality_applies(self, src: PrepSource) -> bool:
        """Whether quality selection (threshold / keep fraction) applies to ``src``."""
        q = self.quality
        if not q.enabled or (q.threshold is None and q.keep_fraction is None):
            return False
        if src.quality is not None:
            return bool(src.quality)
        if q.apply_to is not None:
            return src.name in q.apply_to or src.kind in q.apply_to
        return src.kind == "prose" and src.name not in (q.reference_sources or [])

    @property
    def weights(self) -> dict[str, float]:
        total = sum(s.weight for s in self.sources)
        return {s.name: s.weight / total for s in self.sources}


def _read_yaml(path: str | os.PathLike) -> dict:
    p = Path(path)
    try:
        data = yaml.safe_load(p.read_text())
    except FileNotFoundError:
        raise ConfigError("--config", f"{path} does not exist", "give a prepare YAML such as experiments/data/shared_mix.yaml") from None
    except yaml.YAMLError as e:
        raise ConfigError("--config", f"{path} is not valid YAML ({str(e).splitlines()[0]})", "fix the YAML syntax") from None
    if not isinstance(data, dict):
        raise ConfigError("--config", f"{path} does not hold a mapping", "write the config as key: value pairs")
    return data


def from_training_yaml(data: Mapping[str, Any], stem: str) -> dict:
    """The prepare settings a training experiment YAML implies (sources, tokenizer, split, seed, OUT)."""
    section = data.get("data") or {}
    init = section.get("init_args", section) if isinstance(section, Mapping) else {}
    if not init.get("sources"):
        raise ConfigError("data.init_args.sources", "the training config defines no sources", "add data sources")
    out: dict[str, Any] = {"sources": list(init["sources"])}
    for key in ("tokenizer", "tokenizer_train", "val_fraction", "seed"):
        if init.get(key) is not None:
            out[key] = init[key]
    prepared = init.get("prepared_dir")
    if prepared:
        p = Path(prepared)
        if p.name != "tokens":
            raise ConfigError(
                "data.init_args.prepared_dir",
                f"{prepared} is not an OUT/tokens directory",
                "point prepared_dir at <OUT>/tokens, where lmlab data prepare writes the token arrays",
            )
        out["out"] = str(p.parent)
    else:
        out["out"] = f".lmlab_cache/prepared/{stem}"
    if not DecontamSettings().eval_path().is_dir():
        # a training YAML cannot name an eval folder; without the configured one, skip the check
        out["decontaminate"] = {"enabled": False}
    return out


def load_config(path: str | os.PathLike, overrides: Mapping[str, Any] | None = None) -> PrepareConfig:
    """Read a prepare YAML or a training experiment YAML into a :class:`PrepareConfig`."""
    data = _read_yaml(path)
    if "data" in data and "sources" not in data:
        data = from_training_yaml(data, Path(path).stem)
    if not data.get("out"):
        data = {**data, "out": f".lmlab_cache/prepared/{Path(path).stem}"}
    data = {**data, **{k: v for k, v in (overrides or {}).items() if v is not None}}
    return read_settings(PrepareConfig, data)
