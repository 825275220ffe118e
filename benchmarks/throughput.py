"""Training-step throughput: lmlab's default step vs transformers' LlamaForCausalLM, eager and compiled.

Sides, each a full training step (forward, loss, backward, AdamW step) on the
same batch, alternated step by step in one process (benchmarks/harness.py):

* ``lmlab``: ``PretrainModule``'s default step for a long run (``compile: auto``
  resolves to per-block compilation at >= 1000 steps, which also compiles
  the LM head with its cross-entropy and, for bf16 on CPU, takes the
  attention backward through matmuls; fused cross-entropy where ``auto``
  turns it on, i.e. vocab >= 32k; fused AdamW, lmlab's default);
* ``hf-eager``: ``LlamaForCausalLM`` (SDPA attention), loss on its float logits;
* ``hf-compiled``: the same model under ``torch.compile`` (whole model).

Both libraries get the same shape and parameter count (untied embeddings,
SwiGLU, RMSNorm, RoPE) and the same fused AdamW, so the ratio measures the
model step. Percent of peak divides model FLOP/s (PaLM counting: 6N plus
attention) by a large matmul's FLOP/s measured in the same process, per
precision. ``--lightning`` also times ``Trainer.fit`` steps of the same module
against the same step called directly: a callback runs one direct step after
each Lightning step, so the two alternate.

    python benchmarks/throughput.py --threads 2 --shapes 256x6,512x8
"""

from __future__ import annotations

import argparse
import contextlib
import os
import sys
import tempfile
import time

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from harness import Side, alternate, pin_threads, report_ratio  # noqa: E402

DIFFERS = ("lmlab: fused q/k/v and gate/up matmuls, blocks compiled one by one and the LM head + cross-entropy "
           "compiled (its default for runs of >= 1000 steps), bf16 attention with a matmul backward on CPU; "
           "HF: separate projections, SDPA attention, eager loss on float logits; HF compiled: whole model under "
           "torch.compile; both: same fused AdamW, same batch")


def autocast_for(precision: str, device):
    import torch

    if precision == "bf16":
        return lambda: torch.autocast(device.type, dtype=torch.bfloat16)
    return contextlib.nullcontext


def _first_step_timer_base():
    import lightning.pytorch as pl

    return pl.Callback


class FirstStepTimer(_first_step_timer_base()):
    """Prints the process's CPU time when the first training step starts (start-up cost, load-independent).

        PYTHONPATH=benchmarks lmlab fit --config experiments/quickstart.yaml --trainer.max_steps=1 \\
            --trainer.callbacks+=throughput.FirstStepTimer
    """

    def on_train_batch_start(self, trainer, *args):
        if trainer.global_step == 0:
            print(f"start-up to the first training step: {time.process_time():.2f} s CPU", flush=True)


def label_of(d_model: int, layers: int, precision: str) -> str:
    return f"d{d_model}x{layers} {precision}"


def lmlab_module(args, d_model: int, layers: int, device):
    from lmlab.models import TransformerConfig
    from lmlab.modules import PretrainModule, TrainingSettings

    cfg = TransformerConfig(vocab_size=args.vocab, d_model=d_model, n_layers=layers, n_heads=d_model // 64,
                            max_seq_len=args.seq, tie_embeddings=False, pad_vocab_to=1)
    return PretrainModule(cfg, settings=TrainingSettings()).to(device)


def make_lmlab_step(module, tokens, autocast, compile_mode: str):
    from lmlab.modules.optim import build_optimizer

    if compile_mode == "blocks":
        module.model.backbone.compile_blocks()
    elif compile_mode == "model":
        import torch

        module._compiled = torch.compile(module.model)
    opt = build_optimizer(module.model, module.settings.optimizer)
    normaliser = tokens[:, 1:].numel()

    def step():
        with autocast():
            _, _, loss = module._nll(tokens, normaliser)
        loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)

    return step, opt


def make_hf_step(args, d_model: int, layers: int, hidden: int, tokens, autocast, device, compiled: bool):
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    from lmlab.modules import OptimizerConfig
    from lmlab.modules.optim import build_optimizer

    cfg = LlamaConfig(vocab_size=args.vocab, hidden_size=d_model, intermediate_size=hidden, num_hidden_layers=layers,
                      num_attention_heads=d_model // 64, num_key_value_heads=d_model // 64,
                      max_position_embeddings=args.seq, rms_norm_eps=1e-5, tie_word_embeddings=False,
                      attention_bias=False, mlp_bias=False, attn_implementation="sdpa")
    model = LlamaForCausalLM(cfg).to(device)
    opt = build_optimizer(model, OptimizerConfig())  # the same fused AdamW and parameter groups
    fwd = torch.compile(model) if compiled else model
    x, y = tokens[:, :-1], tokens[:, 1:]

    def step():
        with autocast():
            logits = fwd(input_ids=x, use_cache=False).logits
            loss = torch.nn.functional.cross_entropy(logits.float().flatten(0, 1), y.flatten())
        loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)

    return step, sum(p.numel() for p in model.parameters())


def measure_shape(args, d_model: int, layers: int, precision: str, device, peaks: dict) -> None:
    import torch

    from lmlab.models.counting import flops_per_token
    from lmlab.modules.optim import COMPILE_AUTO_MIN_STEPS, resolve_compile

    # every shape compiles afresh, as in a run of its own: a graph compiled for an earlier shape
    # would otherwise be recompiled with dynamic sizes, on both compiled sides
    torch._dynamo.reset()
    torch.manual_seed(0)
    tokens = torch.randint(0, args.vocab, (args.batch, args.seq + 1), device=device)
    autocast = autocast_for(precision, device)
    module = lmlab_module(args, d_model, layers, device)
    mode = resolve_compile(module.settings.compile, device, COMPILE_AUTO_MIN_STEPS)
    ours, _ = make_lmlab_step(module, tokens, autocast, mode)
    n_ours = sum(p.numel() for p in module.model.parameters())
    sides = [Side("lmlab", ours)]
    for compiled in (False, True):
        step, n_hf = make_hf_step(args, d_model, layers, module.config.hidden_dim, tokens, autocast, device, compiled)
        if n_hf != n_ours:
            print(f"shapes differ: lmlab {n_ours:,} vs HF {n_hf:,} parameters; no ratio")
            return
        sides.append(Side("hf-compiled" if compiled else "hf-eager", step))
    sync = torch.cuda.synchronize if device.type == "cuda" else (lambda: None)
    # the matmul peak is timed inside the same alternation, so load changes hit it like the steps
    dtype = torch.bfloat16 if precision == "bf16" else torch.float32
    a, b = (torch.randn(args.peak_n, args.peak_n, device=device, dtype=dtype) for _ in range(2))
    peak_side = Side("matmul", lambda: a @ b)
    t0 = time.perf_counter()
    alternate([*sides, peak_side], steps=args.steps, warmup=args.warmup, sync=sync)
    peaks[precision] = 2 * args.peak_n**3 / peak_side.median
    print(f"\n{label_of(d_model, layers, precision)}: matmul peak {peaks[precision] / 1e9:.0f} GFLOP/s "
          f"({args.peak_n}^3, alternated with the steps)")
    fpt = flops_per_token(module.config, args.seq, "palm")
    tok = args.batch * args.seq
    label = label_of(d_model, layers, precision)
    print(f"{label}: {n_ours / 1e6:.1f}M params, lmlab compile={mode}, {time.perf_counter() - t0:.0f} s "
          f"(warm-up {args.warmup} steps, compile included there)")
    for side in sides:
        if side.median is None:
            print(f"  {side.name:<12} failed: {side.error}")
            continue
        tps = tok / side.median
        pct = 100 * fpt * tps / peaks[precision]
        print(f"  {side.name:<12} {side.median * 1e3:9.1f} ms/step {tps:10,.0f} tok/s {pct:6.1f}% of matmul peak")
        args.rows.append((label, side.name, side.median, tps, pct))
    for base in sides[1:]:
        report_ratio(f"  lmlab/{base.name} {label}", sides[0].median and 1 / sides[0].median,
                     base.median and 1 / base.median, DIFFERS if base is sides[1] else "")


LIGHTNING_SETUPS = {
    "bare": "Trainer with no progress bar, checkpointing or summary; CSV logger",
    "lmlab-fit": "what `lmlab fit` adds by default: step progress bar, lmlab ModelCheckpoint (no save due), "
                 "RunSummary, lmlab CSV logger",
}


def lightning_vs_raw(args, device, setup: str) -> None:
    """Trainer.fit steps vs the same module's step called directly, alternated step by step by a callback.

    Each fit step is followed by one direct step of a second, identical module (same weights, same batch), so
    load changes hit both alike; the fit side's time runs from the end of one direct step to the end of the
    next fit step, so it holds everything Lightning does between two steps (data loader, hooks, callbacks,
    logging) as well as the step itself.
    """
    import statistics

    import lightning.pytorch as pl
    import torch

    from lmlab.callbacks import ModelCheckpoint, step_progress_bar
    from lmlab.loggers import CSVLogger
    from lmlab.scaling.run_summary import RunSummary

    d_model, layers = args.shapes[0]
    torch.manual_seed(0)
    tokens = torch.randint(0, args.vocab, (args.batch, args.seq + 1))
    fit_module = lmlab_module(args, d_model, layers, device)
    compile_mode = "blocks" if args.lightning_compile else False
    fit_module.settings.compile = compile_mode  # "blocks": what a long run resolves to, without a long run
    fit_module.settings.gradient_clip_val = 0.0
    raw_module = lmlab_module(args, d_model, layers, device)
    raw_module.model.load_state_dict(fit_module.model.state_dict())
    raw_step, _ = make_lmlab_step(raw_module, tokens.to(device), contextlib.nullcontext, compile_mode or "eager")
    n = args.warmup + args.lightning_steps

    class Alternate(pl.Callback):
        # wall time, and the process's CPU time (every thread, the progress bar's included): the CPU time
        # does not grow when other jobs take the cores, so it shows the overhead on a loaded machine too
        def __init__(self):
            self.fit_times, self.raw_times, self.fit_cpu, self.raw_cpu, self.last = [], [], [], [], None

        def on_train_batch_end(self, trainer, *a):
            now, cpu = time.perf_counter(), time.process_time()
            timed = trainer.global_step > args.warmup
            if self.last is not None and timed:
                self.fit_times.append(now - self.last[0])
                self.fit_cpu.append(cpu - self.last[1])
            t0, c0 = time.perf_counter(), time.process_time()
            raw_step()
            if timed:
                self.raw_times.append(time.perf_counter() - t0)
                self.raw_cpu.append(time.process_time() - c0)
            self.last = time.perf_counter(), time.process_time()

    batches = [{"tokens": tokens} for _ in range(n + 1)]
    loader = torch.utils.data.DataLoader(batches, batch_size=None)
    cb = Alternate()
    with tempfile.TemporaryDirectory() as tmp:
        callbacks = [cb]
        if setup == "lmlab-fit":
            callbacks += [step_progress_bar(), ModelCheckpoint(every_n_train_steps=10 * n), RunSummary(validate_at_end=False)]
            extra = dict(logger=CSVLogger(save_dir=tmp, name="csv"), enable_progress_bar=True)
        else:
            extra = dict(logger=pl.loggers.CSVLogger(tmp), enable_progress_bar=False, enable_checkpointing=False)
        trainer = pl.Trainer(accelerator=device.type, devices=1, max_steps=n + 1, callbacks=callbacks,
                             enable_model_summary=False, limit_val_batches=0, default_root_dir=tmp, **extra)
        trainer.fit(fit_module, train_dataloaders=loader)
    differs = ("fit adds the data loader, hooks, callbacks, metric logging every 50 steps, the LR schedule, the loss "
               f"finiteness check; both: compile={compile_mode}, fused AdamW, no clipping")
    print(f"\nLightning path ({setup}: {LIGHTNING_SETUPS[setup]}), d{d_model}x{layers} fp32, "
          f"{min(len(cb.fit_times), len(cb.raw_times))} alternated steps (medians):")
    for what, fit, raw in (("wall", cb.fit_times, cb.raw_times), ("CPU", cb.fit_cpu, cb.raw_cpu)):
        fit_s = statistics.median(fit) if fit else None
        raw_s = statistics.median(raw) if raw else None
        pairs = [(f, r) for f, r in zip(fit, raw) if r > 0]
        extra_ms = statistics.median(f - r for f, r in pairs) * 1e3 if pairs else float("nan")
        print(f"  {what:<4} time: Trainer.fit {fit_s and fit_s * 1e3:.2f} ms/step, direct step "
              f"{raw_s and raw_s * 1e3:.2f} ms/step, median per-step difference {extra_ms:+.2f} ms")
        # each fit step is compared with the direct step right after it, under the same load
        paired = statistics.median(f / r for f, r in pairs) if pairs else None
        report_ratio(f"  {setup} ({what} time, median over step pairs): Trainer.fit speed / direct step speed "
                     "(1.0 = no overhead)", paired, 1.0 if paired else None, higher_is_better=False,
                     differences=differs if what == "wall" else "")


def loss_memory_side(args, fused: bool) -> None:
    """One forward + backward of the LM head and loss; prints the peak memory it added (run in its own process)."""
    import resource

    import torch

    from lmlab.models.losses import linear_cross_entropy

    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    torch.manual_seed(0)
    h = torch.randn(args.batch, args.seq, args.mem_d_model, device=device, requires_grad=True)
    w = (torch.randn(args.mem_vocab, args.mem_d_model, device=device) * 0.02).requires_grad_()
    t = torch.randint(0, args.mem_vocab, (args.batch, args.seq), device=device)
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats()
        base = torch.cuda.memory_allocated()
    else:
        base = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
    with torch.autocast(device.type, dtype=torch.bfloat16):
        if fused:
            loss, _ = linear_cross_entropy(h, w, t, normaliser=t.numel())
        else:
            logits = h @ w.t()
            loss = torch.nn.functional.cross_entropy(logits.float().flatten(0, 1), t.flatten())
    loss.backward()
    if device.type == "cuda":
        peak = torch.cuda.max_memory_allocated() - base
    else:
        peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024 - base
    print(f"PEAK {peak} LOSS {float(loss):.6f}")


def loss_memory(args) -> None:
    """Peak memory of the loss with and without the fused chunked cross-entropy, each in a fresh process."""
    import subprocess

    out = {}
    for side in ("plain", "fused"):
        cmd = [sys.executable, __file__, "--memory-side", side, "--seq", str(args.seq), "--batch", str(args.batch),
               "--mem-vocab", str(args.mem_vocab), "--mem-d-model", str(args.mem_d_model)]
        res = subprocess.run(cmd, capture_output=True, text=True)
        line = [ln for ln in res.stdout.splitlines() if ln.startswith("PEAK")]
        out[side] = (int(line[0].split()[1]), float(line[0].split()[3])) if line else None
    print(f"\nloss memory, vocab {args.mem_vocab}, d_model {args.mem_d_model}, {args.batch}x{args.seq} tokens, "
          "bf16 autocast, forward + backward of head and loss:")
    for side, r in out.items():
        print(f"  {side:<6} " + (f"peak +{r[0] / 2**20:,.0f} MiB, loss {r[1]:.6f}" if r else "failed"))
    if out["plain"] and out["fused"]:
        report_ratio("  plain/fused peak memory", out["fused"][0], out["plain"][0], higher_is_better=False,
                     differences="fused: 128 MiB chunks of fp32 logits, gradients made in the forward pass")


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--shapes", default="256x6,512x8", help="d_model x layers, comma separated")
    p.add_argument("--vocab", type=int, default=8192)
    p.add_argument("--seq", type=int, default=256)
    p.add_argument("--batch", type=int, default=8)
    p.add_argument("--steps", type=int, default=6)
    p.add_argument("--warmup", type=int, default=2)
    p.add_argument("--precisions", default="fp32,bf16")
    p.add_argument("--peak-n", type=int, default=2048, help="matmul size for the peak")
    p.add_argument("--lightning", action="store_true", help="also time Trainer.fit against the direct step")
    p.add_argument("--lightning-steps", type=int, default=40, help="alternated steps of the Lightning comparison")
    p.add_argument("--lightning-setups", default=",".join(LIGHTNING_SETUPS), help="comma separated: bare, lmlab-fit")
    p.add_argument("--lightning-compile", type=int, default=1, help="1: blocks compiled on both sides; 0: eager")
    p.add_argument("--no-models", action="store_true", help="skip the lmlab vs transformers table")
    p.add_argument("--memory", action="store_true", help="also measure the loss's peak memory, fused vs plain")
    p.add_argument("--mem-vocab", type=int, default=131072)
    p.add_argument("--mem-d-model", type=int, default=512)
    p.add_argument("--memory-side", choices=("plain", "fused"), help=argparse.SUPPRESS)
    args = p.parse_args()
    if args.memory_side:
        pin_threads(args.threads)
        return loss_memory_side(args, args.memory_side == "fused")
    args.shapes = [tuple(int(v) for v in s.split("x")) for s in args.shapes.split(",")]
    args.rows = []
    pin_threads(args.threads)
    import torch

    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    print(f"device={device.type} threads={torch.get_num_threads()} torch={torch.__version__} "
          f"vocab={args.vocab} seq={args.seq} batch={args.batch} steps={args.steps} (median)")
    precisions = args.precisions.split(",")
    peaks: dict = {}
    if not args.no_models:
        for d_model, layers in args.shapes:
            for prec in precisions:
                measure_shape(args, d_model, layers, prec, device, peaks)
        print("\n| shape | precision | lmlab tok/s | HF eager tok/s | HF compiled tok/s | lmlab/HF eager | "
              "lmlab/HF compiled | % of matmul peak (lmlab / HF eager / HF compiled) |")
        print("|---|---|---|---|---|---|---|---|")
        for label in dict.fromkeys(r[0] for r in args.rows):
            rows = {r[1]: r for r in args.rows if r[0] == label}
            shape, prec = label.split()
            tps = [rows[s][3] if s in rows else None for s in ("lmlab", "hf-eager", "hf-compiled")]
            pct = [f"{rows[s][4]:.1f}" if s in rows else "-" for s in ("lmlab", "hf-eager", "hf-compiled")]
            ratio = [f"{tps[0] / t:.2f}x" if tps[0] and t else "-" for t in tps[1:]]
            cells = [f"{t:,.0f}" if t else "failed" for t in tps]
            print(f"| {shape} | {prec} | {' | '.join(cells)} | {' | '.join(ratio)} | {' / '.join(pct)} |")
    if args.lightning:
        for setup in args.lightning_setups.split(","):
            lightning_vs_raw(args, device, setup)
    if args.memory:
        loss_memory(args)


if __name__ == "__main__":
    main()
