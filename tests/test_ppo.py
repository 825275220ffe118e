"""PPOModule: one iteration's numbers, rollout log-prob agreement, model wiring, safety stops, bad input."""

from __future__ import annotations

import logging

import lightning.pytorch as pl
from lightning.pytorch.callbacks import RichProgressBar, TQDMProgressBar
import pytest
import torch

from lmlab.data.posttrain.datamodules import PromptDataModule, VerifiableData, load_posttrain_tokenizer, tokenizer_info
from lmlab.errors import ConfigError
from lmlab.models import TransformerConfig
from lmlab.models.checkpoint import open_checkpoint
from lmlab.modules.ppo import KLConfig, PPOConfig, PPODivergenceError, PPOModule, RolloutConfig, SafetyConfig
from lmlab.modules.reward import RewardModule
from lmlab.modules.sft import SFTModule
from helpers import StopAfter, digit_reward, make_trainer, nan_reward


pytestmark = pytest.mark.usefixtures("single_thread")


@pytest.fixture(scope="module")
def tok():
    return load_posttrain_tokenizer("char")


def tiny_config(tok, vocab=None) -> TransformerConfig:
    return TransformerConfig(vocab_size=vocab or len(tok), d_model=32, n_layers=2, n_heads=2, max_seq_len=64, pad_vocab_to=8)


def save(module, path, info) -> str:
    trainer = pl.Trainer(accelerator="cpu", logger=False, enable_progress_bar=False, enable_model_summary=False)
    trainer.strategy.connect(module)
    module.tokenizer_info = info
    trainer.save_checkpoint(path)
    return str(path)


@pytest.fixture(scope="module")
def ckpts(tok, tmp_path_factory):
    """A random 'SFT' policy, a different random policy, and a random reward model, all with the char tokenizer."""
    root = tmp_path_factory.mktemp("ppo")
    info = tokenizer_info(tok)
    torch.manual_seed(0)
    policy = save(SFTModule(tiny_config(tok)), root / "policy.ckpt", info)
    torch.manual_seed(1)
    other_module = SFTModule(tiny_config(tok))
    with torch.no_grad():  # a peaked distribution, far from the near-uniform random policy
        other_module.model.lm_head.weight.mul_(100.0)
    other = save(other_module, root / "other.ckpt", info)
    torch.manual_seed(2)
    rm = save(RewardModule(tiny_config(tok)), root / "rm.ckpt", info)
    torch.manual_seed(3)
    rm_big_vocab = save(RewardModule(tiny_config(tok, vocab=len(tok) + 40)), root / "rm_vocab.ckpt", info)
    torch.manual_seed(4)
    rm_other_tok = save(RewardModule(tiny_config(tok)), root / "rm_tok.ckpt", {"vocab_size": len(tok), "fingerprint": "ffffffffffffffff"})
    return {"policy": policy, "other": other, "rm": rm, "rm_vocab": rm_big_vocab, "rm_tok": rm_other_tok, "root": root}


def prompt_dm(**kw) -> PromptDataModule:
    args = dict(verifiable=VerifiableData(n=16, val_n=8, max_digits=2), max_prompt_tokens=24, batch_size=8)
    args.update(kw)
    return PromptDataModule("char", **args)


def make_ppo(ckpts, **kw) -> PPOModule:
    args = dict(init_from=ckpts["policy"], reward_fn=digit_reward, rollout=RolloutConfig(max_new_tokens=6),
                ppo=PPOConfig(ppo_epochs=2, mini_batch_size=4), seed=0)
    args.update(kw)
    return PPOModule(**args)


def params(module) -> list[torch.Tensor]:
    return [p.detach().clone() for p in module.model.parameters()] + [p.detach().clone() for p in module.value_model.parameters()]


def test_one_iteration_runs_and_its_stats_are_consistent(ckpts, tmp_path):
    pl.seed_everything(0)
    module = make_ppo(ckpts)
    trainer = make_trainer(tmp_path, 4)  # one iteration = 2 epochs x 2 minibatches
    trainer.fit(module, datamodule=prompt_dm())
    assert trainer.global_step == 4 and len(module.history) == 1
    stats = module.history[0]
    for key in ("objective/kl", "objective/entropy", "objective/scores", "objective/rlhf_reward", "policy/approxkl",
                "policy/clipfrac", "val/ratio", "loss/policy", "loss/value", "val/clipfrac", "response/length", "response/eos_rate"):
        assert key in stats and torch.isfinite(torch.tensor(stats[key])), key
        assert key in trainer.callback_metrics, key
    # the policy starts as the reference: zero KL, and the first minibatch sees ratio == 1
    assert abs(stats["objective/kl"]) < 1e-6
    first = module.minibatch_stats[0]
    assert first["policy/clipfrac"] == 0.0
    assert first["policy/approxkl"] < 1e-10
    assert abs(first["val/ratio"] - 1.0) < 1e-5
    later = module.minibatch_stats[-1]
    assert later["policy/approxkl"] > first["policy/approxkl"]  # the policy moved
    assert stats["rollout/logprob_gap"] < 1e-5
    assert 1.0 <= stats["response/length"] <= 6.0
    assert stats["objective/rlhf_reward"] == pytest.approx(stats["objective/scores"] + stats["objective/non_score_reward"], abs=1e-6)


@pytest.mark.parametrize("bar_class", [TQDMProgressBar, RichProgressBar])
def test_progress_bar_counts_optimizer_steps_to_max_steps(ckpts, tmp_path, bar_class):
    # 2 iterations of 2 epochs x 2 minibatches: the bar must end at 8/8, not at 2 batches of 8
    pl.seed_everything(0)
    module = make_ppo(ckpts)
    seen = []

    class Positions(pl.Callback):
        def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
            bar = trainer.progress_bar_callback
            if isinstance(bar, TQDMProgressBar):
                seen.append((bar.train_progress_bar.n, bar.train_progress_bar.total))
            else:
                task = bar.progress.tasks[bar.train_progress_bar_id]
                seen.append((task.completed, task.total))

    trainer = make_trainer(tmp_path, 8, [bar_class(), Positions()], enable_progress_bar=True)
    trainer.fit(module, datamodule=prompt_dm(verifiable=VerifiableData(n=64, val_n=8, max_digits=2)))
    assert trainer.global_step == 8
    assert seen == [(4, 8), (8, 8)]



@pytest.mark.parametrize("temperature,top_k,top_p", [(1.0, 0, 1.0), (0.7, 5, 0.9)])
def test_rollout_logprobs_equal_recomputed_forward(ckpts, temperature, top_k, top_p):
    module = make_ppo(ckpts, rollout=RolloutConfig(max_new_tokens=8, temperature=temperature, top_k=top_k, top_p=top_p))
    dm = prompt_dm()
    dm.setup()
    module.attach_data(dm)
    batch = next(iter(dm.train_dataloader()))
    assert bool((batch["attention_mask"] == 0).any())  # prompts of different lengths: left padding in play
    ro = module.make_rollout(batch)
    m = ro.response_mask
    assert int(m.sum()) > 0
    gap = (ro.gen_logprobs - ro.logprobs).abs()[m].max()
    assert float(gap) < 1e-5
    # values come from the zero-initialised head
    assert float(ro.values.abs().max()) == 0.0


def test_value_model_starts_from_reward_or_policy_with_a_zero_head(ckpts):
    from_rm = make_ppo(ckpts, reward_fn=None, reward_model=ckpts["rm"])
    assert from_rm.value_init == "reward"
    rm_state = open_checkpoint(ckpts["rm"]).weights
    for name, value in from_rm.value_model.backbone.state_dict().items():
        assert torch.equal(value, rm_state[f"backbone.{name}"]), name
    assert float(from_rm.value_model.score.weight.abs().sum()) == 0.0
    assert float(rm_state["score.weight"].abs().sum()) > 0
    from_policy = make_ppo(ckpts)
    assert from_policy.value_init == "policy"
    for name, value in from_policy.value_model.backbone.state_dict().items():
        assert torch.equal(value, from_policy.model.backbone.state_dict()[name]), name
    assert not any(p.requires_grad for p in from_rm.ref_model.parameters())
    assert not any(p.requires_grad for p in from_rm.reward_model.parameters())


def test_reward_model_with_another_tokenizer_is_refused(ckpts):
    with pytest.raises(ConfigError, match="model.reward_model"):
        make_ppo(ckpts, reward_fn=None, reward_model=ckpts["rm_vocab"])
    with pytest.raises(ConfigError, match="different tokenizer"):
        make_ppo(ckpts, reward_fn=None, reward_model=ckpts["rm_tok"])
    with pytest.raises(ConfigError, match="score head"):
        make_ppo(ckpts, reward_fn=None, reward_model=ckpts["other"])  # a policy, not a reward model


def test_bad_settings_are_config_errors(ckpts):
    with pytest.raises(ConfigError, match="exactly one"):
        make_ppo(ckpts, reward_model=ckpts["rm"])
    with pytest.raises(ConfigError, match="exactly one"):
        make_ppo(ckpts, reward_fn=None)
    with pytest.raises(ConfigError, match="model.reward_fn"):
        make_ppo(ckpts, reward_fn="lmlab.data.posttrain.verifiable.no_such_function")
    with pytest.raises(ConfigError, match="temperature"):
        make_ppo(ckpts, rollout=RolloutConfig(temperature=0.0))
    with pytest.raises(ConfigError, match="value_init"):
        make_ppo(ckpts, value_init="reward")
    module = make_ppo(ckpts, rollout=RolloutConfig(max_new_tokens=60))
    with pytest.raises(ConfigError, match="max_new_tokens"):
        module.attach_data(prompt_dm())  # prompt + response would not fit max_seq_len=64


def test_long_prompts_are_skipped_with_a_warning(caplog):
    dm = prompt_dm(max_prompt_tokens=12)  # "ab+cd=" (13 tokens with the chat markup) is too long
    with caplog.at_level(logging.WARNING):
        dm.setup()
    assert 0 < len(dm.train_examples) < 16
    assert "prompt_too_long" in caplog.text
    with pytest.raises(ConfigError):
        prompt_dm(max_prompt_tokens=5).setup()


def test_kl_budget_stops_or_raises_the_coefficient_and_explosions_abort(ckpts, tmp_path):
    # a reference unlike the policy: the KL is large from the first rollout
    module = make_ppo(ckpts, ref_model=ckpts["other"], kl=KLConfig(coef=0.1, budget=1e-3, budget_action="stop"))
    before = params(module)
    trainer = make_trainer(tmp_path, 8)
    trainer.fit(module, datamodule=prompt_dm())
    assert module.stopped_reason and "KL budget" in module.stopped_reason
    assert trainer.global_step == 0
    assert all(torch.equal(a, b) for a, b in zip(before, params(module)))

    module = make_ppo(ckpts, ref_model=ckpts["other"], kl=KLConfig(coef=0.1, budget=1e-3, budget_action="raise_coef", budget_factor=2.0))
    make_trainer(tmp_path, 4).fit(module, datamodule=prompt_dm())
    assert module.history[0]["objective/kl_coef"] == pytest.approx(0.2)

    module = make_ppo(ckpts, ref_model=ckpts["other"], kl=KLConfig(coef=0.1, abort_at=1e-3))
    before = params(module)
    with pytest.raises(PPODivergenceError, match="exploded"):
        make_trainer(tmp_path, 4).fit(module, datamodule=prompt_dm())
    assert all(torch.equal(a, b) for a, b in zip(before, params(module)))


def test_non_finite_reward_stops_before_any_update(ckpts, tmp_path):
    module = make_ppo(ckpts, reward_fn=nan_reward)
    before = params(module)
    with pytest.raises(PPODivergenceError, match="non-finite"):
        make_trainer(tmp_path, 4).fit(module, datamodule=prompt_dm())
    assert all(torch.equal(a, b) for a, b in zip(before, params(module)))


def test_score_shaping_normalises_penalises_clips_and_constrains(ckpts):
    module = make_ppo(ckpts, score_norm="reference", score_clip=1.5,
                      rollout=RolloutConfig(max_new_tokens=6, missing_eos_penalty=1.0),
                      safety=SafetyConfig(fn=digit_reward, threshold=0.5, coef=2.0))
    raw = torch.tensor([0.0, 1.0, 2.0, 3.0])
    finished = torch.tensor([True, True, False, True])
    safety = torch.tensor([1.0, 0.0, 1.0, 0.25])
    out = module.shape_scores(raw, finished, safety)
    mean, std = float(raw.mean()), float(raw.std())
    z = (raw - mean) / std
    expected = (z - torch.tensor([0.0, 0.0, 1.0, 0.0])).clamp(-1.5, 1.5) - 2.0 * (0.5 - safety).clamp(min=0)
    assert torch.allclose(out, expected, atol=1e-6)
    # the reference statistics are frozen after the first batch
    again = module.shape_scores(raw + 10, finished, safety)
    assert module.ref_score_stats == pytest.approx((mean, std))
    assert float(again.max()) <= 1.5


def test_checkpoint_keeps_policy_and_value_but_not_frozen_models(ckpts, tmp_path):
    module = make_ppo(ckpts, reward_fn=None, reward_model=ckpts["rm"])
    trainer = make_trainer(tmp_path, 4)
    trainer.fit(module, datamodule=prompt_dm())
    path = tmp_path / "ppo.ckpt"
    trainer.save_checkpoint(path)
    ckpt = torch.load(path, weights_only=True)
    keys = ckpt["state_dict"].keys()
    assert any(k.startswith("model.") for k in keys) and any(k.startswith("value_model.") for k in keys)
    assert not any(k.startswith(("ref_model.", "reward_model.")) for k in keys)
    assert ckpt["lmlab"]["stage"] == "ppo" and ckpt["lmlab"]["tokenizer"]["vocab_size"] == module.config.vocab_size
    # the policy flows on like any other stage's model
    state = open_checkpoint(path).weights
    assert torch.equal(state["lm_head.weight"], module.model.lm_head.weight)
    # resuming fills the frozen models back in from the fresh module
    fresh = make_ppo(ckpts, reward_fn=None, reward_model=ckpts["rm"])
    fresh.on_load_checkpoint(ckpt)
    fresh.load_state_dict(ckpt["state_dict"], strict=True)
    assert torch.equal(fresh.model.lm_head.weight, module.model.lm_head.weight)


def test_resume_reproduces_the_uninterrupted_run(ckpts, tmp_path):
    per_iteration = 2  # 2 epochs x 1 minibatch of 4 rollouts; 4 prompt batches per data epoch, cut in the middle of one
    pl.seed_everything(1)
    full = make_ppo(ckpts)
    make_trainer(tmp_path / "a", 4 * per_iteration).fit(full, datamodule=prompt_dm(batch_size=4))

    pl.seed_everything(1)
    first = make_ppo(ckpts)
    t1 = make_trainer(tmp_path / "b", 4 * per_iteration, [StopAfter(2 * per_iteration)])
    t1.fit(first, datamodule=prompt_dm(batch_size=4))
    ckpt = tmp_path / "cut.ckpt"
    t1.save_checkpoint(ckpt)
    torch.load(ckpt, weights_only=True)

    pl.seed_everything(999)  # the sampler, the shuffling and the prompt order come from the checkpoint
    second = make_ppo(ckpts)
    make_trainer(tmp_path / "c", 4 * per_iteration).fit(second, datamodule=prompt_dm(batch_size=4), ckpt_path=str(ckpt))
    assert len(full.history) == 4 and len(second.history) == 2
    for ours, theirs in zip(second.history, full.history[2:]):
        for key in ("loss/total", "objective/kl", "objective/scores", "objective/entropy", "response/length"):
            assert abs(ours[key] - theirs[key]) <= 1e-6, (key, ours[key], theirs[key])
    for a, b in zip(params(second), params(full)):
        assert torch.equal(a, b)
