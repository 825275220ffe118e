"""PNG plots of scaling-law fits (matplotlib, Agg backend: no display needed).

Every function takes a fit result and an output path, writes the figure, and
returns the path.
"""

from __future__ import annotations

from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402  (the backend must be chosen first)
import numpy as np  # noqa: E402

from lmlab.scaling.chinchilla import AllocationFit  # noqa: E402
from lmlab.scaling.kaplan import KaplanFit  # noqa: E402
from lmlab.scaling.law import ChinchillaLaw  # noqa: E402
from lmlab.scaling.parametric import Approach3Fit  # noqa: E402
from lmlab.scaling.results import ScalingData  # noqa: E402


def _save(fig: plt.Figure, path: str | Path) -> Path:
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return path


def _fmt_interval(name: str, value: float, intervals: dict[str, tuple[float, float]] | None, level: float) -> str:
    if intervals and name in intervals:
        lo, hi = intervals[name]
        return f"{name}={value:.3f} [{lo:.3f}, {hi:.3f}] ({level:.0%})"
    return f"{name}={value:.3f}"


def plot_loss_vs_compute(data: ScalingData, law: ChinchillaLaw | Approach3Fit, path: str | Path) -> Path:
    """Every run's loss against compute (coloured by log N) with the law's compute-optimal frontier."""
    if isinstance(law, Approach3Fit):
        law = law.law
    fig, ax = plt.subplots(figsize=(7, 4.5))
    sc = ax.scatter(data.C, data.loss, c=np.log10(data.N), cmap="viridis", s=14)
    fig.colorbar(sc, ax=ax, label="log10 N")
    c = np.logspace(np.log10(data.C.min()), np.log10(data.C.max()), 200)
    ax.plot(c, law.optimal_loss(c), "k-", lw=1.5, label=f"frontier: N_opt ~ C^{law.a:.3f}, D_opt ~ C^{law.b:.3f}")
    ax.set(xscale="log", yscale="log", xlabel="training compute C (FLOPs)", ylabel="loss", title="Loss vs compute")
    ax.legend(fontsize=8)
    return _save(fig, path)


def plot_isoflops(fit: AllocationFit, path: str | Path) -> Path:
    """Approach 2: points and fitted parabola of each IsoFLOP budget, with the vertices marked."""
    if fit.method != "approach2":
        raise ValueError("plot_isoflops needs an approach-2 fit")
    data, budgets = fit.data, fit.details["budgets"]
    fig, ax = plt.subplots(figsize=(7, 4.5))
    cmap = plt.get_cmap("plasma")
    levels = np.unique(budgets)
    for i, budget in enumerate(levels):
        colour = cmap(i / max(1, len(levels) - 1))
        members = budgets == budget
        ax.scatter(data.N[members], data.loss[members], s=12, color=colour)
    for par in fit.details["parabolas"]:
        colour = cmap(float(np.searchsorted(levels, par.budget)) / max(1, len(levels) - 1))
        x = np.linspace(par.x_range[0], par.x_range[1], 100)
        ax.plot(np.exp(x), par(x), color=colour, lw=1, label=f"C={par.budget:.2g}")
    ax.scatter(fit.N_opt, fit.loss_opt, marker="*", s=80, color="k", zorder=3, label="vertex (N_opt)")
    ax.set(xscale="log", xlabel="parameters N", ylabel="loss", title="IsoFLOP profiles")
    ax.legend(fontsize=6, ncol=2)
    return _save(fig, path)


def plot_optimal_allocation(fit: AllocationFit | Approach3Fit, path: str | Path) -> Path:
    """N_opt and D_opt against compute with the fitted power laws; exponents and intervals in the legend."""
    fig, ax = plt.subplots(figsize=(7, 4.5))
    if isinstance(fit, Approach3Fit):
        c = np.logspace(np.log10(fit.data.C.min()), np.log10(fit.data.C.max()), 100)
        n_line, d_line = fit.law.optimal(c)
        a, b = fit.law.a, fit.law.b
    else:
        c = np.logspace(np.log10(fit.C.min()), np.log10(fit.C.max()), 100)
        n_line, d_line = fit.optimal(c)
        a, b = fit.a, fit.b
        ax.scatter(fit.C, fit.N_opt, color="C0", s=16)
        ax.scatter(fit.C, fit.D_opt, color="C1", s=16)
    ax.plot(c, n_line, color="C0", label="N_opt: " + _fmt_interval("a", a, fit.intervals, fit.level))
    ax.plot(c, d_line, color="C1", label="D_opt: " + _fmt_interval("b", b, fit.intervals, fit.level))
    ax.set(xscale="log", yscale="log", xlabel="compute C (FLOPs)", ylabel="N_opt (params) / D_opt (tokens)")
    ax.set_title("Compute-optimal allocation")
    ax.legend(fontsize=8)
    return _save(fig, path)


def plot_residuals(fit: Approach3Fit, path: str | Path) -> Path:
    """Approach 3: log-loss residuals (log L_hat - log L) against compute, with the Huber delta marked."""
    fig, ax = plt.subplots(figsize=(7, 4.5))
    sc = ax.scatter(fit.data.C, fit.residuals, c=np.log10(fit.data.N), cmap="viridis", s=14)
    fig.colorbar(sc, ax=ax, label="log10 N")
    ax.axhline(0.0, color="k", lw=1)
    for sign in (-1, 1):
        ax.axhline(sign * fit.delta, color="grey", ls=":", lw=1)
    rmse = float(np.sqrt(np.mean(fit.residuals**2)))
    ax.set(xscale="log", xlabel="compute C (FLOPs)", ylabel="log L_hat - log L")
    ax.set_title(f"Approach-3 residuals (RMSE {rmse:.4f}, dotted: Huber delta)")
    return _save(fig, path)


def plot_kaplan(fit: KaplanFit, path: str | Path) -> Path:
    """Kaplan fits: L(N) on the data-rich runs and L(D) on the largest-model runs, side by side."""
    data = fit.data
    fig, (left, right) = plt.subplots(1, 2, figsize=(10, 4))
    n_sel = np.isin(data.rows, fit.n_rows)
    d_sel = np.isin(data.rows, fit.d_rows)
    left.scatter(data.N, data.loss, s=8, color="lightgrey")
    left.scatter(data.N[n_sel], data.loss[n_sel], s=14, color="C0")
    n = np.logspace(np.log10(data.N.min()), np.log10(data.N.max()), 100)
    left.plot(n, fit.loss_n(n), "k-", label=_fmt_interval("alpha_N", fit.alpha_N, fit.intervals, fit.level))
    left.set(xscale="log", yscale="log", xlabel="parameters N", ylabel="loss", title="L(N) = (N_c/N)^alpha_N")
    right.scatter(data.D, data.loss, s=8, color="lightgrey")
    right.scatter(data.D[d_sel], data.loss[d_sel], s=14, color="C1")
    d = np.logspace(np.log10(data.D.min()), np.log10(data.D.max()), 100)
    right.plot(d, fit.loss_d(d), "k-", label=_fmt_interval("alpha_D", fit.alpha_D, fit.intervals, fit.level))
    right.set(xscale="log", yscale="log", xlabel="tokens D", title="L(D) = (D_c/D)^alpha_D")
    left.legend(fontsize=8)
    right.legend(fontsize=8)
    return _save(fig, path)
