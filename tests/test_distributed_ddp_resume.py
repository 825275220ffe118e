"""A checkpoint written by a 2-process DDP run (gloo, CPU) resumes in one process on the same trajectory."""

from __future__ import annotations

import pytest

from helpers import write_corpus
from test_cli import read_metric, run_cli, tiny_config


@pytest.mark.slow
def test_ddp_checkpoint_resumes_at_world_size_one(tmp_path):
    corpus = write_corpus(tmp_path / "corpus")
    ckpt_dir = tmp_path / "ckpt"
    callbacks = [{"class_path": "lightning.pytorch.callbacks.ModelCheckpoint",
                  "init_args": {"dirpath": str(ckpt_dir), "every_n_train_steps": 2, "save_top_k": -1,
                                "filename": "{step}"}}]
    common = {"trainer.max_steps": 6, "trainer.val_check_interval": 6, "trainer.callbacks": callbacks}

    # world size 2 through the strategy YAML, composed with the experiment like a user would
    two = tiny_config(tmp_path / "two", corpus, **common)
    r = run_cli("fit", "--config", str(two), "--config", "experiments/strategies/ddp.yaml", "--trainer.devices=2")
    assert r.returncode == 0, r.stderr[-3000:]
    assert (ckpt_dir / "step=4.ckpt").exists()
    ddp_losses = dict(read_metric(tmp_path / "two" / "run", "train/loss"))
    assert sorted(ddp_losses) == [0, 1, 2, 3, 4, 5]

    # world size 1 picks up the step-4 checkpoint: model, AdamW state, LR schedule and data position
    # (same tokenizer and token cache as the first run: nothing to rebuild)
    one = tiny_config(tmp_path / "one", corpus, **{**common, "trainer.callbacks": None,
                                                    "data.init_args.tokenizer": str(tmp_path / "two" / "tok"),
                                                    "data.init_args.cache_dir": str(tmp_path / "two" / "cache")})
    r = run_cli("fit", "--config", str(one), "--ckpt_path", str(ckpt_dir / "step=4.ckpt"))
    assert r.returncode == 0, r.stderr[-3000:]
    resumed = dict(read_metric(tmp_path / "one" / "run", "train/loss"))
    assert sorted(resumed) == [4, 5]
    for step in (4, 5):
        assert resumed[step] == pytest.approx(ddp_losses[step], abs=1e-4), (step, resumed, ddp_losses)
