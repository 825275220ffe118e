"""Training-step throughput: lmlab's backbone vs transformers' LlamaForCausalLM.

Both models get the identical shape (same parameter count, SDPA attention,
untied embeddings, SwiGLU, RMSNorm, RoPE), the same batch, the same AdamW,
in the same process; steps alternate between the two so drift in machine load
hits both equally. Reports tokens/s for fp32 and bf16 autocast on CPU (or
CUDA when present), then on its last line the lmlab/HF speed ratio (geometric
mean over precisions) as a bare number.

    python benchmarks/throughput.py [--d-model 256 --layers 4 --seq 256 --batch 8 --steps 10]
"""

from __future__ import annotations

import argparse
import contextlib
import math
import time

import torch


def build_pair(args, device):
    from transformers import LlamaConfig, LlamaForCausalLM

    from lmlab.models import CausalLM, TransformerConfig

    cfg = TransformerConfig(
        vocab_size=args.vocab, d_model=args.d_model, n_layers=args.layers, n_heads=args.heads,
        ffn_hidden=args.ffn, max_seq_len=args.seq, tie_embeddings=False, pad_vocab_to=1,
    )
    ours = CausalLM(cfg).to(device)
    hf_cfg = LlamaConfig(
        vocab_size=args.vocab, hidden_size=args.d_model, intermediate_size=cfg.hidden_dim,
        num_hidden_layers=args.layers, num_attention_heads=args.heads, num_key_value_heads=args.heads,
        max_position_embeddings=args.seq, rms_norm_eps=cfg.norm_eps, tie_word_embeddings=False,
        attention_bias=False, mlp_bias=False, attn_implementation="sdpa",
    )
    hf = LlamaForCausalLM(hf_cfg).to(device)
    n_ours = sum(p.numel() for p in ours.parameters())
    n_hf = sum(p.numel() for p in hf.parameters())
    assert n_ours == n_hf, f"shapes differ: lmlab {n_ours:,} vs HF {n_hf:,} parameters"
    return ours, hf, n_ours


def step_fn(model, is_hf, opt, x, y, autocast):
    with autocast:
        if is_hf:
            logits = model(input_ids=x, use_cache=False).logits
        else:
            logits = model(x)
        loss = torch.nn.functional.cross_entropy(logits.float().flatten(0, 1), y.flatten())
    loss.backward()
    opt.step()
    opt.zero_grad(set_to_none=True)
    return float(loss)


def measure(args, precision: str, device) -> dict:
    torch.manual_seed(0)
    ours, hf, n = build_pair(args, device)
    x = torch.randint(0, args.vocab, (args.batch, args.seq), device=device)
    y = torch.randint(0, args.vocab, (args.batch, args.seq), device=device)
    opts = {
        "lmlab": torch.optim.AdamW(ours.parameters(), lr=1e-4, foreach=True),
        "hf": torch.optim.AdamW(hf.parameters(), lr=1e-4, foreach=True),
    }
    models = {"lmlab": (ours, False), "hf": (hf, True)}
    if precision == "bf16":
        autocast = lambda: torch.autocast(device.type, dtype=torch.bfloat16)  # noqa: E731
    else:
        autocast = contextlib.nullcontext
    times = {"lmlab": [], "hf": []}
    for i in range(args.warmup + args.steps):
        order = ("lmlab", "hf") if i % 2 == 0 else ("hf", "lmlab")
        for name in order:
            model, is_hf = models[name]
            if device.type == "cuda":
                torch.cuda.synchronize()
            t0 = time.perf_counter()
            step_fn(model, is_hf, opts[name], x, y, autocast())
            if device.type == "cuda":
                torch.cuda.synchronize()
            if i >= args.warmup:
                times[name].append(time.perf_counter() - t0)
    tokens = args.batch * args.seq
    # median step time: robust to the odd slow step on a shared machine
    med = {k: sorted(v)[len(v) // 2] for k, v in times.items()}
    return {"params": n, **{f"{k}_tps": tokens / med[k] for k in med}}


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__)
    p.add_argument("--d-model", type=int, default=256)
    p.add_argument("--layers", type=int, default=4)
    p.add_argument("--heads", type=int, default=4)
    p.add_argument("--ffn", type=int, default=None)
    p.add_argument("--vocab", type=int, default=8192)
    p.add_argument("--seq", type=int, default=256)
    p.add_argument("--batch", type=int, default=8)
    p.add_argument("--steps", type=int, default=10)
    p.add_argument("--warmup", type=int, default=3)
    p.add_argument("--precisions", default="fp32,bf16")
    args = p.parse_args()
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    print(f"device={device.type} threads={torch.get_num_threads()} torch={torch.__version__}")
    print(f"shape: d_model={args.d_model} layers={args.layers} heads={args.heads} vocab={args.vocab} "
          f"seq={args.seq} batch={args.batch}")
    print(f"{'precision':<10}{'params':>12}{'lmlab tok/s':>14}{'HF Llama tok/s':>16}{'ratio':>8}")
    ratios = []
    for prec in args.precisions.split(","):
        r = measure(args, prec, device)
        ratio = r["lmlab_tps"] / r["hf_tps"]
        ratios.append(ratio)
        print(f"{prec:<10}{r['params']:>12,}{r['lmlab_tps']:>14,.0f}{r['hf_tps']:>16,.0f}{ratio:>8.3f}")
    geo = math.exp(sum(math.log(r) for r in ratios) / len(ratios))
    print("lmlab/HF training tokens/s ratio (geometric mean):")
    print(f"{geo:.3f}")


if __name__ == "__main__":
    main()
