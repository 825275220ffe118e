"""Check a sweep's command before any run starts.

For a command that runs ``lmlab fit`` (``python -m lmlab fit ...`` or the
``lmlab`` script), the overrides of a representative parameter combination
(every parameter name appears in it) are dry-parsed in-process with
the ``lmlab fit`` parser (:func:`lmlab.training_config.parse_training_args`):
an unknown key or an ill-typed value fails here, naming the parameter,
instead of in every run of the sweep. Values are
not all tried: one combination is parsed, as a run would parse it.
"""

from __future__ import annotations

import contextlib
import io
import os
import re
from collections.abc import Mapping
from typing import Any, Optional

from lmlab.errors import ConfigError

TRAINER_VERBS = ("fit", "validate", "test", "predict")


def lmlab_argv(argv: list[str]) -> Optional[list[str]]:
    """The arguments after ``lmlab`` in a command line (``-m lmlab`` or the script), else None."""
    for i, token in enumerate(argv):
        if token == "-m" and i + 1 < len(argv) and argv[i + 1] in ("lmlab", "lmlab.cli"):
            return argv[i + 2 :]
        if os.path.basename(token) == "lmlab":
            return argv[i + 1 :]
    return None


def dry_parse(args: list[str]) -> tuple[bool, str]:
    """Parse ``lmlab <args>`` as ``lmlab fit`` would, building nothing; (parsed?, one-line error)."""
    from lmlab.training_config import parse_training_args

    with contextlib.redirect_stdout(io.StringIO()), contextlib.redirect_stderr(io.StringIO()):
        try:
            parse_training_args(args[1:])
        except ConfigError as exc:
            return False, f"error: {exc}"
    return True, ""


def error_line(text: str) -> str:
    """The most specific line of a jsonargparse / lmlab error message."""
    lines = [ln.strip() for ln in text.splitlines() if ln.strip()]
    for pattern in (r"unrecognized arguments", r"Expected a <class '(?!NoneType)", r"error: (?!Parser key)"):
        for ln in lines:
            if re.search(pattern, ln):
                return ln.split("error: ", 1)[-1]
    for ln in reversed(lines):
        if ln.startswith("error:") or "error" in ln.lower():
            return ln.split("error: ", 1)[-1]
    return lines[-1] if lines else "the command line was rejected"


def check_lmlab_command(argv_for, params: Mapping[str, Any], source: str) -> Optional[str]:
    """Dry-parse the lmlab part of ``argv_for(params)``; raise ConfigError naming the bad parameter.

    ``argv_for`` maps a parameter dict to the expanded command line. Returns
    None when the command does not run an lmlab trainer verb (nothing to check),
    else a one-line description of what was checked.
    """
    full = lmlab_argv(argv_for(dict(params)))
    if full is None or not full or full[0] not in TRAINER_VERBS:
        return None
    ok, text = dry_parse(full)
    if ok:
        return f"dry-parsed `lmlab {' '.join(full)}` with the lmlab fit parser"
    base_ok, base_text = dry_parse(lmlab_argv(argv_for({})) or [])
    if not base_ok:
        raise ConfigError("command", f"`lmlab {full[0]}` rejects the command itself: {error_line(base_text)}", f"fix the command in {source}")
    culprits = []
    for name, value in params.items():
        one_ok, one_text = dry_parse(lmlab_argv(argv_for({name: value})) or [])
        if not one_ok:
            culprits.append((name, error_line(one_text)))
    if culprits:
        name, problem = culprits[0]
        others = f" (also: {', '.join(n for n, _ in culprits[1:])})" if len(culprits) > 1 else ""
        raise ConfigError(
            f"parameters.{name}",
            f"`lmlab {full[0]}` rejects it: {problem}{others}",
            f"use a key that `lmlab {full[0]} --help` lists, with a valid value",
        )
    raise ConfigError("parameters", f"`lmlab {full[0]}` rejects the combination: {error_line(text)}", f"check the parameters of {source}")
