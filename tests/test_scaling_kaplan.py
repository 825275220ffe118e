"""Kaplan et al. single-variable power laws L(N) and L(D)."""

from __future__ import annotations

import numpy as np
import pandas as pd
import pytest

from lmlab.errors import ConfigError
from lmlab.scaling.kaplan import bootstrap_kaplan, fit_kaplan
from lmlab.scaling.results import from_frame

# Kaplan et al. 2020 Table 2 joint law L(N, D) = [(Nc/N)^(aN/aD) + Dc/D]^aD.
ALPHA_N, ALPHA_D, N_C, D_C = 0.076, 0.103, 6.4e13, 1.8e13


def kaplan_runs(sigma: float, seed: int) -> pd.DataFrame:
    """A size x tokens grid in the data-limited regime plus one very long run per size.

    Each law is only clean in its own regime: L(N) needs runs that are not token
    limited (the extra D = 1e17 runs), L(D) needs a model large enough not to be
    capacity limited at every D of the grid (N up to 1e14 against D <= 1e11).
    """
    rng = np.random.default_rng(seed)
    n = np.logspace(5, 14, 10)
    d = np.append(np.logspace(6, 11, 6), 1e17)
    nn, dd = np.meshgrid(n, d)
    loss = ((N_C / nn) ** (ALPHA_N / ALPHA_D) + D_C / dd) ** ALPHA_D
    loss = loss * np.exp(sigma * rng.normal(size=loss.shape))
    return pd.DataFrame({"N": nn.ravel(), "D": dd.ravel(), "loss": loss.ravel()})


def test_recovers_kaplan_exponents_from_synthetic_data():
    # The D = 1e17 runs are data-rich, not data-limited: keep them out of L(D).
    fit = fit_kaplan(from_frame(kaplan_runs(sigma=0.002, seed=0)), d_range=(None, 1e12))
    assert fit.alpha_N == pytest.approx(ALPHA_N, rel=0.03)
    assert fit.alpha_D == pytest.approx(ALPHA_D, rel=0.03)
    # The scale constants sit in the exponent's denominator (log N_c = intercept / alpha),
    # so they are much less precise than the exponents.
    assert 0.5 < fit.N_c / N_C < 2.0
    assert 0.5 < fit.D_c / D_C < 2.0
    # L(N) used one (the longest) run per size, L(D) the largest model per token count.
    assert fit.n_rows.size == 10 and fit.d_rows.size == 6
    frame = kaplan_runs(sigma=0.002, seed=0)
    chosen = frame.loc[fit.n_rows]
    # Small models are saturated long before 1e17 tokens, so noise may pick any long run for them.
    assert np.all(chosen["D"] >= 1e10) and np.all(chosen.loc[chosen["N"] >= 1e8, "D"] == 1e17)
    assert np.all(frame.loc[fit.d_rows, "N"] == 1e14)
    assert fit.n_law.r2 > 0.99 and fit.d_law.r2 > 0.99


def test_noiseless_pure_power_law_is_exact():
    n = np.logspace(6, 10, 5)
    d = np.logspace(8, 12, 5)
    frame = pd.DataFrame({"N": n, "D": d, "loss": (N_C / n) ** ALPHA_N})
    fit = fit_kaplan(from_frame(frame))
    assert fit.alpha_N == pytest.approx(ALPHA_N, rel=1e-9)
    assert fit.N_c == pytest.approx(N_C, rel=1e-6)
    np.testing.assert_allclose(fit.loss_n(n), frame["loss"], rtol=1e-9)


def test_bootstrap_intervals_contain_true_exponents():
    fit = fit_kaplan(from_frame(kaplan_runs(sigma=0.01, seed=1)), d_range=(None, 1e12))
    fit = bootstrap_kaplan(fit, n_resamples=200, seed=1)
    for name, truth in (("alpha_N", ALPHA_N), ("alpha_D", ALPHA_D)):
        lo, hi = fit.intervals[name]
        assert lo <= truth <= hi, (name, lo, hi)
        assert hi - lo < 0.3 * truth


def test_unrestricted_l_of_d_is_biased_by_capacity_limited_runs():
    # Without d_range the D = 1e17 run (limited by its 1e14-parameter model) flattens L(D).
    fit = fit_kaplan(from_frame(kaplan_runs(sigma=0.002, seed=0)))
    assert fit.d_rows.size == 7 and fit.alpha_D < 0.8 * ALPHA_D
    assert fit.alpha_N == pytest.approx(ALPHA_N, rel=0.03)


def test_needs_two_distinct_sizes():
    frame = pd.DataFrame({"N": [1e8, 1e8, 1e8], "D": [1e9, 2e9, 4e9], "loss": [3.0, 2.9, 2.8]})
    with pytest.raises(ConfigError, match="distinct model sizes"):
        fit_kaplan(from_frame(frame))
