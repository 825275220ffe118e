"""A mixture-of-experts backbone under DDP and FSDP2 (two CPU processes, gloo) follows one process exactly,
resumes exactly, and recomputes (activation checkpointing) to the same losses.

One process runs the global batch of 8 as two micro-batches of 4; each of the two ranks runs its 4 rows
as one micro-batch. The router losses are taken per micro-batch (each carries its share), so both
layouts compute the same gradient and the per-step losses agree to float rounding.
"""

from __future__ import annotations

from pathlib import Path

import pytest

from helpers import CPU2, FSDP2, write_corpus
from test_cli import read_metric, run_cli, tiny_config

pytestmark = pytest.mark.slow

REPO = Path(__file__).resolve().parents[1]
STRATEGIES = REPO / "experiments" / "strategies"
STEPS = 6
MOE_MODEL = {"vocab_size": 320, "d_model": 32, "n_layers": 2, "n_heads": 4, "max_seq_len": 64,
             "moe_experts": 4, "moe_top_k": 2, "moe_expert_hidden": 48, "moe_shared_experts": 1,
             "moe_aux_loss_coef": 0.05, "moe_z_loss_coef": 0.01}


def _fit(tmp: Path, corpus: Path, *flags: str, micro: int, first: Path | None = None, **overrides) -> dict:
    common = {"trainer.max_steps": STEPS, "trainer.val_check_interval": STEPS, "model.init_args.config": MOE_MODEL,
              "data.init_args.micro_batch_size": micro, "model.init_args.settings.gradient_clip_val": 0.5}
    if first is not None:  # reuse the first run's tokenizer and token cache
        common.update({"data.init_args.tokenizer": str(first / "tok"), "data.init_args.cache_dir": str(first / "cache")})
    cfg = tiny_config(tmp, corpus, **{**common, **overrides})
    r = run_cli("fit", "--config", str(cfg), *flags)
    assert r.returncode == 0, r.stderr[-3000:]
    return {name: dict(read_metric(tmp / "run", name)) for name in ("train/loss", "train/grad_norm", "moe/load_entropy")}


def _same(run: dict, ref: dict, steps, tol: float, names=("train/loss", "train/grad_norm")) -> None:
    for name in names:
        for step in steps:
            assert run[name][step] == pytest.approx(ref[name][step], abs=tol), (name, step, run[name], ref[name])


def test_moe_ddp_fsdp2_resume_and_recomputation_match_one_process(tmp_path):
    corpus = write_corpus(tmp_path / "corpus")
    ckpt = [{"class_path": "lightning.pytorch.callbacks.ModelCheckpoint",
             "init_args": {"dirpath": str(tmp_path / "ckpt"), "every_n_train_steps": 2, "save_top_k": -1,
                           "filename": "{step}"}}]
    one = _fit(tmp_path / "one", corpus, micro=4, **{"trainer.callbacks": ckpt})
    assert sorted(one["train/loss"]) == list(range(STEPS))
    assert 0.5 < min(one["moe/load_entropy"].values()) <= 1.0  # expert load is logged every step
    first = tmp_path / "one"

    ddp = _fit(tmp_path / "ddp", corpus, "--config", str(STRATEGIES / "ddp.yaml"), *CPU2, micro=4, first=first)
    _same(ddp, one, range(STEPS), 1e-6)
    fsdp2 = _fit(tmp_path / "fsdp2", corpus, "--config", str(STRATEGIES / "fsdp2_tp.yaml"), *CPU2, *FSDP2, micro=4,
                 first=first)
    _same(fsdp2, one, range(STEPS), 1e-6)

    resumed = _fit(tmp_path / "resumed", corpus, "--ckpt_path", str(tmp_path / "ckpt" / "step=4.ckpt"), micro=4,
                   first=first)
    assert sorted(resumed["train/loss"]) == [4, 5]
    _same(resumed, one, [4, 5], 0.0, names=("train/loss",))  # bit-identical

    recomputed = _fit(tmp_path / "ac", corpus, "--model.init_args.config.activation_checkpointing=true", micro=4,
                      first=first)
    _same(recomputed, one, range(STEPS), 1e-6)
