"""Expand a sweep's ``command`` exactly as ``wandb agent`` does.

A sweep YAML's ``command`` is a list of tokens. The agent

1. replaces ``${envvar:NAME}`` anywhere inside a token by the environment
   variable NAME (or by the bare text ``NAME`` when it is unset);
2. replaces every token that *is* a macro, ``${...}``, by a list of tokens:

   ============================  ==========================================
   ``${env}``                    ``/usr/bin/env`` (nothing on Windows)
   ``${interpreter}``            ``python``
   ``${program}``                the sweep's ``program``
   ``${args}``                   ``--name=value`` per parameter
   ``${args_no_hyphens}``        ``name=value``
   ``${args_no_equals}``         ``--name value`` (two tokens)
   ``${args_no_boolean_flags}``  ``--name`` for True, nothing for False,
                                 ``--name=value`` otherwise
   ``${args_json}``              one token: ``{"name": value, ...}``
   ``${args_json_file}``         path of a file holding that JSON
   ``${args_append_hydra}``      ``+name=value``
   ``${args_override_hydra}``    ``++name=value``
   ``${args_dict}``              the parameter names (a quirk kept as is)
   ============================  ==========================================

   and an unknown macro by nothing. Values are formatted with Python's
   ``str`` (``0.001``, ``1000000.0``, ``True``, ``None``); a YAML value
   written ``1e6`` is a string to YAML 1.1 and passes through as ``1e6``.
3. A missing or empty ``command`` means ``${env} ${interpreter} ${program} ${args}``.

A macro inside a longer token (``--x=${args}``) is left as written, as the
agent does.
"""

from __future__ import annotations

import json
import os
import platform
import re
from collections.abc import Mapping
from typing import Any, Optional

DEFAULT_COMMAND: tuple[str, ...] = ("${env}", "${interpreter}", "${program}", "${args}")
ENVVAR_MACRO = re.compile(r"\$\{envvar\:([A-Z0-9_]*)\}")


def expand_envvars(token: Any, environ: Optional[Mapping[str, str]] = None) -> str:
    """Substitute every ``${envvar:NAME}`` inside ``token``; an unset NAME becomes the text NAME."""
    environ = os.environ if environ is None else environ
    text = str(token)
    for m in list(ENVVAR_MACRO.finditer(text))[::-1]:
        text = text[: m.start()] + environ.get(m.group(1), m.group(1)) + text[m.end() :]
    return text


def command_args(params: Mapping[str, Any]) -> dict[str, Any]:
    """The agent's argument formats for one run's parameters ``{name: {"value": v}}``."""
    flags: list[str] = []
    no_hyphens: list[str] = []
    no_booleans: list[str] = []
    no_equals: list[str] = []
    hydra_append: list[str] = []
    hydra_override: list[str] = []
    as_dict: dict[str, Any] = {}
    for name, spec in params.items():
        if not isinstance(spec, Mapping) or "value" not in spec:
            raise ValueError(f'no "value" for parameter {name!r}')
        value = spec["value"]
        flag = f"{name}={value}"
        flags.append("--" + flag)
        no_hyphens.append(flag)
        no_equals += [f"--{name}", str(value)]
        hydra_append.append("+" + flag)
        hydra_override.append("++" + flag)
        if isinstance(value, bool):
            if value:
                no_booleans.append("--" + name)
        else:
            no_booleans.append("--" + flag)
        as_dict[name] = value
    return {
        "args": flags,
        "args_no_equals": no_equals,
        "args_no_hyphens": no_hyphens,
        "args_no_boolean_flags": no_booleans,
        "args_json": [json.dumps(as_dict)],
        "args_dict": as_dict,
        "args_append_hydra": hydra_append,
        "args_override_hydra": hydra_override,
    }


def expand_command(
    command: Optional[list[Any]],
    params: Mapping[str, Any],
    *,
    program: Optional[str] = None,
    args_json_file: Optional[str] = None,
    interpreter: str = "python",
    environ: Optional[Mapping[str, str]] = None,
    windows: Optional[bool] = None,
) -> list[str]:
    """The argv ``wandb agent`` would run for a sweep ``command`` and one run's ``params``."""
    tokens = [expand_envvars(t, environ) for t in (command or DEFAULT_COMMAND)]
    macros: dict[str, Any] = command_args(params)
    macros["interpreter"] = [interpreter]
    macros["program"] = [program]
    macros["args_json_file"] = [args_json_file]
    if not (platform.system() == "Windows" if windows is None else windows):
        macros["env"] = ["/usr/bin/env"]
    out: list[str] = []
    for token in tokens:
        if token.startswith("${") and token.endswith("}"):
            # list += dict adds its keys, which is what the agent does for ${args_dict}
            out += [str(v) for v in (macros.get(token[2:-1]) or [])]
        else:
            out.append(token)
    return out


def uses_macro(command: Optional[list[Any]], name: str) -> bool:
    """Whether ``command`` (or the default command) has the token ``${name}``."""
    return any(str(t) == "${" + name + "}" for t in (command or DEFAULT_COMMAND))
