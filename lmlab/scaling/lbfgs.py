"""Batched L-BFGS: many independent small minimisations advanced in lock-step.

A multi-start grid (Hoffmann et al.'s 5,400 approach-3 starts) or a bootstrap
(1,000 resamples) is thousands of independent 5-parameter problems. Running
them one scipy call at a time spends almost all its time in Python overhead;
here every start is a row of one ``(S, dim)`` array, so each iteration costs a
few vectorised objective evaluations over the rows still running.

Each row has its own L-BFGS history, its own backtracking (Armijo) line search
and its own stopping test. Rows that stop are frozen and dropped from later
evaluations. Optionally a pruning schedule of (iteration, keep) pairs lets only
the ``keep`` best rows (by current objective) carry on past that iteration, in
the spirit of successive halving: rows far behind the best after a few
iterations are rarely in the best basin, and would only cost time.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass

import numpy as np

BatchedFun = Callable[[np.ndarray, np.ndarray], tuple[np.ndarray, np.ndarray]]

RUNNING, CONVERGED_GTOL, CONVERGED_FTOL, LINESEARCH_FAILED, PRUNED = 0, 1, 2, 3, 4
STATUS_NAMES = {
    RUNNING: "max_iter reached",
    CONVERGED_GTOL: "gradient below gtol",
    CONVERGED_FTOL: "objective change below ftol",
    LINESEARCH_FAILED: "no further decrease found",
    PRUNED: "pruned",
}


@dataclass
class BatchedResult:
    """Final state of every row: parameters, objective, max-abs gradient, iterations and status code."""

    x: np.ndarray
    f: np.ndarray
    grad_max: np.ndarray
    n_iter: np.ndarray
    status: np.ndarray
    n_row_evals: int

    def best(self) -> int:
        """Row index with the lowest finite objective."""
        f = np.where(np.isfinite(self.f), self.f, np.inf)
        return int(np.argmin(f))


def _rowdot(u: np.ndarray, v: np.ndarray) -> np.ndarray:
    return np.einsum("ij,ij->i", u, v)


def batched_lbfgs(
    fun: BatchedFun,
    x0: np.ndarray,
    *,
    memory: int = 10,
    max_iter: int = 1000,
    gtol: float = 1e-9,
    ftol: float = 1e-11,
    ftol_patience: int = 3,
    max_linesearch: int = 40,
    c1: float = 1e-4,
    prune: Sequence[tuple[int, int]] | None = None,
) -> BatchedResult:
    """Minimise ``S`` independent problems from the starting rows ``x0`` (S, dim).

    ``fun(x, rows)`` returns objective values (k,) and gradients (k, dim) for
    the parameter rows ``x`` (k, dim); ``rows`` are their indices in ``x0`` so
    that per-row data (e.g. bootstrap weights) can be looked up. A row stops when
    its max-abs gradient is below ``gtol``, or its relative objective decrease
    stays below ``ftol`` for ``ftol_patience`` consecutive iterations, or the line
    search cannot decrease it any more. ``prune`` = [(iteration, keep), ...]: at
    the start of each listed iteration all but the ``keep`` lowest-objective
    rows that are still running are stopped (status ``PRUNED``).
    """
    x = np.array(x0, dtype=float, copy=True)
    n_rows, dim = x.shape
    all_rows = np.arange(n_rows)
    f, g = fun(x, all_rows)
    f = np.where(np.isfinite(f), f, np.inf)
    n_evals = n_rows
    s_hist = np.zeros((memory, n_rows, dim))
    y_hist = np.zeros((memory, n_rows, dim))
    rho = np.zeros((memory, n_rows))
    gamma = np.zeros(n_rows)  # 0 marks "no curvature pair yet"
    status = np.where(np.isfinite(f), RUNNING, LINESEARCH_FAILED).astype(np.int8)
    status[np.isfinite(f) & (np.abs(g).max(axis=1) <= gtol)] = CONVERGED_GTOL
    n_iter = np.zeros(n_rows, dtype=int)
    small_steps = np.zeros(n_rows, dtype=int)

    for it in range(max_iter):
        for when, keep in prune or ():
            if it == when:
                order = np.argsort(f, kind="stable")
                losers = order[keep:]
                status[losers[status[losers] == RUNNING]] = PRUNED
        act = np.flatnonzero(status == RUNNING)
        if act.size == 0:
            break
        g_a = g[act]

        # Two-loop recursion; slots with rho == 0 are empty or skipped pairs and act as no-ops.
        q = g_a.copy()
        slots = [(it - 1 - j) % memory for j in range(min(it, memory))]
        alphas = []
        for slot in slots:
            al = rho[slot, act] * _rowdot(s_hist[slot, act], q)
            q -= al[:, None] * y_hist[slot, act]
            alphas.append(al)
        gam = gamma[act]
        has_hist = gam > 0
        q *= np.where(has_hist, gam, 1.0)[:, None]
        for slot, al in zip(reversed(slots), reversed(alphas)):
            be = rho[slot, act] * _rowdot(y_hist[slot, act], q)
            q += s_hist[slot, act] * (al - be)[:, None]
        p = -q
        gp = _rowdot(g_a, p)
        not_descent = ~(gp < 0)
        if not_descent.any():
            # Curvature information went bad for these rows: restart them as steepest descent.
            bad = act[not_descent]
            rho[:, bad] = 0.0
            gamma[bad] = 0.0
            has_hist[not_descent] = False
            p[not_descent] = -g_a[not_descent]
            gp[not_descent] = -_rowdot(g_a[not_descent], g_a[not_descent])
        # Without history the first step has unit length, as in scipy's L-BFGS-B.
        t = np.where(has_hist, 1.0, 1.0 / np.maximum(np.linalg.norm(p, axis=1), 1e-300))

        x_new = x[act].copy()
        f_new = f[act].copy()
        g_new = g_a.copy()
        pending = np.ones(act.size, dtype=bool)
        f_a = f[act]
        for _ in range(max_linesearch):
            pend = np.flatnonzero(pending)
            xt = x[act[pend]] + t[pend, None] * p[pend]
            ft, gt = fun(xt, act[pend])
            n_evals += pend.size
            ok = np.isfinite(ft) & (ft <= f_a[pend] + c1 * t[pend] * gp[pend])
            acc = pend[ok]
            x_new[acc], f_new[acc], g_new[acc] = xt[ok], ft[ok], gt[ok]
            pending[acc] = False
            rej = pend[~ok]
            if rej.size == 0:
                break
            # Minimiser of the quadratic through f(0), f'(0) and f(t), kept within [0.1 t, 0.5 t].
            ft_rej = ft[~ok]
            tr = t[rej]
            denom = 2.0 * (ft_rej - f_a[rej] - gp[rej] * tr)
            with np.errstate(divide="ignore", invalid="ignore"):
                t_quad = -gp[rej] * tr * tr / denom
            t_quad = np.where(np.isfinite(t_quad) & (denom > 0), t_quad, 0.5 * tr)
            t[rej] = np.clip(t_quad, 0.1 * tr, 0.5 * tr)

        moved = ~pending
        slot = it % memory
        rho[slot, act] = 0.0
        if moved.any():
            rows = act[moved]
            s = x_new[moved] - x[rows]
            y = g_new[moved] - g[rows]
            sy = _rowdot(s, y)
            yy = _rowdot(y, y)
            good = (sy > 1e-12 * np.sqrt(_rowdot(s, s) * yy)) & (yy > 0)
            s_hist[slot, rows] = s
            y_hist[slot, rows] = y
            rho[slot, rows[good]] = 1.0 / sy[good]
            gamma[rows[good]] = sy[good] / yy[good]
            decrease = f[rows] - f_new[moved]
            small = decrease <= ftol * np.maximum(np.abs(f[rows]), 1e-300)
            small_steps[rows] = np.where(small, small_steps[rows] + 1, 0)
            x[rows], f[rows], g[rows] = x_new[moved], f_new[moved], g_new[moved]
            n_iter[rows] += 1
            status[rows[np.abs(g[rows]).max(axis=1) <= gtol]] = CONVERGED_GTOL
            stalled = rows[(small_steps[rows] >= ftol_patience) & (status[rows] == RUNNING)]
            status[stalled] = CONVERGED_FTOL
        status[act[pending]] = LINESEARCH_FAILED

    return BatchedResult(
        x=x,
        f=f,
        grad_max=np.abs(g).max(axis=1),
        n_iter=n_iter,
        status=status,
        n_row_evals=n_evals,
    )
