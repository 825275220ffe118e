"""MKL-packed Linear layers for serving: outputs equal to the unpacked model's (bit for bit at row counts other
than the packed one), shared parameters, the given model untouched."""

import pytest
import torch
from torch import nn

from lmlab.models import CausalLM, TransformerConfig
from lmlab.models.transformer import KVCache
from lmlab.serving.packed import PackedLinear, can_pack, pack_linears, shared_copy


def _model(**kw) -> CausalLM:
    torch.manual_seed(0)
    cfg = TransformerConfig(vocab_size=300, d_model=64, n_layers=2, n_heads=4, max_seq_len=64, **kw)
    model = CausalLM(cfg).eval()
    with torch.no_grad():
        for p in model.parameters():
            p.normal_(0, 0.3)
    return model


@pytest.mark.skipif(not can_pack(nn.Linear(2, 2)), reason="torch without MKL")
@pytest.mark.parametrize("kw", [dict(tie_embeddings=True), dict(tie_embeddings=False, bias=True)], ids=["tied", "bias"])
def test_packed_model_gives_the_same_logits_and_shares_weights(kw):
    model = _model(**kw)
    packed = pack_linears(shared_copy(model), rows=5)  # the 5-row decode step multiplies packed, the others fall back
    linears = [n for n, m in model.named_modules() if type(m) is nn.Linear]
    assert linears and all(isinstance(packed.get_submodule(n), PackedLinear) for n in linears)
    assert all(type(model.get_submodule(n)) is nn.Linear for n in linears)  # the given model is unchanged
    assert packed.lm_head.weight is model.lm_head.weight
    assert {id(p) for p in packed.parameters()} <= {id(p) for p in model.parameters()}
    ids = torch.randint(0, 300, (5, 11))
    mask = torch.ones(5, 14, dtype=torch.long)
    mask[:2, :4] = 0
    with torch.inference_mode():
        caches = [KVCache.allocate(model.config, 5, 14, "cpu", torch.float32) for _ in range(2)]
        # prefill (55 rows per GEMM), then decode steps of 5 (the packed row count), 3 and 1 rows
        a, b = (m(ids, attention_mask=mask[:, :11], cache=c) for m, c in zip((model, packed), caches))
        assert torch.equal(a, b)
        for n in (5, 3, 1):
            views = [KVCache([k[:n] for k in c.keys], [v[:n] for v in c.values], c.length) for c in caches]
            tok, pos = torch.randint(0, 300, (n, 1)), torch.full((n, 1), views[0].length)
            a, b = (m(tok, position_ids=pos, attention_mask=mask[:n, : views[0].length + 1], cache=v)
                    for m, v in zip((model, packed), views))
            if n == 5:  # the packed product: MKL may use another kernel than for the unpacked one
                torch.testing.assert_close(b, a, rtol=0, atol=1e-5)
            else:  # unpacked, the GEMM F.linear uses
                assert torch.equal(a, b)
            for c, v in zip(caches, views):
                c.length = v.length
            for ref, other in zip(caches[0].keys + caches[0].values, caches[1].keys + caches[1].values):
                other.copy_(ref)  # the next step starts from the same cache


def test_pack_linears_leaves_models_it_cannot_pack_alone():
    model = _model(tie_embeddings=True).to(torch.float64)
    assert not can_pack(model) and pack_linears(model, rows=4) is model


@pytest.mark.parametrize("kv_heads", [4, 2], ids=["mha", "gqa"])
def test_reduction_decode_attention_matches_sdpa_on_one_token_steps(kv_heads):
    """The compiled decode step's attention (multiply-and-sum) equals SDPA's up to float rounding on one-token
    cached steps with padding, and is SDPA itself for prefill (bit-identical)."""
    from lmlab.serving.decode_attention import ReductionDecodeAttention, use_reduction_decode_attention

    model = _model(tie_embeddings=True, n_kv_heads=kv_heads)
    reduced = use_reduction_decode_attention(shared_copy(model))
    assert all(type(b.attn) is ReductionDecodeAttention for b in reduced.backbone.blocks)
    assert all(type(b.attn).__name__ == "Attention" for b in model.backbone.blocks)  # the original is untouched
    ids = torch.randint(0, 300, (4, 9))
    mask = torch.ones(4, 13, dtype=torch.long)
    mask[:2, :5] = 0  # left padding
    with torch.inference_mode():
        caches = [KVCache.allocate(model.config, 4, 13, "cpu", torch.float32) for _ in range(2)]
        a, b = (m(ids, attention_mask=mask[:, :9], cache=c) for m, c in zip((model, reduced), caches))
        assert torch.equal(a, b)
        for step in range(4):
            tok, pos = torch.randint(0, 300, (4, 1)), torch.full((4, 1), 9 + step)
            a, b = (m(tok, position_ids=pos, attention_mask=mask[:, : 10 + step], cache=c)
                    for m, c in zip((model, reduced), caches))
            torch.testing.assert_close(b, a, rtol=0, atol=1e-5)
            assert a.abs().max() > 1  # logits of a scaled-up random model: the tolerance is tight relative to them
