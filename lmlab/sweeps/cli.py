"""``lmlab sweep``: run W&B sweep YAMLs offline and derive learning-rate rules.

    lmlab sweep run sweeps/chinchilla_grid.yaml [--parallel K] [--count N] [--dry-run] [--state DIR]
                    [--env KEY=VALUE ...] [--seed S] [--retry-failed] [--no-check] [--no-progress]
    lmlab sweep status DIR
    lmlab sweep lr-rule results.jsonl [--write experiments/scaling/lr_rule.yaml] [--params N]
                    [--refine parabola] [--bootstrap B] [--json]

Online, the same YAML runs through W&B: ``wandb sweep sweeps/X.yaml`` then
``wandb agent ENTITY/PROJECT/SWEEP_ID`` on each machine (see docs/scaling.md).
Bad input exits with status 2 and one line naming the key.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path
from typing import NoReturn, Optional

from lmlab.errors import ConfigError

PROG = "lmlab sweep"


class _Parser(argparse.ArgumentParser):
    """argparse that reports usage mistakes as one-line ConfigErrors."""

    def error(self, message: str) -> NoReturn:
        raise ConfigError("arguments", message, f"see {PROG} --help")


def _env_pair(text: str) -> tuple[str, str]:
    if "=" not in text or text.startswith("="):
        raise ConfigError("--env", f"{text!r} is not KEY=VALUE", "pass e.g. --env OMP_NUM_THREADS=1")
    key, value = text.split("=", 1)
    return key, value


def _build_parser() -> argparse.ArgumentParser:
    parser = _Parser(prog=PROG, description="Run W&B sweep YAMLs offline; fit learning-rate rules.")
    sub = parser.add_subparsers(dest="command", required=True, parser_class=_Parser)

    run = sub.add_parser("run", help="run (or resume) a sweep YAML locally with the W&B sweep engine")
    run.add_argument("spec", help="sweep YAML (W&B format)")
    run.add_argument("--parallel", type=int, default=1, metavar="K", help="runs at once (default 1)")
    run.add_argument("--count", type=int, default=None, metavar="N", help="launch at most N runs now (like `wandb agent --count`)")
    run.add_argument("--dry-run", action="store_true", help="validate and print the runs' commands; run nothing")
    run.add_argument("--state", default=None, metavar="DIR", help="state directory (default runs/sweeps/<name>)")
    run.add_argument("--env", action="append", default=[], metavar="KEY=VALUE", help="extra environment variable for every run")
    run.add_argument("--seed", type=int, default=0, help="seed of random/bayes proposals")
    run.add_argument("--retry-failed", action="store_true", help="launch failed runs again")
    run.add_argument("--no-check", action="store_true", help="skip the dry-parse of the command")
    run.add_argument("--no-progress", action="store_true", help="no progress bar")

    status = sub.add_parser("status", help="table of a sweep's runs")
    status.add_argument("state", help="state directory of the sweep")

    rule = sub.add_parser("lr-rule", help="fit lr_opt = c * N^-k to a learning-rate sweep")
    rule.add_argument("results", help="results.jsonl or results.csv of the sweep")
    rule.add_argument("--write", default=None, metavar="YAML", help="write a config fragment with the lr for --params")
    rule.add_argument("--params", type=float, default=None, metavar="N", help="model size for the fragment (default: largest swept)")
    rule.add_argument("--n-col", default="N")
    rule.add_argument("--lr-col", default="lr")
    rule.add_argument("--loss-col", default="loss")
    rule.add_argument("--refine", choices=["none", "parabola"], default="none", help="refine each size's best lr with a parabola")
    rule.add_argument("--bootstrap", type=int, default=1000, metavar="B", help="bootstrap resamples (0: none)")
    rule.add_argument("--level", type=float, default=0.95)
    rule.add_argument("--seed", type=int, default=0)
    rule.add_argument("--json", action="store_true", help="print one JSON object")
    return parser


def _cmd_run(args: argparse.Namespace) -> int:
    from lmlab.sweeps.spec import load_spec

    spec = load_spec(args.spec)  # before the runner's heavier imports: a bad file fails fast
    from lmlab.sweeps.runner import RunnerOptions, SweepRunner, default_state_dir

    options = RunnerOptions(
        parallel=args.parallel,
        count=args.count,
        state_dir=Path(args.state) if args.state else None,
        env=dict(_env_pair(e) for e in args.env),
        seed=args.seed,
        retry_failed=args.retry_failed,
        check=not args.no_check,
        progress=not args.no_progress,
    )
    runner = SweepRunner(spec, options)
    if args.dry_run:
        checked = runner.preflight() if options.check else None
        planned = runner.plan()
        print(f"sweep {spec.name} ({spec.method}, {spec.goal} {spec.metric}), id {spec.sweep_id}")
        print(f"  state: {options.state_dir or default_state_dir(spec)}")
        if checked:
            print(f"  checked: {checked}")
        more = " (bayes: later runs depend on results)" if spec.method == "bayes" else ""
        print(f"  {len(planned)} run(s){more}:")
        for i, params in enumerate(planned):
            print(f"  [{i}] " + " ".join(runner.argv(params, "<run dir>/config.json")))
        return 0
    state = runner.run()
    counts = {s: len(state.by_state(s)) for s in ("finished", "failed", "interrupted")}
    best = state.best()
    print(f"sweep {spec.name}: {counts['finished']} finished, {counts['failed']} failed; state in {runner.state_dir}")
    if best is not None:
        print(f"  best {spec.metric} = {best.metric:.6g}: " + " ".join(f"{k}={v}" for k, v in best.values().items()))
    if counts["finished"]:
        print(f"  results: {runner.state_dir / 'results.csv'} (lmlab scaling fit reads it)")
    for r in state.by_state("failed")[:5]:
        print(f"  failed [{r.index}] {r.id}: {r.error} (log: {r.run_dir}/output.log)")
    return 0 if not counts["failed"] else 1


def _cmd_status(args: argparse.Namespace) -> int:
    from lmlab.sweeps.state import SweepState

    data = SweepState.read(args.state)
    runs = data.get("runs", [])
    print(f"sweep {data['name']} ({data['method']}, {data['goal']} {data['metric']}), id {data['sweep_id']}: {len(runs)} runs")
    for r in runs:
        values = " ".join(f"{k}={v.get('value') if isinstance(v, dict) else v}" for k, v in r["params"].items())
        metric = f"{r['metric']:.5g}" if r.get("metric") is not None else "-"
        print(f"  [{r['index']:>3}] {r['id']} {r['state']:<11} {metric:>10}  {values}")
    return 0


def _cmd_lr_rule(args: argparse.Namespace) -> int:
    from lmlab.scaling.lr_rules import fit_lr_rule, read_runs, write_rule_yaml

    frame = read_runs(args.results)
    rule = fit_lr_rule(
        frame,
        n_col=args.n_col,
        lr_col=args.lr_col,
        loss_col=args.loss_col,
        refine=args.refine,
        bootstrap=args.bootstrap,
        level=args.level,
        seed=args.seed,
        source=str(args.results),
    )
    n_target = args.params if args.params is not None else float(rule.sizes.max())
    if args.write:
        try:
            write_rule_yaml(rule, args.write, n_target)
        except OSError as exc:
            raise ConfigError("--write", f"cannot write {args.write}: {exc.strerror}", "pass a writable path") from None
    if args.json:
        out = rule.to_dict()
        out.update(params=n_target, lr=float(rule.lr(n_target)))
        if args.write:
            out["written"] = args.write
        print(json.dumps(out))
        return 0
    iv = ""
    if rule.intervals:
        lo, hi = rule.intervals["k"]
        iv = f" [{lo:.3f}, {hi:.3f}] ({rule.level:.0%}, {rule.n_resamples} bootstrap resamples)"
    print(f"lr rule on {args.results}: lr_opt = {rule.coef:.4g} * N^-k with k = {rule.k:.4f}{iv}, R^2 {rule.r2:.3f}")
    for n, lr, loss in zip(rule.sizes, rule.lr_opt, rule.loss_opt):
        print(f"  N={n:>12.4g}  best lr {lr:.4g}  loss {loss:.4f}")
    for note in rule.notes:
        print(f"  note: {note}")
    print(f"  lr at N={n_target:.4g}: {float(rule.lr(n_target)):.4g}")
    if args.write:
        print(f"  wrote {args.write}")
    return 0


def main(argv: Optional[list[str]] = None) -> int:
    """Entry point of ``lmlab sweep``; returns the exit status (2 for bad input, 1 if a run failed)."""
    argv = sys.argv[1:] if argv is None else list(argv)
    try:
        args = _build_parser().parse_args(argv)
        if args.command == "run":
            return _cmd_run(args)
        if args.command == "status":
            return _cmd_status(args)
        return _cmd_lr_rule(args)
    except ConfigError as exc:
        print(f"{PROG}: error: {exc}", file=sys.stderr)
        return 2
    except SystemExit as exc:  # --help
        return int(exc.code or 0)
    except KeyboardInterrupt:
        print(f"{PROG}: interrupted; run the same command again to resume", file=sys.stderr)
        return 130
