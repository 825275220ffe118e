"""The stage template: micro-batch splitting, summing outputs, and the declared DataModule contract."""

from __future__ import annotations

import pytest
import torch

from lmlab.data.posttrain.datamodules import PromptDataModule, SFTDataModule, VerifiableData
from lmlab.errors import ConfigError
from lmlab.models import TransformerConfig
from lmlab.modules.base import add_up, split_batch
from lmlab.modules.data_contract import PromptData, SequenceData, missing, provides
from lmlab.modules.sft import SFTModule


def test_split_batch_splits_rows_and_keeps_the_rest():
    batch = {"tokens": torch.arange(10).view(5, 2), "step": 3, "texts": list("abcde"), "scale": torch.tensor(2.0)}
    chunks = split_batch(batch, 2)
    assert [c["tokens"].shape[0] for c in chunks] == [2, 2, 1]
    assert torch.equal(torch.cat([c["tokens"] for c in chunks]), batch["tokens"])
    assert [c["texts"] for c in chunks] == [["a", "b"], ["c", "d"], ["e"]]
    assert all(c["step"] == 3 and c["scale"] is batch["scale"] for c in chunks)
    assert split_batch(batch, None) == [batch] and split_batch(batch, 5) == [batch]


def test_add_up_sums_in_micro_batch_order():
    outs = [{"a": torch.tensor(1.0), "b": 2.0}, {"a": torch.tensor(3.0), "b": 0.5}]
    total = add_up(outs)
    assert float(total["a"]) == 4.0 and total["b"] == 2.5
    assert outs[0]["b"] == 2.0  # inputs untouched


def test_the_contract_is_checked_without_evaluating_properties():
    data = VerifiableData(n=8, val_n=4, max_digits=2)
    sft, prompts = SFTDataModule("char", verifiable=data), PromptDataModule("char", verifiable=data)
    assert provides(sft, SequenceData) and missing(sft, PromptData) == ["longest_prompt"]
    assert provides(prompts, PromptData) and missing(prompts, SequenceData) == ["seq_len"]
    module = SFTModule(TransformerConfig(vocab_size=128, d_model=32, n_layers=1, n_heads=2, max_seq_len=64))
    with pytest.raises(ConfigError) as err:
        module.attach_data(prompts)
    assert err.value.field == "data" and "PromptDataModule lacks seq_len" in str(err.value)
