"""The on-disk record of an offline sweep, so an interrupted sweep resumes where it stopped.

``<state dir>/sweep.json`` holds the sweep's identity (name, id, config hash)
and one entry per run: its parameters, state (``running``, ``finished``,
``failed``, ``interrupted``, ``queued``), metric, exit code, run directory and timing. It
is rewritten atomically (temp file, then rename) after every change, so a kill
at any moment leaves the previous complete state. A lock file keeps two
runners off the same directory.
"""

from __future__ import annotations

import json
import secrets
import string
from dataclasses import asdict, dataclass, field
from datetime import datetime, timezone
from pathlib import Path
from typing import Any, Optional

from lmlab.errors import ConfigError
from lmlab.atomic import FileLock, LockHeld, atomic_write_json
from lmlab.sweeps.spec import SweepSpec

STATE_FILE = "sweep.json"
VERSION = 1
#: States whose run must be launched again when the sweep resumes.
RESUMABLE = ("running", "interrupted", "queued")
TERMINAL = ("finished", "failed")


def now() -> str:
    """UTC timestamp, ISO format, seconds."""
    return datetime.now(timezone.utc).isoformat(timespec="seconds")


def new_run_id(taken: set[str]) -> str:
    """An 8-character lowercase id like W&B's, unique within ``taken``."""
    alphabet = string.ascii_lowercase + string.digits
    while True:
        rid = "".join(secrets.choice(alphabet) for _ in range(8))
        if rid not in taken:
            return rid


@dataclass
class RunEntry:
    """One run of the sweep."""

    id: str
    index: int
    params: dict[str, Any]
    state: str = "running"
    metric: Optional[float] = None
    returncode: Optional[int] = None
    error: Optional[str] = None
    run_dir: Optional[str] = None
    command: list[str] = field(default_factory=list)
    started_at: Optional[str] = None
    finished_at: Optional[str] = None
    attempts: int = 0

    def values(self) -> dict[str, Any]:
        """``{name: value}`` from the ``{name: {"value": v}}`` parameters."""
        return {k: v.get("value") if isinstance(v, dict) else v for k, v in self.params.items()}


@dataclass
class SweepState:
    """All runs of one sweep in one state directory."""

    directory: Path
    name: str
    sweep_id: str
    digest: str
    spec_path: str
    method: str
    metric: str
    goal: str
    created_at: str
    runs: list[RunEntry] = field(default_factory=list)

    @property
    def path(self) -> Path:
        return self.directory / STATE_FILE

    # -- persistence ------------------------------------------------------------------
    @classmethod
    def open(cls, directory: str | Path, spec: SweepSpec) -> SweepState:
        """Load the state of ``spec`` from ``directory``, or start a fresh one there."""
        directory = Path(directory)
        path = directory / STATE_FILE
        if not path.exists():
            return cls(
                directory=directory,
                name=spec.name,
                sweep_id=spec.sweep_id,
                digest=spec.digest,
                spec_path=spec.path,
                method=spec.method,
                metric=spec.metric,
                goal=spec.goal,
                created_at=now(),
            )
        try:
            data = json.loads(path.read_text())
        except (OSError, json.JSONDecodeError) as exc:
            raise ConfigError("--state", f"cannot read {path}: {exc}", "point --state at a sweep state directory or a new one") from None
        if data.get("digest") != spec.digest:
            raise ConfigError(
                "--state",
                f"{directory} holds sweep {data.get('name')!r} from {data.get('spec_path')} with a different configuration",
                "use a new --state directory for a changed sweep file",
            )
        runs = [RunEntry(**r) for r in data.get("runs", [])]
        keep = {k: data[k] for k in ("name", "sweep_id", "digest", "spec_path", "method", "metric", "goal", "created_at")}
        return cls(directory=directory, runs=runs, **keep)

    @classmethod
    def read(cls, directory: str | Path) -> dict[str, Any]:
        """The raw state of ``directory`` (for status reports), without a spec to check it against."""
        path = Path(directory) / STATE_FILE
        if not path.is_file():
            raise ConfigError(str(directory), "no sweep state here", f"pass the --state directory of a sweep (it holds {STATE_FILE})")
        return json.loads(path.read_text())

    def save(self) -> None:
        """Atomically rewrite the state file."""
        data = {
            "version": VERSION,
            "name": self.name,
            "sweep_id": self.sweep_id,
            "digest": self.digest,
            "spec_path": self.spec_path,
            "method": self.method,
            "metric": self.metric,
            "goal": self.goal,
            "created_at": self.created_at,
            "updated_at": now(),
            "runs": [asdict(r) for r in self.runs],
        }
        atomic_write_json(self.path, data, allow_nan=False)

    def lock(self):
        """An exclusive lock on the directory (non-blocking: a second runner fails at once)."""
        self.directory.mkdir(parents=True, exist_ok=True)
        lock = FileLock(self.directory / ".lock")
        try:
            lock.acquire(timeout=0)
        except LockHeld as e:
            raise ConfigError("--state", f"another `lmlab sweep run` (process {e.pid}) is using {self.directory}", "wait for it, or pass another --state") from None
        return lock

    # -- queries ----------------------------------------------------------------------
    def by_state(self, *states: str) -> list[RunEntry]:
        return [r for r in self.runs if r.state in states]

    def add(self, params: dict[str, Any]) -> RunEntry:
        """Register a new run with ``params``."""
        entry = RunEntry(id=new_run_id({r.id for r in self.runs}), index=len(self.runs), params=params)
        self.runs.append(entry)
        return entry

    def best(self) -> Optional[RunEntry]:
        """The finished run with the best metric."""
        done = [r for r in self.runs if r.state == "finished" and r.metric is not None]
        if not done:
            return None
        return (min if self.goal == "minimize" else max)(done, key=lambda r: r.metric)

    def sweep_runs(self) -> list:
        """The runs as the engine's ``SweepRun`` objects (finished ones carry the metric)."""
        from lmlab.sweeps.spec import import_sweeps

        sweeps = import_sweeps()
        out = []
        for r in self.runs:
            state = {"finished": "finished", "failed": "failed"}.get(r.state, "running")
            summary = {self.metric: r.metric} if r.metric is not None else {}
            out.append(sweeps.SweepRun(name=r.id, state=state, config=r.params, summary_metrics=summary))
        return out

