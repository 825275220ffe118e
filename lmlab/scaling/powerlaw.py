"""Least-squares power laws y = k x^p fitted as straight lines in log-log space."""

from __future__ import annotations

from dataclasses import dataclass

import warnings

import numpy as np

from lmlab.scaling.results import require_points


@dataclass(frozen=True)
class PowerLaw:
    """y = coef * x^exponent, with the R^2 of the log-log regression it came from."""

    exponent: float
    coef: float
    r2: float
    n_points: int

    def __call__(self, x: np.ndarray | float) -> np.ndarray | float:
        return self.coef * np.power(x, self.exponent)


def fit_power_law(x: np.ndarray, y: np.ndarray, weights: np.ndarray | None = None, what: str = "power law") -> PowerLaw:
    """Fit log y = log coef + exponent * log x by (optionally weighted) least squares.

    Fitting in log space gives every point equal relative weight, which is what
    a power law spanning decades needs; a linear-space fit would be dominated by
    the largest values.

    Two distinct x values determine the line exactly: nothing is left to test
    the law against, so ``r2`` is NaN (not a perfect 1.0) and a warning says so.
    """
    x = np.asarray(x, dtype=float)
    y = np.asarray(y, dtype=float)
    distinct = int(np.unique(x).size)
    require_points(distinct, 2, what, "distinct x values")
    lx, ly = np.log(x), np.log(y)
    w = np.ones_like(lx) if weights is None else np.asarray(weights, dtype=float)
    sw = np.sqrt(w)
    design = np.stack([np.ones_like(lx), lx], axis=1) * sw[:, None]
    (intercept, slope), *_ = np.linalg.lstsq(design, ly * sw, rcond=None)
    pred = intercept + slope * lx
    ybar = np.average(ly, weights=w)
    ss_tot = float(np.sum(w * (ly - ybar) ** 2))
    r2 = 1.0 - float(np.sum(w * (ly - pred) ** 2)) / ss_tot if ss_tot > 0 else 1.0
    if distinct == 2:
        r2 = float("nan")
        warnings.warn(
            f"{what}: a power law through only 2 distinct points fits them exactly; its R^2 is undefined "
            "and the exponent is untested (add a third point)",
            stacklevel=2,
        )
    return PowerLaw(exponent=float(slope), coef=float(np.exp(intercept)), r2=r2, n_points=int(x.size))
