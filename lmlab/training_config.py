"""Read a training YAML the way ``lmlab fit`` does, without building anything.

Tools that need a training config (``lmlab plan``, ``lmlab tokenizer``,
``lmlab eval perplexity --config``, the sweep preflight) go through
:func:`load_training_config`: the same LightningCLI parser as ``lmlab fit``
reads the files, so defaults, ``class_path`` resolution, composition of
several ``--config`` files, dotted overrides and type checks are identical.
Mistakes come back as one-line :class:`~lmlab.errors.ConfigError`\\ s.
"""

from __future__ import annotations

import contextlib
import os
import sys
import warnings
from collections.abc import Sequence
from typing import Any, Optional

from lmlab.errors import ConfigError


def _parsing_cli_class(budget: bool, field: Optional[str]):
    from lmlab.cli import _lightning_cli_class

    class ParseOnlyCLI(_lightning_cli_class()):
        """The ``lmlab fit`` parser, stopped before any class is built or any seed is set."""

        def parse_arguments(self, parser, args) -> None:
            try:
                super().parse_arguments(parser, args)
            except ConfigError as err:  # one line naming the key as `lmlab fit` does; here under ``field``
                if field is None:
                    raise
                where = field if err.field in ("arguments", "--config") else f"{field} {err.field}"
                raise ConfigError(where, err.problem, err.fix) from None

        def _set_seed(self) -> None:
            pass

        def before_instantiate_classes(self) -> None:
            # hardware checks (validate_config) are left out: tools such as ``lmlab plan`` describe other machines
            if budget and self.config.get("budget") is not None:
                from lmlab.scaling.budget import apply_budget

                with contextlib.redirect_stdout(sys.stderr):
                    apply_budget(self.config)

        def instantiate_classes(self) -> None:
            pass

    return ParseOnlyCLI


def load_training_config(
    configs: Sequence[str | os.PathLike],
    overrides: Sequence[str] = (),
    *,
    field: Optional[str] = "--config",
    override_field: str = "--override",
    budget: bool = True,
) -> Any:
    """The parsed config (a jsonargparse Namespace) of ``lmlab fit --config A --config B ... OVERRIDES``.

    ``overrides`` are dotted assignments (``model.config.n_layers=4``, with
    or without the leading ``--``). With ``budget`` the ``budget`` section is
    applied as ``lmlab fit`` applies it (its message goes to stderr). Errors
    name ``field`` (the flag that gave the YAMLs), or ``override_field`` for
    a bad override, before the key.
    """
    if not configs:
        raise ConfigError(field or "--config", "no training YAML given", "pass e.g. --config experiments/quickstart.yaml")
    for path in configs:
        if not os.path.isfile(os.path.expanduser(os.fspath(path))):
            raise ConfigError(field or "--config", f"{os.fspath(path)} does not exist",
                              "give a training YAML such as experiments/quickstart.yaml")
    args: list[str] = []
    for path in configs:
        args += ["--config", os.fspath(path)]
    args += [o if o.startswith("--") else f"--{o}" for o in overrides]
    try:
        return parse_training_args(args, field=field, budget=budget)
    except ConfigError as e:
        # name the override rather than the YAML when the bad key was given as one
        key = e.field.split(" ", 1)[-1].lstrip("-")
        given = [o.lstrip("-").partition("=")[0] for o in overrides]
        if field is not None and e.field.startswith(f"{field} ") and key in given:
            raise ConfigError(f"{override_field} {key}", e.problem, e.fix) from None
        raise


def parse_training_args(args: Sequence[str], *, field: Optional[str] = None, budget: bool = True) -> Any:
    """The parsed config of the arguments that follow ``lmlab fit`` (``--config X --key=value ...``).

    ``--ckpt_path`` and ``--print_config`` are left out: they choose what a run
    does, not what it is.
    """
    import lightning.pytorch as pl

    kept: list[str] = []
    skip = False
    for arg in args:
        if skip:
            skip = False
            continue
        name = arg.partition("=")[0]
        if name in ("--ckpt_path", "--print_config"):
            skip = name == "--ckpt_path" and "=" not in arg
            continue
        kept.append(arg)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # LightningCLI warns when handed args while sys.argv holds the tool's own
        cli = _parsing_cli_class(budget, field)(
            model_class=pl.LightningModule,
            datamodule_class=pl.LightningDataModule,
            subclass_mode_model=True,
            subclass_mode_data=True,
            args=kept,
            run=False,
            parser_kwargs={"default_env": False, "exit_on_error": False},
            auto_configure_optimizers=False,
        )
    return cli.config


def as_dict(cfg: Any) -> dict:
    """A plain nested dict of a parsed config (``Namespace.as_dict``)."""
    return cfg.as_dict() if hasattr(cfg, "as_dict") else dict(cfg)


def init_args(section: Any) -> dict:
    """The arguments of a ``class_path``/``init_args`` section (or the section itself), as a dict."""
    if section is None:
        return {}
    section = as_dict(section)
    return dict(section.get("init_args") or {}) if "class_path" in section else section
