"""Dense vs mixture-of-experts (8 experts, top-2, equal active parameters) at equal training FLOPs.

    python docs/study/moe_vs_dense.py --out docs/study/moe_vs_dense

Each size trains a dense SwiGLU model and an MoE model whose experts have half
the dense width (top-2 of 8: the same active feed-forward parameters), with
``lmlab fit`` on experiments/scaling/base.yaml (the shared-data mixture). The
MoE run takes slightly fewer steps so that both spend the same training FLOPs
(``lmlab.models.counting.training_flops``, active parameters; the router adds a
little per token). Validation bits per byte at the end of training are written
to ``<out>.json`` and plotted in ``<out>.png``.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[2]
SIZES = {"d64": dict(d_model=64, n_layers=4, n_heads=4), "d128": dict(d_model=128, n_layers=4, n_heads=4)}


def model_config(size: dict, moe: bool) -> dict:
    from lmlab.models.config import TransformerConfig

    base = dict(vocab_size=2048, max_seq_len=1024, tie_embeddings=True, **size)
    hidden = TransformerConfig(**base).hidden_dim
    if moe:
        return {**base, "moe_experts": 8, "moe_top_k": 2, "moe_expert_hidden": hidden // 2}
    return {**base, "ffn_hidden": hidden}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--out", default="docs/study/moe_vs_dense")
    ap.add_argument("--steps", type=int, default=400, help="dense steps; MoE runs match their FLOPs")
    ap.add_argument("--batch_size", type=int, default=8)
    ap.add_argument("--runs", default="runs/moe_study")
    ap.add_argument("--threads", type=int, default=1, help="intra-op threads of each run")
    ap.add_argument("--val_max_windows", type=int, default=20)
    args = ap.parse_args()

    from lmlab.models.config import TransformerConfig
    from lmlab.models.counting import count_params, training_flops

    seq = 128
    results = []
    for name, size in SIZES.items():
        dense_cfg = TransformerConfig(**model_config(size, False))
        dense_tokens = args.steps * args.batch_size * seq
        budget = training_flops(dense_cfg, dense_tokens, seq)
        for moe in (False, True):
            cfg = TransformerConfig(**model_config(size, moe))
            steps = round(budget / training_flops(cfg, args.batch_size * seq, seq))
            root = Path(args.runs) / f"{name}-{'moe' if moe else 'dense'}"
            cmd = [sys.executable, "-m", "lmlab", "fit", "--config", "experiments/scaling/base.yaml",
                   f"--model.init_args.config={json.dumps(model_config(size, moe))}",
                   f"--trainer.max_steps={steps}", f"--trainer.val_check_interval={steps}",
                   f"--data.init_args.batch_size={args.batch_size}", "--data.init_args.tokenizer_train.sample_chars=1000000",
                   f"--trainer.default_root_dir={root}", "--trainer.logger=false",
                   "--budget.params=null", "--budget.tokens=null"]
            cmd.append(f"--data.init_args.val_max_windows={args.val_max_windows}")
            env = {**os.environ, **{v: str(args.threads) for v in ("OMP_NUM_THREADS", "MKL_NUM_THREADS")}}
            r = subprocess.run(cmd, cwd=REPO, capture_output=True, text=True, env=env)
            if r.returncode != 0:
                print(r.stderr[-3000:])
                raise SystemExit(f"{root}: lmlab fit failed")
            row = json.loads((root / "results.jsonl").read_text().splitlines()[-1]) if (root / "results.jsonl").exists() \
                else None
            pc = count_params(cfg)
            rec = {"size": name, "kind": "moe" if moe else "dense", "steps": steps, "tokens": steps * args.batch_size * seq,
                   "train_flops": training_flops(cfg, steps * args.batch_size * seq, seq),
                   "active_non_embedding": pc.active_non_embedding, "total_non_embedding": pc.non_embedding,
                   "val_bpb": row["bpb"] if row else None, "val_loss": row["loss"] if row else None,
                   "wall_time_s": row.get("wall_time_s") if row else None}
            print(json.dumps(rec), flush=True)
            results.append(rec)
    out = Path(args.out)
    out.with_suffix(".json").write_text(json.dumps({"command": " ".join(["python", *sys.argv]), "seq_len": seq,
                                                   "batch_size": args.batch_size, "runs": results}, indent=2) + "\n")
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(5, 3.5))
    for kind, marker in (("dense", "o"), ("moe", "s")):
        rows = [r for r in results if r["kind"] == kind]
        ax.plot([r["active_non_embedding"] for r in rows], [r["val_bpb"] for r in rows], marker=marker,
                label=f"{kind}" + (" (8 experts, top-2)" if kind == "moe" else ""))
    ax.set_xscale("log")
    ax.set_xlabel("active non-embedding parameters")
    ax.set_ylabel("validation bits per byte")
    ax.set_title(f"equal training FLOPs per size ({args.steps} dense steps x {args.batch_size * seq} tokens)", fontsize=8)
    ax.legend()
    fig.tight_layout()
    fig.savefig(out.with_suffix(".png"), dpi=120)


if __name__ == "__main__":
    main()
