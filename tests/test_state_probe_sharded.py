"""The planner's per-device model-state bytes against what real runs hold.

One fast single-process check of :func:`measure_state_bytes` and of the
:class:`StateBytesMonitor` hooks under lmlab-style manual optimisation, then
one CLI run per layout on two CPU processes (gloo), each rank writing what it
measured after the first optimizer step: DDP, FSDP2 (dp=2), tensor parallel
(TP=2) and DeepSpeed ZeRO-1/2/3, all at ``32-true``.

The tiny model's dimensions are multiples of 4, so FSDP2's dim-0 shards and
DeepSpeed's aligned flat partitions split evenly: parameter bytes are exact
in every layout, not merely close.
"""

from __future__ import annotations

import json
from pathlib import Path
from types import SimpleNamespace

import lightning.pytorch as pl
import pytest
import torch
import torch.nn.functional as F
import yaml

from helpers import CPU2, FSDP2, TP2, needs_deepspeed, write_corpus
from lmlab.distributed.planner import PlanInput, plan_memory
from lmlab.distributed.state_probe import StateBytesMonitor, measure_state_bytes
from lmlab.models import CausalLM, TransformerConfig
from lmlab.modules.optim import OptimizerConfig, param_groups
from test_cli import run_cli, tiny_config

REPO = Path(__file__).resolve().parents[1]
STRATEGIES = REPO / "experiments" / "strategies"

# layout: (strategy YAML, CLI flags, planner strategy, TP degree)
LAYOUTS = {
    "ddp": ("ddp.yaml", [], "ddp", 1),
    "fsdp2": ("fsdp2_tp.yaml", FSDP2, "fsdp2", 1),
    "tp2": ("fsdp2_tp.yaml", TP2, "fsdp2", 2),
    "zero1": ("deepspeed_zero1.yaml", [], "zero1", 1),
    "zero2": ("deepspeed_zero2.yaml", [], "zero2", 1),
    "zero3": ("deepspeed_zero3.yaml", [], "zero3", 1),
}


def tiny(**kw) -> TransformerConfig:
    base = dict(vocab_size=200, d_model=64, n_layers=3, n_heads=4, max_seq_len=64)
    base.update(kw)
    return TransformerConfig(**base)


# -- single process ------------------------------------------------------------------------------
def test_measure_state_bytes_single_process_equals_the_plan():
    cfg = tiny(n_kv_heads=2)
    model = CausalLM(cfg)
    opt = torch.optim.AdamW(model.parameters(), lr=1e-3, foreach=True)
    trainer = SimpleNamespace(strategy=None, optimizers=[opt])
    logits = model(torch.randint(0, 200, (2, 16)))
    F.cross_entropy(logits.flatten(0, 1), torch.randint(0, 200, (32,))).backward()
    before = measure_state_bytes(trainer, model)
    opt.step()
    after = measure_state_bytes(trainer, model)
    plan = plan_memory(PlanInput(cfg, 2, 16, "32-true", "single"), search=False)
    assert before["optimizer"] == 0  # AdamW creates its state lazily, in the first step
    assert (after["params"], after["grads"], after["optimizer"]) == (plan.params, plan.grads, plan.optimizer)


class _ManualStep(pl.LightningModule):
    """The shape of LMModuleBase's step: two micro-batches, opt.step() then zero_grad(set_to_none=True)."""

    def __init__(self, cfg: TransformerConfig):
        super().__init__()
        self.automatic_optimization = False
        self.model = CausalLM(cfg)

    def training_step(self, batch, batch_idx):
        opt = self.optimizers()
        for chunk in batch[0].split(2):
            logits = self.model(chunk[:, :-1])
            self.manual_backward(F.cross_entropy(logits.flatten(0, 1), chunk[:, 1:].flatten()))
        opt.step()
        opt.zero_grad(set_to_none=True)

    def configure_optimizers(self):
        return torch.optim.AdamW(self.model.parameters(), lr=1e-3, foreach=True)


def test_monitor_catches_gradients_that_manual_optimisation_frees_in_the_step(tmp_path):
    cfg = tiny()
    data = torch.utils.data.TensorDataset(torch.randint(0, 200, (8, 17)))
    monitor = StateBytesMonitor(str(tmp_path / "bytes"))
    trainer = pl.Trainer(accelerator="cpu", devices=1, max_steps=2, logger=False, enable_checkpointing=False,
                         enable_progress_bar=False, enable_model_summary=False, callbacks=[monitor])
    trainer.fit(_ManualStep(cfg), torch.utils.data.DataLoader(data, batch_size=4))
    plan = plan_memory(PlanInput(cfg, 2, 16, "32-true", "single"), search=False)
    written = json.loads((tmp_path / "bytes" / "rank0.json").read_text())
    assert written == monitor.result
    assert (written["params"], written["grads"], written["optimizer"]) == (plan.params, plan.grads, plan.optimizer)
    assert written["grads_at_step"] == plan.grads  # seen in on_before_optimizer_step, before zero_grad


# -- two CPU processes ---------------------------------------------------------------------------
@pytest.fixture(scope="module")
def corpus(tmp_path_factory):
    return write_corpus(tmp_path_factory.mktemp("probe") / "corpus")


def _layout_param(name: str):
    return pytest.param(name, marks=needs_deepspeed, id=name) if name.startswith("zero") else pytest.param(name, id=name)


@pytest.fixture(scope="module", params=[_layout_param(n) for n in LAYOUTS])
def run(request, corpus, tmp_path_factory):
    """One CLI run of a layout: (layout name, planned MemoryPlan, per-rank measurements, model config)."""
    name = request.param
    yaml_name, flags, strategy, tp = LAYOUTS[name]
    tmp = tmp_path_factory.mktemp(name)
    monitor = [{"class_path": "lmlab.distributed.state_probe.StateBytesMonitor",
                "init_args": {"path": str(tmp / "bytes")}}]
    # two micro-batches per data-parallel rank: ZeRO-1's full gradients live only between them
    cfg_path = tiny_config(tmp, corpus, **{"trainer.max_steps": 1, "trainer.val_check_interval": 1,
                                           "data.init_args.micro_batch_size": 2, "trainer.callbacks": monitor})
    r = run_cli("fit", "--config", str(cfg_path), "--config", str(STRATEGIES / yaml_name), *CPU2, *flags)
    assert r.returncode == 0, r.stderr[-3000:]
    tiny_yaml = yaml.safe_load(cfg_path.read_text())
    model_cfg = TransformerConfig(**tiny_yaml["model"]["init_args"]["config"])
    seq_len = tiny_yaml["data"]["init_args"]["seq_len"]
    plan = plan_memory(PlanInput(model_cfg, 2, seq_len, "32-true", strategy, world_size=2, tp=tp), search=False)
    ranks = [json.loads((tmp / "bytes" / f"rank{r}.json").read_text()) for r in range(2)]
    assert [m["rank"] for m in ranks] == [0, 1] and all(m["world_size"] == 2 for m in ranks)
    return name, plan, ranks, model_cfg


def _optimizer_groups(model_cfg: TransformerConfig) -> list[dict]:
    return param_groups(CausalLM(model_cfg), OptimizerConfig())


@pytest.mark.slow
def test_parameter_bytes_per_rank_equal_the_plan(run):
    name, plan, ranks, _ = run
    for m in ranks:
        assert m["params"] == plan.params, (name, m)


@pytest.mark.slow
def test_optimizer_bytes_per_rank_equal_the_plan(run):
    name, plan, ranks, model_cfg = run
    # DeepSpeed's wrapped AdamW sees one flat fp32 partition per parameter group, each with a 4-byte
    # step tensor the planner leaves out (it books none for ZeRO: 8 bytes here, nothing at scale)
    unplanned = 4 * len(_optimizer_groups(model_cfg)) if name.startswith("zero") else 0
    for m in ranks:
        assert m["optimizer"] == plan.optimizer + unplanned, (name, m)


@pytest.mark.slow
def test_gradient_bytes_per_rank_match_the_plan(run):
    name, plan, ranks, model_cfg = run
    if name != "zero2":
        # ZeRO-1: the peak is the full gradients accumulated between micro-batches
        for m in ranks:
            assert m["grads"] == plan.grads, (name, m)
        return
    # ZeRO-2 keeps the whole gradient of every parameter that overlaps this rank's partition, so a
    # parameter straddling the partition boundary of a flat group is held on both ranks: at least the
    # partition, at most one extra parameter per group (measured: +46% on rank 0, +23% on rank 1)
    largest = max(p.numel() * p.element_size() for p in CausalLM(model_cfg).parameters())
    slack = len(_optimizer_groups(model_cfg)) * largest
    for m in ranks:
        assert plan.grads <= m["grads"] <= plan.grads + slack, (name, m, slack)
    assert sum(m["grads"] for m in ranks) > 2 * plan.grads  # the straddlers do exist in this model


@pytest.mark.slow
@pytest.mark.parametrize("run", [_layout_param("zero1")], indirect=True)
def test_zero1_reduction_buckets_equal_the_plan(run):
    name, plan, ranks, _ = run
    # sized by DeepSpeed's bucket settings, not the model, in the gradients' dtype (fp32 here)
    for m in ranks:
        assert m["buckets"] == plan.extras["deepspeed buckets"], (name, m, plan.extras)
