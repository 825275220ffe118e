"""Checks on a ``lmlab fit`` before its minutes of data setup.

Each check raises a one-line :class:`~lmlab.errors.ConfigError` naming the
field and the fix: trainer values Lightning would reject with a traceback (or
silently accept, like ``max_steps=0``), output folders that cannot be written,
a ``--ckpt_path`` that is missing, truncated, not a checkpoint or written by a
different model, ``--ckpt_path last`` with nothing to resume, and a fresh run
into a checkpoint folder that already holds another run's checkpoints.

:class:`RunFolderLock` keeps a second run out of a checkpoint folder while a
fit writes to it.
"""

from __future__ import annotations

import os
import zipfile
from pathlib import Path
from typing import Any, Iterable, Mapping, Optional

from lmlab.atomic import FileLock, LockHeld
from lmlab.errors import ConfigError

MODEL_CHECKPOINT = "lightning.pytorch.callbacks.ModelCheckpoint"


def _plain(obj: Any) -> Any:
    if hasattr(obj, "as_dict"):
        return obj.as_dict()
    return obj


def _int_at_least(trainer: Mapping, key: str, low: int, fix: str, allowed: tuple = ()) -> None:
    value = trainer.get(key)
    if value is None or value in allowed or isinstance(value, bool):
        return
    if isinstance(value, int) and value < low:
        raise ConfigError(f"trainer.{key}", f"must be >= {low}, got {value}", fix)


def check_trainer(trainer: Mapping) -> None:
    """Reject trainer values that cannot describe a training run."""
    trainer = _plain(trainer) or {}
    steps = trainer.get("max_steps")
    if isinstance(steps, int) and steps != -1 and steps < 1:
        raise ConfigError("trainer.max_steps", f"must be a positive number of optimizer steps (or -1 for no limit), got {steps}",
                          "e.g. --trainer.max_steps=1000")
    epochs = trainer.get("max_epochs")
    if isinstance(epochs, int) and epochs != -1 and epochs < 1:
        raise ConfigError("trainer.max_epochs", f"must be positive (or -1 for no limit), got {epochs}", "e.g. --trainer.max_epochs=1")
    _int_at_least(trainer, "accumulate_grad_batches", 1, "use 1 for no accumulation")
    _int_at_least(trainer, "log_every_n_steps", 1, "e.g. --trainer.log_every_n_steps=10")
    _int_at_least(trainer, "check_val_every_n_epoch", 1, "use null to validate by val_check_interval only")
    _int_at_least(trainer, "num_sanity_val_steps", -1, "use 0 to skip the sanity check, -1 for the full set")
    interval = trainer.get("val_check_interval")
    if isinstance(interval, (int, float)) and not isinstance(interval, bool):
        if isinstance(interval, float) and not 0.0 < interval <= 1.0:
            raise ConfigError("trainer.val_check_interval", f"a fraction of an epoch must be in (0, 1], got {interval}",
                              "use a fraction such as 0.25 or a whole number of steps such as 100")
        if isinstance(interval, int) and interval < 1:
            raise ConfigError("trainer.val_check_interval", f"must be a positive number of steps, got {interval}", "e.g. 100")
    for key in ("limit_train_batches", "limit_val_batches"):
        value = trainer.get(key)
        if isinstance(value, (int, float)) and not isinstance(value, bool) and value < 0:
            raise ConfigError(f"trainer.{key}", f"must not be negative, got {value}", "use a fraction in [0, 1] or a batch count")
    clip = trainer.get("gradient_clip_val")
    if isinstance(clip, (int, float)) and not isinstance(clip, bool) and clip < 0:
        raise ConfigError("trainer.gradient_clip_val", f"must not be negative, got {clip}", "use null to turn clipping off")


def _not_writable(path: Path) -> Optional[str]:
    """Why ``path`` (a directory, existing or to be created) cannot be written, or None."""
    probe = path
    while not probe.exists():
        if probe.parent == probe:
            return "no existing parent folder"
        probe = probe.parent
    if not probe.is_dir():
        return f"{probe} is a file, not a folder"
    if not os.access(probe, os.W_OK | os.X_OK):
        return f"{probe} is not writable"
    return None


def output_dirs(cfg: Mapping) -> list[tuple[str, str]]:
    """(field, folder) of every place a fit writes to, as configured."""
    trainer = _plain(cfg.get("trainer")) or {}
    out = []
    if trainer.get("default_root_dir"):
        out.append(("trainer.default_root_dir", str(trainer["default_root_dir"])))
    loggers = trainer.get("logger")
    loggers = loggers if isinstance(loggers, list) else [loggers]
    for i, logger in enumerate(loggers):
        if isinstance(logger, Mapping) and (logger.get("init_args") or {}).get("save_dir"):
            field = "trainer.logger.init_args.save_dir" if len(loggers) == 1 else f"trainer.logger[{i}].init_args.save_dir"
            out.append((field, str(logger["init_args"]["save_dir"])))
    for i, cb in enumerate(trainer.get("callbacks") or []):
        if isinstance(cb, Mapping) and (cb.get("init_args") or {}).get("dirpath"):
            out.append((f"trainer.callbacks[{i}].init_args.dirpath", str(cb["init_args"]["dirpath"])))
    return out


def check_output_dirs(cfg: Mapping) -> None:
    """Every output folder can be created and written (checked before anything is built or written)."""
    for field, folder in output_dirs(cfg):
        why = _not_writable(Path(os.path.expanduser(folder)))
        if why:
            raise ConfigError(field, f"cannot write to {folder}: {why}", "choose a folder you can write to")


def _loggers(trainer: Any) -> list:
    loggers = trainer.get("logger") if hasattr(trainer, "get") else None
    return [lg for lg in (loggers if isinstance(loggers, list) else [loggers]) if hasattr(lg, "get") and lg.get("init_args")]


def logs_follow_run_folder(cfg: Any) -> None:
    """A logger given without ``save_dir`` writes into the run folder, ``trainer.default_root_dir``.

    Lightning only does this for the logger it creates itself; the loggers a
    config names are built before the Trainer exists and never see it, so the
    folder is filled into the config before anything is instantiated. The
    loggers in :mod:`lmlab.loggers` leave ``save_dir`` optional for this
    (Lightning's CSV and TensorBoard loggers require it; its ``WandbLogger``
    keeps its own default, ``"."``).
    """
    trainer = cfg.get("trainer") if hasattr(cfg, "get") else None
    if trainer is None:
        return
    root = trainer.get("default_root_dir") or "."
    for logger in _loggers(trainer):
        args = logger["init_args"] if isinstance(logger, Mapping) else logger.init_args
        if "save_dir" in args and args["save_dir"] is None:
            args["save_dir"] = str(root)


def check_config(cfg: Mapping) -> None:
    """The config-level checks of a fit (before any class is instantiated); loggers without ``save_dir`` are
    pointed at the run folder first, so their folder is checked too."""
    logs_follow_run_folder(cfg)
    check_trainer(cfg.get("trainer") or {})
    check_output_dirs(cfg)


# --- checkpoint folders and resuming -----------------------------------------------------------


def checkpoint_dirs(trainer) -> list[Path]:
    """The checkpoint folder of every ModelCheckpoint of a Trainer: its ``dirpath``, or for lmlab's callback the
    run folder's ``checkpoints`` (Lightning's own derived folders are per-version and never shared between runs)."""
    from lightning.pytorch.callbacks import ModelCheckpoint

    from lmlab.callbacks import ModelCheckpoint as RunModelCheckpoint

    dirs = []
    for cb in trainer.callbacks:
        folder = cb.run_dirpath(trainer) if isinstance(cb, RunModelCheckpoint) else getattr(cb, "dirpath", None)
        if isinstance(cb, ModelCheckpoint) and folder:
            path = Path(os.path.expanduser(str(folder))).resolve()
            if path not in dirs:
                dirs.append(path)
    return dirs


def _checkpoints_in(folder: Path, pattern: str = "*.ckpt") -> list[Path]:
    return sorted(folder.glob(pattern)) if folder.is_dir() else []


def resolve_last(dirs: Iterable[Path]) -> Path:
    """The newest ``last*.ckpt`` among the checkpoint folders (what Lightning resumes from for ``last``)."""
    dirs = list(dirs)
    found = [p for d in dirs for p in _checkpoints_in(d, "last*.ckpt")]
    if not found:
        where = ", ".join(str(d) for d in dirs) or "no ModelCheckpoint with a dirpath"
        raise ConfigError("ckpt_path", f"'last' but there is no checkpoint to resume ({where})",
                          "start without --ckpt_path, or point it at a .ckpt file")
    return max(found, key=lambda p: p.stat().st_mtime)


def check_fresh_run(dirs: Iterable[Path]) -> None:
    """A run that does not resume must not mix its checkpoints with an earlier run's (Lightning would write
    ``last-v1.ckpt`` beside the old ``last.ckpt``)."""
    for d in dirs:
        old = _checkpoints_in(d)
        if old:
            names = ", ".join(p.name for p in old[:3]) + (", ..." if len(old) > 3 else "")
            raise ConfigError("ckpt_path", f"{d} already holds checkpoints of an earlier run ({names})",
                              f"resume it with --ckpt_path last, remove {d}, or give this run another "
                              "--trainer.default_root_dir")


# model.config fields that change parameter shapes, named first when a checkpoint does not fit
_SHAPE_FIELDS = ("vocab_size", "pad_vocab_to", "d_model", "n_layers", "n_heads", "n_kv_heads", "ffn_type", "ffn_hidden",
                 "tie_embeddings", "bias", "norm_type", "qk_norm", "position", "max_seq_len")


def _config_differences(saved: Mapping, current: Mapping) -> list[str]:
    diffs = [k for k in saved if k in current and saved[k] != current[k] and k != "preset"]
    return sorted(diffs, key=lambda k: (_SHAPE_FIELDS.index(k) if k in _SHAPE_FIELDS else len(_SHAPE_FIELDS), k))


SPECIAL_CKPT_PATHS = ("last", "best", "hpc")


def names_a_file(ckpt_path: Any) -> bool:
    """Whether a ``--ckpt_path`` value is a path (not ``last``/``best``/``hpc``/``registry...``)."""
    return bool(ckpt_path) and ckpt_path not in SPECIAL_CKPT_PATHS and not str(ckpt_path).startswith("registry")


def read_checkpoint(path: str | os.PathLike) -> Optional[Mapping]:
    """The checkpoint at ``path`` (memory-mapped, ``weights_only``), or None for a sharded checkpoint folder.
    A missing, truncated or foreign file is a ConfigError."""
    import torch

    p = Path(os.path.expanduser(str(path)))
    if p.is_dir():
        return None  # a sharded (FSDP / DeepSpeed) checkpoint: its strategy reads and checks it
    if not p.is_file():
        raise ConfigError("ckpt_path", f"{p} does not exist" if not p.exists() else f"{p} is not a file",
                          "point --ckpt_path at a .ckpt file, or use --ckpt_path last")
    if not zipfile.is_zipfile(p):
        # torch.save writes a zip archive whose directory sits at the end: a cut-off copy has none
        raise ConfigError("ckpt_path", f"{p} is truncated or not a checkpoint (no complete torch.save archive)",
                          "point --ckpt_path at a complete checkpoint, e.g. the run's last.ckpt")
    try:
        ckpt = torch.load(p, map_location="cpu", weights_only=True, mmap=True)
    except Exception as e:
        reason = (str(e).strip().splitlines() or [type(e).__name__])[0]
        raise ConfigError("ckpt_path", f"{p} is not a readable checkpoint (truncated, or not a .ckpt file): {reason}",
                          "point --ckpt_path at a complete checkpoint, e.g. the run's last.ckpt") from None
    state = ckpt.get("state_dict") if isinstance(ckpt, Mapping) else None
    if not isinstance(state, Mapping):
        raise ConfigError("ckpt_path", f"{p} is not a Lightning checkpoint (it has no state_dict)",
                          "resume from a .ckpt written by `lmlab fit`; start new weights with model.init_from")
    return ckpt


def check_resume_checkpoint(path: str | os.PathLike, module) -> Path:
    """``path`` is a complete checkpoint whose weights fit ``module``; returns it resolved."""
    p = Path(os.path.expanduser(str(path)))
    ckpt = read_checkpoint(p)
    if ckpt is None:
        return p
    state = ckpt["state_dict"]
    own = module.state_dict()
    mismatched = [k for k, v in own.items() if k in state and tuple(state[k].shape) != tuple(v.shape)]
    # post-training stages leave frozen copies (reference / reward models) out of their checkpoints
    frozen = tuple(getattr(module, "frozen_prefixes", None) or ())
    missing = [k for k in own if k not in state and not (frozen and k.startswith(frozen))]
    if mismatched or missing:
        saved_cfg = (ckpt.get("lmlab") or {}).get("model_config") if isinstance(ckpt.get("lmlab"), Mapping) else None
        current = getattr(getattr(module, "config", None), "to_dict", lambda: None)()
        diffs = _config_differences(saved_cfg, current) if saved_cfg and current else []
        if diffs:
            k = diffs[0]
            raise ConfigError(f"model.config.{k}", f"is {current[k]!r} but {p.name} was trained with {saved_cfg[k]!r}",
                              f"resume with the checkpoint's model.config (set {k}={saved_cfg[k]!r}) or drop --ckpt_path")
        if mismatched:
            k = mismatched[0]
            what = f"{k} has shape {tuple(state[k].shape)} in the checkpoint but {tuple(own[k].shape)} in the model"
        else:
            what = f"the checkpoint has no {missing[0]}"
        raise ConfigError("ckpt_path", f"{p} was written by a different model: {what}",
                          "resume with the model.config the checkpoint was trained with")
    return p


class RunFolderLock:
    """Exclusive use of the checkpoint folders of a fit: a second ``lmlab fit`` into the same folder stops with
    the first run's PID. The lock files sit beside the folders (``<dirpath>.lock``, so the folder itself only
    ever holds checkpoints) and are removed when the fit ends, however it ends."""

    def __init__(self, dirs: Iterable[Path]):
        self.locks = [FileLock(d.with_name(d.name + ".lock")) for d in dirs]

    def __enter__(self) -> "RunFolderLock":
        taken: list[FileLock] = []
        try:
            for lock in self.locks:
                try:
                    lock.acquire(timeout=0)
                except LockHeld as e:
                    folder = lock.path.with_name(lock.path.name[: -len(".lock")])
                    holder = f"process {e.pid}" if e.pid else "another process"
                    raise ConfigError("trainer.callbacks.ModelCheckpoint.dirpath",
                                      f"{folder} is in use by another `lmlab fit` ({holder})",
                                      "wait for it to finish, or give this run another --trainer.default_root_dir") from None
                taken.append(lock)
        except BaseException:
            for lock in taken:
                lock.release()
            raise
        return self

    def __exit__(self, *exc) -> None:
        for lock in self.locks:
            lock.release()


def is_global_zero_process() -> bool:
    """True in the process that launches a run (the only one that takes the run-folder lock): ranks started by
    Lightning's launcher or torchrun/SLURM carry a non-zero rank in their environment."""
    for var in ("RANK", "LOCAL_RANK", "NODE_RANK", "SLURM_PROCID"):
        value = os.environ.get(var)
        if value not in (None, "", "0"):
            return False
    return True
