"""GRPOModule: loss numerics against TRL's documented formulas, rollout wiring, exact resume, the chain, bad input."""

from __future__ import annotations

import itertools
import subprocess
import sys
from pathlib import Path

import lightning.pytorch as pl
import pytest
import torch

from lmlab.data.posttrain.datamodules import PromptDataModule, VerifiableData, load_posttrain_tokenizer, tokenizer_info
from lmlab.errors import ConfigError
from lmlab.models import TransformerConfig
from lmlab.models.checkpoint import open_checkpoint
from lmlab.modules.grpo import GRPOConfig, GRPODivergenceError, GRPOModule
from lmlab.modules.ppo import RolloutConfig
from lmlab.modules.rlhf_math import group_advantages, grpo_loss, grpo_token_loss
from lmlab.modules.sft import SFTModule
from helpers import StopAfter, digit_reward, make_trainer, nan_reward

pytestmark = pytest.mark.usefixtures("single_thread")
REPO = Path(__file__).resolve().parents[1]


# --------------------------------------------------------------------------- an independent reference


def trl_reference_loss(logp, old_logp, ref_logp, rewards, mask, G, beta, eps_low, eps_high, loss_type, scale_rewards, max_len):
    """TRL's GRPOTrainer loss, written from its documentation (float64, no lmlab code)."""
    grouped = rewards.view(-1, G)
    mean = grouped.mean(dim=1).repeat_interleave(G)
    std = grouped.std(dim=1).repeat_interleave(G)
    adv = rewards - mean
    if scale_rewards:
        adv = adv / (std + 1e-4)
    adv = adv.unsqueeze(1)
    coef_1 = torch.exp(logp - old_logp)
    coef_2 = torch.clamp(coef_1, 1 - eps_low, 1 + eps_high)
    per_token = -torch.min(coef_1 * adv, coef_2 * adv)
    if beta != 0.0:
        per_token = per_token + beta * (torch.exp(ref_logp - logp) - (ref_logp - logp) - 1)
    m = mask.to(per_token.dtype)
    if loss_type == "grpo":
        return ((per_token * m).sum(-1) / m.sum(-1).clamp(min=1.0)).mean()
    if loss_type == "bnpo":
        return (per_token * m).sum() / m.sum().clamp(min=1.0)
    assert loss_type == "dr_grpo"
    return (per_token * m).sum() / (per_token.size(0) * max_len)


def random_batch(seed: int, G: int = 4, prompts: int = 3, T: int = 7):
    gen = torch.Generator().manual_seed(seed)
    B = G * prompts
    logp = -torch.rand(B, T, generator=gen, dtype=torch.float64) * 3
    # old log-probs far enough away that many ratios fall outside [1 - eps, 1 + eps_high]
    old = logp + 0.4 * torch.randn(B, T, generator=gen, dtype=torch.float64)
    ref = logp + 0.3 * torch.randn(B, T, generator=gen, dtype=torch.float64)
    rewards = torch.randint(0, 3, (B,), generator=gen).to(torch.float64) * 0.5
    lengths = torch.randint(1, T + 1, (B,), generator=gen)
    mask = torch.arange(T)[None, :] < lengths[:, None]
    # padding holds garbage that must never leak into the loss or its gradient
    logp = torch.where(mask, logp, torch.full_like(logp, 2.0))
    return logp, old, ref, rewards, mask


@pytest.mark.parametrize("loss_type,scale_rewards,beta,eps_high", [
    *itertools.product(["grpo", "bnpo", "dr_grpo"], [True, False], [0.0, 0.04], [None]),
    ("bnpo", True, 0.1, 0.28), ("dr_grpo", False, 0.1, 0.28), ("grpo", True, 0.1, 0.28),
])
def test_loss_equals_trl_formulas_on_identical_tensors(loss_type, scale_rewards, beta, eps_high):
    G, eps, max_len = 4, 0.2, 9
    logp, old, ref, rewards, mask = random_batch(7)
    logp_a = logp.clone().requires_grad_(True)
    adv, _, _ = group_advantages(rewards, G, scale_rewards)
    per_token, stats = grpo_token_loss(logp_a, old, adv, ref, beta, eps, eps_high)
    ours = grpo_loss(per_token, mask, loss_type, max_len)

    logp_b = torch.where(mask, logp, torch.zeros_like(logp)).clone().requires_grad_(True)
    theirs = trl_reference_loss(logp_b, old, ref, rewards, mask, G, beta, eps, eps if eps_high is None else eps_high,
                                loss_type, scale_rewards, max_len)
    assert torch.isfinite(ours)
    assert abs(float(ours.detach()) - float(theirs.detach())) <= 1e-6, (float(ours.detach()), float(theirs.detach()))
    # the gradients the optimizer sees agree too (at valid tokens; padding gets none)
    ours.backward()
    theirs.backward()
    g_ours = torch.where(mask, logp_a.grad, torch.zeros_like(logp_a.grad))
    assert float((g_ours - logp_b.grad).abs().max()) <= 1e-6
    assert float(logp_a.grad[~mask].abs().max()) == 0.0
    # the clipping is really active on both sides of the trust region
    assert bool(stats["low_clipped"][mask].any()) and bool(stats["high_clipped"][mask].any())
    # even NaN at padding stays out of the loss value
    nan_pad = torch.where(mask, logp, torch.full_like(logp, float("nan")))
    again = grpo_loss(grpo_token_loss(nan_pad, old, adv, ref, beta, eps, eps_high)[0], mask, loss_type, max_len)
    assert float(again) == pytest.approx(float(ours), abs=1e-12)
    if beta:
        assert float(stats["kl"][mask].min()) >= 0.0


@pytest.mark.parametrize("loss_type", ["grpo", "bnpo", "dr_grpo"])
def test_micro_batch_shares_add_up_to_the_batch_loss(loss_type):
    logp, old, ref, rewards, mask = random_batch(3)
    adv, _, _ = group_advantages(rewards, 4)
    per_token, _ = grpo_token_loss(logp, old, adv, ref, 0.04, 0.2, None)
    whole = grpo_loss(per_token, mask, loss_type, 9)
    n_seq, n_tok = mask.shape[0], mask.sum()
    parts = sum(grpo_loss(per_token[i : i + 5], mask[i : i + 5], loss_type, 9, num_sequences=n_seq, num_tokens=n_tok)
                for i in range(0, n_seq, 5))
    assert abs(float(whole) - float(parts)) <= 1e-12


def test_group_advantages_with_and_without_std_scaling():
    rewards = torch.tensor([1.0, 0.0, 0.0, 0.0, 1.0, 1.0, 1.0, 1.0])
    adv, mean, std = group_advantages(rewards, 4)
    assert torch.allclose(mean, torch.tensor([0.25] * 4 + [1.0] * 4))
    assert torch.allclose(adv[:4], (rewards[:4] - 0.25) / (0.5 + 1e-4))
    assert torch.equal(adv[4:], torch.zeros(4))  # a group that all agree teaches nothing
    unscaled, _, _ = group_advantages(rewards, 4, scale_rewards=False)
    assert torch.allclose(unscaled[:4], torch.tensor([0.75, -0.25, -0.25, -0.25]))


# --------------------------------------------------------------------------- the module


@pytest.fixture(scope="module")
def tok():
    return load_posttrain_tokenizer("char")


def tiny_config(tok) -> TransformerConfig:
    return TransformerConfig(vocab_size=len(tok), d_model=32, n_layers=2, n_heads=2, max_seq_len=64, pad_vocab_to=8)


@pytest.fixture(scope="module")
def policy(tok, tmp_path_factory):
    """A random 'SFT' policy checkpoint with the char tokenizer."""
    path = tmp_path_factory.mktemp("grpo") / "policy.ckpt"
    torch.manual_seed(0)
    module = SFTModule(tiny_config(tok))
    trainer = pl.Trainer(accelerator="cpu", logger=False, enable_progress_bar=False, enable_model_summary=False)
    trainer.strategy.connect(module)
    module.tokenizer_info = tokenizer_info(tok)
    trainer.save_checkpoint(path)
    return str(path)


def prompt_dm(**kw) -> PromptDataModule:
    args = dict(verifiable=VerifiableData(n=16, val_n=8, max_digits=2), max_prompt_tokens=24, batch_size=4)
    args.update(kw)
    return PromptDataModule("char", **args)


def make_grpo(policy, **kw) -> GRPOModule:
    args = dict(init_from=policy, reward_fn=digit_reward, rollout=RolloutConfig(max_new_tokens=6),
                grpo=GRPOConfig(num_generations=4, num_iterations=2, mini_batch_size=8, beta=0.04), seed=0)
    args.update(kw)
    return GRPOModule(**args)


def test_module_loss_on_a_rollout_equals_the_reference(policy):
    module = make_grpo(policy, grpo=GRPOConfig(num_generations=4, num_iterations=2, beta=0.1, epsilon_high=0.28, loss_type="bnpo"))
    dm = prompt_dm()
    module.attach_data(dm)
    batch = next(iter(dm.train_dataloader()))
    ro = module.make_rollout(batch)
    n = ro.sequences.shape[0]
    assert n == 16 and ro.old_logprobs is not None and ro.ref_logprobs is not None
    # every group of 4 holds copies of one prompt
    P = ro.prompt_width
    prompts = ro.sequences[:, :P].view(4, 4, P)
    assert bool((prompts == prompts[:, :1]).all())
    # the rollout's rewards are the reward function on the decoded texts
    texts = [module.tokenizer.decode(r[m].tolist(), skip_special_tokens=False) for r, m in zip(ro.responses, ro.response_mask)]
    assert ro.extra["raw"].tolist() == pytest.approx([digit_reward("", t) for t in texts])
    # pretend the policy moved since the rollout, so the clip is active
    ro.old_logprobs = torch.where(ro.response_mask, ro.old_logprobs + 0.5 * torch.randn_like(ro.old_logprobs), 0.0)
    normaliser = (n, ro.response_mask.sum())
    loss, out = module.micro_batch_loss((ro, torch.arange(n)), normaliser)
    with torch.no_grad():
        logits = module.model(ro.sequences, position_ids=ro.position_ids, attention_mask=ro.attention_mask)
        logp = torch.log_softmax(logits[:, P - 1 : -1, : module.config.vocab_size].double(), -1)
        logp = logp.gather(-1, ro.responses.unsqueeze(-1)).squeeze(-1)
    ref = trl_reference_loss(logp, ro.old_logprobs.double(), ro.ref_logprobs.double(), ro.rewards.double(), ro.response_mask,
                             4, 0.1, 0.2, 0.28, "bnpo", True, 6)
    assert abs(float(loss) - float(ref)) <= 1e-5
    assert out["clip_ratio/region_mean"] > 0 and out["kl"] >= 0


def test_training_steps_log_trl_metrics_and_count_optimizer_steps(policy, tmp_path):
    module = make_grpo(policy)
    trainer = make_trainer(tmp_path, 8)
    trainer.fit(module, datamodule=prompt_dm())
    # 2 iterations x 2 minibatches of 8 completions = 4 optimizer steps per prompt batch
    assert trainer.global_step == 8 and len(module.history) == 2
    h = module.history[-1]
    for key in ("reward", "reward_std", "frac_reward_zero_std", "rewards/digit_reward/mean", "kl", "entropy",
                "clip_ratio/low_mean", "clip_ratio/low_min", "clip_ratio/high_mean", "clip_ratio/high_max",
                "clip_ratio/region_mean", "completions/mean_length", "completions/clipped_ratio", "loss"):
        assert key in h, key
    assert 0.0 <= h["frac_reward_zero_std"] <= 1.0 and h["kl"] >= 0.0
    assert h["clip_ratio/low_min"] <= h["clip_ratio/low_mean"] and 1.0 <= h["completions/mean_length"] <= 6.0
    metrics = trainer.callback_metrics
    assert "num_tokens" in metrics and "train/loss" in metrics and "reward" in metrics


def test_a_reward_model_checkpoint_scores_the_groups(policy, tok, tmp_path):
    from lmlab.modules.reward import RewardModule, score_sequences

    torch.manual_seed(2)
    rm = RewardModule(tiny_config(tok))
    trainer = pl.Trainer(accelerator="cpu", logger=False, enable_progress_bar=False, enable_model_summary=False)
    trainer.strategy.connect(rm)
    rm.tokenizer_info = tokenizer_info(tok)
    trainer.save_checkpoint(tmp_path / "rm.ckpt")
    module = make_grpo(policy, reward_fn=None, reward_model=str(tmp_path / "rm.ckpt"))
    assert module.reward_name == "reward_model" and not any(p.requires_grad for p in module.reward_model.parameters())
    dm = prompt_dm()
    module.attach_data(dm)
    ro = module.make_rollout(next(iter(dm.train_dataloader())))
    expected = score_sequences(module.reward_model, ro.sequences, ro.attention_mask, ro.position_ids).float()
    assert torch.allclose(ro.extra["raw"], expected)
    # group-relative: every group's advantages sum to zero
    assert float(ro.advantages.view(-1, 4).sum(1).abs().max()) < 1e-4
    make_trainer(tmp_path / "fit", 4).fit(module, datamodule=prompt_dm())
    assert len(module.history) == 1 and "rewards/reward_model/mean" in module.history[0]


@pytest.mark.parametrize("beta", [0.0, 0.04])
def test_validation_scores_held_out_prompts(policy, tmp_path, beta):
    module = make_grpo(policy, grpo=GRPOConfig(num_generations=2, beta=beta), val_temperature=1.0)
    out = make_trainer(tmp_path, 1, limit_val_batches=1).validate(module, datamodule=prompt_dm(val_batch_size=8))[0]
    assert 0.0 <= out["eval/score"] <= 1.0 and 1.0 <= out["eval/length"] <= 6.0
    # the KL to the reference is measured only where there is a reference
    assert ("eval/kl" in out) == (beta > 0)


def test_beta_zero_builds_no_reference_model(policy):
    module = make_grpo(policy, grpo=GRPOConfig(num_generations=2, beta=0.0))
    assert module.ref_model is None
    assert make_grpo(policy).ref_model is not None


def test_resume_reproduces_the_uninterrupted_run(policy, tmp_path):
    # 4 optimizer steps per iteration (2 passes x 2 minibatches); 4 prompt batches per data epoch, so the
    # cut after 6 iterations lies in the middle of the second epoch (the first is replayed from the seed)
    per_iteration, total, cut = 4, 8, 6
    pl.seed_everything(1)
    full = make_grpo(policy)
    make_trainer(tmp_path / "a", total * per_iteration).fit(full, datamodule=prompt_dm())

    pl.seed_everything(1)
    first = make_grpo(policy)
    # same max_steps (the LR schedule depends on it), stopped after `cut` iterations
    t1 = make_trainer(tmp_path / "b", total * per_iteration, [StopAfter(cut * per_iteration)])
    t1.fit(first, datamodule=prompt_dm())
    ckpt = tmp_path / "cut.ckpt"
    t1.save_checkpoint(ckpt)
    torch.load(ckpt, weights_only=True)  # no arbitrary unpickling

    pl.seed_everything(999)  # state must come from the checkpoint
    second = make_grpo(policy)
    make_trainer(tmp_path / "c", total * per_iteration).fit(second, datamodule=prompt_dm(), ckpt_path=str(ckpt))
    assert len(full.history) == total and len(second.history) == total - cut
    for ours, theirs in zip(second.history, full.history[cut:]):
        for key in ("loss", "reward", "kl", "entropy", "completions/mean_length"):
            assert abs(ours[key] - theirs[key]) <= 1e-6, (key, ours, theirs)
    for a, b in zip(second.model.parameters(), full.model.parameters()):
        assert torch.equal(a, b)


def test_checkpoint_flows_on_and_leaves_frozen_models_out(policy, tmp_path):
    module = make_grpo(policy)
    trainer = make_trainer(tmp_path, 4)
    trainer.fit(module, datamodule=prompt_dm())
    path = tmp_path / "grpo.ckpt"
    trainer.save_checkpoint(path)
    raw = torch.load(path, weights_only=True)
    assert raw["lmlab"]["stage"] == "grpo"
    assert not any(k.startswith("ref_model.") for k in raw["state_dict"])
    ckpt = open_checkpoint(path)
    lm = ckpt.causal_lm()
    assert torch.equal(lm.lm_head.weight, module.model.lm_head.weight)
    assert ckpt.tokenizer_info["vocab_size"] == len(load_posttrain_tokenizer("char"))
    # and a GRPO run can start from it
    again = make_grpo(str(path))
    assert torch.equal(again.model.lm_head.weight, module.model.lm_head.weight)


def test_bad_settings_are_one_line_config_errors(policy, tmp_path):
    with pytest.raises(ConfigError, match="num_generations"):
        make_grpo(policy, grpo=GRPOConfig(num_generations=1))
    with pytest.raises(ConfigError, match="loss_type"):
        make_grpo(policy, grpo=GRPOConfig(loss_type="dapo_typo"))
    with pytest.raises(ConfigError, match="reward_model"):
        make_grpo(policy, reward_fn=None)
    module = make_grpo(policy, grpo=GRPOConfig(num_generations=4, mini_batch_size=5))
    with pytest.raises(ConfigError, match="mini_batch_size"):
        module.attach_data(prompt_dm())
    empty = tmp_path / "empty.jsonl"
    empty.write_text("")
    with pytest.raises(ConfigError, match="empty"):
        make_grpo(policy).attach_data(PromptDataModule("char", source=str(empty), max_prompt_tokens=24, batch_size=4))


def test_non_finite_reward_stops_before_any_update(policy, tmp_path):
    module = make_grpo(policy, reward_fn=nan_reward)
    before = [p.detach().clone() for p in module.model.parameters()]
    with pytest.raises(GRPODivergenceError, match="non-finite rewards"):
        make_trainer(tmp_path, 4).fit(module, datamodule=prompt_dm())
    assert all(torch.equal(a, b) for a, b in zip(before, module.model.parameters()))


def _cli(*args: str, cwd: Path) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "lmlab.cli", *args], cwd=cwd, capture_output=True, text=True, timeout=600,
                          env={**__import__("os").environ, "PYTHONPATH": str(REPO)})


@pytest.mark.parametrize("args,field", [
    (["--model.init_args.grpo.num_generations=1"], "model.grpo.num_generations"),
    (["--model.init_args.grpo.loss_type=dapo_typo"], "loss_type"),
])
def test_cli_bad_group_size_and_loss_type_are_one_line_errors(args, field, policy, tmp_path):
    r = _cli("fit", "--config", str(REPO / "experiments" / "grpo.yaml"), f"--model.init_args.init_from={policy}",
             f"--trainer.default_root_dir={tmp_path}", "--trainer.max_steps=1", *args, cwd=tmp_path)
    assert r.returncode == 2, r.stderr[-2000:]
    lines = [line for line in r.stderr.splitlines() if line.strip()]
    assert "Traceback" not in r.stderr and field in lines[-1], r.stderr[-2000:]


def test_grpo_yaml_trains_from_an_sft_checkpoint_through_the_cli(policy, tmp_path):
    r = _cli("fit", "--config", str(REPO / "experiments" / "grpo.yaml"), f"--model.init_args.init_from={policy}",
             f"--trainer.default_root_dir={tmp_path / 'run'}", "--trainer.max_steps=2", "--trainer.logger.init_args.save_dir="
             + str(tmp_path / "run"), "--data.init_args.verifiable.n=32", "--data.init_args.batch_size=2",
             "--model.init_args.grpo.num_generations=2", "--model.init_args.grpo.mini_batch_size=4",
             "--trainer.log_every_n_steps=1", cwd=tmp_path)
    assert r.returncode == 0, r.stderr[-3000:]
    last = next((tmp_path / "run").rglob("last.ckpt"))
    ckpt = open_checkpoint(last)
    assert ckpt.meta["stage"] == "grpo" and ckpt.causal_lm().config.vocab_size == len(load_posttrain_tokenizer("char"))
    metrics = next((tmp_path / "run").rglob("metrics.csv")).read_text().splitlines()[0]
    assert "reward" in metrics.split(",") and "frac_reward_zero_std" in metrics.split(",")
