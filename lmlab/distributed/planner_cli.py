"""``lmlab plan``: memory and compute plan for a training config, without building anything.

    lmlab plan --config experiments/quickstart.yaml
    lmlab plan --config experiments/chinchilla.yaml --config experiments/strategies/fsdp.yaml --world_size 8
    lmlab plan --preset llama-7b --strategy fsdp --world_size 8 --micro_batch 4 --seq_len 4096 --device_memory 80GiB
    lmlab plan --preset gpt3-175b --tokens 300e9 --convention 6n --json

Settings come from the YAML(s) (model shape, precision, strategy, devices,
batch, sequence length, steps); flags override them.
"""

from __future__ import annotations

import argparse
import json as _json
from typing import Any, Literal, Optional

from lmlab.distributed.hardware import lookup_device_memory, lookup_peak_flops, parse_bytes
from lmlab.distributed.planner import STRATEGIES, PlanInput, estimate_compute, format_plan, plan_memory
from lmlab.distributed.validate import resolve_devices, strategy_info
from lmlab.errors import ConfigError
from lmlab.models.config import TransformerConfig
from lmlab.training_config import as_dict, init_args, load_training_config
from lmlab.verbs import run


_FSDP_SHARDING = {"FULL_SHARD": "fsdp", "SHARD_GRAD_OP": "fsdp-grad-op", "HYBRID_SHARD": "fsdp-hybrid",
                  "_HYBRID_SHARD_ZERO2": "fsdp-hybrid", "NO_SHARD": "ddp"}


def _strategy_from_trainer(trainer: dict, world: int) -> dict:
    info = strategy_info(trainer.get("strategy", "auto"))
    args = info.init_args
    out: dict[str, Any] = {}
    if info.kind in ("auto", "single", "other"):
        out["strategy"] = "ddp" if world > 1 else "single"
    elif info.kind == "ddp":
        out["strategy"] = "ddp"
        out["ddp_bucket_view"] = bool(args.get("gradient_as_bucket_view", False))
    elif info.kind == "fsdp":
        out["strategy"] = _FSDP_SHARDING.get(info.sharding or "FULL_SHARD", "fsdp")
        if args.get("activation_checkpointing_policy") or args.get("activation_checkpointing"):
            out["activation_checkpointing"] = True
    elif info.kind == "deepspeed":
        out["strategy"] = "ddp" if info.stage == 0 else f"zero{info.stage}"
        zero = ((args.get("config") or {}) if isinstance(args.get("config"), dict) else {}).get("zero_optimization", {})
        out["offload"] = bool(args.get("offload_optimizer") or zero.get("offload_optimizer"))
    elif info.kind == "model_parallel":
        out["strategy"] = "fsdp2"
        tp = info.tp
        out["tp"] = int(tp) if tp not in (None, "auto") else None
        out["low_precision_params"] = str(args.get("param_dtype") or "") in ("bfloat16", "float16", "bf16", "fp16")
        if args.get("activation_checkpointing"):
            out["activation_checkpointing"] = True
        if args.get("cpu_offload"):
            out["offload"] = True
    return out


Strategy = Literal[STRATEGIES]  # type: ignore[valid-type]


def plan(
    config: list[str] = [],  # noqa: B006 - jsonargparse reads the default; never mutated
    override: list[str] = [],  # noqa: B006
    preset: Optional[str] = None,
    json: bool = False,
    strategy: Optional[Strategy] = None,
    world_size: Optional[int] = None,
    tp: Optional[int] = None,
    micro_batch: Optional[int] = None,
    seq_len: Optional[int] = None,
    precision: Optional[str] = None,
    activation_checkpointing: Optional[bool] = None,
    offload: Optional[bool] = None,
    accelerator: str = "h100",
    device_memory: Optional[str] = None,
    reserve: float = 0.1,
    gpus_per_node: int = 8,
    tokens: Optional[float] = None,
    convention: Optional[Literal["6n", "kaplan", "palm"]] = None,
    mfu: float = 0.4,
    peak_flops: Optional[float] = None,
    kernels: Literal["cuda", "cpu"] = "cuda",
) -> int:
    """Memory and compute plan for a training config, without building anything (exit 1 when it does not fit).

    Settings come from the training YAML(s) (model shape, precision,
    strategy, devices, batch, sequence length, steps), read as ``lmlab fit``
    reads them; the flags below override them.

    Args:
        config: Training YAML (repeat --config to compose, like lmlab fit).
        override: Dotted override of the training config, e.g. trainer.devices=8 (repeatable).
        preset: Plan a model preset instead of (or over) the YAML's model.config.
        json: Print the plan as JSON.
        strategy: Override the YAML's strategy.
        world_size: Devices in total (default: trainer.devices x num_nodes).
        tp: Tensor-parallel degree (fsdp2).
        micro_batch: Sequences per device per forward/backward.
        seq_len: Tokens per sequence (default: data.seq_len).
        precision: 32-true, bf16-mixed, bf16-true, 16-mixed (default: trainer.precision).
        activation_checkpointing: Recompute blocks in backward.
        offload: Optimizer states in host memory.
        accelerator: Device name for peak FLOP/s and memory.
        device_memory: Bytes per device, e.g. 80GiB (default: the accelerator's).
        reserve: Fraction of device memory left free.
        gpus_per_node: Shard group of fsdp-hybrid.
        tokens: Training tokens (default: max_steps x batch_size x seq_len).
        convention: FLOP convention (default: the module's).
        mfu: Model FLOPs utilisation for the time estimate.
        peak_flops: Peak FLOP/s per device (default: looked up from --accelerator).
        kernels: Kernel behaviour to assume.
    """
    args = argparse.Namespace(**locals())
    try:
        args.device_memory and parse_bytes(args.device_memory)
    except ValueError as e:
        raise ConfigError("--device_memory", str(e), "write e.g. 80GiB") from None
    if not 0 <= reserve < 1:
        raise ConfigError("--reserve", f"must be in [0, 1), got {reserve}", "e.g. 0.1 keeps a tenth of device memory free")
    if not 0 < mfu <= 1:
        raise ConfigError("--mfu", f"must be in (0, 1], got {mfu}", "e.g. 0.4")
    if override and not config:
        raise ConfigError("--override", "needs a training YAML", "add --config experiments/X.yaml")
    mem, comp = make_plan(args)
    if args.json:
        print(_json.dumps({"memory": mem.as_dict(), "compute": comp.as_dict()}, indent=2, default=str))
    else:
        print(format_plan(mem, comp if comp.tokens else None))
    return 0 if mem.fits in (None, True) else 1


def make_plan(args: argparse.Namespace) -> tuple:
    """(MemoryPlan, ComputeEstimate) from parsed ``lmlab plan`` arguments."""
    cfg = as_dict(load_training_config(args.config, args.override)) if args.config else {}
    trainer = cfg.get("trainer") or {}
    model = init_args(cfg.get("model"))
    data = init_args(cfg.get("data"))

    model_cfg = dict(model.get("config") or {})
    if args.preset:
        model_cfg = {"preset": args.preset}
    if not model_cfg:
        raise ConfigError("--config", "no model.init_args.config found", "pass a training YAML or --preset NAME")
    config = TransformerConfig.from_dict(model_cfg)

    accel = str(trainer.get("accelerator") or "gpu").lower()
    on_gpu = accel != "cpu"
    per_node = resolve_devices(trainer.get("devices", 1 if not on_gpu else "auto"), on_gpu, gpu_count=1)
    world = args.world_size or per_node * int(trainer.get("num_nodes") or 1)
    settings = _strategy_from_trainer(trainer, world)
    if args.strategy:
        settings = {"strategy": args.strategy}
    if args.tp:
        settings["tp"] = args.tp
        settings.setdefault("strategy", "fsdp2")
    if settings.get("strategy") == "fsdp2" and not settings.get("tp"):
        settings["tp"] = min(world, args.gpus_per_node)
    settings = {k: v for k, v in settings.items() if v is not None}
    if settings.get("strategy") == "single" and world > 1:
        settings["strategy"] = "ddp"

    tp = int(settings.get("tp", 1))
    dp = max(1, world // tp)
    seq_len = args.seq_len or int(data.get("seq_len") or config.max_seq_len)
    batch = data.get("batch_size")
    micro = args.micro_batch or data.get("micro_batch_size") or (max(1, int(batch) // dp) if batch else 1)
    precision = str(args.precision or trainer.get("precision") or "bf16-mixed")
    ac = args.activation_checkpointing
    if ac is None:
        ac = bool(settings.pop("activation_checkpointing", False) or config.activation_checkpointing)
    else:
        settings.pop("activation_checkpointing", None)
    if args.offload is not None:
        settings["offload"] = args.offload

    memory = args.device_memory
    device_memory = parse_bytes(memory) if memory else lookup_device_memory(args.accelerator)
    inp = PlanInput(
        config=config, micro_batch=int(micro), seq_len=seq_len, precision=precision, world_size=world,
        activation_checkpointing=ac, device=args.kernels, device_memory=device_memory, reserve=args.reserve,
        gpus_per_node=args.gpus_per_node, **settings,
    )
    mem = plan_memory(inp)

    convention = args.convention or model.get("flop_convention") or "palm"
    tokens = args.tokens
    if tokens is None:
        steps = trainer.get("max_steps")
        tokens = float(steps) * float(batch) * seq_len if steps and steps > 0 and batch else 0.0
    peak = args.peak_flops or (model.get("settings") or {}).get("peak_flops_per_device") or lookup_peak_flops(args.accelerator, precision)
    comp = estimate_compute(config, tokens, seq_len, convention, world, peak, args.mfu)
    return mem, comp


def main(argv: Optional[list[str]] = None) -> int:
    """Entry point of ``lmlab plan``; returns the exit code (1 when the plan does not fit, 2 for bad input)."""
    return run("lmlab plan", plan, argv)


if __name__ == "__main__":
    raise SystemExit(main())
