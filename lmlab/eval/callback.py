"""``EvalCallback``: downstream tasks every K steps of training, for capability-vs-scale curves.

Add it to a run's trainer callbacks::

    trainer:
      callbacks:
        - class_path: lmlab.eval.callback.EvalCallback
          init_args: {tasks: [arc_easy, hellaswag], every_n_steps: 500, limit: 200}

Every ``every_n_steps`` optimizer steps (and once at the end of training) the
global-zero rank puts the model in eval mode, runs the tasks through
:func:`lmlab.eval.evaluate` with :class:`~lmlab.eval.adapter.LmlabLM`, puts
the model back in its previous mode and logs ``eval/<task>/<metric>`` (and
the metric's ``_stderr``) to every logger at the current step; other ranks
wait at a barrier. Under a sharded strategy (FSDP) every rank would have to
join the forward passes, so run the evaluation afterwards with
``lmlab eval`` instead.
"""

from __future__ import annotations

import os
from typing import Any, Optional, Union

import lightning.pytorch as pl
import torch

from lmlab.errors import ConfigError
from lmlab.modules.data_contract import StageData, provides

_NON_METRICS = ("n", "num_fewshot", "skipped_rows", "source", "subtasks")


def metric_key(task: str, metric: str) -> str:
    """``eval/<task>/<metric>``; lm-eval's ``name,filter`` metrics become ``name/filter``."""
    return f"eval/{task}/{metric.replace(',', '/')}"


def flatten_results(results: dict[str, dict[str, Any]]) -> dict[str, float]:
    """Numeric task metrics (with standard errors) of a results dict as ``eval/<task>/<metric>`` floats."""
    out: dict[str, float] = {}
    for task, entry in results.items():
        for name, value in entry.items():
            if name in _NON_METRICS or isinstance(value, bool) or not isinstance(value, (int, float)):
                continue
            out[metric_key(task, name)] = float(value)
    return out


class EvalCallback(pl.Callback):
    """Runs evaluation tasks every ``every_n_steps`` optimizer steps and logs ``eval/<task>/<metric>``.

    Args:
        tasks: task names (or YAML paths), a list or a comma-separated string.
        every_n_steps: evaluate when ``global_step`` is a multiple of this.
        limit: first N docs per task (or a fraction); keep it small, it runs often.
        data_dir: task data directory (default ``$LMLAB_EVAL_DATA``, else ``data/eval``).
        num_fewshot: override every task's few-shot count.
        batch_size: requests per forward pass.
        max_length: longest model input (default: the model's ``max_seq_len``).
        tokenizer: tokenizer directory (default: the datamodule's ``tokenizer``).
        at_train_end: also evaluate after the last step (if not just done).
        output_dir: if set, write each evaluation's ``results.json`` / samples under ``<output_dir>/step_<N>``.
        seed: few-shot sampling and bootstrap seed.
        allow_unsandboxed: run code tasks' model-written programs even where the OS sandbox
            (bubblewrap) is unavailable; without it such tasks refuse to execute code.
    """

    def __init__(
        self,
        tasks: Union[list[str], str],
        every_n_steps: int = 1000,
        limit: Optional[Union[int, float]] = None,
        data_dir: Optional[str] = None,
        num_fewshot: Optional[int] = None,
        batch_size: int = 16,
        max_length: Optional[int] = None,
        tokenizer: Optional[str] = None,
        at_train_end: bool = True,
        output_dir: Optional[str] = None,
        seed: int = 1234,
        allow_unsandboxed: bool = False,
    ):
        super().__init__()
        names = [t.strip() for t in tasks.split(",")] if isinstance(tasks, str) else [str(t) for t in tasks]
        names = [t for t in names if t]
        if not names:
            raise ConfigError("EvalCallback.tasks", "no tasks given", "name at least one task, e.g. arc_easy")
        if every_n_steps < 1:
            raise ConfigError("EvalCallback.every_n_steps", f"must be >= 1, got {every_n_steps}")
        from lmlab.eval.tasks import task_file

        for name in names:
            task_file(name)  # an unknown name fails at startup, not hours into the run
        self.tasks = names
        self.every_n_steps = every_n_steps
        self.limit = limit
        self.data_dir = data_dir
        self.num_fewshot = num_fewshot
        self.batch_size = batch_size
        self.max_length = max_length
        self.tokenizer = tokenizer
        self.at_train_end = at_train_end
        self.output_dir = output_dir
        self.seed = seed
        self.allow_unsandboxed = allow_unsandboxed
        self.history: list[dict[str, Any]] = []
        self._last_step: Optional[int] = None
        self._tok = None

    # --- hooks -------------------------------------------------------------------------------------

    def on_train_batch_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule, outputs, batch, batch_idx) -> None:
        step = trainer.global_step
        if step > 0 and step % self.every_n_steps == 0 and step != self._last_step:
            self.run(trainer, pl_module)

    def on_train_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        if self.at_train_end and trainer.global_step != self._last_step and trainer.global_step > 0:
            self.run(trainer, pl_module)

    # --- evaluation --------------------------------------------------------------------------------

    def _tokenizer(self, trainer: pl.Trainer) -> Any:
        if self._tok is None:
            if self.tokenizer is not None:
                from lmlab.data.tokenizer import load_tokenizer

                self._tok = load_tokenizer(self.tokenizer, field="EvalCallback.tokenizer")
            else:
                dm = trainer.datamodule
                self._tok = dm.tokenizer if dm is not None and provides(dm, StageData) else None
                if self._tok is None:
                    raise ConfigError("EvalCallback.tokenizer", "the datamodule has no loaded tokenizer",
                                      "set the callback's tokenizer to a tokenizer directory")
        return self._tok

    def run(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> dict[str, float]:
        """Evaluate now (global rank zero), log and return the flattened metrics."""
        from lmlab.eval.adapter import LmlabLM
        from lmlab.eval.harness import evaluate

        step = int(trainer.global_step)
        self._last_step = step
        metrics: dict[str, float] = {}
        if trainer.is_global_zero:
            model = pl_module.model
            was_training = model.training
            model.eval()
            try:
                lm = LmlabLM(model, self._tokenizer(trainer), batch_size=self.batch_size,
                             max_length=self.max_length, device=pl_module.device, seed=self.seed)
                out_dir = os.path.join(self.output_dir, f"step_{step}") if self.output_dir else None
                with torch.no_grad(), trainer.precision_plugin.forward_context():
                    out = evaluate(lm, self.tasks, data_dir=self.data_dir, limit=self.limit,
                                   num_fewshot=self.num_fewshot, batch_size=self.batch_size, seed=self.seed,
                                   output_dir=out_dir, progress=False, allow_unsandboxed=self.allow_unsandboxed)
            finally:
                model.train(was_training)
            metrics = flatten_results(out["results"])
            for logger in trainer.loggers:
                logger.log_metrics(metrics, step=step)
            trainer.callback_metrics.update({k: torch.tensor(v) for k, v in metrics.items()})
            self.history.append({"step": step, **metrics})
        if trainer.world_size > 1:
            trainer.strategy.barrier("lmlab-eval-callback")
        return metrics

    # --- checkpointing -----------------------------------------------------------------------------

    def state_dict(self) -> dict[str, Any]:
        return {"history": self.history, "last_step": self._last_step}

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        self.history = list(state_dict.get("history", []))
        self._last_step = state_dict.get("last_step")
