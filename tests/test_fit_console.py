"""What `lmlab fit` prints: the quickstart's console is quiet, and the wall-time estimate comes first."""

from __future__ import annotations

import re
import types

import pytest
import torch

from lmlab.scaling import budget
from lmlab.scaling.budget import (
    ASSUMED_CPU_MFU,
    ASSUMED_MFU,
    WallTimeEstimate,
    estimate_wall_time,
    fit_matmul_shape,
    fit_training_flops,
    format_duration,
)
from lmlab.data.pretrain.batching import BatchSchedule
from lmlab.models.config import TransformerConfig
from lmlab.models.counting import training_flops
from test_cli import REPO, run_cli

STRAY = ["v_num", "Epoch 0/-2", "/-2", "pre-optimization", "FLOPs: 0", "Total FLOPs", "litlogger", "LeafSpec",
         "exists and is not empty", "Traceback"]


@pytest.mark.slow
def test_quickstart_console_is_quiet_and_estimates_first(tmp_path):
    # the quickstart config as written (relative run folders, so run inside tmp), with a smaller tokenizer sample
    args = ["fit", "--config", str(REPO / "experiments" / "quickstart.yaml"), "--trainer.max_steps=4",
             "--data.init_args.tokenizer_train.sample_chars=300000"]
    r = run_cli(*args, cwd=tmp_path)
    assert r.returncode == 0, r.stderr[-3000:]
    out = r.stdout + r.stderr
    for text in STRAY:
        assert text not in out, (text, out[-3000:])
    assert "warn" not in out.lower(), out[-3000:]
    assert re.search(r"Step\s.*\b4/4\b", out), out[-2000:]
    estimate = [ln for ln in out.splitlines() if ln.startswith("lmlab estimate:")]
    assert len(estimate) == 1, out[-3000:]
    # the quickstart's matmul: 16 x 128 tokens of one batch, d_model 128, SwiGLU hidden 384 (fp32)
    assert "1 x CPU (measured" in estimate[0] and "on a 2048x128x384 fp32 matmul" in estimate[0], estimate[0]
    assert "assumed 20% MFU" in estimate[0]
    # printed before training starts
    assert out.index("lmlab estimate:") < out.index("`Trainer.fit` stopped")
    ckpts = tmp_path / "runs" / "quickstart" / "checkpoints"
    assert sorted(p.name for p in ckpts.iterdir()) == ["last.ckpt"]
    assert not list(tmp_path.rglob("*.lock")), list(tmp_path.rglob("*.lock"))

    # resuming into the run's own folder is as quiet, and writes no last-v1.ckpt
    r = run_cli(*args[:3], "--trainer.max_steps=6", "--data.init_args.tokenizer_train.sample_chars=300000",
                "--ckpt_path", "last", cwd=tmp_path)
    assert r.returncode == 0, r.stderr[-3000:]
    out = r.stdout + r.stderr
    for text in STRAY:
        assert text not in out, (text, out[-3000:])
    assert "warn" not in out.lower(), out[-3000:]
    assert re.search(r"Step\s.*\b6/6\b", out), out[-2000:]
    assert sorted(p.name for p in ckpts.iterdir()) == ["last.ckpt"]
    assert torch.load(ckpts / "last.ckpt", weights_only=True, map_location="cpu")["global_step"] == 6
    assert not list(tmp_path.rglob("*.lock"))


def test_wall_time_arithmetic_and_line():
    est = WallTimeEstimate(flops=1e15, flops_per_device=1e12, devices=2, source="Test GPU (peak 1 TFLOP/s bf16)")
    assert ASSUMED_MFU == 0.4
    assert est.seconds == pytest.approx(1e15 / (1e12 * 2 * 0.4))  # 1250 s
    assert est.compute_for(600) == pytest.approx(600 * 1e12 * 2 * 0.4)
    line = est.line()
    assert line == ("lmlab estimate: C=1.000e+15 FLOPs on 2 x Test GPU (peak 1 TFLOP/s bf16) at an assumed 40% MFU "
                    "-> about 21 min of training (data preparation not included)")
    assert "--budget.compute" not in est.line(budget_compute=1e15)  # under an hour: no suggestion
    long = WallTimeEstimate(flops=1e18, flops_per_device=1e12, devices=1, source="CPU")  # 2.5e6 s
    assert "--budget.compute" not in long.line()  # not a budgeted run
    assert long.line(budget_compute=1e17).endswith("about 10 min here: --budget.compute=2.4e+13")
    assert [format_duration(s) for s in (42, 600, 7200, 3 * 86400)] == ["42 s", "10 min", "2.0 h", "3.0 days"]


def test_known_gpus_use_the_peak_table(monkeypatch):
    import lmlab.distributed.hardware as hw

    monkeypatch.setattr(torch.cuda, "get_device_name", lambda device=None: "NVIDIA H100 80GB HBM3")
    monkeypatch.setattr(hw, "detect_peak_flops", lambda device, precision: hw.lookup_peak_flops("NVIDIA H100 80GB HBM3", precision))
    monkeypatch.setattr(budget, "measure_matmul_flops", lambda *a, **k: pytest.fail("a listed GPU is not measured"))
    est = estimate_wall_time(989e12 * 0.4 * 8 * 3600, torch.device("cuda", 0), "bf16-mixed", devices=8)
    assert est.flops_per_device == 989e12 and est.devices == 8 and est.mfu == ASSUMED_MFU
    assert est.seconds == pytest.approx(3600)
    assert "8 x NVIDIA H100 80GB HBM3 (peak 989 TFLOP/s bf16)" in est.line()


def test_cpu_throughput_is_measured_on_the_given_matmul():
    est = estimate_wall_time(1e12, torch.device("cpu"), "32-true", shape=(256, 64, 128))
    assert est.source.startswith("CPU (measured ") and est.source.endswith("on a 256x64x128 fp32 matmul)")
    assert 1e8 < est.flops_per_device < 1e14
    assert est.mfu == ASSUMED_CPU_MFU == 0.2
    assert est.seconds == pytest.approx(1e12 / (est.flops_per_device * 0.2))


def test_training_flops_of_a_fit():
    config = TransformerConfig(vocab_size=320, d_model=32, n_layers=2, n_heads=4, max_seq_len=64)
    module = types.SimpleNamespace(config=config, flop_convention="palm")
    data = types.SimpleNamespace(schedule=BatchSchedule(8), seq_len=32)
    assert fit_training_flops(module, data, 10) == pytest.approx(training_flops(config, 10 * 8 * 32, 32, "palm"))
    assert fit_training_flops(module, data, -1) is None
    assert fit_training_flops(types.SimpleNamespace(), data, 10) is None
    assert fit_matmul_shape(module, data) == (8 * 32, 32, config.hidden_dim)
    big = types.SimpleNamespace(schedule=BatchSchedule(512), seq_len=1024)
    assert fit_matmul_shape(module, big)[0] == 8192  # timed rows capped
