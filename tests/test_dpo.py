"""DPOModule: the loss equals the direct formula, implicit-reward accuracy rises, precomputed references agree."""

from __future__ import annotations

import warnings

import lightning.pytorch as pl
import pytest
import torch
import torch.nn.functional as F

from lmlab.data.posttrain.chat import IGNORE_INDEX
from lmlab.data.posttrain.datamodules import PreferenceDataModule, VerifiableData, load_posttrain_tokenizer
from lmlab.errors import ConfigError
from lmlab.models import TransformerConfig
from lmlab.modules.dpo import DPOModule
from lmlab.modules.optim import OptimizerConfig, ScheduleConfig
from lmlab.modules.sft import SFTModule
from helpers import make_trainer


pytestmark = pytest.mark.usefixtures("single_thread")


@pytest.fixture(scope="module")
def tok():
    return load_posttrain_tokenizer("char")


@pytest.fixture(scope="module")
def policy_ckpt(tok, tmp_path_factory):
    torch.manual_seed(0)
    cfg = TransformerConfig(vocab_size=len(tok), d_model=32, n_layers=2, n_heads=2, max_seq_len=64, pad_vocab_to=8)
    module = SFTModule(cfg)
    trainer = pl.Trainer(accelerator="cpu", logger=False, enable_progress_bar=False, enable_model_summary=False)
    trainer.strategy.connect(module)
    path = tmp_path_factory.mktemp("dpo") / "policy.ckpt"
    trainer.save_checkpoint(path)
    return str(path)


def pref_dm(**kw) -> PreferenceDataModule:
    args = dict(verifiable=VerifiableData(n=64, val_n=16, max_digits=2), max_length=32, batch_size=16)
    args.update(kw)
    return PreferenceDataModule("char", **args)


def summed_logps(model, ids, labels) -> torch.Tensor:
    # the padded vocabulary rows are not tokens: normalise over the real ones
    logp = torch.log_softmax(model(ids)[:, :-1, : model.config.vocab_size].float(), -1)
    out = []
    for i in range(ids.shape[0]):
        total = 0.0
        for t in range(ids.shape[1] - 1):
            if labels[i, t + 1] != IGNORE_INDEX:
                total = total + logp[i, t, labels[i, t + 1]]
        out.append(total)
    return torch.stack(out)


def test_dpo_loss_equals_the_direct_formula(policy_ckpt):
    dm = pref_dm()
    dm.setup()
    batch = next(iter(dm.train_dataloader()))
    module = DPOModule(init_from=policy_ckpt, beta=0.3)
    with torch.no_grad():  # move the policy away from the reference so the loss is not log 2
        for p in module.model.parameters():
            p.add_(0.05 * torch.randn_like(p))
        loss, metrics = module._loss(batch)
        pc = summed_logps(module.model, batch["chosen_input_ids"], batch["chosen_labels"])
        pr = summed_logps(module.model, batch["rejected_input_ids"], batch["rejected_labels"])
        rc = summed_logps(module.ref_model, batch["chosen_input_ids"], batch["chosen_labels"])
        rr = summed_logps(module.ref_model, batch["rejected_input_ids"], batch["rejected_labels"])
    expected = -F.logsigmoid(0.3 * ((pc - rc) - (pr - rr))).mean()
    assert abs(float(loss) - float(expected)) < 1e-5
    assert abs(float(loss) - 0.6931) > 1e-3
    assert float(metrics["rewards/chosen"]) == pytest.approx(float((0.3 * (pc - rc)).mean()), abs=1e-5)
    assert float(metrics["rewards/margins"]) == pytest.approx(float((0.3 * ((pc - rc) - (pr - rr))).mean()), abs=1e-5)
    assert float(metrics["rewards/accuracies"]) == pytest.approx(float(((pc - rc) > (pr - rr)).float().mean()))


def test_reward_accuracy_rises_with_training_and_precomputed_reference_matches(policy_ckpt, tmp_path):
    dm = pref_dm()
    dm.setup()
    module = DPOModule(init_from=policy_ckpt, beta=0.5)
    batch = dm._collate()(dm.train_examples)
    with torch.no_grad():
        _, before = module._loss(batch)
    # at the start the policy is the reference: every implicit reward is 0
    assert float(before["rewards/accuracies"]) == 0.0 and float(before["rewards/margins"]) == 0.0
    pl.seed_everything(0)
    module.settings.optimizer = OptimizerConfig(lr=3e-3, weight_decay=0.0)
    module.settings.schedule = ScheduleConfig(name="constant", warmup_steps=0)
    trainer = make_trainer(tmp_path, 20, limit_val_batches=None, val_check_interval=10, check_val_every_n_epoch=None)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        trainer.fit(module, datamodule=dm)
    # the frozen reference sits in eval mode by design: no Lightning warning about it on every run
    assert not [w for w in caught if "in eval mode" in str(w.message)], [str(w.message) for w in caught]
    with torch.no_grad():
        _, after = module._loss(batch)
    assert float(after["rewards/accuracies"]) >= 0.8
    assert float(after["rewards/margins"]) > 0.5
    for key in ("train/rewards/chosen", "train/rewards/rejected", "train/rewards/accuracies", "train/rewards/margins", "val/loss"):
        assert key in trainer.callback_metrics, key

    # precomputed reference log-probs give the same loss as the live reference
    pre = DPOModule(init_from=policy_ckpt, beta=0.5, precompute_reference=True)
    dm2 = pref_dm()
    trainer2 = make_trainer(tmp_path, 1)
    pl.seed_everything(0)
    trainer2.fit(pre, datamodule=dm2)
    assert pre.ref_model is None and "ref_chosen_logps" in dm2.train_examples[0]
    live = DPOModule(init_from=policy_ckpt, beta=0.5)
    batch2 = dm2._collate()(dm2.train_examples[:8])
    assert "ref_chosen_logps" in batch2
    with torch.no_grad():
        ref_c, ref_r = live.reference_logps({k: v for k, v in batch2.items() if not k.startswith("ref_")})
    assert torch.allclose(batch2["ref_chosen_logps"], ref_c, atol=1e-5)
    assert torch.allclose(batch2["ref_rejected_logps"], ref_r, atol=1e-5)


def test_precomputing_reference_logps_shows_progress_with_the_trainer_bar(policy_ckpt, tmp_path, capsys):
    pre = DPOModule(init_from=policy_ckpt, beta=0.5, precompute_reference=True)
    dm = pref_dm(val_batch_size=16)
    make_trainer(tmp_path, 1, enable_progress_bar=True).fit(pre, datamodule=dm)
    err = capsys.readouterr().err
    # 64 pairs less the validation split, 16 per batch; then the validation pairs
    n_train = -(-len(dm.train_examples) // 16)
    assert f"dpo: reference log-probs (train):   0%|          | 0/{n_train}" in err
    assert "dpo: reference log-probs (validation):   0%|          | 0/1" in err
    # and quiet without a trainer bar
    quiet = DPOModule(init_from=policy_ckpt, beta=0.5, precompute_reference=True)
    make_trainer(tmp_path / "q", 1).fit(quiet, datamodule=pref_dm())
    assert "reference log-probs" not in capsys.readouterr().err


def test_bad_settings(policy_ckpt):
    with pytest.raises(ConfigError, match="beta"):
        DPOModule(init_from=policy_ckpt, beta=0.0)
    with pytest.raises(ConfigError, match="label_smoothing"):
        DPOModule(init_from=policy_ckpt, label_smoothing=0.5)
