"""Distributed training: strategies, the 2-D parallel plan, pipeline-parallel stages, validation, and the memory planner.

Submodules load lazily (``lmlab.distributed.hardware`` is imported by every
training module and must stay cheap).
"""

from __future__ import annotations

import importlib

_EXPORTS = {
    "maybe_parallelize": "lmlab.distributed.parallelize",
    "parallelize": "lmlab.distributed.parallelize",
    "accumulation_context": "lmlab.distributed.hooks",
    "clip_grad_norm": "lmlab.distributed.hooks",
    "data_parallel_rank_and_size": "lmlab.distributed.hooks",
    "validate_config": "lmlab.distributed.validate",
    "split_stages": "lmlab.distributed.pipeline_parallel",
    "PlanInput": "lmlab.distributed.planner",
    "plan_memory": "lmlab.distributed.planner",
    "estimate_compute": "lmlab.distributed.planner",
    "ModelParallel": "lmlab.distributed.strategies",
    "DeepSpeedZeRO": "lmlab.distributed.strategies",
}

__all__ = sorted(_EXPORTS)


def __getattr__(name: str):
    if name in _EXPORTS:
        return getattr(importlib.import_module(_EXPORTS[name]), name)
    raise AttributeError(f"module 'lmlab.distributed' has no attribute {name!r}")
