"""Behaviour every lmlab training stage shares.

Stages optimise manually: one ``training_step`` receives one global batch
(this rank's share) and runs as many micro-batches as it holds, so gradient
accumulation can change from step to step (the batch-size ramp) while
Lightning's precision plugins, strategies and checkpointing still apply.
Gradients are unscaled (fp16) before the clipping hook runs, so the logged
norm is the true pre-clip global norm.
"""

from __future__ import annotations

import time
from typing import Optional

import lightning.pytorch as pl
import torch
from torch import nn

from lmlab.distributed.hardware import detect_peak_flops
from lmlab.distributed.hooks import (
    accumulation_context,
    clip_grad_norm,
    data_parallel_rank_and_size,
    engine_grad_norm,
    offloads_optimizer,
)
from lmlab.errors import ConfigError
from lmlab.models.checkpoint import load_backbone_weights, load_model_state
from lmlab.models.config import TransformerConfig
from lmlab.modules.optim import OptimizerConfig, ScheduleConfig, build_optimizer, make_lr_lambda


class LMModuleBase(pl.LightningModule):
    """Shared optimizer, schedule, clipping, checkpoint metadata and throughput logging."""

    stage: str = "base"

    def __init__(
        self,
        config: TransformerConfig,
        optimizer: Optional[OptimizerConfig] = None,
        schedule: Optional[ScheduleConfig] = None,
        gradient_clip_val: float = 1.0,
        compile: bool = False,
        init_from: Optional[str] = None,
        peak_flops_per_device: Optional[float] = None,
    ):
        super().__init__()
        self.automatic_optimization = False
        self.config = config
        self.optimizer_config = optimizer or OptimizerConfig()
        self.schedule_config = schedule or ScheduleConfig()
        self.gradient_clip_val = gradient_clip_val
        self.compile_model = compile
        self.init_from = init_from
        self.peak_flops_per_device = peak_flops_per_device
        self.tokens_seen = 0
        self._last_step_time: Optional[float] = None
        self._last_grad_norm: Optional[torch.Tensor] = None
        self.model: nn.Module = self.build_model()
        if init_from:
            self.load_initial_weights(init_from)
        self._compiled = None

    # -- to implement ---------------------------------------------------------
    def build_model(self) -> nn.Module:
        raise NotImplementedError

    def flops_per_token(self) -> Optional[float]:
        return None

    # -- weights -----------------------------------------------------------------
    def load_initial_weights(self, path: str) -> None:
        cfg, state = load_model_state(path)
        if cfg is not None:
            src = TransformerConfig.from_dict(cfg)
            for key in ("d_model", "n_layers", "n_heads", "kv_heads", "padded_vocab_size", "ffn_type", "hidden_dim"):
                if getattr(src, key) != getattr(self.config, key):
                    raise ConfigError(
                        "model.config",
                        f"{key}={getattr(self.config, key)} differs from the checkpoint's {getattr(src, key)}",
                        "copy the checkpoint's model.config (or omit model.config to take it)",
                    )
        load_backbone_weights(self.model, state)

    @property
    def net(self) -> nn.Module:
        """The model to call: compiled when ``compile`` is set."""
        return self._compiled if self._compiled is not None else self.model

    def setup(self, stage: str) -> None:
        if self.compile_model and self._compiled is None:
            self._compiled = torch.compile(self.model)

    # -- optimisation ---------------------------------------------------------------
    def configure_optimizers(self):
        opt = build_optimizer(self.model, self.optimizer_config, cpu_offload=offloads_optimizer(self))
        max_steps = self.trainer.max_steps if self.trainer is not None and self.trainer.max_steps > 0 else None
        lr_lambda = make_lr_lambda(self.schedule_config, max_steps)
        sched = torch.optim.lr_scheduler.LambdaLR(opt, lr_lambda)
        return {"optimizer": opt, "lr_scheduler": {"scheduler": sched, "interval": "step"}}

    def configure_model(self) -> None:
        """Apply lmlab's tensor-parallel + FSDP2 plan under ModelParallelStrategy (no-op otherwise)."""
        from lmlab.distributed.parallelize import maybe_parallelize

        maybe_parallelize(self)

    def accumulation_context(self, last: bool):
        """Reduce gradients only on the last micro-batch (DDP no_sync, FSDP2, DeepSpeed boundary)."""
        return accumulation_context(self, last)

    def on_before_optimizer_step(self, optimizer) -> None:
        # Runs after fp16 unscaling and before the update: the norm here is the true global one.
        self._last_grad_norm = clip_grad_norm(self, self.gradient_clip_val)

    def optimizer_update(self) -> None:
        opt = self.optimizers()
        sched = self.lr_schedulers()
        opt.step()
        norm = engine_grad_norm(self)
        if norm is not None:
            self._last_grad_norm = norm
        opt.zero_grad(set_to_none=True)
        if sched is not None:
            sched.step()

    # -- logging helpers --------------------------------------------------------------
    def log_step_stats(self, tokens_this_step: int) -> None:
        """Learning rate, grad norm, tokens seen, throughput and MFU for the step just taken."""
        now = time.perf_counter()
        world = self.trainer.world_size if self.trainer is not None else 1
        # tensor-parallel ranks share their data: tokens scale with data-parallel replicas only
        global_tokens = tokens_this_step * data_parallel_rank_and_size(self.trainer)[1]
        self.tokens_seen += global_tokens
        opt = self.optimizers()
        lr = opt.param_groups[0]["lr"] if opt is not None else 0.0
        stats = {"train/lr": float(lr), "train/tokens_seen": float(self.tokens_seen)}
        if self._last_grad_norm is not None:
            stats["train/grad_norm"] = float(self._last_grad_norm)
        if self._last_step_time is not None:
            dt = now - self._last_step_time
            tps = global_tokens / max(dt, 1e-9)
            stats["perf/tokens_per_sec"] = tps
            fpt = self.flops_per_token()
            peak = self.peak_flops_per_device or detect_peak_flops(self.device, self.trainer.precision if self.trainer else None)
            if fpt and peak:
                stats["perf/mfu"] = fpt * tps / (peak * world)
        self._last_step_time = now
        self.log_dict(stats, on_step=True, on_epoch=False, rank_zero_only=True)

    # -- test = validation on the test loader ---------------------------------------
    def test_step(self, batch, batch_idx, dataloader_idx: int = 0):
        return self.validation_step(batch, batch_idx, dataloader_idx)

    def on_test_epoch_start(self) -> None:
        self.on_validation_epoch_start()

    def on_test_epoch_end(self) -> None:
        self.on_validation_epoch_end()

    # -- checkpoint metadata ---------------------------------------------------------------
    def on_save_checkpoint(self, checkpoint: dict) -> None:
        # A diverging update can leave NaN weights behind a finite loss; a checkpoint of them
        # would load but never resume, so the run stops here, before anything is written.
        if not all(bool(torch.isfinite(p).all()) for p in self.parameters() if p.is_floating_point()):
            raise FloatingPointError(
                f"non-finite model weights at step {self.global_step}; no checkpoint written (lower the learning rate)"
            )
        checkpoint["lmlab"] = {
            "stage": self.stage,
            "model_config": self.config.to_dict(),
            "tokens_seen": int(self.tokens_seen),
            "torch_rng_state": torch.get_rng_state(),
        }

    def on_load_checkpoint(self, checkpoint: dict) -> None:
        meta = checkpoint.get("lmlab", {})
        self.tokens_seen = int(meta.get("tokens_seen", 0))
        if "torch_rng_state" in meta:
            torch.set_rng_state(meta["torch_rng_state"])
