"""Results of a comparison: ratings for each criterion, a text table, JSON and a PNG chart."""

from __future__ import annotations

import math
import os
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from lmlab.atomic import atomic_path
from lmlab.eval.compare.ratings import DEFAULT_ANCHOR, rate
from lmlab.eval.compare.schema import CHOICES, CRITERIA, Judgment, outcomes_for
from lmlab.eval.results import atomic_write_json

__all__ = ["build_report", "format_table", "write_results", "plot_ratings"]


def build_report(
    judgments: Sequence[Judgment],
    models: Sequence[str] | None = None,
    n_bootstrap: int = 1000,
    seed: int = 0,
    level: float = 0.95,
    k: float = 32.0,
    anchor: float = DEFAULT_ANCHOR,
    anchor_model: str | None = None,
    **extra: Any,
) -> dict[str, Any]:
    """Ratings of every model for ``overall`` and each axis (``None`` for a criterion nobody judged).

    ``choice_counts`` counts a/b/tie per criterion as listed (for judgments
    from the page: by displayed side, so a strong lean to ``a`` reveals a
    position bias). ``extra`` keys (progress, judge, paths) are copied in.
    """
    judgments = list(judgments)
    if models is None:
        models = sorted({m for j in judgments for m in (j.model_a, j.model_b)})
    criteria: dict[str, Any] = {}
    counts: dict[str, dict[str, int]] = {}
    for c in CRITERIA:
        outcomes = outcomes_for(judgments, c)
        counts[c] = {ch: sum(1 for j in judgments if j.choice(c) == ch) for ch in CHOICES}
        criteria[c] = (
            rate(outcomes, models, n_bootstrap=n_bootstrap, seed=seed, level=level, k=k, anchor=anchor, anchor_model=anchor_model).to_dict()
            if outcomes
            else None
        )
    return {
        "models": list(models),
        "n_judgments": len(judgments),
        **extra,
        "settings": {"n_bootstrap": n_bootstrap, "seed": seed, "level": level, "k_factor": k, "anchor": anchor, "anchor_model": anchor_model},
        "choice_counts": counts,
        "criteria": criteria,
    }


def _num(x: float | None, fmt: str) -> str:
    return "-" if x is None or (isinstance(x, float) and not math.isfinite(x)) else format(x, fmt)


def _ci(ci: Sequence[float | None], fmt: str) -> str:
    return f"[{_num(ci[0], fmt)}, {_num(ci[1], fmt)}]"


def format_table(report: dict[str, Any]) -> str:
    """Plain-text tables, one per judged criterion, best model first."""
    level = report["settings"]["level"]
    pct = f"{100 * level:g}%"
    lines = []
    for c in CRITERIA:
        r = report["criteria"].get(c)
        if r is None:
            continue
        width = max(5, *(len(m["model"]) for m in r["models"]))
        n = r["n_judgments"]
        lines.append(f"{c} ({n} judgment{'s' if n != 1 else ''}; ties count half; {pct} bootstrap intervals)")
        lines.append(f"{'model':<{width}}  {'games':>5}  {'W-L-T':>9}  {'win rate':>8} {'CI':<16}  {'BT':>6} {'CI':<14}  {'Elo':>6} {'CI':<14}")
        for m in r["models"]:
            wlt = f"{m['wins']}-{m['losses']}-{m['ties']}"
            lines.append(
                f"{m['model']:<{width}}  {m['games']:>5}  {wlt:>9}  {_num(m['win_rate'], '.3f'):>8} {_ci(m['win_rate_ci'], '.3f'):<16}"
                f"  {_num(m['bt_rating'], '.0f'):>6} {_ci(m['bt_ci'], '.0f'):<14}  {_num(m['elo'], '.0f'):>6} {_ci(m['elo_ci'], '.0f'):<14}"
            )
        if r["bt_prior"]:
            lines.append(f"(Bradley-Terry MLE is infinite for these judgments; {r['bt_prior']:g} virtual tie per model pair added)")
        lines.append("")
    if not lines:
        return "no judgments yet\n"
    return "\n".join(lines)


def plot_ratings(report: dict[str, Any], path: str | os.PathLike) -> Path | None:
    """Bar chart of Bradley-Terry ratings with interval error bars, one panel per judged criterion (atomic write)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    panels = [(c, report["criteria"][c]) for c in CRITERIA if report["criteria"].get(c)]
    if not panels:
        return None
    anchor = report["settings"]["anchor"]
    fig, axes = plt.subplots(1, len(panels), figsize=(3.2 * len(panels) + 1, 3.6), squeeze=False)
    for ax, (c, r) in zip(axes[0], panels):
        names = [m["model"] for m in r["models"]]
        vals = [m["bt_rating"] for m in r["models"]]
        lo = [v - m["bt_ci"][0] if m["bt_ci"][0] is not None else 0.0 for v, m in zip(vals, r["models"])]
        hi = [m["bt_ci"][1] - v if m["bt_ci"][1] is not None else 0.0 for v, m in zip(vals, r["models"])]
        # bars grow from the anchor: ratings are relative, so the anchor is the meaningful baseline
        ax.bar(names, [v - anchor for v in vals], bottom=anchor, yerr=[lo, hi], capsize=4, color="#4c78a8")
        ax.axhline(anchor, color="0.5", lw=0.8, ls="--")
        ax.set_title(f"{c} (n={r['n_judgments']})")
        ax.tick_params(axis="x", labelrotation=30)
        finite = [anchor, *vals] + [m["bt_ci"][i] for m in r["models"] for i in (0, 1) if m["bt_ci"][i] is not None]
        pad = max(20.0, 0.1 * (max(finite) - min(finite)))
        ax.set_ylim(min(finite) - pad, max(finite) + pad)
    axes[0][0].set_ylabel("Bradley-Terry rating (Elo scale)")
    fig.tight_layout()
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    try:
        with atomic_path(path, suffix=".png") as tmp:
            fig.savefig(tmp, dpi=110)
    finally:
        plt.close(fig)
    return path


def write_results(report: dict[str, Any], out_dir: str | os.PathLike) -> dict[str, Path]:
    """``results.json`` and ``ratings.png`` in ``out_dir`` (each written atomically)."""
    out = Path(out_dir)
    paths = {"json": atomic_write_json(out / "results.json", report)}
    png = plot_ratings(report, out / "ratings.png")
    if png is not None:
        paths["png"] = png
    return paths
