"""``SFTModule``: supervised fine-tuning on the assistant replies of chat-formatted conversations."""

from __future__ import annotations

from typing import Optional

import torch
import torch.nn.functional as F

from lmlab.data.posttrain.chat import IGNORE_INDEX
from lmlab.models.counting import flops_per_token
from lmlab.models.heads import CausalLM
from lmlab.modules.base import StepResult, add_up
from lmlab.modules.data_contract import SequenceData
from lmlab.modules.posttrain_base import PostTrainModuleBase

__all__ = ["SFTModule", "sft_token_stats"]


def sft_token_stats(logits: torch.Tensor, labels: torch.Tensor, vocab_size: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """``(summed NLL, correct argmax predictions, target count)`` over the labelled tokens.

    ``labels`` are aligned with the inputs (``-100`` off target), so position
    ``t`` predicts ``labels[t + 1]``. The NLL sum keeps its graph; the other
    two are detached counts.
    """
    logits = logits[:, :-1, :vocab_size].float()
    targets = labels[:, 1:]
    valid = targets != IGNORE_INDEX
    nll = F.cross_entropy(logits.flatten(0, 1), targets.flatten(), ignore_index=IGNORE_INDEX, reduction="sum")
    with torch.no_grad():
        correct = ((logits.argmax(-1) == targets) & valid).sum()
    return nll, correct, valid.sum()


class SFTModule(PostTrainModuleBase):
    """Supervised fine-tuning of a :class:`~lmlab.models.heads.CausalLM` on responses only.

    L = -sum_i log P(y_i | x_i, y_<i) over the response tokens of the batch,
    divided by their count (a token-level mean): prompt, system/user turns and
    padding carry label ``-100`` and add nothing. Packed batches (from
    ``SFTDataModule(packing=True)``) carry ``position_ids`` restarting at each
    example and ``doc_ids`` that keep attention inside an example, so packing
    changes speed, not the loss. A batch with no response token is skipped
    with a warning rather than producing NaN.

    Logs ``train/loss``, ``train/token_accuracy`` (argmax hits on response
    tokens), ``train/tokens`` (response tokens this step), ``train/ppl`` and the
    throughput stats; validation logs ``val/loss``, ``val/token_accuracy``,
    ``val/ppl``.

    Args:
        config: Backbone shape; omit to take it from ``init_from``.
        settings: Optimizer, schedule, clipping, compile and peak FLOP/s.
        init_from: Start from a pretrained (or earlier SFT) checkpoint or export.
    """

    stage = "sft"
    data_protocol = SequenceData
    #: padded length of the last training batch (for MFU)
    _seq_len: Optional[int] = None

    def build_model(self) -> CausalLM:
        return CausalLM(self.config)

    def flops_per_token(self) -> Optional[float]:
        return flops_per_token(self.config, self._seq_len) if self._seq_len else None

    def forward_logits(self, batch: dict) -> torch.Tensor:
        """Logits for an SFT batch, packed or padded."""
        # right padding needs no mask: causal attention never looks ahead to it
        return self.net(batch["input_ids"], position_ids=batch.get("position_ids"), doc_ids=batch.get("doc_ids"))

    def batch_loss(self, batch: dict) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """``(summed NLL, correct, targets)`` of one (micro-)batch."""
        return sft_token_stats(self.forward_logits(batch), batch["labels"], self.config.vocab_size)

    def batch_normaliser(self, batch: dict):
        labels = batch["labels"]
        self._seq_len = int(labels.shape[1])
        n_total = int((labels[:, 1:] != IGNORE_INDEX).sum())
        if n_total == 0:
            self.skip_batch("no response tokens (every label is -100)")
            return None
        return n_total

    def micro_batch_loss(self, micro_batch: dict, normaliser: int):
        nll, hits, _ = self.batch_loss(micro_batch)
        # each micro-batch weighted by its share of response tokens: the sum is the batch mean
        return nll / normaliser, {"nll": nll.detach(), "correct": hits}

    def training_metrics(self, batch: dict, outputs: list, normaliser: int) -> StepResult:
        sums = add_up(outputs)
        loss = sums["nll"] / normaliser
        metrics = {
            "train/token_accuracy": sums["correct"].float() / normaliser,
            "train/tokens": float(normaliser),
            "train/ppl": torch.exp(loss.clamp(max=50)),
            "train/skipped_batches": float(self.skipped_batches),
        }
        labels = batch["labels"]
        n_tokens = int(batch["attention_mask"].sum()) if "attention_mask" in batch else labels.numel()
        return StepResult(loss, metrics, n_tokens)

    # -- validation --------------------------------------------------------------------
    def on_validation_epoch_start(self) -> None:
        self._val = torch.zeros(3, dtype=torch.float64, device=self.device)

    @torch.no_grad()
    def validation_step(self, batch: dict, batch_idx: int, dataloader_idx: int = 0) -> None:
        nll, correct, n = self.batch_loss(batch)
        self._val += torch.stack([nll.double(), correct.double(), n.double()])

    def on_validation_epoch_end(self) -> None:
        sums = self._val
        if self.trainer.world_size > 1:
            sums = self.trainer.strategy.reduce(sums, reduce_op="sum")
        nll, correct, n = sums.tolist()
        if n == 0:
            return
        metrics = {"val/loss": nll / n, "val/token_accuracy": correct / n, "val/ppl": float(torch.exp(torch.tensor(min(nll / n, 50.0))))}
        self.record_validation(metrics)
