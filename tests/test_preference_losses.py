"""Bradley-Terry and DPO losses against their direct formulas, gradients and metrics."""

from __future__ import annotations

import math

import pytest
import torch

from lmlab.errors import ConfigError
from lmlab.modules.preference_losses import bradley_terry_loss, dpo_loss


def _neg_log_sigmoid(x: torch.Tensor) -> torch.Tensor:
    return -torch.log(torch.sigmoid(x.double()))


def test_bradley_terry_matches_formula_and_metrics():
    rc = torch.tensor([2.0, -1.0, 0.5, 3.0])
    rr = torch.tensor([1.0, 0.0, 0.5, -2.0])
    loss, m = bradley_terry_loss(rc, rr)
    assert loss.item() == pytest.approx(_neg_log_sigmoid(rc - rr).mean().item(), rel=1e-6)
    assert m["accuracy"].item() == pytest.approx(0.5)  # ties do not count as correct
    assert m["margin_mean"].item() == pytest.approx((rc - rr).mean().item())
    assert m["reward_min"].item() == -2.0 and m["reward_max"].item() == 3.0
    assert m["reward_mean"].item() == pytest.approx(torch.cat([rc, rr]).mean().item())


def test_bradley_terry_margin_and_centering():
    rc = torch.tensor([2.0, 1.0])
    rr = torch.tensor([1.0, 0.0])
    margin = torch.tensor([0.5, 2.0])
    loss, _ = bradley_terry_loss(rc, rr, margin=margin)
    assert loss.item() == pytest.approx(_neg_log_sigmoid(rc - rr - margin).mean().item(), rel=1e-6)
    plain, _ = bradley_terry_loss(rc, rr)
    assert loss.item() > plain.item()  # demanding a margin can only cost
    centred, _ = bradley_terry_loss(rc, rr, center_coef=0.01)
    assert centred.item() == pytest.approx(plain.item() + 0.01 * ((rc + rr) ** 2).mean().item(), rel=1e-6)
    with pytest.raises(ConfigError):
        bradley_terry_loss(rc, rr, center_coef=-1.0)


def test_bradley_terry_gradients_push_rewards_apart_and_stay_finite():
    rc = torch.tensor([0.3, -50.0, 1000.0], requires_grad=True)
    rr = torch.tensor([0.1, 950.0, -0.5], requires_grad=True)
    loss, _ = bradley_terry_loss(rc, rr)
    loss.backward()
    assert torch.isfinite(loss)
    assert loss.item() == pytest.approx(1000.0 / 3, rel=1e-3)  # the -1000 pair dominates, no overflow
    assert (rc.grad <= 0).all() and rc.grad[1] < 0  # the far-off pair still has gradient
    assert rc.grad[0] < 0 and rr.grad[0] > 0
    assert torch.allclose(rc.grad, -rr.grad)


def test_dpo_matches_formula_and_trl_metric_names():
    beta = 0.1
    pc = torch.tensor([-10.0, -20.0, -5.0])
    pr = torch.tensor([-12.0, -18.0, -5.0])
    rc = torch.tensor([-11.0, -19.0, -6.0])
    rr = torch.tensor([-11.0, -19.0, -4.0])
    loss, m = dpo_loss(pc, pr, rc, rr, beta)
    h = (pc - rc) - (pr - rr)
    assert loss.item() == pytest.approx(_neg_log_sigmoid(beta * h).mean().item(), rel=1e-6)
    chosen_r, rejected_r = beta * (pc - rc), beta * (pr - rr)
    assert m["rewards/chosen"].item() == pytest.approx(chosen_r.mean().item())
    assert m["rewards/rejected"].item() == pytest.approx(rejected_r.mean().item())
    assert m["rewards/margins"].item() == pytest.approx((chosen_r - rejected_r).mean().item())
    assert m["rewards/accuracies"].item() == pytest.approx(2 / 3)
    # at initialisation (policy == reference) the loss is log 2
    same, m0 = dpo_loss(rc, rr, rc, rr, beta)
    assert same.item() == pytest.approx(math.log(2), rel=1e-6)
    assert m0["rewards/margins"].item() == 0.0


def test_dpo_label_smoothing_and_gradient_signs():
    beta, eps = 0.5, 0.1
    pc = torch.tensor([-3.0, -1.0], requires_grad=True)
    pr = torch.tensor([-2.0, -4.0], requires_grad=True)
    rc = torch.tensor([-3.0, -2.0], requires_grad=True)
    rr = torch.tensor([-3.0, -3.0])
    loss, _ = dpo_loss(pc, pr, rc, rr, beta, label_smoothing=eps)
    h = ((pc - rc) - (pr - rr)).detach()
    direct = ((1 - eps) * _neg_log_sigmoid(beta * h) + eps * _neg_log_sigmoid(-beta * h)).mean()
    assert loss.item() == pytest.approx(direct.item(), rel=1e-6)
    loss2, _ = dpo_loss(pc, pr, rc, rr, beta)
    loss2.backward()
    assert (pc.grad < 0).all()  # raise chosen log-probs
    assert (pr.grad > 0).all()  # lower rejected log-probs
    assert rc.grad is None  # the reference is a constant
    for bad in ({"beta": 0.0}, {"beta": 0.1, "label_smoothing": 0.5}):
        with pytest.raises(ConfigError):
            dpo_loss(pc, pr, rc, rr, **bad)
    with pytest.raises(ValueError):
        dpo_loss(pc, pr[:1], rc, rr, beta)
