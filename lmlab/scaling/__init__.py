"""Scaling-law fitting and compute-optimal planning.

Load runs with :func:`load_results`, fit Kaplan et al.'s single-variable laws
(:func:`fit_kaplan`) or Hoffmann et al.'s approaches 1-3
(:func:`fit_approach1`, :func:`fit_approach2`, :func:`fit_approach3`), get
bootstrap intervals, and plan runs with :func:`plan_compute` and
:func:`shape_for_params`. Plots live in :mod:`lmlab.scaling.plots` (imported on
demand because matplotlib is slow to import); the command line in
:mod:`lmlab.scaling.cli`.
"""

from __future__ import annotations

from lmlab.scaling.bootstrap import BootstrapResult
from lmlab.scaling.chinchilla import AllocationFit, Parabola, bootstrap_allocation, envelope, fit_approach1, fit_approach2
from lmlab.scaling.kaplan import KaplanFit, bootstrap_kaplan, fit_kaplan
from lmlab.scaling.law import EPOCH_2024, HOFFMANN_2022, ChinchillaLaw
from lmlab.scaling.objective import HUBER_DELTA, huber, objective_and_grad
from lmlab.scaling.parametric import (
    GRID_4500,
    GRID_5400,
    Approach3Fit,
    Approach3Grid,
    bootstrap_approach3,
    fit_approach3,
    fit_approach3_scipy_loop,
    with_bootstrap,
)
from lmlab.scaling.plan import (
    ComputePlan,
    ModelShape,
    chinchilla_rule,
    non_embedding_params,
    pf_days,
    plan_compute,
    shape_for_params,
    training_steps,
    wall_seconds,
)
from lmlab.scaling.powerlaw import PowerLaw, fit_power_law
from lmlab.scaling.results import Excluded, ScalingData, from_frame, group_near_equal, load_results, require_points

__all__ = [
    "EPOCH_2024",
    "GRID_4500",
    "GRID_5400",
    "HOFFMANN_2022",
    "HUBER_DELTA",
    "AllocationFit",
    "Approach3Fit",
    "Approach3Grid",
    "BootstrapResult",
    "ChinchillaLaw",
    "ComputePlan",
    "Excluded",
    "KaplanFit",
    "ModelShape",
    "Parabola",
    "PowerLaw",
    "ScalingData",
    "bootstrap_allocation",
    "bootstrap_approach3",
    "bootstrap_kaplan",
    "chinchilla_rule",
    "envelope",
    "fit_approach1",
    "fit_approach2",
    "fit_approach3",
    "fit_approach3_scipy_loop",
    "fit_kaplan",
    "fit_power_law",
    "from_frame",
    "group_near_equal",
    "huber",
    "load_results",
    "non_embedding_params",
    "objective_and_grad",
    "pf_days",
    "plan_compute",
    "require_points",
    "shape_for_params",
    "training_steps",
    "wall_seconds",
    "with_bootstrap",
]
