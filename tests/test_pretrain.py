"""PretrainModule with the Trainer: learning, exact resume, ramp accounting, bad input."""

from __future__ import annotations

import math

import lightning.pytorch as pl
import pytest
import torch

from helpers import LossRecorder, make_trainer, small_pretrain_dm, write_corpus
from lmlab.errors import ConfigError
from lmlab.models import CausalLM, TransformerConfig
from lmlab.models.checkpoint import open_checkpoint
from lmlab.modules import OptimizerConfig, PretrainModule, ScheduleConfig, TrainingSettings


@pytest.fixture(scope="module")
def workdir(tmp_path_factory):
    root = tmp_path_factory.mktemp("pretrain")
    write_corpus(root / "corpus")
    return root


def make_module(**kw):
    cfg = TransformerConfig(vocab_size=320, d_model=32, n_layers=2, n_heads=4, max_seq_len=64, **kw.pop("config", {}))
    return PretrainModule(
        cfg,
        settings=TrainingSettings(optimizer=OptimizerConfig(lr=3e-3),
                                  schedule=ScheduleConfig(name="cosine", warmup_steps=3, total_steps=kw.pop("total_steps", None))),
        **kw,
    )


def test_loss_falls_and_validation_reports_per_source(workdir, tmp_path):
    pl.seed_everything(0)
    rec = LossRecorder()
    module = make_module()
    trainer = make_trainer(tmp_path, 60, [rec], limit_val_batches=None, val_check_interval=30, check_val_every_n_epoch=None)
    trainer.fit(module, datamodule=small_pretrain_dm(workdir))
    losses = [rec.losses[s] for s in sorted(rec.losses)]
    assert len(losses) == 60
    first, last = sum(losses[:5]) / 5, sum(losses[-5:]) / 5
    assert last < first - 1.0, (first, last)
    m = trainer.callback_metrics
    for name in ("web", "books", "code"):
        assert f"val/{name}/loss" in m and f"val/{name}/bpb" in m
    assert float(m["val/ppl"]) == pytest.approx(float(torch.exp(m["val/loss"])), rel=1e-4)
    assert 0 < float(m["val/bpb"]) < 8
    assert float(m["train/tokens_seen"]) == 60 * 8 * 32
    assert len(module.val_history) == 2 and module.val_history[1]["val/loss"] < module.val_history[0]["val/loss"]


def test_resume_reproduces_the_uninterrupted_loss_curve(workdir, tmp_path):
    steps, cut = 10, 4
    pl.seed_everything(1)
    full = LossRecorder()
    make_trainer(tmp_path / "a", steps, [full]).fit(make_module(), datamodule=small_pretrain_dm(workdir))

    pl.seed_everything(1)
    first = LossRecorder(stop_at=cut)
    t1 = make_trainer(tmp_path / "b", steps, [first])
    t1.fit(make_module(), datamodule=small_pretrain_dm(workdir))
    ckpt = tmp_path / "cut.ckpt"
    t1.save_checkpoint(ckpt)
    assert sorted(first.losses) == list(range(cut))

    # the checkpoint loads without unpickling arbitrary objects
    torch.load(ckpt, weights_only=True)

    pl.seed_everything(999)  # a different seed must not matter: state comes from the checkpoint
    second = LossRecorder()
    make_trainer(tmp_path / "c", steps, [second]).fit(make_module(), datamodule=small_pretrain_dm(workdir), ckpt_path=str(ckpt))
    assert sorted(second.losses) == list(range(cut, steps))
    for s in range(cut, steps):
        assert abs(second.losses[s] - full.losses[s]) <= 1e-6, (s, second.losses[s], full.losses[s])


def test_checkpoint_weights_reload_into_a_fresh_model(workdir, tmp_path):
    pl.seed_everything(2)
    module = make_module()
    trainer = make_trainer(tmp_path, 3)
    trainer.fit(module, datamodule=small_pretrain_dm(workdir))
    ckpt = tmp_path / "m.ckpt"
    trainer.save_checkpoint(ckpt)
    source = open_checkpoint(ckpt)
    cfg, state = source.config.to_dict(), source.weights
    model = CausalLM(TransformerConfig.from_dict(cfg))
    model.load_state_dict(state)
    x = torch.randint(0, 320, (2, 16))
    module.model.eval()
    torch.testing.assert_close(model.eval()(x), module.model(x))
    # and a new module can start from it
    follow = make_module(init_from=str(ckpt))
    torch.testing.assert_close(follow.model.eval()(x), module.model(x))


def test_batch_ramp_grows_accumulation_and_counts_tokens(workdir, tmp_path):
    pl.seed_everything(3)
    rec = LossRecorder()
    module = make_module()
    dm = small_pretrain_dm(workdir, batch_size=4, micro_batch_size=4, batch_ramp_interval=2, batch_ramp_cap=16)
    sizes = []

    class Sizes(pl.Callback):
        def on_train_batch_start(self, trainer, pl_module, batch, batch_idx):
            sizes.append(batch["tokens"].shape[0])

    trainer = make_trainer(tmp_path, 7, [rec, Sizes()])
    trainer.fit(module, datamodule=dm)
    assert sizes == [4, 4, 8, 8, 16, 16, 16]
    assert module.tokens_seen == sum(sizes) * 32
    assert trainer.global_step == 7  # one optimizer step per global batch, whatever its size
    lrs = module.lr_schedulers().get_last_lr()
    assert lrs[0] == pytest.approx(3e-3 * module.lr_schedulers().lr_lambdas[0](7))


def test_vocab_and_length_mismatches_fail_before_training(workdir, tmp_path):
    small_vocab = PretrainModule(TransformerConfig(vocab_size=100, d_model=32, n_layers=1, n_heads=4, max_seq_len=64))
    with pytest.raises(ConfigError, match="vocab_size"):
        make_trainer(tmp_path, 1).fit(small_vocab, datamodule=small_pretrain_dm(workdir))
    short = PretrainModule(TransformerConfig(vocab_size=320, d_model=32, n_layers=1, n_heads=4, max_seq_len=16))
    with pytest.raises(ConfigError, match="seq_len"):
        make_trainer(tmp_path, 1).fit(short, datamodule=small_pretrain_dm(workdir))


def test_document_masking_trains(workdir, tmp_path):
    pl.seed_everything(4)
    rec = LossRecorder()
    module = make_module(config={"cross_document_attention": False})
    make_trainer(tmp_path, 20, [rec]).fit(module, datamodule=small_pretrain_dm(workdir))
    losses = [rec.losses[s] for s in sorted(rec.losses)]
    assert losses[-1] < losses[0]


def test_validate_test_and_predict_verbs_use_the_validation_windows(workdir, tmp_path):
    pl.seed_everything(5)
    module = make_module()
    dm = small_pretrain_dm(workdir)
    trainer = make_trainer(tmp_path, 2, limit_val_batches=None)
    trainer.fit(module, datamodule=dm)
    val = trainer.validate(module, datamodule=dm, verbose=False)[0]
    test = trainer.test(module, datamodule=dm, verbose=False)[0]
    assert val["val/loss"] == pytest.approx(test["val/loss"])
    preds = trainer.predict(module, datamodule=dm)
    flat = [p for loader in preds for p in loader]
    nll = torch.cat([p["nll"] for p in flat])
    # the mean of per-window means equals the token-weighted validation loss (all windows have equal length)
    assert float(nll.mean()) == pytest.approx(val["val/loss"], rel=1e-5)
    assert all(torch.isfinite(p["bpb"]).all() for p in flat)


class _PoisonWeights(pl.Callback):
    """Fill one weight with NaN at a given step: a deterministic blow-up.

    ``when="start"``: before the step's forward (the loss turns NaN);
    ``when="end"``: right after the step's update, as a diverging update does,
    before a checkpoint due at that step is written.
    """

    def __init__(self, at_step: int, when: str):
        self.at_step, self.when = at_step, when

    def _poison(self, trainer, pl_module):
        if trainer.global_step == self.at_step:
            with torch.no_grad():
                next(pl_module.model.parameters()).fill_(float("nan"))

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx):
        if self.when == "start":
            self._poison(trainer, pl_module)

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
        if self.when == "end":
            self._poison(trainer, pl_module)


@pytest.mark.parametrize(
    "when, message",
    [
        ("start", "pretrain: non-finite loss at step 5; training stopped before the optimizer step, so no checkpoint "
                  "holds corrupt weights (lower the learning rate or check the data)"),
        ("end", "non-finite model weights at step 4; no checkpoint written (lower the learning rate)"),
    ],
)
def test_a_nan_stop_leaves_every_checkpoint_loadable_and_resumable(workdir, tmp_path, when, message):
    from lightning.pytorch.callbacks import ModelCheckpoint

    ckpts = tmp_path / "ckpt"
    saver = ModelCheckpoint(dirpath=ckpts, every_n_train_steps=2, save_top_k=-1, save_last=True)
    pl.seed_everything(3)
    rec = LossRecorder()
    # the poison runs before the checkpoint callback of the same step
    poison = _PoisonWeights(at_step=5 if when == "start" else 4, when=when)
    trainer = make_trainer(tmp_path / "run", 10, [rec, poison, saver], enable_checkpointing=True)
    with pytest.raises(FloatingPointError) as e:
        trainer.fit(make_module(), datamodule=small_pretrain_dm(workdir))
    assert str(e.value) == message
    assert sorted(rec.losses) == [0, 1, 2, 3, 4][: 5 if when == "start" else 4]
    files = sorted(p.name for p in ckpts.glob("*.ckpt"))
    assert files == (["epoch=0-step=2.ckpt", "epoch=0-step=4.ckpt", "last.ckpt"] if when == "start" else ["epoch=0-step=2.ckpt", "last.ckpt"])
    assert not [p for p in ckpts.iterdir() if not p.name.endswith(".ckpt")]  # no half-written temp files
    x = torch.randint(0, 320, (2, 16))
    for name in files:
        ck = torch.load(ckpts / name, weights_only=True)
        assert all(bool(torch.isfinite(v).all()) for v in ck["state_dict"].values() if v.is_floating_point()), name
        assert bool(torch.isfinite(make_module(init_from=str(ckpts / name)).model.eval()(x)).all())
    # the last checkpoint resumes to the end with finite losses
    last_step = torch.load(ckpts / "last.ckpt", weights_only=True)["global_step"]
    assert last_step == (4 if when == "start" else 2)
    pl.seed_everything(3)
    after = LossRecorder()
    make_trainer(tmp_path / "resumed", 10, [after]).fit(make_module(), datamodule=small_pretrain_dm(workdir), ckpt_path=str(ckpts / "last.ckpt"))
    assert sorted(after.losses) == list(range(last_step, 10))
    assert all(math.isfinite(v) for v in after.losses.values())
    assert after.losses[last_step] == pytest.approx(rec.losses[last_step], abs=1e-6)  # same state, same step
