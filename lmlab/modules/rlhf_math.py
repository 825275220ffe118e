"""Numerics of RL from (human or programmatic) feedback, as pure torch functions.

Everything here works on per-token tensors of shape ``(B, T)`` holding the
*response* tokens of a batch, with a ``mask`` (bool or 0/1) marking the valid
tokens. Each row's valid tokens form one contiguous span: usually a
right-padded response tensor, or the response part of a prompt+response row.

The conventions follow what practitioners have settled on for PPO on language
models (Huang et al., "The N Implementation Details of RLHF with PPO", and
TRL's PPO trainer):

* padded positions never leak into a statistic: they are replaced by zero
  before summing (``0 * nan`` would still be ``nan``), and means divide by the
  number of valid tokens;
* losses are token-level means over the whole batch, not means of per-row means;
* GAE treats the value after the last valid token as 0 (the episode ends);
* the log-probs of sampled tokens are taken from ``logits / temperature``, the
  same distribution the tokens were sampled from.

No function here silently returns NaN for an empty mask: a global reduction
over zero valid elements raises ``ValueError``.
"""

from __future__ import annotations

import math
from typing import Literal

import torch
import torch.nn.functional as F

from lmlab.errors import ConfigError

KLEstimator = Literal["k1", "k2", "k3"]

__all__ = [
    "masked_sum",
    "masked_mean",
    "masked_var",
    "masked_whiten",
    "whiten_rewards",
    "gae",
    "kl_k1",
    "kl_k2",
    "kl_k3",
    "kl_per_token",
    "per_token_rewards",
    "ppo_policy_loss",
    "ppo_value_loss",
    "group_advantages",
    "grpo_token_loss",
    "grpo_loss",
    "GRPO_LOSS_TYPES",
    "entropy_from_logits",
    "logprobs_from_logits",
    "FixedKLController",
    "AdaptiveKLController",
    "RunningMoments",
]


# --------------------------------------------------------------------------- masked reductions


def _bool_mask(x: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    if mask.shape != x.shape:
        try:
            mask = mask.expand_as(x)
        except RuntimeError as err:
            raise ValueError(f"mask shape {tuple(mask.shape)} does not match values {tuple(x.shape)}") from err
    return mask.bool()


def masked_sum(x: torch.Tensor, mask: torch.Tensor, dim: int | None = None) -> torch.Tensor:
    """Sum of ``x`` over the positions where ``mask`` is true (over ``dim``, or everything)."""
    m = _bool_mask(x, mask)
    # where() instead of x * mask: padding may hold inf/nan (e.g. log-probs of pad tokens)
    picked = torch.where(m, x, torch.zeros((), dtype=x.dtype, device=x.device))
    return picked.sum() if dim is None else picked.sum(dim=dim)


def masked_mean(x: torch.Tensor, mask: torch.Tensor, dim: int | None = None) -> torch.Tensor:
    """Mean of ``x`` over the valid positions.

    With ``dim=None`` the mean is over every valid element of the batch and an
    all-false mask raises ``ValueError``. With ``dim`` given, slices with no
    valid element get 0 (a padded row must not poison a batch mean with NaN).
    """
    m = _bool_mask(x, mask)
    total = masked_sum(x, m, dim)
    if dim is None:
        count = m.sum()
        if int(count) == 0:
            raise ValueError("masked_mean over an all-false mask (no valid tokens in the batch)")
        return total / count.to(total.dtype)
    count = m.sum(dim=dim).to(total.dtype)
    return total / count.clamp(min=1)


def masked_var(x: torch.Tensor, mask: torch.Tensor, unbiased: bool = True) -> torch.Tensor:
    """Variance of the valid elements of ``x`` (a scalar).

    ``unbiased=True`` applies Bessel's correction ``n / (n - 1)`` and therefore
    needs at least two valid elements.
    """
    m = _bool_mask(x, mask)
    mean = masked_mean(x, m)
    var = masked_mean((x - mean) ** 2, m)
    if unbiased:
        n = int(m.sum())
        if n < 2:
            raise ValueError("unbiased masked_var needs at least two valid elements")
        var = var * (n / (n - 1))
    return var


def masked_whiten(
    x: torch.Tensor, mask: torch.Tensor, shift_mean: bool = True, eps: float = 1e-8
) -> torch.Tensor:
    """Normalise the valid elements of ``x`` to unit variance (and zero mean if ``shift_mean``).

    Statistics come from the valid elements only; padded positions are set to 0.
    With ``shift_mean=False`` the mean is added back, so only the scale changes.
    """
    m = _bool_mask(x, mask)
    mean = masked_mean(x, m)
    var = masked_var(x, m, unbiased=True)
    out = (x - mean) * torch.rsqrt(var + eps)
    if not shift_mean:
        out = out + mean
    return torch.where(m, out, torch.zeros((), dtype=out.dtype, device=out.device))


def whiten_rewards(rewards: torch.Tensor, mask: torch.Tensor, shift_mean: bool = False) -> torch.Tensor:
    """Rescale per-token rewards to unit variance before GAE.

    The mean is kept by default: shifting it would change the sign of the
    reward at tokens that only carry the KL penalty and so reward or punish
    response length.
    """
    return masked_whiten(rewards, mask, shift_mean=shift_mean)


# --------------------------------------------------------------------------- advantages


def gae(
    rewards: torch.Tensor,
    values: torch.Tensor,
    mask: torch.Tensor,
    gamma: float,
    lam: float,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Generalised advantage estimation over each row's span of valid response tokens.

    ``delta_t = r_t + gamma * V_{t+1} - V_t`` and
    ``A_t = delta_t + gamma * lam * A_{t+1}``, where ``V_{t+1}`` and ``A_{t+1}``
    are 0 past a row's last valid token (the episode ends there). Returns ``(advantages, returns)`` with
    ``returns = advantages + values``; both are 0 at padded positions and are
    detached (they are regression/weighting targets, never differentiated).
    """
    if rewards.shape != values.shape or rewards.dim() != 2:
        raise ValueError(f"rewards {tuple(rewards.shape)} and values {tuple(values.shape)} must both be (B, T)")
    if not (0.0 <= gamma <= 1.0 and 0.0 <= lam <= 1.0):
        raise ConfigError("gamma/lam", f"must lie in [0, 1], got gamma={gamma}, lam={lam}", "use e.g. gamma=1.0, lam=0.95")
    m = _bool_mask(rewards, mask)
    zero = torch.zeros((), dtype=values.dtype, device=values.device)
    r = torch.where(m, rewards.detach(), zero)
    v = torch.where(m, values.detach(), zero)
    mf = m.to(values.dtype)
    T = rewards.shape[1]
    adv = torch.zeros_like(v)
    last = torch.zeros_like(v[:, 0])
    next_v = torch.zeros_like(v[:, 0])
    for t in reversed(range(T)):
        delta = r[:, t] + gamma * next_v - v[:, t]
        # multiplying by the mask restarts the recursion at each row's last valid token
        last = (delta + gamma * lam * last) * mf[:, t]
        adv[:, t] = last
        next_v = v[:, t]
    returns = torch.where(m, adv + v, zero)
    return adv, returns


# --------------------------------------------------------------------------- KL


def kl_k1(logprobs: torch.Tensor, ref_logprobs: torch.Tensor) -> torch.Tensor:
    """Schulman's k1: ``log p - log p_ref``; unbiased for KL(p || p_ref) under samples from p, high variance, can be negative."""
    return logprobs - ref_logprobs


def kl_k2(logprobs: torch.Tensor, ref_logprobs: torch.Tensor) -> torch.Tensor:
    """Schulman's k2: ``0.5 * (log p - log p_ref)^2``; biased but low variance and never negative."""
    return 0.5 * (logprobs - ref_logprobs) ** 2


def kl_k3(logprobs: torch.Tensor, ref_logprobs: torch.Tensor) -> torch.Tensor:
    """Schulman's k3: ``(r - 1) - log r`` with ``r = p_ref / p``; unbiased and never negative."""
    log_r = ref_logprobs - logprobs
    # expm1 keeps precision when r is close to 1, where (r - 1) - log r is a tiny difference;
    # the clamp only removes rounding below zero (exp(x) >= 1 + x holds exactly)
    return (torch.expm1(log_r) - log_r).clamp(min=0.0)


_KL = {"k1": kl_k1, "k2": kl_k2, "k3": kl_k3}


def kl_per_token(
    logprobs: torch.Tensor, ref_logprobs: torch.Tensor, estimator: KLEstimator = "k1"
) -> torch.Tensor:
    """Per-token KL(policy || reference) estimate with the named estimator (``k1``, ``k2`` or ``k3``)."""
    if estimator not in _KL:
        raise ConfigError("kl_estimator", f"unknown estimator {estimator!r}", "use one of 'k1', 'k2', 'k3'")
    return _KL[estimator](logprobs, ref_logprobs)


def _last_valid_index(mask: torch.Tensor) -> torch.Tensor:
    m = mask.bool()
    if not bool(m.any(dim=1).all()):
        raise ValueError("every row needs at least one valid response token to receive its score")
    idx = torch.arange(m.shape[1], device=m.device).expand_as(m)
    return torch.where(m, idx, torch.full_like(idx, -1)).max(dim=1).values


def per_token_rewards(
    score: torch.Tensor,
    logprobs: torch.Tensor,
    ref_logprobs: torch.Tensor,
    mask: torch.Tensor,
    kl_coef: float | torch.Tensor,
    kl_estimator: KLEstimator = "k1",
) -> torch.Tensor:
    """Per-token PPO rewards: ``-kl_coef * KL_t`` everywhere, plus the sequence ``score`` at the last valid token.

    ``score`` has shape ``(B,)``; the result is ``(B, T)`` and 0 at padding.
    """
    if score.dim() != 1 or score.shape[0] != logprobs.shape[0]:
        raise ValueError(f"score must have shape (B,) = ({logprobs.shape[0]},), got {tuple(score.shape)}")
    m = _bool_mask(logprobs, mask)
    kl = kl_per_token(logprobs, ref_logprobs, kl_estimator)
    rewards = torch.where(m, -kl_coef * kl, torch.zeros((), dtype=kl.dtype, device=kl.device))
    last = _last_valid_index(m)
    rows = torch.arange(rewards.shape[0], device=rewards.device)
    rewards = rewards.clone()
    rewards[rows, last] += score.to(rewards.dtype)
    return rewards


# --------------------------------------------------------------------------- PPO losses


def ppo_policy_loss(
    logprobs: torch.Tensor,
    old_logprobs: torch.Tensor,
    advantages: torch.Tensor,
    mask: torch.Tensor,
    clip_range: float,
) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """Clipped surrogate loss ``-E[min(r A, clip(r, 1-eps, 1+eps) A)]`` with ``r = exp(logp - logp_old)``.

    The expectation is a token-level mean over the valid tokens. Stats (detached):

    * ``approxkl``: ``0.5 * mean((logp - logp_old)^2)``, TRL's estimator of
      KL(old || new) (Schulman's k2); it is what PPO diagnostics usually plot;
    * ``clipfrac``: fraction of tokens where the clipped term was the active one;
    * ``ratio_mean``: mean probability ratio (should stay near 1).
    """
    if clip_range <= 0:
        raise ConfigError("clip_range", f"must be > 0, got {clip_range}", "use e.g. 0.2")
    m = _bool_mask(logprobs, mask)
    log_ratio = logprobs - old_logprobs
    ratio = torch.exp(log_ratio)
    loss_unclipped = -advantages * ratio
    loss_clipped = -advantages * torch.clamp(ratio, 1.0 - clip_range, 1.0 + clip_range)
    loss = masked_mean(torch.maximum(loss_unclipped, loss_clipped), m)
    with torch.no_grad():
        stats = {
            "approxkl": 0.5 * masked_mean(log_ratio**2, m),
            "clipfrac": masked_mean((loss_clipped > loss_unclipped).to(ratio.dtype), m),
            "ratio_mean": masked_mean(ratio, m),
        }
    return loss, stats


def ppo_value_loss(
    values: torch.Tensor,
    old_values: torch.Tensor,
    returns: torch.Tensor,
    mask: torch.Tensor,
    clip_range_value: float,
) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """Clipped value loss ``0.5 * E[max((V - R)^2, (clip(V, V_old - eps, V_old + eps) - R)^2)]``.

    Stats (detached): ``vf_clipfrac`` (fraction of tokens where the clipped
    error was the larger one) and ``value_error`` (unclipped mean squared error).
    """
    if clip_range_value <= 0:
        raise ConfigError("clip_range_value", f"must be > 0, got {clip_range_value}", "use e.g. 0.2")
    m = _bool_mask(values, mask)
    v_clipped = old_values + torch.clamp(values - old_values, -clip_range_value, clip_range_value)
    err = (values - returns) ** 2
    err_clipped = (v_clipped - returns) ** 2
    loss = 0.5 * masked_mean(torch.maximum(err, err_clipped), m)
    with torch.no_grad():
        stats = {
            "vf_clipfrac": masked_mean((err_clipped > err).to(values.dtype), m),
            "value_error": masked_mean(err, m),
        }
    return loss, stats


# --------------------------------------------------------------------------- GRPO

#: how :func:`grpo_loss` aggregates per-token losses (TRL's ``loss_type`` names)
GRPO_LOSS_TYPES = ("grpo", "bnpo", "dr_grpo")


def group_advantages(
    rewards: torch.Tensor, group_size: int, scale_rewards: bool = True, eps: float = 1e-4
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Group-relative advantages of ``rewards`` (shape ``(N * G,)``, each prompt's ``G`` completions adjacent).

    ``A_i = r_i - mean(group)``, divided by ``std(group) + eps`` when
    ``scale_rewards`` (GRPO; the std is the unbiased one) and left unscaled
    otherwise (Dr. GRPO: scaling favours prompts whose answers barely differ).
    Returns ``(advantages, group mean, group std)``, the last two repeated per completion.
    """
    if group_size < 2:
        raise ConfigError("num_generations", f"a group needs at least 2 completions, got {group_size}",
                          "sample 2 or more completions per prompt")
    if rewards.dim() != 1 or rewards.numel() % group_size:
        raise ValueError(f"rewards of shape {tuple(rewards.shape)} do not split into groups of {group_size}")
    grouped = rewards.view(-1, group_size)
    mean = grouped.mean(dim=1).repeat_interleave(group_size)
    std = grouped.std(dim=1).repeat_interleave(group_size)
    adv = rewards - mean
    if scale_rewards:
        adv = adv / (std + eps)
    return adv, mean, std


def grpo_token_loss(
    logprobs: torch.Tensor,
    old_logprobs: torch.Tensor,
    advantages: torch.Tensor,
    ref_logprobs: torch.Tensor | None = None,
    beta: float = 0.0,
    epsilon: float = 0.2,
    epsilon_high: float | None = None,
) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """Per-token GRPO loss ``-min(r A, clip(r, 1 - eps, 1 + eps_high) A) + beta * k3``, shape ``(B, T)``.

    ``r = exp(logp - logp_old)``; ``advantages`` is one number per sequence
    ``(B,)``; ``k3 = exp(logp_ref - logp) - (logp_ref - logp) - 1`` is
    Schulman's estimator of KL(policy || reference), added only when
    ``beta != 0``. Returns the loss and per-token tensors (detached):
    ``kl`` (when ``beta != 0``), ``ratio``, and the masks ``low_clipped``
    (``r < 1 - eps`` with ``A < 0``) and ``high_clipped`` (``r > 1 + eps_high`` with ``A > 0``).
    """
    if epsilon <= 0:
        raise ConfigError("epsilon", f"must be > 0, got {epsilon}", "use e.g. 0.2")
    eps_high = epsilon if epsilon_high is None else epsilon_high
    if eps_high <= 0:
        raise ConfigError("epsilon_high", f"must be > 0, got {eps_high}", "use e.g. 0.28, or leave it unset")
    adv = advantages.unsqueeze(1).to(logprobs.dtype)
    ratio = torch.exp(logprobs - old_logprobs)
    clipped = torch.clamp(ratio, 1.0 - epsilon, 1.0 + eps_high)
    loss = -torch.min(ratio * adv, clipped * adv)
    stats: dict[str, torch.Tensor] = {}
    if beta != 0.0:
        if ref_logprobs is None:
            raise ValueError("beta != 0 needs the reference log-probs")
        delta = ref_logprobs - logprobs
        kl = torch.exp(delta) - delta - 1.0
        loss = loss + beta * kl
        stats["kl"] = kl.detach()
    with torch.no_grad():
        stats["ratio"] = ratio.detach()
        stats["low_clipped"] = (ratio < 1.0 - epsilon) & (adv < 0)
        stats["high_clipped"] = (ratio > 1.0 + eps_high) & (adv > 0)
    return loss, stats


def grpo_loss(
    per_token_loss: torch.Tensor,
    mask: torch.Tensor,
    loss_type: str,
    max_completion_length: int,
    num_sequences: int | None = None,
    num_tokens: int | torch.Tensor | None = None,
) -> torch.Tensor:
    """Aggregate per-token GRPO losses into the batch loss (TRL's ``loss_type`` definitions).

    * ``grpo``: mean over each sequence's tokens, then over the sequences
      (DeepSeekMath; longer sequences weigh less per token);
    * ``bnpo``: mean over every valid token of the batch;
    * ``dr_grpo``: sum over every valid token, divided by
      ``num_sequences * max_completion_length`` (Dr. GRPO: no length bias).

    When a batch is split into micro-batches, pass the whole batch's
    ``num_sequences`` (and ``num_tokens`` for ``bnpo``): each micro-batch then
    returns its share, and the shares add up to the batch loss.
    """
    m = _bool_mask(per_token_loss, mask)
    n_seq = per_token_loss.shape[0] if num_sequences is None else num_sequences
    if loss_type == "grpo":
        per_seq = masked_sum(per_token_loss, m, dim=1) / m.sum(dim=1).clamp(min=1).to(per_token_loss.dtype)
        return per_seq.sum() / n_seq
    if loss_type == "bnpo":
        n_tok = m.sum() if num_tokens is None else num_tokens
        n_tok = torch.as_tensor(n_tok, device=per_token_loss.device).clamp(min=1).to(per_token_loss.dtype)
        return masked_sum(per_token_loss, m) / n_tok
    if loss_type == "dr_grpo":
        return masked_sum(per_token_loss, m) / (n_seq * max_completion_length)
    raise ConfigError("loss_type", f"unknown loss type {loss_type!r}", "use one of " + ", ".join(GRPO_LOSS_TYPES))


# --------------------------------------------------------------------------- logits


def entropy_from_logits(logits: torch.Tensor) -> torch.Tensor:
    """Entropy of the categorical distribution over the last dimension, computed in at least float32.

    Tokens banned with ``-inf`` logits contribute 0 instead of ``0 * -inf = nan``.
    """
    x = logits.float() if logits.dtype in (torch.float16, torch.bfloat16) else logits
    logp = F.log_softmax(x, dim=-1)
    p = logp.exp()
    plogp = torch.where(p > 0, p * logp, torch.zeros((), dtype=logp.dtype, device=logp.device))
    return -plogp.sum(dim=-1)


def logprobs_from_logits(
    logits: torch.Tensor,
    labels: torch.Tensor,
    temperature: float = 1.0,
    ignore_index: int | None = -100,
) -> torch.Tensor:
    """Log-probability of each label under ``softmax(logits / temperature)``.

    ``logits`` is ``(..., V)`` and ``labels`` is ``(...)``, already aligned (the
    caller shifts). Dividing by the sampling temperature *before* normalising
    matters: the PPO ratio must compare the distribution the tokens were
    sampled from. Positions whose label is ``ignore_index`` get 0.
    """
    if temperature <= 0:
        raise ConfigError("temperature", f"must be > 0 to compute log-probs, got {temperature}", "use the sampling temperature, e.g. 1.0")
    x = logits.float() if logits.dtype in (torch.float16, torch.bfloat16) else logits
    if temperature != 1.0:
        x = x / temperature
    valid = labels != ignore_index if ignore_index is not None else torch.ones_like(labels, dtype=torch.bool)
    safe = torch.where(valid, labels, torch.zeros_like(labels))
    # gather - logsumexp equals log_softmax + gather without a second (..., V) tensor
    picked = x.gather(-1, safe.unsqueeze(-1)).squeeze(-1)
    out = picked - torch.logsumexp(x, dim=-1)
    return torch.where(valid, out, torch.zeros((), dtype=out.dtype, device=out.device))


# --------------------------------------------------------------------------- KL controllers


class FixedKLController:
    """A constant KL penalty coefficient; ``update`` is a no-op kept for a uniform interface."""

    def __init__(self, kl_coef: float):
        if kl_coef < 0:
            raise ConfigError("kl_coef", f"must be >= 0, got {kl_coef}", "use e.g. 0.05")
        self.value = float(kl_coef)

    def update(self, current_kl: float, n_steps: int) -> float:
        """Return the (unchanged) coefficient."""
        return self.value


class AdaptiveKLController:
    """Adaptive KL coefficient of Ziegler et al. (2019), steering the measured KL towards ``target``.

    After each batch: ``e = clip(KL / target - 1, -0.2, 0.2)`` and
    ``kl_coef *= 1 + e * n_steps / horizon``. Too much KL raises the penalty,
    too little lowers it; the clip bounds the change per update.
    """

    def __init__(self, init_kl_coef: float, target: float, horizon: float):
        if init_kl_coef <= 0:
            raise ConfigError("init_kl_coef", f"must be > 0 for the adaptive controller, got {init_kl_coef}", "use e.g. 0.2")
        if target <= 0:
            raise ConfigError("target", f"KL target must be > 0, got {target}", "use e.g. 6.0")
        if horizon <= 0:
            raise ConfigError("horizon", f"must be > 0, got {horizon}", "use e.g. 10000")
        self.value = float(init_kl_coef)
        self.target = float(target)
        self.horizon = float(horizon)

    def update(self, current_kl: float, n_steps: int) -> float:
        """Adapt the coefficient after ``n_steps`` samples with mean KL ``current_kl``; returns the new value."""
        current_kl = float(current_kl)
        if not math.isfinite(current_kl):
            raise ValueError(f"AdaptiveKLController.update got a non-finite KL ({current_kl})")
        error = min(max(current_kl / self.target - 1.0, -0.2), 0.2)
        self.value *= 1.0 + error * n_steps / self.horizon
        return self.value


# --------------------------------------------------------------------------- running statistics


class RunningMoments:
    """Running mean and variance of a stream of scalars (e.g. reward-model scores).

    Batches are merged with Chan et al.'s parallel update of Welford's
    algorithm, in float64, so the result equals the statistics of all values
    seen so far. ``std`` is the sample (unbiased) standard deviation.
    """

    def __init__(self) -> None:
        self.mean = 0.0
        self.var = 0.0  # population variance of everything seen
        self.count = 0

    @property
    def std(self) -> float:
        """Unbiased standard deviation of everything seen (0 with fewer than two values)."""
        if self.count < 2:
            return 0.0
        return math.sqrt(self.var * self.count / (self.count - 1))

    @torch.no_grad()
    def update(self, xs: torch.Tensor) -> tuple[float, float]:
        """Fold a batch in; returns the batch's own ``(mean, unbiased std)``."""
        xs = xs.detach().double().flatten()
        n = xs.numel()
        if n == 0:
            raise ValueError("RunningMoments.update got an empty batch")
        if not bool(torch.isfinite(xs).all()):
            raise ValueError("RunningMoments.update got non-finite values")
        b_mean = float(xs.mean())
        b_var = float(((xs - b_mean) ** 2).mean())
        delta = b_mean - self.mean
        total = self.count + n
        m2 = self.var * self.count + b_var * n + delta**2 * self.count * n / total
        self.mean += delta * n / total
        self.var = m2 / total
        self.count = total
        b_std = math.sqrt(b_var * n / (n - 1)) if n > 1 else 0.0
        return b_mean, b_std

    def normalize(self, x: torch.Tensor, shift_mean: bool = True, eps: float = 1e-8) -> torch.Tensor:
        """Scale ``x`` by the running std (and centre it on the running mean if ``shift_mean``)."""
        if self.count < 2:
            raise ValueError("RunningMoments.normalize needs statistics from at least two values")
        out = x / (self.std + eps) if not shift_mean else (x - self.mean) / (self.std + eps)
        return out

    def state_dict(self) -> dict[str, float]:
        """Checkpointable state."""
        return {"mean": self.mean, "var": self.var, "count": self.count}

    def load_state_dict(self, state: dict[str, float]) -> None:
        """Restore from :meth:`state_dict`."""
        self.mean = float(state["mean"])
        self.var = float(state["var"])
        self.count = int(state["count"])
