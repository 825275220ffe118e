"""Percentile bootstrap: resample runs with replacement, refit, and report intervals per parameter."""

from __future__ import annotations

import warnings
from collections.abc import Callable
from dataclasses import dataclass

import numpy as np

from lmlab.errors import ConfigError
from lmlab.scaling.results import ScalingData


@dataclass(frozen=True)
class BootstrapResult:
    """Refitted parameter values, one per successful resample, keyed by parameter name.

    ``resampled`` says what each resample drew (which rows, with replacement
    within which groups) and what was refitted; it is printed with the intervals.
    """

    samples: dict[str, np.ndarray]
    n_resamples: int
    n_failed: int
    seed: int | None
    resampled: str = "runs, with replacement"

    def interval(self, name: str, level: float = 0.95) -> tuple[float, float]:
        """Central percentile interval of ``name`` at confidence ``level`` (0.95 -> 2.5th..97.5th)."""
        check_level(level)
        values = self.samples[name]
        lo, hi = np.percentile(values, [50.0 * (1.0 - level), 50.0 * (1.0 + level)])
        return float(lo), float(hi)

    def intervals(self, level: float = 0.95) -> dict[str, tuple[float, float]]:
        """:meth:`interval` for every parameter; level 0.8 matches Hoffmann et al.'s Table 2 (10th-90th)."""
        return {name: self.interval(name, level) for name in self.samples}

    def std(self) -> dict[str, float]:
        """Bootstrap standard deviation of every parameter."""
        return {name: float(np.std(v, ddof=1)) for name, v in self.samples.items()}


def check_level(level: float) -> None:
    """Reject confidence levels outside (0, 1)."""
    if not 0.0 < level < 1.0:
        raise ConfigError("--level", f"confidence level {level} is not in (0, 1)", "use e.g. 0.95 or 0.8")


def resample_counts(rng: np.random.Generator, n: int, n_resamples: int) -> np.ndarray:
    """(n_resamples, n) multiplicities of each point in a with-replacement resample of size n."""
    draws = rng.integers(0, n, size=(n_resamples, n))
    counts = np.zeros((n_resamples, n))
    np.add.at(counts, (np.arange(n_resamples)[:, None], draws), 1.0)
    return counts


def stratified_indices(rng: np.random.Generator, groups: np.ndarray | None, n: int) -> np.ndarray:
    """One resample's positions: with replacement within each group (or over all points without groups)."""
    if groups is None:
        return rng.integers(0, n, size=n)
    parts = []
    for label in np.unique(groups):
        members = np.flatnonzero(groups == label)
        parts.append(rng.choice(members, size=members.size, replace=True))
    return np.concatenate(parts)


def bootstrap_loop(
    data: ScalingData,
    refit: Callable[[ScalingData], dict[str, float]],
    *,
    n_resamples: int = 1000,
    seed: int | None = 0,
    groups: np.ndarray | None = None,
    min_success: float = 0.5,
    resampled: str | None = None,
) -> BootstrapResult:
    """Refit ``refit`` on ``n_resamples`` resamples of ``data`` (stratified by ``groups`` if given).

    A resample whose refit raises (e.g. an IsoFLOP curve with no interior
    minimum) is counted in ``n_failed`` rather than aborting the bootstrap; if
    more than ``1 - min_success`` of them fail the intervals would be biased, so
    that raises a ConfigError instead.
    """
    if n_resamples < 2:
        raise ConfigError("--bootstrap", f"{n_resamples} resamples is too few", "use at least 2 (1000 is typical)")
    rng = np.random.default_rng(seed)
    collected: dict[str, list[float]] = {}
    failed = 0
    with warnings.catch_warnings():
        # Per-resample warnings (dropped budgets etc.) would flood the terminal.
        warnings.simplefilter("ignore")
        for _ in range(n_resamples):
            idx = stratified_indices(rng, groups, len(data))
            try:
                values = refit(data.subset(idx))
            except (ConfigError, ValueError, np.linalg.LinAlgError):
                failed += 1
                continue
            for name, v in values.items():
                collected.setdefault(name, []).append(float(v))
    if n_resamples - failed < max(2, min_success * n_resamples):
        raise ConfigError(
            "--bootstrap",
            f"{failed} of {n_resamples} resamples could not be fitted",
            "add more points per budget or fit without --bootstrap",
        )
    samples = {k: np.asarray(v) for k, v in collected.items()}
    if resampled is None:
        resampled = "runs, with replacement" + (" within each group" if groups is not None else " over all runs")
    return BootstrapResult(samples=samples, n_resamples=n_resamples, n_failed=failed, seed=seed, resampled=resampled)
