"""The documented multi-node launches, on one machine: 2 "nodes" x 1 CPU process each.

- torchrun, one command per node (Lightning's TorchElasticEnvironment);
- SLURM, with the variables ``srun`` sets for each task (Lightning's SLURMEnvironment).

Both must reproduce the losses of the same job that Lightning launches itself
as 2 processes on one node: ``num_nodes`` x ``devices``, the ranks and the
data each rank reads all come out the same.
"""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

from helpers import write_corpus, free_port
from test_cli import read_metric, run_cli, tiny_config

pytestmark = pytest.mark.slow

REPO = Path(__file__).resolve().parents[1]
DDP = str(REPO / "experiments" / "strategies" / "ddp.yaml")
COMMON = {"trainer.max_steps": 4, "trainer.val_check_interval": 4, "data.init_args.micro_batch_size": 2}
TWO_NODES = ["--trainer.num_nodes=2", "--trainer.devices=1"]


def _env() -> dict:
    env = {k: v for k, v in os.environ.items() if not k.startswith(("SLURM_", "TORCHELASTIC_"))}
    return {**env, "PYTHONUNBUFFERED": "1", "WANDB_MODE": "offline"}


def _run_nodes(commands: list[list[str]], envs: list[dict]) -> None:
    procs = [subprocess.Popen(cmd, cwd=REPO, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
             for cmd, env in zip(commands, envs)]
    outs = [p.communicate(timeout=600) for p in procs]
    for rank, (p, (out, err)) in enumerate(zip(procs, outs)):
        assert p.returncode == 0, err[-3000:]
        # one job of world size 2, not two jobs of world size 1 (whose losses would be the same:
        # each would read the whole global batch)
        assert f"GLOBAL_RANK: {rank}, MEMBER: {rank + 1}/2" in out + err, (out + err)[-3000:]


@pytest.fixture(scope="module")
def corpus(tmp_path_factory):
    return write_corpus(tmp_path_factory.mktemp("launch") / "corpus")


@pytest.fixture(scope="module")
def one_node(corpus, tmp_path_factory):
    tmp = tmp_path_factory.mktemp("one_node")
    r = run_cli("fit", "--config", str(tiny_config(tmp, corpus, **COMMON)), "--config", DDP, "--trainer.devices=2")
    assert r.returncode == 0, r.stderr[-3000:]
    losses = dict(read_metric(tmp / "run", "train/loss"))
    assert sorted(losses) == [0, 1, 2, 3]
    return losses


def test_torchrun_two_nodes_match_one_node(corpus, tmp_path, one_node):
    cfg = str(tiny_config(tmp_path, corpus, **COMMON))
    port = free_port()
    torchrun = [sys.executable, "-m", "torch.distributed.run", "--nnodes=2", "--nproc-per-node=1",
                "--master-addr=127.0.0.1", f"--master-port={port}"]
    cmds = [[*torchrun, f"--node-rank={n}", "-m", "lmlab", "fit", "--config", cfg, "--config", DDP, *TWO_NODES]
            for n in (0, 1)]
    _run_nodes(cmds, [_env(), _env()])
    losses = dict(read_metric(tmp_path / "run", "train/loss"))
    assert losses == pytest.approx(one_node, abs=1e-6)


def test_slurm_two_nodes_match_one_node(corpus, tmp_path, one_node):
    cfg = str(tiny_config(tmp_path, corpus, **COMMON))
    port = str(free_port())
    cmd = [sys.executable, "-m", "lmlab", "fit", "--config", cfg, "--config", DDP, *TWO_NODES]
    # what `srun` exports to each task of a 2-node, 1-task-per-node allocation
    envs = [{**_env(), "SLURM_NTASKS": "2", "SLURM_NTASKS_PER_NODE": "1", "SLURM_PROCID": str(n), "SLURM_LOCALID": "0",
             "SLURM_NODEID": str(n), "SLURM_NODELIST": "127.0.0.1", "SLURM_JOB_ID": "4242", "SLURM_JOB_NAME": "lmlab",
             "MASTER_PORT": port} for n in (0, 1)]
    _run_nodes([cmd, cmd], envs)
    losses = dict(read_metric(tmp_path / "run", "train/loss"))
    assert losses == pytest.approx(one_node, abs=1e-6)
