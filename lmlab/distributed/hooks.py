"""Strategy-aware pieces of the training step that ``LMModuleBase`` delegates to.

lmlab stages optimise manually (several micro-batches, one optimizer step), so
three things Lightning would do for automatic optimisation depend on the
strategy and are done here:

- :func:`accumulation_context`: skip the gradient reduction on all but the last
  micro-batch (DDP ``no_sync``; DeepSpeed's gradient-accumulation boundary;
  FSDP2 ``set_requires_gradient_sync``). FSDP1 reduce-scatters every
  micro-batch: its ``no_sync`` would keep unsharded gradients, defeating the
  point of sharding.
- :func:`clip_grad_norm`: the *global* pre-clip norm. With sharded gradients a
  local ``clip_grad_norm_`` sees only this rank's shard, so FSDP1 uses the root
  module's ``clip_grad_norm_``, DTensor gradients (FSDP2/TP) are reduced over
  their mesh, and DeepSpeed clips inside its engine (``gradient_clipping`` in its
  config) and reports the norm it used.
- :func:`data_parallel_rank_and_size`: which slice of the global batch a rank
  reads. Tensor-parallel ranks of one data-parallel replica must read the same
  data, so this is the data-parallel coordinate, not the global rank.
"""

from __future__ import annotations

import contextlib
import math
from typing import Iterable, Optional

import torch
from torch import nn


def _strategy(module):
    trainer = getattr(module, "_trainer", None)
    return trainer.strategy if trainer is not None else None


def deepspeed_engine(strategy):
    """The DeepSpeed engine a strategy trains through (``None`` for other strategies)."""
    model = getattr(strategy, "model", None) if strategy is not None else None
    if model is not None and type(model).__name__ in ("DeepSpeedEngine", "PipelineEngine"):
        return model
    return None


@contextlib.contextmanager
def _fsdp2_sync(modules: list, enabled: bool):
    for m in modules:
        m.set_requires_gradient_sync(enabled)
    try:
        yield
    finally:
        for m in modules:
            m.set_requires_gradient_sync(True)


def accumulation_context(module, last: bool):
    """Context for one micro-batch's forward/backward; only ``last`` reduces gradients."""
    strategy = _strategy(module)
    if strategy is None:
        return contextlib.nullcontext()
    engine = deepspeed_engine(strategy)
    if engine is not None:
        # DeepSpeed accumulates across backward calls only when told the boundary is not reached
        engine.set_gradient_accumulation_boundary(bool(last))
        # ZeRO-3 counts micro-batches in the engine's forward, which Lightning calls once per
        # training_step: without this every micro-batch after the first overwrites the partitioned
        # gradients instead of adding to them (a no-op when nothing is pending: safe to repeat)
        clear = getattr(getattr(engine, "optimizer", None), "clear_backward_seen_flag", None)
        if clear is not None:
            clear()
        return contextlib.nullcontext()
    if last:
        return contextlib.nullcontext()
    fsdp2 = [m for m in module.modules() if hasattr(m, "set_requires_gradient_sync") and hasattr(m, "reshard")]
    if fsdp2:
        return _fsdp2_sync(fsdp2[:1], False)  # the root call propagates to every FSDP2 submodule
    block = getattr(strategy, "block_backward_sync", None)
    return block() if block is not None else contextlib.nullcontext()


def _grads(parameters: Iterable[nn.Parameter]) -> list[torch.Tensor]:
    seen, grads = set(), []
    for p in parameters:
        if p.grad is not None and id(p) not in seen:
            seen.add(id(p))
            grads.append(p.grad)
    return grads


def global_grad_norm(grads: list[torch.Tensor], norm_type: float = 2.0) -> torch.Tensor:
    """Norm of all gradients together, reducing DTensor shards over their meshes.

    Gradients on different meshes (TP-sharded block weights on the 2-D mesh,
    replicated norms and embeddings on the data-parallel mesh) are reduced
    group by group and combined.
    """
    from torch.distributed.tensor import DTensor

    if not grads:
        return torch.zeros(())
    groups: dict[object, list[torch.Tensor]] = {}
    for g in grads:
        key = (g.device_mesh, tuple(g.placements)) if isinstance(g, DTensor) else None
        groups.setdefault(key, []).append(g)
    parts = []
    for key, gs in groups.items():
        n = torch.nn.utils.get_total_norm(gs, norm_type=norm_type)
        if isinstance(n, DTensor):
            n = n.full_tensor()
        parts.append(n.float())
    device = parts[0].device
    parts = torch.stack([p.to(device) for p in parts])
    if math.isinf(norm_type):
        return parts.max()
    return parts.pow(norm_type).sum().pow(1.0 / norm_type)


def clip_grad_norm(module, max_norm: Optional[float], parameters: Optional[Iterable[nn.Parameter]] = None) -> Optional[torch.Tensor]:
    """Clip gradients to ``max_norm`` (0 or None: only measure); return the global pre-clip norm.

    ``module`` is the LightningModule (its trainer picks the method);
    ``parameters`` default to ``module.model.parameters()``.
    """
    strategy = _strategy(module)
    engine = deepspeed_engine(strategy)
    if engine is not None:
        # the engine clips inside step() with its config's gradient_clipping and only knows the
        # norm afterwards: engine_grad_norm() reads it once the step is taken
        return None
    wrapped = getattr(strategy, "model", None) if strategy is not None else None
    if wrapped is not None and type(wrapped).__name__ == "FullyShardedDataParallel":
        return wrapped.clip_grad_norm_(max_norm if max_norm and max_norm > 0 else float("inf"))
    params = list(parameters if parameters is not None else getattr(module, "model", module).parameters())
    grads = _grads(params)
    if not grads:
        return torch.zeros(())
    total = global_grad_norm(grads)
    if max_norm and max_norm > 0:
        coef = torch.clamp(max_norm / (total + 1e-6), max=1.0)
        # DTensor grads take a Python scalar (one host sync); plain tensors stay on-device
        scalar = float(coef) if any(hasattr(g, "device_mesh") for g in grads) else None
        for g in grads:
            g.mul_(scalar if scalar is not None else coef.to(g.device, g.dtype))
    return total


def engine_grad_norm(module) -> Optional[torch.Tensor]:
    """The pre-clip global norm DeepSpeed computed in the step just taken (``None`` for other strategies)."""
    engine = deepspeed_engine(_strategy(module))
    if engine is None:
        return None
    norm = engine.get_global_grad_norm()
    return None if norm is None else torch.as_tensor(float(norm))


def offloads_optimizer(module) -> bool:
    """Whether the strategy runs the optimizer step on the host (DeepSpeed ``offload_optimizer``)."""
    strategy = _strategy(module)
    config = getattr(strategy, "config", None)
    if not isinstance(config, dict):
        return False
    offload = (config.get("zero_optimization") or {}).get("offload_optimizer") or {}
    return isinstance(offload, dict) and offload.get("device") in ("cpu", "nvme")


def data_parallel_rank_and_size(trainer) -> tuple[int, int]:
    """(rank, size) of this process among the data-parallel replicas.

    Equal to (global_rank, world_size) except with tensor parallelism, where
    the ranks of one TP group form one replica.
    """
    if trainer is None:
        return 0, 1
    kwargs = getattr(trainer.strategy, "distributed_sampler_kwargs", None)
    try:
        if kwargs:
            return int(kwargs.get("rank", trainer.global_rank)), int(kwargs.get("num_replicas", trainer.world_size))
    except RuntimeError:  # device mesh not built yet
        pass
    return int(trainer.global_rank), int(trainer.world_size)
