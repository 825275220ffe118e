"""What every benchmark here shares: pinned threads, alternated timing, honest ratios.

A ratio is only meaningful when both sides ran the same work under the same
conditions, so:

* :func:`pin_threads` fixes torch's intra/inter-op threads and the BLAS/OpenMP
  thread counts (environment variables are read at library load, so call it
  before importing torch-heavy modules where possible);
* :func:`alternate` times the sides step by step in turn, so drift in machine
  load hits each side equally, and keeps the median;
* :func:`report_ratio` prints ``ours/baseline`` only when both sides produced a
  measurement, together with what differs between the sides, and otherwise says
  which side failed and prints no number.
"""

from __future__ import annotations

import os
import statistics
import time
from dataclasses import dataclass, field
from typing import Callable, Optional, Sequence

_THREAD_VARS = ("OMP_NUM_THREADS", "MKL_NUM_THREADS", "OPENBLAS_NUM_THREADS", "NUMEXPR_NUM_THREADS",
                "VECLIB_MAXIMUM_THREADS", "RAYON_NUM_THREADS")


def pin_threads(n: int) -> int:
    """Use ``n`` threads in torch and every BLAS/OpenMP pool; returns ``n``."""
    if n < 1:
        raise ValueError(f"--threads must be at least 1, got {n}")
    for var in _THREAD_VARS:
        os.environ[var] = str(n)
    import torch

    torch.set_num_threads(n)
    try:
        torch.set_num_interop_threads(1)
    except RuntimeError:  # already set once in this process: parallel work has started
        pass
    return n


@dataclass
class Side:
    """One side of a comparison: a name, a step function, and its timings."""

    name: str
    step: Callable[[], object]
    times: list = field(default_factory=list)
    error: Optional[str] = None

    @property
    def median(self) -> Optional[float]:
        return statistics.median(self.times) if self.times and self.error is None else None


def alternate(sides: Sequence[Side], steps: int, warmup: int = 1, sync: Callable[[], None] = lambda: None) -> None:
    """Run ``warmup`` untimed then ``steps`` timed calls of each side, in turn.

    A side whose step raises is marked failed (``error``) and skipped from then
    on; the others keep running so their numbers are still printed.
    """
    for i in range(warmup + steps):
        for side in sides:
            if side.error is not None:
                continue
            try:
                sync()
                t0 = time.perf_counter()
                side.step()
                sync()
                dt = time.perf_counter() - t0
            except Exception as exc:  # noqa: BLE001 - any failure means no ratio for this side
                side.error = f"{type(exc).__name__}: {exc}".splitlines()[0][:300]
                continue
            if i >= warmup:
                side.times.append(dt)


def report_ratio(label: str, ours: Optional[float], baseline: Optional[float], differences: str = "",
                 higher_is_better: bool = True, failed: Optional[str] = None) -> Optional[float]:
    """Print ``label: ratio`` (ours over baseline, >1 = ours better) or why there is none."""
    if failed or ours is None or baseline is None or baseline <= 0 or ours <= 0:
        why = failed or ("baseline side failed" if baseline is None or baseline <= 0 else "lmlab side failed")
        print(f"{label}: no ratio ({why})")
        return None
    ratio = ours / baseline if higher_is_better else baseline / ours
    print(f"{label}: {ratio:.3f}x" + (f"  [differs: {differences}]" if differences else ""))
    return ratio
