"""Sharded strategies on two CPU processes (gloo) follow DDP's trajectory exactly.

Every run goes through the CLI with the strategy YAMLs users compose, with
micro-batching (two micro-batches per rank) and an active gradient clip, so
the strategy-aware accumulation and clipping hooks are what is compared:

- FSDP2 (``ModelParallel``, data_parallel_size=2) and tensor parallel (TP=2);
- DeepSpeed ZeRO stages 1, 2 and 3 (``DeepSpeedZeRO`` on DeepSpeed's CPU accelerator);
- distributed checkpoints: TP=2 resumes in TP=2 exactly and in FSDP2 at the
  rounding level; a ZeRO-3 checkpoint resumes exactly;
- ZeRO-3 with optimizer and parameter offload (DeepSpeedCPUAdam).
"""

from __future__ import annotations

import shutil
import signal
from pathlib import Path

import pytest

from helpers import CPU2, FSDP2, TP2, needs_deepspeed, write_corpus
from test_cli import read_metric, run_cli, tiny_config

pytestmark = pytest.mark.slow

REPO = Path(__file__).resolve().parents[1]
STRATEGIES = REPO / "experiments" / "strategies"

STEPS = 6
# clip well below the gradient norm (about 0.9 here) so clipping changes every update
COMMON = {"trainer.max_steps": STEPS, "trainer.val_check_interval": STEPS,
          "data.init_args.micro_batch_size": 2, "model.init_args.settings.gradient_clip_val": 0.2}


def _checkpoints(ckpt_dir: Path) -> list:
    return [{"class_path": "lightning.pytorch.callbacks.ModelCheckpoint",
             "init_args": {"dirpath": str(ckpt_dir), "every_n_train_steps": 2, "save_top_k": -1, "filename": "{step}"}}]


def _fit(tmp: Path, corpus: Path, yaml_name: str, *flags: str, **overrides) -> dict:
    cfg = tiny_config(tmp, corpus, **{**COMMON, **overrides})
    args = ("fit", "--config", str(cfg), "--config", str(STRATEGIES / yaml_name), *CPU2, *flags)
    r = run_cli(*args)
    if r.returncode == -signal.SIGABRT and "terminate called without an active exception" in r.stderr[-300:]:
        # DeepSpeed's ZeRO-3 offload threads now and then abort the interpreter's exit after training
        # finished (a C++ thread still joinable at teardown); the run itself is repeated from scratch once
        shutil.rmtree(tmp / "run", ignore_errors=True)
        r = run_cli(*args)
    assert r.returncode == 0, r.stderr[-3000:]
    return {name: dict(read_metric(tmp / "run", f"train/{name}")) for name in ("loss", "grad_norm")}


def _assert_same(run: dict, ref: dict, steps, tol: float, what=("loss", "grad_norm")) -> None:
    for name in what:
        for step in steps:
            assert run[name][step] == pytest.approx(ref[name][step], abs=tol), (name, step, run[name], ref[name])


@pytest.fixture(scope="module")
def corpus(tmp_path_factory):
    return write_corpus(tmp_path_factory.mktemp("sharded") / "corpus")


@pytest.fixture(scope="module")
def ddp(corpus, tmp_path_factory):
    run = _fit(tmp_path_factory.mktemp("ddp"), corpus, "ddp.yaml")
    assert sorted(run["loss"]) == list(range(STEPS))
    # the clip is active: every pre-clip norm is well above it
    assert min(run["grad_norm"].values()) > 0.5
    return run


@pytest.fixture(scope="module")
def tp_run(corpus, tmp_path_factory):
    tmp = tmp_path_factory.mktemp("tp")
    run = _fit(tmp, corpus, "fsdp2_tp.yaml", *TP2, **{"trainer.callbacks": _checkpoints(tmp / "ckpt")})
    return tmp, run


def test_fsdp2_matches_ddp(corpus, tmp_path, ddp):
    _assert_same(_fit(tmp_path, corpus, "fsdp2_tp.yaml", *FSDP2), ddp, range(STEPS), 1e-5)


def test_tensor_parallel_matches_ddp(tp_run, ddp):
    _assert_same(tp_run[1], ddp, range(STEPS), 1e-5)


def _resume(tmp: Path, corpus: Path, first: Path, yaml_name: str, flags: list, ckpt: Path) -> dict:
    cfg = tiny_config(tmp, corpus, **{**COMMON, "data.init_args.tokenizer": str(first / "tok"),
                                      "data.init_args.cache_dir": str(first / "cache")})
    r = run_cli("fit", "--config", str(cfg), "--config", str(STRATEGIES / yaml_name), *CPU2, *flags,
                "--ckpt_path", str(ckpt))
    assert r.returncode == 0, r.stderr[-3000:]
    return {"loss": dict(read_metric(tmp / "run", "train/loss"))}


def test_distributed_checkpoint_resumes_in_the_same_and_another_layout(corpus, tmp_path, tp_run):
    first, run = tp_run
    ckpt = first / "ckpt" / "step=2.ckpt"
    assert ckpt.is_dir() and (ckpt / ".metadata").exists()  # one shard per rank, not a gathered file
    same = _resume(tmp_path / "tp", corpus, first, "fsdp2_tp.yaml", TP2, ckpt)
    assert sorted(same["loss"]) == [2, 3, 4, 5]
    _assert_same(same, run, [2, 3, 4, 5], 1e-6, what=("loss",))
    # TP=2 shards reloaded as FSDP2 shards: weights and Adam moments of the fused q/k/v and gate/up
    # rows are stored in canonical order, so only float rounding separates the runs (moments paired
    # with the wrong rows put the step-5 loss 1e-5 off)
    other = _resume(tmp_path / "fsdp2", corpus, first, "fsdp2_tp.yaml", FSDP2, ckpt)
    _assert_same(other, run, [2, 3, 4, 5], 3e-6, what=("loss",))


@needs_deepspeed
@pytest.mark.parametrize("stage", [1, 2])
def test_deepspeed_zero_matches_ddp(corpus, tmp_path, ddp, stage):
    _assert_same(_fit(tmp_path, corpus, f"deepspeed_zero{stage}.yaml"), ddp, range(STEPS), 1e-5)


@needs_deepspeed
def test_deepspeed_zero3_matches_ddp_and_resumes(corpus, tmp_path, ddp):
    first = tmp_path / "first"
    run = _fit(first, corpus, "deepspeed_zero3.yaml", **{"trainer.callbacks": _checkpoints(first / "ckpt")})
    # ZeRO-3 adds micro-batch gradients into partitioned buffers: losing one would halve the norm
    _assert_same(run, ddp, range(STEPS), 1e-5)
    resumed = _resume(tmp_path / "resumed", corpus, first, "deepspeed_zero3.yaml", [], first / "ckpt" / "step=4.ckpt")
    assert sorted(resumed["loss"]) == [4, 5]
    _assert_same(resumed, run, [4, 5], 1e-6, what=("loss",))


@pytest.mark.parametrize("layout", [pytest.param("zero2", marks=needs_deepspeed), "tp2"])
def test_bf16_recomputation_and_sharding_combine(corpus, tmp_path, ddp, layout):
    """bf16 compute, block recomputation and sharding switched on together still track the fp32 run."""
    if layout == "zero2":
        run = _fit(tmp_path, corpus, "deepspeed_zero2.yaml", "--trainer.precision=bf16-mixed",
                   "--model.init_args.config.activation_checkpointing=true")
    else:
        run = _fit(tmp_path, corpus, "fsdp2_tp.yaml", *TP2, "--trainer.strategy.init_args.param_dtype=bfloat16",
                   "--trainer.strategy.init_args.activation_checkpointing=true")
    assert sorted(run["loss"]) == list(range(STEPS))
    gaps = [abs(run["loss"][s] - ddp["loss"][s]) for s in range(STEPS)]
    assert max(gaps) > 1e-5, gaps  # bf16 is really in use: not the fp32 numbers
    # and only bf16 rounding separates them (measured up to 4e-4), far below the 0.36 the loss falls
    assert max(gaps) < 5e-3, gaps


def _cpu_adam_builds() -> bool:
    # DeepSpeedCPUAdam compiles a C++ op on first use (about a minute; needs a compiler)
    try:
        import torch
        from deepspeed.ops.adam import DeepSpeedCPUAdam

        DeepSpeedCPUAdam([torch.nn.Parameter(torch.zeros(2))], lr=0.1)
        return True
    except Exception:  # noqa: BLE001 - any build failure means the op is unavailable here
        return False


@needs_deepspeed
def test_deepspeed_zero3_offload_matches_ddp(corpus, tmp_path, ddp):
    if not _cpu_adam_builds():
        pytest.skip("DeepSpeedCPUAdam could not be built here (needs a C++ compiler and Python headers)")
    # the YAML offloads optimizer state and parameters to host memory; AdamW runs as DeepSpeedCPUAdam
    _assert_same(_fit(tmp_path, corpus, "deepspeed_zero3_offload.yaml"), ddp, range(STEPS), 1e-5)
