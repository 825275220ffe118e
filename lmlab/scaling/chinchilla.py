"""Hoffmann et al. 2022 (Chinchilla) compute-optimal scaling: approaches 1, 2 and 3.

* Approach 1 (:func:`fit_approach1`): the minimum-loss envelope over compute.
  Runs are binned by training FLOPs (log-spaced bins), the lowest-loss run of
  each bin is taken, and bins that do not improve on every cheaper bin are
  dropped so that only the frontier remains; then N_opt ~ C^a and D_opt ~ C^b
  are fitted in log space. The paper takes the envelope over whole training
  curves; with final losses only, the envelope is over runs.
* Approach 2 (:func:`fit_approach2`): per IsoFLOP budget the minimum of loss
  against log N is N_opt(C) and D_opt = C / (6 N_opt); then the same two power
  laws. The default finds the minimum as Porian et al. 2024 do (an Akima spline
  through the budget's points, minimised on a fine grid), which reproduces their
  published exponents; ``curve="parabola"`` is Hoffmann et al.'s quadratic in
  log N (over all of a budget's points, or a ``window`` around its best run).
* Approach 3 (:func:`fit_approach3`, in :mod:`lmlab.scaling.parametric`): the
  parametric law L(N, D) = E + A/N^alpha + B/D^beta.
"""

from __future__ import annotations

import warnings
from dataclasses import dataclass, field, replace
from typing import Any

import numpy as np

from lmlab.scaling.bootstrap import BootstrapResult, bootstrap_loop
from lmlab.scaling.parametric import (  # noqa: F401  (re-exported: approach 3 lives beside 1 and 2)
    GRID_4500,
    GRID_5400,
    Approach3Fit,
    Approach3Grid,
    bootstrap_approach3,
    fit_approach3,
    fit_approach3_scipy_loop,
    with_bootstrap,
)
from lmlab.scaling.powerlaw import PowerLaw, fit_power_law
from lmlab.scaling.results import FLOPS_PER_PARAM_TOKEN, ScalingData, budgets_for, require_distinct, require_points

__all__ = [
    "GRID_4500",
    "GRID_5400",
    "AllocationFit",
    "Approach3Fit",
    "Approach3Grid",
    "AkimaCurve",
    "Parabola",
    "bootstrap_allocation",
    "bootstrap_approach3",
    "envelope",
    "fit_approach1",
    "fit_approach2",
    "fit_approach3",
    "fit_approach3_scipy_loop",
    "with_bootstrap",
]


@dataclass(frozen=True)
class AllocationFit:
    """N_opt ~ C^a and D_opt ~ C^b fitted to compute-optimal points (approaches 1 and 2)."""

    method: str
    n_law: PowerLaw
    d_law: PowerLaw
    C: np.ndarray
    N_opt: np.ndarray
    D_opt: np.ndarray
    loss_opt: np.ndarray
    n_points: int
    data: ScalingData = field(repr=False)
    dropped: list[tuple[float, str]] = field(default_factory=list)
    details: dict[str, Any] = field(default_factory=dict, repr=False)
    bootstrap: BootstrapResult | None = field(default=None, repr=False)
    level: float = 0.95

    @property
    def a(self) -> float:
        """Exponent of N_opt ~ C^a."""
        return self.n_law.exponent

    @property
    def b(self) -> float:
        """Exponent of D_opt ~ C^b."""
        return self.d_law.exponent

    @property
    def intervals(self) -> dict[str, tuple[float, float]] | None:
        """Bootstrap percentile intervals for a and b at ``level``, or None when not bootstrapped."""
        return None if self.bootstrap is None else self.bootstrap.intervals(self.level)

    def optimal(self, C: np.ndarray | float) -> tuple[np.ndarray | float, np.ndarray | float]:
        """(N_opt, D_opt) predicted by the two fitted power laws."""
        return self.n_law(C), self.d_law(C)

    def to_dict(self) -> dict[str, Any]:
        """JSON-ready summary: a, b, the power-law coefficients and fit quality, and intervals."""
        out: dict[str, Any] = {
            "method": self.method,
            "a": self.a,
            "b": self.b,
            "N_coef": self.n_law.coef,
            "D_coef": self.d_law.coef,
            "r2_N": self.n_law.r2,
            "r2_D": self.d_law.r2,
            "n_points": self.n_points,
            "n_optima": int(self.C.size),
            "optima": [
                {"C": float(c), "N_opt": float(n), "D_opt": float(d), "loss": float(l)}
                for c, n, d, l in zip(self.C, self.N_opt, self.D_opt, self.loss_opt)
            ],
        }
        if self.dropped:
            out["dropped"] = [{"C": float(c), "reason": r} for c, r in self.dropped]
        if self.bootstrap is not None:
            out["intervals"] = {k: [lo, hi] for k, (lo, hi) in self.intervals.items()}
            out["level"] = self.level
            out["n_resamples"] = self.bootstrap.n_resamples
            out["resampled"] = self.bootstrap.resampled
        return out


def _allocation_laws(method: str, c: np.ndarray, n_opt: np.ndarray, d_opt: np.ndarray) -> tuple[PowerLaw, PowerLaw]:
    require_points(int(np.unique(c).size), 2, method, "compute-optimal points")
    return fit_power_law(c, n_opt, what=method), fit_power_law(c, d_opt, what=method)


def envelope(data: ScalingData, n_bins: int = 20) -> np.ndarray:
    """Positions of the runs on the minimum-loss envelope over compute (approach 1's frontier).

    Compute is split into ``n_bins`` log-spaced bins and the lowest-loss run of
    each non-empty bin is taken. A bin's best run that is no better than a
    cheaper bin's is not on the frontier (it is a badly-sized model that happens
    to be alone in its bin), so it is dropped.
    """
    logc = np.log(data.C)
    edges = np.linspace(logc.min(), logc.max(), n_bins + 1)
    which = np.clip(np.searchsorted(edges, logc, side="right") - 1, 0, n_bins - 1)
    picked: list[int] = []
    best_so_far = np.inf
    for k in range(n_bins):
        members = np.flatnonzero(which == k)
        if members.size == 0:
            continue
        i = int(members[np.argmin(data.loss[members])])
        if data.loss[i] < best_so_far:
            picked.append(i)
            best_so_far = data.loss[i]
    return np.asarray(picked, dtype=int)


def fit_approach1(data: ScalingData, *, n_bins: int = 20) -> AllocationFit:
    """Approach 1: fit N_opt ~ C^a and D_opt ~ C^b to the minimum-loss envelope (see :func:`envelope`)."""
    require_points(len(data), 2, "approach1")
    idx = envelope(data, n_bins)
    c, n, d = data.C[idx], data.N[idx], data.D[idx]
    # One model size along the frontier would give a = 0 (and b = 1) exactly, a finding of the design, not the data.
    fix = "add runs at other model sizes (and token counts) around each compute budget"
    require_distinct(n, 2, "approach1", f"the model sizes of the {idx.size} run(s) on the loss envelope", fix)
    require_distinct(d, 2, "approach1", f"the token counts of the {idx.size} run(s) on the loss envelope", fix)
    n_law, d_law = _allocation_laws("approach1", c, n, d)
    return AllocationFit(
        method="approach1",
        n_law=n_law,
        d_law=d_law,
        C=c,
        N_opt=n,
        D_opt=d,
        loss_opt=data.loss[idx],
        n_points=len(data),
        data=data,
        details={"n_bins": n_bins, "envelope_rows": data.rows[idx]},
    )


@dataclass(frozen=True)
class Parabola:
    """loss = c0 + c1 x + c2 x^2 with x = log N (natural log) for one IsoFLOP budget."""

    budget: float
    coef: tuple[float, float, float]
    x_range: tuple[float, float]
    n_points: int

    @property
    def vertex_log_n(self) -> float:
        """log N at the minimum of the parabola."""
        return -self.coef[1] / (2.0 * self.coef[2])

    def __call__(self, log_n: np.ndarray | float) -> np.ndarray | float:
        c0, c1, c2 = self.coef
        return c0 + c1 * log_n + c2 * np.square(log_n)


def _fit_parabola(budget: float, x: np.ndarray, y: np.ndarray) -> Parabola:
    # Centring x keeps the normal equations well-conditioned (log N ~ 20, so x^2 ~ 400).
    xm = float(x.mean())
    q2, q1, q0 = np.polyfit(x - xm, y, 2)
    c2 = q2
    c1 = q1 - 2.0 * q2 * xm
    c0 = q0 - q1 * xm + q2 * xm * xm
    return Parabola(budget=budget, coef=(float(c0), float(c1), float(c2)), x_range=(float(x.min()), float(x.max())), n_points=int(x.size))


APPROACH2_CURVES = ("akima", "parabola")


@dataclass(frozen=True)
class AkimaCurve:
    """Akima spline of loss against x = log N (natural log) for one IsoFLOP budget, and its minimum."""

    budget: float
    x: tuple[float, ...]
    y: tuple[float, ...]
    vertex_log_n: float
    x_range: tuple[float, float]
    n_points: int

    def __call__(self, log_n: np.ndarray | float) -> np.ndarray | float:
        from scipy.interpolate import Akima1DInterpolator

        return Akima1DInterpolator(np.asarray(self.x), np.asarray(self.y))(log_n)


# Grid points per curve when minimising the spline: with the ~0.3-decade spacing of
# IsoFLOP sizes this resolves log N to well below the bootstrap scatter.
_AKIMA_GRID = 2001


def _fit_akima(budget: float, x: np.ndarray, y: np.ndarray) -> AkimaCurve | str:
    from scipy.interpolate import Akima1DInterpolator

    # Repeated sizes (bootstrap resamples, duplicate runs) become one knot at their mean loss.
    ux, inv = np.unique(x, return_inverse=True)
    uy = np.bincount(inv, weights=y) / np.bincount(inv)
    spline = Akima1DInterpolator(ux, uy)
    grid = np.linspace(ux[0], ux[-1], _AKIMA_GRID)
    k = int(np.argmin(spline(grid)))
    if k == 0 or k == grid.size - 1:
        return "minimum at the smallest or largest sampled size (not an interior minimum)"
    return AkimaCurve(
        budget=budget,
        x=tuple(float(v) for v in ux),
        y=tuple(float(v) for v in uy),
        vertex_log_n=float(grid[k]),
        x_range=(float(ux[0]), float(ux[-1])),
        n_points=int(x.size),
    )


def fit_approach2(
    data: ScalingData,
    *,
    rel_tol: float = 0.1,
    curve: str = "akima",
    window: float | None = None,
    min_points: int = 3,
) -> AllocationFit:
    """Approach 2: per IsoFLOP budget the loss-minimising N_opt, then N_opt ~ C^a and D_opt ~ C^b.

    Budgets come from the table's ``budget`` column when present, else runs
    whose compute is within ``rel_tol`` of each other are grouped.

    ``curve`` is how a budget's minimum is found:

    * ``"akima"`` (default): an Akima spline through the budget's (log N, loss)
      points, minimised on a fine grid. This is Porian et al. 2024's per-budget
      step; followed by the unweighted log-log fit it gives a = 0.497 on their
      tuned RefinedWeb IsoFLOPs (published 0.497, interval 0.491-0.505). Their
      published fit additionally weights budgets by a seed-noise bootstrap of
      each N_opt, which needs repeated runs the table does not have.
    * ``"parabola"``: Hoffmann et al.'s quadratic in log N; its vertex is N_opt.
      Over all of a budget's points it is biased when the curve is asymmetric
      (a = 0.514 on the same data).

    ``window`` (decades of N, either curve) keeps only the points within that
    distance of the budget's lowest-loss run before fitting; ``None`` uses all
    of them. A budget is dropped (and reported) when it has fewer than
    ``min_points`` distinct sizes, has no interior minimum (a parabola that
    opens downwards, a spline minimum at an end) or its vertex lies outside the
    sizes it sampled (an extrapolated minimum is not measured).
    """
    if curve not in APPROACH2_CURVES:
        from lmlab.errors import ConfigError

        raise ConfigError("--curve", f"unknown approach-2 curve {curve!r}", f"use one of: {', '.join(APPROACH2_CURVES)}")
    if window is not None and not window > 0:
        from lmlab.errors import ConfigError

        raise ConfigError("--window", f"must be > 0 decades, got {window}", "use e.g. 0.3, or leave it unset for all points")
    require_points(len(data), 3, "approach2")
    budgets = budgets_for(data, rel_tol)
    curves: list[Parabola | AkimaCurve] = []
    dropped: list[tuple[float, str]] = []
    for budget in np.unique(budgets):
        members = np.flatnonzero(budgets == budget)
        x = np.log(data.N[members])
        y = data.loss[members]
        if window is not None:
            near = np.abs(x - x[np.argmin(y)]) <= window * np.log(10.0)
            x, y = x[near], y[near]
        if np.unique(x).size < min_points:
            dropped.append((float(budget), f"only {np.unique(x).size} distinct model sizes (need {min_points})"))
            continue
        if curve == "akima":
            fitted = _fit_akima(float(budget), x, y)
            if isinstance(fitted, str):
                dropped.append((float(budget), fitted))
                continue
            curves.append(fitted)
            continue
        par = _fit_parabola(float(budget), x, y)
        if par.coef[2] <= 0:
            dropped.append((float(budget), "parabola opens downwards (no minimum)"))
            continue
        if not par.x_range[0] <= par.vertex_log_n <= par.x_range[1]:
            dropped.append((float(budget), "vertex outside the sampled model sizes"))
            continue
        curves.append(par)
    if dropped:
        shown = "; ".join(f"C={c:.3g}: {r}" for c, r in dropped[:5])
        more = f" (+{len(dropped) - 5} more)" if len(dropped) > 5 else ""
        warnings.warn(f"approach2: dropped {len(dropped)} budget(s): {shown}{more}", stacklevel=2)
    require_points(len(curves), 2, "approach2", "IsoFLOP budgets with an interior minimum")
    c = np.array([p.budget for p in curves])
    n_opt = np.exp([p.vertex_log_n for p in curves])
    d_opt = c / (FLOPS_PER_PARAM_TOKEN * n_opt)
    loss_opt = np.array([float(p(p.vertex_log_n)) for p in curves])
    n_law, d_law = _allocation_laws("approach2", c, n_opt, d_opt)
    return AllocationFit(
        method="approach2",
        n_law=n_law,
        d_law=d_law,
        C=c,
        N_opt=n_opt,
        D_opt=d_opt,
        loss_opt=loss_opt,
        n_points=len(data),
        data=data,
        dropped=dropped,
        # "parabolas" holds every budget's fitted curve (spline or parabola), as plots expect.
        details={"parabolas": curves, "curve": curve, "budgets": budgets, "rel_tol": rel_tol, "window": window},
    )


def bootstrap_allocation(
    fit: AllocationFit,
    *,
    n_resamples: int = 1000,
    seed: int | None = 0,
    level: float = 0.95,
) -> AllocationFit:
    """Bootstrap a and b of an approach-1 or approach-2 fit; returns a copy carrying the intervals.

    Approach 2 resamples runs with replacement within each IsoFLOP budget (every
    resample keeps the same budgets and number of runs per budget) and refits
    every curve and both power laws; approach 1 resamples all runs with
    replacement and redoes the envelope. The result's ``bootstrap.resampled``
    says which.
    """
    data = fit.data
    if fit.method == "approach2":
        opts = fit.details
        groups = opts["budgets"]
        # Label the runs once so that resamples keep the full-data budgets.
        data = replace(data, budget=groups)

        def refit(sample: ScalingData) -> dict[str, float]:
            f = fit_approach2(sample, curve=opts["curve"], window=opts["window"])
            return {"a": f.a, "b": f.b}

    else:
        groups = None
        n_bins = fit.details["n_bins"]

        def refit(sample: ScalingData) -> dict[str, float]:
            f = fit_approach1(sample, n_bins=n_bins)
            return {"a": f.a, "b": f.b}

    resampled = (
        "runs, with replacement within each IsoFLOP budget; every budget's curve and both power laws refitted"
        if groups is not None
        else "runs, with replacement over all runs; envelope and both power laws refitted"
    )
    boot = bootstrap_loop(data, refit, n_resamples=n_resamples, seed=seed, groups=groups, resampled=resampled)
    return replace(fit, bootstrap=boot, level=level)
