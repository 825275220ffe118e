"""Batched L-BFGS (lmlab.scaling.lbfgs) on problems with known minima."""

from __future__ import annotations

import numpy as np

from lmlab.scaling.lbfgs import CONVERGED_GTOL, PRUNED, batched_lbfgs


def rosenbrock(x: np.ndarray, rows: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    a, b = x[:, 0], x[:, 1]
    f = (1 - a) ** 2 + 100 * (b - a * a) ** 2
    g = np.stack([-2 * (1 - a) - 400 * a * (b - a * a), 200 * (b - a * a)], axis=1)
    return f, g


def test_every_row_reaches_the_rosenbrock_minimum():
    starts = np.random.default_rng(0).uniform(-2, 2, size=(64, 2))
    res = batched_lbfgs(rosenbrock, starts, gtol=1e-8, max_iter=500)
    assert np.all(res.status == CONVERGED_GTOL)
    np.testing.assert_allclose(res.x, 1.0, atol=1e-6)
    assert np.all(res.f < 1e-12)
    # Rows are independent: one row alone takes exactly the same path as in the batch.
    alone = batched_lbfgs(rosenbrock, starts[5:6], gtol=1e-8, max_iter=500)
    np.testing.assert_allclose(alone.x[0], res.x[5], rtol=0, atol=1e-12)
    assert alone.n_iter[0] == res.n_iter[5]


def test_rows_see_their_own_data():
    # Row i minimises sum_j w_ij (x - c_j)^2: the minimum is the weighted mean of c.
    centres = np.array([0.0, 1.0, 5.0])
    weights = np.array([[1.0, 0.0, 0.0], [1.0, 1.0, 1.0], [0.0, 2.0, 1.0]])

    def fun(x: np.ndarray, rows: np.ndarray):
        w = weights[rows]
        diff = x[:, :1] - centres[None, :]
        return (w * diff**2).sum(axis=1), (2 * w * diff).sum(axis=1, keepdims=True)

    res = batched_lbfgs(fun, np.full((3, 1), 10.0), gtol=1e-10)
    np.testing.assert_allclose(res.x[:, 0], weights @ centres / weights.sum(axis=1), atol=1e-8)


def test_pruning_keeps_only_the_best_rows():
    # f = (x - 3)^2 + offset_row: rows with large offsets can never win and get pruned.
    offsets = np.arange(10.0)

    def fun(x: np.ndarray, rows: np.ndarray):
        return (x[:, 0] - 3) ** 2 + offsets[rows], 2 * (x[:, :1] - 3)

    starts = np.full((10, 1), -50.0)
    res = batched_lbfgs(fun, starts, prune=[(0, 3)], gtol=1e-10)
    assert np.all(res.status[3:] == PRUNED)
    assert res.best() == 0 and abs(res.x[0, 0] - 3) < 1e-8
