"""Compute-optimal planning: how big a model, how many tokens, how long, and what shape.

* :func:`plan_compute` applies a fitted :class:`~lmlab.scaling.law.ChinchillaLaw`
  (default: Besiroglu et al. 2024's replication of Chinchilla approach 3) to a
  FLOP budget and converts the budget into PF-days and wall-clock time.
* :func:`pf_days` and :func:`wall_seconds` are the one FLOPs-to-PF-days and
  FLOPs-to-wall-time conversion of lmlab (run summaries and ``lmlab plan`` use them).
* :func:`chinchilla_rule` is the rule of thumb D = 20 N with C = 6 N D, so
  N = sqrt(C / 120).
* :func:`shape_for_params` turns a non-embedding parameter count into
  (n_layers, d_model, n_heads) using 12 * n_layers * d_model^2 (Kaplan et al.'s
  count of attention + 4x MLP weights per layer).
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass
from typing import Any

from lmlab.errors import ConfigError
from lmlab.scaling.law import EPOCH_2024, ChinchillaLaw
from lmlab.scaling.results import FLOPS_PER_PARAM_TOKEN

SECONDS_PER_DAY = 86400.0
#: One petaFLOP/s sustained for a day.
PF_DAY = 1e15 * SECONDS_PER_DAY
#: Dense BF16 peak of one NVIDIA H100 SXM, FLOP/s.
H100_PEAK_FLOPS = 989e12


@dataclass(frozen=True)
class ComputePlan:
    """Compute-optimal allocation of ``compute`` FLOPs and what it costs to run."""

    compute: float
    N_opt: float
    D_opt: float
    loss: float
    pf_days: float
    accelerators: int
    peak_flops: float
    mfu: float
    seconds: float

    @property
    def tokens_per_param(self) -> float:
        """D_opt / N_opt (about 20 for Chinchilla)."""
        return self.D_opt / self.N_opt

    @property
    def days(self) -> float:
        """Wall-clock days at the given accelerator count, peak FLOP/s and MFU."""
        return self.seconds / SECONDS_PER_DAY

    def to_dict(self) -> dict[str, Any]:
        """JSON-ready fields plus tokens_per_param, hours and days."""
        out = asdict(self)
        out.update(tokens_per_param=self.tokens_per_param, hours=self.seconds / 3600.0, days=self.days)
        return out


def _positive(name: str, value: float) -> None:
    if not (isinstance(value, (int, float)) and math.isfinite(value) and value > 0):
        raise ConfigError(name, f"must be a positive number, got {value!r}", f"pass {name} > 0")


def pf_days(compute: float) -> float:
    """FLOPs expressed in PF-days (1e15 FLOP/s for 86,400 s)."""
    return compute / PF_DAY


def wall_seconds(compute: float, accelerators: int = 1, peak_flops: float = H100_PEAK_FLOPS, mfu: float = 0.4) -> float:
    """Seconds to spend ``compute`` FLOPs on ``accelerators`` devices at ``mfu`` of ``peak_flops`` each."""
    _positive("--compute", compute)
    _positive("--accelerators", accelerators)
    _positive("--peak_flops", peak_flops)
    if not 0 < mfu <= 1:
        raise ConfigError("--mfu", f"model FLOPs utilisation {mfu} is not in (0, 1]", "pass a fraction such as 0.4")
    return compute / (accelerators * peak_flops * mfu)


def plan_compute(
    compute: float,
    law: ChinchillaLaw = EPOCH_2024,
    *,
    accelerators: int = 1,
    peak_flops: float = H100_PEAK_FLOPS,
    mfu: float = 0.4,
) -> ComputePlan:
    """N_opt, D_opt and predicted loss for ``compute`` FLOPs under ``law``, with PF-days and wall time."""
    seconds = wall_seconds(compute, accelerators, peak_flops, mfu)
    n_opt, d_opt = law.optimal(compute)
    return ComputePlan(
        compute=float(compute),
        N_opt=float(n_opt),
        D_opt=float(d_opt),
        loss=float(law.loss(n_opt, d_opt)),
        pf_days=pf_days(compute),
        accelerators=int(accelerators),
        peak_flops=float(peak_flops),
        mfu=float(mfu),
        seconds=seconds,
    )


def chinchilla_rule(compute: float, tokens_per_param: float = 20.0) -> tuple[float, float]:
    """(N, D) from D = k N and C = 6 N D, i.e. N = sqrt(C / (6 k)); k = 20 is the Chinchilla rule."""
    _positive("--compute", compute)
    _positive("tokens_per_param", tokens_per_param)
    n = math.sqrt(compute / (FLOPS_PER_PARAM_TOKEN * tokens_per_param))
    return n, tokens_per_param * n


@dataclass(frozen=True)
class ModelShape:
    """A decoder-only transformer shape and its non-embedding parameter count 12 * n_layers * d_model^2."""

    n_layers: int
    d_model: int
    n_heads: int
    head_dim: int
    n_params: int
    target: float

    @property
    def aspect_ratio(self) -> float:
        """d_model / n_layers."""
        return self.d_model / self.n_layers

    @property
    def rel_error(self) -> float:
        """(n_params - target) / target."""
        return (self.n_params - self.target) / self.target


def non_embedding_params(n_layers: int, d_model: int) -> int:
    """12 * n_layers * d_model^2: Q, K, V, O (4 d^2) plus a 4x MLP (8 d^2) per layer; biases and norms ignored."""
    return 12 * n_layers * d_model * d_model


def _candidates(target: float, head_dim: int, lo: float, hi: float) -> list[tuple[float, int, int]]:
    """(rel_error, n_layers, d_model) for the shapes with lo <= d_model / n_layers <= hi."""
    out = []
    # d >= lo * L and 12 L d^2 ~ target bound the depth: L <= (target / (12 lo^2))^(1/3).
    max_layers = max(1, int(math.ceil((1.5 * target / (12.0 * lo * lo)) ** (1.0 / 3.0))))
    for n_layers in range(1, max_layers + 1):
        ideal = math.sqrt(target / (12.0 * n_layers)) / head_dim
        for k in {max(1, math.floor(ideal)), max(1, math.ceil(ideal))}:
            d_model = k * head_dim
            if lo <= d_model / n_layers <= hi:
                err = abs(non_embedding_params(n_layers, d_model) - target) / target
                out.append((err, n_layers, d_model))
    return out


def shape_for_params(
    n_params_non_embedding: float,
    *,
    head_dim: int = 64,
    target_aspect: float = 64.0,
    min_aspect: float = 32.0,
    max_aspect: float = 128.0,
    tolerance: float = 0.05,
) -> ModelShape:
    """Pick (n_layers, d_model, n_heads) whose 12 * n_layers * d_model^2 is close to the target.

    Formula: search integer n_layers >= 1 and d_model a multiple of ``head_dim``
    with ``min_aspect <= d_model / n_layers <= max_aspect`` (Kaplan et al. find
    loss flat over this range). Among shapes within ``tolerance`` of the target,
    take the one whose aspect ratio is closest (in log) to ``target_aspect``,
    i.e. d_model ~ head_dim * round(n_layers * target_aspect / head_dim); when
    none is that close, take the closest count. n_heads = d_model / head_dim.
    Below ~1e7 parameters multiples of 64 are too coarse for that range, so
    while the best error exceeds 10% the range is widened ([min/2, 2 max], up
    to 6 times): a tiny model gets the count right at an unusual aspect ratio.
    """
    _positive("n_params_non_embedding", n_params_non_embedding)
    target = float(n_params_non_embedding)
    if target < 12 * head_dim * head_dim:
        raise ConfigError(
            "n_params_non_embedding",
            f"{target:.3g} is smaller than one layer of width {head_dim} ({12 * head_dim * head_dim})",
            "ask for a larger model",
        )
    lo, hi = min_aspect, max_aspect
    for _ in range(6):
        cands = _candidates(target, head_dim, lo, hi)
        if cands and min(c[0] for c in cands) <= 0.10:
            break
        lo, hi = lo / 2.0, hi * 2.0
    close = [c for c in cands if c[0] <= tolerance]
    if close:
        _, n_layers, d_model = min(close, key=lambda c: (abs(math.log(c[2] / c[1] / target_aspect)), c[0]))
    else:
        _, n_layers, d_model = min(cands, key=lambda c: c[0])
    return ModelShape(
        n_layers=n_layers,
        d_model=d_model,
        n_heads=d_model // head_dim,
        head_dim=head_dim,
        n_params=non_embedding_params(n_layers, d_model),
        target=target,
    )


def training_steps(tokens: float, batch_tokens: float) -> int:
    """Optimizer steps to see ``tokens`` tokens at ``batch_tokens`` tokens per step (rounded up)."""
    _positive("--batch_tokens", batch_tokens)
    return max(1, int(math.ceil(tokens / batch_tokens)))
