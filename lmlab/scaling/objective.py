"""Hoffmann et al.'s approach-3 objective, evaluated for many parameter vectors at once.

Parameters are packed as ``theta = (a, b, e, alpha, beta)`` with A = exp(a),
B = exp(b), E = exp(e). The objective for one vector is

    sum_i  w_i * Huber_delta( LSE(a - alpha log N_i, b - beta log D_i, e) - log L_i )

where LSE is log-sum-exp, so the residual is log L_hat - log L. ``theta`` is a
``(S, 5)`` array; the value and analytic gradient come back for all S rows in a
handful of dense array operations, which is what makes a 5,400-start grid fast.
"""

from __future__ import annotations

import numpy as np

#: Hoffmann et al. 2022 Huber threshold on log-loss residuals.
HUBER_DELTA = 1e-3

PARAM_NAMES = ("a", "b", "e", "alpha", "beta")


def huber(r: np.ndarray, delta: float = HUBER_DELTA) -> np.ndarray:
    """Elementwise Huber loss: r^2 / 2 inside |r| <= delta, delta (|r| - delta / 2) outside."""
    ar = np.abs(r)
    return np.where(ar <= delta, 0.5 * r * r, delta * (ar - 0.5 * delta))


def log_predict(theta: np.ndarray, log_n: np.ndarray, log_d: np.ndarray) -> np.ndarray:
    """log L_hat for every row of ``theta`` (S, 5) and every point: shape (S, n)."""
    theta = np.atleast_2d(theta)
    u1 = theta[:, 0:1] - theta[:, 3:4] * log_n[None, :]
    u2 = theta[:, 1:2] - theta[:, 4:5] * log_d[None, :]
    u3 = np.broadcast_to(theta[:, 2:3], u1.shape)
    return np.logaddexp(np.logaddexp(u1, u2), u3)


def objective_and_grad(
    theta: np.ndarray,
    log_n: np.ndarray,
    log_d: np.ndarray,
    log_l: np.ndarray,
    weights: np.ndarray | None = None,
    delta: float = HUBER_DELTA,
) -> tuple[np.ndarray, np.ndarray]:
    """Objective values (S,) and gradients (S, 5) for parameter rows ``theta`` (S, 5).

    ``weights`` (S, n) or (n,) multiplies each point's Huber term; bootstrap
    resamples are integer counts, so every resample can share one batched call.
    """
    theta = np.atleast_2d(np.asarray(theta, dtype=float))
    # In-place updates below keep the number of (S, n) temporaries small; at
    # 5,400 x 240 each one is 10 MB and allocation dominates otherwise.
    w1 = np.multiply(theta[:, 3:4], log_n[None, :])
    np.subtract(theta[:, 0:1], w1, out=w1)  # u1 = a - alpha log N
    w2 = np.multiply(theta[:, 4:5], log_d[None, :])
    np.subtract(theta[:, 1:2], w2, out=w2)  # u2 = b - beta log D
    m = np.maximum(w1, w2)
    np.maximum(m, theta[:, 2:3], out=m)
    # Softmax weights of the three terms: they are the derivatives of LSE.
    w1 -= m
    np.exp(w1, out=w1)
    w2 -= m
    np.exp(w2, out=w2)
    w3 = np.subtract(theta[:, 2:3], m)
    np.exp(w3, out=w3)
    s = w1 + w2
    s += w3
    r = np.log(s)
    r += m
    r -= log_l[None, :]
    psi = np.clip(r, -delta, delta)
    # Huber(r) = psi * (r - psi / 2) with psi = clip(r, -delta, delta), in both regimes.
    r -= 0.5 * psi
    r *= psi
    if weights is not None:
        r *= weights
        psi *= weights
    f = r.sum(axis=1)
    psi /= s
    w1 *= psi
    w2 *= psi
    w3 *= psi
    grad = np.empty((theta.shape[0], 5))
    grad[:, 0] = w1.sum(axis=1)
    grad[:, 1] = w2.sum(axis=1)
    grad[:, 2] = w3.sum(axis=1)
    grad[:, 3] = -(w1 @ log_n)
    grad[:, 4] = -(w2 @ log_d)
    return f, grad


def scalar_objective(
    theta: np.ndarray,
    log_n: np.ndarray,
    log_d: np.ndarray,
    log_l: np.ndarray,
    weights: np.ndarray | None = None,
    delta: float = HUBER_DELTA,
) -> tuple[float, np.ndarray]:
    """Objective and gradient of a single parameter vector, in the form scipy.optimize expects."""
    f, g = objective_and_grad(np.asarray(theta, dtype=float)[None, :], log_n, log_d, log_l, weights, delta)
    return float(f[0]), g[0]
