"""One summary record per pretraining run: the row a scaling-law fit needs.

:class:`RunSummary` is a Lightning callback. When ``fit`` ends it records

* N: non-embedding parameters (Kaplan et al.'s N, what ``budget.params``
  targets) and the total, from :func:`lmlab.models.counting.count_params`;
* D: tokens actually trained on;
* C: training FLOPs from :func:`lmlab.models.counting.training_flops` (6 N D
  plus the unembedding and attention terms, in the module's FLOP convention),
  also as PF-days, and Kaplan's 6 N D for comparison;
* the final and best validation loss and bits per byte;
* wall time, hardware (device name, count, precision), seed, run name, group,
  sweep id, and the hyperparameters (model shape, optimizer, schedule, batch);

and writes it to

* ``results_file`` (default: ``results.jsonl`` in the run folder,
  ``trainer.default_root_dir``): one JSON line per run, appended under a file lock;
* ``csv_file`` (optional; ``true``: the run folder's ``results.csv``): one row per run with the columns ``lmlab scaling
  fit`` reads (N, D, C, loss, ...);
* the active W&B run's summary, when a W&B logger is attached;
* ``$LMLAB_RUN_RESULT`` when set: the record alone as one JSON file, written
  atomically. ``lmlab sweep run`` sets it to read each run's metric back.

The module's numbers come from what it declares
(:meth:`~lmlab.modules.base.LMModuleBase.run_metadata`: model shape, settings,
tokens seen, sequence length, FLOP convention, validation history) and the
DataModule's from its declared protocol
(:class:`~lmlab.modules.data_contract.PretrainData`).

The final loss is measured at the last step: when the last optimizer step is
not a validation step, the callback asks Lightning to validate once more
before the loop stops (the early-stopping path, which validates before
stopping), so ``loss`` never comes from an earlier point of training.
"""

from __future__ import annotations

import csv
import dataclasses
import io
import json
import math
import os
import platform
import time
from datetime import datetime, timezone
from pathlib import Path
from typing import Any, Optional, Union

import lightning.pytorch as pl
import torch
from lightning.pytorch.utilities import rank_zero_info

from lmlab.atomic import FileLock, atomic_write_json
from lmlab.errors import ConfigError
from lmlab.models.counting import count_params, training_flops
from lmlab.modules.base import LMModuleBase, RunMetadata
from lmlab.modules.data_contract import PretrainData, StageData, provides
from lmlab.scaling.plan import pf_days

#: Environment variable naming a file that receives this run's record as one JSON object.
RESULT_ENV = "LMLAB_RUN_RESULT"

#: Columns of the CSV, in order; ``lmlab scaling fit`` reads N, D, C and loss.
CSV_COLUMNS = (
    "run_name",
    "group",
    "sweep_id",
    "N",
    "N_total",
    "N_expert_total",
    "D",
    "C",
    "C_6ND",
    "C_pf_days",
    "loss",
    "loss_best",
    "bpb",
    "bpb_best",
    "final_val_step",
    "steps",
    "lr",
    "warmup_steps",
    "schedule",
    "batch_size",
    "seq_len",
    "n_layers",
    "d_model",
    "n_heads",
    "seed",
    "device",
    "device_count",
    "precision",
    "wall_time_s",
    "finished_at",
)


def _cpu_name() -> str:
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine() or "cpu"


def device_name(device: torch.device) -> str:
    """Human-readable name of the accelerator ``device`` (the CPU model on CPU)."""
    if device.type == "cuda" and torch.cuda.is_available():
        return torch.cuda.get_device_name(device)
    if device.type == "cpu":
        return _cpu_name()
    return device.type


def _jsonable(value: Any) -> Any:
    """Plain JSON types: tensors and numpy scalars to numbers, NaN/inf to None, tuples to lists."""
    if isinstance(value, dict):
        return {str(k): _jsonable(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_jsonable(v) for v in value]
    if isinstance(value, torch.Tensor):
        value = value.item() if value.numel() == 1 else value.tolist()
    elif hasattr(value, "item") and not isinstance(value, (str, bytes)):
        value = value.item()
    if isinstance(value, float) and not math.isfinite(value):
        return None
    if isinstance(value, (str, int, float, bool)) or value is None:
        return value
    return str(value)


def append_jsonl(path: str | os.PathLike, record: dict) -> None:
    """Append one JSON line under a lock, so concurrent runs never interleave partial lines."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    line = json.dumps(_jsonable(record), allow_nan=False) + "\n"
    with FileLock(str(path) + ".lock"):
        with open(path, "a") as f:
            f.write(line)
            f.flush()
            os.fsync(f.fileno())


def append_csv(path: str | os.PathLike, record: dict, columns: tuple[str, ...] = CSV_COLUMNS) -> None:
    """Append ``record`` as a CSV row under a lock; a new file gets ``columns`` as its header.

    An existing file keeps its own header (rows follow its column order), so a
    results table grown by several versions of lmlab stays rectangular.
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    with FileLock(str(path) + ".lock"):
        header: list[str] = []
        if path.exists() and path.stat().st_size > 0:
            with open(path, newline="") as f:
                header = next(csv.reader(f), [])
        write_header = not header
        header = header or list(columns)
        buf = io.StringIO()
        writer = csv.DictWriter(buf, fieldnames=header, extrasaction="ignore", lineterminator="\n")
        if write_header:
            writer.writeheader()
        row = {k: ("" if record.get(k) is None else record.get(k)) for k in header}
        writer.writerow(row)
        with open(path, "a", newline="") as f:
            f.write(buf.getvalue())
            f.flush()
            os.fsync(f.fileno())


def _sweep_params() -> dict[str, Any]:
    """The sweep parameters of this run (``wandb agent`` and ``lmlab sweep run`` write them to a YAML)."""
    path = os.environ.get("WANDB_SWEEP_PARAM_PATH")
    if not path or not os.path.isfile(path):
        return {}
    import yaml

    try:
        data = yaml.safe_load(Path(path).read_text()) or {}
    except (OSError, yaml.YAMLError):
        return {}
    return {k: v.get("value") if isinstance(v, dict) else v for k, v in data.items() if k != "wandb_version"}


class RunSummary(pl.Callback):
    """Record N, D, C, final/best validation loss, hardware and hyperparameters of a pretraining run.

    Appends one JSON line to ``results_file`` and, if ``csv_file`` is set, one
    row to that CSV (readable by ``lmlab scaling fit``); updates the W&B run
    summary when a W&B logger is attached; writes ``$LMLAB_RUN_RESULT`` when
    that variable is set. Runs a last validation at the final step when the
    validation schedule would not.

    Args:
        results_file: JSON-lines file that gets one record per run (unset:
            ``results.jsonl`` in the run folder, ``trainer.default_root_dir``).
        csv_file: CSV file that gets one row per run; ``true``:
            ``results.csv`` in the run folder; unset: no CSV.
        validate_at_end: Force a validation at the last step when needed.
    """

    def __init__(self, results_file: Optional[str] = None, csv_file: Union[bool, str, None] = None,
                 validate_at_end: bool = True):
        super().__init__()
        self.results_file = results_file
        self.csv_file = csv_file
        self.validate_at_end = validate_at_end
        self.record: Optional[dict[str, Any]] = None
        self._t0: Optional[float] = None
        self._started_at: Optional[str] = None

    # -- hooks -------------------------------------------------------------------------
    def on_fit_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        self._t0 = time.perf_counter()
        self._started_at = datetime.now(timezone.utc).isoformat(timespec="seconds")

    def on_train_batch_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule, outputs, batch, batch_idx: int) -> None:
        if not self.validate_at_end or not trainer.max_steps or trainer.max_steps <= 0:
            return
        if trainer.global_step >= trainer.max_steps:
            # Lightning validates before honouring should_stop (the early-stopping path), so the
            # final loss is measured on the final weights even when the step is not a val step.
            trainer.should_stop = True

    def on_fit_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        record = self.build_record(trainer, pl_module)
        self.record = record
        if not trainer.is_global_zero:
            return
        append_jsonl(self.results_path(trainer), record)
        table = self.csv_path(trainer)
        if table:
            append_csv(table, record)
        target = os.environ.get(RESULT_ENV)
        if target:
            atomic_write_json(target, _jsonable(record), allow_nan=False)
        self._update_wandb(trainer, record)
        loss = record.get("loss")
        rank_zero_info(
            f"lmlab run summary: N={record['N']:,} D={record['D']:,} C={record['C']:.3e} "
            f"loss={'n/a' if loss is None else f'{loss:.4f}'} -> {self.results_path(trainer)}"
        )

    def results_path(self, trainer: pl.Trainer) -> str:
        """Where this run's JSON line goes: ``results_file``, else the run folder's ``results.jsonl``."""
        return str(self.results_file) if self.results_file else os.path.join(trainer.default_root_dir, "results.jsonl")

    def csv_path(self, trainer: pl.Trainer) -> Optional[str]:
        """Where this run's CSV row goes (None: no CSV)."""
        if self.csv_file is True:
            return os.path.join(trainer.default_root_dir, "results.csv")
        return str(self.csv_file) if self.csv_file else None

    # -- the record ------------------------------------------------------------------------
    def build_record(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> dict[str, Any]:
        """The summary of the run ``trainer`` just fitted (pure: writes nothing)."""
        meta = self._metadata(pl_module)
        cfg = meta.model_config
        dm = trainer.datamodule
        seq_len = meta.seq_len
        convention = meta.flop_convention
        counts = count_params(cfg)
        tokens = meta.tokens_seen
        flops = training_flops(cfg, tokens, seq_len, convention)

        history = meta.val_history
        final = history[-1] if history else {}
        if not final:
            # modules without a val history: the last logged values
            final = {k: float(v) for k, v in trainer.callback_metrics.items() if k.startswith("val/")}
            if final:
                final["step"] = int(trainer.global_step)
        losses = [h["val/loss"] for h in history if "val/loss" in h]
        bpbs = [h["val/bpb"] for h in history if "val/bpb" in h]

        opt = meta.settings.optimizer
        sched_dict = dataclasses.asdict(meta.settings.schedule)
        if sched_dict.get("total_steps") is None and trainer.max_steps and trainer.max_steps > 0:
            sched_dict["total_steps"] = int(trainer.max_steps)
        batch_size = dm.schedule.base if dm is not None and provides(dm, PretrainData) else None
        micro_batch_size = dm.micro_batch_size if dm is not None and provides(dm, StageData) else None

        wall = time.perf_counter() - self._t0 if self._t0 is not None else None
        names = self._names(trainer)
        seed = os.environ.get("PL_GLOBAL_SEED")
        record: dict[str, Any] = {
            **names,
            "status": "finished",
            # N is the active non-embedding count (all of it for dense models): compute per token follows it,
            # so scaling fits of mixture-of-experts runs use it; N_expert_total counts every expert
            "N": counts.active_non_embedding,
            "N_total": counts.total,
            "N_expert_total": counts.non_embedding,
            "N_active_total": counts.active,
            "N_embedding": counts.embedding,
            "D": tokens,
            "C": flops,
            "C_6ND": 6.0 * counts.active_non_embedding * tokens,
            "C_pf_days": pf_days(flops),
            "flop_convention": convention,
            "loss": final.get("val/loss"),
            "loss_best": min(losses) if losses else None,
            "bpb": final.get("val/bpb"),
            "bpb_best": min(bpbs) if bpbs else None,
            "ppl": final.get("val/ppl"),
            "final_val_step": final.get("step"),
            "steps": int(trainer.global_step),
            "lr": opt.lr,
            "warmup_steps": sched_dict.get("warmup_steps"),
            "schedule": sched_dict.get("name"),
            "batch_size": batch_size,
            "seq_len": seq_len,
            "n_layers": cfg.n_layers,
            "d_model": cfg.d_model,
            "n_heads": cfg.n_heads,
            "seed": int(seed) if seed not in (None, "") else None,
            "device": device_name(pl_module.device),
            "device_count": int(trainer.world_size),
            "accelerator": pl_module.device.type,
            "precision": str(trainer.precision),
            "wall_time_s": wall,
            "tokens_per_sec": tokens / wall if wall else None,
            "started_at": self._started_at,
            "finished_at": datetime.now(timezone.utc).isoformat(timespec="seconds"),
            "metrics": {k: v for k, v in final.items() if k != "step"},
            "val_history": history,
            "config": {
                "model": cfg.to_dict(),
                "optimizer": dataclasses.asdict(opt),
                "schedule": sched_dict,
                "gradient_clip_val": meta.settings.gradient_clip_val,
                "data": {"seq_len": seq_len, "batch_size": batch_size, "micro_batch_size": micro_batch_size},
                "trainer": {"max_steps": int(trainer.max_steps), "precision": str(trainer.precision), "world_size": int(trainer.world_size)},
            },
            "sweep_params": _sweep_params(),
            "results_file": self.results_path(trainer),
        }
        return _jsonable(record)

    @staticmethod
    def _metadata(pl_module: pl.LightningModule) -> RunMetadata:
        if not isinstance(pl_module, LMModuleBase):
            raise ConfigError("trainer.callbacks", f"RunSummary records lmlab stages, not {type(pl_module).__name__}",
                              "use an lmlab module (lmlab.modules) or drop the RunSummary callback")
        return pl_module.run_metadata()

    @staticmethod
    def _names(trainer: pl.Trainer) -> dict[str, Any]:
        """Run name, id, group, project and sweep id, from the W&B run when there is one, else env and loggers."""
        out: dict[str, Any] = {
            "run_name": os.environ.get("WANDB_NAME"),
            "run_id": os.environ.get("WANDB_RUN_ID"),
            "group": os.environ.get("WANDB_RUN_GROUP"),
            "project": os.environ.get("WANDB_PROJECT"),
            "sweep_id": os.environ.get("WANDB_SWEEP_ID"),
        }
        for logger in trainer.loggers:
            run = _wandb_run(logger)
            if run is not None:
                out.update(
                    run_name=getattr(run, "name", None) or out["run_name"],
                    run_id=getattr(run, "id", None) or out["run_id"],
                    group=getattr(run, "group", None) or out["group"],
                    project=getattr(run, "project", None) or out["project"],
                    sweep_id=getattr(run, "sweep_id", None) or out["sweep_id"],
                )
                break
        if not out["run_name"]:
            logger = trainer.logger
            if logger is not None:
                out["run_name"] = f"{logger.name}/{logger.version}" if logger.version is not None else str(logger.name)
            else:
                out["run_name"] = Path(trainer.default_root_dir).name or "run"
        return out

    @staticmethod
    def _update_wandb(trainer: pl.Trainer, record: dict[str, Any]) -> None:
        scalars = {k: v for k, v in record.items() if isinstance(v, (int, float, str)) and not isinstance(v, bool)}
        # N, D and C at the top level so W&B scaling plots can use them as axes directly
        summary = {k: scalars[k] for k in ("N", "D", "C") if k in scalars}
        summary.update({f"run/{k}": v for k, v in scalars.items() if k not in summary})
        renamed = {"loss": "val/loss_final", "loss_best": "val/loss_best", "bpb": "val/bpb_final", "bpb_best": "val/bpb_best"}
        summary.update({new: record[old] for old, new in renamed.items() if record.get(old) is not None})
        for logger in trainer.loggers:
            run = _wandb_run(logger)
            if run is None:
                continue
            run.summary.update(summary)
            try:
                run.config.update({"lmlab": record["config"]}, allow_val_change=True)
            except Exception:  # noqa: BLE001 - a config clash must not lose the summary
                pass


def _wandb_run(logger: Any) -> Any:
    """The live ``wandb.Run`` behind a Lightning W&B logger, else None (never creates a run)."""
    from lightning.pytorch.loggers import WandbLogger

    if not isinstance(logger, WandbLogger) or getattr(logger, "_experiment", None) is None:
        return None
    return logger.experiment
