"""Memory and compute plan for a training configuration, before any GPU is allocated.

:func:`plan_memory` predicts the peak bytes on one device for a model shape,
micro-batch, sequence length, precision, strategy (DDP, DeepSpeed ZeRO-1/2/3,
FSDP full / grad-op / hybrid, FSDP2 with tensor parallelism), activation
checkpointing and world size, and finds the largest micro-batch that fits.
When the configuration does not fit it tries the usual remedies one at a time
(activation checkpointing, a higher ZeRO stage, a smaller micro-batch, more
TP, optimizer offload) and lists those that would.

:func:`estimate_compute` gives a configuration's training FLOPs from
:mod:`lmlab.models.counting` (the one definition the backbone uses), and its
PF-days and wall-clock time on N accelerators at a given model FLOPs
utilisation through :func:`lmlab.scaling.plan.pf_days` and
:func:`~lmlab.scaling.plan.wall_seconds` (the compute-optimal
:func:`~lmlab.scaling.plan.plan_compute` of a FLOP budget uses the same).

The peak is modeled as::

    peak = params + optimizer + persistent grads + extras
           + max(activation peak + autocast weight cache, grads allocated during backward)

Gradients that ``zero_grad(set_to_none=True)`` frees between steps are
allocated layer by layer during the backward pass while activations are
being freed, so they overlap with activations rather than adding to them;
DDP's bucket-view gradients and DeepSpeed's gradient partitions persist.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from typing import Literal, Optional

from lmlab.distributed.memory import (
    Activations,
    ParamSplit,
    act_dtypes,
    activations,
    param_split,
    state_bytes,
)
from lmlab.errors import ConfigError
from lmlab.models.config import TransformerConfig
from lmlab.models.counting import FlopConvention, count_params, flops_per_token
from lmlab.scaling.plan import SECONDS_PER_DAY, pf_days, wall_seconds

STRATEGIES = ("single", "ddp", "zero1", "zero2", "zero3", "fsdp", "fsdp-grad-op", "fsdp-hybrid", "fsdp2")
SHARD_PARAMS = ("zero3", "fsdp", "fsdp-hybrid", "fsdp2")  # parameters gathered per block for compute
STORE_SHARDED = SHARD_PARAMS + ("fsdp-grad-op",)  # parameters stored sharded between steps
SHARD_GRADS = ("zero2", "zero3", "fsdp", "fsdp-grad-op", "fsdp-hybrid", "fsdp2")
SHARD_OPTIM = ("zero1", "zero2", "zero3", "fsdp", "fsdp-grad-op", "fsdp-hybrid", "fsdp2")
GiB = 1024**3


@dataclass
class PlanInput:
    """Everything the memory plan depends on.

    Args:
        config: Model shape.
        micro_batch: Sequences per forward/backward on one device.
        seq_len: Tokens per sequence.
        precision: Lightning precision string (``32-true``, ``bf16-mixed``, ``bf16-true``, ``16-mixed``).
        strategy: One of :data:`STRATEGIES`.
        world_size: Devices in total.
        tp: Tensor-parallel degree (``fsdp2`` only).
        activation_checkpointing: Recompute blocks in the backward pass.
        device: Kernel behaviour to assume (``cuda`` or ``cpu``).
        device_memory: Bytes per device (``None``: no fit check).
        reserve: Fraction of device memory kept free for the CUDA context,
            allocator fragmentation and communication buffers not modeled.
        gpus_per_node: Devices per node (the shard group of ``fsdp-hybrid``).
        offload: Optimizer states (and fp32 master weights) in host memory.
        ddp_bucket_view: DDP gradients are views into its buckets
            (``gradient_as_bucket_view=True``); otherwise the buckets are an extra copy.
        low_precision_params: FSDP2 ``param_dtype`` is bf16/fp16 (matmuls read
            16-bit weights without autocast).
        deepspeed_bucket_elements: DeepSpeed reduce + all-gather bucket sizes (ZeRO-1/2).
    """

    config: TransformerConfig
    micro_batch: int = 1
    seq_len: int = 2048
    precision: str = "bf16-mixed"
    strategy: str = "ddp"
    world_size: int = 1
    tp: int = 1
    activation_checkpointing: bool = False
    device: Literal["cuda", "cpu"] = "cuda"
    device_memory: Optional[float] = None
    reserve: float = 0.1
    gpus_per_node: int = 8
    offload: bool = False
    ddp_bucket_view: bool = True
    low_precision_params: bool = False
    deepspeed_bucket_elements: float = 4e8

    def __post_init__(self) -> None:
        if self.strategy not in STRATEGIES:
            raise ConfigError("--strategy", f"unknown strategy {self.strategy!r}", f"choose one of {', '.join(STRATEGIES)}")
        for name in ("micro_batch", "seq_len", "world_size", "tp"):
            if int(getattr(self, name)) < 1:
                raise ConfigError(f"--{name.replace('_', '-')}", f"must be >= 1, got {getattr(self, name)}")
        if self.tp > 1 and self.strategy != "fsdp2":
            raise ConfigError("--tp", f"tensor parallelism is lmlab's fsdp2 strategy, not {self.strategy}",
                              "use --strategy fsdp2 (experiments/strategies/fsdp2_tp.yaml)")
        if self.world_size % self.tp:
            raise ConfigError("--tp", f"TP degree {self.tp} does not divide the world size {self.world_size}")
        if self.tp > 1:
            from lmlab.distributed.parallelize import check_tp_degree

            check_tp_degree(self.config, self.tp)

    @property
    def dp(self) -> int:
        return self.world_size // self.tp


@dataclass
class MemoryPlan:
    """Predicted bytes per device, by component."""

    input: PlanInput
    params: float
    grads: float
    optimizer: float
    host: float  # optimizer/master bytes offloaded to CPU memory (per device)
    extras: dict[str, float]
    autocast_cache: float
    activations: Activations
    grads_persistent: bool
    suggestions: list[dict] = field(default_factory=list)
    max_micro_batch: Optional[int] = None

    @property
    def static(self) -> float:
        """Bytes held for the whole step independent of the micro-batch."""
        return self.params + self.optimizer + sum(self.extras.values()) + (self.grads if self.grads_persistent else 0.0)

    @property
    def dynamic(self) -> float:
        grads = 0.0 if self.grads_persistent else self.grads
        return self.autocast_cache + max(self.activations.peak, grads)

    @property
    def peak(self) -> float:
        return self.static + self.dynamic

    @property
    def usable(self) -> Optional[float]:
        m = self.input.device_memory
        return None if m is None else m * (1.0 - self.input.reserve)

    @property
    def fits(self) -> Optional[bool]:
        return None if self.usable is None else self.peak <= self.usable

    def as_dict(self) -> dict:
        inp = dataclasses.asdict(self.input)
        inp["config"] = self.input.config.to_dict()
        return {
            "input": inp,
            "bytes": {
                "params": self.params,
                "grads": self.grads,
                "optimizer": self.optimizer,
                "host_offload": self.host,
                "autocast_cache": self.autocast_cache,
                **{f"extra/{k}": v for k, v in self.extras.items()},
                "activations_saved": self.activations.saved,
                "activations_peak": self.activations.peak,
                "activations_per_layer": self.activations.per_layer,
                "static": self.static,
                "peak": self.peak,
            },
            "grads_persistent": self.grads_persistent,
            "device_memory": self.input.device_memory,
            "usable": self.usable,
            "fits": self.fits,
            "max_micro_batch": self.max_micro_batch,
            "suggestions": self.suggestions,
        }


def _per_device_params(split: ParamSplit, tp: int) -> float:
    return split.tp_sharded / tp + (split.total - split.tp_sharded)


def _mixed(precision: str) -> bool:
    return "mixed" in str(precision)


def plan_memory(inp: PlanInput, search: bool = True) -> MemoryPlan:
    """Predict the per-device peak for ``inp``; with ``search``, also the largest micro-batch and remedies."""
    cfg, kind, tp = inp.config, inp.strategy, inp.tp
    deepspeed = kind.startswith("zero")
    sb = state_bytes(inp.precision, deepspeed=deepspeed)
    split = param_split(cfg)
    P = _per_device_params(split, tp)
    shard = min(inp.dp, inp.gpus_per_node) if kind == "fsdp-hybrid" else inp.dp
    shard = max(1, shard)

    params = sb.weights * P / (shard if kind in STORE_SHARDED else 1)
    grads = sb.grads * P / (shard if kind in SHARD_GRADS else 1)
    step_counters = 0 if deepspeed else 4 * split.n_tensors  # torch AdamW: one fp32 step tensor per parameter
    if kind == "fsdp2":
        # per-parameter sharding: every rank's AdamW keeps a (replicated) step tensor for each DTensor
        optimizer = sb.optimizer * P / shard + step_counters
    else:
        optimizer = (sb.optimizer * P + step_counters) / (shard if kind in SHARD_OPTIM else 1)
    host = 0.0
    if inp.offload:
        host, optimizer = optimizer, 0.0

    # are the weights the matmuls read 16-bit without autocast? (DeepSpeed's bf16/fp16 engine, Lightning's FSDP
    # mixed precision with param_dtype=bf16, FSDP2 with a 16-bit param_dtype)
    low_params = (deepspeed and "16" in str(inp.precision)) or (
        kind in ("fsdp", "fsdp-grad-op", "fsdp-hybrid") and _mixed(inp.precision)
    ) or (kind == "fsdp2" and inp.low_precision_params)
    compute_w = 2 if low_params else sb.compute_weights
    extras: dict[str, float] = {}
    if kind == "ddp" and inp.world_size > 1 and not inp.ddp_bucket_view:
        extras["ddp gradient buckets"] = sb.grads * P
    if kind in SHARD_PARAMS and shard > 1:
        block = (split.tp_sharded / cfg.n_layers) / tp + (split.block - split.tp_sharded / cfg.n_layers)
        # two blocks gathered (current + prefetched), one block of unsharded grads, the root unit
        # (embeddings, final norm, head) gathered for the whole forward and backward
        gathered = (2 * compute_w + compute_w) * block
        if kind == "zero3":
            # DeepSpeed gathers per submodule and caps live gathered parameters (stage3_max_live_parameters=1e9)
            gathered = min(gathered, compute_w * 1e9)
        extras["gathered blocks"] = gathered
        extras["gathered root unit"] = compute_w * split.root
    if kind == "fsdp-grad-op" and shard > 1:
        extras["unsharded params kept to backward"] = compute_w * P
    if kind in ("zero1", "zero2") and inp.world_size > 1:
        # in the gradients' dtype: 2 bytes an element under DeepSpeed's bf16/fp16, 4 at fp32
        extras["deepspeed buckets"] = sb.grads * inp.deepspeed_bucket_elements

    autocast_cache = 0.0
    if _mixed(inp.precision) and not low_params:
        # autocast keeps one bf16/fp16 copy of every matmul weight it cast, until the step ends
        autocast_cache = 2 * (split.matmul_weights - split.tp_sharded + split.tp_sharded / tp)

    if deepspeed and _mixed(inp.precision) or (kind == "fsdp2" and low_params and not _mixed(inp.precision)):
        dtypes = act_dtypes("bf16-true")  # 16-bit module, no autocast: everything saved in 16 bits
    else:
        dtypes = act_dtypes(inp.precision, params_in_compute_dtype=low_params)
    acts = activations(cfg, inp.micro_batch, inp.seq_len, dtypes, inp.device, tp, inp.activation_checkpointing)
    persistent = (kind == "ddp" and inp.world_size > 1 and inp.ddp_bucket_view) or deepspeed

    plan = MemoryPlan(inp, params, grads, optimizer, host, extras, autocast_cache, acts, persistent)
    if search and inp.device_memory is not None:
        plan.max_micro_batch = largest_micro_batch(inp)
        if not plan.fits:
            plan.suggestions = suggest(inp)
    return plan


def largest_micro_batch(inp: PlanInput, limit: int = 1 << 16) -> int:
    """Largest micro-batch whose peak fits ``inp.device_memory`` (0 when even 1 does not)."""
    def fits(b: int) -> bool:
        return bool(plan_memory(dataclasses.replace(inp, micro_batch=b), search=False).fits)

    if not fits(1):
        return 0
    lo, hi = 1, 2
    while hi <= limit and fits(hi):
        lo, hi = hi, hi * 2
    hi = min(hi, limit + 1)
    while hi - lo > 1:
        mid = (lo + hi) // 2
        lo, hi = (mid, hi) if fits(mid) else (lo, mid)
    return lo


def _next_stages(kind: str) -> list[str]:
    order = {
        "single": ["fsdp", "zero2", "zero3"],
        "ddp": ["zero1", "zero2", "fsdp", "zero3"],
        "zero1": ["zero2", "zero3"],
        "zero2": ["zero3"],
        "fsdp-grad-op": ["fsdp"],
        "fsdp-hybrid": ["fsdp"],
    }
    return order.get(kind, [])


def suggest(inp: PlanInput, limit: int = 5) -> list[dict]:
    """Single changes (then pairs with checkpointing) that make ``inp`` fit, least disruptive first."""
    candidates: list[tuple[str, dict]] = []
    if not inp.activation_checkpointing:
        candidates.append(("turn on activation checkpointing (model.config.activation_checkpointing=true)",
                           {"activation_checkpointing": True}))
    if inp.world_size > 1:
        for stage in _next_stages(inp.strategy):
            candidates.append((f"use strategy {stage} ({_STRATEGY_YAML[stage]})", {"strategy": stage}))
    if inp.strategy in ("zero1", "zero2", "zero3", "fsdp", "fsdp2") and not inp.offload:
        candidates.append(("offload optimizer states to CPU", {"offload": True}))
    if inp.strategy == "fsdp2" or inp.strategy in ("ddp", "fsdp", "single") and inp.world_size > 1:
        for tp in (2, 4, 8):
            if tp > inp.tp and inp.world_size % tp == 0 and inp.config.kv_heads % tp == 0 and inp.config.n_heads % tp == 0 \
                    and inp.config.hidden_dim % tp == 0 and not inp.config.moe_experts:
                candidates.append((f"tensor parallel {tp} (strategy fsdp2, experiments/strategies/fsdp2_tp.yaml)",
                                   {"strategy": "fsdp2", "tp": tp}))
    out: list[dict] = []
    for text, change in candidates:
        trial = dataclasses.replace(inp, **change)
        p = plan_memory(trial, search=False)
        if p.fits:
            out.append({"change": text, "peak": p.peak, "settings": change})
    mb = largest_micro_batch(inp)
    if 0 < mb < inp.micro_batch:
        p = plan_memory(dataclasses.replace(inp, micro_batch=mb), search=False)
        out.append({"change": f"micro-batch {mb} (more gradient-accumulation steps for the same global batch)",
                    "peak": p.peak, "settings": {"micro_batch": mb}})
    if not out and not inp.activation_checkpointing:
        for text, change in candidates[1:]:
            both = {**change, "activation_checkpointing": True}
            p = plan_memory(dataclasses.replace(inp, **both), search=False)
            if p.fits:
                out.append({"change": "activation checkpointing and " + text, "peak": p.peak, "settings": both})
    return out[:limit]


_STRATEGY_YAML = {
    "ddp": "experiments/strategies/ddp.yaml",
    "zero1": "experiments/strategies/deepspeed_zero1.yaml",
    "zero2": "experiments/strategies/deepspeed_zero2.yaml",
    "zero3": "experiments/strategies/deepspeed_zero3.yaml",
    "fsdp": "experiments/strategies/fsdp.yaml",
    "fsdp-grad-op": "experiments/strategies/fsdp_grad_op.yaml",
    "fsdp-hybrid": "experiments/strategies/fsdp_hybrid.yaml",
    "fsdp2": "experiments/strategies/fsdp2_tp.yaml",
    "single": "one device",
}


# -- compute -------------------------------------------------------------------------------
@dataclass
class ComputeEstimate:
    """A configuration's training FLOPs and wall-clock time at a given utilisation."""

    flops_per_token: float
    tokens: float
    flops: float
    pf_days: float
    devices: int
    peak_flops_per_device: Optional[float]
    mfu: float
    seconds: Optional[float]
    convention: str

    @property
    def days(self) -> Optional[float]:
        return None if self.seconds is None else self.seconds / SECONDS_PER_DAY

    def as_dict(self) -> dict:
        return {**dataclasses.asdict(self), "days": self.days}


def estimate_compute(
    config: TransformerConfig,
    tokens: float,
    seq_len: Optional[int] = None,
    convention: FlopConvention = "palm",
    devices: int = 1,
    peak_flops_per_device: Optional[float] = None,
    mfu: float = 0.4,
) -> ComputeEstimate:
    """FLOPs = flops_per_token x tokens; time = FLOPs / (devices x peak x MFU)."""
    if not 0 < mfu <= 1:
        raise ConfigError("--mfu", f"must be in (0, 1], got {mfu}")
    fpt = flops_per_token(config, seq_len, convention)
    total = fpt * float(tokens)
    seconds = None
    if peak_flops_per_device:
        # no tokens (no max_steps in the config): nothing to time
        seconds = wall_seconds(total, devices, peak_flops_per_device, mfu) if total > 0 else 0.0
    return ComputeEstimate(fpt, float(tokens), total, pf_days(total), devices, peak_flops_per_device, mfu, seconds, convention)


# -- formatting ----------------------------------------------------------------------------------
def fmt_bytes(n: Optional[float]) -> str:
    if n is None:
        return "-"
    for unit, size in (("GiB", GiB), ("MiB", 1024**2), ("KiB", 1024)):
        if abs(n) >= size:
            return f"{n / size:,.2f} {unit}"
    return f"{n:,.0f} B"


def format_plan(mem: MemoryPlan, comp: Optional[ComputeEstimate] = None) -> str:
    """The human-readable table ``lmlab plan`` prints."""
    inp = mem.input
    cfg = inp.config
    split = param_split(cfg)
    lines = [
        f"model: {split.total:,} params (d_model={cfg.d_model}, n_layers={cfg.n_layers}, n_heads={cfg.n_heads}, "
        f"kv_heads={cfg.kv_heads}, vocab={cfg.padded_vocab_size})"
        + (f"; {cfg.moe_experts} experts top-{cfg.moe_top_k}: every expert's weights and optimizer states are held, "
           f"{count_params(cfg).active:,} params active per token" if cfg.moe_experts else ""),
        f"setup: strategy={inp.strategy} world={inp.world_size} tp={inp.tp} dp={inp.dp} precision={inp.precision} "
        f"micro_batch={inp.micro_batch} seq_len={inp.seq_len} activation_checkpointing={inp.activation_checkpointing}"
        + (" offload=optimizer" if inp.offload else ""),
        "",
        f"{'per device':<34}{'bytes':>14}",
        f"{'-' * 48}",
    ]
    rows = [("parameters", mem.params), ("gradients" + (" (persistent)" if mem.grads_persistent else ""), mem.grads),
            ("optimizer states", mem.optimizer)]
    if mem.host:
        rows.append(("  (offloaded to host memory)", mem.host))
    rows += [(k, v) for k, v in mem.extras.items()]
    if mem.autocast_cache:
        rows.append(("autocast weight copies", mem.autocast_cache))
    a = mem.activations
    rows += [
        (f"activations saved ({cfg.n_layers} layers)", a.saved),
        ("  per layer" + (" (recomputed)" if a.checkpointed else ""), a.per_layer),
        ("activations at backward peak", a.peak),
    ]
    for name, value in rows:
        lines.append(f"{name:<34}{fmt_bytes(value):>14}")
    lines.append(f"{'-' * 48}")
    lines.append(f"{'peak (predicted)':<34}{fmt_bytes(mem.peak):>14}")
    if inp.device_memory is not None:
        lines.append(f"{'device memory (usable)':<34}{fmt_bytes(inp.device_memory):>14} ({fmt_bytes(mem.usable)})")
        lines.append(f"fits: {'yes' if mem.fits else 'NO'}; largest micro-batch that fits: {mem.max_micro_batch}")
        if not mem.fits:
            if mem.suggestions:
                lines.append("to make it fit:")
                for s in mem.suggestions:
                    lines.append(f"  - {s['change']}: peak {fmt_bytes(s['peak'])}")
            else:
                lines.append("no single change makes it fit: combine sharding, TP and checkpointing, or use more devices")
    if comp is not None:
        lines += ["", f"compute ({comp.convention} convention): {comp.flops_per_token:,.4g} FLOPs/token x "
                      f"{comp.tokens:,.4g} tokens = {comp.flops:.4g} FLOPs = {comp.pf_days:,.2f} PF-days"]
        if comp.seconds is not None:
            lines.append(f"time on {comp.devices} device(s) at {comp.peak_flops_per_device / 1e12:,.0f} TFLOP/s peak, "
                         f"MFU {comp.mfu:.0%}: {comp.seconds / 3600:,.2f} h ({comp.days:,.2f} days)")
    return "\n".join(lines)
