"""``DPOModule``: direct preference optimisation against a frozen reference policy."""

from __future__ import annotations

import copy
from typing import Any, Optional

import torch

from lmlab.data.posttrain.chat import IGNORE_INDEX
from lmlab.errors import ConfigError
from lmlab.models.checkpoint import open_checkpoint
from lmlab.models.config import TransformerConfig
from lmlab.models.heads import CausalLM
from lmlab.modules.base import StepResult, add_up
from lmlab.modules.data_contract import PreferenceData
from lmlab.modules.optim import TrainingSettings
from lmlab.modules.posttrain_base import PostTrainModuleBase, check_tokenizer_match
from lmlab.modules.preference_losses import dpo_loss
from lmlab.modules.rlhf_math import logprobs_from_logits

__all__ = ["DPOModule", "sequence_logps", "precompute_reference_logps"]


def sequence_logps(model: torch.nn.Module, input_ids: torch.Tensor, labels: torch.Tensor, vocab_size: int) -> torch.Tensor:
    """Summed log-probability of the labelled tokens of each right-padded row: (B,).

    ``labels`` are aligned with ``input_ids`` (``-100`` off the response), so
    the logits at position ``t`` score ``labels[t + 1]``.
    """
    logits = model(input_ids)[:, :-1, :vocab_size]
    lp = logprobs_from_logits(logits, labels[:, 1:], ignore_index=IGNORE_INDEX)
    return lp.sum(-1)


def _pair_logps(model: torch.nn.Module, batch: dict, vocab_size: int) -> tuple[torch.Tensor, torch.Tensor]:
    n = batch["chosen_input_ids"].shape[0]
    ids = torch.cat([batch["chosen_input_ids"], batch["rejected_input_ids"]])
    labels = torch.cat([batch["chosen_labels"], batch["rejected_labels"]])
    lp = sequence_logps(model, ids, labels, vocab_size).float()
    return lp[:n], lp[n:]


@torch.no_grad()
def precompute_reference_logps(model: torch.nn.Module, examples: list[dict], collate, vocab_size: int, batch_size: int = 32,
                               device: Optional[torch.device] = None, progress: Optional[str] = None) -> None:
    """Add ``ref_chosen_logps``/``ref_rejected_logps`` to every preference example, in place.

    ``progress``: show a progress bar with this description (None: silent).
    """
    was_training = model.training
    model.eval()
    starts = range(0, len(examples), batch_size)
    if progress is not None:
        from tqdm import tqdm

        starts = tqdm(starts, desc=progress, unit="batch", leave=False, dynamic_ncols=True)
    for start in starts:
        chunk = examples[start : start + batch_size]
        batch = {k: v.to(device) if device is not None else v for k, v in collate(chunk).items()}
        c, r = _pair_logps(model, batch, vocab_size)
        for ex, vc, vr in zip(chunk, c.tolist(), r.tolist()):
            ex["ref_chosen_logps"], ex["ref_rejected_logps"] = vc, vr
    model.train(was_training)


class DPOModule(PostTrainModuleBase):
    """Sigmoid DPO (Rafailov et al. 2023) on preference pairs.

    With ``h = (log pi(y_c|x) - log pi_ref(y_c|x)) - (log pi(y_r|x) - log pi_ref(y_r|x))``
    (log-probs summed over the reply tokens), the loss is
    ``-log sigmoid(beta * h)`` (with ``label_smoothing`` s: cDPO's
    ``-(1-s) log sigmoid(beta h) - s log sigmoid(-beta h)``). The reference
    is a frozen copy of the initial policy (or ``ref_model``); with
    ``precompute_reference`` its log-probs are computed once before training
    and the reference is dropped from memory; batches that already carry
    ``ref_chosen_logps``/``ref_rejected_logps`` use those.

    Logs ``train/loss`` and, with implicit rewards ``beta * (log pi - log pi_ref)``,
    ``train/rewards/chosen``, ``train/rewards/rejected``,
    ``train/rewards/accuracies``, ``train/rewards/margins``,
    ``train/logps/chosen``, ``train/logps/rejected``; the same under ``val/``.

    Args:
        config: Policy shape; omit to take it from ``init_from``.
        settings: Optimizer, schedule, clipping, compile and peak FLOP/s.
        init_from: Starting policy, usually an SFT checkpoint.
        beta: Strength of the implicit KL constraint.
        label_smoothing: Assumed label-flip probability (0: plain DPO).
        ref_model: Reference checkpoint (default: a frozen copy of the initial policy).
        precompute_reference: Compute reference log-probs once at the start and free the reference.
    """

    stage = "dpo"
    frozen_prefixes = ("ref_model.",)
    eval_modules_expected = True
    data_protocol = PreferenceData

    def __init__(
        self,
        config: Optional[TransformerConfig] = None,
        settings: Optional[TrainingSettings] = None,
        init_from: Optional[str] = None,
        beta: float = 0.1,
        label_smoothing: float = 0.0,
        ref_model: Optional[str] = None,
        precompute_reference: bool = False,
    ):
        if beta <= 0:
            raise ConfigError("model.beta", f"must be > 0, got {beta}", "use e.g. 0.1")
        if not 0.0 <= label_smoothing < 0.5:
            raise ConfigError("model.label_smoothing", f"must lie in [0, 0.5), got {label_smoothing}", "use 0 for plain DPO")
        self.beta = float(beta)
        self.label_smoothing = float(label_smoothing)
        self.precompute_reference = precompute_reference
        super().__init__(config, settings, init_from)
        if ref_model:
            ref_ckpt = open_checkpoint(ref_model, "model.ref_model")
            ref = ref_ckpt.causal_lm()
            if ref.config.vocab_size != self.config.vocab_size:
                raise ConfigError("model.ref_model", f"vocab_size {ref.config.vocab_size} differs from the policy's {self.config.vocab_size}",
                                  "use a reference trained with the same tokenizer")
            check_tokenizer_match(self.init_meta.get("tokenizer"), ref_ckpt.tokenizer_info,
                                  "model.ref_model", f"reference {ref_model}")
        else:
            ref = copy.deepcopy(self.model)
        ref.requires_grad_(False)
        self.ref_model: Optional[CausalLM] = ref.eval()
        self._val: list[torch.Tensor] = []

    def build_model(self) -> CausalLM:
        return CausalLM(self.config)

    def on_fit_start(self) -> None:
        if not self.precompute_reference or self.ref_model is None:
            return
        dm = self.trainer.datamodule  # setup already checked it against PreferenceData
        if dm is None:
            raise ConfigError("model.precompute_reference", "needs a PreferenceDataModule", "use lmlab.data.posttrain.datamodules.PreferenceDataModule")
        dm.setup("fit")
        collate = dm._collate()
        # this can take minutes on a large set: show progress wherever the trainer shows its own
        show = self.trainer.progress_bar_callback is not None and self.trainer.is_global_zero
        for split, examples in (("train", dm.train_examples), ("validation", dm.val_examples)):
            if examples:
                precompute_reference_logps(self.ref_model, examples, collate, self.config.vocab_size,
                                           batch_size=dm.val_batch_size, device=self.device,
                                           progress=f"dpo: reference log-probs ({split})" if show else None)
        # the reference is no longer needed: free it (its log-probs now travel with the batches)
        self.ref_model = None

    def reference_logps(self, batch: dict) -> tuple[torch.Tensor, torch.Tensor]:
        """Reference log-probs of both sides: from the batch when precomputed, else from the frozen reference."""
        if "ref_chosen_logps" in batch and "ref_rejected_logps" in batch:
            return batch["ref_chosen_logps"].float(), batch["ref_rejected_logps"].float()
        if self.ref_model is None:
            raise ConfigError("model.precompute_reference", "a batch carries no reference log-probs and the reference was freed",
                              "precompute for every split or keep the reference model")
        with torch.no_grad():
            self.ref_model.eval()
            return _pair_logps(self.ref_model, batch, self.config.vocab_size)

    def _loss(self, batch: dict):
        pc, pr = _pair_logps(self.net, batch, self.config.vocab_size)
        rc, rr = self.reference_logps(batch)
        return dpo_loss(pc, pr, rc, rr, self.beta, self.label_smoothing)

    def batch_normaliser(self, batch: dict):
        n_pairs = batch["chosen_input_ids"].shape[0]
        no_target = ((batch["chosen_labels"][:, 1:] != IGNORE_INDEX).sum(1) == 0) | ((batch["rejected_labels"][:, 1:] != IGNORE_INDEX).sum(1) == 0)
        if n_pairs == 0 or bool(no_target.any()):
            self.skip_batch("a pair with no reply tokens")
            return None
        return n_pairs

    def micro_batch_loss(self, micro_batch: dict, normaliser: int):
        loss, metrics = self._loss(micro_batch)
        w = micro_batch["chosen_input_ids"].shape[0] / normaliser
        return loss * w, {"train/loss": loss.detach() * w, **{f"train/{k}": v * w for k, v in metrics.items()}}

    def training_metrics(self, batch: dict, outputs: list, normaliser: int) -> StepResult:
        sums = add_up(outputs)
        loss = sums.pop("train/loss")
        tokens = int(batch["chosen_attention_mask"].sum() + batch["rejected_attention_mask"].sum())
        return StepResult(loss, sums, tokens)

    # -- validation -------------------------------------------------------------------------------
    def on_validation_epoch_start(self) -> None:
        self._val = []

    @torch.no_grad()
    def validation_step(self, batch: dict, batch_idx: int, dataloader_idx: int = 0) -> None:
        pc, pr = _pair_logps(self.net, batch, self.config.vocab_size)
        rc, rr = self.reference_logps(batch)
        self._val.append(torch.stack([pc, pr, rc, rr], dim=1))

    def on_validation_epoch_end(self) -> None:
        if not self._val:
            return
        rows = torch.cat(self._val)
        if self.trainer.world_size > 1:
            rows = self.trainer.strategy.all_gather(rows).reshape(-1, 4)
        loss, metrics = dpo_loss(rows[:, 0], rows[:, 1], rows[:, 2], rows[:, 3], self.beta, self.label_smoothing)
        out: dict[str, Any] = {"val/loss": float(loss), **{f"val/{k}": float(v) for k, v in metrics.items()}}
        self.record_validation(out)
