"""Training-step time and peak memory vs sequence length for lmlab's attention options.

Four sides share one tiny shape (d_model 64, 2 layers, 2 heads, vocab 256, batch 1, AdamW):

* ``full-math``: full causal attention with SDPA restricted to its math kernel, which
  materialises the T x T scores (the baseline of every ratio);
* ``full-fused``: full causal attention with SDPA's default CPU kernel (flash attention for
  CPU: blockwise, keeps only the log-sum-exp, so its memory is linear in T);
* ``sliding_window``: ``attention: sliding_window`` (block-local, window ``--window``);
* ``linear``: ``attention: linear`` (chunked gated linear attention, chunk ``--chunk``).

Time: at each length the sides run one AdamW step each in turn (``harness.alternate``),
``--steps`` timed after one warm-up. Each step records its wall time (the harness) and the
CPU time of the process (``time.process_time``); with one intra-op thread the CPU time is
the work of the step alone, unaffected by other processes taking turns on the cores, so
the plot, the table and the fitted exponents use the median CPU time (wall-clock medians
are in the JSON). Peak memory: one more step of
each side under ``torch.profiler`` with ``profile_memory=True``; the figure is the highest
total the CPU allocator reached during the step minus what it held when the step began
(so parameters and AdamW states, allocated by the warm-up, are excluded; activations,
gradients and temporaries count). Exponents are least-squares slopes of log(value) on
log(T) over T >= ``--fit-from``.

    python benchmarks/attention_scaling.py [--lengths 256 512 1024 2048 4096 8192 --steps 3 --threads 1]

Writes docs/study/attention_scaling.json and .png (log-log).
"""

from __future__ import annotations

import argparse
import json
import math
import os
import sys
import statistics
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from harness import Side, alternate, pin_threads, report_ratio  # noqa: E402

REPO = Path(__file__).resolve().parents[1]
SIDES = ("full-math", "full-fused", "sliding_window", "linear")


def build(side: str, args):
    import torch

    from lmlab.models import CausalLM, TransformerConfig

    kw = {}
    if side == "sliding_window":
        kw = dict(attention="sliding_window", sliding_window=args.window)
    elif side == "linear":
        kw = dict(attention="linear", linear_chunk_size=args.chunk)
    torch.manual_seed(0)
    cfg = TransformerConfig(vocab_size=256, d_model=args.d_model, n_layers=args.layers, n_heads=args.heads,
                            max_seq_len=max(args.lengths), pad_vocab_to=1, **kw)
    model = CausalLM(cfg)
    opt = torch.optim.AdamW(model.parameters(), lr=1e-3)
    return model, opt


def make_step(side: str, model, opt, T: int):
    import torch
    import torch.nn.functional as F
    from torch.nn.attention import SDPBackend, sdpa_kernel

    x = torch.randint(0, 256, (1, T + 1), generator=torch.Generator().manual_seed(T))

    def step():
        t0 = time.process_time()
        ctx = sdpa_kernel([SDPBackend.MATH]) if side == "full-math" else _nullcontext()
        with ctx:
            logits = model(x[:, :-1])
            loss = F.cross_entropy(logits.flatten(0, 1), x[:, 1:].flatten())
            loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)
        step.cpu_times.append(time.process_time() - t0)
        return float(loss.detach())

    step.cpu_times = []
    return step


class _nullcontext:
    def __enter__(self):
        return self

    def __exit__(self, *exc):
        return False


def measure_memory(step) -> float:
    """Peak bytes the CPU allocator holds during ``step`` above what it held before, from the profiler's
    memory events (every tensor allocation and free, in order)."""
    from torch.profiler import ProfilerActivity, profile

    with profile(activities=[ProfilerActivity.CPU], profile_memory=True) as prof:
        step()
    fd, path = tempfile.mkstemp(suffix=".json")
    os.close(fd)
    try:
        prof.export_chrome_trace(path)
        with open(path) as f:
            events = [e["args"] for e in json.load(f)["traceEvents"]
                      if e.get("name") == "[memory]" and e["args"].get("Device Type") == 0]
    finally:
        os.unlink(path)
    base = events[0]["Total Allocated"] - events[0]["Bytes"]
    return float(max(e["Total Allocated"] for e in events) - base)


def fit_exponent(lengths, values, fit_from: int) -> float | None:
    pts = [(math.log(t), math.log(v)) for t, v in zip(lengths, values) if t >= fit_from and v and v > 0]
    if len(pts) < 2:
        return None
    mx = sum(p[0] for p in pts) / len(pts)
    my = sum(p[1] for p in pts) / len(pts)
    return sum((x - mx) * (y - my) for x, y in pts) / sum((x - mx) ** 2 for x, _ in pts)


def plot(results: dict, out: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 2, figsize=(11, 4.2))
    L = results["lengths"]
    for side in SIDES:
        r = results["sides"][side]
        for ax, key, exp in ((axes[0], "time_s", "time_exponent"), (axes[1], "peak_mib", "memory_exponent")):
            pts = [(t, v) for t, v in zip(L, r[key]) if v]
            if pts:
                label = f"{side} (slope {r[exp]:.2f})" if r[exp] is not None else side
                ax.plot(*zip(*pts), marker="o", label=label)
    for ax, title in ((axes[0], "training-step CPU time (s)"), (axes[1], "peak memory of the step (MiB)")):
        ax.set_xscale("log", base=2)
        ax.set_yscale("log")
        ax.set_xlabel("sequence length T")
        ax.set_title(title)
        ax.grid(True, which="both", alpha=0.3)
        ax.legend(fontsize=8)
    fig.suptitle(f"attention options, d_model {results['shape']['d_model']}, {results['shape']['layers']} layers, "
                 f"window {results['shape']['window']}, chunk {results['shape']['chunk']}, "
                 f"{results['threads']} thread", fontsize=10)
    fig.tight_layout()
    fig.savefig(out, dpi=110)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--lengths", type=int, nargs="+", default=[256, 512, 1024, 2048, 4096, 8192])
    p.add_argument("--steps", type=int, default=3)
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--d-model", type=int, default=64)
    p.add_argument("--layers", type=int, default=2)
    p.add_argument("--heads", type=int, default=2)
    p.add_argument("--window", type=int, default=256)
    p.add_argument("--chunk", type=int, default=64)
    p.add_argument("--fit-from", type=int, default=1024)
    p.add_argument("--out", default=str(REPO / "docs" / "study" / "attention_scaling"))
    args = p.parse_args()
    pin_threads(args.threads)
    import torch

    print(f"torch {torch.__version__}, {args.threads} threads; sides differ only in attention "
          f"(full-math: SDPA math kernel; full-fused: SDPA default CPU kernel; window {args.window}; chunk {args.chunk})")
    built = {s: build(s, args) for s in SIDES}
    res = {"lengths": args.lengths, "threads": args.threads, "steps": args.steps, "torch": torch.__version__,
           "shape": dict(d_model=args.d_model, layers=args.layers, heads=args.heads, vocab=256, batch=1,
                         window=args.window, chunk=args.chunk),
           "time_method": "median process CPU time (time.process_time) of the timed steps; wall-clock medians "
                          "in wall_median_s",
           "memory_method": "torch.profiler(profile_memory=True): peak allocator total during one step minus "
                            "the total when it began",
           "fit_from": args.fit_from, "sides": {s: {"time_s": [], "wall_median_s": [], "peak_mib": []} for s in SIDES}}
    for T in args.lengths:
        sides = [Side(s, make_step(s, *built[s], T)) for s in SIDES]
        alternate(sides, steps=args.steps, warmup=1)
        for side in sides:
            mem = measure_memory(side.step) if side.error is None else None
            r = res["sides"][side.name]
            timed = side.step.cpu_times[1 : 1 + args.steps]  # after the warm-up, before the profiled step
            r["time_s"].append(statistics.median(timed) if side.median is not None else None)
            r["wall_median_s"].append(side.median)
            r["peak_mib"].append(mem / 2**20 if mem is not None else None)
            if side.error:
                r.setdefault("errors", {})[str(T)] = side.error
        print(f"T={T:5d}  " + "  ".join(
            f"{s.name}: {res['sides'][s.name]['time_s'][-1]:.3f}s {res['sides'][s.name]['peak_mib'][-1] or float('nan'):.0f}MiB"
            if s.median is not None else f"{s.name}: failed" for s in sides), flush=True)
    print(f"\nfitted exponents (T >= {args.fit_from}):")
    print("| attention | time exponent | memory exponent |\n|---|---|---|")
    for s in SIDES:
        r = res["sides"][s]
        r["time_exponent"] = fit_exponent(args.lengths, r["time_s"], args.fit_from)
        r["memory_exponent"] = fit_exponent(args.lengths, r["peak_mib"], args.fit_from)
        fmt = lambda v: f"{v:.2f}" if v is not None else "n/a"  # noqa: E731
        print(f"| {s} | {fmt(r['time_exponent'])} | {fmt(r['memory_exponent'])} |")
    T = args.lengths[-1]
    base = res["sides"]["full-math"]
    for s in SIDES[1:]:
        report_ratio(f"{s} vs full-math, step CPU time at T={T} (speed-up)", res["sides"][s]["time_s"][-1],
                     base["time_s"][-1], differences="attention", higher_is_better=False)
        report_ratio(f"{s} vs full-math, peak memory at T={T} (reduction)", res["sides"][s]["peak_mib"][-1],
                     base["peak_mib"][-1], differences="attention", higher_is_better=False)
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.with_suffix(".json").write_text(json.dumps(res, indent=2) + "\n")
    plot(res, out.with_suffix(".png"))
    print(f"wrote {out.with_suffix('.json')} and {out.with_suffix('.png')}")


if __name__ == "__main__":
    main()
