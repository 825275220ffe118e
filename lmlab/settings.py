"""Settings files (prepare YAMLs, task YAMLs) read into typed dataclasses by jsonargparse.

The verbs' parser (:mod:`lmlab.verbs`) reads the dataclass's fields, so a
settings file gets the same checks as ``--config`` of any verb: unknown keys
(with the closest known one), types, required fields. The dataclass's own
``__post_init__`` adds the checks types cannot express. Every mistake is one
:class:`~lmlab.errors.ConfigError` naming the dotted key, prefixed by ``where``.

Strings keep their exact text. jsonargparse reads a string given for a field
that is not plainly ``str`` (``Optional[str]``, ``str | list[str]``, ...) as
YAML once more, which suits command-line flags but corrupts values that already
came out of a YAML file: ``"#### (\\-?[0-9.,]+)"`` is a YAML comment (``None``),
``"null"`` becomes ``None``, ``"[a, b]"`` a list. Every string is therefore
handed over as :class:`Verbatim`, which jsonargparse does not re-read, and
turned back into a plain ``str`` in the result.
"""

from __future__ import annotations

import dataclasses
import difflib
import functools
import typing
from collections.abc import Mapping
from typing import Any, TypeVar

from lmlab.errors import ConfigError

T = TypeVar("T")


class Verbatim(str):
    """A string already decoded from YAML: jsonargparse keeps it as is (it only re-reads exact ``str``)."""


def _wrap(value: Any) -> Any:
    if type(value) is str:
        return Verbatim(value)
    if isinstance(value, Mapping):
        return {k: _wrap(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_wrap(v) for v in value]
    return value


def plain(value: Any) -> Any:
    """``value`` with every :class:`Verbatim` inside (dataclass fields included, in place) a plain ``str``."""
    if isinstance(value, Verbatim):
        return str(value)  # str() of a str subclass is an exact str
    if isinstance(value, dict):
        return {plain(k): plain(v) for k, v in value.items()}
    if isinstance(value, list):
        return [plain(v) for v in value]
    if isinstance(value, tuple):
        return tuple(plain(v) for v in value)
    if dataclasses.is_dataclass(value) and not isinstance(value, type):
        for f in dataclasses.fields(value):
            object.__setattr__(value, f.name, plain(getattr(value, f.name)))
    return value


def _join(where: str, key: str) -> str:
    return f"{where}.{key}" if where else key


def _dataclass_fields(cls: type) -> dict[str, type | None]:
    """Field name -> the dataclass it holds (``X`` or ``Optional[X]``), else None."""
    hints = typing.get_type_hints(cls)
    out: dict[str, type | None] = {}
    for f in dataclasses.fields(cls):
        hint = hints.get(f.name)
        args = [a for a in typing.get_args(hint) if a is not type(None)] if typing.get_origin(hint) is typing.Union else [hint]
        out[f.name] = args[0] if len(args) == 1 and dataclasses.is_dataclass(args[0]) else None
    return out


def _prepare(cls: type, data: Any, where: str) -> dict:
    """Check the mapping shape of nested sections (``null`` = defaults), which jsonargparse does not report in one line."""
    if not isinstance(data, Mapping):
        raise ConfigError(where or "config", f"expected a mapping, got {type(data).__name__}",
                          f"write {where or 'the file'} as key: value pairs")
    out = dict(data)
    nested = _dataclass_fields(cls)
    for key, value in data.items():
        sub = nested.get(key)
        if sub is None:
            continue
        if value is None:
            out.pop(key)
        elif isinstance(value, Mapping):
            # read the section on its own first: a mistake inside it is then named by its own key
            # (jsonargparse names only the section when the field is Optional[dataclass])
            read_settings(sub, value, _join(where, key))
            out[key] = _prepare(sub, value, _join(where, key))
        elif not isinstance(value, sub):
            raise ConfigError(_join(where, key), f"expected a mapping, got {type(value).__name__}",
                              f"write {_join(where, key)} as key: value pairs")
    return out


def _expected_type(cls: type, key: str) -> str:
    """The annotation of dotted ``key`` in dataclass ``cls``, as written in the source."""
    parts = key.split(".")
    for part in parts[:-1]:
        cls = _dataclass_fields(cls).get(part) or cls
    for f in dataclasses.fields(cls):
        if f.name == parts[-1]:
            hint = typing.get_type_hints(cls).get(f.name, f.type)
            return getattr(hint, "__name__", None) or str(hint).replace("typing.", "")
    return "the documented type"


def _one_line(err: ConfigError, cls: type, where: str) -> ConfigError:
    """A jsonargparse error (``--quality.keep_fraction``) as a settings-file one (``quality.keep_fraction``)."""
    key = err.field.lstrip("-")
    field = _join(where, key)
    fix = err.fix or ""
    if err.problem == "unknown key" or err.problem == "unknown option":
        parent = cls
        parts = key.split(".")
        for part in parts[:-1]:
            parent = _dataclass_fields(parent).get(part) or parent
        known = sorted(f.name for f in dataclasses.fields(parent) if f.init)
        near = difflib.get_close_matches(parts[-1], known, n=1, cutoff=0.6)
        fix = f"did you mean {near[0]}?" if near else f"known keys: {', '.join(known)}"
        return ConfigError(field, "unknown key", fix)
    if err.problem.startswith("required"):
        return ConfigError(field, "is required", f"add {key} to the file")
    if "string or stream input is required" in err.problem:
        # jsonargparse's wording for a string where a number or boolean is expected
        expected = _expected_type(cls, key)
        return ConfigError(field, f"expected {expected}", f"give {field} a value of type {expected}")
    fix = fix.replace(f"--{key} ", f"{field} ")
    if "settings --help" in fix or "settings help" in fix:
        fix = "see the documented keys of this section"
    return ConfigError(field, err.problem, fix.replace("--", ""))


@functools.lru_cache(maxsize=None)
def _parser(cls: type) -> Any:
    """The verbs' parser of ``cls``'s fields (built once per class; parsing leaves it unchanged)."""
    from lmlab.verbs import _parser_class

    parser = _parser_class()(exit_on_error=False, env_prefix=False, default_env=False)
    parser.add_class_arguments(cls, sub_configs=True, fail_untyped=True)
    return parser


def read_settings(cls: type[T], data: Any, where: str = "") -> T:
    """``cls`` (a dataclass) built from ``data`` (a mapping loaded from YAML) through jsonargparse.

    ``where`` prefixes the keys named in errors (``quality``, ``sources[2]``,
    a task name). ``null`` for a nested dataclass section means its defaults.
    An instance of ``cls`` is returned unchanged.
    """
    if isinstance(data, cls):
        return data

    from lmlab.parse_errors import config_error_from_parse
    from lmlab.verbs import _UsageError

    data = _prepare(cls, {} if data is None else data, where)
    parser = _parser(cls)
    try:
        cfg = parser.parse_object(_wrap(data))
    except _UsageError as e:
        message = e.message
        if "string or stream input is required" in message:
            # a Verbatim given where a number is expected: jsonargparse words the same mistake well for a plain str
            try:
                parser.parse_object(plain(data))
            except _UsageError as plain_error:
                message = plain_error.message
        raise _one_line(config_error_from_parse(message, parser, prog="settings"), cls, where) from None
    try:
        kwargs = parser.instantiate(cfg)
        return plain(cls(**{f.name: kwargs[f.name] for f in dataclasses.fields(cls) if f.init and f.name in kwargs}))
    except ConfigError:
        raise
    except (TypeError, ValueError) as e:  # a check of the dataclass itself that does not name its key
        raise ConfigError(where or "config", str(e).splitlines()[0], "check the values against the documentation") from None
