"""PNG plots of scaling fits (lmlab.scaling.plots)."""

from __future__ import annotations

import numpy as np
import pandas as pd
import pytest

from lmlab.scaling import plots
from lmlab.scaling.chinchilla import bootstrap_allocation, fit_approach1, fit_approach2
from lmlab.scaling.kaplan import fit_kaplan
from lmlab.scaling.law import EPOCH_2024
from lmlab.scaling.parametric import Approach3Grid, fit_approach3
from lmlab.scaling.results import from_frame

PNG = b"\x89PNG\r\n\x1a\n"


@pytest.fixture(scope="module")
def data():
    rng = np.random.default_rng(0)
    rows = []
    for c in np.logspace(18, 21, 5):
        n_opt, _ = EPOCH_2024.optimal(c)
        for n in n_opt * np.logspace(-0.7, 0.7, 7):
            d = c / (6 * n)
            rows.append((n, d, c, EPOCH_2024.loss(n, d) * np.exp(0.003 * rng.normal())))
    return from_frame(pd.DataFrame(rows, columns=["N", "D", "budget", "loss"]), budget_col="budget")


def _is_png(path) -> bool:
    return path.read_bytes()[:8] == PNG and path.stat().st_size > 5000


def test_every_plot_writes_a_png(data, tmp_path):
    fit3 = fit_approach3(data, grid=Approach3Grid(alpha=(0.5,), beta=(0.5,), e=(0.5,), a=(5.0, 10.0), b=(5.0, 10.0)))
    fit2 = bootstrap_allocation(fit_approach2(data), n_resamples=30)
    written = [
        plots.plot_loss_vs_compute(data, fit3, tmp_path / "loss.png"),
        plots.plot_isoflops(fit2, tmp_path / "iso.png"),
        plots.plot_optimal_allocation(fit2, tmp_path / "alloc2.png"),
        plots.plot_optimal_allocation(fit_approach1(data), tmp_path / "alloc1.png"),
        plots.plot_optimal_allocation(fit3, tmp_path / "alloc3.png"),
        plots.plot_residuals(fit3, tmp_path / "sub" / "resid.png"),
        plots.plot_kaplan(fit_kaplan(data), tmp_path / "kaplan.png"),
    ]
    for path in written:
        assert _is_png(path), path
    assert written[5] == tmp_path / "sub" / "resid.png"


def test_isoflop_plot_rejects_other_methods(data, tmp_path):
    with pytest.raises(ValueError, match="approach-2"):
        plots.plot_isoflops(fit_approach1(data), tmp_path / "x.png")
