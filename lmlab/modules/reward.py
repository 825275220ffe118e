"""``RewardModule``: a Bradley-Terry reward model on the shared backbone."""

from __future__ import annotations

from typing import Optional

import torch

from lmlab.errors import ConfigError
from lmlab.models.config import TransformerConfig
from lmlab.models.heads import ScalarModel, last_token_index
from lmlab.modules.base import StepResult
from lmlab.modules.data_contract import SequenceData
from lmlab.modules.optim import TrainingSettings
from lmlab.modules.posttrain_base import PostTrainModuleBase
from lmlab.modules.preference_losses import bradley_terry_loss

__all__ = ["RewardModule", "score_sequences"]


def score_sequences(
    model: ScalarModel,
    input_ids: torch.Tensor,
    attention_mask: torch.Tensor,
    position_ids: Optional[torch.Tensor] = None,
) -> torch.Tensor:
    """Scalar score at the last non-pad token of each sequence: (B,).

    Right-padded rows need no mask (causal attention never reaches the
    padding after a row's end); left-padded rows (PPO rollouts) pass
    ``position_ids`` counted from each row's first real token, so a row scores
    the same however it is padded.
    """
    if position_ids is None and bool(attention_mask[:, 0].all()):
        values = model(input_ids)
    else:
        if position_ids is None:
            position_ids = (attention_mask.long().cumsum(1) - 1).clamp(min=0)
        values = model(input_ids, position_ids=position_ids, attention_mask=attention_mask)
    return values.gather(1, last_token_index(attention_mask).unsqueeze(1)).squeeze(1)


class RewardModule(PostTrainModuleBase):
    """Trains a :class:`~lmlab.models.heads.ScalarModel` on preference pairs.

    The reward of a conversation is the head's output at its last non-pad
    token (the reply's ``<|end|>``). The loss is Bradley-Terry,
    ``-log sigmoid(r_chosen - r_rejected - margin)``, plus optionally
    ``center_coef * mean((r_chosen + r_rejected)^2)``, which pins the free
    offset of the rewards near zero. ``init_from`` may name a pretrained or
    SFT checkpoint: the backbone loads and the scalar head starts fresh.

    Logs ``train/loss``, ``train/accuracy`` (share of pairs ranked right),
    ``train/margin`` (mean r_c - r_r), ``train/reward_mean|min|max``; the
    same under ``val/`` over the whole validation set.

    Args:
        config: Backbone shape; omit to take it from ``init_from``.
        settings: Optimizer, schedule, clipping, compile and peak FLOP/s.
        init_from: Pretrained or SFT checkpoint (backbone weights load; fresh head).
        margin: Demand that the chosen reward win by at least this much.
        center_coef: Reward-centering coefficient (0: off).
    """

    stage = "reward"
    data_protocol = SequenceData

    def __init__(
        self,
        config: Optional[TransformerConfig] = None,
        settings: Optional[TrainingSettings] = None,
        init_from: Optional[str] = None,
        margin: float = 0.0,
        center_coef: float = 0.0,
    ):
        if center_coef < 0:
            raise ConfigError("model.center_coef", f"must be >= 0, got {center_coef}", "use 0 to disable or e.g. 0.01")
        self.margin = float(margin)
        self.center_coef = float(center_coef)
        super().__init__(config, settings, init_from)
        self._val_scores: list[torch.Tensor] = []

    def build_model(self) -> ScalarModel:
        return ScalarModel(self.config)

    def pair_scores(self, batch: dict) -> tuple[torch.Tensor, torch.Tensor]:
        """``(r_chosen, r_rejected)`` for a collated preference batch, both sides in one forward pass."""
        ids = torch.cat([batch["chosen_input_ids"], batch["rejected_input_ids"]])
        mask = torch.cat([batch["chosen_attention_mask"], batch["rejected_attention_mask"]])
        scores = score_sequences(self.net, ids, mask).float()
        n = batch["chosen_input_ids"].shape[0]
        return scores[:n], scores[n:]

    def _loss(self, r_c: torch.Tensor, r_r: torch.Tensor):
        margin = self.margin if self.margin else None
        return bradley_terry_loss(r_c, r_r, margin=margin, center_coef=self.center_coef)

    def batch_normaliser(self, batch: dict):
        n_pairs = batch["chosen_input_ids"].shape[0]
        if n_pairs == 0:
            self.skip_batch("empty batch")
            return None
        return n_pairs

    def micro_batch_loss(self, micro_batch: dict, normaliser: int):
        r_c, r_r = self.pair_scores(micro_batch)
        loss, _ = self._loss(r_c, r_r)
        return loss * (r_c.shape[0] / normaliser), {"chosen": r_c.detach(), "rejected": r_r.detach()}

    def training_metrics(self, batch: dict, outputs: list, normaliser: int) -> StepResult:
        # the logged loss is that of all pairs together, not a sum of micro-batch shares
        r_c = torch.cat([o["chosen"] for o in outputs])
        r_r = torch.cat([o["rejected"] for o in outputs])
        loss, metrics = self._loss(r_c, r_r)
        tokens = int(batch["chosen_attention_mask"].sum() + batch["rejected_attention_mask"].sum())
        return StepResult(loss, self._named("train", metrics), tokens)

    @staticmethod
    def _named(prefix: str, metrics: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        names = {"accuracy": "accuracy", "margin_mean": "margin", "reward_mean": "reward_mean", "reward_min": "reward_min",
                 "reward_max": "reward_max", "chosen_mean": "chosen_mean", "rejected_mean": "rejected_mean"}
        return {f"{prefix}/{names[k]}": v for k, v in metrics.items() if k in names}

    # -- validation ------------------------------------------------------------------------
    def on_validation_epoch_start(self) -> None:
        self._val_scores = []

    @torch.no_grad()
    def validation_step(self, batch: dict, batch_idx: int, dataloader_idx: int = 0) -> None:
        r_c, r_r = self.pair_scores(batch)
        self._val_scores.append(torch.stack([r_c, r_r], dim=1))

    def on_validation_epoch_end(self) -> None:
        if not self._val_scores:
            return
        scores = torch.cat(self._val_scores)
        if self.trainer.world_size > 1:
            scores = self.trainer.strategy.all_gather(scores).reshape(-1, 2)
        loss, metrics = self._loss(scores[:, 0], scores[:, 1])
        out = {"val/loss": float(loss), **{k: float(v) for k, v in self._named("val", metrics).items()}}
        self.record_validation(out)
