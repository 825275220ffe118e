"""LightningModules, one per training stage, and their shared optimisation code."""

from lmlab.modules.optim import OptimizerConfig, ScheduleConfig
from lmlab.modules.pretrain import PretrainModule

__all__ = ["OptimizerConfig", "ScheduleConfig", "PretrainModule"]
