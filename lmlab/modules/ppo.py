"""``PPOModule``: RL fine-tuning of a policy against a reward model or a programmatic reward.

One ``training_step`` is one PPO iteration on a batch of prompts:

1. *rollout*: sample a response per prompt from the policy with the KV cache
   (:func:`lmlab.models.generate`: temperature, top-k/top-p, stop tokens);
2. *score*: the reward model's score at the response's last token, or a
   Python callable ``fn(prompt_text, response_text) -> float``; then optional
   normalisation, a penalty for responses that never emitted a stop token,
   clipping, and an optional safety constraint;
3. *per-token rewards*: ``-beta * KL_t`` at every response token (KL between
   the policy and the frozen reference), plus the score at the last token;
4. *advantages*: GAE with a value model, whitened over the batch;
5. *update*: ``ppo_epochs`` passes over shuffled minibatches of the clipped
   policy objective plus the clipped value loss, one optimizer step each;
6. *KL control*: a fixed or adaptive coefficient, and a KL budget that stops
   the run or raises the coefficient when the policy drifts too far.

Because a training step holds several optimizer steps, ``trainer.max_steps``
counts optimizer steps: ``iterations * ppo_epochs * (batch_size / mini_batch_size)``.

Every network runs in eval mode (no dropout) so the log-probs of a
rollout, the recomputed old log-probs and the first minibatch's new
log-probs are the same numbers; see ``docs/posttraining.md`` for the other
implementation details followed.
"""

from __future__ import annotations

import logging
import math
from dataclasses import dataclass, field
from typing import Any, Callable, Literal, Optional, Union

import torch

from lmlab.distributed.hooks import offloads_optimizer
from lmlab.errors import ConfigError
from lmlab.models.checkpoint import load_backbone_weights, open_checkpoint
from lmlab.models.config import TransformerConfig
from lmlab.models.heads import CausalLM, ScalarModel
from lmlab.modules.base import add_up
from lmlab.modules.data_contract import PromptData
from lmlab.modules.optim import TrainingSettings, build_optimizer, make_lr_lambda, param_groups
from lmlab.modules.posttrain_base import PostTrainModuleBase, check_tokenizer_match, read_checkpoint_meta
from lmlab.modules.rollout import PolicyRollouts, as_callable, freeze, load_callable, sequence_masks
from lmlab.modules.rlhf_math import (
    AdaptiveKLController,
    FixedKLController,
    RunningMoments,
    gae,
    masked_mean,
    masked_whiten,
    per_token_rewards,
    ppo_policy_loss,
    ppo_value_loss,
    whiten_rewards,
)

log = logging.getLogger(__name__)

__all__ = [
    "RolloutConfig", "PPOConfig", "KLConfig", "SafetyConfig", "PPOModule", "PPODivergenceError",
    "load_callable", "Rollout",
]


class PPODivergenceError(RuntimeError):
    """PPO diverged (non-finite numbers or an exploding KL); raised before any checkpoint of the bad weights."""


# --------------------------------------------------------------------------- configuration


@dataclass
class RolloutConfig:
    """How responses are sampled during PPO.

    Args:
        max_new_tokens: Longest response.
        temperature: Sampling temperature (> 0); log-probs use the same temperature.
        top_k: Sample from the k most likely tokens (0: off).
        top_p: Nucleus sampling mass (1: off).
        missing_eos_penalty: Subtract this from the score of a response that
            hit ``max_new_tokens`` without a stop token (None: no penalty).
    """

    max_new_tokens: int = 64
    temperature: float = 1.0
    top_k: int = 0
    top_p: float = 1.0
    missing_eos_penalty: Optional[float] = None


@dataclass
class PPOConfig:
    """The PPO update.

    Args:
        ppo_epochs: Passes over each rollout batch.
        mini_batch_size: Rollouts per optimizer step (default: the whole batch); must divide the batch.
        micro_batch_size: Rollouts per forward/backward within a minibatch.
        clip_range: Policy ratio clip epsilon.
        clip_range_value: Value clip epsilon (around the rollout's values).
        vf_coef: Weight of the value loss.
        gamma: Discount.
        lam: GAE lambda.
        whiten_rewards: Rescale per-token rewards to unit variance before GAE.
        whiten_advantages: Normalise advantages over the batch (mean 0, std 1).
        value_lr: Peak learning rate of the value model (default: the policy's).
            Adam's step size does not depend on ``vf_coef``, so this is what sets
            how fast the value model learns per-prompt baselines.
    """

    ppo_epochs: int = 4
    mini_batch_size: Optional[int] = None
    micro_batch_size: Optional[int] = None
    clip_range: float = 0.2
    clip_range_value: float = 0.2
    vf_coef: float = 0.1
    gamma: float = 1.0
    lam: float = 0.95
    whiten_rewards: bool = False
    whiten_advantages: bool = True
    value_lr: Optional[float] = None


@dataclass
class KLConfig:
    """The KL penalty to the reference policy and the KL safety limits.

    KL is measured per response, summed over its tokens (``log pi - log pi_ref``),
    averaged over the batch.

    Args:
        coef: Penalty coefficient beta (the initial one when ``adaptive``).
        estimator: Per-token estimator in the reward: ``k1``, ``k2`` or ``k3``.
        adaptive: Steer the coefficient towards ``target`` (Ziegler et al. 2019).
        target: Target KL of the adaptive controller.
        horizon: Horizon (in samples) of the adaptive controller.
        budget: When the rollout KL exceeds this, apply ``budget_action`` (None: off).
        budget_action: ``stop`` training (the current weights are kept) or
            ``raise_coef`` (multiply the coefficient by ``budget_factor``).
        budget_factor: Coefficient multiplier for ``raise_coef``.
        abort_at: KL beyond which the run is considered diverged and raises
            :class:`PPODivergenceError` (None: off).
    """

    coef: float = 0.05
    estimator: Literal["k1", "k2", "k3"] = "k1"
    adaptive: bool = False
    target: float = 6.0
    horizon: float = 10000.0
    budget: Optional[float] = None
    budget_action: Literal["stop", "raise_coef"] = "stop"
    budget_factor: float = 2.0
    abort_at: Optional[float] = None


@dataclass
class SafetyConfig:
    """An optional safety constraint: ``score -= coef * max(0, threshold - safety)``.

    ``safety`` comes from a second reward model (``model``, a ScalarModel
    checkpoint) or a callable (``fn``, dotted path, ``fn(prompt, response) -> float``);
    higher means safer, and responses below ``threshold`` are penalised.

    Args:
        model: Safety reward-model checkpoint.
        fn: Dotted path of a safety scoring function.
        fn_kwargs: Keyword arguments for ``fn``.
        threshold: Scores below this count as violations.
        coef: Penalty per unit below the threshold.
    """

    model: Optional[str] = None
    fn: Optional[Union[str, Callable[..., float]]] = None
    fn_kwargs: dict[str, Any] = field(default_factory=dict)
    threshold: float = 0.0
    coef: float = 1.0


# --------------------------------------------------------------------------- rollout container


@dataclass
class Rollout:
    """One batch of rollouts and everything PPO computes on it (all detached).

    ``P`` is the prompt width: response token ``t`` sits at column ``P + t`` of
    ``sequences`` and is predicted from column ``P + t - 1``.
    """

    sequences: torch.Tensor
    attention_mask: torch.Tensor
    position_ids: torch.Tensor
    responses: torch.Tensor
    response_mask: torch.Tensor
    logprobs: torch.Tensor
    gen_logprobs: torch.Tensor
    ref_logprobs: torch.Tensor
    values: torch.Tensor
    entropy: torch.Tensor
    raw_scores: torch.Tensor
    scores: torch.Tensor
    finished: torch.Tensor
    prompt_width: int
    safety: Optional[torch.Tensor] = None
    rewards: Optional[torch.Tensor] = None
    advantages: Optional[torch.Tensor] = None
    returns: Optional[torch.Tensor] = None


# --------------------------------------------------------------------------- the module


class PPOModule(PolicyRollouts, PostTrainModuleBase):
    """PPO with a KL penalty to a frozen reference policy (Ouyang et al. 2022; Huang et al. 2024's details).

    Networks: the policy (``init_from``: an SFT checkpoint), a frozen copy
    as the reference (or ``ref_model``), the reward — a frozen reward model
    (``reward_model``, a RewardModule checkpoint) *or* a Python callable
    (``reward_fn``, e.g. ``lmlab.data.posttrain.verifiable.reward``) — and a value
    model whose backbone starts from the reward model or the policy, with its
    own zero-initialised head. One AdamW optimizer updates policy and value.

    Logs per iteration: ``objective/kl``, ``objective/entropy``,
    ``objective/scores``, ``objective/raw_scores``, ``objective/rlhf_reward``,
    ``objective/non_score_reward``, ``objective/kl_coef``, ``policy/approxkl``,
    ``policy/clipfrac``, ``val/ratio``, ``val/clipfrac`` (value clipping),
    ``loss/policy``, ``loss/value``, ``response/length``, ``response/eos_rate``,
    ``rollout/logprob_gap`` (largest gap between generation-time and
    recomputed log-probs); validation logs ``eval/score``, ``eval/length``,
    ``eval/eos_rate`` on held-out prompts.

    Args:
        config: Policy shape; omit to take it from ``init_from``.
        settings: Optimizer (policy and value), schedule (over optimizer steps),
            clipping of the joint policy + value gradient norm, ``compile`` (the
            policy's training forward) and peak FLOP/s.
        init_from: The starting policy, usually an SFT checkpoint.
        reward_model: Reward-model checkpoint (give this or ``reward_fn``).
        reward_fn: Dotted path of ``fn(prompt, response, **reward_fn_kwargs) -> float``
            (from Python, the function itself); ``prompt`` and ``response`` are the
            decoded chat text, special tokens included.
        reward_fn_kwargs: Keyword arguments for ``reward_fn``.
        ref_model: Reference-policy checkpoint (default: a frozen copy of the initial policy).
        value_init: Backbone of the value model: ``reward`` (needs ``reward_model``)
            or ``policy``; default ``reward`` when there is a reward model.
        rollout: Sampling settings.
        ppo: PPO update settings.
        kl: KL penalty, controller and budget.
        score_norm: ``none``; ``reference``: standardise scores with the mean/std of
            the first batch (samples of the initial policy); ``running``: with
            running statistics.
        score_clip: Clip (normalised) scores to ``[-score_clip, score_clip]``.
        safety: Optional safety constraint.
        val_temperature: Sampling temperature for validation (0: greedy).
        seed: Seeds the rollout sampler and minibatch shuffling.
    """

    stage = "ppo"
    frozen_prefixes = ("ref_model.", "reward_model.", "safety_model.")
    data_protocol = PromptData
    divergence_error = PPODivergenceError
    rollout_networks = ("model", "value_model", "ref_model", "reward_model", "safety_model")

    def __init__(
        self,
        config: Optional[TransformerConfig] = None,
        settings: Optional[TrainingSettings] = None,
        init_from: Optional[str] = None,
        reward_model: Optional[str] = None,
        reward_fn: Optional[Union[str, Callable[..., float]]] = None,
        reward_fn_kwargs: Optional[dict[str, Any]] = None,
        ref_model: Optional[str] = None,
        value_init: Optional[Literal["reward", "policy"]] = None,
        rollout: Optional[RolloutConfig] = None,
        ppo: Optional[PPOConfig] = None,
        kl: Optional[KLConfig] = None,
        score_norm: Literal["none", "reference", "running"] = "none",
        score_clip: Optional[float] = None,
        safety: Optional[SafetyConfig] = None,
        val_temperature: float = 0.0,
        seed: int = 0,
    ):
        self.rollout_cfg = rollout or RolloutConfig()
        self.ppo_cfg = ppo or PPOConfig()
        self.kl_cfg = kl or KLConfig()
        self.safety_cfg = safety or SafetyConfig()
        self.score_norm = score_norm
        self.score_clip = score_clip
        self.val_temperature = val_temperature
        self.seed = seed
        self._validate_settings(reward_model, reward_fn, value_init)
        super().__init__(config, settings, init_from)
        if not init_from:
            log.warning("ppo: no model.init_from given; PPO starts from a randomly initialised policy")

        reward_ckpt = self.setup_rollouts(reward_model, reward_fn, reward_fn_kwargs, ref_model)

        # value model: backbone from the reward model or the policy, zero-initialised head
        value_init = value_init or ("reward" if reward_model else "policy")
        if value_init == "reward":
            self.value_model = reward_ckpt.scalar_model(head=False, zero_init_head=True)
        else:
            self.value_model = ScalarModel(self.config, zero_init_head=True)
            policy_backbone = {f"backbone.{k}": v for k, v in self.model.backbone.state_dict().items()}
            load_backbone_weights(self.value_model, policy_backbone)
        self.value_init = value_init

        # optional safety constraint
        self.safety_model = None
        self.safety_fn = None
        self.safety_meta: dict[str, Any] = {}
        if self.safety_cfg.model:
            safety_ckpt = open_checkpoint(self.safety_cfg.model, "model.safety.model")
            self.safety_model = freeze(safety_ckpt.scalar_model())
            self._check_same_vocab(self.safety_model.config, "model.safety.model")
            self.safety_meta = read_checkpoint_meta(safety_ckpt)
            check_tokenizer_match(self.init_meta.get("tokenizer"), self.safety_meta.get("tokenizer"),
                                  "model.safety.model", f"safety model {self.safety_cfg.model}")
        if self.safety_cfg.fn:
            self.safety_fn = as_callable(self.safety_cfg.fn, "model.safety.fn")

        kc = self.kl_cfg
        self.kl_ctl = AdaptiveKLController(kc.coef, kc.target, kc.horizon) if kc.adaptive else FixedKLController(kc.coef)
        self.score_moments = RunningMoments()
        self.ref_score_stats: Optional[tuple[float, float]] = None
        self.rollout_batch_size: Optional[int] = None
        self.history: list[dict[str, float]] = []
        self.minibatch_stats: list[dict[str, float]] = []
        self.stopped_reason: Optional[str] = None
        if self.config.dropout > 0:
            log.info("ppo: dropout %.2f is disabled: every network runs in eval mode", self.config.dropout)

    # -- settings -----------------------------------------------------------------------------
    def _validate_settings(self, reward_model, reward_fn, value_init) -> None:
        self.check_rollout_settings(reward_model, reward_fn)
        if value_init == "reward" and not reward_model:
            raise ConfigError("model.value_init", "'reward' needs model.reward_model", "use value_init: policy with a reward function")
        p, k = self.ppo_cfg, self.kl_cfg
        if p.ppo_epochs < 1:
            raise ConfigError("model.ppo.ppo_epochs", f"must be >= 1, got {p.ppo_epochs}")
        if p.value_lr is not None and p.value_lr <= 0:
            raise ConfigError("model.ppo.value_lr", f"must be > 0, got {p.value_lr}")
        if p.clip_range <= 0 or p.clip_range_value <= 0:
            raise ConfigError("model.ppo.clip_range", "clip ranges must be > 0", "use e.g. 0.2")
        if not (0 <= p.gamma <= 1 and 0 <= p.lam <= 1):
            raise ConfigError("model.ppo.gamma", f"gamma and lam must lie in [0, 1], got {p.gamma}, {p.lam}")
        if k.coef < 0:
            raise ConfigError("model.kl.coef", f"must be >= 0, got {k.coef}")
        if k.budget is not None and k.budget <= 0:
            raise ConfigError("model.kl.budget", f"must be > 0, got {k.budget}")
        if k.budget_action == "raise_coef" and (k.budget_factor <= 1 or k.coef <= 0):
            raise ConfigError("model.kl.budget_factor", "raise_coef needs budget_factor > 1 and coef > 0", "e.g. coef: 0.05, budget_factor: 2")
        if self.score_clip is not None and self.score_clip <= 0:
            raise ConfigError("model.score_clip", f"must be > 0, got {self.score_clip}")
        if self.score_norm not in ("none", "reference", "running"):
            raise ConfigError("model.score_norm", f"unknown value {self.score_norm!r}", "use none, reference or running")

    def build_model(self) -> CausalLM:
        return CausalLM(self.config)

    def attach_data(self, dm: PromptData) -> None:
        super().attach_data(dm)
        check_tokenizer_match(self.tokenizer_info, self.safety_meta.get("tokenizer"), "model.safety.model",
                              f"safety model {self.safety_cfg.model}")
        self.attach_prompts(dm)
        self.rollout_batch_size = dm.batch_size

    # -- optimisation -----------------------------------------------------------------------------
    def configure_optimizers(self):
        # one optimizer, policy and value parameter groups; the value model may have its own peak LR
        opt_cfg = self.settings.optimizer
        opt = build_optimizer(self.model, opt_cfg, cpu_offload=offloads_optimizer(self))
        value_lr = self.ppo_cfg.value_lr or opt_cfg.lr
        for group in param_groups(self.value_model, opt_cfg):
            opt.add_param_group({**group, "lr": value_lr})
        max_steps = self.trainer.max_steps if self._trainer is not None and self.trainer.max_steps > 0 else None
        sched = torch.optim.lr_scheduler.LambdaLR(opt, make_lr_lambda(self.settings.schedule, max_steps))
        return {"optimizer": opt, "lr_scheduler": {"scheduler": sched, "interval": "step"}}

    def optimizer_steps_per_batch(self) -> int:
        batch = self.rollout_batch_size or 1
        return self.ppo_cfg.ppo_epochs * max(batch // (self.ppo_cfg.mini_batch_size or batch), 1)

    def trainable_parameters(self):
        # the clipping covers the joint policy + value gradient, as the one optimizer updates both
        return [*self.model.parameters(), *self.value_model.parameters()]

    # -- rollout ------------------------------------------------------------------------------------
    def values_of(self, model: ScalarModel, sequences, attention_mask, position_ids, prompt_width: int) -> torch.Tensor:
        """Value estimates V(s_t) for the state before each response token."""
        v = model(sequences, position_ids=position_ids, attention_mask=attention_mask)
        return v[:, prompt_width - 1 : -1].float()

    def shape_scores(self, raw: torch.Tensor, finished: torch.Tensor, safety: Optional[torch.Tensor]) -> torch.Tensor:
        """Normalise, penalise missing EOS, clip and apply the safety constraint."""
        scores = raw
        if self.score_norm == "reference":
            if self.ref_score_stats is None:
                # statistics of the initial (= reference) policy's samples, frozen from here on
                mean, std = float(raw.mean()), float(raw.std()) if raw.numel() > 1 else 0.0
                self.ref_score_stats = (mean, std if std > 1e-6 else 1.0)
            mean, std = self.ref_score_stats
            scores = (scores - mean) / std
        elif self.score_norm == "running":
            self.score_moments.update(raw)
            if self.score_moments.count >= 2 and self.score_moments.std > 1e-6:
                scores = self.score_moments.normalize(scores)
            else:
                scores = scores - self.score_moments.mean
        if self.rollout_cfg.missing_eos_penalty is not None:
            scores = scores - self.rollout_cfg.missing_eos_penalty * (~finished).float()
        if self.score_clip is not None:
            scores = scores.clamp(-self.score_clip, self.score_clip)
        if safety is not None:
            scores = scores - self.safety_cfg.coef * (self.safety_cfg.threshold - safety).clamp(min=0)
        return scores

    @torch.no_grad()
    def make_rollout(self, batch: dict) -> Rollout:
        """Sample, recompute log-probs and values with full forward passes, and score."""
        r = self.rollout_cfg
        gen = self.sample(batch["input_ids"], batch["attention_mask"])
        P = batch["input_ids"].shape[1]
        mask, pos = sequence_masks(gen)
        rmask = gen.response_mask.bool()
        lp, ent = self.response_logprobs(self.model, gen.sequences, mask, pos, gen.responses, P, r.temperature, with_entropy=True)
        ref_lp, _ = self.response_logprobs(self.ref_model, gen.sequences, mask, pos, gen.responses, P, r.temperature)
        values = self.values_of(self.value_model, gen.sequences, mask, pos, P)
        raw, safety = self.raw_scores(gen, mask, pos)
        for name, t in (("policy log-probs", lp), ("reference log-probs", ref_lp), ("values", values), ("scores", raw)):
            if not bool(torch.isfinite(torch.where(rmask, t, torch.zeros_like(t)) if t.dim() == 2 else t).all()):
                raise PPODivergenceError(f"ppo: non-finite {name} in the rollout at step {self.global_step}; stopped before any update")
        zero = torch.zeros((), device=lp.device)
        return Rollout(
            sequences=gen.sequences, attention_mask=mask, position_ids=pos, responses=gen.responses, response_mask=rmask,
            logprobs=torch.where(rmask, lp, zero), gen_logprobs=gen.logprobs.float(), ref_logprobs=torch.where(rmask, ref_lp, zero),
            values=torch.where(rmask, values, zero), entropy=ent, raw_scores=raw, scores=raw, finished=gen.finished,
            prompt_width=P, safety=safety,
        )

    # -- the PPO iteration ---------------------------------------------------------------------------
    def training_step(self, batch: dict, batch_idx: int):
        self._eval_mode()
        ro = self.make_rollout(batch)
        B = ro.sequences.shape[0]
        rmask = ro.response_mask
        seq_kl = (ro.logprobs - ro.ref_logprobs).masked_fill(~rmask, 0).sum(1)
        mean_kl = float(seq_kl.mean())
        if not math.isfinite(mean_kl):
            raise PPODivergenceError(f"ppo: non-finite KL at step {self.global_step}; stopped before any update")
        kc = self.kl_cfg
        if kc.abort_at is not None and mean_kl > kc.abort_at:
            raise PPODivergenceError(
                f"ppo: KL to the reference exploded ({mean_kl:.3g} > kl.abort_at={kc.abort_at}) at step {self.global_step}; "
                "stopped before updating (lower the learning rate or raise kl.coef)")
        budget_hit = kc.budget is not None and mean_kl > kc.budget
        if budget_hit and kc.budget_action == "stop":
            self.stopped_reason = f"KL budget exceeded: {mean_kl:.3g} > {kc.budget}"
            log.warning("ppo: %s at step %d; stopping (the weights before this rollout are kept)", self.stopped_reason, self.global_step)
            self.trainer.should_stop = True
            self.log_dict({"objective/kl": mean_kl, "objective/kl_budget_hit": 1.0}, on_step=True, on_epoch=False)
            return None
        if budget_hit:
            self.kl_ctl.value *= kc.budget_factor
            log.warning("ppo: KL budget exceeded (%.3g > %s); KL coefficient raised to %.4g", mean_kl, kc.budget, self.kl_ctl.value)

        ro.scores = self.shape_scores(ro.raw_scores, ro.finished, ro.safety)
        kl_coef = float(self.kl_ctl.value)
        rewards = per_token_rewards(ro.scores, ro.logprobs, ro.ref_logprobs, rmask, kl_coef, kc.estimator)
        non_score = per_token_rewards(torch.zeros_like(ro.scores), ro.logprobs, ro.ref_logprobs, rmask, kl_coef, kc.estimator)
        if self.ppo_cfg.whiten_rewards:
            rewards = whiten_rewards(rewards, rmask)
        adv, returns = gae(rewards, ro.values, rmask, self.ppo_cfg.gamma, self.ppo_cfg.lam)
        if self.ppo_cfg.whiten_advantages and int(rmask.sum()) > 1:
            adv = masked_whiten(adv, rmask)
        ro.rewards, ro.advantages, ro.returns = rewards, adv, returns

        update = self.ppo_update(ro)
        self.kl_ctl.update(mean_kl, B)

        gap = (ro.gen_logprobs - ro.logprobs).abs().masked_fill(~rmask, 0).max()
        lengths = rmask.sum(1).float()
        stats = {
            "objective/kl": mean_kl,
            "objective/entropy": float(masked_mean(ro.entropy, rmask)),
            "objective/raw_scores": float(ro.raw_scores.mean()),
            "objective/scores": float(ro.scores.mean()),
            "objective/non_score_reward": float(non_score.sum(1).mean()),
            "objective/rlhf_reward": float(ro.scores.mean() + non_score.sum(1).mean()),
            "objective/kl_coef": kl_coef,
            "response/length": float(lengths.mean()),
            "response/eos_rate": float(ro.finished.float().mean()),
            "rollout/logprob_gap": float(gap),
            **update,
        }
        if ro.safety is not None:
            stats["objective/safety"] = float(ro.safety.mean())
            stats["objective/safety_violations"] = float((ro.safety < self.safety_cfg.threshold).float().mean())
        self.history.append({"step": float(self.global_step), **stats})
        self.log_dict(stats, on_step=True, on_epoch=False)
        self.log("train/reward", stats["objective/scores"], prog_bar=True, on_step=True, on_epoch=False)
        self.log_step_stats(int(ro.attention_mask.sum()))
        return {"loss": torch.tensor(update["loss/total"])}

    def ppo_update(self, ro: Rollout) -> dict[str, float]:
        """``ppo_epochs`` passes of shuffled minibatches; one optimizer step per minibatch. Returns mean stats."""
        cfg = self.ppo_cfg
        B = ro.sequences.shape[0]
        mb = cfg.mini_batch_size or B
        if B % mb:
            raise ConfigError("model.ppo.mini_batch_size", f"{mb} does not divide the rollout batch of {B}", "pick a divisor of data.batch_size")
        micro = min(cfg.micro_batch_size or mb, mb)
        self.minibatch_stats = []
        for _ in range(cfg.ppo_epochs):
            order = torch.randperm(B, generator=self._shuffle).to(ro.sequences.device)
            for start in range(0, B, mb):
                idx = order[start : start + mb]
                self.minibatch_stats.append(self._minibatch_step(ro, idx, micro))
        keys = self.minibatch_stats[0].keys()
        return {k: sum(s[k] for s in self.minibatch_stats) / len(self.minibatch_stats) for k in keys}

    def _minibatch_step(self, ro: Rollout, idx: torch.Tensor, micro: int) -> dict[str, float]:
        """One optimizer step on the rollouts ``idx`` (through :meth:`optimization_step`); weighted mean stats."""
        n_tok = ro.response_mask[idx].sum().clamp(min=1)
        outputs = self.optimization_step([(ro, sub) for sub in idx.split(micro)], n_tok)
        return add_up(outputs)

    def micro_batch_loss(self, micro_batch: tuple[Rollout, torch.Tensor], normaliser: torch.Tensor):
        """Clipped policy loss + ``vf_coef`` x clipped value loss of the rollouts ``sub``, weighted by their response tokens."""
        ro, sub = micro_batch
        cfg, r = self.ppo_cfg, self.rollout_cfg
        P = ro.prompt_width
        m = ro.response_mask[sub]
        weight = m.sum() / normaliser
        new_lp, _ = self.response_logprobs(self.net, ro.sequences[sub], ro.attention_mask[sub], ro.position_ids[sub],
                                           ro.responses[sub], P, r.temperature)
        new_v = self.values_of(self.value_model, ro.sequences[sub], ro.attention_mask[sub], ro.position_ids[sub], P)
        pg, pstats = ppo_policy_loss(new_lp, ro.logprobs[sub], ro.advantages[sub], m, cfg.clip_range)
        vf, vstats = ppo_value_loss(new_v, ro.values[sub], ro.returns[sub], m, cfg.clip_range_value)
        loss = pg + cfg.vf_coef * vf
        w = float(weight)
        stats = {key: w * float(value.detach()) for key, value in (
            ("loss/policy", pg), ("loss/value", vf), ("loss/total", loss), ("policy/approxkl", pstats["approxkl"]),
            ("policy/clipfrac", pstats["clipfrac"]), ("val/ratio", pstats["ratio_mean"]),
            ("val/clipfrac", vstats["vf_clipfrac"]), ("val/error", vstats["value_error"]))}
        return loss * weight, stats

    # -- checkpoint state ---------------------------------------------------------------------------------
    def on_save_checkpoint(self, checkpoint: dict) -> None:
        super().on_save_checkpoint(checkpoint)
        checkpoint["lmlab"]["ppo"] = {
            "kl_coef": float(self.kl_ctl.value),
            "score_moments": self.score_moments.state_dict(),
            "ref_score_stats": list(self.ref_score_stats) if self.ref_score_stats else None,
            "value_init": self.value_init,
            **self.random_streams_state(),
        }

    def on_load_checkpoint(self, checkpoint: dict) -> None:
        super().on_load_checkpoint(checkpoint)
        state = checkpoint.get("lmlab", {}).get("ppo")
        if state:
            self.kl_ctl.value = float(state["kl_coef"])
            self.score_moments.load_state_dict(state["score_moments"])
            self.ref_score_stats = tuple(state["ref_score_stats"]) if state.get("ref_score_stats") else None
            if "shuffle_state" in state:  # checkpoints from before these were saved resume with fresh streams
                self.restore_random_streams(state)
