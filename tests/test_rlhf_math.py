"""Numerics of PPO-style RLHF: masked statistics, GAE, KL estimators, clipped losses, controllers."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from lmlab.errors import ConfigError
from lmlab.modules.rlhf_math import (
    AdaptiveKLController,
    FixedKLController,
    RunningMoments,
    entropy_from_logits,
    gae,
    kl_k1,
    kl_k2,
    kl_k3,
    kl_per_token,
    logprobs_from_logits,
    masked_mean,
    masked_sum,
    masked_var,
    masked_whiten,
    per_token_rewards,
    ppo_policy_loss,
    ppo_value_loss,
    whiten_rewards,
)


@pytest.fixture
def batch():
    g = torch.Generator().manual_seed(0)
    x = torch.randn(4, 7, generator=g, dtype=torch.float64) * 3 + 1
    lengths = torch.tensor([7, 3, 5, 1])
    mask = torch.arange(7)[None, :] < lengths[:, None]
    # garbage in the padding must not leak into any statistic
    x = torch.where(mask, x, torch.full_like(x, float("nan")))
    return x, mask


def test_masked_stats_match_statistics_of_selected_elements(batch):
    x, mask = batch
    sel = x[mask].numpy()
    assert masked_sum(x, mask).item() == pytest.approx(sel.sum())
    assert masked_mean(x, mask).item() == pytest.approx(sel.mean())
    assert masked_var(x, mask).item() == pytest.approx(sel.var(ddof=1))
    assert masked_var(x, mask, unbiased=False).item() == pytest.approx(sel.var(ddof=0))
    w = masked_whiten(x, mask)
    assert torch.isfinite(w).all()
    ref = (sel - sel.mean()) / math.sqrt(sel.var(ddof=1) + 1e-8)
    np.testing.assert_allclose(w[mask].numpy(), ref, rtol=1e-6)
    assert (w[~mask] == 0).all()


def test_masked_mean_per_row_and_empty_rows(batch):
    x, mask = batch
    mask = mask.clone()
    mask[3] = False  # an empty row
    rows = masked_mean(x, mask, dim=1)
    for i in range(3):
        assert rows[i].item() == pytest.approx(x[i][mask[i]].mean().item())
    assert rows[3].item() == 0.0
    with pytest.raises(ValueError):
        masked_mean(x, torch.zeros_like(mask))
    with pytest.raises(ValueError):
        masked_var(x, torch.zeros_like(mask).index_fill_(1, torch.tensor([0]), True) & (torch.arange(4)[:, None] == 0))


def test_whiten_without_mean_shift_keeps_mean(batch):
    x, mask = batch
    w = masked_whiten(x, mask, shift_mean=False)
    sel = x[mask]
    assert masked_mean(w, mask).item() == pytest.approx(sel.mean().item())
    assert masked_var(w - sel.mean(), mask).item() == pytest.approx(1.0, rel=1e-6)
    r = whiten_rewards(x, mask)
    assert torch.allclose(r, w, equal_nan=False)


def test_gae_matches_hand_computed_recursion():
    gamma, lam = 0.9, 0.8
    rewards = torch.tensor([[1.0, 0.0, 2.0, 5.0], [3.0, 7.0, 7.0, 7.0]])
    values = torch.tensor([[0.5, 1.0, -0.5, 9.0], [1.0, 4.0, 4.0, 4.0]])
    mask = torch.tensor([[1, 1, 1, 0], [1, 0, 0, 0]])
    adv, ret = gae(rewards, values, mask, gamma, lam)
    # row 0, backwards; V after the last valid token is 0
    d2 = 2.0 + gamma * 0.0 - (-0.5)  # 2.5
    a2 = d2
    d1 = 0.0 + gamma * (-0.5) - 1.0  # -1.45
    a1 = d1 + gamma * lam * a2  # 0.35
    d0 = 1.0 + gamma * 1.0 - 0.5  # 1.4
    a0 = d0 + gamma * lam * a1  # 1.652
    expected = torch.tensor([[a0, a1, a2, 0.0], [3.0 - 1.0, 0.0, 0.0, 0.0]])
    assert torch.allclose(adv, expected, atol=1e-6)
    assert adv[0, 0].item() == pytest.approx(1.652)
    assert torch.allclose(ret, torch.tensor([[a0 + 0.5, a1 + 1.0, a2 - 0.5, 0.0], [3.0, 0.0, 0.0, 0.0]]), atol=1e-6)


def test_gae_on_a_response_segment_inside_a_longer_sequence():
    # masks that mark a response after prompt tokens: nothing may leak into the unmasked positions
    rewards = torch.tensor([[9.0, 1.0, 2.0, 9.0]])
    values = torch.tensor([[9.0, 0.5, 1.0, 9.0]])
    mask = torch.tensor([[0, 1, 1, 0]])
    adv, ret = gae(rewards, values, mask, 0.5, 0.5)
    a2 = 2.0 - 1.0
    a1 = 1.0 + 0.5 * 1.0 - 0.5 + 0.25 * a2
    assert torch.allclose(adv, torch.tensor([[0.0, a1, a2, 0.0]]))
    assert ret[0, 0].item() == 0.0 and ret[0, 3].item() == 0.0


def test_gae_with_gamma_lam_one_is_monte_carlo_return_minus_value():
    g = torch.Generator().manual_seed(1)
    rewards = torch.randn(2, 5, generator=g)
    values = torch.randn(2, 5, generator=g)
    mask = torch.ones(2, 5, dtype=torch.bool)
    adv, ret = gae(rewards, values, mask, 1.0, 1.0)
    mc = rewards.flip(1).cumsum(1).flip(1)
    assert torch.allclose(ret, mc, atol=1e-5)
    assert torch.allclose(adv, mc - values, atol=1e-5)
    with pytest.raises(ConfigError):
        gae(rewards, values, mask, 1.5, 0.9)


def test_kl_estimators_match_formulas_and_k3_is_nonnegative():
    g = torch.Generator().manual_seed(2)
    logp = -torch.rand(1000, generator=g, dtype=torch.float64) * 8
    ref = -torch.rand(1000, generator=g, dtype=torch.float64) * 8
    r = torch.exp(ref - logp)
    assert torch.allclose(kl_k1(logp, ref), logp - ref)
    assert torch.allclose(kl_k2(logp, ref), 0.5 * (logp - ref) ** 2)
    assert torch.allclose(kl_k3(logp, ref), (r - 1) - torch.log(r))
    assert (kl_k3(logp, ref) >= 0).all()
    # near-identical policies: no rounding below zero in float32
    lp32 = logp.float()
    assert (kl_k3(lp32, lp32 + 1e-7) >= 0).all()
    assert (kl_per_token(logp, ref, "k2") == kl_k2(logp, ref)).all()
    with pytest.raises(ConfigError):
        kl_per_token(logp, ref, "k4")


def test_k1_and_k3_are_unbiased_kl_estimates_under_policy_samples():
    p = torch.tensor([0.5, 0.3, 0.15, 0.05], dtype=torch.float64)
    q = torch.tensor([0.25, 0.25, 0.25, 0.25], dtype=torch.float64)
    true_kl = (p * (p.log() - q.log())).sum().item()
    g = torch.Generator().manual_seed(3)
    idx = torch.multinomial(p, 200_000, replacement=True, generator=g)
    logp, logq = p.log()[idx], q.log()[idx]
    assert kl_k1(logp, logq).mean().item() == pytest.approx(true_kl, abs=5e-3)
    assert kl_k3(logp, logq).mean().item() == pytest.approx(true_kl, abs=5e-3)


def test_per_token_rewards_puts_score_on_last_valid_token():
    logp = torch.tensor([[-1.0, -2.0, -0.5], [-0.1, -0.2, -0.3]])
    ref = torch.tensor([[-1.5, -1.0, -0.5], [-0.1, -0.4, -9.0]])
    mask = torch.tensor([[1, 1, 1], [1, 1, 0]])
    score = torch.tensor([10.0, -3.0])
    rewards = per_token_rewards(score, logp, ref, mask, kl_coef=0.1)
    kl = logp - ref
    expected = -0.1 * kl
    expected[0, 2] += 10.0
    expected[1, 1] += -3.0
    expected[1, 2] = 0.0
    assert torch.allclose(rewards, expected)
    r3 = per_token_rewards(score, logp, ref, mask, kl_coef=0.1, kl_estimator="k3")
    assert (r3[0, :2] <= 0).all()  # k3 >= 0, so the penalty never pays
    with pytest.raises(ValueError):
        per_token_rewards(score, logp, ref, torch.tensor([[1, 1, 1], [0, 0, 0]]), 0.1)


def test_ppo_policy_loss_matches_clipped_objective():
    eps = 0.2
    old = torch.zeros(1, 4)
    # ratios 1.5, 0.5, 1.5, 1.0
    new = torch.log(torch.tensor([[1.5, 0.5, 1.5, 1.0]])).requires_grad_()
    adv = torch.tensor([[1.0, 1.0, -1.0, 2.0]])
    mask = torch.ones(1, 4, dtype=torch.bool)
    loss, stats = ppo_policy_loss(new, old, adv, mask, eps)
    ratio = new.detach().exp()
    direct = -torch.minimum(ratio * adv, ratio.clamp(1 - eps, 1 + eps) * adv).mean()
    assert loss.item() == pytest.approx(direct.item())
    # token-level: [-1.2, -0.5, 1.5, -2.0]
    assert loss.item() == pytest.approx((-1.2 - 0.5 + 1.5 - 2.0) / 4)
    # only the first token is clipped (r=1.5 > 1.2 with A>0); r=1.5 with A<0 stays unclipped (pessimistic)
    assert stats["clipfrac"].item() == pytest.approx(0.25)
    assert stats["approxkl"].item() == pytest.approx(0.5 * (new.detach() ** 2).mean().item())
    assert stats["ratio_mean"].item() == pytest.approx(ratio.mean().item())
    loss.backward()
    assert new.grad[0, 0].item() == 0.0  # clipped token carries no gradient
    assert new.grad[0, 3].item() < 0  # positive advantage: raise its log-prob


def test_ppo_policy_loss_ignores_padding():
    old = torch.zeros(1, 3)
    new = torch.tensor([[0.1, -0.1, 50.0]])
    adv = torch.tensor([[1.0, -1.0, float("nan")]])
    mask = torch.tensor([[1, 1, 0]])
    loss, stats = ppo_policy_loss(new, old, adv, mask, 0.2)
    r = torch.exp(torch.tensor([0.1, -0.1]))
    assert loss.item() == pytest.approx((-(r[0] * 1.0) + r[1]).item() / 2)
    assert math.isfinite(stats["ratio_mean"].item()) and stats["ratio_mean"].item() < 2
    with pytest.raises(ConfigError):
        ppo_policy_loss(new, old, adv, mask, 0.0)


def test_ppo_value_loss_matches_formula():
    eps = 0.2
    values = torch.tensor([[1.0, 0.0, 0.5, 3.0]], requires_grad=True)
    old = torch.tensor([[0.0, 0.0, 0.4, 0.0]])
    returns = torch.tensor([[0.0, 1.0, 1.0, 7.0]])
    mask = torch.tensor([[1, 1, 1, 0]])
    loss, stats = ppo_value_loss(values, old, returns, mask, eps)
    v = values.detach()[:, :3]
    vc = old[:, :3] + (v - old[:, :3]).clamp(-eps, eps)
    err, errc = (v - returns[:, :3]) ** 2, (vc - returns[:, :3]) ** 2
    assert loss.item() == pytest.approx(0.5 * torch.maximum(err, errc).mean().item())
    # token 0: clipped V = 0.2 gives error 0.04 < unclipped 1.0, so the max is the unclipped one;
    # tokens 1-2 move less than eps, so both errors are equal: no token counts as clipped
    assert stats["vf_clipfrac"].item() == pytest.approx(0.0)
    values2 = torch.tensor([[1.0]])
    loss2, stats2 = ppo_value_loss(values2, torch.tensor([[0.0]]), torch.tensor([[2.0]]), torch.ones(1, 1), eps)
    # clip(1.0, -0.2, 0.2) = 0.2 -> (0.2 - 2)^2 = 3.24 > (1 - 2)^2 = 1
    assert loss2.item() == pytest.approx(0.5 * 3.24)
    assert stats2["vf_clipfrac"].item() == 1.0


def test_entropy_from_logits_is_stable_and_correct():
    g = torch.Generator().manual_seed(4)
    logits = torch.randn(3, 5, 11, generator=g)
    ref = torch.distributions.Categorical(logits=logits).entropy()
    assert torch.allclose(entropy_from_logits(logits), ref, atol=1e-6)
    extreme = torch.tensor([[1e4, 0.0, -1e4], [0.0, 0.0, float("-inf")]])
    ent = entropy_from_logits(extreme)
    assert torch.isfinite(ent).all()
    assert ent[0].item() == pytest.approx(0.0, abs=1e-6)
    assert ent[1].item() == pytest.approx(math.log(2), rel=1e-6)
    assert entropy_from_logits(logits.bfloat16()).dtype == torch.float32


def test_logprobs_from_logits_divides_by_temperature_first():
    g = torch.Generator().manual_seed(5)
    logits = torch.randn(2, 6, 13, generator=g)
    labels = torch.randint(0, 13, (2, 6), generator=g)
    T = 0.7
    got = logprobs_from_logits(logits, labels, temperature=T)
    ref = F.log_softmax(logits / T, dim=-1).gather(-1, labels[..., None]).squeeze(-1)
    assert torch.allclose(got, ref, atol=1e-6)
    wrong = F.log_softmax(logits, dim=-1).gather(-1, labels[..., None]).squeeze(-1) / T
    assert not torch.allclose(got, wrong, atol=1e-3)
    labels[0, 0] = -100
    masked = logprobs_from_logits(logits, labels)
    assert masked[0, 0].item() == 0.0 and masked[0, 1].item() < 0
    with pytest.raises(ConfigError):
        logprobs_from_logits(logits, labels, temperature=0.0)


def test_kl_controllers():
    fixed = FixedKLController(0.05)
    assert fixed.update(100.0, 64) == 0.05
    ctl = AdaptiveKLController(0.2, target=6.0, horizon=10_000)
    up = ctl.update(current_kl=12.0, n_steps=256)  # error clipped to +0.2
    assert up == pytest.approx(0.2 * (1 + 0.2 * 256 / 10_000))
    ctl2 = AdaptiveKLController(0.2, target=6.0, horizon=10_000)
    down = ctl2.update(current_kl=5.4, n_steps=256)  # error -0.1
    assert down == pytest.approx(0.2 * (1 - 0.1 * 256 / 10_000))
    assert down < 0.2 < up
    for _ in range(50):
        ctl2.update(0.0, 256)
    assert ctl2.value < down
    with pytest.raises(ConfigError):
        AdaptiveKLController(0.2, target=0.0, horizon=10)


def test_running_moments_match_all_data_seen():
    g = torch.Generator().manual_seed(6)
    batches = [torch.randn(n, generator=g) * 4 + 2 for n in (5, 1, 17, 3)]
    rm = RunningMoments()
    for b in batches:
        mean, std = rm.update(b)
        assert mean == pytest.approx(b.double().mean().item())
    allx = torch.cat(batches).double().numpy()
    assert rm.count == len(allx)
    assert rm.mean == pytest.approx(allx.mean())
    assert rm.std == pytest.approx(allx.std(ddof=1))
    norm = rm.normalize(torch.tensor(allx))
    assert norm.mean().item() == pytest.approx(0.0, abs=1e-9)
    clone = RunningMoments()
    clone.load_state_dict(rm.state_dict())
    assert clone.std == rm.std
    with pytest.raises(ValueError):
        rm.update(torch.tensor([float("nan")]))
