"""The reduced verifiable chain (SFT -> reward model -> PPO x2, GRPO) through the CLI recipes: every effect points the right way.

Runs ``benchmarks/posttrain_chain.py --fast`` in-process: the ``experiments/verifiable``
recipes with fewer steps, then scores each policy on held-out prompts.
"""

from __future__ import annotations

import importlib.util
import sys
from pathlib import Path

import pytest
import torch

REPO = Path(__file__).resolve().parents[1]


def _chain_module():
    spec = importlib.util.spec_from_file_location("posttrain_chain", REPO / "benchmarks" / "posttrain_chain.py")
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module
    spec.loader.exec_module(module)
    return module


@pytest.mark.slow
def test_reduced_chain_improves_each_stage(tmp_path):
    chain = _chain_module()
    threads = torch.get_num_threads()
    try:
        settings = chain.ChainSettings(out=str(tmp_path / "chain"), stages=chain.ALL_STAGES, **chain.FAST)
        result = chain.run_chain(settings)
    finally:
        torch.set_num_threads(threads)
    p = result["policies"]
    fresh, sft = p["fresh model"], p["SFT"]
    ppo_rm, ppo_fn = p["PPO (reward model)"], p["PPO (programmatic reward)"]
    for stage in chain.ALL_STAGES:
        assert (tmp_path / "chain" / stage / "checkpoints" / "last.ckpt").exists(), stage

    # SFT learns the task: held-out exact match far above a fresh model's
    assert fresh["greedy_exact_match"] < 0.05
    assert sft["greedy_exact_match"] > fresh["greedy_exact_match"] + 0.3, p
    # the reward model ranks held-out (correct, wrong) pairs
    assert result["rm_pairwise_accuracy"] >= 0.8, result["rm_pairwise_accuracy"]
    # PPO with the programmatic reward raises the reward of sampled answers, staying near the reference
    assert ppo_fn["sample_reward"] > sft["sample_reward"] + 0.05, (sft, ppo_fn)
    assert 0.0 < ppo_fn["sample_kl"] < 2.0
    # PPO against the reward model raises the reward model's score, staying near the reference
    assert ppo_rm["sample_rm_score"] > sft["sample_rm_score"] + 0.3, (sft, ppo_rm)
    assert 0.0 < ppo_rm["sample_kl"] < 2.0
    # and every answer still ends properly
    assert ppo_rm["greedy_eos_rate"] > 0.9 and ppo_fn["greedy_eos_rate"] > 0.9
    # GRPO samples as many completions as PPO (8 prompts x 8 instead of 64 prompts) and stays near the reference
    grpo = p["GRPO (programmatic reward)"]
    rl = result["rl_stages"]
    assert rl["grpo_fn"]["completions"] == rl["ppo_fn"]["completions"] == 20 * 64
    assert 0.0 < grpo["sample_kl"] < 2.0 and grpo["greedy_eos_rate"] > 0.9
    table = chain.format_table(result)
    assert "PPO (reward model)" in table and "pairwise accuracy" in table and "GRPO (programmatic reward)" in table
