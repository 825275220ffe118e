"""Continual pretraining with replay: proportions, validation groups, exact resume, re-warming, one-line errors."""

from __future__ import annotations

import csv
import math
from pathlib import Path

import lightning.pytorch as pl
import numpy as np
import pytest
import torch
from lightning.pytorch.loggers import CSVLogger

from helpers import LossRecorder, make_trainer, write_corpus
from lmlab.cli import main
from lmlab.data import PretrainDataModule, SourceConfig, TokenizerTrainConfig
from lmlab.data.pretrain.datamodule import MixtureBatches, train_tokenizer_on_mixture
from lmlab.errors import ConfigError
from lmlab.models import TransformerConfig
from lmlab.modules import OptimizerConfig, PretrainModule, ScheduleConfig, TrainingSettings
from lmlab.modules.optim import make_lr_lambda

REPO = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def workdir(tmp_path_factory):
    root = tmp_path_factory.mktemp("continual")
    write_corpus(root / "corpus")
    # the base model's tokenizer, from the original mixture only, whichever test runs first
    train_tokenizer_on_mixture(old_sources(root), str(root / "tok"), TokenizerTrainConfig(vocab_size=320, sample_chars=200_000))
    return root


def old_sources(root: Path) -> list[SourceConfig]:
    return [SourceConfig("web", weight=0.7, path=str(root / "corpus" / "web.jsonl")),
            SourceConfig("books", weight=0.3, path=str(root / "corpus" / "books"))]


def new_sources(root: Path) -> list[SourceConfig]:
    return [SourceConfig("code", weight=1.0, path=str(root / "corpus" / "code.jsonl"))]


def make_dm(root: Path, replay_fraction=None, continual=True, **kw) -> PretrainDataModule:
    args = dict(
        sources=old_sources(root),
        tokenizer=str(root / "tok"),
        seq_len=32, batch_size=8, val_fraction=0.05, val_max_windows=8, cache_dir=str(root / "cache"), seed=5,
    )
    if continual:
        args.update(new_sources=new_sources(root))
    if continual or replay_fraction is not None:
        args.update(replay_fraction=replay_fraction)
    args.update(kw)
    return PretrainDataModule(**args)


def make_module(init_from=None, warmup=3, start=0.0):
    cfg = TransformerConfig(vocab_size=320, d_model=32, n_layers=2, n_heads=4, max_seq_len=64)
    schedule = ScheduleConfig(name="cosine", warmup_steps=warmup, warmup_start_ratio=start)
    return PretrainModule(cfg, settings=TrainingSettings(optimizer=OptimizerConfig(lr=3e-3), schedule=schedule), init_from=init_from)


@pytest.fixture(scope="module")
def base_ckpt(workdir, tmp_path_factory):
    """A base model briefly pretrained on the original mixture (web, books) only."""
    pl.seed_everything(0)
    out = tmp_path_factory.mktemp("base")
    trainer = make_trainer(out, 20)
    trainer.fit(make_module(), datamodule=make_dm(workdir, continual=False))
    path = out / "base.ckpt"
    trainer.save_checkpoint(path)
    return path


def source_tokens(dm: PretrainDataModule, steps: int) -> np.ndarray:
    """Training tokens drawn from each source of ``dm.mixture`` over the first ``steps`` optimizer steps."""
    dm.setup()
    batches = MixtureBatches([dm.streams[s.name].train for s in dm.mixture], dm.sampler, dm.schedule, dm.seq_len, 0, 1, 0, steps)
    counts = np.zeros(len(dm.mixture), dtype=np.int64)
    for batch in batches:
        counts += np.bincount(batch["sources"].numpy(), minlength=len(counts)) * batch["tokens"][:, 1:].shape[1]
    return counts


@pytest.mark.parametrize("fraction", [0.05, 0.25, 0.6])
def test_replayed_token_share_matches_the_fraction(workdir, fraction):
    dm = make_dm(workdir, fraction)
    steps = 400  # 3,200 windows
    counts = source_tokens(dm, steps)
    assert [s.name for s in dm.mixture] == ["web", "books", "code"]
    total = counts.sum()
    assert total == steps * 8 * 32
    old = counts[:2].sum() / total
    assert abs(old - fraction) < 0.005, (old, fraction)
    # inside the replayed mixture the original proportions hold (0.7 : 0.3)
    assert abs(counts[0] / counts[:2].sum() - 0.7) < 0.02
    # the sampler's own accounting agrees with the counted batches
    share = dm.train_stats(steps)["share"]
    assert share["web"] + share["books"] == pytest.approx(old, abs=1e-12)


def test_fraction_zero_trains_on_the_new_domain_only_but_still_validates_the_old(workdir):
    dm = make_dm(workdir, 0.0)
    counts = source_tokens(dm, 100)
    assert counts[0] == 0 and counts[1] == 0 and counts[2] == 100 * 8 * 32
    assert dm.val_source_groups == {"old": ["web", "books"], "new": ["code"]}
    # fraction 1 is the original mixture only
    assert source_tokens(make_dm(workdir, 1.0), 50)[2] == 0


def test_the_original_sources_keep_their_validation_windows(workdir):
    base, cont = make_dm(workdir, continual=False), make_dm(workdir, 0.05)
    base.setup(), cont.setup()
    for name in ("web", "books"):
        assert np.array_equal(np.asarray(base.streams[name].val), np.asarray(cont.streams[name].val))


def test_validation_logs_old_and_new_bpb_to_csv(workdir, base_ckpt, tmp_path):
    pl.seed_everything(1)
    module = make_module(init_from=str(base_ckpt))
    logger = CSVLogger(str(tmp_path), name="csv")
    trainer = make_trainer(tmp_path, 4, logger=logger, limit_val_batches=None, val_check_interval=4, check_val_every_n_epoch=None)
    trainer.fit(module, datamodule=make_dm(workdir, 0.25))
    m = {k: float(v) for k, v in trainer.callback_metrics.items()}
    # one new-domain source: its pooled bpb is that source's bpb
    assert m["val/new_bpb"] == pytest.approx(m["val/code/bpb"], rel=1e-9)
    # pooled over web and books: a byte-weighted mean of the two, so between them
    lo, hi = sorted((m["val/web/bpb"], m["val/books/bpb"]))
    assert lo <= m["val/old_bpb"] <= hi and lo < hi
    assert 0 < m["val/old_bpb"] < 8 and m["val/old_loss"] > 0 and m["val/new_loss"] > 0
    rows = list(csv.DictReader(open(Path(logger.log_dir) / "metrics.csv")))
    logged = [r for r in rows if r.get("val/old_bpb")]
    assert len(logged) == 1 and float(logged[0]["val/new_bpb"]) == pytest.approx(m["val/new_bpb"], rel=1e-6)


def test_plain_pretraining_logs_no_groups(workdir, tmp_path):
    pl.seed_everything(2)
    trainer = make_trainer(tmp_path, 2, limit_val_batches=None, val_check_interval=2, check_val_every_n_epoch=None)
    trainer.fit(make_module(), datamodule=make_dm(workdir, continual=False))
    assert "val/bpb" in trainer.callback_metrics
    assert not any(k.startswith(("val/old_", "val/new_")) for k in trainer.callback_metrics)


def test_continued_run_starts_from_the_checkpoint_and_resumes_exactly(workdir, base_ckpt, tmp_path):
    steps, cut = 10, 4
    pl.seed_everything(3)
    full = LossRecorder()
    make_trainer(tmp_path / "a", steps, [full]).fit(make_module(str(base_ckpt)), datamodule=make_dm(workdir, 0.25))
    fresh = LossRecorder()
    pl.seed_everything(3)
    make_trainer(tmp_path / "f", 1, [fresh]).fit(make_module(None), datamodule=make_dm(workdir, 0.25))
    # the base checkpoint, not a fresh init, is where training starts (lower first loss)
    assert full.losses[0] < fresh.losses[0] - 0.3

    pl.seed_everything(3)
    first = LossRecorder(stop_at=cut)
    t1 = make_trainer(tmp_path / "b", steps, [first])
    t1.fit(make_module(str(base_ckpt)), datamodule=make_dm(workdir, 0.25))
    ckpt = tmp_path / "cut.ckpt"
    t1.save_checkpoint(ckpt)
    assert torch.load(ckpt, weights_only=True)["PretrainDataModule"] == {"step": cut, "seed": 5, "replay_fraction": 0.25}

    pl.seed_everything(123)
    second = LossRecorder()
    make_trainer(tmp_path / "c", steps, [second]).fit(make_module(str(base_ckpt)), datamodule=make_dm(workdir, 0.25), ckpt_path=str(ckpt))
    assert sorted(second.losses) == list(range(cut, steps))
    for s in range(cut, steps):
        assert abs(second.losses[s] - full.losses[s]) <= 1e-6, (s, second.losses[s], full.losses[s])


def test_rewarm_schedule_values():
    peak_total, warm, start, floor = 100, 10, 0.2, 0.1
    f = make_lr_lambda(ScheduleConfig(name="cosine", warmup_steps=warm, warmup_start_ratio=start, min_lr_ratio=floor), peak_total)
    # LambdaLR passes completed steps; the first update (t = 1) is already one warmup step in
    assert f(0) == pytest.approx(0.2 + 0.8 * 1 / 10)
    assert f(4) == pytest.approx(0.2 + 0.8 * 5 / 10)
    assert f(warm - 1) == pytest.approx(1.0)
    assert f(54) == pytest.approx(floor + (1 - floor) * 0.5 * (1 + math.cos(math.pi * 45 / 90)))
    assert f(peak_total - 1) == pytest.approx(floor)
    # no warmup: the continued run starts at the peak
    none = make_lr_lambda(ScheduleConfig(name="cosine", warmup_steps=0, min_lr_ratio=floor), peak_total)
    assert none(0) == pytest.approx(floor + (1 - floor) * 0.5 * (1 + math.cos(math.pi / 100)))
    # start 0 is exactly the pretraining warmup t / warmup
    zero = make_lr_lambda(ScheduleConfig(name="wsd", warmup_steps=7), peak_total)
    assert [zero(c) for c in range(7)] == [(c + 1) / 7 for c in range(7)]
    for name in ("wsd", "constant", "inverse_sqrt"):
        g = make_lr_lambda(ScheduleConfig(name=name, warmup_steps=warm, warmup_start_ratio=start), peak_total)
        assert g(0) == pytest.approx(0.28) and g(warm - 1) == pytest.approx(1.0)
    for bad in (-0.1, 1.0):
        with pytest.raises(ConfigError, match="model.settings.schedule.warmup_start_ratio"):
            make_lr_lambda(ScheduleConfig(warmup_start_ratio=bad), peak_total)


def test_rewarmed_run_logs_the_rewarm_lrs(workdir, base_ckpt, tmp_path):
    lrs = []

    class LRs(pl.Callback):
        def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
            lrs.append(trainer.optimizers[0].param_groups[0]["lr"])

    pl.seed_everything(4)
    make_trainer(tmp_path, 5, [LRs()]).fit(make_module(str(base_ckpt), warmup=4, start=0.25), datamodule=make_dm(workdir, 0.05))
    # after update t the optimizer holds the LR of update t + 1
    assert lrs[:3] == pytest.approx([3e-3 * (0.25 + 0.75 * t / 4) for t in (2, 3, 4)])
    assert lrs[3] == pytest.approx(3e-3 * make_lr_lambda(ScheduleConfig(warmup_steps=4, warmup_start_ratio=0.25), 5)(4))


@pytest.mark.parametrize("fraction", [-0.01, 1.01, float("nan")])
def test_replay_fraction_outside_zero_one_is_a_one_line_error(workdir, fraction):
    with pytest.raises(ConfigError, match=r"^data.replay_fraction: must be in \[0, 1\]"):
        make_dm(workdir, fraction)


def test_continual_setup_errors_name_the_field(workdir, tmp_path):
    with pytest.raises(ConfigError, match="^data.replay_fraction: continual pretraining"):
        make_dm(workdir, None)
    with pytest.raises(ConfigError, match="^data.replay_fraction: is set but data.new_sources is not"):
        make_dm(workdir, continual=False, replay_fraction=0.1)
    with pytest.raises(ConfigError, match="^data.new_sources: the new domain has no source"):
        make_dm(workdir, 0.1, new_sources=[])
    with pytest.raises(ConfigError, match=r"^data.new_sources: source names \['web'\]"):
        make_dm(workdir, 0.1, new_sources=[SourceConfig("web", path=str(workdir / "corpus" / "code.jsonl"))])
    with pytest.raises(ConfigError, match=r"^data.new_sources\[0\].path: no readable files"):
        make_dm(workdir, 0.1, new_sources=[SourceConfig("code", path=str(tmp_path / "nope.jsonl"))])
    (tmp_path / "blank.jsonl").write_text('{"text": "   "}\n')
    dm = make_dm(workdir, 0.1, new_sources=[SourceConfig("code", path=str(tmp_path / "blank.jsonl"))])
    with pytest.raises(ConfigError, match=r"^data.new_sources\[0\]: source 'code' yielded no documents"):
        dm.setup()
    (tmp_path / "tiny.jsonl").write_text('{"text": "x"}\n')
    # empty even where replay 1 gives it weight 0: the new domain must have training data
    dm = make_dm(workdir, 1.0, new_sources=[SourceConfig("code", path=str(tmp_path / "tiny.jsonl"))])
    with pytest.raises(ConfigError, match=r"^data.new_sources\[0\]: new-domain source 'code' is empty"):
        dm.setup()


# -- the experiments/continual recipes through the CLI (real corpora from ../shared/data) ----------------------------
@pytest.fixture(scope="module")
def recipe_runs(shared_data, tmp_path_factory):
    """A 3-step base run of experiments/continual/base.yaml; its outputs redirected into a temporary folder."""
    out = tmp_path_factory.mktemp("recipes")
    common = [f"--data.tokenizer={out / 'tok'}", f"--data.cache_dir={out / 'cache'}", "--trainer.max_steps=3",
              "--trainer.val_check_interval=3", "--data.val_max_windows=4"]
    rc = main(["fit", "--config", str(REPO / "experiments/continual/base.yaml"), *common,
               "--data.tokenizer_train.sample_chars=150000", f"--trainer.default_root_dir={out / 'base'}"])
    assert rc == 0
    return out, common


def test_continual_recipe_runs_from_the_base_checkpoint(recipe_runs, monkeypatch):
    out, common = recipe_runs
    monkeypatch.chdir(REPO)  # the recipes name ../shared/data relative to the repository
    ckpt = out / "base" / "checkpoints" / "last.ckpt"
    assert ckpt.is_file()
    rc = main(["fit", "--config", "experiments/continual.yaml", *common, f"--model.init_from={ckpt}",
               "--trainer.max_steps=4", "--trainer.val_check_interval=2", f"--trainer.default_root_dir={out / 'r25'}",
               "--data.replay_fraction=0.25", "--trainer.log_every_n_steps=1"])
    assert rc == 0
    rows = list(csv.DictReader(open(next((out / "r25" / "csv").glob("version_*/metrics.csv")))))
    vals = [r for r in rows if r.get("val/old_bpb")]
    assert len(vals) == 2
    for r in vals:
        assert 0 < float(r["val/old_bpb"]) < 10 and 0 < float(r["val/new_bpb"]) < 10
        assert r["val/code/bpb"] == r["val/new_bpb"]
    lrs = [float(r["train/lr"]) for r in rows if r.get("train/lr")]
    assert lrs and lrs[0] == pytest.approx(1.5e-3 * (0.2 + 0.8 * 2 / 15))  # re-warming from 0.2 x peak


@pytest.mark.parametrize(
    "flags, message",
    [
        (["--data.replay_fraction=1.5"], "lmlab fit: error: data.replay_fraction: must be in [0, 1], got 1.5"),
        (["--model.init_from=/nonexistent/base.ckpt"], "lmlab fit: error: model.init_from: checkpoint /nonexistent/base.ckpt does not exist"),
    ],
)
def test_continual_recipe_errors_are_one_line(recipe_runs, monkeypatch, capsys, flags, message):
    out, common = recipe_runs
    monkeypatch.chdir(REPO)
    ckpt = out / "base" / "checkpoints" / "last.ckpt"
    rc = main(["fit", "--config", "experiments/continual.yaml", *common, f"--model.init_from={ckpt}", *flags,
               f"--trainer.default_root_dir={out / 'bad'}"])
    assert rc == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert err[-1].startswith(message) and "Traceback" not in "\n".join(err)


def test_perplexity_eval_of_the_continual_recipe_covers_both_domains():
    from lmlab.eval.perplexity import experiment_mixture

    mix = experiment_mixture(REPO / "experiments" / "continual.yaml")
    assert [s.name for s in mix["sources"]] == ["web", "books", "wiki", "code"]


def test_study_driver_writes_its_table_and_figure(tmp_path):
    import json
    import sys

    sys.path.insert(0, str(REPO / "benchmarks"))
    import continual_replay

    curve = [{"step": 10, "val/old_bpb": 3.0, "val/new_bpb": 4.0}, {"step": 20, "val/old_bpb": 3.2, "val/new_bpb": 3.5}]
    runs = continual_replay._runs([0.0, 0.25], [0.25])
    assert [(t, f, s) for t, f, s, _ in runs] == [("r00", 0.0, "re-warm"), ("r25", 0.25, "re-warm"), ("r25_no_warmup", 0.25, "no warmup")]
    assert runs[2][3] == ["--model.settings.schedule.warmup_steps=0"]
    results = [{"run": t, "replay_fraction": f, "schedule": s, "forgetting_bpb": 0.5, "gain_bpb": 1.0} for t, f, s, _ in runs]
    summary = {"base": {"old_bpb": 2.7, "new_bpb": 5.0, "per_source_bpb": {}}, "results": results,
               "curves": {t: curve for t, *_ in runs}, "wall_s": {}, "threads": 1}
    continual_replay.write(summary, tmp_path, "python benchmarks/continual_replay.py")
    rows = list(csv.DictReader(open(tmp_path / "continual_replay.csv")))
    assert len(rows) == 1 + 3 * 2 and rows[0]["run"] == "base" and rows[-1]["schedule"] == "no warmup"
    assert json.loads((tmp_path / "continual_replay.json").read_text())["command"] == "python benchmarks/continual_replay.py"
    assert (tmp_path / "continual_replay.png").stat().st_size > 10_000
