"""``lmlab sweep``: run W&B sweep YAMLs offline and derive learning-rate rules.

    lmlab sweep run sweeps/chinchilla_grid.yaml [--parallel K] [--count N] [--dry_run] [--state DIR]
                    [--env KEY=VALUE ...] [--seed S] [--retry_failed] [--no_check] [--no_progress]
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
from typing import Literal, Optional

from lmlab.errors import ConfigError
from lmlab.verbs import positional, run

PROG = "lmlab sweep"


def _env_pair(text: str) -> tuple[str, str]:
    if "=" not in text or text.startswith("="):
        raise ConfigError("--env", f"{text!r} is not KEY=VALUE", "pass e.g. --env OMP_NUM_THREADS=1")
    key, value = text.split("=", 1)
    return key, value


@positional("spec")
def run_sweep(
    spec: str,
    parallel: int = 1,
    count: Optional[int] = None,
    dry_run: bool = False,
    state: Optional[str] = None,
    env: list[str] = [],  # noqa: B006 - jsonargparse reads the default; never mutated
    seed: int = 0,
    retry_failed: bool = False,
    check: bool = True,
    progress: bool = True,
) -> int:
    """Run (or resume) a sweep YAML locally with the W&B sweep engine.

    Args:
        spec: Sweep YAML (W&B format).
        parallel: Runs at once.
        count: Launch at most this many runs now (like `wandb agent --count`).
        dry_run: Validate and print the runs' commands; run nothing.
        state: State directory (default runs/sweeps/<name>).
        env: Extra environment variables KEY=VALUE for every run (repeat --env).
        seed: Seed of random/bayes proposals.
        retry_failed: Launch failed runs again.
        check: Dry-parse the command before any run starts (--no_check skips it).
        progress: Show a progress bar (--no_progress hides it).
    """
    return _cmd_run(argparse.Namespace(**locals()))


@positional("state")
def status(state: str) -> int:
    """Table of a sweep's runs.

    Args:
        state: State directory of the sweep.
    """
    return _cmd_status(argparse.Namespace(state=state))


@positional("results")
def lr_rule(
    results: str,
    write: Optional[str] = None,
    params: Optional[float] = None,
    n_col: str = "N",
    lr_col: str = "lr",
    loss_col: str = "loss",
    refine: Literal["none", "parabola"] = "none",
    bootstrap: int = 1000,
    level: float = 0.95,
    seed: int = 0,
    json: bool = False,
) -> int:
    """Fit lr_opt = c * N^-k to a learning-rate sweep.

    Args:
        results: results.jsonl or results.csv of the sweep.
        write: Write a config fragment with the lr for --params to this YAML.
        params: Model size for the fragment (default: largest swept).
        n_col: Parameter-count column.
        lr_col: Learning-rate column.
        loss_col: Loss column.
        refine: Refine each size's best lr with a parabola.
        bootstrap: Bootstrap resamples (0: none).
        level: Confidence level of the interval.
        seed: Bootstrap seed.
        json: Print one JSON object.
    """
    return _cmd_lr_rule(argparse.Namespace(**locals()))


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
        check=args.check,
        progress=args.progress,
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
    try:
        return run(PROG, {"_help": __doc__, "run": run_sweep, "status": status, "lr-rule": lr_rule}, argv)
    except KeyboardInterrupt:
        print(f"{PROG}: interrupted; run the same command again to resume", file=sys.stderr)
        return 130
