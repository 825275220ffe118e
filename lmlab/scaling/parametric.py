"""Chinchilla approach 3: fit L(N, D) = E + A/N^alpha + B/D^beta by Huber regression on log loss.

Follows Hoffmann et al. 2022 (section 3.3, appendix D.2) as replicated by
Besiroglu et al. 2024: minimise the *sum* of Huber(delta = 1e-3) of
``LSE(a - alpha log N, b - beta log D, e) - log L`` with L-BFGS from every
point of a grid of starts, and keep the best. The grid is run as one batched
L-BFGS (:mod:`lmlab.scaling.lbfgs`) with pruning of the starts that are still
far behind after a few iterations, and the best few survivors are polished
with scipy's L-BFGS-B at tight tolerances. :func:`fit_approach3_scipy_loop`
is the plain one-scipy-call-per-start reference it is checked against.
"""

from __future__ import annotations

import itertools
import math
import time
import warnings
from collections.abc import Sequence
from dataclasses import dataclass, field, replace
from typing import Any

import numpy as np
from scipy.optimize import minimize

from lmlab.errors import ConfigError
from lmlab.scaling.bootstrap import BootstrapResult, resample_counts
from lmlab.scaling.lbfgs import STATUS_NAMES, batched_lbfgs
from lmlab.scaling.law import ChinchillaLaw
from lmlab.scaling.objective import HUBER_DELTA, log_predict, objective_and_grad, scalar_objective
from lmlab.scaling.results import ScalingData, require_distinct, require_points

N_PARAMS = 5

#: scipy L-BFGS-B settings for the polish and the reference loop. scipy's default
#: ftol is relative to max(|f|, 1), far too loose for an objective of ~1e-3
#: (Besiroglu et al. traced Hoffmann et al.'s early stop to exactly this), so
#: both tolerances are tightened.
SCIPY_OPTIONS: dict[str, Any] = {"ftol": 1e-13, "gtol": 1e-9, "maxiter": 15000, "maxcor": 10}

#: Successive-halving schedule of the grid search: (iteration, fraction of starts kept).
#: On the Chinchilla points and on bootstrap resamples of them this finds the same
#: optimum as running all 5,400 starts to convergence, in a tenth of the work.
DEFAULT_PRUNE: tuple[tuple[int, float], ...] = ((5, 0.25), (15, 1 / 16), (30, 0.02))


@dataclass(frozen=True)
class Approach3Grid:
    """Initial values for the multi-start search; the product of the five axes is the set of starts."""

    alpha: tuple[float, ...] = (0.0, 0.5, 1.0, 1.5, 2.0)
    beta: tuple[float, ...] = (0.0, 0.5, 1.0, 1.5, 2.0)
    e: tuple[float, ...] = (-1.0, -0.5, 0.0, 0.5, 1.0, 1.5)
    a: tuple[float, ...] = (0.0, 5.0, 10.0, 15.0, 20.0, 25.0)
    b: tuple[float, ...] = (0.0, 5.0, 10.0, 15.0, 20.0, 25.0)

    def starts(self) -> np.ndarray:
        """All starts as an (S, 5) array in objective order (a, b, e, alpha, beta)."""
        rows = itertools.product(self.a, self.b, self.e, self.alpha, self.beta)
        return np.array(list(rows), dtype=float).reshape(-1, N_PARAMS)

    def __len__(self) -> int:
        return len(self.alpha) * len(self.beta) * len(self.e) * len(self.a) * len(self.b)


#: 5 * 5 * 6 * 6 * 6 = 5,400 starts (e up to 1.5).
GRID_5400 = Approach3Grid()
#: The 4,500-start grid of Hoffmann et al. as used by Besiroglu et al. (e in -1..1).
GRID_4500 = Approach3Grid(e=(-1.0, -0.5, 0.0, 0.5, 1.0))


@dataclass(frozen=True)
class Approach3Fit:
    """Result of an approach-3 fit: the law, how well the optimiser converged, and the residuals."""

    law: ChinchillaLaw
    theta: np.ndarray
    objective: float
    grad_max: float
    converged: bool
    message: str
    n_points: int
    n_starts: int
    delta: float
    residuals: np.ndarray
    data: ScalingData = field(repr=False)
    seconds: float = 0.0
    bootstrap: BootstrapResult | None = field(default=None, repr=False)
    level: float = 0.95

    @property
    def intervals(self) -> dict[str, tuple[float, float]] | None:
        """Bootstrap percentile intervals at ``level``, or None when not bootstrapped."""
        return None if self.bootstrap is None else self.bootstrap.intervals(self.level)

    def to_dict(self) -> dict[str, Any]:
        """JSON-ready summary: E, A, B, alpha, beta, a, b, G, n_points, diagnostics and intervals."""
        out: dict[str, Any] = {"method": "approach3", **self.law.as_dict()}
        out.update(
            n_points=self.n_points,
            n_starts=self.n_starts,
            objective=self.objective,
            grad_max=self.grad_max,
            converged=self.converged,
            huber_delta=self.delta,
            rmse_log_loss=float(np.sqrt(np.mean(self.residuals**2))),
        )
        if self.bootstrap is not None:
            out["intervals"] = {k: [lo, hi] for k, (lo, hi) in self.intervals.items()}
            out["level"] = self.level
            out["n_resamples"] = self.bootstrap.n_resamples
            out["resampled"] = self.bootstrap.resampled
        return out


def law_from_theta(theta: np.ndarray) -> ChinchillaLaw:
    """Unpack (a, b, e, alpha, beta) into a :class:`ChinchillaLaw`."""
    a, b, e, alpha, beta = (float(v) for v in theta)
    with np.errstate(over="ignore"):  # a runaway bootstrap refit gives A or B = inf: an unbounded interval, not an error
        return ChinchillaLaw(E=float(np.exp(e)), A=float(np.exp(a)), B=float(np.exp(b)), alpha=alpha, beta=beta)


def theta_from_law(law: ChinchillaLaw) -> np.ndarray:
    """Pack a :class:`ChinchillaLaw` into (a, b, e, alpha, beta)."""
    return np.array([np.log(law.A), np.log(law.B), np.log(law.E), law.alpha, law.beta])


def _logs(data: ScalingData) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    require_points(len(data), N_PARAMS, "approach3")
    return np.log(data.N), np.log(data.D), np.log(data.loss)


def _polish(theta0: np.ndarray, logs: tuple[np.ndarray, ...], delta: float) -> tuple[np.ndarray, float, bool, str]:
    res = minimize(scalar_objective, theta0, args=(*logs, None, delta), jac=True, method="L-BFGS-B", options=SCIPY_OPTIONS)
    return np.asarray(res.x, dtype=float), float(res.fun), bool(res.success), str(res.message)


def _finish(
    data: ScalingData,
    theta: np.ndarray,
    logs: tuple[np.ndarray, ...],
    delta: float,
    n_starts: int,
    message: str,
    seconds: float,
    gtol: float,
) -> Approach3Fit:
    f, g = objective_and_grad(theta[None, :], *logs, None, delta)
    grad_max = float(np.abs(g).max())
    # The gradient test is what guards against Hoffmann et al.'s early-termination problem.
    converged = grad_max <= gtol
    residuals = log_predict(theta, logs[0], logs[1])[0] - logs[2]
    return Approach3Fit(
        law=law_from_theta(theta),
        theta=theta,
        objective=float(f[0]),
        grad_max=grad_max,
        converged=converged,
        message=message,
        n_points=len(data),
        n_starts=n_starts,
        delta=delta,
        residuals=residuals,
        data=data,
        seconds=seconds,
    )


def check_identifiable(data: ScalingData) -> None:
    """Refuse data that cannot identify E, A, alpha, B and beta; warn when it fits them exactly.

    The N and D terms are told apart only when log N and log D vary
    independently: runs at one model size, one token count, or one
    tokens-per-parameter ratio (D proportional to a power of N) cannot.
    """
    n_pairs = int(np.unique(np.stack([data.N, data.D], axis=1), axis=0).shape[0])
    require_points(n_pairs, 5, "approach3")  # repeated (N, D) runs add no information
    fix = "add runs that vary model size and token count independently (several sizes per compute budget)"
    require_distinct(data.N, 2, "approach3", "the model sizes", fix)
    require_distinct(data.D, 2, "approach3", "the token counts", fix)
    design = np.stack([np.log(data.N), np.log(data.D)], axis=1)
    design = design - design.mean(axis=0)
    sv = np.linalg.svd(design, compute_uv=False)
    if sv[-1] <= 1e-9 * sv[0]:
        raise ConfigError(
            "approach3",
            "log D is a linear function of log N in every run (one tokens-per-parameter rule), "
            "so the N and D terms cannot be told apart",
            fix,
        )
    if sv[-1] < 1e-3 * sv[0]:
        warnings.warn(
            "approach3: log N and log D are nearly collinear in these runs; alpha and beta are poorly identified",
            stacklevel=3,
        )
    if n_pairs == 5:
        warnings.warn("approach3: 5 runs for 5 parameters fit exactly; nothing tests the law (add runs)", stacklevel=3)


def fit_approach3(
    data: ScalingData,
    *,
    grid: Approach3Grid | np.ndarray = GRID_5400,
    delta: float = HUBER_DELTA,
    prune: Sequence[tuple[int, float]] | None = DEFAULT_PRUNE,
    keep_min: int = 64,
    n_polish: int = 5,
    max_iter: int = 1000,
    converged_gtol: float = 1e-6,
) -> Approach3Fit:
    """Fit L(N, D) = E + A/N^alpha + B/D^beta to ``data`` from every start of ``grid``.

    All starts run as one batched L-BFGS. ``prune`` is a schedule of
    (iteration, fraction): past that iteration only the best ``fraction`` of the
    starts (but at least ``keep_min``) continue; ``prune=None`` runs every start
    to the end. The ``n_polish`` best distinct end points are refined with scipy
    L-BFGS-B and the lowest objective wins (``n_polish=0``: no polish).
    ``converged`` reports whether the final max-abs gradient is below
    ``converged_gtol``.
    """
    check_identifiable(data)
    t0 = time.perf_counter()
    logs = _logs(data)
    starts = grid.starts() if isinstance(grid, Approach3Grid) else np.atleast_2d(np.asarray(grid, dtype=float))

    def fun(x: np.ndarray, rows: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        return objective_and_grad(x, *logs, None, delta)

    schedule = [(it, max(keep_min, math.ceil(frac * len(starts)))) for it, frac in (prune or ())]
    batch = batched_lbfgs(fun, starts, max_iter=max_iter, prune=schedule)
    order = np.argsort(np.where(np.isfinite(batch.f), batch.f, np.inf), kind="stable")
    # Many starts end in the same basin; polishing near-duplicates would be wasted work.
    candidates: list[np.ndarray] = []
    for i in order:
        if not np.isfinite(batch.f[i]):
            break
        if all(np.max(np.abs(batch.x[i] - c)) > 1e-3 for c in candidates):
            candidates.append(batch.x[i])
        if len(candidates) >= max(1, n_polish):
            break
    if not candidates:
        raise ValueError("approach3: no start produced a finite objective")
    best_theta, best_f, message = candidates[0], np.inf, STATUS_NAMES[int(batch.status[order[0]])]
    for cand in candidates[:n_polish]:
        theta, f, _, msg = _polish(cand, logs, delta)
        if f < best_f:
            best_theta, best_f, message = theta, f, msg
    return _finish(data, best_theta, logs, delta, len(starts), message, time.perf_counter() - t0, converged_gtol)


def fit_approach3_scipy_loop(
    data: ScalingData,
    *,
    grid: Approach3Grid | np.ndarray = GRID_5400,
    delta: float = HUBER_DELTA,
    converged_gtol: float = 1e-6,
) -> Approach3Fit:
    """Reference implementation: one scipy L-BFGS-B run per start, keep the best. Slow; for checking."""
    check_identifiable(data)
    t0 = time.perf_counter()
    logs = _logs(data)
    starts = grid.starts() if isinstance(grid, Approach3Grid) else np.atleast_2d(np.asarray(grid, dtype=float))
    best_theta, best_f, best_msg = starts[0], np.inf, ""
    for start in starts:
        theta, f, _, msg = _polish(start, logs, delta)
        if np.isfinite(f) and f < best_f:
            best_theta, best_f, best_msg = theta, f, msg
    return _finish(data, best_theta, logs, delta, len(starts), best_msg, time.perf_counter() - t0, converged_gtol)


def bootstrap_approach3(
    fit: Approach3Fit,
    *,
    n_resamples: int = 1000,
    seed: int | None = 0,
    n_jitter: int = 1,
    jitter_scale: tuple[float, ...] = (1.0, 1.0, 0.2, 0.05, 0.05),
    max_iter: int = 1000,
) -> BootstrapResult:
    """Bootstrap an approach-3 fit: resample the points with replacement ``n_resamples`` times and refit.

    Rather than rerunning the full grid per resample, each resample starts from
    the full-data optimum plus ``n_jitter`` Gaussian perturbations of it (scales
    per (a, b, e, alpha, beta) in ``jitter_scale``): a resample's optimum is near
    the full-data one, and the perturbed start is a guard against a neighbouring
    basin (on the Chinchilla points it improved 3 of 1,000 resamples, by 2e-6
    relative, so one is plenty). A resample is a vector of integer
    multiplicities, so all resamples x starts are solved as one batched L-BFGS
    with per-row weights.
    """
    if n_resamples < 2:
        raise ConfigError("--bootstrap", f"{n_resamples} resamples is too few", "use at least 2 (1000 is typical)")
    data, delta = fit.data, fit.delta
    logs = _logs(data)
    rng = np.random.default_rng(seed)
    counts = resample_counts(rng, len(data), n_resamples)
    per = 1 + n_jitter
    jitter = rng.normal(size=(n_resamples, n_jitter, N_PARAMS)) * np.asarray(jitter_scale)
    starts = np.concatenate([np.broadcast_to(fit.theta, (n_resamples, 1, N_PARAMS)), fit.theta + jitter], axis=1)
    starts = starts.reshape(-1, N_PARAMS)

    def fun(x: np.ndarray, rows: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        return objective_and_grad(x, *logs, counts[rows // per], delta)

    batch = batched_lbfgs(fun, starts, max_iter=max_iter)
    f = np.where(np.isfinite(batch.f), batch.f, np.inf).reshape(n_resamples, per)
    best = np.argmin(f, axis=1)
    thetas = batch.x.reshape(n_resamples, per, N_PARAMS)[np.arange(n_resamples), best]
    ok = np.isfinite(f[np.arange(n_resamples), best])
    laws = [law_from_theta(t).as_dict() for t in thetas[ok]]
    names = ("E", "A", "B", "alpha", "beta", "a", "b", "G")
    samples = {k: np.array([d[k] for d in laws]) for k in names}
    return BootstrapResult(
        samples=samples,
        n_resamples=n_resamples,
        n_failed=int((~ok).sum()),
        seed=seed,
        resampled="all runs, with replacement; L(N, D) refitted from the full-data optimum",
    )


def with_bootstrap(fit: Approach3Fit, boot: BootstrapResult, level: float = 0.95) -> Approach3Fit:
    """Copy of ``fit`` carrying ``boot`` so that ``intervals`` and ``to_dict`` report it at ``level``."""
    return replace(fit, bootstrap=boot, level=level)
