"""``PretrainModule``: next-token prediction on the mixed corpus."""

from __future__ import annotations

import math
from typing import Literal, Optional

import torch
import torch.nn.functional as F
from lightning.pytorch.utilities import rank_zero_info

from lmlab.distributed.hooks import data_parallel_rank_and_size
from lmlab.errors import ConfigError
from lmlab.models.config import TransformerConfig
from lmlab.models.counting import count_params, flops_per_token, training_flops
from lmlab.models.heads import CausalLM
from lmlab.models.transformer import documents_from_eos
from lmlab.modules.base import LMModuleBase
from lmlab.modules.optim import OptimizerConfig, ScheduleConfig

LN2 = math.log(2.0)


class PretrainModule(LMModuleBase):
    """Pretrains a :class:`~lmlab.models.heads.CausalLM` with mean next-token cross-entropy.

    L = -(1/T) sum_t log P(x_t | x_<t) over every target token of the global
    batch. Logs train/val loss, perplexity (exp of mean token NLL), bits per
    byte (summed NLL / (ln 2 * UTF-8 bytes of the targets), comparable across
    tokenizers), tokens seen, learning rate, pre-clip gradient norm,
    throughput and MFU; validation is reported per source and overall.

    Args:
        config: Backbone shape (see :class:`~lmlab.models.config.TransformerConfig`).
        optimizer: AdamW settings; weight decay only on matrices.
        schedule: Learning-rate schedule.
        gradient_clip_val: Clip the global gradient norm to this (0: off).
        compile: ``torch.compile`` the backbone.
        init_from: Start from the weights of a checkpoint or export.
        peak_flops_per_device: Peak FLOP/s for MFU; default looked up from the
            device name (none on CPU, so MFU is logged only when this is set).
        flop_convention: How FLOPs are counted for MFU and the FLOP budget
            (see :mod:`lmlab.models.counting`).
    """

    stage = "pretrain"

    def __init__(
        self,
        config: TransformerConfig,
        optimizer: Optional[OptimizerConfig] = None,
        schedule: Optional[ScheduleConfig] = None,
        gradient_clip_val: float = 1.0,
        compile: bool = False,
        init_from: Optional[str] = None,
        peak_flops_per_device: Optional[float] = None,
        flop_convention: Literal["6n", "kaplan", "palm"] = "palm",
    ):
        self.flop_convention = flop_convention
        super().__init__(config, optimizer, schedule, gradient_clip_val, compile, init_from, peak_flops_per_device)
        self.seq_len: Optional[int] = None
        self.eos_id: Optional[int] = None
        self.register_buffer("token_bytes", torch.zeros(0, dtype=torch.long), persistent=False)
        self._val_sums: dict[int, torch.Tensor] = {}
        self._val_names: list[str] = []
        self.val_history: list[dict] = []

    def build_model(self) -> CausalLM:
        return CausalLM(self.config)

    def flops_per_token(self) -> Optional[float]:
        return flops_per_token(self.config, self.seq_len, self.flop_convention)

    # -- setup ----------------------------------------------------------------------
    def setup(self, stage: str) -> None:
        super().setup(stage)
        dm = getattr(self.trainer, "datamodule", None) if self.trainer is not None else None
        if dm is None:
            return
        if dm.vocab_size > self.config.vocab_size:
            raise ConfigError(
                "model.config.vocab_size",
                f"tokenizer has {dm.vocab_size} tokens but the model only {self.config.vocab_size}",
                f"set model.config.vocab_size >= {dm.vocab_size}",
            )
        if dm.seq_len > self.config.max_seq_len:
            raise ConfigError(
                "data.seq_len",
                f"{dm.seq_len} exceeds model.config.max_seq_len={self.config.max_seq_len}",
                "lower data.seq_len or raise model.config.max_seq_len",
            )
        self.seq_len = dm.seq_len
        self.eos_id = dm.eos_id
        self.micro_batch_size = dm.micro_batch_size
        self.token_bytes = torch.as_tensor(dm.token_bytes(), dtype=torch.long, device=self.device)
        self._val_names = dm.val_source_names
        if stage == "fit" and self.trainer.max_steps and self.trainer.max_steps > 0:
            self._announce(dm)

    def _announce(self, dm) -> None:
        steps = self.trainer.max_steps
        tokens = dm.schedule.samples_before(steps) * dm.seq_len
        pc = count_params(self.config)
        c = training_flops(self.config, tokens, dm.seq_len, self.flop_convention)
        rank_zero_info(
            f"lmlab: N={pc.non_embedding:,} non-embedding ({pc.total:,} total) params, "
            f"D={tokens:,} tokens over {steps:,} steps, C={c:.3e} FLOPs ({self.flop_convention})"
        )

    # -- loss -----------------------------------------------------------------------
    def _nll(self, tokens: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Per-token NLL (B, T) and targets for a (B, T+1) window batch."""
        inputs, targets = tokens[:, :-1], tokens[:, 1:]
        doc_ids = None
        if not self.config.cross_document_attention and self.eos_id is not None:
            doc_ids = documents_from_eos(inputs, self.eos_id)
        logits = self.net(inputs, doc_ids=doc_ids)
        nll = F.cross_entropy(logits.float().flatten(0, 1), targets.flatten(), reduction="none")
        return nll.view_as(targets), targets

    def _bytes(self, targets: torch.Tensor) -> torch.Tensor:
        if self.token_bytes.numel() == 0:
            return torch.zeros((), device=targets.device)
        return self.token_bytes[targets.clamp(max=self.token_bytes.numel() - 1)].sum()

    def training_step(self, batch: dict, batch_idx: int):
        tokens = batch["tokens"]
        micro = getattr(self, "micro_batch_size", None) or tokens.shape[0]
        chunks = tokens.split(micro)
        n_total = tokens[:, 1:].numel()
        loss_sum = torch.zeros((), device=self.device)
        byte_sum = torch.zeros((), device=self.device)
        for i, chunk in enumerate(chunks):
            with self.accumulation_context(last=i == len(chunks) - 1):
                nll, targets = self._nll(chunk)
                # each micro-batch weighted by its share of tokens: the sum is the global mean
                self.manual_backward(nll.sum() / n_total)
            loss_sum += nll.detach().sum()
            byte_sum += self._bytes(targets)
        if not torch.isfinite(loss_sum):
            raise FloatingPointError(f"non-finite training loss at step {self.global_step}; lower the learning rate")
        self.optimizer_update()
        loss = loss_sum / n_total
        if self.trainer.world_size > 1:
            # every rank holds an equal share of the global batch: the mean of means is the global mean
            loss = self.trainer.strategy.reduce(loss, reduce_op="mean")
        self.log("train/loss", loss, prog_bar=True, on_step=True, on_epoch=False, sync_dist=False)
        self.log_dict(
            {
                "train/ppl": torch.exp(loss.clamp(max=50)),
                "train/bpb": loss_sum / (LN2 * byte_sum.clamp(min=1)),
                "train/global_batch": float(tokens.shape[0] * data_parallel_rank_and_size(self.trainer)[1]),
            },
            on_step=True,
            on_epoch=False,
        )
        self.log_step_stats(n_total)
        return {"loss": loss}

    # -- validation -----------------------------------------------------------------
    def on_validation_epoch_start(self) -> None:
        self._val_sums = {}

    def validation_step(self, batch: torch.Tensor, batch_idx: int, dataloader_idx: int = 0) -> None:
        nll, targets = self._nll(batch)
        sums = torch.stack([nll.sum().double(), torch.tensor(float(nll.numel()), device=self.device).double(),
                            self._bytes(targets).double()])
        self._val_sums[dataloader_idx] = self._val_sums.get(dataloader_idx, torch.zeros(3, dtype=torch.float64, device=self.device)) + sums

    def on_validation_epoch_end(self) -> None:
        names = self._val_names or [f"source{i}" for i in sorted(self._val_sums)]
        table = torch.zeros(len(names), 3, dtype=torch.float64, device=self.device)
        for i, s in self._val_sums.items():
            if i < len(names):
                table[i] = s
        table = self.trainer.strategy.reduce(table, reduce_op="sum") if self.trainer.world_size > 1 else table
        metrics = {}
        for name, (nll, n, nbytes) in zip(names, table.tolist()):
            if n == 0:
                continue
            metrics[f"val/{name}/loss"] = nll / n
            metrics[f"val/{name}/bpb"] = nll / (LN2 * max(nbytes, 1.0))
        nll, n, nbytes = table.sum(0).tolist()
        if n > 0:
            metrics["val/loss"] = nll / n
            metrics["val/ppl"] = math.exp(min(nll / n, 50))
            metrics["val/bpb"] = nll / (LN2 * max(nbytes, 1.0))
        if metrics:
            self.log_dict(metrics, on_step=False, on_epoch=True, sync_dist=False)
            if not self.trainer.sanity_checking:
                self.val_history.append({"step": int(self.global_step), **metrics})

    def predict_step(self, batch: torch.Tensor, batch_idx: int, dataloader_idx: int = 0) -> dict:
        """Per-window mean NLL and bits per byte (``lmlab predict`` over the validation windows)."""
        nll, targets = self._nll(batch)
        nbytes = self.token_bytes[targets.clamp(max=max(self.token_bytes.numel() - 1, 0))].sum(1) if self.token_bytes.numel() else None
        out = {"nll": nll.mean(1), "source": dataloader_idx}
        if nbytes is not None:
            out["bpb"] = nll.sum(1) / (LN2 * nbytes.clamp(min=1))
        return out
