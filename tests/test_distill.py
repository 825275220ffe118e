"""DistillModule: divergence numerics, the top-k cache, tokenizer checks, exact resume and the checkpoint chain."""

from __future__ import annotations

import math
from pathlib import Path

import lightning.pytorch as pl
import numpy as np
import pytest
import torch
import yaml

from helpers import LossRecorder, corpus_sources, make_trainer, small_pretrain_dm, write_corpus
from lmlab.data import PretrainDataModule, TokenizerTrainConfig
from lmlab.errors import ConfigError
from lmlab.models import TransformerConfig
from lmlab.models.checkpoint import open_checkpoint
from lmlab.modules import DistillModule, OnPolicyConfig, OptimizerConfig, PretrainModule, ScheduleConfig, TrainingSettings
from lmlab.modules.distill import check_same_vocabulary
from lmlab.modules.distill_cache import TopKLogitCache, batch_key
from lmlab.modules.distill_losses import divergence, forward_kl, jsd, reverse_kl, topk_support

pytestmark = pytest.mark.usefixtures("single_thread")
REPO = Path(__file__).resolve().parents[1]


# -- an independent reference, in float64 numpy -------------------------------------------------
def _softmax(x: np.ndarray, t: float) -> np.ndarray:
    z = x / t
    z = z - z.max(-1, keepdims=True)
    e = np.exp(z)
    return e / e.sum(-1, keepdims=True)


def _kl(p: np.ndarray, q: np.ndarray) -> np.ndarray:
    return np.sum(p * (np.log(p) - np.log(q)), axis=-1)


def ref_divergence(student: np.ndarray, teacher: np.ndarray, kind: str, beta: float, t: float) -> np.ndarray:
    p, q = _softmax(teacher, t), _softmax(student, t)
    if kind == "forward_kl" or (kind == "jsd" and beta == 0):
        return _kl(p, q)
    if kind == "reverse_kl" or (kind == "jsd" and beta == 1):
        return _kl(q, p)
    m = beta * p + (1 - beta) * q
    return beta * _kl(p, m) + (1 - beta) * _kl(q, m)


@pytest.fixture
def logits():
    g = torch.Generator().manual_seed(0)
    return torch.randn(3, 5, 17, generator=g) * 3, torch.randn(3, 5, 17, generator=g) * 3


@pytest.mark.parametrize("temperature", [1.0, 2.0, 0.5])
@pytest.mark.parametrize("kind,beta", [("forward_kl", 0.5), ("reverse_kl", 0.5), ("jsd", 0.0), ("jsd", 0.5), ("jsd", 1.0), ("jsd", 0.3)])
def test_divergences_match_an_independent_reference(logits, kind, beta, temperature):
    s, t = logits
    want = ref_divergence(s.double().numpy(), t.double().numpy(), kind, beta, temperature)
    got = divergence(s.double(), t.double(), kind, beta, temperature)
    assert got.shape == (3, 5) and got.dtype == torch.float64
    np.testing.assert_allclose(got.numpy(), want, atol=1e-6, rtol=0)
    # float32 (what training uses) agrees to float32 precision
    np.testing.assert_allclose(divergence(s, t, kind, beta, temperature).double().numpy(), want, rtol=1e-5, atol=1e-6)


def test_jsd_limits_and_bounds(logits):
    s, t = logits
    # beta 0 and 1 are forward and reverse KL (as in TRL), and the generalized JSD tends to 0 near both ends
    assert torch.equal(jsd(s, t, 0.0), forward_kl(s, t)) and torch.equal(jsd(s, t, 1.0), reverse_kl(s, t))
    assert float(jsd(s, t, 1e-6).max()) < 1e-4 and float(jsd(s, t, 1 - 1e-6).max()) < 1e-4
    half = jsd(s, t, 0.5)
    assert float(half.min()) > 0 and float(half.max()) <= math.log(2) + 1e-7  # the symmetric JSD is bounded by ln 2
    np.testing.assert_allclose(half.numpy(), jsd(t, s, 0.5).numpy(), atol=1e-6)  # and symmetric
    assert float(divergence(s, s, "forward_kl").abs().max()) < 1e-6


def test_topk_divergence_renormalises_on_the_teacher_support(logits):
    s, t = logits
    values, indices = topk_support(t, 4)
    assert torch.equal(values, t.topk(4, dim=-1).values)
    got = divergence(s.double().gather(-1, indices), values.double(), "forward_kl", 0.5, 2.0)
    sn, tn = s.double().numpy(), t.double().numpy()
    idx = indices.numpy()
    want = ref_divergence(np.take_along_axis(sn, idx, -1), np.take_along_axis(tn, idx, -1), "forward_kl", 0.5, 2.0)
    np.testing.assert_allclose(got.double().numpy(), want, atol=1e-6, rtol=0)
    # keeping the whole vocabulary is the full divergence
    v, i = topk_support(t.double(), 17)
    np.testing.assert_allclose(divergence(s.double().gather(-1, i), v.double()).numpy(), divergence(s.double(), t.double()).numpy(), atol=1e-9)


def test_topk_cache_round_trip_and_refuses_another_teacher(tmp_path):
    cache = TopKLogitCache(tmp_path / "c", 4, {"path": "/t.ckpt"})
    ids = torch.randint(0, 50, (2, 6))
    values, indices = topk_support(torch.randn(2, 6, 50), 4)
    key = batch_key(ids)
    assert cache.get(key) is None
    cache.put(key, values, indices)
    got_v, got_i = cache.get(key)
    assert torch.equal(got_v, values) and torch.equal(got_i, indices) and got_i.dtype == torch.int64
    assert batch_key(ids.clone()) == key and batch_key(ids[:, :5]) != key
    assert sorted(p.name for p in (tmp_path / "c").iterdir()) == sorted(["cache.json", f"{key}.safetensors"])  # no temp files
    assert len(TopKLogitCache(tmp_path / "c", 4, {"path": "/t.ckpt"})) == 1
    with pytest.raises(ConfigError, match="model.teacher_cache: .*another teacher or top_k"):
        TopKLogitCache(tmp_path / "c", 8, {"path": "/t.ckpt"})
    with pytest.raises(ConfigError, match="another teacher"):
        TopKLogitCache(tmp_path / "c", 4, {"path": "/other.ckpt"})


# -- training ---------------------------------------------------------------------------------
VOCAB = 320


@pytest.fixture(scope="module")
def workdir(tmp_path_factory):
    """A corpus, its tokenizer and a small trained teacher checkpoint."""
    root = tmp_path_factory.mktemp("distill")
    write_corpus(root / "corpus")
    pl.seed_everything(0)
    teacher = PretrainModule(TransformerConfig(vocab_size=VOCAB, d_model=48, n_layers=2, n_heads=4, max_seq_len=64),
                             settings())
    trainer = make_trainer(root / "teacher", 25)
    trainer.fit(teacher, datamodule=small_pretrain_dm(root))
    trainer.save_checkpoint(root / "teacher.ckpt")
    return root


def settings() -> TrainingSettings:
    return TrainingSettings(optimizer=OptimizerConfig(lr=3e-3), schedule=ScheduleConfig(name="cosine", warmup_steps=3))


STUDENT = TransformerConfig(vocab_size=VOCAB, d_model=32, n_layers=1, n_heads=4, max_seq_len=64)


def make_student(workdir, **kw) -> DistillModule:
    args = dict(teacher=str(workdir / "teacher.ckpt"), alpha=0.5, temperature=2.0)
    args.update(kw)
    return DistillModule(args.pop("config", STUDENT), settings(), **args)


def losses_of(workdir, tmp_path, steps: int, seed: int = 1, **kw) -> tuple[list[float], DistillModule]:
    pl.seed_everything(seed)
    rec = LossRecorder()
    module = make_student(workdir, **kw)
    make_trainer(tmp_path, steps, [rec]).fit(module, datamodule=small_pretrain_dm(workdir))
    return [rec.losses[s] for s in sorted(rec.losses)], module


def test_alpha_one_is_pretraining_step_for_step(workdir, tmp_path):
    distilled, _ = losses_of(workdir, tmp_path / "d", 6, alpha=1.0)
    pl.seed_everything(1)
    rec = LossRecorder()
    make_trainer(tmp_path / "p", 6, [rec]).fit(PretrainModule(STUDENT, settings()), datamodule=small_pretrain_dm(workdir))
    assert distilled == [rec.losses[s] for s in range(6)]


def test_distillation_pulls_the_student_towards_the_teacher(workdir, tmp_path):
    pl.seed_everything(1)
    module = make_student(workdir, alpha=0.0, temperature=1.0)
    divs = []

    class Div(pl.Callback):
        def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
            divs.append(float(trainer.callback_metrics["train/divergence"]))

    trainer = make_trainer(tmp_path, 30, [Div()], log_every_n_steps=1)  # metrics are logged on logging steps
    trainer.fit(module, datamodule=small_pretrain_dm(workdir))
    # alpha = 0: the loss is T^2 * KL(teacher || student) alone
    assert float(trainer.callback_metrics["train/loss"]) == pytest.approx(divs[-1], rel=1e-6)
    assert sum(divs[-5:]) / 5 < 0.5 * sum(divs[:5]) / 5, divs
    assert module._teacher and not any(p.requires_grad for p in module._teacher[0].parameters())
    assert not module._teacher[0].training


def test_the_cached_topk_loss_equals_the_on_the_fly_topk_loss(workdir, tmp_path):
    fly, _ = losses_of(workdir, tmp_path / "a", 5, top_k=8)
    full, _ = losses_of(workdir, tmp_path / "b", 5, top_k=0)
    assert fly != full  # top-k is an approximation of the full divergence
    written, m1 = losses_of(workdir, tmp_path / "c", 5, top_k=8, teacher_cache=str(tmp_path / "cache"))
    assert len(m1.cache) == 5 and m1._cache_hits == 0
    read, m2 = losses_of(workdir, tmp_path / "d", 5, top_k=8, teacher_cache=str(tmp_path / "cache"))
    assert m2._cache_hits == 5 and not m2._teacher  # every step from disk: the teacher was never built
    assert fly == written == read


def test_exact_resume_with_on_policy_sampling(workdir, tmp_path):
    steps, cut = 8, 3
    kw = dict(divergence="jsd", beta=0.5, on_policy=OnPolicyConfig(lmbda=0.5, prompt_tokens=16, max_new_tokens=8))
    full, module = losses_of(workdir, tmp_path / "a", steps, **kw)
    on = [module.on_policy_step(s) for s in range(steps)]
    assert any(on) and not all(on)  # both kinds of step are exercised

    pl.seed_everything(1)
    first = LossRecorder(stop_at=cut)
    t1 = make_trainer(tmp_path / "b", steps, [first])
    t1.fit(make_student(workdir, **kw), datamodule=small_pretrain_dm(workdir))
    ckpt = tmp_path / "cut.ckpt"
    t1.save_checkpoint(ckpt)
    saved = torch.load(ckpt, weights_only=True)
    assert all(k.startswith("model.") for k in saved["state_dict"])  # no teacher weights in the student's checkpoint
    assert saved["lmlab"]["stage"] == "distill" and saved["lmlab"]["teacher"] == str(workdir / "teacher.ckpt")

    pl.seed_everything(999)
    second = LossRecorder()
    make_trainer(tmp_path / "c", steps, [second]).fit(make_student(workdir, **kw), datamodule=small_pretrain_dm(workdir), ckpt_path=str(ckpt))
    assert [second.losses[s] for s in range(cut, steps)] == full[cut:]


def test_on_policy_samples_continue_the_prompt(workdir):
    pl.seed_everything(1)
    module = make_student(workdir, on_policy=OnPolicyConfig(lmbda=1.0, prompt_tokens=10, max_new_tokens=6))
    tokens = torch.randint(0, VOCAB, (2, 33))
    out = module.sample_continuations({"tokens": tokens, "step": 0}, step=4)
    seq, mask = out["policy_ids"], out["policy_mask"]
    assert seq.shape == (2, 16) and torch.equal(seq[:, :10], tokens[:, :10])
    assert mask.shape == (2, 15) and float(mask[:, :9].sum()) == 0 and float(mask[:, 9:].sum()) == 12
    again = module.sample_continuations({"tokens": tokens, "step": 0}, step=4)["policy_ids"]
    assert torch.equal(seq, again)  # fixed by (seed, step)
    assert module.on_policy_step(0) and module.on_policy_step(17)


def test_the_distilled_checkpoint_opens_and_chains_on(workdir, tmp_path):
    pl.seed_everything(3)
    module = make_student(workdir)
    trainer = make_trainer(tmp_path, 3)
    trainer.fit(module, datamodule=small_pretrain_dm(workdir))
    trainer.save_checkpoint(tmp_path / "student.ckpt")
    ckpt = open_checkpoint(tmp_path / "student.ckpt")
    assert ckpt.stage == "distill" and ckpt.config.d_model == STUDENT.d_model and ckpt.has_tokenizer()
    x = torch.randint(0, VOCAB, (1, 12))
    with torch.no_grad():
        assert torch.equal(ckpt.causal_lm()(x), module.model.eval()(x))
    # on into pretraining, and into another distillation with the shape taken from the checkpoint
    chained = PretrainModule(STUDENT, settings(), init_from=str(tmp_path / "student.ckpt"))
    again = DistillModule(None, settings(), init_from=str(tmp_path / "student.ckpt"), teacher=str(workdir / "teacher.ckpt"))
    for m in (chained, again):
        assert all(torch.equal(a, b) for a, b in zip(m.model.state_dict().values(), module.model.state_dict().values()))
    make_trainer(tmp_path / "more", 2).fit(again, datamodule=small_pretrain_dm(workdir))
    assert again.global_step == 2


def test_a_teacher_with_another_vocabulary_is_a_one_line_error(workdir, tmp_path):
    other = tmp_path / "other"
    write_corpus(other / "corpus", seed=5)
    dm_other = PretrainDataModule(sources=corpus_sources(other / "corpus")[:1], tokenizer=str(other / "tok"),
                                  tokenizer_train=TokenizerTrainConfig(vocab_size=300, sample_chars=50_000), seq_len=32,
                                  batch_size=8, cache_dir=str(other / "cache"))
    dm_other.prepare_data()
    with pytest.raises(ConfigError) as e:
        make_trainer(tmp_path, 2).fit(make_student(workdir), datamodule=dm_other)
    msg = str(e.value)
    assert e.value.field == "model.teacher" and "\n" not in msg
    assert "has 320 tokens, the data's 300" in msg and "data.tokenizer" in msg

    # same size, different tokens: the vocabularies are compared, not their sizes
    ours = small_pretrain_dm(workdir)
    ours.prepare_data()
    vocab = dict(ours.tokenizer.get_vocab())

    class Swapped:
        def get_vocab(self):
            a, b = sorted(vocab, key=vocab.get)[100:102]
            return {**vocab, a: vocab[b], b: vocab[a]}

    with pytest.raises(ConfigError, match=r"model.teacher: .*id 100 is .* for the teacher and .* for the data"):
        check_same_vocabulary(ours.tokenizer, Swapped())
    check_same_vocabulary(ours.tokenizer, ours.tokenizer)


@pytest.mark.parametrize("kw,field", [
    (dict(teacher=None), "model.teacher"),
    (dict(teacher="/no/such/teacher.ckpt"), "model.teacher"),
    (dict(alpha=1.5), "model.alpha"),
    (dict(alpha=-0.1), "model.alpha"),
    (dict(temperature=0.0), "model.temperature"),
    (dict(temperature=float("inf")), "model.temperature"),
    (dict(beta=2.0), "model.beta"),
    (dict(top_k=-1), "model.top_k"),
    (dict(teacher_cache="/tmp/x"), "model.teacher_cache"),
    (dict(on_policy=OnPolicyConfig(lmbda=1.5)), "model.on_policy.lmbda"),
])
def test_bad_settings_are_one_line_errors(workdir, kw, field):
    with pytest.raises(ConfigError) as e:
        make_student(workdir, **kw)
    assert e.value.field == field and "\n" not in str(e.value) and e.value.fix


def test_distillation_on_sft_data(tmp_path):
    from lmlab.data.posttrain.datamodules import SFTDataModule, VerifiableData
    from lmlab.modules.sft import SFTModule

    def dm():
        return SFTDataModule("char", verifiable=VerifiableData(n=128, val_n=16, max_digits=2), max_length=32, batch_size=16)

    pl.seed_everything(0)
    teacher = SFTModule(TransformerConfig(vocab_size=len(dm().tokenizer), d_model=48, n_layers=2, n_heads=2, max_seq_len=64,
                                          pad_vocab_to=64))
    trainer = make_trainer(tmp_path / "t", 20)
    trainer.fit(teacher, datamodule=dm())
    trainer.save_checkpoint(tmp_path / "teacher.ckpt")
    student_cfg = TransformerConfig(vocab_size=teacher.config.vocab_size, d_model=32, n_layers=1, n_heads=2, max_seq_len=64,
                                    pad_vocab_to=64)
    pl.seed_everything(1)
    module = DistillModule(student_cfg, settings(), teacher=str(tmp_path / "teacher.ckpt"), alpha=0.0)
    trainer = make_trainer(tmp_path / "s", 10, limit_val_batches=None, val_check_interval=10, check_val_every_n_epoch=None)
    trainer.fit(module, datamodule=dm())
    assert module.sequence_data and module.real_vocab == len(dm().tokenizer) < module.config.padded_vocab_size
    assert "val/loss" in trainer.callback_metrics and float(trainer.callback_metrics["train/divergence"]) > 0
    with pytest.raises(ConfigError, match="model.on_policy.lmbda"):
        DistillModule(student_cfg, settings(), teacher=str(tmp_path / "teacher.ckpt"),
                      on_policy=OnPolicyConfig(lmbda=0.5)).attach_data(dm())


def test_experiments_distill_yaml_runs(workdir, tmp_path, monkeypatch):
    from lmlab.cli import main

    monkeypatch.chdir(REPO)
    cfg = yaml.safe_load((REPO / "experiments" / "distill.yaml").read_text())
    assert cfg["model"]["class_path"] == "lmlab.modules.DistillModule"
    # the recipe as committed, pointed at the test's corpus, tokenizer and teacher
    run = tmp_path / "run"
    extra = tmp_path / "extra.yaml"
    extra.write_text(yaml.safe_dump({
        "trainer": {"max_steps": 4, "val_check_interval": 4, "default_root_dir": str(run), "enable_progress_bar": False,
                    "callbacks": [{"class_path": "lmlab.callbacks.ModelCheckpoint",
                                   "init_args": {"save_last": True, "every_n_train_steps": 4, "dirpath": str(run / "checkpoints")}}]},
        "model": {"init_args": {"teacher": str(workdir / "teacher.ckpt"), "config": {"vocab_size": VOCAB, "max_seq_len": 64}}},
        "data": {"init_args": {"tokenizer": str(workdir / "tok"),
                               "sources": [{"name": s.name, "weight": s.weight, "path": s.path} for s in corpus_sources(workdir / "corpus")],
                               "seq_len": 32, "batch_size": 8, "val_max_windows": 4, "cache_dir": str(workdir / "cache")}},
    }))
    main(["fit", "--config", "experiments/distill.yaml", "--config", str(extra)])
    ckpt = open_checkpoint(run / "checkpoints" / "last.ckpt")
    assert ckpt.stage == "distill" and ckpt.meta["teacher"] == str(workdir / "teacher.ckpt") and ckpt.config.d_model == 64


@pytest.mark.parametrize("flag,expected", [
    ("--model.alpha=2", "lmlab fit: error: model.alpha: must be in [0, 1], got 2.0"),
    ("--model.teacher=null", "lmlab fit: error: model.teacher: no teacher given"),
    ("--model.temperature=-1", "lmlab fit: error: model.temperature: must be a positive number"),
])
def test_the_command_stops_with_one_line(flag, expected, monkeypatch, capsys):
    from lmlab.cli import main

    monkeypatch.chdir(REPO)
    code = main(["fit", "--config", "experiments/distill.yaml", flag])
    err = capsys.readouterr().err.strip().splitlines()
    assert code == 2 and err[-1].startswith(expected) and "Traceback" not in "\n".join(err)
