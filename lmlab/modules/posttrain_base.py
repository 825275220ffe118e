"""What the post-training stages (SFT, reward modelling, PPO, DPO) add to :class:`LMModuleBase`.

* ``model.config`` may be omitted when ``model.init_from`` names a checkpoint:
  the shape is taken from it, so a pretrained checkpoint flows into SFT and on
  into the reward model and PPO with one flag.
* Every checkpoint records the tokenizer it was trained with (vocabulary size
  and a fingerprint of the token-to-id map); loading weights trained with a
  different tokenizer than the data's is a ``ConfigError``, not garbage.
* Batches with nothing to train on are counted and skipped with a warning;
  non-finite losses stop training with a clear message before the optimizer
  step, so no corrupt weights reach a checkpoint.
"""

from __future__ import annotations

import logging
import os
from typing import Any, Optional

import torch

from lmlab.errors import ConfigError
from lmlab.models.checkpoint import Checkpoint, open_checkpoint
from lmlab.models.config import TransformerConfig
from lmlab.modules.base import LMModuleBase
from lmlab.modules.optim import OptimizerConfig, ScheduleConfig

log = logging.getLogger(__name__)

__all__ = ["PostTrainModuleBase", "resolve_config", "read_checkpoint_meta", "check_tokenizer_match", "split_batch"]


def resolve_config(config: Optional[TransformerConfig], init_from: Optional[str | Checkpoint], field: str = "model.config") -> TransformerConfig:
    """``config`` if given, else the model config stored with the ``init_from`` checkpoint."""
    if config is not None:
        return config
    if not init_from:
        raise ConfigError(field, "no model shape given", "set model.config, or model.init_from to a checkpoint that carries one")
    return open_checkpoint(init_from, "model.init_from").require_config()


def read_checkpoint_meta(path: str | os.PathLike | Checkpoint, field: str = "model.init_from") -> dict[str, Any]:
    """The ``lmlab`` metadata of a checkpoint (stage, model config, tokenizer record), or ``{}``.

    For an export directory the tokenizer saved beside the weights, if any,
    provides the tokenizer record.
    """
    ckpt = open_checkpoint(path, field)
    meta = dict(ckpt.meta)
    if ckpt.tokenizer_info is not None:
        meta["tokenizer"] = ckpt.tokenizer_info
    return meta


def check_tokenizer_match(expected: Optional[dict], found: Optional[dict], field: str, what: str) -> None:
    """Raise ``ConfigError`` when two tokenizer records (see :func:`~lmlab.data.posttrain_datamodules.tokenizer_info`) differ."""
    if not expected or not found:
        return
    if int(expected.get("vocab_size", -1)) != int(found.get("vocab_size", -1)) or expected.get("fingerprint") != found.get("fingerprint"):
        raise ConfigError(
            field,
            f"{what} was trained with a different tokenizer (vocab {found.get('vocab_size')}, fingerprint "
            f"{found.get('fingerprint')}) than this run's (vocab {expected.get('vocab_size')}, fingerprint {expected.get('fingerprint')})",
            "use checkpoints and data that share one tokenizer",
        )


def split_batch(batch: dict[str, Any], size: int) -> list[dict[str, Any]]:
    """Split every (B, ...) tensor of ``batch`` into chunks of ``size`` rows; lists are split alike."""
    n = next(v.shape[0] for v in batch.values() if isinstance(v, torch.Tensor))
    if size >= n:
        return [batch]
    chunks = []
    for start in range(0, n, size):
        chunk = {}
        for key, value in batch.items():
            if isinstance(value, torch.Tensor) and value.dim() > 0 and value.shape[0] == n:
                chunk[key] = value[start : start + size]
            elif isinstance(value, list) and len(value) == n:
                chunk[key] = value[start : start + size]
            else:
                chunk[key] = value
        chunks.append(chunk)
    return chunks


class PostTrainModuleBase(LMModuleBase):
    """Shared setup of the post-training stages: config from ``init_from``, tokenizer checks, skip accounting."""

    stage = "posttrain"
    #: submodules rebuilt from their own checkpoints in ``__init__`` (reference, reward model):
    #: left out of checkpoints, and filled back in from the fresh module on resume
    frozen_prefixes: tuple[str, ...] = ()

    def __init__(
        self,
        config: Optional[TransformerConfig] = None,
        optimizer: Optional[OptimizerConfig] = None,
        schedule: Optional[ScheduleConfig] = None,
        gradient_clip_val: float = 1.0,
        compile: bool = False,
        init_from: Optional[str] = None,
        peak_flops_per_device: Optional[float] = None,
    ):
        source = open_checkpoint(init_from, "model.init_from") if init_from else None
        config = resolve_config(config, source)
        super().__init__(config, optimizer, schedule, gradient_clip_val, compile, init_from, peak_flops_per_device)
        self.init_meta: dict[str, Any] = read_checkpoint_meta(source) if source is not None else {}
        self.tokenizer_info: Optional[dict[str, Any]] = self.init_meta.get("tokenizer")
        self.tokenizer = None
        self.pad_id = 0
        self.micro_batch_size: Optional[int] = None
        self.skipped_batches = 0

    # -- data checks -----------------------------------------------------------------
    def _datamodule(self):
        return getattr(self.trainer, "datamodule", None) if self._trainer is not None else None

    def setup(self, stage: str) -> None:
        super().setup(stage)
        dm = self._datamodule()
        if dm is not None:
            self.attach_data(dm)

    def attach_data(self, dm: Any) -> None:
        """Check the DataModule against the model and take its tokenizer, pad id and micro-batch size."""
        if dm.vocab_size > self.config.vocab_size:
            raise ConfigError(
                "model.config.vocab_size",
                f"tokenizer has {dm.vocab_size} tokens but the model only {self.config.vocab_size}",
                f"set model.config.vocab_size >= {dm.vocab_size}",
            )
        seq_len = getattr(dm, "seq_len", None)
        if seq_len is not None and seq_len > self.config.max_seq_len:
            raise ConfigError(
                "data.max_length",
                f"{seq_len} exceeds model.config.max_seq_len={self.config.max_seq_len}",
                "lower data.max_length or raise model.config.max_seq_len",
            )
        info = dm.tokenizer_info
        check_tokenizer_match(info, self.init_meta.get("tokenizer"), "model.init_from", f"checkpoint {self.init_from}")
        self.tokenizer_info = info
        self.tokenizer = dm.tokenizer
        self.pad_id = dm.pad_id
        self.micro_batch_size = getattr(dm, "micro_batch_size", None)

    # -- step helpers ------------------------------------------------------------------
    def skip_batch(self, reason: str) -> None:
        """Count and warn about a batch that cannot be trained on (it never yields a NaN loss)."""
        self.skipped_batches += 1
        log.warning("%s: skipped a batch at step %d (%s); %d skipped so far", self.stage, self.global_step, reason, self.skipped_batches)

    def check_finite(self, value: torch.Tensor, what: str) -> None:
        """Stop with a clear message (before any optimizer step) when ``value`` is NaN or infinite."""
        if not bool(torch.isfinite(value).all()):
            raise FloatingPointError(
                f"{self.stage}: non-finite {what} at step {self.global_step}; training stopped before the "
                "optimizer step, so no checkpoint holds corrupt weights (lower the learning rate or check the data)"
            )

    def on_before_optimizer_step(self, optimizer) -> None:
        super().on_before_optimizer_step(optimizer)
        if self._last_grad_norm is not None:
            self.check_finite(self._last_grad_norm, "gradient norm")

    # -- checkpoint metadata ------------------------------------------------------------
    def on_save_checkpoint(self, checkpoint: dict) -> None:
        super().on_save_checkpoint(checkpoint)
        if self.tokenizer_info:
            checkpoint["lmlab"]["tokenizer"] = dict(self.tokenizer_info)
        checkpoint["lmlab"]["skipped_batches"] = int(self.skipped_batches)
        state = checkpoint.get("state_dict")
        if state is not None and self.frozen_prefixes:
            for key in [k for k in state if k.startswith(self.frozen_prefixes)]:
                del state[key]

    def on_load_checkpoint(self, checkpoint: dict) -> None:
        super().on_load_checkpoint(checkpoint)
        meta = checkpoint.get("lmlab", {})
        state = checkpoint.get("state_dict")
        if state is not None and self.frozen_prefixes:
            for key, value in self.state_dict().items():
                if key.startswith(self.frozen_prefixes) and key not in state:
                    state[key] = value
        self.skipped_batches = int(meta.get("skipped_batches", 0))
        if meta.get("tokenizer"):
            self.tokenizer_info = dict(meta["tokenizer"])
