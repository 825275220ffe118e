"""Task specifications: one YAML file per task, parsed and checked here.

A spec says where the data is, how a row becomes a prompt, which field holds
the answer, how few-shot examples are drawn and which metrics to report. Every
mistake is a :class:`lmlab.errors.ConfigError` naming the key and the fix, so a
bad YAML fails before any model work starts. The keys (see the YAMLs in
``lmlab/eval/tasks/`` for worked examples)::

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

import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

from lmlab.errors import ConfigError
from lmlab.eval.templates import check_template
from lmlab.eval.transforms import TRANSFORMS

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

_TOP_KEYS = {
    "name", "type", "data", "description", "doc_to_text", "doc_to_choice", "doc_to_contexts",
    "doc_to_target", "answer", "answer_labels", "target_delimiter", "fewshot_delimiter",
    "fewshot", "generation", "filters", "exact_match", "code", "metrics", "subtask_field",
}
_DATA_KEYS = {"path", "format", "split", "fields", "transform", "hf"}
_HF_KEYS = {"path", "name", "split", "fewshot_split", "fields", "transform", "revision"}
_FEWSHOT_KEYS = {"num", "split", "path", "sampler", "group_by", "seed"}
_GEN_KEYS = {"max_new_tokens", "stop"}
_FILTER_KEYS = {"name", "function", "regex", "group_select", "fallback"}
_EM_KEYS = {"ignore_case", "ignore_punctuation", "regexes_to_ignore"}
_CODE_KEYS = {"program", "timeout_s", "memory_mb", "num_samples", "workers"}


@dataclass(frozen=True)
class HubSource:
    """Where to fetch the data with ``datasets.load_dataset`` when no local file exists."""

    path: str
    name: str | None = None
    split: str = "test"
    fewshot_split: str | None = None
    fields: dict[str, Any] | None = None
    transform: str | None = None
    revision: str | None = None


@dataclass(frozen=True)
class DataSpec:
    """The local data file and how its rows map onto the fields the templates use."""

    path: str | None = None
    format: str | None = None
    split: str | None = None
    fields: dict[str, Any] = field(default_factory=dict)
    transform: str | None = None
    hf: HubSource | None = None


@dataclass(frozen=True)
class FewshotSpec:
    """How many few-shot examples, from where, chosen how."""

    num: int = 0
    split: str | None = None  # another split of the same source (MMLU: dev)
    path: str | None = None  # a separate file (relative to data_dir)
    sampler: str = "random"
    group_by: str | None = None  # only examples sharing this field's value (MMLU: subject)
    seed: int | None = None  # default: the harness seed


@dataclass(frozen=True)
class GenerationSpec:
    """Decoding limits for generation and code tasks."""

    max_new_tokens: int = 256
    stop: tuple[str, ...] = ()


@dataclass(frozen=True)
class FilterSpec:
    """An answer-extraction step applied to a generation before exact match."""

    name: str
    function: str = "regex"
    regex: str | None = None
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

    program: str
    timeout_s: float = 3.0
    memory_mb: int = 1024
    num_samples: int = 1
    workers: int | None = None


@dataclass(frozen=True)
class TaskSpec:
    """A parsed, validated task YAML."""

    name: str
    type: str
    data: DataSpec
    answer: str
    doc_to_text: str | None = None
    doc_to_choice: str | tuple[str, ...] | None = None
    doc_to_contexts: str | None = None
    doc_to_target: str | None = None
    answer_labels: str | tuple[str, ...] | None = None
    description: str = ""
    target_delimiter: str = " "
    fewshot_delimiter: str = "\n\n"
    fewshot: FewshotSpec = field(default_factory=FewshotSpec)
    generation: GenerationSpec = field(default_factory=GenerationSpec)
    filters: tuple[FilterSpec, ...] = ()
    exact_match: ExactMatchSpec = field(default_factory=ExactMatchSpec)
    code: CodeSpec | None = None
    metrics: tuple[str, ...] = ()
    subtask_field: str | None = None
    origin: str = "<dict>"

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
    """Validate a task mapping (as loaded from YAML) and build a :class:`TaskSpec`."""
    if not isinstance(raw, dict):
        raise ConfigError(origin, "a task spec must be a YAML mapping", "see lmlab/eval/tasks/*.yaml")
    name = raw.get("name", default_name)
    if not isinstance(name, str) or not name:
        raise ConfigError(f"{origin}.name", "must be a non-empty string", "e.g. name: arc_easy")
    p = name  # prefix for field names in errors
    _no_unknown(raw, _TOP_KEYS, p)

    task_type = raw.get("type")
    if task_type not in TYPE_METRICS:
        raise ConfigError(
            f"{p}.type", f"unknown task type {task_type!r}", f"use one of: {', '.join(TYPE_METRICS)}"
        )

    answer = raw.get("answer")
    if not isinstance(answer, str) or not answer:
        hint = {
            "multiple_choice": "the field with the gold choice index or label, e.g. answer: gold",
            "cloze": "the field with the word to predict, e.g. answer: continuation",
            "generation": "the field with the reference answer, e.g. answer: answer",
            "code": "the field with the unit tests, e.g. answer: test",
        }[task_type]
        raise ConfigError(f"{p}.answer", f"is required for type {task_type}", f"name {hint}")

    data = _parse_data(raw.get("data"), p)
    metrics = _parse_metrics(raw.get("metrics"), task_type, p)

    spec = TaskSpec(
        name=name,
        type=task_type,
        data=data,
        answer=answer,
        doc_to_text=_opt_template(raw, "doc_to_text", p),
        doc_to_choice=_parse_choice(raw.get("doc_to_choice"), p),
        doc_to_contexts=_opt_str(raw, "doc_to_contexts", p),
        doc_to_target=_opt_template(raw, "doc_to_target", p),
        answer_labels=_parse_labels(raw.get("answer_labels"), p),
        description=_opt_template(raw, "description", p) or "",
        target_delimiter=_str_or(raw, "target_delimiter", " ", p),
        fewshot_delimiter=_str_or(raw, "fewshot_delimiter", "\n\n", p),
        fewshot=_parse_fewshot(raw.get("fewshot"), p),
        generation=_parse_generation(raw.get("generation"), p),
        filters=_parse_filters(raw.get("filters"), p),
        exact_match=_parse_exact_match(raw.get("exact_match"), p),
        code=_parse_code(raw.get("code"), p),
        metrics=metrics,
        subtask_field=_opt_str(raw, "subtask_field", p),
        origin=origin,
    )
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


# --- small parsers -----------------------------------------------------------------------------


def _no_unknown(raw: dict, allowed: set[str], prefix: str) -> None:
    unknown = sorted(set(raw) - allowed)
    if unknown:
        raise ConfigError(
            f"{prefix}.{unknown[0]}", "unknown key", f"valid keys here: {', '.join(sorted(allowed))}"
        )


def _mapping(value: Any, prefix: str, allowed: set[str]) -> dict:
    if value is None:
        return {}
    if not isinstance(value, dict):
        raise ConfigError(prefix, "must be a mapping", f"keys: {', '.join(sorted(allowed))}")
    _no_unknown(value, allowed, prefix)
    return value


def _opt_str(raw: dict, key: str, prefix: str) -> str | None:
    value = raw.get(key)
    if value is not None and not isinstance(value, str):
        raise ConfigError(f"{prefix}.{key}", f"must be a string, got {type(value).__name__}", None)
    return value


def _str_or(raw: dict, key: str, default: str, prefix: str) -> str:
    value = _opt_str(raw, key, prefix)
    return default if value is None else value


def _opt_template(raw: dict, key: str, prefix: str) -> str | None:
    value = _opt_str(raw, key, prefix)
    if value is not None:
        try:
            check_template(value)
        except ValueError as e:
            raise ConfigError(f"{prefix}.{key}", f"bad template: {e}", "write literal braces as {{ and }}") from None
    return value


def _int(value: Any, key: str, minimum: int) -> int:
    if isinstance(value, bool) or not isinstance(value, int) or value < minimum:
        raise ConfigError(key, f"must be an integer >= {minimum}, got {value!r}", None)
    return value


def _bool(value: Any, key: str) -> bool:
    if not isinstance(value, bool):
        raise ConfigError(key, f"must be true or false, got {value!r}", None)
    return value


def _str_list(value: Any, key: str) -> tuple[str, ...]:
    if isinstance(value, str):
        value = [value]
    if not isinstance(value, list) or not all(isinstance(v, str) for v in value):
        raise ConfigError(key, "must be a list of strings", None)
    return tuple(value)


def _parse_fields(value: Any, key: str) -> dict[str, Any]:
    if value is None:
        return {}
    if not isinstance(value, dict):
        raise ConfigError(key, "must map new field names to source paths", "e.g. fields: {query: question}")
    for name, source in value.items():
        ok = isinstance(source, str) or (
            isinstance(source, list) and all(isinstance(s, str) for s in source)
        )
        if not ok:
            raise ConfigError(f"{key}.{name}", "must be a dotted path, a template or a list of paths", None)
        if isinstance(source, str) and "{" in source:
            try:
                check_template(source)
            except ValueError as e:
                raise ConfigError(f"{key}.{name}", f"bad template: {e}", None) from None
    return dict(value)


def _parse_data(value: Any, p: str) -> DataSpec:
    d = _mapping(value, f"{p}.data", _DATA_KEYS)
    path = d.get("path")
    hf_raw = d.get("hf")
    if path is None and hf_raw is None:
        raise ConfigError(f"{p}.data.path", "no data source", "set data.path (relative to data_dir) or data.hf")
    if path is not None and not isinstance(path, str):
        raise ConfigError(f"{p}.data.path", "must be a string", None)
    fmt = d.get("format")
    if fmt is not None and fmt not in DATA_FORMATS:
        raise ConfigError(f"{p}.data.format", f"unknown format {fmt!r}", f"use one of: {', '.join(DATA_FORMATS)}")
    if fmt is None and path is not None:
        fmt = infer_format(path)
        if fmt is None:
            raise ConfigError(
                f"{p}.data.format", f"cannot tell the format of {path!r} from its name",
                f"set data.format to one of: {', '.join(DATA_FORMATS)}",
            )
    _check_transform(d.get("transform"), f"{p}.data.transform")
    hf = None
    if hf_raw is not None:
        h = _mapping(hf_raw, f"{p}.data.hf", _HF_KEYS)
        _check_transform(h.get("transform"), f"{p}.data.hf.transform")
        if not isinstance(h.get("path"), str):
            raise ConfigError(f"{p}.data.hf.path", "is required", "the hub dataset id, e.g. allenai/ai2_arc")
        hf = HubSource(
            path=h["path"],
            name=h.get("name"),
            split=h.get("split", "test"),
            fewshot_split=h.get("fewshot_split"),
            fields=_parse_fields(h["fields"], f"{p}.data.hf.fields") if "fields" in h else None,
            transform=h.get("transform", d.get("transform")),
            revision=h.get("revision"),
        )
    return DataSpec(
        path=path,
        format=fmt,
        split=d.get("split"),
        fields=_parse_fields(d.get("fields"), f"{p}.data.fields"),
        transform=d.get("transform"),
        hf=hf,
    )


def _check_transform(name: Any, key: str) -> None:
    if name is not None and name not in TRANSFORMS:
        raise ConfigError(key, f"unknown transform {name!r}", f"use one of: {', '.join(TRANSFORMS)}")


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


def _parse_choice(value: Any, p: str) -> str | tuple[str, ...] | None:
    if value is None or isinstance(value, str):
        return value
    if isinstance(value, list) and value and all(isinstance(v, str) for v in value):
        return tuple(value)
    raise ConfigError(f"{p}.doc_to_choice", "must be a field name or a list of strings", "e.g. [A, B, C, D]")


def _parse_labels(value: Any, p: str) -> str | tuple[str, ...] | None:
    if value is None or isinstance(value, str):
        return value
    if isinstance(value, list) and all(isinstance(v, (str, int)) for v in value):
        return tuple(str(v) for v in value)
    raise ConfigError(f"{p}.answer_labels", "must be a field name or a list of labels", "e.g. [A, B, C, D]")


def _parse_fewshot(value: Any, p: str) -> FewshotSpec:
    f = _mapping(value, f"{p}.fewshot", _FEWSHOT_KEYS)
    sampler = f.get("sampler", "random")
    if sampler not in SAMPLERS:
        raise ConfigError(f"{p}.fewshot.sampler", f"unknown sampler {sampler!r}", f"use one of: {', '.join(SAMPLERS)}")
    seed = f.get("seed")
    return FewshotSpec(
        num=_int(f.get("num", 0), f"{p}.fewshot.num", 0),
        split=_opt_str(f, "split", f"{p}.fewshot"),
        path=_opt_str(f, "path", f"{p}.fewshot"),
        sampler=sampler,
        group_by=_opt_str(f, "group_by", f"{p}.fewshot"),
        seed=None if seed is None else _int(seed, f"{p}.fewshot.seed", 0),
    )


def _parse_generation(value: Any, p: str) -> GenerationSpec:
    g = _mapping(value, f"{p}.generation", _GEN_KEYS)
    return GenerationSpec(
        max_new_tokens=_int(g.get("max_new_tokens", 256), f"{p}.generation.max_new_tokens", 1),
        stop=_str_list(g.get("stop", []), f"{p}.generation.stop"),
    )


def _parse_filters(value: Any, p: str) -> tuple[FilterSpec, ...]:
    if value is None:
        return ()
    if not isinstance(value, list):
        raise ConfigError(f"{p}.filters", "must be a list", '[{name: strict-match, regex: "#### (\\\\-?[0-9.,]+)"}]')
    out = []
    for i, item in enumerate(value):
        key = f"{p}.filters[{i}]"
        f = _mapping(item, key, _FILTER_KEYS)
        name = f.get("name")
        if not isinstance(name, str) or not name:
            raise ConfigError(f"{key}.name", "is required", "e.g. strict-match")
        function = f.get("function", "regex")
        if function not in FILTER_FUNCTIONS:
            raise ConfigError(
                f"{key}.function", f"unknown filter {function!r}", f"use one of: {', '.join(FILTER_FUNCTIONS)}"
            )
        regex = f.get("regex")
        if function == "regex":
            if not isinstance(regex, str):
                raise ConfigError(f"{key}.regex", "is required for a regex filter", None)
            try:
                re.compile(regex)
            except re.error as e:
                raise ConfigError(f"{key}.regex", f"invalid regular expression: {e}", None) from None
        group_select = f.get("group_select", 0)
        if isinstance(group_select, bool) or not isinstance(group_select, int):
            raise ConfigError(f"{key}.group_select", "must be an integer (0 first match, -1 last)", None)
        out.append(FilterSpec(name, function, regex, group_select, str(f.get("fallback", "[invalid]"))))
    names = [f.name for f in out]
    if len(set(names)) != len(names):
        raise ConfigError(f"{p}.filters", "filter names must be unique", None)
    return tuple(out)


def _parse_exact_match(value: Any, p: str) -> ExactMatchSpec:
    e = _mapping(value, f"{p}.exact_match", _EM_KEYS)
    regexes = _str_list(e.get("regexes_to_ignore", []), f"{p}.exact_match.regexes_to_ignore")
    for r in regexes:
        try:
            re.compile(r)
        except re.error as err:
            raise ConfigError(f"{p}.exact_match.regexes_to_ignore", f"invalid regex {r!r}: {err}", None) from None
    return ExactMatchSpec(
        ignore_case=_bool(e.get("ignore_case", False), f"{p}.exact_match.ignore_case"),
        ignore_punctuation=_bool(e.get("ignore_punctuation", False), f"{p}.exact_match.ignore_punctuation"),
        regexes_to_ignore=regexes,
    )


def _parse_code(value: Any, p: str) -> CodeSpec | None:
    if value is None:
        return None
    c = _mapping(value, f"{p}.code", _CODE_KEYS)
    program = c.get("program")
    if not isinstance(program, str):
        raise ConfigError(
            f"{p}.code.program", "is required", 'a template with {completion}, e.g. "{prompt}{completion}\\n{test}"'
        )
    _opt_template(c, "program", f"{p}.code")
    if "{completion}" not in program:
        raise ConfigError(f"{p}.code.program", "must contain {completion}", None)
    timeout = c.get("timeout_s", 3.0)
    if isinstance(timeout, bool) or not isinstance(timeout, (int, float)) or timeout <= 0:
        raise ConfigError(f"{p}.code.timeout_s", "must be a positive number of seconds", None)
    workers = c.get("workers")
    return CodeSpec(
        program=program,
        timeout_s=float(timeout),
        memory_mb=_int(c.get("memory_mb", 1024), f"{p}.code.memory_mb", 16),
        num_samples=_int(c.get("num_samples", 1), f"{p}.code.num_samples", 1),
        workers=None if workers is None else _int(workers, f"{p}.code.workers", 1),
    )


def _parse_metrics(value: Any, task_type: str, p: str) -> tuple[str, ...]:
    if value is None:
        return tuple(TYPE_METRICS[task_type]["default"])
    metrics = _str_list(value, f"{p}.metrics")
    if not metrics:
        raise ConfigError(f"{p}.metrics", "is empty", "list at least one metric or omit the key")
    allowed = TYPE_METRICS[task_type]["metrics"]
    for m in metrics:
        ok = bool(_PASS_AT_K.match(m)) if task_type == "code" else m in allowed
        if not ok:
            fix = "use pass@k, e.g. pass@1" if task_type == "code" else f"use: {', '.join(sorted(allowed))}"
            raise ConfigError(f"{p}.metrics", f"{m!r} is not a metric of type {task_type}", fix)
    return metrics
