"""RewardModule and PreferenceDataModule: scores, Bradley-Terry loss and metrics, init from SFT, bad pairs."""

from __future__ import annotations

import json
import logging

import lightning.pytorch as pl
import pytest
import torch
import torch.nn.functional as F

from lmlab.data.posttrain.chat import IGNORE_INDEX
from lmlab.data.posttrain.datamodules import PreferenceDataModule, VerifiableData, load_posttrain_tokenizer
from lmlab.errors import ConfigError
from lmlab.models import TransformerConfig, left_pad
from lmlab.modules.optim import OptimizerConfig, ScheduleConfig, TrainingSettings
from lmlab.modules.reward import RewardModule, score_sequences
from lmlab.modules.sft import SFTModule
from helpers import make_trainer


pytestmark = pytest.mark.usefixtures("single_thread")


@pytest.fixture(scope="module")
def tok():
    return load_posttrain_tokenizer("char")


def tiny_config(tok) -> TransformerConfig:
    return TransformerConfig(vocab_size=len(tok), d_model=32, n_layers=2, n_heads=2, max_seq_len=64, pad_vocab_to=8)


def pref_dm(**kw) -> PreferenceDataModule:
    args = dict(verifiable=VerifiableData(n=128, val_n=32, max_digits=2), max_length=32, batch_size=16)
    args.update(kw)
    return PreferenceDataModule("char", **args)


def test_sides_end_at_the_reply_end_token(tok):
    dm = pref_dm()
    dm.setup()
    end = tok.convert_tokens_to_ids("<|end|>")
    for ex in dm.train_examples[:20]:
        for side in ("chosen", "rejected"):
            ids, labels = ex[f"{side}_input_ids"], ex[f"{side}_labels"]
            assert ids[-1] == end and labels[-1] == end  # no trailing "\n": scored where generation stops
        assert ex["chosen_input_ids"] != ex["rejected_input_ids"]


def test_loss_and_metrics_on_a_tiny_batch(tok):
    dm = pref_dm()
    dm.setup()
    batch = next(iter(dm.train_dataloader()))
    torch.manual_seed(0)
    module = RewardModule(tiny_config(tok), margin=0.5, center_coef=0.01)
    r_c, r_r = module.pair_scores(batch)
    # by hand: the head's output at each row's last real token
    for side, got in (("chosen", r_c), ("rejected", r_r)):
        ids, mask = batch[f"{side}_input_ids"], batch[f"{side}_attention_mask"]
        values = module.model(ids)
        last = mask.sum(1) - 1
        assert torch.allclose(got, values[torch.arange(len(ids)), last], atol=1e-6)
    loss, metrics = module._loss(r_c, r_r)
    expected = -F.logsigmoid(r_c - r_r - 0.5).mean() + 0.01 * ((r_c + r_r) ** 2).mean()
    assert torch.allclose(loss, expected, atol=1e-6)
    assert float(metrics["accuracy"]) == pytest.approx(float((r_c > r_r).float().mean()))
    assert float(metrics["margin_mean"]) == pytest.approx(float((r_c - r_r).mean()), abs=1e-6)
    both = torch.cat([r_c, r_r])
    assert float(metrics["reward_min"]) == pytest.approx(float(both.min()))
    assert float(metrics["reward_max"]) == pytest.approx(float(both.max()))


def test_score_is_the_same_for_left_and_right_padding(tok):
    torch.manual_seed(0)
    module = RewardModule(tiny_config(tok)).eval()
    rows = [tok("<|bos|>12+3=15<|end|>", add_special_tokens=False)["input_ids"],
            tok("<|bos|>1+1=2<|end|>", add_special_tokens=False)["input_ids"]]
    left, lmask = left_pad(rows, tok.pad_token_id)
    width = left.shape[1]
    right = torch.full_like(left, tok.pad_token_id)
    rmask = torch.zeros_like(lmask)
    for i, r in enumerate(rows):
        right[i, : len(r)] = torch.tensor(r)
        rmask[i, : len(r)] = 1
    with torch.no_grad():
        a = score_sequences(module.model, right, rmask)
        b = score_sequences(module.model, left, lmask)
    assert width == max(len(r) for r in rows)
    assert torch.allclose(a, b, atol=1e-5)


def test_init_from_sft_loads_backbone_and_training_raises_accuracy(tok, tmp_path):
    pl.seed_everything(0)
    sft = SFTModule(tiny_config(tok))
    t = make_trainer(tmp_path, 1)
    t.strategy.connect(sft)
    ckpt = tmp_path / "sft.ckpt"
    t.save_checkpoint(ckpt)
    module = RewardModule(init_from=str(ckpt), settings=TrainingSettings(optimizer=OptimizerConfig(lr=3e-3, weight_decay=0.0),
                                                    schedule=ScheduleConfig(name="constant", warmup_steps=0)))
    for name, p in sft.model.backbone.state_dict().items():
        assert torch.equal(module.model.backbone.state_dict()[name], p), name
    assert float(module.model.score.weight.abs().sum()) > 0  # a fresh (non-zero) head
    # a small set of reversal pairs, learnt within a few dozen steps
    dm = pref_dm(verifiable=VerifiableData(task="reversal", n=64, val_n=0, max_len=4))
    dm.setup()
    everything = dm._collate()(dm.train_examples)

    def accuracy() -> float:
        module.eval()
        with torch.no_grad():
            r_c, r_r = module.pair_scores(everything)
        module.train()
        return float((r_c > r_r).float().mean())

    before = accuracy()
    trainer = make_trainer(tmp_path, 60)
    trainer.fit(module, datamodule=dm)
    after = accuracy()
    assert after >= 0.8 and after > before + 0.2, (before, after)
    m = trainer.callback_metrics
    for key in ("train/loss", "train/accuracy", "train/margin", "train/reward_mean", "train/reward_min", "train/reward_max"):
        assert key in m and torch.isfinite(torch.as_tensor(m[key])), key


def test_identical_pairs_are_skipped_and_all_bad_data_is_an_error(tmp_path, caplog):
    rows = [
        {"prompt": "1+1=", "chosen": "2", "rejected": "3"},
        {"prompt": "2+2=", "chosen": "4", "rejected": "4"},  # identical
        {"prompt": "3+3=", "chosen": "6", "rejected": ""},  # empty response
    ]
    path = tmp_path / "pairs.jsonl"
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    dm = PreferenceDataModule("char", source=str(path), max_length=32, batch_size=2)
    with caplog.at_level(logging.WARNING):
        dm.setup()
    assert len(dm.train_examples) == 1
    assert "identical_pair" in caplog.text and "empty_response" in caplog.text
    only_bad = tmp_path / "bad.jsonl"
    only_bad.write_text(json.dumps(rows[1]) + "\n")
    with pytest.raises(ConfigError, match="no usable"):
        PreferenceDataModule("char", source=str(only_bad), max_length=32).setup()
    long_prompt = tmp_path / "long.jsonl"
    long_prompt.write_text(json.dumps({"prompt": "9" * 100 + "+1=", "chosen": "1", "rejected": "2"}) + "\n")
    with pytest.raises(ConfigError):
        PreferenceDataModule("char", source=str(long_prompt), max_length=32).setup()
    with pytest.raises(ConfigError, match="center_coef"):
        RewardModule(TransformerConfig(vocab_size=96, d_model=32, n_layers=1, n_heads=2), center_coef=-1.0)


def test_labels_of_both_sides_cover_only_the_reply(tok):
    dm = pref_dm()
    dm.setup()
    batch = next(iter(dm.train_dataloader()))
    for side in ("chosen", "rejected"):
        labels, mask = batch[f"{side}_labels"], batch[f"{side}_attention_mask"]
        assert bool((labels[mask == 0] == IGNORE_INDEX).all())
        text = tok.decode(labels[0][labels[0] != IGNORE_INDEX].tolist())
        assert text.endswith("<|end|>") and text[:-7].isdigit()
