"""DDP weak scaling on CPU: tokens/s of 1 vs N processes (gloo) at the same per-rank batch.

Each process trains lmlab's CausalLM with AdamW on random tokens under
``DistributedDataParallel`` (gradient all-reduce over gloo) with one intra-op
thread, so N processes use N cores. Scaling efficiency is
``tokens/s(N) / (N * tokens/s(1))``: 100% means the all-reduce is free.

    python benchmarks/ddp_scaling.py [--procs 2 --d-model 256 --layers 4 --seq 256 --batch 8 --steps 20]

Prints a Markdown table and the speed-up of N processes over one (through
``harness.report_ratio``: what differs between the sides is stated, and a run
that failed gives no ratio). Every process pins torch and BLAS to one thread
(``harness.pin_threads``); 1- and N-process runs alternate ``--repeats`` times.
Wall-clock efficiency needs N otherwise idle cores; the tokens-per-CPU-second
column shows the compute overhead of DDP alone.
"""

from __future__ import annotations

import argparse
import os
import socket
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

from harness import pin_threads, report_ratio  # noqa: E402


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _worker(rank: int, world: int, port: int, args, out: str) -> None:
    import torch
    import torch.distributed as dist
    import torch.nn.functional as F
    from torch.nn.parallel import DistributedDataParallel as DDP

    from lmlab.models import CausalLM, TransformerConfig

    pin_threads(1)
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    dist.init_process_group("gloo", rank=rank, world_size=world)
    torch.manual_seed(0)
    cfg = TransformerConfig(vocab_size=args.vocab, d_model=args.d_model, n_layers=args.layers,
                            n_heads=max(1, args.d_model // 64), max_seq_len=args.seq)
    model = DDP(CausalLM(cfg), gradient_as_bucket_view=True)
    opt = torch.optim.AdamW(model.parameters(), lr=1e-4, foreach=True)
    gen = torch.Generator().manual_seed(rank)
    tokens = torch.randint(0, args.vocab, (args.steps + args.warmup, args.batch, args.seq + 1), generator=gen)

    def step(i: int) -> None:
        x = tokens[i]
        logits = model(x[:, :-1])
        loss = F.cross_entropy(logits.flatten(0, 1), x[:, 1:].flatten())
        loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)

    for i in range(args.warmup):
        step(i)
    dist.barrier()
    t0, c0 = time.perf_counter(), time.process_time()
    for i in range(args.warmup, args.warmup + args.steps):
        step(i)
    dist.barrier()
    elapsed, cpu = time.perf_counter() - t0, torch.tensor(time.process_time() - c0, dtype=torch.float64)
    dist.all_reduce(cpu)  # CPU seconds of all ranks together
    tokens = world * args.batch * args.seq * args.steps
    if rank == 0:
        with open(out, "w") as f:
            f.write(f"{tokens / elapsed} {tokens / float(cpu)}")
    dist.destroy_process_group()


def tokens_per_second(world: int, args) -> tuple[float, float]:
    """(tokens per wall-clock second, tokens per CPU second summed over ranks)."""
    import torch.multiprocessing as mp

    fd, out = tempfile.mkstemp()
    os.close(fd)
    try:
        mp.spawn(_worker, args=(world, _free_port(), args, out), nprocs=world, join=True)
        wall, per_cpu = open(out).read().split()
        return float(wall), float(per_cpu)
    finally:
        os.unlink(out)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--procs", type=int, default=2)
    p.add_argument("--d-model", type=int, default=256)
    p.add_argument("--layers", type=int, default=4)
    p.add_argument("--vocab", type=int, default=4096)
    p.add_argument("--seq", type=int, default=256)
    p.add_argument("--batch", type=int, default=8, help="sequences per rank per step")
    p.add_argument("--steps", type=int, default=20)
    p.add_argument("--warmup", type=int, default=3)
    p.add_argument("--repeats", type=int, default=2, help="alternate 1 and N process runs this many times; keep the best")
    args = p.parse_args(argv)
    pin_threads(1)

    best = {1: (0.0, 0.0), args.procs: (0.0, 0.0)}
    failed: dict[int, str] = {}
    for _ in range(args.repeats):
        for world in (1, args.procs):
            if world in failed:
                continue
            try:
                wall, per_cpu = tokens_per_second(world, args)
            except Exception as exc:  # noqa: BLE001 - a failed run means no ratio
                failed[world] = f"{type(exc).__name__}: {exc}".splitlines()[0][:300]
                continue
            best[world] = (max(best[world][0], wall), max(best[world][1], per_cpu))
    n = args.procs
    differs = (f"{n} processes vs 1, each wrapped in DistributedDataParallel (gloo; with 1 process the gradient "
               "all-reduce exchanges nothing); same model, per-rank batch and AdamW, 1 thread per process")
    if failed:
        for world, err in failed.items():
            print(f"{world}-process run failed: {err}")
        report_ratio(f"speed-up {n} processes / 1 process", None, None,
                     failed="; ".join(f"{w}-process run failed" for w in failed))
        return 1
    eff = best[n][0] / (n * best[1][0])
    print(f"DDP (gloo) on CPU, d_model={args.d_model} layers={args.layers} seq={args.seq} "
          f"batch/rank={args.batch}, 1 thread per process, best of {args.repeats}, {os.cpu_count()} CPUs")
    print("| processes | tokens/s | speed-up | efficiency | tokens per CPU-second |")
    print("|---|---|---|---|---|")
    for world in (1, n):
        wall, per_cpu = best[world]
        print(f"| {world} | {wall:,.0f} | {wall / best[1][0]:.2f}x | {wall / (world * best[1][0]):.0%} | {per_cpu:,.0f} |")
    # tokens per CPU-second ignores time lost to other processes competing for the cores (and time spent
    # blocked in the all-reduce): its ratio isolates the compute overhead of DDP
    print(f"compute-only efficiency (tokens per CPU-second, {n} vs 1): {best[n][1] / best[1][1]:.0%}")
    print(f"wall-clock efficiency: {eff:.3f}")
    report_ratio(f"speed-up {n} processes / 1 process (tokens/s)", best[n][0], best[1][0], differences=differs)
    return 0


if __name__ == "__main__":
    sys.exit(main())
