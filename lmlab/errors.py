"""User-facing errors.

A ``ConfigError`` is a mistake in the user's input (a config field, a file, a
flag). The ``lmlab`` command prints it as one line, naming the field and the
fix, instead of a traceback.
"""

from __future__ import annotations


class ConfigError(ValueError):
    """Bad user input. ``field`` names the offending config key; ``fix`` says what to change."""

    def __init__(self, field: str, problem: str, fix: str | None = None):
        self.field = field
        self.problem = problem
        self.fix = fix
        msg = f"{field}: {problem}"
        if fix:
            msg += f" ({fix})"
        super().__init__(msg)
