"""The prepare report: documents and bytes per stage and source, mixture, plots; JSON, Markdown, W&B.

Written to ``OUT/report/``: ``report.json`` (everything), ``report.md`` (the
tables), ``quality_hist.png`` (quality-score histograms per source, selected
documents highlighted) and ``filter_reasons.png`` (drop counts per filter rule
and source). With an active W&B run (``wandb.run is not None``) the table and
plots are logged too.

Mixture: the realised share of each source is its train tokens over all train
tokens; a training run of ``train_tokens`` tokens draws ``weight * train_tokens``
from a source, which needs ``weight * train_tokens / source_tokens`` epochs of it.
"""

from __future__ import annotations

import json
import math
import sys
from pathlib import Path
from typing import Any

import numpy as np

from lmlab.atomic import atomic_write_bytes

STAGES = ("read", "collect", "filter", "quality", "dedup", "decontaminate", "final")


def _mb(b: float) -> str:
    return f"{b / 1e6:.2f}"


def build_report(cfg, collected, filtered, quality, selection, pack_meta, extra: dict) -> dict:
    """Assemble the report dict from the stage results and the global selection."""
    weights = cfg.weights
    total_train = sum(m["train_tokens"] for m in pack_meta["sources"].values()) or 1
    sources: dict[str, Any] = {}
    for s in cfg.sources:
        c, f, q, sel = collected[s.name].stats, filtered[s.name].stats, quality[s.name], selection[s.name]
        st = sel.stats()
        m = pack_meta["sources"][s.name]
        share = m["train_tokens"] / total_train
        epochs = None
        if cfg.train_tokens:
            epochs = (weights[s.name] * float(cfg.train_tokens) / m["train_tokens"]) if m["train_tokens"] else math.inf
        scores = sel.scores[np.isfinite(sel.scores)] if len(sel.scores) else np.zeros(0)
        sources[s.name] = {
            "kind": s.kind,
            "type": s.type,
            "stages": {
                "read": {"docs": c.get("docs_in", 0), "bytes": c.get("bytes_in", 0)},
                "collect": {"docs": c.get("docs_out", 0), "bytes": c.get("bytes_out", 0)},
                "filter": {"docs": f.get("docs_out", 0), "bytes": f.get("bytes_out", 0)},
                "quality": {"docs": st["quality_docs"], "bytes": st["quality_bytes"]},
                "dedup": {"docs": st["dedup_docs"], "bytes": st["dedup_bytes"]},
                "decontaminate": {"docs": st["final_docs"], "bytes": st["final_bytes"]},
                "final": {"docs": m["documents"], "bytes": st["final_bytes"]},
            },
            "skipped": c.get("skipped", {}),
            "read_counts": c.get("counts", {}),
            "skip_examples": c.get("examples", [])[:5],
            "filter_dropped": f.get("dropped", {}),
            "filter_modified": f.get("modified", 0),
            "quality": {
                "applies": q.done.get("applies", False),
                "perplexity_norm": q.done.get("norm"),
                "score_mean": float(scores.mean()) if len(scores) else None,
                "score_p10_p50_p90": [float(x) for x in np.quantile(scores, [0.1, 0.5, 0.9])] if len(scores) else None,
            },
            "dedup": {
                "exact_removed": st["dedup_exact_removed"],
                "near_removed": st["dedup_near_removed"],
                "bytes_removed": st["dedup_bytes_removed"],
                "duplicates_kept_in": st["duplicates_kept_in"],
            },
            "decontaminate": {
                "contaminated_docs": st["contaminated_docs"],
                "by_task": st["contaminated_by_task"],
                "dropped": bool(cfg.decontaminate.drop) and st["contaminated_docs"] > 0,
            },
            "tokens": {"train": m["train_tokens"], "val": m["val_tokens"], "val_documents": m["val_documents"]},
            "mixture": {"target_weight": weights[s.name], "realised_share": share, "epochs_for_budget": epochs},
        }
    by_task: dict[str, int] = {}
    for row in sources.values():
        for t, k in row["decontaminate"]["by_task"].items():
            by_task[t] = by_task.get(t, 0) + k
    return {
        "out": extra.get("out"),
        "seed": cfg.seed,
        "train_tokens_budget": cfg.train_tokens,
        "tokenizer": pack_meta.get("tokenizer"),
        "dtype": pack_meta.get("dtype"),
        "sources": sources,
        "dedup": extra.get("dedup", {}),
        "decontaminate": {"enabled": cfg.decontaminate.enabled, "drop": cfg.decontaminate.drop, "by_task": by_task},
        "timing_s": extra.get("timing", {}),
        "computed": extra.get("computed", []),
        "reused": extra.get("reused", []),
    }


def stage_count_lines(report: dict) -> list[str]:
    """The log lines of document counts (``quality web 14 -> 13 docs``), read from the report's stages.

    The per-source stages only compute (scores, signatures, hits); which
    documents survive is decided by the global selection, so the counts are
    logged from the report and cannot disagree with it.
    """
    lines = []
    for name, row in report["sources"].items():
        prev = None
        for st in STAGES:
            n = row["stages"][st]["docs"]
            if prev is not None:
                lines.append(f"{st:<13} {name:<12} {prev:>8,} -> {n:>8,} docs")
            prev = n
    return lines


def summary_table(report: dict) -> str:
    """Markdown table: documents (and MB) after each stage, tokens and mixture per source."""
    head = "| source | kind | " + " | ".join(STAGES) + " | train tokens | val tokens | target | realised | epochs @ budget |"
    sep = "|" + "---|" * (len(STAGES) + 7)
    lines = [head, sep]
    totals = {st: [0, 0] for st in STAGES}
    tok = [0, 0]
    for name, row in report["sources"].items():
        cells = []
        for st in STAGES:
            d = row["stages"][st]
            totals[st][0] += d["docs"]
            totals[st][1] += d["bytes"]
            cells.append(f"{d['docs']:,} ({_mb(d['bytes'])} MB)")
        t = row["tokens"]
        tok[0] += t["train"]
        tok[1] += t["val"]
        mix = row["mixture"]
        ep = mix["epochs_for_budget"]
        ep_s = "-" if ep is None else ("inf" if not math.isfinite(ep) else f"{ep:.2f}")
        lines.append(
            f"| {name} | {row['kind']} | " + " | ".join(cells)
            + f" | {t['train']:,} | {t['val']:,} | {mix['target_weight']:.3f} | {mix['realised_share']:.3f} | {ep_s} |"
        )
    lines.append(
        "| **total** | | " + " | ".join(f"{totals[st][0]:,} ({_mb(totals[st][1])} MB)" for st in STAGES)
        + f" | {tok[0]:,} | {tok[1]:,} | 1.000 | 1.000 | |"
    )
    return "\n".join(lines)


def markdown(report: dict) -> str:
    """The whole report as Markdown."""
    out = ["# Data preparation report", ""]
    out.append(f"Output: `{report['out']}` (tokens in `tokens/`), seed {report['seed']}, tokenizer `{report['tokenizer']}`, dtype {report['dtype']}.")
    if report.get("train_tokens_budget"):
        out.append(f"Token budget for the epochs column: {float(report['train_tokens_budget']):,.0f}.")
    out += ["", "## Documents (and MB of UTF-8 text) after each stage", "", summary_table(report), ""]
    out += ["## Skipped while reading", ""]
    for name, row in report["sources"].items():
        sk = ", ".join(f"{k}: {v}" for k, v in sorted(row["skipped"].items(), key=lambda kv: -kv[1])) or "none"
        counts = ", ".join(f"{k}: {v}" for k, v in sorted(row["read_counts"].items())) or "none"
        out.append(f"- **{name}**: skipped {sk}; noted {counts}")
    out += ["", "## Filter drops (filter:reason)", ""]
    for name, row in report["sources"].items():
        dr = ", ".join(f"{k}: {v}" for k, v in sorted(row["filter_dropped"].items(), key=lambda kv: -kv[1])[:8]) or "none"
        out.append(f"- **{name}** ({row['filter_modified']} rewritten by line filters): {dr}")
    out += ["", "## Quality", ""]
    for name, row in report["sources"].items():
        q = row["quality"]
        pct = q["score_p10_p50_p90"]
        pct_s = ", ".join(f"{x:.3f}" for x in pct) if pct else "-"
        norm = q["perplexity_norm"]
        norm_s = f"[{norm[0]:.0f}, {norm[1]:.0f}]" if norm else "-"
        out.append(f"- **{name}**: selection {'on' if q['applies'] else 'off'}; score p10/p50/p90 {pct_s}; perplexity range {norm_s}")
    d = report.get("dedup") or {}
    out += ["", "## Dedup (across sources; first-listed source wins)", ""]
    out.append(
        f"{d.get('documents', 0):,} documents compared; {d.get('exact_removed', 0):,} exact and "
        f"{d.get('near_removed', 0):,} near duplicates removed ({d.get('near_clusters', 0):,} near clusters)."
    )
    for name, row in report["sources"].items():
        dd = row["dedup"]
        kept_in = ", ".join(f"{k}: {v}" for k, v in dd["duplicates_kept_in"].items()) or "-"
        out.append(f"- **{name}**: exact {dd['exact_removed']}, near {dd['near_removed']} ({_mb(dd['bytes_removed'])} MB); kept copy in {kept_in}")
    dc = report["decontaminate"]
    out += ["", "## Decontamination", ""]
    if not dc["enabled"]:
        out.append("disabled")
    else:
        out.append(f"Contaminated documents were {'dropped' if dc['drop'] else 'kept (report only)'}.")
        for name, row in report["sources"].items():
            r = row["decontaminate"]
            tasks = ", ".join(f"{k}: {v}" for k, v in r["by_task"].items()) or "-"
            out.append(f"- **{name}**: {r['contaminated_docs']} documents; by task: {tasks}")
    if report.get("timing_s"):
        out += ["", "## Timing (s)", ""]
        out.append(", ".join(f"{k}: {v:.1f}" for k, v in report["timing_s"].items()))
    return "\n".join(out) + "\n"


def plot_quality(selection: dict, path: Path, bins: int = 30) -> bool:
    """Histogram of quality scores per source (selected vs dropped); False when there is nothing to plot."""
    from matplotlib.figure import Figure  # no pyplot: leaves the process's backend alone

    names = [n for n, s in selection.items() if np.isfinite(s.scores).any()]
    if not names:
        return False
    fig = Figure(figsize=(7, 1.9 * len(names) + 0.6))
    axes = fig.subplots(len(names), 1, squeeze=False)
    edges = np.linspace(0.0, 1.0, bins + 1)
    for ax, name in zip(axes[:, 0], names):
        s = selection[name]
        ok = np.isfinite(s.scores)
        ax.hist(s.scores[ok & s.quality], bins=edges, color="tab:blue", label="selected")
        ax.hist(s.scores[ok & ~s.quality], bins=edges, color="tab:red", alpha=0.7, label="dropped")
        ax.set_ylabel(name)
        ax.legend(loc="upper left", fontsize=7)
    axes[-1, 0].set_xlabel("quality score")
    fig.suptitle("Quality score per source")
    fig.tight_layout()
    _save_fig(fig, path)
    return True


def plot_filter_reasons(report: dict, path: Path, top: int = 12) -> bool:
    """Horizontal bars of documents dropped per ``filter:reason`` and source."""
    from matplotlib.figure import Figure

    totals: dict[str, int] = {}
    for row in report["sources"].values():
        for k, v in row["filter_dropped"].items():
            totals[k] = totals.get(k, 0) + v
    reasons = [k for k, _ in sorted(totals.items(), key=lambda kv: -kv[1])[:top]]
    if not reasons:
        return False
    names = list(report["sources"])
    fig = Figure(figsize=(8, 0.35 * len(reasons) + 1.5))
    ax = fig.subplots()
    left = np.zeros(len(reasons))
    for name in names:
        vals = np.array([report["sources"][name]["filter_dropped"].get(r, 0) for r in reasons], dtype=float)
        if vals.any():
            ax.barh(reasons, vals, left=left, label=name)
            left += vals
    ax.invert_yaxis()
    ax.set_xlabel("documents dropped")
    ax.legend(fontsize=7)
    ax.set_title("Filter drops by rule")
    fig.tight_layout()
    _save_fig(fig, path)
    return True


def _save_fig(fig, path: Path) -> None:
    import io

    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=110)
    atomic_write_bytes(path, buf.getvalue())


def write_report(report: dict, selection: dict, out_dir: Path, bins: int = 30, wandb: bool = True) -> dict[str, Path]:
    """Write JSON, Markdown and plots; log them to W&B when a run is active. Returns the written paths."""
    out_dir.mkdir(parents=True, exist_ok=True)
    paths = {"json": out_dir / "report.json", "markdown": out_dir / "report.md"}
    atomic_write_bytes(paths["json"], (json.dumps(report, indent=1, default=_default) + "\n").encode())
    atomic_write_bytes(paths["markdown"], markdown(report).encode())
    if plot_quality(selection, out_dir / "quality_hist.png", bins):
        paths["quality_hist"] = out_dir / "quality_hist.png"
    if plot_filter_reasons(report, out_dir / "filter_reasons.png"):
        paths["filter_reasons"] = out_dir / "filter_reasons.png"
    if wandb:
        log_to_wandb(report, paths)
    return paths


def _default(o: Any) -> Any:
    if hasattr(o, "item"):
        return o.item()
    return str(o)


def log_to_wandb(report: dict, paths: dict[str, Path]) -> bool:
    """Log the summary table and plots to the active W&B run (no-op without one)."""
    wandb = sys.modules.get("wandb")  # a run can only be active if wandb was imported
    if wandb is None or getattr(wandb, "run", None) is None:
        return False
    cols = ["source", "kind"] + [f"{s}_docs" for s in STAGES] + [f"{s}_bytes" for s in STAGES]
    cols += ["train_tokens", "val_tokens", "target_weight", "realised_share", "epochs_for_budget"]
    rows = []
    for name, row in report["sources"].items():
        rows.append(
            [name, row["kind"]]
            + [row["stages"][s]["docs"] for s in STAGES]
            + [row["stages"][s]["bytes"] for s in STAGES]
            + [row["tokens"]["train"], row["tokens"]["val"], row["mixture"]["target_weight"],
               row["mixture"]["realised_share"], row["mixture"]["epochs_for_budget"]]
        )
    payload: dict[str, Any] = {"data/prepare": wandb.Table(columns=cols, data=rows)}
    for k in ("quality_hist", "filter_reasons"):
        if k in paths:
            payload[f"data/{k}"] = wandb.Image(str(paths[k]))
    wandb.log(payload)
    for name, row in report["sources"].items():
        wandb.run.summary[f"data/{name}/train_tokens"] = row["tokens"]["train"]
        wandb.run.summary[f"data/{name}/realised_share"] = row["mixture"]["realised_share"]
    return True
