"""jsonargparse's parse errors as one-line :class:`~lmlab.errors.ConfigError` s.

jsonargparse reports a bad value nested in a ``class_path`` as an indented
tree (every Union subtype it tried, the given value's type) under a full usage
dump. The user needs the dotted key, what is wrong with it, and for a typo the
closest valid key: :func:`config_error_from_parse` extracts exactly that.
"""

from __future__ import annotations

import difflib
import importlib
import re
from typing import Iterable, Optional

from lmlab.errors import ConfigError

_KEY = re.compile(r'Parser key "([^"]+)"')
_CLASS_PATH = re.compile(r"given class_path '([^']+)'")
# the ways jsonargparse says a key does not exist: (pattern, how to build the key from its groups)
_UNKNOWN = (
    (re.compile(r"unrecognized arguments: (\S+)"), lambda m: m.group(1).lstrip("-").split("=", 1)[0]),
    (re.compile(r"Option '([^']+)' is not accepted"), lambda m: m.group(1)),
    (re.compile(r"Group '([^']+)' does not accept option '([^']+)'"), lambda m: f"{m.group(1)}.{m.group(2)}"),
    (re.compile(r'Key "([^"]+)" is not expected'), lambda m: m.group(1)),
)
_LITERAL = re.compile(r"typing\.Literal\[(.*?)\]")
_CLASS = re.compile(r"<class '(?:[\w.]+\.)?(\w+)'>")


def parser_keys(parser) -> list[str]:
    """The dotted keys a jsonargparse parser accepts (nested groups included)."""
    keys = []
    for action in getattr(parser, "_actions", []):
        dest = getattr(action, "dest", None)
        if dest and dest not in ("help", "config", "print_config") and not dest.endswith(".help"):
            keys.append(dest)
    return keys


def class_keys(class_path: str) -> list[str]:
    """The init-argument keys of ``class_path`` as jsonargparse reads them (``config.n_layers``, ...)."""
    from jsonargparse import ArgumentParser

    module, _, name = class_path.rpartition(".")
    try:
        cls = getattr(importlib.import_module(module), name)
        parser = ArgumentParser(exit_on_error=False)
        parser.add_class_arguments(cls, fail_untyped=False)
    except Exception:
        return []
    return parser_keys(parser)


def closest(key: str, candidates: Iterable[str]) -> Optional[str]:
    """The valid key nearest to a misspelt one (compared on the last part first, then the whole key)."""
    candidates = list(dict.fromkeys(candidates))
    last = key.rsplit(".", 1)[-1]
    same_parent = [c for c in candidates if c.rpartition(".")[0] == key.rpartition(".")[0]]
    for pool, probe, pick in ((same_parent, last, lambda c: c.rsplit(".", 1)[-1]), (candidates, key, lambda c: c)):
        names = {pick(c): c for c in pool}
        match = difflib.get_close_matches(probe, list(names), n=1, cutoff=0.6)
        if match:
            return names[match[0]]
    return None


def _join(prefix: list[str], key: str) -> str:
    return ".".join([*prefix, key]) if key else ".".join(prefix)


def config_error_from_parse(message: str, parser=None, flag_prefix: str = "") -> ConfigError:
    """Turn a jsonargparse error message into a ConfigError naming the dotted key.

    ``parser`` (the parser that failed) supplies the valid top-level keys for a
    "did you mean" hint; a key inside a ``class_path`` gets its hint from that
    class's signature.
    """
    keys: list[str] = []
    class_path: Optional[str] = None
    class_at = 0  # how many of ``keys`` lead to ``class_path``
    for raw in message.splitlines():
        line = raw.strip().lstrip("- ").strip()
        if not line:
            continue
        m = _KEY.search(line)
        if m:
            keys.append(m.group(1))
            rest = line[m.end():].lstrip(":").strip()
            if rest:
                # one-line form: 'Parser key "config": File does not exist: ...'
                line = rest
            else:
                continue
        m = _CLASS_PATH.search(line)
        if m:
            class_path, class_at = m.group(1), len(keys)
            continue
        unknown = next(((m, build) for pattern, build in _UNKNOWN if (m := pattern.search(line))), None)
        if unknown:
            bad = unknown[1](unknown[0])
            field = _join(keys, bad)
            if class_path:
                inner = _join(keys[class_at:], bad)
                hint = closest(inner, class_keys(class_path))
                hint = _join(keys[:class_at], hint) if hint else None
            else:
                hint = closest(field, parser_keys(parser)) if parser is not None else None
            fix = f"did you mean {flag_prefix}{hint}?" if hint else "see `--help` for the valid keys"
            return ConfigError(flag_prefix + field, "unknown key", fix)
        if line.startswith(("Does not validate against", "Subtypes:", "Errors:", "Given value", "Problem with")):
            continue
        if "Expected a <class 'NoneType'>" in line or line == "Expected a None":
            continue
        if keys == ["config"] or (keys and keys[-1] == "config" and "File does not exist" in line):
            return ConfigError("--config", line.replace("File does not exist", "file does not exist"),
                               "check the path of the YAML file")
        problem = _CLASS.sub(r"\1", line)
        problem = problem.replace("Expected a ", "expected ").replace(". Got value:", ", got")
        problem = _LITERAL.sub(r"one of \1", problem)
        field = ".".join(keys) if keys else "arguments"
        return ConfigError(flag_prefix + field if keys else field, problem, "see `--help` for the accepted values")
    first = next((ln.strip() for ln in message.splitlines() if ln.strip()), "invalid arguments")
    return ConfigError(".".join(keys) or "arguments", first)
