"""Serving throughput: ``lmlab serve`` with 16 concurrent clients vs 1, and vs ``transformers serve``.

Both servers load the same transformers export (a random Llama-shaped model
with a BPE tokenizer unless ``--ckpt`` names one) and answer the same greedy
``/v1/completions`` requests, streamed, so time to first token (TTFT) is the
arrival of the first text chunk. Each server runs as its own process on
127.0.0.1 and is stopped at the end.

    python benchmarks/serving.py                      # 32 prompts, 16 clients, 128 new tokens
    python benchmarks/serving.py --no-transformers    # lmlab only
"""

from __future__ import annotations

import argparse
import json
import os
import random
import socket
import statistics
import subprocess
import sys
import tempfile
import threading
import time
import urllib.request
from pathlib import Path

WORDS = ("the cat sat on a mat while the dog ran in the park and a bird sang over the old tree near quiet water "
         "where fish swim slowly under bright morning light").split()


def make_model(out: Path, d_model: int, n_layers: int, vocab: int, seq: int) -> Path:
    import torch

    from lmlab.data.tokenizer import train_bpe
    from lmlab.models import CausalLM, TransformerConfig
    from lmlab.models.hf import save_hf

    rng = random.Random(0)
    texts = [" ".join(rng.choice(WORDS) for _ in range(60)) for _ in range(2000)]
    tok = train_bpe(texts, vocab, out / "tok")
    torch.manual_seed(0)
    cfg = TransformerConfig(vocab_size=vocab, d_model=d_model, n_layers=n_layers, n_heads=max(1, d_model // 64),
                            max_seq_len=seq, tie_embeddings=False)
    model = CausalLM(cfg)
    save_hf(model, out / "hf", tokenizer=tok)
    return out / "hf"


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def wait_ready(url: str, proc: subprocess.Popen, timeout: float = 300) -> None:
    deadline = time.time() + timeout
    while time.time() < deadline:
        if proc.poll() is not None:
            raise RuntimeError(f"server exited with {proc.returncode}")
        try:
            with urllib.request.urlopen(url + "/v1/models", timeout=2) as r:
                if r.status == 200:
                    return
        except OSError:
            time.sleep(0.5)
    raise RuntimeError("server did not become ready")


def run_load(url: str, model: str, prompts: list[str], clients: int, max_tokens: int, tokenizer) -> dict:
    from openai import OpenAI

    client = OpenAI(base_url=url + "/v1", api_key="unused", max_retries=0, timeout=600)
    todo = list(enumerate(prompts))
    lock = threading.Lock()
    ttfts, tokens, texts, failures = [], [], {}, []

    def worker():
        while True:
            with lock:
                if not todo:
                    return
                i, prompt = todo.pop(0)
            t0 = time.perf_counter()
            first, parts = None, []
            try:
                for chunk in client.completions.create(model=model, prompt=prompt, max_tokens=max_tokens, temperature=0,
                                                       stream=True):
                    if chunk.choices and chunk.choices[0].text:
                        first = first or time.perf_counter()
                        parts.append(chunk.choices[0].text)
            except Exception as e:
                failures.append(repr(e))
                continue
            text = "".join(parts)
            with lock:
                ttfts.append((first or time.perf_counter()) - t0)
                tokens.append(len(tokenizer(text, add_special_tokens=False)["input_ids"]))
                texts[i] = text

    start = time.perf_counter()
    threads = [threading.Thread(target=worker) for _ in range(clients)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    wall = time.perf_counter() - start
    q = statistics.quantiles(ttfts, n=20) if len(ttfts) > 1 else ttfts * 19
    return {"clients": clients, "requests": len(ttfts), "failures": len(failures), "tokens": sum(tokens),
            "tok_s": sum(tokens) / wall, "ttft_p50": statistics.median(ttfts), "ttft_p95": q[18], "wall": wall,
            "texts": texts}


def start(cmd: list[str], url: str, env: dict) -> subprocess.Popen:
    proc = subprocess.Popen(cmd, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    try:
        wait_ready(url, proc)
    except Exception:
        proc.terminate()
        err = proc.communicate(timeout=30)[1]
        raise RuntimeError(f"{' '.join(cmd[:3])} failed: {err[-2000:]}") from None
    return proc


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--ckpt", help="a transformers export directory (default: a random model built here)")
    ap.add_argument("--prompts", type=int, default=32)
    ap.add_argument("--clients", type=int, default=16)
    ap.add_argument("--max_tokens", type=int, default=128)
    ap.add_argument("--d_model", type=int, default=256)
    ap.add_argument("--n_layers", type=int, default=4)
    ap.add_argument("--transformers", action=argparse.BooleanOptionalAction, default=True)
    ap.add_argument("--continuous_batching", action="store_true", help="run transformers serve with --continuous-batching")
    ap.add_argument("--threads", type=int, default=2, help="intra-op threads of each server process (BLAS and torch), the same for both")
    ap.add_argument("--out", help="write the results as JSON here")
    args = ap.parse_args()

    from lmlab.data.tokenizer import load_tokenizer

    tmp = Path(tempfile.mkdtemp(prefix="lmlab-serving-bench-"))
    model_dir = Path(args.ckpt) if args.ckpt else make_model(tmp, args.d_model, args.n_layers, 1024, 512)
    tok = load_tokenizer(str(model_dir))
    rng = random.Random(1)
    prompts = [" ".join(rng.choice(WORDS) for _ in range(rng.randint(8, 40))) for _ in range(args.prompts)]
    # both servers get the same pinned thread count, so the ratio does not swing with machine load
    threads = str(args.threads)
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1", "TOKENIZERS_PARALLELISM": "false",
           "OMP_NUM_THREADS": threads, "MKL_NUM_THREADS": threads, "OPENBLAS_NUM_THREADS": threads}
    rows = []

    port = free_port()
    url = f"http://127.0.0.1:{port}"
    proc = start([sys.executable, "-m", "lmlab.cli", "serve", "--ckpt", str(model_dir), "--port", str(port),
                  "--model_name", "bench", "--max_batch", str(args.clients), "--device", "cpu"], url, env)
    try:
        run_load(url, "bench", prompts[:2], 1, 8, tok)  # warm-up
        one = run_load(url, "bench", prompts, 1, args.max_tokens, tok)
        many = run_load(url, "bench", prompts, args.clients, args.max_tokens, tok)
        rows += [("lmlab serve", one), ("lmlab serve", many)]
    finally:
        proc.terminate()
        proc.wait(timeout=30)
    same_lmlab = sum(one["texts"].get(i) == many["texts"].get(i) for i in range(len(prompts)))
    notes = [f"lmlab 1 vs {args.clients} clients: {same_lmlab}/{len(prompts)} identical greedy outputs"]

    if args.transformers:
        port = free_port()
        url = f"http://127.0.0.1:{port}"
        try:
            proc = start([str(Path(sys.executable).parent / "transformers"), "serve", str(model_dir), "--host",
                          "127.0.0.1", "--port", str(port), "--device", "cpu", "--log-level", "warning"]
                         + (["--continuous-batching"] if args.continuous_batching else []), url, env)
        except Exception as e:
            notes.append(f"transformers serve did not run: {str(e).strip().splitlines()[-1]}")
        else:
            try:
                run_load(url, str(model_dir), prompts[:2], 1, 8, tok)
                hf = run_load(url, str(model_dir), prompts, args.clients, args.max_tokens, tok)
                rows.append(("transformers serve" + (" --continuous-batching" if args.continuous_batching else ""), hf))
                same = sum(hf["texts"].get(i) == many["texts"].get(i) for i in range(len(prompts)))
                notes.append(f"lmlab vs transformers: {same}/{len(prompts)} identical greedy outputs")
            except Exception as e:
                notes.append(f"transformers serve failed under load: {str(e).splitlines()[0]}")
            finally:
                proc.terminate()
                proc.wait(timeout=30)

    print(f"{len(prompts)} prompts, {args.max_tokens} new tokens, greedy, CPU ({os.cpu_count()} cores)")
    print("| server | clients | requests ok | output tok/s | TTFT p50 (s) | TTFT p95 (s) |")
    print("|---|---|---|---|---|---|")
    for name, r in rows:
        print(f"| {name} | {r['clients']} | {r['requests']}/{len(prompts)} | {r['tok_s']:.1f} | {r['ttft_p50']:.3f} | "
              f"{r['ttft_p95']:.3f} |")
    speedup = many["tok_s"] / one["tok_s"]
    print(f"lmlab {args.clients} clients / 1 client throughput: {speedup:.2f}x")
    for note in notes:
        print(note)
    if args.out:
        Path(args.out).write_text(json.dumps({"rows": [(n, {k: v for k, v in r.items() if k != "texts"}) for n, r in rows],
                                              "notes": notes}, indent=2))


if __name__ == "__main__":
    main()
