"""Mixture-of-experts layer step time: grouped experts vs a dense SwiGLU of equal active parameters, and vs a per-expert loop.

    python benchmarks/moe_step.py --threads 1          # 8 experts, top-2, d_model 256, 4,096 tokens
    python benchmarks/moe_step.py --experts 16 --top_k 4

One step is forward + backward of one feed-forward layer on (tokens, d_model)
inputs. Three sides, alternated step by step under pinned threads
(``benchmarks/harness.py``):

* ``dense``: lmlab's SwiGLU MLP of width ``top_k * expert_hidden`` (the
  baseline: the same active parameters per token, without the router);
* ``moe``: :class:`lmlab.models.moe.MoEFeedForward`, dropless, tokens sorted by
  expert and two grouped matmuls;
* ``moe-loop``: the same layer and weights computed by
  ``MoEFeedForward.naive_forward``, a Python loop over experts.

The router is initialised with a larger std than training uses so the load is
uneven, as it is in a real model, rather than near-uniform.
"""

from __future__ import annotations

import argparse
import os
import sys

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from harness import Side, alternate, pin_threads, report_ratio  # noqa: E402


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--experts", type=int, default=8)
    ap.add_argument("--top_k", type=int, default=2)
    ap.add_argument("--d_model", type=int, default=256)
    ap.add_argument("--expert_hidden", type=int, default=None, help="default: 8/3 d_model / top_k (rounded to 16)")
    ap.add_argument("--tokens", type=int, default=4096)
    ap.add_argument("--steps", type=int, default=10)
    ap.add_argument("--threads", type=int, default=2)
    args = ap.parse_args()
    pin_threads(args.threads)

    import torch

    from lmlab.models.config import TransformerConfig
    from lmlab.models.moe import MoEFeedForward
    from lmlab.models.transformer import MLP

    d, k = args.d_model, args.top_k
    h = args.expert_hidden or max(16, round(8 * d / 3 / k / 16) * 16)
    moe_cfg = TransformerConfig(vocab_size=256, d_model=d, n_layers=1, n_heads=4, moe_experts=args.experts,
                                moe_top_k=k, moe_expert_hidden=h)
    dense_cfg = TransformerConfig(vocab_size=256, d_model=d, n_layers=1, n_heads=4, ffn_hidden=k * h)
    torch.manual_seed(0)
    dense, moe = MLP(dense_cfg), MoEFeedForward(moe_cfg)
    with torch.no_grad():
        moe.router.weight.normal_(0, 0.5)
    x = torch.randn(args.tokens, d)
    grad = torch.randn(args.tokens, d)

    def step(fn):
        def run():
            inp = x.clone().requires_grad_(True)
            fn(inp).backward(grad)
        return run

    sides = [Side("dense", step(dense)), Side("moe", step(moe)), Side("moe-loop", step(moe.naive_forward))]
    alternate(sides, args.steps, warmup=2)
    moe.records.clear()
    with torch.no_grad():
        load = torch.bincount(moe.route(x)[3].flatten(), minlength=args.experts).float() / (args.tokens * k)
    active_moe = sum(p.numel() for p in moe.router.parameters()) + k * (moe.gate_up[0].numel() + moe.down[0].numel())
    print(f"{args.tokens} tokens x d_model {d}, {args.experts} experts top-{k} of width {h}; dense SwiGLU width {k * h}; "
          f"{torch.get_num_threads()} threads, torch {torch.__version__}")
    print(f"active parameters: dense {sum(p.numel() for p in dense.parameters()):,}, moe {active_moe:,} "
          f"(of {sum(p.numel() for p in moe.parameters()):,}); expert load min/max "
          f"{float(load.min()):.3f}/{float(load.max()):.3f} (uniform {1 / args.experts:.3f})")
    for s in sides:
        print(f"  {s.name:9s} " + (f"{s.median * 1e3:8.2f} ms/step (median of {len(s.times)})" if s.median else f"failed: {s.error}"))
    # time ratios: >1 means the first side is slower
    differs = "router + sort/gather/scatter of the grouped MoE vs none"
    report_ratio("moe time / dense time", sides[1].median, sides[0].median, differs, higher_is_better=True)
    report_ratio("moe-loop time / moe time", sides[2].median, sides[1].median,
                 "per-expert Python loop vs two grouped matmuls, same weights", higher_is_better=True)


if __name__ == "__main__":
    main()
