"""`lmlab fit` user mistakes: one line naming the field, exit code 2, no traceback, nothing half-written.

Every case runs the real command in a subprocess on a tiny config; the cases that the config or the
checkpoint decide fail before any data setup or training.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import yaml

from helpers import write_corpus
from test_cli import REPO, run_cli, tiny_config

CHECKPOINT = "lmlab.callbacks.ModelCheckpoint"


@pytest.fixture(scope="module")
def shared(tmp_path_factory):
    """A corpus, and a tokenizer + token cache that every run of this module reuses."""
    root = tmp_path_factory.mktemp("fit_errors")
    return {"corpus": write_corpus(root / "corpus"), "tok": root / "tok", "cache": root / "cache"}


def make_config(tmp: Path, shared, ckpt_dir: Path | None = None, **overrides) -> Path:
    over = {"data.init_args.tokenizer": str(shared["tok"]), "data.init_args.cache_dir": str(shared["cache"]),
            "trainer.max_steps": 4, "trainer.val_check_interval": 2}
    if ckpt_dir is not None:
        over["trainer.callbacks"] = [{"class_path": CHECKPOINT, "init_args": {
            "dirpath": str(ckpt_dir), "save_last": True, "every_n_train_steps": 2}}]
    over.update(overrides)
    return tiny_config(tmp, shared["corpus"], **over)


@pytest.fixture(scope="module")
def trained(shared, tmp_path_factory):
    """A finished 4-step run with a checkpoint folder (n_layers=2)."""
    tmp = tmp_path_factory.mktemp("trained")
    ckpt_dir = tmp / "ckpt"
    cfg = make_config(tmp, shared, ckpt_dir)
    r = run_cli("fit", "--config", str(cfg))
    assert r.returncode == 0, r.stderr[-3000:]
    assert (ckpt_dir / "last.ckpt").is_file()
    return {"cfg": cfg, "ckpt_dir": ckpt_dir, "last": ckpt_dir / "last.ckpt"}


def assert_one_line_error(r, field: str, *also: str) -> str:
    """Exit 2, exactly one error line naming ``field`` (and ``also``), no traceback or usage dump."""
    assert r.returncode == 2, (r.returncode, r.stderr[-3000:])
    assert "Traceback" not in r.stderr and "usage:" not in r.stderr, r.stderr[-3000:]
    errors = [ln for ln in r.stderr.splitlines() if "error" in ln.lower()]
    assert len(errors) == 1, errors
    line = errors[0]
    assert line.startswith(f"lmlab fit: error: {field}"), line
    for text in also:
        assert text in line, (text, line)
    return line


def assert_nothing_written(root: Path) -> None:
    """No checkpoint and no lock file anywhere under ``root``."""
    assert not list(root.rglob("*.ckpt")), list(root.rglob("*.ckpt"))
    assert not list(root.rglob("*.lock")), list(root.rglob("*.lock"))


# --- mistakes in the config (caught before anything is built) -----------------------------------------

CONFIG_CASES = [
    (["--trainer.max_steps=-5"], "trainer.max_steps", ["-5"]),
    (["--trainer.max_steps=0"], "trainer.max_steps", ["got 0"]),
    (["--trainer.max_epochs=0"], "trainer.max_epochs", []),
    (["--trainer.val_check_interval=-3"], "trainer.val_check_interval", ["-3"]),
    (["--trainer.val_check_interval=1.5"], "trainer.val_check_interval", ["1.5"]),
    (["--trainer.accumulate_grad_batches=0"], "trainer.accumulate_grad_batches", [">= 1"]),
    (["--trainer.log_every_n_steps=0"], "trainer.log_every_n_steps", []),
    (["--trainer.gradient_clip_val=-1"], "trainer.gradient_clip_val", []),
    (["--model.config.n_layerz=2"], "model.config.n_layerz", ["unknown key", "did you mean model.config.n_layers?"]),
    (["--trainer.max_stepz=3"], "trainer.max_stepz", ["did you mean trainer.max_steps?"]),
    (["--data.seq_lenn=16"], "data.seq_lenn", ["did you mean data.seq_len?"]),
    (["--model.settings.optimizer.lrr=0.1"], "model.settings.optimizer.lrr", ["did you mean model.settings.optimizer.lr?"]),
    (["--model.config.n_layers=abc"], "model.config.n_layers", ["expected int", "abc"]),
    (["--trainer.max_steps=abc"], "trainer.max_steps", ["expected int"]),
    (["--model.config.ffn_type=foo"], "model.config.ffn_type", ["expected one of 'swiglu', 'gelu', got foo"]),
    (["--config", "no/such/file.yaml"], "--config", ["no/such/file.yaml"]),
]


@pytest.mark.parametrize("args,field,also", CONFIG_CASES, ids=[c[1] + ":" + c[0][-1] for c in CONFIG_CASES])
def test_config_mistakes_are_one_line(shared, tmp_path, args, field, also):
    cfg = make_config(tmp_path, shared, tmp_path / "ckpt")
    r = run_cli("fit", "--config", str(cfg), *args)
    assert_one_line_error(r, field, *also)
    assert_nothing_written(tmp_path)
    assert not (tmp_path / "run").exists()


def test_unknown_key_in_a_yaml_file(shared, tmp_path):
    cfg = make_config(tmp_path, shared)
    data = yaml.safe_load(cfg.read_text())
    data["model"]["init_args"]["config"]["n_headz"] = 4
    cfg.write_text(yaml.safe_dump(data))
    r = run_cli("fit", "--config", str(cfg))
    assert_one_line_error(r, "model.config.n_headz", "did you mean model.config.n_heads?")


def test_output_folder_that_cannot_be_written(shared, tmp_path):
    blocker = tmp_path / "a_file"
    blocker.write_text("not a folder")
    cfg = make_config(tmp_path, shared, **{"trainer.default_root_dir": str(blocker / "run")})
    r = run_cli("fit", "--config", str(cfg))
    assert_one_line_error(r, "trainer.default_root_dir", "is a file, not a folder")
    assert blocker.read_text() == "not a folder"
    assert_nothing_written(tmp_path)


@pytest.mark.skipif(hasattr(os, "geteuid") and os.geteuid() == 0, reason="root may write anywhere")
def test_read_only_root_dir(shared, tmp_path):
    locked = tmp_path / "ro"
    locked.mkdir()
    locked.chmod(0o555)
    try:
        cfg = make_config(tmp_path, shared, **{"trainer.default_root_dir": str(locked / "run")})
        r = run_cli("fit", "--config", str(cfg))
        assert_one_line_error(r, "trainer.default_root_dir", "not writable")
    finally:
        locked.chmod(0o755)


# --- --ckpt_path (checked before the data setup) -------------------------------------------------------


def test_ckpt_path_last_with_nothing_to_resume(shared, tmp_path):
    cfg = make_config(tmp_path, shared, tmp_path / "ckpt")
    r = run_cli("fit", "--config", str(cfg), "--ckpt_path", "last")
    assert_one_line_error(r, "ckpt_path", "no checkpoint to resume", str(tmp_path / "ckpt"))
    assert_nothing_written(tmp_path)
    assert not (tmp_path / "run").exists()  # stopped before the logger wrote anything


def bad_checkpoints(trained, folder: Path) -> dict[str, tuple[Path, str]]:
    folder.mkdir(parents=True, exist_ok=True)
    data = trained["last"].read_bytes()
    (folder / "truncated.ckpt").write_bytes(data[: len(data) // 2])
    (folder / "notes.ckpt").write_text("these are not weights\n" * 20)
    torch.save({"weights": torch.zeros(3)}, folder / "foreign.ckpt")
    return {
        "truncated": (folder / "truncated.ckpt", "truncated or not a checkpoint"),
        "text": (folder / "notes.ckpt", "truncated or not a checkpoint"),
        "foreign": (folder / "foreign.ckpt", "not a Lightning checkpoint"),
        "missing": (folder / "nope.ckpt", "does not exist"),
    }


@pytest.mark.parametrize("kind", ["truncated", "text", "foreign", "missing"])
def test_unreadable_ckpt_path(shared, trained, tmp_path, kind):
    path, problem = bad_checkpoints(trained, tmp_path / "bad")[kind]
    run = tmp_path / "run_here"
    cfg = make_config(run, shared, run / "ckpt")
    r = run_cli("fit", "--config", str(cfg), "--ckpt_path", str(path))
    assert_one_line_error(r, "ckpt_path", problem, path.name)
    assert_nothing_written(run)
    assert not (run / "run").exists()


def test_checkpoint_of_a_different_model(shared, trained, tmp_path):
    cfg = make_config(tmp_path, shared, tmp_path / "ckpt", **{"model.init_args.config.n_layers": 3})
    r = run_cli("fit", "--config", str(cfg), "--ckpt_path", str(trained["last"]))
    assert_one_line_error(r, "model.config.n_layers", "is 3", "trained with 2")
    assert_nothing_written(tmp_path)


def test_fresh_run_into_a_folder_with_checkpoints(shared, trained, tmp_path):
    before = sorted(p.name for p in trained["ckpt_dir"].iterdir())
    cfg = make_config(tmp_path, shared, trained["ckpt_dir"])
    r = run_cli("fit", "--config", str(cfg))
    assert_one_line_error(r, "ckpt_path", "already holds checkpoints", "--ckpt_path last")
    assert sorted(p.name for p in trained["ckpt_dir"].iterdir()) == before  # no last-v1.ckpt
    assert not list(trained["ckpt_dir"].parent.glob("*.lock"))


def test_nan_loss_is_one_line(shared, tmp_path):
    cfg = make_config(tmp_path, shared, tmp_path / "ckpt", **{"model.init_args.settings.optimizer.lr": 1e38})
    r = run_cli("fit", "--config", str(cfg))
    assert_one_line_error(r, "training diverged", "non-finite loss", "learning rate")
    assert_nothing_written(tmp_path)


# --- the run-folder lock -------------------------------------------------------------------------------


def test_a_second_run_into_a_locked_folder_is_refused(shared, tmp_path):
    ckpt_dir = tmp_path / "ckpt"
    lock = tmp_path / "ckpt.lock"
    code = ("import sys, time; from lmlab.atomic import FileLock; FileLock(sys.argv[1]).acquire(); "
            "print('held', flush=True); time.sleep(120)")
    holder = subprocess.Popen([sys.executable, "-c", code, str(lock)], stdout=subprocess.PIPE, text=True,
                              env={**os.environ, "PYTHONPATH": str(REPO)})
    try:
        assert holder.stdout.readline().strip() == "held"
        cfg = make_config(tmp_path, shared, ckpt_dir)
        r = run_cli("fit", "--config", str(cfg))
        assert_one_line_error(r, "trainer.callbacks.ModelCheckpoint.dirpath", "in use", f"process {holder.pid}")
        assert lock.read_text().strip() == str(holder.pid)  # the holder's lock is untouched
        assert not list(tmp_path.rglob("*.ckpt"))
    finally:
        holder.kill()
        holder.wait()


def test_stale_lock_is_taken_over_and_removed(shared, tmp_path):
    dead = subprocess.Popen(["true"])
    dead.wait()
    ckpt_dir = tmp_path / "ckpt"
    (tmp_path / "ckpt.lock").write_text(str(dead.pid))
    cfg = make_config(tmp_path, shared, ckpt_dir)
    r = run_cli("fit", "--config", str(cfg))
    assert r.returncode == 0, r.stderr[-3000:]
    assert (ckpt_dir / "last.ckpt").is_file()
    assert not list(tmp_path.rglob("*.lock"))


# --- trainer.default_root_dir names the run folder --------------------------------------------------


def test_default_root_dir_alone_names_the_run_folder(shared, tmp_path):
    """Checkpoints, logs and the run summary all follow --trainer.default_root_dir when the YAML names no other
    folder; the fresh-run refusal and the lock guard that derived folder too."""
    cfg = make_config(tmp_path, shared, **{
        "trainer.logger": {"class_path": "lmlab.loggers.CSVLogger", "init_args": {"name": "csv"}},
        "trainer.callbacks": [{"class_path": CHECKPOINT, "init_args": {"save_last": True, "every_n_train_steps": 2}},
                              {"class_path": "lmlab.scaling.run_summary.RunSummary"}]})
    run = tmp_path / "moved"
    r = run_cli("fit", "--config", str(cfg), "--trainer.default_root_dir", str(run))
    assert r.returncode == 0, r.stderr[-3000:]
    assert (run / "checkpoints" / "last.ckpt").is_file()
    assert list((run / "csv").glob("version_0/metrics.csv"))
    records = (run / "results.jsonl").read_text().splitlines()
    assert len(records) == 1 and json.loads(records[0])["results_file"] == str(run / "results.jsonl")
    assert not (tmp_path / "run").exists()  # nothing went to the YAML's own default_root_dir
    assert not list(tmp_path.rglob("*.lock"))

    before = sorted(p.name for p in (run / "checkpoints").iterdir())
    r = run_cli("fit", "--config", str(cfg), "--trainer.default_root_dir", str(run))
    assert_one_line_error(r, "ckpt_path", "already holds checkpoints", "--ckpt_path last")
    assert sorted(p.name for p in (run / "checkpoints").iterdir()) == before  # no last-v1.ckpt

    lock = tmp_path / "fresh" / "checkpoints.lock"
    lock.parent.mkdir()
    code = ("import sys, time; from lmlab.atomic import FileLock; FileLock(sys.argv[1]).acquire(); "
            "print('held', flush=True); time.sleep(120)")
    holder = subprocess.Popen([sys.executable, "-c", code, str(lock)], stdout=subprocess.PIPE, text=True,
                              env={**os.environ, "PYTHONPATH": str(REPO)})
    try:
        assert holder.stdout.readline().strip() == "held"
        r = run_cli("fit", "--config", str(cfg), "--trainer.default_root_dir", str(tmp_path / "fresh"))
        assert_one_line_error(r, "trainer.callbacks.ModelCheckpoint.dirpath", "in use", f"process {holder.pid}")
        assert not list((tmp_path / "fresh").rglob("*.ckpt"))
    finally:
        holder.kill()
        holder.wait()
