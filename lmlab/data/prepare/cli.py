"""``lmlab data``: prepare a training mixture, or measure HTML extraction quality and filter/quality agreement.

Usage::

    lmlab data prepare --config experiments/data/shared_mix.yaml [--num_proc N] [--out DIR] [--resume]
                       [--force] [--engine local|datatrove|slurm] [--tasks N] [--workers K] [--max_documents N]
    lmlab data extract-eval --html PAGES.tar --gold GOLD.json
    lmlab data agreement --config experiments/data/shared_mix.yaml --data_dir DIR [--source NAME] [--json]

``prepare`` prints the summary table of ``OUT/report/report.md`` and the
``data`` section of a training YAML that reads the result.
"""

from __future__ import annotations

import argparse
import dataclasses
import sys
import time
from typing import Literal, Optional

from lmlab.errors import ConfigError
from lmlab.verbs import run


def prepare(
    config: str,
    out: Optional[str] = None,
    num_proc: Optional[int] = None,
    resume: bool = False,
    force: bool = False,
    engine: Optional[Literal["local", "datatrove", "slurm"]] = None,
    tasks: Optional[int] = None,
    workers: Optional[int] = None,
    max_documents: Optional[int] = None,
    quiet: bool = False,
) -> int:
    """Prepare a mixture from its sources into OUT/tokens: filter, dedup, decontaminate, tokenize.

    Args:
        config: Prepare YAML (experiments/data/*.yaml) or a training experiment YAML.
        out: Output directory (default: the config's out).
        num_proc: Worker processes per stage.
        resume: Keep the finished shards of an interrupted run.
        force: Recompute every stage, ignoring caches.
        engine: Run per-source stages in-process, as local datatrove tasks, or as Slurm job arrays.
        tasks: Datatrove tasks per stage.
        workers: Datatrove tasks running at once.
        max_documents: Read at most this many records per source (quick trials).
        quiet: No progress bars or per-stage lines.
    """
    return _prepare(argparse.Namespace(**locals()))


def extract_eval(html: str, gold: str) -> int:
    """Mean token F1 of HTML main-text extraction against gold text.

    Args:
        html: Tar of .html/.html.gz pages.
        gold: JSON {page_stem: {"articleBody": ...}}.
    """
    from lmlab.data.prepare.extract import evaluate_extraction, visible_text

    score = evaluate_extraction(html, gold)
    base = evaluate_extraction(html, gold, visible_text)
    print(f"pages: {score.n_pages}")
    print(f"mean token F1 (trafilatura main text): {score.mean_f1:.4f}")
    print(f"mean token F1 (all visible text, no extraction): {base.mean_f1:.4f}")
    return 0


def agreement(
    config: str,
    data_dir: str,
    source: Optional[str] = None,
    out: Optional[str] = None,
    num_proc: Optional[int] = None,
    json: bool = False,
) -> int:
    """Agreement of a prepare config's filters and quality score with human keep/drop labels.

    Scores the DCLM human-labelled pages exactly as `lmlab data prepare` would for the config:
    its normalisation, the filter stack of SOURCE, and its quality settings (the bigram model of
    its reference sources, collected by prepare's cached collect stage, or its reference_model
    checkpoint; its weights, diversity window, unsafe rate and perplexity range). Thresholds and
    tuned weights are fitted on the majority-vote pages that are not in the held-out agreement
    file, then accuracy and ROC AUC are reported on every file.

    Args:
        config: Prepare YAML (experiments/data/*.yaml) whose filters and quality settings are measured.
        data_dir: Folder holding web/dclm_quality_majority_data.jsonl and web/dclm_quality_agreement_data.jsonl.
        source: Source whose filter stack is used (default: the first source quality selection applies to).
        out: Prepare output directory whose stage cache holds the collected reference sources (default: the config's out).
        num_proc: Worker processes for collecting the reference sources.
        json: Print one JSON object instead of the table.
    """
    import json as json_module
    from pathlib import Path

    from lmlab.data.prepare.agreement import HELDOUT_FILE, TUNING_FILE, agreement_report, format_report, pipeline_scoring

    for rel in (TUNING_FILE, HELDOUT_FILE):
        if not (Path(data_dir) / rel).is_file():
            raise ConfigError("--data_dir", f"{Path(data_dir) / rel} does not exist", "give the folder holding web/dclm_quality_*.jsonl")
    log = None if json else (lambda msg: print(msg, file=sys.stderr, flush=True))
    scoring = pipeline_scoring(config, source=source, out=out, num_proc=num_proc, log=log)
    report = agreement_report(data_dir, scoring)
    print(json_module.dumps(report) if json else format_report(report))
    return 0


def main(argv: list[str] | None = None) -> int:
    """Entry point of ``lmlab data``; returns the exit code."""
    return run("lmlab data", {"_help": "Data pipeline: filter, dedup, decontaminate, tokenize.",
                              "prepare": prepare, "extract-eval": extract_eval, "agreement": agreement}, argv)


def _prepare(args: argparse.Namespace) -> int:
    from lmlab.data.prepare.config import load_config
    from lmlab.data.prepare.prepare import prepare, training_snippet
    from lmlab.data.prepare.report import summary_table

    cfg = load_config(args.config)
    if args.tasks is not None or args.workers is not None:
        cfg.engine = dataclasses.replace(
            cfg.engine, tasks=args.tasks or cfg.engine.tasks, workers=args.workers or cfg.engine.workers
        )
    if args.max_documents is not None:
        if args.max_documents < 1:
            raise ConfigError("--max_documents", f"must be >= 1, got {args.max_documents}", "use e.g. 200")
        for s in cfg.sources:
            s.max_documents = args.max_documents if s.max_documents is None else min(s.max_documents, args.max_documents)
    log = None if args.quiet else (lambda msg: print(msg, file=sys.stderr, flush=True))
    t0 = time.perf_counter()
    result = prepare(
        cfg,
        out=args.out,
        num_proc=args.num_proc,
        resume=args.resume,
        force=args.force,
        engine=args.engine,
        progress=False if args.quiet else None,
        log=log,
    )
    print(summary_table(result.report))
    print()
    print(f"prepared {result.tokens_dir} in {time.perf_counter() - t0:.1f}s "
          f"({len(result.computed)} steps computed, {len(result.reused)} reused); report: {result.report_paths['markdown']}")
    print("train on it with:")
    print(training_snippet(result, cfg))
    return 0
