"""``PretrainModule``: next-token prediction on the mixed corpus."""

from __future__ import annotations

import math
from typing import Literal, Optional

import torch
from lightning.pytorch.utilities import rank_zero_info

from lmlab.distributed.hooks import data_parallel_rank_and_size
from lmlab.models.config import TransformerConfig
from lmlab.models.counting import count_params, flops_per_token, training_flops
from lmlab.models.heads import CausalLM
from lmlab.models.losses import compiled_head_nll, linear_cross_entropy, token_nll
from lmlab.models.transformer import documents_from_eos
from lmlab.modules.base import LMModuleBase, StepResult, add_up
from lmlab.modules.data_contract import PretrainData
from lmlab.modules.optim import FUSED_CE_AUTO_MIN_VOCAB, TrainingSettings

LN2 = math.log(2.0)


class PretrainModule(LMModuleBase):
    """Pretrains a :class:`~lmlab.models.heads.CausalLM` with mean next-token cross-entropy.

    L = -(1/T) sum_t log P(x_t | x_<t) over every target token of the global
    batch. Logs train/val loss, perplexity (exp of mean token NLL), bits per
    byte (summed NLL / (ln 2 * UTF-8 bytes of the targets), comparable across
    tokenizers), tokens seen, learning rate, pre-clip gradient norm,
    throughput and MFU; validation is reported per source and overall, and,
    when the data continues pretraining on a new domain (its
    ``val_source_groups``), pooled over the original mixture
    (``val/old_loss``, ``val/old_bpb``) and over the new domain
    (``val/new_loss``, ``val/new_bpb``).

    Args:
        config: Backbone shape (see :class:`~lmlab.models.config.TransformerConfig`).
        settings: Optimizer, schedule, clipping, compile and peak FLOP/s
            (see :class:`~lmlab.modules.optim.TrainingSettings`).
        init_from: Start from the weights of a checkpoint or export.
        flop_convention: How FLOPs are counted for MFU and the FLOP budget
            (see :mod:`lmlab.models.counting`).
    """

    stage = "pretrain"
    data_protocol = PretrainData

    def __init__(
        self,
        config: TransformerConfig,
        settings: Optional[TrainingSettings] = None,
        init_from: Optional[str] = None,
        flop_convention: Literal["6n", "kaplan", "palm"] = "palm",
    ):
        self.flop_convention = flop_convention
        super().__init__(config, settings, init_from)
        self.eos_id: Optional[int] = None
        self.register_buffer("token_bytes", torch.zeros(0, dtype=torch.long), persistent=False)
        self._val_sums: dict[int, torch.Tensor] = {}
        self._val_names: list[str] = []
        self._val_groups: dict[str, list[str]] = {}

    def build_model(self) -> CausalLM:
        return CausalLM(self.config)

    def flops_per_token(self) -> Optional[float]:
        return flops_per_token(self.config, self.seq_len, self.flop_convention)

    # -- setup ----------------------------------------------------------------------
    def setup(self, stage: str) -> None:
        super().setup(stage)
        dm = self.trainer.datamodule if self._trainer is not None else None
        if dm is not None and stage == "fit" and self.trainer.max_steps and self.trainer.max_steps > 0:
            self._announce(dm)

    def attach_data(self, dm: PretrainData) -> None:
        super().attach_data(dm)
        self.check_seq_len(dm.seq_len)
        self.seq_len = dm.seq_len
        self.eos_id = dm.eos_id
        self.token_bytes = torch.as_tensor(dm.token_bytes(), dtype=torch.long, device=self.device)
        self._val_names = dm.val_source_names
        # optional: only a DataModule that continues pretraining on a new domain has groups
        self._val_groups = dict(getattr(dm, "val_source_groups", None) or {})

    def _announce(self, dm) -> None:
        steps = self.trainer.max_steps
        tokens = dm.schedule.samples_before(steps) * dm.seq_len
        pc = count_params(self.config)
        c = training_flops(self.config, tokens, dm.seq_len, self.flop_convention)
        n = f"N={pc.non_embedding:,} non-embedding ({pc.total:,} total) params"
        if self.config.moe_experts:
            n = (f"N={pc.active_non_embedding:,} active non-embedding ({pc.non_embedding:,} with every expert, "
                 f"{pc.total:,} total) params")
        rank_zero_info(
            f"lmlab: {n}, "
            f"D={tokens:,} tokens over {steps:,} steps, C={c:.3e} FLOPs ({self.flop_convention})"
        )

    # -- loss -----------------------------------------------------------------------
    def uses_fused_cross_entropy(self) -> bool:
        """Whether the loss skips the full logits (see ``settings.fused_cross_entropy``).

        Needs the LM head's whole weight outside its forward: not with a whole-model
        compile, or parameters sharded by FSDP/tensor parallelism/ZeRO-3.
        """
        setting = self.settings.fused_cross_entropy
        wanted = setting is True or (setting == "auto" and self.config.padded_vocab_size >= FUSED_CE_AUTO_MIN_VOCAB)
        if not wanted or self._compiled is not None:
            return False
        return self._head_weight_is_whole()

    def _head_weight_is_whole(self) -> bool:
        """Whether the LM head's weight is whole on this device (not sharded by FSDP/TP/ZeRO-3)."""
        weight = self.model.lm_head.weight
        return not hasattr(weight, "device_mesh") and not hasattr(weight, "ds_id")

    def uses_compiled_head_loss(self) -> bool:
        """Whether the LM head and its loss run compiled (:func:`~lmlab.models.losses.compiled_head_nll`).

        They do when the blocks are compiled one by one (``compile: blocks``, or ``auto`` for a
        long run) and the head's weight is whole on this device; a whole-model compile already
        covers the head.
        """
        if self._compiled is not None or not getattr(self.model.backbone, "_compiled_blocks", None):
            return False
        return self._head_weight_is_whole()

    def _nll(self, tokens: torch.Tensor, normaliser: float = 1.0) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """Per-token NLL (B, T), targets, and the loss ``nll.sum() / normaliser`` for a (B, T+1) window batch."""
        inputs, targets = tokens[:, :-1], tokens[:, 1:]
        doc_ids = None
        if not self.config.cross_document_attention and self.eos_id is not None:
            doc_ids = documents_from_eos(inputs, self.eos_id)
        if self.uses_fused_cross_entropy():
            hidden = self.model.backbone(inputs, doc_ids=doc_ids)
            loss, nll = linear_cross_entropy(hidden, self.model.lm_head.weight, targets, normaliser)
            return nll, targets, loss
        if self.uses_compiled_head_loss():
            hidden = self.model.backbone(inputs, doc_ids=doc_ids)
            nll = compiled_head_nll(hidden, self.model.lm_head.weight, targets)
            return nll, targets, nll.sum() / normaliser
        nll = token_nll(self.net(inputs, doc_ids=doc_ids), targets)
        return nll, targets, nll.sum() / normaliser

    def _bytes(self, targets: torch.Tensor) -> torch.Tensor:
        if self.token_bytes.numel() == 0:
            return torch.zeros((), device=targets.device)
        return self.token_bytes[targets.clamp(max=self.token_bytes.numel() - 1)].sum()

    def batch_normaliser(self, batch: dict) -> int:
        # each micro-batch weighted by its share of target tokens: the sum is the global mean
        return batch["tokens"][:, 1:].numel()

    def micro_batch_loss(self, micro_batch: dict, normaliser: int):
        nll, targets, loss = self._nll(micro_batch["tokens"], normaliser)
        return loss, {"nll": nll.detach().sum(), "bytes": self._bytes(targets).float()}

    def training_metrics(self, batch: dict, outputs: list, normaliser: int) -> StepResult:
        sums = add_up(outputs)
        loss = sums["nll"] / normaliser
        if self.trainer.world_size > 1:
            # every rank holds an equal share of the global batch: the mean of means is the global mean
            loss = self.trainer.strategy.reduce(loss, reduce_op="mean")
        metrics = {
            "train/ppl": torch.exp(loss.clamp(max=50)),
            "train/bpb": sums["nll"] / (LN2 * sums["bytes"].clamp(min=1)),
            "train/global_batch": float(batch["tokens"].shape[0] * data_parallel_rank_and_size(self.trainer)[1]),
        }
        return StepResult(loss, metrics, normaliser)

    # -- validation -----------------------------------------------------------------
    def on_validation_epoch_start(self) -> None:
        self._val_sums = {}

    def validation_step(self, batch: torch.Tensor, batch_idx: int, dataloader_idx: int = 0) -> None:
        nll, targets, _ = self._nll(batch)
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
        for group, members in self._val_groups.items():
            rows = [names.index(m) for m in members if m in names]
            nll, n, nbytes = table[rows].sum(0).tolist() if rows else (0.0, 0.0, 0.0)
            if n > 0:
                metrics[f"val/{group}_loss"] = nll / n
                metrics[f"val/{group}_bpb"] = nll / (LN2 * max(nbytes, 1.0))
        nll, n, nbytes = table.sum(0).tolist()
        if n > 0:
            metrics["val/loss"] = nll / n
            metrics["val/ppl"] = math.exp(min(nll / n, 50))
            metrics["val/bpb"] = nll / (LN2 * max(nbytes, 1.0))
        if metrics:
            self.record_validation(metrics)

    def predict_step(self, batch: torch.Tensor, batch_idx: int, dataloader_idx: int = 0) -> dict:
        """Per-window mean NLL and bits per byte (``lmlab predict`` over the validation windows)."""
        nll, targets, _ = self._nll(batch)
        nbytes = self.token_bytes[targets.clamp(max=max(self.token_bytes.numel() - 1, 0))].sum(1) if self.token_bytes.numel() else None
        out = {"nll": nll.mean(1), "source": dataloader_idx}
        if nbytes is not None:
            out["bpb"] = nll.sum(1) / (LN2 * nbytes.clamp(min=1))
        return out
