"""int8 dynamic quantization for CPU serving: perplexity cost and decode speed, float32 vs int8.

    python benchmarks/quantize.py --ckpt runs/x/checkpoints/last.ckpt --text held_out.jsonl

Perplexity uses ``lmlab.eval.perplexity`` on the same documents for both
models; speed is greedy decoding through the serving engine, one sequence
and a batch of 16, alternating the two models so both see the same load.
"""

from __future__ import annotations

import argparse
import json
import time

import torch


def decode_speed(model, tokenizer, prompts, max_tokens: int, batch: int) -> float:
    from lmlab.serving.engine import Engine, GenerationRequest, SamplingParams

    engine = Engine(model, tokenizer, max_batch=batch, max_queue=len(prompts))
    reqs = [engine.submit(GenerationRequest(tokenizer(p)["input_ids"], SamplingParams(max_tokens=max_tokens, temperature=0)))
            for p in prompts]
    t0 = time.perf_counter()
    while not all(r.done for r in reqs):
        engine.step()
    return sum(len(r.token_ids) for r in reqs) / (time.perf_counter() - t0)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--ckpt", required=True)
    ap.add_argument("--text", required=True, help=".txt or .jsonl ({'text'} per line) held-out documents")
    ap.add_argument("--max_documents", type=int, default=200)
    ap.add_argument("--max_tokens", type=int, default=64)
    ap.add_argument("--repeats", type=int, default=2)
    ap.add_argument("--threads", type=int, default=None)
    args = ap.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)

    from lmlab.eval.cli import _read_texts
    from lmlab.eval.perplexity import perplexity
    from lmlab.serving.prompts import load_model

    fp32, tok, _ = load_model(args.ckpt, device="cpu")
    int8, _, _ = load_model(args.ckpt, device="cpu", quantize="int8")
    texts = _read_texts([args.text])[: args.max_documents]
    ppl = {name: perplexity(m, tok, texts, batch_size=8) for name, m in (("float32", fp32), ("int8", int8))}
    prompts = [" ".join(t.split()[:12]) or "The" for t in texts[:16]]
    speed = {(name, b): [] for name in ("float32", "int8") for b in (1, 16)}
    for _ in range(args.repeats):
        for b in (1, 16):
            for name, m in (("float32", fp32), ("int8", int8)):
                speed[(name, b)].append(decode_speed(m, tok, prompts[:b], args.max_tokens, b))
    weights = {name: sum(t.numel() * t.element_size() for t in m.state_dict().values() if isinstance(t, torch.Tensor))
               for name, m in (("float32", fp32),)}
    print(f"{args.ckpt}: {len(texts)} documents, greedy decode of {args.max_tokens} tokens, "
          f"{torch.get_num_threads()} threads")
    print("| model | ppl | bpb | decode tok/s (1 seq) | decode tok/s (16 seqs) |")
    print("|---|---|---|---|---|")
    for name in ("float32", "int8"):
        r = ppl[name]
        print(f"| {name} | {r.ppl:.3f} | {r.bpb:.4f} | {max(speed[(name, 1)]):.1f} | {max(speed[(name, 16)]):.1f} |")
    cost = ppl["int8"].ppl / ppl["float32"].ppl - 1
    print(f"int8 perplexity cost: {100 * cost:+.2f}%; speed-up {max(speed[('int8', 1)]) / max(speed[('float32', 1)]):.2f}x "
          f"(1 seq), {max(speed[('int8', 16)]) / max(speed[('float32', 16)]):.2f}x (16 seqs); "
          f"float32 weights {weights['float32'] / 2**20:.1f} MiB")
    print(json.dumps({"ppl_fp32": ppl["float32"].ppl, "ppl_int8": ppl["int8"].ppl}))


if __name__ == "__main__":
    main()
