"""Lightning callbacks for lmlab's step-based, manually optimized stages.

lmlab modules step their optimizer inside ``training_step`` (manual
optimization) and train for ``max_steps`` with ``max_epochs=-1``. Two stock
callbacks misread that setup: Lightning's ``ModelCheckpoint`` warns on every
run that "no pre-optimization state was saved" (and ignores
``train_time_interval``), and the progress bar titles an unbounded run
"Epoch 0/-2" and counts batches of the epoch instead of optimizer steps.
"""

from __future__ import annotations

import os
import time
from typing import Any

from lightning.pytorch.callbacks import ModelCheckpoint as _LightningModelCheckpoint
from lightning.pytorch.callbacks import RichProgressBar, TQDMProgressBar


class ModelCheckpoint(_LightningModelCheckpoint):
    """``lightning.pytorch.callbacks.ModelCheckpoint`` for manually optimized modules.

    After ``training_step`` returns, the optimizer has stepped and
    ``global_step`` counts that step, so the weights are exactly the state a
    resume continues from: they are saved as under automatic optimization
    (``every_n_train_steps`` and ``train_time_interval`` both honoured). A
    resumed run writes into its own non-empty folder by design, so the
    "directory exists and is not empty" warning is left out when ``resuming``
    is set (``lmlab fit --ckpt_path ...`` sets it).

    Without ``dirpath`` the checkpoints go to ``<trainer.default_root_dir>/checkpoints``
    (Lightning would bury them in the first logger's ``name/version_N/``
    folder), so ``trainer.default_root_dir`` alone names a run's folder.
    """

    resuming: bool = False

    def on_train_batch_end(self, trainer, pl_module, outputs, batch: Any, batch_idx: int) -> None:
        if pl_module.automatic_optimization:
            return super().on_train_batch_end(trainer, pl_module, outputs, batch, batch_idx)
        if self._should_skip_saving_checkpoint(trainer):
            return
        due = self._every_n_train_steps >= 1 and trainer.global_step % self._every_n_train_steps == 0
        interval = self._train_time_interval
        if interval is not None:
            now = time.monotonic()
            elapsed = self._last_time_checked is not None and now - self._last_time_checked >= interval.total_seconds()
            # every rank must take the same decision, or the collective save would hang
            if trainer.strategy.broadcast(elapsed):
                self._last_time_checked = now
                due = True
        if not due:
            return
        candidates = self._monitor_candidates(trainer)
        if self.monitor is not None and self.monitor not in candidates:
            self._defer_save_until_validation = True
            return
        self._save_topk_checkpoint(trainer, candidates)
        self._save_last_checkpoint(trainer, candidates)

    def run_dirpath(self, trainer) -> str:
        """The folder this callback writes to in ``trainer``'s run (known before the fit starts)."""
        if self.dirpath is not None:
            return str(self.dirpath)
        return os.path.join(trainer.default_root_dir, "checkpoints")

    def _ModelCheckpoint__resolve_ckpt_dir(self, trainer):  # noqa: N802 - overrides where Lightning derives dirpath
        return self.run_dirpath(trainer)

    def _ModelCheckpoint__warn_if_dir_not_empty(self, dirpath) -> None:  # noqa: N802 - overrides the private check
        if not self.resuming:
            super()._ModelCheckpoint__warn_if_dir_not_empty(dirpath)


def _counts_steps(trainer) -> bool:
    return trainer.max_steps is not None and trainer.max_steps > 0 and trainer.max_epochs in (None, -1)


class _StepCounting:
    """Shared by both bars: optimizer steps out of ``max_steps`` for step-bounded runs, no ``v_num``."""

    @property
    def total_train_batches(self):
        if _counts_steps(self.trainer):
            return self.trainer.max_steps
        return super().total_train_batches

    def get_metrics(self, trainer, pl_module) -> dict:
        items = super().get_metrics(trainer, pl_module)
        items.pop("v_num", None)
        return items


class StepTQDMProgressBar(_StepCounting, TQDMProgressBar):
    """The tqdm bar counting optimizer steps (used when ``rich`` is not installed)."""

    def on_train_batch_end(self, trainer, pl_module, outputs, batch: Any, batch_idx: int) -> None:
        if not _counts_steps(trainer):
            return super().on_train_batch_end(trainer, pl_module, outputs, batch, batch_idx)
        if self._should_update(trainer.global_step, self.train_progress_bar.total):
            self.train_progress_bar.n = trainer.global_step
            self.train_progress_bar.refresh()
            self.train_progress_bar.set_postfix(self.get_metrics(trainer, pl_module))


class StepProgressBar(_StepCounting, RichProgressBar):
    """The rich progress bar titled "Step" and counting optimizer steps for step-bounded runs."""

    def _get_train_description(self, current_epoch: int) -> str:
        if _counts_steps(self.trainer):
            return f"{'Step':{len(self.validation_description)}}"
        return super()._get_train_description(current_epoch)

    def on_train_batch_end(self, trainer, pl_module, outputs, batch: Any, batch_idx: int) -> None:
        if not _counts_steps(trainer):
            return super().on_train_batch_end(trainer, pl_module, outputs, batch, batch_idx)
        if not self.is_disabled and self.train_progress_bar_id is None:
            self._initialize_train_progress_bar_id()
        self._update(self.train_progress_bar_id, trainer.global_step)
        self._update_metrics(trainer, pl_module)


def step_progress_bar():
    """The step-counting bar in the style Lightning would pick (rich when it is installed)."""
    try:
        import rich  # noqa: F401
    except ImportError:
        return StepTQDMProgressBar()
    # rich redraws from its own thread, up to refresh_rate times a second; 10 looks as smooth and, for runs of
    # many short steps, costs a tenth of the CPU time Lightning's 100 does (about 0.4 ms a step at 60 steps/s)
    return StepProgressBar(refresh_rate=10)
