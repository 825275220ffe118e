"""Metric arithmetic, matching lm-evaluation-harness and Chen et al. (2021).

* Means are reported with the standard error ``sample_std / sqrt(n)`` where the
  sample standard deviation uses ``n - 1`` (lm-eval's ``mean_stderr``).
* Perplexity over per-item log-likelihoods is ``exp(-mean(ll))``; its standard
  error is bootstrapped, as lm-eval does for non-mean aggregates.
* pass@k uses the unbiased estimator ``1 - C(n-c, k) / C(n, k)`` in the
  numerically stable product form.
"""

from __future__ import annotations

import math
import re
import string
from collections.abc import Callable, Sequence

import numpy as np


def mean(values: Sequence[float]) -> float:
    """Arithmetic mean; NaN for an empty sequence."""
    return float(np.mean(values)) if len(values) else float("nan")


def sample_stddev(values: Sequence[float]) -> float:
    """Standard deviation with Bessel's correction (``n - 1``)."""
    return float(np.std(np.asarray(values, dtype=np.float64), ddof=1))


def mean_stderr(values: Sequence[float]) -> float | None:
    """Standard error of the mean, ``sample_stddev / sqrt(n)``; None when ``n < 2``."""
    n = len(values)
    if n < 2:
        return None
    return sample_stddev(values) / math.sqrt(n)


def perplexity(loglikelihoods: Sequence[float]) -> float:
    """``exp(-mean(ll))`` over per-item log-likelihoods (lm-eval's ``perplexity`` aggregate)."""
    return math.exp(-mean(loglikelihoods))


def bootstrap_stderr(
    statistic: Callable[[np.ndarray], float],
    values: Sequence[float],
    iters: int = 1000,
    seed: int = 1234,
) -> float | None:
    """Standard deviation of ``statistic`` over ``iters`` resamples with replacement.

    Seeded, so results are reproducible. None when there are fewer than 2 values.
    """
    arr = np.asarray(values, dtype=np.float64)
    n = len(arr)
    if n < 2 or iters < 2:
        return None
    rng = np.random.default_rng(seed)
    stats = np.empty(iters)
    chunk = max(1, min(iters, 2_000_000 // n))  # bound memory: chunk * n indices at a time
    for start in range(0, iters, chunk):
        stop = min(iters, start + chunk)
        idx = rng.integers(0, n, size=(stop - start, n))
        stats[start:stop] = [statistic(row) for row in arr[idx]]
    return float(np.std(stats, ddof=1))


def pass_at_k(n: int, c: int, k: int) -> float:
    """Unbiased pass@k for one problem with ``n`` samples of which ``c`` passed (Chen et al. 2021).

    ``1 - C(n-c, k) / C(n, k)`` computed as ``1 - prod_{i=n-c+1}^{n} (1 - k/i)``,
    which avoids the huge binomials.
    """
    if not 0 <= c <= n:
        raise ValueError(f"need 0 <= c <= n, got n={n}, c={c}")
    if not 1 <= k <= n:
        raise ValueError(f"need 1 <= k <= n, got n={n}, k={k}")
    if n - c < k:
        return 1.0  # every size-k subset contains a passing sample
    prod = 1.0
    for i in range(n - c + 1, n + 1):
        prod *= 1.0 - k / i
    return 1.0 - prod


_PUNCT_TABLE = str.maketrans("", "", string.punctuation)


def normalize_for_exact_match(
    text: str,
    *,
    ignore_case: bool = False,
    ignore_punctuation: bool = False,
    regexes_to_ignore: Sequence[str] = (),
) -> str:
    """Apply lm-eval's exact-match normalisation: drop regexes, then case, then punctuation."""
    for pattern in regexes_to_ignore:
        text = re.sub(pattern, "", text)
    if ignore_case:
        text = text.lower()
    if ignore_punctuation:
        text = text.translate(_PUNCT_TABLE)
    return text


def exact_match(
    prediction: str,
    reference: str,
    *,
    ignore_case: bool = False,
    ignore_punctuation: bool = False,
    regexes_to_ignore: Sequence[str] = (),
) -> bool:
    """Whether prediction and reference are equal after the same normalisation."""
    opts = dict(ignore_case=ignore_case, ignore_punctuation=ignore_punctuation, regexes_to_ignore=regexes_to_ignore)
    return normalize_for_exact_match(prediction, **opts) == normalize_for_exact_match(reference, **opts)
