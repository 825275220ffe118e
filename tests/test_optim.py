"""LR schedules against their formulas, weight-decay groups, clipping, batch ramp."""

from __future__ import annotations

import math

import pytest
import torch
from torch import nn

from lmlab.data.pretrain.batching import BatchSchedule
from lmlab.distributed.hooks import clip_grad_norm
from lmlab.errors import ConfigError
from lmlab.models import CausalLM, TransformerConfig
from lmlab.modules.optim import (
    LRLambda,
    OptimizerConfig,
    ScheduleConfig,
    build_optimizer,
    inverse_sqrt,
    make_lr_lambda,
    param_groups,
    warmup_cosine,
    warmup_stable_decay,
)


@pytest.mark.parametrize("warmup", [1, 10, 400])
def test_inverse_sqrt_formula(warmup):
    for t in [1, 2, 5, warmup, warmup + 1, 3 * warmup, 10_000]:
        assert inverse_sqrt(t, warmup) == pytest.approx(min(t / warmup, math.sqrt(warmup / t)))
    assert inverse_sqrt(warmup, warmup) == pytest.approx(1.0)


def test_cosine_formula():
    W, T, m = 10, 110, 0.1
    for t in range(1, 130):
        if t <= W:
            expect = t / W
        elif t >= T:
            expect = m
        else:
            expect = m + (1 - m) * 0.5 * (1 + math.cos(math.pi * (t - W) / (T - W)))
        assert warmup_cosine(t, W, T, m) == pytest.approx(expect)
    assert warmup_cosine(60, W, T, m) == pytest.approx(m + (1 - m) * 0.5)


@pytest.mark.parametrize("shape", ["linear", "cosine", "sqrt"])
def test_wsd_phases(shape):
    W, T, m, frac = 10, 100, 0.0, 0.2
    vals = [warmup_stable_decay(t, W, T, m, frac, shape) for t in range(1, T + 1)]
    assert vals[W - 1] == pytest.approx(1.0)
    assert all(v == 1.0 for v in vals[W:80])  # stable until the last 20%
    decay = vals[80:]
    assert all(a >= b for a, b in zip(decay, decay[1:]))
    assert vals[-1] == pytest.approx(m)
    if shape == "linear":
        assert warmup_stable_decay(90, W, T, m, frac, shape) == pytest.approx(0.5)


def test_lambda_lr_follows_schedule_and_state_is_plain():
    p = nn.Parameter(torch.zeros(2))
    opt = torch.optim.SGD([p], lr=2.0)
    lam = make_lr_lambda(ScheduleConfig(name="cosine", warmup_steps=5, min_lr_ratio=0.1), max_steps=50)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lam)
    seen = []
    for _ in range(50):
        seen.append(opt.param_groups[0]["lr"])
        opt.step()
        sched.step()
    assert seen[0] == pytest.approx(2.0 * 1 / 5)
    assert seen[4] == pytest.approx(2.0)
    assert seen[-1] == pytest.approx(2.0 * warmup_cosine(50, 5, 50, 0.1))
    state = sched.state_dict()
    assert all(isinstance(v, (int, float, str)) for v in state["lr_lambdas"][0].values())


def test_schedule_needs_a_length():
    with pytest.raises(ConfigError, match="total_steps"):
        make_lr_lambda(ScheduleConfig(name="cosine"), max_steps=None)
    assert isinstance(make_lr_lambda(ScheduleConfig(name="inverse_sqrt"), None), LRLambda)


def test_weight_decay_only_on_matrices():
    model = CausalLM(TransformerConfig(vocab_size=50, d_model=32, n_layers=2, n_heads=4, bias=True, norm_type="layernorm"))
    decay, no_decay = param_groups(model, OptimizerConfig(weight_decay=0.1))
    decay_ids = {id(p) for p in decay["params"]}
    assert decay["weight_decay"] == 0.1 and no_decay["weight_decay"] == 0.0
    assert id(model.backbone.tok_emb.weight) not in decay_ids
    assert id(model.backbone.blocks[0].attn.qkv.weight) in decay_ids
    assert id(model.backbone.blocks[0].attn.qkv.bias) not in decay_ids
    assert id(model.backbone.norm.weight) not in decay_ids
    n_params = len({id(p) for p in model.parameters()})
    assert len(decay["params"]) + len(no_decay["params"]) == n_params
    groups = param_groups(model, OptimizerConfig(decay_embeddings=True))
    assert id(model.backbone.tok_emb.weight) in {id(p) for p in groups[0]["params"]}
    opt = build_optimizer(model, OptimizerConfig())
    assert isinstance(opt, torch.optim.AdamW)


def test_clipping_scales_by_min_one_clip_over_norm():
    a = nn.Parameter(torch.zeros(3))
    b = nn.Parameter(torch.zeros(4))
    a.grad = torch.tensor([3.0, 0.0, 0.0])
    b.grad = torch.tensor([0.0, 4.0, 0.0, 0.0])
    norm = clip_grad_norm(nn.Module(), 1.0, [a, b])  # the stages' clipping, outside any strategy
    assert float(norm) == pytest.approx(5.0)
    assert torch.allclose(a.grad, torch.tensor([0.6, 0.0, 0.0]))
    assert torch.allclose(b.grad, torch.tensor([0.0, 0.8, 0.0, 0.0]))
    a.grad = torch.tensor([0.3, 0.0, 0.0])
    b.grad = torch.tensor([0.0, 0.4, 0.0, 0.0])
    clip_grad_norm(nn.Module(), 1.0, [a, b])  # norm 0.5 < 1: unchanged
    assert torch.allclose(a.grad, torch.tensor([0.3, 0.0, 0.0]))


def test_batch_ramp_doubles_until_cap_and_counts_samples():
    s = BatchSchedule(base=8, ramp_interval=10, cap=32)
    assert [s.at(t) for t in (0, 9, 10, 19, 20, 35, 1000)] == [8, 8, 16, 16, 32, 32, 32]
    for step in (0, 1, 10, 15, 20, 33, 200):
        assert s.samples_before(step) == sum(s.at(t) for t in range(step))
    assert BatchSchedule(8).samples_before(7) == 56
    with pytest.raises(ConfigError, match="divisible"):
        BatchSchedule(base=12).check_divisible(micro_batch_size=8, world_size=1)
    with pytest.raises(ConfigError, match="cap"):
        BatchSchedule(base=16, ramp_interval=5, cap=8)
