"""Compute-optimal sizing from a FLOP budget (the Chinchilla rule).

Given a training budget C in FLOPs, Hoffmann et al. 2022 find the loss-optimal
model uses about 20 tokens per parameter. With C = 6 N D and D = r N:

    N = sqrt(C / (6 r)),   D = r N,   steps = D / (batch_size * seq_len)

``budget`` in a config applies this before anything is built: it picks a model
shape with about N non-embedding parameters from the size ladder, sets
``trainer.max_steps``, and prints the choice.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Optional

from lmlab.errors import ConfigError


@dataclass
class ComputeBudget:
    """Derive model size and training length from a FLOP budget.

    Args:
        compute: Training FLOPs C. ``None`` leaves the config as written.
        tokens_per_param: Tokens per parameter r (Chinchilla: 20).
        head_dim: Attention head width of the derived shape.
    """

    compute: Optional[float] = None
    tokens_per_param: float = 20.0
    head_dim: int = 64


def chinchilla_optimal(compute: float, tokens_per_param: float = 20.0) -> tuple[float, float]:
    """(N, D) with C = 6 N D and D = tokens_per_param * N."""
    if compute <= 0 or tokens_per_param <= 0:
        raise ConfigError("budget.compute", f"must be positive, got {compute}")
    n = math.sqrt(compute / (6.0 * tokens_per_param))
    return n, tokens_per_param * n


def shape_for_params(n_params: float, head_dim: int = 64) -> dict:
    """A (n_layers, d_model, n_heads) whose 12 * L * d^2 is close to ``n_params``.

    Delegates to the scaling size ladder (:func:`lmlab.scaling.plan.shape_for_params`).
    """
    from lmlab.scaling.plan import shape_for_params as ladder

    shape = ladder(n_params, head_dim=head_dim)
    return {"n_layers": int(shape.n_layers), "d_model": int(shape.d_model), "n_heads": int(shape.n_heads)}


def apply_budget(cfg) -> None:
    """Mutate a parsed LightningCLI config (a jsonargparse Namespace) in place."""
    budget = cfg.get("budget")
    compute = budget.get("compute") if budget is not None else None
    if compute is None:
        return
    n, d = chinchilla_optimal(float(compute), float(budget.get("tokens_per_param", 20.0)))
    shape = shape_for_params(n, int(budget.get("head_dim", 64)))
    model_cfg = cfg.model.init_args.config if "init_args" in cfg.model else cfg.model.config
    for key, value in shape.items():
        model_cfg[key] = value
    model_cfg["n_kv_heads"] = None
    model_cfg["preset"] = None
    data = cfg.data.init_args if "init_args" in cfg.data else cfg.data
    seq_len, batch = int(data.seq_len), int(data.batch_size)
    steps = max(1, int(round(d / (seq_len * batch))))
    cfg.trainer.max_steps = steps
    print(
        f"lmlab budget: C={float(compute):.3e} FLOPs -> N={n:,.0f} params (shape {shape}), "
        f"D={d:,.0f} tokens = {steps:,} steps of {batch}x{seq_len} tokens (D = {budget.get('tokens_per_param', 20.0)} N, C = 6 N D)",
        flush=True,
    )
