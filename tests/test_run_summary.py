"""RunSummary: N, D, C from the counting functions, the final loss measured at the last step, the files it writes."""

from __future__ import annotations

import json
import multiprocessing as mp

import lightning.pytorch as pl
import pandas as pd
import pytest

from helpers import small_pretrain_dm, write_corpus
from lmlab.loggers import WandbLogger
from lmlab.models import TransformerConfig
from lmlab.models.counting import count_params, training_flops
from lmlab.modules import OptimizerConfig, PretrainModule, ScheduleConfig, TrainingSettings
from lmlab.scaling.plan import PF_DAY
from lmlab.scaling import load_results
from lmlab.scaling.run_summary import CSV_COLUMNS, RESULT_ENV, RunSummary, append_csv, append_jsonl


@pytest.fixture(scope="module")
def workdir(tmp_path_factory):
    root = tmp_path_factory.mktemp("summary")
    write_corpus(root / "corpus")
    return root


def make_dm(workdir):
    return small_pretrain_dm(workdir, val_max_windows=6)


def make_module():
    cfg = TransformerConfig(vocab_size=320, d_model=32, n_layers=2, n_heads=4, max_seq_len=64)
    return PretrainModule(cfg, settings=TrainingSettings(optimizer=OptimizerConfig(lr=4e-3), schedule=ScheduleConfig(name="cosine", warmup_steps=2)))


def fit(tmp, workdir, callback, max_steps, val_every, logger=False):
    module = make_module()
    dm = make_dm(workdir)
    trainer = pl.Trainer(
        accelerator="cpu", devices=1, max_steps=max_steps, logger=logger, enable_checkpointing=False,
        enable_progress_bar=False, enable_model_summary=False, num_sanity_val_steps=0,
        val_check_interval=val_every, check_val_every_n_epoch=None, default_root_dir=str(tmp), callbacks=[callback],
    )
    trainer.fit(module, datamodule=dm)
    return trainer, module, dm


def test_summary_counts_final_loss_and_files(workdir, tmp_path, monkeypatch):
    results, table, single = tmp_path / "r" / "results.jsonl", tmp_path / "r" / "results.csv", tmp_path / "one.json"
    monkeypatch.setenv(RESULT_ENV, str(single))
    monkeypatch.setenv("WANDB_RUN_GROUP", "grp")
    pl.seed_everything(11)
    cb = RunSummary(results_file=str(results), csv_file=str(table))
    logger = WandbLogger(offline=True, save_dir=str(tmp_path / "wandb"), project="lmlab-test")
    trainer, module, dm = fit(tmp_path, workdir, cb, max_steps=7, val_every=5, logger=logger)
    rec = cb.record

    # the schedule validated at step 5 only; the callback added one at the final step
    assert [h["step"] for h in module.val_history] == [5, 7]
    assert rec["final_val_step"] == 7 and rec["steps"] == 7
    assert rec["loss"] == module.val_history[-1]["val/loss"]
    assert rec["loss_best"] == min(h["val/loss"] for h in module.val_history)
    assert rec["bpb"] == module.val_history[-1]["val/bpb"]
    # and it is the loss of the final weights: an independent validation agrees
    trainer.validate(module, datamodule=dm, verbose=False)
    assert len(module.val_history) == 3 and module.val_history[-1]["step"] == 7
    assert rec["loss"] == pytest.approx(module.val_history[-1]["val/loss"], rel=1e-6)
    assert rec["loss"] == pytest.approx(float(trainer.callback_metrics["val/loss"]), rel=1e-6)

    cfg = module.config
    counts = count_params(cfg)
    params = {id(p): p.numel() for p in module.model.parameters()}
    assert rec["N_total"] == counts.total == sum(params.values())
    vocab_mats = {id(p): p.numel() for p in (module.model.backbone.tok_emb.weight, module.model.lm_head.weight)}
    assert rec["N"] == counts.non_embedding == counts.total - sum(vocab_mats.values())
    assert rec["D"] == module.tokens_seen == 7 * 8 * 32
    assert rec["C"] == pytest.approx(training_flops(cfg, 7 * 8 * 32, 32, "palm"), rel=1e-12)
    assert rec["C"] > 6 * rec["N"] * rec["D"]  # the unembedding and attention terms are counted
    assert rec["C_6ND"] == 6 * rec["N"] * rec["D"]
    assert rec["C_pf_days"] == pytest.approx(rec["C"] / PF_DAY)
    assert (rec["lr"], rec["warmup_steps"], rec["schedule"], rec["seed"]) == (4e-3, 2, "cosine", 11)
    assert rec["config"]["schedule"]["total_steps"] == 7 and rec["config"]["model"]["d_model"] == 32
    assert (rec["device_count"], rec["accelerator"], rec["precision"]) == (1, "cpu", "32-true")
    assert rec["device"] and rec["wall_time_s"] > 0 and rec["group"] == "grp"
    assert rec["run_id"] == logger.experiment.id

    # the W&B summary carries the same numbers
    summary = logger.experiment.summary
    assert summary["N"] == rec["N"] and summary["D"] == rec["D"] and summary["C"] == pytest.approx(rec["C"])
    assert summary["val/loss_final"] == pytest.approx(rec["loss"]) and summary["run/lr"] == 4e-3
    logger.experiment.finish()

    lines = results.read_text().splitlines()
    assert len(lines) == 1 and json.loads(lines[0]) == rec
    assert json.loads(single.read_text()) == rec
    data = load_results(table, warn=False)
    assert data.N.tolist() == [rec["N"]] and data.D.tolist() == [rec["D"]] and data.loss[0] == pytest.approx(rec["loss"])

    # a second run (validated at its last step by the schedule) appends; the CSV keeps one header
    monkeypatch.delenv(RESULT_ENV)
    cb2 = RunSummary(results_file=str(results), csv_file=str(table))
    _, module2, _ = fit(tmp_path / "b", workdir, cb2, max_steps=3, val_every=3)
    assert [h["step"] for h in module2.val_history] == [3] and cb2.record["final_val_step"] == 3
    assert len(results.read_text().splitlines()) == 2
    frame = pd.read_csv(table)
    assert list(frame.columns) == list(CSV_COLUMNS) and frame["D"].tolist() == [7 * 256, 3 * 256]


def _append_many(args):
    path_jsonl, path_csv, worker = args
    for i in range(25):
        append_jsonl(path_jsonl, {"worker": worker, "i": i, "pad": "x" * 2000})
        append_csv(path_csv, {"run_name": f"w{worker}-{i}", "N": worker, "D": i, "loss": 1.0})


def test_concurrent_appends_never_interleave(tmp_path):
    jsonl, table = tmp_path / "r.jsonl", tmp_path / "r.csv"
    ctx = mp.get_context("fork")
    with ctx.Pool(4) as pool:
        pool.map(_append_many, [(jsonl, table, w) for w in range(4)])
    rows = [json.loads(line) for line in jsonl.read_text().splitlines()]
    assert len(rows) == 100 and len({(r["worker"], r["i"]) for r in rows}) == 100
    frame = pd.read_csv(table)
    assert len(frame) == 100 and list(frame.columns) == list(CSV_COLUMNS)
    assert sorted(frame["run_name"]) == sorted(f"w{w}-{i}" for w in range(4) for i in range(25))
