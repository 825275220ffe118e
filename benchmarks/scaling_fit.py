"""Benchmark the approach-3 (Chinchilla parametric) fitter against a plain per-start scipy loop.

    python benchmarks/scaling_fit.py [--loop-starts 270] [--resamples 1000] [--data DIR]

Times, in one process on the same 240 Chinchilla points (Epoch AI protocol) and
the same 5,400-start grid:

* the batched fitter (``fit_approach3``: batched L-BFGS over all starts with
  pruning, scipy polish of the winners), and without pruning;
* a plain loop of one ``scipy.optimize.minimize(L-BFGS-B)`` call per start, with
  the reference tolerances (``fit_approach3_scipy_loop``) and with scipy's default
  tolerances. Unless ``--loop-starts 0`` (all starts), the loops run on a seeded
  random subsample of the grid and their time is extrapolated linearly to the
  full grid; the output says so;
* a 1,000-resample bootstrap of the fit.

Threads are pinned (``--threads``, torch and BLAS, ``harness.pin_threads``).
The pruned fit and the reference loop alternate run by run
(``harness.alternate``, ``--repeat`` runs each) and their medians are
compared; the other rows are single runs or the fastest of ``--repeat``.

The speed-up of the batched fit over the reference scipy loop (extrapolated
to the full grid) is printed by ``harness.report_ratio``, with what differs
between the sides, and only when both sides ran.
"""

from __future__ import annotations

import argparse
import os
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

from harness import Side, alternate, pin_threads, report_ratio  # noqa: E402

if __name__ == "__main__":
    pin_threads(1)  # before numpy/scipy/torch load their thread pools

import numpy as np  # noqa: E402
import pandas as pd  # noqa: E402
from scipy.optimize import minimize  # noqa: E402

from lmlab.scaling.law import EPOCH_2024  # noqa: E402
from lmlab.scaling.objective import scalar_objective  # noqa: E402
from lmlab.scaling.parametric import GRID_5400, bootstrap_approach3, fit_approach3, fit_approach3_scipy_loop  # noqa: E402
from lmlab.scaling.results import ScalingData, from_frame  # noqa: E402

DEFAULT_DATA = Path(__file__).resolve().parents[2] / "shared" / "data" / "scaling"


def load_points(folder: Path) -> tuple[ScalingData, str]:
    """Epoch AI's Chinchilla points minus the 5 highest losses; synthetic stand-ins if the file is absent."""
    path = folder / "epoch_chinchilla_svg_extracted_data.csv"
    if path.is_file():
        frame = pd.read_csv(path)
        frame = frame[frame["loss"] < np.sort(frame["loss"].to_numpy())[-5]]
        return from_frame(frame, n_col="Model Size", d_col=None, compute_col="Training FLOP"), str(path)
    rng = np.random.default_rng(0)
    n = 10 ** rng.uniform(7.7, 10.2, 240)
    c = 10 ** rng.uniform(18.1, 22.1, 240)
    d = c / (6 * n)
    loss = EPOCH_2024.loss(n, d) * np.exp(0.01 * rng.normal(size=240))
    return from_frame(pd.DataFrame({"N": n, "D": d, "loss": loss})), "synthetic (Chinchilla file not found)"


def timed(fn, repeat: int = 1):
    """Result and the fastest wall time of ``repeat`` runs (the machine may be shared: min is the least noisy)."""
    best, out = np.inf, None
    for _ in range(max(1, repeat)):
        t0 = time.perf_counter()
        out = fn()
        best = min(best, time.perf_counter() - t0)
    return out, best


def default_scipy_loop(data: ScalingData, starts: np.ndarray) -> float:
    """Best objective of a loop of scipy L-BFGS-B calls at scipy's default tolerances."""
    logs = np.log(data.N), np.log(data.D), np.log(data.loss)
    best = np.inf
    for start in starts:
        res = minimize(scalar_objective, start, args=logs, jac=True, method="L-BFGS-B")
        best = min(best, float(res.fun))
    return best


def main(argv: list[str]) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--data", type=Path, default=DEFAULT_DATA, help="folder with epoch_chinchilla_svg_extracted_data.csv")
    parser.add_argument("--loop-starts", type=int, default=270, help="starts the scipy loops run (0 = all 5,400)")
    parser.add_argument("--resamples", type=int, default=1000, help="bootstrap resamples")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--repeat", type=int, default=3, help="alternated runs of the pruned fit and the reference loop")
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--fail", choices=("batched", "loop"), default=None, help="make this side raise (tests)")
    args = parser.parse_args(argv)
    pin_threads(args.threads)

    data, source = load_points(args.data)
    starts = GRID_5400.starts()
    n_grid = len(starts)
    if 0 < args.loop_starts < n_grid:
        sub = starts[np.random.default_rng(args.seed).choice(n_grid, args.loop_starts, replace=False)]
    else:
        sub = starts
    scale = n_grid / len(sub)
    note = "measured" if scale == 1 else f"{len(sub)} random starts, x{scale:.1f} extrapolated"

    r = args.repeat
    out: dict = {}

    def run(name, fn):
        def step():
            if args.fail == name:
                raise RuntimeError(f"--fail {name}")
            out[name] = fn()
        return step

    sides = [Side("batched", run("batched", lambda: fit_approach3(data))),
             Side("loop", run("loop", lambda: fit_approach3_scipy_loop(data, grid=sub)))]
    alternate(sides, steps=r, warmup=0)
    differs = (f"batched L-BFGS over all starts with pruning and a scipy polish vs one scipy L-BFGS-B call per start "
               f"with the same tolerances; loop time {'extrapolated from ' + str(len(sub)) + ' starts' if scale != 1 else 'measured'}")
    if any(s.error for s in sides):
        for s in sides:
            if s.error:
                print(f"{s.name} side failed: {s.error}")
        report_ratio("speed-up batched fit / reference scipy loop", None, None,
                     failed="; ".join(f"{s.name} side failed" for s in sides if s.error))
        return 1
    fast, t_fast = out["batched"], sides[0].median
    loop, t_loop = out["loop"], sides[1].median
    noprune, t_noprune = timed(lambda: fit_approach3(data, prune=None))
    loop_default, t_default = timed(lambda: default_scipy_loop(data, sub), r)
    boot, t_boot = timed(lambda: bootstrap_approach3(fast, n_resamples=args.resamples, seed=args.seed))

    print(f"approach-3 fit on {data.n_points} points from {source}")
    print(f"grid: {n_grid} starts; CPU threads visible: {os.cpu_count()}; python {sys.version.split()[0]}; "
          f"{args.threads} thread(s); times: median of {args.repeat} alternated runs for the pruned fit and the "
          f"reference loop, fastest of {args.repeat} for the default-tolerance loop, 1 run otherwise")
    print()
    header = f"{'method':<44}{'starts':>7}{'seconds':>11}{'full-grid s':>13}{'best objective':>17}  note"
    print(header)
    print("-" * len(header))
    rows = [
        ("batched L-BFGS + pruning + polish (default)", n_grid, t_fast, t_fast, fast.objective, "measured"),
        ("batched L-BFGS, no pruning, + polish", n_grid, t_noprune, t_noprune, noprune.objective, "measured"),
        ("scipy L-BFGS-B loop, reference tolerances", len(sub), t_loop, t_loop * scale, loop.objective, note),
        ("scipy L-BFGS-B loop, default tolerances", len(sub), t_default, t_default * scale, loop_default, note),
    ]
    for name, n, sec, full, obj, why in rows:
        print(f"{name:<44}{n:>7}{sec:>11.2f}{full:>13.2f}{obj:>17.10e}  {why}")
    print(f"{f'bootstrap, {args.resamples} resamples (2 starts each)':<44}{args.resamples * 2:>7}{t_boot:>11.2f}{'':>13}{'':>17}  measured")
    print()
    law = fast.law
    print(f"fit: E={law.E:.5f} A={law.A:.2f} B={law.B:.2f} alpha={law.alpha:.5f} beta={law.beta:.5f} "
          f"a={law.a:.4f}; max|grad|={fast.grad_max:.1e}")
    iv = boot.intervals(0.95)
    print("bootstrap 95%: " + ", ".join(f"{k} [{iv[k][0]:.4g}, {iv[k][1]:.4g}]" for k in ("E", "A", "B", "alpha", "beta", "a")))
    report_ratio("speed-up batched fit / reference-tolerance scipy loop", t_fast, t_loop * scale,
                 differences=differs, higher_is_better=False)
    report_ratio("speed-up batched fit / default-tolerance scipy loop", t_fast, t_default * scale,
                 differences=differs.replace("the same tolerances", "scipy's default tolerances"), higher_is_better=False)
    return 0


if __name__ == "__main__":
    raise SystemExit(main(sys.argv[1:]))
