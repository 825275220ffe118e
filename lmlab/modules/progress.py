"""Training progress counted in optimizer steps.

Lightning's bars count batches, and ``trainer.max_steps`` counts optimizer
steps. For a stage whose batch holds several optimizer steps (a PPO
iteration: ``ppo_epochs`` passes of several minibatches) the two disagree and
the bar would stop at 2/8 when ``max_steps=8`` is reached. The bars here count
``trainer.global_step`` instead.
"""

from __future__ import annotations

from typing import Any

import lightning.pytorch as pl
from lightning.pytorch.callbacks import RichProgressBar, TQDMProgressBar

__all__ = ["OptimizerStepProgress", "StepTQDMProgressBar", "StepRichProgressBar", "count_progress_in_optimizer_steps"]


class OptimizerStepProgress:
    """Mixin for a Lightning progress bar: the training bar shows optimizer steps out of ``max_steps``.

    ``steps_per_batch`` (optimizer steps one training batch takes) sets the
    bar's length when an epoch ends before ``max_steps``.
    """

    steps_per_batch: int = 1
    _epoch_start_step: int = 0

    @property
    def total_train_batches(self) -> int | float:
        trainer = self.trainer
        steps = trainer.num_training_batches * self.steps_per_batch
        if trainer.max_steps is not None and trainer.max_steps > 0:
            steps = min(steps, trainer.max_steps - trainer.global_step)
        return steps

    def on_train_epoch_start(self, trainer: pl.Trainer, *args: Any) -> None:
        self._epoch_start_step = trainer.global_step
        super().on_train_epoch_start(trainer, *args)

    def on_train_batch_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule, outputs: Any, batch: Any, batch_idx: int) -> None:
        # the bars draw position batch_idx + 1: hand them the optimizer steps taken this epoch instead
        steps = trainer.global_step - self._epoch_start_step
        super().on_train_batch_end(trainer, pl_module, outputs, batch, steps - 1)


class StepTQDMProgressBar(OptimizerStepProgress, TQDMProgressBar):
    """:class:`TQDMProgressBar` counting optimizer steps (see :class:`OptimizerStepProgress`)."""


class StepRichProgressBar(OptimizerStepProgress, RichProgressBar):
    """:class:`RichProgressBar` counting optimizer steps (see :class:`OptimizerStepProgress`)."""


_STEP_BARS = {TQDMProgressBar: StepTQDMProgressBar, RichProgressBar: StepRichProgressBar}


def count_progress_in_optimizer_steps(trainer: pl.Trainer, steps_per_batch: int) -> None:
    """Make the trainer's stock progress bar count optimizer steps (a custom bar class is left alone).

    The bar keeps its configuration and state; only its class gains the
    step counting, so this can run after the callbacks were set up.
    """
    bar = trainer.progress_bar_callback
    step_class = _STEP_BARS.get(type(bar))
    if step_class is None:
        return
    bar.__class__ = step_class
    bar.steps_per_batch = max(int(steps_per_batch), 1)
