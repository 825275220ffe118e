"""Prompt templates: Python ``str.format`` over a data row.

``{field}``, ``{field[0]}`` and ``{field[key]}`` work as in ``str.format``; a
list rendered whole (``{test_list}``) is joined with newlines, which is what
code-task programs and multi-line fields want. Literal braces are ``{{``/``}}``.
"""

from __future__ import annotations

import string
from collections.abc import Mapping
from typing import Any


class TemplateError(ValueError):
    """A template refers to a field the row does not have (or cannot be formatted)."""


class _RowFormatter(string.Formatter):
    def format_field(self, value: Any, format_spec: str) -> str:
        if isinstance(value, (list, tuple)) and not format_spec:
            return "\n".join(str(v) for v in value)
        return super().format_field(value, format_spec)


_FORMATTER = _RowFormatter()


def render(template: str, row: Mapping[str, Any]) -> str:
    """Fill ``template`` from ``row``; raises :class:`TemplateError` naming the missing field."""
    try:
        return _FORMATTER.vformat(template, (), row)
    except KeyError as e:
        raise TemplateError(f"template {template!r} needs field {e.args[0]!r}") from None
    except (IndexError, AttributeError, TypeError, ValueError) as e:
        raise TemplateError(f"template {template!r} cannot be filled: {e}") from None


def check_template(template: str) -> None:
    """Raise ``ValueError`` if ``template`` is not a valid format string (unbalanced braces)."""
    for _ in string.Formatter().parse(template):
        pass
