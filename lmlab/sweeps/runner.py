"""Run a W&B sweep YAML on this machine, without a W&B server.

The W&B sweep engine (``sweeps.next_run``, the same open-source code the W&B
server runs) proposes each run's parameters from the runs so far; the command
is expanded as ``wandb agent`` expands it (:mod:`lmlab.sweeps.macros`); each
run is a subprocess, one at a time or ``parallel`` at once, with

* ``WANDB_MODE=offline``, ``WANDB_RUN_GROUP=<sweep name>``,
  ``WANDB_SWEEP_ID=<local id>``, ``WANDB_RUN_ID=<run id>``,
  ``WANDB_SWEEP_PARAM_PATH`` (the run's parameters as the agent writes them);
* ``LMLAB_RUN_RESULT=<run dir>/result.json``, which
  :class:`~lmlab.scaling.run_summary.RunSummary` fills with the run's summary,
  and ``LMLAB_RUN_DIR``;
* ``PATH`` starting with this interpreter's directory, so ``${interpreter}``
  (``python``) is the Python running the sweep.

The metric (``metric.name`` of the sweep, e.g. ``val/loss``) is read back from
``result.json``; a run that exits non-zero or reports no metric is recorded as
failed. State lives in ``<state dir>/sweep.json`` (see
:mod:`lmlab.sweeps.state`); rerunning the same command resumes: finished and
failed runs are kept, interrupted ones start again. Finished runs' summaries
are collected in ``<state dir>/results.jsonl`` and ``results.csv`` (the CSV
``lmlab scaling fit`` reads).
"""

from __future__ import annotations

import csv
import io
import json
import os
import random
import signal
import subprocess
import sys
import time
import warnings
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Optional

import numpy as np
import yaml

from lmlab.atomic import atomic_write_text
from lmlab.errors import ConfigError
from lmlab.scaling.run_summary import CSV_COLUMNS, RESULT_ENV, append_jsonl
from lmlab.sweeps.macros import expand_command, uses_macro
from lmlab.sweeps.preflight import check_lmlab_command
from lmlab.sweeps.spec import SweepSpec, import_sweeps
from lmlab.sweeps.state import RESUMABLE, RunEntry, SweepState, now

RESULTS_JSONL = "results.jsonl"
RESULTS_CSV = "results.csv"


def default_state_dir(spec: SweepSpec) -> Path:
    """``runs/sweeps/<sweep name>`` under the current directory."""
    return Path("runs") / "sweeps" / spec.name


@dataclass
class RunnerOptions:
    """How to run a sweep.

    Args:
        parallel: Runs at once.
        count: Most runs to launch in this invocation (None: until the sweep ends).
        state_dir: Where the state, run directories and collected results go.
        env: Extra environment variables for every run.
        seed: Seeds the engine's random proposals (random and bayes methods).
        retry_failed: Launch failed runs again.
        check: Dry-parse the command before launching.
        progress: Show a progress bar.
        serial_first: With ``parallel > 1`` and no finished run yet, run the
            first run alone: it builds the shared tokenizer and token caches
            that the others would otherwise all build at once.
    """

    parallel: int = 1
    count: Optional[int] = None
    state_dir: Optional[Path] = None
    env: dict[str, str] = field(default_factory=dict)
    seed: int = 0
    retry_failed: bool = False
    check: bool = True
    progress: bool = True
    serial_first: bool = True
    poll_seconds: float = 0.2


@dataclass
class _Active:
    entry: RunEntry
    proc: subprocess.Popen
    result_path: Path
    log: Any


def metric_from_record(record: dict[str, Any], name: str) -> Optional[float]:
    """The sweep metric from a run summary: final value in ``metrics``, else a top-level field."""
    for where in (record.get("metrics") or {}, record.get("summary") or {}, record):
        value = where.get(name) if isinstance(where, dict) else None
        if isinstance(value, (int, float)) and not isinstance(value, bool) and np.isfinite(value):
            return float(value)
    return None


class SweepRunner:
    """Propose, launch and record the runs of one sweep (see the module docstring)."""

    def __init__(self, spec: SweepSpec, options: Optional[RunnerOptions] = None):
        self.spec = spec
        self.options = options or RunnerOptions()
        if self.options.parallel < 1:
            raise ConfigError("--parallel", f"must be at least 1, got {self.options.parallel}", "pass --parallel 1 or more")
        if self.options.count is not None and self.options.count < 0:
            raise ConfigError("--count", f"must be positive, got {self.options.count}", "pass --count N with N >= 1")
        self.state_dir = Path(self.options.state_dir or default_state_dir(spec))
        self.python_dir = os.path.dirname(sys.executable)

    # -- proposals -------------------------------------------------------------------------
    def propose(self, runs: list) -> Optional[dict[str, Any]]:
        """Next parameters from the engine given ``runs`` (SweepRun objects), or None when the sweep is done."""
        sweeps = import_sweeps()
        # the engine samples with `random` and numpy's global state: seed both per proposal so a
        # sweep proposes the same runs whenever it is (re)started
        random.seed(f"{self.options.seed}-{len(runs)}")
        np.random.seed((self.options.seed * 100003 + len(runs)) % 2**32)
        try:
            with warnings.catch_warnings():
                warnings.simplefilter("ignore")
                run = sweeps.next_run(self.spec.config, runs)
        except (ValueError, KeyError, TypeError) as exc:
            raise ConfigError("parameters", f"the sweep engine rejects {self.spec.path}: {exc}", "fix the parameters section") from None
        return None if run is None else _plain(dict(run.config))

    def plan(self, n: Optional[int] = None) -> list[dict[str, Any]]:
        """Parameters of the runs the sweep would launch first (grid: all of them), without running."""
        sweeps = import_sweeps()
        limit = n if n is not None else self._default_plan_size()
        fake: list = []
        out = []
        while len(out) < limit:
            params = self.propose(fake)
            if params is None:
                break
            out.append(params)
            fake.append(sweeps.SweepRun(name=f"plan{len(out)}", state="running", config=params))
            if self.spec.method == "bayes":
                break  # later proposals depend on results
        return out

    def _default_plan_size(self) -> int:
        if self.options.count is not None:
            return self.options.count
        if self.spec.run_cap is not None:
            return self.spec.run_cap
        return 10**6 if self.spec.method == "grid" else 5

    # -- commands --------------------------------------------------------------------------
    def argv(self, params: dict[str, Any], json_file: Optional[str] = None) -> list[str]:
        """The expanded command line of a run with ``params``."""
        env = {**os.environ, **self.options.env}
        return expand_command(self.spec.command, params, program=self.spec.program, args_json_file=json_file, environ=env)

    def preflight(self) -> Optional[str]:
        """Validate the parameters with the engine and dry-parse the command; returns what was checked."""
        first = self.propose([])
        if first is None:
            raise ConfigError("parameters", f"{self.spec.path} proposes no run", "give every parameter at least one value")
        return check_lmlab_command(self.argv, first, self.spec.path)

    def _run_env(self, entry: RunEntry, run_dir: Path, result_path: Path, param_path: Path) -> dict[str, str]:
        env = dict(os.environ)
        env.update(
            WANDB_MODE="offline",
            WANDB_RUN_GROUP=self.spec.name,
            WANDB_SWEEP_ID=self.spec.sweep_id,
            WANDB_RUN_ID=entry.id,
            WANDB_SWEEP_PARAM_PATH=str(param_path),
            LMLAB_RUN_DIR=str(run_dir),
        )
        env[RESULT_ENV] = str(result_path)
        env["PATH"] = self.python_dir + os.pathsep + env.get("PATH", "")
        env.update(self.options.env)
        return env

    # -- running ---------------------------------------------------------------------------
    def _launch(self, entry: RunEntry) -> _Active:
        run_dir = self.state_dir / "runs" / f"{entry.index:04d}-{entry.id}"
        run_dir.mkdir(parents=True, exist_ok=True)
        result_path = run_dir / "result.json"
        result_path.unlink(missing_ok=True)
        param_path = run_dir / f"config-{entry.id}.yaml"
        json_path = run_dir / f"config-{entry.id}.json"
        # the agent's sweep parameter file: `wandb_version: 1` then the {name: {value: v}} mapping
        param_path.write_text("wandb_version: 1\n\n" + yaml.safe_dump(entry.params, default_flow_style=False, sort_keys=False))
        if uses_macro(self.spec.command, "args_json_file"):
            json_path.write_text(json.dumps(entry.values()))
        argv = self.argv(entry.params, str(json_path))
        entry.command = argv
        entry.run_dir = str(run_dir)
        entry.state = "running"
        entry.started_at = now()
        entry.finished_at = None
        entry.attempts += 1
        log = open(run_dir / "output.log", "w")
        log.write("$ " + " ".join(argv) + "\n")
        log.flush()
        try:
            # own session: a Ctrl-C reaches the runner, which stops the runs and records them as interrupted
            proc = subprocess.Popen(
                argv,
                env=self._run_env(entry, run_dir, result_path, param_path),
                stdout=log,
                stderr=subprocess.STDOUT,
                stdin=subprocess.DEVNULL,
                start_new_session=True,
            )
        except OSError as exc:
            log.close()
            entry.state, entry.error, entry.finished_at = "failed", f"cannot start {argv[0]!r}: {exc}", now()
            return None  # type: ignore[return-value]
        return _Active(entry=entry, proc=proc, result_path=result_path, log=log)

    def _finish(self, state: SweepState, active: _Active) -> None:
        entry = active.entry
        active.log.close()
        entry.returncode = active.proc.returncode
        entry.finished_at = now()
        record: Optional[dict[str, Any]] = None
        if active.result_path.is_file():
            try:
                record = json.loads(active.result_path.read_text())
            except (OSError, json.JSONDecodeError):
                record = None
        metric = metric_from_record(record, self.spec.metric) if record else None
        if entry.returncode == 0 and metric is not None:
            entry.state, entry.metric, entry.error = "finished", metric, None
            self._collect(state, entry, record)
        else:
            entry.state, entry.metric = "failed", metric
            if entry.returncode != 0:
                entry.error = f"exit code {entry.returncode}: {_last_line(Path(entry.run_dir) / 'output.log')}"
            elif record is None:
                entry.error = f"no {RESULT_ENV} result written (is RunSummary among the callbacks?)"
            else:
                entry.error = f"result has no finite {self.spec.metric!r}"

    def _collect(self, state: SweepState, entry: RunEntry, record: dict[str, Any]) -> None:
        row = dict(record)
        row.update({"sweep": self.spec.name, "sweep_run": entry.id, "metric": entry.metric, "params": entry.values()})
        append_jsonl(self.state_dir / RESULTS_JSONL, row)
        write_results_csv(self.state_dir / RESULTS_JSONL, self.state_dir / RESULTS_CSV, list(entry.params))

    def _new_left(self, state: SweepState) -> Optional[int]:
        """How many new runs ``run_cap`` still allows (None: no cap)."""
        if self.spec.run_cap is None:
            return None
        return max(0, self.spec.run_cap - len(state.runs))

    def run(self) -> SweepState:
        """Run (or resume) the sweep until it is done, ``count`` runs were launched, or it is interrupted."""
        if self.spec.method != "grid" and self.options.count is None and self.spec.run_cap is None:
            raise ConfigError("--count", f"a {self.spec.method} sweep never ends by itself", "pass --count N or set run_cap in the sweep")
        state = SweepState.open(self.state_dir, self.spec)
        lock = state.lock()
        previous = _interrupt_on_sigterm()
        try:
            return self._run(state)
        finally:
            if previous is not None:
                signal.signal(signal.SIGTERM, previous)
            lock.release()

    def _run(self, state: SweepState) -> SweepState:
        if self.options.check:
            self.preflight()
        queue = state.by_state(*RESUMABLE)
        if self.options.retry_failed:
            queue += state.by_state("failed")
        taken = {r.id for r in state.runs}
        from lmlab.sweeps.state import new_run_id

        for entry in queue:
            # a fresh W&B run id: the interrupted attempt's files stay where they are
            entry.id = new_run_id(taken)
            taken.add(entry.id)
            entry.state, entry.metric, entry.error, entry.returncode = "queued", None, None, None
        state.save()
        new_left = self._new_left(state)
        launches_left = self.options.count
        if launches_left is not None:
            queue = queue[:launches_left]
        possible = len(queue) + (new_left if new_left is not None else self._grid_left(state))
        total = possible if launches_left is None else min(possible, launches_left)
        bar = _progress(total, self.spec.name, self.options.progress)
        active: list[_Active] = []
        done_here = 0
        exhausted = False
        try:
            while True:
                wide = not (self.options.serial_first and self.options.parallel > 1 and not state.by_state("finished") and done_here == 0)
                slots = (self.options.parallel if wide else 1) - len(active)
                while slots > 0 and (launches_left is None or launches_left > 0):
                    if queue:
                        entry = queue.pop(0)
                    elif not exhausted and (new_left is None or new_left > 0):
                        params = self.propose(state.sweep_runs())
                        if params is None:
                            exhausted = True
                            continue
                        entry = state.add(params)
                        if new_left is not None:
                            new_left -= 1
                    else:
                        break
                    if launches_left is not None:
                        launches_left -= 1
                    launched = self._launch(entry)
                    state.save()
                    if launched is None:  # could not even start: recorded as failed
                        done_here += 1
                        bar.update(1)
                        continue
                    active.append(launched)
                    slots -= 1
                if not active:
                    break
                time.sleep(self.options.poll_seconds)
                for a in [a for a in active if a.proc.poll() is not None]:
                    active.remove(a)
                    self._finish(state, a)
                    state.save()
                    done_here += 1
                    bar.update(1)
                    self._report(bar, state, a.entry)
        except KeyboardInterrupt:
            for a in active:
                _stop(a.proc)
                a.log.close()
                a.entry.state, a.entry.error, a.entry.finished_at = "interrupted", "interrupted by the user", now()
            for entry in queue:
                entry.state = "interrupted"
            state.save()
            bar.close()
            raise
        bar.close()
        return state

    def _grid_left(self, state: SweepState) -> int:
        if self.spec.method != "grid":
            return 0
        sizes = [len(p.get("values", [None])) if isinstance(p, dict) and "values" in p else 1 for p in self.spec.parameters.values()]
        return max(0, int(np.prod(sizes)) - len(state.runs)) if sizes else 0

    def _report(self, bar, state: SweepState, entry: RunEntry) -> None:
        best = state.best()
        failed = len(state.by_state("failed"))
        if best is not None:
            bar.set_postfix_str(f"best {self.spec.metric}={best.metric:.4f}, failed {failed}")
        values = " ".join(f"{k}={v}" for k, v in entry.values().items())
        what = f"{self.spec.metric}={entry.metric:.4f}" if entry.state == "finished" else f"FAILED ({entry.error})"
        bar.write(f"[{entry.index}] {entry.id} {values}: {what}")


def _plain(value: Any) -> Any:
    """Numpy scalars (the random engine's samples) as Python numbers, for YAML/JSON and command lines."""
    if isinstance(value, dict):
        return {k: _plain(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_plain(v) for v in value]
    if isinstance(value, np.generic):
        return value.item()
    return value


def _interrupt_on_sigterm():
    """Treat SIGTERM like Ctrl-C (stop the runs, record them as interrupted); returns the old handler."""
    import threading

    if threading.current_thread() is not threading.main_thread():
        return None

    def handler(signum, frame):
        raise KeyboardInterrupt

    return signal.signal(signal.SIGTERM, handler)


def _progress(total: int, name: str, enabled: bool):
    from tqdm.auto import tqdm

    return tqdm(total=total or None, desc=f"sweep {name}", unit="run", disable=not enabled, file=sys.stderr, dynamic_ncols=True)


def _stop(proc: subprocess.Popen, grace: float = 10.0) -> None:
    """SIGTERM the run's process group, then SIGKILL after ``grace`` seconds."""
    try:
        os.killpg(proc.pid, signal.SIGTERM)
        proc.wait(timeout=grace)
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, signal.SIGKILL)
        proc.wait()
    except ProcessLookupError:
        pass


def _last_line(path: Path) -> str:
    try:
        lines = [ln.strip() for ln in path.read_text(errors="replace").splitlines() if ln.strip()]
    except OSError:
        return ""
    return lines[-1][:300] if lines else ""


def write_results_csv(jsonl: Path, out: Path, param_names: list[str]) -> None:
    """Rewrite ``out`` (atomically) from the collected summaries: RunSummary columns, parameters, metric."""
    rows = [json.loads(ln) for ln in jsonl.read_text().splitlines() if ln.strip()]
    names: list[str] = []
    for r in rows:
        for k in (r.get("params") or {}):
            if k not in names:
                names.append(k)
    for k in param_names:
        if k not in names:
            names.append(k)
    columns = ["sweep_run", *CSV_COLUMNS, *[f"param:{k}" for k in names], "metric"]
    buf = io.StringIO()
    writer = csv.DictWriter(buf, fieldnames=columns, extrasaction="ignore", lineterminator="\n")
    writer.writeheader()
    for r in rows:
        row = {k: r.get(k) for k in columns}
        row.update({f"param:{k}": v for k, v in (r.get("params") or {}).items()})
        writer.writerow({k: "" if v is None else v for k, v in row.items()})
    atomic_write_text(out, buf.getvalue())
