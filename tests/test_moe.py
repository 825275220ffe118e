"""Mixture-of-experts feed-forward: grouped expert computation, routing, auxiliary losses, counts, export, stages."""

from __future__ import annotations

import math

import lightning.pytorch as pl
import pytest
import torch

from helpers import make_trainer
from lmlab.errors import ConfigError
from lmlab.models import CausalLM, TransformerConfig, generate
from lmlab.models.counting import count_params, flops_per_token
from lmlab.models.hf import hf_architecture, load_hf_model
from lmlab.models.moe import MoEFeedForward, collect_router_losses, load_metrics, moe_modules
from lmlab.models.transformer import MLP

pytestmark = pytest.mark.usefixtures("single_thread")

MOE = dict(moe_experts=4, moe_top_k=2, moe_expert_hidden=24)


def cfg(**kw) -> TransformerConfig:
    return TransformerConfig(**{**dict(vocab_size=96, d_model=32, n_layers=3, n_heads=4, max_seq_len=32), **MOE, **kw})


def distinct(model: torch.nn.Module, seed: int = 0) -> torch.nn.Module:
    """Large distinct weights, so routing differs between tokens and a mis-mapped tensor shows up."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in model.parameters():
            p.copy_(torch.randn(p.shape, generator=g) * 0.3 if p.dim() > 1 else 1 + 0.3 * torch.rand(p.shape, generator=g))
    return model


@pytest.mark.parametrize("shared", [0, 2])
def test_grouped_experts_equal_the_per_expert_loop_in_values_and_gradients(shared):
    torch.manual_seed(0)
    layer = distinct(MoEFeedForward(cfg(moe_shared_experts=shared)))
    x = torch.randn(3, 10, 32, requires_grad=True)
    g = torch.randn(3, 10, 32)
    y = layer(x)
    y.backward(g)
    grads = [x.grad.clone()] + [p.grad.clone() for p in layer.parameters()]
    x.grad = None
    layer.zero_grad()
    ref = layer.naive_forward(x)
    ref.backward(g)
    assert torch.allclose(y, ref, atol=1e-5)
    for a, b in zip(grads, [x.grad] + [p.grad for p in layer.parameters()]):
        assert torch.allclose(a, b, atol=1e-5)
    # every expert got tokens here and every expert weight a gradient
    assert all(float(p.grad[i].abs().sum()) > 0 for p in (layer.gate_up, layer.down) for i in range(4))


def test_topk_weights_renormalised_or_raw():
    x = torch.randn(20, 32)
    for renorm in (True, False):
        torch.manual_seed(0)
        layer = distinct(MoEFeedForward(cfg(moe_renormalize=renorm)))
        _, probs, weights, experts = layer.route(x)
        assert torch.equal(experts, probs.topk(2, dim=-1).indices)
        expected = probs.topk(2, dim=-1).values
        if renorm:
            expected = expected / expected.sum(-1, keepdim=True)
            assert torch.allclose(weights.sum(-1), torch.ones(20))
        assert torch.allclose(weights, expected)


def test_capacity_drops_overflow_in_training_and_counts_it():
    torch.manual_seed(0)
    layer = MoEFeedForward(cfg(moe_capacity_factor=1.0)).train()
    with torch.no_grad():
        layer.router.weight.zero_()
        layer.router.weight[0, :] = 1.0  # positive inputs: every token prefers expert 0, then 1
        layer.router.weight[1, :] = 0.5
    x = torch.rand(1, 16, 32) + 0.1
    y = layer(x)
    (loss, stats), = layer.records
    # 16 tokens x 2 slots over 4 experts: capacity 8 each; experts 0 and 1 get 16 each, 8 of each dropped
    assert float(stats["assigned"]) == 32 and float(stats["dropped"]) == 16
    assert torch.allclose(stats["fraction"], torch.tensor([0.5, 0.5, 0.0, 0.0]))
    metrics = load_metrics([[stats]])
    assert metrics["moe/dropped_fraction"] == 0.5
    assert metrics["moe/load_entropy"] == pytest.approx(math.log(2) / math.log(4))
    assert metrics["moe/max_load"] == pytest.approx(2.0)
    # the first 8 tokens (in order) keep both experts, the rest none: their output is zero
    y = y.detach()
    assert float(y[0, 8:].abs().max()) == 0.0 and float(y[0, :8].abs().sum()) > 0
    # evaluation is dropless and records nothing
    layer.records.clear()
    layer.eval()
    with torch.no_grad():
        full = layer(x)
    assert float(full[0, 8:].abs().sum()) > 0 and not layer.records
    assert torch.allclose(full[0, :8], y[0, :8], atol=1e-6)


def test_balance_and_z_loss_values():
    layer = MoEFeedForward(cfg(moe_aux_loss_coef=0.1, moe_z_loss_coef=0.01)).train()
    with torch.no_grad():
        layer.router.weight.zero_()  # uniform router: P_i = 1/E, logsumexp = log E
    layer(torch.randn(2, 8, 32))
    (loss, stats), = layer.records
    # Switch form E * sum f_i P_i is 1 whenever P is uniform
    assert float(stats["balance"]) == pytest.approx(1.0)
    assert float(stats["z"]) == pytest.approx(math.log(4) ** 2)
    assert float(loss.detach()) == pytest.approx(0.1 * 1.0 + 0.01 * math.log(4) ** 2)
    total, per_layer = collect_router_losses([layer])
    assert float(total.detach()) == pytest.approx(float(loss.detach())) and not layer.records and len(per_layer) == 1


def test_layer_placement_and_config_errors():
    model = CausalLM(cfg(n_layers=6, moe_every=2, moe_dense_layers=2))
    kinds = [type(b.mlp) for b in model.backbone.blocks]
    assert kinds == [MLP, MLP, MLP, MoEFeedForward, MLP, MoEFeedForward]
    for bad, field in [(dict(moe_top_k=5), "moe_top_k"), (dict(ffn_type="gelu"), "moe_experts"),
                       (dict(moe_capacity_factor=0.0), "moe_capacity_factor"), (dict(moe_every=0), "moe_every")]:
        with pytest.raises(ConfigError) as err:
            cfg(**bad)
        assert err.value.field == f"model.config.{field}"


@pytest.mark.parametrize("kw", [dict(), dict(moe_shared_experts=1, moe_dense_layers=1), dict(moe_every=2, tie_embeddings=True)])
def test_counts_are_exact_and_flops_follow_active_parameters(kw):
    c = cfg(**kw)
    model = CausalLM(c)
    counts = count_params(c)
    assert counts.total == sum(p.numel() for p in model.parameters())
    # active: the router, k of E experts and the shared experts of each expert block
    experts = sum(m.gate_up.numel() + m.down.numel() for m in moe_modules(model))
    assert counts.total - counts.active == experts * (4 - 2) // 4
    assert counts.non_embedding - counts.active_non_embedding == counts.total - counts.active
    dense = TransformerConfig(**{**c.to_dict(), "moe_experts": 0})
    assert flops_per_token(c, 16, "6n") == pytest.approx(
        flops_per_token(dense, 16, "6n") + 6 * (counts.active - count_params(dense).total))


def test_planner_memory_holds_every_expert_and_its_optimizer_state():
    from lmlab.distributed.memory import param_split

    c = cfg()
    split = param_split(c)
    assert split.total == count_params(c).total
    assert split.root == count_params(TransformerConfig(**{**c.to_dict(), "moe_experts": 0})).embedding + c.d_model
    model = CausalLM(c)
    assert split.n_tensors == len(list(model.parameters()))
    assert split.block == sum(p.numel() for p in model.backbone.blocks[0].parameters())


def test_kv_cache_generation_equals_full_recompute():
    torch.manual_seed(0)
    model = distinct(CausalLM(cfg(moe_shared_experts=1))).eval()
    prompt = torch.randint(0, 96, (2, 5))
    out = generate(model, prompt, max_new_tokens=8, temperature=0)
    seq = prompt
    with torch.no_grad():
        for _ in range(8):
            seq = torch.cat([seq, model(seq)[:, -1, :96].argmax(-1, keepdim=True)], dim=1)
    assert torch.equal(out.responses, seq[:, 5:])


def test_tensor_parallel_refuses_experts_in_one_line():
    from lmlab.distributed.parallelize import check_tp_degree

    check_tp_degree(cfg(), 1)
    with pytest.raises(ConfigError) as err:
        check_tp_degree(cfg(), 2)
    assert "tensor_parallel_size=1" in str(err.value)


# --- export -----------------------------------------------------------------------------------------

EXPORTS = {
    "mixtral": (dict(), "MixtralForCausalLM"),
    "mixtral-gqa-tied-top1": (dict(n_kv_heads=2, tie_embeddings=True, moe_top_k=1), "MixtralForCausalLM"),
    "qwen2moe-shared": (dict(moe_shared_experts=1), "Qwen2MoeForCausalLM"),
    "qwen2moe-dense-first-raw-topk": (dict(moe_shared_experts=2, moe_dense_layers=1, moe_renormalize=False),
                                      "Qwen2MoeForCausalLM"),
}


@pytest.mark.parametrize("name", list(EXPORTS))
def test_export_to_transformers_matches_logits_and_greedy_generation(name, tokdir, tmp_path):
    from transformers import AutoModelForCausalLM

    from lmlab.cli import main as lmlab_main
    from test_export_hf import VOCAB, save_ckpt

    kw, cls = EXPORTS[name]
    c = cfg(**{**kw, "vocab_size": VOCAB, "max_seq_len": 48})
    model = distinct(CausalLM(c), seed=len(name)).eval()
    ckpt = tmp_path / "run" / "last.ckpt"
    save_ckpt(model, ckpt)
    out = tmp_path / "hf"
    assert lmlab_main(["export", "--ckpt", str(ckpt), "--format", "hf", "--out", str(out), "--tokenizer", str(tokdir)]) == 0
    hf = AutoModelForCausalLM.from_pretrained(out).eval()
    assert type(hf).__name__ == cls
    ids = torch.randint(7, VOCAB, (2, 20), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        ours, theirs = model(ids)[..., :VOCAB], hf(ids).logits
    assert torch.allclose(theirs, ours, atol=1e-4), (theirs - ours).abs().max()
    prompt = ids[:, :6]
    mine = generate(model, prompt, max_new_tokens=12, temperature=0)
    with torch.no_grad():
        hf_out = hf.generate(prompt, attention_mask=torch.ones_like(prompt), max_new_tokens=12, do_sample=False,
                             eos_token_id=None, min_new_tokens=12)
    assert torch.equal(hf_out[:, 6:], mine.responses[:, : hf_out.shape[1] - 6])
    again = load_hf_model(out)
    assert again.config.to_dict() == {**c.to_dict(), "preset": None}
    with torch.no_grad():
        assert torch.allclose(again(ids)[..., :VOCAB], ours, atol=1e-6)


@pytest.fixture(scope="module")
def tokdir(tmp_path_factory):
    from helpers import small_tokenizer
    from test_export_hf import VOCAB

    return small_tokenizer(tmp_path_factory.mktemp("moe_export"), VOCAB)


@pytest.mark.parametrize("kw,why", [(dict(moe_dense_layers=1), "dense blocks between expert blocks"),
                                     (dict(moe_renormalize=False), "moe_renormalize=false"),
                                     (dict(moe_shared_experts=1, qk_norm=True), "qk_norm")])
def test_export_without_a_transformers_class_fails_in_one_line(kw, why):
    with pytest.raises(ConfigError) as err:
        hf_architecture(cfg(**kw), field="--format hf")
    assert why in str(err.value) and "\n" not in str(err.value)


# --- stages ----------------------------------------------------------------------------------------


def _captured_step(module, batch):
    """Run the template's optimization_step with backward captured; returns (trained loss, stage loss, aux)."""
    seen = []
    module.manual_backward = lambda loss: seen.append(loss.detach())
    module.optimizer_update = lambda: None
    module.log_dict = lambda *a, **k: None
    module.train()
    normaliser = module.batch_normaliser(batch)
    module.optimization_step([batch], normaliser)
    stage_loss, _ = module.micro_batch_loss(batch, normaliser)  # the same forward again, outside the template
    aux, _ = collect_router_losses(moe_modules(module.model))
    return float(seen[0]), float(stage_loss.detach()), float(aux.detach())


def test_router_losses_reach_sft_and_dpo_losses_through_the_template(tmp_path):
    from lmlab.data.posttrain.datamodules import PreferenceDataModule, SFTDataModule, VerifiableData
    from lmlab.data.posttrain.datamodules import load_posttrain_tokenizer
    from lmlab.modules.dpo import DPOModule
    from lmlab.modules.sft import SFTModule

    tok = load_posttrain_tokenizer("char")
    c = cfg(vocab_size=len(tok), max_seq_len=64, pad_vocab_to=8, moe_aux_loss_coef=0.5, moe_z_loss_coef=0.1)
    torch.manual_seed(0)
    sft = SFTModule(c)
    dm = SFTDataModule("char", verifiable=VerifiableData(n=16, val_n=4, max_digits=2), max_length=32, batch_size=8)
    dm.setup()
    batch = dm._collate()(dm.train_examples[:8])
    trained, stage, aux = _captured_step(sft, batch)
    assert aux > 0.5  # balance loss >= 1 per expert layer, weighted 0.5
    assert trained == pytest.approx(stage + aux, rel=1e-5)

    trainer = pl.Trainer(accelerator="cpu", logger=False, enable_progress_bar=False, enable_model_summary=False)
    trainer.strategy.connect(sft)
    trainer.save_checkpoint(tmp_path / "policy.ckpt")
    dpo = DPOModule(init_from=str(tmp_path / "policy.ckpt"), beta=0.5)
    pdm = PreferenceDataModule("char", verifiable=VerifiableData(n=16, val_n=4, max_digits=2), max_length=32, batch_size=8)
    pdm.setup()
    pbatch = pdm._collate()(pdm.train_examples[:8])
    trained, stage, aux = _captured_step(dpo, pbatch)
    assert aux > 0.5 and trained == pytest.approx(stage + aux, rel=1e-5, abs=1e-6)
    # the frozen reference model never records router losses
    assert not any(m.records for m in moe_modules(dpo.ref_model))


def test_sft_and_dpo_train_an_moe_backbone_and_log_expert_load(tmp_path):
    from lmlab.data.posttrain.datamodules import PreferenceDataModule, SFTDataModule, VerifiableData
    from lmlab.data.posttrain.datamodules import load_posttrain_tokenizer
    from lmlab.modules.dpo import DPOModule
    from lmlab.modules.optim import OptimizerConfig, ScheduleConfig, TrainingSettings
    from lmlab.modules.sft import SFTModule

    tok = load_posttrain_tokenizer("char")
    pl.seed_everything(0)
    settings = TrainingSettings(optimizer=OptimizerConfig(lr=3e-3, weight_decay=0.0),
                                schedule=ScheduleConfig(name="constant", warmup_steps=2))
    sft = SFTModule(cfg(vocab_size=len(tok), max_seq_len=64, pad_vocab_to=8, n_layers=2), settings=settings)
    dm = SFTDataModule("char", verifiable=VerifiableData(n=128, val_n=16, max_digits=2), max_length=32, batch_size=16,
                       micro_batch_size=8)
    trainer = make_trainer(tmp_path / "sft", 15, limit_val_batches=None, val_check_interval=15, check_val_every_n_epoch=None)
    trainer.validate(sft, datamodule=dm, verbose=False)
    trainer.fit(sft, datamodule=dm)
    m = trainer.callback_metrics
    assert sft.val_history[-1]["val/loss"] < sft.val_history[0]["val/loss"] - 0.5, sft.val_history
    fractions = [float(m[f"moe/expert{j}/fraction"]) for j in range(4)]
    assert sum(fractions) == pytest.approx(1.0, abs=1e-5)
    assert 0.0 < float(m["moe/load_entropy"]) <= 1.0 and float(m["moe/dropped_fraction"]) == 0.0
    trainer.save_checkpoint(tmp_path / "sft.ckpt")

    dpo = DPOModule(init_from=str(tmp_path / "sft.ckpt"), beta=0.5, settings=settings)
    pdm = PreferenceDataModule("char", verifiable=VerifiableData(n=32, val_n=8, max_digits=2), max_length=32, batch_size=8)
    trainer = make_trainer(tmp_path / "dpo", 4)
    trainer.fit(dpo, datamodule=pdm)
    m = trainer.callback_metrics
    assert torch.isfinite(torch.as_tensor(m["train/loss"])) and "moe/load_entropy" in m


def test_run_summary_records_active_and_total_parameters(tmp_path):
    from helpers import corpus_sources, write_corpus
    from lmlab.data import PretrainDataModule
    from lmlab.data.tokenizer import TokenizerTrainConfig
    from lmlab.models.counting import training_flops
    from lmlab.modules.pretrain import PretrainModule
    from lmlab.scaling.run_summary import CSV_COLUMNS, RunSummary

    write_corpus(tmp_path / "corpus")
    dm = PretrainDataModule(sources=corpus_sources(tmp_path / "corpus"), tokenizer=str(tmp_path / "tok"),
                            tokenizer_train=TokenizerTrainConfig(vocab_size=320, sample_chars=100_000), seq_len=32,
                            batch_size=8, val_fraction=0.05, val_max_windows=4, cache_dir=str(tmp_path / "cache"))
    c = cfg(vocab_size=320, max_seq_len=64, n_layers=2, moe_shared_experts=1)
    module = PretrainModule(c)
    cb = RunSummary(results_file=str(tmp_path / "r.jsonl"))
    make_trainer(tmp_path, 3, callbacks=[cb], limit_val_batches=None, val_check_interval=3,
                 check_val_every_n_epoch=None).fit(module, datamodule=dm)
    rec, counts = cb.record, count_params(c)
    assert rec["N_total"] == counts.total == sum(p.numel() for p in module.model.parameters())
    assert rec["N_expert_total"] == counts.non_embedding > rec["N"] == counts.active_non_embedding
    assert rec["N_active_total"] == counts.active
    assert rec["C_6ND"] == 6 * rec["N"] * rec["D"]
    assert rec["C"] == pytest.approx(training_flops(c, rec["D"], 32, "palm"), rel=1e-12)
    assert "N_expert_total" in CSV_COLUMNS


def test_plan_holds_every_expert_and_names_the_active_count():
    from lmlab.distributed.planner import PlanInput, format_plan, plan_memory

    c = cfg(moe_experts=8)
    dense = TransformerConfig(**{**c.to_dict(), "moe_experts": 0})
    moe_plan = plan_memory(PlanInput(config=c, micro_batch=2, seq_len=16), search=False)
    dense_plan = plan_memory(PlanInput(config=dense, micro_batch=2, seq_len=16), search=False)
    extra = count_params(c).total - count_params(dense).total
    # fp32 AdamW: weights + grads + two moments = 16 bytes for every parameter, experts included
    states = lambda p: p.params + p.grads + p.optimizer  # noqa: E731
    # (plus a 4-byte AdamW step counter per tensor: router, gate_up, down replace fc, proj, one more per block)
    assert states(moe_plan) - states(dense_plan) == 16 * extra + 4 * c.n_layers
    assert f"{count_params(c).active:,} params active per token" in format_plan(moe_plan)


def test_serving_engine_batches_an_moe_model_like_unbatched_generate():
    from lmlab.data.posttrain.datamodules import load_posttrain_tokenizer
    from lmlab.serving.engine import Engine, GenerationRequest, SamplingParams

    tok = load_posttrain_tokenizer("char")
    torch.manual_seed(0)
    model = distinct(CausalLM(cfg(vocab_size=len(tok), max_seq_len=64, pad_vocab_to=8, moe_shared_experts=1))).eval()
    engine = Engine(model, tok, max_batch=3, max_queue=16)
    prompts = [tok("12+3=")["input_ids"], tok("7")["input_ids"], tok("40+41=")["input_ids"], tok("9+9")["input_ids"]]
    budgets = [6, 9, 4, 7]
    reqs = [engine.submit(GenerationRequest(p, SamplingParams(max_tokens=b, temperature=0))) for p, b in zip(prompts, budgets)]
    while not all(r.done for r in reqs):
        engine.step()
    for p, b, r in zip(prompts, budgets, reqs):
        out = generate(model, torch.tensor([p]), max_new_tokens=b, temperature=0)
        assert r.token_ids == out.responses[0].tolist()[: len(r.token_ids)] and len(r.token_ids) > 0
    assert engine.max_rows_seen == 3
