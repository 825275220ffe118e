"""End to end on the shared corpus: prepare a small mixed corpus (JSONL, text, JSON, WARC), then ``lmlab fit`` on it."""

from __future__ import annotations

import csv
import importlib.util
import json

import numpy as np
import pytest
import yaml

from lmlab.data.prepare.prepare import prepare


@pytest.fixture(scope="module")
def prepared(shared_data, tmp_path_factory):
    pytest.importorskip("trafilatura")
    if importlib.util.find_spec("warcio") is None and importlib.util.find_spec("fastwarc") is None:
        pytest.skip("reading WARC needs warcio or fastwarc")
    root = tmp_path_factory.mktemp("shared")
    evals = root / "eval"
    evals.mkdir()
    for name in ("gsm8k_test.jsonl", "HumanEval.jsonl.gz", "arc_easy_test_icl.jsonl"):
        (evals / name).symlink_to(shared_data / "eval" / name)
    d = shared_data
    cfg = {
        "seed": 3,
        "shard_docs": 32,
        "val_fraction": 0.05,
        "train_tokens": 1_000_000,
        "tokenizer_train": {"vocab_size": 384, "sample_chars": 150_000},
        "sources": [
            {"name": "web", "weight": 0.5, "path": f"{d}/web/dclm_*.jsonl", "max_documents": 90},
            {"name": "crawl", "weight": 0.15, "type": "warc", "path": f"{d}/web/*.warc.gz"},
            {"name": "books", "weight": 0.15, "path": f"{d}/books/gutenberg_*.txt", "max_documents": 2, "max_chars": 120_000,
             "filters": ["gopher_repetition", {"name": "gopher_quality", "max_words": None}]},
            {"name": "code", "weight": 0.1, "kind": "code", "path": f"{d}/code/codexglue_cosqa_dev_python.json",
             "text_field": "code", "max_documents": 80},
            {"name": "reference", "weight": 0.1, "path": f"{d}/reference/wikitext2_valid_tokenized.txt",
             "split_pattern": "^ = [^=].* = $", "max_documents": 25, "filters": []},
        ],
        "quality": {"keep_fraction": 0.8, "apply_to": ["web"], "reference_sources": ["reference", "books"]},
        "decontaminate": {"eval_dir": str(evals)},
        "report": {"wandb": False},
    }
    path = root / "mix.yaml"
    path.write_text(yaml.safe_dump(cfg))
    from lmlab.cli import main

    assert main(["data", "prepare", "--config", str(path), "--out", str(root / "out"), "--num_proc", "2", "--quiet"]) == 0
    report = json.loads((root / "out" / "report" / "report.json").read_text())
    return root, cfg, report


def test_shared_mixture_is_prepared(prepared):
    root, cfg, report = prepared
    src = report["sources"]
    assert list(src) == ["web", "crawl", "books", "code", "reference"]
    # the two DCLM files overlap (every agreement page is also a majority page): the first 90 are all agreement pages,
    # so nothing is exact-duplicated within web here, while every WARC page becomes a document
    assert src["web"]["stages"]["read"]["docs"] == 90
    assert src["crawl"]["stages"]["read"]["docs"] == 22 and src["crawl"]["stages"]["collect"]["docs"] == 22
    assert src["crawl"]["stages"]["collect"]["bytes"] < 0.2 * src["crawl"]["stages"]["read"]["bytes"]  # markup removed
    assert src["books"]["read_counts"]["gutenberg_stripped"] == 2
    assert src["reference"]["stages"]["collect"]["docs"] >= 20  # one WikiText file split into articles
    assert src["web"]["stages"]["quality"]["docs"] == round(0.8 * src["web"]["stages"]["filter"]["docs"])
    assert 0 < src["web"]["stages"]["filter"]["docs"] < 90
    for name, row in src.items():
        assert row["tokens"]["train"] > 1000, name
    meta = json.loads((root / "out" / "tokens" / "meta.json").read_text())
    assert meta["dtype"] == "uint16" and meta["tokenizer"] == str(root / "out" / "tokenizer")
    train = np.fromfile(root / "out" / "tokens" / "web.train.bin", dtype=np.uint16)
    assert train.max() < 384 and (train == 1).sum() > 0  # <|eos|> is id 1, one after every document


def test_fit_trains_on_the_prepared_mixture(prepared, tmp_path):
    from lmlab.cli import main

    root, cfg, _ = prepared
    run = tmp_path / "run"
    train_cfg = {
        "seed_everything": 1,
        "trainer": {
            "accelerator": "cpu", "devices": 1, "max_steps": 16, "log_every_n_steps": 1, "num_sanity_val_steps": 0,
            "val_check_interval": 16, "check_val_every_n_epoch": None, "limit_val_batches": 2,
            "enable_progress_bar": False, "enable_model_summary": False, "enable_checkpointing": False,
            "default_root_dir": str(run),
            "logger": {"class_path": "lightning.pytorch.loggers.CSVLogger", "init_args": {"save_dir": str(run), "name": "csv"}},
        },
        "model": {"class_path": "lmlab.modules.PretrainModule", "init_args": {
            "config": {"vocab_size": 384, "d_model": 32, "n_layers": 2, "n_heads": 4, "max_seq_len": 64},
            "settings": {"optimizer": {"lr": 0.01}, "schedule": {"warmup_steps": 2}}}},
        "data": {"class_path": "lmlab.data.PretrainDataModule", "init_args": {
            "prepared_dir": str(root / "out" / "tokens"),
            "tokenizer": str(root / "out" / "tokenizer"),
            "sources": [{"name": s["name"], "weight": s["weight"]} for s in cfg["sources"]],
            "seq_len": 32, "batch_size": 8, "val_max_windows": 4}},
    }
    path = tmp_path / "fit.yaml"
    path.write_text(yaml.safe_dump(train_cfg))
    main(["fit", "--config", str(path)])
    rows = list(csv.DictReader(open(next(run.rglob("metrics.csv")))))
    losses = [float(r["train/loss"]) for r in rows if r.get("train/loss")]
    assert len(losses) == 16 and all(np.isfinite(losses))
    assert np.mean(losses[-4:]) < np.mean(losses[:4]) - 0.5
    assert any(r.get("val/loss") for r in rows)
