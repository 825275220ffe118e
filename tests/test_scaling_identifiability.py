"""Every scaling fitter refuses data that cannot identify its parameters, and warns when it fits them exactly."""

from __future__ import annotations

import math
import warnings

import numpy as np
import pandas as pd
import pytest

from lmlab.errors import ConfigError
from lmlab.scaling.chinchilla import fit_approach1, fit_approach2, fit_approach3
from lmlab.scaling.kaplan import fit_kaplan
from lmlab.scaling.law import ChinchillaLaw
from lmlab.scaling.lr_rules import fit_lr_rule
from lmlab.scaling.powerlaw import fit_power_law
from lmlab.scaling.results import from_frame

LAW = ChinchillaLaw(E=1.8, A=400.0, B=1500.0, alpha=0.34, beta=0.30)


def runs(nd: list[tuple[float, float]], budget: list[float] | None = None):
    frame = pd.DataFrame({"N": [n for n, _ in nd], "D": [d for _, d in nd], "loss": [LAW.loss(n, d) for n, d in nd]})
    if budget is not None:
        frame["budget"] = budget
        return from_frame(frame, budget_col="budget")
    return from_frame(frame)


def test_approach1_on_two_runs_of_one_size_refuses_instead_of_a_zero_exponent():
    data = runs([(1e8, 2e9), (1e8, 8e9)])
    with pytest.raises(ConfigError) as e:
        fit_approach1(data)
    assert e.value.field == "approach1"
    assert "model sizes of the 2 run(s) on the loss envelope take 1 distinct value(s)" in str(e.value)
    assert "\n" not in str(e.value)


def test_two_point_power_laws_warn_and_report_no_r2():
    with pytest.warns(UserWarning, match="only 2 distinct points"):
        law = fit_power_law(np.array([1.0, 10.0]), np.array([2.0, 20.0]), what="t")
    assert law.exponent == pytest.approx(1.0) and math.isnan(law.r2)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        three = fit_power_law(np.array([1.0, 10.0, 100.0]), np.array([2.0, 20.0, 210.0]))
    assert 0.99 < three.r2 < 1.0
    with pytest.warns(UserWarning, match="approach1: a power law through only 2 distinct points"):
        fit = fit_approach1(runs([(1e8, 2e9), (4e8, 8e9)]))
    assert math.isnan(fit.n_law.r2) and math.isnan(fit.to_dict()["r2_D"])


def test_approach2_on_two_budgets_warns_and_reports_no_r2():
    nd, budget = [], []
    for c in (1e18, 1e19):
        n_opt, _ = LAW.optimal(c)
        for n in n_opt * np.logspace(-0.5, 0.5, 5):
            nd.append((n, c / (6 * n)))
            budget.append(c)
    with pytest.warns(UserWarning, match="approach2: a power law through only 2 distinct points"):
        fit = fit_approach2(runs(nd, budget))
    assert fit.C.size == 2 and math.isnan(fit.n_law.r2)


def test_kaplan_and_lr_rule_on_two_sizes_warn():
    with pytest.warns(UserWarning, match="kaplan: a power law through only 2"):
        fit = fit_kaplan(runs([(1e8, 2e9), (4e8, 2e9), (4e8, 8e9)]))
    assert math.isnan(fit.n_law.r2)
    frame = pd.DataFrame({"N": [1e7] * 3 + [1e8] * 3, "lr": [1e-3, 3e-3, 1e-2] * 2, "loss": [3.1, 3.0, 3.2, 2.9, 2.8, 2.85]})
    with pytest.warns(UserWarning, match="lr-rule: a power law through only 2"):
        rule = fit_lr_rule(frame, bootstrap=0)
    assert math.isnan(rule.r2)


@pytest.mark.parametrize(
    "nd, problem",
    [
        ([(1e8, 2e9), (2e8, 4e9), (4e8, 8e9), (8e8, 1.6e10)], "4 usable points but the fit has 5 parameters"),
        ([(1e8, d) for d in np.logspace(9, 11, 8)], "the model sizes take 1 distinct value(s)"),
        ([(n, 20 * n) for n in np.logspace(7, 9, 8)], "one tokens-per-parameter rule"),
        ([(n, 3 * n**1.2) for n in np.logspace(7, 9, 8)], "log D is a linear function of log N"),
    ],
)
def test_approach3_refuses_designs_that_cannot_separate_its_terms(nd, problem):
    with pytest.raises(ConfigError) as e:
        fit_approach3(runs(nd), grid=np.array([[6.0, 7.0, 0.5, 0.3, 0.3]]), n_polish=0)
    assert e.value.field == "approach3" and problem in str(e.value)


def test_approach3_on_an_identifiable_design_fits_without_warning():
    nd = [(n, d) for n in np.logspace(7, 9, 4) for d in np.logspace(9, 11, 4)]
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        fit = fit_approach3(runs(nd), grid=np.array([[6.0, 7.0, 0.5, 0.3, 0.3]]), n_polish=1)
    assert fit.law.alpha == pytest.approx(LAW.alpha, abs=0.02)
