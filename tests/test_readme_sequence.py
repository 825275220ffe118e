"""The README's newcomer path, run as written: quickstart, eval, perplexity, export, SFT from the checkpoint, plan.

The commands are read from README.md itself (its ``bash`` blocks and inline
code), so a README that drifts from the code fails here. Only step-limiting
flags are appended (fewer training steps, documents and task examples). They
run in a fresh folder laid out like a checkout: ``experiments/`` beside the
working directory and ``../shared`` resolving to the shared data.
"""

from __future__ import annotations

import json
import os
import re
import shlex
import shutil
import subprocess
import sys

import pytest
import torch

pytestmark = [pytest.mark.slow, pytest.mark.shared_data]

QS_CKPT = "runs/quickstart/checkpoints/last.ckpt"


def readme_commands(repo_root) -> list[list[str]]:
    """Every ``lmlab ...`` command of README.md, as argument lists (continuations joined, comments dropped)."""
    text = (repo_root / "README.md").read_text()
    lines = []
    for block in re.findall(r"```bash\n(.*?)```", text, re.S):
        lines += re.sub(r"\\\n\s*", " ", block).splitlines()
    lines += re.findall(r"`(lmlab [^`]+)`", text)
    commands = []
    for line in lines:
        toks = shlex.split(line, comments=True)
        if toks[:1] == ["lmlab"]:
            commands.append(toks)
    return commands


def pick(commands: list[list[str]], what: str, match) -> list[str]:
    found = [c for c in commands if match(c)]
    assert found, f"README.md has no {what} command"
    return found[0]


def test_the_readme_sequence_runs_as_written(shared_data, repo_root, tmp_path):
    from transformers import AutoModelForCausalLM

    from lmlab.models.checkpoint import open_checkpoint

    bindir = os.path.dirname(sys.executable)
    if shutil.which("lmlab", path=bindir + os.pathsep + os.environ.get("PATH", "")) is None:
        pytest.skip("the lmlab console script is not installed")
    work = tmp_path / "checkout"
    work.mkdir()
    (work / "experiments").symlink_to(repo_root / "experiments", target_is_directory=True)
    (tmp_path / "shared").symlink_to(shared_data.parent, target_is_directory=True)
    env = {**os.environ, "PATH": bindir + os.pathsep + os.environ.get("PATH", ""),
           "PYTHONPATH": os.pathsep.join([str(repo_root), *filter(None, [os.environ.get("PYTHONPATH")])]),
           "WANDB_MODE": "offline", "WANDB_SILENT": "true", "TOKENIZERS_PARALLELISM": "false"}
    env.pop("LMLAB_EVAL_DATA", None)  # the eval sets are found where the README says, ../shared/data/eval

    def run(toks: list[str], *limits: str) -> str:
        cmd = shlex.join([*toks, *limits])
        done = subprocess.run(cmd, shell=True, cwd=work, env=env, capture_output=True, text=True, timeout=600)
        assert done.returncode == 0, f"{cmd} exited {done.returncode}:\n{done.stderr[-3000:]}"
        return done.stdout

    commands = readme_commands(repo_root)
    quickstart = pick(commands, "quickstart", lambda c: c == ["lmlab", "fit", "--config", "experiments/quickstart.yaml"])
    evaluate = pick(commands, "eval", lambda c: c[:3] == ["lmlab", "eval", "--ckpt"] and "--tasks" in c)
    perplexity = pick(commands, "perplexity", lambda c: c[:3] == ["lmlab", "eval", "perplexity"] and QS_CKPT in c)
    export = pick(commands, "export", lambda c: c[:2] == ["lmlab", "export"] and QS_CKPT in c)
    sft = pick(commands, "offline SFT", lambda c: c[:4] == ["lmlab", "fit", "--config", "experiments/sft.yaml"]
               and "--data.source" in c)
    plan = pick(commands, "plan", lambda c: c[:2] == ["lmlab", "plan"] and "--config" in c)
    override = pick(commands, "override", lambda c: c[:4] == ["lmlab", "fit", "--config", "experiments/quickstart.yaml"]
                    and any(t.startswith("--model.config.") for t in c))
    for toks in (evaluate, perplexity, export, sft):
        assert QS_CKPT in toks  # every later stage reads the checkpoint the quickstart writes

    run(quickstart, "--trainer.max_steps=10")
    qs = work / QS_CKPT
    assert qs.is_file() and (work / "runs/quickstart/results.jsonl").is_file()
    assert list((work / "runs/quickstart/csv").glob("version_*/metrics.csv"))
    source = open_checkpoint(qs)
    assert source.stage == "pretrain" and source.meta.get("tokenizer_files")

    # the README's override example, run next: its own run folder, the quickstart's left as it was
    qs_bytes = qs.read_bytes()
    run(override, "--trainer.max_steps=2")
    root = next(t.split("=", 1)[1] for t in override if t.startswith("--trainer.default_root_dir="))
    assert root != "runs/quickstart" and (work / root / "checkpoints/last.ckpt").is_file()
    assert (work / root / "results.jsonl").is_file() and list((work / root / "csv").glob("version_*/metrics.csv"))
    assert open_checkpoint(work / root / "checkpoints/last.ckpt").require_config().n_layers == 6
    assert qs.read_bytes() == qs_bytes and not list(qs.parent.glob("last-v*.ckpt"))

    run(evaluate, "--limit", "2")
    out = work / evaluate[evaluate.index("--out") + 1]
    results = json.loads((out / "results.json").read_text())["results"]
    for task in evaluate[evaluate.index("--tasks") + 1].split(","):
        assert results[task]["n"] >= 1 and (out / f"samples_{task}.jsonl").is_file()

    printed = run(perplexity, "--max-documents", "2")
    row = next(line.split() for line in printed.splitlines() if line.split()[:1] == ["all"])
    assert 1.0 < float(row[3]) < 2048.0  # a perplexity below the vocabulary size: the model learned something

    printed = run(export)
    hf_dir = work / export[export.index("--out") + 1]
    assert "LlamaForCausalLM" in printed and (hf_dir / "tokenizer.json").is_file()
    ids = torch.randint(7, len(source.tokenizer()), (1, 16))
    with torch.no_grad():
        theirs = AutoModelForCausalLM.from_pretrained(hf_dir)(ids).logits
        ours = source.causal_lm()(ids)[..., : theirs.shape[-1]]
    assert torch.allclose(theirs, ours, atol=1e-4)

    run(sft, "--trainer.max_steps=2")
    tuned = open_checkpoint(work / "runs/sft/checkpoints/last.ckpt")
    assert tuned.stage == "sft" and tuned.require_config() == source.require_config()
    assert tuned.tokenizer_info == source.tokenizer_info

    distill = pick(commands, "distillation", lambda c: c == ["lmlab", "fit", "--config", "experiments/distill.yaml"])
    run(distill, "--trainer.max_steps=2")
    student = open_checkpoint(work / "runs/distill/checkpoints/last.ckpt")
    assert student.stage == "distill" and student.meta["teacher"] == QS_CKPT
    assert student.tokenizer_info == source.tokenizer_info and student.require_config().d_model == 64

    printed = run(plan)
    assert "fits:" in printed and "FLOPs" in printed
