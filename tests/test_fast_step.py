"""The fast training step: regional compilation, fused AdamW, fused cross-entropy, logging-step-only metrics."""

from __future__ import annotations

import lightning.pytorch as pl
import pytest
import torch
import torch.nn.functional as F

from helpers import LossRecorder, make_trainer, small_pretrain_dm, write_corpus
from lmlab.errors import ConfigError
from lmlab.models import CausalLM, TransformerConfig
from lmlab.models.losses import compiled_head_nll, head_nll, linear_cross_entropy
from lmlab.modules import OptimizerConfig, PretrainModule, ScheduleConfig, TrainingSettings
from lmlab.modules.optim import COMPILE_AUTO_MIN_STEPS, build_optimizer, resolve_compile


@pytest.fixture(scope="module")
def workdir(tmp_path_factory):
    root = tmp_path_factory.mktemp("fast_step")
    write_corpus(root / "corpus")
    return root


def make_module(**settings):
    cfg = TransformerConfig(vocab_size=320, d_model=32, n_layers=2, n_heads=4, max_seq_len=64)
    settings.setdefault("compile", False)
    return PretrainModule(cfg, settings=TrainingSettings(
        optimizer=OptimizerConfig(lr=3e-3), schedule=ScheduleConfig(name="cosine", warmup_steps=3), **settings))


def run(workdir, tmp_path, steps, seed=1, stop_at=None, ckpt=None, **settings):
    pl.seed_everything(seed)
    rec = LossRecorder(stop_at=stop_at)
    trainer = make_trainer(tmp_path, steps, [rec])
    trainer.fit(make_module(**settings), datamodule=small_pretrain_dm(workdir), ckpt_path=ckpt)
    return rec.losses, trainer


# -- fused cross-entropy ---------------------------------------------------------------------
@pytest.mark.parametrize("autocast", [False, True])
def test_linear_cross_entropy_matches_the_plain_loss_and_gradients(autocast):
    torch.manual_seed(0)
    h = torch.randn(3, 40, 16, requires_grad=True)
    w = torch.randn(300, 16, requires_grad=True)
    t = torch.randint(0, 300, (3, 40))
    t[0, :5] = -100  # ignored positions contribute nothing
    with torch.autocast("cpu", dtype=torch.bfloat16, enabled=autocast):
        loss, nll = linear_cross_entropy(h, w, t, normaliser=97, chunk_rows=7)
        ref_nll = F.cross_entropy((h @ w.t()).float().flatten(0, 1), t.flatten(), reduction="none").view_as(t)
        ref = ref_nll.sum() / 97
    assert nll.shape == t.shape and not nll.requires_grad
    assert float(nll[0, :5].abs().max()) == 0.0
    gh, gw = torch.autograd.grad(2.5 * loss, (h, w))
    rh, rw = torch.autograd.grad(2.5 * ref, (h, w))
    # bf16 rounds the logits and their gradient; fp32 agrees to float rounding
    tol = dict(rtol=2e-2, atol=2e-2 * float(rw.abs().max())) if autocast else dict(rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(loss, ref, rtol=1e-5 if not autocast else 1e-3, atol=0)
    torch.testing.assert_close(nll, ref_nll, rtol=1e-5, atol=1e-4 if autocast else 1e-5)
    torch.testing.assert_close(gh, rh, **tol)
    torch.testing.assert_close(gw, rw, **tol)


def test_fused_cross_entropy_pretraining_follows_the_plain_loss(workdir, tmp_path):
    plain, _ = run(workdir, tmp_path / "a", 6, fused_cross_entropy=False)
    fused, trainer = run(workdir, tmp_path / "b", 6, fused_cross_entropy=True)
    assert trainer.lightning_module.uses_fused_cross_entropy()
    assert sorted(fused) == list(range(6))
    for s in range(6):
        assert fused[s] == pytest.approx(plain[s], rel=1e-5), (s, fused[s], plain[s])


def test_fused_cross_entropy_is_automatic_for_large_vocabularies_only():
    small = PretrainModule(TransformerConfig(vocab_size=320, d_model=16, n_layers=1, n_heads=2, max_seq_len=16))
    large = PretrainModule(TransformerConfig(vocab_size=32768, d_model=16, n_layers=1, n_heads=2, max_seq_len=16))
    assert not small.uses_fused_cross_entropy() and large.uses_fused_cross_entropy()
    whole = PretrainModule(large.config, settings=TrainingSettings(compile="model"))
    whole._compiled = torch.compile(whole.model)  # a whole-model compile calls the head itself
    assert not whole.uses_fused_cross_entropy()


@pytest.mark.parametrize("autocast", [False, True])
def test_compiled_head_loss_matches_the_plain_loss_and_gradients(autocast):
    torch.manual_seed(0)
    h = torch.randn(2, 24, 16, requires_grad=True)
    w = torch.randn(200, 16, requires_grad=True)
    t = torch.randint(0, 200, (2, 24))
    t[1, :3] = -100
    grads = []
    for fn in (head_nll, compiled_head_nll):
        with torch.autocast("cpu", dtype=torch.bfloat16, enabled=autocast):
            nll = fn(h, w, t)
        assert nll.shape == t.shape and nll.dtype == torch.float32
        assert float(nll.detach()[1, :3].abs().max()) == 0.0
        grads.append((nll.detach(), *torch.autograd.grad(nll.sum() / 45, (h, w))))
    # compiled kernels sum in another order; bf16 rounds the logits and their gradient on both sides
    tol = dict(rtol=2e-2, atol=2e-2 * float(grads[0][2].abs().max())) if autocast else dict(rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(grads[1][0], grads[0][0], rtol=1e-5, atol=2e-2 if autocast else 1e-5)
    torch.testing.assert_close(grads[1][1], grads[0][1], **tol)
    torch.testing.assert_close(grads[1][2], grads[0][2], **tol)


def test_compiled_blocks_bring_the_compiled_head_loss_and_it_follows_eager(workdir, tmp_path):
    eager, t0 = run(workdir, tmp_path / "eager", 4, compile=False)
    blocks, t1 = run(workdir, tmp_path / "blocks", 4, compile="blocks")
    assert not t0.lightning_module.uses_compiled_head_loss() and t1.lightning_module.uses_compiled_head_loss()
    for s in range(4):
        assert blocks[s] == pytest.approx(eager[s], rel=1e-4), (s, blocks[s], eager[s])
    whole = make_module(compile="model")
    whole.model.backbone.compile_blocks()
    whole._compiled = torch.compile(whole.model)  # a whole-model compile covers the head itself
    assert not whole.uses_compiled_head_loss()


def test_bf16_mixed_pretraining_with_compiled_blocks_follows_eager(workdir, tmp_path):
    losses = {}
    for mode in (False, "blocks"):
        pl.seed_everything(1)
        rec = LossRecorder()
        trainer = make_trainer(tmp_path / str(mode), 4, [rec], precision="bf16-mixed")
        trainer.fit(make_module(compile=mode), datamodule=small_pretrain_dm(workdir))
        losses[mode] = rec.losses
    # compiled: the head loss and the bf16 attention backward; bf16 rounds both sides
    assert trainer.lightning_module.uses_compiled_head_loss()
    assert all(b.attn.bf16_cpu_attention for b in trainer.lightning_module.model.backbone.blocks)
    for s in range(4):
        assert losses["blocks"][s] == pytest.approx(losses[False][s], rel=1e-3), (s, losses)


# -- fused AdamW -------------------------------------------------------------------------------
def test_adamw_is_fused_on_cpu_by_default_and_matches_foreach():
    torch.manual_seed(0)
    models = [CausalLM(TransformerConfig(vocab_size=64, d_model=16, n_layers=1, n_heads=2, max_seq_len=8)) for _ in range(2)]
    models[1].load_state_dict(models[0].state_dict())
    fused = build_optimizer(models[0], OptimizerConfig(lr=1e-2))
    foreach = build_optimizer(models[1], OptimizerConfig(lr=1e-2, fused=False))
    assert fused.defaults["fused"] is True and foreach.defaults["foreach"] is True
    x = torch.randint(0, 64, (2, 8))
    for _ in range(3):
        for model, opt in zip(models, (fused, foreach)):
            model(x).float().logsumexp(-1).mean().backward()
            opt.step()
            opt.zero_grad()
    for a, b in zip(models[0].parameters(), models[1].parameters()):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-6)


# -- compilation ------------------------------------------------------------------------------
def test_resolve_compile_modes():
    cpu = torch.device("cpu")
    assert resolve_compile("auto", cpu, COMPILE_AUTO_MIN_STEPS) == "blocks"
    assert resolve_compile("auto", cpu, COMPILE_AUTO_MIN_STEPS - 1) == "eager"
    assert resolve_compile("auto", cpu, None) == "eager"
    assert resolve_compile(True, cpu, 5) == "model" and resolve_compile("model", cpu, 5) == "model"
    assert resolve_compile("blocks", cpu, 5) == "blocks" and resolve_compile(False, cpu, 10**6) == "eager"
    with pytest.raises(ConfigError, match="model.settings.compile"):
        resolve_compile("fast", cpu, 5)


def test_compiled_blocks_follow_eager_losses_and_resume_exactly(workdir, tmp_path):
    steps, cut = 6, 3
    eager, _ = run(workdir, tmp_path / "eager", steps, compile=False)
    full, trainer = run(workdir, tmp_path / "full", steps, compile="blocks")
    backbone = trainer.lightning_module.model.backbone
    assert len(backbone._compiled_blocks) == 2
    # compiled views add no state-dict keys: checkpoints load into eager models
    assert all("_orig_mod" not in k for k in trainer.lightning_module.model.state_dict())
    for s in range(steps):
        assert full[s] == pytest.approx(eager[s], rel=1e-4), (s, full[s], eager[s])

    first, t1 = run(workdir, tmp_path / "cut", steps, stop_at=cut, compile="blocks")
    ckpt = tmp_path / "cut.ckpt"
    t1.save_checkpoint(ckpt)
    second, _ = run(workdir, tmp_path / "resumed", steps, seed=999, ckpt=str(ckpt), compile="blocks")
    assert sorted(second) == list(range(cut, steps))
    for s in range(cut, steps):
        assert second[s] == full[s], (s, second[s], full[s])


def test_kv_cache_decoding_keeps_the_eager_blocks():
    torch.manual_seed(0)
    model = CausalLM(TransformerConfig(vocab_size=64, d_model=16, n_layers=2, n_heads=2, max_seq_len=16)).eval()
    x = torch.randint(0, 64, (1, 6))
    expected = model(x)
    calls = []
    model.backbone.compile_blocks()
    model.backbone._compiled_blocks = [lambda *a, _b=b: calls.append(1) or _b(*a) for b in model.backbone.blocks]
    from lmlab.models.transformer import KVCache

    cache = KVCache.allocate(model.config, 1, 16, x.device, torch.float32)
    with torch.no_grad():
        cached = model(x, cache=cache)
    assert calls == []  # the cache path never touched the compiled views
    torch.testing.assert_close(cached, expected.detach(), rtol=1e-5, atol=1e-5)
    model(x)
    assert len(calls) == 2


# -- logging ------------------------------------------------------------------------------------
def test_step_metrics_are_logged_on_logging_steps_only(workdir, tmp_path):
    logged = []

    class Spy(LossRecorder):
        def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
            super().on_train_batch_end(trainer, pl_module, outputs, batch, batch_idx)
            logged.append("train/lr" in pl_module._logged_this_step)

    module = make_module()
    original = module.log_dict

    def log_dict(metrics, *a, **kw):
        module._logged_this_step.update(metrics)
        return original(metrics, *a, **kw)

    module.log_dict = log_dict
    module.on_train_batch_start = lambda *a: setattr(module, "_logged_this_step", {})
    pl.seed_everything(1)
    spy = Spy()
    trainer = make_trainer(tmp_path, 7, [spy], log_every_n_steps=3)
    trainer.fit(module, datamodule=small_pretrain_dm(workdir))
    # steps 3 and 6 (log_every_n_steps) and the last one; the loss still comes back every step
    assert logged == [False, False, True, False, False, True, True]
    assert sorted(spy.losses) == list(range(7))
    assert float(trainer.callback_metrics["train/tokens_seen"]) == 7 * 8 * 32


@pytest.mark.parametrize("clip", [0.0, 1.0])
def test_without_clipping_the_grad_norm_is_measured_on_logging_steps_only(workdir, tmp_path, monkeypatch, clip):
    import lmlab.modules.base as base

    measured, logged = [], []
    real = base.clip_grad_norm

    def spy_clip(module, max_norm, parameters=None):
        params = list(parameters)
        direct = float(torch.cat([p.grad.detach().flatten() for p in params if p.grad is not None]).norm())
        norm = real(module, max_norm, params)
        measured.append((module.global_step + 1, float(norm), direct))
        return norm

    class Spy(LossRecorder):
        def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
            super().on_train_batch_end(trainer, pl_module, outputs, batch, batch_idx)
            if "train/grad_norm" in trainer.callback_metrics and trainer.global_step in (3, 6, 7):
                logged.append((trainer.global_step, float(trainer.callback_metrics["train/grad_norm"])))

    monkeypatch.setattr(base, "clip_grad_norm", spy_clip)
    pl.seed_everything(1)
    spy = Spy()
    trainer = make_trainer(tmp_path, 7, [spy], log_every_n_steps=3)
    trainer.fit(make_module(gradient_clip_val=clip), datamodule=small_pretrain_dm(workdir))
    # clipping needs the norm every step; without it only the logged steps (3, 6 and the last) measure it
    assert [step for step, _, _ in measured] == ([3, 6, 7] if clip == 0.0 else list(range(1, 8)))
    for step, norm, direct in measured:
        assert norm == pytest.approx(direct, rel=1e-5)  # the pre-clip global norm of every gradient
    by_step = {step: norm for step, norm, _ in measured}
    assert [step for step, _ in logged] == [3, 6, 7]
    for step, value in logged:
        assert value == pytest.approx(by_step[step], rel=1e-6)


def test_post_training_stages_measure_the_grad_norm_every_step():
    from lmlab.modules import PretrainModule as Pretrain
    from lmlab.modules.posttrain_base import PostTrainModuleBase

    # they stop on a non-finite gradient norm, which needs the norm of every update
    assert PostTrainModuleBase.checks_grad_norm and not Pretrain.checks_grad_norm


def test_auto_compiles_the_blocks_of_long_single_device_runs_only(tmp_path):
    def compiled_blocks(max_steps, **extra):
        module = PretrainModule(TransformerConfig(vocab_size=64, d_model=16, n_layers=2, n_heads=2, max_seq_len=8, **extra))
        module.trainer = make_trainer(tmp_path, max_steps)
        module.apply_compile("fit")
        return len(module.model.backbone._compiled_blocks)

    assert compiled_blocks(COMPILE_AUTO_MIN_STEPS) == 2
    assert compiled_blocks(COMPILE_AUTO_MIN_STEPS - 1) == 0
    # routed experts change shape every step: auto leaves MoE backbones eager
    assert compiled_blocks(COMPILE_AUTO_MIN_STEPS, moe_experts=4, moe_top_k=2) == 0
