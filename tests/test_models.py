"""Backbone: causality, counts, masks, generation, checkpointing equivalence."""

from __future__ import annotations

import math

import pytest
import torch

from lmlab.errors import ConfigError
from lmlab.models import CausalLM, PRESETS, ScalarModel, TransformerConfig, count_params, generate, left_pad, preset
from lmlab.models.counting import flops_per_token, matmul_params, training_flops
from lmlab.models.generation import filter_logits
from lmlab.models.transformer import documents_from_eos, positions_from_documents
from lmlab.scaling.plan import pf_days

CONFIGS = [
    dict(vocab_size=97, d_model=32, n_layers=2, n_heads=4),
    dict(vocab_size=97, d_model=32, n_layers=2, n_heads=4, n_kv_heads=2, qk_norm=True, ffn_type="gelu"),
    dict(vocab_size=97, d_model=48, n_layers=3, n_heads=3, norm_type="layernorm", bias=True, position="learned",
         tie_embeddings=True),
    dict(vocab_size=97, d_model=32, n_layers=2, n_heads=4, n_kv_heads=1, ffn_hidden=80),
]


def small(**kw) -> TransformerConfig:
    return TransformerConfig(max_seq_len=64, **kw)


@pytest.mark.parametrize("kw", CONFIGS)
def test_changing_a_future_token_leaves_past_logits_unchanged(kw):
    torch.manual_seed(0)
    model = CausalLM(small(**kw)).eval()
    x = torch.randint(0, 97, (2, 16))
    y = x.clone()
    y[:, 9] = (y[:, 9] + 1) % 97
    a, b = model(x), model(y)
    assert torch.equal(a[:, :9], b[:, :9])
    assert not torch.allclose(a[:, 9:], b[:, 9:])


@pytest.mark.parametrize("kw", CONFIGS)
def test_parameter_count_matches_built_model(kw):
    cfg = small(**kw)
    model = CausalLM(cfg)
    counts = count_params(cfg)
    unique = {id(p): p for p in model.parameters()}
    assert counts.total == sum(p.numel() for p in unique.values())
    emb = model.backbone.tok_emb.weight.numel()
    if model.backbone.pos_emb is not None:
        emb += model.backbone.pos_emb.weight.numel()
    if not cfg.tie_embeddings:
        emb += model.lm_head.weight.numel()
    assert counts.non_embedding == counts.total - emb


@pytest.mark.parametrize("name", sorted(PRESETS))
def test_presets_count_without_building(name):
    cfg = preset(name)
    c = count_params(cfg)
    assert c.total > c.non_embedding > 0
    if name in ("nano", "micro"):
        assert c.total == sum(p.numel() for p in CausalLM(cfg).parameters())


def test_preset_sizes_span_tiny_to_gpt3():
    assert count_params(preset("nano")).total < 100_000
    n175 = count_params(preset("gpt3-175b")).total
    assert 170e9 < n175 < 180e9
    gpt2 = count_params(preset("gpt2-small")).total
    assert abs(gpt2 - 124.4e6) / 124.4e6 < 0.01  # 124M with the vocab padded to 50304


def test_preset_fills_only_defaulted_fields():
    cfg = TransformerConfig(preset="gpt2-small", n_layers=6)
    assert cfg.n_layers == 6 and cfg.d_model == 768 and cfg.ffn_type == "gelu"
    with pytest.raises(ConfigError, match="preset"):
        TransformerConfig(preset="nope")


def test_flop_conventions():
    cfg = preset("gpt3-175b")
    N = matmul_params(cfg)
    T = 2048
    attn = cfg.n_layers * T * cfg.d_model
    assert flops_per_token(cfg, T, "6n") == 6 * N
    assert flops_per_token(cfg, T, "kaplan") == 6 * N + 6 * attn
    assert flops_per_token(cfg, T, "palm") == 6 * N + 12 * cfg.n_layers * cfg.n_heads * cfg.head_dim * T
    # GPT-3 paper, Table D.1: 175B on 300B tokens is about 3,640 PF-days
    assert abs(pf_days(training_flops(cfg, 300e9, T, "6n")) - 3640) / 3640 < 0.01


@pytest.mark.parametrize("bad,field", [
    (dict(d_model=30, n_heads=4), "n_heads"),
    (dict(n_heads=4, n_kv_heads=3), "n_kv_heads"),
    (dict(dropout=1.5), "dropout"),
])
def test_bad_shapes_name_the_field(bad, field):
    with pytest.raises(ConfigError, match=field):
        small(vocab_size=10, **{"d_model": 32, **bad})


def test_document_masking_isolates_documents():
    torch.manual_seed(0)
    cfg = small(vocab_size=50, d_model=32, n_layers=2, n_heads=4, cross_document_attention=False)
    model = CausalLM(cfg).eval()
    eos = 0
    doc_a, doc_b = [5, 6, 7, eos], [8, 9, 10, 11]
    packed = torch.tensor([doc_a + doc_b])
    doc_ids = documents_from_eos(packed, eos)
    assert doc_ids.tolist() == [[0, 0, 0, 0, 1, 1, 1, 1]]
    assert positions_from_documents(doc_ids).tolist() == [[0, 1, 2, 3, 0, 1, 2, 3]]
    packed_logits = model(packed, doc_ids=doc_ids)
    alone = model(torch.tensor([doc_b]))
    torch.testing.assert_close(packed_logits[:, 4:], alone, atol=1e-5, rtol=1e-5)
    crossing = model(packed)
    assert not torch.allclose(crossing[:, 4:], alone, atol=1e-3)


def test_activation_checkpointing_gives_the_same_gradients():
    torch.manual_seed(0)
    cfg = small(vocab_size=61, d_model=32, n_layers=3, n_heads=4)
    ref = CausalLM(cfg)
    ck = CausalLM(TransformerConfig(**{**cfg.to_dict(), "activation_checkpointing": True}))
    ck.load_state_dict(ref.state_dict())
    x = torch.randint(0, 61, (2, 12))
    for m in (ref, ck):
        m.train()
        m(x).float().logsumexp(-1).mean().backward()
    for (n, p), (_, q) in zip(ref.named_parameters(), ck.named_parameters()):
        torch.testing.assert_close(p.grad, q.grad, atol=1e-6, rtol=1e-5, msg=n)


def test_left_padding_does_not_change_logits():
    torch.manual_seed(0)
    model = CausalLM(small(vocab_size=40, d_model=32, n_layers=2, n_heads=4)).eval()
    ids, mask = left_pad([[3, 4, 5, 6], [7, 8]], pad_id=0)
    pos = (mask.cumsum(1) - 1).clamp(min=0)
    out = model(ids, position_ids=pos, attention_mask=mask)
    alone = model(torch.tensor([[7, 8]]))
    torch.testing.assert_close(out[1, 2:], alone[0], atol=1e-5, rtol=1e-5)


def test_greedy_generation_matches_step_by_step_full_forward():
    torch.manual_seed(1)
    model = CausalLM(small(vocab_size=40, d_model=32, n_layers=2, n_heads=4, n_kv_heads=2)).eval()
    prompts = [[1, 2, 3, 4, 5], [6, 7]]
    ids, mask = left_pad(prompts, 0)
    out = generate(model, ids, mask, max_new_tokens=6, temperature=0)
    for i, p in enumerate(prompts):
        seq = list(p)
        for _ in range(6):
            seq.append(int(model(torch.tensor([seq]))[0, -1, :40].argmax()))
        assert out.responses[i].tolist() == seq[len(p):]


def test_sampled_logprobs_equal_recomputed_forward_logprobs():
    torch.manual_seed(2)
    model = CausalLM(small(vocab_size=40, d_model=32, n_layers=2, n_heads=4)).eval()
    ids, mask = left_pad([[1, 2, 3], [4]], 0)
    g = torch.Generator().manual_seed(0)
    out = generate(model, ids, mask, max_new_tokens=5, temperature=0.7, top_p=0.9, generator=g)
    full_mask = torch.cat([mask, out.response_mask], 1)
    pos = (full_mask.cumsum(1) - 1).clamp(min=0)
    logits = model(out.sequences, position_ids=pos, attention_mask=full_mask)[..., :40]
    P = ids.shape[1]
    lp = torch.log_softmax(logits[:, P - 1:-1] / 0.7, -1).gather(2, out.responses[..., None]).squeeze(2)
    torch.testing.assert_close(lp * out.response_mask, out.logprobs, atol=1e-5, rtol=1e-5)


def test_stop_tokens_end_sequences_and_mask_the_rest():
    torch.manual_seed(3)
    model = CausalLM(small(vocab_size=20, d_model=32, n_layers=1, n_heads=4)).eval()
    ids, mask = left_pad([[1, 2]], 0)
    free = generate(model, ids, mask, max_new_tokens=8, temperature=0)
    stop = int(free.responses[0, 2])
    out = generate(model, ids, mask, max_new_tokens=8, temperature=0, stop_token_ids=[stop], pad_id=19)
    first = free.responses[0].tolist().index(stop)
    assert bool(out.finished[0])
    assert out.response_mask[0].sum().item() == first + 1
    assert out.responses.shape[1] == first + 1


def test_top_k_and_top_p_filtering():
    logits = torch.tensor([[math.log(0.5), math.log(0.3), math.log(0.15), math.log(0.05)]])
    k2 = filter_logits(logits, top_k=2)
    assert torch.isinf(k2[0, 2:]).all() and torch.isfinite(k2[0, :2]).all()
    p = filter_logits(logits, top_p=0.75)  # 0.5 + 0.3 reaches 0.75 -> two tokens kept
    assert torch.isfinite(p[0, :2]).all() and torch.isinf(p[0, 2:]).all()


def test_scalar_model_reads_last_real_token():
    torch.manual_seed(0)
    model = ScalarModel(small(vocab_size=30, d_model=32, n_layers=1, n_heads=4)).eval()
    ids = torch.tensor([[5, 6, 7, 0, 0]])
    mask = torch.tensor([[1, 1, 1, 0, 0]])
    score = model.score_last(ids, mask)
    direct = model(torch.tensor([[5, 6, 7]]))[0, -1]
    torch.testing.assert_close(score[0], direct, atol=1e-5, rtol=1e-5)
    value = ScalarModel(small(vocab_size=30, d_model=32, n_layers=1, n_heads=4), zero_init_head=True)
    assert torch.count_nonzero(value(ids)) == 0
