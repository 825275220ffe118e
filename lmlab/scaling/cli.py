"""``lmlab scaling``: fit scaling laws to a results CSV and plan compute-optimal runs.

    lmlab scaling fit runs.csv [--method approach3|approach1|approach2|kaplan] [--json] [--plot out.png]
    lmlab scaling plan --compute 1e21 [--accelerators 8 --peak_flops 989e12 --mfu 0.4] [--write_config out.yaml]

Bad input exits with status 2 and one line: ``lmlab scaling: error: <field>: <problem> (<fix>)``.
"""

from __future__ import annotations

import argparse
import json
import math
import os
from pathlib import Path
from typing import Any, Literal, Optional

import yaml

from lmlab.atomic import atomic_write_text
from lmlab.errors import ConfigError
from lmlab.scaling.bootstrap import check_level
from lmlab.scaling.chinchilla import bootstrap_allocation, fit_approach1, fit_approach2
from lmlab.scaling.kaplan import bootstrap_kaplan, fit_kaplan
from lmlab.scaling.law import EPOCH_2024, HOFFMANN_2022, ChinchillaLaw
from lmlab.scaling.parametric import GRID_4500, GRID_5400, bootstrap_approach3, fit_approach3, with_bootstrap
from lmlab.scaling.plan import H100_PEAK_FLOPS, chinchilla_rule, plan_compute, shape_for_params, training_steps
from lmlab.scaling.results import load_results
from lmlab.verbs import positional, run

PROG = "lmlab scaling"
LAWS = {"epoch2024": EPOCH_2024, "hoffmann2022": HOFFMANN_2022}


Method = Literal["approach3", "approach1", "approach2", "kaplan"]


@positional("file")
def fit(
    file: str,
    method: Method = "approach3",
    n_col: str = "N",
    d_col: str = "D",
    loss_col: str = "loss",
    compute_col: Optional[str] = None,
    budget_col: Optional[str] = None,
    duplicates: Literal["first", "min"] = "first",
    bootstrap: int = 0,
    level: float = 0.95,
    seed: int = 0,
    grid: Literal["5400", "4500"] = "5400",
    bins: int = 20,
    curve: Literal["akima", "parabola"] = "akima",
    window: Optional[float] = None,
    json: bool = False,
    plot: Optional[str] = None,
    wandb: Optional[str] = None,
    wandb_dir: Optional[str] = None,
) -> int:
    """Fit a scaling law to a results CSV (one row per training run).

    Args:
        file: CSV with one row per training run.
        method: approach3 (parametric L(N, D)), approach1/approach2 (compute-optimal allocation) or kaplan.
        n_col: Parameter-count column.
        d_col: Token-count column (derived as C/(6N) if absent).
        loss_col: Final-loss column.
        compute_col: Training-FLOPs column (default: C = 6ND).
        budget_col: IsoFLOP budget label column (approach2).
        duplicates: Which duplicate (N, D) run to keep.
        bootstrap: Bootstrap resamples for percentile intervals (0: none). Runs are resampled with
            replacement: within each IsoFLOP budget (approach2), over all runs (approach1, approach3),
            or the runs of each law separately (kaplan); the output says which.
        level: Confidence level of the intervals.
        seed: Bootstrap random seed.
        grid: approach3 start grid.
        bins: approach1 compute bins.
        curve: approach2: how each IsoFLOP budget's minimum is found. akima (default): an Akima
            spline through the budget's points, minimised on a fine grid (Porian et al. 2024; reproduces
            their published exponents). parabola: Hoffmann et al.'s quadratic in log N.
        window: approach2: fit each budget's curve only to the runs within this many decades of N
            of its lowest-loss run (0.3: from half to twice the best size); unset: all of the budget's
            runs. With parabola, 0.3 removes most of a global quadratic's bias on asymmetric curves.
        json: Print one JSON object instead of a table.
        plot: Write a plot of the fit to this PNG.
        wandb: Also log the fit and its plot to a W&B run in this project (offline without an API key).
        wandb_dir: Where the W&B run directory goes (default $WANDB_DIR, else runs/).
    """
    return _run_fit(argparse.Namespace(**locals()))


def plan(
    compute: float,
    law: Literal["epoch2024", "hoffmann2022"] = "epoch2024",
    fit_json: Optional[str] = None,
    accelerators: int = 1,
    peak_flops: float = H100_PEAK_FLOPS,
    mfu: float = 0.4,
    batch_tokens: float = 524288,
    json: bool = False,
    write_config: Optional[str] = None,
) -> int:
    """Compute-optimal model size, tokens and wall time for a FLOP budget.

    Args:
        compute: Training FLOPs.
        law: Published approach-3 fit to use.
        fit_json: Use E, A, B, alpha, beta from `lmlab scaling fit --json` output in this file.
        accelerators: Number of accelerators.
        peak_flops: Peak FLOP/s per accelerator.
        mfu: Model FLOPs utilisation.
        batch_tokens: Tokens per optimizer step.
        json: Print one JSON object instead of a table.
        write_config: Write model.config and trainer.max_steps to this YAML.
    """
    return _run_plan(argparse.Namespace(**locals()))


def _clean(value: Any) -> Any:
    """JSON-safe copy: numpy scalars to Python, NaN/inf to None (strict JSON has no NaN)."""
    if isinstance(value, dict):
        return {str(k): _clean(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_clean(v) for v in value]
    if hasattr(value, "item") and not isinstance(value, (str, bytes)):
        value = value.item()
    if isinstance(value, float) and not math.isfinite(value):
        return None
    return value


def _print_json(obj: dict[str, Any]) -> None:
    print(json.dumps(_clean(obj), allow_nan=False))


def _print_table(title: str, rows: list[tuple[str, float]], intervals: dict | None, level: float) -> None:
    print(title)
    head = f"  {'parameter':<12}{'value':>14}"
    if intervals:
        head += f"   {f'{level:.0%} interval':>28}"
    print(head)
    for name, value in rows:
        line = f"  {name:<12}{value:>14.6g}"
        if intervals and name in intervals:
            lo, hi = intervals[name]
            line += f"   {f'[{lo:.6g}, {hi:.6g}]':>28}"
        print(line)


def _run_fit(args: argparse.Namespace) -> int:
    if args.bootstrap:
        check_level(args.level)
    data = load_results(
        args.file,
        n_col=args.n_col,
        d_col=args.d_col,
        loss_col=args.loss_col,
        compute_col=args.compute_col,
        budget_col=args.budget_col,
        duplicates=args.duplicates,
    )
    if args.plot:
        from lmlab.scaling import plots  # matplotlib is slow to import; only pay for it when plotting

    if args.method == "approach3":
        fit = fit_approach3(data, grid=GRID_5400 if args.grid == "5400" else GRID_4500)
        if args.bootstrap:
            fit = with_bootstrap(fit, bootstrap_approach3(fit, n_resamples=args.bootstrap, seed=args.seed), args.level)
        rows = [(k, v) for k, v in fit.law.as_dict().items()]
        footer = (
            f"  objective {fit.objective:.7e}, max |grad| {fit.grad_max:.1e} "
            f"({'converged' if fit.converged else 'NOT converged: ' + fit.message}), {fit.seconds:.1f} s"
        )
        title = f"approach 3 (L = E + A/N^alpha + B/D^beta) on {data.source}: {data.n_points} points, {fit.n_starts} starts"
        plot = lambda path: plots.plot_loss_vs_compute(data, fit, path)  # noqa: E731
    elif args.method in ("approach1", "approach2"):
        if args.method == "approach1":
            fit = fit_approach1(data, n_bins=args.bins)
        else:
            fit = fit_approach2(data, curve=args.curve, window=args.window)
        if args.bootstrap:
            fit = bootstrap_allocation(fit, n_resamples=args.bootstrap, seed=args.seed, level=args.level)
        rows = [("a", fit.a), ("b", fit.b), ("N_coef", fit.n_law.coef), ("D_coef", fit.d_law.coef)]
        footer = f"  {fit.C.size} compute-optimal points, R^2 {fit.n_law.r2:.4f} (N_opt) {fit.d_law.r2:.4f} (D_opt)"
        title = f"{args.method} (N_opt ~ C^a, D_opt ~ C^b) on {data.source}: {data.n_points} points"
        plot = (lambda path: plots.plot_isoflops(fit, path)) if args.method == "approach2" else (lambda path: plots.plot_optimal_allocation(fit, path))
    else:
        fit = fit_kaplan(data)
        if args.bootstrap:
            fit = bootstrap_kaplan(fit, n_resamples=args.bootstrap, seed=args.seed, level=args.level)
        rows = [("alpha_N", fit.alpha_N), ("N_c", fit.N_c), ("alpha_D", fit.alpha_D), ("D_c", fit.D_c)]
        footer = f"  L(N) on {fit.n_rows.size} runs (R^2 {fit.n_law.r2:.4f}), L(D) on {fit.d_rows.size} runs (R^2 {fit.d_law.r2:.4f})"
        title = f"kaplan (L(N) = (N_c/N)^alpha_N, L(D) = (D_c/D)^alpha_D) on {data.source}: {data.n_points} points"
        plot = lambda path: plots.plot_kaplan(fit, path)  # noqa: E731

    if args.plot:
        try:
            plot(args.plot)
        except OSError as exc:
            raise ConfigError("--plot", f"cannot write {args.plot}: {exc.strerror}", "pass a writable path") from None
    if args.wandb:
        _log_to_wandb(args, fit, data.n_points)
    if args.json:
        out = fit.to_dict()
        out["excluded"] = [{"row": e.row, "reason": e.reason} for e in data.excluded]
        if args.plot:
            out["plot"] = str(args.plot)
        _print_json(out)
        return 0
    _print_table(title, rows, fit.intervals, fit.level)
    print(footer)
    if fit.bootstrap is not None:
        boot = fit.bootstrap
        print(f"  intervals: {fit.level:.0%} percentile bootstrap, {boot.n_resamples} resamples "
              f"({boot.n_failed} failed) of {boot.resampled}")
    if data.excluded:
        print(f"  excluded {len(data.excluded)} row(s): " + "; ".join(f"row {e.row}: {e.reason}" for e in data.excluded[:5]))
    if args.plot:
        print(f"  plot: {args.plot}")
    return 0


def _log_to_wandb(args: argparse.Namespace, fit, n_points: int) -> None:
    """One W&B run per fit: parameters and intervals in the summary, the plot as an image."""
    import wandb

    from lmlab.loggers import wandb_credentials_available

    mode = "online" if wandb_credentials_available() and os.environ.get("WANDB_MODE") != "offline" else "offline"
    run_dir = Path(args.wandb_dir or os.environ.get("WANDB_DIR") or "runs")
    run_dir.mkdir(parents=True, exist_ok=True)
    run = wandb.init(project=args.wandb, job_type="scaling-fit", name=f"{args.method}:{Path(args.file).stem}",
                     mode=mode, dir=str(run_dir), reinit="finish_previous",
                     config={"method": args.method, "file": str(args.file), "n_points": n_points})
    try:
        summary = {k: v for k, v in fit.to_dict().items() if isinstance(v, (int, float, str))}
        for name, (lo, hi) in (fit.intervals or {}).items():
            summary[f"{name}_lo"], summary[f"{name}_hi"] = lo, hi
        run.summary.update(summary)
        if args.plot:
            run.log({f"scaling/{args.method}": wandb.Image(str(args.plot))})
    finally:
        run.finish()


def _law_from_json(path: str) -> ChinchillaLaw:
    try:
        obj = json.loads(Path(path).read_text())
        return ChinchillaLaw(**{k: float(obj[k]) for k in ("E", "A", "B", "alpha", "beta")})
    except FileNotFoundError:
        raise ConfigError("--fit_json", f"{path} not found", "pass the file written by `lmlab scaling fit --json`") from None
    except (ValueError, KeyError, TypeError) as exc:
        raise ConfigError("--fit_json", f"{path} has no approach-3 fit ({exc})", "use `fit --method approach3 --json` output") from None


def _run_plan(args: argparse.Namespace) -> int:
    law = _law_from_json(args.fit_json) if args.fit_json else LAWS[args.law]
    plan = plan_compute(args.compute, law, accelerators=args.accelerators, peak_flops=args.peak_flops, mfu=args.mfu)
    rule_n, rule_d = chinchilla_rule(args.compute)
    # The ladder counts non-embedding parameters; N_opt (Chinchilla) includes embeddings, which is a
    # small fraction for models where planning matters, so N_opt is used as the target directly.
    shape = shape_for_params(plan.N_opt)
    steps = training_steps(plan.D_opt, args.batch_tokens)
    if args.write_config:
        fragment = {
            "model": {
                "config": {
                    "n_layers": shape.n_layers,
                    "d_model": shape.d_model,
                    "n_heads": shape.n_heads,
                    "n_kv_heads": shape.n_heads,
                }
            },
            "trainer": {"max_steps": steps},
        }
        header = (
            f"# lmlab scaling plan: C={plan.compute:.3g} FLOPs, N_opt={plan.N_opt:.4g}, D_opt={plan.D_opt:.4g}, "
            f"predicted loss {plan.loss:.4f}; {args.batch_tokens:.0f} tokens/step\n"
        )
        try:
            atomic_write_text(Path(args.write_config), header + yaml.safe_dump(fragment, sort_keys=False))
        except OSError as exc:
            raise ConfigError("--write_config", f"cannot write {args.write_config}: {exc.strerror}", "pass a writable path") from None
    if args.json:
        out = plan.to_dict()
        out.update(
            law={k: getattr(law, k) for k in ("E", "A", "B", "alpha", "beta")},
            rule_N=rule_n,
            rule_D=rule_d,
            n_layers=shape.n_layers,
            d_model=shape.d_model,
            n_heads=shape.n_heads,
            shape_params=shape.n_params,
            max_steps=steps,
        )
        if args.write_config:
            out["config"] = str(args.write_config)
        _print_json(out)
        return 0
    print(f"compute-optimal plan for C = {plan.compute:.3g} FLOPs ({plan.pf_days:.4g} PF-days)")
    print(f"  law          E={law.E:.4g} A={law.A:.4g} B={law.B:.4g} alpha={law.alpha:.4g} beta={law.beta:.4g}")
    print(f"  N_opt        {plan.N_opt:.4g} parameters")
    print(f"  D_opt        {plan.D_opt:.4g} tokens ({plan.tokens_per_param:.1f} tokens/parameter)")
    print(f"  loss         {plan.loss:.4f} (predicted)")
    print(f"  20 N rule    N={rule_n:.4g}, D={rule_d:.4g}")
    print(f"  shape        n_layers={shape.n_layers} d_model={shape.d_model} n_heads={shape.n_heads} ({shape.n_params:.4g} non-embedding)")
    print(f"  time         {plan.seconds / 3600:.4g} h = {plan.days:.4g} days on {plan.accelerators} x {plan.peak_flops:.3g} FLOP/s at MFU {plan.mfu:g}")
    print(f"  max_steps    {steps} at {args.batch_tokens:.0f} tokens/step")
    if args.write_config:
        print(f"  config       {args.write_config}")
    return 0


def main(argv: list[str] | None = None) -> int:
    """Entry point of ``lmlab scaling``; returns the process exit status (2 for bad input)."""
    return run(PROG, {"_help": __doc__, "fit": fit, "plan": plan}, argv)
