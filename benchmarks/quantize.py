"""int8 dynamic quantization for CPU serving: perplexity cost and decode speed, float32 vs int8.

    python benchmarks/quantize.py --ckpt runs/x/checkpoints/last.ckpt --text held_out.jsonl

Perplexity uses ``lmlab.eval.perplexity`` on the same documents for both
models; speed is greedy decoding through the serving engine, one sequence
and a batch of 16, alternating the two models so both see the same load,
with torch and BLAS pinned to ``--threads`` threads (``harness.pin_threads``).
What differs between the sides: the Linear layers' weights are int8 with
activations quantized per batch (``torch.ao`` dynamic quantization) instead of
float32; same checkpoint, prompts and engine. Speed-ups are printed by
``harness.report_ratio``: none when a side failed (e.g. no quantized engine).
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

from harness import pin_threads, report_ratio  # noqa: E402

if __name__ == "__main__":
    pin_threads(2)  # provisional, before torch loads its pools; main() pins --threads

import torch  # noqa: E402


def decode_speed(model, tokenizer, prompts, max_tokens: int, batch: int) -> float:
    from lmlab.serving.engine import Engine, GenerationRequest, SamplingParams

    engine = Engine(model, tokenizer, max_batch=batch, max_queue=len(prompts))
    reqs = [engine.submit(GenerationRequest(tokenizer(p)["input_ids"], SamplingParams(max_tokens=max_tokens, temperature=0)))
            for p in prompts]
    t0 = time.perf_counter()
    while not all(r.done for r in reqs):
        engine.step()
    return sum(len(r.token_ids) for r in reqs) / (time.perf_counter() - t0)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--ckpt", required=True)
    ap.add_argument("--text", required=True, help=".txt or .jsonl ({'text'} per line) held-out documents")
    ap.add_argument("--max_documents", type=int, default=200)
    ap.add_argument("--max_tokens", type=int, default=64)
    ap.add_argument("--repeats", type=int, default=2)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--fail", choices=("float32", "int8"), default=None, help="make this side raise (tests)")
    args = ap.parse_args(argv)
    pin_threads(args.threads)

    from lmlab.eval.cli import _read_texts
    from lmlab.eval.perplexity import perplexity
    from lmlab.serving.prompts import load_model

    texts = _read_texts([args.text])[: args.max_documents]
    prompts = [" ".join(t.split()[:12]) or "The" for t in texts[:16]]
    models, errors, tok = {}, {}, None

    def attempt(name: str, fn):
        try:
            if args.fail == name:
                raise RuntimeError(f"--fail {name}")
            return fn()
        except Exception as exc:  # noqa: BLE001 - a failed side gives no ratio, the other is still reported
            errors.setdefault(name, f"{type(exc).__name__}: {exc}".splitlines()[0][:300])
            return None

    for name, quantize in (("float32", None), ("int8", "int8")):
        loaded = attempt(name, lambda: load_model(args.ckpt, device="cpu", **({"quantize": quantize} if quantize else {})))
        if loaded is not None:
            models[name], tok = loaded[0], loaded[1]
    ppl = {name: attempt(name, lambda: perplexity(m, tok, texts, batch_size=8)) for name, m in models.items()}
    speed = {(name, b): [] for name in ("float32", "int8") for b in (1, 16)}
    for _ in range(args.repeats):
        for b in (1, 16):
            for name, m in models.items():
                if name not in errors:
                    s = attempt(name, lambda: decode_speed(m, tok, prompts[:b], args.max_tokens, b))
                    if s is not None:
                        speed[(name, b)].append(s)
    print(f"{args.ckpt}: {len(texts)} documents, greedy decode of {args.max_tokens} tokens, "
          f"{torch.get_num_threads()} threads (pinned)")
    print("| model | ppl | bpb | decode tok/s (1 seq) | decode tok/s (16 seqs) |")
    print("|---|---|---|---|---|")
    for name in ("float32", "int8"):
        if name in errors:
            print(f"| {name} | failed: {errors[name]} | | | |")
            continue
        r = ppl[name]
        print(f"| {name} | {r.ppl:.3f} | {r.bpb:.4f} | {max(speed[(name, 1)]):.1f} | {max(speed[(name, 16)]):.1f} |")
    failed = "; ".join(f"{name} side failed" for name in errors) or None
    differs = "int8 dynamic quantization of the Linear layers vs float32; same checkpoint, prompts, engine and threads"
    for b in (1, 16):
        report_ratio(f"decode speed-up int8 / float32 ({b} seq{'s' if b > 1 else ''})",
                     None if failed else max(speed[("int8", b)]), None if failed else max(speed[("float32", b)]),
                     differences=differs, failed=failed)
    if failed:
        return 1
    weights = sum(t.numel() * t.element_size() for t in models["float32"].state_dict().values() if isinstance(t, torch.Tensor))
    cost = ppl["int8"].ppl / ppl["float32"].ppl - 1
    print(f"int8 perplexity cost: {100 * cost:+.2f}%; float32 weights {weights / 2**20:.1f} MiB")
    print(json.dumps({"ppl_fp32": ppl["float32"].ppl, "ppl_int8": ppl["int8"].ppl}))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
