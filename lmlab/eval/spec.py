"""Task specifications: one YAML file per task, read into :class:`TaskSpec` and checked here.

A spec says where the data is, how a row becomes a prompt, which field holds
the answer, how few-shot examples are drawn and which metrics to report. The
dataclasses below are the schema: jsonargparse reads the YAML into them
(:func:`lmlab.settings.read_settings`: unknown keys, types, strings kept
verbatim), then :func:`parse_spec` checks what types cannot say. Every
mistake is a :class:`lmlab.errors.ConfigError` naming the key and the fix, so a
bad YAML fails before any model work starts; ``null`` means a key's default.
The keys (see the YAMLs in ``lmlab/eval/tasks/`` for worked examples)::

    name: arc_easy                 # default: the file name
    type: multiple_choice          # multiple_choice | cloze | generation | code
    data:
      path: arc_easy_test_icl.jsonl   # relative to data_dir, or absolute
      format: jsonl                # jsonl | jsonl.gz | json | csv | mmlu_tar (default: by suffix)
      split: test                  # for split-aware formats (mmlu_tar)
      fields: {query: question}    # optional: new field <- dotted path, "{template}" or list of paths
      transform: null              # optional named row transform (lmlab.eval.transforms)
      hf: {path: allenai/ai2_arc, name: ARC-Easy, split: test, fewshot_split: train,
           fields: {...}, transform: ...}   # used only when the local file is absent and online
    description: ""                # template, prepended once before the few-shot examples
    doc_to_text: "{query}\\nAnswer:"  # the prompt template
    doc_to_choice: choices         # multiple_choice: a field holding the choices, or a literal list
    doc_to_contexts: null          # multiple_choice partial scoring: field with one context per option
    doc_to_target: null            # target template (few-shot answers, references, shared continuation)
    answer: gold                   # the field holding the gold answer (required)
    answer_labels: null            # labels (list or field) a string answer is looked up in
    target_delimiter: " "
    fewshot_delimiter: "\\n\\n"
    fewshot: {num: 0, split: null, path: null, sampler: random, group_by: null}
    generation: {max_new_tokens: 256, stop: []}
    filters: [{name: strict-match, function: regex, regex: "...", group_select: 0}]
    exact_match: {ignore_case: false, ignore_punctuation: false, regexes_to_ignore: []}
    code: {program: "{prompt}{completion}\\n{test}", timeout_s: 3.0, memory_mb: 1024, num_samples: 1}
    metrics: [acc, acc_norm]
    subtask_field: null            # report metrics per value of this field too (e.g. MMLU subject)
"""

from __future__ import annotations

import dataclasses
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Optional, Union

import yaml

from lmlab.errors import ConfigError
from lmlab.eval.templates import check_template
from lmlab.eval.transforms import TRANSFORMS
from lmlab.settings import read_settings

TYPE_METRICS: dict[str, dict[str, Any]] = {
    # allowed metrics and the defaults used when `metrics` is omitted
    "multiple_choice": {"metrics": {"acc", "acc_norm"}, "default": ["acc", "acc_norm"]},
    "cloze": {"metrics": {"acc", "perplexity"}, "default": ["perplexity", "acc"]},
    "generation": {"metrics": {"exact_match"}, "default": ["exact_match"]},
    "code": {"metrics": set(), "default": ["pass@1"]},  # pass@k, checked by pattern
}
DATA_FORMATS = ("jsonl", "jsonl.gz", "json", "csv", "mmlu_tar")
SAMPLERS = ("random", "first_n")
FILTER_FUNCTIONS = ("regex", "boxed", "none")
_PASS_AT_K = re.compile(r"^pass@([1-9][0-9]*)$")
#: keys whose value may be one string instead of a list of them
_LIST_KEYS = {("metrics",), ("generation", "stop"), ("exact_match", "regexes_to_ignore")}


@dataclass(frozen=True)
class HubSource:
    """Where to fetch the data with ``datasets.load_dataset`` when no local file exists.

    ``transform`` defaults to ``data.transform``.
    """

    path: str = ""  # required; empty until read
    name: Optional[str] = None
    split: str = "test"
    fewshot_split: Optional[str] = None
    fields: Optional[dict[str, Any]] = None
    transform: Optional[str] = None
    revision: Optional[str] = None


@dataclass(frozen=True)
class DataSpec:
    """The local data file and how its rows map onto the fields the templates use."""

    path: Optional[str] = None
    format: Optional[str] = None
    split: Optional[str] = None
    fields: dict[str, Any] = field(default_factory=dict)
    transform: Optional[str] = None
    hf: Optional[HubSource] = None


@dataclass(frozen=True)
class FewshotSpec:
    """How many few-shot examples, from where, chosen how."""

    num: int = 0
    split: Optional[str] = None  # another split of the same source (MMLU: dev)
    path: Optional[str] = None  # a separate file (relative to data_dir)
    sampler: str = "random"
    group_by: Optional[str] = None  # only examples sharing this field's value (MMLU: subject)
    seed: Optional[int] = None  # default: the harness seed


@dataclass(frozen=True)
class GenerationSpec:
    """Decoding limits for generation and code tasks."""

    max_new_tokens: int = 256
    stop: tuple[str, ...] = ()


@dataclass(frozen=True)
class FilterSpec:
    """An answer-extraction step applied to a generation before exact match."""

    name: str = ""  # required in a task YAML
    function: str = "regex"
    regex: Optional[str] = None
    group_select: int = 0
    fallback: str = "[invalid]"


@dataclass(frozen=True)
class ExactMatchSpec:
    """Normalisation applied to prediction and reference before comparing (lm-eval's options)."""

    ignore_case: bool = False
    ignore_punctuation: bool = False
    regexes_to_ignore: tuple[str, ...] = ()


@dataclass(frozen=True)
class CodeSpec:
    """How a completion becomes a test program and how it is run."""

    program: str = ""  # required; a template with {completion}
    timeout_s: float = 3.0
    memory_mb: int = 1024
    num_samples: int = 1
    workers: Optional[int] = None


@dataclass(frozen=True)
class TaskSpec:
    """A task YAML: the schema jsonargparse reads, and after :func:`parse_spec` a validated task.

    ``type`` and ``answer`` are required (empty until read); ``metrics``
    defaults per type; ``filters`` apply to type generation only.
    """

    name: str
    type: str = ""
    data: DataSpec = field(default_factory=DataSpec)
    answer: str = ""
    doc_to_text: Optional[str] = None
    doc_to_choice: Union[str, tuple[str, ...], None] = None
    doc_to_contexts: Optional[str] = None
    doc_to_target: Optional[str] = None
    answer_labels: Union[str, tuple[Union[str, int], ...], None] = None
    description: str = ""
    target_delimiter: str = " "
    fewshot_delimiter: str = "\n\n"
    fewshot: FewshotSpec = field(default_factory=FewshotSpec)
    generation: GenerationSpec = field(default_factory=GenerationSpec)
    filters: tuple[FilterSpec, ...] = ()
    exact_match: ExactMatchSpec = field(default_factory=ExactMatchSpec)
    code: Optional[CodeSpec] = None
    metrics: tuple[str, ...] = ()
    subtask_field: Optional[str] = None
    origin: str = field(default="<dict>", init=False)  # the file it was read from; not a YAML key

    @property
    def pass_at_ks(self) -> tuple[int, ...]:
        """The k of every ``pass@k`` metric, ascending."""
        return tuple(sorted(int(m.group(1)) for m in map(_PASS_AT_K.match, self.metrics) if m))


def load_spec_file(path: str | Path) -> TaskSpec:
    """Read and validate one task YAML."""
    path = Path(path)
    try:
        raw = yaml.safe_load(path.read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise ConfigError(str(path), "task file not found", "check the task name or path") from None
    except yaml.YAMLError as e:
        problem = " ".join(str(e).split())
        raise ConfigError(str(path), f"invalid YAML: {problem}", "fix the YAML syntax") from None
    return parse_spec(raw, default_name=path.stem, origin=str(path))


def parse_spec(raw: Any, default_name: str = "task", origin: str = "<dict>") -> TaskSpec:
    """Read a task mapping (as loaded from YAML) into a validated :class:`TaskSpec`."""
    if not isinstance(raw, dict):
        raise ConfigError(origin, "a task spec must be a YAML mapping", "see lmlab/eval/tasks/*.yaml")
    raw = _without_nulls(raw)
    name = raw.get("name", default_name)
    if not isinstance(name, str) or not name:
        raise ConfigError(f"{origin}.name", "must be a non-empty string", "e.g. name: arc_easy")
    p = name  # prefix for field names in errors
    raw = _as_lists({**raw, "name": name})
    filters = raw.pop("filters", None)
    spec = read_settings(TaskSpec, raw, p)
    if spec.type not in TYPE_METRICS:
        raise ConfigError(
            f"{p}.type", f"unknown task type {spec.type or None!r}", f"use one of: {', '.join(TYPE_METRICS)}"
        )
    if not spec.answer:
        hint = {
            "multiple_choice": "the field with the gold choice index or label, e.g. answer: gold",
            "cloze": "the field with the word to predict, e.g. answer: continuation",
            "generation": "the field with the reference answer, e.g. answer: answer",
            "code": "the field with the unit tests, e.g. answer: test",
        }[spec.type]
        raise ConfigError(f"{p}.answer", f"is required for type {spec.type}", f"name {hint}")
    for key in ("doc_to_text", "doc_to_target", "description"):
        _check_template(getattr(spec, key), f"{p}.{key}")
    spec = dataclasses.replace(
        spec,
        data=_check_data(spec.data, p),
        doc_to_choice=_check_choice(spec.doc_to_choice, p),
        answer_labels=spec.answer_labels if spec.answer_labels is None or isinstance(spec.answer_labels, str)
        else tuple(str(v) for v in spec.answer_labels),
        filters=_read_filters(filters, p),
        metrics=_check_metrics(spec.metrics, "metrics" in raw, spec.type, p),
    )
    _check_fewshot(spec.fewshot, p)
    _check_generation(spec.generation, p)
    _check_exact_match(spec.exact_match, p)
    _check_code(spec.code, p)
    object.__setattr__(spec, "origin", origin)
    _check_type_requirements(spec)
    return spec


def _check_type_requirements(spec: TaskSpec) -> None:
    p = spec.name
    if spec.type == "multiple_choice":
        if (spec.doc_to_choice is None) == (spec.doc_to_contexts is None):
            raise ConfigError(
                f"{p}.doc_to_choice",
                "set exactly one of doc_to_choice and doc_to_contexts",
                "doc_to_choice for scored answers, doc_to_contexts for partial (WinoGrande-style) scoring",
            )
        if spec.doc_to_contexts is not None and spec.doc_to_target is None:
            raise ConfigError(
                f"{p}.doc_to_target",
                "partial scoring needs the shared continuation",
                'e.g. doc_to_target: "{continuation}"',
            )
        if spec.doc_to_contexts is None and spec.doc_to_text is None:
            raise ConfigError(f"{p}.doc_to_text", "is required", 'e.g. doc_to_text: "{query}"')
    else:
        if spec.doc_to_text is None:
            raise ConfigError(f"{p}.doc_to_text", "is required", 'e.g. doc_to_text: "{question}"')
    if spec.type == "code":
        if spec.code is None:
            raise ConfigError(
                f"{p}.code", "is required for type code",
                'e.g. code: {program: "{prompt}{completion}\\n{test}\\ncheck({entry_point})"}',
            )
        if spec.pass_at_ks and max(spec.pass_at_ks) > spec.code.num_samples:
            raise ConfigError(
                f"{p}.code.num_samples",
                f"is {spec.code.num_samples}, below the largest k ({max(spec.pass_at_ks)})",
                "raise num_samples to at least the largest k in metrics",
            )
    elif spec.code is not None:
        raise ConfigError(f"{p}.code", f"only applies to type code, not {spec.type}", "remove it")
    if spec.filters and spec.type != "generation":
        raise ConfigError(f"{p}.filters", "only apply to type generation", "remove them")


# --- checks types cannot express ----------------------------------------------------------------


def _without_nulls(value: Any) -> Any:
    """``null`` means a key's default everywhere in a task YAML: drop those keys before reading."""
    if isinstance(value, dict):
        return {k: _without_nulls(v) for k, v in value.items() if v is not None}
    if isinstance(value, list):
        return [_without_nulls(v) for v in value]
    return value


def _as_lists(raw: dict) -> dict:
    """``metrics: acc`` as ``metrics: [acc]`` (and likewise ``stop``, ``regexes_to_ignore``)."""
    raw = dict(raw)
    for path in _LIST_KEYS:
        holder = raw
        for key in path[:-1]:
            if not isinstance(holder.get(key), dict):
                break
            holder[key] = holder = dict(holder[key])
        else:
            if isinstance(holder.get(path[-1]), str):
                holder[path[-1]] = [holder[path[-1]]]
    return raw


def _check_template(value: Optional[str], key: str) -> None:
    if value is not None:
        try:
            check_template(value)
        except ValueError as e:
            raise ConfigError(key, f"bad template: {e}", "write literal braces as {{ and }}") from None


def _check_regex(value: str, key: str) -> None:
    try:
        re.compile(value)
    except re.error as e:
        raise ConfigError(key, f"invalid regular expression {value!r}: {e}", "fix the pattern (escape literal characters with \\)") from None


def _at_least(value: int, key: str, minimum: int, example: Any) -> None:
    if value < minimum:
        raise ConfigError(key, f"must be an integer >= {minimum}, got {value!r}", f"use e.g. {example}")


def _check_fields(fields: Optional[dict[str, Any]], key: str) -> None:
    for name, source in (fields or {}).items():
        ok = isinstance(source, str) or (isinstance(source, list) and all(isinstance(s, str) for s in source))
        if not ok:
            raise ConfigError(f"{key}.{name}", "must be a dotted path, a template or a list of paths",
                              'e.g. query: question, text: "{title}: {body}" or choices: [a, b]')
        if isinstance(source, str) and "{" in source:
            try:
                check_template(source)
            except ValueError as e:
                raise ConfigError(f"{key}.{name}", f"bad template: {e}", "write literal braces as {{ and }}") from None


def _check_transform(name: Optional[str], key: str) -> None:
    if name is not None and name not in TRANSFORMS:
        raise ConfigError(key, f"unknown transform {name!r}", f"use one of: {', '.join(TRANSFORMS)}")


def _check_data(d: DataSpec, p: str) -> DataSpec:
    if d.path is None and d.hf is None:
        raise ConfigError(f"{p}.data.path", "no data source", "set data.path (relative to data_dir) or data.hf")
    fmt = d.format
    if fmt is not None and fmt not in DATA_FORMATS:
        raise ConfigError(f"{p}.data.format", f"unknown format {fmt!r}", f"use one of: {', '.join(DATA_FORMATS)}")
    if fmt is None and d.path is not None:
        fmt = infer_format(d.path)
        if fmt is None:
            raise ConfigError(
                f"{p}.data.format", f"cannot tell the format of {d.path!r} from its name",
                f"set data.format to one of: {', '.join(DATA_FORMATS)}",
            )
    _check_transform(d.transform, f"{p}.data.transform")
    _check_fields(d.fields, f"{p}.data.fields")
    hf = d.hf
    if hf is not None:
        _check_transform(hf.transform, f"{p}.data.hf.transform")
        if not hf.path:
            raise ConfigError(f"{p}.data.hf.path", "is required", "the hub dataset id, e.g. allenai/ai2_arc")
        _check_fields(hf.fields, f"{p}.data.hf.fields")
        if hf.transform is None:
            hf = dataclasses.replace(hf, transform=d.transform)
    return dataclasses.replace(d, format=fmt, hf=hf)


def infer_format(path: str) -> str | None:
    """The data format implied by a file name, or None."""
    lower = path.lower()
    if lower.endswith((".jsonl.gz", ".json.gz")):
        return "jsonl.gz"
    for suffix, fmt in ((".jsonl", "jsonl"), (".json", "json"), (".csv", "csv")):
        if lower.endswith(suffix):
            return fmt
    if lower.endswith((".tar.gz", ".tgz", ".tar")) and "mmlu" in Path(lower).name:
        return "mmlu_tar"
    return None


def _check_choice(value: Union[str, tuple[str, ...], None], p: str) -> Union[str, tuple[str, ...], None]:
    if isinstance(value, tuple) and not value:
        raise ConfigError(f"{p}.doc_to_choice", "must be a field name or a list of strings", "e.g. [A, B, C, D]")
    return value


def _check_fewshot(f: FewshotSpec, p: str) -> None:
    _at_least(f.num, f"{p}.fewshot.num", 0, 5)
    if f.sampler not in SAMPLERS:
        raise ConfigError(f"{p}.fewshot.sampler", f"unknown sampler {f.sampler!r}", f"use one of: {', '.join(SAMPLERS)}")
    if f.seed is not None:
        _at_least(f.seed, f"{p}.fewshot.seed", 0, 1234)


def _check_generation(g: GenerationSpec, p: str) -> None:
    _at_least(g.max_new_tokens, f"{p}.generation.max_new_tokens", 1, 256)


def _read_filters(value: Any, p: str) -> tuple[FilterSpec, ...]:
    if value is None:
        return ()
    if not isinstance(value, list):
        raise ConfigError(f"{p}.filters", "must be a list", '[{name: strict-match, regex: "#### (\\\\-?[0-9.,]+)"}]')
    out = []
    for i, item in enumerate(value):
        key = f"{p}.filters[{i}]"
        f = read_settings(FilterSpec, item, key)
        if not f.name:
            raise ConfigError(f"{key}.name", "is required", "e.g. strict-match")
        if f.function not in FILTER_FUNCTIONS:
            raise ConfigError(
                f"{key}.function", f"unknown filter {f.function!r}", f"use one of: {', '.join(FILTER_FUNCTIONS)}"
            )
        if f.function == "regex":
            if f.regex is None:
                raise ConfigError(f"{key}.regex", "is required for a regex filter", 'e.g. regex: "#### (\\\\-?[0-9.,]+)"')
            _check_regex(f.regex, f"{key}.regex")
        out.append(f)
    names = [f.name for f in out]
    if len(set(names)) != len(names):
        raise ConfigError(f"{p}.filters", "filter names must be unique", "rename the repeated filter")
    return tuple(out)


def _check_exact_match(e: ExactMatchSpec, p: str) -> None:
    for r in e.regexes_to_ignore:
        _check_regex(r, f"{p}.exact_match.regexes_to_ignore")


def _check_code(c: Optional[CodeSpec], p: str) -> None:
    if c is None:
        return
    if not c.program:
        raise ConfigError(
            f"{p}.code.program", "is required", 'a template with {completion}, e.g. "{prompt}{completion}\\n{test}"'
        )
    _check_template(c.program, f"{p}.code.program")
    if "{completion}" not in c.program:
        raise ConfigError(f"{p}.code.program", "must contain {completion}", 'e.g. "{prompt}{completion}\\n{test}"')
    if c.timeout_s <= 0:
        raise ConfigError(f"{p}.code.timeout_s", "must be a positive number of seconds", "use e.g. 3.0")
    _at_least(c.memory_mb, f"{p}.code.memory_mb", 16, 1024)
    _at_least(c.num_samples, f"{p}.code.num_samples", 1, 1)
    if c.workers is not None:
        _at_least(c.workers, f"{p}.code.workers", 1, 4)


def _check_metrics(metrics: tuple[str, ...], given: bool, task_type: str, p: str) -> tuple[str, ...]:
    if not given:
        return tuple(TYPE_METRICS[task_type]["default"])
    if not metrics:
        raise ConfigError(f"{p}.metrics", "is empty", "list at least one metric or omit the key")
    allowed = TYPE_METRICS[task_type]["metrics"]
    for m in metrics:
        ok = bool(_PASS_AT_K.match(m)) if task_type == "code" else m in allowed
        if not ok:
            fix = "use pass@k, e.g. pass@1" if task_type == "code" else f"use: {', '.join(sorted(allowed))}"
            raise ConfigError(f"{p}.metrics", f"{m!r} is not a metric of type {task_type}", fix)
    return tuple(metrics)
