"""bf16 causal attention on CPU with the matmul backward (lmlab/models/cpu_attention.py)."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from lmlab.models import CausalLM, TransformerConfig
from lmlab.models import cpu_attention
from lmlab.models.cpu_attention import causal_attention_bf16_cpu, wants_bf16_cpu_attention
from lmlab.modules import OptimizerConfig
from lmlab.modules.optim import build_optimizer


def _grads(fn, q, k, v, g):
    leaves = [x.detach().clone().requires_grad_() for x in (q, k, v)]
    out = fn(*leaves)
    out.backward(g)
    return out.detach().float(), [x.grad.float() for x in leaves]


def test_matmul_backward_is_as_close_to_fp32_as_the_flash_backward():
    torch.manual_seed(0)
    q, k, v = (torch.randn(2, 3, 40, 16) for _ in range(3))
    g = torch.randn(2, 3, 40, 16)
    sdpa = lambda a, b, c: F.scaled_dot_product_attention(a, b, c, is_causal=True)  # noqa: E731
    ref_out, ref = _grads(sdpa, q, k, v, g)
    bf = [x.bfloat16() for x in (q, k, v, g)]
    flash_out, flash = _grads(sdpa, *bf)
    ours_out, ours = _grads(causal_attention_bf16_cpu, *bf)
    assert torch.equal(ours_out, flash_out)  # the same flash forward
    for name, r, a, b in zip("qkv", ref, flash, ours):
        err_flash, err_ours = float((a - r).abs().max()), float((b - r).abs().max())
        # both round to bf16; ours must not be meaningfully worse than the kernel it replaces
        assert err_ours <= 2 * err_flash + 1e-2 * float(r.abs().max()), (name, err_ours, err_flash)
        torch.testing.assert_close(b, r, rtol=5e-2, atol=5e-2 * float(r.abs().max()))


def test_it_applies_only_to_plain_causal_bf16_on_cpu():
    x32, x16 = torch.zeros(1, 1, 4, 8), torch.zeros(1, 1, 4, 8, dtype=torch.bfloat16)
    assert wants_bf16_cpu_attention(x16, None, None, 0.0)
    assert not wants_bf16_cpu_attention(x32, None, None, 0.0)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        assert wants_bf16_cpu_attention(x32, None, None, 0.0)
        assert not wants_bf16_cpu_attention(x32, torch.ones(1, 1, 4, 4, dtype=torch.bool), None, 0.0)
        assert not wants_bf16_cpu_attention(x32, None, object(), 0.0)
        assert not wants_bf16_cpu_attention(x32, None, None, 0.1)
    long = torch.zeros(1, 1, cpu_attention.MAX_SEQ_LEN + 1, 8, dtype=torch.bfloat16)
    assert not wants_bf16_cpu_attention(long, None, None, 0.0)  # its (T, T) scores would not stay small


def _train(model, tokens, steps):
    opt = build_optimizer(model, OptimizerConfig(lr=3e-3))
    losses = []
    for _ in range(steps):
        with torch.autocast("cpu", dtype=torch.bfloat16):
            logits = model(tokens[:, :-1])
        loss = F.cross_entropy(logits.float().flatten(0, 1), tokens[:, 1:].flatten())
        loss.backward()
        opt.step()
        opt.zero_grad()
        losses.append(float(loss.detach()))
    return losses


@pytest.mark.parametrize("extra", [{}, {"n_kv_heads": 1, "activation_checkpointing": True}])
def test_compiled_blocks_use_it_under_bf16_autocast_and_follow_eager(monkeypatch, extra):
    cfg = TransformerConfig(vocab_size=128, d_model=32, n_layers=2, n_heads=2, max_seq_len=32, **extra)
    torch.manual_seed(0)
    eager = CausalLM(cfg)
    compiled = CausalLM(cfg)
    compiled.load_state_dict(eager.state_dict())
    compiled.backbone.compile_blocks()
    assert all(b.attn.bf16_cpu_attention for b in compiled.backbone.blocks)
    assert not any(b.attn.bf16_cpu_attention for b in eager.backbone.blocks)  # eager stays on SDPA
    calls = []
    original = cpu_attention.causal_attention_bf16_cpu
    monkeypatch.setattr("lmlab.models.transformer.causal_attention_bf16_cpu",
                        lambda *a: calls.append(1) or original(*a))
    tokens = torch.randint(0, 128, (4, 25), generator=torch.Generator().manual_seed(1))
    ref = _train(eager, tokens, 5)
    assert calls == []
    got = _train(compiled, tokens, 5)
    assert len(calls) >= 2  # traced once per block graph at least
    for s, (a, b) in enumerate(zip(got, ref)):
        assert a == pytest.approx(b, rel=1e-3), (s, a, b)
    assert ref[-1] < ref[0] and got[-1] < got[0]
