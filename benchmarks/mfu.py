"""Model FLOPs utilisation of lmlab's training step at ~125M and ~350M parameters, and tokens/s vs transformers.

On a CUDA device each shape trains with bf16 autocast, flash attention
(SDPA restricted to the flash kernel), blocks compiled one by one, fused
AdamW and the fused chunked cross-entropy (vocab 50k); transformers'
LlamaForCausalLM of the same shape and parameter count runs with SDPA, bf16
autocast, ``torch.compile`` and the same fused AdamW, its steps alternated
with lmlab's (benchmarks/harness.py). MFU = training FLOPs per token (PaLM
counting: 6N plus attention) x tokens/s / peak, with the peak taken from the
device's datasheet (lmlab.distributed.hardware) and, beside it, from a large
bf16 matmul measured in the same process.

On CPU the same code reports CPU figures, with fewer steps, a shorter
sequence and a batch of 1 (the datasheet has no CPU entry, so MFU is against
the measured matmul only).

    python benchmarks/mfu.py                 # both shapes; about 3-4 minutes on one H100
    python benchmarks/mfu.py --shapes 125m --steps 3
"""

from __future__ import annotations

import argparse
import contextlib
import os
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from harness import Side, alternate, pin_threads, report_ratio  # noqa: E402

#: name -> (d_model, layers, heads); GPT-2/3 small and medium shapes with a 50304-token vocabulary
SHAPES = {"125m": (768, 12, 12), "350m": (1024, 24, 16), "smoke": (64, 2, 2)}  # smoke: checks the script
VOCAB = 50304


def attention_context(device):
    """Restrict SDPA to the flash kernel on CUDA (fails loudly if it cannot run, rather than falling back)."""
    if device.type != "cuda":
        return contextlib.nullcontext()
    from torch.nn.attention import SDPBackend, sdpa_kernel

    return sdpa_kernel([SDPBackend.FLASH_ATTENTION])


def measured_peak(device, n: int) -> float:
    import torch

    a = torch.randn(n, n, device=device, dtype=torch.bfloat16)
    b = torch.randn(n, n, device=device, dtype=torch.bfloat16)
    sync = torch.cuda.synchronize if device.type == "cuda" else (lambda: None)
    side = Side("matmul", lambda: a @ b)
    alternate([side], steps=10 if device.type == "cuda" else 3, warmup=2, sync=sync)
    return 2 * n**3 / side.median


def build_sides(name: str, args, device):
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    from lmlab.models import TransformerConfig
    from lmlab.modules import OptimizerConfig, PretrainModule, TrainingSettings
    from lmlab.modules.optim import build_optimizer

    d, layers, heads = SHAPES[name]
    cfg = TransformerConfig(vocab_size=VOCAB, d_model=d, n_layers=layers, n_heads=heads, max_seq_len=args.seq,
                            tie_embeddings=False, pad_vocab_to=1)
    module = PretrainModule(cfg, settings=TrainingSettings(compile="blocks")).to(device)
    module.model.backbone.compile_blocks()
    assert module.uses_fused_cross_entropy()
    opt = build_optimizer(module.model, OptimizerConfig())
    tokens = torch.randint(0, VOCAB, (args.batch, args.seq + 1), device=device)
    normaliser = args.batch * args.seq
    autocast = lambda: torch.autocast(device.type, dtype=torch.bfloat16)  # noqa: E731

    def ours():
        with autocast(), attention_context(device):
            _, _, loss = module._nll(tokens, normaliser)
        loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)

    hf_cfg = LlamaConfig(vocab_size=VOCAB, hidden_size=d, intermediate_size=cfg.hidden_dim, num_hidden_layers=layers,
                         num_attention_heads=heads, num_key_value_heads=heads, max_position_embeddings=args.seq,
                         rms_norm_eps=cfg.norm_eps, tie_word_embeddings=False, attention_bias=False, mlp_bias=False,
                         attn_implementation="sdpa")
    hf = LlamaForCausalLM(hf_cfg).to(device)
    n_ours = sum(p.numel() for p in module.model.parameters())
    n_hf = sum(p.numel() for p in hf.parameters())
    if n_ours != n_hf:
        raise SystemExit(f"shapes differ: lmlab {n_ours:,} vs HF {n_hf:,} parameters")
    hf_opt = build_optimizer(hf, OptimizerConfig())
    hf_fwd = torch.compile(hf)
    x, y = tokens[:, :-1], tokens[:, 1:]

    def theirs():
        with autocast(), attention_context(device):
            logits = hf_fwd(input_ids=x, use_cache=False).logits
            loss = torch.nn.functional.cross_entropy(logits.float().flatten(0, 1), y.flatten())
        loss.backward()
        hf_opt.step()
        hf_opt.zero_grad(set_to_none=True)

    return module, n_ours, [Side("lmlab", ours), Side("hf-compiled", theirs)]


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--shapes", default="125m,350m")
    p.add_argument("--threads", type=int, default=2, help="CPU threads (pinned)")
    p.add_argument("--steps", type=int, default=None, help="timed steps per side (default 20 on CUDA, 2 on CPU)")
    p.add_argument("--warmup", type=int, default=None, help="untimed steps, compile included (default 3 / 1)")
    p.add_argument("--seq", type=int, default=None, help="default 1024 on CUDA, 128 on CPU")
    p.add_argument("--batch", type=int, default=None, help="default 8 on CUDA, 1 on CPU")
    args = p.parse_args()
    pin_threads(args.threads)
    import torch

    from lmlab.distributed.hardware import detect_peak_flops
    from lmlab.models.counting import flops_per_token

    cuda = torch.cuda.is_available()
    device = torch.device("cuda" if cuda else "cpu")
    args.steps = args.steps or (20 if cuda else 2)
    args.warmup = args.warmup if args.warmup is not None else (3 if cuda else 1)
    args.seq = args.seq or (1024 if cuda else 128)
    args.batch = args.batch or (8 if cuda else 1)
    if cuda:
        torch.backends.cuda.matmul.allow_tf32 = True
    name = torch.cuda.get_device_name(device) if cuda else f"CPU, {torch.get_num_threads()} threads"
    sheet = detect_peak_flops(device, "bf16-mixed")
    measured = measured_peak(device, 8192 if cuda else 2048)
    sync = torch.cuda.synchronize if cuda else (lambda: None)
    print(f"device: {name}; torch {torch.__version__}; batch {args.batch} x seq {args.seq}; "
          f"{args.steps} timed steps per side after {args.warmup} warm-up (compile) steps, alternated")
    print(f"bf16 peak: datasheet {sheet / 1e12:.0f} TFLOP/s" if sheet else "bf16 peak: no datasheet entry",
          f"| measured matmul {measured / 1e12:.2f} TFLOP/s")
    print("differs: lmlab fuses q/k/v and gate/up, compiles each block, chunks the loss with the head; "
          "HF compiles the whole model and materialises the fp32 logits; both: bf16 autocast, SDPA"
          + (" (flash only)" if cuda else "") + ", same fused AdamW and batch")
    rows = []
    for shape in args.shapes.split(","):
        t0 = time.perf_counter()
        module, n, sides = build_sides(shape, args, device)
        if cuda:
            torch.cuda.reset_peak_memory_stats()
        alternate(sides, steps=args.steps, warmup=args.warmup, sync=sync)
        fpt = flops_per_token(module.config, args.seq, "palm")
        tok = args.batch * args.seq
        print(f"\n{shape}: {n / 1e6:.0f}M params, {fpt / 1e9:.2f} GFLOP/token, {time.perf_counter() - t0:.0f} s")
        for side in sides:
            if side.median is None:
                print(f"  {side.name:<12} failed: {side.error}")
                continue
            tps = tok / side.median
            mfu_sheet = f"{100 * fpt * tps / sheet:5.1f}%" if sheet else "  n/a"
            print(f"  {side.name:<12} {tps:12,.0f} tok/s  MFU {mfu_sheet} of datasheet, "
                  f"{100 * fpt * tps / measured:5.1f}% of measured matmul")
            rows.append((shape, side.name, tps))
        report_ratio(f"  lmlab/hf-compiled tokens/s {shape}", sides[0].median and 1 / sides[0].median,
                     sides[1].median and 1 / sides[1].median)
        if cuda:
            print(f"  peak GPU memory (both models): {torch.cuda.max_memory_allocated() / 2**30:.1f} GiB")
        del module, sides
        if cuda:
            torch.cuda.empty_cache()


if __name__ == "__main__":
    main()
