"""Measure the model-state bytes a rank really holds, to check :func:`~lmlab.distributed.planner.plan_memory`.

:func:`measure_state_bytes` counts this rank's parameters, gradients and
optimizer state the way the memory is actually held:

- plain tensors and DTensors (DDP, FSDP2, tensor parallel): DTensors count
  their local shard (``to_local()``);
- DeepSpeed ZeRO: what the engine keeps on this rank, not the (possibly
  empty) module parameters: the flat 16/32-bit parameter buffers (ZeRO-1/2)
  or the ``ds_tensor`` partitions (ZeRO-3), the gradient partitions and
  buffers, the fp32 master partitions and the wrapped optimizer's state.

Every distinct storage is counted once, with its full size (alignment padding
included, since it is allocated), and a storage already counted as parameters
is not counted again as optimizer state (should an fp32 ZeRO-3 partition
double as its master weights, it counts once).

:class:`StateBytesMonitor` runs the measurement in a training run.
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any, Iterable, Iterator, Optional

import torch
from lightning.pytorch.callbacks import Callback

from lmlab.distributed.hooks import deepspeed_engine

__all__ = ["measure_state_bytes", "StateBytesMonitor"]


def _local(t: Any) -> Any:
    to_local = getattr(t, "to_local", None)
    return to_local() if callable(to_local) and hasattr(t, "device_mesh") else t


def _tensors(obj: Any, depth: int = 0) -> Iterator[torch.Tensor]:
    """Tensors inside ``obj`` (tensor, list, tuple, dict values), DTensors as their local shard."""
    if depth > 4 or obj is None:
        return
    if torch.is_tensor(obj):
        yield _local(obj)
    elif isinstance(obj, dict):
        for v in obj.values():
            yield from _tensors(v, depth + 1)
    elif isinstance(obj, (list, tuple)):
        for v in obj:
            yield from _tensors(v, depth + 1)


class _Counter:
    """Bytes of distinct storages, each counted once across every category."""

    def __init__(self) -> None:
        self.seen: set[tuple[str, int]] = set()

    def __call__(self, tensors: Iterable[torch.Tensor]) -> int:
        total = 0
        for t in tensors:
            if t is None or not torch.is_tensor(t) or t.device.type == "meta":
                continue
            storage = t.untyped_storage()
            if storage.nbytes() == 0:
                continue  # a ZeRO-3 parameter between gathers holds nothing
            key = (str(t.device), storage.data_ptr())
            if key in self.seen:
                continue
            self.seen.add(key)
            total += storage.nbytes()
        return total


def _plain_optimizer(trainer) -> Optional[torch.optim.Optimizer]:
    opts = getattr(trainer, "optimizers", None) or []
    if not opts:
        return None
    opt = opts[0]
    return getattr(opt, "_optimizer", opt)


def _deepspeed_grad_tensors(zero: Any) -> Iterator[torch.Tensor]:
    # partitioned / reduced gradients, whichever the stage keeps: ZeRO-1/2 averaged_gradients,
    # all_grad_tensors (the accumulation it holds between micro-batches) and the contiguous
    # grads_in_partition; ZeRO-3's grad_partitions_flat_buffer (name-mangled) and its averaged
    # gradients; the fp32 master partitions' .grad while a step runs
    for name in ("averaged_gradients", "all_grad_tensors", "grads_in_partition",
                 "_DeepSpeedZeroOptimizer_Stage3__param_id_to_grad_partition", "grad_partitions_flat_buffer"):
        yield from _tensors(getattr(zero, name, None))
    for flat in list(getattr(zero, "single_partition_of_fp32_groups", None) or []) + \
            list(getattr(zero, "fp32_partitioned_groups_flat", None) or []):
        if torch.is_tensor(flat) and flat.grad is not None:
            yield flat.grad


def _deepspeed_bucket_tensors(zero: Any) -> Iterator[torch.Tensor]:
    # reduction buckets are sized by reduce_bucket_size, not by the model: the planner books them
    # as extras, so they are reported apart from the gradients
    for bucket in (getattr(zero, "ipg_buckets", None) or {}).values():
        yield from _tensors(getattr(bucket, "buffer", None))


def _deepspeed_bytes(engine: Any) -> dict:
    zero = engine.optimizer
    count = _Counter()
    module_params = list(engine.module.parameters())
    zero3 = any(hasattr(p, "ds_tensor") for p in module_params)
    if zero3:  # this rank's partitions (gathered full weights are counted apart, below)
        params = count(p.ds_tensor for p in module_params)
    else:  # ZeRO-1/2: every rank keeps the full flat parameter buffers the module's weights view
        params = count(list(_tensors(getattr(zero, "bit16_groups_flat", None))) + module_params)
    buckets = count(_deepspeed_bucket_tensors(zero))
    grads = count(list(_deepspeed_grad_tensors(zero))
                  + [p.grad for p in module_params]
                  + [getattr(p, "grad_accum", None) for p in module_params])
    inner = getattr(zero, "optimizer", zero)
    master = list(_tensors(getattr(zero, "single_partition_of_fp32_groups", None))) + \
        list(_tensors(getattr(zero, "fp32_partitioned_groups_flat", None)))
    state = [v for s in getattr(inner, "state", {}).values() for v in _tensors(s)]
    optimizer = count(master + state)
    out = {"params": params, "grads": grads, "optimizer": optimizer, "buckets": buckets}
    if zero3:
        # full weights ZeRO-3 holds outside the partitions: the block being computed and the
        # "persistent" parameters (below stage3_param_persistence_threshold) kept gathered
        out["gathered"] = count(module_params)
    return out


def measure_state_bytes(trainer, pl_module) -> dict:
    """This rank's bytes of parameters, gradients and optimizer state: ``{"params", "grads", "optimizer"}``.

    Works for a single process, DDP, FSDP2/tensor parallel (DTensor local
    shards) and DeepSpeed ZeRO-1/2/3 (the engine's partitions and buffers).
    DeepSpeed adds ``buckets`` (its gradient-reduction bucket buffers) and,
    for ZeRO-3, ``gathered`` (full weights currently held outside the
    partitions); neither is included in the three model-state numbers.
    """
    engine = deepspeed_engine(getattr(trainer, "strategy", None))
    if engine is not None:
        return _deepspeed_bytes(engine)
    count = _Counter()
    params = list(pl_module.parameters())
    out = {"params": count(_local(p) for p in params)}
    out["grads"] = count(_local(p.grad) for p in params if p.grad is not None)
    opt = _plain_optimizer(trainer)
    state = getattr(opt, "state", {}) if opt is not None else {}
    out["optimizer"] = count(v for s in state.values() for v in _tensors(s))
    return out


class StateBytesMonitor(Callback):
    """Measure and log the model-state bytes of every rank once, around the first optimizer step.

    lmlab modules optimise manually and set gradients to ``None`` right after
    ``opt.step()`` inside ``training_step``, so by ``on_train_batch_end`` the
    gradients are gone. Gradients are therefore measured in the hooks that run
    while they exist: ``on_after_backward`` (after every micro-batch, where
    accumulated gradients live between micro-batches) and
    ``on_before_optimizer_step`` (Lightning calls it from ``opt.step()`` in
    manual optimisation too, after the backward and before the update); the
    largest value is kept. Parameters and optimizer state are measured at the
    end of the first batch, after the step has created the optimizer state.

    Logs ``memory/params_bytes``, ``memory/grads_bytes`` and
    ``memory/optimizer_bytes`` (rank 0's values) and, with ``path``, every
    rank writes ``{path}/rank{r}.json`` with its own numbers (``grads_at_step``
    is the gradient bytes right before the update; under DeepSpeed also the
    peak ``buckets`` and ZeRO-3's ``gathered``, see :func:`measure_state_bytes`).

    Args:
        path: Folder for the per-rank JSON files (``None``: only log).
    """

    def __init__(self, path: Optional[str] = None) -> None:
        self.path = path
        self.peak: dict[str, int] = {}  # largest gradient (and bucket) bytes seen while gradients exist
        self.grads_at_step: Optional[int] = None
        self.result: Optional[dict] = None

    def _observe(self, trainer, pl_module) -> dict:
        now = measure_state_bytes(trainer, pl_module)
        for key in ("grads", "buckets"):
            if key in now:
                self.peak[key] = max(self.peak.get(key, 0), int(now[key]))
        return now

    def on_after_backward(self, trainer, pl_module) -> None:
        if self.result is None:
            self._observe(trainer, pl_module)

    def on_before_optimizer_step(self, trainer, pl_module, optimizer) -> None:
        if self.result is None and self.grads_at_step is None:
            self.grads_at_step = int(self._observe(trainer, pl_module)["grads"])

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
        if self.result is not None or self.grads_at_step is None:
            return
        measured = measure_state_bytes(trainer, pl_module)
        self.result = {**{k: int(v) for k, v in measured.items()}, **self.peak,
                       "grads_at_step": self.grads_at_step,
                       "rank": int(trainer.global_rank), "world_size": int(trainer.world_size)}
        pl_module.log_dict({f"memory/{k}_bytes": float(self.result[k]) for k in ("params", "grads", "optimizer")},
                           on_step=True, on_epoch=False, rank_zero_only=True)
        if self.path is not None:
            os.makedirs(self.path, exist_ok=True)
            final = Path(self.path, f"rank{trainer.global_rank}.json")
            tmp = final.with_suffix(".json.tmp")
            tmp.write_text(json.dumps(self.result, indent=1))
            tmp.replace(final)
