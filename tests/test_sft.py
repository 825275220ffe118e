"""SFTModule and SFTDataModule: response-only loss, packing equivalence, learning, bad input."""

from __future__ import annotations

import json
import logging

import lightning.pytorch as pl
import pytest
import torch

from lmlab.data.posttrain.chat import IGNORE_INDEX
from lmlab.data.posttrain.records import collate_sft, pack_sft
from lmlab.data.posttrain.datamodules import SFTDataModule, VerifiableData, load_posttrain_tokenizer, tokenizer_info
from lmlab.errors import ConfigError
from lmlab.models import TransformerConfig
from lmlab.modules.optim import OptimizerConfig, ScheduleConfig, TrainingSettings
from lmlab.modules.pretrain import PretrainModule
from lmlab.modules.sft import SFTModule, sft_token_stats
from helpers import make_trainer


pytestmark = pytest.mark.usefixtures("single_thread")


@pytest.fixture(scope="module")
def tok():
    return load_posttrain_tokenizer("char")


def tiny_config(tok, **kw) -> TransformerConfig:
    return TransformerConfig(vocab_size=len(tok), d_model=32, n_layers=2, n_heads=2, max_seq_len=64, pad_vocab_to=8, **kw)


def verifiable_dm(**kw) -> SFTDataModule:
    args = dict(verifiable=VerifiableData(n=256, val_n=32, max_digits=2), max_length=32, batch_size=32)
    args.update(kw)
    return SFTDataModule("char", **args)


def test_labels_mask_prompt_and_padding_and_loss_ignores_them(tok):
    dm = verifiable_dm()
    dm.setup()
    batch = next(iter(dm.train_dataloader()))
    ids, labels, mask = batch["input_ids"], batch["labels"], batch["attention_mask"]
    assert bool((labels[mask == 0] == IGNORE_INDEX).all())  # padding
    kept = labels != IGNORE_INDEX
    assert bool((labels[kept] == ids[kept]).all())
    # the trained text of a row is exactly its answer and <|end|>
    row_text = tok.decode(labels[0][kept[0]].tolist())
    prompt_text = tok.decode(ids[0][mask[0].bool()].tolist())
    a, b = prompt_text.split("<|user|>\n")[1].split("=")[0].split("+")
    assert row_text == f"{int(a) + int(b)}<|end|>"

    torch.manual_seed(0)
    module = SFTModule(tiny_config(tok))
    logits = module.model(ids).detach().requires_grad_(True)
    nll, correct, n = sft_token_stats(logits, labels, module.config.vocab_size)
    assert int(n) == int(kept[:, 1:].sum())
    nll.backward()
    # the gradient reaches exactly the positions that predict a response token
    predicts_target = torch.zeros_like(kept)
    predicts_target[:, :-1] = kept[:, 1:]
    grad_rows = logits.grad.abs().sum(-1) > 0
    assert torch.equal(grad_rows, predicts_target)
    # and equals a hand computation
    lp = torch.log_softmax(logits.detach()[:, :-1, : len(tok)].float(), -1)
    by_hand = -sum(lp[i, t, labels[i, t + 1]] for i, t in zip(*torch.nonzero(kept[:, 1:], as_tuple=True)))
    assert abs(float(nll.detach()) - float(by_hand)) < 1e-3


def test_packed_loss_equals_unpacked_loss(tok):
    dm = verifiable_dm()
    dm.setup()
    examples = dm.train_examples[:12]
    torch.manual_seed(1)
    module = SFTModule(tiny_config(tok)).eval()
    padded = collate_sft(examples, dm.pad_id)
    packed = pack_sft(examples, max_length=64, pad_id=dm.pad_id)
    assert packed["input_ids"].shape[0] < len(examples)  # several examples share a row
    with torch.no_grad():
        a = module.batch_loss(padded)
        b = module.batch_loss(packed)
    assert int(a[2]) == int(b[2])  # same number of response tokens
    assert abs(float(a[0]) - float(b[0])) < 1e-4 * float(a[0])
    assert int(a[1]) == int(b[1])


def test_sft_learns_and_logs_metrics(tok, tmp_path):
    pl.seed_everything(0)
    dm = verifiable_dm(packing=True, max_length=64)
    module = SFTModule(tiny_config(tok), settings=TrainingSettings(optimizer=OptimizerConfig(lr=3e-3, weight_decay=0.0),
                                                 schedule=ScheduleConfig(name="constant", warmup_steps=5)))
    trainer = make_trainer(tmp_path, 60, limit_val_batches=None, val_check_interval=30, check_val_every_n_epoch=None)
    trainer.validate(module, datamodule=dm, verbose=False)  # the fresh model's numbers come first
    trainer.fit(module, datamodule=dm)
    m = trainer.callback_metrics
    for key in ("train/loss", "train/token_accuracy", "train/tokens", "val/loss", "val/token_accuracy"):
        assert key in m and torch.isfinite(torch.as_tensor(m[key])), key
    first, last = module.val_history[0], module.val_history[-1]
    assert first["step"] == 0 and len(module.val_history) == 3
    assert first["val/loss"] > 3.5  # about ln(vocab)
    assert last["val/loss"] < first["val/loss"] - 1.5, module.val_history
    assert last["val/token_accuracy"] > first["val/token_accuracy"] + 0.3
    assert float(m["train/tokens"]) > 0


def test_fully_masked_batch_is_skipped_not_nan(tok, tmp_path, caplog):
    torch.manual_seed(0)
    module = SFTModule(tiny_config(tok))
    trainer = make_trainer(tmp_path, 1)
    trainer.strategy.connect(module)
    before = [p.detach().clone() for p in module.parameters()]
    batch = {"input_ids": torch.ones(2, 8, dtype=torch.long), "labels": torch.full((2, 8), IGNORE_INDEX),
             "attention_mask": torch.ones(2, 8, dtype=torch.long)}
    with caplog.at_level(logging.WARNING):
        out = module.training_step(batch, 0)
    assert out is None and module.skipped_batches == 1
    assert "skipped a batch" in caplog.text
    assert all(torch.equal(a, b) for a, b in zip(before, module.parameters()))


def test_a_non_finite_micro_batch_loss_stops_before_the_optimizer_step(tok, tmp_path):
    torch.manual_seed(0)
    module = SFTModule(tiny_config(tok))
    before = [p.detach().clone() for p in module.parameters()]
    finite_loss = module.micro_batch_loss

    def second_micro_batch_nan(micro_batch, normaliser):
        loss, out = finite_loss(micro_batch, normaliser)
        calls.append(1)
        return (loss * float("nan") if len(calls) == 2 else loss), out

    calls: list[int] = []
    module.micro_batch_loss = second_micro_batch_nan
    with pytest.raises(FloatingPointError, match="sft: non-finite loss at step 0"):
        make_trainer(tmp_path, 1).fit(module, datamodule=verifiable_dm(micro_batch_size=8))
    assert len(calls) == 4  # every micro-batch ran its backward, then the step was refused
    assert all(torch.equal(a, b) for a, b in zip(before, module.parameters()))


def test_bad_records_are_counted_and_skipped(tmp_path, caplog):
    rows = [
        {"prompt": "1+1=", "completion": "2"},
        {"prompt": "2+2=", "completion": ""},  # empty response
        {"prompt": "9" * 200 + "+1=", "completion": "1"},  # prompt longer than the context
        {"prompt": "3+3=", "completion": "6"},
    ]
    path = tmp_path / "sft.jsonl"
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    dm = SFTDataModule("char", source=str(path), max_length=32, batch_size=2)
    with caplog.at_level(logging.WARNING):
        dm.setup()
    assert len(dm.train_examples) == 2
    assert "empty_response" in caplog.text and "no_target_after_truncation" in caplog.text
    bad = tmp_path / "bad.jsonl"
    bad.write_text(json.dumps({"prompt": "1+1=", "completion": ""}) + "\n")
    with pytest.raises(ConfigError):
        SFTDataModule("char", source=str(bad), max_length=32).setup()
    with pytest.raises(ConfigError, match="data.source"):
        SFTDataModule("char", max_length=32)


def test_config_comes_from_init_checkpoint_and_tokenizer_mismatch_is_refused(tok, tmp_path):
    torch.manual_seed(0)
    src = SFTModule(tiny_config(tok))
    trainer = make_trainer(tmp_path, 1)
    trainer.strategy.connect(src)
    src.tokenizer_info = {"vocab_size": len(tok), "fingerprint": "0123456789abcdef"}  # some other tokenizer
    ckpt = tmp_path / "src.ckpt"
    trainer.save_checkpoint(ckpt)
    module = SFTModule(init_from=str(ckpt))  # no config: taken from the checkpoint
    assert module.config.d_model == 32
    assert torch.equal(module.model.lm_head.weight, src.model.lm_head.weight)
    with pytest.raises(ConfigError, match="different tokenizer"):
        module.attach_data(verifiable_dm())
    with pytest.raises(ConfigError, match="model.config"):
        SFTModule()
    # a matching tokenizer record is accepted
    src.tokenizer_info = tokenizer_info(tok)
    trainer.save_checkpoint(ckpt)
    SFTModule(init_from=str(ckpt)).attach_data(verifiable_dm())


def test_a_pretrained_checkpoint_flows_into_sft(tok, tmp_path):
    torch.manual_seed(0)
    pre = PretrainModule(tiny_config(tok))
    trainer = make_trainer(tmp_path, 1)
    trainer.strategy.connect(pre)
    ckpt = tmp_path / "pretrain.ckpt"
    trainer.save_checkpoint(ckpt)
    module = SFTModule(init_from=str(ckpt))
    for name, value in pre.model.state_dict().items():
        assert torch.equal(module.model.state_dict()[name], value), name
    module.attach_data(verifiable_dm())  # no tokenizer record in a pretraining checkpoint: nothing to refuse
    assert module.tokenizer_info == tokenizer_info(tok)
