"""The verifiable post-training chain, end to end on CPU: SFT -> reward model -> PPO (RM and programmatic reward), and GRPO.

    python benchmarks/posttrain_chain.py                 # full chain, a few minutes on 2 cores
    python benchmarks/posttrain_chain.py --fast          # reduced version (what the tests run)
    python benchmarks/posttrain_chain.py --task addition # the same chain on multi-digit addition
    python benchmarks/posttrain_chain.py --stages sft,ppo_fn,grpo_fn --isolate   # GRPO vs PPO, wall time + peak memory

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
* the reward model's pairwise accuracy on held-out (correct, wrong) pairs;
* GRPO (``experiments/grpo.yaml``) against PPO with the programmatic reward at
  an equal rollout budget (the same number of sampled completions: 64 per
  iteration, the same iterations), with each stage's wall time and, with
  ``--isolate`` (every stage in its own process), its peak resident memory.
  The stages run one after the other with pinned threads.
"""

from __future__ import annotations

import argparse
import copy
import json
import os
import subprocess
import sys
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Optional

import torch
import yaml

REPO = Path(__file__).resolve().parents[1]
RECIPES = REPO / "experiments" / "verifiable"
STAGES = ("sft", "reward", "ppo_rm", "ppo_fn")  # the default chain
ALL_STAGES = (*STAGES, "grpo_fn")
# recipes that live outside experiments/verifiable/
RECIPE_FILES = {"grpo_fn": REPO / "experiments" / "grpo.yaml"}
RL_NAMES = {"ppo_rm": "PPO (reward model)", "ppo_fn": "PPO (programmatic reward)", "grpo_fn": "GRPO (programmatic reward)"}
sys.path.insert(0, str(Path(__file__).resolve().parent))
from harness import pin_threads, report_ratio  # noqa: E402


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
    isolate: bool = False
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
    cfg = yaml.safe_load(RECIPE_FILES.get(stage, RECIPES / f"{stage}.yaml").read_text())
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
    if stage in RL_NAMES and s.rollout_temperature is not None:
        model.setdefault("rollout", {})["temperature"] = s.rollout_temperature
    if stage in RL_NAMES and s.ppo_iterations is not None:
        cfg["trainer"]["max_steps"] = s.ppo_iterations * optimizer_steps_per_iteration(cfg)
    path = out / "configs" / f"{stage}.yaml"
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(".tmp")
    tmp.write_text(yaml.safe_dump(cfg, sort_keys=False))
    os.replace(tmp, path)
    return path


def optimizer_steps_per_iteration(cfg: dict) -> int:
    """Optimizer steps of one RL iteration (one batch of prompts) of a PPO or GRPO recipe."""
    model, batch = cfg["model"]["init_args"], cfg["data"]["init_args"]["batch_size"]
    if "grpo" in model:
        g = model["grpo"]
        n = batch * g.get("num_generations", 8)
        return g.get("num_iterations", 1) * (n // g.get("mini_batch_size", n))
    ppo = model.get("ppo", {})
    return ppo.get("ppo_epochs", 4) * (batch // ppo.get("mini_batch_size", batch))


def completions_per_iteration(stage: str, s: ChainSettings) -> int:
    """Responses an RL stage samples per iteration (its rollout budget per iteration)."""
    cfg = yaml.safe_load(RECIPE_FILES.get(stage, RECIPES / f"{stage}.yaml").read_text())
    model, batch = cfg["model"]["init_args"], cfg["data"]["init_args"]["batch_size"]
    return batch * model.get("grpo", {}).get("num_generations", 1)


def run_stage(stage: str, s: ChainSettings) -> tuple[float, Optional[float], Optional[float]]:
    """``lmlab fit --config <out>/configs/<stage>.yaml``: wall time and, isolated, CPU seconds and peak RSS in MiB."""
    path = write_config(stage, s)
    ckpt = Path(s.out).resolve() / stage / "checkpoints" / "last.ckpt"
    if ckpt.exists():
        ckpt.unlink()  # a failed run must not leave an old checkpoint that looks like its result
    start = time.perf_counter()
    peak = cpu = None
    if s.isolate:
        # its own process, so the peak resident memory is this stage's alone
        env = {**os.environ, "PYTHONPATH": os.pathsep.join(filter(None, [str(REPO), os.environ.get("PYTHONPATH")]))}
        proc = subprocess.Popen([sys.executable, "-m", "lmlab.cli", "fit", "--config", str(path)], env=env)
        _, status, usage = os.wait4(proc.pid, 0)
        code = os.waitstatus_to_exitcode(status)
        peak = usage.ru_maxrss / 1024  # KiB on Linux
        cpu = usage.ru_utime + usage.ru_stime  # barely moved by other processes' load, unlike wall time
    else:
        from lmlab.cli import main

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
    return time.perf_counter() - start, cpu, peak


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
    for stage, name in RL_NAMES.items():
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
    rl = result.get("rl_stages", {})
    if rl:
        sft = result["policies"]["SFT"]
        lines += ["", "| RL stage (from SFT) | sampled completions | exact match before -> after | reward before -> after "
                  "| KL to SFT | wall time | CPU time | peak RSS |", "|---|---|---|---|---|---|---|---|"]
        for stage, r in rl.items():
            p = result["policies"][RL_NAMES[stage]]
            peak = f"{r['peak_rss_mib']:.0f} MiB" if r.get("peak_rss_mib") else "-"
            cpu = f"{r['cpu_seconds']:.0f}s" if r.get("cpu_seconds") else "-"
            lines.append(f"| {RL_NAMES[stage]} | {r['completions']} | {sft['greedy_exact_match']:.3f} -> {p['greedy_exact_match']:.3f} "
                         f"| {sft['sample_reward']:.3f} -> {p['sample_reward']:.3f} | {p['sample_kl']:.3f} | {r['seconds']:.0f}s | {cpu} | {peak} |")
    return "\n".join(lines)


# the raw programmatic reward of the training rollouts, as each RL stage logs it
TRAIN_REWARD_COLUMN = {"ppo_fn": "objective/raw_scores", "grpo_fn": "rewards/reward/mean"}


def training_rewards(stage: str, s: ChainSettings) -> list[tuple[int, float]]:
    """(sampled completions so far, mean reward of the rollout batch) from a stage's CSV log."""
    import csv

    out = Path(s.out).resolve()
    completions = completions_per_iteration(stage, s)
    column, points = TRAIN_REWARD_COLUMN[stage], []
    for path in sorted((out / stage).rglob("metrics.csv")):
        with open(path, newline="") as f:
            for row in csv.DictReader(f):
                if row.get(column):
                    # the logger's "step" counts training batches (= iterations) from 0
                    points.append(((int(row["step"]) + 1) * completions, float(row[column])))
    return points


def plot_training_rewards(result: dict[str, Any], s: ChainSettings, path: Path) -> Optional[Path]:
    """Training-rollout reward against sampled completions for the RL stages with a programmatic reward (PNG)."""
    curves = {stage: training_rewards(stage, s) for stage in TRAIN_REWARD_COLUMN if stage in result.get("rl_stages", {})}
    curves = {k: v for k, v in curves.items() if v}
    if not curves:
        return None
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6, 3.6))
    for stage, points in curves.items():
        xs, ys = zip(*points)
        ax.plot(xs, ys, label=RL_NAMES[stage], lw=1)
    sft = result["policies"]["SFT"]["sample_reward"]
    ax.axhline(sft, color="grey", ls="--", lw=0.8, label="SFT, held-out (temperature 1)")
    ax.set_xlabel("sampled completions")
    ax.set_ylabel("mean reward of the training rollouts")
    ax.set_title("GRPO vs PPO from the SFT policy (string reversal)")
    ax.legend(fontsize=8)
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return path


def compare_grpo_ppo(result: dict[str, Any]) -> None:
    """Print GRPO-over-PPO ratios (wall time, peak memory) when both ran on the same rollout budget."""
    rl = result.get("rl_stages", {})
    grpo, ppo = rl.get("grpo_fn"), rl.get("ppo_fn")
    if grpo is None or ppo is None:
        return
    if grpo["completions"] != ppo["completions"]:
        report_ratio("GRPO vs PPO", None, None, failed=f"unequal rollout budgets ({grpo['completions']} vs {ppo['completions']})")
        return
    differs = "GRPO: group advantages, no value model, lr 1e-4; PPO: one completion per prompt, value model + GAE, lr 3e-4"
    report_ratio("speed (wall time), GRPO over PPO", grpo["seconds"], ppo["seconds"], differs, higher_is_better=False)
    isolated = None if grpo.get("peak_rss_mib") else "CPU time and peak memory are measured with --isolate only"
    report_ratio("speed (CPU time), GRPO over PPO", grpo.get("cpu_seconds"), ppo.get("cpu_seconds"), differs,
                 higher_is_better=False, failed=isolated)
    report_ratio("peak memory, GRPO over PPO", grpo.get("peak_rss_mib"), ppo.get("peak_rss_mib"), differs, higher_is_better=False,
                 failed=isolated)


def run_chain(s: ChainSettings) -> dict[str, Any]:
    """Run the selected stages, evaluate, and write ``<out>/results.json``."""
    pin_threads(s.threads)  # tiny models: more threads only add contention
    times, rl = {}, {}
    for stage in s.stages:
        times[stage], cpu, peak = run_stage(stage, s)
        if stage in RL_NAMES:
            iterations = s.ppo_iterations
            if iterations is None:
                cfg = yaml.safe_load(Path(Path(s.out).resolve() / "configs" / f"{stage}.yaml").read_text())
                iterations = cfg["trainer"]["max_steps"] // optimizer_steps_per_iteration(cfg)
            rl[stage] = {"seconds": times[stage], "cpu_seconds": cpu, "peak_rss_mib": peak, "iterations": iterations,
                         "completions": iterations * completions_per_iteration(stage, s)}
    start = time.perf_counter()
    result = evaluate(s)
    times["eval"] = time.perf_counter() - start
    result["stage_seconds"] = times
    result["rl_stages"] = rl
    result["settings"] = asdict(s)
    out = Path(s.out).resolve()
    plot = plot_training_rewards(result, s, out / "grpo_vs_ppo.png")
    if plot is not None:
        result["training_reward_plot"] = plot.name  # beside results.json
    path = out / "results.json"
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
    p.add_argument("--stages", default=",".join(STAGES), help="comma-separated subset of " + ",".join(ALL_STAGES))
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--isolate", action="store_true", help="run every stage in its own process (measures its peak memory)")
    a = p.parse_args(argv)
    stages = tuple(x for x in a.stages.split(",") if x)
    unknown = set(stages) - set(ALL_STAGES)
    if unknown:
        p.error(f"unknown stages {sorted(unknown)}; choose from {', '.join(ALL_STAGES)}")
    s = ChainSettings(out=a.out, task=a.task, threads=a.threads, seed=a.seed, stages=stages, isolate=a.isolate)
    if a.fast:
        for k, v in FAST.items():
            setattr(s, k, v)
    for k in ("sft_steps", "rm_steps", "ppo_iterations"):
        if getattr(a, k) is not None:
            setattr(s, k, getattr(a, k))
    result = run_chain(s)
    print(format_table(result))
    compare_grpo_ppo(result)
    return 0


if __name__ == "__main__":
    sys.exit(main())
