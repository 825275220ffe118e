"""``lmlab data``: prepare a training mixture, or measure HTML extraction quality.

Usage::

    lmlab data prepare --config experiments/data/shared_mix.yaml [--num_proc N] [--out DIR] [--resume]
                       [--force] [--engine local|datatrove|slurm] [--tasks N] [--workers K] [--max_documents N]
    lmlab data extract-eval --html PAGES.tar --gold GOLD.json

``prepare`` prints the summary table of ``OUT/report/report.md`` and the
``data`` section of a training YAML that reads the result.
"""

from __future__ import annotations

import argparse
import dataclasses
import sys
import time

from lmlab.errors import ConfigError


def _parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="lmlab data", description="Data pipeline: filter, dedup, decontaminate, tokenize.")
    sub = p.add_subparsers(dest="cmd")
    pr = sub.add_parser("prepare", help="prepare a mixture from its sources into OUT/tokens")
    pr.add_argument("--config", required=True, help="prepare YAML (experiments/data/*.yaml) or a training experiment YAML")
    pr.add_argument("--out", help="output directory (default: the config's out)")
    pr.add_argument("--num_proc", type=int, help="worker processes per stage")
    pr.add_argument("--resume", action="store_true", help="keep the finished shards of an interrupted run")
    pr.add_argument("--force", action="store_true", help="recompute every stage, ignoring caches")
    pr.add_argument("--engine", choices=("local", "datatrove", "slurm"),
                    help="run per-source stages in-process, as local datatrove tasks, or as Slurm job arrays")
    pr.add_argument("--tasks", type=int, help="datatrove tasks per stage")
    pr.add_argument("--workers", type=int, help="datatrove tasks running at once")
    pr.add_argument("--max_documents", type=int, help="read at most this many records per source (quick trials)")
    pr.add_argument("--quiet", action="store_true", help="no progress bars or per-stage lines")
    ex = sub.add_parser("extract-eval", help="mean token F1 of HTML main-text extraction against gold text")
    ex.add_argument("--html", required=True, help="tar of .html/.html.gz pages")
    ex.add_argument("--gold", required=True, help='JSON {page_stem: {"articleBody": ...}}')
    return p


def main(argv: list[str] | None = None) -> int:
    """Entry point of ``lmlab data``; returns the exit code."""
    args = _parser().parse_args(sys.argv[1:] if argv is None else argv)
    if args.cmd == "prepare":
        return _prepare(args)
    if args.cmd == "extract-eval":
        from lmlab.data.pipeline.extract import evaluate_extraction, visible_text

        score = evaluate_extraction(args.html, args.gold)
        base = evaluate_extraction(args.html, args.gold, visible_text)
        print(f"pages: {score.n_pages}")
        print(f"mean token F1 (trafilatura main text): {score.mean_f1:.4f}")
        print(f"mean token F1 (all visible text, no extraction): {base.mean_f1:.4f}")
        return 0
    _parser().print_help()
    return 2


def _prepare(args: argparse.Namespace) -> int:
    from lmlab.data.pipeline.config import load_config
    from lmlab.data.pipeline.prepare import prepare, training_snippet
    from lmlab.data.pipeline.report import summary_table

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
