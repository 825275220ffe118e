"""Start-up: time from ``lmlab fit`` to its first training step, against the floor of importing Lightning.

    python benchmarks/startup.py --runs 5 [--config experiments/quickstart.yaml]

Sides, each a fresh Python process, alternated run by run (benchmarks/harness.py):

* ``lmlab fit``: ``lmlab fit --config CONFIG --trainer.max_steps=1`` with
  ``throughput.FirstStepTimer``, stopped once the first training step starts;
* ``import lightning.pytorch``: ``python -c "import lightning.pytorch"``, the
  floor every ``lmlab fit`` pays before lmlab does anything (Lightning imports
  torchmetrics, which imports transformers, scipy.signal and matplotlib when
  they are installed, as they are with lmlab).

Both report wall time (from spawning the process) and the process's CPU time,
which other jobs on the cores do not inflate. The config's tokenizer and data
caches are built by an untimed first run, so the timed runs measure start-up,
not first-use data preparation. Byte-code caching is left on in the children
(``PYTHONDONTWRITEBYTECODE`` removed), as in an installed lmlab.
"""

from __future__ import annotations

import argparse
import os
import statistics
import subprocess
import sys
import tempfile
import time

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, HERE)
from harness import Side, alternate, report_ratio  # noqa: E402

MARK = "start-up to the first training step:"
FLOOR = "import time, lightning.pytorch; print(f'CPU {time.process_time():.3f}', flush=True)"


def child_env(threads: int) -> dict:
    env = dict(os.environ)
    env.pop("PYTHONDONTWRITEBYTECODE", None)
    env["PYTHONPATH"] = os.pathsep.join(p for p in (HERE, env.get("PYTHONPATH", "")) if p)
    for var in ("OMP_NUM_THREADS", "MKL_NUM_THREADS", "OPENBLAS_NUM_THREADS"):
        env[var] = str(threads)
    env.setdefault("WANDB_MODE", "offline")
    env.setdefault("TOKENIZERS_PARALLELISM", "false")
    return env


def run_until(cmd: list[str], env: dict, mark: str, cwd: str) -> float:
    """Run ``cmd`` until a stdout line starts with ``mark``; stop it there; return the CPU seconds it printed."""
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, env=env, cwd=cwd)
    tail: list[str] = []
    try:
        for line in proc.stdout:
            if line.startswith(mark):
                return float(line[len(mark):].split()[0])
            tail = (tail + [line.rstrip()])[-5:]
        raise RuntimeError(f"exited with {proc.wait()} before {mark!r}: {' | '.join(tail)}")
    finally:
        if proc.poll() is None:
            proc.kill()  # Lightning handles SIGTERM by finishing the run; the rest of it is not start-up
        proc.wait()
        proc.stdout.close()


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--config", default="experiments/quickstart.yaml")
    p.add_argument("--runs", type=int, default=5, help="timed runs per side (medians)")
    p.add_argument("--threads", type=int, default=2, help="torch/BLAS threads of the children")
    p.add_argument("--target", type=float, default=4.0, help="seconds to the first step to aim for")
    args = p.parse_args(argv)
    root = os.getcwd()
    env = child_env(args.threads)
    cpu = {"lmlab fit": [], "import lightning.pytorch": []}
    with tempfile.TemporaryDirectory() as tmp:
        runs = iter(range(10**9))

        def fit() -> None:
            cmd = [sys.executable, "-m", "lmlab.cli", "fit", "--config", args.config, "--trainer.max_steps=1",
                   "--trainer.callbacks+=throughput.FirstStepTimer", f"--trainer.default_root_dir={tmp}/run{next(runs)}"]
            cpu["lmlab fit"].append(run_until(cmd, env, MARK, root))

        def floor() -> None:
            cpu["import lightning.pytorch"].append(run_until([sys.executable, "-c", FLOOR], env, "CPU", root))

        sides = [Side("lmlab fit", fit), Side("import lightning.pytorch", floor)]
        t0 = time.perf_counter()
        # warm-up: builds the config's tokenizer and data caches and the byte-code caches
        alternate(sides, steps=args.runs, warmup=1)
    print(f"{args.config}: {args.runs} alternated runs per side after one warm-up, {args.threads} threads, "
          f"python {sys.version.split()[0]}, {time.perf_counter() - t0:.0f} s")
    for side in sides:
        if side.median is None:
            print(f"  {side.name:<26} failed: {side.error}")
            continue
        cpus = cpu[side.name][1:]  # the warm-up run is not timed
        print(f"  {side.name:<26} wall {side.median:6.2f} s (min {min(side.times):.2f})   "
              f"CPU {statistics.median(cpus):6.2f} s (min {min(cpus):.2f})")
    fit_side, floor_side = sides
    if fit_side.median is not None and floor_side.median is not None:
        cpu_fit, cpu_floor = (statistics.median(cpu[s.name][1:]) for s in sides)
        print(f"  lmlab above the floor: wall {fit_side.median - floor_side.median:+.2f} s, CPU {cpu_fit - cpu_floor:+.2f} s; "
              f"target {args.target:.1f} s to the first step: "
              f"{'met' if cpu_fit < args.target and fit_side.median < args.target else 'not met'} (CPU and wall)")
    ratio = report_ratio("  import lightning.pytorch time / lmlab fit time to the first step (wall)", fit_side.median,
                         floor_side.median, higher_is_better=False,
                         differences="lmlab fit also parses and checks the config, builds data, model and trainer, "
                                     "and times one matmul for its wall-time estimate")
    return 0 if ratio is not None else 1


if __name__ == "__main__":
    raise SystemExit(main())
