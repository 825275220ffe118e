"""Optimizer and learning-rate schedule code shared by every training stage.

Schedules are pure functions of the optimizer step ``t`` (counted from 1 for
the first update) returning a multiplier of the peak learning rate:

- ``inverse_sqrt``: min(t / t_warmup, sqrt(t_warmup / t)) (Vaswani et al. 2017).
- ``cosine``: linear warmup to 1, then cosine decay to ``min_lr_ratio`` at
  ``total_steps`` (held there afterwards).
- ``wsd``: warmup-stable-decay: linear warmup, constant, then decay to
  ``min_lr_ratio`` over the last ``decay_fraction`` of ``total_steps``.
- ``constant``: linear warmup, then 1.

Warmup rises linearly from ``warmup_start_ratio`` (default 0) to 1 over
``warmup_steps``. Continual pretraining (``model.init_from`` with new data)
starts a fresh optimizer and schedule, so it *re-warms*: ``warmup_steps > 0``
warms up again from the checkpoint, from ``warmup_start_ratio`` times the peak
(e.g. the previous run's ``min_lr_ratio``, where its schedule ended) to the
new peak, then decays again; ``warmup_steps: 0`` continues at the peak with
no warmup.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Literal, Optional, Union

import torch
from torch import nn

from lmlab.errors import ConfigError


@dataclass
class OptimizerConfig:
    """AdamW (or SGD) settings.

    Args:
        name: ``adamw`` or ``sgd``.
        lr: Peak learning rate.
        betas: Adam betas.
        eps: Adam epsilon.
        weight_decay: Decoupled weight decay, applied to weight matrices only.
        decay_embeddings: Also decay embedding tables.
        decay_norms_and_biases: Also decay norm gains and biases.
        fused: Use the fused AdamW kernel (default: on, on CPU and CUDA, for
            plain tensors; foreach for sharded DTensor parameters).
        momentum: SGD momentum.
    """

    name: Literal["adamw", "sgd"] = "adamw"
    lr: float = 3e-4
    betas: tuple[float, float] = (0.9, 0.95)
    eps: float = 1e-8
    weight_decay: float = 0.1
    decay_embeddings: bool = False
    decay_norms_and_biases: bool = False
    fused: Optional[bool] = None
    momentum: float = 0.9


@dataclass
class ScheduleConfig:
    """Learning-rate schedule.

    Args:
        name: ``cosine``, ``wsd``, ``inverse_sqrt`` or ``constant``.
        warmup_steps: Linear warmup length in optimizer steps.
        total_steps: Length of the schedule; default ``trainer.max_steps``.
        min_lr_ratio: Final LR as a fraction of the peak (cosine and WSD);
            0.1 is the Chinchilla convention.
        decay_fraction: Share of ``total_steps`` spent decaying in WSD.
        decay_shape: WSD decay curve: ``linear``, ``cosine`` or ``sqrt`` (1 - sqrt).
        warmup_start_ratio: LR at the start of warmup as a fraction of the
            peak, in [0, 1). 0 for pretraining from scratch; for re-warming a
            continued run, the ratio where the checkpoint's schedule ended.
    """

    name: Literal["cosine", "wsd", "inverse_sqrt", "constant"] = "cosine"
    warmup_steps: int = 100
    total_steps: Optional[int] = None
    min_lr_ratio: float = 0.1
    decay_fraction: float = 0.2
    decay_shape: Literal["linear", "cosine", "sqrt"] = "linear"
    warmup_start_ratio: float = 0.0


@dataclass
class TrainingSettings:
    """The training settings every stage shares (``model.settings`` in a YAML).

    Args:
        optimizer: AdamW (or SGD) settings; weight decay only on matrices.
        schedule: Learning-rate schedule over optimizer steps.
        gradient_clip_val: Clip the global gradient norm to this (0: off).
        compile: ``blocks``: compile each transformer block on its own
            (regional compilation; one block's compile time, the eager model
            around it; pretraining also compiles the LM head with its loss, and
            bf16 attention on CPU takes a matmul backward); ``model`` (or ``true``): the whole network; ``false``:
            eager; ``auto`` (default): ``blocks`` for fitting runs of at least
            ``COMPILE_AUTO_MIN_STEPS`` optimizer steps, where the one-off
            compile is repaid, else eager (see :func:`resolve_compile`).
        fused_cross_entropy: Compute the loss with the vocabulary projection
            in chunks of rows (:func:`~lmlab.models.losses.linear_cross_entropy`),
            never holding the full logits; ``auto`` (default): for vocabularies
            of at least ``FUSED_CE_AUTO_MIN_VOCAB`` tokens, where the logits
            dominate activation memory. Stages that support it: pretraining.
        peak_flops_per_device: Peak FLOP/s for MFU; default looked up from the
            device name (none on CPU, so MFU is logged only when this is set).
    """

    optimizer: OptimizerConfig = field(default_factory=OptimizerConfig)
    schedule: ScheduleConfig = field(default_factory=ScheduleConfig)
    gradient_clip_val: float = 1.0
    compile: Union[bool, Literal["auto", "blocks", "model"]] = "auto"
    fused_cross_entropy: Union[bool, Literal["auto"]] = "auto"
    peak_flops_per_device: Optional[float] = None


def _warming(t: int, warmup: int, start: float) -> float:
    """Linear warmup from ``start`` (at t = 0) to 1 (at t = warmup); exactly ``t / warmup`` for start 0."""
    return t / warmup if start == 0 else start + (1.0 - start) * (t / warmup)


#: fitting runs at least this long compile their blocks under ``compile: auto``: the compile
#: (about 15-60 s on 2 CPU cores, a few seconds once Inductor's cache is warm) is then a small
#: share of the run, while short runs (smoke tests, sweeps of tiny runs) start at once
COMPILE_AUTO_MIN_STEPS = 1000


#: ``fused_cross_entropy: auto`` turns on at this padded vocabulary size (fp32 logits of 32k
#: tokens x 32k vocab are 4 GiB, more than the rest of a small model's activations)
FUSED_CE_AUTO_MIN_VOCAB = 32768


def resolve_compile(setting, device: torch.device, max_steps: Optional[int]) -> str:
    """``"blocks"``, ``"model"`` or ``"eager"`` for a ``compile`` setting on ``device``.

    ``max_steps`` is the fitting run's length (``None`` outside ``fit``).
    """
    if setting is True or setting == "model":
        return "model"
    if setting == "blocks":
        return "blocks"
    if setting == "auto":
        long_run = max_steps is not None and max_steps >= COMPILE_AUTO_MIN_STEPS
        return "blocks" if long_run and device.type in ("cpu", "cuda") else "eager"
    if setting is False:
        return "eager"
    raise ConfigError("model.settings.compile", f"unknown value {setting!r}", "use auto, blocks, model, true or false")


def inverse_sqrt(t: int, warmup: int, start: float = 0.0) -> float:
    t = max(t, 1)
    w = max(warmup, 1)
    return min(_warming(t, w, start), math.sqrt(w / t))


def warmup_cosine(t: int, warmup: int, total: int, min_ratio: float, start: float = 0.0) -> float:
    if warmup > 0 and t <= warmup:
        return _warming(t, warmup, start)
    if t >= total:
        return min_ratio
    progress = (t - warmup) / max(1, total - warmup)
    return min_ratio + (1.0 - min_ratio) * 0.5 * (1.0 + math.cos(math.pi * progress))


def warmup_stable_decay(
    t: int, warmup: int, total: int, min_ratio: float, decay_fraction: float, shape: str = "linear", start: float = 0.0
) -> float:
    if warmup > 0 and t <= warmup:
        return _warming(t, warmup, start)
    decay_steps = max(1, int(round(decay_fraction * total)))
    decay_start = total - decay_steps
    if t <= decay_start:
        return 1.0
    if t >= total:
        return min_ratio
    p = (t - decay_start) / decay_steps
    if shape == "cosine":
        frac = 0.5 * (1.0 + math.cos(math.pi * p))
    elif shape == "sqrt":
        frac = 1.0 - math.sqrt(p)
    else:
        frac = 1.0 - p
    return min_ratio + (1.0 - min_ratio) * frac


def constant_with_warmup(t: int, warmup: int, start: float = 0.0) -> float:
    if warmup > 0 and t <= warmup:
        return _warming(t, warmup, start)
    return 1.0


@dataclass
class LRLambda:
    """Picklable schedule multiplier for ``LambdaLR`` (its state is plain numbers).

    ``LambdaLR`` calls it with the number of completed steps; the schedule
    functions count the upcoming update from 1.
    """

    name: str
    warmup: int
    total: int
    min_ratio: float
    decay_fraction: float
    shape: str
    start: float = 0.0

    def __call__(self, completed: int) -> float:
        t = completed + 1
        if self.name == "inverse_sqrt":
            return inverse_sqrt(t, self.warmup, self.start)
        if self.name == "cosine":
            return warmup_cosine(t, self.warmup, self.total, self.min_ratio, self.start)
        if self.name == "wsd":
            return warmup_stable_decay(t, self.warmup, self.total, self.min_ratio, self.decay_fraction, self.shape, self.start)
        if self.name == "constant":
            return constant_with_warmup(t, self.warmup, self.start)
        raise ConfigError("model.settings.schedule.name", f"unknown schedule {self.name!r}", "use cosine, wsd, inverse_sqrt or constant")


def make_lr_lambda(cfg: ScheduleConfig, max_steps: Optional[int]) -> LRLambda:
    total = cfg.total_steps or max_steps
    if cfg.name in ("cosine", "wsd") and (total is None or total <= 0):
        raise ConfigError(
            "model.settings.schedule.total_steps", f"the {cfg.name} schedule needs a length", "set trainer.max_steps or model.settings.schedule.total_steps"
        )
    if cfg.warmup_steps < 0:
        raise ConfigError("model.settings.schedule.warmup_steps", f"must be >= 0, got {cfg.warmup_steps}")
    if not 0 <= cfg.warmup_start_ratio < 1:
        raise ConfigError(
            "model.settings.schedule.warmup_start_ratio",
            f"must be in [0, 1), got {cfg.warmup_start_ratio}",
            "0 warms up from zero; use warmup_steps: 0 for no warmup",
        )
    return LRLambda(
        cfg.name, cfg.warmup_steps, int(total or 0), cfg.min_lr_ratio, cfg.decay_fraction, cfg.decay_shape, cfg.warmup_start_ratio
    )


def param_groups(model: nn.Module, cfg: OptimizerConfig) -> list[dict]:
    """Split parameters into weight-decayed matrices and the rest.

    Classified by the module that owns them, not by ``p.ndim``: FSDP flattens
    every parameter to 1-D, which would silently switch weight decay off.
    """
    embedding_params = {id(m.weight) for m in model.modules() if isinstance(m, nn.Embedding)}
    linear_weights = {id(m.weight) for m in model.modules() if isinstance(m, nn.Linear)}
    decay, no_decay, seen = [], [], set()
    for name, p in model.named_parameters():
        if not p.requires_grad or id(p) in seen:
            continue
        seen.add(id(p))
        if id(p) in embedding_params:
            (decay if cfg.decay_embeddings else no_decay).append(p)
        elif id(p) in linear_weights:
            decay.append(p)
        else:
            (decay if cfg.decay_norms_and_biases else no_decay).append(p)
    groups = [{"params": decay, "weight_decay": cfg.weight_decay}, {"params": no_decay, "weight_decay": 0.0}]
    return [g for g in groups if g["params"]]


def build_optimizer(model: nn.Module, cfg: OptimizerConfig, cpu_offload: bool = False) -> torch.optim.Optimizer:
    """The configured optimizer over :func:`param_groups`.

    ``cpu_offload``: the optimizer step runs on the host (DeepSpeed ZeRO-Offload),
    so AdamW is DeepSpeed's vectorised ``DeepSpeedCPUAdam`` in AdamW mode, the same
    update as ``torch.optim.AdamW`` (DeepSpeed refuses a torch optimizer there).
    """
    groups = param_groups(model, cfg)
    if cfg.lr <= 0:
        raise ConfigError("model.settings.optimizer.lr", f"must be positive, got {cfg.lr}")
    if cfg.name == "adamw" and cpu_offload:
        from deepspeed.ops.adam import DeepSpeedCPUAdam

        return DeepSpeedCPUAdam(groups, lr=cfg.lr, betas=tuple(cfg.betas), eps=cfg.eps, adamw_mode=True)
    if cfg.name == "adamw":
        # the fused kernel (one pass per parameter, CPU and CUDA since torch 2.4) beats foreach's
        # several passes; sharded DTensor parameters keep foreach, which every placement supports
        sharded = any(hasattr(p, "device_mesh") for g in groups for p in g["params"])
        fused = not sharded if cfg.fused is None else cfg.fused
        kwargs = {"fused": True} if fused else {"foreach": True}
        return torch.optim.AdamW(groups, lr=cfg.lr, betas=tuple(cfg.betas), eps=cfg.eps, **kwargs)
    if cfg.name == "sgd":
        return torch.optim.SGD(groups, lr=cfg.lr, momentum=cfg.momentum)
    raise ConfigError("model.settings.optimizer.name", f"unknown optimizer {cfg.name!r}", "use adamw or sgd")
