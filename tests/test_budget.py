"""Compute-budget sizing: the Chinchilla rule and its application to a parsed config."""

from __future__ import annotations

import pytest
from jsonargparse import Namespace

from lmlab.errors import ConfigError
from lmlab.models import TransformerConfig, count_params
from lmlab.scaling.budget import apply_budget
from lmlab.scaling.plan import chinchilla_rule, shape_for_params


def parsed(**budget):
    return Namespace(
        budget=Namespace(**{"compute": None, "tokens_per_param": 20.0, "params": None, "tokens": None, "head_dim": 64,
                            **budget}),
        model=Namespace(class_path="lmlab.modules.PretrainModule", init_args=Namespace(
            config=Namespace(n_layers=2, d_model=64, n_heads=2, n_kv_heads=None, preset=None))),
        data=Namespace(class_path="lmlab.data.PretrainDataModule", init_args=Namespace(seq_len=512, batch_size=32)),
        trainer=Namespace(max_steps=5),
    )


def test_chinchilla_rule_satisfies_both_constraints():
    for c in (1e15, 5.76e23):
        n, d = chinchilla_rule(c)
        assert d == pytest.approx(20 * n)
        assert 6 * n * d == pytest.approx(c)
    with pytest.raises(ConfigError, match="budget.compute"):
        apply_budget(parsed(compute=-1))


def test_compute_budget_sets_shape_and_steps(capsys):
    cfg = parsed(compute=1e17)
    apply_budget(cfg)
    n, d = chinchilla_rule(1e17)
    mc = cfg.model.init_args.config
    built = TransformerConfig(vocab_size=32000, n_layers=mc.n_layers, d_model=mc.d_model, n_heads=mc.n_heads)
    assert abs(count_params(built).non_embedding - n) / n < 0.15
    assert cfg.trainer.max_steps == round(d / (512 * 32))
    out = capsys.readouterr().out
    assert "lmlab budget" in out and f"{n:,.0f}" in out


def test_params_and_tokens_can_be_named_directly():
    cfg = parsed(params=1e6, tokens=512 * 32 * 40)
    apply_budget(cfg)
    assert cfg.trainer.max_steps == 40
    assert cfg.model.init_args.config.d_model == shape_for_params(1e6).d_model
    cfg = parsed(compute=6 * 1e6 * 1e8, params=1e6)  # D follows as C / 6N
    apply_budget(cfg)
    assert cfg.trainer.max_steps == round(1e8 / (512 * 32))
    with pytest.raises(ConfigError, match="at most two"):
        apply_budget(parsed(compute=1e15, params=1e6, tokens=1e7))


def test_no_budget_leaves_config_untouched():
    cfg = parsed()
    apply_budget(cfg)
    assert cfg.trainer.max_steps == 5 and cfg.model.init_args.config.n_layers == 2
