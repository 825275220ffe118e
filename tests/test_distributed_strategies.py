"""Strategy YAMLs compose with an experiment, build the right Lightning objects, and bad layouts fail early."""

from __future__ import annotations

import sys
from pathlib import Path

import lightning.pytorch as pl
import pytest
import torch
import yaml

from helpers import needs_deepspeed
from lmlab.cli import main
from lmlab.distributed.hooks import accumulation_context, clip_grad_norm, data_parallel_rank_and_size, engine_grad_norm
from lmlab.distributed.validate import resolve_devices, strategy_info, validate_config
from lmlab.errors import ConfigError
from lmlab.models import CausalLM, TransformerConfig
from lmlab.models.transformer import Block

REPO = Path(__file__).resolve().parents[1]
STRATEGY_YAMLS = sorted((REPO / "experiments" / "strategies").glob("*.yaml"))

EXPECTED = {
    "ddp.yaml": "lightning.pytorch.strategies.DDPStrategy",
    "fsdp.yaml": "lightning.pytorch.strategies.FSDPStrategy",
    "fsdp_grad_op.yaml": "lightning.pytorch.strategies.FSDPStrategy",
    "fsdp_hybrid.yaml": "lightning.pytorch.strategies.FSDPStrategy",
    "fsdp2_tp.yaml": "lmlab.distributed.strategies.ModelParallel",
    "deepspeed_zero1.yaml": "lmlab.distributed.strategies.DeepSpeedZeRO",
    "deepspeed_zero2.yaml": "lmlab.distributed.strategies.DeepSpeedZeRO",
    "deepspeed_zero3.yaml": "lmlab.distributed.strategies.DeepSpeedZeRO",
    "deepspeed_zero3_offload.yaml": "lmlab.distributed.strategies.DeepSpeedZeRO",
}


def test_every_strategy_yaml_is_known():
    assert {p.name for p in STRATEGY_YAMLS} == set(EXPECTED)


@pytest.mark.parametrize("path", STRATEGY_YAMLS, ids=lambda p: p.name)
def test_strategy_yaml_composes_with_an_experiment(path, capsys, monkeypatch):
    monkeypatch.chdir(REPO)
    monkeypatch.setattr(sys, "argv", ["lmlab"])
    with pytest.raises(SystemExit) as e:
        main(["fit", "--config", "experiments/quickstart.yaml", "--config", str(path), "--print_config"])
    assert e.value.code in (0, None)
    # importing deepspeed (where installed) may log a line to stdout before the YAML
    out = "\n".join(line for line in capsys.readouterr().out.splitlines() if not line.startswith("["))
    printed = yaml.safe_load(out)
    source = yaml.safe_load(path.read_text())["trainer"]
    strategy = printed["trainer"]["strategy"]
    assert strategy["class_path"] == EXPECTED[path.name]
    for key, value in source["strategy"].get("init_args", {}).items():
        assert strategy["init_args"][key] == value, key
    # the experiment's model and data survive the composition
    assert printed["model"]["class_path"] == "lmlab.modules.PretrainModule"
    assert printed["data"]["init_args"]["batch_size"] == 16
    if "precision" in source:
        assert printed["trainer"]["precision"] == source["precision"]


def _build_strategy(path: Path):
    from jsonargparse import ArgumentParser
    from lightning.pytorch.strategies import Strategy

    parser = ArgumentParser()
    parser.add_argument("--strategy", type=Strategy)
    cfg = yaml.safe_load(path.read_text())["trainer"]["strategy"]
    return parser.instantiate(parser.parse_object({"strategy": cfg})).strategy


def test_fsdp_yamls_build_fsdp_strategies_wrapping_blocks():
    from lightning.pytorch.strategies import FSDPStrategy
    from torch.distributed.fsdp import ShardingStrategy

    expected = {"fsdp.yaml": ShardingStrategy.FULL_SHARD, "fsdp_grad_op.yaml": ShardingStrategy.SHARD_GRAD_OP,
                "fsdp_hybrid.yaml": ShardingStrategy.HYBRID_SHARD}
    for name, sharding in expected.items():
        s = _build_strategy(REPO / "experiments" / "strategies" / name)
        assert isinstance(s, FSDPStrategy)
        assert s.sharding_strategy == sharding
        assert s.kwargs["auto_wrap_policy"]._module_classes == {Block}
        assert s.kwargs["use_orig_params"] is True
    assert _build_strategy(REPO / "experiments" / "strategies" / "fsdp.yaml")._state_dict_type == "sharded"


def test_ddp_and_model_parallel_yamls_build():
    from lightning.pytorch.strategies import DDPStrategy, ModelParallelStrategy

    ddp = _build_strategy(REPO / "experiments" / "strategies" / "ddp.yaml")
    assert isinstance(ddp, DDPStrategy) and ddp._ddp_kwargs["gradient_as_bucket_view"] is True
    mp = _build_strategy(REPO / "experiments" / "strategies" / "fsdp2_tp.yaml")
    assert isinstance(mp, ModelParallelStrategy)
    assert mp.parallelize_options["param_dtype"] == "bfloat16"
    assert mp.parallelize_options["reduce_dtype"] == "float32"
    assert (mp._tensor_parallel_size, mp._data_parallel_size) == ("auto", "auto")


@needs_deepspeed
def test_deepspeed_yamls_build_the_zero_config():
    for stage in (1, 2, 3):
        s = _build_strategy(REPO / "experiments" / "strategies" / f"deepspeed_zero{stage}.yaml")
        assert s.config["zero_optimization"]["stage"] == stage
    off = _build_strategy(REPO / "experiments" / "strategies" / "deepspeed_zero3_offload.yaml")
    assert off.config["zero_optimization"]["offload_optimizer"]["device"] == "cpu"
    assert off.config["zero_optimization"]["offload_param"]["device"] == "cpu"


# -- validation -----------------------------------------------------------------------------
def _cfg(strategy="auto", accelerator="cpu", devices=1, num_nodes=1, batch=16, micro=None, model=None, **model_kw):
    config = {"vocab_size": 256, "d_model": 64, "n_layers": 2, "n_heads": 8, "n_kv_heads": 4}
    config.update(model_kw)
    data = {"batch_size": batch}
    if micro is not None:
        data["micro_batch_size"] = micro
    return {
        "trainer": {"accelerator": accelerator, "devices": devices, "num_nodes": num_nodes, "strategy": strategy},
        "model": {"class_path": model or "lmlab.modules.PretrainModule", "init_args": {"config": config}},
        "data": {"class_path": "lmlab.data.PretrainDataModule", "init_args": data},
    }


def _yaml_strategy(name: str):
    return yaml.safe_load((REPO / "experiments" / "strategies" / name).read_text())["trainer"]["strategy"]


class ParallelModule(pl.LightningModule):
    """A module that applies the parallel plan (what LMModuleBase.configure_model should do)."""

    def configure_model(self):
        from lmlab.distributed import maybe_parallelize

        maybe_parallelize(self)


def test_gpu_only_strategies_on_cpu_are_rejected_with_the_cpu_route():
    # FSDP1 cannot run on CPUs: the fix names FSDP2 through ModelParallel
    with pytest.raises(ConfigError) as e:
        validate_config(_cfg(_yaml_strategy("fsdp.yaml"), accelerator="cpu"), cuda_available=False)
    assert e.value.field == "trainer.strategy" and "tensor_parallel_size=1" in str(e.value)
    # Lightning's own DeepSpeedStrategy stops on CPUs; lmlab's subclass is the fix
    lightning_ds = {"class_path": "lightning.pytorch.strategies.DeepSpeedStrategy", "init_args": {"stage": 2}}
    with pytest.raises(ConfigError) as e:
        validate_config(_cfg(lightning_ds, accelerator="cpu"), cuda_available=False, deepspeed_available=True)
    assert "lmlab.distributed.strategies.DeepSpeedZeRO" in str(e.value)
    for name in ("fsdp", "deepspeed_stage_3"):
        with pytest.raises(ConfigError, match="needs CUDA"):
            validate_config(_cfg(name, accelerator="auto"), cuda_available=False, deepspeed_available=True)
    # lmlab's DeepSpeedZeRO runs on CPUs, unless CUDA is visible (DeepSpeed would pick the GPU)
    validate_config(_cfg(_yaml_strategy("deepspeed_zero2.yaml"), accelerator="cpu", devices=2),
                    cuda_available=False, deepspeed_available=True)
    with pytest.raises(ConfigError) as e:
        validate_config(_cfg(_yaml_strategy("deepspeed_zero2.yaml"), accelerator="cpu", devices=2),
                        cuda_available=True, gpu_count=1, deepspeed_available=True)
    assert e.value.field == "trainer.accelerator" and "CUDA_VISIBLE_DEVICES" in str(e.value)
    with pytest.raises(ConfigError) as e:
        validate_config(_cfg("ddp", accelerator="gpu"), cuda_available=False)
    assert e.value.field == "trainer.accelerator"
    # the same strategies are fine on GPUs
    validate_config(_cfg(_yaml_strategy("fsdp.yaml"), accelerator="gpu", devices=2), cuda_available=True, gpu_count=2)


def test_missing_deepspeed_is_one_line():
    with pytest.raises(ConfigError) as e:
        validate_config(_cfg(_yaml_strategy("deepspeed_zero3.yaml"), accelerator="gpu"), cuda_available=True,
                        gpu_count=1, deepspeed_available=False)
    assert "pip install deepspeed" in str(e.value) and "\n" not in str(e.value)


def test_tensor_parallel_degree_must_divide_the_heads():
    tp = lambda n, dp=1: {"class_path": "lmlab.distributed.strategies.ModelParallel",  # noqa: E731
                          "init_args": {"tensor_parallel_size": n, "data_parallel_size": dp}}
    model = f"{__name__}.ParallelModule"
    ok = dict(accelerator="gpu", devices=4, model=model)
    validate_config(_cfg(tp(4), **ok), cuda_available=True, gpu_count=4)
    with pytest.raises(ConfigError) as e:  # 8 heads but 4 kv heads: TP 8 cannot split the kv heads
        validate_config(_cfg(tp(8), accelerator="gpu", devices=8, model=model), cuda_available=True, gpu_count=8)
    assert e.value.field == "trainer.strategy.tensor_parallel_size" and "n_kv_heads=4" in str(e.value)
    with pytest.raises(ConfigError, match="world size"):  # 2 x 4 = 8 but only 4 devices
        validate_config(_cfg(tp(4, dp=2), **ok), cuda_available=True, gpu_count=4)
    with pytest.raises(ConfigError, match="configure_model"):  # the module must apply the plan
        validate_config(_cfg(tp(4), accelerator="gpu", devices=4, model="lightning.pytorch.LightningModule"),
                        cuda_available=True, gpu_count=4)
    # batch divisibility counts data-parallel replicas, not TP ranks: 4 devices as 2 x TP2 -> 2 replicas
    validate_config(_cfg(tp(2, dp=2), accelerator="gpu", devices=4, batch=6, model=model), cuda_available=True,
                    gpu_count=4)


def test_world_size_must_divide_the_global_batch():
    with pytest.raises(ConfigError) as e:
        validate_config(_cfg("ddp", devices=3, batch=16))
    assert e.value.field == "data.batch_size" and "multiple of 3" in str(e.value)
    with pytest.raises(ConfigError) as e:
        validate_config(_cfg("ddp", devices=2, num_nodes=2, batch=16, micro=8))  # 4 ranks x 8 > 16
    assert e.value.field == "data.batch_size" and "multiple of 32" in str(e.value)
    validate_config(_cfg("ddp", devices=2, num_nodes=2, batch=16, micro=2))


def test_double_activation_checkpointing_is_rejected():
    strategy = {"class_path": "lightning.pytorch.strategies.FSDPStrategy",
                "init_args": {"activation_checkpointing_policy": ["lmlab.models.transformer.Block"]}}
    with pytest.raises(ConfigError, match="activation_checkpointing"):
        validate_config(_cfg(strategy, accelerator="gpu", activation_checkpointing=True), cuda_available=True,
                        gpu_count=1)


def test_strategy_info_and_device_resolution():
    assert strategy_info("deepspeed_stage_3_offload").stage == 3
    assert strategy_info("fsdp").kind == "fsdp"
    assert strategy_info(_yaml_strategy("fsdp_grad_op.yaml")).sharding == "SHARD_GRAD_OP"
    assert strategy_info(_yaml_strategy("deepspeed_zero1.yaml")).stage == 1
    assert strategy_info(_yaml_strategy("fsdp2_tp.yaml")).kind == "model_parallel"
    assert strategy_info("ddp_spawn").kind == "ddp"
    assert resolve_devices("auto", on_gpu=True, gpu_count=8) == 8
    assert resolve_devices("0,1,3", on_gpu=True, gpu_count=8) == 3
    assert resolve_devices(-1, on_gpu=True, gpu_count=4) == 4
    assert resolve_devices([0, 1], on_gpu=True, gpu_count=4) == 2


# -- step hooks without a distributed strategy --------------------------------------------------
def test_clip_grad_norm_matches_torch_on_one_device():
    torch.manual_seed(0)
    model = CausalLM(TransformerConfig(vocab_size=64, d_model=32, n_layers=2, n_heads=4, max_seq_len=16))
    holder = pl.LightningModule()
    holder.model = model
    model(torch.randint(0, 64, (2, 8))).square().mean().backward()
    ref = [p.grad.clone() for p in model.parameters()]
    norm = clip_grad_norm(holder, 1e-3)
    expected = torch.linalg.vector_norm(torch.stack([torch.linalg.vector_norm(g) for g in ref]))
    torch.testing.assert_close(norm, expected)
    scale = 1e-3 / (expected + 1e-6)
    for p, g in zip(model.parameters(), ref):
        torch.testing.assert_close(p.grad, g * scale)
    assert clip_grad_norm(holder, 0.0) == pytest.approx(1e-3, rel=1e-3)  # measuring only: no further change
    assert data_parallel_rank_and_size(None) == (0, 1)
    with accumulation_context(holder, last=False):
        pass


def test_step_hooks_dispatch_to_deepspeed_and_fsdp1():
    """DeepSpeed accumulates via its boundary flag and clips itself; FSDP1 clips through its root module."""

    class DeepSpeedEngine:  # the class name is what the hooks recognise
        def __init__(self):
            self.boundaries = []

        def set_gradient_accumulation_boundary(self, flag):
            self.boundaries.append(flag)

        def get_global_grad_norm(self):
            return 3.5

    class FullyShardedDataParallel:
        def clip_grad_norm_(self, max_norm):
            self.max_norm = max_norm
            return torch.tensor(2.0)

    holder = pl.LightningModule()
    holder.model = torch.nn.Linear(2, 2)
    engine = DeepSpeedEngine()
    holder._trainer = type("T", (), {"strategy": type("S", (), {"model": engine})()})()
    for i in range(3):
        with accumulation_context(holder, last=i == 2):
            pass
    assert engine.boundaries == [False, False, True]
    # the engine clips inside its step: nothing to report before it, its own norm after it
    assert clip_grad_norm(holder, 1.0) is None
    assert float(engine_grad_norm(holder)) == 3.5

    fsdp = FullyShardedDataParallel()
    holder._trainer = type("T", (), {"strategy": type("S", (), {"model": fsdp})()})()
    assert float(clip_grad_norm(holder, 1.0)) == 2.0 and fsdp.max_norm == 1.0
    clip_grad_norm(holder, 0.0)
    assert fsdp.max_norm == float("inf")  # measure only
