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
from lmlab.scaling.plan import chinchilla_rule, shape_for_params


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
