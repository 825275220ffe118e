"""What the on-policy RL stages (PPO, GRPO) share: sampling rollouts, their log-probs and their rewards.

:class:`PolicyRollouts` is a mixin for a :class:`~lmlab.modules.posttrain_base.PostTrainModuleBase`
whose ``model`` is the policy (a ``CausalLM``). It opens the frozen reference
policy and reward model through the checkpoint API, samples responses with the
KV cache (:func:`lmlab.models.generate`), recomputes temperature-scaled
log-probs with full forward passes, scores responses with a reward model or a
Python callable, and evaluates the policy on held-out prompts. Each stage keeps
only its own update rule.
"""

from __future__ import annotations

import copy
import importlib
from typing import Any, Callable, Optional

import torch
from torch import nn

from lmlab.errors import ConfigError
from lmlab.models.checkpoint import open_checkpoint
from lmlab.models.config import TransformerConfig
from lmlab.models.generation import GenerationOutput, generate
from lmlab.modules.posttrain_base import check_tokenizer_match, read_checkpoint_meta
from lmlab.modules.reward import score_sequences
from lmlab.modules.rlhf_math import entropy_from_logits, logprobs_from_logits

__all__ = ["PolicyRollouts", "load_callable", "as_callable", "freeze", "sequence_masks"]


def load_callable(path: str, field_name: str) -> Callable[..., Any]:
    """Import ``package.module.name`` (or ``package.module:name``) and return it; ``ConfigError`` if impossible."""
    module_name, sep, attr = path.partition(":")
    if not sep:
        module_name, _, attr = path.rpartition(".")
    if not module_name or not attr:
        raise ConfigError(field_name, f"{path!r} is not a dotted path to a function", "use e.g. lmlab.data.posttrain.verifiable.reward")
    try:
        module = importlib.import_module(module_name)
    except ImportError as err:
        raise ConfigError(field_name, f"cannot import {module_name!r}: {err}", "check the dotted path") from None
    fn = getattr(module, attr, None)
    if not callable(fn):
        raise ConfigError(field_name, f"{module_name} has no callable {attr!r}", "check the dotted path")
    return fn


def as_callable(spec: Any, field_name: str) -> Optional[Callable[..., Any]]:
    """``spec`` itself when callable (or None), else the function its dotted path names."""
    if spec is None or callable(spec):
        return spec
    return load_callable(str(spec), field_name)


def freeze(model: nn.Module) -> nn.Module:
    """No gradients and eval mode: the reference and reward models are never updated."""
    model.requires_grad_(False)
    return model.eval()


def sequence_masks(gen: GenerationOutput) -> tuple[torch.Tensor, torch.Tensor]:
    """Attention mask and position ids of ``gen.sequences`` (left-padded prompt + response)."""
    mask = torch.cat([gen.prompt_mask.long(), gen.response_mask.long()], dim=1)
    return mask, (mask.cumsum(1) - 1).clamp(min=0)


class PolicyRollouts:
    """Mixin: reference policy, reward, sampling, log-probs and held-out evaluation of an RL stage.

    The host class sets ``rollout_cfg`` (a :class:`~lmlab.modules.ppo.RolloutConfig`),
    ``seed`` and ``val_temperature`` before calling :meth:`setup_rollouts`, and
    lists in ``rollout_networks`` the attributes holding its networks (all run in
    eval mode, so rollout and recomputed log-probs agree).
    """

    rollout_networks: tuple[str, ...] = ("model", "ref_model", "reward_model")
    eval_modules_expected = True

    def check_rollout_settings(self, reward_model: Optional[str], reward_fn: Any) -> None:
        """``ConfigError`` for a missing or doubled reward and for sampling settings no rollout can use
        (call before building the networks, so a mistake is reported before any checkpoint is read)."""
        if bool(reward_model) == bool(reward_fn):
            raise ConfigError("model.reward_model", "give exactly one of model.reward_model and model.reward_fn",
                              "name a reward-model checkpoint or a dotted path like lmlab.data.posttrain.verifiable.reward")
        r = self.rollout_cfg
        if r.temperature <= 0:
            raise ConfigError("model.rollout.temperature",
                              f"must be > 0 for {self.stage.upper()} sampling, got {r.temperature}", "use e.g. 1.0")
        if r.max_new_tokens < 1:
            raise ConfigError("model.rollout.max_new_tokens", f"must be >= 1, got {r.max_new_tokens}")
        if not 0 < r.top_p <= 1 or r.top_k < 0:
            raise ConfigError("model.rollout.top_p", f"need 0 < top_p <= 1 and top_k >= 0, got {r.top_p}, {r.top_k}")
        if self.val_temperature < 0:
            raise ConfigError("model.val_temperature", f"must be >= 0, got {self.val_temperature}")

    def setup_rollouts(self, reward_model: Optional[str], reward_fn: Any, reward_fn_kwargs: Optional[dict],
                       ref_model: Optional[str], need_reference: bool = True) -> Any:
        """Open the reference policy and the reward; returns the reward checkpoint (or None)."""
        # reference policy: frozen, never updated
        self.ref_model = None
        if ref_model:
            ref_ckpt = open_checkpoint(ref_model, "model.ref_model")
            ref = ref_ckpt.causal_lm()
            self._check_same_vocab(ref.config, "model.ref_model")
            check_tokenizer_match(self.init_meta.get("tokenizer"), ref_ckpt.tokenizer_info,
                                  "model.ref_model", f"reference {ref_model}")
            self.ref_model = freeze(ref)
        elif need_reference:
            self.ref_model = freeze(copy.deepcopy(self.model))

        # reward: a frozen reward model or a callable
        self.reward_model_path = reward_model
        self.reward_meta: dict[str, Any] = {}
        reward_ckpt = None
        if reward_model:
            reward_ckpt = open_checkpoint(reward_model, "model.reward_model")
            self.reward_model = freeze(reward_ckpt.scalar_model())
            self._check_same_vocab(self.reward_model.config, "model.reward_model")
            self.reward_meta = read_checkpoint_meta(reward_ckpt)
            check_tokenizer_match(self.init_meta.get("tokenizer"), self.reward_meta.get("tokenizer"),
                                  "model.reward_model", f"reward model {reward_model}")
        else:
            self.reward_model = None
        self.reward_fn = as_callable(reward_fn, "model.reward_fn")
        self.reward_fn_kwargs = dict(reward_fn_kwargs or {})
        self.safety_model = None
        self.safety_fn = None
        self.stop_ids: list[int] = []
        self._generator: Optional[torch.Generator] = None
        self._generator_state: Optional[torch.Tensor] = None
        self._val_rows: list[torch.Tensor] = []
        # minibatch order; its own stream so the rollout sampler's draws do not depend on it
        self._shuffle = torch.Generator().manual_seed(self.seed)
        return reward_ckpt

    def _eval_mode(self) -> None:
        # no dropout anywhere: rollout, old and new log-probs must be the same function
        for name in self.rollout_networks:
            m = getattr(self, name, None)
            if m is not None:
                m.eval()

    def _check_same_vocab(self, other: TransformerConfig, field_name: str) -> None:
        if other.vocab_size != self.config.vocab_size:
            raise ConfigError(field_name, f"vocab_size {other.vocab_size} differs from the policy's {self.config.vocab_size} "
                              "(a different tokenizer)", "train it with the policy's tokenizer")

    def attach_prompts(self, dm: Any) -> None:
        """Checks of a prompt DataModule shared by the RL stages (call after ``PostTrainModuleBase.attach_data``)."""
        check_tokenizer_match(self.tokenizer_info, self.reward_meta.get("tokenizer"), "model.reward_model",
                              f"reward model {self.reward_model_path}")
        self.stop_ids = list(dm.stop_ids)
        empty = ConfigError("data.source", "the prompt set is empty (no prompt was kept for training)",
                            "point data.source at prompts, or raise data.max_prompt_tokens if every prompt was skipped")
        try:
            longest = dm.longest_prompt
        except ValueError:  # max() over no prompts at all
            raise empty from None
        if getattr(dm, "train_examples", None) == []:
            raise empty
        if longest + self.rollout_cfg.max_new_tokens > self.config.max_seq_len:
            raise ConfigError("model.rollout.max_new_tokens",
                              f"the longest prompt ({longest} tokens) plus {self.rollout_cfg.max_new_tokens} new tokens "
                              f"exceeds model.config.max_seq_len={self.config.max_seq_len}",
                              "lower data.max_prompt_tokens or rollout.max_new_tokens")
        needs_text = self.reward_fn is not None or self.safety_fn is not None
        if needs_text and self.tokenizer is None:
            raise ConfigError("data.tokenizer", "a reward function needs the tokenizer to decode responses", "use a prompt DataModule")

    # -- sampling -----------------------------------------------------------------------------------
    def _sampler(self) -> torch.Generator:
        if self._generator is None or self._generator.device != self.device:
            rank = self.trainer.global_rank if self._trainer is not None else 0
            self._generator = torch.Generator(device=self.device).manual_seed(self.seed + 1_000_003 * rank)
            if self._generator_state is not None:  # resumed: continue the checkpointed stream
                self._generator.set_state(self._generator_state)
                self._generator_state = None
        return self._generator

    def sample(self, input_ids: torch.Tensor, attention_mask: torch.Tensor) -> GenerationOutput:
        """Responses of the policy to left-padded prompts, with the rollout settings and the stage's sampler."""
        r = self.rollout_cfg
        return generate(
            self.model, input_ids, attention_mask, max_new_tokens=r.max_new_tokens,
            temperature=r.temperature, top_k=r.top_k, top_p=r.top_p, stop_token_ids=self.stop_ids,
            pad_id=self.pad_id, generator=self._sampler(),
        )

    def response_logprobs(self, model: nn.Module, sequences, attention_mask, position_ids, responses, prompt_width: int,
                          temperature: float, with_entropy: bool = False):
        """Temperature-scaled log-probs of the response tokens (and per-token entropy) under ``model``."""
        logits = model(sequences, position_ids=position_ids, attention_mask=attention_mask)
        logits = logits[:, prompt_width - 1 : -1, : self.config.vocab_size]
        lp = logprobs_from_logits(logits, responses, temperature, ignore_index=None)
        if not with_entropy:
            return lp, None
        return lp, entropy_from_logits(logits.float() / temperature)

    # -- rewards ------------------------------------------------------------------------------------
    def _texts(self, ids: torch.Tensor, mask: torch.Tensor) -> list[str]:
        return [self.tokenizer.decode(row[m.bool()].tolist(), skip_special_tokens=False) for row, m in zip(ids, mask)]

    def _call_text_fn(self, fn, kwargs, prompts: list[str], responses: list[str]) -> torch.Tensor:
        vals = [float(fn(p, r, **kwargs)) for p, r in zip(prompts, responses)]
        return torch.tensor(vals, dtype=torch.float32, device=self.device)

    @torch.no_grad()
    def raw_scores(self, gen: GenerationOutput, attention_mask, position_ids) -> tuple[torch.Tensor, Optional[torch.Tensor]]:
        """Reward (and safety score) of each finished rollout, before normalisation and penalties."""
        texts = None
        if self.reward_fn is not None or self.safety_fn is not None:
            texts = (self._texts(gen.sequences[:, : gen.prompt_mask.shape[1]], gen.prompt_mask),
                     self._texts(gen.responses, gen.response_mask))
        if self.reward_model is not None:
            scores = score_sequences(self.reward_model, gen.sequences, attention_mask, position_ids).float()
        else:
            scores = self._call_text_fn(self.reward_fn, self.reward_fn_kwargs, *texts)
        safety = None
        if self.safety_model is not None:
            safety = score_sequences(self.safety_model, gen.sequences, attention_mask, position_ids).float()
        elif self.safety_fn is not None:
            safety = self._call_text_fn(self.safety_fn, self.safety_cfg.fn_kwargs, *texts)
        return scores, safety

    # -- validation: held-out prompts -----------------------------------------------------------------
    def on_validation_epoch_start(self) -> None:
        self._val_rows = []

    @torch.no_grad()
    def validation_step(self, batch: dict, batch_idx: int, dataloader_idx: int = 0) -> None:
        self._eval_mode()
        r = self.rollout_cfg
        temperature = self.val_temperature
        gen = generate(self.model, batch["input_ids"], batch["attention_mask"], max_new_tokens=r.max_new_tokens,
                       temperature=temperature, top_k=r.top_k if temperature > 0 else 0, top_p=r.top_p if temperature > 0 else 1.0,
                       stop_token_ids=self.stop_ids, pad_id=self.pad_id,
                       generator=torch.Generator(device=self.device).manual_seed(self.seed + batch_idx))
        mask, pos = sequence_masks(gen)
        raw, _ = self.raw_scores(gen, mask, pos)
        rows = [raw, gen.response_mask.sum(1).float(), gen.finished.float()]
        if temperature > 0 and self.ref_model is not None:
            P = batch["input_ids"].shape[1]
            lp, _ = self.response_logprobs(self.model, gen.sequences, mask, pos, gen.responses, P, temperature)
            ref, _ = self.response_logprobs(self.ref_model, gen.sequences, mask, pos, gen.responses, P, temperature)
            rows.append((lp - ref).masked_fill(~gen.response_mask.bool(), 0).sum(1))
        self._val_rows.append(torch.stack(rows, dim=1))

    def on_validation_epoch_end(self) -> None:
        if not self._val_rows:
            return
        rows = torch.cat(self._val_rows)
        if self.trainer.world_size > 1:
            rows = self.trainer.strategy.all_gather(rows).reshape(-1, rows.shape[1])
        means = rows.mean(0).tolist()
        out = {"eval/score": means[0], "eval/length": means[1], "eval/eos_rate": means[2]}
        if len(means) > 3:
            out["eval/kl"] = means[3]
        self.record_validation(out)

    # -- resume -----------------------------------------------------------------------------------------
    def sampler_state(self) -> Optional[torch.Tensor]:
        """The rollout sampler's state (None before the first rollout), for the checkpoint."""
        if self._generator is not None:
            return self._generator.get_state()
        return self._generator_state

    def restore_sampler(self, state: Optional[torch.Tensor]) -> None:
        """Continue the checkpointed sampler stream from the next rollout on."""
        self._generator = None
        self._generator_state = state

    def random_streams_state(self) -> dict[str, Optional[torch.Tensor]]:
        """The rollout sampler's and the minibatch shuffle's states, for the checkpoint."""
        sampler = self.sampler_state()
        return {"sampler_state": sampler.cpu() if sampler is not None else None,
                "shuffle_state": self._shuffle.get_state()}

    def restore_random_streams(self, state: dict) -> None:
        """Continue both streams where :meth:`random_streams_state` left them."""
        self.restore_sampler(state.get("sampler_state"))
        self._shuffle.set_state(state["shuffle_state"])
