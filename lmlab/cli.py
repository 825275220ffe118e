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
import sys
from typing import Optional

from lmlab.errors import ConfigError

TRAINER_VERBS = ("fit", "validate", "test", "predict")

#: verb -> (module, function taking argv and returning an exit code, one-line help)
EXTRA_VERBS: dict[str, tuple[str, str, str]] = {
    "tokenizer": ("lmlab.data.tokenizer_cli", "main", "train or inspect a byte-level BPE tokenizer"),
    "data": ("lmlab.data.prepare.cli", "main", "prepare a mixture: filter, dedup, decontaminate, tokenize"),
    "scaling": ("lmlab.scaling.cli", "main", "fit scaling laws and plan compute-optimal runs"),
    "sweep": ("lmlab.sweeps.cli", "main", "run a W&B sweep YAML offline"),
    "eval": ("lmlab.eval.cli", "main", "evaluate a checkpoint on downstream tasks"),
    "export": ("lmlab.export", "main", "export a checkpoint (e.g. --format hf)"),
    "plan": ("lmlab.distributed.planner_cli", "main", "memory and compute plan for a config"),
    "chat": ("lmlab.serving.chat_cli", "main", "chat with a checkpoint in the terminal"),
    "serve": ("lmlab.serving.server", "main", "OpenAI-compatible HTTP server and web chat for a checkpoint"),
}


def _lightning_cli_class(verb: Optional[str] = None):
    """The LightningCLI subclass; given a ``verb`` of ``TRAINER_VERBS``, its parser knows only that subcommand."""
    from lightning.pytorch.cli import LightningCLI

    class LMLabCLI(LightningCLI):
        """LightningCLI with lmlab's compute-budget derivation, one-line errors and run-folder locking."""

        @staticmethod
        def subcommands() -> dict[str, set[str]]:
            # each subcommand's parser costs a full signature walk of Trainer, model and data (about 0.1 s of
            # start-up each); the one named on the command line is the only one a run can use
            every = LightningCLI.subcommands()
            return {verb: every[verb]} if verb in every else every

        def add_arguments_to_parser(self, parser) -> None:
            from lmlab.scaling.budget import ComputeBudget

            parser.add_class_arguments(ComputeBudget, "budget")

        def parse_arguments(self, parser, args) -> None:
            from jsonargparse import ArgumentError

            from lmlab.parse_errors import config_error_from_parse

            # raise instead of printing the full usage; the error becomes one line naming the key
            verbs = getattr(self, "_subcommand_parsers", {})  # none where the CLI is built without subcommands
            for p in (parser, *verbs.values()):
                p.exit_on_error = False
            try:
                super().parse_arguments(parser, args)
            except ArgumentError as e:
                argv = list(sys.argv[1:] if args is None else args)
                verb = next((a for a in argv if a in verbs), None)
                failed = getattr(e, "subcommand_parser", None) or verbs.get(verb) or parser
                raise config_error_from_parse(str(e), failed, flags=False, prog=f"lmlab {verb or 'fit'}") from None

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

            from lmlab.fit_checks import check_config

            cfg = self.config.get(self.subcommand) if self.subcommand else self.config
            if cfg is not None and cfg.get("budget") is not None:
                apply_budget(cfg)
            if cfg is not None:
                check_config(cfg)
                validate_config(cfg)

        def before_fit(self) -> None:
            from lmlab.fit_checks import (
                check_fresh_run,
                check_resume_checkpoint,
                checkpoint_dirs,
                is_global_zero_process,
                names_a_file,
                resolve_last,
            )
            from lmlab.callbacks import ModelCheckpoint

            # everything here runs before the data setup, so a bad resume fails in seconds, not minutes
            cfg = self.config_init[self.subcommand]
            ckpt = cfg.get("ckpt_path")
            dirs = checkpoint_dirs(self.trainer)
            if ckpt == "last":
                ckpt = str(resolve_last(dirs))
                cfg["ckpt_path"] = ckpt
            if ckpt is None:
                if is_global_zero_process():
                    check_fresh_run(dirs)
            elif names_a_file(ckpt):
                check_resume_checkpoint(ckpt, self.model)
            for cb in self.trainer.callbacks:
                if isinstance(cb, ModelCheckpoint):
                    cb.resuming = ckpt is not None
            if is_global_zero_process():
                self._print_wall_time_estimate()

        def _print_wall_time_estimate(self) -> None:
            from lmlab.scaling.budget import estimate_wall_time, fit_matmul_shape, fit_training_flops

            flops = fit_training_flops(self.model, self.datamodule, self.trainer.max_steps)
            if flops is None:
                return
            trainer = self.trainer
            try:
                device = trainer.strategy.root_device
            except Exception:  # a strategy that only knows its device after launch: no estimate
                return
            shape = fit_matmul_shape(self.model, self.datamodule)
            estimate = estimate_wall_time(flops, device, trainer.precision, trainer.num_devices * trainer.num_nodes, shape)
            cfg = self.config[self.subcommand]
            print(estimate.line((cfg.get("budget") or {}).get("compute")), flush=True)

        def _parse_ckpt_path(self) -> None:
            from lmlab.fit_checks import names_a_file, read_checkpoint

            # Lightning unpickles the checkpoint here for its hyperparameters: a missing, truncated or foreign
            # file must be a one-line error, not an unpickler traceback
            sub = self.config.get("subcommand")
            ckpt = self.config[sub].get("ckpt_path") if sub else None
            if names_a_file(ckpt):
                read_checkpoint(ckpt)
            super()._parse_ckpt_path()

        def _instantiate_trainer(self, config: dict, callbacks: list):
            from lightning.pytorch.callbacks import ProgressBar

            from lmlab.callbacks import step_progress_bar

            # the stock bar reads "Epoch 0/-2" for a max_steps run; a config that names its own bar keeps it
            given = config.get("callbacks") or []
            given = given if isinstance(given, list) else [given]
            if config.get("enable_progress_bar", True) is not False and not any(isinstance(c, ProgressBar) for c in given):
                callbacks = [*callbacks, step_progress_bar()]
            return super()._instantiate_trainer(config, callbacks)

        def _run_subcommand(self, subcommand: str) -> None:
            from lmlab.fit_checks import RunFolderLock, checkpoint_dirs, is_global_zero_process

            if subcommand != "fit" or not is_global_zero_process():
                return super()._run_subcommand(subcommand)
            # held from the resume checks to the end of training, released however the fit ends
            with RunFolderLock(checkpoint_dirs(self.trainer)):
                super()._run_subcommand(subcommand)

    return LMLabCLI


def _find_config_error(exc: BaseException) -> Optional[ConfigError]:
    seen = set()
    while exc is not None and id(exc) not in seen:
        if isinstance(exc, ConfigError):
            return exc
        seen.add(id(exc))
        exc = exc.__cause__ or exc.__context__
    return None


class _DropAdvert:
    """A logging filter for Lightning's "install litlogger" tip, printed on every run that logs elsewhere."""

    def filter(self, record) -> bool:
        return "litlogger" not in str(record.getMessage())


def _quiet_lightning_notices() -> None:
    import logging
    import warnings

    # Lightning's own flattening of the batch calls a torch.utils._pytree API that torch has deprecated; nothing
    # lmlab (or its user) does causes or can fix it, and it would otherwise print on every run
    warnings.filterwarnings("ignore", message=r".*isinstance\(treespec, LeafSpec\)", module=r"lightning\.pytorch\.utilities\._pytree")
    for name in ("lightning.pytorch.utilities.rank_zero", "lightning.fabric.utilities.rank_zero"):
        logger = logging.getLogger(name)
        if not any(isinstance(f, _DropAdvert) for f in logger.filters):
            logger.addFilter(_DropAdvert())


def run_lightning(args: Optional[list[str]] = None):
    """Run the LightningCLI part of ``lmlab`` (fit/validate/test/predict)."""
    import lightning.pytorch as pl

    _quiet_lightning_notices()
    argv = sys.argv[1:] if args is None else args
    cli_cls = _lightning_cli_class(argv[0] if argv else None)
    return cli_cls(
        model_class=pl.LightningModule,
        datamodule_class=pl.LightningDataModule,
        subclass_mode_model=True,
        subclass_mode_data=True,
        args=args,
        save_config_kwargs={"overwrite": True},
        # lmlab prints the model's size and training FLOPs itself; Lightning's table would add a "FLOPs 0" column
        # (it counts FLOPs only for modules with an example input)
        trainer_defaults={"enable_model_summary": False},
        parser_kwargs={"default_env": False},
        auto_configure_optimizers=False,
        # lmlab's stages keep what a checkpoint needs in its own "lmlab" record (models/checkpoint.py) and never
        # call save_hyperparameters; Lightning's support for it dumps the whole config again at every start (0.1 s)
        load_from_checkpoint_support=False,
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
    except FloatingPointError as e:
        # a diverged run (the modules stop before the optimizer step): the message says what to change
        print(f"lmlab {verb}: error: training diverged: {e}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        return 130


if __name__ == "__main__":
    raise SystemExit(main())
