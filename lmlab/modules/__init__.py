"""LightningModules, one per training stage, and their shared optimisation code.

Exports resolve lazily so importing one stage does not import them all.
"""

from __future__ import annotations

import importlib

_EXPORTS = {
    "OptimizerConfig": "lmlab.modules.optim",
    "ScheduleConfig": "lmlab.modules.optim",
    "TrainingSettings": "lmlab.modules.optim",
    "PretrainModule": "lmlab.modules.pretrain",
    "SFTModule": "lmlab.modules.sft",
    "RewardModule": "lmlab.modules.reward",
    "DPOModule": "lmlab.modules.dpo",
    "PPOModule": "lmlab.modules.ppo",
    "RolloutConfig": "lmlab.modules.ppo",
    "PPOConfig": "lmlab.modules.ppo",
    "KLConfig": "lmlab.modules.ppo",
    "SafetyConfig": "lmlab.modules.ppo",
    "DistillModule": "lmlab.modules.distill",
    "OnPolicyConfig": "lmlab.modules.distill",
    "GRPOModule": "lmlab.modules.grpo",
    "GRPOConfig": "lmlab.modules.grpo",
}

__all__ = list(_EXPORTS)


def __getattr__(name: str):
    if name in _EXPORTS:
        return getattr(importlib.import_module(_EXPORTS[name]), name)
    raise AttributeError(f"module 'lmlab.modules' has no attribute {name!r}")
