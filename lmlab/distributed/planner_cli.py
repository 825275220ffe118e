"""``lmlab plan``: memory and compute plan for a training config, without building anything.

    lmlab plan --config experiments/quickstart.yaml
    lmlab plan --config experiments/chinchilla.yaml --config experiments/strategies/fsdp.yaml --world-size 8
    lmlab plan --preset llama-7b --strategy fsdp --world-size 8 --micro-batch 4 --seq-len 4096 --device-memory 80GiB
    lmlab plan --preset gpt3-175b --tokens 300e9 --convention 6n --json

Settings come from the YAML(s) (model shape, precision, strategy, devices,
batch, sequence length, steps); flags override them.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import sys
from typing import Any, Optional

from lmlab.distributed.hardware import lookup_device_memory, lookup_peak_flops, parse_bytes
from lmlab.distributed.planner import STRATEGIES, PlanInput, format_plan, plan_compute, plan_memory
from lmlab.distributed.validate import resolve_devices, strategy_info
from lmlab.errors import ConfigError
from lmlab.models.config import TransformerConfig


def _merge(a: dict, b: dict) -> dict:
    out = dict(a)
    for k, v in b.items():
        out[k] = _merge(out[k], v) if isinstance(v, dict) and isinstance(out.get(k), dict) else v
    return out


def load_configs(paths: list[str]) -> dict:
    """Compose YAML files in order, later keys winning (like repeated ``--config``)."""
    import yaml

    cfg: dict = {}
    for path in paths:
        try:
            with open(path) as f:
                data = yaml.safe_load(f) or {}
        except OSError as e:
            raise ConfigError("--config", f"cannot read {path}: {e.strerror}") from None
        cfg = _merge(cfg, data)
    return cfg


def _init(section: Any) -> dict:
    if not isinstance(section, dict):
        return {}
    return dict(section.get("init_args", section) or {})


def _apply_budget(cfg: dict) -> dict:
    if not (cfg.get("budget") or {}).get("compute") and not (cfg.get("budget") or {}).get("params"):
        return cfg
    try:
        from jsonargparse import dict_to_namespace

        from lmlab.budget import apply_budget

        ns = dict_to_namespace(cfg)
        with contextlib.redirect_stdout(sys.stderr):
            apply_budget(ns)
        return ns.as_dict()
    except (ImportError, AttributeError, KeyError, TypeError):
        return cfg


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


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="lmlab plan", description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--config", action="append", default=[], help="training YAML (repeat to compose, like lmlab fit)")
    p.add_argument("--preset", help="plan a model preset instead of (or over) the YAML's model.config")
    p.add_argument("--json", action="store_true", help="print the plan as JSON")
    p.add_argument("--strategy", choices=STRATEGIES, help="override the YAML's strategy")
    p.add_argument("--world-size", type=int, help="devices in total (default: trainer.devices x num_nodes)")
    p.add_argument("--tp", type=int, help="tensor-parallel degree (fsdp2)")
    p.add_argument("--micro-batch", type=int, help="sequences per device per forward/backward")
    p.add_argument("--seq-len", type=int, help="tokens per sequence (default: data.seq_len)")
    p.add_argument("--precision", help="32-true, bf16-mixed, bf16-true, 16-mixed (default: trainer.precision)")
    p.add_argument("--activation-checkpointing", action="store_true", default=None, help="recompute blocks in backward")
    p.add_argument("--offload", action="store_true", default=None, help="optimizer states in host memory")
    p.add_argument("--accelerator", default="h100", help="device name for peak FLOP/s and memory (default h100)")
    p.add_argument("--device-memory", help="bytes per device, e.g. 80GiB (default: the accelerator's)")
    p.add_argument("--reserve", type=float, default=0.1, help="fraction of device memory left free (default 0.1)")
    p.add_argument("--gpus-per-node", type=int, default=8, help="shard group of fsdp-hybrid (default 8)")
    p.add_argument("--tokens", type=float, help="training tokens (default: max_steps x batch_size x seq_len)")
    p.add_argument("--convention", choices=("6n", "kaplan", "palm"), help="FLOP convention (default: the module's)")
    p.add_argument("--mfu", type=float, default=0.4, help="model FLOPs utilisation for the time estimate (default 0.4)")
    p.add_argument("--peak-flops", type=float, help="peak FLOP/s per device (default: looked up from --accelerator)")
    p.add_argument("--kernels", choices=("cuda", "cpu"), default="cuda", help="kernel behaviour to assume (default cuda)")
    return p


def make_plan(args: argparse.Namespace) -> tuple:
    """(MemoryPlan, ComputePlan) from parsed ``lmlab plan`` arguments."""
    cfg = _apply_budget(load_configs(args.config)) if args.config else {}
    trainer = cfg.get("trainer") or {}
    model = _init(cfg.get("model"))
    data = _init(cfg.get("data"))

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
    comp = plan_compute(config, tokens, seq_len, convention, world, peak, args.mfu)
    return mem, comp


def main(argv: Optional[list[str]] = None) -> int:
    """Entry point of ``lmlab plan``; returns the exit code (1 when the plan does not fit)."""
    args = build_parser().parse_args(argv)
    try:
        args.device_memory and parse_bytes(args.device_memory)
    except ValueError as e:
        raise ConfigError("--device-memory", str(e)) from None
    mem, comp = make_plan(args)
    if args.json:
        print(json.dumps({"memory": mem.as_dict(), "compute": comp.as_dict()}, indent=2, default=str))
    else:
        print(format_plan(mem, comp if comp.tokens else None))
    return 0 if mem.fits in (None, True) else 1


if __name__ == "__main__":
    raise SystemExit(main())
