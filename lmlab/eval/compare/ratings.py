"""Statistics of pairwise preferences: win rates, Bradley-Terry, sequential Elo, bootstrap intervals.

Every judgment becomes an :class:`Outcome` ``(model_a, model_b, score)`` with
``score`` 1 when ``model_a`` is preferred, 0 when ``model_b`` is, and 0.5 for a
tie. Ties count as half a win for each side everywhere: in win rates, in the
Bradley-Terry likelihood (a tie is half a game won by each model) and in Elo.

Bradley-Terry models ``P(i beats j) = 1 / (1 + exp(theta_j - theta_i))``. The
maximum-likelihood strengths solve the score equations
``sum_j n_ij * P(i beats j) = W_i`` (expected wins = observed wins for every
model); they are found with Newton's method on the concave log-likelihood,
which reaches those equations to machine precision in a handful of steps.
Strengths are reported on the Elo scale, ``anchor + 400 * log10(exp(theta))``,
so a 400-point gap means 10:1 odds.

The MLE exists only when the "scored against" graph is strongly connected
(Zermelo 1929, Ford 1957): a model that never lost would get an infinite
rating. In that case -- common with few judgments and in bootstrap resamples --
``prior`` virtual ties between every pair of models keep the estimate finite;
the fit records the prior it used.

Sequential Elo (K-factor updates in judgment order) is a second, order
dependent view. Bootstrap intervals resample judgments with replacement
(percentile method, seeded).
"""

from __future__ import annotations

import math
from collections.abc import Iterable, Sequence
from dataclasses import asdict, dataclass, field
from typing import Any

import numpy as np

from lmlab.errors import ConfigError

#: Virtual tie games per model pair added when the Bradley-Terry MLE does not exist.
DEFAULT_PRIOR = 1.0
ELO_SCALE = 400.0
ELO_BASE = 10.0
DEFAULT_ANCHOR = 1000.0

__all__ = [
    "Outcome", "WinRecord", "BTFit", "ModelRating", "RatingReport",
    "win_records", "pairwise_win_rates", "bradley_terry", "mle_exists", "theta_to_elo",
    "sequential_elo", "bootstrap", "rate",
]


@dataclass(frozen=True)
class Outcome:
    """One comparison: ``score`` is 1 if ``model_a`` won, 0.5 for a tie, 0 if ``model_b`` won."""

    model_a: str
    model_b: str
    score: float

    def __post_init__(self) -> None:
        if self.score not in (0.0, 0.5, 1.0):
            raise ConfigError("score", f"must be 0, 0.5 or 1, got {self.score!r}", "use 1 for a win of model_a, 0.5 for a tie")
        if self.model_a == self.model_b:
            raise ConfigError("model_b", f"a model cannot be compared with itself ({self.model_a!r})", "compare two different models")


@dataclass
class WinRecord:
    """Wins, losses and ties of one model; ``win_rate`` counts ties as half a win (NaN without games)."""

    wins: int = 0
    losses: int = 0
    ties: int = 0

    @property
    def games(self) -> int:
        return self.wins + self.losses + self.ties

    @property
    def win_rate(self) -> float:
        return (self.wins + 0.5 * self.ties) / self.games if self.games else math.nan


@dataclass
class BTFit:
    """A Bradley-Terry fit: natural-log strengths ``theta`` (mean zero), the virtual ties used, Newton steps."""

    models: list[str]
    theta: np.ndarray
    prior: float
    iterations: int

    def ratings(self, anchor: float = DEFAULT_ANCHOR, anchor_model: str | None = None) -> dict[str, float]:
        """Elo-scale ratings: the mean (or ``anchor_model``) sits at ``anchor``."""
        return dict(zip(self.models, theta_to_elo(self.theta, self.models, anchor, anchor_model).tolist()))


@dataclass
class ModelRating:
    """Everything reported for one model under one criterion; ``*_ci`` are ``[low, high]`` bootstrap intervals."""

    model: str
    games: int
    wins: int
    losses: int
    ties: int
    win_rate: float
    win_rate_ci: list[float]
    bt_rating: float
    bt_ci: list[float]
    elo: float
    elo_ci: list[float]


@dataclass
class RatingReport:
    """Ratings of all models for one criterion (``models`` sorted by Bradley-Terry rating, best first)."""

    n_judgments: int
    models: list[ModelRating]
    pairwise_win_rate: dict[str, dict[str, float | None]]
    bt_prior: float
    settings: dict[str, Any] = field(default_factory=dict)

    def to_dict(self) -> dict[str, Any]:
        """JSON-ready dict (NaN becomes None)."""
        return _nan_to_none(asdict(self))


# --------------------------------------------------------------------------- encoding


def _model_list(outcomes: Sequence[Outcome], models: Sequence[str] | None) -> list[str]:
    seen = list(dict.fromkeys(m for o in outcomes for m in (o.model_a, o.model_b)))
    if models is None:
        return sorted(seen)
    models = list(models)
    if len(set(models)) != len(models):
        raise ConfigError("models", "model names repeat", "give each model once")
    missing = [m for m in seen if m not in models]
    if missing:
        raise ConfigError("models", f"judgments name unknown models {missing}", f"known models are {models}")
    return models


def _encode(outcomes: Sequence[Outcome], models: Sequence[str]) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    index = {m: i for i, m in enumerate(models)}
    ia = np.array([index[o.model_a] for o in outcomes], dtype=np.int64)
    ib = np.array([index[o.model_b] for o in outcomes], dtype=np.int64)
    s = np.array([o.score for o in outcomes], dtype=np.float64)
    return ia, ib, s


def _aggregate(ia: np.ndarray, ib: np.ndarray, s: np.ndarray, m: int) -> tuple[np.ndarray, np.ndarray]:
    """``W[i, j]``: points i scored against j (ties give half); ``N[i, j]``: games between i and j."""
    W = np.bincount(ia * m + ib, weights=s, minlength=m * m) + np.bincount(ib * m + ia, weights=1.0 - s, minlength=m * m)
    N = np.bincount(ia * m + ib, minlength=m * m) + np.bincount(ib * m + ia, minlength=m * m)
    return W.reshape(m, m), N.reshape(m, m).astype(np.float64)


# --------------------------------------------------------------------------- win rates


def win_records(outcomes: Sequence[Outcome], models: Sequence[str] | None = None) -> dict[str, WinRecord]:
    """Wins, losses and ties of each model against all opponents."""
    models = _model_list(outcomes, models)
    records = {m: WinRecord() for m in models}
    for o in outcomes:
        ra, rb = records[o.model_a], records[o.model_b]
        if o.score == 1.0:
            ra.wins += 1
            rb.losses += 1
        elif o.score == 0.0:
            ra.losses += 1
            rb.wins += 1
        else:
            ra.ties += 1
            rb.ties += 1
    return records


def pairwise_win_rates(outcomes: Sequence[Outcome], models: Sequence[str] | None = None) -> dict[str, dict[str, float]]:
    """``rates[i][j]``: share of points model i scored against model j (NaN where they never met)."""
    models = _model_list(outcomes, models)
    W, N = _aggregate(*_encode(outcomes, models), len(models))
    with np.errstate(invalid="ignore", divide="ignore"):
        R = np.where(N > 0, W / np.where(N > 0, N, 1.0), np.nan)
    return {a: {b: float(R[i, j]) for j, b in enumerate(models) if j != i} for i, a in enumerate(models)}


# --------------------------------------------------------------------------- Bradley-Terry


def mle_exists(W: np.ndarray) -> bool:
    """Whether the Bradley-Terry MLE is finite: every model reaches every other along "scored against" edges."""
    m = W.shape[0]
    if m < 2:
        return True
    reach = (W > 0) | np.eye(m, dtype=bool)
    for _ in range(max(1, math.ceil(math.log2(m)))):  # repeated squaring: paths of length up to 2^k
        reach = (reach.astype(np.int64) @ reach.astype(np.int64)) > 0
    return bool(reach.all())


def _loglik(theta: np.ndarray, W: np.ndarray) -> float:
    diff = theta[:, None] - theta[None, :]
    # log P(i beats j) = -log(1 + exp(-(theta_i - theta_j))), computed stably
    return float(np.sum(W * -np.logaddexp(0.0, -diff)))


def _fit_theta(W: np.ndarray, N: np.ndarray, tol: float, max_iter: int) -> tuple[np.ndarray, int]:
    m = W.shape[0]
    theta = np.zeros(m)
    wins = W.sum(axis=1)
    scale = max(1.0, float(N.sum()) / 2)
    ones = np.full((m, m), 1.0 / m)
    ll = _loglik(theta, W)
    for it in range(1, max_iter + 1):
        P = 1.0 / (1.0 + np.exp(theta[None, :] - theta[:, None]))
        grad = wins - (N * P).sum(axis=1)
        if np.max(np.abs(grad)) <= tol * scale:
            return theta, it - 1
        C = N * P * P.T
        L = np.diag(C.sum(axis=1)) - C  # graph Laplacian = minus the Hessian; null space is the constant vector
        step = np.linalg.solve(L + ones, grad)  # the rank-one term pins the mean without changing the step
        t = 1.0
        while True:  # backtracking keeps Newton monotone far from the optimum
            cand = theta + t * step
            cand_ll = _loglik(cand, W)
            if cand_ll >= ll - 1e-12 * abs(ll) or t < 1e-8:
                break
            t *= 0.5
        theta, ll = cand - cand.mean(), cand_ll
    return theta, max_iter


def _bt_from_counts(W: np.ndarray, N: np.ndarray, prior: float | None, tol: float, max_iter: int) -> tuple[np.ndarray, float, int]:
    m = W.shape[0]
    if prior is None:
        prior = 0.0 if mle_exists(W) else DEFAULT_PRIOR
    elif prior < 0:
        raise ConfigError("prior", f"must be >= 0, got {prior}", "use 0 for the plain MLE")
    if m < 2:
        return np.zeros(m), prior, 0
    if prior > 0:
        off = 1.0 - np.eye(m)
        W = W + 0.5 * prior * off
        N = N + prior * off
    elif not mle_exists(W):
        raise ConfigError("prior", "the Bradley-Terry MLE does not exist for these judgments (some model never lost or never won)", "use prior > 0 or prior=None")
    theta, iters = _fit_theta(W, N, tol, max_iter)
    return theta, prior, iters


def bradley_terry(
    outcomes: Sequence[Outcome],
    models: Sequence[str] | None = None,
    prior: float | None = None,
    tol: float = 1e-12,
    max_iter: int = 100,
) -> BTFit:
    """Maximum-likelihood Bradley-Terry strengths (ties as half wins).

    ``prior``: virtual tie games added between every pair of models; ``None``
    adds :data:`DEFAULT_PRIOR` only when the plain MLE would be infinite.
    """
    models = _model_list(outcomes, models)
    W, N = _aggregate(*_encode(outcomes, models), len(models))
    theta, used, iters = _bt_from_counts(W, N, prior, tol, max_iter)
    return BTFit(models, theta, used, iters)


def theta_to_elo(theta: np.ndarray, models: Sequence[str], anchor: float = DEFAULT_ANCHOR, anchor_model: str | None = None) -> np.ndarray:
    """Natural-log strengths (last axis = models) to the Elo scale; the mean or ``anchor_model`` maps to ``anchor``."""
    theta = np.asarray(theta, dtype=np.float64)
    if anchor_model is None:
        ref = theta.mean(axis=-1, keepdims=True)
    else:
        if anchor_model not in models:
            raise ConfigError("anchor_model", f"{anchor_model!r} is not a compared model", f"choose from {list(models)}")
        ref = theta[..., [list(models).index(anchor_model)]]
    return anchor + ELO_SCALE / math.log(ELO_BASE) * (theta - ref)


# --------------------------------------------------------------------------- sequential Elo


def _elo_batch(ia: np.ndarray, ib: np.ndarray, s: np.ndarray, m: int, k: float, initial: float) -> np.ndarray:
    """Sequential Elo for a batch of judgment sequences: ``ia``/``ib``/``s`` are (B, n); returns (B, m)."""
    B, n = ia.shape
    R = np.full((B, m), initial, dtype=np.float64)
    rows = np.arange(B)
    for t in range(n):  # inherently sequential in t; vectorised over the batch
        a, b = ia[:, t], ib[:, t]
        expected = 1.0 / (1.0 + ELO_BASE ** ((R[rows, b] - R[rows, a]) / ELO_SCALE))
        delta = k * (s[:, t] - expected)
        R[rows, a] += delta
        R[rows, b] -= delta
    return R


def sequential_elo(outcomes: Sequence[Outcome], models: Sequence[str] | None = None, k: float = 32.0, initial: float = DEFAULT_ANCHOR) -> dict[str, float]:
    """Elo ratings after processing ``outcomes`` in order with K-factor ``k``."""
    models = _model_list(outcomes, models)
    if k <= 0:
        raise ConfigError("k_factor", f"must be > 0, got {k}", "the usual range is 4-32")
    ia, ib, s = _encode(outcomes, models)
    R = _elo_batch(ia[None], ib[None], s[None], len(models), k, initial)[0]
    return dict(zip(models, R.tolist()))


# --------------------------------------------------------------------------- bootstrap


def _check_level(level: float) -> None:
    if not 0 < level < 1:
        raise ConfigError("level", f"must be in (0, 1), got {level}", "e.g. 0.95")


def bootstrap(
    outcomes: Sequence[Outcome],
    models: Sequence[str] | None = None,
    n: int = 1000,
    seed: int = 0,
    level: float = 0.95,
    k: float = 32.0,
    anchor: float = DEFAULT_ANCHOR,
    anchor_model: str | None = None,
    prior: float | None = None,
) -> dict[str, dict[str, np.ndarray]]:
    """Percentile intervals from ``n`` resamples of the judgments (with replacement).

    Returns ``{"win_rate" | "bt" | "elo": {"low": (m,), "high": (m,), "samples": (n, m)}}``
    in the order of ``models``. Each resample's sequential Elo runs over the
    resampled judgments in their (random) drawn order.
    """
    models = _model_list(outcomes, models)
    _check_level(level)
    if n < 1:
        raise ConfigError("bootstrap", f"must be >= 1, got {n}", "use e.g. 1000")
    m = len(models)
    ia, ib, s = _encode(outcomes, models)
    count = len(s)
    rng = np.random.default_rng(seed)
    win = np.empty((n, m))
    bt = np.empty((n, m))
    elo = np.full((n, m), anchor)
    block = max(1, min(n, 2_000_000 // max(1, count)))  # bounds memory of the (resamples, judgments) index
    for start in range(0, n, block):
        stop = min(n, start + block)
        idx = rng.integers(0, count, size=(stop - start, count)) if count else np.zeros((stop - start, 0), dtype=np.int64)
        for r in range(start, stop):
            rows = idx[r - start]
            W, N = _aggregate(ia[rows], ib[rows], s[rows], m)
            games = N.sum(axis=1)
            with np.errstate(invalid="ignore", divide="ignore"):
                win[r] = np.where(games > 0, W.sum(axis=1) / np.where(games > 0, games, 1.0), np.nan)
            bt[r], _, _ = _bt_from_counts(W, N, prior, 1e-9, 100)
        if count:
            elo[start:stop] = _elo_batch(ia[idx], ib[idx], s[idx], m, k, anchor)
    bt = theta_to_elo(bt, models, anchor, anchor_model)
    q = [(1 - level) / 2, 1 - (1 - level) / 2]
    out = {}
    for name, samples in (("win_rate", win), ("bt", bt), ("elo", elo)):
        lo, hi = np.full(m, np.nan), np.full(m, np.nan)
        seen = np.isfinite(samples).any(axis=0)  # a model without games in every resample has no win-rate interval
        if seen.any():
            lo[seen], hi[seen] = np.nanquantile(samples[:, seen], q, axis=0)
        out[name] = {"low": lo, "high": hi, "samples": samples}
    return out


# --------------------------------------------------------------------------- all together


def rate(
    outcomes: Sequence[Outcome],
    models: Sequence[str] | None = None,
    n_bootstrap: int = 1000,
    seed: int = 0,
    level: float = 0.95,
    k: float = 32.0,
    anchor: float = DEFAULT_ANCHOR,
    anchor_model: str | None = None,
    prior: float | None = None,
) -> RatingReport:
    """Win rates, Bradley-Terry (Elo scale) and sequential Elo with bootstrap intervals for every model."""
    outcomes = list(outcomes)
    models = _model_list(outcomes, models)
    records = win_records(outcomes, models)
    fit = bradley_terry(outcomes, models, prior=prior)
    bt = fit.ratings(anchor, anchor_model)
    elo = sequential_elo(outcomes, models, k=k, initial=anchor)
    if outcomes and n_bootstrap > 0:
        boot = bootstrap(outcomes, models, n_bootstrap, seed, level, k, anchor, anchor_model, prior)
    else:
        boot = {key: {"low": np.full(len(models), np.nan), "high": np.full(len(models), np.nan)} for key in ("win_rate", "bt", "elo")}
    rows = []
    for i, name in enumerate(models):
        rec = records[name]
        ci = {key: [float(boot[key]["low"][i]), float(boot[key]["high"][i])] for key in boot}
        rows.append(
            ModelRating(
                model=name, games=rec.games, wins=rec.wins, losses=rec.losses, ties=rec.ties,
                win_rate=rec.win_rate, win_rate_ci=ci["win_rate"],
                bt_rating=bt[name], bt_ci=ci["bt"], elo=elo[name], elo_ci=ci["elo"],
            )
        )
    rows.sort(key=lambda r: (-r.bt_rating, r.model))
    settings = dict(n_bootstrap=n_bootstrap, seed=seed, level=level, k_factor=k, anchor=anchor, anchor_model=anchor_model)
    return RatingReport(len(outcomes), rows, pairwise_win_rates(outcomes, models), fit.prior, settings)


def _nan_to_none(obj: Any) -> Any:
    if isinstance(obj, dict):
        return {k: _nan_to_none(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [_nan_to_none(v) for v in obj]
    if isinstance(obj, float) and not math.isfinite(obj):
        return None
    return obj


def outcomes_from_pairs(pairs: Iterable[tuple[str, str, str]]) -> list[Outcome]:
    """``[(model_a, model_b, "a" | "b" | "tie")] -> [Outcome]``."""
    score = {"a": 1.0, "b": 0.0, "tie": 0.5}
    out = []
    for a, b, choice in pairs:
        if choice not in score:
            raise ConfigError("choice", f"must be 'a', 'b' or 'tie', got {choice!r}", "use one of a, b, tie")
        out.append(Outcome(a, b, score[choice]))
    return out
