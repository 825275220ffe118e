"""Compute-optimal sizing from a FLOP budget (the Chinchilla rule).

Given a training budget C in FLOPs, Hoffmann et al. 2022 find the loss-optimal
model uses about 20 tokens per parameter. With C = 6 N D and D = r N:

    N = sqrt(C / (6 r)),   D = r N,   steps = D / (batch_size * seq_len)

``budget`` in a config applies this before anything is built: it picks a model
shape with about N non-embedding parameters from the size ladder, sets
``trainer.max_steps``, and prints the choice.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Optional

from lmlab.errors import ConfigError
from lmlab.scaling.plan import SECONDS_PER_DAY, chinchilla_rule, shape_for_params, wall_seconds


@dataclass
class ComputeBudget:
    """Derive model size and training length from a FLOP budget.

    Scaling sweeps name sizes directly instead: ``params`` picks the model
    shape from the size ladder and ``tokens`` sets the training length, each
    on its own or with ``compute`` (then the missing one is C / (6 x other)).

    Args:
        compute: Training FLOPs C. ``None`` leaves the config as written.
        tokens_per_param: Tokens per parameter r (Chinchilla: 20).
        params: Target non-embedding parameter count N.
        tokens: Training tokens D.
        head_dim: Attention head width of the derived shape.
    """

    compute: Optional[float] = None
    tokens_per_param: float = 20.0
    params: Optional[float] = None
    tokens: Optional[float] = None
    head_dim: int = 64


def apply_budget(cfg) -> None:
    """Mutate a parsed LightningCLI config (a jsonargparse Namespace) in place."""
    budget = cfg.get("budget")
    if budget is None:
        return
    compute, n, d = budget.get("compute"), budget.get("params"), budget.get("tokens")
    if compute is None and n is None and d is None:
        return
    if compute is not None and n is not None and d is not None:
        raise ConfigError("budget", "compute, params and tokens are all set", "set at most two of them")
    rule = ""
    if compute is not None:
        compute = float(compute)
        if compute <= 0:
            raise ConfigError("budget.compute", f"must be positive, got {compute}")
        if n is None and d is None:
            n, d = chinchilla_rule(compute, float(budget.get("tokens_per_param", 20.0)))
            rule = f" (D = {budget.get('tokens_per_param', 20.0)} N, C = 6 N D)"
        elif n is None:
            n = compute / (6.0 * float(d))
            rule = " (N = C / 6D)"
        else:
            d = compute / (6.0 * float(n))
            rule = " (D = C / 6N)"
    parts = []
    if n is not None:
        if float(n) <= 0:
            raise ConfigError("budget.params", f"must be positive, got {n}")
        ladder = shape_for_params(float(n), head_dim=int(budget.get("head_dim", 64)))
        shape = {"n_layers": ladder.n_layers, "d_model": ladder.d_model, "n_heads": ladder.n_heads}
        model_cfg = cfg.model.init_args.config if "init_args" in cfg.model else cfg.model.config
        for key, value in shape.items():
            model_cfg[key] = value
        model_cfg["n_kv_heads"] = None
        model_cfg["preset"] = None
        parts.append(f"N={float(n):,.0f} params (shape {shape})")
    if d is not None:
        if float(d) <= 0:
            raise ConfigError("budget.tokens", f"must be positive, got {d}")
        data = cfg.data.init_args if "init_args" in cfg.data else cfg.data
        seq_len, batch = int(data.seq_len), int(data.batch_size)
        steps = max(1, int(round(float(d) / (seq_len * batch))))
        cfg.trainer.max_steps = steps
        parts.append(f"D={float(d):,.0f} tokens = {steps:,} steps of {batch}x{seq_len} tokens")
    head = f"C={compute:.3e} FLOPs -> " if compute is not None else ""
    print(f"lmlab budget: {head}{', '.join(parts)}{rule}", flush=True)


# --- wall-time estimate ----------------------------------------------------------------------------

#: Model FLOP utilisation assumed for the estimate: the share of the device's peak (on a CPU or an unlisted GPU,
#: of the measured rate of the model's own matmul shape) a dense transformer's training step achieves.
#: Well-tuned GPU runs reach 0.35-0.5.
ASSUMED_MFU = 0.4
#: The same on a CPU, where the non-matmul work (cross-entropy over the vocabulary, normalisation, the optimizer,
#: batching) weighs more: small lmlab runs on CPUs reach about 0.15-0.3 of their matmul's measured rate.
ASSUMED_CPU_MFU = 0.2

#: Largest number of rows of the timed matmul (one micro-batch's tokens, capped to keep the timing short)
_MAX_TIMED_ROWS = 8192


def measure_matmul_flops(device=None, dtype=None, seconds: float = 0.05, shape: tuple[int, int, int] = (1024, 1024, 1024)) -> float:
    """FLOP/s of an (m x k) @ (k x n) matmul on ``device`` (default CPU), timed for about ``seconds``.

    Small models run small matmuls far below a device's large-matrix rate, so
    the estimate times the model's own shape rather than a square benchmark.
    Every ``lmlab fit`` pays for this before its first step; 0.05 s gives the
    same rate as 0.25 s to within the run-to-run spread on CPUs.
    """
    import time

    import torch

    device = torch.device(device or "cpu")
    dtype = dtype or torch.float32
    m, k, n = shape
    a = torch.randn(m, k, device=device, dtype=dtype)
    b = torch.randn(k, n, device=device, dtype=dtype)
    sync = torch.cuda.synchronize if device.type == "cuda" else (lambda: None)
    a @ b  # warm-up: first call allocates and picks kernels
    sync()
    count, start = 0, time.perf_counter()
    while True:
        a @ b
        count += 1
        if count % 4 == 0:
            sync()
            elapsed = time.perf_counter() - start
            if elapsed >= seconds:
                return count * 2.0 * m * k * n / elapsed


def device_flops(device, precision, shape: tuple[int, int, int] = (1024, 1024, 1024)) -> tuple[float, str]:
    """(FLOP/s of one device, how it was found): the peak from the hardware table for listed GPUs, else a quick
    measurement of a ``shape`` matmul (the model's own, for a fit)."""
    import torch

    from lmlab.distributed.hardware import detect_peak_flops, precision_key

    key = precision_key(precision)
    peak = detect_peak_flops(device, precision)
    if peak:
        return peak, f"{torch.cuda.get_device_name(device)} (peak {peak / 1e12:,.0f} TFLOP/s {key})"
    dtype = {"bf16": torch.bfloat16, "fp16": torch.float16, "fp32": torch.float32}[key]
    if device.type == "cpu" and key == "fp16":
        dtype = torch.float32  # CPUs compute fp16 autocast regions in fp32
    measured = measure_matmul_flops(device, dtype, shape=shape)
    name = "CPU" if device.type == "cpu" else torch.cuda.get_device_name(device)
    dims = "x".join(str(d) for d in shape)
    return measured, f"{name} (measured {measured / 1e9:,.0f} GFLOP/s on a {dims} {key} matmul)"


def format_duration(seconds: float) -> str:
    if seconds < 90:
        return f"{seconds:.0f} s"
    if seconds < 90 * 60:
        return f"{seconds / 60:.0f} min"
    if seconds < 48 * 3600:
        return f"{seconds / 3600:.1f} h"
    return f"{seconds / SECONDS_PER_DAY:.1f} days"


@dataclass
class WallTimeEstimate:
    """Training time of ``flops`` on ``devices`` devices at ``ASSUMED_MFU`` of ``flops_per_device``."""

    flops: float
    flops_per_device: float
    devices: int
    source: str
    mfu: float = ASSUMED_MFU

    @property
    def seconds(self) -> float:
        return wall_seconds(self.flops, self.devices, self.flops_per_device, self.mfu)

    def compute_for(self, seconds: float) -> float:
        """The training FLOPs that take ``seconds`` on this hardware."""
        return seconds * self.flops_per_device * self.devices * self.mfu

    def line(self, budget_compute: Optional[float] = None) -> str:
        """The estimate as one console line; a run sized by ``budget.compute`` that takes over an hour also gets
        the budget that takes about ten minutes (scaled in proportion: ``budget.compute`` counts 6 N D, while
        the estimate counts every FLOP, embeddings and attention included)."""
        text = (f"lmlab estimate: C={self.flops:.3e} FLOPs on {self.devices} x {self.source} at an assumed "
                f"{self.mfu:.0%} MFU -> about {format_duration(self.seconds)} of training (data preparation not included)")
        if budget_compute and self.seconds > 3600:
            text += f"; about 10 min here: --budget.compute={float(budget_compute) * 600 / self.seconds:.1e}"
        return text


def estimate_wall_time(
    flops: float, device, precision, devices: int = 1, shape: tuple[int, int, int] = (1024, 1024, 1024)
) -> WallTimeEstimate:
    """How long ``flops`` training FLOPs take on ``devices`` x ``device`` (a ``torch.device``); ``shape`` is the
    matmul timed where the device is not in the peak table."""
    per_device, source = device_flops(device, precision, shape)
    mfu = ASSUMED_CPU_MFU if device.type == "cpu" else ASSUMED_MFU
    return WallTimeEstimate(float(flops), per_device, max(1, int(devices)), source, mfu)


def fit_matmul_shape(module, datamodule) -> tuple[int, int, int]:
    """The feed-forward up-projection of one micro-batch: (tokens, d_model, hidden), tokens capped."""
    config = module.config
    try:
        micro = datamodule.micro_batch_size
    except Exception:  # needs the trainer's data-parallel layout, not known before the fit is launched
        micro = datamodule.schedule.base
    rows = max(1, min(_MAX_TIMED_ROWS, int(micro) * int(datamodule.seq_len)))
    return rows, int(config.d_model), int(config.hidden_dim)


def fit_training_flops(module, datamodule, max_steps: int) -> Optional[float]:
    """Training FLOPs of ``max_steps`` steps of an lmlab transformer stage (None for anything else)."""
    from lmlab.models.config import TransformerConfig
    from lmlab.models.counting import training_flops

    config = getattr(module, "config", None)
    schedule = getattr(datamodule, "schedule", None)
    seq_len = getattr(datamodule, "seq_len", None)
    if not isinstance(config, TransformerConfig) or schedule is None or not seq_len or not max_steps or max_steps <= 0:
        return None
    tokens = schedule.samples_before(max_steps) * seq_len
    return training_flops(config, tokens, seq_len, getattr(module, "flop_convention", "palm"))
