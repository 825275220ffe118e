"""jsonargparse's parse errors as one-line :class:`~lmlab.errors.ConfigError` s.

jsonargparse reports a mistake as several lines: a bad value nested in a
``class_path`` becomes an indented tree (every Union subtype it tried, the
given value's type, the same tree again for each deeper ``class_path``). The
user needs the key, what is wrong with it, and the fix: for a misspelt key the
closest valid one, for a ``Literal`` the choices, for a bad type the type.
:func:`config_error_from_parse` extracts exactly that, for ``lmlab fit`` and
for every other verb; only the spelling of the names differs (see ``flags``).
"""

from __future__ import annotations

import dataclasses
import difflib
import importlib
import re
import textwrap
from collections.abc import Iterable
from typing import Any, Optional

from lmlab.errors import ConfigError

#: the flags that name a settings file (``--settings`` where a verb's own ``config`` names a training YAML)
_SETTINGS_FLAGS = ("--config", "--settings")
#: the field of a mistake that no single key owns
_ANY = "arguments"
_HEAD = re.compile(r'Parser key "([^"]+)":\s*(.*)', re.S)
_NESTED = re.compile(r"( *)- Problem with given class_path '([^']+)':\s*$")
_LITERAL = re.compile(r"Expected a typing\.Literal\[([^\]]*)\]")
_GIVEN = re.compile(r"(?:Given value|Got value): ([^\n]*)")
_TYPE = re.compile(r"Expected a (<class '[\w.]+'>|[^\n.]+)")
_CLASS = re.compile(r"<class '(?:[\w.]+\.)?(\w+)'>")


@dataclasses.dataclass
class _Found:
    """One mistake, before its names are spelt as flags or as keys.

    ``key`` is a dotted key (``engine.tasks``) unless ``literal``: then it is
    shown as is (a positional argument, ``command``, the settings-file flag,
    a key of a settings file). ``{field}`` in ``fix`` becomes the shown key;
    ``hint`` is the valid key to suggest instead of ``fix``.
    """

    key: str
    problem: str
    fix: str
    hint: Optional[str] = None
    literal: bool = False

    def under(self, outer: str) -> _Found:
        """The same mistake inside the section ``outer`` of a larger config."""
        if self.literal and self.key in _SETTINGS_FLAGS:
            return self
        key = outer if self.key == _ANY else f"{outer}.{self.key}"
        hint = f"{outer}.{self.hint}" if self.hint else None
        return dataclasses.replace(self, key=key, hint=hint, literal=False)


def _option_names(parser: Any) -> list[str]:
    """The long options of ``parser`` that a user could have meant (``--engine.tasks``)."""
    names = [s for a in getattr(parser, "_actions", []) for s in a.option_strings if s.startswith("--")]
    return [n for n in names if n not in ("--help", "--print_config") and not n.endswith(".help")]


def _settings_flag(parser: Any) -> str:
    return "--settings" if "--settings" in _option_names(parser) else "--config"


def _closest(name: str, candidates: Iterable[str]) -> Optional[str]:
    """The candidate nearest to a misspelt ``name``: among its siblings by the last part first, then overall."""
    candidates = list(dict.fromkeys(candidates))
    parent = name.rpartition(".")[0]
    siblings = [c for c in candidates if c.rpartition(".")[0] == parent]
    for pool, probe, part in ((siblings, name.rsplit(".", 1)[-1], lambda c: c.rsplit(".", 1)[-1]),
                              (candidates, name, lambda c: c)):
        names = {part(c): c for c in pool}
        match = difflib.get_close_matches(probe, list(names), n=1, cutoff=0.6)
        if match:
            return names[match[0]]
    return None


def _closest_key(key: str, parser: Any) -> Optional[str]:
    # compared without the dashes, which would make every short flag look alike
    return _closest(key, [n[2:] for n in _option_names(parser)]) if parser is not None else None


def _class_parser(class_path: str) -> Any:
    """A parser of ``class_path``'s arguments, for the keys to suggest; None if it cannot be built."""
    from jsonargparse import ArgumentParser

    try:
        module, _, name = class_path.rpartition(".")
        cls = getattr(importlib.import_module(module), name)
        parser = ArgumentParser(exit_on_error=False, env_prefix=False, default_env=False)
        parser.add_class_arguments(cls, sub_configs=True, fail_untyped=False)
        return parser
    except Exception:  # only a hint is lost
        return None


def _strip_subcommand(key: str, parser: Any) -> str:
    """``fit.n_col`` -> ``n_col``: jsonargparse prefixes the keys of sub-verbs (``parser._verb_path`` names them)."""
    for name in getattr(parser, "_verb_path", ()):
        if key.startswith(f"{name}."):
            key = key[len(name) + 1 :]
    return key


def _nested_class_error(text: str) -> Optional[tuple[str, str, str]]:
    """(key, class_path, inner message) of an error raised inside a ``class_path`` section."""
    head = _HEAD.match(text)
    if not head:
        return None
    lines = text.splitlines()
    for i, line in enumerate(lines):
        m = _NESTED.match(line)
        if m:
            indent = len(m.group(1))
            block = []
            for nxt in lines[i + 1 :]:
                if nxt.strip() and len(nxt) - len(nxt.lstrip()) <= indent:
                    break
                block.append(nxt)
            return head.group(1), m.group(2), textwrap.dedent("\n".join(block)).strip()
    return None


def _type_name(text: str) -> str:
    m = re.match(r"<class '([\w.]+)'>", text.strip())
    return m.group(1).rsplit(".", 1)[-1] if m else text.strip()


def _value_error(key: str, body: str) -> _Found:
    """A bad value for ``key``: a file that does not exist, a choice not offered, a wrong type."""
    literal = _LITERAL.search(body)
    given = _GIVEN.search(body)
    value = given.group(1).strip() if given else ""
    if literal:
        choices = [c.strip(" '\"") for c in literal.group(1).split(",")]
        near = difflib.get_close_matches(value, choices, n=1, cutoff=0.6)
        fix = f"did you mean {near[0]}?" if near else f"choose one of {', '.join(choices)}"
        return _Found(key, f"invalid choice: expected one of {literal.group(1)}, got {value}", fix)
    types = [t for t in (_type_name(x) for x in _TYPE.findall(body)) if t not in ("NoneType", "None")]
    if types:
        kinds = " or ".join(dict.fromkeys(types))
        got = f", got {value!r}" if given else ""
        return _Found(key, f"expected {kinds}{got}", f"give {{field}} a value of type {kinds}")
    first = next((ln.strip() for ln in body.splitlines() if ln.strip()), "invalid value")
    return _Found(key, _CLASS.sub(r"\1", first), "see `{prog} --help`")


def _find(text: str, parser: Any) -> _Found:
    """The mistake that the jsonargparse message ``text`` (raised by ``parser``) describes."""
    nested = _nested_class_error(text)
    if nested:  # inside a class_path/init_args section: the inner key, as the user wrote it
        outer, class_path, inner = nested
        return _find(inner, _class_parser(class_path)).under(_strip_subcommand(outer, parser))
    help_fix = "see `{prog} --help`"
    m = _HEAD.match(text)
    if m:
        key, body = _strip_subcommand(m.group(1), parser), m.group(2)
        unknown = re.search(r"Option '([^']+)' is not accepted", body)
        if unknown:
            return _Found(f"{key}.{unknown.group(1)}", "unknown key", help_fix)
        if key in ("config", "settings") or "File does not exist" in body or "Unable to load config" in body:
            where = re.search(r"File does not exist: '?([^'\n]+)'?", body)
            problem = f"{where.group(1)} does not exist" if where else body.splitlines()[0].strip()
            found = _Found(key, problem, "give an existing YAML file (--print_config writes one)")
            return dataclasses.replace(found, key=f"--{key}", literal=True) if key in ("config", "settings") else found
        return _value_error(key, body)
    m = re.match(r"Option '([^']+)' is not accepted", text)
    if m:
        return _Found(m.group(1), "unknown key", help_fix, _closest_key(m.group(1), parser))
    if text.startswith("Problems parsing config"):
        detail = " ".join(ln.strip() for ln in text.splitlines()[1:] if ln.strip())[:200]
        return _Found(_settings_flag(parser), f"not a valid YAML mapping ({detail})",
                      "fix the file or write a new one with --print_config", literal=True)
    m = re.match(r"unrecognized arguments: (\S+)", text)
    if m:
        bad = m.group(1)
        if not bad.startswith("-"):
            return _Found(_ANY, f"unexpected argument {bad!r}", help_fix, literal=True)
        key = bad.partition("=")[0].rstrip("+").lstrip("-")
        return _Found(key, "unknown option", help_fix, _closest_key(key, parser))
    m = re.search(r"""(?:(?:Group|Subcommand) '([^']+)' does not accept option|Key) ['"]([^'"]+)['"]""", text)
    if m and ("accept" in text or "not expected" in text):
        group = m.group(1) if m.group(1) and not text.startswith("Subcommand") else None
        key = _strip_subcommand(f"{group}.{m.group(2)}" if group else m.group(2), parser)
        # a key of a settings file: named as written there
        return _Found(key, "unknown key", help_fix, _closest_key(key, parser), literal=True)
    m = re.match(r"the following arguments are required: (.*)", text)
    if m:
        keys = [_strip_subcommand(k.strip(), parser) for k in m.group(1).split(",")]
        positional = {a.dest for a in getattr(parser, "_actions", []) if not a.option_strings}
        more = f" (also {', '.join(keys[1:])})" if len(keys) > 1 else ""
        return _Found(keys[0], f"required{more}", f"give {{field}} on the command line or in {_settings_flag(parser)}",
                      literal=keys[0] in positional)
    m = re.search(r'expected "(\w+)" to be one of \{([^}]*)\}', text)
    if m:
        return _Found(m.group(1), "no sub-command given", f"choose one of {m.group(2).replace(',', ', ')}", literal=True)
    m = re.search(r"argument (\w+): invalid choice: '([^']*)' \(choose from (.*)\)", text)
    if m:
        choices = [c.strip(" '") for c in m.group(3).split(",")]
        near = difflib.get_close_matches(m.group(2), choices, n=1, cutoff=0.6)
        fix = f"did you mean {near[0]}?" if near else f"choose one of {', '.join(choices)}"
        return _Found(m.group(1), f"unknown sub-command {m.group(2)!r}", fix, literal=True)
    m = re.match(r"argument (\S+): (.*)", text)
    if m:
        return _Found(m.group(1).split("/")[0], m.group(2).splitlines()[0], help_fix, literal=True)
    return _Found(_ANY, " ".join(ln.strip() for ln in text.splitlines() if ln.strip()), help_fix, literal=True)


def config_error_from_parse(message: str, parser: Any = None, *, flags: bool = True, prog: str = "lmlab") -> ConfigError:
    """One :class:`ConfigError` (field, problem, fix) from a multi-line jsonargparse error ``message``.

    ``parser`` (the parser that failed; optional) supplies the valid keys for
    a "did you mean" hint; a key inside a ``class_path`` gets its hint from that
    class's signature, at any depth. With ``flags`` keys are named as
    command-line flags (``--engine.tasks``, "did you mean --engine.tasks?"), as
    the verbs take them; without, as config keys (``model.config.n_layers``),
    as ``lmlab fit`` reports them. ``prog`` is named in "see `PROG --help`".
    """
    found = _find(message.strip(), parser)
    field, hint, problem = found.key, found.hint, found.problem
    if not found.literal and flags:
        field, hint = f"--{field}", f"--{hint}" if hint else None
    elif not found.literal and problem == "unknown option":
        problem = "unknown key"  # a config key, though given as a flag
    fix = f"did you mean {hint}?" if hint else found.fix.format(field=field, prog=prog)
    return ConfigError(field, problem, fix)
