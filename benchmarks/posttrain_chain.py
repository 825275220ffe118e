"""The verifiable post-training chain, end to end on CPU: SFT -> reward model -> PPO (RM and programmatic reward).

    python benchmarks/posttrain_chain.py                 # full chain, a few minutes on 2 cores
    python benchmarks/posttrain_chain.py --fast          # reduced version (what the tests run)
    python benchmarks/posttrain_chain.py --task addition # the same chain on multi-digit addition

Every stage runs through the ``lmlab fit`` CLI (in this process) with the
recipes of ``experiments/verifiable/``: the driver only rewrites their output
paths, checkpoint hand-offs, task and step counts into ``<out>/configs/``.
It then scores every policy on prompts held out from all training stages
and prints a table:

* exact match of greedy answers (fresh model, SFT, PPO against the reward
  model, PPO with the programmatic reward),
* mean programmatic reward and mean reward-model score of sampled answers
  (temperature 1, the same sampler seed for every policy),
* KL(policy || SFT) of sampled answers (summed over tokens),
* the reward model's pairwise accuracy on held-out (correct, wrong) pairs.
"""

from __future__ import annotations

import argparse
import copy
import json
import os
import sys
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Optional

import torch
import yaml

REPO = Path(__file__).resolve().parents[1]
RECIPES = REPO / "experiments" / "verifiable"
STAGES = ("sft", "reward", "ppo_rm", "ppo_fn")


@dataclass
class ChainSettings:
    """What to run. ``None`` keeps the recipe's value."""

    out: str = "runs/verifiable_chain"
    task: str = "reversal"
    sft_steps: Optional[int] = None
    rm_steps: Optional[int] = None
    ppo_iterations: Optional[int] = None
    rollout_temperature: Optional[float] = None
    train_examples: Optional[int] = None
    eval_prompts: int = 300
    eval_pairs: int = 400
    threads: int = 1
    seed: int = 0
    stages: tuple[str, ...] = STAGES
    task_args: dict[str, Any] = field(default_factory=dict)


# The reduced chain runs 20 PPO iterations. The recipes sample rollouts at temperature 0.7,
# which over 200 iterations moves greedy exact match the most; over 20 iterations sampling
# at temperature 1 gives the larger and more reliable reward gain that the tests check.
FAST = dict(rm_steps=250, ppo_iterations=20, rollout_temperature=1.0, eval_prompts=200, eval_pairs=200)

# the task-specific fields of data.verifiable for each task
TASK_ARGS = {
    "reversal": {"task": "reversal", "min_len": 2, "max_len": 5},
    "addition": {"task": "addition", "min_digits": 1, "max_digits": 2},
}


def _set(cfg: dict, dotted: str, value: Any) -> None:
    node = cfg
    keys = dotted.split(".")
    for key in keys[:-1]:
        node = node.setdefault(key, {})
    node[keys[-1]] = value


def write_config(stage: str, s: ChainSettings) -> Path:
    """The recipe of ``stage`` with this run's paths, task and lengths, written under ``<out>/configs``."""
    cfg = yaml.safe_load((RECIPES / f"{stage}.yaml").read_text())
    out = Path(s.out).resolve()
    run = out / stage
    cfg["seed_everything"] = s.seed
    _set(cfg, "trainer.default_root_dir", str(run))
    cfg["trainer"]["logger"]["init_args"]["save_dir"] = str(run)
    for cb in cfg["trainer"].get("callbacks", []):
        if cb["class_path"].endswith("ModelCheckpoint"):
            cb["init_args"]["dirpath"] = str(run / "checkpoints")
    verifiable = cfg["data"]["init_args"]["verifiable"]
    for key in ("task", "min_len", "max_len", "min_digits", "max_digits"):  # insert_fraction stays
        verifiable.pop(key, None)
    verifiable.update(TASK_ARGS[s.task])
    verifiable.update(s.task_args)
    if s.train_examples is not None:
        verifiable["n"] = s.train_examples
    model = cfg["model"]["init_args"]
    if stage != "sft":
        model["init_from"] = str(out / "sft" / "checkpoints" / "last.ckpt")
    if stage == "ppo_rm":
        model["reward_model"] = str(out / "reward" / "checkpoints" / "last.ckpt")
    if stage == "sft" and s.sft_steps is not None:
        cfg["trainer"]["max_steps"] = s.sft_steps
    if stage == "reward" and s.rm_steps is not None:
        cfg["trainer"]["max_steps"] = s.rm_steps
        cfg["trainer"]["val_check_interval"] = max(1, s.rm_steps // 2)
    if stage.startswith("ppo") and s.rollout_temperature is not None:
        model.setdefault("rollout", {})["temperature"] = s.rollout_temperature
    if stage.startswith("ppo") and s.ppo_iterations is not None:
        ppo = model.get("ppo", {})
        per_iteration = ppo.get("ppo_epochs", 4) * (cfg["data"]["init_args"]["batch_size"] // ppo.get("mini_batch_size", cfg["data"]["init_args"]["batch_size"]))
        cfg["trainer"]["max_steps"] = s.ppo_iterations * per_iteration
    path = out / "configs" / f"{stage}.yaml"
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(".tmp")
    tmp.write_text(yaml.safe_dump(cfg, sort_keys=False))
    os.replace(tmp, path)
    return path


def run_stage(stage: str, s: ChainSettings) -> float:
    """``lmlab fit --config <out>/configs/<stage>.yaml``; returns the wall time."""
    from lmlab.cli import main

    path = write_config(stage, s)
    ckpt = Path(s.out).resolve() / stage / "checkpoints" / "last.ckpt"
    if ckpt.exists():
        ckpt.unlink()  # a failed run must not leave an old checkpoint that looks like its result
    start = time.perf_counter()
    argv0 = sys.argv
    sys.argv = [argv0[0]]  # LightningCLI reads sys.argv too; give it only the explicit arguments
    try:
        code = main(["fit", "--config", str(path)])
    finally:
        sys.argv = argv0
    if code:
        raise SystemExit(f"stage {stage} failed (exit {code}); config {path}")
    if not ckpt.exists():
        raise SystemExit(f"stage {stage} wrote no checkpoint at {ckpt}")
    return time.perf_counter() - start


def _task(s: ChainSettings):
    from lmlab.data.posttrain.datamodules import VerifiableData

    args = {**TASK_ARGS[s.task], **s.task_args}
    return VerifiableData(**args, seed=0)


def rm_pairwise_accuracy(rm, s: ChainSettings) -> float:
    """Share of held-out (correct, wrong) pairs the reward model ranks right."""
    from lmlab.data.posttrain.datamodules import PreferenceDataModule
    from lmlab.modules.reward import score_sequences

    data = _task(s)
    data.n, data.val_n = 1, s.eval_pairs  # only the held-out split matters here
    dm = PreferenceDataModule("char", verifiable=data, max_length=64)
    dm.setup()
    batch = dm._collate()(dm.val_examples)
    with torch.no_grad():
        r_c = score_sequences(rm.eval(), batch["chosen_input_ids"], batch["chosen_attention_mask"])
        r_r = score_sequences(rm, batch["rejected_input_ids"], batch["rejected_attention_mask"])
    return float((r_c > r_r).float().mean())


def evaluate(s: ChainSettings) -> dict[str, Any]:
    """Score the fresh model, the SFT policy and both PPO policies on held-out prompts."""
    from lmlab.data.posttrain.datamodules import load_posttrain_tokenizer
    from lmlab.data.posttrain.verifiable import exact_match, reward
    from lmlab.models.heads import CausalLM
    from lmlab.models.checkpoint import open_checkpoint
    from lmlab.modules.posttrain_eval import policy_report

    out = Path(s.out).resolve()
    tok = load_posttrain_tokenizer("char")
    task = _task(s).make_task()
    prompts = [r["prompt"] for r in task.prompt_records(s.eval_prompts, "eval")]
    max_new = 8 if s.task == "reversal" else 6
    sft = open_checkpoint(out / "sft" / "checkpoints" / "last.ckpt", "sft").causal_lm()
    torch.manual_seed(s.seed)
    fresh = CausalLM(copy.deepcopy(sft.config))
    rm_path = out / "reward" / "checkpoints" / "last.ckpt"
    rm = open_checkpoint(rm_path, "reward").scalar_model() if rm_path.exists() else None
    policies = {"fresh model": fresh, "SFT": sft}
    for stage, name in (("ppo_rm", "PPO (reward model)"), ("ppo_fn", "PPO (programmatic reward)")):
        path = out / stage / "checkpoints" / "last.ckpt"
        if path.exists():
            policies[name] = open_checkpoint(path, stage).causal_lm()
    rows = {}
    for name, policy in policies.items():
        rows[name] = policy_report(policy, tok, prompts, reward_fn=reward, reward_model=rm, ref_model=sft,
                                   exact_match_fn=exact_match, max_new_tokens=max_new, seed=s.seed)
    result: dict[str, Any] = {"policies": rows, "eval_prompts": len(prompts)}
    if rm is not None:
        result["rm_pairwise_accuracy"] = rm_pairwise_accuracy(rm, s)
    return result


def format_table(result: dict[str, Any]) -> str:
    """The results as a Markdown table."""
    lines = [
        f"held-out prompts: {result['eval_prompts']}",
        "",
        "| policy | exact match (greedy) | reward (sampled) | RM score (sampled) | KL to SFT (sampled) |",
        "|---|---|---|---|---|",
    ]
    for name, r in result["policies"].items():
        rm = f"{r['sample_rm_score']:+.3f}" if "sample_rm_score" in r else "-"
        kl = f"{r['sample_kl']:.3f}" if name != "fresh model" else "-"
        lines.append(f"| {name} | {r['greedy_exact_match']:.3f} | {r['sample_reward']:.3f} | {rm} | {kl} |")
    if "rm_pairwise_accuracy" in result:
        lines += ["", f"reward model, held-out pairwise accuracy: {result['rm_pairwise_accuracy']:.3f}"]
    if "stage_seconds" in result:
        times = ", ".join(f"{k} {v:.0f}s" for k, v in result["stage_seconds"].items())
        lines += [f"wall time: {times} (total {sum(result['stage_seconds'].values()):.0f}s)"]
    return "\n".join(lines)


def run_chain(s: ChainSettings) -> dict[str, Any]:
    """Run the selected stages, evaluate, and write ``<out>/results.json``."""
    torch.set_num_threads(s.threads)  # tiny models: more threads only add contention
    times = {}
    for stage in s.stages:
        times[stage] = run_stage(stage, s)
    start = time.perf_counter()
    result = evaluate(s)
    times["eval"] = time.perf_counter() - start
    result["stage_seconds"] = times
    result["settings"] = asdict(s)
    path = Path(s.out).resolve() / "results.json"
    path.write_text(json.dumps(result, indent=2))
    return result


def main(argv: Optional[list[str]] = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--out", default="runs/verifiable_chain", help="output directory")
    p.add_argument("--task", choices=sorted(TASK_ARGS), default="reversal")
    p.add_argument("--fast", action="store_true", help="the reduced chain of the tests")
    p.add_argument("--sft-steps", type=int)
    p.add_argument("--rm-steps", type=int)
    p.add_argument("--ppo-iterations", type=int)
    p.add_argument("--stages", default=",".join(STAGES), help="comma-separated subset of " + ",".join(STAGES))
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--seed", type=int, default=0)
    a = p.parse_args(argv)
    stages = tuple(x for x in a.stages.split(",") if x)
    unknown = set(stages) - set(STAGES)
    if unknown:
        p.error(f"unknown stages {sorted(unknown)}; choose from {', '.join(STAGES)}")
    s = ChainSettings(out=a.out, task=a.task, threads=a.threads, seed=a.seed, stages=stages)
    if a.fast:
        for k, v in FAST.items():
            setattr(s, k, v)
    for k in ("sft_steps", "rm_steps", "ppo_iterations"):
        if getattr(a, k) is not None:
            setattr(s, k, getattr(a, k))
    result = run_chain(s)
    print(format_table(result))
    return 0


if __name__ == "__main__":
    sys.exit(main())
