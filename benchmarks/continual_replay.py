"""Continual pretraining with replay: forgetting vs new-domain gain for several replay fractions, on CPU.

    python benchmarks/continual_replay.py                       # base + replay 0, 5%, 25% + 5% without warmup (the committed study)
    python benchmarks/continual_replay.py --reuse-base          # keep the base checkpoint when it exists
    python benchmarks/continual_replay.py --fractions 0 0.5 --out runs/other --docs ''

Every run goes through the ``lmlab`` CLI (in this process) with the recipes
``experiments/continual/base.yaml`` (a base model pretrained on the original
mixture: web pages, a novel, Wikipedia; no code) and ``experiments/continual.yaml``
(the base model continued on Java code for the same number of steps at each
replay fraction, the LR re-warmed from where the base schedule ended); the
driver only redirects their output folders. The base model itself is
validated on both domains with ``lmlab validate`` on the continual recipe.

With ``--no-warmup F`` (default 0.05) replay fraction F is also continued
without warmup (``warmup_steps: 0``, starting at the peak LR), beside the
re-warmed run. Forgetting = old-domain val bpb after continuing minus the base model's;
gain = the base model's new-domain val bpb minus the value after continuing.
Writes ``continual_replay.csv`` (every validation of every run),
``continual_replay.json`` (summary and the exact command) and
``continual_replay.png`` (curves and forgetting vs gain) under ``--docs``.
"""

from __future__ import annotations

import argparse
import csv
import json
import shlex
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO / "benchmarks"))
sys.path.insert(0, str(REPO))

from harness import pin_threads  # noqa: E402

BASE_RECIPE = "experiments/continual/base.yaml"
CONTINUAL_RECIPE = "experiments/continual.yaml"
VAL_KEYS = ("val/old_bpb", "val/new_bpb", "val/web/bpb", "val/books/bpb", "val/wiki/bpb", "val/code/bpb")


def _cli(args: list[str]) -> float:
    from lmlab.cli import main

    t0 = time.perf_counter()
    rc = main(args)
    if rc != 0:
        raise SystemExit(f"lmlab {' '.join(args)} failed with exit code {rc}")
    return time.perf_counter() - t0


def _val_rows(run_dir: Path, fit: bool = True) -> list[dict]:
    """Validation rows of a run's newest CSV log, as floats, with ``step`` = optimizer updates done."""
    path = sorted((run_dir / "csv").glob("version_*/metrics.csv"), key=lambda p: int(p.parent.name.split("_")[1]))[-1]
    rows = []
    for r in csv.DictReader(open(path)):
        if r.get("val/old_bpb"):
            # a fit logs the validation after update n at 0-based step n - 1; ``validate`` logs step 0
            rows.append({"step": int(r["step"]) + int(fit), **{k: float(r[k]) for k in VAL_KEYS if r.get(k)}})
    return rows


def _runs(fractions: list[float], no_warmup: list[float]) -> list[tuple[str, float, str, list[str]]]:
    """(folder tag, replay fraction, schedule label, extra flags) of every continued run."""
    runs = [(f"r{round(f * 100):02d}", f, "re-warm", []) for f in fractions]
    runs += [(f"r{round(f * 100):02d}_no_warmup", f, "no warmup", ["--model.settings.schedule.warmup_steps=0"]) for f in no_warmup]
    return runs


def run(out: Path, base_dir: Path, fractions: list[float], no_warmup: list[float], threads: int, reuse_base: bool) -> dict:
    pin_threads(threads)
    ckpt = base_dir / "checkpoints" / "last.ckpt"
    timings = {}
    if not (reuse_base and ckpt.is_file()):
        timings["base"] = _cli(["fit", "--config", BASE_RECIPE, f"--trainer.default_root_dir={base_dir}"])
    common = ["--config", CONTINUAL_RECIPE, f"--model.init_from={ckpt}"]
    timings["base_eval"] = _cli(["validate", *common, f"--trainer.default_root_dir={out / 'base_eval'}"])
    base = _val_rows(out / "base_eval", fit=False)[-1]
    results, curves = [], {}
    for tag, f, schedule, flags in _runs(fractions, no_warmup):
        timings[tag] = _cli(["fit", *common, f"--data.replay_fraction={f}", *flags, f"--trainer.default_root_dir={out / tag}"])
        curves[tag] = _val_rows(out / tag)
        final = curves[tag][-1]
        results.append({
            "run": tag,
            "replay_fraction": f,
            "schedule": schedule,
            "steps": final["step"],
            "old_bpb": final["val/old_bpb"],
            "new_bpb": final["val/new_bpb"],
            "forgetting_bpb": final["val/old_bpb"] - base["val/old_bpb"],
            "gain_bpb": base["val/new_bpb"] - final["val/new_bpb"],
            "per_source_bpb": {k.split("/")[1]: final[k] for k in VAL_KEYS[2:] if k in final},
            "wall_s": round(timings[tag], 1),
        })
    return {"base": {"old_bpb": base["val/old_bpb"], "new_bpb": base["val/new_bpb"],
                     "per_source_bpb": {k.split("/")[1]: base[k] for k in VAL_KEYS[2:] if k in base}},
            "results": results, "curves": curves,
            "wall_s": {k: round(v, 1) for k, v in timings.items()}, "threads": threads}


def write(summary: dict, docs: Path, command: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    docs.mkdir(parents=True, exist_ok=True)
    summary = {"command": command, "hardware": f"2 CPU cores, {summary['threads']} torch threads", **summary}
    (docs / "continual_replay.json").write_text(json.dumps(summary, indent=2) + "\n")
    with open(docs / "continual_replay.csv", "w", newline="") as fh:
        w = csv.writer(fh)
        w.writerow(["run", "replay_fraction", "schedule", "step", *VAL_KEYS])
        w.writerow(["base", "", "", 0, *(summary["base"]["old_bpb"], summary["base"]["new_bpb"]),
                    *(summary["base"]["per_source_bpb"].get(k.split("/")[1], "") for k in VAL_KEYS[2:])])
        for res in summary["results"]:
            for r in summary["curves"][res["run"]]:
                w.writerow([res["run"], res["replay_fraction"], res["schedule"], r["step"], *(r.get(k, "") for k in VAL_KEYS)])

    fig, (a, b) = plt.subplots(1, 2, figsize=(11, 4.2))
    colours = plt.rcParams["axes.prop_cycle"].by_key()["color"]
    base = summary["base"]
    for i, res in enumerate(summary["results"]):
        if res["schedule"] != "re-warm":
            continue  # the curves compare replay fractions; the schedule variant is on the right
        rows = summary["curves"][res["run"]]
        steps = [0] + [r["step"] for r in rows]
        f = res["replay_fraction"]
        a.plot(steps, [base["old_bpb"]] + [r["val/old_bpb"] for r in rows], "-o", ms=3, color=colours[i],
               label=f"old domain, replay {f:.0%}")
        a.plot(steps, [base["new_bpb"]] + [r["val/new_bpb"] for r in rows], "--s", ms=3, color=colours[i],
               label=f"new domain (code), replay {f:.0%}")
    a.set_xlabel("continued-pretraining step")
    a.set_ylabel("validation bits per byte")
    a.set_title("Validation during continued pretraining")
    a.legend(fontsize=7)
    for i, r in enumerate(summary["results"]):
        rewarm = r["schedule"] == "re-warm"
        b.scatter(r["gain_bpb"], r["forgetting_bpb"], color=colours[i], s=40, zorder=3, marker="o" if rewarm else "x")
        b.annotate(f"replay {r['replay_fraction']:.0%}" + ("" if rewarm else f", {r['schedule']}"),
                   (r["gain_bpb"], r["forgetting_bpb"]), textcoords="offset points", xytext=(6, 4) if rewarm else (-30, -14),
                   fontsize=8)
    b.axhline(0, color="grey", lw=0.8)
    b.set_xlabel("new-domain gain (bpb decrease vs base)")
    b.set_ylabel("forgetting (old-domain bpb increase vs base)")
    b.set_title("Forgetting vs gain (lower right is better)")
    fig.tight_layout()
    fig.savefig(docs / "continual_replay.png", dpi=120)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--out", default="runs/continual_study", help="run folders")
    p.add_argument("--fractions", type=float, nargs="+", default=[0.0, 0.05, 0.25])
    p.add_argument("--no-warmup", type=float, nargs="*", default=[0.05],
                   help="replay fractions also continued with warmup_steps: 0 instead of re-warming")
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--base-dir", default="runs/continual_base", help="the base run's folder (the recipes' default)")
    p.add_argument("--reuse-base", action="store_true", help="keep <base-dir>/checkpoints/last.ckpt when it exists")
    p.add_argument("--docs", default="docs/study", help="where the CSV, JSON and PNG go ('' to skip)")
    args = p.parse_args(argv)
    summary = run(Path(args.out), Path(args.base_dir), args.fractions, args.no_warmup, args.threads, args.reuse_base)
    print(f"{'replay':>7} {'schedule':>10} {'old bpb':>8} {'new bpb':>8} {'forgetting':>11} {'gain':>7} {'wall s':>7}")
    print(f"{'base':>7} {'':>10} {summary['base']['old_bpb']:8.4f} {summary['base']['new_bpb']:8.4f}")
    for r in summary["results"]:
        print(f"{r['replay_fraction']:7.0%} {r['schedule']:>10} {r['old_bpb']:8.4f} {r['new_bpb']:8.4f} "
              f"{r['forgetting_bpb']:+11.4f} {r['gain_bpb']:+7.4f} {r['wall_s']:7.1f}")
    if args.docs:
        command = " ".join(["python benchmarks/continual_replay.py", shlex.join(argv if argv is not None else sys.argv[1:])])
        write(summary, Path(args.docs), command.strip())
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
