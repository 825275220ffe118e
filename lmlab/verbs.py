"""One mechanism for lmlab's verbs (everything but ``fit|validate|test|predict``).

A verb is a typed function whose docstring is its ``--help``; a verb with
sub-verbs is a dict of them. jsonargparse reads the signature, so every verb
gets the same surface as ``lmlab fit``:

- ``--config FILE`` (``--settings FILE`` where the verb's own ``config``
  parameter names a training or prepare YAML) holds any of its settings,
- dotted flags set fields of nested dataclass settings (``--engine.tasks=4``),
- ``--print_config`` prints the settings as YAML that ``--config`` reads back,
- flag names use underscores (``--max_documents``); the hyphenated spellings
  (``--max-documents``), ``--flag`` for ``--flag=true`` and ``--no-flag`` for
  ``--flag=false`` are accepted too, and a repeated list flag
  (``--text a --text b``) appends.

Every user mistake, from jsonargparse (unknown key, bad type, missing value)
or from the verb (a :class:`~lmlab.errors.ConfigError`), is one line on
stderr, ``lmlab VERB: error: <field>: <problem> (<fix>)``, with exit status 2.
"""

from __future__ import annotations

import argparse
import inspect
import re
import sys
import typing
from collections.abc import Callable, Mapping
from typing import Any, NoReturn, Optional, Union

from lmlab.errors import ConfigError
from lmlab.parse_errors import config_error_from_parse

Command = Callable[..., Optional[int]]
#: a verb: one command, or named sub-verbs (nested dicts allowed)
Commands = Union[Command, Mapping[str, Any]]

SETTINGS_FLAG = "--config"
#: used instead of ``--config`` when a command's own ``config`` parameter takes that name
ALT_SETTINGS_FLAG = "--settings"
_TRUE = {"true", "false", "yes", "no", "1", "0", "on", "off"}


class _UsageError(Exception):
    """A parse error of jsonargparse, raised instead of printing usage and exiting."""

    def __init__(self, message: str, parser: Any):
        super().__init__(message)
        self.message = message
        self.parser = parser


def _parser_class():
    from jsonargparse import ArgumentParser

    class VerbParser(ArgumentParser):
        """jsonargparse parser whose errors are raised (and then made one line by :mod:`lmlab.parse_errors`)."""

        def error(self, message: str, ex: Exception | None = None) -> NoReturn:  # type: ignore[override]
            raise _UsageError(message, self)

    return VerbParser


def positional(*names: str) -> Callable[[Command], Command]:
    """Mark parameters of a command as positional arguments (``lmlab scaling fit runs.csv``).

    Other parameters are flags, required ones included (``--ckpt``).
    """

    def mark(fn: Command) -> Command:
        fn.__verb_positional__ = tuple(names)  # type: ignore[attr-defined]
        return fn

    return mark


def _first_line(doc: Optional[str]) -> str:
    return (inspect.cleandoc(doc).splitlines() or [""])[0] if doc else ""


def _description(doc: Optional[str]) -> str:
    """The docstring without its Args section (those lines become the help of each flag)."""
    if not doc:
        return ""
    text = inspect.cleandoc(doc)
    return re.split(r"\n\s*(Args|Arguments|Parameters):\s*\n", text)[0].strip()


def _param_docs(fn: Command) -> dict[str, str]:
    try:
        from docstring_parser import parse

        return {p.arg_name: p.description or "" for p in parse(fn.__doc__ or "").params}
    except ImportError:  # pragma: no cover - jsonargparse's optional docstring support
        return {}


def _settings_flag(fn: Command) -> str:
    return ALT_SETTINGS_FLAG if "config" in inspect.signature(fn).parameters else SETTINGS_FLAG


def _command_parser(prog: str, fn: Command):
    from jsonargparse import ActionConfigFile

    parser = _parser_class()(prog=prog, description=_description(fn.__doc__), env_prefix=False, default_env=False)
    flag = _settings_flag(fn)
    parser.add_argument(flag, action=ActionConfigFile, help="YAML file with any of the settings below (see --print_config)")
    pos = getattr(fn, "__verb_positional__", ())
    if pos:
        hints = typing.get_type_hints(fn)
        docs = _param_docs(fn)
        sig = inspect.signature(fn)
        for name in pos:
            default = sig.parameters[name].default
            kwargs: dict[str, Any] = {"type": hints.get(name, str), "help": docs.get(name, "")}
            if default is not inspect.Parameter.empty:
                kwargs.update(nargs="?", default=default)
            parser.add_argument(name, **kwargs)
    parser.add_function_arguments(fn, as_positional=False, skip=set(pos), sub_configs=True)
    return parser


def _build(prog: str, commands: Commands):
    if callable(commands):
        return _command_parser(prog, commands)
    parser = _parser_class()(prog=prog, description=_description(commands.get("_help")), env_prefix=False, default_env=False)
    sub = parser.add_subcommands(required=True, dest="command")
    for name, item in commands.items():
        if name.startswith("_"):
            continue
        child = _build(f"{prog} {name}", item)
        help_ = item.get("_help") if isinstance(item, Mapping) else _first_line(item.__doc__)
        sub.add_subcommand(name, child, help=help_)
    return parser


# --- argv spelling ----------------------------------------------------------------------------------


def _typehint(action: argparse.Action) -> Any:
    return getattr(action, "_typehint", None)


def _strip_optional(hint: Any) -> Any:
    if typing.get_origin(hint) is Union:
        args = [a for a in typing.get_args(hint) if a is not type(None)]
        if len(args) == 1:
            return args[0]
    return hint


def _is_bool(action: argparse.Action) -> bool:
    return _strip_optional(_typehint(action)) is bool


def _is_list(action: argparse.Action) -> bool:
    return typing.get_origin(_strip_optional(_typehint(action))) in (list, typing.List)  # noqa: UP006


def _options(parser) -> dict[str, argparse.Action]:
    return {s: a for a in parser._actions for s in a.option_strings if s.startswith("--")}


def normalize_argv(parser, argv: list[str]) -> list[str]:
    """Today's argparse spellings as jsonargparse reads them (see the module docstring)."""
    opts = _options(parser)
    out: list[str] = []
    i = 0
    while i < len(argv):
        token = argv[i]
        i += 1
        if token == "--" or not token.startswith("--") or token.startswith("--print_config"):
            out.append(token)
            continue
        name, eq, value = token.partition("=")
        plus = name.endswith("+")
        name = name.rstrip("+")
        if name not in opts and "-" in name[2:]:
            name = "--" + name[2:].replace("-", "_")
        if name not in opts and name.startswith("--no_") and f"--{name[5:]}" in opts and _is_bool(opts[f"--{name[5:]}"]):
            out.append(f"--{name[5:]}=false")
            continue
        action = opts.get(name)
        if action is not None and _is_bool(action) and not eq:
            nxt = argv[i] if i < len(argv) else None
            if nxt is None or nxt.lower() not in _TRUE:
                out.append(f"{name}=true")
                continue
        if action is not None and _is_list(action) and not plus:
            given = value if eq else (argv[i] if i < len(argv) else "")
            if not given.lstrip().startswith("["):
                plus = True
        out.append(f"{name}{'+' if plus else ''}{eq}{value}")
    return out


def _subparser(parser, argv: list[str]):
    """The parser of the (sub-)command that ``argv`` selects, and the index where its arguments start."""
    start = 0
    path: list[str] = []
    while parser._subcommands_action is not None and start < len(argv):
        chosen = parser._subcommands_action._name_parser_map.get(argv[start])
        if chosen is None:
            break
        path.append(argv[start])
        parser, start = chosen, start + 1
    parser._verb_path = tuple(path)
    return parser, start


# --- running --------------------------------------------------------------------------------------------


def _kwargs(init: Any, fn: Command) -> dict[str, Any]:
    names = inspect.signature(fn).parameters
    return {k: init[k] for k in names if k in init}


def _select(commands: Commands, init: Any) -> tuple[Command, Any]:
    while not callable(commands):
        name = init["command"]
        commands, init = commands[name], init[name]
    return commands, init


def run(
    prog: str,
    commands: Commands,
    argv: Optional[list[str]] = None,
    *,
    default: Optional[str] = None,
    aliases: Optional[Mapping[str, str]] = None,
) -> int:
    """Parse ``argv`` for ``commands`` and run the chosen one; returns its exit status (2 for bad input).

    ``default`` is the sub-verb run when ``argv`` names none (``lmlab eval
    --ckpt ...`` runs ``lmlab eval run``); ``aliases`` maps extra sub-verb
    names to real ones.
    """
    argv = list(sys.argv[1:] if argv is None else argv)
    if isinstance(commands, Mapping) and argv:
        if aliases and argv[0] in aliases:
            argv[0] = aliases[argv[0]]
        if default and argv[0] not in commands and argv[0] not in ("-h", "--help"):
            argv.insert(0, default)
    parser = None
    try:
        parser = _build(prog, commands)
        target, start = _subparser(parser, argv)
        argv = argv[:start] + normalize_argv(target, argv[start:])
        try:
            cfg = parser.parse_args(argv)
        except _UsageError as e:
            raise config_error_from_parse(e.message, target, prog=target.prog.replace(" [options]", "")) from None
        init = parser.instantiate(cfg)
        fn, init = _select(commands, init)
        return int(fn(**_kwargs(init, fn)) or 0)
    except ConfigError as e:
        print(f"{prog}: error: {e}", file=sys.stderr)
        return 2
    except SystemExit as e:  # --help, --print_config
        return e.code if isinstance(e.code, int) else (0 if e.code is None else 2)
