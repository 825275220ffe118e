"""``lmlab eval``: downstream tasks and perplexity for a checkpoint.

::

    lmlab eval --ckpt runs/x/last.ckpt --tasks hellaswag,arc_easy,gsm8k --limit 100 --out evals/x
    lmlab eval perplexity --ckpt runs/x/last.ckpt --config experiments/quickstart.yaml
    lmlab eval perplexity --ckpt exports/x --text notes.txt --stride 256
    lmlab eval tasks                          # the built-in task names
    lmlab eval compare ...                    # forwarded to lmlab.eval.compare_cli when installed

``--ckpt`` is a Lightning ``.ckpt``, an lmlab export or an HF export
directory; the tokenizer defaults to the one the run recorded in the
checkpoint (older checkpoints: beside it or in its run's ``config.yaml``).
Task data is read from ``--data_dir`` (default ``$LMLAB_EVAL_DATA``, else
``data/eval`` under the working directory).
"""

from __future__ import annotations

import argparse
import importlib
import importlib.util
import json
import sys
from pathlib import Path
from typing import Any, Optional, Union

from lmlab.errors import ConfigError
from lmlab.models.export import Dtype, parse_dtype

PROG = "lmlab eval"
COMPARE_MODULE = "lmlab.eval.compare_cli"
_NON_METRICS = ("n", "num_fewshot", "skipped_rows", "source", "subtasks")


def _device(name: Optional[str]) -> str:
    import torch

    if name is None:
        return "cuda" if torch.cuda.is_available() else "cpu"
    if name.startswith("cuda") and not torch.cuda.is_available():
        raise ConfigError("--device", f"{name} requested but CUDA is not available", "use --device cpu")
    return name


# --- commands ----------------------------------------------------------------------------------------


def _load(args: argparse.Namespace, fallback_tokenizer: Optional[str] = None):
    from lmlab.models.checkpoint import open_checkpoint

    if args.batch_size < 1:
        raise ConfigError("--batch_size", f"must be >= 1, got {args.batch_size}")
    device = _device(args.device)
    ckpt = open_checkpoint(args.ckpt, "--ckpt")
    tokenizer = ckpt.tokenizer(args.tokenizer, fallback=fallback_tokenizer)
    model = ckpt.causal_lm(device=device, dtype=parse_dtype(args.dtype))
    return model, tokenizer, device


def run_tasks(
    ckpt: str,
    tasks: str,
    tokenizer: Optional[str] = None,
    batch_size: int = 16,
    max_length: Optional[int] = None,
    device: Optional[str] = None,
    dtype: Optional[Dtype] = None,
    limit: Optional[Union[int, float]] = None,
    num_fewshot: Optional[int] = None,
    data_dir: Optional[str] = None,
    out: Optional[str] = None,
    seed: int = 1234,
    online: bool = False,
    progress: bool = True,
    allow_unsandboxed: bool = False,
) -> int:
    """Evaluate a checkpoint on downstream tasks (the default: ``lmlab eval --ckpt ... --tasks ...``).

    Args:
        ckpt: Lightning .ckpt, lmlab export or HF export directory.
        tasks: Comma-separated task names or task YAML paths.
        tokenizer: Tokenizer directory (default: beside the checkpoint / its run config).
        batch_size: Requests per forward pass.
        max_length: Longest input (default: the model's max_seq_len).
        device: cpu, cuda, cuda:1 ... (default: cuda when available).
        dtype: Cast weights (default: as stored).
        limit: First N docs per task, or a fraction in (0, 1].
        num_fewshot: Override every task's few-shot count.
        data_dir: Task data directory (default: $LMLAB_EVAL_DATA, else data/eval under the working directory).
        out: Write results.json and samples_<task>.jsonl here.
        seed: Few-shot sampling / bootstrap seed.
        online: Allow downloading task data missing locally.
        progress: Show progress bars (--no_progress hides them).
        allow_unsandboxed: Run model-written code of code tasks even where the bubblewrap sandbox is
            unavailable (it then runs with this user's rights; see docs/evaluation.md).
    """
    from lmlab.eval.adapter import LmlabLM
    from lmlab.eval.harness import evaluate
    from lmlab.eval.tasks import task_file

    args = argparse.Namespace(**locals())
    tasks = [t.strip() for t in args.tasks.split(",") if t.strip()]
    if not tasks:
        raise ConfigError("--tasks", "no task named", "e.g. --tasks hellaswag,arc_easy")
    for t in tasks:
        task_file(t)  # unknown names fail here, listing the built-in tasks, before the model loads
    model, tokenizer, device = _load(args)
    lm = LmlabLM(model, tokenizer, batch_size=args.batch_size, max_length=args.max_length, device=device)
    out = evaluate(lm, tasks, data_dir=args.data_dir, limit=args.limit, num_fewshot=args.num_fewshot,
                   batch_size=args.batch_size, seed=args.seed, output_dir=args.out, online=args.online or None,
                   progress=args.progress, allow_unsandboxed=args.allow_unsandboxed)
    print(format_results(out["results"]))
    if lm.stats["hit_max_new_tokens"]:
        print(f"note: {lm.stats['hit_max_new_tokens']} of {lm.stats['generations']} generations reached "
              "max_new_tokens without a stop and were cut there")
    if lm.stats["truncated_contexts"] or lm.stats["truncated_prompts"]:
        print(f"note: {lm.stats['truncated_contexts'] + lm.stats['truncated_prompts']} inputs were longer than "
              f"max_length={lm.max_length} and lost their start")
    if args.out:
        print(f"results: {Path(args.out) / 'results.json'}")
    return 0


def format_results(results: dict[str, dict[str, Any]]) -> str:
    """A plain-text table: one row per task and metric, with its standard error and sample count."""
    rows = [("task", "metric", "value", "stderr", "n")]
    for task, entry in results.items():
        n = str(entry.get("n", ""))
        for name, value in entry.items():
            if name in _NON_METRICS or "_stderr" in name or not isinstance(value, (int, float)):
                continue
            base, sep, filt = name.partition(",")
            err = entry.get(f"{base}_stderr{sep}{filt}")
            rows.append((task, name, f"{value:.4f}", "" if err is None else f"{err:.4f}", n))
    widths = [max(len(r[i]) for r in rows) for i in range(len(rows[0]))]
    lines = ["  ".join(c.ljust(w) if i < 2 else c.rjust(w) for i, (c, w) in enumerate(zip(r, widths))) for r in rows]
    lines.insert(1, "  ".join("-" * w for w in widths))
    return "\n".join(lines)


def _read_texts(paths: list[str]) -> list[str]:
    texts = []
    for name in paths:
        p = Path(name).expanduser()
        if not p.is_file():
            raise ConfigError("--text", f"{p} does not exist", "give a text or .jsonl file")
        try:
            content = p.read_text(encoding="utf-8")
        except UnicodeDecodeError:
            raise ConfigError("--text", f"{p} is not UTF-8 text", "give a text or .jsonl file") from None
        if p.suffix == ".jsonl":
            for i, line in enumerate(content.splitlines()):
                if not line.strip():
                    continue
                try:
                    row = json.loads(line)
                except json.JSONDecodeError as e:
                    raise ConfigError("--text", f"{p}:{i + 1}: invalid JSON ({e.msg})", "one JSON object per line") from None
                if not isinstance(row, dict) or not isinstance(row.get("text"), str):
                    raise ConfigError("--text", f"{p}:{i + 1}: no 'text' string", "each line needs a 'text' field")
                texts.append(row["text"])
        else:
            texts.append(content)
    return texts


def perplexity_verb(
    ckpt: str,
    config: Optional[str] = None,
    text: Optional[list[str]] = None,
    tokenizer: Optional[str] = None,
    batch_size: int = 16,
    max_length: Optional[int] = None,
    device: Optional[str] = None,
    dtype: Optional[Dtype] = None,
    stride: Optional[int] = None,
    max_documents: Optional[int] = None,
    prefix: bool = True,
    out: Optional[str] = None,
) -> int:
    """Perplexity and bits per byte, per source of a mixture's validation split or on files.

    Args:
        ckpt: Lightning .ckpt, lmlab export or HF export directory.
        config: Experiment YAML: score its mixture's validation split per source (several compose, like lmlab fit).
        text: A .txt file (one document) or .jsonl ({"text"} per line); repeat --text for more.
        tokenizer: Tokenizer directory (default: beside the checkpoint / its run config).
        batch_size: Windows per forward pass.
        max_length: Window length (default: the model's max_seq_len).
        device: cpu, cuda, cuda:1 ... (default: cuda when available).
        dtype: Cast weights (default: as stored).
        stride: Sliding-window stride (default: max_length // 2; = max_length is chunked).
        max_documents: Score at most this many documents per source.
        prefix: Put EOS before each document so its first token is scored (--no_prefix: do not).
        out: Write the results as JSON to this file.
    """
    from lmlab.eval.perplexity import experiment_mixture, mixture_perplexity, perplexity

    args = argparse.Namespace(**locals())
    if (config is None) == (not text):
        raise ConfigError("--config", "give exactly one of --config and --text", "--config EXPERIMENT.yaml or --text FILE")
    mixture = experiment_mixture(args.config) if args.config else None
    texts = _read_texts(args.text) if args.text else None
    model, tokenizer, device = _load(args, fallback_tokenizer=mixture["tokenizer"] if mixture else None)
    common = dict(max_length=args.max_length, stride=args.stride, batch_size=args.batch_size,
                  max_documents=args.max_documents, prefix=args.prefix, device=device)
    if mixture is not None:
        results = mixture_perplexity(model, tokenizer, mixture["sources"], val_fraction=mixture["val_fraction"],
                                     seed=mixture["seed"], cache_dir=mixture["cache_dir"], **common)
    else:
        results = {"text": perplexity(model, tokenizer, texts, name="text", **common)}
    print(format_perplexity(results))
    if args.out:
        from lmlab.eval.results import atomic_write_json

        atomic_write_json(args.out, {k: v.to_dict() for k, v in results.items()})
        print(f"results: {args.out}")
    return 0


def format_perplexity(results: dict) -> str:
    """A plain-text table of :class:`~lmlab.eval.perplexity.PerplexityResult` per source."""
    rows = [("source", "docs", "tokens", "ppl", "bpb", "mean ctx")]
    for name, r in results.items():
        rows.append((name, str(r.documents), str(r.tokens), f"{r.ppl:.3f}", f"{r.bpb:.4f}", f"{r.mean_context:.1f}"))
    widths = [max(len(r[i]) for r in rows) for i in range(len(rows[0]))]
    lines = ["  ".join(c.ljust(w) if i == 0 else c.rjust(w) for i, (c, w) in enumerate(zip(r, widths))) for r in rows]
    lines.insert(1, "  ".join("-" * w for w in widths))
    return "\n".join(lines)


def tasks() -> int:
    """List the built-in tasks."""
    from lmlab.eval.tasks import list_tasks

    print("\n".join(list_tasks()))
    return 0


def _compare(argv: list[str]) -> int:
    if importlib.util.find_spec(COMPARE_MODULE) is None:
        raise ConfigError("compare", "`lmlab eval compare` is not available in this installation",
                          f"it needs the {COMPARE_MODULE} module")
    return int(importlib.import_module(COMPARE_MODULE).main(argv) or 0)


COMMANDS = {"_help": "Evaluate a checkpoint: downstream tasks (run, the default), perplexity, the task list, "
            "pairwise comparison (compare).", "run": run_tasks, "perplexity": perplexity_verb, "tasks": tasks}


def main(argv: Optional[list[str]] = None) -> int:
    """Entry point of ``lmlab eval``."""
    from lmlab.verbs import run

    argv = list(sys.argv[1:] if argv is None else argv)
    if argv and argv[0] == "compare":  # a verb of its own, with its own parser
        try:
            return _compare(argv[1:])
        except ConfigError as e:
            print(f"{PROG}: error: {e}", file=sys.stderr)
            return 2
    return run(PROG, COMMANDS, argv, default="run", aliases={"ppl": "perplexity"})


if __name__ == "__main__":
    raise SystemExit(main())
