"""``GRPOModule``: group relative policy optimisation (DeepSeekMath; TRL's ``GRPOTrainer``) without a value model.

One ``training_step`` is one GRPO iteration on a batch of prompts:

1. *rollout*: sample ``num_generations`` (G) responses per prompt with the KV
   cache (:class:`~lmlab.modules.rollout.PolicyRollouts`, shared with PPO);
2. *score*: a programmatic reward ``fn(prompt_text, response_text)`` (e.g.
   :func:`lmlab.data.posttrain.verifiable.reward`) or a reward model's score,
   minus an optional penalty for responses that never stopped;
3. *advantages*: each reward minus its group's mean, divided by the group's
   std unless ``scale_rewards`` is off (Dr. GRPO); one advantage per response,
   shared by all its tokens;
4. *update*: ``num_iterations`` (mu) passes over the rollouts in minibatches
   of the clipped importance-ratio objective, plus ``beta`` times the k3 KL
   estimate to a frozen reference policy (``beta=0``: no reference model is
   built), aggregated by ``loss_type`` (see :func:`~lmlab.modules.rlhf_math.grpo_loss`).

With one pass over one minibatch the ratio is exactly 1 (the old log-probs
are the current ones, detached), as in TRL; otherwise the old log-probs are
computed once per rollout, before the first update. ``trainer.max_steps``
counts optimizer steps: ``iterations * num_iterations * (batch_size * G / mini_batch_size)``.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass, field
from typing import Any, Callable, Literal, Optional, Union

import torch

from lmlab.errors import ConfigError
from lmlab.models.config import TransformerConfig
from lmlab.models.heads import CausalLM
from lmlab.modules.base import add_up
from lmlab.modules.data_contract import PromptData
from lmlab.modules.optim import TrainingSettings
from lmlab.modules.posttrain_base import PostTrainModuleBase
from lmlab.modules.ppo import RolloutConfig
from lmlab.modules.rlhf_math import GRPO_LOSS_TYPES, group_advantages, grpo_loss, grpo_token_loss, masked_sum
from lmlab.modules.rollout import PolicyRollouts, sequence_masks

log = logging.getLogger(__name__)

__all__ = ["GRPOConfig", "GRPOModule", "GRPORollout", "GRPODivergenceError"]


class GRPODivergenceError(RuntimeError):
    """GRPO met non-finite numbers; raised before any checkpoint of the bad weights."""


@dataclass
class GRPOConfig:
    """The GRPO update (names follow TRL's ``GRPOConfig``).

    Args:
        num_generations: Completions sampled per prompt (the group size G, >= 2).
        num_iterations: Passes (mu) over each generation batch.
        mini_batch_size: Completions per optimizer step (default: all ``batch_size * G``); must divide them.
        micro_batch_size: Completions per forward/backward within a minibatch.
        epsilon: Lower clip of the importance ratio, ``1 - epsilon``.
        epsilon_high: Upper clip, ``1 + epsilon_high`` (default: ``epsilon``; DAPO raises it).
        beta: Coefficient of the k3 KL to the reference policy (0: no reference model).
        loss_type: ``grpo`` (mean over each sequence's tokens, then over sequences),
            ``bnpo`` (mean over all tokens of the minibatch) or ``dr_grpo`` (sum over
            tokens divided by sequences x ``rollout.max_new_tokens``).
        scale_rewards: Divide advantages by the group's reward std (off: Dr. GRPO).
    """

    num_generations: int = 8
    num_iterations: int = 1
    mini_batch_size: Optional[int] = None
    micro_batch_size: Optional[int] = None
    epsilon: float = 0.2
    epsilon_high: Optional[float] = None
    beta: float = 0.0
    loss_type: Literal["grpo", "bnpo", "dr_grpo"] = "grpo"
    scale_rewards: bool = True


@dataclass
class GRPORollout:
    """One generation batch (``prompts x G`` completions, each group adjacent) and what GRPO computes on it (all detached)."""

    sequences: torch.Tensor
    attention_mask: torch.Tensor
    position_ids: torch.Tensor
    responses: torch.Tensor
    response_mask: torch.Tensor
    rewards: torch.Tensor
    advantages: torch.Tensor
    group_std: torch.Tensor
    finished: torch.Tensor
    prompt_width: int
    old_logprobs: Optional[torch.Tensor] = None
    ref_logprobs: Optional[torch.Tensor] = None
    extra: dict[str, Any] = field(default_factory=dict)


class GRPOModule(PolicyRollouts, PostTrainModuleBase):
    """GRPO on the shared backbone: groups of sampled completions, group-normalised advantages, clipped ratio, k3 KL.

    Networks: the policy (``init_from``: an SFT checkpoint), the reward — a
    Python callable (``reward_fn``) *or* a frozen reward model (``reward_model``,
    a RewardModule checkpoint) — and, when ``grpo.beta > 0``, a frozen reference
    policy (``ref_model``, default a copy of the initial policy). No value model.

    Logs per iteration, with TRL's names: ``reward``, ``reward_std`` (mean of
    the groups' stds), ``frac_reward_zero_std``, ``rewards/<fn>/mean``,
    ``kl`` (when ``beta > 0``), ``entropy``, ``clip_ratio/low_mean``,
    ``clip_ratio/low_min``, ``clip_ratio/high_mean``, ``clip_ratio/high_max``,
    ``clip_ratio/region_mean``, ``completions/mean_length``,
    ``completions/min_length``, ``completions/max_length``,
    ``completions/clipped_ratio``, ``completions/mean_terminated_length``,
    ``num_tokens``; plus ``train/loss`` and the shared step statistics.
    Validation logs ``eval/score``, ``eval/length``, ``eval/eos_rate`` on held-out prompts.

    Args:
        config: Policy shape; omit to take it from ``init_from``.
        settings: Optimizer, schedule (over optimizer steps), clipping, compile, peak FLOP/s.
        init_from: The starting policy, usually an SFT checkpoint.
        reward_model: Reward-model checkpoint (give this or ``reward_fn``).
        reward_fn: Dotted path of ``fn(prompt, response, **reward_fn_kwargs) -> float``
            (from Python, the function itself); prompt and response are the decoded chat text.
        reward_fn_kwargs: Keyword arguments for ``reward_fn``.
        ref_model: Reference-policy checkpoint for the KL term (default: a frozen copy of the initial policy).
        rollout: Sampling settings (shared with PPO).
        grpo: The GRPO update.
        val_temperature: Sampling temperature for validation (0: greedy).
        seed: Seeds the rollout sampler and minibatch shuffling.
    """

    stage = "grpo"
    frozen_prefixes = ("ref_model.", "reward_model.")
    data_protocol = PromptData
    divergence_error = GRPODivergenceError

    def __init__(
        self,
        config: Optional[TransformerConfig] = None,
        settings: Optional[TrainingSettings] = None,
        init_from: Optional[str] = None,
        reward_model: Optional[str] = None,
        reward_fn: Optional[Union[str, Callable[..., float]]] = None,
        reward_fn_kwargs: Optional[dict[str, Any]] = None,
        ref_model: Optional[str] = None,
        rollout: Optional[RolloutConfig] = None,
        grpo: Optional[GRPOConfig] = None,
        val_temperature: float = 0.0,
        seed: int = 0,
    ):
        self.rollout_cfg = rollout or RolloutConfig()
        self.grpo_cfg = grpo or GRPOConfig()
        self.val_temperature = val_temperature
        self.seed = seed
        self._validate_settings(reward_model, reward_fn)
        super().__init__(config, settings, init_from)
        if not init_from:
            log.warning("grpo: no model.init_from given; GRPO starts from a randomly initialised policy")
        self.setup_rollouts(reward_model, reward_fn, reward_fn_kwargs, ref_model, need_reference=self.grpo_cfg.beta != 0.0)
        if self.reward_fn is not None:
            self.reward_name = getattr(self.reward_fn, "__name__", "reward_fn")
        else:
            self.reward_name = "reward_model"
        self.prompts_per_step: Optional[int] = None
        self.history: list[dict[str, float]] = []
        if self.config.dropout > 0:
            log.info("grpo: dropout %.2f is disabled: every network runs in eval mode", self.config.dropout)

    # -- settings -----------------------------------------------------------------------------
    def _validate_settings(self, reward_model: Optional[str], reward_fn: Any) -> None:
        g = self.grpo_cfg
        if g.num_generations < 2:
            raise ConfigError("model.grpo.num_generations", f"a group needs at least 2 completions per prompt, got {g.num_generations}",
                              "set num_generations >= 2 (advantages compare completions within a group)")
        if g.loss_type not in GRPO_LOSS_TYPES:
            raise ConfigError("model.grpo.loss_type", f"unknown loss type {g.loss_type!r}", "use one of " + ", ".join(GRPO_LOSS_TYPES))
        if g.num_iterations < 1:
            raise ConfigError("model.grpo.num_iterations", f"must be >= 1, got {g.num_iterations}")
        if g.epsilon <= 0 or (g.epsilon_high is not None and g.epsilon_high <= 0):
            raise ConfigError("model.grpo.epsilon", "epsilon and epsilon_high must be > 0", "use e.g. epsilon: 0.2")
        if g.beta < 0:
            raise ConfigError("model.grpo.beta", f"must be >= 0, got {g.beta}", "use 0 (no KL term) or e.g. 0.04")
        for name in ("mini_batch_size", "micro_batch_size"):
            value = getattr(g, name)
            if value is not None and value < 1:
                raise ConfigError(f"model.grpo.{name}", f"must be >= 1, got {value}")
        self.check_rollout_settings(reward_model, reward_fn)

    def build_model(self) -> CausalLM:
        return CausalLM(self.config)

    def attach_data(self, dm: PromptData) -> None:
        super().attach_data(dm)
        self.attach_prompts(dm)
        self.prompts_per_step = dm.batch_size
        n = dm.batch_size * self.grpo_cfg.num_generations
        mb = self.grpo_cfg.mini_batch_size or n
        if n % mb:
            raise ConfigError("model.grpo.mini_batch_size", f"{mb} does not divide the {n} completions of a step "
                              f"(data.batch_size {dm.batch_size} x num_generations {self.grpo_cfg.num_generations})",
                              "pick a divisor of batch_size x num_generations")

    def optimizer_steps_per_batch(self) -> int:
        n = (self.prompts_per_step or 1) * self.grpo_cfg.num_generations
        return self.grpo_cfg.num_iterations * max(n // (self.grpo_cfg.mini_batch_size or n), 1)

    def _needs_old_logprobs(self, n_completions: int) -> bool:
        g = self.grpo_cfg
        return g.num_iterations > 1 or (g.mini_batch_size or n_completions) < n_completions

    # -- rollout ------------------------------------------------------------------------------------
    @torch.no_grad()
    def make_rollout(self, batch: dict) -> GRPORollout:
        """Sample G completions per prompt, score them and compute group advantages (and old/reference log-probs)."""
        g, r = self.grpo_cfg, self.rollout_cfg
        G = g.num_generations
        ids = batch["input_ids"].repeat_interleave(G, dim=0)
        prompt_mask = batch["attention_mask"].repeat_interleave(G, dim=0)
        gen = self.sample(ids, prompt_mask)
        P = ids.shape[1]
        mask, pos = sequence_masks(gen)
        rmask = gen.response_mask.bool()
        raw, _ = self.raw_scores(gen, mask, pos)
        if not bool(torch.isfinite(raw).all()):
            raise GRPODivergenceError(f"grpo: non-finite rewards in the rollout at step {self.global_step}; stopped before any update")
        rewards = raw
        if r.missing_eos_penalty is not None:
            rewards = rewards - r.missing_eos_penalty * (~gen.finished).float()
        adv, _, std = group_advantages(rewards, G, g.scale_rewards)
        zero = torch.zeros((), device=raw.device)
        old = ref = None
        if self._needs_old_logprobs(ids.shape[0]):
            old, _ = self.response_logprobs(self.model, gen.sequences, mask, pos, gen.responses, P, r.temperature)
            old = torch.where(rmask, old, zero)
        if g.beta != 0.0:
            ref, _ = self.response_logprobs(self.ref_model, gen.sequences, mask, pos, gen.responses, P, r.temperature)
            ref = torch.where(rmask, ref, zero)
        return GRPORollout(
            sequences=gen.sequences, attention_mask=mask, position_ids=pos, responses=gen.responses, response_mask=rmask,
            rewards=rewards, advantages=adv, group_std=std, finished=gen.finished, prompt_width=P,
            old_logprobs=old, ref_logprobs=ref, extra={"raw": raw},
        )

    # -- the GRPO iteration ---------------------------------------------------------------------------
    def training_step(self, batch: dict, batch_idx: int):
        self._eval_mode()
        ro = self.make_rollout(batch)
        g = self.grpo_cfg
        n = ro.sequences.shape[0]
        mb = g.mini_batch_size or n
        micro = min(g.micro_batch_size or mb, mb)
        per_minibatch = []
        for _ in range(g.num_iterations):
            order = torch.randperm(n, generator=self._shuffle) if mb < n else torch.arange(n)
            order = order.to(ro.sequences.device)
            for start in range(0, n, mb):
                idx = order[start : start + mb]
                normaliser = (int(idx.numel()), ro.response_mask[idx].sum())
                outputs = self.optimization_step([(ro, sub) for sub in idx.split(micro)], normaliser)
                per_minibatch.append(add_up(outputs))
        stats = self.rollout_stats(ro)
        stats.update(self.update_stats(per_minibatch))
        self.history.append({"step": float(self.global_step), **stats})
        self.log("train/loss", stats.pop("loss"), prog_bar=True, on_step=True, on_epoch=False)
        self.log_dict(stats, on_step=True, on_epoch=False)
        self.log_step_stats(int(ro.attention_mask.sum()))
        self.log("num_tokens", float(self.tokens_seen), on_step=True, on_epoch=False)
        return {"loss": torch.tensor(self.history[-1]["loss"])}

    def micro_batch_loss(self, micro_batch: tuple[GRPORollout, torch.Tensor], normaliser):
        """This micro-batch's share of the minibatch's GRPO loss, and its share of the token-mean statistics."""
        ro, sub = micro_batch
        g = self.grpo_cfg
        n_seq, n_tok = normaliser
        m = ro.response_mask[sub]
        new_lp, entropy = self.response_logprobs(self.net, ro.sequences[sub], ro.attention_mask[sub], ro.position_ids[sub],
                                                 ro.responses[sub], ro.prompt_width, self.rollout_cfg.temperature, with_entropy=True)
        old = ro.old_logprobs[sub] if ro.old_logprobs is not None else new_lp.detach()
        ref = ro.ref_logprobs[sub] if ro.ref_logprobs is not None else None
        per_token, st = grpo_token_loss(new_lp, old, ro.advantages[sub], ref, g.beta, g.epsilon, g.epsilon_high)
        loss = grpo_loss(per_token, m, g.loss_type, self.rollout_cfg.max_new_tokens, num_sequences=n_seq, num_tokens=n_tok)
        tokens = n_tok.clamp(min=1).float()

        def token_share(x: torch.Tensor) -> float:
            return float(masked_sum(x.float(), m) / tokens)

        out = {
            "loss": float(loss.detach()),
            "entropy": token_share(entropy.detach()),
            "clip_ratio/low_mean": token_share(st["low_clipped"]),
            "clip_ratio/high_mean": token_share(st["high_clipped"]),
            "clip_ratio/region_mean": token_share(st["low_clipped"] | st["high_clipped"]),
        }
        if "kl" in st:
            out["kl"] = token_share(st["kl"])
        return loss, out

    def rollout_stats(self, ro: GRPORollout) -> dict[str, float]:
        """Reward and completion statistics of a generation batch (TRL's names)."""
        lengths = ro.response_mask.sum(1).float()
        done = lengths[ro.finished]
        group_std = ro.group_std.view(-1, self.grpo_cfg.num_generations)[:, 0]
        return {
            "reward": float(ro.rewards.mean()),
            "reward_std": float(group_std.mean()),
            "frac_reward_zero_std": float(torch.isclose(group_std, torch.zeros_like(group_std)).float().mean()),
            f"rewards/{self.reward_name}/mean": float(ro.extra["raw"].mean()),
            "completions/mean_length": float(lengths.mean()),
            "completions/min_length": float(lengths.min()),
            "completions/max_length": float(lengths.max()),
            "completions/clipped_ratio": float((~ro.finished).float().mean()),
            "completions/mean_terminated_length": float(done.mean()) if done.numel() else 0.0,
        }

    @staticmethod
    def update_stats(per_minibatch: list[dict[str, float]]) -> dict[str, float]:
        """Means over the step's minibatches; ``clip_ratio/low_min`` and ``high_max`` are their extremes."""
        keys = per_minibatch[0].keys()
        out = {k: sum(s[k] for s in per_minibatch) / len(per_minibatch) for k in keys}
        out["clip_ratio/low_min"] = min(s["clip_ratio/low_mean"] for s in per_minibatch)
        out["clip_ratio/high_max"] = max(s["clip_ratio/high_mean"] for s in per_minibatch)
        return out

    # -- checkpoint state ---------------------------------------------------------------------------------
    def on_save_checkpoint(self, checkpoint: dict) -> None:
        super().on_save_checkpoint(checkpoint)
        checkpoint["lmlab"]["grpo"] = self.random_streams_state()

    def on_load_checkpoint(self, checkpoint: dict) -> None:
        super().on_load_checkpoint(checkpoint)
        state = checkpoint.get("lmlab", {}).get("grpo")
        if state:
            self.restore_random_streams(state)
