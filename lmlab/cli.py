"""The ``lmlab`` command.

``lmlab fit|validate|test|predict`` is a :class:`LightningCLI`: the YAML names
the LightningModule (``model.class_path``) and DataModule (``data.class_path``)
of a stage, dotted flags override any field (``--model.config.n_layers=4``),
several ``--config`` files compose, and ``--print_config`` shows the result.

The other verbs (``data``, ``tokenizer``, ``sweep``, ``scaling``, ``eval``,
``export``, ``plan``, ``chat``, ``serve``) live beside it and dispatch to their packages.
"""

from __future__ import annotations

import importlib
import math
import os
import sys
from typing import Optional

from lmlab.errors import ConfigError

TRAINER_VERBS = ("fit", "validate", "test", "predict")

#: verb -> (module, function taking argv and returning an exit code, one-line help)
EXTRA_VERBS: dict[str, tuple[str, str, str]] = {
    "tokenizer": ("lmlab.data.tokenizer_cli", "main", "train or inspect a byte-level BPE tokenizer"),
    "data": ("lmlab.data.pipeline.cli", "main", "prepare a mixture: filter, dedup, decontaminate, tokenize"),
    "scaling": ("lmlab.scaling.cli", "main", "fit scaling laws and plan compute-optimal runs"),
    "sweep": ("lmlab.sweeps.cli", "main", "run a W&B sweep YAML offline"),
    "eval": ("lmlab.eval.cli", "main", "evaluate a checkpoint on downstream tasks"),
    "export": ("lmlab.export", "main", "export a checkpoint (e.g. --format hf)"),
    "plan": ("lmlab.distributed.planner_cli", "main", "memory and compute plan for a config"),
    "chat": ("lmlab.serving.chat_cli", "main", "chat with a checkpoint in the terminal"),
    "serve": ("lmlab.serving.server", "main", "OpenAI-compatible HTTP server and web chat for a checkpoint"),
}


def _lightning_cli_class():
    from lightning.pytorch.cli import LightningCLI

    class LMLabCLI(LightningCLI):
        """LightningCLI with lmlab's compute-budget derivation and defaults."""

        def add_arguments_to_parser(self, parser) -> None:
            from lmlab.scaling.budget import ComputeBudget

            parser.add_class_arguments(ComputeBudget, "budget")

        def instantiate_classes(self) -> None:
            try:
                super().instantiate_classes()
            except Exception as e:
                # jsonargparse wraps errors raised while building classes; surface ours as one line
                found = _find_config_error(e)
                if found is not None:
                    raise found from None
                raise

        def before_instantiate_classes(self) -> None:
            from lmlab.scaling.budget import apply_budget

            from lmlab.distributed.validate import validate_config

            cfg = self.config.get(self.subcommand) if self.subcommand else self.config
            if cfg is not None and cfg.get("budget") is not None:
                apply_budget(cfg)
            if cfg is not None:
                validate_config(cfg)

    return LMLabCLI


def _find_config_error(exc: BaseException) -> Optional[ConfigError]:
    seen = set()
    while exc is not None and id(exc) not in seen:
        if isinstance(exc, ConfigError):
            return exc
        seen.add(id(exc))
        exc = exc.__cause__ or exc.__context__
    return None


def run_lightning(args: Optional[list[str]] = None):
    """Run the LightningCLI part of ``lmlab`` (fit/validate/test/predict)."""
    import lightning.pytorch as pl

    cli_cls = _lightning_cli_class()
    return cli_cls(
        model_class=pl.LightningModule,
        datamodule_class=pl.LightningDataModule,
        subclass_mode_model=True,
        subclass_mode_data=True,
        args=args,
        save_config_kwargs={"overwrite": True},
        parser_kwargs={"default_env": False},
        auto_configure_optimizers=False,
    )


def _usage() -> str:
    lines = ["usage: lmlab {fit,validate,test,predict} --config X.yaml [--key.sub=value ...]", "       lmlab VERB ...", ""]
    lines.append("training (LightningCLI; `lmlab fit --help` for every option):")
    lines.append("  fit | validate | test | predict")
    lines.append("")
    lines.append("other verbs:")
    for verb, (_, _, help_) in EXTRA_VERBS.items():
        lines.append(f"  {verb:<10} {help_}")
    return "\n".join(lines)


def main(argv: Optional[list[str]] = None) -> int:
    from_shell = argv is None
    argv = list(sys.argv[1:] if argv is None else argv)
    if not argv or argv[0] in ("-h", "--help"):
        print(_usage())
        return 0
    verb = argv[0]
    try:
        if verb in EXTRA_VERBS:
            module, func, _ = EXTRA_VERBS[verb]
            try:
                mod = importlib.import_module(module)
            except ModuleNotFoundError as e:
                if e.name and e.name.startswith("lmlab"):
                    print(f"lmlab {verb}: not available in this installation", file=sys.stderr)
                    return 2
                raise
            return int(getattr(mod, func)(argv[1:]) or 0)
        if verb in TRAINER_VERBS or verb.startswith("-"):
            run_lightning(None if from_shell else argv)
            return 0
        print(f"lmlab: unknown verb {verb!r}\n\n{_usage()}", file=sys.stderr)
        return 2
    except ConfigError as e:
        # user mistakes get one line, not a traceback
        print(f"lmlab {verb}: error: {e}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        return 130


if __name__ == "__main__":
    raise SystemExit(main())
