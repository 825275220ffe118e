"""Pipeline stages: the composition of the stages is the full model, forward and backward."""

from __future__ import annotations

import pytest
import torch

from lmlab.distributed.pipeline_parallel import balance_layers, split_stages
from lmlab.models import CausalLM, ScalarModel, TransformerConfig


def _config(**kw) -> TransformerConfig:
    base = dict(vocab_size=96, d_model=32, n_layers=5, n_heads=4, max_seq_len=32)
    base.update(kw)
    return TransformerConfig(**base)


@pytest.mark.parametrize("kw,n_stages", [
    ({}, 3),
    ({"tie_embeddings": True, "n_kv_heads": 2}, 2),
    ({"position": "learned", "ffn_type": "gelu", "norm_type": "layernorm", "bias": True}, 3),
])
def test_stages_compose_to_the_full_model(kw, n_stages):
    torch.manual_seed(0)
    model = CausalLM(_config(**kw))
    ids = torch.randint(0, 96, (3, 20))
    full = model(ids)
    stages = split_stages(model, n_stages)
    assert len(stages) == n_stages
    assert sum(len(s.blocks) for s in stages) == 5
    x = ids
    for s in stages:
        x = s(x)
    torch.testing.assert_close(x, full, rtol=0, atol=0)

    # gradients through the stages equal the full model's (the stages share its parameters)
    full.square().mean().backward()
    ref = {n: p.grad.clone() for n, p in model.named_parameters()}
    model.zero_grad()
    x = ids
    for s in stages:
        x = s(x)
    x.square().mean().backward()
    for n, p in model.named_parameters():
        torch.testing.assert_close(p.grad, ref[n], rtol=1e-5, atol=1e-7)


def test_stage_parameters_partition_the_model():
    model = CausalLM(_config())
    stages = split_stages(model, 3, layers_per_stage=[1, 3, 1])
    ids = [{id(p) for p in s.parameters()} for s in stages]
    assert not (ids[0] & ids[1]) and not (ids[1] & ids[2]) and not (ids[0] & ids[2])
    assert set().union(*ids) == {id(p) for p in model.parameters()}
    assert [len(s.blocks) for s in stages] == [1, 3, 1]
    with pytest.raises(ValueError):
        split_stages(model, 2, layers_per_stage=[2, 2])


def test_scalar_model_stages_and_checkpointed_stages():
    torch.manual_seed(1)
    model = ScalarModel(_config(activation_checkpointing=True)).train()
    ids = torch.randint(0, 96, (2, 12))
    full = model(ids)
    x = ids
    for s in split_stages(model, 2):
        x = s(x)
    assert x.shape == (2, 12)
    torch.testing.assert_close(x, full, rtol=0, atol=0)


def test_balance_layers_accounts_for_embedding_and_head():
    assert balance_layers(8, 1) == [8]
    counts = balance_layers(10, 4, embedding_weight=1, head_weight=2)
    assert sum(counts) == 10 and len(counts) == 4
    # the last stage carries the head, so it gets fewer blocks than a middle stage
    assert counts[-1] < max(counts[1:-1])
    assert balance_layers(4, 4) == [1, 1, 1, 1]
    with pytest.raises(ValueError):
        balance_layers(3, 4)
