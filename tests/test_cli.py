"""The ``lmlab`` command: configs parse, a fit lowers the loss, errors are one line, DDP runs."""

from __future__ import annotations

import csv
import os
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from helpers import write_corpus
from lmlab.cli import main

REPO = Path(__file__).resolve().parents[1]
EXPERIMENTS = sorted((REPO / "experiments").rglob("*.yaml"))


def _is_trainer_config(path: Path) -> bool:
    data = yaml.safe_load(path.read_text()) or {}
    # overlays (experiments/architecture/) name no model class: tests/test_architecture_configs.py composes them
    return "model" in data and "trainer" in data and "class_path" in (data["model"] or {})


@pytest.mark.parametrize("path", [p for p in EXPERIMENTS if _is_trainer_config(p)], ids=lambda p: str(p.relative_to(REPO)))
def test_every_experiment_yaml_parses_with_print_config(path, capsys, monkeypatch):
    monkeypatch.chdir(REPO)
    with pytest.raises(SystemExit) as e:
        main(["fit", "--config", str(path), "--print_config"])
    assert e.value.code in (0, None)
    printed = yaml.safe_load(capsys.readouterr().out)
    source = yaml.safe_load(path.read_text())
    assert printed["model"]["class_path"] == source["model"]["class_path"]
    assert printed["trainer"]["max_steps"] == source["trainer"]["max_steps"]


def test_dotted_overrides_and_composed_configs(tmp_path, capsys, monkeypatch):
    monkeypatch.chdir(REPO)
    extra = tmp_path / "extra.yaml"
    extra.write_text("trainer:\n  max_steps: 7\n")
    with pytest.raises(SystemExit):
        main(["fit", "--config", "experiments/quickstart.yaml", "--config", str(extra),
              "--model.config.n_layers=3", "--model.settings.optimizer.lr=0.01", "--print_config"])
    printed = yaml.safe_load(capsys.readouterr().out)
    assert printed["trainer"]["max_steps"] == 7
    assert printed["model"]["init_args"]["config"]["n_layers"] == 3
    assert printed["model"]["init_args"]["settings"]["optimizer"]["lr"] == 0.01


def test_help_lists_the_extra_verbs(capsys):
    assert main(["--help"]) == 0
    out = capsys.readouterr().out
    for verb in ("fit", "tokenizer", "scaling", "sweep", "eval", "export", "data"):
        assert verb in out


def tiny_config(tmp: Path, corpus: Path, **overrides) -> Path:
    cfg = {
        "seed_everything": 3,
        "trainer": {
            "accelerator": "cpu", "devices": 1, "max_steps": 40, "log_every_n_steps": 1,
            "num_sanity_val_steps": 0, "val_check_interval": 20, "check_val_every_n_epoch": None,
            "enable_progress_bar": False, "enable_model_summary": False, "default_root_dir": str(tmp / "run"),
            "logger": {"class_path": "lightning.pytorch.loggers.CSVLogger",
                       "init_args": {"save_dir": str(tmp / "run"), "name": "csv"}},
        },
        "model": {"class_path": "lmlab.modules.PretrainModule", "init_args": {
            "config": {"vocab_size": 320, "d_model": 32, "n_layers": 2, "n_heads": 4, "max_seq_len": 64},
            "settings": {"optimizer": {"lr": 0.003}, "schedule": {"warmup_steps": 4}}}},
        "data": {"class_path": "lmlab.data.PretrainDataModule", "init_args": {
            "tokenizer": str(tmp / "tok"), "tokenizer_train": {"vocab_size": 320, "sample_chars": 200000},
            "sources": [
                {"name": "web", "weight": 0.7, "path": str(corpus / "web.jsonl")},
                {"name": "books", "weight": 0.3, "path": str(corpus / "books")},
            ],
            "seq_len": 32, "batch_size": 8, "val_fraction": 0.05, "val_max_windows": 8,
            "cache_dir": str(tmp / "cache")}},
    }
    for dotted, value in overrides.items():
        node = cfg
        keys = dotted.split(".")
        for k in keys[:-1]:
            node = node[k]
        node[keys[-1]] = value
    tmp.mkdir(parents=True, exist_ok=True)
    path = tmp / "tiny.yaml"
    path.write_text(yaml.safe_dump(cfg))
    return path


def run_cli(*args, cwd=REPO, timeout=600):
    env = {**os.environ, "PYTHONUNBUFFERED": "1", "WANDB_MODE": "offline"}
    return subprocess.run([sys.executable, "-m", "lmlab", *args], cwd=cwd, env=env, capture_output=True, text=True,
                          timeout=timeout)


def read_metric(run_dir: Path, name: str) -> list[tuple[int, float]]:
    files = sorted(run_dir.rglob("metrics.csv"))
    assert files, f"no metrics.csv under {run_dir}"
    rows = list(csv.DictReader(open(files[-1])))
    return [(int(r["step"]), float(r[name])) for r in rows if r.get(name)]


@pytest.fixture(scope="module")
def corpus(tmp_path_factory):
    return write_corpus(tmp_path_factory.mktemp("cli") / "corpus")


def test_cli_fit_end_to_end_lowers_the_loss_and_resumes_from_last(corpus, tmp_path):
    cfg = tiny_config(tmp_path, corpus)
    ckpt_cb = [{"class_path": "lightning.pytorch.callbacks.ModelCheckpoint",
                "init_args": {"dirpath": str(tmp_path / "ckpt"), "save_last": True, "every_n_train_steps": 20}}]
    cfg = tiny_config(tmp_path, corpus, **{"trainer.callbacks": ckpt_cb})
    r = run_cli("fit", "--config", str(cfg))
    assert r.returncode == 0, r.stderr[-3000:]
    losses = read_metric(tmp_path / "run", "train/loss")
    assert len(losses) >= 30
    first = sum(v for _, v in losses[:5]) / 5
    last = sum(v for _, v in losses[-5:]) / 5
    assert last < first - 0.5, (first, last)
    assert read_metric(tmp_path / "run", "val/loss")
    assert (tmp_path / "ckpt" / "last.ckpt").exists()
    # `--ckpt_path last` continues from the last checkpoint to a longer horizon
    r = run_cli("fit", "--config", str(cfg), "--trainer.max_steps=50", "--ckpt_path", "last")
    assert r.returncode == 0, r.stderr[-3000:]
    steps = [s for s, _ in read_metric(tmp_path / "run", "train/loss")]
    assert max(steps) >= 48 and min(steps) >= 39


def test_user_errors_are_one_line(corpus, tmp_path):
    cfg = tiny_config(tmp_path, corpus, **{"model.init_args.config.vocab_size": 100})
    r = run_cli("fit", "--config", str(cfg))
    assert r.returncode == 2
    last = r.stderr.strip().splitlines()[-1]
    assert last.startswith("lmlab fit: error: model.config.vocab_size")
    assert "Traceback" not in r.stderr

    cfg = tiny_config(tmp_path, corpus, **{"data.init_args.sources": [{"name": "web", "path": str(tmp_path / "nope.jsonl")}]})
    r = run_cli("fit", "--config", str(cfg))
    assert r.returncode == 2 and "Traceback" not in r.stderr
    assert "data.sources[0].path" in r.stderr


@pytest.mark.slow
def test_two_process_ddp_on_cpu_matches_single_process(corpus, tmp_path):
    single = tiny_config(tmp_path / "one", corpus, **{"trainer.max_steps": 6, "trainer.val_check_interval": 6})
    r = run_cli("fit", "--config", str(single))
    assert r.returncode == 0, r.stderr[-3000:]
    ddp = tiny_config(tmp_path / "two", corpus, **{"trainer.max_steps": 6, "trainer.val_check_interval": 6,
                                                    "trainer.devices": 2, "trainer.strategy": "ddp"})
    r = run_cli("fit", "--config", str(ddp))
    assert r.returncode == 0, r.stderr[-3000:]
    a = dict(read_metric(tmp_path / "one" / "run", "train/loss"))
    b = dict(read_metric(tmp_path / "two" / "run", "train/loss"))
    assert len(a) == len(b) == 6
    # the same global batch split over two ranks follows the same trajectory
    for step in a:
        assert abs(a[step] - b[step]) < 1e-4, (step, a[step], b[step])
    va = read_metric(tmp_path / "one" / "run", "val/loss")[-1][1]
    vb = read_metric(tmp_path / "two" / "run", "val/loss")[-1][1]
    assert abs(va - vb) < 1e-3, (va, vb)
