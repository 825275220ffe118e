"""Check a parsed training config's parallel layout before anything is built.

:func:`validate_config` takes the config LightningCLI parsed (a jsonargparse
``Namespace`` or a plain dict with ``trainer``/``model``/``data`` keys) and
raises a one-line :class:`~lmlab.errors.ConfigError` naming the field and the
fix for a layout that cannot run: a GPU-only strategy on the CPU, DeepSpeed
missing, a tensor-parallel degree that does not divide the heads, a mesh that
does not match the world size, or a global batch the data-parallel ranks
cannot split evenly. Catching these here saves a cluster allocation and a
stack trace from inside process-group setup.
"""

from __future__ import annotations

import importlib
import importlib.util
import os
from dataclasses import dataclass
from typing import Any, Mapping, Optional

from lmlab.errors import ConfigError

GPU_ONLY = ("fsdp", "deepspeed")


@dataclass
class StrategyInfo:
    """What the planner and the validator need to know about a ``trainer.strategy`` value."""

    kind: str  # single | ddp | fsdp | deepspeed | model_parallel | auto | other
    name: str
    init_args: dict
    stage: Optional[int] = None  # ZeRO stage (deepspeed)
    sharding: Optional[str] = None  # FSDP sharding strategy
    tp: Any = 1  # tensor-parallel size (int or "auto")
    dp: Any = "auto"
    cpu_ok: bool = False  # a GPU-only kind whose class also runs on CPUs


def _plain(obj: Any) -> Any:
    """jsonargparse Namespaces (recursively) as dicts."""
    if hasattr(obj, "as_dict"):
        return obj.as_dict()
    if isinstance(obj, Mapping):
        return {k: _plain(v) for k, v in obj.items()}
    if isinstance(obj, list):
        return [_plain(v) for v in obj]
    return obj


def _class(path: str):
    module, _, name = path.rpartition(".")
    try:
        return getattr(importlib.import_module(module), name)
    except (ImportError, AttributeError, ValueError):
        return None


def strategy_info(strategy: Any) -> StrategyInfo:
    """Classify a ``trainer.strategy`` value: a registry name, ``{class_path, init_args}`` or an instance."""
    from lightning.pytorch.strategies import (
        DDPStrategy,
        DeepSpeedStrategy,
        FSDPStrategy,
        ModelParallelStrategy,
        SingleDeviceStrategy,
    )

    strategy = _plain(strategy)
    if strategy is None:
        return StrategyInfo("auto", "auto", {})
    if isinstance(strategy, str):
        name = strategy.lower()
        if name == "auto":
            return StrategyInfo("auto", name, {})
        if name.startswith("deepspeed"):
            stage = int(name.split("_stage_")[1][0]) if "_stage_" in name else 2
            return StrategyInfo("deepspeed", name, {}, stage=stage)
        if name.startswith("fsdp"):
            return StrategyInfo("fsdp", name, {}, sharding="FULL_SHARD")
        if name.startswith("ddp"):
            return StrategyInfo("ddp", name, {})
        if name in ("single_device", "single_xla"):
            return StrategyInfo("single", name, {})
        return StrategyInfo("other", name, {})
    if isinstance(strategy, dict):
        path = strategy.get("class_path", "")
        args = dict(strategy.get("init_args") or {})
        cls = _class(path) if path else None
        name = path.rpartition(".")[2] or "strategy"
    else:
        cls, name = type(strategy), type(strategy).__name__
        args = dict(vars(strategy))
    if cls is None:
        return StrategyInfo("other", name, args)
    if issubclass(cls, DeepSpeedStrategy):
        config = args.get("config") if isinstance(args.get("config"), dict) else None
        stage = (config or {}).get("zero_optimization", {}).get("stage", args.get("stage", 2))
        from lmlab.distributed.strategies import DeepSpeedZeRO

        return StrategyInfo("deepspeed", name, args, stage=int(stage), cpu_ok=issubclass(cls, DeepSpeedZeRO))
    if issubclass(cls, FSDPStrategy):
        sharding = str(args.get("sharding_strategy", "FULL_SHARD")).upper().rpartition(".")[2]
        return StrategyInfo("fsdp", name, args, sharding=sharding)
    if issubclass(cls, ModelParallelStrategy):
        return StrategyInfo(
            "model_parallel", name, args, tp=args.get("tensor_parallel_size", "auto"), dp=args.get("data_parallel_size", "auto")
        )
    if issubclass(cls, DDPStrategy):
        return StrategyInfo("ddp", name, args)
    if issubclass(cls, SingleDeviceStrategy):
        return StrategyInfo("single", name, args)
    return StrategyInfo("other", name, args)


def resolve_devices(devices: Any, on_gpu: bool, gpu_count: int) -> int:
    """Number of devices per node that ``trainer.devices`` asks for."""
    all_devices = gpu_count if on_gpu else (os.cpu_count() or 1)
    if devices is None or devices == "auto":
        return max(1, gpu_count) if on_gpu else 1
    if isinstance(devices, (list, tuple)):
        return len(devices)
    if isinstance(devices, str):
        text = devices.strip().strip("[]")
        if "," in text:
            return len([d for d in text.split(",") if d.strip()])
        devices = int(text)
    devices = int(devices)
    return all_devices if devices == -1 else devices


def _model_config(model: Mapping):
    from lmlab.models.config import TransformerConfig

    init = model.get("init_args", model) if isinstance(model, Mapping) else {}
    cfg = init.get("config") if isinstance(init, Mapping) else None
    if not isinstance(cfg, Mapping):
        return None
    return TransformerConfig.from_dict(dict(cfg))


def validate_config(
    cfg: Any,
    *,
    cuda_available: Optional[bool] = None,
    gpu_count: Optional[int] = None,
    deepspeed_available: Optional[bool] = None,
) -> None:
    """Raise :class:`ConfigError` for a parallel layout that cannot run; return quietly otherwise.

    The keyword arguments override what is detected on this machine (tests use them).
    """
    import torch

    cfg = _plain(cfg) or {}
    trainer = cfg.get("trainer") or {}
    if cuda_available is None:
        cuda_available = torch.cuda.is_available()
    if gpu_count is None:
        gpu_count = torch.cuda.device_count() if cuda_available else 0
    if deepspeed_available is None:
        deepspeed_available = importlib.util.find_spec("deepspeed") is not None

    info = strategy_info(trainer.get("strategy", "auto"))
    accel = str(trainer.get("accelerator") or "auto").lower()
    wants_gpu = accel in ("gpu", "cuda")
    on_gpu = wants_gpu or (accel == "auto" and cuda_available)

    if info.kind in GPU_ONLY and not (on_gpu and cuda_available) and not info.cpu_ok:
        why = "trainer.accelerator resolves to cpu" if not on_gpu else "no CUDA device is visible"
        fix = {
            "fsdp": "on CPU use experiments/strategies/fsdp2_tp.yaml with tensor_parallel_size=1 (FSDP2 over gloo)",
            "deepspeed": "on CPU use class_path lmlab.distributed.strategies.DeepSpeedZeRO (runs over gloo)",
        }[info.kind]
        raise ConfigError("trainer.strategy", f"{info.name} needs CUDA GPUs but {why}",
                          f"{fix}; on a GPU machine set trainer.accelerator=gpu")
    if info.kind == "deepspeed" and not on_gpu and cuda_available:
        raise ConfigError(
            "trainer.accelerator",
            "DeepSpeed on the CPU while CUDA is visible: DeepSpeed would still place its engine on a GPU",
            "set trainer.accelerator=gpu, or hide the GPUs with CUDA_VISIBLE_DEVICES=",
        )
    if wants_gpu and not cuda_available:
        raise ConfigError(
            "trainer.accelerator",
            f"{accel} requested but no CUDA device is visible",
            "run on a GPU machine or set trainer.accelerator=cpu (with strategy ddp or auto)",
        )
    if info.kind == "deepspeed" and not deepspeed_available:
        raise ConfigError(
            "trainer.strategy",
            "DeepSpeed is not installed",
            "pip install deepspeed, or use experiments/strategies/fsdp.yaml",
        )

    per_node = resolve_devices(trainer.get("devices", "auto"), on_gpu, gpu_count)
    nodes = int(trainer.get("num_nodes") or 1)
    world = per_node * nodes
    model_cfg = _model_config(cfg.get("model") or {})

    dp_world = world
    if info.kind == "model_parallel":
        tp = per_node if info.tp in (None, "auto") else int(info.tp)
        dp = nodes if info.dp in (None, "auto") else int(info.dp)
        if tp * dp != world:
            raise ConfigError(
                "trainer.strategy.tensor_parallel_size",
                f"data_parallel_size {dp} x tensor_parallel_size {tp} = {dp * tp} but the world size is "
                f"{world} ({per_node} devices x {nodes} nodes)",
                f"make their product {world}",
            )
        if model_cfg is not None:
            from lmlab.distributed.parallelize import check_tp_degree

            check_tp_degree(model_cfg, tp)
        model_cls = _class(str((cfg.get("model") or {}).get("class_path", "")))
        if model_cls is not None and not _overrides_configure_model(model_cls):
            raise ConfigError(
                "trainer.strategy",
                f"{info.name} needs {model_cls.__name__}.configure_model to apply the parallel plan",
                "add `def configure_model(self): lmlab.distributed.maybe_parallelize(self)` to the module",
            )
        dp_world = dp

    if info.kind == "fsdp" and model_cfg is not None and model_cfg.activation_checkpointing:
        if info.init_args.get("activation_checkpointing_policy") or info.init_args.get("activation_checkpointing"):
            raise ConfigError(
                "model.config.activation_checkpointing",
                "the FSDP strategy already checkpoints the blocks; both would recompute each block twice",
                "set model.config.activation_checkpointing=false or drop the strategy's activation_checkpointing_policy",
            )

    _check_batch(cfg.get("data") or {}, dp_world)


def _overrides_configure_model(cls) -> bool:
    import lightning.pytorch as pl

    impl = getattr(cls, "configure_model", None)
    return impl is not None and impl is not pl.LightningModule.configure_model


def _check_batch(data: Mapping, dp_world: int) -> None:
    init = data.get("init_args", data) if isinstance(data, Mapping) else {}
    if not isinstance(init, Mapping) or init.get("batch_size") is None:
        return
    batch = int(init["batch_size"])
    micro = init.get("micro_batch_size")
    if batch % dp_world:
        raise ConfigError(
            "data.batch_size",
            f"global batch {batch} is not divisible by the {dp_world} data-parallel ranks",
            f"use a multiple of {dp_world} (or change trainer.devices / num_nodes)",
        )
    if micro:
        unit = int(micro) * dp_world
        for name in ("batch_size", "batch_ramp_cap"):
            value = init.get(name)
            if value and int(value) % unit:
                raise ConfigError(
                    f"data.{name}",
                    f"{value} is not divisible by micro_batch_size {micro} x {dp_world} data-parallel ranks",
                    f"use a multiple of {unit}",
                )
