"""Pairwise preference losses: Bradley-Terry reward modelling and DPO.

Both take one value per pair (shape ``(B,)``) and return ``(loss, metrics)``;
metrics are detached scalars ready for logging.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from lmlab.errors import ConfigError

__all__ = ["bradley_terry_loss", "dpo_loss"]


def _check_pairs(*tensors: torch.Tensor) -> None:
    shape = tensors[0].shape
    if len(shape) != 1 or shape[0] == 0:
        raise ValueError(f"preference losses take non-empty (B,) tensors, got {tuple(shape)}")
    for t in tensors[1:]:
        if t.shape != shape:
            raise ValueError(f"paired tensors must have the same shape, got {tuple(shape)} and {tuple(t.shape)}")


def bradley_terry_loss(
    r_chosen: torch.Tensor,
    r_rejected: torch.Tensor,
    margin: torch.Tensor | float | None = None,
    center_coef: float = 0.0,
) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """Reward-model loss ``-log sigmoid(r_c - r_r - margin)``, averaged over pairs.

    ``margin`` (per pair or scalar) demands that the chosen reward win by at
    least that much (Llama 2's margin loss). ``center_coef > 0`` adds
    ``center_coef * mean((r_c + r_r)^2)``, which pins the otherwise free
    offset of the rewards near 0 so scores stay comparable across runs.

    Metrics: ``accuracy`` (share of pairs with ``r_c > r_r``), ``margin_mean``
    (mean ``r_c - r_r``), ``reward_mean``/``reward_min``/``reward_max`` over
    both sides, ``chosen_mean``, ``rejected_mean``.
    """
    _check_pairs(r_chosen, r_rejected)
    if center_coef < 0:
        raise ConfigError("center_coef", f"must be >= 0, got {center_coef}", "use 0 to disable or e.g. 0.01")
    diff = r_chosen - r_rejected
    logits = diff if margin is None else diff - margin
    # logsigmoid is stable for large |logits|; log(sigmoid(x)) underflows to -inf
    loss = -F.logsigmoid(logits).mean()
    if center_coef > 0:
        loss = loss + center_coef * ((r_chosen + r_rejected) ** 2).mean()
    with torch.no_grad():
        both = torch.cat([r_chosen.detach(), r_rejected.detach()]).float()
        metrics = {
            "accuracy": (r_chosen > r_rejected).float().mean(),
            "margin_mean": diff.detach().float().mean(),
            "reward_mean": both.mean(),
            "reward_min": both.min(),
            "reward_max": both.max(),
            "chosen_mean": r_chosen.detach().float().mean(),
            "rejected_mean": r_rejected.detach().float().mean(),
        }
    return loss, metrics


def dpo_loss(
    policy_chosen_logps: torch.Tensor,
    policy_rejected_logps: torch.Tensor,
    ref_chosen_logps: torch.Tensor,
    ref_rejected_logps: torch.Tensor,
    beta: float,
    label_smoothing: float = 0.0,
) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """Sigmoid DPO loss (Rafailov et al., 2023) with optional conservative label smoothing.

    With ``h = (logp_c - ref_c) - (logp_r - ref_r)`` (summed sequence log-probs)
    the loss is ``-(1 - s) log sigmoid(beta h) - s log sigmoid(-beta h)``, where
    ``s = label_smoothing`` is the assumed probability that a label is flipped
    (cDPO). Metrics follow TRL's names, with implicit rewards
    ``beta * (logp - ref_logp)``: ``rewards/chosen``, ``rewards/rejected``,
    ``rewards/accuracies``, ``rewards/margins``, plus ``logps/chosen`` and
    ``logps/rejected``.
    """
    _check_pairs(policy_chosen_logps, policy_rejected_logps, ref_chosen_logps, ref_rejected_logps)
    if beta <= 0:
        raise ConfigError("beta", f"must be > 0, got {beta}", "use e.g. 0.1")
    if not 0.0 <= label_smoothing < 0.5:
        raise ConfigError("label_smoothing", f"must lie in [0, 0.5), got {label_smoothing}", "use 0 for plain DPO")
    # the reference log-probs are constants; detaching guards against a shared graph
    ref_c = ref_chosen_logps.detach()
    ref_r = ref_rejected_logps.detach()
    h = (policy_chosen_logps - ref_c) - (policy_rejected_logps - ref_r)
    losses = -F.logsigmoid(beta * h) * (1.0 - label_smoothing)
    if label_smoothing > 0:
        losses = losses - F.logsigmoid(-beta * h) * label_smoothing
    loss = losses.mean()
    with torch.no_grad():
        chosen_rewards = beta * (policy_chosen_logps.detach() - ref_c)
        rejected_rewards = beta * (policy_rejected_logps.detach() - ref_r)
        metrics = {
            "rewards/chosen": chosen_rewards.float().mean(),
            "rewards/rejected": rejected_rewards.float().mean(),
            "rewards/accuracies": (chosen_rewards > rejected_rewards).float().mean(),
            "rewards/margins": (chosen_rewards - rejected_rewards).float().mean(),
            "logps/chosen": policy_chosen_logps.detach().float().mean(),
            "logps/rejected": policy_rejected_logps.detach().float().mean(),
        }
    return loss, metrics
