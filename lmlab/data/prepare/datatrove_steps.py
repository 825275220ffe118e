"""lmlab's pipeline stages as datatrove ``PipelineStep``s, for runs beyond one machine.

datatrove (``pip install datatrove``) schedules tasks locally
(``LocalPipelineExecutor``) or on Slurm (``SlurmPipelineExecutor``) and
records which tasks finished. Two adapters:

- :class:`LmlabStageStep` runs one per-source stage of ``lmlab data prepare``
  (collect, filter, quality, minhash, decontaminate, tokenize): task ``rank``
  of ``world_size`` computes the shards ``k`` with ``k % world_size == rank``
  and writes them exactly as the in-process engine does, so the prepared
  tokens are byte-identical whichever engine ran. ``lmlab data prepare
  --engine datatrove --tasks N --workers K`` uses it through
  :func:`datatrove_executor` (one machine), ``--engine slurm`` through
  :func:`slurm_executor` (a Slurm cluster).
- :class:`LmlabDocumentFilter` puts any lmlab ``doc -> (keep, reason)``
  callable (a :class:`~lmlab.data.prepare.filters.FilterStack`, a
  ``QualityFilter``, a ``Decontaminator``) into an ordinary datatrove
  pipeline between its readers and writers.

Only this module imports datatrove, and ``prepare`` imports it only for ``engine: datatrove``;
importing it without datatrove installed raises a one-line ``ConfigError``.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any, Callable

from lmlab.atomic import atomic_write_bytes
from lmlab.data.prepare.engine import ShardTask, StageRun, shard_name
from lmlab.errors import ConfigError

try:
    from datatrove.executor import LocalPipelineExecutor
    from datatrove.pipeline.base import PipelineStep
    from datatrove.pipeline.filters.base_filter import BaseFilter
except ImportError as _e:  # only this module needs datatrove, and only when asked for
    raise ConfigError(
        "engine.name",
        f"the datatrove engine needs datatrove ({_e})",
        "pip install 'datatrove>=0.4', or use --engine local",
    ) from None


class LmlabStageStep(PipelineStep):
    """Computes the shards ``k % world_size == rank`` of one lmlab stage into its partial directory."""

    name = "lmlab stage"
    type = "LMLAB"

    def __init__(self, run: StageRun, partial_dir: str | Path):
        self.name = f"{run.stage}/{run.source}"
        super().__init__()
        self.run_spec = run
        self.partial_dir = str(partial_dir)

    def run(self, data: Any = None, rank: int = 0, world_size: int = 1):
        if data:
            yield from data
        partial = Path(self.partial_dir)
        context = None
        n = 0
        for index, payload in self.run_spec.tasks():
            n = index + 1
            if index % world_size != rank or (partial / f"{shard_name(index)}.stats.json").exists():
                continue
            if context is None:  # built in the task: on Slurm every task builds its own
                context = self.run_spec.context()
            with self.track_time():
                stats = self.run_spec.process(context, ShardTask(index, payload, partial))
            self.stat_update("shards")
            self.stat_update("docs_in", value=int(stats.get("docs_in", 0)))
            self.stat_update("docs_out", value=int(stats.get("docs_out", 0)))
        if rank == 0:
            atomic_write_bytes(partial / "n_shards.txt", str(n).encode())


def datatrove_executor(
    logging_root: str | Path, tasks: int, workers: int, start_method: str = "fork"
) -> Callable[[StageRun, Path], None]:
    """An ``executor`` for :func:`~lmlab.data.prepare.engine.run_stage` running each stage with ``LocalPipelineExecutor``.

    Logs and stats go to ``logging_root/<stage>/<source>/<key>``. Completion is
    tracked per shard by the stage's partial directory (which a run without
    ``--resume`` clears), not by datatrove's per-task markers, so every task
    runs and skips the shards already written.
    """

    def execute(run: StageRun, partial: Path) -> None:
        executor = LocalPipelineExecutor(
            pipeline=[LmlabStageStep(run, partial)],
            tasks=tasks,
            workers=min(workers, tasks),
            logging_dir=str(Path(logging_root) / run.stage / run.source / run.key),
            skip_completed=False,
            start_method=start_method,
        )
        executor.run()

    return execute


def slurm_executor(
    logging_root: str | Path,
    tasks: int,
    partition: str,
    time: str = "04:00:00",
    poll_seconds: float = 30.0,
    max_wait_seconds: float | None = None,
    **slurm_kwargs: Any,
) -> Callable[[StageRun, Path], None]:
    """An ``executor`` for :func:`~lmlab.data.prepare.engine.run_stage` submitting each stage as a Slurm job array.

    Run ``lmlab data prepare --engine slurm`` on a login node, with ``OUT`` and
    the sources on a filesystem the compute nodes share. Each stage becomes one
    ``SlurmPipelineExecutor`` array of ``tasks`` tasks (``slurm_kwargs`` go to
    it: ``cpus_per_task``, ``mem_per_cpu_gb``, ``venv_path``, ``sbatch_args``,
    ...); this process waits until every task has marked itself complete, then
    commits the stage and goes on to the next.
    """
    import time as _time

    from datatrove.executor import SlurmPipelineExecutor

    def execute(run: StageRun, partial: Path) -> None:
        # a fresh logging folder per submission: old completion markers must not count as done
        attempt = f"{run.key}-{int(_time.time())}"
        executor = SlurmPipelineExecutor(
            pipeline=[LmlabStageStep(run, partial)],
            tasks=tasks,
            time=time,
            partition=partition,
            job_name=f"lmlab-{run.stage}-{run.source}",
            logging_dir=str(Path(logging_root) / run.stage / run.source / attempt),
            skip_completed=False,
            **slurm_kwargs,
        )
        executor.run()
        start = _time.monotonic()
        while executor.get_incomplete_ranks(skip_completed=True):
            if max_wait_seconds is not None and _time.monotonic() - start > max_wait_seconds:
                raise RuntimeError(f"{run.stage}/{run.source}: Slurm tasks not complete after {max_wait_seconds:.0f}s")
            _time.sleep(poll_seconds)

    return execute


class LmlabDocumentFilter(BaseFilter):
    """A datatrove filter applying an lmlab ``doc -> (keep, reason)`` callable to each ``Document``.

    The callable sees ``{"id", "text", "metadata"}``; text it rewrites (C4 line
    filtering) and metadata it adds (quality scores) flow back into the
    datatrove ``Document``. Drop reasons become datatrove stats ``dropped_<reason>``.
    """

    name = "lmlab filter"

    def __init__(self, fn: Callable[[dict], tuple[bool, str | None]], name: str | None = None, exclusion_writer: Any = None):
        if name:
            self.name = name  # before super().__init__, which names the stats after it
        super().__init__(exclusion_writer=exclusion_writer)
        self.fn = fn

    def filter(self, doc: Any) -> bool | tuple[bool, str]:
        d = {"id": doc.id, "text": doc.text, "metadata": doc.metadata}
        keep, reason = self.fn(d)
        if keep:
            doc.text = d["text"]
            doc.metadata = d.get("metadata") or doc.metadata
            return True
        return False, (reason or "dropped").replace(":", "_")
