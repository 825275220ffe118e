"""Behaviour every lmlab training stage shares: the one optimisation step.

Stages optimise manually: one ``training_step`` receives one global batch
(this rank's share) and runs as many micro-batches as it holds, so gradient
accumulation can change from step to step (the batch-size ramp) while
Lightning's precision plugins, strategies and checkpointing still apply.
Gradients are unscaled (fp16) before the clipping hook runs, so the logged
norm is the true pre-clip global norm.

A stage supplies only what differs (see :class:`LMModuleBase`): the model,
the normaliser of a batch (target tokens, pairs), the loss of one
micro-batch, and the metrics of the step. Splitting into micro-batches,
the accumulation context, ``manual_backward``, the non-finite check,
strategy-aware clipping, the optimizer and scheduler step and the step
statistics (learning rate, grad norm, tokens, throughput, MFU) live here once.
"""

from __future__ import annotations

import time
import warnings
from dataclasses import dataclass, field
from typing import Any, Iterable, Optional, Sequence

import lightning.pytorch as pl
from lightning.pytorch.utilities.warnings import PossibleUserWarning
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
from lmlab.models.checkpoint import open_checkpoint, tokenizer_record
from lmlab.models.config import TransformerConfig
from lmlab.models.moe import clear_router_records, collect_router_losses, load_metrics, moe_modules
from lmlab.modules.data_contract import StageData, require
from lmlab.modules.optim import TrainingSettings, build_optimizer, make_lr_lambda, resolve_compile
from lmlab.modules.progress import count_progress_in_optimizer_steps

__all__ = ["LMModuleBase", "RunMetadata", "StepResult", "split_batch", "add_up"]


def split_batch(batch: dict[str, Any], size: Optional[int]) -> list[dict[str, Any]]:
    """Split every (B, ...) tensor of ``batch`` into chunks of ``size`` rows; lists are split alike."""
    n = next(v.shape[0] for v in batch.values() if isinstance(v, torch.Tensor) and v.dim() > 0)
    if not size or size >= n:
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


def add_up(outputs: Sequence[dict[str, Any]]) -> dict[str, Any]:
    """Key-wise sum of the micro-batch outputs, in micro-batch order (so sums are reproducible)."""
    total = dict(outputs[0])
    for out in outputs[1:]:
        for key, value in out.items():
            total[key] = total[key] + value
    return total


@dataclass
class RunMetadata:
    """What a stage declares about its run, for callbacks (e.g. the run summary) to read.

    Args:
        stage: The stage name (``pretrain``, ``sft``, ...).
        model_config: The backbone shape.
        settings: Optimizer, schedule, clipping, compile and peak FLOP/s.
        tokens_seen: Tokens trained on so far, over every data-parallel replica.
        seq_len: Training sequence length (the model's context when the data has none).
        flop_convention: How training FLOPs are counted (see :mod:`lmlab.models.counting`).
        val_history: One dict of validation metrics per validation run (with its ``step``).
    """

    stage: str
    model_config: TransformerConfig
    settings: TrainingSettings
    tokens_seen: int
    seq_len: int
    flop_convention: str
    val_history: list[dict[str, Any]]


@dataclass
class StepResult:
    """What a stage reports for one training step: its loss, further metrics, and tokens processed (this rank)."""

    loss: torch.Tensor
    metrics: dict[str, Any] = field(default_factory=dict)
    tokens: int = 0


class LMModuleBase(pl.LightningModule):
    """Shared optimisation step, optimizer, schedule, clipping, checkpoint metadata and throughput logging.

    A stage implements :meth:`build_model`, :meth:`batch_normaliser`,
    :meth:`micro_batch_loss` and :meth:`training_metrics` (and optionally
    :meth:`flops_per_token`, :meth:`trainable_parameters`); PPO, whose step
    holds a rollout and several optimizer steps, overrides ``training_step``
    and calls :meth:`optimization_step` once per minibatch.
    """

    stage: str = "base"
    # stages that hold frozen networks (reference, reward, teacher) in eval mode, or run the policy in eval mode
    eval_modules_expected: bool = False
    #: what this stage reads from its DataModule (checked in ``setup``)
    data_protocol: type = StageData
    #: the DataModule setting named when the data's sequence length exceeds the model's
    seq_len_field: str = "data.seq_len"
    #: raised when a loss or gradient norm is not finite
    divergence_error: type[Exception] = FloatingPointError
    #: how training FLOPs are counted (see :mod:`lmlab.models.counting`)
    flop_convention: str = "palm"
    #: the stage stops on a non-finite gradient norm, so the norm is measured every step even without clipping
    checks_grad_norm: bool = False

    def __init__(
        self,
        config: TransformerConfig,
        settings: Optional[TrainingSettings] = None,
        init_from: Optional[str] = None,
    ):
        super().__init__()
        self.automatic_optimization = False
        self.config = config
        self.settings = settings or TrainingSettings()
        self.init_from = init_from
        self.tokens_seen = 0
        self._tokenizer_record: dict = {}
        self._tokenizer_recorded_for = None
        #: rows per forward/backward; from the DataModule (``None``: the whole batch)
        self.micro_batch_size: Optional[int] = None
        #: the data's sequence length, when it has one
        self.seq_len: Optional[int] = None
        #: one dict of validation metrics (and its ``step``) per validation run
        self.val_history: list[dict[str, Any]] = []
        self._last_step_time: Optional[float] = None
        self._interval_tokens = 0
        self._last_grad_norm: Optional[torch.Tensor] = None
        self.model: nn.Module = self.build_model()
        if init_from:
            self.load_initial_weights(init_from)
        self._compiled = None

    @property
    def gradient_clip_val(self) -> float:
        """The clipping threshold (also what the DeepSpeed strategy hands its engine)."""
        return self.settings.gradient_clip_val

    # -- to implement ---------------------------------------------------------
    def build_model(self) -> nn.Module:
        raise NotImplementedError

    def flops_per_token(self) -> Optional[float]:
        return None

    def batch_normaliser(self, batch: Any) -> Any:
        """What one batch's loss is normalised by (e.g. its target tokens); ``None`` skips the batch."""
        raise NotImplementedError

    def micro_batch_loss(self, micro_batch: Any, normaliser: Any) -> tuple[torch.Tensor, dict[str, Any]]:
        """``(loss, outputs)`` of one micro-batch.

        ``loss`` is this micro-batch's share of the batch loss (the shares sum
        to the batch loss, so the summed gradients are the batch gradient);
        ``outputs`` are detached values that :func:`add_up` can sum.
        """
        raise NotImplementedError

    def training_metrics(self, batch: Any, outputs: list[dict[str, Any]], normaliser: Any) -> StepResult:
        """Loss, metrics and token count of a step from its micro-batch outputs."""
        raise NotImplementedError

    def optimizer_steps_per_batch(self) -> int:
        """Optimizer steps one training batch takes (1 here; a PPO iteration takes several)."""
        return 1

    def trainable_parameters(self) -> Iterable[nn.Parameter]:
        """The parameters the optimizer updates and the clipping covers."""
        return self.model.parameters()

    # -- weights -----------------------------------------------------------------
    def load_initial_weights(self, path: str) -> None:
        ckpt = open_checkpoint(path, "model.init_from")
        src = ckpt.config
        if src is not None:
            for key in ("d_model", "n_layers", "n_heads", "kv_heads", "padded_vocab_size", "ffn_type", "hidden_dim"):
                if getattr(src, key) != getattr(self.config, key):
                    raise ConfigError(
                        "model.config",
                        f"{key}={getattr(self.config, key)} differs from the checkpoint's {getattr(src, key)}",
                        "copy the checkpoint's model.config (or omit model.config to take it)",
                    )
        ckpt.load_into(self.model)
        # a run started from a checkpoint keeps its tokenizer on record even when fitted without a DataModule
        self._tokenizer_record = _tokenizer_meta(ckpt.meta)

    def apply_compile(self, stage: str) -> None:
        """Compile as ``settings.compile`` asks (see :func:`~lmlab.modules.optim.resolve_compile`)."""
        trainer = self._trainer
        max_steps = trainer.max_steps if trainer is not None and stage == "fit" else None
        mode = resolve_compile(self.settings.compile, self.device, max_steps)
        if self.settings.compile == "auto" and trainer is not None and not _plain_strategy(trainer.strategy):
            # sharded strategies (FSDP, tensor/pipeline parallel, DeepSpeed) rewrap the blocks after setup:
            # compiling under them stays an explicit choice
            mode = "eager"
        config = getattr(self.model, "config", None)
        if self.settings.compile == "auto" and getattr(config, "moe_experts", 0):
            # expert widths change with the routing every step: the graph breaks and recompiles there
            # would cost more than compiling gains, so MoE backbones compile only when asked ("blocks")
            mode = "eager"
        if mode == "model" and self._compiled is None:
            self._compiled = torch.compile(self.model)
        elif mode == "blocks":
            for module in self.model.modules():
                if hasattr(module, "compile_blocks") and not module._compiled_blocks:
                    module.compile_blocks()

    @property
    def net(self) -> nn.Module:
        """The model to call: compiled when ``compile`` is set."""
        return self._compiled if self._compiled is not None else self.model

    def setup(self, stage: str) -> None:
        if stage == "fit" and self.eval_modules_expected:
            # Lightning warns at every fit that modules are in eval mode; in these stages that is the design
            warnings.filterwarnings("ignore", message=r"Found \d+ module\(s\) in eval mode", category=PossibleUserWarning)
        self.apply_compile(stage)
        dm = self.trainer.datamodule if self._trainer is not None else None
        if dm is not None:
            self.attach_data(dm)
        if stage == "fit" and self._trainer is not None and self.optimizer_steps_per_batch() != 1:
            count_progress_in_optimizer_steps(self.trainer, self.optimizer_steps_per_batch())

    def attach_data(self, dm: StageData) -> None:
        """Check the DataModule against the model and take what the stage reads from it."""
        require(dm, self.data_protocol)
        if dm.vocab_size > self.config.vocab_size:
            raise ConfigError(
                "model.config.vocab_size",
                f"tokenizer has {dm.vocab_size} tokens but the model only {self.config.vocab_size}",
                f"set model.config.vocab_size >= {dm.vocab_size}",
            )
        self.micro_batch_size = dm.micro_batch_size

    def check_seq_len(self, seq_len: int) -> None:
        """``ConfigError`` when the data's sequences are longer than the model's context."""
        if seq_len > self.config.max_seq_len:
            raise ConfigError(
                self.seq_len_field,
                f"{seq_len} exceeds model.config.max_seq_len={self.config.max_seq_len}",
                f"lower {self.seq_len_field} or raise model.config.max_seq_len",
            )

    # -- optimisation ---------------------------------------------------------------
    def configure_optimizers(self):
        opt = build_optimizer(self.model, self.settings.optimizer, cpu_offload=offloads_optimizer(self))
        max_steps = self.trainer.max_steps if self._trainer is not None and self.trainer.max_steps > 0 else None
        lr_lambda = make_lr_lambda(self.settings.schedule, max_steps)
        sched = torch.optim.lr_scheduler.LambdaLR(opt, lr_lambda)
        return {"optimizer": opt, "lr_scheduler": {"scheduler": sched, "interval": "step"}}

    def configure_model(self) -> None:
        """Apply lmlab's tensor-parallel + FSDP2 plan under ModelParallelStrategy (no-op otherwise)."""
        from lmlab.distributed.parallelize import maybe_parallelize

        maybe_parallelize(self)

    def micro_batches(self, batch: Any) -> list[Any]:
        """The batch split into chunks of ``micro_batch_size`` rows."""
        return split_batch(batch, self.micro_batch_size)

    def training_step(self, batch: Any, batch_idx: int):
        normaliser = self.batch_normaliser(batch)
        if normaliser is None:
            return None
        outputs = self.optimization_step(self.micro_batches(batch), normaliser)
        result = self.training_metrics(batch, outputs, normaliser)
        if self.is_logging_step():
            # Lightning turns logged tensors into numbers (a host sync each) for the loggers and the
            # progress bar: only on the steps the loggers write keeps the device running ahead
            self.log("train/loss", result.loss, prog_bar=True, on_step=True, on_epoch=False)
            self.log_dict(result.metrics, on_step=True, on_epoch=False)
        self.log_step_stats(result.tokens)
        return {"loss": result.loss}

    def is_logging_step(self, pending_updates: int = 0) -> bool:
        """Whether the loggers write this step's metrics (every ``log_every_n_steps``, and the last step).

        ``pending_updates``: optimizer updates of this step not yet counted in ``global_step`` (1 when asked
        before the update, as ``on_before_optimizer_step`` does).
        """
        trainer = self._trainer
        if trainer is None:
            return True
        if trainer.fast_dev_run or trainer.is_last_batch or trainer._logger_connector.should_update_logs:
            return True
        return (trainer.max_steps is not None and trainer.max_steps > 0
                and self.global_step + pending_updates >= trainer.max_steps)

    def optimization_step(self, micro_batches: Sequence[Any], normaliser: Any) -> list[dict[str, Any]]:
        """One optimizer update over ``micro_batches``; returns each micro-batch's outputs.

        Gradients accumulate over the micro-batches and are reduced across
        ranks on the last one only; a non-finite loss stops training before
        the optimizer step, so no corrupt update reaches a checkpoint.
        """
        outputs = []
        loss_sum: Optional[torch.Tensor] = None
        last = len(micro_batches) - 1
        router_stats = []
        for i, micro in enumerate(micro_batches):
            with accumulation_context(self, last=i == last):
                clear_router_records(self.expert_layers)
                loss, out = self.micro_batch_loss(micro, normaliser)
                # the one place router losses join every stage's loss: each micro-batch carries its share
                # (DDP's gradient mean over ranks then equals one process running the ranks' rows as micro-batches)
                aux, stats = collect_router_losses(self.expert_layers)
                if aux is not None:
                    loss = loss + aux / len(micro_batches)
                    router_stats.append(stats)
                self.manual_backward(loss)
            loss_sum = loss.detach() if loss_sum is None else loss_sum + loss.detach()
            outputs.append(out)
        # one host sync per step, not per micro-batch: a bad micro-batch only spoils gradients not yet applied
        self.check_finite(loss_sum, "loss")
        self.optimizer_update()
        if router_stats:
            self.log_dict(load_metrics(router_stats), on_step=True, on_epoch=False)
        return outputs

    @property
    def expert_layers(self) -> list:
        """The mixture-of-experts feed-forwards of ``self.model`` (empty for dense models)."""
        if getattr(self, "_expert_layers", None) is None:
            self._expert_layers = moe_modules(self.model)
        return self._expert_layers

    def check_finite(self, value: torch.Tensor, what: str) -> None:
        """Stop with a clear message (before any optimizer step) when ``value`` is NaN or infinite."""
        if not bool(torch.isfinite(value).all()):
            raise self.divergence_error(
                f"{self.stage}: non-finite {what} at step {self.global_step}; training stopped before the "
                "optimizer step, so no checkpoint holds corrupt weights (lower the learning rate or check the data)"
            )

    def on_before_optimizer_step(self, optimizer) -> None:
        # Runs after fp16 unscaling and before the update: the norm here is the true global one.
        if not self.settings.gradient_clip_val and not self.checks_grad_norm and not self.is_logging_step(1):
            # without clipping the norm is only logged: measuring it on the other steps would cost a read of
            # every gradient per step (1.7 ms, 0.2% of a 9M-parameter step on one CPU thread; 2-3% of a tiny one)
            self._last_grad_norm = None
            return
        self._last_grad_norm = clip_grad_norm(self, self.settings.gradient_clip_val, self.trainable_parameters())

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
        if self._last_step_time is None:
            # throughput counts from the end of the first step, which holds compilation and warm-up
            self._last_step_time, self._interval_tokens = now, 0
        else:
            self._interval_tokens += global_tokens
        if not self.is_logging_step():
            return
        opt = self.optimizers()
        lr = opt.param_groups[0]["lr"] if opt is not None else 0.0
        stats = {"train/lr": float(lr), "train/tokens_seen": float(self.tokens_seen)}
        if self._last_grad_norm is not None:
            stats["train/grad_norm"] = float(self._last_grad_norm)
        if self._interval_tokens:
            # mean over the steps since the last logged one: no per-step timing or sync needed
            tps = self._interval_tokens / max(now - self._last_step_time, 1e-9)
            stats["perf/tokens_per_sec"] = tps
            fpt = self.flops_per_token()
            peak = self.settings.peak_flops_per_device or detect_peak_flops(self.device, self.trainer.precision if self.trainer else None)
            if fpt and peak:
                stats["perf/mfu"] = fpt * tps / (peak * world)
            self._last_step_time, self._interval_tokens = now, 0
        self.log_dict(stats, on_step=True, on_epoch=False, rank_zero_only=True)

    def record_validation(self, metrics: dict[str, Any]) -> None:
        """Log one validation run's metrics and, outside the sanity check, add them to ``val_history``."""
        self.log_dict(metrics, on_step=False, on_epoch=True)
        if not self.trainer.sanity_checking:
            self.val_history.append({"step": int(self.global_step), **metrics})

    def run_metadata(self) -> RunMetadata:
        """What this run declares to callbacks (see :class:`RunMetadata`)."""
        return RunMetadata(
            stage=self.stage,
            model_config=self.config,
            settings=self.settings,
            tokens_seen=int(self.tokens_seen),
            seq_len=int(self.seq_len or self.config.max_seq_len),
            flop_convention=self.flop_convention,
            val_history=list(self.val_history),
        )

    # -- test = validation on the test loader ---------------------------------------
    def test_step(self, batch, batch_idx, dataloader_idx: int = 0):
        return self.validation_step(batch, batch_idx, dataloader_idx)

    def on_test_epoch_start(self) -> None:
        self.on_validation_epoch_start()

    def on_test_epoch_end(self) -> None:
        self.on_validation_epoch_end()

    # -- checkpoint metadata ---------------------------------------------------------------
    def run_tokenizer(self):
        """The tokenizer this run trains with (its DataModule's), or None when fitted without one."""
        trainer = self._trainer
        datamodule = getattr(trainer, "datamodule", None) if trainer is not None else None
        return getattr(datamodule, "tokenizer", None)

    def on_save_checkpoint(self, checkpoint: dict) -> None:
        # A diverging update can leave NaN weights behind a finite loss; a checkpoint of them
        # would load but never resume, so the run stops here, before anything is written.
        if not all(bool(torch.isfinite(p).all()) for p in self.parameters() if p.is_floating_point()):
            raise FloatingPointError(
                f"non-finite model weights at step {self.global_step}; no checkpoint written (lower the learning rate)"
            )
        # The model config and the tokenizer travel inside the file, as plain data, so any copy of it
        # works with eval, export and init_from on its own.
        checkpoint["lmlab"] = {
            "stage": self.stage,
            "model_config": self.config.to_dict(),
            "tokens_seen": int(self.tokens_seen),
            "torch_rng_state": torch.get_rng_state(),
        }
        tok = self.run_tokenizer()
        if tok is not None and tok is not self._tokenizer_recorded_for:
            self._tokenizer_record = tokenizer_record(tok)  # serialised once per tokenizer, not per save
            self._tokenizer_recorded_for = tok
        checkpoint["lmlab"].update(self._tokenizer_record)

    def on_load_checkpoint(self, checkpoint: dict) -> None:
        meta = checkpoint.get("lmlab", {})
        self._tokenizer_record = _tokenizer_meta(meta)
        self.tokens_seen = int(meta.get("tokens_seen", 0))
        if "torch_rng_state" in meta:
            torch.set_rng_state(meta["torch_rng_state"])


def _plain_strategy(strategy) -> bool:
    """Single-device or DDP: strategies that leave the blocks as they are."""
    return type(strategy).__name__ in ("SingleDeviceStrategy", "DDPStrategy")


def _tokenizer_meta(meta: dict) -> dict:
    """The tokenizer entries of a checkpoint's ``lmlab`` metadata (see :func:`~lmlab.models.checkpoint.tokenizer_record`)."""
    return {k: meta[k] for k in ("tokenizer", "tokenizer_files") if meta.get(k)}
