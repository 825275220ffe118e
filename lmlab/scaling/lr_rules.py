"""Learning-rate rules: the loss-optimal peak learning rate as a power law in model size.

From a learning-rate x size sweep (``sweeps/lr_sweep.yaml``):

1. group runs by model size N (sizes within 10% are one size);
2. per size take the learning rate with the lowest validation loss
   (``refine="parabola"``: the vertex of a parabola through the best grid
   point and its two neighbours in log lr, which removes the grid's
   quantisation when the minimum is interior);
3. fit lr_opt = c * N^-k by least squares in log-log space;
4. bootstrap: resample the per-size optima with replacement and refit, for a
   percentile interval on k and c.

:func:`write_rule_yaml` turns the rule into a config fragment that sets
``model.init_args.settings.optimizer.lr`` for a chosen N, composable after the base
config: ``lmlab fit --config experiments/scaling/base.yaml --config
experiments/scaling/lr_rule.yaml``.
"""

from __future__ import annotations

import json
import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Optional

import numpy as np
import pandas as pd
import yaml

from lmlab.atomic import atomic_write_text
from lmlab.errors import ConfigError
from lmlab.scaling.bootstrap import check_level
from lmlab.scaling.powerlaw import fit_power_law
from lmlab.scaling.results import group_near_equal


@dataclass(frozen=True)
class LRRule:
    """lr_opt(N) = coef * N^-k, fitted to the best learning rate of each model size."""

    coef: float
    k: float
    r2: float
    sizes: np.ndarray
    lr_opt: np.ndarray
    loss_opt: np.ndarray
    n_runs: int
    refine: str
    intervals: Optional[dict[str, tuple[float, float]]] = None
    level: float = 0.95
    n_resamples: int = 0
    source: str = "<frame>"
    notes: list[str] = field(default_factory=list)

    def lr(self, n_params: float | np.ndarray) -> float | np.ndarray:
        """Predicted loss-optimal peak learning rate at ``n_params``."""
        return self.coef * np.power(n_params, -self.k)

    def to_dict(self) -> dict[str, Any]:
        """JSON-ready summary."""
        out: dict[str, Any] = {
            "rule": "lr_opt = coef * N^-k",
            "coef": self.coef,
            "k": self.k,
            "r2": self.r2,
            "n_runs": self.n_runs,
            "refine": self.refine,
            "source": self.source,
            "optima": [{"N": float(n), "lr": float(lr), "loss": float(l)} for n, lr, l in zip(self.sizes, self.lr_opt, self.loss_opt)],
        }
        if self.intervals:
            out.update(intervals={k: list(v) for k, v in self.intervals.items()}, level=self.level, n_resamples=self.n_resamples)
        if self.notes:
            out["notes"] = list(self.notes)
        return out


def read_runs(path: str | Path) -> pd.DataFrame:
    """Runs from a results file: JSON lines (RunSummary / sweep results) or CSV."""
    path = Path(path)
    if not path.is_file():
        raise ConfigError(str(path), "results file not found", "pass the results.jsonl or results.csv of a sweep")
    if path.suffix in (".jsonl", ".json"):
        rows = []
        for i, line in enumerate(path.read_text().splitlines()):
            if not line.strip():
                continue
            try:
                rows.append(json.loads(line))
            except json.JSONDecodeError:
                raise ConfigError(str(path), f"line {i + 1} is not JSON", "pass a JSON-lines file, one run per line") from None
        return pd.DataFrame(rows)
    return pd.read_csv(path)


def _column(frame: pd.DataFrame, name: str, flag: str, source: str) -> np.ndarray:
    if name not in frame.columns:
        raise ConfigError(flag, f"column {name!r} not in {source}", f"pass {flag} with one of: {', '.join(map(str, frame.columns[:15]))}")
    return pd.to_numeric(frame[name], errors="coerce").to_numpy(dtype=float)


def _parabola_vertex(log_lr: np.ndarray, loss: np.ndarray, best: int) -> Optional[float]:
    """log lr of the vertex through the best point and its neighbours, when it is a minimum between them."""
    if best == 0 or best == len(log_lr) - 1:
        return None
    x, y = log_lr[best - 1 : best + 2], loss[best - 1 : best + 2]
    c2, c1, _ = np.polyfit(x - x[1], y, 2)
    if c2 <= 0:
        return None
    v = x[1] - c1 / (2 * c2)
    return float(v) if x[0] <= v <= x[2] else None


def best_lr_per_size(
    n: np.ndarray, lr: np.ndarray, loss: np.ndarray, *, refine: str = "none", rel_tol: float = 0.1
) -> tuple[np.ndarray, np.ndarray, np.ndarray, list[str]]:
    """(sizes, best lr, best loss, notes) with one entry per model size."""
    if refine not in ("none", "parabola"):
        raise ConfigError("--refine", f"unknown refinement {refine!r}", "use 'none' or 'parabola'")
    labels = group_near_equal(n, rel_tol)
    sizes, lrs, losses, notes = [], [], [], []
    for label in np.unique(labels):
        members = np.flatnonzero(labels == label)
        # the same lr run twice (seeds): average its losses
        by_lr: dict[float, list[float]] = {}
        for i in members:
            by_lr.setdefault(float(lr[i]), []).append(float(loss[i]))
        grid = np.array(sorted(by_lr))
        mean = np.array([np.mean(by_lr[v]) for v in grid])
        best = int(np.argmin(mean))
        best_lr = float(grid[best])
        if best in (0, len(grid) - 1) and len(grid) > 1:
            notes.append(f"N={label:.3g}: best lr {grid[best]:.3g} is at the edge of the swept range")
        if refine == "parabola" and len(grid) >= 3:
            v = _parabola_vertex(np.log(grid), mean, best)
            if v is not None:
                best_lr = math.exp(v)
        sizes.append(float(np.exp(np.mean(np.log(n[members])))))
        lrs.append(best_lr)
        losses.append(float(mean[best]))
    return np.array(sizes), np.array(lrs), np.array(losses), notes


def fit_lr_rule(
    frame: pd.DataFrame,
    *,
    n_col: str = "N",
    lr_col: str = "lr",
    loss_col: str = "loss",
    refine: str = "none",
    bootstrap: int = 1000,
    level: float = 0.95,
    seed: int = 0,
    source: str = "<frame>",
) -> LRRule:
    """Fit lr_opt = c N^-k to a learning-rate x size sweep (see the module docstring)."""
    n = _column(frame, n_col, "--n_col", source)
    lr = _column(frame, lr_col, "--lr_col", source)
    loss = _column(frame, loss_col, "--loss_col", source)
    ok = np.isfinite(n) & np.isfinite(lr) & np.isfinite(loss) & (n > 0) & (lr > 0)
    if ok.sum() < 2:
        raise ConfigError(source, f"only {int(ok.sum())} usable runs (finite N, lr, loss)", "run the learning-rate sweep first")
    n, lr, loss = n[ok], lr[ok], loss[ok]
    sizes, lr_opt, loss_opt, notes = best_lr_per_size(n, lr, loss, refine=refine)
    if sizes.size < 2:
        raise ConfigError(source, f"runs cover {sizes.size} model size", "sweep the learning rate at two or more sizes")
    law = fit_power_law(sizes, lr_opt, what="lr-rule")
    intervals = None
    if bootstrap:
        check_level(level)
        if bootstrap < 2:
            raise ConfigError("--bootstrap", f"{bootstrap} resamples is too few", "use at least 2 (1000 is typical)")
        rng = np.random.default_rng(seed)
        ks, cs = [], []
        log_n, log_lr = np.log(sizes), np.log(lr_opt)
        for _ in range(bootstrap):
            idx = rng.integers(0, sizes.size, sizes.size)
            if np.unique(idx).size < 2:
                continue  # one size cannot fix a slope
            slope, intercept = np.polyfit(log_n[idx], log_lr[idx], 1)
            ks.append(-slope)
            cs.append(math.exp(intercept))
        q = [50 * (1 - level), 50 * (1 + level)]
        intervals = {"k": tuple(float(v) for v in np.percentile(ks, q)), "coef": tuple(float(v) for v in np.percentile(cs, q))}
        if sizes.size < 4:
            notes.append(f"only {sizes.size} sizes: the bootstrap interval is crude")
    return LRRule(
        coef=law.coef,
        k=-law.exponent,
        r2=law.r2,
        sizes=sizes,
        lr_opt=lr_opt,
        loss_opt=loss_opt,
        n_runs=int(ok.sum()),
        refine=refine,
        intervals=intervals,
        level=level,
        n_resamples=bootstrap,
        source=source,
        notes=notes,
    )


def write_rule_yaml(rule: LRRule, path: str | Path, n_params: float) -> Path:
    """Write a config fragment setting the peak lr for ``n_params``; the rule and a size table go in comments."""
    path = Path(path)
    lr = float(rule.lr(n_params))
    k_iv = ""
    if rule.intervals:
        lo, hi = rule.intervals["k"]
        k_iv = f" ({rule.level:.0%} bootstrap interval [{lo:.3f}, {hi:.3f}], {rule.n_resamples} resamples)"
    lines = [
        "# Learning-rate rule written by `lmlab sweep lr-rule`; regenerate, do not edit by hand.",
        f"#   lr_opt(N) = {rule.coef:.4g} * N^-{rule.k:.4f}{k_iv}, R^2 {rule.r2:.3f}",
        f"#   fitted on {rule.n_runs} runs, {rule.sizes.size} sizes, from {rule.source}",
        "#   best lr per size: " + ", ".join(f"N={n:.3g}: {v:.3g}" for n, v in zip(rule.sizes, rule.lr_opt)),
        "#   predicted lr_opt: " + ", ".join(f"N={n:.0e}: {rule.lr(n):.3g}" for n in (1e5, 1e6, 1e7, 1e8, 1e9)),
        f"# This fragment sets the lr for N = {n_params:.4g}:",
        "#   lmlab fit --config experiments/scaling/base.yaml --config <this file> --budget.params=" + f"{n_params:.4g}",
    ]
    for note in rule.notes:
        lines.append(f"# note: {note}")
    body = yaml.safe_dump({"model": {"init_args": {"settings": {"optimizer": {"lr": float(f"{lr:.4g}")}}}}}, sort_keys=False)
    return atomic_write_text(path, "\n".join(lines) + "\n" + body)
