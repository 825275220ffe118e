"""Kaplan et al. 2020 single-variable power laws L(N) = (N_c/N)^alpha_N and L(D) = (D_c/D)^alpha_D.

Each law describes loss when the *other* resource is not the bottleneck, so
each is fitted to the subset of runs closest to that regime:

* L(N) uses, for every model size, its lowest-loss run: the data-rich end,
  normally the run with the most tokens.
* L(D) uses, for every token count, the run of the largest model: the
  capacity-rich end.

Sizes (token counts) within ``rel_tol`` of each other are treated as one. Both
laws are straight lines in log-log space, fitted by least squares:
log L = alpha_N log N_c - alpha_N log N.

The selection cannot tell a capacity-limited run from a data-limited one: a
token count reached only by small models still contributes its (small-model)
run to L(D). ``n_range`` / ``d_range`` restrict each law to the regime where
the data design makes it valid (e.g. only D well below what the largest model
can absorb).
"""

from __future__ import annotations

import warnings
from dataclasses import dataclass, field, replace
from typing import Any

import numpy as np

from lmlab.errors import ConfigError
from lmlab.scaling.bootstrap import BootstrapResult
from lmlab.scaling.powerlaw import PowerLaw, fit_power_law
from lmlab.scaling.results import ScalingData, group_near_equal, require_points


@dataclass(frozen=True)
class KaplanFit:
    """Fitted L(N) and L(D) with the runs each was fitted on."""

    alpha_N: float
    N_c: float
    alpha_D: float
    D_c: float
    n_law: PowerLaw
    d_law: PowerLaw
    n_rows: np.ndarray
    d_rows: np.ndarray
    n_points: int
    data: ScalingData = field(repr=False)
    bootstrap: BootstrapResult | None = field(default=None, repr=False)
    level: float = 0.95

    def loss_n(self, N: np.ndarray | float) -> np.ndarray | float:
        """L(N) = (N_c / N)^alpha_N."""
        return np.power(self.N_c / np.asarray(N, dtype=float), self.alpha_N)

    def loss_d(self, D: np.ndarray | float) -> np.ndarray | float:
        """L(D) = (D_c / D)^alpha_D."""
        return np.power(self.D_c / np.asarray(D, dtype=float), self.alpha_D)

    @property
    def intervals(self) -> dict[str, tuple[float, float]] | None:
        """Bootstrap percentile intervals at ``level``, or None when not bootstrapped."""
        return None if self.bootstrap is None else self.bootstrap.intervals(self.level)

    def to_dict(self) -> dict[str, Any]:
        """JSON-ready summary: alpha_N, N_c, alpha_D, D_c, fit quality, point counts, intervals."""
        out: dict[str, Any] = {
            "method": "kaplan",
            "alpha_N": self.alpha_N,
            "N_c": self.N_c,
            "alpha_D": self.alpha_D,
            "D_c": self.D_c,
            "r2_N": self.n_law.r2,
            "r2_D": self.d_law.r2,
            "n_points": self.n_points,
            "n_points_N": int(self.n_rows.size),
            "n_points_D": int(self.d_rows.size),
        }
        if self.bootstrap is not None:
            out["intervals"] = {k: [lo, hi] for k, (lo, hi) in self.intervals.items()}
            out["level"] = self.level
            out["n_resamples"] = self.bootstrap.n_resamples
            out["resampled"] = self.bootstrap.resampled
        return out


def _pick(groups: np.ndarray, score: np.ndarray) -> np.ndarray:
    """Position of the lowest ``score`` within every group."""
    picked = []
    for label in np.unique(groups):
        members = np.flatnonzero(groups == label)
        picked.append(int(members[np.argmin(score[members])]))
    return np.asarray(picked, dtype=int)


def _as_kaplan(law: PowerLaw) -> tuple[float, float]:
    # L = k x^p with p = -alpha and k = X_c^alpha, so X_c = k^(1/alpha).
    alpha = -law.exponent
    x_c = float(np.exp(np.log(law.coef) / alpha)) if alpha != 0 else float("inf")
    return alpha, x_c


def _in_range(values: np.ndarray, bounds: tuple[float | None, float | None] | None) -> np.ndarray:
    if bounds is None:
        return np.ones(values.shape, dtype=bool)
    lo, hi = bounds
    return (values >= (lo if lo is not None else -np.inf)) & (values <= (hi if hi is not None else np.inf))


def _laws(n: np.ndarray, ln: np.ndarray, d: np.ndarray, ld: np.ndarray) -> tuple[PowerLaw, PowerLaw]:
    return fit_power_law(n, ln, what="kaplan"), fit_power_law(d, ld, what="kaplan")


def fit_kaplan(
    data: ScalingData,
    *,
    rel_tol: float = 1e-6,
    n_range: tuple[float | None, float | None] | None = None,
    d_range: tuple[float | None, float | None] | None = None,
) -> KaplanFit:
    """Fit Kaplan's L(N) and L(D); see the module docstring for which runs each law uses.

    ``n_range`` = (lo, hi) keeps only sizes in [lo, hi] for L(N); ``d_range`` likewise
    token counts for L(D); either bound may be None.
    """
    require_points(len(data), 2, "kaplan")
    n_idx = _pick(group_near_equal(data.N, rel_tol), data.loss)
    n_idx = n_idx[_in_range(data.N[n_idx], n_range)]
    d_idx = _pick(group_near_equal(data.D, rel_tol), -data.N)
    d_idx = d_idx[_in_range(data.D[d_idx], d_range)]
    require_points(n_idx.size, 2, "kaplan", "distinct model sizes")
    require_points(d_idx.size, 2, "kaplan", "distinct token counts")
    n_law, d_law = _laws(data.N[n_idx], data.loss[n_idx], data.D[d_idx], data.loss[d_idx])
    alpha_n, n_c = _as_kaplan(n_law)
    alpha_d, d_c = _as_kaplan(d_law)
    return KaplanFit(
        alpha_N=alpha_n,
        N_c=n_c,
        alpha_D=alpha_d,
        D_c=d_c,
        n_law=n_law,
        d_law=d_law,
        n_rows=data.rows[n_idx],
        d_rows=data.rows[d_idx],
        n_points=len(data),
        data=data,
    )


def bootstrap_kaplan(
    fit: KaplanFit,
    *,
    n_resamples: int = 1000,
    seed: int | None = 0,
    level: float = 0.95,
) -> KaplanFit:
    """Bootstrap alpha_N, N_c, alpha_D and D_c; returns a copy carrying the intervals.

    The runs each law was fitted on are resampled (separately, with
    replacement). Resampling all runs and redoing the selection would let a
    resample that misses a size's longest run pick a token-limited run instead,
    which measures the selection's fragility rather than the fit's uncertainty.
    """
    if n_resamples < 2:
        raise ConfigError("--bootstrap", f"{n_resamples} resamples is too few", "use at least 2 (1000 is typical)")
    data = fit.data
    pos = {int(r): i for i, r in enumerate(data.rows)}
    n_idx = np.array([pos[int(r)] for r in fit.n_rows])
    d_idx = np.array([pos[int(r)] for r in fit.d_rows])
    rng = np.random.default_rng(seed)
    samples: dict[str, list[float]] = {"alpha_N": [], "N_c": [], "alpha_D": [], "D_c": []}
    failed = 0
    for _ in range(n_resamples):
        ni = rng.choice(n_idx, size=n_idx.size, replace=True)
        di = rng.choice(d_idx, size=d_idx.size, replace=True)
        try:
            with warnings.catch_warnings():
                warnings.simplefilter("ignore")  # a two-size resample's warning is about the resample, not the fit
                n_law, d_law = _laws(data.N[ni], data.loss[ni], data.D[di], data.loss[di])
        except ConfigError:  # a resample with a single distinct size cannot be fitted
            failed += 1
            continue
        for prefix, law in (("N", n_law), ("D", d_law)):
            alpha, x_c = _as_kaplan(law)
            samples[f"alpha_{prefix}"].append(alpha)
            samples[f"{prefix}_c"].append(x_c)
    if n_resamples - failed < max(2, n_resamples // 2):
        raise ConfigError("--bootstrap", f"{failed} of {n_resamples} resamples could not be fitted", "add more runs")
    boot = BootstrapResult(
        samples={k: np.asarray(v) for k, v in samples.items()},
        n_resamples=n_resamples,
        n_failed=failed,
        seed=seed,
        resampled="the runs each law was fitted on (L(N) and L(D) separately), with replacement; both laws refitted",
    )
    return replace(fit, bootstrap=boot, level=level)
